"""TeacherClient (sync) and AsyncTeacherClient: score sequences on a teacher service.

    from opd.client import TeacherClient
    from opd.shared import ScoreRequest, SequenceIn

    with TeacherClient("http://127.0.0.1:8000") as teacher:
        result = teacher.score(ScoreRequest(top_k=16, entropy=True, sequences=[
            SequenceIn(token_ids=[1, 2, 3, 4], score_from=2)]))
        result.sequence(0).token_logprobs        # numpy [n_scored]

        # scored spans (protocol 1.3), e.g. each assistant turn: rows for positions 1, 2, 5
        teacher.score(ScoreRequest(sequences=[
            SequenceIn(token_ids=[1, 2, 3, 4, 5, 6], score_spans=[(1, 3), (5, 6)])]))

Both classes pool connections (httpx), fetch GET /v1/model once on connect (protocol and
tokenizer-fingerprint check), cut a large batch into requests under the server's limits (a
sequence's scored spans and candidate rows stay with it), send them concurrently, retry
429/503/connection errors with exponential backoff and jitter (honoring Retry-After), and
return one PackedResult in the caller's sequence order. Scoring is a pure function of the
request, so a retried request can never be counted twice.

Retries are bounded in time (ClientConfig.max_wait_s, 10 minutes by default), not by a count:
a teacher that is killed and restarted, here or as a rescheduled pod, is simply waited for, and
the caller's step completes with the same numbers as without the restart.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

import opd.client.teacher.base as base
from opd.client.teacher.base import ClientConfig
from opd.client.teacher.errors import (
    IncompatibleTeacherError,
    OPDClientError,
    TeacherConnectionError,
    TeacherHTTPError,
    parse_error,
)
from opd.client.teacher.replicas import ReplicaSet
from opd.shared.packed import PackedRequest, PackedResult
from opd.shared.schemas import (
    GenerateRequest,
    GenerateResponse,
    ModelInfo,
    ScoreRequest,
    TokenizerFiles,
)
from opd.shared.version import TOKENIZER_ROUTE_SINCE, at_least

logger = logging.getLogger(__name__)

_RETRYABLE_TRANSPORT = (httpx.TransportError,)


def _should_retry(exc: Exception) -> bool:
    if isinstance(exc, TeacherHTTPError):
        return exc.status in base.RETRYABLE_STATUS
    return isinstance(exc, _RETRYABLE_TRANSPORT)


def _replica_down(exc: Exception) -> bool:
    """Transport failures and 503 (draining/loading) take a replica out for a while; a 429
    only means that replica is busy right now."""
    if isinstance(exc, TeacherHTTPError):
        return exc.status in (502, 503, 504)
    return isinstance(exc, _RETRYABLE_TRANSPORT)


def _raise_retryable(response: httpx.Response) -> httpx.Response:
    """Turn 429/503/... into an exception so that the retry loop sees it."""
    if response.status_code in base.RETRYABLE_STATUS:
        raise parse_error(
            response.status_code, response.content, response.headers.get("retry-after")
        )
    return response


def _give_up(exc: Exception, attempts: int) -> Exception:
    if isinstance(exc, httpx.TransportError):
        return TeacherConnectionError(f"teacher unreachable after {attempts} attempts: {exc!r}")
    return exc


def _out_of_time(
    exc: Exception, url: str, attempts: int, waited: float, config: ClientConfig
) -> Exception:
    """The error once the time budget is spent: it names the setting that would have waited
    longer, and keeps an HTTP error's type (a caller may tell 429 from 503)."""
    why = (
        f"teacher {url} still failing after {waited:.0f}s and {attempts} attempts; gave up at "
        f"the client's max_wait_s={config.max_wait_s:g} (opd train: --teacher-wait-s)"
    )
    if isinstance(exc, TeacherHTTPError):
        detail = exc.detail.model_copy(update={"message": f"{exc.detail.message} ({why})"})
        return type(exc)(exc.status, detail, exc.retry_after)
    return TeacherConnectionError(f"{why}: {exc!r}")


