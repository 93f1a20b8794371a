"""The run's plan: its limits in steps, the learning-rate schedule, and how far along the run is."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config import TrainConfig
from .state import TrainerState


def learning_rate(cfg: TrainConfig, step: int, progress: float, warmup_steps: int | None = None) -> float:
    """Linear warmup over warmup_steps (default cfg's), then from lr to lr * min_lr_ratio as progress goes
    0 → 1: a cosine (cfg.schedule "cosine"), or lr held until 1 - cooldown_fraction and a line down ("wsd")."""
    warmup = cfg.warmup_steps if warmup_steps is None else warmup_steps
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    floor, progress = cfg.lr * cfg.min_lr_ratio, min(progress, 1.0)
    if cfg.schedule == "wsd":
        cooldown = max(0.0, progress - (1 - cfg.cooldown_fraction)) / cfg.cooldown_fraction
        return cfg.lr - (cfg.lr - floor) * cooldown
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class Plan:
    """The limits in force, and what they mean in steps when that is known before the run."""

    tokens_per_step: int
    epoch_tokens: int  # an epoch is as many tokens as the training split holds
    steps: int | None  # None when only a time budget limits the run
    warmup_steps: int

    @classmethod
    def of(cls, cfg: TrainConfig, tokens_per_step: int, epoch_tokens: int) -> "Plan":
        token_limits = [cfg.max_tokens, cfg.epochs * epoch_tokens if cfg.epochs else None]
        step_limits = [cfg.max_steps] + [math.ceil(t / tokens_per_step) for t in token_limits if t]
        steps = min((s for s in step_limits if s), default=None)
        # A warmup as long as the run would never reach the full rate: keep it to a tenth of the run.
        warmup = cfg.warmup_steps if steps is None or cfg.warmup_steps < steps else steps // 10
        return cls(tokens_per_step, epoch_tokens, steps, warmup)

    def epochs_at_end(self, state: TrainerState, progress: float) -> float:
        """The epochs the run will have seen when it stops: the tokens so far over the progress toward its
        nearest limit (for a time budget, an estimate from the speed so far); before any, the planned steps'."""
        if state.tokens_seen and progress > 0:
            return state.tokens_seen / self.epoch_tokens / progress
        return self.steps * self.tokens_per_step / self.epoch_tokens if self.steps else 0.0

    def describe(self, cfg: TrainConfig) -> list[str]:
        limits = []
        if cfg.max_steps:
            limits.append(f"{cfg.max_steps:,} steps")
        if cfg.max_tokens:
            limits.append(f"{cfg.max_tokens:,} tokens")
        if cfg.epochs:
            limits.append(
                f"{cfg.epochs:g} epoch{'s' * (cfg.epochs != 1)} ({cfg.epochs * self.epoch_tokens:,.0f} tokens)"
            )
        if cfg.time_budget:
            limits.append(f"{cfg.time_budget:g} s of training")
        length = f"{self.steps:,} steps of {self.tokens_per_step:,} tokens" if self.steps else "the time budget"
        stop = limits[0] if len(limits) == 1 else f"{' or '.join(limits)}, whichever comes first"
        lines = [
            f"stop after: {stop}",
            f"schedule: lr {cfg.lr:g}, linear warmup over {self.warmup_steps} steps, then "
            + (
                f"constant until the last {cfg.cooldown_fraction:.0%}, then a line"
                if cfg.schedule == "wsd"
                else "cosine"
            )
            + f" to {cfg.lr * cfg.min_lr_ratio:g} at the end of {length}",
        ]
        if cfg.ema_decay:
            lines.append(f"weights: evaluated and saved as their moving average (--ema-decay {cfg.ema_decay:g})")
        if cfg.time_budget:
            lines.append(
                "resume: the learning rate and dropout follow the clock toward the time budget, so a resumed "
                "run continues from the time spent but its steps are not an uninterrupted run's (a resume is "
                "exact under --max-steps, --max-tokens or --epochs alone)"
            )
        if self.warmup_steps != cfg.warmup_steps:
            lines.append(
                f"warning: --warmup-steps {cfg.warmup_steps} is longer than the run's {self.steps} steps; "
                f"warming up over {self.warmup_steps} instead"
            )
        return lines

    def progress(self, cfg: TrainConfig, state: TrainerState, elapsed: float) -> tuple[float, str]:
        """How far training is (1.0 = done) by whichever limit is closest, and which limit that is."""
        fractions = {
            "max_steps": state.step / cfg.max_steps if cfg.max_steps else 0.0,
            "max_tokens": state.tokens_seen / cfg.max_tokens if cfg.max_tokens else 0.0,
            "epochs": state.tokens_seen / (cfg.epochs * self.epoch_tokens) if cfg.epochs else 0.0,
            "time_budget": elapsed / cfg.time_budget if cfg.time_budget else 0.0,
        }
        limit = max(fractions, key=fractions.get)
        return fractions[limit], limit
