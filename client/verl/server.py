"""The Ray actor behind one opd teacher replica in verl: verl's `generate()` as `POST /v1/score`.

verl reaches a replica's server through its load balancer and calls
`server.generate.remote(request_id=..., prompt_ids=..., sampling_params=..., image_data=...,
video_data=...)` (verl.workers.rollout.llm_server.LLMServerClient). This class answers that
call from opd: one scoring request per call, sent by opd's asyncio client, which batches
nothing itself (the opd server batches across callers), retries a teacher that restarts and
spreads the calls over the replica's URLs. It also answers the lifecycle calls verl makes on
every replica (sleep, wake_up, ...) as no-ops: the teacher's memory is the opd server's.

This module imports neither verl nor Ray at import time (verl's TokenOutput is built inside
`generate`), so that it can be read and tested on its own; replica.py makes it a Ray actor.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from opd.client.teacher.client import AsyncTeacherClient
from opd.client.verl.layout import parse_call, score_request, verl_answer
from opd.client.verl.settings import TeacherSettings

_MEDIA = ("image_data", "video_data", "audio_data", "mm_processor_kwargs", "mm_processor_output")


class OpdTeacherServer:
    """One verl teacher replica's server: forwards to the opd URLs of `settings`."""

    def __init__(self, settings: TeacherSettings) -> None:
        self.settings = settings
        self._client: AsyncTeacherClient | None = None
        self._lock: asyncio.Lock | None = None

    async def _teacher(self) -> AsyncTeacherClient:
        # Made in the actor's own event loop (httpx's async client is bound to the loop).
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._client is None:
                client = AsyncTeacherClient(**self.settings.client_kwargs())
                await client.connect()
                self._client = client
        return self._client

    async def connect(self) -> dict[str, Any]:
        """GET /v1/model of the teacher (every URL): its name, limits and tokenizer fingerprint."""
        return (await (await self._teacher()).connect()).model_dump()

    async def generate(
        self,
        request_id: str,
        *,
        prompt_ids: Sequence[int],
        sampling_params: dict[str, Any],
        priority: int = 0,
        **media: Any,
    ) -> Any:
        """verl's TokenOutput for one teacher call; bad input raises with the field named."""
        from verl.workers.rollout.replica import TokenOutput

        unknown = sorted(set(media) - set(_MEDIA))
        if unknown:
            raise ValueError(f"generate: opd's verl replica takes no {unknown}")
        given = sorted(name for name, value in media.items() if value)
        if given:
            raise ValueError(
                f"{given}: opd's verl replica scores token ids only; multimodal teachers need "
                "verl's own vLLM or SGLang replica"
            )
        call = parse_call(prompt_ids, sampling_params)
        request = score_request(call)
        scores = None
        if request is not None:
            scores = (await (await self._teacher()).score(request)).sequence(0)
        answer = verl_answer(call, scores)
        return TokenOutput(
            token_ids=answer.token_ids,
            log_probs=answer.log_probs,
            stop_reason="completed",
            extra_fields=answer.extra_fields,
        )

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    # verl calls these on every replica; the teacher's memory and queue are the opd server's.
    async def wake_up(self) -> None: ...

    async def sleep(self) -> None: ...

    async def abort_all_requests(self, reject_request: bool = False) -> None: ...

    async def resume_generation(self) -> None: ...

    async def clear_kv_cache(self) -> None: ...

    async def release_kv_cache(self) -> None: ...

    async def resume_kv_cache(self) -> None: ...

    async def start_profile(self, **kwargs: Any) -> None: ...

    async def stop_profile(self) -> None: ...
