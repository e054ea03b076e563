"""`opd report`'s rollout view of episodes: turns, the context between them and its roles.

Rollouts are built by hand (no model, no teacher): a three-turn episode with a tool result and a
user turn between its assistant turns, written with RolloutWriter and a stand-in detokenizer,
read back and rendered."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from opd.client.report import rollout_view
from opd.client.report.build import build_report
from opd.client.report.rollout_view import rollouts_section
from opd.client.train.positions import TEACHER_FIELDS
from opd.client.train.rollout_store import RolloutWriter, read_rollouts, rollout_arrays
from opd.client.train.rollouts import EpisodeInfo, Rollout

K, k = 4, 3
# id -> piece; ids 0-3 the prompt, 10-16 the assistant's, 20-24 the context's
PIECES = {
    0: "Q", 1: ":", 2: " 2+3", 3: "?",
    10: "<b>", 11: "calc", 12: "\n",  # turn 1
    20: "<script>", 21: "5", 22: "</script>",  # tool result
    13: "It", 14: " is 5",  # turn 2
    23: "User:", 24: " sure?",  # user turn
    15: "Yes", 16: "<eos>",  # turn 3
}  # fmt: skip
IDS = [0, 1, 2, 3, 10, 11, 12, 20, 21, 22, 13, 14, 23, 24, 15, 16]
SPANS = [(4, 7), (10, 12), (14, 16)]


def token_text(ids: list[int]) -> list[str]:
    return [PIECES[i] for i in ids]


def arrays(t: int, rng: np.random.Generator, teacher: bool = True) -> dict[str, np.ndarray]:
    out = {}
    for name, attr in rollout_arrays().items():
        if name in TEACHER_FIELDS and not teacher:
            continue
        shape = (t,) if attr.endswith("_T") else (t, K if attr.endswith("_TK") else k)
        if "_ids" in name:
            out[attr] = rng.integers(0, 30, size=shape).astype(np.int64)
        else:
            out[attr] = (-rng.exponential(1.0, size=shape)).astype(np.float32)
    return out


def episode(rng: np.random.Generator, teacher: bool = True) -> Rollout:
    r = Rollout(
        prompt_index=3,
        token_ids=np.array(IDS, np.int64),
        prompt_len=4,
        truncated=False,
        **arrays(7, rng, teacher),
        spans=np.array(SPANS, np.int64),
        episode=EpisodeInfo(
            context_roles=[["tool"], ["user"], []],
            reward=0.5,
            ended="max_turns",
            turn_correct=[False, True, True],
        ),
    )
    if teacher:
        r.student_token_logp_T[:] = -0.5
        r.teacher_token_logp_T[:] = -0.5
        r.teacher_token_logp_T[0] = -9.5  # "<b>": the teacher finds it far less likely
    return r


def single(rng: np.random.Generator) -> Rollout:
    return Rollout(
        prompt_index=1,
        token_ids=np.array([0, 1, 2, 3, 13, 14, 16], np.int64),
        prompt_len=4,
        truncated=False,
        **arrays(3, rng),
    )


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def blocks(text: str) -> list[tuple[str, str, str]]:
    """(kind, header, body) of every turn / context block, in page order."""
    found = re.findall(
        r'<div class="(turn|context)" data-[a-z-]+="\d+"><p class="turn-head">(.*?)</p>'
        r'(?:<div class="tokens">(.*?)</div>)?</div>',
        text,
        flags=re.S,
    )
    return [(kind, head, body) for kind, head, body in found]


def pieces(body: str) -> list[str]:
    return re.findall(
        r'<span class="tok" [^>]*>(.*?)</span>(?=<span class="tok"|$)', body, flags=re.S
    )


def test_an_episode_shows_its_turns_context_roles_and_outcome(tmp_path, rng):
    RolloutWriter(tmp_path, token_text=token_text).write(1, [single(rng), episode(rng)])
    saved = read_rollouts(tmp_path)
    assert saved[1].rollout.episode is not None and saved[1].context_texts is not None

    text = rollouts_section(tmp_path, [1])
    row = text[text.index('data-row="1"') :]

    # the raw markup of the model and of the tool never reaches the page
    assert "<script>" not in text and "</script>" not in text and "<b>" not in text
    assert "&lt;script&gt;5&lt;/script&gt;" in row and "&lt;b&gt;" in row
    assert "Episodes (multi-turn rollouts)" in text and "context is not trained" in text

    head = re.search(r'<p class="meta">(.*?)</p>', row)[1]
    assert head.startswith("rollout 2 of 2, an episode: prompt #3, 3 assistant turns")
    for fact in (
        "4 prompt tokens",
        "7 trained tokens",
        "5 context tokens",
        "stopped at the turn limit (max_turns)",
        "reward 0.5",
        "2/3 turns correct",
        "1 tokens at or below -4",
    ):
        assert fact in head, fact

    got = blocks(row)
    assert [kind for kind, _, _ in got] == ["context", "turn", "context", "turn", "context", "turn"]
    prompt, t1, tool, t2, user, t3 = got
    assert '<span class="role">prompt</span> 4 tokens' in prompt[1]
    assert "context: not trained" in prompt[1]

    assert t1[1].startswith("assistant &middot; turn 1 of 3: 3 tokens")
    assert "not correct" in t1[1]
    assert pieces(t1[2]) == ["&lt;b&gt;", "calc", '<span class="mark">\u21b5</span>\n']
    assert t2[1].startswith("assistant &middot; turn 2 of 3: 2 tokens") and "correct" in t2[1]
    assert pieces(t2[2]) == ["It", " is 5"]
    assert pieces(t3[2]) == ["Yes", "&lt;eos&gt;"]
    assert "rgba(192,57,43,0.85)" in t1[2]  # "<b>": clipped, fully red

    assert tool[1].startswith('<span class="role">tool</span> 3 tokens')
    assert "context: not trained" in tool[1] and 'class="tok"' not in tool[2]
    assert tool[2] == "&lt;script&gt;5&lt;/script&gt;"
    assert user[1].startswith('<span class="role">user</span> 2 tokens')
    assert user[2] == "User: sure?"
    # nothing follows the last turn: no context block after it
    assert row.count('data-after-turn="') == 2


def test_a_single_completion_renders_as_before_next_to_episodes(tmp_path, rng):
    one, other = single(rng), single(rng)
    RolloutWriter(tmp_path, token_text=token_text).write(1, [one, episode(rng)])  # format 2
    RolloutWriter(tmp_path, token_text=token_text).write(2, [one, other])  # format 1

    mixed = rollouts_section(tmp_path, [1])
    plain = rollouts_section(tmp_path, [2])

    def row0(text: str) -> str:
        return re.search(r'<div class="rollout" data-row="0">.*?</div></div>', text, re.S)[0]

    assert row0(mixed) == row0(plain)
    assert row0(plain).startswith(
        '<div class="rollout" data-row="0"><p class="meta">rollout 1 of 2: prompt #1, '
        "4 prompt tokens, 3 completion tokens, ended with EOS"
    )
    assert "turn-head" not in plain and "Episodes (multi-turn" not in plain


def test_an_episode_without_text_or_teacher_shows_ids_and_cuts_long_turns(
    tmp_path, rng, monkeypatch
):
    RolloutWriter(tmp_path).write(1, [episode(rng, teacher=False)])
    monkeypatch.setattr(rollout_view, "MAX_TOKENS", 4)

    text = rollouts_section(tmp_path, [1])

    assert "not scored by the teacher" in text and "no decoded text saved" in text
    _, t1, tool, t2, _, t3 = blocks(text)
    assert pieces(t1[2]) == ["[10]", "[11]", "[12]"]
    assert t2[1].endswith("2 tokens, correct, 1 shown")
    assert pieces(t2[2]) == ["[13]"] and pieces(t3[2]) == [] and "0 shown" in t3[1]
    assert tool[2] == "[20] [21] [22]" and "token ids shown" in tool[1]
    assert "First 4 of 7 trained tokens shown." in text


def test_the_report_page_carries_the_episode_styles(tmp_path, rng):
    quickstart = {"before": {"kl/sampled": 2.8}, "after": {"kl/sampled": 2.2}}
    (tmp_path / "quickstart.json").write_text(json.dumps(quickstart))
    RolloutWriter(tmp_path, token_text=token_text).write(4, [episode(rng)])

    page = build_report(tmp_path).read_text()

    assert ".context {" in page and ".turn {" in page and ".role {" in page
    assert "assistant &middot; turn 3 of 3" in page
    assert "&lt;script&gt;5" in page
    assert "<script>" not in page.replace("<script>\nwindow", "")
