"""Cross-tokenizer OPD against real teacher processes (opd.client.train.cross_tokenizer).

- GET /v1/tokenizer hands out files that rebuild the teacher's tokenizer (same fingerprint);
- identity: a teacher of the student's own tokenizer, forced through the cross-tokenizer path,
  gives the native path's teacher numbers, losses, gradients and diagnostics;
- numbers: a teacher of another tokenizer (GPT-2's) scores the student's text on its own
  tokenization, and each chunk's log-prob equals a float64 recompute of that tokenization;
- `opd train` trains with every objective across tokenizers, mixes both kinds of teacher in
  one routed run, and resumes exactly.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from opd.client.configs.groups import ObjectiveConfig
from opd.client.teacher import TeacherClient
from opd.client.train import objectives as obj
from opd.client.train.bridge import ScoreSpec, TeacherBridge
from opd.client.train.cross_tokenizer import (
    CrossSetup,
    cross_connect,
    single_prompt_messages,
    teacher_tokenizer,
)
from opd.client.train.diagnostics import compute_diagnostics
from opd.client.train.metric_log import read_metrics
from opd.client.train.positions import PositionStats, TokenBatch
from opd.client.train.rollouts import with_statistics
from opd.client.train.student import load_student
from opd.client.train.student_math import StudentModule
from opd.client.train.trainer import Trainer
from opd.shared.chat import chat_prompt_ids
from opd.shared.fingerprint import fingerprint_hf_tokenizer
from tests.support.metrics import assert_same_metrics
from tests.support.reference import ReferenceModel
from tests.support.train_config import train_config

PROMPTS = ["What is 2 + 3?", "Name a colour.", "Say hello in French."]
# Answers whose student ids are the tokenizer's own encoding (so a teacher of the same
# tokenizer re-encodes them into the same ids) and split no character over several ids.
ANSWERS = ["2 + 3 = 5.", "Blue, like the sky!", "Bonjour, comment allez-vous ?"]
SPEC = ScoreSpec(top_k=8, candidates=True, entropy=True)
K = 8


def _rollouts(student_dir, texts=ANSWERS):
    """Rollouts of fixed answers (their ids and EOS), with the student's statistics."""
    model, tok = load_student(str(student_dir))
    module = StudentModule(model)
    sampled = []
    for i, (prompt, text) in enumerate(zip(PROMPTS, texts, strict=True)):
        ids = list(tok(text, add_special_tokens=False)["input_ids"]) + [tok.eos_token_id]
        sample = type("S", (), {})()
        sample.completion_ids, sample.truncated, sample.engine_logp_T = (
            np.asarray(ids, np.int64),
            False,
            None,
        )
        sampled.append(((i, chat_prompt_ids(tok, prompt)), [sample]))
    with torch.no_grad():
        return with_statistics(module, sampled, K), tok


def _score(url, rollouts, tok, mode):
    """Score copies of `rollouts` on `url`, natively (mode None) or across tokenizers."""
    from dataclasses import replace

    copies = [replace(r) for r in rollouts]
    bridge = TeacherBridge([url])
    try:
        info = bridge.connect()
        if mode is not None:
            setup = CrossSetup(mode, tok, lambda r: single_prompt_messages(PROMPTS[r.prompt_index]))
            assert cross_connect(bridge, info, setup, fingerprint_hf_tokenizer(tok)) is not None
        return bridge.submit(copies, SPEC).result(), bridge
    finally:
        bridge.close()


