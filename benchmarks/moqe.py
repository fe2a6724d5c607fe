"""MoQE in kind on the default model: which weights tolerate low bits, and does QAT rescue 2 bits?

    python benchmarks/moqe.py [--bits 8,4,3,2] [--schemes asym,log] [--qat-steps 100] [--qat-objectives lm,distill] [--eval-tokens 8192] [--model DIR]

Targets: ``experts`` (routed experts only, MoQE's recipe), ``attention`` (q/k/v/o only) and
``everything`` (experts + attention; the router, embeddings — tied with the LM head here — and
norms stay full precision in every row). Linear rows use ``asym`` (min-max with a zero point, the
project's default; per output channel), log rows MoQE's log-scale quantizer. Every row is RTN
(post-training); then 2-bit experts-only ``asym`` after ``--qat-steps`` of QAT (moeq.train.qat,
calibration slice as training text, scales recomputed per step), once per objective: ``lm``
(MoQE's next-token loss) and ``distill`` (KL to the full-precision model). Metrics from
:func:`moeq.eval.api.evaluate` on the test split: perplexity, KL to full precision, mean routing
agreement, bytes in memory and the reduction against full precision. Prints a table and writes
benchmarks/results/moqe.json.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import transformers

from _common import print_table, write_json
from moeq import QuantConfig, quantize
from moeq.api import plan_for
from moeq.eval.api import evaluate
from moeq.eval.data import evaluation_tokens
from moeq.train.corpus import DATA_DIR, read_split
from moeq.train.qat import QATConfig, detach_fake_quant, qat_fit

TARGETS = {
    "experts": lambda bits, scheme: QuantConfig(bits=bits, scheme=scheme),
    "attention": lambda bits, scheme: QuantConfig(bits=16, scheme=scheme, attn_bits=bits),
    "everything": lambda bits, scheme: QuantConfig(bits=bits, scheme=scheme, attn_bits=bits),
}


def _load(folder: Path) -> transformers.PreTrainedModel:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    model.set_experts_implementation("eager")
    return model.eval()


def _row(method: str, target: str, scheme: str, bits: int, model, ids, reference, fp_bytes: int, seconds: float) -> dict:
    report = evaluate(model, ids, reference=reference)
    return {"method": method, "target": target, "scheme": scheme, "bits": bits, "perplexity": report.perplexity,
            "kl": report.kl_to_reference, "routing_agreement": sum(report.routing_agreement) / len(report.routing_agreement),
            "bytes": report.bytes_in_memory, "reduction": fp_bytes / report.bytes_in_memory, "seconds": round(seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DATA_DIR / "default-mixtral")
    parser.add_argument("--bits", default="8,4,3,2")
    parser.add_argument("--schemes", default="asym,log")
    parser.add_argument("--qat-steps", type=int, default=100)
    parser.add_argument("--qat-objectives", default="lm,distill", help="QAT rows: lm (MoQE's next-token loss), distill (KL to fp)")
    parser.add_argument("--eval-tokens", type=int, default=8192)
    args = parser.parse_args()
    ids = evaluation_tokens(args.model, None, args.eval_tokens)
    reference = _load(args.model)
    fp = evaluate(reference, ids)
    rows = [{"method": "fp", "target": "none", "scheme": "-", "bits": 16, "perplexity": fp.perplexity, "kl": 0.0,
             "routing_agreement": 1.0, "bytes": fp.bytes_in_memory, "reduction": 1.0, "seconds": 0.0}]
    for scheme in args.schemes.split(","):
        for bits in [int(b) for b in args.bits.split(",")]:
            for target, config in TARGETS.items():
                started = time.perf_counter()
                model = quantize(_load(args.model), config(bits, scheme))
                rows.append(_row("ptq", target, scheme, bits, model, ids, reference, fp.bytes_in_memory, time.perf_counter() - started))
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    train_ids = torch.tensor(tokenizer(read_split("calibration"))["input_ids"], dtype=torch.long)
    qat_loss = {}
    for objective in args.qat_objectives.split(","):
        started = time.perf_counter()
        model = _load(args.model)
        dtype = next(model.parameters()).dtype
        plan = plan_for(model, QuantConfig(bits=2, scheme="asym"))
        config = QATConfig(steps=args.qat_steps, objective=objective)
        qat_fit(model.float(), plan, train_ids, config, dtype)
        model = quantize(detach_fake_quant(model).to(dtype), plan)
        rows.append(_row(f"qat-{objective}-{args.qat_steps}", "experts", "asym", 2, model, ids, reference, fp.bytes_in_memory,
                         time.perf_counter() - started))
        qat_loss[objective] = [config.log[0], config.log[-1]]
    print_table(["method", "target", "scheme", "bits", "ppl", "KL", "route agr", "bytes", "x smaller", "s"],
                [[r["method"], r["target"], r["scheme"], r["bits"], f"{r['perplexity']:.2f}", f"{r['kl']:.4f}",
                  f"{r['routing_agreement']:.3f}", f"{r['bytes']:,}", f"{r['reduction']:.2f}", r["seconds"]] for r in rows])
    path = write_json("moqe", rows, model=str(args.model), eval_tokens=int(ids.numel()), qat_loss=qat_loss)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
