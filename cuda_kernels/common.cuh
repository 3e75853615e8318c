// Helpers shared by the kernels of minillm's GPU decode step (included by the other .cu files).
#pragma once
#include <cuda_fp16.h>
#ifdef __CUDACC_RTC__  // NVRTC (cupy.RawModule) ships no <stdint.h>
typedef unsigned int uint32_t;
typedef unsigned char uint8_t;
typedef signed char int8_t;
typedef unsigned long long uint64_t;
#else
#include <stdint.h>
#endif

#define FULL_MASK 0xffffffffu
#define NEG_INF __int_as_float(0xff800000)  // NVRTC has no <math.h> INFINITY

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}

// Sum (or max) over the whole block; every thread gets the result. blockDim.x a multiple of 32.
// `red` is 32 floats of shared memory; the leading barrier lets a caller reuse it back to back.
__device__ __forceinline__ float block_reduce(float v, float* red, bool is_max) {
    v = is_max ? warp_max(v) : warp_sum(v);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    if (warp == 0) {
        float w = lane < nwarps ? red[lane] : (is_max ? NEG_INF : 0.0f);
        w = is_max ? warp_max(w) : warp_sum(w);
        if (lane == 0) red[0] = w;
    }
    __syncthreads();
    return red[0];
}

// FP8 E4M3 ("fn": no infinities, 448 the largest finite value). Decoding: the 7 magnitude bits
// placed at the top of a half's exponent+mantissa give 2^-8 times the value, for normal and
// subnormal codes alike (both formats' subnormals scale the same way), so one multiply by 256
// finishes it. Code 0x7f (NaN) is never written by the encoder below.
__device__ __forceinline__ float e4m3_to_float(uint32_t code) {
    unsigned short bits = (unsigned short)(((code & 0x80u) << 8) | ((code & 0x7fu) << 7));
    return __half2float(__ushort_as_half(bits)) * 256.0f;
}

// Round to nearest, ties to the even code, saturating at +-448 (minillm/quant/fp8.py encode_e4m3).
__device__ __forceinline__ uint8_t float_to_e4m3(float x) {
    float a = fminf(fabsf(x), 448.0f);
    uint32_t code;
    if (a < 0.015625f) {  // below 2^-6: subnormal steps of 2^-9 (rint: ties to even)
        code = (uint32_t)rintf(a * 512.0f);
    } else {
        int ex;
        frexpf(a, &ex);  // a = f * 2^ex, f in [0.5, 1): the unbiased exponent is ex - 1
        int e = ex - 1;
        int m = (int)rintf((ldexpf(a, -e) - 1.0f) * 8.0f);
        if (m == 8) { m = 0; e += 1; }
        code = (uint32_t)(((e + 7) << 3) | m);
    }
    return (uint8_t)((__float_as_uint(x) >> 31) ? (code | 0x80u) : code);
}

// The gated MLP's activation (act 0: SiLU, Llama's SwiGLU; 1: GELU tanh approximation, Gemma's GeGLU).
__device__ __forceinline__ float gate_act(float g, int act) {
    return act == 0 ? g / (1.0f + __expf(-g))
                    : 0.5f * g * (1.0f + tanhf(0.7978845608028654f * (g + 0.044715f * g * g * g)));
}

// (a & mask) | magic in one LOP3 (the compiler emits an AND and an OR when both constants are
// immediates: a LOP3 takes one immediate). The fp16 magic-number unpack of 4-bit codes uses it.
__device__ __forceinline__ uint32_t and_or(uint32_t a, uint32_t mask, uint32_t magic) {
    uint32_t d;
    asm("lop3.b32 %0, %1, %2, %3, 0xea;\n" : "=r"(d) : "r"(a), "r"(mask), "r"(magic));  // (a & b) | c
    return d;
}