def test_the_tokenizer_route_rebuilds_the_teachers_tokenizer(
    gpt2_server, gpt2_teacher_dir, tmp_path
):
    from transformers import AutoTokenizer

    with TeacherClient(gpt2_server) as client:
        info = client.connect()
        files = client.tokenizer()
    assert files.tokenizer_fingerprint == info.tokenizer_fingerprint
    assert "tokenizer.json" in files.files
    rebuilt = teacher_tokenizer(files, cache_dir=tmp_path)
    original = AutoTokenizer.from_pretrained(gpt2_teacher_dir)
    assert fingerprint_hf_tokenizer(rebuilt) == info.tokenizer_fingerprint
    assert (
        rebuilt("héllo 😀 <|endoftext|>")["input_ids"]
        == original("héllo 😀 <|endoftext|>")["input_ids"]
    )
    assert teacher_tokenizer(files, cache_dir=tmp_path) is not rebuilt  # reloaded from the cache
    assert (tmp_path / "tokenizers" / files.tokenizer_fingerprint[:32] / "tokenizer.json").is_file()


def test_the_tokenizer_route_needs_the_api_key(strict_server):
    import httpx

    from tests.support.keys import TEST_API_KEY

    assert httpx.get(strict_server + "/v1/tokenizer").status_code == 401
    with TeacherClient(strict_server, api_key=TEST_API_KEY) as client:
        assert client.tokenizer().tokenizer_fingerprint == client.connect().tokenizer_fingerprint


def test_a_teacher_of_another_tokenizer_is_refused_unless_the_run_crosses(
    gpt2_server, tiny_student_dir, tmp_path
):
    from opd.client.teacher.errors import IncompatibleTeacherError

    with pytest.raises(IncompatibleTeacherError, match="--cross-tokenizer|cross-tokenizer auto"):
        Trainer(train_config(tiny_student_dir, gpt2_server, tmp_path / "off", max_steps=1))


def test_the_cross_path_with_the_students_own_tokenizer_equals_the_native_path(
    tiny_server, tiny_student_dir
):
    rollouts, tok = _rollouts(tiny_student_dir)
    native, _ = _score(tiny_server, rollouts, tok, None)
    crossed, _ = _score(tiny_server, rollouts, tok, "always")
    for a, b in zip(native, crossed, strict=True):
        assert b.one_to_one_T.all() and (b.chunk_T == np.arange(len(b.chunk_T))).all()
        for name in (
            "teacher_token_logp_T",
            "teacher_cand_logp_TK",
            "teacher_topk_logp_Tk",
            "teacher_entropy_T",
        ):
            np.testing.assert_allclose(getattr(b, name), getattr(a, name), atol=2e-5, rtol=0)
        np.testing.assert_array_equal(b.teacher_topk_ids_Tk, a.teacher_topk_ids_Tk)
    s_native = PositionStats.from_rollouts(native)
    s_cross = PositionStats.from_rollouts(crossed)
    d_native, d_cross = compute_diagnostics(s_native, 4), compute_diagnostics(s_cross, 4)
    for key, value in d_native.items():
        assert d_cross[key] == pytest.approx(value, abs=1e-4, nan_ok=True), key
    assert d_cross["kl/sampled_per_chunk"] == pytest.approx(d_native["kl/sampled"], abs=1e-4)
    assert d_cross["xtok/one_to_one_frac"] == 1.0
    # every objective: the same loss and the same gradient through the masked code path
    model, _ = load_student(str(tiny_student_dir))
    module = StudentModule(model)
    for name in obj.OBJECTIVES:
        config = ObjectiveConfig(name=name)
        grads, losses = [], []
        for rollouts_, stats in ((native, s_native), (crossed, s_cross)):
            batch = TokenBatch.build(rollouts_, stats, torch.device("cpu"))
            module.objective = config
            model.zero_grad()
            loss = module("loss", batch)
            loss.sum().backward()
            losses.append(loss.detach())
            grads.append(model.lm_head.weight.grad.clone())
        torch.testing.assert_close(losses[1], losses[0], atol=5e-5, rtol=1e-4)
        torch.testing.assert_close(grads[1], grads[0], atol=5e-5, rtol=1e-3)


