// Decode attention over the KV cache, split along the sequence ("split-K", as FlashDecoding), for
// every cache format: fp16, int8 and fp8 (E4M3) codes with one scale per (token, head). Quantized
// values are dequantized in registers; the cache is read once, in its own bytes.
//
// ================================================================================================
// Layout
// ================================================================================================
//   q        fp16 [R, H, hd], rotated; R rows = batch * new tokens, row r = (b, t) = (r / T, r % T)
//   cache    [B, KV, L, hd] (fp16, int8 or fp8 codes); scales float [B, KV, L] for int8 / fp8
//   pos      int [B] in device memory: positions cached before this step. Row r attends to
//            positions [lo, pos[b] + t] (lo > 0 only for a sliding window): causal for any T.
//   partials part_acc float [R, H, S, hd], part_m / part_l float [R, H, S]: for each split s, the
//            unnormalised sum sum_j 2^(x_j - m) v_j, its running max m and sum l = sum_j 2^(x_j - m)
//   out      fp16 [R, ld] with head h at columns h*hd .. h*hd + hd - 1 (the input of o_proj)
//
// ================================================================================================
// Work decomposition
// ================================================================================================
//   grid (KV, S, R): a block takes one key/value head, one chunk of `chunk` positions and one row.
//   Its warps = G query heads (the heads sharing this key/value head, G = H / KV) x W token streams;
//   each warp splits into groups of GROUP lanes, and a group takes one position at a time: every
//   lane loads 16 bytes of the row (8 fp16 values, or 16 int8 / E4M3 codes), so a group of 16
//   (fp16) or 8 (8-bit) lanes reads a 128-value row contiguously and a warp handles 2 or 4
//   positions at once. The query heads of a group read the same rows, which the block's other
//   warps have just brought into L1: DRAM sees each row once.
//   Each group keeps an online softmax (Milakov & Gimelshein 2018): U positions are loaded before
//   any is used (keys and values both), so 2U 16-byte loads per lane are in flight; scores are
//   reduced over the group's lanes with shuffles and kept in the log2 domain (q is pre-scaled by
//   log2(e) / sqrt(hd), so exp2f does the exponentials). FP8 codes are widened by the hardware
//   (cvt.rn.f16x2.e4m3x2, sm_89+), int8 by a byte permute and one float subtraction (the integer
//   conversion instruction has a quarter of the throughput, and was the bottleneck); scales multiply the score
//   and the softmax weight, once per position, not every value.
//   At the end the groups of each query head merge through shared memory, and the last block of a
//   (row, key/value head) to finish (an atomic counter) merges the S splits with the same rule:
//       m = max_s m_s,   l = sum_s l_s 2^(m_s - m),   out = sum_s acc_s 2^(m_s - m) / l
//   The cluster instances (fp16, many heads) launch the 8 splits of a (row, key/value head) as one
//   thread-block cluster instead: blocks 1-7 store their results into block 0's shared memory
//   (distributed shared memory, st.async), and block 0 merges them by the same rule, with no global
//   partials, fence or counter.

#include "common.cuh"
#include "attention_merge.cuh"

#define KV_FP16 0
#define KV_INT8 1
#define KV_FP8 2

// Each lane loads 16 bytes of a cached row per step: 8 fp16 values, or 16 int8 / fp8 codes. A row of
// 128 values is then one 256-byte (fp16) or 128-byte (8-bit) contiguous read by a group of GROUP
// lanes, and a warp works on 32 / GROUP positions at once.
template <int FMT> struct Fmt {
    static constexpr int ELEMS = FMT == KV_FP16 ? 8 : 16;  // values per 16-byte load
    static constexpr int GROUP = 128 / ELEMS;               // lanes per position (128 values / step)
    static constexpr int UNROLL = FMT == KV_FP16 ? 4 : 4;   // positions per group loaded before use
};

// Two E4M3 codes (low byte first) to two halves with the hardware conversion (sm_89+).
__device__ __forceinline__ float2 e4m3x2_to_float2(uint32_t two) {
    uint32_t h2;
    asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(h2) : "h"((unsigned short)two));
    return __half22float2(*reinterpret_cast<__half2*>(&h2));
}

