//! The library's error type. Every variant names what it is about (a file, a tensor,
//! a field) so that a person can act on the message without a debugger.

use std::path::PathBuf;

/// Result alias used by every public fallible function of the library.
pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    // the I/O error is part of the message, not a `source`: printed with its cause chain
    // (`{:#}`) it would appear twice
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    /// A configuration that cannot describe a valid model; lists every problem at once.
    #[error("{origin}: invalid configuration:\n  - {}", problems.join("\n  - "))]
    Config {
        origin: String,
        problems: Vec<String>,
    },
    /// A file that could not be parsed (JSON, TOML, safetensors header, tokenizer).
    #[error("{path}: {msg}")]
    Parse { path: PathBuf, msg: String },
    /// Weights that do not match the configuration (names, shapes), all listed.
    #[error("{path}: weights do not match the configuration:\n  - {}", problems.join("\n  - "))]
    WeightMismatch {
        path: PathBuf,
        problems: Vec<String>,
    },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("data: {0}")]
    Data(String),
    #[error("generate: {0}")]
    Generate(String),
    /// A chat template that does not compile or refuses a conversation.
    #[error("chat template: {0}")]
    Template(String),
    #[error("checkpoint {path}: {msg}")]
    Checkpoint { path: PathBuf, msg: String },
    #[error("training diverged: {0}")]
    Diverged(String),
    #[error("plot {path}: {msg}")]
    Plot { path: PathBuf, msg: String },
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            error: source,
        }
    }
    pub(crate) fn parse(path: impl Into<PathBuf>, msg: impl std::fmt::Display) -> Self {
        Error::Parse {
            path: path.into(),
            msg: msg.to_string(),
        }
    }
}
