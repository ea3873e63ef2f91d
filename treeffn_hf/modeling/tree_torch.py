"""Fast PyTorch inference path of the tree FFN (CPU, and the GPU fallback).

It computes only the neurons on each token's path, never the whole MLP, in as few tensor ops as
possible (on a small CPU, per-op overhead rivals the arithmetic):
- one token (decode): all node scores in one matmul, the tree walked over Python floats, then the
  path's rows (nodes, leaf, shared) gathered from the row tables in one `index_select` each and
  the down projection summed in place with `embedding_bag`; big leaves and the shared rows (one
  contiguous block) are read in place instead;
- many tokens: routing in a fixed number of ops (the leaf whose path agrees with every branch
  sign), tokens grouped by leaf with one GEMM per visited leaf, and the few node neurons computed
  for every token and masked to its path.

The result equals `tree_ffn_masked_dense` (the tests hold it to that).
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F


@lru_cache(maxsize=None)
def _routing_tables(depth: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`paths[leaf]`: heap index of each internal node on the way to `leaf`; `leaf_signs[leaf, node]`:
    +1 where the path goes right at `node`, -1 where it goes left, 0 off the path."""
    leaves, nodes = 1 << depth, (1 << depth) - 1
    paths = torch.empty(leaves, depth, dtype=torch.long)
    signs = torch.zeros(leaves, nodes)
    for leaf in range(leaves):
        position = 0
        for level in range(depth):
            heap = (1 << level) - 1 + position
            right = (leaf >> (depth - 1 - level)) & 1
            paths[leaf, level] = heap
            signs[leaf, heap] = 1.0 if right else -1.0
            position = 2 * position + right
    return paths, signs


@lru_cache(maxsize=None)
def _path_rows(spec, include_leaf: bool = True, include_shared: bool = True) -> list[list[torch.Tensor]]:
    """`rows[t][leaf]`: row indices of tree t's path to `leaf` (nodes, then the leaf unless
    `include_leaf` is False); with one tree, the shared rows are appended (unless `include_shared`
    is False) so a token's rows are a single ready-made tensor. A pruned leaf (no path reaches it)
    gets a live leaf's rows."""
    paths, _ = _routing_tables(spec.depth)
    trees, nodes, width = spec.num_trees, spec.num_nodes, spec.node_width
    leaf_start = trees * nodes * width
    shared_start = leaf_start + spec.stored_leaves * spec.leaf_width
    shared = list(range(shared_start, shared_start + spec.shared_width))
    slots = spec.leaf_slots(pruned_to_live=True)
    table = []
    for t in range(trees):
        per_leaf = []
        for leaf in range(spec.num_leaves):
            rows = [(t * nodes + heap) * width + j for heap in paths[leaf].tolist() for j in range(width)]
            if include_leaf:
                first = leaf_start + slots[t][leaf] * spec.leaf_width
                rows += range(first, first + spec.leaf_width)
            per_leaf.append(torch.tensor(rows + (shared if trees == 1 and include_shared else []), dtype=torch.long))
        table.append(per_leaf)
    return table


def routing_bias(layer):
    """Flat (trees * nodes) routing bias (router biases, a pruned tree's forced branches) or None."""
    if layer.router_bias is None and not layer.spec.is_pruned:  # the common case, on the decode hot path
        return None
    _, bias = layer.routing_vectors()
    return None if bias is None else bias.detach().reshape(-1)


def routing_matrix(layer) -> torch.Tensor:
    """Contiguous (trees * nodes, hidden) routing vectors, cached until the weights change."""
    source = layer.gate_rows if layer.spec.routing == "self" else layer.router_weight
    key = (source.data_ptr(), source._version, source.dtype, source.device)
    cached = getattr(layer, "_routing_cache", None)
    if cached is None or cached[0] != key:
        vectors, _ = layer.routing_vectors()
        cached = (key, vectors.detach().reshape(-1, vectors.shape[-1]).contiguous())
        layer._routing_cache = cached
    return cached[1]


