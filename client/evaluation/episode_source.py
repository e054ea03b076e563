"""Episodes as an evaluation source: a student engine or a teacher service plays an environment.

    opd eval --env followup --data task:addition:eval --student runs/opd --teacher URL

`EpisodeSource` is a CompletionSource (opd.client.evaluation.sources) whose prompts are data
rows: every row's params.n episodes run turn by turn (opd.client.train.episodes.run_episodes)
on a rollout engine, and each comes back as one Completion whose text is the episode's last
assistant turn (what a verifier reads for the final answer) and whose reward, turns and
per-turn grades are the environment's. An episode is graded by the environment's reward where
it gives one (correct = full reward, 1.0), else by the verifier on that last turn
(opd.client.evaluation.run.verify_all).

`TeacherEngine` lets a teacher play: the RolloutEngine interface over POST /v1/generate with
token-id prompts, so the teacher continues the exact ids of the episode so far, turn after
turn, as the student does. The ids must be in the teacher's tokenizer: `teacher_player` says
how a teacher plays, with the student's tokenizer and episode setup when it shares the
student's tokenizer, else (with --cross-tokenizer auto or always) with its own tokenizer
(GET /v1/tokenizer) and its own chat template, turn by turn (opd.client.episodes.render).
An episode played that way is the teacher's ids; what reads it (grading here, the cold
start's re-rendering for the student in opd.client.recipes.coldstart_episodes) decodes it with
the player's tokenizer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from opd.client.evaluation.sources import Completion
from opd.modeling.eos import cut_at_eos
from opd.shared.schemas import GenerateOptions

if TYPE_CHECKING:
    from opd.client.configs.groups import EpisodeGroup
    from opd.client.teacher import TeacherClient
    from opd.client.train.engines import RolloutEngine, Sample
    from opd.client.train.episodes import Episode, EpisodeSetup
    from opd.client.train.rollouts import SamplingParams


class TeacherEngine:
    """A teacher service as a rollout engine: one /v1/generate request per call, every prompt
    given as token ids. The service's seed rule applies: prompt i samples with seeds[0] + i
    (the call's first seed), which keeps a call reproducible for the same prompts and seeds."""

    name = "teacher"
    holds_weights = False

    def __init__(self, client: TeacherClient) -> None:
        self.client = client

    def sample(
        self, prompts: list[list[int]], params: SamplingParams, seeds: list[int]
    ) -> list[list[Sample]]:
        from opd.client.train.engines import Sample
        from opd.shared.schemas import GenerateRequest

        if not prompts:
            return []
        o = params.options
        request = GenerateRequest(
            prompt_token_ids=[list(map(int, p)) for p in prompts],
            n=o.n,
            temperature=o.temperature,
            top_p=o.top_p,
            max_tokens=o.max_tokens,
            seed=int(seeds[0]),
        )
        out = []
        for result in self.client.generate(request).results:
            group = []
            for c in result.completions:
                # cut at an end-of-turn token the teacher's own EOS set may lack
                cut = cut_at_eos(c.token_ids, params.eos_token_ids)
                truncated = cut.truncated and c.finish_reason == "length"
                group.append(Sample(np.asarray(cut.token_ids, dtype=np.int64), truncated))
            out.append(group)
        return out

    def sync_weights(self, state: Mapping[str, Any]) -> float:
        raise RuntimeError("a teacher engine samples the teacher's own weights")

    def sleep(self) -> None:
        return None

    def wake(self) -> None:
        return None

    def close(self) -> None:
        return None


@dataclass(frozen=True)
class EpisodePlayer:
    """The tokenizer and episode setup (renderers over that tokenizer) a model plays
    episodes with; `cross`: a teacher playing in its own tokenizer, not the student's."""

    tokenizer: Any
    setup: EpisodeSetup
    cross: bool = False


def teacher_player(
    client: TeacherClient,
    name: str,
    same_tokenizer: bool,
    mode: str,
    group: EpisodeGroup,
    student: EpisodePlayer,
) -> EpisodePlayer:
    """How teacher `name` plays episodes under --cross-tokenizer `mode`: a teacher of the
    student's tokenizer as the student does (`student`; "always" still takes the path below);
    one of another tokenizer in its own tokenizer and chat template (auto, always), refused
    with off. Its template must render turn by turn (TurnRenderer): checked here, so the
    error names the teacher before any episode runs."""
    from opd.client.episodes import RenderError
    from opd.client.train.cross_tokenizer import teacher_tokenizer
    from opd.client.train.episodes import EpisodeSetup

    if same_tokenizer and mode != "always":
        return student
    if mode == "off":
        raise ValueError(
            f"teacher {name}: its tokenizer differs from the student's, and episodes are "
            "token-in, token-out; pass --cross-tokenizer auto to have it play its episodes in "
            "its own tokenizer and chat template"
        )
    tokenizer = teacher_tokenizer(client.tokenizer())
    setup = EpisodeSetup.of(group, tokenizer)
    assert setup is not None
    try:
        setup.renderers(setup.make_env())  # built now (and kept): a template error surfaces
    except RenderError as exc:
        raise ValueError(
            f"teacher {name}: its chat template cannot play episodes turn by turn in its own "
            f"tokenizer (--cross-tokenizer): {exc}"
        ) from exc
    return EpisodePlayer(tokenizer, setup, cross=True)


class EpisodeSource:
    """A CompletionSource over episodes: prompts are data rows (dicts), each row's params.n
    episodes are played by `engine` with the environment of `setup`."""

    def __init__(
        self,
        engine: RolloutEngine,
        tokenizer: Any,
        setup: EpisodeSetup,
        name: str,
        owned: Sequence[Any] = (),
    ) -> None:
        self.engine, self.tokenizer, self.setup, self.name = engine, tokenizer, setup, name
        self._owned = list(owned)

    def complete(self, prompts: Sequence[Any], params: GenerateOptions) -> list[list[Completion]]:
        from opd.client.train.rollouts import SamplingParams

        rows = list(prompts)
        if any(not isinstance(r, dict) for r in rows):
            raise ValueError("an episode source takes data rows (objects), one per prompt")
        sampling = SamplingParams.for_tokenizer(self.tokenizer, params)
        seed = 0 if params.seed is None else params.seed
        seeds = [seed + i for i in range(len(rows))]
        played = self.setup.run(self.engine, rows, sampling, seeds) if rows else []
        return [[self._completion(ep) for ep in group] for group in played]

    def _completion(self, ep: Episode) -> Completion:
        from opd.client.train.rollouts import last_turn_text

        return Completion(
            text=last_turn_text(self.tokenizer, ep.token_ids, ep.spans),
            token_ids=[int(t) for t in ep.token_ids[ep.prompt_len :]],
            truncated=ep.truncated,
            reward=ep.info.reward,
            turns=len(ep.spans),
            turn_correct=list(ep.info.turn_correct),
        )

    def close(self) -> None:
        for owned in self._owned:
            owned.close()
        self._owned.clear()
