// qlora's CUDA kernels, compiled at run time by NVRTC for the device's architecture.
//
// One source, two precisions: the host defines QLORA_BF16 for the bf16 mode. `lp_t` is the
// type of matrix-product inputs and the KV cache (bf16 or f32); the residual stream, matrix
// outputs, norms and softmax stay f32 in both modes. No headers: bf16 is handled as raw bits,
// so NVRTC needs no include path. No atomics: every reduction has a fixed order, so a run
// repeats bit for bit on the same GPU.
//
// Shape letters as in the Rust code: t tokens, d hidden, h heads, kv kv-heads, hd head dim.

#define INFINITY __int_as_float(0x7f800000)
typedef unsigned char u8;
typedef unsigned short bf16_t;

__device__ __forceinline__ float bf16_to_f(bf16_t h) { return __uint_as_float(((unsigned)h) << 16); }
__device__ __forceinline__ bf16_t f_to_bf16(float f) {
    unsigned u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16_t)((u >> 16) | 0x40u);  // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);                                            // nearest even
    return (bf16_t)(u >> 16);
}

#ifdef QLORA_BF16
typedef bf16_t lp_t;
__device__ __forceinline__ float lp_to_f(lp_t v) { return bf16_to_f(v); }
__device__ __forceinline__ lp_t f_to_lp(float v) { return f_to_bf16(v); }
#else
typedef float lp_t;
__device__ __forceinline__ float lp_to_f(lp_t v) { return v; }
__device__ __forceinline__ lp_t f_to_lp(float v) { return v; }
#endif

// Programmatic dependent launch (sm_90+): the host may let a kernel start while the one
// before it on the stream finishes (its blocks are scheduled and run up to here); every kernel
// waits here, before its first memory access, until the previous grid has completed and its
// writes are visible. Without that launch attribute (and before sm_90) it does nothing.
// With the trigger on (the host's default) each block then lets the next kernel's blocks
// be scheduled at once, rather than when this grid's blocks exit: they take free SM room and
// run their own prologue up to this wait (the code tables of the GEMVs) while this one works.
// Safe because the trigger comes after the wait: when kernel k + 1 starts, kernel k − 1 has
// completed, and no prologue touches what kernel k reads or writes.
// The GEMVs call qlora_grid_wait_gemv and the decode attention's kernels qlora_grid_wait_att:
// the host sets the trigger for each group apart (QLORA_PDL_TRIGGER_GEMV, _ATT, _OTHER). By
// default the GEMVs and the attention trigger early and the rest does not: the rest's early
// trigger gave batch-1 decode 2 % more but batch 8 7 % less (runs 54 and 56, GPU-NOTES.md).
#ifdef QLORA_PDL_TRIGGER_OTHER
#define QLORA_TRIGGER_OTHER true
#else
#define QLORA_TRIGGER_OTHER false
#endif
#ifdef QLORA_PDL_TRIGGER_ATT
#define QLORA_TRIGGER_ATT true
#else
#define QLORA_TRIGGER_ATT false
#endif
#ifdef QLORA_PDL_TRIGGER_GEMV
#define QLORA_TRIGGER_GEMV true
#else
#define QLORA_TRIGGER_GEMV false
#endif
template <bool TRIGGER>
__device__ __forceinline__ void grid_wait_then() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
    if (TRIGGER) asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void qlora_grid_wait() { grid_wait_then<QLORA_TRIGGER_OTHER>(); }
// rope_store, the decode attention and its merge
__device__ __forceinline__ void qlora_grid_wait_att() { grid_wait_then<QLORA_TRIGGER_ATT>(); }
__device__ __forceinline__ void qlora_grid_wait_gemv() { grid_wait_then<QLORA_TRIGGER_GEMV>(); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Block-wide sum with a fixed order (warp trees, then warp 0 over the partials).
__device__ float block_sum(float v, float* shm) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) shm[warp] = v;
    __syncthreads();
    float r = (threadIdx.x < nw) ? shm[threadIdx.x] : 0.f;
    if (warp == 0) r = warp_sum(r);
    if (threadIdx.x == 0) shm[0] = r;
    __syncthreads();
    return shm[0];
}

// Row and column of element i of a [rows, f] matrix: 32-bit division where it fits (a 64-bit
// one is a long subroutine).
__device__ __forceinline__ void row_col(long i, int f, long* row, long* col) {
    if (i < 0xffffffffL) {
        unsigned q = (unsigned)i / (unsigned)f;
        *row = q;
        *col = (unsigned)i - q * (unsigned)f;
    } else {
        *row = i / f;
        *col = i % f;
    }
}

// i / d for a positive divisor that is usually a power of two (block sizes): a shift then,
// else the division. `shift` = block_shift(d).
__device__ __forceinline__ int block_shift(int d) { return (d & (d - 1)) == 0 ? __ffs(d) - 1 : -1; }
__device__ __forceinline__ long div_block(long i, int d, int shift) { return shift >= 0 ? i >> shift : i / d; }

// ---------------------------------------------------------------------------------------------
// Elementwise and row ops

// x[i, :] = table[ids[i], :]   ids [t], table [v, d] lp, x [t, d] f32
extern "C" __global__ void embed(const lp_t* __restrict__ table, const int* __restrict__ ids,
                                 float* __restrict__ x, int d) {
    qlora_grid_wait();
    const lp_t* row = table + (long)ids[blockIdx.x] * d;
    float* out = x + (long)blockIdx.x * d;
    for (int j = threadIdx.x; j < d; j += blockDim.x) out[j] = lp_to_f(row[j]);
}

// y = g * (x * 1/sqrt(mean(x²) + eps)), one block per row. Each thread keeps its RMS_PER
// elements (and their weights) in registers, loaded at once, so a row costs one round trip
// to memory instead of one per loop step. Rows longer than RMS_PER · blockDim read again.
// x [t, d] f32, y [t, d] lp; y32 (may be null) [t, d] gets y widened to f32 (the adapters' input).
#define RMS_PER 8
extern "C" __global__ void rms_norm(const float* __restrict__ x, const float* __restrict__ g,
                                    float eps, int d, lp_t* __restrict__ y, float* __restrict__ y32) {
    qlora_grid_wait();
    __shared__ float shm[32];
    const float* xr = x + (long)blockIdx.x * d;
    const int bd = blockDim.x, tid = threadIdx.x;
    float v[RMS_PER], w[RMS_PER];
#pragma unroll
    for (int k = 0; k < RMS_PER; k++) {
        int j = tid + k * bd;
        v[k] = j < d ? xr[j] : 0.f;
        w[k] = j < d ? g[j] : 0.f;
    }
    float s = 0.f;
#pragma unroll
    for (int k = 0; k < RMS_PER; k++) s = fmaf(v[k], v[k], s);
    for (int j = tid + RMS_PER * bd; j < d; j += bd) s = fmaf(xr[j], xr[j], s);
    s = block_sum(s, shm);
    float inv = 1.0f / sqrtf(s / (float)d + eps);
    lp_t* yr = y + (long)blockIdx.x * d;
#pragma unroll
    for (int k = 0; k < RMS_PER; k++) {
        int j = tid + k * bd;
        if (j < d) {
            lp_t o = f_to_lp(w[k] * (v[k] * inv));
            yr[j] = o;
            if (y32) y32[(long)blockIdx.x * d + j] = lp_to_f(o);
        }
    }
    for (int j = tid + RMS_PER * bd; j < d; j += bd) {
        lp_t o = f_to_lp(g[j] * (xr[j] * inv));
        yr[j] = o;
        if (y32) y32[(long)blockIdx.x * d + j] = lp_to_f(o);
    }
}

// a += b   (n elements)
extern "C" __global__ void add_f32(float* __restrict__ a, const float* __restrict__ b, long n) {
    qlora_grid_wait();
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) a[i] += b[i];
}

// y[i, :] += bias   y [t, ld] (the first n columns from col0)
extern "C" __global__ void add_bias(float* __restrict__ y, int ld, int col0,
                                    const float* __restrict__ bias, int n) {
    qlora_grid_wait();
    float* yr = y + (long)blockIdx.x * ld + col0;
    for (int j = threadIdx.x; j < n; j += blockDim.x) yr[j] += bias[j];
}

// out = lp(x)  /  out = f32(x)
extern "C" __global__ void f32_to_lp(const float* __restrict__ x, lp_t* __restrict__ out, long n) {
    qlora_grid_wait();
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = f_to_lp(x[i]);
}
extern "C" __global__ void lp_to_f32(const lp_t* __restrict__ x, float* __restrict__ out, long n) {
    qlora_grid_wait();
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = lp_to_f(x[i]);
}

// out[i, j] = silu(gu[i, j]) * gu[i, f + j]   gu [t, 2f] f32 (gate | up), out [t, f] lp
// out32 (may be null) [t, f] gets out widened to f32 (the adapters' input).
extern "C" __global__ void swiglu(const float* __restrict__ gu, int f, lp_t* __restrict__ out, long n,
                                  float* __restrict__ out32) {
    qlora_grid_wait();
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    long tok, j;
    row_col(i, f, &tok, &j);
    float g = gu[tok * 2 * f + j], u = gu[tok * 2 * f + f + j];
    lp_t o = f_to_lp(g / (1.0f + expf(-g)) * u);
    out[i] = o;
    if (out32) out32[i] = lp_to_f(o);
}

// One rotate-half pair (x1 at j, x2 at j + hd/2) by the angle whose cosine and sine are c, s:
// unfused products and sums, as the CPU computes them, and the same bits in every kernel that
// rotates (rope_store, attention_rope).
__device__ __forceinline__ void rope_pair(float* x1, float* x2, float c, float s) {
    float r1 = __fsub_rn(__fmul_rn(*x1, c), __fmul_rn(*x2, s));
    float r2 = __fadd_rn(__fmul_rn(*x2, c), __fmul_rn(*x1, s));
    *x1 = r1;
    *x2 = r2;
}

// RoPE (rotate-half) in place on the q and k columns of qkv, and the k/v rows stored into the
// paged cache at each token's slot. One block per (token, head) over the q, k and v heads,
// one thread per rotated pair (j, j + hd/2): no loop, so every load is in flight at once.
// qkv [t, ld] f32: q at col 0 (h·hd), k at h·hd (kv·hd), v after k; cos/sin [n_pos, hd/2];
// pos [t]; slot [t] (block · block_size + offset); kc/vc [slots, kv·hd] lp; qkv_lp (may be
// null) [t, ld] lp gets the rotated row. Grid (t, heads + 2·kvh), block ≥ hd/2 threads.
extern "C" __global__ void rope_store(float* __restrict__ qkv, int ld, int heads, int kvh, int hd,
                                      const float* __restrict__ cos_t, const float* __restrict__ sin_t,
                                      const int* __restrict__ pos, const int* __restrict__ slot,
                                      lp_t* __restrict__ kc, lp_t* __restrict__ vc, lp_t* __restrict__ qkv_lp) {
    qlora_grid_wait_att();
    int tok = blockIdx.x, head = blockIdx.y, half = hd / 2, j = threadIdx.x;
    if (j >= half) return;
    float* hp = qkv + (long)tok * ld + (long)head * hd;  // k heads follow q heads, v follow k
    float x1 = hp[j], x2 = hp[j + half];
    if (head < heads + kvh) {
        int ps = pos[tok];
        rope_pair(&x1, &x2, cos_t[(long)ps * half + j], sin_t[(long)ps * half + j]);
        hp[j] = x1;
        hp[j + half] = x2;
    }
    if (head >= heads) {
        int kvi = head - heads;
        lp_t* dst = (kvi < kvh ? kc : vc) + (long)slot[tok] * kvh * hd + (long)(kvi % kvh) * hd;
        dst[j] = f_to_lp(x1);
        dst[j + half] = f_to_lp(x2);
    }
    if (qkv_lp) {  // the rotated row as the matrix-product input type (prefill attention)
        lp_t* o = qkv_lp + (long)tok * ld + (long)head * hd;
        o[j] = f_to_lp(x1);
        o[j + half] = f_to_lp(x2);
    }
}

// Causal (and windowed) softmax of scores, one block per (row r, head h): row r is query
// position r + qoff among the row's keys (qoff > 0 for a block of query rows whose keys start
// before them), P[h, r, j] = exp(S[h, r, j] − max) / Σ for window-visible j ≤ r + qoff, else
// 0. S [heads, hstride] f32 rows of ld, P likewise in lp. With `staged`, the visible scores
// are read once into dynamic shared memory (ld floats) and exponentiated once; otherwise each
// pass reads them again. Both give the same bits.
extern "C" __global__ void softmax_causal(const float* __restrict__ S, int ld, long hstride, int window,
                                          lp_t* __restrict__ P, int qoff, int staged) {
    qlora_grid_wait();
    extern __shared__ float sm_row[];
    __shared__ float shm[32];
    int r = blockIdx.x, h = blockIdx.y, i = r + qoff;
    const float* sr = S + h * hstride + (long)r * ld;
    lp_t* pr = P + h * hstride + (long)r * ld;
    int hi = min(i, ld - 1);
    int lo = window > 0 ? max(0, i + 1 - window) : 0;
    float m = -INFINITY;
    for (int j = lo + threadIdx.x; j <= hi; j += blockDim.x) {
        float v = sr[j];
        if (staged) sm_row[j] = v;
        m = fmaxf(m, v);
    }
    // block max in a fixed order
    m = warp_max(m);
    __syncthreads();
    if ((threadIdx.x & 31) == 0) shm[threadIdx.x >> 5] = m;
    __syncthreads();
    float mm = -INFINITY;
    for (int w = 0; w < (int)(blockDim.x + 31) / 32; w++) mm = fmaxf(mm, shm[w]);
    __syncthreads();
    float sum = 0.f;
    for (int j = lo + threadIdx.x; j <= hi; j += blockDim.x) {
        float e = expf((staged ? sm_row[j] : sr[j]) - mm);
        if (staged) sm_row[j] = e;
        sum += e;
    }
    sum = block_sum(sum, shm);
    float inv = 1.0f / sum;
    for (int j = threadIdx.x; j < ld; j += blockDim.x)
        pr[j] = f_to_lp((j >= lo && j <= hi) ? (staged ? sm_row[j] : expf(sr[j] - mm)) * inv : 0.f);
}

// ---------------------------------------------------------------------------------------------
// Attention over the paged cache (decode and cached chunks). A block takes one token, up to
// ATT_HEADS query heads of one kv head (GQA: they share every key and value row it loads) and
// one of `splits` equal parts of the token's keys (flash-decoding: with few tokens, the parts
// fill the GPU, and `attention_merge` combines them in order). Each warp takes rounds of 8
// keys, a key to each group of 4 lanes: a lane loads every fourth V-element chunk of the key
// (16 bytes when the head dim allows) and makes its partial dots with each head's q from shared
// memory; the group sums them in a fixed order; then the round's online-softmax update, and the
// 8 value rows accumulated with the output dimensions across lanes (U at a time). Lanes whose
// key is past the end load the round's first key and weigh it 0, so every load is issued
// without a branch. The warps' partials are merged in warp order: no atomics.
// q rows in qkv [t, ld]; seq [t] (the token's sequence in the batch), pos [t]; tables
// [batch, max_blocks]; window 0 = none; hd ≤ 256, even. Grid (kvh · hgroups · splits, t):
// hgroups blocks of ≤ hpb heads per kv head. splits = 1: out [t, h·hd] lp and out32 (may be
// null) the same widened to f32. splits > 1: part_ml [t, heads, splits] (max, sum) and
// part_acc [t, heads, splits, hd] (unnormalized, relative to that max) for attention_merge.
#define ATT_WARPS 4
#define ATT_HEADS 4
#define ATT_KEYS 8  // keys a warp takes per round (32 lanes / 4)
#define ATT_MAX_HD 256

template <int V> struct KvChunk;  // V elements of lp_t: float[V] from one load
#ifdef QLORA_BF16
template <> struct KvChunk<8> {
    static __device__ __forceinline__ void load(const lp_t* p, float* o) {
        uint4 u = *reinterpret_cast<const uint4*>(p);
        unsigned w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
        for (int i = 0; i < 4; i++) { o[2 * i] = __uint_as_float(w[i] << 16); o[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u); }
    }
};
template <> struct KvChunk<4> {
    static __device__ __forceinline__ void load(const lp_t* p, float* o) {
        uint2 u = *reinterpret_cast<const uint2*>(p);
        o[0] = __uint_as_float(u.x << 16); o[1] = __uint_as_float(u.x & 0xffff0000u);
        o[2] = __uint_as_float(u.y << 16); o[3] = __uint_as_float(u.y & 0xffff0000u);
    }
};
template <> struct KvChunk<2> {
    static __device__ __forceinline__ void load(const lp_t* p, float* o) {
        unsigned u = *reinterpret_cast<const unsigned*>(p);
        o[0] = __uint_as_float(u << 16); o[1] = __uint_as_float(u & 0xffff0000u);
    }
};
#else
template <> struct KvChunk<4> {
    static __device__ __forceinline__ void load(const lp_t* p, float* o) {
        float4 u = *reinterpret_cast<const float4*>(p);
        o[0] = u.x; o[1] = u.y; o[2] = u.z; o[3] = u.w;
    }
};
template <> struct KvChunk<2> {
    static __device__ __forceinline__ void load(const lp_t* p, float* o) {
        float2 u = *reinterpret_cast<const float2*>(p);
        o[0] = u.x; o[1] = u.y;
    }
};
#endif

