//! Each fast op against its scalar reference, on odd shapes and every weight format it widens.

use qlora_engine::{ops, reference, Weight, WeightFormat};
use qlora_quant::GgmlType;
use std::sync::Arc;

/// f32 accumulation-order differences on sums of ~500 products of O(1) values.
const TOL: f32 = 2e-5;

mod common;
use common::data;

fn close(a: &[f32], b: &[f32], tol: f32) {
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= tol * (1.0 + y.abs()),
            "element {i}: {x} vs {y}"
        );
    }
}

#[test]
fn linear_matches_reference_for_decode_and_prefill_shapes() {
    for &(t, out, inp) in &[(1, 37, 64), (3, 130, 96), (5, 70, 33), (17, 129, 160)] {
        let x = data(t * inp, 1);
        let w = Weight::from_f32(out, inp, &data(out * inp, 2));
        let mut y = vec![0f32; t * out];
        ops::linear(&x, t, &w, &mut y);
        close(&y, &reference::linear(&x, t, &w), TOL);
    }
}

#[test]
fn linear_widens_f16_bf16_and_q8_0_rows() {
    let (t, out, inp) = (6, 40, 64);
    let vals = data(out * inp, 3);
    let x = data(t * inp, 4);
    let f16: Vec<u8> = vals
        .iter()
        .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
        .collect();
    let bf16: Vec<u8> = vals
        .iter()
        .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
        .collect();
    let mut q8 = Vec::new();
    for blk in vals.chunks(32) {
        q8.extend_from_slice(&half::f16::from_f32(1.0 / 64.0).to_le_bytes());
        q8.extend(blk.iter().map(|v| ((v * 64.0).round() as i8) as u8));
    }
    for (fmt, bytes) in [
        (GgmlType::F16, f16),
        (GgmlType::BF16, bf16),
        (GgmlType::Q8_0, q8),
    ] {
        let w = Weight::new(WeightFormat::Ggml(fmt), out, inp, Arc::new(bytes)).unwrap();
        for t in [1, t] {
            let mut y = vec![0f32; t * out];
            ops::linear(&x[..t * inp], t, &w, &mut y);
            close(&y, &reference::linear(&x[..t * inp], t, &w), TOL);
        }
    }
}

#[test]
fn weight_rejects_wrong_byte_count_and_partial_blocks() {
    assert!(Weight::new(
        WeightFormat::Ggml(GgmlType::F32),
        2,
        3,
        Arc::new(vec![0u8; 20])
    )
    .is_err());
    assert!(Weight::new(
        WeightFormat::Ggml(GgmlType::Q4_0),
        1,
        48,
        Arc::new(vec![0u8; 36])
    )
    .is_err());
}

#[test]
fn rms_norm_matches_reference() {
    let x = data(5 * 48, 5);
    let g = data(48, 6);
    let mut y = vec![0f32; x.len()];
    ops::rms_norm(&x, &g, 1e-5, &mut y);
    close(&y, &reference::rms_norm(&x, &g, 1e-5), 1e-6);
}

#[test]
fn rope_matches_reference() {
    let (t, h, hd) = (4, 3, 10);
    let x = data(t * h * hd, 7);
    let table = ops::RopeTable {
        inv_freq: (0..hd / 2)
            .map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / hd as f32))
            .collect(),
    };
    let positions = [5usize, 6, 7, 300];
    let (cos, sin) = table.cos_sin(positions.iter().copied());
    let mut y = x.clone();
    ops::rope(&mut y, h, hd, &cos, &sin);
    close(
        &y,
        &reference::rope(&x, h, hd, &positions, &table.inv_freq),
        1e-6,
    );
}

