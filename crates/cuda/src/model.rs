//! The model on a GPU: weights uploaded once in their packed format, a paged KV cache, and one
//! forward over a batch of sequences (prefill chunks and decode steps alike).

use crate::gpu::{Arg, DevBuf, Dt, Gpu, Graph};
use crate::{Error, Precision, Result};
use qlora_engine::{Weight, WeightFormat};
use qlora_model::{Logits, Model, Projection};
use qlora_quant::GgmlType;
use std::collections::HashMap;
use std::sync::Arc;

use crate::gpu::{gemvq_fits, Gemv4, Gemvq, GEMVQ_DISPATCH_MAX_T};

pub mod train;

/// A fresh sequence's prefill of at least this many tokens runs attention as two batched
/// cuBLAS products around a causal softmax (tensor cores) instead of the paged-cache kernel.
const PREFILL_ATTN_MIN: usize = 32;
/// Captured decode graphs kept at most (one per batch shape: tokens and adapter groups).
const MAX_GRAPHS: usize = 256;
/// Rows up to which stacked-LoRA sets run as one `bgmv_shrink`/`bgmv_expand` pair over the
/// whole batch (each row its set's adapter) rather than two cuBLAS products per set.
const BGMV_MAX_T: usize = 64;
/// Most adapter-scratch columns (rank) the `bgmv_expand` kernel holds (kernels.cu BG_MAXR).
const BGMV_MAX_R: usize = 128;

/// Sets a linear's `bgmv_*` table has room for before it moves.
const TABLE_SETS: usize = 16;

/// The fewest stacked sets in a batch for which the `bgmv` pair replaces the per-set cuBLAS
/// products: none by default, 1 with QLORA_BGMV=always, 2 with =mixed. Run 23 measured it
/// slower than two cuBLAS products per set at every batch on Mistral-7B shapes (8 mixed
/// adapters at 64 sequences: 1,986 against 2,304 tok/s; one adapter at batch 1: 141 against
/// 250), so the default is the cuBLAS path; the kernels stay, checked, for the next attempt.
fn bgmv_min_sets() -> Option<usize> {
    static MODE: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    *MODE.get_or_init(|| match std::env::var("QLORA_BGMV").as_deref() {
        Ok("always") => Some(1),
        Ok("mixed") => Some(2),
        _ => None,
    })
}
/// Positions per KV cache block.
pub const KV_BLOCK: usize = 16;

/// Sizes of what is preallocated on the device.
#[derive(Debug, Clone, Copy)]
pub struct CudaOptions {
    /// Tokens one forward launch handles at most (longer inputs are run in chunks).
    pub max_batch_tokens: usize,
    /// Sequences one forward handles at most.
    pub max_seqs: usize,
    /// Positions the KV cache holds, over all live sequences.
    pub kv_tokens: usize,
    /// Replay captured CUDA graphs for decode steps.
    pub graphs: bool,
    /// Run a fresh sequence's prefill attention through cuBLAS (tensor cores) rather than the
    /// paged-cache kernel.
    pub prefill_attention: bool,
}

impl Default for CudaOptions {
    fn default() -> Self {
        CudaOptions {
            max_batch_tokens: 2048,
            max_seqs: 64,
            kv_tokens: 16384,
            graphs: true,
            prefill_attention: true,
        }
    }
}

/// A sequence's place in the paged cache: its blocks, how many positions are filled, and the
/// adapter set its tokens run with (0: the uploaded model's own adapters, if any).
#[derive(Debug, Default)]
pub struct Seq {
    blocks: Vec<u32>,
    len: usize,
    adapter: usize,
}

impl Seq {
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The adapter set (`CudaModel::add_adapters`) the sequence runs with.
    pub fn adapter(&self) -> usize {
        self.adapter
    }
}

/// Rows [row0, row0 + rows) of a launch that run with adapter set `set`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Group {
    set: usize,
    row0: usize,
    rows: usize,
}

/// Appends `rows` rows of `set`, merged into the last group when it is the same set.
fn push_group(groups: &mut Vec<Group>, set: usize, rows: usize) {
    let row0 = groups.last().map_or(0, |g| g.row0 + g.rows);
    match groups.last_mut() {
        Some(g) if g.set == set => g.rows += rows,
        _ if rows > 0 => groups.push(Group { set, row0, rows }),
        _ => {}
    }
}

enum MatKind {
    /// lp [rows, cols]
    Dense(DevBuf),
    /// packed [rows · cols / 2], absmax f32 [rows · cols / blocksize], code f32 [16]
    Bnb4 {
        packed: DevBuf,
        absmax: DevBuf,
        code: DevBuf,
        blocksize: usize,
    },
    /// cb int8 [rows, cols], scb f32 [rows]
    Int8 { cb: DevBuf, scb: DevBuf },
    /// GPTQ/AWQ: codes [rows, cols] of `bits` bits, g_idx u32 [cols], perm u32 [cols] (act
    /// order), scales and zeros f32 [rows, groups] (`qlora_engine::Groups`); `contiguous`: the
    /// group size when stored column c is in group c / size
    Grouped {
        codes: DevBuf,
        g_idx: DevBuf,
        perm: Option<DevBuf>,
        scales: DevBuf,
        zeros: DevBuf,
        groups: usize,
        bits: u8,
        contiguous: Option<usize>,
    },
}

/// Whether a one-token step's attention rotates q and the new key and stores the key itself
/// (kernels.cu `attention_rope_*`) instead of a `rope_store` launch before it;
/// `QLORA_ATT_ROPE=0` turns it off.
fn att_rope() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("QLORA_ATT_ROPE").is_none_or(|v| v != "0"))
}

/// Whether one-token GEMVs take their fused LoRA in, shrink and expand in the same kernel
/// (QLORA_LORA_FOLD=0: not, the two matrix products after the GEMV instead).
fn lora_fold_on() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("QLORA_LORA_FOLD").is_none_or(|v| v != "0"))
}

/// What `CudaModel::linear_t1` reads: the linear's lp input, or the residual row normed with
/// these RMSNorm weights.
enum T1In<'a> {
    Lp(u64),
    Norm(&'a DevBuf),
}

/// One base matrix on the device, writing output columns [col0, col0 + rows).
struct DevMat {
    kind: MatKind,
    rows: usize,
    cols: usize,
    col0: usize,
}

struct DevLora {
    /// f32 [r, d_in]
    a: DevBuf,
    /// f32 [n, r]
    b: DevBuf,
    r: usize,
    s: f32,
    /// f32 [n]
    b_bias: Option<DevBuf>,
    /// f32 [n]
    dora: Option<DevBuf>,
}

/// One projection's slice of a (possibly fused) linear layer's output.
struct Part {
    col0: usize,
    n: usize,
    /// f32 [n]
    bias: Option<DevBuf>,
}

impl DevMat {
    /// This matrix as the fused 4-bit GEMV's operand, t rows of x into y (None: it is not
    /// bitsandbytes 4-bit).
    fn gemv4(&self, x: u64, t: usize, y: u64, ld: usize, accumulate: bool) -> Option<Gemv4> {
        let MatKind::Bnb4 {
            packed,
            absmax,
            code,
            blocksize,
        } = &self.kind
        else {
            return None;
        };
        Some(Gemv4 {
            packed: packed.ptr(),
            absmax: absmax.ptr(),
            code: code.ptr(),
            blocksize: *blocksize,
            rows: self.rows,
            cols: self.cols,
            x,
            t,
            y,
            ld,
            accumulate,
        })
    }
}

/// One adapter set's adapters on a linear.
#[derive(Default)]
struct LinLora {
    /// Each part's adapters, in `DevLinear::parts` order (all empty when `fused` holds them).
    parts: Vec<Vec<DevLora>>,
    /// When every adapter on the linear is plain LoRA (no lora_B bias, no DoRA): all of them
    /// as two products, whatever the number of projections and adapters.
    fused: Option<FusedLora>,
}

impl LinLora {
    fn is_empty(&self) -> bool {
        self.fused.is_none() && self.parts.iter().all(|p| p.is_empty())
    }
    fn has_dora(&self) -> bool {
        self.parts.iter().flatten().any(|l| l.dora.is_some())
    }
    fn bytes(&self) -> usize {
        self.parts
            .iter()
            .flatten()
            .map(|l| l.a.bytes() + l.b.bytes())
            .sum::<usize>()
            + self.fused.as_ref().map_or(0, |f| f.a.bytes() + f.b.bytes())
    }
    fn max_rank(&self) -> usize {
        self.parts
            .iter()
            .flatten()
            .map(|l| l.r)
            .chain(self.fused.as_ref().map(|f| f.r))
            .max()
            .unwrap_or(0)
    }
}

/// Several projections of one input (q/k/v, gate/up) as one output [t, d_out] of column
/// slices; their bases fused into one matrix when their formats allow it.
struct DevLinear {
    mats: Vec<DevMat>,
    parts: Vec<Part>,
    d_in: usize,
    /// The adapters of each adapter set (index = set; a removed set's entry is empty).
    sets: Vec<LinLora>,
    /// u64 [capacity, 4]: each set's stacked LoRA for `bgmv_*` (A, s·B, r, n; zeros for none).
    table: DevBuf,
    /// Every set's fused LoRA side by side, when 2 to STACK_MAX_SETS sets have one.
    stack: Option<SetStack>,
}

/// Most adapter sets one linear stacks (`SetStack`).
const STACK_MAX_SETS: usize = 16;
/// Most tokens a product takes through the stack: each token row meets every stacked set's
/// adapters, so the products grow with t · sets.
const STACK_MAX_T: usize = 64;

/// Whether mixed batches use the set stacks (QLORA_SET_STACK=0 turns them off: benchmarks).
fn set_stacks_on() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("QLORA_SET_STACK").is_none_or(|v| v != "0"))
}

