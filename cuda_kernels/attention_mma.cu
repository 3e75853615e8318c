// Decode attention over the quantized caches on tensor cores: scores and the weighted sum of values
// are mma.sync.m16n8k16 products of fp16 fragments built in registers from the codes. INT4 (KIVI)
// always; INT8 and FP8 E4M3 when key/value heads are grouped (the grouped query heads then share
// every dequantized value; attention.cu's per-head kernels stay for one query head per kv head).
//
// ================================================================================================
// Layout (minillm/gpu/cache.py; the reference is kvcache.Int4KVCache)
// ================================================================================================
//   q        fp16 [R, H, hd], rotated; row r = (b, t) = (r / T, r % T) attends to [lo, pos[b] + t]
//   kq, vq   uint8 [B, KV, L, hd / 2]: codes, dim d in the low (d even) or high nibble of byte d / 2
//   ks, kz   fp16 [B, KV, L / 32, hd]: keys per channel over blocks of 32 positions, k = s (c - z)
//   vs, vz   fp16 [B, KV, L, hd / group]: values per token in groups of `group` dims
//   wk, wv   fp16 [B, KV, 32, hd]: the float window, position j in slot j % 32, holding the block
//            that is not complete yet; positions below (len / 32) * 32 are read quantized
//   8-bit:   kq, vq int8 / E4M3 codes [B, KV, L, hd], ks, vs float [B, KV, L]: one scale per
//            (position, head); kz, vz, wk, wv unused
//   partials and out as attention.cu (merged by attention_merge.cuh)
//
// ================================================================================================
// The two products (FlashAttention-2's arrangement, Dao 2023, sec. 3.1, for one query row)
// ================================================================================================
//   A block of 32 positions: S = Q' C^T (8 query heads x 32 positions), then O^T += V^T P^T (hd x 8).
//   Keys: the block's per-channel scale and zero fold into the query, q'_d = q_d s_d, so that
//   q . k = sum_d q'_d c_d - sum_d q'_d z_d: the MMA's B operand is the codes themselves (exact
//   small integers in fp16, from the magic-number unpack of w4a16_gemv.cu) and the second sum is
//   one number per (query, block). Values: dequantized per position in half2, (c - z) s.
//   8-bit: the codes become fp16 exactly (int8: byte permute under the exponent of 1024 and one
//   subtraction; E4M3: cvt.rn.f16x2.e4m3x2, sm_89+), the key scale multiplies the score and the
//   value scale the softmax weight, once per position. The query enters as is (fp16, exact) and
//   log2(e) / sqrt(hd) multiplies the fp32 score, so only the INT4 fold q s rounds anything there.
//   The m16n8k16 fragments (PTX ISA, "Matrix Fragments for mma.m16n8k16"), lane = 4g + t:
//     A rows g, g+8 (score MMA: the queries, rows 8..15 zero), k = 2t, 2t+1 and 2t+8, 2t+9
//     B k = 2t, 2t+1 and 2t+8, 2t+9, col g;   C/D rows g, g+8, cols 2t, 2t+1
//   A dot product may sum its k in any order if A and B agree, so the "k" of the score MMA (the
//   head dims) is mapped onto what a lane loads: lane t reads HDP/4 consecutive dims of position g
//   (8 bytes of codes per 16 dims), and the unpack's natural pairs (codes j, j + 4 of a word) sit at
//   (2t, 2t+1). In the value MMA k is the position and the query heads are B's columns: the score
//   accumulator of lane (g, t) holds positions 2t, 2t+1 of its n-tile for query g, which is exactly
//   the B fragment P^T needs (no shuffle). A = V^T wants two positions of one dim per register, so
//   lane g takes dims (HDP/8) g .. (HDP/8) g + HDP/8 - 1 of four positions; the unpack's pair j of
//   word u gives rows g and g + 8 of m-tile 4u + j, and a byte permute pairs two positions up. The
//   accumulator then holds, per lane, dims of its own row g for the queries 2t, 2t + 1.
//   v_off (a centred FP8 cache's value offsets, or null) is added at the merge (attention_merge.cuh).
//
// ================================================================================================
// Work decomposition
// ================================================================================================
//   grid (KV x query tiles of 8 heads, S splits of `chunk` positions, R rows); NW warps per block,
//   warp w takes blocks w, w + NW, ... of its chunk, keeps an online softmax per query (Milakov &
//   Gimelshein 2018; scores in the log2 domain), and the warps merge in a fixed order in shared
//   memory. The split containing the row's last positions also reads the float window with the
//   same two MMAs (fp16 keys and values). hd is padded to HDP (64 or 128) with masked lanes.

