"""BitPlan: the one contract between deciding bit widths and applying them.

A plan names, for every routed expert projection of every MoE layer (``layer`` index into
``layers``, ``expert`` index, ``projection`` name as the model's adapter spells it) and for every
other linear it quantizes (by module path), the bit width, scheme and group size. Anything the plan
does not name stays in full precision. It records how it was made (``method``) and the budget it
met (``budget``: mean expert bits, the paper's measure, and the true bytes).

JSON form (``format: "moeq.bitplan"``, ``version: 1``). Expert specs are stored one row per
(layer, projection), with a list over experts for any field that varies and a scalar for a field
that does not, so a 256-expert, 58-layer model's plan stays small and readable::

    {"format": "moeq.bitplan", "version": 1, "model_type": "mixtral",
     "layers": ["model.layers.0.mlp", ...], "scale_dtype": "float16",
     "experts": [{"layer": 0, "projection": "gate_proj", "experts": [0, 1, 2, 3],
                  "bits": [3, 3, 2, 1], "scheme": "asym", "group_size": null, "clip_search": false}, ...],
     "linears": {"model.layers.0.self_attn.q_proj": {"bits": 4, "scheme": "asym", ...}},
     "method": {"strategy": "router-maxvar", ...}, "budget": {"avg_expert_bits": 2.25, ...},
     "scores": {"router_norm_change": [[...per expert] per layer], "maxvar": [[...]], ...}}

``group_size: null`` means one scale per output channel.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .quant.schemes import Scheme, check_scheme_bits

__all__ = ["PLAN_FORMAT", "PLAN_VERSION", "PlanError", "PlanTarget", "TensorSpec", "ExpertEntry", "BitPlan"]

PLAN_FORMAT = "moeq.bitplan"
PLAN_VERSION = 1


SPEC_FIELDS = ("bits", "scheme", "group_size", "clip_search")


class PlanError(ValueError):
    """A BitPlan that is malformed or does not fit the model it is applied to."""


@dataclass(frozen=True)
class PlanTarget:
    """What one model offers a plan: its type, its MoE layers (path, experts, projections) and the
    linears outside the routed experts. A plan is checked against it before it is expanded, so a
    stranger's plan naming a million experts costs nothing but its refusal."""

    model_type: str
    layers: tuple[str, ...]
    num_experts: tuple[int, ...]
    projections: tuple[tuple[str, ...], ...]
    linears: frozenset[str]

    def check_row(self, layer: int, projection: str, experts: list[int], where: str) -> None:
        """One (layer, projection) row of expert indices fits the model (in range, none twice)."""
        if not 0 <= layer < len(self.layers):
            raise PlanError(f"{where}: names MoE layer {layer}; the model has {len(self.layers)} (0..{len(self.layers) - 1})")
        count, names = self.num_experts[layer], self.projections[layer]
        if projection not in names:
            raise PlanError(f"{where}: names projection {projection!r}; layer {layer} has {', '.join(names)}")
        if len(experts) > count or len(set(experts)) != len(experts) or any(not 0 <= e < count for e in experts):
            raise PlanError(f"{where}: expert indices must be distinct and within 0..{count - 1} (layer {layer} has {count} experts)")

    @property
    def max_entries(self) -> int:
        """Expert entries a plan for this model can hold at most (every projection of every expert)."""
        return sum(n * len(p) for n, p in zip(self.num_experts, self.projections))

    def check_header(self, model_type: str, layers: list[str], linears: list[str]) -> None:
        if model_type != self.model_type:
            raise PlanError(f"the plan is for a {model_type} model, this model is {self.model_type}")
        if list(layers) != list(self.layers):
            raise PlanError(f"the plan's MoE layers {list(layers)[:3]}... do not match the model's {list(self.layers)[:3]}...")
        for name in linears:
            if name not in self.linears:
                raise PlanError(f"the plan quantizes {name!r}, which is not a linear layer outside the experts of this model")


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
        if self.scheme.is_kquant and self.group_size not in (None, 256):
            raise PlanError(f"scheme {self.scheme.value} has fixed super-blocks of 256 weights; leave the group size out")

    def to_json(self) -> dict[str, Any]:
        return {"bits": self.bits, "scheme": self.scheme.value, "group_size": self.group_size,
                "clip_search": self.clip_search}

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str) -> TensorSpec:
        unknown = set(data) - set(SPEC_FIELDS)
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
    scores: dict[str, Any] = field(default_factory=dict)  # per-layer lists behind the choice

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

    def check_fits(self, target: PlanTarget) -> None:
        """Refuse this plan unless it fits ``target`` (the same rules :meth:`from_json` applies)."""
        target.check_header(self.model_type, self.layers, list(self.linears))
        for i, row in enumerate(self._expert_rows()):
            target.check_row(row["layer"], row["projection"], row["experts"], f"experts[{i}]")

    def expert_specs(self, layer: int) -> dict[tuple[int, str], TensorSpec]:
        """``{(expert, projection): spec}`` for one MoE layer (empty: the layer stays full precision)."""
        return {(e.expert, e.projection): e.spec for e in self.experts if e.layer == layer}

    def to_json(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "version": PLAN_VERSION,
            "model_type": self.model_type,
            "layers": list(self.layers),
            "scale_dtype": self.scale_dtype,
            "experts": self._expert_rows(),
            "linears": {name: spec.to_json() for name, spec in self.linears.items()},
            "method": self.method,
            "budget": self.budget,
            "scores": self.scores,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], target: PlanTarget | None = None) -> BitPlan:
        """The plan in ``data``; with ``target``, refused before it is expanded unless it fits."""
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            raise PlanError(f"not a moeq bit plan: expected \"format\": \"{PLAN_FORMAT}\"")
        version = data.get("version")
        if version != PLAN_VERSION:
            raise PlanError(f"bit plan version {version!r} is not supported (this moeq reads version {PLAN_VERSION})")
        for key in ("model_type", "layers", "experts"):
            if key not in data:
                raise PlanError(f"bit plan lacks the required key {key!r}")
        if not isinstance(data["experts"], list) or not isinstance(data["layers"], list):
            raise PlanError("bit plan: 'layers' and 'experts' must be lists")
        if not isinstance(data.get("linears", {}), dict):
            raise PlanError("bit plan: 'linears' must be an object of module path -> spec")
        if target is not None:
            target.check_header(str(data["model_type"]), [str(p) for p in data["layers"]], list(data.get("linears", {})))
        experts = []
        for i, row in enumerate(data["experts"]):
            experts += _expand_row(row, f"experts[{i}]", target)
            if target is not None and len(experts) > target.max_entries:
                raise PlanError(f"experts[{i}]: the plan lists more expert projections than the model has ({target.max_entries})")
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
            scores=dict(data.get("scores", {})),
        )

    def _expert_rows(self) -> list[dict[str, Any]]:
        rows: dict[tuple[int, str], list[ExpertEntry]] = {}
        for entry in self.experts:
            rows.setdefault((entry.layer, entry.projection), []).append(entry)
        out = []
        for (layer, projection), entries in rows.items():
            entries.sort(key=lambda e: e.expert)
            row: dict[str, Any] = {"layer": layer, "projection": projection, "experts": [e.expert for e in entries]}
            for key in SPEC_FIELDS:
                values = [e.spec.to_json()[key] for e in entries]
                row[key] = values[0] if all(v == values[0] for v in values) else values
            out.append(row)
        return out

    def save(self, path: str | Path) -> None:
        """Write the plan as JSON (atomically: a temporary file, then a rename)."""
        from .atomic import atomic_write_text

        atomic_write_text(Path(path), json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path, target: PlanTarget | None = None) -> BitPlan:
        """The plan in the JSON file ``path``; with ``target``, checked against it first."""
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise PlanError(f"bit plan {path} does not exist") from None
        except json.JSONDecodeError as err:
            raise PlanError(f"bit plan {path} is not valid JSON ({err})") from None
        return cls.from_json(data, target)


def _expand_row(row: dict[str, Any], where: str, target: PlanTarget | None = None) -> list[ExpertEntry]:
    """ExpertEntry objects of one (layer, projection) row of the JSON form."""
    try:
        layer, projection, experts = int(row["layer"]), str(row["projection"]), [int(e) for e in row["experts"]]
    except (KeyError, TypeError, ValueError):
        raise PlanError(f"{where}: needs an integer layer, a projection name and a list of expert indices") from None
    if target is not None:
        target.check_row(layer, projection, experts, where)
    unknown = set(row) - {"layer", "projection", "experts", *SPEC_FIELDS}
    if unknown:
        raise PlanError(f"{where}: unknown keys {sorted(unknown)}")
    columns = {}
    for key in SPEC_FIELDS:
        if key not in row:
            continue
        value = row[key]
        if isinstance(value, list):
            if len(value) != len(experts):
                raise PlanError(f"{where}: {key} lists {len(value)} values for {len(experts)} experts")
            columns[key] = value
        else:
            columns[key] = [value] * len(experts)
    return [
        ExpertEntry(layer, expert, projection,
                    TensorSpec.from_json({k: v[i] for k, v in columns.items()}, f"{where} expert {expert}"))
        for i, expert in enumerate(experts)
    ]
