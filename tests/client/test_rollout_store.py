"""Saved rollouts: Parquet files per step that read back exactly, and the report's view of them.

Rollouts are built from random arrays with the trainer's shapes and dtypes (float32 log-probs,
int64 student ids, int32 teacher ids as they come off the wire)."""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from opd.client.report.build import build_report
from opd.client.report.rollout_view import CLIP, ratio_color, rollouts_section
from opd.client.train.positions import STUDENT_FIELDS, TEACHER_FIELDS
from opd.client.train.rollout_store import (
    RolloutWriter,
    read_rollouts,
    read_step,
    rollout_arrays,
    saved_steps,
    step_path,
)
from opd.client.train.rollouts import Rollout

K, k, VOCAB = 8, 5, 49_152


def make_rollout(
    rng: np.random.Generator, prompt_index: int, prompt_len: int, t: int, teacher: bool = True
) -> Rollout:
    """Every per-position array of Rollout filled by its suffix: ids as integers (int32 for the
    teacher's, as decoded from the wire), the rest float32; teacher fields None without
    `teacher`."""
    arrays = {}
    for name, attr in rollout_arrays().items():
        if name in TEACHER_FIELDS and not teacher:
            continue
        shape = (t,) if attr.endswith("_T") else (t, K if attr.endswith("_TK") else k)
        if "_ids" in name:
            dtype = np.int32 if name in TEACHER_FIELDS else np.int64
            arrays[attr] = rng.integers(0, VOCAB, size=shape, dtype=dtype)
        else:  # entropies >= 0, log-probs <= 0
            sign = 1.0 if "entropy" in name else -1.0
            arrays[attr] = (sign * rng.exponential(2.0, size=shape)).astype(np.float32)
    return Rollout(
        prompt_index=prompt_index,
        token_ids=rng.integers(0, VOCAB, size=prompt_len + t, dtype=np.int64),
        prompt_len=prompt_len,
        truncated=bool(rng.integers(2)),
        **arrays,
    )


def pieces_of(ids: list[int]) -> list[str]:
    """A stand-in detokenizer with the awkward cases: markup, entities, newlines, empties."""
    table = ["", "<script>", "a&b", "\n", " x", '"q"', "\r\t"]
    return [table[i % len(table)] if i % 3 else f"w{i}" for i in ids]


def assert_same_rollout(a: Rollout, b: Rollout) -> None:
    assert (a.prompt_index, a.prompt_len, a.truncated) == (
        b.prompt_index,
        b.prompt_len,
        b.truncated,
    )
    np.testing.assert_array_equal(a.token_ids, b.token_ids, strict=True)
    for attr in rollout_arrays().values():
        x, y = getattr(a, attr), getattr(b, attr)
        if x is None:
            assert y is None, attr
        else:
            assert y is not None, attr
            assert x.dtype == y.dtype and x.shape == y.shape, attr
            np.testing.assert_array_equal(x, y, strict=True, err_msg=attr)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


# --------------------------------------------------------------------------------------------
# The store
# --------------------------------------------------------------------------------------------


