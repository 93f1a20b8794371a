"""The time-to-quality benchmark's baseline must be nanoGPT's recipe as issue 10 states it, whatever gptlab's
own defaults become (they once moved to Muon and silently took the baseline with them)."""

import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from time_to_quality import NANOGPT_RECIPE  # noqa: E402

from gptlab.cli import build_parser  # noqa: E402
from gptlab.cli.train import DEFAULTS  # noqa: E402
from gptlab.training.config import resolve  # noqa: E402


def test_the_baseline_is_nanogpts_cpu_recipe_setting_for_setting():
    args = build_parser("train").parse_args(["train", *shlex.split(NANOGPT_RECIPE)])
    run = resolve({name: value for name, value in vars(args).items() if name in DEFAULTS})
    data, model, train = run.data, run.model, run.train
    assert (data.tokenizer, data.merges) == ("char", None)
    assert (model.n_layers, model.n_heads, model.emb_dim, model.context_length) == (4, 4, 128, 64)
    assert (model.drop_rate, model.attn_drop_rate, model.qkv_bias, model.tie_embeddings) == (0.0, 0.0, True, True)
    assert (train.optimizer, train.lr, train.warmup_steps, train.min_lr_ratio, train.schedule) == (
        "adamw",
        1e-3,
        100,
        0.1,
        "cosine",
    )
    assert (train.beta1, train.beta2, train.weight_decay, train.grad_clip) == (0.9, 0.99, 0.1, 1.0)
    assert (train.batch_size, train.stride, train.dtype, train.pos_init, train.compile) == (
        12,
        1,
        "float32",
        "gpt2",
        False,
    )
    assert train.ema_decay == 0.0  # nanoGPT evaluates the weights themselves
