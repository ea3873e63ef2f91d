"""Per-token cost of a sparse MLP, relative to the dense MLP it replaced."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable


@dataclass(frozen=True)
class SparseCost:
    """Units are intermediate neurons; weight elements include routers and gates that are read.

    Both denominators are the dense MLP's (`intermediate` neurons, `3 * hidden * intermediate`
    weights), so fractions compare directly with the dense model.
    """

    active_units: float
    total_units: int
    active_weight_elems: float
    dense_weight_elems: int

    @property
    def unit_fraction(self) -> float:
        return self.active_units / self.total_units

    @property
    def weight_fraction(self) -> float:
        return self.active_weight_elems / self.dense_weight_elems

    def __add__(self, other: "SparseCost") -> "SparseCost":
        return SparseCost(
            self.active_units + other.active_units,
            self.total_units + other.total_units,
            self.active_weight_elems + other.active_weight_elems,
            self.dense_weight_elems + other.dense_weight_elems,
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
