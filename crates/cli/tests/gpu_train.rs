//! Training on a CUDA GPU against the CPU trainer: the loss and every adapter gradient of packed
//! micro-batches (tiny models of every attention shape, dense, NF4 and NF4 + double quant bases,
//! LoRA on all seven projections and the head, with and without dropout; a Mistral-7B-shaped
//! model), the PyTorch reference cases' 10 AdamW losses, and bit-for-bit repeats (twice the same
//! run; keeping against recomputing the activations). Budgets (issue 11): f32 mode max|Δ| /
//! max|cpu| ≤ 1e-4 per gradient tensor, bf16 mode ‖Δ‖ / ‖cpu‖ ≤ 2e-2.
//!
//! Needs a GPU: skipped (with a line on stderr) where there is none, unless
//! QLORA_REQUIRE_GPU=1, which makes a missing GPU a failure.
#![cfg(feature = "cuda")]

mod common;
use common::*;
use qlora_cuda::{CudaTrainer, Gpu, Precision, Recompute};
use qlora_model::{LoadOptions, Model, QuantizeSpec};
use qlora_train::optim::clip_grad_norm;
use qlora_train::run::Rng;
use qlora_train::{AdamW, Adapters, CpuBackend, Grads, LoraParam, LossBackend, Noise};

const F32_GRAD: f32 = 1e-4;
const BF16_GRAD: f32 = 2e-2;

/// Random adapters of rank r on every projection (and the head when `head`), B non-zero so every
/// gradient flows.
fn random_adapters(model: &Model, r: usize, head: bool, dropout: f32, seed: u64) -> Adapters {
    let mut rng = Rng::new(seed);
    let mut params = Vec::new();
    let projections = model
        .layers
        .iter()
        .flat_map(|l| l.projections())
        .chain(head.then_some(&model.lm_head));
    for p in projections {
        let (d_in, d_out) = (p.d_in(), p.d_out());
        let ba = 1.0 / (d_in as f32).sqrt();
        let bb = 0.5 / (r as f32).sqrt();
        params.push(LoraParam {
            module: p.name.clone(),
            rank: r,
            d_in,
            d_out,
            scaling: 2.0,
            a: (0..r * d_in)
                .map(|_| (rng.f32() * 2.0 - 1.0) * ba)
                .collect(),
            b: (0..d_out * r)
                .map(|_| (rng.f32() * 2.0 - 1.0) * bb)
                .collect(),
            magnitude: None,
        });
    }
    Adapters::new(params, dropout)
}

/// Three packed sequences of odd lengths, some positions without a label.
fn packed_batch(vocab: u32, lens: &[usize]) -> Batch {
    lens.iter()
        .enumerate()
        .map(|(k, &n)| {
            let ids: Vec<u32> = (0..n)
                .map(|i| ((i as u32 + 1) * 7919 + k as u32 * 104_729) % vocab)
                .collect();
            let labels = (0..n)
                .map(|i| (i + 1 < n && i % 5 != 2).then(|| ids[i + 1]))
                .collect();
            (ids, labels)
        })
        .collect()
}

fn seqs(b: &Batch) -> Vec<(&[u32], &[Option<u32>])> {
    b.iter().map(|(i, l)| (&i[..], &l[..])).collect()
}

fn run(
    backend: &mut dyn LossBackend,
    ad: &Adapters,
    b: &Batch,
    noise: Option<Noise>,
) -> (f64, usize, Grads) {
    let mut g = ad.zero_grads();
    let (loss, n) = backend
        .packed_loss(ad, noise, &seqs(b), 3.0, Some(&mut g))
        .unwrap();
    (loss, n, g)
}

/// The worst gradient error over the tensors, in the precision's measure.
fn grad_error(p: Precision, got: &Grads, want: &Grads) -> f32 {
    let mut worst = 0f32;
    for (x, y) in got.a.iter().chain(&got.b).zip(want.a.iter().chain(&want.b)) {
        assert!(x.iter().all(|v| v.is_finite()), "non-finite GPU gradient");
        let e = match p {
            Precision::F32 => {
                let scale = y.iter().fold(1e-12f32, |m, v| m.max(v.abs()));
                max_abs_diff(x, y) / scale
            }
            Precision::Bf16 => {
                let num: f64 = x.iter().zip(y).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
                let den: f64 = y.iter().map(|b| (*b as f64).powi(2)).sum();
                (num / den.max(1e-30)).sqrt() as f32
            }
        };
        worst = worst.max(e);
    }
    worst
}

