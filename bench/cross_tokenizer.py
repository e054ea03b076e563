"""`opd bench-xtok`: what scoring across tokenizers costs, against the native path.

    opd bench-xtok --teacher-url http://localhost:8000                 # SmolLM2 student & teacher
    opd bench-xtok --teacher-url URL --cross-teacher-url http://gemma:8000

Each step the student samples one batch of rollouts (the embedded SmolLM2, or --student), and
the very same rollouts are scored on the same-tokenizer teacher twice, alternating which goes
first: natively (the student's ids) and through the cross-tokenizer path forced on that teacher
(`--cross-tokenizer always`: decode, render with the teacher's template, re-tokenize, align,
translate back). The teacher and the numbers are the same, so the difference is the path's own
cost. With --cross-teacher-url, a teacher of another tokenizer scores them as well (its time
includes its own model, so only its alignment time and bytes compare).

Per path and step: alignment time (rendering, aligning and translating back, on the trainer's
thread), the score request's wall time, its msgpack request size, teacher positions scored,
the student tokens in one-to-one chunks, and the rollouts that are one-to-one throughout (the
teacher's encoding of their text is the sampled ids). Medians over steps; ratios against
native. The forced path's token log-probs must equal the native ones up to a rollout's first
chunk of several tokens, where the teacher still sees the student's own ids (checked before
anything is reported; after it, the teacher conditions on its own encoding of the text, so a
sampled non-canonical split can move its numbers). Results: a table on stdout, JSON +
markdown in out_dir.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

COLUMNS = (
    "path",
    "align ms / step",
    "score ms / step",
    "request KB / step",
    "teacher positions",
    "student positions",
    "one-to-one",
    "whole rollouts one-to-one",
    "align+score vs native",
    "bytes vs native",
)


class BenchXtokConfig(BaseModel):
    """Every knob of `opd bench-xtok` (its flags are generated from these fields)."""

    model_config = ConfigDict(extra="forbid")

    student: str | None = Field(default=None, description="student folder; default: SmolLM2")
    teacher_url: str = Field(description="a teacher of the student's tokenizer")
    cross_teacher_url: str | None = Field(
        default=None, description="a teacher of another tokenizer (optional)"
    )
    prompts: str = Field(default="shipped", description="prompt set (as opd train's --prompts)")
    prompts_per_step: int = Field(default=8, ge=1)
    max_new_tokens: int = Field(default=64, ge=1)
    steps: int = Field(default=3, ge=1, description="steps measured (medians reported)")
    top_k: int = Field(default=16, ge=1, description="student candidates and teacher top-k")
    seed: int = Field(default=0, ge=0)
    out_dir: str = Field(default="bench-results", description="where JSON + markdown go")


def _measure(bridge: Any, rollouts: list[Any], spec: Any) -> tuple[list[Any], dict[str, float]]:
    """Score copies of `rollouts` on one bridge: its alignment and score wall time, and the
    request's msgpack size and scored positions."""
    from opd.client.train.bridge import rollouts_request
    from opd.shared.codec import encode_request_msgpack
    from opd.shared.schemas import ScoreOptions

    copies = [replace(r) for r in rollouts]
    if bridge.cross is None:
        request = rollouts_request(copies, spec)
    else:
        options = ScoreOptions(top_k=spec.top_k, entropy=spec.entropy)
        request, _ = bridge.cross.request(copies, options, spec.candidates)
    align0, busy0 = bridge.align_s, bridge.busy_s
    started = time.perf_counter()
    scored = bridge.submit(copies, spec).result()
    wall = time.perf_counter() - started
    one = [r.one_to_one_T for r in scored if r.one_to_one_T is not None]
    whole = _canonical(scored) if one else 1.0
    return scored, {
        "whole_rollouts_one_to_one": whole,
        "align_s": bridge.align_s - align0,
        "score_s": bridge.busy_s - busy0,
        "wall_s": wall,
        "request_bytes": float(len(encode_request_msgpack(request))),
        "teacher_positions": float(int(request.n_scored_n.sum())),
        "student_positions": float(sum(r.completion_len for r in scored)),
        "one_to_one": float(np.concatenate(one).mean()) if one else 1.0,
    }


def _check(native: list[Any], forced: list[Any]) -> float:
    """The forced cross path's token log-probs equal the native ones where the teacher saw the
    student's own ids: up to the first chunk of several tokens (after one, the teacher's ids of
    the context are its own encoding of the text, which a sampled non-canonical split differs
    from, and so may its numbers). Returns the max |difference| there; beyond float noise the
    bench stops."""
    worst = 0.0
    for a, b in zip(native, forced, strict=True):
        split = np.flatnonzero(~b.one_to_one_T)
        upto = int(split[0]) if split.size else len(b.one_to_one_T)
        diff = np.abs(a.teacher_token_logp_T[:upto] - b.teacher_token_logp_T[:upto])
        worst = max(worst, float(diff.max()) if diff.size else 0.0)
    if worst > 1e-3:
        raise RuntimeError(f"the cross path's numbers differ from the native ones by {worst}")
    return worst


