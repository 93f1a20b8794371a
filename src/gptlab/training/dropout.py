"""Dropout that follows the passes over the text: off for the first epochs of a run, then on at the model's
own rates, or at twice them for a run that will pass over the text many times.

On a small corpus a short run underfits, and dropout only slows its learning; a long one makes many
passes over the same text and overfits, the more so the more passes it makes. Measured on the embedded
corpus with 128 BPE merges (README, time to quality): dropout 0.1 from the fourth pass on beat 0.2 by
0.04 bits/byte in a run of 12.5 passes, and 0.2 beat 0.1 by 0.05 in a run of 24.5. So when dropout
switches on, the run judges how many passes it will make by its end, from its progress toward its
nearest limit (exact for a step, token or epoch limit; for a time budget, from the speed so far), and
chooses the rate once. The decision is saved in the checkpoint, so a resumed run keeps it.

Dropout does not switch on in the last 30% of a run: a change with little of the schedule left hurts.
Doubled for the last 44 of 1,108 steps, the default model scored 1.669 bits/byte, against 1.626 for a run
that never doubled.
"""

from __future__ import annotations

import math

from torch import nn

from ..model import MultiHeadAttention
from .callbacks import Callback
from .config import ConfigError, TrainConfig

# The share of a run (by its nearest limit) after which dropout that is still off stays off.
LAST_SWITCH_PROGRESS = 0.7


class DropoutSwitch:
    """Every dropout of the model's own (nn.Dropout modules, the attention weights' rate), set to a multiple (0,
    1 or 2) of the rate each had when the switch was made. A dropout module whose class sets
    `follows_dropout_schedule = False` keeps its rate: a LoRA adapter's, which is a setting of the adapter."""

    def __init__(self, model: nn.Module):
        self.rates = [
            (module, "p", module.p)
            for module in model.modules()
            if isinstance(module, nn.Dropout) and getattr(module, "follows_dropout_schedule", True)
        ]
        self.rates += [
            (module, "drop_rate", module.drop_rate)
            for module in model.modules()
            if isinstance(module, MultiHeadAttention)
        ]
        self.scale = 1.0

    @property
    def any(self) -> bool:
        return any(rate for _, _, rate in self.rates)

    @property
    def highest(self) -> float:
        return max((rate for _, _, rate in self.rates), default=0.0)

    def set(self, scale: float) -> None:
        if scale != self.scale:
            for module, attribute, rate in self.rates:
                setattr(module, attribute, rate * scale)
            self.scale = scale


def dropout_scale(
    cfg: TrainConfig, epochs_seen: float, run_epochs: float, progress: float, current: float | None
) -> float:
    """The multiple of the model's dropout rates for a run's next step. `run_epochs`: the epochs the run
    will have seen at its end; `current`: the multiple in force (None at the start of a run, or after a
    resume from a checkpoint that did not record it)."""
    if current:  # once on, dropout keeps its rate
        return current
    if epochs_seen < cfg.dropout_from_epoch or (current == 0.0 and progress >= LAST_SWITCH_PROGRESS):
        return 0.0
    double_for = cfg.dropout_double_for_epochs
    return 2.0 if double_for is not None and run_epochs >= double_for else 1.0


def dropout_switch_note(switch: DropoutSwitch, scale: float, run_epochs: float) -> str:
    """What a run logs when its dropout switches on: the rates it chose, and why."""
    rates = sorted({rate * scale for _, _, rate in switch.rates if rate})
    why = f"twice the model's, for a run of about {run_epochs:.1f} epochs" if scale == 2 else "the model's"
    return f"dropout on at {', '.join(f'{rate:g}' for rate in rates)} ({why})"


def describe_dropout(cfg: TrainConfig, switch: DropoutSwitch, steps_per_epoch: float) -> str | None:
    """The log line that says when dropout switches on, or None where nothing changes. Refuses a doubling
    that would take a rate to 1 or past it (every value dropped)."""
    if not switch.any:
        return None
    double_for = cfg.dropout_double_for_epochs
    if double_for is not None and switch.highest >= 0.5:
        raise ConfigError(
            f"--dropout-double-for-epochs doubles the model's dropout rates, and {switch.highest:g} "
            "doubled drops every value; lower the rate below 0.5 or leave doubling off"
        )
    start = cfg.dropout_from_epoch
    parts = (
        [
            f"off for the first {start:g} epochs ({math.ceil(start * steps_per_epoch):,} steps), then on "
            f"unless the run is {LAST_SWITCH_PROGRESS:.0%} done"
        ]
        if start
        else []
    )
    if double_for is not None:
        parts.append(f"at twice the model's rates if the run will see {double_for:g} epochs or more")
    return f"dropout: {'; '.join(parts)}" if parts else None


class DropoutSchedule(Callback):
    """Before each step, the dropout multiple for it (dropout_scale), said when dropout switches on."""

    def __init__(self, switch: DropoutSwitch):
        self.switch = switch

    def step_start(self, trainer) -> None:
        state, plan, progress = trainer.state, trainer.plan, trainer.progress
        run_epochs = plan.epochs_at_end(state, progress)
        scale = dropout_scale(
            trainer.cfg, state.tokens_seen / plan.epoch_tokens, run_epochs, progress, state.dropout_scale
        )
        if scale and scale != state.dropout_scale and self.switch.any and trainer.runtime.is_main:
            trainer.say(f"step {state.step}: {dropout_switch_note(self.switch, scale, run_epochs)}")
        state.dropout_scale = scale
        self.switch.set(scale)