// Four 8-bit codes of a word (low byte first) to floats.
template <int FMT>
__device__ __forceinline__ void word_to_float(uint32_t w, float* x) {
    if (FMT == KV_INT8) {
        // int8 -> float without the slow integer conversion: flipping the sign bit gives q + 128 as
        // an unsigned byte; placed under the exponent of 2^23 (0x4B000000) it reads as the float
        // 2^23 + q + 128, and one subtraction leaves q.
        const uint32_t u = w ^ 0x80808080u;
#pragma unroll
        for (int b = 0; b < 4; b++) x[b] = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7440 + b)) - 8388736.0f;
    } else {
        const float2 lo = e4m3x2_to_float2(w & 0xffffu), hi = e4m3x2_to_float2(w >> 16);
        x[0] = lo.x;
        x[1] = lo.y;
        x[2] = hi.x;
        x[3] = hi.y;
    }
}

template <int FMT>
__device__ __forceinline__ void to_float(uint4 raw, float* x) {
    if (FMT == KV_FP16) {
        half8_to_float(raw, x);
    } else {
        const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
        for (int i = 0; i < 4; i++) word_to_float<FMT>(w[i], x + 4 * i);
    }
}

template <int GROUP>
__device__ __forceinline__ float group_sum(float v) {  // over the GROUP lanes of a position
#pragma unroll
    for (int o = GROUP / 2; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

#define MAX_PART 4096  // warps x head_dim floats of shared memory for the in-block merge

// The end of a split, for the kernels with one warp per query head: merge the block's groups of each
// head in a fixed order (no float atomics: the sum must not depend on which warp finishes first, or
// greedy decoding would vary from run to run) and write the split's partial result (acc, m, l). Each
// lane holds E values per 128-wide slice, ITERS slices; GROUP lanes share a position.
// TO_SMEM (the cluster kernels): the block's result per head goes to shared memory instead, part_acc
// [G * hd], part_m / part_l [G], for the cluster's merge.
template <int E, int ITERS, int GROUP, bool TO_SMEM = false>
__device__ __forceinline__ void write_split(float* acc, float m, float l, int hd, int G, int g, int stream, int r,
                                            int H, int kvh, int split, int nsplit, float* sm_part, float* sm_m,
                                            float* sm_lw, float* __restrict__ part_acc, float* __restrict__ part_m,
                                            float* __restrict__ part_l) {
    constexpr int PER_WARP = 32 / GROUP;
    const int NW = blockDim.x >> 5, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int grp = lane / GROUP, lig = lane % GROUP;
    if (lig == 0) sm_m[warp * PER_WARP + grp] = m;
    __syncthreads();
    float M = NEG_INF;
    for (int w = g; w < NW; w += G)
        for (int j = 0; j < PER_WARP; j++) M = fmaxf(M, sm_m[w * PER_WARP + j]);
    const float f = m == NEG_INF ? 0.0f : exp2f(m - M);
    l *= f;
#pragma unroll
    for (int i = 0; i < E * ITERS; i++) acc[i] *= f;
#pragma unroll
    for (int off = GROUP; off < 32; off <<= 1) {  // the warp's groups hold the same elements
        l += __shfl_xor_sync(FULL_MASK, l, off);
#pragma unroll
        for (int i = 0; i < E * ITERS; i++) acc[i] += __shfl_xor_sync(FULL_MASK, acc[i], off);
    }
    if (grp == 0) {
#pragma unroll
        for (int it = 0; it < ITERS; it++) {
            const int e = it * 128 + lig * E;
#pragma unroll
            for (int i = 0; i < E; i++)
                if (e + i < hd) sm_part[warp * hd + e + i] = acc[it * E + i];
        }
    }
    if (lane == 0) sm_lw[warp] = l;
    __syncthreads();
    const size_t part0 = ((size_t)r * H + kvh * G) * nsplit + split;  // (r, head kvh*G, split)
    for (int i = threadIdx.x; i < G * hd; i += blockDim.x) {
        const int gg = i / hd, e = i % hd;
        float sum = 0.0f;
        for (int w = gg; w < NW; w += G) sum += sm_part[w * hd + e];
        part_acc[TO_SMEM ? i : (part0 + (size_t)gg * nsplit) * hd + e] = sum;
    }
    if (lane == 0 && stream == 0) {  // one warp per query head writes its m and l
        float lsum = 0.0f;
        for (int w = g; w < NW; w += G) lsum += sm_lw[w];
        part_m[TO_SMEM ? g : part0 + (size_t)g * nsplit] = M;
        part_l[TO_SMEM ? g : part0 + (size_t)g * nsplit] = lsum;
    }
}

// The splits of a (row, key/value head) as the blocks of one thread-block cluster (CLUSTER blocks
// along y). Blocks 1..7 push their result (write_split<..., true>: acc, m, l) into block 0's shared
// memory with st.async, which counts the bytes on an mbarrier of block 0; block 0 waits for the
// count, merges with the rule of merge_splits and writes the output. Nothing goes through global
// memory, and no block waits on a memory fence or an atomic. (A cluster barrier with its
// release/acquire, then block 0 reading the others' shared memory, cost ~2.7 us at decode lengths:
// the release is a GPU-wide memory barrier; bench/NOTES.md.)
#define CLUSTER 8
#define MAX_CLUSTER_OUT 512  // G * hd floats of a block's result (kernels.py keeps below)

struct ClusterInbox {  // block 0's: the other blocks' results, and the mbarrier counting their bytes
    float acc[CLUSTER][MAX_CLUSTER_OUT];
    float m[CLUSTER][32], l[CLUSTER][32];  // G <= 32 (G * hd <= 512, hd >= 16)
    unsigned long long bar;
};

__device__ __forceinline__ ClusterInbox& cluster_inbox() {
    __shared__ ClusterInbox box;
    return box;
}

// At the kernel's start: block 0 readies its mbarrier, and every block arrives at the cluster
// barrier that the pushes wait on (so no byte reaches the mbarrier before it is initialised);
// arriving early and waiting at the end leaves the wait nothing to wait for.
__device__ __forceinline__ void cluster_inbox_open() {
    if (blockIdx.y % CLUSTER == 0 && threadIdx.x == 0) mbar_init(&cluster_inbox().bar, 1);
    __syncwarp();
    cluster_arrive_relaxed();
}

__device__ __forceinline__ void cluster_merge(int r, int H, int kvh, int G, int hd, const float* sm_acc,
                                              const float* sm_m, const float* sm_l, __half* __restrict__ out,
                                              int ld_out, const float* __restrict__ v_off) {
    ClusterInbox& box = cluster_inbox();
    const unsigned rank = blockIdx.y % CLUSTER;
    __syncthreads();  // this block's result is complete
    cluster_wait();   // block 0's mbarrier is ready
    if (rank != 0) {
        const unsigned bar = cluster_smem_addr(&box.bar, 0);
        for (int i = threadIdx.x; i < G * hd; i += blockDim.x) st_async(cluster_smem_addr(&box.acc[rank][i], 0), sm_acc[i], bar);
        for (int g = threadIdx.x; g < G; g += blockDim.x) {
            st_async(cluster_smem_addr(&box.m[rank][g], 0), sm_m[g], bar);
            st_async(cluster_smem_addr(&box.l[rank][g], 0), sm_l[g], bar);
        }
        return;  // (the values left with the instructions; nothing reads this block's memory)
    }
    if (threadIdx.x == 0) mbar_expect_tx(&box.bar, (CLUSTER - 1) * (G * hd + 2 * G) * 4);
    mbar_wait(&box.bar, 0);
    for (int i = threadIdx.x; i < G * hd; i += blockDim.x) {
        const int gg = i / hd, e = i % hd;
        float M = sm_m[gg];
#pragma unroll
        for (int s = 1; s < CLUSTER; s++) M = fmaxf(M, box.m[s][gg]);
        float sum = 0.0f, lsum = 0.0f;
#pragma unroll
        for (int s = 0; s < CLUSTER; s++) {
            const float ms = s ? box.m[s][gg] : sm_m[gg];
            const float f = ms == NEG_INF ? 0.0f : exp2f(ms - M);
            sum += f * (s ? box.acc[s][i] : sm_acc[i]);
            lsum += f * (s ? box.l[s][gg] : sm_l[gg]);
        }
        out[(size_t)r * ld_out + (kvh * G + gg) * hd + e] =
            __float2half(sum / lsum + (v_off ? v_off[(size_t)kvh * hd + e] : 0.0f));
    }
}

template <int FMT, int ITERS, bool PIPE, bool CL = false, int UN = Fmt<FMT>::UNROLL, bool PRE = false>
__device__ __forceinline__ void attn_decode(const __half* __restrict__ q, const void* __restrict__ kc,
                                            const void* __restrict__ vc, const float* __restrict__ k_scale,
                                            const float* __restrict__ v_scale, const int* __restrict__ pos, int T,
                                            int H, int KV, int hd, int L, int chunk, int window, float qscale,
                                            float* __restrict__ part_acc, float* __restrict__ part_m,
                                            float* __restrict__ part_l, int* __restrict__ counter,
                                            __half* __restrict__ out, int ld_out, const float* __restrict__ v_off) {
    constexpr int E = Fmt<FMT>::ELEMS, GROUP = Fmt<FMT>::GROUP, U = UN, PER_WARP = 32 / GROUP;
    constexpr int BYTES = FMT == KV_FP16 ? 2 : 1;
    __shared__ float sm_part[MAX_PART];  // a warp's partial sums (per head and warp: NW x hd)
    __shared__ float sm_m[32 * 4];
    __shared__ float sm_lw[32];
    const int kvh = blockIdx.x, split = blockIdx.y, nsplit = gridDim.y, r = blockIdx.z;
    const int G = H / KV, NW = blockDim.x >> 5, W = NW / G;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = warp % G, stream = warp / G, h = kvh * G + g;
    const int grp = lane / GROUP, lig = lane % GROUP;
    if constexpr (CL) cluster_inbox_open();
    const RowSpan span = CL ? cluster_span(pos, r, T, window, split) : row_span(pos, r, T, window, split, nsplit, chunk);
    const int b = span.b, len = span.len, c0 = span.c0, c1 = span.c1;
    const size_t bk = (size_t)b * KV + kvh;
    const char* kbase = reinterpret_cast<const char*>(kc);
    const char* vbase = reinterpret_cast<const char*>(vc);

    float m = NEG_INF, l = 0.0f;
    const int step = PER_WARP * W;  // positions covered by one pass of the block's warps of head g

    // PIPE (software pipelining): the keys and values of the next U positions are loaded while the
    // current ones are used, so a group always has loads in flight. The 8-bit formats spend about
    // as long on arithmetic per byte as on waiting for it; with many blocks (batch 8) the overlap
    // takes them from ~87% to ~98% of copy bandwidth, but the extra registers cost occupancy, and
    // with few blocks (batch 1) the plain loop is faster (bench/NOTES.md). The fp16 cluster instances
    // pipeline too: in the decode step their rounds after the PDL wait are on the step's critical
    // path (CLUSTER_INSTANCE below).
    uint4 kr[U][ITERS], vr[U][ITERS];
    float ks[U], vs[U];
    // part: 0 every position, 1 only those cached before this step, 2 only the others (PRE below).
    const int old = len - r % T - 1;  // positions [0, old) were cached by earlier steps
    auto load = [&](int jw, uint4 (&kk)[U][ITERS], uint4 (&vv)[U][ITERS], float* kss, float* vss, int part = 0) {
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int j = jw + grp + u * step;
            const int jj = j < c1 ? j : c0;
            if (part != 0 && (jj < old) != (part == 1)) continue;
            const size_t rowi = bk * L + jj;
#pragma unroll
            for (int it = 0; it < ITERS; it++) {
                const int e = it * 128 + lig * E;
                if (e < hd) {
                    kk[u][it] = *reinterpret_cast<const uint4*>(kbase + (rowi * hd + e) * BYTES);
                    vv[u][it] = *reinterpret_cast<const uint4*>(vbase + (rowi * hd + e) * BYTES);
                }
            }
            kss[u] = FMT == KV_FP16 ? 1.0f : k_scale[rowi];
            vss[u] = FMT == KV_FP16 ? 1.0f : v_scale[rowi];
        }
    };
    const int first = c0 + stream * PER_WARP;
    // PRE: the first positions' keys and values that earlier steps cached are loaded before the PDL
    // wait (the qkv product before this kernel writes only q and the step's new positions), so their
    // DRAM round trip overlaps the end of that product; the new positions and q come after it.
    if (PRE && first < c1) load(first, kr, vr, ks, vs, 1);
    if (PRE) pdl_begin();
    if (PRE && first < c1) load(first, kr, vr, ks, vs, 2);
    float qv[E * ITERS], acc[E * ITERS];
#pragma unroll
    for (int it = 0; it < ITERS; it++) {
        const int e = it * 128 + lig * E;
#pragma unroll
        for (int i = 0; i < E; i += 8) {
            float tmp[8];
            if (e + i < hd) half8_to_float(*reinterpret_cast<const uint4*>(q + ((size_t)r * H + h) * hd + e + i), tmp);
#pragma unroll
            for (int j = 0; j < 8; j++) qv[it * E + i + j] = e + i < hd ? tmp[j] * qscale : 0.0f;
        }
#pragma unroll
        for (int i = 0; i < E; i++) acc[it * E + i] = 0.0f;
    }
    if (PIPE && !PRE && first < c1) load(first, kr, vr, ks, vs);  // (PRE loaded them above)

    // Warp-uniform loop (the shuffles need all 32 lanes); each group checks its own positions.
    for (int jw = first; jw < c1; jw += step * U) {
        uint4 nk[U][ITERS], nv[U][ITERS];
        float nks[U], nvs[U];
        if (!PIPE && !(PRE && jw == first)) load(jw, kr, vr, ks, vs);
        else if (jw + step * U < c1) load(jw + step * U, nk, nv, nks, nvs);
        float score[U];
        float mu = m;
#pragma unroll
        for (int u = 0; u < U; u++) {
            float d = 0.0f;
#pragma unroll
            for (int it = 0; it < ITERS; it++) {
                if (it * 128 + lig * E < hd) {
                    float k8[E];
                    to_float<FMT>(kr[u][it], k8);
#pragma unroll
                    for (int i = 0; i < E; i++) d += qv[it * E + i] * k8[i];
                }
            }
            d = group_sum<GROUP>(d) * ks[u];  // q . (s k) = s (q . k)
            score[u] = jw + grp + u * step < c1 ? d : NEG_INF;
            mu = fmaxf(mu, score[u]);
        }
        if (mu != NEG_INF) {  // else no valid position for this group here (the shuffles are done)
            const float corr = exp2f(m - mu);
            l *= corr;
#pragma unroll
            for (int i = 0; i < E * ITERS; i++) acc[i] *= corr;
#pragma unroll
            for (int u = 0; u < U; u++) {
                const float p = exp2f(score[u] - mu);
                l += p;
                const float pv = p * vs[u];
#pragma unroll
                for (int it = 0; it < ITERS; it++) {
                    if (it * 128 + lig * E < hd) {
                        float v8[E];
                        to_float<FMT>(vr[u][it], v8);
#pragma unroll
                        for (int i = 0; i < E; i++) acc[it * E + i] += pv * v8[i];
                    }
                }
            }
            m = mu;
        }
        if (PIPE) {
#pragma unroll
            for (int u = 0; u < U; u++) {
#pragma unroll
                for (int it = 0; it < ITERS; it++) {
                    kr[u][it] = nk[u][it];
                    vr[u][it] = nv[u][it];
                }
                ks[u] = nks[u];
                vs[u] = nvs[u];
            }
        }
    }

    pdl_trigger();  // o_proj's blocks may launch and load their weights during the merge (common.cuh)
    if constexpr (CL) {
        __shared__ float sm_res[MAX_CLUSTER_OUT], sm_res_m[32], sm_res_l[32];
        write_split<E, ITERS, GROUP, true>(acc, m, l, hd, G, g, stream, r, H, kvh, split, nsplit, sm_part, sm_m,
                                           sm_lw, sm_res, sm_res_m, sm_res_l);
        cluster_merge(r, H, kvh, G, hd, sm_res, sm_res_m, sm_res_l, out, ld_out, v_off);
    } else {
        write_split<E, ITERS, GROUP>(acc, m, l, hd, G, g, stream, r, H, kvh, split, nsplit, sm_part, sm_m, sm_lw,
                                     part_acc, part_m, part_l);
        merge_splits(r, H, KV, kvh, G, nsplit, nsplit, len, span.chunk, hd, part_acc, part_m, part_l, counter, out,
                     ld_out, v_off);
    }
}

// Grouped-query heads (G = H / KV in 2, 4, 8; head_dim <= 128): one warp serves all G query heads of
// its key/value head, so each cached row is loaded and widened once and used G times. (The kernel
// above gives every query head its own warp; those warps find the rows in L1, but each converts
// them again, which made the 8-bit caches arithmetic-bound with grouped heads.) Groups of 16 lanes
// take 8 values each (16 bytes of fp16, 8 bytes of codes); the rest is as above.
template <int FMT> struct RawG { typedef uint2 type; };
template <> struct RawG<KV_FP16> { typedef uint4 type; };

template <int FMT>
__device__ __forceinline__ void widen8(typename RawG<FMT>::type raw, float* x);
template <> __device__ __forceinline__ void widen8<KV_FP16>(uint4 raw, float* x) { half8_to_float(raw, x); }
template <> __device__ __forceinline__ void widen8<KV_INT8>(uint2 raw, float* x) {
    word_to_float<KV_INT8>(raw.x, x);
    word_to_float<KV_INT8>(raw.y, x + 4);
}
template <> __device__ __forceinline__ void widen8<KV_FP8>(uint2 raw, float* x) {
    word_to_float<KV_FP8>(raw.x, x);
    word_to_float<KV_FP8>(raw.y, x + 4);
}

template <int FMT, int G>
__device__ __forceinline__ void attn_decode_gqa(const __half* __restrict__ q, const void* __restrict__ kc,
                                                const void* __restrict__ vc, const float* __restrict__ k_scale,
                                                const float* __restrict__ v_scale, const int* __restrict__ pos,
                                                int T, int H, int KV, int hd, int L, int chunk, int window,
                                                float qscale, float* __restrict__ part_acc,
                                                float* __restrict__ part_m, float* __restrict__ part_l,
                                                int* __restrict__ counter, __half* __restrict__ out, int ld_out,
                                                const float* __restrict__ v_off) {
    typedef typename RawG<FMT>::type RawT;
    constexpr int U = 4, BYTES = FMT == KV_FP16 ? 2 : 1;
    __shared__ float sm_part[4 * G * 128];  // per warp (4) and head
    __shared__ float sm_m[16 * G];
    __shared__ float sm_lw[4 * G];
    const int kvh = blockIdx.x, split = blockIdx.y, nsplit = gridDim.y, r = blockIdx.z;
    const int NW = blockDim.x >> 5, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int grp = lane >> 4, lig = lane & 15, e = lig * 8;
    const bool has = e < hd;
    const RowSpan span = row_span(pos, r, T, window, split, nsplit, chunk);
    const int b = span.b, len = span.len, c0 = span.c0, c1 = span.c1;
    const size_t bk = (size_t)b * KV + kvh;
    const char* kbase = reinterpret_cast<const char*>(kc);
    const char* vbase = reinterpret_cast<const char*>(vc);

    float qv[G][8], acc[G][8], m[G], l[G];
#pragma unroll
    for (int g = 0; g < G; g++) {
        float tmp[8];
        if (has) half8_to_float(*reinterpret_cast<const uint4*>(q + ((size_t)r * H + kvh * G + g) * hd + e), tmp);
#pragma unroll
        for (int i = 0; i < 8; i++) {
            qv[g][i] = has ? tmp[i] * qscale : 0.0f;
            acc[g][i] = 0.0f;
        }
        m[g] = NEG_INF;
        l[g] = 0.0f;
    }
    const int step = 2 * NW;
    for (int jw = c0 + warp * 2; jw < c1; jw += step * U) {  // warp-uniform
        RawT kr[U], vr[U];
        float ks[U], vs[U];
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int j = jw + grp + u * step;
            const size_t rowi = bk * L + (j < c1 ? j : c0);
            if (has) {
                kr[u] = *reinterpret_cast<const RawT*>(kbase + (rowi * hd + e) * BYTES);
                vr[u] = *reinterpret_cast<const RawT*>(vbase + (rowi * hd + e) * BYTES);
            }
            ks[u] = FMT == KV_FP16 ? 1.0f : k_scale[rowi];
            vs[u] = FMT == KV_FP16 ? 1.0f : v_scale[rowi];
        }
        float score[U][G];
#pragma unroll
        for (int u = 0; u < U; u++) {
            float k8[8];
            if (has) widen8<FMT>(kr[u], k8);
            const bool ok = jw + grp + u * step < c1;
#pragma unroll
            for (int g = 0; g < G; g++) {
                float d = 0.0f;
#pragma unroll
                for (int i = 0; i < 8; i++) d += has ? qv[g][i] * k8[i] : 0.0f;
                d = group_sum<16>(d) * ks[u];
                score[u][g] = ok ? d : NEG_INF;
            }
        }
        float mref[G];
#pragma unroll
        for (int g = 0; g < G; g++) {
            float mu = m[g];
#pragma unroll
            for (int u = 0; u < U; u++) mu = fmaxf(mu, score[u][g]);
            mref[g] = mu == NEG_INF ? 0.0f : mu;  // all -inf so far: nothing to rescale
            const float corr = exp2f(m[g] - mref[g]);
            l[g] *= corr;
#pragma unroll
            for (int i = 0; i < 8; i++) acc[g][i] *= corr;
            m[g] = mu;
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
            float v8[8];
            if (has) widen8<FMT>(vr[u], v8);
#pragma unroll
            for (int g = 0; g < G; g++) {
                const float p = exp2f(score[u][g] - mref[g]);
                l[g] += p;
                const float pv = p * vs[u];
#pragma unroll
                for (int i = 0; i < 8; i++) acc[g][i] += has ? pv * v8[i] : 0.0f;
            }
        }
    }

    // Merge the block's 2 NW groups for each head in a fixed order, write this split's partials.
    if (lig == 0) {
#pragma unroll
        for (int g = 0; g < G; g++) sm_m[(warp * 2 + grp) * G + g] = m[g];
    }
    __syncthreads();
#pragma unroll
    for (int g = 0; g < G; g++) {
        float M = NEG_INF;
        for (int k = 0; k < 2 * NW; k++) M = fmaxf(M, sm_m[k * G + g]);
        const float f = m[g] == NEG_INF ? 0.0f : exp2f(m[g] - M);
        float lg = l[g] * f;
        lg += __shfl_xor_sync(FULL_MASK, lg, 16);
#pragma unroll
        for (int i = 0; i < 8; i++) {
            float a = acc[g][i] * f;
            a += __shfl_xor_sync(FULL_MASK, a, 16);
            if (grp == 0 && has) sm_part[(warp * G + g) * hd + e + i] = a;
        }
        if (lane == 0) sm_lw[warp * G + g] = lg;
    }
    __syncthreads();
    const size_t part0 = ((size_t)r * H + kvh * G) * nsplit + split;
    for (int i = threadIdx.x; i < G * hd; i += blockDim.x) {
        const int gg = i / hd, ee = i % hd;
        float sum = 0.0f;
        for (int w = 0; w < NW; w++) sum += sm_part[(w * G + gg) * hd + ee];
        part_acc[(part0 + (size_t)gg * nsplit) * hd + ee] = sum;
    }
    if (threadIdx.x < G) {
        const int g = threadIdx.x;
        float M = NEG_INF, lsum = 0.0f;
        for (int k = 0; k < 2 * NW; k++) M = fmaxf(M, sm_m[k * G + g]);
        for (int w = 0; w < NW; w++) lsum += sm_lw[w * G + g];
        part_m[part0 + (size_t)g * nsplit] = M;
        part_l[part0 + (size_t)g * nsplit] = lsum;
    }
    merge_splits(r, H, KV, kvh, G, nsplit, nsplit, len, span.chunk, hd, part_acc, part_m, part_l, counter, out, ld_out, v_off);
}

