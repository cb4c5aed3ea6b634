//! Loss and adapter gradients of one sequence: a forward pass that keeps only each layer's
//! input, then a backward pass that recomputes each layer from its input (activation memory:
//! layers × tokens × hidden) and accumulates every LoRA A/B gradient. The base is frozen: its
//! projections (dense, NF4/FP4, int8) only pass activation gradients through.

use qlora_engine::backward as bw;
use qlora_engine::ops::{self, RopeTable};
use qlora_model::{Layer, Model, Projection};
use std::collections::HashMap;

/// One trainable adapter on a linear module: y += s · B (A dropout(x)).
#[derive(Debug, Clone)]
pub struct LoraParam {
    pub module: String,
    pub rank: usize,
    pub d_in: usize,
    pub d_out: usize,
    pub scaling: f32,
    /// [rank, d_in]
    pub a: Vec<f32>,
    /// [d_out, rank]
    pub b: Vec<f32>,
    /// DoRA magnitude [d_out], trainable; `None` for plain LoRA.
    pub magnitude: Option<Vec<f32>>,
}

/// The trainable adapters, by module name.
#[derive(Debug, Clone, Default)]
pub struct Adapters {
    pub params: Vec<LoraParam>,
    index: HashMap<String, usize>,
    /// Dropout probability on the adapter input (training only).
    pub dropout: f32,
}

/// Gradients parallel to `Adapters::params` (`m` is empty for plain LoRA).
#[derive(Debug, Clone)]
pub struct Grads {
    pub a: Vec<Vec<f32>>,
    pub b: Vec<Vec<f32>>,
    pub m: Vec<Vec<f32>>,
}

impl Adapters {
    pub fn new(params: Vec<LoraParam>, dropout: f32) -> Self {
        let index = params
            .iter()
            .enumerate()
            .map(|(i, p)| (p.module.clone(), i))
            .collect();
        Adapters {
            params,
            index,
            dropout,
        }
    }

    pub fn zero_grads(&self) -> Grads {
        Grads {
            a: self.params.iter().map(|p| vec![0f32; p.a.len()]).collect(),
            b: self.params.iter().map(|p| vec![0f32; p.b.len()]).collect(),
            m: self
                .params
                .iter()
                .map(|p| vec![0f32; p.magnitude.as_ref().map_or(0, |m| m.len())])
                .collect(),
        }
    }

    fn get(&self, module: &str) -> Option<(usize, &LoraParam)> {
        self.index.get(module).map(|&i| (i, &self.params[i]))
    }
}

/// What one forward/backward needs to know about randomness.
#[derive(Debug, Clone, Copy)]
pub struct Noise {
    /// Differs per micro-batch and step; dropout masks derive from it.
    pub seed: u64,
}

fn dropout_input(ad: &Adapters, noise: Option<Noise>, module: &str, x: &[f32]) -> Vec<f32> {
    match noise {
        Some(n) if ad.dropout > 0.0 => {
            use rayon::prelude::*;
            let (p, scale) = (ad.dropout, 1.0 / (1.0 - ad.dropout));
            let ms = module_seed(n.seed, module);
            let mut out = vec![0f32; x.len()];
            // Element-wise, so chunks in parallel give the same bits.
            out.par_chunks_mut(DROPOUT_CHUNK)
                .zip(x.par_chunks(DROPOUT_CHUNK))
                .enumerate()
                .for_each(|(c, (o, xs))| dropout_chunk(ms, c * DROPOUT_CHUNK, p, scale, xs, o));
            out
        }
        _ => x.to_vec(),
    }
}

/// Elements per parallel task of the dropout mask.
const DROPOUT_CHUNK: usize = 1 << 14;

/// out[j] = x[j] · scale where element i0 + j of the module's stream survives, else 0.
fn dropout_chunk(ms: u64, i0: usize, p: f32, scale: f32, x: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if qlora_quant::use_avx512() && std::is_x86_feature_detected!("avx512dq") {
            // SAFETY: AVX-512F and DQ detected.
            unsafe { dropout_chunk_avx512(ms, i0, p, scale, x, out) };
            return;
        }
    }
    dropout_chunk_scalar(ms, i0, p, scale, x, out)
}

#[inline(always)]
fn dropout_chunk_scalar(ms: u64, i0: usize, p: f32, scale: f32, x: &[f32], out: &mut [f32]) {
    for (j, (o, v)) in out.iter_mut().zip(x).enumerate() {
        *o = if uniform(ms, i0 + j) >= p {
            v * scale
        } else {
            0.0
        };
    }
}