#include "common.cuh"
#include "attention_merge.cuh"

#define KV_INT8 1
#define KV_FP8 2
#define KV_INT4 3

constexpr int RB = 32;  // positions per quantized key block (KIVI_BLOCK)
constexpr int NW = 4;   // warps per block

template <int HDP> struct TileShape {
    static constexpr int KD = HDP / 4;        // key dims a lane t reads per position
    static constexpr int KSTEPS = HDP / 16;   // k16 steps of the score MMA
    static constexpr int KU2 = KD / 16;       // 8-byte loads of key codes per lane and position
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

// Codes j and j + 4 of a word as half2(1024 + c_j, 1024 + c_{j+4}) (w4a16_gemv.cu's magic number).
__device__ __forceinline__ uint32_t magic_pair(uint32_t word, int j) {
    return ((word >> (4 * j)) & 0x000F000Fu) | 0x64006400u;
}

__device__ __forceinline__ uint32_t hsub_u32(uint32_t a, uint32_t b) {
    __half2 r = __hsub2(*reinterpret_cast<__half2*>(&a), *reinterpret_cast<__half2*>(&b));
    return *reinterpret_cast<uint32_t*>(&r);
}

__device__ __forceinline__ uint32_t hmul_u32(uint32_t a, uint32_t b) {
    __half2 r = __hmul2(*reinterpret_cast<__half2*>(&a), *reinterpret_cast<__half2*>(&b));
    return *reinterpret_cast<uint32_t*>(&r);
}

// Bytes k of two words (dims d and d + 4 of an 8-bit row) as half2 of the decoded values.
template <int FMT>
__device__ __forceinline__ uint32_t byte_pair(uint32_t lo, uint32_t hi, int k) {
    if (FMT == KV_INT8) {
        // byte k of each into the low byte of a half; XOR 0x80 makes c + 128 (unsigned), and under
        // 0x64 it reads 1024 + c + 128: one subtraction of 1152 leaves c exactly.
        const uint32_t x = __byte_perm(lo, hi, k | ((4 + k) << 8));
        const uint32_t h = (x & 0x00FF00FFu) ^ 0x64806480u;
        return hsub_u32(h, 0x64806480u);  // half2(1152, 1152)
    } else {
        const uint32_t two = __byte_perm(lo, hi, k | ((4 + k) << 4));  // low 16 bits: (lo_k, hi_k)
        uint32_t h2;
        asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(h2) : "h"((unsigned short)two));
        return h2;
    }
}

template <int FMT, int HDP>
__device__ __forceinline__ void attn_mma(const __half* __restrict__ q, const uint8_t* __restrict__ kq,
                                          const uint8_t* __restrict__ vq, const void* __restrict__ ks_,
                                          const void* __restrict__ kz_, const void* __restrict__ vs_,
                                          const void* __restrict__ vz_, const __half* __restrict__ wk,
                                          const __half* __restrict__ wv, const int* __restrict__ pos, int T, int H,
                                          int KV, int hd, int L, int group, int chunk, int window, float qscale,
                                          float* __restrict__ part_acc, float* __restrict__ part_m,
                                          float* __restrict__ part_l, int* __restrict__ counter,
                                          __half* __restrict__ out, int ld_out, const float* __restrict__ v_off) {
    using S = TileShape<HDP>;
    constexpr bool INT4 = FMT == KV_INT4;
    // Scales: fp16 (scale, zero) per key channel and block / value group and position for INT4, a
    // float per (position, head) for the 8-bit codes.
    const __half *ks4 = (const __half*)ks_, *kz4 = (const __half*)kz_, *vs4 = (const __half*)vs_,
                 *vz4 = (const __half*)vz_;
    const float *ks8 = (const float*)ks_, *vs8 = (const float*)vs_;
    constexpr int KD = S::KD, KSTEPS = S::KSTEPS, KU2 = S::KU2, VD = S::VD;
    __shared__ float sm_acc[NW][8][HDP];
    __shared__ float sm_m[NW][8], sm_l[NW][8];

    const int G = H / KV, qtiles = (G + 7) / 8;
    const int kvh = blockIdx.x / qtiles, qt = blockIdx.x % qtiles;
    const int split = blockIdx.y, nsplit = gridDim.y, r = blockIdx.z;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int qi = qt * 8 + g;  // this lane's query head (A row g) among the G of kvh
    const bool has_q = qi < G;
    const RowSpan span = row_span(pos, r, T, window, split, nsplit, chunk);
    const int b = span.b, len = span.len, c0 = span.c0, c1 = span.c1;
    // INT4: positions quantized by the time this row's token was decoded (the rest: the window)
    const int qlen = INT4 ? (len / RB) * RB : len;
    const int qend = min(c1, qlen);
    const size_t bk = (size_t)b * KV + kvh;
    const int nb = (L + RB - 1) / RB, ngroups = hd / group;
    const int kd0 = KD * t;       // first key dim of this lane
    const int vd0 = VD * g;       // first value dim of this lane
    const bool v_in = vd0 < hd;   // hd % 16 == 0, so a lane's value dims are all in or all out

    // Step s of the score MMA takes word w = s / 2 of the lane's codes, pairs (2p, 2p + 4) and
    // (2p + 1, 2p + 5), p = s % 2: these are the query dims its A registers hold.
    auto dim_of = [](int s, int k) { return 8 * (s >> 1) + 2 * (s & 1) + k; };  // k in {0, 4, 1, 5}
    // The query at this lane's key dims, as those A fragments (fp16, exact: the scale log2(e) /
    // sqrt(hd) multiplies the fp32 scores instead); 0 past hd and for absent heads.
    uint32_t qa0[KSTEPS], qa2[KSTEPS];
    {
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
            qa0[s] = pack_half2(qf[dim_of(s, 0)], qf[dim_of(s, 4)]);
            qa2[s] = pack_half2(qf[dim_of(s, 1)], qf[dim_of(s, 5)]);
        }
    }

    // O^T = V^T P^T: m-tile md of the value MMA holds, in rows g and g + 8, dims vd0 + 8u + j and
    // vd0 + 8u + j + 4 (md = 4u + j: the magic unpack's pair j of word u), for queries 2t, 2t+1.
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
        float mb = NEG_INF;