def _canonical(scored: list[Any]) -> float:
    """The share of rollouts whose every chunk is one token on both sides: the teacher's
    encoding of the text is the student's sampled ids."""
    return float(np.mean([bool(r.one_to_one_T.all()) for r in scored]))


def run_bench_xtok(cfg: BenchXtokConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    import torch

    from opd.client.configs.groups import SamplingGroup, StudentRuntime
    from opd.client.train.bridge import ScoreSpec, TeacherBridge
    from opd.client.train.cross_tokenizer import CrossSetup, conversations, cross_connect
    from opd.client.train.factory import build_student
    from opd.client.train.prompts import load_prompts
    from opd.client.train.rollouts import StepSampler
    from opd.modeling.embedded import embedded_model_dir
    from opd.shared.chat import chat_prompt_ids

    torch.manual_seed(cfg.seed)
    student_dir = cfg.student or str(embedded_model_dir())
    prompts = load_prompts(cfg.prompts)
    spec = ScoreSpec(top_k=cfg.top_k, candidates=True, entropy=True)
    paths: dict[str, Any] = {}
    with build_student(student_dir, StudentRuntime(), seed=cfg.seed) as built:
        fingerprint = built.fingerprint()
        setup = CrossSetup("always", built.tokenizer, conversations(prompts))
        paths["native"] = TeacherBridge([cfg.teacher_url])
        paths["cross, same teacher"] = TeacherBridge([cfg.teacher_url])
        for bridge in paths.values():
            bridge.connect()
        info = paths["cross, same teacher"].connect()
        cross_connect(paths["cross, same teacher"], info, setup, fingerprint)
        if cfg.cross_teacher_url:
            other = TeacherBridge([cfg.cross_teacher_url])
            other_info = other.connect()
            auto = replace(setup, mode="auto")
            if cross_connect(other, other_info, auto, fingerprint) is None:
                raise ValueError("cross_teacher_url: that teacher shares the student's tokenizer")
            paths[f"cross, {other_info.name}"] = other
        params = built.sampling(SamplingGroup(n=1, max_tokens=cfg.max_new_tokens, temperature=1.0))
        rows: dict[str, list[dict[str, float]]] = {name: [] for name in paths}
        worst = 0.0
        try:
            for step in range(cfg.steps):
                start = step * cfg.prompts_per_step
                indices = [i % len(prompts) for i in range(start, start + cfg.prompts_per_step)]
                batch = [(i, chat_prompt_ids(built.tokenizer, prompts[i])) for i in indices]
                sampler = StepSampler(built.engine, built.module, batch, params, cfg.top_k)
                with torch.no_grad():
                    rollouts = sampler(indices)
                order = list(paths) if step % 2 == 0 else list(reversed(paths))
                scored: dict[str, list[Any]] = {}
                for name in order:
                    scored[name], measured = _measure(paths[name], rollouts, spec)
                    rows[name].append(measured)
                worst = max(worst, _check(scored["native"], scored["cross, same teacher"]))
                log(f"step {step + 1}/{cfg.steps}: {len(rollouts)} rollouts scored on every path")
        finally:
            for bridge in paths.values():
                bridge.close()
    report = _report(cfg, rows, worst, student_dir)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = out / f"bench-xtok-{stamp}.json"
    path.write_text(json.dumps(report, indent=1))
    (out / f"bench-xtok-{stamp}.md").write_text(markdown_table(report))
    report["path"] = str(path)
    return report


def _report(
    cfg: BenchXtokConfig, rows: dict[str, list[dict[str, float]]], worst: float, student: str
) -> dict[str, Any]:
    medians = {
        name: {key: statistics.median(r[key] for r in steps) for key in steps[0]}
        for name, steps in rows.items()
    }
    native = medians["native"]
    for m in medians.values():
        m["time_ratio"] = (m["align_s"] + m["score_s"]) / (native["align_s"] + native["score_s"])
        m["bytes_ratio"] = m["request_bytes"] / native["request_bytes"]
    return {
        "config": cfg.model_dump(),
        "student": student,
        "paths": medians,
        "steps": rows,
        "max_abs_diff_own_ids": worst,
    }


def table_rows(report: dict[str, Any]) -> list[list[str]]:
    """One row per path, in COLUMNS order: the terminal's table and the markdown's."""
    return [
        [
            name,
            f"{m['align_s'] * 1e3:.1f}",
            f"{m['score_s'] * 1e3:.0f}",
            f"{m['request_bytes'] / 1e3:.1f}",
            f"{m['teacher_positions']:.0f}",
            f"{m['student_positions']:.0f}",
            f"{m['one_to_one']:.3f}",
            f"{m['whole_rollouts_one_to_one']:.2f}",
            f"{m['time_ratio']:.2f}x",
            f"{m['bytes_ratio']:.2f}x",
        ]
        for name, m in report["paths"].items()
    ]


def markdown_table(report: dict[str, Any]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|---|" + "---:|" * (len(COLUMNS) - 1)]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(report)]
    return "\n".join(lines) + "\n"
