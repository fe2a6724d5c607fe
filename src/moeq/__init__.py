"""moeq: expert-wise mixed-precision quantization of Mixture-of-Experts language models.

Public API::

    import moeq
    plan = moeq.allocate("path/to/model", "router-maxvar", avg_bits=2.5, levels=(3, 2, 1))
    model = moeq.quantize(model, moeq.QuantConfig(bits=3))      # or the plan
    moeq.save(model, "out/")
    model = moeq.load("out/")   # AutoModelForCausalLM.from_pretrained("out/") works too
    moeq.quantize_checkpoint("path/to/model", "out/", plan)     # folder to folder, block by block
"""

from . import models  # noqa: F401  (adapter registration)
from .allocate import AllocationConfig, allocate
from .api import plan_for, quantize, quantize_checkpoint
from .config import QuantConfig
from .eval import evaluate
from .io import load, read_plan, save
from .plan import BitPlan, PlanError

__version__ = "0.1.0"

__all__ = ["AllocationConfig", "BitPlan", "PlanError", "QuantConfig", "allocate", "evaluate", "load", "plan_for", "quantize", "quantize_checkpoint", "read_plan", "save"]
