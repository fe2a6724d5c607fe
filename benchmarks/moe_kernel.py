"""Quantized MoE experts against bf16 experts at Mixtral-8x7B layer shapes, and generation on the default model.

    python benchmarks/moe_kernel.py [--device cuda|cpu] [--scale 1] [--tokens 1,8,64,512,4096]
        [--repeats 20] [--bandwidth-gbs N] [--threads N] [--part layer|generate|both|sweep] [--backend auto]

Layer part: one MoE layer (hidden 4096, intermediate 14336, 8 experts, top-2; every dimension
divided by ``--scale``) with random packed codes (asym, group 128) at uniform 4 bits, uniform 2
bits and mixed 3/2/1 bits at 2.5 average (expert widths 3,3,3,3,3,2,2,1; 1 bit is ``sign``),
routed the same way for the quantized layer (``moe_experts_forward``, ``--backend``, default
``auto``: Triton on CUDA, the CPU path on CPU; and backend ``reference``) and for bf16 experts (the torch reference
loop on dense weights).
Fastest wall time of ``--repeats`` calls after warm-up (the machine may be shared); bytes/s counts the packed bytes (codes,
scales, zero points) of the experts the routing actually reads, against ``--bandwidth-gbs``
(default: 3350 for an H100 SXM, 4800 for an H200, a measured large-copy bandwidth on CPU).
On CUDA the share of time in the two ``_moe_gemm`` launches comes from torch.profiler.
Writes benchmarks/results/moe_kernel_<device>.json.

``--part check`` (Triton): the kernels against the torch reference for every width 1-8, each
scheme, a finer group and whole rows, and a layer mixing them, at ``--tokens``, in float32,
float16 and bfloat16 (writes benchmarks/results/moe_kernel_check_<device>.json).

``--part sweep`` (Triton): the same layer at uniform 4 and mixed 2.5 bits, timed with the shipped
tile configuration and with each candidate of a small grid (decode: BLOCK_N, BLOCK_K, split-K;
prefill: BLOCK_M, BLOCK_N, warps, pipeline stages); prints the best per token count and writes
benchmarks/results/moe_kernel_sweep_<device>.json.

``--part generate``: on src/moeq/data/default-mixtral, in a fresh process each, greedy generation of
64 tokens (batch 1, 32-token prompt; fastest of three) by the full-precision model and by moeq-quantized copies
(uniform 4 bits; ``router-maxvar`` 2.5 bits over levels 3,2,1) with the reference, ``cpu`` and
``cpu-int4`` backends: tokens/s, resident memory after loading and after generating (which
includes the ``cpu-int4`` copy built by the warm-up) above the post-import baseline, the peak
during the timed generation above the resident memory when it started (VmHWM, reset through
/proc/self/clear_refs), and the packed experts' bytes. Writes benchmarks/results/moe_generate.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import print_table, timed, write_json

from moeq.kernels import BACKENDS, moe_experts_forward
from moeq.kernels.reference import experts_forward_reference
from moeq.modules.convert import rtn_quantizer
from moeq.modules.experts import QuantizedExperts
from moeq.plan import TensorSpec

EXPERTS, TOP_K, GROUP = 8, 2, 128
CONFIGS = {"uniform4": [4] * 8, "uniform2": [2] * 8, "mixed2.5": [3, 3, 3, 3, 3, 2, 2, 1]}
PEAK_GBS = {"H100": 3350.0, "H200": 4800.0}
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def spec_for(bits: int) -> TensorSpec:
    return TensorSpec(bits, "sign" if bits == 1 else "asym", GROUP)


def random_layer(widths: list[int], hidden: int, inter: int, device: str) -> QuantizedExperts:
    """A gated layer of random packed codes, scales about what real weights get, zero points mid-range."""
    shapes = {"gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
    specs = {(e, p): spec_for(widths[e]) for e in range(EXPERTS) for p in PROJECTIONS}
    layer = QuantizedExperts(EXPERTS, shapes, specs, F.silu, gated=True, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    for e in range(EXPERTS):
        for p in PROJECTIONS:
            linear = layer.expert(e)[p]
            linear.codes = torch.randint(0, 256, linear.codes.shape, dtype=torch.uint8, generator=g)
            linear.scales = (torch.rand(linear.scales.shape, generator=g) * 0.01 + 0.001).to(linear.scales.dtype)
            if linear.zeros is not None:
                linear.zeros = torch.full(linear.zeros.shape, (1 << widths[e]) // 2, dtype=torch.uint8)
    return layer.to(device)


def dense_weights(hidden: int, inter: int, device: str) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    shapes = [(inter, hidden), (inter, hidden), (hidden, inter)]
    return [[(torch.randn(s, generator=g) * 0.02).to(torch.bfloat16).to(device) for s in shapes] for _ in range(EXPERTS)]


def pick(dense: list[list[torch.Tensor]], expert: int, dtype: torch.dtype) -> list[torch.Tensor]:
    return dense[expert]


def kernel_share(fn, total_s: float) -> float:
    """Fraction of one call's wall time spent inside the ``_moe_gemm`` CUDA kernels."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernel_us = sum(e.device_time_total for e in prof.key_averages() if "_moe_gemm" in e.key)
    return kernel_us * 1e-6 / total_s


