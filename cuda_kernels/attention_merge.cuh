// Shared by the decode attention kernels (attention.cu, attention_mma.cu, attention_int4.cu): which
// positions a row and split cover, the tensor-core kernels' online-softmax step, and the merge of
// the splits.
#pragma once
#include "common.cuh"

// Row r = (batch b, new token t) sees positions [lo, len), len = pos[b] + t + 1 (causal for any T),
// lo > 0 only for a sliding window; split s covers [c0, c1) of that, `chunk` positions a split.
// The grid has the splits the cache's capacity needs (max_chunk each), but the chunk follows the
// row's current length: an equal share of len for each split, rounded up to 64 positions (a
// multiple of the INT4 cache's 32-position blocks). A graph captured once replays the same grid at
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
// partial result for query heads qt * 8 + q < G.
template <int NW, int HDP>
__device__ __forceinline__ void write_tile_partials(const float (*sm_acc)[8][HDP], const float (*sm_m)[8],
                                                    const float (*sm_l)[8], int r, int H, int kvh, int G, int qt,
                                                    int split, int nsplit, int hd, float* __restrict__ part_acc,
                                                    float* __restrict__ part_m, float* __restrict__ part_l) {
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
}

#define MAX_MERGE 4352  // G * splits weights for the merge (8 heads x 544 splits; kernels.py keeps below)

// The last block of a (row, key/value head) to finish merges the splits' partial results (an atomic
// counter per (row, kv head) in device memory, reset by that block for the next step), so no second
// kernel is launched:  m = max_s m_s,  l = sum_s l_s 2^(m_s - m),  out = sum_s acc_s 2^(m_s - m) / l.
// `arrivals`: blocks per (row, kv head) (the splits, times the query tiles of attention_mma.cu and
// attention_int4.cu). VEC: the sums four outputs at a time (below).
// v_off: the values' offsets of a centred cache ([KV, hd], or null), added back: the softmax
// weights sum to 1, so sum_j p_j (v_j - mu) + mu = sum_j p_j v_j.
// sm_w: MAX_MERGE floats of shared memory (the overload below declares them; attention_int4.cu
// lends the memory its main loop used).
template <bool VEC = false>
__device__ __forceinline__ void merge_splits(int r, int H, int KV, int kvh, int G, int nsplit, int arrivals,
                                             int len, int chunk, int hd, const float* __restrict__ part_acc,
                                             const float* __restrict__ part_m, const float* __restrict__ part_l,
                                             int* __restrict__ counter, __half* __restrict__ out, int ld_out,
                                             const float* __restrict__ v_off, float* __restrict__ sm_w) {
    __shared__ int is_last;
    __threadfence();  // this block's partials are visible before it counts itself done
    __syncthreads();
    if (threadIdx.x == 0) {
        const int done = atomicAdd(&counter[(size_t)r * KV + kvh], 1);
        is_last = done == arrivals - 1;
        if (is_last) counter[(size_t)r * KV + kvh] = 0;
    }
    __syncthreads();
    if (!is_last) return;
    __threadfence();
    const int used = min(nsplit, (len + chunk - 1) / chunk);  // splits past the length hold nothing
    // Each split's weight 2^(m_s - m) / l, per query head, into shared memory first; then every
    // thread's sum over the splits is a stream of independent loads (no max or exp in the loop).
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
    for (int g = warp; g < G; g += nwarps) {  // warp by warp: the max and the normaliser of head g
        const size_t base = ((size_t)r * H + kvh * G + g) * nsplit;
        float mm = NEG_INF;
        for (int s = lane; s < used; s += 32) mm = fmaxf(mm, __ldcg(part_m + base + s));
        mm = warp_max(mm);
        float ll = 0.0f;
        for (int s = lane; s < used; s += 32) {
            const float ms = __ldcg(part_m + base + s);
            const float w = ms == NEG_INF ? 0.0f : exp2f(ms - mm);
            sm_w[g * used + s] = w;
            ll += __ldcg(part_l + base + s) * w;
        }
        ll = warp_sum(ll);
        const float inv = ll > 0.0f ? 1.0f / ll : 0.0f;
        __syncwarp();
        for (int s = lane; s < used; s += 32) sm_w[g * used + s] *= inv;
    }
    __syncthreads();
    if (VEC && hd % 4 == 0) {
        // Four consecutive outputs a thread, one 16-byte load per split, 8 splits in flight. Faster
        // for the tensor-core kernels (8 kv heads, batch 1, 32k: int8 38.3 -> 36.7 us, INT4 32.8 ->
        // 29.6), slower for attention.cu's (fp16 103.8 -> 109.5: its registers are the main loop's
        // occupancy), so each kernel says which it wants. Summed in a fixed order, as below.
        for (int i = threadIdx.x; i < G * hd / 4; i += blockDim.x) {
            const int gg = 4 * i / hd, e = 4 * i % hd;
            const float4* src = reinterpret_cast<const float4*>(part_acc + ((size_t)r * H + kvh * G + gg) * nsplit * hd + e);
            const float* w = sm_w + gg * used;
            float4 o[8];
#pragma unroll
            for (int u = 0; u < 8; u++) o[u] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            int s = 0;
            for (; s + 8 <= used; s += 8) {
#pragma unroll
                for (int u = 0; u < 8; u++) {
                    const float4 a = __ldcg(src + (size_t)(s + u) * (hd / 4));
                    const float ww = w[s + u];
                    o[u].x += a.x * ww, o[u].y += a.y * ww, o[u].z += a.z * ww, o[u].w += a.w * ww;
                }
            }
            for (; s < used; s++) {
                const float4 a = __ldcg(src + (size_t)s * (hd / 4));
                o[0].x += a.x * w[s], o[0].y += a.y * w[s], o[0].z += a.z * w[s], o[0].w += a.w * w[s];
            }
            float res[4];
#pragma unroll
            for (int c = 0; c < 4; c++) {
                auto at = [&](int u) { return c == 0 ? o[u].x : c == 1 ? o[u].y : c == 2 ? o[u].z : o[u].w; };
                res[c] = ((at(0) + at(1)) + (at(2) + at(3))) + ((at(4) + at(5)) + (at(6) + at(7))) +
                         (v_off ? v_off[(size_t)kvh * hd + e + c] : 0.0f);
            }
#pragma unroll
            for (int c = 0; c < 4; c++) out[(size_t)r * ld_out + (kvh * G + gg) * hd + e + c] = __float2half(res[c]);
        }
        return;
    }
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

template <bool VEC = false>
__device__ __forceinline__ void merge_splits(int r, int H, int KV, int kvh, int G, int nsplit, int arrivals,
                                             int len, int chunk, int hd, const float* __restrict__ part_acc,
                                             const float* __restrict__ part_m, const float* __restrict__ part_l,
                                             int* __restrict__ counter, __half* __restrict__ out, int ld_out,
                                             const float* __restrict__ v_off) {
    __shared__ float sm_w[MAX_MERGE];
    merge_splits<VEC>(r, H, KV, kvh, G, nsplit, arrivals, len, chunk, hd, part_acc, part_m, part_l, counter, out, ld_out,
                      v_off, sm_w);
}
