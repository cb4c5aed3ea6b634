//! The forward pass: embeddings → layers (RMSNorm, GQA attention with RoPE and an optional
//! sliding window, SwiGLU MLP) → final norm → head, with a KV cache for decoding.

use crate::model::{Layer, Model, Projection};
use crate::{Error, Result};
use qlora_engine::ops::{self, RopeTable};

/// Keys and values of every layer for the positions seen so far.
pub struct KvCache {
    /// per layer: [n_ctx, kv, hd]
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    len: usize,
}

impl KvCache {
    pub fn new(model: &Model) -> Self {
        let n = model.layers.len();
        KvCache {
            k: vec![Vec::new(); n],
            v: vec![Vec::new(); n],
            len: 0,
        }
    }
    /// Positions already in the cache.
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Which positions get logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    All,
    Last,
}

impl Model {
    fn check_ids(&self, ids: &[u32]) -> Result<()> {
        let vocab = self.vocab_size();
        match ids.iter().find(|&&id| id as usize >= vocab) {
            Some(&id) => Err(Error::TokenOutOfRange { id, vocab }),
            None => Ok(()),
        }
    }

    /// Runs `ids` at positions `cache.len() ..`, appending to the cache.
    /// # Shapes
    /// ids [t] → logits [t, v] (All) or [1, v] (Last)
    pub fn forward(&self, ids: &[u32], cache: &mut KvCache, which: Logits) -> Result<Vec<f32>> {
        // Run on a pool worker: the ~12 parallel ops per layer then fork from inside the pool
        // instead of each waking a worker and parking the calling thread (which dominated
        // small-model decode).
        rayon::scope(|_| self.forward_on_worker(ids, cache, which))
    }

    fn forward_on_worker(
        &self,
        ids: &[u32],
        cache: &mut KvCache,
        which: Logits,
    ) -> Result<Vec<f32>> {
        self.check_ids(ids)?;
        let t = ids.len();
        if t == 0 {
            return Ok(Vec::new());
        }
        let d = self.config.hidden_size;
        let pos0 = cache.len;
        let table = RopeTable {
            inv_freq: self.inv_freq.clone(),
        };
        let (cos, sin) = table.cos_sin(pos0..pos0 + t);
        let mut x = vec![0f32; t * d];
        ops::embedding(ids, &self.embed_tokens, &mut x);
        self.add_embedding_adapters(ids, &mut x);
        for (i, layer) in self.layers.iter().enumerate() {
            self.layer_forward(
                layer,
                &mut x,
                t,
                pos0,
                &cos,
                &sin,
                &mut cache.k[i],
                &mut cache.v[i],
            );
        }
        cache.len += t;
        let rows = match which {
            Logits::All => &x[..],
            Logits::Last => &x[(t - 1) * d..],
        };
        let n = rows.len() / d;
        let mut h = vec![0f32; rows.len()];
        ops::rms_norm(rows, &self.norm, self.config.rms_norm_eps as f32, &mut h);
        Ok(self.lm_head.forward(&h, n))
    }

    /// One decoder layer, in place on the residual stream x.
    /// # Shapes
    /// x [t, d]; k/v cache [pos0 + t, kv, hd] after the call
    #[allow(clippy::too_many_arguments)]
    fn layer_forward(
        &self,
        l: &Layer,
        x: &mut [f32],
        t: usize,
        pos0: usize,
        cos: &[f32],
        sin: &[f32],
        k_cache: &mut Vec<f32>,
        v_cache: &mut Vec<f32>,
    ) {
        let cfg = &self.config;
        let (heads, kv, hd) = (cfg.num_attention_heads, cfg.num_kv_heads(), cfg.head_dim());
        let eps = cfg.rms_norm_eps as f32;
        let mut h = vec![0f32; x.len()];
        ops::rms_norm(x, &l.input_layernorm, eps, &mut h);
        let [mut q, mut k, v] = Projection::forward_many([&l.q_proj, &l.k_proj, &l.v_proj], &h, t);
        ops::rope(&mut q, heads, hd, cos, sin);
        ops::rope(&mut k, kv, hd, cos, sin);
        k_cache.extend_from_slice(&k);
        v_cache.extend_from_slice(&v);
        let mut attn = vec![0f32; t * heads * hd];
        ops::attention(
            &q,
            k_cache,
            v_cache,
            t,
            pos0,
            heads,
            kv,
            hd,
            cfg.attention_window(),
            &mut attn,
        );
        let o = l.o_proj.forward(&attn, t);
        ops::add_in_place(x, &o);
        ops::rms_norm(x, &l.post_attention_layernorm, eps, &mut h);
        let [mut gate, up] = Projection::forward_many([&l.gate_proj, &l.up_proj], &h, t);
        ops::swiglu(&mut gate, &up);
        let down = l.down_proj.forward(&gate, t);
        ops::add_in_place(x, &down);
    }
}

