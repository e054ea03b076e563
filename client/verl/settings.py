"""Where a verl teacher entry points: opd's URLs and client options, from verl's config.

verl configures each teacher as `distillation.teacher_models.<name>`, with an `inference`
rollout config whose engines read their own options from `inference.engine_kwargs.<engine>`
(`vllm`, `sglang`); opd's replica reads `inference.engine_kwargs.opd`. The URLs may instead be
given as the teacher's `model_path` (verl requires that field anyway), so that one override
points a teacher at one opd server. Several URLs are replicas of one teacher: opd's client
spreads requests over them and routes around one that is down. Several teachers (verl's
multi-teacher OPD) are several entries, each with its own URLs.

Nothing here imports verl, Ray or torch: the replica reads its settings on the driver, and
the tests check every rule without verl.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from opd.client.teacher.base import DEFAULT_MAX_WAIT_S
from opd.client.teacher.replicas import normalise_urls

ENGINE = "opd"
FIELD = f"inference.engine_kwargs.{ENGINE}"
DEFAULT_API_KEY_ENV = "OPD_API_KEY"
OPTIONS = ("urls", "api_key_env", "timeout_s", "max_wait_s", "concurrency")


@dataclass(frozen=True)
class TeacherSettings:
    """What one verl teacher replica needs to reach its opd teacher."""

    urls: tuple[str, ...]
    api_key: str | None = None
    timeout_s: float = 600.0
    max_wait_s: float = DEFAULT_MAX_WAIT_S
    concurrency: int = 4

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of opd's TeacherClient / AsyncTeacherClient."""
        return {
            "base_url": list(self.urls),
            "api_key": self.api_key,
            "timeout_s": self.timeout_s,
            "max_wait_s": self.max_wait_s,
            "concurrency": self.concurrency,
        }


def _is_url(value: object) -> bool:
    return isinstance(value, str) and value.startswith(("http://", "https://"))


def _positive(options: Mapping[str, Any], name: str, default: float) -> float:
    value = options.get(name, default)
    if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{FIELD}.{name}: must be a positive number, got {value!r}")
    return float(value)


def read_settings(
    engine_kwargs: Mapping[str, Any] | None,
    model_path: str | None,
    environ: Mapping[str, str] = os.environ,
) -> TeacherSettings:
    """The settings of one teacher entry, every bad value refused with the field it came from."""
    options = dict((engine_kwargs or {}).get(ENGINE) or {})
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"{FIELD}: unknown option(s) {unknown}; known: {list(OPTIONS)}")
    urls = options.get("urls")
    if not urls:
        if not _is_url(model_path):
            raise ValueError(
                f"{FIELD}.urls: no opd teacher URL; give one or several, or set the teacher's "
                f"model_path to its URL (model_path is {model_path!r})"
            )
        urls = model_path
    if not isinstance(urls, str) and not all(isinstance(u, str) for u in urls):
        raise ValueError(f"{FIELD}.urls: must be a URL or a list of URLs, got {urls!r}")
    normalised = normalise_urls(urls)
    bad = [u for u in normalised if not _is_url(u)]
    if bad:
        raise ValueError(f"{FIELD}.urls: {bad} are not http:// or https:// URLs")
    key_env = options.get("api_key_env", DEFAULT_API_KEY_ENV)
    if not isinstance(key_env, str) or not key_env:
        raise ValueError(f"{FIELD}.api_key_env: must name an environment variable, got {key_env!r}")
    concurrency = _positive(options, "concurrency", 4)
    if concurrency != int(concurrency):
        raise ValueError(f"{FIELD}.concurrency: must be a whole number, got {concurrency!r}")
    return TeacherSettings(
        urls=tuple(normalised),
        api_key=environ.get(key_env) or None,
        timeout_s=_positive(options, "timeout_s", 600.0),
        max_wait_s=_positive(options, "max_wait_s", DEFAULT_MAX_WAIT_S),
        concurrency=int(concurrency),
    )
