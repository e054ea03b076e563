"""`opd bench-spans`: what scoring only the student's turns of multi-turn episodes costs, against
scoring each episode from its first assistant token on.

    opd bench-spans                                   # followup 2/4/8 turns + calculator, SmolLM2
    opd bench-spans --env followup --turns 2 --turns 16 --episodes 64

Protocol 1.3 lets a score request name several scored spans per sequence (`score_spans`): a
multi-turn episode's assistant turns are scored, its tool results and user turns are context
only. A 1.2 client has one `score_from` per sequence, so it must score everything from the first
assistant token to the end, the context turns included, and drop those rows itself. This bench
scores the same episodes both ways against a real `opd serve` and reports what the spans save.

Episodes are built without sampling, exactly as the trainer builds them token-in/token-out
(opd.client.train.episodes: `_take_turn`): the opening through `TurnRenderer.opening_ids`, each
assistant turn as token ids ending with the template's end-of-turn token (its span), the
environment's answer through `observation_ids`, and so on. The turns are scripted:
- followup (`FollowupEnv(turns=T)`): every answer is the correct running value;
- calculator (`CalculatorEnv`): a calculator tool call on the row's expression, then the answer.
Each finishes with reward 1 (checked), so the environment read every turn as the trainer's would.

Both ways send one batch of all episodes through `TeacherClient` (msgpack), with the options of a
training step with diagnostics: top_k, entropy, and `candidates` candidate ids per scored position
(fixed ids from a seeded rng, the same ids at the same positions both ways):
- spans: `score_spans` = the assistant turns;
- tail: `score_from` = the first assistant token.
Per way: scored positions, request and response bytes (the HTTP bodies as sent and received, for
msgpack, and once for JSON), and wall time of `client.score` (median of `repeats` alternating
calls after one warm-up each; `wall max / min`, the largest spread of one way's identical calls,
is the machine's noise on the wall columns).

Before anything is reported, the spans' rows must equal the tail's rows at the span positions
(every float array within atol + rtol |tail|, numpy's allclose; top-k ids equal except at a tie
within that tolerance), else the bench stops: no saving on wrong numbers. Why a relative term:
the two requests put different numbers of rows through the LM head (other matmul shapes, so
float32 sums in other orders); on SmolLM2 that moved a log-prob of -24 by 2e-5 (1e-6 relative),
while a row taken at a wrong position is off by whole nats.
Results: a table on stdout, JSON + markdown in out_dir (bench-spans-*.json/.md).
"""

from __future__ import annotations

import json
import re
import statistics
import threading
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

EnvName = Literal["followup", "calculator"]
ALL_ENVS: tuple[str, ...] = typing.get_args(EnvName)
END_OF_TURN = "<|im_end|>"
_FLOAT_ROWS = ("token_logprobs", "candidate_logprobs", "top_k_logprobs", "entropy")


