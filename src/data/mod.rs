//! Datasets: the task registry, readers for GLUE and WMT16 en-ro in their
//! distributed formats, and (with the `data` feature) tokenising and
//! batching. Data never knows a model: batches are plain id tensors.

#[cfg(feature = "data")]
pub mod batch;
pub mod error;
pub mod examples;
#[cfg(feature = "data")]
pub mod gguf_tokenizer;
pub mod locate;
#[cfg(feature = "data")]
pub mod parquet;
pub mod read;
pub mod tasks;
pub mod translation;

pub use error::DataError;
pub use examples::{read_glue_tsv, Example, Label};
pub use read::read_examples;
pub use tasks::{task, Metric, Task, TaskKind, TASKS};
pub use translation::{read_parallel, read_translation_jsonl, Direction, TranslationPair};
