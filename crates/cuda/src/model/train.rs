//! Training on the GPU: the loss and adapter gradients of a packed micro-batch, the CPU
//! trainer's arithmetic (`qlora_train::grad`) on the device. The frozen base is the inference
//! model's upload (packed NF4/FP4/int8 or dense, dequantized a matrix at a time into scratch for
//! the products); the adapters are f32, as on the CPU. The products with the base run in the
//! precision's lp type with f32 accumulation. In f32 mode the adapters' products are f32; in
//! bf16 mode those that read a layer's lp input take it as it is, on tensor cores, with the f32
//! operand (A, or the shrink's gradient) as its high and low bf16 parts (two products in one,
//! exact to about 16 bits), so no f32 copy of the input is made.
//!
//! Memory policy: every layer's intermediates are kept from the forward for the backward when
//! they fit (`Recompute::Never`, or `Auto` and they fit in the free memory), else each layer's
//! input only, and the layer is recomputed from it before its backward (the same launches, so
//! the same bits). Attention runs per packed sequence and per block of query rows as batched
//! products over the heads around a masked softmax, each block's keys ending at its last row
//! (so the products skip most of the causal mask's zeros, and the scores take
//! [heads, block, keys] instead of [heads, t, t]); no score matrix spans two sequences; the
//! logits are made, turned into
//! their gradient and consumed a chunk of rows at a time, never [t, vocab] at once.
//!
//! Every reduction has a fixed order (no atomics), so a run repeats bit for bit on one GPU.

use super::*;
use qlora_train::{module_seed, AdamW, Adapters, Grads, LossBackend, Noise};

/// When to keep a layer's intermediates for its backward instead of recomputing them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recompute {
    /// Keep them when they fit in the free device memory (with a margin); else recompute.
    Auto,
    /// Recompute every layer from its input (least memory).
    Always,
    /// Keep every layer's intermediates (fastest; fails if they do not fit).
    Never,
}

impl std::str::FromStr for Recompute {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(Recompute::Auto),
            "always" => Ok(Recompute::Always),
            "never" => Ok(Recompute::Never),
            _ => Err(format!(
                "unknown recompute policy \"{s}\": use auto, always or never"
            )),
        }
    }
}

/// Which linear of a layer a projection belongs to (in the layer's order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Lin {
    Qkv,
    O,
    Gu,
    Down,
    Head,
}

/// One trainable LoRA adapter on the device.
struct DevParam {
    /// Index into `Adapters::params`.
    index: usize,
    /// The layer (unused for the head).
    layer: usize,
    lin: Lin,
    /// The projection's first column in its linear's output.
    col0: usize,
    d_in: usize,
    d_out: usize,
    r: usize,
    s: f32,
    /// The shrink output's first column in its layer's [T, Σ r] block of `Saved::lh`.
    roff: usize,
    /// f32 [r, d_in]
    a: DevBuf,
    /// f32 [d_out, r]
    b: DevBuf,
    /// f32 [r, d_in], [d_out, r]: the gradients (of this pass, or accumulated over a step's
    /// micro-batches when resident).
    da: DevBuf,
    db: DevBuf,
    /// bf16 mode: lp [2r, d_in] A's high parts, then its low parts (`split_lp`), made from
    /// `a` before a pass whenever `a` changed.
    a2: Option<DevBuf>,
    /// AdamW's moments of A and B (resident training only; allocated by `resident_load`).
    moments: Option<[DevBuf; 4]>,
}

/// One layer's intermediates (capacity T tokens).
struct Saved {
    /// lp [T, d] input norm's output
    h1: DevBuf,
    /// lp [T, q + 2 kv] rotated q, k and v
    qkv: DevBuf,
    /// lp [T, q] attention output
    attn: DevBuf,
    /// f32 [T, d] residual after attention
    x2: DevBuf,
    /// lp [T, d] post-attention norm's output
    h2: DevBuf,
    /// f32 [T, 2 f] gate | up (the backward turns it into their gradient, in place)
    gu: DevBuf,
    /// lp [T, f] SwiGLU output
    act: DevBuf,
    /// f32 [T, Σ r of the layer's adapters] every adapter's shrink output, [T, r] blocks
    lh: DevBuf,
}

/// Transient buffers (capacity T tokens, L positions per sequence, C logit rows).
struct Work {
    /// f32 [layers + 1, T, d] each layer's input, then the final norm's input
    xs: DevBuf,
    /// f32 [T, q + 2 kv] q, k, v before RoPE and the lp rounding; in the backward, their
    /// gradients (the forward's values are dead by then). None: in the layer's `Saved::gu`
    /// (`qkv32()`), which is not yet written when the forward needs them and dead when the
    /// backward does
    qkv32: Option<DevBuf>,
    /// f32 [T, q] the attention's output before the lp rounding. None: in `Saved::gu` too
    /// (`attn32()`; q, k and v are dead by then)
    attn32: Option<DevBuf>,
    /// lp [T, max(d, q + 2 kv, f)] gradients as product inputs (the up projection's; the
    /// gate's go to `Saved::act`, dead by then)
    lp: DevBuf,
    /// [T, max d_in] an adapter's dropped-out input (f32; lp in bf16 mode), and its
    /// gradient (f32); only while the adapters have dropout
    xd: Option<DevBuf>,
    dxd: Option<DevBuf>,
    /// f32 [T, max r]
    dr: DevBuf,
    /// bf16 mode: f32 [T, 2 max r] a shrink's products with A's two parts; lp [T, 2 max r]
    /// the shrink's gradient as its two parts; f32 [2 max r, max d_in] dA's two products
    h2: Option<DevBuf>,
    dr2: Option<DevBuf>,
    da2: Option<DevBuf>,
    /// f32 [T, d] the residual stream's gradient
    dx: DevBuf,
    /// f32 [T, max(d, q, f)] a linear's input gradient; first, the final norm's output's
    dh: DevBuf,
    /// lp [T, d] the final norm's output
    hn: DevBuf,
    /// f32 [heads, B, L] a block of B query rows' scores (and their gradients); lp
    /// [heads, B, L] probabilities (and the scores' gradients); bf16 only: lp [heads, B, L]
    /// the gradients' low parts (B = min(attention block, L))
    sc: DevBuf,
    p: DevBuf,
    plo: DevBuf,
    /// f32 [C, vocab] logits chunk (becomes its gradient); lp [C, vocab] the same as lp
    logits: DevBuf,
    dlogits: DevBuf,
    /// f32 [T] each row's loss
    loss: DevBuf,
    /// i32 [T] ids, [T] labels (−1: none), [T] positions
    meta: DevBuf,
    /// f32 [L, hd/2]
    cos: DevBuf,
    sin: DevBuf,
    /// Capacities.
    t: usize,
    l: usize,
    c: usize,
}

/// The loss and adapter gradients of packed micro-batches on one GPU
/// (`qlora_train::LossBackend`).
pub struct CudaTrainer {
    m: CudaModel,
    inv_freq: Vec<f32>,
    /// The adapters' module names, in `Adapters::params` order (checked each call).
    modules: Vec<String>,
    params: Vec<DevParam>,
    /// Σ r of each layer's adapters (the layer's `Saved::lh` width), and the head's.
    layer_r: Vec<usize>,
    head_r: usize,
    /// f32 [C, head Σ r] the head adapter's shrink output for a chunk
    head_lh: Option<DevBuf>,
    policy: Recompute,
    saved: Vec<Saved>,
    w: Option<Work>,
    max_d_in: usize,
    max_r: usize,
    /// Whether the last pass kept every layer (for reports).
    pub kept: bool,
    /// The adapters' dropout probability (of the last adapters uploaded).
    dropout: f32,
    /// f64 [blocks · 2 · params] partial sums of squares (the gradient norm).
    norm_parts: Option<DevBuf>,
    /// Whether every `DevParam::a2` holds the current A.
    a2_fresh: bool,
    /// Query rows per attention block.
    attn_rows: usize,
    /// Data parallel: the ranks' NCCL communicator (`set_comm`), which sums the gradients on
    /// the device.
    comm: Option<crate::NcclComm>,
}