#pragma unroll
        for (int nt = 0; nt < 4; nt++) mb = fmaxf(mb, fmaxf(sc[nt][0], sc[nt][1]));
        mb = fmaxf(mb, __shfl_xor_sync(FULL_MASK, mb, 1));
        mb = fmaxf(mb, __shfl_xor_sync(FULL_MASK, mb, 2));
        const float mn = fmaxf(m, mb);
        const float corr = m == NEG_INF ? 0.0f : exp2f(m - mn);
        l *= corr;
        float p[4][2];
#pragma unroll
        for (int nt = 0; nt < 4; nt++)
#pragma unroll
            for (int e = 0; e < 2; e++) {
                p[nt][e] = sc[nt][e] == NEG_INF ? 0.0f : exp2f(sc[nt][e] - mn);
                l += p[nt][e];
            }
        m = mn;
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

    const float ones[4][2] = {{1.0f, 1.0f}, {1.0f, 1.0f}, {1.0f, 1.0f}, {1.0f, 1.0f}};

    // ---------------------------------------------------------------------------------------------
    // 8-bit caches: every position quantized, one scale per (position, head)
    // ---------------------------------------------------------------------------------------------
    if constexpr (!INT4) {
        constexpr int KW = KD / 4, VW = VD / 4;  // 32-bit words of codes per lane: key row, value row
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
#pragma unroll
                for (int s = 0; s < KSTEPS; s++) {  // dims 8w + 2p + {0, 4} and {1, 5}: bytes of words 2w, 2w + 1
                    const int w = s >> 1, p = s & 1;
                    mma_scores(d, qa0[s], qa2[s], byte_pair<FMT>(kw[nt][2 * w], kw[nt][2 * w + 1], 2 * p),
                               byte_pair<FMT>(kw[nt][2 * w], kw[nt][2 * w + 1], 2 * p + 1));
                }
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    const int j = j0 + nt * 8 + 2 * t + e;
                    sc[nt][e] = j >= c0 && j < c1 ? d[e] * (kscl[nt][e] * qscale) : NEG_INF;
                }
            }
            softmax_and_values(sc, vscl, [&](int i, int md, uint32_t* a) {
                // dims vd0 + 8u + j (rows g) and + 4 (rows g + 8): byte j of words 2u and 2u + 1
                const int u = md >> 2, j = md & 3;
                const uint32_t d0 = byte_pair<FMT>(vw[i][0][2 * u], vw[i][1][2 * u], j);
                const uint32_t d4 = byte_pair<FMT>(vw[i][0][2 * u + 1], vw[i][1][2 * u + 1], j);
                const uint32_t e0 = byte_pair<FMT>(vw[i][2][2 * u], vw[i][3][2 * u], j);
                const uint32_t e4 = byte_pair<FMT>(vw[i][2][2 * u + 1], vw[i][3][2 * u + 1], j);
                a[0] = d0, a[1] = d4, a[2] = e0, a[3] = e4;
            });
        }
    }

    // ---------------------------------------------------------------------------------------------
    // INT4: quantized blocks
    // ---------------------------------------------------------------------------------------------
    const uint32_t magic2 = 0x64006400u;  // half2(1024, 1024)
    for (int blk = c0 / RB + warp; INT4 && blk * RB < qend; blk += NW) {
        const int j0 = blk * RB;
        // q' = q s for this block's key scales, as A fragments; bias = q' . z over all dims.
        uint32_t a0[KSTEPS], a2[KSTEPS];
        float bias = 0.0f;
        {
            // The lane's KD scales and zeros (fp16): consecutive, so 16-byte loads of 8 (hd % 16 == 0:
            // a load is all inside hd or all outside).
            const size_t sb = (bk * nb + blk) * hd + kd0;
            float sc4[KD], zr4[KD];
#pragma unroll
            for (int i = 0; i < KD; i += 8) {
                const bool in = kd0 + i < hd;
                const uint4 a = in ? __ldg(reinterpret_cast<const uint4*>(ks4 + sb + i)) : make_uint4(0, 0, 0, 0);
                const uint4 c = in ? __ldg(reinterpret_cast<const uint4*>(kz4 + sb + i)) : make_uint4(0, 0, 0, 0);
                half8_to_float(a, sc4 + i);
                half8_to_float(c, zr4 + i);
            }
#pragma unroll
            for (int s = 0; s < KSTEPS; s++) {
                const float2 q04 = __half22float2(*reinterpret_cast<const __half2*>(&qa0[s]));
                const float2 q15 = __half22float2(*reinterpret_cast<const __half2*>(&qa2[s]));
                const int d0 = dim_of(s, 0), d4 = dim_of(s, 4), d1 = dim_of(s, 1), d5 = dim_of(s, 5);
                a0[s] = pack_half2(q04.x * (qscale * sc4[d0]), q04.y * (qscale * sc4[d4]));
                a2[s] = pack_half2(q15.x * (qscale * sc4[d1]), q15.y * (qscale * sc4[d5]));
                // bias from the fp16 values the MMA multiplies
                const float2 v04 = __half22float2(*reinterpret_cast<const __half2*>(&a0[s]));
                const float2 v15 = __half22float2(*reinterpret_cast<const __half2*>(&a2[s]));
                bias += v04.x * zr4[d0] + v04.y * zr4[d4] + v15.x * zr4[d1] + v15.y * zr4[d5];
            }
            bias += __shfl_xor_sync(FULL_MASK, bias, 1);
            bias += __shfl_xor_sync(FULL_MASK, bias, 2);
        }
        // Loads first: the block's key codes (4 n-tiles of 8 positions) and this lane's value rows.
        uint2 kw[4][KU2];
#pragma unroll
        for (int nt = 0; nt < 4; nt++) {
            const size_t row = bk * L + j0 + nt * 8 + g;
#pragma unroll
            for (int u = 0; u < KU2; u++)
                kw[nt][u] = kd0 + 16 * u < hd ? __ldg(reinterpret_cast<const uint2*>(kq + row * (hd / 2) + kd0 / 2) + u)
                                              : make_uint2(0u, 0u);
        }
        constexpr int VW = VD / 8;  // 32-bit words of value codes per lane and position (2 or 1)
        uint32_t vw[2][4][VW];
        uint32_t vbias[2][2], vscale[2][2];  // per (k-tile, register): half2 of the two positions
#pragma unroll
        for (int i = 0; i < 2; i++)
#pragma unroll
            for (int k = 0; k < 4; k++) {  // positions 16i + 2t + {0, 1, 8, 9}
                const int j = j0 + 16 * i + 2 * t + (k & 1) + 8 * (k >> 1);
                const size_t row = bk * L + j;
#pragma unroll
                for (int u = 0; u < VW; u++)
                    vw[i][k][u] = v_in ? __ldg(reinterpret_cast<const uint32_t*>(vq + row * (hd / 2) + vd0 / 2) + u) : 0u;
            }
#pragma unroll
        for (int i = 0; i < 2; i++)
#pragma unroll
            for (int reg = 0; reg < 2; reg++) {
                float z2[2], s2[2];
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    const size_t row = bk * L + j0 + 16 * i + 2 * t + e + 8 * reg;
                    const int gi = v_in ? vd0 / group : 0;
                    s2[e] = __half2float(__ldg(vs4 + row * ngroups + gi));
                    z2[e] = __half2float(__ldg(vz4 + row * ngroups + gi));
                }
                vbias[i][reg] = pack_half2(1024.0f + z2[0], 1024.0f + z2[1]);
                vscale[i][reg] = pack_half2(s2[0], s2[1]);
            }

        float sc[4][2];