// V: elements of a key chunk; U: output dims a lane accumulates per pass over the value row.
// Keys of a part asked of L2 before the grid wait (attention_body's prologue).
#define ATT_PREFETCH_KEYS 128

// With ROPE (attention_rope, one token): q and the new key arrive unrotated in qkv; the block
// rotates its heads' q into shared memory, and the blocks whose part holds the token's own
// position rotate its key, keep it and its value (rounded to lp, as the cache holds them) in
// shared memory for that key's turn, and the first head block of the kv head stores both at
// `slot`: what rope_store then attention would compute, to the bit, in one launch. Either way
// the prologue, which reads only what was written before the previous kernel (the batch's
// metadata, the block table, the older keys), runs before the grid wait: the positions, the
// part's bounds and table, and the part's first ATT_PREFETCH_KEYS keys and values asked of L2
// (`prefetch` 0: not asked).
template <int V, int U, bool ROPE>
__device__ __forceinline__ void attention_body(
    const float* __restrict__ qkv, int ld, lp_t* kc, lp_t* vc,
    const int* __restrict__ seq, const int* __restrict__ pos, const int* __restrict__ tables,
    int max_blocks, int block_size, int heads, int kvh, int hd, int window, float scale, int hpb,
    int splits, lp_t* __restrict__ out, float* __restrict__ out32, float* __restrict__ part_ml,
    float* __restrict__ part_acc, const float* __restrict__ cos_t, const float* __restrict__ sin_t,
    const int* __restrict__ slot, int prefetch) {
    constexpr int E = ATT_MAX_HD / (32 * U);  // value passes a lane may need
    __shared__ float qs[ATT_HEADS][ATT_MAX_HD];
    __shared__ float wm[ATT_WARPS][ATT_HEADS], wl[ATT_WARPS][ATT_HEADS], wf[ATT_WARPS][ATT_HEADS];
    __shared__ float gls[ATT_HEADS], gms[ATT_HEADS];
    __shared__ float wacc[ATT_WARPS][ATT_HEADS][ATT_MAX_HD];
    __shared__ __align__(16) lp_t knew[ROPE ? ATT_MAX_HD : 1], vnew[ROPE ? ATT_MAX_HD : 1];
    const int group = heads / kvh, hgroups = (group + hpb - 1) / hpb;
    const int split = blockIdx.x % splits, hb = blockIdx.x / splits;
    const int kvhead = hb / hgroups, head0 = kvhead * group + (hb % hgroups) * hpb;
    const int nh = min(hpb, kvhead * group + group - head0);
    const int tok = blockIdx.y;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, key = lane >> 2, part = lane & 3;
    const int p = pos[tok];
    const int lo = window > 0 ? max(0, p + 1 - window) : 0;
    const int per = (p + 1 - lo + splits - 1) / splits;
    const int a = lo + split * per, b = min(p + 1, a + per);
    const int* table = tables + (long)seq[tok] * max_blocks;
    const long row = (long)kvh * hd;
    const int nchunks = hd / V;
    const int half = hd / 2;
    if (prefetch) {
        // 128-byte lines of the part's first keys' K and V rows (the token's own key, not
        // written yet with ROPE, is skipped).
        const int lines = (int)((hd * sizeof(lp_t) + 127) / 128);
        const int nk = min(b, a + ATT_PREFETCH_KEYS) - a;
        for (int i = threadIdx.x; i < nk * lines * 2; i += blockDim.x) {
            const int j = a + i / (lines * 2), r = i % (lines * 2);
            if (ROPE && j == p) continue;
            const long at = ((long)table[j / block_size] * block_size + j % block_size) * row + (long)kvhead * hd;
            const char* line = reinterpret_cast<const char*>((r < lines ? kc : vc) + at) + (r % lines) * 128;
            asm volatile("prefetch.global.L2 [%0];" ::"l"(line));
        }
    }
    float cs = 0.f, sn = 0.f;
    if (ROPE && threadIdx.x < half) { cs = cos_t[(long)p * half + threadIdx.x]; sn = sin_t[(long)p * half + threadIdx.x]; }
    qlora_grid_wait_att();
    const float* q = qkv + (long)tok * ld + (long)head0 * hd;
    if (ROPE) {
        // blockDim.x ≥ hd / 2 (the host's check): thread j rotates pair j of every head.
        const int j = threadIdx.x;
        if (j < half) {
            for (int h = 0; h < nh; h++) {
                float x1 = q[h * hd + j], x2 = q[h * hd + j + half];
                rope_pair(&x1, &x2, cs, sn);
                qs[h][j] = x1;
                qs[h][j + half] = x2;
            }
            if (a <= p && p < b) {
                const float* kp = qkv + (long)tok * ld + (long)(heads + kvhead) * hd;
                const float* vp = kp + (long)kvh * hd;
                float x1 = kp[j], x2 = kp[j + half];
                rope_pair(&x1, &x2, cs, sn);
                knew[j] = f_to_lp(x1);
                knew[j + half] = f_to_lp(x2);
                vnew[j] = f_to_lp(vp[j]);
                vnew[j + half] = f_to_lp(vp[j + half]);
                if (hb % hgroups == 0) {
                    const long at = (long)slot[tok] * row + (long)kvhead * hd;
                    kc[at + j] = knew[j];
                    kc[at + j + half] = knew[j + half];
                    vc[at + j] = vnew[j];
                    vc[at + j + half] = vnew[j + half];
                }
            }
        }
    } else {
        for (int i = threadIdx.x; i < nh * hd; i += blockDim.x) qs[i / hd][i % hd] = q[i];
    }
    float m[ATT_HEADS], l[ATT_HEADS], acc[ATT_HEADS][E][U];
#pragma unroll
    for (int h = 0; h < ATT_HEADS; h++) {
        m[h] = -INFINITY; l[h] = 0.f;
#pragma unroll
        for (int e = 0; e < E; e++)
#pragma unroll
            for (int u = 0; u < U; u++) acc[h][e][u] = 0.f;
    }
    __syncthreads();
    for (int j0 = a + warp * ATT_KEYS; j0 < b; j0 += ATT_WARPS * ATT_KEYS) {
        const int j = j0 + key;
        const bool valid = j < b;
        const int jl = valid ? j : j0;  // past the end: the round's first key, weighed 0
        const long base = ((long)table[jl / block_size] * block_size + jl % block_size) * row + (long)kvhead * hd;
        const lp_t* krow = (ROPE && jl == p) ? knew : kc + base;
        float sc[ATT_HEADS];
#pragma unroll
        for (int h = 0; h < ATT_HEADS; h++) sc[h] = 0.f;
#pragma unroll 4
        for (int c = part; c < nchunks; c += 4) {
            float kv[V];
            KvChunk<V>::load(krow + c * V, kv);
#pragma unroll
            for (int h = 0; h < ATT_HEADS; h++) {
                if (h < nh) {
#pragma unroll
                    for (int e = 0; e < V; e++) sc[h] = fmaf(qs[h][c * V + e], kv[e], sc[h]);
                }
            }
        }
        float w[ATT_HEADS];
#pragma unroll
        for (int h = 0; h < ATT_HEADS; h++) {
            w[h] = 0.f;
            if (h >= nh) continue;  // uniform over the block
            // The group's four partial dots, in a fixed order (0+1, 2+3, then the pair sums).
            float s = sc[h];
            float o1 = __shfl_xor_sync(0xffffffffu, s, 1);
            s = (part & 1) ? o1 + s : s + o1;
            float o2 = __shfl_xor_sync(0xffffffffu, s, 2);
            s = (part & 2) ? o2 + s : s + o2;
            s = valid ? s * scale : -INFINITY;
            float mn = fmaxf(m[h], warp_max(s));  // finite: the round's first key is valid
            float corr = expf(m[h] - mn);         // 0 when m = -inf
            w[h] = valid ? expf(s - mn) : 0.f;
            l[h] = l[h] * corr + warp_sum(part == 0 ? w[h] : 0.f);
            m[h] = mn;
#pragma unroll
            for (int e = 0; e < E; e++)
#pragma unroll
                for (int u = 0; u < U; u++) acc[h][e][u] *= corr;
        }
#pragma unroll
        for (int jj = 0; jj < ATT_KEYS; jj++) {
            const long bj = __shfl_sync(0xffffffffu, base, jj * 4);
            float wj[ATT_HEADS];
#pragma unroll
            for (int h = 0; h < ATT_HEADS; h++) wj[h] = __shfl_sync(0xffffffffu, w[h], jj * 4);
#pragma unroll
            for (int e = 0; e < E; e++) {
                const int d = (lane + 32 * e) * U;
                if (d < hd) {
                    float vv[U];
                    // the key this lane group loaded (the round's first past the end)
                    const int jk = j0 + jj < b ? j0 + jj : j0;
                    KvChunk<U>::load((ROPE && jk == p) ? vnew + d : vc + bj + d, vv);
#pragma unroll
                    for (int h = 0; h < ATT_HEADS; h++)
#pragma unroll
                        for (int u = 0; u < U; u++) acc[h][e][u] = fmaf(wj[h], vv[u], acc[h][e][u]);
                }
            }
        }
    }
    if (lane == 0) {
#pragma unroll
        for (int h = 0; h < ATT_HEADS; h++) { wm[warp][h] = m[h]; wl[warp][h] = l[h]; }
    }
#pragma unroll
    for (int h = 0; h < ATT_HEADS; h++)
#pragma unroll
        for (int e = 0; e < E; e++)
#pragma unroll
            for (int u = 0; u < U; u++) {
                const int d = (lane + 32 * e) * U + u;
                if (h < nh && d < hd) wacc[warp][h][d] = acc[h][e][u];
            }
    __syncthreads();
    // The warps' weights, once per (warp, head).
    if (threadIdx.x < nh) {
        const int h = threadIdx.x;
        float gm = -INFINITY;
        for (int w = 0; w < ATT_WARPS; w++) gm = fmaxf(gm, wm[w][h]);
        float gl = 0.f;
        for (int w = 0; w < ATT_WARPS; w++) {
            float f = wl[w][h] > 0.f ? expf(wm[w][h] - gm) : 0.f;
            wf[w][h] = f;
            gl += wl[w][h] * f;
        }
        gms[h] = gm; gls[h] = gl;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < nh * hd; i += blockDim.x) {
        const int h = i / hd, d = i % hd;
        float acc_ = 0.f;
        for (int w = 0; w < ATT_WARPS; w++) if (wf[w][h] > 0.f) acc_ += wacc[w][h][d] * wf[w][h];
        const long oh = (long)tok * heads + head0 + h;
        if (splits == 1) {
            lp_t v = f_to_lp(acc_ / gls[h]);
            out[oh * hd + d] = v;
            if (out32) out32[oh * hd + d] = lp_to_f(v);
        } else {
            part_acc[(oh * splits + split) * hd + d] = acc_;
            if (d == 0) { part_ml[2 * (oh * splits + split)] = gms[h]; part_ml[2 * (oh * splits + split) + 1] = gls[h]; }
        }
    }
}

#define ATTENTION_KERNEL(NAME, V, U, ROPE)                                                                 \
    extern "C" __global__ void __launch_bounds__(ATT_WARPS * 32)                                         \
    NAME(const float* __restrict__ qkv, int ld, lp_t* kc, lp_t* vc, const int* __restrict__ seq,          \
         const int* __restrict__ pos, const int* __restrict__ tables, int max_blocks, int block_size,     \
         int heads, int kvh, int hd, int window, float scale, int hpb, int splits, lp_t* __restrict__ out, \
         float* __restrict__ out32, float* __restrict__ part_ml, float* __restrict__ part_acc,            \
         const float* __restrict__ cos_t, const float* __restrict__ sin_t, const int* __restrict__ slot,   \
         int prefetch) {                                                                                   \
        attention_body<V, U, ROPE>(qkv, ld, kc, vc, seq, pos, tables, max_blocks, block_size, heads, kvh,  \
                                   hd, window, scale, hpb, splits, out, out32, part_ml, part_acc, cos_t,   \
                                   sin_t, slot, prefetch);                                                 \
    }
// attention_v: hd a multiple of 16 bytes' worth of elements; attention_s: any even hd. The
// _rope kernels rotate and store the token's key themselves (one token a sequence, t = 1).
#ifdef QLORA_BF16
ATTENTION_KERNEL(attention_v, 8, 4, false)
ATTENTION_KERNEL(attention_rope_v, 8, 4, true)
#else
ATTENTION_KERNEL(attention_v, 4, 4, false)
ATTENTION_KERNEL(attention_rope_v, 4, 4, true)
#endif
ATTENTION_KERNEL(attention_s, 2, 2, false)
ATTENTION_KERNEL(attention_rope_s, 2, 2, true)

// The splits of `attention` combined in split order: out [t, heads · hd] (lp) and out32.
// Grid (heads, t); part_ml and part_acc as attention writes them.
extern "C" __global__ void attention_merge(const float* __restrict__ part_ml, const float* __restrict__ part_acc,
                                           int heads, int hd, int splits, lp_t* __restrict__ out,
                                           float* __restrict__ out32) {
    qlora_grid_wait_att();
    __shared__ float f[32];
    __shared__ float gl;
    const long oh = (long)blockIdx.y * heads + blockIdx.x;
    const float* ml = part_ml + 2 * oh * splits;
    if (threadIdx.x == 0) {
        float gm = -INFINITY;
        for (int s = 0; s < splits; s++) if (ml[2 * s + 1] > 0.f) gm = fmaxf(gm, ml[2 * s]);
        float l = 0.f;
        for (int s = 0; s < splits; s++) {
            float w = ml[2 * s + 1] > 0.f ? expf(ml[2 * s] - gm) : 0.f;
            f[s] = w;
            l += ml[2 * s + 1] * w;
        }
        gl = l;
    }
    __syncthreads();
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float a = 0.f;
        for (int s = 0; s < splits; s++) if (f[s] > 0.f) a += part_acc[(oh * splits + s) * hd + d] * f[s];
        lp_t v = f_to_lp(a / gl);
        out[oh * hd + d] = v;
        if (out32) out32[oh * hd + d] = lp_to_f(v);
    }
}

// ---------------------------------------------------------------------------------------------
// Dequantization (bit-exact with the CPU: one f32 product per element)

// bitsandbytes 4-bit: element i = code[nibble i] * absmax[i / blocksize], high nibble first.
// packed [ceil(n/2)], out [n] lp. One thread per byte.
extern "C" __global__ void dequant4(const u8* __restrict__ packed, const float* __restrict__ absmax,
                                    const float* __restrict__ code, int blocksize, long n,
                                    lp_t* __restrict__ out) {
    qlora_grid_wait();
    __shared__ float cs[16];
    if (threadIdx.x < 16) cs[threadIdx.x] = code[threadIdx.x];
    __syncthreads();
    long b = (long)blockIdx.x * blockDim.x + threadIdx.x;
    long i = 2 * b;
    if (i >= n) return;
    const int sh = block_shift(blocksize);
    u8 v = packed[b];
    out[i] = f_to_lp(__fmul_rn(cs[v >> 4], absmax[div_block(i, blocksize, sh)]));
    if (i + 1 < n) out[i + 1] = f_to_lp(__fmul_rn(cs[v & 15], absmax[div_block(i + 1, blocksize, sh)]));
}

// The same, coalesced: a warp covers 512 bytes (1024 elements); each lane dequantizes 4 words
// of 4 bytes, strided by the warp, so neighbouring lanes read neighbouring words and write
// neighbouring 8-element pieces. Needs n % 32 == 0 and blocksize % 32 == 0; n32 = n / 32.
extern "C" __global__ void dequant4_x32(const unsigned* __restrict__ packed, const float* __restrict__ absmax,
                                        const float* __restrict__ code, int blocksize, long n32,
                                        lp_t* __restrict__ out) {
    qlora_grid_wait();
    __shared__ float cs[16];
    if (threadIdx.x < 16) cs[threadIdx.x] = code[threadIdx.x];
    __syncthreads();
    long gtid = (long)blockIdx.x * blockDim.x + threadIdx.x;
    long warp = gtid >> 5;
    int lane = threadIdx.x & 31;
    long words = 4 * n32;
    const int sh = block_shift(blocksize);
    unsigned w[4];
    float s[4];
#pragma unroll
    for (int k = 0; k < 4; k++) {
        long wi = warp * 128 + lane + 32 * k;
        w[k] = wi < words ? __ldg(packed + wi) : 0u;
        s[k] = wi < words ? __ldg(absmax + div_block(wi * 8, blocksize, sh)) : 0.f;
    }
#pragma unroll
    for (int k = 0; k < 4; k++) {
        long wi = warp * 128 + lane + 32 * k;
        if (wi >= words) continue;
        float v[8];
#pragma unroll
        for (int b = 0; b < 4; b++) {
            unsigned byte = (w[k] >> (8 * b)) & 0xffu;
            v[2 * b] = __fmul_rn(cs[byte >> 4], s[k]);
            v[2 * b + 1] = __fmul_rn(cs[byte & 15], s[k]);
        }
#ifdef QLORA_BF16
        unsigned p[4];
        // The hardware's round-to-nearest-even pair conversion: f_to_bf16's bits for every
        // value but NaN (a NaN either way; NaN payloads differ between CPU and GPU products
        // anyway), in one instruction for two.
#pragma unroll
        for (int e = 0; e < 4; e++) asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(p[e]) : "f"(v[2 * e + 1]), "f"(v[2 * e]));
        ((uint4*)out)[wi] = make_uint4(p[0], p[1], p[2], p[3]);
#else
        float4* o = (float4*)(out + wi * 8);
        o[0] = make_float4(v[0], v[1], v[2], v[3]);
        o[1] = make_float4(v[4], v[5], v[6], v[7]);
#endif
    }
}

