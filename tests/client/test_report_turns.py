"""`opd report` on multi-turn episodes: the "By turn" section (early/late profile over the
assistant turn, steps x turn heatmap, a per-turn table), the episode figure over steps, the
probe's "Teachers by turn" and its depth probe across turns (`by_turn`, no `by_prefix`).

Inputs are written by hand in the shapes opd writes them (`<key>@turn{j}` metrics, episode/*,
probe.json's depth_probe.by_turn); no model, no teacher. A run without episodes gets none of
it: its page and PNGs are those of the same run with the episode keys, less what they add."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from opd.client.report.build import build_report
from opd.client.report.html_parts import fmt
from opd.client.report.inputs import DEPTH, TURN, Series, load_inputs

STEPS = range(1, 11)  # default window 0.2: early = steps 1-2, late = steps 9-10
TURN_KEYS = ("overlap/ratio", "overlap/token_advantage", "kl/sampled", "entropy/gap")


def _base(s: int) -> dict:
    """A step without episodes: the main diagnostics, two depth buckets."""
    return {
        "step": s,
        "overlap/ratio": 0.5 + 0.02 * s,
        "overlap/token_advantage": -0.3 + 0.02 * s,
        "kl/sampled": 1.0 - 0.05 * s,
        "entropy/gap": 0.8 - 0.05 * s,
        "overlap/ratio@depth0-3": 0.6 + 0.01 * s,
        "overlap/ratio@depth4-7": 0.4 + 0.02 * s,
        "rollout/truncated_frac": 0.1,
    }


def _turn_value(key: str, s: int, j: int) -> float:
    return {
        "overlap/ratio": 0.6 + 0.03 * s - 0.1 * j,
        "overlap/token_advantage": -0.4 + 0.03 * s - 0.05 * j,
        "kl/sampled": 1.2 - 0.06 * s + 0.2 * j,
        "entropy/gap": 0.9 - 0.04 * s + 0.1 * j,
    }[key]


def _episodes(s: int) -> dict:
    """What episodes add: turns 0 and 1 every step, turn 2 on even steps only; episode/*."""
    out = {}
    for j in (0, 1, 2):
        if j == 2 and s % 2:
            continue
        out[f"tokens/count@turn{j}"] = 40.0 - 10 * j + s
        out.update({f"{k}@turn{j}": _turn_value(k, s, j) for k in TURN_KEYS})
    out.update(
        {
            "episode/turns_mean": 2.0 + 0.5 * (s % 2 == 0),
            "episode/turns_max": 3.0,
            "episode/tokens_mean": 90.0,
            "episode/truncated_frac": 0.3 - 0.02 * s,
            "episode/ended_max_turns_frac": 0.2 - 0.01 * s,
            "episode/ended_turn_tokens_frac": 0.1 - 0.01 * s,
            "episode/ended_episode_tokens_frac": 0.0,
            "episode/reward_mean": 0.2 + 0.05 * s,
        }
    )
    return out


def _write_run(run: Path, episodes: bool) -> None:
    run.mkdir()
    lines = [{**_base(s), **(_episodes(s) if episodes else {})} for s in STEPS]
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def _section(page: str, sid: str) -> str:
    start = page.index(f'<section id="{sid}">')
    return page[start : page.index("</section>", start) + len("</section>")]


def _rows(section: str) -> list[list[str]]:
    """The cells of the first table's body rows, as HTML."""
    body = section[section.index("<tbody>") : section.index("</tbody>")]
    return [re.findall(r"<td[^>]*>(.*?)</td>", tr) for tr in body.split("<tr>")[1:]]


def _window_means(j: int, key: str) -> tuple[float, float]:
    """The early and late window means of key@turn{j}, from the values written."""
    present = [s for s in STEPS if not (j == 2 and s % 2)]
    early = [_turn_value(key, s, j) for s in present if s in (1, 2)]
    late = [_turn_value(key, s, j) for s in present if s in (9, 10)]
    return float(np.mean(early)), float(np.mean(late))


def test_turn_labels_are_parsed_in_order_and_apart_from_depth():
    names = [
        "overlap/ratio@turn10",
        "overlap/ratio@turn2",
        "overlap/ratio@turnx",
        "overlap/ratio@depth0-3",
        "teacher/a/overlap/ratio@turn0",
        "kl/sampled@turn0",
    ]
    assert TURN.labels(names, "overlap/ratio") == [(2,), (10,)]
    assert DEPTH.labels(names, "overlap/ratio") == [(0, 3)]
    assert TURN.column("kl/sampled", (3,)) == "kl/sampled@turn3"
    series = Series.from_records([{"step": 1, "kl/sampled@turn1": 0.5, "kl/sampled@turn0": 0.7}])
    labels, m = series.matrix("kl/sampled", TURN)
    assert labels == [(0,), (1,)] and m.tolist() == [[0.7, 0.5]]


def test_by_turn_section_with_its_numbers_and_the_episode_figure(tmp_path):
    run = tmp_path / "run"
    _write_run(run, episodes=True)
    page = build_report(run).read_text()
    out = run / "report"

    assert {"turn_profile", "turn_heatmap", "episodes"} <= {p.stem for p in out.glob("*.png")}
    assert '<a href="#turn">By turn</a>' in page
    section = _section(page, "turn")
    assert 'id="fig-turn_profile"' in section and 'id="fig-turn_heatmap"' in section
    steps = _section(page, "steps")
    assert 'id="fig-episodes"' in steps  # episode/* over steps, with the other step figures
    assert "<code>episode/reward_mean</code>" in steps
    assert "<code>episode/truncated_frac</code>" in steps
    assert page.index('<section id="depth">') < page.index('<section id="turn">')

    rows = _rows(section)
    assert [r[0] for r in rows] == ["0", "1", "2"]
    for j, row in enumerate(rows):
        present = [s for s in STEPS if not (j == 2 and s % 2)]
        assert row[1] == fmt(float(np.mean([40.0 - 10 * j + s for s in present])))
        assert row[2] == str(len(present))
        for key, cell in zip(TURN_KEYS, row[3:], strict=True):
            first, last = _window_means(j, key)
            assert cell.startswith(f"{fmt(first)} &rarr; {fmt(last)} "), (j, key, cell)
            assert "&#10003;" in cell  # every metric moves toward the teacher here


def test_single_turn_episodes_get_the_section_but_no_turn_plots(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lines = [
        {**_base(s), "overlap/ratio@turn0": 0.5, "tokens/count@turn0": 30, "episode/turns_max": 1}
        for s in STEPS
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    page = build_report(run).read_text()
    stems = {p.stem for p in (run / "report").glob("*.png")}
    assert "episodes" in stems and not {"turn_profile", "turn_heatmap"} & stems
    section = _section(page, "turn")
    assert "one assistant turn" in section
    assert _rows(section)[0][:3] == ["0", "30", "10"]


def test_a_run_without_episodes_is_unchanged(tmp_path):
    """No turn section, figure or row; every PNG and the rest of the page as with episodes."""
    plain, episodes = tmp_path / "plain", tmp_path / "episodes"
    _write_run(plain, episodes=False)
    _write_run(episodes, episodes=True)
    page = build_report(plain).read_text()
    ep_page = build_report(episodes).read_text()

    plain_pngs = {p.name: p.read_bytes() for p in (plain / "report").glob("*.png")}
    ep_pngs = {p.name: p.read_bytes() for p in (episodes / "report").glob("*.png")}
    assert set(ep_pngs) - set(plain_pngs) == {
        "turn_profile.png",
        "turn_heatmap.png",
        "episodes.png",
    }
    # the figures both runs have: the same bytes
    assert all(ep_pngs[name] == data for name, data in plain_pngs.items())
    assert 'id="turn"' not in page and "@turn" not in page and "episode/" not in page

    def common(text: str, run: Path) -> str:
        text = re.sub(r"generated [^<]*\.<br>", "", text).replace(str(run), "RUN")
        text = text.replace('<a href="#turn">By turn</a>', "")
        text = re.sub(r'<section id="turn">.*?</section>', "", text)
        text = re.sub(r'<figure id="fig-episodes">.*?</figure>', "", text)
        text = re.sub(r"<tr><td>[^<]*<br><code>episode/[^<]*</code>.*?</tr>", "", text)
        return re.sub(r'data-images-total="\d+"', "", text)

    assert common(page, plain) == common(ep_page, episodes)


def _probe(run: Path) -> dict:
    """probe.json of an --env probe: per-turn metrics per teacher, the depth probe by turn."""
    teachers = []
    for rank, name in enumerate(("good-teacher", "far-teacher"), start=1):
        metrics = {"overlap/ratio": 0.8 / rank, "kl/sampled": 0.3 * rank}
        for j in range(3):
            metrics.update(
                {
                    f"overlap/ratio@turn{j}": 0.8 / rank - 0.1 * j,
                    f"kl/sampled@turn{j}": 0.3 * rank + 0.1 * j,
                    f"tokens/count@turn{j}": 100 - 20 * j,
                }
            )
        verdict = {"label": "ok", "compatible": rank == 1, "signal": True, "reasons": []}
        teachers.append({"name": name, "rank": rank, "metrics": metrics, "verdict": verdict})

    def row(j: int, s: float, t: float) -> dict:
        teacher = {"score": t, "ci": [t - 0.1, t + 0.1], "advantage": t - s,
                   "advantage_ci": [t - s - 0.05, t - s + 0.05]}  # fmt: skip
        return {"turn": j, "rollouts": 8 - j, "student": {"score": s, "ci": [s - 0.1, s + 0.1]},
                "teachers": {"good-teacher": teacher}}  # fmt: skip

    probe = {
        "version": 1,
        "student": "/models/student",
        "teachers": teachers,
        "depth_probe": {
            "samples": 2,
            "rollouts": 8,
            "turns": [0, 1, 2],
            "by_turn": [row(0, 0.25, 0.75), row(1, 0.5, 0.625), row(2, 0.5, 0.5)],
        },
    }
    (run / "probe.json").write_text(json.dumps(probe))
    return probe


def test_probe_with_turns_and_the_depth_probe_across_turns(tmp_path):
    probe = _probe(tmp_path)
    assert load_inputs(tmp_path).probe is not None
    page = build_report(tmp_path).read_text()
    stems = {p.stem for p in (tmp_path / "report").glob("*.png")}
    assert stems == {"probe_metrics", "probe_turn", "probe_depth_turns"}
    section = _section(page, "probe")
    assert "Teachers by turn" in section and "Teacher-continuation depth probe across turns" in (
        section
    )
    assert "prefix tokens" not in section and "from turn" in section
    table = section[section.index("Depth probe across turns") :]
    rows = _rows(table)
    assert len(rows) == 3
    for cells, r in zip(rows, probe["depth_probe"]["by_turn"], strict=True):
        t = r["teachers"]["good-teacher"]
        assert cells[:3] == [str(r["turn"]), "good-teacher", str(r["rollouts"])]
        s = r["student"]
        assert cells[3] == f"{fmt(s['score'])} [{fmt(s['ci'][0])}, {fmt(s['ci'][1])}]"
        assert cells[4] == f"{fmt(t['score'])} [{fmt(t['ci'][0])}, {fmt(t['ci'][1])}]"
        lo, hi = t["advantage_ci"]
        assert cells[5] == f"{fmt(t['advantage'])} [{fmt(lo)}, {fmt(hi)}]"
