"""The evaluation a training run makes on schedule: every network the method offers scored on the
validation set, logged together, and the one number that picks the best checkpoint.

:func:`semiseg.engine.evaluator.evaluate` scores one network; :class:`Validation` is what the
training loop calls after each ``train.eval_every`` iterations.
"""

from __future__ import annotations

from typing import Callable, Optional

from semiseg.engine.evaluator import EvaluationInterrupted, evaluate


class Validation:
    """Scores the networks of :meth:`Method.eval_models` on ``val_set`` with the run's ``eval``
    config; ``note_skipped`` receives the messages of files the validation set could not use."""

    def __init__(self, cfg, val_set, info, device, autocast, note_skipped: Callable[[list], None]):
        self.cfg = cfg
        self.val_set = val_set
        self.num_classes = info.num_classes
        self.ignore_index = info.ignore_index
        self.device = device
        self.autocast = autocast
        self.note_skipped = note_skipped
        self.running = False  # left True when an error escapes: the checkpoint then asks for this evaluation

    def run(self, method, it: int, logger, should_stop: Callable[[], bool],
            progress: Optional[Callable[[str], Callable[[int, int], None]]] = None) -> Optional[dict]:
        """``{network: results}`` after iteration ``it``, logged as one ``eval`` row per network;
        None, with nothing logged, when ``should_stop`` cut it short. ``progress(name)`` gives
        the per-image callback for network ``name``."""
        results = {}
        crop = self.cfg.eval.crop_size or self.cfg.data.crop_size
        self.running = True
        try:
            for name, net in method.eval_models().items():
                res = evaluate(net, self.val_set, self.cfg.eval, self.num_classes, ignore_index=self.ignore_index,
                               device=self.device, crop_size=crop, progress=progress(name) if progress else False,
                               autocast=self.autocast, num_workers=self.cfg.data.workers, should_stop=should_stop)
                self.note_skipped(res.get("skipped", []))
                results[name] = res
        except EvaluationInterrupted:
            self.running = False
            return None
        self.running = False
        for name, res in results.items():  # logged together: an interrupted evaluation leaves no rows
            logger.log(eval_row(it, name, res))
        return results

    def score(self, results: dict) -> float:
        """The number the best checkpoint is chosen by, from the network ``eval.model`` names
        ("auto": the first): mIoU; the mean Dice for volumes (acdc); the changed class's IoU for
        change detection (official UniMatch's remote-sensing choice). A NaN (no changed pixel
        anywhere yet) is -inf: it never counts as an improvement."""
        chosen = results.get(self.cfg.eval.model, next(iter(results.values())))
        score = chosen.get("mDice", chosen.get("changed_iou", chosen["mIoU"]))
        return float("-inf") if score != score else score


def eval_row(it: int, name: str, res: dict) -> dict:
    """The ``metrics.jsonl`` row of network ``name``'s results after iteration ``it``."""
    row = {"iter": it, "type": "eval", "model": name, "mIoU": res["mIoU"], "pixel_acc": res["pixel_acc"],
           "per_class_iou": res["per_class_iou"]}
    if "mDice" in res:  # volumes (acdc): the paper's score
        row.update(mDice=res["mDice"], per_class_dice=res["per_class_dice"])
    if "changed_iou" in res:  # image pairs (change detection): the paper's scores
        row.update({k: res[k] for k in ("changed_iou", "unchanged_iou", "f1", "precision", "recall", "overall_acc")})
    return row


def summary(it: int, results: dict) -> str:
    """One line for the console: each network's scores after iteration ``it``."""
    return f"iter {it}: " + ", ".join(
        f"{n} mIoU {r['mIoU']:.2f}" + (f" mDice {r['mDice']:.2f}" if "mDice" in r else "")
        + (f" changed IoU {r['changed_iou']:.2f} F1 {r['f1']:.2f}" if "changed_iou" in r else "")
        for n, r in results.items())