def test_chunk_log_probs_equal_a_float64_recompute_on_the_teachers_tokenization(
    gpt2_server, gpt2_teacher_dir, tiny_student_dir
):
    from transformers import AutoTokenizer

    texts = ["12345 + 678 = 13023", "Très bien 😀 — voilà", "<|im_start|> tabs\tand\nlines"]
    rollouts, tok = _rollouts(tiny_student_dir, texts)
    teacher_tok = AutoTokenizer.from_pretrained(gpt2_teacher_dir)
    scored, _ = _score(gpt2_server, rollouts, tok, "auto")
    ref_model = ReferenceModel(gpt2_teacher_dir)
    bridge_views = []
    from opd.client.train.cross_tokenizer import TeacherRenderer, vocab_map

    renderer = TeacherRenderer(tok, teacher_tok)
    vocab = vocab_map(tok, teacher_tok)
    for r, prompt, text in zip(scored, PROMPTS, texts, strict=True):
        view = renderer.view(r, single_prompt_messages(prompt))
        bridge_views.append(view)
        # the teacher's own tokenization, built here without opd's renderer
        prompt_ids = teacher_tok.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        expected = (
            teacher_tok(prompt_ids, add_special_tokens=False)["input_ids"]
            + teacher_tok(text, add_special_tokens=False)["input_ids"]
            + [teacher_tok.eos_token_id]
        )
        assert view.token_ids.tolist() == expected
        positions = np.arange(int(view.spans[0, 0]), len(expected))
        ref = ref_model.reference(expected, 0, positions=positions)
        ref_logp_U = ref.token(np.asarray(expected)[positions])
        chunks = view.n_chunks
        want_C = np.bincount(view.teacher_chunk_U, ref_logp_U, chunks)
        got_C = np.bincount(r.chunk_T, r.teacher_token_logp_T.astype(np.float64), chunks)
        np.testing.assert_allclose(got_C, want_C, atol=2e-4, rtol=0)
        # one-to-one rows: the teacher's entropy, top-k and candidates at its own position
        # comparable rows: a chunk of one token on both sides whose teacher top-1 maps
        rows = view.teacher_rows_T
        one = r.one_to_one_T
        assert one.any() and not one.all() and (rows[one] >= 0).all()
        top1 = ref.logprobs_TV.argmax(-1)  # where the teacher's top choice has no student id
        dropped = (rows >= 0) & ~one
        assert (vocab.to_student(top1[rows[dropped]]) < 0).all()
        assert (vocab.to_student(top1[rows[one]]) >= 0).all()
        np.testing.assert_allclose(r.teacher_entropy_T[one], ref.entropy()[rows[one]], atol=2e-4)
        assert np.isnan(r.teacher_entropy_T[~one]).all()
        ref_top = ref.top_values(SPEC.top_k)[rows[one]]
        np.testing.assert_allclose(r.teacher_topk_logp_Tk[one], ref_top, atol=2e-4)
        mapped = vocab.to_teacher(r.student_topk_ids_TK[one])
        ids_UK = np.zeros((len(positions), K), dtype=np.int64)
        ids_UK[rows[one]] = np.maximum(mapped, 0)
        want = ref.at(ids_UK)[rows[one]]
        cand = r.teacher_cand_logp_TK[one]
        assert np.isnan(cand[mapped < 0]).all() and (mapped >= 0).any()
        np.testing.assert_allclose(cand[mapped >= 0], want[mapped >= 0], atol=2e-4)
        ids_k = r.teacher_topk_ids_Tk[one]
        assert ((ids_k == -1) | (vocab.to_teacher(ids_k) >= 0)).all()
    assert bridge_views


