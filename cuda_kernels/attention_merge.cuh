// Shared by the decode attention kernels (attention.cu, attention_mma.cu, attention_int4.cu): which
// positions a row and split cover, the tensor-core kernels' online-softmax step, and the merge of
// the splits.
#pragma once
#include "common.cuh"

// Timeline of a call (bench/attn_timeline.py): compiled with -DMINILLM_TIMELINE, thread 0 of each
// block records %globaltimer (ns, 32 ns steps on an H100) at numbered points of the tensor-core
// kernels: 0 start, 8 past the PDL wait, 1 the first key block of warp 0 in hand, 2 every warp past
// its loop, 3 partials written, 4 counted (last_to_arrive), 5 the merge's weights ready, 6 the
// block's end; slot 7 holds its SM and whether it merged. A block's row is its index in the grid
// (a run of calls leaves the last one's), or with -DMINILLM_TIMELINE_RING the next free row as it
// starts (a counter the tool zeroes), so that each call of a CUDA graph's replay keeps its own rows,
// in the order its blocks started (the counter's atomic at each start is then under the PDL wait,
// except in the first call). Without MINILLM_TIMELINE the marks compile to nothing.
#ifdef MINILLM_TIMELINE
#define TIMELINE_BLOCKS 16384
__device__ unsigned long long attn_timeline[TIMELINE_BLOCKS][9];
__device__ unsigned attn_timeline_rows;
__device__ __forceinline__ void timeline_mark(int k, unsigned long long v = 0) {
#ifdef MINILLM_TIMELINE_RING
    __shared__ unsigned row;
    if (threadIdx.x != 0) return;
    if (k == 0) row = atomicAdd(&attn_timeline_rows, 1u) % TIMELINE_BLOCKS;
#else
    const unsigned row = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    if (threadIdx.x != 0 || row >= TIMELINE_BLOCKS) return;
#endif
    if (k == 7) {
        unsigned sm;
        asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
        attn_timeline[row][7] = sm | (v << 32);
    } else {
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(v));
        attn_timeline[row][k] = v;
    }
}
#define TIMELINE(...) timeline_mark(__VA_ARGS__)
#define TIMELINE_END() (__syncthreads(), timeline_mark(6))
#else
#define TIMELINE(...) ((void)0)
#define TIMELINE_END() ((void)0)
#endif

// Row r = (batch b, new token t) sees positions [lo, len), len = pos[b] + t + 1 (causal for any T),
// lo > 0 only for a sliding window; split s covers [c0, c1) of that, `chunk` positions a split.
// The grid has the splits the cache's capacity needs (max_chunk each), but the chunk follows the
// row's current length: an equal share of len for each split, rounded up to 64 positions (whole
// tiles of the INT4 kernel's 32 positions; a key block of scales may span two splits). A graph captured once replays the same grid at
// every length; with a fixed chunk, a 600-token chat in an 8192-position cache would leave 14 of
// 16 splits idle and two to walk 512 positions each.
struct RowSpan {
    int b, len, c0, c1, chunk;
};

__device__ __forceinline__ RowSpan row_span(const int* __restrict__ pos, int r, int T, int window, int split,
                                            int nsplit, int max_chunk) {
    const int b = r / T, len = pos[b] + r % T + 1;
    const int lo = window > 0 ? max(0, len - window) : 0;
    const int chunk = min(max_chunk, 64 * ((len + 64 * nsplit - 1) / (64 * nsplit)));
    return {b, len, max(split * chunk, lo), min((split + 1) * chunk, len), chunk};
}

// The cluster kernels' span (attention.cu: CLUSTER splits a row over an fp16 cache, where any
// position can start a split): [lo, len) in equal pieces of a multiple of 16 positions.
__device__ __forceinline__ RowSpan cluster_span(const int* __restrict__ pos, int r, int T, int window, int split) {
    const int b = r / T, len = pos[b] + r % T + 1;
    const int lo = window > 0 ? max(0, len - window) : 0;
    const int chunk = 16 * ((len - lo + 16 * gridDim.y - 1) / (16 * gridDim.y));
    return {b, len, min(lo + split * chunk, len), min(lo + (split + 1) * chunk, len), chunk};
}

