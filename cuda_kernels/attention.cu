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
//   each warp splits into two half-warps, and a half-warp takes one position at a time: its 16 lanes
//   hold 8 consecutive elements each (16-byte fp16 loads, 8-byte int8/fp8 loads, so a half-warp
//   reads one cached row contiguously). The query heads of a group read the same rows, which the
//   block's other warps have just brought into L1: DRAM sees each row once.
//   Each half-warp keeps an online softmax (Milakov & Gimelshein 2018): U positions are loaded
//   before any is used (keys and values both), so 2U rows per lane are in flight; scores are
//   reduced over the 16 lanes with shuffles and kept in the log2 domain (q is pre-scaled by
//   log2(e) / sqrt(hd), so exp2f does the exponentials).
//   At the end the half-warps of each query head merge through shared memory, and attn_combine
//   merges the S splits with the same log-sum-exp rule:
//       m = max_s m_s,   l = sum_s l_s 2^(m_s - m),   out = sum_s acc_s 2^(m_s - m) / l

#include "common.cuh"

#define KV_FP16 0
#define KV_INT8 1
#define KV_FP8 2
#define UNROLL 4

template <int FMT> struct Raw;  // the bytes of 8 cached elements
template <> struct Raw<KV_FP16> { typedef uint4 type; };
template <> struct Raw<KV_INT8> { typedef uint2 type; };
template <> struct Raw<KV_FP8> { typedef uint2 type; };

template <int FMT>
__device__ __forceinline__ typename Raw<FMT>::type load_raw(const void* base, size_t idx) {
    if (FMT == KV_FP16) {
        typedef typename Raw<FMT>::type R;
        return *reinterpret_cast<const R*>(reinterpret_cast<const __half*>(base) + idx);
    } else {
        typedef typename Raw<FMT>::type R;
        return *reinterpret_cast<const R*>(reinterpret_cast<const uint8_t*>(base) + idx);
    }
}

__device__ __forceinline__ void unpack(uint4 raw, float* x) {  // 8 halves
    const __half2* h = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; i++) {
        float2 f = __half22float2(h[i]);
        x[2 * i] = f.x;
        x[2 * i + 1] = f.y;
    }
}

template <int FMT>
__device__ __forceinline__ void unpack8(uint2 raw, float* x) {  // 8 int8 or 8 E4M3 codes
    const uint32_t w[2] = {raw.x, raw.y};
#pragma unroll
    for (int i = 0; i < 8; i++) {
        const uint32_t byte = (w[i / 4] >> (8 * (i % 4))) & 0xffu;
        x[i] = FMT == KV_INT8 ? (float)(int8_t)byte : e4m3_to_float(byte);
    }
}

template <int FMT>
__device__ __forceinline__ void to_float(typename Raw<FMT>::type raw, float* x);
template <> __device__ __forceinline__ void to_float<KV_FP16>(uint4 raw, float* x) { unpack(raw, x); }
template <> __device__ __forceinline__ void to_float<KV_INT8>(uint2 raw, float* x) { unpack8<KV_INT8>(raw, x); }
template <> __device__ __forceinline__ void to_float<KV_FP8>(uint2 raw, float* x) { unpack8<KV_FP8>(raw, x); }

