// Decode attention over the INT4 (KIVI) cache on tensor cores, with the dequantization folded into
// the products so that a code costs about one instruction: the scores and the weighted sum of
// values are mma.sync.m16n8k16 products of fp16 fragments built from the codes in registers.
//
// ================================================================================================
// Layout (minillm/gpu/cache.py; the reference is kvcache.Int4KVCache)
// ================================================================================================
//   q        fp16 [R, H, HD], rotated; row r = (b, t) = (r / T, r % T) attends to [lo, pos[b] + t]
//   kq, vq   uint8 [B, KV, L, HD / 2]: codes, dim d in the low (d even) or high nibble of byte d / 2
//   ks, kz   fp16 [B, KV, L / KB, HD]: keys per channel over blocks of KB positions, k = s (c - z)
//   vs, vz   fp16 [B, KV, L, NG]: values per token in NG groups of GROUP dims, v = s (c - z)
//   wk, wv   fp16 [B, KV, KB, HD]: the float window, position j in slot j % KB, holding the block
//            that is not complete yet; positions below (len / KB) * KB are read quantized
//   KB and GROUP are the cache's (KIVI_BLOCK, KIVI_GROUP: minillm/gpu/kernels.py compiles this file
//   for the layout of the cache it is given, and for grids of few blocks with KIVI_MIN_BLOCKS, below)
//   partials and out as attention.cu (merged by attention_merge.cuh)
//
// ================================================================================================
// Arithmetic (FlashAttention-2's two products for one query row, Dao 2023, sec. 3.1)
// ================================================================================================
//   Scores, a block of 32 positions: S = Q' C^T with q'_d = q_d s_d (the block's per-channel
//   scales, one fp16 multiply per pair of dims) and C the codes as they come out of a mask: a
//   code c in the low nibble under the exponent of 1024 reads as the fp16 number 1024 + c (mask
//   0x000F), one in the high nibble, bits 4-7, under the exponent of 64 as 64 + c (mask 0x00F0;
//   the mantissa's step there is 1/16). No subtraction per code: the offsets are the same for
//   every position, so they join the zero point in one bias per (query, block),
//       q . k = sum_d q'_d (o_d + c_d) - sum_d q'_d (z_d + o_d),   o_d in {1024, 64},
//   and the bias is itself one more product on the tensor cores: its B operand holds z in
//   columns 0-3 and the offsets in columns 4-7, the two sums land in columns 0 and 4, exact
//   (fp16 products, fp32 sums), subtracted from each score once its products are summed.
//   Values: O^T += V^T P^T, A = V^T dequantized as s c by one fused multiply-add per pair,
//   (64 + c) s - 64 s (the low nibble shifted up to bits 4-7 first; 64 s is exact in fp16, so
//   the one rounding is that of s c), and the zero points left out:
//   sum_j p_j s_j (c_j - z_j) = sum_j p_j s_j c_j - sum_j p_j (s_j z_j), the second sum one
//   number per (group, query), which a fifth product per 16 positions accumulates (A rows =
//   groups, A = s z) and the end subtracts. With one query head per key/value head (the _mha
//   instances) B's columns are free: they carry the value groups' p s and p s z, the codes enter
//   the value product as read, and a row of ones sums both (no per-code multiply at all).
//   The m16n8k16 fragments (PTX ISA, "Matrix Fragments for mma.m16n8k16"), lane = 4g + t:
//     A rows g, g+8, k = 2t, 2t+1 (a0, a1) and 2t+8, 2t+9 (a2, a3); B k = 2t, 2t+1 (b0) and
//     2t+8, 2t+9 (b1), col g; C/D rows g, g+8, cols 2t, 2t+1.
//   Score MMA: A = the queries (row g = query g of the tile; rows g+8 zero), k = head dims mapped
//   onto what lane t loads (KD consecutive dims of position g of the n-tile; the masks' natural
//   pairs, dims (i, i+4) of a 32-bit word, sit at k = (2t, 2t+1)). The score accumulator of lane
//   (g, t) then holds positions 2t, 2t+1 of its n-tile for query g: exactly the B fragment P^T
//   of the value MMA (no shuffle). Value MMA: m-tile md = dims vd0 + 2 md (rows g: low nibbles of
//   byte md of the lane's value codes) and vd0 + 2 md + 1 (rows g+8: high nibbles); a byte
//   permute pairs the same byte of two positions into one register.
//
// ================================================================================================
// Work decomposition
// ================================================================================================
//   grid (KV x query tiles of 8 heads, S splits of `chunk` positions, R rows); NW warps per block,
//   warp w takes key blocks w, w + NW, ... of its chunk, keeps an online softmax per query
//   (Milakov & Gimelshein 2018; scores in the log2 domain), and the warps merge in a fixed order
//   in shared memory. A warp copies its next key block into shared memory (cp.async) before it
//   computes the current one, so a block's DRAM round trip overlaps a block's arithmetic (H100, 32k,
//   32 kv heads, batch 8: 506 -> 462 us, 88% -> 97% of copy). The split containing the row's last
//   positions also reads the float window (fp16 keys and values, the same two products). HD is a
//   template parameter (16, 32, 64, 96, 128): every offset inside a block is then a constant of
//   the instruction.
//   Programmatic dependent launch (common.cuh): a warp asks for its first key block before the PDL
//   wait when earlier steps quantized it (the query, the window and everything after come after the
//   wait), and the next kernel may launch once every block is past its loop (kernels.py
//   spread_shared_memory keeps its blocks from crowding onto a few SMs).

