"""One decoder pass for several sequences that start with the same tokens.

OPD samples n rollouts of every prompt, so a batch holds each prompt n times. Both sides run the
prompt through the decoder once instead: its KV cache is repeated n times and only the tails
(completions, episodes' turns) run after it. Same positions, same masks, so the same numbers
up to float summation order; the decoder work drops from n (P + C) to P + n C tokens.

- the teacher service (opd.server.backends.hf) under inference mode, for scoring;
- the student's loss pass (opd.client.train.student_math) with gradients: the cache tensors
  are ordinary autograd values, so the gradient of every tail reaches the shared prompt.

Only caches of plain attention layers can be repeated across a batch; recurrent or
convolutional state (hybrid models) cannot, and `CacheNotShareable` says so.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

_REPEATABLE_LAYERS = ("DynamicLayer", "DynamicSlidingWindowLayer")


class CacheNotShareable(RuntimeError):
    """The model's KV cache cannot be repeated across a batch (e.g. linear-attention layers)."""


def repeatable(cache: object) -> bool:
    """Only plain attention KV layers repeat correctly; recurrent / conv state does not."""
    layers = getattr(cache, "layers", None)
    return (
        layers is not None
        and hasattr(cache, "batch_repeat_interleave")
        and all(type(layer).__name__ in _REPEATABLE_LAYERS for layer in layers)
    )


def shared_prefix_hidden(
    decoder: torch.nn.Module,
    prefix: np.ndarray,
    tails: Sequence[np.ndarray],
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Final hidden states of the sequences prefix + tails[i]: the prefix's [P, H] (the same for
    every sequence) and the tails' right-padded [n, longest tail, H]. Raises
    CacheNotShareable for a cache that cannot be repeated (nothing is returned then)."""
    ids = torch.from_numpy(np.asarray(prefix, dtype=np.int64))[None].to(device)
    first = decoder(input_ids=ids, use_cache=True)
    cache = first.past_key_values
    if not repeatable(cache):
        raise CacheNotShareable(type(cache).__name__)
    cache.batch_repeat_interleave(len(tails))
    context = len(prefix)
    longest = max(len(t) for t in tails)
    tail_ids = torch.zeros((len(tails), longest), dtype=torch.long)
    mask = torch.ones((len(tails), context + longest), dtype=torch.long)
    for b, tail in enumerate(tails):
        tail_ids[b, : len(tail)] = torch.from_numpy(np.asarray(tail, dtype=np.int64))
        mask[b, context + len(tail) :] = 0
    kwargs: dict[str, object] = {"input_ids": tail_ids.to(device), "past_key_values": cache}
    if not bool(mask.all()):
        kwargs["attention_mask"] = mask.to(device)
    rest = decoder(**kwargs, use_cache=True).last_hidden_state
    return first.last_hidden_state[0], rest


def prefix_groups(prefixes: Sequence[bytes | None]) -> list[list[int]]:
    """Indices grouped by identical prefix (its ids as bytes; None shares with nothing), each
    group in order, groups ordered by their first index: a group of two or more shares one
    pass; every other index is a group of its own."""
    by_prefix: dict[bytes, list[int]] = {}
    alone: list[list[int]] = []
    for i, key in enumerate(prefixes):
        if key is None:
            alone.append([i])
        else:
            by_prefix.setdefault(key, []).append(i)
    out = alone + [g for members in by_prefix.values() for g in _split(members)]
    return sorted(out, key=lambda g: g[0])


def _split(members: list[int]) -> list[list[int]]:
    return [members] if len(members) >= 2 else [[i] for i in members]
