// W4A16 GEMV / small-batch GEMM: y[m, n] = sum_k x[m, k] * w[n, k], with w stored as 4-bit codes.
//
// ================================================================================================
// Layout (minillm's packed format, minillm/quant/formats.py)
// ================================================================================================
//   qweight  uint32 [N, 4 * C], C = ceil(K / 32) "chunks" per row. Row n holds the codes of output n
//            in order of k; word k/8 holds code k in bits 4*(k%8) .. 4*(k%8)+3. One chunk = 16 bytes
//            = 4 words = 32 codes, so every row is a whole number of 16-byte loads. Codes past K are 0.
//   sz       uint32 [N, ngroups], ngroups = ceil(K / G), G a multiple of 32 (a chunk is in one group):
//            the group's fp16 scale in bits 0..15, its zero point (8 if symmetric) in bits 16..
//            (the GPU's form of minillm's scales and zeros: one load per group, see below)
//   x        fp16  [M, 32 * C]  (the host pads each row with zeros past K)
//   y        fp16  [M, ldy]; with act >= 0 the rows of w are (gate_i, up_i) pairs and y[m, i] =
//            act(gate_i) * up_i (the gated MLP's activation fused into the product; common.cuh)
//   w[n, k] = scale[n, k / G] * (q[n, k] - zero[n, k / G])
//
// ================================================================================================
// Work decomposition
// ================================================================================================
//   A warp computes ROWS consecutive outputs for all M batch rows. Its 32 lanes stride over the
//   chunks of those rows (lane l takes chunks l, l+32, ...), so each warp-wide step reads 32
//   consecutive 16-byte chunks of a row: fully coalesced 512-byte requests. Each weight word is
//   dequantized once and reused for the M rows of x; each x load is reused for the ROWS rows.
//   Accumulation is fp32. At the end, the partial sums are reduced across the warp with shuffles
//   and lane 0 writes y. Variant (_kS): S warps of a block share the rows, each taking every S-th
//   stretch of 32 chunks, their sums added in shared memory in warp order: for long rows with few
//   warps (11008x4096 at batch 1: 2048 warps) twice the warps keep twice the loads in flight.
//
//   Dequantization per 32-bit word (8 codes): the fp16 "magic number" trick. OR-ing a 4-bit code
//   into the mantissa of 1024.0 (0x6400) gives the half 1024 + q exactly, two halves at a time:
//       (word >> 4i) & 0x000F000F | 0x64006400  ->  half2(1024 + q[i], 1024 + q[i + 4])
//   (one LOP3 when both constants sit in registers: common.cuh and_or; the compiler's own version
//   was an AND and an OR, 96 of the ~400 instructions of a step).
//   Subtracting half2(1024 + z) leaves (q - z), an exact small integer, which is widened to fp32
//   and multiplied with x in fp32; the group's scale multiplies the chunk's sum once.
//   Nibble i and i+4 land in one half2, so word j pairs with x[8j + i] and x[8j + i + 4].

#include "common.cuh"

// ------------------------------------------------------------------------------------------------
// Indexing helpers
// ------------------------------------------------------------------------------------------------

__device__ __forceinline__ float2 half2_to_float2(__half2 h) { return __half22float2(h); }

// (q - z) for nibbles (i, i + 4) of a word, as two floats.
__device__ __forceinline__ float2 nibble_pair(uint32_t word, int i, __half2 bias) {
    uint32_t bits = and_or(word >> (4 * i), 0x000F000Fu, 0x64006400u);
    __half2 h = *reinterpret_cast<__half2*>(&bits);
    return half2_to_float2(__hsub2(h, bias));
}

// ------------------------------------------------------------------------------------------------
// Main loop
// ------------------------------------------------------------------------------------------------

// ------------------------------------------------------------------------------------------------
// Scales and zero points: one 32-bit word per group
// ------------------------------------------------------------------------------------------------
// Loaded next to each chunk from two arrays, a row's scale and zero point cost more than their 5% of
// the bytes (4096x4096 on an H100: the codes alone stream in 4.3 us, with the per-step scale and
// zero loads 6.1 us, with one packed word 5.9; bench/NOTES.md). So the GPU keeps them packed,
// sz[n, g] = fp16 scale bits | zero << 16 (minillm/gpu/w4a16.py), and the subtrahend half2(1024 + z)
// is built from the bits: 1024 + z for 0 <= z < 1024 is the half 0x6400 | z.
__device__ __forceinline__ void sz_unpack(uint32_t w, __half2& bias, float& scale) {
    scale = __half2float(__ushort_as_half((unsigned short)(w & 0xffffu)));
    const uint32_t b = (0x6400u | (w >> 16)) * 0x10001u;
    bias = *reinterpret_cast<const __half2*>(&b);
}