def _connect_again(
    infos: dict[str, ModelInfo], errors: list[Exception], config: ClientConfig, started: float
) -> bool:
    """Whether connect should go round the replicas once more: none answered, all of them
    only because they are down (not because they refused us), and the time budget is not
    spent. Only for several replicas with no max_retries: each one is given up on after a
    short count at connect (so one dead replica does not hold up the others), and this loop
    is what still waits out a restart of all of them."""
    return (
        not infos
        and config.max_retries is None
        and len(config.urls) > 1
        and all(isinstance(e, TeacherConnectionError) or _should_retry(e) for e in errors)
        and time.monotonic() - started < config.max_wait_s
    )


class TeacherClient(base.BaseTeacherClient):
    """Blocking client; chunks of one batch go out concurrently on a small thread pool."""

    def __init__(self, base_url: str | Sequence[str], **kwargs: Any) -> None:
        """`base_url`: one teacher URL or several replicas'; `kwargs`: api_key, encoding,
        tokenizer_fingerprint, allow_tokenizer_mismatch and the other ClientConfig fields."""
        super().__init__(base_url, **kwargs)
        self._http = httpx.Client(**self.config.httpx_kwargs())
        self._pool = ThreadPoolExecutor(max_workers=max(1, self.config.concurrency))

    def __enter__(self) -> TeacherClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._http.close()

    def connect(self) -> ModelInfo:
        """GET /v1/model of every replica; check protocol, tokenizer and agreement; cached."""
        if self._info is None:
            started = time.monotonic()
            while True:
                infos: dict[str, ModelInfo] = {}
                errors: list[Exception] = []
                for url in self.config.urls:
                    try:
                        response = self._with_retries(
                            lambda u: _raise_retryable(self._http.get(u + "/v1/model")), pin=url
                        )
                        infos[url] = _model_info(response)
                    except (TeacherConnectionError, TeacherHTTPError) as exc:
                        errors.append(exc)
                if not _connect_again(infos, errors, self.config, started):
                    break
                logger.warning("no teacher replica answered (%s); trying them again", errors[0])
            self._info = _connected(infos, errors, self.config)
        return self._info

    def tokenizer(self) -> TokenizerFiles:
        """GET /v1/tokenizer: the teacher's tokenizer files (cross-tokenizer OPD)."""
        info = self.connect()
        _check_tokenizer_route(info)
        response = self._with_retries(
            lambda u: _raise_retryable(self._http.get(u + "/v1/tokenizer"))
        )
        return _tokenizer_files(response, info)

    def score(self, request: ScoreRequest | PackedRequest) -> PackedResult:
        subs = self._score_requests(request, self.connect())
        if len(subs) == 1:
            return self._score_one(subs[0])
        return base.merge(list(self._pool.map(self._score_one, subs)))

    def _score_one(self, req: PackedRequest) -> PackedResult:
        body, headers = base.encode(req, self.config.encoding)

        def send(url: str) -> httpx.Response:
            return _raise_retryable(
                self._http.post(url + "/v1/score", content=body, headers=headers)
            )

        return base.decode(self._with_retries(send))

    def generate(self, request: GenerateRequest) -> GenerateResponse:
        """Teacher completions (POST /v1/generate), split under the teacher's limits."""
        info = self.connect()
        parts = base.split_generate(request, info.limits)
        return base.merge_generate(list(self._pool.map(self._generate_one, parts)))

    def _generate_one(self, req: GenerateRequest) -> GenerateResponse:
        body, headers = base.generate_body(req)

        def send(url: str) -> httpx.Response:
            try:
                response = self._http.post(url + "/v1/generate", content=body, headers=headers)
            except httpx.ReadTimeout as exc:
                raise _generate_timeout(self.config.timeout_s) from exc
            return _raise_retryable(response)

        return base.decode_generate(self._with_retries(send))

    def _with_retries(
        self, send: Callable[[str], httpx.Response], pin: str | None = None
    ) -> httpx.Response:
        retry = _Retry(self.config, self.replicas, pinned=pin is not None)
        while True:
            url = pin or self.replicas.pick()
            try:
                return send(url)
            except (TeacherHTTPError, httpx.TransportError) as exc:
                time.sleep(retry.delay(exc, url))


