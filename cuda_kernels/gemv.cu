// GEMV / small-batch GEMM for fp16 weights (the unquantized layers and the LM head) and for 8-bit
// weights (W8A16): y[m, n] = sum_k x[m, k] * w[n, k], fp32 accumulation. The 4-bit kernel is
// w4a16_gemv.cu; this file follows the same plan for one and two bytes per weight.
//
// ================================================================================================
// Layout
// ================================================================================================
//   fp16     w     fp16  [N, 8 * C]: C chunks of 8 weights (16 bytes) per row, padded with zeros
//   int8     codes uint8 [N, 16 * C]: C chunks of 16 codes (16 bytes) per row, padded with zeros
//            scales fp16 [N, ngroups], zeros uint8 [N, ngroups] or null (symmetric: zero 128),
//            w[n, k] = scale[n, k / G] * (q[n, k] - zero[n, k / G]), G a multiple of 16
//   x        fp16 [M, ldx], ldx >= the padded K (columns past K are zero); y fp16 [M, ldy]
//   act      -1: y = x w^T; 0/1: rows of w are (gate_i, up_i) pairs, y[m, i] = act(gate_i) * up_i
//            (SiLU / GELU-tanh fused into the product, see store_rows in common.cuh; ROWS even)
//
// ================================================================================================
// Work decomposition
// ================================================================================================
//   A warp owns ROWS consecutive output rows; its lanes stride over the 16-byte chunks (lane l takes
//   chunks l, l + 32, ...), so a warp-wide load is 512 contiguous bytes of a row. Four chunks per
//   lane are loaded before any is used (UNROLL), so each lane keeps 4 * ROWS 16-byte loads in
//   flight: at batch 1 the kernel is a stream over the weights and needs that depth to cover
//   DRAM latency. Each weight chunk is converted once and used for all M rows of x.

#include "common.cuh"

#define UNROLL 4

// What differs between the formats: how one 16-byte chunk of each of the ROWS weight rows is
// multiplied into the accumulators for the M rows of x (chunk c: x values VALS * c ..).
struct F16Chunk {  // 8 fp16 weights
    static constexpr int VALS = 8;
    template <int M, int ROWS>
    __device__ __forceinline__ void add(float (&acc)[M][ROWS], const uint4 (&wr)[ROWS], int c, int, int,
                                        const __half* __restrict__ x, int ldx) const {
        float wf[ROWS][8];
#pragma unroll
        for (int rr = 0; rr < ROWS; rr++) half8_to_float(wr[rr], wf[rr]);
#pragma unroll
        for (int m = 0; m < M; m++) {
            float xf[8];
            half8_to_float(*reinterpret_cast<const uint4*>(x + (size_t)m * ldx + 8 * c), xf);
#pragma unroll
            for (int rr = 0; rr < ROWS; rr++)
#pragma unroll
                for (int i = 0; i < 8; i++) acc[m][rr] += wf[rr][i] * xf[i];
        }
    }
};

struct I8Chunk {  // 16 int8 codes, with the group's scale and zero point (128 when symmetric)
    static constexpr int VALS = 16;
    const __half* __restrict__ scales;
    const uint8_t* __restrict__ zeros;
    int ngroups, chunks_per_group;
    template <int M, int ROWS>
    __device__ __forceinline__ void add(float (&acc)[M][ROWS], const uint4 (&wr)[ROWS], int c, int n0, int N,
                                        const __half* __restrict__ x, int ldx) const {
        const int grp = c / chunks_per_group;
        float scale[ROWS], zero[ROWS];
#pragma unroll
        for (int rr = 0; rr < ROWS; rr++) {
            const int n = min(n0 + rr, N - 1);
            scale[rr] = __half2float(scales[(size_t)n * ngroups + grp]);
            zero[rr] = zeros ? (float)zeros[(size_t)n * ngroups + grp] : 128.0f;
        }
#pragma unroll
        for (int m = 0; m < M; m++) {
            float xf[16];
            half8_to_float(*reinterpret_cast<const uint4*>(x + (size_t)m * ldx + 16 * c), xf);
            half8_to_float(*reinterpret_cast<const uint4*>(x + (size_t)m * ldx + 16 * c + 8), xf + 8);
#pragma unroll
            for (int rr = 0; rr < ROWS; rr++) {
                const uint32_t words[4] = {wr[rr].x, wr[rr].y, wr[rr].z, wr[rr].w};
                float d = 0.0f, xs = 0.0f;
#pragma unroll
                for (int i = 0; i < 16; i++) {
                    d += xf[i] * (float)((words[i / 4] >> (8 * (i % 4))) & 0xffu);
                    xs += xf[i];
                }
                acc[m][rr] += scale[rr] * (d - zero[rr] * xs);  // s * sum x (q - z)
            }
        }
    }
};

