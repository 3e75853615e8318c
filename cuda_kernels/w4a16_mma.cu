// W4A16 small-batch GEMM on tensor cores: y[m, n] = sum_k x[m, k] * w[n, k] for 2..16 rows of x.
//
// The GEMV kernel (w4a16_gemv.cu) multiplies in fp32 FMAs: at 16 rows that is 16 FMAs per weight,
// and the arithmetic, not the memory, bounds it (3-4x slower than cuBLAS fp16, bench/NOTES.md).
// Here the dequantized weights go through mma.sync.m16n8k16 (fp16 inputs, fp32 accumulators), so a
// weight costs its dequantization (a mask, a subtract, a multiply per two) and 1/16 of an MMA.
//
// ================================================================================================
// Layout: minillm's packed format, read as is (see w4a16_gemv.cu's header)
// ================================================================================================
//   qweight uint32 [N, 4C] (row n: codes in k order, 8 per word, 32 per 16-byte chunk), scales fp16
//   [N, ngroups], zeros uint8 [N, ngroups] or null (symmetric: 8), x fp16 [M, 32C] zero-padded
//   past K, y fp16 [M, ldy]; act >= 0: rows of w are (gate_i, up_i) pairs, y[m, i] = act(gate) * up.
//
// ================================================================================================
// The MMA, transposed: D[n, m] = W[n, :] . X[m, :]
// ================================================================================================
//   mma.m16n8k16 takes A as 16 x 16 (rows x k) and B as 16 x 8 (k x cols). The weights are A (16
//   output rows n), x is B (8 batch rows m per tile, 1 or 2 tiles). Lane l = 4g + t holds, per PTX
//   ISA "Matrix Fragments for mma.m16n8k16":
//     A: rows g and g + 8, k = 2t, 2t+1 (regs 0, 1) and k = 2t+8, 2t+9 (regs 2, 3)
//     B: col g, k = 2t, 2t+1 (reg 0) and 2t+8, 2t+9 (reg 1)
//     D: rows g and g + 8, cols 2t, 2t+1
//   A dot product does not care in which order k is summed, only that A and B agree. So the
//   fragment's "k" positions are mapped onto the packed layout instead of repacking the weights
//   (Marlin reorders them offline): lane t reads chunk 4i + t of rows g and g + 8 (one 16-byte load
//   each, a quad reading 64 contiguous bytes of a row), and the 32 codes of its chunk fill eight
//   k16 steps' worth of its fragment positions. The magic-number unpack gives codes (j, j + 4) of a
//   word as one half2, so that pair is what sits at logical k (2t, 2t+1); x is gathered into the
//   same pairs with byte permutes (x[8w + j], x[8w + j + 4]) from one 16-byte load of row g.
//
// ================================================================================================
// Work decomposition
// ================================================================================================
//   A block owns 16 * NT output rows and all M batch rows; its WARPS warps split K (warp w takes
//   iterations w, w + WARPS, ... of 4 chunks = 128 k), accumulate in fp32 fragments, and are summed
//   in shared memory in warp order (deterministic). Groups are multiples of 32, so each chunk has
//   one scale and zero, applied while dequantizing: w = (q - z) * s, in fp16 like the dequantize +
//   cuBLAS path.

#include "common.cuh"

constexpr int WARPS = 8;

// (1024 + q_j, 1024 + q_{j+4}) of a word -> half2((q_j - z) s, (q_{j+4} - z) s), as the b32 A wants.
__device__ __forceinline__ uint32_t dequant_pair(uint32_t word, int j, __half2 bias, __half2 scale) {
    uint32_t bits = ((word >> (4 * j)) & 0x000F000Fu) | 0x64006400u;
    __half2 h = __hmul2(__hsub2(*reinterpret_cast<__half2*>(&bits), bias), scale);
    return *reinterpret_cast<uint32_t*>(&h);
}

