"""The traffic of `opd bench-load`: a pool of mixed score requests, closed- and open-loop senders,
and what each answer was (opd.bench.load runs the phases and writes the report).

Requests are pre-encoded once (a pool drawn with a fixed seed) and then drawn at random, so the
sender spends its time sending, not encoding: on a small machine the client shares the cores
with the server, and a client busy building bodies would measure itself. Every 200 is checked
for shape (scored positions per sequence, top-k and candidate widths), because an answer of the
wrong shape is as lost as no answer.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np

from opd.client.teacher.base import encode
from opd.client.teacher.errors import parse_retry_after
from opd.shared.codec import decode_result_msgpack
from opd.shared.packed import PackedRequest
from opd.shared.schemas import ScoreOptions
from opd.shared.version import MSGPACK_MEDIA_TYPE

# What an answer was. "ok" and "refused" (429) are the healthy outcomes under overload;
# "expired" (408) is the server dropping work whose X-OPD-Deadline passed while it was queued
# (an answer the client asked for, not a loss); the LOST kinds are requests that were sent and
# never served correctly.
LOST_KINDS = ("timeout", "transport", "5xx", "bad_content")

# The per-request deadline header of opd serve (server/admission.py): seconds within which the
# request's work must start.
DEADLINE_HEADER = "X-OPD-Deadline"


@dataclass(frozen=True)
class Shot:
    """One pre-encoded POST /v1/score and what its answer must look like."""

    body: bytes
    headers: dict[str, str]
    encoding: str
    n_scored: tuple[int, ...]  # expected scored positions per sequence
    top_k: int
    candidates: int

    @property
    def scored(self) -> int:
        return sum(self.n_scored)


@dataclass(frozen=True)
class Outcome:
    """One sent request: its kind (ok, refused, other, or a LOST kind), HTTP status if any,
    latency from its scheduled start, scored positions if served, Retry-After if refused."""

    kind: str
    status: int | None
    latency_s: float
    scored: int = 0
    retry_after_s: float | None = None
    error: str | None = None


def make_pool(
    size: int,
    *,
    vocab: int,
    min_tokens: int,
    max_tokens: int,
    max_sequences: int,
    top_k: int,
    candidates: int,
    msgpack_share: float,
    seed: int,
) -> list[Shot]:
    """`size` requests of 1..max_sequences sequences of min..max_tokens tokens (uniform), a
    prompt of 1..half the sequence, and one of three option sets: plain log-probs (half), top_k
    with entropy (a quarter), caller-chosen candidates (a quarter); msgpack with probability
    msgpack_share, else JSON. Token ids are uniform random: speed does not depend on them."""
    rng = np.random.default_rng(seed)
    pool = []
    for _ in range(size):
        n = int(rng.integers(1, max_sequences + 1))
        lens = rng.integers(min_tokens, max_tokens + 1, n)
        score_from = [int(rng.integers(1, max(2, length // 2 + 1))) for length in lens]
        kind = rng.choice(["plain", "plain", "top_k", "candidates"])
        k = top_k if kind == "top_k" else 0
        c = candidates if kind == "candidates" and candidates else 0
        options = ScoreOptions(top_k=k, entropy=kind == "top_k", logprob_dtype="float16")
        seqs = [rng.integers(0, vocab, int(length)) for length in lens]
        n_scored = tuple(int(length - s) for length, s in zip(lens, score_from, strict=True))
        cands = [rng.integers(0, vocab, (m, c)) for m in n_scored] if c else None
        req = PackedRequest.from_arrays(seqs, score_from, cands, options)
        encoding = "msgpack" if rng.random() < msgpack_share else "json"
        body, headers = encode(req, encoding)  # type: ignore[arg-type]
        pool.append(Shot(body, headers, encoding, n_scored, k, c))
    return pool


def check_answer(shot: Shot, response: httpx.Response) -> str | None:
    """Why a 200 is wrong (None when its shape is what was asked)."""
    try:
        media = response.headers.get("content-type", "")
        if MSGPACK_MEDIA_TYPE in media:
            res = decode_result_msgpack(response.content)
            got = tuple(int(x) for x in np.diff(res.scored_offsets_n1))
            widths = (
                0 if res.top_k_ids_Nk is None else res.top_k_ids_Nk.shape[1],
                0 if res.candidate_logprobs_NK is None else res.candidate_logprobs_NK.shape[1],
            )
        else:
            data = json.loads(response.content)
            results = data["results"]
            got = tuple(len(r["token_logprobs"]) for r in results)
            widths = (int(data.get("top_k", 0)), int(data.get("n_candidates", 0)))
            for r, m in zip(results, got, strict=False):
                if shot.top_k and any(len(row) != shot.top_k for row in r["top_k_ids"] or []):
                    return "a top_k row of the wrong width"
                if shot.top_k and len(r["top_k_ids"] or []) != m:
                    return "top_k rows do not match the scored positions"
                if shot.candidates and len(r["candidate_logprobs"] or []) != m:
                    return "candidate rows do not match the scored positions"
    except Exception as exc:  # any decoding failure of a 200 is a wrong answer
        return f"undecodable 200: {exc!r}"[:300]
    if got != shot.n_scored:
        return f"scored positions {got} != sent {shot.n_scored}"[:300]
    if widths != (shot.top_k, shot.candidates):
        return f"(top_k, candidates) widths {widths} != ({shot.top_k}, {shot.candidates})"
    return None


async def send(
    client: httpx.AsyncClient, url: str, shot: Shot, started: float, timeout_s: float
) -> Outcome:
    """POST one shot; latency counts from `started` (its scheduled time), so a sender that
    falls behind shows up in the latency instead of hiding it. `timeout_s` bounds the whole
    exchange (httpx's own timeout bounds each read, not the total)."""
    try:
        response = await asyncio.wait_for(
            client.post(url + "/v1/score", content=shot.body, headers=shot.headers), timeout_s
        )
    except (httpx.TimeoutException, TimeoutError) as exc:
        return Outcome("timeout", None, time.perf_counter() - started, error=repr(exc)[:200])
    except httpx.TransportError as exc:
        return Outcome("transport", None, time.perf_counter() - started, error=repr(exc)[:200])
    latency = time.perf_counter() - started
    status = response.status_code
    if status == 200:
        # off the event loop: decoding a large JSON answer must not delay the next arrivals
        wrong = await asyncio.to_thread(check_answer, shot, response)
        if wrong:
            return Outcome("bad_content", status, latency, error=wrong)
        return Outcome("ok", status, latency, scored=shot.scored)
    if status == 429:
        retry = parse_retry_after(response.headers.get("retry-after"))
        return Outcome("refused", status, latency, retry_after_s=retry)
    kind = "5xx" if status >= 500 else "expired" if status == 408 else "other"
    return Outcome(kind, status, latency, error=response.text[:200])


async def closed_loop(
    client: httpx.AsyncClient,
    url: str,
    pool: Sequence[Shot],
    clients: int,
    seconds: float,
    seed: int,
    timeout_s: float,
) -> tuple[list[Outcome], float]:
    """`clients` senders, each sending its next request when the last is answered, until
    `seconds` have passed: the server's saturated rate. A refused sender waits Retry-After
    (at most 1 s) so that a server refusing at once is not hammered in a tight loop."""
    outcomes: list[Outcome] = []
    t0 = time.perf_counter()
    deadline = t0 + seconds

    async def sender(i: int) -> None:
        rng = np.random.default_rng([seed, i])
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            out = await send(client, url, pool[int(rng.integers(len(pool)))], started, timeout_s)
            outcomes.append(out)
            if out.kind == "refused":
                await asyncio.sleep(min(out.retry_after_s or 0.5, 1.0))

    await asyncio.gather(*(sender(i) for i in range(clients)))
    return outcomes, time.perf_counter() - t0


@dataclass
class OpenLoopRun:
    outcomes: list[Outcome]
    wall_s: float  # first arrival slot to the last answer
    arrivals: int  # arrivals scheduled in the window
    not_sent: int  # arrivals that found `clients` requests in flight (never sent)
    max_in_flight: int
    max_lag_s: float  # how late the sender was on its own schedule, at worst


async def open_loop(
    client: httpx.AsyncClient,
    url: str,
    pool: Sequence[Shot],
    rate: float,
    seconds: float,
    clients: int,
    seed: int,
    timeout_s: float,
) -> OpenLoopRun:
    """Poisson arrivals at `rate` req/s for `seconds` (seeded: the same schedule and requests
    every run), each sent when due whatever the server is doing. At most `clients` in flight
    (0 = no cap): an arrival that finds them all busy is counted as not sent, never queued on
    the client, where its wait would hide from the server's latency."""
    rng = np.random.default_rng(seed)
    outcomes: list[Outcome] = []
    tasks: list[asyncio.Task[None]] = []
    in_flight = max_in_flight = not_sent = arrivals = 0
    max_lag = 0.0

    async def one(shot: Shot, due: float) -> None:
        nonlocal in_flight
        try:
            outcomes.append(await send(client, url, shot, due, timeout_s))
        finally:
            in_flight -= 1

    t0 = time.perf_counter()
    t = 0.0
    while True:
        t += float(rng.exponential(1.0 / rate))
        if t >= seconds:
            break
        shot = pool[int(rng.integers(len(pool)))]
        arrivals += 1
        delay = t0 + t - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        max_lag = max(max_lag, time.perf_counter() - (t0 + t))
        if clients and in_flight >= clients:
            not_sent += 1
            continue
        in_flight += 1
        max_in_flight = max(max_in_flight, in_flight)
        tasks.append(asyncio.create_task(one(shot, t0 + t)))
    await asyncio.gather(*tasks)
    wall = max(time.perf_counter() - t0, seconds)
    return OpenLoopRun(outcomes, wall, arrivals, not_sent, max_in_flight, max_lag)


def _ms(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q) * 1000) if values else None


