"""`opd coldstart`: rescue an incompatible pair by SFT on teacher responses, then OPD.

The paper's recovery recipe (docs/method.md, "Recovering a failing pair"):
the teacher answers a prompt set (temperature 0.7, top-p 0.95, one response each), truncated and
repetitive responses are dropped (optionally those without a final answer), the student is
SFT-ed on the rest (1-2 epochs, lr 1e-5, cosine, 5% warmup), then OPD runs on prompts *not* used
for SFT. Each stage writes its output into OUT_DIR, so a run can be inspected and reused:

    split.json            seed, which prompt indices went to SFT and which to OPD, and hashes
    opd_prompts.jsonl     the OPD prompts ({"prompt": ...}): `opd train --prompts` takes it
    sft_data.jsonl|.parquet  kept teacher responses (prompt, response, ids, finish reason)
    rejected.jsonl        dropped responses with the reason (opd.client.recipes.coldstart_filters)
    sft_metrics.jsonl     one line per SFT step
    student/              the SFT-ed student (save_pretrained + tokenizer)
    coldstart.json        counts, settings, response NLL before/after SFT
    opd/                  the OPD run (only with opd_steps > 0): metrics.jsonl, checkpoints
"""

from __future__ import annotations

import hashlib
import json
import shlex
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from opd.client.configs.coldstart import ColdstartConfig
from opd.client.recipes.coldstart_filters import filter_rows
from opd.shared.config_cli import from_flags

COLDSTART_VERSION = 1
# Prompts per generate call: progress is reported (and answers saved) between calls, and a
# call asks for at most ~_GENERATE_TOKENS new tokens, so it stays well inside the client's
# timeout on a CPU teacher. The client splits further under the teacher's limits.
_GENERATE_CHUNK = 32
_GENERATE_TOKENS = 8192


