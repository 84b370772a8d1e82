//! Readers of classification and regression examples: the GLUE
//! distribution's TSV files (quirks and all), JSONL and CSV with Hugging
//! Face's column names.

use std::path::Path;

use serde_json::Value;

use super::error::{lines, read_text, DataError, Result};
use super::tasks::{Task, TaskKind};

/// A gold label.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Label {
    Class(usize),
    Score(f32),
}

/// One input, with its label when the split has labels.
#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    pub text_a: String,
    pub text_b: Option<String>,
    pub label: Option<Label>,
}

/// Parses a label as `task` writes it; an error message when it is not one.
pub fn parse_label(task: &Task, raw: &str) -> std::result::Result<Label, String> {
    match task.kind {
        TaskKind::Classification { labels } => task
            .class_index(raw)
            .map(Label::Class)
            .ok_or_else(|| format!("label {raw:?} is not one of {labels:?}")),
        TaskKind::Regression { range: (lo, hi) } => {
            let score: f32 = raw
                .trim()
                .parse()
                .map_err(|_| format!("score {raw:?} is not a number"))?;
            if !(lo..=hi).contains(&score) {
                return Err(format!("score {score} is outside [{lo}, {hi}]"));
            }
            Ok(Label::Score(score))
        }
        TaskKind::Translation | TaskKind::CausalLm => {
            Err(format!("task {} has no class labels", task.name))
        }
    }
}

/// Reads a GLUE TSV file of `task`: train and dev files with labels, test
/// files without. Handles CoLA's header-less train/dev files, UTF-8 BOMs and
/// missing final newlines. Every row must have the header's column count.
pub fn read_glue_tsv(task: &Task, path: &Path) -> Result<Vec<Example>> {
    if task.kind == TaskKind::Translation {
        return Err(DataError::new(
            path,
            None,
            format!("task {} has no GLUE TSV files", task.name),
        ));
    }
    let text = read_text(path)?;
    let rows = lines(&text);
    // CoLA's train and dev files have no header: source, label, mark, sentence.
    let cola_headerless = task.name == "cola" && !rows[0].starts_with("index\t");
    let (header, body_start): (Vec<&str>, usize) = if cola_headerless {
        (vec!["source", "label", "mark", "sentence"], 0)
    } else {
        (rows[0].split('\t').collect(), 1)
    };
    let column = |name: &str| header.iter().position(|h| h.trim() == name);
    let missing = |name: &str| {
        DataError::new(
            path,
            Some(1),
            format!("no column {name:?} in the header {header:?}"),
        )
    };
    let a = column(task.tsv_text_a).ok_or_else(|| missing(task.tsv_text_a))?;
    let b = match task.tsv_text_b {
        Some(name) => Some(column(name).ok_or_else(|| missing(name))?),
        None => None,
    };
    let label = column(task.tsv_label);
    let mut examples = Vec::with_capacity(rows.len());
    for (i, row) in rows.iter().enumerate().skip(body_start) {
        let line = i + 1;
        let fields: Vec<&str> = row.split('\t').collect();
        if fields.len() != header.len() {
            return Err(DataError::new(
                path,
                Some(line),
                format!(
                    "expected {} tab-separated columns ({}), found {}",
                    header.len(),
                    header.join(", "),
                    fields.len()
                ),
            ));
        }
        let label = match label {
            Some(c) => Some(
                parse_label(task, fields[c]).map_err(|m| DataError::new(path, Some(line), m))?,
            ),
            None => None,
        };
        examples.push(Example {
            text_a: fields[a].to_string(),
            text_b: b.map(|c| fields[c].to_string()),
            label,
        });
    }
    if examples.is_empty() {
        return Err(DataError::new(path, None, "no examples after the header"));
    }
    Ok(examples)
}

