//! Tensor bytes that are either a range of a memory-mapped file or an owned buffer.

use std::ops::Range;
use std::sync::Arc;

#[derive(Clone)]
pub enum Bytes {
    Mapped {
        map: Arc<memmap2::Mmap>,
        range: Range<usize>,
    },
    Owned(Arc<Vec<u8>>),
}

impl Bytes {
    pub fn owned(v: Vec<u8>) -> Self {
        Bytes::Owned(Arc::new(v))
    }

    pub fn as_slice(&self) -> &[u8] {
        match self {
            Bytes::Mapped { map, range } => &map[range.clone()],
            Bytes::Owned(v) => v,
        }
    }

    pub fn len(&self) -> usize {
        self.as_slice().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Tells the kernel these bytes will not be read again soon: a mapped range's whole pages
    /// are dropped from this process's resident set (they are re-read from the file if touched
    /// again). Owned buffers are unaffected.
    pub fn release(&self) {
        #[cfg(unix)]
        if let Bytes::Mapped { map, range } = self {
            const PAGE: usize = 4096;
            let start = range.start.div_ceil(PAGE) * PAGE;
            let end = range.end / PAGE * PAGE;
            if end > start {
                // SAFETY: a read-only shared file mapping; MADV_DONTNEED only drops clean pages,
                // which later reads fault back in from the file. No reference into the dropped
                // pages is used after this call by the loader (other references re-fault).
                let _ = unsafe {
                    map.unchecked_advise_range(
                        memmap2::UncheckedAdvice::DontNeed,
                        start,
                        end - start,
                    )
                };
            }
        }
    }
}

impl std::fmt::Debug for Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bytes({} bytes)", self.len())
    }
}

/// Maps a whole file read-only.
pub(crate) fn map_file(path: &std::path::Path) -> crate::Result<Arc<memmap2::Mmap>> {
    let file = std::fs::File::open(path).map_err(|e| crate::Error::io(path, e))?;
    // SAFETY: the map is read-only; like every mmap-based loader (safetensors, llama.cpp) we rely
    // on the file not being truncated by another process while it is open.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| crate::Error::io(path, e))?;
    Ok(Arc::new(map))
}

impl AsRef<[u8]> for Bytes {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}
