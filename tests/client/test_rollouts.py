"""The hf rollout engine: the policy is the model's plain distribution (the checkpoint's
generation defaults are ignored and left in place), prompts of different lengths batched with
left padding continue exactly as they would alone, and seeds make sampling reproducible."""

from __future__ import annotations

import numpy as np
import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from opd.client.train.engines import make_engine
from opd.client.train.rollouts import SamplingParams, make_rollouts
from opd.client.train.student_math import StudentModule, position_stats
from opd.shared.schemas import GenerateOptions

PROMPTS = [[1, 504, 3458, 30, 504], [1, 42], [1, 900, 901, 902, 903, 904, 905, 906, 17]]


def _model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def test_sampling_ignores_and_keeps_the_models_generation_config(tiny_model_dir):
    model = _model(tiny_model_dir)
    prompt = PROMPTS[0]
    with torch.no_grad():
        top = int(torch.argmax(model(torch.tensor([prompt])).logits[0, -1]))
    # The tiny model is peaky (head x 40): its first sampled token is mostly the argmax. A
    # suppressed argmax in generation_config.json would make it impossible.
    own = GenerationConfig(suppress_tokens=[top], repetition_penalty=5.0, eos_token_id=2)
    model.generation_config = own
    params = SamplingParams(GenerateOptions(n=4, temperature=1.0, max_tokens=3), (2,), 2)
    (group,) = make_engine("hf", StudentModule(model)).sample([prompt], params, [0])
    assert len(group) == 4
    assert sum(int(s.completion_ids[0]) == top for s in group) >= 2
    assert model.generation_config is own  # restored: a saved checkpoint keeps its own config


def test_left_padded_batch_continues_each_prompt_as_alone(tiny_model_dir):
    model = _model(tiny_model_dir)
    engine = make_engine("hf", StudentModule(model))
    greedy = SamplingParams(GenerateOptions(n=1, temperature=0.0, max_tokens=6), (2,), 2)
    together = engine.sample(PROMPTS, greedy, [0] * len(PROMPTS))
    for prompt, group in zip(PROMPTS, together, strict=True):
        with torch.no_grad():
            alone = model.generate(
                torch.tensor([prompt]), do_sample=False, max_new_tokens=6, eos_token_id=2,
                pad_token_id=2, generation_config=GenerationConfig(),
            )[0, len(prompt):].tolist()  # fmt: skip
        stop = alone.index(2) + 1 if 2 in alone else len(alone)
        assert group[0].completion_ids.tolist() == alone[:stop]
        assert group[0].truncated == (2 not in alone)


def test_seeds_make_rollouts_reproducible(tiny_model_dir):
    model = _model(tiny_model_dir)
    student = StudentModule(model)
    engine = make_engine("hf", student)
    params = SamplingParams(GenerateOptions(n=3, temperature=1.5, max_tokens=8), (2,), 2)
    prompts = list(enumerate(PROMPTS))
    seeds = ([5] * 3, [5] * 3, [6] * 3)
    runs = [make_rollouts(engine, student, prompts, params, 4, seeds=s) for s in seeds]
    ids = [[r.token_ids.tolist() for r in run] for run in runs]
    assert ids[0] == ids[1] and ids[0] != ids[2]
    first = runs[0]
    assert [r.prompt_index for r in first] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for r in first:
        assert r.student_topk_ids_TK.shape == (r.completion_len, 4)
        assert r.engine_token_logp_T is None  # hf samples the trainer's module itself


def test_the_engine_hands_out_the_students_own_top_k(tiny_model_dir):
    """SamplingParams.top_ids: the hf engine's top-K ids at every sampled position are the
    trainer's own top-K there (a teacher-forced forward, position_stats), and at temperature
    0 its top-1 is the token it chose."""
    model = _model(tiny_model_dir)
    student = StudentModule(model)
    engine = make_engine("hf", student)
    for temperature, n in ((1.0, 2), (0.0, 1)):
        options = GenerateOptions(n=n, temperature=temperature, max_tokens=8)
        params = SamplingParams(options, (2,), 2).with_top_ids(4)
        groups = engine.sample(PROMPTS, params, [1, 2, 3])
        samples = [(p, s) for p, group in zip(PROMPTS, groups, strict=True) for s in group]
        seqs = [np.concatenate([np.asarray(p), s.completion_ids]) for p, s in samples]
        stats = position_stats(student, seqs, [len(p) for p, _ in samples], top_k=4)
        same = []
        for (_, s), st in zip(samples, stats, strict=True):
            assert s.topk_ids_TK.shape == (len(s.completion_ids), 4)
            if temperature == 0:
                np.testing.assert_array_equal(s.topk_ids_TK[:, 0], s.completion_ids)
            own = np.sort(st["student_topk_ids_TK"], axis=1)
            same.extend((np.sort(s.topk_ids_TK, axis=1) == own).all(axis=1))
        assert np.mean(same) >= 0.9, np.mean(same)  # only float near-ties may swap
