"""PEER: Parameter Efficient Expert Retrieval (He, "Mixture of A Million Experts", 2024).

A PEER layer replaces a transformer's dense feed-forward block with N tiny experts found
through product keys (Lample et al. 2019). For an input x (paper, Sec. 2):

    q_h = BN(W_h x),  split into two halves q_h = [q_h1, q_h2]                  (query, per head h)
    top-k of  q_h1 . c_i  over sub-keys c_1..c_n1, and of  q_h2 . c'_j  over c'_1..c'_n2
    I_h  = top-k over the k x k sums  (q_h1 . c_i + q_h2 . c'_j)                 (Eq. 1-2, product keys)
    g_e  = softmax over e in I_h of those sums                                    (Eq. 3, router scores)
    f(x) = sum_h sum_{e in I_h} g_e  sigma(u_e . x) v_e                          (Eq. 4-5, single neurons)

Expert e = i * n2 + j, so N = n1 * n2. The sub-keys are shared by all heads ("different
heads share the same pool of experts with the same set of product keys"); each head has its
own query. With `expert_hidden_size` h > 1 an expert is a small MLP of width h: its h neurons
are rows e*h .. e*h+h-1 of the same tables, each weighted by the expert's score.

The query norm: `batch_norm_query` applies BatchNorm1d over each query feature. The spec's
comment calls it LayerNorm, but the key's name and the paper say BatchNorm, and the paper's
expert-usage result (all experts used, KL to uniform 1.06 against 1.52 without) is measured
with BatchNorm: centring each query feature over the batch is what spreads the queries over
the keys, which a per-token LayerNorm does not do. In training mode the statistics come from
all tokens of the batch (as in the paper), so a token's query depends, through the batch
mean and variance, on the other tokens of the batch; in eval mode (evaluation, decoding)
running statistics are used and every token is computed on its own.

The expert tables (`down` = u, `up` = v, each N*h x d) are never gathered into a
(tokens, retrieved, d) tensor. `peer_experts` is a registered operator (`peerlab::peer_experts_forward`,
with its backward, so torch.compile traces through it) built from the three
kernels of `F.embedding_bag` (its forward and its two gradients), which walk the retrieved
rows one by one: the dot products u_e . x_t, the weighted sum of the v_e, and, in backward,
the gradient of each table as a bag sum over the retrievals sorted by table row. Gradients
are computed only for the rows the batch retrieved and no other row of a table is read.
The gradient tensor itself is dense, filled with zeros elsewhere, so AdamW, DDP and FSDP
work with it unchanged; with `sparse_grad` (train_config.sparse_experts) it is a sparse COO
tensor of the retrieved rows only, for `peerlab.train.optim.RowSparseAdamW` (several workers
exchange such gradients row by row: `peerlab.train.distributed.exchange_rows`).
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from peerlab.config import PeerConfig, PKMConfig

aten = torch.ops.aten
GPU_GATHER_BYTES = 256 << 20  # gathered rows one chunk may hold on a GPU (see Bags.dots)
# The fused Triton kernels (model/peer_triton.py) for CUDA tensors: opt-in with PEERLAB_TRITON=1 until
# they are measured on a GPU (tested on the CPU through Triton's interpreter against float64).
USE_TRITON = os.environ.get("PEERLAB_TRITON", "0") == "1"


def _triton_kernels(device: torch.device):
    """model/peer_triton.py where it serves this device (CUDA, or any in Triton's interpreter; Triton installed;
    PEERLAB_TRITON=1), else None."""
    if not USE_TRITON:
        return None
    from peerlab.model import peer_triton

    return peer_triton if peer_triton.triton_available(device) else None


def _gelu_grad(h: torch.Tensor) -> torch.Tensor:
    """d/dh of the exact (erf) GELU: Phi(h) + h * phi(h)."""
    cdf = 0.5 * (1.0 + torch.erf(h * (1.0 / math.sqrt(2.0))))
    pdf = torch.exp(-0.5 * h * h) * (1.0 / math.sqrt(2.0 * math.pi))
    return cdf + h * pdf


def grouped_topk_pays(n: int, k: int, group: int = 8) -> bool:
    """Whether `topk_by_groups` searches by groups for k of n (on CPU) rather than hand over to torch."""
    return n % group == 0 and n // group >= 4 * k and (k * 64 > n or k >= 16)


def search_group(n: int, k: int) -> int | None:
    """The group size `topk_by_groups` searches k of n with: 8, else 4 where only that pays, else None (torch's)."""
    return next((group for group in (8, 4) if grouped_topk_pays(n, k, group)), None)


def topk_by_groups(scores: torch.Tensor, k: int, group: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`scores.topk(k, dim=-1)` for (R, n) scores on CPU, searching only the k most promising groups.

    The n columns form n/group groups (column c is in group c mod n/group). Each of the k best
    scores lies in one of the k groups with the highest maximum: a score outside them has k
    group maxima, hence k scores, above it. So a top-k over the group maxima (a fast strided
    max), then over those k groups' k * group scores, finds the same values and columns as a
    top-k over all n. `benchmarks/topk.py` on this project's 2-core CPU (4,096 rows): 0.71x the
    time of torch's top-k for k = 8 of 256, 0.65x for 16 of 512, 0.76x for 16 of 1,024. It is used where
    it paid: at least 4k groups, and k >= 16 unless torch's top-k takes its slow path
    (k * 64 > n; below that torch keeps a partial sort, fast for small k). Groups of 8 where
    those pay, else of 4 (`search_group`): k = 8 of 128 sub-keys has too few groups of 8, and
    groups of 4 take 0.75x torch's time there (8,192 rows).
    """
    R, n = scores.shape
    group = group or search_group(n, k)
    if scores.device.type != "cpu" or group is None or not grouped_topk_pays(n, k, group):
        return scores.topk(k, dim=-1)
    groups = n // group
    best_groups = scores.view(R, group, groups).amax(1).topk(k, dim=-1, sorted=False).indices  # (R, k)
    columns = (best_groups.unsqueeze(-1) + torch.arange(0, n, groups, device=scores.device)).view(R, k * group)
    values, pick = scores.gather(1, columns).topk(k, dim=-1)  # (R, k) of the k * group candidates
    return values, columns.gather(1, pick)


def search_with_torch(
    s1: torch.Tensor, s2: torch.Tensor, k: int, rank1: torch.Tensor, rank2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sums, i1, i2), each (R, k): the k best s1[r, i1] + s2[r, i2] of each row, highest first.

    s1 (R, n1), s2 (R, n2): each query half's sub-key scores; rank1, rank2 (P,): the rank pairs
    (a, b) with (a+1)(b+1) <= k, the only ones that can be among the k best sums (every pair of
    lower ranks scores at least as high; for k = 16 that is 50 of the 256 pairs).
    """
    top1, j1 = topk_by_groups(s1, k)  # (R, k) of n1
    top2, j2 = topk_by_groups(s2, k)  # (R, k) of n2
    sums = top1.index_select(1, rank1) + top2.index_select(1, rank2)  # (R, P)
    best_sums, best = sums.topk(k, dim=-1)  # (R, k) into the P pairs
    return best_sums, j1.gather(-1, rank1[best]), j2.gather(-1, rank2[best])


@torch.library.custom_op("peerlab::product_key_search", mutates_args=())
def _product_key_search_op(
    s1: torch.Tensor, s2: torch.Tensor, k: int, rank1: torch.Tensor, rank2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`search_with_torch` on the CPU in one C pass per query (model/search.py) where it can run
    (float32, k <= 32, int64 ranks, no NaN: see `search.search`), else torch's path."""
    from peerlab.model import search

    found = search.search(s1, s2, k, rank1, rank2)
    return found if found is not None else search_with_torch(s1, s2, k, rank1, rank2)


@_product_key_search_op.register_fake
def _(s1, s2, k, rank1, rank2):
    R = s1.shape[0]
    sums = s1.new_empty(R, k, dtype=torch.promote_types(s1.dtype, s2.dtype))  # as torch's path adds them
    return sums, s1.new_empty(R, k, dtype=torch.int64), s1.new_empty(R, k, dtype=torch.int64)


def row_counts(rows: torch.Tensor, num_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """How many retrievals each table row has, counts (num_rows,), and where its retrievals begin among
    them sorted by row, starts (num_rows,).

    Counted by index_add_, not bincount: bincount reads the largest row back to the host to size its
    output, a copy that a CUDA graph (compile's reduce-overhead) cannot capture.
    """
    counts = torch.zeros(num_rows, dtype=torch.long, device=rows.device).index_add_(0, rows, torch.ones_like(rows))
    return counts, counts.cumsum(0) - counts


class Bags:
    """Token t's "bag" holds the S rows idx[t, :] it retrieved from a table of `num_rows` rows.

    The operations below walk the retrieved rows one by one with the kernels of
    `F.embedding_bag`, so no (M, S, d) tensor of gathered rows is ever built. After
    `sort()`, `dots` and `scatter` walk them in table-row order: each table row is read or
    written once, in sequence, instead of at random.
    """

    def __init__(self, idx: torch.Tensor, num_rows: int):
        M, S = idx.shape
        self.shape = (M, S)
        self.num_rows = num_rows
        self.rows = idx.reshape(-1)  # (M*S,) table row of each retrieval
        self.offsets = torch.arange(0, M * S, S, device=idx.device)  # (M,) start of each token's bag
        self.tokens = torch.arange(M, device=idx.device).repeat_interleave(S)  # (M*S,) token of each retrieval
        self.order: torch.Tensor | None = None

    def sort(self, order: torch.Tensor | None = None) -> Bags:
        """Order the retrievals by table row (once; `dots` and `scatter` then use that order).

        `order` (M*S,): that order, computed before (forward hands it to backward).
        """
        if self.order is None:
            if order is None:
                # Sorting narrow integers is several times faster than sorting int64 on CPUs.
                keys = self.rows.to(torch.int16 if self.num_rows <= 2**15 else torch.int32)
                order = keys.argsort()  # (M*S,)
            self.order = order
            self.sorted_rows = self.rows[self.order]
            self.sorted_tokens = self.tokens[self.order]
        return self

    def weighted_sum(self, table: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """out[t] = sum_s weight[t, s] * table[idx[t, s]]  -> (M, d)"""
        return F.embedding_bag(self.rows, table, self.offsets, mode="sum", per_sample_weights=weight.reshape(-1))

    def dots(self, table: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        """out[t, s] = table[idx[t, s]] . vectors[t]  -> (M, S)

        On CPU: the kernel embedding_bag uses for the gradient of its per-sample weights. On
        GPUs (where that kernel has no bfloat16 version) gathered rows and a batched matrix
        product, a bounded number of tokens at a time.
        """
        if table.device.type != "cpu":
            return self.gathered_dots(table, vectors)
        if self.order is None:
            return aten._embedding_bag_per_sample_weights_backward(
                vectors, table, self.rows, self.offsets, self.tokens, 0, -1
            ).view(self.shape)
        by_row = aten._embedding_bag_per_sample_weights_backward(
            vectors, table, self.sorted_rows, self.offsets, self.sorted_tokens, 0, -1
        )  # (M*S,) in table-row order
        return torch.empty_like(by_row).index_copy_(0, self.order, by_row).view(self.shape)

    def gathered_dots(self, table: torch.Tensor, vectors: torch.Tensor, chunk_bytes: int = GPU_GATHER_BYTES):
        """`dots` through gathered rows, at most `chunk_bytes` of them at a time  -> (M, S)"""
        M, S = self.shape
        chunk = max(1, chunk_bytes // (S * table.shape[1] * table.element_size()))
        idx = self.rows.view(M, S)
        parts = [
            torch.bmm(F.embedding(idx[i : i + chunk], table), vectors[i : i + chunk].unsqueeze(-1))  # (C, S, 1)
            for i in range(0, M, chunk)
        ]
        return torch.cat(parts).squeeze(-1)

    def scatter(self, vectors: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """out[e] = sum of weight[t, s] * vectors[t] over the (t, s) with idx[t, s] = e  -> (num_rows, d)

        The transposed problem is itself a bag sum: with the retrievals sorted by table row,
        row e's bag holds the tokens that retrieved it (rows nobody retrieved get zero).
        """
        self.sort()
        _, starts = row_counts(self.rows, self.num_rows)  # (num_rows,) where each row's retrievals begin
        weight = weight.reshape(-1)[self.order]
        return F.embedding_bag(self.sorted_tokens, vectors, starts, mode="sum", per_sample_weights=weight)

    def scatter_rows(self, vectors: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """`scatter` as a sparse COO tensor holding only the retrieved rows (for row-sparse optimizers)."""
        self.sort()
        rows, counts = torch.unique_consecutive(self.sorted_rows, return_counts=True)  # (U,), (U,)
        starts = counts.cumsum(0) - counts  # (U,) where each retrieved row's bag begins
        weight = weight.reshape(-1)[self.order]
        values = F.embedding_bag(self.sorted_tokens, vectors, starts, mode="sum", per_sample_weights=weight)  # (U, d)
        size = (self.num_rows, vectors.shape[1])
        return torch.sparse_coo_tensor(rows.unsqueeze(0), values, size, is_coalesced=True, check_invariants=False)


# The custom work of the layer is a few registered operators (namespace `peerlab`), so that
# torch.compile sees each as one opaque call, with a fake (shape-only) version for tracing and
# a registered backward, instead of breaking its graph at a Python autograd function:
#
#   peerlab::gather_dot             table[idx[t, s]] . vectors[t]         (its backward: gather_dot_backward)
#   peerlab::peer_experts_forward   Eq. 4-5 in training: y, and what backward needs
#   peerlab::peer_experts_backward  the four gradients                    (dense; sparse_grad runs eagerly)
#   peerlab::peer_experts_infer     Eq. 4-5 without gradients (evaluation, decoding)
#
# Each operator calls one plain function of plain tensors (`experts_forward`, `experts_backward`,
# ...): the place where another kernel can be chosen by device.


def gather_dot_forward(table: torch.Tensor, idx: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """out[t, s] = table[idx[t, s]] . vectors[t]: table (R, n), idx (M, S), vectors (M, n) -> (M, S)."""
    return Bags(idx, table.shape[0]).dots(table, vectors)


def gather_dot_grads(
    grad: torch.Tensor, table: torch.Tensor, idx: torch.Tensor, vectors: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """grad (M, S) -> (grad_table (R, n), grad_vectors (M, n)).

    grad_vectors[t] = sum_s g[t, s] table[idx[t, s]]; grad_table gets g[t, s] vectors[t] on row
    idx[t, s], and zero on every row nobody retrieved.
    """
    bags = Bags(idx, table.shape[0])
    return bags.scatter(vectors, grad), bags.weighted_sum(table, grad)


def experts_forward(
    x: torch.Tensor, idx: torch.Tensor, gate: torch.Tensor, down: torch.Tensor, up: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """y_t = sum_s gate[t,s] * gelu(down[idx[t,s]] . x_t) * up[idx[t,s]]  (paper Eq. 4-5).

    x: (M, d); idx, gate: (M, S) with S = heads * k * expert_hidden_size; down, up: (R, d).
    Returns y (M, d), and for backward hidden (M, S) = u_e . x_t and the retrievals' order by
    table row, order (M*S,): only (M, S) activations are kept.
    """
    fused = _triton_kernels(x.device)
    if fused is not None:  # one kernel; its backward sorts the retrievals itself (no order kept)
        y, hidden = fused.experts_forward(x, idx, gate, down, up)
        return y, hidden.to(x.dtype), idx.new_empty(idx.numel())
    bags = Bags(idx, down.shape[0]).sort()
    hidden = bags.dots(down, x)  # (M, S): u_e . x_t
    y = bags.weighted_sum(up, F.gelu(hidden) * gate)  # (M, d)
    return y, hidden, bags.order


def experts_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    idx: torch.Tensor,
    gate: torch.Tensor,
    hidden: torch.Tensor,
    down: torch.Tensor,
    up: torch.Tensor,
    order: torch.Tensor,
    sparse_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of `experts_forward`: grad_y (M, d) -> (grad_x (M, d), grad_gate (M, S), grad_down, grad_up).

    The tables' gradients are dense (R, d), or with `sparse_grad` sparse COO tensors of the
    retrieved rows only.
    """
    fused = _triton_kernels(x.device)
    if fused is not None and sparse_grad:
        grad_x, grad_gate, rows, down_rows, up_rows = fused.experts_backward_rows(
            grad_y, x, idx, gate, hidden, down, up
        )
        size = (down.shape[0], down.shape[1])
        sparse = [
            torch.sparse_coo_tensor(rows.unsqueeze(0), v, size, is_coalesced=True, check_invariants=False)
            for v in (down_rows, up_rows)
        ]
        return grad_x, grad_gate, *sparse
    if fused is not None:
        return fused.experts_backward(grad_y, x, idx, gate, hidden, down, up)
    bags = Bags(idx, down.shape[0]).sort(order)
    grad_y = grad_y.contiguous()  # (M, d)
    act = F.gelu(hidden)  # (M, S)
    d_weight = bags.dots(up, grad_y)  # (M, S): dL/d(gate * act) = v_e . dy_t
    d_hidden = d_weight * gate * _gelu_grad(hidden)  # (M, S)
    grad_x = bags.weighted_sum(down, d_hidden)
    grad_gate = d_weight * act
    scatter = bags.scatter_rows if sparse_grad else bags.scatter
    grad_down = scatter(x, d_hidden)  # rows += d_hidden * x_t
    grad_up = scatter(grad_y, gate * act)  # rows += gate * act * dy_t
    return grad_x, grad_gate, grad_down, grad_up


def experts_infer(
    x: torch.Tensor, idx: torch.Tensor, gate: torch.Tensor, down: torch.Tensor, up: torch.Tensor
) -> torch.Tensor:
    """y of `experts_forward` without what backward needs (no sort of the retrievals)  -> (M, d)"""
    bags = Bags(idx, down.shape[0])
    return bags.weighted_sum(up, F.gelu(bags.dots(down, x)) * gate)


@torch.library.custom_op("peerlab::gather_dot", mutates_args=())
def _gather_dot_op(table: torch.Tensor, idx: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    return gather_dot_forward(table, idx, vectors)


@_gather_dot_op.register_fake
def _(table, idx, vectors):
    return vectors.new_empty(idx.shape)  # (M, S)


@torch.library.custom_op("peerlab::gather_dot_backward", mutates_args=())
def _gather_dot_backward_op(
    grad: torch.Tensor, table: torch.Tensor, idx: torch.Tensor, vectors: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return gather_dot_grads(grad, table, idx, vectors)


@_gather_dot_backward_op.register_fake
def _(grad, table, idx, vectors):
    return torch.empty_like(table), torch.empty_like(vectors)


def _gather_dot_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)  # table, idx, vectors


def _gather_dot_grad(ctx, grad):
    table, idx, vectors = ctx.saved_tensors
    grad_table, grad_vectors = torch.ops.peerlab.gather_dot_backward(grad, table, idx, vectors)
    return grad_table, None, grad_vectors


_gather_dot_op.register_autograd(_gather_dot_grad, setup_context=_gather_dot_setup)


@torch.library.custom_op("peerlab::peer_experts_forward", mutates_args=())
def _experts_forward_op(
    x: torch.Tensor, idx: torch.Tensor, gate: torch.Tensor, down: torch.Tensor, up: torch.Tensor, sparse_grad: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return experts_forward(x, idx, gate, down, up)


@_experts_forward_op.register_fake
def _(x, idx, gate, down, up, sparse_grad):
    M, S = idx.shape
    y = x.new_empty(M, up.shape[1], dtype=up.dtype)  # (M, d)
    return y, x.new_empty(M, S), idx.new_empty(M * S, dtype=torch.long)


@torch.library.custom_op("peerlab::peer_experts_backward", mutates_args=())
def _experts_backward_op(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    idx: torch.Tensor,
    gate: torch.Tensor,
    hidden: torch.Tensor,
    down: torch.Tensor,
    up: torch.Tensor,
    order: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return experts_backward(grad_y, x, idx, gate, hidden, down, up, order)


@_experts_backward_op.register_fake
def _(grad_y, x, idx, gate, hidden, down, up, order):
    return torch.empty_like(x), torch.empty_like(gate), torch.empty_like(down), torch.empty_like(up)


def _experts_setup(ctx, inputs, output):
    x, idx, gate, down, up, ctx.sparse_grad = inputs
    _, hidden, order = output
    ctx.mark_non_differentiable(hidden, order)
    ctx.save_for_backward(x, idx, gate, hidden, down, up, order)


def _experts_grad(ctx, grad_y, _grad_hidden, _grad_order):
    saved = ctx.saved_tensors  # x, idx, gate, hidden, down, up, order
    if ctx.sparse_grad:  # sparse COO results have no fake version: eager only (see `peer_experts`)
        grad_x, grad_gate, grad_down, grad_up = experts_backward(grad_y, *saved, sparse_grad=True)
    else:
        grad_x, grad_gate, grad_down, grad_up = torch.ops.peerlab.peer_experts_backward(grad_y, *saved)
    return grad_x, None, grad_gate, grad_down, grad_up, None


_experts_forward_op.register_autograd(_experts_grad, setup_context=_experts_setup)


@torch.library.custom_op("peerlab::peer_experts_infer", mutates_args=())
def _experts_infer_op(
    x: torch.Tensor, idx: torch.Tensor, gate: torch.Tensor, down: torch.Tensor, up: torch.Tensor
) -> torch.Tensor:
    return experts_infer(x, idx, gate, down, up)


@_experts_infer_op.register_fake
def _(x, idx, gate, down, up):
    return x.new_empty(idx.shape[0], up.shape[1], dtype=up.dtype)  # (M, d)


def gather_dot(table: torch.Tensor, idx: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """table[idx[t, s]] . vectors[t] for every t, s, without gathering the rows (op `peerlab::gather_dot`)."""
    return torch.ops.peerlab.gather_dot(table, idx, vectors.contiguous())


@torch.compiler.disable
def _sparse_experts(x, idx, gate, down, up) -> torch.Tensor:
    """The training forward whose backward makes sparse table gradients: run eagerly, outside any compiled graph."""
    return torch.ops.peerlab.peer_experts_forward(x, idx, gate, down, up, True)[0]


def peer_experts(x, idx, gate, down, up, sparse_grad: bool = False):
    """y_t = sum_s gate[t,s] * gelu(down[idx[t,s]] . x_t) * up[idx[t,s]]  (paper Eq. 4-5; see `experts_forward`).

    Computed in the tables' dtype with autocast off: fp32 master weights stay fp32, a model
    cast to bf16 runs in bf16, and no table is ever copied to another dtype. With
    `sparse_grad` the tables' gradients are sparse COO tensors of the retrieved rows only
    (that path runs eagerly: under torch.compile it is one graph break).
    """
    with torch.autocast(x.device.type, enabled=False):
        inputs, weights = x.to(down.dtype).contiguous(), gate.to(down.dtype)
        if not torch.is_grad_enabled():  # evaluation, decoding: the same sums without the sort for backward
            y = torch.ops.peerlab.peer_experts_infer(inputs, idx, weights, down, up)
        elif sparse_grad:
            y = _sparse_experts(inputs, idx, weights, down, up)
        else:
            y = torch.ops.peerlab.peer_experts_forward(inputs, idx, weights, down, up, False)[0]
    return y.to(x.dtype)


class ProductKeys(nn.Module):
    """Product-key retrieval (Lample et al. 2019, Sec. 3.2), shared by PEER and the PKM layer (model/pkm.py).

    Holds the query projection (with optional BatchNorm), the two sub-key sets and the search;
    `retrieve(x)` gives each head's k best keys of the n1 x n2 product set and their scores.
    """

    def __init__(self, config: PeerConfig | PKMConfig, hidden_size: int, per_head_keys: bool = False):
        """`config`: its num_heads, num_experts_per_tok (k), query_dim, product_key_dim, batch_norm_query.

        `per_head_keys`: each head has its own two sub-key sets (Lample et al. 2019, Sec. 3.3, and their
        code's default mem_use_different_keys); False: all heads share one pair (PEER, He 2024, Sec. 2).
        """
        super().__init__()
        num_heads, k, query_dim = config.num_heads, config.num_experts_per_tok, config.query_dim
        batch_norm_query = config.batch_norm_query
        self.num_heads = num_heads
        self.k = k
        self.query_dim = query_dim
        self.n1, self.n2 = config.product_key_dim
        self.num_experts = self.n1 * self.n2
        half = query_dim // 2

        self.query = nn.Linear(hidden_size, num_heads * query_dim, bias=False)
        self.query_norm = nn.BatchNorm1d(num_heads * query_dim) if batch_norm_query else None
        # Both sub-key sets in one table: rows 0..n1-1 are c_i, rows n1.. are c'_j; with per_head_keys
        # one such block of n1 + n2 rows per head (head h's block starts at row h * (n1 + n2)).
        self.key_sets = num_heads if per_head_keys else 1
        self.sub_keys = nn.Parameter(torch.empty(self.key_sets * (self.n1 + self.n2), half))  # (sets*(n1+n2), qd/2)
        ranks = [(a, b) for a in range(self.k) for b in range(self.k) if (a + 1) * (b + 1) <= self.k]
        self.register_buffer("pair_rank1", torch.tensor([a for a, _ in ranks]), persistent=False)  # (P,)
        self.register_buffer("pair_rank2", torch.tensor([b for _, b in ranks]), persistent=False)  # (P,)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """A checkpoint of one pair of sub-key sets for keys per head (a PKM saved before its heads had their own):
        every head starts from that pair, which searches exactly as the shared keys did."""
        shared = state_dict.get(prefix + "sub_keys")
        if shared is not None and self.key_sets > 1 and shared.shape[0] == self.n1 + self.n2:
            state_dict[prefix + "sub_keys"] = shared.repeat(self.key_sets, 1)  # (sets*(n1+n2), qd/2)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def reset_keys(self) -> None:
        """Unit-variance queries (after BN) against keys of std 1/sqrt(query_dim/2) give scores of unit variance."""
        nn.init.normal_(self.sub_keys, std=1.0 / math.sqrt(self.query_dim // 2))

    def retrieve(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Product-key retrieval: x (..., d) -> (scores, indices), each (..., num_heads, k).

        Scores are the sums q1.c_i + q2.c'_j (before softmax), highest first. The search runs
        without autograd; the k winning scores are then recomputed from their two sub-keys, so
        gradients reach the query and exactly the retrieved sub-keys, as through top-k itself,
        without dense (tokens x heads x sub-keys) gradient tensors.
        """
        lead = x.shape[:-1]
        q = self.query(x.reshape(-1, x.shape[-1]))  # (M, H*query_dim)
        if self.query_norm is not None:
            q = self.query_norm(q)
        # The search and the scores run in the keys' dtype with autocast off: a top-k over rounded
        # scores could pick other experts than the scores the gate is computed from.
        with torch.autocast(x.device.type, enabled=False):
            # (M*H*2, query_dim/2): the halves q1, q2 of each head, alternating
            halves = q.view(-1, self.query_dim // 2).to(self.sub_keys.dtype)
            with torch.no_grad():
                pairs = halves.view(-1, 2, self.query_dim // 2)  # (M*H, 2, query_dim/2)
                if self.key_sets == 1:
                    s1 = pairs[:, 0] @ self.sub_keys[: self.n1].t()  # (M*H, n1)
                    s2 = pairs[:, 1] @ self.sub_keys[self.n1 :].t()  # (M*H, n2)
                else:  # each head against its own block of sub-keys
                    keys = self.sub_keys.view(self.num_heads, self.n1 + self.n2, -1)  # (H, n1+n2, qd/2)
                    by_head = pairs.view(-1, self.num_heads, 2, pairs.shape[-1])  # (M, H, 2, qd/2)
                    s1 = torch.einsum("mhd,hnd->mhn", by_head[:, :, 0], keys[:, : self.n1]).reshape(-1, self.n1)
                    s2 = torch.einsum("mhd,hnd->mhn", by_head[:, :, 1], keys[:, self.n1 :]).reshape(-1, self.n2)
                search = torch.ops.peerlab.product_key_search if s1.device.type == "cpu" else search_with_torch
                best_sums, i1, i2 = search(s1, s2, self.k, self.pair_rank1, self.pair_rank2)  # (M*H, k) each
            indices = i1 * self.n2 + i2  # (M*H, k)
            if torch.is_grad_enabled():
                key_rows = torch.stack((i1, i2 + self.n1), dim=1)  # (M*H, 2, k) rows of sub_keys
                if self.key_sets > 1:  # row offset of each head's block
                    block = torch.arange(self.num_heads, device=i1.device) * (self.n1 + self.n2)  # (H,)
                    key_rows = key_rows.view(-1, self.num_heads, 2, self.k) + block.view(-1, 1, 1)  # (M, H, 2, k)
                key_rows = key_rows.reshape(-1, self.k)  # (M*H*2, k)
                scores = gather_dot(self.sub_keys, key_rows, halves).view(-1, 2, self.k).sum(1)  # (M*H, k)
            else:  # no gradient wanted: the sums of the search are the scores
                scores = best_sums
        shape = (*lead, self.num_heads, self.k)
        return scores.view(shape), indices.view(shape)


class CountsUsage(nn.Module):
    """A layer with expert usage counts, `usage` (E,) and `usage_by_source` (S, E): plain attributes (not
    buffers) that move with the module (`.to(device)`, `.cuda()`...) and stay float32 whatever its dtype."""

    usage: torch.Tensor | None = None
    usage_by_source: torch.Tensor | None = None

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.usage is not None:
            self.usage = fn(self.usage).float()
        if self.usage_by_source is not None:
            self.usage_by_source = fn(self.usage_by_source).float()
        return self


class PEER(ProductKeys, CountsUsage):
    """A PEER feed-forward layer: `PEER(peer_config, hidden_size)(x)` with x (..., hidden_size)."""

    def __init__(self, config: PeerConfig, hidden_size: int, initializer_range: float = 0.02):
        super().__init__(config, hidden_size)
        self.expert_hidden_size = config.expert_hidden_size
        # Expert usage (paper, Sec. 3.4): the router score mass each expert received in training
        # since the last read, summed over tokens and heads. A plain attribute, not a buffer:
        # each worker keeps its own sums (DDP would overwrite buffers with rank 0's) and
        # checkpoints stay lean. Made here and moved with the module (`_apply`), so that a compiled
        # forward only adds to it in place.
        self.track_usage = config.log_expert_usage
        self.sparse_grad = False  # True: the expert tables get sparse row gradients (train_config.sparse_experts)
        self.usage = torch.zeros(self.num_experts) if self.track_usage else None  # (N,) float32
        # The same mass by data source (peerlab.train.usage.track_sources / set_sources): `usage_by_source`
        # (S, N) float32, and `sources` (B,) the dataset index of each sequence of the next training batch.
        # Both stay None unless the training loop sets them; row s of the table only sums source s's tokens.
        self.usage_by_source: torch.Tensor | None = None
        self.sources: torch.Tensor | None = None
        rows = self.num_experts * config.expert_hidden_size
        self.down = nn.Parameter(torch.empty(rows, hidden_size))  # u_e: one row per neuron
        self.up = nn.Parameter(torch.empty(rows, hidden_size))  # v_e
        self.reset_parameters(initializer_range)

    def reset_parameters(self, initializer_range: float = 0.02) -> None:
        nn.init.normal_(self.query.weight, std=initializer_range)
        nn.init.normal_(self.down, std=initializer_range)
        nn.init.normal_(self.up, std=initializer_range)
        self.reset_keys()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, d = x.shape[:-1], x.shape[-1]
        flat = x.reshape(-1, d)  # (M, d)
        scores, indices = self.retrieve(flat)  # (M, H, k) each
        gate = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32))  # (M, H, k)
        if self.training and self.usage is not None:
            mass = gate.detach().reshape(-1).float()  # (M*H*k,)
            self.usage.index_add_(0, indices.reshape(-1), mass)
            if self.usage_by_source is not None and self.sources is not None:
                B = self.sources.numel()  # the batch's sequences, each from one data source
                if flat.shape[0] % B:
                    raise ValueError(f"{B} source ids for {flat.shape[0]} tokens: set one per sequence of the batch")
                source = self.sources.view(B, 1).expand(B, flat.shape[0] // B).reshape(-1, 1)  # (M, 1)
                cells = source * self.num_experts + indices.reshape(flat.shape[0], -1)  # (M, H*k) into (S*N)
                self.usage_by_source.view(-1).index_add_(0, cells.reshape(-1), mass)
        h = self.expert_hidden_size
        if h > 1:  # expert e owns neuron rows e*h .. e*h+h-1, all weighted by the expert's score
            indices = (indices.unsqueeze(-1) * h + torch.arange(h, device=x.device)).flatten(-2)  # (M, H, k*h)
            gate = gate.repeat_interleave(h, dim=-1)  # (M, H, k*h)
        idx = indices.flatten(1)  # (M, S)
        gate = gate.flatten(1)  # (M, S)
        return peer_experts(flat, idx, gate, self.down, self.up, self.sparse_grad).view(*lead, d)
