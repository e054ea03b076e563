"""Which sequence positions a loss reaches: the gradient at the student's final hidden states."""

from __future__ import annotations

import torch


def hidden_row_grad(trainer, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-row loss of `batch` through the trainer's student, and |d loss.sum() / d h|
    summed over the hidden size at every [B, L] position of the final hidden states the LM head
    reads (StudentModule._hidden: with shared prompts, assembled from two decoder calls): a
    row that did not reach the loss has exactly 0."""
    captured: dict[str, torch.Tensor] = {}
    student = trainer.student
    hidden = student._hidden

    def keep(*args):  # noqa: ANN002, ANN202
        out = hidden(*args)
        out.retain_grad()
        captured["h"] = out
        return out

    student._hidden = keep
    try:
        # recording: a batch fresh from collect() holds no student numbers (one-forward step)
        loss, _ = student("loss", batch, True)
        loss.sum().backward()
    finally:
        del student._hidden
    return loss.detach(), captured["h"].grad.abs().sum(-1)
