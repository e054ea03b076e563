"""Scores from `opd serve` over HTTP against a float64 CPU recompute of the same weights.

    python deploy/gpu_check/numerics.py --model DIR --device cuda --out numerics.json

For each served dtype (float32 and bfloat16) one `opd serve --device D --dtype T` process
scores a batch over HTTP (msgpack, the trainer's encoding; concurrent requests with different
options, so the batcher packs them together): random-token sequences of mixed lengths and chat
sequences from the model's own tokenizer, each with caller-chosen candidate ids. The reference
runs the whole model in float64 on the CPU, one sequence at a time, unbatched, and takes every
number from its [T, V] log-softmax: the log-prob of the actual token, the candidates' log-probs,
the top-k values (and each returned top-k id's reference log-prob), and the entropy.

Tolerances (absolute errors in nats, over every returned number at every position):
- float32: at most 2e-3 (mean 2e-4). float32 rounding is ~6e-8 relative per operation; through
  16 layers of dot products thousands of terms long, the logits move by ~1e-5 relative, a few
  1e-5 nats at logits of size 5 to 20 (3e-5 measured at depth 16 on a CPU), so 2e-3 leaves
  more than an order of magnitude. A server that ran its float32 matmuls as TF32 (10-bit
  mantissa, ~5e-4 relative per product) would miss it by far: the bound also catches TF32
  switched on behind our back.
- bfloat16: no fixed number fits every depth and logit scale. bfloat16 keeps 8 significant
  bits: every stored activation is rounded by up to 2e-3 relative, and a logit of 10 to 20 is
  rounded to a multiple of 0.06 to 0.125 by itself. At depth 16 plain HF in bfloat16 is
  already ~0.06 nats off on average and ~0.4 at worst (measured on a CPU). So the yardstick is
  plain HF on the same device in bfloat16 (one sequence at a time, whole-vocabulary logits,
  the obvious implementation), measured against the same float64 reference: the server's
  bfloat16 errors may be at most 1.5x its mean error (+0.01) and 2x its largest (+0.05),
  never above 2 nats anywhere (a shifted position or a wrong mask costs several nats), and not
  zero (the server really computed in bfloat16).
Top-k ties: the values must be the true top-k values in order, and each returned id must carry
the reference log-prob of its value (near-ties may swap ids in bfloat16; that is no error).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FLOAT32_TOLERANCE = {"max": 2e-3, "mean": 2e-4}
# bfloat16: relative to plain HF in bfloat16 on the same device (see the module docstring)
BFLOAT16_RULE = {
    "mean_factor": 1.5,
    "mean_slack": 0.01,
    "max_factor": 2.0,
    "max_slack": 0.05,
    "ceiling": 2.0,
    "floor": 1e-6,
}
QUANTITIES = ("token", "candidates", "top_k_values", "top_k_ids", "entropy")


@dataclass
class Errors:
    """Absolute errors per quantity, pooled over every sequence of one served dtype."""

    values: dict[str, list[np.ndarray]] = field(default_factory=lambda: {q: [] for q in QUANTITIES})

    def add(self, name: str, got: np.ndarray, want: np.ndarray) -> None:
        got64, want64 = np.asarray(got, np.float64), np.asarray(want, np.float64)
        assert got64.shape == want64.shape, (name, got64.shape, want64.shape)
        self.values[name].append(np.abs(got64 - want64).ravel())

    def summary(self) -> dict[str, dict[str, float]]:
        out = {}
        for name, parts in self.values.items():
            if parts:
                err = np.concatenate(parts)
                out[name] = {"max": float(err.max()), "mean": float(err.mean()), "n": err.size}
        return out


def batch(tokenizer: Any, vocab: int, sizes: dict[str, Any], seed: int = 0) -> list[dict]:
    """The scored sequences: random tokens of mixed lengths, and chat prompt + answer."""
    rng = np.random.default_rng(seed)
    k = sizes["candidates"]
    items = []
    for length in sizes["random_lengths"]:
        ids = rng.integers(0, vocab, length)
        score_from = int(rng.integers(1, max(2, length // 2)))
        items.append({"ids": ids, "score_from": score_from})
    chats = [
        ("What is 17 times 23? Think step by step.", "17 times 23 is 391."),
        ("Write one sentence about the sea.", "The sea is wide, grey and never quite still."),
    ]
    for prompt, answer in chats:
        ctx = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        ctx_ids = tokenizer(ctx, add_special_tokens=False)["input_ids"]
        ans_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        items.append({"ids": np.array(ctx_ids + ans_ids), "score_from": len(ctx_ids)})
    for item in items:
        n = len(item["ids"]) - item["score_from"]
        item["candidates"] = rng.integers(0, vocab, (n, k))
    return items


OPTION_SETS = [
    {"top_k": 16, "entropy": True, "temperature": 1.0},
    {"top_k": 5, "entropy": True, "temperature": 0.7},
]


class Reference:
    """The teacher in float64 on the CPU: log_softmax(logits / T) of one whole sequence."""

    def __init__(self, model_dir: str) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        # eager attention: the plain softmax(QK^T)V, nothing fused, all of it in float64
        self.model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float64, attn_implementation="eager"
        ).eval()

    def scored_logits(self, ids: np.ndarray, score_from: int) -> Any:
        """float64 logits [n_scored, V] (a torch tensor on the CPU)."""
        torch = self.torch
        with torch.no_grad():
            x = torch.as_tensor(np.asarray(ids, np.int64))[None]
            return self.model(x).logits[0, score_from - 1 : len(ids) - 1]


class PlainHF:
    """The yardstick for bfloat16: the HF model in `dtype` on `device`, one whole sequence at a
    time, log_softmax (in float64) of its whole-vocabulary logits as the model returned them."""

    def __init__(self, model_dir: str, device: str, dtype: str) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        self.device = device
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
        self.model.to(device).eval()

    def scored_logits(self, ids: np.ndarray, score_from: int) -> Any:
        """The model's own logits [n_scored, V], as float64 on the CPU."""
        torch = self.torch
        with torch.no_grad():
            x = torch.as_tensor(np.asarray(ids, np.int64), device=self.device)[None]
            return self.model(x).logits[0, score_from - 1 : len(ids) - 1].double().cpu()

    def close(self) -> None:
        del self.model
        if self.device.startswith("cuda"):
            self.torch.cuda.empty_cache()


