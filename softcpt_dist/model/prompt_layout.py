"""Prompts described position by position, and the shared-prefix layout that encodes each shared
leading run of positions once.

Why it is exact: CLIP's text mask is causal, so the hidden state of position ``i`` (in every layer)
depends only on positions ``<= i``. Two prompts that agree on positions ``0..i`` -- the same token,
or the same row of the same context tensor, at each -- therefore have identical hidden states
there. Merging such positions turns the prompts into a tree (a trie): a node per distinct
``(parent, source)``; every node attends to its ancestors and itself, exactly as its position
attends to earlier positions in each of its prompts. Gradients reaching a shared node are the sum
over its prompts, which is what backward through the separate copies would give.

The tree is cut into *segments*: maximal chains of nodes that the same prompts pass through (the
shared ``[SOS] ctx_1..ctx_N`` of a task, then each class's ``<name> . [EOS]``). A segment's tokens
attend to the rows of all its ancestors plus, causally, its own; segments with the same start depth
and length form one batched attention call. Position-wise work (layer norms, projections, MLP) runs
on the packed rows of all nodes, each exactly once and without padding.
"""

from __future__ import annotations

from collections import OrderedDict, defaultdict
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from softcpt_dist.kernels._triton import use_triton
from softcpt_dist.kernels.prompt_assembly import triton_prompt_assembly