def test_rollouts_round_trip_exactly_with_and_without_teacher_fields(tmp_path, rng):
    scored = [make_rollout(rng, i // 2, 7 + i, 20 + 5 * i) for i in range(4)]
    scored.append(make_rollout(rng, 9, 11, 0))  # empty completion: arrays [0] and [0, K]
    unscored = [make_rollout(rng, i, 5, 13, teacher=False) for i in range(3)]
    writer = RolloutWriter(tmp_path, token_text=pieces_of)

    p3 = writer.write(3, scored)
    p12 = RolloutWriter(tmp_path).write(12, unscored)  # no token_text: text columns are null

    assert p3 == tmp_path / "rollouts" / "step_000003.parquet" == step_path(tmp_path, 3)
    assert p12.name == "step_000012.parquet"
    assert saved_steps(tmp_path) == [3, 12]
    back = read_rollouts(tmp_path)
    assert [s.step for s in back] == [3] * 5 + [12] * 3
    for original, saved in zip(scored + unscored, back, strict=True):
        assert_same_rollout(original, saved.rollout)
    assert back[4].rollout.student_topk_ids_TK.shape == (0, K)
    assert back[4].rollout.teacher_topk_logp_Tk.shape == (0, k)
    assert back[0].token_pieces == pieces_of(scored[0].completion.tolist())
    assert back[0].completion_text == "".join(back[0].token_pieces)
    assert back[4].token_pieces == [] and back[4].completion_text == ""
    assert back[5].token_pieces is None and back[5].completion_text is None
    assert [s.step for s in read_rollouts(tmp_path, steps=[12])] == [12] * 3


def test_a_step_mixing_scored_and_unscored_rollouts_keeps_nulls_per_row(tmp_path, rng):
    rollouts = [make_rollout(rng, 0, 4, 6), make_rollout(rng, 1, 4, 9, teacher=False)]
    RolloutWriter(tmp_path).write(1, rollouts)
    back = [s.rollout for s in read_rollouts(tmp_path, [1])]
    for a, b in zip(rollouts, back, strict=True):
        assert_same_rollout(a, b)


def test_the_file_is_plain_typed_parquet(tmp_path, rng):
    RolloutWriter(tmp_path, token_text=pieces_of).write(5, [make_rollout(rng, 0, 3, 4)])
    schema = pq.read_schema(step_path(tmp_path, 5))
    assert schema.field("step").type == pa.int64()
    assert schema.field("truncated").type == pa.bool_()
    assert schema.field("token_ids").type == pa.list_(pa.int64())
    assert schema.field("token_pieces").type == pa.list_(pa.string())
    assert schema.field("student_token_logp").type == pa.list_(pa.float32())
    assert schema.field("student_topk_ids").type == pa.list_(pa.list_(pa.int64(), K))
    assert schema.field("teacher_topk_ids").type == pa.list_(pa.list_(pa.int32(), k))
    names = set(schema.names)
    assert set(STUDENT_FIELDS + TEACHER_FIELDS) <= set(rollout_arrays()) <= names
    assert not any(n.endswith(("_T", "_TK", "_Tk")) for n in names)
    # pandas-free: a column read on its own
    cols = read_step(tmp_path, 5, ["prompt_len", "student_topk_logp", "not_a_column"])
    assert set(cols) == {"prompt_len", "student_topk_logp"}
    assert cols["student_topk_logp"][0].shape == (4, K)


def test_writes_are_atomic_and_replace_a_redone_step(tmp_path, rng):
    writer = RolloutWriter(tmp_path)
    writer.write(7, [make_rollout(rng, 0, 3, 5)])
    redone = [make_rollout(rng, 1, 3, 8), make_rollout(rng, 2, 3, 2)]
    writer.write(7, redone)  # a resumed run redoes the step
    assert [p.name for p in (tmp_path / "rollouts").iterdir()] == ["step_000007.parquet"]
    assert len(read_rollouts(tmp_path)) == 2

    bad = make_rollout(rng, 3, 3, 5)
    bad.student_entropy_T = bad.student_entropy_T[:-1]  # ragged: refused before any write
    with pytest.raises(ValueError, match=r"student_entropy_T has shape \(4,\)"):
        writer.write(8, [bad])

    def short(ids: list[int]) -> list[str]:  # fails halfway: no partial file either
        return ["x"] * (len(ids) - 1)

    with pytest.raises(ValueError, match="pieces"):
        RolloutWriter(tmp_path, token_text=short).write(9, redone)
    assert [p.name for p in (tmp_path / "rollouts").iterdir()] == ["step_000007.parquet"]
    assert saved_steps(tmp_path) == [7]
    assert saved_steps(tmp_path / "elsewhere") == []


# --------------------------------------------------------------------------------------------
# The report's view
# --------------------------------------------------------------------------------------------


def test_ratio_colours_diverge_and_clip():
    assert ratio_color(0.0) == "rgba(31,111,178,0.00)"
    assert ratio_color(-CLIP) == ratio_color(-10 * CLIP) == "rgba(192,57,43,0.85)"
    assert ratio_color(CLIP / 2) == "rgba(31,111,178,0.42)"
    assert ratio_color(float("nan")) == "transparent"


def test_rollouts_section_colours_each_token_and_escapes_its_text(tmp_path, rng):
    rollouts = [make_rollout(rng, i, 6, 12) for i in range(6)]
    r0 = rollouts[0]
    r0.token_ids[r0.prompt_len :] = np.arange(12)  # pieces_of(1) == "<script>"
    r0.student_token_logp_T[:] = -0.5
    r0.teacher_token_logp_T[:] = -0.5
    r0.teacher_token_logp_T[1] = -9.5  # the teacher finds "<script>" far less likely
    writer = RolloutWriter(tmp_path, token_text=pieces_of)
    writer.write(1, rollouts)
    writer.write(2, [make_rollout(rng, 0, 6, 3, teacher=False)])
    RolloutWriter(tmp_path).write(5, rollouts[:2])  # last step: no pieces, token ids shown

    text = rollouts_section(tmp_path, saved_steps(tmp_path))

    assert "<script>" not in text and "&lt;script&gt;" in text and "a&amp;b" in text
    # the first and the last saved step; 4 of step 1's 6 rollouts, spread over its rows
    assert "Step 1 (first saved step): 6 rollouts, 4 shown" in text
    assert "Step 5 (last saved step): 2 rollouts" in text and "Step 2 " not in text
    assert re.findall(r'data-row="(\d+)"', text) == ["0", "2", "3", "5", "0", "1"]
    spans = re.findall(r'<span class="tok" style="background:([^"]+)" title="([^"]*)">', text)
    assert len(spans) == 4 * 12 + 2 * 12  # step 1, step 5 (the legend has no tooltips)
    script = next(title for _, title in spans if "token 1 " in title)
    assert script == (
        "token 1 &#x27;&lt;script&gt;&#x27;\nstudent log p -0.500\nteacher log q -9.500\n"
        "log q/p -9.000"
    )
    assert ("rgba(192,57,43,0.85)", script) in spans  # clipped: fully red
    same = next(bg for bg, title in spans if title.startswith("token 0 &#x27;w0&#x27;"))
    assert same == "rgba(31,111,178,0.00)"  # teacher and student agree: no colour
    assert '<span class="mark">\u21b5</span>\n' in text  # a newline shows and breaks the line
    assert '<span class="mark">\u240d</span>' in text  # so does a carriage return
    assert ">[" in text and "no decoded text saved: token ids shown" in text


def test_report_shows_rollouts_only_when_the_run_saved_some(tmp_path, rng):
    quickstart = {"before": {"kl/sampled": 2.8}, "after": {"kl/sampled": 2.2}}
    (tmp_path / "quickstart.json").write_text(json.dumps(quickstart))

    plain = build_report(tmp_path).read_text()
    (tmp_path / "rollouts").mkdir()  # an empty folder is no rollouts either
    empty = build_report(tmp_path).read_text()
    RolloutWriter(tmp_path, token_text=pieces_of).write(4, [make_rollout(rng, 0, 5, 9)])
    page = build_report(tmp_path).read_text()

    def undated(s: str) -> str:
        return re.sub(r"generated [^.]*\.", "", s)

    assert undated(plain) == undated(empty)
    for s in (plain, empty):
        assert "rollout" not in s.replace(str(tmp_path), "RUN_DIR").lower()
    assert '<section id="rollouts"><h2>Rollouts</h2>' in page
    assert '<a href="#rollouts">Rollouts</a>' in page and ".tok {" in page
    assert "<code>rollouts/</code> 1 saved steps" in page
    assert "Step 4 (only saved step): 1 rollouts" in page
    assert "<script>" not in page.replace("<script>\nwindow", "")
