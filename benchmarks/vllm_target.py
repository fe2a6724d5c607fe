"""What vLLM's one-scheme-per-MoE-layer rule costs, measured: plans for ``--target vllm`` against
moeq's own width-per-expert plans at the same bytes, and the uniform W4A16 people deploy.

    python benchmarks/vllm_target.py [--budgets 5.0 6.2 7.0] [--quantizer gptq] [--calib-tokens 32768]
                                     [--eval-tokens 8192] [--group-size 128] [--scheme sym]

On the trained default Mixtral: for each budget (bits per routed expert weight in the exported
file), ``auto`` plans for vLLM (W4A16 / W8A16 ``--scheme`` g``--group-size``, one scheme per MoE
layer), then ``auto`` plans for moeq's own runtime with the same two widths per expert, within the
vLLM plan's model bytes; both are quantized the same way (GPTQ on the calibration split by default)
and evaluated on the test split: KL to the full-precision model and perplexity. ``uniform W4`` is
every expert at W4A16, the usual vLLM deployment. The ratio column is KL(vLLM plan) / KL(moeq
plan): what the runtime's rule costs at equal bytes. The vLLM plans are also exported with
``moeq export --format compressed-tensors`` to check the file's expert bytes are the plan's.

Writes benchmarks/results/vllm_target.json.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from safetensors.torch import load_file

from _common import machine, print_table, write_json
import moeq
from moeq.allocate import AllocationConfig, allocate
from moeq.calibrate.routing import tokenize_calibration
from moeq.calibrate.runner import CalibrationConfig, quantize_calibrated
from moeq.demo import DEFAULT_MODEL
from moeq.eval import evaluate
from moeq.eval.data import evaluation_tokens
from moeq.export import export_compressed
from moeq.io.source import load_source
from moeq.io.streaming import quantize_checkpoint
from moeq.train.corpus import DATA_DIR


def _quantize(plan, quantizer: str, calibration, out: Path) -> Path:
    if quantizer == "gptq":
        quantize_calibrated(DEFAULT_MODEL, plan, calibration, out, CalibrationConfig(), overwrite=True)
    else:
        quantize_checkpoint(DEFAULT_MODEL, plan, out, overwrite=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", type=float, nargs="+", default=[5.0, 6.2, 7.0])
    parser.add_argument("--quantizer", choices=("rtn", "gptq"), default="gptq")
    parser.add_argument("--calib-tokens", type=int, default=32768)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--scheme", default="sym")
    args = parser.parse_args()

    calibration = tokenize_calibration(DEFAULT_MODEL, DATA_DIR / "calibration.txt", args.calib_tokens, 256)
    ids = evaluation_tokens(DEFAULT_MODEL, None, args.eval_tokens)
    reference = load_source(DEFAULT_MODEL)
    base = AllocationConfig("auto", scheme=args.scheme, group_size=args.group_size, damage_quantizer=args.quantizer,
                            calib_tokens=args.calib_tokens, seq_len=256)
    rows, table = [], []
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)

        def measure(name: str, plan, budget) -> dict:
            started = time.perf_counter()
            folder = _quantize(plan, args.quantizer, calibration, work / name)
            report = evaluate(folder, ids, reference=reference)
            row = {"budget": budget, "plan": name, "bits_per_expert_weight": plan.budget["expert_bits_per_weight"],
                   "model_bytes": plan.budget["model_bytes"], "kl": report.kl_to_reference, "perplexity": report.perplexity,
                   "predicted_damage": plan.budget.get("predicted_damage"), "seconds": time.perf_counter() - started}
            if plan.method.get("target", {}).get("name") == "vllm":
                exported = export_compressed(folder, work / f"{name}-ct", overwrite=True)
                tensors = load_file(work / f"{name}-ct" / "model.safetensors")
                row["file_expert_bytes"] = sum(t.nbytes for key, t in tensors.items() if ".experts." in key)
                row["plan_expert_bytes"] = plan.budget["expert_bytes"]
                row["groups"] = exported.groups
            rows.append(row)
            write_json("vllm_target", rows, machine=machine(), args=vars(args))
            return row

        uniform = allocate(DEFAULT_MODEL, avg_bits=4, config=AllocationConfig("uniform", scheme=args.scheme,
                                                                                 group_size=args.group_size, target="vllm"))
        w4 = measure("uniform W4", uniform, "W4")
        table.append(["uniform W4", f"{w4['bits_per_expert_weight']:.3f}", f"{w4['kl']:.4f}", "-", f"{w4['perplexity']:.3f}", "-"])
        for budget in args.budgets:
            vllm = allocate(DEFAULT_MODEL, avg_bits=budget, calibration=calibration,
                            config=replace(base, target="vllm"))
            free = allocate(DEFAULT_MODEL, max_bytes=vllm.budget["model_bytes"], calibration=calibration,
                            config=replace(base, levels=(8, 4)))
            ours = measure(f"vllm {budget:g}", vllm, budget)
            theirs = measure(f"moeq {budget:g}", free, budget)
            table.append([f"{budget:g}", f"{ours['bits_per_expert_weight']:.3f} / {theirs['bits_per_expert_weight']:.3f}",
                          f"{ours['kl']:.4f}", f"{theirs['kl']:.4f}",
                          f"{ours['perplexity']:.3f} / {theirs['perplexity']:.3f}", f"{ours['kl'] / theirs['kl']:.2f}x"])
    print_table(["budget", "bits/weight vllm / moeq", "KL vllm plan", "KL moeq plan", "ppl vllm / moeq", "KL ratio"], table)


if __name__ == "__main__":
    main()