/// The same loop compiled for AVX-512, where the hash's 64-bit multiplies vectorize.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq")]
unsafe fn dropout_chunk_avx512(ms: u64, i0: usize, p: f32, scale: f32, x: &[f32], out: &mut [f32]) {
    dropout_chunk_scalar(ms, i0, p, scale, x, out)
}

/// The dropout stream of one module in one micro-step (GPU backends hash the same stream).
pub fn module_seed(seed: u64, module: &str) -> u64 {
    let mut h = seed ^ 0x9E37_79B9_7F4A_7C15;
    for b in module.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
    }
    h
}

/// Uniform in [0, 1) for element `i` of a module's stream (a hash, so recomputation in the
/// backward pass sees the same mask).
#[inline(always)]
fn uniform(module_seed: u64, i: usize) -> f32 {
    let mut h = module_seed ^ (i as u64).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    h ^= h >> 31;
    h = h.wrapping_mul(0x94D0_49BB_1331_11EB);
    h ^= h >> 29;
    (h >> 40) as f32 / (1u64 << 24) as f32
}

/// The adapters of one forward/backward, their dropout noise, and DoRA's row norms
/// ‖W + s·B A‖ (detached as in PEFT), computed once per pass since A and B do not change in it.
struct Active<'a> {
    ad: &'a Adapters,
    noise: Option<Noise>,
    norms: Vec<Option<Vec<f32>>>,
}

impl<'a> Active<'a> {
    fn new(model: &Model, ad: &'a Adapters, noise: Option<Noise>) -> Self {
        let projections: Vec<&Projection> = model
            .layers
            .iter()
            .flat_map(|l| l.projections())
            .chain(std::iter::once(&model.lm_head))
            .collect();
        let norms = ad
            .params
            .iter()
            .map(|l| {
                l.magnitude.as_ref()?;
                let p = projections.iter().find(|p| p.name == l.module)?;
                Some(qlora_model::dora_row_norms(
                    &p.base, &l.a, &l.b, l.rank, l.scaling,
                ))
            })
            .collect();
        Active { ad, noise, norms }
    }
}

/// The pieces of one adapted projection's forward: the base product (no bias) on x and on the
/// dropped-out input, h = A·xd, and the LoRA output s·B h.
struct ProjParts {
    xd: Vec<f32>,
    h: Vec<f32>,
    lora: Vec<f32>,
}

fn parts(
    ad: &Adapters,
    noise: Option<Noise>,
    p: &Projection,
    l: &LoraParam,
    x: &[f32],
    t: usize,
) -> ProjParts {
    let xd = dropout_input(ad, noise, &p.name, x);
    let h = matmul_t(&xd, t, &l.a, l.rank, l.d_in);
    let mut lora = matmul_t(&h, t, &l.b, l.d_out, l.rank);
    lora.iter_mut().for_each(|v| *v *= l.scaling);
    ProjParts { xd, h, lora }
}

fn dropout_active(ad: &Adapters, noise: Option<Noise>) -> bool {
    noise.is_some() && ad.dropout > 0.0
}

/// LoRA: y = x·Wᵀ + b + s·B(A xd). DoRA (PEFT's training forward, norm n detached, f = m / n):
/// without dropout y = f ⊙ (x·Wᵀ) + b + f ⊙ s·B(A x); with dropout
/// y = x·Wᵀ + b + (f − 1) ⊙ (xd·Wᵀ) + f ⊙ s·B(A xd).
fn proj_forward(p: &Projection, act: &Active, x: &[f32], t: usize) -> Vec<f32> {
    let (ad, noise) = (act.ad, act.noise);
    let mut y = p.forward(x, t);
    if let Some((i, l)) = ad.get(&p.name) {
        let pp = parts(ad, noise, p, l, x, t);
        match &l.magnitude {
            None => y.iter_mut().zip(&pp.lora).for_each(|(a, b)| *a += b),
            Some(m) => {
                let n = act.norms[i]
                    .as_ref()
                    .expect("norms are computed for every DoRA adapter");
                let f: Vec<f32> = m.iter().zip(n).map(|(m, n)| m / n).collect();
                let base_d = if dropout_active(ad, noise) {
                    let mut b = vec![0f32; t * l.d_out];
                    ops::linear(&pp.xd, t, &p.base, &mut b);
                    b
                } else {
                    // y - bias = x·Wᵀ
                    let mut b = y.clone();
                    if let Some(bias) = &p.bias {
                        b.chunks_mut(l.d_out)
                            .for_each(|r| r.iter_mut().zip(bias).for_each(|(v, c)| *v -= c));
                    }
                    b
                };
                for (row, (bd, lr)) in y
                    .chunks_mut(l.d_out)
                    .zip(base_d.chunks(l.d_out).zip(pp.lora.chunks(l.d_out)))
                {
                    for o in 0..l.d_out {
                        row[o] += (f[o] - 1.0) * bd[o] + f[o] * lr[o];
                    }
                }
            }
        }
    }
    y
}

