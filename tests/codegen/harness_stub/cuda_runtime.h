// A CPU stand-in for the CUDA runtime, just enough to build einfuse's host harness (main.cu) with
// g++ and run it here against stub kernels (tests/codegen/test_harness.py): device memory is host
// memory, a launch is a call, events read a clock.
#pragma once
#include <chrono>
#include <cstdlib>
#include <cstring>

#define __global__
typedef int cudaError_t;
static const cudaError_t cudaSuccess = 0;
enum cudaMemcpyKind { cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost };
struct dim3 { unsigned x, y, z; dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {} };
typedef std::chrono::steady_clock::time_point* cudaEvent_t;

inline cudaError_t cudaMalloc(void** p, size_t n) { *p = std::calloc(n, 1); return *p ? 0 : 2; }
inline cudaError_t cudaMemcpy(void* d, const void* s, size_t n, cudaMemcpyKind) { std::memcpy(d, s, n); return 0; }
inline cudaError_t cudaGetLastError() { return 0; }
inline cudaError_t cudaDeviceSynchronize() { return 0; }
inline const char* cudaGetErrorString(cudaError_t) { return "stub error"; }
inline cudaError_t cudaEventCreate(cudaEvent_t* e) { *e = new std::chrono::steady_clock::time_point(); return 0; }
inline cudaError_t cudaEventRecord(cudaEvent_t e) { *e = std::chrono::steady_clock::now(); return 0; }
inline cudaError_t cudaEventSynchronize(cudaEvent_t) { return 0; }
inline cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t a, cudaEvent_t b) {
  *ms = std::chrono::duration<float, std::milli>(*b - *a).count();
  return 0;
}

#define EINFUSE_LAUNCH(f, grid, block, shared, ...) f(__VA_ARGS__)
