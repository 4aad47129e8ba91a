"""`QuantSpec`: the one record of a quantizer's grid, shared by every stage.

A quantizer (`ActQuantizer`, `WeightQuantizer`) owns its state; `q.spec` is a frozen snapshot of the
part every other stage needs: where it sits, how many bits, signed or not, per-channel axis or block,
and the integer grid those imply. `quant.json` stores `spec.to_record(scale, zero_point)`, the loader
restores with `QuantSpec.from_record`, and the exporter, `check`, `verify` and `inspect` read the grid
from here (in the graph, each Q/DQ node carries `mixq.quantizer` = `spec.name` and `mixq.bits` =
`spec.bits`). Nothing else derives a grid: `grid()` is the only place qmin/qmax are computed.

It imports no torch itself (the ONNX tools read its records without building quantizers).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SUPPORTED_BITS = tuple(range(2, 9))  # deployable widths of a quantizer (its grid lives in an 8-bit container)


def int_range(bits: Any, signed: bool, narrow: bool) -> tuple[Any, Any]:
    """Integer range of a b-bit grid: narrow signed [-(2^(b-1)-1), 2^(b-1)-1] (weights), full signed
    [-2^(b-1), 2^(b-1)-1] or unsigned [0, 2^b-1]. `bits` may also be a tensor of (fractional) widths: NIPQ's
    training-time grid takes its levels from here too."""
    if signed:
        hi = 2 ** (bits - 1) - 1
        return (-hi if narrow else -hi - 1), hi
    return 0, 2**bits - 1


@dataclass(frozen=True)
class QuantSpec:
    name: str
    kind: str  # "act" | "weight"
    placement: str  # act: "input" (of a Conv/Gemm) | "residual" (identity input of an add) | "matmul" | "pool"
    # (input of an average pool a quantized layer reads); "weight"
    bits: int
    signed: bool  # act: False for post-ReLU inputs on an unsigned grid; weight: == symmetric
    symmetric: bool  # zero point 0 (TensorRT-deployable)
    axis: int | None = None  # weights: the output-channel axis of the per-channel scale
    block_size: int | None = None  # INT4 weight-only GEMMs: one scale per block of input features
    # act: the other placements this quantizer also serves (graph.share_quantizers: one tensor, one grid, one
    # quantizer), by the names their own quantizers have when sharing is off; () when it serves one consumer
    shared_with: tuple[str, ...] = ()

    def grid(self) -> tuple[int, int]:
        """(qmin, qmax): asymmetric grids are unsigned [0, 2^b-1]; symmetric weights use the narrow signed
        range, symmetric activations the full signed or the unsigned one."""
        if not self.symmetric:
            return 0, 2**self.bits - 1
        return int_range(self.bits, self.signed, narrow=self.kind == "weight")

    def container(self) -> tuple[int, int]:
        """The 8-bit type the grid lives in on the graph (INT8, or UINT8 for asymmetric grids): a grid
        narrower than it needs a Clip before the QuantizeLinear."""
        return (-128, 127) if self.symmetric else (0, 255)

    def container_dtype(self) -> str:
        """The container's name as torch and numpy spell it: "int8" or "uint8"."""
        return "int8" if self.symmetric else "uint8"

    def needs_clip(self) -> bool:
        return self.grid() != self.container()

    def describe(self) -> str:
        """e.g. "4-bit unsigned on UINT8" / "4-bit on INT8": the intended grid beside the engine's type."""
        kind = self.container_dtype().upper()
        sign = "" if self.signed or not self.symmetric else " unsigned"
        return f"{self.bits}-bit{sign} on {kind}"

    def to_record(self, scale: Any, zero_point: Any, **extra: Any) -> dict[str, Any]:
        """The quant.json record (key order fixed: the files are compared byte for byte)."""
        lo, hi = self.grid()
        rec: dict[str, Any] = {"name": self.name, "kind": self.kind, "placement": self.placement}
        if self.shared_with:  # only then: records of unshared quantizers stay as they always were
            rec["shared_with"] = list(self.shared_with)
        rec.update({"bits": self.bits, "signed": self.signed, "symmetric": self.symmetric,
                    "axis": self.axis, "qmin": lo, "qmax": hi})
        if self.kind == "weight":
            rec["block_size"] = self.block_size
            rec.update(extra)
        rec["scale"] = scale
        rec["zero_point"] = zero_point
        return rec

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> QuantSpec:
        """The spec of a quant.json record (validated by `quantizer.validate_record` first)."""
        return cls(name=str(rec["name"]), kind=str(rec["kind"]), placement=str(rec["placement"]),
                   bits=int(rec["bits"]), signed=bool(rec["signed"]), symmetric=bool(rec["symmetric"]),
                   axis=rec.get("axis"), block_size=rec.get("block_size"),
                   shared_with=tuple(str(v) for v in rec.get("shared_with") or ()))