/// Query rows per attention block by default: large enough that each block's products fill the
/// GPU, small enough to skip most of the causal zeros (5/8 of the full products at 2,048).
pub const ATTENTION_BLOCK_ROWS: usize = 512;

/// Blocks of the fixed-order sum of squares (`sumsq_f64`).
const SUMSQ_BLOCKS: usize = 128;

fn lin_of(name: &str) -> Option<(Lin, usize)> {
    Some(match name {
        "q_proj" => (Lin::Qkv, 0),
        "k_proj" => (Lin::Qkv, 1),
        "v_proj" => (Lin::Qkv, 2),
        "o_proj" => (Lin::O, 0),
        "gate_proj" => (Lin::Gu, 0),
        "up_proj" => (Lin::Gu, 1),
        "down_proj" => (Lin::Down, 0),
        _ => return None,
    })
}

impl CudaTrainer {
    /// Uploads `model`'s base (it must carry no adapters: the trainable ones are `ad`'s) and
    /// `ad`'s shapes. DoRA adapters are refused (not on the GPU yet).
    pub fn new(gpu: Arc<Gpu>, model: &Model, ad: &Adapters, policy: Recompute) -> Result<Self> {
        if model.has_adapters() {
            return Err(Error::Invalid(
                "the base to train carries adapters already; merge them first (`qlora merge`) or start from them with --init-adapter".into(),
            ));
        }
        let opts = CudaOptions {
            max_batch_tokens: 8,
            max_seqs: 1,
            kv_tokens: KV_BLOCK,
            graphs: false,
            prefill_attention: false,
        };
        let m = CudaModel::upload(gpu, model, opts)?;
        let cfg = &model.config;
        let (q, kv, f) = (
            cfg.num_attention_heads * cfg.head_dim(),
            cfg.num_kv_heads() * cfg.head_dim(),
            cfg.intermediate_size,
        );
        let mut params = Vec::new();
        let mut layer_r = vec![0usize; model.layers.len()];
        let mut head_r = 0;
        for (index, p) in ad.params.iter().enumerate() {
            if p.magnitude.is_some() {
                return Err(Error::Invalid(format!(
                    "{}: DoRA training on the GPU is not implemented yet; train it with --device cpu, or drop --dora",
                    p.module
                )));
            }
            let (layer, lin, col0, proj) = if p.module == model.lm_head.name {
                (0, Lin::Head, 0, &model.lm_head)
            } else {
                let found = model.layers.iter().enumerate().find_map(|(li, l)| {
                    l.projections()
                        .into_iter()
                        .find(|pr| pr.name == p.module)
                        .map(|pr| (li, pr))
                });
                let Some((li, pr)) = found else {
                    return Err(Error::Invalid(format!(
                        "adapter module {} is not a projection of this model",
                        p.module
                    )));
                };
                let leaf = pr.name.rsplit('.').next().unwrap_or("");
                let Some((lin, k)) = lin_of(leaf) else {
                    return Err(Error::Invalid(format!(
                        "adapter module {}: not a q/k/v/o/gate/up/down projection",
                        p.module
                    )));
                };
                let col0 = match (lin, k) {
                    (Lin::Qkv, 1) => q,
                    (Lin::Qkv, 2) => q + kv,
                    (Lin::Gu, 1) => f,
                    _ => 0,
                };
                (li, lin, col0, pr)
            };
            if p.d_in != proj.d_in() || p.d_out != proj.d_out() || p.rank == 0 {
                return Err(Error::Invalid(format!(
                    "{}: adapter [{} → r {} → {}] does not fit the projection [{} → {}]",
                    p.module,
                    p.d_in,
                    p.rank,
                    p.d_out,
                    proj.d_in(),
                    proj.d_out()
                )));
            }
            let roff = if lin == Lin::Head {
                head_r += p.rank;
                head_r - p.rank
            } else {
                layer_r[layer] += p.rank;
                layer_r[layer] - p.rank
            };
            let g = &m.gpu;
            params.push(DevParam {
                index,
                layer,
                lin,
                col0,
                d_in: p.d_in,
                d_out: p.d_out,
                r: p.rank,
                s: p.scaling,
                roff,
                a: g.alloc(p.a.len() * 4)?,
                b: g.alloc(p.b.len() * 4)?,
                da: g.alloc(p.a.len() * 4)?,
                db: g.alloc(p.b.len() * 4)?,
                a2: if g.lp() == Dt::F32 {
                    None
                } else {
                    Some(g.alloc(2 * p.a.len() * g.lp().size())?)
                },
                moments: None,
            });
        }
        // The model's order (layer, linear, columns), whatever the adapters' order: the
        // adapters of one input add into its gradient in this order, so a run resumed from a
        // checkpoint (whose adapters are listed by name) adds them as the uninterrupted one.
        params.sort_by_key(|p| (p.lin == Lin::Head, p.layer, p.lin, p.col0));
        let max_d_in = params.iter().map(|p| p.d_in).max().unwrap_or(0);
        let max_r = params.iter().map(|p| p.r).max().unwrap_or(0);
        Ok(CudaTrainer {
            m,
            inv_freq: model.inv_freq.clone(),
            modules: ad.params.iter().map(|p| p.module.clone()).collect(),
            params,
            layer_r,
            head_r,
            head_lh: None,
            policy,
            saved: Vec::new(),
            w: None,
            max_d_in,
            max_r,
            kept: false,
            dropout: ad.dropout,
            norm_parts: None,
            a2_fresh: false,
            attn_rows: ATTENTION_BLOCK_ROWS,
            comm: None,
        })
    }

    /// Sums the gradients of data-parallel ranks with `comm` (on the device) instead of
    /// through the host.
    pub fn set_comm(&mut self, comm: crate::NcclComm) {
        self.comm = Some(comm);
    }