def route_from_scores(scores: torch.Tensor, depth: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(leaf, path) of every tree from all its node scores (N, T, nodes) at once: the leaf whose
    root-to-leaf signs agree most with the scores' signs, which is the leaf `tree_route`'s
    level-by-level walk reaches, without a loop over levels."""
    paths, leaf_signs = _routing_tables(depth)
    signs = torch.where(scores > 0, 1.0, -1.0).to(torch.float32)
    leaf = (signs @ leaf_signs.to(scores.device).T).argmax(dim=-1)
    return leaf, paths.to(scores.device)[leaf]


def _walk(scores: list[float], depth: int) -> int:
    position = 0
    for level in range(depth):
        position = 2 * position + (scores[(1 << level) - 1 + position] > 0)
    return position


def tree_torch_path(layer, x: torch.Tensor) -> torch.Tensor:
    """Sparse forward of `layer` (a TreeFFN) for x: (N, hidden)."""
    spec = layer.spec
    bias = routing_bias(layer)
    if x.shape[0] == 1 and layer.usage is None:
        scores = torch.mv(routing_matrix(layer), x[0])
        scores = (scores if bias is None else scores + bias).tolist()
        nodes = spec.num_nodes
        leaves = [_walk(scores[t * nodes : (t + 1) * nodes], spec.depth) for t in range(spec.num_trees)]
        return _one_token(layer, x, leaves)
    scores = F.linear(x, routing_matrix(layer), bias)
    leaf, path = route_from_scores(scores.view(-1, spec.num_trees, spec.num_nodes), spec.depth)
    if layer.usage is not None:
        layer.usage.record(leaf, path)
    if gathers_per_token(layer, leaf):
        return _per_token_gather(layer, x, leaf)
    return _grouped_by_leaf(layer, x, leaf, path)


def gathers_per_token(layer, leaf: torch.Tensor) -> bool:
    """Whether a batch routed to `leaf` (N, trees) takes the per-token gathers rather than the
    grouped GEMMs: the gathers copy every token's routed rows before reading them, the grouped
    path reads each visited leaf once in place but pays a few ops per leaf, so the gathers win
    when tokens share few leaves and the leaves are small (the policy's
    `tree_cpu_gather_row_cost` and `tree_cpu_leaf_overhead_elems`; shared rows cost both alike)."""
    spec, policy = layer.spec, layer.kernel_policy
    trees = torch.arange(spec.num_trees, device=leaf.device)
    visited = torch.unique(leaf * spec.num_trees + trees).numel()
    routed_rows = spec.num_trees * (spec.depth * spec.node_width + spec.leaf_width)
    gathered = policy.tree_cpu_gather_row_cost * leaf.shape[0] * routed_rows * layer.hidden_size
    grouped = (visited * spec.leaf_width + layer.node_rows) * layer.hidden_size
    return gathered <= grouped + policy.tree_cpu_leaf_overhead_elems * visited


def _token_rows(layer, leaves: list[int], include_leaf: bool, include_shared: bool = True) -> torch.Tensor:
    """Row indices one token reads: each tree's path (nodes, optionally its leaf), then shared
    (optionally)."""
    spec = layer.spec
    table = _path_rows(spec, include_leaf, include_shared)
    if spec.num_trees == 1:
        return table[0][leaves[0]]
    paths = [table[t][leaf] for t, leaf in enumerate(leaves)]
    shared = [torch.arange(layer.node_rows + layer.leaf_rows, spec.stored_units)] if include_shared else []
    return torch.cat(paths + shared)


@lru_cache(maxsize=None)
def _path_rows_stacked(spec) -> torch.Tensor:
    """(trees, leaves, rows per path) index table, without the shared rows."""
    return torch.stack([torch.stack(per_leaf) for per_leaf in _path_rows(spec, include_shared=False)])


def _shared_block(layer, x: torch.Tensor) -> torch.Tensor:
    """The always-on neurons of every token: one block of contiguous rows, three GEMMs."""
    shared = slice(layer.node_rows + layer.leaf_rows, layer.spec.stored_units)
    return (layer.act_fn(x @ layer.gate_rows[shared].T) * (x @ layer.up_rows[shared].T)) @ layer.down_rows[shared]


def _per_token_gather(layer, x: torch.Tensor, leaf: torch.Tensor) -> torch.Tensor:
    """A few tokens: gather every token's path rows at once (no loop over tokens), while the rows
    gathered for the whole batch stay fewer than the MLP has; the shared rows are read in place."""
    spec = layer.spec
    n_tok = x.shape[0]
    table = _path_rows_stacked(spec).to(x.device)
    rows = table[torch.arange(spec.num_trees, device=x.device), leaf].reshape(n_tok, -1)
    flat = rows.reshape(-1)
    width = rows.shape[1]
    g = torch.bmm(layer.gate_rows.index_select(0, flat).view(n_tok, width, -1), x[:, :, None]).squeeze(-1)
    u = torch.bmm(layer.up_rows.index_select(0, flat).view(n_tok, width, -1), x[:, :, None]).squeeze(-1)
    if spec.activation == "after_sum" and spec.node_width:
        blocks = spec.depth + 1
        path_len = spec.num_trees * blocks * spec.node_width
        shape = (n_tok, spec.num_trees, blocks, spec.node_width)
        g_path = g[:, :path_len].reshape(shape).sum(2, keepdim=True)
        u_path = u[:, :path_len].reshape(shape).sum(2, keepdim=True)
        a_path = (layer.act_fn(g_path) * u_path).expand(shape).reshape(n_tok, path_len)
        a = torch.cat([a_path, layer.act_fn(g[:, path_len:]) * u[:, path_len:]], dim=1)
    else:
        a = layer.act_fn(g) * u
    offsets = torch.arange(0, n_tok * width, width, device=x.device)
    # bmm under bf16 autocast yields bf16 activations; embedding_bag needs the table's dtype
    weights = a.reshape(-1).to(layer.down_rows.dtype)
    out = F.embedding_bag(flat, layer.down_rows, offsets, per_sample_weights=weights, mode="sum")
    return out + _shared_block(layer, x) if spec.shared_width else out


def _one_token(layer, x: torch.Tensor, leaves: list[int]) -> torch.Tensor:
    spec = layer.spec
    if spec.activation == "per_node" and spec.leaf_width * layer.hidden_size >= layer.kernel_policy.tree_in_place_leaf_elems:
        return _one_token_leaf_in_place(layer, x, leaves)
    rows = _token_rows(layer, leaves, include_leaf=True).to(x.device)
    token = x[0]
    g = torch.mv(layer.gate_rows.index_select(0, rows), token)
    u = torch.mv(layer.up_rows.index_select(0, rows), token)
    if spec.activation == "after_sum" and spec.node_width:
        blocks = spec.depth + 1
        path_len = spec.num_trees * blocks * spec.node_width
        g_path = g[:path_len].view(spec.num_trees, blocks, spec.node_width).sum(1, keepdim=True)
        u_path = u[:path_len].view(spec.num_trees, blocks, spec.node_width).sum(1, keepdim=True)
        a_path = (layer.act_fn(g_path) * u_path).expand(-1, blocks, -1).reshape(path_len)
        a = torch.cat([a_path, layer.act_fn(g[path_len:]) * u[path_len:]])
    else:
        a = layer.act_fn(g) * u
    # Sums the selected rows of down_rows, weighted by `a`, reading them in place.
    return F.embedding_bag(rows, layer.down_rows, _zero_offset(x.device), per_sample_weights=a, mode="sum")


def _one_token_leaf_in_place(layer, x: torch.Tensor, leaves: list[int]) -> torch.Tensor:
    """per_node with big leaves: leaf slabs and the shared rows (one contiguous block) read as
    views, only the node rows gathered."""
    token = x[0]
    act = layer.act_fn
    out = _shared_block(layer, x)[0] if layer.spec.shared_width else None
    for tree, leaf in enumerate(leaves):
        gate, up, down = (layer.leaf_block(table, tree, leaf) for table in (layer.gate_rows, layer.up_rows, layer.down_rows))
        y = torch.mv(down.T, act(torch.mv(gate, token)) * torch.mv(up, token))
        out = y if out is None else out + y
    rows = _token_rows(layer, leaves, include_leaf=False, include_shared=False).to(x.device)
    if rows.numel():
        a = act(torch.mv(layer.gate_rows.index_select(0, rows), token)) * torch.mv(
            layer.up_rows.index_select(0, rows), token
        )
        out = out + F.embedding_bag(rows, layer.down_rows, _zero_offset(x.device), per_sample_weights=a, mode="sum")
    return out[None]


@lru_cache(maxsize=None)
def _zero_offset_cached(device: str) -> torch.Tensor:
    return torch.zeros(1, dtype=torch.long, device=device)


def _zero_offset(device: torch.device) -> torch.Tensor:
    return _zero_offset_cached(str(device))


def _grouped_by_leaf(layer, x: torch.Tensor, leaf: torch.Tensor, path: torch.Tensor) -> torch.Tensor:
    spec = layer.spec
    act = layer.act_fn
    n_tok, hidden = x.shape
    out = _shared_block(layer, x)
    node_gate, node_up, node_down = layer.node_gate, layer.node_up, layer.node_down
    for tree in range(spec.num_trees):
        node_g_sum = node_u_sum = None
        if spec.node_width:
            # Node neurons are few: compute them for every token, keep each token's path.
            node_rows = spec.num_nodes * spec.node_width
            g = F.linear(x, node_gate[tree].reshape(node_rows, hidden)).view(n_tok, spec.num_nodes, -1)
            u = F.linear(x, node_up[tree].reshape(node_rows, hidden)).view(n_tok, spec.num_nodes, -1)
            index = path[:, tree, :, None].expand(n_tok, spec.depth, spec.node_width)
            g, u = g.gather(1, index), u.gather(1, index)
            if spec.activation == "after_sum":
                node_g_sum, node_u_sum = g.sum(1), u.sum(1)
            else:
                a = act(g) * u  # under autocast bf16, while x stays float32
                full = a.new_zeros(n_tok, spec.num_nodes, spec.node_width).scatter_(1, index, a)
                out += full.view(n_tok, node_rows) @ node_down[tree].reshape(node_rows, hidden)
        order = torch.argsort(leaf[:, tree])
        counts = torch.bincount(leaf[:, tree], minlength=spec.num_leaves).tolist()
        grouped = x.index_select(0, order)
        outputs, path_acts = [], []
        start = 0
        for leaf_id, count in enumerate(counts):
            if not count:
                continue
            rows = grouped[start : start + count]
            g = F.linear(rows, layer.leaf_block(layer.gate_rows, tree, leaf_id))
            u = F.linear(rows, layer.leaf_block(layer.up_rows, tree, leaf_id))
            if node_g_sum is not None:
                picked = order[start : start + count]
                a = act(g + node_g_sum[picked]) * (u + node_u_sum[picked])
                path_acts.append(a)
            else:
                a = act(g) * u
            outputs.append(a @ layer.leaf_block(layer.down_rows, tree, leaf_id))
            start += count
        out.index_add_(0, order, torch.cat(outputs))
        if path_acts:
            # after_sum: every node on the path reuses the path's activation.
            acts = torch.cat(path_acts)
            a = acts.new_empty(n_tok, spec.node_width).index_copy_(0, order, acts)
            full = a.new_zeros(n_tok, spec.num_nodes, spec.node_width).scatter_(
                1, index, a[:, None, :].expand(n_tok, spec.depth, spec.node_width)
            )
            out += full.view(n_tok, node_rows) @ node_down[tree].reshape(node_rows, hidden)
    return out
