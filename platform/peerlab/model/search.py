"""The product-key search on the CPU in one pass per query (Lample et al. 2019, Sec. 3.2), in C.

Given each query half's scores against its sub-keys, s1 (R, n1) and s2 (R, n2), the k best keys
of the product set are the k best sums s1[i] + s2[j]. Torch does it in five top-k calls (two
per half through `topk_by_groups`, one over the candidate pairs) and their gathers; at the
shapes PEER layers train with, each top-k over a short row costs ~200 ns of per-row overhead,
and the search was a fifth of a small PEER layer's training step (N = 128², 4 heads, k 8,
dim 128: 1.8 ms per top-k over 8,192 rows). The kernel here does each query in one pass:

  1. the k best of each half, kept in a sorted list of k; the scores are read in blocks of 8,
     and a block none of whose scores beats the list's last (the common case once the list
     has filled) costs one vectorised comparison;
  2. the k best sums among the rank pairs (a, b) with (a+1)(b+1) <= k (every other pair has
     k pairs of lower ranks, hence k sums, at least as high: `ProductKeys.pair_rank1/2`).

Same values as torch's path (the same float32 additions), sorted highest first; equal scores
keep the lower column first (torch leaves the order of ties unspecified). A NaN score makes
`search` return None, and the caller runs torch's path, which ranks NaN highest.
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

/* Insert (v, j) into the list vals/idx sorted highest first, of *count <= k entries. */
static inline void push(float *vals, int64_t *idx, int *count, int k, float v, int64_t j) {
    int p = *count < k ? (*count)++ : k - 1;
    while (p > 0 && vals[p - 1] < v) { vals[p] = vals[p - 1]; idx[p] = idx[p - 1]; p--; }
    vals[p] = v; idx[p] = j;
}

/* The k best of s[0..n) into vals/idx, highest first; the number of NaNs seen. */
static int64_t topk_row(const float *s, int64_t n, int k, float *vals, int64_t *idx) {
    int count = 0;
    int64_t nans = 0, c = 0;
    for (; c < n && count < k; c++) {
        if (s[c] != s[c]) nans++;
        else push(vals, idx, &count, k, s[c], c);
    }
    if (count < k) return nans + 1;  /* fewer than k numbers: the caller falls back */
    float last = vals[k - 1];
    for (; c < n; c += 8) {
        int64_t end = c + 8 < n ? c + 8 : n;
        int hit = 0;
        for (int64_t j = c; j < end; j++) hit |= !(s[j] <= last);  /* above the list's last, or NaN */
        if (!hit) continue;
        for (int64_t j = c; j < end; j++) {
            float v = s[j];
            if (v != v) nans++;
            else if (v > last) { push(vals, idx, &count, k, v, j); last = vals[k - 1]; }
        }
    }
    return nans;
}

/* For each of R queries: the k best sums s1[i] + s2[j] over the P rank pairs (rank1[p], rank2[p]),
   highest first, into sums, i1, i2 (R x k). Returns the number of NaNs seen (0: outputs valid). */
#if defined(__x86_64__)
__attribute__((target_clones("avx2", "default")))
#endif
int64_t product_key_search(const float *s1, const float *s2, int64_t R, int64_t n1, int64_t n2, int k,
                           const int64_t *rank1, const int64_t *rank2, int64_t P,
                           float *sums, int64_t *i1, int64_t *i2, int threads) {
    int64_t nans = 0;
    #pragma omp parallel for num_threads(threads) schedule(static) reduction(+:nans)
    for (int64_t r = 0; r < R; r++) {
        float v1[k], v2[k], best[k];
        int64_t j1[k], j2[k], pick[k];
        nans += topk_row(s1 + r * n1, n1, k, v1, j1);
        nans += topk_row(s2 + r * n2, n2, k, v2, j2);
        int count = 0;
        for (int64_t p = 0; p < P; p++) {
            float v = v1[rank1[p]] + v2[rank2[p]];
            if (count < k || v > best[k - 1]) push(best, pick, &count, k, v, p);
        }
        for (int q = 0; q < k; q++) {
            sums[r * k + q] = best[q];
            i1[r * k + q] = j1[rank1[pick[q]]];
            i2[r * k + q] = j2[rank2[pick[q]]];
        }
    }
    return nans;
}
"""


@functools.cache
def _library():
    if os.environ.get("PEERLAB_SEARCH_KERNEL", "1") == "0":
        return None
    lib = native.load("product_key_search", SOURCE)
    if lib is not None:
        fn = lib.product_key_search
        fn.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 3 + [ctypes.c_int] + [ctypes.c_void_p] * 2
        fn.argtypes += [ctypes.c_int64] + [ctypes.c_void_p] * 3 + [ctypes.c_int]
        fn.restype = ctypes.c_int64
    return lib


def available(s1: torch.Tensor) -> bool:
    """Whether `search` can run on scores like `s1`: float32 on the CPU, the kernel built."""
    return s1.device.type == "cpu" and s1.dtype == torch.float32 and _library() is not None


def search(
    s1: torch.Tensor, s2: torch.Tensor, k: int, rank1: torch.Tensor, rank2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(sums, i1, i2), each (R, k): the k best s1[r, i1] + s2[r, i2] of each row, highest first.

    s1 (R, n1), s2 (R, n2) float32 on the CPU; rank1, rank2 (P,) int64, the candidate rank pairs.
    None where the kernel cannot run (not built, other dtypes or devices, k > n, a NaN score).
    """
    if not (available(s1) and s2.dtype == torch.float32 and s2.device.type == "cpu"):
        return None
    R, n1 = s1.shape
    n2 = s2.shape[1]
    if k > min(n1, n2) or s2.shape[0] != R:
        return None
    s1, s2 = s1.contiguous(), s2.contiguous()
    rank1, rank2 = rank1.contiguous(), rank2.contiguous()
    sums = torch.empty(R, k, dtype=torch.float32)
    i1 = torch.empty(R, k, dtype=torch.int64)
    i2 = torch.empty(R, k, dtype=torch.int64)
    nans = _library().product_key_search(
        s1.data_ptr(), s2.data_ptr(), R, n1, n2, k, rank1.data_ptr(), rank2.data_ptr(), rank1.numel(),
        sums.data_ptr(), i1.data_ptr(), i2.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    return None if nans else (sums, i1, i2)
