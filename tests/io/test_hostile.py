"""Hostile folders: what a stranger's checkpoint, a bad weight, a full disk or a second run can do.

Every case builds its folder from a tiny model and asserts one line naming the problem (exit
status 2 on the command line), no output left behind, and an untouched source. A new reader or
writer (GGUF, compressed-tensors, FP8 sources) gets its cases added here.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import moeq
from moeq.cli import app
from moeq.config import QuantConfig, uniform_plan
from moeq.atomic import OutputLock
from moeq.io.checkpoint import CheckpointError
from moeq.models.tiny import tiny_model
from tests.conftest import add_tokenizer, one_line_error

runner = CliRunner()
INDEX = "model.safetensors.index.json"


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def _quantize(*args: str):
    return runner.invoke(app, ["quantize", *map(str, args)])


def _leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith((name, f".{name}")))


@pytest.fixture
def sharded_source(tmp_path: Path) -> Path:
    folder = tmp_path / "src"
    tiny_model("mixtral").save_pretrained(folder, max_shard_size="100KB")
    add_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A sharded moeq checkpoint (written by the streaming quantizer), mixed widths, asym scheme."""
    root = tmp_path_factory.mktemp("hostile")
    tiny_model("mixtral").save_pretrained(root / "src")
    add_tokenizer(root / "src")
    assert _quantize(root / "src", "--out", root / "q", "--bits", "3").exit_code == 0
    return root / "q"


@pytest.fixture
def copy_of(checkpoint: Path, tmp_path: Path) -> Path:
    target = tmp_path / "ckpt"
    shutil.copytree(checkpoint, target)
    return target


def _shard_holding(folder: Path, key: str) -> Path:
    return folder / json.loads((folder / INDEX).read_text())["weight_map"][key]


