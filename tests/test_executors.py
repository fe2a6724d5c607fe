"""Executors: the same bytes whichever runs the jobs (serial, a local pool, Ray), and a worker that
dies mid-run leaves a work folder ``--resume`` finishes."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from moeq.calibrate.runner import CalibrationConfig, quantize_calibrated
from moeq.cli import app
from moeq.config import QuantConfig, uniform_plan
from moeq.executors import ExecutorError, LocalExecutor, SerialExecutor, make_executor
from moeq.io.resumable import work_folder_of
from moeq.io.streaming import quantize_checkpoint
from moeq.models.tiny import tiny_model
from tests.conftest import one_line_error

runner = CliRunner()
IDS = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    folder = tmp_path_factory.mktemp("executors") / "src"
    model = tiny_model("qwen2_moe")
    model.save_pretrained(folder, max_shard_size="100KB")
    return folder, model


@pytest.fixture(scope="module")
def ray_executor():
    pytest.importorskip("ray")
    from moeq.executors import RayExecutor

    import ray

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the test's job wrappers travel by value
    with RayExecutor(2) as executor:  # one local Ray with two CPUs for the module
        yield executor


def test_rtn_and_gptq_write_the_same_bytes_on_every_executor(source, ray_executor, tmp_path: Path) -> None:
    folder, model = source
    plan = uniform_plan(model, QuantConfig(bits=3, attn_bits=4))
    outputs = {}
    with LocalExecutor(2) as local:
        for name, executor in (("serial", SerialExecutor()), ("local", local), ("ray", ray_executor)):
            quantize_checkpoint(folder, plan, tmp_path / f"rtn-{name}", executor=executor)
            quantize_calibrated(folder, plan, IDS, tmp_path / f"gptq-{name}", CalibrationConfig(min_tokens=4), executor=executor)
            outputs[name] = (_digests(tmp_path / f"rtn-{name}"), _digests(tmp_path / f"gptq-{name}"))
    assert outputs["serial"] == outputs["local"] == outputs["ray"]
    assert outputs["serial"][0] != outputs["serial"][1]  # GPTQ is not rounding


class _DiesOn:
    """``fn`` run as is, except that the worker process dies on the job for ``unit``."""

    def __init__(self, fn, unit: str) -> None:
        self.fn, self.unit = fn, unit

    def __call__(self, job):
        if job.unit == self.unit:
            os._exit(1)
        return self.fn(job)


def test_a_worker_that_dies_leaves_a_run_resume_finishes(source, ray_executor, tmp_path: Path) -> None:
    folder, model = source
    plan = uniform_plan(model, QuantConfig(bits=2, group_size=16))
    quantize_checkpoint(folder, plan, tmp_path / "whole")

    class Dying:
        workers = 1  # one job at a time: the blocks before the dying one finish

        def map(self, fn, jobs):
            return ray_executor.map(_DiesOn(fn, "model.layers.1"), jobs)

    with pytest.raises(ExecutorError, match="a Ray worker failed .* finished work is kept: rerun with --resume"):
        quantize_checkpoint(folder, plan, tmp_path / "out", executor=Dying())
    work = work_folder_of(tmp_path / "out")
    assert not (tmp_path / "out").exists() and work.is_dir()
    assert len(list(work.glob("*.safetensors"))) == 1  # layer 0 finished before the worker died
    quantize_checkpoint(folder, plan, tmp_path / "out", resume=True, executor=ray_executor)
    assert _digests(tmp_path / "out") == _digests(tmp_path / "whole")


def test_executor_options_are_checked_before_any_work(source, tmp_path: Path) -> None:
    folder, _ = source
    args = ["quantize", str(folder), "--out", str(tmp_path / "q"), "--bits", "3"]
    assert "unknown executor 'dask'; choose one of: serial, local, ray" in one_line_error(runner.invoke(app, [*args, "--executor", "dask"]))
    assert "--workers and --address need --executor local or ray" in one_line_error(runner.invoke(app, [*args, "--workers", "2"]))
    assert "--workers must be at least 1" in one_line_error(runner.invoke(app, [*args, "--executor", "local", "--workers", "0"]))
    assert not (tmp_path / "q").exists()
    with pytest.raises(ValueError, match="--address is for --executor ray"):
        make_executor("local", 2, "auto")


def test_the_cli_quantizes_on_a_local_pool_to_the_serial_bytes(source, tmp_path: Path) -> None:
    folder, _ = source
    for name, extra in (("serial", []), ("local", ["--executor", "local", "--workers", "2"])):
        result = runner.invoke(app, ["quantize", str(folder), "--out", str(tmp_path / name), "--bits", "3", *extra])
        assert result.exit_code == 0, result.output
    assert _digests(tmp_path / "serial") == _digests(tmp_path / "local")


def test_auto_plans_the_same_whichever_executor_prices_the_experts(source, ray_executor) -> None:
    from moeq.allocate import allocate

    folder, _ = source
    plans = []
    with LocalExecutor(2) as local:
        for executor in (None, local, ray_executor):
            plan = allocate(folder, "auto", avg_bits=2.5, calibration=IDS, damage_quantizer="gptq", executor=executor)
            plans.append((plan.to_json()["experts"], plan.scores["predicted_damage"]))
    assert plans[0] == plans[1] == plans[2]


def test_ctrl_c_during_a_ray_run_cancels_its_tasks_and_resume_finishes(source, ray_executor, tmp_path: Path) -> None:
    folder, model = source
    plan = uniform_plan(model, QuantConfig(bits=3))
    quantize_checkpoint(folder, plan, tmp_path / "whole")

    def interrupt(unit: str) -> None:
        if unit == "model.layers.0":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        quantize_checkpoint(folder, plan, tmp_path / "out", executor=ray_executor, progress=interrupt)
    assert work_folder_of(tmp_path / "out").is_dir() and not (tmp_path / "out").exists()
    quantize_checkpoint(folder, plan, tmp_path / "out", resume=True, executor=ray_executor)  # Ray is still usable
    assert _digests(tmp_path / "out") == _digests(tmp_path / "whole")
