/* rustane ANE runtime: a plain C API over the private AppleNeuralEngine framework.
 *
 * Call sequence and selector signatures follow docs/ane-runtime.md#call-sequence; IOSurfaces are flat byte buffers
 * (§2.1). Every failing call fills an ane_error with the NSError code (or ANE_E_* below), a
 * message and the stage that failed, and returns NULL / nonzero — nothing fails silently.
 *
 * Thread safety: compile/unload and surface/request creation may run on any thread; one model is
 * evaluated by one thread at a time (the caller serialises, the ANE itself is synchronous).
 */
#ifndef RUSTANE_ANE_RUNTIME_H
#define RUSTANE_ANE_RUNTIME_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define ANE_DEFAULT_FRAMEWORK "/System/Library/PrivateFrameworks/AppleNeuralEngine.framework/AppleNeuralEngine"
#define ANE_QOS 21u               /* QOS_CLASS_DEFAULT, used by every known caller (§1.3) */
#define ANE_COMPILE_BUDGET 119    /* compiles per process before load starts failing (§8) */
#define ANE_COMPILE_WARN_AT 100   /* warn from here on */
#define ANE_LOAD_RETRY_US 100000  /* one load retry after 100 ms (0x50004 slot reclamation) */

/* Codes for failures that carry no NSError (the NSError code is used when there is one). */
enum {
    ANE_E_NOT_LOADED = -1,   /* ane_init not called / failed */
    ANE_E_NO_NSERROR = -2,   /* a BOOL came back NO and the error out-parameter stayed nil */
    ANE_E_NIL_RESULT = -3,   /* a factory returned nil */
    ANE_E_OS = -4,           /* a POSIX call failed (message holds strerror) */
    ANE_E_ARG = -5,          /* bad argument from the caller */
    ANE_E_LOCK = -6,         /* IOSurfaceLock/Unlock returned nonzero */
    ANE_E_EXCEPTION = -7,    /* the framework threw an Objective-C exception */
};

typedef struct ane_error {
    long code;
    char stage[16];     /* "init", "descriptor", "model", "tmpdir", "compile", "load", "surface",
                           "lock", "request", "eval", "unload" */
    char message[512];
} ane_error;

typedef struct ane_model ane_model;
typedef struct ane_surface ane_surface;
typedef struct ane_request ane_request;

/* Load the framework at `path` (NULL: ANE_DEFAULT_FRAMEWORK) and resolve the four classes.
 * Idempotent for the same path; a second, different path is an error. 0 on success. */
int ane_init(const char *path, ane_error *err);
int ane_is_initialized(void);
/* dlsym in the loaded framework (tests use it to reach the fake's hooks); NULL if absent. */
void *ane_framework_symbol(const char *name);

/* Compiles attempted in this process (successful or not): the budget is process-wide. */
int ane_compile_count(void);

/* Compile and load a model from MIL text and named blobs (`names[i]` like
 * "@model_path/weights/w.bin", `blobs[i]` the whole blob file). Returns NULL on failure. */
ane_model *ane_compile(const char *mil, size_t mil_len, size_t n_weights, const char *const *names,
                       const void *const *blobs, const size_t *blob_sizes, ane_error *err);
/* Directory holding model.mil and weights/ while the model is loaded (NUL-terminated). */
const char *ane_model_tmpdir(const ane_model *m);
/* Unload, remove the temp dir and free. Always frees; returns nonzero if unload failed. */
int ane_model_free(ane_model *m, ane_error *err);

ane_surface *ane_surface_create(size_t nbytes, ane_error *err);
size_t ane_surface_nbytes(const ane_surface *s);
/* Lock for CPU access and return the base address (NULL on failure). */
void *ane_surface_lock(ane_surface *s, int readonly, ane_error *err);
int ane_surface_unlock(ane_surface *s, int readonly, ane_error *err);
void ane_surface_free(ane_surface *s);

/* Bind surfaces (inputs/outputs in MIL-name order) into a reusable request. */
ane_request *ane_request_create(ane_model *m, size_t n_in, ane_surface *const *ins, size_t n_out,
                                ane_surface *const *outs, ane_error *err);
void ane_request_free(ane_request *r);

/* Evaluate synchronously; on return the output surfaces hold the result. */
int ane_eval(ane_model *m, ane_request *r, ane_error *err);

#ifdef __cplusplus
}
#endif
#endif
