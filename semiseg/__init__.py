"""semiseg: semi-supervised semantic segmentation in one codebase."""

__version__ = "0.1.0"
