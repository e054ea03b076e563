"""`opd eval`: does the student answer more questions right? Accuracy on a set with answers.

    opd eval --data task:arithmetic --student runs/student                  # one student
    opd eval --data qa.jsonl --answer-field solution --verifier math \\
        --student runs/student --student runs/opd --teacher http://127.0.0.1:8000 \\
        --n 4 --temperature 1.0                                              # before/after/teacher

Every source answers the same questions with the same seeds (prompt i samples with seed + i):
students (a model folder, a run checkpoint or a run dir: its latest checkpoint) through a
rollout engine, teachers through their service's POST /v1/generate. Per source: mean@n and
pass@k with a 95% interval, extraction failures (answers the verifier could not find) and the
truncation rate; with two or more students and a teacher, the gap recovery rate of each later
student over the first: (acc_after - acc_before) / (acc_teacher - acc_before).

Writes OUT_DIR/eval.json (the summary and the config) and OUT_DIR/<source>.jsonl (every
prompt's completions, extracted answers and verdicts).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from opd.client.configs.evaluate import EvalConfig
from opd.client.train.metric_log import finite_json
from opd.shared.config_cli import replayable

EVAL_VERSION = 1


def run_eval(config: EvalConfig, log=print) -> dict[str, Any]:  # noqa: ANN001
    """Evaluate every source on the same items; write eval.json and per-prompt files."""
    from opd.client.evaluation.data import load_eval_set
    from opd.client.evaluation.run import evaluate
    from opd.client.evaluation.sources import EngineSource, TeacherSource
    from opd.client.evaluation.stats import gap_recovery
    from opd.client.evaluation.verifiers import load_verifier
    from opd.client.recipes.probe import safe_name

    started = time.perf_counter()
    options = config.eval
    verifier = load_verifier(options.verifier)
    items = load_eval_set(
        config.data, options.prompt_field, options.answer_field, options.limit, config.seed
    )
    params = config.sampling.options(seed=config.seed)
    episodes = _Episodes(config, items) if config.episodes.env is not None else None
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sources: list[dict[str, Any]] = []
    labels = _labels(config)
    plan: list[tuple[str, str, Any]] = [
        ("student", label, s) for label, s in zip(labels["students"], config.students, strict=True)
    ]
    plan += [
        ("teacher", label, t) for label, t in zip(labels["teachers"], config.teachers, strict=True)
    ]
    for kind, label, what in plan:
        t0 = time.perf_counter()
        log(f"{kind} {label}: {len(items)} prompts x {params.n}")
        if kind == "student":
            source = EngineSource.from_model_dir(what, config.student, seed=config.seed)
        else:
            source = TeacherSource.connect(what.urls, config.connection.api_key)
        if episodes is not None:
            source = episodes.source(source, label)
        try:
            result = evaluate(
                items,
                source,
                verifier,
                params,
                k=config.k,
                interval=config.interval,
                prompts=None if episodes is None else episodes.rows,
                on_chunk=lambda done, total: log(f"  {done}/{total}"),
            )
        finally:
            source.close()
        per_prompt = out / f"{safe_name(label)}.jsonl"
        result.write(per_prompt)
        sources.append(
            {
                "kind": kind,
                "label": label,
                "path": what if kind == "student" else ",".join(what.urls),
                "summary": result.summary,
                "per_prompt": per_prompt.name,
                "seconds": round(time.perf_counter() - t0, 1),
            }
        )
    students = [s for s in sources if s["kind"] == "student"]
    teachers = [s for s in sources if s["kind"] == "teacher"]
    recovery = []
    if len(students) >= 2 and teachers:
        before, teacher = students[0], teachers[0]
        for after in students[1:]:
            recovery.append(
                {
                    "before": before["label"],
                    "after": after["label"],
                    "teacher": teacher["label"],
                    "gap_recovery": gap_recovery(
                        before["summary"]["mean_at_n"],
                        after["summary"]["mean_at_n"],
                        teacher["summary"]["mean_at_n"],
                    ),
                }
            )
    report = {
        "version": EVAL_VERSION,
        "data": config.data,
        "items": len(items),
        "sources": sources,
        "gap_recovery": recovery,
        "seconds": round(time.perf_counter() - started, 1),
        "config": replayable(config),
    }
    (out / "eval.json").write_text(json.dumps(finite_json(report), indent=1))
    return report


class _Episodes:
    """--env: every source plays the environment on the items' data rows; students with the
    first student's tokenizer, a teacher of that tokenizer too, one of another tokenizer in its
    own tokenizer and chat template (--cross-tokenizer auto; episode_source.teacher_player)."""

    def __init__(self, config: EvalConfig, items: list[Any]) -> None:
        from transformers import AutoTokenizer

        from opd.client.evaluation.episode_source import EpisodePlayer
        from opd.client.evaluation.sources import resolve_model_dir
        from opd.client.train.episodes import EpisodeSetup
        from opd.client.train.prompts import load_rows
        from opd.shared.fingerprint import fingerprint_hf_tokenizer

        rows, _ = load_rows(config.data)
        self.rows = [rows[it.index] for it in items]
        self.config = config
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(config.students[0]))
        self.fingerprint = fingerprint_hf_tokenizer(tokenizer)
        setup = EpisodeSetup.of(config.episodes, tokenizer)
        assert setup is not None
        self.student = EpisodePlayer(tokenizer, setup)

    def source(self, inner: Any, label: str) -> Any:
        from opd.client.evaluation.episode_source import (
            EpisodeSource,
            TeacherEngine,
            teacher_player,
        )
        from opd.client.evaluation.sources import EngineSource

        if isinstance(inner, EngineSource):
            setup = self.student.setup
            return EpisodeSource(inner.engine, inner.tokenizer, setup, label, [inner])
        try:
            info = inner.client.connect()
            player = teacher_player(
                inner.client,
                label,
                info.tokenizer_fingerprint == self.fingerprint,
                self.config.connection.cross_tokenizer,
                self.config.episodes,
                self.student,
            )
        except Exception:
            inner.close()
            raise
        # the teacher's episodes are its ids: decoded and parsed with the tokenizer it played in
        return EpisodeSource(
            TeacherEngine(inner.client), player.tokenizer, player.setup, label, [inner]
        )


def _labels(config: EvalConfig) -> dict[str, list[str]]:
    """Unique display names: a student's folder name, a teacher's NAME or first URL."""
    seen: dict[str, int] = {}

    def unique(name: str) -> str:
        seen[name] = seen.get(name, 0) + 1
        return name if seen[name] == 1 else f"{name}-{seen[name]}"

    return {
        "students": [unique(Path(s).name or s) for s in config.students],
        "teachers": [unique(t.name or t.urls[0]) for t in config.teachers],
    }


def print_eval(report: dict[str, Any], console) -> None:  # noqa: ANN001
    """The table: one row per source, then the gap recovery rates."""
    from rich.table import Table

    n = report["config"]["sampling"]["n"]
    k = report["config"]["k"] or n
    table = Table(title=f"opd eval: {report['data']} ({report['items']} prompts, n={n})")
    for col in (
        "source",
        f"mean@{n}",
        "95% CI",
        f"pass@{k}",
        "95% CI",
        "no answer",
        "truncated",
        "s",
    ):
        table.add_column(col, justify="left" if col == "source" else "right")
    for s in report["sources"]:
        m = s["summary"]
        table.add_row(
            f"{s['kind']} {s['label']}",
            f"{m['mean_at_n']:.3f}",
            _ci(m.get("mean_at_n_interval")),
            f"{m['pass_at_k']:.3f}",
            _ci(m.get("pass_at_k_interval")),
            f"{m['extraction_failures']} ({m['extraction_failure_rate']:.1%})",
            f"{m['truncated_rate']:.1%}",
            f"{s['seconds']:.0f}",
        )
    console.print(table)
    for g in report["gap_recovery"]:
        value = g["gap_recovery"]
        shown = "n/a (teacher no better than before)" if value != value else f"{value:.1%}"
        console.print(
            f"gap recovery {g['before']} -> {g['after']} (teacher {g['teacher']}): {shown}"
        )


def _ci(ci: Any) -> str:
    if not ci or ci[0] is None or ci[0] != ci[0]:
        return "-"
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]"
