/* fp32 <-> fp16 conversion with runtime-selected SIMD (F16C on x86-64, NEON on arm64, portable scalar).
 *
 * All paths are bit-identical: round to nearest even, subnormals kept, overflow -> inf, NaN -> quiet NaN
 * with the top payload bits kept (what F16C and NEON do in hardware with default control registers).
 * Half values travel as uint16_t bit patterns so no compiler-specific half type is needed. */
#ifndef RUSTANE_FP16_H
#define RUSTANE_FP16_H

#include <stddef.h>
#include <stdint.h>

typedef enum {
    RUSTANE_SIMD_SCALAR = 0,
    RUSTANE_SIMD_F16C = 1,
    RUSTANE_SIMD_NEON = 2,
} rustane_simd;

/* Best path this CPU and build support (CPUID+XGETBV on x86; NEON is architectural on arm64). */
rustane_simd rustane_simd_best(void);
/* Path used by the dispatching entry points; starts as rustane_simd_best(). */
rustane_simd rustane_simd_current(void);
/* Select a path; returns 0, or -1 (and changes nothing) if the path is unavailable here. */
int rustane_simd_select(rustane_simd path);
/* "scalar" / "f16c" / "neon". */
const char *rustane_simd_name(rustane_simd path);

/* Dispatching converters, n elements, src and dst must not overlap. */
void rustane_f32_to_f16(uint16_t *dst, const float *src, size_t n);
void rustane_f16_to_f32(float *dst, const uint16_t *src, size_t n);

/* v[i] = the fp16 value nearest v[i] (same rounding as a round trip through rustane_f32_to_f16),
 * in place and in registers: one pass instead of two, no fp16 buffer. */
void rustane_round_f16(float *v, size_t n);

/* Single-element portable conversions (the reference semantics of every path). */
uint16_t rustane_f32_to_f16_one(float x);
float rustane_f16_to_f32_one(uint16_t h);

#endif
