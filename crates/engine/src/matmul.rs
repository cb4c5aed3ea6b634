//! y = x · wᵀ for a widened weight tile, with AVX-512: the prefill product. Both operands are
//! row-major along the reduction (x [t, k], the tile [n, k]), so no packing or transposition is
//! needed: a block of 4 tokens × 4 rows keeps 16 vector accumulators in registers over the whole
//! k, loading 8 vectors per 16 FMAs, and reduces each accumulator once at the end. The `gemm`
//! crate's AVX-512 kernels need a nightly compiler; on stable it runs its AVX2 ones, at half the
//! width.

/// Tokens per block.
const TB: usize = 4;
/// Rows per block.
const RB: usize = 4;

/// Whether `nt` runs (the CPU has AVX-512F and `QLORA_NO_AVX512` is not set).
pub fn available() -> bool {
    qlora_quant::use_avx512()
}

/// y[i·ys + j] = Σ_c x[i·k + c] · w[j·k + c] for i < t, j < n.
///
/// # Safety
/// `available()` must be true; `y` must be valid for writes at every such index, written by no
/// one else meanwhile.
#[cfg(target_arch = "x86_64")]
pub unsafe fn nt(x: &[f32], t: usize, w: &[f32], n: usize, k: usize, y: *mut f32, ys: usize) {
    debug_assert!(x.len() >= t * k && w.len() >= n * k);
    for_blocks(t, n, |i, j, tb, rb| {
        let (xp, wp, yp) = (
            x.as_ptr().add(i * k),
            w.as_ptr().add(j * k),
            y.add(i * ys + j),
        );
        by_shape!(block, tb, rb, xp, wp, k, yp, ys);
    });
}

/// Calls `f(i, j, tb, rb)` for each block of up to TB tokens × RB rows of a t × n output,
/// tokens outer.
#[cfg(target_arch = "x86_64")]
fn for_blocks(t: usize, n: usize, mut f: impl FnMut(usize, usize, usize, usize)) {
    let mut i = 0;
    while i < t {
        let tb = TB.min(t - i);
        let mut j = 0;
        while j < n {
            let rb = RB.min(n - j);
            f(i, j, tb, rb);
            j += rb;
        }
        i += tb;
    }
}

/// `$block::<tb, rb>(args)` for runtime tb, rb ≤ 4.
#[cfg(target_arch = "x86_64")]
macro_rules! by_shape {
    ($block:ident, $tb:expr, $rb:expr, $($arg:expr),*) => {
        by_shape!(@arms $block, ($tb, $rb), ($($arg),*);
            1, 1; 1, 2; 1, 3; 1, 4; 2, 1; 2, 2; 2, 3; 2, 4; 3, 1; 3, 2; 3, 3; 3, 4; 4, 1; 4, 2; 4, 3; 4, 4)
    };
    (@arms $block:ident, $sel:expr, $args:tt; $($a:literal, $b:literal);*) => {
        match $sel {
            $(($a, $b) => by_shape!(@call $block, $a, $b, $args),)*
            _ => unreachable!(),
        }
    };
    (@call $block:ident, $a:literal, $b:literal, ($($arg:expr),*)) => {
        $block::<$a, $b>($($arg),*)
    };
}
#[cfg(target_arch = "x86_64")]
use by_shape;

#[cfg(not(target_arch = "x86_64"))]
pub unsafe fn nt(_: &[f32], _: usize, _: &[f32], _: usize, _: usize, _: *mut f32, _: usize) {
    unreachable!("available() is false off x86_64")
}