class BenchSpansConfig(BaseModel):
    """Every knob of `opd bench-spans` (its flags are generated from these fields)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(
        default=None, description="teacher and tokenizer folder; default: embedded SmolLM2"
    )
    envs: tuple[EnvName, ...] = Field(
        default=ALL_ENVS,
        min_length=1,
        description=f"environments (repeatable), of: {', '.join(ALL_ENVS)}",
        json_schema_extra={"cli_name": "env"},
    )
    turns: tuple[int, ...] = Field(
        default=(2, 4, 8),
        min_length=1,
        description="followup: assistant turns per episode (repeatable); calculator has 2",
    )
    episodes: int = Field(default=32, ge=1, description="episodes per case (one score batch)")
    prompts: str = Field(default="task:addition:train", description="data rows of the episodes")
    top_k: int = Field(default=16, ge=0, description="teacher top-k per scored position")
    candidates: int = Field(default=16, ge=0, description="candidate ids per scored position")
    entropy: bool = Field(default=True, description="ask for the teacher's entropy")
    repeats: int = Field(default=3, ge=1, description="timed calls per way, after a warm-up")
    atol: float = Field(
        default=1e-5, gt=0, description="spans rows vs tail rows: absolute tolerance"
    )
    rtol: float = Field(
        default=1e-5, ge=0, description="spans rows vs tail rows: tolerance relative to |tail|"
    )
    seed: int = Field(default=0, description="seed of the candidate ids")
    device: str = Field(default="cpu", description="the teacher's device (cpu or cuda)")
    server_env: list[str] = Field(
        default_factory=list,
        description="KEY=VALUE for the bench's `opd serve` (repeatable), e.g. OPD_DTYPE=bfloat16",
    )
    out_dir: str = Field(default="bench-results", description="where JSON + markdown results go")

    @model_validator(mode="after")
    def _consistent(self) -> BenchSpansConfig:
        if any(t < 1 for t in self.turns):
            raise ValueError(f"turns must be >= 1, got {self.turns}")
        bad = [e for e in self.server_env if "=" not in e or not e.split("=", 1)[0]]
        if bad:
            raise ValueError(f"server_env entries must be KEY=VALUE, got {bad}")
        return self


# ---- episodes ----------------------------------------------------------------------------------


@dataclass
class Case:
    """One row of the table: the episodes of one environment at one depth."""

    env: str
    turns: int
    sequences: list[np.ndarray]
    spans: list[list[tuple[int, int]]]

    @property
    def name(self) -> str:
        return f"{self.env} {self.turns}t"


def _expression(row: dict) -> str:
    """The arithmetic of a task prompt ("What is 3 plus 4? ..." -> "3 + 4"), as the tool call's
    argument; the answer itself where the prompt has no "What is ...?"."""
    found = re.search(r"What is (.+?)\?", str(row.get("prompt", "")))
    if not found:
        return str(row["answer"])
    return re.sub(r"\bplus\b", "+", re.sub(r"\bminus\b", "-", found.group(1)))


def scripted_episode(
    env: Any,
    renderer: Any,
    row: dict,
    answer: Callable[[int], str],
    encode: Callable[[str], list[int]],
    end_id: int,
    max_turns: int = 64,
) -> tuple[list[int], list[tuple[int, int]]]:
    """An episode's ids and its assistant turns' [start, end) spans, with `answer(j)` as the
    text of turn j, built as opd.client.train.episodes._take_turn builds a sampled one."""
    ids = list(renderer.opening_ids(env.reset(row)))
    spans: list[tuple[int, int]] = []
    for j in range(max_turns):
        turn_ids = [*encode(answer(j)), end_id]
        start = len(ids)
        ids.extend(turn_ids)
        spans.append((start, len(ids)))
        obs = env.step(renderer.parse(turn_ids, truncated=False))
        if obs.done:
            if obs.reward != 1.0:  # the scripted answers are right: the env misread a turn
                raise RuntimeError(f"scripted episode ended with reward {obs.reward}: {row}")
            return ids, spans
        ids.extend(int(t) for t in renderer.observation_ids(obs.messages))
    raise RuntimeError(f"scripted episode did not end within {max_turns} turns: {row}")


def build_case(
    env_name: str, turns: int, n_episodes: int, rows: list[dict], tokenizer: Any
) -> Case:
    """`n_episodes` scripted episodes over `rows` (cycled; followup re-seeds each cycle)."""
    from opd.client.episodes import CalculatorEnv, FollowupEnv, TurnRenderer
    from opd.client.episodes.tools import format_tool_call

    def encode(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    end_id = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    sequences, spans, renderer = [], [], None
    for i in range(n_episodes):
        row = rows[i % len(rows)]
        if env_name == "followup":
            env: Any = FollowupEnv(turns=turns, seed=i // len(rows))

            def answer(j: int, env: Any = env) -> str:
                return str(env.values[j])
        else:
            env = CalculatorEnv()

            def answer(j: int, row: dict = row) -> str:
                if j == 0:
                    return format_tool_call("calculator", {"expression": _expression(row)})
                return str(row["answer"])

        if renderer is None:  # one per case: the environments of a case share their tools
            renderer = TurnRenderer(tokenizer, tools=env.tools)
            if end_id is None or end_id == tokenizer.unk_token_id:
                end_id = min(renderer.end_of_turn_ids)
        ids, sp = scripted_episode(env, renderer, row, answer, encode, int(end_id))
        sequences.append(np.asarray(ids, dtype=np.int64))
        spans.append(sp)
    return Case(env_name, turns if env_name == "followup" else len(spans[0]), sequences, spans)


def requests(case: Case, cfg: BenchSpansConfig, vocab: int) -> tuple[Any, Any]:
    """(spans request, tail request): the same sequences, options and candidate ids (the tail's
    rows at the span positions are the spans' rows)."""
    from opd.shared.packed import PackedRequest, positions_of_spans
    from opd.shared.schemas import ScoreOptions

    options = ScoreOptions(top_k=cfg.top_k, entropy=cfg.entropy)
    rng = np.random.default_rng(cfg.seed)
    starts = [sp[0][0] for sp in case.spans]
    tail_cands = span_cands = None
    if cfg.candidates:
        tail_cands = [
            rng.integers(0, vocab, (len(seq) - s, cfg.candidates))
            for seq, s in zip(case.sequences, starts, strict=True)
        ]
        span_cands = [
            c[positions_of_spans(np.asarray(sp)) - s]
            for c, sp, s in zip(tail_cands, case.spans, starts, strict=True)
        ]
    spans = PackedRequest.from_arrays(case.sequences, None, span_cands, options, spans=case.spans)
    tail = PackedRequest.from_arrays(case.sequences, starts, tail_cands, options)
    return spans, tail


# ---- measuring ---------------------------------------------------------------------------------


class _Wire:
    """The /v1/score bodies a client sent and received (httpx event hooks; thread-safe, since the
    client sends the chunks of a split batch from a thread pool)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.request_bytes = self.response_bytes = self.posts = 0

    def take(self) -> tuple[int, int, int]:
        with self._lock:
            out = (self.request_bytes, self.response_bytes, self.posts)
            self.request_bytes = self.response_bytes = self.posts = 0
        return out

    def on_request(self, request: httpx.Request) -> None:
        if request.url.path.endswith("/v1/score"):
            with self._lock:
                self.request_bytes += len(request.content)
                self.posts += 1

    def on_response(self, response: httpx.Response) -> None:
        if response.request.url.path.endswith("/v1/score"):
            response.read()  # the body as received (the server does not compress)
            with self._lock:
                self.response_bytes += len(response.content)


def metered_client(url: str, encoding: str) -> tuple[Any, _Wire]:
    """opd's TeacherClient, with its HTTP bodies counted."""
    from opd.client.teacher.client import TeacherClient

    client = TeacherClient(url, encoding=encoding, timeout_s=600, max_retries=0)
    wire = _Wire()
    # The client's own httpx client: its hooks see every body exactly as it goes over the wire.
    client._http.event_hooks = {"request": [wire.on_request], "response": [wire.on_response]}
    return client, wire


def _score(client: Any, wire: _Wire, request: Any) -> dict[str, Any]:
    wire.take()
    started = time.perf_counter()
    result = client.score(request)
    seconds = time.perf_counter() - started
    req_bytes, resp_bytes, posts = wire.take()
    return {
        "result": result,
        "seconds": seconds,
        "request_bytes": req_bytes,
        "response_bytes": resp_bytes,
        "posts": posts,
    }


def compare_rows(
    spans_req: Any, spans_res: Any, tail_req: Any, tail_res: Any, atol: float, rtol: float
) -> dict[str, Any]:
    """The spans' rows against the tail's rows at the span positions, numpy's allclose test
    (|spans - tail| <= atol + rtol |tail|) per float array: the largest absolute difference and
    the largest share of its tolerance used (`tolerance_used` <= 1 passes). Rows whose top-k ids
    differ are counted; those not explained by a tie within tolerance in the tail's top-k are
    `unexplained`. Raises on a count of rows that does not match the request."""
    worst = dict.fromkeys(_FLOAT_ROWS, 0.0)
    used = dict.fromkeys(_FLOAT_ROWS, 0.0)
    ids_differ = unexplained = 0
    expected = int(spans_req.n_scored_n.sum())
    if int(spans_res.scored_offsets_n1[-1]) != expected:
        raise RuntimeError(f"spans: {spans_res.scored_offsets_n1[-1]} rows for {expected}")
    for i in range(spans_req.n_sequences):
        rows = spans_req.scored_positions(i) - int(tail_req.score_from_n[i])
        a, b = spans_res.sequence(i), tail_res.sequence(i)
        if len(b.token_logprobs) != tail_req.n_scored_n[i]:
            raise RuntimeError(f"tail: sequence {i} has {len(b.token_logprobs)} rows")
        for name in _FLOAT_ROWS:
            x, y = getattr(a, name), getattr(b, name)
            if (x is None) != (y is None):
                raise RuntimeError(f"{name}: present in one way only")
            if x is not None and len(x):
                ref = np.asarray(y, np.float64)[rows]
                diff = np.abs(np.asarray(x, np.float64) - ref)
                worst[name] = max(worst[name], float(diff.max()))
                used[name] = max(used[name], float((diff / (atol + rtol * np.abs(ref))).max()))
        if a.top_k_ids is not None:
            tail_ids, tail_lp = b.top_k_ids[rows], np.asarray(b.top_k_logprobs, np.float64)[rows]
            differ = np.any(a.top_k_ids != tail_ids, axis=1)
            gap = np.abs(np.diff(tail_lp, axis=1))
            tied = np.any(gap <= 2 * (atol + rtol * np.abs(tail_lp[:, 1:])), axis=1)
            ids_differ += int(differ.sum())
            unexplained += int((differ & ~tied).sum())
    return {
        "max_abs_diff": worst,
        "max_abs_diff_all": max(worst.values()),
        "tolerance_used": max(used.values()),
        "atol": atol,
        "rtol": rtol,
        "top_k_id_rows_differ": ids_differ,
        "top_k_id_rows_unexplained": unexplained,
    }


def measure_case(url: str, case: Case, cfg: BenchSpansConfig, vocab: int, log: Any) -> dict:
    """Both ways on one case: warm-up, `repeats` alternating timed calls (msgpack), one JSON
    call each; the row check; the case's row of the report."""
    spans_req, tail_req = requests(case, cfg, vocab)
    ways = {"spans": spans_req, "tail": tail_req}
    client, wire = metered_client(url, "msgpack")
    json_client, json_wire = metered_client(url, "json")
    try:
        calls: dict[str, list[dict[str, Any]]] = {w: [] for w in ways}
        for req in ways.values():  # warm-up, not timed
            _score(client, wire, req)
        for r in range(cfg.repeats):
            order = list(ways) if r % 2 == 0 else list(reversed(ways))
            for w in order:
                calls[w].append(_score(client, wire, ways[w]))
        json_calls = {w: _score(json_client, json_wire, req) for w, req in ways.items()}
    finally:
        client.close()
        json_client.close()
    spans_res, tail_res = calls["spans"][0]["result"], calls["tail"][0]["result"]
    check = compare_rows(spans_req, spans_res, tail_req, tail_res, cfg.atol, cfg.rtol)
    row: dict[str, Any] = {
        "env": case.env,
        "turns": case.turns,
        "episodes": len(case.sequences),
        "tokens": int(sum(len(s) for s in case.sequences)),
        "assistant_turns": int(sum(len(sp) for sp in case.spans)),
    }
    for w, req in ways.items():
        first = calls[w][0]
        row[w] = {
            "scored_positions": int(req.n_scored_n.sum()),
            "request_bytes": first["request_bytes"],
            "response_bytes": first["response_bytes"],
            "json_request_bytes": json_calls[w]["request_bytes"],
            "json_response_bytes": json_calls[w]["response_bytes"],
            "posts": first["posts"],
            "wall_ms": 1000 * statistics.median(c["seconds"] for c in calls[w]),
            "wall_ms_min": 1000 * min(c["seconds"] for c in calls[w]),
            "wall_ms_calls": [1000 * c["seconds"] for c in calls[w]],
        }
    s, t = row["spans"], row["tail"]
    row["ratio"] = {
        key: s[key] / t[key] if t[key] else None
        for key in (
            "scored_positions",
            "request_bytes",
            "response_bytes",
            "json_response_bytes",
            "wall_ms",
        )
    }
    # the spread of identical calls: what the machine's noise does to the wall columns
    row["wall_spread"] = max(max(row[w]["wall_ms_calls"]) / row[w]["wall_ms_min"] for w in ways)
    row["check"] = check
    log(
        f"{case.name}: scored {s['scored_positions']} vs {t['scored_positions']}, response "
        f"{s['response_bytes'] / 1e3:.1f} vs {t['response_bytes'] / 1e3:.1f} KB, wall "
        f"{s['wall_ms']:.0f} vs {t['wall_ms']:.0f} ms, max |diff| {check['max_abs_diff_all']:.1e}"
    )
    if check["tolerance_used"] > 1 or check["top_k_id_rows_unexplained"]:
        raise RuntimeError(
            f"{case.name}: the spans' rows differ from the tail's at the span positions "
            f"(beyond atol {cfg.atol} + rtol {cfg.rtol} x |tail|): {check}"
        )
    return row


def run_bench_spans(cfg: BenchSpansConfig, log: Any = print) -> dict[str, Any]:
    """Build the episodes, start `opd serve`, measure every case, write
    bench-spans-STAMP.json/.md."""
    from transformers import AutoTokenizer

    from opd.bench.runner import _machine, _resolve_model, _versions
    from opd.client.teacher.launch import LocalTeacher
    from opd.client.train.prompts import load_rows

    model = _resolve_model(cfg.model)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    tokenizer = AutoTokenizer.from_pretrained(model)
    rows, _ = load_rows(cfg.prompts)
    if not rows:
        raise ValueError(f"no rows in {cfg.prompts!r}")
    cases = []
    for env_name in cfg.envs:
        for turns in cfg.turns if env_name == "followup" else (2,):
            cases.append(build_case(env_name, turns, cfg.episodes, rows, tokenizer))
    log(f"{len(cases)} cases of {cfg.episodes} episodes built")

    logs = out_dir / f"logs-spans-{stamp}"
    logs.mkdir()
    env = {"OPD_LOG_LEVEL": "warning", "OPD_DTYPE": "float32", "OPD_DEVICE": cfg.device}
    env.update(e.split("=", 1) for e in cfg.server_env)
    teacher = LocalTeacher(model, env=env, log_path=logs / "opd-serve.log")
    log(f"starting opd serve ({model}); log in {logs}")
    try:
        url = teacher.start()
        info = httpx.get(url + "/v1/model", timeout=30).json()
        measured = [measure_case(url, c, cfg, int(info["vocab_size"]), log) for c in cases]
    finally:
        teacher.stop()
    report = {
        "machine": _machine(),
        "versions": _versions(),
        "model": info["name"],
        "dtype": info.get("dtype"),
        "config": {**cfg.model_dump(mode="json"), "model": model},
        "cases": measured,
    }
    path = out_dir / f"bench-spans-{stamp}.json"
    path.write_text(json.dumps(report, indent=2))
    (out_dir / f"bench-spans-{stamp}.md").write_text(markdown_table(report))
    report["path"] = str(path)
    return report


# ---- tables ------------------------------------------------------------------------------------

COLUMNS = (
    "case",
    "episodes",
    "tokens / episode",
    "scored: spans / tail",
    "scored ratio",
    "response KB: spans / tail",
    "response ratio",
    "request KB: spans / tail",
    "request ratio",
    "JSON response KB: spans / tail",
    "wall ms: spans / tail",
    "wall ratio",
    "wall max / min",
    "max abs diff",
)


def _pair(row: dict[str, Any], key: str, scale: float = 1.0, fmt: str = ".0f") -> str:
    return f"{row['spans'][key] / scale:{fmt}} / {row['tail'][key] / scale:{fmt}}"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def table_rows(report: dict[str, Any]) -> list[list[str]]:
    """One row per case, in COLUMNS order: the terminal's table and the markdown's."""
    out = []
    for c in report["cases"]:
        ratio = c["ratio"]
        out.append(
            [
                f"{c['env']}, {c['turns']} turns",
                str(c["episodes"]),
                f"{c['tokens'] / c['episodes']:.0f}",
                _pair(c, "scored_positions"),
                _x(ratio["scored_positions"]),
                _pair(c, "response_bytes", 1e3, ".1f"),
                _x(ratio["response_bytes"]),
                _pair(c, "request_bytes", 1e3, ".1f"),
                _x(ratio["request_bytes"]),
                _pair(c, "json_response_bytes", 1e3, ".0f"),
                _pair(c, "wall_ms"),
                _x(ratio["wall_ms"]),
                f"{c['wall_spread']:.2f}",
                f"{c['check']['max_abs_diff_all']:.1e}",
            ]
        )
    return out


def markdown_table(report: dict[str, Any]) -> str:
    align = ["---" if i == 0 else "---:" for i in range(len(COLUMNS))]
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(report)]
    return "\n".join(lines) + "\n"
