"""A checkpoint folder written shard by shard that survives a crash and resumes where it stopped.

Quantizing a large model takes hours; a kill, a full disk or a reboot must not lose the layers
already finished. The output is assembled in a work folder beside the target,
``.<name>.partial``, holding one safetensors shard per finished unit (a decoder block, or the
tensors outside the blocks) and ``progress.json``, the manifest of finished units. Each shard is
written to a temporary name, flushed to disk and renamed; only then does the manifest list it, so
the manifest never names a shard that is not complete. A unit in the manifest is never written
again. The target folder appears, by one rename, only when every unit and the metadata are done.

The manifest records a fingerprint of the inputs (the source's ``config.json`` and shard index or
file sizes, the plan, the quantizer options, the calibration tokens): ``resume=True`` continues only
a run started from the same inputs. Finished shards are checked by size on resume, not re-hashed:
reading back a model-sized output would cost as much as writing it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from ..atomic import OutputLock, OutputWriteError, atomic_write_text, ensure_output_free, publish, write_failure
from .checkpoint import CheckpointError

__all__ = ["ResumableOutput", "OutputWriteError", "ResumeError", "fingerprint_inputs", "work_folder_of"]

MANIFEST = "progress.json"
MANIFEST_FORMAT = "moeq.progress"
MANIFEST_VERSION = 1


class ResumeError(CheckpointError):
    """A work folder exists that this run may not (or cannot) continue."""


def work_folder_of(target: str | Path) -> Path:
    """Where the output for ``target`` is assembled: a hidden sibling with a fixed name."""
    target = Path(target)
    return target.with_name(f".{target.name}.partial")


def fingerprint_inputs(source: str | Path, **settings: Any) -> str:
    """A hash of what determines the output: the source's config and shard layout, and ``settings``.

    ``settings`` values must be JSON-serialisable, or tensors (hashed by their bytes).
    """
    source = Path(source)
    digest = hashlib.sha256()
    digest.update((source / "config.json").read_bytes())
    index = source / "model.safetensors.index.json"
    if index.is_file():
        digest.update(index.read_bytes())
    for file in sorted(source.glob("*.safetensors")):
        digest.update(f"{file.name}:{file.stat().st_size}".encode())
    for key in sorted(settings):
        value = settings[key]
        digest.update(key.encode())
        if isinstance(value, torch.Tensor):
            digest.update(str(value.dtype).encode() + str(tuple(value.shape)).encode())
            digest.update(value.detach().contiguous().cpu().numpy().tobytes())
        else:
            digest.update(json.dumps(value, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ResumableOutput:
    """The work folder of one quantization run: finished shards, the manifest, the final rename.

    Args:
        target: the output folder that appears when the run completes.
        fingerprint: :func:`fingerprint_inputs` of this run.
        overwrite: replace an existing ``target`` at the end, and discard a stale work folder.
        resume: continue the units a previous run with the same fingerprint finished.
        inputs: the paths the run reads (the source model...), which ``target`` may not overlap.

    Use it as a context manager: it holds the output's :class:`~moeq.atomic.OutputLock` from
    the start to the end of the run, so a second run writing the same ``target`` is refused.

    Raises:
        OutputExistsError: ``target`` exists and not ``overwrite``.
        ResumeError: a work folder exists and neither ``resume`` nor ``overwrite`` is given, or
            ``resume`` is given and the work folder was started from different inputs.
    """

    def __init__(
        self, target: str | Path, fingerprint: str, overwrite: bool = False, resume: bool = False, inputs: tuple = ()
    ) -> None:
        self.target = Path(target)
        self.work = work_folder_of(self.target)
        self.fingerprint = fingerprint
        self.overwrite = overwrite
        self.inputs = tuple(inputs)
        ensure_output_free(self.target, overwrite, self.inputs)
        self._lock = OutputLock(self.target).acquire()
        try:
            self._open_work_folder(resume)
        except BaseException:
            self._lock.release()
            raise

    def __enter__(self) -> ResumableOutput:
        return self

    def __exit__(self, *exc) -> None:
        self._lock.release()

    def _open_work_folder(self, resume: bool) -> None:
        self.units: dict[str, dict[str, Any]] = {}
        if self.work.exists():
            if resume:
                self.units = self._read_manifest()
            elif self.overwrite:
                shutil.rmtree(self.work)
            else:
                raise ResumeError(
                    f"an interrupted run left {self.work}; add --resume to continue it, or --overwrite to start over"
                )
        self.resumed = len(self.units)

    def _read_manifest(self) -> dict[str, dict[str, Any]]:
        path = self.work / MANIFEST
        if not path.is_file():  # killed before the first unit finished: nothing to keep
            return {}
        try:
            manifest = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ResumeError(f"{path} is not valid JSON ({err}); remove {self.work} and start over") from None
        if manifest.get("format") != MANIFEST_FORMAT or manifest.get("version") != MANIFEST_VERSION:
            raise ResumeError(f"{path} is not a moeq progress file of version {MANIFEST_VERSION}; remove {self.work} and start over")
        if manifest.get("fingerprint") != self.fingerprint:
            raise ResumeError(
                f"{self.work} was started from different inputs (model, plan, options or calibration text changed); "
                "rerun with the original inputs, or use --overwrite instead of --resume to start over"
            )
        units = manifest.get("units", {})
        for unit, record in units.items():
            shard = self.work / record["file"]
            if not shard.is_file() or shard.stat().st_size != record["bytes"]:
                raise ResumeError(f"{shard} (finished unit {unit}) is missing or has the wrong size; remove {self.work} and start over")
        return units

    def _write_manifest(self) -> None:
        manifest = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "fingerprint": self.fingerprint, "units": self.units}
        atomic_write_text(self.work / MANIFEST, json.dumps(manifest, indent=1))

    def finished(self, unit: str) -> dict[str, Any] | None:
        """The record of ``unit`` if an earlier (or this) run finished it: ``file``, ``keys``, ``extra``."""
        return self.units.get(unit)

    def shard_path(self, unit: str) -> Path:
        return self.work / self.units[unit]["file"]

    def write(self, unit: str, tensors: dict[str, torch.Tensor], extra: dict[str, Any] | None = None) -> None:
        """Write the shard of ``unit`` and record it as finished (with ``extra``, e.g. statistics)."""
        if unit in self.units:
            raise ResumeError(f"unit {unit} is already finished in {self.work}")
        self.work.mkdir(parents=True, exist_ok=True)
        name = f"{unit.replace('.', '-')}.safetensors"
        final = self.work / name
        partial = self.work / f".{name}.tmp"
        try:
            save_file({k: v.contiguous() for k, v in tensors.items()}, partial, metadata={"format": "pt"})
            with open(partial, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(partial, final)
            _fsync_folder(self.work)
            self.units[unit] = {"file": name, "bytes": final.stat().st_size, "keys": sorted(tensors), "extra": extra or {}}
            self._write_manifest()
        except (OSError, SafetensorError) as err:  # safetensors reports a full disk as its own error
            partial.unlink(missing_ok=True)
            self.units.pop(unit, None)
            raise self._write_error(f"writing {final}", err) from None

    def _write_error(self, doing: str, err: Exception) -> OutputWriteError:
        kept = f"{len(self.units)} finished units are kept in {self.work}"
        return OutputWriteError(f"{doing} failed: {write_failure(err)}; {kept}: fix it and rerun the same command with --resume")

    def complete(self, write_metadata: Callable[[Path], None]) -> Path:
        """Write the shard index and ``write_metadata(work)`` (config, tokenizer...), then publish.

        The work folder becomes ``target`` by one rename; an existing target (with ``overwrite``)
        is swapped out only after that.
        """
        weight_map = {key: record["file"] for record in self.units.values() for key in record["keys"]}
        try:
            self.work.mkdir(parents=True, exist_ok=True)
            write_metadata(self.work)
            atomic_write_text(
                self.work / "model.safetensors.index.json",
                json.dumps({"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}, indent=1),
            )
        except OSError as err:
            raise self._write_error(f"writing the metadata of {self.target}", err) from None
        ensure_output_free(self.target, self.overwrite, self.inputs)
        publish(self.work, self.target)
        # Removed only after the rename: a kill just before it must still find the manifest.
        (self.target / MANIFEST).unlink(missing_ok=True)
        return self.target
