//! WMT16 English–Romanian readers: parallel plain-text files and JSON Lines
//! `{"translation": {"en": ..., "ro": ...}}`.

use std::path::Path;

use serde_json::Value;

use super::error::{lines, read_text, DataError, Result};

/// One sentence pair.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TranslationPair {
    pub en: String,
    pub ro: String,
}

/// Which way to translate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Direction {
    #[default]
    #[serde(rename = "en-ro")]
    EnRo,
    #[serde(rename = "ro-en")]
    RoEn,
}

impl Direction {
    /// T5's task prefix for this direction.
    pub fn t5_prefix(&self) -> &'static str {
        match self {
            Self::EnRo => "translate English to Romanian: ",
            Self::RoEn => "translate Romanian to English: ",
        }
    }

    /// `(source, target)` of a pair.
    pub fn split<'a>(&self, pair: &'a TranslationPair) -> (&'a str, &'a str) {
        match self {
            Self::EnRo => (&pair.en, &pair.ro),
            Self::RoEn => (&pair.ro, &pair.en),
        }
    }
}

/// Reads line-aligned `en` and `ro` files (e.g. `newstest2016-enro.en` and
/// `.ro`). Files of different lengths are an error naming both.
pub fn read_parallel(en: &Path, ro: &Path) -> Result<Vec<TranslationPair>> {
    let (en_text, ro_text) = (read_text(en)?, read_text(ro)?);
    let (en_lines, ro_lines) = (lines(&en_text), lines(&ro_text));
    if en_lines.len() != ro_lines.len() {
        return Err(DataError::new(
            ro,
            None,
            format!(
                "has {} lines but {} has {}: the files must be line-aligned",
                ro_lines.len(),
                en.display(),
                en_lines.len()
            ),
        ));
    }
    Ok(en_lines
        .iter()
        .zip(&ro_lines)
        .map(|(e, r)| TranslationPair {
            en: e.to_string(),
            ro: r.to_string(),
        })
        .collect())
}

/// Reads JSON Lines with a `translation` object holding `en` and `ro`.
pub fn read_translation_jsonl(path: &Path) -> Result<Vec<TranslationPair>> {
    let text = read_text(path)?;
    let mut out = Vec::new();
    for (i, line) in lines(&text).iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let err = |m: &str| DataError::new(path, Some(i + 1), m.to_string());
        let value: Value =
            serde_json::from_str(line).map_err(|e| err(&format!("invalid JSON: {e}")))?;
        let t = &value["translation"];
        match (t["en"].as_str(), t["ro"].as_str()) {
            (Some(en), Some(ro)) => out.push(TranslationPair {
                en: en.into(),
                ro: ro.into(),
            }),
            _ => {
                return Err(err(
                    "expected {\"translation\": {\"en\": \"...\", \"ro\": \"...\"}}",
                ))
            }
        }
    }
    Ok(out)
}