class AsyncTeacherClient(base.BaseTeacherClient):
    """asyncio client; chunks of one batch go out concurrently, bounded by `concurrency`."""

    def __init__(self, base_url: str | Sequence[str], **kwargs: Any) -> None:
        """As TeacherClient's."""
        super().__init__(base_url, **kwargs)
        self._http = httpx.AsyncClient(**self.config.httpx_kwargs())
        self._limit = asyncio.Semaphore(max(1, self.config.concurrency))

    async def __aenter__(self) -> AsyncTeacherClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def connect(self) -> ModelInfo:
        """GET /v1/model of every replica; check protocol, tokenizer and agreement; cached."""
        if self._info is None:

            async def one(url: str) -> ModelInfo | Exception:
                async def get(u: str) -> httpx.Response:
                    return _raise_retryable(await self._http.get(u + "/v1/model"))

                try:
                    return _model_info(await self._with_retries(get, pin=url))
                except (TeacherConnectionError, TeacherHTTPError) as exc:
                    return exc

            started = time.monotonic()
            while True:
                answers = await asyncio.gather(*(one(u) for u in self.config.urls))
                infos = {
                    u: a
                    for u, a in zip(self.config.urls, answers, strict=True)
                    if isinstance(a, ModelInfo)
                }
                errors = [a for a in answers if isinstance(a, Exception)]
                if not _connect_again(infos, errors, self.config, started):
                    break
                logger.warning("no teacher replica answered (%s); trying them again", errors[0])
            self._info = _connected(infos, errors, self.config)
        return self._info

    async def tokenizer(self) -> TokenizerFiles:
        """GET /v1/tokenizer: the teacher's tokenizer files (cross-tokenizer OPD)."""
        info = await self.connect()
        _check_tokenizer_route(info)

        async def get(u: str) -> httpx.Response:
            return _raise_retryable(await self._http.get(u + "/v1/tokenizer"))

        return _tokenizer_files(await self._with_retries(get), info)

    async def score(self, request: ScoreRequest | PackedRequest) -> PackedResult:
        subs = self._score_requests(request, await self.connect())
        parts = await asyncio.gather(*(self._score_one(s) for s in subs))
        return base.merge(list(parts))

    async def _score_one(self, req: PackedRequest) -> PackedResult:
        body, headers = base.encode(req, self.config.encoding)

        async def send(url: str) -> httpx.Response:
            async with self._limit:
                response = await self._http.post(url + "/v1/score", content=body, headers=headers)
            return _raise_retryable(response)

        return base.decode(await self._with_retries(send))

    async def generate(self, request: GenerateRequest) -> GenerateResponse:
        """Teacher completions (POST /v1/generate), split under the teacher's limits."""
        info = await self.connect()
        parts = base.split_generate(request, info.limits)
        return base.merge_generate(list(await asyncio.gather(*map(self._generate_one, parts))))

    async def _generate_one(self, req: GenerateRequest) -> GenerateResponse:
        body, headers = base.generate_body(req)

        async def send(url: str) -> httpx.Response:
            async with self._limit:
                try:
                    response = await self._http.post(
                        url + "/v1/generate", content=body, headers=headers
                    )
                except httpx.ReadTimeout as exc:
                    raise _generate_timeout(self.config.timeout_s) from exc
            return _raise_retryable(response)

        return base.decode_generate(await self._with_retries(send))

    async def _with_retries(
        self, send: Callable[[str], Any], pin: str | None = None
    ) -> httpx.Response:
        retry = _Retry(self.config, self.replicas, pinned=pin is not None)
        while True:
            url = pin or self.replicas.pick()
            try:
                return await send(url)
            except (TeacherHTTPError, httpx.TransportError) as exc:
                await asyncio.sleep(retry.delay(exc, url))


# At connect, a replica is asked on its own ("pinned"). While other replicas exist, a pinned
# request gives up after this many retries unless max_retries says otherwise, so that one dead
# replica holds start-up for some 15-25 s, not for max_wait_s (_connect_again still
# waits out the case where every replica is down).
_PINNED_RETRIES = 6


class _Retry:
    """One request's retry state: attempts so far and since when it has been failing (the
    time budget counts from the first failure)."""

    def __init__(self, config: ClientConfig, replicas: ReplicaSet, pinned: bool) -> None:
        self.config, self.replicas, self.pinned = config, replicas, pinned
        self.attempt = 0
        self.failing_since: float | None = None

    def delay(self, exc: Exception, url: str) -> float:
        """Seconds to sleep before the next attempt, or raise when the error is final."""
        now = time.monotonic()
        if self.failing_since is None:
            self.failing_since = now
        wait = _retry_delay(
            self.config,
            self.replicas,
            exc,
            url,
            self.attempt,
            pinned=self.pinned,
            waited=now - self.failing_since,
        )
        self.attempt += 1
        return wait


