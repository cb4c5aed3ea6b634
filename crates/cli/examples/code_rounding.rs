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

/// `m` with every decoder linear's base replaced by `f` of it.
fn map_weights(m: &Model, f: &dyn Fn(&Weight) -> Weight) -> Model {
    let mut out = m.clone();
    for l in out.layers.iter_mut() {
        for p in l.projections_mut() {
            p.base = f(&p.base);
        }
    }
    out
}

/// `m` with each NF4 code book entry c replaced by `round(c)` (the packed codes and absmax as
/// they are).
fn with_code_book(m: &Model, round: &dyn Fn(f32) -> f32) -> Model {
    map_weights(m, &|w| {
        let (WeightFormat::Bnb4(q), Some(s)) = (w.format, w.scales()) else {
            unreachable!("the synthetic model's linears are NF4")
        };
        let packed: qlora_engine::SharedBytes = Arc::new(w.bytes().to_vec());
        let code = s.code.map(round);
        Weight::bnb4(
            q,
            code,
            s.blocksize,
            w.rows,
            w.cols,
            packed,
            s.values.clone(),
        )
        .expect("the same layout as the weight it copies")
    })
}

fn main() {
    let mut cfg = synthetic_config("mistral-7b").expect("a known architecture");
    cfg.num_hidden_layers = 2;
    let toks: Vec<u32> = (0..40u32).map(|i| (i * 7919 + 1) % 32768).collect();
    let m = synthetic_model(
        cfg,
        SyntheticBase::Bnb4Quantized(qlora_quant::Quant4::Nf4),
        None,
        3,
    )
    .expect("a synthetic model");
    let logits = |m: &Model| {
        CpuDecoder::new(m)
            .step(&toks, Logits::All)
            .expect("a forward")
    };
    let exact = logits(&m);
    let dense_bf16 = |m: &Model| {
        map_weights(m, &|w| {
            let v: Vec<f32> = w.to_f32().iter().map(|&x| bf(x)).collect();
            Weight::from_f32(w.rows, w.cols, &v)
        })
    };
    let variants: [(&str, Model); 4] = [
        ("bf16(code)*absmax", with_code_book(&m, &bf)),
        (
            "f16(code)*absmax",
            with_code_book(&m, &|c| half::f16::from_f32(c).to_f32()),
        ),
        (
            "(bf16 hi + bf16 lo)(code)*absmax",
            with_code_book(&m, &|c| bf(c) + bf(c - bf(c))),
        ),
        ("bf16(code*absmax)", dense_bf16(&m)),
    ];
    for (name, v) in &variants {
        println!("{name} weights: {:.3e}", rel_norm(&logits(v), &exact));
    }
}
