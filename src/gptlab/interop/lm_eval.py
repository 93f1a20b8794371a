"""gptlab's model for lm-evaluation-harness: its tasks scored by gptlab's own forward pass and decoder.

    python -m gptlab.interop.lm_eval --model gptlab --model_args checkpoint=runs/x/best --tasks hellaswag
    lm_eval.simple_evaluate(model=GptlabLM("runs/x/best"), tasks=["hellaswag"])

lm-eval 0.4 looks models up in its own registry and loads no other package's, so `lm_eval --model gptlab`
alone does not know the name: importing this module registers it, and running it as a script runs lm-eval's
command line after that (every lm-eval option works as it does there).

    loglikelihood          inference/benchmarks.py's continuation_scores, tokenized as lm-eval's hf model
                           tokenizes (benchmarks.encode_pair)
    loglikelihood_rolling  the whole text in lm-eval's rolling windows (its get_rolling_token_windows and
                           make_disjoint_window), the first token scored after end-of-text
    generate_until         gptlab's KV-cached decoder, greedy unless do_sample, ending at end-of-text, at
                           the first `until` string (not returned) or after max_gen_toks tokens

tests/interop/test_lm_eval_model.py checks each against lm-eval's `--model hf` on the model's Hugging Face export.
"""

from __future__ import annotations

import torch

from ..errors import UserError
from ..inference.benchmarks import continuation_scores, loglikelihoods
from ..inference.generate import generate_text
from ..inference.sampling import GenerationOptions
from ..loading import load_model

try:
    import lm_eval.models  # noqa: F401  (lm-eval registers its own models only into an empty registry: first)
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError:
    raise UserError("gptlab's lm-eval model needs lm-evaluation-harness: pip install 'lm-eval>=0.4.13'") from None

GENERATION_KEYS = {"until", "max_gen_toks", "do_sample", "temperature", "top_p", "top_k"}


@register_model("gptlab")
class GptlabLM(LM):
    """A gptlab checkpoint (or Hugging Face GPT-2 folder) as an lm-eval model; model_args: checkpoint=PATH,
    and optionally dtype=float32|bfloat16 and max_gen_toks=N (default 256); lm-eval's --device and
    --batch_size apply."""

    def __init__(
        self,
        checkpoint: str,
        dtype: str = "float32",
        max_gen_toks: int = 256,
        device: str | None = None,
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
    ):
        super().__init__()
        if dtype not in ("float32", "bfloat16"):
            raise UserError(f"dtype must be float32 or bfloat16, got {dtype!r}")
        if not str(batch_size).isdigit():
            raise UserError(f"--batch_size must be a whole number for the gptlab model, got {batch_size!r}")
        self.model, self.tokenizer = load_model(checkpoint, device=device or "cpu", dtype=getattr(torch, dtype))
        self.model.eval()
        self.batch_size, self.max_gen_toks = int(batch_size), int(max_gen_toks)

    def batches(self, items: list) -> list[list]:
        return [items[start : start + self.batch_size] for start in range(0, len(items), self.batch_size)]

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = [request.args for request in requests]
        return [result for batch in self.batches(pairs) for result in loglikelihoods(self.model, self.tokenizer, batch)]

    def loglikelihood_rolling(self, requests) -> list[float]:
        totals = []
        for request in requests:
            (text,) = request.args
            windows = [
                make_disjoint_window(window)
                for window in get_rolling_token_windows(
                    token_list=self.tokenizer.encode(text),
                    prefix_token=self.tokenizer.eot_id,
                    max_seq_len=self.model.cfg.context_length,
                    context_len=1,
                )
            ]
            totals.append(
                sum(ll for batch in self.batches(windows) for ll, _ in continuation_scores(self.model, batch))
            )
        return totals

    def generate_until(self, requests) -> list[str]:
        answers = []
        for request in requests:
            context, settings = request.args
            unknown = sorted(set(settings) - GENERATION_KEYS)
            if unknown:
                raise UserError(f"the gptlab model does not take the generation setting {unknown[0]!r}")
            until = settings.get("until", [])
            sample = settings.get("do_sample", False)
            options = GenerationOptions(
                max_new_tokens=int(settings.get("max_gen_toks", self.max_gen_toks)),
                temperature=float(settings.get("temperature", 1.0)) if sample else 0.0,
                top_p=float(settings.get("top_p", 1.0)),
                top_k=settings.get("top_k"),
                stop=(until,) if isinstance(until, str) else tuple(until),
                seed=0,
            )
            answers.append(generate_text(self.model, self.tokenizer, [context], options)[0])
        return answers


if __name__ == "__main__":
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
