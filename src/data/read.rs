//! A task's examples from any file format this crate reads, chosen by the
//! file's extension.

use std::path::Path;

use super::error::{DataError, Result};
use super::examples::{read_csv_examples, read_glue_tsv, read_jsonl_examples, Example};
use super::tasks::Task;

/// Reads a file by its extension: `.tsv` (GLUE), `.jsonl`/`.json`, `.csv`.
pub fn read_examples(task: &Task, path: &Path) -> Result<Vec<Example>> {
    match path.extension().and_then(|e| e.to_str()).unwrap_or("") {
        "tsv" => read_glue_tsv(task, path),
        "jsonl" | "json" => read_jsonl_examples(task, path),
        "csv" => read_csv_examples(task, path),
        #[cfg(feature = "data")]
        "parquet" => super::parquet::read_parquet_examples(task, path),
        other => Err(DataError::new(
            path,
            None,
            format!("unknown file type {other:?} (tsv, jsonl, csv, parquet)"),
        )),
    }
}
