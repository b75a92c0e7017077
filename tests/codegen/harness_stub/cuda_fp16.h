// CPU stand-ins for the half type (the harness only converts it).
#pragma once
struct __half { float v; };
typedef __half half;
inline float __half2float(__half h) { return h.v; }
inline __half __float2half(float f) { return __half{f}; }
