"""Prompt sources and the resumable order."""

from __future__ import annotations

import json

import pytest

from opd.client.train.prompts import PromptOrder, load_prompts


def test_shipped_prompts():
    prompts = load_prompts("shipped")
    assert len(prompts) >= 32 and all(isinstance(p, str) and p for p in prompts)


def test_jsonl_parquet_and_hf_folder(tmp_path):
    rows = [{"text": f"prompt {i}", "other": i} for i in range(5)]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert load_prompts(str(jsonl), "text") == [r["text"] for r in rows]

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    assert load_prompts(str(tmp_path / "p.parquet"), "text") == [r["text"] for r in rows]

    from datasets import Dataset

    Dataset.from_list(rows).save_to_disk(str(tmp_path / "hf"))
    assert load_prompts(str(tmp_path / "hf"), "text") == [r["text"] for r in rows]


def test_missing_field_and_bad_files_are_clear_errors(tmp_path):
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"text": "a"}\n{"nope": "b"}\n')
    with pytest.raises(ValueError, match="row 1 has no non-empty string field 'text'"):
        load_prompts(str(jsonl), "text")
    jsonl.write_text('{"text": "a"}\nnot json\n')
    with pytest.raises(ValueError, match="p.jsonl:2"):
        load_prompts(str(jsonl), "text")
    with pytest.raises(FileNotFoundError):
        load_prompts(str(tmp_path / "missing.jsonl"))


def test_prompt_order_is_seeded_resumable_and_epochwise():
    a = PromptOrder(7, seed=5)
    first = a.take(10)  # crosses into epoch 1
    assert sorted(first[:7]) == list(range(7)) and a.epoch == 1 and a.index == 3
    state = a.state()
    rest = a.take(6)
    b = PromptOrder(7, seed=5)
    b.load_state(state)
    assert b.take(6) == rest
    assert PromptOrder(7, seed=6).take(7) != PromptOrder(7, seed=5).take(7)
    assert PromptOrder(4, seed=1, shuffle=False).take(6) == [0, 1, 2, 3, 0, 1]