__device__ __forceinline__ uint32_t word_of(const uint4& v, int i) {
    return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

template <int NT, int MT>
__device__ __forceinline__ void mma_body(const uint4* __restrict__ qweight, const __half* __restrict__ scales,
                                         const uint8_t* __restrict__ zeros, const __half* __restrict__ x,
                                         __half* __restrict__ y, int ldy, int M, int N, int C, int ngroups,
                                         int chunks_per_group, int act) {
    __shared__ float red[WARPS][16 * NT][8 * MT + 1];  // +1: lanes of a quad write different banks
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
    const int n0 = blockIdx.x * 16 * NT;
    const uint4* xv = reinterpret_cast<const uint4*>(x);  // row m, chunk c, word j: xv[(m*C + c)*4 + j]

    int rows[NT][2];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int h = 0; h < 2; ++h) rows[nt][h] = min(n0 + 16 * nt + 8 * h + g, N - 1);  // past N: never written
    bool has_x[MT];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) has_x[mt] = 8 * mt + g < M;

    float acc[NT][MT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[nt][mt][e] = 0.f;

    const int iters = (C + 3) >> 2;
#pragma unroll 2
    for (int it = warp; it < iters; it += WARPS) {
        const int c = 4 * it + t;
        const bool valid = c < C;
        const int grp = valid ? c / chunks_per_group : 0;
        uint4 wq[NT][2];
        __half2 bias[NT][2], scale[NT][2];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const size_t r = rows[nt][h];
                wq[nt][h] = valid ? __ldg(qweight + r * C + c) : make_uint4(0, 0, 0, 0);
                const float z = zeros ? (float)zeros[r * ngroups + grp] : 8.f;
                bias[nt][h] = __float2half2_rn(1024.f + z);
                scale[nt][h] = __half2half2(scales[r * ngroups + grp]);
            }
        uint4 xq[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int w = 0; w < 4; ++w)
                xq[mt][w] = (valid && has_x[mt]) ? __ldg(xv + ((size_t)(8 * mt + g) * C + c) * 4 + w)
                                                 : make_uint4(0, 0, 0, 0);
#pragma unroll
        for (int w = 0; w < 4; ++w) {      // word w of the chunk: codes 8w .. 8w + 7
#pragma unroll
            for (int p = 0; p < 2; ++p) {  // one k16 step: code pairs (2p, 2p+4) and (2p+1, 2p+5)
                uint32_t b[MT][2];
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    const uint32_t lo = p ? xq[mt][w].y : xq[mt][w].x;  // x[8w + 2p], x[8w + 2p + 1]
                    const uint32_t hi = p ? xq[mt][w].w : xq[mt][w].z;  // x[8w + 2p + 4], x[8w + 2p + 5]
                    b[mt][0] = __byte_perm(lo, hi, 0x5410);  // (x[8w + 2p], x[8w + 2p + 4])
                    b[mt][1] = __byte_perm(lo, hi, 0x7632);  // (x[8w + 2p + 1], x[8w + 2p + 5])
                }
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) {
                    uint32_t a[4];
                    const uint32_t w0 = word_of(wq[nt][0], w), w1 = word_of(wq[nt][1], w);
                    a[0] = dequant_pair(w0, 2 * p, bias[nt][0], scale[nt][0]);
                    a[1] = dequant_pair(w1, 2 * p, bias[nt][1], scale[nt][1]);
                    a[2] = dequant_pair(w0, 2 * p + 1, bias[nt][0], scale[nt][0]);
                    a[3] = dequant_pair(w1, 2 * p + 1, bias[nt][1], scale[nt][1]);
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) mma_m16n8k16(acc[nt][mt], a[0], a[1], a[2], a[3], b[mt][0], b[mt][1]);
                }
            }
        }
    }

    // ---------------------------------------------------------------------------------------------
    // Sum the warps' partial products in warp order, then write (or apply the gated activation).
    // ---------------------------------------------------------------------------------------------
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int e = 0; e < 4; ++e)
                red[warp][16 * nt + g + 8 * (e >> 1)][8 * mt + 2 * t + (e & 1)] = acc[nt][mt][e];
    __syncthreads();
    const int pairs = act >= 0 ? 2 : 1;  // outputs per store: a (gate, up) pair or one row
    for (int i = threadIdx.x; i < (16 * NT / pairs) * M; i += blockDim.x) {
        const int m = i % M, r = pairs * (i / M);
        float v[2] = {0.f, 0.f};
#pragma unroll
        for (int q = 0; q < 2; ++q)
            if (q < pairs)
#pragma unroll
                for (int w = 0; w < WARPS; ++w) v[q] += red[w][r + q][m];
        if (pairs == 2)
            store_rows<2>(y, ldy, m, n0 + r, N, v, act);
        else
            store_rows<1>(y, ldy, m, n0 + r, N, v, act);
    }
}

#define W4A16_MMA_KERNEL(NT, MT)                                                                       \
    extern "C" __global__ void __launch_bounds__(32 * WARPS, 2)                                         \
        w4a16_mma_n##NT##_m##MT(const uint4* __restrict__ qweight, const __half* __restrict__ scales,   \
                                const uint8_t* __restrict__ zeros, const __half* __restrict__ x,         \
                                __half* __restrict__ y, int ldy, int M, int N, int C, int ngroups,      \
                                int chunks_per_group, int act) {                                       \
        mma_body<NT, MT>(qweight, scales, zeros, x, y, ldy, M, N, C, ngroups, chunks_per_group, act);  \
    }

W4A16_MMA_KERNEL(1, 1)
W4A16_MMA_KERNEL(1, 2)
W4A16_MMA_KERNEL(2, 1)
W4A16_MMA_KERNEL(2, 2)