#define GQA_INSTANCE(NAME, FMT, G)                                                                       \
    extern "C" __global__ void NAME(const __half* q, const void* kc, const void* vc, const float* k_scale, \
                                    const float* v_scale, const int* pos, int T, int H, int KV, int hd,    \
                                    int L, int chunk, int window, float qscale, float* part_acc,           \
                                    float* part_m, float* part_l, int* counter, __half* out, int ld_out,   \
                                    const float* v_off) {                                                  \
        pdl_begin();                                                                                   \
        attn_decode_gqa<FMT, G>(q, kc, vc, k_scale, v_scale, pos, T, H, KV, hd, L, chunk, window, qscale,  \
                                part_acc, part_m, part_l, counter, out, ld_out, v_off);                    \
    }

GQA_INSTANCE(attn_gqa_fp16_g2, KV_FP16, 2)
GQA_INSTANCE(attn_gqa_fp16_g4, KV_FP16, 4)
GQA_INSTANCE(attn_gqa_fp16_g8, KV_FP16, 8)
GQA_INSTANCE(attn_gqa_int8_g2, KV_INT8, 2)
GQA_INSTANCE(attn_gqa_int8_g4, KV_INT8, 4)
GQA_INSTANCE(attn_gqa_int8_g8, KV_INT8, 8)
GQA_INSTANCE(attn_gqa_fp8_g2, KV_FP8, 2)
GQA_INSTANCE(attn_gqa_fp8_g4, KV_FP8, 4)
GQA_INSTANCE(attn_gqa_fp8_g8, KV_FP8, 8)

