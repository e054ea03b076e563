"""Multi-teacher OPD with real teacher processes: two `opd serve` on different models (the tiny
model, and the tiny student's perturbed copy of it, both with the same tokenizer); one test also
runs the real pair, the embedded SmolLM2 and a 24-layer subset of it.

- routing by a prompt column and by a per-teacher prompt file;
- each teacher's logged diagnostics equal what a single-teacher run computes on the same
  rollouts, re-scored by that teacher alone (so every rollout went to its own teacher);
- an unroutable prompt and a teacher with another tokenizer are refused before step 1,
  naming the prompt / the teacher;
- a resumed multi-teacher run matches an uninterrupted one;
- one teacher's replica SIGKILLed mid-run: the run finishes with the same metrics.
"""

from __future__ import annotations

import json
import shutil
import signal
import threading
from pathlib import Path

import pytest

from opd.client.teacher.errors import IncompatibleTeacherError
from opd.client.teacher.launch import LocalTeacher
from opd.client.train.bridge import TeacherBridge
from opd.client.train.metric_log import read_metrics
from opd.client.train.positions import PositionStats
from opd.client.train.prompts import load_rows, shipped_prompts_path
from opd.client.train.rollout_store import read_rollouts
from opd.client.train.routing import UnroutablePrompts, training_prompts
from opd.client.train.trainer import Trainer, score_spec, step_diagnostics
from tests.support.train_config import train_config

_TIMING = ("time/", "throughput/")


@pytest.fixture(scope="module")
def two_teachers(tiny_model_dir, tiny_student_dir, tmp_path_factory):
    """`math` serves the tiny model, `code` the tiny student's weights (another model)."""
    logs = tmp_path_factory.mktemp("multi-logs")
    math = LocalTeacher(str(tiny_model_dir), log_path=logs / "math.log")
    code = LocalTeacher(str(tiny_student_dir), log_path=logs / "code.log")
    urls = {"math": math.start(), "code": code.start()}
    yield urls
    math.stop()
    code.stop()


def _prompts_with_teachers(path: Path, names: tuple[str, str] = ("math", "code")) -> Path:
    """The shipped prompts, alternately routed to the two teachers by a `teacher` column."""
    rows, _ = load_rows(str(shipped_prompts_path()))
    with path.open("w") as f:
        for i, row in enumerate(rows):
            f.write(json.dumps({**row, "teacher": names[i % 2]}) + "\n")
    return path


def _config(student, urls: dict[str, str], run_dir: Path, **extra):
    values = dict(
        teacher_url=[],
        teacher=[f"{name}={url}" for name, url in urls.items()],
        save_rollouts=True,
        max_steps=2,
        prompts_per_step=4,
        seed=7,
    )
    values.update(extra)
    return train_config(student, "unused", run_dir, **values)


def _assert_same(expected: list[dict], got: list[dict]) -> None:
    assert [m["step"] for m in got] == [m["step"] for m in expected]
    for a, b in zip(expected, got, strict=True):
        for key, value in a.items():
            if key.startswith(_TIMING) or value is None:
                continue
            assert b[key] == pytest.approx(value, rel=1e-4, abs=1e-6, nan_ok=True), (
                a["step"],
                key,
            )


def test_each_teacher_scores_its_own_prompts_and_its_diagnostics_match_a_solo_run(
    two_teachers, tiny_student_dir, tmp_path
):
    _check_each_teacher_matches_a_solo_run(two_teachers, tiny_student_dir, tmp_path, steps=2)


def test_the_embedded_smollm2_and_a_layer_subset_of_it_as_two_teachers(
    smol_server, smol_student_server, tiny_student_dir, tmp_path
):
    """The issue's pair of real models: SmolLM2-135M (30 layers) and its 24-layer subset, each
    a teacher of its own prompts (the student shares their tokenizer)."""
    urls = {"math": smol_server, "code": smol_student_server}
    _check_each_teacher_matches_a_solo_run(urls, tiny_student_dir, tmp_path, steps=1)


def _check_each_teacher_matches_a_solo_run(
    urls: dict[str, str], student: Path, tmp_path: Path, steps: int
) -> None:
    prompts = _prompts_with_teachers(tmp_path / "prompts.jsonl")
    config = _config(student, urls, tmp_path / "run", prompts=str(prompts), max_steps=steps)
    with Trainer(config) as trainer:
        history = trainer.run()
    _, owners = training_prompts(config)
    assert owners is not None and set(owners) == {"math", "code"}
    logged = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert len(history) == steps
    spec = score_spec(config)
    for step in range(1, steps + 1):
        record = next(m for m in logged if m["step"] == step)
        saved = [s.rollout for s in read_rollouts(tmp_path / "run", [step])]
        shares = {n: record[f"teacher/{n}/token_share"] for n in ("math", "code")}
        assert sum(shares.values()) == pytest.approx(1.0)
        for name, url in urls.items():
            mine = [r for r in saved if owners[r.prompt_index] == name]
            if not mine:
                assert shares[name] == 0
                continue
            for r in mine:  # forget the run's scores; ask this teacher alone
                r.teacher_token_logp_T = r.teacher_cand_logp_TK = None
                r.teacher_topk_ids_Tk = r.teacher_topk_logp_Tk = r.teacher_entropy_T = None
            bridge = TeacherBridge([url])
            try:
                bridge.connect()
                solo = bridge.submit(mine, spec).result()
            finally:
                bridge.close()
            alone = step_diagnostics(PositionStats.from_rollouts(solo), config)
            for key, value in alone.items():
                got = record[f"teacher/{name}/{key}"]  # the log writes NaN as null
                assert (float("nan") if got is None else got) == pytest.approx(
                    value, rel=1e-4, abs=1e-6, nan_ok=True
                ), (step, name, key)