/// The fused LoRA of several adapter sets of one linear as one shrink and one expand product
/// for a batch that mixes them: h = x · Aᵀ against every set's A, the entries of other sets
/// than a row's own zeroed (`mask_sets`), then y += h · Bᵀ. Two products and a mask a linear
/// whatever the number of sets, instead of two products per set (Punica's SGMV, done with
/// cuBLAS: at decode sizes the wasted products cost less than the launches they save).
/// A second copy of the sets' fused LoRA, so it costs their size again in device memory.
struct SetStack {
    /// The sets stacked, in order (each set's rank columns follow the previous set's).
    sets: Vec<usize>,
    /// f32 [r, d_in]: the sets' fused A one under another.
    a: DevBuf,
    /// f32 [n, r]: the sets' fused s·B side by side.
    b: DevBuf,
    /// i32 [r]: each rank column's set.
    col_set: DevBuf,
    /// f32 [STACK_MAX_T, r]: the shrink's output.
    h: DevBuf,
    /// Σ ranks.
    r: usize,
    /// The linear's output columns.
    n: usize,
}

/// Plain LoRA adapters of a linear's projections stacked: the A matrices one under another,
/// the B matrices (scaled) on a block diagonal, so y += (x Aᵀ) Bᵀ is one shrink and one
/// expand product instead of two per adapter.
struct FusedLora {
    /// f32 [r, d_in]: every adapter's A, in part then adapter order.
    a: DevBuf,
    /// f32 [n, r]: adapter k's s·B at rows [col0, col0 + n_part), columns [r_k, r_k + rank).
    b: DevBuf,
    /// Σ ranks.
    r: usize,
    /// The linear's output columns.
    n: usize,
}

struct DevLayer {
    ln1: DevBuf,
    qkv: DevLinear,
    o: DevLinear,
    ln2: DevBuf,
    gu: DevLinear,
    down: DevLinear,
    /// lp [kv_tokens rounded to blocks, kv · hd]
    k: DevBuf,
    v: DevBuf,
}

struct DevEmbedLora {
    /// f32 [vocab, r]
    a_t: DevBuf,
    /// f32 [dim, r]
    b: DevBuf,
    r: usize,
    s: f32,
    dora: Option<DevBuf>,
}

/// Preallocated activations (sizes for `max_batch_tokens` = T).
struct Scratch {
    /// f32 [T, d] residual stream
    x: DevBuf,
    /// lp [T, max(d, f)] norm outputs and SwiGLU outputs (matrix-product inputs)
    h: DevBuf,
    /// f32 [T, max(d, f)] matrix-product inputs widened for the f32 adapter path
    x32: DevBuf,
    /// f32 [T, q + 2 kv] fused q/k/v output
    qkv: DevBuf,
    /// lp [T, heads · hd]
    attn: DevBuf,
    /// f32: the attention's split keys (`attention_part_bytes`)
    att_part: DevBuf,
    /// f32 [T, d] o/down outputs, head rows
    o: DevBuf,
    /// f32 [T, 2 f] gate | up
    gu: DevBuf,
    /// lp [largest dequantized weight]
    w: DevBuf,
    /// f32 [T, max rank]
    lh: DevBuf,
    /// u32 [2], zero between launches: the fused one-token GEMV's count of its LoRA shrink's
    /// published rows and of its blocks done (`GemvFuse::lflag`).
    lflag: DevBuf,
    /// f32 [T, max adapter output]
    ld: DevBuf,
    /// f32 [T, vocab]
    logits: DevBuf,
    /// i32 metadata, see `Meta`
    meta: DevBuf,
    /// The cuBLAS prefill attention's buffers, when max_batch_tokens ≥ PREFILL_ATTN_MIN.
    pa: Option<PrefillAttn>,
}

/// Buffers of the cuBLAS prefill attention (T = max_batch_tokens).
struct PrefillAttn {
    /// lp [T, q + 2 kv] rotated q, k and v
    qkv: DevBuf,
    /// f32 [heads, T, T] scores
    s: DevBuf,
    /// lp [heads, T, T] probabilities
    p: DevBuf,
    /// device pointer arrays, [heads] each: q, k, s (scores GEMM) and v, p, o (output GEMM)
    ptrs: DevBuf,
}

/// Offsets (in i32s) of the per-forward metadata inside `Scratch::meta`.
#[derive(Clone, Copy)]
struct Meta {
    ids: usize,
    pos: usize,
    slot: usize,
    seq: usize,
    out_rows: usize,
    tables: usize,
    /// argmax results of `step_greedy`, [max_seqs]
    argmax: usize,
    /// each token row's / each logits row's adapter set, [max_t] each
    row_set: usize,
    out_set: usize,
    total: usize,
}

impl Meta {
    fn new(max_t: usize, max_seqs: usize, max_blocks: usize) -> Self {
        let ids = 0;
        let pos = ids + max_t;
        let slot = pos + max_t;
        let seq = slot + max_t;
        let out_rows = seq + max_t;
        let tables = out_rows + max_t;
        let argmax = tables + max_seqs * max_blocks;
        let row_set = argmax + max_seqs;
        let out_set = row_set + max_t;
        Meta {
            ids,
            pos,
            slot,
            seq,
            out_rows,
            tables,
            argmax,
            row_set,
            out_set,
            total: out_set + max_t,
        }
    }
}

pub struct CudaModel {
    pub gpu: Arc<Gpu>,
    pub opts: CudaOptions,
    d: usize,
    f: usize,
    heads: usize,
    kvh: usize,
    hd: usize,
    vocab: usize,
    eps: f32,
    window: usize,
    max_pos: usize,
    embed: DevBuf,
    /// Each adapter set's embedding adapters (index = set).
    embed_lora: Vec<Vec<DevEmbedLora>>,
    /// Whether each adapter set is loaded (set 0, the uploaded model's, always is).
    live: Vec<bool>,
    /// What the adapter scratch (`lh`, `ld`, `x32`) holds per token row: (rank, part width).
    adapter_cap: (usize, usize),
    layers: Vec<DevLayer>,
    norm: DevBuf,
    head: DevLinear,
    cos: DevBuf,
    sin: DevBuf,
    s: Scratch,
    meta: Meta,
    max_blocks: usize,
    free_blocks: Vec<u32>,
    /// Captured decode steps by (tokens, each adapter group's (set, rows)).
    graphs: HashMap<(usize, Vec<(usize, usize)>), Graph>,
    any_lora: bool,
    /// Bytes of weights a decode step reads.
    pub weight_bytes: usize,
}

fn lp_bytes(gpu: &Gpu, values: &[f32]) -> Vec<u8> {
    match gpu.precision {
        Precision::F32 => bytemuck::cast_slice(values).to_vec(),
        Precision::Bf16 => values
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_bits().to_le_bytes())
            .collect(),
    }
}

/// A dense weight as the matrix-product input type (bf16 weights copied as stored).
fn upload_dense(gpu: &Gpu, w: &Weight) -> Result<DevBuf> {
    let out = gpu.alloc(w.rows * w.cols * gpu.lp().size())?;
    write_dense(gpu, w, &out, 0)?;
    Ok(out)
}

/// Writes a dense weight, widened or narrowed to the lp type, into `out` at byte `offset`.
fn write_dense(gpu: &Gpu, w: &Weight, out: &DevBuf, offset: usize) -> Result<()> {
    let stored_as_lp = match gpu.precision {
        Precision::Bf16 => w.format == WeightFormat::Ggml(GgmlType::BF16),
        Precision::F32 => w.format == WeightFormat::Ggml(GgmlType::F32),
    };
    if stored_as_lp {
        return gpu.write(out, offset, w.bytes());
    }
    // Row chunks keep the host copy small for large matrices.
    let rows = (1 << 22) / w.cols.max(1) + 1;
    let mut buf = Vec::new();
    let mut r0 = 0;
    while r0 < w.rows {
        let n = rows.min(w.rows - r0);
        buf.resize(n * w.cols, 0f32);
        w.dequantize_rows(r0, &mut buf);
        gpu.write(
            out,
            offset + r0 * w.cols * gpu.lp().size(),
            &lp_bytes(gpu, &buf),
        )?;
        r0 += n;
    }
    Ok(())
}

/// One device buffer holding `part(w)` of every weight, in order (no host concatenation).
fn upload_stacked<T: Copy>(
    gpu: &Gpu,
    ws: &[&Weight],
    part: impl Fn(&Weight) -> &[T],
) -> Result<DevBuf> {
    let total: usize = ws.iter().map(|w| std::mem::size_of_val(part(w))).sum();
    let buf = gpu.alloc(total)?;
    let mut off = 0;
    for w in ws {
        gpu.write(&buf, off, part(w))?;
        off += std::mem::size_of_val(part(w));
    }
    Ok(buf)
}

/// The bitsandbytes side data (absmax or SCB) of a 4-bit or int8 weight (its constructors
/// always set it).
fn scales(w: &Weight) -> &qlora_engine::Scales {
    w.scales()
        .expect("bnb4 and int8 weights carry their scales")
}

fn same_class(a: &Weight, b: &Weight) -> bool {
    match (a.format, b.format) {
        (WeightFormat::Bnb4(_), WeightFormat::Bnb4(_)) => {
            let (sa, sb) = (scales(a), scales(b));
            sa.code == sb.code
                && sa.blocksize == sb.blocksize
                && a.cols.is_multiple_of(sa.blocksize)
                && b.cols.is_multiple_of(sb.blocksize)
                && a.cols == b.cols
        }
        (WeightFormat::Int8, WeightFormat::Int8) => a.cols == b.cols,
        (WeightFormat::Grouped { bits: x }, WeightFormat::Grouped { bits: y }) => {
            let (ga, gb) = (a.groups().expect("grouped"), b.groups().expect("grouped"));
            x == y
                && a.cols == b.cols
                && ga.groups == gb.groups
                && ga.g_idx == gb.g_idx
                && ga.perm == gb.perm
        }
        (WeightFormat::Ggml(_), WeightFormat::Ggml(_)) => a.cols == b.cols,
        _ => false,
    }
}