#pragma unroll
        for (int nt = 0; nt < 4; nt++) {
            float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
            for (int s = 0; s < KSTEPS; s++) {
                const int w = s >> 1, p = s & 1;
                const uint32_t word = (w & 1) ? kw[nt][w >> 1].y : kw[nt][w >> 1].x;
                mma_scores(d, a0[s], a2[s], hsub_u32(magic_pair(word, 2 * p), magic2),
                         hsub_u32(magic_pair(word, 2 * p + 1), magic2));
            }
#pragma unroll
            for (int e = 0; e < 2; e++) {
                const int j = j0 + nt * 8 + 2 * t + e;
                sc[nt][e] = j >= c0 && j < qend ? d[e] - bias : NEG_INF;
            }
        }
        softmax_and_values(sc, ones, [&](int i, int md, uint32_t* a) {
            // Positions (2t, 2t+1) and (2t+8, 2t+9) of k-tile i, dims (8u + j) and (8u + j + 4) of
            // the lane's: unpack pair j of word u of each position, interleave two positions by a
            // permute, dequantize with their (scale, zero).
            const int u = md >> 2, j = md & 3;
            const uint32_t p0 = magic_pair(vw[i][0][u], j), p1 = magic_pair(vw[i][1][u], j);
            const uint32_t p2 = magic_pair(vw[i][2][u], j), p3 = magic_pair(vw[i][3][u], j);
            a[0] = hmul_u32(hsub_u32(__byte_perm(p0, p1, 0x5410), vbias[i][0]), vscale[i][0]);
            a[1] = hmul_u32(hsub_u32(__byte_perm(p0, p1, 0x7632), vbias[i][0]), vscale[i][0]);
            a[2] = hmul_u32(hsub_u32(__byte_perm(p2, p3, 0x5410), vbias[i][1]), vscale[i][1]);
            a[3] = hmul_u32(hsub_u32(__byte_perm(p2, p3, 0x7632), vbias[i][1]), vscale[i][1]);
        });
    }

    // ---------------------------------------------------------------------------------------------
    // The float window: the row's own, incomplete block (fewer than 32 positions), one warp
    // ---------------------------------------------------------------------------------------------
    const int w0 = max(c0, qlen);
    if (INT4 && w0 < c1 && warp == NW - 1) {
        float sc[4][2];
#pragma unroll
        for (int nt = 0; nt < 4; nt++) {
            const int j = qlen + nt * 8 + g;
            const __half* krow = wk + (bk * RB + j % RB) * hd + kd0;
            float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
            for (int w = 0; w < KD / 8; w++) {
                const uint4 x = kd0 + 8 * w < hd ? *reinterpret_cast<const uint4*>(krow + 8 * w) : make_uint4(0, 0, 0, 0);
#pragma unroll
                for (int p = 0; p < 2; p++) {  // dims (8w + 2p, +4) and (8w + 2p + 1, +5), as the codes
                    const uint32_t lo = p ? x.y : x.x, hi = p ? x.w : x.z;
                    mma_scores(d, qa0[2 * w + p], qa2[2 * w + p], __byte_perm(lo, hi, 0x5410), __byte_perm(lo, hi, 0x7632));
                }
            }
#pragma unroll
            for (int e = 0; e < 2; e++) {
                const int jj = qlen + nt * 8 + 2 * t + e;
                sc[nt][e] = jj >= c0 && jj < c1 ? d[e] * qscale : NEG_INF;
            }
        }
        softmax_and_values(sc, ones, [&](int i, int md, uint32_t* a) {
            const int dim = vd0 + 8 * (md >> 2) + (md & 3);  // rows g: dim; rows g + 8: dim + 4
            uint32_t x[4], y[4];
#pragma unroll
            for (int k = 0; k < 4; k++) {  // positions 16i + 2t + {0, 1, 8, 9}
                const int j = qlen + 16 * i + 2 * t + (k & 1) + 8 * (k >> 1);
                const __half* row = wv + (bk * RB + j % RB) * hd;
                const bool ok = v_in && j < c1;  // slots past the length may hold anything
                x[k] = ok ? *reinterpret_cast<const uint32_t*>(row + (dim & ~1)) : 0u;
                y[k] = ok ? *reinterpret_cast<const uint32_t*>(row + ((dim + 4) & ~1)) : 0u;
            }
            const uint32_t sel = (dim & 1) ? 0x7632u : 0x5410u;
            a[0] = __byte_perm(x[0], x[1], sel);
            a[1] = __byte_perm(y[0], y[1], sel);
            a[2] = __byte_perm(x[2], x[3], sel);
            a[3] = __byte_perm(y[2], y[3], sel);
        });
    }

    // ---------------------------------------------------------------------------------------------
    // The warps' results merged in warp order, written as this split's partials, then the splits
    // ---------------------------------------------------------------------------------------------
    l += __shfl_xor_sync(FULL_MASK, l, 1);
    l += __shfl_xor_sync(FULL_MASK, l, 2);
    if (t == 0) {
        sm_m[warp][g] = m;
        sm_l[warp][g] = l;
    }