// (a & mask) ^ bits in one LOP3, for the same reason (the int8 codes' byte under an fp16 exponent
// with its sign flipped: attention_mma.cu).
__device__ __forceinline__ uint32_t and_xor(uint32_t a, uint32_t mask, uint32_t bits) {
    uint32_t d;
    asm("lop3.b32 %0, %1, %2, %3, 0x6a;\n" : "=r"(d) : "r"(a), "r"(mask), "r"(bits));  // (a & b) ^ c
    return d;
}

// The quantization group of 32-code chunk c: a shift when chunks_per_group is a power of two
// (cpg_shift = its log2; every common group size), else a division (cpg_shift = -1).
__device__ __forceinline__ int group_of(int c, int chunks_per_group, int cpg_shift) {
    return cpg_shift >= 0 ? c >> cpg_shift : c / chunks_per_group;
}

// Write a warp's ROWS reduced outputs (lane 0 holds them): plainly, y[m, n0 + r], or, with act >= 0,
// for a fused gate/up product whose rows are interleaved (gate_i, up_i), y[m, (n0 + r) / 2] =
// act(gate_i) * up_i, so the gated activation needs no kernel and no round trip of its own.
template <int ROWS>
__device__ __forceinline__ void store_rows(__half* y, int ldy, int m, int n0, int N, const float* v, int act) {
    if (act < 0) {
#pragma unroll
        for (int r = 0; r < ROWS; ++r)
            if (n0 + r < N) y[(size_t)m * ldy + n0 + r] = __float2half_rn(v[r]);
    } else {
#pragma unroll
        for (int r = 0; r + 1 < ROWS; r += 2)
            if (n0 + r + 1 < N) y[(size_t)m * ldy + (n0 + r) / 2] = __float2half_rn(gate_act(v[r], act) * v[r + 1]);
    }
}

// 8 halves (one 16-byte load) -> 8 floats.
__device__ __forceinline__ void half8_to_float(uint4 raw, float* x) {
    const __half2* h = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const float2 f = __half22float2(h[i]);
        x[2 * i] = f.x;
        x[2 * i + 1] = f.y;
    }
}