#[test]
fn attention_matches_reference_with_gqa_and_window() {
    let (h, kv, hd) = (6, 2, 8);
    // Short ones run per query; 32 and more queries as tiles (several blocks, a partial last
    // block, a cache before them, windows shorter and longer than a block).
    for &(t, pos0, window) in &[
        (7, 0, None),
        (7, 0, Some(3)),
        (1, 9, Some(4)),
        (3, 5, None),
        (150, 0, None),
        (70, 40, Some(20)),
        (33, 100, Some(90)),
        (64, 0, Some(64)),
    ] {
        let n = pos0 + t;
        let q = data(t * h * hd, 8);
        let k = data(n * kv * hd, 9);
        let v = data(n * kv * hd, 10);
        let mut out = vec![0f32; t * h * hd];
        ops::attention(&q, &k, &v, t, pos0, h, kv, hd, window, &mut out);
        close(
            &out,
            &reference::attention(&q, &k, &v, t, pos0, h, kv, hd, window),
            1e-5,
        );
        let mut rows = vec![0f32; t * h * hd];
        ops::attention_rows(&q, &k, &v, t, pos0, h, kv, hd, window, &mut rows);
        close(&out, &rows, 2e-6);
    }
}

#[test]
fn swiglu_matches_reference() {
    let g = data(300, 11);
    let u = data(300, 12);
    let mut y = g.clone();
    ops::swiglu(&mut y, &u);
    close(&y, &reference::swiglu(&g, &u), 1e-6);
}

#[test]
fn linear_on_bitsandbytes_4bit_and_int8_weights() {
    use qlora_quant::bnb;
    use qlora_quant::Quant4;
    // Rows that are whole blocks (the fused GEMV), and rows that blocks cross (48 wide with
    // blocksize 64, 33 wide: odd, rows start mid-byte), for decode and prefill token counts.
    for (quant, bs, out, inp) in [
        (Quant4::Nf4, 64, 70, 128),
        (Quant4::Fp4, 32, 9, 96),
        (Quant4::Nf4, 64, 37, 48),
        (Quant4::Fp4, 64, 21, 33),
    ] {
        let vals = data(out * inp, 7);
        let (packed, absmax) = bnb::quantize_4bit(&vals, bs, quant);
        let w = Weight::bnb4(quant, quant.code(), bs, out, inp, Arc::new(packed), absmax).unwrap();
        assert_eq!(w.format, WeightFormat::Bnb4(quant));
        for t in [1, 3, 9] {
            let x = data(t * inp, 8);
            let mut y = vec![0f32; t * out];
            ops::linear(&x, t, &w, &mut y);
            close(&y, &reference::linear(&x, t, &w), TOL);
        }
    }
    let (out, inp) = (11, 40);
    let cb: Vec<u8> = data(out * inp, 9)
        .iter()
        .map(|v| ((v * 127.0) as i8) as u8)
        .collect();
    let scb: Vec<f32> = (0..out).map(|r| 0.01 * (r + 1) as f32).collect();
    let w = Weight::int8(out, inp, Arc::new(cb.clone()), scb.clone()).unwrap();
    let full = w.to_f32();
    for r in 0..out {
        for c in 0..inp {
            let want = (cb[r * inp + c] as i8) as f32 * scb[r] * (1.0 / 127.0);
            assert!((full[r * inp + c] - want).abs() <= 1e-7);
        }
    }
    for t in [1, 6] {
        let x = data(t * inp, 10);
        let mut y = vec![0f32; t * out];
        ops::linear(&x, t, &w, &mut y);
        close(&y, &reference::linear(&x, t, &w), TOL);
    }
}