def top_k_of(logp_TV: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(values, ids) of each row's k largest, in descending order (torch.topk: a full sort of
    128k-wide rows would take seconds per sequence)."""
    import torch

    top = torch.from_numpy(logp_TV).topk(k, dim=1)
    return top.values.numpy(), top.indices.numpy()


class Rows:
    """One sequence's scores in the shape of a served result, from log-probs [T, V]."""

    def __init__(self, logp_TV: np.ndarray, item: dict, top_k: int) -> None:
        self.token_logprobs = logp_TV[np.arange(len(logp_TV)), item["ids"][item["score_from"] :]]
        self.candidate_logprobs = np.take_along_axis(logp_TV, item["candidates"], axis=1)
        self.top_k_logprobs, self.top_k_ids = top_k_of(logp_TV, top_k)
        self.entropy = -(np.exp(logp_TV) * logp_TV).sum(-1)


def all_logprobs(source: Any, items: list[dict]) -> list[list[np.ndarray]]:
    """[option set][item] -> float64 log-probs [n_scored, V] at that option set's temperature
    (one forward per item: the temperatures only divide the logits)."""
    import torch

    out: list[list[np.ndarray]] = [[] for _ in OPTION_SETS]
    for item in items:
        logits = source.scored_logits(item["ids"], item["score_from"])
        for o, opts in enumerate(OPTION_SETS):
            out[o].append(torch.log_softmax(logits / opts["temperature"], dim=-1).numpy())
    return out


