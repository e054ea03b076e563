"""`opd bench-spans` runs end to end on the tiny model (CI proves it works; no timing asserted):
it builds scripted followup and calculator episodes, starts its own `opd serve`, scores them with
score_spans and with one score_from tail, checks the rows agree, and reports what the spans
save."""

from __future__ import annotations

from opd.bench.spans import COLUMNS, BenchSpansConfig
from opd.client.cli import load_command
from opd.shared.config_cli import flags_of
from tests.support.cli import only_json, run_opd


def test_every_field_is_a_flag() -> None:
    command = load_command("bench-spans")
    flags = flags_of(BenchSpansConfig)
    assert {p.name for p in command.params} == {f.param for f in flags} | {"config"}


def test_opd_bench_spans_tiny_model(tiny_model_dir, tmp_path) -> None:
    out_dir = tmp_path / "results"
    args = [
        "bench-spans",
        "--model", str(tiny_model_dir),
        "--episodes", "3", "--turns", "3", "--repeats", "1",
        "--out-dir", str(out_dir),
    ]  # fmt: skip
    done = run_opd(args, timeout=300)
    assert "opd bench-spans" in done.stdout and "followup, 3 turns" in done.stdout

    path, report = only_json(out_dir, "bench-spans-*.json")
    cases = {(c["env"], c["turns"]): c for c in report["cases"]}
    assert set(cases) == {("followup", 3), ("calculator", 2)}
    for (env, turns), c in cases.items():
        spans, tail = c["spans"], c["tail"]
        assert c["episodes"] == 3 and c["assistant_turns"] == 3 * turns, env
        # context (user turns, tool results) lies between the turns: the tail scores it too
        assert 0 < spans["scored_positions"] < tail["scored_positions"], env
        assert spans["response_bytes"] < tail["response_bytes"], env
        assert spans["json_response_bytes"] < tail["json_response_bytes"], env
        assert spans["request_bytes"] < tail["request_bytes"], env  # fewer candidate rows
        assert spans["posts"] == tail["posts"] == 1, env
        assert spans["wall_ms"] > 0 and tail["wall_ms"] > 0, env
        ratio = c["ratio"]["scored_positions"]
        assert ratio == spans["scored_positions"] / tail["scored_positions"], env
        # the spans' rows are the tail's rows at the span positions
        check = c["check"]
        assert check["tolerance_used"] <= 1, (env, check)
        assert check["max_abs_diff_all"] <= report["config"]["atol"], (env, check)
        assert check["top_k_id_rows_unexplained"] == 0, (env, check)
    # a followup turn is a number and its end token; the questions between are longer
    assert cases[("followup", 3)]["ratio"]["scored_positions"] < 0.5

    md = (out_dir / path.name.replace(".json", ".md")).read_text()
    assert md.startswith("| " + " | ".join(COLUMNS) + " |")
    assert "| followup, 3 turns |" in md and "| calculator, 2 turns |" in md