#include "common.cuh"
#include "attention_merge.cuh"

namespace kivi {

#ifndef KIVI_BLOCK
#define KIVI_BLOCK 128
#endif
#ifndef KIVI_GROUP
#define KIVI_GROUP 64
#endif
constexpr int RB = 32;          // positions a warp takes at a time (a tile)
constexpr int KB = KIVI_BLOCK;  // positions per quantized key block: whole tiles
constexpr int NW = 4;           // warps per block
// Blocks a SM the launch bounds promise: at 4 the compiler keeps to 128 registers and spills (60
// bytes); at 2 it takes 176, spills nothing and moves fewer registers (about 830 instructions a
// block of 32 positions instead of 874). kernels.py compiles 2 when the grid fits in two a SM
// (few kv heads x rows: batch 1), where the third and fourth slots would hold nothing anyway;
// H100, 8 kv heads, batch 1, 32k: 19.4 -> 17.9 us (bench/NOTES.md session 21).
#ifndef KIVI_MIN_BLOCKS
#define KIVI_MIN_BLOCKS 4
#endif
constexpr bool TWO_CHAINS = KIVI_MIN_BLOCKS <= 2;  // the score products' chains split (below)
static_assert(KB % RB == 0, "a key block is whole tiles");

template <int HD> struct Shape {
    static constexpr int HDP = HD <= 64 ? 64 : 128;  // head_dim padded: 4 key lanes x KD dims
    static constexpr int KD = HDP / 4;              // key dims of lane t
    static constexpr int KW = KD / 8;               // 32-bit words of key codes per lane and position
    static constexpr int KSTEPS = HDP / 16;         // k16 steps of the score product
    static constexpr int VD = HDP / 8;              // value dims of lane g
    static constexpr int VW = VD / 8;               // 32-bit words of value codes per lane and position
    static constexpr int MT = HDP / 16;             // m-tiles of the value product (16 dims each)
    // value group (kvcache.int4_group); an instance whose head_dim the group does not divide into at
    // most 4 is never launched with this layout (HD is then a stand-in that compiles)
    static constexpr int GROUP = HD % KIVI_GROUP == 0 && HD / KIVI_GROUP <= 4 ? KIVI_GROUP : HD;
    static constexpr int NG = HD / GROUP;           // value groups per head (<= 4: B's columns, below)
    static_assert(NG <= 4, "the MHA product's B columns hold 2 NG sums");
};

__device__ __forceinline__ uint32_t h2mul(uint32_t a, uint32_t b) {
    __half2 r = __hmul2(*reinterpret_cast<__half2*>(&a), *reinterpret_cast<__half2*>(&b));
    return *reinterpret_cast<uint32_t*>(&r);
}

__device__ __forceinline__ uint32_t h2fma(uint32_t a, uint32_t b, uint32_t c) {
    __half2 r = __hfma2(*reinterpret_cast<__half2*>(&a), *reinterpret_cast<__half2*>(&b),
                        *reinterpret_cast<__half2*>(&c));
    return *reinterpret_cast<uint32_t*>(&r);
}

__device__ __forceinline__ uint32_t h2pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
}

