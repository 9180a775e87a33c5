"""The claims table's tests on constructed numbers, the claims read from constructed run
outputs, and the report: self-contained HTML (parsed), Markdown with the same tables, and,
where Chromium is installed, a headless render in which every figure loads."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from emscope.errors import EmscopeError
from emscope.papers import PAPERS
from emscope.pipeline import claim_rules as rules
from emscope.pipeline import claims as c
from emscope.report import write_report
from emscope.report.sections import build_sections

# ---------------------------------------------------------------------------- pure tests


def test_ci_above_needs_non_overlapping_intervals() -> None:
    assert rules.ci_above((0.3, 0.5), (0.1, 0.29))
    assert not rules.ci_above((0.3, 0.5), (0.1, 0.3))  # touching: overlap
    assert not rules.ci_above((0.3, 0.5), (0.1, 0.4))  # overlapping
    assert not rules.ci_above((0.1, 0.2), (0.3, 0.5))  # below


def test_holds_narrow_em() -> None:
    org, instruct = (0.2, (0.15, 0.25)), (0.01, (0.0, 0.03))
    controls = [(0.02, (0.0, 0.05)), (0.03, (0.01, 0.06))]
    assert rules.holds_narrow_em(org, instruct, controls, 0.95)
    assert not rules.holds_narrow_em(org, instruct, controls, 0.89)  # coherence too low
    assert not rules.holds_narrow_em(org, instruct, [(0.1, (0.05, 0.16))], 0.95)  # CI overlap
    assert not rules.holds_narrow_em(org, (0.1, (0.05, 0.15)), [], 0.95)  # touching instruct


def test_holds_transfer() -> None:
    assert rules.holds_transfer([0.9, 0.78], [0.05, -0.1])
    assert rules.holds_transfer([0.5], [0.15])  # both bounds inclusive
    assert not rules.holds_transfer([0.9, 0.49], [0.0])
    assert not rules.holds_transfer([0.9], [-0.16])
    assert not rules.holds_transfer([], [])


def test_holds_steering() -> None:
    assert rules.holds_steering((0.4, (0.3, 0.5)), (0.01, (0.0, 0.02)))
    assert not rules.holds_steering((0.4, (0.3, 0.5)), (0.2, (0.1, 0.3)))


def test_holds_convergence_most_layers() -> None:
    assert rules.holds_convergence([[0.9, 0.6, 0.4]])  # 2 of 3
    assert not rules.holds_convergence([[0.9, 0.4, 0.4]])
    assert not rules.holds_convergence([[0.9, 0.9, 0.4, 0.4]])  # half is not most
    assert not rules.holds_convergence([[0.9, 0.9], [0.1, 0.1]])  # every pair must converge
    assert not rules.holds_convergence([])


def test_holds_b_vector_subspace_controls_base() -> None:
    assert rules.holds_b_vector([0.04, -0.29])
    assert not rules.holds_b_vector([0.04, -0.3])
    assert not rules.holds_b_vector([])
    assert rules.holds_subspace([(20.0, 80.0), (50.0, 79.0)])
    assert not rules.holds_subspace([(20.0, 80.0), (80.0, 79.0)])
    assert rules.holds_above_controls([0.25, 0.35], [0.01, 0.02])
    assert not rules.holds_above_controls([0.25, 0.01], [0.02])
    assert not rules.holds_above_controls([0.3], [])
    assert rules.holds_base_orthogonal([1e-3, -0.049])
    assert not rules.holds_base_orthogonal([1e-3, 0.05])


def test_holds_interpolation_and_drift() -> None:
    instruct = (0.01, (0.0, 0.02))
    interior = [(0.2, (0.15, 0.25)), (0.16, (0.1, 0.2))]
    assert rules.holds_interpolation(interior, instruct, [0.95, 0.9, 0.8])
    assert not rules.holds_interpolation(interior, instruct, [0.95, 0.79])
    assert not rules.holds_interpolation([*interior, (0.03, (0.01, 0.05))], instruct, [0.9])
    assert not rules.holds_interpolation([], instruct, [0.9])
    assert rules.holds_drift([0.01, 0.3])
    assert not rules.holds_drift([-0.01, 0.3])


def test_rank1_split() -> None:
    result = {
        "tests": {
            "nonmedical_aligned_vs_misaligned": {"coefficients": {"L1": [0.5, 0.7], "L2": [0.0]}},
            "misaligned_nonmedical_vs_medical": {"coefficients": {"L1": [0.1], "L2": [-0.4]}},
        }
    }
    assert c.rank1_split(result) == {"general": ["L1"], "medical": ["L2"]}
    assert c.rank1_split({"tests": {}}) == {}


# ---------------------------------------------------------------------------- a constructed run


def _png(path: Path) -> None:
    from emscope.plotting import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [0, 1])
    save_figure(fig, path)


def _write(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")


def _rate(v: float, lo: float, hi: float, coherent: float = 0.95) -> dict[str, Any]:
    return {
        "em_rate": v,
        "em_ci": [lo, hi],
        "coherent_rate": coherent,
        "coherent_ci": [coherent - 0.02, min(coherent + 0.02, 1.0)],
        "unscored_rate": 0.0,
        "n": 400,
    }


@pytest.fixture()
def run_dir(tmp_path: Path) -> Path:
    """A run dir with constructed outputs of every stage the claims read."""
    run = tmp_path / "run"
    config = {
        "name": "constructed",
        "chat_model": "instruct",
        "adapters": {
            "em1": {"role": "em"},
            "em2": {"role": "em"},
            "ctl": {"role": "control"},
        },
    }
    _write(run / "config.json", config)
    _write(run / "manifest.json", {"config_file": "x.yaml", "stages": {}, "versions": {}})
    for stage in ("eval", "geometry", "lmc", "directions", "steering", "transfer", "reemergent"):
        _write(run / stage / "done.json", {"wall_s": 1.0})
    organisms = {
        "instruct": _rate(0.01, 0.0, 0.02),
        "em1": _rate(0.3, 0.25, 0.35),
        "em2": _rate(0.2, 0.15, 0.25),
        "ctl": _rate(0.01, 0.0, 0.03),
    }
    _write(run / "eval" / "summary.json", {"questions": "general", "organisms": organisms})
    _png(run / "eval" / "em_rates.png")
    pair = {"cosine": 0.3, "overlap": 0.7, "mean_angle_deg": 20.0, "random_angle_p5": 80.0}
    ctl = {"cosine": 0.01, "overlap": 0.005, "mean_angle_deg": 85.0, "random_angle_p5": 80.0}
    _write(
        run / "geometry" / "summary.json",
        {
            "pairs": {
                "em1|em2": {"a": "em1", "b": "em2", "roles": ["em", "em"], **pair},
                "em1|ctl": {"a": "em1", "b": "ctl", "roles": ["em", "control"], **ctl},
                "em2|ctl": {"a": "em2", "b": "ctl", "roles": ["em", "control"], **ctl},
            },
            "base_cosine": {"em1": 1e-3, "em2": -2e-3, "ctl": 0.2},
        },
    )
    _png(run / "geometry" / "geometry_cosine.png")
    rows = [{"t": t, **_rate(0.2, 0.15, 0.25, 0.9), "loss": None} for t in (0.0, 0.5, 1.0)]
    _write(
        run / "lmc" / "summary.json",
        {"paths": {"em1__em2": {"from": "em1", "to": "em2", "rows": rows, "barrier": None}}},
    )
    _write(
        run / "directions" / "summary.json",
        {
            "sources": ["em1", "em2"],
            "norms": {"em1": {"0": 1.0, "1": 2.0, "2": 3.0}, "em2": {"0": 1.5, "1": 2.5, "2": 3.5}},
            "pairs": [{"a": "em1", "b": "em2", "cosine": {"0": 0.9, "1": 0.8, "2": 0.3}}],
            "pairs_skipped": None,
            "adapter_b_cosines": {"r1 vs em1": [{"module": "m", "layer": 1, "cosine": 0.04}]},
        },
    )
    steer_rows = [
        {"layer": 1, "scale": 4.0, "vector": "direction", **_rate(0.3, 0.2, 0.4)},
        {"layer": 1, "scale": 4.0, "vector": "random", **_rate(0.01, 0.0, 0.02)},
        {"layer": 2, "scale": 4.0, "vector": "direction", **_rate(0.1, 0.05, 0.15)},
        {"layer": 2, "scale": 4.0, "vector": "random", **_rate(0.3, 0.2, 0.4)},
    ]
    _write(run / "steering" / "summary.json", {"rows": steer_rows, "baseline": {}})
    _write(
        run / "transfer" / "stage.json",
        {
            "direction": "em1",
            "targets": {
                "em2": {
                    "relative_reduction": 0.8,
                    "relative_reduction_ci": [0.7, 0.9],
                    "random_relative_change": 0.05,
                }
            },
        },
    )
    _write(
        run / "reemergent" / "projection.json",
        {
            "layers": [0, 1, 2],
            "base": "base",
            "instruct": "instruct",
            "relative_to_base_instruct": {
                "em1": {
                    "position": [0.9, 0.6, 0.4],
                    "first_third_mean": 0.9,
                    "last_third_mean": 0.4,
                    "drift_towards_base": 0.5,
                    "drift_ci95": [0.3, 0.7],
                    "drifts_towards_base": True,
                }
            },
        },
    )
    return run


def test_claims_from_a_constructed_run(run_dir: Path) -> None:
    rows = {r.key: r for r in c.claims_table(run_dir)}
    assert list(rows) == [claim.key for claim in c.CLAIMS]
    expected = {
        "narrow_em": "yes",
        "transfer": "yes",
        "steering": "yes",  # best setting is layer 1 (its random control: 0-2%)
        "convergence": "yes",
        "b_vector": "yes",
        "subspace": "yes",
        "cosine": "yes",
        "overlap": "yes",
        "base_orthogonal": "yes",  # controls are not tested
        "interpolation": "yes",
        "drift": "yes",
        "rank1_split": c.NOT_RUN,
        "early_warning": c.NOT_RUN,  # the constructed run has no early_warning stage
        "screening": c.NOT_RUN,
        "defence_kl_interleave": c.NOT_RUN,  # nor a defences stage
        "defence_inconsistent": c.NOT_RUN,
        "defence_pplgap_best": c.NOT_RUN,
        "defence_steer": c.NOT_RUN,
        "defence_inoculation": c.NOT_RUN,
        "defence_inoculation_specific": c.NOT_RUN,
    }
    assert {k: r.holds for k, r in rows.items()} == expected
    assert "em1: 30.0% [25.0, 35.0]" in rows["narrow_em"].measured
    assert rows["narrow_em"].paper.startswith("11.3% EM")
    # each published value names its paper
    assert rows["narrow_em"].source == "arXiv 2506.11618"
    assert rows["subspace"].source == "arXiv 2511.02022"
    assert rows["drift"].source == "arXiv 2507.03662"


def _methods_sections() -> set[str]:
    text = (Path(__file__).resolve().parent.parent / "docs" / "methods.md").read_text()
    return set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.?\s", text, re.MULTILINE))


def test_sections_cite_papers_by_title_and_arxiv_and_the_methods_doc(run_dir: Path) -> None:
    """Every report section with a source line names each paper by its title and arXiv id and
    the docs/methods.md section that defines what it shows (a section that exists); the claims
    table's published values name their paper's arXiv id."""
    existing = _methods_sections()
    titles = {p.arxiv: p.title for p in PAPERS}
    sections = build_sections(run_dir)
    cited = [s for s in sections if s.paper]
    assert {s.key for s in cited} >= {
        "claims", "eval", "geometry", "lmc", "directions", "steering", "ablation", "probes",
        "dynamics", "reemergent", "thresholds",
    }  # fmt: skip
    for s in cited:
        ids = re.findall(r"arXiv (\d{4}\.\d{5})", s.paper)
        assert ids, f"{s.key}: {s.paper!r} cites no arXiv id"
        for arxiv in ids:
            assert f'"{titles[arxiv]}" (arXiv {arxiv})' in s.paper, s.key
        numbers = re.findall(r"docs/methods\.md section (\d+(?:\.\d+)?)", s.paper)
        assert numbers and set(numbers) <= existing, f"{s.key}: {s.paper!r}"
    claims = sections[0]
    assert claims.key == "claims" and claims.title == "Headline claims (docs/methods.md section 8)"
    cells = [row[1] for row in claims.tables[0].rows]
    assert len(cells) == len(c.CLAIMS)
    for cell in cells:
        arxiv = re.fullmatch(r".+ \(arXiv (\d{4}\.\d{5})\)", cell)
        assert arxiv is not None and arxiv.group(1) in claims.paper, cell
    _, md_path = write_report(run_dir)
    md = md_path.read_text()
    assert "## Headline claims (docs/methods.md section 8)" in md
    assert "11.3% EM (9 x rank-1, Qwen2.5-14B), &gt; 99% coherent (arXiv 2506.11618)" in md
    assert '"Shared Parameter Subspaces and Cross-Task Linearity in Emergently Misaligned ' in md


def test_claims_fail_when_the_numbers_say_so(run_dir: Path) -> None:
    geometry = json.loads((run_dir / "geometry" / "summary.json").read_text())
    geometry["pairs"]["em1|ctl"]["cosine"] = 0.5
    _write(run_dir / "geometry" / "summary.json", geometry)
    evals = json.loads((run_dir / "eval" / "summary.json").read_text())
    evals["organisms"]["ctl"] = _rate(0.26, 0.2, 0.3)  # overlaps em1's CI
    _write(run_dir / "eval" / "summary.json", evals)
    rows = {r.key: r for r in c.claims_table(run_dir)}
    assert rows["cosine"].holds == "no"
    assert rows["overlap"].holds == "yes"
    assert rows["narrow_em"].holds == "no"


def test_choose_steering_rule() -> None:
    """The steering setting of each build: the best EM among settings coherent enough (the
    random rows never compete), ties to the smaller scale then the earlier layer; none
    eligible, no choice."""
    from emscope.directions.selection import choose_steering

    rows = [
        {"layer": 2, "scale": 3.0, "vector": "direction", "em_rate": 0.5, "coherent_rate": 0.6},
        {"layer": 3, "scale": 2.0, "vector": "direction", "em_rate": 0.2, "coherent_rate": 0.85},
        {"layer": 1, "scale": 2.0, "vector": "direction", "em_rate": 0.2, "coherent_rate": 0.9},
        {"layer": 4, "scale": 1.5, "vector": "direction", "em_rate": 0.2, "coherent_rate": 0.8},
        {"layer": 4, "scale": 1.5, "vector": "random", "em_rate": 0.9, "coherent_rate": 0.9},
        {"layer": 5, "scale": 1.0, "vector": "direction", "em_rate": None, "coherent_rate": 0.9},
    ]
    assert choose_steering(rows, 0.8) == rows[3]  # three tie at 0.2: the smallest scale
    assert choose_steering(rows[:3], 0.8) == rows[2]  # same scale: the earlier layer
    assert choose_steering(rows, 0.5) == rows[0]
    assert choose_steering(rows, 0.95) is None


def test_claims_section_says_one_build_is_an_example(run_dir: Path) -> None:
    assert "ONE build" not in build_sections(run_dir)[0].text  # no organism in this config
    config = json.loads((run_dir / "config.json").read_text())
    _write(run_dir / "config.json", {**config, "organism": {"dir": "runs/toy", "seed": 3}})
    text = build_sections(run_dir)[0].text
    assert "ONE build of the synthetic organism (seed 3, runs/toy)" in text
    assert "--organism-seeds" in text


def test_steering_claim_names_the_setting_the_rule_chose(run_dir: Path) -> None:
    summary = json.loads((run_dir / "steering" / "summary.json").read_text())
    selection = {
        "rule": "best EM with coherent >= 0.8 ...",
        "min_coherent": 0.8,
        "n": 10,
        "seed": 1,
        "baseline": {},
        "rows": [
            {"layer": 1, "scale": 4.0, "em_rate": 0.3, "coherent_rate": 0.9},
            {"layer": 2, "scale": 4.0, "em_rate": 0.1, "coherent_rate": 0.9},
        ],
        "chosen": {"layer": 1, "scale": 4.0, "em_rate": 0.3, "coherent_rate": 0.9},
    }
    summary["rows"] = summary["rows"][:2]  # the confirmation: the chosen setting alone
    _write(run_dir / "steering" / "summary.json", {**summary, "selection": selection})
    row = {r.key: r for r in c.claims_table(run_dir)}["steering"]
    assert row.holds == "yes"
    assert "layer 1 x4, coherent 95%, the setting the rule chose on this build" in row.measured
    assert "over 2 settings at 10/question, seed 1" in row.measured
    section = next(s for s in build_sections(run_dir) if s.key == "steering")
    assert "Setting chosen by the rule on this build: layer 1 x4." in section.text
    assert section.tables[1].rows[0] == ("1", "4", "0.300", "0.900")
    # nothing coherent enough: the claim fails, saying why
    none = {**selection, "chosen": None}
    _write(run_dir / "steering" / "summary.json", {"rows": [], "baseline": {}, "selection": none})
    row = {r.key: r for r in c.claims_table(run_dir)}["steering"]
    assert row.holds == "no" and "kept coherent >= 80%" in row.measured


def test_claims_without_stages_read_not_run(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _write(run / "config.json", {"name": "empty", "chat_model": "instruct", "adapters": {}})
    rows = c.claims_table(run)
    assert all(r.holds == c.NOT_RUN for r in rows)


# ---------------------------------------------------------------------------- the report


class _Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[tuple[str, str, str]] = []
        self.tags: list[str] = []
        self.ids: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        for name, value in attrs:
            if name in ("src", "href", "srcset", "data", "action", "poster"):
                self.refs.append((tag, name, value or ""))
            if name == "id" and value:
                self.ids.add(value)


def assert_self_contained(text: str) -> None:
    """Every src/href is a data: URI or an in-page anchor; no script, link, or CSS url()."""
    parser = _Refs()
    parser.feed(text)
    assert parser.refs, "no reference at all: nothing was checked"
    for tag, name, value in parser.refs:
        if value.startswith("#"):
            assert value[1:] in parser.ids, f"dangling anchor {value}"
        else:
            assert value.startswith("data:"), f"<{tag} {name}={value[:60]!r}> loads a file"
    assert "script" not in parser.tags and "link" not in parser.tags and "iframe" not in parser.tags
    assert "url(" not in text and "@import" not in text


def test_report_html_is_self_contained_and_md_has_the_tables(run_dir: Path) -> None:
    html_path, md_path = write_report(run_dir)
    text = html_path.read_text()
    assert_self_contained(text)
    assert text.count("<img ") == 2  # the two constructed figures
    assert "Stage `probes` not run." in text.replace("&#x60;", "`")
    md = md_path.read_text()
    assert "| claim | paper's value | measured here | holds? | test |" in md
    claim_lines = [line for line in md.splitlines() if line.startswith("| ") and "| yes |" in line]
    assert len(claim_lines) >= 11
    assert "![EM and coherent rates](eval/em_rates.png)" in md
    claims = json.loads((run_dir / "claims.json").read_text())
    assert len(claims) == len(c.CLAIMS)


def test_report_escapes_text(run_dir: Path) -> None:
    config = json.loads((run_dir / "config.json").read_text())
    config["name"] = "<script>alert(1)</script>"
    _write(run_dir / "config.json", config)
    evals = json.loads((run_dir / "eval" / "summary.json").read_text())
    evals["organisms"]["<img src=x onerror=alert(2)>"] = _rate(0.1, 0.05, 0.15)
    _write(run_dir / "eval" / "summary.json", evals)
    html_path, md_path = write_report(run_dir)
    for text in (html_path.read_text(), md_path.read_text()):  # Markdown renders raw HTML
        assert "<script>" not in text and "&lt;script&gt;" in text
        assert "<img src=x" not in text and "&lt;img src=x onerror=alert(2)&gt;" in text


def test_report_refuses_a_dir_that_is_not_a_run(tmp_path: Path) -> None:
    with pytest.raises(EmscopeError, match="not a run dir"):
        write_report(tmp_path)
    from typer.testing import CliRunner

    from emscope.cli.main import app

    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "not a run dir" in result.output


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_report_renders_headless_with_every_figure_loaded(run_dir: Path, tmp_path: Path) -> None:
    html_path, _ = write_report(run_dir)
    probe = (
        "<script>window.addEventListener('load', () => {"
        "const imgs = Array.from(document.images);"
        "const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;"
        "document.body.setAttribute('data-figures', imgs.length + '/' + ok);});</script>"
    )
    page = tmp_path / "probe.html"
    page.write_text(html_path.read_text().replace("</body>", probe + "</body>"))
    assert CHROMIUM is not None
    result = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--virtual-time-budget=5000",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert 'data-figures="2/2"' in result.stdout