#pragma unroll
    for (int md = 0; md < MT; md++)
#pragma unroll
        for (int e = 0; e < 2; e++) {
            const int dim = vd0 + 8 * (md >> 2) + (md & 3);
            sm_acc[warp][2 * t + e][dim] = acc[md][e];
            sm_acc[warp][2 * t + e][dim + 4] = acc[md][2 + e];
        }
    __syncthreads();
    const size_t part0 = ((size_t)r * H + kvh * G) * nsplit + split;  // (r, head kvh * G, split)
    for (int i = threadIdx.x; i < 8 * hd; i += blockDim.x) {
        const int gg = i / hd, d = i % hd, qh = qt * 8 + gg;
        if (qh >= G) continue;
        float M = NEG_INF;
#pragma unroll
        for (int w = 0; w < NW; w++) M = fmaxf(M, sm_m[w][gg]);
        float sum = 0.0f, lsum = 0.0f;
#pragma unroll
        for (int w = 0; w < NW; w++) {
            const float f = sm_m[w][gg] == NEG_INF ? 0.0f : exp2f(sm_m[w][gg] - M);
            sum += f * sm_acc[w][gg][d];
            lsum += f * sm_l[w][gg];
        }
        part_acc[(part0 + (size_t)qh * nsplit) * hd + d] = sum;
        if (d == 0) {
            part_m[part0 + (size_t)qh * nsplit] = M;
            part_l[part0 + (size_t)qh * nsplit] = lsum;
        }
    }
    merge_splits(r, H, KV, kvh, G, nsplit, nsplit * qtiles, len, span.chunk, hd, part_acc, part_m, part_l, counter, out,
                 ld_out, v_off);
}

