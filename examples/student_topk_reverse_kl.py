"""Student-support reverse KL over HTTP: the loss TRL's distillation trainers cannot compute yet.

TRL's async distillation narrows reverse KL to two ids per position (the teacher's top-1 and
the sampled token) because a stock vLLM server cannot score the student's own top-k. This
script does one training step of the full objective against any server that serves vLLM's
`prompt_logprob_token_ids` field on /v1/completions, as `opd serve` does:

1. the student samples a completion for a prompt (transformers' generate);
2. its top-k ids at every completion position go to the teacher as
   `prompt_logprob_token_ids` (row i = ids scored as predictions of token start + i + 1);
3. the teacher answers their log-probs, `prompt_token_id_logprobs` (base64 .npy, no pickle);
4. the loss is KL(p_bar || q_bar) on the student's top-k support, p_bar and q_bar the student's
   and the teacher's distributions renormalised there; one optimizer step on it.

    opd serve &                                   # the embedded SmolLM2 teacher
    python examples/student_topk_reverse_kl.py --teacher-url http://127.0.0.1:8000 \
        --student PATH_OR_HUB_ID

The loss function has the shape of a TRL `compute_loss` term (student logits, completion
mask, teacher values per position), so it drops into a TRL trainer subclass as is.
"""

from __future__ import annotations

import argparse
import base64
import io

import httpx
import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def teacher_logprobs_at(
    url: str, model: str, ids: list[int], start: int, cand_ids: np.ndarray, temperature: float
) -> np.ndarray:
    """Teacher log-probs [rows, k] at the student's candidates, rows = len(ids) - 1 - start."""
    body = {
        "model": model,
        "prompt": ids,
        "max_tokens": 1,  # vLLM's minimum; opd also takes 0
        "temperature": temperature,
        "prompt_logprob_token_ids": cand_ids.tolist(),
        "prompt_logprob_start": start,
    }
    r = httpx.post(url + "/v1/completions", json=body, timeout=300)
    r.raise_for_status()
    encoded = r.json()["choices"][0]["prompt_token_id_logprobs"]
    return np.load(io.BytesIO(base64.b64decode(encoded)), allow_pickle=False)


def student_support_reverse_kl(
    student_logits_NV: torch.Tensor, cand_ids_NK: torch.Tensor, teacher_logp_NK: torch.Tensor
) -> torch.Tensor:
    """Per position KL(p_bar || q_bar) on the student's top-k ids (the method's equation)."""
    log_p = torch.log_softmax(student_logits_NV.float(), dim=-1).gather(-1, cand_ids_NK)
    log_pbar = torch.log_softmax(log_p, dim=-1)
    log_qbar = torch.log_softmax(teacher_logp_NK, dim=-1)
    return (log_pbar.exp() * (log_pbar - log_qbar)).sum(-1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teacher-url", default="http://127.0.0.1:8000")
    ap.add_argument("--student", required=True, help="student model folder or hub id")
    ap.add_argument("--prompt", default="Explain in one sentence why the sky is blue.")
    ap.add_argument("--top-k", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=1e-5)
    args = ap.parse_args()

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(args.student)
    student = AutoModelForCausalLM.from_pretrained(args.student, dtype=torch.float32)
    chat = [{"role": "user", "content": args.prompt}]
    prompt_ids = tok.apply_chat_template(chat, add_generation_prompt=True, return_dict=False)
    prompt_ids = list(prompt_ids["input_ids"] if isinstance(prompt_ids, dict) else prompt_ids)
    with torch.no_grad():  # 1. the student samples
        out = student.generate(
            torch.tensor([prompt_ids]),
            do_sample=True,
            temperature=args.temperature,
            max_new_tokens=args.max_new_tokens,
            pad_token_id=tok.eos_token_id,
        )
    ids = out[0].tolist()
    start = len(prompt_ids) - 1  # causal row predicting the first completion token

    logits = student(torch.tensor([ids])).logits[0, start:-1]  # rows start .. L-2
    cand = logits.detach().topk(args.top_k, dim=-1).indices  # 2. the student's support
    model = httpx.get(args.teacher_url + "/v1/models").json()["data"][0]["id"]
    teacher = teacher_logprobs_at(  # 3. the teacher at exactly those ids
        args.teacher_url, model, ids, start, cand.numpy(), args.temperature
    )
    loss = student_support_reverse_kl(logits, cand, torch.from_numpy(teacher)).mean()  # 4.
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr)
    loss.backward()
    optimizer.step()
    print(
        f"completion tokens: {len(ids) - len(prompt_ids)}  top-k: {args.top_k}  "
        f"student-support reverse KL: {loss.item():.4f}"
    )


if __name__ == "__main__":
    main()
