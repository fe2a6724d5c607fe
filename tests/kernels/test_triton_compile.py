"""The Triton kernels compile for an H100 (sm_90) at every launch configuration: no register
spills, and a software-pipelined K loop.

The interpreter tests check the numbers; they cannot see what only the compiler shows: a name
whose type differs between the branches of an ``if``, register spills, or a loop Triton declines
to pipeline (a load inside a branch is enough). Compiling needs no GPU: triton ships the compiler,
ptxas and cuobjdump. :mod:`moeq.kernels.static` runs in a fresh process because the tests'
process has TRITON_INTERPRET on, which makes ``triton.jit`` build interpreter functions.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="the Triton backend needs the triton package (pip install moeq[triton])")

from moeq.kernels.static import CONFIGURATIONS, cuobjdump  # noqa: E402


@pytest.mark.skipif(not cuobjdump().exists(), reason="this triton build ships no CUDA toolchain")
def test_every_launch_configuration_compiles_for_sm90_pipelined_and_without_spilling(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    result = subprocess.run([sys.executable, "-m", "moeq.kernels.static"], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    rows = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(rows) == len(CONFIGURATIONS)
    spilled = [row for row in rows if row["stack"] > 0]
    assert not spilled, f"configurations that spill registers to the stack: {spilled}"
    # Software pipelining (global -> shared copies issued tiles ahead) needs every load of the K loop
    # at its top level; a load inside a branch (say, on the width) silently turns it off.
    unpipelined = [row for row in rows if row["async_copies"] == 0 or row["sass_ldgsts"] == 0]
    assert not unpipelined, f"configurations whose K loop is not software-pipelined: {unpipelined}"
    # Codes become floats by bit tricks, not int-to-float conversions (a handful remain for indices).
    assert all(row["sass_i2f"] <= 4 for row in rows), [(row["launch"], row["sass_i2f"]) for row in rows]
    assert all(row["sass_mma"] > 0 for row in rows)
