"""Sample rollouts with the student and score them on one or several teachers, overlapped.

`opd train`, `opd probe` and `opd select-prompts` all do the same thing: the student samples a
chunk of prompts, the finished chunk goes to every teacher at once (TeacherBridge, in the
background), and the student samples the next chunk while the teachers score. This module is
that loop, with its error handling in one place:

- connecting: `connect_teachers` opens one bridge per teacher and checks protocol, tokenizer
  fingerprint and that the teacher's limits can serve the request; with `keep_going` a teacher
  that fails is reported and skipped (probe compares teachers; one down must not sink the
  rest), otherwise the first failure raises;
- scoring: a teacher whose request fails mid-run is likewise reported with `keep_going` (its
  entry is missing from `Collected.scored`), or raises.

With several teachers, each scores its own copies of the rollouts, so every teacher sees the same
tokens and no teacher's numbers overwrite another's.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any

from opd.client.teacher.errors import IncompatibleTeacherError
from opd.client.train.bridge import ScoreSpec, TeacherBridge
from opd.client.train.rollouts import Rollout
from opd.shared.schemas import ModelInfo


@dataclass
class Teacher:
    """A connected teacher: its name, its bridge and what GET /v1/model said."""

    name: str
    bridge: TeacherBridge
    info: ModelInfo


@dataclass
class Connected:
    """The teachers that connected, in order, and why the others did not (name -> error)."""

    teachers: list[Teacher]
    errors: dict[str, str] = field(default_factory=dict)

    def close(self) -> None:
        for t in self.teachers:
            t.bridge.close()


def check_limits(info: ModelInfo, spec: ScoreSpec, n_candidates: int) -> None:
    """Refuse a teacher up front whose limits cannot serve the requests this run will send."""
    limits = info.limits
    if spec.top_k > limits.max_top_k:
        raise ValueError(f"top_k {spec.top_k} > the teacher's max_top_k {limits.max_top_k}")
    if spec.candidates and n_candidates > limits.max_candidates:
        raise ValueError(
            f"top_k {n_candidates} > the teacher's max_candidates {limits.max_candidates}"
        )


def connect_teachers(
    teachers: Sequence[tuple[str | None, list[str]]],
    spec: ScoreSpec,
    n_candidates: int,
    *,
    keep_going: bool = False,
    log: Callable[[str], None] = lambda _: None,
    **client_kwargs: Any,
) -> Connected:
    """One bridge per (name or None, replica URLs); None names the teacher by its model.

    client_kwargs go to every AsyncTeacherClient (api_key, tokenizer_fingerprint, ...)."""
    out = Connected([])
    for name, urls in teachers:
        bridge = None
        try:
            bridge = TeacherBridge(urls, **client_kwargs)
            info = bridge.connect()
            check_limits(info, spec, n_candidates)
        except Exception as exc:  # noqa: BLE001 - reported, or re-raised below
            if bridge is not None:
                bridge.close()
            if not keep_going:
                out.close()
                if name is not None and type(exc) in (IncompatibleTeacherError, ValueError):
                    # a multi-teacher run says which teacher failed the check
                    raise type(exc)(f"teacher {name!r} ({urls[0]}): {exc}") from exc
                raise
            label = name or urls[0]
            out.errors[label] = f"{type(exc).__name__}: {exc}"
            log(f"teacher {urls[0]}: skipped ({out.errors[label]})")
            continue
        label = name or info.name
        taken = {t.name for t in out.teachers}
        suffix = 2
        while label in taken:  # two teachers serving models of one name stay apart
            label, suffix = f"{name or info.name}#{suffix}", suffix + 1
        out.teachers.append(Teacher(label, bridge, info))
    if not out.teachers:
        raise RuntimeError("no teacher could be reached: " + "; ".join(out.errors.values()))
    return out


@dataclass
class Collected:
    """What one pipeline run produced: per teacher name, its scored rollouts in sampling order;
    the teachers that failed while scoring (name -> error); and the time split. Routed
    (multi-teacher OPD): `routed` holds every rollout once, scored by its own teacher, in
    sampling order, and `owners` the teacher of each."""

    scored: dict[str, list[Rollout]]
    errors: dict[str, str]
    timings: dict[str, float]
    routed: list[Rollout] | None = None
    owners: list[str] | None = None


def collect(
    teachers: Sequence[Teacher],
    chunks: Iterable[Sequence[int]],
    sample: Callable[[Sequence[int]], list[Rollout]],
    spec: ScoreSpec,
    *,
    keep_going: bool = False,
    on_chunk: Callable[[int], None] | None = None,
    route: Callable[[Rollout], str] | None = None,
    while_scoring: Callable[[list[Rollout]], None] | None = None,
) -> Collected:
    """Sample each chunk of prompt indices, send it to every teacher, then wait for all scores.
    With `route`, each rollout goes to the one teacher `route` names instead (multi-teacher
    OPD), and `Collected.routed` merges them back in sampling order.

    timings: time/generate_s (student sampling), time/score_s (teacher request time, summed
    over teachers), time/score_wait_s (what the student waited for after its last chunk),
    time/collect_s (the whole call). while_scoring(rollouts): called with every sampled
    rollout once all are submitted, before waiting for the scores: work that needs the
    tokens but not the teacher's numbers (the trainer's first decoder forward) overlaps the
    scoring; its time is time/while_scoring_s."""
    started = time.perf_counter()
    busy_before = sum(t.bridge.busy_s for t in teachers)
    align_before = sum(t.bridge.align_s for t in teachers)
    pending: dict[str, list[Future]] = {t.name: [] for t in teachers}
    owners: list[str] = []
    sampled: list[Rollout] = []
    generate_s = 0.0
    for done, chunk in enumerate(chunks, 1):
        t0 = time.perf_counter()
        rollouts = sample(chunk)
        generate_s += time.perf_counter() - t0
        sampled.extend(rollouts)
        chunk_owners = [route(r) for r in rollouts] if route is not None else []
        owners.extend(chunk_owners)
        for i, teacher in enumerate(teachers):
            if route is not None:
                mine = [r for r, o in zip(rollouts, chunk_owners, strict=True) if o == teacher.name]
            else:
                mine = rollouts if i == 0 else [replace(r) for r in rollouts]
            if mine or route is None:
                pending[teacher.name].append(teacher.bridge.submit(mine, spec))
        if on_chunk is not None:
            on_chunk(done)
    t0 = time.perf_counter()
    if while_scoring is not None:
        while_scoring(sampled)
    while_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    scored: dict[str, list[Rollout]] = {}
    errors: dict[str, str] = {}
    for teacher in teachers:
        try:
            scored[teacher.name] = [r for f in pending[teacher.name] for r in f.result()]
        except Exception as exc:  # noqa: BLE001 - reported, or re-raised
            if not keep_going:
                raise
            errors[teacher.name] = f"{type(exc).__name__}: {exc}"
    wait_s = time.perf_counter() - t0
    routed = None
    if route is not None and not errors:
        unknown = set(owners) - set(scored)
        if unknown:
            raise KeyError(f"rollouts routed to no connected teacher: {sorted(unknown)}")
        each = {name: iter(done) for name, done in scored.items()}
        routed = [next(each[owner]) for owner in owners]
    return Collected(
        scored,
        errors,
        {
            "time/generate_s": generate_s,
            "time/score_s": sum(t.bridge.busy_s for t in teachers) - busy_before,
            "time/score_wait_s": wait_s,
            "time/while_scoring_s": while_s,
            "time/collect_s": time.perf_counter() - started,
            # teachers of another tokenizer: rendering, aligning and translating back
            "time/align_s": sum(t.bridge.align_s for t in teachers) - align_before,
        },
        routed,
        owners if route is not None else None,
    )
