"""Held-out sampled reverse KL of a student against a teacher: one metric for any trainer.

    python -m opd.bench.heldout_kl CONFIG_JSON

CONFIG_JSON keys: student (HF folder), teacher_url (an `opd serve` URL), prompts (held-out
prompt strings), n (samples per prompt), max_new_tokens, seed; optional device ("cpu").

Why a separate metric: opd's trainer and TRL's ServerDistillationTrainer optimise different
losses (opd's sampled/top-k objectives, TRL's top-1 Bernoulli reverse KL) and log different
numbers, so neither's training loss can rank the two. This module only loads the saved
student folder, so it scores both final students the same way:

1. sample n completions per prompt from the student with transformers `generate` at
   temperature 1, top_p 1, top_k 0 (the student's own distribution), the prompt rendered as
   one user turn with the assistant turn opened (opd.shared.chat.chat_prompt_ids, the same
   ids opd's trainer and TRL send); a completion ends at its first EOS, which it keeps
   (both trainers train on it);
2. log p of every sampled token from a fresh teacher-forced float32 forward of the student
   (not the sampler's scores, so the number does not depend on the generation path);
3. log q of the same tokens from the teacher's native POST /v1/score (TeacherClient,
   score_from = prompt length, so row i is token prompt_len + i given everything before it);
4. kl_sampled = mean over all completion tokens of (log p - log q): an unbiased estimate of
   the per-token reverse KL(p || q) on the student's own samples, opd's `kl/sampled`
   diagnostic (docs/method.md).

Determinism: prompt i is sampled alone (no padding next to other prompts) right after
torch.manual_seed(seed + i), so the same seed gives the same samples for the same student
whatever the prompt list around it. The last stdout line is JSON {"kl_sampled", "tokens",
"per_prompt": [...]}; `heldout_kl(cfg)` returns the same dict for in-process callers.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import numpy as np

REQUIRED = ("student", "teacher_url", "prompts", "n", "max_new_tokens", "seed")


def sample_completions(
    model: Any,
    tokenizer: Any,
    prompt_ids: list[int],
    n: int,
    max_new_tokens: int,
    seed: int,
    eos: list[int],
) -> list[list[int]]:
    """n completions of one prompt from the student's own distribution, seeded."""
    import torch
    from transformers import GenerationConfig

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    config = GenerationConfig(
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        min_p=None,
        repetition_penalty=1.0,
        max_new_tokens=max_new_tokens,
        num_return_sequences=n,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    # fork_rng: an in-process caller's global RNG state is left as it was.
    forked = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=forked), torch.no_grad():
        torch.manual_seed(seed)
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            generation_config=config,
        )
    from opd.modeling.eos import cut_at_eos

    return [cut_at_eos(row[len(prompt_ids) :], eos).token_ids for row in out.cpu().numpy()]


def student_logprobs(
    model: Any, prompt_ids: list[int], completions: list[list[int]]
) -> list[np.ndarray]:
    """log p of every completion token, teacher-forced, float32, one sequence at a time (no
    padding, so no position-id or mask subtleties)."""
    import torch

    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for comp in completions:
            ids = torch.tensor([prompt_ids + comp], dtype=torch.long, device=device)
            logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].float()
            logp = torch.log_softmax(logits, dim=-1)
            target = torch.tensor(comp, dtype=torch.long, device=device)
            out.append(logp.gather(1, target[:, None])[:, 0].cpu().numpy().astype(np.float64))
    return out


def teacher_logprobs(
    client: Any, prompt_ids: list[int], completions: list[list[int]]
) -> list[np.ndarray]:
    """log q of the same tokens from POST /v1/score (score_from = prompt length)."""
    from opd.shared import ScoreRequest, SequenceIn

    request = ScoreRequest(
        top_k=0,
        temperature=1.0,
        sequences=[
            SequenceIn(token_ids=prompt_ids + comp, score_from=len(prompt_ids))
            for comp in completions
        ],
    )
    result = client.score(request)
    return [np.asarray(s.token_logprobs, dtype=np.float64) for s in result.sequences()]


def heldout_kl(cfg: dict[str, Any]) -> dict[str, Any]:
    """The metric of the module doc on `cfg` (the CONFIG_JSON keys)."""
    missing = [k for k in REQUIRED if k not in cfg]
    if missing:
        raise ValueError(f"config is missing {missing}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opd.client.teacher import TeacherClient
    from opd.shared.chat import chat_prompt_ids
    from opd.shared.fingerprint import fingerprint_hf_tokenizer

    started = time.perf_counter()
    device = str(cfg.get("device", "cpu"))
    tokenizer = AutoTokenizer.from_pretrained(cfg["student"])
    model = AutoModelForCausalLM.from_pretrained(cfg["student"], dtype=torch.float32)
    model = model.to(device).eval()
    from opd.modeling.eos import eos_ids

    # the tokenizer's EOS first: generate pads with the first id when there is no pad token
    eos = sorted(
        eos_ids(tokenizer, model.generation_config), key=lambda i: i != tokenizer.eos_token_id
    )
    n, max_new, seed = int(cfg["n"]), int(cfg["max_new_tokens"]), int(cfg["seed"])
    # The teacher refuses to connect when its tokenizer is not the student's: a KL between
    # two vocabularies would be meaningless.
    fingerprint = fingerprint_hf_tokenizer(tokenizer) if cfg.get("check_tokenizer", True) else None

    per_prompt: list[dict[str, Any]] = []
    total, count = 0.0, 0
    sample_s = student_s = teacher_s = 0.0
    with TeacherClient(str(cfg["teacher_url"]), tokenizer_fingerprint=fingerprint) as client:
        for i, prompt in enumerate(cfg["prompts"]):
            prompt_ids = chat_prompt_ids(tokenizer, str(prompt))
            t0 = time.perf_counter()
            comps = sample_completions(model, tokenizer, prompt_ids, n, max_new, seed + i, eos)
            t1 = time.perf_counter()
            logp = student_logprobs(model, prompt_ids, comps)
            t2 = time.perf_counter()
            logq = teacher_logprobs(client, prompt_ids, comps)
            t3 = time.perf_counter()
            sample_s += t1 - t0
            student_s += t2 - t1
            teacher_s += t3 - t2
            diffs = np.concatenate([p - q for p, q in zip(logp, logq, strict=True)])
            total += float(diffs.sum())
            count += int(diffs.size)
            per_prompt.append(
                {
                    "prompt": str(prompt),
                    "kl_sampled": float(diffs.mean()) if diffs.size else None,
                    "tokens": int(diffs.size),
                    "lengths": [len(c) for c in comps],
                    "ended_eos": sum(1 for c in comps if c and c[-1] in eos),
                }
            )

    return {
        "kl_sampled": total / count if count else None,
        "tokens": count,
        "per_prompt": per_prompt,
        "student": str(cfg["student"]),
        "n": n,
        "max_new_tokens": max_new,
        "seed": seed,
        "sample_s": sample_s,
        "student_forward_s": student_s,
        "teacher_s": teacher_s,
        "total_s": time.perf_counter() - started,
    }


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m opd.bench.heldout_kl CONFIG_JSON", file=sys.stderr)
        return 2
    result = heldout_kl(json.loads(args[0]))
    sys.stderr.flush()
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
