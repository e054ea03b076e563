"""The student model: loading, chat prompts, and building a student from a teacher's layers.

A student made by keeping a subset of the teacher's decoder layers is a recognised starting
point for distillation: DistilBERT (Sanh et al., 2019) initialised its student from every other
layer of BERT, and layer-pruning work (e.g. ShortGPT, Men et al., 2024; "The Unreasonable
Ineffectiveness of the Deeper Layers", Gromov et al., 2024) shows that evenly dropped layers
leave a model that is worse but close to the teacher's behaviour. Such a student shares the
teacher's tokenizer and embeddings exactly, so the service's scores apply token for token, and
it starts near enough to the teacher for on-policy distillation to have a signal from step one.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

# Re-exported: the rendering lives in the contract, shared with the server's /v1/generate.
from opd.shared.chat import chat_prompt_ids as chat_prompt_ids

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def evenly_spaced_layers(total: int, keep: int) -> list[int]:
    """`keep` layer indices spread over [0, total), always including the first and the last."""
    if not 1 <= keep <= total:
        raise ValueError(f"keep={keep} must be in [1, {total}]")
    if keep == 1:
        return [0]
    return sorted({round(i * (total - 1) / (keep - 1)) for i in range(keep)})


def build_layer_subset_student(teacher_dir: str | Path, out_dir: str | Path, keep: int) -> Path:
    """Save a student that keeps `keep` evenly spaced decoder layers of the teacher (plus its
    embeddings, final norm, LM head and tokenizer) to `out_dir`; returns out_dir."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out_dir)
    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    layers = model.get_decoder().layers
    kept = evenly_spaced_layers(len(layers), keep)
    model.get_decoder().layers = torch.nn.ModuleList(layers[i] for i in kept)
    for new_index, layer in enumerate(model.get_decoder().layers):
        attn = getattr(layer, "self_attn", None)
        if attn is not None and hasattr(attn, "layer_idx"):
            attn.layer_idx = new_index  # the KV cache is indexed by position in the stack
    model.config.num_hidden_layers = len(kept)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in kept]
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(teacher_dir).save_pretrained(out)
    (out / "opd_student.txt").write_text(
        f"layer-subset student of {teacher_dir}: kept layers {kept} of {len(layers)}\n"
    )
    return out


def load_student(path: str, dtype: str = "float32", device: str = "cpu", grad_ckpt: bool = False):
    """(model, tokenizer) for training; gradient checkpointing trades compute for memory.
    A `.gguf` path loads its copy, converted once into the cache (opd.modeling.gguf)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opd.modeling.gguf import model_folder

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = model_folder(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=_DTYPES[dtype]).to(device)
    if grad_ckpt:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    return model, tokenizer