/// Builds an example from a record with Hugging Face's column names
/// (`sentence`, `sentence1`/`sentence2`, `question`, ..., `label`). A label
/// of -1 (HF's unlabelled test rows) or none gives an unlabelled example.
pub(crate) fn example_from_record(
    task: &Task,
    get: impl Fn(&str) -> Option<Value>,
) -> std::result::Result<Example, String> {
    let text = |name: &str| -> std::result::Result<String, String> {
        match get(name) {
            Some(Value::String(s)) => Ok(s),
            Some(other) => Err(format!("column {name:?} should be text, found {other}")),
            None => Err(format!("missing column {name:?}")),
        }
    };
    let text_a = text(task.text_a)?;
    let text_b = task.text_b.map(text).transpose()?;
    let label = match get("label") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) if n.as_i64() == Some(-1) => None,
        Some(Value::Number(n)) => Some(parse_label(task, &n.to_string())?),
        Some(Value::String(s)) => Some(parse_label(task, &s)?),
        Some(other) => return Err(format!("label {other} is neither a number nor a string")),
    };
    Ok(Example {
        text_a,
        text_b,
        label,
    })
}

/// Reads JSON Lines, one object per line, with Hugging Face's column names.
pub fn read_jsonl_examples(task: &Task, path: &Path) -> Result<Vec<Example>> {
    let text = read_text(path)?;
    let mut out = Vec::new();
    for (i, line) in lines(&text).iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let err = |m: String| DataError::new(path, Some(i + 1), m);
        let value: Value =
            serde_json::from_str(line).map_err(|e| err(format!("invalid JSON: {e}")))?;
        let Value::Object(map) = value else {
            return Err(err("expected a JSON object".into()));
        };
        out.push(example_from_record(task, |k| map.get(k).cloned()).map_err(err)?);
    }
    Ok(out)
}

/// A CSV record: the line it starts on, and its fields.
pub type CsvRecord = (usize, Vec<String>);

/// Splits CSV text (RFC 4180: quoted fields, doubled quotes, newlines inside
/// quotes) into records, each with the line it starts on.
pub fn parse_csv(text: &str) -> std::result::Result<Vec<CsvRecord>, (usize, String)> {
    let mut records = Vec::new();
    let (mut record, mut field) = (Vec::new(), String::new());
    let (mut in_quotes, mut line, mut start) = (false, 1, 1);
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match (in_quotes, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                chars.next();
                field.push('"');
            }
            (true, '"') => in_quotes = false,
            (true, c) => {
                if c == '\n' {
                    line += 1;
                }
                field.push(c);
            }
            (false, '"') if field.is_empty() => in_quotes = true,
            (false, ',') => record.push(std::mem::take(&mut field)),
            (false, '\r') => {}
            (false, '\n') => {
                record.push(std::mem::take(&mut field));
                records.push((start, std::mem::take(&mut record)));
                line += 1;
                start = line;
            }
            (false, c) => field.push(c),
        }
    }
    if in_quotes {
        return Err((start, "a quoted field is not closed".into()));
    }
    if !field.is_empty() || !record.is_empty() {
        record.push(field);
        records.push((start, record));
    }
    Ok(records)
}

/// Reads CSV with a header row of Hugging Face column names.
pub fn read_csv_examples(task: &Task, path: &Path) -> Result<Vec<Example>> {
    let text = read_text(path)?;
    let records = parse_csv(&text).map_err(|(line, m)| DataError::new(path, Some(line), m))?;
    let (_, header) = &records[0];
    let mut out = Vec::new();
    for (line, record) in &records[1..] {
        if record.len() != header.len() {
            return Err(DataError::new(
                path,
                Some(*line),
                format!(
                    "expected {} comma-separated fields ({}), found {}",
                    header.len(),
                    header.join(", "),
                    record.len()
                ),
            ));
        }
        let get = |k: &str| {
            header.iter().position(|h| h == k).map(|i| {
                let v = &record[i];
                if k == "label" {
                    v.parse::<i64>()
                        .map(Value::from)
                        .unwrap_or_else(|_| Value::String(v.clone()))
                } else {
                    Value::String(v.clone())
                }
            })
        };
        out.push(example_from_record(task, get).map_err(|m| DataError::new(path, Some(*line), m))?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_handles_quotes_and_newlines() {
        let r = parse_csv("a,b\n\"x, \"\"y\"\"\",\"multi\nline\"\nplain,2").unwrap();
        assert_eq!(
            r[1],
            (2, vec!["x, \"y\"".to_string(), "multi\nline".to_string()])
        );
        assert_eq!(r[2], (4, vec!["plain".to_string(), "2".to_string()]));
        assert!(parse_csv("a\n\"open").is_err());
    }
}
