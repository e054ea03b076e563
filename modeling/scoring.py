"""The scoring math, in one place for every backend: hidden states in, teacher numbers out.

Given the final hidden states h_N (after the model's final norm) of the N positions whose *next*
token is scored, the LM head weight W_VH and the options, it returns per position:

    z      = (h W^T) / T                       logits at temperature T (float32)
    lse    = logsumexp(z)                      so log q(v) = z_v - lse, never a full softmax copy
    token  = z[target] - lse                   log q of the actual next token
    cands  = z[cand_ids] - lse                 log q at caller-chosen ids (e.g. student's top-k)
    top-k  = topk(z) - lse                     teacher's own top-k ids and log-probs
    H      = lse - sum_v softmax(z)_v z_v      exact full-vocab entropy (nats), with lse
    rank   = #{v : z_v >= z[target]}           vocabulary rank of the actual token (1 = top),
                                               ties counted against it, as vLLM ranks

The LM head runs only on scored positions and in tiles: blocks of `chunk_tokens` rows times
blocks of `chunk_vocab` vocabulary columns, so a [T, V] float32 logits tensor never exists.
Log-sum-exp and entropy are carried across a row block's vocabulary tiles with the online
(flash-attention style) recurrence, the top-k is merged from each tile's top-k, and the token and
candidate logits are picked up in whichever tile holds them. Peak extra memory is two float32
tiles, chunk_tokens x chunk_vocab x 8 bytes (plus 2 bytes per element for a bf16/fp16 head).

Why tiles over the vocabulary: on a CPU a [1024, 4096] float32 tile (16 MB) stays in the
last-level cache between the matmul that writes it and the passes that read it (top-k, gathers,
subtract, exp, sums); a [256, 49152] chunk (50 MB) does not. On 2 EPYC cores the scoring math of
768 SmolLM2 positions went from 0.84 s to 0.52 s (medians of 9 alternating runs; the head matmul
alone is about 0.33 s), with the same numbers to 4e-6 (docs/benchmarks.md). On a GPU, where
kernel launches cost more than cache misses, one tile spans the whole vocabulary.

The matmul runs in the model's dtype (as the model's own forward does) and is upcast to float32
before any softmax arithmetic.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from opd.modeling.cpu_gemm import head_matmul
from opd.shared.packed import slice_row_arrays

# The running max starts at the lowest finite float32, not -inf, so that the first tile's
# rescale factor exp(old - new) is 0 rather than nan (0 * -inf).
_LOWEST = torch.finfo(torch.float32).min


@dataclass
class HeadSpec:
    """The model's output head: logits = softcap(scale * (h @ weight.T + bias))."""

    weight_VH: torch.Tensor
    bias_V: torch.Tensor | None = None
    logit_scale: float | None = None
    final_softcap: float | None = None
    # float32 CPU tiles on single-thread streams through numpy's BLAS (opd.modeling.cpu_gemm)
    numpy_blas: bool = False

    @property
    def vocab_size(self) -> int:
        return int(self.weight_VH.shape[0])


@dataclass
class ScoredRows:
    """float32 numpy arrays, one row per scored position."""

    token_logprobs_N: np.ndarray
    candidate_logprobs_NK: np.ndarray | None
    top_k_ids_Nk: np.ndarray | None
    top_k_logprobs_Nk: np.ndarray | None
    entropy_N: np.ndarray | None
    token_ranks_N: np.ndarray | None = None