// Three blocks per SM: 168 registers and a few spilled, against 230 and two blocks (H100, INT4 at 32k
// positions: batch 8 1.66x fp16 vs 1.43x; batch 1 1.32x vs 1.37x; GQA 1.50-1.77x vs 1.11-1.46x).
#define ATTN_MMA(NAME, FMT, HDP)                                                                              \
    extern "C" __global__ void __launch_bounds__(32 * NW, 3) NAME(                                            \
        const __half* q, const uint8_t* kq, const uint8_t* vq, const void* ks, const void* kz, const void* vs,    \
        const void* vz, const __half* wk, const __half* wv, const int* pos, int T, int H, int KV, int hd, int L,  \
        int group, int chunk, int window, float qscale, float* part_acc, float* part_m, float* part_l,          \
        int* counter, __half* out, int ld_out, const float* v_off) {                                           \
        pdl_begin();                                                                                          \
        attn_mma<FMT, HDP>(q, kq, vq, ks, kz, vs, vz, wk, wv, pos, T, H, KV, hd, L, group, chunk, window, qscale, \
                           part_acc, part_m, part_l, counter, out, ld_out, v_off);                             \
    }

ATTN_MMA(attn_mma_int4_hd64, KV_INT4, 64)
ATTN_MMA(attn_mma_int4_hd128, KV_INT4, 128)
ATTN_MMA(attn_mma_int8_hd64, KV_INT8, 64)
ATTN_MMA(attn_mma_int8_hd128, KV_INT8, 128)
ATTN_MMA(attn_mma_fp8_hd64, KV_FP8, 64)
ATTN_MMA(attn_mma_fp8_hd128, KV_FP8, 128)