thread_local! {
    /// One opened GPU per precision (opening compiles the kernels).
    static GPUS: std::cell::RefCell<Vec<(Precision, std::sync::Arc<Gpu>)>> = Default::default();
}

fn gpu(p: Precision) -> std::sync::Arc<Gpu> {
    GPUS.with(|g| {
        let mut g = g.borrow_mut();
        if let Some((_, x)) = g.iter().find(|(q, _)| *q == p) {
            return x.clone();
        }
        let x = Gpu::open(0, p).unwrap();
        g.push((p, x.clone()));
        x
    })
}

fn trainer(m: &Model, ad: &Adapters, p: Precision, r: Recompute) -> CudaTrainer {
    CudaTrainer::new(gpu(p), m, ad, r).unwrap()
}

/// GPU against CPU for one model, adapters and batch, in both precisions.
fn check(tag: &str, m: &Model, ad: &Adapters, b: &Batch, noise: Option<Noise>) {
    let mut cpu = CpuBackend {
        model: m,
        keep_activations_bytes: usize::MAX,
    };
    let (cl, cn, cg) = run(&mut cpu, ad, b, noise);
    assert!(
        cg.a.iter().any(|v| v.iter().any(|x| *x != 0.0)),
        "{tag}: no gradient"
    );
    for (p, budget, loss_budget) in [
        (Precision::F32, F32_GRAD, 1e-5),
        (Precision::Bf16, BF16_GRAD, 1e-2),
    ] {
        let (gl, gn, gg) = run(&mut trainer(m, ad, p, Recompute::Auto), ad, b, noise);
        assert_eq!(gn, cn, "{tag}: token count");
        let le = ((gl - cl) / cl).abs();
        let ge = grad_error(p, &gg, &cg);
        eprintln!("{tag} {p:?}: loss {gl:.6} vs {cl:.6} ({le:.1e}), gradients {ge:.2e}");
        assert!(le <= loss_budget, "{tag} {p:?}: loss {gl} vs {cl}");
        assert!(
            ge <= budget,
            "{tag} {p:?}: gradient error {ge:.3e} over {budget:.0e}"
        );
    }
}

fn tiny(name: &str, quantize: Option<(bool, &str)>) -> Model {
    let dir = temp_dir(&format!("gpu-train-{name}")).join(name);
    if !dir.exists() {
        write_model(&spec(name), &dir);
    }
    let mut src = qlora_io::ModelSource::open(&dir).unwrap();
    let quantize = quantize.map(|(dq, q)| QuantizeSpec {
        quant: if q == "fp4" {
            qlora_quant::Quant4::Fp4
        } else {
            qlora_quant::Quant4::Nf4
        },
        double_quant: dq,
        blocksize: 64,
    });
    Model::load_with(&mut src, LoadOptions { quantize }).unwrap()
}

#[test]
fn gradients_on_the_gpu_equal_the_cpu_trainers() {
    if !have_gpu() {
        return;
    }
    // The PyTorch reference cases' adapters and batches.
    for name in ["dense", "nf4-dq"] {
        let (model, ad, meta, _) = train_case(name);
        check(
            &format!("case {name}"),
            &model,
            &ad,
            &train_batch(&meta),
            None,
        );
    }
    // Every attention shape (GQA, MQA with a tied head, sliding window, q/k/v biases, llama3
    // RoPE) on every base format, adapters on all seven projections and the head, dropout on.
    let noise = Some(Noise { seed: 11 });
    for name in [
        "llama-gqa",
        "mistral-window",
        "llama3-rope-bias",
        "llama-mqa-headdim-tied",
    ] {
        for q in [
            None,
            Some((false, "nf4")),
            Some((true, "nf4")),
            Some((false, "fp4")),
        ] {
            let m = tiny(name, q);
            let b = packed_batch(m.vocab_size() as u32, &[9, 23, 5]);
            let ad = random_adapters(&m, 4, true, 0.1, 5);
            check(&format!("{name} {q:?} dropout"), &m, &ad, &b, noise);
            let ad = random_adapters(&m, 3, false, 0.0, 6);
            check(&format!("{name} {q:?}"), &m, &ad, &b, None);
        }
    }
}

