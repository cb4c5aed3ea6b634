//! Training against PyTorch + PEFT (tools/reference/make_training_reference.py): from the same
//! initial adapter and batches, the step-0 loss and every adapter gradient within 1e-5 relative,
//! and 10 AdamW steps (with clipping) whose losses stay within 1e-3 relative, on a dense, an
//! NF4 (double quant) and a GPTQ base.

mod common;
use common::*;
use qlora_model::Model;
use qlora_train::{optim::clip_grad_norm, sequence_loss, AdamW, Adapters};

/// Loss of the batch (Σ token losses / tokens) and, optionally, its gradients.
fn batch_step(
    model: &Model,
    ad: &Adapters,
    b: &Batch,
    grads: Option<&mut qlora_train::Grads>,
) -> f64 {
    let n: usize = b
        .iter()
        .map(|(_, l)| l.iter().filter(|x| x.is_some()).count())
        .sum();
    let mut total = 0.0;
    match grads {
        Some(g) => {
            for (ids, labels) in b {
                total += sequence_loss(model, ad, None, ids, labels, n as f32, Some(g)).0;
            }
        }
        None => {
            for (ids, labels) in b {
                total += sequence_loss(model, ad, None, ids, labels, n as f32, None).0;
            }
        }
    }
    total / n as f64
}

fn check_case(name: &str) {
    let (model, mut ad, meta, dir) = train_case(name);
    let b = train_batch(&meta);
    let mut g = ad.zero_grads();
    let loss0 = batch_step(&model, &ad, &b, Some(&mut g));
    let want0 = meta["loss0"].as_f64().unwrap();
    assert!(
        ((loss0 - want0) / want0).abs() < 1e-5,
        "{name}: loss {loss0} vs {want0}"
    );
    // Every gradient, relative to the largest element of its tensor.
    let expected = qlora_io::SafetensorsFile::open(&dir.join("expected.safetensors")).unwrap();
    let mut checked = 0;
    let mut worst = 0f32;
    for t in &expected.tensors {
        let key = t.name.strip_prefix("grad.base_model.model.").unwrap();
        let (module, which) = key.rsplit_once(".lora_").unwrap();
        let i = ad
            .params
            .iter()
            .position(|p| p.module == module)
            .unwrap_or_else(|| panic!("{key}"));
        let got = if which.starts_with("magnitude") {
            &g.m[i]
        } else if which.starts_with('A') {
            &g.a[i]
        } else {
            &g.b[i]
        };
        let want = t.to_f32().unwrap();
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let err = got
            .iter()
            .zip(&want)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        worst = worst.max(err / scale.max(1e-6));
        assert!(
            err <= 1e-5 * scale.max(1e-6),
            "{name} {key}: max error {err} (scale {scale})"
        );
        checked += 1;
    }
    let dora = ad.params.iter().filter(|p| p.magnitude.is_some()).count();
    assert_eq!(checked, 2 * ad.params.len() + dora);
    eprintln!("{name}: worst gradient error relative to its tensor's largest element: {worst:e}");
    // 10 AdamW steps.
    let hp = &meta["hp"];
    let lr = hp["lr"].as_f64().unwrap() as f32;
    let mut opt = AdamW::new(&ad, hp["weight_decay"].as_f64().unwrap() as f32);
    for (step, want) in meta["losses"].as_array().unwrap().iter().enumerate() {
        let mut g = ad.zero_grads();
        let loss = batch_step(&model, &ad, &b, Some(&mut g));
        let want = want.as_f64().unwrap();
        assert!(
            ((loss - want) / want).abs() < 1e-3,
            "{name} step {step}: loss {loss} vs {want}"
        );
        clip_grad_norm(&mut g, hp["max_grad_norm"].as_f64().map(|v| v as f32));
        opt.update(&mut ad, &g, lr);
    }
}

#[test]
fn dense_base_matches_pytorch_peft() {
    check_case("dense");
}

#[test]
fn nf4_base_matches_pytorch_peft() {
    check_case("nf4-dq");
}

#[test]
fn gptq_base_matches_pytorch_peft() {
    // GPTQModel's 4-bit act-order asymmetric checkpoint; PyTorch + PEFT on its dequantized
    // weights (tools/reference/make_gptq_awq_models.py).
    check_case("gptq-llama64-g32-descact-asym");
}

#[test]
fn dora_on_dense_and_nf4_bases_matches_pytorch_peft() {
    check_case("dense-dora");
    check_case("nf4-dq-dora");
}

#[test]
fn packing_sequences_gives_the_same_loss_and_gradients() {
    let (model, ad, meta, _) = train_case("dense");
    let b = train_batch(&meta);
    let mut g1 = ad.zero_grads();
    let one_by_one = batch_step(&model, &ad, &b, Some(&mut g1));
    let mut g2 = ad.zero_grads();
    let n: usize = b
        .iter()
        .map(|(_, l)| l.iter().filter(|x| x.is_some()).count())
        .sum();
    let seqs: Vec<(&[u32], &[Option<u32>])> = b.iter().map(|(i, l)| (&i[..], &l[..])).collect();
    let (total, count) = qlora_train::packed_loss(
        &model,
        &ad,
        None,
        &seqs,
        n as f32,
        Some(&mut g2),
        qlora_train::KEEP_ACTIVATIONS_BYTES,
    );
    assert_eq!(count, n);
    assert!((total / n as f64 - one_by_one).abs() < 1e-6 * one_by_one);
    for (x, y) in g1.a.iter().chain(&g1.b).zip(g2.a.iter().chain(&g2.b)) {
        let scale = x.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
        let err = x.iter().zip(y).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            err <= 1e-5 * scale,
            "packed gradient differs: {err} (scale {scale})"
        );
    }
}

/// Keeping the activations from the forward pass and recomputing them in the backward give the
/// same loss and the same gradients, bit for bit, on every base and adapter kind (with dropout).
#[test]
fn kept_and_recomputed_activations_give_identical_gradients() {
    for name in ["dense", "dense-dora", "nf4-dq", "nf4-dq-dora"] {
        let (model, ad, meta, _) = train_case(name);
        let b = train_batch(&meta);
        let seqs: Vec<(&[u32], &[Option<u32>])> = b.iter().map(|(i, l)| (&i[..], &l[..])).collect();
        let noise = Some(qlora_train::Noise { seed: 7 });
        let run = |budget: usize| {
            let mut g = ad.zero_grads();
            let (loss, _) =
                qlora_train::packed_loss(&model, &ad, noise, &seqs, 3.0, Some(&mut g), budget);
            (loss, g)
        };
        let (l1, g1) = run(0);
        let (l2, g2) = run(usize::MAX);
        assert_eq!(l1.to_bits(), l2.to_bits(), "{name}: loss");
        assert!(
            g1.a.iter().any(|v| v.iter().any(|x| *x != 0.0)),
            "{name}: no gradient"
        );
        assert_eq!(g1.a, g2.a, "{name}: dA");
        assert_eq!(g1.b, g2.b, "{name}: dB");
        assert_eq!(g1.m, g2.m, "{name}: dm");
    }
}
