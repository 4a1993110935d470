/* Fused CPU kernels for tformer's other norms: DyT, ScaleNorm, AdaNorm and PowerNorm (training).
 * Compiled into the same library as rmsnorm.c (which holds the ABI number, the huge-page advice
 * helpers; threads.h holds what both share); every function exists for float (f32) and double (f64).
 * Rows are the tokens (``rows`` of ``d`` contiguous elements). Column sums (gradients of
 * per-channel parameters, PowerNorm's batch statistics) go to per-thread partial rows of a
 * zero-filled buffer that the caller sums, so no atomics and no ordering between threads.
 *
 *   DyT:        y = w * tanh(a x) + b;        t = tanh(a x), g = dy * w * (1 - t^2):
 *               dx = a g,  da = sum g x,  dw = sum dy t,  db = sum dy   (tanh recomputed in backward)
 *   ScaleNorm:  y = s x / m,  m = max(|x|, eps);   with p = dy . x per row:
 *               dx = (s / m) dy - [|x| >= eps] s p / |x|^3 x,   ds = sum_rows p / m
 *   AdaNorm:    u = (x - mean) rstd,  y = C (1 - k u) u  with the factor C (1 - k u) held constant:
 *               g = dy C (1 - k u),  dx = rstd (g - mean(g) - u mean(g u))   (LayerNorm's backward)
 *   PowerNorm:  group scaling u = x r (r = 1 / sqrt(mean_group(x^2) + geps) per token and group,
 *               r = 1 when groups = 0), batch statistic colsum(u^2), y = u s w + b (s per channel),
 *               backward: xh = u s, gt = dy w - nuc xh, du = gt sb, dx = r du - x r^3 (du . x)_group / c,
 *               partials nu += gt xh, dw += dy xh, db += dy.
 *   BatchNorm:  column statistics of the kept rows (shifted, blocked sums, totals in double), y = (x - mean) a + b
 *               with a = w rstd; backward (one call): column sums of dy and dy (x - mean) (all rows:
 *               padding outputs depend on the statistics too), then dx = a dy + c0 + c2 (x - mean)
 *               on the kept rows and a dy on padding rows (c0, c2 per channel from those sums).
 *
 * float tanh: tformer_tanhf below, branch-free so that `omp simd` vectorizes it (libm's tanhf is
 * not vectorized without -ffast-math); about 2e-7 relative error. double uses libm's tanh.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "threads.h"

#define TFORMER_BLOCK_ROWS 64              /* rows summed in the element type before a double sum */

/* a * b + c, fused where the CPU has FMA (ISO C mode leaves gcc's -ffp-contract off, so a plain
 * expression never becomes one; fmaf without hardware FMA would be a slow library call). */
#ifdef __FMA__
#define TFORMER_FMAF(a, b, c) fmaf(a, b, c)
#else
#define TFORMER_FMAF(a, b, c) ((a) * (b) + (c))
#endif


/* tanh in float without branches, so that `omp simd` loops calling it vectorize:
 * tanh|z| = -m / (2 + m) with m = expm1(-2|z|), |z| capped at 10 (tanh 10 rounds to 1).
 * expm1(x) = 2^n (expm1(r) + 1) - 1 = 2^n expm1(r) + (2^n - 1) with x = n ln2 + r, |r| <= ln2 / 2
 * (Cody-Waite: ln2 in a short high part and a low part) and expm1(r) by its Taylor polynomial
 * through r^7 (truncation < 6e-9); n = 0 near zero, so small |z| loses nothing to cancellation.
 * The min and the NaN pass-through are done on the bits: a float ternary becomes a branch that
 * stops gcc from vectorizing the loop. Measured: at most 1.7e-7 relative error (about 3 ulp). */