/// One sequence of a batched forward: its model (every model of a batch shares one base;
/// their adapters may differ), its new ids, its cache, and which logits it wants (None: none,
/// for a prefill chunk that is not the prompt's last).
pub struct BatchSeq<'a> {
    pub model: &'a Model,
    pub ids: &'a [u32],
    pub cache: &'a mut KvCache,
    pub logits: Option<Logits>,
}

impl Model {
    /// Whether any adapter is on the model (a projection's, or an embedding adapter).
    pub fn has_adapters(&self) -> bool {
        self.layers
            .iter()
            .flat_map(|l| l.projections())
            .chain(std::iter::once(&self.lm_head))
            .any(|p| !p.lora.is_empty())
            || !self.embed_lora.is_empty()
    }

    /// Whether `other` has this model's base (its weights are the same stored bytes): a clone
    /// that may carry other adapters.
    pub fn shares_base(&self, other: &Model) -> bool {
        self.config.hidden_size == other.config.hidden_size
            && self.layers.len() == other.layers.len()
            && self.embed_tokens.shares_bytes(&other.embed_tokens)
            && self.lm_head.base.shares_bytes(&other.lm_head.base)
            && self.layers.iter().zip(&other.layers).all(|(a, b)| {
                a.q_proj.base.shares_bytes(&b.q_proj.base)
                    && a.down_proj.base.shares_bytes(&b.down_proj.base)
            })
    }

    /// Several sequences in one pass: the base's matrix products over all their tokens at once
    /// (each weight read once a step), then each run of consecutive sequences with the same
    /// model adds its adapters on its rows (the adapter math grouped per adapter), and each
    /// sequence's RoPE and attention over its own cache. A sequence's result is what
    /// `forward` gives it alone, up to the summation order of the base products (which
    /// depends on the row count). Returns each sequence's logits ([t, v], [1, v] or empty).
    /// Every check runs before any cache changes, so an error leaves the caches as they were.
    pub fn forward_batch(seqs: &mut [BatchSeq]) -> Result<Vec<Vec<f32>>> {
        let Some(first) = seqs.first() else {
            return Ok(Vec::new());
        };
        let base = first.model;
        for s in seqs.iter() {
            if !std::ptr::eq(s.model, base) && !base.shares_base(s.model) {
                return Err(Error::Invalid(
                    "a batch mixes models with different bases".into(),
                ));
            }
            s.model.check_ids(s.ids)?;
        }
        rayon::scope(|_| base.forward_batch_on_worker(seqs))
    }

