//! Evaluation metrics as pure functions, each matching its reference
//! implementation: scikit-learn (accuracy, F1, MCC), scipy (Pearson,
//! Spearman), sacreBLEU (BLEU) and Google's rouge-score (ROUGE).
//!
//! Undefined values (a correlation of a constant, a metric of nothing) are
//! `None`, never NaN and never a panic.

pub mod bleu;
pub mod classification;
pub mod correlation;
pub mod porter;
pub mod rouge;

pub use bleu::{corpus_bleu, Bleu};
pub use classification::{accuracy, f1_binary, matthews_corrcoef};
pub use correlation::{pearson, spearman};
pub use rouge::{corpus_rouge, Rouge};
