//! Errors that name the file, the line and what was expected.

use std::fmt;
use std::path::{Path, PathBuf};

/// A bad input file: where, and what was wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataError {
    pub path: PathBuf,
    /// 1-based line number, when the problem is on one line.
    pub line: Option<usize>,
    pub message: String,
}

impl DataError {
    pub fn new(path: &Path, line: Option<usize>, message: impl Into<String>) -> Self {
        Self {
            path: path.to_path_buf(),
            line,
            message: message.into(),
        }
    }
}

impl fmt::Display for DataError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{line}: {}", self.path.display(), self.message),
            None => write!(f, "{}: {}", self.path.display(), self.message),
        }
    }
}

impl std::error::Error for DataError {}

impl From<DataError> for crate::Error {
    fn from(e: DataError) -> Self {
        crate::Error::Data {
            path: e.path,
            line: e.line,
            message: e.message,
        }
    }
}

pub type Result<T> = std::result::Result<T, DataError>;

/// Reads a text file as UTF-8 without a leading BOM. Invalid UTF-8 and an
/// empty file are errors naming the line.
pub fn read_text(path: &Path) -> Result<String> {
    let bytes =
        std::fs::read(path).map_err(|e| DataError::new(path, None, format!("cannot read: {e}")))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let line = e.as_bytes()[..at].iter().filter(|&&b| b == b'\n').count() + 1;
        DataError::new(path, Some(line), format!("invalid UTF-8 at byte {at}"))
    })?;
    let text = text
        .strip_prefix('\u{feff}')
        .map(String::from)
        .unwrap_or(text);
    if text.trim().is_empty() {
        return Err(DataError::new(path, None, "the file is empty"));
    }
    Ok(text)
}

/// The lines of a text, without `\r`, and without the empty string after a
/// final newline (GLUE's files end with or without one).
pub fn lines(text: &str) -> Vec<&str> {
    let mut lines: Vec<&str> = text
        .split('\n')
        .map(|l| l.strip_suffix('\r').unwrap_or(l))
        .collect();
    if lines.last() == Some(&"") {
        lines.pop();
    }
    lines
}
