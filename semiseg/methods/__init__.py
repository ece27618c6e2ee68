"""Training methods, one file each; importing this package registers them by name."""

from semiseg.methods.base import METHODS, Batch, Method, StepContext, StepResult, build_method, register_method
from semiseg.methods import supervised  # noqa: F401
from semiseg.methods import fixmatch, meanteacher, unimatch, unimatch_v2  # noqa: F401
from semiseg.methods import allspark  # noqa: F401
from semiseg.methods import pct  # noqa: F401
from semiseg.methods import contrastive_memory  # noqa: F401

__all__ = ["METHODS", "Batch", "Method", "StepContext", "StepResult", "build_method", "register_method"]