// One chunk c of ROWS weight rows times the M rows of x, accumulated into acc (fp32).
template <int M, int ROWS>
__device__ __forceinline__ void gemv_chunk(const uint4* wq, const __half2* bias, const float* scale,
                                           const uint4* __restrict__ xv, int c, int C, float (*acc)[M]) {
    // Small batches keep the group's scale out of the inner loop (one multiply per chunk); large
    // ones fold it into the dequantized weight once, which is then reused by all M rows of x and
    // saves M x ROWS partial sums of registers.
    constexpr bool FOLD_SCALE = M >= 8;
    float part[ROWS][FOLD_SCALE ? 1 : M];
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
#pragma unroll
        for (int m = 0; m < (FOLD_SCALE ? 1 : M); ++m) part[r][m] = 0.f;

#pragma unroll
    for (int j = 0; j < 4; ++j) {  // word j of the chunk: codes 8j .. 8j+7
        // Dequantize the word of every row once: d[r][i] = (q - z) (times the scale if folded).
        float d[ROWS][8];
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            const uint32_t word = (j == 0) ? wq[r].x : (j == 1) ? wq[r].y : (j == 2) ? wq[r].z : wq[r].w;
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const float2 p = nibble_pair(word, i, bias[r]);  // codes i and i + 4
                d[r][i] = FOLD_SCALE ? p.x * scale[r] : p.x;
                d[r][i + 4] = FOLD_SCALE ? p.y * scale[r] : p.y;
            }
        }
#pragma unroll
        for (int m = 0; m < M; ++m) {
            const uint4 xr = __ldg(xv + ((size_t)m * C + c) * 4 + j);  // x[8j .. 8j+7]
            const __half2* xh = reinterpret_cast<const __half2*>(&xr);
            float xf[8];
#pragma unroll
            for (int t = 0; t < 4; ++t) {
                const float2 f = __half22float2(xh[t]);
                xf[2 * t] = f.x;
                xf[2 * t + 1] = f.y;
            }
#pragma unroll
            for (int r = 0; r < ROWS; ++r)
#pragma unroll
                for (int i = 0; i < 8; ++i) {
                    if (FOLD_SCALE) {
                        acc[r][m] = fmaf(d[r][i], xf[i], acc[r][m]);
                    } else {
                        part[r][FOLD_SCALE ? 0 : m] = fmaf(d[r][i], xf[i], part[r][FOLD_SCALE ? 0 : m]);
                    }
                }
        }
    }
    if (!FOLD_SCALE) {
#pragma unroll
        for (int r = 0; r < ROWS; ++r)
#pragma unroll
            for (int m = 0; m < M; ++m) acc[r][m] = fmaf(scale[r], part[r][FOLD_SCALE ? 0 : m], acc[r][m]);
    }
}

template <int M, int ROWS, int KSPLIT, bool NORM, bool ROPE>
__device__ __forceinline__ void gemv_body(const uint4* __restrict__ qweight, const uint32_t* __restrict__ sz,
                                          const __half* __restrict__ x, __half* __restrict__ y, int ldy, int N,
                                          int C, int ngroups, int chunks_per_group, int cpg_shift, int act,
                                          const EpilogueIO& nio) {
    // KSPLIT > 1: the KSPLIT warps of a block share its ROWS rows, warp p taking the 32-chunk
    // stretches p, p + KSPLIT, ... of K, and their sums meet in shared memory. For short outputs
    // (N = 4096: 2048 warps, ~16 per SM) this gives the GPU more warps and so more loads in flight.
    __shared__ float red[KSPLIT > 1 ? 4 : 1][ROWS * M];
    const int gwarp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int warp = gwarp / KSPLIT, part = gwarp % KSPLIT;
    const int lane = threadIdx.x & 31;
    const int n0 = warp * ROWS;  // warps past N load nothing and store nothing, but reach the barriers
    pdl_begin();  // before any load (common.cuh)
    // NORM: the instance that carries an RMSNorm (common.cuh EpilogueIO; compiled apart, so the plain
    // instances keep their registers and their early exit).
    if (!NORM && KSPLIT == 1 && n0 >= N) return;
    const float scale = NORM ? norm_in_scale(nio, nio.in_ss) : 1.0f;
    // The qkv product's rotation (common.cuh rope_cs): the position asked for now, the table row
    // after the first chunk (pos has arrived by then), both used after the loop.
    const int pos = ROPE ? *nio.pos : 0;
    float2 cs = make_float2(1.0f, 0.0f);

    float acc[ROWS][M];
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
#pragma unroll
        for (int m = 0; m < M; ++m) acc[r][m] = 0.f;

    const uint4* xv = reinterpret_cast<const uint4*>(x);  // row m, chunk c, part j: xv[(m*C + c)*4 + j]
    const uint4* wrow[ROWS];
    const uint32_t* szrow[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        const int n = min(n0 + r, N - 1);  // rows past N repeat the last one; never written
        wrow[r] = qweight + (size_t)n * C;
        szrow[r] = sz + (size_t)n * ngroups;
    }
#pragma unroll 2
    for (int c = 32 * part + lane; c < C && n0 < N; c += 32 * KSPLIT) {
        const int g = group_of(c, chunks_per_group, cpg_shift);
        uint4 wq[ROWS];
        __half2 bias[ROWS];
        float sc[ROWS];
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            wq[r] = __ldg(wrow[r] + c);
            sz_unpack(__ldg(szrow[r] + g), bias[r], sc[r]);
        }
        gemv_chunk<M, ROWS>(wq, bias, sc, xv, c, C, acc);
        if constexpr (ROPE) {
            if (c == 32 * part + lane) cs = rope_cs(nio, n0, pos);
        }
    }

    // ---------------------------------------------------------------------------------------------
    // Reduction across the warp
    // ---------------------------------------------------------------------------------------------
    float ss = 0.0f;  // a producer's sum of h^2 over this warp's outputs (common.cuh EpilogueIO)