@dataclass
class PromptBatch:
    """Prompts to encode. ``source[p, i]``: position ``i`` of prompt ``p`` is row ``source`` of
    ``tokens`` (frozen token embeddings) when ``>= 0``, row ``-1 - source`` of ``ctx`` (context
    vectors) when ``< 0``; positions at or after ``length[p]`` are padding. The feature is read at
    ``eot`` (``length - 1``, except for text towers without a causal mask, which read all positions)."""

    tokens: torch.Tensor  # [V, D]
    ctx: torch.Tensor  # [R, D] (R may be 0)
    source: torch.Tensor  # [P, L] long
    length: torch.Tensor  # [P] long
    eot: torch.Tensor  # [P] long

    def __len__(self) -> int:
        return self.source.shape[0]

    def rows(self, source: torch.Tensor) -> torch.Tensor:
        """The input embedding of every entry of ``source`` (any shape), in the context's dtype where it
        has one (learnable contexts stay fp32 until the encoder casts)."""
        tok = self.tokens[source.clamp(min=0)]
        if self.ctx.shape[0] == 0:
            return tok
        ctx = self.ctx[(-1 - source).clamp(min=0)]
        return torch.where((source < 0).unsqueeze(-1), ctx.to(tok.dtype), tok)

    def dense(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Token embeddings ``[P, max length, D]`` and EOT positions: the padded layout, cut after the
        longest prompt (later positions cannot change any EOT feature under the causal mask)."""
        return self.rows(self.source[:, : int(self.length.max())]), self.eot


def reference_prompt_assembly(tokens: torch.Tensor, context: torch.Tensor, positional: torch.Tensor,
                              source: torch.Tensor, depth: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The PyTorch path: ``PromptBatch.rows`` (a context row cast to the tokens' dtype) plus the positional
    embedding of each row's depth, in ``dtype``."""
    rows = PromptBatch(tokens, context, source, source, source).rows(source)
    return rows.to(dtype) + positional[depth].to(dtype)


def prompt_assembly(tokens: torch.Tensor, context: torch.Tensor, positional: torch.Tensor, source: torch.Tensor,
                    depth: torch.Tensor, dtype: Optional[torch.dtype] = None, enabled: str = "auto") -> torch.Tensor:
    """Dispatcher: packed encoder input ``[R, D]``; row ``i`` is ``tokens[source[i]]`` (``source >= 0``) or
    ``context[-1 - source[i]]`` (``< 0``), plus ``positional[depth[i]]``, in ``dtype`` (default the
    tokens'). The Triton kernel (``kernels/prompt_assembly.py``) where ``use_triton`` says so, else the
    reference."""
    dtype = dtype or tokens.dtype
    if context.shape[0] == 0:
        context = tokens.new_zeros(0, tokens.shape[1])
    if tokens.shape[1] != positional.shape[1] or context.shape[1] != tokens.shape[1]:
        raise ValueError(f"prompt assembly: widths differ (tokens {tokens.shape[1]}, context {context.shape[1]}, "
                         f"positional {positional.shape[1]})")
    if use_triton(enabled, tokens, context, positional, source, depth) and dtype == tokens.dtype:
        return triton_prompt_assembly(tokens, context, positional, source, depth)
    return reference_prompt_assembly(tokens, context, positional, source, depth, dtype)


# With text.batch_invariant (the default), every attention call sees a multiple of KEY_BLOCK keys (masked padding after the real ones), so
# that a query's scores are reduced over whole vectors of keys however its prompt's tree is cut into
# segments (which depends on the prompts encoded with it): the same sums in the same order. Masked
# keys get exactly zero weight, and their rows exactly zero gradient.
KEY_BLOCK = 16
# Attention is two matrix products over a bucket's queries; BLAS sums a product of fewer than 4 rows
# in another order (batch_invariance.py), so short segments get repeats of their last query.
MIN_ROWS = 4


@dataclass
class Bucket:
    """Segments of one start depth and length: queries ``[n, len]`` and keys ``[n, K]`` as node rows, the
    ``start + len`` real ones first (K: that, rounded up to a multiple of ``KEY_BLOCK``)."""

    start: int
    queries: torch.Tensor
    keys: torch.Tensor
    mask: torch.Tensor  # [len, K] bool: query i sees keys 0 .. start + i

    def to(self, device) -> "Bucket":
        return Bucket(self.start, self.queries.to(device), self.keys.to(device), self.mask.to(device))


@dataclass
class SharedPrefixLayout:
    """The prompt tree of a ``PromptBatch``: one row per distinct node."""

    node_source: torch.Tensor  # [U]: the source of each node (as in PromptBatch.source)
    node_depth: torch.Tensor  # [U]: its position
    buckets: List[Bucket]
    order: torch.Tensor  # [U]: node rows in node order, from the buckets' concatenated query rows
    eot_nodes: torch.Tensor  # [P]: the node holding each prompt's EOT
    # Nodes are numbered in preorder (a node before its subtree, subtrees contiguous), so node k's
    # subtree is the range k .. subtree_end[k] - 1: node q attends k iff k <= q < subtree_end[k]
    # (what the Triton attention kernel tiles by: kernels/shared_prefix_attention.py).
    node_parent: torch.Tensor  # [U]: parent node, -1 for roots
    subtree_end: torch.Tensor  # [U]

    def __post_init__(self):
        # All buckets' query rows and key rows, concatenated, and each bucket's share of them.
        self.query_rows = torch.cat([b.queries.reshape(-1) for b in self.buckets])
        self.key_rows = torch.cat([b.keys.reshape(-1) for b in self.buckets])
        self.query_sizes = [b.queries.numel() for b in self.buckets]
        self.key_sizes = [b.keys.numel() for b in self.buckets]

    @property
    def positions(self) -> int:
        """Token positions encoded per layer (dense: the sum of all prompts' lengths, or more padded)."""
        return int(self.node_source.shape[0])

    @property
    def attention_pairs(self) -> int:
        """(query, key) pairs attention scores per layer: every node attends its ancestors and itself."""
        if not hasattr(self, "_pairs"):
            self._pairs = int((self.node_depth + 1).sum())
        return self._pairs

    def to(self, device) -> "SharedPrefixLayout":
        return SharedPrefixLayout(self.node_source.to(device), self.node_depth.to(device),
                                  [b.to(device) for b in self.buckets], self.order.to(device),
                                  self.eot_nodes.to(device), self.node_parent.to(device), self.subtree_end.to(device))


def structure_key(source: torch.Tensor, length: torch.Tensor) -> bytes:
    """What a layout depends on: the prompts' sources and lengths (CPU tensors)."""
    return str(tuple(source.shape)).encode() + source.numpy().tobytes() + length.numpy().tobytes()


def _prompt_tree(source: torch.Tensor, length: torch.Tensor, preorder: bool = True):
    """``(path, node_source, node_depth, node_parent, total)``: the node of every (prompt, position),
    merging positions that agree on everything up to and including themselves; nodes numbered in
    preorder unless ``preorder=False`` (then by depth: enough to count them)."""
    n_prompts, max_len = source.shape[0], int(length.max())
    path = torch.full((n_prompts, max_len), -1, dtype=torch.long)  # node of (prompt, position)
    parent_of_prompt = torch.full((n_prompts,), -1, dtype=torch.long)
    node_source, node_depth, node_parent, total = [], [], [], 0
    for depth in range(max_len):
        alive = torch.nonzero(length > depth).flatten()
        pairs = torch.stack([parent_of_prompt[alive], source[alive, depth]], dim=1)
        unique, inverse = torch.unique(pairs, dim=0, return_inverse=True)
        ids = total + inverse
        path[alive, depth] = ids
        parent_of_prompt[alive] = ids
        node_parent.append(unique[:, 0])
        node_source.append(unique[:, 1])
        node_depth.append(torch.full((len(unique),), depth, dtype=torch.long))
        total += len(unique)
    node_source, node_depth, node_parent = torch.cat(node_source), torch.cat(node_depth), torch.cat(node_parent)
    if not preorder:
        return path, node_source, node_depth, node_parent, total
    renumber = _preorder(path, total)
    new_parent = torch.where(node_parent >= 0, renumber[node_parent.clamp(min=0)], node_parent)
    order = torch.empty_like(renumber)
    order[renumber] = torch.arange(total)
    path = torch.where(path >= 0, renumber[path.clamp(min=0)], path)
    return path, node_source[order], node_depth[order], new_parent[order], total


def _preorder(path: torch.Tensor, total: int) -> torch.Tensor:
    """The preorder number of every node: with the prompts sorted by their paths (a prompt that ends
    before another sorts first), nodes in order of first appearance, each prompt read root to leaf."""
    perm = torch.arange(path.shape[0])
    for depth in reversed(range(path.shape[1])):  # lexicographic sort: stable sorts, last key first
        perm = perm[torch.sort(path[perm, depth], stable=True).indices]
    flat = path[perm].reshape(-1)
    seen = torch.nonzero(flat >= 0).flatten()
    first = torch.full((total,), flat.numel(), dtype=torch.long).scatter_reduce(0, flat[seen], seen, "amin")
    renumber = torch.empty(total, dtype=torch.long)
    renumber[torch.argsort(first)] = torch.arange(total)
    return renumber


def tree_positions(source: torch.Tensor, length: torch.Tensor) -> int:
    """Token positions per layer of the shared-prefix layout of these prompts (its node count)."""
    return _prompt_tree(source, length, preorder=False)[4]


def build_layout(source: torch.Tensor, length: torch.Tensor, key_block: int = KEY_BLOCK,
                 min_queries: int = MIN_ROWS) -> SharedPrefixLayout:
    """The prompt tree of ``source``/``length`` (CPU tensors) cut into segments and attention buckets."""
    n_prompts, max_len = source.shape[0], int(length.max())
    path, node_source, node_depth, node_parent, total = _prompt_tree(source, length)
    valid = path >= 0
    count = torch.bincount(path[valid], minlength=total)  # prompts through each node
    # A node starts a segment unless it is its parent's only continuation (same prompts pass through).
    starts = (node_parent < 0) | (count != count[node_parent.clamp(min=0)])
    representative = torch.empty(total, dtype=torch.long)
    representative[path[valid]] = torch.nonzero(valid)[:, 0]  # some prompt through each node
    segment_of = torch.arange(total)
    for depth in range(1, max_len):  # a node continues its parent's segment unless it starts one
        at = torch.nonzero((node_depth == depth) & ~starts).flatten()
        segment_of[at] = segment_of[node_parent[at]]
    segment_end: Dict[int, int] = {}  # start node -> its segment's last depth
    for seg, depth in zip(segment_of.tolist(), node_depth.tolist()):
        segment_end[seg] = depth
    groups: Dict[Tuple[int, int], List[int]] = defaultdict(list)
    depths, reps = node_depth.tolist(), representative.tolist()
    for start_node, end in segment_end.items():
        groups[(depths[start_node], end - depths[start_node] + 1)].append(reps[start_node])
    buckets, concatenated = [], []
    for (start, seg_len), prompts in sorted(groups.items()):
        rows = path[torch.tensor(prompts)]
        keys = start + seg_len
        padded = -(-keys // key_block) * key_block  # then masked padding keys (node 0): see KEY_BLOCK
        mask = torch.zeros(seg_len, padded, dtype=torch.bool)
        mask[:, :keys] = torch.ones(seg_len, keys, dtype=torch.bool).tril(diagonal=start)
        key_rows = torch.cat([rows[:, :keys], rows.new_zeros(len(prompts), padded - keys)], dim=1)
        queries = rows[:, start:keys]
        if seg_len < min_queries:  # repeat the last query (same keys, same mask): see MIN_ROWS
            queries = torch.cat([queries, queries[:, -1:].expand(-1, min_queries - seg_len)], dim=1)
            mask = torch.cat([mask, mask[-1:].expand(min_queries - seg_len, -1)])
        buckets.append(Bucket(start, queries, key_rows, mask))
        concatenated.append(queries.reshape(-1))
    flat = torch.cat(concatenated)  # a node's first row among the buckets' query rows holds its output
    order = torch.full((total,), len(flat), dtype=torch.long).scatter_reduce(0, flat, torch.arange(len(flat)),
                                                                              "amin")
    eot_nodes = path[torch.arange(n_prompts), length - 1]
    # In preorder a subtree's last node is the deepest of the last prompt through it.
    leaf = eot_nodes.unsqueeze(1).expand_as(path)
    subtree_end = torch.zeros(total, dtype=torch.long).scatter_reduce(0, path[valid], leaf[valid], "amax") + 1
    return SharedPrefixLayout(node_source, node_depth, buckets, order, eot_nodes, node_parent, subtree_end)


class LayoutCache:
    """Layouts by prompt structure (few distinct ones recur: all classes, or a batch's tasks' classes)."""

    def __init__(self, size: int = 64, batch_invariant: bool = True):
        self.size, self._entries = size, OrderedDict()
        self.padding = (KEY_BLOCK, MIN_ROWS) if batch_invariant else (1, 1)

    def get(self, source: torch.Tensor, length: torch.Tensor, device) -> SharedPrefixLayout:
        source, length = source.detach().cpu(), length.detach().cpu()
        key = (structure_key(source, length), str(device))
        if key not in self._entries:
            self._entries[key] = build_layout(source, length, *self.padding).to(device)
            if len(self._entries) > self.size:
                self._entries.popitem(last=False)
        self._entries.move_to_end(key)
        return self._entries[key]
