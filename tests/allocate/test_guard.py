"""The guard prices every compared plan from one damage table, with no routing pass of its own."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moeq.allocate import allocate
from moeq.allocate import api as allocate_api
from moeq.allocate.damage import DamageTable
from moeq.allocate.guard import _widths, compare_plan
from moeq.models.tiny import tiny_model


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("guard") / "src"
    tiny_model("mixtral").save_pretrained(folder)
    return folder


def test_frequency_is_priced_from_the_tables_own_counts(source: Path, monkeypatch) -> None:
    ids = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(3))
    plan = allocate(source, "auto", avg_bits=2.5, calibration=ids)
    table = DamageTable.from_json(plan.scores["predicted_damage"])
    frequency = allocate(source, "frequency", avg_bits=2.5, calibration=ids)  # its own routing pass
    expected = table.layer_totals(_widths(frequency))

    def no_pass(*args, **kwargs):
        raise AssertionError("the guard ran a routing pass")

    monkeypatch.setattr(allocate_api, "routing_statistics", no_pass)
    report = compare_plan(source, plan, ids)
    row = next(r for r in report.rows if r.strategy == "frequency")
    assert row.layers == pytest.approx(expected, rel=1e-12)
    assert row.model_bytes == frequency.budget["model_bytes"] and row.avg_bits == frequency.budget["avg_expert_bits"]
    assert report.rows[0].damage == pytest.approx(plan.budget["predicted_damage"], rel=1e-9)


def test_unknown_allocation_options_are_named(source: Path) -> None:
    with pytest.raises(TypeError, match="unknown option\\(s\\) level; the options are AllocationConfig's: strategy, levels"):
        allocate(source, "router-maxvar", avg_bits=2.5, level=(3, 2))
