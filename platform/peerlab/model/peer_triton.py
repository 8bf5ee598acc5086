"""Fused Triton kernels for the PEER experts (He, "Mixture of A Million Experts", 2024, Eq. 4-5).

For tokens x (M, d), retrieved table rows idx (M, S) and router weights gate (M, S):

    hidden[t, s] = down[idx[t, s]] . x[t]                                   (u_e . x, Eq. 4)
    y[t]         = sum_s gate[t, s] * gelu(hidden[t, s]) * up[idx[t, s]]   (sum of g_e sigma(u_e . x) v_e, Eq. 5)

with the exact (erf) GELU, as `peerlab.model.peer.peer_experts` computes them. Backward:

    d_weight[t, s] = up[idx[t, s]] . grad_y[t]
    d_hidden[t, s] = d_weight * gate * gelu'(hidden)          grad_gate[t, s] = d_weight * gelu(hidden)
    grad_x[t]      = sum_s d_hidden[t, s] * down[idx[t, s]]
    grad_down[e]   = sum over (t, s) with idx[t, s] = e of d_hidden[t, s] * x[t]
    grad_up[e]     = sum over (t, s) with idx[t, s] = e of gate[t, s] * gelu(hidden[t, s]) * grad_y[t]

Three kernels, none of which builds a (M, S, d) tensor of gathered rows:
  forward          one program per block of tokens: the dots over d in blocks, then the weighted
                   sum of the up rows, again in blocks of d (hidden goes through global memory
                   between the two passes; it is (M, S) and kept in float32 for backward).
  backward tokens  the same shape of program for d_weight, d_hidden, grad_gate and grad_x.
  backward tables  the retrievals sorted by table row once (a stable argsort); one program per
                   block of retrieved rows and block of d sums each row's segment of retrievals.
                   Every row is written by exactly one program: no atomics, and the sums come out
                   in the same order on every run.
All sums are in float32; outputs are in the inputs' dtypes (bf16 tables give bf16 gradients),
rounded once at the store (to nearest on a GPU; Triton's interpreter truncates).

What is verified, without a GPU: in Triton's CPU interpreter these kernels match a float64
reference (tests/peer_triton_cases.py, run by tests/test_peer_triton.py); every autotune
configuration compiled for sm_90 (H100/H200) through ptxas without spills, in bf16 and float32
(checked once by hand; the test compiles the first of each kernel). Not verified: running
them on a GPU (tests/test_peer_triton.py has a CUDA parity test for that, not yet run), which
configuration autotuning picks, and their speed; in the interpreter one fixed small
configuration (`INTERPRETER_CONFIG`) replaces autotuning. Known weak spot: a table row
retrieved by very many tokens is summed by one program in sequence (segments are not split),
so a very skewed batch loads one program heavily.

The interpreter is chosen when a kernel is decorated, Triton's own helpers (tl.sum, tl.max)
included: set TRITON_INTERPRET=1 before triton is first imported to run these kernels on CPU
tensors (the tests do so in a subprocess of their own).
"""

from __future__ import annotations

import torch

from peerlab.model.peer import row_counts

try:
    import triton
    import triton.language as tl
except ImportError:  # not installable on every platform (no CPU wheels for macOS or Windows)
    triton = None

INTERPRETED = bool(triton is not None and triton.knobs.runtime.interpret)  # kernels built for the interpreter


def triton_available(device: torch.device | str) -> bool:
    """Whether these kernels can run on tensors of `device`: CUDA with Triton, or any device in the interpreter."""
    if triton is None:
        return False
    return INTERPRETED or torch.device(device).type == "cuda"