def copy_bandwidth_gbs(device: str) -> float:
    """Achieved bandwidth of a 256 MiB copy (read + write), the CPU's practical limit."""
    src = torch.empty(64 << 20, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    seconds = timed(lambda: dst.copy_(src), 5, device)
    return 2 * src.numel() * 4 / seconds / 1e9


def read_bytes(layer: QuantizedExperts, used: set[int]) -> int:
    return sum(layer.expert(e)[p].quantized.nbytes for e in used for p in PROJECTIONS)


def layer_rows(args, peak_gbs: float) -> list[dict]:
    hidden, inter = 4096 // args.scale, 14336 // args.scale
    dense = dense_weights(hidden, inter, args.device)
    rows = []
    for name, widths in CONFIGS.items():
        layer = random_layer(widths, hidden, inter, args.device)
        for tokens in args.tokens:
            g = torch.Generator().manual_seed(tokens)
            x = torch.randn(tokens, hidden, generator=g).to(torch.bfloat16).to(args.device)
            index = torch.stack([torch.randperm(EXPERTS, generator=g)[:TOP_K] for _ in range(tokens)]).to(args.device)
            weights = torch.rand(tokens, TOP_K, generator=g).to(torch.bfloat16).to(args.device)

            quant = partial(moe_experts_forward, x, index, weights, layer, backend=args.backend)
            reference = partial(moe_experts_forward, x, index, weights, layer, backend="reference")
            bf16 = partial(experts_forward_reference, x, index, weights, EXPERTS, partial(pick, dense), F.silu, True)
            t_q, t_bf16 = timed(quant, args.repeats, args.device), timed(bf16, args.repeats, args.device)
            t_ref = timed(reference, args.repeats, args.device)
            expected = reference().float()
            error = float((quant().float() - expected).abs().max() / expected.abs().max().clamp_min(1e-30))
            moved = read_bytes(layer, set(index.unique().tolist()))
            gbs = moved / t_q / 1e9
            rows.append({
                "config": name, "backend": args.backend, "avg_bits": sum(widths) / len(widths), "tokens": tokens,
                "quant_ms": round(t_q * 1e3, 3), "bf16_ms": round(t_bf16 * 1e3, 3),
                "reference_ms": round(t_ref * 1e3, 3),
                "speedup": round(t_bf16 / t_q, 2), "packed_GB/s": round(gbs, 3),
                "of_peak": round(gbs / peak_gbs, 3),
                "kernel_share": round(kernel_share(quant, t_q), 3) if args.device == "cuda" else None,
                "max_rel_err": float(f"{error:.3g}"),  # against the torch reference, relative to its largest output
            })
            print(rows[-1], flush=True)
    return rows


CHILD = r"""
import json, sys, time, torch
import moeq
from moeq.io.source import load_source
from moeq.modules.convert import rtn_quantizer
from moeq.modules.experts import QuantizedExperts

def rss_kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])

path, backend = sys.argv[1], sys.argv[2]
torch.set_num_threads(int(sys.argv[3]))
base = rss_kb("VmRSS")
model = load_source(path) if backend == "full" else moeq.load(path)
experts = [m for m in model.modules() if isinstance(m, QuantizedExperts)]
for m in experts:
    m.backend = backend
packed = sum(l.quantized.nbytes for m in experts for l in m.modules() if hasattr(l, "quantized"))
loaded = rss_kb("VmRSS")
prompt = torch.randint(1, model.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    model.generate(prompt, max_new_tokens=4, do_sample=False, min_new_tokens=4)
    before = rss_kb("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")  # restart the high-water mark: peak of this generation only
    seconds = []
    for _ in range(3):  # the fastest of three, the least disturbed by other load
        start = time.perf_counter()
        model.generate(prompt, max_new_tokens=64, do_sample=False, min_new_tokens=64)
        seconds.append(time.perf_counter() - start)
print(json.dumps({"tokens_per_s": round(64 / min(seconds), 1), "loaded_MB": round((loaded - base) / 1024, 1),
                  "resident_after_MB": round((rss_kb("VmRSS") - base) / 1024, 1),
                  "generate_peak_above_start_MB": round((rss_kb("VmHWM") - before) / 1024, 2), "packed_experts_MB": round(packed / 2**20, 2)}))
"""


def generation_rows(threads: int) -> list[dict]:
    import moeq
    from moeq.io.source import load_source

    source = Path(__file__).resolve().parents[1] / "src/moeq/data/default-mixtral"
    rows = []
    with tempfile.TemporaryDirectory() as work:
        folders = {"full precision": (source, ["full"])}
        for name, config in {"uniform 4": moeq.QuantConfig(bits=4), "mixed 2.5": None}.items():
            if config is None:
                config = moeq.allocate(source, "router-maxvar", avg_bits=2.5, levels=(3, 2, 1))
            folder = Path(work) / name.replace(" ", "")
            moeq.save(moeq.quantize(load_source(source), config), folder)
            folders[name] = (folder, ["reference", "cpu", "cpu-int4"])
        for name, (folder, backends) in folders.items():
            for backend in backends:
                result = subprocess.run([sys.executable, "-c", CHILD, str(folder), backend, str(threads)], capture_output=True, text=True, check=True)
                rows.append({"model": name, "backend": backend, **json.loads(result.stdout.strip().splitlines()[-1])})
                print(rows[-1], flush=True)
    return rows


# --part check: every width and scheme the layout serves, one uniform layer each, then all mixed.
CHECK_SPECS = [TensorSpec(1, "sign", GROUP), TensorSpec(1, "asym", GROUP), *(TensorSpec(b, "asym", GROUP) for b in range(2, 9)),
               TensorSpec(4, "sym", GROUP), TensorSpec(3, "log", GROUP), TensorSpec(4, "asym", 32), TensorSpec(4, "asym", None)]


def check_rows(args) -> list[dict]:
    """The Triton backend against the torch reference for every width and scheme (and a layer mixing
    them), decode- and prefill-shaped, in float32, float16 and bfloat16: the compiled kernels'
    correctness, which the tests show only for the CPU interpreter. Error: max |kernel - reference| over
    max |reference|, where the reference runs in the same dtype."""
    hidden, inter = 4096 // args.scale, 14336 // args.scale
    shapes = {"gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
    layers = {f"{s.bits}{s.scheme.value}{s.group_size or ''}": [s] * EXPERTS for s in CHECK_SPECS}
    layers["mixed"] = [CHECK_SPECS[i % len(CHECK_SPECS)] for i in range(EXPERTS)]
    rows = []
    for name, specs in layers.items():
        layer = QuantizedExperts(EXPERTS, shapes, {(e, p): specs[e] for e in range(EXPERTS) for p in PROJECTIONS}, F.silu, gated=True)
        g = torch.Generator().manual_seed(0)
        for e in range(EXPERTS):
            for p in PROJECTIONS:
                weight = torch.randn(shapes[p], generator=g) * 0.02
                layer.expert(e)[p].load_quantized(rtn_quantizer(weight, specs[e], torch.float16))
        layer = layer.to(args.device)
        for tokens in args.tokens:
            x = torch.randn(tokens, hidden, generator=g).to(args.device)
            index = torch.stack([torch.randperm(EXPERTS, generator=g)[:TOP_K] for _ in range(tokens)]).to(args.device)
            weights = torch.rand(tokens, TOP_K, generator=g).to(args.device)
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                inputs = (x.to(dtype), index, weights.to(dtype), layer)
                expected = moe_experts_forward(*inputs, backend="reference").float()
                got = moe_experts_forward(*inputs, backend="triton").float()
                error = float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-30))
                rows.append({"layer": name, "tokens": tokens, "dtype": str(dtype).removeprefix("torch."), "max_rel_err": float(f"{error:.3g}")})
                print(rows[-1], flush=True)
    return rows


