"""The decoding session: weights prepared once per model, a KV cache, prefill and one-token steps.

Weights. Decoding multiplies a few rows by every weight matrix, so its speed is how fast the weights
stream from memory, and on the CPU which kernel streams them fastest depends on the CPU. There the
decoder runs a copy of the model whose Linear layers compute with the kernel inference/kernels.py
chooses for the dtype by what the CPU has (oneDNN's packed layout, or for bfloat16 without oneDNN's
bfloat16 fbgemm's float16-weight kernel), each weight prepared once, ahead of time.
On CUDA and MPS the weights are used as they are: a copy is made there only to change the dtype.
docs/benchmarks.md#kernel-choices has the figures.

One kernel serves every row count. So a row's logits do not depend on how many rows share its batch
(tests/inference/test_decoder.py and tests/serve/test_engine.py check it bit for bit in float32, bfloat16
and int4; int8's rows share one activation scale, inference/quantize.py), and the server's batching
cannot change what a request gets. The decoder changes nothing outside its own calls: no process-wide
switch is touched.

That copy is made once per model and dtype, not per session: it is kept (in a weak-keyed table, so it
goes when the model does) and reused while the model's parameters are the same tensors with the same
version counters; an optimizer step, load_state_dict or .to() changes them and the next session makes
a fresh copy. Threads that ask for the same copy at once wait for one to be made. The copy costs the
model's size in memory for as long as it is kept. For a model that changes between calls, such as one
being trained, pass DecoderSettings(prepare_weights=False): the session then decodes with the model's
own weights and keeps nothing.

Compiled steps (CUDA, opt-in). DecoderSettings(compile=True) runs each one-token step through
torch.compile(mode="reduce-overhead"), which records it as a CUDA graph: one launch per step instead
of hundreds. A graph needs fixed shapes and addresses, so that session uses a static KVCache, which
attends over every slot of the context with a mask instead of over the slots filled so far. The
prompt (prefill) runs uncompiled. The gain is small so far, and a hand-captured CUDA graph gains no
more, so launches are not what limits these steps (docs/benchmarks.md#gpu-decoding).
"""

from __future__ import annotations

import functools
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UserError
from ..model import GPTModel
from ..torch_compat import version_counter
from .cache import KVCache
from .kernels import decoding_linear, kernel_for
from .quantize import is_quantized


def prepares_weights(device: torch.device) -> bool:
    """Whether decoding on device runs a copy whose Linear layers take inference/kernels.py's kernels."""
    return device.type == "cpu"


def decoding_model(model: GPTModel, dtype: torch.dtype, pack: bool) -> GPTModel:
    """An eval-mode copy of the model with its weights in dtype and, with pack, every Linear computing
    with kernels.kernel_for(dtype) (see the module docstring). Tensors that need no change are
    shared, not copied. It is for generation only: a packed tied head is a second copy of the embedding."""
    state = {name: tensor.to(dtype) for name, tensor in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        state["out_head.weight"] = state["tok_emb.weight"]  # one converted copy, not two
    with torch.device("meta"):
        copy = GPTModel(model.cfg).requires_grad_(False)  # before loading: assign keeps it, inference tensors need it
    copy.load_state_dict(state, assign=True)
    if pack:
        linears = [(name, module) for name, module in copy.named_modules() if isinstance(module, nn.Linear)]
        for name, linear in linears:
            parent, _, attribute = name.rpartition(".")
            setattr(copy.get_submodule(parent), attribute, decoding_linear(linear, kernel_for(dtype)))
    return copy.eval()


# model → {dtype: (the parameters' identity when the copy was made, the copy)}
_prepared: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_prepared_lock = threading.Lock()


def weights_identity(model: GPTModel) -> tuple | None:
    """What changes when the parameters do: each tensor's address and version counter (bumped by every
    in-place change). None when that cannot be told: tensors made under inference_mode have no counter."""
    tensors = list(model.state_dict().values())
    if any(tensor.is_inference() for tensor in tensors):
        return None
    return tuple((tensor.data_ptr(), version_counter(tensor), tensor.dtype, tensor.device) for tensor in tensors)


def prepared_model(model: GPTModel, dtype: torch.dtype | None = None, prepare: bool = True) -> GPTModel:
    """The model to decode with, in dtype (default: the model's); never the model in training mode.

    prepare=True: on the CPU the packed copy, and elsewhere a copy only to change the dtype, made once
    per model and dtype and reused while its parameters are unchanged.
    prepare=False: the model's own weights, converted per call if dtype differs; nothing kept.
    Where the weights need no change, a model in training mode is replaced by an eval-mode module
    sharing every tensor (dropout must not touch the samples, and the caller's mode is left alone).
    A quantized model (inference/quantize.py) always decodes as it is.
    """
    dtype = dtype or model.tok_emb.weight.dtype
    if is_quantized(model):  # integer weights: no copy can be made of them, so they decode as they are
        if dtype != model.tok_emb.weight.dtype:
            raise UserError(
                f"a quantized model decodes in the dtype it was quantized in "
                f"({model.tok_emb.weight.dtype}), not {dtype}; convert the model before quantizing it"
            )
        return model
    pack = prepare and prepares_weights(model.device)
    if dtype == model.tok_emb.weight.dtype and not pack:
        return decoding_model(model, dtype, pack=False) if model.training else model
    identity = weights_identity(model) if prepare else None
    if identity is None:
        return decoding_model(model, dtype, pack)
    with _prepared_lock:  # two threads asking at once get one copy, not two
        copies = _prepared.setdefault(model, {})
        if dtype not in copies or copies[dtype][0] != identity:
            copies.pop(dtype, None)  # free the stale copy before making the new one
            copies[dtype] = (identity, decoding_model(model, dtype, pack))
        return copies[dtype][1]


def cache_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The KV cache's dtype for decoding in dtype. On the CPU a bfloat16 model keeps a float32 cache,
    because PyTorch's CPU attention is faster in float32 for a query or a few (docs/benchmarks.md#kernel-
    choices). The cache is a few percent of what a step reads, so its width costs little; the queries
    are cast up and the attention's output back down, per layer."""
    return torch.float32 if dtype == torch.bfloat16 and device.type == "cpu" else dtype