def _rewrite(file: Path, change) -> None:
    tensors = load_file(file)
    change(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


# -- path traversal ------------------------------------------------------------------------------

def _move_shard_outside(folder: Path, absolute: bool) -> Path:
    index = json.loads((folder / INDEX).read_text())
    victim = sorted(set(index["weight_map"].values()))[-1]
    elsewhere = folder.parent / "other"
    elsewhere.mkdir()
    shutil.move(folder / victim, elsewhere / victim)
    name = str((elsewhere / victim).resolve()) if absolute else f"../other/{victim}"
    index["weight_map"] = {k: (name if v == victim else v) for k, v in index["weight_map"].items()}
    (folder / INDEX).write_text(json.dumps(index))
    return elsewhere / victim


@pytest.mark.parametrize("absolute", [False, True])
def test_a_source_index_cannot_name_files_outside_its_folder(sharded_source: Path, tmp_path: Path, absolute: bool) -> None:
    _move_shard_outside(sharded_source, absolute)
    before = _digest(sharded_source)
    line = one_line_error(_quantize(sharded_source, "--out", tmp_path / "q", "--bits", "3"))
    assert "outside the model folder" in line
    assert _leftovers(tmp_path, "q") == [] and _digest(sharded_source) == before
    line = one_line_error(runner.invoke(app, ["eval", str(sharded_source), "--max-tokens", "64"]))
    assert "outside the model folder" in line


@pytest.mark.parametrize("absolute", [False, True])
def test_a_checkpoint_index_cannot_name_files_outside_its_folder(copy_of: Path, absolute: bool) -> None:
    _move_shard_outside(copy_of, absolute)
    with pytest.raises(CheckpointError, match="outside the model folder"):
        moeq.load(copy_of)
    assert "outside the model folder" in one_line_error(runner.invoke(app, ["info", str(copy_of)]))
    assert "outside the model folder" in one_line_error(runner.invoke(app, ["eval", str(copy_of), "--max-tokens", "64"]))


# -- the source is never written -----------------------------------------------------------------

@pytest.mark.parametrize("where", ["same", "inside", "around"])
def test_the_output_never_overlaps_the_source(tmp_path: Path, where: str) -> None:
    parent = tmp_path / "parent"
    source = parent / "src" if where == "around" else tmp_path / "src"
    tiny_model("olmoe").save_pretrained(source)
    out = {"same": source, "inside": source / "q", "around": parent}[where]
    before = _digest(source)
    line = one_line_error(_quantize(source, "--out", out, "--bits", "3", "--overwrite"))
    assert "moeq never writes into its inputs" in line
    assert _digest(source) == before
    assert sorted(p.name for p in source.parent.iterdir() if p.name.startswith(".")) == []
    with pytest.raises(ValueError, match="never writes into its inputs"):
        moeq.save(moeq.quantize(tiny_model("olmoe"), QuantConfig(bits=3)), out, source=source, overwrite=True)
    assert _digest(source) == before


# -- weights that cannot be stored ---------------------------------------------------------------

@pytest.mark.parametrize("bits", [2, 3])
def test_a_huge_weight_is_named_not_written_as_nan(tmp_path: Path, bits: int) -> None:
    model = tiny_model("mixtral")
    with torch.no_grad():
        model.model.layers[1].mlp.experts.down_proj[5, 7, 3] = 1e30
    model.save_pretrained(tmp_path / "src")
    line = one_line_error(_quantize(tmp_path / "src", "--out", tmp_path / "q", "--bits", bits))
    assert "expert 5 down_proj of model.layers.1.mlp.experts" in line and "float16" in line
    # Block 0 finished before the bad weight was met; it is kept for --resume, like after a crash, and said so.
    assert "the blocks finished before it are kept in" in line and _leftovers(tmp_path, "q") == [".q.partial"]


def test_gptq_names_a_huge_weight(tmp_path: Path) -> None:
    model = tiny_model("mixtral")
    with torch.no_grad():
        model.model.layers[0].mlp.experts.gate_up_proj[:, 2, 3] = 1e30
    model.save_pretrained(tmp_path / "src")
    add_tokenizer(tmp_path / "src")
    calib = tmp_path / "calib.txt"
    calib.write_text("The experts of a mixture route every token to a few of them. " * 200)
    line = one_line_error(_quantize(tmp_path / "src", "--out", tmp_path / "q", "--bits", "2", "--quantizer", "gptq",
                                    "--calib", calib, "--seq-len", "64", "--calib-tokens", "1024"))
    assert "model.layers.0.mlp.experts" in line and "gate_proj" in line and "more than float16 holds" in line
    assert _leftovers(tmp_path, "q") == []


def test_a_nan_weight_is_named(tmp_path: Path) -> None:
    model = tiny_model("mixtral")
    with torch.no_grad():
        model.model.layers[1].mlp.experts.down_proj[2, 0, 0] = float("nan")
    model.save_pretrained(tmp_path / "src")
    line = one_line_error(_quantize(tmp_path / "src", "--out", tmp_path / "q", "--bits", "3"))
    assert "expert 2 down_proj of model.layers.1.mlp.experts holds NaN or infinite values" in line


# -- a moeq checkpoint must hold exactly what its plan implies -----------------------------------

CODES = "model.layers.1.mlp.experts.3.up_proj.codes"
SCALES = "model.layers.0.mlp.experts.6.gate_proj.scales"


def _drop(tensors):
    del tensors[CODES]


def _nan_scale(tensors):
    tensors[SCALES][0, 0] = float("nan")


def _truncate(tensors):
    tensors[CODES] = tensors[CODES][:-1].clone()


def _pad(tensors):
    tensors[CODES] = torch.cat([tensors[CODES], torch.zeros(1, dtype=torch.uint8)])


def _wrong_dtype(tensors):
    tensors[CODES] = tensors[CODES].to(torch.int32)


def _extra(tensors):
    tensors["model.layers.1.mlp.experts.3.up_proj.surprise"] = torch.zeros(4)


@pytest.mark.parametrize("change, key, message", [
    (_drop, CODES, f"lacks tensor {CODES}"),
    (_nan_scale, SCALES, f"tensor {SCALES} holds non-finite or non-positive scales"),
    (_truncate, CODES, f"tensor {CODES} has shape"),
    (_pad, CODES, f"tensor {CODES} has shape"),
    (_wrong_dtype, CODES, f"tensor {CODES} is I32, the plan implies U8"),
    (_extra, CODES, "holds tensor model.layers.1.mlp.experts.3.up_proj.surprise, which this model does not have"),
])
def test_a_damaged_checkpoint_is_refused_before_loading(copy_of: Path, change, key: str, message: str) -> None:
    _rewrite(_shard_holding(copy_of, key), change)
    with pytest.raises(CheckpointError, match=message):
        moeq.load(copy_of)
    import transformers

    with pytest.raises(CheckpointError, match=message):  # the plain transformers road is checked too
        transformers.AutoModelForCausalLM.from_pretrained(copy_of)


def test_codes_of_another_width_than_the_plan_are_refused(copy_of: Path) -> None:
    config = json.loads((copy_of / "config.json").read_text())
    config["quantization_config"]["plan"]["experts"][0]["bits"] = 4  # the stored codes are 3-bit
    (copy_of / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="has shape .* the plan implies"):
        moeq.load(copy_of)


def _edit_plan(folder: Path, change) -> None:
    config = json.loads((folder / "config.json").read_text())
    change(config["quantization_config"]["plan"])
    (folder / "config.json").write_text(json.dumps(config))


def test_a_plan_with_a_million_experts_is_refused_at_once(copy_of: Path) -> None:
    _edit_plan(copy_of, lambda plan: plan["experts"][0].update(experts=list(range(1_000_000)), bits=3))
    started = time.perf_counter()
    line = one_line_error(runner.invoke(app, ["info", str(copy_of)]))
    assert "expert indices must be distinct and within 0..7" in line
    assert time.perf_counter() - started < 10
    with pytest.raises(moeq.PlanError, match="within 0..7"):
        moeq.load(copy_of)


def test_a_plan_naming_an_unknown_projection_is_refused(copy_of: Path) -> None:
    _edit_plan(copy_of, lambda plan: plan["experts"][0].update(projection="w9"))
    assert "names projection 'w9'" in one_line_error(runner.invoke(app, ["info", str(copy_of)]))


def test_a_plan_file_is_checked_against_the_model_before_anything_else(tmp_path: Path) -> None:
    model = tiny_model("olmoe")
    model.save_pretrained(tmp_path / "src")
    data = uniform_plan(model, QuantConfig(bits=3)).to_json()
    data["experts"][0]["experts"] = list(range(1_000_000))
    data["experts"][0]["bits"] = 3
    (tmp_path / "plan.json").write_text(json.dumps(data))
    line = one_line_error(_quantize(tmp_path / "src", "--out", tmp_path / "q", "--plan", tmp_path / "plan.json"))
    assert "within 0..7" in line and _leftovers(tmp_path, "q") == []


# -- a source's tensors must have the shapes its config implies -----------------------------------

@pytest.mark.parametrize("shape", [(4_000_000,), (63,)])
def test_a_source_tensor_of_the_wrong_shape_is_refused_before_reading(tmp_path: Path, shape: tuple[int, ...]) -> None:
    source = tmp_path / "src"
    tiny_model("mixtral").save_pretrained(source)
    _rewrite(source / "model.safetensors", lambda t: t.update({"model.norm.weight": torch.ones(shape)}))
    line = one_line_error(_quantize(source, "--out", tmp_path / "q", "--bits", "3"))
    expected = f"tensor model.norm.weight in model.safetensors has shape {list(shape)}, but the model's config.json implies [64]"
    assert expected in line and _leftovers(tmp_path, "q") == []
    add_tokenizer(source)  # evaluation loads the whole model through transformers: checked first, the same way
    assert expected in one_line_error(runner.invoke(app, ["eval", str(source), "--max-tokens", "64"]))


def test_a_header_claiming_more_bytes_than_the_file_holds_is_refused(tmp_path: Path) -> None:
    source = tmp_path / "src"
    tiny_model("mixtral").save_pretrained(source)
    file = source / "model.safetensors"
    raw = bytearray(file.read_bytes())
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + length])
    header["model.norm.weight"]["shape"] = [2**28]  # 1 GiB of float32 claimed, not present
    start = header["model.norm.weight"]["data_offsets"][0]
    header["model.norm.weight"]["data_offsets"][1] = start + 2**30
    text = json.dumps(header).encode()
    file.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + length :])
    line = one_line_error(_quantize(source, "--out", tmp_path / "q", "--bits", "3"))
    assert "tensor model.norm.weight claims 1,073,741,824 bytes" in line and "truncated or corrupt" in line


