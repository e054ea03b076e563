"""`opd select-prompts` end to end: the real SmolLM2 teacher (`opd serve`), a layer-subset student,
MiniLM and the lexical embedder, through the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from opd.client.cli import app as opd_app
from opd.client.configs.train import TrainConfig
from opd.client.recipes.select_prompts import EncodedPrompts
from opd.client.train.prompts import load_prompts
from opd.client.train.routing import training_prompts
from opd.shared.config_cli import from_flags

GIBBERISH = "xq7#Lp!zR2 vv09 ;;kf3 Qw== jjj8 zzk@@1 p0p0"
POOL = [
    "What is the capital of France?",
    "what is the capital of france",  # exact dupe of 0
    "How do I reverse a list in Python?",
    "What's the way to reverse a Python list?",  # near dupe of 2 (MiniLM 0.97, lexical 0.34)
    "Write a haiku about autumn leaves.",
    "Explain photosynthesis in simple terms.",
    GIBBERISH,
    "Give me three tips for better sleep.",
    "What is 12 times 13?",
    "Summarise the plot of Romeo and Juliet.",
    "What causes the seasons on Earth?",
    "Suggest a name for a pet turtle.",  # exact dupe of the eval set
]
EVAL = ["Suggest a name for a pet turtle!"]
OOD = [
    "Describe a sunset over the mountains.",
    "Which city is the capital of France?",  # near dupe of the pool
    "what is 12 times 13",  # exact dupe of the pool
    "List four musical instruments.",
]


def _write(path: Path, texts: list[str]) -> str:
    path.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    return str(path)


def _run(args: list[str]) -> None:
    result = CliRunner().invoke(opd_app, ["select-prompts", *args])
    assert result.exit_code == 0, result.output


def test_content_span_on_the_real_chat_template(smollm2_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    text = "What is the capital of France?"
    enc = EncodedPrompts.render(tokenizer, [text])
    (start, end), ids = enc.spans[0], enc.ids[0]
    assert tokenizer.decode(ids[start:end]) == text
    assert "<|im_start|>user" in tokenizer.decode(ids[:start])
    assert "<|im_start|>assistant" in tokenizer.decode(ids[end:])


@pytest.mark.slow
def test_select_prompts_end_to_end_on_smollm2(smol_server, smollm2_dir, tmp_path, monkeypatch):
    from opd.client.train.student import build_layer_subset_student

    monkeypatch.delenv("OPD_API_KEY", raising=False)
    student = build_layer_subset_student(smollm2_dir, tmp_path / "student", keep=4)
    pool = _write(tmp_path / "pool.jsonl", POOL)
    eval_set = _write(tmp_path / "eval.jsonl", EVAL)
    common = ["--pool", pool, "--teacher-url", smol_server, "--dedupe-against", eval_set]

    # 1) with a student: every prompt left (9 of 12), all three scores, ranked by combined
    out = tmp_path / "all.parquet"
    _run(
        [*common, "--student", str(student), "--count", "9", "--ood-fraction", "0"]
        + ["--max-new-tokens", "16", "--embedder", "minilm", "--out", str(out)]
    )
    summary = json.loads((tmp_path / "all.summary.json").read_text())
    c = summary["counts"]
    assert (c["pool"], c["pool_exact_dupes_within"], c["pool_exact_dupes_against"]) == (12, 1, 1)
    assert (c["pool_near_dupes_within"], c["selected_aligned"], c["selected_ood"]) == (1, 9, 0)
    assert summary["embedder"] == "minilm" and summary["rank_by"] == "combined"
    assert summary["teacher"]["name"] == "SmolLM2-135M-Instruct"
    import pyarrow.parquet as pq

    rows = pq.read_table(out).to_pylist()
    assert load_prompts(str(out)) == [r["prompt"] for r in rows]
    assert [r["rank"] for r in rows] == sorted(r["rank"] for r in rows)
    by_prompt = {r["prompt"]: r for r in rows}
    assert set(by_prompt) == set(POOL) - {POOL[1], POOL[3], POOL[11]}
    assert all(0.0 <= r["student_overlap"] <= 1.0 for r in rows)
    assert all(0.0 < r["combined"] < 1.0 for r in rows)
    # the teacher finds a natural question far likelier than random characters
    lowest = min(rows, key=lambda r: r["teacher_logprob"])
    assert lowest["prompt"] == GIBBERISH
    assert by_prompt[POOL[0]]["teacher_logprob"] > lowest["teacher_logprob"] + 1.0
    removed = [
        json.loads(line) for line in (tmp_path / "all.removed.jsonl").read_text().splitlines()
    ]
    near = [r for r in removed if r["reason"] == "near"]
    assert len(near) == 1 and {near[0]["prompt"], near[0]["matched"]} == {POOL[2], POOL[3]}

    # 2) likelihood only, OOD from a file, the lexical embedder: 2 aligned + 2 OOD
    out = tmp_path / "mixed.jsonl"
    ood = _write(tmp_path / "ood.jsonl", OOD)
    _run(
        [*common, "--tokenizer", str(smollm2_dir), "--count", "4", "--ood-fraction", "0.5"]
        + ["--ood", ood, "--embedder", "lexical", "--out", str(out)]
        + ["--teacher-name", "math"]  # multi-teacher: the set is tagged with its teacher
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["source"] for r in rows] == ["aligned", "aligned", "ood", "ood"]
    assert {r["teacher"] for r in rows} == {"math"}
    routed = from_flags(
        TrainConfig, student="s", teacher=["math=http://m", "code=http://c"], prompts=str(out)
    )
    assert training_prompts(routed) == ([r["prompt"] for r in rows], ["math"] * 4)
    assert {r["prompt"] for r in rows[2:]} == {OOD[0], OOD[3]}
    assert all(r["origin"] == "ood-file" and r["rank"] is None for r in rows[2:])
    assert all(r["student_overlap"] is None and r["teacher_logprob"] < 0 for r in rows)
    summary = json.loads((tmp_path / "mixed.summary.json").read_text())
    assert summary["rank_by"] == "likelihood" and summary["embedder"] == "lexical"
    assert (summary["counts"]["ood_exact_dupes"], summary["counts"]["ood_near_dupes"]) == (1, 1)
