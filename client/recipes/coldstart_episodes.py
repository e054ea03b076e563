"""The cold start's data with an environment (`opd coldstart --env`): teacher episodes.

The teacher plays the environment through POST /v1/generate, continuing the episode's exact
token ids turn after turn (opd.client.evaluation.episode_source.TeacherEngine). A teacher of
the student's tokenizer plays in the student's ids and chat template (opd.client.train.episodes);
each episode is then one SFT example as it stands. A teacher of another tokenizer
(--cross-tokenizer auto) plays in its own tokenizer and chat template, and each of its episodes
is re-rendered for the student from its text (`rerender_episode`): the student's rendering of
the opening messages, each assistant turn's text in the student's tokens (with the student's
end-of-turn token where the teacher's turn ended), the student's rendering of the environment's
messages after it: the episode as the student would have seen it had it written those turns.

Either way an example's trained positions are the teacher's assistant turns only (their end
tokens included); tool results and user turns are context (Example.trained), exactly as OPD
later trains the student's own turns.

A row keeps what the filters read (the assistant turns' text and ids, whether a limit cut the
episode) and what SFT needs (the opening ids, the ids after it, the trained mask), all in the
student's ids, plus the environment's reward: `--min-reward` rejection-samples on it
("low_reward").
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from opd.client.episodes import TurnRenderer
    from opd.client.evaluation.episode_source import EpisodePlayer
    from opd.client.train.episodes import Episode

# Prompts per teacher round trip (each runs its episodes to the end, turn by turn).
EPISODE_CHUNK = 16


def teacher_episode_rows(
    client: Any,
    teacher: EpisodePlayer,
    student: EpisodePlayer,
    rows: Sequence[dict],
    sft_idx: Sequence[int],
    options: Any,
    seed: int,
    raw_path: Path,
    log: Callable[[str], None],
) -> list[dict[str, Any]]:
    """options.n teacher episodes of every SFT row; SFT prompt j plays with seed + j. The
    teacher plays with `teacher` (opd.client.evaluation.episode_source.teacher_player); a
    cross player's episodes are re-rendered for `student` (rerender_episode)."""
    from opd.client.evaluation.episode_source import TeacherEngine
    from opd.client.train.rollouts import SamplingParams

    engine = TeacherEngine(client)
    params = SamplingParams.for_tokenizer(teacher.tokenizer, options)
    renderers = None
    if teacher.cross:
        env = student.setup.make_env()  # its tools pick the renderers (one per tool set)
        renderers = (teacher.setup.renderers(env), student.setup.renderers(env))
    out: list[dict[str, Any]] = []
    for c in range(0, len(sft_idx), EPISODE_CHUNK):
        chunk = list(sft_idx[c : c + EPISODE_CHUNK])
        seeds = [seed + c + j for j in range(len(chunk))]
        played = teacher.setup.run(engine, [rows[i] for i in chunk], params, seeds)
        for i, group in zip(chunk, played, strict=True):
            for j, ep in enumerate(group):
                if renderers is not None:
                    ep = rerender_episode(ep, *renderers)
                row = episode_row(i, j, rows[i], ep, student.tokenizer)
                with raw_path.open("a") as fh:
                    fh.write(json.dumps({k: v for k, v in row.items() if k != "text"}) + "\n")
                out.append(row)
        log(f"teacher played {min(c + EPISODE_CHUNK, len(sft_idx))}/{len(sft_idx)} prompts")
    return out


def episode_row(index: int, j: int, data_row: dict, ep: Any, tokenizer: Any) -> dict[str, Any]:
    """One teacher episode (in the student's ids) as a cold-start row (filters and SFT read
    it)."""
    ids = ep.token_ids.tolist()
    p = ep.prompt_len
    trained = [False] * (len(ids) - p)
    turns = []
    for a, b in ep.spans.tolist():
        trained[a - p : b - p] = [True] * (b - a)
        turns.append(ids[a:b])
    content = [t for turn in turns for t in turn]
    if content and not ep.truncated:
        content = content[:-1]  # the closing end-of-turn token (the filters read content)
    text = "\n".join(tokenizer.decode(t, skip_special_tokens=True) for t in turns)
    return {
        "prompt_index": index,
        "completion_index": j,
        "prompt": data_row.get("prompt", json.dumps(data_row, sort_keys=True, default=str)),
        "response": text,
        "token_ids": ids[p:],
        "opening_ids": ids[:p],
        "trained": trained,
        "finish_reason": "length" if ep.truncated else "stop",
        "ended": ep.info.ended,
        "reward": ep.info.reward,
        "turns": len(turns),
        "text": text,
        "content_ids": content,
    }


# ---- an episode in another tokenizer ----------------------------------------------------------


def rerender_episode(ep: Episode, source: TurnRenderer, target: TurnRenderer) -> Episode:
    """An episode played in `source`'s tokenizer and chat template, rebuilt turn by turn as
    `target`'s would have built it from the same text: target.opening_ids(the opening
    messages); per assistant turn, target's tokens of the turn's text (source's ids decoded,
    special tokens removed, as the environment read it) and target's end-of-turn token where
    the turn ended (`_turn_ended`; a turn cut at a limit has none); after every turn but the
    last, target.observation_ids(the environment's messages that followed it). Spans: the
    assistant turns, end tokens included; the environment's record (info: reward, grades,
    messages) is the episode's. Per-token engine numbers do not carry over (None)."""
    from opd.client.train.episodes import Episode

    info = ep.info
    if info.teacher_spans:
        raise ValueError("a re-anchored episode cannot be re-rendered for another tokenizer")
    spans = ep.spans.tolist()
    if len(info.context_messages) < len(spans) - 1:
        raise ValueError("the episode keeps no environment messages (its text) to re-render")
    end_id = target.end_of_turn_id
    ids = list(target.opening_ids(info.opening))
    prompt_len = len(ids)
    out_spans = []
    for j, (a, b) in enumerate(spans):
        turn = ep.token_ids[a:b].tolist()
        text = source.tokenizer.decode(turn, skip_special_tokens=True)
        start = len(ids)
        ids.extend(target.tokenizer(text, add_special_tokens=False)["input_ids"])
        if _turn_ended(ep, j, source):
            ids.append(end_id)
        out_spans.append((start, len(ids)))
        if j + 1 < len(spans):
            ids.extend(target.observation_ids(info.context_messages[j]))
    return Episode(
        token_ids=np.asarray(ids, dtype=np.int64),
        prompt_len=prompt_len,
        spans=np.asarray(out_spans, dtype=np.int64).reshape(-1, 2),
        info=info,
        engine_logp_T=None,
    )


def _turn_ended(ep: Episode, j: int, source: TurnRenderer) -> bool:
    """Whether assistant turn j ended (its end-of-turn token sampled) rather than being cut at
    a limit: every turn but the last did (the episode went on after it); the last did when the
    environment or --max-turns ended the episode (a cut turn ends it as "turn_tokens" or
    "episode_tokens"), or, ended by --max-episode-tokens, when it closes with an end-of-turn
    or other special token (there was no room for the environment's answer after it)."""
    a, b = (int(x) for x in ep.spans[j])
    if j + 1 < len(ep.spans) or ep.info.ended in ("done", "max_turns"):
        return True
    if ep.info.ended != "episode_tokens" or b == a:
        return False
    last = int(ep.token_ids[b - 1])
    return last in source.end_of_turn_ids or last in set(source.tokenizer.all_special_ids)
