//! Why the tensor-core GEMVs miss the bf16 budget (GPU-NOTES.md run 25), on the CPU: the
//! logits of a synthetic Mistral-7B (2 layers, NF4, 40 tokens) with the NF4 code book rounded
//! to bf16, to f16, or split into two bf16 parts, and with the dequantized weights rounded to
//! bf16 (the dequantize-then-cuBLAS path), each against the exact f32 model. Everything else is
//! exact f32, so the figures isolate the weights' rounding.
//!
//!     cargo run --release -p qlora --example code_rounding
use qlora_engine::{Weight, WeightFormat};
use qlora_model::synthetic::{synthetic_config, synthetic_model, SyntheticBase};
use qlora_model::{CpuDecoder, Decoder, Logits, Model};
use std::sync::Arc;

fn bf(v: f32) -> f32 {
    half::bf16::from_f32(v).to_f32()
}

fn rel_norm(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt()
}

fn map_weights(m: &Model, f: &dyn Fn(&Weight) -> Weight) -> Model {
    let mut out = m.clone();
    for l in out.layers.iter_mut() {
        for p in l.projections_mut() {
            p.base = f(&p.base);
        }
    }
    out
}

fn main() {
    let mut cfg = synthetic_config("mistral-7b").unwrap();
    cfg.num_hidden_layers = 2;
    let toks: Vec<u32> = (0..40u32).map(|i| (i * 7919 + 1) % 32768).collect();
    let m = synthetic_model(
        cfg,
        SyntheticBase::Bnb4Quantized(qlora_quant::Quant4::Nf4),
        None,
        3,
    )
    .unwrap();
    let exact = CpuDecoder::new(&m).step(&toks, Logits::All).unwrap();
    let codes_bf16 = map_weights(&m, &|w| {
        let s = w.scales().unwrap();
        let WeightFormat::Bnb4(q) = w.format else {
            panic!()
        };
        let code = s.code.map(bf);
        let packed: qlora_engine::SharedBytes = Arc::new(w.bytes().to_vec());
        Weight::bnb4(
            q,
            code,
            s.blocksize,
            w.rows,
            w.cols,
            packed,
            s.values.clone(),
        )
        .unwrap()
    });
    let a = CpuDecoder::new(&codes_bf16)
        .step(&toks, Logits::All)
        .unwrap();
    println!("bf16(code)*absmax weights: {:.3e}", rel_norm(&a, &exact));
    let codes_f16 = map_weights(&m, &|w| {
        let s = w.scales().unwrap();
        let WeightFormat::Bnb4(q) = w.format else {
            panic!()
        };
        let code = s.code.map(|c| half::f16::from_f32(c).to_f32());
        let packed: qlora_engine::SharedBytes = Arc::new(w.bytes().to_vec());
        Weight::bnb4(
            q,
            code,
            s.blocksize,
            w.rows,
            w.cols,
            packed,
            s.values.clone(),
        )
        .unwrap()
    });
    let c = CpuDecoder::new(&codes_f16)
        .step(&toks, Logits::All)
        .unwrap();
    println!("f16(code)*absmax weights: {:.3e}", rel_norm(&c, &exact));
    let codes_hilo = map_weights(&m, &|w| {
        let s = w.scales().unwrap();
        let WeightFormat::Bnb4(q) = w.format else {
            panic!()
        };
        let code = s.code.map(|c| bf(c) + bf(c - bf(c)));
        let packed: qlora_engine::SharedBytes = Arc::new(w.bytes().to_vec());
        Weight::bnb4(
            q,
            code,
            s.blocksize,
            w.rows,
            w.cols,
            packed,
            s.values.clone(),
        )
        .unwrap()
    });
    let d = CpuDecoder::new(&codes_hilo)
        .step(&toks, Logits::All)
        .unwrap();
    println!(
        "(bf16 hi + bf16 lo)(code)*absmax weights: {:.3e}",
        rel_norm(&d, &exact)
    );
    let dense_bf16 = map_weights(&m, &|w| {
        let v: Vec<f32> = w.to_f32().iter().map(|&x| bf(x)).collect();
        Weight::from_f32(w.rows, w.cols, &v)
    });
    let b = CpuDecoder::new(&dense_bf16)
        .step(&toks, Logits::All)
        .unwrap();
    println!("bf16(code*absmax) weights: {:.3e}", rel_norm(&b, &exact));
}
