//! One GPU: its context, one stream, a cuBLAS handle, the kernels compiled by NVRTC for its
//! architecture, device buffers and typed launches. Everything runs on the one stream, in
//! order; nothing synchronizes but the copies back to the host.

use crate::{Error, Precision, Result};
use cudarc::cublas::sys as cublas;
use cudarc::driver::sys as cu;
use cudarc::nvrtc::sys as nvrtc;
use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::sync::Arc;

/// The kernel source, compiled at run time (and in CI by `tests/nvrtc_compile.rs`).
pub const KERNELS: &str = include_str!("kernels.cu");

/// Every kernel in `kernels.cu`, looked up after compiling.
pub const KERNEL_NAMES: &[&str] = &[
    "embed",
    "rms_norm",
    "add_f32",
    "add_bias",
    "f32_to_lp",
    "lp_to_f32",
    "swiglu",
    "rope_store",
    "attention_v",
    "attention_s",
    "attention_rope_v",
    "attention_rope_s",
    "attention_merge",
    "dequant4",
    "dequant4_x32",
    "dequant_int8",
    "dequant_grouped",
    "gemv4m",
    "gemv4m4",
    "gemv4h",
    "gemv4_t1",
    "gemv4_t2",
    "gemv4_t4",
    "gemv4_t8",
    "gemv4_np_t1",
    "gemv4_p3_t1",
    "gemv4s_t1",
    "gemv4s_t2",
    "gemv4s_t4",
    "gemv4s_t8",
    "gemv4x_t1",
    "gemv4x_t2",
    "gemv4xh_t1",
    "gemv4xh_n_t1",
    "gemv4xh_ng_t1",
    "gemv4xh_l_t1",
    "gemv4xh_nl_t1",
    "gemv4xh_ngl_t1",
    "gemv4xh4_t1",
    "gemvq4_t1",
    "gemvq4_t2",
    "gemvq4_t4",
    "gemvq4_t8",
    "gemvq8_t1",
    "gemvq8_t2",
    "gemvq8_t4",
    "gemvq8_t8",
    "softmax_causal",
    "softmax_causal_warp",
    "lora_apply",
    "bgmv_shrink",
    "bgmv_expand",
    "gather_rows",
    "place_cols",
    "mask_sets",
    "embed_lora_apply",
    "argmax_rows",
    "fill_f32",
    "rope_rows",
    "rms_norm_bwd",
    "swiglu_bwd",
    "softmax_bwd",
    "cross_entropy",
    "adapter_in",
    "dropout_add",
    "split_lp",
    "split_rows_lp",
    "sum_halves",
    "add_halves",
    "zero_cols",
    "drop_lp",
    "sumsq_f64",
    "adamw",
];

pub(crate) fn check(r: cu::CUresult, what: &str) -> Result<()> {
    if r == cu::CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(Error::Cuda(format!("{what}: {r:?}")))
    }
}

fn check_blas(r: cublas::cublasStatus_t, what: &str) -> Result<()> {
    if r == cublas::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
        Ok(())
    } else {
        Err(Error::Cuda(format!("cuBLAS {what}: {r:?}")))
    }
}

/// One fused bitsandbytes 4-bit GEMV for decode: y[t, ld] (+)= x[t, cols] · W[rows, cols]ᵀ,
/// W packed two codes a byte (high nibble first) with one f32 absmax per `blocksize` codes, x
/// of the matrix-product type, y f32. Needs cols % 32 == 0, blocksize % 32 == 0 and
/// cols % blocksize == 0 (`gemv4_fits`).
#[derive(Clone, Copy, Debug)]
pub struct Gemv4 {
    pub packed: cu::CUdeviceptr,
    pub absmax: cu::CUdeviceptr,
    pub code: cu::CUdeviceptr,
    pub blocksize: usize,
    pub rows: usize,
    pub cols: usize,
    pub x: cu::CUdeviceptr,
    pub t: usize,
    pub y: cu::CUdeviceptr,
    pub ld: usize,
    pub accumulate: bool,
}

/// What `Gpu::gemv4_fused` folds into a one-token GEMV (kernels.cu `gemv4xh_body`).
#[derive(Clone, Copy, Debug, Default)]
pub struct GemvFuse {
    /// Non-zero: the input is RMSNorm(xn) · gn (xn f32 [cols], gn f32 [cols]); `Gemv4::x` is
    /// then not read.
    pub xn: cu::CUdeviceptr,
    pub gn: cu::CUdeviceptr,
    pub eps: f32,
    /// Non-zero (with xn): rows j and pair + j (rows = 2 · pair) give silu(row j) · row pair +
    /// j, stored lp at `Gemv4::y` [pair].
    pub pair: usize,
    /// lr > 0: a fused LoRA, computed in the same kernel: its shrink h = la · x (la f32 [lr,
    /// cols], h written to lh f32 [lr]) by the grid's last blocks, then each row adds lb[row,
    /// :lr] · h (lb f32 [rows, lr], the LoRA's s·B), before the SwiGLU where there is one.
    pub lb: cu::CUdeviceptr,
    pub lr: usize,
    pub lh: cu::CUdeviceptr,
    pub la: cu::CUdeviceptr,
    /// u32 [2], zero before the first launch (each launch leaves it zero): the count of h's
    /// published rows and of the blocks done with it.
    pub lflag: cu::CUdeviceptr,
    /// Every block computes h itself rather than wait for the shrink's blocks (the path a
    /// block takes if that wait times out; for tests: the same bits either way).
    pub lora_fallback: bool,
}

/// The arguments every fused 4-bit GEMV kernel starts with.
fn gemv4_args(g: &Gemv4) -> [Arg; 11] {
    use Arg::*;
    [
        P(g.packed),
        P(g.absmax),
        P(g.code),
        I(g.blocksize as i32),
        I(g.rows as i32),
        I(g.cols as i32),
        P(g.x),
        I(g.t as i32),
        P(g.y),
        I(g.ld as i32),
        I(g.accumulate as i32),
    ]
}

/// Most tokens one fused GEMV launch takes (kernels.cu gemv4s_t8, gemv4m).
pub const GEMV_MAX_T: usize = 8;
/// Most tokens one `gemv4m4` launch takes (kernels.cu GM4_NT · 8).
pub const GEMV4M4_MAX_T: usize = 32;
/// Most tokens the fused GEMV serves in bf16 mode with QLORA_GEMV=mma (`gemv4m4` in passes of
/// 32); past it, dequantization and cuBLAS.
pub const GEMV_MMA_MAX_T: usize = 64;
/// The same by default: one pass of `gemv4m4`. Two passes read the weights twice, and at 64
/// tokens dequantization and cuBLAS were faster (run 26: 4,352 against run 22's 4,925 tok/s).
pub const GEMV_MMA_DEFAULT_MAX_T: usize = GEMV4M4_MAX_T;

/// Parts a row of a fused LoRA's A its shrink is split into (kernels.cu LORA_SPLIT): the
/// one-token GEMV's `lh` then holds h[k]'s parts at k · split + p, summed in order. 2 by
/// default (batch-1 decode with r=16 on all seven projections 361-364 → 372 tok/s, run 80);
/// QLORA_LORA_SPLIT=1, 2 or 4.
pub fn lora_split() -> usize {
    static K: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *K.get_or_init(|| {
        std::env::var("QLORA_LORA_SPLIT")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|k| matches!(k, 1 | 2 | 4))
            .unwrap_or(2)
    })
}

/// Most tokens the tensor-core GEMVs take in bf16 mode.
fn mma_max_t() -> usize {
    if gemv_family() == "mma" {
        GEMV_MMA_MAX_T
    } else {
        GEMV_MMA_DEFAULT_MAX_T
    }
}

/// Attention of `t` tokens over the paged KV cache (kernels.cu `attention_body`): each token's
/// q rows in `qkv` ([t, ld] f32), its sequence and position in `seq`/`pos` ([t] i32), block
/// tables [batch, max_blocks]; the output `out` [t, heads · hd] lp and, when non-zero, `out32`
/// the same in f32. `part` is scratch of at least `attention_part_bytes` for the split keys.
#[derive(Clone, Copy, Debug)]
pub struct Attention {
    pub qkv: u64,
    pub ld: usize,
    pub k: u64,
    pub v: u64,
    pub seq: u64,
    pub pos: u64,
    pub tables: u64,
    pub max_blocks: usize,
    pub block_size: usize,
    pub heads: usize,
    pub kvh: usize,
    pub hd: usize,
    pub window: usize,
    pub scale: f32,
    pub t: usize,
    pub out: u64,
    pub out32: u64,
    pub part: u64,
    /// The parts each token's keys are split into; None: `attention_splits`.
    pub splits: Option<usize>,
    /// RoPE in the attention (one token, `t` = 1): q and the new key arrive unrotated, and
    /// the kernel rotates them and stores the key and value at the token's slot, which is
    /// what `rope_store` before it would do, to the bit.
    pub rope: Option<AttRope>,
}