/// x [t, k] · Wᵀ for W [n, k] row-major.
fn matmul_t(x: &[f32], t: usize, w: &[f32], n: usize, k: usize) -> Vec<f32> {
    let mut y = vec![0f32; t * n];
    ops::linear(x, t, &qlora_engine::Weight::from_f32(n, k, w), &mut y);
    y
}

/// Backward of `proj_forward`: returns dx; accumulates the adapter's dA, dB (and DoRA's dm).
fn proj_backward(
    p: &Projection,
    act: &Active,
    x: &[f32],
    t: usize,
    dy: &[f32],
    g: &mut Grads,
) -> Vec<f32> {
    let (ad, noise) = (act.ad, act.noise);
    let Some((i, l)) = ad.get(&p.name) else {
        return bw::linear_backward_input(dy, t, &p.base);
    };
    let pp = parts(ad, noise, p, l, x, t);
    let drop = dropout_active(ad, noise);
    // The gradient reaching the LoRA branch, and the base's own input gradient.
    let (dy_lora, mut dx, dxd_base) = match &l.magnitude {
        None => (dy.to_vec(), bw::linear_backward_input(dy, t, &p.base), None),
        Some(m) => {
            let n = act.norms[i]
                .as_ref()
                .expect("norms are computed for every DoRA adapter");
            let f: Vec<f32> = m.iter().zip(n).map(|(m, n)| m / n).collect();
            let scaled: Vec<f32> = dy
                .chunks(l.d_out)
                .flat_map(|r| r.iter().zip(&f).map(|(d, f)| d * f))
                .collect();
            // dm = Σ_t dy ⊙ (xd·Wᵀ + s·B A xd) / n
            let mut base_d = vec![0f32; t * l.d_out];
            ops::linear(&pp.xd, t, &p.base, &mut base_d);
            for (o, gm) in g.m[i].iter_mut().enumerate() {
                let mut acc = 0f64;
                for tt in 0..t {
                    let k = tt * l.d_out + o;
                    acc += dy[k] as f64 * (base_d[k] + pp.lora[k]) as f64;
                }
                *gm += (acc / n[o] as f64) as f32;
            }
            if drop {
                // x·Wᵀ passes dy; xd·Wᵀ passes (f − 1) ⊙ dy through the dropout.
                let fm1: Vec<f32> = dy
                    .chunks(l.d_out)
                    .flat_map(|r| r.iter().zip(&f).map(|(d, f)| d * (f - 1.0)))
                    .collect();
                (
                    scaled,
                    bw::linear_backward_input(dy, t, &p.base),
                    Some(bw::linear_backward_input(&fm1, t, &p.base)),
                )
            } else {
                let dx = bw::linear_backward_input(&scaled, t, &p.base);
                (scaled, dx, None)
            }
        }
    };
    // dB = s · dy'ᵀ h ; dh = s · dy' B ; dA = dhᵀ xd ; dxd = dh A
    let db = bw::matmul_at_b(&dy_lora, &pp.h, t, l.d_out, l.rank);
    g.b[i]
        .iter_mut()
        .zip(&db)
        .for_each(|(a, b)| *a += l.scaling * b);
    let mut dh = bw::linear_backward_input(
        &dy_lora,
        t,
        &qlora_engine::Weight::from_f32(l.d_out, l.rank, &l.b),
    );
    dh.iter_mut().for_each(|v| *v *= l.scaling);
    let da = bw::matmul_at_b(&dh, &pp.xd, t, l.rank, l.d_in);
    g.a[i].iter_mut().zip(&da).for_each(|(a, b)| *a += b);
    let mut dxd = bw::linear_backward_input(
        &dh,
        t,
        &qlora_engine::Weight::from_f32(l.rank, l.d_in, &l.a),
    );
    if let Some(extra) = dxd_base {
        dxd.iter_mut().zip(&extra).for_each(|(a, b)| *a += b);
    }
    match noise {
        Some(n) if drop => {
            let scale = 1.0 / (1.0 - ad.dropout);
            let ms = module_seed(n.seed, &p.name);
            for (j, (o, v)) in dx.iter_mut().zip(&dxd).enumerate() {
                if uniform(ms, j) >= ad.dropout {
                    *o += v * scale;
                }
            }
        }
        _ => dx.iter_mut().zip(&dxd).for_each(|(a, b)| *a += b),
    }
    dx
}

