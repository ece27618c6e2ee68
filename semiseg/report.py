"""``semiseg report RUN_DIR``: one self-contained HTML page about a training run.

``RUN_DIR/report.html`` holds, with every figure embedded as a base64 PNG (the same PNGs are
written beside it as ``report_*.png``):

* training curves from ``metrics.jsonl``: the loss terms, the mask ratio (methods with pseudo
  labels), the learning rate and the validation mIoU of every scored network;
* a fresh evaluation of the run's best checkpoint (``best.safetensors``, else the newest valid
  one) on the validation split: the per-class IoU table and the confusion-matrix heatmap
  (rows: ground truth, normalised per row);
* a grid of a few validation images: image, ground truth, prediction.

The page needs no network and no script. If the checkpoint or the dataset cannot be loaded the
page still has the curves and says why the rest is missing.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Optional

import numpy as np

from semiseg.errors import SemisegError

TIMING_KEYS = {"iter", "type", "lr", "sec_per_iter", "nonfinite_skips", "mask_ratio"}


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    _plt().close(fig)
    return buf.getvalue()


# ----------------------------------------------------------------------------- figures
def curves_figure(rows: list[dict]) -> Optional[bytes]:
    """2 x 2 panels: losses, mask ratio, learning rate, mIoU (None if there are no rows)."""
    train = [r for r in rows if r.get("type") == "train"]
    evals = [r for r in rows if r.get("type") == "eval"]
    if not train and not evals:
        return None
    plt = _plt()
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    ax = axes[0, 0]
    loss_keys = sorted({k for r in train for k in r if k.startswith("loss")})
    for k in loss_keys:
        pts = [(r["iter"], r[k]) for r in train if isinstance(r.get(k), (int, float))]
        if pts:
            ax.plot(*zip(*pts), label=k, lw=1.2)
    ax.set_title("losses")
    ax.set_xlabel("iteration")
    if loss_keys:
        ax.legend(fontsize=8)
    ax = axes[0, 1]
    pts = [(r["iter"], r["mask_ratio"]) for r in train if isinstance(r.get("mask_ratio"), (int, float))]
    if pts:
        ax.plot(*zip(*pts), color="tab:green")
        ax.set_ylim(-0.02, 1.02)
    else:
        ax.text(0.5, 0.5, "no mask ratio logged\n(method without pseudo labels)", ha="center", va="center",
                transform=ax.transAxes, color="gray")
    ax.set_title("mask ratio (confident pseudo-label pixels)")
    ax.set_xlabel("iteration")
    ax = axes[1, 0]
    pts = [(r["iter"], r["lr"]) for r in train if isinstance(r.get("lr"), (int, float))]
    if pts:
        ax.plot(*zip(*pts), color="tab:orange")
    ax.set_title("learning rate")
    ax.set_xlabel("iteration")
    ax = axes[1, 1]
    models = sorted({r.get("model") or "student" for r in evals})
    for m in models:
        pts = [(r["iter"], r["mIoU"]) for r in evals if (r.get("model") or "student") == m]
        ax.plot(*zip(*pts), marker="o", label=m)
    if models:
        ax.legend(fontsize=8)
    ax.set_title("validation mIoU (%)")
    ax.set_xlabel("iteration")
    for a in axes.flat:
        a.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def confusion_figure(confusion, class_names: list[str]) -> bytes:
    plt = _plt()
    cm = np.asarray(confusion, dtype=np.float64)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    k = len(cm)
    side = min(12, 3 + 0.45 * k)
    fig, ax = plt.subplots(figsize=(side + 1.5, side))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k))
    ax.set_yticks(range(k))
    ax.set_xticklabels(class_names, rotation=60, ha="right", fontsize=8)
    ax.set_yticklabels(class_names, fontsize=8)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    ax.set_title("confusion matrix (row-normalised)")
    if k <= 25:
        for i in range(k):
            for j in range(k):
                if norm[i, j] >= 0.005:
                    ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if norm[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return _png(fig)


def samples_figure(triples: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> bytes:
    """Rows of (image, ground truth colours, prediction colours), uint8 RGB arrays."""
    plt = _plt()
    n = len(triples)
    fig, axes = plt.subplots(n, 3, figsize=(9, 3 * n), squeeze=False)
    for i, row in enumerate(triples):
        for j, (arr, title) in enumerate(zip(row, ("image", "ground truth", "prediction"))):
            axes[i, j].imshow(arr, interpolation="nearest")
            axes[i, j].set_axis_off()
            if i == 0:
                axes[i, j].set_title(title)
    fig.tight_layout()
    return _png(fig)


# ----------------------------------------------------------------------------- evaluation
def sample_indices(count: int, total: int) -> list[int]:
    """``count`` indices spread evenly over ``range(total)``, first and last included: validation
    sets are often consecutive video frames, and neighbours look alike."""
    if count <= 0 or total <= 0:
        return []
    if count >= total:
        return list(range(total))
    if count == 1:
        return [0]
    return sorted({round(i * (total - 1) / (count - 1)) for i in range(count)})


def evaluate_best(run_dir: Path, num_images: int = 4, device: Optional[str] = None, threads=None,
                  progress: bool = False) -> dict:
    """Score the run's best checkpoint on its validation split; also a few prediction triples
    (images spread over the split). ``threads``: CPU threads (default: the run's train.threads)."""
    import torch

    from semiseg.api import build_method_from_checkpoint, check_classes, inference_layout
    from semiseg.data.build import build_eval_set
    from semiseg.engine.evaluator import class_map, evaluate, predict_logits
    from semiseg.engine.precision import set_threads
    from semiseg.viz import colorize

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg, method, meta = build_method_from_checkpoint(run_dir, None, device)
    check_classes(cfg, method.num_classes, run_dir)
    inference_layout(method, cfg)
    set_threads(threads or cfg.train.threads)
    names = list(meta.get("class_names") or [f"class_{i}" for i in range(method.num_classes)])
    dataset = build_eval_set(cfg, cfg.data.val_split)
    which = method.model_name(cfg.eval.model)
    net = method.inference_model(which)
    crop = cfg.eval.crop_size or cfg.data.crop_size
    res = evaluate(net, dataset, cfg.eval, method.num_classes, device=torch.device(device), crop_size=crop,
                   progress=progress, num_workers=cfg.data.workers,
                   desc=f"report: eval {which} on '{cfg.data.val_split}'")
    palette = None
    try:
        from semiseg.data.datasets import dataset_info

        palette = dataset_info(cfg.data).palette
    except SemisegError:
        pass
    mean = torch.tensor(cfg.data.mean).view(3, 1, 1)
    std = torch.tensor(cfg.data.std).view(3, 1, 1)
    triples = []
    net.eval()
    with torch.inference_mode():
        for i in sample_indices(num_images, len(dataset)):
            sample = dataset[i]
            if "image" not in sample:  # unreadable: skipped by the evaluation too
                continue
            if getattr(dataset, "volumetric", False):  # a volume (D, H, W): its middle slice, as scored
                from semiseg.engine.evaluator import predict_volume

                middle = sample["image"].shape[0] // 2
                pred = predict_volume(net, sample["image"].to(device), method.num_classes, crop)[middle].cpu().numpy()
                shown = sample["image"][middle][None].expand(3, -1, -1).clamp(0, 1)
                image = (shown * 255).byte().permute(1, 2, 0).numpy()
                triples.append((image, np.asarray(colorize(sample["mask"][middle].numpy(), palette, method.num_classes)),
                                np.asarray(colorize(pred, palette, method.num_classes))))
                continue
            x = sample["image"].unsqueeze(0).to(device)
            logits = predict_logits(net, x, cfg.eval, method.num_classes, crop)
            mask = sample["mask"].numpy()
            if logits.shape[-2:] != x.shape[-2:]:  # center_crop mode: show the scored window
                from semiseg.engine.evaluator import center_crop_box

                top, left, h, w = center_crop_box(x.shape[-2], x.shape[-1], crop)
                x, mask = x[..., top:top + h, left:left + w], mask[top:top + h, left:left + w]
            pred = class_map(logits)[0].cpu().numpy()
            shown = x[0].cpu()
            if cfg.model.siamese:  # a change-detection pair (A, B stacked): show B, the image after
                shown = shown[shown.shape[0] // 2:]
            image = ((shown * std + mean).clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
            gt = np.asarray(colorize(mask, palette, method.num_classes))
            pr = np.asarray(colorize(pred, palette, method.num_classes))
            triples.append((image, gt, pr))
    checkpoint = Path(run_dir) / "checkpoints" / "best.safetensors"
    return {"result": res, "names": names, "triples": triples, "iter": meta.get("iter"),
            "checkpoint": str(checkpoint if checkpoint.exists() else run_dir), "split": cfg.data.val_split,
            "images": len(dataset) - len(res.get("skipped", [])), "model": which,
            "method": meta.get("method", cfg.method.name)}


# ----------------------------------------------------------------------------- page
CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1100px;color:#222}
h1{font-size:22px} h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;font-size:13px} td,th{border:1px solid #ccc;padding:3px 10px;text-align:right}
th{background:#f3f3f3} td:first-child,th:first-child{text-align:left}
img{max-width:100%;border:1px solid #eee} .note{color:#a33} .meta{color:#555;font-size:13px}
.bar{display:inline-block;height:10px;background:#4a90d9;vertical-align:middle}
"""


def _img(name: str, data: bytes) -> str:
    b64 = base64.b64encode(data).decode("ascii")
    return f'<img alt="{html.escape(name)}" src="data:image/png;base64,{b64}">'


def _iou_table(names: list[str], ious: list[float], last: Optional[list[float]]) -> str:
    head = "<tr><th>class</th><th>IoU (%)</th><th></th>" + ("<th>last logged eval</th>" if last else "") + "</tr>"
    body = []
    for i, (n, v) in enumerate(zip(names, ious)):
        bar = f'<span class="bar" style="width:{max(0.0, min(100.0, v)) * 2:.0f}px"></span>'
        extra = f"<td>{last[i]:.2f}</td>" if last and i < len(last) else ("<td></td>" if last else "")
        body.append(f"<tr><td>{html.escape(str(n))}</td><td>{v:.2f}</td><td style='text-align:left'>{bar}</td>"
                    f"{extra}</tr>")
    return f"<table>{head}{''.join(body)}</table>"


def write_report(run_dir: str | Path, out: Optional[str | Path] = None, num_images: int = 4,
                 evaluate: bool = True, device: Optional[str] = None, threads=None, progress: bool = False) -> Path:
    """Write ``report.html`` (and the ``report_*.png`` figures) for ``run_dir``; returns its path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():  # checked before torch loads: the error comes at once
        raise SemisegError(f"report: run directory {run_dir} does not exist")
    not_a_run = SemisegError(f"report: {run_dir} is not a run directory (no metrics.jsonl, no checkpoints/)")
    if not (run_dir / "metrics.jsonl").is_file() and not (run_dir / "checkpoints").is_dir():
        raise not_a_run
    from semiseg.engine.logging import read_metrics

    rows = read_metrics(run_dir)
    if not rows and not (run_dir / "checkpoints").is_dir():
        raise not_a_run
    out = Path(out) if out else run_dir / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    figures: dict[str, bytes] = {}
    notes: list[str] = []

    curves = curves_figure(rows)
    if curves:
        figures["curves"] = curves
    else:
        notes.append("metrics.jsonl has no rows: no training curves.")

    ev = None
    if evaluate:
        try:
            ev = evaluate_best(run_dir, num_images, device, threads=threads, progress=progress)
        except SemisegError as e:
            notes.append(f"no fresh evaluation: {e}")
    if ev is not None:
        figures["confusion"] = confusion_figure(ev["result"]["confusion"], ev["names"])
        if ev["triples"]:
            figures["samples"] = samples_figure(ev["triples"])

    for name, data in figures.items():
        (out.parent / f"report_{name}.png").write_bytes(data)

    evals = [r for r in rows if r.get("type") == "eval"]
    train = [r for r in rows if r.get("type") == "train"]
    last_eval = evals[-1] if evals else None
    title = f"semiseg report: {run_dir.name}"
    from semiseg.engine.metrics import CHANGE_KEYS

    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    info = [f"run directory: {html.escape(str(run_dir.resolve()))}"]
    if train:
        info.append(f"trained iterations: {train[-1]['iter']}")
        skips = train[-1].get("nonfinite_skips")
        if skips:
            info.append(f"skipped non-finite steps: {skips}")
    if evals:
        best = max(evals, key=lambda r: r["mIoU"])
        info.append(f"best logged mIoU: {best['mIoU']:.2f} at iteration {best['iter']} ({best.get('model', '')})")
    parts.append("<p class='meta'>" + "<br>".join(info) + "</p>")
    for n in notes:
        parts.append(f"<p class='note'>{html.escape(n)}</p>")
    if "curves" in figures:
        parts.append("<h2>Training curves</h2>" + _img("training curves", figures["curves"]))
    if ev is not None:
        res = ev["result"]
        parts.append(f"<h2>Evaluation of the best checkpoint</h2><p class='meta'>{html.escape(ev['checkpoint'])} "
                     f"(iteration {ev['iter']}, method {html.escape(str(ev['method']))}, network "
                     f"{html.escape(str(ev['model']))}) on split '{html.escape(str(ev['split']))}' "
                     f"({ev['images']} {'volumes' if 'mDice' in res else 'images'}): <b>mIoU {res['mIoU']:.2f}</b>, pixel accuracy "
                     f"{res['pixel_acc']:.2f}</p>")
        if "mDice" in res:  # volumes (medical): the paper's 3D Dice, background excluded
            dice = [f"{html.escape(str(name))} {v:.2f}" for name, v in zip(ev["names"], res["per_class_dice"])
                    if v is not None]
            parts.append(f"<p class='meta'>3D Dice over {res.get('volumes', '?')} volumes: <b>mDice "
                         f"{res['mDice']:.2f}</b> ({', '.join(dice)})</p>")
        if "changed_iou" in res:  # change detection: the paper's scores
            parts.append("<p class='meta'>change detection: " + ", ".join(
                f"{label} {res[key]:.2f}" for label, key in CHANGE_KEYS) + "</p>")
        same_model = [r for r in evals if r.get("model") == (last_eval or {}).get("model")]
        last = same_model[-1]["per_class_iou"] if same_model else None
        parts.append("<h3>Per-class IoU</h3>" + _iou_table(ev["names"], res["per_class_iou"], last))
        parts.append("<h3>Confusion matrix</h3>" + _img("confusion matrix", figures["confusion"]))
        if "samples" in figures:
            parts.append("<h2>Validation images</h2>" + _img("validation samples", figures["samples"]))
    elif last_eval is not None:
        names = [f"class_{i}" for i in range(len(last_eval["per_class_iou"]))]
        parts.append(f"<h2>Per-class IoU (last logged evaluation, iteration {last_eval['iter']})</h2>"
                     + _iou_table(names, last_eval["per_class_iou"], None))
    parts.append("</body></html>")
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("\n".join(parts), encoding="utf-8")
    tmp.replace(out)
    return out
