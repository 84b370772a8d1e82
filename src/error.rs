//! The crate's one error type, and error text for people.
//!
//! Layers (`adapter`, `nn`, `models`) return `candle::Result`, as
//! candle-nn's do: they implement Candle's `Module`. Everything above them
//! (data files, configs, training, the CLI) returns [`Result`], whose
//! [`Error`] wraps a Candle or I/O error when one is the cause. Every variant
//! displays as one line that names the file, line and key where it can.

use std::fmt;
use std::path::PathBuf;

/// What went wrong, as one line for people.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// A tensor, layer or checkpoint operation failed.
    Candle(candle::Error),
    /// A bad data file (a dataset, predictions, references): where, and
    /// what was wrong.
    Data {
        path: PathBuf,
        /// 1-based, when the problem is on one line.
        line: Option<usize>,
        message: String,
    },
    /// A config value is out of range: the config file, the line that sets
    /// it (when the file does rather than a `--set` override) and its
    /// `section.key`.
    Config {
        path: PathBuf,
        line: Option<usize>,
        key: String,
        message: String,
    },
    /// Reading or writing a file failed.
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Any other problem, already phrased as one line (it names its file
    /// or setting itself).
    Message(String),
}

/// A `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Candle(e) => f.write_str(&message(e)),
            Error::Data {
                path,
                line: Some(line),
                message,
            } => write!(f, "{}:{line}: {message}", path.display()),
            Error::Data { path, message, .. } => write!(f, "{}: {message}", path.display()),
            Error::Config {
                path,
                line: Some(line),
                key,
                message,
            } => write!(f, "{}:{line}: {key}: {message}", path.display()),
            Error::Config {
                path, key, message, ..
            } => write!(f, "{}: {key}: {message}", path.display()),
            Error::Io { path, source } => write!(f, "{}: {source}", path.display()),
            Error::Message(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Candle(e) => Some(e),
            Error::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl From<candle::Error> for Error {
    fn from(e: candle::Error) -> Self {
        Error::Candle(e)
    }
}

impl From<String> for Error {
    fn from(m: String) -> Self {
        Error::Message(m)
    }
}

impl From<&str> for Error {
    fn from(m: &str) -> Self {
        Error::Message(m.to_string())
    }
}

impl Error {
    /// For `map_err`: an I/O failure on `path`.
    pub fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { path, source }
    }

    /// `context: self`, as one line (a Candle cause keeps its variant).
    pub fn context(self, context: impl fmt::Display) -> Error {
        Error::Message(format!("{context}: {self}"))
    }
}

/// The message of a Candle error without the backtrace Candle attaches when
/// `RUST_BACKTRACE` is set: what a user (or an error wrapping this one)
/// should read.
pub fn message(error: &candle::Error) -> String {
    match error {
        candle::Error::WithBacktrace { inner, .. } => message(inner),
        candle::Error::Context { inner, context } => format!("{context}: {}", message(inner)),
        candle::Error::WithPath { inner, path } => {
            format!("{}: {}", path.display(), message(inner))
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_backtraces_and_keeps_context() {
        let inner = candle::Error::Msg("tensor x missing".into()).bt();
        let e = candle::Error::Context {
            inner: Box::new(inner),
            context: Box::new("loading"),
        };
        assert_eq!(message(&e), "loading: tensor x missing");
        assert_eq!(Error::from(e).to_string(), "loading: tensor x missing");
    }

    #[test]
    fn every_variant_is_one_line_naming_where() {
        let file = Error::Data {
            path: "dev.tsv".into(),
            line: Some(3),
            message: "expected 4 columns, found 2".into(),
        };
        assert_eq!(file.to_string(), "dev.tsv:3: expected 4 columns, found 2");
        let config = Error::Config {
            path: "run.toml".into(),
            line: None,
            key: "optim.lr".into(),
            message: "-1 must be positive".into(),
        };
        assert_eq!(
            config.to_string(),
            "run.toml: optim.lr: -1 must be positive"
        );
        let missing = std::io::Error::from(std::io::ErrorKind::NotFound);
        let io = Error::io("runs/a/config.toml")(missing);
        assert_eq!(io.to_string(), "runs/a/config.toml: entity not found");
        let wrapped = Error::from("no examples").context("train.tsv");
        assert_eq!(wrapped.to_string(), "train.tsv: no examples");
    }
}
