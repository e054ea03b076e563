"""The cold start's data with an environment (`opd coldstart --env`): teacher episodes.

The teacher plays the environment through POST /v1/generate, continuing the episode's exact
token ids turn after turn (opd.client.evaluation.episode_source.TeacherEngine), rendered with
the student's tokenizer and chat template (opd.client.train.episodes), so the teacher must
share the student's tokenizer. Each episode becomes one SFT example whose trained positions are
the teacher's assistant turns only; tool results and user turns are context (Example.trained),
exactly as OPD later trains the student's own turns.

A row keeps what the filters read (the assistant turns' text and ids, whether a limit cut the
episode) and what SFT needs (the opening ids, the ids after it, the trained mask), plus the
environment's reward: `--min-reward` rejection-samples on it ("low_reward").
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# Prompts per teacher round trip (each runs its episodes to the end, turn by turn).
EPISODE_CHUNK = 16


def teacher_episode_rows(
    client: Any,
    setup: Any,
    rows: Sequence[dict],
    sft_idx: Sequence[int],
    options: Any,
    seed: int,
    tokenizer: Any,
    raw_path: Path,
    log: Callable[[str], None],
) -> list[dict[str, Any]]:
    """options.n teacher episodes of every SFT row; SFT prompt j plays with seed + j."""
    from opd.client.evaluation.episode_source import TeacherEngine
    from opd.client.train.rollouts import SamplingParams

    engine = TeacherEngine(client)
    params = SamplingParams.for_tokenizer(tokenizer, options)
    out: list[dict[str, Any]] = []
    for c in range(0, len(sft_idx), EPISODE_CHUNK):
        chunk = list(sft_idx[c : c + EPISODE_CHUNK])
        seeds = [seed + c + j for j in range(len(chunk))]
        played = setup.run(engine, [rows[i] for i in chunk], params, seeds)
        for i, group in zip(chunk, played, strict=True):
            for j, ep in enumerate(group):
                row = episode_row(i, j, rows[i], ep, tokenizer)
                with raw_path.open("a") as fh:
                    fh.write(json.dumps({k: v for k, v in row.items() if k != "text"}) + "\n")
                out.append(row)
        log(f"teacher played {min(c + EPISODE_CHUNK, len(sft_idx))}/{len(sft_idx)} prompts")
    return out


def episode_row(index: int, j: int, data_row: dict, ep: Any, tokenizer: Any) -> dict[str, Any]:
    """One teacher episode as a cold-start row (filters and SFT read it)."""
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
