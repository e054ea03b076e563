"""LoRA students: low-rank adapters trained in place of the student's full weights (peft).

TRL (`peft_config`), verl, prime-rl, NeMo-RL and Tinker train adapters: the optimizer holds
state for the adapters only, and what must reach the rollout engine after a step is the
adapters, not every weight. opd uses the `peft` library for the adapters themselves (the layer
injection, the standard PEFT folder, loading one back) and keeps the rest of the trainer as it
is: peft injects its layers into the HF model in place, so the StudentModule, the rollout
engines and the loss see the same model object, now with adapters in its linear layers.

- `apply_lora(model, group, adapter=None)`: inject fresh adapters (peft initialises B = 0, so
  the student starts exactly as the base model), or load a saved adapter folder (resume);
  only the adapters require gradients afterwards.
- `merged_state(model)`: the full state dict under the base model's HF names, each adapted
  weight as W + scale * B A (peft's own delta), computed without touching the model: what a
  checkpoint's `model/` holds (a plain model anyone can load) and what an engine without LoRA
  support is synced with.
- `save_adapter` / `adapter_dir`: the standard PEFT folder (adapter_config.json +
  adapter_model.safetensors) beside the merged model in every checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

ADAPTER_FOLDER = "adapter"  # inside a checkpoint, beside model/


def apply_lora(model: torch.nn.Module, group: Any, adapter: Path | None = None) -> Any:
    """Inject LoRA adapters into `model` (in place) and return the PeftModel around it: fresh
    ones as `group` says (rank, alpha, dropout, target modules), or those saved in `adapter`,
    trainable. The HF model itself is `peft_model.get_base_model()`, the object passed in."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if adapter is not None:
        return PeftModel.from_pretrained(model, str(adapter), is_trainable=True)
    targets = list(group.target_modules)
    config = LoraConfig(
        r=group.rank,
        lora_alpha=group.alpha,
        lora_dropout=group.dropout,
        target_modules=targets[0] if targets == ["all-linear"] else targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def lora_layers(model: torch.nn.Module) -> dict[str, Any]:
    """Module name -> peft LoRA layer, for every adapted layer of `model`."""
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


@torch.no_grad()
def merged_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of `model` (an HF model with LoRA layers injected) under the base model's
    names, adapted weights merged: W + scale * B A for the active adapter; adapter tensors
    left out. The model is not modified."""
    layers = lora_layers(model)
    out: dict[str, torch.Tensor] = {}
    for name, value in model.state_dict().items():
        if ".lora_" in name:
            continue
        if ".base_layer." not in name:
            out[name] = value
            continue
        owner, _, leaf = name.rpartition(".base_layer.")
        clean = f"{owner}.{leaf}"
        layer = layers[owner]
        if leaf == "weight":
            delta = sum(
                (layer.get_delta_weight(a) for a in layer.active_adapters if a in layer.lora_A),
                torch.zeros_like(value),
            )
            out[clean] = value + delta.to(value.dtype)
        else:
            out[clean] = value
    return out


def save_adapter(peft_model: Any, folder: Path) -> None:
    """The adapters as a standard PEFT folder (loadable with PeftModel.from_pretrained)."""
    peft_model.save_pretrained(str(folder), safe_serialization=True)


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
