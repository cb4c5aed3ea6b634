//! Kernel benchmarks on the GPU: device copy bandwidth (the ceiling), NF4 dequantization and
//! the fused NF4 GEMV at Mistral-7B's shapes. Event-timed, medians of several runs, inputs
//! rotated over several buffers larger than L2 together.

use crate::gpu::{check, Arg, DevBuf, Gemv4, GemvFuse, Gemvq, Gpu};
use crate::Result;

pub struct KernelRow {
    pub name: String,
    /// Median milliseconds per call.
    pub ms: f64,
    /// Bytes read + written per call over the time.
    pub gbps: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn random_buf(gpu: &Gpu, bytes: usize, seed: u64) -> Result<DevBuf> {
    let mut x = seed | 1;
    let host: Vec<u8> = (0..bytes)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();
    gpu.upload(&host)
}

/// Median ms of one `f(i)` (i rotates over `sets` input sets): `PER_GRAPH` calls captured in
/// a CUDA graph and replayed `reps` times, so the figure is the kernel back to back as in a
/// decode step's graph, without the host's launch latency.
fn time(gpu: &Gpu, reps: usize, sets: usize, f: impl Fn(usize) -> Result<()>) -> Result<f64> {
    const PER_GRAPH: usize = 16;
    for i in 0..sets {
        f(i)?; // warm-up, outside the capture
    }
    gpu.begin_capture()?;
    let captured = (0..PER_GRAPH).try_for_each(|i| f(i % sets));
    let graph = gpu.end_capture();
    captured?;
    let graph = graph?;
    gpu.replay(&graph)?;
    let mut v = Vec::new();
    for _ in 0..reps {
        v.push(gpu.time_ms(|| gpu.replay(&graph))? / PER_GRAPH as f64);
    }
    Ok(median(v))
}

pub fn bench_kernels(gpu: &Gpu, reps: usize) -> Result<Vec<KernelRow>> {
    use Arg::*;
    gpu.bind()?;
    let lp = gpu.lp().size();
    let mut rows = Vec::new();
    // The ceiling: a 1 GiB device-to-device copy (bytes read + written).
    let n = 1usize << 30;
    let (a, b) = (gpu.alloc(n)?, gpu.alloc(n)?);
    // Timed call by call (a memcpy node in a graph may go to a copy engine, far slower than
    // the copy kernel a plain stream copy runs; at 1 GiB the launch latency is noise).
    let copy = || unsafe {
        check(
            cudarc::driver::sys::cuMemcpyDtoDAsync_v2(b.ptr(), a.ptr(), n, gpu.stream),
            "cuMemcpyDtoDAsync",
        )
    };
    copy()?;
    let ms = median(
        (0..reps)
            .map(|_| gpu.time_ms(copy))
            .collect::<Result<_>>()?,
    );
    rows.push(KernelRow {
        name: "copy 1 GiB (device to device)".into(),
        ms,
        gbps: 2.0 * n as f64 / ms / 1e6,
    });
    drop((a, b));
    let code = gpu.upload(&qlora_quant::Quant4::Nf4.code())?;
    for (name, r, c) in [
        ("q/o_proj", 4096usize, 4096usize),
        ("gate+up (fused)", 28672, 4096),
        ("down_proj", 4096, 14336),
    ] {
        let el = r * c;
        // Enough copies that together they are 4× the 60 MB L2: every call reads DRAM.
        let sets = (256usize << 20).div_ceil(el / 2).max(2);
        let packed: Vec<DevBuf> = (0..sets)
            .map(|i| random_buf(gpu, el / 2, 7 + i as u64))
            .collect::<Result<_>>()?;
        let absmax: Vec<DevBuf> = (0..sets)
            .map(|_| gpu.upload(&vec![0.02f32; el / 64]))
            .collect::<Result<_>>()?;
        let out = gpu.alloc(el * lp)?;
        let ms = time(gpu, reps, sets, |i| {
            gpu.launch_n(
                "dequant4_x32",
                el / 32,
                &[
                    P(packed[i].ptr()),
                    P(absmax[i].ptr()),
                    P(code.ptr()),
                    I(64),
                    L((el / 32) as i64),
                    P(out.ptr()),
                ],
            )
        })?;
        let bytes = el / 2 + el / 64 * 4 + el * lp;
        rows.push(KernelRow {
            name: format!("dequant nf4 {name} [{r}, {c}] → {:?}", gpu.lp()),
            ms,
            gbps: bytes as f64 / ms / 1e6,
        });
        let x = random_buf(gpu, 8 * c * lp, 3)?;
        // Fill x with small finite values (random bytes may be NaN patterns).
        gpu.write(&x, 0, &vec![0u8; 8 * c * lp])?;
        let y = gpu.alloc(8 * r * 4)?;
        // Copy i of the weights, t tokens of x into y.
        let gemv = |i: usize, t: usize| Gemv4 {
            packed: packed[i].ptr(),
            absmax: absmax[i].ptr(),
            code: code.ptr(),
            blocksize: 64,
            rows: r,
            cols: c,
            x: x.ptr(),
            t,
            y: y.ptr(),
            ld: r,
            accumulate: false,
        };
        // One token through every family; 8 (a decode batch) through the tensor-core ones.
        for (kernel, t) in [
            ("gemv4h", 1),
            ("gemv4m", 1),
            ("gemv4xh_t1", 1),
            ("gemv4xh4_t1", 1),
            ("gemv4x_t1", 1),
            ("gemv4s_t1", 1),
            ("gemv4_t1", 1),
            ("gemv4h", 8),
            ("gemv4m", 8),
            ("gemv4s_t8", 8),
        ] {
            if kernel == "gemv4h" && !gpu.gemv4h_fits(t, c, 64) {
                continue;
            }
            let ms = time(gpu, reps, sets, |i| gpu.gemv4_with(kernel, &gemv(i, t)))?;
            let bytes = el / 2 + el / 64 * 4;
            rows.push(KernelRow {
                name: format!("{kernel} t={t} {name} [{r}, {c}]"),
                ms,
                gbps: bytes as f64 / ms / 1e6,
            });
        }
        // The one-token GEMV with what it folds in (bf16 mode): the norm before it (n), the
        // SwiGLU after it (g: the rows as gate | up halves), an r=16 LoRA, shrink and expand
        // (l). Bytes: the weights (plus A's and B's for l).
        if gpu.precision == crate::Precision::Bf16 {
            let lr = 16;
            let (xn, gn) = (gpu.upload(&vec![0.5f32; c])?, gpu.upload(&vec![1.0f32; c])?);
            let (la, lb) = (
                gpu.upload(&vec![0.01f32; lr * c])?,
                gpu.upload(&vec![0.01f32; r * lr])?,
            );
            let lh = gpu.upload(&vec![0.1f32; lr])?;
            let lflag = gpu.upload(&[0u32; 2])?;
            for (label, norm, pair, rank) in [
                ("n", true, false, 0),
                ("ng", true, true, 0),
                ("l", false, false, lr),
                ("ngl", true, true, lr),
            ] {
                let fz = GemvFuse {
                    xn: if norm { xn.ptr() } else { 0 },
                    gn: gn.ptr(),
                    eps: 1e-5,
                    pair: if pair { r / 2 } else { 0 },
                    lb: lb.ptr(),
                    lr: rank,
                    lh: lh.ptr(),
                    la: la.ptr(),
                    lflag: lflag.ptr(),
                    lora_fallback: false,
                };
                if gpu.gemv4_fused_shape(&gemv(0, 1), &fz)?.is_none() {
                    continue;
                }
                let ms = time(gpu, reps, sets, |i| {
                    gpu.gemv4_fused(&gemv(i, 1), &fz).map(|_| ())
                })?;
                let bytes = el / 2 + el / 64 * 4 + (r + c) * rank * 4;
                rows.push(KernelRow {
                    name: format!("gemv4xh_{label}_t1 t=1 {name} [{r}, {c}]"),
                    ms,
                    gbps: bytes as f64 / ms / 1e6,
                });
            }
        }
        // GPTQ 4-bit in groups of 128 (the common checkpoint), the same codes' bytes.
        let groups = c / 128;
        // Scales and zeros per copy too, so that they are read from DRAM as well.
        let scales: Vec<DevBuf> = (0..sets)
            .map(|_| gpu.upload(&vec![0.01f32; r * groups]))
            .collect::<Result<_>>()?;
        let zeros: Vec<DevBuf> = (0..sets)
            .map(|_| gpu.upload(&vec![8.0f32; r * groups]))
            .collect::<Result<_>>()?;
        for t in [1usize, 8] {
            let ms = time(gpu, reps, sets, |i| {
                gpu.gemvq(&Gemvq {
                    codes: packed[i].ptr(),
                    scales: scales[i].ptr(),
                    zeros: zeros[i].ptr(),
                    perm: 0,
                    bits: 4,
                    group_size: 128,
                    groups,
                    rows: r,
                    cols: c,
                    x: x.ptr(),
                    t,
                    y: y.ptr(),
                    ld: r,
                    accumulate: false,
                })
            })?;
            let bytes = el / 2 + 2 * r * groups * 4;
            rows.push(KernelRow {
                name: format!("gemvq4 g128 t={t} {name} [{r}, {c}]"),
                ms,
                gbps: bytes as f64 / ms / 1e6,
            });
        }
    }
    Ok(rows)
}
