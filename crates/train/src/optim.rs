//! AdamW exactly as PyTorch's single-tensor implementation (decoupled weight decay), learning-rate
//! schedules as transformers' `get_*_schedule_with_warmup`, and global-norm gradient clipping.

use crate::grad::{Adapters, Grads};

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Schedule {
    Constant,
    Linear,
    Cosine,
}

impl Schedule {
    /// The multiplier of the base learning rate at optimizer step `step` (0-based) of `total`.
    pub fn factor(self, step: usize, warmup: usize, total: usize) -> f64 {
        if step < warmup {
            return step as f64 / warmup.max(1) as f64;
        }
        let progress = (step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
        match self {
            Schedule::Constant => 1.0,
            Schedule::Linear => (1.0 - progress).max(0.0),
            Schedule::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
        }
    }
}

/// AdamW state for every adapter tensor.
#[derive(Debug, Clone)]
pub struct AdamW {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    pub step: u64,
    pub m: Grads,
    pub v: Grads,
}

impl AdamW {
    pub fn new(ad: &Adapters, weight_decay: f32) -> Self {
        AdamW {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
            step: 0,
            m: ad.zero_grads(),
            v: ad.zero_grads(),
        }
    }

    /// One update with learning rate `lr` (PyTorch `_single_tensor_adamw`):
    /// p ← p·(1 − lr·wd); m ← lerp(m, g, 1 − β1); v ← β2·v + (1 − β2)·g²;
    /// p ← p − lr/(1 − β1ᵗ) · m / (√v / √(1 − β2ᵗ) + eps).
    pub fn update(&mut self, ad: &mut Adapters, g: &Grads, lr: f32) {
        self.step += 1;
        let bc1 = 1.0 - (self.beta1 as f64).powi(self.step as i32);
        let bc2 = 1.0 - (self.beta2 as f64).powi(self.step as i32);
        let step_size = (lr as f64 / bc1) as f32;
        let bc2_sqrt = bc2.sqrt() as f32;
        let (b1, b2, eps, wd) = (self.beta1, self.beta2, self.eps, self.weight_decay);
        for (i, p) in ad.params.iter_mut().enumerate() {
            let mut tensors = vec![
                (&mut p.a, &g.a[i], &mut self.m.a[i], &mut self.v.a[i]),
                (&mut p.b, &g.b[i], &mut self.m.b[i], &mut self.v.b[i]),
            ];
            if let Some(mag) = p.magnitude.as_mut() {
                tensors.push((mag, &g.m[i], &mut self.m.m[i], &mut self.v.m[i]));
            }
            for (param, grad, m, v) in tensors {
                for j in 0..param.len() {
                    param[j] *= 1.0 - lr * wd;
                    m[j] += (grad[j] - m[j]) * (1.0 - b1);
                    v[j] = v[j] * b2 + (1.0 - b2) * grad[j] * grad[j];
                    let denom = v[j].sqrt() / bc2_sqrt + eps;
                    param[j] -= step_size * (m[j] / denom);
                }
            }
        }
    }
}

/// The global L2 norm of the gradients; scales them down to `max_norm` when above it
/// (`torch.nn.utils.clip_grad_norm_`: coefficient max_norm / (norm + 1e-6), clamped to 1).
pub fn clip_grad_norm(g: &mut Grads, max_norm: Option<f32>) -> f32 {
    let sq: f64 =
        g.a.iter()
            .chain(&g.b)
            .flat_map(|v| v.iter())
            .map(|x| (*x as f64) * (*x as f64))
            .sum();
    let norm = sq.sqrt() as f32;
    if let Some(mx) = max_norm {
        let coef = (mx / (norm + 1e-6)).min(1.0);
        if coef < 1.0 {
            g.a.iter_mut()
                .chain(g.b.iter_mut())
                .chain(g.m.iter_mut())
                .flat_map(|v| v.iter_mut())
                .for_each(|x| *x *= coef);
        }
    }
    norm
}
