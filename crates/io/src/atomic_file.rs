//! A file written under a temporary name beside its final one (`dir/.name.tmp`), fsynced and
//! renamed into place by `finish`; dropped unfinished, the partial file is removed. Every
//! streamed writer (safetensors, GGUF) writes through one, so no reader ever sees half a file
//! under the final name.

use crate::{Error, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

pub(crate) struct AtomicFile {
    path: PathBuf,
    tmp: PathBuf,
    out: Option<std::io::BufWriter<std::fs::File>>,
}

impl AtomicFile {
    pub(crate) fn create(path: &Path) -> Result<Self> {
        let tmp = tmp_path(path);
        let file = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        Ok(AtomicFile {
            path: path.into(),
            tmp,
            out: Some(std::io::BufWriter::with_capacity(1 << 20, file)),
        })
    }

    pub(crate) fn write_all(&mut self, data: &[u8]) -> Result<()> {
        let w = self.out.as_mut().expect("open until finish");
        w.write_all(data).map_err(|e| Error::io(&self.tmp, e))
    }

    /// Flushes, fsyncs and renames the file into place.
    pub(crate) fn finish(mut self) -> Result<()> {
        let mut w = self.out.take().expect("open until finish");
        let mut done = || -> std::io::Result<()> {
            w.flush()?;
            w.get_ref().sync_all()
        };
        if let Err(e) = done() {
            let _ = std::fs::remove_file(&self.tmp);
            return Err(Error::io(&self.tmp, e));
        }
        std::fs::rename(&self.tmp, &self.path).map_err(|e| Error::io(&self.path, e))
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.out.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// `dir/name` → `dir/.name.tmp`: where a file is written before it is renamed into place.
pub(crate) fn tmp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp"))
}
