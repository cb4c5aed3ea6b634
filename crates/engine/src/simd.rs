//! Hand-vectorized primitives: an f32 dot product and attention's weighted sum of value rows
//! (AVX-512 or AVX2 when the CPU has it, detected at run time so one binary runs everywhere; a
//! scalar loop otherwise).

/// Σ a[i]·b[i].
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the features were detected just above.
            return unsafe { dot_avx2(a, b) };
        }
    }
    dot_portable(a, b)
}

/// Eight independent accumulators so the compiler can keep them in vector registers.
fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let n8 = a.len() / 8 * 8;
    for (ca, cb) in a[..n8].chunks_exact(8).zip(b[..n8].chunks_exact(8)) {
        for k in 0..8 {
            acc[k] += ca[k] * cb[k];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for i in n8..a.len() {
        s += a[i] * b[i];
    }
    s
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    dot_avx2_raw(a.as_ptr(), b.as_ptr(), a.len())
}

/// `dot_avx2` over n elements at `pa` and `pb`: four accumulators over runs of 32, one over the
/// runs of 8 left, their sum, its lanes in order, then the scalar tail. Inlined into its callers
/// (`scaled_dots_avx2` keeps the query in registers across keys) with the same bits.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn dot_avx2_raw(pa: *const f32, pb: *const f32, n: usize) -> f32 {
    use std::arch::x86_64::*;
    let mut acc0 = _mm256_setzero_ps();
    let mut acc1 = _mm256_setzero_ps();
    let mut acc2 = _mm256_setzero_ps();
    let mut acc3 = _mm256_setzero_ps();
    let mut i = 0;
    while i + 32 <= n {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc0);
        acc1 = _mm256_fmadd_ps(
            _mm256_loadu_ps(pa.add(i + 8)),
            _mm256_loadu_ps(pb.add(i + 8)),
            acc1,
        );
        acc2 = _mm256_fmadd_ps(
            _mm256_loadu_ps(pa.add(i + 16)),
            _mm256_loadu_ps(pb.add(i + 16)),
            acc2,
        );
        acc3 = _mm256_fmadd_ps(
            _mm256_loadu_ps(pa.add(i + 24)),
            _mm256_loadu_ps(pb.add(i + 24)),
            acc3,
        );
        i += 32;
    }
    while i + 8 <= n {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc0);
        i += 8;
    }
    let acc = _mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3));
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
    let mut s: f32 = lanes.iter().sum();
    while i < n {
        s += *pa.add(i) * *pb.add(i);
        i += 1;
    }
    s
}

/// out[j] = dot(q, k[first + j·stride ..][..q.len()]) · scale for j < out.len(): one query's
/// attention scores against a run of cached keys, each with the bits `dot(..) * scale` gives,
/// in one call (the per-key `dot` was a call, a feature check and two bounds checks a key).
pub fn scaled_dots(q: &[f32], k: &[f32], first: usize, stride: usize, scale: f32, out: &mut [f32]) {
    let n = q.len();
    if let Some(j) = out.len().checked_sub(1) {
        assert!(k.len() >= first + j * stride + n);
    }
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the features were detected just above; the bounds are asserted above.
            unsafe { scaled_dots_avx2(q, k, first, stride, scale, out) };
            return;
        }
    }
    for (j, o) in out.iter_mut().enumerate() {
        *o = dot_portable(q, &k[first + j * stride..first + j * stride + n]) * scale;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn scaled_dots_avx2(
    q: &[f32],
    k: &[f32],
    first: usize,
    stride: usize,
    scale: f32,
    out: &mut [f32],
) {
    let (n, qp, kp) = (q.len(), q.as_ptr(), k.as_ptr().add(first));
    for (j, o) in out.iter_mut().enumerate() {
        *o = dot_avx2_raw(qp, kp.add(j * stride), n) * scale;
    }
}

/// o += Σ_j (w[j] / sum) · v[first + j·stride ..][..o.len()] for j < w.len(): attention's
/// probability-weighted sum of value rows. Each term is `o + p·v` with the multiply and the add
/// rounded separately, in j order, so the vector paths give the scalar loop's bits exactly.
pub fn weighted_rows(o: &mut [f32], w: &[f32], sum: f32, v: &[f32], first: usize, stride: usize) {
    let n = o.len();
    if let Some(j) = w.len().checked_sub(1) {
        assert!(v.len() >= first + j * stride + n);
    }
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 detected; the bounds are asserted above.
            unsafe {
                if qlora_quant::use_avx512() {
                    weighted_rows_avx512(o, w, sum, v, first, stride)
                } else {
                    weighted_rows_avx2(o, w, sum, v, first, stride)
                }
            };
            return;
        }
    }
    for (j, &s) in w.iter().enumerate() {
        let p = s / sum;
        let vr = &v[first + j * stride..first + j * stride + n];
        for (a, &b) in o.iter_mut().zip(vr) {
            *a += p * b;
        }
    }
}