/// The rotation tables and the token's cache slot for `Attention::rope`: cos/sin [n_pos,
/// hd/2] f32, slot [t] i32 (block · block_size + offset).
#[derive(Clone, Copy, Debug)]
pub struct AttRope {
    pub cos: u64,
    pub sin: u64,
    pub slot: u64,
}

/// Whether the decode attention asks L2 for its part's first keys before its grid wait
/// (kernels.cu `attention_body`); `QLORA_ATT_PREFETCH=0` turns it off.
fn att_prefetch() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("QLORA_ATT_PREFETCH").is_none_or(|v| v != "0"))
}

/// Query heads one attention block takes (kernels.cu ATT_HEADS).
const ATT_HEADS: usize = 4;
/// Most parts a token's keys are split into.
pub const ATT_MAX_SPLITS: usize = 16;
/// Fewest keys of a token's whole cache a part gets.
const ATT_MIN_KEYS_PER_SPLIT: usize = 64;

/// (blocks per kv head, query heads per block) of the attention kernel.
fn attention_head_blocks(heads: usize, kvh: usize) -> (usize, usize) {
    let group = heads / kvh;
    let hgroups = group.div_ceil(ATT_HEADS);
    (hgroups, group.div_ceil(hgroups))
}

/// How many parts a token's keys are split into: enough blocks for two per SM, each part at
/// least ATT_MIN_KEYS_PER_SPLIT keys of a full cache (`capacity` keys), at most ATT_MAX_SPLITS.
/// It depends on the batch's shape only, never on the positions, so a captured graph stays valid
/// as the context grows.
pub fn attention_splits(t: usize, heads: usize, kvh: usize, capacity: usize, sms: usize) -> usize {
    let blocks = t * kvh * attention_head_blocks(heads, kvh).0;
    (2 * sms)
        .div_ceil(blocks.max(1))
        .min(capacity.div_ceil(ATT_MIN_KEYS_PER_SPLIT))
        .clamp(1, ATT_MAX_SPLITS)
}

/// Bytes of the attention's split scratch for batches of up to `t_max` tokens split as
/// `attention_splits` does (0 when no batch is split).
pub fn attention_part_bytes(
    t_max: usize,
    heads: usize,
    kvh: usize,
    hd: usize,
    capacity: usize,
    sms: usize,
) -> usize {
    let most = (1..=t_max)
        .map(|t| match attention_splits(t, heads, kvh, capacity, sms) {
            1 => 0,
            s => t * s,
        })
        .max()
        .unwrap_or(0);
    most * heads * (hd + 2) * 4
}

/// Whether a matrix's layout suits the fused GEMV kernels.
pub fn gemv4_fits(cols: usize, blocksize: usize) -> bool {
    cols.is_multiple_of(32) && blocksize.is_multiple_of(32) && cols.is_multiple_of(blocksize)
}

/// Whether the tensor-core GEMV (`gemv4m`, bf16 mode) takes a matrix: 64-column chunks that
/// never straddle an absmax block.
pub fn gemv4m_fits(cols: usize, blocksize: usize) -> bool {
    cols.is_multiple_of(64)
        && blocksize >= 64
        && blocksize.is_power_of_two()
        && cols.is_multiple_of(blocksize)
}

/// The CUDA-core GEMV for `t` tokens (1 ≤ t ≤ 8) over `cols` inputs: the x-stationary
/// `gemv4x_t1/t2` for t ≤ 2 (its 32-column pieces as threads: cols ≤ 32 · GX_MAXT), else the
/// cp.async-staged `gemv4s_*` (with QLORA_GEMV=mma in bf16 mode the tensor-core kernels take
/// 2-64 tokens first: `gemv4m_serves`). QLORA_GEMV=staged or =registers picks the older families
/// (benchmarks; QLORA_GEMV_T1 then names the register family's t = 1 variant).
pub fn gemv4_kernel(t: usize, cols: usize) -> &'static str {
    match gemv_family() {
        "registers" => match t {
            0 | 1 => gemv_t1(),
            2 => "gemv4_t2",
            3 | 4 => "gemv4_t4",
            _ => "gemv4_t8",
        },
        f => match t {
            0 | 1 if f != "staged" && cols / 32 <= GX_MAXT => "gemv4x_t1",
            2 if f != "staged" && cols / 32 <= GX_MAXT => "gemv4x_t2",
            0 | 1 => "gemv4s_t1",
            2 => "gemv4s_t2",
            3 | 4 => "gemv4s_t4",
            _ => "gemv4s_t8",
        },
    }
}

/// QLORA_GEMV, read once: "" (the default, as "mma"), "mma", "cuda" (no tensor-core GEMV),
/// "staged" or "registers".
fn gemv_family() -> &'static str {
    static FAMILY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    FAMILY.get_or_init(|| std::env::var("QLORA_GEMV").unwrap_or_default())
}

/// Whether the tensor-core `gemv4m`/`gemv4m4` serve `t` tokens in bf16 mode: from 2 tokens by
/// default (QLORA_GEMV_MMA1=1: at 1 too, where the CUDA-core `gemv4x_t1` is faster: run 21),
/// never with QLORA_GEMV=cuda (or the older families, =staged and =registers). They are much
/// faster for decode batches (run 26, against the CUDA-core kernels: batch 8 604 → 1,485
/// tok/s, batch 32 2,722 → 4,178).
/// Each code is two bf16 parts (kernels.cu gm_fill_lut): with one, the code book's rounding
/// was one relative error per code value, correlated over every weight, and broke the
/// model-level bf16 budget (2.5e-2 against 1e-2; the example `code_rounding` shows it on the
/// CPU).
fn gemv4m_serves(t: usize) -> bool {
    static AT1: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let at1 = *AT1.get_or_init(|| std::env::var_os("QLORA_GEMV_MMA1").is_some_and(|v| v == "1"));
    matches!(gemv_family(), "" | "mma") && (t >= 2 || at1)
}

/// Dynamic shared memory of the staged GEMV (kernels.cu GEMV_STAGES · GEMV_R · 256 · 20).
const GEMV_STAGED_SMEM: u32 = 3 * 4 * 256 * 20;
/// Whether a kernel is one of the tensor-core GEMVs (their table in dynamic shared memory).
fn is_mma_gemv(kernel: &str) -> bool {
    matches!(kernel, "gemv4m" | "gemv4m4")
}

/// Dynamic shared memory of the tensor-core GEMVs: their code table (kernels.cu gm_fill_lut:
/// 256 bytes · 32 lanes · one {hi, lo} entry of 8 B).
const GM_LUT_BYTES: u32 = 2 * 256 * 32 * 4;
/// The f16 tensor-core GEMV (kernels.cu gemv4h): its code table (256 entries 256 bytes apart,
/// GH_LUT_BYTES), then the tokens' activations as f16 rows of cols + 8; its static shared
/// memory (the warps' sums and the tokens' scales, rounded up); and the most dynamic shared
/// memory it is given (two blocks an SM up to about 100 KB each).
const GH_LUT_BYTES: u32 = 256 * 256;
const GH_STATIC_SMEM: u32 = 8 << 10;
const GH_SMEM_CAP: u32 = 160 << 10;
/// Most tokens one `gemv4h` launch takes (kernels.cu GH_MAXT).
pub const GEMV4H_MAX_T: usize = 8;

/// Dynamic shared memory `gemv4h` needs for `t` tokens of `cols` inputs.
pub fn gemv4h_smem(t: usize, cols: usize) -> usize {
    GH_LUT_BYTES as usize + t * (cols + 8) * 2
}

/// Dynamic shared memory of the one-token f16 GEMVs (`gemv4xh_*`) over `cols` columns: the
/// code table, then the input row staged once a block (lp).
fn gemv4xh_smem(cols: usize, lp: usize) -> u32 {
    GH_LUT_BYTES + (cols * lp) as u32
}

/// Most shared memory a fused one-token GEMV stages of its LoRA's B rows (and h): past it,
/// the adapter takes the two-product path.
const GXH_LORA_STAGE_MAX: u32 = 32 << 10;

