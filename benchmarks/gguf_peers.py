"""moeq's GGUF files against llama.cpp's own quantizer, measured in llama.cpp's own harness.

    python benchmarks/gguf_peers.py --llama-cpp /path/to/llama.cpp/build/bin [--ctx 256]
        [--types Q2_K,Q3_K_S,Q3_K_M,Q4_K_M,IQ2_XS,IQ3_XXS,Q4_0] [--calib-tokens 16384] [--work DIR]

llama.cpp's tools (``llama-quantize``, ``llama-imatrix``, ``llama-perplexity``, ``llama-bench``)
come from a build of the llama.cpp that the ``llama-cpp-python`` 0.3.36 sdist vendors (cmake +
gcc, offline, about 30 minutes on 2 cores; keep it outside the repository)::

    cmake -S vendor/llama.cpp -B build -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF
    cmake --build build -j 2 --target llama-quantize llama-perplexity llama-bench llama-imatrix

On the shipped default Mixtral, only the routed experts are quantized and everything else stays
F16 (MoQE's recipe, and how both sides are run here):

1. the F16 reference: ``moeq quantize --bits 16`` then ``moeq export --float-type F16`` (moeq's
   exporter is what turns the checkpoint into GGUF; llama.cpp's converter needs sentencepiece for
   this architecture, which is not installed here);
2. llama.cpp: ``llama-imatrix`` on the calibration split, then ``llama-quantize --imatrix`` of the
   F16 file to each ``--types`` (attention, embeddings and output kept F16 with
   ``--tensor-type``/``--token-embedding-type``/``--output-tensor-type``);
3. moeq at the same expert bytes as each llama.cpp file: ``moeq quantize --target gguf --strategy
   auto --quantizer gptq --act-order --calib <calibration split> --avg-bits B`` (B = that file's
   expert bits per weight; ``--no-act-order`` drops the flag) then ``moeq export``; where B is
   below the smallest file the default levels (6 to 2 bits) can write for this model (the down
   projections' 384 inputs fit no K-quant, so they are at least Q4_0), again with ``--levels
   6,5,4,3,2,1`` (Q1_0 at 1 bit), and the row says which;
4. every file: ``llama-perplexity --kl-divergence`` against the F16 file's logits on the test split
   (context ``--ctx``), and ``llama-bench`` prompt and generation tokens/s at 1 and 2 threads.

Expert bits per weight are counted from the files (bytes of the ``*_exps`` tensors x 8 / weights).
Writes benchmarks/results/gguf_peers.json; ``--speed-only --work DIR`` re-measures llama-bench on
every file of an earlier run (for a quiet machine) into gguf_peers_speed.json; ``--reuse`` keeps the
F16 file, its logits and the importance matrix an earlier run left in ``--work``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import gguf

from _common import print_table, write_json

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "src" / "moeq" / "data"
MODEL = DATA / "default-mixtral"
MOEQ = Path(sys.executable).parent / "moeq"  # the command of the environment running this script
KEEP_F16 = ("attn_q", "attn_k", "attn_v", "attn_output")


def run(command: list[str], log: Path) -> str:
    started = time.perf_counter()
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True)
    log.write_text(result.stdout + result.stderr)
    if result.returncode:
        raise SystemExit(f"{command[0]} failed ({result.returncode}); see {log}")
    return result.stdout + result.stderr + f"\n__seconds {time.perf_counter() - started:.1f}"


def expert_bits(path: Path) -> float:
    reader = gguf.GGUFReader(path)
    nbytes = weights = 0
    for tensor in reader.tensors:
        if tensor.name.endswith("_exps.weight"):
            nbytes += int(tensor.n_bytes)
            weights += int(tensor.n_elements)
    return nbytes * 8 / weights


def expert_types(path: Path) -> str:
    counts: dict[str, int] = {}
    for tensor in gguf.GGUFReader(path).tensors:
        if tensor.name.endswith("_exps.weight"):
            counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + 1
    return " ".join(f"{n}x{name}" for name, n in sorted(counts.items()))


def kl_divergence(bin_dir: Path, model: Path, base: Path, ctx: int, log: Path) -> tuple[float, float]:
    out = run([bin_dir / "llama-perplexity", "-m", model, "-f", DATA / "test.txt", "-c", ctx, "-t", "2",
               "--kl-divergence-base", base, "--kl-divergence"], log)
    kld = float(re.search(r"Mean\s+KLD:\s+([0-9.eE+-]+)", out).group(1))
    ppl = float(re.search(r"Mean PPL\(Q\)\s*:\s*([0-9.eE+-]+)", out).group(1))
    return kld, ppl


def speed(bin_dir: Path, model: Path, log: Path) -> dict[str, float]:
    out = run([bin_dir / "llama-bench", "-m", model, "-t", "1,2", "-p", "128", "-n", "64", "-r", "3", "-o", "json"], log)
    rows = json.loads(out[out.index("["): out.rindex("]") + 1])
    result = {}
    for row in rows:
        kind = "prompt" if row.get("n_prompt") else "gen"
        result[f"{kind}_t{row['n_threads']}"] = round(float(row["avg_ts"]), 1)
    return result


WITH_ONE_BIT = "6,5,4,3,2,1"  # the GGUF target's levels with Q1_0, for sizes the default levels cannot reach


def moeq_file(work: Path, bits: float, calib_tokens: int, act_order: bool, log: Path) -> tuple[Path | None, str]:
    """moeq's file at ``bits`` expert bits per weight, and the levels it was planned with."""
    folder, path = work / f"moeq-{bits:.4f}", work / f"moeq-{bits:.4f}.gguf"
    for levels in ("default", WITH_ONE_BIT):
        try:
            run([MOEQ, "quantize", MODEL, "--out", folder, "--target", "gguf", "--strategy", "auto", "--quantizer", "gptq",
                 "--calib", DATA / "calibration.txt", "--calib-tokens", calib_tokens, "--seq-len", 256, "--avg-bits", f"{bits:.4f}",
                 *(["--act-order"] if act_order else []), *([] if levels == "default" else ["--levels", levels]), "--overwrite"], log)
            break
        except SystemExit:
            if "impossible" not in log.read_text():
                raise
    else:
        return None, ""
    run([MOEQ, "export", folder, "--out", path, "--overwrite"], log.with_suffix(".export.log"))
    return path, levels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-cpp", type=Path, default=Path(os.environ.get("LLAMA_CPP_BIN", "/work/llama.cpp/build/bin")))
    parser.add_argument("--types", default="Q2_K,Q3_K_S,Q3_K_M,Q4_K_M,IQ2_XS,IQ3_XXS,Q4_0")
    parser.add_argument("--ctx", type=int, default=256)
    parser.add_argument("--calib-tokens", type=int, default=131072)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--no-speed", action="store_true")
    parser.add_argument("--reuse", action="store_true", help="keep the F16 file, base logits and imatrix already in --work")
    parser.add_argument("--name", default="gguf_peers", help="results file benchmarks/results/NAME.json")
    parser.add_argument("--no-act-order", action="store_true", help="moeq's GPTQ in column order (default: --act-order)")
    parser.add_argument("--speed-only", action="store_true",
                        help="only llama-bench every .gguf file already in --work (on a quiet machine), into gguf_peers_speed.json")
    args = parser.parse_args()
    bin_dir = args.llama_cpp
    if not (bin_dir / "llama-quantize").is_file():
        raise SystemExit(f"no llama-quantize in {bin_dir}; build llama.cpp's tools (see this script's docstring) and pass --llama-cpp")
    if args.speed_only:
        if args.work is None:
            raise SystemExit("--speed-only needs the --work folder of an earlier run")
        rows = [{"file": p.name, "expert_bits": round(expert_bits(p), 4), **speed(bin_dir, p, args.work / "logs" / f"speed-{p.stem}.log")}
                for p in sorted(args.work.glob("*.gguf")) if p.name != "imatrix.gguf"]
        print_table(["file", "expert bits", "prompt t/s 1", "prompt t/s 2", "gen t/s 1", "gen t/s 2"],
                    [[r["file"], r["expert_bits"], r["prompt_t1"], r["prompt_t2"], r["gen_t1"], r["gen_t2"]] for r in rows])
        write_json("gguf_peers_speed", rows, work=str(args.work))
        return
    work = args.work or Path(tempfile.mkdtemp(prefix="gguf-peers-"))
    work.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)

    f16, base, imatrix = work / "f16.gguf", work / "base.kld", work / "imatrix.gguf"
    if not (args.reuse and f16.is_file() and base.is_file() and imatrix.is_file() and (logs / "base.log").is_file()):
        run([MOEQ, "quantize", MODEL, "--out", work / "fp", "--bits", "16", "--overwrite"], logs / "fp.log")
        run([MOEQ, "export", work / "fp", "--out", f16, "--float-type", "F16", "--overwrite"], logs / "f16.log")
        run([bin_dir / "llama-perplexity", "-m", f16, "-f", DATA / "test.txt", "-c", args.ctx, "-t", "2", "--kl-divergence-base", base],
            logs / "base.log")
        run([bin_dir / "llama-imatrix", "-m", f16, "-f", DATA / "calibration.txt", "-c", args.ctx, "-t", "2", "-o", imatrix],
            logs / "imatrix.log")

    rows = []
    for kind in args.types.split(","):
        path = work / f"llama-{kind}.gguf"
        keep = [x for name in KEEP_F16 for x in ("--tensor-type", f"{name}=f16")]
        run([bin_dir / "llama-quantize", "--imatrix", imatrix, "--token-embedding-type", "f16", "--output-tensor-type", "f16",
             *keep, f16, path, kind, "2"], logs / f"quantize-{kind}.log")
        bits = expert_bits(path)
        kld, ppl = kl_divergence(bin_dir, path, base, args.ctx, logs / f"kld-{kind}.log")
        row = {"method": f"llama.cpp {kind} + imatrix", "expert_bits": round(bits, 4), "kld": kld, "ppl": ppl, "types": expert_types(path)}
        if not args.no_speed:
            row.update(speed(bin_dir, path, logs / f"bench-{kind}.log"))
        rows.append(row)
        ours, levels = moeq_file(work, bits, args.calib_tokens, not args.no_act_order, logs / f"moeq-{kind}.log")
        if ours is None:
            rows.append({"method": f"moeq auto+GPTQ at {kind}'s size", "expert_bits": round(bits, 4), "kld": None, "ppl": None,
                         "types": "not reachable: below the smallest GGUF file moeq writes for this model"})
            continue
        kld_ours, ppl_ours = kl_divergence(bin_dir, ours, base, args.ctx, logs / f"kld-moeq-{kind}.log")
        label = f"moeq auto+GPTQ at {kind}'s size" + ("" if levels == "default" else f" (--levels {levels})")
        mine = {"method": label, "expert_bits": round(expert_bits(ours), 4), "kld": kld_ours,
                "ppl": ppl_ours, "types": expert_types(ours), "kld_ratio_to_llama": round(kld_ours / kld, 3)}
        if not args.no_speed:
            mine.update(speed(bin_dir, ours, logs / f"bench-moeq-{kind}.log"))
        rows.append(mine)
        print(f"{kind}: llama.cpp {bits:.3f} bits KL {kld:.5f}; moeq {mine['expert_bits']:.3f} bits KL {kld_ours:.5f}", flush=True)

    f16_ppl = float(re.search(r"Final estimate: PPL = ([0-9.]+)", (logs / "base.log").read_text()).group(1))
    headers = ["method", "expert bits", "KL", "PPL", "KL ratio", "gen t/s 1 thr", "gen t/s 2 thr", "expert types"]
    print_table(headers, [[r["method"], r["expert_bits"], "-" if r["kld"] is None else f"{r['kld']:.5f}",
                           "-" if r["ppl"] is None else f"{r['ppl']:.3f}", r.get("kld_ratio_to_llama", ""),
                           r.get("gen_t1", ""), r.get("gen_t2", ""), r["types"]] for r in rows])
    print(f"F16 reference PPL {f16_ppl:.3f}; work folder {work}")
    write_json(args.name, rows, f16_ppl=f16_ppl, ctx=args.ctx, calib_tokens=args.calib_tokens, act_order=not args.no_act_order,
               llama_cpp="llama-cpp-python 0.3.36 vendored llama.cpp", work=str(work))


if __name__ == "__main__":
    main()