#define ATTN_INSTANCE(NAME, FMT, ITERS, PIPE)                                                            \
    extern "C" __global__ void NAME(const __half* q, const void* kc, const void* vc, const float* k_scale, \
                                    const float* v_scale, const int* pos, int T, int H, int KV, int hd,    \
                                    int L, int chunk, int window, float qscale, float* part_acc,           \
                                    float* part_m, float* part_l, int* counter, __half* out, int ld_out,   \
                                    const float* v_off) {                                                  \
        pdl_begin();                                                                                   \
        attn_decode<FMT, ITERS, PIPE>(q, kc, vc, k_scale, v_scale, pos, T, H, KV, hd, L, chunk, window,    \
                                      qscale, part_acc, part_m, part_l, counter, out, ld_out, v_off);      \
    }

ATTN_INSTANCE(attn_decode_fp16_1, KV_FP16, 1, false)
ATTN_INSTANCE(attn_decode_fp16_2, KV_FP16, 2, false)
ATTN_INSTANCE(attn_decode_int8_1, KV_INT8, 1, false)
ATTN_INSTANCE(attn_decode_int8_2, KV_INT8, 2, false)
ATTN_INSTANCE(attn_decode_fp8_1, KV_FP8, 1, false)
ATTN_INSTANCE(attn_decode_fp8_2, KV_FP8, 2, false)
ATTN_INSTANCE(attn_decode_int8_1_pipe, KV_INT8, 1, true)
ATTN_INSTANCE(attn_decode_fp8_1_pipe, KV_FP8, 1, true)