/// Dynamic shared memory the softmax kernels may stage a row in (`softmax_rows`): rows of up
/// to 24,576 scores forward, 12,288 backward.
const SOFTMAX_SMEM: u32 = 96 << 10;
/// The longest row the warp-a-row softmax kernels take (kernels.cu SMW_MAX).
pub const SOFTMAX_WARP_MAX: usize = 2048;
/// The fused GPTQ/AWQ GEMV: warps a block (kernels.cu GQ_WARPS) and the most tokens.
const GQ_WARPS: usize = 8;
pub const GEMVQ_MAX_T: usize = 8;
/// The most tokens a linear sends to the fused GPTQ/AWQ GEMV rather than dequantizing and
/// multiplying: the kernel re-reads its input for each token, so by 8 tokens it was 1.8× slower
/// than dequantize + cuBLAS (run 35: gate+up 44.9 µs at 1 token, 268.7 at 8, against ≈ 150).
pub const GEMVQ_DISPATCH_MAX_T: usize = 2;

/// Whether the fused GPTQ/AWQ GEMV takes a matrix: 4- or 8-bit codes, rows of whole 32-column
/// chunks, groups (contiguous in stored order) of whole chunks.
pub fn gemvq_fits(bits: u8, cols: usize, group_size: usize) -> bool {
    matches!(bits, 4 | 8)
        && cols.is_multiple_of(32)
        && group_size.is_multiple_of(32)
        && group_size > 0
}

/// One fused GPTQ/AWQ GEMV: y[t, ld] (+)= x[t, cols] · W[rows, cols]ᵀ, W from `bits`-bit codes
/// with per-group scales and zeros (`MatKind::Grouped`), x permuted by `perm` (0: none).
pub struct Gemvq {
    pub codes: cu::CUdeviceptr,
    pub scales: cu::CUdeviceptr,
    pub zeros: cu::CUdeviceptr,
    pub perm: cu::CUdeviceptr,
    pub bits: u8,
    pub group_size: usize,
    pub groups: usize,
    pub rows: usize,
    pub cols: usize,
    pub x: cu::CUdeviceptr,
    pub t: usize,
    pub y: cu::CUdeviceptr,
    pub ld: usize,
    pub accumulate: bool,
}

/// The x-stationary GEMV's limits (kernels.cu GX_MAXT, GX_STAGES, GX_R).
const GX_MAXT: usize = 512;
const GX_SMEM_PER_THREAD: u32 = 4 * 2 * 20;

/// The t = 1 variant: gemv4_t1, or QLORA_GEMV_T1 naming another (benchmarks).
fn gemv_t1() -> &'static str {
    static V: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();
    V.get_or_init(|| match std::env::var("QLORA_GEMV_T1").as_deref() {
        Ok("gemv4_np_t1") => "gemv4_np_t1",
        Ok("gemv4_p3_t1") => "gemv4_p3_t1",
        _ => "gemv4_t1",
    })
}

/// Rows one block of the staged and register GEMV families covers (GEMV_R · GEMV_GROUPS).
const GEMV_BLOCK_ROWS: usize = 16;

/// GPUs the driver reports; 0 without a driver or GPU. Cheap (no kernels are compiled): for
/// `--device auto`.
pub fn device_count() -> usize {
    if !unsafe { cu::is_culib_present() } {
        return 0;
    }
    let mut n = 0;
    unsafe {
        if cu::cuInit(0) != cu::CUresult::CUDA_SUCCESS
            || cu::cuDeviceGetCount(&mut n) != cu::CUresult::CUDA_SUCCESS
        {
            return 0;
        }
    }
    n.max(0) as usize
}

/// Whether the NVRTC library can be loaded (for a clear error instead of a panic).
pub fn nvrtc_present() -> bool {
    unsafe { nvrtc::is_culib_present() }
}

/// Compiles the kernels with NVRTC for `arch` (e.g. "sm_90"); returns the cubin.
pub fn compile(arch: &str, precision: Precision) -> Result<Vec<u8>> {
    compile_source(KERNELS, arch, precision)
}

/// Compiles a CUDA source with NVRTC for `arch`; the error carries NVRTC's log.
pub fn compile_source(source: &str, arch: &str, precision: Precision) -> Result<Vec<u8>> {
    if !nvrtc_present() {
        return Err(Error::Missing(
            "libnvrtc.so (NVRTC) could not be loaded: install the CUDA runtime compiler (e.g. `pip install nvidia-cuda-nvrtc` and put its nvidia/cu13/lib on LD_LIBRARY_PATH, or the toolkit's lib64)".into(),
        ));
    }
    let src = CString::new(source)
        .map_err(|_| Error::Invalid("kernel source holds a NUL byte".into()))?;
    let name = CString::new("qlora_kernels.cu").expect("no NUL");
    let mut opts = vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".to_string(),
        "-default-device".to_string(),
        "--fmad=true".to_string(),
    ];
    if precision == Precision::Bf16 {
        opts.push("-DQLORA_BF16".to_string());
    }
    // Which kernels let the next one be scheduled right after their grid wait rather than when
    // their blocks exit (kernels.cu qlora_grid_wait): QLORA_PDL_TRIGGER=gemv,att,other (any of
    // them, comma-separated; 0 for none; default gemv,att).
    let trigger = std::env::var("QLORA_PDL_TRIGGER").unwrap_or_else(|_| "gemv,att".into());
    for group in trigger.split(',') {
        match group {
            "gemv" => opts.push("-DQLORA_PDL_TRIGGER_GEMV".to_string()),
            "att" => opts.push("-DQLORA_PDL_TRIGGER_ATT".to_string()),
            "other" => opts.push("-DQLORA_PDL_TRIGGER_OTHER".to_string()),
            _ => {}
        }
    }
    // Passes a one-token f16 GEMV block runs between barriers (kernels.cu GXH_WINDOW):
    // QLORA_GEMV_WINDOW=1, 2, 4, 8, 16 or 32 (default 8; 1 meets after every pass).
    if let Some(w) = std::env::var("QLORA_GEMV_WINDOW")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .filter(|w| w.is_power_of_two() && *w <= 32)
    {
        opts.push(format!("-DQLORA_GXH_WINDOW={w}"));
    }
    // A fused LoRA's shrink split into parts a row (kernels.cu LORA_SPLIT; `lora_split`).
    opts.push(format!("-DQLORA_LORA_SPLIT={}", lora_split()));
    // The fused LoRA's B staged by 16-byte copies (kernels.cu LORA_STAGE16): QLORA_LORA_STAGE16=0
    // keeps the 4-byte ones.
    if std::env::var_os("QLORA_LORA_STAGE16").is_some_and(|v| v == "0") {
        opts.push("-DQLORA_LORA_STAGE16=0".to_string());
    }
    // QLORA_PTXAS_VERBOSE=1: print ptxas's registers / spills report for every kernel.
    let verbose = std::env::var_os("QLORA_PTXAS_VERBOSE").is_some();
    if verbose {
        opts.push("--ptxas-options=-v".to_string());
    }
    unsafe {
        let prog = cudarc::nvrtc::result::create_program(&src, Some(&name))
            .map_err(|e| Error::Cuda(format!("nvrtcCreateProgram: {e:?}")))?;
        let res = cudarc::nvrtc::result::compile_program(prog, &opts);
        let log = cudarc::nvrtc::result::get_program_log(prog)
            .map(|l| {
                let bytes: Vec<u8> = l.iter().map(|&c| c as u8).take_while(|&c| c != 0).collect();
                String::from_utf8_lossy(&bytes).into_owned()
            })
            .unwrap_or_default();
        if verbose {
            eprintln!("{log}");
        }
        if let Err(e) = res {
            let _ = cudarc::nvrtc::result::destroy_program(prog);
            return Err(Error::Compile(format!("{e:?} for {arch}:\n{log}")));
        }
        let mut size = 0usize;
        let r = nvrtc::nvrtcGetCUBINSize(prog, &mut size);
        if r != nvrtc::nvrtcResult::NVRTC_SUCCESS || size == 0 {
            let _ = cudarc::nvrtc::result::destroy_program(prog);
            return Err(Error::Compile(format!(
                "no cubin for {arch} ({r:?}); the architecture must be a real one (sm_XX)"
            )));
        }
        let mut cubin = vec![0u8; size];
        let r = nvrtc::nvrtcGetCUBIN(prog, cubin.as_mut_ptr() as *mut _);
        let _ = cudarc::nvrtc::result::destroy_program(prog);
        if r != nvrtc::nvrtcResult::NVRTC_SUCCESS {
            return Err(Error::Compile(format!("nvrtcGetCUBIN: {r:?}")));
        }
        // QLORA_CUBIN_DIR=DIR: keep each cubin (for cuobjdump --dump-sass).
        if let Some(dir) = std::env::var_os("QLORA_CUBIN_DIR") {
            let file = std::path::Path::new(&dir).join(format!("qlora-{arch}-{precision:?}.cubin"));
            if let Err(e) = std::fs::write(&file, &cubin) {
                eprintln!("QLORA_CUBIN_DIR: cannot write {}: {e}", file.display());
            }
        }
        Ok(cubin)
    }
}

