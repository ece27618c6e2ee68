"""semiseg: semi-supervised semantic segmentation in one codebase."""

__version__ = "0.1.0"

from semiseg.api import load_model, train  # noqa: E402

__all__ = ["train", "load_model", "__version__"]
