"""Check a packed request against the limits and the model: one function, used by both sides.

The server calls it before queueing (a failure is a 422 naming the field and the limit); the
client calls it before sending, after splitting, so a request it built is never refused.
"""

from __future__ import annotations

import numpy as np

from opd.shared.errors import ContractError
from opd.shared.limits import Limits
from opd.shared.packed import PackedRequest, score_from_range_error
from opd.shared.schemas import GenerateOptions


def validate_request(req: PackedRequest, limits: Limits, vocab_size: int) -> None:
    """Raise ContractError on the first broken rule; return None if the request is servable."""
    n = req.n_sequences
    if n < 1:
        raise ContractError("at least one sequence is required", field="sequences", limit=1)
    if n > limits.max_sequences:
        raise ContractError(
            f"{n} sequences exceed max_sequences={limits.max_sequences}",
            field="sequences",
            limit=limits.max_sequences,
        )
    offs = req.seq_offsets_n1
    if offs[0] != 0 or np.any(np.diff(offs) < 0) or offs[-1] != len(req.token_ids_T):
        raise ContractError(
            "seq_offsets must start at 0, never decrease and end at len(token_ids)",
            field="seq_offsets",
        )
    if len(req.score_from_n) != n:
        raise ContractError(
            f"score_from holds {len(req.score_from_n)} entries for {n} sequences",
            field="score_from",
            limit=n,
        )
    lens = req.seq_lens_n
    for i in np.flatnonzero(lens < 2)[:1]:
        raise ContractError(
            f"sequence holds {int(lens[i])} tokens; at least 2 are needed (context + one scored)",
            field=f"sequences[{i}].token_ids",
            limit=2,
        )
    cap = limits.max_tokens_per_sequence
    for i in np.flatnonzero(lens > cap)[:1]:
        raise ContractError(
            f"sequence holds {int(lens[i])} tokens, over max_tokens_per_sequence={cap}",
            field=f"sequences[{i}].token_ids",
            limit=cap,
        )
    total = int(lens.sum())
    if total > limits.max_total_tokens:
        raise ContractError(
            f"request holds {total} tokens, over max_total_tokens={limits.max_total_tokens}",
            field="sequences",
            limit=limits.max_total_tokens,
        )
    bad = np.flatnonzero((req.token_ids_T < 0) | (req.token_ids_T >= vocab_size))
    if bad.size:
        pos = int(bad[0])
        i = int(np.searchsorted(offs, pos, side="right") - 1)
        j = pos - int(offs[i])
        raise ContractError(
            f"token id {int(req.token_ids_T[pos])} is outside the vocabulary [0, {vocab_size})",
            field=f"sequences[{i}].token_ids[{j}]",
            limit=vocab_size,
        )
    if req.spans_S2 is None and req.span_offsets_n1 is None:
        sf = req.score_from_n
        for i in np.flatnonzero((sf < 1) | (sf > lens - 1))[:1]:
            raise score_from_range_error(int(i), int(sf[i]), int(lens[i]))
    else:
        _validate_spans(req)
    _validate_options(req, limits, vocab_size)
    _validate_candidates(req, limits, vocab_size)


def _validate_spans(req: PackedRequest) -> None:
    """Scored spans (protocol 1.3): per sequence at least one [start, end) with
    1 <= start < end <= L, sorted and non-overlapping (touching allowed), the first start equal
    to score_from. Checked before anything counts scored positions from them."""
    n = req.n_sequences
    so, spans = req.span_offsets_n1, req.spans_S2
    if so is None or spans is None:
        missing = "span_offsets" if so is None else "spans"
        raise ContractError(
            "span_offsets and spans are given together or not at all", field=missing
        )
    if spans.ndim != 2 or spans.shape[1] != 2:
        raise ContractError(
            f"spans must be [S, 2] rows [start, end); got shape {list(spans.shape)}",
            field="spans",
        )
    if len(so) != n + 1 or so[0] != 0 or np.any(np.diff(so) < 0) or so[-1] != len(spans):
        raise ContractError(
            f"span_offsets must hold n+1 = {n + 1} entries, start at 0, never decrease and end "
            f"at the number of spans ({len(spans)})",
            field="span_offsets",
            limit=n + 1,
        )
    counts = np.diff(so)
    for i in np.flatnonzero(counts < 1)[:1]:
        raise ContractError(
            "score_spans holds no span; at least 1 is needed",
            field=f"sequences[{i}].score_spans",
            limit=1,
        )
    owner = np.repeat(np.arange(n), counts)  # sequence of each span
    index = np.arange(len(spans)) - so[owner]  # its index within the sequence
    start, end = spans[:, 0], spans[:, 1]
    length = req.seq_lens_n[owner]
    prev_end = np.concatenate([[0], end[:-1]])
    low, high = start < 1, end > length
    empty = end <= start
    overlaps = (index > 0) & (start < prev_end)
    bad = np.flatnonzero(low | high | empty | overlaps)
    if bad.size:
        s = int(bad[0])
        i, j = int(owner[s]), int(index[s])
        a, b, L = int(start[s]), int(end[s]), int(length[s])
        where = f"sequences[{i}].score_spans[{j}]"
        if low[s]:
            raise ContractError(
                f"span [{a}, {b}) starts before position 1 (position 0 has no context)",
                field=where,
                limit=1,
            )
        if high[s]:
            raise ContractError(
                f"span [{a}, {b}) ends past len(token_ids) = {L}", field=where, limit=L
            )
        if empty[s]:
            raise ContractError(
                f"span [{a}, {b}) is empty: its end must be at least start + 1 = {a + 1}",
                field=where,
                limit=a + 1,
            )
        raise ContractError(
            f"span [{a}, {b}) starts before the previous span's end {int(prev_end[s])}: spans "
            "must be sorted and must not overlap",
            field=where,
            limit=int(prev_end[s]),
        )
    first = start[so[:-1]]
    for i in np.flatnonzero(req.score_from_n != first)[:1]:
        raise ContractError(
            f"score_from={int(req.score_from_n[i])} differs from the first span's start "
            f"{int(first[i])}; with spans, score_from is the first scored position",
            field=f"sequences[{i}].score_from",
            limit=int(first[i]),
        )