// One online-softmax step of the tensor-core kernels (attention_mma.cu, attention_int4.cu) over a
// lane's 8 scores of query g in the score product's layout (positions nt * 8 + 2t + e: a quad of
// lanes holds a query's 32): the new running max m (over the quad, by two shuffles), the normaliser
// l rescaled and increased, p = 2^(score - m) (0 for masked scores). Returns the factor the old sums
// are rescaled by (0 on the first block, when m was -inf).
__device__ __forceinline__ float online_softmax_step(const float (&sc)[4][2], float& m, float& l, float (&p)[4][2]) {
    float mb = NEG_INF;
#pragma unroll
    for (int nt = 0; nt < 4; nt++) mb = fmaxf(mb, fmaxf(sc[nt][0], sc[nt][1]));
    mb = fmaxf(mb, __shfl_xor_sync(FULL_MASK, mb, 1));
    mb = fmaxf(mb, __shfl_xor_sync(FULL_MASK, mb, 2));
    const float mn = fmaxf(m, mb);
    const float corr = m == NEG_INF ? 0.0f : exp2f(m - mn);
    l *= corr;
#pragma unroll
    for (int nt = 0; nt < 4; nt++)
#pragma unroll
        for (int e = 0; e < 2; e++) {
            p[nt][e] = sc[nt][e] == NEG_INF ? 0.0f : exp2f(sc[nt][e] - mn);
            l += p[nt][e];
        }
    m = mn;
    return corr;
}

// The end of a split for the tensor-core kernels (a tile of up to 8 query heads, NW warps): each
// warp left its online-softmax state per query in shared memory (sum sm_acc[w][q][:], max sm_m[w][q],
// normaliser sm_l[w][q]); combine the warps in warp order (deterministic) and write the split's
// partial result for query heads qt * 8 + q < G. The warps' factors 2^(m_w - m) are worked out once
// per head, then each thread sums four outputs at a time (sm_acc 16-byte aligned, hd % 4 == 0): this
// runs in the last block of a kv head on the way to the merge, where every instruction is latency.
template <int NW, int HDP>
__device__ __forceinline__ void write_tile_partials(const float (*sm_acc)[8][HDP], const float (*sm_m)[8],
                                                    const float (*sm_l)[8], int r, int H, int kvh, int G, int qt,
                                                    int split, int nsplit, int hd, float* __restrict__ part_acc,
                                                    float* __restrict__ part_m, float* __restrict__ part_l) {
    __shared__ float sm_f[NW][8];
    const size_t part0 = ((size_t)r * H + kvh * G) * nsplit + split;  // (r, head kvh * G, split)
    const int heads = min(8, G - qt * 8);
    if (threadIdx.x < heads) {
        const int gg = threadIdx.x;
        float M = NEG_INF;
#pragma unroll
        for (int w = 0; w < NW; w++) M = fmaxf(M, sm_m[w][gg]);
        float lsum = 0.0f;
#pragma unroll
        for (int w = 0; w < NW; w++) {
            const float f = sm_m[w][gg] == NEG_INF ? 0.0f : exp2f(sm_m[w][gg] - M);
            sm_f[w][gg] = f;
            lsum += f * sm_l[w][gg];
        }
        part_m[part0 + (size_t)(qt * 8 + gg) * nsplit] = M;
        part_l[part0 + (size_t)(qt * 8 + gg) * nsplit] = lsum;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < heads * hd / 4; i += blockDim.x) {
        const int gg = 4 * i / hd, d = 4 * i % hd;
        float4 sum = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll
        for (int w = 0; w < NW; w++) {
            const float f = sm_f[w][gg];
            const float4 a = *reinterpret_cast<const float4*>(&sm_acc[w][gg][d]);
            sum.x += f * a.x, sum.y += f * a.y, sum.z += f * a.z, sum.w += f * a.w;
        }
        *reinterpret_cast<float4*>(part_acc + (part0 + (size_t)(qt * 8 + gg) * nsplit) * hd + d) = sum;
    }
}

