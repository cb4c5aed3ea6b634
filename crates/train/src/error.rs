//! The training crate's error type: every failure names the file, line or step it is about
//! and what to do.

use std::path::{Path, PathBuf};

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or directory of the run (or the data) could not be read or written.
    #[error("{}: {source}", .path.display())]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A reader or writer of qlora-io failed (its message names the file).
    #[error(transparent)]
    Io(#[from] qlora_io::Error),
    /// A line of a JSONL data file.
    #[error("{}:{line}: {source}", .path.display())]
    Line {
        path: PathBuf,
        line: usize,
        source: crate::data::LineError,
    },
    /// The loss or the gradient norm stopped being finite at `step` (1-based).
    #[error("step {step}: the loss is {loss} and the gradient norm {grad_norm}; training stopped before applying it{last}. Lower --lr, raise --warmup-steps, or check the data")]
    NonFinite {
        step: usize,
        loss: f64,
        grad_norm: f32,
        /// "; the last checkpoint is DIR", or empty.
        last: String,
    },
    /// A device backend failed; its message names the device and what to do.
    #[error("{0}")]
    Backend(String),
    /// Options, data or a checkpoint the run refuses; the message says why.
    #[error("{0}")]
    Invalid(String),
}

impl Error {
    pub fn file(path: &Path, source: std::io::Error) -> Error {
        Error::File {
            path: path.to_path_buf(),
            source,
        }
    }
}
