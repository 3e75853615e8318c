// Decode attention over the 8-bit caches (int8, FP8 E4M3) on tensor cores, for grouped query heads:
// scores and the weighted sum of values are mma.sync.m16n8k16 products of fp16 fragments built in
// registers from the codes, so the grouped query heads share every dequantized value (attention.cu's
// per-head kernels stay for one query head per kv head; the INT4 cache has attention_int4.cu).
//
// ================================================================================================
// Layout (minillm/gpu/cache.py; the references are kvcache.Int8KVCache / Fp8KVCache)
// ================================================================================================
//   q        fp16 [R, H, hd], rotated; row r = (b, t) = (r / T, r % T) attends to [lo, pos[b] + t]
//   kq, vq   int8 / E4M3 codes [B, KV, L, hd]; ks, vs float [B, KV, L]: one scale per (position, head)
//   partials and out as attention.cu (merged by attention_merge.cuh)
//
// ================================================================================================
// The two products (FlashAttention-2's arrangement, Dao 2023, sec. 3.1, for one query row)
// ================================================================================================
//   A block of 32 positions: S = Q C^T (8 query heads x 32 positions), then O^T += V^T P^T (hd x 8).
//   The codes become fp16 exactly (int8: byte permute under the exponent of 1024 and one
//   subtraction; E4M3: cvt.rn.f16x2.e4m3x2, sm_89+), the key scale multiplies the score and the
//   value scale the softmax weight, once per position. The query enters as is (fp16, exact) and
//   log2(e) / sqrt(hd) multiplies the fp32 score.
//   The m16n8k16 fragments (PTX ISA, "Matrix Fragments for mma.m16n8k16"), lane = 4g + t:
//     A rows g, g+8 (score MMA: the queries, rows 8..15 zero), k = 2t, 2t+1 and 2t+8, 2t+9
//     B k = 2t, 2t+1 and 2t+8, 2t+9, col g;   C/D rows g, g+8, cols 2t, 2t+1
//   A dot product may sum its k in any order if A and B agree, so the "k" of the score MMA (the
//   head dims) is mapped onto what a lane loads: lane t reads HDP/4 consecutive dims of position g,
//   and bytes (j, j + 4) of two words sit at (2t, 2t+1). In the value MMA k is the position and
//   the query heads are B's columns: the score accumulator of lane (g, t) holds positions 2t, 2t+1
//   of its n-tile for query g, which is exactly the B fragment P^T needs (no shuffle). A = V^T
//   wants two positions of one dim per register, so lane g takes dims (HDP/8) g .. (HDP/8) g +
//   HDP/8 - 1 of four positions, and a byte permute pairs two positions up. The accumulator then
//   holds, per lane, dims of its own row g for the queries 2t, 2t + 1.
//   v_off (a centred FP8 cache's value offsets, or null) is added at the merge (attention_merge.cuh).
//
// ================================================================================================
// Work decomposition
// ================================================================================================
//   grid (KV x query tiles of 8 heads, S splits of `chunk` positions, R rows); NW warps per block,
//   warp w takes blocks w, w + NW, ... of its chunk, keeps an online softmax per query (Milakov &
//   Gimelshein 2018; scores in the log2 domain), and the warps merge in a fixed order in shared
//   memory. hd is padded to HDP (64 or 128) with masked lanes. A warp loads its block's codes into
//   registers, or (the _bulk instances, for few blocks: kernels.py) has the bulk-copy engine copy its
//   next block into shared memory while it computes on the current one.
//   PDL (common.cuh): the _bulk instances ask for a warp's first block before the wait when earlier
//   steps cached all of it (the query comes after the wait), and the next kernel may launch once
//   every block is past its loop (kernels.py spread_shared_memory keeps its blocks from crowding
//   onto a few SMs).

#include "common.cuh"
#include "attention_merge.cuh"

#define KV_INT8 1
#define KV_FP8 2