/// Uploads weights (stacked by rows, in order) as one matrix.
fn upload_mat(gpu: &Gpu, ws: &[&Weight], col0: usize) -> Result<DevMat> {
    let rows: usize = ws.iter().map(|w| w.rows).sum();
    let cols = ws[0].cols;
    let kind = match ws[0].format {
        WeightFormat::Bnb4(_) => {
            let s = scales(ws[0]);
            MatKind::Bnb4 {
                packed: upload_stacked(gpu, ws, |w| w.bytes())?,
                absmax: upload_stacked(gpu, ws, |w| scales(w).values.as_slice())?,
                code: gpu.upload(&s.code)?,
                blocksize: s.blocksize,
            }
        }
        WeightFormat::Int8 => MatKind::Int8 {
            cb: upload_stacked(gpu, ws, |w| w.bytes())?,
            scb: upload_stacked(gpu, ws, |w| scales(w).values.as_slice())?,
        },
        WeightFormat::Grouped { bits } => {
            fn gr(w: &Weight) -> &qlora_engine::Groups {
                w.groups().expect("grouped weights carry their groups")
            }
            MatKind::Grouped {
                codes: upload_stacked(gpu, ws, |w| w.bytes())?,
                g_idx: gpu.upload(&gr(ws[0]).g_idx)?,
                perm: gr(ws[0]).perm.as_ref().map(|p| gpu.upload(p)).transpose()?,
                scales: upload_stacked(gpu, ws, |w| gr(w).scales.as_slice())?,
                zeros: upload_stacked(gpu, ws, |w| gr(w).zeros.as_slice())?,
                groups: gr(ws[0]).groups,
                bits,
                contiguous: gr(ws[0]).contiguous,
            }
        }
        WeightFormat::Ggml(_) => {
            let buf = gpu.alloc(rows * cols * gpu.lp().size())?;
            let mut off = 0;
            for w in ws {
                write_dense(gpu, w, &buf, off)?;
                off += w.rows * w.cols * gpu.lp().size();
            }
            MatKind::Dense(buf)
        }
    };
    Ok(DevMat {
        kind,
        rows,
        cols,
        col0,
    })
}

/// The adapters on projections `ps` (one linear's, in part order) as one adapter set.
fn upload_lora(gpu: &Gpu, ps: &[&Projection]) -> Result<LinLora> {
    let d_in = ps[0].d_in();
    let col0: usize = ps.iter().map(|p| p.d_out()).sum();
    // Plain LoRA everywhere: stack the adapters (their deltas add, in any order).
    let plain = ps
        .iter()
        .flat_map(|p| &p.lora)
        .all(|l| l.b_bias.is_none() && l.dora_scale.is_none());
    let total_r: usize = ps.iter().flat_map(|p| &p.lora).map(|l| l.a.rows).sum();
    if !plain {
        let mut parts = Vec::new();
        for p in ps {
            let mut lora = Vec::new();
            for l in &p.lora {
                lora.push(DevLora {
                    a: gpu.upload(&l.a.to_f32())?,
                    b: gpu.upload(&l.b.to_f32())?,
                    r: l.a.rows,
                    s: l.scaling,
                    b_bias: l.b_bias.as_ref().map(|b| gpu.upload(b)).transpose()?,
                    dora: l.dora_scale.as_ref().map(|f| gpu.upload(f)).transpose()?,
                });
            }
            parts.push(lora);
        }
        return Ok(LinLora { parts, fused: None });
    }
    let fused = if total_r > 0 {
        let n = col0;
        let mut a = Vec::with_capacity(total_r * d_in);
        let mut b = vec![0f32; n * total_r];
        let (mut r0, mut c0) = (0, 0);
        for p in ps {
            for l in &p.lora {
                let r = l.a.rows;
                a.extend(l.a.to_f32());
                let lb = l.b.to_f32();
                for i in 0..p.d_out() {
                    for j in 0..r {
                        b[(c0 + i) * total_r + r0 + j] = l.scaling * lb[i * r + j];
                    }
                }
                r0 += r;
            }
            c0 += p.d_out();
        }
        Some(FusedLora {
            a: gpu.upload(&a)?,
            b: gpu.upload(&b)?,
            r: total_r,
            n,
        })
    } else {
        None
    };
    Ok(LinLora {
        parts: ps.iter().map(|_| Vec::new()).collect(),
        fused,
    })
}

/// Projections `ps` of one input as a linear: the bases (fused when their formats allow),
/// the biases, and their adapters as set 0.
fn upload_linear(gpu: &Gpu, ps: &[&Projection]) -> Result<DevLinear> {
    let d_in = ps[0].d_in();
    let mut parts = Vec::new();
    let mut col0 = 0;
    for p in ps {
        parts.push(Part {
            col0,
            n: p.d_out(),
            bias: p.bias.as_ref().map(|b| gpu.upload(b)).transpose()?,
        });
        col0 += p.d_out();
    }
    let set0 = upload_lora(gpu, ps)?;
    let fuse = ps.windows(2).all(|w| same_class(&w[0].base, &w[1].base));
    let mats = if fuse {
        let ws: Vec<&Weight> = ps.iter().map(|p| &p.base).collect();
        vec![upload_mat(gpu, &ws, 0)?]
    } else {
        let mut v = Vec::new();
        for (p, part) in ps.iter().zip(&parts) {
            v.push(upload_mat(gpu, &[&p.base], part.col0)?);
        }
        v
    };
    let mut lin = DevLinear {
        mats,
        parts,
        d_in,
        sets: vec![set0],
        table: gpu.alloc(TABLE_SETS * 4 * 8)?,
        stack: None,
    };
    lin.write_table(gpu)?;
    Ok(lin)
}

impl DevLinear {
    /// `rebuild_stack`; true when a stack was or is there (captured graphs may point at it).
    /// The stack only speeds mixed batches up, so a failure to build it (out of device
    /// memory) leaves none and the per-set products serve.
    fn restack(&mut self, gpu: &Gpu) -> bool {
        let had = self.stack.is_some();
        if self.rebuild_stack(gpu).is_err() {
            self.stack = None;
        }
        had || self.stack.is_some()
    }

    /// Rebuilds `stack` from the sets' fused LoRA (after sets were added or removed).
    fn rebuild_stack(&mut self, gpu: &Gpu) -> Result<()> {
        self.stack = None;
        let fused: Vec<(usize, &FusedLora)> = self
            .sets
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.fused.as_ref().map(|f| (i, f)))
            .collect();
        if fused.len() < 2 || fused.len() > STACK_MAX_SETS {
            return Ok(());
        }
        let n = fused[0].1.n;
        if fused.iter().any(|(_, f)| f.n != n) {
            return Ok(());
        }
        let r: usize = fused.iter().map(|(_, f)| f.r).sum();
        let a = gpu.alloc(r * self.d_in * 4)?;
        let b = gpu.alloc(n * r * 4)?;
        gpu.zero(b.ptr(), n * r * 4)?;
        let mut col_set = Vec::with_capacity(r);
        let mut r0 = 0;
        for &(set, f) in &fused {
            gpu.copy(a.at(r0 * self.d_in * 4), f.a.ptr(), f.r * self.d_in * 4)?;
            gpu.launch_n(
                "place_cols",
                n * f.r,
                &[
                    Arg::P(f.b.ptr()),
                    Arg::I(f.r as i32),
                    Arg::P(b.ptr()),
                    Arg::I(r as i32),
                    Arg::I(r0 as i32),
                    Arg::L((n * f.r) as i64),
                ],
            )?;
            col_set.extend(std::iter::repeat_n(set as i32, f.r));
            r0 += f.r;
        }
        self.stack = Some(SetStack {
            sets: fused.iter().map(|&(s, _)| s).collect(),
            a,
            b,
            col_set: gpu.upload(&col_set)?,
            h: gpu.alloc(STACK_MAX_T * r * 4)?,
            r,
            n,
        });
        Ok(())
    }

    fn weight_bytes(&self) -> usize {
        self.mats
            .iter()
            .map(|m| match &m.kind {
                MatKind::Dense(b) => b.bytes(),
                MatKind::Bnb4 { packed, absmax, .. } => packed.bytes() + absmax.bytes(),
                MatKind::Int8 { cb, scb } => cb.bytes() + scb.bytes(),
                MatKind::Grouped {
                    codes,
                    g_idx,
                    perm,
                    scales,
                    zeros,
                    ..
                } => {
                    codes.bytes()
                        + g_idx.bytes()
                        + perm.as_ref().map_or(0, |p| p.bytes())
                        + scales.bytes()
                        + zeros.bytes()
                }
            })
            .sum::<usize>()
            + self.sets[0].bytes()
    }
    /// Elements of the largest matrix that must be dequantized before a product.
    fn dequant_elems(&self) -> usize {
        self.mats
            .iter()
            .filter(|m| !matches!(m.kind, MatKind::Dense(_)))
            .map(|m| m.rows * m.cols)
            .max()
            .unwrap_or(0)
    }
    fn max_rank(&self) -> usize {
        self.sets.iter().map(|s| s.max_rank()).max().unwrap_or(0)
    }
    /// The widest part with per-adapter (unstacked) adapters in any set.
    fn max_part(&self) -> usize {
        self.sets
            .iter()
            .flat_map(|s| self.parts.iter().zip(&s.parts))
            .filter(|(_, l)| !l.is_empty())
            .map(|(p, _)| p.n)
            .max()
            .unwrap_or(0)
    }
    fn has_dora(&self) -> bool {
        self.sets.iter().any(|s| s.has_dora())
    }
    /// Writes the `bgmv_*` table of the sets' stacked LoRA, in place while it fits (graphs
    /// that read it stay valid); false when it had to move (captured graphs are stale then).
    fn write_table(&mut self, gpu: &Gpu) -> Result<bool> {
        let mut t: Vec<u64> = Vec::with_capacity(4 * self.sets.len());
        for s in &self.sets {
            match &s.fused {
                Some(f) => t.extend([f.a.ptr(), f.b.ptr(), f.r as u64, f.n as u64]),
                None => t.extend([0; 4]),
            }
        }
        let stayed = self.table.bytes() >= t.len() * 8;
        if !stayed {
            let cap = self.sets.len().next_power_of_two().max(TABLE_SETS);
            self.table = gpu.alloc(cap * 4 * 8)?;
        }
        gpu.write(&self.table, 0, &t)?;
        Ok(stayed)
    }
    /// How many distinct sets with stacked LoRA on this linear a batch of `groups` has rows
    /// of, and their largest rank.
    fn fused_in(&self, groups: &[Group]) -> (usize, usize) {
        let mut seen: Vec<usize> = Vec::new();
        let mut r = 0;
        for g in groups {
            if let Some(f) = self.sets.get(g.set).and_then(|s| s.fused.as_ref()) {
                if !seen.contains(&g.set) {
                    seen.push(g.set);
                }
                r = r.max(f.r);
            }
        }
        (seen.len(), r)
    }
}