/// Device memory, freed on drop. Untyped: the launch sites know the element type.
pub struct DevBuf {
    ptr: cu::CUdeviceptr,
    bytes: usize,
}

impl DevBuf {
    pub fn ptr(&self) -> cu::CUdeviceptr {
        self.ptr
    }
    pub fn bytes(&self) -> usize {
        self.bytes
    }
    /// The address `offset` bytes in.
    pub fn at(&self, offset: usize) -> cu::CUdeviceptr {
        debug_assert!(offset <= self.bytes);
        self.ptr + offset as u64
    }
}

impl Drop for DevBuf {
    fn drop(&mut self) {
        if self.ptr != 0 {
            unsafe {
                let _ = cu::cuMemFree_v2(self.ptr);
            }
        }
    }
}

// Device pointers are plain addresses; the context is made current before each use.
unsafe impl Send for DevBuf {}
unsafe impl Sync for DevBuf {}

/// The element types a matrix product takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dt {
    F32,
    Bf16,
}

impl Dt {
    fn cuda(self) -> cublas::cudaDataType {
        match self {
            Dt::F32 => cublas::cudaDataType::CUDA_R_32F,
            Dt::Bf16 => cublas::cudaDataType::CUDA_R_16BF,
        }
    }
    pub fn size(self) -> usize {
        match self {
            Dt::F32 => 4,
            Dt::Bf16 => 2,
        }
    }
}

/// A kernel argument: a device pointer or a scalar, passed by address to cuLaunchKernel.
#[derive(Clone, Copy)]
pub enum Arg {
    P(cu::CUdeviceptr),
    I(i32),
    L(i64),
    F(f32),
}

pub struct Gpu {
    pub ordinal: usize,
    pub name: String,
    pub arch: (i32, i32),
    pub sms: i32,
    pub precision: Precision,
    ctx: cu::CUcontext,
    pub(crate) stream: cu::CUstream,
    blas: cublas::cublasHandle_t,
    _blas_ws: DevBuf,
    _module: cu::CUmodule,
    funcs: HashMap<&'static str, cu::CUfunction>,
    pub compile_s: f64,
    /// Whether kernels launch with programmatic stream serialization (sm_90+, unless
    /// QLORA_PDL=0): each may start while the one before it finishes, and waits in
    /// `qlora_grid_wait` (kernels.cu) before touching memory.
    pub pdl: bool,
    /// The most dynamic shared memory a block of `gemv4h` may have here (the device's opt-in
    /// limit, at most GH_SMEM_CAP): its x staging bounds tokens · columns.
    gh_smem_max: u32,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Gpu(cuda:{} {} sm_{}{} {:?})",
            self.ordinal, self.name, self.arch.0, self.arch.1, self.precision
        )
    }
}

unsafe impl Send for Gpu {}
unsafe impl Sync for Gpu {}

