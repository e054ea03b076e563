"""The replication's task and tokenizer: scratchpads that are right, an answer opd's numeric
verifier reads, the restricted facts as defined, and a tokenizer opd loads like any other."""

from __future__ import annotations

import json

import numpy as np
import pytest

from experiments.replication import task
from experiments.replication.vocab import build_tokenizer, save_tokenizer
from opd.client.evaluation.verifiers import load_verifier
from opd.shared.chat import chat_prompt_ids
from opd.shared.fingerprint import fingerprint_hf_tokenizer


def _column_sums_x(pad: str) -> list[int]:
    return [int(step.split("=")[1]) for step in pad.split("|")[:-1]]


@pytest.mark.parametrize("style", task.STYLES)
def test_every_scratchpad_ends_in_the_sum_and_the_numeric_verifier_reads_it(style):
    verifier = load_verifier("numeric")
    rng = np.random.default_rng(0)
    for a, b in task.sample_pairs(500, rng) + [(999, 999), (100, 100), (505, 495)]:
        pad = task.scratchpad(a, b, style)
        assert verifier(pad, str(a + b)).correct, (a, b, pad)
        assert not verifier(pad, str(a + b + 1)).correct


def test_style_x_writes_full_column_sums_and_style_y_digit_and_carry():
    assert task.scratchpad(347, 285, "x") == "7+5=12|4+8+1=13|3+2+1=6|632"
    assert task.scratchpad(347, 285, "y") == "5+7+0>2;8+4+1>3;2+3+1>6;=632"
    rng = np.random.default_rng(1)
    for a, b in task.sample_pairs(200, rng):  # the column sums rebuild a + b
        sums = _column_sums_x(task.scratchpad(a, b, "x"))
        carry_free = [s % 10 for s in sums]
        assert sum(d * 10**i for i, d in enumerate(carry_free)) + (sums[-1] // 10) * 1000 == a + b


def test_the_restricted_facts_are_the_column_pairs_summing_to_13_or_more():
    assert task.needs_restricted_fact(178, 247)  # 8 + 7
    assert not task.needs_restricted_fact(166, 266)  # 6+6, 6+6, 1+2: with carries, no fact >= 13
    rng = np.random.default_rng(2)
    pairs = task.sample_pairs(300, rng, restricted=True)
    assert len(set(pairs)) == 300
    assert not any(task.needs_restricted_fact(a, b) for a, b in pairs)
    excluded = set(pairs[:100])
    again = task.sample_pairs(200, np.random.default_rng(2), exclude=excluded)
    assert not excluded & set(again)


def test_rows_are_a_prompt_set_opd_reads(tmp_path):
    path = task.write_rows([(347, 285), (178, 247)], tmp_path / "set.jsonl", split="eval")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows[0] == {
        "prompt": "347+285", "answer": 632, "needs_restricted_fact": False, "split": "eval"
    }  # fmt: skip
    assert rows[1]["needs_restricted_fact"]


def test_the_tokenizer_round_trips_and_renders_the_chat_turns(tmp_path):
    from transformers import AutoTokenizer

    save_tokenizer(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    text = task.scratchpad(347, 285, "x")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)  # one token per character
    assert tokenizer.decode(ids) == text
    prompt = chat_prompt_ids(tokenizer, "347+285")
    assert tokenizer.decode(prompt) == "<q>347+285<a>"
    assert tokenizer.eos_token == "<eos>" and tokenizer.pad_token == "<pad>"
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert fingerprint_hf_tokenizer(again) == fingerprint_hf_tokenizer(tokenizer)


def test_the_two_digit_tokenizer_cuts_the_same_texts_elsewhere_and_round_trips(tmp_path):
    from transformers import AutoTokenizer

    save_tokenizer(tmp_path, "two-digit")
    assert (tmp_path / "tokenizer.json").is_file()
    other = AutoTokenizer.from_pretrained(tmp_path)
    shared = build_tokenizer()
    text = task.scratchpad(347, 285, "x")
    ids = other(text, add_special_tokens=False)["input_ids"]
    # Two digits in a row are one token, taken from the left: 12, 13, and 632 as 63 2.
    tokens = other.convert_ids_to_tokens(ids)
    assert tokens[:5] == ["7", "+", "5", "=", "12"] and tokens[-2:] == ["63", "2"]
    assert "13" in tokens and len(ids) < len(text)
    # Every text of the task round-trips: both styles, prompts, and the rendered turns.
    rng = np.random.default_rng(3)
    for a, b in task.sample_pairs(500, rng) + [(999, 999), (100, 100), (505, 495)]:
        for piece in (task.prompt(a, b), *(task.scratchpad(a, b, s) for s in task.STYLES)):
            piece_ids = other(piece, add_special_tokens=False)["input_ids"]
            assert other.decode(piece_ids) == piece
            assert other.unk_token_id not in piece_ids
    # Its own specials and template; no id means what it means in the shared tokenizer.
    prompt = chat_prompt_ids(other, "347+285")
    assert other.decode(prompt) == "[user]347+285[bot]"
    assert other.eos_token == "[end]" and other.pad_token == "[pad]"
    assert set(other.get_vocab()).isdisjoint({"<q>", "<a>", "<eos>", "<pad>"})
    same_ids = [t for t, i in other.get_vocab().items() if shared.get_vocab().get(t) == i]
    assert same_ids == []
    assert fingerprint_hf_tokenizer(other) != fingerprint_hf_tokenizer(shared)