def describe_error(exc: BaseException) -> str:
    """The error for a log line: some transport errors (a dropped connection) have an empty
    message, and "teacher URL: ; retry 1" tells an operator nothing, so name the type too."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _retry_delay(
    config: ClientConfig,
    replicas: ReplicaSet,
    exc: Exception,
    url: str,
    attempt: int,
    pinned: bool,
    waited: float,
) -> float:
    """Seconds to wait before the next attempt, or raise when the error is final.

    `waited` is how long this request has been failing. A replica that is down is ejected;
    while another replica is healthy the request moves there at once. Otherwise capped
    exponential backoff with jitter, honoring Retry-After, never sleeping past the time budget
    (the last attempt lands on it)."""
    extra = len(replicas.urls) - 1
    limit = config.max_retries
    if limit is None and pinned and extra:
        limit = _PINNED_RETRIES
    if not _should_retry(exc) or (limit is not None and attempt >= limit + extra):
        raise _give_up(exc, attempt + 1) from exc
    remaining = config.max_wait_s - waited
    if remaining <= 0:
        raise _out_of_time(exc, url, attempt + 1, waited, config) from exc
    if _replica_down(exc) and not pinned:
        replicas.eject(url)
        if replicas.healthy() > 0:
            logger.warning("teacher %s: %s; moving to another replica", url, describe_error(exc))
            return 0.0
    delay = base.backoff_delay(config, attempt, getattr(exc, "retry_after", None))
    delay = min(delay, remaining)
    logger.warning(
        "teacher %s: %s; retry %d in %.2fs (failing for %.0fs of max_wait_s %g)",
        url,
        describe_error(exc),
        attempt + 1,
        delay,
        waited,
        config.max_wait_s,
    )
    return delay


def _generate_timeout(timeout_s: float) -> TeacherConnectionError:
    """A generate request that timed out is not retried: the server may still be sampling it,
    and a retry would redo all of its work (scoring, a pure function, retries safely)."""
    return TeacherConnectionError(
        f"POST /v1/generate timed out after {timeout_s:.0f}s and is not retried; raise the "
        "client's timeout_s, or send fewer prompts or a smaller max_tokens per call"
    )


def _tokenizer_files(response: httpx.Response, info: ModelInfo) -> TokenizerFiles:
    if response.status_code >= 300:
        raise parse_error(response.status_code, response.content)
    files = TokenizerFiles.model_validate_json(response.content)
    if files.tokenizer_fingerprint != info.tokenizer_fingerprint:
        raise IncompatibleTeacherError(
            "GET /v1/tokenizer answered for another tokenizer than GET /v1/model describes "
            "(replicas serving different models?)"
        )
    return files


def _check_tokenizer_route(info: ModelInfo) -> None:
    if not at_least(info.protocol_version, TOKENIZER_ROUTE_SINCE):
        raise IncompatibleTeacherError(
            f"teacher {info.name} speaks protocol {info.protocol_version}; handing out its "
            "tokenizer (GET /v1/tokenizer, for cross-tokenizer OPD) needs 1.4 or later"
        )


def _model_info(response: httpx.Response) -> ModelInfo:
    if response.status_code >= 300:
        raise parse_error(response.status_code, response.content)
    return ModelInfo.model_validate_json(response.content)


def _connected(
    infos: dict[str, ModelInfo], errors: list[Exception], config: ClientConfig
) -> ModelInfo:
    """Merge the replicas that answered; fail if none did (or if any refused us)."""
    fatal = [e for e in errors if isinstance(e, TeacherHTTPError) and not _should_retry(e)]
    if fatal:
        raise fatal[0]
    if not infos:
        raise errors[0] if errors else TeacherConnectionError("no teacher replica answered")
    info = base.merge_model_infos(infos)
    base.check_model_info(info, config)
    return info


__all__ = ["AsyncTeacherClient", "OPDClientError", "TeacherClient"]
