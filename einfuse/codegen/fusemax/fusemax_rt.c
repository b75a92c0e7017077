/* The accel:fusemax intrinsics on a CPU: compute, and count cycles and bytes (see fusemax.h). */
#include "fusemax.h"

#include <string.h>

static fm_counts counts[FM_MAX_KERNELS];
static int32_t kernels = 0;      /* one past the highest kernel seen */
static int32_t current = -1;     /* the kernel running, -1 before the first */
static int32_t rows = 256, cols = 256, vector = 256;
static double dram_per_cycle = 456.917;   /* 400 GiB/s at 940 MHz */

int32_t fm_configure(int32_t pe_rows, int32_t pe_cols, int32_t vector_pes, int64_t dram_bytes_per_second,
                     int64_t hz) {
  rows = pe_rows;
  cols = pe_cols;
  vector = vector_pes;
  dram_per_cycle = (double)dram_bytes_per_second / (double)hz;
  return 0;
}

static double max3(double a, double b, double c) {
  double m = a > b ? a : b;
  return m > c ? m : c;
}

/* The phase that ran since fm_begin: its latency, added to what the kernel took before. */
static void close_phase(fm_counts *start) {
  if (current < 0) return;
  fm_counts *k = &counts[current];
  k->latency += max3(k->cycles_2d - start->cycles_2d, k->cycles_1d - start->cycles_1d,
                     (k->dram_bytes - start->dram_bytes) / dram_per_cycle);
}

static fm_counts opened;   /* the counters of the running kernel when it began */

void fm_reset(void) {
  memset(counts, 0, sizeof counts);
  kernels = 0;
  current = -1;
}

int32_t fm_read(fm_counts *out, int32_t n) {
  close_phase(&opened);
  current = -1;
  memcpy(out, counts, sizeof(fm_counts) * (size_t)(n < kernels ? n : kernels));
  return kernels;
}

int32_t fm_begin(int32_t kernel) {
  close_phase(&opened);
  if (kernel < 0 || kernel >= FM_MAX_KERNELS) {  /* (einfuse never emits more kernels) */
    current = -1;
    return -1;
  }
  current = kernel;
  if (kernel >= kernels) kernels = kernel + 1;
  counts[kernel].calls += 1;
  opened = counts[kernel];
  return 0;
}

int32_t fm_2d(double ops) {
  if (current >= 0) counts[current].cycles_2d += ops / ((double)rows * cols);
  return 0;
}

int32_t fm_1d(double ops) {
  if (current >= 0) counts[current].cycles_1d += ops / vector;
  return 0;
}

int32_t fm_dram(double bytes) {
  if (current >= 0) counts[current].dram_bytes += bytes;
  return 0;
}

int32_t fm_mac2d(void *c, void *x, void *y, int64_t sc, int64_t xi, int64_t xj, int64_t xk,
                 int64_t yi, int64_t yj, int64_t yk, int32_t ti, int32_t tj, int32_t tk) {
  float *out = (float *)c;
  const float *a = (const float *)x, *b = (const float *)y;
  for (int64_t i = 0; i < ti; ++i)
    for (int64_t j = 0; j < tj; ++j) {
      float sum = out[i * sc + j];
      for (int64_t k = 0; k < tk; ++k) sum += a[i * xi + j * xj + k * xk] * b[i * yi + j * yj + k * yk];
      out[i * sc + j] = sum;
    }
  if (current >= 0) {
    /* a ti x tj tile on a rows x cols array: ceil(ti/rows) * ceil(tj/cols) passes of tk cycles */
    counts[current].cycles_2d += (double)((ti + rows - 1) / rows) * ((tj + cols - 1) / cols) * tk;
    counts[current].tiles += 1;
  }
  return 0;
}

static void charge_1d(int32_t n) {
  if (current >= 0) {
    counts[current].cycles_1d += (double)((n + vector - 1) / vector);
    counts[current].tiles += 1;
  }
}

/* torch.maximum: NaN if either operand is (a bare compare would drop a NaN). */
static float nan_max(float u, float v) { return u != u || v != v ? u + v : (u > v ? u : v); }

int32_t fm_vec(void *c, void *a, void *b, int32_t n, int32_t op, int32_t b_step) {
  float *out = (float *)c;
  const float *x = (const float *)a, *y = (const float *)b;
  for (int32_t k = 0; k < n; ++k) {
    float u = x[k], v = y[k * b_step];
    switch (op) {
      case 0: out[k] = u + v; break;
      case 1: out[k] = u - v; break;
      case 2: out[k] = u * v; break;
      case 3: out[k] = u / v; break;
      default: out[k] = nan_max(u, v); break;
    }
  }
  charge_1d(n);
  return 0;
}

int32_t fm_reduce(void *y, void *x, int32_t n, int32_t op) {
  float *acc = (float *)y;
  const float *in = (const float *)x;
  float r = acc[0];
  for (int32_t k = 0; k < n; ++k) r = op == 0 ? r + in[k] : nan_max(r, in[k]);
  acc[0] = r;
  charge_1d(n);
  return 0;
}
