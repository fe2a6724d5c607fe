"""BitPlan: the one contract between deciding bit widths and applying them.

A plan names, for every routed expert projection of every MoE layer (``layer`` index into
``layers``, ``expert`` index, ``projection`` name as the model's adapter spells it) and for every
other linear it quantizes (by module path), the bit width, scheme and group size. Anything the plan
does not name stays in full precision. It records how it was made (``method``) and the budget it
met (``budget``: mean expert bits, the paper's measure, and the true bytes).

JSON form (``format: "moeq.bitplan"``, ``version: 1``)::

    {"format": "moeq.bitplan", "version": 1, "model_type": "mixtral",
     "layers": ["model.layers.0.mlp", ...], "scale_dtype": "float16",
     "experts": [{"layer": 0, "expert": 3, "projection": "gate_proj",
                  "bits": 3, "scheme": "asym", "group_size": null, "clip_search": false}, ...],
     "linears": {"model.layers.0.self_attn.q_proj": {"bits": 4, ...}},
     "method": {"strategy": "uniform", ...}, "budget": {"avg_expert_bits": 3.0, ...}}

``group_size: null`` means one scale per output channel.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .quant.schemes import Scheme, check_scheme_bits

__all__ = ["PLAN_FORMAT", "PLAN_VERSION", "PlanError", "TensorSpec", "ExpertEntry", "BitPlan"]

PLAN_FORMAT = "moeq.bitplan"
PLAN_VERSION = 1


class PlanError(ValueError):
    """A BitPlan that is malformed or does not fit the model it is applied to."""


@dataclass(frozen=True)
class TensorSpec:
    """How one weight is quantized."""

    bits: int
    scheme: Scheme = Scheme.ASYM
    group_size: int | None = None
    clip_search: bool = False

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "scheme", check_scheme_bits(self.scheme, self.bits))
        except ValueError as err:
            raise PlanError(str(err)) from None
        if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size <= 0):
            raise PlanError(f"group_size must be a positive integer or null, got {self.group_size!r}")

    def to_json(self) -> dict[str, Any]:
        return {"bits": self.bits, "scheme": self.scheme.value, "group_size": self.group_size,
                "clip_search": self.clip_search}

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str) -> TensorSpec:
        unknown = set(data) - {"bits", "scheme", "group_size", "clip_search"}
        if unknown or "bits" not in data:
            raise PlanError(f"{where}: expected keys bits, scheme, group_size, clip_search; got {sorted(data)}")
        try:
            return cls(
                bits=data["bits"],
                scheme=data.get("scheme", Scheme.ASYM.value),
                group_size=data.get("group_size"),
                clip_search=bool(data.get("clip_search", False)),
            )
        except PlanError as err:
            raise PlanError(f"{where}: {err}") from None


@dataclass(frozen=True)
class ExpertEntry:
    """One routed expert projection of one MoE layer and its spec."""

    layer: int
    expert: int
    projection: str
    spec: TensorSpec


@dataclass
class BitPlan:
    """Bits, scheme and group size for every quantized weight of one model."""

    model_type: str
    layers: list[str]
    experts: list[ExpertEntry] = field(default_factory=list)
    linears: dict[str, TensorSpec] = field(default_factory=dict)
    scale_dtype: str = "float16"
    method: dict[str, Any] = field(default_factory=dict)
    budget: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        seen: set[tuple[int, int, str]] = set()
        for entry in self.experts:
            if not 0 <= entry.layer < len(self.layers):
                raise PlanError(f"expert entry names layer {entry.layer}, the plan has {len(self.layers)} MoE layers")
            key = (entry.layer, entry.expert, entry.projection)
            if key in seen:
                raise PlanError(f"expert {entry.expert} projection {entry.projection} of layer {entry.layer} is listed twice")
            seen.add(key)
        if self.scale_dtype not in ("float16", "bfloat16", "float32"):
            raise PlanError(f"scale_dtype must be float16, bfloat16 or float32, got {self.scale_dtype!r}")

    def expert_specs(self, layer: int) -> dict[tuple[int, str], TensorSpec]:
        """``{(expert, projection): spec}`` for one MoE layer (empty: the layer stays full precision)."""
        return {(e.expert, e.projection): e.spec for e in self.experts if e.layer == layer}

    @property
    def average_expert_bits(self) -> float | None:
        """Mean bit width over the planned expert projections (unweighted by size), or None."""
        if not self.experts:
            return None
        return sum(e.spec.bits for e in self.experts) / len(self.experts)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "version": PLAN_VERSION,
            "model_type": self.model_type,
            "layers": list(self.layers),
            "scale_dtype": self.scale_dtype,
            "experts": [
                {"layer": e.layer, "expert": e.expert, "projection": e.projection, **e.spec.to_json()}
                for e in self.experts
            ],
            "linears": {name: spec.to_json() for name, spec in self.linears.items()},
            "method": self.method,
            "budget": self.budget,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BitPlan:
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            raise PlanError(f"not a moeq bit plan: expected \"format\": \"{PLAN_FORMAT}\"")
        version = data.get("version")
        if version != PLAN_VERSION:
            raise PlanError(f"bit plan version {version!r} is not supported (this moeq reads version {PLAN_VERSION})")
        for key in ("model_type", "layers", "experts"):
            if key not in data:
                raise PlanError(f"bit plan lacks the required key {key!r}")
        experts = []
        for i, raw in enumerate(data["experts"]):
            where = f"experts[{i}]"
            try:
                layer, expert, projection = int(raw["layer"]), int(raw["expert"]), str(raw["projection"])
            except (KeyError, TypeError, ValueError):
                raise PlanError(f"{where}: needs integer layer and expert and a projection name") from None
            spec_fields = {k: v for k, v in raw.items() if k not in ("layer", "expert", "projection")}
            experts.append(ExpertEntry(layer, expert, projection, TensorSpec.from_json(spec_fields, where)))
        linears = {
            name: TensorSpec.from_json(spec, f"linears[{name!r}]") for name, spec in data.get("linears", {}).items()
        }
        return cls(
            model_type=str(data["model_type"]),
            layers=[str(p) for p in data["layers"]],
            experts=experts,
            linears=linears,
            scale_dtype=data.get("scale_dtype", "float16"),
            method=dict(data.get("method", {})),
            budget=dict(data.get("budget", {})),
        )

    def save(self, path: str | Path) -> None:
        """Write the plan as JSON (atomically: a temporary file, then a rename)."""
        from .io.atomic import atomic_write_text

        atomic_write_text(Path(path), json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> BitPlan:
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise PlanError(f"bit plan {path} does not exist") from None
        except json.JSONDecodeError as err:
            raise PlanError(f"bit plan {path} is not valid JSON ({err})") from None
        return cls.from_json(data)

