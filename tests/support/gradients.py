"""Which sequence positions a loss reaches: the gradient at the student's final hidden states."""

from __future__ import annotations

import torch


def hidden_row_grad(trainer, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-row loss of `batch` through the trainer's student, and |d loss.sum() / d h|
    summed over the hidden size at every [B, L] position of the final norm's output: a row
    that did not reach the loss has exactly 0."""
    captured: dict[str, torch.Tensor] = {}

    def keep(_module, _inputs, out: torch.Tensor) -> None:
        out.retain_grad()
        captured["h"] = out

    handle = trainer.model.get_decoder().norm.register_forward_hook(keep)
    try:
        # recording: a batch fresh from collect() holds no student numbers (one-forward step)
        loss, _ = trainer.student("loss", batch, True)
        loss.sum().backward()
    finally:
        handle.remove()
    return loss.detach(), captured["h"].grad.abs().sum(-1)