/// A model's embedding adapters.
fn upload_embed_lora(gpu: &Gpu, model: &Model) -> Result<Vec<DevEmbedLora>> {
    let mut out = Vec::new();
    for e in &model.embed_lora {
        out.push(DevEmbedLora {
            a_t: gpu.upload(&e.a_t)?,
            b: gpu.upload(&e.b.to_f32())?,
            r: e.rank,
            s: e.scaling,
            dora: e.dora_scale.as_ref().map(|f| gpu.upload(f)).transpose()?,
        });
    }
    Ok(out)
}

/// A device pointer as an option (0 = none).
fn nz(p: u64) -> Option<u64> {
    (p != 0).then_some(p)
}

impl CudaModel {
    /// Uploads `model` (base in its stored packed format, adapters in f32) to `gpu`.
    pub fn upload(gpu: Arc<Gpu>, model: &Model, opts: CudaOptions) -> Result<CudaModel> {
        gpu.bind()?;
        let cfg = &model.config;
        let (d, f) = (cfg.hidden_size, cfg.intermediate_size);
        let (heads, kvh, hd) = (cfg.num_attention_heads, cfg.num_kv_heads(), cfg.head_dim());
        if hd > 256 || hd % 2 != 0 {
            return Err(Error::Invalid(format!(
                "head_dim {hd}: the CUDA attention kernel handles even head dims up to 256"
            )));
        }
        if opts.max_batch_tokens == 0 || opts.max_seqs == 0 {
            return Err(Error::Invalid(
                "max_batch_tokens and max_seqs must be > 0".into(),
            ));
        }
        let vocab = model.vocab_size();
        let kv_blocks = opts.kv_tokens.div_ceil(KV_BLOCK).max(1);
        // No position past the cache can occur: the RoPE table stops there (a config's
        // max_position_embeddings may be huge).
        let max_pos = cfg.max_position_embeddings.clamp(1, kv_blocks * KV_BLOCK);
        let max_blocks = max_pos.div_ceil(KV_BLOCK).min(kv_blocks);
        let lp = gpu.lp().size();
        let mut layers = Vec::new();
        for l in &model.layers {
            let kv_bytes = kv_blocks * KV_BLOCK * kvh * hd * lp;
            layers.push(DevLayer {
                ln1: gpu.upload(&l.input_layernorm)?,
                qkv: upload_linear(&gpu, &[&l.q_proj, &l.k_proj, &l.v_proj])?,
                o: upload_linear(&gpu, &[&l.o_proj])?,
                ln2: gpu.upload(&l.post_attention_layernorm)?,
                gu: upload_linear(&gpu, &[&l.gate_proj, &l.up_proj])?,
                down: upload_linear(&gpu, &[&l.down_proj])?,
                k: gpu.alloc(kv_bytes)?,
                v: gpu.alloc(kv_bytes)?,
            });
        }
        let head = upload_linear(&gpu, &[&model.lm_head])?;
        let embed = upload_dense(&gpu, &model.embed_tokens)?;
        let embed_lora = upload_embed_lora(&gpu, model)?;
        // RoPE tables with the CPU's values (f64 cos/sin of the f32 angle).
        let table = qlora_engine::ops::RopeTable {
            inv_freq: model.inv_freq.clone(),
        };
        let (cos, sin) = table.cos_sin(0..max_pos);
        let linears = || {
            layers
                .iter()
                .flat_map(|l| [&l.qkv, &l.o, &l.gu, &l.down])
                .chain(std::iter::once(&head))
        };
        let t = opts.max_batch_tokens;
        let wide = d.max(f);
        let max_w = linears().map(|l| l.dequant_elems()).max().unwrap_or(0);
        let max_r = linears()
            .map(|l| l.max_rank())
            .chain(embed_lora.iter().map(|e| e.r))
            .max()
            .unwrap_or(0);
        let max_part = linears()
            .map(|l| l.max_part())
            .chain(embed_lora.iter().map(|_| d))
            .max()
            .unwrap_or(0);
        let embed_lora = vec![embed_lora];
        let any_lora = max_r > 0;
        let qkv_cols = (heads + 2 * kvh) * hd;
        let meta = Meta::new(t, opts.max_seqs, max_blocks);
        let s = Scratch {
            x: gpu.alloc(t * d * 4)?,
            h: gpu.alloc(t * wide * lp)?,
            x32: gpu.alloc(if any_lora && lp != 4 {
                t * wide.max(heads * hd) * 4
            } else {
                0
            })?,
            qkv: gpu.alloc(t * qkv_cols * 4)?,
            attn: gpu.alloc(t * heads * hd * lp)?,
            att_part: gpu.alloc(crate::gpu::attention_part_bytes(
                t,
                heads,
                kvh,
                hd,
                max_blocks * KV_BLOCK,
                gpu.sms as usize,
            ))?,
            o: gpu.alloc(t * d * 4)?,
            gu: gpu.alloc(t * 2 * f * 4)?,
            w: gpu.alloc(max_w * lp)?,
            lh: gpu.alloc(t.max(crate::gpu::lora_split()) * max_r * 4)?,
            lflag: gpu.upload(&[0u32; 2])?,
            ld: gpu.alloc(t * max_part * 4)?,
            logits: gpu.alloc(t * vocab * 4)?,
            meta: gpu.alloc(meta.total * 4)?,
            pa: None,
        };
        let mut s = s;
        if t >= PREFILL_ATTN_MIN && opts.prefill_attention {
            let qkv = gpu.alloc(t * qkv_cols * lp)?;
            let sc = gpu.alloc(heads * t * t * 4)?;
            let p = gpu.alloc(heads * t * t * lp)?;
            let group = heads / kvh;
            let at = |b: &DevBuf, elems: usize, size: usize| b.at(elems * size);
            let mut ptrs: Vec<u64> = Vec::with_capacity(6 * heads);
            ptrs.extend((0..heads).map(|h| at(&qkv, h * hd, lp)));
            ptrs.extend((0..heads).map(|h| at(&qkv, (heads + h / group) * hd, lp)));
            ptrs.extend((0..heads).map(|h| at(&sc, h * t * t, 4)));
            ptrs.extend((0..heads).map(|h| at(&qkv, (heads + kvh + h / group) * hd, lp)));
            ptrs.extend((0..heads).map(|h| at(&p, h * t * t, lp)));
            ptrs.extend((0..heads).map(|h| at(&s.attn, h * hd, lp)));
            s.pa = Some(PrefillAttn {
                qkv,
                s: sc,
                p,
                ptrs: gpu.upload(&ptrs)?,
            });
        }
        let weight_bytes = linears().map(|l| l.weight_bytes()).sum();
        let m = CudaModel {
            d,
            f,
            heads,
            kvh,
            hd,
            vocab,
            eps: cfg.rms_norm_eps as f32,
            window: cfg.attention_window().unwrap_or(0),
            max_pos,
            embed,
            embed_lora,
            live: vec![true],
            adapter_cap: (max_r, max_part),
            norm: gpu.upload(&model.norm)?,
            head,
            cos: gpu.upload(&cos)?,
            sin: gpu.upload(&sin)?,
            layers,
            s,
            meta,
            max_blocks,
            free_blocks: (0..kv_blocks as u32).rev().collect(),
            graphs: HashMap::new(),
            any_lora,
            weight_bytes,
            opts,
            gpu,
        };
        m.gpu.sync()?;
        Ok(m)
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab
    }

    /// A new, empty sequence.
    pub fn new_seq(&self) -> Seq {
        Seq::default()
    }

    /// A new, empty sequence that runs with adapter set `set` (`add_adapters`; 0 is the
    /// uploaded model's own).
    pub fn new_seq_with(&self, set: usize) -> Result<Seq> {
        self.check_set(set)?;
        Ok(Seq {
            adapter: set,
            ..Seq::default()
        })
    }

    fn check_set(&self, set: usize) -> Result<()> {
        if self.live.get(set) == Some(&true) {
            Ok(())
        } else {
            Err(Error::Invalid(format!(
                "adapter set {set} is not loaded on the device"
            )))
        }
    }

    /// Returns a sequence's cache blocks to the pool.
    pub fn free_seq(&mut self, s: &mut Seq) {
        self.free_blocks.extend(s.blocks.drain(..).rev());
        s.len = 0;
    }

