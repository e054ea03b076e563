"""The replication's data: the eval, OPD and cold-start questions are disjoint, no model trains
on any of them, and the same-pipeline teacher trains on the student's very examples."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from experiments.replication import task
from experiments.replication.models import _examples, training_examples
from experiments.replication.plan import (
    SAME_PIPELINE,
    STUDENT,
    TEACHER_X,
    TEACHER_X_OTHER,
    full_plan,
    tiny_plan,
)
from experiments.replication.run import _data
from experiments.replication.vocab import build_tokenizer


def _pairs(path) -> set[tuple[int, int]]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return {tuple(int(v) for v in row["prompt"].split("+")) for row in rows}


def test_the_three_question_sets_are_disjoint_and_all_held_out(tmp_path):
    plan = full_plan(0)
    paths, held_out = _data(plan, tmp_path, seed=0)
    sets = {name: _pairs(path) for name, path in paths.items()}
    assert {n: len(s) for n, s in sets.items()} == {
        "eval": plan.eval_prompts, "opd": plan.opd_prompts, "coldstart": plan.coldstart_prompts
    }  # fmt: skip
    assert not sets["eval"] & sets["opd"]
    assert not sets["eval"] & sets["coldstart"]
    assert not sets["opd"] & sets["coldstart"]
    assert held_out == sets["eval"] | sets["opd"] | sets["coldstart"]


def test_no_model_trains_on_a_held_out_question():
    # Half the question space held out, so that ignoring `exclude` could not go unnoticed.
    held_out = {(a, b) for a in range(task.LOW, 550) for b in range(task.LOW, task.HIGH + 1)}
    tokenizer = build_tokenizer()
    for spec in tiny_plan(0).models:
        examples = _examples(spec, tokenizer, 2000, held_out)
        prompts = [tokenizer.decode(e.prompt_ids) for e in examples]
        firsts = {int(p.removeprefix("<q>").split("+")[0]) for p in prompts}
        assert min(firsts) >= 550, spec.name
        assert len(set(prompts)) == 2000  # distinct questions


def test_the_same_pipeline_teacher_sees_exactly_the_students_examples():
    specs = {spec.name: spec for spec in full_plan(0).models}
    student, same = specs[STUDENT], specs[SAME_PIPELINE]
    assert same.hidden > student.hidden and same.seed != student.seed  # larger, its own init
    tokenizer = build_tokenizer()
    held_out = {(a, b) for a in range(task.LOW, 200) for b in range(task.LOW, task.HIGH + 1)}
    mine = training_examples(student, tokenizer, held_out)
    theirs = training_examples(same, tokenizer, held_out)
    assert len(mine) == student.steps * student.batch_size // student.epochs
    assert [(e.prompt_ids, e.response_ids) for e in mine] == [
        (e.prompt_ids, e.response_ids) for e in theirs
    ]


def test_the_other_tokenizer_teacher_is_teacher_x_on_other_tokens():
    specs = {spec.name: spec for spec in full_plan(0).models}
    x, other = specs[TEACHER_X], specs[TEACHER_X_OTHER]
    assert other.tokenization == "two-digit" and x.tokenization == "shared"
    assert replace(other, name=x.name, role=x.role, tokenization="shared") == x
    held_out = {(a, b) for a in range(task.LOW, 200) for b in range(task.LOW, task.HIGH + 1)}
    shared, two = build_tokenizer(), build_tokenizer("two-digit")
    mine = training_examples(replace(x, steps=8), shared, held_out)
    theirs = training_examples(replace(other, steps=8), two, held_out)
    # The very same texts (its own template around the prompt), in other ids.
    assert [shared.decode(e.response_ids) for e in mine] == [
        two.decode(e.response_ids).replace("[end]", "<eos>") for e in theirs
    ]
    assert [shared.decode(e.prompt_ids)[3:-3] for e in mine] == [
        two.decode(e.prompt_ids)[6:-5] for e in theirs
    ]
    assert mine[0].response_ids != theirs[0].response_ids


def test_sample_pairs_refuses_what_it_cannot_draw():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="exclude each other"):
        task.sample_pairs(1, rng, restricted=True, only_restricted=True)
    with pytest.raises(ValueError, match="exceeds"):
        task.sample_pairs(900 * 900 + 1, rng)