@dataclass(frozen=True)
class DecoderSettings:
    """How a session runs (what it generates is GenerationOptions').

    dtype: weights and cache while decoding (default: the model's). keep: see Decoder (default
    context_length // 2). prepare_weights=False decodes with the model's own weights, nothing copied
    or kept, for a model that changes between calls (a dtype change is then a copy per session).
    compile: the CUDA-graph decode step (see the module docstring).
    """

    dtype: torch.dtype | None = None
    keep: int | None = None
    prepare_weights: bool = True
    compile: bool = False


def next_token_logits(model: GPTModel, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Run ids (B, T) after the cached ones; logits (B, V) for the token after the last, in float32."""
    features = model.hidden_states(ids, cache)[:, -1]  # (B, C): only the last position is needed
    return model.out_head(features).float()


@functools.cache
def compiled_next_token_logits():
    return torch.compile(next_token_logits, mode="reduce-overhead", fullgraph=True, dynamic=False)


def compiled_step_logits(model: GPTModel, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """next_token_logits for one token per row (B, 1), replayed from a CUDA graph."""
    torch.compiler.cudagraph_mark_step_begin()  # the previous step's graph outputs are no longer read
    return compiled_next_token_logits()(
        model, ids, cache
    ).clone()  # out of the graph's memory, which the next step reuses


class Decoder:
    """One generation session: the model's weights for decoding (see prepared_model), a KV cache for
    `batch_size` rows, and each row's tokens so far.

    Past the context, the window slides: when the cache is full, each row's last `keep` tokens are run
    again from an empty cache (positions 0..keep-1) and decoding carries on from there. So the logits
    for the token after position n come from the model run on the last w tokens, where w goes keep,
    keep + 1, ..., context_length, then keep again. The default keep is context_length // 2: one
    prefill of half a context buys half a context of cheap steps. keep = context_length reproduces the
    textbook `generate_uncached` exactly (it crops to the last context_length tokens at every step), at
    the cost of a full prefill per token once the context is full.
    """

    def __init__(self, model: GPTModel, batch_size: int, settings: DecoderSettings = DecoderSettings()):
        self.context = model.cfg.context_length
        self.keep = self.context // 2 if settings.keep is None else settings.keep
        if not 1 <= self.keep <= self.context:
            raise UserError(f"keep must be between 1 and the context_length {self.context}, got {self.keep}")
        self.dtype = settings.dtype or model.tok_emb.weight.dtype
        self.device = model.device
        self.model = prepared_model(model, self.dtype, settings.prepare_weights)
        if settings.compile:
            self.cache = KVCache(model.cfg, batch_size, self.dtype, self.device, static=True)
            self.step_logits = compiled_step_logits
        else:
            self.cache = KVCache(model.cfg, batch_size, cache_dtype(self.dtype, self.device), self.device)
            self.step_logits = next_token_logits
        self.length = 0  # slots of the cache in use
        self.rows: list[list[int]] = []

    def prefill(self, rows: Sequence[Sequence[int]]) -> torch.Tensor:
        """Run rows of 1..context_length ids, left-padded, from an empty cache; the next-token logits (B, V)."""
        if any(not 1 <= len(row) <= self.context for row in rows):
            raise ValueError(
                f"each row needs 1 to {self.context} (context_length) tokens; crop from the left, "
                "and start an empty prompt with the end-of-text token"
            )
        self.rows = [list(row) for row in rows]
        self.length = max(len(row) for row in rows)
        padding = [self.length - len(row) for row in rows]
        ids = torch.tensor([[0] * pad + list(row) for pad, row in zip(padding, rows)], device=self.device)  # (B, T)
        self.cache.reset(torch.tensor(padding, device=self.device))
        return next_token_logits(self.model, ids, self.cache)

    def step(self, next_ids: torch.Tensor) -> torch.Tensor:
        """Append one id per row (B,) and return the logits (B, V) for the token after it."""
        for row, token in zip(self.rows, next_ids.tolist()):
            row.append(token)
        if self.length == self.context:
            return self.prefill([row[-self.keep :] for row in self.rows])
        self.length += 1
        return self.step_logits(self.model, next_ids[:, None], self.cache)  # (B, 1) in