    /// Uploads the adapters `model` carries (a model on the uploaded base: same shapes, its
    /// projections' adapters are what is read) as a new adapter set beside the others, and
    /// returns its number for `new_seq_with`. Sequences of different sets share one batch: the
    /// base's products run over all rows, each set's adapters over its own rows. Nothing
    /// changes on an error.
    pub fn add_adapters(&mut self, model: &Model) -> Result<usize> {
        self.gpu.bind()?;
        let cfg = &model.config;
        let shape = (
            model.layers.len(),
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.num_attention_heads,
            cfg.num_kv_heads(),
            cfg.head_dim(),
            model.vocab_size(),
        );
        let ours = (
            self.layers.len(),
            self.d,
            self.f,
            self.heads,
            self.kvh,
            self.hd,
            self.vocab,
        );
        if shape != ours {
            return Err(Error::Invalid(format!(
                "the adapters' model (layers, hidden, intermediate, heads, kv heads, head dim, vocabulary) = {shape:?} is not the uploaded base's {ours:?}"
            )));
        }
        let g = self.gpu.clone();
        let mut layers = Vec::with_capacity(model.layers.len());
        for l in &model.layers {
            layers.push([
                upload_lora(&g, &[&l.q_proj, &l.k_proj, &l.v_proj])?,
                upload_lora(&g, &[&l.o_proj])?,
                upload_lora(&g, &[&l.gate_proj, &l.up_proj])?,
                upload_lora(&g, &[&l.down_proj])?,
            ]);
        }
        let head = upload_lora(&g, &[&model.lm_head])?;
        let embed = upload_embed_lora(&g, model)?;
        self.fit_adapter_scratch(
            layers
                .iter()
                .flatten()
                .chain(std::iter::once(&head))
                .map(|l| l.max_rank())
                .chain(embed.iter().map(|e| e.r))
                .max()
                .unwrap_or(0),
            layers
                .iter()
                .flat_map(|ls| {
                    ls.iter().zip([
                        (self.heads + 2 * self.kvh) * self.hd,
                        self.d,
                        2 * self.f,
                        self.d,
                    ])
                })
                .filter(|(l, _)| l.fused.is_none() && !l.is_empty())
                .map(|(_, n)| n)
                .chain((!head.is_empty() && head.fused.is_none()).then_some(self.vocab))
                .chain(embed.iter().map(|_| self.d))
                .max()
                .unwrap_or(0),
        )?;
        let set = self.live.len();
        for (dl, [qkv, o, gu, down]) in self.layers.iter_mut().zip(layers) {
            dl.qkv.sets.push(qkv);
            dl.o.sets.push(o);
            dl.gu.sets.push(gu);
            dl.down.sets.push(down);
        }
        self.head.sets.push(head);
        self.embed_lora.push(embed);
        self.live.push(true);
        self.gpu.sync()?;
        self.write_tables()?;
        if !self.any_lora && self.adapter_cap.0 > 0 {
            // Producers now write the adapters' f32 copies: recapture.
            self.graphs.clear();
            self.any_lora = true;
        }
        Ok(set)
    }

    /// Frees adapter set `set` (not 0). Its sequences must be freed first: a forward with
    /// one of them fails.
    pub fn remove_adapters(&mut self, set: usize) -> Result<()> {
        self.check_set(set)?;
        if set == 0 {
            return Err(Error::Invalid(
                "adapter set 0 is the uploaded model's own; it stays".into(),
            ));
        }
        self.gpu.sync()?;
        for l in &mut self.layers {
            for lin in [&mut l.qkv, &mut l.o, &mut l.gu, &mut l.down] {
                lin.sets[set] = LinLora::default();
            }
        }
        self.head.sets[set] = LinLora::default();
        self.embed_lora[set].clear();
        self.live[set] = false;
        self.write_tables()?;
        self.graphs
            .retain(|k, _| k.1.iter().all(|&(s, _)| s != set));
        Ok(())
    }

    /// Rewrites every linear's `bgmv_*` table and set stack (after sets were added or removed);
    /// drops the captured graphs when a table moved or a stack changed.
    fn write_tables(&mut self) -> Result<()> {
        let g = self.gpu.clone();
        let mut moved = false;
        for l in &mut self.layers {
            for lin in [&mut l.qkv, &mut l.o, &mut l.gu, &mut l.down] {
                moved |= !lin.write_table(&g)?;
                moved |= lin.restack(&g);
            }
        }
        moved |= !self.head.write_table(&g)?;
        moved |= self.head.restack(&g);
        if moved {
            self.graphs.clear();
        }
        Ok(())
    }

    /// Grows the adapter scratch to `rank` and `part` columns a token row when it holds less
    /// (the captured graphs, which read the old buffers, are dropped).
    fn fit_adapter_scratch(&mut self, rank: usize, part: usize) -> Result<()> {
        let (r0, p0) = self.adapter_cap;
        let need_x32 = rank > 0 && self.gpu.lp() != Dt::F32 && self.s.x32.bytes() == 0;
        if rank <= r0 && part <= p0 && !need_x32 {
            return Ok(());
        }
        self.gpu.sync()?;
        self.graphs.clear();
        let t = self.opts.max_batch_tokens;
        if rank > r0 {
            // At least `lora_split` rows: a fused LoRA's split shrink keeps that many parts
            // of each h.
            self.s.lh = self.gpu.alloc(t.max(crate::gpu::lora_split()) * rank * 4)?;
        }
        if part > p0 {
            self.s.ld = self.gpu.alloc(t * part * 4)?;
        }
        if need_x32 {
            let wide = self.d.max(self.f).max(self.heads * self.hd);
            self.s.x32 = self.gpu.alloc(t * wide * 4)?;
        }
        self.adapter_cap = (r0.max(rank), p0.max(part));
        Ok(())
    }

    /// Runs each sequence's new tokens at its next positions, appending to its cache.
    /// Returns logits f32: for `Logits::Last` one row per sequence [n_seqs, v], for
    /// `Logits::All` every token's row, sequence after sequence [Σ tokens, v].
    pub fn forward(&mut self, batch: &mut [(&mut Seq, &[u32])], which: Logits) -> Result<Vec<f32>> {
        self.gpu.bind()?;
        for (s, ids) in batch.iter() {
            self.check_set(s.adapter)?;
            if let Some(&id) = ids.iter().find(|&&id| id as usize >= self.vocab) {
                return Err(Error::Invalid(format!(
                    "token id {id} is out of range for a vocabulary of {}",
                    self.vocab
                )));
            }
            if s.len + ids.len() > self.max_pos {
                return Err(Error::Invalid(format!(
                    "sequence of {} positions exceeds the context of {} (max_position_embeddings, or the KV cache's size: raise --kv-tokens)",
                    s.len + ids.len(),
                    self.max_pos
                )));
            }
        }
        // Every new cache block is there before anything runs (a batch may take several
        // launches; none may fail half-way for want of blocks).
        let need: usize = batch
            .iter()
            .map(|(s, ids)| {
                (s.len + ids.len())
                    .div_ceil(KV_BLOCK)
                    .saturating_sub(s.blocks.len())
            })
            .sum();
        if need > self.free_blocks.len() {
            return Err(Error::Invalid(format!(
                "the KV cache is full ({} positions, {} free); finish or free sequences, or raise its size (--kv-tokens)",
                self.opts.kv_tokens,
                self.free_blocks.len() * KV_BLOCK
            )));
        }
        let v = self.vocab;
        let mut out = Vec::new();
        match which {
            Logits::All => {
                // Sequence by sequence, in chunks.
                for (s, ids) in batch.iter_mut() {
                    for chunk in ids.chunks(self.opts.max_batch_tokens) {
                        let rows: Vec<usize> = (0..chunk.len()).collect();
                        let l = self.run(&mut [(&mut **s, chunk)], &rows)?;
                        out.extend_from_slice(&l);
                    }
                }
            }
            Logits::Last => {
                let mut last = vec![Vec::new(); batch.len()];
                let mut done = vec![0usize; batch.len()];
                let mut launches = 0;
                loop {
                    // Pack what fits of every sequence's remaining tokens.
                    let mut budget = self.opts.max_batch_tokens;
                    let mut items: Vec<(usize, usize, usize)> = Vec::new();
                    for (i, (_, ids)) in batch.iter().enumerate() {
                        let rest = ids.len() - done[i];
                        if rest == 0 || budget == 0 || items.len() == self.opts.max_seqs {
                            continue;
                        }
                        let n = rest.min(budget);
                        items.push((i, done[i], n));
                        budget -= n;
                    }
                    if items.is_empty() {
                        break;
                    }
                    let mut rows = Vec::new();
                    let mut off = 0;
                    let mut finishing = Vec::new();
                    for &(i, start, n) in &items {
                        off += n;
                        if start + n == batch[i].1.len() {
                            rows.push(off - 1);
                            finishing.push(i);
                        }
                    }
                    let mut sub: Vec<(&mut Seq, &[u32])> = Vec::new();
                    let mut refs: Vec<Option<&mut (&mut Seq, &[u32])>> =
                        batch.iter_mut().map(Some).collect();
                    for &(i, start, n) in &items {
                        let e = refs[i].take().expect("each sequence once per launch");
                        sub.push((&mut *e.0, &e.1[start..start + n]));
                    }
                    let l = self.run(&mut sub, &rows)?;
                    launches += 1;
                    if launches == 1
                        && finishing.len() == batch.len()
                        && finishing.iter().enumerate().all(|(k, &i)| k == i)
                    {
                        // The usual step: one launch, every sequence's last row in order. Its
                        // logits are the answer as they came back (a decode step at batch 64
                        // reads 8 MB; each copy of that costs the host a millisecond).
                        return Ok(l);
                    }
                    for (k, &i) in finishing.iter().enumerate() {
                        last[i] = l[k * v..(k + 1) * v].to_vec();
                    }
                    for &(i, _, n) in &items {
                        done[i] += n;
                    }
                }
                for (i, l) in last.into_iter().enumerate() {
                    if l.is_empty() && batch[i].1.is_empty() {
                        continue;
                    }
                    out.extend(l);
                }
            }
        }
        Ok(out)
    }

    /// One greedy decode step: each sequence's single new token in, the argmax of its next
    /// token's logits out (computed on the device; only the ids come back).
    pub fn step_greedy(&mut self, batch: &mut [(&mut Seq, &[u32])]) -> Result<Vec<u32>> {
        self.gpu.bind()?;
        if batch.iter().any(|(_, ids)| ids.len() != 1)
            || batch.len() > self.opts.max_seqs.min(self.opts.max_batch_tokens)
        {
            return Err(Error::Invalid(format!(
                "step_greedy takes one token for each of at most {} sequences",
                self.opts.max_seqs.min(self.opts.max_batch_tokens)
            )));
        }
        for (s, ids) in batch.iter() {
            self.check_set(s.adapter)?;
            if ids[0] as usize >= self.vocab || s.len + 1 > self.max_pos {
                return Err(Error::Invalid(format!(
                    "token {} at position {} is out of range (vocabulary {}, context {})",
                    ids[0], s.len, self.vocab, self.max_pos
                )));
            }
        }
        let rows: Vec<usize> = (0..batch.len()).collect();
        self.run_with(batch, &rows, false)?;
        let n = batch.len();
        // The argmax ids go to the i32 slots after the metadata (`Meta::argmax`).
        let dst = self.mptr(self.meta.argmax);
        self.gpu.launch(
            "argmax_rows",
            (n as u32, 1),
            1024,
            &[
                Arg::P(self.s.logits.ptr()),
                Arg::I(self.vocab as i32),
                Arg::P(dst),
            ],
        )?;
        let mut ids = vec![0i32; n];
        self.gpu.read(dst, &mut ids)?;
        Ok(ids.into_iter().map(|i| i as u32).collect())
    }

