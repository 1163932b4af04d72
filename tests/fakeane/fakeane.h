/* Test hooks of the fake AppleNeuralEngine framework (libfakeane.so, Linux tests only).
 *
 * The fake implements the four private classes with the selectors and argument types of the real
 * framework (docs/ane-runtime.md#call-sequence) and the IOSurface C API over malloc (csrc/iosurface_shim.h). It records
 * every call it receives, checks the rules the real framework is known to punish (usually silently),
 * can be told to fail, and evaluates programs through a callback (the Python simulator).
 */
#ifndef RUSTANE_FAKEANE_H
#define RUSTANE_FAKEANE_H

#include <stddef.h>

/* Runs one evaluation; returns 0 on success, else the error code evaluate reports.
 * Weights are the blobs of the descriptor (keys like "@model_path/weights/w.bin"). */
typedef int (*fakeane_eval_fn)(void *ctx, const char *mil, size_t mil_len, size_t n_weights,
                               const char *const *weight_keys, const void *const *weight_data,
                               const size_t *weight_sizes, size_t n_in, void *const *in_ptrs,
                               const size_t *in_sizes, size_t n_out, void *const *out_ptrs,
                               const size_t *out_sizes);

void fakeane_set_eval_callback(fakeane_eval_fn fn, void *ctx);

/* Clear the call log, the rule violations and pending injected failures. */
void fakeane_reset(void);

/* The call log: one line per call received, "<selector or C function> <argument kinds...>". */
size_t fakeane_log_count(void);
const char *fakeane_log_entry(size_t i);

/* Rule violations seen (each a sentence naming the rule). */
size_t fakeane_violation_count(void);
const char *fakeane_violation(size_t i);

/* Make the next `times` calls of `stage` ("compile", "load" or "eval") fail with NSError `code`
 * (code 0: return NO and leave the error out-parameter nil). */
void fakeane_fail_next(const char *stage, long code, int times);

/* A chip profile's behaviour, supplied by the tests (tests/fake_profiles.py, from the rules in
 * docs/ane-rules.md). Called at each stage with the model's MIL text:
 *   FAKEANE_COMPILE / FAKEANE_LOAD: no buffers; return an NSError code to make the call fail;
 *   FAKEANE_EVAL_BEFORE: input and output sizes; a nonzero code fails the evaluation (0x1d ...);
 *   FAKEANE_EVAL_AFTER: the outputs hold the computed result; the hook may rewrite them in place
 *   (silent zeros / corruption, as the hardware does) and return 0.
 * NULL removes the hook. */
enum { FAKEANE_COMPILE = 0, FAKEANE_LOAD = 1, FAKEANE_EVAL_BEFORE = 2, FAKEANE_EVAL_AFTER = 3 };
typedef long (*fakeane_hook_fn)(int stage, const char *mil, size_t mil_len, size_t n_in, const size_t *in_sizes,
                                size_t n_out, void *const *out_ptrs, const size_t *out_sizes);
void fakeane_set_hook(fakeane_hook_fn fn);

/* Environment: FAKEANE_CORRUPT=<SHA-256 hex of a MIL text> makes evaluations of that program return
 * one silently wrong element (fp16 100.0 at two thirds of its first output), as a miscompiled kernel
 * would; the self-check's tests use it (tests/test_ane_contract.py). */

/* SHA-256 of n bytes as 64 upper-case hex digits (the fake's own implementation, exported so the
 * tests can check it against an independent one). */
void fakeane_sha256_hex(const void *data, size_t n, char out[65]);

/* Fake objects alive now (descriptors, models, requests, IO objects, surfaces): 0 when nothing leaks. */
long fakeane_live_objects(void);

#endif
