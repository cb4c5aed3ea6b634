//! Directories written under a temporary name and renamed into place when complete, so a killed
//! or failed write never leaves a half-written directory under the requested name.

use std::path::{Path, PathBuf};

/// `dir/.name.partial`, created empty; `commit` renames it to `dir/name`, and dropping it
/// uncommitted removes it.
pub struct PartialDir {
    target: PathBuf,
    tmp: PathBuf,
    committed: bool,
}

impl PartialDir {
    pub fn create(target: &Path) -> std::io::Result<PartialDir> {
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = target.with_file_name(format!(".{name}.partial"));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp)?;
        Ok(PartialDir {
            target: target.into(),
            tmp,
            committed: false,
        })
    }

    /// Where to write the contents.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// Renames the directory into place; `replace` removes an existing target first (a run's
    /// checkpoint written again), otherwise an existing target is an error from the rename.
    pub fn commit(mut self, replace: bool) -> std::io::Result<()> {
        if replace {
            let _ = std::fs::remove_dir_all(&self.target);
        }
        std::fs::rename(&self.tmp, &self.target)?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for PartialDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}