// LLM.int8: element (r, j) = (q * SCB[r]) * (1/127).   cb [rows, cols] int8, out lp
extern "C" __global__ void dequant_int8(const signed char* __restrict__ cb, const float* __restrict__ scb,
                                        int cols, long n, lp_t* __restrict__ out) {
    qlora_grid_wait();
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    out[i] = f_to_lp(__fmul_rn(__fmul_rn((float)cb[i], scb[i / cols]), 7.874016e-3f));
}

// GPTQ/AWQ: element (r, c) = scales[r, g] * (q - zeros[r, g]), g = g_idx[c]; exact in f32 (a
// 16-bit scale times a small integer). codes [rows, cols]: 4-bit two a byte (element 2k in the
// high nibble) or 8-bit, in stored column order; scales, zeros f32 [rows, groups]; perm (may
// be null): stored column c is input column perm[c] (act-order sorted by group); out lp
// [rows, cols] in input order
extern "C" __global__ void dequant_grouped(const unsigned char* __restrict__ codes,
                                           const unsigned* __restrict__ g_idx,
                                           const unsigned* __restrict__ perm,
                                           const float* __restrict__ scales,
                                           const float* __restrict__ zeros, int cols, int groups,
                                           int bits, long n, lp_t* __restrict__ out) {
    qlora_grid_wait();
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    long r, c;
    row_col(i, cols, &r, &c);
    int q = bits == 8 ? codes[i] : (codes[i >> 1] >> ((~i & 1) * 4)) & 15;
    long k = r * groups + g_idx[c];
    out[r * cols + (perm ? perm[c] : c)] = f_to_lp(__fmul_rn(scales[k], (float)q - zeros[k]));
}

// ---------------------------------------------------------------------------------------------
// 32 consecutive activations (16-byte loads) widened to f32.
__device__ __forceinline__ void load_x32(const lp_t* __restrict__ xr, float* xv) {
#ifdef QLORA_BF16
    const uint4* xp = (const uint4*)xr;
#pragma unroll
    for (int e = 0; e < 4; e++) {
        uint4 u = xp[e];
        unsigned uu[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
        for (int f = 0; f < 4; f++) {
            xv[e * 8 + 2 * f] = __uint_as_float(uu[f] << 16);
            xv[e * 8 + 2 * f + 1] = __uint_as_float(uu[f] & 0xffff0000u);
        }
    }
#else
    const float4* xp = (const float4*)xr;
#pragma unroll
    for (int e = 0; e < 8; e++) {
        float4 u = xp[e];
        xv[4 * e] = u.x; xv[4 * e + 1] = u.y; xv[4 * e + 2] = u.z; xv[4 * e + 3] = u.w;
    }
#endif
}

// Σ code[nibble i] · x[i] over the 32 codes of q (high nibble first in each byte), in order.
// Both nibbles of a word are turned into byte offsets into the code table at once (·4 by the
// shifts and one mask), so each element costs one byte extract, one shared load (register +
// immediate address) and one FMA.
__device__ __forceinline__ float dot32(uint4 q, const float* xv, const float* cs) {
    unsigned w[4] = {q.x, q.y, q.z, q.w};
    float part = 0.f;
#pragma unroll
    for (int e = 0; e < 4; e++) {
        unsigned hi = (w[e] >> 2) & 0x3c3c3c3cu;
        unsigned lo = (w[e] << 2) & 0x3c3c3c3cu;
#pragma unroll
        for (int b = 0; b < 4; b++) {
            // PRMT: one instruction per offset (a shift and a mask are folded into two).
            unsigned oh = __byte_perm(hi, 0u, 0x4440u + b), ol = __byte_perm(lo, 0u, 0x4440u + b);
            part = fmaf(*(const float*)((const char*)cs + oh), xv[e * 8 + 2 * b], part);
            part = fmaf(*(const float*)((const char*)cs + ol), xv[e * 8 + 2 * b + 1], part);
        }
    }
    return part;
}

// The GEMV's end: each row group's partial sums reduced in a fixed order (warp trees, then
// the group's two warps) and stored (or added) once.
#define GEMV_R 4
#define GEMV_GROUP 64
#define GEMV_GROUPS 4
template <int T>
__device__ __forceinline__ void gemv_store(float (&acc)[GEMV_R][T], float (&red)[GEMV_GROUPS][2][GEMV_R * T],
                                           int group, int gt, int r0, int rows, int t, float* __restrict__ y,
                                           int ld, int accumulate) {
    int lane = threadIdx.x & 31, wig = gt >> 5;
#pragma unroll
    for (int r = 0; r < GEMV_R; r++)
#pragma unroll
        for (int k = 0; k < T; k++) {
            float v = warp_sum(acc[r][k]);
            if (lane == 0) red[group][wig][r * T + k] = v;
        }
    __syncthreads();
    if (gt < GEMV_R * T) {
        int r = gt / T, k = gt % T;
        if (k < t && r0 + r < rows) {
            float v = red[group][0][gt] + red[group][1][gt];
            float* o = y + (long)k * ld + r0 + r;
            *o = accumulate ? *o + v : v;
        }
    }
}

// Fused bitsandbytes 4-bit GEMV for decode: y[tok, r] (+)= Σ_j x[tok, j] · W[r, j], T tokens
// (t ≤ T; the kernels gemv4_t1/t2/t4/t8). A block of 256 threads is 4 row groups of 64 threads;
// a group owns GEMV_R consecutive rows and its threads stride over the rows' 16-byte pieces
// (32 codes), so each thread keeps GEMV_R independent 16-byte loads in flight and loads each
// piece of x once for GEMV_R rows. Partial sums are reduced in a fixed order (warp trees, then
// the group's two warps). Needs cols % 32 == 0, blocksize % 32 == 0, cols % blocksize == 0.
// packed rows [rows, cols/2], absmax [rows · cols / blocksize], x [t, cols] lp, y [t, ld] f32.
template <int T, bool PIPE>
__device__ __forceinline__ void gemv4_body(const u8* __restrict__ packed, const float* __restrict__ absmax,
                                           const float* __restrict__ code, int blocksize, int rows, int cols,
                                           const lp_t* __restrict__ x, int t, float* __restrict__ y, int ld,
                                           int accumulate) {
    __shared__ float cs[16];
    __shared__ float red[GEMV_GROUPS][2][GEMV_R * T];
    if (threadIdx.x < 16) cs[threadIdx.x] = code[threadIdx.x];
    __syncthreads();
    int group = threadIdx.x / GEMV_GROUP, gt = threadIdx.x % GEMV_GROUP;
    int r0 = (blockIdx.x * GEMV_GROUPS + group) * GEMV_R;
    int chunks = cols / 32;
    float acc[GEMV_R][T];
#pragma unroll
    for (int r = 0; r < GEMV_R; r++)
#pragma unroll
        for (int k = 0; k < T; k++) acc[r][k] = 0.f;
    if (r0 < rows) {
        // PIPE: software pipelining, the next piece's loads in flight while this one computes
        // (more registers, fewer resident threads; chosen per T by measurement).
        uint4 q[GEMV_R], qn[GEMV_R];
        float s[GEMV_R], sn[GEMV_R];
        int c = gt;
#define GEMV_LOAD(QQ, SS, CC)                                                              \
    _Pragma("unroll") for (int r = 0; r < GEMV_R; r++) {                                   \
        int row = min(r0 + r, rows - 1);                                                  \
        QQ[r] = __ldg(((const uint4*)(packed + (long)row * (cols / 2))) + (CC));           \
        SS[r] = __ldg(absmax + ((long)row * cols + (CC) * 32) / blocksize);                \
    }
        if (PIPE && c < chunks) { GEMV_LOAD(q, s, c) }
        for (; c < chunks; c += GEMV_GROUP) {
            if (PIPE) {
                int cn = c + GEMV_GROUP;
                if (cn < chunks) { GEMV_LOAD(qn, sn, cn) }
            } else {
                GEMV_LOAD(q, s, c)
            }
#pragma unroll
            for (int k = 0; k < T; k++) {
                if (k < t) {
                    float xv[32];
                    load_x32(x + (long)k * cols + c * 32, xv);
#pragma unroll
                    for (int r = 0; r < GEMV_R; r++) {
                        acc[r][k] = fmaf(dot32(q[r], xv, cs), s[r], acc[r][k]);
                    }
                }
            }
            if (PIPE) {
#pragma unroll
                for (int r = 0; r < GEMV_R; r++) {
                    q[r] = qn[r];
                    s[r] = sn[r];
                }
            }
        }
    }
    gemv_store<T>(acc, red, group, gt, r0, rows, t, y, ld, accumulate);
}

#define GEMV_KERNEL(NAME, T, PIPE) GEMV_KERNEL_B(NAME, T, PIPE, 1)
#define GEMV_KERNEL_B(NAME, T, PIPE, MINB)                                                                    \
    extern "C" __global__ void __launch_bounds__(GEMV_GROUP * GEMV_GROUPS, MINB)                         \
    NAME(const u8* __restrict__ packed, const float* __restrict__ absmax, const float* __restrict__ code, \
         int blocksize, int rows, int cols, const lp_t* __restrict__ x, int t, float* __restrict__ y,    \
         int ld, int accumulate) {                                                                        \
        qlora_grid_wait_gemv();                                                                           \
        gemv4_body<T, PIPE>(packed, absmax, code, blocksize, rows, cols, x, t, y, ld, accumulate);      \
    }
GEMV_KERNEL(gemv4_t1, 1, true)
GEMV_KERNEL(gemv4_t2, 2, true)
GEMV_KERNEL(gemv4_t4, 4, false)
GEMV_KERNEL(gemv4_t8, 8, false)
// Variants of t = 1 for `bench --kernels` (and QLORA_GEMV_T1=name): unpipelined; pipelined
// with registers capped for 3 blocks per SM.
GEMV_KERNEL(gemv4_np_t1, 1, false)
GEMV_KERNEL_B(gemv4_p3_t1, 1, true, 3)

// The same GEMV with the weights staged through shared memory by cp.async, GEMV_STAGES deep:
// each thread's loads for the next pieces are in flight while it computes (no registers held
// for them), so far more bytes are outstanding per SM than registers allow. Each thread reads
// back only what it copied itself, so no barrier is needed around the stages. Dynamic shared
// memory: GEMV_STAGES · GEMV_R · 256 · 20 bytes (gemv4s_smem in Rust).
#define GEMV_STAGES 3
__device__ __forceinline__ unsigned smem_addr(const void* p) {
    unsigned a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}
__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(dst)), "l"(src));
}
__device__ __forceinline__ void cp_async4(void* dst, const void* src) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(smem_addr(dst)), "l"(src));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_stages() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(GEMV_STAGES - 1));
}

template <int T>
__device__ __forceinline__ void gemv4s_body(const u8* __restrict__ packed, const float* __restrict__ absmax,
                                            const float* __restrict__ code, int blocksize, int rows, int cols,
                                            const lp_t* __restrict__ x, int t, float* __restrict__ y, int ld,
                                            int accumulate) {
    extern __shared__ uint4 dyn[];
    uint4* qbuf = dyn;                                             // [stage][r][thread]
    float* sbuf = (float*)(dyn + GEMV_STAGES * GEMV_R * 256);      // [stage][r][thread]
    __shared__ float cs[16];
    __shared__ float red[GEMV_GROUPS][2][GEMV_R * T];
    if (threadIdx.x < 16) cs[threadIdx.x] = code[threadIdx.x];
    __syncthreads();
    int tid = threadIdx.x;
    int group = tid / GEMV_GROUP, gt = tid % GEMV_GROUP;
    int r0 = (blockIdx.x * GEMV_GROUPS + group) * GEMV_R;
    int chunks = cols / 32;
    int steps = (r0 < rows && gt < chunks) ? (chunks - gt + GEMV_GROUP - 1) / GEMV_GROUP : 0;
    float acc[GEMV_R][T];
#pragma unroll
    for (int r = 0; r < GEMV_R; r++)
#pragma unroll
        for (int k = 0; k < T; k++) acc[r][k] = 0.f;
    auto issue = [&](int st) {
        if (st < steps) {
            int c = gt + st * GEMV_GROUP, slot = st % GEMV_STAGES;
#pragma unroll
            for (int r = 0; r < GEMV_R; r++) {
                int row = min(r0 + r, rows - 1);
                cp_async16(&qbuf[(slot * GEMV_R + r) * 256 + tid], ((const uint4*)(packed + (long)row * (cols / 2))) + c);
                cp_async4(&sbuf[(slot * GEMV_R + r) * 256 + tid], absmax + ((long)row * cols + c * 32) / blocksize);
            }
        }
        cp_async_commit();  // an empty group keeps the count uniform
    };
#pragma unroll
    for (int st = 0; st < GEMV_STAGES - 1; st++) issue(st);
    for (int st = 0; st < steps; st++) {
        issue(st + GEMV_STAGES - 1);
        cp_async_wait_stages();  // the group of step `st` has landed
        int c = gt + st * GEMV_GROUP, slot = st % GEMV_STAGES;
        uint4 q[GEMV_R];
        float s[GEMV_R];
#pragma unroll
        for (int r = 0; r < GEMV_R; r++) {
            q[r] = qbuf[(slot * GEMV_R + r) * 256 + tid];
            s[r] = sbuf[(slot * GEMV_R + r) * 256 + tid];
        }
#pragma unroll
        for (int k = 0; k < T; k++) {
            if (k < t) {
                float xv[32];
                load_x32(x + (long)k * cols + c * 32, xv);
#pragma unroll
                for (int r = 0; r < GEMV_R; r++) {
                    acc[r][k] = fmaf(dot32(q[r], xv, cs), s[r], acc[r][k]);
                }
            }
        }
    }
    asm volatile("cp.async.wait_all;\n" ::);
    gemv_store<T>(acc, red, group, gt, r0, rows, t, y, ld, accumulate);
}

#define GEMVS_KERNEL(NAME, T)                                                                             \
    extern "C" __global__ void __launch_bounds__(GEMV_GROUP * GEMV_GROUPS)                               \
    NAME(const u8* __restrict__ packed, const float* __restrict__ absmax, const float* __restrict__ code, \
         int blocksize, int rows, int cols, const lp_t* __restrict__ x, int t, float* __restrict__ y,    \
         int ld, int accumulate) {                                                                        \
        qlora_grid_wait_gemv();                                                                           \
        gemv4s_body<T>(packed, absmax, code, blocksize, rows, cols, x, t, y, ld, accumulate);           \
    }
GEMVS_KERNEL(gemv4s_t1, 1)
GEMVS_KERNEL(gemv4s_t2, 2)
GEMVS_KERNEL(gemv4s_t4, 4)
GEMVS_KERNEL(gemv4s_t8, 8)