@pytest.mark.parametrize("objective", obj.OBJECTIVES)
def test_opd_train_across_tokenizers_trains_with_every_objective(
    gpt2_server, tiny_student_dir, tmp_path, objective
):
    config = train_config(
        tiny_student_dir,
        gpt2_server,
        tmp_path / objective,
        objective=objective,
        cross_tokenizer="auto",
        max_steps=2,
        checkpoint_every=10,
    )
    with Trainer(config) as trainer:
        assert trainer.notices and "another tokenizer" in trainer.notices[0]
        history = trainer.run()
    for m in history:
        assert np.isfinite(m["train/loss"]) and np.isfinite(m["kl/sampled"]), m
        assert 0 < m["xtok/one_to_one_frac"] < 1
        assert m["time/align_s"] > 0


def test_opd_train_across_tokenizers_resumes_exactly(gpt2_server, tiny_student_dir, tmp_path):
    flags = dict(cross_tokenizer="auto", objective="student-topk", max_steps=4)
    with Trainer(train_config(tiny_student_dir, gpt2_server, tmp_path / "full", **flags)) as t:
        t.run()
    full = read_metrics(tmp_path / "full" / "metrics.jsonl")
    part = tmp_path / "part"
    first = dict(flags, max_steps=2)
    with Trainer(train_config(tiny_student_dir, gpt2_server, part, **first)) as t:
        t.run()
    with Trainer(train_config(tiny_student_dir, gpt2_server, part, resume="latest", **flags)) as t:
        assert t.step == 2
        t.run()
    resumed = read_metrics(part / "metrics.jsonl")
    assert len(full) == 4
    assert_same_metrics(full, resumed)


def test_a_routed_run_mixes_a_native_and_a_cross_tokenizer_teacher(
    tiny_server, gpt2_server, tiny_student_dir, tmp_path
):
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"prompt": p, "teacher": ("same", "other")[i % 2]} for i, p in enumerate(PROMPTS * 2)]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = train_config(
        tiny_student_dir,
        "unused",
        tmp_path / "mixed",
        teacher_url=[],
        teacher=[f"same={tiny_server}", f"other={gpt2_server}"],
        prompts=str(prompts),
        prompts_per_step=4,
        cross_tokenizer="auto",
        max_steps=2,
    )
    with Trainer(config) as trainer:
        crossed = {t.name: t.bridge.cross is not None for t in trainer.teachers.teachers}
        assert crossed == {"same": False, "other": True}
        history = trainer.run()
    for m in history:
        assert np.isfinite(m["train/loss"]) and 0 < m["xtok/one_to_one_frac"] < 1
        assert "teacher/other/kl/sampled" in m or any(k.startswith("teacher/other/") for k in m)


def test_episodes_across_tokenizers_are_rendered_by_the_teachers_template(
    gpt2_server, gpt2_teacher_dir, turn_taking_student_dir, tmp_path
):
    from transformers import AutoTokenizer

    from opd.client.train.cross_tokenizer import TeacherRenderer, conversations

    flags = dict(
        env="followup",
        env_arg=["turns=3"],
        max_turns=3,
        max_new_tokens=6,
        prompts="task:addition:train",
        cross_tokenizer="auto",
        max_steps=1,
        # the teacher's accuracy on the eval set: episodes it plays in its own tokenizer
        eval_set="task:addition:eval",
        eval_every=1,
        eval_limit=2,
        eval_verifier="numeric",
    )
    config = train_config(turn_taking_student_dir, gpt2_server, tmp_path / "ep", **flags)
    teacher_tok = AutoTokenizer.from_pretrained(gpt2_teacher_dir)
    ref_model = ReferenceModel(gpt2_teacher_dir)
    with Trainer(config) as trainer:
        rollouts, _ = trainer.collect()
        renderer = TeacherRenderer(trainer.tokenizer, teacher_tok)
        messages = conversations(trainer.prompts)
        history = trainer.run()
    assert np.isfinite(history[0]["train/loss"]) and "kl/sampled@turn1" in history[0]
    assert "eval/teacher_accuracy" in history[0]
    teacher_lines = (tmp_path / "ep" / "eval" / "teacher.jsonl").read_text().splitlines()
    assert teacher_lines  # the teacher played the eval episodes (in GPT-2's tokenizer)
    assert any(len(r.scored_spans) >= 2 for r in rollouts)
    for r in rollouts:
        view = renderer.view(r, messages(r))
        turns = renderer.turns(r)
        # the teacher's ids spell the conversation exactly as its template writes it
        filled, j = [], 0
        for m in messages(r):
            if m["role"] == "assistant":
                m = {**m, "content": turns[j].text}
                j += 1
            filled.append(m)
        text = teacher_tok.apply_chat_template(filled, tokenize=False)
        if not turns[-1].ended:  # a cut last turn: nothing after it is sent
            text = text[: text.rindex(turns[-1].text) + len(turns[-1].text)]
        elif text.endswith("\n"):  # after the last end-of-turn token nothing is scored
            text = text[:-1]
        assert teacher_tok.decode(view.token_ids.tolist()) == text
        # each chunk's teacher log-prob is the float64 sum over its teacher tokens
        positions = np.concatenate([np.arange(a, b) for a, b in view.spans])
        ref = ref_model.reference(view.token_ids, 0, positions=positions)
        want_C = np.bincount(
            view.teacher_chunk_U, ref.token(view.token_ids[positions]), view.n_chunks
        )
        got_C = np.bincount(r.chunk_T, r.teacher_token_logp_T.astype(np.float64), view.n_chunks)
        np.testing.assert_allclose(got_C, want_C, atol=2e-4, rtol=0)