    fn forward_batch_on_worker(&self, seqs: &mut [BatchSeq]) -> Result<Vec<Vec<f32>>> {
        let cfg = &self.config;
        let d = cfg.hidden_size;
        let (heads, kv, hd) = (cfg.num_attention_heads, cfg.num_kv_heads(), cfg.head_dim());
        let eps = cfg.rms_norm_eps as f32;
        // Row ranges, and runs of consecutive sequences with one model (adapter groups).
        let mut starts = Vec::with_capacity(seqs.len() + 1);
        let mut total = 0;
        for s in seqs.iter() {
            starts.push(total);
            total += s.ids.len();
        }
        starts.push(total);
        let mut groups: Vec<(&Model, usize, usize)> = Vec::new();
        for (i, s) in seqs.iter().enumerate() {
            match groups.last_mut() {
                Some(g) if std::ptr::eq(g.0, s.model) => g.2 = starts[i + 1],
                _ => groups.push((s.model, starts[i], starts[i + 1])),
            }
        }
        if total == 0 {
            return Ok(seqs.iter().map(|_| Vec::new()).collect());
        }
        let table = RopeTable {
            inv_freq: self.inv_freq.clone(),
        };
        let ropes: Vec<(Vec<f32>, Vec<f32>)> = seqs
            .iter()
            .map(|s| table.cos_sin(s.cache.len..s.cache.len + s.ids.len()))
            .collect();
        let ids: Vec<u32> = seqs.iter().flat_map(|s| s.ids.iter().copied()).collect();
        let mut x = vec![0f32; total * d];
        ops::embedding(&ids, &self.embed_tokens, &mut x);
        for &(m, r0, r1) in &groups {
            m.add_embedding_adapters(&ids[r0..r1], &mut x[r0 * d..r1 * d]);
        }
        // The base projections over every row, then each group's adapters on its rows.
        let project = |li: usize,
                       pick: &dyn Fn(&Layer) -> Vec<&Projection>,
                       h: &[f32]|
         -> Vec<Vec<f32>> {
            let ps = pick(&self.layers[li]);
            let d_in = ps[0].d_in();
            let mut ys: Vec<Vec<f32>> = ps.iter().map(|p| vec![0f32; total * p.d_out()]).collect();
            {
                let ws: Vec<&qlora_engine::Weight> = ps.iter().map(|p| &p.base).collect();
                let mut outs: Vec<&mut [f32]> = ys.iter_mut().map(|y| y.as_mut_slice()).collect();
                ops::linear_many(h, total, &ws, &mut outs);
            }
            for (p, y) in ps.iter().zip(ys.iter_mut()) {
                p.add_bias(y);
            }
            for &(m, r0, r1) in &groups {
                let mps = pick(&m.layers[li]);
                for (p, y) in mps.iter().zip(ys.iter_mut()) {
                    if !p.lora.is_empty() {
                        let o = p.d_out();
                        p.add_adapters(&h[r0 * d_in..r1 * d_in], r1 - r0, &mut y[r0 * o..r1 * o]);
                    }
                }
            }
            ys
        };
        let mut h = vec![0f32; total * d];
        for li in 0..self.layers.len() {
            let l = &self.layers[li];
            ops::rms_norm(&x, &l.input_layernorm, eps, &mut h);
            let mut qkv = project(li, &|l: &Layer| vec![&l.q_proj, &l.k_proj, &l.v_proj], &h);
            let v = qkv.pop().expect("v");
            let mut k = qkv.pop().expect("k");
            let mut q = qkv.pop().expect("q");
            let mut attn = vec![0f32; total * heads * hd];
            for (i, s) in seqs.iter_mut().enumerate() {
                let (r0, r1) = (starts[i], starts[i + 1]);
                if r0 == r1 {
                    continue;
                }
                let (cos, sin) = &ropes[i];
                let qs = &mut q[r0 * heads * hd..r1 * heads * hd];
                let ks = &mut k[r0 * kv * hd..r1 * kv * hd];
                ops::rope(qs, heads, hd, cos, sin);
                ops::rope(ks, kv, hd, cos, sin);
                s.cache.k[li].extend_from_slice(ks);
                s.cache.v[li].extend_from_slice(&v[r0 * kv * hd..r1 * kv * hd]);
                ops::attention(
                    qs,
                    &s.cache.k[li],
                    &s.cache.v[li],
                    r1 - r0,
                    s.cache.len,
                    heads,
                    kv,
                    hd,
                    cfg.attention_window(),
                    &mut attn[r0 * heads * hd..r1 * heads * hd],
                );
            }
            let o = project(li, &|l: &Layer| vec![&l.o_proj], &attn)
                .pop()
                .expect("o");
            ops::add_in_place(&mut x, &o);
            ops::rms_norm(&x, &l.post_attention_layernorm, eps, &mut h);
            let mut gu = project(li, &|l: &Layer| vec![&l.gate_proj, &l.up_proj], &h);
            let up = gu.pop().expect("up");
            let mut gate = gu.pop().expect("gate");
            ops::swiglu(&mut gate, &up);
            let down = project(li, &|l: &Layer| vec![&l.down_proj], &gate)
                .pop()
                .expect("down");
            ops::add_in_place(&mut x, &down);
        }
        for s in seqs.iter_mut() {
            s.cache.len += s.ids.len();
        }
        // The rows that get logits, normed, through the head (base, then each group's
        // adapters on its rows of the gathered set).
        let mut rows: Vec<usize> = Vec::new();
        let mut spans = Vec::with_capacity(seqs.len());
        for (i, s) in seqs.iter().enumerate() {
            let (r0, r1) = (starts[i], starts[i + 1]);
            let g0 = rows.len();
            match s.logits {
                _ if r0 == r1 => {}
                None => {}
                Some(Logits::All) => rows.extend(r0..r1),
                Some(Logits::Last) => rows.push(r1 - 1),
            }
            spans.push((g0, rows.len()));
        }
        let n = rows.len();
        let mut g = vec![0f32; n * d];
        for (j, &r) in rows.iter().enumerate() {
            g[j * d..(j + 1) * d].copy_from_slice(&x[r * d..(r + 1) * d]);
        }
        let mut hn = vec![0f32; n * d];
        ops::rms_norm(&g, &self.norm, eps, &mut hn);
        let vocab = self.vocab_size();
        let mut logits = vec![0f32; n * vocab];
        if n > 0 {
            ops::linear(&hn, n, &self.lm_head.base, &mut logits);
            self.lm_head.add_bias(&mut logits);
            for (i, s) in seqs.iter().enumerate() {
                let (g0, g1) = spans[i];
                if g1 > g0 && !s.model.lm_head.lora.is_empty() {
                    s.model.lm_head.add_adapters(
                        &hn[g0 * d..g1 * d],
                        g1 - g0,
                        &mut logits[g0 * vocab..g1 * vocab],
                    );
                }
            }
        }
        Ok(spans
            .iter()
            .map(|&(g0, g1)| logits[g0 * vocab..g1 * vocab].to_vec())
            .collect())
    }
}