// The tensor-core kernels' sm_acc rows ([NW warps][8 queries][HDP + ACC_PAD] floats): a lane holds 16
// consecutive dims (16 g ...) of queries 2t and 2t + 1 and stores them as float4s; with rows of HDP
// floats (a multiple of 32 banks) the 8 lanes of a store phase hit 2 of the 8 possible 4-bank groups,
// with 4 more floats a row the four t of a g spread over them (2-way at most). Scalar stores into
// unpadded rows were 16-way conflicts: ~2,000 cycles before the last block's partials (bench/NOTES.md
// session 19).
constexpr int ACC_PAD = 4;

#define MAX_MERGE 4352  // G * splits weights for the merge (8 heads x 544 splits; kernels.py keeps below)

// The last block of a (row, key/value head) to finish merges the splits' partial results (an atomic
// counter per (row, kv head) in device memory, reset by that block for the next step), so no second
// kernel is launched:  m = max_s m_s,  l = sum_s l_s 2^(m_s - m),  out = sum_s acc_s 2^(m_s - m) / l.
// `arrivals`: blocks per (row, kv head) (the splits, times the query tiles of attention_mma.cu and
// attention_int4.cu). Returns whether this block is that last one (block-uniform).
// The count is one acquire-release atomic by thread 0 between two barriers (the pattern of
// CUTLASS's barrier.h): release, so the block's partials (ordered before it by the first barrier)
// are visible to whoever counts after it; acquire, so the last block's reads (ordered after it by
// the second barrier) see every other block's. Cheaper than a sequentially consistent fence in
// every thread (__threadfence: MEMBAR.SC.GPU), which the chain to the output paid twice.
__device__ __forceinline__ bool last_to_arrive(int r, int KV, int kvh, int arrivals, int* __restrict__ counter) {
    __shared__ int is_last;
    TIMELINE(3);
    __syncthreads();
    if (threadIdx.x == 0) {
        int* const c = &counter[(size_t)r * KV + kvh];
        int done;
        asm volatile("atom.acq_rel.gpu.global.add.s32 %0, [%1], 1;" : "=r"(done) : "l"(c) : "memory");
        is_last = done == arrivals - 1;
        if (is_last) *c = 0;
    }
    __syncthreads();
    TIMELINE(4);
    TIMELINE(7, is_last);
    if (!is_last) TIMELINE(6);
    return is_last;
}

// Each split's weight 2^(m_s - m) / l per query head into sm_w[g * used + s] (warp g takes head g),
// m_s and l_s read in one pass (each lane's splits combined online, then the lanes by a max and a
// sum), m_s kept in sm_w meanwhile. Ends with a block barrier.
__device__ __forceinline__ void split_weights(int r, int H, int kvh, int G, int nsplit, int used,
                                              const float* __restrict__ part_m, const float* __restrict__ part_l,
                                              float* __restrict__ sm_w, int nwarps) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    for (int g = warp; g < G; g += nwarps) {
        const size_t base = ((size_t)r * H + kvh * G + g) * nsplit;
        float m = NEG_INF, l = 0.0f;  // of this lane's splits
        for (int s = lane; s < used; s += 32) {
            const float ms = __ldcg(part_m + base + s), ls = __ldcg(part_l + base + s);
            sm_w[g * used + s] = ms;
            const float mn = fmaxf(m, ms);
            l = (m == NEG_INF ? 0.0f : l * exp2f(m - mn)) + (ms == NEG_INF ? 0.0f : ls * exp2f(ms - mn));
            m = mn;
        }
        const float M = warp_max(m);
        const float L = warp_sum(m == NEG_INF ? 0.0f : l * exp2f(m - M));
        const float inv = L > 0.0f ? 1.0f / L : 0.0f;
        __syncwarp();
        for (int s = lane; s < used; s += 32) {
            const float ms = sm_w[g * used + s];
            sm_w[g * used + s] = ms == NEG_INF ? 0.0f : exp2f(ms - M) * inv;
        }
    }
    __syncthreads();
}