def compare(result: Any, ref_TV: np.ndarray, item: dict, top_k: int, errors: Errors) -> None:
    """Every number of one returned sequence against the float64 log-probs."""
    targets = np.asarray(item["ids"][item["score_from"] :], np.int64)
    rows = np.arange(len(targets))
    errors.add("token", result.token_logprobs, ref_TV[rows, targets])
    errors.add(
        "candidates",
        result.candidate_logprobs,
        np.take_along_axis(ref_TV, item["candidates"].astype(np.int64), axis=1),
    )
    if top_k:
        errors.add("top_k_values", result.top_k_logprobs, top_k_of(ref_TV, top_k)[0])
        errors.add(
            "top_k_ids",
            result.top_k_logprobs,
            np.take_along_axis(ref_TV, np.asarray(result.top_k_ids, np.int64), axis=1),
        )
        if any(len(set(row)) != top_k for row in np.asarray(result.top_k_ids).tolist()):
            raise AssertionError("a top-k row repeats an id")
    if result.entropy is not None:
        p = np.exp(ref_TV)
        errors.add("entropy", result.entropy, -(p * ref_TV).sum(-1))


def score_served(
    model: str, device: str, dtype: str, items: list[dict], log_dir: Path
) -> tuple[dict[str, Any], list[list[Any]]]:
    """Start `opd serve` on `device` in `dtype`, score every item under every option set."""
    from opd.client import TeacherClient
    from opd.client.teacher.launch import LocalTeacher
    from opd.shared.packed import PackedRequest
    from opd.shared.schemas import ScoreOptions

    teacher = LocalTeacher(
        model,
        env={"OPD_LOG_LEVEL": "warning"},
        log_path=log_dir / f"serve-{dtype}.log",
        extra_args=["--device", device, "--dtype", dtype],
    )
    started = time.perf_counter()
    with teacher as url, TeacherClient(url) as client:
        info = client.connect()
        ready_s = time.perf_counter() - started
        requests = []
        for opts in OPTION_SETS:
            options = ScoreOptions(**opts)
            for i in range(0, len(items), 2):  # two sequences per request, all concurrent
                part = items[i : i + 2]
                req = PackedRequest.from_arrays(
                    [it["ids"] for it in part],
                    [it["score_from"] for it in part],
                    [it["candidates"] for it in part],
                    options,
                )
                requests.append((opts, i, req))
        t0 = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda r: client.score(r[2]), requests))
        score_s = time.perf_counter() - t0
    per_option: list[list[Any]] = [[None] * len(items) for _ in OPTION_SETS]
    for (opts, i, _), res in zip(requests, results, strict=True):
        for j, seq in enumerate(res.sequences()):
            per_option[OPTION_SETS.index(opts)][i + j] = seq
    served = {
        "dtype_reported": info.dtype,
        "backend": info.backend,
        "vocab_size": info.vocab_size,
        "ready_s": ready_s,
        "score_s": score_s,
    }
    return served, per_option


def bounds(dtype: str, yardstick: dict[str, dict[str, float]] | None) -> dict[str, dict]:
    """Per quantity: the largest allowed max and mean error, and the smallest allowed max."""
    out = {}
    for name in QUANTITIES:
        if dtype == "float32":
            out[name] = {**FLOAT32_TOLERANCE, "min_max": 0.0}
        else:
            r, base = BFLOAT16_RULE, (yardstick or {}).get(name)
            if base is None:
                continue
            out[name] = {
                "max": min(r["ceiling"], r["max_factor"] * base["max"] + r["max_slack"]),
                "mean": r["mean_factor"] * base["mean"] + r["mean_slack"],
                "min_max": r["floor"],
            }
    return out


