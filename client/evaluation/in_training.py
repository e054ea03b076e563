"""Accuracy over training (`opd train --eval-set FILE --eval-every N`).

Before step 1 the student is evaluated once (acc_before), the teacher once (acc_teacher,
through POST /v1/generate, cached in RUN_DIR/eval_teacher.json so a resumed run does not measure
it again), then the student every `eval_every` steps and after the last. Each evaluation logs

    eval/accuracy (mean@n) with eval/accuracy_lo, eval/accuracy_hi (Wilson 95%),
    eval/pass_at_n, eval/extraction_failure_rate, eval/truncated_rate,
    eval/teacher_accuracy, eval/gap_recovery = (acc - acc_before) / (acc_teacher - acc_before)

into the step's metrics, and appends the same line to RUN_DIR/eval.jsonl (with step 0, the
before line, which has no training step to ride on); `opd report` plots it. Per-prompt results
go to RUN_DIR/eval/step_N.jsonl.

The student samples with the trainer's own rollout engine (current weights, no copy) and fixed
seeds, so evaluation never moves the training RNG streams. Under torchrun every rank answers an
equal share of the questions (padded with repeats that are not counted, so collective forwards
under FSDP stay in step) and the counts are summed; the per-prompt file then holds rank 0's
share, as saved rollouts do.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from opd.client.evaluation.data import load_eval_set
from opd.client.evaluation.run import evaluate
from opd.client.evaluation.sources import EngineSource, TeacherSource
from opd.client.evaluation.stats import gap_recovery, wilson_interval
from opd.client.evaluation.verifiers import load_verifier
from opd.client.train.metric_log import finite_json

if TYPE_CHECKING:
    from opd.client.configs.train import TrainConfig
    from opd.client.train.distributed import DistInfo
    from opd.client.train.engines import RolloutEngine


class TrainingEval:
    def __init__(
        self,
        config: TrainConfig,
        engine: RolloutEngine,
        tokenizer,  # noqa: ANN001
        dist: DistInfo,
        run_dir: Path,
    ) -> None:
        options = config.eval
        assert options.data is not None
        self.config, self.options, self.dist, self.run_dir = config, options, dist, run_dir
        self.items = load_eval_set(
            options.data,
            options.prompt_field,
            options.answer_field,
            options.limit,
            config.seed,
        )
        self.verifier = load_verifier(options.verifier)
        self.params = options.sampling.options(seed=config.seed)
        self.source: Any = EngineSource(engine, tokenizer)
        # --env: the questions are played as episodes of the run's environment, graded by its
        # reward (opd.client.evaluation.episode_source), the teacher through /v1/generate
        from opd.client.train.episodes import EpisodeSetup

        self.episodes = EpisodeSetup.of(config.episodes, tokenizer)
        self.rows: list[dict] | None = None
        if self.episodes is not None:
            from opd.client.evaluation.episode_source import EpisodeSource
            from opd.client.train.prompts import load_rows

            rows, _ = load_rows(options.data)
            self.rows = [rows[it.index] for it in self.items]
            self.source = EpisodeSource(engine, tokenizer, self.episodes, "student")
        self.tokenizer = tokenizer
        self.path = run_dir / "eval.jsonl"
        self.before: float | None = None
        self.teacher: float | None = None

    def due(self, step: int, last: bool) -> bool:
        return last or step % self.options.every == 0

    def start(self, step: int, teacher_urls: list[str], api_key: str | None) -> None:
        """Before training (step 0) or on resume: acc_before and acc_teacher, measured or read."""
        if self.dist.is_main and self.options.teacher:
            self.teacher = self._teacher_accuracy(teacher_urls, api_key)
        lines = self._read_lines()
        if step == 0:
            self.path.unlink(missing_ok=True)
            line = self.measure(0)
            self.before = line["accuracy"]
        else:  # resumed: drop evaluations of steps that will be redone, keep the before line
            kept = [ln for ln in lines if ln["step"] <= step]
            if self.dist.is_main:
                self.path.write_text("".join(json.dumps(ln) + "\n" for ln in kept))
            before = [ln for ln in kept if ln["step"] == 0]
            self.before = before[0]["accuracy"] if before else None

    def measure(self, step: int) -> dict[str, Any]:
        """Evaluate the current student; returns (and on rank 0 appends) the eval.jsonl line."""
        t0 = time.perf_counter()
        world, rank = self.dist.world_size, self.dist.rank
        share = list(range(rank, len(self.items), world))
        width = -(-len(self.items) // world)
        padded = share + share[:1] * (width - len(share))  # equal calls on every rank
        result = evaluate(
            [self.items[i] for i in padded],
            self.source,
            self.verifier,
            self.params,
            prompts=None if self.rows is None else [self.rows[i] for i in padded],
        )
        counted = result.prompts[: len(share)]
        from opd.client.train.distributed import all_sum

        sums = {
            "correct": sum(p.outcome.c for p in counted),
            "samples": sum(p.outcome.n for p in counted),
            "passed": sum(p.outcome.c > 0 for p in counted),
            "no_answer": sum(p.outcome.n_extraction_failures for p in counted),
            "truncated": sum(c.truncated for p in counted for c in p.completions),
        }
        total = {k: all_sum(float(v), self.dist) for k, v in sums.items()}
        acc = total["correct"] / total["samples"]
        lo, hi = wilson_interval(int(total["correct"]), int(total["samples"]))
        line: dict[str, Any] = {
            "step": step,
            "accuracy": acc,
            "accuracy_lo": lo,
            "accuracy_hi": hi,
            "pass_at_n": total["passed"] / len(self.items),
            "extraction_failure_rate": total["no_answer"] / total["samples"],
            "truncated_rate": total["truncated"] / total["samples"],
            "prompts": len(self.items),
            "samples": int(total["samples"]),
            "seconds": time.perf_counter() - t0,
        }
        if self.teacher is not None:
            line["teacher_accuracy"] = self.teacher
            before = acc if step == 0 else self.before
            if before is not None:
                line["gap_recovery"] = gap_recovery(before, acc, self.teacher)
        if self.dist.is_main:
            result.prompts = counted
            result.write(self.run_dir / "eval" / f"step_{step}.jsonl")
            with self.path.open("a") as f:
                f.write(json.dumps(finite_json(line)) + "\n")
        return line

    def metrics(self, line: dict[str, Any]) -> dict[str, float]:
        """The eval.jsonl line as step metrics (eval/...)."""
        skip = {"step", "prompts", "samples", "seconds"}
        out = {f"eval/{k}": float(v) for k, v in line.items() if k not in skip}
        out["time/eval_s"] = float(line["seconds"])
        return out

    def _teacher_accuracy(self, urls: list[str], api_key: str | None) -> float:
        cache = self.run_dir / "eval_teacher.json"
        key = {
            "eval_set": self.options.data,
            "items": len(self.items),
            "verifier": self.options.verifier,
            "params": self.params.model_dump(),
            "teacher_url": urls,
            "episodes": self.config.episodes.model_dump(),
        }
        if cache.is_file():
            saved = json.loads(cache.read_text())
            if saved.get("key") == key:
                return float(saved["accuracy"])
        source: Any = TeacherSource.connect(urls, api_key)
        if self.episodes is not None:  # the teacher plays in its own tokenizer where it has one
            from opd.client.evaluation.episode_source import (
                EpisodePlayer,
                EpisodeSource,
                TeacherEngine,
                teacher_player,
            )
            from opd.shared.fingerprint import fingerprint_hf_tokenizer

            same = source.client.connect().tokenizer_fingerprint == fingerprint_hf_tokenizer(
                self.tokenizer
            )
            player = teacher_player(
                source.client,
                "teacher",
                same,
                self.config.teacher.cross_tokenizer,
                self.config.episodes,
                EpisodePlayer(self.tokenizer, self.episodes),
            )
            engine = TeacherEngine(source.client)
            source = EpisodeSource(engine, player.tokenizer, player.setup, "teacher", [source])
        try:
            result = evaluate(self.items, source, self.verifier, self.params, prompts=self.rows)
        except Exception as exc:
            raise RuntimeError(
                f"eval_teacher: measuring the teacher's accuracy through POST /v1/generate "
                f"failed ({type(exc).__name__}: {exc}); start the teacher with generation on "
                "(OPD_GENERATE=true) or pass --no-eval-teacher (then no gap recovery rate)"
            ) from exc
        finally:
            source.close()
        cache.write_text(
            json.dumps(
                {"key": key, "accuracy": result.accuracy, "summary": finite_json(result.summary)}
            )
        )
        result.write(self.run_dir / "eval" / "teacher.jsonl")
        return result.accuracy

    def _read_lines(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        return [json.loads(ln) for ln in self.path.read_text().splitlines() if ln.strip()]