// The x-stationary GEMV (gemv4x_t1/t2, the default for t ≤ 2): thread (sub, c) of a block of
// kt · rs threads (kt = the row's 16-byte pieces rounded up to 32, rs row groups) owns one
// 32-column piece c of every row, so its 32 activations per token are loaded once into
// registers. Blocks are persistent: block b takes passes b, b + grid, … of rs · GX_R rows
// each, its pieces staged by cp.async GX_STAGES passes ahead, so the pipeline never drains
// between rows. Per pass: each row's piece dots, warp trees, then one thread per row sums the
// row's kt / 32 warp partials in order and stores (or adds) y. Addresses advance without
// division. Needs cols % 32 == 0, cols % blocksize == 0, blocksize % 32 == 0, kt ≤ GX_MAXT.
// Dynamic shared memory: GX_STAGES · GX_R · blockDim · 20 bytes.
#define GX_R 2
#define GX_STAGES 4
#define GX_MAXT 512
template <int T>
__device__ __forceinline__ void gemv4x_body(const u8* __restrict__ packed, const float* __restrict__ absmax,
                                            const float* __restrict__ code, int blocksize, int rows, int cols,
                                            const lp_t* __restrict__ x, int t, float* __restrict__ y, int ld,
                                            int accumulate) {
    extern __shared__ uint4 dyn[];
    const int nt = blockDim.x;
    uint4* qbuf = dyn;                                  // [stage][r][thread]
    float* sbuf = (float*)(dyn + GX_STAGES * GX_R * nt);  // [stage][r][thread]
    __shared__ float cs[16];
    __shared__ float red[2][GX_R * T][GX_MAXT / 32];    // [pass parity][row · T + token][warp]
    if (threadIdx.x < 16) cs[threadIdx.x] = code[threadIdx.x];
    const int tid = threadIdx.x, chunks = cols / 32;
    const int kt = (chunks + 31) & ~31, kw = kt / 32, rs = nt / kt;
    const int sub = tid / kt, c = tid % kt, warp = tid >> 5, lane = tid & 31;
    const bool active = c < chunks;
    const int rows_pass = rs * GX_R;
    const int passes = (rows + rows_pass - 1) / rows_pass;
    const int steps = (int)blockIdx.x < passes ? (passes - 1 - (int)blockIdx.x) / (int)gridDim.x + 1 : 0;
    float xv[T][32];
#pragma unroll
    for (int k = 0; k < T; k++) {
        if (k < t && active) {
            load_x32(x + (long)k * cols + c * 32, xv[k]);
        } else {
#pragma unroll
            for (int e = 0; e < 32; e++) xv[k][e] = 0.f;
        }
    }
    const u8* pc = packed + (long)c * 16;
    const float* ac = absmax + (c * 32) / blocksize;
    const long row_bytes = cols / 2;
    const int row_scales = cols / blocksize;
    auto issue = [&](int st) {
        if (st < steps && active) {
            int p = (int)blockIdx.x + st * (int)gridDim.x, slot = st % GX_STAGES;
#pragma unroll
            for (int r = 0; r < GX_R; r++) {
                int row = min(p * rows_pass + sub * GX_R + r, rows - 1);
                cp_async16(&qbuf[(slot * GX_R + r) * nt + tid], pc + (long)row * row_bytes);
                cp_async4(&sbuf[(slot * GX_R + r) * nt + tid], ac + (long)row * row_scales);
            }
        }
        cp_async_commit();  // an empty group keeps the count uniform
    };
#pragma unroll
    for (int st = 0; st < GX_STAGES - 1; st++) issue(st);
    __syncthreads();  // cs
    for (int st = 0; st < steps; st++) {
        issue(st + GX_STAGES - 1);
        asm volatile("cp.async.wait_group %0;\n" ::"n"(GX_STAGES - 1));
        const int slot = st % GX_STAGES, par = st & 1;
        const int p = (int)blockIdx.x + st * (int)gridDim.x;
#pragma unroll
        for (int r = 0; r < GX_R; r++) {
            uint4 q = qbuf[(slot * GX_R + r) * nt + tid];
            float s = sbuf[(slot * GX_R + r) * nt + tid];
#pragma unroll
            for (int k = 0; k < T; k++) {
                float v = active && k < t ? dot32(q, xv[k], cs) * s : 0.f;
                v = warp_sum(v);
                if (lane == 0) red[par][r * T + k][warp] = v;
            }
        }
        __syncthreads();
        if (tid < rows_pass * T) {
            int g = tid / (GX_R * T), rk = tid % (GX_R * T), r = rk / T, k = rk % T;
            int row = p * rows_pass + g * GX_R + r;
            if (k < t && row < rows) {
                float v = 0.f;
                for (int w = 0; w < kw; w++) v += red[par][rk][g * kw + w];
                float* o = y + (long)k * ld + row;
                *o = accumulate ? *o + v : v;
            }
        }
    }
    asm volatile("cp.async.wait_all;\n" ::);
}

#define GEMVX_KERNEL(NAME, T, MINB)                                                                       \
    extern "C" __global__ void __launch_bounds__(GX_MAXT, MINB)                                          \
    NAME(const u8* __restrict__ packed, const float* __restrict__ absmax, const float* __restrict__ code, \
         int blocksize, int rows, int cols, const lp_t* __restrict__ x, int t, float* __restrict__ y,    \
         int ld, int accumulate) {                                                                        \
        qlora_grid_wait_gemv();                                                                           \
        gemv4x_body<T>(packed, absmax, code, blocksize, rows, cols, x, t, y, ld, accumulate);           \
    }
GEMVX_KERNEL(gemv4x_t1, 1, 2)
GEMVX_KERNEL(gemv4x_t2, 2, 1)

// The fused GPTQ/AWQ GEMV for 1-8 tokens: y[k, row] (+)= Σ_c s[row, g(c)] · (q[row, c] − z[row,
// g(c)]) · x[k, perm(c)], for groups contiguous in stored order (column c in group c / gs,
// gs % 32 == 0; act-order checkpoints store their columns sorted by group and permute the
// input: perm, may be null). codes [rows, cols] of BITS bits (4: two a byte, the even column in
// the high nibble; 8: one a byte), scales and zeros f32 [rows, groups], x [t, cols] lp, y [t, ld]
// f32. A warp a row at a time (rows strided over the grid's warps); each lane takes 32-column
// chunks (16 bytes of 4-bit codes, two 16-byte loads of 8-bit ones) strided by the warp, so a
// warp reads 512 contiguous bytes a step. A code becomes q − z exactly with the float trick
// (2^23 + q as bits, minus 2^23 + z), the chunk's products are f32 FMAs, the chunk's sum is
// scaled by its group's s; lanes add in a fixed order (warp_sum). No shared memory.
#define GQ_WARPS 8
template <int BITS, int T>
__device__ __forceinline__ void gemvq_body(const u8* __restrict__ codes, const float* __restrict__ scales,
                                           const float* __restrict__ zeros, const unsigned* __restrict__ perm,
                                           int gs, int groups, int rows, int cols, const lp_t* __restrict__ x,
                                           int t, float* __restrict__ y, int ld, int accumulate) {
    const int lane = threadIdx.x & 31;
    const int gw = blockIdx.x * GQ_WARPS + (threadIdx.x >> 5), nw = gridDim.x * GQ_WARPS;
    const int chunks = cols / 32;
    const long row_bytes = (long)cols * BITS / 8;
    for (int row = gw; row < rows; row += nw) {
        float acc[T];
#pragma unroll
        for (int k = 0; k < T; k++) acc[k] = 0.f;
        const u8* rc = codes + (long)row * row_bytes;
        const float* rs = scales + (long)row * groups;
        const float* rz = zeros + (long)row * groups;
#pragma unroll 2
        for (int ch = lane; ch < chunks; ch += 32) {
            float qz[32];
            const int g = (ch * 32) / gs;
            const float s = __ldg(rs + g);
            const float off = 8388608.0f + __ldg(rz + g);
            if (BITS == 4) {
                uint4 u = __ldg((const uint4*)(rc + (long)ch * 16));
                unsigned w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
                for (int e = 0; e < 4; e++)
#pragma unroll
                    for (int b = 0; b < 4; b++) {
                        unsigned byte = (w[e] >> (8 * b)) & 0xffu;
                        qz[e * 8 + 2 * b] = __int_as_float(0x4B000000 | (byte >> 4)) - off;
                        qz[e * 8 + 2 * b + 1] = __int_as_float(0x4B000000 | (byte & 15u)) - off;
                    }
            } else {
#pragma unroll
                for (int h = 0; h < 2; h++) {
                    uint4 u = __ldg((const uint4*)(rc + (long)ch * 32 + h * 16));
                    unsigned w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
                    for (int e = 0; e < 4; e++)
#pragma unroll
                        for (int b = 0; b < 4; b++)
                            qz[h * 16 + e * 4 + b] = __int_as_float(0x4B000000 | ((w[e] >> (8 * b)) & 0xffu)) - off;
                }
            }
#pragma unroll
            for (int k = 0; k < T; k++) {
                if (k >= t) break;
                float xv[32];
                if (perm) {
#pragma unroll
                    for (int e = 0; e < 32; e++) xv[e] = lp_to_f(x[(long)k * cols + __ldg(perm + ch * 32 + e)]);
                } else {
                    load_x32(x + (long)k * cols + ch * 32, xv);
                }
                float d = 0.f;
#pragma unroll
                for (int e = 0; e < 32; e++) d = fmaf(qz[e], xv[e], d);
                acc[k] = fmaf(d, s, acc[k]);
            }
        }
#pragma unroll
        for (int k = 0; k < T; k++) {
            if (k >= t) break;
            float v = warp_sum(acc[k]);
            if (lane == 0) {
                float* o = y + (long)k * ld + row;
                *o = accumulate ? *o + v : v;
            }
        }
    }
}

#define GEMVQ_KERNEL(NAME, BITS, T)                                                                        \
    extern "C" __global__ void __launch_bounds__(GQ_WARPS * 32)                                           \
    NAME(const u8* __restrict__ codes, const float* __restrict__ scales, const float* __restrict__ zeros,  \
         const unsigned* __restrict__ perm, int gs, int groups, int rows, int cols,                        \
         const lp_t* __restrict__ x, int t, float* __restrict__ y, int ld, int accumulate) {               \
        qlora_grid_wait_gemv();                                                                            \
        gemvq_body<BITS, T>(codes, scales, zeros, perm, gs, groups, rows, cols, x, t, y, ld, accumulate); \
    }
GEMVQ_KERNEL(gemvq4_t1, 4, 1)
GEMVQ_KERNEL(gemvq4_t2, 4, 2)
GEMVQ_KERNEL(gemvq4_t4, 4, 4)
GEMVQ_KERNEL(gemvq4_t8, 4, 8)
GEMVQ_KERNEL(gemvq8_t1, 8, 1)
GEMVQ_KERNEL(gemvq8_t2, 8, 2)
GEMVQ_KERNEL(gemvq8_t4, 8, 4)
GEMVQ_KERNEL(gemvq8_t8, 8, 8)

// The tensor-core 4-bit GEMV (gemv4m, bf16 mode, 1 ≤ t ≤ 8 tokens at the cost of one): each
// warp computes a 16-row × 8-token tile with mma.m16n8k16 (bf16 in, f32 accumulate), the
// weights as the A operand and the tokens' activations as B (columns past t are zero). Each
// code is two bf16 parts, hi = bf16(c) and lo = bf16(c − hi), and every product is two mmas
// (hi, then lo, into one accumulator), so the code book is exact to about 2^-17: one bf16 part
// alone is a relative error per code value that every weight with that code shares, and that
// correlated error broke the model-level bf16 budget (run 24: 2.5e-2 against 1e-2; examples/
// code_rounding.rs: 2.46e-2 with one part, 7.2e-6 with two). Both parts of two codes come from
// one byte → {hi pair, lo pair} table in dynamic shared memory (gm_fill_lut, GM_LUT_BYTES),
// one entry per lane (entry byte · 32 + lane: a warp's lookups never conflict), one 64-bit
// lookup per byte; the tensor core does the multiply-adds. Per 64-column chunk (inside one absmax block), lane (g, q) of
// the warp holds bytes 8q … 8q + 7 of the chunk for rows g and g + 8; its byte 2m feeds the k
// pair (2q, 2q+1) of the chunk's m-th mma and byte 2m + 1 the pair (2q+8, 2q+9), and the B
// operand takes the same inputs, so every k of the mma is one real input column. The chunk's
// mmas go into a fresh accumulator that is scaled by each row's absmax (f32) and added to the
// running sum. The 8 warps of a block split the row's chunks (warp w takes chunks w, w + 8, …)
// and sum their tiles in a fixed order; blocks are persistent over the 16-row tiles. Needs
// cols % 64 == 0, blocksize = 64 · 2^k, cols % blocksize == 0.
#define GM_WARPS 8
#define GM_U 2
// d = a · b + c on the tensor cores (m16n8k16, f32 accumulate) for operands of type TY.
#define MMA_16816(NAME, TY)                                                                              \
    __device__ __forceinline__ void NAME(float* d, const unsigned* a, unsigned b0, unsigned b1,          \
                                         const float* c) {                                               \
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." TY "." TY                                  \
                     ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%11,%12,%13};\n"                 \
                     : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])                                    \
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "f"(c[0]), "f"(c[1]), \
                       "f"(c[2]), "f"(c[3]));                                                            \
    }
MMA_16816(mma_bf16_16816, "bf16")
MMA_16816(mma_f16_16816, "f16")
// 16 consecutive activations of one token as 8 bf16 pairs.
__device__ __forceinline__ void load_x16_bf16(const lp_t* __restrict__ p, unsigned* v) {
#ifdef QLORA_BF16
    uint4 a = *(const uint4*)p, b = *(const uint4*)(p + 8);
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
    v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
#else
#pragma unroll
    for (int e = 0; e < 8; e++) v[e] = (unsigned)f_to_bf16(p[2 * e]) | ((unsigned)f_to_bf16(p[2 * e + 1]) << 16);
#endif
}

// The code table of gemv4m/gemv4m4: 256 bytes × 32 lanes, each entry the byte's two
// codes as {hi pair, lo pair} of bf16 (8 B: a warp's 64-bit lookups, entry byte · 32 + lane,
// take the two wavefronts they must and never conflict). 64 KB of dynamic shared memory.
#define GM_LUT_ENTRIES (256 * 32)
__device__ __forceinline__ void gm_fill_lut(uint2* lut, const float* __restrict__ code) {
    for (int e = threadIdx.x; e < GM_LUT_ENTRIES; e += blockDim.x) {
        const int b = e >> 5;
        const float c0 = code[b >> 4], c1 = code[b & 15];
        const bf16_t h0 = f_to_bf16(c0), h1 = f_to_bf16(c1);
        lut[e] = make_uint2((unsigned)h0 | ((unsigned)h1 << 16),
                            (unsigned)f_to_bf16(c0 - bf16_to_f(h0)) | ((unsigned)f_to_bf16(c1 - bf16_to_f(h1)) << 16));
    }
    __syncthreads();
}
// The A fragments (hi and lo parts) of the m-th mma of a chunk from lane (g, q)'s bytes of
// rows g (ra) and g + 8 (rb), sh = 2 · (m & 1) (the byte of the word).
__device__ __forceinline__ void gm_frags(const uint2* lut_l, unsigned ra, unsigned rb, int sh, unsigned* hi,
                                         unsigned* lo) {
    const uint2 e0 = lut_l[__byte_perm(ra, 0u, 0x4440u + sh) << 5];
    const uint2 e1 = lut_l[__byte_perm(rb, 0u, 0x4440u + sh) << 5];
    const uint2 e2 = lut_l[__byte_perm(ra, 0u, 0x4441u + sh) << 5];
    const uint2 e3 = lut_l[__byte_perm(rb, 0u, 0x4441u + sh) << 5];
    hi[0] = e0.x; lo[0] = e0.y;
    hi[1] = e1.x; lo[1] = e1.y;
    hi[2] = e2.x; lo[2] = e2.y;
    hi[3] = e3.x; lo[3] = e3.y;
}

