"""The one place a student, its rollout engine and its teacher connections are built.

`opd train`, `opd probe`, `opd select-prompts`, `opd eval` (its student sources) and `opd
bench-train` all need the same three things: the student model and tokenizer loaded in the
configured dtype and device, the StudentModule every pass goes through, and a rollout engine
over it (hf or vllm, with the context the engine's KV cache is sized for); most also connect
their teachers with the protocol, tokenizer and limit checks. Built here once, they cannot
drift between commands (the probe once built its vllm engine without the context cap).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from opd.client.configs.groups import SamplingGroup, StudentRuntime, TeacherConnection
from opd.client.train.bridge import ScoreSpec
from opd.client.train.cross_tokenizer import CrossSetup, cross_connect
from opd.client.train.engines import RolloutEngine, make_engine
from opd.client.train.pipeline import Connected, connect_teachers
from opd.client.train.rollouts import SamplingParams
from opd.client.train.student import load_student
from opd.client.train.student_math import StudentModule
from opd.modeling.gguf import model_folder
from opd.shared.fingerprint import fingerprint_hf_tokenizer

# The vllm engine's KV cache is sized for its context; longer than this is not needed here.
MAX_ENGINE_CONTEXT = 8192


def engine_max_len(model_config: Any) -> int:
    """The vllm engine's context: the model's, capped at 8,192 (its KV cache is sized for it)."""
    length = getattr(model_config, "max_position_embeddings", 4096) or 4096
    return int(min(length, MAX_ENGINE_CONTEXT))


@dataclass
class Student:
    """A loaded student: the model, its tokenizer, the module every pass goes through and the
    engine that samples it. `close()` releases the engine (vllm holds its own copy)."""

    model: Any
    tokenizer: Any
    module: StudentModule
    engine: RolloutEngine
    model_dir: str
    # A LoRA student (opd.client.train.lora): the PeftModel around `model`; None otherwise
    peft: Any = None
    _closed: bool = field(default=False, repr=False)

    def sampling(self, group: SamplingGroup) -> SamplingParams:
        """The engine's sampling parameters: the group's, ended by the model's EOS ids."""
        return SamplingParams.for_tokenizer(
            self.tokenizer, group.options(), getattr(self.model, "generation_config", None)
        )

    def fingerprint(self) -> str:
        return fingerprint_hf_tokenizer(self.tokenizer)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.engine.close()

    def __enter__(self) -> Student:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def build_student(
    model_dir: str,
    runtime: StudentRuntime,
    *,
    train: bool = False,
    objective: Any = None,
    head_chunk_tokens: int | None = None,
    share_prompts: bool = True,
    gradient_checkpointing: bool = False,
    device: str | torch.device | None = None,
    seed: int = 0,
    before_engine: Callable[[StudentModule], None] | None = None,
    lora: Any = None,
    adapter: Path | None = None,
) -> Student:
    """Load the student from `model_dir` as `runtime` says, wrap it, and start its engine.

    train: the model stays in training mode (the trainer); otherwise it is put in eval mode.
    device: overrides runtime.device (a torchrun rank's own device).
    before_engine: called with the module before the engine starts (the trainer shards it
    with FSDP there, so the engine sees the module it will train).
    lora: a LoraGroup with rank > 0 makes a LoRA student (opd.client.train.lora): fresh
    adapters, or those saved in `adapter` (resume), injected before anything wraps the model."""
    model_dir = model_folder(model_dir)  # a .gguf: its converted folder, for the engine too
    model, tokenizer = load_student(
        model_dir,
        runtime.dtype,
        device if device is not None else runtime.device,
        gradient_checkpointing,
    )
    peft = None
    if lora is not None and lora.rank:
        from opd.client.train.lora import apply_lora

        peft = apply_lora(model, lora, adapter)
    model.train(train)
    kwargs: dict[str, Any] = {}
    if head_chunk_tokens is not None:
        kwargs["chunk_tokens"] = head_chunk_tokens
    module = StudentModule(model, objective, share_prompts=share_prompts, **kwargs)
    if before_engine is not None:
        before_engine(module)
    engine = make_engine(
        runtime.rollout_engine,
        module,
        model_dir=model_dir,
        hf_max_sequences=runtime.hf_max_sequences,
        max_model_len=engine_max_len(model.config),
        gpu_memory_utilization=runtime.vllm_gpu_memory_utilization,
        sleep=runtime.vllm_sleep,
        seed=seed,
        lora_rank=lora.rank if peft is not None and lora.sync == "adapters" else 0,
    )
    return Student(model, tokenizer, module, engine, model_dir, peft)


def connect(
    teachers: Sequence[tuple[str | None, list[str]]],
    connection: TeacherConnection,
    spec: ScoreSpec,
    n_candidates: int,
    *,
    fingerprint: str | None,
    keep_going: bool = False,
    log: Callable[[str], None] = lambda _: None,
    cross: CrossSetup | None = None,
) -> Connected:
    """Connect each (name, replica URLs) teacher with the command's connection options: the
    API key, the tokenizer check against the student's `fingerprint` (unless the user allowed a
    mismatch) and how long a restarting teacher is waited for.

    With `cross` (its mode not off), a teacher of another tokenizer is not refused: its
    tokenizer is fetched and its requests go through the cross-tokenizer path
    (opd.client.train.cross_tokenizer), said up front through `log`."""
    crossing = cross is not None and cross.mode != "off"
    connected = connect_teachers(
        teachers,
        spec,
        n_candidates,
        keep_going=keep_going,
        log=log,
        api_key=connection.api_key,
        tokenizer_fingerprint=None if crossing else fingerprint,
        allow_tokenizer_mismatch=connection.allow_tokenizer_mismatch,
        max_wait_s=connection.wait_s,
    )
    if crossing:
        assert cross is not None and fingerprint is not None
        try:
            for teacher in connected.teachers:
                line = cross_connect(teacher.bridge, teacher.info, cross, fingerprint)
                if line is not None:
                    log(line)
        except Exception:
            connected.close()
            raise
    return connected
