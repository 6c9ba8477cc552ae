"""Optimisers and schedules for encoder training: LARS, parameter groups, warm-up + cosine.

The CoKe recipe trains with LARS (You et al., "Large Batch Training of Convolutional Networks",
2017): SGD with momentum in which each weight tensor's step is rescaled by a *trust ratio*
``trust_coefficient * ||w|| / (||grad|| + weight_decay * ||w||)``, so every layer moves by a
similar fraction of its own norm whatever the batch size. Biases and BatchNorm parameters are
left out of both the weight decay and the rescaling, the usual convention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import nn

OPTIMIZERS = ("lars", "sgd", "adamw")


class LARS(torch.optim.Optimizer):
    """SGD with momentum and a layer-wise trust ratio.

    Per parameter ``w`` with gradient ``g``, in a group without ``lars_exclude``::

        u = g + weight_decay * w
        u = u * trust_coefficient * ||w|| / (||g|| + weight_decay * ||w|| + eps)   # if ||w||, ||g|| > 0
        buf = momentum * buf + u
        w = w - lr * buf

    A group with ``lars_exclude=True`` (see :func:`param_groups_for`) skips the first two lines:
    plain SGD with momentum, no decay.

    Parameters
    ----------
    params : parameters or parameter groups; groups may set any of the options below.
    lr : learning rate.
    momentum : momentum factor in [0, 1).
    weight_decay : L2 penalty, applied to non-excluded groups only.
    trust_coefficient : the LARS coefficient (often written eta).
    eps : added to the trust ratio's denominator.
    lars_exclude : default for groups that do not set it.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001, eps: float = 1e-8, lars_exclude: bool = False):
        if not lr >= 0.0:
            raise ValueError(f"LARS: lr must be >= 0, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"LARS: momentum must be in [0, 1), got {momentum}")
        if not weight_decay >= 0.0:
            raise ValueError(f"LARS: weight_decay must be >= 0, got {weight_decay}")
        if not trust_coefficient > 0.0:
            raise ValueError(f"LARS: trust_coefficient must be > 0, got {trust_coefficient}")
        if not eps >= 0.0:
            raise ValueError(f"LARS: eps must be >= 0, got {eps}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                        trust_coefficient=trust_coefficient, eps=eps, lars_exclude=lars_exclude)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = lars_update(p, p.grad, group)
                if group["momentum"] != 0.0:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = update.clone()
                    else:
                        state["momentum_buffer"].mul_(group["momentum"]).add_(update)
                    update = state["momentum_buffer"]
                p.add_(update, alpha=-group["lr"])
        return loss


def lars_update(param: torch.Tensor, grad: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
    """The LARS update direction of one parameter before momentum (a new tensor)."""
    if grad.is_sparse:
        raise RuntimeError("LARS does not support sparse gradients")
    if group["lars_exclude"]:
        return grad.clone()
    wd = group["weight_decay"]
    update = grad.add(param, alpha=wd) if wd != 0.0 else grad.clone()
    w_norm, g_norm = torch.linalg.vector_norm(param), torch.linalg.vector_norm(grad)
    ratio = group["trust_coefficient"] * w_norm / (g_norm + wd * w_norm + group["eps"])
    # A zero-norm weight (fresh zero init) or gradient has no scale to trust: keep the plain step.
    ratio = torch.where((w_norm > 0) & (g_norm > 0), ratio, torch.ones_like(ratio))
    return update.mul_(ratio)


def param_groups_for(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Split the trainable parameters of ``model`` into weights that are decayed (and, under LARS,
    adapted) and 1-D parameters (biases, normalisation scales and shifts) that are neither.

    Empty groups are left out; a parameter shared by several modules appears once.
    """
    if not weight_decay >= 0.0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    decayed, excluded = [], []
    for p in model.parameters():  # .parameters() already de-duplicates shared tensors
        if p.requires_grad:
            (excluded if p.ndim <= 1 else decayed).append(p)
    groups = [
        {"params": decayed, "weight_decay": weight_decay, "lars_exclude": False},
        {"params": excluded, "weight_decay": 0.0, "lars_exclude": True},
    ]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError(f"{type(model).__name__} has no trainable parameters")
    return groups


def build_optimizer(name: str, params: Iterable, lr: float, momentum: float,
                    weight_decay: float) -> torch.optim.Optimizer:
    """An optimiser by name: ``"lars"``, ``"sgd"`` or ``"adamw"``.

    ``weight_decay`` is the default for groups that do not set their own (the groups of
    :func:`param_groups_for` do). For AdamW, ``momentum`` is the first-moment decay ``beta1``.
    """
    key = name.lower()
    if key == "lars":
        return LARS(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if key == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if key == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=(momentum, 0.999), weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; expected one of {', '.join(OPTIMIZERS)}")


def scheduled_value(step: int, total_steps: int, base: float, *, warmup_steps: int = 0,
                    final: float = 0.0, start: float = 0.0) -> float:
    """A value (learning rate, weight decay, ...) at ``step``: linear from ``start`` at step 0
    to ``base`` at ``warmup_steps``, then a half cosine from ``base`` to ``final`` at
    ``total_steps``; ``final`` from there on.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step < warmup_steps:
        return start + (base - start) * step / warmup_steps
    span = total_steps - warmup_steps
    progress = min(1.0, (step - warmup_steps) / span) if span > 0 else 1.0
    return final + (base - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class Schedule:
    """The numbers of one :func:`scheduled_value` curve; ``schedule(step)`` evaluates it.

    Plain data, so ``dataclasses.asdict`` gives a JSON-ready record for checkpoints and logs.
    """

    total_steps: int
    base: float
    warmup_steps: int = 0
    final: float = 0.0
    start: float = 0.0

    def __post_init__(self):
        scheduled_value(0, self.total_steps, self.base, warmup_steps=self.warmup_steps)  # validates

    def __call__(self, step: int) -> float:
        return scheduled_value(step, self.total_steps, self.base, warmup_steps=self.warmup_steps,
                               final=self.final, start=self.start)
