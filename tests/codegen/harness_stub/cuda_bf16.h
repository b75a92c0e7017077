// CPU stand-ins for the bfloat16 type (the harness only converts it).
#pragma once
struct __nv_bfloat16 { float v; };
inline float __bfloat162float(__nv_bfloat16 h) { return h.v; }
inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16{f}; }
