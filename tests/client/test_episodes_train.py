"""Multi-turn episodes in `opd train` against a real teacher process: token bookkeeping, the
teacher's numbers per span against a float64 recompute, zero gradient outside the spans,
tool calls fed back, an environment that raises, resume.

The student is the `turn_taking_student_dir` fixture (tests/conftest.py): a tiny random Llama
that ends its turns early, so that its episodes run several turns; the teacher is the
session's tiny server. Both use SmolLM2's real tokenizer and chat template.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from opd.client.episodes import AssistantTurn, EpisodeError, Observation, TurnRenderer
from opd.client.train.engines import Sample
from opd.client.train.episodes import EpisodeLimits, Renderers, run_episodes
from opd.client.train.metric_log import read_metrics
from opd.client.train.positions import PositionStats, TokenBatch
from opd.client.train.rollout_store import read_rollouts
from opd.client.train.rollouts import SamplingParams
from opd.client.train.trainer import Trainer
from opd.shared.schemas import GenerateOptions
from tests.support.gradients import hidden_row_grad
from tests.support.reference import ReferenceModel
from tests.support.train_config import train_config

_TIMING = ("time/", "throughput/")
EPISODE_FLAGS = dict(
    env="followup",
    env_arg=["turns=4"],
    max_turns=4,
    max_new_tokens=6,
    prompts="task:addition:train",
)


def _config(student: Path, url: str, run_dir: Path, **overrides):
    return train_config(student, url, run_dir, **{**EPISODE_FLAGS, **overrides})


def test_episodes_train_and_every_span_is_the_students_sampled_ids(
    tiny_server, turn_taking_student_dir, tiny_model_dir, tmp_path
):
    config = _config(
        turn_taking_student_dir, tiny_server, tmp_path, max_steps=1, save_rollouts=True
    )
    with Trainer(config) as trainer:
        rollouts, _ = trainer.collect()
        history = trainer.run()
        renderer = TurnRenderer(trainer.tokenizer)
    metrics = history[0]
    assert math.isfinite(metrics["train/loss"])
    assert metrics["episode/turns_max"] >= 2
    assert "kl/sampled@turn0" in metrics and "kl/sampled@turn1" in metrics
    assert "overlap/ratio@depth0-3" in metrics
    eot = renderer.end_of_turn_ids
    ref = ReferenceModel(tiny_model_dir)
    multi = [r for r in rollouts if len(r.scored_spans) >= 2]
    assert multi, "no episode ran two turns"
    for r in rollouts:
        spans = r.scored_spans
        assert spans[0, 0] == r.prompt_len
        assert (spans[1:, 0] > spans[:-1, 1]).all()  # context between every two turns
        for j, (_, b) in enumerate(spans[:-1]):
            assert int(r.token_ids[b - 1]) in eot  # a turn that goes on ended with its token
            nxt = spans[j + 1, 0]
            context = renderer.tokenizer.decode(r.token_ids[b:nxt].tolist())
            assert "<|im_start|>user" in context and context.endswith("<|im_start|>assistant\n")
        assert r.completion_len == int((spans[:, 1] - spans[:, 0]).sum())
        np.testing.assert_array_equal(r.completion, r.token_ids[r.positions])
        # the teacher's numbers at every span equal a float64 recompute of the whole episode
        want = ref.reference(r.token_ids, None, positions=r.positions)
        np.testing.assert_allclose(
            r.teacher_token_logp_T, want.token(r.completion), atol=2e-4, rtol=0
        )
        np.testing.assert_allclose(
            r.teacher_cand_logp_TK, want.at(r.student_topk_ids_TK), atol=2e-4, rtol=0
        )
    saved = read_rollouts(tmp_path, [1])
    assert len(saved) == len(rollouts)
    for s in saved:
        r = s.rollout
        assert r.episode is not None and len(r.episode.context_roles) == len(r.scored_spans)
        assert all(roles == ["user"] for roles in r.episode.context_roles[:-1])
        assert s.context_texts is not None and len(s.context_texts) == len(r.scored_spans)
        assert len(s.token_pieces) == r.completion_len


@pytest.mark.parametrize("objective", ["sampled", "student-topk", "teacher-topk", "jsd"])
def test_positions_outside_the_spans_get_zero_gradient(
    tiny_server, turn_taking_student_dir, tmp_path, objective
):
    config = _config(turn_taking_student_dir, tiny_server, tmp_path, objective=objective)
    with Trainer(config) as trainer:
        rollouts, _ = trainer.collect()
        multi = [r for r in rollouts if len(r.scored_spans) >= 2] or rollouts
        stats = PositionStats.from_rollouts(multi)
        batch = TokenBatch.build(multi, stats, torch.device("cpu"))
        _, grad_BL = hidden_row_grad(trainer, batch)  # [B, L]: which rows reached the loss
    for b, r in enumerate(multi):
        rows = set((r.positions - 1).tolist())
        nonzero = set(torch.nonzero(grad_BL[b]).flatten().tolist())
        assert nonzero <= rows, f"rows outside the spans got gradient: {sorted(nonzero - rows)}"
        assert len(nonzero) >= len(rows) - 2  # (a row may have an exactly-zero gradient)


class RaisesAtSecondStep:
    """An environment whose second step raises (for the error test)."""

    tools: list = []

    def __init__(self) -> None:
        self.steps = 0

    def reset(self, row: dict) -> list[dict]:
        return [{"role": "user", "content": row["prompt"]}]

    def step(self, turn: AssistantTurn) -> Observation:
        self.steps += 1
        if self.steps == 2:
            raise KeyError("the lookup table has no such entry")
        return Observation([{"role": "user", "content": "Go on."}], done=False)


def test_an_environment_that_raises_names_the_episode_and_turn(
    tiny_server, turn_taking_student_dir, tmp_path
):
    config = _config(
        turn_taking_student_dir,
        tiny_server,
        tmp_path,
        env=f"{__name__}:RaisesAtSecondStep",
        env_arg=[],
        max_new_tokens=16,  # turns end with their token, so episodes reach step 2
    )
    with Trainer(config) as trainer, pytest.raises(EpisodeError) as err:
        trainer.train_step()
    assert err.value.turn == 2 and "RaisesAtSecondStep.step" in str(err.value)
    assert "KeyError" in str(err.value) and "episode" in str(err.value)
    assert not (tmp_path / "metrics.jsonl").exists() or not read_metrics(tmp_path / "metrics.jsonl")


class ScriptedEngine:
    """A rollout engine that plays fixed turns (text), to drive a tool call through the runner
    deterministically; every call returns the next turn for each live episode."""

    name = "scripted"
    holds_weights = False

    def __init__(self, tokenizer, turns: list[str]) -> None:
        self.tokenizer, self.turns, self.calls = tokenizer, turns, []

    def sample(self, prompts, params, seeds):
        self.calls.append([list(p) for p in prompts])
        text = self.turns[len(self.calls) - 1]
        ids = self.tokenizer.encode(text, add_special_tokens=False) + [self.tokenizer.eos_token_id]
        return [[Sample(np.asarray(ids, dtype=np.int64), False)] for _ in prompts]


def test_tool_calls_are_executed_and_fed_back_token_in_token_out(smollm2_dir):
    from transformers import AutoTokenizer

    from opd.client.episodes import load_environment

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    turns = [
        '<tool_call>{"name": "calculator", "arguments": {"expression": "17 * 23"}}</tool_call>',
        "The answer is 391.",
    ]
    engine = ScriptedEngine(tokenizer, turns)
    params = SamplingParams(GenerateOptions(n=1, max_tokens=64), (tokenizer.eos_token_id,), 0)
    make_env = load_environment("calculator", {})
    row = {"prompt": "What is 17 x 23? Answer with just the number.", "answer": 391}
    (episode,) = run_episodes(
        engine, Renderers(tokenizer), make_env, [row], params, EpisodeLimits(4, 512), [7]
    )[0]
    assert episode.info.ended == "done" and episode.info.reward == 1.0
    assert episode.info.context_roles == [["tool"], []]
    (a0, b0), (a1, b1) = episode.spans.tolist()
    ids = episode.token_ids
    # turn 2 was sampled from exactly the ids of turn 1 plus the tool result: token-in, token-out
    assert engine.calls[1][0] == ids[:a1].tolist()
    tool_text = tokenizer.decode(ids[b0:a1].tolist())
    assert "391" in tool_text and "<|im_start|>tool" in tool_text
    assert tokenizer.decode(ids[a0:b0].tolist(), skip_special_tokens=True) == turns[0]
    assert b1 == len(ids)


def test_resume_matches_the_uninterrupted_episode_run(
    tiny_server, turn_taking_student_dir, tmp_path
):
    # with in-training evaluation played as episodes (student and teacher), every 2 steps
    evals = dict(eval_set="task:addition:eval", eval_every=2, eval_limit=3, eval_verifier="numeric")
    student = turn_taking_student_dir
    with Trainer(_config(student, tiny_server, tmp_path / "full", **evals)) as trainer:
        trainer.run()
    full = read_metrics(tmp_path / "full" / "metrics.jsonl")
    part = tmp_path / "part"
    with Trainer(_config(student, tiny_server, part, max_steps=2, **evals)) as trainer:
        trainer.run()
    with Trainer(_config(student, tiny_server, part, resume="latest", **evals)) as trainer:
        assert trainer.step == 2
        trainer.run()
    resumed = read_metrics(part / "metrics.jsonl")
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    assert "eval/accuracy" in full[1] and "eval/teacher_accuracy" in full[1]
    for a, b in zip(full, resumed, strict=True):
        for key, value in a.items():
            if key.startswith(_TIMING) or value is None:  # None: nan in JSON
                assert value is None or key.startswith(_TIMING) or b[key] is None, key
                continue
            assert b[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (a["step"], key)
    played = [json.loads(x) for x in (part / "eval" / "step_4.jsonl").read_text().splitlines()]
    assert len(played) == 3 and all(line["turns"][0] >= 1 for line in played)
    assert all(line["rewards"][0] is not None for line in played)  # graded by the environment