impl Gpu {
    /// Opens GPU `ordinal`, compiles the kernels for it and creates the stream and cuBLAS.
    /// Without a driver, a GPU or NVRTC, says which is missing.
    pub fn open(ordinal: usize, precision: Precision) -> Result<Arc<Gpu>> {
        if !unsafe { cu::is_culib_present() } {
            return Err(Error::Missing(
                "libcuda.so (the NVIDIA driver) could not be loaded: this machine has no NVIDIA driver; install one, or use --device cpu".into(),
            ));
        }
        if !unsafe { cublas::is_culib_present() } {
            return Err(Error::Missing(
                "libcublas.so could not be loaded: install cuBLAS (CUDA 13: `pip install nvidia-cublas` and put its lib folder on LD_LIBRARY_PATH, or the toolkit's lib64)".into(),
            ));
        }
        unsafe {
            check(cu::cuInit(0), "cuInit (is a GPU visible? see nvidia-smi)")?;
            let mut count = 0;
            check(cu::cuDeviceGetCount(&mut count), "cuDeviceGetCount")?;
            if ordinal as i32 >= count {
                return Err(Error::Missing(format!(
                    "no CUDA device {ordinal}: this machine has {count}; use --device cuda:0 .. cuda:{}",
                    count.max(1) - 1
                )));
            }
            let mut dev = 0;
            check(cu::cuDeviceGet(&mut dev, ordinal as i32), "cuDeviceGet")?;
            let mut ctx = std::ptr::null_mut();
            check(
                cu::cuDevicePrimaryCtxRetain(&mut ctx, dev),
                "cuDevicePrimaryCtxRetain",
            )?;
            check(cu::cuCtxSetCurrent(ctx), "cuCtxSetCurrent")?;
            let attr = |a| {
                let mut v = 0;
                check(
                    cu::cuDeviceGetAttribute(&mut v, a, dev),
                    "cuDeviceGetAttribute",
                )
                .map(|_| v)
            };
            use cu::CUdevice_attribute::*;
            let arch = (
                attr(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
                attr(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
            );
            let sms = attr(CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
            let gh_smem_max = (attr(CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)? as u32)
                .saturating_sub(GH_STATIC_SMEM)
                .min(GH_SMEM_CAP);
            let mut name_buf = [0 as std::ffi::c_char; 256];
            check(
                cu::cuDeviceGetName(name_buf.as_mut_ptr(), 256, dev),
                "cuDeviceGetName",
            )?;
            let name = std::ffi::CStr::from_ptr(name_buf.as_ptr())
                .to_string_lossy()
                .into_owned();
            let t0 = std::time::Instant::now();
            let cubin = compile(&format!("sm_{}{}", arch.0, arch.1), precision)?;
            let compile_s = t0.elapsed().as_secs_f64();
            let mut module = std::ptr::null_mut();
            check(
                cu::cuModuleLoadData(&mut module, cubin.as_ptr() as *const c_void),
                "cuModuleLoadData",
            )?;
            let mut funcs = HashMap::new();
            for &n in KERNEL_NAMES {
                let cn = CString::new(n).expect("no NUL");
                let mut f = std::ptr::null_mut();
                check(cu::cuModuleGetFunction(&mut f, module, cn.as_ptr()), n)?;
                let smem = if n.starts_with("gemv4s_") {
                    GEMV_STAGED_SMEM
                } else if n == "gemv4h" {
                    gh_smem_max
                } else if n.starts_with("gemv4xh") {
                    gemv4xh_smem(
                        32 * GX_MAXT,
                        if precision == Precision::Bf16 { 2 } else { 4 },
                    ) + GXH_LORA_STAGE_MAX
                } else if is_mma_gemv(n) {
                    GM_LUT_BYTES
                } else if n.starts_with("gemv4x_") {
                    GX_SMEM_PER_THREAD * GX_MAXT as u32
                } else if n == "softmax_causal" || n == "softmax_bwd" {
                    SOFTMAX_SMEM
                } else {
                    0
                };
                if smem > 0 {
                    check(
                        cu::cuFuncSetAttribute(
                            f,
                            cu::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                            smem as i32,
                        ),
                        "cuFuncSetAttribute (dynamic shared memory)",
                    )?;
                }
                funcs.insert(n, f);
            }
            let mut stream = std::ptr::null_mut();
            check(
                cu::cuStreamCreate(
                    &mut stream,
                    cu::CUstream_flags::CU_STREAM_NON_BLOCKING as u32,
                ),
                "cuStreamCreate",
            )?;
            let mut blas = std::ptr::null_mut();
            check_blas(cublas::cublasCreate_v2(&mut blas), "create")?;
            check_blas(cublas::cublasSetStream_v2(blas, stream as _), "set stream")?;
            // Default math: tensor cores for bf16, and for f32 (CUBLAS_COMPUTE_32F) plain f32,
            // no TF32. A fixed workspace keeps graph capture legal.
            check_blas(
                cublas::cublasSetMathMode(blas, cublas::cublasMath_t::CUBLAS_DEFAULT_MATH),
                "set math mode",
            )?;
            let ws_bytes = 64 << 20;
            let mut p = 0;
            check(
                cu::cuMemAlloc_v2(&mut p, ws_bytes),
                "cuMemAlloc (cuBLAS workspace)",
            )?;
            let ws = DevBuf {
                ptr: p,
                bytes: ws_bytes,
            };
            check_blas(
                cublas::cublasSetWorkspace_v2(blas, p as *mut c_void, ws_bytes),
                "set workspace",
            )?;
            Ok(Arc::new(Gpu {
                ordinal,
                name,
                arch,
                sms,
                precision,
                ctx,
                stream,
                blas,
                _blas_ws: ws,
                _module: module,
                funcs,
                compile_s,
                pdl: arch.0 >= 9 && std::env::var_os("QLORA_PDL").is_none_or(|v| v != "0"),
                gh_smem_max,
            }))
        }
    }

    /// Makes this GPU's context current on the calling thread.
    pub fn bind(&self) -> Result<()> {
        unsafe { check(cu::cuCtxSetCurrent(self.ctx), "cuCtxSetCurrent") }
    }

    /// The element type of matrix-product inputs and the KV cache in this precision.
    pub fn lp(&self) -> Dt {
        match self.precision {
            Precision::F32 => Dt::F32,
            Precision::Bf16 => Dt::Bf16,
        }
    }

    pub fn alloc(&self, bytes: usize) -> Result<DevBuf> {
        let mut p = 0;
        if bytes > 0 {
            unsafe {
                check(
                    cu::cuMemAlloc_v2(&mut p, bytes),
                    &format!("cuMemAlloc of {} MiB (out of GPU memory?)", bytes >> 20),
                )?
            };
        }
        Ok(DevBuf { ptr: p, bytes })
    }

    /// A device copy of `data`.
    pub fn upload<T: Copy>(&self, data: &[T]) -> Result<DevBuf> {
        let bytes = std::mem::size_of_val(data);
        let b = self.alloc(bytes)?;
        self.write(&b, 0, data)?;
        Ok(b)
    }

    /// Copies `data` into `dst` at byte `offset` (ordered on the stream).
    pub fn write<T: Copy>(&self, dst: &DevBuf, offset: usize, data: &[T]) -> Result<()> {
        let bytes = std::mem::size_of_val(data);
        if bytes == 0 {
            return Ok(());
        }
        if offset + bytes > dst.bytes {
            return Err(Error::Invalid(format!(
                "write of {bytes} bytes at {offset} into a {}-byte buffer",
                dst.bytes
            )));
        }
        unsafe {
            check(
                cu::cuMemcpyHtoDAsync_v2(
                    dst.at(offset),
                    data.as_ptr() as *const c_void,
                    bytes,
                    self.stream,
                ),
                "cuMemcpyHtoDAsync",
            )?;
            // Pageable host memory: wait so the caller may reuse `data` at once.
            self.sync()
        }
    }

    /// Copies `out.len()` elements from `src` at byte `offset` to the host (waits).
    pub fn read<T: Copy>(&self, src: cu::CUdeviceptr, out: &mut [T]) -> Result<()> {
        let bytes = std::mem::size_of_val(out);
        if bytes == 0 {
            return Ok(());
        }
        unsafe {
            check(
                cu::cuMemcpyDtoHAsync_v2(out.as_mut_ptr() as *mut c_void, src, bytes, self.stream),
                "cuMemcpyDtoHAsync",
            )?;
        }
        self.sync()
    }

    pub fn sync(&self) -> Result<()> {
        unsafe {
            check(
                cu::cuStreamSynchronize(self.stream),
                "kernel or copy failed",
            )
        }
    }

    /// Launches `name` on the stream.
    pub fn launch(&self, name: &str, grid: (u32, u32), block: u32, args: &[Arg]) -> Result<()> {
        self.launch_smem(name, grid, block, 0, args)
    }

    /// Launches `name` with `smem` bytes of dynamic shared memory.
    pub fn launch_smem(
        &self,
        name: &str,
        grid: (u32, u32),
        block: u32,
        smem: u32,
        args: &[Arg],
    ) -> Result<()> {
        let f = *self
            .funcs
            .get(name)
            .ok_or_else(|| Error::Invalid(format!("no kernel {name}")))?;
        if grid.0 == 0 || grid.1 == 0 {
            return Ok(());
        }
        let mut vals: Vec<[u8; 8]> = args
            .iter()
            .map(|a| match *a {
                Arg::P(p) => p.to_le_bytes(),
                Arg::L(v) => v.to_le_bytes(),
                Arg::I(v) => {
                    let mut b = [0u8; 8];
                    b[..4].copy_from_slice(&v.to_le_bytes());
                    b
                }
                Arg::F(v) => {
                    let mut b = [0u8; 8];
                    b[..4].copy_from_slice(&v.to_le_bytes());
                    b
                }
            })
            .collect();
        let mut ptrs: Vec<*mut c_void> = vals
            .iter_mut()
            .map(|v| v.as_mut_ptr() as *mut c_void)
            .collect();
        if self.pdl {
            let mut attr = cu::CUlaunchAttribute {
                id: cu::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
                pad: [0; 4],
                value: cu::CUlaunchAttributeValue {
                    programmaticStreamSerializationAllowed: 1,
                },
            };
            let config = cu::CUlaunchConfig {
                gridDimX: grid.0,
                gridDimY: grid.1,
                gridDimZ: 1,
                blockDimX: block,
                blockDimY: 1,
                blockDimZ: 1,
                sharedMemBytes: smem,
                hStream: self.stream,
                attrs: &mut attr,
                numAttrs: 1,
            };
            return unsafe {
                check(
                    cu::cuLaunchKernelEx(&config, f, ptrs.as_mut_ptr(), std::ptr::null_mut()),
                    name,
                )
            };
        }
        unsafe {
            check(
                cu::cuLaunchKernel(
                    f,
                    grid.0,
                    grid.1,
                    1,
                    block,
                    1,
                    1,
                    smem,
                    self.stream,
                    ptrs.as_mut_ptr(),
                    std::ptr::null_mut(),
                ),
                name,
            )
        }
    }

    /// The fused 4-bit GEMV: the CUDA-core kernel `gemv4_kernel` picks (1-8 tokens), or, where
    /// in bf16 mode, the one-token `gemv4xh_t1` with f16 products (`f16_gemv_t1`), the f16
    /// tensor-core `gemv4h` (2-8 tokens, `f16_gemv`), the tensor-core
    /// `gemv4m` (2-8 tokens where gemv4h's staging does not fit, `gemv4m_serves`) and `gemv4m4`
    /// (9-32; with QLORA_GEMV=mma up to 64, in passes of 32).
    pub fn gemv4(&self, g: &Gemv4) -> Result<()> {
        if let Some(k) = self.f16_gemv_t1(g.t, g.cols, g.blocksize) {
            return self.gemv4_with(k, g);
        }
        if self.f16_gemv(g.t, g.cols, g.blocksize) {
            return self.gemv4_with("gemv4h", g);
        }
        if self.mma_gemv(g.t, g.cols, g.blocksize) {
            if g.t <= GEMV_MAX_T {
                return self.gemv4_with("gemv4m", g);
            }
            // 9 to 64 tokens: 32 at a time, each pass reading the weights once.
            for k0 in (0..g.t).step_by(GEMV4M4_MAX_T) {
                let part = Gemv4 {
                    x: g.x + (k0 * g.cols * self.lp().size()) as u64,
                    y: g.y + (k0 * g.ld * 4) as u64,
                    t: (g.t - k0).min(GEMV4M4_MAX_T),
                    ..*g
                };
                self.gemv4_with("gemv4m4", &part)?;
            }
            return Ok(());
        }
        self.gemv4_with(gemv4_kernel(g.t, g.cols), g)
    }

    /// The one-token GEMV with what `fz` folds in (`gemv4xh_{n,ng,l,nl,ngl}_t1`: the RMSNorm
    /// before it, the SwiGLU after it, a fused LoRA's expand), where `gemv4` would take
    /// `gemv4xh_t1`; Ok(false) otherwise (or with nothing to fold), having launched nothing.
    /// QLORA_GEMV_FUSE=0 turns it off (the A/B switch).
    pub fn gemv4_fused(&self, g: &Gemv4, fz: &GemvFuse) -> Result<bool> {
        use Arg::*;
        let Some((kernel, grid, nt, smem)) = self.gemv4_fused_shape(g, fz)? else {
            return Ok(false);
        };
        let mut args = gemv4_args(g).to_vec();
        args.extend([
            P(fz.xn),
            P(fz.gn),
            F(fz.eps),
            I(fz.pair as i32),
            P(fz.lb),
            I(fz.lr as i32),
            P(fz.lh),
            P(fz.la),
            P(fz.lflag),
            I(fz.lora_fallback as i32),
        ]);
        self.launch_smem(kernel, (grid, 1), nt, smem, &args)?;
        Ok(true)
    }

    /// The kernel `gemv4_fused` would launch for this GEMV and fold, with its grid, block and
    /// dynamic shared memory (None: it launches none).
    pub fn gemv4_fused_shape(
        &self,
        g: &Gemv4,
        fz: &GemvFuse,
    ) -> Result<Option<(&'static str, u32, u32, u32)>> {
        static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        if !*ON.get_or_init(|| std::env::var_os("QLORA_GEMV_FUSE").is_none_or(|v| v != "0")) {
            return Ok(None);
        }
        if self.f16_gemv_t1(g.t, g.cols, g.blocksize) != Some("gemv4xh_t1")
            || g.accumulate && fz.pair > 0
        {
            return Ok(None);
        }
        // The kernel's offset from a gate row to its up row is 32-bit.
        if fz.pair > 0 && (g.rows != 2 * fz.pair || fz.pair * g.cols / 2 >= 1 << 31) {
            return Ok(None);
        }
        let kernel = match (fz.xn != 0, fz.pair > 0, fz.lr > 0) {
            (true, false, false) => "gemv4xh_n_t1",
            (true, true, false) => "gemv4xh_ng_t1",
            (false, false, true) => "gemv4xh_l_t1",
            (true, false, true) => "gemv4xh_nl_t1",
            (true, true, true) => "gemv4xh_ngl_t1",
            (false, _, _) => return Ok(None),
        };
        let kt = (g.cols / 32).next_multiple_of(32);
        let nt = kt * (GX_MAXT / kt).max(1);
        let rows_pass = nt / kt * 2;
        let passes = g.rows.div_ceil(rows_pass); // pairs: rows_pass / 2 of them a pass
        let base = gemv4xh_smem(g.cols, self.lp().size());
        let grid = passes.min(self.resident_blocks(kernel, nt as u32, base as usize)?);
        // The block's B rows, every pass's, h, and the rows' sums (kernels.cu gemv4xh_body's
        // LORA). The kernel's wait for h needs all its blocks resident at once: the grid is at
        // most what fits (checked again below with this shared memory).
        let stage = if fz.lr > 0 {
            let steps = passes.div_ceil(grid);
            ((steps * rows_pass * (fz.lr + 1) + fz.lr) * 4) as u64
        } else {
            0
        };
        if stage > GXH_LORA_STAGE_MAX as u64 {
            return Ok(None);
        }
        let smem = base + stage as u32;
        if stage > 0 && self.resident_blocks(kernel, nt as u32, smem as usize)? < grid {
            return Ok(None);
        }
        Ok(Some((kernel, grid as u32, nt as u32, smem)))
    }

    /// Whether `gemv4h` can take `t` tokens over a matrix of this layout on this GPU (in either
    /// precision: the dispatch uses it in bf16 mode only).
    pub fn gemv4h_fits(&self, t: usize, cols: usize, blocksize: usize) -> bool {
        (1..=GEMV4H_MAX_T).contains(&t)
            && gemv4m_fits(cols, blocksize)
            && gemv4h_smem(t, cols) <= self.gh_smem_max as usize
    }

    /// Whether the f16 tensor-core GEMV takes `t` tokens over a matrix of `cols` columns: bf16
    /// mode, 2-8 tokens whose f16 copy fits its shared memory, unless QLORA_GEMV_F16=0 (or
    /// QLORA_GEMV names another family); QLORA_GEMV_F16=1 takes one token too. Against gemv4m
    /// at batch-8 decode 1,491 → 1,614 tok/s; at one token 333 → 303 against the CUDA-core
    /// `gemv4x_t1`, which stays there (run 42; GPU-NOTES.md).
    fn f16_gemv(&self, t: usize, cols: usize, blocksize: usize) -> bool {
        static MODE: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
        let mode = MODE.get_or_init(|| std::env::var("QLORA_GEMV_F16").ok());
        let from = match mode.as_deref() {
            Some("0") => return false,
            Some("1") => 1,
            _ => 2,
        };
        t >= from
            && self.precision == Precision::Bf16
            && matches!(gemv_family(), "" | "mma")
            && self.gemv4h_fits(t, cols, blocksize)
    }

    /// The one-token GEMV with f16 products (`gemv4xh_t1`, 2 rows a thread and pass, or
    /// `gemv4xh4_t1` with 4 and QLORA_GEMV_T1H=4) for a matrix of `cols` columns: bf16 mode, one
    /// token, a layout the x-stationary kernels take; QLORA_GEMV_T1H=0 (or QLORA_GEMV naming
    /// another family) keeps the f32 `gemv4x_t1`.
    fn f16_gemv_t1(&self, t: usize, cols: usize, blocksize: usize) -> Option<&'static str> {
        static MODE: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
        let kernel = match MODE
            .get_or_init(|| std::env::var("QLORA_GEMV_T1H").ok())
            .as_deref()
        {
            Some("0") => return None,
            Some("4") => "gemv4xh4_t1",
            _ => "gemv4xh_t1",
        };
        (t == 1
            && self.precision == Precision::Bf16
            && matches!(gemv_family(), "" | "mma")
            && gemv4_fits(cols, blocksize)
            && cols / 32 <= GX_MAXT)
            .then_some(kernel)
    }

    /// Whether the tensor-core GEMVs take `t` tokens over a matrix of `cols` columns.
    fn mma_gemv(&self, t: usize, cols: usize, blocksize: usize) -> bool {
        self.precision == Precision::Bf16
            && gemv4m_serves(t)
            && t <= mma_max_t()
            && gemv4m_fits(cols, blocksize)
    }

    /// Blocks of `threads` threads and `smem` bytes of dynamic shared memory that the GPU keeps
    /// resident at once (at least one an SM): a persistent kernel's grid.
    fn resident_blocks(&self, kernel: &str, threads: u32, smem: usize) -> Result<usize> {
        let f = *self
            .funcs
            .get(kernel)
            .ok_or_else(|| Error::Invalid(format!("no kernel {kernel}")))?;
        let mut per_sm = 0;
        unsafe {
            check(
                cu::cuOccupancyMaxActiveBlocksPerMultiprocessor(
                    &mut per_sm,
                    f,
                    threads as i32,
                    smem,
                ),
                "cuOccupancyMaxActiveBlocksPerMultiprocessor",
            )?;
        }
        Ok(self.sms as usize * per_sm.max(1) as usize)
    }

    /// Most tokens `gemv4` takes over a 4-bit matrix of this layout (0: none).
    /// QLORA_GEMV_MAX_T=N (benchmarks) lowers it to N: more tokens than that dequantize.
    pub fn gemv4_max_t(&self, cols: usize, blocksize: usize) -> usize {
        static CAP: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
        let cap = *CAP.get_or_init(|| {
            std::env::var("QLORA_GEMV_MAX_T")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(usize::MAX)
        });
        let most = if !gemv4_fits(cols, blocksize) {
            0
        } else if self.mma_gemv(mma_max_t(), cols, blocksize) {
            mma_max_t()
        } else {
            GEMV_MAX_T
        };
        most.min(cap)
    }

    /// The fused 4-bit GEMV with a named kernel of one of the three families (benchmarks).
    pub fn gemv4_with(&self, kernel: &str, g: &Gemv4) -> Result<()> {
        let max_t = if kernel == "gemv4m4" {
            GEMV4M4_MAX_T
        } else {
            GEMV_MAX_T
        };
        if !gemv4_fits(g.cols, g.blocksize) || g.t == 0 || g.t > max_t {
            return Err(Error::Invalid(format!(
                "fused GEMV: {} tokens over [{}, {}] with blocksize {} do not fit the kernels",
                g.t, g.rows, g.cols, g.blocksize
            )));
        }
        let args = gemv4_args(g);
        if kernel == "gemv4h" {
            let smem = gemv4h_smem(g.t, g.cols);
            if !self.gemv4h_fits(g.t, g.cols, g.blocksize) {
                return Err(Error::Invalid(format!(
                    "gemv4h: {} tokens over [{}, {}] with blocksize {} need 64-column chunks and \
                     {smem} bytes of shared memory (at most {} here)",
                    g.t, g.rows, g.cols, g.blocksize, self.gh_smem_max
                )));
            }
            let grid = g
                .rows
                .div_ceil(16)
                .min(self.resident_blocks(kernel, 256, smem)?);
            return self.launch_smem(kernel, (grid as u32, 1), 256, smem as u32, &args);
        }
        if is_mma_gemv(kernel) {
            if !gemv4m_fits(g.cols, g.blocksize) {
                return Err(Error::Invalid(format!(
                    "gemv4m: [{}, {}] with blocksize {} is not in 64-column chunks",
                    g.rows, g.cols, g.blocksize
                )));
            }
            let grid = g.rows.div_ceil(16).min(self.resident_blocks(
                kernel,
                256,
                GM_LUT_BYTES as usize,
            )?);
            return self.launch_smem(kernel, (grid as u32, 1), 256, GM_LUT_BYTES, &args);
        }
        if let Some(rows_per) = match kernel {
            "gemv4xh_t1" => Some(2),
            "gemv4xh4_t1" => Some(4),
            _ => None,
        } {
            let kt = (g.cols / 32).next_multiple_of(32);
            if kt > GX_MAXT || g.t != 1 {
                return Err(Error::Invalid(format!(
                    "{kernel}: one token of at most {} columns, not {} of {}",
                    32 * GX_MAXT,
                    g.t,
                    g.cols
                )));
            }
            let nt = kt * (GX_MAXT / kt).max(1);
            let passes = g.rows.div_ceil(nt / kt * rows_per);
            let smem = gemv4xh_smem(g.cols, self.lp().size());
            let grid = passes.min(self.resident_blocks(kernel, nt as u32, smem as usize)?);
            return self.launch_smem(kernel, (grid as u32, 1), nt as u32, smem, &args);
        }
        if kernel.starts_with("gemv4x_") {
            let kt = (g.cols / 32).next_multiple_of(32);
            if kt > GX_MAXT {
                return Err(Error::Invalid(format!(
                    "{kernel}: {} columns exceed its {} pieces",
                    g.cols,
                    32 * GX_MAXT
                )));
            }
            let nt = kt * (GX_MAXT / kt).max(1);
            let smem = GX_SMEM_PER_THREAD * nt as u32;
            let passes = g.rows.div_ceil(nt / kt * 2);
            let grid = passes.min(self.resident_blocks(kernel, nt as u32, smem as usize)?);
            return self.launch_smem(kernel, (grid as u32, 1), nt as u32, smem, &args);
        }
        let smem = if kernel.starts_with("gemv4s_") {
            GEMV_STAGED_SMEM
        } else {
            0
        };
        self.launch_smem(
            kernel,
            (g.rows.div_ceil(GEMV_BLOCK_ROWS) as u32, 1),
            256,
            smem,
            &args,
        )
    }

    /// Attention over the paged cache: `attention_v` (16-byte key loads) where the head dim
    /// allows, else `attention_s`; with the keys split, `attention_merge` after.
    pub fn attention(&self, a: &Attention) -> Result<()> {
        use Arg::*;
        let lp = self.lp().size();
        let (hgroups, hpb) = attention_head_blocks(a.heads, a.kvh);
        let splits = a
            .splits
            .unwrap_or_else(|| {
                attention_splits(
                    a.t,
                    a.heads,
                    a.kvh,
                    a.max_blocks * a.block_size,
                    self.sms as usize,
                )
            })
            .clamp(1, ATT_MAX_SPLITS);
        let kernel = match ((a.hd * lp).is_multiple_of(16), a.rope.is_some()) {
            (true, false) => "attention_v",
            (false, false) => "attention_s",
            (true, true) => "attention_rope_v",
            (false, true) => "attention_rope_s",
        };
        if splits > 1 && a.part == 0 {
            return Err(Error::Invalid(
                "attention: split keys need the part scratch".into(),
            ));
        }
        if a.rope.is_some() && a.t != 1 {
            // Several tokens of one sequence would need each other's keys stored first.
            return Err(Error::Invalid(format!(
                "attention: RoPE in the attention takes one token, got {}",
                a.t
            )));
        }
        let rope = a.rope.unwrap_or(AttRope {
            cos: 0,
            sin: 0,
            slot: 0,
        });
        let part_ml = a.part;
        let part_acc = a.part + (a.t * a.heads * splits * 2 * 4) as u64;

        self.launch(
            kernel,
            ((a.kvh * hgroups * splits) as u32, a.t as u32),
            128,
            &[
                P(a.qkv),
                I(a.ld as i32),
                P(a.k),
                P(a.v),
                P(a.seq),
                P(a.pos),
                P(a.tables),
                I(a.max_blocks as i32),
                I(a.block_size as i32),
                I(a.heads as i32),
                I(a.kvh as i32),
                I(a.hd as i32),
                I(a.window as i32),
                F(a.scale),
                I(hpb as i32),
                I(splits as i32),
                P(a.out),
                P(a.out32),
                P(part_ml),
                P(part_acc),
                P(rope.cos),
                P(rope.sin),
                P(rope.slot),
                I(att_prefetch() as i32),
            ],
        )?;
        if splits > 1 {
            self.launch(
                "attention_merge",
                (a.heads as u32, a.t as u32),
                128,
                &[
                    P(part_ml),
                    P(part_acc),
                    I(a.heads as i32),
                    I(a.hd as i32),
                    I(splits as i32),
                    P(a.out),
                    P(a.out32),
                ],
            )?;
        }
        Ok(())
    }

    /// Launches an elementwise kernel over `n` elements (256 threads a block).
    pub fn launch_n(&self, name: &str, n: usize, args: &[Arg]) -> Result<()> {
        self.launch(name, (n.div_ceil(256) as u32, 1), 256, args)
    }

    /// The fused GPTQ/AWQ GEMV (kernels.cu gemvq_body) for 1-8 tokens over groups that are
    /// contiguous in stored order (`gemvq_fits`).
    pub fn gemvq(&self, q: &Gemvq) -> Result<()> {
        use Arg::*;
        if q.t == 0 || q.t > GEMVQ_MAX_T || !gemvq_fits(q.bits, q.cols, q.group_size) {
            return Err(Error::Invalid(format!(
                "fused GPTQ/AWQ GEMV: {} tokens over [{}, {}] of {} bits in groups of {} do not fit the kernels",
                q.t, q.rows, q.cols, q.bits, q.group_size
            )));
        }
        let kernel = match (q.bits, q.t.next_power_of_two()) {
            (4, 1) => "gemvq4_t1",
            (4, 2) => "gemvq4_t2",
            (4, 4) => "gemvq4_t4",
            (4, _) => "gemvq4_t8",
            (_, 1) => "gemvq8_t1",
            (_, 2) => "gemvq8_t2",
            (_, 4) => "gemvq8_t4",
            _ => "gemvq8_t8",
        };
        // Enough warps to cover the rows, at most a few blocks an SM.
        let blocks = q.rows.div_ceil(GQ_WARPS).min(self.sms as usize * 8).max(1);
        self.launch(
            kernel,
            (blocks as u32, 1),
            (GQ_WARPS * 32) as u32,
            &[
                P(q.codes),
                P(q.scales),
                P(q.zeros),
                P(q.perm),
                I(q.group_size as i32),
                I(q.groups as i32),
                I(q.rows as i32),
                I(q.cols as i32),
                P(q.x),
                I(q.t as i32),
                P(q.y),
                I(q.ld as i32),
                I(q.accumulate as i32),
            ],
        )
    }

    /// The causal (windowed) softmax of `heads` blocks of score rows (kernels.cu
    /// softmax_causal): s [heads, hstride] f32 rows of ld → p likewise in lp; row r is query
    /// position r + qoff among its ld keys. Rows of up to SOFTMAX_WARP_MAX keys take a warp
    /// each (softmax_causal_warp); a longer row that fits in shared memory is read once.
    #[allow(clippy::too_many_arguments)]
    pub fn softmax_rows(
        &self,
        s: cu::CUdeviceptr,
        p: cu::CUdeviceptr,
        (rows, heads): (usize, usize),
        (ld, hstride): (usize, usize),
        window: usize,
        qoff: usize,
    ) -> Result<()> {
        // The warp kernel's last argument is the row count, the block kernel's the staging.
        let warp = ld <= SOFTMAX_WARP_MAX;
        let bytes = ld * 4;
        let staged = !warp && bytes <= SOFTMAX_SMEM as usize;
        let (kernel, grid, smem, last) = if warp {
            ("softmax_causal_warp", rows.div_ceil(8), 0, rows as i32)
        } else {
            (
                "softmax_causal",
                rows,
                if staged { bytes as u32 } else { 0 },
                staged as i32,
            )
        };
        self.launch_smem(
            kernel,
            (grid as u32, heads as u32),
            256,
            smem,
            &[
                Arg::P(s),
                Arg::I(ld as i32),
                Arg::L(hstride as i64),
                Arg::I(window as i32),
                Arg::P(p),
                Arg::I(qoff as i32),
                Arg::I(last),
            ],
        )
    }

    /// Softmax's backward in place of p (kernels.cu softmax_bwd), the geometry of
    /// `softmax_rows`; lo (0: none) gets the lp rounding's remainder.
    #[allow(clippy::too_many_arguments)]
    pub fn softmax_rows_bwd(
        &self,
        p: cu::CUdeviceptr,
        dp: cu::CUdeviceptr,
        lo: cu::CUdeviceptr,
        (rows, heads): (usize, usize),
        (ld, hstride): (usize, usize),
        qoff: usize,
    ) -> Result<()> {
        let bytes = 2 * ld * 4;
        let staged = bytes <= SOFTMAX_SMEM as usize;
        self.launch_smem(
            "softmax_bwd",
            (rows as u32, heads as u32),
            256,
            if staged { bytes as u32 } else { 0 },
            &[
                Arg::P(p),
                Arg::P(dp),
                Arg::I(ld as i32),
                Arg::L(hstride as i64),
                Arg::P(lo),
                Arg::I(qoff as i32),
                Arg::I(staged as i32),
            ],
        )
    }

    /// y[t, ldy] (columns from y's address) = alpha · x[t, k] · W[n, k]ᵀ + beta · y, row-major,
    /// f32 accumulation, x and W of type `dt`, y f32.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm(
        &self,
        dt: Dt,
        t: usize,
        n: usize,
        k: usize,
        x: cu::CUdeviceptr,
        ldx: usize,
        w: cu::CUdeviceptr,
        y: cu::CUdeviceptr,
        ldy: usize,
        alpha: f32,
        beta: f32,
    ) -> Result<()> {
        if t == 0 || n == 0 {
            return Ok(());
        }
        // Column-major view: Yᵀ [n, t] = Wᵀ' · Xᵀ' with W stored [n, k] row-major = [k, n] col-major.
        unsafe {
            check_blas(
                cublas::cublasGemmEx(
                    self.blas,
                    cublas::cublasOperation_t::CUBLAS_OP_T,
                    cublas::cublasOperation_t::CUBLAS_OP_N,
                    n as i32,
                    t as i32,
                    k as i32,
                    &alpha as *const f32 as *const c_void,
                    w as *const c_void,
                    dt.cuda(),
                    k as i32,
                    x as *const c_void,
                    dt.cuda(),
                    ldx as i32,
                    &beta as *const f32 as *const c_void,
                    y as *mut c_void,
                    cublas::cudaDataType::CUDA_R_32F,
                    ldy as i32,
                    cublas::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    cublas::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                ),
                "GemmEx",
            )
        }
    }

    /// Batched GEMM over device arrays of `batch` pointers, column-major as cuBLAS takes it:
    /// C = alpha · op(A) · op(B) + beta · C, A/B of type `dt`, C of type `ct`, f32 compute.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_batched(
        &self,
        trans_a: bool,
        (m, n, k): (usize, usize, usize),
        alpha: f32,
        (a, lda): (cu::CUdeviceptr, usize),
        (b, ldb): (cu::CUdeviceptr, usize),
        (c, ldc): (cu::CUdeviceptr, usize),
        dt: Dt,
        ct: Dt,
        batch: usize,
    ) -> Result<()> {
        let beta = 0f32;
        let op = |t: bool| {
            if t {
                cublas::cublasOperation_t::CUBLAS_OP_T
            } else {
                cublas::cublasOperation_t::CUBLAS_OP_N
            }
        };
        unsafe {
            check_blas(
                cublas::cublasGemmBatchedEx(
                    self.blas,
                    op(trans_a),
                    op(false),
                    m as i32,
                    n as i32,
                    k as i32,
                    &alpha as *const f32 as *const c_void,
                    a as *const *const c_void,
                    dt.cuda(),
                    lda as i32,
                    b as *const *const c_void,
                    dt.cuda(),
                    ldb as i32,
                    &beta as *const f32 as *const c_void,
                    c as *const *mut c_void,
                    ct.cuda(),
                    ldc as i32,
                    batch as i32,
                    cublas::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    cublas::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                ),
                "GemmBatchedEx",
            )
        }
    }

