"""Optimiser and learning-rate schedule, as in the official UniMatch recipe.

SGD (momentum 0.9, weight decay 1e-4) or AdamW over two parameter groups: the encoder at
``lr`` and everything else at ``lr * head_lr_mult``. The poly schedule sets, at iteration ``i``
of ``T``, ``lr_i = lr * (1 - i / T) ** power`` (optionally after a linear warm-up), and the head
group follows with its multiplier.
"""

from __future__ import annotations

import torch


def build_optimizer(method, train_cfg) -> torch.optim.Optimizer:
    encoder_params, head_params = method.param_groups()
    groups = [
        {"params": [p for p in encoder_params if p.requires_grad], "lr": train_cfg.lr, "lr_mult": 1.0},
        {"params": [p for p in head_params if p.requires_grad], "lr": train_cfg.lr * train_cfg.head_lr_mult,
         "lr_mult": train_cfg.head_lr_mult},
    ]
    groups = [g for g in groups if g["params"]]
    if train_cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
    return torch.optim.SGD(groups, lr=train_cfg.lr, momentum=train_cfg.momentum,
                           weight_decay=train_cfg.weight_decay)


def poly_lr(base_lr: float, iteration: int, total_iters: int, power: float = 0.9, warmup_iters: int = 0) -> float:
    """Learning rate for 0-based ``iteration`` (0 past ``total_iters``, where a benchmark may run)."""
    if warmup_iters and iteration < warmup_iters:
        return base_lr * (iteration + 1) / warmup_iters
    return base_lr * max(0.0, 1.0 - iteration / total_iters) ** power


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)
