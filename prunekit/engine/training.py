"""The training loop of healing and mask learning: AdamW over the chosen parameters, a
learning-rate schedule, a progress bar with loss and tokens/s, checkpoints every
`save_every` steps, resume from the last checkpoint, and a checkpoint on Ctrl-C.

A checkpoint holds the trainable parameters, the optimiser and schedule states, torch's
RNG state and the losses so far, so a resumed run ends with the same weights as an
uninterrupted one (the batches are a function of the step).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from prunekit.errors import PrunekitError, choice_error
from prunekit.progress import progress as tqdm

SCHEDULES = ("cosine", "linear", "constant")
CHECKPOINT_FILE = "checkpoint.pt"


class HealInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; the message says where the checkpoint is."""


@dataclass
class TrainSettings:
    steps: int = 200
    lr: float = 1e-4
    schedule: str = "cosine"  # after warmup: cosine | linear (to 0) | constant
    warmup: int = 0  # steps of linear warm-up from 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max gradient norm (0: none)
    save_every: int = 50  # checkpoint period in steps (0: only on Ctrl-C)

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise choice_error("schedule", self.schedule, SCHEDULES)
        if self.steps < 1 or self.lr <= 0 or self.warmup < 0 or self.save_every < 0:
            raise PrunekitError("steps must be >= 1, lr > 0, warmup and save_every >= 0")

    def factor(self, step: int) -> float:
        """Learning-rate multiplier at `step` (0-based)."""
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = (step - self.warmup) / max(self.steps - self.warmup, 1)
        if self.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress if self.schedule == "linear" else 1.0


def _save(path: Path, state: dict) -> None:
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / f".{CHECKPOINT_FILE}.tmp-{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path / CHECKPOINT_FILE)


def train(
    params: dict[str, nn.Parameter],
    loss_fn: Callable[[int], torch.Tensor],
    settings: TrainSettings,
    tokens_per_step: int,
    checkpoint: Path | None = None,
    fingerprint: dict | None = None,
    after_step: Callable[[], None] | None = None,
    lrs: dict[str, float] | None = None,
    extra: tuple[Callable[[], dict], Callable[[dict], None]] | None = None,
    desc: str = "heal",
) -> dict:
    """Run steps `0..steps-1` of `loss_fn(step)` (a scalar to minimise) over `params`,
    resuming from `checkpoint/checkpoint.pt` when it exists and its `fingerprint` (the
    run's settings) matches. `lrs` gives some parameters their own peak learning rate
    (default `settings.lr`). `extra` = (state, restore) saves and restores the caller's
    own state (e.g. a data mixture) with each checkpoint; `desc` labels the progress bar.
    Returns losses per step, seconds and the step resumed from."""
    groups: dict[float, list[nn.Parameter]] = {}
    for name, param in params.items():
        param.requires_grad_(True)
        groups.setdefault((lrs or {}).get(name, settings.lr), []).append(param)
    optimizer = torch.optim.AdamW(
        [{"params": group, "lr": lr} for lr, group in groups.items()],
        lr=settings.lr,
        weight_decay=settings.weight_decay,
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, settings.factor)
    fingerprint = {**(fingerprint or {}), "settings": asdict(settings)}
    start, losses = 0, []
    file = checkpoint / CHECKPOINT_FILE if checkpoint is not None else None
    if file is not None and file.exists():
        state = torch.load(file, weights_only=False)
        if state["fingerprint"] != fingerprint:
            raise PrunekitError(
                f"{checkpoint} holds a checkpoint of a different heal run; "
                "delete it or run the same command as before"
            )
        with torch.no_grad():
            for name, value in state["params"].items():
                params[name].copy_(value)
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        start, losses = state["step"], state["losses"]
        if extra is not None:
            extra[1](state["extra"])

    # RNG and the caller's state as of the last finished step (a step interrupted midway
    # may already have changed them)
    settled = {"extra": extra[0]() if extra is not None else None, "rng": torch.get_rng_state()}

    def snapshot(step: int) -> None:
        if checkpoint is not None:
            _save(
                checkpoint,
                {
                    "step": step,
                    "params": {n: p.detach().clone() for n, p in params.items()},
                    "optimizer": optimizer.state_dict(),
                    "scheduler": schedule.state_dict(),
                    "rng": settled["rng"],
                    "losses": losses,
                    "fingerprint": fingerprint,
                    "extra": settled["extra"],
                },
            )

    began = time.perf_counter()
    bar = tqdm(total=settings.steps, initial=start, desc=desc, leave=False)
    step = start
    try:
        for step in range(start, settings.steps):
            tick = time.perf_counter()
            loss = loss_fn(step)
            loss.backward()
            if settings.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(list(params.values()), settings.grad_clip)
            optimizer.step()
            schedule.step()
            losses.append(float(loss.detach()))
            settled["rng"] = torch.get_rng_state()
            if extra is not None:
                settled["extra"] = extra[0]()
            optimizer.zero_grad(set_to_none=True)
            if after_step is not None:
                after_step()
            rate = tokens_per_step / max(time.perf_counter() - tick, 1e-9)
            bar.set_postfix(loss=f"{losses[-1]:.4f}", tok_s=f"{rate:.0f}")
            bar.update(1)
            if settings.save_every and (step + 1) % settings.save_every == 0:
                snapshot(step + 1)
    except KeyboardInterrupt as err:
        done = len(losses)
        snapshot(done)
        where = f"checkpoint at step {done} in {checkpoint}" if checkpoint else "no checkpoint"
        raise HealInterrupted(f"interrupted; {where}; run the same command to resume") from err
    finally:
        bar.close()
    return {
        "losses": losses,
        "seconds": time.perf_counter() - began,
        "resumed_from": start,
        "steps_run": settings.steps - start,
    }
