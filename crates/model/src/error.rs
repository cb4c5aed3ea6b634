//! The model crate's error type.

use std::path::PathBuf;

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Io(#[from] qlora_io::Error),
    #[error("{path}: tensor \"{tensor}\": {reason}")]
    Tensor {
        path: PathBuf,
        tensor: String,
        reason: String,
    },
    #[error("{path}: tensor \"{tensor}\" is missing; the checkpoint is incomplete or was made for a different architecture")]
    Missing { path: PathBuf, tensor: String },
    #[error("token id {id} is out of range: the vocabulary has {vocab} tokens (ids 0..{vocab})")]
    TokenOutOfRange { id: u32, vocab: usize },
    #[error("{0}")]
    Invalid(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A device backend failed (the message names the device and what to do).
    #[error("{0}")]
    Device(String),
}
