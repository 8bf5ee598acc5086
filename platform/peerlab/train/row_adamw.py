"""AdamW on the rows a sparse gradient touched, in one pass per row over host memory.

`RowSparseAdamW` updates a PEER table's touched rows (U of them, sorted and unique) in
place. With torch's own ops that is three gathers (weight and both moments), torch's fused
AdamW on the gathered copies and three scatters back: each row's 4 x d floats are read and
written about five times. At N = 1024² a step touches ~123,000 rows per table, and that
traffic was half of a PEER layer's CPU training step (`benchmarks/step_scaling.py`).
torch has no fused sparse-row AdamW on CPU, and inductor, asked to compile the same
gather-update-scatter, still writes the gathered rows to temporaries before the scatter
(it cannot know the rows are unique), so this module compiles a twelve-line C loop with
the system's C compiler: one OpenMP pass that reads w, m, v and g of a row and writes w, m,
v back, the least any AdamW must move (7 x 4 x d bytes a row). It runs on torch's own OpenMP
runtime (torch ships libgomp, which the loader reuses) with torch's thread count.

The library is built once per machine (`peerlab.native`). Where there is no C compiler, or
the tensors are not contiguous float32 on the CPU, `row_adamw` returns False and the caller
uses torch's ops. PEERLAB_ROW_ADAMW_KERNEL=0 (or PEERLAB_NATIVE=0) turns the kernel off.
"""

from __future__ import annotations

import ctypes
import functools
import os

import torch

from peerlab import native

SOURCE = r"""
#include <stdint.h>
#include <math.h>
/* AdamW (torch's fused formula) on rows[0..U) of w, m, v (R x d, row-major) with g (U x d). */
#if defined(__x86_64__)
__attribute__((target_clones("avx2", "default")))
#endif
void row_adamw(float *w, float *m, float *v, const int64_t *rows, const float *g, int64_t U, int64_t d,
               double lr, double beta1, double beta2, double weight_decay, double eps,
               double bias_correction1, double bias_correction2_sqrt, int threads) {
    const float decay = (float)(1.0 - lr * weight_decay), w1 = (float)(1.0 - beta1);
    const float b2 = (float)beta2, w2 = (float)(1.0 - beta2), e = (float)eps;
    const float step_size = (float)(lr / bias_correction1), bc2 = (float)bias_correction2_sqrt;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < U; i++) {
        float *wr = w + rows[i] * d, *mr = m + rows[i] * d, *vr = v + rows[i] * d;
        const float *gr = g + i * d;
        #pragma omp simd
        for (int64_t j = 0; j < d; j++) {
            const float gj = gr[j];
            const float mj = mr[j] + w1 * (gj - mr[j]); /* lerp(m, g, 1 - beta1) */
            const float vj = b2 * vr[j] + w2 * gj * gj;
            mr[j] = mj;
            vr[j] = vj;
            wr[j] = wr[j] * decay - step_size * mj / (sqrtf(vj) / bc2 + e);
        }
    }
}
"""


@functools.cache
def _library():
    """The compiled kernel (`peerlab.native`), or None where it cannot be built or is turned off."""
    if os.environ.get("PEERLAB_ROW_ADAMW_KERNEL", "1") == "0":
        return None
    lib = native.load("row_adamw", SOURCE)
    if lib is not None:
        lib.row_adamw.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 2 + [ctypes.c_double] * 7 + [ctypes.c_int]
        lib.row_adamw.restype = None
    return lib


def row_adamw(
    param: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    rows: torch.Tensor,
    grad: torch.Tensor,
    step: float,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    eps: float,
) -> bool:
    """AdamW on param[rows], exp_avg[rows], exp_avg_sq[rows] in place with grad (U, d); False where not run.

    rows must be unique (a coalesced gradient's): each row is updated by one thread.
    """
    tables = (param, exp_avg, exp_avg_sq)
    if not all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in (*tables, grad)):
        return False
    if param.dim() != 2 or rows.dtype != torch.int64 or not rows.is_contiguous() or rows.device.type != "cpu":
        return False
    if grad.shape != (rows.numel(), param.shape[1]) or any(t.shape != param.shape for t in tables):
        return False
    lib = _library()
    if lib is None:
        return False
    lib.row_adamw(
        param.data_ptr(), exp_avg.data_ptr(), exp_avg_sq.data_ptr(), rows.data_ptr(), grad.data_ptr(),
        rows.numel(), param.shape[1], float(lr), beta1, beta2, weight_decay, eps,
        1 - beta1**step, (1 - beta2**step) ** 0.5, torch.get_num_threads(),
    )  # fmt: skip
    return True
