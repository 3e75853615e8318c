// The element-wise and row-wise pieces of a decode step (everything but the matrix products and
// attention): embedding lookup, RMSNorm fused with the residual add, rotary embedding fused with
// the KV-cache append (and its quantization), the gated activation, bias adds, column gathers,
// and the choice of the next token. Companion files: gemv.cu (fp16/int8 weights), w4a16_gemv.cu
// (4-bit weights), attention.cu (decode attention).
//
// ================================================================================================
// Data layout (all row-major; R = rows of this step = batch * new tokens, row r = (b, t) = (r / T, r % T))
// ================================================================================================
//   h        float [R, D]   the residual stream, kept in fp32 across layers
//   x        fp16  [R, ld]  inputs of the matrix products (ld >= D, padded columns stay zero)
//   qkv      fp16  [R, ld]  q (H*hd) | k (KV*hd) | v (KV*hd), the output of the fused projection
//   q_out    fp16  [R, H, hd]  rotated queries
//   pos      int   [B]      positions already cached for batch row b: *device memory*, so that a
//                           captured CUDA graph replays with the current length
//   cache    per layer, [B, KV, L, hd]: fp16 values, or int8 / fp8 codes with a float scale per
//            (b, head, position) in a [B, KV, L] array (scale = max|x| / 127 or / 448)
//
// ================================================================================================
// Work decomposition
// ================================================================================================
//   One block per row for row-wise kernels (norms, argmax); rope_append: one block per (row, head)
//   with q, k and v heads side by side in blockIdx.y, the head staged in shared memory so the
//   optional q/k RMSNorm (qwen3), the rotation and the cache quantization (which needs max|x| of
//   the head: a block reduction) each take one pass.

#include "common.cuh"

// h[r] += delta[r] (when delta is given), then out[r] = h[r] / rms(h[r]) * w: the residual add of
// the previous sublayer fused with the next RMSNorm (one read and one write of h instead of two).
// With tok given, h[r] = E[tok[r]] * escale instead (the step's first kernel: the embedding and the
// first layer's norm in one pass). A row's values stay in registers between the two passes (up to
// NORM_PER_THREAD per thread; longer rows are read again).
#define NORM_PER_THREAD 16
extern "C" __global__ void add_rmsnorm(float* __restrict__ h, const __half* __restrict__ delta, int ld_delta,
                                       const float* __restrict__ w, __half* __restrict__ out, int ld_out,
                                       int D, float eps, const int* __restrict__ tok, const __half* __restrict__ E,
                                       float escale) {
    pdl_begin();
    __shared__ float red[32];
    const int r = blockIdx.x;
    float* hr = h + (size_t)r * D;
    const __half* er = tok ? E + (size_t)tok[r] * D : nullptr;
    const bool write_h = delta || tok;
    auto value = [&](int i) {  // the row's new h[i]
        if (er) return __half2float(er[i]) * escale;
        return hr[i] + (delta ? __half2float(delta[(size_t)r * ld_delta + i]) : 0.0f);
    };
    float keep[NORM_PER_THREAD], wk[NORM_PER_THREAD];
    float ss = 0.0f;
#pragma unroll
    for (int k = 0; k < NORM_PER_THREAD; k++) {  // every load first (h, delta, and w for later)
        const int i = threadIdx.x + k * blockDim.x;
        keep[k] = i < D ? value(i) : 0.0f;
        wk[k] = i < D ? w[i] : 0.0f;
    }
#pragma unroll
    for (int k = 0; k < NORM_PER_THREAD; k++) {
        const int i = threadIdx.x + k * blockDim.x;
        if (write_h && i < D) hr[i] = keep[k];
        ss += keep[k] * keep[k];
    }
    for (int i = threadIdx.x + NORM_PER_THREAD * blockDim.x; i < D; i += blockDim.x) {
        const float v = value(i);
        if (write_h) hr[i] = v;
        ss += v * v;
    }
    const float inv = rsqrtf(block_reduce(ss, red, false) / D + eps);
#pragma unroll
    for (int k = 0; k < NORM_PER_THREAD; k++) {
        const int i = threadIdx.x + k * blockDim.x;
        if (i < D) out[(size_t)r * ld_out + i] = __float2half(keep[k] * inv * wk[k]);
    }
    for (int i = threadIdx.x + NORM_PER_THREAD * blockDim.x; i < D; i += blockDim.x)
        out[(size_t)r * ld_out + i] = __float2half(hr[i] * inv * w[i]);
}