# -- bad options and folders end in one line ------------------------------------------------------

def test_counts_below_one_are_refused(tmp_path: Path) -> None:
    tiny_model("olmoe").save_pretrained(tmp_path / "src")
    calib = tmp_path / "calib.txt"
    calib.write_text("text " * 100)
    for option in (["--calib-tokens", "-100"], ["--seq-len", "0"]):
        line = one_line_error(_quantize(tmp_path / "src", "--out", tmp_path / "q", "--bits", "3", "--quantizer", "gptq",
                                        "--calib", calib, *option))
        assert f"{option[0]} must be at least 1, got {option[1]}" in line
    assert "--seq-len must be at least 1" in one_line_error(runner.invoke(app, ["eval", str(tmp_path / "src"), "--seq-len", "0"]))


def test_eval_without_a_fitting_tokenizer_says_how_to_give_one(tmp_path: Path) -> None:
    tiny_model("mixtral").save_pretrained(tmp_path / "src")  # vocabulary 256; moeq's own tokenizer has 4096
    line = one_line_error(runner.invoke(app, ["eval", str(tmp_path / "src"), "--max-tokens", "64"]))
    assert "has no tokenizer" in line and "copy the model's tokenizer files" in line


def test_eval_of_a_pickle_only_folder_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "pickled"
    tiny_model("mixtral").save_pretrained(folder)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    add_tokenizer(folder)
    line = one_line_error(runner.invoke(app, ["eval", str(folder), "--max-tokens", "64"]))
    assert "holds no safetensors weights" in line and "pytorch_model.bin" in line