static inline float tformer_tanhf(float z) {
  union {
    float f;
    int32_t i;
  } a, in, out;
  in.f = z;
  a.f = fabsf(z);
  const int32_t nan = -(int32_t)(a.i > 0x7f800000); /* all ones where z is NaN */
  a.i = a.i < 0x41200000 ? a.i : 0x41200000;        /* min(|z|, 10.0f) */
  const float x = -2.0f * a.f;
  const int n = (int)(x * 1.44269504088896341f - 0.5f); /* round(x / ln2) for x <= 0 */
  const float nf = (float)n;
  const float r = TFORMER_FMAF(nf, -1.42860682030941723212e-6f, TFORMER_FMAF(nf, -0.693145751953125f, x));
  float p = 1.0f / 5040.0f;
  p = TFORMER_FMAF(p, r, 1.0f / 720.0f);
  p = TFORMER_FMAF(p, r, 1.0f / 120.0f);
  p = TFORMER_FMAF(p, r, 1.0f / 24.0f);
  p = TFORMER_FMAF(p, r, 1.0f / 6.0f);
  p = TFORMER_FMAF(p, r, 0.5f);
  p = TFORMER_FMAF(p * r, r, r);
  union {
    int32_t i;
    float f;
  } two_n;
  two_n.i = (n + 127) << 23;
  const float m = TFORMER_FMAF(two_n.f, p, two_n.f - 1.0f);
  out.f = copysignf(-m / (2.0f + m), z);
  out.i = (out.i & ~nan) | (in.i & nan);
  return out.f;
}

