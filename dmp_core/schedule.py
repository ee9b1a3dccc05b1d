"""Optimiser and learning-rate schedule for both training stages.

AdamW with no weight decay on biases, norms (every 1-d parameter), the ITC
temperature and mask tokens; per-step linear warmup from ``warmup_lr`` to
``lr`` over the warmup epochs, then cosine from ``lr`` down to ``min_lr``
reached exactly at the last step (METHOD.md section 7). The schedule is timm's
``CosineLRScheduler`` driven per optimiser step (``t_in_epochs=False``).
"""
from __future__ import annotations

from typing import Iterable

import torch
from timm.optim import param_groups_weight_decay
from timm.scheduler import CosineLRScheduler

from dmp_core.config import TrainParams

# parameters that never get weight decay whatever their shape: the ITC temperature
# (called ``temp`` in ALBEF, ``logit_scale`` in CLIP) and learned mask tokens
NO_DECAY_LEAVES = ("temperature", "temp", "log_temperature", "logit_scale")
NO_DECAY_PARTS = ("mask_token",)


def no_decay_names(named_params: Iterable[tuple[str, torch.nn.Parameter]]) -> set[str]:
    """Names of the trainable parameters excluded from weight decay: every 1-d
    parameter (biases, norm weights), the temperature and mask tokens."""
    names = set()
    for name, p in named_params:
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if (p.ndim <= 1 or leaf == "bias" or leaf in NO_DECAY_LEAVES
                or any(part in name for part in NO_DECAY_PARTS)):
            names.add(name)
    return names


def build_optimizer(module: torch.nn.Module, train: TrainParams) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; two groups: decayed and not decayed."""
    skip = no_decay_names(module.named_parameters())
    # timm splits by ndim/bias itself; the list adds the named exceptions (temperature, mask tokens)
    groups = param_groups_weight_decay(module, weight_decay=train.weight_decay, no_weight_decay_list=skip)
    groups = [g for g in groups if g["params"]]
    # the fused kernel is ~20x faster than the per-tensor loop on CPU (measured: 0.06 s vs 1.2 s
    # per step for the tiny preset's 5.7 M parameters)
    devices = {p.device.type for g in groups for p in g["params"]}
    fused = devices <= {"cpu", "cuda"}
    return torch.optim.AdamW(groups, lr=train.lr, betas=tuple(train.betas), weight_decay=train.weight_decay,
                             fused=fused or None)


def warmup_steps_for(train: TrainParams, total_steps: int) -> int:
    """Warmup length in optimiser steps: the share ``warmup_epochs / epochs`` of the run
    (= ``warmup_epochs`` epochs of steps, also when ``max_steps`` shortens the run);
    never the whole run."""
    warm = int(round(train.warmup_epochs / train.epochs * total_steps))
    return max(0, min(warm, total_steps - 1))


def build_scheduler(optimizer: torch.optim.Optimizer, train: TrainParams, *, total_steps: int) -> CosineLRScheduler:
    """Warmup then cosine to ``min_lr`` at step ``total_steps - 1``; call ``step_update(step)``
    before optimiser step ``step`` (0-based)."""
    warmup = warmup_steps_for(train, total_steps)
    cosine_steps = max(1, total_steps - 1 - warmup)
    return CosineLRScheduler(
        optimizer,
        t_initial=cosine_steps,
        lr_min=train.min_lr,
        warmup_t=warmup,
        warmup_lr_init=train.warmup_lr,
        warmup_prefix=True,  # the cosine spans the steps *after* warmup
        cycle_limit=1,
        t_in_epochs=False,
    )
