"""Episodes with a teacher of another tokenizer (--cross-tokenizer auto): the teacher plays in
its own tokenizer and chat template; `opd eval --env` grades its episodes as any source's, and
`opd coldstart --env` re-renders each for the student from its text
(opd.client.recipes.coldstart_episodes.rerender_episode).

The teachers are tiny random Llamas on GPT-2's tokenizer with a chat template of their own
(tests/conftest.py's GPT2_CHAT_TEMPLATE); the students use SmolLM2's (ChatML).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from opd.client.cli import app
from opd.client.episodes import TurnRenderer, load_environment
from opd.client.train.engines import Sample
from opd.client.train.episodes import EpisodeLimits, Renderers, run_episodes
from opd.client.train.rollouts import SamplingParams
from opd.shared.schemas import GenerateOptions
from tests.conftest import GPT2_CHAT_TEMPLATE
from tests.support.tokenizers import gpt2_tokenizer, smollm2_tokenizer

ROW = {"prompt": "What is 2 plus 3? Answer with just the number.", "answer": 5}


def _gpt2_with_template():
    tokenizer = copy.deepcopy(gpt2_tokenizer())  # the cached one stays template-free
    tokenizer.chat_template = GPT2_CHAT_TEMPLATE
    return tokenizer


class _Scripted:
    """Plays fixed turns (text) in its tokenizer; the last one cut at its token budget when
    `cut_last` (no end-of-turn token, truncated)."""

    name = "scripted"
    holds_weights = False

    def __init__(self, tokenizer, turns: list[str], cut_last: bool) -> None:
        self.tokenizer, self.turns, self.cut_last, self.calls = tokenizer, turns, cut_last, 0

    def sample(self, prompts, params, seeds):
        text = self.turns[self.calls]
        self.calls += 1
        cut = self.cut_last and self.calls == len(self.turns)
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        ids += [] if cut else [self.tokenizer.eos_token_id]
        return [[Sample(np.asarray(ids, dtype=np.int64), cut)] for _ in prompts]


@pytest.mark.parametrize("cut_last", [False, True])
def test_rerender_episode_is_what_the_student_would_have_seen(cut_last):
    from opd.client.recipes.coldstart_episodes import episode_row, rerender_episode

    teacher, student = _gpt2_with_template(), smollm2_tokenizer()
    turns = [
        '<tool_call>{"name": "calculator", "arguments": {"expression": "2 + 3"}}</tool_call>',
        "It is 5, an é and a 🙂.",  # multi-byte characters split differently by the two BPEs
    ]
    make_env = load_environment("calculator", {})
    params = SamplingParams(GenerateOptions(n=1, max_tokens=64), (teacher.eos_token_id,), 0)
    engine = _Scripted(teacher, turns, cut_last)
    (ep,) = run_episodes(
        engine, Renderers(teacher), make_env, [ROW], params, EpisodeLimits(4, 512), [3]
    )[0]
    assert ep.info.ended == ("turn_tokens" if cut_last else "done")
    env = make_env()
    source, target = TurnRenderer(teacher, env.tools), TurnRenderer(student, env.tools)

    out = rerender_episode(ep, source, target)

    # built independently: the student's own rendering of the same conversation
    end = student.convert_tokens_to_ids("<|im_end|>")
    tool_messages = ep.info.context_messages[0]
    assert [m["role"] for m in tool_messages] == ["tool"] and tool_messages[0]["content"] == "5"
    opening = target.opening_ids(make_env().reset(ROW))
    turn0 = student.encode(turns[0], add_special_tokens=False) + [end]
    between = target.observation_ids(tool_messages)
    turn1 = student.encode(turns[1], add_special_tokens=False) + ([] if cut_last else [end])
    assert out.token_ids.tolist() == opening + turn0 + between + turn1
    assert out.prompt_len == len(opening)
    a0 = len(opening)
    a1 = a0 + len(turn0) + len(between)
    assert out.spans.tolist() == [[a0, a0 + len(turn0)], [a1, a1 + len(turn1)]]
    text = student.decode(out.token_ids.tolist())
    assert text.count("You can call these tools") == 1  # the instructions once, not twice
    assert "<|im_start|>tool\n5<|im_end|>" in text and "<|endoftext|>" not in text
    assert out.info is ep.info

    # the cold-start row over it: the student's ids, the assistant turns trained
    row = episode_row(7, 0, ROW, out, student)
    assert row["opening_ids"] == opening and row["token_ids"] == turn0 + between + turn1
    assert row["trained"] == [True] * len(turn0) + [False] * len(between) + [True] * len(turn1)
    assert row["response"] == "\n".join(turns) and row["turns"] == 2
    assert row["finish_reason"] == ("length" if cut_last else "stop")


# ---- opd eval --env -----------------------------------------------------------------------------

N_EVAL = 3
EVAL_TOKENS = 8


def _eval_args(student: Path, url: str, out: Path, limit: int, *more: str) -> list[str]:
    return [
        "eval", "--data", "task:addition:train", "--limit", str(limit), "--verifier", "numeric",
        "--student", str(student), "--teacher", f"gpt2={url}",
        "--env", "calculator", "--max-turns", "2", "--max-tokens", str(EVAL_TOKENS),
        "--temperature", "0", "--out-dir", str(out), *more,
    ]  # fmt: skip


def test_opd_eval_grades_episodes_a_teacher_plays_in_its_own_tokenizer(
    gpt2_server, gpt2_teacher_dir, tiny_student_dir, tmp_path
):
    from transformers import AutoTokenizer

    from opd.client.teacher import TeacherClient
    from opd.client.train.prompts import load_rows
    from opd.shared.schemas import GenerateRequest

    out = tmp_path / "eval"
    args = _eval_args(tiny_student_dir, gpt2_server, out, N_EVAL, "--cross-tokenizer", "auto")
    result = CliRunner().invoke(app, args, env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    report = json.loads((out / "eval.json").read_text())
    (teacher,) = [s for s in report["sources"] if s["kind"] == "teacher"]
    assert teacher["summary"]["episodes"] == N_EVAL
    lines = [json.loads(x) for x in (out / teacher["per_prompt"]).read_text().splitlines()]
    for line in lines:  # graded as any source's episodes: by the environment's reward
        assert line["turns"][0] >= 1 and line["rewards"][0] is not None
        assert line["correct"] == [line["rewards"][0] == 1.0]
    # it played in GPT-2's ids and template: the same greedy turn as asking it directly for a
    # continuation of its own rendering of each opening (its turns never end: one turn each)
    tokenizer = AutoTokenizer.from_pretrained(gpt2_teacher_dir)
    make_env = load_environment("calculator", {})
    renderer = TurnRenderer(tokenizer, make_env().tools)
    rows, _ = load_rows("task:addition:train")
    openings = [renderer.opening_ids(make_env().reset(rows[line["index"]])) for line in lines]
    request = GenerateRequest(
        prompt_token_ids=openings, n=1, temperature=0.0, max_tokens=EVAL_TOKENS, seed=0
    )
    with TeacherClient(gpt2_server) as client:
        direct = client.generate(request).results
    want = [tokenizer.decode(r.completions[0].token_ids, skip_special_tokens=True) for r in direct]
    assert [line["completions"][0] for line in lines] == want
    assert [line["completion_tokens"][0] for line in lines] == [EVAL_TOKENS] * N_EVAL


def test_opd_eval_refuses_an_episode_teacher_of_another_tokenizer_without_the_flag(
    gpt2_server, tiny_student_dir, tmp_path
):
    args = _eval_args(tiny_student_dir, gpt2_server, tmp_path / "eval", 1)  # off: the default
    result = CliRunner().invoke(app, args, env={"COLUMNS": "250"})
    assert result.exit_code != 0
    message = f"{result.output} {result.exception}"
    assert "teacher gpt2" in message and "--cross-tokenizer auto" in message, message


# ---- opd coldstart --env ------------------------------------------------------------------------


COLDSTART_TOKENS = 12
COLDSTART_FLAGS = dict(prompts="task:addition:train", env="followup", env_arg=["turns=2"])


def test_opd_coldstart_rerenders_a_cross_teachers_episodes_for_the_student(
    gpt2_turn_taking_server, gpt2_turn_taking_dir, tiny_student_dir, tmp_path
):
    from transformers import AutoTokenizer

    from opd.client.configs.coldstart import ColdstartConfig
    from opd.client.episodes.tools import parse_assistant_text
    from opd.client.recipes.coldstart import opd_stage_config
    from opd.client.teacher import TeacherClient
    from opd.client.train.prompts import load_rows
    from opd.shared.config_cli import from_flags
    from opd.shared.schemas import GenerateRequest

    url, teacher_dir = gpt2_turn_taking_server, gpt2_turn_taking_dir
    out = tmp_path / "cs"
    args = [
        "coldstart", "--student", str(tiny_student_dir), "--teacher-url", url,
        "--prompts", COLDSTART_FLAGS["prompts"], "--sft-fraction", "0.05",
        "--env", "followup", "--env-arg", "turns=2", "--max-turns", "2",
        "--max-tokens", str(COLDSTART_TOKENS), "--temperature", "1", "--top-p", "1",
        "--sft-batch-size", "4", "--cross-tokenizer", "auto", "--out-dir", str(out),
    ]  # fmt: skip
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "plays its episodes in its own tokenizer" in result.output
    summary = json.loads((out / "coldstart.json").read_text())
    assert not summary["same_tokenizer"] and summary["counts"]["kept"] >= 1
    # the OPD stage meets the same teacher: it takes the flag too
    assert "--cross-tokenizer auto" in summary["opd"]["command"]
    config = from_flags(
        ColdstartConfig, student=str(tiny_student_dir), teacher_url=[url], out_dir=str(out),
        cross_tokenizer="auto", opd_steps=1, **COLDSTART_FLAGS,
    )  # fmt: skip
    assert opd_stage_config(config, out / "student", out).teacher.cross_tokenizer == "auto"

    student = AutoTokenizer.from_pretrained(tiny_student_dir)
    teacher = AutoTokenizer.from_pretrained(teacher_dir)
    end = student.convert_tokens_to_ids("<|im_end|>")
    make_env = load_environment("followup", {"turns": 2})
    student_renderer, teacher_renderer = TurnRenderer(student), TurnRenderer(teacher)
    rows, _ = load_rows(COLDSTART_FLAGS["prompts"])
    sft_idx = json.loads((out / "split.json").read_text())["sft_indices"]

    # every episode's first turn is the teacher's own: the text of the ids it samples when
    # asked directly to continue its rendering of the openings (turn 0 of SFT prompt j samples
    # with seed + j, as in one request)
    request = GenerateRequest(
        prompt_token_ids=[teacher_renderer.opening_ids(make_env().reset(rows[i])) for i in sft_idx],
        n=1, temperature=1.0, top_p=1.0, max_tokens=COLDSTART_TOKENS, seed=0,
    )  # fmt: skip
    with TeacherClient(url) as client:
        direct = client.generate(request).results
    first = {
        i: teacher.decode(r.completions[0].token_ids, skip_special_tokens=True)
        for i, r in zip(sft_idx, direct, strict=True)
    }
    raw = [json.loads(x) for x in (out / "teacher_responses.jsonl").open()]
    assert sorted(r["prompt_index"] for r in raw) == sft_idx
    for r in raw:
        a = r["trained"].index(False) if False in r["trained"] else len(r["trained"])
        turn = [t for t in r["token_ids"][:a] if t != end]
        assert student.decode(turn, skip_special_tokens=True) == first[r["prompt_index"]]

    # a kept example is the episode as the student would have seen it: its template's opening,
    # each turn's text in its tokens closed by its end-of-turn token, its rendering of the
    # environment's answer to that text; the trained positions are the turns, nothing else
    data = [json.loads(x) for x in (out / "sft_data.jsonl").open()]
    assert len(data) == summary["counts"]["kept"]
    assert any(row["turns"] == 2 for row in data)  # an observation in between, at least once
    for row in data:
        ids, trained = row["token_ids"], row["trained"]
        runs = [j for j in range(len(ids)) if trained[j] and (j == 0 or not trained[j - 1])]
        texts = []
        for a in runs:
            b = next((k for k in range(a, len(ids)) if not trained[k]), len(ids))
            texts.append(student.decode(ids[a:b], skip_special_tokens=True))
        env = make_env()
        want = list(student_renderer.opening_ids(env.reset(rows[row["prompt_index"]])))
        assert row["opening_ids"] == want
        want_mask = []
        for j, text in enumerate(texts):
            turn = student.encode(text, add_special_tokens=False) + [end]
            want_mask += [True] * len(turn)
            obs = env.step(parse_assistant_text(text, truncated=False))
            if j + 1 < len(texts):
                observed = student_renderer.observation_ids(obs.messages)
                turn += observed
                want_mask += [False] * len(observed)
            want += turn
        assert row["opening_ids"] + ids == want and trained == want_mask
        assert row["response"] == "\n".join(texts) and row["turns"] == len(texts)
        assert texts[0] == first[row["prompt_index"]]
