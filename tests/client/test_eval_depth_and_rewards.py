"""The depth probe's prefix cutting on constructed token sequences; the probe's reward AUROC
against a direct computation on constructed rollouts; evaluation sets from files."""

from __future__ import annotations

import itertools
import json
import re

import numpy as np
import pytest

from opd.client.evaluation.data import load_eval_set
from opd.client.evaluation.depth import cut_prefixes, depth_cases
from opd.client.evaluation.rewards import reward_auroc
from opd.client.train.rollouts import Rollout

EOS = 2


def test_prefixes_stop_before_the_content_ends():
    completion = [10, 11, 12, 13, 14, EOS]  # 5 content tokens, then EOS
    got = cut_prefixes(completion, [0, 2, 4, 5, 8], EOS)
    # 5 and 8 would leave nothing to continue (5 is the whole content)
    assert got == [(0, []), (2, [10, 11]), (4, [10, 11, 12, 13])]
    # a truncated completion (no EOS): its content is all of it
    assert cut_prefixes([10, 11, 12], [1, 2, 3], EOS) == [(1, [10]), (2, [10, 11])]
    # duplicates and order do not matter; 0 applies even to an empty completion
    assert cut_prefixes([EOS], [3, 0, 0], EOS) == [(0, [])]
    assert cut_prefixes([], [0, 1], EOS) == [(0, [])]
    # the EOS is only stripped at the end
    assert cut_prefixes([EOS, 7, 8], [1, 2], EOS) == [(1, [EOS]), (2, [EOS, 7])]
    with pytest.raises(ValueError, match=">= 0"):
        cut_prefixes([1, 2], [-1], EOS)


def test_depth_cases_keep_prompt_and_answer_with_each_prefix():
    rollouts = [([1, 5], [20, 21, 22, EOS], "a"), ([1, 6, 7], [30, EOS], "b")]
    cases = depth_cases(rollouts, [0, 1, 2], EOS)
    got = [(c.rollout, c.prefix_len, c.prompt_ids, c.prefix_ids, c.answer) for c in cases]
    assert got == [
        (0, 0, [1, 5], [], "a"),
        (0, 1, [1, 5], [20], "a"),
        (0, 2, [1, 5], [20, 21], "a"),
        (1, 0, [1, 6, 7], [], "b"),
    ]


def _rollout(teacher: list[float], student: list[float]) -> Rollout:
    t = len(teacher)
    return Rollout(
        prompt_index=0,
        token_ids=np.arange(3 + t, dtype=np.int64),
        prompt_len=3,
        truncated=False,
        student_token_logp_T=np.array(student, dtype=np.float32),
        student_topk_ids_TK=np.zeros((t, 1), np.int64),
        student_topk_logp_TK=np.zeros((t, 1), np.float32),
        student_entropy_T=np.zeros(t, np.float32),
        teacher_token_logp_T=np.array(teacher, dtype=np.float32),
        teacher_cand_logp_TK=np.zeros((t, 1), np.float32),
        teacher_topk_ids_Tk=np.zeros((t, 1), np.int64),
        teacher_topk_logp_Tk=np.zeros((t, 1), np.float32),
        teacher_entropy_T=np.zeros(t, np.float32),
    )


def test_reward_auroc_equals_the_pairwise_definition_with_ties():
    rng = np.random.default_rng(0)
    rollouts, labels = [], []
    for _ in range(40):
        t = int(rng.integers(1, 6))
        # rewards on a coarse grid, so that many rollouts tie
        gain = float(rng.integers(-3, 3)) / 2
        # quarters: exact in float32, so equal rewards are exact ties
        student = rng.integers(-12, 0, size=t) / 4
        rollouts.append(_rollout((student + gain).tolist(), student.tolist()))
        labels.append(bool(rng.integers(0, 2)))
    rollouts.append(_rollout([], []))  # an empty completion: left out, counted
    labels.append(True)
    got = reward_auroc(rollouts, labels)
    # r(y) computed directly: the mean over the completion of log q - log p, in float64
    r = [
        float(np.mean(x.teacher_token_logp_T.astype(np.float64) - x.student_token_logp_T))
        for x in rollouts[:-1]
    ]
    pos = [a for a, y in zip(r, labels, strict=False) if y]
    neg = [a for a, y in zip(r, labels, strict=False) if not y]
    wins = sum(1.0 if p > q else 0.5 if p == q else 0.0
               for p, q in itertools.product(pos, neg))  # fmt: skip
    assert got["auroc"] == pytest.approx(wins / (len(pos) * len(neg)), abs=1e-12)
    assert got["rollouts"] == 40 and got["left_out_empty"] == 1
    assert got["correct"] == len(pos)
    assert got["reward_mean_correct"] == pytest.approx(np.mean(pos), abs=1e-6)
    assert got["reward_mean_wrong"] == pytest.approx(np.mean(neg), abs=1e-6)


def test_eval_sets_from_files(tmp_path):
    rows = [
        {"q": "one plus one?", "a": 2},
        {"q": "half?", "a": 0.5},
        {"q": "name?", "a": "Ada"},
    ]
    path = tmp_path / "set.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    items = load_eval_set(str(path), "q", "a")
    assert [(i.index, i.prompt, i.answer) for i in items] == [
        (0, "one plus one?", "2"),
        (1, "half?", "0.5"),
        (2, "name?", "Ada"),
    ]
    subset = load_eval_set(str(path), "q", "a", limit=2, seed=1)
    assert subset == load_eval_set(str(path), "q", "a", limit=2, seed=1) and len(subset) == 2
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows[2:]), tmp_path / "set.parquet")
    assert load_eval_set(str(tmp_path / "set.parquet"), "q", "a")[0].answer == "Ada"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"q": "x?", "a": None}) + "\n")
    with pytest.raises(ValueError, match=r"row 0 has no answer in field 'a'"):
        load_eval_set(str(bad), "q", "a")
    with pytest.raises(ValueError, match=r"no non-empty string field 'prompt'"):
        load_eval_set(str(path))


def test_generated_tasks_split_into_disjoint_halves():
    from opd.client.evaluation.tasks import TASKS, task_rows

    for name in TASKS:
        every = task_rows(f"task:{name}")
        train, held = task_rows(f"task:{name}:train"), task_rows(f"task:{name}:eval")
        assert len(train) + len(held) == len(every)
        assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}
        assert task_rows(f"task:{name}:eval") == held  # fixed, not seeded per run
    items = load_eval_set("task:multiplication")
    assert len(items) == 121 and items[0].prompt.startswith("What is 2 x 2?")
    for item in items:
        a, b = (int(x) for x in re.findall(r"\d+", item.prompt))
        assert int(item.answer) == a * b
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        load_eval_set("task:nope")
    with pytest.raises(ValueError, match="unknown split 'test'"):
        load_eval_set("task:addition:test")
