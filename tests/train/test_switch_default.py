"""The shipped Switch default (``moeq/data/default-switch``): trained, with its sentinels after the
shipped BPE ids, its initial routers read by allocation, and quantizable and evaluable by denoising."""

import math

import pytest
import torch
from transformers import AutoTokenizer

import moeq
from moeq.allocate import allocate
from moeq.eval.api import evaluate
from moeq.eval.data import evaluation_tokens
from moeq.io.source import load_any
from moeq.train.corpus import DATA_DIR
from moeq.train.denoise import NUM_SENTINELS

DEFAULT_SWITCH = DATA_DIR / "default-switch"
# Denoising loss (nats per target token) of the shipped model on the first 2,048 test tokens,
# windows of 128: measured 4.603 over all target tokens, sentinels included (uniform: ln 4128 = 8.3;
# the text's unigram entropy: 6.06); the bound leaves room for BLAS differences.
FP_LOSS_BOUND = 4.7


@pytest.fixture(scope="module")
def test_ids() -> torch.Tensor:
    return evaluation_tokens(DEFAULT_SWITCH, None, 2048)


def test_sentinels_follow_the_shipped_bpe_ids() -> None:
    mine, shipped = AutoTokenizer.from_pretrained(DEFAULT_SWITCH), AutoTokenizer.from_pretrained(DATA_DIR / "tokenizer")
    text = "To be, or not to be: that is the question."
    assert mine(text)["input_ids"] == shipped(text)["input_ids"]
    assert len(mine) == len(shipped) + NUM_SENTINELS == load_any(DEFAULT_SWITCH).config.vocab_size
    assert mine.convert_tokens_to_ids("<extra_id_0>") == len(shipped)


def test_the_shipped_default_is_trained_quantizes_and_evaluates(test_ids: torch.Tensor) -> None:
    reference = load_any(DEFAULT_SWITCH)
    fp = evaluate(reference, test_ids, seq_len=128)
    assert math.log(fp.perplexity) < FP_LOSS_BOUND
    plan = allocate(DEFAULT_SWITCH, "router-maxvar", avg_bits=2.5, levels=(3, 2))
    assert plan.method["router_signal"].startswith("norm change against the reference")  # its initial routers
    quantized = moeq.quantize(load_any(DEFAULT_SWITCH), plan)
    report = evaluate(quantized, test_ids, reference=reference, seq_len=128)
    assert report.reference_perplexity == pytest.approx(fp.perplexity, rel=1e-6)
    assert 0.0 < report.kl_to_reference < 0.5 and report.perplexity < 1.5 * fp.perplexity
    assert len(report.routing_agreement) == 4 and min(report.routing_agreement) > 0.7
    assert report.bytes_in_memory < 0.75 * fp.bytes_in_memory
