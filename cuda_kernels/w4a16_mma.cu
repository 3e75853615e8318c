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
//   qweight uint32 [N, 4C] (row n: codes in k order, 8 per word, 32 per 16-byte chunk), sz uint32
//   [N, ngroups] (fp16 scale bits | zero point << 16, w4a16_gemv.cu), x fp16 [M, 32C] zero-padded
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
    uint32_t bits = and_or(word >> (4 * j), 0x000F000Fu, 0x64006400u);
    __half2 h = __hmul2(__hsub2(*reinterpret_cast<__half2*>(&bits), bias), scale);
    return *reinterpret_cast<uint32_t*>(&h);
}

__device__ __forceinline__ uint32_t word_of(const uint4& v, int i) {
    return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

template <int NT, int MT>
__device__ __forceinline__ void mma_body(const uint4* __restrict__ qweight, const uint32_t* __restrict__ sz,
                                         const __half* __restrict__ x,
                                         __half* __restrict__ y, int ldy, int M, int N, int C, int ngroups,
                                         int chunks_per_group, int cpg_shift, int act) {
    __shared__ float red[WARPS][16 * NT][8 * MT + 1];  // +1: lanes of a quad write different banks
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
    const int n0 = blockIdx.x * 16 * NT;
    pdl_begin();  // before any load (common.cuh)
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
        const int grp = valid ? group_of(c, chunks_per_group, cpg_shift) : 0;
        uint4 wq[NT][2];
        __half2 bias[NT][2], scale[NT][2];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const size_t r = rows[nt][h];
                wq[nt][h] = valid ? __ldg(qweight + r * C + c) : make_uint4(0, 0, 0, 0);
                const uint32_t w = __ldg(sz + r * ngroups + grp), b = (0x6400u | (w >> 16)) * 0x10001u;
                bias[nt][h] = *reinterpret_cast<const __half2*>(&b);  // 1024 + z (0x6400 | z, z < 1024)
                scale[nt][h] = __half2half2(__ushort_as_half((unsigned short)(w & 0xffffu)));
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
        w4a16_mma_n##NT##_m##MT(const uint4* __restrict__ qweight, const uint32_t* __restrict__ sz,     \
                                const __half* __restrict__ x, __half* __restrict__ y, int ldy, int M,   \
                                int N, int C, int ngroups, int chunks_per_group, int cpg_shift,         \
                                int act) {                                                             \
        mma_body<NT, MT>(qweight, sz, x, y, ldy, M, N, C, ngroups, chunks_per_group, cpg_shift, act);  \
    }

W4A16_MMA_KERNEL(1, 1)
W4A16_MMA_KERNEL(1, 2)
W4A16_MMA_KERNEL(2, 1)
W4A16_MMA_KERNEL(2, 2)

// ================================================================================================
// One row of x on the tensor cores (the batch-1 decode step): w4a16_tc1_s{S}[_n]
// ================================================================================================
// At batch 1 the GEMV kernel (w4a16_gemv.cu) spends ~5 instructions per code: a mask, a subtract,
// two conversions to fp32 and an FMA per pair. Here the same codes go through mma.m16n8k16 with x
// in column 0 of B (the other 7 columns are zero: wasted MMA work the memory system never sees),
// and the unpack is the shift-free form of the magic number (Marlin's): masking a word with
// 0x000F000F or 0x00F000F0 and OR-ing 0x6400 gives halves 1024 + q or 1024 + 16 q, so one
// subtract, or one FMA by 1/16, leaves q - z exactly:
//   per 8 codes: 1 shift, 4 LOP3, 4 HADD2/HFMA2, 1/2 MMA  (+ 4 HMUL2 when groups are < 128)
// When the group is a multiple of 128, a warp's 4 chunks per step (128 k) share one scale per row,
// so the MMA sums (q - z) x exactly in fp32 and the scale multiplies the fp32 sum once per step:
// no weight is rounded to fp16. Smaller groups fold the scale into the fp16 weight (HMUL2), as the
// batch-16 kernel above and the dequantize + cuBLAS path do.
//
// Decomposition: a block owns 16 output rows; its S warps split K, warp w taking steps w, w + S,
// ... of 4 chunks (lane t of a quad reads chunk 4 step + t of rows g and g + 8, as mma_body does).
// x is staged in shared memory at the block's start (dynamic, 64 bytes per chunk). The next step's
// codes and scale words are loaded before the current step is multiplied, the first step's before
// the PDL wait (common.cuh pdl_begin_after_loads), and the next kernel is let in before the main
// loop (pdl_trigger), so its blocks load their own first step under this one's streaming. The S
// partial sums per row meet in shared memory, added in warp order; warp 0 writes them (with a
// carried norm, as the GEMV kernel does: common.cuh EpilogueIO). Fewer instructions do not make it
// faster everywhere: it pays per warp for the split-K sums, and past one wave of warps (8192x28672)
// the GEMV is as fast (H100, bench/NOTES.md session 8); minillm/gpu/w4a16.py _tc1_warps holds the rule.

// Codes (j, j + 4) and (j + 1, j + 5) of a word, j = 0 (shift 0) or 2 (shift 8), as (q - z) half2s.
// lo: 1024 + q, minus (1024 + z); hi: 1024 + 16 q, times 1/16, minus (64 + z). Both exact.
__device__ __forceinline__ void tc1_unpack(uint32_t word, __half2 lo_bias, __half2 hi_bias, uint32_t& lo,
                                           uint32_t& hi) {
    uint32_t a = and_or(word, 0x000F000Fu, 0x64006400u), b = and_or(word, 0x00F000F0u, 0x64006400u);
    __half2 ha = __hadd2(*reinterpret_cast<__half2*>(&a), lo_bias);
    __half2 hb = __hfma2(*reinterpret_cast<__half2*>(&b), __float2half2_rn(0.0625f), hi_bias);
    lo = *reinterpret_cast<uint32_t*>(&ha);
    hi = *reinterpret_cast<uint32_t*>(&hb);
}

// One chunk c per lane of rows g and g + 8 (codes w0, w1; their group's words sz0, sz1) into the D
// fragment acc: 8 MMAs of k16 in two independent chains (even and odd k16 steps).
template <bool SCALE_ACC>
__device__ __forceinline__ void tc1_multiply(uint4 w0q, uint4 w1q, uint32_t sz0, uint32_t sz1, int c, int C, int g,
                                             const uint4* __restrict__ xs, float* acc) {
    // The subtrahends from the bits (z < 16): -(1024 + z) is the half 0xE400 | z, -(64 + z) is
    // 0xD400 | 16 z (the step of a half in [64, 128) is 1/16).
    const __half s0 = __ushort_as_half((unsigned short)(sz0 & 0xffffu)), s1 = __ushort_as_half((unsigned short)(sz1 & 0xffffu));
    const uint32_t z0 = sz0 >> 16, z1 = sz1 >> 16;
    const uint32_t lo0b = (0xE400u | z0) * 0x10001u, hi0b = (0xD400u | (z0 << 4)) * 0x10001u;
    const uint32_t lo1b = (0xE400u | z1) * 0x10001u, hi1b = (0xD400u | (z1 << 4)) * 0x10001u;
    const __half2 lo0 = *reinterpret_cast<const __half2*>(&lo0b), hi0 = *reinterpret_cast<const __half2*>(&hi0b);
    const __half2 lo1 = *reinterpret_cast<const __half2*>(&lo1b), hi1 = *reinterpret_cast<const __half2*>(&hi1b);
    const __half2 sc0 = __half2half2(s0), sc1 = __half2half2(s1);
    float part[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
    for (int j = 0; j < 4; ++j) {  // word j of the chunk: codes 8j .. 8j + 7
        // x[8j .. 8j+7] of chunk c, in column 0 of B only (lanes g > 0 hold the zero columns)
        const uint4 xq = (g == 0 && c < C) ? xs[(size_t)c * 4 + j] : make_uint4(0, 0, 0, 0);
        const uint32_t w0 = word_of(w0q, j), w1 = word_of(w1q, j);
#pragma unroll
        for (int p = 0; p < 2; ++p) {  // one k16 step: code pairs (2p, 2p + 4) and (2p + 1, 2p + 5)
            const uint32_t lo = p ? xq.y : xq.x, hi = p ? xq.w : xq.z;
            const uint32_t b0 = __byte_perm(lo, hi, 0x5410), b1 = __byte_perm(lo, hi, 0x7632);
            uint32_t a0, a1, a2, a3;  // rows g, g + 8 at k (2t, 2t+1); the same at k (2t+8, 2t+9)
            tc1_unpack(w0 >> (8 * p), lo0, hi0, a0, a2);
            tc1_unpack(w1 >> (8 * p), lo1, hi1, a1, a3);
            if constexpr (!SCALE_ACC) {
                __half2 h[4] = {__hmul2(*reinterpret_cast<__half2*>(&a0), sc0), __hmul2(*reinterpret_cast<__half2*>(&a1), sc1),
                                __hmul2(*reinterpret_cast<__half2*>(&a2), sc0), __hmul2(*reinterpret_cast<__half2*>(&a3), sc1)};
                const uint32_t* u = reinterpret_cast<const uint32_t*>(h);
                a0 = u[0], a1 = u[1], a2 = u[2], a3 = u[3];
            }
            mma_m16n8k16(part[p], a0, a1, a2, a3, b0, b1);
        }
    }
    // (q - z) x summed exactly in fp32; the group's scale (or 1, folded above) multiplies the sum.
    const float f0 = SCALE_ACC ? __half2float(s0) : 1.f, f1 = SCALE_ACC ? __half2float(s1) : 1.f;
    acc[0] = fmaf(f0, part[0][0] + part[1][0], acc[0]);
    acc[2] = fmaf(f1, part[0][2] + part[1][2], acc[2]);
}

// A weight load that asks L2 for the whole 128-byte line around it: a warp's step reads 64 bytes of
// each of its 16 rows, and the block's next warps want the rest of those lines (the steps after it).
// Fetched as one request each, the lines reach L2 before those warps ask, so more of the weights are
// in flight than the one step ahead a warp's registers hold. H100, 7B W4 decode step at 516 cached
// positions: 2021.1 / 2023.1 -> 1976.2 / 1977.3 us (L2::256B 1979.1 / 1980.1; L1::no_allocate alone
// 2018.0; bench/NOTES.md session 12).
__device__ __forceinline__ uint4 ldg_codes(const uint4* p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 750  // (the fetch-size qualifier's first architecture)
    uint4 v;
    asm("ld.global.nc.L1::no_allocate.L2::128B.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
        : "l"(p));
    return v;
#else
    return __ldg(p);
#endif
}

template <int S, bool SCALE_ACC, bool NORM, bool ROPE>
__device__ __forceinline__ void tc1_body(const uint4* __restrict__ qweight, const uint32_t* __restrict__ sz,
                                         const __half* __restrict__ x, __half* __restrict__ y, int ldy, int N, int C,
                                         int ngroups, int chunks_per_group, int cpg_shift, int act, const EpilogueIO& nio) {
    __shared__ float red[S][16];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
    const int n0 = blockIdx.x * 16;
    const uint4* xv = reinterpret_cast<const uint4*>(x);  // chunk c, word j: xv[c * 4 + j]
    // Rows g and g + 8 (past N: the last row again, computed and never written).
    const uint4* w0p = qweight + (size_t)min(n0 + g, N - 1) * C;
    const uint4* w1p = qweight + (size_t)min(n0 + g + 8, N - 1) * C;
    const uint32_t* s0p = sz + (size_t)min(n0 + g, N - 1) * ngroups;
    const uint32_t* s1p = sz + (size_t)min(n0 + g + 8, N - 1) * ngroups;
    float acc[4] = {0.f, 0.f, 0.f, 0.f};  // D: rows g (acc[0]) and g + 8 (acc[2]) of column 0 at t = 0
    const int steps = (C + 3) >> 2;
    // One step ahead: its codes and its group's scale words are in flight while this one is multiplied.
    auto load = [&](int c, uint4& w0, uint4& w1, uint32_t& q0, uint32_t& q1) {
        const int cc = min(c, C - 1), grp = group_of(cc, chunks_per_group, cpg_shift);
        w0 = c < C ? ldg_codes(w0p + c) : make_uint4(0, 0, 0, 0);
        w1 = c < C ? ldg_codes(w1p + c) : make_uint4(0, 0, 0, 0);
        q0 = __ldg(s0p + grp);
        q1 = __ldg(s1p + grp);
    };
    uint4 n0w, n1w;
    uint32_t n0s, n1s;
    load(4 * warp + t, n0w, n1w, n0s, n1s);  // the weights: no earlier kernel writes them
    pdl_begin_after_loads(qweight);  // before x and the epilogue's inputs (common.cuh)
    // With a carried norm, what the epilogue needs is read here, in the same round trip as x, instead
    // of on the block's critical path at its end (or, for a consumer, at warp 0's start): a consumer's
    // partial sums of h^2 (into shared memory after x), a producer's h and w of its 16 rows.
    extern __shared__ uint4 xs[];
    float* ss_in = reinterpret_cast<float*>(xs + 4 * C);  // the consumer's partials (dynamic, after x)
    __shared__ float hw[2][16];                           // the producer's h[n0 + r], w[n0 + r]
    float parts[4], hwv = 0.0f;
    int pos = 0;  // the rotary epilogue's position (the qkv product)
    if constexpr (ROPE) {
        if (warp == 0) pos = *nio.pos;
    }
    if constexpr (NORM) {
        if (nio.in_ss)
#pragma unroll
            for (int u = 0; u < 4; u++) {
                const int i = threadIdx.x + u * blockDim.x;
                parts[u] = i < nio.in_blocks ? nio.in_ss[i] : 0.0f;
            }
        if (nio.h && threadIdx.x < 32) {
            const int n = min(n0 + (threadIdx.x & 15), N - 1);
            hwv = threadIdx.x < 16 ? nio.h[n] : nio.w[n];  // h is this row's thread's own to rewrite
        }
    }
    // x into shared memory, once per block (64 C bytes, dynamic): the warps split K, so each chunk of
    // x is read by one warp of the block, and read from L2 it was a round trip on every step's
    // critical path (H100: 11008x4096 11.98 -> 11.61 us, 4096x4096 at 16 warps 6.80 -> 6.00;
    // bench/NOTES.md session 8). Loaded in batches of 4 a thread, after the first step's codes.
    for (int i0 = threadIdx.x; i0 < 4 * C; i0 += 4 * blockDim.x) {
        uint4 tmp[4];
#pragma unroll
        for (int u = 0; u < 4; u++) {
            const int i = i0 + u * blockDim.x;
            if (i < 4 * C) tmp[u] = __ldg(xv + i);
        }
#pragma unroll
        for (int u = 0; u < 4; u++) {
            const int i = i0 + u * blockDim.x;
            if (i < 4 * C) xs[i] = tmp[u];
        }
    }
    if constexpr (NORM) {
        if (nio.in_ss) {
#pragma unroll
            for (int u = 0; u < 4; u++) {
                const int i = threadIdx.x + u * blockDim.x;
                if (i < nio.in_blocks) ss_in[i] = parts[u];
            }
            for (int i = threadIdx.x + 4 * blockDim.x; i < nio.in_blocks; i += blockDim.x) ss_in[i] = nio.in_ss[i];
        }
        if (nio.h && threadIdx.x < 32) hw[threadIdx.x >> 4][threadIdx.x & 15] = hwv;
    }
    __syncthreads();
    // The rotation of lane l's pair (rows n0 + 2l, + 1): asked for now, used after the loop.
    const float2 cs = ROPE && warp == 0 && lane < 8 ? rope_cs(nio, n0 + 2 * lane, pos) : make_float2(1.0f, 0.0f);
    // The next kernel may launch now (common.cuh pdl_trigger): once every block of this grid has got
    // here, its blocks take the SM slots this one frees and load their first weights before they wait.
    pdl_trigger();
    for (int it = warp; it < steps; it += S) {
        const uint4 w0 = n0w, w1 = n1w;
        const uint32_t q0 = n0s, q1 = n1s;
        const int c = 4 * it + t;
        if (it + S < steps) load(c + 4 * S, n0w, n1w, n0s, n1s);
        tc1_multiply<SCALE_ACC>(w0, w1, q0, q1, c, C, g, xs, acc);
    }

    // ---------------------------------------------------------------------------------------------
    // The S warps' sums, added in warp order; warp 0 writes (rows 2i, 2i + 1 together for act).
    // ---------------------------------------------------------------------------------------------
    if (t == 0) {
        red[warp][g] = acc[0];
        red[warp][g + 8] = acc[2];
    }
    __syncthreads();
    float ss = 0.0f;  // a producer's sum of h^2 over the block's rows
    if (warp == 0) {
        // A consumer's norm factor: warp 0 alone stores, so it alone adds the producer's partial sums.
        const float norm_scale = NORM ? norm_in_scale(nio, ss_in) : 1.0f;
        const int pairs = act >= 0 || ROPE ? 2 : 1;  // gate/up, or a rotation's (j, j + hd/2)
        if (lane < 16 / pairs) {
            const int r = pairs * lane;
            float v[2] = {0.f, 0.f};
#pragma unroll
            for (int q = 0; q < 2; ++q)
                if (q < pairs)
                    for (int w = 0; w < S; ++w) v[q] += red[w][r + q];
            // (a producer is a plain product: one row a lane, its h and w at hw[0][r], hw[1][r])
            const float hwr[2] = {hw[0][r], hw[1][r]};
            ss = pairs == 2 ? store_rows_normed<2, NORM, ROPE>(y, ldy, 0, n0 + r, N, v, act, nio, norm_scale, nullptr, pos, cs)
                            : store_rows_normed<1, NORM>(y, ldy, 0, n0 + r, N, v, act, nio, norm_scale, hwr);
        }
        if (NORM) ss = warp_sum(ss);  // fixed order: the same sum in every run
    }
    if (NORM) norm_block_sum(nio, ss);
}

#define W4A16_TC1_KERNEL(S, SCALE_ACC, NORM, ROPE, NAME)                                                           \
    extern "C" __global__ void __launch_bounds__(32 * S, 32 / S)                                               \
        NAME(const uint4* __restrict__ qweight, const uint32_t* __restrict__ sz, const __half* __restrict__ x, \
             __half* __restrict__ y, int ldy, int N, int C, int ngroups, int chunks_per_group, int cpg_shift,    \
             int act, const EpilogueIO nio) {                                                                     \
        tc1_body<S, SCALE_ACC, NORM, ROPE>(qweight, sz, x, y, ldy, N, C, ngroups, chunks_per_group, cpg_shift, act, nio); \
    }
// The instances the launcher picks among (minillm/gpu/w4a16.py _tc1_warps): 4, 5, 6, 8, 10 or 16 warps a
// block (each a different count of blocks an SM at 64 registers: 8, 6, 5, 4, 3, 2),
// for each scale form (_g: groups of 128 or a multiple, the scale on the fp32 sum; _h: smaller
// groups, HMUL2 on the codes) with and without a carried norm (_n), and with the rotary epilogue of
// the qkv product as well (_nr; kernels.py epilogue_suffix picks).
#define W4A16_TC1_WARPS(SCALE_ACC, NORM, ROPE, SUFFIX)                          \
    W4A16_TC1_KERNEL(4, SCALE_ACC, NORM, ROPE, w4a16_tc1_s4_##SUFFIX)           \
    W4A16_TC1_KERNEL(5, SCALE_ACC, NORM, ROPE, w4a16_tc1_s5_##SUFFIX)           \
    W4A16_TC1_KERNEL(6, SCALE_ACC, NORM, ROPE, w4a16_tc1_s6_##SUFFIX)           \
    W4A16_TC1_KERNEL(8, SCALE_ACC, NORM, ROPE, w4a16_tc1_s8_##SUFFIX)           \
    W4A16_TC1_KERNEL(10, SCALE_ACC, NORM, ROPE, w4a16_tc1_s10_##SUFFIX)         \
    W4A16_TC1_KERNEL(16, SCALE_ACC, NORM, ROPE, w4a16_tc1_s16_##SUFFIX)
W4A16_TC1_WARPS(true, false, false, g)
W4A16_TC1_WARPS(true, true, false, g_n)
W4A16_TC1_WARPS(true, true, true, g_nr)
W4A16_TC1_WARPS(false, false, false, h)
W4A16_TC1_WARPS(false, true, false, h_n)
W4A16_TC1_WARPS(false, true, true, h_nr)