// gemv4m for 9 to 32 tokens (decode batches): the same 16-row tiles and per-chunk decoding of
// the codes through the table, each decoded A fragment fed to GM4_NT mmas, one per 8-token
// n-tile (token g + 8·nt of lane (g, q)), so the weights are read and decoded once for all
// the tokens. One chunk a warp at a time (no unrolling: the n-tiles take the registers).
#define GM4_NT 4
extern "C" __global__ void __launch_bounds__(GM_WARPS * 32, 2)
gemv4m4(const u8* __restrict__ packed, const float* __restrict__ absmax, const float* __restrict__ code,
        int blocksize, int rows, int cols, const lp_t* __restrict__ x, int t, float* __restrict__ y, int ld,
        int accumulate) {
    qlora_grid_wait_gemv();
    extern __shared__ uint2 lut[];  // GM_LUT_BYTES: gm_fill_lut's table
    __shared__ float red[GM_WARPS][16][8];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, q = lane & 3;
    gm_fill_lut(lut, code);
    const uint2* lut_l = lut + lane;
    const int chunks = cols / 64, pb_shift = __ffs(blocksize / 64) - 1, row_scales = cols / blocksize;
    const long row_bytes = cols / 2;
    const int tiles = (rows + 15) / 16;
    bool has[GM4_NT];
    const lp_t* xg[GM4_NT];
#pragma unroll
    for (int nt = 0; nt < GM4_NT; nt++) {
        const int tok = g + 8 * nt;
        has[nt] = tok < t;
        xg[nt] = x + (long)(has[nt] ? tok : 0) * cols + q * 16;
    }
    for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        const int r0 = min(tile * 16 + g, rows - 1), r1 = min(tile * 16 + g + 8, rows - 1);
        const u8* p0 = packed + (long)r0 * row_bytes + q * 8;
        const u8* p1 = packed + (long)r1 * row_bytes + q * 8;
        const float* am0 = absmax + (long)r0 * row_scales;
        const float* am1 = absmax + (long)r1 * row_scales;
        float acc[GM4_NT][4];
#pragma unroll
        for (int nt = 0; nt < GM4_NT; nt++) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.f;
        for (int c = warp; c < chunks; c += GM_WARPS) {
            const uint2 w0 = *(const uint2*)(p0 + (long)c * 32);
            const uint2 w1 = *(const uint2*)(p1 + (long)c * 32);
            const float s0 = am0[c >> pb_shift], s1 = am1[c >> pb_shift];
            unsigned xv[GM4_NT][8];
#pragma unroll
            for (int nt = 0; nt < GM4_NT; nt++) {
                if (has[nt]) {
                    load_x16_bf16(xg[nt] + (long)c * 64, xv[nt]);
                } else {
#pragma unroll
                    for (int e = 0; e < 8; e++) xv[nt][e] = 0u;
                }
            }
            const float zero[4] = {0.f, 0.f, 0.f, 0.f};
            float d[GM4_NT][4];
            const unsigned wa[2] = {w0.x, w0.y}, wb[2] = {w1.x, w1.y};
#pragma unroll
            for (int m = 0; m < 4; m++) {
                unsigned hi[4], lo[4];
                gm_frags(lut_l, wa[m >> 1], wb[m >> 1], (m & 1) * 2, hi, lo);
#pragma unroll
                for (int nt = 0; nt < GM4_NT; nt++) {
                    mma_bf16_16816(d[nt], hi, xv[nt][2 * m], xv[nt][2 * m + 1], m == 0 ? zero : d[nt]);
                    mma_bf16_16816(d[nt], lo, xv[nt][2 * m], xv[nt][2 * m + 1], d[nt]);
                }
            }
#pragma unroll
            for (int nt = 0; nt < GM4_NT; nt++) {
                acc[nt][0] = fmaf(d[nt][0], s0, acc[nt][0]);
                acc[nt][1] = fmaf(d[nt][1], s0, acc[nt][1]);
                acc[nt][2] = fmaf(d[nt][2], s1, acc[nt][2]);
                acc[nt][3] = fmaf(d[nt][3], s1, acc[nt][3]);
            }
        }
        // The warps' tiles summed in a fixed order, an n-tile at a time (shared memory stays
        // at gemv4m's).
#pragma unroll
        for (int nt = 0; nt < GM4_NT; nt++) {
            red[warp][g][2 * q] = acc[nt][0];
            red[warp][g][2 * q + 1] = acc[nt][1];
            red[warp][g + 8][2 * q] = acc[nt][2];
            red[warp][g + 8][2 * q + 1] = acc[nt][3];
            __syncthreads();
            if (tid < 128) {
                const int row_in = tid >> 3, k = tid & 7, tok = 8 * nt + k, row = tile * 16 + row_in;
                if (tok < t && row < rows) {
                    float v = 0.f;
#pragma unroll
                    for (int w = 0; w < GM_WARPS; w++) v += red[w][row_in][k];
                    float* o = y + (long)tok * ld + row;
                    *o = accumulate ? *o + v : v;
                }
            }
            __syncthreads();
        }
    }
}
extern "C" __global__ void __launch_bounds__(GM_WARPS * 32, 3)
gemv4m(const u8* __restrict__ packed, const float* __restrict__ absmax, const float* __restrict__ code,
       int blocksize, int rows, int cols, const lp_t* __restrict__ x, int t, float* __restrict__ y, int ld,
       int accumulate) {
    qlora_grid_wait_gemv();
    extern __shared__ uint2 lut[];  // GM_LUT_BYTES: gm_fill_lut's table
    __shared__ float red[GM_WARPS][16][8];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, q = lane & 3;
    gm_fill_lut(lut, code);
    const uint2* lut_l = lut + lane;
    // blocksize / 64 is a power of two (gemv4m_fits): chunk c of row r has absmax
    // r · (cols / blocksize) + (c >> pb_shift).
    const int chunks = cols / 64, pb_shift = __ffs(blocksize / 64) - 1, row_scales = cols / blocksize;
    const long row_bytes = cols / 2;
    const int tiles = (rows + 15) / 16;
    const bool has_x = g < t;
    const lp_t* xg = x + (long)(has_x ? g : 0) * cols + q * 16;
    for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        const int r0 = min(tile * 16 + g, rows - 1), r1 = min(tile * 16 + g + 8, rows - 1);
        const u8* p0 = packed + (long)r0 * row_bytes + q * 8;
        const u8* p1 = packed + (long)r1 * row_bytes + q * 8;
        const float* am0 = absmax + (long)r0 * row_scales;
        const float* am1 = absmax + (long)r1 * row_scales;
        float acc[4] = {0.f, 0.f, 0.f, 0.f};
        for (int c0 = warp; c0 < chunks; c0 += GM_WARPS * GM_U) {
            uint2 w0[GM_U], w1[GM_U];
            float s0[GM_U], s1[GM_U];
            unsigned xv[GM_U][8];
#pragma unroll
            for (int u = 0; u < GM_U; u++) {
                int c = c0 + u * GM_WARPS;
                if (c < chunks) {
                    w0[u] = *(const uint2*)(p0 + (long)c * 32);
                    w1[u] = *(const uint2*)(p1 + (long)c * 32);
                    s0[u] = am0[c >> pb_shift];
                    s1[u] = am1[c >> pb_shift];
                    if (has_x) {
                        load_x16_bf16(xg + (long)c * 64, xv[u]);
                    } else {
#pragma unroll
                        for (int e = 0; e < 8; e++) xv[u][e] = 0u;
                    }
                } else {
                    w0[u] = make_uint2(0u, 0u);
                    w1[u] = make_uint2(0u, 0u);
                    s0[u] = 0.f;
                    s1[u] = 0.f;
#pragma unroll
                    for (int e = 0; e < 8; e++) xv[u][e] = 0u;
                }
            }
#pragma unroll
            for (int u = 0; u < GM_U; u++) {
                const float zero[4] = {0.f, 0.f, 0.f, 0.f};
                float d[4] = {0.f, 0.f, 0.f, 0.f};
                unsigned wa[2] = {w0[u].x, w0[u].y}, wb[2] = {w1[u].x, w1[u].y};
#pragma unroll
                for (int m = 0; m < 4; m++) {
                    unsigned hi[4], lo[4];
                    gm_frags(lut_l, wa[m >> 1], wb[m >> 1], (m & 1) * 2, hi, lo);
                    mma_bf16_16816(d, hi, xv[u][2 * m], xv[u][2 * m + 1], m == 0 ? zero : d);
                    mma_bf16_16816(d, lo, xv[u][2 * m], xv[u][2 * m + 1], d);
                }
                acc[0] = fmaf(d[0], s0[u], acc[0]);
                acc[1] = fmaf(d[1], s0[u], acc[1]);
                acc[2] = fmaf(d[2], s1[u], acc[2]);
                acc[3] = fmaf(d[3], s1[u], acc[3]);
            }
        }
        red[warp][g][2 * q] = acc[0];
        red[warp][g][2 * q + 1] = acc[1];
        red[warp][g + 8][2 * q] = acc[2];
        red[warp][g + 8][2 * q + 1] = acc[3];
        __syncthreads();
        if (tid < 128) {
            int row_in = tid >> 3, k = tid & 7, row = tile * 16 + row_in;
            if (k < t && row < rows) {
                float v = 0.f;
#pragma unroll
                for (int w = 0; w < GM_WARPS; w++) v += red[w][row_in][k];
                float* o = y + (long)k * ld + row;
                *o = accumulate ? *o + v : v;
            }
        }
        __syncthreads();
    }
}

// The f16 tensor-core GEMV (gemv4h, bf16 mode, 1 ≤ t ≤ 8 tokens at the cost of one): gemv4m's
// 16-row × 8-token tiles, fragment layout and fixed-order sums, with each code one f16 instead
// of two bf16 parts. f16 holds a code to 2^-12 relative, eight times finer than bf16: at the
// model level examples/code_rounding.rs gives 1.4e-3 for f16 codes, against 2.46e-2 for bf16
// codes and 4.4e-3 for the bf16 weights of the dequantize + cuBLAS path. So a product is one
// mma (m16n8k16, f16 in, f32 accumulate) and a byte's two codes one 32-bit lookup. The table
// keeps byte b's entry for lane l at b · 256 + 4l (a warp's lookups never share a bank), so
// one PRMT of the packed word and the lane's offset is the lookup's address. The activations
// are staged once per block as f16 in shared memory, each token scaled by a power of two 2^s
// that puts its largest magnitude in [2^14, 2^15): no bf16 input overflows f16, none of the
// large ones loses bits to f16's subnormals, and the sums are scaled back by 2^-s exactly at
// the store. The table fill reads only the code book, a constant of the weights, so it runs
// before the grid wait. Needs cols % 64 == 0, blocksize = 64 · 2^k, cols % blocksize == 0.
// Dynamic shared memory: GH_LUT_BYTES + t · (cols + 8) · 2 bytes (gemv4h_smem in gpu.rs).
#define GH_WARPS 8
#define GH_U 4
#define GH_LUT_BYTES (256 * 256)
#define GH_MAXT 8
// Two f32 as an f16 pair (round to nearest even), lo in the low half.
__device__ __forceinline__ unsigned f2_to_h2(float lo, float hi) {
    unsigned r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
// 8 consecutive activations (one 16-byte load in bf16 mode) widened to f32.
__device__ __forceinline__ void load_x8(const lp_t* __restrict__ p, float* v) {
#ifdef QLORA_BF16
    const uint4 u = *(const uint4*)p;
    const unsigned uu[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int f = 0; f < 4; f++) {
        v[2 * f] = __uint_as_float(uu[f] << 16);
        v[2 * f + 1] = __uint_as_float(uu[f] & 0xffff0000u);
    }
#else
    const float4 a = ((const float4*)p)[0], b = ((const float4*)p)[1];
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
    v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
#endif
}
// Byte k (0-3) of w as the address of its entry for this lane: b · 256 + lane4.
#define GH_ADDR(w, lane4, k) __byte_perm((w), (lane4), 0x5504u + ((k) << 4))
// A 32-bit load at a 32-bit shared-window address (`smem_addr` of the table plus GH_ADDR): one
// 32-bit add, which ptxas can fold into the load's addressing, where a generic pointer plus
// the offset costs a 64-bit add per lookup.
__device__ __forceinline__ unsigned lds32(unsigned a) {
    unsigned v;
    asm volatile("ld.shared.b32 %0, [%1];" : "=r"(v) : "r"(a));
    return v;
}
extern "C" __global__ void __launch_bounds__(GH_WARPS * 32, 2)
gemv4h(const u8* __restrict__ packed, const float* __restrict__ absmax, const float* __restrict__ code,
       int blocksize, int rows, int cols, const lp_t* __restrict__ x, int t, float* __restrict__ y, int ld,
       int accumulate) {
    extern __shared__ uint4 gh_dyn[];
    const unsigned lut_s = smem_addr(gh_dyn);
    unsigned short* xs = (unsigned short*)((char*)gh_dyn + GH_LUT_BYTES);  // [t][cols + 8] f16
    __shared__ float red[GH_WARPS][16][8];
    __shared__ float tmax[GH_WARPS][GH_MAXT];
    __shared__ float tscale[GH_MAXT], tinv[GH_MAXT];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, q = lane & 3;
    for (int e = tid; e < 256 * 32; e += blockDim.x) {
        const int b = e >> 5;
        ((unsigned*)gh_dyn)[b * 64 + (e & 31)] = f2_to_h2(code[b >> 4], code[b & 15]);
    }
    qlora_grid_wait_gemv();
    // Each token's scale from its largest magnitude (fmaxf drops NaNs, which f16 keeps).
    const int pitch = cols + 8;
    for (int k = 0; k < t; k++) {
        float m = 0.f;
        for (int i = tid * 8; i < cols; i += blockDim.x * 8) {
            float v[8];
            load_x8(x + (long)k * cols + i, v);
#pragma unroll
            for (int e = 0; e < 8; e++) m = fmaxf(m, fabsf(v[e]));
        }
        m = warp_max(m);
        if (lane == 0) tmax[warp][k] = m;
    }
    __syncthreads();
    if (tid < t) {
        float m = 0.f;
        for (int w = 0; w < GH_WARPS; w++) m = fmaxf(m, tmax[w][tid]);
        int s = 0;
        if (m > 0.f) s = min(max(14 - ((int)((__float_as_uint(m) >> 23) & 255u) - 127), -120), 100);
        tscale[tid] = __uint_as_float((unsigned)(127 + s) << 23);
        tinv[tid] = __uint_as_float((unsigned)(127 - s) << 23);
    }
    __syncthreads();
    for (int k = 0; k < t; k++) {
        const float sc = tscale[k];
        for (int i = tid * 8; i < cols; i += blockDim.x * 8) {
            float v[8];
            load_x8(x + (long)k * cols + i, v);
            *(uint4*)(xs + k * pitch + i) = make_uint4(f2_to_h2(v[0] * sc, v[1] * sc), f2_to_h2(v[2] * sc, v[3] * sc),
                                                       f2_to_h2(v[4] * sc, v[5] * sc), f2_to_h2(v[6] * sc, v[7] * sc));
        }
    }
    __syncthreads();
    const unsigned lane4 = (unsigned)lane * 4u;
    const int chunks = cols / 64, pb_shift = __ffs(blocksize / 64) - 1, row_scales = cols / blocksize;
    const long row_bytes = cols / 2;
    const int tiles = (rows + 15) / 16;
    const bool has_x = g < t;
    const unsigned short* xg = xs + (has_x ? g : 0) * pitch + q * 16;
    for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        const int r0 = min(tile * 16 + g, rows - 1), r1 = min(tile * 16 + g + 8, rows - 1);
        const u8* p0 = packed + (long)r0 * row_bytes + q * 8;
        const u8* p1 = packed + (long)r1 * row_bytes + q * 8;
        const float* am0 = absmax + (long)r0 * row_scales;
        const float* am1 = absmax + (long)r1 * row_scales;
        float acc[4] = {0.f, 0.f, 0.f, 0.f};
        for (int c0 = warp; c0 < chunks; c0 += GH_WARPS * GH_U) {
            // Lane q loads the scales of the pass's chunk u = q (GH_U is the group's 4 lanes);
            // the others take them by shuffle.
            const int cq = min(c0 + q * GH_WARPS, chunks - 1);
            const float sq0 = am0[cq >> pb_shift], sq1 = am1[cq >> pb_shift];
            uint2 w0[GH_U], w1[GH_U];
#pragma unroll
            for (int u = 0; u < GH_U; u++) {
                const int c = c0 + u * GH_WARPS;
                if (c < chunks) {
                    w0[u] = *(const uint2*)(p0 + (long)c * 32);
                    w1[u] = *(const uint2*)(p1 + (long)c * 32);
                } else {
                    w0[u] = w1[u] = make_uint2(0u, 0u);
                }
            }
#pragma unroll
            for (int u = 0; u < GH_U; u++) {
                const int c = c0 + u * GH_WARPS;
                const float s0 = __shfl_sync(0xffffffffu, sq0, (lane & ~3) | u);
                const float s1 = __shfl_sync(0xffffffffu, sq1, (lane & ~3) | u);
                if (c < chunks) {  // the same for the whole warp
                    uint4 xa = make_uint4(0u, 0u, 0u, 0u), xb = xa;
                    if (has_x) {
                        xa = *(const uint4*)(xg + c * 64);
                        xb = *(const uint4*)(xg + c * 64 + 8);
                    }
                    const unsigned xr[8] = {xa.x, xa.y, xa.z, xa.w, xb.x, xb.y, xb.z, xb.w};
                    const unsigned wa[2] = {w0[u].x, w0[u].y}, wb[2] = {w1[u].x, w1[u].y};
                    const float zero[4] = {0.f, 0.f, 0.f, 0.f};
                    float d[4];
#pragma unroll
                    for (int m = 0; m < 4; m++) {
                        const unsigned ra = wa[m >> 1], rb = wb[m >> 1];
                        const int k = 2 * (m & 1);
                        const unsigned a[4] = {lds32(lut_s + GH_ADDR(ra, lane4, k)),
                                               lds32(lut_s + GH_ADDR(rb, lane4, k)),
                                               lds32(lut_s + GH_ADDR(ra, lane4, k + 1)),
                                               lds32(lut_s + GH_ADDR(rb, lane4, k + 1))};
                        mma_f16_16816(d, a, xr[2 * m], xr[2 * m + 1], m == 0 ? zero : d);
                    }
                    acc[0] = fmaf(d[0], s0, acc[0]);
                    acc[1] = fmaf(d[1], s0, acc[1]);
                    acc[2] = fmaf(d[2], s1, acc[2]);
                    acc[3] = fmaf(d[3], s1, acc[3]);
                }
            }
        }
        red[warp][g][2 * q] = acc[0];
        red[warp][g][2 * q + 1] = acc[1];
        red[warp][g + 8][2 * q] = acc[2];
        red[warp][g + 8][2 * q + 1] = acc[3];
        __syncthreads();
        if (tid < 128) {
            const int row_in = tid >> 3, k = tid & 7, row = tile * 16 + row_in;
            if (k < t && row < rows) {
                float v = 0.f;
#pragma unroll
                for (int w = 0; w < GH_WARPS; w++) v += red[w][row_in][k];
                v *= tinv[k];
                float* o = y + (long)k * ld + row;
                *o = accumulate ? *o + v : v;
            }
        }
        __syncthreads();
    }
}

