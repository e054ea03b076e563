"""`opd bench-xtok` runs end to end on tiny models (CI proves it works; no timing asserted): the
same rollouts are scored natively, through the cross-tokenizer path on the same teacher, and on
a teacher of another tokenizer (GPT-2's), and the table reports every path."""

from __future__ import annotations

from opd.bench.cross_tokenizer import BenchXtokConfig
from opd.client.cli import load_command
from opd.shared.config_cli import flags_of
from tests.support.cli import only_json, run_opd


def test_every_field_is_a_flag() -> None:
    command = load_command("bench-xtok")
    flags = flags_of(BenchXtokConfig)
    assert {p.name for p in command.params} == {f.param for f in flags} | {"config"}


def test_opd_bench_xtok_tiny_models(tiny_server, gpt2_server, tiny_student_dir, tmp_path) -> None:
    out_dir = tmp_path / "results"
    args = [
        "bench-xtok",
        "--student", str(tiny_student_dir),
        "--teacher-url", tiny_server,
        "--cross-teacher-url", gpt2_server,
        "--prompts-per-step", "3", "--max-new-tokens", "12", "--steps", "2",
        "--out-dir", str(out_dir),
    ]  # fmt: skip
    done = run_opd(args, timeout=300)
    assert "opd bench-xtok" in done.stdout and "cross, same teacher" in done.stdout
    _, report = only_json(out_dir, "bench-xtok-*.json")
    paths = report["paths"]
    assert (
        set(paths) == {"native", "cross, same teacher", "cross, gpt2-teacher0"} or len(paths) == 3
    )
    native, forced = paths["native"], paths["cross, same teacher"]
    assert native["align_s"] == 0 and forced["align_s"] > 0
    assert native["time_ratio"] == 1.0 and native["bytes_ratio"] == 1.0
    # the same teacher, the same rollouts: the positions and numbers agree where chunks are
    # single tokens, which is nearly everywhere
    assert forced["student_positions"] == native["student_positions"]
    assert forced["one_to_one"] > 0.5
    assert report["max_abs_diff_own_ids"] <= 1e-3
    assert 0 <= forced["whole_rollouts_one_to_one"] <= 1
    other = next(m for name, m in paths.items() if name.startswith("cross, gpt2"))
    assert 0 < other["one_to_one"] < 1 and other["align_s"] > 0
    assert len(report["steps"]["native"]) == 2
