"""Student sampling ignores the checkpoint's generation defaults (the policy is the model's plain
distribution, which the rollout statistics and losses assume), and leaves them in place."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from opd.client.train.rollouts import SamplingParams, sample_completions


def test_sampling_ignores_and_keeps_the_models_generation_config(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    prompt = [1, 504, 3458, 30, 504]
    with torch.no_grad():
        top = int(torch.argmax(model(torch.tensor([prompt])).logits[0, -1]))
    # The tiny model is peaky (head x 40): its first sampled token is mostly the argmax. A
    # suppressed argmax in generation_config.json would make it impossible.
    own = GenerationConfig(suppress_tokens=[top], repetition_penalty=5.0, eos_token_id=2)
    model.generation_config = own
    params = SamplingParams(
        n=4, temperature=1.0, top_p=1.0, max_new_tokens=3, eos_token_id=2, pad_token_id=2
    )
    torch.manual_seed(0)
    completions = sample_completions(model, prompt, params)
    assert sum(int(ids[0]) == top for ids, _ in completions) >= 2
    assert model.generation_config is own  # restored: a saved checkpoint keeps its own config