def test_an_output_under_a_file_or_a_read_only_place_is_refused(tmp_path: Path) -> None:
    tiny_model("olmoe").save_pretrained(tmp_path / "src")
    (tmp_path / "a-file").write_text("not a folder")
    line = one_line_error(_quantize(tmp_path / "src", "--out", tmp_path / "a-file" / "q", "--bits", "3"))
    assert "cannot write into" in line
    line = one_line_error(_quantize(tmp_path / "src", "--out", "/proc/moeq-out", "--bits", "3"))
    assert "cannot write into /proc" in line


def _small_filesystem(path: Path, size: str) -> bool:
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return done.returncode == 0


def test_a_full_disk_ends_in_one_line_and_resumes(tmp_path: Path) -> None:
    source = tmp_path / "src"
    tiny_model("mixtral").save_pretrained(source)
    disk = tmp_path / "disk"
    if not _small_filesystem(disk, "120k"):
        pytest.skip("cannot mount a small tmpfs here (needs root); test_resume.py simulates the full disk instead")
    try:
        line = one_line_error(_quantize(source, "--out", disk / "q", "--bits", "8"))
        assert "the disk is full" in line and "--resume" in line
        assert not (disk / "q").exists()
        subprocess.run(["mount", "-o", "remount,size=4m", str(disk)], check=True)
        result = _quantize(source, "--out", disk / "q", "--bits", "8", "--resume")
        assert result.exit_code == 0, result.output
        assert torch.equal(moeq.load(disk / "q").lm_head.weight, tiny_model("mixtral").lm_head.weight)
    finally:
        subprocess.run(["umount", str(disk)])


# -- one writer per output ------------------------------------------------------------------------

def test_a_second_run_to_the_same_output_is_refused_while_the_first_lives(tmp_path: Path) -> None:
    tiny_model("olmoe").save_pretrained(tmp_path / "src")
    out = tmp_path / "q"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from moeq.atomic import OutputLock; "
         f"OutputLock({str(out)!r}).acquire(); print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        for extra in ([], ["--overwrite"]):
            line = one_line_error(_quantize(tmp_path / "src", "--out", out, "--bits", "3", *extra))
            assert f"another moeq run (process {holder.pid}) is writing {out}" in line
        assert _leftovers(tmp_path, "q") == [".q.lock"]
    finally:
        holder.kill()
        holder.wait()
    # The holder died without releasing: its lock is stale and the next run takes it over.
    result = _quantize(tmp_path / "src", "--out", out, "--bits", "3")
    assert result.exit_code == 0, result.output
    assert _leftovers(tmp_path, "q") == ["q"]


def test_the_lock_is_released_when_a_run_fails(tmp_path: Path) -> None:
    out = tmp_path / "q"
    with pytest.raises(RuntimeError):
        with OutputLock(out):
            raise RuntimeError("boom")
    with OutputLock(out):
        assert (tmp_path / ".q.lock").read_text() == str(os.getpid())
    assert not (tmp_path / ".q.lock").exists()


def test_a_reference_router_of_the_wrong_shape_is_named(tmp_path: Path) -> None:
    model = tiny_model("mixtral")
    model.save_pretrained(tmp_path / "src")
    save_file({"model.layers.0.mlp.gate.weight": torch.zeros(8, 63), "model.layers.1.mlp.gate.weight": torch.zeros(8, 64)},
              tmp_path / "routers.safetensors")
    line = one_line_error(runner.invoke(app, ["allocate", str(tmp_path / "src"), "--avg-bits", "2.5", "--reference",
                                              str(tmp_path / "routers.safetensors"), "--out", str(tmp_path / "p.json")]))
    assert "router of model.layers.0.mlp has shape [8, 63], the model's [8, 64]" in line
