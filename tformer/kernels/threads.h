/* Shared by rmsnorm.c and norms.c: how a thread of a parallel region finds its share of the rows. */
#ifndef TFORMER_THREADS_H
#define TFORMER_THREADS_H

#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#define TFORMER_THREAD_INDEX_(part, nparts) \
  do {                                      \
    part = omp_get_thread_num();            \
    nparts = omp_get_num_threads();         \
  } while (0)
#else
#define TFORMER_THREAD_INDEX_(part, nparts) ((void)0)
#endif

#define TFORMER_PARALLEL_MIN 32768 /* elements below which one thread is faster */

/* Declares the calling thread's index `part` among `nparts` threads of the enclosing parallel region
 * and its contiguous, even share [first, last) of `rows` rows (part 0 of 1, all rows, without OpenMP
 * or outside a parallel region). Per-thread partial sums are indexed by `part`. */
#define TFORMER_THREAD_ROWS(rows, part, nparts, first, last)                              \
  int64_t part = 0, nparts = 1;                                                           \
  TFORMER_THREAD_INDEX_(part, nparts);                                                    \
  const int64_t first = (rows) * part / nparts, last = (rows) * (part + 1) / nparts

#endif