    /// Query rows per attention block (a multiple of 8; tests use small blocks to cover the
    /// blocking on short sequences). The gradients do not depend on it beyond rounding.
    pub fn with_attention_block(mut self, rows: usize) -> Self {
        self.attn_rows = rows.max(8).next_multiple_of(8);
        self.w = None;
        self.saved.clear();
        self
    }

    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.m.gpu
    }

    fn qkv_ld(&self) -> usize {
        (self.m.heads + 2 * self.m.kvh) * self.m.hd
    }

    /// Bytes of one `Saved` for t tokens.
    fn saved_bytes(&self, t: usize) -> usize {
        let (d, f, q) = (self.m.d, self.m.f, self.m.heads * self.m.hd);
        let lp = self.m.gpu.lp().size();
        let lr = self.layer_r.iter().copied().max().unwrap_or(0);
        t * (lp * (d + self.qkv_ld() + q + d + f) + 4 * (d + 2 * f + lr))
    }

    fn alloc_saved(&self, t: usize) -> Result<Saved> {
        let g = &self.m.gpu;
        let (d, f, q) = (self.m.d, self.m.f, self.m.heads * self.m.hd);
        let lp = g.lp().size();
        let lr = self.layer_r.iter().copied().max().unwrap_or(0);
        Ok(Saved {
            h1: g.alloc(t * d * lp)?,
            qkv: g.alloc(t * self.qkv_ld() * lp)?,
            attn: g.alloc(t * q * lp)?,
            x2: g.alloc(t * d * 4)?,
            h2: g.alloc(t * d * lp)?,
            gu: g.alloc(t * 2 * f * 4)?,
            act: g.alloc(t * f * lp)?,
            lh: g.alloc(t * lr * 4)?,
        })
    }

    /// Makes room for t tokens, sequences of up to l positions, and the saved sets the policy
    /// picks (`keep`: one per layer).
    fn ensure(&mut self, t: usize, l: usize, with_grads: bool) -> Result<()> {
        let fits = self.w.as_ref().is_some_and(|w| w.t >= t && w.l >= l);
        if !fits {
            let (t, l) = (
                t.max(self.w.as_ref().map_or(0, |w| w.t)),
                l.max(self.w.as_ref().map_or(0, |w| w.l)),
            );
            // Free the old buffers before allocating the new ones.
            self.w = None;
            self.saved.clear();
            self.head_lh = None;
            let g = self.m.gpu.clone();
            let m = &self.m;
            let (d, f, q, v) = (m.d, m.f, m.heads * m.hd, m.vocab);
            let lp = g.lp().size();
            let qkv = self.qkv_ld();
            let c = t.min(((64usize << 20) / (v * 4)).max(1));
            let half = m.hd / 2;
            let two_part = g.lp() != Dt::F32;
            let rows = self.attn_rows.min(l);
            let table = qlora_engine::ops::RopeTable {
                inv_freq: self.inv_freq.clone(),
            };
            let (cos, sin) = table.cos_sin(0..l);
            self.w = Some(Work {
                xs: g.alloc((m.layers.len() + 1) * t * d * 4)?,
                qkv32: (qkv > 2 * f).then(|| g.alloc(t * qkv * 4)).transpose()?,
                attn32: (q > 2 * f).then(|| g.alloc(t * q * 4)).transpose()?,
                lp: g.alloc(t * d.max(qkv).max(f) * lp)?,
                xd: None,
                dxd: None,
                dr: g.alloc(t * self.max_r * 4)?,
                h2: two_part
                    .then(|| g.alloc(t * 2 * self.max_r * 4))
                    .transpose()?,
                dr2: two_part
                    .then(|| g.alloc(t * 2 * self.max_r * lp))
                    .transpose()?,
                da2: two_part
                    .then(|| g.alloc(2 * self.max_r * self.max_d_in * 4))
                    .transpose()?,
                dx: g.alloc(t * d * 4)?,
                dh: g.alloc(t * d.max(q).max(f) * 4)?,
                hn: g.alloc(t * d * lp)?,
                sc: g.alloc(m.heads * rows * l * 4)?,
                p: g.alloc(m.heads * rows * l * lp)?,
                plo: g.alloc(if two_part { m.heads * rows * l * lp } else { 0 })?,
                logits: g.alloc(c * v * 4)?,
                dlogits: g.alloc(c * v * lp)?,
                loss: g.alloc(t * 4)?,
                meta: g.alloc(3 * t * 4)?,
                cos: g.upload(&cos)?,
                sin: g.upload(&sin)?,
                t,
                l,
                c,
            });
            debug_assert_eq!(cos.len(), l * half);
            if self.head_r > 0 {
                self.head_lh = Some(g.alloc(c * self.head_r * 4)?);
            }
        }
        let cap = self.w.as_ref().map_or(0, |w| w.t);
        if self.dropout > 0.0 {
            let g = self.m.gpu.clone();
            let xd_bytes = cap * self.max_d_in * g.lp().size();
            let w = self.w.as_mut().expect("allocated above");
            if w.xd.is_none() {
                w.xd = Some(g.alloc(xd_bytes)?);
                w.dxd = Some(g.alloc(cap * self.max_d_in * 4)?);
            }
        }
        let n_layers = self.m.layers.len();
        if !with_grads {
            // A forward alone (evaluation) runs through the first set, whatever is allocated.
            if self.saved.is_empty() {
                let s = self.alloc_saved(cap)?;
                self.saved.push(s);
            }
            self.kept = false;
            return Ok(());
        }
        let keep = match self.policy {
            Recompute::Always => false,
            Recompute::Never => true,
            Recompute::Auto => {
                let have = self.saved.len() * self.saved_bytes(cap);
                let need = n_layers * self.saved_bytes(cap);
                let (free, _) = self.m.gpu.mem_info()?;
                // Keep a margin for cuBLAS and the allocator.
                need <= have + free.saturating_sub(2 << 30)
            }
        };
        let want = if keep { n_layers } else { 1 };
        self.saved.truncate(want);
        while self.saved.len() < want {
            let s = self.alloc_saved(cap)?;
            self.saved.push(s);
        }
        self.kept = keep;
        Ok(())
    }

    fn work(&self) -> &Work {
        self.w.as_ref().expect("ensure() runs first")
    }

    /// An adapter's input for `n` elements of x (lp) starting at element `i0` of the pass's
    /// input, and the factor its products take. f32 mode: x itself, or dropped out into `xd`
    /// (kept elements times 1/(1 − p)), factor 1. bf16 mode: x itself, or dropped out into
    /// `xd` (kept elements as they are, so still exact in lp), factor 1/(1 − p).
    fn adapter_input(
        &self,
        x: u64,
        n: usize,
        i0: usize,
        drop: Option<(u64, f32)>,
    ) -> Result<(u64, f32)> {
        let g = &self.m.gpu;
        let Some((seed, p)) = drop else {
            return Ok((x, 1.0));
        };
        let out = self
            .work()
            .xd
            .as_ref()
            .expect("ensure() allocates xd while the adapters have dropout")
            .ptr();
        let scale = 1.0 / (1.0 - p);
        let mut args = vec![
            Arg::P(x),
            Arg::P(out),
            Arg::L(n as i64),
            Arg::L(seed as i64),
            Arg::L(i0 as i64),
            Arg::F(p),
        ];
        // f32: the scaled input itself; bf16: kept elements unscaled, the scale in alpha.
        let (kernel, factor) = if g.lp() == Dt::F32 {
            args.push(Arg::F(scale));
            ("adapter_in", 1.0)
        } else {
            ("drop_lp", scale)
        };
        g.launch_n(kernel, n, &args)?;
        Ok((out, factor))
    }

    /// Makes every adapter's `a2` (bf16 mode) from its current A.
    fn refresh_a2(&mut self) -> Result<()> {
        if self.a2_fresh {
            return Ok(());
        }
        let g = &self.m.gpu;
        for p in &self.params {
            if let Some(a2) = &p.a2 {
                let n = p.r * p.d_in;
                g.launch_n(
                    "split_lp",
                    n,
                    &[
                        Arg::P(p.a.ptr()),
                        Arg::P(a2.ptr()),
                        Arg::P(a2.at(n * g.lp().size())),
                        Arg::L(n as i64),
                    ],
                )?;
            }
        }
        self.a2_fresh = true;
        Ok(())
    }

    /// y[:, col0 ..] += s · (xd Aᵀ) Bᵀ for rows [r0, r0 + t) of the pass; h [t, r] gets xd Aᵀ.
    #[allow(clippy::too_many_arguments)]
    fn lora_fwd(
        &self,
        p: &DevParam,
        x: u64,
        t: usize,
        r0: usize,
        y: u64,
        ldy: usize,
        h: u64,
        drop: Option<(u64, f32)>,
    ) -> Result<()> {
        self.lora_shrink(p, x, t, r0, h, drop)?;
        self.m.gpu.gemm_rm(
            (false, true),
            (t, p.d_out, p.r),
            p.s,
            (h, p.r, 0),
            (p.b.ptr(), p.r, 0),
            1.0,
            (y + (p.col0 * 4) as u64, ldy, 0),
            (Dt::F32, Dt::F32),
            1,
        )
    }

    /// h [t, r] = xd Aᵀ for rows [r0, r0 + t) of the pass (`lora_fwd`'s first half).
    fn lora_shrink(
        &self,
        p: &DevParam,
        x: u64,
        t: usize,
        r0: usize,
        h: u64,
        drop: Option<(u64, f32)>,
    ) -> Result<()> {
        let g = &self.m.gpu;
        let (xd, c) = self.adapter_input(x, t * p.d_in, r0 * p.d_in, drop)?;
        if let Some(a2) = &p.a2 {
            // [t, 2r] = xd · [A_hi; A_lo]ᵀ, then h = the two halves' sum.
            let h2 = self.work().h2.as_ref().expect("bf16 mode").ptr();
            g.gemm_rm(
                (false, true),
                (t, 2 * p.r, p.d_in),
                c,
                (xd, p.d_in, 0),
                (a2.ptr(), p.d_in, 0),
                0.0,
                (h2, 2 * p.r, 0),
                (g.lp(), Dt::F32),
                1,
            )?;
            g.launch_n(
                "sum_halves",
                t * p.r,
                &[
                    Arg::P(h2),
                    Arg::I(p.r as i32),
                    Arg::P(h),
                    Arg::L((t * p.r) as i64),
                ],
            )?;
            Ok(())
        } else {
            g.gemm_rm(
                (false, true),
                (t, p.r, p.d_in),
                c,
                (xd, p.d_in, 0),
                (p.a.ptr(), p.d_in, 0),
                0.0,
                (h, p.r, 0),
                (Dt::F32, Dt::F32),
                1,
            )
        }
    }

    /// The adapter's backward for rows [r0, r0 + t): dB += s·dyᵀh, dA += (s·dy B)ᵀ xd, and
    /// dx [t, d_in] += (s·dy B) A through the dropout. `dy` is the whole linear's gradient
    /// (the projection's columns start at col0), as `lora_fwd`'s `y`.
    #[allow(clippy::too_many_arguments)]
    fn lora_bwd(
        &self,
        p: &DevParam,
        x: u64,
        t: usize,
        r0: usize,
        dy: u64,
        ldy: usize,
        h: u64,
        dx: u64,
        drop: Option<(u64, f32)>,
    ) -> Result<()> {
        let g = &self.m.gpu;
        let w = self.work();
        let f = (Dt::F32, Dt::F32);
        let dy = dy + (p.col0 * 4) as u64;
        let (xd, c) = self.adapter_input(x, t * p.d_in, r0 * p.d_in, drop)?;
        g.gemm_rm(
            (true, false),
            (p.d_out, p.r, t),
            p.s,
            (dy, ldy, 0),
            (h, p.r, 0),
            1.0,
            (p.db.ptr(), p.r, 0),
            f,
            1,
        )?;
        let dh = w.dr.ptr();
        g.gemm_rm(
            (false, false),
            (t, p.r, p.d_out),
            p.s,
            (dy, ldy, 0),
            (p.b.ptr(), p.r, 0),
            0.0,
            (dh, p.r, 0),
            f,
            1,
        )?;
        if p.a2.is_some() {
            // dA += [dh_hi | dh_lo]ᵀ xd, its two halves summed.
            let (dr2, da2) = (
                w.dr2.as_ref().expect("bf16 mode").ptr(),
                w.da2.as_ref().expect("bf16 mode").ptr(),
            );
            g.launch_n(
                "split_rows_lp",
                t * p.r,
                &[
                    Arg::P(dh),
                    Arg::I(p.r as i32),
                    Arg::P(dr2),
                    Arg::L((t * p.r) as i64),
                ],
            )?;
            g.gemm_rm(
                (true, false),
                (2 * p.r, p.d_in, t),
                c,
                (dr2, 2 * p.r, 0),
                (xd, p.d_in, 0),
                0.0,
                (da2, p.d_in, 0),
                (g.lp(), Dt::F32),
                1,
            )?;
            g.launch_n(
                "add_halves",
                p.r * p.d_in,
                &[
                    Arg::P(p.da.ptr()),
                    Arg::P(da2),
                    Arg::L((p.r * p.d_in) as i64),
                ],
            )?;
        } else {
            g.gemm_rm(
                (true, false),
                (p.r, p.d_in, t),
                c,
                (dh, p.r, 0),
                (xd, p.d_in, 0),
                1.0,
                (p.da.ptr(), p.d_in, 0),
                f,
                1,
            )?;
        }
        match drop {
            None => g.gemm_rm(
                (false, false),
                (t, p.d_in, p.r),
                1.0,
                (dh, p.r, 0),
                (p.a.ptr(), p.d_in, 0),
                1.0,
                (dx, p.d_in, 0),
                f,
                1,
            ),
            Some((seed, pr)) => {
                let dxd = w.dxd.as_ref().expect("allocated with xd").ptr();
                g.gemm_rm(
                    (false, false),
                    (t, p.d_in, p.r),
                    1.0,
                    (dh, p.r, 0),
                    (p.a.ptr(), p.d_in, 0),
                    0.0,
                    (dxd, p.d_in, 0),
                    f,
                    1,
                )?;
                let n = t * p.d_in;
                g.launch_n(
                    "dropout_add",
                    n,
                    &[
                        Arg::P(dx),
                        Arg::P(dxd),
                        Arg::L(n as i64),
                        Arg::L(seed as i64),
                        Arg::L((r0 * p.d_in) as i64),
                        Arg::F(pr),
                        Arg::F(1.0 / (1.0 - pr)),
                    ],
                )
            }
        }
    }

    /// dx [t, d_in] (+)= dy [t, ldy] · W for the frozen base of `lin` (dy lp).
    fn base_bwd(
        &self,
        lin: &DevLinear,
        dy: u64,
        ldy: usize,
        t: usize,
        dx: u64,
        accumulate: bool,
    ) -> Result<()> {
        let g = &self.m.gpu;
        let lp = g.lp();
        for (i, mat) in lin.mats.iter().enumerate() {
            let w = self.m.dequantized(mat)?;
            let beta = if i == 0 && !accumulate { 0.0 } else { 1.0 };
            g.gemm_rm(
                (false, false),
                (t, mat.cols, mat.rows),
                1.0,
                (dy + (mat.col0 * lp.size()) as u64, ldy, 0),
                (w, mat.cols, 0),
                beta,
                (dx, mat.cols, 0),
                (lp, Dt::F32),
                1,
            )?;
        }
        Ok(())
    }

    /// dx [t, d_in] = dy · W for the frozen base of `lin`, dy in column ranges held apart:
    /// `parts` (first output column, lp [t, n] at its address, n), covering the outputs.
    fn base_bwd_parts(
        &self,
        lin: &DevLinear,
        parts: &[(usize, u64, usize)],
        t: usize,
        dx: u64,
    ) -> Result<()> {
        let g = &self.m.gpu;
        let lp = g.lp();
        let mut first = true;
        for mat in &lin.mats {
            let w = self.m.dequantized(mat)?;
            for &(c0, dy, n) in parts {
                let (a, b) = (c0.max(mat.col0), (c0 + n).min(mat.col0 + mat.rows));
                if a >= b {
                    continue;
                }
                g.gemm_rm(
                    (false, false),
                    (t, mat.cols, b - a),
                    1.0,
                    (dy + ((a - c0) * lp.size()) as u64, n, 0),
                    (
                        w + ((a - mat.col0) * mat.cols * lp.size()) as u64,
                        mat.cols,
                        0,
                    ),
                    if first { 0.0 } else { 1.0 },
                    (dx, mat.cols, 0),
                    (lp, Dt::F32),
                    1,
                )?;
                first = false;
            }
        }
        Ok(())
    }

    /// out (lp) = x (f32), n elements.
    fn to_lp(&self, x: u64, out: u64, n: usize) -> Result<()> {
        self.m
            .gpu
            .launch_n("f32_to_lp", n, &[Arg::P(x), Arg::P(out), Arg::L(n as i64)])
    }

    fn meta(&self, k: usize) -> u64 {
        let w = self.work();
        w.meta.at(k * w.t * 4)
    }

    /// A sequence of n tokens as blocks of query rows (i0, i1, k0): rows [i0, i1) attend to
    /// keys [k0, i1), k0 the block's first window-visible key rounded down to a multiple of 8.
    fn attn_blocks(&self, n: usize) -> Vec<(usize, usize, usize)> {
        let (rows, window) = (self.attn_rows, self.m.window);
        (0..n)
            .step_by(rows)
            .map(|i0| {
                let k0 = if window > 0 {
                    (i0 + 1).saturating_sub(window) / 8 * 8
                } else {
                    0
                };
                (i0, (i0 + rows).min(n), k0)
            })
            .collect()
    }

    /// Scores and probabilities of one block of a sequence starting at row s0 (rotated lp
    /// q/k/v in `qkv`, row stride ld): sc [heads, nq, nk] = scale · Q Kᵀ, p = masked softmax,
    /// nq = i1 − i0 query rows against nk = i1 − k0 keys.
    fn attn_probs(&self, qkv: u64, s0: usize, (i0, i1, k0): (usize, usize, usize)) -> Result<()> {
        let (g, m, w) = (&self.m.gpu, &self.m, self.work());
        let (heads, kvh, hd) = (m.heads, m.kvh, m.hd);
        let group = heads / kvh;
        let (lp, ld) = (g.lp(), self.qkv_ld());
        let (nq, nk) = (i1 - i0, i1 - k0);
        let hs = nq * nk;
        let ls = lp.size() as u64;
        let qrow = qkv + ((s0 + i0) * ld) as u64 * ls;
        let krow = qkv + ((s0 + k0) * ld + heads * hd) as u64 * ls;
        let scale = 1.0 / (hd as f32).sqrt();
        for gi in 0..group {
            g.gemm_rm(
                (false, true),
                (nq, nk, hd),
                scale,
                (qrow + (gi * hd) as u64 * ls, ld, group * hd),
                (krow, ld, hd),
                0.0,
                (w.sc.ptr() + (gi * hs * 4) as u64, nk, group * hs),
                (lp, Dt::F32),
                kvh,
            )?;
        }
        g.softmax_rows(
            w.sc.ptr(),
            w.p.ptr(),
            (nq, heads),
            (nk, hs),
            m.window,
            i0 - k0,
        )
    }

    /// Causal attention within each sequence: attn32 [t, q] f32 from the saved rotated qkv.
    fn attention(&self, sv: &Saved, segs: &[(usize, usize)]) -> Result<()> {
        let (g, m, w) = (&self.m.gpu, &self.m, self.work());
        let (heads, kvh, hd) = (m.heads, m.kvh, m.hd);
        let group = heads / kvh;
        let (lp, ld, q) = (g.lp(), self.qkv_ld(), heads * hd);
        let ls = lp.size() as u64;
        let attn32 = self.attn32(sv);
        for &(s0, n) in segs {
            for blk in self.attn_blocks(n) {
                let (i0, i1, k0) = blk;
                let (nq, nk) = (i1 - i0, i1 - k0);
                let hs = nq * nk;
                self.attn_probs(sv.qkv.ptr(), s0, blk)?;
                let vrow = sv.qkv.ptr() + ((s0 + k0) * ld + (heads + kvh) * hd) as u64 * ls;
                for gi in 0..group {
                    g.gemm_rm(
                        (false, false),
                        (nq, hd, nk),
                        1.0,
                        (w.p.ptr() + (gi * hs) as u64 * ls, nk, group * hs),
                        (vrow, ld, hd),
                        0.0,
                        (
                            attn32 + (((s0 + i0) * q + gi * hd) * 4) as u64,
                            q,
                            group * hd,
                        ),
                        (lp, Dt::F32),
                        kvh,
                    )?;
                }
            }
        }
        Ok(())
    }

    /// Attention's backward: qkv32 [t, q + 2 kv] f32 gets (dq, dk, dv before RoPE's backward) from
    /// dO (lp [t, q], in `lp`). dK and dV add up over the blocks in order.
    fn attention_bwd(&self, sv: &Saved, segs: &[(usize, usize)], d_o: u64) -> Result<()> {
        let (g, m, w) = (&self.m.gpu, &self.m, self.work());
        let (heads, kvh, hd) = (m.heads, m.kvh, m.hd);
        let group = heads / kvh;
        let (lp, ld, q) = (g.lp(), self.qkv_ld(), heads * hd);
        let ls = lp.size() as u64;
        let scale = 1.0 / (hd as f32).sqrt();
        let types = (lp, Dt::F32);
        let dqkv = self.qkv32(sv);
        let at = |bytes: usize| dqkv + bytes as u64;
        for &(s0, n) in segs {
            let nkv = 2 * kvh * hd;
            g.launch_n(
                "zero_cols",
                n * nkv,
                &[
                    Arg::P(at(s0 * ld * 4)),
                    Arg::I(ld as i32),
                    Arg::I((heads * hd) as i32),
                    Arg::I(nkv as i32),
                    Arg::L((n * nkv) as i64),
                ],
            )?;
            for blk in self.attn_blocks(n) {
                let (i0, i1, k0) = blk;
                let (nq, nk) = (i1 - i0, i1 - k0);
                let hs = nq * nk;
                self.attn_probs(sv.qkv.ptr(), s0, blk)?;
                let qp = sv.qkv.ptr() + ((s0 + i0) * ld) as u64 * ls;
                let krow = sv.qkv.ptr() + ((s0 + k0) * ld) as u64 * ls;
                let (kp, vp) = (
                    krow + (heads * hd) as u64 * ls,
                    krow + ((heads + kvh) * hd) as u64 * ls,
                );
                let dor = d_o + ((s0 + i0) * q) as u64 * ls;
                let dq = at((s0 + i0) * ld * 4);
                let dkrow = at((s0 + k0) * ld * 4);
                let (dk, dv) = (
                    dkrow + (heads * hd * 4) as u64,
                    dkrow + ((heads + kvh) * hd * 4) as u64,
                );
                let ph = |gi: usize| (w.p.ptr() + (gi * hs) as u64 * ls, nk, group * hs);
                // dV_j += Σ_g P_hᵀ dO_h (the group's heads in order).
                for gi in 0..group {
                    g.gemm_rm(
                        (true, false),
                        (nk, hd, nq),
                        1.0,
                        ph(gi),
                        (dor + (gi * hd) as u64 * ls, q, group * hd),
                        1.0,
                        (dv, ld, hd),
                        types,
                        kvh,
                    )?;
                }
                // dP_h = dO_h V_jᵀ into the scores' buffer.
                for gi in 0..group {
                    g.gemm_rm(
                        (false, true),
                        (nq, nk, hd),
                        1.0,
                        (dor + (gi * hd) as u64 * ls, q, group * hd),
                        (vp, ld, hd),
                        0.0,
                        (w.sc.ptr() + (gi * hs * 4) as u64, nk, group * hs),
                        types,
                        kvh,
                    )?;
                }
                // dS = P ⊙ (dP − Σ P dP), in place of P.
                g.softmax_rows_bwd(
                    w.p.ptr(),
                    w.sc.ptr(),
                    w.plo.ptr(),
                    (nq, heads),
                    (nk, hs),
                    i0 - k0,
                )?;
                // dQ_h = scale · dS_h K_j ; dK_j += Σ_g scale · dS_hᵀ Q_h; in bf16 with dS as
                // its high and low parts, each a product.
                let mut parts = vec![w.p.ptr()];
                if lp != Dt::F32 {
                    parts.push(w.plo.ptr());
                }
                for (k, &ds) in parts.iter().enumerate() {
                    let dsh = |gi: usize| (ds + (gi * hs) as u64 * ls, nk, group * hs);
                    for gi in 0..group {
                        g.gemm_rm(
                            (false, false),
                            (nq, hd, nk),
                            scale,
                            dsh(gi),
                            (kp, ld, hd),
                            if k == 0 { 0.0 } else { 1.0 },
                            (dq + (gi * hd * 4) as u64, ld, group * hd),
                            types,
                            kvh,
                        )?;
                    }
                    for gi in 0..group {
                        g.gemm_rm(
                            (true, false),
                            (nk, hd, nq),
                            scale,
                            dsh(gi),
                            (qp + (gi * hd) as u64 * ls, ld, group * hd),
                            1.0,
                            (dk, ld, hd),
                            types,
                            kvh,
                        )?;
                    }
                }
            }
        }
        Ok(())
    }

    /// f32 [t, q + 2 kv]: the forward's q/k/v before rounding, the backward's gradients.
    fn qkv32(&self, sv: &Saved) -> u64 {
        self.work().qkv32.as_ref().map_or(sv.gu.ptr(), |b| b.ptr())
    }

    /// f32 [t, q]: the attention's output before rounding.
    fn attn32(&self, sv: &Saved) -> u64 {
        self.work().attn32.as_ref().map_or(sv.gu.ptr(), |b| b.ptr())
    }

    fn lh(&self, sv: &Saved, p: &DevParam) -> u64 {
        sv.lh.at(self.work().t * p.roff * 4)
    }

    fn layer_params(&self, li: usize, lin: Lin) -> impl Iterator<Item = &DevParam> {
        self.params
            .iter()
            .filter(move |p| p.lin == lin && p.layer == li)
    }

    /// Every adapter of one linear of layer `li`, forward: y [t, ldy] += its deltas from x.
    #[allow(clippy::too_many_arguments)]
    fn adapters_fwd(
        &self,
        li: usize,
        lin: Lin,
        sv: &Saved,
        x: u64,
        t: usize,
        y: u64,
        ldy: usize,
        drops: &[Option<(u64, f32)>],
    ) -> Result<()> {
        for p in self.layer_params(li, lin) {
            self.lora_fwd(p, x, t, 0, y, ldy, self.lh(sv, p), drops[p.index])?;
        }
        Ok(())
    }

    /// Every adapter of one linear of layer `li`, backward: gradients from dy [t, ldy], and
    /// dx += their input gradients.
    #[allow(clippy::too_many_arguments)]
    fn adapters_bwd(
        &self,
        li: usize,
        lin: Lin,
        sv: &Saved,
        x: u64,
        t: usize,
        dy: u64,
        ldy: usize,
        dx: u64,
        drops: &[Option<(u64, f32)>],
    ) -> Result<()> {
        for p in self.layer_params(li, lin) {
            self.lora_bwd(p, x, t, 0, dy, ldy, self.lh(sv, p), dx, drops[p.index])?;
        }
        Ok(())
    }

    /// One layer's forward over t tokens: xin → xout (f32 [t, d]), intermediates into `sv`.
    /// Without `xout` (the recompute before the layer's backward), the output is not made: of
    /// the down projection only its adapters' shrink outputs, which the backward reads.
    #[allow(clippy::too_many_arguments)]
    fn layer_fwd(
        &self,
        li: usize,
        t: usize,
        segs: &[(usize, usize)],
        sv: &Saved,
        xin: u64,
        xout: Option<u64>,
        drops: &[Option<(u64, f32)>],
    ) -> Result<()> {
        let (g, m) = (&self.m.gpu, &self.m);
        let l = &m.layers[li];
        let (d, f, q) = (m.d, m.f, m.heads * m.hd);
        let ld = self.qkv_ld();
        m.rms_norm(xin, &l.ln1, t, sv.h1.ptr(), 0)?;
        let qkv32 = self.qkv32(sv);
        m.linear(&l.qkv, sv.h1.ptr(), None, t, qkv32, ld, false, &[])?;
        self.adapters_fwd(li, Lin::Qkv, sv, sv.h1.ptr(), t, qkv32, ld, drops)?;
        self.rope(qkv32, t, 1.0)?;
        self.to_lp(qkv32, sv.qkv.ptr(), t * ld)?;
        self.attention(sv, segs)?;
        self.to_lp(self.attn32(sv), sv.attn.ptr(), t * q)?;
        g.copy(sv.x2.ptr(), xin, t * d * 4)?;
        m.linear(&l.o, sv.attn.ptr(), None, t, sv.x2.ptr(), d, true, &[])?;
        self.adapters_fwd(li, Lin::O, sv, sv.attn.ptr(), t, sv.x2.ptr(), d, drops)?;
        m.rms_norm(sv.x2.ptr(), &l.ln2, t, sv.h2.ptr(), 0)?;
        m.linear(&l.gu, sv.h2.ptr(), None, t, sv.gu.ptr(), 2 * f, false, &[])?;
        self.adapters_fwd(li, Lin::Gu, sv, sv.h2.ptr(), t, sv.gu.ptr(), 2 * f, drops)?;
        g.launch_n(
            "swiglu",
            t * f,
            &[
                Arg::P(sv.gu.ptr()),
                Arg::I(f as i32),
                Arg::P(sv.act.ptr()),
                Arg::L((t * f) as i64),
                Arg::P(0),
            ],
        )?;
        let Some(xout) = xout else {
            for p in self.layer_params(li, Lin::Down) {
                self.lora_shrink(p, sv.act.ptr(), t, 0, self.lh(sv, p), drops[p.index])?;
            }
            return Ok(());
        };
        g.copy(xout, sv.x2.ptr(), t * d * 4)?;
        m.linear(&l.down, sv.act.ptr(), None, t, xout, d, true, &[])?;
        self.adapters_fwd(li, Lin::Down, sv, sv.act.ptr(), t, xout, d, drops)?;
        Ok(())
    }

    /// One layer's backward: `dx` [t, d] holds dL/d(output) and becomes dL/d(input).
    fn layer_bwd(
        &self,
        li: usize,
        t: usize,
        segs: &[(usize, usize)],
        sv: &Saved,
        xin: u64,
        drops: &[Option<(u64, f32)>],
    ) -> Result<()> {
        let (g, m, w) = (&self.m.gpu, &self.m, self.work());
        let l = &m.layers[li];
        let (d, f, q) = (m.d, m.f, m.heads * m.hd);
        let ld = self.qkv_ld();
        let (dx, dh, lpb) = (w.dx.ptr(), w.dh.ptr(), w.lp.ptr());
        // down: out = x2 + down(act)
        self.to_lp(dx, lpb, t * d)?;
        self.base_bwd(&l.down, lpb, d, t, dh, false)?;
        self.adapters_bwd(li, Lin::Down, sv, sv.act.ptr(), t, dx, d, dh, drops)?;
        // d(gate | up) in place of gate | up, and in lp for the base's product: the gate's
        // in `act` (read for the last time above), the up projection's in `lp`.
        let dgu = sv.gu.ptr();
        g.launch_n(
            "swiglu_bwd",
            t * f,
            &[
                Arg::P(sv.gu.ptr()),
                Arg::I(f as i32),
                Arg::P(dh),
                Arg::P(dgu),
                Arg::L((t * f) as i64),
                Arg::P(sv.act.ptr()),
                Arg::P(lpb),
            ],
        )?;
        self.base_bwd_parts(&l.gu, &[(0, sv.act.ptr(), f), (f, lpb, f)], t, dh)?;
        self.adapters_bwd(li, Lin::Gu, sv, sv.h2.ptr(), t, dgu, 2 * f, dh, drops)?;
        self.rms_norm_bwd(sv.x2.ptr(), &l.ln2, t, dh, dx)?;
        // o: x2 = x + o(attn)
        self.to_lp(dx, lpb, t * d)?;
        self.base_bwd(&l.o, lpb, d, t, dh, false)?;
        self.adapters_bwd(li, Lin::O, sv, sv.attn.ptr(), t, dx, d, dh, drops)?;
        self.to_lp(dh, lpb, t * q)?;
        self.attention_bwd(sv, segs, lpb)?;
        let dqkv = self.qkv32(sv);
        self.rope(dqkv, t, -1.0)?;
        self.to_lp(dqkv, lpb, t * ld)?;
        self.base_bwd(&l.qkv, lpb, ld, t, dh, false)?;
        self.adapters_bwd(li, Lin::Qkv, sv, sv.h1.ptr(), t, dqkv, ld, dh, drops)?;
        self.rms_norm_bwd(xin, &l.ln1, t, dh, dx)
    }

    /// RoPE in place on the q and k heads of qkv rows [t, q + 2 kv] at the pass's positions;
    /// sign −1 rotates back (the backward).
    fn rope(&self, qkv: u64, t: usize, sign: f32) -> Result<()> {
        let (m, w) = (&self.m, self.work());
        m.gpu.launch(
            "rope_rows",
            (t as u32, (m.heads + m.kvh) as u32),
            (m.hd / 2).next_multiple_of(32) as u32,
            &[
                Arg::P(qkv),
                Arg::I(self.qkv_ld() as i32),
                Arg::I(m.hd as i32),
                Arg::P(w.cos.ptr()),
                Arg::P(w.sin.ptr()),
                Arg::P(self.meta(2)),
                Arg::F(sign),
            ],
        )
    }

    /// dx += RMSNorm(x; w)'s input gradient for dy.
    fn rms_norm_bwd(&self, x: u64, wt: &DevBuf, t: usize, dy: u64, dx: u64) -> Result<()> {
        self.m.gpu.launch(
            "rms_norm_bwd",
            (t as u32, 1),
            512,
            &[
                Arg::P(x),
                Arg::P(wt.ptr()),
                Arg::F(self.m.eps),
                Arg::I(self.m.d as i32),
                Arg::P(dy),
                Arg::P(dx),
            ],
        )
    }

    /// Checks `ad` against the adapters the trainer was built for and uploads its A and B.
    fn upload_adapters(&mut self, ad: &Adapters) -> Result<()> {
        self.m.gpu.bind()?;
        if ad.params.len() != self.modules.len()
            || ad
                .params
                .iter()
                .zip(&self.modules)
                .any(|(p, m)| &p.module != m)
        {
            return Err(Error::Invalid(
                "the adapters differ from those the trainer was built for".into(),
            ));
        }
        let g = &self.m.gpu;
        for p in &self.params {
            let src = &ad.params[p.index];
            g.write(&p.a, 0, &src.a)?;
            g.write(&p.b, 0, &src.b)?;
        }
        self.a2_fresh = false;
        self.dropout = ad.dropout;
        Ok(())
    }

    fn zero_grads(&self) -> Result<()> {
        let g = &self.m.gpu;
        for p in &self.params {
            g.zero(p.da.ptr(), p.da.bytes())?;
            g.zero(p.db.ptr(), p.db.bytes())?;
        }
        Ok(())
    }

    /// The gradients, added into the caller's.
    fn read_grads(&self, grads: &mut Grads) -> Result<()> {
        let g = &self.m.gpu;
        for p in &self.params {
            let (mut da, mut db) = (vec![0f32; p.r * p.d_in], vec![0f32; p.d_out * p.r]);
            g.read(p.da.ptr(), &mut da)?;
            g.read(p.db.ptr(), &mut db)?;
            grads.a[p.index]
                .iter_mut()
                .zip(&da)
                .for_each(|(a, b)| *a += b);
            grads.b[p.index]
                .iter_mut()
                .zip(&db)
                .for_each(|(a, b)| *a += b);
        }
        Ok(())
    }

    /// The loss of a packed micro-batch with the adapters on the device; with `with_grads`,
    /// the gradients of Σ loss / `norm` are added into the device accumulators.
    fn run(
        &mut self,
        noise: Option<Noise>,
        seqs: &[(&[u32], &[Option<u32>])],
        norm: f32,
        with_grads: bool,
    ) -> Result<(f64, usize)> {
        self.m.gpu.bind()?;
        let t: usize = seqs.iter().map(|(ids, _)| ids.len()).sum();
        if t == 0 {
            return Ok((0.0, 0));
        }
        let vocab = self.m.vocab;
        let mut meta = Vec::with_capacity(3 * t);
        let mut labels = Vec::with_capacity(t);
        let mut pos = Vec::with_capacity(t);
        let mut segs = Vec::new();
        let mut s0 = 0;
        for (ids, lab) in seqs {
            if ids.len() != lab.len() {
                return Err(Error::Invalid(format!(
                    "a sequence has {} ids and {} labels",
                    ids.len(),
                    lab.len()
                )));
            }
            for (j, (&id, &y)) in ids.iter().zip(lab.iter()).enumerate() {
                if id as usize >= vocab || y.is_some_and(|y| y as usize >= vocab) {
                    return Err(Error::Invalid(format!(
                        "token id {} is out of range for a vocabulary of {vocab}",
                        if id as usize >= vocab {
                            id
                        } else {
                            y.unwrap_or(0)
                        }
                    )));
                }
                meta.push(id as i32);
                labels.push(y.map_or(-1, |y| y as i32));
                pos.push(j as i32);
            }
            if !ids.is_empty() {
                segs.push((s0, ids.len()));
            }
            s0 += ids.len();
        }
        let l = segs.iter().map(|s| s.1).max().unwrap_or(1);
        self.ensure(t, l, with_grads)?;
        self.refresh_a2()?;
        let g = self.m.gpu.clone();
        let cap = self.work().t;
        let (d, lp) = (self.m.d, g.lp().size());
        {
            let w = self.work();
            let mut all = vec![0i32; 3 * cap];
            all[..t].copy_from_slice(&meta);
            all[cap..cap + t].copy_from_slice(&labels);
            all[2 * cap..2 * cap + t].copy_from_slice(&pos);
            g.write(&w.meta, 0, &all)?;
        }
        let drops: Vec<Option<(u64, f32)>> = self
            .modules
            .iter()
            .map(|m| match noise {
                Some(n) if self.dropout > 0.0 => Some((module_seed(n.seed, m), self.dropout)),
                _ => None,
            })
            .collect();
        let n_layers = self.m.layers.len();
        let xs = |li: usize, w: &Work| w.xs.at(li * w.t * d * 4);
        {
            let w = self.work();
            g.launch(
                "embed",
                (t as u32, 1),
                256,
                &[
                    Arg::P(self.m.embed.ptr()),
                    Arg::P(self.meta(0)),
                    Arg::P(xs(0, w)),
                    Arg::I(d as i32),
                ],
            )?;
            for li in 0..n_layers {
                let sv = &self.saved[if self.kept { li } else { 0 }];
                self.layer_fwd(li, t, &segs, sv, xs(li, w), Some(xs(li + 1, w)), &drops)?;
            }
            self.m
                .rms_norm(xs(n_layers, w), &self.m.norm, t, w.hn.ptr(), 0)?;
        }
        // The head and the loss, a chunk of rows at a time.
        let head_params: Vec<&DevParam> =
            self.params.iter().filter(|p| p.lin == Lin::Head).collect();
        let w = self.work();
        let c = w.c;
        let mut r0 = 0;
        while r0 < t {
            let n = c.min(t - r0);
            let hn = w.hn.at(r0 * d * lp);
            self.m
                .linear(&self.m.head, hn, None, n, w.logits.ptr(), vocab, false, &[])?;
            for p in &head_params {
                let h = self.head_lh.as_ref().map_or(0, |b| b.at(n * p.roff * 4));
                self.lora_fwd(p, hn, n, r0, w.logits.ptr(), vocab, h, drops[p.index])?;
            }
            g.launch(
                "cross_entropy",
                (n as u32, 1),
                1024,
                &[
                    Arg::P(w.logits.ptr()),
                    Arg::I(vocab as i32),
                    Arg::P(self.meta(1) + (r0 * 4) as u64),
                    Arg::F(1.0 / norm),
                    Arg::P(w.loss.at(r0 * 4)),
                ],
            )?;
            if with_grads {
                let dhn = w.dh.at(r0 * d * 4);
                self.to_lp(w.logits.ptr(), w.dlogits.ptr(), n * vocab)?;
                self.base_bwd(&self.m.head, w.dlogits.ptr(), vocab, n, dhn, false)?;
                for p in &head_params {
                    let h = self.head_lh.as_ref().map_or(0, |b| b.at(n * p.roff * 4));
                    self.lora_bwd(p, hn, n, r0, w.logits.ptr(), vocab, h, dhn, drops[p.index])?;
                }
            }
            r0 += n;
        }
        let mut rows = vec![0f32; t];
        g.read(w.loss.ptr(), &mut rows)?;
        let count = labels.iter().filter(|&&y| y >= 0).count();
        let loss: f64 = rows
            .iter()
            .zip(&labels)
            .filter(|(_, &y)| y >= 0)
            .map(|(&l, _)| l as f64)
            .sum();
        if !with_grads {
            return Ok((loss, count));
        }
        g.zero(w.dx.ptr(), t * d * 4)?;
        self.rms_norm_bwd(xs(n_layers, w), &self.m.norm, t, w.dh.ptr(), w.dx.ptr())?;
        for li in (0..n_layers).rev() {
            let sv = if self.kept {
                &self.saved[li]
            } else {
                // Recompute the layer's intermediates from its input (not its output).
                let sv = &self.saved[0];
                self.layer_fwd(li, t, &segs, sv, xs(li, w), None, &drops)?;
                sv
            };
            self.layer_bwd(li, t, &segs, sv, xs(li, w), &drops)?;
        }
        Ok((loss, count))
    }

    /// Global-norm clipping and AdamW on the device (`resident_update`).
    fn update(&mut self, opt: &mut AdamW, lr: f32, max_norm: Option<f32>) -> Result<f32> {
        let g = self.m.gpu.clone();
        self.a2_fresh = false;
        let tensors = 2 * self.params.len();
        if self.norm_parts.is_none() {
            self.norm_parts = Some(g.alloc(tensors * SUMSQ_BLOCKS * 8)?);
        }
        let parts = self.norm_parts.as_ref().expect("allocated above");
        // Σ g² over every A, then every B (the CPU's order of tensors), each in fixed blocks.
        let order = self
            .params
            .iter()
            .map(|p| &p.da)
            .chain(self.params.iter().map(|p| &p.db));
        for (k, buf) in order.enumerate() {
            g.launch(
                "sumsq_f64",
                (SUMSQ_BLOCKS as u32, 1),
                256,
                &[
                    Arg::P(buf.ptr()),
                    Arg::L((buf.bytes() / 4) as i64),
                    Arg::P(parts.at(k * SUMSQ_BLOCKS * 8)),
                ],
            )?;
        }
        let mut sums = vec![0f64; tensors * SUMSQ_BLOCKS];
        g.read(parts.ptr(), &mut sums)?;
        let norm = sums.iter().sum::<f64>().sqrt() as f32;
        if !norm.is_finite() {
            return Ok(norm);
        }
        let coef = max_norm.map_or(1.0, |mx| (mx / (norm + 1e-6)).min(1.0));
        opt.step += 1;
        let bc1 = 1.0 - (opt.beta1 as f64).powi(opt.step as i32);
        let bc2 = 1.0 - (opt.beta2 as f64).powi(opt.step as i32);
        let step_size = (lr as f64 / bc1) as f32;
        let bc2_sqrt = bc2.sqrt() as f32;
        for p in &self.params {
            let m = p
                .moments
                .as_ref()
                .ok_or_else(|| Error::Invalid("resident_update before resident_load".into()))?;
            for (param, grad, mm, vv) in [(&p.a, &p.da, &m[0], &m[1]), (&p.b, &p.db, &m[2], &m[3])]
            {
                let n = param.bytes() / 4;
                g.launch_n(
                    "adamw",
                    n,
                    &[
                        Arg::P(param.ptr()),
                        Arg::P(grad.ptr()),
                        Arg::P(mm.ptr()),
                        Arg::P(vv.ptr()),
                        Arg::L(n as i64),
                        Arg::F(coef),
                        Arg::F(1.0 - lr * opt.weight_decay),
                        Arg::F(opt.beta1),
                        Arg::F(opt.beta2),
                        Arg::F(opt.eps),
                        Arg::F(step_size),
                        Arg::F(bc2_sqrt),
                    ],
                )?;
            }
        }
        Ok(norm)
    }

    fn load(&mut self, ad: &Adapters, opt: &AdamW) -> Result<()> {
        self.upload_adapters(ad)?;
        let g = self.m.gpu.clone();
        for p in self.params.iter_mut() {
            let i = p.index;
            let up = |v: &Vec<f32>, n: usize| -> Result<DevBuf> {
                if v.len() != n {
                    return Err(Error::Invalid(format!(
                        "optimizer state of {} elements for a tensor of {n}",
                        v.len()
                    )));
                }
                g.upload(v)
            };
            let (na, nb) = (p.r * p.d_in, p.d_out * p.r);
            p.moments = Some([
                up(&opt.m.a[i], na)?,
                up(&opt.v.a[i], na)?,
                up(&opt.m.b[i], nb)?,
                up(&opt.v.b[i], nb)?,
            ]);
        }
        Ok(())
    }

    fn store(&self, ad: &mut Adapters, opt: &mut AdamW) -> Result<()> {
        let g = &self.m.gpu;
        for p in &self.params {
            let i = p.index;
            g.read(p.a.ptr(), &mut ad.params[i].a)?;
            g.read(p.b.ptr(), &mut ad.params[i].b)?;
            if let Some(m) = &p.moments {
                g.read(m[0].ptr(), &mut opt.m.a[i])?;
                g.read(m[1].ptr(), &mut opt.v.a[i])?;
                g.read(m[2].ptr(), &mut opt.m.b[i])?;
                g.read(m[3].ptr(), &mut opt.v.b[i])?;
            }
        }
        Ok(())
    }

    /// Where each adapter's A and B gradients sit in the flat layout of
    /// `LossBackend::resident_grads` (every A in the adapters' order, then every B), by
    /// `DevParam::index`, and the total length.
    fn flat_offsets(&self) -> (Vec<(usize, usize)>, usize) {
        let mut lens = vec![(0usize, 0usize); self.modules.len()];
        for p in &self.params {
            lens[p.index] = (p.r * p.d_in, p.d_out * p.r);
        }
        let mut offs = vec![(0usize, 0usize); lens.len()];
        let mut at = 0;
        for (o, l) in offs.iter_mut().zip(&lens) {
            o.0 = at;
            at += l.0;
        }
        for (o, l) in offs.iter_mut().zip(&lens) {
            o.1 = at;
            at += l.1;
        }
        (offs, at)
    }

    fn grads_to_host(&self, out: &mut Vec<f32>) -> Result<()> {
        let (offs, total) = self.flat_offsets();
        out.clear();
        out.resize(total, 0.0);
        let g = &self.m.gpu;
        for p in &self.params {
            let (a, b) = offs[p.index];
            g.read(p.da.ptr(), &mut out[a..a + p.r * p.d_in])?;
            g.read(p.db.ptr(), &mut out[b..b + p.d_out * p.r])?;
        }
        Ok(())
    }

    fn grads_from_host(&self, v: &[f32]) -> Result<()> {
        let (offs, total) = self.flat_offsets();
        if v.len() != total {
            return Err(Error::Invalid(format!(
                "{} gradient values for adapters of {total}",
                v.len()
            )));
        }
        let g = &self.m.gpu;
        for p in &self.params {
            let (a, b) = offs[p.index];
            g.write(&p.da, 0, &v[a..a + p.r * p.d_in])?;
            g.write(&p.db, 0, &v[b..b + p.d_out * p.r])?;
        }
        Ok(())
    }

    fn err(&self, e: Error) -> qlora_train::Error {
        qlora_train::Error::Backend(format!("cuda:{}: {e}", self.m.gpu.ordinal))
    }
}

