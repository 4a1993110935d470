/* RMSNorm forward and backward for contiguous rows on the CPU: one pass over memory each.
 *
 * Part of tformer (tformer/kernels/__init__.py compiles this file on first use and calls it
 * through ctypes). Plain C11 with OpenMP: no PyTorch headers, so it builds in well under a second.
 * When PyTorch has loaded its own libgomp.so.1 the OpenMP calls below resolve to it and share
 * PyTorch's thread pool.
 *
 *   forward:  rstd_i = 1 / sqrt(mean_j x_ij^2 + eps),   y_ij = x_ij * rstd_i * w_j
 *   backward: g_ij = dy_ij * w_j,   s_i = sum_j g_ij x_ij,
 *             dx_ij = rstd_i * g_ij - (s_i * rstd_i^3 / d) * x_ij,
 *             dw_j  = sum_i dy_ij * x_ij * rstd_i     (per-thread partial rows, summed by the caller)
 *
 * Statistics accumulate in the element type (float or double); reductions are vectorized with
 * `omp simd`, which may reorder the sum: results equal the textbook formula to rounding.
 */
#define _DEFAULT_SOURCE /* madvise */
#include <math.h>
#include <stdint.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "threads.h"


#define TFORMER_RMSNORM(T, SUFFIX, SQRT)                                                          \
  void tformer_rmsnorm_forward_##SUFFIX(const T *restrict x, const T *restrict w, T *restrict y,   \
                                        T *restrict rstd, int64_t rows, int64_t d, double eps,     \
                                        int threads) {                                             \
    (void)threads;                                                                                 \
    _Pragma("omp parallel for schedule(static) num_threads(threads) if (rows * d >= TFORMER_PARALLEL_MIN)") \
    for (int64_t i = 0; i < rows; ++i) {                                                           \
      const T *xr = x + i * d;                                                                     \
      T *yr = y + i * d;                                                                           \
      T acc = 0;                                                                                   \
      _Pragma("omp simd reduction(+ : acc)")                                                       \
      for (int64_t j = 0; j < d; ++j) acc += xr[j] * xr[j];                                        \
      const T r = (T)1 / SQRT(acc / (T)d + (T)eps);                                                \
      rstd[i] = r;                                                                                 \
      _Pragma("omp simd")                                                                          \
      for (int64_t j = 0; j < d; ++j) yr[j] = xr[j] * r * w[j];                                    \
    }                                                                                              \
  }                                                                                                \
                                                                                                   \
  /* dw_partial: `parts` rows of d zeros; part t accumulates the rows thread t handled. */         \
  void tformer_rmsnorm_backward_##SUFFIX(const T *restrict dy, const T *restrict x,                \
                                         const T *restrict w, const T *restrict rstd,              \
                                         T *restrict dx, T *restrict dw_partial, int64_t rows,     \
                                         int64_t d, int parts) {                                   \
    (void)parts;                                                                                   \
    _Pragma("omp parallel num_threads(parts) if (rows * d >= TFORMER_PARALLEL_MIN)")              \
    {                                                                                              \
      TFORMER_THREAD_ROWS(rows, part, nparts, first, last);                                         \
      T *restrict dw = dw_partial + part * d;                                                      \
      for (int64_t i = first; i < last; ++i) {                                                     \
        const T *xr = x + i * d, *gr = dy + i * d;                                                 \
        T *dr = dx + i * d;                                                                        \
        const T r = rstd[i];                                                                       \
        T s = 0;                                                                                   \
        _Pragma("omp simd reduction(+ : s)")                                                       \
        for (int64_t j = 0; j < d; ++j) s += gr[j] * w[j] * xr[j];                                 \
        const T c = s * r * r * r / (T)d;                                                          \
        _Pragma("omp simd")                                                                        \
        for (int64_t j = 0; j < d; ++j) {                                                          \
          dr[j] = r * gr[j] * w[j] - c * xr[j];                                                    \
          dw[j] += gr[j] * xr[j] * r;                                                              \
        }                                                                                          \
      }                                                                                            \
    }                                                                                              \
  }


TFORMER_RMSNORM(float, f32, sqrtf)
TFORMER_RMSNORM(double, f64, sqrt)

/* Ask for transparent huge pages on the 2 MB-aligned interior of a fresh, untouched output buffer.
 * Writing a fresh 64 MB tensor otherwise costs 16384 page faults (about 20 ms here, more than the
 * arithmetic); with huge pages it costs 32. Advice only: contents and lifetime are unchanged, and
 * only whole 2 MB pages inside [p, p + bytes) are named, so no other allocation is touched.
 * Returns 0 when advised, -1 otherwise (not Linux, no THP, too small). */
int tformer_advise_hugepages(void *p, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const uintptr_t huge = (uintptr_t)2 << 20;
  uintptr_t first = ((uintptr_t)p + huge - 1) & ~(huge - 1);
  uintptr_t last = ((uintptr_t)p + (uintptr_t)bytes) & ~(huge - 1);
  if (bytes <= 0 || last <= first) return -1;
  return madvise((void *)first, last - first, MADV_HUGEPAGE);
#else
  (void)p;
  (void)bytes;
  return -1;
#endif
}

/* Lets the loader check that the library it found is the one it compiled. */
int tformer_kernels_abi(void) { return 3; } /* 3: norms.c joined the library */

int tformer_kernels_openmp(void) {
#ifdef _OPENMP
  return 1;
#else
  return 0;
#endif
}