    /// Row-major GEMM, strided over `batch` matrices: C = alpha · op(A) · op(B) + beta · C with
    /// op(A) [m, k] (A stored [m, k], or [k, m] when `ta`), op(B) [k, n] (B stored [k, n], or
    /// [n, k] when `tb`), C [m, n]; leading dimensions and batch strides in elements. A/B of
    /// type `dt`, C of type `ct`, f32 compute (no TF32 in f32).
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_rm(
        &self,
        (ta, tb): (bool, bool),
        (m, n, k): (usize, usize, usize),
        alpha: f32,
        (a, lda, sa): (cu::CUdeviceptr, usize, usize),
        (b, ldb, sb): (cu::CUdeviceptr, usize, usize),
        beta: f32,
        (c, ldc, sc): (cu::CUdeviceptr, usize, usize),
        (dt, ct): (Dt, Dt),
        batch: usize,
    ) -> Result<()> {
        if m == 0 || n == 0 || batch == 0 {
            return Ok(());
        }
        let op = |t: bool| {
            if t {
                cublas::cublasOperation_t::CUBLAS_OP_T
            } else {
                cublas::cublasOperation_t::CUBLAS_OP_N
            }
        };
        // Column-major: Cᵀ [n, m] = op(B)ᵀ · op(A)ᵀ, each row-major matrix being its
        // transpose in column-major.
        unsafe {
            check_blas(
                cublas::cublasGemmStridedBatchedEx(
                    self.blas,
                    op(tb),
                    op(ta),
                    n as i32,
                    m as i32,
                    k as i32,
                    &alpha as *const f32 as *const c_void,
                    b as *const c_void,
                    dt.cuda(),
                    ldb as i32,
                    sb as i64,
                    a as *const c_void,
                    dt.cuda(),
                    lda as i32,
                    sa as i64,
                    &beta as *const f32 as *const c_void,
                    c as *mut c_void,
                    ct.cuda(),
                    ldc as i32,
                    sc as i64,
                    batch as i32,
                    cublas::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    cublas::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                ),
                "GemmStridedBatchedEx",
            )
        }
    }

