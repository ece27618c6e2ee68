"""The method interface: one class per paper, one ``train_step`` per class.

The trainer (:mod:`semiseg.engine.trainer`) owns the loop, optimiser, schedule, precision,
distributed set-up, checkpoints, evaluation and logging. A method owns only what its paper
defines: which views of the data it needs, the losses of one step, and any state beside the
network (EMA teacher, memory banks). A method is an ``nn.Module`` so that all of that state is
in its ``state_dict`` and therefore in every checkpoint.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Optional

import torch
from torch import nn

from semiseg.config import Config, MethodConfig, register_method_config

METHODS: dict[str, type["Method"]] = {}


def register_method(name: str, config_class: type[MethodConfig] = MethodConfig):
    """Class decorator: make a method available as ``method.name: <name>``, its ``method``
    section validated by ``config_class`` (built-in methods' schemas live in
    :mod:`semiseg.config.methods`; registering one there again changes nothing)."""

    def wrap(cls):
        cls.name = name
        cls.config_class = config_class
        METHODS[name] = cls
        register_method_config(name, config_class)
        return cls

    return wrap


@dataclass
class Batch:
    """One training step's data, already on the device.

    ``labeled``: ``{"image": (B,3,H,W), "mask": (B,H,W)}``.
    ``unlabeled``: ``{"weak", "strong_1", "strong_2": (B,3,H,W), "ignore_mask": (B,H,W),
    "box_1", "box_2": (B,H,W)}`` (only the views the method asked for), or None.
    ``unlabeled_mix``: a second, independently drawn unlabelled batch of the same form, used as
    the CutMix partner by methods with ``needs_mix_batch``; None otherwise.
    """

    labeled: dict[str, Any]
    unlabeled: Optional[dict[str, Any]] = None
    unlabeled_mix: Optional[dict[str, Any]] = None


@dataclass
class StepContext:
    """What a method may know about where it is in training."""

    iteration: int  # 0-based index of this step
    total_iters: int
    lr: float
    autocast: Callable[[], Any] = nullcontext  # precision context for forward passes
    iters_per_epoch: int = 1


@dataclass
class StepResult:
    """``loss`` is back-propagated by the trainer; ``logs`` are scalars for the progress bar,
    ``metrics.jsonl`` and TensorBoard (each loss term, the mask ratio, ...)."""

    loss: torch.Tensor
    logs: dict[str, float] = field(default_factory=dict)


class Method(nn.Module):
    """Base class. Subclasses set the class attributes and implement :meth:`train_step`."""

    name: ClassVar[str] = "base"
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    uses_unlabeled: ClassVar[bool] = False  # the trainer builds an unlabelled loader
    num_strong_views: ClassVar[int] = 0  # strong views per unlabelled image (0, 1 or 2)
    strong_labeled: ClassVar[bool] = False  # photometric strong augmentation on labelled images
    unlabeled_masks: ClassVar[bool] = False  # the unlabelled crops carry their true masks (diagnostics)

    def __init__(self, cfg: Config, model: nn.Module, num_classes: int, ignore_index: int = 255):
        super().__init__()
        from semiseg.models.pretrained import resolve_normalization

        self.cfg = resolve_normalization(cfg)  # data.mean/std of the encoder's weights where unset
        self.mcfg = cfg.method
        self.model = model
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        from semiseg.methods.losses import build_supervised_loss

        self.criterion_l = build_supervised_loss(cfg.train, ignore_index)

    # --- what the trainer asks ----------------------------------------------------------
    @property
    def needs_mix_batch(self) -> bool:
        """Whether the trainer must draw a second unlabelled batch (``Batch.unlabeled_mix``)."""
        return False

    def train_step(self, batch: Batch, ctx: StepContext) -> StepResult:
        raise NotImplementedError

    @torch.no_grad()
    def after_step(self, ctx: StepContext) -> None:
        """Called after the optimiser step (EMA updates and the like)."""

    def take_init_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """``train.init_from``: the start run's network weights that the bare network lacks
        (parts a method attaches, such as AllSpark's ``neck.*``), offered once the method is
        built; a method takes the ones that are its own. The base takes none."""

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(encoder parameters, everything else trained by the optimiser)."""
        enc, head = self.model.param_groups()
        return list(enc), list(head)

    def eval_models(self) -> dict[str, nn.Module]:
        """The networks worth scoring, by name; the first is the default inference network."""
        return {"student": self.model}

    def model_name(self, which: str = "auto") -> str:
        """The name of the network ``which`` selects (``auto``: the first of :meth:`eval_models`),
        as recorded in exports, reports and ``eval --json``."""
        models = self.eval_models()
        if which == "auto":
            return next(iter(models))
        if which not in models:
            from semiseg.errors import ConfigError

            raise ConfigError(f"eval.model={which!r} but method {self.name!r} has only {', '.join(models)}")
        return which

    def inference_model(self, which: str = "auto") -> nn.Module:
        return self.eval_models()[self.model_name(which)]


def build_method(cfg: Config, model: nn.Module, num_classes: int, ignore_index: int = 255) -> Method:
    """The method ``method.name`` names (its module was imported with :mod:`semiseg.methods`)."""
    return METHODS[cfg.method.name](cfg, model, num_classes, ignore_index)
