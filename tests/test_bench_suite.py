"""The merge-quality benchmark's smallest mode runs end to end and writes what it promises.

``python -m benchmarks.suite --smoke`` builds every task, trains the zoo,
pushes both to a local Hub and runs tables A–D through hfmerge's public API.
At this size the numbers mean nothing, so this checks the files and the shape
of the claim lines, not the claims' outcome (that is RESULTS.md's job).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.suite.report import Cell, at_least, greater, line_plot_svg, parse_claims

ROOT = Path(__file__).resolve().parent.parent
PLOTS = ("table_a_tasks.svg", "table_a_m.svg", "table_b_checkpoints.svg", "table_c_finetune.svg")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("bench-out")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE"))}
    completed = subprocess.run([sys.executable, "-m", "benchmarks.suite", "--smoke", "--out", str(out),
                                "--cache", str(out / "cache")], cwd=ROOT, env=env, capture_output=True, text=True,
                               timeout=600)
    return completed, out


def test_the_smoke_mode_writes_results_with_every_table_plot_and_claim(smoke_run):
    completed, out = smoke_run
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    text = (out / "RESULTS.md").read_text()
    for key in "ABCD":
        assert f"## Table {key} " in text
    assert "did not finish" not in text and "Smoke setting" in text
    for name in PLOTS:
        svg = (out / name).read_text()
        assert svg.startswith("<svg") and "<polyline" in svg, name
        assert f"]({name})" in text
    claims = parse_claims(text)
    kinds = {claim for _, claim in claims}
    assert any("gating + RegMean (m = 3) ≥ RegMean" in c for c in kinds)
    assert any("layer-wise" in c.lower() for c in kinds)
    assert any("CLAFusion" in c for c in kinds)
    assert any("OTFusion" in c for c in kinds)
    assert any("fusion + fine-tuning" in c for c in kinds)
    assert all(verdict in ("PASS", "FAIL") for verdict, _ in claims)
    summary = next(line for line in text.splitlines() if line.endswith("hold in this run."))
    held, total = summary.split(" of ")[0], summary.split(" of ")[1].split()[0]
    assert int(total) == len(claims) // 2 and int(held) == sum(v == "PASS" for v, _ in claims) // 2


def test_built_datasets_and_models_are_kept_in_the_cache_and_no_partial_build_is_left(smoke_run):
    _, out = smoke_run
    built = sorted(p.name for p in (out / "cache").iterdir() if p.is_dir())
    assert any(name.startswith("data-") for name in built) and any(name.startswith("model-") for name in built)
    assert not [p for p in (out / "cache").iterdir() if p.name.endswith(".partial") or p.name.startswith(".run-")]


def test_claims_compare_means_and_call_a_difference_within_the_spread_a_tie():
    assert at_least("x", Cell(0.80, 0.01, 3), Cell(0.79, 0.01, 3), ("a", "b")).passed
    tie = at_least("x", Cell(0.78, 0.02, 3), Cell(0.79, 0.005, 3), ("a", "b"))
    assert tie.passed and "a tie" in tie.detail
    assert not at_least("x", Cell(0.70, 0.01, 3), Cell(0.79, 0.01, 3), ("a", "b")).passed
    assert at_least("x", 0.75, 0.79, ("a", "b"), margin=0.05).passed
    assert not greater("x", Cell(0.80, 0.02, 3), Cell(0.79, 0.0, 1), ("a", "b")).passed
    assert greater("x", Cell(0.85, 0.02, 3), Cell(0.79, 0.0, 1), ("a", "b")).passed
    line = at_least("claim text", 0.9, 0.8, ("a", "b")).line()
    assert parse_claims(f"intro\n{line}\n") == [("PASS", "claim text")]


def test_a_cell_is_the_mean_with_half_the_range():
    cell = Cell.of([0.5, 0.7, 0.6])
    assert cell.mean == pytest.approx(0.6) and cell.spread == pytest.approx(0.1) and cell.n == 3
    assert cell.text() == "0.600 ± 0.100" and Cell.of([0.25]).text() == "0.250"


def test_a_line_plot_places_points_by_value():
    svg = line_plot_svg("t", "x", "y", {"a": [(1, 0.0), (3, 1.0)]}, width=300, height=200)
    assert svg.count("<circle") == 2 and "<polyline" in svg