/// QLORA_CPU_BF16's products (`ops::linear_with(.., true)`): on a CPU with AVX512-BF16, equal
/// the reference over bf16-rounded activations and weights (f32 sums), on 4-bit and dense
/// weights, odd widths (masked tails of the 32-wide steps), prefill token counts; decode
/// counts keep the exact path. Elsewhere the call is the exact `linear`.
#[test]
fn linear_in_bf16_equals_the_product_of_rounded_operands() {
    use qlora_quant::bnb;
    use qlora_quant::Quant4;
    let round = |v: &[f32]| -> Vec<f32> {
        v.iter()
            .map(|x| half::bf16::from_f32(*x).to_f32())
            .collect()
    };
    let bf16 = ops::bf16_available();
    for (quant, bs, out, inp) in [
        (Quant4::Nf4, 64, 70, 128),
        (Quant4::Nf4, 64, 130, 576),
        (Quant4::Fp4, 64, 21, 33),
    ] {
        let vals = data(out * inp, 17);
        let (packed, absmax) = bnb::quantize_4bit(&vals, bs, quant);
        let w = Weight::bnb4(quant, quant.code(), bs, out, inp, Arc::new(packed), absmax).unwrap();
        let wr = Weight::from_f32(out, inp, &round(&w.to_f32()));
        for t in [3usize, 5, 9, 17] {
            let x = data(t * inp, 18);
            let mut y = vec![0f32; t * out];
            ops::linear_with(&x, t, &w, &mut y, true);
            let exact = reference::linear(&x, t, &w);
            if bf16 && t > 4 {
                close(&y, &reference::linear(&round(&x), t, &wr), TOL);
                assert!(
                    y != exact,
                    "[{out}, {inp}] t {t}: bf16 products gave the exact bits"
                );
            } else {
                close(&y, &exact, TOL);
            }
        }
    }
    if !bf16 {
        eprintln!("no AVX512-BF16 here: only the exact path was checked");
    }
}

#[test]
fn linear_on_gptq_awq_grouped_weights_fused_and_widened() {
    use qlora_engine::Groups;
    // Contiguous groups (the fused decode dot), a short last group, act-order (widened), both
    // code widths; decode (t ≤ 4) and prefill (t > 4) against the reference on the widened
    // matrix.
    for (bits, out, inp, size, act_order) in [
        (4u8, 13usize, 96usize, 32usize, false),
        (4, 9, 56, 16, false),
        (8, 7, 48, 48, false),
        (4, 11, 64, 16, true),
        (8, 5, 40, 8, true),
    ] {
        let groups = inp.div_ceil(size);
        let n = out * inp;
        let codes: Vec<u8> = data(if bits == 8 { n } else { n / 2 }, 21)
            .iter()
            .map(|v| ((v + 1.0) * 127.9) as u8)
            .collect();
        let g_idx: Vec<u32> = (0..inp)
            .map(|c| {
                if act_order {
                    ((c * 5 + 1) % groups) as u32
                } else {
                    (c / size) as u32
                }
            })
            .collect();
        let scales: Vec<f32> = data(out * groups, 22).iter().map(|v| v * 0.02).collect();
        let zmax = if bits == 8 { 255.0 } else { 15.0 };
        let zeros: Vec<f32> = data(out * groups, 23)
            .iter()
            .map(|v| ((v + 1.0) * 0.5 * zmax).round())
            .collect();
        let gr = Groups::new(g_idx.clone(), groups, scales.clone(), zeros.clone());
        assert_eq!(gr.contiguous.is_some(), !act_order);
        let w = Weight::grouped(bits, out, inp, Arc::new(codes.clone()), gr).unwrap();
        // The widened matrix is the formula, exactly.
        let full = w.to_f32();
        for r in 0..out {
            for (c, &gi) in g_idx.iter().enumerate() {
                let e = r * inp + c;
                let q = if bits == 8 {
                    codes[e]
                } else {
                    (codes[e / 2] >> (4 * (1 - e % 2))) & 15
                };
                let gi = gi as usize;
                let want = scales[r * groups + gi] * (q as f32 - zeros[r * groups + gi]);
                assert_eq!(full[e].to_bits(), want.to_bits());
            }
        }
        for t in [1, 4, 7] {
            let x = data(t * inp, 24);
            let mut y = vec![0f32; t * out];
            ops::linear(&x, t, &w, &mut y);
            close(&y, &reference::linear(&x, t, &w), TOL);
        }
    }
    // Sizes that do not fit are refused.
    let g = Groups::new(vec![0; 8], 1, vec![1.0; 2], vec![0.0; 2]);
    assert!(Weight::grouped(4, 2, 8, Arc::new(vec![0u8; 7]), g).is_err());
    let g = Groups::new(vec![0, 1, 0, 2, 0, 0, 0, 0], 2, vec![1.0; 4], vec![0.0; 4]);
    assert!(Weight::grouped(4, 2, 8, Arc::new(vec![0u8; 8]), g).is_err());
}
