"""Who answers the questions: a student model (folder or run checkpoint) through a rollout engine,
or a teacher service through `POST /v1/generate`.

Both take prompts as user messages (rendered with the chat template) or as token ids (used as
they are: the depth probe continues a rollout's prefix), and follow one seed rule, the teacher
service's: prompt i samples with seed + i, so a result does not depend on how prompts were
batched and before / after / teacher runs see the same seeds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from opd.client.configs.groups import StudentRuntime
from opd.shared.schemas import GenerateOptions

if TYPE_CHECKING:
    from opd.client.teacher import TeacherClient
    from opd.client.train.engines import RolloutEngine

Prompt = str | list[int]


@dataclass
class Completion:
    text: str  # special tokens removed (an episode's: its last assistant turn)
    token_ids: list[int]  # through the EOS when there is one (an episode's: all after its prompt)
    truncated: bool  # max_tokens reached without EOS (an episode's: a limit ended it)
    # episodes only (opd.client.evaluation.episode_source): the environment's reward (None if
    # it gives none), the assistant turns played, the per-turn grades where it keeps them
    reward: float | None = None
    turns: int | None = None
    turn_correct: list[bool] | None = None


class CompletionSource(Protocol):
    name: str

    def complete(
        self, prompts: Sequence[Prompt], params: GenerateOptions
    ) -> list[list[Completion]]:
        """params.n completions of every prompt, in prompt order."""
        ...

    def close(self) -> None: ...


def resolve_model_dir(path: str | Path) -> Path:
    """A model folder from what a user points at: a model folder, a run checkpoint
    (checkpoints/step_N, whose weights are in model/), or a run dir (its latest checkpoint)."""
    from opd.client.train.checkpoint import latest_checkpoint

    path = Path(path)
    # A run dir first: it holds a config.json too (opd train's TrainConfig), not a model's.
    if (path / "checkpoints").is_dir():
        latest = latest_checkpoint(path)
        if latest is not None and (latest / "model" / "config.json").is_file():
            return latest / "model"
    if (path / "model" / "config.json").is_file():
        return path / "model"
    if (path / "config.json").is_file() and "model_type" in (path / "config.json").read_text():
        return path
    raise FileNotFoundError(
        f"{path}: not a model folder, a checkpoint (model/config.json) or a run dir with "
        "checkpoints"
    )


class EngineSource:
    """A student sampled by a rollout engine (hf or vllm). Built from a folder with
    `from_model_dir`, or around the trainer's own engine and tokenizer (no second copy)."""

    def __init__(self, engine: RolloutEngine, tokenizer, name: str = "student") -> None:  # noqa: ANN001
        self.engine, self.tokenizer, self.name = engine, tokenizer, name
        self._owned: list[object] = []

    @classmethod
    def from_model_dir(
        cls,
        path: str | Path,
        runtime: StudentRuntime | None = None,
        seed: int = 0,
    ) -> EngineSource:
        """The student in `path` (folder, checkpoint or run dir), run as `runtime` says."""
        from opd.client.train.factory import build_student

        runtime = runtime or StudentRuntime()
        built = build_student(str(resolve_model_dir(path)), runtime, seed=seed)
        source = cls(built.engine, built.tokenizer, name=str(path))
        source._owned.append(built)
        return source

    def complete(
        self, prompts: Sequence[Prompt], params: GenerateOptions
    ) -> list[list[Completion]]:
        from opd.client.train.rollouts import SamplingParams
        from opd.shared.chat import chat_prompt_ids

        ids = [
            chat_prompt_ids(self.tokenizer, p) if isinstance(p, str) else list(p) for p in prompts
        ]
        sampling = SamplingParams.for_tokenizer(self.tokenizer, params)
        seed = 0 if params.seed is None else params.seed
        seeds = [seed + i for i in range(len(ids))]
        samples = self.engine.sample(ids, sampling, seeds) if ids else []
        return [
            [
                Completion(
                    self.tokenizer.decode(s.completion_ids, skip_special_tokens=True),
                    [int(t) for t in s.completion_ids],
                    bool(s.truncated),
                )
                for s in group
            ]
            for group in samples
        ]

    def close(self) -> None:
        for owned in self._owned:
            owned.close()  # type: ignore[attr-defined]
        self._owned.clear()


class TeacherSource:
    """A teacher service answering through POST /v1/generate (its own sampler and chat
    template). The client splits requests under the teacher's limits, keeping seed + i."""

    def __init__(self, client: TeacherClient, name: str = "teacher", owned: bool = False) -> None:
        self.client, self.name, self._owned = client, name, owned

    @classmethod
    def connect(cls, urls: Sequence[str], api_key: str | None = None) -> TeacherSource:
        from opd.client.teacher import TeacherClient

        client = TeacherClient(list(urls), api_key=api_key)
        client.connect()
        return cls(client, name=",".join(urls), owned=True)

    def complete(
        self, prompts: Sequence[Prompt], params: GenerateOptions
    ) -> list[list[Completion]]:
        from opd.shared.schemas import GenerateRequest

        if not prompts:
            return []
        texts = [p for p in prompts if isinstance(p, str)]
        if texts and len(texts) != len(prompts):
            raise ValueError("teacher prompts: all user messages or all token ids, not a mix")
        common = params.model_dump()  # the request carries the options as they are
        if texts:
            request = GenerateRequest(prompts=texts, **common)
        else:
            request = GenerateRequest(prompt_token_ids=[list(p) for p in prompts], **common)
        response = self.client.generate(request)
        return [
            [
                Completion(c.text, list(c.token_ids), c.finish_reason == "length")
                for c in r.completions
            ]
            for r in response.results
        ]

    def close(self) -> None:
        if self._owned:
            self.client.close()
