"""The report of a multi-teacher run: one panel set and one set of checks per teacher, and the
teacher whose pair fails flagged (client/report/teacher_view.py), from a metrics.jsonl whose
per-teacher curves are known: `math` converges, `code` stays flat and incompatible."""

from __future__ import annotations

import json

from opd.client.report.build import build_report
from opd.client.report.health import health_checks
from opd.client.report.inputs import load_inputs
from opd.client.report.teacher_view import PAIR_CHECKS, pair_fails, teacher_series


def _record(step: int) -> dict:
    t = step / 20
    record = {"step": step, "overlap/ratio": 0.5 + 0.1 * t, "kl/sampled": 2.0 - t}
    for name, overlap, advantage, gap, share in (
        ("math", 0.55 + 0.3 * t, -0.2 + 0.18 * t, 1.0 - 0.8 * t, 0.6),
        ("code", 0.10, -0.3, 1.5 + 0.2 * t, 0.4),
    ):
        record.update(
            {
                f"teacher/{name}/overlap/ratio": overlap,
                f"teacher/{name}/overlap/token_advantage": advantage,
                f"teacher/{name}/entropy/gap": gap,
                f"teacher/{name}/kl/sampled": 3.0 - t,
                f"teacher/{name}/token_share": share,
            }
        )
    return record


def test_the_failing_pair_is_flagged_and_each_teacher_gets_its_panels(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(_record(s)) + "\n" for s in range(1, 21)))
    series = load_inputs(run).metrics
    assert series is not None
    # every failure-signature check named here is one the health checks really run
    assert set(PAIR_CHECKS) <= {c.name for c in health_checks(series)}
    assert pair_fails(health_checks(teacher_series(series, "math"))) == []
    failing = {c.name for c in pair_fails(health_checks(teacher_series(series, "code")))}
    assert {"overlap ratio rises", "entropy gap closes"} <= failing

    page = build_report(run).read_text()
    section = page[page.index('<section id="teachers">') :]
    section = section[: section.index("</section>")]
    assert "<td>math</td><td class='num'>60%</td>" in section
    assert "<td>code</td><td class='num'>40%</td>" in section
    assert section.count(">pair fails<") == 1 and section.count(">pair ok<") == 1
    assert "<b>code</b>: overlap ratio rises" in section
    assert "Teacher math" in section and "Teacher code" in section  # one figure each
    assert (run / "report" / "teacher_0.png").is_file()
    assert (run / "report" / "teacher_1.png").is_file()