def split_prompts(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded disjoint split of prompt indices: (SFT, OPD), both non-empty, each sorted."""
    if n < 2:
        raise ValueError(f"need at least 2 prompts to split into SFT and OPD sets, got {n}")
    order = np.random.default_rng(seed).permutation(n)
    k = min(n - 1, max(1, round(fraction * n)))
    return sorted(int(i) for i in order[:k]), sorted(int(i) for i in order[k:])


def _digest(texts: list[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode())
        h.update(b"\0")
    return "sha256:" + h.hexdigest()[:32]


def write_rows(rows: list[dict[str, Any]], path: Path) -> None:
    """JSON lines, or Parquet (pyarrow) by the file's suffix."""
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def run_coldstart(config: ColdstartConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Split, generate, filter, SFT, (OPD); returns what coldstart.json holds."""
    from opd.client.recipes.sft import Example, response_nll, sft
    from opd.client.teacher.client import TeacherClient
    from opd.client.train.prompts import load_prompts
    from opd.client.train.student import chat_prompt_ids, load_student
    from opd.shared.fingerprint import fingerprint_hf_tokenizer

    started = time.perf_counter()
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data_rows: list[dict[str, Any]] = []
    if config.episodes.env is not None:  # the environment reads whole rows
        from opd.client.train.prompts import load_rows

        data_rows, _ = load_rows(config.prompts)
        prompts = [
            str(r.get(config.prompt_field) or json.dumps(r, sort_keys=True, default=str))
            for r in data_rows
        ]
    else:
        prompts = load_prompts(config.prompts, config.prompt_field)
    sft_idx, opd_idx = split_prompts(len(prompts), config.sft_fraction, config.seed)
    split = {
        "seed": config.seed,
        "source": config.prompts,
        "sft_indices": sft_idx,
        "opd_indices": opd_idx,
        "sft_digest": _digest([prompts[i] for i in sft_idx]),
        "opd_digest": _digest([prompts[i] for i in opd_idx]),
    }
    (out / "split.json").write_text(json.dumps(split, indent=1))
    held_out = [data_rows[i] if data_rows else {"prompt": prompts[i]} for i in opd_idx]
    write_rows(held_out, out / "opd_prompts.jsonl")
    log(f"split: {len(sft_idx)} prompts for SFT, {len(opd_idx)} held out for OPD")

    runtime, sampling = config.student, config.sampling
    model, tokenizer = load_student(runtime.model, runtime.dtype, runtime.device)
    eos = int(tokenizer.eos_token_id)
    rows: list[dict[str, Any]] = []
    refused: list[dict[str, Any]] = []
    raw_path = out / "teacher_responses.jsonl"  # every answer, appended as it arrives
    raw_path.write_text("")
    with TeacherClient(config.teacher_url, api_key=config.connection.api_key) as teacher:
        info = teacher.connect()
        same_tokenizer = info.tokenizer_fingerprint == fingerprint_hf_tokenizer(tokenizer)
        single = sft_idx
        if config.episodes.env is not None:
            rows = _teacher_episodes(
                config, teacher, info.name, tokenizer, same_tokenizer, data_rows, sft_idx, log
            )
            single = []  # every SFT prompt was played as an episode
        # Prompts whose rendering + max_tokens cannot fit the teacher's context are not sent
        # (the teacher renders with the same template; with another tokenizer it may still
        # refuse one, which then costs only that prompt: see _generate_chunk).
        cap = info.limits.max_tokens_per_sequence
        sendable = []
        position = {i: j for j, i in enumerate(sft_idx)}
        for i in single:
            n_prompt = len(chat_prompt_ids(tokenizer, prompts[i]))
            if same_tokenizer and n_prompt + sampling.max_tokens > cap:
                refused.append(
                    _refused_row(i, prompts[i], f"{n_prompt} + {sampling.max_tokens} > {cap}")
                )
            else:
                sendable.append(i)
        step = max(1, min(_GENERATE_CHUNK, _GENERATE_TOKENS // (sampling.max_tokens * sampling.n)))
        for c in range(0, len(sendable), step):
            chunk = sendable[c : c + step]
            seeds = [config.seed + position[i] for i in chunk]  # prompt j of SFT: seed + j
            for i, result in _generate_chunk(teacher, config, prompts, chunk, seeds, refused):
                for j, comp in enumerate(result.completions):
                    ids = comp.token_ids
                    eos_closed = (
                        comp.finish_reason == "stop"
                        and bool(ids)
                        and (ids[-1] == eos or not same_tokenizer)
                    )
                    row = {
                        "prompt_index": i,
                        "completion_index": j,
                        "prompt": prompts[i],
                        "response": comp.text,
                        "token_ids": ids,
                        "finish_reason": comp.finish_reason,
                    }
                    with raw_path.open("a") as fh:
                        fh.write(json.dumps(row) + "\n")
                    rows.append(
                        row | {"text": comp.text, "content_ids": ids[:-1] if eos_closed else ids}
                    )
            log(f"teacher answered {min(c + step, len(sendable))}/{len(sendable)} prompts")
    kept, rejected, counts = filter_rows(rows, config.filters)

    def example(row: dict[str, Any]) -> Example:
        if "opening_ids" in row:  # an episode: the teacher's turns trained, the rest context
            return Example(row["opening_ids"], row["token_ids"], row["trained"])
        p_ids = chat_prompt_ids(tokenizer, row["prompt"])
        if same_tokenizer:  # the teacher's own ids, EOS included: exact
            return Example(p_ids, list(row["token_ids"]))
        r_ids = list(tokenizer(row["response"], add_special_tokens=False)["input_ids"])
        return Example(p_ids, [*r_ids, eos])

    examples, fitting = [], []
    for row in kept:  # an example longer than the SFT context is refused, never cut
        ex = example(row)
        if ex.n_tokens > config.sft.max_len:
            rejected.append(row | {"reason": "too_long"})
        else:
            examples.append(ex)
            fitting.append(row)
    kept = fitting
    rejected.extend(refused)
    counts["too_long"] = sum(r["reason"] == "too_long" for r in rejected)
    counts["refused"] = len(refused)
    counts["kept"] = len(kept)
    counts = {"prompts": len(sft_idx), "responses": len(rows), **counts}
    log("filters: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    data_path = out / f"sft_data.{config.dataset_format}"
    public = ("prompt_index", "completion_index", "prompt", "response", "token_ids")
    # an episode's row also keeps its opening ids, its trained mask and the environment's grade
    episode_keys = ("opening_ids", "trained", "reward", "turns", "ended")
    write_rows(
        [{k: r[k] for k in (*public, "finish_reason", *episode_keys) if k in r} for r in kept],
        data_path,
    )
    write_rows(
        [{k: r.get(k) for k in (*public, "finish_reason", "reason", "detail")} for r in rejected],
        out / "rejected.jsonl",
    )
    if not examples:
        raise RuntimeError(
            f"every teacher response was filtered out ({counts}); see {out / 'rejected.jsonl'}"
        )
    nll_before = response_nll(model, examples, config.sft.batch_size)
    log(f"SFT on {len(examples)} responses: {config.sft.epochs} epoch(s), lr {config.sft.lr}")
    history = sft(model, examples, config.sft, out / "sft_metrics.jsonl")
    nll_after = response_nll(model, examples, config.sft.batch_size)
    student_out = out / "student"
    model.save_pretrained(student_out)
    tokenizer.save_pretrained(student_out)
    del model

    summary: dict[str, Any] = {
        "version": COLDSTART_VERSION,
        "teacher": info.name,
        "teacher_url": config.teacher_url,
        "student_in": config.student.model,
        "student_out": str(student_out),
        "dataset": str(data_path),
        "same_tokenizer": same_tokenizer,
        "counts": counts,
        "split": {k: v for k, v in split.items() if not k.endswith("_indices")}
        | {"sft_prompts": len(sft_idx), "opd_prompts": len(opd_idx), "file": "split.json"},
        "generation": config.sampling.model_dump(),
        "filters": config.filters.model_dump(),
        "sft": config.sft.model_dump()
        | {
            "steps": len(history),
            "final_loss": history[-1]["sft/loss"],
            "response_nll_before": nll_before,
            "response_nll_after": nll_after,
        },
    }
    summary["opd"] = {"command": _opd_command(config, student_out, out), "steps": config.opd_steps}
    summary["seconds"] = round(time.perf_counter() - started, 1)
    # Written before OPD, so a failing OPD run never loses the record of SFT.
    (out / "coldstart.json").write_text(json.dumps(summary, indent=1))
    if config.opd_steps > 0:
        summary["opd"]["run_dir"] = str(out / "opd")
        summary["opd"]["final"] = _run_opd(config, student_out, out)
        summary["seconds"] = round(time.perf_counter() - started, 1)
        (out / "coldstart.json").write_text(json.dumps(summary, indent=1))
    return summary


def _teacher_episodes(
    config: ColdstartConfig,
    teacher: Any,
    name: str,
    tokenizer: Any,
    same_tokenizer: bool,
    data_rows: list[dict[str, Any]],
    sft_idx: list[int],
    log: Callable[[str], None],
) -> list[dict[str, Any]]:
    """--env: the teacher plays the environment on every SFT row (coldstart_episodes): in the
    student's tokenizer when it shares it, else (--cross-tokenizer auto) in its own, each
    episode then re-rendered for the student from its text."""
    from opd.client.evaluation.episode_source import EpisodePlayer, teacher_player
    from opd.client.recipes.coldstart_episodes import teacher_episode_rows
    from opd.client.train.episodes import EpisodeSetup

    setup = EpisodeSetup.of(config.episodes, tokenizer)
    assert setup is not None
    student = EpisodePlayer(tokenizer, setup)
    mode = config.connection.cross_tokenizer
    player = teacher_player(teacher, name, same_tokenizer, mode, config.episodes, student)
    if player.cross:
        log(
            f"teacher {name} plays its episodes in its own tokenizer ({len(player.tokenizer):,} "
            "ids) and chat template; each is re-rendered for the student from its text"
        )
    return teacher_episode_rows(
        teacher,
        player,
        student,
        data_rows,
        sft_idx,
        config.sampling.options(),
        config.seed,
        Path(config.out_dir) / "teacher_responses.jsonl",
        log,
    )


def _refused_row(i: int, prompt: str, why: str) -> dict[str, Any]:
    return {
        "prompt_index": i,
        "completion_index": None,
        "prompt": prompt,
        "response": None,
        "token_ids": None,
        "finish_reason": None,
        "reason": "refused",
        "detail": why,
    }


def _generate_chunk(teacher, config, prompts, chunk, seeds, refused):  # noqa: ANN001, ANN202
    """(prompt index, GenerateResult) for a chunk; if the teacher refuses the chunk (422), each
    prompt is sent alone so one bad prompt costs only itself (recorded as "refused")."""
    from opd.client.teacher.errors import TeacherHTTPError
    from opd.shared.schemas import GenerateRequest

    def request(idx: list[int], seed: int) -> GenerateRequest:
        options = config.sampling.options(seed=seed)
        return GenerateRequest(prompts=[prompts[i] for i in idx], **options.model_dump())

    # consecutive SFT positions: one request keeps "prompt j samples with seed + j"
    if seeds == list(range(seeds[0], seeds[0] + len(seeds))):
        try:
            answer = teacher.generate(request(chunk, seeds[0]))
            return list(zip(chunk, answer.results, strict=True))
        except TeacherHTTPError as exc:
            if exc.status != 422:
                raise
    out = []
    for i, seed in zip(chunk, seeds, strict=True):
        try:
            out.append((i, teacher.generate(request([i], seed)).results[0]))
        except TeacherHTTPError as exc:
            if exc.status != 422:
                raise
            refused.append(_refused_row(i, prompts[i], str(exc)))
    return out


def _opd_command(config: ColdstartConfig, student: Path, out: Path) -> str:
    """The `opd train` invocation equivalent to --opd-steps, for running OPD later."""
    args = ["opd", "train", "--student", str(student)]
    runtime = config.student
    for url in config.teacher_url:
        args += ["--teacher-url", url]
    args += ["--prompts", str(out / "opd_prompts.jsonl"), "--run-dir", str(out / "opd")]
    args += ["--seed", str(config.seed), "--dtype", runtime.dtype, "--device", runtime.device]
    if config.connection.cross_tokenizer != "off":  # the OPD stage meets the same teacher
        args += ["--cross-tokenizer", config.connection.cross_tokenizer]
    for key, value in {**config.opd.model_dump(), **_episode_flags(config)}.items():
        if isinstance(value, list):
            for item in value:
                args += [f"--{key.replace('_', '-')}", str(item)]
            continue
        flag = key.replace("_", "-")
        if isinstance(value, bool):
            args.append(f"--{flag}" if value else f"--no-{flag}")
        else:
            args += [f"--{flag}", str(value)]
    return shlex.join(args)


def _episode_flags(config: ColdstartConfig) -> dict[str, Any]:
    """The OPD stage plays the same environment with the same limits (flag names)."""
    e = config.episodes
    if e.env is None:
        return {}
    return {
        "env": e.env,
        "env_arg": list(e.env_args),
        "max_turns": e.max_turns,
        "max_episode_tokens": e.max_episode_tokens,
    }


def _run_opd(config: ColdstartConfig, student: Path, out: Path) -> dict[str, float]:
    """OPD from the SFT-ed student on the held-out prompts; the last step's metrics."""
    from opd.client.train.trainer import Trainer

    with Trainer(opd_stage_config(config, student, out)) as trainer:
        history = trainer.run()
    return history[-1] if history else {}


def opd_stage_config(config: ColdstartConfig, student: Path, out: Path) -> Any:
    """The TrainConfig of the OPD stage: the recipe's teacher, seed and runtime, the held-out
    prompts, the OPD stage's own options, and the environment with its limits (--env)."""
    from opd.client.configs.train import TrainConfig

    values: dict[str, Any] = {
        "student": str(student),
        "teacher_url": config.teacher_url,
        "teacher.api_key": config.connection.api_key,
        "allow_tokenizer_mismatch": config.connection.allow_tokenizer_mismatch,
        "cross_tokenizer": config.connection.cross_tokenizer,
        "teacher_wait_s": config.connection.wait_s,
        "prompts": str(out / "opd_prompts.jsonl"),
        "run_dir": str(out / "opd"),
        "max_steps": config.opd_steps,
        "seed": config.seed,
        "dtype": config.student.dtype,
        "device": config.student.device,
        **config.opd.model_dump(),
        **_episode_flags(config),
    }
    return from_flags(TrainConfig, **values)