class TileBuffers:
    """The two float32 tiles the scoring math works in, allocated once per call and reused by
    every tile: the logits (then z - max in place) and their exponentials. Reuse keeps the peak
    at exactly two tiles and spares the allocator a 16 MB malloc/free per tile."""

    def __init__(self, head: HeadSpec, rows: int, cols: int, device: torch.device) -> None:
        n = rows * cols
        self.logits = torch.empty(n, dtype=torch.float32, device=device)
        self.exps = torch.empty(n, dtype=torch.float32, device=device)
        dtype = head.weight_VH.dtype
        # A bf16/fp16 head multiplies in its own dtype (as the model's forward does), then upcasts.
        self.raw = None if dtype == torch.float32 else torch.empty(n, dtype=dtype, device=device)

    @staticmethod
    def view(flat: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        return flat[: rows * cols].view(rows, cols)


def head_logits(
    head: HeadSpec, hidden_RH: torch.Tensor, vocab: slice, buffers: TileBuffers
) -> torch.Tensor:
    """float32 logits [R, C] of the LM head over the vocabulary slice `vocab`, written into the
    logits buffer (the matmul in the model's dtype, the transforms in place)."""
    weight = head.weight_VH[vocab]
    rows, cols = int(hidden_RH.shape[0]), int(weight.shape[0])
    z = TileBuffers.view(buffers.logits, rows, cols)
    out = z if buffers.raw is None else TileBuffers.view(buffers.raw, rows, cols)
    h = hidden_RH.to(weight.dtype)  # a no-op when score_hidden already converted the block
    if head.bias_V is None:
        head_matmul(h, weight, out, head.numpy_blas)
    else:
        torch.addmm(head.bias_V[vocab], h, weight.T, out=out)
    if buffers.raw is not None:
        z.copy_(out)
    if head.logit_scale is not None:
        z.mul_(head.logit_scale)
    if head.final_softcap is not None:
        z.div_(head.final_softcap).tanh_().mul_(head.final_softcap)
    return z


def target_logits(
    head: HeadSpec, hidden_RH: torch.Tensor, targets_R: torch.Tensor, temperature: float
) -> torch.Tensor:
    """float32 logits of each row's own target id, before any tile is computed.

    The rank of the actual token needs its logit in every tile, also in the tiles that come
    before the one holding it; a row-wise dot product gives it up front. It is rounded to the
    head's dtype as the tile matmul's output is, so exact ties (common in bf16) stay ties.
    """
    weight = head.weight_VH[targets_R]
    h = hidden_RH.to(weight.dtype)
    raw = (h.float() * weight.float()).sum(-1)
    if head.bias_V is not None:
        raw = raw + head.bias_V[targets_R].float()
    z = raw.to(weight.dtype).float()
    if head.logit_scale is not None:
        z = z * head.logit_scale
    if head.final_softcap is not None:
        z = torch.tanh(z / head.final_softcap) * head.final_softcap
    return z / temperature if temperature != 1.0 else z


class OnlineSoftmaxStats:
    """Log-sum-exp and entropy of rows whose logits arrive one vocabulary tile at a time.

    Keeps, relative to the running row max m: S = sum e^(z - m) and D = sum e^(z - m) (z - m).
    Then lse = m + log S and H = lse - E[z] = log S - D / S. Working relative to the max keeps
    every exponent <= 0 (no overflow) and avoids the cancellation of lse - E[z] for peaked rows.
    """

    def __init__(self, rows: int, device: torch.device) -> None:
        self.max_R = torch.full((rows,), _LOWEST, dtype=torch.float32, device=device)
        self.sum_R = torch.zeros(rows, dtype=torch.float32, device=device)
        self.dot_R = torch.zeros(rows, dtype=torch.float32, device=device)

    def update(
        self, z_RC: torch.Tensor, tile_max_R: torch.Tensor, entropy: bool, exps: torch.Tensor
    ) -> None:
        """Fold in one tile. Overwrites z_RC with z - new max (the caller is done with it) and
        uses `exps` (a flat buffer of at least R x C) for e^(z - max)."""
        new_max = torch.maximum(self.max_R, tile_max_R)
        shift = self.max_R - new_max  # <= 0: rescales what was summed against the old max
        alpha = shift.exp()
        d = z_RC.sub_(new_max[:, None])
        # -inf logits (e.g. a bias that masks tokens) give d = -inf, e = 0 and e * d = nan:
        # clamping d far below exp's underflow point changes no sum and removes the nan.
        d.clamp_(min=-1e30)
        e = torch.exp(d, out=TileBuffers.view(exps, *d.shape))
        tile_sum = e.sum(-1)
        if entropy:  # before S is updated: D is rescaled with the old S
            self.dot_R = alpha * (self.dot_R + self.sum_R * shift) + e.mul_(d).sum(-1)
        self.sum_R = alpha * self.sum_R + tile_sum
        self.max_R = new_max

    def lse(self) -> torch.Tensor:
        return self.max_R + self.sum_R.log()

    def entropy(self) -> torch.Tensor:
        return self.sum_R.log() - self.dot_R / self.sum_R


def pick_in_tile(
    z_RC: torch.Tensor, ids: torch.Tensor, start: int, picked: torch.Tensor
) -> torch.Tensor:
    """`picked` with z at `ids` filled in where ids fall in this tile [start, start + C)."""
    width = z_RC.shape[1]
    local = ids - start
    inside = (local >= 0) & (local < width)
    rows = local.clamp(0, width - 1).view(local.shape[0], -1)  # [R] or [R, K] -> [R, K']
    values = z_RC.gather(1, rows).view(ids.shape)
    return torch.where(inside, values, picked)


@torch.inference_mode()
def score_hidden(
    head: HeadSpec,
    hidden_NH: torch.Tensor,
    target_ids_N: torch.Tensor,
    candidate_ids_NK: torch.Tensor | None = None,
    top_k: int = 0,
    entropy: bool = False,
    temperature: float = 1.0,
    chunk_tokens: int = 1024,
    chunk_vocab: int = 0,
    rank: bool = False,
) -> ScoredRows:
    """Score N positions tile by tile; chunk_vocab 0 (or >= V) is one tile per row block.

    With `rank`, each tile also counts the logits at or above the row's target logit (from
    `target_logits`); the target itself is added when rounding put its tile value below that
    estimate, so the count is the rank exactly except for logits within rounding of the target.
    """
    n = int(hidden_NH.shape[0])
    device = hidden_NH.device
    vocab = head.vocab_size
    width = vocab if chunk_vocab <= 0 else min(vocab, int(chunk_vocab))
    token_lp = torch.empty(n, dtype=torch.float32, device=device)
    cand_lp = (
        None
        if candidate_ids_NK is None
        else torch.empty(candidate_ids_NK.shape, dtype=torch.float32, device=device)
    )
    top_ids = torch.empty((n, top_k), dtype=torch.int64, device=device) if top_k else None
    top_lp = torch.empty((n, top_k), dtype=torch.float32, device=device) if top_k else None
    ent = torch.empty(n, dtype=torch.float32, device=device) if entropy else None
    ranks = torch.empty(n, dtype=torch.int64, device=device) if rank else None
    targets = target_ids_N.to(device=device, dtype=torch.int64)
    cands = None if candidate_ids_NK is None else candidate_ids_NK.to(device, torch.int64)
    step = max(1, int(chunk_tokens))
    buffers = TileBuffers(head, min(step, n), width, device)
    for a in range(0, n, step):
        b = min(n, a + step)
        stats = OnlineSoftmaxStats(b - a, device)
        tok_z = torch.zeros(b - a, dtype=torch.float32, device=device)
        cand_z = None if cands is None else torch.zeros_like(cands[a:b], dtype=torch.float32)
        tile_vals: list[torch.Tensor] = []
        tile_ids: list[torch.Tensor] = []
        block = hidden_NH[a:b].to(head.weight_VH.dtype)
        if ranks is not None:
            tok_est = target_logits(head, block, targets[a:b], temperature)
            at_or_above = torch.zeros(b - a, dtype=torch.int64, device=device)
        for v0 in range(0, vocab, width):
            z = head_logits(head, block, slice(v0, v0 + width), buffers)
            if temperature != 1.0:
                z.div_(temperature)
            tok_z = pick_in_tile(z, targets[a:b], v0, tok_z)
            if ranks is not None:
                at_or_above += (z >= tok_est[:, None]).sum(-1)
            if cand_z is not None and cands is not None:
                cand_z = pick_in_tile(z, cands[a:b], v0, cand_z)
            if top_ids is not None:
                vals, idx = torch.topk(z, min(top_k, z.shape[1]), dim=-1)
                tile_vals.append(vals)
                tile_ids.append(idx + v0)
                tile_max = vals[:, 0]
            else:
                tile_max = z.amax(dim=-1)
            stats.update(z, tile_max, entropy, buffers.exps)
        lse = stats.lse()
        token_lp[a:b] = tok_z - lse
        if cand_lp is not None and cand_z is not None:
            cand_lp[a:b] = cand_z - lse[:, None]
        if top_ids is not None and top_lp is not None:
            vals, pos = torch.topk(torch.cat(tile_vals, dim=1), top_k, dim=-1)
            top_ids[a:b] = torch.cat(tile_ids, dim=1).gather(1, pos)
            top_lp[a:b] = vals - lse[:, None]
        if ent is not None:
            ent[a:b] = stats.entropy()
        if ranks is not None:
            ranks[a:b] = at_or_above + (tok_z < tok_est).long()

    def out(x: torch.Tensor | None, dtype: type = np.float32) -> np.ndarray | None:
        return None if x is None else x.cpu().numpy().astype(dtype, copy=False)

    return ScoredRows(
        token_logprobs_N=out(token_lp),
        candidate_logprobs_NK=out(cand_lp),
        top_k_ids_Nk=out(top_ids, np.int32),
        top_k_logprobs_Nk=out(top_lp),
        entropy_N=out(ent),
        token_ranks_N=out(ranks, np.int32),
    )


def score_items(
    head: HeadSpec,
    hidden_per_item: list[torch.Tensor],
    items: list,
    chunk_tokens: int,
    chunk_vocab: int = 0,
) -> list[ScoredRows]:
    """Score a pack given each item's final hidden states [>= n_tokens - 1, H].

    Items that share options (top_k, entropy, temperature, rank, number of candidates) go through
    the LM head together, one tiled pass per group, so one request's options never reach another's
    numbers. Row j of an item's hidden states predicts token j + 1; only the rows p - 1 of the
    item's scored positions p (`items[i].positions`: score_from .. n_tokens-1, or the positions of
    its scored spans) go through the head, with targets token_ids[p]. Shared by every backend, so
    they differ only in how hidden states are made.
    """
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, it in enumerate(items):
        o = it.options
        k = 0 if it.candidate_ids is None else it.candidate_ids.shape[1]
        groups[(o.top_k, o.entropy, o.temperature, o.token_rank, k)].append(i)
    results: list[ScoredRows | None] = [None] * len(items)
    for (top_k, entropy, temperature, rank, k), members in groups.items():
        rows = torch.cat([scored_hidden(hidden_per_item[i], items[i]) for i in members])
        targets = torch.from_numpy(
            np.concatenate(
                [np.asarray(items[i].token_ids)[items[i].positions] for i in members]
            ).astype(np.int64)
        )
        cands = None
        if k:
            cands = torch.from_numpy(
                np.concatenate([items[i].candidate_ids for i in members]).astype(np.int64)
            )
        scored = score_hidden(
            head,
            rows,
            targets,
            cands,
            top_k=top_k,
            entropy=entropy,
            temperature=temperature,
            chunk_tokens=chunk_tokens,
            chunk_vocab=chunk_vocab,
            rank=rank,
        )
        start = 0
        for i in members:
            end = start + items[i].n_scored
            results[i] = slice_rows(scored, start, end)
            start = end
    return [r for r in results if r is not None]


def scored_hidden(hidden: torch.Tensor, item: Any) -> torch.Tensor:
    """The hidden-state rows that predict `item`'s (a ScoreItem's) scored positions: rows
    p - 1, in order.

    A contiguous tail (score_from .. n_tokens-1) is a slice; scored spans gather their rows, so
    context between spans never reaches the LM head."""
    if item.is_tail:
        return hidden[item.score_from - 1 : item.n_tokens - 1]
    index = torch.from_numpy(np.asarray(item.positions, dtype=np.int64) - 1)
    return hidden.index_select(0, index.to(hidden.device))


def slice_rows(rows: ScoredRows, a: int, b: int) -> ScoredRows:
    return ScoredRows(**slice_row_arrays(rows, a, b))
