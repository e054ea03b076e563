"""A contender that runs in its own process, driven over stdin/stdout by the bench runner.

Each contender gets a process so that its peak memory is its own and so that the runner can
alternate rounds between contenders that all stay loaded. Protocol: one JSON object per line.
The runner writes {"cmd": "round"} / {"cmd": "peak"} / {"cmd": "quit"}; the worker answers one
JSON line per command. Logs go to stderr.

    python -m opd.bench.worker KIND CONFIG_JSON

KIND: inprocess (opd's backend called directly, no HTTP, no encoding), naive (HF forward, full
log_softmax, vLLM-shaped JSON dicts), matmul (the machine's float32 matmul rate), longseq (peak
memory of the scoring math on one long sequence, chunked versus full logits).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from opd.bench.procmem import peak_rss_bytes, reset_peak, rss_bytes
from opd.bench.workload import WorkloadConfig, make_requests


def _timed_round(requests: list, score_one: Callable[[Any], int]) -> dict[str, Any]:
    """Score every request once; latency per request, total wall time and response bytes."""
    latencies, total_bytes = [], 0
    started = time.perf_counter()
    for req in requests:
        t0 = time.perf_counter()
        total_bytes += score_one(req)
        latencies.append(time.perf_counter() - t0)
    return {
        "seconds": time.perf_counter() - started,
        "latencies": latencies,
        "response_bytes": total_bytes,
    }


class InProcess:
    """opd's backend (HF) called on each request's items: the ceiling for the HTTP service."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        from opd.server.backends.hf import HFBackend
        from opd.server.settings import Settings

        settings = Settings(
            model=cfg["model"], dtype="float32", device=cfg.get("device", "cpu"), warmup=False
        )
        self.backend = HFBackend(settings)
        info = self.backend.load()
        # recorded with the results: the server decides the same from the same settings
        self.setup = {"streams": self.backend.streams, "cpu_gemm": self.backend.gemm}
        self.requests = make_requests(WorkloadConfig(**cfg["workload"]), info.vocab_size)

    def round(self) -> dict[str, Any]:
        from opd.server.backends.base import items_from_request

        def score(req: Any) -> int:
            self.backend.score_pack(items_from_request(req))
            return 0  # nothing is encoded: there is no response

        return _timed_round(self.requests, score)


class Naive:
    """What a user writes without a service: HF forward over the padded batch, full-vocab
    log_softmax, and per position a JSON dict {token_id: logprob} of the top-k plus the actual
    token (the shape vLLM's prompt_logprobs returns)."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        from transformers import AutoModelForCausalLM

        self.device = torch.device(cfg.get("device", "cpu"))
        self.model = AutoModelForCausalLM.from_pretrained(cfg["model"], dtype=torch.float32)
        self.model.to(self.device).eval()
        self.wl = WorkloadConfig(**cfg["workload"])
        self.requests = make_requests(self.wl, int(self.model.config.vocab_size))

    @torch.inference_mode()
    def round(self) -> dict[str, Any]:
        def score(req: Any) -> int:
            lens = req.seq_lens_n
            ids = torch.zeros((req.n_sequences, int(lens.max())), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i in range(req.n_sequences):
                ids[i, : lens[i]] = torch.from_numpy(req.tokens(i).astype(np.int64))
                mask[i, : lens[i]] = 1
            logits = self.model(
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device)
            ).logits.float()
            logp = torch.log_softmax(logits, dim=-1)
            out = []
            for i in range(req.n_sequences):
                sf, n = int(req.score_from_n[i]), int(lens[i])
                rows = logp[i, sf - 1 : n - 1]
                vals, top = rows.topk(self.wl.top_k, dim=-1)
                actual = torch.from_numpy(req.tokens(i)[sf:n].astype(np.int64)).to(self.device)
                actual_lp = rows.gather(1, actual[:, None])[:, 0]
                positions = []
                for t in range(rows.shape[0]):
                    d = dict(zip(top[t].tolist(), vals[t].tolist(), strict=True))
                    d[int(actual[t])] = float(actual_lp[t])
                    positions.append({str(k): v for k, v in d.items()})
                out.append(positions)
            return len(json.dumps(out).encode())

        return _timed_round(self.requests, score)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(n: int = 2048, reps: int = 8, device: str = "cpu") -> float:
    """Median float32 FLOP/s of an n x n x n torch matmul on this machine's threads (or GPU)."""
    dev = torch.device(device)
    a, b = torch.randn(n, n, device=dev), torch.randn(n, n, device=dev)
    for _ in range(2):
        a @ b
    _sync(dev)
    rates = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        _sync(dev)
        rates.append(2 * n**3 / (time.perf_counter() - t0))
    return statistics.median(rates)