// y[r, n] += b[n] for n < N (biases of llama/qwen2 projections).
extern "C" __global__ void add_bias(__half* __restrict__ y, int ld, const __half* __restrict__ b, int N) {
    pdl_begin();
    const int r = blockIdx.y;
    for (int n = blockIdx.x * blockDim.x + threadIdx.x; n < N; n += gridDim.x * blockDim.x)
        y[(size_t)r * ld + n] = __float2half(__half2float(y[(size_t)r * ld + n]) + __half2float(b[n]));
}

// out[r, i] = act(gu[r, 2i]) * gu[r, 2i + 1]: the gated MLP, for products that did not fuse it (biases,
// prefill). Gate and up rows are interleaved in the fused weight (minillm/gpu/linear.py).
extern "C" __global__ void gated_act(const __half* __restrict__ gu, int ld_in, __half* __restrict__ out, int ld_out,
                                     int F, int act) {
    pdl_begin();
    const int r = blockIdx.y;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < F; i += gridDim.x * blockDim.x) {
        const float g = __half2float(gu[(size_t)r * ld_in + 2 * i]), u = __half2float(gu[(size_t)r * ld_in + 2 * i + 1]);
        out[(size_t)r * ld_out + i] = __float2half(gate_act(g, act) * u);
    }
}

// out[r, j] = x[r, perm[j]] for j < K (act-order weights read their input columns in group order).
extern "C" __global__ void gather_cols(const __half* __restrict__ x, int ld_in, const long long* __restrict__ perm,
                                       __half* __restrict__ out, int ld_out, int K) {
    pdl_begin();
    const int r = blockIdx.y;
    for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < K; j += gridDim.x * blockDim.x)
        out[(size_t)r * ld_out + j] = x[(size_t)r * ld_in + perm[j]];
}

// Cache formats (minillm/kvcache.py describes each).
#define KV_FP16 0
#define KV_INT8 1
#define KV_FP8 2
#define KV_INT4 3  // KIVI: new keys and values go to an fp16 window of L = R slots, slot p % R

