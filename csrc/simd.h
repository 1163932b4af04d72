/* Which vector instruction sets this translation unit can be compiled for. On x86 the F16C
 * kernels are compiled with target attributes and chosen at run time (fp16.c); on arm64 NEON is
 * part of the baseline. */
#ifndef RUSTANE_SIMD_H
#define RUSTANE_SIMD_H

#if defined(__x86_64__) || defined(__i386__)
#define RUSTANE_HAVE_X86 1
#include <immintrin.h>
#endif

#if defined(__aarch64__) && defined(__ARM_NEON)
#define RUSTANE_HAVE_NEON 1
#include <arm_neon.h>
#endif

#endif
