"""Supervised baseline: the labelled images alone, with the loss from ``train.loss``."""

from __future__ import annotations

from semiseg.methods.base import Batch, Method, StepContext, StepResult, register_method


@register_method("supervised")
class Supervised(Method):
    def train_step(self, batch: Batch, ctx: StepContext) -> StepResult:
        image, mask = batch.labeled["image"], batch.labeled["mask"]
        with ctx.autocast():
            logits = self.model(image)
        loss = self.criterion_l(logits.float(), mask)
        return StepResult(loss, {"loss_x": loss.detach()})
