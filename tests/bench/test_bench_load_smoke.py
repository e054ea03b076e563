"""`opd bench-load` runs end to end on the tiny model (CI proves it works; no timing asserted):
it starts its own `opd serve`, measures capacity, offers 2x that in an open loop, and reports
every field, with no request lost and only 200 or 429 answers."""

from __future__ import annotations

from opd.bench.load import BenchLoadConfig
from opd.client.cli import load_command
from opd.shared.config_cli import flags_of
from tests.support.cli import only_json, run_opd

PHASE_FIELDS = {
    "sent",
    "ok",
    "refused_429",
    "share_429",
    "statuses",
    "expired_408",
    "other_4xx",
    "lost",
    "lost_by_kind",
    "wall_s",
    "achieved_rps",
    "scored_tokens_per_s",
    "p50_ms",
    "p99_ms",
    "p50_429_ms",
    "p99_429_ms",
    "retry_after_median_s",
    "peak_rss_bytes",
    "peak_queue_tokens",
    "peak_in_flight",
    "server_counted",
}
LOAD_FIELDS = PHASE_FIELDS | {
    "factor",
    "offered_rps",
    "offered_scored_tokens_per_s",
    "arrivals",
    "not_sent",
    "max_client_in_flight",
    "max_sender_lag_ms",
}


def test_every_field_is_a_flag() -> None:
    command = load_command("bench-load")
    flags = flags_of(BenchLoadConfig)
    assert {p.name for p in command.params} == {f.param for f in flags} | {"config"}
    assert "api_key" not in {p.name for p in command.params}  # secrets stay off the command line


def test_opd_bench_load_tiny_model(tiny_model_dir, tmp_path) -> None:
    out_dir = tmp_path / "results"
    args = [
        "bench-load",
        "--model", str(tiny_model_dir),
        "--capacity-seconds", "2", "--capacity-clients", "2",
        "--seconds", "3", "--factors", "2", "--clients", "16",
        "--max-tokens", "256", "--max-sequences", "4", "--pool-size", "16",
        "--server-env", "OPD_MAX_WAIT_MS=5", "--server-env", "OPD_WARMUP=false",
        "--out-dir", str(out_dir),
    ]  # fmt: skip
    done = run_opd(args, timeout=180)
    assert "opd bench-load" in done.stdout and "capacity" in done.stdout

    path, report = only_json(out_dir, "bench-load-*.json")
    assert report["server"]["own"] and report["server"]["pid"] > 0
    assert report["mix"]["requests_in_pool"] == 16

    cap = report["capacity"]
    assert set(cap) >= PHASE_FIELDS
    assert cap["ok"] > 0 and cap["achieved_rps"] > 0 and cap["lost"] == 0
    assert cap["capacity_rps"] > 0 and cap["capacity_scored_tokens_per_s"] > 0
    assert isinstance(report["warnings"], list)

    (phase,) = report["phases"]
    assert set(phase) >= LOAD_FIELDS, LOAD_FIELDS - set(phase)
    assert phase["factor"] == 2
    assert phase["offered_rps"] > 0 and phase["arrivals"] > 0
    assert phase["lost"] == 0, phase["lost_examples"]
    assert set(phase["statuses"]) <= {"200", "429"}
    assert phase["sent"] == phase["ok"] + phase["refused_429"]
    assert phase["sent"] + phase["not_sent"] == phase["arrivals"]
    assert phase["ok"] > 0 and phase["p99_ms"] >= phase["p50_ms"] > 0
    assert phase["peak_rss_bytes"] > 50e6  # a loaded model, not an empty process
    # the server's own count of what it answered matches what the clients saw
    assert phase["server_counted"].get("status_200", 0) == phase["ok"]

    md = (out_dir / path.name.replace(".json", ".md")).read_text()
    assert "| phase |" in md and "| 2x |" in md and "capacity (closed, c2)" in md
