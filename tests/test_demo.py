"""The main job runs every strategy and writes its report."""

from pathlib import Path

from moeq.allocate import STRATEGIES
from moeq.demo import STRATEGIES as DEMO_STRATEGIES
from moeq.demo import run_demo


def test_main_job_has_a_row_for_every_strategy(tmp_path: Path) -> None:
    assert set(DEMO_STRATEGIES) | {"uniform"} >= set(STRATEGIES) - {"pmq", "error-ilp"}
    result = run_demo(tmp_path / "run", budgets=(2.5,), uniform_widths=(2,), eval_tokens=512, calib_tokens=512)
    assert [row.strategy for row in result.rows] == ["uniform", *DEMO_STRATEGIES]
    assert all(row.kl >= 0 and 0 <= row.routing_agreement <= 1 and row.model_bytes > 0 for row in result.rows)
    assert {p.name for p in (tmp_path / "run").iterdir()} >= {"report.md", "results.json", "quality_vs_bits.png"}
    assert (tmp_path / "run" / "report.md").read_text().count("| router-maxvar |") == 1