// d += A B on the tensor cores: mma.sync.m16n8k16, fp16 A (16 x 16, four b32 registers) and B
// (16 x 8, two), fp32 accumulators (four). Fragment layouts: PTX ISA, "Matrix Fragments for
// mma.m16n8k16". Not volatile: the compiler may schedule independent loads around it.
__device__ __forceinline__ void mma_m16n8k16(float* d, uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                             uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// ------------------------------------------------------------------------------------------------
// What a batch-1 product does besides y = x W^T (the decode step; minillm/gpu/engine.py)
// ------------------------------------------------------------------------------------------------
// RMSNorm carried by the products around it. RMSNorm scales a row by one number: W (h * w / rms(h))
// = (W (h * w)) / rms(h). So the product that makes a residual branch (o_proj, down_proj) adds its
// output into h itself, writes the next product's input u = h * w * 2^-k (fp16; 2^k >= max |w|, so
// |u| <= |h|) and each block's sum of h^2; the next product multiplies its fp32 sums by
// 2^k / sqrt(sum h^2 / D + eps) before rounding. No norm kernel is launched and h is read once: a
// separate add_rmsnorm was 6 us (ncu) for 16 KB, 13% of a 7B W4 step.
//
// Rotary embedding and the cache append in the qkv product (pos non-null). The engine stores the
// rows of every query and key head paired, (d, d + hd/2) side by side (minillm/gpu/kernels.py
// qkv_row_order), so the two outputs a rotation mixes are rows n, n + 1 of one warp (or lane) and the
// product writes q and the fp16 cache's new key and value itself: no rope_append kernel and no round
// trip of qkv through memory (1.8 us a layer of a 7B step, bench/NOTES.md session 8).
//
// Passed by value (kernel parameters: read without a memory round trip); minillm/gpu/kernels.py
// builds it as a numpy record of the same layout.
struct EpilogueIO {
    const float* in_ss;  // consumer: the producer's per-block sums of h^2 (null: x is normalised)
    float* h;            // producer: the fp32 residual stream, row 0 (null: y is no residual branch)
    const float* w;      // producer: the next norm's weight
    __half* u;           // producer: the next product's input, row 0
    float* out_ss;       // producer: one sum of h^2 per block
    int in_blocks, D;    // consumer: partial sums to add; the row length
    float eps, in_scale, out_scale;  // consumer: eps, 2^k; producer: 2^-k
    const int* pos;      // rotary: the position of the new token (null: no rotary epilogue)
    const float* cos;    // rotary: cos, sin [positions, hd / 2] (GpuModel.rope_tables)
    const float* sin;
    __half* q;           // rotary: the rotated query [H, hd]
    __half* k;           // rotary: the layer's fp16 key and value caches [KV, L, hd] (batch row 0)
    __half* v;
    int H, KV, hd, L;    // heads, kv heads, head dim, cache positions
};

// The rotation's (cos, sin) for output rows (n, n + 1) at position pos; (1, 0) for a value head. A
// kernel asks for it well before its epilogue: the table row depends on pos, a second round trip.
__device__ __forceinline__ float2 rope_cs(const EpilogueIO& p, int n, int pos) {
    if (p.pos == nullptr || n / p.hd >= p.H + p.KV) return make_float2(1.0f, 0.0f);
    const size_t i = (size_t)pos * (p.hd >> 1) + ((n % p.hd) >> 1);
    return make_float2(p.cos[i], p.sin[i]);
}

// Outputs n, n + 1 (n even; a query or key head's pair (j, j + hd/2), or a value head's (d, d + 1))
// rotated and written where rope_append would write them, after the same fp16 rounding of qkv.
__device__ __forceinline__ void store_rope(const EpilogueIO& p, int n, int pos, float2 cs, float a, float b) {
    a = __half2float(__float2half_rn(a));
    b = __half2float(__float2half_rn(b));
    const int head = n / p.hd, d = n % p.hd, half = p.hd >> 1;
    if (head >= p.H + p.KV) {  // value: not rotated, stored in order
        __half* dst = p.v + ((size_t)(head - p.H - p.KV) * p.L + pos) * p.hd + d;
        dst[0] = __float2half_rn(a);
        dst[1] = __float2half_rn(b);
        return;
    }
    const int j = d >> 1;
    __half* dst = head < p.H ? p.q + (size_t)head * p.hd : p.k + ((size_t)(head - p.H) * p.L + pos) * p.hd;
    dst[j] = __float2half_rn(a * cs.x - b * cs.y);
    dst[j + half] = __float2half_rn(b * cs.x + a * cs.y);
}

// Consumer: the factor for this product's outputs (1 without an EpilogueIO). Lane 0 of every warp adds
// the same partial sums in the same order, so the factor is the same in every warp and every run.
// The loads are issued 16 at a time before any is added: a plain loop would wait out one L2
// latency per partial (16-32 of them at the start of every warp: +2-3 us per product; ncu).
// `parts`: where the partial sums are read (p.in_ss, or a copy a kernel staged in shared memory).
__device__ __forceinline__ float norm_in_scale(const EpilogueIO& p, const float* parts) {
    if (p.in_ss == nullptr) return 1.0f;
    const int n = p.in_blocks;
    float s = 0.0f;
    for (int i0 = threadIdx.x & 31; i0 < n; i0 += 32 * 16) {
        float v[16];
#pragma unroll
        for (int u = 0; u < 16; u++) v[u] = i0 + 32 * u < n ? parts[i0 + 32 * u] : 0.0f;
#pragma unroll
        for (int u = 0; u < 16; u++) s += v[u];
    }
    s = warp_sum(s);
    return p.in_scale * rsqrtf(s / p.D + p.eps);
}

// store_rows for lane 0, with the consumer's factor applied first; for a producer (row m = 0 only:
// batch 1), also h += y (y rounded to fp16 as the unfused path stores it), u = h * w * 2^-k, and the
// returned sum of the new h^2 over these outputs. NORM false: plain store_rows (the instances that
// carry no norm), so a kernel templated on NORM stores through this one call either way. hw: h[n0 + r]
// and w[n0 + r] at hw[r], hw[ROWS + r] when the kernel loaded them earlier (null: read here). ROPE
// (the instances for the qkv product, which also take a norm): rows n0, n0 + 1 go through store_rope.
template <int ROWS, bool NORM = true, bool ROPE = false>
__device__ __forceinline__ float store_rows_normed(__half* y, int ldy, int m, int n0, int N, float* v, int act,
                                                   const EpilogueIO& p, float scale, const float* hw = nullptr,
                                                   int pos = 0, float2 cs = make_float2(1.0f, 0.0f)) {
    float s = 0.0f;
    if constexpr (NORM) {
#pragma unroll
        for (int r = 0; r < ROWS; ++r) v[r] *= scale;
        if constexpr (ROPE && ROWS == 2) {  // the qkv product: rows in pairs (pos, cs: rope_cs)
            if (m == 0) {
                if (n0 < N) store_rope(p, n0, pos, cs, v[0], v[1]);
                return 0.0f;
            }
        }
    }
    store_rows<ROWS>(y, ldy, m, n0, N, v, act);
    if (NORM && p.h != nullptr && m == 0) {
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            const int n = n0 + r;
            if (n < N) {
                const float hn = (hw ? hw[r] : p.h[n]) + __half2float(__float2half_rn(v[r]));
                p.h[n] = hn;
                p.u[n] = __float2half_rn(hn * (hw ? hw[ROWS + r] : p.w[n]) * p.out_scale);
                s += hn * hn;
            }
        }
    }
    return s;
}