    /// Copies `bytes` from `src` to `dst` on the device (ordered on the stream).
    pub fn copy(&self, dst: cu::CUdeviceptr, src: cu::CUdeviceptr, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        unsafe {
            check(
                cu::cuMemcpyDtoDAsync_v2(dst, src, bytes, self.stream),
                "cuMemcpyDtoDAsync",
            )
        }
    }

    /// Sets `bytes` (a multiple of 4) at `dst` to zero (ordered on the stream).
    pub fn zero(&self, dst: cu::CUdeviceptr, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        unsafe {
            check(
                cu::cuMemsetD32Async(dst, 0, bytes / 4, self.stream),
                "cuMemsetD32Async",
            )
        }
    }

    /// Starts capturing the stream's work into a graph.
    pub fn begin_capture(&self) -> Result<()> {
        unsafe {
            check(
                cu::cuStreamBeginCapture_v2(
                    self.stream,
                    cu::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
                ),
                "cuStreamBeginCapture",
            )
        }
    }

    /// Ends the capture and instantiates the graph.
    pub fn end_capture(&self) -> Result<Graph> {
        unsafe {
            let mut g = std::ptr::null_mut();
            check(
                cu::cuStreamEndCapture(self.stream, &mut g),
                "cuStreamEndCapture",
            )?;
            let mut exec = std::ptr::null_mut();
            let r = cu::cuGraphInstantiateWithFlags(&mut exec, g, 0);
            cu::cuGraphDestroy(g);
            check(r, "cuGraphInstantiate")?;
            Ok(Graph { exec })
        }
    }

