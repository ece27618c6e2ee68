"""Python API: what the CLI runs, callable from a notebook or a script.

>>> import semiseg
>>> result = semiseg.train("configs/camvid.yaml", overrides=["train.iters=200"])
>>> model = semiseg.load_model(result.run_dir)
>>> mask = model.predict(Image.open("street.png"))     # (H, W) array of class indices
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from semiseg.config import Config, load_config
from semiseg.engine.trainer import TrainResult, Trainer


def train(config: Union[str, Path, dict, Config, None] = None, overrides=None, out: Optional[str | Path] = None,
          resume: bool = False, progress: bool = True) -> TrainResult:
    """Train as ``semiseg train`` does; returns the run directory and the final metrics.

    ``resume=True`` continues the run in ``out`` with its own saved config; ``config`` may then
    be None, and ``overrides`` (or ``config``) may change only the keys a resume allows
    (:data:`semiseg.engine.trainer.RESUMABLE_KEYS`)."""
    from semiseg.engine.trainer import resume_config

    if resume:
        if out is None:
            from semiseg.errors import SemisegError

            raise SemisegError("resume=True needs out=RUN_DIR (the run to continue)")
        requested = load_config(config, overrides) if config is not None else None
        cfg, _ = resume_config(out, requested=requested, overrides=overrides)
    else:
        cfg = load_config(config, overrides)
    name = Path(config).stem if isinstance(config, (str, Path)) else cfg.method.name
    return Trainer(cfg, out, resume=resume, progress=progress, config_name=name).fit()


def load_checkpoint_config(checkpoint: Union[str, Path], overrides=None):
    """(config, method state, meta) of a checkpoint file or run directory."""
    from semiseg.engine.checkpoint import load_weights

    state, meta = load_weights(checkpoint)
    if "config" not in meta:
        from semiseg.errors import CheckpointError

        raise CheckpointError(f"checkpoint {checkpoint} carries no config; it was not written by semiseg")
    from semiseg.models.pretrained import resolve_normalization

    cfg = resolve_normalization(load_config(meta["config"], overrides))
    return cfg, state, meta


def check_classes(cfg: Config, num_classes: int, checkpoint) -> None:
    """The dataset of ``cfg`` has the checkpoint's number of classes; else one line naming both."""
    from semiseg.data.datasets import dataset_info
    from semiseg.errors import CheckpointError

    info = dataset_info(cfg.data)
    if info.num_classes != num_classes:
        raise CheckpointError(f"checkpoint {checkpoint} predicts {num_classes} classes but the {info.name} dataset "
                              f"(data.dataset={cfg.data.dataset}) has {info.num_classes}: expected data with the "
                              "classes the network was trained on")


def inference_layout(method: torch.nn.Module, cfg: Config) -> torch.nn.Module:
    """The memory layout the run trained and evaluated in (``train.channels_last``), for
    ``eval``, ``predict`` and ``report``. Measured per image on the CPU (benchmarks/eval_speed.py,
    CamVid 240x180): EfficientNet-Lite0 1.2x faster channels-last, resnet18 equal at 4 images
    per pass (8% slower at 1)."""
    if cfg.train.channels_last:
        method.to(memory_format=torch.channels_last)
    return method


def build_method_from_checkpoint(checkpoint, overrides=None, device="cpu"):
    from semiseg.data.datasets import dataset_info
    from semiseg.errors import CheckpointError
    from semiseg.methods import build_method
    from semiseg.models import build_model

    cfg, state, meta = load_checkpoint_config(checkpoint, overrides)
    num_classes = int(meta.get("num_classes") or dataset_info(cfg.data).num_classes)
    # the checkpoint holds every weight: no pretrained encoder to read (or fetch) first
    bare = cfg.model_copy(update={"model": cfg.model.model_copy(update={"pretrained": False})})
    model = build_model(bare.model, num_classes)
    method = build_method(bare, model, num_classes)
    try:
        method.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {checkpoint} does not match its own config: "
                              f"{str(e).splitlines()[0]}") from None
    method.to(device).eval()
    return cfg, method, meta