/// A layer's intermediates: kept from the forward, or recomputed from its input.
struct Saved {
    h1: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attn: Vec<f32>,
    x2: Vec<f32>,
    h2: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    act: Vec<f32>,
}

impl Saved {
    /// f32 values held per layer for `t` tokens.
    fn floats(cfg: &qlora_io::ModelConfig, t: usize) -> usize {
        let (q, kv, d, f) = (
            cfg.num_attention_heads * cfg.head_dim(),
            cfg.num_kv_heads() * cfg.head_dim(),
            cfg.hidden_size,
            cfg.intermediate_size,
        );
        t * (3 * d + 2 * q + 2 * kv + 3 * f)
    }
}

struct Ctx<'a> {
    model: &'a Model,
    act: Active<'a>,
    t: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
    /// Token ranges of the packed sequences; attention never crosses them.
    segments: Vec<std::ops::Range<usize>>,
}

impl Ctx<'_> {
    /// Causal attention within each packed sequence.
    fn attention(&self, q: &[f32], k: &[f32], v: &[f32]) -> Vec<f32> {
        let cfg = &self.model.config;
        let (heads, kv, hd) = (cfg.num_attention_heads, cfg.num_kv_heads(), cfg.head_dim());
        let mut out = vec![0f32; self.t * heads * hd];
        for r in &self.segments {
            let (qa, ka) = (heads * hd, kv * hd);
            ops::attention(
                &q[r.start * qa..r.end * qa],
                &k[r.start * ka..r.end * ka],
                &v[r.start * ka..r.end * ka],
                r.len(),
                0,
                heads,
                kv,
                hd,
                cfg.attention_window(),
                &mut out[r.start * qa..r.end * qa],
            );
        }
        out
    }

    fn attention_backward(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        dout: &[f32],
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let cfg = &self.model.config;
        let (heads, kv, hd) = (cfg.num_attention_heads, cfg.num_kv_heads(), cfg.head_dim());
        let (qa, ka) = (heads * hd, kv * hd);
        let (mut dq, mut dk, mut dv) = (
            vec![0f32; q.len()],
            vec![0f32; k.len()],
            vec![0f32; v.len()],
        );
        for r in &self.segments {
            let (a, b, c) = bw::attention_backward(
                &q[r.start * qa..r.end * qa],
                &k[r.start * ka..r.end * ka],
                &v[r.start * ka..r.end * ka],
                &dout[r.start * qa..r.end * qa],
                r.len(),
                heads,
                kv,
                hd,
                cfg.attention_window(),
            );
            dq[r.start * qa..r.end * qa].copy_from_slice(&a);
            dk[r.start * ka..r.end * ka].copy_from_slice(&b);
            dv[r.start * ka..r.end * ka].copy_from_slice(&c);
        }
        (dq, dk, dv)
    }

    /// The layer's output and what its backward needs.
    fn layer(&self, l: &Layer, x: &[f32]) -> (Vec<f32>, Saved) {
        let s = self.layer_saved(l, x);
        let t = self.t;
        let down = proj_forward(&l.down_proj, &self.act, &s.act, t);
        let mut out = s.x2.clone();
        ops::add_in_place(&mut out, &down);
        (out, s)
    }

    /// The layer up to the MLP's activation: everything its backward reads (the backward's
    /// recompute stops here; the down projection's output is not needed again).
    fn layer_saved(&self, l: &Layer, x: &[f32]) -> Saved {
        let cfg = &self.model.config;
        let (heads, kv, hd) = (cfg.num_attention_heads, cfg.num_kv_heads(), cfg.head_dim());
        let eps = cfg.rms_norm_eps as f32;
        let t = self.t;
        let mut h1 = vec![0f32; x.len()];
        ops::rms_norm(x, &l.input_layernorm, eps, &mut h1);
        let mut q = proj_forward(&l.q_proj, &self.act, &h1, t);
        let mut k = proj_forward(&l.k_proj, &self.act, &h1, t);
        let v = proj_forward(&l.v_proj, &self.act, &h1, t);
        ops::rope(&mut q, heads, hd, &self.cos, &self.sin);
        ops::rope(&mut k, kv, hd, &self.cos, &self.sin);
        let attn = self.attention(&q, &k, &v);
        let o = proj_forward(&l.o_proj, &self.act, &attn, t);
        let mut x2 = x.to_vec();
        ops::add_in_place(&mut x2, &o);
        let mut h2 = vec![0f32; x.len()];
        ops::rms_norm(&x2, &l.post_attention_layernorm, eps, &mut h2);
        let gate = proj_forward(&l.gate_proj, &self.act, &h2, t);
        let up = proj_forward(&l.up_proj, &self.act, &h2, t);
        let mut act = gate.clone();
        ops::swiglu(&mut act, &up);
        Saved {
            h1,
            q,
            k,
            v,
            attn,
            x2,
            h2,
            gate,
            up,
            act,
        }
    }

    /// `saved`: the forward's intermediates when they were kept, else they are recomputed
    /// from `x` (the same arithmetic, so the same bits).
    fn layer_backward(
        &self,
        l: &Layer,
        x: &[f32],
        saved: Option<Saved>,
        dout: &[f32],
        g: &mut Grads,
    ) -> Vec<f32> {
        let cfg = &self.model.config;
        let (heads, kv, hd) = (cfg.num_attention_heads, cfg.num_kv_heads(), cfg.head_dim());
        let eps = cfg.rms_norm_eps as f32;
        let t = self.t;
        let s = saved.unwrap_or_else(|| self.layer_saved(l, x));
        let dact = proj_backward(&l.down_proj, &self.act, &s.act, t, dout, g);
        let (dgate, dup) = bw::swiglu_backward(&s.gate, &s.up, &dact);
        let mut dh2 = proj_backward(&l.gate_proj, &self.act, &s.h2, t, &dgate, g);
        let dh2u = proj_backward(&l.up_proj, &self.act, &s.h2, t, &dup, g);
        ops::add_in_place(&mut dh2, &dh2u);
        let mut dx2 = dout.to_vec();
        ops::add_in_place(
            &mut dx2,
            &bw::rms_norm_backward(&s.x2, &l.post_attention_layernorm, eps, &dh2),
        );
        let dattn = proj_backward(&l.o_proj, &self.act, &s.attn, t, &dx2, g);
        let (mut dq, mut dk, dv) = self.attention_backward(&s.q, &s.k, &s.v, &dattn);
        bw::rope_backward(&mut dq, heads, hd, &self.cos, &self.sin);
        bw::rope_backward(&mut dk, kv, hd, &self.cos, &self.sin);
        let mut dh1 = proj_backward(&l.q_proj, &self.act, &s.h1, t, &dq, g);
        ops::add_in_place(
            &mut dh1,
            &proj_backward(&l.k_proj, &self.act, &s.h1, t, &dk, g),
        );
        ops::add_in_place(
            &mut dh1,
            &proj_backward(&l.v_proj, &self.act, &s.h1, t, &dv, g),
        );
        let mut dx = dx2;
        ops::add_in_place(
            &mut dx,
            &bw::rms_norm_backward(x, &l.input_layernorm, eps, &dh1),
        );
        dx
    }
}

