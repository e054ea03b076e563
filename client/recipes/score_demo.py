"""`opd score-demo`: the teacher service on the embedded SmolLM2, scoring an example.

It starts `opd serve` (embedded SmolLM2-135M-Instruct) as its own process on a free loopback
port, scores two answers to one question with TeacherClient (binary encoding, teacher top-k,
entropy and candidate ids) and prints, per answer token, what the teacher thinks of it.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from opd.client.teacher.client import TeacherClient
from opd.client.teacher.launch import LocalTeacher
from opd.shared.fingerprint import fingerprint_hf_tokenizer
from opd.shared.packed import PackedRequest
from opd.shared.schemas import ScoreOptions

ANSWERS = ("The capital of France is Paris.", "The capital of France is Berlin.")


def run_score_demo(prompt: str) -> None:
    from transformers import AutoTokenizer

    from opd.modeling.embedded import embedded_model_dir

    console = Console()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    with console.status("preparing the embedded SmolLM2-135M-Instruct (converted once, cached)"):
        model_dir = embedded_model_dir()
    console.print(f"embedded teacher: [bold]{model_dir}[/]")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    log_path = Path(tempfile.gettempdir()) / "opd-quickstart-teacher.log"
    with console.status(f"starting the teacher service (log: {log_path})"):
        teacher = LocalTeacher(str(model_dir), log_path=log_path)
        url = teacher.start()
    try:
        console.print(f"teacher service ready at [bold]{url}[/] (docs at {url}/docs)")
        with TeacherClient(
            url, tokenizer_fingerprint=fingerprint_hf_tokenizer(tokenizer)
        ) as client:
            info = client.connect()
            console.print(
                f"model {info.name}, vocab {info.vocab_size}, protocol {info.protocol_version}, "
                f"tokenizer fingerprint {info.tokenizer_fingerprint[:12]}... (matches)"
            )
            messages = [{"role": "user", "content": prompt}]
            context = tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True
            )
            if isinstance(context, dict) or hasattr(context, "input_ids"):
                context = context["input_ids"]
            sequences, score_from, candidates = [], [], []
            for answer in ANSWERS:
                completion = tokenizer(answer, add_special_tokens=False)["input_ids"]
                sequences.append([*context, *completion])
                score_from.append(len(context))
                # Candidate ids per position: here the two answers' tokens, as a student would
                # send its own top-k ids.
                candidates.append([[tok, completion[-2]] for tok in completion])
            request = PackedRequest.from_arrays(
                sequences, score_from, candidates, ScoreOptions(top_k=3, entropy=True)
            )
            result = client.score(request)
        for answer, (seq, sf), scores in zip(
            ANSWERS, zip(sequences, score_from, strict=True), result.sequences(), strict=True
        ):
            table = Table(title=f"teacher on: {answer!r}")
            for col in ("token", "log q(token)", "entropy", "teacher top-3"):
                table.add_column(col)
            for i, tok in enumerate(seq[sf:]):
                top = ", ".join(
                    f"{tokenizer.decode([int(t)])!r} {lp:.2f}"
                    for t, lp in zip(scores.top_k_ids[i], scores.top_k_logprobs[i], strict=True)
                )
                table.add_row(
                    repr(tokenizer.decode([tok])),
                    f"{scores.token_logprobs[i]:.3f}",
                    f"{scores.entropy[i]:.2f}",
                    top,
                )
            console.print(table)
            console.print(f"sum log q = {float(scores.token_logprobs.sum()):.3f}\n")
        console.print(
            f"done in {time.perf_counter() - started:.1f}s. Serve it yourself with "
            "[bold]opd serve[/] and see docs/protocol.md."
        )
    finally:
        teacher.stop()