    /// One launch sequence over ≤ max_batch_tokens tokens of ≤ max_seqs sequences; returns
    /// the logits of the packed token rows `rows`.
    fn run(&mut self, batch: &mut [(&mut Seq, &[u32])], rows: &[usize]) -> Result<Vec<f32>> {
        self.run_with(batch, rows, true)
    }

    fn run_with(
        &mut self,
        batch: &mut [(&mut Seq, &[u32])],
        rows: &[usize],
        read_logits: bool,
    ) -> Result<Vec<f32>> {
        let t: usize = batch.iter().map(|(_, ids)| ids.len()).sum();
        if t == 0 {
            return Ok(Vec::new());
        }
        // Cache blocks for the new positions.
        for (s, ids) in batch.iter_mut() {
            let need = (s.len + ids.len()).div_ceil(KV_BLOCK);
            if need > self.max_blocks {
                return Err(Error::Invalid(format!(
                    "sequence of {} positions does not fit the KV cache ({} positions per sequence)",
                    s.len + ids.len(),
                    self.max_blocks * KV_BLOCK
                )));
            }
            while s.blocks.len() < need {
                let b = self.free_blocks.pop().ok_or_else(|| {
                    Error::Invalid(format!(
                        "the KV cache is full ({} positions); finish or free sequences, or raise its size",
                        self.opts.kv_tokens
                    ))
                })?;
                s.blocks.push(b);
            }
        }
        let m = self.meta;
        let mut meta = vec![0i32; m.total];
        let mut k = 0;
        for (si, (s, ids)) in batch.iter().enumerate() {
            for (j, &id) in ids.iter().enumerate() {
                let p = s.len + j;
                meta[m.ids + k] = id as i32;
                meta[m.pos + k] = p as i32;
                meta[m.slot + k] =
                    (s.blocks[p / KV_BLOCK] as usize * KV_BLOCK + p % KV_BLOCK) as i32;
                meta[m.seq + k] = si as i32;
                k += 1;
            }
            for (b, &blk) in s.blocks.iter().enumerate() {
                meta[m.tables + si * self.max_blocks + b] = blk as i32;
            }
        }
        for (i, &r) in rows.iter().enumerate() {
            meta[m.out_rows + i] = r as i32;
        }
        // Each adapter set's rows, of the packed tokens and of the rows that get logits.
        let (mut groups, mut out_groups) = (Vec::new(), Vec::new());
        let (mut end, mut n_out) = (0, 0);
        let mut out = rows.iter().peekable();
        for (s, ids) in batch.iter() {
            for k in end..end + ids.len() {
                meta[m.row_set + k] = s.adapter as i32;
            }
            push_group(&mut groups, s.adapter, ids.len());
            end += ids.len();
            let mut n = 0;
            while out.next_if(|&&r| r < end).is_some() {
                meta[m.out_set + n_out + n] = s.adapter as i32;
                n += 1;
            }
            push_group(&mut out_groups, s.adapter, n);
            n_out += n;
        }
        self.gpu.write(&self.s.meta, 0, &meta)?;
        let decode = rows.len() == t && rows.iter().enumerate().all(|(i, &r)| i == r);
        let use_graph = self.opts.graphs && decode && batch.iter().all(|(_, ids)| ids.len() == 1);
        let fresh = batch.len() == 1 && batch[0].0.len == 0 && t >= PREFILL_ATTN_MIN;
        if use_graph {
            let key = (t, groups.iter().map(|g| (g.set, g.rows)).collect());
            if !self.graphs.contains_key(&key) {
                // Batches of many adapters make many shapes: a bounded cache.
                if self.graphs.len() >= MAX_GRAPHS {
                    self.graphs.clear();
                }
                self.gpu.begin_capture()?;
                let r = self.kernels(t, rows.len(), false, &groups, &out_groups);
                let g = self.gpu.end_capture();
                r?;
                self.graphs.insert(key.clone(), g?);
            }
            self.gpu.replay(&self.graphs[&key])?;
        } else {
            self.kernels(t, rows.len(), fresh, &groups, &out_groups)?;
        }
        for (s, ids) in batch.iter_mut() {
            s.len += ids.len();
        }
        if !read_logits {
            return Ok(Vec::new());
        }
        let mut out = vec![0f32; rows.len() * self.vocab];
        self.gpu.read(self.s.logits.ptr(), &mut out)?;
        Ok(out)
    }

    fn mptr(&self, off: usize) -> u64 {
        self.s.meta.at(off * 4)
    }

    /// The whole forward as launches on the stream (capturable: no copies, no syncs).
    /// `fresh`: one sequence starting at position 0 (attention may take the cuBLAS path).
    /// `groups` / `out_groups`: each adapter set's rows of the t tokens / of the n_out rows
    /// that get logits.
    fn kernels(
        &self,
        t: usize,
        n_out: usize,
        fresh: bool,
        groups: &[Group],
        out_groups: &[Group],
    ) -> Result<()> {
        use Arg::*;
        let g = &self.gpu;
        let d = self.d;
        let s = &self.s;
        let m = self.meta;
        g.launch(
            "embed",
            (t as u32, 1),
            256,
            &[
                P(self.embed.ptr()),
                P(self.mptr(m.ids)),
                P(s.x.ptr()),
                I(d as i32),
            ],
        )?;
        for gr in groups {
            let rows = gr.rows;
            let x = s.x.at(gr.row0 * d * 4);
            for e in &self.embed_lora[gr.set] {
                g.launch(
                    "gather_rows",
                    (rows as u32, 1),
                    64,
                    &[
                        P(e.a_t.ptr()),
                        P(self.mptr(m.ids + gr.row0)),
                        I(e.r as i32),
                        P(s.lh.ptr()),
                    ],
                )?;
                g.gemm(
                    Dt::F32,
                    rows,
                    d,
                    e.r,
                    s.lh.ptr(),
                    e.r,
                    e.b.ptr(),
                    s.ld.ptr(),
                    d,
                    1.0,
                    0.0,
                )?;
                let f = e.dora.as_ref().map_or(0, |b| b.ptr());
                g.launch(
                    "embed_lora_apply",
                    (rows as u32, 1),
                    256,
                    &[P(x), P(s.ld.ptr()), I(d as i32), P(f), F(e.s)],
                )?;
            }
        }
        let qkv_ld = (self.heads + 2 * self.kvh) * self.hd;
        let scale = 1.0 / (self.hd as f32).sqrt();
        let pa = s.pa.as_ref().filter(|_| fresh);
        for l in &self.layers {
            // The adapters' f32 copy of each linear's input, written by its producer.
            let c = self.copy32();
            if !self.linear_t1(
                &l.qkv,
                T1In::Norm(&l.ln1),
                s.qkv.ptr(),
                qkv_ld,
                false,
                0,
                groups,
            )? {
                self.norm_linear(&l.ln1, &l.qkv, t, s.qkv.ptr(), qkv_ld, groups)?;
            }
            // One token over the cache: the attention rotates and stores it itself.
            let rope = (pa.is_none() && t == 1 && att_rope()).then(|| crate::gpu::AttRope {
                cos: self.cos.ptr(),
                sin: self.sin.ptr(),
                slot: self.mptr(m.slot),
            });
            if rope.is_none() {
                g.launch(
                    "rope_store",
                    (t as u32, (self.heads + 2 * self.kvh) as u32),
                    (self.hd / 2).next_multiple_of(32) as u32,
                    &[
                        P(s.qkv.ptr()),
                        I(qkv_ld as i32),
                        I(self.heads as i32),
                        I(self.kvh as i32),
                        I(self.hd as i32),
                        P(self.cos.ptr()),
                        P(self.sin.ptr()),
                        P(self.mptr(m.pos)),
                        P(self.mptr(m.slot)),
                        P(l.k.ptr()),
                        P(l.v.ptr()),
                        P(pa.map_or(0, |p| p.qkv.ptr())),
                    ],
                )?;
            }
            match pa {
                Some(p) => self.prefill_attention(p, t, qkv_ld, scale)?,
                None => g.attention(&crate::gpu::Attention {
                    qkv: s.qkv.ptr(),
                    ld: qkv_ld,
                    k: l.k.ptr(),
                    v: l.v.ptr(),
                    seq: self.mptr(m.seq),
                    pos: self.mptr(m.pos),
                    tables: self.mptr(m.tables),
                    max_blocks: self.max_blocks,
                    block_size: KV_BLOCK,
                    heads: self.heads,
                    kvh: self.kvh,
                    hd: self.hd,
                    window: self.window,
                    scale,
                    t,
                    out: s.attn.ptr(),
                    out32: c,
                    part: s.att_part.ptr(),
                    splits: None,
                    rope,
                })?,
            }
            self.residual(
                &l.o,
                s.attn.ptr(),
                if pa.is_some() { None } else { nz(c) },
                t,
                groups,
            )?;
            // Folded, it writes no f32 copy of its output for the down projection's adapters:
            // their input is then widened from h (the same values).
            let gu_t1 = self.linear_t1(
                &l.gu,
                T1In::Norm(&l.ln2),
                s.h.ptr(),
                self.f,
                false,
                self.f,
                groups,
            )?;
            if !gu_t1 {
                self.norm_linear(&l.ln2, &l.gu, t, s.gu.ptr(), 2 * self.f, groups)?;
                g.launch_n(
                    "swiglu",
                    t * self.f,
                    &[
                        P(s.gu.ptr()),
                        I(self.f as i32),
                        P(s.h.ptr()),
                        L((t * self.f) as i64),
                        P(c),
                    ],
                )?;
            }
            self.residual(&l.down, s.h.ptr(), nz(c).filter(|_| !gu_t1), t, groups)?;
        }
        // The rows that get logits, normed, through the head.
        g.launch(
            "gather_rows",
            (n_out as u32, 1),
            256,
            &[
                P(s.x.ptr()),
                P(self.mptr(m.out_rows)),
                I(d as i32),
                P(s.o.ptr()),
            ],
        )?;
        let c = self.copy32();
        self.rms_norm(s.o.ptr(), &self.norm, n_out, s.h.ptr(), c)?;
        self.linear(
            &self.head,
            s.h.ptr(),
            nz(c),
            n_out,
            s.logits.ptr(),
            self.vocab,
            false,
            out_groups,
        )
    }