/// Whether `nt_bf16` runs: what `nt` needs, and AVX512-BF16.
pub fn bf16_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        available() && std::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// dst[i] = src[i] rounded to bf16, to nearest even (NaN stays NaN), as its bits.
///
/// # Safety
/// `bf16_available()` must be true; `dst` at least as long as `src`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16,avx512bw")]
pub unsafe fn to_bf16(src: &[f32], dst: &mut [u16]) {
    use std::arch::x86_64::*;
    debug_assert!(dst.len() >= src.len());
    let n = src.len();
    let mut i = 0;
    while i < n {
        let left = (n - i).min(16);
        let m: __mmask16 = if left == 16 {
            u16::MAX
        } else {
            (1u16 << left) - 1
        };
        let v = _mm512_maskz_loadu_ps(m, src.as_ptr().add(i));
        let h = std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(v));
        _mm256_mask_storeu_epi16(dst.as_mut_ptr().add(i) as *mut i16, m, h);
        i += 16;
    }
}

#[cfg(not(target_arch = "x86_64"))]
pub unsafe fn to_bf16(_: &[f32], _: &mut [u16]) {
    unreachable!("bf16_available() is false off x86_64")
}

/// `nt` over bf16 operands (their bits): y[i·ys + j] = Σ_c x[i·k + c] · w[j·k + c], each pair
/// of products by one `vdpbf16ps` (bf16 products are exact in f32; the sums are f32), twice
/// the multiply-adds an instruction of `nt`'s f32 FMAs.
///
/// # Safety
/// As `nt`, with `bf16_available()`.
#[cfg(target_arch = "x86_64")]
pub unsafe fn nt_bf16(x: &[u16], t: usize, w: &[u16], n: usize, k: usize, y: *mut f32, ys: usize) {
    debug_assert!(x.len() >= t * k && w.len() >= n * k);
    for_blocks(t, n, |i, j, tb, rb| {
        let (xp, wp, yp) = (
            x.as_ptr().add(i * k),
            w.as_ptr().add(j * k),
            y.add(i * ys + j),
        );
        by_shape!(block_bf16, tb, rb, xp, wp, k, yp, ys);
    });
}

#[cfg(not(target_arch = "x86_64"))]
pub unsafe fn nt_bf16(_: &[u16], _: usize, _: &[u16], _: usize, _: usize, _: *mut f32, _: usize) {
    unreachable!("bf16_available() is false off x86_64")
}

/// One T × R block of `nt_bf16` over the whole k, 32 elements at a time (the tail masked).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16,avx512bw")]
#[allow(clippy::needless_range_loop)]
unsafe fn block_bf16<const T: usize, const R: usize>(
    x: *const u16,
    w: *const u16,
    k: usize,
    y: *mut f32,
    ys: usize,
) {
    use std::arch::x86_64::*;
    let ld = |p: *const u16| -> __m512bh {
        std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(p as *const _))
    };
    let ldm = |m: __mmask32, p: *const u16| -> __m512bh {
        std::mem::transmute::<__m512i, __m512bh>(_mm512_maskz_loadu_epi16(m, p as *const i16))
    };
    let mut acc = [[_mm512_setzero_ps(); R]; T];
    let mut c = 0;
    while c + 32 <= k {
        let mut xv: [__m512bh; T] =
            [std::mem::transmute::<__m512, __m512bh>(_mm512_setzero_ps()); T];
        for (a, xv) in xv.iter_mut().enumerate() {
            *xv = ld(x.add(a * k + c));
        }
        for b in 0..R {
            let wv = ld(w.add(b * k + c));
            for a in 0..T {
                acc[a][b] = _mm512_dpbf16_ps(acc[a][b], xv[a], wv);
            }
        }
        c += 32;
    }
    if c < k {
        let m: __mmask32 = (1u32 << (k - c)) - 1;
        for b in 0..R {
            let wv = ldm(m, w.add(b * k + c));
            for a in 0..T {
                let xv = ldm(m, x.add(a * k + c));
                acc[a][b] = _mm512_dpbf16_ps(acc[a][b], xv, wv);
            }
        }
    }
    for (a, row) in acc.iter().enumerate() {
        for (b, v) in row.iter().enumerate() {
            *y.add(a * ys + b) = _mm512_reduce_add_ps(*v);
        }
    }
}

