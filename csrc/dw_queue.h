/* Serial background queue of weight-gradient sgemms, overlapping the caller:
 *     dW[M, N] += dY[M, K] . X[N, K]^T      (row-major, beta = 1; M = out, N = in, K = S)
 * Jobs run one at a time in submission order (so several jobs may target the same dW), on a GCD
 * serial queue on Apple platforms and on one pthread worker elsewhere. */
#ifndef RUSTANE_DW_QUEUE_H
#define RUSTANE_DW_QUEUE_H

typedef struct rustane_dwq rustane_dwq;

/* blas_threads: threads the BLAS may use for the queue's sgemms (0 keeps the library default). It is
 * applied before every job, per worker thread where the BLAS allows, else process-wide for that BLAS
 * library (see rustane_dwq_blas_scope).
 * Returns NULL when out of memory or the worker cannot start. */
rustane_dwq *rustane_dwq_create(int blas_threads);

/* Queue one job. copy != 0 snapshots dY and X into a private buffer before returning, so the caller
 * may overwrite them at once; copy == 0 reads them when the job runs. dW is always written in place
 * and must stay alive and untouched until rustane_dwq_wait returns. Thread-safe.
 * Returns 0, or ENOMEM (nothing queued). */
int rustane_dwq_submit(rustane_dwq *q, float *dW, const float *dY, const float *X, int M, int N, int K, int copy);

/* Test hook: queue a job that reports error code err (errno-style, > 0) when it runs. */
int rustane_dwq_submit_error(rustane_dwq *q, int err);

/* Block until every job submitted before this call (and any that raced in) has finished.
 * Returns 0, or the first error a job reported since the previous wait (the error is cleared). */
int rustane_dwq_wait(rustane_dwq *q);

/* Scope of the blas_threads setting with the linked BLAS: 2 per thread, 1 process-wide, 0 none. */
int rustane_dwq_blas_scope(void);

/* Wait for all jobs, stop the worker and free everything. q may be NULL. */
void rustane_dwq_destroy(rustane_dwq *q);

#endif
