"""An exponential-moving-average (EMA) teacher: the "mean teacher" of Tarvainen & Valpola (2017).

After every optimiser step the teacher's weights move towards the student's::

    teacher = momentum * teacher + (1 - momentum) * student

The usual momentum schedule (Tarvainen & Valpola's ``update_ema_variables``, kept by UniMatch V2's
``fixmatch.py`` / ``unimatch_v2.py``) is :func:`ema_momentum`: ``min(1 - 1/(iteration + 1), m)``,
so the teacher is a plain running average of the student early on (momentum 0 at the first step:
the teacher becomes a copy of the student) and an EMA with momentum ``m`` afterwards. Methods with
another schedule (e.g. a cosine one) compute their own momentum and call
:meth:`EMATeacher.update_with_momentum`.

Buffers: floating-point buffers (BatchNorm running mean and variance) are averaged like the
parameters; integer buffers (``num_batches_tracked``) are copied from the student. UniMatch V2
averages every buffer alike, which on an integer buffer only produces a truncated, meaningless
count; copying is the faithful reading of intent.

Values of ``m`` in the reference code: UniMatch V2 0.996 (FixMatch / UniMatch V2 with an EMA
teacher); French et al.'s CutMix-Seg mean teacher and U2PL 0.99; Tarvainen & Valpola 0.99 during
ramp-up then 0.999 (CIFAR-10), 0.9997 (ImageNet). The methods' config defaults cite their source.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def ema_momentum(iteration: int, max_momentum: float) -> float:
    """``min(1 - 1/(iteration + 1), max_momentum)`` for the 0-based ``iteration`` just finished."""
    return min(1.0 - 1.0 / (iteration + 1), max_momentum)


class EMATeacher(nn.Module):
    """A frozen copy of the student, always in eval mode, updated by EMA.

    ``teacher(x)`` runs the averaged network (call it under ``torch.no_grad()``); ``module`` is
    that network itself, an object of the student's class (what evaluation scores). Being a
    submodule of the method, the teacher is saved in and restored from every checkpoint.
    """

    def __init__(self, student: nn.Module):
        super().__init__()
        self.module = copy.deepcopy(student)
        self.module.requires_grad_(False)
        self.module.eval()

    def train(self, mode: bool = True) -> "EMATeacher":
        """Stay in eval mode whatever is asked: BatchNorm uses the averaged running statistics and
        dropout is off, as for UniMatch V2's ``model_ema.eval()``."""
        return super().train(False)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @torch.no_grad()
    def update(self, student: nn.Module, iteration: int, momentum: float) -> float:
        """EMA step after optimiser step ``iteration`` (0-based) with momentum
        ``ema_momentum(iteration, momentum)``; returns the momentum used."""
        m = ema_momentum(iteration, momentum)
        self.update_with_momentum(student, m)
        return m

    @torch.no_grad()
    def update_with_momentum(self, student: nn.Module, momentum: float) -> None:
        """``teacher = momentum * teacher + (1 - momentum) * student`` for parameters and
        floating-point buffers; other buffers are copied."""
        teacher_params = dict(self.module.named_parameters())
        pairs = [(teacher_params[name], p.detach()) for name, p in student.named_parameters()]
        teacher_buffers = dict(self.module.named_buffers())
        for name, b in student.named_buffers():
            t = teacher_buffers[name]
            if t.is_floating_point():
                pairs.append((t, b.detach()))
            else:
                t.copy_(b)
        if not pairs:
            return
        targets, sources = zip(*pairs)
        # One fused kernel per operation instead of one per tensor (hundreds for a ResNet-101).
        torch._foreach_mul_(list(targets), momentum)
        torch._foreach_add_(list(targets), list(sources), alpha=1.0 - momentum)