#pragma unroll
    for (int m = 0; m < M; ++m) {
        float v[ROWS];
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            v[r] = acc[r][m];
#pragma unroll
            for (int off = 16; off > 0; off >>= 1) v[r] += __shfl_xor_sync(0xffffffffu, v[r], off);
        }
        if (KSPLIT == 1) {
            if (lane == 0) ss += store_rows_normed<ROWS, NORM, ROPE>(y, ldy, m, n0, N, v, act, nio, scale, nullptr, pos, cs);
        } else if (lane == 0) {
#pragma unroll
            for (int r = 0; r < ROWS; ++r) red[(threadIdx.x >> 5)][r * M + m] = v[r];
        }
    }
    if (KSPLIT > 1) {
        __syncthreads();
        if (part == 0 && lane == 0 && n0 < N) {
#pragma unroll
            for (int m = 0; m < M; ++m) {
                float v[ROWS];
#pragma unroll
                for (int r = 0; r < ROWS; ++r) {
                    v[r] = 0.f;
#pragma unroll
                    for (int p = 0; p < KSPLIT; ++p) v[r] += red[(threadIdx.x >> 5) + p][r * M + m];  // in order
                }
                ss += store_rows_normed<ROWS, NORM, ROPE>(y, ldy, m, n0, N, v, act, nio, scale, nullptr, pos, cs);
            }
        }
    }
    if (NORM) norm_block_sum(nio, ss);
}

// One entry point per (M, ROWS) pair the launcher uses; extern "C" keeps the names plain for
// cupy.RawModule.
#define W4A16_KERNEL_K(M, ROWS, KSPLIT, NORM, ROPE, NAME)                                                           \
    extern "C" __global__ void __launch_bounds__(128)                                                         \
        NAME(const uint4* __restrict__ qweight, const uint32_t* __restrict__ sz, const __half* __restrict__ x, \
             __half* __restrict__ y, int ldy, int N, int C, int ngroups, int chunks_per_group, int cpg_shift,    \
             int act, const EpilogueIO nio) {                                                                     \
        gemv_body<M, ROWS, KSPLIT, NORM, ROPE>(qweight, sz, x, y, ldy, N, C, ngroups, chunks_per_group, cpg_shift, act, \
                                         nio);                                                                \
    }
#define W4A16_KERNEL(M, ROWS) W4A16_KERNEL_K(M, ROWS, 1, false, false, w4a16_gemv_m##M##_r##ROWS)
#define W4A16_KERNEL_SPLIT(M, ROWS, KSPLIT) W4A16_KERNEL_K(M, ROWS, KSPLIT, false, false, w4a16_gemv_m##M##_r##ROWS##_k##KSPLIT)

W4A16_KERNEL(1, 1)
W4A16_KERNEL(1, 2)
W4A16_KERNEL(1, 4)
W4A16_KERNEL(1, 8)
W4A16_KERNEL(2, 2)
W4A16_KERNEL(4, 2)
W4A16_KERNEL(4, 4)
W4A16_KERNEL(8, 2)
W4A16_KERNEL(8, 4)
W4A16_KERNEL(16, 2)
W4A16_KERNEL(16, 4)
W4A16_KERNEL_SPLIT(1, 2, 2)
W4A16_KERNEL_SPLIT(1, 2, 4)
W4A16_KERNEL_SPLIT(1, 1, 2)
W4A16_KERNEL_SPLIT(1, 1, 4)
W4A16_KERNEL_K(1, 2, 1, true, false, w4a16_gemv_m1_r2_n)  // batch 1 with a carried norm (the decode step)
W4A16_KERNEL_K(1, 2, 2, true, false, w4a16_gemv_m1_r2_k2_n)
W4A16_KERNEL_K(1, 2, 1, true, true, w4a16_gemv_m1_r2_nr)  // ... and the rotary epilogue (the qkv product)
W4A16_KERNEL_K(1, 2, 2, true, true, w4a16_gemv_m1_r2_k2_nr)