def summarize(outcomes: list[Outcome], wall_s: float) -> dict[str, Any]:
    """A phase's numbers from its outcomes: rates over `wall_s`, latency of 200s and of 429s,
    statuses, Retry-After, and the lost requests by kind (with a few of their errors)."""
    ok = [o for o in outcomes if o.kind == "ok"]
    refused = [o for o in outcomes if o.kind == "refused"]
    statuses: dict[str, int] = {}
    for o in outcomes:
        key = str(o.status) if o.status is not None else "none"
        statuses[key] = statuses.get(key, 0) + 1
    lost_by_kind = {k: sum(o.kind == k for o in outcomes) for k in LOST_KINDS}
    retry = [o.retry_after_s for o in refused if o.retry_after_s is not None]
    sent = len(outcomes)
    return {
        "sent": sent,
        "ok": len(ok),
        "refused_429": len(refused),
        "share_429": len(refused) / sent if sent else 0.0,
        "statuses": dict(sorted(statuses.items())),
        "expired_408": sum(o.kind == "expired" for o in outcomes),
        "other_4xx": sum(o.kind == "other" for o in outcomes),
        "lost": sum(lost_by_kind.values()),
        "lost_by_kind": lost_by_kind,
        "lost_examples": [o.error for o in outcomes if o.kind in LOST_KINDS][:5],
        "wall_s": wall_s,
        "achieved_rps": len(ok) / wall_s if wall_s else 0.0,
        "scored_tokens_per_s": sum(o.scored for o in ok) / wall_s if wall_s else 0.0,
        "p50_ms": _ms([o.latency_s for o in ok], 50),
        "p99_ms": _ms([o.latency_s for o in ok], 99),
        "p50_429_ms": _ms([o.latency_s for o in refused], 50),
        "p99_429_ms": _ms([o.latency_s for o in refused], 99),
        "retry_after_median_s": float(np.median(retry)) if retry else None,
    }
