//! NCCL for data-parallel training: one communicator per rank (each process its GPU), the
//! adapters' gradients summed in place on the device (`CudaTrainer::set_comm`). libnccl is
//! loaded at run time like the other CUDA libraries; without it, training sums through the
//! host (`qlora_train::dist::TcpGroup`). NVLink multicast (NVLS) stays off
//! (NCCL_NVLS_ENABLE=0 unless the environment says otherwise), and qlora never creates
//! multicast objects.

use crate::gpu::Gpu;
use crate::{Error, Result};
use cudarc::nccl::sys as nc;
use std::sync::Arc;

/// Whether libnccl can be loaded.
pub fn nccl_present() -> bool {
    unsafe { nc::is_culib_present() }
}

fn check(r: nc::ncclResult_t, what: &str) -> Result<()> {
    if r == nc::ncclResult_t::ncclSuccess {
        return Ok(());
    }
    let msg = unsafe {
        let p = nc::ncclGetErrorString(r);
        if p.is_null() {
            String::new()
        } else {
            std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    };
    Err(Error::Cuda(format!("NCCL {what}: {r:?} {msg}")))
}

/// A new communicator's id (rank 0 makes it and gives it to the others).
pub fn unique_id() -> Result<[u8; 128]> {
    if !nccl_present() {
        return Err(Error::Missing(
            "libnccl.so.2 (NCCL) is not found; install it (pip install nvidia-nccl-cu13, or the CUDA toolkit's) or train through the host".into(),
        ));
    }
    let mut id = nc::ncclUniqueId { internal: [0; 128] };
    check(unsafe { nc::ncclGetUniqueId(&mut id) }, "ncclGetUniqueId")?;
    Ok(id.internal.map(|c| c as u8))
}

/// One rank's communicator, on its GPU's stream.
pub struct NcclComm {
    comm: nc::ncclComm_t,
    gpu: Arc<Gpu>,
}

unsafe impl Send for NcclComm {}

impl NcclComm {
    /// Joins the communicator `id` as `rank` of `world` on `gpu` (every rank calls this with
    /// the same id; it returns when all have).
    pub fn new(gpu: Arc<Gpu>, id: [u8; 128], rank: usize, world: usize) -> Result<NcclComm> {
        if !nccl_present() {
            return Err(Error::Missing("libnccl.so.2 (NCCL) is not found".into()));
        }
        if std::env::var_os("NCCL_NVLS_ENABLE").is_none() {
            // Before NCCL reads its environment (edition 2021: set_var is safe here; no
            // other thread reads the environment while the ranks start).
            std::env::set_var("NCCL_NVLS_ENABLE", "0");
        }
        gpu.bind()?;
        let uid = nc::ncclUniqueId {
            internal: id.map(|b| b as std::ffi::c_char),
        };
        let mut comm = std::ptr::null_mut();
        check(
            unsafe { nc::ncclCommInitRank(&mut comm, world as i32, uid, rank as i32) },
            "ncclCommInitRank",
        )?;
        Ok(NcclComm { comm, gpu })
    }

    /// Sums each f32 buffer (device pointer, elements) over the ranks, in place, on the GPU's
    /// stream, as one NCCL group.
    pub fn all_reduce_sum(&self, bufs: &[(u64, usize)]) -> Result<()> {
        self.gpu.bind()?;
        let stream = self.gpu.stream as nc::cudaStream_t;
        check(unsafe { nc::ncclGroupStart() }, "ncclGroupStart")?;
        for &(p, n) in bufs {
            let r = unsafe {
                nc::ncclAllReduce(
                    p as *const std::ffi::c_void,
                    p as *mut std::ffi::c_void,
                    n,
                    nc::ncclDataType_t::ncclFloat32,
                    nc::ncclRedOp_t::ncclSum,
                    self.comm,
                    stream,
                )
            };
            if r != nc::ncclResult_t::ncclSuccess {
                let _ = unsafe { nc::ncclGroupEnd() };
                return check(r, "ncclAllReduce");
            }
        }
        check(unsafe { nc::ncclGroupEnd() }, "ncclGroupEnd")
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        unsafe {
            nc::ncclCommDestroy(self.comm);
        }
    }
}
