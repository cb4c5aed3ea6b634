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

impl Model {
    /// Σ −log p(ids[i] | ids[..i]) over i ≥ 1 from one fresh forward pass, and the number of
    /// predictions (the quantity behind transformers' `labels=ids` loss and perplexity).
    pub fn nll(&self, ids: &[u32]) -> Result<(f64, usize)> {
        let mut cache = KvCache::new(self);
        let logits = self.forward(ids, &mut cache, Logits::All)?;
        Ok(crate::decoder::nll_of(&logits, ids, self.vocab_size()))
    }
}