#define TFORMER_NORMS(T, SUFFIX, SQRT, TANH)                                                        \
  /* t (may be NULL): tanh(a x) kept for the backward. */                                         \
  void tformer_dyt_forward_##SUFFIX(const T *restrict x, const T *restrict alpha,                   \
                                    const T *restrict w, const T *restrict b, T *restrict y,        \
                                    T *restrict t, int64_t rows, int64_t d, int threads) {          \
    (void)threads;                                                                                  \
    const T a = *alpha;                                                                             \
    _Pragma("omp parallel for schedule(static) num_threads(threads) if (rows * d >= TFORMER_PARALLEL_MIN)") \
    for (int64_t i = 0; i < rows; ++i) {                                                            \
      const T *xr = x + i * d;                                                                      \
      T *yr = y + i * d;                                                                            \
      if (t) {                                                                                      \
        T *tr = t + i * d;                                                                          \
        _Pragma("omp simd")                                                                         \
        for (int64_t j = 0; j < d; ++j) {                                                           \
          const T v = TANH(a * xr[j]);                                                              \
          tr[j] = v;                                                                                \
          yr[j] = v * w[j] + (b ? b[j] : (T)0);                                                     \
        }                                                                                           \
      } else if (b) {                                                                               \
        _Pragma("omp simd")                                                                         \
        for (int64_t j = 0; j < d; ++j) yr[j] = TANH(a * xr[j]) * w[j] + b[j];                      \
      } else {                                                                                      \
        _Pragma("omp simd")                                                                         \
        for (int64_t j = 0; j < d; ++j) yr[j] = TANH(a * xr[j]) * w[j];                             \
      }                                                                                             \
    }                                                                                               \
  }                                                                                                 \
                                                                                                    \
  /* tt: the forward's tanh(a x), or NULL to recompute it. partial: parts rows of 2d + 1 zeros:   \
   * [dw (d), db (d), da (1)] per thread. */                                                        \
  void tformer_dyt_backward_##SUFFIX(const T *restrict dy, const T *restrict x,                     \
                                     const T *restrict tt, const T *restrict alpha,                 \
                                     const T *restrict w, T *restrict dx, T *restrict partial,      \
                                     int64_t rows, int64_t d, int parts) {                          \
    (void)parts;                                                                                    \
    const T a = *alpha;                                                                             \
    _Pragma("omp parallel num_threads(parts) if (rows * d >= TFORMER_PARALLEL_MIN)")         \
    {                                                                                               \
      TFORMER_THREAD_ROWS(rows, part, nparts, first, last);                                         \
      T *restrict dw = partial + part * (2 * d + 1), *restrict db = dw + d;                         \
      T da = 0;                                                                                     \
      for (int64_t i = first; i < last; ++i) {                                                      \
        const T *xr = x + i * d, *gr = dy + i * d;                                                  \
        T *dr = dx + i * d;                                                                         \
        if (tt) {                                                                                   \
          const T *tr = tt + i * d;                                                                 \
          _Pragma("omp simd reduction(+ : da)")                                                     \
          for (int64_t j = 0; j < d; ++j) {                                                         \
            const T t = tr[j], gy = gr[j];                                                          \
            const T g = gy * w[j] * ((T)1 - t * t);                                                 \
            dr[j] = a * g;                                                                          \
            da += g * xr[j];                                                                        \
            dw[j] += gy * t;                                                                        \
            db[j] += gy;                                                                            \
          }                                                                                         \
          continue;                                                                                 \
        }                                                                                           \
        _Pragma("omp simd reduction(+ : da)")                                                       \
        for (int64_t j = 0; j < d; ++j) {                                                           \
          const T t = TANH(a * xr[j]), gy = gr[j];                                                  \
          const T g = gy * w[j] * ((T)1 - t * t);                                                   \
          dr[j] = a * g;                                                                            \
          da += g * xr[j];                                                                          \
          dw[j] += gy * t;                                                                          \
          db[j] += gy;                                                                              \
        }                                                                                           \
      }                                                                                             \
      dw[2 * d] = da;                                                                               \
    }                                                                                               \
  }                                                                                                 \
                                                                                                    \
  void tformer_scalenorm_forward_##SUFFIX(const T *restrict x, const T *restrict scale,             \
                                          T *restrict y, T *restrict norm, int64_t rows, int64_t d, \
                                          double eps, int threads) {                                \
    (void)threads;                                                                                  \
    const T s = *scale;                                                                             \
    _Pragma("omp parallel for schedule(static) num_threads(threads) if (rows * d >= TFORMER_PARALLEL_MIN)") \
    for (int64_t i = 0; i < rows; ++i) {                                                            \
      const T *xr = x + i * d;                                                                      \
      T *yr = y + i * d;                                                                            \
      T acc = 0;                                                                                    \
      _Pragma("omp simd reduction(+ : acc)")                                                        \
      for (int64_t j = 0; j < d; ++j) acc += xr[j] * xr[j];                                         \
      const T n = SQRT(acc), m = n >= (T)eps ? n : (T)eps, f = s / m;                               \
      norm[i] = n;                                                                                  \
      _Pragma("omp simd")                                                                           \
      for (int64_t j = 0; j < d; ++j) yr[j] = xr[j] * f;                                            \
    }                                                                                               \
  }                                                                                                 \
                                                                                                    \
  /* partial: parts zeros, the thread's share of d scale. */                                        \
  void tformer_scalenorm_backward_##SUFFIX(const T *restrict dy, const T *restrict x,               \
                                           const T *restrict scale, const T *restrict norm,         \
                                           T *restrict dx, T *restrict partial, int64_t rows,       \
                                           int64_t d, double eps, int parts) {                      \
    (void)parts;                                                                                    \
    const T s = *scale;                                                                             \
    _Pragma("omp parallel num_threads(parts) if (rows * d >= TFORMER_PARALLEL_MIN)")         \
    {                                                                                               \
      TFORMER_THREAD_ROWS(rows, part, nparts, first, last);                                         \
      T ds = 0;                                                                                     \
      for (int64_t i = first; i < last; ++i) {                                                      \
        const T *xr = x + i * d, *gr = dy + i * d;                                                  \
        T *dr = dx + i * d;                                                                         \
        const T n = norm[i];                                                                        \
        const int through = n >= (T)eps;                                                            \
        const T m = through ? n : (T)eps;                                                           \
        T p = 0;                                                                                    \
        _Pragma("omp simd reduction(+ : p)")                                                        \
        for (int64_t j = 0; j < d; ++j) p += gr[j] * xr[j];                                         \
        const T f = s / m, c = through ? s * p / (n * n * n) : (T)0;                                \
        _Pragma("omp simd")                                                                         \
        for (int64_t j = 0; j < d; ++j) dr[j] = f * gr[j] - c * xr[j];                              \
        ds += p / m;                                                                                \
      }                                                                                             \
      partial[part] = ds;                                                                           \
    }                                                                                               \
  }                                                                                                 \
                                                                                                    \
  void tformer_adanorm_forward_##SUFFIX(const T *restrict x, T *restrict y, T *restrict mean,       \
                                        T *restrict rstd, int64_t rows, int64_t d, double eps,      \
                                        double k, double scale, int threads) {                      \
    (void)threads;                                                                                  \
    const T kk = (T)k, cc = (T)scale;                                                               \
    _Pragma("omp parallel for schedule(static) num_threads(threads) if (rows * d >= TFORMER_PARALLEL_MIN)") \
    for (int64_t i = 0; i < rows; ++i) {                                                            \
      const T *xr = x + i * d;                                                                      \
      T *yr = y + i * d;                                                                            \
      T sum = 0, sq = 0;                                                                            \
      _Pragma("omp simd reduction(+ : sum)")                                                        \
      for (int64_t j = 0; j < d; ++j) sum += xr[j];                                                 \
      const T mu = sum / (T)d;                                                                      \
      _Pragma("omp simd reduction(+ : sq)")                                                         \
      for (int64_t j = 0; j < d; ++j) sq += (xr[j] - mu) * (xr[j] - mu);                            \
      const T r = (T)1 / SQRT(sq / (T)d + (T)eps);                                                  \
      mean[i] = mu;                                                                                 \
      rstd[i] = r;                                                                                  \
      _Pragma("omp simd")                                                                           \
      for (int64_t j = 0; j < d; ++j) {                                                             \
        const T u = (xr[j] - mu) * r;                                                               \
        yr[j] = cc * ((T)1 - kk * u) * u;                                                           \
      }                                                                                             \
    }                                                                                               \
  }                                                                                                 \
                                                                                                    \
  void tformer_adanorm_backward_##SUFFIX(const T *restrict dy, const T *restrict x,                 \
                                         const T *restrict mean, const T *restrict rstd,            \
                                         T *restrict dx, int64_t rows, int64_t d, double k,         \
                                         double scale, int threads) {                               \
    (void)threads;                                                                                  \
    const T kk = (T)k, cc = (T)scale;                                                               \
    _Pragma("omp parallel for schedule(static) num_threads(threads) if (rows * d >= TFORMER_PARALLEL_MIN)") \
    for (int64_t i = 0; i < rows; ++i) {                                                            \
      const T *xr = x + i * d, *gr = dy + i * d;                                                    \
      T *dr = dx + i * d;                                                                           \
      const T mu = mean[i], r = rstd[i];                                                            \
      T sg = 0, sgu = 0;                                                                            \
      _Pragma("omp simd reduction(+ : sg, sgu)")                                                    \
      for (int64_t j = 0; j < d; ++j) {                                                             \
        const T u = (xr[j] - mu) * r, g = gr[j] * (cc * ((T)1 - kk * u));                           \
        sg += g;                                                                                    \
        sgu += g * u;                                                                               \
      }                                                                                             \
      const T mg = sg / (T)d, mgu = sgu / (T)d;                                                     \
      _Pragma("omp simd")                                                                           \
      for (int64_t j = 0; j < d; ++j) {                                                             \
        const T u = (xr[j] - mu) * r, g = gr[j] * (cc * ((T)1 - kk * u));                           \
        dr[j] = r * (g - mg - u * mgu);                                                             \
      }                                                                                             \
    }                                                                                               \
  }                                                                                                 \
                                                                                                    \
  /* r: rows * groups (unused when groups == 0). Sums of u^2 per column over the rows with keep[i]   \
   * != 0 (all when keep is NULL), in T over blocks of TFORMER_BLOCK_ROWS rows (scratch: parts rows \
   * of d T), then into partial (parts rows of d double zeros). */                                  \
  void tformer_powernorm_stats_##SUFFIX(const T *restrict x, const uint8_t *restrict keep,          \
                                        T *restrict r, T *restrict scratch,                         \
                                        double *restrict partial, int64_t rows, int64_t d,          \
                                        int64_t groups, double geps, int parts) {                   \
    (void)parts;                                                                                    \
    const int64_t c = groups ? d / groups : d;                                                      \
    _Pragma("omp parallel num_threads(parts) if (rows * d >= TFORMER_PARALLEL_MIN)")         \
    {                                                                                               \
      TFORMER_THREAD_ROWS(rows, part, nparts, first, last);                                         \
      double *restrict total = partial + part * d;                                                  \
      T *restrict col = scratch + part * d;                                                         \
      for (int64_t start = first; start < last; start += TFORMER_BLOCK_ROWS) {                     \
        const int64_t stop = start + TFORMER_BLOCK_ROWS < last ? start + TFORMER_BLOCK_ROWS : last; \
        for (int64_t j = 0; j < d; ++j) col[j] = 0;                                                 \
        for (int64_t i = start; i < stop; ++i) {                                                    \
          const T *xr = x + i * d;                                                                  \
          const T counted = (keep && !keep[i]) ? (T)0 : (T)1; /* padding: r only */                \
          if (!groups) {                                                                            \
            _Pragma("omp simd")                                                                     \
            for (int64_t j = 0; j < d; ++j) col[j] += xr[j] * xr[j] * counted;                      \
            continue;                                                                               \
          }                                                                                         \
          for (int64_t g = 0; g < groups; ++g) {                                                    \
            const T *xg = xr + g * c;                                                               \
            T *cg = col + g * c;                                                                    \
            T acc = 0;                                                                              \
            _Pragma("omp simd reduction(+ : acc)")                                                  \
            for (int64_t j = 0; j < c; ++j) acc += xg[j] * xg[j];                                   \
            const T q = (T)1 / SQRT(acc / (T)c + (T)geps), q2 = q * q * counted;                    \
            r[i * groups + g] = q;                                                                  \
            _Pragma("omp simd")                                                                     \
            for (int64_t j = 0; j < c; ++j) cg[j] += xg[j] * xg[j] * q2;                            \
          }                                                                                         \
        }                                                                                           \
        _Pragma("omp simd")                                                                         \
        for (int64_t j = 0; j < d; ++j) total[j] += (double)col[j];                                 \
      }                                                                                             \
    }                                                                                               \
  }                                                                                                 \
                                                                                                    \
  /* s (out): 1 / sqrt(psi2 + eps) per channel, kept for the backward. */                          \
  void tformer_powernorm_forward_##SUFFIX(const T *restrict x, const T *restrict r,                 \
                                          const T *restrict psi2, const T *restrict w,              \
                                          const T *restrict b, T *restrict y, T *restrict s,        \
                                          int64_t rows, int64_t d, int64_t groups, double eps,      \
                                          int threads) {                                            \
    (void)threads;                                                                                  \
    const int64_t c = groups ? d / groups : d, ng = groups ? groups : 1;                            \
    for (int64_t j = 0; j < d; ++j) s[j] = (T)1 / SQRT(psi2[j] + (T)eps);                           \
    _Pragma("omp parallel for schedule(static) num_threads(threads) if (rows * d >= TFORMER_PARALLEL_MIN)") \
    for (int64_t i = 0; i < rows; ++i) {                                                            \
      for (int64_t g = 0; g < ng; ++g) {                                                            \
        const int64_t o = g * c;                                                                    \
        const T *xg = x + i * d + o, *sg = s + o, *wg = w + o;                                      \
        T *yg = y + i * d + o;                                                                      \
        const T q = groups ? r[i * groups + g] : (T)1;                                              \
        if (b) {                                                                                    \
          const T *bg = b + o;                                                                      \
          _Pragma("omp simd")                                                                       \
          for (int64_t j = 0; j < c; ++j) yg[j] = xg[j] * q * sg[j] * wg[j] + bg[j];                \
        } else {                                                                                    \
          _Pragma("omp simd")                                                                       \
          for (int64_t j = 0; j < c; ++j) yg[j] = xg[j] * q * sg[j] * wg[j];                        \
        }                                                                                           \
      }                                                                                             \
    }                                                                                               \
  }                                                                                                 \
                                                                                                    \
  /* The whole backward in one call: coef (2d) = [sb = 1 / sqrt(batch_psi2 + eps), nuc = (1 -      \
   * alpha_bwd) nu]; partial: parts rows of 3d [sum gt xh over the rows with keep[i] != 0 (all when \
   * keep is NULL), dw, db] per thread, then summed into dw, db and nu += sum gt xh / count. */     \
  void tformer_powernorm_backward_##SUFFIX(                                                         \
      const T *restrict dy, const T *restrict x, const T *restrict r, const T *restrict s,          \
      const T *restrict batch_psi2, T *restrict nu, const T *restrict w,                            \
      const uint8_t *restrict keep, T *restrict dx, T *restrict dwo, T *restrict dbo,               \
      T *restrict coef, T *restrict partial, int64_t rows, int64_t d, int64_t groups, double eps,   \
      double alpha_bwd, double count, int parts) {                                                  \
    (void)parts;                                                                                    \
    const int64_t c = groups ? d / groups : d, ng = groups ? groups : 1;                            \
    T *restrict sb = coef, *restrict nuc = coef + d;                                                \
    for (int64_t j = 0; j < d; ++j) {                                                               \
      sb[j] = (T)1 / SQRT(batch_psi2[j] + (T)eps);                                                  \
      nuc[j] = (T)(1.0 - alpha_bwd) * nu[j];                                                        \
    }                                                                                               \
    for (int64_t j = 0; j < (int64_t)parts * 3 * d; ++j) partial[j] = 0;                            \
    int used = 1;                                                                                   \
    _Pragma("omp parallel num_threads(parts) if (rows * d >= TFORMER_PARALLEL_MIN)")         \
    {                                                                                               \
      TFORMER_THREAD_ROWS(rows, part, nparts, first, last);                                         \
      if (part == 0) used = (int)nparts;                                                            \
      T *restrict pnu = partial + part * 3 * d, *restrict pw = pnu + d, *restrict pb = pw + d;      \
      for (int64_t i = first; i < last; ++i) {                                                      \
        for (int64_t g = 0; g < ng; ++g) {                                                          \
          const int64_t o = g * c;                                                                  \
          const T *xg = x + i * d + o, *gg = dy + i * d + o;                                        \
          const T *sg = s + o, *bg = sb + o, *ng_ = nuc + o, *wg = w + o;                           \
          T *dg = dx + i * d + o, *nug = pnu + o, *wpg = pw + o, *bpg = pb + o;                     \
          const T q = groups ? r[i * groups + g] : (T)1;                                            \
          const T counted = (keep && !keep[i]) ? (T)0 : (T)1; /* nu: real tokens only */           \
          T dot = 0;                                                                                \
          _Pragma("omp simd reduction(+ : dot)")                                                    \
          for (int64_t j = 0; j < c; ++j) {                                                         \
            const T xh = xg[j] * q * sg[j], gy = gg[j];                                             \
            const T gt = gy * wg[j] - ng_[j] * xh;                                                  \
            nug[j] += gt * xh * counted;                                                            \
            wpg[j] += gy * xh;                                                                      \
            bpg[j] += gy;                                                                           \
            dot += gt * bg[j] * xg[j];                                                              \
          }                                                                                         \
          if (!groups) {                                                                            \
            _Pragma("omp simd")                                                                     \
            for (int64_t j = 0; j < c; ++j)                                                         \
              dg[j] = (gg[j] * wg[j] - ng_[j] * (xg[j] * sg[j])) * bg[j];                           \
            continue;                                                                               \
          }                                                                                         \
          const T cq = dot * q * q * q / (T)c;                                                      \
          _Pragma("omp simd")                                                                       \
          for (int64_t j = 0; j < c; ++j) {                                                         \
            const T du = (gg[j] * wg[j] - ng_[j] * (xg[j] * q * sg[j])) * bg[j];                    \
            dg[j] = q * du - cq * xg[j];                                                            \
          }                                                                                         \
        }                                                                                           \
      }                                                                                             \
    }                                                                                               \
    for (int64_t j = 0; j < d; ++j) {                                                               \
      T tn = 0, tw = 0, tb = 0;                                                                     \
      for (int q = 0; q < used; ++q) {                                                              \
        tn += partial[q * 3 * d + j];                                                               \
        tw += partial[q * 3 * d + d + j];                                                           \
        tb += partial[q * 3 * d + 2 * d + j];                                                       \
      }                                                                                             \
      nu[j] += (T)((double)tn / count);                                                             \
      dwo[j] = tw;                                                                                  \
      dbo[j] = tb;                                                                                  \
    }                                                                                               \
  }                                                                                                 \
                                                                                                    \
  /* Column sums of (x - shift) and (x - shift)^2 over the rows with keep[i] != 0 (all rows when    \
   * keep is NULL); shift (a row of x) keeps the variance free of cancellation. Sums run in T over  \
   * blocks of TFORMER_BLOCK_ROWS rows (scratch: parts rows of 2d T), then go to partial (parts     \
   * rows of 2d double zeros): full vector width, and float32 rounding over 64 terms at most. */   \
  void tformer_batchnorm_stats_##SUFFIX(const T *restrict x, const uint8_t *restrict keep,          \
                                        const T *restrict shift, T *restrict scratch,               \
                                        double *restrict partial, int64_t rows, int64_t d,          \
                                        int parts) {                                                \
    (void)parts;                                                                                    \
    _Pragma("omp parallel num_threads(parts) if (rows * d >= TFORMER_PARALLEL_MIN)")         \
    {                                                                                               \
      TFORMER_THREAD_ROWS(rows, part, nparts, first, last);                                         \
      double *restrict s1 = partial + part * 2 * d, *restrict s2 = s1 + d;                          \
      T *restrict b1 = scratch + part * 2 * d, *restrict b2 = b1 + d;                               \
      for (int64_t start = first; start < last; start += TFORMER_BLOCK_ROWS) {                     \
        const int64_t stop = start + TFORMER_BLOCK_ROWS < last ? start + TFORMER_BLOCK_ROWS : last; \
        for (int64_t j = 0; j < d; ++j) b1[j] = b2[j] = 0;                                          \
        for (int64_t i = start; i < stop; ++i) {                                                    \
          if (keep && !keep[i]) continue;                                                           \
          const T *xr = x + i * d;                                                                  \
          _Pragma("omp simd")                                                                       \
          for (int64_t j = 0; j < d; ++j) {                                                         \
            const T v = xr[j] - shift[j];                                                           \
            b1[j] += v;                                                                             \
            b2[j] += v * v;                                                                         \
          }                                                                                         \
        }                                                                                           \
        _Pragma("omp simd")                                                                         \
        for (int64_t j = 0; j < d; ++j) {                                                           \
          s1[j] += (double)b1[j];                                                                   \
          s2[j] += (double)b2[j];                                                                   \
        }                                                                                           \
      }                                                                                             \
    }                                                                                               \
  }                                                                                                 \
                                                                                                    \
  /* y = (x - mean) a + b (a = weight rstd; b may be NULL). */                                      \
  void tformer_batchnorm_forward_##SUFFIX(const T *restrict x, const T *restrict mean,              \
                                          const T *restrict a, const T *restrict b, T *restrict y,  \
                                          int64_t rows, int64_t d, int threads) {                   \
    (void)threads;                                                                                  \
    _Pragma("omp parallel for schedule(static) num_threads(threads) if (rows * d >= TFORMER_PARALLEL_MIN)") \
    for (int64_t i = 0; i < rows; ++i) {                                                            \
      const T *xr = x + i * d;                                                                      \
      T *yr = y + i * d;                                                                            \
      if (b) {                                                                                      \
        _Pragma("omp simd")                                                                         \
        for (int64_t j = 0; j < d; ++j) yr[j] = (xr[j] - mean[j]) * a[j] + b[j];                    \
      } else {                                                                                      \
        _Pragma("omp simd")                                                                         \
        for (int64_t j = 0; j < d; ++j) yr[j] = (xr[j] - mean[j]) * a[j];                           \
      }                                                                                             \
    }                                                                                               \
  }                                                                                                 \
                                                                                                    \
  /* The whole backward in one parallel region: column sums S1 = sum dy, S2 = sum dy (x - mean) over \
   * all rows (padding outputs depend on the statistics too; blocked as in the statistics above,   \
   * scratch: parts rows of 2d T, partial: parts rows of 2d double), then per column (each thread  \
   * a slice) a = w rstd, c0 = -a S1 / count, c2 = -a rstd^2 S2 / count (coef: 3d T), dw = S2 rstd, \
   * db = S1, then dx = a dy + c0 + c2 (x - mean) on kept rows and a dy on padding rows. */         \
  void tformer_batchnorm_backward_##SUFFIX(                                                         \
      const T *restrict dy, const T *restrict x, const uint8_t *restrict keep,                      \
      const T *restrict mean, const double *restrict rstd, const T *restrict w, double count,       \
      T *restrict dx, T *restrict dw, T *restrict db, T *restrict coef, T *restrict scratch,        \
      double *restrict partial, int64_t rows, int64_t d, int parts) {                               \
    (void)parts;                                                                                    \
    T *restrict ca = coef, *restrict c0 = coef + d, *restrict c2 = coef + 2 * d;                    \
    _Pragma("omp parallel num_threads(parts) if (rows * d >= TFORMER_PARALLEL_MIN)")         \
    {                                                                                               \
      TFORMER_THREAD_ROWS(rows, part, nparts, first, last);                                         \
      double *restrict s1 = partial + part * 2 * d, *restrict s2 = s1 + d;                          \
      T *restrict b1 = scratch + part * 2 * d, *restrict b2 = b1 + d;                               \
      for (int64_t j = 0; j < 2 * d; ++j) s1[j] = 0;                                                \
      for (int64_t start = first; start < last; start += TFORMER_BLOCK_ROWS) {                     \
        const int64_t stop = start + TFORMER_BLOCK_ROWS < last ? start + TFORMER_BLOCK_ROWS : last; \
        for (int64_t j = 0; j < d; ++j) b1[j] = b2[j] = 0;                                          \
        for (int64_t i = start; i < stop; ++i) {                                                    \
          const T *xr = x + i * d, *gr = dy + i * d;                                                \
          _Pragma("omp simd")                                                                       \
          for (int64_t j = 0; j < d; ++j) {                                                         \
            b1[j] += gr[j];                                                                         \
            b2[j] += gr[j] * (xr[j] - mean[j]);                                                     \
          }                                                                                         \
        }                                                                                           \
        _Pragma("omp simd")                                                                         \
        for (int64_t j = 0; j < d; ++j) {                                                           \
          s1[j] += (double)b1[j];                                                                   \
          s2[j] += (double)b2[j];                                                                   \
        }                                                                                           \
      }                                                                                             \
      _Pragma("omp barrier")                                                                        \
      for (int64_t j = d * part / nparts; j < d * (part + 1) / nparts; ++j) {                       \
        double t1 = 0, t2 = 0;                                                                      \
        for (int64_t q = 0; q < nparts; ++q) {                                                      \
          t1 += partial[q * 2 * d + j];                                                             \
          t2 += partial[q * 2 * d + d + j];                                                         \
        }                                                                                           \
        const double r = rstd[j], av = r * (double)w[j];                                            \
        ca[j] = (T)av;                                                                              \
        c0[j] = (T)(-av * t1 / count);                                                              \
        c2[j] = (T)(-av * r * r * t2 / count);                                                      \
        dw[j] = (T)(t2 * r);                                                                        \
        db[j] = (T)t1;                                                                              \
      }                                                                                             \
      _Pragma("omp barrier")                                                                        \
      for (int64_t i = first; i < last; ++i) {                                                      \
        const T *xr = x + i * d, *gr = dy + i * d;                                                  \
        T *dr = dx + i * d;                                                                         \
        if (keep && !keep[i]) {                                                                     \
          _Pragma("omp simd")                                                                       \
          for (int64_t j = 0; j < d; ++j) dr[j] = ca[j] * gr[j];                                    \
        } else {                                                                                    \
          _Pragma("omp simd")                                                                       \
          for (int64_t j = 0; j < d; ++j) dr[j] = ca[j] * gr[j] + c0[j] + c2[j] * (xr[j] - mean[j]); \
        }                                                                                           \
      }                                                                                             \
    }                                                                                               \
  }

TFORMER_NORMS(float, f32, sqrtf, tformer_tanhf)
TFORMER_NORMS(double, f64, sqrt, tanh)