// Rotary embedding (rotate_half pairs (i, i + rot/2), dims past rot unchanged), optional per-head
// RMSNorm before it (qwen3), then: queries to q_out, keys and values into the cache at position
// pos[b] + t, encoded in the cache's format. grid (R, H + 2 KV), blockDim a multiple of 32, hd <= 512.
extern "C" __global__ void rope_append(const __half* __restrict__ qkv, int ld_qkv, __half* __restrict__ q_out,
                                       const float* __restrict__ qn_w, const float* __restrict__ kn_w, float eps,
                                       const float* __restrict__ cos_t, const float* __restrict__ sin_t,
                                       const int* __restrict__ pos, int T, int H, int KV, int hd, int rot, int L,
                                       int fmt, void* __restrict__ kc, void* __restrict__ vc,
                                       float* __restrict__ k_scale, float* __restrict__ v_scale,
                                       const float* __restrict__ k_off, const float* __restrict__ v_off,
                                       int paired) {
    pdl_begin();
    __shared__ float v[512];
    __shared__ float red[32];
    const int r = blockIdx.x, j = blockIdx.y, b = r / T, t = r % T;
    const int p = pos[b] + t;
    const int kind = j < H ? 0 : (j < H + KV ? 1 : 2);  // query, key, value head
    const int head = kind == 0 ? j : (kind == 1 ? j - H : j - H - KV);
    const __half* src = qkv + (size_t)r * ld_qkv + (size_t)j * hd;  // heads are laid out q | k | v
    // paired (kernels.py qkv_row_order): a query or key head's rotated dims are stored (j, j + rot/2)
    // side by side; dim i < rot is then at 2 (i % (rot/2)) + i / (rot/2).
    const int hr = rot / 2;
    for (int i = threadIdx.x; i < hd; i += blockDim.x)
        v[i] = __half2float(src[paired && kind < 2 && i < rot ? 2 * (i % hr) + i / hr : i]);
    __syncthreads();
    if (kind < 2) {
        const float* nw = kind == 0 ? qn_w : kn_w;
        if (nw) {
            float ss = 0.0f;
            for (int i = threadIdx.x; i < hd; i += blockDim.x) ss += v[i] * v[i];
            const float inv = rsqrtf(block_reduce(ss, red, false) / hd + eps);
            for (int i = threadIdx.x; i < hd; i += blockDim.x) v[i] *= inv * nw[i];
            __syncthreads();
        }
        for (int i = threadIdx.x; i < hr; i += blockDim.x) {  // each pair belongs to one thread
            const float c = cos_t[(size_t)p * hr + i], s = sin_t[(size_t)p * hr + i];
            const float x1 = v[i], x2 = v[i + hr];
            v[i] = x1 * c - x2 * s;
            v[i + hr] = x2 * c + x1 * s;
        }
        __syncthreads();
    }
    if (kind == 0) {
        for (int i = threadIdx.x; i < hd; i += blockDim.x) q_out[((size_t)r * H + head) * hd + i] = __float2half(v[i]);
        return;
    }
    const size_t row = ((size_t)b * KV + head) * L + (fmt == KV_INT4 ? p % L : p);  // (b, head, position)
    void* cache = kind == 1 ? kc : vc;
    if (fmt == KV_FP16 || fmt == KV_INT4) {
        for (int i = threadIdx.x; i < hd; i += blockDim.x) ((__half*)cache)[row * hd + i] = __float2half(v[i]);
        return;
    }
    // The 8-bit formats code x - mu when the cache has offsets ([KV, hd] per layer; kvcache.py FP8KVCache).
    const float* off = kind == 1 ? k_off : v_off;
    if (off) {
        for (int i = threadIdx.x; i < hd; i += blockDim.x) v[i] -= off[(size_t)head * hd + i];
        __syncthreads();
    }
    float amax = 0.0f;
    for (int i = threadIdx.x; i < hd; i += blockDim.x) amax = fmaxf(amax, fabsf(v[i]));
    amax = block_reduce(amax, red, true);
    const float qmax = fmt == KV_INT8 ? 127.0f : 448.0f;
    const float s = amax > 0.0f ? amax / qmax : 1.0f;
    if (threadIdx.x == 0) (kind == 1 ? k_scale : v_scale)[row] = s;
    for (int i = threadIdx.x; i < hd; i += blockDim.x) {
        const float x = v[i] / s;
        if (fmt == KV_INT8) ((int8_t*)cache)[row * hd + i] = (int8_t)fminf(fmaxf(rintf(x), -127.0f), 127.0f);
        else ((uint8_t*)cache)[row * hd + i] = float_to_e4m3(x);
    }
}

// A hash of (seed, a, b) to a uniform float in (0, 1): counter-based, so every (step, vocabulary
// entry) draws independently with no RNG state to carry between graph replays.
__device__ __forceinline__ float uniform01(uint64_t seed, uint32_t a, uint32_t b) {
    uint64_t z = seed ^ ((uint64_t)a << 32 | b);
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    return ((float)(z >> 40) + 0.5f) * (1.0f / 16777216.0f);
}

// Every load of a round comes before any compare: a loop that loads, uses and loads again waits out
// one memory latency per iteration (32000 logits, 1024 threads, one at a time: 31 in a row, 14.8 us;
// ncu, bench/NOTES.md). 1024 threads x 32 take a vocabulary of up to 32768 in one round.
#define ARGMAX_BATCH 32

// The larger of two (value, index) candidates; the lower index on a tie (the first maximum wins).
__device__ __forceinline__ void argmax_pair(float& bv, int& bi, float ov, int oi) {
    if (ov > bv || (ov == bv && oi < bi)) {
        bv = ov;
        bi = oi;
    }
}

__device__ __forceinline__ void warp_argmax(float& bv, int& bi) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        const float ov = __shfl_xor_sync(FULL_MASK, bv, off);
        const int oi = __shfl_xor_sync(FULL_MASK, bi, off);
        argmax_pair(bv, bi, ov, oi);
    }
}

