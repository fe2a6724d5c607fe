"""Killed, interrupted and disk-full runs: resume gives the uninterrupted result byte for byte."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import moeq.io.resumable as resumable
from moeq.calibrate.runner import CalibrationConfig, quantize_calibrated
from moeq.config import QuantConfig, uniform_plan
from moeq.io.resumable import OutputWriteError, ResumeError, work_folder_of
from moeq.io.source import load_source
from moeq.io.streaming import quantize_checkpoint
from moeq.models.tiny import tiny_config
from moeq.plan import BitPlan

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """A 4-block tiny Mixtral saved in transformers' sharded per-expert layout."""
    from transformers import AutoModelForCausalLM

    config = tiny_config("mixtral")
    config.num_hidden_layers = 4
    torch.manual_seed(0)
    folder = tmp_path / "source"
    AutoModelForCausalLM.from_config(config).save_pretrained(folder, max_shard_size="200KB")
    return folder


def _plan(source: Path):
    return uniform_plan(load_source(source), QuantConfig(bits=3, attn_bits=4))


def _tokens() -> torch.Tensor:
    return torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _run_killed(source: Path, plan_path: Path, out: Path, gptq: bool, kill: str) -> None:
    """Run quantization in a child process that SIGKILLs itself after two blocks (``kill="after"``)
    or in the middle of writing the third shard (``kill="during"``)."""
    script = textwrap.dedent(f"""
        import os, signal, torch
        import moeq.io.resumable as resumable
        from moeq.plan import BitPlan
        plan = BitPlan.load({str(plan_path)!r})
        done = []
        def progress(unit):
            done.append(unit)
            if {kill!r} == "after" and len(done) == 2:
                os.kill(os.getpid(), signal.SIGKILL)
        if {kill!r} == "during":
            real = resumable.save_file
            def half_then_die(tensors, path, metadata=None):
                real(tensors, path, metadata=metadata)
                if len(done) == 2:
                    data = open(path, "rb").read()
                    open(path, "wb").write(data[: len(data) // 2])
                    os.kill(os.getpid(), signal.SIGKILL)
            resumable.save_file = half_then_die
        if {gptq!r}:
            from moeq.calibrate.runner import quantize_calibrated
            tokens = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
            quantize_calibrated({str(source)!r}, plan, tokens, {str(out)!r}, progress=progress)
        else:
            from moeq.io.streaming import quantize_checkpoint
            quantize_checkpoint({str(source)!r}, plan, {str(out)!r}, progress=progress)
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]


@pytest.mark.parametrize(("gptq", "kill"), [(False, "after"), (False, "during"), (True, "after")])
def test_killed_run_resumes_to_identical_output(tmp_path: Path, source: Path, gptq: bool, kill: str) -> None:
    plan = _plan(source)
    plan_path = tmp_path / "plan.json"
    plan.save(plan_path)

    def run(out: Path, resume: bool = False, plan: BitPlan = plan) -> None:
        if gptq:
            quantize_calibrated(source, plan, _tokens(), out, CalibrationConfig(), resume=resume)
        else:
            quantize_checkpoint(source, plan, out, resume=resume)

    run(tmp_path / "whole")
    out = tmp_path / "resumed"
    _run_killed(source, plan_path, out, gptq, kill)
    work = work_folder_of(out)
    assert not out.exists() and work.is_dir()
    manifest = json.loads((work / "progress.json").read_text())
    assert sorted(manifest["units"]) == ["model.layers.0", "model.layers.1"]
    finished = {name: (work / name).stat() for name in ("model-layers-0.safetensors", "model-layers-1.safetensors")}

    with pytest.raises(ResumeError, match="add --resume to continue it"):
        run(out)
    changed = BitPlan.load(plan_path)
    changed.method["seed"] = 99  # any change of the inputs makes the work folder unusable
    with pytest.raises(ResumeError, match="started from different inputs"):
        run(out, resume=True, plan=changed)

    run(out, resume=True)
    assert _files(out) == _files(tmp_path / "whole")
    for name, before in finished.items():  # finished shards were not written again
        after = (out / name).stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert not work.exists()


def test_disk_full_keeps_finished_blocks_and_the_old_output(tmp_path: Path, source: Path, monkeypatch) -> None:
    plan = _plan(source)
    out = tmp_path / "out"
    out.mkdir()
    (out / "previous.txt").write_text("the output of an earlier run")
    real = resumable.save_file
    calls = []

    def full_disk(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 3:
            Path(path).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(tensors, path, metadata=metadata)

    monkeypatch.setattr(resumable, "save_file", full_disk)
    with pytest.raises(OutputWriteError, match="the disk is full; 2 finished units are kept in .*--resume"):
        quantize_checkpoint(source, plan, out, overwrite=True)
    work = work_folder_of(out)
    assert sorted(p.name for p in work.iterdir()) == ["model-layers-0.safetensors", "model-layers-1.safetensors", "progress.json"]
    assert _files(out) == {"previous.txt": b"the output of an earlier run"}

    monkeypatch.setattr(resumable, "save_file", real)
    quantize_checkpoint(source, plan, out, overwrite=True, resume=True)
    quantize_checkpoint(source, plan, tmp_path / "whole")
    assert _files(out) == _files(tmp_path / "whole")


def test_overwrite_discards_a_stale_work_folder(tmp_path: Path, source: Path) -> None:
    plan = _plan(source)
    work = work_folder_of(tmp_path / "out")
    work.mkdir()
    (work / "progress.json").write_text("{ not json")
    with pytest.raises(ResumeError, match="is not valid JSON"):
        quantize_checkpoint(source, plan, tmp_path / "out", resume=True)
    quantize_checkpoint(source, plan, tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "config.json").is_file() and not work.exists()