class Matmul:
    def __init__(self, cfg: dict[str, Any]) -> None:
        self.n = int(cfg.get("matmul_n", 2048))
        self.device = cfg.get("device", "cpu")

    def round(self) -> dict[str, Any]:
        return {"flops_per_s": matmul_rate(self.n, device=self.device)}


def full_logits_math(head_w: torch.Tensor, h: torch.Tensor, targets, cands, top_k: int) -> None:
    """The scoring numbers computed the direct way: a [T, V] logits tensor and its log_softmax."""
    logp = torch.log_softmax(h @ head_w.T, dim=-1)
    logp.gather(1, targets[:, None])
    logp.gather(1, cands)
    logp.topk(top_k, dim=-1)
    -(logp.exp() * logp).sum(-1)


def peak_extra_bytes(fn: Callable[[], None], device: torch.device) -> int:
    """Peak extra memory of fn: host RSS on CPU, the CUDA allocator's peak on a GPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    reset_peak()
    base = rss_bytes()
    fn()
    return peak_rss_bytes() - base


class LongSeq:
    """Peak extra memory of the scoring math for one long sequence: chunked vs full logits."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        from transformers import AutoConfig

        from opd.modeling.head import load_head
        from opd.server.settings import Settings

        config = AutoConfig.from_pretrained(cfg["model"])
        self.device = torch.device(cfg.get("device", "cpu"))
        self.head = load_head(cfg["model"], config, torch.float32, self.device)
        self.tokens = int(cfg.get("long_seq_len", 4096))
        tiles: dict[str, int] = {}
        if cfg.get("chunk_tokens"):
            tiles["logits_chunk_tokens"] = int(cfg["chunk_tokens"])
        if cfg.get("chunk_vocab") is not None:
            tiles["logits_chunk_vocab"] = int(cfg["chunk_vocab"])
        # The tiles the server would use on this device, unless the bench was told otherwise.
        self.chunk, self.chunk_vocab = Settings(**tiles).scoring_tiles(self.device.type)
        g = torch.Generator().manual_seed(0)
        vocab, hidden = self.head.weight_VH.shape
        self.h = torch.randn(self.tokens, hidden, generator=g).to(self.device)
        self.targets = torch.randint(0, vocab, (self.tokens,), generator=g).to(self.device)
        self.cands = torch.randint(0, vocab, (self.tokens, 16), generator=g).to(self.device)

    def _peak_of(self, fn: Callable[[], None]) -> int:
        return peak_extra_bytes(fn, self.device)

    @torch.inference_mode()
    def round(self) -> dict[str, Any]:
        from opd.modeling.scoring import score_hidden

        def chunked() -> None:
            score_hidden(
                self.head,
                self.h,
                self.targets,
                self.cands,
                16,
                True,
                1.0,
                self.chunk,
                self.chunk_vocab,
            )

        def full() -> None:
            full_logits_math(self.head.weight_VH, self.h, self.targets, self.cands, 16)

        chunked(), full()  # first calls allocate thread pools and kernel workspaces: not counted
        return {
            "tokens": self.tokens,
            "vocab": int(self.head.vocab_size),
            "chunk_tokens": self.chunk,
            "chunk_vocab": self.chunk_vocab,
            "chunked_peak_bytes": min(self._peak_of(chunked) for _ in range(2)),
            "full_peak_bytes": min(self._peak_of(full) for _ in range(2)),
        }


KINDS = {"inprocess": InProcess, "naive": Naive, "matmul": Matmul, "longseq": LongSeq}


def serve(contender: Any, out: Any = None) -> None:
    """The worker protocol: one JSON line when ready, then one answer per command line on
    stdin ("round", "peak"; anything else ends it). Shared by opd.bench.train_worker."""
    out = out or sys.stdout

    def say(obj: dict[str, Any]) -> None:
        print(json.dumps(obj, default=_json_default), file=out, flush=True)

    say({"ready": True, "setup": getattr(contender, "setup", None)})
    for line in sys.stdin:
        cmd = json.loads(line)["cmd"]
        if cmd == "round":
            say(contender.round())
        elif cmd == "peak":
            say({"peak_rss_bytes": peak_rss_bytes()})
        else:
            break


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(type(value).__name__)


def main() -> None:
    kind, cfg = sys.argv[1], json.loads(sys.argv[2])
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    serve(KINDS[kind](cfg))


if __name__ == "__main__":
    main()
