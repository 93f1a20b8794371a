"""The optimizers `gptlab train --optimizer` offers: AdamW, or Muon for the blocks' matrices with AdamW for
everything else (embeddings, head, biases, norms), as modded-nanogpt trains.

Muon orthogonalises each matrix's momentum (five Newton-Schulz steps) before applying it, so every direction
of the update moves at the same rate. torch.optim.Muon is 2-D only and meant for hidden layers; with
adjust_lr_fn="match_rms_adamw" its updates have AdamW's RMS, so one learning rate and one schedule drive both.

torch's Muon orthogonalises one matrix at a time. The blocks repeat the same few shapes, and on a CPU a
small product costs mostly its call: BatchedMuon runs the same arithmetic over each shape's matrices as
one batched product (the char model's 16 matrices in 3 calls instead of 16; README, time to quality).
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch

from ..torch_compat import muon_class, muon_init_group
from .config import TrainConfig

MUON_MOMENTUM = 0.95  # modded-nanogpt's and torch's default


def is_hidden_matrix(name: str, param: torch.nn.Parameter) -> bool:
    """A linear layer's weight inside a transformer block (attention and feed-forward): what Muon trains.
    LoRA's adapters (lora_A, lora_B) are not among them."""
    return param.dim() == 2 and name.startswith("trf_blocks.") and name.endswith(".weight")


def adamw(
    params: list[torch.nn.Parameter], lr: float, betas: tuple[float, float], weight_decay: float
) -> torch.optim.AdamW:
    """Weight decay only on matrices (linear weights, embeddings), not on biases or norms."""
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = all(p.device.type in ("cpu", "cuda") for p in params)  # one kernel per step instead of a dozen
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas, fused=fused)


def orthogonalise(
    matrices: list[torch.Tensor], coefficients: tuple[float, float, float], steps: int, eps: float
) -> list[torch.Tensor]:
    """Newton-Schulz orthogonalisation as torch.optim.Muon computes it (bfloat16, on the matrix's wide
    orientation, after dividing by the Frobenius norm so the spectral norm is at most 1), for all matrices
    of one shape at once."""
    a, b, c = coefficients
    tall = [m.size(0) > m.size(1) for m in matrices]
    wide = [m.mT if transpose else m for m, transpose in zip(matrices, tall)]  # each (short, long)
    by_shape: dict[torch.Size, list[int]] = defaultdict(list)
    for index, matrix in enumerate(wide):
        by_shape[matrix.shape].append(index)
    result: dict[int, torch.Tensor] = {}
    for indices in by_shape.values():
        x = torch.stack([wide[i] for i in indices]).bfloat16()  # (N, short, long)
        x = x / x.flatten(1).norm(dim=1).clamp(min=eps)[:, None, None]
        for _ in range(steps):
            gram = x @ x.mT  # (N, short, short)
            x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
        for i, orthogonal in zip(indices, x):
            result[i] = orthogonal.mT if tall[i] else orthogonal
    return [result[i] for i in range(len(matrices))]


class BatchedMuon(muon_class()):
    """torch.optim.Muon with adjust_lr_fn="match_rms_adamw" (same state, same updates), its Newton-Schulz
    steps batched over matrices of equal shape."""

    def __init__(self, params: list[torch.nn.Parameter], lr: float, weight_decay: float, momentum: float):
        super().__init__(params, lr=lr, weight_decay=weight_decay, momentum=momentum, adjust_lr_fn="match_rms_adamw")

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            params, grads, buffers = [], [], []
            muon_init_group(self, group, params, grads, buffers)
            momentum, lr = group["momentum"], group["lr"]
            updates = []
            for grad, buffer in zip(grads, buffers):
                buffer.lerp_(grad, 1 - momentum)
                updates.append(grad.lerp(buffer, momentum) if group["nesterov"] else buffer)
            updates = orthogonalise(updates, group["ns_coefficients"], group["ns_steps"], group["eps"])
            for param, update in zip(params, updates):
                param.mul_(1 - lr * group["weight_decay"])
                param.add_(update, alpha=-lr * 0.2 * math.sqrt(max(param.shape)))  # AdamW's update RMS


class MuonWithAdamW:
    """Two optimizers stepped as one: param_groups, state, step, zero_grad and state_dict span both, so the
    training loop's schedule and the checkpoint code see a single optimizer. State indices run over Muon's
    parameters first, then AdamW's, as param_groups lists them."""

    def __init__(self, muon: torch.optim.Muon, adamw: torch.optim.AdamW):
        self.parts = (muon, adamw)

    @property
    def param_groups(self) -> list[dict]:
        return [group for part in self.parts for group in part.param_groups]

    @property
    def state(self) -> dict:
        return {param: state for part in self.parts for param, state in part.state.items()}

    def step(self) -> None:
        for part in self.parts:
            part.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts:
            part.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        state, groups, offset = {}, [], 0
        for part in self.parts:
            document = part.state_dict()
            state.update({index + offset: value for index, value in document["state"].items()})
            groups += [
                {**group, "params": [index + offset for index in group["params"]]} for group in document["param_groups"]
            ]
            offset += sum(len(group["params"]) for group in part.param_groups)
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, document: dict) -> None:
        groups, offset = iter(document["param_groups"]), 0
        for part in self.parts:
            count = sum(len(group["params"]) for group in part.param_groups)
            own = [next(groups) for _ in part.param_groups]
            part.load_state_dict(
                {
                    "state": {
                        index - offset: value
                        for index, value in document["state"].items()
                        if offset <= index < offset + count
                    },
                    "param_groups": [
                        {**group, "params": [index - offset for index in group["params"]]} for group in own
                    ],
                }
            )
            offset += count


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer | MuonWithAdamW:
    """cfg.optimizer (one of OPTIMIZERS) over the model's trainable parameters."""
    lr, betas, weight_decay = cfg.lr, (cfg.beta1, cfg.beta2), cfg.weight_decay
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if cfg.optimizer == "adamw":
        return adamw([p for _, p in named], lr, betas, weight_decay)
    hidden = [p for n, p in named if is_hidden_matrix(n, p)]
    if not hidden:  # e.g. LoRA adapters or a classification head alone: nothing for Muon to train
        return adamw([p for _, p in named], lr, betas, weight_decay)
    muon = BatchedMuon(hidden, lr=lr, weight_decay=weight_decay, momentum=MUON_MOMENTUM)
    rest = [p for n, p in named if not is_hidden_matrix(n, p)]
    return MuonWithAdamW(muon, adamw(rest, lr, betas, weight_decay))
