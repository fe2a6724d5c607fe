"""``auto`` against uniform on a family moeq reads by structure alone: a small GLM-4.5 (transformers'
``glm4_moe``: sigmoid routing with a score-correction bias, a shared expert, a dense first layer)
trained here on the default model's corpus, then quantized both ways at the same expert bytes.

    python benchmarks/new_family.py [--minutes 6] [--work DIR]

Training: moeq's own loop (``moeq.train``) with a GLM-4.5 config of the default model's size
(hidden 256, 4 layers, 8 routed experts top-2, expert width 384, one shared expert), for a fixed
wall-clock budget; transformers' GLM-4.5 has no auxiliary balancing loss, so none is used. Then,
on the calibration split: ``auto`` (RTN damage table, levels 4/3/2/1) at 2.5 and 3.0 mean expert
bits, against uniform at 3 bits and ``router-maxvar`` at 2.5; every result is evaluated on the test
split against the trained bf16 model (KL, perplexity). Prints a table, writes
benchmarks/results/new_family.json.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import transformers

from _common import print_table, write_json

import moeq
from moeq.eval.data import evaluation_tokens
from moeq.train.lm import CausalLM, TrainConfig, train


class Glm4MoeLM(CausalLM):
    """The default model's objective with a GLM-4.5 of the same size."""

    def model_config(self, config: TrainConfig) -> transformers.PretrainedConfig:
        return transformers.Glm4MoeConfig(
            vocab_size=config.vocab_size, hidden_size=config.hidden, intermediate_size=2 * config.intermediate,
            moe_intermediate_size=config.intermediate, num_hidden_layers=config.layers, num_attention_heads=8,
            num_key_value_heads=4, head_dim=config.hidden // 8, n_routed_experts=config.experts,
            num_experts_per_tok=config.top_k, n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1,
            max_position_embeddings=4 * config.seq_len, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0,
            pad_token_id=None,
        )

    def build(self, model_config):
        return transformers.AutoModelForCausalLM.from_config(model_config)

    def loss(self, model, batch):
        return model(**batch).loss, torch.tensor(0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=6.0)
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="new-family-"))
    model = work / "glm4_moe"
    started = time.perf_counter()
    if not (model / "config.json").is_file():
        train(TrainConfig(out=model, minutes=args.minutes, eval_every=50, overwrite=True), Glm4MoeLM())
    trained = time.perf_counter() - started
    test_ids = evaluation_tokens(model, None, 40_000)
    runs = [("uniform", 3.0, {}), ("auto", 3.0, {"calibration": "default"}), ("auto", 2.5, {"calibration": "default"}),
            ("router-maxvar", 2.5, {})]
    rows = []
    for strategy, bits, extra in runs:
        plan = moeq.allocate(model, strategy, avg_bits=bits, **extra)
        out = work / f"{strategy}-{bits}"
        moeq.quantize_checkpoint(model, out, plan, overwrite=True)
        report = moeq.evaluate(out, test_ids, reference=model)
        rows.append({"strategy": strategy, "avg_bits": bits, "kl": report.kl_to_reference, "ppl": report.perplexity})
        print(f"{strategy} {bits}: KL {report.kl_to_reference:.4f} PPL {report.perplexity:.2f}", flush=True)
    full = moeq.evaluate(model, test_ids)
    print_table(["strategy", "mean expert bits", "KL to bf16", "perplexity"],
                [[r["strategy"], r["avg_bits"], f"{r['kl']:.4f}", f"{r['ppl']:.2f}"] for r in rows])
    print(f"bf16 GLM-4.5 perplexity {full.perplexity:.2f}; trained {trained:.0f} s; work folder {work}")
    write_json("new_family", rows, family="glm4_moe", train_minutes=args.minutes, bf16_ppl=full.perplexity, work=str(work))


if __name__ == "__main__":
    main()
