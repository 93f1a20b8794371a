"""Models and prompts the generation tests share (imported by tests/inference/test_*.py)."""

from __future__ import annotations

from pathlib import Path

import torch

from gptlab.checkpoint import save_model
from gptlab.config import GPTConfig
from gptlab.model import GPTModel
from gptlab.tokenizer import Tokenizer

SHAPES = {
    "tied, qkv bias": GPTConfig(
        vocab_size=97, context_length=32, emb_dim=32, n_heads=4, n_layers=2, qkv_bias=True, tie_embeddings=True
    ),
    "untied, no bias": GPTConfig(vocab_size=61, context_length=24, emb_dim=48, n_heads=3, n_layers=3),
}
MULTIBYTE = " 🙂 日本語, naïve 😀 テスト ok"


def random_model(cfg: GPTConfig, seed: int = 0) -> GPTModel:
    torch.manual_seed(seed)
    return GPTModel(cfg).eval()


def save_random_checkpoint(path: Path, tokenizer: Tokenizer) -> Path:
    """A one-layer model with random weights over GPT-2's vocabulary, saved to path: samples differ with the
    seed, and end-of-text is rare."""
    save_model(
        path, random_model(GPTConfig(vocab_size=50257, context_length=32, emb_dim=16, n_heads=2, n_layers=1)), tokenizer
    )
    return path


def random_prompts(cfg: GPTConfig, lengths: list[int], seed: int = 1) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, cfg.vocab_size, (n,), generator=generator).tolist() for n in lengths]


@torch.inference_mode()
def uncached_logits(model: GPTModel, tokens: list[int]) -> torch.Tensor:
    """The next-token logits (V,) of the whole model run on tokens, no cache."""
    return model(torch.tensor([tokens], device=model.device))[0, -1].float()


def scripted_model(sequence: list[int], vocab_size: int = 50257, context_length: int = 64) -> GPTModel:
    """A real GPTModel whose greedy (and, at temperature 1, near-certain) successor of sequence[i] is
    sequence[i + 1]: the blocks add nothing (zero output projections), token i of the script embeds as a
    one-hot vector, and the head's row for its successor is that vector after the final LayerNorm."""
    assert len(set(sequence[:-1])) == len(sequence) - 1, "each scripted token needs one successor"
    cfg = GPTConfig(
        vocab_size=vocab_size,
        context_length=context_length,
        emb_dim=len(sequence) + 1,
        n_heads=1,
        n_layers=1,
        drop_rate=0.0,
    )
    model = random_model(cfg)
    with torch.no_grad():
        for block in model.trf_blocks:
            for projection in (block.att.out_proj, block.ff.proj):
                projection.weight.zero_()
                projection.bias.zero_()
        model.pos_emb.weight.zero_()
        model.out_head.weight.zero_()
        for index, (token, successor) in enumerate(zip(sequence, sequence[1:])):
            model.tok_emb.weight[token] = torch.nn.functional.one_hot(torch.tensor(index), cfg.emb_dim) * 10.0
            model.out_head.weight[successor] = 4 * model.final_norm(model.tok_emb.weight[token])  # wide margin
    return model


def one_thread():
    """For a module-scoped autouse fixture: these models are tiny, and a second thread only adds
    synchronisation, which on a busy 2-core machine costs ten times the work itself."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
