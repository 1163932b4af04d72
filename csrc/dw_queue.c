/* dW queue: GCD serial queue + group on Apple platforms, one pthread worker elsewhere. */
#if !defined(__APPLE__) && !defined(_POSIX_C_SOURCE)
#define _POSIX_C_SOURCE 200809L
#endif

#include "dw_queue.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "blas.h"

/* Snapshot buffers are recycled: a fresh multi-megabyte malloc is a new mmap whose first-touch page
 * faults cost more than the copy itself, and they would land on the caller's thread at every submit.
 * Freed buffers wait here (best fit on reuse) up to POOL_SLOTS buffers / POOL_BYTES bytes, enough
 * for every job of a Stories110M backward pass in flight at once (84 jobs, ~180 MB). */
#define POOL_SLOTS 128
#define POOL_BYTES ((size_t)512 << 20)

typedef struct {
    pthread_mutex_t mu;
    float *buf[POOL_SLOTS];
    size_t cap[POOL_SLOTS]; /* in floats */
    int n;
    size_t bytes;
} snap_pool;

static int pool_init(snap_pool *p)
{
    memset(p, 0, sizeof *p);
    return pthread_mutex_init(&p->mu, NULL);
}

static void pool_destroy(snap_pool *p)
{
    for (int i = 0; i < p->n; i++)
        free(p->buf[i]);
    pthread_mutex_destroy(&p->mu);
}

static float *pool_get(snap_pool *p, size_t need, size_t *cap)
{
    pthread_mutex_lock(&p->mu);
    int best = -1;
    for (int i = 0; i < p->n; i++)
        if (p->cap[i] >= need && (best < 0 || p->cap[i] < p->cap[best]))
            best = i;
    if (best >= 0) {
        float *b = p->buf[best];
        *cap = p->cap[best];
        p->bytes -= p->cap[best] * sizeof(float);
        p->n--;
        p->buf[best] = p->buf[p->n];
        p->cap[best] = p->cap[p->n];
        pthread_mutex_unlock(&p->mu);
        return b;
    }
    pthread_mutex_unlock(&p->mu);
    *cap = need;
    return malloc(need * sizeof(float));
}

static void pool_put(snap_pool *p, float *b, size_t cap)
{
    if (!b)
        return;
    pthread_mutex_lock(&p->mu);
    if (p->n < POOL_SLOTS && p->bytes + cap * sizeof(float) <= POOL_BYTES) {
        p->buf[p->n] = b;
        p->cap[p->n] = cap;
        p->n++;
        p->bytes += cap * sizeof(float);
        b = NULL;
    }
    pthread_mutex_unlock(&p->mu);
    free(b);
}

typedef struct dw_job {
    struct dw_job *next; /* pthread FIFO link (unused with GCD) */
    float *dW;
    const float *dY, *X;
    int M, N, K;
    int fail;            /* test hook: error code to report instead of computing */
    int blas_threads;
    snap_pool *pool;
    float *snapshot;     /* copy of dY then X from the pool, or NULL */
    size_t snapshot_cap;
} dw_job;

static dw_job *job_new(snap_pool *pool, float *dW, const float *dY, const float *X, int M, int N, int K, int copy,
                       int blas_threads)
{
    dw_job *j = calloc(1, sizeof *j);
    if (!j)
        return NULL;
    j->dW = dW;
    j->dY = dY;
    j->X = X;
    j->M = M;
    j->N = N;
    j->K = K;
    j->blas_threads = blas_threads;
    j->pool = pool;
    if (copy) {
        size_t ny = (size_t)M * (size_t)K, nx = (size_t)N * (size_t)K;
        /* one buffer for both operands; +1 keeps malloc(0) out of the picture */
        j->snapshot = pool_get(pool, ny + nx + 1, &j->snapshot_cap);
        if (!j->snapshot) {
            free(j);
            return NULL;
        }
        memcpy(j->snapshot, dY, ny * sizeof(float));
        memcpy(j->snapshot + ny, X, nx * sizeof(float));
        j->dY = j->snapshot;
        j->X = j->snapshot + ny;
    }
    return j;
}

static void job_free(dw_job *j)
{
    pool_put(j->pool, j->snapshot, j->snapshot_cap);
    free(j);
}

