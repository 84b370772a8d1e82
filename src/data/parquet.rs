//! Hugging Face's parquet files (`nyu-mll/glue`, `wmt16`), read with the
//! `parquet` crate's record-level reader: no Arrow, Snappy only.

use std::path::{Path, PathBuf};

use parquet::file::reader::{FileReader, SerializedFileReader};
use serde_json::Value;

use super::error::{DataError, Result};
use super::examples::{example_from_record, Example};
use super::tasks::Task;
use super::translation::TranslationPair;

/// Every row of a parquet file as a JSON object (struct columns nest).
pub fn read_parquet_rows(path: &Path) -> Result<Vec<Value>> {
    let file = std::fs::File::open(path)
        .map_err(|e| DataError::new(path, None, format!("cannot read: {e}")))?;
    let reader = SerializedFileReader::new(file)
        .map_err(|e| DataError::new(path, None, format!("not a parquet file: {e}")))?;
    let rows = reader
        .get_row_iter(None)
        .map_err(|e| DataError::new(path, None, e.to_string()))?;
    rows.enumerate()
        .map(|(i, row)| {
            row.map(|r| r.to_json_value())
                .map_err(|e| DataError::new(path, Some(i + 1), format!("row {}: {e}", i + 1)))
        })
        .collect()
}

/// Examples of `task` from a parquet file with Hugging Face's columns.
/// Errors name the row (reported as the line).
pub fn read_parquet_examples(task: &Task, path: &Path) -> Result<Vec<Example>> {
    read_parquet_rows(path)?
        .into_iter()
        .enumerate()
        .map(|(i, row)| {
            example_from_record(task, |k| row.get(k).cloned())
                .map_err(|m| DataError::new(path, Some(i + 1), m))
        })
        .collect()
}

/// Sentence pairs from a `wmt16` parquet file (`translation: {en, ro}`).
pub fn read_parquet_translation(path: &Path) -> Result<Vec<TranslationPair>> {
    read_parquet_rows(path)?
        .into_iter()
        .enumerate()
        .map(|(i, row)| {
            let t = &row["translation"];
            match (t["en"].as_str(), t["ro"].as_str()) {
                (Some(en), Some(ro)) => Ok(TranslationPair {
                    en: en.into(),
                    ro: ro.into(),
                }),
                _ => Err(DataError::new(
                    path,
                    Some(i + 1),
                    "expected a translation struct with en and ro",
                )),
            }
        })
        .collect()
}

/// The hub file of a task's split: `<config>/<split>-00000-of-00001.parquet`
/// in the dataset repo (`nyu-mll/glue`, or `wmt16` with config `ro-en`).
pub fn hub_parquet_path(task: &Task, split: &str) -> String {
    format!("{}/{split}-00000-of-00001.parquet", task.hf_config)
}

/// Downloads (or finds in the cache) a task's split from the hub.
#[cfg(feature = "hub")]
pub fn fetch_split(task: &Task, split: &str, revision: Option<&str>) -> candle::Result<PathBuf> {
    let options = crate::hub::HubOptions::from_env();
    crate::hub::fetch(
        &options,
        task.hf_dataset,
        hf_hub::RepoType::Dataset,
        revision,
        &hub_parquet_path(task, split),
    )
}

#[cfg(not(feature = "hub"))]
pub fn fetch_split(task: &Task, _split: &str, _revision: Option<&str>) -> candle::Result<PathBuf> {
    candle::bail!(
        "downloading {} needs the `hub` feature; pass local files instead",
        task.name
    )
}
