"""The Triton kernels compile for an H100 (sm_90) at every launch configuration, without spilling.

The interpreter tests check the numbers; they cannot see what only the compiler rejects (e.g. a
name whose type differs between the branches of an ``if``) nor register spills. Compiling needs
no GPU: triton ships the compiler and ptxas. This runs in a fresh process because the tests'
process has TRITON_INTERPRET on, which makes ``triton.jit`` build interpreter functions.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton", reason="the Triton backend needs the triton package (pip install moeq[triton])")

CUOBJDUMP = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"

# Mixtral-8x7B: intermediate 14336 (gate/up outputs), hidden 4096 (down outputs); 2 slots (one
# decoded token, top-2) and 8192 (a 4096-token prefill).
CHILD = r"""
import json, os, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from moeq.kernels import triton_moe

SIGNATURE = {
    "x": "*bf16", "x_rows": "*i64", "out": "*bf16", "row_weight": "*bf16", "block_expert": "*i32", "block_start": "*i32",
    "block_end": "*i32", "words": "*i32", "meta": "*i32", "scales": "*fp16", "zeros": "*fp16", "N": "i32", "K": "i32",
    "stride_x": "i32", "stride_out": "i32", "second_entry": "i32",
}
results = []
for slots in (2, 8192):
    for launch in triton_moe.LAUNCHES:
        n = 4096 if launch == "down" else 14336
        config = triton_moe.launch_config(slots, n, launch)
        constexprs = {"GATED": launch == "gate_up", "ACT": 0 if launch == "down" else 1, "GATHER": launch != "down",
                      "WEIGHTED": launch == "down", "NUM_META": len(triton_moe.META),
                      **{k: v for k, v in config.items() if k != "num_warps"}}
        signature = dict(SIGNATURE, out="*fp32" if config["SPLIT_K"] > 1 else "*bf16",
                         **{name: "constexpr" for name in constexprs})
        # What a launch specialises at these shapes: 16-byte aligned tensors, sizes and strides multiple of 16.
        names = list(signature)
        attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in SIGNATURE if SIGNATURE[a].startswith("*") or a in ("N", "K", "stride_x", "stride_out")}
        kernel = triton.compile(ASTSource(fn=triton_moe._moe_gemm, signature=signature, constexprs=constexprs, attrs=attrs),
                                target=GPUTarget("cuda", 90, 32), options={"num_warps": config["num_warps"]})
        with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
            f.write(kernel.asm["cubin"])
        usage = subprocess.run([sys.argv[1], "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
        os.unlink(f.name)
        fields = dict(item.split(":", 1) for item in next(l for l in usage.splitlines() if "REG:" in l).split())
        results.append({"slots": slots, "launch": launch, **config, "registers": int(fields["REG"]), "stack": int(fields["STACK"])})
print(json.dumps(results))
"""


@pytest.mark.skipif(not CUOBJDUMP.exists(), reason="this triton build ships no CUDA toolchain")
def test_every_launch_configuration_compiles_for_sm90_without_spilling(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    result = subprocess.run([sys.executable, "-c", CHILD, str(CUOBJDUMP)], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    rows = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(rows) == 6
    spilled = [row for row in rows if row["stack"] > 0]
    assert not spilled, f"configurations that spill registers to the stack: {spilled}"