// `weighted_rows_avx512` and `weighted_rows_avx2` ($w lanes a vector): a block of 64 elements
// of o stays in registers (64 / $w vectors) over all the keys, then the next block, then single
// vectors, then the tail. Each element still takes o + p_j·v_j in j order, the multiply and the
// add rounded apart, with p_j = w[j] / sum: the scalar loop's bits. (They used to load and
// store o at every key.)
macro_rules! weighted_rows_kernel {
    ($name:ident, $feature:literal, $w:literal, $zero:ident, $load:ident, $store:ident,
     $set1:ident, $add:ident, $mul:ident) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $feature)]
        unsafe fn $name(
            o: &mut [f32],
            w: &[f32],
            sum: f32,
            v: &[f32],
            first: usize,
            stride: usize,
        ) {
            use std::arch::x86_64::*;
            let n = o.len();
            let (op, vp) = (o.as_mut_ptr(), v.as_ptr().add(first));
            let mut c = 0;
            while c + 64 <= n {
                let mut a = [$zero(); 64 / $w];
                for (u, a) in a.iter_mut().enumerate() {
                    *a = $load(op.add(c + $w * u));
                }
                for (j, &s) in w.iter().enumerate() {
                    let pv = $set1(s / sum);
                    let r = vp.add(j * stride + c);
                    for (u, a) in a.iter_mut().enumerate() {
                        *a = $add(*a, $mul(pv, $load(r.add($w * u))));
                    }
                }
                for (u, a) in a.iter().enumerate() {
                    $store(op.add(c + $w * u), *a);
                }
                c += 64;
            }
            while c + $w <= n {
                let mut a = $load(op.add(c));
                for (j, &s) in w.iter().enumerate() {
                    a = $add(a, $mul($set1(s / sum), $load(vp.add(j * stride + c))));
                }
                $store(op.add(c), a);
                c += $w;
            }
            weighted_rows_tail(o, c, w, sum, vp, stride);
        }
    };
}
weighted_rows_kernel!(
    weighted_rows_avx512,
    "avx512f",
    16,
    _mm512_setzero_ps,
    _mm512_loadu_ps,
    _mm512_storeu_ps,
    _mm512_set1_ps,
    _mm512_add_ps,
    _mm512_mul_ps
);
weighted_rows_kernel!(
    weighted_rows_avx2,
    "avx2",
    8,
    _mm256_setzero_ps,
    _mm256_loadu_ps,
    _mm256_storeu_ps,
    _mm256_set1_ps,
    _mm256_add_ps,
    _mm256_mul_ps
);

/// Elements [c, o.len()) of `weighted_rows`, one at a time over the keys in order.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn weighted_rows_tail(
    o: &mut [f32],
    c: usize,
    w: &[f32],
    sum: f32,
    vp: *const f32,
    stride: usize,
) {
    for (e, oc) in o.iter_mut().enumerate().skip(c) {
        let mut a = *oc;
        for (j, &s) in w.iter().enumerate() {
            a += (s / sum) * *vp.add(j * stride + e);
        }
        *oc = a;
    }
}