def check(dtype: str, summary: dict[str, dict[str, float]], limits: dict[str, dict]) -> list[str]:
    """The tolerance violations of one dtype (empty: passed)."""
    problems = []
    for name, s in summary.items():
        if name not in limits:
            problems.append(f"{dtype} {name}: no bound (no yardstick measured)")
            continue
        tol = limits[name]
        if s["max"] > tol["max"]:
            problems.append(f"{dtype} {name}: max error {s['max']:.3g} > {tol['max']:.3g}")
        if s["mean"] > tol["mean"]:
            problems.append(f"{dtype} {name}: mean error {s['mean']:.3g} > {tol['mean']:.3g}")
    worst = max((s["max"] for s in summary.values()), default=0.0)
    if dtype != "float32" and worst <= BFLOAT16_RULE["floor"]:
        problems.append(f"{dtype}: no error at all: the server did not compute in {dtype}")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--lengths", default="512,384,256,128,64,33,17,5", help="random seqs")
    parser.add_argument("--candidates", type=int, default=16)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    log_dir = args.out.parent
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    sizes = {
        "random_lengths": [int(x) for x in args.lengths.split(",")],
        "candidates": args.candidates,
    }
    items = batch(tokenizer, len(tokenizer), sizes)
    report: dict[str, Any] = {
        "model": args.model,
        "device": args.device,
        "sequences": len(items),
        "scored_positions": sum(len(it["ids"]) - it["score_from"] for it in items),
        "option_sets": OPTION_SETS,
        "float32_tolerance": FLOAT32_TOLERANCE,
        "bfloat16_rule": BFLOAT16_RULE,
        "dtypes": {},
    }
    # One server per dtype, started side by side: a server's start is mostly imports and
    # loading, and the two do not share anything that could change a number.
    dtypes = args.dtypes.split(",")
    print(f"numerics: serving in {', '.join(dtypes)} on {args.device}", flush=True)
    with ThreadPoolExecutor(len(dtypes)) as pool:
        jobs = {
            d: pool.submit(score_served, args.model, args.device, d, items, log_dir) for d in dtypes
        }
        served = {d: job.result() for d, job in jobs.items()}
    yardstick_dtypes = [d for d in served if d != "float32"]
    plain: dict[str, list[list[np.ndarray]]] = {}
    for dtype in yardstick_dtypes:
        hf = PlainHF(args.model, args.device, dtype)
        plain[dtype] = all_logprobs(hf, items)
        hf.close()
    t0 = time.perf_counter()
    refs = all_logprobs(Reference(args.model), items)
    report["reference_s"] = time.perf_counter() - t0

    def errors_of(results: list[list[Any]]) -> dict[str, dict[str, float]]:
        errors = Errors()
        for o, opts in enumerate(OPTION_SETS):
            for i, item in enumerate(items):
                compare(results[o][i], refs[o][i], item, opts["top_k"], errors)
        return errors.summary()

    problems: list[str] = []
    for dtype, (info, per_option) in served.items():
        yardstick = None
        if dtype in plain:
            rows = [
                [Rows(plain[dtype][o][i], item, opts["top_k"]) for i, item in enumerate(items)]
                for o, opts in enumerate(OPTION_SETS)
            ]
            yardstick = errors_of(rows)
        summary = errors_of(per_option)
        limits = bounds(dtype, yardstick)
        found = check(dtype, summary, limits)
        if info["dtype_reported"] != dtype:
            found.append(f"{dtype}: the server reports dtype {info['dtype_reported']}")
        problems += found
        report["dtypes"][dtype] = {
            **info,
            "errors": summary,
            "plain_hf_errors": yardstick,
            "bounds": limits,
            "passed": not found,
        }
        worst = {k: f"{v['max']:.2e}" for k, v in summary.items()}
        print(f"numerics {dtype}: max abs error per quantity {worst}", flush=True)
        if yardstick:
            base = {k: f"{v['max']:.2e}" for k, v in yardstick.items()}
            print(f"numerics {dtype}: plain HF in {dtype}, same device: {base}", flush=True)
    report["problems"] = problems
    report["passed"] = not problems
    args.out.write_text(json.dumps(report, indent=2))
    print("numerics: " + ("passed" if not problems else "FAILED: " + "; ".join(problems)))
    sys.exit(0 if not problems else 1)


if __name__ == "__main__":
    main()
