"""Peak memory and throughput of streaming quantization on Mixtral-architecture checkpoints of two sizes.

    python benchmarks/streaming.py [--layers 3,6] [--hidden 4096] [--intermediate 14336] [--experts 8]
        [--vocab 32000] [--shard-gb 2] [--avg-bits 2.5] [--workdir /tmp/moeq-stream]

For each layer count, writes (unless present) a synthetic checkpoint in the layout transformers
saves Mixtral in (per-expert ``block_sparse_moe.experts.E.w1/w3/w2`` keys, attention, norms,
embeddings and head; random bf16 weights with std 0.02; shards of about ``--shard-gb`` plus the
index), tensor by tensor so writing it needs no more memory than one tensor. Then, each in a
fresh process:

1. ``moeq.allocate(folder, "router-maxvar", avg_bits=2.5)`` (levels 3,2,1; the router-norm
   change falls back to the final-norm proxy: a synthetic model has no initial routers);
2. ``moeq.io.streaming.quantize_checkpoint`` with that plan, the model never built;
3. the in-memory baseline: the same quantizer on the same expert tensors already in memory (one
   layer's worth, read before the clock starts), in weights per second.

Peak resident memory is the OS's high-water mark of the process (``VmHWM`` in /proc/self/status),
reported whole and above the baseline after imports. The page cache is not dropped between
writing and reading (a warm read; the table says so). Prints a table and writes
benchmarks/results/streaming.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from _common import print_table, write_json

CHILD = r"""
import json, sys, time, torch

def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

from moeq.allocate import allocate
from moeq.io.lazy import open_lazy
from moeq.io.streaming import quantize_checkpoint
from moeq.modules.convert import rtn_quantizer
from moeq.plan import BitPlan
folder, out, avg_bits, mode = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
base = hwm()
if mode == "stream":
    start = time.perf_counter()
    plan = allocate(folder, "router-maxvar", avg_bits=avg_bits, levels=(3, 2, 1))
    allocated = time.perf_counter()
    plan.save(out + ".plan.json")
    quantize_checkpoint(folder, plan, out)
    done = time.perf_counter()
    print(json.dumps({"allocate_s": allocated - start, "quantize_s": done - allocated, "peak_rss": hwm(), "import_rss": base}))
else:  # in-memory baseline: one layer's experts, read first, then quantized with the same specs
    plan = BitPlan.load(out + ".plan.json")
    lazy = open_lazy(folder)
    layer = lazy.layers[0]
    specs = plan.expert_specs(0)
    weights = {key: layer.expert_weight(*key) for key in specs}
    start = time.perf_counter()
    for key, spec in specs.items():
        rtn_quantizer(weights[key], spec, torch.float16)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "weights": sum(w.numel() for w in weights.values())}))
"""


def write_checkpoint(folder: Path, layers: int, hidden: int, intermediate: int, experts: int, vocab: int, shard_bytes: int) -> int:
    """A random Mixtral checkpoint in transformers' on-disk layout; returns its size in bytes."""
    import transformers

    config = transformers.MixtralConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=8, num_local_experts=experts, num_experts_per_tok=2,
        dtype="bfloat16", tie_word_embeddings=False,
    )
    kv = hidden // 32 * 8
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}"
        shapes += [(f"{p}.input_layernorm.weight", (hidden,)), (f"{p}.post_attention_layernorm.weight", (hidden,))]
        shapes += [(f"{p}.self_attn.q_proj.weight", (hidden, hidden)), (f"{p}.self_attn.k_proj.weight", (kv, hidden)),
                   (f"{p}.self_attn.v_proj.weight", (kv, hidden)), (f"{p}.self_attn.o_proj.weight", (hidden, hidden))]
        shapes.append((f"{p}.block_sparse_moe.gate.weight", (experts, hidden)))
        for e in range(experts):
            shapes += [(f"{p}.block_sparse_moe.experts.{e}.w1.weight", (intermediate, hidden)),
                       (f"{p}.block_sparse_moe.experts.{e}.w3.weight", (intermediate, hidden)),
                       (f"{p}.block_sparse_moe.experts.{e}.w2.weight", (hidden, intermediate))]
    shapes += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]

    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in shapes:
        nbytes = 2 * torch.Size(shape).numel()
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append((name, shape))
        size += nbytes
    generator = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    folder.mkdir(parents=True, exist_ok=True)
    for number, group in enumerate(groups, 1):
        shard = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name, shape in group:
            if len(shape) == 1:
                tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
            else:
                tensors[name] = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
            weight_map[name] = shard
            total += tensors[name].numel() * 2
        save_file(tensors, folder / shard, metadata={"format": "pt"})
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    config.save_pretrained(folder)
    return total


