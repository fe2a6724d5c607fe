"""File and folder names that several stages share, kept below all of them.

``DATA_DIR`` is the package's data folder (the default models, tokenizer and corpus slices);
the two file names are what a trained or router-tuned checkpoint ships beside its weights for the
router-norm change (written by ``moeq.train``, read by ``moeq.allocate``, skipped by ``moeq.io``).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["DATA_DIR", "INITIAL_ROUTER_FILE", "ROUTER_TUNE_FILE"]

DATA_DIR = Path(__file__).resolve().parent / "data"
INITIAL_ROUTER_FILE = "initial_router.safetensors"  # the routers before training or router tuning
ROUTER_TUNE_FILE = "router_tune.json"  # marks a `moeq train-router` output: its routers are the "after"