// The x-stationary GEMV with f16 products (gemv4xh_t1 / gemv4xh4_t1, bf16 mode, one token):
// gemv4x_t1's threads (thread (sub, c) owns the 32-column piece c of every row; persistent
// blocks take passes of rs · R rows), with three changes that cut the instructions and the
// shared-memory wavefronts per code, the two limits Nsight showed for gemv4x_t1 (run 8):
// - a byte's two codes are one 32-bit lookup of an f16 pair (gemv4h's table: byte b's entry
//   for lane l at b · 256 + 4l, so one PRMT is the address and no two lanes share a bank);
// - the pair is multiplied by the thread's two activations and added in one HFMA2. The
//   activations are scaled by a power of two 2^e per piece (largest magnitude in [2^10,
//   2^11)), so a sum of 8 products stays below 2^14; each half of an f16 pair accumulates 8
//   products, then the four halves are summed in f32 and scaled by absmax · 2^-e exactly;
// - the weights go straight to registers (no cp.async staging through shared memory), each
//   pass's loads issued one pass ahead.
// A thread's R row partials are reduced together: the first butterfly level exchanges half of
// them, so R rows cost log2(32) shuffles per R/2 rows rather than per row; fixed order.
// Error: f16 codes (2^-12) and f16 partial sums of 8 products: 4.4e-4 relative on random NF4
// rows of 4096 (a CPU model of it), against 1.0e-3 for bf16 codes. Needs what gemv4x_t1 needs.
// The input row is staged once a block in shared memory after the table (read rs times a block
// from L2 before). Dynamic shared memory: GH_LUT_BYTES + cols · sizeof(lp_t) (gemv4xh_smem),
// and for LORA steps · rows_pass · (lr + 1) + lr floats more (gpu.rs `Gpu::gemv4_fused_shape`).
__device__ __forceinline__ unsigned hfma2(unsigned a, unsigned b, unsigned c) {
    unsigned d;
    asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}
// The two halves of an f16 pair, widened to f32 and added (low first).
__device__ __forceinline__ float h2_sum(unsigned h) {
    float lo, hi;
    asm("{.reg .f16 l, h;\n mov.b32 {l, h}, %2;\n cvt.f32.f16 %0, l;\n cvt.f32.f16 %1, h;}"
        : "=f"(lo), "=f"(hi) : "r"(h));
    return lo + hi;
}
__device__ __forceinline__ uint4 ldg_stream16(const void* p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}
// Σ code pair · x pair over a 16-byte piece (32 codes) with f16 products and partial sums of 8.
__device__ __forceinline__ float dot32h(uint4 q, const unsigned* xh, unsigned lut_s, unsigned lane4) {
    const unsigned w[4] = {q.x, q.y, q.z, q.w};
    unsigned acc[4] = {0u, 0u, 0u, 0u};
#pragma unroll
    for (int e = 0; e < 4; e++)
#pragma unroll
        for (int k = 0; k < 4; k++)
            acc[e >> 1] = hfma2(lds32(lut_s + GH_ADDR(w[e], lane4, k)), xh[4 * e + k], acc[e >> 1]);
    return h2_sum(acc[0]) + h2_sum(acc[1]);
}
// s + v.x² + v.y² + v.z² + v.w², one fmaf each in that order (the folded norms' sums of squares).
__device__ __forceinline__ float fma_sq4(float4 v, float s) {
    s = fmaf(v.x, v.x, s);
    s = fmaf(v.y, v.y, s);
    s = fmaf(v.z, v.z, s);
    return fmaf(v.w, v.w, s);
}
// A fused LoRA's shrink h = A · xs is split into LORA_SPLIT parts a row of A, column ranges
// (item k = part k % LORA_SPLIT of row k / LORA_SPLIT), so more blocks share it and none
// carries a whole row; h[row] is its parts' sum in order. The host sets QLORA_LORA_SPLIT
// (gpu.rs `lora_split`).
#ifndef QLORA_LORA_SPLIT
#define QLORA_LORA_SPLIT 2
#endif
#define LORA_SPLIT QLORA_LORA_SPLIT
// Item k's partial sum over the part's float4s of A's row (f32, read through L2) and the
// block's staged input row (lp [cols] in shared memory): every thread's float4s, then
// block_sum, so a fixed order for a given block size (gemv4xh_body's shrink and its fallback
// agree).
__device__ __forceinline__ float lora_shrink_item(const float* __restrict__ la, const lp_t* xs, int cols, int k,
                                                  float* shm) {
    const int n4 = cols / 4, part = k % LORA_SPLIT;
    const int b = part * n4 / LORA_SPLIT, e = (part + 1) * n4 / LORA_SPLIT;
    const float4* a4 = (const float4*)(la + (long)(k / LORA_SPLIT) * cols);
    float acc = 0.f;
    for (int i = b + threadIdx.x; i < e; i += blockDim.x) {
        const float4 w = __ldg(a4 + i);
        acc = fmaf(w.x, lp_to_f(xs[4 * i]), acc);
        acc = fmaf(w.y, lp_to_f(xs[4 * i + 1]), acc);
        acc = fmaf(w.z, lp_to_f(xs[4 * i + 2]), acc);
        acc = fmaf(w.w, lp_to_f(xs[4 * i + 3]), acc);
    }
    return block_sum(acc, shm);
}
// 4 bytes global → shared, asynchronously; src_size 0 writes a zero and reads nothing.
__device__ __forceinline__ void cp_async4_zfill(unsigned dst, const void* src, int src_size) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(dst), "l"(src), "r"(src_size) : "memory");
}
// 16 bytes global → shared (both 16-byte aligned); src_size 0 writes zeros and reads nothing.
__device__ __forceinline__ void cp_async16_zfill(unsigned dst, const void* src, int src_size) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(src_size) : "memory");
}
// Whether the fused LoRA stages B by 16-byte copies where it can (the host sets
// QLORA_LORA_STAGE16 from the variable of that name; 0 keeps the 4-byte copies).
#ifndef QLORA_LORA_STAGE16
#define QLORA_LORA_STAGE16 1
#endif
#define LORA_STAGE16 QLORA_LORA_STAGE16
__device__ __forceinline__ unsigned ld_acquire_u32(const unsigned* p) {
    unsigned v;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}
// Waits (one thread) until *count ≥ n; 1 if it gave up (after ~2^22 polls, or at once with
// `give_up`), 0 once the count is there. Not inlined (inlined, it made ptxas spill in the GEMVs).
__device__ __noinline__ int wait_count(const unsigned* count, unsigned n, int give_up) {
    for (unsigned i = 0; !give_up && ld_acquire_u32(count) < n; i++) {
        if (i > (1u << 22)) return 1;
        __nanosleep(64);
    }
    return give_up;
}
// Passes a one-token f16 GEMV block runs between its barriers (a power of two; 1 meets after
// every pass): 8 against 1, batch-1 decode 415 → 477 tok/s (run 67). QLORA_GEMV_WINDOW sets it
// at compile time (gpu.rs).
#ifndef QLORA_GXH_WINDOW
#define QLORA_GXH_WINDOW 8
#endif
#define GXH_WINDOW QLORA_GXH_WINDOW
static_assert(GXH_WINDOW > 0 && (GXH_WINDOW & (GXH_WINDOW - 1)) == 0, "the window is a power of two");
// What the `gemv4xh_*_t1` kernels fold into the GEMV (NORM, PAIR; null / 0 in the
// plain kernels):
// - NORM: x is RMSNorm(xn) · gn (xn f32 [cols], the residual row; gn f32 [cols]), rounded to
//   lp as `rms_norm` rounds it, so the norm kernel before the product goes;
// - PAIR (pair > 0): rows j and pair + j (gate and up) make silu(gate) · up, stored lp at
//   y[j], so the `swiglu` kernel after it goes (no f32 copy for adapters: one more pointer
//   made ptxas spill). A thread's two rows are then a gate row and its up row.
// - LORA: a fused LoRA in the same kernel, so an adapter costs no launch of its own (the
//   two-product path is four: a shrink and an expand, each a cuBLAS product, per linear).
//   The shrink h = A · x (la f32 [lr, cols]) is computed over the staged input row by the
//   grid's last blocks (item k, a part of a row as lora_shrink_item, by block gridDim − 1 − k
//   mod gridDim), written to lh [lr · LORA_SPLIT] and published with a count in lflag[0]; the
//   rows' sums wait in shared memory, and once the count reaches lr · LORA_SPLIT (all the
//   grid's blocks are resident: the host sizes it so) each row adds s·B[row, :lr] · h (lb
//   f32 [rows, lr]) and is stored; with PAIR both rows add theirs before the SwiGLU. The
//   block's rows of B (steps passes of rows_pass rows) are staged in
//   shared memory by cp.async before the grid wait. The last block resets lflag.
template <int R, bool NORM, bool PAIR, bool LORA>
__device__ __forceinline__ void gemv4xh_body(const u8* __restrict__ packed, const float* __restrict__ absmax,
                                             const float* __restrict__ code, int blocksize, int rows, int cols,
                                             const lp_t* __restrict__ x, float* __restrict__ y, int ld,
                                             int accumulate, const float* __restrict__ xn,
                                             const float* __restrict__ gn, float eps, int pair,
                                             const float* __restrict__ lb, int lr, float* __restrict__ lh,
                                             const float* __restrict__ la, unsigned* __restrict__ lflag,
                                             int lfallback) {
    extern __shared__ uint4 gxh_dyn[];
    const unsigned lut_s = smem_addr(gxh_dyn);
    __shared__ float red[2 * GXH_WINDOW][R][GX_MAXT / 32];  // [pass mod 2·window][row][warp]
    __shared__ float redn[32];                 // the norm's block_sum
    const int nt = blockDim.x, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    for (int e = tid; e < 256 * 32; e += nt) {
        const int b = e >> 5;
        ((unsigned*)gxh_dyn)[b * 64 + (e & 31)] = f2_to_h2(code[b >> 4], code[b & 15]);
    }
    const int chunks = cols / 32;
    const int kt = (chunks + 31) & ~31, kw = kt / 32, rs = nt / kt;
    const int sub = tid / kt, c = tid % kt;
    const bool active = c < chunks;
    const int rows_pass = rs * R;
    // Rows in index space: [0, limit), P a pass; with pairs (R = 2) a thread's two rows are
    // gate row j and up row pair + j, and a pass takes rs pairs.
    static_assert(!PAIR || R == 2, "pairs take two rows a thread");
    const int P = PAIR ? rs : rows_pass, limit = PAIR ? pair : rows;
    const int passes = (limit + P - 1) / P;
    const int steps = (int)blockIdx.x < passes ? (passes - 1 - (int)blockIdx.x) / (int)gridDim.x + 1 : 0;
    const unsigned lane4 = (unsigned)lane * 4u;
    // The thread's first row of the next pass to load, and its weights and scales; each load
    // advances them by a constant stride (no multiplies or clamps in the loop).
    const long row_bytes = cols / 2;
    const int row_scales = cols / blocksize;
    int lrow = (int)blockIdx.x * P + (PAIR ? sub : sub * R);
    const int rstep = (int)gridDim.x * P;
    const u8* qp = packed + (long)c * 16 + (long)lrow * row_bytes;
    const float* sp = absmax + (c * 32) / blocksize + (long)lrow * row_scales;
    const long qstep = (long)rstep * row_bytes, sstep = (long)rstep * row_scales;
    // From a thread's row r = 0 to its row r = 1: the next row, or with pairs the up row (32
    // bits: the host keeps pair · row bytes below 2^31).
    const int qnext = PAIR ? pair * (int)row_bytes : (int)row_bytes;
    const int snext = PAIR ? pair * row_scales : row_scales;
    uint4 qn[R];
    float sn[R];
    auto load = [&]() {
#pragma unroll
        for (int r = 0; r < R; r++) {
            const bool in = (PAIR ? lrow : lrow + r) < limit;
            qn[r] = in ? ldg_stream16(qp + r * qnext) : make_uint4(0u, 0u, 0u, 0u);
            sn[r] = in ? __ldg(sp + r * snext) : 0.f;
        }
        qp += qstep;
        sp += sstep;
        lrow += rstep;
    };
    // Shared memory after the table: the input row (lp [cols]); with LORA, as float offsets
    // (32-bit: pointers here would spill), the block's rows of s·B [steps][cl], h [lr] and the
    // rows' sums [steps][rows_pass] (pairs: gate, up) until h is known.
    lp_t* xs = (lp_t*)(gxh_dyn + GH_LUT_BYTES / 16);
    const int cl = rows_pass * lr;  // B's staged floats a pass (pairs: rs gate rows, rs up)
    const int bst = GH_LUT_BYTES / 4 + cols * (int)sizeof(lp_t) / 4;
    const int hst = bst + steps * cl, yst = hst + lr;
    float* dynf = (float*)gxh_dyn;
    if (LORA) {
        // B does not depend on the kernel before: every pass's rows by cp.async before the
        // grid wait (one trip, zero past the end), waited for once the input row is staged.
        // (Read in each pass's epilogue from L2 they put a chain of loads on every pass: run
        // 57, 285 → 209 tok/s.)
        // 16 bytes a copy where B's rows, the staged rows and lb are 16-byte aligned (lr a
        // multiple of 4: a group of 4 floats then never crosses a row, nor the gate/up halves).
        const bool wide = LORA_STAGE16 && (lr & 3) == 0 && (bst & 3) == 0 && (((unsigned long)lb) & 15) == 0;
        const int g = wide ? 4 : 1;  // floats a copy
        for (int st = 0; st < steps; st++) {
            const int p = (int)blockIdx.x + st * (int)gridDim.x;
            for (int i = g * tid; i < cl; i += g * nt) {
                const float* src = nullptr;
                if (PAIR) {
                    const int up = i >= rs * lr, ii = i - (up ? rs * lr : 0), j = p * rs + ii / lr;
                    if (j < pair) src = lb + ((long)(up ? pair : 0) + j) * lr + ii % lr;
                } else {
                    const long e = (long)p * cl + i;
                    if (e < (long)rows * lr) src = lb + e;
                }
                const unsigned dst = smem_addr(dynf + bst + st * cl + i);
                if (wide) cp_async16_zfill(dst, src ? src : lb, src ? 16 : 0);
                else cp_async4_zfill(dst, src ? src : lb, src ? 4 : 0);
            }
        }
        asm volatile("cp.async.commit_group;" ::: "memory");
        // The parts of A's rows this block's shrink takes (item k ≡ gridDim − 1 − block), into L2.
        for (int k = (int)gridDim.x - 1 - (int)blockIdx.x; k < lr * LORA_SPLIT; k += (int)gridDim.x) {
            const int part = k % LORA_SPLIT, n4 = cols / 4;  // lora_shrink_item's range
            const int b = 4 * (part * n4 / LORA_SPLIT), e = 4 * ((part + 1) * n4 / LORA_SPLIT);
            for (int i = b + tid * 32; i < e; i += nt * 32)
                asm volatile("prefetch.global.L2 [%0];" ::"l"(la + (long)(k / LORA_SPLIT) * cols + i));
        }
    }
    // The first pass's weights in flight while the kernel before ends and the input row is
    // staged (they do not depend on it either).
    if (steps > 0 && active) load();
    qlora_grid_wait_gemv();
    // The input row, once a block, into shared memory after the table; with NORM,
    // RMSNorm(xn) · gn first, rounded to lp as `rms_norm` rounds it. (Each thread loading its
    // own piece read the row rs times a block: for the f32 norm input that was more than the
    // weights of a 6144-row matrix.)
    if (NORM) {
        // A thread's first NU float4s of xn stay in registers across the sum (rows of up to
        // 4 · NU · nt elements: Mistral's 4096 takes two), and its norm weights are prefetched
        // into L1 meanwhile, so the row costs one trip to L2; the rest is read again.
        constexpr int NU = 4;
        const int n4 = cols / 4;
        const float4* x4 = (const float4*)xn;
        const float4* g4 = (const float4*)gn;
        float4 u[NU];
        float ss = 0.f;
#pragma unroll
        for (int k = 0; k < NU; k++) {
            const int i = tid + k * nt;
            u[k] = i < n4 ? x4[i] : make_float4(0.f, 0.f, 0.f, 0.f);
            if (i < n4) asm volatile("prefetch.global.L1 [%0];" ::"l"(g4 + i));
        }
#pragma unroll
        for (int k = 0; k < NU; k++) {
            ss = fma_sq4(u[k], ss);
        }
        for (int i = tid + NU * nt; i < n4; i += nt) {
            const float4 v = x4[i];
            ss = fma_sq4(v, ss);
        }
        const float rinv = 1.0f / sqrtf(block_sum(ss, redn) / (float)cols + eps);
        auto put = [&](int i, float4 v) {
            const float4 g = g4[i];
            xs[4 * i] = f_to_lp(g.x * (v.x * rinv));
            xs[4 * i + 1] = f_to_lp(g.y * (v.y * rinv));
            xs[4 * i + 2] = f_to_lp(g.z * (v.z * rinv));
            xs[4 * i + 3] = f_to_lp(g.w * (v.w * rinv));
        };
#pragma unroll
        for (int k = 0; k < NU; k++)
            if (tid + k * nt < n4) put(tid + k * nt, u[k]);
        for (int i = tid + NU * nt; i < n4; i += nt) put(i, x4[i]);
    } else {
        const int n16 = cols * (int)sizeof(lp_t) / 16;
        for (int i = tid; i < n16; i += nt) ((uint4*)xs)[i] = ((const uint4*)x)[i];
    }
    if (LORA) asm volatile("cp.async.wait_all;" ::: "memory");
    __syncthreads();  // the table, the input row (and B's rows)
    if (LORA) {
        // The shrink, h = A · x over the staged row, its rows spread over the grid's last
        // blocks (those with the fewest passes), each block's published with one count.
        int mine = 0;
        for (int k = (int)gridDim.x - 1 - (int)blockIdx.x; k < lr * LORA_SPLIT; k += (int)gridDim.x, mine++) {
            const float hk = lora_shrink_item(la, xs, cols, k, redn);
            if (tid == 0) lh[k] = hk;
        }
        if (mine && tid == 0) {
            __threadfence();
            atomicAdd(lflag, (unsigned)mine);
        }
    }
    unsigned xh[16];
    float inv = 0.f;
    if (active) {
        float xv[32];
        load_x32(xs + c * 32, xv);
        float m = 0.f;
#pragma unroll
        for (int e = 0; e < 32; e++) m = fmaxf(m, fabsf(xv[e]));
        int s = 0;
        if (m > 0.f) s = min(max(10 - ((int)((__float_as_uint(m) >> 23) & 255u) - 127), -120), 120);
        const float sc = __uint_as_float((unsigned)(127 + s) << 23);
        inv = __uint_as_float((unsigned)(127 - s) << 23);
#pragma unroll
        for (int f = 0; f < 16; f++) xh[f] = f2_to_h2(xv[2 * f] * sc, xv[2 * f + 1] * sc);
    } else {
#pragma unroll
        for (int f = 0; f < 16; f++) xh[f] = 0u;
    }
#pragma unroll 2
    for (int st = 0; st < steps; st++) {
        uint4 q[R];
        float s[R];
#pragma unroll
        for (int r = 0; r < R; r++) {
            q[r] = qn[r];
            s[r] = sn[r];
        }
        if (st + 1 < steps && active) load();
        const int slot = st % (2 * GXH_WINDOW);
        float v[R];
#pragma unroll
        for (int r = 0; r < R; r++) v[r] = active ? dot32h(q[r], xh, lut_s, lane4) * inv * s[r] : 0.f;
        // Butterfly over the R rows at once: level 16 keeps rows [0, R/2) on the low lanes and
        // [R/2, R) on the high ones; the other levels reduce R/2 values each.
        const bool upper = lane & 16;
        float h[R / 2];
#pragma unroll
        for (int r = 0; r < R / 2; r++) {
            const float give = upper ? v[r] : v[r + R / 2];
            const float keep = upper ? v[r + R / 2] : v[r];
            h[r] = keep + __shfl_xor_sync(0xffffffffu, give, 16);
        }
#pragma unroll
        for (int o = 8; o > 0; o >>= 1)
#pragma unroll
            for (int r = 0; r < R / 2; r++) h[r] += __shfl_xor_sync(0xffffffffu, h[r], o);
        if ((lane & 15) == 0)
#pragma unroll
            for (int r = 0; r < R / 2; r++) red[slot][r + (upper ? R / 2 : 0)][warp] = h[r];
        // The block meets only at the end of a window of GXH_WINDOW passes (and after its last
        // pass), and then finishes that window's rows; the window after it writes the other
        // half of `red`, so no warp waits for the others in between.
        if (st % GXH_WINDOW != GXH_WINDOW - 1 && st + 1 != steps) continue;
        __syncthreads();
        const int w0 = st - st % GXH_WINDOW;
        auto row_sum = [&](int sl, int i) {  // pass slot sl's row i (thread group i / R), warps in order
            float sum = 0.f;
            for (int w = 0; w < kw; w++) sum += red[sl][i % R][(i / R) * kw + w];
            return sum;
        };
        const int per = PAIR ? rs : rows_pass;  // what a pass finishes: pairs, or rows
        for (int q = tid; q < (st - w0 + 1) * per; q += nt) {
            const int sw = w0 + q / per, i = q % per, sl = sw % (2 * GXH_WINDOW);
            const int p = (int)blockIdx.x + sw * (int)gridDim.x;
            if (PAIR) {
                const int j = p * rs + i;
                if (j < pair) {
                    const float gt = row_sum(sl, 2 * i), up = row_sum(sl, 2 * i + 1);
                    if (LORA) {
                        dynf[yst + sw * rows_pass + 2 * i] = gt;
                        dynf[yst + sw * rows_pass + 2 * i + 1] = up;
                    } else {
                        ((lp_t*)y)[j] = f_to_lp(gt / (1.0f + expf(-gt)) * up);
                    }
                }
            } else {
                const int row = p * rows_pass + i;
                if (row < rows) {
                    const float sum = row_sum(sl, i);
                    if (LORA) {
                        dynf[yst + sw * rows_pass + i] = sum;
                    } else {
                        float* o = y + row;
                        *o = accumulate ? *o + sum : sum;
                    }
                }
            }
        }
    }
    if (LORA) {
        // h, once every shrink row is published (the host sizes the grid so that all its
        // blocks are resident at once), then each row's s·B · h and the store. The wait is
        // bounded: past it (a GPU shared with other work; or lfallback, set by a test) the
        // block computes h itself, the same rows in the same order, so the same bits. (The
        // wait moved to the third pass's barrier, to hide its trip to L2, changed nothing:
        // run 62.)
        __shared__ int lfail;
        if (tid == 0) lfail = wait_count(lflag, (unsigned)(lr * LORA_SPLIT), lfallback);
        __syncthreads();
        if (lfail) {
            for (int k = 0; k < lr; k++) {
                float hk = lora_shrink_item(la, xs, cols, k * LORA_SPLIT, redn);
                for (int p = 1; p < LORA_SPLIT; p++) hk += lora_shrink_item(la, xs, cols, k * LORA_SPLIT + p, redn);
                if (tid == 0) dynf[hst + k] = hk;
            }
        } else {
            for (int i = tid; i < lr; i += nt) {
                float hk = __ldcg(lh + i * LORA_SPLIT);
                for (int p = 1; p < LORA_SPLIT; p++) hk += __ldcg(lh + i * LORA_SPLIT + p);
                dynf[hst + i] = hk;
            }
        }
        __syncthreads();
        // Each row's s·B · h by a warp (lanes over the rank, then warp_sum: the block's whole
        // set of rows at once; one thread a row chained rs rows × steps × lr dependent FMAs,
        // run 60: the gate/up kernel 45 µs against 27 without the adapter), into its sum.
        const int nslots = steps * rows_pass, nw = nt >> 5;
        for (int slot = warp; slot < nslots; slot += nw) {
            const int st = slot / rows_pass, i = slot - st * rows_pass;
            // Pairs: slot i is pair i / 2's gate (even) or up (odd) row; B's staged rows are
            // the pass's rs gate rows, then its rs up rows.
            const int brow = PAIR ? (i & 1) * rs + (i >> 1) : i;
            const float* b = dynf + bst + st * cl + brow * lr;
            float d = 0.f;
            for (int k = lane; k < lr; k += 32) d = fmaf(b[k], dynf[hst + k], d);
            d = warp_sum(d);
            if (lane == 0) dynf[yst + slot] += d;
        }
        __syncthreads();
        if (PAIR) {
            for (int q = tid; q < steps * rs; q += nt) {
                const int st = q / rs, ip = q - st * rs;
                const int j = ((int)blockIdx.x + st * (int)gridDim.x) * rs + ip;
                if (j < pair) {
                    const float gt = dynf[yst + st * rows_pass + 2 * ip];
                    const float up = dynf[yst + st * rows_pass + 2 * ip + 1];
                    ((lp_t*)y)[j] = f_to_lp(gt / (1.0f + expf(-gt)) * up);
                }
            }
        } else {
            for (int slot = tid; slot < nslots; slot += nt) {
                const int st = slot / rows_pass, i = slot - st * rows_pass;
                const int row = ((int)blockIdx.x + st * (int)gridDim.x) * rows_pass + i;
                if (row < rows) {
                    float* o = y + row;
                    *o = accumulate ? *o + dynf[yst + slot] : dynf[yst + slot];
                }
            }
        }
        // The last block here resets the count for the next launch (which counts only after
        // its grid wait, so after this grid has completed).
        if (tid == 0 && atomicAdd(lflag + 1, 1u) == gridDim.x - 1) {
            atomicExch(lflag, 0u);
            atomicExch(lflag + 1, 0u);
        }
    }
}
#define GEMVXH_KERNEL(NAME, R, MINB)                                                                     \
    extern "C" __global__ void __launch_bounds__(GX_MAXT, MINB)                                          \
    NAME(const u8* __restrict__ packed, const float* __restrict__ absmax, const float* __restrict__ code, \
         int blocksize, int rows, int cols, const lp_t* __restrict__ x, int t, float* __restrict__ y,    \
         int ld, int accumulate) {                                                                        \
        gemv4xh_body<R, false, false, false>(packed, absmax, code, blocksize, rows, cols, x, y, ld,      \
                                             accumulate, nullptr, nullptr, 0.f, 0, nullptr, 0, nullptr,  \
                                             nullptr, nullptr, 0);                                        \
    }
