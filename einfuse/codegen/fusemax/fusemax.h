/* einfuse's runtime of the accel:fusemax intrinsics (see fusemax_rt.c and docs/accelerator.md).
 *
 * Kernels emitted for accel:fusemax are plain C (TVM's "c" target). Their GEMM-like tiles call
 * fm_mac2d, which computes one tile on the CPU and charges the 2D PE array for it; the rest of
 * their work is charged by the fm_2d / fm_1d / fm_dram calls each kernel makes when it starts
 * (fm_begin), from the op counts the compiler derived from the kernel's Einsums. A kernel is one
 * phase: its latency is the largest of its 2D-array, 1D-array and DRAM cycles (the arrays and
 * the DRAM transfers overlap within it); phases run one after another.
 */
#ifndef EINFUSE_FUSEMAX_H
#define EINFUSE_FUSEMAX_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define FM_MAX_KERNELS 4096

/* The counters of one kernel (a phase), in cycles of the accelerator's clock, and its DRAM bytes. */
typedef struct {
  double cycles_2d;   /* busy cycles of the 2D array (a padded tile occupies it whole) */
  double cycles_1d;   /* busy cycles of the 1D array */
  double dram_bytes;  /* bytes moved between DRAM and the global buffer */
  double latency;     /* max(cycles_2d, cycles_1d, dram_bytes / bytes per cycle) */
  double tiles;       /* intrinsic calls (fm_mac2d, fm_vec, fm_reduce) */
  double calls;       /* times the kernel ran */
} fm_counts;

/* The array sizes, DRAM bytes per second and the clock (each emitted kernel calls this first, with
 * its target's). */
int32_t fm_configure(int32_t pe_rows, int32_t pe_cols, int32_t vector_pes, int64_t dram_bytes_per_second,
                     int64_t hz);
void fm_reset(void);
/* Copies the counters of kernels 0..n-1 into out; returns how many kernels there are. */
int32_t fm_read(fm_counts *out, int32_t n);

/* A kernel starts (closing the one before), and charges its work. */
int32_t fm_begin(int32_t kernel);
int32_t fm_2d(double ops);        /* ops on the 2D array, packed onto all of its PEs */
int32_t fm_1d(double ops);        /* ops on the 1D array */
int32_t fm_dram(double bytes);

/* C[i, j] += sum_k X[i*xi + j*xj + k*xk] * Y[i*yi + j*yj + k*yk] for a ti x tj x tk tile, with
 * C's rows sc apart: one instruction of the 2D array (tk cycles on a ti x tj array). */
int32_t fm_mac2d(void *c, void *x, void *y, int64_t sc, int64_t xi, int64_t xj, int64_t xk,
                 int64_t yi, int64_t yj, int64_t yk, int32_t ti, int32_t tj, int32_t tk);

/* C[k] = A[k] op B[k * b_step] for n elements (op: 0 add, 1 sub, 2 mul, 3 div, 4 max; b_step 0:
 * one B for all): one instruction of the 1D array, ceil(n / vector_pes) cycles. */
int32_t fm_vec(void *c, void *a, void *b, int32_t n, int32_t op, int32_t b_step);
/* Y[0] = Y[0] op X[0] op ... op X[n-1] (op: 0 sum, 1 max): ceil(n / vector_pes) cycles of the 1D array. */
int32_t fm_reduce(void *y, void *x, int32_t n, int32_t op);

#ifdef __cplusplus
}
#endif

#endif