if triton is not None:
    INTERPRETER_CONFIG = {"BLOCK_T": 2, "BLOCK_S": 8, "BLOCK_D": 32, "BLOCK_R": 4, "BLOCK_N": 2}

    def _configs(*blocks: tuple[dict, int]) -> list:
        """Autotune only on a GPU: in the interpreter, one configuration (`INTERPRETER_CONFIG`), which
        no Triton version benchmarks (Triton 3.6 benchmarks even a single pruned one, through a GPU driver)."""
        if INTERPRETED:
            return [triton.Config({k: INTERPRETER_CONFIG[k] for k in blocks[0][0]})]
        return [triton.Config(b, num_warps=w) for b, w in blocks]

    # Sized with ptxas for sm_90 (compiled without a GPU, bf16 and fp32): about 16 gathered elements
    # per thread, 70-130 registers (table kernel up to 180) and no spills. Untimed: the choice among
    # them is autotuning's.
    # Token kernels: (BLOCK_T, BLOCK_S, BLOCK_D) tiles of gathered rows.
    TOKEN_CONFIGS = _configs(
        ({"BLOCK_T": 1, "BLOCK_S": 16, "BLOCK_D": 128}, 4),
        ({"BLOCK_T": 1, "BLOCK_S": 32, "BLOCK_D": 64}, 4),
        ({"BLOCK_T": 2, "BLOCK_S": 16, "BLOCK_D": 64}, 4),
        ({"BLOCK_T": 4, "BLOCK_S": 8, "BLOCK_D": 64}, 4),
        ({"BLOCK_T": 1, "BLOCK_S": 32, "BLOCK_D": 128}, 8),
        ({"BLOCK_T": 2, "BLOCK_S": 16, "BLOCK_D": 128}, 8),
    )
    # Table kernel: (BLOCK_R rows, BLOCK_N retrievals of each, BLOCK_D) tiles; BLOCK_N > 1 for hot rows.
    TABLE_CONFIGS = _configs(
        ({"BLOCK_R": 16, "BLOCK_N": 1, "BLOCK_D": 64}, 4),
        ({"BLOCK_R": 32, "BLOCK_N": 1, "BLOCK_D": 64}, 8),
        ({"BLOCK_R": 8, "BLOCK_N": 4, "BLOCK_D": 64}, 4),
    )
    AUTOTUNE = {"key": ["S", "D"]}

    @triton.jit
    def _gelu(h):
        """Exact GELU: h * Phi(h)."""
        return 0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476))  # 1/sqrt(2)

    @triton.jit
    def _gelu_grad(h):
        """d/dh of the exact GELU: Phi(h) + h * phi(h)."""
        cdf = 0.5 * (1.0 + tl.math.erf(h * 0.7071067811865476))
        return cdf + h * tl.exp(-0.5 * h * h) * 0.3989422804014327  # phi(h) = exp(-h^2/2) / sqrt(2 pi)

    @triton.autotune(configs=TOKEN_CONFIGS, **AUTOTUNE)
    @triton.jit
    def _forward_kernel(
        x_ptr, idx_ptr, gate_ptr, down_ptr, up_ptr, y_ptr, hidden_ptr, M, S, D,
        BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        """y and hidden of BLOCK_T tokens: pass 1 hidden (over d in blocks), pass 2 y (by blocks of d)."""
        t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # (T,) tokens of this program
        t_live = t < M
        t = t.to(tl.int64)
        for s0 in range(0, S, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)  # (Sb,)
            ts_live = t_live[:, None] & (s < S)[None, :]  # (T, Sb)
            flat = t[:, None] * S + s[None, :]  # (T, Sb) positions in idx, gate, hidden
            rows = tl.load(idx_ptr + flat, mask=ts_live, other=0)  # (T, Sb) table rows
            acc = tl.zeros((BLOCK_T, BLOCK_S), dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                dd = d0 + tl.arange(0, BLOCK_D)  # (Db,)
                d_live = dd < D
                xt = tl.load(x_ptr + t[:, None] * D + dd[None, :], mask=t_live[:, None] & d_live[None, :], other=0.0)
                u = tl.load(
                    down_ptr + rows[:, :, None] * D + dd[None, None, :],
                    mask=ts_live[:, :, None] & d_live[None, None, :],
                    other=0.0,
                )  # (T, Sb, Db) gathered down rows
                acc += tl.sum(u.to(tl.float32) * xt.to(tl.float32)[:, None, :], axis=2)
            tl.store(hidden_ptr + flat, acc, mask=ts_live)
        tl.debug_barrier()  # pass 2 reads hidden written by other threads of this program
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            d_live = dd < D
            y = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
            for s0 in range(0, S, BLOCK_S):
                s = s0 + tl.arange(0, BLOCK_S)
                ts_live = t_live[:, None] & (s < S)[None, :]
                flat = t[:, None] * S + s[None, :]
                rows = tl.load(idx_ptr + flat, mask=ts_live, other=0)
                h = tl.load(hidden_ptr + flat, mask=ts_live, other=0.0)
                g = tl.load(gate_ptr + flat, mask=ts_live, other=0.0).to(tl.float32)
                w = g * _gelu(h)  # (T, Sb): gate * gelu(hidden), zero where masked
                v = tl.load(
                    up_ptr + rows[:, :, None] * D + dd[None, None, :],
                    mask=ts_live[:, :, None] & d_live[None, None, :],
                    other=0.0,
                )  # (T, Sb, Db) gathered up rows
                y += tl.sum(w[:, :, None] * v.to(tl.float32), axis=1)
            tl.store(y_ptr + t[:, None] * D + dd[None, :], y, mask=t_live[:, None] & d_live[None, :])

    @triton.autotune(configs=TOKEN_CONFIGS, **AUTOTUNE)
    @triton.jit
    def _backward_tokens_kernel(
        grad_y_ptr, idx_ptr, gate_ptr, hidden_ptr, down_ptr, up_ptr, grad_x_ptr, grad_gate_ptr, d_hidden_ptr,
        M, S, D,
        BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        """grad_gate, d_hidden (pass 1, over d in blocks) and grad_x (pass 2) of BLOCK_T tokens."""
        t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        t_live = t < M
        t = t.to(tl.int64)
        for s0 in range(0, S, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            ts_live = t_live[:, None] & (s < S)[None, :]
            flat = t[:, None] * S + s[None, :]
            rows = tl.load(idx_ptr + flat, mask=ts_live, other=0)
            d_weight = tl.zeros((BLOCK_T, BLOCK_S), dtype=tl.float32)  # up[idx] . grad_y
            for d0 in range(0, D, BLOCK_D):
                dd = d0 + tl.arange(0, BLOCK_D)
                d_live = dd < D
                gy = tl.load(
                    grad_y_ptr + t[:, None] * D + dd[None, :], mask=t_live[:, None] & d_live[None, :], other=0.0
                )
                v = tl.load(
                    up_ptr + rows[:, :, None] * D + dd[None, None, :],
                    mask=ts_live[:, :, None] & d_live[None, None, :],
                    other=0.0,
                )  # (T, Sb, Db)
                d_weight += tl.sum(v.to(tl.float32) * gy.to(tl.float32)[:, None, :], axis=2)
            h = tl.load(hidden_ptr + flat, mask=ts_live, other=0.0)
            g = tl.load(gate_ptr + flat, mask=ts_live, other=0.0).to(tl.float32)
            tl.store(grad_gate_ptr + flat, d_weight * _gelu(h), mask=ts_live)
            tl.store(d_hidden_ptr + flat, d_weight * g * _gelu_grad(h), mask=ts_live)
        tl.debug_barrier()  # pass 2 reads d_hidden written by other threads of this program
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            d_live = dd < D
            gx = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
            for s0 in range(0, S, BLOCK_S):
                s = s0 + tl.arange(0, BLOCK_S)
                ts_live = t_live[:, None] & (s < S)[None, :]
                flat = t[:, None] * S + s[None, :]
                rows = tl.load(idx_ptr + flat, mask=ts_live, other=0)
                dh = tl.load(d_hidden_ptr + flat, mask=ts_live, other=0.0)  # (T, Sb)
                u = tl.load(
                    down_ptr + rows[:, :, None] * D + dd[None, None, :],
                    mask=ts_live[:, :, None] & d_live[None, None, :],
                    other=0.0,
                )  # (T, Sb, Db)
                gx += tl.sum(dh[:, :, None] * u.to(tl.float32), axis=1)
            tl.store(grad_x_ptr + t[:, None] * D + dd[None, :], gx, mask=t_live[:, None] & d_live[None, :])

    @triton.autotune(configs=TABLE_CONFIGS, **AUTOTUNE)
    @triton.jit
    def _backward_tables_kernel(
        x_ptr, grad_y_ptr, gate_ptr, hidden_ptr, d_hidden_ptr, order_ptr, starts_ptr, counts_ptr, rows_ptr,
        grad_down_ptr, grad_up_ptr, U, S, D,
        DENSE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        """Segmented sums of BLOCK_R table rows (one block of d): each row's retrievals, BLOCK_N at a time."""
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # (R,) among the U rows of rows_ptr
        r_live = r < U
        dd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # (Db,)
        d_live = dd < D
        start = tl.load(starts_ptr + r, mask=r_live, other=0)  # (R,) first of the row's sorted retrievals
        count = tl.load(counts_ptr + r, mask=r_live, other=0)  # (R,) how many retrievals it has
        acc_down = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
        for k0 in range(0, tl.max(count, axis=0), BLOCK_N):
            k = k0 + tl.arange(0, BLOCK_N)  # (N,)
            live = k[None, :] < count[:, None]  # (R, N)
            j = tl.load(order_ptr + start[:, None] + k[None, :], mask=live, other=0)  # (R, N) flat (t, s)
            t = j // S  # (R, N) token of each retrieval
            dh = tl.load(d_hidden_ptr + j, mask=live, other=0.0)
            h = tl.load(hidden_ptr + j, mask=live, other=0.0)
            w = tl.load(gate_ptr + j, mask=live, other=0.0).to(tl.float32) * _gelu(h)  # (R, N)
            tile = live[:, :, None] & d_live[None, None, :]
            xt = tl.load(x_ptr + t[:, :, None] * D + dd[None, None, :], mask=tile, other=0.0)  # (R, N, Db)
            gy = tl.load(grad_y_ptr + t[:, :, None] * D + dd[None, None, :], mask=tile, other=0.0)
            acc_down += tl.sum(dh[:, :, None] * xt.to(tl.float32), axis=1)
            acc_up += tl.sum(w[:, :, None] * gy.to(tl.float32), axis=1)
        if DENSE:  # write table row e itself
            out = tl.load(rows_ptr + r, mask=r_live, other=0)
        else:  # write line r of the (U, d) values
            out = r.to(tl.int64)
        where = out[:, None] * D + dd[None, :]
        tl.store(grad_down_ptr + where, acc_down, mask=r_live[:, None] & d_live[None, :])
        tl.store(grad_up_ptr + where, acc_up, mask=r_live[:, None] & d_live[None, :])


def _token_grid(M: int):
    return lambda meta: (triton.cdiv(M, meta["BLOCK_T"]),)


def experts_forward(x, idx, gate, down, up):
    """y (M, d) in x's dtype and hidden = down[idx] . x (M, S) in float32 (paper Eq. 4-5), in one kernel.

    x (M, d); idx (M, S) int64 rows of the tables, each in [0, R) (not checked); gate (M, S); down, up (R, d).
    """
    x, idx, gate, down, up = (a.contiguous() for a in (x, idx, gate, down, up))
    M, D = x.shape
    S = idx.shape[1]
    y = torch.empty(M, D, device=x.device, dtype=x.dtype)
    hidden = torch.empty(M, S, device=x.device, dtype=torch.float32)
    if M * S == 0 or D == 0:
        return y.zero_(), hidden.zero_()
    _forward_kernel[_token_grid(M)](x, idx, gate, down, up, y, hidden, M, S, D)
    return y, hidden


def _backward_tokens(grad_y, idx, gate, hidden, down, up):
    """grad_x (M, d), grad_gate (M, S) and d_hidden (M, S, float32) from the token kernel."""
    M, D = grad_y.shape
    S = idx.shape[1]
    grad_x = torch.empty(M, D, device=grad_y.device, dtype=grad_y.dtype)
    grad_gate = torch.empty(M, S, device=grad_y.device, dtype=gate.dtype)
    d_hidden = torch.empty(M, S, device=grad_y.device, dtype=torch.float32)
    if M * S == 0 or D == 0:
        return grad_x.zero_(), grad_gate.zero_(), d_hidden.zero_()
    grid = _token_grid(M)
    _backward_tokens_kernel[grid](grad_y, idx, gate, hidden, down, up, grad_x, grad_gate, d_hidden, M, S, D)
    return grad_x, grad_gate, d_hidden


def _segments(idx: torch.Tensor):
    """The retrievals sorted by table row: order (M*S,), and per retrieved row: rows, starts, counts (U,)."""
    sorted_rows, order = torch.sort(idx.reshape(-1), stable=True)  # (M*S,) each
    rows, counts = torch.unique_consecutive(sorted_rows, return_counts=True)  # (U,), (U,)
    starts = counts.cumsum(0) - counts  # (U,) where each row's retrievals begin in `order`
    return order, rows, starts, counts


def _all_row_segments(idx: torch.Tensor, num_rows: int):
    """`_segments` over every table row, retrieved or not: rows (R,) = 0..R-1, starts and counts (R,).

    Nothing here has a size that depends on the data (unique_consecutive's U does, and reads it back
    to the host), so the dense backward runs without a host sync and a CUDA graph can capture it.
    """
    flat = idx.reshape(-1)
    order = torch.sort(flat, stable=True).indices  # (M*S,)
    counts, starts = row_counts(flat, num_rows)  # (R,) each
    return order, torch.arange(num_rows, device=idx.device), starts, counts


def _backward_tables(x, grad_y, idx, gate, hidden, d_hidden, grad_down, grad_up, segments, dense: bool):
    order, rows, starts, counts = segments
    U, D, S = rows.shape[0], x.shape[1], idx.shape[1]
    if U == 0 or D == 0:
        return

    def grid(meta):
        return (triton.cdiv(U, meta["BLOCK_R"]), triton.cdiv(D, meta["BLOCK_D"]))

    _backward_tables_kernel[grid](
        x, grad_y, gate, hidden, d_hidden, order, starts, counts, rows, grad_down, grad_up, U, S, D, DENSE=dense
    )


def _prepare(grad_y, x, idx, gate, hidden, down, up):
    grad_y = grad_y.to(x.dtype)
    hidden = hidden.float()
    return (a.contiguous() for a in (grad_y, x, idx, gate, hidden, down, up))


def experts_backward(grad_y, x, idx, gate, hidden, down, up):
    """(grad_x, grad_gate, grad_down, grad_up) of `experts_forward`; table gradients dense (R, d), zero elsewhere.

    hidden is the forward's (M, S) output. Sums in float32; each gradient in its input's dtype.
    """
    grad_y, x, idx, gate, hidden, down, up = _prepare(grad_y, x, idx, gate, hidden, down, up)
    grad_x, grad_gate, d_hidden = _backward_tokens(grad_y, idx, gate, hidden, down, up)
    # Every row of the tables' gradients is written: the sums of its retrievals, zero for rows nobody retrieved.
    grad_down = torch.empty_like(down)
    grad_up = torch.empty_like(up)
    segments = _all_row_segments(idx, down.shape[0])
    _backward_tables(x, grad_y, idx, gate, hidden, d_hidden, grad_down, grad_up, segments, dense=True)
    return grad_x, grad_gate, grad_down, grad_up


def experts_backward_rows(grad_y, x, idx, gate, hidden, down, up):
    """`experts_backward` with row-sparse table gradients: (grad_x, grad_gate, rows, down_values, up_values).

    rows (U,) are the distinct table rows retrieved, ascending; down_values and up_values (U, d)
    their gradients (the same segmented kernel, writing line u instead of table row rows[u]).
    """
    grad_y, x, idx, gate, hidden, down, up = _prepare(grad_y, x, idx, gate, hidden, down, up)
    grad_x, grad_gate, d_hidden = _backward_tokens(grad_y, idx, gate, hidden, down, up)
    segments = _segments(idx)
    U, D = segments[1].shape[0], down.shape[1]
    down_values = torch.empty(U, D, device=down.device, dtype=down.dtype)
    up_values = torch.empty(U, D, device=up.device, dtype=up.dtype)
    _backward_tables(x, grad_y, idx, gate, hidden, d_hidden, down_values, up_values, segments, dense=False)
    return grad_x, grad_gate, segments[1], down_values, up_values


class PeerExpertsTriton(torch.autograd.Function):
    """y_t = sum_s gate[t,s] * gelu(down[idx[t,s]] . x_t) * up[idx[t,s]] (paper Eq. 4-5) through the kernels above."""

    @staticmethod
    def forward(ctx, x, idx, gate, down, up):
        y, hidden = experts_forward(x, idx, gate, down, up)
        ctx.save_for_backward(x, idx, gate, hidden, down, up)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        grad_x, grad_gate, grad_down, grad_up = experts_backward(grad_y, *ctx.saved_tensors)
        return grad_x, None, grad_gate, grad_down, grad_up


def peer_experts_triton(x, idx, gate, down, up):
    """Autograd form of `experts_forward` / `experts_backward` (for tests and benchmarks)."""
    return PeerExpertsTriton.apply(x, idx, gate, down, up)
