"""Which transformers MoE model types moeq reads: every type of the installed transformers whose
modeling uses the experts interface, run through moeq as the suite does, and README's list
written from the result.

    python benchmarks/families.py            # table, benchmarks/results/families.json, README.md's list

Each causal-LM type is built tiny from its own config class (tests/models/families.py), quantized
at 3 bits, saved, and read back with moeq.load, with transformers' from_pretrained and by
quantizing its saved checkpoint block by block (tests/models/test_every_family.py holds the same
steps to the same results); a type passes when all of that gives the in-memory quantized logits.
Each type that passes is then exported as compressed-tensors (vLLM's format) at 4 bits and read
back by transformers' loader (tests/export/test_every_family_exports.py). README.md's block between ``<!-- families:begin -->`` and ``<!-- families:end -->`` is replaced.
"""

from __future__ import annotations

import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _common import print_table, write_json  # noqa: E402

from tests.models.families import UNSUPPORTED, check_compressed_export, check_family, experts_interface_types  # noqa: E402


def main() -> None:
    import transformers
    from moeq.export.gguf_arch import ARCHITECTURES

    types = experts_interface_types()
    rows = []
    for entry in types:
        row = {"model_type": entry.model_type, "causal_lm": entry.causal_lm}
        if entry.causal_lm is None:
            rows.append({**row, "result": "no causal LM", "why": entry.reason})
            continue
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as folder:
            try:
                row.update(check_family(entry.model_type, Path(folder)), result="passes")
            except Exception as err:  # noqa: BLE001 - recorded: this is what the table reports
                row.update(result="refused" if entry.model_type in UNSUPPORTED else "FAILS", why=" ".join(str(err).split())[:200])
        row["seconds"] = round(time.perf_counter() - started, 1)
        if row["result"] == "passes":
            with tempfile.TemporaryDirectory() as folder:
                try:
                    check_compressed_export(entry.model_type, Path(folder))
                    row["compressed_tensors"] = "exports"
                except Exception as err:  # noqa: BLE001 - recorded, as above
                    row["compressed_tensors"] = "refused: " + " ".join(str(err).split())[:200]
        rows.append(row)
        print(f"{entry.model_type}: {row['result']}", flush=True)
    causal = [r for r in rows if r["causal_lm"]]
    print_table(["model type", "result", "MoE layers", "own gate", "error vs fp", "s", "compressed-tensors", "why"],
                [[r["model_type"], r["result"], r.get("moe_layers", ""), r.get("own_gate", ""),
                  f"{r['error_vs_fp']:.3f}" if "error_vs_fp" in r else "", r["seconds"], r.get("compressed_tensors", "")[:12],
                  r.get("why", "")[:80]] for r in causal])
    passing = sorted(r["model_type"] for r in causal if r["result"] == "passes")
    refused = [r for r in causal if r["result"] != "passes"]
    exported = sorted(r["model_type"] for r in causal if r.get("compressed_tensors") == "exports")
    fused = sorted(r["model_type"] for r in causal if r.get("compressed_tensors", "").startswith("refused"))
    print(f"{len(passing)} of {len(causal)} causal-LM types pass; {len(types) - len(causal)} more have no causal-LM class")
    write_json("families", rows, transformers=transformers.__version__, passing=len(passing), causal_lm_types=len(causal))
    block = (
        f"Read and tested ({len(passing)} of the {len(causal)} causal-LM model types of transformers {transformers.__version__} "
        f"that use its experts interface): {', '.join(f'`{t}`' for t in passing)}.\n\n"
        + (f"Not yet ({len(refused)}, each refused in one line): "
           + "; ".join(f"`{r['model_type']}` ({r.get('why', '')[:80]})" for r in refused) + ".\n\n" if refused else "")
        + f"Exported for vLLM (`moeq export --format compressed-tensors`, read back by transformers' compressed-tensors loader "
        f"to moeq's logits; {len(exported)} types): {', '.join(f'`{t}`' for t in exported)}. Refused in one line, their "
        f"checkpoints keeping each layer's experts fused ({len(fused)}): {', '.join(f'`{t}`' for t in fused)}. "
        f"GGUF (llama.cpp) export, each run by llama.cpp in tests/export/test_gguf.py: {', '.join(f'`{t}`' for t in sorted(ARCHITECTURES))}; "
        "the others are refused in one line.\n"
    )
    readme = ROOT / "README.md"
    text = readme.read_text()
    new = re.sub(r"(<!-- families:begin -->\n).*?(<!-- families:end -->)", lambda m: m.group(1) + block + m.group(2), text, flags=re.S)
    if new == text and block not in text:
        raise SystemExit("README.md has no <!-- families:begin --> ... <!-- families:end --> block to write the list into")
    readme.write_text(new)


if __name__ == "__main__":
    main()
