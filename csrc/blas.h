/* One place that decides which cblas_sgemm the build links against:
 *   -DRUSTANE_BLAS_ACCELERATE  macOS Accelerate (with -DACCELERATE_NEW_LAPACK for the current headers)
 *   -DRUSTANE_BLAS_CBLAS       a plain <cblas.h>; with -DBLAS_SYMBOL_PREFIX=scipy_ the scipy-openblas32
 *                              wheel, whose header declares every symbol with that prefix.
 * RUSTANE_SGEMM is the sgemm to call. rustane_blas_threads(n) (n > 0) asks the BLAS to use n threads for the
 * calling thread's calls and returns the scope it managed: RUSTANE_BLAS_THREADS_LOCAL (per thread,
 * OpenBLAS >= 0.3.27 exporting openblas_set_num_threads_local), RUSTANE_BLAS_THREADS_GLOBAL (only the
 * process-wide OpenBLAS setting exists, e.g. scipy-openblas32 0.3.34 declares the local one in its
 * header but does not export it) or RUSTANE_BLAS_THREADS_NONE (no control, e.g. Accelerate);
 * rustane_blas_threads_scope() tells that scope without changing anything. */
#ifndef RUSTANE_BLAS_H
#define RUSTANE_BLAS_H

#define RUSTANE_BLAS_THREADS_NONE 0
#define RUSTANE_BLAS_THREADS_GLOBAL 1
#define RUSTANE_BLAS_THREADS_LOCAL 2

#if defined(RUSTANE_BLAS_ACCELERATE)
#include <Accelerate/Accelerate.h>
#define RUSTANE_SGEMM cblas_sgemm
static inline int rustane_blas_threads_scope(void) { return RUSTANE_BLAS_THREADS_NONE; }
static inline int rustane_blas_threads(int n)
{
    (void)n;
    return RUSTANE_BLAS_THREADS_NONE;
}

#elif defined(RUSTANE_BLAS_CBLAS)
#include <cblas.h>
#if defined(BLAS_SYMBOL_PREFIX)
#define RUSTANE_BLAS_CAT_(a, b) a##b
#define RUSTANE_BLAS_CAT(a, b) RUSTANE_BLAS_CAT_(a, b)
#define RUSTANE_SGEMM RUSTANE_BLAS_CAT(BLAS_SYMBOL_PREFIX, cblas_sgemm)
#define RUSTANE_BLAS_SYM(name) RUSTANE_BLAS_CAT(BLAS_SYMBOL_PREFIX, name)
#else
#define RUSTANE_SGEMM cblas_sgemm
#define RUSTANE_BLAS_SYM(name) name
#endif
/* Bound weakly so a BLAS without these OpenBLAS extensions still loads (the control is skipped). */
int RUSTANE_BLAS_SYM(openblas_set_num_threads_local)(int) __attribute__((weak));
void RUSTANE_BLAS_SYM(openblas_set_num_threads)(int) __attribute__((weak));
int RUSTANE_BLAS_SYM(openblas_get_num_threads)(void) __attribute__((weak));
static inline int rustane_blas_threads_scope(void)
{
    if (RUSTANE_BLAS_SYM(openblas_set_num_threads_local))
        return RUSTANE_BLAS_THREADS_LOCAL;
    return RUSTANE_BLAS_SYM(openblas_set_num_threads) ? RUSTANE_BLAS_THREADS_GLOBAL : RUSTANE_BLAS_THREADS_NONE;
}
static inline int rustane_blas_threads(int n)
{
    int scope = rustane_blas_threads_scope();
    if (n <= 0 || scope == RUSTANE_BLAS_THREADS_NONE)
        return RUSTANE_BLAS_THREADS_NONE;
    if (scope == RUSTANE_BLAS_THREADS_LOCAL) {
        (void)RUSTANE_BLAS_SYM(openblas_set_num_threads_local)(n);
        return RUSTANE_BLAS_THREADS_LOCAL;
    }
    /* process-wide: only touch it when it differs, so jobs do not keep resetting a pool another
     * thread may be using */
    if (!RUSTANE_BLAS_SYM(openblas_get_num_threads) || RUSTANE_BLAS_SYM(openblas_get_num_threads)() != n)
        RUSTANE_BLAS_SYM(openblas_set_num_threads)(n);
    return RUSTANE_BLAS_THREADS_GLOBAL;
}

#else
#error "blas.h: build with -DRUSTANE_BLAS_ACCELERATE or -DRUSTANE_BLAS_CBLAS (meson option 'blas')"
#endif

#endif
