"""Per-token cost of a sparse MLP, relative to the dense MLP it replaced."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

SERVED_BYTES_PER_WEIGHT = 2  # bf16: the dtype users serve, whatever the layer is stored in


@dataclass(frozen=True)
class SparseCost:
    """Units are intermediate neurons; weight bytes include the routers and predictors that are read.

    Bytes are counted as served: every weight in bf16, a quantised predictor at its bit width
    with its scales, so storing a layer in fp32 does not change its fraction. Both denominators
    are the dense MLP's (`intermediate` neurons, `3 * hidden * intermediate` bf16 weights), so
    fractions compare directly with the dense model.
    """

    active_units: float
    total_units: int
    active_weight_bytes: float
    dense_weight_bytes: int

    @property
    def unit_fraction(self) -> float:
        return self.active_units / self.total_units

    @property
    def weight_fraction(self) -> float:
        return self.active_weight_bytes / self.dense_weight_bytes

    def __add__(self, other: "SparseCost") -> "SparseCost":
        return SparseCost(
            self.active_units + other.active_units,
            self.total_units + other.total_units,
            self.active_weight_bytes + other.active_weight_bytes,
            self.dense_weight_bytes + other.dense_weight_bytes,
        )

    @staticmethod
    def total(costs: Iterable["SparseCost"]) -> "SparseCost":
        costs = list(costs)
        if not costs:
            raise ValueError("no sparse layers to account for")
        result = costs[0]
        for cost in costs[1:]:
            result = result + cost
        return result

    def as_dict(self) -> dict[str, float]:
        return {
            "active_unit_fraction": self.unit_fraction,
            "active_weight_fraction": self.weight_fraction,
            "active_units": self.active_units,
            "total_units": self.total_units,
        }