GEMVXH_KERNEL(gemv4xh_t1, 2, 2)
GEMVXH_KERNEL(gemv4xh4_t1, 4, 1)
// gemv4xh_t1 with what gemv4xh_body's NORM, PAIR and LORA fold in: n the norm before it, g the
// SwiGLU after it, l a fused LoRA's expand.
#define GEMVXH_FUSED_KERNEL(NAME, NORM, PAIR, LORA)                                                      \
    extern "C" __global__ void __launch_bounds__(GX_MAXT, 2)                                             \
    NAME(const u8* __restrict__ packed, const float* __restrict__ absmax, const float* __restrict__ code, \
         int blocksize, int rows, int cols, const lp_t* __restrict__ x, int t, float* __restrict__ y,    \
         int ld, int accumulate, const float* __restrict__ xn, const float* __restrict__ gn, float eps,  \
         int pair, const float* __restrict__ lb, int lr, float* __restrict__ lh,                         \
         const float* __restrict__ la, unsigned* __restrict__ lflag, int lfallback) {                   \
        gemv4xh_body<2, NORM, PAIR, LORA>(packed, absmax, code, blocksize, rows, cols, x, y, ld,          \
                                          accumulate, xn, gn, eps, pair, lb, lr, lh, la, lflag,          \
                                          lfallback);                                                    \
    }
GEMVXH_FUSED_KERNEL(gemv4xh_n_t1, true, false, false)
GEMVXH_FUSED_KERNEL(gemv4xh_ng_t1, true, true, false)
GEMVXH_FUSED_KERNEL(gemv4xh_l_t1, false, false, true)
GEMVXH_FUSED_KERNEL(gemv4xh_nl_t1, true, false, true)
GEMVXH_FUSED_KERNEL(gemv4xh_ngl_t1, true, true, true)

// ---------------------------------------------------------------------------------------------
// Adapters

// After d = B(A x) for one adapter on columns [col0, col0 + n) of y [t, ld]:
// LoRA: y += s·(d + b_B); DoRA: y += (f − 1)·(y − bias) + f·s·(d + b_B), as the CPU path.
// bb (b_B), f (DoRA scale) and bias may be null.
extern "C" __global__ void lora_apply(float* __restrict__ y, int ld, int col0, const float* __restrict__ d,
                                      int n, const float* __restrict__ bb, const float* __restrict__ f,
                                      const float* __restrict__ bias, float s) {
    qlora_grid_wait();
    float* yr = y + (long)blockIdx.x * ld + col0;
    const float* dr = d + (long)blockIdx.x * n;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        float delta = dr[j] + (bb ? bb[j] : 0.f);
        if (f) {
            float base = yr[j] - (bias ? bias[j] : 0.f);
            yr[j] += (f[j] - 1.0f) * base + f[j] * (s * delta);
        } else {
            yr[j] += s * delta;
        }
    }
}

// Many stacked-LoRA adapter sets in one launch (serving's mixed batch; Punica's BGMV): row i
// of t runs with set row_set[i] (< 0: none), whose entry in `table` is four u64s: A (f32
// [r, d_in]), s·B (f32 [n, r]), r, n; an entry with A null has no adapters on this linear.
// Every sum runs in a fixed order (no atomics).
// shrink: h[i, j] = x[i, :] · A[j, :] for j < r. A block takes BG_ROWS rows and 8 values of j
// (one a warp); a warp's lanes stride d_in in float4s (d_in % 4 == 0), each A chunk read once
// for the block's rows. grid (ceil(t / BG_ROWS), ceil(max r / 8)), block 256.
#define BG_ROWS 4
extern "C" __global__ void bgmv_shrink(const float* __restrict__ x, int d_in, int t, const int* __restrict__ row_set,
                                       const unsigned long long* __restrict__ table, float* __restrict__ h,
                                       int ldh) {
    qlora_grid_wait();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int i0 = blockIdx.x * BG_ROWS, j = blockIdx.y * 8 + warp;
    const float* a[BG_ROWS];
    bool any = false;
#pragma unroll
    for (int q = 0; q < BG_ROWS; q++) {
        a[q] = nullptr;
        const int i = i0 + q;
        if (i < t) {
            const int set = row_set[i];
            if (set >= 0) {
                const float* A = (const float*)table[4 * set];
                if (A && j < (int)table[4 * set + 2]) a[q] = A + (long)j * d_in;
            }
        }
        any |= a[q] != nullptr;
    }
    if (!any) return;
    float acc[BG_ROWS];
#pragma unroll
    for (int q = 0; q < BG_ROWS; q++) acc[q] = 0.f;
#pragma unroll 2
    for (int k = lane * 4; k < d_in; k += 128) {
#pragma unroll
        for (int q = 0; q < BG_ROWS; q++) {
            if (!a[q]) continue;
            const float4 av = *(const float4*)(a[q] + k);
            const float4 xv = *(const float4*)(x + (long)(i0 + q) * d_in + k);
            acc[q] = fmaf(xv.x, av.x, fmaf(xv.y, av.y, fmaf(xv.z, av.z, fmaf(xv.w, av.w, acc[q]))));
        }
    }
#pragma unroll
    for (int q = 0; q < BG_ROWS; q++) {
        const float v = warp_sum(acc[q]);
        if (lane == 0 && a[q]) h[(long)(i0 + q) * ldh + j] = v;
    }
}

// expand: y[i, c] += Σ_j h[i, j] · B[c, j] for c < n (B already scaled by s). A block takes
// 256 columns and BG_EROWS rows, the rows' h in shared memory (r ≤ BG_MAXR); a thread's B
// row stays in L1 across the block's rows of one set.
// grid (ceil(max n / 256), ceil(t / BG_EROWS)), block 256.
#define BG_EROWS 16
#define BG_MAXR 128
extern "C" __global__ void bgmv_expand(const float* __restrict__ h, int ldh, int t, const int* __restrict__ row_set,
                                       const unsigned long long* __restrict__ table, float* __restrict__ y,
                                       int ldy) {
    qlora_grid_wait();
    __shared__ float sh[BG_EROWS][BG_MAXR];
    const int i0 = blockIdx.y * BG_EROWS, c = blockIdx.x * blockDim.x + threadIdx.x;
    const int rows = min(BG_EROWS, t - i0);
    for (int e = threadIdx.x; e < rows * BG_MAXR; e += blockDim.x) {
        const int q = e / BG_MAXR, j = e % BG_MAXR;
        sh[q][j] = j < ldh ? h[(long)(i0 + q) * ldh + j] : 0.f;
    }
    __syncthreads();
    for (int q = 0; q < rows; q++) {
        const int set = row_set[i0 + q];
        if (set < 0) continue;
        const float* b = (const float*)table[4 * set + 1];
        if (!b) continue;
        const int r = (int)table[4 * set + 2], n = (int)table[4 * set + 3];
        if (c >= n) continue;
        const float* bc = b + (long)c * r;
        float acc = 0.f;
        for (int j = 0; j < r; j++) acc = fmaf(sh[q][j], bc[j], acc);
        y[(long)(i0 + q) * ldy + c] += acc;
    }
}

// Embedding adapters: h[i, :] = a_t[ids[i], :]   a_t [vocab, r] f32, h [t, r]
// dst [n, ld] columns [c0, c0 + r) = src [n, r] (the set stacks' B side by side). total = n · r.
extern "C" __global__ void place_cols(const float* __restrict__ src, int r, float* __restrict__ dst, int ld,
                                      int c0, long total) {
    qlora_grid_wait();
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= total) return;
    long row = i / r;
    int col = (int)(i - row * r);
    dst[row * ld + c0 + col] = src[i];
}

// h [t, r]: entries whose rank column belongs to another set than the row's zeroed.
// row_set [t], col_set [r]; total = t · r.
extern "C" __global__ void mask_sets(float* __restrict__ h, int r, const int* __restrict__ row_set,
                                     const int* __restrict__ col_set, long total) {
    qlora_grid_wait();
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= total) return;
    long row = i / r;
    if (row_set[row] != col_set[i - row * r]) h[i] = 0.f;
}

extern "C" __global__ void gather_rows(const float* __restrict__ a_t, const int* __restrict__ ids, int r,
                                       float* __restrict__ h) {
    qlora_grid_wait();
    for (int j = threadIdx.x; j < r; j += blockDim.x) h[(long)blockIdx.x * r + j] = a_t[(long)ids[blockIdx.x] * r + j];
}

