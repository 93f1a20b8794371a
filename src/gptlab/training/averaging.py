"""An exponential moving average of the weights (--ema-decay): what a run evaluates and saves, while the
optimizer goes on moving the weights themselves.

Late in a run the weights jitter around a minimum from step to step; their running average sits nearer to
it. On the embedded corpus an average with decay 0.99 scored 1.5885 bits/byte where the weights it was
taken from scored 1.5961 (README, time to quality). The average starts at the initial weights and at step
t uses min(decay, (1 + t) / (10 + t)), so the random start fades within the first steps (TensorFlow's
ExponentialMovingAverage with num_updates).

A checkpoint's model files hold the average, so `gptlab eval`, `generate` and the export read the weights
the run reported; TRAINING_WEIGHTS_FILE holds the weights the optimizer moves, for an exact resume.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .callbacks import Callback
from .runtime import TrainingError

TRAINING_WEIGHTS_FILE = "training_weights.safetensors"


class WeightAverage(Callback):
    """A running average of a model's trainable parameters, folded in after each step."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.named = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
        self.average = [param.detach().clone() for _, param in self.named]
        self.swapped = False

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold in the weights after optimizer step `step` (1 after the first)."""
        decay = min(self.decay, (1 + step) / (10 + step))
        for average, (_, param) in zip(self.average, self.named):
            average.lerp_(param, 1 - decay)

    def step_end(self, trainer, stats) -> None:
        self.update(trainer.state.step)

    @torch.no_grad()
    def _swap(self) -> None:
        for average, (_, param) in zip(self.average, self.named):
            weights = param.detach().clone()
            param.copy_(average)
            average.copy_(weights)
        self.swapped = not self.swapped

    @contextmanager
    def in_model(self):
        """The average in the model's parameters (to evaluate and save it), the weights back afterwards."""
        self._swap()
        try:
            yield
        finally:
            self._swap()

    def training_weights(self) -> dict[str, torch.Tensor]:
        """The weights the optimizer moves, by parameter name, wherever they are at the moment."""
        tensors = self.average if self.swapped else [param for _, param in self.named]
        return {name: tensor.detach().cpu().contiguous() for (name, _), tensor in zip(self.named, tensors)}

    def save(self, folder: Path) -> None:
        save_file(self.training_weights(), str(folder / TRAINING_WEIGHTS_FILE))

    @torch.no_grad()
    def resume(self, folder: Path) -> None:
        """Continue a run from its checkpoint: the model holds the checkpoint's model files, which are the
        average; this takes them as the average and puts the saved training weights in the model."""
        path = folder / TRAINING_WEIGHTS_FILE
        if not path.is_file():
            raise TrainingError(
                f"{folder} has no {TRAINING_WEIGHTS_FILE}, which a run with --ema-decay saves; "
                "the checkpoint is incomplete, resume from a complete one"
            )
        tensors = load_file(str(path))
        for average, (name, param) in zip(self.average, self.named):
            average.copy_(param)
            param.copy_(tensors[name])
