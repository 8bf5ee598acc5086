"""The product-key search on the CPU in one pass per query (Lample et al. 2019, Sec. 3.2), in C.

Given each query half's scores against its sub-keys, s1 (R, n1) and s2 (R, n2), the k best keys
of the product set are the k best sums s1[i] + s2[j]. Torch does it in five top-k calls (two
per half through `topk_by_groups`, one over the candidate pairs) and their gathers; at the
shapes PEER layers train with, each top-k over a short row costs ~200 ns of per-row overhead,
and the search was a fifth of a small PEER layer's training step (N = 128², 4 heads, k 8,
dim 128: 1.8 ms per top-k over 8,192 rows). The kernel here does each query in one pass:

  1. the k best of each half, kept in a list of k sorted highest first; the scores are read in
     blocks of 8, each block compared at once with the list's last entry, and only the scores
     above it are inserted (with AVX2, one vector comparison and the set bits of its mask, and
     the insertion itself moves the list 8 entries a register);
  2. the k best sums among the rank pairs (a, b) with (a+1)(b+1) <= k (every other pair has
     k pairs of lower ranks, hence k sums, at least as high: `ProductKeys.pair_rank1/2`).

Same values as torch's path (the same float32 additions), sorted highest first; equal scores
keep the lower column first within a half, equal sums the earlier rank pair (torch leaves the
order of ties unspecified). For k up to 32 (more:
torch's path). A NaN score makes `search` return None, and the caller runs torch's path, which
ranks NaN highest. 2.7-3.1x torch's path on this project's 2-core CPU (8,192 queries: 128
sub-keys and k = 8, 1,024 and k = 16; 2.4x at 32 and k = 8), AVX2 or not chosen at run time.
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
#define MAXK 32

/* Insert (v, j) into the list vals/idx sorted highest first (k entries, -inf where empty), v above vals[k-1]. */
static inline void push_scalar(float *vals, int32_t *idx, int k, float v, int32_t j) {
    int p = k - 1;
    while (p > 0 && vals[p - 1] < v) { vals[p] = vals[p - 1]; idx[p] = idx[p - 1]; p--; }
    vals[p] = v; idx[p] = j;
}

#if defined(__x86_64__)
#include <immintrin.h>
/* The same insert with AVX2, 8 entries a register (the list padded to a multiple of 8 with -inf):
   entries below v move down one lane (across registers through the last lane), v lands at the first. */
__attribute__((target("avx2"))) static inline void push_avx2(float *vals, int32_t *idx, int k, float v, int32_t j) {
    const __m256i rot = _mm256_setr_epi32(7, 0, 1, 2, 3, 4, 5, 6), last = _mm256_set1_epi32(7);
    const __m256 vv = _mm256_set1_ps(v);
    __m256 carry_v = vv, carry_lt = _mm256_setzero_ps();
    __m256i carry_i = _mm256_set1_epi32(j);
    for (int r = 0; r < k; r += 8) {
        const __m256 V = _mm256_load_ps(vals + r);
        const __m256i I = _mm256_load_si256((const __m256i *)(idx + r));
        const __m256 lt = _mm256_cmp_ps(V, vv, _CMP_LT_OQ);  /* lane q: V[q] < v */
        /* lane q of the shifted list: entry q-1 (lane 0: the previous register's last) */
        const __m256 Vs = _mm256_blend_ps(_mm256_permutevar8x32_ps(V, rot), carry_v, 1);
        const __m256i Is = _mm256_blend_epi32(_mm256_permutevar8x32_epi32(I, rot), carry_i, 1);
        const __m256 moves = _mm256_blend_ps(_mm256_permutevar8x32_ps(lt, rot), carry_lt, 1);  /* entry q-1 < v */
        const __m256 lands = _mm256_andnot_ps(moves, lt);  /* the first entry below v */
        carry_v = _mm256_permutevar8x32_ps(V, last);
        carry_i = _mm256_permutevar8x32_epi32(I, last);
        carry_lt = _mm256_permutevar8x32_ps(lt, last);
        _mm256_store_ps(vals + r, _mm256_blendv_ps(_mm256_blendv_ps(V, Vs, moves), vv, lands));
        const __m256 Ii = _mm256_blendv_ps(_mm256_blendv_ps(_mm256_castsi256_ps(I), _mm256_castsi256_ps(Is), moves),
                                           _mm256_castsi256_ps(_mm256_set1_epi32(j)), lands);
        _mm256_store_si256((__m256i *)(idx + r), _mm256_castps_si256(Ii));
    }
}
#endif

/* The k best of s[0..n) into vals/idx (MAXK entries, the first k used), highest first.
   Returns the NaNs seen, plus 1 if there are fewer than k numbers. */
static int64_t half_scalar(const float *s, int64_t n, int k, float *vals, int32_t *idx) {
    int64_t nans = 0;
    for (int q = 0; q < MAXK; q++) { vals[q] = -INFINITY; idx[q] = -1; }
    float last = -INFINITY;
    for (int64_t c = 0; c < n; c += 8) {
        const int64_t end = c + 8 < n ? c + 8 : n;
        int hit = 0;
        for (int64_t j = c; j < end; j++) hit |= !(s[j] <= last);  /* above the list's last, or NaN */
        if (!hit) continue;
        for (int64_t j = c; j < end; j++) {
            const float v = s[j];
            if (v != v) nans++;
            else if (v > last) { push_scalar(vals, idx, k, v, (int32_t)j); last = vals[k - 1]; }
        }
    }
    return nans + (idx[k - 1] < 0);
}

#if defined(__x86_64__)
/* The same with AVX2: a block of 8 scores is one comparison with the list's last, and only the
   scores above it (the set bits of its mask) are visited. */
__attribute__((target("avx2"))) static int64_t half_avx2(const float *s, int64_t n, int k, float *vals, int32_t *idx) {
    int64_t nans = 0;
    for (int q = 0; q < MAXK; q++) { vals[q] = -INFINITY; idx[q] = -1; }
    float last = -INFINITY;
    int64_t c = 0;
    for (; c + 8 <= n; c += 8) {
        unsigned mask = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(s + c), _mm256_set1_ps(last), _CMP_NLE_UQ));
        while (mask) {  /* above the list's last, or NaN */
            const int64_t j = c + __builtin_ctz(mask);
            const float v = s[j];
            mask &= mask - 1;
            if (v != v) nans++;
            else if (v > last) { push_avx2(vals, idx, k, v, (int32_t)j); last = vals[k - 1]; }
        }
    }
    for (; c < n; c++) {
        const float v = s[c];
        if (v != v) nans++;
        else if (v > last) { push_avx2(vals, idx, k, v, (int32_t)c); last = vals[k - 1]; }
    }
    return nans + (idx[k - 1] < 0);
}
#endif

/* One query: the k best of each half, then the k best sums over the P rank pairs, into sums, i1, i2
   (k each). Returns the NaNs seen, plus 1 if a half has fewer than k numbers above -inf, or the
   pairs fewer than k sums above -inf (the outputs are then not written). */
#define SEARCH_ROW(NAME, ATTR, HALF, PUSH)                                                              \
ATTR static int64_t NAME(const float *s1, const float *s2, int64_t n1, int64_t n2, int k,               \
                         const int64_t *rank1, const int64_t *rank2, int64_t P,                         \
                         float *sums, int64_t *i1, int64_t *i2) {                                       \
    float v1[MAXK] __attribute__((aligned(32))), v2[MAXK] __attribute__((aligned(32)));                 \
    float best[MAXK] __attribute__((aligned(32)));                                                      \
    int32_t j1[MAXK] __attribute__((aligned(32))), j2[MAXK] __attribute__((aligned(32)));               \
    int32_t pick[MAXK] __attribute__((aligned(32)));                                                    \
    int64_t nans = HALF(s1, n1, k, v1, j1) + HALF(s2, n2, k, v2, j2);                                   \
    for (int q = 0; q < MAXK; q++) { best[q] = -INFINITY; pick[q] = -1; }                               \
    for (int64_t p = 0; p < P; p++) {                                                                   \
        const float v = v1[rank1[p]] + v2[rank2[p]];                                                    \
        if (v > best[k - 1]) PUSH(best, pick, k, v, (int32_t)p);                                        \
    }                                                                                                   \
    if (pick[k - 1] < 0) return nans + 1; /* fewer than k sums above -inf: the caller falls back */     \
    for (int q = 0; q < k; q++) {                                                                       \
        sums[q] = best[q];                                                                              \
        i1[q] = j1[rank1[pick[q]]];                                                                     \
        i2[q] = j2[rank2[pick[q]]];                                                                     \
    }                                                                                                   \
    return nans;                                                                                        \
}

SEARCH_ROW(row_scalar, , half_scalar, push_scalar)
#if defined(__x86_64__)
SEARCH_ROW(row_avx2, __attribute__((target("avx2"))), half_avx2, push_avx2)
#endif

/* For each of R queries: the k best sums s1[i] + s2[j] (k <= 32) over the P rank pairs (rank1[p], rank2[p]),
   highest first, into sums, i1, i2 (R x k). Returns 0 where the outputs are valid: else the number of
   NaNs seen (and rows short of k numbers), or -1 for a rank outside [0, k). */
int64_t product_key_search(const float *s1, const float *s2, int64_t R, int64_t n1, int64_t n2, int k,
                           const int64_t *rank1, const int64_t *rank2, int64_t P,
                           float *sums, int64_t *i1, int64_t *i2, int simd, int threads) {
    for (int64_t p = 0; p < P; p++)  /* the ranks index the k-entry lists */
        if (rank1[p] < 0 || rank1[p] >= k || rank2[p] < 0 || rank2[p] >= k) return -1;
    int64_t nans = 0;
    int avx2 = 0;
#if defined(__x86_64__)
    avx2 = simd && __builtin_cpu_supports("avx2");
#endif
    #pragma omp parallel for num_threads(threads) schedule(static) reduction(+:nans)
    for (int64_t r = 0; r < R; r++) {
#if defined(__x86_64__)
        if (avx2) {
            nans += row_avx2(s1 + r * n1, s2 + r * n2, n1, n2, k, rank1, rank2, P, sums + r * k, i1 + r * k, i2 + r * k);
            continue;
        }
#endif
        nans += row_scalar(s1 + r * n1, s2 + r * n2, n1, n2, k, rank1, rank2, P, sums + r * k, i1 + r * k, i2 + r * k);
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
        fn.argtypes += [ctypes.c_int64] + [ctypes.c_void_p] * 3 + [ctypes.c_int] * 2
        fn.restype = ctypes.c_int64
    return lib


def available(s1: torch.Tensor) -> bool:
    """Whether `search` can run on scores like `s1`: float32 on the CPU, the kernel built."""
    return s1.device.type == "cpu" and s1.dtype == torch.float32 and _library() is not None


def search(
    s1: torch.Tensor, s2: torch.Tensor, k: int, rank1: torch.Tensor, rank2: torch.Tensor, simd: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(sums, i1, i2), each (R, k): the k best s1[r, i1] + s2[r, i2] of each row, highest first.

    s1 (R, n1), s2 (R, n2) float32 on the CPU; rank1, rank2 (P,) int64 on the CPU, the candidate
    rank pairs, each in [0, k). None where the kernel cannot run: not built, other dtypes, devices
    or shapes, k outside [1, min(n1, n2, 32)], fewer than k numbers above -inf in a half or in a
    row's candidate sums, a NaN score. `simd`: AVX2 where the CPU has it (False: the plain C loop,
    as on other CPUs).
    """
    if not (available(s1) and s2.dtype == torch.float32 and s2.device.type == "cpu"):
        return None
    R, n1 = s1.shape
    n2 = s2.shape[1]
    if not 1 <= k <= min(n1, n2, 32) or s2.shape[0] != R:
        return None
    for rank in (rank1, rank2):  # read as int64 by the C loop (which checks their values)
        if rank.dtype != torch.int64 or rank.device.type != "cpu" or rank.shape != rank1.shape:
            return None
    if rank1.numel() < k:
        return None
    s1, s2 = s1.contiguous(), s2.contiguous()
    rank1, rank2 = rank1.contiguous(), rank2.contiguous()
    sums = torch.empty(R, k, dtype=torch.float32)
    i1 = torch.empty(R, k, dtype=torch.int64)
    i2 = torch.empty(R, k, dtype=torch.int64)
    failed = _library().product_key_search(
        s1.data_ptr(), s2.data_ptr(), R, n1, n2, k, rank1.data_ptr(), rank2.data_ptr(), rank1.numel(),
        sums.data_ptr(), i1.data_ptr(), i2.data_ptr(), int(simd), torch.get_num_threads(),
    )  # fmt: skip
    return None if failed else (sums, i1, i2)
