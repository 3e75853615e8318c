// Packed weights -> fp16 matrices, for the large-batch (prefill) path: one pass that reads the
// packed bytes and writes fp16, after which cuBLAS runs the product on tensor cores. For a prompt
// of T tokens the product costs 2 N K T flops and this pass ~2.5 N K bytes, so it fades as T grows.
//
//   w4  qweight uint32 [N, W] (word j holds codes 8j .. 8j+7, code k at bits 4 (k % 8); minillm's
//       layout, see w4a16_gemv.cu), sz uint32 [N, ngroups]: fp16 scale bits | zero point << 16
//   i8  codes uint8 [N, ldc], scales fp16 [N, ngroups], zeros uint8 [N, ngroups] or null (128)
//   out fp16 [N, ldo]; one thread per 8 outputs (one 16-byte store)

#include "common.cuh"

extern "C" __global__ void dequant_w4(const uint32_t* __restrict__ qweight, const uint32_t* __restrict__ sz,
                                      __half* __restrict__ out, int N, int W, int ldo, int ngroups, int group) {
    pdl_begin();
    const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)N * W) return;
    const int n = (int)(idx / W), j = (int)(idx % W);
    if (8 * j >= ldo) return;
    const int g = min(8 * j / group, ngroups - 1);
    const uint32_t zs = sz[(size_t)n * ngroups + g];
    const float z = (float)(zs >> 16), s = __half2float(__ushort_as_half((unsigned short)(zs & 0xffffu)));
    const uint32_t word = qweight[idx];
    __align__(16) __half v[8];
#pragma unroll
    for (int i = 0; i < 8; i++) v[i] = __float2half(((float)((word >> (4 * i)) & 0xfu) - z) * s);
    *reinterpret_cast<uint4*>(out + (size_t)n * ldo + 8 * j) = *reinterpret_cast<uint4*>(v);
}

extern "C" __global__ void dequant_i8(const uint8_t* __restrict__ codes, int ldc, const __half* __restrict__ scales,
                                      const uint8_t* __restrict__ zeros, __half* __restrict__ out, int N, int ldo,
                                      int ngroups, int group) {
    pdl_begin();
    const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;  // (row, 8 columns)
    const int per_row = ldo / 8;
    if (idx >= (size_t)N * per_row) return;
    const int n = (int)(idx / per_row), k0 = 8 * (int)(idx % per_row);
    const int g = min(k0 / group, ngroups - 1);
    const float z = zeros ? (float)zeros[(size_t)n * ngroups + g] : 128.0f;
    const float s = __half2float(scales[(size_t)n * ngroups + g]);
    __align__(16) __half v[8];
#pragma unroll
    for (int i = 0; i < 8; i++) v[i] = __float2half(((float)codes[(size_t)n * ldc + k0 + i] - z) * s);
    *reinterpret_cast<uint4*>(out + (size_t)n * ldo + k0) = *reinterpret_cast<uint4*>(v);
}