// Producer: the block's sum of h^2 (lane 0 of each warp holds its part), added in warp order and
// written to out_ss[block]. Every thread of the block must call it (a barrier inside).
__device__ __forceinline__ void norm_block_sum(const EpilogueIO& p, float s) {
    if (p.h == nullptr) return;
    __shared__ float part[32];
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = s;
    __syncthreads();
    if (threadIdx.x == 0) {
        float t = 0.0f;
        for (int w = 0; w < (int)(blockDim.x >> 5); ++w) t += part[w];
        p.out_ss[blockIdx.x] = t;
    }
}

// ------------------------------------------------------------------------------------------------
// Programmatic dependent launch (Hopper; minillm/gpu/launch.py)
// ------------------------------------------------------------------------------------------------
// In a stream, and in the decode step's CUDA graph, a kernel normally starts only after the one
// before it has completed and its writes are flushed. Launched with the programmatic
// stream-serialization attribute, a kernel is launched as soon as every block of the kernel before
// it has exited or triggered (pdl_trigger below), and must then wait, with griddepcontrol.wait,
// until that kernel's memory is visible. So
// every kernel here calls pdl_begin in every block before it reads or writes anything the kernel
// before it may write, early exits included: a kernel then cannot complete before the one it
// follows, and one wait covers every earlier kernel of the step. Before the wait a kernel may read
// what no kernel writes (weights) and what only kernels two or more launches back wrote: every
// kernel triggers after its own wait, so when this one launches, those have completed and are
// visible (decode attention reads the positions earlier steps cached and pos this way; only q and
// the new position come from the product before it). Without the attribute (older GPUs,
// MINILLM_PDL=0) it does nothing.
__device__ __forceinline__ void pdl_begin() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

// pdl_begin for a kernel that issued loads before it (weights, which no kernel writes). ptxas
// schedules each basic block on its own and may move the wait above loads that precede it in the
// source (waiting earlier is always correct): in every instance of the batch-1 W4 kernel it did, so
// the first step's weights, loaded "before the wait" since session 9, were asked for after it
// (nvdisasm: ACQBULK first). A branch ends the block and keeps the wait behind the loads; the one
// here is a check worth having anyway (a null pointer traps rather than reading address 0).
// tests/test_sass_order.py reads the compiled code. H100, 7B W4 decode step at 516 positions:
// 1949.3 / 1950.0 -> 1890.1 / 1889.8 us (bench/NOTES.md session 15).
__device__ __forceinline__ void pdl_begin_after_loads(const void* loaded) {
    if (loaded == nullptr) __trap();
    pdl_begin();
}