# Tile candidates for --part sweep (decode-shaped: few slots; prefill-shaped: many).
DECODE_CANDIDATES = [{"BLOCK_M": 16, "BLOCK_N": n, "BLOCK_K": k, "SPLIT_K": split, "num_warps": 4}
                     for n in (32, 64) for k in (64, 128) for split in (2, 4, 8)]
PREFILL_CANDIDATES = [{"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": 64, "SPLIT_K": 1, "num_warps": w, "num_stages": stages}
                      for m in (64, 128) for n in (64, 128) for w, stages in ((4, 3), (8, 3), (8, 4))]


def sweep_rows(args, peak_gbs: float) -> list[dict]:
    """Every tile candidate against the shipped ``launch_config``, per width config and token count.

    A candidate's SPLIT_K applies to the down launch only (the first launch's epilogue needs whole
    sums). Rows carry the error against the torch reference, so a wrong candidate shows."""
    from moeq.kernels import triton_moe

    hidden, inter = 4096 // args.scale, 14336 // args.scale
    shipped = triton_moe.launch_config
    rows = []
    for name in ("uniform4", "mixed2.5"):
        layer = random_layer(CONFIGS[name], hidden, inter, args.device)
        for tokens in args.tokens:
            g = torch.Generator().manual_seed(tokens)
            x = torch.randn(tokens, hidden, generator=g).to(torch.bfloat16).to(args.device)
            index = torch.stack([torch.randperm(EXPERTS, generator=g)[:TOP_K] for _ in range(tokens)]).to(args.device)
            weights = torch.rand(tokens, TOP_K, generator=g).to(torch.bfloat16).to(args.device)
            run = partial(moe_experts_forward, x, index, weights, layer, backend="triton")
            expected = moe_experts_forward(x, index, weights, layer, backend="reference").float()
            moved = read_bytes(layer, set(index.unique().tolist()))
            decode = tokens * TOP_K <= triton_moe.DECODE_SLOTS
            for candidate in [None, *(DECODE_CANDIDATES if decode else PREFILL_CANDIDATES)]:
                if candidate is not None:
                    triton_moe.launch_config = lambda slots, n, launch, c=candidate: {**c, "SPLIT_K": c["SPLIT_K"] if launch == "down" else 1}
                label = "shipped" if candidate is None else ",".join(f"{k}={v}" for k, v in candidate.items())
                try:
                    seconds = timed(run, args.repeats, args.device)
                    error = float((run().float() - expected).abs().max() / expected.abs().max().clamp_min(1e-30))
                except Exception as failure:  # e.g. a candidate needing more shared memory than the GPU has
                    print(f"{name} {tokens} {label}: {type(failure).__name__}: {failure}", flush=True)
                    continue
                finally:
                    triton_moe.launch_config = shipped
                rows.append({"config": name, "tokens": tokens, "tiles": label, "ms": round(seconds * 1e3, 4),
                             "of_peak": round(moved / seconds / 1e9 / peak_gbs, 3), "max_rel_err": float(f"{error:.3g}")})
                print(rows[-1], flush=True)
    best = []
    for name in ("uniform4", "mixed2.5"):
        for tokens in args.tokens:
            mine = [r for r in rows if r["config"] == name and r["tokens"] == tokens]
            if not mine or mine[0]["tiles"] != "shipped":
                continue
            fastest = min(mine, key=lambda r: r["ms"])
            best.append([name, tokens, mine[0]["ms"], fastest["ms"], round(mine[0]["ms"] / fastest["ms"], 2), fastest["tiles"]])
    print_table(["config", "tokens", "shipped ms", "best ms", "gain", "best tiles"], best)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--scale", type=int, default=1, help="divide hidden and intermediate sizes by this")
    parser.add_argument("--tokens", default="1,8,64,512,4096", type=lambda s: [int(t) for t in s.split(",")])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--bandwidth-gbs", type=float, default=None)
    parser.add_argument("--backend", default="auto", choices=BACKENDS, help="the quantized layer's backend (layer part)")
    parser.add_argument("--part", default="layer", choices=["layer", "generate", "both", "sweep", "check"],
                        help="generate: the default model (CPU); sweep: Triton tile candidates against the shipped ones; "
                             "check: Triton against the reference at every width, scheme and dtype")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 steadies timings on a shared machine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda":
        name = torch.cuda.get_device_name()
        device_name = name
        peak = args.bandwidth_gbs or next((v for k, v in PEAK_GBS.items() if k in name), None)
        if peak is None:
            parser.error(f"no known memory bandwidth for {name}; pass --bandwidth-gbs")
    else:
        device_name = "cpu"
        peak = args.bandwidth_gbs or copy_bandwidth_gbs("cpu")
    if args.part in ("layer", "both"):
        rows = layer_rows(args, peak)
        headers = list(rows[0])
        print(f"\n{device_name}, peak {peak:.0f} GB/s, hidden {4096 // args.scale}, intermediate {14336 // args.scale}")
        print_table(headers, [[r[h] for h in headers] for r in rows])
        path = write_json(f"moe_kernel_{args.device}", rows, device=device_name, peak_gbs=peak, scale=args.scale)
        print(f"wrote {path}")
    if args.part == "check":
        rows = check_rows(args)
        worst = {}
        for r in rows:
            worst[r["dtype"]] = max(worst.get(r["dtype"], 0.0), r["max_rel_err"])
        print("worst max_rel_err per dtype:", worst)
        print(f"wrote {write_json(f'moe_kernel_check_{args.device}', rows, device=device_name, scale=args.scale)}")
    if args.part == "sweep":
        rows = sweep_rows(args, peak)
        print(f"wrote {write_json(f'moe_kernel_sweep_{args.device}', rows, device=device_name, peak_gbs=peak, scale=args.scale)}")
    if args.part in ("generate", "both"):
        gen = generation_rows(torch.get_num_threads())
        headers = list(gen[0])
        print_table(headers, [[r[h] for h in headers] for r in gen])
        print(f"wrote {write_json('moe_generate', gen)}")


if __name__ == "__main__":
    main()
