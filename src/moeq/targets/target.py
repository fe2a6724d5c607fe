"""Target and TargetType, and the catalogue of targets moeq plans for."""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..plan import BitPlan, PlanError, TensorSpec
from ..quant.rtn import resolve_group_size
from ..quant.schemes import Scheme
from ..quant.tensor import storage_nbytes

__all__ = ["GRANULARITIES", "TARGETS", "Target", "TargetType", "compressed_tensors_nbytes", "get_target", "vllm_target"]

# expert: a spec per (expert, projection); tensor: one per (layer, projection) across its experts;
# layer: one per MoE layer across its experts and projections.
GRANULARITIES = ("expert", "tensor", "layer")


@dataclass(frozen=True)
class TargetType:
    """One weight type a target runs: its name there, the moeq spec that produces it exactly,
    the row lengths (input dimension) it accepts and how its file stores it (``layout``: ``moeq``,
    GGML blocks the same size, or ``compressed-tensors``' int32 words)."""

    name: str
    spec: TensorSpec
    row_multiple: int
    equivalent: tuple[TensorSpec, ...] = ()  # other specs whose codes the type holds exactly
    layout: str = "moeq"

    def accepts(self, in_features: int) -> bool:
        return in_features % self.row_multiple == 0

    def nbytes(self, shape: tuple[int, int]) -> int:
        """True bytes of one ``[out, in]`` weight in this type's file (16-bit scales)."""
        spec = self.spec
        group = resolve_group_size(shape[1], spec.group_size, spec.scheme)
        if self.layout == "compressed-tensors":
            return compressed_tensors_nbytes(shape, spec.bits, group, spec.scheme is Scheme.ASYM)
        return storage_nbytes(shape, spec.bits, group, spec.scheme, 2)

    def bits_per_weight(self, shape: tuple[int, int]) -> float:
        return self.nbytes(shape) * 8 / (shape[0] * shape[1])


@dataclass(frozen=True)
class Target:
    """A runtime's rules: the types it runs (``None``: any moeq spec) and its granularity.

    ``levels`` maps a width to the types tried for it, first that accepts the row wins (the
    fallback llama.cpp itself applies when a K-quant does not divide a row); ``held`` are further
    types a plan may hold (and an export write) that planning by width does not pick."""

    name: str
    granularity: str
    levels: dict[int, tuple[TargetType, ...]] | None = None
    runtime: str = ""
    scale_dtype: str | None = None  # "model": scales stored in the model's dtype, as the runtime holds them
    held: tuple[TargetType, ...] = ()

    def scale_dtype_for(self, model_dtype: str) -> str:
        """The plan's scale dtype for a model stored in ``model_dtype`` (moeq's float16 by default)."""
        if self.scale_dtype == "model" and model_dtype in ("bfloat16", "float16"):
            return model_dtype
        return "float16"

    @property
    def free(self) -> bool:
        """Any moeq spec, a width per expert: the allocator's own freedom."""
        return self.levels is None

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(sorted(self.levels, reverse=True)) if self.levels else ()

    def type_at(self, bits: int, in_features: int) -> TargetType:
        """The type a weight with ``in_features`` inputs gets at width ``bits``."""
        if self.levels is None:
            raise ValueError(f"target {self.name} has no fixed types")
        if bits not in self.levels:
            raise PlanError(f"target {self.name} has no {bits}-bit level; its widths are {', '.join(map(str, self.widths))}")
        for kind in self.levels[bits]:
            if kind.accepts(in_features):
                return kind
        raise PlanError(f"target {self.name} has no {bits}-bit type for rows of {in_features} "
                        f"(tried {', '.join(k.name for k in self.levels[bits])})")

    def spec_at(self, bits: int, in_features: int) -> TensorSpec:
        return self.type_at(bits, in_features).spec

    def type_of(self, spec: TensorSpec, in_features: int) -> TargetType | None:
        """The target type this spec is, for a row of ``in_features`` (``None``: not one of them)."""
        for kinds in (*(self.levels or {}).values(), self.held):
            for kind in kinds:
                if kind.accepts(in_features) and any(_same(s, spec, in_features) for s in (kind.spec, *kind.equivalent)):
                    return kind
        return None

    def check_plan(self, plan: BitPlan, shapes: list[dict[str, tuple[int, int]]]) -> None:
        """Refuse, in one line naming the rule, a plan this target cannot hold. ``shapes``: per
        MoE layer, projection -> (out, in)."""
        if self.free:
            return
        groups: dict[tuple, dict] = {}  # stack -> {spec key: spec}
        for entry in plan.experts:
            in_features = shapes[entry.layer][entry.projection][1]
            if self.type_of(entry.spec, in_features) is None:
                names = sorted({k.name for kinds in (*self.levels.values(), self.held) for k in kinds})
                raise PlanError(
                    f"layer {entry.layer} expert {entry.expert} {entry.projection}: {_label(entry.spec)} is not a type "
                    f"{self.runtime or self.name} runs (it runs {', '.join(names)}); make the plan with --target {self.name}"
                )
            key = (entry.layer,) if self.granularity == "layer" else (entry.layer, entry.projection)
            # a layer's projections differ in rows: one scheme there means one (bits, scheme, group size) as written
            spec_key = (entry.spec.bits, entry.spec.scheme, entry.spec.group_size) if self.granularity == "layer" else _key(entry.spec, in_features)
            groups.setdefault(key, {}).setdefault(spec_key, entry.spec)
        for key, specs in groups.items():
            if self.granularity != "expert" and len(specs) > 1:
                where = f"layer {key[0]}" + (f" {key[1]}" if len(key) > 1 else "")
                rule = "one type per layer" if self.granularity == "layer" else "one type per layer's expert tensor"
                used = ", ".join(sorted(_label(spec) for spec in specs.values()))
                raise PlanError(f"{where}: its experts use {used}, but {self.runtime or self.name} holds "
                                f"{rule}; make the plan with --target {self.name}")