constexpr int RB = 32;  // positions per block of a warp
constexpr int NW = 4;   // warps per block
constexpr int MMA_STAGES = 2;  // the _bulk instances' stages a warp (3: slower, bench/NOTES.md session 17)

template <int HDP> struct TileShape {
    static constexpr int KD = HDP / 4;        // key dims a lane t reads per position
    static constexpr int KSTEPS = HDP / 16;   // k16 steps of the score MMA
    static constexpr int VD = HDP / 8;        // value dims of a lane g = dim tiles of the value MMA
};

// The score MMA: rows g + 8 of A are zero (at most 8 queries per tile).
__device__ __forceinline__ void mma_scores(float* d, uint32_t a0, uint32_t a2, uint32_t b0, uint32_t b1) {
    mma_m16n8k16(d, a0, 0u, a2, 0u, b0, b1);
}

__device__ __forceinline__ uint32_t pack_half2(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
}

__device__ __forceinline__ uint32_t hsub_u32(uint32_t a, uint32_t b) {
    __half2 r = __hsub2(*reinterpret_cast<__half2*>(&a), *reinterpret_cast<__half2*>(&b));
    return *reinterpret_cast<uint32_t*>(&r);
}

// Bytes k of two words (dims d and d + 4 of an 8-bit row) as half2 of the decoded values.
template <int FMT>
__device__ __forceinline__ uint32_t byte_pair(uint32_t lo, uint32_t hi, int k) {
    if (FMT == KV_INT8) {
        // byte k of each into the low byte of a half; XOR 0x80 makes c + 128 (unsigned), and under
        // 0x64 it reads 1024 + c + 128: one subtraction of 1152 leaves c exactly.
        // (and_xor: one LOP3 where the compiler emitted an AND and an XOR, 1,130 -> 1,017
        // instructions a block of 32 positions at head_dim 128)
        const uint32_t x = __byte_perm(lo, hi, k | ((4 + k) << 8));
        return hsub_u32(and_xor(x, 0x00FF00FFu, 0x64806480u), 0x64806480u);  // half2(1152, 1152)
    } else {
        const uint32_t two = __byte_perm(lo, hi, k | ((4 + k) << 4));  // low 16 bits: (lo_k, hi_k)
        uint32_t h2;
        asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(h2) : "h"((unsigned short)two));
        return h2;
    }
}

// Step s of the score MMA takes word w = s / 2 of the lane's codes, pairs (2p, 2p + 4) and
// (2p + 1, 2p + 5), p = s % 2: these are the query dims its A registers hold (k in {0, 4, 1, 5}).
__device__ __forceinline__ constexpr int query_dim(int s, int k) { return 8 * (s >> 1) + 2 * (s & 1) + k; }