// Lets the next kernel launch once every block of this one has called it (or exited); a kernel calls
// it only after its own pdl_begin, so what the kernel before it wrote is visible to the one after.
// Attention calls it after its main loop, so the next kernel's blocks start while it finishes (its
// partial sums, merge and stores) and read what does not depend on it, their first weights, before
// they wait (session 9: 7B W4 step 2138 -> 2086 us). The batch-1 W4 kernel calls it before its main
// loop: with its first weights really loaded before its wait (pdl_begin_after_loads), the earlier
// its successor's blocks launch, the more of their loads overlap its end (session 15: 1891.7 /
// 1894.9 -> 1820.0 / 1820.1 us; in a sweep, after the main loop / at three quarters / half / a
// quarter of it / before it: 1897 / 1882 / 1864 / 1832 / 1822).
// Session 6 had measured a trigger at every block's start 5-10% slower, when that preload did not
// run and the waiting blocks only took SM slots (bench/NOTES.md).
__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// cp.async (sm_80): a copy from global to shared memory that holds no registers while in flight, so
// a warp can ask for its next block of data and compute on the current one meanwhile. A thread sees
// its own copies after cp_async_wait_prior; other threads of its warp after that and a __syncwarp.
// 16 bytes, both addresses aligned to 16; .cg: through L2 only (streamed once, nothing for L1 to keep).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
    const unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(s), "l"(gmem) : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }

// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait_prior() { asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory"); }

// Thread-block clusters (sm_90): the blocks of a cluster run at once on one GPC, and can write into
// each other's shared memory. The barrier is split: arrive (relaxed: no memory ordering, nothing
// needs it here) early, wait late. st_async stores a float into another block's shared memory and
// counts its 4 bytes on an mbarrier there (the mbarrier's phase completes once the bytes its
// owner expects have all arrived, and its owner then sees them), so the owner needs no barrier
// with the writers and no memory fence.
__device__ __forceinline__ void cluster_arrive_relaxed() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
#endif
}

__device__ __forceinline__ void cluster_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("barrier.cluster.wait.aligned;" ::: "memory");
#endif
}

// The shared::cluster address of `p` (a shared-memory variable) in block `rank` of the cluster.
__device__ __forceinline__ unsigned cluster_smem_addr(const void* p, unsigned rank) {
    unsigned out = 0;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(out) : "r"((unsigned)__cvta_generic_to_shared(p)), "r"(rank));
#endif
    return out;
}

__device__ __forceinline__ void mbar_init(unsigned long long* bar, unsigned arrivals) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n\tfence.mbarrier_init.release.cluster;"
                 ::"r"((unsigned)__cvta_generic_to_shared(bar)), "r"(arrivals) : "memory");
#endif
}

__device__ __forceinline__ void mbar_expect_tx(unsigned long long* bar, unsigned bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;"
                 ::"r"((unsigned)__cvta_generic_to_shared(bar)), "r"(bytes) : "memory");
#endif
}

__device__ __forceinline__ void mbar_wait(unsigned long long* bar, unsigned parity) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("{\n\t.reg .pred done;\n"
                 "WAIT:\n\tmbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n\t@!done bra WAIT;\n}"
                 ::"r"((unsigned)__cvta_generic_to_shared(bar)), "r"(parity) : "memory");
#endif
}

__device__ __forceinline__ void st_async(unsigned addr, float v, unsigned bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.f32 [%0], %1, [%2];"
                 ::"r"(addr), "f"(v), "r"(bar) : "memory");
#endif
}