/// Σ of the token losses of one sequence, the number of predicted tokens, and (when `grads`
/// is given) the gradients of Σ loss / `norm` added into `grads`.
/// `ids` [t]; `labels[i]` is the id to predict at position i (the next token) or `None`.
pub fn sequence_loss(
    model: &Model,
    ad: &Adapters,
    noise: Option<Noise>,
    ids: &[u32],
    labels: &[Option<u32>],
    norm: f32,
    grads: Option<&mut Grads>,
) -> (f64, usize) {
    packed_loss(
        model,
        ad,
        noise,
        &[(ids, labels)],
        norm,
        grads,
        KEEP_ACTIVATIONS_BYTES,
    )
}

/// `packed_loss`'s default budget for keeping activations: 512 MiB (SmolLM2-135M holds 0.9 MB
/// a token, so it keeps micro-batches of up to about 560 tokens; Mistral-7B, 8.4 MB a token,
/// recomputes beyond about 60).
pub const KEEP_ACTIVATIONS_BYTES: usize = 512 << 20;

/// `sequence_loss` of several sequences packed into one pass: the projections run once over
/// all their tokens (one widening of each weight for the whole micro-batch), attention and RoPE
/// positions stay within each sequence, so the result is that of running them one by one.
/// With gradients, every layer's intermediates are kept for the backward when they take at
/// most `keep_activations_bytes`; otherwise each layer is recomputed from its saved input.
/// Either way the arithmetic, and so the result, is the same.
pub fn packed_loss(
    model: &Model,
    ad: &Adapters,
    noise: Option<Noise>,
    seqs: &[(&[u32], &[Option<u32>])],
    norm: f32,
    grads: Option<&mut Grads>,
    keep_activations_bytes: usize,
) -> (f64, usize) {
    let ids: Vec<u32> = seqs.iter().flat_map(|(i, _)| i.iter().copied()).collect();
    let labels: Vec<Option<u32>> = seqs.iter().flat_map(|(_, l)| l.iter().copied()).collect();
    let (ids, labels) = (&ids[..], &labels[..]);
    let t = ids.len();
    let cfg = &model.config;
    let d = cfg.hidden_size;
    let table = RopeTable {
        inv_freq: model.inv_freq.clone(),
    };
    let (mut cos, mut sin) = (Vec::new(), Vec::new());
    let mut segments = Vec::new();
    for (s, _) in seqs {
        let (c, si) = table.cos_sin(0..s.len());
        cos.extend(c);
        sin.extend(si);
        let start = segments
            .last()
            .map_or(0, |r: &std::ops::Range<usize>| r.end);
        segments.push(start..start + s.len());
    }
    let ctx = Ctx {
        model,
        act: Active::new(model, ad, noise),
        t,
        cos,
        sin,
        segments,
    };
    let mut x = vec![0f32; t * d];
    ops::embedding(ids, &model.embed_tokens, &mut x);
    // Keep every layer's intermediates when they fit the budget (no recompute in the
    // backward); else keep each layer's input only and recompute the rest, layer by layer.
    let keep =
        grads.is_some() && model.layers.len() * Saved::floats(cfg, t) * 4 <= keep_activations_bytes;
    let mut inputs = Vec::with_capacity(model.layers.len());
    let mut saved: Vec<Option<Saved>> = Vec::with_capacity(model.layers.len());
    for l in &model.layers {
        let (out, s) = ctx.layer(l, &x);
        saved.push(keep.then_some(s));
        inputs.push(std::mem::replace(&mut x, out));
    }
    let mut h = vec![0f32; t * d];
    ops::rms_norm(&x, &model.norm, cfg.rms_norm_eps as f32, &mut h);
    let logits = proj_forward(&model.lm_head, &ctx.act, &h, t);
    let v = model.lm_head.d_out();
    let (loss, n, mut dlogits) = bw::cross_entropy(&logits, v, labels);
    drop(logits);
    let Some(g) = grads else {
        return (loss, n);
    };
    dlogits.iter_mut().for_each(|x| *x /= norm);
    let dh = proj_backward(&model.lm_head, &ctx.act, &h, t, &dlogits, g);
    drop(dlogits);
    let mut dx = bw::rms_norm_backward(&x, &model.norm, cfg.rms_norm_eps as f32, &dh);
    for ((l, xin), s) in model.layers.iter().zip(&inputs).zip(saved).rev() {
        dx = ctx.layer_backward(l, xin, s, &dx, g);
    }
    (loss, n)
}

#[cfg(test)]
mod dropout_tests {
    use super::*;

    #[test]
    fn the_vector_mask_is_the_scalar_one() {
        let x: Vec<f32> = (0..40_000).map(|i| (i % 97) as f32 * 0.25 - 3.0).collect();
        let ms = module_seed(77, "model.layers.3.self_attn.q_proj");
        let (p, scale) = (0.1f32, 1.0 / 0.9f32);
        let want: Vec<f32> = x
            .iter()
            .enumerate()
            .map(|(i, v)| if uniform(ms, i) >= p { v * scale } else { 0.0 })
            .collect();
        let mut got = vec![0f32; x.len()];
        for (c, (o, xs)) in got
            .chunks_mut(DROPOUT_CHUNK)
            .zip(x.chunks(DROPOUT_CHUNK))
            .enumerate()
        {
            dropout_chunk(ms, c * DROPOUT_CHUNK, p, scale, xs, o);
        }
        let bad = got
            .iter()
            .zip(&want)
            .position(|(a, b)| a.to_bits() != b.to_bits());
        assert_eq!(bad, None, "first difference at {bad:?}");
    }
}
