"""A model's output head (LM head + logit transforms): from a loaded model, or read alone from
its checkpoint files.

Engines that hand back final hidden states (vLLM's pooling runner) leave the LM head to us. We
read the head straight from the safetensors shards instead of instantiating the whole model: the
model's *structure* is built on the meta device (no memory) just to learn which parameter the
output embedding is, and under which names it may be stored (tied models store it once, as the
input embedding).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from opd.modeling.scoring import HeadSpec


def _shard_for(folder: Path) -> dict[str, Path]:
    """Map every tensor name to the safetensors file that holds it."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    names: dict[str, Path] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as fh:
            for name in fh.keys():  # noqa: SIM118 (safe_open is not a mapping)
                names[name] = file
    return names


def logit_transforms(config: object) -> tuple[float | None, float | None]:
    """(scale, final softcap) some families apply after the LM head matmul; None = not used."""
    scale = getattr(config, "logit_scale", None)  # Cohere multiplies
    scaling = getattr(config, "logits_scaling", None)  # Granite divides
    if scaling:
        scale = (scale or 1.0) / float(scaling)
    softcap = getattr(config, "final_logit_softcapping", None)
    return (float(scale) if scale not in (None, 1.0) else None), softcap


def head_spec(model: torch.nn.Module) -> HeadSpec:
    """A loaded model's output head as the scoring math reads it: weight, bias, scale and
    softcap. Detached: the teacher scores under inference mode and the student's statistics
    pass needs no gradient (its loss pass runs the head itself, with gradients)."""
    head = model.get_output_embeddings()
    scale, softcap = logit_transforms(model.config)
    bias = getattr(head, "bias", None)
    return HeadSpec(
        weight_VH=head.weight.detach(),
        bias_V=None if bias is None else bias.detach(),
        logit_scale=scale,
        final_softcap=softcap,
    )


def head_param_names(config: object, trust_remote_code: bool = False) -> list[str]:
    """Every name the output-embedding weight may be stored under, most specific first."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    head = model.get_output_embeddings()
    embed = model.get_input_embeddings()
    names = [n for n, p in model.named_parameters(remove_duplicate=False) if p is head.weight]
    if getattr(config, "tie_word_embeddings", False) or not names:
        names += [n for n, p in model.named_parameters(remove_duplicate=False) if p is embed.weight]
    # Fallback spellings seen in checkpoints whose module tree differs from the saved keys.
    names += ["lm_head.weight", "model.embed_tokens.weight"]
    return list(dict.fromkeys(names))


def load_head(
    path: str,
    config: object,
    dtype: torch.dtype,
    device: torch.device,
    trust_remote_code: bool = False,
) -> HeadSpec:
    """The HeadSpec of the model in `path`, with the weight in `dtype` on `device`."""
    folder = Path(path)
    shards = _shard_for(folder)
    if not shards:
        raise FileNotFoundError(f"no *.safetensors weights in {folder}")
    names = head_param_names(config, trust_remote_code)
    name = next((n for n in names if n in shards), None)
    if name is None:
        raise KeyError(f"output head not found in {folder}: looked for {names}")
    with safe_open(str(shards[name]), framework="pt") as fh:
        weight = fh.get_tensor(name)
        bias_name = name.removesuffix(".weight") + ".bias"
        bias = fh.get_tensor(bias_name) if bias_name in fh.keys() else None  # noqa: SIM118
    scale, softcap = logit_transforms(config)
    return HeadSpec(
        weight_VH=weight.to(device=device, dtype=dtype),
        bias_V=None if bias is None else bias.to(device=device, dtype=dtype),
        logit_scale=scale,
        final_softcap=softcap,
    )