template <int FMT, int HDP, bool BULK>
__device__ __forceinline__ void attn_mma(const __half* __restrict__ q, const uint8_t* __restrict__ kq,
                                          const uint8_t* __restrict__ vq, const float* __restrict__ ks8,
                                          const float* __restrict__ vs8, const int* __restrict__ pos, int T, int H,
                                          int KV, int hd, int L, int chunk, int window, float qscale,
                                          float* __restrict__ part_acc, float* __restrict__ part_m,
                                          float* __restrict__ part_l, int* __restrict__ counter,
                                          __half* __restrict__ out, int ld_out, const float* __restrict__ v_off) {
    using S = TileShape<HDP>;
    constexpr int KD = S::KD, KSTEPS = S::KSTEPS, VD = S::VD;
    __shared__ float sm_m[NW][8], sm_l[NW][8];

    const int G = H / KV, qtiles = (G + 7) / 8;
    const int kvh = blockIdx.x / qtiles, qt = blockIdx.x % qtiles;
    const int split = blockIdx.y, nsplit = gridDim.y, r = blockIdx.z;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int qi = qt * 8 + g;  // this lane's query head (A row g) among the G of kvh
    const bool has_q = qi < G;
    const RowSpan span = row_span(pos, r, T, window, split, nsplit, chunk);
    const int b = span.b, len = span.len, c0 = span.c0, c1 = span.c1;
    const size_t bk = (size_t)b * KV + kvh;
    const int kd0 = KD * t;       // first key dim of this lane
    const int vd0 = VD * g;       // first value dim of this lane
    const bool v_in = vd0 < hd;   // hd % 16 == 0, so a lane's value dims are all in or all out

    // The query at this lane's key dims, as those A fragments (fp16, exact: the scale log2(e) /
    // sqrt(hd) multiplies the fp32 scores instead); 0 past hd and for absent heads.
    // (Read after the PDL wait: the product before this kernel writes q; see the loops below.)
    uint32_t qa0[KSTEPS], qa2[KSTEPS];
    auto load_query = [&] {
        float qf[KD];
#pragma unroll
        for (int i = 0; i < KD; i += 8) {
            float tmp[8];
            const bool in = has_q && kd0 + i < hd;
            if (in) half8_to_float(*reinterpret_cast<const uint4*>(q + ((size_t)r * H + kvh * G + qi) * hd + kd0 + i), tmp);
#pragma unroll
            for (int j = 0; j < 8; j++) qf[i + j] = in ? tmp[j] : 0.0f;
        }
#pragma unroll
        for (int s = 0; s < KSTEPS; s++) {
            qa0[s] = pack_half2(qf[query_dim(s, 0)], qf[query_dim(s, 4)]);
            qa2[s] = pack_half2(qf[query_dim(s, 1)], qf[query_dim(s, 5)]);
        }
    };

    // O^T = V^T P^T: m-tile md of the value MMA holds, in rows g and g + 8, dims vd0 + 8u + j and
    // vd0 + 8u + j + 4 (md = 4u + j: byte j of words 2u and 2u + 1), for queries 2t, 2t+1.
    constexpr int MT = HDP / 16;
    float acc[MT][4];
#pragma unroll
    for (int md = 0; md < MT; md++)
#pragma unroll
        for (int e = 0; e < 4; e++) acc[md][e] = 0.0f;
    float m = NEG_INF, l = 0.0f;  // of query g (the score layout)

    // One online-softmax step over 32 scores of query g (lane: positions nt * 8 + 2t + e), then the
    // value MMA. P is already laid out as its B operand (k = positions 2t, 2t+1 / 2t+8, 2t+9, col g);
    // va(i, md, a) gives the four A registers of m-tile md for positions 16i .. 16i + 15.
    // ps: a factor per position on the softmax weight as the MMA reads it (8-bit value scales).
    auto softmax_and_values = [&](float (&sc)[4][2], const float (&ps)[4][2], auto&& va) {
        float p[4][2];
        const float corr = online_softmax_step(sc, m, l, p);
        // The accumulator columns are queries 2t and 2t + 1: their factors come from those lanes.
        const float c0f = __shfl_sync(FULL_MASK, corr, 8 * t), c1f = __shfl_sync(FULL_MASK, corr, 8 * t + 4);
#pragma unroll
        for (int md = 0; md < MT; md++) {
            acc[md][0] *= c0f, acc[md][2] *= c0f;
            acc[md][1] *= c1f, acc[md][3] *= c1f;
        }
#pragma unroll
        for (int i = 0; i < 2; i++) {
            const uint32_t b0 = pack_half2(p[2 * i][0] * ps[2 * i][0], p[2 * i][1] * ps[2 * i][1]);  // 16i + 2t, +1
            const uint32_t b1 = pack_half2(p[2 * i + 1][0] * ps[2 * i + 1][0],
                                           p[2 * i + 1][1] * ps[2 * i + 1][1]);  // 16i + 8 + 2t, +1
#pragma unroll
            for (int md = 0; md < MT; md++) {
                uint32_t a[4];
                va(i, md, a);
                mma_m16n8k16(acc[md], a[0], a[1], a[2], a[3], b0, b1);
            }
        }
    };

    // ---------------------------------------------------------------------------------------------
    // Blocks of 32 positions, one scale per (position, head)
    // ---------------------------------------------------------------------------------------------
    // Shared memory (dynamic, kernels.py mma_smem_bytes): with BULK each warp's two stages while the
    // loop runs; after it, sm_acc and the merge's weights.
    extern __shared__ __align__(128) uint8_t dsm[];
    constexpr int KW = KD / 4, VW = VD / 4;  // 32-bit words of codes per lane: key row, value row
    // One n-tile's scores from the lane's key words: step s takes dims 8w + 2p + {0, 4} and {1, 5},
    // bytes of words 2w and 2w + 1 (w = s / 2, p = s % 2).
    auto tile_scores = [&](const uint32_t (&kw)[KW], float (&d)[4]) {
#pragma unroll
        for (int s = 0; s < KSTEPS; s++) {
            const int w = s >> 1, p = s & 1;
            mma_scores(d, qa0[s], qa2[s], byte_pair<FMT>(kw[2 * w], kw[2 * w + 1], 2 * p),
                       byte_pair<FMT>(kw[2 * w], kw[2 * w + 1], 2 * p + 1));
        }
    };
    // The value product's A fragments of m-tile md for positions 16i..16i + 15 (vw[i][k]: positions
    // 16i + 2t + {0, 1, 8, 9}): dims vd0 + 8u + j (rows g) and + 4 (rows g + 8), byte j of words 2u
    // and 2u + 1 (md = 4u + j).
    auto value_frag = [](const uint32_t (&vw)[2][4][VW], int i, int md, uint32_t* a) {
        const int u = md >> 2, j = md & 3;
        a[0] = byte_pair<FMT>(vw[i][0][2 * u], vw[i][1][2 * u], j);
        a[1] = byte_pair<FMT>(vw[i][0][2 * u + 1], vw[i][1][2 * u + 1], j);
        a[2] = byte_pair<FMT>(vw[i][2][2 * u], vw[i][3][2 * u], j);
        a[3] = byte_pair<FMT>(vw[i][2][2 * u + 1], vw[i][3][2 * u + 1], j);
    };
    if constexpr (BULK) {
        // Each warp's next block copied into shared memory by the bulk-copy engine while it computes
        // on the current one: lane 0 asks for the block's keys, values (32 rows of hd bytes each, as
        // they lie in the cache) and their scales in four copies, counted on the stage's mbarrier.
        // Loading the codes into registers took ~20 16-byte loads a warp and block, and with few
        // blocks a SM those queue up: the first memory instruction after a block's loop waited
        // 0.7 us (median) and up to 4 us behind them, on the way to the merge (bench/NOTES.md,
        // session 17). With batch 8 the register loads are faster (more blocks cover them).
        const int KEYB = RB * hd, STAGE = 2 * KEYB + 2 * 4 * RB;
        __shared__ __align__(8) unsigned long long bars[NW][MMA_STAGES];
        if (lane == 0)
#pragma unroll
            for (int i = 0; i < MMA_STAGES; i++) mbar_init(&bars[warp][i], 1);
        __syncwarp();
        uint8_t* const stages = dsm + MMA_STAGES * warp * STAGE;  // the warp's stages, taken in turn
        auto bulk_copy = [](void* dst, const void* src, unsigned bytes, unsigned long long* bar) {
            asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                         ::"r"((unsigned)__cvta_generic_to_shared(dst)), "l"(src), "r"(bytes),
                         "r"((unsigned)__cvta_generic_to_shared(bar)) : "memory");
        };
        auto issue = [&](int blk, uint8_t* dst, int which) {
            // The cache's last block may have fewer than 32 rows: the rest of the stage is zeroed (stale
            // bytes could be NaN codes, and 0 x NaN is NaN in the value product). The scales go by the
            // engine when they are 16-byte aligned (L % 4 == 0), else by the lanes.
            const int rows = min(RB, L - blk * RB);
            const size_t row0 = bk * L + (size_t)blk * RB;
            const bool bulk_scales = rows == RB && (L & 3) == 0;
            if (lane == 0) {
                unsigned long long* bar = &bars[warp][which];
                asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // the lanes' reads of it first
                mbar_expect_tx(bar, 2 * rows * hd + (bulk_scales ? 8 * RB : 0));
                bulk_copy(dst, kq + row0 * hd, rows * hd, bar);
                bulk_copy(dst + KEYB, vq + row0 * hd, rows * hd, bar);
                if (bulk_scales) {
                    bulk_copy(dst + 2 * KEYB, ks8 + row0, 4 * RB, bar);
                    bulk_copy(dst + 2 * KEYB + 4 * RB, vs8 + row0, 4 * RB, bar);
                }
            }
            if (!bulk_scales) {
                float* sc = reinterpret_cast<float*>(dst + 2 * KEYB);
                sc[lane] = lane < rows ? ks8[row0 + lane] : 0.0f;  // (RB == 32 lanes)
                sc[RB + lane] = lane < rows ? vs8[row0 + lane] : 0.0f;
            }
            for (int c = lane; c < (RB - rows) * hd / 16; c += 32) {
                reinterpret_cast<uint4*>(dst + rows * hd)[c] = make_uint4(0, 0, 0, 0);
                reinterpret_cast<uint4*>(dst + KEYB + rows * hd)[c] = make_uint4(0, 0, 0, 0);
            }
        };
        // PDL (common.cuh): positions below pos[b] were cached by earlier steps (this step's append,
        // the kernel before this one, writes pos[b] on), so a warp's first blocks of them are asked
        // for before the wait, their DRAM round trip under the end of the kernel before (in a run of
        // attention calls, that call's merge; as attention.cu's PRE); the query and the rest after it.
        const int first = c0 / RB + warp, cached = pos[b];
        auto first_stages = [&](bool before_wait) {
#pragma unroll
            for (int i = 0; i < MMA_STAGES - 1; i++) {
                const int blk = first + i * NW;
                if (blk * RB < c1 && ((blk + 1) * RB <= cached) == before_wait) issue(blk, stages + i * STAGE, i);
            }
        };
        first_stages(true);
        pdl_begin();
        TIMELINE(8);
        first_stages(false);
        load_query();
        for (int blk = first, k = 0; blk * RB < c1; blk += NW, k++) {
            const int j0 = blk * RB;
            __syncwarp();  // every lane is done with the stage of the previous block, and the lanes'
                           // own writes into this one are seen
            const int ahead = blk + (MMA_STAGES - 1) * NW, ka = (k + MMA_STAGES - 1) % MMA_STAGES;
            if (ahead * RB < c1) issue(ahead, stages + ka * STAGE, ka);
            const int cur = k % MMA_STAGES;
            uint8_t* const st = stages + cur * STAGE;
            mbar_wait(&bars[warp][cur], (k / MMA_STAGES) & 1);
            const float* const scl = reinterpret_cast<const float*>(st + 2 * KEYB);  // keys' [32], values' [32]
            float vscl[4][2];
#pragma unroll
            for (int nt = 0; nt < 4; nt++)
#pragma unroll
                for (int e = 0; e < 2; e++) vscl[nt][e] = scl[RB + nt * 8 + 2 * t + e];
            float sc[4][2];
#pragma unroll
            for (int nt = 0; nt < 4; nt++) {
                uint32_t kw[KW];
#pragma unroll
                for (int u = 0; u < KW; u += 4) {
                    const uint4 x = kd0 + 4 * u < hd ? *reinterpret_cast<const uint4*>(st + (nt * 8 + g) * hd + kd0 + 4 * u)
                                                     : make_uint4(0, 0, 0, 0);
                    kw[u] = x.x, kw[u + 1] = x.y, kw[u + 2] = x.z, kw[u + 3] = x.w;
                }
                float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
                tile_scores(kw, d);
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    const int j = j0 + nt * 8 + 2 * t + e;
                    sc[nt][e] = j >= c0 && j < c1 ? d[e] * (scl[nt * 8 + 2 * t + e] * qscale) : NEG_INF;
                }
            }
            uint32_t vw[2][4][VW];  // positions 16i + 2t + {0, 1, 8, 9} (k), 8 bytes a read
#pragma unroll
            for (int i = 0; i < 2; i++)
#pragma unroll
                for (int k = 0; k < 4; k++)
#pragma unroll
                    for (int u = 0; u < VW; u += 2) {
                        const uint2 x = v_in ? *reinterpret_cast<const uint2*>(st + KEYB + (16 * i + 2 * t + (k & 1) + 8 * (k >> 1)) * hd + vd0 + 4 * u)
                                             : make_uint2(0u, 0u);
                        vw[i][k][u] = x.x, vw[i][k][u + 1] = x.y;
                    }
            softmax_and_values(sc, vscl, [&](int i, int md, uint32_t* a) { value_frag(vw, i, md, a); });
            if (blk == first) TIMELINE(1);
        }
        __syncthreads();  // the stages become sm_acc and the merge's weights
    } else {
        pdl_begin();
        TIMELINE(8);
        load_query();
        for (int blk = c0 / RB + warp; blk * RB < c1; blk += NW) {
            const int j0 = blk * RB;
            uint32_t kw[4][KW];
            float kscl[4][2], vscl[4][2];
#pragma unroll
            for (int nt = 0; nt < 4; nt++) {
                const size_t row = bk * L + min(j0 + nt * 8 + g, L - 1);
#pragma unroll
                for (int u = 0; u < KW; u += 4) {  // 16 dims a load; hd % 16 == 0
                    const uint4 x = kd0 + 4 * u < hd ? __ldg(reinterpret_cast<const uint4*>(kq + row * hd + kd0 + 4 * u))
                                                     : make_uint4(0, 0, 0, 0);
                    kw[nt][u] = x.x, kw[nt][u + 1] = x.y, kw[nt][u + 2] = x.z, kw[nt][u + 3] = x.w;
                }
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    const size_t srow = bk * L + min(j0 + nt * 8 + 2 * t + e, L - 1);
                    kscl[nt][e] = __ldg(ks8 + srow);
                    vscl[nt][e] = __ldg(vs8 + srow);
                }
            }
            uint32_t vw[2][4][VW];
#pragma unroll
            for (int i = 0; i < 2; i++)
#pragma unroll
                for (int k = 0; k < 4; k++) {  // positions 16i + 2t + {0, 1, 8, 9}
                    const size_t row = bk * L + min(j0 + 16 * i + 2 * t + (k & 1) + 8 * (k >> 1), L - 1);
#pragma unroll
                    for (int u = 0; u < VW; u += 2) {
                        const uint2 x = v_in ? __ldg(reinterpret_cast<const uint2*>(vq + row * hd + vd0 + 4 * u))
                                             : make_uint2(0u, 0u);
                        vw[i][k][u] = x.x, vw[i][k][u + 1] = x.y;
                    }
                }
            float sc[4][2];
#pragma unroll
            for (int nt = 0; nt < 4; nt++) {
                float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
                tile_scores(kw[nt], d);
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    const int j = j0 + nt * 8 + 2 * t + e;
                    sc[nt][e] = j >= c0 && j < c1 ? d[e] * (kscl[nt][e] * qscale) : NEG_INF;
                }
            }
            softmax_and_values(sc, vscl, [&](int i, int md, uint32_t* a) { value_frag(vw, i, md, a); });
            if (blk == c0 / RB + warp) TIMELINE(1);
        }
    }

    // The next kernel may launch now (common.cuh pdl_trigger): o_proj loads its weights, a next
    // attention call its first blocks, during this merge. (kernels.py spreads the grid so that those
    // blocks cannot crowd onto a few SMs.)
    pdl_trigger();

    auto sm_acc = reinterpret_cast<float (*)[8][HDP + ACC_PAD]>(dsm);
    float* const sm_w = reinterpret_cast<float*>(dsm + 4 * NW * 8 * (HDP + ACC_PAD));

    // ---------------------------------------------------------------------------------------------
    // The warps' results merged in warp order, written as this split's partials, then the splits
    // ---------------------------------------------------------------------------------------------
    l += __shfl_xor_sync(FULL_MASK, l, 1);
    l += __shfl_xor_sync(FULL_MASK, l, 2);
    if (t == 0) {
        sm_m[warp][g] = m;
        sm_l[warp][g] = l;
    }
    // acc[4u + j]: dims vd0 + 8u + j (columns 0, 1: queries 2t, 2t + 1) and vd0 + 8u + 4 + j (2, 3)