class Predictor:
    """A trained network with the preprocessing of its run.

    ``predict(image)`` takes a PIL image or an ``(H, W, 3)`` uint8 array, applies the run's
    base resize (``data.resize``) and normalisation, predicts with the configured
    ``eval.mode`` (and test-time augmentation), resizes the logits back to the input size and
    returns an ``(H, W)`` array of class indices.
    """

    def __init__(self, cfg: Config, network: torch.nn.Module, class_names: list[str], palette=None,
                 device: str | torch.device = "cpu"):
        self.cfg = cfg
        self.network = network.eval()
        self.class_names = class_names
        self.num_classes = len(class_names)
        self.palette = palette
        self.device = torch.device(device)
        self.mean = torch.tensor(cfg.data.mean).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg.data.std).view(1, 3, 1, 1)

    def preprocess(self, image) -> torch.Tensor:
        if isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        image = image.convert("RGB")
        if self.cfg.data.resize:
            image = image.resize(tuple(self.cfg.data.resize), Image.BILINEAR)
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).unsqueeze(0)
        return (x - self.mean) / self.std

    @torch.inference_mode()
    def predict_logits(self, image) -> torch.Tensor:
        size = image.size if isinstance(image, Image.Image) else (image.shape[1], image.shape[0])
        if self.cfg.model.siamese:
            raise ValueError("this is a change-detection network: it takes an image pair, "
                             "predict_pair(image_a, image_b)")
        return self._logits(self.preprocess(image), size)

    def _logits(self, x: torch.Tensor, size) -> torch.Tensor:
        from semiseg.engine.evaluator import predict_logits

        x = x.to(self.device)
        crop = self.cfg.eval.crop_size or self.cfg.data.crop_size
        mode = self.cfg.eval.mode if self.cfg.eval.mode != "center_crop" else "original"
        eval_cfg = self.cfg.eval.model_copy(update={"mode": mode})
        logits = predict_logits(self.network, x, eval_cfg, self.num_classes, crop)
        if tuple(logits.shape[-2:]) != (size[1], size[0]):
            logits = F.interpolate(logits, size=(size[1], size[0]), mode="bilinear", align_corners=False)
        return logits[0].float().cpu()

    def predict(self, image) -> np.ndarray:
        from semiseg.engine.evaluator import class_map

        labels = class_map(self.predict_logits(image)[None])[0]
        return labels.numpy().astype(np.uint8 if self.num_classes <= 256 else np.int32)

    @torch.inference_mode()
    def predict_pair_logits(self, image_a, image_b) -> torch.Tensor:
        """Change detection: ``(2, H, W)`` logits (unchanged, changed) of the pair (A before, B
        after; PIL images or ``(H, W, 3)`` uint8 arrays of the same size), each image resized and
        normalised as in training, stacked on the channel axis."""
        images = [Image.fromarray(i) if isinstance(i, np.ndarray) else i for i in (image_a, image_b)]
        if images[0].size != images[1].size:
            from semiseg.errors import DataError

            raise DataError(f"the two images of a pair differ in size ({images[0].size[0]}x{images[0].size[1]} and "
                            f"{images[1].size[0]}x{images[1].size[1]}): expected two dates of one tile")
        return self._logits(torch.cat([self.preprocess(i) for i in images], 1), images[0].size)

    def predict_pair(self, image_a, image_b) -> np.ndarray:
        """Change detection: the ``(H, W)`` change map of a pair, 0 unchanged, 1 changed."""
        from semiseg.engine.evaluator import class_map

        return class_map(self.predict_pair_logits(image_a, image_b)[None])[0].numpy().astype(np.uint8)


def load_model(checkpoint: Union[str, Path], which: str = "auto", device: str = "cpu", overrides=None) -> Predictor:
    """A :class:`Predictor` from a checkpoint file or a run directory (its best checkpoint)."""
    from semiseg.data.datasets import dataset_info

    cfg, method, meta = build_method_from_checkpoint(checkpoint, overrides, device)
    inference_layout(method, cfg)
    names = meta.get("class_names")
    palette = None
    try:
        info = dataset_info(cfg.data)
        names = names or info.class_names
        palette = info.palette
    except Exception:  # the dataset need not exist where the model is used
        pass
    names = names or [f"class_{i}" for i in range(method.num_classes)]
    return Predictor(cfg, method.inference_model(which), names, palette, device)
