//! `--device` and `--precision`: running a loaded model on the CPU or a CUDA GPU through one
//! `Decoder`.

use anyhow::{bail, Result};
use qlora_engine::{Device, DeviceRequest};
use qlora_model::{CpuDecoder, Decoder, Model};

#[derive(clap::Args, Clone, Debug)]
pub struct DeviceArgs {
    /// Where to run: cpu, cuda (GPU 0), cuda:N, or auto (GPU 0 when the NVIDIA driver reports
    /// a GPU, else cpu).
    #[arg(long, default_value = "cpu", value_parser = parse_device)]
    pub device: DeviceRequest,
    /// GPU arithmetic: bf16 (bf16 weights/activations into f32-accumulating products; the
    /// default) or f32 (no TF32; equals the CPU within 1e-4, for checking).
    #[arg(long, value_parser = ["bf16", "f32"])]
    pub precision: Option<String>,
    /// GPU: positions the paged KV cache holds (default: the model's context, at most 32768;
    /// for `serve`, --max-concurrent × (prompt + --max-tokens), at most 262144).
    #[arg(long)]
    pub kv_tokens: Option<usize>,
}

impl Default for DeviceArgs {
    fn default() -> Self {
        DeviceArgs {
            device: DeviceRequest::Exactly(Device::Cpu),
            precision: None,
            kv_tokens: None,
        }
    }
}

pub fn parse_device(s: &str) -> std::result::Result<DeviceRequest, String> {
    s.parse()
}

impl DeviceArgs {
    /// The device to use; `auto` probes for a usable GPU.
    pub fn resolve(&self) -> Result<Device> {
        if self.precision.is_some() && self.device == DeviceRequest::Exactly(Device::Cpu) {
            bail!("--precision applies to GPUs; the CPU computes in f32 (drop --precision or add --device cuda)");
        }
        Ok(match self.device {
            DeviceRequest::Exactly(d) => d,
            // A GPU the driver reports; a missing cuBLAS or NVRTC then fails with its own line.
            DeviceRequest::Auto => {
                #[cfg(feature = "cuda")]
                {
                    if qlora_cuda::device_count() > 0 {
                        Device::Cuda(0)
                    } else {
                        Device::Cpu
                    }
                }
                #[cfg(not(feature = "cuda"))]
                Device::Cpu
            }
        })
    }

    /// Runs `f` with a decoder for `model` on the chosen device (on a GPU, after uploading
    /// the model's weights in their stored formats).
    pub fn with_decoder<R>(
        &self,
        model: &Model,
        f: impl FnOnce(&mut dyn Decoder) -> Result<R>,
    ) -> Result<R> {
        match self.resolve()? {
            Device::Cpu => f(&mut CpuDecoder::new(model)),
            #[cfg(feature = "cuda")]
            Device::Cuda(n) => {
                let mut m = self.upload(model, n, 1)?;
                let mut d = qlora_cuda::CudaDecoder::new(&mut m);
                let r = f(&mut d);
                drop(d);
                r
            }
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => bail!(
                "this qlora was built without the `cuda` feature; rebuild with `cargo build --release --features cuda` or use --device cpu"
            ),
        }
    }

    #[cfg(feature = "cuda")]
    pub fn precision(&self) -> qlora_cuda::Precision {
        match self.precision.as_deref() {
            Some("f32") => qlora_cuda::Precision::F32,
            _ => qlora_cuda::Precision::Bf16,
        }
    }

    /// Opens GPU `ordinal` in the chosen precision (kernels compiled for it).
    #[cfg(feature = "cuda")]
    pub fn open_gpu(&self, ordinal: usize) -> Result<std::sync::Arc<qlora_cuda::Gpu>> {
        qlora_cuda::Gpu::open(ordinal, self.precision())
            .map_err(|e| anyhow::anyhow!("--device cuda:{ordinal}: {e}"))
    }

    /// Opens GPU `ordinal` and uploads `model`, with room for `max_seqs` sequences.
    #[cfg(feature = "cuda")]
    pub fn upload(
        &self,
        model: &Model,
        ordinal: usize,
        max_seqs: usize,
    ) -> Result<qlora_cuda::CudaModel> {
        let gpu = self.open_gpu(ordinal)?;
        let ctx = model.config.max_position_embeddings.min(32768);
        let opts = qlora_cuda::CudaOptions {
            kv_tokens: self.kv_tokens.unwrap_or(ctx * max_seqs.min(2)),
            max_seqs,
            ..Default::default()
        };
        let t = std::time::Instant::now();
        let m = qlora_cuda::CudaModel::upload(gpu, model, opts)
            .map_err(|e| anyhow::anyhow!("--device cuda:{ordinal}: {e}"))?;
        eprintln!(
            "cuda:{ordinal}: {} (sm_{}{}), {:?}, kernels compiled in {:.2} s, weights uploaded in {:.2} s",
            m.gpu.name,
            m.gpu.arch.0,
            m.gpu.arch.1,
            m.gpu.precision,
            m.gpu.compile_s,
            t.elapsed().as_secs_f64()
        );
        Ok(m)
    }
}