/// Attention backward's inner loop over the keys j < ds.len() of one query: dq += ds_j·k_j,
/// dk_j += ds_j·q, dv_j += p_j·dout, with k_j = k[kfirst + j·kstride..][..hd] and dk_j, dv_j
/// = dk[j·hd..], dv[j·hd..]. Each element's updates happen in j order with the multiply and add
/// rounded separately, so the vector paths give the scalar loop's bits.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward_keys(
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
    ds: &[f32],
    p: &[f32],
    q: &[f32],
    dout: &[f32],
    k: &[f32],
    kfirst: usize,
    kstride: usize,
) {
    let (n, hd) = (ds.len(), dq.len());
    assert!(p.len() == n && q.len() == hd && dout.len() == hd);
    assert!(dk.len() >= n * hd && dv.len() >= n * hd);
    if n > 0 {
        assert!(k.len() >= kfirst + (n - 1) * kstride + hd);
    }
    #[cfg(target_arch = "x86_64")]
    {
        if qlora_quant::use_avx512() {
            // SAFETY: AVX-512 detected; the bounds are asserted above.
            unsafe {
                attention_backward_keys_avx512(dq, dk, dv, ds, p, q, dout, k, kfirst, kstride)
            };
            return;
        }
    }
    for j in 0..n {
        let krow = &k[kfirst + j * kstride..kfirst + j * kstride + hd];
        for i in 0..hd {
            dq[i] += ds[j] * krow[i];
            dk[j * hd + i] += ds[j] * q[i];
            dv[j * hd + i] += p[j] * dout[i];
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn attention_backward_keys_avx512(
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
    ds: &[f32],
    p: &[f32],
    q: &[f32],
    dout: &[f32],
    k: &[f32],
    kfirst: usize,
    kstride: usize,
) {
    use std::arch::x86_64::*;
    let hd = dq.len();
    let (dqp, dkp, dvp) = (dq.as_mut_ptr(), dk.as_mut_ptr(), dv.as_mut_ptr());
    let (qp, dop, kp) = (q.as_ptr(), dout.as_ptr(), k.as_ptr().add(kfirst));
    for j in 0..ds.len() {
        let (sj, pj) = (ds[j], p[j]);
        let (sv, pv) = (_mm512_set1_ps(sj), _mm512_set1_ps(pj));
        let kr = kp.add(j * kstride);
        let (dkr, dvr) = (dkp.add(j * hd), dvp.add(j * hd));
        let mut i = 0;
        while i + 16 <= hd {
            let upd = |acc: *mut f32, s: __m512, x: *const f32| {
                let a = _mm512_loadu_ps(acc);
                _mm512_storeu_ps(acc, _mm512_add_ps(a, _mm512_mul_ps(s, _mm512_loadu_ps(x))));
            };
            upd(dqp.add(i), sv, kr.add(i));
            upd(dkr.add(i), sv, qp.add(i));
            upd(dvr.add(i), pv, dop.add(i));
            i += 16;
        }
        while i < hd {
            *dqp.add(i) += sj * *kr.add(i);
            *dkr.add(i) += sj * *qp.add(i);
            *dvr.add(i) += pj * *dop.add(i);
            i += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    /// The vector path gives the scalar loop's bits.
    #[test]
    fn attention_backward_keys_equals_the_scalar_loop() {
        for hd in [8usize, 64, 70] {
            let (n, kstride) = (5, hd + 9);
            let f = |i: usize, m: usize| ((i * m % 23) as f32 - 11.0) / 5.0;
            let k: Vec<f32> = (0..3 + n * kstride).map(|i| f(i, 7)).collect();
            let (q, dout): (Vec<f32>, Vec<f32>) = (
                (0..hd).map(|i| f(i, 3)).collect(),
                (0..hd).map(|i| f(i, 5)).collect(),
            );
            let (ds, p): (Vec<f32>, Vec<f32>) = (
                (0..n).map(|i| f(i, 11) * 0.1).collect(),
                (0..n).map(|i| 0.1 + i as f32 * 0.2).collect(),
            );
            let init = |m: usize, len: usize| (0..len).map(|i| f(i, m) * 0.3).collect::<Vec<f32>>();
            let (mut dq, mut dk, mut dv) = (init(13, hd), init(17, n * hd), init(19, n * hd));
            let (mut wq, mut wk, mut wv) = (dq.clone(), dk.clone(), dv.clone());
            for j in 0..n {
                for i in 0..hd {
                    wq[i] += ds[j] * k[3 + j * kstride + i];
                    wk[j * hd + i] += ds[j] * q[i];
                    wv[j * hd + i] += p[j] * dout[i];
                }
            }
            super::attention_backward_keys(
                &mut dq, &mut dk, &mut dv, &ds, &p, &q, &dout, &k, 3, kstride,
            );
            assert_eq!((dq, dk, dv), (wq, wk, wv), "hd={hd}");
        }
    }

    /// The scores of a run of keys have `dot`'s bits, key by key (widths that take every
    /// branch of the dot: runs of 32, of 8, the scalar tail), strided keys.
    #[test]
    fn scaled_dots_equal_dot_times_scale() {
        for n in [1usize, 7, 8, 31, 32, 33, 64, 100, 128] {
            let (keys, stride) = (11, n + 5);
            let q: Vec<f32> = (0..n).map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.11).collect();
            let k: Vec<f32> = (0..keys * stride + 3)
                .map(|i| ((i * 5 % 17) as f32 - 8.0) * 0.37)
                .collect();
            let scale = 1.0 / (n as f32).sqrt();
            let want: Vec<f32> = (0..keys)
                .map(|j| super::dot(&q, &k[3 + j * stride..3 + j * stride + n]) * scale)
                .collect();
            let mut got = vec![f32::NAN; keys];
            super::scaled_dots(&q, &k, 3, stride, scale, &mut got);
            assert_eq!(got, want, "n={n}");
        }
    }

    /// The vector paths give the scalar loop's bits (odd widths, strided rows; widths that take
    /// the 64-element blocks, the single vectors and the tail), the AVX2 path on AVX-512
    /// hosts as well.
    #[test]
    fn weighted_rows_equal_the_scalar_loop() {
        for n in [1usize, 7, 16, 64, 70, 128, 136, 200] {
            let (rows, stride) = (9, n + 3);
            let v: Vec<f32> = (0..rows * stride + 2)
                .map(|i| ((i * 13 % 29) as f32 - 14.0) / 7.0)
                .collect();
            let w: Vec<f32> = (0..rows).map(|j| 0.1 + j as f32 * 0.37).collect();
            let sum: f32 = w.iter().sum();
            let mut want = vec![0.5f32; n];
            for (j, &s) in w.iter().enumerate() {
                let p = s / sum;
                for c in 0..n {
                    want[c] += p * v[2 + j * stride + c];
                }
            }
            let mut got = vec![0.5f32; n];
            super::weighted_rows(&mut got, &w, sum, &v, 2, stride);
            assert_eq!(got, want, "n={n}");
            #[cfg(target_arch = "x86_64")]
            if std::is_x86_feature_detected!("avx2") {
                let mut got = vec![0.5f32; n];
                // SAFETY: AVX2 detected; v holds every row read.
                unsafe { super::weighted_rows_avx2(&mut got, &w, sum, &v, 2, stride) };
                assert_eq!(got, want, "avx2 n={n}");
            }
        }
    }

    #[test]
    fn dot_matches_f64_sum() {
        for n in [0, 1, 7, 8, 31, 32, 33, 100, 577] {
            let a: Vec<f32> = (0..n).map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.1).collect();
            let b: Vec<f32> = (0..n).map(|i| ((i * 5 % 11) as f32 - 5.0) * 0.3).collect();
            let want: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            assert!((super::dot(&a, &b) as f64 - want).abs() < 1e-4, "n={n}");
            assert!(
                (super::dot_portable(&a, &b) as f64 - want).abs() < 1e-4,
                "n={n}"
            );
        }
    }
}