    /// `lin` for one token as one fused GEMV (`Gpu::gemv4_fused`) with what it folds in: the
    /// input's RMSNorm (T1In::Norm: the residual row normed with these weights), the SwiGLU of
    /// the output's two halves (`pair` > 0: y is then lp [pair]), and the rows' fused LoRA
    /// (its shrink by the grid's last blocks, its expand in the rows' stores). Ok(false),
    /// having launched nothing, where that does not apply: several tokens, biases, several
    /// base matrices, adapters (unless folded: one fused LoRA, no DoRA or lora_B biases), or a
    /// layout the kernel does not take. The normed input is not written (no one else reads it).
    #[allow(clippy::too_many_arguments)]
    fn linear_t1(
        &self,
        lin: &DevLinear,
        input: T1In,
        y: u64,
        ldy: usize,
        accumulate: bool,
        pair: usize,
        groups: &[Group],
    ) -> Result<bool> {
        let rows: Vec<&Group> = groups.iter().filter(|g| g.rows > 0).collect();
        if rows.len() != 1
            || rows[0].rows != 1
            || lin.mats.len() != 1
            || lin.parts.iter().any(|p| p.bias.is_some())
        {
            return Ok(false);
        }
        let lora = match lin.sets.get(rows[0].set).filter(|s| !s.is_empty()) {
            None => None,
            Some(set) => match &set.fused {
                Some(f) if lora_fold_on() && set.parts.iter().all(|p| p.is_empty()) => Some(f),
                _ => return Ok(false),
            },
        };
        let (x, xn, gn) = match input {
            T1In::Lp(x) => (x, 0, 0),
            T1In::Norm(w) => (0, self.s.x.ptr(), w.ptr()),
        };
        let mat = &lin.mats[0];
        let Some(gemv) = mat
            .gemv4(x, 1, y, ldy, accumulate)
            .filter(|_| mat.col0 == 0)
        else {
            return Ok(false);
        };
        let fz = crate::gpu::GemvFuse {
            xn,
            gn,
            eps: self.eps,
            pair,
            lb: lora.map_or(0, |f| f.b.ptr()),
            lr: lora.map_or(0, |f| f.r),
            lh: self.s.lh.ptr(),
            la: lora.map_or(0, |f| f.a.ptr()),
            lflag: self.s.lflag.ptr(),
            lora_fallback: false,
        };
        self.gpu.gemv4_fused(&gemv, &fz)
    }

    /// y = lin(RMSNorm(x) · w) for the batch's t rows, by two kernels (the norm into `h`, and
    /// its f32 copy for the adapters where they want one).
    fn norm_linear(
        &self,
        w: &DevBuf,
        lin: &DevLinear,
        t: usize,
        y: u64,
        ldy: usize,
        groups: &[Group],
    ) -> Result<()> {
        let (s, c) = (&self.s, self.copy32());
        self.rms_norm(s.x.ptr(), w, t, s.h.ptr(), c)?;
        self.linear(lin, s.h.ptr(), nz(c), t, y, ldy, false, groups)
    }

    /// y[rows, d] (lp) = RMSNorm(x[rows, d]) · w.
    fn rms_norm(&self, x: u64, w: &DevBuf, rows: usize, y: u64, y32: u64) -> Result<()> {
        self.gpu.launch(
            "rms_norm",
            (rows as u32, 1),
            512,
            &[
                Arg::P(x),
                Arg::P(w.ptr()),
                Arg::F(self.eps),
                Arg::I(self.d as i32),
                Arg::P(y),
                Arg::P(y32),
            ],
        )
    }

    /// Where a linear's producer writes the f32 copy of its output for the adapters (bf16 mode
    /// with adapters; 0 otherwise: the linear then reads its input as is, or widens it).
    fn copy32(&self) -> u64 {
        if self.any_lora && self.gpu.lp() != Dt::F32 {
            self.s.x32.ptr()
        } else {
            0
        }
    }

    /// x += lin(a), accumulated straight into the residual stream, unless a DoRA adapter needs
    /// the projection's own output (then through `o` and an add).
    fn residual(
        &self,
        lin: &DevLinear,
        a: u64,
        a32: Option<u64>,
        t: usize,
        groups: &[Group],
    ) -> Result<()> {
        let (g, s, d) = (&self.gpu, &self.s, self.d);
        if lin.has_dora() {
            self.linear(lin, a, a32, t, s.o.ptr(), d, false, groups)?;
            g.launch_n(
                "add_f32",
                t * d,
                &[Arg::P(s.x.ptr()), Arg::P(s.o.ptr()), Arg::L((t * d) as i64)],
            )
        } else if t == 1 && self.linear_t1(lin, T1In::Lp(a), s.x.ptr(), d, true, 0, groups)? {
            Ok(())
        } else {
            self.linear(lin, a, a32, t, s.x.ptr(), d, true, groups)
        }
    }

    /// Attention of a fresh sequence's t tokens over themselves: S = scale · Q Kᵀ per head
    /// (batched cuBLAS), causal/windowed softmax, O = P V (batched cuBLAS) into `attn`.
    fn prefill_attention(&self, p: &PrefillAttn, t: usize, ld: usize, scale: f32) -> Result<()> {
        let g = &self.gpu;
        let (heads, hd) = (self.heads, self.hd);
        let lp = g.lp();
        let tt = self.opts.max_batch_tokens;
        let ptr = |i: usize| p.ptrs.at(i * heads * 8);
        // Column-major: S_hᵀ [t_keys, t] = op_T(K_g as [hd, t_keys]) · Q_h as [hd, t].
        g.gemm_batched(
            true,
            (t, t, hd),
            scale,
            (ptr(1), ld),
            (ptr(0), ld),
            (ptr(2), t),
            lp,
            Dt::F32,
            heads,
        )?;
        g.softmax_rows(
            p.s.ptr(),
            p.p.ptr(),
            (t, heads),
            (t, tt * tt),
            self.window,
            0,
        )?;
        // O_hᵀ [hd, t] = V_g as [hd, t_keys] · P_hᵀ as [t_keys, t].
        g.gemm_batched(
            false,
            (hd, t, t),
            1.0,
            (ptr(3), ld),
            (ptr(4), t),
            (ptr(5), heads * hd),
            lp,
            lp,
            heads,
        )
    }

