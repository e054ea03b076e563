"""The vLLM backend's memory plan: KV cache sized from one pack, engines checked to fit, and a
plan that cannot fit refused at start by a real `opd serve` naming the setting (issue #18)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig

from opd.client.teacher.launch import free_port
from opd.server.backends.vllm_memory import (
    EnginePlan,
    GiB,
    VLLMMemoryError,
    check_plan,
    kv_bytes_per_token,
    plan_engines,
    weights_bytes,
)


def _smollm2_shape() -> LlamaConfig:
    # SmolLM2-135M's attention: 30 layers, 9 query heads of 64, 3 KV heads.
    return LlamaConfig(
        num_hidden_layers=30,
        hidden_size=576,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
    )


def test_kv_bytes_per_token_counts_k_and_v_of_every_kv_head() -> None:
    # by hand: K and V (2) x 30 layers x 3 KV heads x 64 dims x 4 bytes = 46,080 bytes
    assert kv_bytes_per_token(_smollm2_shape(), "float32") == 46_080
    assert kv_bytes_per_token(_smollm2_shape(), "bfloat16") == 23_040
    no_gqa = LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4)
    assert kv_bytes_per_token(no_gqa, "float32") == 2 * 2 * 4 * 16 * 4


def test_weights_are_counted_in_the_engine_dtype(tmp_path) -> None:
    save_file(
        {"a": torch.zeros(10, 20, dtype=torch.bfloat16), "b": torch.zeros(7, dtype=torch.int64)},
        str(tmp_path / "model.safetensors"),
    )
    # 200 bf16 values become float32 on CPU (800 B); integers keep their width (56 B)
    assert weights_bytes(str(tmp_path), "float32") == 800 + 56
    assert weights_bytes(str(tmp_path), "bfloat16") == 400 + 56
    with pytest.raises(VLLMMemoryError, match="no \\*.safetensors"):
        weights_bytes(str(tmp_path / "missing"), "float32")


def test_the_default_kv_cache_holds_one_pack(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    save_file({"w": torch.zeros(4, dtype=torch.float32)}, str(tmp_path / "m.safetensors"))
    args = dict(model_path=str(tmp_path), config=_smollm2_shape(), dtype="float32", engines=2)
    plan = plan_engines(**args, pack_tokens=8192, max_model_len=2048, kv_cache_gib=None)
    assert (plan.kv_tokens, plan.kv_cache) == (8192 + 512, (8192 + 512) * 46_080)
    # a context longer than a pack: one whole sequence must fit
    plan = plan_engines(**args, pack_tokens=1024, max_model_len=4096, kv_cache_gib=None)
    assert plan.kv_tokens == 4096 + 512
    plan = plan_engines(**args, pack_tokens=1024, max_model_len=4096, kv_cache_gib=0.5)
    assert (plan.kv_cache, plan.kv_source) == (GiB // 2, "OPD_VLLM_KV_CACHE_GIB")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "2")  # vLLM applies it over any argument
    plan = plan_engines(**args, pack_tokens=1024, max_model_len=4096, kv_cache_gib=0.5)
    assert (plan.kv_cache, plan.kv_source) == (2 * GiB, "VLLM_CPU_KVCACHE_SPACE")
    assert plan.total == 2 * (16 + 2 * GiB + plan.overhead)


def test_a_plan_that_cannot_work_is_refused_naming_the_setting() -> None:
    plan = EnginePlan(engines=2, weights=GiB, kv_cache=GiB, kv_tokens=1000, kv_source="x")
    with pytest.raises(VLLMMemoryError, match="OPD_VLLM_KV_CACHE_GIB or lower OPD_MAX_MODEL_LEN"):
        check_plan(plan, max_model_len=2048, available=100 * GiB)
    with pytest.raises(VLLMMemoryError, match="block margin"):
        check_plan(plan, max_model_len=1000, available=100 * GiB)  # no room for the margin
    with pytest.raises(VLLMMemoryError) as refused:
        check_plan(plan, max_model_len=400, available=4 * GiB)
    message = str(refused.value)
    assert "OPD_VLLM_KV_CACHE_GIB" in message and "OPD_GENERATE=false" in message
    assert "4.00 GiB of memory is available" in message
    check_plan(plan, max_model_len=400, available=8 * GiB)  # fits: no error


def test_opd_serve_refuses_a_kv_cache_that_cannot_fit_before_starting_engines() -> None:
    pytest.importorskip("vllm")
    env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}
    env.update(HF_HUB_OFFLINE="1", OPD_VLLM_KV_CACHE_GIB="100000", OPD_PORT=str(free_port()))
    done = subprocess.run(
        [sys.executable, "-m", "opd.client.cli", "serve", "--backend", "vllm"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode != 0
    assert "OPD_VLLM_KV_CACHE_GIB" in done.stderr + done.stdout
    assert "Auto set" not in done.stderr + done.stdout  # no engine got as far as sizing itself