__device__ __forceinline__ float half_warp_sum(float v) {
    for (int o = 8; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

#define MAX_G_HD 2048  // G * hd floats of shared memory (8 heads of 256)

template <int FMT, int ITERS>
__device__ __forceinline__ void attn_decode(const __half* __restrict__ q, const void* __restrict__ kc,
                                            const void* __restrict__ vc, const float* __restrict__ k_scale,
                                            const float* __restrict__ v_scale, const int* __restrict__ pos, int T,
                                            int H, int KV, int hd, int L, int chunk, int window, float qscale,
                                            float* __restrict__ part_acc, float* __restrict__ part_m,
                                            float* __restrict__ part_l) {
    typedef typename Raw<FMT>::type RawT;
    __shared__ float sm_acc[MAX_G_HD];
    __shared__ float sm_m[64];
    __shared__ float sm_l[32];
    const int kvh = blockIdx.x, split = blockIdx.y, nsplit = gridDim.y, r = blockIdx.z;
    const int G = H / KV, NW = blockDim.x >> 5, W = NW / G;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = warp % G, stream = warp / G, h = kvh * G + g;
    const int grp = lane >> 4, lig = lane & 15;
    const int b = r / T, len = pos[b] + r % T + 1;
    const int lo = window > 0 ? max(0, len - window) : 0;
    const int c0 = max(split * chunk, lo), c1 = min((split + 1) * chunk, len);
    const size_t bk = (size_t)b * KV + kvh;

    float qv[8 * ITERS], acc[8 * ITERS];
#pragma unroll
    for (int it = 0; it < ITERS; it++) {
        const int e = it * 128 + lig * 8;
        float tmp[8];
        if (e < hd) unpack(*reinterpret_cast<const uint4*>(q + ((size_t)r * H + h) * hd + e), tmp);
#pragma unroll
        for (int i = 0; i < 8; i++) {
            qv[it * 8 + i] = e < hd ? tmp[i] * qscale : 0.0f;
            acc[it * 8 + i] = 0.0f;
        }
    }
    float m = NEG_INF, l = 0.0f;

    // Warp-uniform loop (the shuffles need all 32 lanes); each half-warp checks its own positions.
    for (int jw = c0 + stream * 2; jw < c1; jw += 2 * W * UNROLL) {
        RawT kr[UNROLL][ITERS], vr[UNROLL][ITERS];
        float ks[UNROLL], vs[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; u++) {
            const int j = jw + grp + u * 2 * W;
            const bool ok = j < c1;
            const size_t rowi = bk * L + (ok ? j : c0);
#pragma unroll
            for (int it = 0; it < ITERS; it++) {
                const int e = it * 128 + lig * 8;
                if (e < hd) {
                    kr[u][it] = load_raw<FMT>(kc, rowi * hd + e);
                    vr[u][it] = load_raw<FMT>(vc, rowi * hd + e);
                }
            }
            ks[u] = FMT == KV_FP16 ? 1.0f : k_scale[rowi];
            vs[u] = FMT == KV_FP16 ? 1.0f : v_scale[rowi];
        }
        float score[UNROLL];
        float mu = m;
#pragma unroll
        for (int u = 0; u < UNROLL; u++) {
            float d = 0.0f;
#pragma unroll
            for (int it = 0; it < ITERS; it++) {
                if (it * 128 + lig * 8 < hd) {
                    float k8[8];
                    to_float<FMT>(kr[u][it], k8);
#pragma unroll
                    for (int i = 0; i < 8; i++) d += qv[it * 8 + i] * k8[i];
                }
            }
            d = half_warp_sum(d) * ks[u];  // q . (s k) = s (q . k)
            score[u] = jw + grp + u * 2 * W < c1 ? d : NEG_INF;
            mu = fmaxf(mu, score[u]);
        }
        if (mu == NEG_INF) continue;  // no valid position for this half-warp (shuffles are done)
        const float corr = exp2f(m - mu);
        l *= corr;
#pragma unroll
        for (int i = 0; i < 8 * ITERS; i++) acc[i] *= corr;
#pragma unroll
        for (int u = 0; u < UNROLL; u++) {
            const float p = exp2f(score[u] - mu);
            l += p;
            const float pv = p * vs[u];
#pragma unroll
            for (int it = 0; it < ITERS; it++) {
                if (it * 128 + lig * 8 < hd) {
                    float v8[8];
                    to_float<FMT>(vr[u][it], v8);
#pragma unroll
                    for (int i = 0; i < 8; i++) acc[it * 8 + i] += pv * v8[i];
                }
            }
        }
        m = mu;
    }

    // Merge the 2W half-warps of each query head, then write this split's partial result.
    if (lig == 0) sm_m[warp * 2 + grp] = m;
    for (int i = threadIdx.x; i < G * hd; i += blockDim.x) sm_acc[i] = 0.0f;
    if (threadIdx.x < G) sm_l[threadIdx.x] = 0.0f;
    __syncthreads();
    float M = NEG_INF;
    for (int w = g; w < NW; w += G) M = fmaxf(M, fmaxf(sm_m[2 * w], sm_m[2 * w + 1]));
    const float f = m == NEG_INF ? 0.0f : exp2f(m - M);
#pragma unroll
    for (int it = 0; it < ITERS; it++) {
        const int e = it * 128 + lig * 8;
        if (e < hd && f > 0.0f) {
#pragma unroll
            for (int i = 0; i < 8; i++) atomicAdd(&sm_acc[g * hd + e + i], acc[it * 8 + i] * f);
        }
    }
    if (lig == 0 && f > 0.0f) atomicAdd(&sm_l[g], l * f);
    __syncthreads();
    const size_t part0 = ((size_t)r * H + kvh * G) * nsplit + split;  // (r, head kvh*G, split)
    for (int i = threadIdx.x; i < G * hd; i += blockDim.x) {
        const int gg = i / hd, e = i % hd;
        part_acc[(part0 + (size_t)gg * nsplit) * hd + e] = sm_acc[i];
    }
    if (lane == 0 && stream == 0) {  // one warp per query head writes its m and l
        part_m[part0 + (size_t)g * nsplit] = M;
        part_l[part0 + (size_t)g * nsplit] = sm_l[g];
    }
}

#define ATTN_INSTANCE(NAME, FMT, ITERS)                                                                  \
    extern "C" __global__ void NAME(const __half* q, const void* kc, const void* vc, const float* k_scale, \
                                    const float* v_scale, const int* pos, int T, int H, int KV, int hd,    \
                                    int L, int chunk, int window, float qscale, float* part_acc,           \
                                    float* part_m, float* part_l) {                                        \
        attn_decode<FMT, ITERS>(q, kc, vc, k_scale, v_scale, pos, T, H, KV, hd, L, chunk, window, qscale,  \
                                part_acc, part_m, part_l);                                                  \
    }

ATTN_INSTANCE(attn_decode_fp16_1, KV_FP16, 1)
ATTN_INSTANCE(attn_decode_fp16_2, KV_FP16, 2)
ATTN_INSTANCE(attn_decode_int8_1, KV_INT8, 1)
ATTN_INSTANCE(attn_decode_int8_2, KV_INT8, 2)
ATTN_INSTANCE(attn_decode_fp8_1, KV_FP8, 1)
ATTN_INSTANCE(attn_decode_fp8_2, KV_FP8, 2)

// Merge the splits of each (row, head): grid R * H, any blockDim. Splits past the row's length
// (which a graph launched for the longest context still runs) and empty ones (m = -inf) drop out.
extern "C" __global__ void attn_combine(const float* __restrict__ part_acc, const float* __restrict__ part_m,
                                        const float* __restrict__ part_l, const int* __restrict__ pos, int T,
                                        int H, int hd, int nsplit, int chunk, __half* __restrict__ out, int ld_out) {
    const int r = blockIdx.x / H, h = blockIdx.x % H;
    const int len = pos[r / T] + r % T + 1;
    const int used = min(nsplit, (len + chunk - 1) / chunk);
    const size_t base = ((size_t)r * H + h) * nsplit;
    float M = NEG_INF;
    for (int s = 0; s < used; s++) M = fmaxf(M, part_m[base + s]);
    float lsum = 0.0f;
    for (int s = 0; s < used; s++)
        if (part_m[base + s] != NEG_INF) lsum += part_l[base + s] * exp2f(part_m[base + s] - M);
    const float inv = lsum > 0.0f ? 1.0f / lsum : 0.0f;
    for (int e = threadIdx.x; e < hd; e += blockDim.x) {
        float o = 0.0f;
        for (int s = 0; s < used; s++)
            if (part_m[base + s] != NEG_INF) o += part_acc[(base + s) * hd + e] * exp2f(part_m[base + s] - M);
        out[(size_t)r * ld_out + h * hd + e] = __float2half(o * inv);
    }
}
