"""Layer specifications for the two sparse MLP replacements.

A spec is what a user asks for (`TreeSpec`, `MGSSpec`); `resolve(hidden, intermediate)` checks it
against the dense MLP it replaces and fills in derived widths, so the config stores a spec that
rebuilds exactly the same layer. This file is part of the remote-code bundle: standard library only.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

ROUTING_MODES = ("self", "hyperplane")
ACTIVATION_PLACEMENTS = ("per_node", "after_sum")
LEAF_NEURONS = ("partition", "selected")
MGS_SELECTIONS = ("top_k", "threshold")
MGS_PREDICTORS = ("nested", "quantized", "linear")
MGS_DOWN_FORMATS = ("int8_rows", "bf16")
MAX_DEPTH = 20


class InvalidSpecError(ValueError):
    """A sparse-layer spec that cannot be built for the given MLP shape."""


@dataclass(frozen=True)
class TreeSpec:
    """A forest of `num_trees` binary trees of `depth` levels of internal nodes.

    Every token takes one root-to-leaf path per tree and computes only the neurons on it:
    `depth` node blocks of `node_width` neurons and one leaf block of `leaf_width` neurons,
    plus `shared_width` always-on neurons. Node `j` of a tree is stored in heap order
    (children `2j+1`, `2j+2`); leaves are numbered by their path bits.

    `leaf_width=None` takes the widest leaf that fits the dense MLP and gives the remaining
    neurons to the shared block, so that every dense neuron lands in exactly one block.

    `leaf_neurons='partition'` lays every dense neuron into exactly one block. With `'selected'`
    each leaf holds its own copies of `leaf_width` dense neurons, chosen for the tokens routed to it
    (`treeffn distill` picks them), so leaves may share neurons and the layer stores
    `stored_units` rows, independent of the MLP's width: more leaves buy a better fit at the same
    neurons per token for more stored rows (`TreeFFN.stored_multiple`). It routes by hyperplanes; its
    `leaf_width` defaults to the partition's (stored once), `shared_width` to 0.

    `live_leaves` (one sorted tuple per tree, None = all) makes a pruned, static tree: only those
    leaves are stored (in that order, after the node blocks), and a node whose one subtree holds no
    live leaf always branches to the other. Widths still describe the complete tree, so the spec
    keeps checking against the dense MLP it came from; the layer stores `stored_units` rows.
    """

    num_trees: int = 1
    depth: int = 5
    node_width: int = 1
    leaf_width: Optional[int] = None
    routing: Literal["self", "hyperplane"] = "self"
    activation: Literal["per_node", "after_sum"] = "per_node"
    shared_width: Optional[int] = None
    live_leaves: Optional[tuple[tuple[int, ...], ...]] = None
    leaf_neurons: Literal["partition", "selected"] = "partition"

    method = "tree"

    def __post_init__(self) -> None:
        if self.live_leaves is not None:  # JSON gives lists; a frozen spec must stay hashable
            object.__setattr__(self, "live_leaves", tuple(tuple(int(leaf) for leaf in tree) for tree in self.live_leaves))

    @property
    def num_nodes(self) -> int:
        return (1 << self.depth) - 1

    @property
    def num_leaves(self) -> int:
        return 1 << self.depth

    def validate(self) -> None:
        """Checks that need no model shape."""
        if self.routing not in ROUTING_MODES:
            raise InvalidSpecError(f"routing must be one of {ROUTING_MODES}, got {self.routing!r}")
        if self.activation not in ACTIVATION_PLACEMENTS:
            raise InvalidSpecError(
                f"activation must be one of {ACTIVATION_PLACEMENTS}, got {self.activation!r}"
            )
        if self.leaf_neurons not in LEAF_NEURONS:
            raise InvalidSpecError(f"leaf_neurons must be one of {LEAF_NEURONS}, got {self.leaf_neurons!r}")
        if self.num_trees < 1:
            raise InvalidSpecError(f"num_trees must be >= 1, got {self.num_trees}")
        if not 1 <= self.depth <= MAX_DEPTH:
            raise InvalidSpecError(f"depth must be in [1, {MAX_DEPTH}], got {self.depth}")
        if self.node_width < 0:
            raise InvalidSpecError(f"node_width must be >= 0, got {self.node_width}")
        if self.leaf_width is not None and self.leaf_width < 1:
            raise InvalidSpecError(f"leaf_width must be >= 1, got {self.leaf_width}")
        if self.shared_width is not None and self.shared_width < 0:
            raise InvalidSpecError(f"shared_width must be >= 0, got {self.shared_width}")
        if self.routing == "self" and self.node_width == 0:
            raise InvalidSpecError(
                "routing='self' branches on the sign of a node neuron's gate pre-activation, so it "
                "needs node_width >= 1; use routing='hyperplane' for node_width=0 (FFF-style routers)"
            )
        if self.live_leaves is not None:
            if len(self.live_leaves) != self.num_trees:
                raise InvalidSpecError(
                    f"live_leaves needs one tuple per tree ({self.num_trees}), got {len(self.live_leaves)}"
                )
            for tree, leaves in enumerate(self.live_leaves):
                if not leaves:
                    raise InvalidSpecError(f"live_leaves: tree {tree} keeps no leaf; every tree needs one")
                if list(leaves) != sorted(set(leaves)) or not 0 <= leaves[0] <= leaves[-1] < self.num_leaves:
                    raise InvalidSpecError(
                        f"live_leaves: tree {tree} must list distinct leaves in [0, {self.num_leaves}) in "
                        f"increasing order, got {list(leaves)}"
                    )
        if self.leaf_neurons == "selected":
            if self.routing != "hyperplane":
                raise InvalidSpecError(
                    "leaf_neurons='selected' routes tokens by hyperplanes fitted to their inputs (a node's "
                    "own neuron need not split them); use routing='hyperplane'"
                )
            if self.activation != "per_node":
                raise InvalidSpecError(
                    "leaf_neurons='selected' computes each block's neurons on their own; use activation='per_node'"
                )
        if self.activation == "after_sum" and self.node_width > 0:
            if self.leaf_width is not None and self.leaf_width != self.node_width:
                raise InvalidSpecError(
                    "activation='after_sum' sums the path's pre-activations neuron by neuron, so it "
                    f"needs leaf_width == node_width (got leaf_width={self.leaf_width}, "
                    f"node_width={self.node_width})"
                )

    def resolve(self, hidden_size: int, intermediate_size: int) -> "TreeSpec":
        """Check the spec against a dense MLP of this shape; fill in leaf and shared widths."""
        self.validate()
        if self.leaf_neurons == "selected":
            return self._resolve_selected(hidden_size, intermediate_size)
        trees = self.num_trees
        node_units = trees * self.num_nodes * self.node_width
        leaf_slots = trees * self.num_leaves
        fixed_leaf = self.leaf_width
        if fixed_leaf is None and self.activation == "after_sum" and self.node_width > 0:
            fixed_leaf = self.node_width
        shared = self.shared_width
        if fixed_leaf is None:
            available = intermediate_size - (shared or 0) - node_units
            leaf = available // leaf_slots
            if leaf < 1:
                raise InvalidSpecError(
                    f"depth {self.depth} with {trees} tree(s) and node_width {self.node_width} needs "
                    f"{node_units + leaf_slots + (shared or 0)} neurons at least, but the MLP has "
                    f"{intermediate_size}; lower depth, num_trees or node_width"
                )
            if shared is None:
                shared = available - leaf * leaf_slots
            elif available != leaf * leaf_slots:
                raise InvalidSpecError(
                    f"widths do not divide: {intermediate_size} - shared {shared} - node units "
                    f"{node_units} = {available} is not a multiple of {leaf_slots} leaves; "
                    f"leave shared_width unset to absorb the remainder"
                )
        else:
            leaf = fixed_leaf
            used = node_units + leaf_slots * leaf
            if shared is None:
                shared = intermediate_size - used
                per_token = trees * (self.depth * self.node_width + leaf)
                if shared > per_token:
                    fitting = intermediate_size // (trees * (self.num_nodes + self.num_leaves))
                    raise InvalidSpecError(
                        f"the trees use only {used} of {intermediate_size} neurons, leaving {shared} "
                        f"always-on shared neurons (more than a token's whole path); widen the blocks "
                        f"(e.g. node_width={fitting} with activation='after_sum') or set shared_width "
                        f"explicitly"
                    )
            if shared < 0 or used + shared != intermediate_size:
                raise InvalidSpecError(
                    f"widths do not divide: {trees} tree(s) x ({self.num_nodes} nodes x "
                    f"{self.node_width} + {self.num_leaves} leaves x {leaf}) + shared {shared} = "
                    f"{used + shared}, but the MLP has {intermediate_size} neurons; leave "
                    f"leaf_width unset to fit it automatically"
                )
        resolved = dataclasses.replace(self, leaf_width=leaf, shared_width=shared)
        resolved.validate()
        return resolved

    def _resolve_selected(self, hidden_size: int, intermediate_size: int) -> "TreeSpec":
        trees = self.num_trees
        distinct = trees * (self.num_nodes * self.node_width + self.num_leaves)
        if distinct > intermediate_size:
            raise InvalidSpecError(
                f"depth {self.depth} with {trees} tree(s) and node_width {self.node_width} needs {distinct} "
                f"neurons at least (every block starts from neurons of its own), but the MLP has "
                f"{intermediate_size}; lower depth, num_trees or node_width"
            )
        shared = 0 if self.shared_width is None else self.shared_width
        leaf = self.leaf_width
        if leaf is None:  # the partition's leaf: the layer stores about one copy of the MLP
            leaf = max(1, (intermediate_size - shared - trees * self.num_nodes * self.node_width) // (
                trees * self.num_leaves))
        resolved = dataclasses.replace(self, leaf_width=leaf, shared_width=shared)
        if resolved.active_units > intermediate_size:
            raise InvalidSpecError(
                f"a token would compute {resolved.active_units} neurons ({trees} tree(s) x ({self.depth} x "
                f"node_width {self.node_width} + leaf {leaf}) + shared {shared}), more than the MLP's "
                f"{intermediate_size}; narrow the leaves"
            )
        resolved.validate()
        return resolved

    @property
    def active_units(self) -> int:
        """Neurons computed per token (needs a resolved spec)."""
        return self.num_trees * (self.depth * self.node_width + self.leaf_width) + self.shared_width

    # -- pruned trees ----------------------------------------------------------------------
    @property
    def is_pruned(self) -> bool:
        return self.live_leaves is not None

    @property
    def stored_leaves(self) -> int:
        """Leaf blocks the layer stores (all of them unless pruned)."""
        if self.live_leaves is None:
            return self.num_trees * self.num_leaves
        return sum(len(leaves) for leaves in self.live_leaves)

    @property
    def stored_units(self) -> int:
        """Rows of the layer's weight tables (needs a resolved spec)."""
        return self.num_trees * self.num_nodes * self.node_width + self.stored_leaves * self.leaf_width + self.shared_width

    def leaf_slots(self, pruned_to_live: bool = False) -> list[list[int]]:
        """[tree][leaf] -> index of the leaf's stored block; -1 for a pruned leaf, or with
        `pruned_to_live` the tree's first live block (what the compute tables use: no path reaches
        a pruned leaf, but a NaN routing score, which no comparison steers, must still read valid
        rows)."""
        slots, next_slot = [], 0
        for tree in range(self.num_trees):
            live = set(range(self.num_leaves)) if self.live_leaves is None else set(self.live_leaves[tree])
            first_live, row = next_slot, []
            for leaf in range(self.num_leaves):
                row.append(next_slot if leaf in live else (first_live if pruned_to_live else -1))
                next_slot += leaf in live
            slots.append(row)
        return slots

    def forced_branches(self) -> list[list[int]]:
        """[tree][node] -> +1 (always right) or -1 (always left) where the other subtree holds no live
        leaf, 0 where the routing decides. All zeros unless pruned."""
        forced = []
        for tree in range(self.num_trees):
            live = set(range(self.num_leaves)) if self.live_leaves is None else set(self.live_leaves[tree])
            row = []
            for level in range(self.depth):
                span = 1 << (self.depth - level)  # leaves below a node at this level
                for position in range(1 << level):
                    first = position * span
                    left = any(leaf in live for leaf in range(first, first + span // 2))
                    right = any(leaf in live for leaf in range(first + span // 2, first + span))
                    row.append(0 if left == right else (1 if right else -1))
            forced.append(row)
        return forced

    def shape(self) -> dict[str, Any]:
        """The fields that lay the forest out: what a config's `layer_shapes` stores per layer."""
        return {key: value for key, value in dataclasses.asdict(self).items() if key != "live_leaves"}

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **dataclasses.asdict(self)}


@dataclass(frozen=True)
class MGSSpec:
    """Micro-gated MLP: the dense SwiGLU weights plus a predictor that picks neurons per token.

    `predictor='quantized'` scores each neuron by |silu(g~) * u~| on group-wise 4-bit copies of
    gate_proj and up_proj (`group_size` weights per bf16 scale and zero; resolved to the largest
    power of two up to it that divides the hidden size); it needs no training.
    `predictor='nested'` (the default) uses the same 4-bit codes as the high nibbles of gate_proj
    and up_proj themselves, which are snapped to the 8-bit grid around them: a selected neuron
    then reads only its low nibbles and its down_proj row, and the predictor is no extra copy.
    `predictor='linear'` is a trained gate: `Linear(hidden, rank) -> Linear(rank, intermediate)`,
    or a full `Linear(hidden, intermediate)` with `rank=None`, as in the MGS paper.

    With the nested predictor, `down_format` is how down_proj is stored: `'int8_rows'` (the default)
    one int8 row per neuron with a bf16 scale per `group_size` outputs, so a kernel reads only the
    selected neurons' rows at one byte a weight; `'bf16'` rounds it to bf16 values (checkpoints from
    before the choice), which the CPU kernel streams whole.

    `selection='top_k'` computes `ceil(density * intermediate)` neurons per token;
    `selection='threshold'` computes the neurons whose score exceeds a per-layer threshold
    calibrated to `density` on data (the count then varies per token).
    """

    density: float = 0.8  # as converted (top-k); `treeffn distill` then sets thresholds within a perplexity budget
    predictor: Literal["nested", "quantized", "linear"] = "nested"
    rank: Optional[int] = 64
    group_size: int = 64
    selection: Literal["top_k", "threshold"] = "top_k"
    down_format: Literal["int8_rows", "bf16"] = "int8_rows"

    method = "mgs"

    def resolve(self, hidden_size: int, intermediate_size: int) -> "MGSSpec":
        self.validate()
        if self.predictor == "linear":
            if self.rank is not None and not 1 <= self.rank <= min(hidden_size, intermediate_size):
                raise InvalidSpecError(
                    f"rank must be in [1, {min(hidden_size, intermediate_size)}] or None (full gate), "
                    f"got {self.rank}"
                )
            return self
        if hidden_size % 2:
            raise InvalidSpecError(f"the {self.predictor} predictor packs two 4-bit codes a byte: hidden size "
                                   f"{hidden_size} must be even; use predictor='linear'")
        group = 1 << (self.group_size.bit_length() - 1)
        while hidden_size % group:
            group //= 2
        return dataclasses.replace(self, group_size=max(group, 2))

    def validate(self) -> None:
        """Checks that need no model shape."""
        if not 0.0 < self.density <= 1.0:
            raise InvalidSpecError(f"density must be in (0, 1], got {self.density}")
        if self.selection not in MGS_SELECTIONS:
            raise InvalidSpecError(
                f"selection must be one of {MGS_SELECTIONS}, got {self.selection!r}"
            )
        if self.predictor not in MGS_PREDICTORS:
            raise InvalidSpecError(f"predictor must be one of {MGS_PREDICTORS}, got {self.predictor!r}")
        if self.down_format not in MGS_DOWN_FORMATS:
            raise InvalidSpecError(f"down_format must be one of {MGS_DOWN_FORMATS}, got {self.down_format!r}")
        if self.rank is not None and self.rank < 1:
            raise InvalidSpecError(f"rank must be >= 1 or None (full gate), got {self.rank}")
        if self.group_size < 2:
            raise InvalidSpecError(f"group_size must be >= 2, got {self.group_size}")

    def top_k(self, intermediate_size: int) -> int:
        # The epsilon keeps 0.1 * 1000 from rounding up to 101 through float error.
        return max(1, min(intermediate_size, math.ceil(self.density * intermediate_size - 1e-9)))

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **dataclasses.asdict(self)}


LayerSpec = Union[TreeSpec, MGSSpec]
_SPEC_TYPES = {"tree": TreeSpec, "mgs": MGSSpec}


def spec_from_dict(data: dict[str, Any]) -> LayerSpec:
    """Rebuild a spec from its `to_dict()` form (as stored in the model config)."""
    data = dict(data)
    method = data.pop("method", None)
    if method not in _SPEC_TYPES:
        raise InvalidSpecError(f"unknown sparse method {method!r}; expected one of {sorted(_SPEC_TYPES)}")
    cls = _SPEC_TYPES[method]
    if method == "mgs":
        data.setdefault("predictor", "linear")  # checkpoints from before the predictor choice
        data.setdefault("down_format", "bf16")  # ... and from before int8 down rows
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise InvalidSpecError(f"unknown {method} option(s): {sorted(unknown)}")
    return cls(**data)


def tree_spec_for_fraction(
    hidden_size: int,
    intermediate_size: int,
    fraction: float,
    *,
    node_widths: tuple[int, ...] = (1, 2, 4, 8),
    **options: Any,
) -> TreeSpec:
    """The resolved single-width-choice tree whose active fraction of units is closest to `fraction`
    (compared in log space), searching depth and node width; `options` fix other TreeSpec fields."""
    best, best_gap = None, math.inf
    for depth in range(1, MAX_DEPTH + 1):
        for node_width in node_widths:
            try:
                spec = TreeSpec(depth=depth, node_width=node_width, **options).resolve(hidden_size, intermediate_size)
            except InvalidSpecError:
                continue
            gap = abs(math.log(spec.active_units / intermediate_size) - math.log(fraction))
            if gap < best_gap:
                best, best_gap = spec, gap
    if best is None:
        raise InvalidSpecError(f"no tree fits an MLP of {intermediate_size} neurons with {options}")
    return best


def tree_shape_at(
    hidden_size: int, intermediate_size: int, active_units: int, *, num_trees: int = 1, depth: int = 3,
    node_width: int = 1, routing: str = "self",
) -> Optional[TreeSpec]:
    """The forest of this shape that computes as many neurons per token as it can without passing
    `active_units`, every dense neuron still in exactly one block; None if none fits.

    With every neuron placed, the shape fixes the shared width: a token computes
    `I - T * node_width * (nodes - depth) - T * leaf * (leaves - 1)` neurons, which falls as the leaf
    widens, and the neurons the leaves leave over are always on. So the narrowest leaf within the
    budget is the one closest to it, and deeper or more trees mean more shared neurons.
    """
    probe = TreeSpec(num_trees=num_trees, depth=depth, node_width=node_width, routing=routing, leaf_width=1,
                     shared_width=0)
    probe.validate()
    trees, nodes, leaves = num_trees, probe.num_nodes, probe.num_leaves
    off_path = intermediate_size - trees * node_width * (nodes - depth) - active_units
    leaf = max(1, -(-off_path // (trees * (leaves - 1))))  # ceil
    shared = intermediate_size - trees * (nodes * node_width + leaves * leaf)
    if shared < 0:
        return None
    spec = dataclasses.replace(probe, leaf_width=leaf, shared_width=shared).resolve(hidden_size, intermediate_size)
    return spec if spec.active_units <= active_units else None
