//! How long one sampled token takes over a 32k vocabulary (temperature 0.7, no top-k/top-p,
//! and with top-p 0.95): `cargo run --release -p qlora-model --example sampler_speed`.
use qlora_model::{Sampler, SamplingParams};
use std::time::Instant;

fn main() {
    let mut st = 7u64;
    let logits: Vec<f32> = (0..32000)
        .map(|_| {
            st = st
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((st >> 40) as f32 / (1u64 << 24) as f32) * 8.0 - 4.0
        })
        .collect();
    for top_p in [1.0f32, 0.95] {
        let mut s = Sampler::new(SamplingParams {
            temperature: 0.7,
            top_p,
            seed: 1,
            ..Default::default()
        });
        let n = 200;
        let t = Instant::now();
        let mut acc = 0u64;
        for _ in 0..n {
            acc += s.sample(&logits, &[]) as u64;
        }
        let us = t.elapsed().as_secs_f64() / n as f64 * 1e6;
        println!(
            "vocab 32000, temperature 0.7, top_p {top_p}: {us:.0} µs a token (checksum {acc})"
        );
    }
}
