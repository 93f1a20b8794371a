"""The KV cache: every layer's keys and values, preallocated for the whole context and written in place,
so that generation runs the prompt once (the "prefill") and then one new token per step.

One cache serves every decoder: `gptlab.generate` (rows left-padded to a common length), the compiled
CUDA-graph step (static shapes) and the server's continuous batching (rows of different lengths).

Row b of the cache holds length_b slots so far, the first padding_b of which hold no token. A step of
T new tokens writes slots length_b .. length_b + T - 1 of each row taking part (rows 0..active-1), and
`append` says, explicitly, what the model needs for it (model.CacheStep):
- positions (B, T): slot - padding_b, so a row's real tokens take positions 0, 1, 2, ...;
- mask (B, 1, T, L): key slot j is visible to the new token in slot i iff j <= i and j is not padding;
  a padding slot sees only itself, so that no softmax is over an empty set (which gives NaN). The mask
  is None when every key read is visible: one new token per row, rows of equal length, no padding.
The keys read are slots 0 .. max_b(length_b) + T - 1; a static cache reads all of them, so that a
compiled step has one shape, and keeps its next slot in a tensor (a Python number would be baked into
the graph). A slot is written before its row reads it, except where rows differ in length or the cache
is static: there the slots hidden by the mask are read too, and they start as zeros (masked out, a NaN
there would still make 0 · NaN = NaN).
"""

from __future__ import annotations

import torch

from ..config import GPTConfig
from ..model import CacheStep
from ..torch_compat import mark_static_address


class LayerCache:
    """One layer's key and value buffers (rows, H, L_max, D)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        self.keys = keys
        self.values = values

    def update(self, k: torch.Tensor, v: torch.Tensor, step: CacheStep) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the step's new keys and values (B, H, T, D); return every key and value it reads (B, H, L, D)."""
        rows, end, slots = step.where
        if end is None:  # static: (T,) slots, in place at fixed addresses; every slot is read
            self.keys.index_copy_(2, slots, k.to(self.keys.dtype))
            self.values.index_copy_(2, slots, v.to(self.values.dtype))
            return self.keys, self.values
        if isinstance(slots, slice):  # rows of equal length write the same slots
            self.keys[:rows, :, slots] = k
            self.values[:rows, :, slots] = v
        else:  # (B, T) slots of each row; index_put, unlike a slice, does not cast (a float32 cache for bfloat16)
            row = torch.arange(rows, device=k.device)[:, None]  # (B, 1)
            self.keys[row, :, slots] = k.transpose(1, 2).to(self.keys.dtype)  # (B, T, H, D) at (row, :, slot)
            self.values[row, :, slots] = v.transpose(1, 2).to(self.values.dtype)
        return self.keys[:rows, :, :end], self.values[:rows, :, :end]


class KVCache:
    """Keys and values of `rows` rows over the whole context (see the module docstring).

    static: fixed shapes and addresses for a compiled step. ragged: rows will hold different numbers
    of tokens (continuous batching), so the buffers start zeroed.
    """

    def __init__(
        self,
        cfg: GPTConfig,
        rows: int,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        *,
        static: bool = False,
        ragged: bool = False,
    ):
        self.capacity = cfg.context_length
        self.static, self.ragged = static, ragged
        shape = (rows, cfg.n_heads, cfg.context_length, cfg.head_dim)  # (rows, H, L_max, D)
        new = torch.zeros if static or ragged else torch.empty  # empty: a slot is written before it is read
        self.layers = [
            LayerCache(new(shape, dtype=dtype, device=device), new(shape, dtype=dtype, device=device))
            for _ in range(cfg.n_layers)
        ]
        self.slots = torch.arange(cfg.context_length, device=device)
        self.padding = torch.zeros(rows, dtype=torch.long, device=device)
        self.lengths = [0] * rows  # slots written in each row (not used by a static cache)
        self.next_slot = torch.zeros((), dtype=torch.long, device=device)  # a static cache's next slot
        self.active = rows  # rows 0..active-1 take part in each step
        self.padded = False
        if static:  # a CUDA graph then reads and writes these in place, rather than copying them at every step
            for tensor in (self.slots, self.padding, self.next_slot, *self.buffers()):
                mark_static_address(tensor)

    def buffers(self) -> list[torch.Tensor]:
        return [tensor for layer in self.layers for tensor in (layer.keys, layer.values)]

    def reset(self, padding: torch.Tensor | None = None) -> None:
        """Empty every row; the rows about to be written start with padding[b] padding slots (rows,)."""
        self.padding.copy_(torch.zeros_like(self.padding) if padding is None else padding)
        self.padded = padding is not None and bool(padding.any())
        self.lengths = [0] * len(self.lengths)
        self.next_slot.zero_()

    def append(self, num_tokens: int) -> CacheStep:
        """Claim the next num_tokens slots of every active row: their positions, mask and where they go."""
        rows = self.active
        padding = self.padding[:rows]
        if self.static:
            written = self.next_slot + self.slots[:num_tokens]  # (T,): the same slots in every row
            self.next_slot.add_(num_tokens)
            keys, end, where = self.slots, None, written
            needs_mask = True
        else:
            lengths = self.lengths[:rows]
            end = max(lengths) + num_tokens
            if end > self.capacity:
                raise ValueError(
                    f"the cache holds {self.capacity} tokens (the context) and {max(lengths)} are used; "
                    f"cannot add {num_tokens}: reset it and prefill the most recent tokens instead"
                )
            uniform = min(lengths) == max(lengths)
            if uniform:
                written, where = self.slots[lengths[0] : end], slice(lengths[0], end)  # (T,)
            else:
                starts = torch.tensor(lengths, device=self.slots.device)[:, None]  # (B, 1)
                written = where = starts + self.slots[:num_tokens]  # (B, T)
            self.lengths[:rows] = [length + num_tokens for length in lengths]
            keys = self.slots[:end]  # (L,)
            needs_mask = num_tokens > 1 or not uniform or self.padded
        query = written[..., None]  # (T, 1) or (B, T, 1)
        mask = None
        if needs_mask:
            visible = (keys >= padding[:, None, None]) | (keys == query)  # (B, T, L)
            mask = ((keys <= query) & visible)[:, None]  # (B, 1, T, L), broadcast over heads
        positions = (written - padding[:, None]).clamp(min=0)  # (B, T)
        return CacheStep(positions, mask, (rows, end, where))

    def store(self, row: int, source: KVCache, length: int) -> None:
        """Copy the first `length` slots of source's row 0 (a prompt prefilled on its own) into `row`."""
        self.copy_row(source, 0, row, length)
        self.padding[row] = source.padding[0]
        self.padded |= source.padded  # a padded row needs the mask at every step

    def move(self, source: int, target: int) -> None:
        """Copy row source into row target (which is free)."""
        self.copy_row(self, source, target, self.lengths[source])
        self.padding[target] = self.padding[source]

    def copy_row(self, cache: KVCache, source: int, target: int, length: int) -> None:
        assert self.ragged and not self.static, "rows of different lengths need KVCache(ragged=True)"
        for mine, theirs in zip(self.buffers(), cache.buffers()):
            mine[target, :, :length] = theirs[source, :, :length]
        self.lengths[target] = length
