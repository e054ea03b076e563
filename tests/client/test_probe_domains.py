"""`opd probe --domain-field`: teachers ranked per domain and a suggested routing, on real
teacher processes (the tiny model, and a twin serving the student's own weights)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from opd.client.cli import app
from opd.client.configs.groups import HorizonKnobs
from opd.client.recipes.probe import recommend_horizon
from opd.client.recipes.probe_domains import prompt_domains, suggest_routing
from opd.client.teacher.launch import LocalTeacher
from opd.client.train.diagnostics import compute_diagnostics
from opd.client.train.positions import PositionStats
from opd.client.train.prompts import load_rows, shipped_prompts_path
from opd.client.train.rollout_store import read_rollouts


def test_a_prompt_without_a_domain_is_an_error_naming_it() -> None:
    with pytest.raises(ValueError, match="row 1 has no domain field 'domain'"):
        prompt_domains([{"domain": "math"}, {"prompt": "x"}], "domain", "f.jsonl")


def test_unfit_domains_are_reported_not_routed_silently() -> None:
    domains = {
        "math": {"ranking": [{"name": "a", "verdict": {"class": "good", "label": "ok"}}]},
        "chat": {"ranking": [{"name": "b", "verdict": {"class": "no-signal", "label": "twin"}}]},
    }
    routing = suggest_routing(domains, "domain")
    assert routing["routes"] == {"math": "a", "chat": "b"}
    assert routing["flags"] == ["--teacher-field domain", "--route math=a", "--route chat=b"]
    assert routing["unfit"] == {"chat": "best teacher b: twin"}


def test_probe_ranks_teachers_per_domain_and_suggests_a_routing(
    tiny_server, tiny_student_dir, tmp_path
):
    rows, _ = load_rows(str(shipped_prompts_path()))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({**row, "domain": "math" if i % 2 else "code"}) + "\n"
            for i, row in enumerate(rows)
        )
    )
    out = tmp_path / "probe"
    with LocalTeacher(str(tiny_student_dir), log_path=tmp_path / "twin.log") as twin_url:
        args = [
            "probe",
            "--student", str(tiny_student_dir),
            "--teacher", f"twin={twin_url}",
            "--teacher", f"tiny={tiny_server}",
            "--prompts", str(prompts),
            "--domain-field", "domain",
            "--num-prompts", "8",
            "--max-new-tokens", "8",
            "--depth-bucket", "4",
            "--horizon-bucket", "2",
            "--horizon-min-tokens", "4",
            "--save-rollouts",
            "--out-dir", str(out),
        ]  # fmt: skip
        result = CliRunner().invoke(app, args, env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert "by domain (domain)" in result.output
    assert "suggested routing for opd train: --teacher-field domain" in result.output
    report = json.loads((out / "probe.json").read_text())
    domains = report["domains"]
    assert set(domains) <= {"math", "code"} and domains
    assert sum(d["rollouts"] for d in domains.values()) == 8
    # the first teacher's saved rollouts give each domain's numbers independently
    saved = [s.rollout for s in read_rollouts(out)]
    domain_of = [json.loads(line)["domain"] for line in prompts.read_text().splitlines()]
    for domain, entry in domains.items():
        assert [t["name"] for t in entry["ranking"]] == ["tiny", "twin"]
        twin = next(t for t in entry["ranking"] if t["name"] == "twin")
        assert twin["verdict"]["class"] == "no-signal"  # the student's own weights
        mine = [r for r in saved if domain_of[r.prompt_index] == domain]
        expected = compute_diagnostics(PositionStats.from_rollouts(mine), depth_bucket=4)
        for key, value in expected.items():
            np.testing.assert_allclose(twin["metrics"][key], value, rtol=1e-9, err_msg=key)
        assert report["suggested_routing"]["routes"][domain] == "tiny"
    # the recommended horizon: per teacher in probe.json, the adaptive rule on the same saved
    # rollouts with the same knobs; the twin's overlap never fades; printed with its reason
    horizons = {t["name"]: t["horizon"] for t in report["teachers"]}
    knobs = HorizonKnobs(bucket=2, min_tokens=4)
    assert horizons["twin"] == recommend_horizon(PositionStats.from_rollouts(saved), knobs)
    assert horizons["twin"]["status"] == "none" and horizons["twin"]["recommended"] is None
    for h in horizons.values():
        assert h["bucket"] == 2 and h["overlap_by_bucket"]
        assert h["recommended"] == (None if h["tokens"] is None else f"fixed:{h['tokens']}")
        assert f"horizon: {h['display']}: {h['reason']}" in " ".join(result.output.split())