impl LossBackend for CudaTrainer {
    fn packed_loss(
        &mut self,
        ad: &Adapters,
        noise: Option<Noise>,
        seqs: &[(&[u32], &[Option<u32>])],
        norm: f32,
        grads: Option<&mut Grads>,
    ) -> qlora_train::Result<(f64, usize)> {
        let r = (|| {
            self.upload_adapters(ad)?;
            if grads.is_some() {
                self.zero_grads()?;
            }
            let out = self.run(noise, seqs, norm, grads.is_some())?;
            if let Some(g) = grads {
                self.read_grads(g)?;
            }
            Ok(out)
        })();
        r.map_err(|e| self.err(e))
    }

    fn resident(&self) -> bool {
        true
    }

    fn resident_load(&mut self, ad: &Adapters, opt: &AdamW) -> qlora_train::Result<()> {
        self.load(ad, opt).map_err(|e| self.err(e))
    }

    fn resident_zero_grads(&mut self) -> qlora_train::Result<()> {
        self.zero_grads().map_err(|e| self.err(e))
    }

    fn resident_loss(
        &mut self,
        noise: Option<Noise>,
        seqs: &[(&[u32], &[Option<u32>])],
        norm: f32,
        accumulate: bool,
    ) -> qlora_train::Result<(f64, usize)> {
        self.run(noise, seqs, norm, accumulate)
            .map_err(|e| self.err(e))
    }