def run_child(*args: str) -> dict:
    result = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="3,6", help="comma-separated layer counts: one checkpoint each")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--shard-gb", type=float, default=2.0)
    parser.add_argument("--avg-bits", type=float, default=2.5)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/moeq-stream"))
    args = parser.parse_args()

    layer_bytes = 2 * (args.experts * 3 * args.hidden * args.intermediate + 2 * args.hidden * args.hidden
                       + 2 * args.hidden * (args.hidden // 4) + args.experts * args.hidden + 2 * args.hidden)
    rows, table = [], []
    for layers in (int(n) for n in args.layers.split(",")):
        folder = args.workdir / f"mixtral-{layers}x{args.hidden}x{args.intermediate}"
        if not (folder / "config.json").is_file():
            start = time.perf_counter()
            size = write_checkpoint(folder, layers, args.hidden, args.intermediate, args.experts, args.vocab, int(args.shard_gb * 1e9))
            print(f"wrote {folder} ({size / 1e9:.2f} GB) in {time.perf_counter() - start:.0f} s", flush=True)
        size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        out = args.workdir / f"out-{layers}"
        subprocess.run(["rm", "-rf", str(out)], check=True)
        stream = run_child(str(folder), str(out), str(args.avg_bits), "stream")
        memory = run_child(str(folder), str(out), str(args.avg_bits), "memory")
        expert_weights = layers * args.experts * 3 * args.hidden * args.intermediate
        stream_rate = expert_weights / stream["quantize_s"]
        memory_rate = memory["weights"] / memory["seconds"]
        bound = 2 * layer_bytes + 2**30
        out_bytes = sum(f.stat().st_size for f in out.glob("*.safetensors"))
        row = {
            "layers": layers, "checkpoint_bytes": size, "layer_bytes": layer_bytes, "output_bytes": out_bytes,
            "allocate_s": stream["allocate_s"], "quantize_s": stream["quantize_s"],
            "peak_rss": stream["peak_rss"], "import_rss": stream["import_rss"], "rss_bound": bound,
            "stream_weights_per_s": stream_rate, "memory_weights_per_s": memory_rate, "page_cache": "warm",
        }
        rows.append(row)
        table.append([layers, f"{size / 1e9:.2f}", f"{out_bytes / 1e9:.2f}", f"{stream['allocate_s']:.1f}", f"{stream['quantize_s']:.1f}",
                      f"{stream['peak_rss'] / 2**30:.2f}", f"{(stream['peak_rss'] - stream['import_rss']) / 2**30:.2f}",
                      f"{bound / 2**30:.2f}", f"{stream_rate / 1e6:.1f}", f"{memory_rate / 1e6:.1f}", f"{memory_rate / stream_rate:.2f}"])
        print_table(["layers", "ckpt GB", "out GB", "alloc s", "quant s", "peak RSS GiB", "above import", "bound GiB",
                     "stream Mw/s", "in-mem Mw/s", "in-mem/stream"], table)
    path = write_json("streaming", rows, args=vars(args) | {"workdir": str(args.workdir)})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
