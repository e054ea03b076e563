"""Supervised fine-tuning of the student on teacher responses: the cold start's second half.

Loss: token-mean negative log-likelihood of the *response* tokens (prompt tokens are context
only, labels -100), EOS included so the student learns to stop. AdamW; linear warmup over
`warmup_ratio` of the steps, then cosine (or constant) to 0, the paper's recipe (1-2 epochs,
lr 1e-5, cosine, 5% warmup). Examples longer than `max_len` are refused up front with a count,
never cut silently: a cut response teaches the student to stop mid-thought.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from opd.client.configs.coldstart import SFTConfig


@dataclass
class Example:
    """prompt ids (context) + response ids (learned), one training sequence. An episode's
    response holds context too (tool results, user turns): `trained[i]` says whether
    response_ids[i] is learned (None: all of it)."""

    prompt_ids: list[int]
    response_ids: list[int]
    trained: list[bool] | None = None

    @property
    def n_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the base lr at optimizer step `step` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1 + math.cos(math.pi * progress))


def _batch(examples: list[Example], device: torch.device) -> tuple[torch.Tensor, ...]:
    """Right-padded ids, attention mask and labels (-100 on prompt, padding and untrained
    response positions)."""
    longest = max(e.n_tokens for e in examples)
    ids = torch.zeros((len(examples), longest), dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for b, e in enumerate(examples):
        seq = e.prompt_ids + e.response_ids
        ids[b, : len(seq)] = torch.tensor(seq)
        mask[b, : len(seq)] = 1
        response = torch.tensor(e.response_ids)
        if e.trained is not None:
            response = torch.where(torch.tensor(e.trained), response, -100)
        labels[b, len(e.prompt_ids) : len(seq)] = response
    return ids.to(device), mask.to(device), labels.to(device)


def _nll_sum(model: torch.nn.Module, examples: list[Example]) -> tuple[torch.Tensor, int]:
    """Summed NLL of the response tokens and their count."""
    device = next(model.parameters()).device
    ids, mask, labels = _batch(examples, device)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    target = labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100,
        reduction="sum",
    )  # fmt: skip
    return loss, int((target != -100).sum())


@torch.no_grad()
def response_nll(model: torch.nn.Module, examples: list[Example], batch_size: int = 8) -> float:
    """Mean NLL per response token: how well the student imitates the teacher's responses."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        loss, n = _nll_sum(model, examples[i : i + batch_size])
        total += float(loss)
        count += n
    model.train(was_training)
    return total / max(count, 1)


def check_lengths(examples: list[Example], max_len: int) -> None:
    too_long = [i for i, e in enumerate(examples) if e.n_tokens > max_len]
    if too_long:
        raise ValueError(
            f"{len(too_long)} example(s) exceed max_len={max_len} tokens (first: #{too_long[0]} "
            f"with {examples[too_long[0]].n_tokens}); raise --sft-max-len or lower the "
            "teacher's max_tokens"
        )


def sft(
    model: torch.nn.Module,
    examples: list[Example],
    config: SFTConfig,
    metrics_path: Path | None = None,
    on_step: Callable[[int, int, dict[str, float]], None] | None = None,
) -> list[dict[str, float]]:
    """Train in place; one metrics dict per optimizer step (also appended to metrics_path)."""
    if not examples:
        raise ValueError("no examples to fine-tune on (every response was filtered out?)")
    check_lengths(examples, config.max_len)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    steps_per_epoch = math.ceil(len(examples) / config.batch_size)
    total = steps_per_epoch * config.epochs
    warmup = math.ceil(config.warmup_ratio * total)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total, warmup, config.lr_schedule)
    )
    model.train()
    history: list[dict[str, float]] = []
    fh = open(metrics_path, "w") if metrics_path else None  # noqa: SIM115
    step = 0
    try:
        for epoch in range(config.epochs):
            order = rng.permutation(len(examples))
            for i in range(0, len(order), config.batch_size):
                started = time.perf_counter()
                batch = [examples[j] for j in order[i : i + config.batch_size]]
                optimizer.zero_grad(set_to_none=True)
                loss_sum, n_tokens = _nll_sum(model, batch)
                (loss_sum / n_tokens).backward()
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                lr = scheduler.get_last_lr()[0]
                optimizer.step()
                scheduler.step()
                step += 1
                metrics = {
                    "step": step,
                    "sft/loss": float(loss_sum.detach()) / n_tokens,
                    "sft/lr": lr,
                    "sft/grad_norm": float(norm),
                    "sft/epoch": epoch,
                    "sft/tokens": n_tokens,
                    "time/step_s": time.perf_counter() - started,
                }
                history.append(metrics)
                if fh:
                    fh.write(json.dumps(metrics) + "\n")
                    fh.flush()
                if on_step:
                    on_step(step, total, metrics)
    finally:
        if fh:
            fh.close()
    model.eval()
    return history
