"""`opd coldstart`: the filters on constructed responses, the split and the SFT schedule, then
the whole recipe end to end on the embedded SmolLM2 (teacher) and its 24-layer student."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from opd.client.cli import app
from opd.client.recipes.coldstart import split_prompts
from opd.client.recipes.coldstart_filters import (
    FilterConfig,
    distinct_ngram_ratio,
    filter_rows,
    rejection_reason,
    repeated_tail,
)
from opd.client.recipes.sft import SFTConfig, lr_factor

CFG = FilterConfig()
RNG = np.random.default_rng(0)
NATURAL = [int(t) for t in RNG.integers(100, 40000, size=200)]  # no loops, all n-grams distinct


def test_natural_response_is_kept():
    assert rejection_reason("The capital is Paris.", NATURAL, "stop", CFG) is None


@pytest.mark.parametrize(
    ("ids", "period"),
    [
        (NATURAL[:20] + [42] * 40, 1),  # "the the the ..."
        (NATURAL[:30] + NATURAL[50:57] * 6, 7),  # a repeated sentence, 42 tokens
        (NATURAL[:5] + NATURAL[60:124] * 3, 64),  # a repeated paragraph at the longest period
    ],
)
def test_loops_at_the_end_are_repetition(ids, period):
    assert repeated_tail(ids, CFG)[0] == period
    assert rejection_reason("text", ids, "stop", CFG) == "repetition"


def test_a_loop_before_a_stray_final_token_is_still_a_loop():
    assert repeated_tail(NATURAL[:20] + [42] * 40 + [13], CFG) == (1, 40)
    assert repeated_tail(NATURAL[:20] + [42] * 40 + [13, 14], CFG) == (1, 40)
    assert repeated_tail(NATURAL[:20] + [42] * 40 + NATURAL[:3], CFG) is None


def test_short_or_early_repeats_are_not_loops():
    assert repeated_tail(NATURAL[:20] + [42] * 10, CFG) is None  # 10 < 32 tokens
    assert repeated_tail([42] * 40 + NATURAL[:20], CFG) is None  # recovered: not at the end
    assert repeated_tail(NATURAL[:5] + NATURAL[60:125] * 3, CFG) is None  # period 65 > 64


def test_cycling_phrases_fail_the_distinct_ngram_ratio():
    phrases = [NATURAL[i * 6 : i * 6 + 6] for i in range(3)]
    order = np.random.default_rng(1).integers(0, 3, size=27)  # 3 phrases in a random order
    cycling = [t for k in order for t in phrases[k]] + NATURAL[:3]  # 165 tokens
    assert repeated_tail(cycling, CFG) is None  # no exact loop at the end
    assert distinct_ngram_ratio(cycling, 4) < CFG.min_distinct_ratio
    assert rejection_reason("text", cycling, "stop", CFG) == "repetition"
    assert distinct_ngram_ratio(NATURAL, 4) == 1.0


def test_reason_order_and_answer_pattern():
    boxed = FilterConfig(answer_pattern=r"\\boxed\{[^}]+\}")
    assert rejection_reason("   \n", NATURAL, "stop", boxed) == "empty"
    assert rejection_reason("x", NATURAL, "length", boxed) == "truncated"
    assert rejection_reason("so it is 4", NATURAL, "stop", boxed) == "no_answer"
    assert rejection_reason("so \\boxed{4}", NATURAL, "stop", boxed) is None
    with pytest.raises(ValueError, match="answer_pattern"):
        FilterConfig(answer_pattern="(unclosed")
    rows = [
        {"text": "ok", "content_ids": NATURAL, "finish_reason": "stop"},
        {"text": "cut", "content_ids": NATURAL, "finish_reason": "length"},
        {"text": "", "content_ids": [], "finish_reason": "stop"},
        {"text": "loop", "content_ids": [7] * 50, "finish_reason": "stop"},
    ]
    kept, rejected, counts = filter_rows(rows, CFG)
    assert [r["text"] for r in kept] == ["ok"]
    assert [r["reason"] for r in rejected] == ["truncated", "empty", "repetition"]
    assert counts == {
        "empty": 1, "truncated": 1, "repetition": 1, "no_answer": 0, "low_reward": 0, "kept": 1
    }  # fmt: skip
    # episodes: a reward below --min-reward (or none) is rejected, after the other reasons
    need = FilterConfig(min_reward=1.0)
    assert rejection_reason("12", NATURAL, "stop", need, reward=0.5) == "low_reward"
    assert rejection_reason("12", NATURAL, "stop", need, reward=None) == "low_reward"
    assert rejection_reason("12", NATURAL, "stop", need, reward=1.0) is None
    assert rejection_reason("12", NATURAL, "length", need, reward=0.0) == "truncated"


def test_split_is_disjoint_seeded_and_never_empty():
    sft, opd = split_prompts(10, 0.5, seed=1)
    assert len(sft) == 5 and sorted(sft + opd) == list(range(10))
    assert (sft, opd) == split_prompts(10, 0.5, seed=1)
    assert split_prompts(10, 0.5, seed=2) != (sft, opd)
    assert [len(x) for x in split_prompts(3, 0.99, 0)] == [2, 1]
    with pytest.raises(ValueError):
        split_prompts(1, 0.5, 0)


def test_sft_schedule_is_warmup_then_cosine():
    total, warmup = 100, 5
    f = [lr_factor(s, total, warmup, "cosine") for s in range(total)]
    assert f[0] == pytest.approx(0.2) and f[4] == pytest.approx(1.0)
    assert f[5] == pytest.approx(1.0) and f[-1] < 0.01
    assert all(a >= b for a, b in zip(f[5:], f[6:], strict=False))
    assert lr_factor(50, total, 0, "constant") == 1.0
    with pytest.raises(ValueError):
        SFTConfig(lr_schedule="linear")


def test_coldstart_end_to_end_on_the_embedded_default(smol_server, smol_student_dir, tmp_path):
    questions = [
        "What is the capital of France?",
        "Name three primary colours.",
        "What is 7 times 8?",
        "Give a synonym of happy.",
        "What colour is the sky?",
        "How many legs does a spider have?",
        "What is the opposite of cold?",
        "Name a fruit that is yellow.",
    ]
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"question": q}) + "\n" for q in questions))
    out = tmp_path / "cs"
    args = [
        "coldstart",
        "--student", str(smol_student_dir),
        "--teacher-url", smol_server,
        "--prompts", str(pool),
        "--prompt-field", "question",
        "--out-dir", str(out),
        "--max-tokens", "40",
        "--n", "2",
        "--sft-epochs", "3",
        "--sft-lr", "1e-4",
        "--sft-batch-size", "4",
        "--dataset-format", "parquet",
        "--opd-steps", "1",
        "--opd-max-new-tokens", "12",
        "--opd-objective", "sampled",
    ]  # fmt: skip
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "coldstart.json").read_text())
    split = json.loads((out / "split.json").read_text())
    sft_idx, opd_idx = split["sft_indices"], split["opd_indices"]
    assert len(sft_idx) == 4 and sorted(sft_idx + opd_idx) == list(range(8))
    opd_prompts = [json.loads(x)["prompt"] for x in (out / "opd_prompts.jsonl").open()]
    assert opd_prompts == [questions[i] for i in opd_idx]

    counts = summary["counts"]
    assert counts["responses"] == 8 and counts["prompts"] == 4
    reasons = ("empty", "truncated", "repetition", "no_answer", "too_long")
    assert counts["refused"] == 0  # every prompt fits the context
    assert counts["kept"] + sum(counts[r] for r in reasons) == 8
    assert counts["kept"] >= 1
    import pyarrow.parquet as pq

    data = pq.read_table(out / "sft_data.parquet").to_pylist()
    assert len(data) == counts["kept"]
    assert {r["prompt"] for r in data} <= {questions[i] for i in sft_idx}
    assert all(r["finish_reason"] == "stop" and r["token_ids"][-1] == 2 for r in data)
    rejected = [json.loads(x) for x in (out / "rejected.jsonl").open()]
    assert len(rejected) == 8 - counts["kept"]
    for r in rejected:
        assert counts[r["reason"]] >= 1
        if r["reason"] == "truncated":
            assert r["finish_reason"] == "length" and len(r["token_ids"]) == 40

    sft = summary["sft"]
    steps = [json.loads(x) for x in (out / "sft_metrics.jsonl").open()]
    assert len(steps) == sft["steps"] == 3 * -(-counts["kept"] // 4)
    raw = [json.loads(x) for x in (out / "teacher_responses.jsonl").open()]
    assert len(raw) == 8  # every answer saved as it arrived, kept or not
    assert "--objective sampled" in summary["opd"]["command"]
    # SFT imitates the teacher: its responses became more likely under the student
    assert sft["response_nll_after"] < sft["response_nll_before"] - 0.1
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(out / "student")
    assert student.config.num_hidden_layers == 24

    # OPD ran from the SFT-ed student on the held-out prompts only
    opd_cfg = json.loads((out / "opd" / "config.json").read_text())
    assert opd_cfg["student"]["model"] == str(out / "student")
    assert opd_cfg["data"]["prompts"] == str(out / "opd_prompts.jsonl")
    metrics = [json.loads(x) for x in (out / "opd" / "metrics.jsonl").open()]
    assert len(metrics) == 1 and np.isfinite(metrics[0]["kl/sampled"])
    # the report of a real cold start: SFT curve and filter counts
    from opd.client.report.build import build_report

    html = build_report(out)
    assert len(list(html.parent.glob("*.png"))) >= 2
    assert "truncated" in html.read_text()


def test_coldstart_with_an_environment_sfts_on_the_teachers_turns_only(
    smol_server, smol_student_dir, tmp_path
):
    # the teacher plays the follow-up environment; SFT learns its assistant turns and nothing
    # of the user turns; the OPD stage would play the same environment (its config and printed
    # command; the stage itself runs in the test above, and episodes in opd train's tests)
    out = tmp_path / "cs-env"
    args = [
        "coldstart",
        "--student", str(smol_student_dir),
        "--teacher-url", smol_server,
        "--prompts", "task:addition:eval",
        "--sft-fraction", "0.05",
        "--env", "followup", "--env-arg", "turns=2", "--max-turns", "2",
        "--out-dir", str(out),
        "--max-tokens", "12",
        "--temperature", "0",
        "--sft-batch-size", "4",
    ]  # fmt: skip
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "coldstart.json").read_text())
    assert "--env followup --env-arg turns=2 --max-turns 2" in summary["opd"]["command"]
    from opd.client.recipes.coldstart import opd_stage_config

    config = _coldstart_config(smol_student_dir, smol_server, out)
    stage = opd_stage_config(config, out / "student", out)
    assert stage.episodes.env == "followup" and stage.episodes.kwargs() == {"turns": 2}
    held_out = [json.loads(x) for x in (out / "opd_prompts.jsonl").open()]
    assert all("answer" in row for row in held_out)  # whole rows: the environment reads them
    counts = summary["counts"]
    raw = [json.loads(x) for x in (out / "teacher_responses.jsonl").open()]
    assert counts["responses"] == len(raw) == counts["prompts"] >= 2
    assert counts["kept"] >= 1
    from transformers import AutoTokenizer

    from opd.client.recipes.sft import Example, _batch

    tokenizer = AutoTokenizer.from_pretrained(smol_student_dir)
    data = [json.loads(x) for x in (out / "sft_data.jsonl").open()]
    for row in data:
        assert row["turns"] >= 1 and len(row["trained"]) == len(row["token_ids"])
        ids, trained = np.array(row["token_ids"]), np.array(row["trained"])
        # trained runs are the teacher's turns, each closed by its end-of-turn token; the rest
        # is the environment's user turns
        assert ids[trained][-1] == tokenizer.eos_token_id
        context = tokenizer.decode(ids[~trained].tolist())
        assert row["turns"] == 1 or "<|im_start|>user" in context
        _, _, labels = _batch(
            [Example(row["opening_ids"], row["token_ids"], row["trained"])], "cpu"
        )
        learned = labels[0, len(row["opening_ids"]) :]
        assert ((learned != -100).numpy() == trained).all()


def _coldstart_config(student, url, out):
    from opd.client.configs.coldstart import ColdstartConfig
    from opd.shared.config_cli import from_flags

    return from_flags(
        ColdstartConfig, student=str(student), teacher_url=[url], prompts="task:addition:eval",
        env="followup", env_arg=["turns=2"], max_turns=2, out_dir=str(out), opd_steps=1,
    )  # fmt: skip