// One cluster of CLUSTER blocks per (row, key/value head), merged in block 0 (cluster_merge), 8
// warps a block, 2 positions a group loaded before use (U): for fp16 caches with kv heads x rows
// >= 32 (kernels.py), where CLUSTER splits a pair already fill the GPU. H100, 32 kv heads, against
// this file's global merge (17 splits of 4 warps, U = 4): 600 positions (the 7B decode step)
// 8.48 -> 6.77 us, 32k 198.9 -> 185.9 at batch 1 and 1462 -> 1405 at batch 8; the 7B W4 step 2350
// -> 2257 us a token. With U = 4: 600 positions 0.8 us slower, 32k 0.7% faster; U = 8 (one round
// of loads at 600) and 16 warps were slower still (bench/NOTES.md, session 8). The 8-bit caches
// keep the global merge: their lanes do more per byte, and with 8 splits instead of 17 they were
// 1.1-1.6x slower. The first U positions of each group that earlier steps cached are loaded before
// the PDL wait (attn_decode's PRE): the 7B W4 step 2084 -> 2056 us (session 10). With that, U = 3 /
// 4 / 5 (more of a split loaded before the wait) cost +12 / +35 / +71 us a step, 4 / 16 warps +40 /
// +129 (bench/NOTES.md). The loop is software-pipelined (PIPE: the next U positions load while these
// are used; a split at decode lengths takes 2-4 rounds after the wait): 2036 -> 2024 us at 514
// positions, 2091 -> 2077 at 802 (session 11). More positions in flight instead (U = 4, 6, 8 with the
// same 2 before the wait, unpipelined) were slower (+24 / +87 / +111 us at 514), and so were U = 1
// and 3 with the pipeline (+8 / +80), 1 position before the wait (+1 / +7 at 514 / 802), and a merge
// without the in-block stage (every warp pushing its own result to block 0's 64 slots: +50 / +48).
#define CLUSTER_INSTANCE(NAME, FMT, ITERS, U)                                                             \
    extern "C" __global__ void __cluster_dims__(1, CLUSTER, 1)                                          \
        NAME(const __half* q, const void* kc, const void* vc, const float* k_scale, const float* v_scale, \
             const int* pos, int T, int H, int KV, int hd, int L, int chunk, int window, float qscale,     \
             float* part_acc, float* part_m, float* part_l, int* counter, __half* out, int ld_out,        \
             const float* v_off) {                                                                     \
        attn_decode<FMT, ITERS, true, true, U, true>(q, kc, vc, k_scale, v_scale, pos, T, H, KV, hd, L, chunk, \
                                                window, qscale, part_acc, part_m, part_l, counter, out,   \
                                                ld_out, v_off);                                           \
    }

CLUSTER_INSTANCE(attn_cluster_fp16_1, KV_FP16, 1, 2)
CLUSTER_INSTANCE(attn_cluster_fp16_2, KV_FP16, 2, 2)