/// C[i·ldc + j] += Σ_r A[i·lda + r] · B[r·ldb + j] for i < t, j < m, r < n: the training
/// backward's dx += dy · W over a widened tile. Blocks of up to 6 rows of A × 64 columns of B
/// (24 accumulators), each output summed over r in order (no dependence on scheduling).
///
/// # Safety
/// `available()` must be true; `c` valid for reads and writes at every such index, used by no
/// one else meanwhile; `a`, `b` hold the indexed elements.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn nn_acc(
    a: *const f32,
    lda: usize,
    b: *const f32,
    ldb: usize,
    t: usize,
    n: usize,
    m: usize,
    c: *mut f32,
    ldc: usize,
) {
    let mut i = 0;
    while i < t {
        let tb = 6.min(t - i);
        let (ap, cp) = (a.add(i * lda), c.add(i * ldc));
        let mut j = 0;
        while j < m {
            let left = m - j;
            macro_rules! go {
                ($v:literal, $mask:expr) => {
                    match tb {
                        1 => block_nn::<1, $v>(ap, lda, b.add(j), ldb, n, cp.add(j), ldc, $mask),
                        2 => block_nn::<2, $v>(ap, lda, b.add(j), ldb, n, cp.add(j), ldc, $mask),
                        3 => block_nn::<3, $v>(ap, lda, b.add(j), ldb, n, cp.add(j), ldc, $mask),
                        4 => block_nn::<4, $v>(ap, lda, b.add(j), ldb, n, cp.add(j), ldc, $mask),
                        5 => block_nn::<5, $v>(ap, lda, b.add(j), ldb, n, cp.add(j), ldc, $mask),
                        _ => block_nn::<6, $v>(ap, lda, b.add(j), ldb, n, cp.add(j), ldc, $mask),
                    }
                };
            }
            if left >= 64 {
                go!(4, u16::MAX);
                j += 64;
            } else if left >= 16 {
                go!(1, u16::MAX);
                j += 16;
            } else {
                go!(1, (1u16 << left) - 1);
                j = m;
            }
        }
        i += tb;
    }
}

#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
pub unsafe fn nn_acc(
    _: *const f32,
    _: usize,
    _: *const f32,
    _: usize,
    _: usize,
    _: usize,
    _: usize,
    _: *mut f32,
    _: usize,
) {
    unreachable!("available() is false off x86_64")
}

/// T rows × V vectors of 16 columns (the last one under `mask`), accumulated into C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn block_nn<const T: usize, const V: usize>(
    a: *const f32,
    lda: usize,
    b: *const f32,
    ldb: usize,
    n: usize,
    c: *mut f32,
    ldc: usize,
    mask: u16,
) {
    use std::arch::x86_64::*;
    let m = |v: usize| if v + 1 == V { mask } else { u16::MAX };
    let mut acc = [[_mm512_setzero_ps(); V]; T];
    for (i, row) in acc.iter_mut().enumerate() {
        for (v, x) in row.iter_mut().enumerate() {
            *x = _mm512_maskz_loadu_ps(m(v), c.add(i * ldc + 16 * v));
        }
    }
    for r in 0..n {
        let mut bv = [_mm512_setzero_ps(); V];
        for (v, x) in bv.iter_mut().enumerate() {
            *x = _mm512_maskz_loadu_ps(m(v), b.add(r * ldb + 16 * v));
        }
        for (i, row) in acc.iter_mut().enumerate() {
            let av = _mm512_set1_ps(*a.add(i * lda + r));
            for (x, bv) in row.iter_mut().zip(&bv) {
                *x = _mm512_fmadd_ps(av, *bv, *x);
            }
        }
    }
    for (i, row) in acc.iter().enumerate() {
        for (v, x) in row.iter().enumerate() {
            _mm512_mask_storeu_ps(c.add(i * ldc + 16 * v), m(v), *x);
        }
    }
}