def compressed_tensors_nbytes(shape: tuple[int, int], bits: int, group: int, zero_points: bool, scale_bytes: int = 2) -> int:
    """Bytes compressed-tensors' ``pack-quantized`` format holds for one ``[out, in]`` weight: codes
    packed into int32 words along the input, one scale per (row, group), zero points packed into
    int32 words along the output, and the int64 ``weight_shape``."""
    rows, cols = shape
    groups = cols // group
    total = rows * -(-cols * bits // 32) * 4 + rows * groups * scale_bytes + 2 * 8
    if zero_points:
        total += -(-rows * bits // 32) * groups * 4
    return total


def _key(spec: TensorSpec, in_features: int) -> tuple:
    return (spec.bits, spec.scheme, resolve_group_size(in_features, spec.group_size, spec.scheme))


def _same(a: TensorSpec, b: TensorSpec, in_features: int) -> bool:
    return _key(a, in_features) == _key(b, in_features)


def _label(spec: TensorSpec) -> str:
    group = f" group {spec.group_size}" if spec.group_size and not spec.scheme.is_kquant else ""
    return f"{spec.bits}-bit {spec.scheme.value}{group}"


def _gguf() -> Target:
    def t(name: str, bits: int, scheme: str, group: int | None, rows: int) -> TargetType:
        return TargetType(name, TensorSpec(bits, scheme, group), rows)

    def legacy(name: str, bits: int) -> TargetType:
        # Planned as symx (llama.cpp's own scale rule: every code used); plain sym codes fit too.
        return TargetType(name, TensorSpec(bits, "symx", 32), 32, (TensorSpec(bits, "sym", 32),))

    q4_0, q5_0, q8_0 = legacy("Q4_0", 4), legacy("Q5_0", 5), legacy("Q8_0", 8)
    # A row that no K-quant divides falls back as llama.cpp's quantizer does: 2-4 bits to Q4_0,
    # 5 to Q5_0, 6 and 8 to Q8_0.
    return Target(
        name="gguf",
        granularity="tensor",
        runtime="llama.cpp (GGUF)",
        levels={
            1: (t("Q1_0", 1, "sign", 128, 128),),  # no fallback: a row 128 does not divide has no 1-bit type
            2: (t("Q2_K", 2, "q2_k", None, 256), q4_0),
            3: (t("Q3_K", 3, "q3_k", None, 256), q4_0),
            4: (t("Q4_K", 4, "q4_k", None, 256), q4_0),
            5: (t("Q5_K", 5, "q5_k", None, 256), q5_0),
            6: (t("Q6_K", 6, "q6_k", None, 256), q8_0),
            8: (q8_0,),
        },
        # llama.cpp's Q4_1/Q5_1 (moeq's affine codes in groups of 32, 5 and 6 bits per weight): what a
        # plan quantized with --scheme affine --group-size 32 holds; planning by width takes the others
        held=(t("Q4_1", 4, "affine", 32, 32), t("Q5_1", 5, "affine", 32, 32)),
    )


VLLM_GROUP_SIZES = (32, 64, 128, None)  # None: one scale per output channel
VLLM_SCHEMES = ("sym", "asym")


def vllm_target(scheme: str = "asym", group_size: int | None = None) -> Target:
    """vLLM's MoE layers (compressed-tensors ``pack-quantized``, the Marlin / moe_wna16 kernels):
    4-bit ``scheme`` (sym, or asym with zero points) and 8-bit sym (no 8-bit kernel takes zero
    points), groups of ``group_size`` or one per output channel; one scheme per MoE layer, all its
    experts and projections (vLLM's loader reads expert 0's scheme for the whole fused layer)."""
    scheme = getattr(scheme, "value", scheme)
    if scheme not in VLLM_SCHEMES:
        raise PlanError(f"--target vllm quantizes with --scheme sym or asym (its MoE kernels' integer formats), not {scheme}")
    if group_size not in VLLM_GROUP_SIZES:
        raise PlanError(f"--target vllm takes --group-size 32, 64 or 128, or none for one scale per output channel; "
                        f"got {group_size}")
    rows = group_size or 1

    def kind(bits: int, kind_scheme: str) -> TargetType:
        name = f"W{bits}A16 {kind_scheme}" + (f" g{group_size}" if group_size else " channel")
        return TargetType(name, TensorSpec(bits, kind_scheme, group_size), rows, layout="compressed-tensors")

    return Target(name="vllm", granularity="layer", runtime="vLLM (compressed-tensors)",
                  levels={4: (kind(4, scheme),), 8: (kind(8, "sym"),)}, scale_dtype="model")


def _vllm_catalogue() -> Target:
    """vLLM's target with every scheme and group it runs: what a finished plan is checked against
    (planning configures one with :func:`vllm_target`)."""
    four = tuple(vllm_target(scheme, group).levels[4][0] for scheme in VLLM_SCHEMES for group in VLLM_GROUP_SIZES)
    eight = tuple(vllm_target("sym", group).levels[8][0] for group in VLLM_GROUP_SIZES)
    return replace(vllm_target(), levels={4: four, 8: eight})


TARGETS: dict[str, Target] = {
    "moeq": Target("moeq", "expert", None, "moeq"),
    "gguf": _gguf(),
    "vllm": _vllm_catalogue(),
}


def get_target(target: str | Target, scheme: str | None = None, group_size: int | None = None) -> Target:
    """A target by name (or as given); one line naming the known ones otherwise. ``scheme`` and
    ``group_size`` configure a target whose types take them (vLLM's); the others ignore them."""
    if isinstance(target, Target):
        return target
    if target not in TARGETS:
        raise PlanError(f"unknown target {target!r}; choose one of: {', '.join(TARGETS)}")
    if target == "vllm" and (scheme is not None or group_size is not None):
        return vllm_target(scheme or "asym", group_size)
    return TARGETS[target]