#[test]
fn synthetic_mistral_7b_gradients_match_the_cpu() {
    use qlora_model::synthetic::{synthetic_config, synthetic_model, SyntheticBase};
    if !have_gpu() {
        return;
    }
    let mut cfg = synthetic_config("mistral-7b").unwrap();
    cfg.num_hidden_layers = 2;
    let m = synthetic_model(
        cfg,
        SyntheticBase::Bnb4Quantized(qlora_quant::Quant4::Nf4),
        None,
        3,
    )
    .unwrap();
    let b = packed_batch(m.vocab_size() as u32, &[40, 24]);
    let ad = random_adapters(&m, 16, false, 0.0, 9);
    check("synthetic mistral-7b ×2 layers NF4 r16", &m, &ad, &b, None);
}

#[test]
fn gpu_training_repeats_bit_for_bit_whether_kept_or_recomputed() {
    if !have_gpu() {
        return;
    }
    let m = tiny("mistral-window", Some((true, "nf4")));
    let b = packed_batch(m.vocab_size() as u32, &[17, 30, 4]);
    let ad = random_adapters(&m, 4, true, 0.1, 8);
    let noise = Some(Noise { seed: 3 });
    for p in [Precision::F32, Precision::Bf16] {
        let mut kept = trainer(&m, &ad, p, Recompute::Never);
        let (l1, _, g1) = run(&mut kept, &ad, &b, noise);
        assert!(kept.kept);
        let (l2, _, g2) = run(&mut kept, &ad, &b, noise);
        let mut rec = trainer(&m, &ad, p, Recompute::Always);
        let (l3, _, g3) = run(&mut rec, &ad, &b, noise);
        assert!(!rec.kept);
        assert_eq!(l1.to_bits(), l2.to_bits(), "{p:?}: loss of a repeat");
        assert_eq!(l1.to_bits(), l3.to_bits(), "{p:?}: loss recomputed");
        assert_eq!(
            (&g1.a, &g1.b),
            (&g2.a, &g2.b),
            "{p:?}: gradients of a repeat"
        );
        assert_eq!(
            (&g1.a, &g1.b),
            (&g3.a, &g3.b),
            "{p:?}: gradients recomputed"
        );
    }
}

#[test]
fn ten_adamw_steps_on_the_gpu_follow_pytorch() {
    if !have_gpu() {
        return;
    }
    for name in ["dense", "nf4-dq"] {
        let (model, mut ad, meta, _) = train_case(name);
        let b = train_batch(&meta);
        let n: usize = b
            .iter()
            .map(|(_, l)| l.iter().filter(|x| x.is_some()).count())
            .sum();
        let hp = &meta["hp"];
        let lr = hp["lr"].as_f64().unwrap() as f32;
        let mut opt = AdamW::new(&ad, hp["weight_decay"].as_f64().unwrap() as f32);
        let mut gpu = trainer(&model, &ad, Precision::F32, Recompute::Auto);
        for (step, want) in meta["losses"].as_array().unwrap().iter().enumerate() {
            let mut g = ad.zero_grads();
            let (loss, _) = gpu
                .packed_loss(&ad, None, &seqs(&b), n as f32, Some(&mut g))
                .unwrap();
            let loss = loss / n as f64;
            let want = want.as_f64().unwrap();
            assert!(
                ((loss - want) / want).abs() < 1e-3,
                "{name} step {step}: loss {loss} vs PyTorch's {want}"
            );
            clip_grad_norm(&mut g, hp["max_grad_norm"].as_f64().map(|v| v as f32));
            opt.update(&mut ad, &g, lr);
        }
    }
}

#[test]
fn dora_and_mismatched_adapters_are_refused_with_a_clear_line() {
    if !have_gpu() {
        return;
    }
    let (model, ad, _, _) = train_case("dense-dora");
    let e = CudaTrainer::new(gpu(Precision::F32), &model, &ad, Recompute::Auto)
        .err()
        .expect("DoRA is refused");
    assert!(e.to_string().contains("DoRA"), "{e}");
    let m = tiny("llama-gqa", None);
    let mut ad = random_adapters(&m, 2, false, 0.0, 1);
    ad.params[0].d_in += 1;
    let e = CudaTrainer::new(gpu(Precision::F32), &m, &ad, Recompute::Auto)
        .err()
        .expect("a misfit is refused");
    assert!(e.to_string().contains("does not fit"), "{e}");
}