impl Model {
    /// Σ −log p(ids[i] | ids[..i]) over i ≥ 1 from one fresh forward pass, and the number of
    /// predictions (the quantity behind transformers' `labels=ids` loss and perplexity).
    pub fn nll(&self, ids: &[u32]) -> Result<(f64, usize)> {
        let mut cache = KvCache::new(self);
        let logits = self.forward(ids, &mut cache, Logits::All)?;
        Ok(crate::decoder::nll_of(&logits, ids, self.vocab_size()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synthetic::{synthetic_config, synthetic_model, SyntheticBase};

    /// The base and a clone sharing its weights with a rank-4 adapter on all seven projections.
    fn models() -> (Model, Model) {
        let mut cfg = synthetic_config("smollm2-135m").unwrap();
        cfg.num_hidden_layers = 2;
        let kind = SyntheticBase::Bnb4Quantized(qlora_quant::Quant4::Nf4);
        let base = synthetic_model(cfg.clone(), kind, None, 3).unwrap();
        let with = synthetic_model(cfg, kind, Some(4), 3).unwrap();
        let mut ad = base.clone();
        for (l, w) in ad.layers.iter_mut().zip(&with.layers) {
            l.q_proj.lora = w.q_proj.lora.clone();
            l.k_proj.lora = w.k_proj.lora.clone();
            l.v_proj.lora = w.v_proj.lora.clone();
            l.o_proj.lora = w.o_proj.lora.clone();
            l.gate_proj.lora = w.gate_proj.lora.clone();
            l.up_proj.lora = w.up_proj.lora.clone();
            l.down_proj.lora = w.down_proj.lora.clone();
        }
        assert!(base.shares_base(&ad) && !base.shares_base(&with));
        (base, ad)
    }

    fn rel(a: &[f32], b: &[f32]) -> f32 {
        let m = b.iter().fold(0f32, |m, x| m.max(x.abs()));
        a.iter().zip(b).fold(0f32, |e, (x, y)| e.max((x - y).abs())) / m
    }

    /// Scoring one token a step (the decode kernels) gives the one-pass negative
    /// log-likelihood within rounding, with the same count, and leaves the decoder fresh.
    #[test]
    fn stepwise_nll_equals_the_one_pass_nll() {
        use crate::decoder::{CpuDecoder, Decoder};
        let (base, ad) = models();
        let ids = [3u32, 17, 250, 9, 9, 41, 7, 600, 2, 11];
        for m in [&base, &ad] {
            let mut d = CpuDecoder::new(m);
            let (one, n1) = d.nll(&ids).unwrap();
            let (step, n2) = d.nll_stepwise(&ids).unwrap();
            assert_eq!((n1, n2), (ids.len() - 1, ids.len() - 1));
            assert!((one - step).abs() <= 1e-4 * one.abs(), "{one} vs {step}");
            assert_eq!(
                d.nll_stepwise(&ids).unwrap().0,
                step,
                "a second run starts fresh"
            );
        }
    }

    #[test]
    fn a_batch_equals_each_sequence_alone() {
        let (base, ad) = models();
        let prompts: [(&Model, Vec<u32>, Logits); 3] = [
            (&base, vec![5, 9, 100, 7, 3], Logits::Last),
            (&ad, vec![11, 12, 13], Logits::All),
            (&base, vec![40, 41, 42, 43], Logits::All),
        ];
        // Alone.
        let mut alone_caches: Vec<KvCache> =
            prompts.iter().map(|(m, _, _)| KvCache::new(m)).collect();
        let alone: Vec<Vec<f32>> = prompts
            .iter()
            .zip(alone_caches.iter_mut())
            .map(|((m, ids, w), c)| m.forward(ids, c, *w).unwrap())
            .collect();
        // Batched prefill (12 rows: the GEMM path, so within rounding).
        let mut caches: Vec<KvCache> = prompts.iter().map(|(m, _, _)| KvCache::new(m)).collect();
        let mut batch: Vec<BatchSeq> = prompts
            .iter()
            .zip(caches.iter_mut())
            .map(|((m, ids, w), c)| BatchSeq {
                model: m,
                ids,
                cache: c,
                logits: Some(*w),
            })
            .collect();
        let got = Model::forward_batch(&mut batch).unwrap();
        for (g, w) in got.iter().zip(&alone) {
            assert_eq!(g.len(), w.len());
            assert!(rel(g, w) < 1e-5, "prefill: {}", rel(g, w));
        }
        // A decode step of all three, one without logits.
        let next = [[17u32], [18], [19]];
        let want: Vec<Vec<f32>> = prompts
            .iter()
            .zip(alone_caches.iter_mut())
            .zip(&next)
            .map(|(((m, _, _), c), n)| m.forward(n, c, Logits::Last).unwrap())
            .collect();
        let mut batch: Vec<BatchSeq> = prompts
            .iter()
            .zip(caches.iter_mut())
            .zip(&next)
            .enumerate()
            .map(|(i, (((m, _, _), c), n))| BatchSeq {
                model: m,
                ids: n,
                cache: c,
                logits: (i != 1).then_some(Logits::Last),
            })
            .collect();
        let got = Model::forward_batch(&mut batch).unwrap();
        assert!(got[1].is_empty());
        for i in [0, 2] {
            assert_eq!(got[i].len(), want[i].len());
            assert!(
                rel(&got[i], &want[i]) < 1e-5,
                "decode {i}: {}",
                rel(&got[i], &want[i])
            );
        }
        assert_eq!(caches[1].len(), 4);
        // Models with different bases do not batch.
        let (other, _) = models();
        let mut c1 = KvCache::new(&base);
        let mut c2 = KvCache::new(&other);
        let ids = [1u32];
        let e = Model::forward_batch(&mut [
            BatchSeq {
                model: &base,
                ids: &ids,
                cache: &mut c1,
                logits: Some(Logits::Last),
            },
            BatchSeq {
                model: &other,
                ids: &ids,
                cache: &mut c2,
                logits: Some(Logits::Last),
            },
        ])
        .unwrap_err();
        assert!(e.to_string().contains("different bases"), "{e}");
    }
}