    /// y[t, ldy] (+)= x[t, d_in] · Wᵀ (+ bias), for each part's columns, then each adapter
    /// group's adapters over its rows (they add to y either way). x lp, y f32; `x32`, when
    /// given, holds x widened to f32 for the adapters. `accumulate`: y += the product.
    #[allow(clippy::too_many_arguments)]
    fn linear(
        &self,
        lin: &DevLinear,
        x: u64,
        x32: Option<u64>,
        t: usize,
        y: u64,
        ldy: usize,
        accumulate: bool,
        groups: &[Group],
    ) -> Result<()> {
        use Arg::*;
        let g = &self.gpu;
        let lp = g.lp();
        let beta = if accumulate { 1.0 } else { 0.0 };
        // Which token rows these are: the t packed tokens, or the rows that get logits.
        let row_set = if std::ptr::eq(lin, &self.head) {
            self.mptr(self.meta.out_set)
        } else {
            self.mptr(self.meta.row_set)
        };
        for mat in &lin.mats {
            let yc = y + (mat.col0 * 4) as u64;
            // The matrix the product reads: as stored (dense), or dequantized into scratch.
            let w = match &mat.kind {
                MatKind::Bnb4 { blocksize, .. } => {
                    if t <= g.gemv4_max_t(mat.cols, *blocksize) {
                        let gemv = mat
                            .gemv4(x, t, yc, ldy, accumulate)
                            .expect("a 4-bit matrix");
                        g.gemv4(&gemv)?;
                        continue;
                    }
                    self.dequantized(mat)?
                }
                MatKind::Grouped {
                    codes,
                    perm,
                    scales,
                    zeros,
                    groups,
                    bits,
                    contiguous: Some(gs),
                    ..
                } if t <= GEMVQ_DISPATCH_MAX_T && gemvq_fits(*bits, mat.cols, *gs) => {
                    g.gemvq(&Gemvq {
                        codes: codes.ptr(),
                        scales: scales.ptr(),
                        zeros: zeros.ptr(),
                        perm: perm.as_ref().map_or(0, |p| p.ptr()),
                        bits: *bits,
                        group_size: *gs,
                        groups: *groups,
                        rows: mat.rows,
                        cols: mat.cols,
                        x,
                        t,
                        y: yc,
                        ld: ldy,
                        accumulate,
                    })?;
                    continue;
                }
                MatKind::Int8 { .. } | MatKind::Grouped { .. } => self.dequantized(mat)?,
                MatKind::Dense(w) => w.ptr(),
            };
            g.gemm(
                lp, t, mat.rows, mat.cols, x, lin.d_in, w, yc, ldy, 1.0, beta,
            )?;
        }
        for part in &lin.parts {
            if let Some(b) = &part.bias {
                g.launch(
                    "add_bias",
                    (t as u32, 1),
                    256,
                    &[
                        P(y),
                        I(ldy as i32),
                        I(part.col0 as i32),
                        P(b.ptr()),
                        I(part.n as i32),
                    ],
                )?;
            }
        }
        let mut x32 = x32;
        // Every stacked set at once over the batch's rows, when asked and the batch is small:
        // Some(largest rank).
        let ldh = self.adapter_cap.0;
        let bgmv = bgmv_min_sets()
            .filter(|_| t <= BGMV_MAX_T && lin.d_in.is_multiple_of(4) && ldh <= BGMV_MAX_R)
            .and_then(|min| {
                let (n_fused, r_max) = lin.fused_in(groups);
                (n_fused >= min).then_some(r_max)
            });
        if let Some(r_max) = bgmv {
            let xf = self.adapter_input(x, &mut x32, t, lin.d_in)?;
            let table = lin.table.ptr();
            g.launch(
                "bgmv_shrink",
                (t.div_ceil(4) as u32, r_max.div_ceil(8) as u32),
                256,
                &[
                    P(xf),
                    I(lin.d_in as i32),
                    I(t as i32),
                    P(row_set),
                    P(table),
                    P(self.s.lh.ptr()),
                    I(ldh as i32),
                ],
            )?;
            let n_max = lin.parts.iter().map(|p| p.col0 + p.n).max().unwrap_or(0);
            g.launch(
                "bgmv_expand",
                (n_max.div_ceil(256) as u32, t.div_ceil(16) as u32),
                256,
                &[
                    P(self.s.lh.ptr()),
                    I(ldh as i32),
                    I(t as i32),
                    P(row_set),
                    P(table),
                    P(y),
                    I(ldy as i32),
                ],
            )?;
        }
        // Several stacked sets in a small batch: their fused LoRA as one masked pair of products.
        let stack = lin.stack.as_ref().filter(|st| {
            if bgmv.is_some() || t > STACK_MAX_T || !set_stacks_on() {
                return false;
            }
            let mut present: Vec<usize> = groups
                .iter()
                .filter(|g| g.rows > 0 && st.sets.contains(&g.set))
                .map(|g| g.set)
                .collect();
            present.sort_unstable();
            present.dedup();
            present.len() >= 2 && 2 * present.len() >= st.sets.len()
        });
        if let Some(st) = stack {
            let xf = self.adapter_input(x, &mut x32, t, lin.d_in)?;
            self.shrink_into(xf, t, st.r, lin.d_in, &st.a, st.h.ptr())?;
            g.launch_n(
                "mask_sets",
                t * st.r,
                &[
                    P(st.h.ptr()),
                    I(st.r as i32),
                    P(row_set),
                    P(st.col_set.ptr()),
                    L((t * st.r) as i64),
                ],
            )?;
            g.gemm(
                Dt::F32,
                t,
                st.n,
                st.r,
                st.h.ptr(),
                st.r,
                st.b.ptr(),
                y,
                ldy,
                1.0,
                1.0,
            )?;
        }
        for gr in groups {
            let stacked = stack.is_some_and(|st| st.sets.contains(&gr.set));
            let Some(set) = lin
                .sets
                .get(gr.set)
                .filter(|s| !(s.is_empty() || (bgmv.is_some() || stacked) && s.fused.is_some()))
            else {
                continue;
            };
            // The group's rows of the adapters' input and of y.
            let xf =
                self.adapter_input(x, &mut x32, t, lin.d_in)? + (gr.row0 * lin.d_in * 4) as u64;
            let (n_rows, yg) = (gr.rows, y + (gr.row0 * ldy * 4) as u64);
            for (part, loras) in lin.parts.iter().zip(&set.parts) {
                for a in loras {
                    self.shrink(xf, n_rows, a.r, lin.d_in, &a.a)?;
                    let yc = yg + (part.col0 * 4) as u64;
                    if a.b_bias.is_none() && a.dora.is_none() {
                        g.gemm(
                            Dt::F32,
                            n_rows,
                            part.n,
                            a.r,
                            self.s.lh.ptr(),
                            a.r,
                            a.b.ptr(),
                            yc,
                            ldy,
                            a.s,
                            1.0,
                        )?;
                    } else {
                        g.gemm(
                            Dt::F32,
                            n_rows,
                            part.n,
                            a.r,
                            self.s.lh.ptr(),
                            a.r,
                            a.b.ptr(),
                            self.s.ld.ptr(),
                            part.n,
                            1.0,
                            0.0,
                        )?;
                        let bb = a.b_bias.as_ref().map_or(0, |b| b.ptr());
                        let f = a.dora.as_ref().map_or(0, |b| b.ptr());
                        let bias = part.bias.as_ref().map_or(0, |b| b.ptr());
                        g.launch(
                            "lora_apply",
                            (n_rows as u32, 1),
                            256,
                            &[
                                P(yg),
                                I(ldy as i32),
                                I(part.col0 as i32),
                                P(self.s.ld.ptr()),
                                I(part.n as i32),
                                P(bb),
                                P(f),
                                P(bias),
                                F(a.s),
                            ],
                        )?;
                    }
                }
            }
            if let Some(f) = set.fused.as_ref().filter(|_| !stacked) {
                self.shrink(xf, n_rows, f.r, lin.d_in, &f.a)?;
                g.gemm(
                    Dt::F32,
                    n_rows,
                    f.n,
                    f.r,
                    self.s.lh.ptr(),
                    f.r,
                    f.b.ptr(),
                    yg,
                    ldy,
                    1.0,
                    1.0,
                )?;
            }
        }
        Ok(())
    }

    /// The lp matrix a product with `mat` reads: as stored (dense), or dequantized into the
    /// scratch `w` (valid until the next dequantization).
    fn dequantized(&self, mat: &DevMat) -> Result<u64> {
        use Arg::*;
        let g = &self.gpu;
        let n = mat.rows * mat.cols;
        match &mat.kind {
            MatKind::Bnb4 {
                packed,
                absmax,
                code,
                blocksize,
            } => {
                let x32 = n.is_multiple_of(32) && blocksize.is_multiple_of(32);
                let (kernel, threads, count) = if x32 {
                    ("dequant4_x32", n / 32, n / 32)
                } else {
                    ("dequant4", n.div_ceil(2), n)
                };
                g.launch_n(
                    kernel,
                    threads,
                    &[
                        P(packed.ptr()),
                        P(absmax.ptr()),
                        P(code.ptr()),
                        I(*blocksize as i32),
                        L(count as i64),
                        P(self.s.w.ptr()),
                    ],
                )?;
                Ok(self.s.w.ptr())
            }
            MatKind::Int8 { cb, scb } => {
                g.launch_n(
                    "dequant_int8",
                    n,
                    &[
                        P(cb.ptr()),
                        P(scb.ptr()),
                        I(mat.cols as i32),
                        L(n as i64),
                        P(self.s.w.ptr()),
                    ],
                )?;
                Ok(self.s.w.ptr())
            }
            MatKind::Grouped {
                codes,
                g_idx,
                perm,
                scales,
                zeros,
                groups,
                bits,
                ..
            } => {
                g.launch_n(
                    "dequant_grouped",
                    n,
                    &[
                        P(codes.ptr()),
                        P(g_idx.ptr()),
                        P(perm.as_ref().map_or(0, |p| p.ptr())),
                        P(scales.ptr()),
                        P(zeros.ptr()),
                        I(mat.cols as i32),
                        I(*groups as i32),
                        I(*bits as i32),
                        L(n as i64),
                        P(self.s.w.ptr()),
                    ],
                )?;
                Ok(self.s.w.ptr())
            }
            MatKind::Dense(w) => Ok(w.ptr()),
        }
    }

    /// The adapters' input: x in f32, as PEFT casts x to lora_A's dtype. x itself in f32 mode,
    /// the producer's copy when there is one, else x widened into scratch once per linear.
    fn adapter_input(&self, x: u64, x32: &mut Option<u64>, t: usize, d_in: usize) -> Result<u64> {
        if let Some(p) = *x32 {
            return Ok(p);
        }
        let p = if self.gpu.lp() == Dt::F32 {
            x
        } else {
            let n = t * d_in;
            self.gpu.launch_n(
                "lp_to_f32",
                n,
                &[Arg::P(x), Arg::P(self.s.x32.ptr()), Arg::L(n as i64)],
            )?;
            self.s.x32.ptr()
        };
        *x32 = Some(p);
        Ok(p)
    }

    /// lh [t, r] = xf [t, d_in] · Aᵀ, f32.
    fn shrink(&self, xf: u64, t: usize, r: usize, d_in: usize, a: &DevBuf) -> Result<()> {
        self.shrink_into(xf, t, r, d_in, a, self.s.lh.ptr())
    }

    /// h [t, r] = xf [t, d_in] · Aᵀ, f32.
    fn shrink_into(
        &self,
        xf: u64,
        t: usize,
        r: usize,
        d_in: usize,
        a: &DevBuf,
        h: u64,
    ) -> Result<()> {
        self.gpu
            .gemm(Dt::F32, t, r, d_in, xf, d_in, a.ptr(), h, r, 1.0, 0.0)
    }

    /// Whether any adapter is on the model.
    pub fn has_adapters(&self) -> bool {
        self.any_lora
    }

    /// Layers, hidden size, intermediate size (for reports).
    pub fn dims(&self) -> (usize, usize, usize) {
        (self.layers.len(), self.d, self.f)
    }
}

/// One sequence on a `CudaModel`, as a `qlora_model::Decoder` (generation, perplexity,
/// logits). Frees its cache blocks when reset or dropped.
pub struct CudaDecoder<'a> {
    pub model: &'a mut CudaModel,
    seq: Seq,
}

impl<'a> CudaDecoder<'a> {
    pub fn new(model: &'a mut CudaModel) -> Self {
        CudaDecoder {
            model,
            seq: Seq::default(),
        }
    }
}

impl qlora_model::Decoder for CudaDecoder<'_> {
    fn vocab_size(&self) -> usize {
        self.model.vocab
    }
    fn step(&mut self, ids: &[u32], which: Logits) -> qlora_model::Result<Vec<f32>> {
        self.model
            .forward(&mut [(&mut self.seq, ids)], which)
            .map_err(|e| {
                qlora_model::Error::Device(format!("cuda:{}: {e}", self.model.gpu.ordinal))
            })
    }
    fn reset(&mut self) {
        self.model.free_seq(&mut self.seq);
    }
}

impl Drop for CudaDecoder<'_> {
    fn drop(&mut self) {
        self.model.free_seq(&mut self.seq);
    }
}