// The merge for attention.cu's kernels (one output a thread: four a thread with 16-byte loads, as
// merge_splits_tc below, made its fp16 kernel slower, 103.8 -> 109.5 us at 8 kv heads and 32k; its
// registers are its main loop's occupancy).
// v_off: the values' offsets of a centred cache ([KV, hd], or null), added back: the softmax
// weights sum to 1, so sum_j p_j (v_j - mu) + mu = sum_j p_j v_j.
__device__ __forceinline__ void merge_splits(int r, int H, int KV, int kvh, int G, int nsplit, int arrivals,
                                             int len, int chunk, int hd, const float* __restrict__ part_acc,
                                             const float* __restrict__ part_m, const float* __restrict__ part_l,
                                             int* __restrict__ counter, __half* __restrict__ out, int ld_out,
                                             const float* __restrict__ v_off) {
    __shared__ float sm_w[MAX_MERGE];
    if (!last_to_arrive(r, KV, kvh, arrivals, counter)) return;
    const int used = min(nsplit, (len + chunk - 1) / chunk);  // splits past the length hold nothing
    // The weights first; then every thread's sum over the splits is a stream of independent loads
    // (no max or exp in the loop).
    split_weights(r, H, kvh, G, nsplit, used, part_m, part_l, sm_w, blockDim.x >> 5);
    for (int i = threadIdx.x; i < G * hd; i += blockDim.x) {
        const int gg = i / hd, e = i % hd;
        const float* src = part_acc + ((size_t)r * H + kvh * G + gg) * nsplit * hd + e;
        const float* w = sm_w + gg * used;
        // 8 independent loads in flight: this loop runs in one block while the rest of the GPU
        // idles, so its L2 latency is the tail of the whole kernel (G x splits loads a thread with
        // grouped heads). Summed in a fixed order: deterministic.
        float o[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
        int s = 0;
        for (; s + 8 <= used; s += 8) {
#pragma unroll
            for (int u = 0; u < 8; u++) o[u] += __ldcg(src + (size_t)(s + u) * hd) * w[s + u];
        }
        for (; s < used; s++) o[0] += __ldcg(src + (size_t)s * hd) * w[s];
        const float sum = ((o[0] + o[1]) + (o[2] + o[3])) + ((o[4] + o[5]) + (o[6] + o[7])) +
                          (v_off ? v_off[(size_t)kvh * hd + e] : 0.0f);
        out[(size_t)r * ld_out + (kvh * G + gg) * hd + e] = __float2half(sum);
    }
}

// (m, l) of two sets of positions as one: the larger max, each normaliser rescaled to it.
__device__ __forceinline__ void combine_ml(float& m, float& l, float m2, float l2) {
    const float mn = fmaxf(m, m2);
    l = (m == NEG_INF ? 0.0f : l * exp2f(m - mn)) + (m2 == NEG_INF ? 0.0f : l2 * exp2f(m2 - mn));
    m = mn;
}

// The merge for the tensor-core kernels (attention_mma.cu, attention_int4.cu; NT threads a block,
// hd % 4 == 0). The chain after the last block's loop is the kernel's tail while the GPU idles
// (H100, 8 kv heads, batch 1, 32k, int8: ~5 us of 35 before), so it is cut to one round of loads
// before the sums: the first splits' sums are asked for before the weights are known, m and l
// come in one pass, the splits of an output column (four outputs of a query head) are shared among
// NT / columns threads (with one query head per kv head there are only hd / 4 columns: a warp
// alone would walk every split) and added in thread order. U loads a group; with PIPE each group is
// in flight while the one before it is summed (two groups' registers held), without it the next
// group is asked for once this one is added. All in a fixed order: deterministic, and the same
// bits for every U and PIPE. (Merging each split as it arrives, online, without the weights' pass:
// slower, a chain of exp2 a split; bench/NOTES.md.)
// sm_w: G x splits floats of shared memory (MAX_MERGE at most; attention_int4.cu lends the memory
// its main loop used). (Two groups in flight instead of one: attention_mma.cu 0.5-1 us slower,
// its registers spilling; bench/NOTES.md session 17. attention_int4.cu takes groups of 16 without
// PIPE: 32 splits' sums in two rounds of loads instead of four, the first under the weights' pass;
// H100, 8 kv heads, batch 1, 32k 19.8 -> 19.3 us; session 20.)
template <int NT, int U = 8, bool PIPE = true>
__device__ __forceinline__ void merge_splits_tc(int r, int H, int KV, int kvh, int G, int nsplit, int arrivals,
                                                int len, int chunk, int hd, const float* __restrict__ part_acc,
                                                const float* __restrict__ part_m, const float* __restrict__ part_l,
                                                int* __restrict__ counter, __half* __restrict__ out, int ld_out,
                                                const float* __restrict__ v_off, float* __restrict__ sm_w) {
    __shared__ float4 sm_part[NT];
    if (!last_to_arrive(r, KV, kvh, arrivals, counter)) return;
    const int used = min(nsplit, (len + chunk - 1) / chunk);  // splits past the length hold nothing
    const int q4 = hd / 4, cols = G * q4, parts = max(1, min(used, NT / cols));
    const float4 zero = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    // Column c's splits p, p + parts, ...: group k of U of them loaded (zeros past the last), and
    // added with their weights into o.
    auto column = [&](int c) {
        return reinterpret_cast<const float4*>(part_acc + ((size_t)r * H + kvh * G + c / q4) * nsplit * hd) + c % q4;
    };
    auto load = [&](const float4* src, int p, int k, float4 (&a)[U]) {
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int s = p + (k * U + u) * parts;
            a[u] = s < used ? __ldcg(src + (size_t)s * q4) : zero;
        }
    };
    auto add = [&](const float* w, int p, int k, const float4 (&a)[U], float4 (&o)[2]) {
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int s = p + (k * U + u) * parts;
            const float ww = s < used ? w[s] : 0.0f;
            float4& d = o[u & 1];
            d.x += a[u].x * ww, d.y += a[u].y * ww, d.z += a[u].z * ww, d.w += a[u].w * ww;
        }
    };
    auto sum = [&](int c, int p, float4 (&a)[U]) {  // a: group 0, already asked for
        const float4* src = column(c);
        const float* w = sm_w + (c / q4) * used;
        float4 o[2] = {zero, zero};
        for (int k = 0; p + k * U * parts < used; k++) {
            if constexpr (PIPE) {
                float4 b[U];
                load(src, p, k + 1, b);  // the next group in flight while this one is added
                add(w, p, k, a, o);
#pragma unroll
                for (int u = 0; u < U; u++) a[u] = b[u];
            } else {
                add(w, p, k, a, o);
                if (p + (k + 1) * U * parts < used) load(src, p, k + 1, a);
            }
        }
        return make_float4(o[0].x + o[1].x, o[0].y + o[1].y, o[0].z + o[1].z, o[0].w + o[1].w);
    };
    auto store = [&](int c, float4 v) {
        const int e = 4 * (c % q4);
        if (v_off) {
            const float* off = v_off + (size_t)kvh * hd + e;
            v.x += off[0], v.y += off[1], v.z += off[2], v.w += off[3];
        }
        const __half2 lo = __floats2half2_rn(v.x, v.y), hi = __floats2half2_rn(v.z, v.w);
        uint2 pack;
        pack.x = *reinterpret_cast<const uint32_t*>(&lo), pack.y = *reinterpret_cast<const uint32_t*>(&hi);
        *reinterpret_cast<uint2*>(out + (size_t)r * ld_out + (kvh * G + c / q4) * hd + e) = pack;  // 8-byte aligned: hd, ld % 4 == 0
    };

    // This thread's first column and its share of the splits; their first group asked for now.
    const int col = threadIdx.x % cols, part = threadIdx.x / cols;
    const bool mine = part < parts;
    float4 a[U];
    load(column(col), mine ? part : used, 0, a);
    split_weights(r, H, kvh, G, nsplit, used, part_m, part_l, sm_w, NT / 32);  // (its loads under the first group's)
    TIMELINE(5);
    if (mine) sm_part[threadIdx.x] = sum(col, part, a);
    __syncthreads();
    if (part == 0) {
        float4 v = sm_part[col];
        for (int p = 1; p < parts; p++) {
            const float4 b = sm_part[p * cols + col];
            v.x += b.x, v.y += b.y, v.z += b.z, v.w += b.w;
        }
        store(col, v);
    }
    // Columns past the block's threads (G x hd > 4 NT: eight query heads at head_dim 128), one
    // share each (parts == 1).
    for (int c = col + NT; c < cols; c += NT) {
        load(column(c), 0, 0, a);
        store(c, sum(c, 0, a));
    }
    TIMELINE_END();
}