    fn resident_update(
        &mut self,
        opt: &mut AdamW,
        lr: f32,
        max_norm: Option<f32>,
    ) -> qlora_train::Result<f32> {
        self.update(opt, lr, max_norm).map_err(|e| self.err(e))
    }

    fn resident_all_reduce(&mut self) -> qlora_train::Result<bool> {
        let Some(comm) = &self.comm else {
            return Ok(false);
        };
        // Every rank lists its buffers in the model's order (`params` is sorted so).
        let bufs: Vec<(u64, usize)> = self
            .params
            .iter()
            .flat_map(|p| [(p.da.ptr(), p.r * p.d_in), (p.db.ptr(), p.d_out * p.r)])
            .collect();
        comm.all_reduce_sum(&bufs).map_err(|e| self.err(e))?;
        Ok(true)
    }

    fn resident_grads(&mut self, out: &mut Vec<f32>) -> qlora_train::Result<()> {
        self.grads_to_host(out).map_err(|e| self.err(e))
    }

    fn resident_set_grads(&mut self, v: &[f32]) -> qlora_train::Result<()> {
        self.grads_from_host(v).map_err(|e| self.err(e))
    }

    fn resident_store(&mut self, ad: &mut Adapters, opt: &mut AdamW) -> qlora_train::Result<()> {
        self.store(ad, opt).map_err(|e| self.err(e))
    }
}