def test_probe_ranks_a_teacher_of_another_tokenizer_beside_one_of_the_students(
    tiny_server, gpt2_server, tiny_student_dir, tmp_path
):
    from typer.testing import CliRunner

    from opd.client.cli import app

    out = tmp_path / "probe"
    args = [
        "probe",
        "--student", str(tiny_student_dir),
        "--teacher", f"same={tiny_server}",
        "--teacher", f"gpt2={gpt2_server}",
        "--cross-tokenizer", "auto",
        "--num-prompts", "4",
        "--max-new-tokens", "12",
        "--depth-bucket", "4",
        "--out-dir", str(out),
    ]  # fmt: skip
    result = CliRunner().invoke(app, args, env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert "gpt2 (x-tok)" in result.output and "another tokenizer:" in result.output
    report = json.loads((out / "probe.json").read_text())
    by_name = {t["name"]: t for t in report["teachers"]}
    assert by_name["gpt2"]["cross_tokenizer"] and not by_name["same"]["cross_tokenizer"]
    crossed, native = by_name["gpt2"]["metrics"], by_name["same"]["metrics"]
    assert 0 < crossed["xtok/one_to_one_frac"] < 1 and "xtok/one_to_one_frac" not in native
    for m in (crossed, native):
        assert np.isfinite(m["kl/sampled"]) and np.isfinite(m["overlap/ratio"])
    assert "horizon" in by_name["gpt2"]


def test_the_end_of_a_turn_maps_across_tokenizers(gpt2_teacher_dir, tiny_student_dir):
    """The student's end-of-turn token and the teacher's mean the same event whatever their
    strings (ChatML's <|im_end|>, GPT-2's <|endoftext|> here): they map to each other, so a
    student candidate "stop here" gets the teacher's number for stopping there."""
    from transformers import AutoTokenizer

    from opd.client.train.cross_tokenizer import vocab_map

    student = AutoTokenizer.from_pretrained(tiny_student_dir)
    teacher = AutoTokenizer.from_pretrained(gpt2_teacher_dir)
    vocab = vocab_map(student, teacher)
    assert student.eos_token == "<|im_end|>" and teacher.eos_token == "<|endoftext|>"
    assert vocab.to_teacher(np.array([student.eos_token_id])).tolist() == [teacher.eos_token_id]
    assert vocab.to_student(np.array([teacher.eos_token_id])).tolist() == [student.eos_token_id]