/* Runs the job and frees it; returns its error code. */
static int job_run(dw_job *j)
{
    int rc = j->fail;
    if (!rc && j->M > 0 && j->N > 0 && j->K > 0) {
        (void)rustane_blas_threads(j->blas_threads);
        RUSTANE_SGEMM(CblasRowMajor, CblasNoTrans, CblasTrans, j->M, j->N, j->K, 1.0f, j->dY, j->K, j->X, j->K,
                      1.0f, j->dW, j->N);
    }
    job_free(j);
    return rc;
}

#ifdef __APPLE__
/* ---- GCD ------------------------------------------------------------------------------------- */
#include <dispatch/dispatch.h>

struct rustane_dwq {
    snap_pool pool;
    dispatch_queue_t queue;
    dispatch_group_t group;
    atomic_int err;
    int blas_threads;
};

typedef struct {
    rustane_dwq *q;
    dw_job *job;
} gcd_ctx;

static void gcd_run(void *p)
{
    gcd_ctx *ctx = p;
    rustane_dwq *q = ctx->q;
    int rc = job_run(ctx->job);
    free(ctx);
    if (rc) {
        int none = 0; /* keep the first error only */
        atomic_compare_exchange_strong(&q->err, &none, rc);
    }
}

rustane_dwq *rustane_dwq_create(int blas_threads)
{
    rustane_dwq *q = calloc(1, sizeof *q);
    if (!q)
        return NULL;
    if (pool_init(&q->pool)) {
        free(q);
        return NULL;
    }
    q->queue = dispatch_queue_create("rustane.dw", DISPATCH_QUEUE_SERIAL);
    q->group = dispatch_group_create();
    if (!q->queue || !q->group) {
        if (q->queue)
            dispatch_release(q->queue);
        if (q->group)
            dispatch_release(q->group);
        pool_destroy(&q->pool);
        free(q);
        return NULL;
    }
    atomic_init(&q->err, 0);
    q->blas_threads = blas_threads;
    return q;
}

static int enqueue(rustane_dwq *q, dw_job *j)
{
    gcd_ctx *ctx = malloc(sizeof *ctx);
    if (!ctx) {
        job_free(j);
        return ENOMEM;
    }
    ctx->q = q;
    ctx->job = j;
    dispatch_group_async_f(q->group, q->queue, ctx, gcd_run);
    return 0;
}

int rustane_dwq_wait(rustane_dwq *q)
{
    dispatch_group_wait(q->group, DISPATCH_TIME_FOREVER);
    return atomic_exchange(&q->err, 0);
}

void rustane_dwq_destroy(rustane_dwq *q)
{
    if (!q)
        return;
    dispatch_group_wait(q->group, DISPATCH_TIME_FOREVER);
    dispatch_release(q->queue);
    dispatch_release(q->group);
    pool_destroy(&q->pool);
    free(q);
}

#else
/* ---- pthread worker ---------------------------------------------------------------------------- */

struct rustane_dwq {
    snap_pool pool;
    pthread_mutex_t mu;
    pthread_cond_t work;  /* signalled: job queued (worker asleep) or stop requested */
    pthread_cond_t idle;  /* broadcast: queue drained and no job running */
    dw_job *head, *tail;
    atomic_int queued;    /* jobs in the list; polled without the lock while the worker spins */
    int sleeping;         /* the worker is in pthread_cond_wait (read/written under mu) */
    int running;          /* a job is executing outside the lock */
    int stop;
    int err;              /* first error since the last wait */
    int blas_threads;
    pthread_t thread;
};

/* Waking a sleeping thread costs a futex syscall plus a cross-CPU interrupt (~8 us measured in this
 * VM, more than the job-submit itself; python -m rustane.bench native --only dw_overlap shows what the
 * spin buys), and a backward pass submits its dW jobs in bursts a few
 * microseconds apart. So a worker that drains the queue first polls for up to SPIN_NS before it
 * sleeps; submits that land inside that window need no wake-up at all. The price is at most
 * SPIN_NS of one core after each burst. */
#define SPIN_NS 50000L

static long elapsed_ns(const struct timespec *t0)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (t.tv_sec - t0->tv_sec) * 1000000000L + (t.tv_nsec - t0->tv_nsec);
}

static void spin_for_work(rustane_dwq *q)
{
    struct timespec t0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (unsigned i = 1; atomic_load_explicit(&q->queued, memory_order_acquire) <= 0; i++) {
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#endif
        if ((i & 63) == 0 && elapsed_ns(&t0) > SPIN_NS)
            return;
    }
}

