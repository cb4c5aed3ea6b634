//! Every backward against central finite differences of its forward: L = Σ out ⊙ R for a fixed
//! random R, perturbing each input element by ±h.

use qlora_engine::{backward as bw, ops, Weight};

mod common;
use common::data;

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
}

/// Central differences of `f` (a scalar of x) at every element of x.
fn numeric(x: &[f32], f: impl Fn(&[f32]) -> f64) -> Vec<f64> {
    let h = 1e-2f32;
    (0..x.len())
        .map(|i| {
            let mut p = x.to_vec();
            p[i] += h;
            let up = f(&p);
            p[i] -= 2.0 * h;
            let down = f(&p);
            (up - down) / (2.0 * h as f64)
        })
        .collect()
}

fn check(name: &str, analytic: &[f32], numeric: &[f64]) {
    let scale = numeric.iter().map(|v| v.abs()).fold(1e-3, f64::max);
    for (i, (a, n)) in analytic.iter().zip(numeric).enumerate() {
        assert!(
            (*a as f64 - n).abs() <= 2e-3 * scale + 1e-4,
            "{name}: element {i}: analytic {a} vs numeric {n}"
        );
    }
}

#[test]
fn rms_norm() {
    let (t, d) = (3, 16);
    let x = data(t * d, 1);
    let w = data(d, 2);
    let r = data(t * d, 3);
    let f = |x: &[f32]| {
        let mut y = vec![0f32; x.len()];
        ops::rms_norm(x, &w, 1e-5, &mut y);
        dot(&y, &r)
    };
    check(
        "rms_norm",
        &bw::rms_norm_backward(&x, &w, 1e-5, &r),
        &numeric(&x, f),
    );
}

#[test]
fn rope() {
    let (t, h, hd) = (4, 2, 8);
    let x = data(t * h * hd, 4);
    let r = data(t * h * hd, 5);
    let cos: Vec<f32> = data(t * hd / 2, 6).iter().map(|v| v.cos()).collect();
    let sin: Vec<f32> = data(t * hd / 2, 6).iter().map(|v| v.sin()).collect();
    let f = |x: &[f32]| {
        let mut y = x.to_vec();
        ops::rope(&mut y, h, hd, &cos, &sin);
        dot(&y, &r)
    };
    let mut g = r.clone();
    bw::rope_backward(&mut g, h, hd, &cos, &sin);
    check("rope", &g, &numeric(&x, f));
}

#[test]
fn swiglu() {
    let n = 40;
    let (g, u, r) = (data(n, 7), data(n, 8), data(n, 9));
    let (dg, du) = bw::swiglu_backward(&g, &u, &r);
    let fg = |g: &[f32]| {
        let mut a = g.to_vec();
        ops::swiglu(&mut a, &u);
        dot(&a, &r)
    };
    let fu = |u: &[f32]| {
        let mut a = g.clone();
        ops::swiglu(&mut a, u);
        dot(&a, &r)
    };
    check("swiglu gate", &dg, &numeric(&g, fg));
    check("swiglu up", &du, &numeric(&u, fu));
}

#[test]
fn linear_input() {
    let (t, out, inp) = (3, 7, 10);
    let x = data(t * inp, 10);
    let w = Weight::from_f32(out, inp, &data(out * inp, 11));
    let r = data(t * out, 12);
    let f = |x: &[f32]| {
        let mut y = vec![0f32; t * out];
        ops::linear(x, t, &w, &mut y);
        dot(&y, &r)
    };
    check(
        "linear",
        &bw::linear_backward_input(&r, t, &w),
        &numeric(&x, f),
    );
    // Aᵀ B
    let a = data(5 * 3, 13);
    let b = data(5 * 4, 14);
    let c = bw::matmul_at_b(&a, &b, 5, 3, 4);
    for i in 0..3 {
        for j in 0..4 {
            let want: f32 = (0..5).map(|k| a[k * 3 + i] * b[k * 4 + j]).sum();
            assert!((c[i * 4 + j] - want).abs() < 1e-5);
        }
    }
}

#[test]
fn attention_gqa_and_window() {
    let (t, h, kv, hd) = (5, 4, 2, 4);
    for window in [None, Some(3)] {
        let q = data(t * h * hd, 20);
        let k = data(t * kv * hd, 21);
        let v = data(t * kv * hd, 22);
        let r = data(t * h * hd, 23);
        let run = |q: &[f32], k: &[f32], v: &[f32]| {
            let mut o = vec![0f32; t * h * hd];
            ops::attention(q, k, v, t, 0, h, kv, hd, window, &mut o);
            dot(&o, &r)
        };
        let (dq, dk, dv) = bw::attention_backward(&q, &k, &v, &r, t, h, kv, hd, window);
        check("attention dq", &dq, &numeric(&q, |x| run(x, &k, &v)));
        check("attention dk", &dk, &numeric(&k, |x| run(&q, x, &v)));
        check("attention dv", &dv, &numeric(&v, |x| run(&q, &k, x)));
    }
}

#[test]
fn cross_entropy_with_ignored_positions() {
    let (t, v) = (4, 6);
    let logits = data(t * v, 30);
    let labels = [Some(2u32), None, Some(5), Some(0)];
    let (_, n, d) = bw::cross_entropy(&logits, v, &labels);
    assert_eq!(n, 3);
    let f = |l: &[f32]| bw::cross_entropy(l, v, &labels).0;
    check("cross_entropy", &d, &numeric(&logits, f));
}

#[test]
fn tiled_attention_backward_equals_the_per_query_one() {
    if !qlora_quant::use_avx512() {
        eprintln!("skipping: no AVX-512 (the tiled path does not run here)");
        return;
    }
    // Several query blocks (64 a block), a partial last block, GQA and MQA, windows shorter
    // and longer than a block, odd head dims.
    for (t, h, kv, hd, window) in [
        (150usize, 4usize, 2usize, 16usize, None),
        (64, 3, 1, 24, Some(10)),
        (97, 6, 2, 8, Some(70)),
        (33, 2, 2, 64, None),
    ] {
        let q = data(t * h * hd, 40);
        let k = data(t * kv * hd, 41);
        let v = data(t * kv * hd, 42);
        let r = data(t * h * hd, 43);
        let tiled = bw::attention_backward(&q, &k, &v, &r, t, h, kv, hd, window);
        let rows = bw::attention_backward_rows(&q, &k, &v, &r, t, h, kv, hd, window);
        for (what, a, b) in [
            ("dq", &tiled.0, &rows.0),
            ("dk", &tiled.1, &rows.1),
            ("dv", &tiled.2, &rows.2),
        ] {
            let scale = b.iter().fold(1e-6f32, |m, x| m.max(x.abs()));
            let err = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(
                err <= 2e-6 * scale,
                "t {t} h {h} kv {kv} hd {hd} {window:?} {what}: {err:e} (scale {scale:e})"
            );
        }
        // The same bits on a second run (fixed reduction order).
        let again = bw::attention_backward(&q, &k, &v, &r, t, h, kv, hd, window);
        assert!(again == tiled);
    }
}