#pragma unroll
    for (int u = 0; u < MT / 4; u++)
#pragma unroll
        for (int e = 0; e < 2; e++) {
            float* const row = &sm_acc[warp][2 * t + e][vd0 + 8 * u];
            *reinterpret_cast<float4*>(row) = make_float4(acc[4 * u][e], acc[4 * u + 1][e], acc[4 * u + 2][e], acc[4 * u + 3][e]);
            *reinterpret_cast<float4*>(row + 4) =
                make_float4(acc[4 * u][2 + e], acc[4 * u + 1][2 + e], acc[4 * u + 2][2 + e], acc[4 * u + 3][2 + e]);
        }
    __syncthreads();
    TIMELINE(2);
    write_tile_partials<NW, HDP + ACC_PAD>(sm_acc, sm_m, sm_l, r, H, kvh, G, qt, split, nsplit, hd, part_acc, part_m, part_l);
    merge_splits_tc<32 * NW>(r, H, KV, kvh, G, nsplit, nsplit * qtiles, len, span.chunk, hd, part_acc, part_m, part_l,
                             counter, out, ld_out, v_off, sm_w);
}

// Three blocks per SM (measured when this kernel also served the INT4 cache: 168 registers and a few
// spilled, against 230 and two blocks, was faster on every shape).
#define ATTN_MMA(NAME, FMT, HDP, BULK)                                                                        \
    extern "C" __global__ void __launch_bounds__(32 * NW, 3) NAME(                                            \
        const __half* q, const uint8_t* kq, const uint8_t* vq, const float* ks, const float* vs, const int* pos,   \
        int T, int H, int KV, int hd, int L, int chunk, int window, float qscale, float* part_acc, float* part_m,  \
        float* part_l, int* counter, __half* out, int ld_out, const float* v_off) {                             \
        TIMELINE(0);                                                                                          \
        attn_mma<FMT, HDP, BULK>(q, kq, vq, ks, vs, pos, T, H, KV, hd, L, chunk, window, qscale, part_acc, part_m,      \
                           part_l, counter, out, ld_out, v_off);                                               \
    }

ATTN_MMA(attn_mma_int8_hd64, KV_INT8, 64, false)
ATTN_MMA(attn_mma_int8_hd128, KV_INT8, 128, false)
ATTN_MMA(attn_mma_fp8_hd64, KV_FP8, 64, false)
ATTN_MMA(attn_mma_fp8_hd128, KV_FP8, 128, false)
ATTN_MMA(attn_mma_int8_hd64_bulk, KV_INT8, 64, true)
ATTN_MMA(attn_mma_int8_hd128_bulk, KV_INT8, 128, true)
ATTN_MMA(attn_mma_fp8_hd64_bulk, KV_FP8, 64, true)
ATTN_MMA(attn_mma_fp8_hd128_bulk, KV_FP8, 128, true)