template <int M, int ROWS, bool NORM, bool ROPE, class Chunk>
__device__ __forceinline__ void gemv_body(const uint4* __restrict__ w, Chunk chunk, const __half* __restrict__ x,
                                          int ldx, __half* __restrict__ y, int ldy, int N, int C, int act,
                                          const EpilogueIO& nio) {
    const int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
    const int n0 = warp * ROWS;  // warps past N load nothing and store nothing, but reach the barrier
    pdl_begin();  // before any load (common.cuh)
    if (!NORM && n0 >= N) return;  // (NORM: the instance with a carried norm, common.cuh EpilogueIO)
    const float scale = NORM ? norm_in_scale(nio, nio.in_ss) : 1.0f;
    // The qkv product's rotation (common.cuh rope_cs): the position asked for now, the table row
    // after the first batch of weights (pos has arrived by then), both used after the loop.
    const int pos = ROPE ? *nio.pos : 0;
    float2 cs = make_float2(1.0f, 0.0f);
    float acc[M][ROWS];
#pragma unroll
    for (int m = 0; m < M; m++)
#pragma unroll
        for (int rr = 0; rr < ROWS; rr++) acc[m][rr] = 0.0f;

    for (int c0 = lane; c0 < C && n0 < N; c0 += 32 * UNROLL) {
        uint4 wr[UNROLL][ROWS];
#pragma unroll
        for (int u = 0; u < UNROLL; u++) {
            const int c = c0 + 32 * u;
#pragma unroll
            for (int rr = 0; rr < ROWS; rr++)
                wr[u][rr] = (c < C && n0 + rr < N) ? w[(size_t)(n0 + rr) * C + c] : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int u = 0; u < UNROLL; u++) {
            const int c = c0 + 32 * u;
            if (c >= C) break;
            chunk.template add<M, ROWS>(acc, wr[u], c, n0, N, x, ldx);
        }
        if constexpr (ROPE) {
            if (c0 == lane) cs = rope_cs(nio, n0, pos);
        }
    }
    float ss = 0.0f;
#pragma unroll
    for (int m = 0; m < M; m++) {
        float v[ROWS];
#pragma unroll
        for (int rr = 0; rr < ROWS; rr++) v[rr] = warp_sum(acc[m][rr]);
        if (lane == 0) ss += store_rows_normed<ROWS, NORM, ROPE>(y, ldy, m, n0, N, v, act, nio, scale, nullptr, pos, cs);
    }
    if (NORM) norm_block_sum(nio, ss);
}

#define GEMV_F16_K(M, ROWS, NORM, ROPE, NAME)                                                                     \
    extern "C" __global__ void __launch_bounds__(128) NAME(                                                \
        const uint4* w, const __half* x, int ldx, __half* y, int ldy, int N, int C, int act,               \
        const EpilogueIO nio) {                                                                               \
        gemv_body<M, ROWS, NORM, ROPE>(w, F16Chunk{}, x, ldx, y, ldy, N, C, act, nio);                           \
    }
#define GEMV_I8_K(M, ROWS, NORM, ROPE, NAME)                                                                     \
    extern "C" __global__ void __launch_bounds__(128) NAME(                                                \
        const uint4* codes, const __half* scales, const uint8_t* zeros, const __half* x, int ldx, __half* y, \
        int ldy, int N, int C, int ngroups, int chunks_per_group, int act, const EpilogueIO nio) {            \
        gemv_body<M, ROWS, NORM, ROPE>(codes, I8Chunk{scales, zeros, ngroups, chunks_per_group}, x, ldx, y, ldy, N, C, act, \
                           nio);                                                                           \
    }

#define GEMV_F16(M, ROWS) GEMV_F16_K(M, ROWS, false, false, gemv_f16_m##M##_r##ROWS)
#define GEMV_I8(M, ROWS) GEMV_I8_K(M, ROWS, false, false, gemv_i8_m##M##_r##ROWS)

GEMV_F16(1, 2)
GEMV_F16(2, 2)
GEMV_F16(4, 2)
GEMV_F16(8, 2)
GEMV_F16(16, 2)
GEMV_I8(1, 2)
GEMV_I8(2, 2)
GEMV_I8(4, 2)
GEMV_I8(8, 2)
GEMV_I8(16, 2)
GEMV_F16_K(1, 2, true, false, gemv_f16_m1_r2_n)  // batch 1 with a carried norm (the decode step)
GEMV_I8_K(1, 2, true, false, gemv_i8_m1_r2_n)
GEMV_F16_K(1, 2, true, true, gemv_f16_m1_r2_nr)  // ... and the rotary epilogue (the qkv product)
GEMV_I8_K(1, 2, true, true, gemv_i8_m1_r2_nr)
