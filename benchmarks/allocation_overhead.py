"""Time, bytes read and peak memory of each allocation strategy on a Mixtral-shaped checkpoint.

    python benchmarks/allocation_overhead.py [--layers 32] [--hidden 4096] [--intermediate 14336]
        [--strategies router-maxvar,router,variance,random,uniform] [--workdir /tmp/moeq-alloc]

Writes a synthetic checkpoint with Mixtral-8x7B's layer shapes (by default: 32 layers, 8 experts,
hidden 4096, intermediate 14336, router [8, 4096]; random bf16 weights, std 0.02, in
transformers 5's fused layout, one safetensors shard per layer plus the index) holding the
routers and experts (what allocation reads; attention and embeddings are not written), unless
it exists already. Then each strategy runs in a fresh process: wall time of scoring + solving,
the bytes it read from the checkpoint, and its peak resident memory above the baseline after
imports (from the OS: /proc/self/statm sampled every 2 ms). Prints a table; writes benchmarks/results/allocation_overhead*.json.
Calibration-based strategies load the whole model (the remaining tensors are then added to the
checkpoint) and route 64 x 256 random token ids; run them on a small size, e.g.
``--layers 4 --hidden 256 --intermediate 512 --strategies frequency,routing-weight,pmq``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file

from _common import print_table, write_json

CALIBRATED = ("frequency", "routing-weight", "pmq")
CHILD = r"""
import json, os, sys, threading, time, torch
from moeq.allocate import allocate
folder, strategy, calib = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
PAGE = os.sysconf("SC_PAGE_SIZE")
def current_rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE
peak = [0]
running = [True]
def sample():
    while running[0]:
        peak[0] = max(peak[0], current_rss())
        time.sleep(0.002)
base = current_rss()
threading.Thread(target=sample, daemon=True).start()
kwargs = dict(avg_bits=2 if strategy == "uniform" else 2.5)
if calib:
    kwargs["calibration"] = torch.randint(0, 1000, (64, 256), generator=torch.Generator().manual_seed(0))
start = time.perf_counter()
plan = allocate(folder, strategy, **kwargs)
seconds = time.perf_counter() - start
running[0] = False
time.sleep(0.01)
print(json.dumps({"seconds": seconds, "bytes_read": plan.method["bytes_read"], "peak_rss_above_import": max(peak[0], current_rss()) - base,
                  "avg_expert_bits": plan.budget["avg_expert_bits"], "model_bytes": plan.budget["model_bytes"]}))
"""


def write_checkpoint(folder: Path, layers: int, hidden: int, intermediate: int, experts: int = 8) -> float:
    config = transformers.MixtralConfig(
        vocab_size=32000, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=32 if hidden >= 1024 else 8, num_key_value_heads=8 if hidden >= 1024 else 4,
        num_local_experts=experts, num_experts_per_tok=2, dtype="bfloat16",
    )
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(0)
    weight_map = {}
    for layer in range(layers):
        prefix = f"model.layers.{layer}.mlp"
        gate_up = torch.empty(experts, 2 * intermediate, hidden, dtype=torch.bfloat16)
        down = torch.empty(experts, hidden, intermediate, dtype=torch.bfloat16)
        for e in range(experts):
            gate_up[e] = torch.randn(2 * intermediate, hidden, generator=generator).mul_(0.02)
            down[e] = torch.randn(hidden, intermediate, generator=generator).mul_(0.02)
        tensors = {
            f"{prefix}.gate.weight": torch.randn(experts, hidden, generator=generator).mul_(0.02).to(torch.bfloat16),
            f"{prefix}.experts.gate_up_proj": gate_up,
            f"{prefix}.experts.down_proj": down,
        }
        name = f"model-{layer + 1:05d}-of-{layers:05d}.safetensors"
        save_file(tensors, folder / name, metadata={"format": "pt"})
        weight_map.update({key: name for key in tensors})
        del gate_up, down, tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config.save_pretrained(folder)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--strategies", default="router-maxvar,router,variance,random,uniform")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/moeq-alloc"))
    args = parser.parse_args()
    folder = args.workdir / f"mixtral-l{args.layers}-h{args.hidden}-i{args.intermediate}"
    if not (folder / "config.json").exists():
        seconds = write_checkpoint(folder, args.layers, args.hidden, args.intermediate)
        print(f"wrote {folder} in {seconds:.0f} s")
    strategies = args.strategies.split(",")
    if any(s in CALIBRATED for s in strategies):
        _complete_for_loading(folder)
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    rows = []
    for strategy in strategies:
        calibrated = strategy in CALIBRATED
        out = subprocess.run([sys.executable, "-c", CHILD, str(folder), strategy, "1" if calibrated else "0"],
                             capture_output=True, text=True, check=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append({"strategy": strategy, **result, "checkpoint_bytes": size})
    print_table(
        ["strategy", "seconds", "GB read", "share of file", "peak RSS MiB", "mean bits"],
        [[r["strategy"], f"{r['seconds']:.2f}", f"{r['bytes_read'] / 1e9:.3f}", f"{r['bytes_read'] / size:.3f}",
          f"{r['peak_rss_above_import'] / 2**20:.0f}", f"{r['avg_expert_bits']:.3g}"] for r in rows],
    )
    name = "allocation_overhead" + ("" if args.layers == 32 and args.hidden == 4096 else f"_l{args.layers}_h{args.hidden}")
    print(f"wrote {write_json(name, rows, layers=args.layers, hidden=args.hidden, intermediate=args.intermediate, checkpoint_bytes=size)}")


def _complete_for_loading(folder: Path) -> None:
    """Calibration strategies load the model: add the tensors the synthetic file leaves out."""
    marker = folder / "rest.safetensors"
    if marker.exists():
        return
    config = transformers.AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        skeleton = transformers.AutoModelForCausalLM.from_config(config)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    generator = torch.Generator().manual_seed(1)
    rest = {
        name: torch.randn(tuple(p.shape), generator=generator).mul_(0.02).to(torch.bfloat16)
        if not name.endswith("norm.weight") else torch.ones(tuple(p.shape), dtype=torch.bfloat16)
        for name, p in skeleton.state_dict().items() if name not in index["weight_map"]
    }
    save_file(rest, marker, metadata={"format": "pt"})
    index["weight_map"].update({name: marker.name for name in rest})
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


if __name__ == "__main__":
    main()