    pub fn replay(&self, g: &Graph) -> Result<()> {
        unsafe { check(cu::cuGraphLaunch(g.exec, self.stream), "cuGraphLaunch") }
    }

    /// (free, total) bytes of device memory.
    pub fn mem_info(&self) -> Result<(usize, usize)> {
        let (mut f, mut t) = (0usize, 0usize);
        unsafe { check(cu::cuMemGetInfo_v2(&mut f, &mut t), "cuMemGetInfo")? };
        Ok((f, t))
    }

    /// Milliseconds of stream work done by `f` (events around it).
    pub fn time_ms(&self, f: impl FnOnce() -> Result<()>) -> Result<f64> {
        unsafe {
            let (mut a, mut b) = (std::ptr::null_mut(), std::ptr::null_mut());
            check(cu::cuEventCreate(&mut a, 0), "cuEventCreate")?;
            check(cu::cuEventCreate(&mut b, 0), "cuEventCreate")?;
            check(cu::cuEventRecord(a, self.stream), "cuEventRecord")?;
            f()?;
            check(cu::cuEventRecord(b, self.stream), "cuEventRecord")?;
            check(cu::cuEventSynchronize(b), "cuEventSynchronize")?;
            let mut ms = 0f32;
            check(
                cu::cuEventElapsedTime_v2(&mut ms, a, b),
                "cuEventElapsedTime",
            )?;
            cu::cuEventDestroy_v2(a);
            cu::cuEventDestroy_v2(b);
            Ok(ms as f64)
        }
    }
}

/// An instantiated CUDA graph.
pub struct Graph {
    exec: cu::CUgraphExec,
}

// A driver handle like the buffers' pointers: launched only with its context current.
unsafe impl Send for Graph {}

impl Drop for Graph {
    fn drop(&mut self) {
        unsafe {
            cu::cuGraphExecDestroy(self.exec);
        }
    }
}
