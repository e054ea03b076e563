"""Server settings, read from OPD_* environment variables (or passed in by `opd serve` / tests).

Injected into create_app rather than read globally, so a test can start an app with its own
settings. Every field maps to one variable: OPD_MODEL, OPD_PORT, OPD_API_KEY, OPD_MAX_SEQUENCES...
The request limits are declared once, in opd.shared.limits.Limits, and nested here as `limits`.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar, Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from opd.shared.config_cli import CliSpec
from opd.shared.limits import Limits


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OPD_", extra="ignore")
    # `opd serve`'s flags: the limits flat (--max-sequences), the API key only from OPD_API_KEY
    # (a command line is visible in `ps`).
    cli: ClassVar[CliSpec] = CliSpec(nested={"limits": ""}, exclude=("api_key",), env_prefix="OPD_")

    # --- model and backend
    model: str | None = Field(
        default=None, description="local folder or hub id; unset = embedded SmolLM2-135M-Instruct"
    )
    backend: Literal["hf", "vllm"] = Field(
        default="hf", description="hf: transformers in-process; vllm: vLLM engine (pooling runner)"
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="auto = float32 on CPU, bfloat16 on CUDA"
    )
    device: str = Field(default="auto", description="auto, cpu, cuda or cuda:N")
    served_model_name: str | None = Field(
        default=None,
        description="the model name GET /v1/models lists (what OpenAI-shaped requests send as "
        "`model`); unset: the model's own name",
    )
    trust_remote_code: bool = False
    max_model_len: int | None = Field(default=None, ge=2, description="cap on the model context")
    cache_dir: str | None = Field(default=None, description="where the embedded model is cached")
    torch_threads: int | None = Field(default=None, ge=1, description="torch intra-op threads")
    cpu_streams: int | None = Field(
        default=None,
        ge=1,
        description="hf on CPU: packs split across this many threads, each running the model "
        "on its share of the torch threads (opd.server.streams); unset: 2 with 2+ threads",
    )
    cpu_gemm: Literal["auto", "torch", "numpy"] = Field(
        default="auto",
        description="hf on CPU, float32: the BLAS of single-thread streams' matmuls; auto: "
        "numpy's OpenBLAS on AMD CPUs, torch's MKL elsewhere (opd.modeling.cpu_gemm)",
    )
    retain_freed_memory: bool = Field(
        default=True,
        description="on CPU: glibc keeps freed blocks for reuse instead of returning them to "
        "the OS, which spares each forward pass ~10^5 page faults (opd.server.allocator)",
    )

    # --- vLLM backend only (ignored by hf)
    tensor_parallel_size: int = Field(default=1, ge=1, description="GPUs one replica spans")
    gpu_memory_utilization: float = Field(
        default=0.85, gt=0, le=1, description="fraction of GPU memory vLLM may take"
    )
    enforce_eager: bool | None = Field(
        default=None,
        description="no CUDA graphs / torch.compile; unset: eager on CPU (torch.compile's "
        "warm-up took ~160 s per engine on a 2-core VM), compiled on GPUs",
    )
    enable_prefix_caching: bool = Field(
        default=False, description="reuse KV of shared prefixes (see docs/vllm.md for the caveat)"
    )
    vllm_max_num_seqs: int | None = Field(default=None, ge=1, description="sequences per step")
    vllm_kv_cache_gib: float | None = Field(
        default=None,
        gt=0,
        description="KV cache of each vLLM engine, GiB; unset on CPU: room for one pack "
        "(max(max_batch_tokens, max_model_len) tokens); unset on GPU: vLLM's share of "
        "gpu_memory_utilization (opd.server.backends.vllm_memory)",
    )
    generate_memory_share: float = Field(
        default=0.3,
        gt=0,
        lt=1,
        description="vllm on GPU: share of gpu_memory_utilization given to the generate engine",
    )

    # --- POST /v1/generate
    generate: bool = Field(
        default=True,
        description="serve POST /v1/generate; on vllm this starts a second engine (runner "
        "generate) with its own copy of the weights",
    )
    max_generate_queue: int = Field(
        default=16, ge=1, description="generate requests waiting or running beyond which: 429"
    )

    # --- HTTP
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    api_key: SecretStr | None = Field(default=None, description="require Authorization: Bearer")
    api_keys: list[SecretStr] = Field(
        default_factory=list,
        description="more accepted keys (JSON list), each with its own rate-limit bucket; logs "
        "name a key by a short hash, never by its value",
    )
    rate_limit_rps: float = Field(
        default=0, ge=0, description="requests per second allowed per API key; 0 = unlimited"
    )
    rate_limit_burst: int = Field(
        default=20, ge=1, description="requests a key may send at once above rate_limit_rps"
    )
    ssl_certfile: str | None = Field(
        default=None,
        description="serve HTTPS with this PEM certificate (chain); needs ssl_keyfile. Or "
        "terminate TLS at the ingress (docs/operations.md)",
    )
    ssl_keyfile: str | None = Field(default=None, description="the certificate's PEM key")
    log_level: str = "info"

    # --- limits of one request (shared with clients through GET /v1/model). Declared once, in
    # opd.shared.limits.Limits; each field is still its own variable (OPD_MAX_SEQUENCES, ...)
    # and flag (--max-sequences), read by LimitsEnvSource below.
    limits: Limits = Field(default_factory=Limits, description="limits of one request")

    # --- batching and backpressure
    max_batch_tokens: int | None = Field(
        default=None,
        ge=16,
        description="padded tokens per forward pass; unset: 1024 for hf on CPU, else 8192",
    )
    max_wait_ms: float = Field(
        default=2.0, ge=0, description="how long the batcher waits to coalesce more requests"
    )
    max_queue_tokens: int = Field(
        default=262144, ge=1, description="queued tokens beyond which new requests get 429"
    )
    max_queue_wait_s: float = Field(
        default=30.0,
        ge=0,
        description="expected queue wait (queued tokens / measured tokens per second) beyond "
        "which new score requests get 429 with Retry-After; 0 = no bound",
    )
    logits_chunk_tokens: int | None = Field(
        default=None, ge=1, description="LM-head rows per tile; unset: 1024 on CPU, 256 on GPUs"
    )
    logits_chunk_vocab: int | None = Field(
        default=None,
        ge=0,
        description="LM-head vocabulary columns per tile; unset: 4096 on CPU, the whole "
        "vocabulary on GPUs; 0 = whole vocabulary",
    )
    min_shared_prefix: int = Field(
        default=16,
        ge=0,
        description="hf: sequences of one pack with the same context of at least this many "
        "tokens run it through the decoder once (n rollouts of a prompt); 0 = off",
    )
    warmup: bool = True
    drain_timeout_s: float = Field(default=30.0, ge=0, description="graceful shutdown budget")

    def pack_budget(self, device: str, streams: int = 1) -> int:
        """Padded tokens per pack. On CPU (hf) small passes win: a 1,024-token pass of SmolLM2
        keeps its activations in cache and scored ~15% more tokens/s than a 4,096-token one
        (docs/benchmarks.md), so a pack holds 1,024 tokens per CPU stream. GPUs and vLLM's own
        scheduler want large packs."""
        if self.max_batch_tokens:
            return self.max_batch_tokens
        return 1024 * streams if self.backend == "hf" and device.startswith("cpu") else 8192

    def scoring_tiles(self, device: str) -> tuple[int, int]:
        """(rows, vocabulary columns; 0 = all) of one LM-head tile (opd.modeling.scoring).

        On CPU a 1,024 x 4,096 float32 tile (16 MB) stays in the last-level cache through the
        matmul and the passes that read it, which halved the scoring math against
        whole-vocabulary chunks (docs/benchmarks.md). On GPUs whole-vocabulary tiles launch fewer
        kernels, and 256 rows keep the temporaries of a 152k vocabulary near 400 MB."""
        cpu = device.startswith("cpu")
        rows = self.logits_chunk_tokens or (1024 if cpu else 256)
        vocab = self.logits_chunk_vocab
        if vocab is None:
            vocab = 4096 if cpu else 0
        return rows, vocab

    def effective_limits(self, max_model_len: int | None = None) -> Limits:
        """The limits served: the configured ones, clamped to the model's context."""
        return self.limits.clamp_to_context(max_model_len) if max_model_len else self.limits

    @classmethod
    def env_names(cls) -> set[str]:
        """Every OPD_* variable the server reads: its own fields and each Limits field."""
        prefix = cls.model_config.get("env_prefix", "").upper()
        names = [n for n in cls.model_fields if n != "limits"] + list(LIMIT_FIELDS)
        return {prefix + n.upper() for n in names}

    @model_validator(mode="after")
    def _tls_pair(self) -> Settings:
        """A certificate without its key (or the reverse) is a half-configured TLS that would
        otherwise fail only when uvicorn binds: refuse it with the settings' names."""
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("OPD_SSL_CERTFILE and OPD_SSL_KEYFILE must be set together")
        return self

    @model_validator(mode="before")
    @classmethod
    def _nest_limits(cls, data: Any) -> Any:
        """Flat limit names (Settings(max_sequences=8), a ConfigMap's keys) go into `limits`."""
        if not isinstance(data, dict):
            return data
        flat = {k: data[k] for k in LIMIT_FIELDS if k in data}
        if not flat:
            return data
        rest = {k: v for k, v in data.items() if k not in flat}
        nested = rest.get("limits") or {}
        if isinstance(nested, Limits):
            nested = nested.model_dump()
        return {**rest, "limits": {**nested, **flat}}

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (
            init_settings,
            env_settings,
            LimitsEnvSource(settings_cls),
            dotenv_settings,
            file_secret_settings,
        )


LIMIT_FIELDS = tuple(Limits.model_fields)


class LimitsEnvSource(PydanticBaseSettingsSource):
    """OPD_<LIMIT> variables (OPD_MAX_SEQUENCES, ...) into Settings.limits, so every Limits
    field keeps its own flat variable without Settings restating the field."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # the whole work is in __call__

    def __call__(self) -> dict[str, Any]:
        prefix = self.settings_cls.model_config.get("env_prefix", "")
        values = {
            name: os.environ[prefix.upper() + name.upper()]
            for name in LIMIT_FIELDS
            if prefix.upper() + name.upper() in os.environ
        }
        return {"limits": values} if values else {}
