"""semiseg: semi-supervised semantic segmentation in one codebase.

``semiseg.train`` and ``semiseg.load_model`` (:mod:`semiseg.api`) are imported on first use, so
``import semiseg`` (and every ``semiseg`` command until it needs a network) stays free of torch.
"""

__version__ = "0.1.0"

__all__ = ["train", "load_model", "__version__"]


def __getattr__(name: str):
    if name in ("train", "load_model"):
        from semiseg import api

        return getattr(api, name)
    raise AttributeError(f"module 'semiseg' has no attribute {name!r}")