static void *worker(void *p)
{
    rustane_dwq *q = p;
    pthread_mutex_lock(&q->mu);
    for (;;) {
        if (!q->head && !q->stop) {
            pthread_mutex_unlock(&q->mu);
            spin_for_work(q);
            pthread_mutex_lock(&q->mu);
            while (!q->head && !q->stop) {
                q->sleeping = 1;
                pthread_cond_wait(&q->work, &q->mu);
                q->sleeping = 0;
            }
        }
        if (!q->head) /* stop requested and everything drained */
            break;
        dw_job *j = q->head;
        q->head = j->next;
        if (!q->head)
            q->tail = NULL;
        atomic_fetch_sub_explicit(&q->queued, 1, memory_order_relaxed);
        q->running = 1;
        pthread_mutex_unlock(&q->mu);
        int rc = job_run(j);
        pthread_mutex_lock(&q->mu);
        q->running = 0;
        if (rc && !q->err)
            q->err = rc;
        if (!q->head)
            pthread_cond_broadcast(&q->idle);
    }
    pthread_mutex_unlock(&q->mu);
    return NULL;
}

rustane_dwq *rustane_dwq_create(int blas_threads)
{
    rustane_dwq *q = calloc(1, sizeof *q);
    if (!q)
        return NULL;
    q->blas_threads = blas_threads;
    atomic_init(&q->queued, 0);
    if (pool_init(&q->pool))
        goto fail_pool;
    if (pthread_mutex_init(&q->mu, NULL))
        goto fail_mu;
    if (pthread_cond_init(&q->work, NULL))
        goto fail_work;
    if (pthread_cond_init(&q->idle, NULL))
        goto fail_idle;
    if (pthread_create(&q->thread, NULL, worker, q))
        goto fail_thread;
    return q;
fail_thread:
    pthread_cond_destroy(&q->idle);
fail_idle:
    pthread_cond_destroy(&q->work);
fail_work:
    pthread_mutex_destroy(&q->mu);
fail_mu:
    pool_destroy(&q->pool);
fail_pool:
    free(q);
    return NULL;
}

static int enqueue(rustane_dwq *q, dw_job *j)
{
    pthread_mutex_lock(&q->mu);
    if (q->tail)
        q->tail->next = j;
    else
        q->head = j;
    q->tail = j;
    const int wake = q->sleeping;
    pthread_mutex_unlock(&q->mu);
    /* Published after unlocking, so a spinning worker that sees it takes the mutex uncontended
     * (seeing it earlier, it would block on our lock and we would pay a futex wake to release it).
     * Only a sleeping worker needs the signal; it is sent after unlocking for the same reason. No
     * wake-up is lost: the worker sets `sleeping` and waits atomically under mu, and we read it
     * under mu. The count may dip to -1 for a moment when the worker, done spinning, takes the job
     * from the list first; the spin only tests > 0. */
    atomic_fetch_add_explicit(&q->queued, 1, memory_order_release);
    if (wake)
        pthread_cond_signal(&q->work);
    return 0;
}

int rustane_dwq_wait(rustane_dwq *q)
{
    pthread_mutex_lock(&q->mu);
    while (q->head || q->running)
        pthread_cond_wait(&q->idle, &q->mu);
    int rc = q->err;
    q->err = 0;
    pthread_mutex_unlock(&q->mu);
    return rc;
}

void rustane_dwq_destroy(rustane_dwq *q)
{
    if (!q)
        return;
    pthread_mutex_lock(&q->mu);
    q->stop = 1;
    pthread_cond_signal(&q->work);
    pthread_mutex_unlock(&q->mu);
    pthread_join(q->thread, NULL); /* the worker drains the queue before it exits */
    pthread_cond_destroy(&q->idle);
    pthread_cond_destroy(&q->work);
    pthread_mutex_destroy(&q->mu);
    pool_destroy(&q->pool);
    free(q);
}
#endif

/* ---- shared entry points ------------------------------------------------------------------------ */

int rustane_dwq_submit(rustane_dwq *q, float *dW, const float *dY, const float *X, int M, int N, int K, int copy)
{
    dw_job *j = job_new(&q->pool, dW, dY, X, M, N, K, copy, q->blas_threads);
    if (!j)
        return ENOMEM;
    return enqueue(q, j);
}

int rustane_dwq_submit_error(rustane_dwq *q, int err)
{
    dw_job *j = job_new(&q->pool, NULL, NULL, NULL, 0, 0, 0, 0, q->blas_threads);
    if (!j)
        return ENOMEM;
    j->fail = err;
    return enqueue(q, j);
}

int rustane_dwq_blas_scope(void) { return rustane_blas_threads_scope(); }