__device__ __forceinline__ uint32_t h2pack(__half lo, __half hi) {
    __half2 h = __halves2half2(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
}

constexpr uint32_t LO_MASK = 0x000F000Fu, HI_MASK = 0x00F000F0u;
constexpr uint32_t LO_EXP = 0x64006400u;  // half2(1024, 1024): the low nibble reads 1024 + c
constexpr uint32_t HI_EXP = 0x54005400u;  // half2(64, 64): bits 4-7 read 64 + c

// N 32-bit words from an address aligned to 4N bytes (the warp's stage in shared memory), in one access.
template <int N>
__device__ __forceinline__ void read_words(const uint8_t* p, uint32_t* w) {
    if constexpr (N == 4) {
        const uint4 x = *reinterpret_cast<const uint4*>(p);
        w[0] = x.x, w[1] = x.y, w[2] = x.z, w[3] = x.w;
    } else if constexpr (N == 2) {
        const uint2 x = *reinterpret_cast<const uint2*>(p);
        w[0] = x.x, w[1] = x.y;
    } else {
        w[0] = *reinterpret_cast<const uint32_t*>(p);
    }
}

template <int HD, bool MHA>
__device__ __forceinline__ void attn_int4(const __half* __restrict__ q, const uint8_t* __restrict__ kq,
                                          const uint8_t* __restrict__ vq, const __half* __restrict__ ks,
                                          const __half* __restrict__ kz, const __half* __restrict__ vs,
                                          const __half* __restrict__ vz, const __half* __restrict__ wk,
                                          const __half* __restrict__ wv, const int* __restrict__ pos, int T, int H,
                                          int KV, int L, int chunk, int window, float qscale,
                                          float* __restrict__ part_acc, float* __restrict__ part_m,
                                          float* __restrict__ part_l, int* __restrict__ counter,
                                          __half* __restrict__ out, int ld_out) {
    using S = Shape<HD>;
    constexpr int HDP = S::HDP, KD = S::KD, KW = S::KW, KSTEPS = S::KSTEPS, VD = S::VD, VW = S::VW, MT = S::MT;
    constexpr int GROUP = S::GROUP, NG = S::NG, ROWB = HD / 2;  // bytes of codes per position
    // A warp's next key block lands in shared memory while it computes on the current one (cp.async,
    // two stages a warp, below): its key codes, value codes, key scales and zero points (HD each)
    // and its values' (NG a position), each as it lies in the cache. Once the loop is done the same
    // bytes hold sm_acc and the merge's weights (41 KB in all at head_dim 128).
    constexpr int KEYB = RB * ROWB, VALB = RB * ROWB, KSB = 2 * HD, VSB = 2 * RB * NG;
    constexpr int STAGE = KEYB + VALB + 2 * KSB + 2 * VSB, ACCB = 4 * NW * 8 * (HDP + ACC_PAD);
    constexpr int ENDB = ACCB + 4 * MAX_MERGE;
    __shared__ __align__(16) uint8_t smem[2 * NW * STAGE > ENDB ? 2 * NW * STAGE : ENDB];
    auto sm_acc = reinterpret_cast<float (*)[8][HDP + ACC_PAD]>(smem);
    float* const sm_w = reinterpret_cast<float*>(smem + ACCB);
    __shared__ float sm_m[NW][8], sm_l[NW][8];

    const int G = H / KV, qtiles = (G + 7) / 8;
    const int kvh = blockIdx.x / qtiles, qt = blockIdx.x % qtiles;
    const int split = blockIdx.y, nsplit = gridDim.y, r = blockIdx.z;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    // This lane's query head (A row g of the score product) among the G; with one query head per
    // key/value head (MHA) every row holds it, so every lane has the softmax weights.
    const int qi = MHA ? 0 : qt * 8 + g;
    const RowSpan span = row_span(pos, r, T, window, split, nsplit, chunk);
    const int b = span.b, len = span.len, c0 = span.c0, c1 = span.c1;
    const int qlen = (len / KB) * KB;  // positions read quantized (the rest: the window)
    const int qend = min(c1, qlen);
    const size_t bk = (size_t)b * KV + kvh;
    const int nb = (L + KB - 1) / KB;  // key blocks (of scales) a row of the cache holds
    const int kd0 = KD * t, vd0 = VD * g;  // the lane's first key dim, first value dim
    const bool k_in = kd0 < HD, v_in = vd0 < HD;  // HD % KD == HD % VD == 0: a lane is all in or out

    // A block's codes and scales copied into the warp's stage (cp.async, 16 bytes a copy), the lanes
    // taking consecutive pieces; each lane then reads its own words out of the stage (below).
    constexpr int KP = KSB / 16, VP = VSB / 16;
    const __half* const ksrc = (lane < KP ? ks : kz) + 8 * (lane % KP);  // this lane's scale pieces
    const __half* const vsrc = (lane < VP ? vs : vz) + 8 * (lane % VP);
    auto stage_in = [&](int blk, uint8_t* st) {
        const size_t row0 = bk * L + (size_t)blk * RB;
        // the block's codes: RB rows of ROWB bytes each, contiguous, in 16-byte pieces (HD of them)
        const uint8_t* const kp = kq + row0 * ROWB;
        const uint8_t* const vp = vq + row0 * ROWB;
#pragma unroll
        for (int c = lane; c < HD; c += 32) {
            cp_async16(st + 16 * c, kp + 16 * c);
            cp_async16(st + KEYB + 16 * c, vp + 16 * c);
        }
        // 16-byte pieces: the key scales and zeros (2 KP <= 32 of them), then the values' (2 VP <= 32)
        if (lane < 2 * KP) cp_async16(st + KEYB + VALB + 16 * lane, ksrc + (bk * nb + blk / (KB / RB)) * HD);
        if (lane < 2 * VP) cp_async16(st + KEYB + VALB + 2 * KSB + 16 * lane, vsrc + row0 * NG);
    };
    const int first = c0 / RB + warp;
    uint8_t* st = smem + 2 * warp * STAGE;  // the warp's two stages, taken in turn
    uint8_t* st_next = st + STAGE;
    // PDL (common.cuh): the key blocks that earlier steps quantized, those below the block of the
    // row's first new position pos[b], are not written by this step's kernels (the append before
    // this one flushes that block at the earliest), so a warp asks for its first such block before
    // the wait: its DRAM round trip overlaps the end of the kernel before (in a run of attention
    // calls, that call's merge; as attention.cu's PRE). The query and the window come after it.
    const int cached = (pos[b] / KB) * KB;
    const bool early = first * RB < min(qend, cached);
    if (early) stage_in(first, st);
    pdl_begin();
    TIMELINE(8);
    if (!early && first * RB < qend) stage_in(first, st);
    cp_async_commit();

    // The query at this lane's key dims as the score product's A fragments, step s: dims
    // 8(s/2) + 2(s%2) + {0, 4} (a0, matching the low nibbles) and + {1, 5} (a2, high nibbles).
    uint32_t qa0[KSTEPS], qa2[KSTEPS];
    {
        float qf[KD];
#pragma unroll
        for (int i = 0; i < KD; i += 8) {
            float tmp[8];
            const bool in = qi < G && k_in;
            if (in) half8_to_float(*reinterpret_cast<const uint4*>(q + ((size_t)r * H + kvh * G + qi) * HD + kd0 + i), tmp);
#pragma unroll
            for (int j = 0; j < 8; j++) qf[i + j] = in ? tmp[j] : 0.0f;
        }
#pragma unroll
        for (int s = 0; s < KSTEPS; s++) {
            const int d = 8 * (s >> 1) + 2 * (s & 1);
            qa0[s] = h2pack(qf[d], qf[d + 4]);
            qa2[s] = h2pack(qf[d + 1], qf[d + 5]);
        }
    }

    float acc[MT][4], zacc[4] = {0.0f, 0.0f, 0.0f, 0.0f};  // zacc: rows g = value group g
#pragma unroll
    for (int md = 0; md < MT; md++)
#pragma unroll
        for (int e = 0; e < 4; e++) acc[md][e] = 0.0f;
    float m = NEG_INF, l = 0.0f;  // of query g (the score layout)

    // One online-softmax step over this lane's 8 scores (positions nt * 8 + 2t + e): updates m, l,
    // rescales the accumulators, and returns P as the value product's B fragments (k-tile i:
    // b[i][0] positions 16i + 2t, +1; b[i][1] positions 16i + 8 + 2t, +1).
    auto softmax = [&](const float (&sc)[4][2], uint32_t (&bp)[2][2]) {
        float p[4][2];
        const float corr = online_softmax_step(sc, m, l, p);
        // The accumulator columns are queries 2t and 2t + 1: their factors come from those lanes.
        // Once the maxima settle, most steps change none of them: the rescale is skipped then.
        if (__any_sync(FULL_MASK, corr != 1.0f)) {
            const float f0 = MHA ? corr : __shfl_sync(FULL_MASK, corr, 8 * t);
            const float f1 = MHA ? corr : __shfl_sync(FULL_MASK, corr, 8 * t + 4);
#pragma unroll
            for (int md = 0; md < MT; md++) {
                acc[md][0] *= f0, acc[md][2] *= f0;
                acc[md][1] *= f1, acc[md][3] *= f1;
            }
            zacc[0] *= f0, zacc[1] *= f1;
        }
#pragma unroll
        for (int i = 0; i < 2; i++) {
            bp[i][0] = h2pack(p[2 * i][0], p[2 * i][1]);
            bp[i][1] = h2pack(p[2 * i + 1][0], p[2 * i + 1][1]);
        }
    };

    // ---------------------------------------------------------------------------------------------
    // Quantized blocks
    // ---------------------------------------------------------------------------------------------
    const int zsrc = 4 * min(g * GROUP / VD, 7) + t;  // the lane holding group g's value scales
    for (int blk = first; blk * RB < qend; blk += NW) {
        const int j0 = blk * RB;
        // Ask for the next block (into the other stage, which every lane finished reading in the
        // previous step), then wait for this one: one group in flight while this block is computed.
        __syncwarp();
        if ((blk + NW) * RB < qend) stage_in(blk + NW, st_next);
        cp_async_commit();  // (an empty group past the end: the wait below stays the same)
        cp_async_wait_prior<1>();
        __syncwarp();  // the scales were copied by other lanes
        if (blk == first) TIMELINE(1);
        const uint8_t* const st_scales = st + KEYB + VALB;  // ks, kz [HD] then vs, vz [RB][NG]
        // The block's codes, read from the stage where they are used (fewer registers held): keys of
        // n-tile nt; values of k-tile i (positions 16i + 2t + {0, 1, 8, 9}).
        auto key_words = [&](int nt, uint32_t (&kw)[KW]) {
            if (k_in) read_words<KW>(st + (nt * 8 + g) * ROWB + kd0 / 2, kw);
            else
#pragma unroll
                for (int w = 0; w < KW; w++) kw[w] = 0u;
        };
        auto value_words = [&](int i, uint32_t (&vw)[4][VW]) {
#pragma unroll
            for (int k = 0; k < 4; k++) {
                if (v_in) read_words<VW>(st + KEYB + (16 * i + 2 * t + (k & 1) + 8 * (k >> 1)) * ROWB + vd0 / 2, vw[k]);
                else
#pragma unroll
                    for (int w = 0; w < VW; w++) vw[k][w] = 0u;
            }
        };
        // The key scales and zeros of the lane's KD channels, and its values' of the lane's group at
        // the four positions.
        uint32_t sw[KD / 2], zw[KD / 2];
        __half vsc[2][4], vzr[2][4];
        {
#pragma unroll
            for (int i = 0; i < KD / 8; i++) {
                const uint4 a = k_in ? reinterpret_cast<const uint4*>(st_scales + 2 * kd0)[i] : make_uint4(0, 0, 0, 0);
                const uint4 c = k_in ? reinterpret_cast<const uint4*>(st_scales + KSB + 2 * kd0)[i] : make_uint4(0, 0, 0, 0);
                sw[4 * i] = a.x, sw[4 * i + 1] = a.y, sw[4 * i + 2] = a.z, sw[4 * i + 3] = a.w;
                zw[4 * i] = c.x, zw[4 * i + 1] = c.y, zw[4 * i + 2] = c.z, zw[4 * i + 3] = c.w;
            }
            // MHA: the group of this lane's B column (below); else that of its value dims
            const int vg = MHA ? (g < NG ? g : g < 2 * NG ? g - NG : 0) : (v_in ? vd0 / GROUP : 0);
            const __half* vsp = reinterpret_cast<const __half*>(st_scales + 2 * KSB);
#pragma unroll
            for (int i = 0; i < 2; i++)
#pragma unroll
                for (int k = 0; k < 4; k++) {
                    const int dj = 16 * i + (k & 1) + 8 * (k >> 1);
                    vsc[i][k] = vsp[(2 * t + dj) * NG + vg];
                    vzr[i][k] = vsp[RB * NG + (2 * t + dj) * NG + vg];
                }
        }

        // q' = q s for this block (a0 / a2 of the score product) and the bias product: B column
        // g < 4 holds the zero points, g >= 4 the nibble offsets, in the order the codes take.
        // (rows g + 8 of A are zero: kept as registers of the fragment, so the four sit together)
        // TWO_CHAINS (the build for two blocks a SM): each chain of products is summed in two
        // accumulators (even and odd steps) and the bias subtracted at the end, so no product waits
        // on more than half a chain or on the bias. With two blocks a SM a warp's instructions
        // mostly wait on the one before (ncu, 8 kv heads, batch 1: "wait" the largest stall, 1.35
        // of 4.4 cycles an instruction), and the halves and the bias overlap (H100, 32k: 17.9 ->
        // 17.1-17.3 us). In the 128-register build the extra accumulators cost more than they give
        // (32 kv heads, batch 1: 59.4 -> 60.4 us; the 7B step 2328 -> 2369), so each score there
        // starts at minus the bias and takes its 8 products in a row, after the bias's 8.
        uint32_t af[KSTEPS][4];
        float bias;
        {
            float d[4] = {0.0f, 0.0f, 0.0f, 0.0f}, d2[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
            for (int s = 0; s < KSTEPS; s++) {
                const int w = 4 * (s >> 1) + (s & 1);  // the words holding dims d, d + 1 and d + 4, d + 5
                af[s][0] = h2mul(qa0[s], __byte_perm(sw[w], sw[w + 2], 0x5410));
                af[s][2] = h2mul(qa2[s], __byte_perm(sw[w], sw[w + 2], 0x7632));
                af[s][1] = af[s][3] = 0u;
                const uint32_t z0 = __byte_perm(zw[w], zw[w + 2], 0x5410), z1 = __byte_perm(zw[w], zw[w + 2], 0x7632);
                mma_m16n8k16(TWO_CHAINS && (s & 1) ? d2 : d, af[s][0], af[s][1], af[s][2], af[s][3], g < 4 ? z0 : LO_EXP,
                             g < 4 ? z1 : HI_EXP);
            }
            const float zo = TWO_CHAINS ? d[0] + d2[0] : d[0];
            bias = __shfl_sync(FULL_MASK, zo, lane & ~3) + __shfl_sync(FULL_MASK, zo, (lane & ~3) | 2);
        }

        float sc[4][2];
        const bool whole = j0 >= c0 && j0 + RB <= qend;  // warp-uniform: no position to mask
#pragma unroll
        for (int nt = 0; nt < 4; nt++) {
            float d[4] = {TWO_CHAINS ? 0.0f : -bias, TWO_CHAINS ? 0.0f : -bias, 0.0f, 0.0f};
            float d2[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            uint32_t kw[KW];
            key_words(nt, kw);
#pragma unroll
            for (int w = 0; w < KW; w++) {
                const uint32_t x = kw[w], y = x >> 8;  // nibbles (0, 4), (1, 5) of x; (2, 6), (3, 7) of y
                const uint32_t* a = af[2 * w];
                const uint32_t* c = af[2 * w + 1];
                mma_m16n8k16(d, a[0], a[1], a[2], a[3], and_or(x, LO_MASK, LO_EXP), and_or(x, HI_MASK, HI_EXP));
                mma_m16n8k16(TWO_CHAINS ? d2 : d, c[0], c[1], c[2], c[3], and_or(y, LO_MASK, LO_EXP), and_or(y, HI_MASK, HI_EXP));
            }
#pragma unroll
            for (int e = 0; e < 2; e++) {
                const int j = j0 + nt * 8 + 2 * t + e;
                sc[nt][e] = whole || (j >= c0 && j < qend) ? (TWO_CHAINS ? (d[e] + d2[e]) - bias : d[e]) * qscale : NEG_INF;
            }
        }
        uint32_t bp[2][2];
        softmax(sc, bp);
        // The value codes of m-tile md, k-tile i, as the product reads them: 64 + c (low nibbles
        // shifted up to bits 4-7) for rows g / g + 8 and positions (2t, 2t+1) / (2t+8, 2t+9).
        auto value_codes = [&](const uint32_t (&vw)[4][VW], int md, uint32_t (&a)[4]) {
            const int u = md >> 2, bt = md & 3;  // word, byte of the lane's value codes
            const uint32_t sel = bt | (bt << 4) | ((4 + bt) << 8) | ((4 + bt) << 12);
            const uint32_t x01 = __byte_perm(vw[0][u], vw[1][u], sel);
            const uint32_t x23 = __byte_perm(vw[2][u], vw[3][u], sel);
            a[0] = and_or(x01 << 4, HI_MASK, HI_EXP), a[1] = and_or(x01, HI_MASK, HI_EXP);
            a[2] = and_or(x23 << 4, HI_MASK, HI_EXP), a[3] = and_or(x23, HI_MASK, HI_EXP);
        };
        if constexpr (MHA) {
            // One query: B's eight columns are free for the value groups. Column c < NG takes
            // p s_c, column NG + c takes p s_c z_c; A is the codes as read (64 + c), so row d,
            // column group(d) accumulates sum p s (64 + c), and a row of ones (lanes g = 0 of
            // zacc's A) gives sum p s and sum p s z per group: the end subtracts 64 times the
            // first and the second. No per-code multiply at all.
#pragma unroll
            for (int i = 0; i < 2; i++) {
                uint32_t vw[4][VW];
                value_words(i, vw);
                uint32_t s01 = h2pack(vsc[i][0], vsc[i][1]), s23 = h2pack(vsc[i][2], vsc[i][3]);
                if (g >= NG) {
                    s01 = g < 2 * NG ? h2mul(s01, h2pack(vzr[i][0], vzr[i][1])) : 0u;
                    s23 = g < 2 * NG ? h2mul(s23, h2pack(vzr[i][2], vzr[i][3])) : 0u;
                }
                const uint32_t b0 = h2mul(bp[i][0], s01), b1 = h2mul(bp[i][1], s23);
#pragma unroll
                for (int md = 0; md < MT; md++) {
                    uint32_t a[4];
                    value_codes(vw, md, a);
                    mma_m16n8k16(acc[md], a[0], a[1], a[2], a[3], b0, b1);
                }
                const uint32_t ones = g == 0 ? 0x3C003C00u : 0u;  // half2(1, 1) in row 0
                mma_m16n8k16(zacc, ones, 0u, ones, 0u, b0, b1);
            }
        } else {
#pragma unroll
        for (int i = 0; i < 2; i++) {
            uint32_t vw[4][VW];
            value_words(i, vw);
            // scale pairs of positions (2t, 2t+1) and (2t+8, 2t+9), and minus 64 times them
            const uint32_t s01 = h2pack(vsc[i][0], vsc[i][1]), s23 = h2pack(vsc[i][2], vsc[i][3]);
            const uint32_t m01 = h2mul(s01, 0xD400D400u), m23 = h2mul(s23, 0xD400D400u);  // half2(-64, -64)
#pragma unroll
            for (int md = 0; md < MT; md++) {
                uint32_t a[4];
                value_codes(vw, md, a);
                mma_m16n8k16(acc[md], h2fma(a[0], s01, m01), h2fma(a[1], s01, m01), h2fma(a[2], s23, m23),
                             h2fma(a[3], s23, m23), bp[i][0], bp[i][1]);
            }
            // the zero points' sums: A row g = value group g, s z of the four positions
            const uint32_t sz01 = h2mul(s01, h2pack(vzr[i][0], vzr[i][1]));
            const uint32_t sz23 = h2mul(s23, h2pack(vzr[i][2], vzr[i][3]));
            const uint32_t za0 = __shfl_sync(FULL_MASK, sz01, zsrc), za2 = __shfl_sync(FULL_MASK, sz23, zsrc);
            mma_m16n8k16(zacc, g < NG ? za0 : 0u, 0u, g < NG ? za2 : 0u, 0u, bp[i][0], bp[i][1]);
        }
        }
        uint8_t* const done = st;  // the next block is in the other stage; this one takes the one after
        st = st_next;
        st_next = done;
    }

    // ---------------------------------------------------------------------------------------------
    // The float window: the row's own, incomplete block (fewer than KB positions), a tile of 32
    // positions a warp (the first to the last warp, which has the fewest quantized tiles)
    // ---------------------------------------------------------------------------------------------
    for (int wt = NW - 1 - warp; qlen + RB * wt < c1; wt += NW) {
        const int jb = qlen + RB * wt;  // the tile's first position
        if (jb + RB <= c0) continue;
        float sc[4][2];
#pragma unroll
        for (int nt = 0; nt < 4; nt++) {
            const int j = jb + nt * 8 + g;
            const __half* krow = wk + (bk * KB + j % KB) * HD + kd0;
            float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
            for (int w = 0; w < KD / 8; w++) {
                const uint4 x = k_in ? *reinterpret_cast<const uint4*>(krow + 8 * w) : make_uint4(0, 0, 0, 0);
#pragma unroll
                for (int p = 0; p < 2; p++) {  // dims (8w + 2p, +4) and (8w + 2p + 1, +5), as the codes
                    const uint32_t lo = p ? x.y : x.x, hi = p ? x.w : x.z;
                    mma_m16n8k16(d, qa0[2 * w + p], 0u, qa2[2 * w + p], 0u, __byte_perm(lo, hi, 0x5410),
                                 __byte_perm(lo, hi, 0x7632));
                }
            }
#pragma unroll
            for (int e = 0; e < 2; e++) {
                const int jj = jb + nt * 8 + 2 * t + e;
                sc[nt][e] = jj >= c0 && jj < c1 ? d[e] * qscale : NEG_INF;
            }
        }
        uint32_t bp[2][2];
        softmax(sc, bp);
#pragma unroll
        for (int i = 0; i < 2; i++) {
            uint32_t x[4][VD / 2];  // the lane's VD values of each position, as pairs
#pragma unroll
            for (int k = 0; k < 4; k++) {  // positions 16i + 2t + {0, 1, 8, 9}
                const int j = jb + 16 * i + 2 * t + (k & 1) + 8 * (k >> 1);
                const bool ok = v_in && j < c1;  // slots past the length may hold anything
                const __half* row = wv + (bk * KB + j % KB) * HD + vd0;
#pragma unroll
                for (int w = 0; w < VD / 2; w++) x[k][w] = ok ? reinterpret_cast<const uint32_t*>(row)[w] : 0u;
            }
#pragma unroll
            for (int md = 0; md < MT; md++)  // dims vd0 + 2 md (rows g), vd0 + 2 md + 1 (rows g + 8)
                mma_m16n8k16(acc[md], __byte_perm(x[0][md], x[1][md], 0x5410), __byte_perm(x[0][md], x[1][md], 0x7632),
                             __byte_perm(x[2][md], x[3][md], 0x5410), __byte_perm(x[2][md], x[3][md], 0x7632),
                             !MHA || g < NG ? bp[i][0] : 0u, !MHA || g < NG ? bp[i][1] : 0u);  // MHA: the group columns
        }
    }

    // ---------------------------------------------------------------------------------------------
    // The zero points' sums subtracted; the warps' results merged in warp order, written as this
    // split's partials, then the splits
    // ---------------------------------------------------------------------------------------------
    l += __shfl_xor_sync(FULL_MASK, l, 1);
    l += __shfl_xor_sync(FULL_MASK, l, 2);
    cp_async_wait_prior<0>();  // (nothing is left in flight: the last group was empty)
    __syncthreads();  // sm_acc is the stages' memory: every warp is past its loop
    // The next kernel may launch now (common.cuh pdl_trigger): o_proj loads its weights, a next
    // attention call its first key blocks, during this merge. (kernels.py spreads the grid so that
    // those blocks cannot crowd onto a few SMs.)
    pdl_trigger();
    TIMELINE(2);
    if (t == 0) {
        sm_m[warp][g] = m;
        sm_l[warp][g] = l;
    }
    if constexpr (MHA) {
        // column group(d) of row d, in lane t = group / 2; the sums of the ones row in lanes g = 0
        const int grp = v_in ? vd0 / GROUP : 0, e = grp & 1, ze = (NG + grp) & 1;
        const float s0 = __shfl_sync(FULL_MASK, zacc[0], grp / 2), s1 = __shfl_sync(FULL_MASK, zacc[1], grp / 2);
        const float z0 = __shfl_sync(FULL_MASK, zacc[0], (NG + grp) / 2), z1 = __shfl_sync(FULL_MASK, zacc[1], (NG + grp) / 2);
        const float sub = 64.0f * (e ? s1 : s0) + (ze ? z1 : z0);
        if (t == grp / 2) {  // dims vd0 + 2 md (column e of acc[md]'s rows g) and + 1 (rows g + 8)
            auto v = [&](int md, int hi) { return (e ? acc[md][1 + hi] : acc[md][hi]) - sub; };
#pragma unroll
            for (int k = 0; k < MT / 2; k++)
                *reinterpret_cast<float4*>(&sm_acc[warp][0][vd0 + 4 * k]) =
                    make_float4(v(2 * k, 0), v(2 * k, 2), v(2 * k + 1, 0), v(2 * k + 1, 2));
        }
    } else {
    const int zlane = 4 * (v_in ? vd0 / GROUP : 0) + t;  // holds this lane's group's sums
    const float zq0 = __shfl_sync(FULL_MASK, zacc[0], zlane), zq1 = __shfl_sync(FULL_MASK, zacc[1], zlane);
    // acc[md]: dims vd0 + 2 md (columns 0, 1: queries 2t, 2t + 1) and vd0 + 2 md + 1 (2, 3)
#pragma unroll
    for (int k = 0; k < MT / 2; k++) {
        *reinterpret_cast<float4*>(&sm_acc[warp][2 * t][vd0 + 4 * k]) =
            make_float4(acc[2 * k][0] - zq0, acc[2 * k][2] - zq0, acc[2 * k + 1][0] - zq0, acc[2 * k + 1][2] - zq0);
        *reinterpret_cast<float4*>(&sm_acc[warp][2 * t + 1][vd0 + 4 * k]) =
            make_float4(acc[2 * k][1] - zq1, acc[2 * k][3] - zq1, acc[2 * k + 1][1] - zq1, acc[2 * k + 1][3] - zq1);
    }
    }
    __syncthreads();
    write_tile_partials<NW, HDP + ACC_PAD>(sm_acc, sm_m, sm_l, r, H, kvh, G, qt, split, nsplit, HD, part_acc, part_m, part_l);
    merge_splits_tc<32 * NW, 16, false>(r, H, KV, kvh, G, nsplit, nsplit * qtiles, len, span.chunk, HD, part_acc,
                                        part_m, part_l, counter, out, ld_out, nullptr, sm_w);
}

}  // namespace kivi

#define ATTN_INT4(NAME, HD, MHA)                                                                               \
    extern "C" __global__ void __launch_bounds__(32 * kivi::NW, KIVI_MIN_BLOCKS) NAME(                         \
        const __half* q, const uint8_t* kq, const uint8_t* vq, const __half* ks, const __half* kz,                 \
        const __half* vs, const __half* vz, const __half* wk, const __half* wv, const int* pos, int T, int H,      \
        int KV, int L, int chunk, int window, float qscale, float* part_acc, float* part_m, float* part_l,        \
        int* counter, __half* out, int ld_out) {                                                               \
        TIMELINE(0);                                                                                           \
        kivi::attn_int4<HD, MHA>(q, kq, vq, ks, kz, vs, vz, wk, wv, pos, T, H, KV, L, chunk, window, qscale, part_acc, \
                            part_m, part_l, counter, out, ld_out);                                             \
    }

ATTN_INT4(attn_int4_hd16, 16, false)
ATTN_INT4(attn_int4_hd16_mha, 16, true)
ATTN_INT4(attn_int4_hd32, 32, false)
ATTN_INT4(attn_int4_hd32_mha, 32, true)
ATTN_INT4(attn_int4_hd64, 64, false)
ATTN_INT4(attn_int4_hd64_mha, 64, true)
ATTN_INT4(attn_int4_hd96, 96, false)
ATTN_INT4(attn_int4_hd96_mha, 96, true)
ATTN_INT4(attn_int4_hd128, 128, false)
ATTN_INT4(attn_int4_hd128_mha, 128, true)