/// One T × R block over the whole k, 16 lanes at a time (the tail masked).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
// Row-outer, token-inner: each weight vector is loaded once and used T times, so the loops
// index `acc` by both counters.
#[allow(clippy::needless_range_loop)]
unsafe fn block<const T: usize, const R: usize>(
    x: *const f32,
    w: *const f32,
    k: usize,
    y: *mut f32,
    ys: usize,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); R]; T];
    let mut c = 0;
    while c + 16 <= k {
        let mut xv = [_mm512_setzero_ps(); T];
        for (a, xv) in xv.iter_mut().enumerate() {
            *xv = _mm512_loadu_ps(x.add(a * k + c));
        }
        for b in 0..R {
            let wv = _mm512_loadu_ps(w.add(b * k + c));
            for a in 0..T {
                acc[a][b] = _mm512_fmadd_ps(xv[a], wv, acc[a][b]);
            }
        }
        c += 16;
    }
    if c < k {
        let m: __mmask16 = (1u16 << (k - c)) - 1;
        for b in 0..R {
            let wv = _mm512_maskz_loadu_ps(m, w.add(b * k + c));
            for a in 0..T {
                let xv = _mm512_maskz_loadu_ps(m, x.add(a * k + c));
                acc[a][b] = _mm512_fmadd_ps(xv, wv, acc[a][b]);
            }
        }
    }
    for (a, row) in acc.iter().enumerate() {
        for (b, v) in row.iter().enumerate() {
            *y.add(a * ys + b) = _mm512_reduce_add_ps(*v);
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    /// C += A·B over odd shapes (row and column tails, strided A): equals f64 sums closely and
    /// leaves C's other elements alone.
    #[test]
    fn nn_acc_matches_sums() {
        if !available() {
            eprintln!("skipping: no AVX-512");
            return;
        }
        for (t, n, m) in [
            (1, 1, 1),
            (7, 5, 70),
            (13, 64, 576),
            (6, 3, 15),
            (2, 9, 129),
        ] {
            let lda = n + 2;
            let a: Vec<f32> = (0..t * lda)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
                .collect();
            let b: Vec<f32> = (0..n * m)
                .map(|i| ((i * 53 % 97) as f32 - 48.0) / 48.0)
                .collect();
            let ldc = m + 5;
            let c0: Vec<f32> = (0..t * ldc).map(|i| i as f32 * 0.01).collect();
            let mut c = c0.clone();
            // SAFETY: available() checked; the buffers hold the indexed elements.
            unsafe { nn_acc(a.as_ptr(), lda, b.as_ptr(), m, t, n, m, c.as_mut_ptr(), ldc) };
            for i in 0..t {
                for j in 0..ldc {
                    let got = c[i * ldc + j];
                    if j >= m {
                        assert_eq!(got, c0[i * ldc + j], "wrote past m");
                        continue;
                    }
                    let want = c0[i * ldc + j] as f64
                        + (0..n)
                            .map(|r| a[i * lda + r] as f64 * b[r * m + j] as f64)
                            .sum::<f64>();
                    assert!(
                        (got as f64 - want).abs() < 1e-4 * (1.0 + want.abs()),
                        "{t}x{n}x{m} [{i},{j}]: {got} vs {want}"
                    );
                }
            }
        }
    }

    /// bf16 rounding to nearest even (ties, NaN, inf, subnormals, odd lengths), and every
    /// block shape of `nt_bf16` with masked tails: each output equals the f64 dot product of
    /// the rounded operands closely.
    #[test]
    fn bf16_rounding_and_nt_bf16_match_sums() {
        if !bf16_available() {
            eprintln!("skipping: no AVX512-BF16");
            return;
        }
        let odd = [
            1.0f32,
            1.0 + f32::EPSILON,
            f32::from_bits(0x3f80_8000),
            f32::from_bits(0x3f81_8000),
            -2.5e-39,
            f32::INFINITY,
            f32::MAX,
            -0.0,
            1.234_567,
        ];
        for len in [1usize, 9, 16, 17, 33] {
            let src: Vec<f32> = (0..len)
                .map(|i| odd[i % odd.len()] * (1.0 + i as f32))
                .collect();
            let mut got = vec![0u16; len + 2];
            // SAFETY: bf16_available() checked; got is longer than src.
            unsafe { to_bf16(&src, &mut got) };
            for (i, v) in src.iter().enumerate() {
                assert_eq!(got[i], half::bf16::from_f32(*v).to_bits(), "{v:e}");
            }
            assert_eq!(&got[len..], &[0, 0], "wrote past the end");
        }
        let mut nan = [0u16; 1];
        // SAFETY: as above.
        unsafe { to_bf16(&[f32::NAN], &mut nan) };
        assert!(half::bf16::from_bits(nan[0]).is_nan());
        for (t, n, k) in [
            (1, 1, 32),
            (5, 7, 37),
            (9, 64, 576),
            (4, 4, 3),
            (13, 6, 100),
        ] {
            let (x, w) = operands(t, n, k);
            let (mut xb, mut wb) = (vec![0u16; t * k], vec![0u16; n * k]);
            // SAFETY: as above.
            unsafe {
                to_bf16(&x, &mut xb);
                to_bf16(&w, &mut wb);
            }
            let ys = n + 3;
            let mut y = vec![f32::NAN; t * ys];
            // SAFETY: bf16_available() checked; y holds t rows of ys ≥ n.
            unsafe { nt_bf16(&xb, t, &wb, n, k, y.as_mut_ptr(), ys) };
            let f = |v: &[u16]| -> Vec<f64> {
                v.iter()
                    .map(|b| half::bf16::from_bits(*b).to_f32() as f64)
                    .collect()
            };
            check_products(&y, ys, (t, n, k), &f(&xb), &f(&wb));
        }
    }

    /// x [t, k] and w [n, k] of O(1) values.
    fn operands(t: usize, n: usize, k: usize) -> (Vec<f32>, Vec<f32>) {
        let x = (0..t * k)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
            .collect();
        let w = (0..n * k)
            .map(|i| ((i * 53 % 97) as f32 - 48.0) / 48.0)
            .collect();
        (x, w)
    }

    /// y [t, ys]: each y[i, j] for j < n close to the f64 dot of x's row i and w's row j, and
    /// the columns from n on untouched (NaN).
    fn check_products(
        y: &[f32],
        ys: usize,
        (t, n, k): (usize, usize, usize),
        x: &[f64],
        w: &[f64],
    ) {
        for i in 0..t {
            for j in 0..n {
                let want: f64 = (0..k).map(|c| x[i * k + c] * w[j * k + c]).sum();
                let got = y[i * ys + j];
                assert!(
                    (got as f64 - want).abs() < 1e-4 * (1.0 + want.abs()),
                    "{t}x{n}x{k} [{i},{j}]: {got} vs {want}"
                );
            }
            assert!(
                y[i * ys + n..(i + 1) * ys].iter().all(|v| v.is_nan()),
                "wrote past n"
            );
        }
    }

    /// Every block shape and a masked tail: each output equals the f64 dot product closely.
    #[test]
    fn nt_matches_dot_products() {
        if !available() {
            eprintln!("skipping: no AVX-512");
            return;
        }
        for (t, n, k) in [
            (1, 1, 16),
            (5, 7, 37),
            (9, 64, 576),
            (4, 4, 3),
            (13, 6, 100),
        ] {
            let (x, w) = operands(t, n, k);
            let ys = n + 3;
            let mut y = vec![f32::NAN; t * ys];
            // SAFETY: available() checked; y holds t rows of ys ≥ n.
            unsafe { nt(&x, t, &w, n, k, y.as_mut_ptr(), ys) };
            let f = |v: &[f32]| -> Vec<f64> { v.iter().map(|x| *x as f64).collect() };
            check_products(&y, ys, (t, n, k), &f(&x), &f(&w));
        }
    }
}