// This thread's best (value, index) over the logits i = threadIdx.x + k * blockDim.x; SAMPLE adds
// Gumbel noise -log(-log u) to logits * inv_temp.
template <int BATCH, bool SAMPLE>
__device__ __forceinline__ void scan_logits(const __half* __restrict__ row, int V, float inv_temp, uint64_t seed,
                                            uint32_t step, float& bv, int& bi) {
    for (int i0 = threadIdx.x; i0 < V; i0 += BATCH * blockDim.x) {
        float xs[BATCH];
#pragma unroll
        for (int u = 0; u < BATCH; u++) {
            const int i = i0 + u * blockDim.x;
            xs[u] = i < V ? __half2float(row[i]) : NEG_INF;
        }
#pragma unroll
        for (int u = 0; u < BATCH; u++) {
            const int i = i0 + u * blockDim.x;  // (past V: x = -inf, never taken)
            float x = xs[u];
            if (SAMPLE) x = x * inv_temp - __logf(-__logf(uniform01(seed, step, (uint32_t)i)));
            if (x > bv) { bv = x; bi = i; }  // i increases: the first maximum wins within a thread
        }
    }
}

// The next token of each row: argmax of the logits (inv_temp = 0), or a sample from
// softmax(logits * inv_temp) by the Gumbel-max trick: argmax(logits * inv_temp - log(-log u)) is
// distributed exactly as the softmax. Writes tok[b] and, with advance, moves pos[b] on by one, so
// the next replay of the step reads the new token at the new position. One block per row.
// mailbox (or null): pinned host memory [slots, rows], mapped into the device's address space
// (unified addressing), where the token also goes, at slot pos[b] % slots: the host reads it once
// the step's event has completed, so no device-to-host copy waits in the stream between two steps.
extern "C" __global__ void __launch_bounds__(1024) next_token(const __half* __restrict__ logits, int ld, int V, float inv_temp,
                                      unsigned long long seed, int* __restrict__ tok, int* __restrict__ pos,
                                      int advance, int* __restrict__ mailbox, int slots) {
    pdl_begin();
    __shared__ float best_v[32];
    __shared__ int best_i[32];
    const int b = blockIdx.x, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const __half* row = logits + (size_t)b * ld;
    float bv = NEG_INF;
    int bi = 0x7fffffff;
    const uint32_t step = (uint32_t)pos[b];
    if (inv_temp > 0.0f) scan_logits<8, true>(row, V, inv_temp, seed + b, step, bv, bi);  // (hash: registers)
    else scan_logits<ARGMAX_BATCH, false>(row, V, 0.0f, 0, step, bv, bi);
    warp_argmax(bv, bi);  // a shuffle tree per warp, then one over the warps' winners
    if (lane == 0) {
        best_v[warp] = bv;
        best_i[warp] = bi;
    }
    __syncthreads();
    if (warp == 0) {
        const int nwarps = blockDim.x >> 5;
        bv = lane < nwarps ? best_v[lane] : NEG_INF;
        bi = lane < nwarps ? best_i[lane] : 0x7fffffff;
        warp_argmax(bv, bi);
        if (lane == 0) {
            tok[b] = bi;
            if (advance) pos[b] += 1;
            if (mailbox) {
                mailbox[(size_t)(step % (uint32_t)slots) * gridDim.x + b] = bi;
                __threadfence_system();  // (before the kernel's end, which the host's event observes)
            }
        }
    }
}

