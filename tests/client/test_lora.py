"""LoRA students (opd.client.train.lora, `opd train --lora-rank R`).

- the merged state is the plain model the adapters make: loaded into a model without adapters
  it gives the adapted model's logits, under the base model's own names, and computing it
  leaves the model as it was;
- `opd train --lora-rank` against a real teacher trains the adapters only (the base weights
  end where they started, the optimizer holds adapter moments only), every checkpoint holds a
  standard PEFT folder beside the merged model (each loads on its own and they agree), and a
  run resumed from a checkpoint logs exactly what the uninterrupted run logs.
"""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from opd.client.configs.train import LoraGroup
from opd.client.train.lora import apply_lora, merged_state
from opd.client.train.metric_log import read_metrics
from opd.client.train.trainer import Trainer
from tests.support.metrics import assert_same_metrics
from tests.support.train_config import train_config

IDS = torch.tensor([[1, 504, 3458, 30, 504, 17, 900, 42]])


def test_merged_state_is_the_plain_model_the_adapters_make(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    base_names = set(model.state_dict())
    peft = apply_lora(model, LoraGroup(rank=4, alpha=8.0))
    assert peft.get_base_model() is model
    torch.manual_seed(0)
    with torch.no_grad():  # fresh adapters are the identity (B = 0): make them do something
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merged = merged_state(model)
    assert set(merged) == base_names
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key  # nothing merged in place
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    plain.load_state_dict(merged)
    untouched = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        adapted, merged_logits = model(IDS).logits, plain(IDS).logits
        assert (adapted - untouched(IDS).logits).abs().max() > 1e-3  # the adapters matter
    torch.testing.assert_close(merged_logits, adapted, atol=2e-4, rtol=1e-4)


def test_lora_student_trains_adapters_and_resumes_exactly(tiny_server, tiny_student_dir, tmp_path):
    lora = dict(lora_rank=4, lora_alpha=16.0, lr=1e-2)
    with Trainer(train_config(tiny_student_dir, tiny_server, tmp_path / "full", **lora)) as t:
        assert all("lora_" in n for n, p in t.model.named_parameters() if p.requires_grad)
        t.run()
        base = AutoModelForCausalLM.from_pretrained(tiny_student_dir, dtype=torch.float32)
        trained = {
            n.replace(".base_layer", ""): p
            for n, p in t.model.named_parameters()
            if "lora_" not in n
        }
        for name, p in base.named_parameters():
            assert torch.equal(p, trained[name]), name  # frozen
        moved = [p for n, p in t.model.named_parameters() if "lora_B" in n]
        assert any(p.abs().max() > 0 for p in moved)  # the adapters trained
    full = read_metrics(tmp_path / "full" / "metrics.jsonl")
    assert all(m["train/grad_norm"] > 0 for m in full)

    ckpt = tmp_path / "full" / "checkpoints" / "step_4"
    assert json.loads((ckpt / "adapter" / "adapter_config.json").read_text())["r"] == 4
    moments = load_file(str(ckpt / "optimizer.safetensors"))
    assert moments and all("lora_" in k for k in moments)  # no state for frozen weights
    from peft import PeftModel

    plain = AutoModelForCausalLM.from_pretrained(ckpt / "model", dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_student_dir, dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, str(ckpt / "adapter"))
    with torch.no_grad():
        torch.testing.assert_close(plain(IDS).logits, adapted(IDS).logits, atol=2e-4, rtol=1e-4)

    interrupted = tmp_path / "interrupted"
    with Trainer(
        train_config(tiny_student_dir, tiny_server, interrupted, max_steps=2, **lora)
    ) as t:
        t.run()
    resumed = train_config(tiny_student_dir, tiny_server, interrupted, resume="latest", **lora)
    with Trainer(resumed) as t:
        assert t.step == 2
        t.run()
    assert_same_metrics(full, read_metrics(interrupted / "metrics.jsonl"), rel=1e-4)