def test_routing_by_file_and_rule(two_teachers, tiny_student_dir, tmp_path):
    rows, _ = load_rows(str(shipped_prompts_path()))
    math_file = tmp_path / "math.jsonl"
    math_file.write_text("".join(json.dumps(r) + "\n" for r in rows[:5]))
    by_domain = tmp_path / "domain.jsonl"
    by_domain.write_text("".join(json.dumps({**r, "domain": "python"}) + "\n" for r in rows[5:9]))
    config = _config(
        tiny_student_dir,
        two_teachers,
        tmp_path / "run",
        prompts=str(by_domain),
        teacher_field="domain",
        route=["python=code"],
        teacher_prompts=[f"math={math_file}"],
    )
    texts, owners = training_prompts(config)
    assert owners == ["code"] * 4 + ["math"] * 5
    assert texts[:4] == [r["prompt"] for r in rows[5:9]]


def test_an_unroutable_prompt_is_refused_before_step_1(two_teachers, tiny_student_dir, tmp_path):
    prompts = _prompts_with_teachers(tmp_path / "prompts.jsonl")
    lines = prompts.read_text().splitlines()
    lines[3] = json.dumps({"prompt": "who teaches me?", "teacher": "chat"})
    prompts.write_text("\n".join(lines) + "\n")
    config = _config(tiny_student_dir, two_teachers, tmp_path / "run", prompts=str(prompts))
    with pytest.raises(UnroutablePrompts, match=r"#3 \(teacher='chat'\)"):
        Trainer(config)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_teacher_with_another_tokenizer_is_refused_by_name(
    two_teachers, tiny_model_dir, tiny_student_dir, tmp_path
):
    other = tmp_path / "other-tokenizer"
    shutil.copytree(tiny_model_dir, other)
    tokenizer = json.loads((other / "tokenizer.json").read_text())
    tokenizer["added_tokens"].append(
        {
            "id": max(t["id"] for t in tokenizer["added_tokens"]) + 1,
            "content": "<|opd-other|>",
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
    )
    (other / "tokenizer.json").write_text(json.dumps(tokenizer))
    with LocalTeacher(str(other), log_path=tmp_path / "other.log") as other_url:
        urls = {"math": two_teachers["math"], "chat": other_url}
        prompts = _prompts_with_teachers(tmp_path / "prompts.jsonl", ("math", "chat"))
        config = _config(tiny_student_dir, urls, tmp_path / "run", prompts=str(prompts))
        with pytest.raises(IncompatibleTeacherError, match="teacher 'chat'"):
            Trainer(config)


def test_a_resumed_multi_teacher_run_matches_an_uninterrupted_one(
    two_teachers, tiny_student_dir, tmp_path
):
    prompts = str(_prompts_with_teachers(tmp_path / "prompts.jsonl"))
    common = dict(prompts=prompts, max_steps=4, checkpoint_every=2, save_rollouts=False)
    with Trainer(_config(tiny_student_dir, two_teachers, tmp_path / "full", **common)) as t:
        t.run()
    half = _config(tiny_student_dir, two_teachers, tmp_path / "half", **{**common, "max_steps": 2})
    with Trainer(half) as t:
        t.run()
    resumed = half.model_copy(update={"max_steps": 4, "resume": "latest"})
    with Trainer(resumed) as t:
        assert t.step == 2
        t.run()
    _assert_same(
        read_metrics(tmp_path / "full" / "metrics.jsonl"),
        read_metrics(tmp_path / "half" / "metrics.jsonl"),
    )


def test_a_teachers_replica_dies_mid_run_and_the_run_matches_a_calm_one(
    two_teachers, tiny_model_dir, tiny_student_dir, tmp_path
):
    prompts = str(_prompts_with_teachers(tmp_path / "prompts.jsonl"))
    spare = LocalTeacher(str(tiny_model_dir), log_path=tmp_path / "spare.log")
    spare_url = spare.start()
    try:
        urls = {"math": f"{two_teachers['math']},{spare_url}", "code": two_teachers["code"]}
        calm = _config(tiny_student_dir, urls, tmp_path / "calm", prompts=prompts, max_steps=3)
        with Trainer(calm) as t:
            t.run()
        killer = threading.Timer(0.3, lambda: spare.process.send_signal(signal.SIGKILL))

        def kill_during_step_2(step: int, metrics: dict) -> None:
            if step == 1:
                killer.start()

        hit = calm.model_copy(update={"run_dir": str(tmp_path / "hit")})
        with Trainer(hit) as t:
            t.run(on_step=kill_during_step_2)
        killer.join()
        assert spare.process is not None and spare.process.wait(10) == -signal.SIGKILL
    finally:
        spare.stop()
    _assert_same(
        read_metrics(tmp_path / "calm" / "metrics.jsonl"),
        read_metrics(tmp_path / "hit" / "metrics.jsonl"),
    )