// x += s·d, or DoRA's x = x·f + f·(d·s).   x, d [t, dim]
extern "C" __global__ void embed_lora_apply(float* __restrict__ x, const float* __restrict__ d, int dim,
                                            const float* __restrict__ f, float s) {
    qlora_grid_wait();
    float* xr = x + (long)blockIdx.x * dim;
    const float* dr = d + (long)blockIdx.x * dim;
    for (int j = threadIdx.x; j < dim; j += blockDim.x) {
        if (f) xr[j] = xr[j] * f[j] + f[j] * (dr[j] * s);
        else xr[j] += s * dr[j];
    }
}

// ---------------------------------------------------------------------------------------------
// Sampling: greedy argmax on the device (first index of the maximum, as the CPU's).
extern "C" __global__ void argmax_rows(const float* __restrict__ logits, int v, int* __restrict__ out) {
    qlora_grid_wait();
    __shared__ float bv[1024];
    __shared__ int bi[1024];
    const float* row = logits + (long)blockIdx.x * v;
    float best = -INFINITY;
    int idx = 0x7fffffff;
    for (int j = threadIdx.x; j < v; j += blockDim.x) {
        float x = row[j];
        if (x > best) { best = x; idx = j; }
    }
    bv[threadIdx.x] = best;
    bi[threadIdx.x] = idx;
    __syncthreads();
    for (int st = blockDim.x / 2; st > 0; st >>= 1) {
        if (threadIdx.x < st) {
            float ov = bv[threadIdx.x + st];
            int oi = bi[threadIdx.x + st];
            if (ov > bv[threadIdx.x] || (ov == bv[threadIdx.x] && oi < bi[threadIdx.x])) {
                bv[threadIdx.x] = ov;
                bi[threadIdx.x] = oi;
            }
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) out[blockIdx.x] = bi[0] == 0x7fffffff ? 0 : bi[0];
}

// Fill with a value (poisoning outputs in tests, clearing buffers).
extern "C" __global__ void fill_f32(float* __restrict__ a, float v, long n) {
    qlora_grid_wait();
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) a[i] = v;
}

// ---------------------------------------------------------------------------------------------
// Training: the backward of the forward's ops, the loss, and the adapters' dropout. Each is the
// CPU trainer's formula (`qlora_engine::backward`, `qlora_train::grad`), in f32.

// Block-wide max with a fixed order.
__device__ float block_max(float v, float* shm) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) shm[warp] = v;
    __syncthreads();
    float r = (threadIdx.x < nw) ? shm[threadIdx.x] : -INFINITY;
    if (warp == 0) r = warp_max(r);
    if (threadIdx.x == 0) shm[0] = r;
    __syncthreads();
    return shm[0];
}

// RoPE (rotate-half) in place on the first `heads` heads of each row at positions pos[t]; sign
// −1 rotates back (the backward: the inverse rotation). x [t, ld] f32, cos/sin [n_pos, hd/2].
// Grid (t, heads), block ≥ hd/2 threads.
extern "C" __global__ void rope_rows(float* __restrict__ x, int ld, int hd, const float* __restrict__ cos_t,
                                     const float* __restrict__ sin_t, const int* __restrict__ pos, float sign) {
    qlora_grid_wait();
    int tok = blockIdx.x, half = hd / 2, j = threadIdx.x;
    if (j >= half) return;
    float* hp = x + (long)tok * ld + (long)blockIdx.y * hd;
    long ps = pos[tok];
    float c = cos_t[ps * half + j], s = sign * sin_t[ps * half + j];
    float x1 = hp[j], x2 = hp[j + half];
    hp[j] = x1 * c - x2 * s;
    hp[j + half] = x2 * c + x1 * s;
}

// dx += RMSNorm's input gradient r·(g ⊙ dy) − x·r³·⟨x, g ⊙ dy⟩/d, r = (mean(x²) + eps)^-½
// (the residual's gradient and the norm's, summed in place). x, dy, dx [t, d] f32; a block a row.
extern "C" __global__ void rms_norm_bwd(const float* __restrict__ x, const float* __restrict__ g, float eps,
                                        int d, const float* __restrict__ dy, float* __restrict__ dx) {
    qlora_grid_wait();
    __shared__ float shm[32];
    long o = (long)blockIdx.x * d;
    float ss = 0.f, dot = 0.f;
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        float v = x[o + j];
        ss = fmaf(v, v, ss);
        dot = fmaf(v * g[j], dy[o + j], dot);
    }
    ss = block_sum(ss, shm);
    dot = block_sum(dot, shm);
    float r = 1.0f / sqrtf(ss / (float)d + eps);
    float c = r * r * r * dot / (float)d;
    for (int j = threadIdx.x; j < d; j += blockDim.x) dx[o + j] += r * g[j] * dy[o + j] - x[o + j] * c;
}

// SwiGLU's backward: a = silu(g)·u gives dg = da·u·σ(g)(1 + g(1 − σ(g))), du = da·g·σ(g).
// gu [t, 2f] f32 (gate | up, the forward's), da [t, f], dgu [t, 2f] (dgate | dup; may be gu
// itself: each thread reads its two elements before writing them), dg_lp and du_lp (may be
// null) [t, f] each the same in lp.
extern "C" __global__ void swiglu_bwd(const float* gu, int f, const float* __restrict__ da, float* dgu, long n,
                                      lp_t* __restrict__ dg_lp, lp_t* __restrict__ du_lp) {
    qlora_grid_wait();
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    long tok, j;
    row_col(i, f, &tok, &j);
    long o = tok * 2 * f + j;
    float g = gu[o], u = gu[o + f], d = da[i];
    float s = 1.0f / (1.0f + expf(-g));
    float dg = d * u * s * (1.0f + g * (1.0f - s)), du = d * g * s;
    dgu[o] = dg;
    dgu[o + f] = du;
    if (dg_lp) dg_lp[i] = f_to_lp(dg);
    if (du_lp) du_lp[i] = f_to_lp(du);
}

// The same softmax with a warp a row (8 rows a block, grid (rows / 8, heads)) for rows of up
// to SMW_MAX keys, each lane's scores in registers: no block barriers, and 8 rows in flight a
// block. The warp's sums have their own fixed order (so its bits are its own, not
// softmax_causal's).
#define SMW_PER 64
#define SMW_MAX (32 * SMW_PER)
extern "C" __global__ void __launch_bounds__(256)
softmax_causal_warp(const float* __restrict__ S, int ld, long hstride, int window, lp_t* __restrict__ P,
                    int qoff, int rows) {
    qlora_grid_wait();
    int lane = threadIdx.x & 31, r = blockIdx.x * 8 + (threadIdx.x >> 5), h = blockIdx.y;
    if (r >= rows) return;
    int i = r + qoff;
    const float* sr = S + h * hstride + (long)r * ld;
    lp_t* pr = P + h * hstride + (long)r * ld;
    int hi = min(i, ld - 1);
    int lo = window > 0 ? max(0, i + 1 - window) : 0;
    float v[SMW_PER];
    float m = -INFINITY;
#pragma unroll
    for (int k = 0; k < SMW_PER; k++) {
        int j = lane + 32 * k;
        v[k] = -INFINITY;
        if (k * 32 < ld && j >= lo && j <= hi) v[k] = sr[j];
        m = fmaxf(m, v[k]);
    }
    m = warp_max(m);
    float sum = 0.f;
#pragma unroll
    for (int k = 0; k < SMW_PER; k++) {
        int j = lane + 32 * k;
        float e = 0.f;
        if (k * 32 < ld && j >= lo && j <= hi) e = expf(v[k] - m);
        v[k] = e;
        sum += e;
    }
    float inv = 1.0f / warp_sum(sum);
#pragma unroll
    for (int k = 0; k < SMW_PER; k++) {
        int j = lane + 32 * k;
        if (k * 32 < ld && j < ld) pr[j] = f_to_lp(v[k] * inv);
    }
}

// Softmax's backward in place: dS = P ⊙ (dP − Σ_j P·dP) over each row's visible keys (P is 0
// elsewhere, and so stays dS). P [heads, hstride] lp rows of ld, dP likewise f32; row r is
// query position r + qoff among its keys (as softmax_causal). lo (may be null) gets what the
// lp rounding of dS left out (dS ≈ hi + lo to about 16 bits in bf16: a row of dS sums to zero,
// so the products with it cancel and need the extra bits). With `staged`, P and dP of the
// visible keys are read once into dynamic shared memory (2·ld floats). Grid (rows, heads).
extern "C" __global__ void softmax_bwd(lp_t* __restrict__ P, const float* __restrict__ dP, int ld, long hstride,
                                       lp_t* __restrict__ lo, int qoff, int staged) {
    qlora_grid_wait();
    extern __shared__ float sm_pd[];
    __shared__ float shm[32];
    int r = blockIdx.x, h = blockIdx.y;
    int hi = min(r + qoff, ld - 1);
    lp_t* pr = P + h * hstride + (long)r * ld;
    const float* dr = dP + h * hstride + (long)r * ld;
    float* sp = sm_pd;
    float* sd = sm_pd + ld;
    float s = 0.f;
    for (int j = threadIdx.x; j <= hi; j += blockDim.x) {
        float pv = lp_to_f(pr[j]), dv = dr[j];
        if (staged) {
            sp[j] = pv;
            sd[j] = dv;
        }
        s = fmaf(pv, dv, s);
    }
    s = block_sum(s, shm);
    lp_t* lr = lo ? lo + h * hstride + (long)r * ld : 0;
    for (int j = threadIdx.x; j <= hi; j += blockDim.x) {
        float v = staged ? sp[j] * (sd[j] - s) : lp_to_f(pr[j]) * (dr[j] - s);
        lp_t vh = f_to_lp(v);
        pr[j] = vh;
        if (lr) lr[j] = f_to_lp(v - lp_to_f(vh));
    }
    if (lr)  // the rest of the row (no visible keys): zero, as in P
        for (int j = hi + 1 + threadIdx.x; j < ld; j += blockDim.x) lr[j] = f_to_lp(0.f);
}

// Cross-entropy of each row against its label (−1: none), in place: z [rows, v] f32 becomes
// (softmax(z) − onehot(label))·scale on labeled rows and 0 on the others; loss[row] =
// logsumexp(z) − z[label] (0 without a label). A block a row.
extern "C" __global__ void cross_entropy(float* __restrict__ z, int v, const int* __restrict__ labels,
                                         float scale, float* __restrict__ loss) {
    qlora_grid_wait();
    __shared__ float shm[32];
    float* zr = z + (long)blockIdx.x * v;
    int y = labels[blockIdx.x];
    if (y < 0) {
        for (int j = threadIdx.x; j < v; j += blockDim.x) zr[j] = 0.f;
        if (threadIdx.x == 0) loss[blockIdx.x] = 0.f;
        return;
    }
    float m = -INFINITY;
    for (int j = threadIdx.x; j < v; j += blockDim.x) m = fmaxf(m, zr[j]);
    m = block_max(m, shm);
    float zy = zr[y];
    float s = 0.f;
    for (int j = threadIdx.x; j < v; j += blockDim.x) s += expf(zr[j] - m);
    s = block_sum(s, shm);  // its barriers also order every read of zr[y] before the writes
    float inv = 1.0f / s;
    for (int j = threadIdx.x; j < v; j += blockDim.x) {
        float p = expf(zr[j] - m) * inv;
        zr[j] = (j == y ? p - 1.0f : p) * scale;
    }
    if (threadIdx.x == 0) loss[blockIdx.x] = m + logf(s) - zy;
}

// The CPU trainer's dropout hash (`qlora_train::grad::uniform`): element i of a module's
// stream in [0, 1).
__device__ __forceinline__ float hash_uniform(unsigned long long ms, unsigned long long i) {
    unsigned long long h = ms ^ (i * 0xBF58476D1CE4E5B9ull);
    h ^= h >> 31;
    h *= 0x94D049BB133111EBull;
    h ^= h >> 29;
    return (float)(h >> 40) / 16777216.0f;
}

// The bf16 path of an adapter, which reads the lp input itself: A [r, d_in] f32 as its high
// and low lp parts, hi [n] = lp(x) and lo [n] = lp(x − hi), so that x·Aᵀ = x·hiᵀ + x·loᵀ to
// about 16 bits.
extern "C" __global__ void split_lp(const float* __restrict__ x, lp_t* __restrict__ hi, lp_t* __restrict__ lo,
                                    long n) {
    qlora_grid_wait();
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    lp_t h = f_to_lp(x[i]);
    hi[i] = h;
    lo[i] = f_to_lp(x[i] - lp_to_f(h));
}

// The same split row by row: x [rows, r] f32 → out [rows, 2r] lp, each row its r high parts
// then its r low parts. n = rows · r.
extern "C" __global__ void split_rows_lp(const float* __restrict__ x, int r, lp_t* __restrict__ out, long n) {
    qlora_grid_wait();
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    long row, j;
    row_col(i, r, &row, &j);
    lp_t h = f_to_lp(x[i]);
    out[row * 2 * r + j] = h;
    out[row * 2 * r + r + j] = f_to_lp(x[i] - lp_to_f(h));
}

// h [rows, r] = h2[:, :r] + h2[:, r:]   (h2 [rows, 2r] f32: the products with the high and low
// parts). n = rows · r.
extern "C" __global__ void sum_halves(const float* __restrict__ h2, int r, float* __restrict__ h, long n) {
    qlora_grid_wait();
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    long row, j;
    row_col(i, r, &row, &j);
    h[i] = h2[row * 2 * r + j] + h2[row * 2 * r + r + j];
}

// g [n] += g2[0 .. n) + g2[n .. 2n)   (a gradient from the products with the high and low parts)
extern "C" __global__ void add_halves(float* __restrict__ g, const float* __restrict__ g2, long n) {
    qlora_grid_wait();
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) g[i] += g2[i] + g2[n + i];
}

// Zeroes columns [c0, c0 + nc) of rows x [rows, ld] f32. n = rows · nc.
extern "C" __global__ void zero_cols(float* __restrict__ x, int ld, int c0, int nc, long n) {
    qlora_grid_wait();
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[(i / nc) * ld + c0 + i % nc] = 0.f;
}

// The bf16 path's dropout: out = x where the hash keeps the element, else 0 (the 1/(1 − p) goes
// into the products' alpha, so out stays exact in lp). Same mask as adapter_in.
extern "C" __global__ void drop_lp(const lp_t* __restrict__ x, lp_t* __restrict__ out, long n,
                                   unsigned long long seed, long i0, float p) {
    qlora_grid_wait();
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    out[i] = hash_uniform(seed, (unsigned long long)(i0 + i)) >= p ? x[i] : f_to_lp(0.f);
}

// An adapter's input: x widened to f32, and with p > 0 dropped out (kept elements times
// `scale` = 1/(1 − p)), the mask from the hash of (seed, i0 + i) so a recompute sees the same
// one (i0: the first element's index in the whole input, for row chunks). x, out [n].
extern "C" __global__ void adapter_in(const lp_t* __restrict__ x, float* __restrict__ out, long n,
                                      unsigned long long seed, long i0, float p, float scale) {
    qlora_grid_wait();
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float v = lp_to_f(x[i]);
    if (p > 0.f) v = hash_uniform(seed, (unsigned long long)(i0 + i)) >= p ? v * scale : 0.f;
    out[i] = v;
}

// dx += the gradient of the dropped-out input back through the same mask.   dx, dxd [n]
extern "C" __global__ void dropout_add(float* __restrict__ dx, const float* __restrict__ dxd, long n,
                                       unsigned long long seed, long i0, float p, float scale) {
    qlora_grid_wait();
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    if (hash_uniform(seed, (unsigned long long)(i0 + i)) >= p) dx[i] += dxd[i] * scale;
}

// Σ x² of n elements in f64, in a fixed order: block b sums elements b, b + grid, … (a
// thread's share in order, then the block's tree) into out[b]; the host adds the blocks.
extern "C" __global__ void sumsq_f64(const float* __restrict__ x, long n, double* __restrict__ out) {
    qlora_grid_wait();
    __shared__ double shm[256];
    double s = 0.0;
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        s += (double)x[i] * (double)x[i];
    shm[threadIdx.x] = s;
    __syncthreads();
    for (int st = blockDim.x / 2; st > 0; st >>= 1) {
        if (threadIdx.x < st) shm[threadIdx.x] += shm[threadIdx.x + st];
        __syncthreads();
    }
    if (threadIdx.x == 0) out[blockIdx.x] = shm[0];
}

// AdamW as PyTorch's single-tensor implementation (`qlora_train::AdamW::update`), on the
// gradient scaled by the clipping coefficient `coef`: p ← p·decay; m ← m + (g − m)(1 − β1);
// v ← β2·v + (1 − β2)·g²; p ← p − step_size · m / (√v / bc2_sqrt + eps).
extern "C" __global__ void adamw(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ m,
                                 float* __restrict__ v, long n, float coef, float decay, float b1, float b2,
                                 float eps, float step_size, float bc2_sqrt) {
    qlora_grid_wait();
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float gr = coef < 1.0f ? g[i] * coef : g[i];
    float pi = p[i] * decay;
    float mi = m[i] + (gr - m[i]) * (1.0f - b1);
    float vi = v[i] * b2 + (1.0f - b2) * gr * gr;
    float denom = sqrtf(vi) / bc2_sqrt + eps;
    p[i] = pi - step_size * (mi / denom);
    m[i] = mi;
    v[i] = vi;
}