// KIVI INT4 (Liu et al. 2024, sec. 3; minillm/kvcache.py Int4KVCache is the reference): when the last
// position written this step, pos[b] + T - 1, completes a block of R positions, the block is
// quantized out of the fp16 window: keys per channel over the R positions, values per position in
// groups of `group` along head_dim, both asymmetric 4-bit (scale = (hi - lo) / 15 over a range that
// contains 0, zero = round(-lo / scale)). Codes are packed two per byte along head_dim (low nibble
// first). The window keeps its values: positions of the block still read them until they are past.
// grid (B * KV), 128 threads. (The engine splits a prompt at block boundaries, so at most one block
// completes per step.)
// The scale is rounded up to fp16 (how it is stored) before the codes are chosen, as kvcache._asym4:
// 15 steps still span [lo, hi].
__device__ __forceinline__ void asym4_params(float lo, float hi, float& scale, float& zero) {
    lo = fminf(lo, 0.0f);
    hi = fmaxf(hi, 0.0f);
    scale = __half2float(__float2half_ru(hi > lo ? (hi - lo) / 15.0f : 1.0f));
    if (!(scale > 0.0f)) scale = 1.0f;  // a range below fp16's smallest step
    zero = fminf(fmaxf(rintf(-lo / scale), 0.0f), 15.0f);
}

__device__ __forceinline__ uint32_t asym4_code(float x, float scale, float zero) {
    return (uint32_t)fminf(fmaxf(rintf(x / scale) + zero, 0.0f), 15.0f);
}

extern "C" __global__ void kivi_flush(const __half* __restrict__ wk, const __half* __restrict__ wv,
                                      uint8_t* __restrict__ kq, uint8_t* __restrict__ vq,
                                      __half* __restrict__ ks, __half* __restrict__ kz, __half* __restrict__ vs,
                                      __half* __restrict__ vz, const int* __restrict__ pos, int T, int KV, int hd,
                                      int L, int R, int group) {
    pdl_begin();
    const int bk = blockIdx.x, b = bk / KV;
    const int last = pos[b] + T - 1;
    if ((last + 1) % R != 0) return;
    const int blk = last / R, p0 = blk * R;
    const int nb = (L + R - 1) / R, ngroups = hd / group;
    const __half* wkb = wk + (size_t)bk * R * hd;
    const __half* wvb = wv + (size_t)bk * R * hd;
    // Keys: a thread per pair of channels (one output byte per position).
    for (int c2 = threadIdx.x; c2 < hd / 2; c2 += blockDim.x) {
        float sc[2], zr[2];
        for (int h = 0; h < 2; h++) {
            float lo = 3.4e38f, hi = -3.4e38f;
            for (int j = 0; j < R; j++) {
                const float x = __half2float(wkb[(size_t)j * hd + 2 * c2 + h]);
                lo = fminf(lo, x);
                hi = fmaxf(hi, x);
            }
            asym4_params(lo, hi, sc[h], zr[h]);
            ks[((size_t)bk * nb + blk) * hd + 2 * c2 + h] = __float2half_rn(sc[h]);  // exact: rounded already
            kz[((size_t)bk * nb + blk) * hd + 2 * c2 + h] = __float2half_rn(zr[h]);
        }
        for (int j = 0; j < R; j++) {
            const uint32_t q0 = asym4_code(__half2float(wkb[(size_t)j * hd + 2 * c2]), sc[0], zr[0]);
            const uint32_t q1 = asym4_code(__half2float(wkb[(size_t)j * hd + 2 * c2 + 1]), sc[1], zr[1]);
            kq[((size_t)bk * L + p0 + j) * (hd / 2) + c2] = (uint8_t)(q0 | (q1 << 4));
        }
    }
    // Values: a thread per (position, group).
    for (int t = threadIdx.x; t < R * ngroups; t += blockDim.x) {
        const int j = t / ngroups, g = t % ngroups;
        const __half* x = wvb + (size_t)j * hd + g * group;
        float lo = 3.4e38f, hi = -3.4e38f;
        for (int i = 0; i < group; i++) {
            lo = fminf(lo, __half2float(x[i]));
            hi = fmaxf(hi, __half2float(x[i]));
        }
        float sc, zr;
        asym4_params(lo, hi, sc, zr);
        vs[((size_t)bk * L + p0 + j) * ngroups + g] = __float2half_rn(sc);
        vz[((size_t)bk * L + p0 + j) * ngroups + g] = __float2half_rn(zr);
        for (int i = 0; i < group; i += 2)
            vq[((size_t)bk * L + p0 + j) * (hd / 2) + (g * group + i) / 2] =
                (uint8_t)(asym4_code(__half2float(x[i]), sc, zr) | (asym4_code(__half2float(x[i + 1]), sc, zr) << 4));
    }
}