def _validate_options(req: PackedRequest, limits: Limits, vocab_size: int) -> None:
    o = req.options
    top_cap = min(limits.max_top_k, vocab_size)
    if o.top_k < 0 or o.top_k > top_cap:
        cap = f"max_top_k={top_cap}" if top_cap == limits.max_top_k else "the vocabulary size"
        raise ContractError(
            f"top_k={o.top_k} is outside [0, {top_cap}] ({cap})", field="top_k", limit=top_cap
        )
    if not (limits.min_temperature <= o.temperature <= limits.max_temperature):
        raise ContractError(
            f"temperature={o.temperature} is outside "
            f"[{limits.min_temperature}, {limits.max_temperature}]",
            field="temperature",
            limit=limits.min_temperature
            if o.temperature < limits.min_temperature
            else limits.max_temperature,
        )


def _validate_candidates(req: PackedRequest, limits: Limits, vocab_size: int) -> None:
    cands = req.candidate_ids_NK
    if cands is None:
        return
    n_scored_total = int(req.n_scored_n.sum())
    if cands.ndim != 2 or cands.shape[0] != n_scored_total:
        raise ContractError(
            f"candidate_ids must be a [n_scored, k] matrix with n_scored={n_scored_total} rows "
            f"in total; got shape {list(cands.shape)}",
            field="candidate_ids",
            limit=n_scored_total,
        )
    k = cands.shape[1]
    if k < 1 or k > limits.max_candidates:
        raise ContractError(
            f"{k} candidate ids per position; allowed 1..max_candidates={limits.max_candidates}",
            field="candidate_ids",
            limit=limits.max_candidates,
        )
    bad = np.argwhere((cands < 0) | (cands >= vocab_size))
    if bad.size:
        row, col = (int(x) for x in bad[0])
        scored = req.scored_offsets_n1
        i = int(np.searchsorted(scored, row, side="right") - 1)
        raise ContractError(
            f"candidate id {int(cands[row, col])} is outside the vocabulary [0, {vocab_size})",
            field=f"sequences[{i}].candidate_ids[{row - int(scored[i])}][{col}]",
            limit=vocab_size,
        )


def validate_generate(
    options: GenerateOptions,
    prompts: list[list[int]],
    limits: Limits,
    vocab_size: int,
    field: str,
) -> None:
    """Check a generate request (prompts already as token ids) against the limits.

    `field` names the request's prompt field ("prompts" or "prompt_token_ids") for messages."""
    n = len(prompts)
    if n > limits.max_sequences:
        raise ContractError(
            f"{n} prompts exceed max_sequences={limits.max_sequences}",
            field=field,
            limit=limits.max_sequences,
        )
    _at_most("n", options.n, "max_generate_n", limits.max_generate_n)
    _at_most("max_tokens", options.max_tokens, "max_generate_tokens", limits.max_generate_tokens)
    _at_most("temperature", options.temperature, "max_temperature", limits.max_temperature)
    if 0 < options.temperature < limits.min_temperature:
        # logits / 5e-324 overflow to inf and sampling fails; below min_temperature sampling is
        # greedy in all but name, so the caller is told to ask for 0 (greedy) instead.
        raise ContractError(
            f"temperature={options.temperature} is below min_temperature="
            f"{limits.min_temperature}; use 0 for greedy decoding",
            field="temperature",
            limit=limits.min_temperature,
        )
    cap = limits.max_tokens_per_sequence
    for i, ids in enumerate(prompts):
        if not ids:
            raise ContractError("prompt is empty", field=f"{field}[{i}]", limit=1)
        if len(ids) + options.max_tokens > cap:
            raise ContractError(
                f"prompt of {len(ids)} tokens + max_tokens={options.max_tokens} exceeds "
                f"max_tokens_per_sequence={cap} (the context)",
                field=f"{field}[{i}]",
                limit=cap,
            )
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise ContractError(
                f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})",
                field=f"{field}[{i}]",
                limit=vocab_size,
            )


def _at_most(field: str, value: float, cap: str, limit: float) -> None:
    """Refuse `field`=value over the limit named `cap`."""
    if value > limit:
        raise ContractError(f"{field}={value} exceeds {cap}={limit}", field=field, limit=limit)
