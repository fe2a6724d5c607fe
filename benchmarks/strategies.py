"""Seed 000 in kind: allocation strategies compared on the trained default model.

    python benchmarks/strategies.py [--strategies ...] [--budgets ...] [--levels 3,2,1 3,2]
                                    [--quantizers rtn gptq] [--random-seeds 3] [--eval-tokens 4096]
                                    [--model DIR --seq-len 128]

The shipped default Mixtral (``moeq/data/default-mixtral``; ``--model`` takes another, e.g. the
Switch default with ``--seq-len 128``) carries its initial routers, so the router-norm change Λ is
exact. Every strategy allocates mean expert widths of 2.0, 2.25, 2.5 and
2.75 bits over the levels {3,2,1} and {3,2}; the experts are then quantized by round-to-nearest
(``moeq.quantize``, asym per output channel, 1-bit experts sign) or by GPTQ (``quantize_calibrated``);
everything else stays full precision. The calibration-based strategies (frequency, routing-weight,
pmq) and GPTQ both use the shipped calibration split; evaluation uses the test split only.

``random`` runs with several seeds and is reported as mean ± sample standard deviation. ``uniform``
has no mixed widths: it runs at every integer width of the level set and fills the budget columns
it equals (2.0 for both level sets); the fractional budgets are reported as having no uniform
equivalent. Combinations that the allocator rejects (e.g. a budget below the lowest level, or a
strategy that cannot meet a budget) are recorded with the allocator's message, not dropped.

Writes benchmarks/results/strategies.json after every row (a partial run leaves what it finished).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from _common import RESULTS, machine, print_table
import moeq
from moeq.allocate import allocate
from moeq.allocate.counts import CountError
from moeq.allocate.ilp import AllocationInfeasible
from moeq.calibrate.routing import tokenize_calibration
from moeq.calibrate.runner import CalibrationConfig, quantize_calibrated
from moeq.demo import DEFAULT_MODEL
from moeq.eval import evaluate
from moeq.eval.data import evaluation_tokens
from moeq.atomic import atomic_write_text
from moeq.io.source import load_source
from moeq.plan import PlanError
from moeq.train.corpus import DATA_DIR

STRATEGIES = ("router-maxvar", "router", "frequency", "routing-weight", "random", "uniform", "pmq")
BUDGETS = (2.0, 2.25, 2.5, 2.75)
LEVEL_SETS = ("3,2,1", "3,2")
QUANTIZERS = ("rtn", "gptq")


def _quantized(model: Path, plan, quantizer: str, calibration, work: Path):
    """The model quantized by ``plan``: in memory for RTN, a folder written by GPTQ."""
    if quantizer == "rtn":
        return moeq.quantize(load_source(model), plan)
    out = work / "gptq"
    quantize_calibrated(model, plan, calibration, out, CalibrationConfig(quantizer="gptq"), overwrite=True)
    return out


def _runs(strategies, budgets, levels: tuple[int, ...], seeds: int):
    """(strategy, seed, allocation width or budget) for one level set; uniform at its integer widths."""
    for strategy in strategies:
        if strategy == "uniform":
            for width in sorted(levels):
                yield strategy, 0, float(width)
            continue
        for bits in budgets:
            for seed in range(seeds if strategy == "random" else 1):
                yield strategy, seed, bits


def measure(model: Path, strategy, seed, bits, levels, quantizer, calibration, ids, reference, seq_len: int, work: Path) -> dict:
    """One row: allocate, quantize, evaluate; an allocation the allocator rejects is recorded as such."""
    row = {"strategy": strategy, "seed": seed, "levels": list(levels), "quantizer": quantizer, "avg_bits_requested": bits}
    started = time.perf_counter()
    try:
        plan = allocate(model, strategy, avg_bits=bits, levels=levels, calibration=calibration, seed=seed)
    except (PlanError, CountError, AllocationInfeasible) as err:
        return {**row, "impossible": str(err)}
    report = evaluate(_quantized(model, plan, quantizer, calibration, work), ids, reference=reference, seq_len=seq_len)
    widths = {(e.layer, e.expert): e.spec.bits for e in plan.experts}
    counts = {str(b): list(widths.values()).count(b) for b in levels}
    return {
        **row, "avg_expert_bits": plan.budget["avg_expert_bits"], "experts_per_width": counts,
        "perplexity": report.perplexity, "kl": report.kl_to_reference,
        "routing_agreement": sum(report.routing_agreement) / len(report.routing_agreement),
        "model_bytes": plan.budget["model_bytes"], "bytes_in_memory": report.bytes_in_memory,
        "seconds": time.perf_counter() - started,
    }


def _cell(rows: list[dict], key: str, fmt: str) -> str:
    values = [r[key] for r in rows]
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{statistics.mean(values):{fmt}}±{statistics.stdev(values):{fmt}}"


def table(rows: list[dict], levels: tuple[int, ...], quantizer: str, budgets) -> None:
    """Print one table for a (levels, quantizer): strategy x budget -> ppl / KL / routing agreement."""
    mine = [r for r in rows if tuple(r["levels"]) == levels and r["quantizer"] == quantizer]
    print(f"\nlevels {{{','.join(map(str, levels))}}}, {quantizer.upper()}: perplexity / KL to fp / routing agreement")
    lines = []
    for strategy in dict.fromkeys(r["strategy"] for r in mine):
        cells = []
        for bits in budgets:
            found = [r for r in mine if r["strategy"] == strategy and r["avg_bits_requested"] == bits]
            if not found:
                cells.append("no integer width" if strategy == "uniform" else "-")
            elif "impossible" in found[0]:
                cells.append("impossible")
            else:
                cells.append(f"{_cell(found, 'perplexity', '.2f')} / {_cell(found, 'kl', '.3f')} / {_cell(found, 'routing_agreement', '.3f')}")
        lines.append([strategy, *cells])
    print_table(["strategy", *(f"{b:g} bits" for b in budgets)], lines)
    uniform = [r for r in mine if r["strategy"] == "uniform" and "impossible" not in r and r["avg_bits_requested"] not in budgets]
    for r in uniform:
        print(f"  uniform {r['avg_bits_requested']:g} bits (brackets the budgets): {r['perplexity']:.2f} / {r['kl']:.3f} / {r['routing_agreement']:.3f}")
    for r in mine:
        if "impossible" in r:
            print(f"  impossible: {r['strategy']} at {r['avg_bits_requested']:g} bits: {r['impossible']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    parser.add_argument("--budgets", nargs="+", type=float, default=list(BUDGETS))
    parser.add_argument("--levels", nargs="+", default=list(LEVEL_SETS), help="level sets, e.g. 3,2,1 3,2")
    parser.add_argument("--quantizers", nargs="+", choices=QUANTIZERS, default=list(QUANTIZERS))
    parser.add_argument("--random-seeds", type=int, default=3)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--calib-tokens", type=int, default=8192)
    parser.add_argument("--name", default="strategies", help="results file name (without .json)")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="a trained model folder (default: the Mixtral default)")
    parser.add_argument("--seq-len", type=int, default=256, help="window of evaluation and calibration (128 for the Switch default)")
    args = parser.parse_args()
    model = args.model
    if not (model / "config.json").is_file():
        raise SystemExit(f"the trained model is missing at {model}; train it with `moeq train` first")
    level_sets = [tuple(sorted((int(b) for b in s.split(",")), reverse=True)) for s in args.levels]
    calibration = tokenize_calibration(model, DATA_DIR / "calibration.txt", args.calib_tokens, args.seq_len)
    ids = evaluation_tokens(model, None, args.eval_tokens)
    reference = load_source(model)
    fp = evaluate(reference, ids, seq_len=args.seq_len)
    setup = {"model": str(model), "eval_tokens": fp.tokens_scored, "seq_len": args.seq_len,
             "calibration_tokens": int(calibration.numel()), "full_precision_perplexity": fp.perplexity,
             "full_precision_bytes": fp.bytes_in_memory}
    print(f"full precision: perplexity {fp.perplexity:.3f} on {fp.tokens_scored} test tokens; calibration {calibration.numel()} tokens")
    rows: list[dict] = []
    path = RESULTS / f"{args.name}.json"
    with tempfile.TemporaryDirectory() as tmp:
        for quantizer in args.quantizers:
            for levels in level_sets:
                for strategy, seed, bits in _runs(args.strategies, args.budgets, levels, args.random_seeds):
                    row = measure(model, strategy, seed, bits, levels, quantizer, calibration, ids, reference, args.seq_len, Path(tmp))
                    rows.append(row)
                    print(f"[{quantizer} {levels} {strategy} s{seed} {bits:g}] "
                          + (f"impossible: {row['impossible']}" if "impossible" in row else
                             f"ppl {row['perplexity']:.3f} kl {row['kl']:.4f} agree {row['routing_agreement']:.3f} {row['seconds']:.0f}s"),
                          flush=True)
                    _save(path, setup, args, rows)
                table(rows, levels, quantizer, args.budgets)
    print(f"\nwrote {path}")


def _save(path: Path, setup: dict, args, rows: list[dict]) -> None:
    import json
    from datetime import datetime, timezone

    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(), **setup,
               "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "rows": rows}
    atomic_write_text(path, json.dumps(payload, indent=1) + "\n")


if __name__ == "__main__":
    main()
