//! `lora-mini eval` and `lora-mini predict`: a model, optionally with an
//! adapter, on a task's data.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle::{DType, Device, Tensor, D};
use clap::Args;
use serde_json::json;

use super::decoder::{DecoderArgs, SamplingArgs, CAUSAL_LM};
use super::Error;
use lora_mini::adapter::{AdapterFile, LinearFactory};
use lora_mini::data::batch::{
    collate_classification, collate_seq2seq, encode_examples, encode_translation, load_tokenizer,
};
use lora_mini::data::error::{lines, read_text};
use lora_mini::data::{
    read_examples, read_parallel, read_translation_jsonl, task, Direction, Example, Label, Task,
    TaskKind, TranslationPair,
};
use lora_mini::decoder::instructions::{self, InstructionSet};
use lora_mini::models::task::{load_task_model, LoadedModel, TaskModel};
use lora_mini::train::config::{DeviceChoice, WeightDtype};
use lora_mini::train::eval::{evaluate, evaluate_decoder, EvalSet};
use lora_mini::train::trainer::classify_batch;

/// The model (with the adapter applied) on the device `args` names, its
/// tokenizer, and how to read data for it.
struct Session {
    loaded: LoadedModel,
    tokenizer: tokenizers::Tokenizer,
    device: Device,
    task: &'static Task,
    /// Source (and, by default, target) truncation.
    max_len: usize,
    max_target_len: usize,
    /// T5's source prefix.
    prefix: String,
}

/// A setting from its flag, else from the adapter's metadata, else
/// `default`; a flag that differs from the adapter's value says so.
fn setting<T: PartialEq + std::fmt::Display + Clone>(
    flag: (&str, Option<T>),
    recorded: Option<T>,
    default: Option<T>,
) -> Option<T> {
    match (flag.1, recorded) {
        (Some(f), Some(r)) => {
            if f != r {
                eprintln!(
                    "note: {} {f} overrides the adapter's {r} (what it was trained with)",
                    flag.0
                );
            }
            Some(f)
        }
        (Some(f), None) => Some(f),
        (None, Some(r)) => Some(r),
        (None, None) => default,
    }
}

/// The device `--device` names, the `--adapter` file read onto it, and the
/// factory that builds the model's layers for it (frozen without one).
pub(super) fn device_and_adapter(
    load: &LoadArgs,
    adapter: Option<&Path>,
) -> Result<(Device, Option<AdapterFile>, LinearFactory), Error> {
    let device = lora_mini::train::trainer::device(load.device)
        .map_err(|e| Error::from(e.to_string().replace("run.device = ", "--device ")))?;
    let file = adapter.map(|p| AdapterFile::read(p, &device)).transpose()?;
    let factory = match &file {
        Some(f) => LinearFactory::new(f.config.clone())?,
        None => LinearFactory::frozen(),
    };
    Ok((device, file, factory.with_dequantized_base(load.dequantize)))
}

fn load(args: &ModelArgs) -> Result<Session, Error> {
    let (device, file, factory) = device_and_adapter(&args.load, args.adapter.as_deref())?;
    let recorded = file.as_ref().and_then(|f| f.data_settings());
    let r = recorded.as_ref();
    let task_name = setting(
        ("--task", args.task.clone()),
        r.map(|d| d.task.clone()),
        None,
    )
    .ok_or("--task is required (the adapter does not record its task)")?;
    let task = task(&task_name)?;
    let max_len =
        setting(("--max-len", args.max_len), r.map(|d| d.max_len), Some(128)).unwrap_or(128);
    let loaded = load_task_model(
        &args.model,
        None,
        task.num_labels(),
        factory,
        args.load.dtype.dtype(),
        &device,
        0,
    )?;
    if let Some(file) = file {
        file.apply(&loaded.registry)?;
    }
    let tokenizer = load_tokenizer(&loaded.dir.join("tokenizer.json"))?;
    Ok(Session {
        loaded,
        tokenizer,
        device,
        task,
        max_len,
        max_target_len: r
            .and_then(|d| d.max_target_len)
            .filter(|_| args.max_len.is_none())
            .unwrap_or(max_len),
        prefix: r
            .and_then(|d| d.source_prefix.clone())
            .unwrap_or_else(|| Direction::EnRo.t5_prefix().to_string()),
    })
}

/// What `eval` and `predict` share: the model, its adapter, the task and
/// the batch shape.
#[derive(Debug, Args)]
pub struct ModelArgs {
    /// A checkpoint folder or hub id.
    #[arg(long)]
    pub model: String,
    /// A lora-mini adapter file to apply.
    #[arg(long, value_name = "FILE")]
    pub adapter: Option<PathBuf>,
    /// cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli or wmt16-en-ro;
    /// by default the adapter's (recorded when it was trained). causal-lm
    /// runs a decoder (a GGUF or Llama-family model) on JSONL rows of
    /// {"text"}, {"prompt"[, "completion"]} or {"messages"}.
    #[arg(long)]
    pub task: Option<String>,
    /// Truncate inputs (and translations) to this many tokens; by default
    /// what the adapter was trained with, else 128.
    #[arg(long)]
    pub max_len: Option<usize>,
    /// Examples per forward pass.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    #[command(flatten)]
    pub load: LoadArgs,
}

/// Where and how a model is held: what every command that loads one takes.
#[derive(Clone, Debug, Args)]
pub struct LoadArgs {
    /// auto (CUDA, then Metal, when built in and present; else the CPU),
    /// cpu, cuda or metal.
    #[arg(long, default_value = "auto")]
    pub device: DeviceChoice,
    /// The precision the base model is loaded in: f32, bf16 or f16 (the
    /// adapter's tensors are cast to it; a quantized base needs
    /// --dequantize for bf16 or f16).
    #[arg(long, default_value = "f32")]
    pub dtype: WeightDtype,
    /// Load a GGUF base dequantized (to --dtype) instead of keeping its
    /// linear weights quantized, the default: more memory, exact weights
    /// and no 8-bit rounding of the activations in the matmuls.
    #[arg(long)]
    pub dequantize: bool,
}

/// Options of `lora-mini eval`.
#[derive(Debug, Args)]
#[command(after_help = "Example:\n  \
    lora-mini eval --model ../shared/models/all-MiniLM-L6-v2 --adapter runs/quickstart/adapter-best.safetensors --task sst2 --data ../shared/data/glue/SST-2")]
pub struct EvalArgs {
    #[command(flatten)]
    pub common: ModelArgs,
    /// A GLUE task folder (reads SPLIT.tsv), the WMT16 folder (newstest2016),
    /// or one file (.tsv, .jsonl, .csv, .parquet); without it, the hub.
    #[arg(long, value_name = "DIR_OR_FILE")]
    pub data: Option<PathBuf>,
    #[arg(long, default_value = "dev")]
    pub split: String,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

fn eval_pairs(task: &Task, data: Option<&Path>) -> Result<Vec<TranslationPair>, Error> {
    match data {
        Some(d) if d.is_dir() => read_parallel(
            &d.join("newstest2016-enro.en"),
            &d.join("newstest2016-enro.ro"),
        )
        .map_err(Error::from),
        Some(f) => read_translation_jsonl(f).map_err(Error::from),
        None => {
            let path = lora_mini::data::parquet::fetch_split(task, "validation", None)?;
            lora_mini::data::parquet::read_parquet_translation(&path).map_err(Error::from)
        }
    }
}

/// The encoded evaluation data `eval` reads.
enum EvalData {
    Classification(Vec<lora_mini::data::batch::Encoded>),
    Translation(Vec<lora_mini::data::batch::EncodedPair>),
}

pub fn run_eval(args: &EvalArgs) -> Result<(), Error> {
    if args.common.task.as_deref() == Some(CAUSAL_LM) {
        let data = args
            .data
            .as_deref()
            .ok_or("--task causal-lm needs --data FILE.jsonl")?;
        let max_len = args.common.max_len.unwrap_or(1024);
        let decoder = DecoderArgs::from_model_args(&args.common);
        return super::decoder::run_eval(
            &decoder,
            data,
            max_len,
            args.common.batch_size,
            args.json,
        );
    }
    if lora_mini::decoder::is_decoder(&args.common.model)? {
        return run_decoder_eval(args);
    }
    let Session {
        loaded,
        tokenizer,
        device,
        task,
        max_len,
        max_target_len,
        prefix,
    } = load(&args.common)?;
    let (data, refs) = if task.kind == TaskKind::Translation {
        let pairs = eval_pairs(task, args.data.as_deref())?;
        let dev = encode_translation(
            &tokenizer,
            &pairs,
            Direction::EnRo,
            &prefix,
            max_len,
            max_target_len,
        )?;
        (
            EvalData::Translation(dev),
            pairs.iter().map(|p| p.ro.clone()).collect(),
        )
    } else {
        let examples = eval_examples(task, args.data.as_deref(), &args.split)?;
        (
            EvalData::Classification(encode_examples(&tokenizer, &examples, max_len)?),
            Vec::new(),
        )
    };
    let set = match &data {
        EvalData::Classification(examples) => EvalSet::Classification(examples),
        EvalData::Translation(pairs) => EvalSet::Translation { pairs, refs: &refs },
    };
    let scores = evaluate(
        &loaded,
        task,
        set,
        &tokenizer,
        args.common.batch_size,
        max_target_len,
        loaded.pad_token_id(),
        &device,
    )?;
    print_scores(&scores, args.json)
}

/// The labelled examples of a classification or regression task that
/// `eval` reads: `SPLIT.tsv` in a folder, one file, or the hub's split.
fn eval_examples(task: &Task, data: Option<&Path>, split: &str) -> Result<Vec<Example>, Error> {
    let path = match data {
        Some(d) if d.is_dir() => d.join(format!("{split}.tsv")),
        Some(f) => f.to_path_buf(),
        None => {
            let split = if split == "dev" {
                task.dev_splits[0]
            } else {
                split
            };
            lora_mini::data::parquet::fetch_split(task, split, None)?
        }
    };
    let examples = read_examples(task, &path)?;
    if examples.iter().any(|e| e.label.is_none()) {
        return Err(format!(
            "{}: has unlabelled rows; eval needs labels (use predict)",
            path.display()
        )
        .into());
    }
    Ok(examples)
}

fn print_scores(scores: &BTreeMap<String, Option<f64>>, as_json: bool) -> Result<(), Error> {
    if as_json {
        println!(
            "{}",
            serde_json::to_string(scores).map_err(|e| e.to_string())?
        );
    } else {
        for (name, value) in scores {
            println!(
                "{name:<10} {}",
                value.map_or("undefined".into(), |v| format!("{v:.4}"))
            );
        }
    }
    Ok(())
}

/// The built-in task a decoder command runs: `--task`, else the one the
/// adapter recorded.
fn decoder_task(common: &ModelArgs) -> Result<&'static Task, Error> {
    let recorded = match &common.adapter {
        Some(path) => AdapterFile::read(path, &Device::Cpu)?.data_settings(),
        None => None,
    };
    let name = setting(
        ("--task", common.task.clone()),
        recorded.map(|d| d.task),
        None,
    )
    .ok_or("--task is required (the adapter does not record its task)")?;
    task(&name)
}

/// `eval` of a decoder on a built-in task, asked as instructions: GLUE
/// classification by label words, WMT16 by greedy translations (up to
/// `--max-len` new tokens, 256 by default).
fn run_decoder_eval(args: &EvalArgs) -> Result<(), Error> {
    let task = decoder_task(&args.common)?;
    let decoder = super::decoder::load(&DecoderArgs::from_model_args(&args.common))?;
    let set = if task.kind == TaskKind::Translation {
        let pairs = eval_pairs(task, args.data.as_deref())?;
        InstructionSet::translation(&decoder.text, Direction::EnRo, &pairs)?
    } else {
        let prompt = instructions::prompt(task)?;
        let examples = eval_examples(task, args.data.as_deref(), &args.split)?;
        InstructionSet::label_words(&decoder.text, &prompt, &examples)?
    };
    let what = match set {
        InstructionSet::LabelWords { .. } => "scoring label words",
        InstructionSet::Translation { .. } => "translating",
    };
    let bar = super::decoder::progress_bar(set.work(), what);
    let scores = evaluate_decoder(
        &decoder.model,
        task,
        &set,
        &decoder.text.tokenizer,
        args.common.batch_size,
        args.common.max_len.unwrap_or(256),
        decoder.text.eos_ids.first().copied().unwrap_or(0),
        |n| bar.inc(n as u64),
    )?;
    bar.finish_and_clear();
    print_scores(&scores, args.json)
}

/// `predict` for a built-in task on a decoder: the label word it finds
/// likeliest per GLUE row (with each class's summed answer NLL), or its
/// greedy translation per source.
fn run_decoder_task_predict(args: &PredictArgs) -> Result<(), Error> {
    let task = decoder_task(&args.common)?;
    let decoder = super::decoder::load(&DecoderArgs::from_model_args(&args.common))?;
    let pad = decoder.text.eos_ids.first().copied().unwrap_or(0);
    let rows: Vec<serde_json::Value> = if task.kind == TaskKind::Translation {
        let sources = read_sources(&args.input)?;
        let set = InstructionSet::translation(&decoder.text, Direction::EnRo, &sources)?;
        let InstructionSet::Translation {
            prompts, eos_ids, ..
        } = set
        else {
            unreachable!("a translation set")
        };
        let bar = super::decoder::progress_bar(prompts.len(), "translating");
        let answers = instructions::greedy_answers(
            &decoder.model,
            &prompts,
            &eos_ids,
            args.max_new_tokens,
            |n| bar.inc(n as u64),
        )?;
        bar.finish_and_clear();
        answers
            .iter()
            .map(|ids| Ok(json!({"translation": decoder.text.decode(ids)?})))
            .collect::<Result<_, Error>>()?
    } else {
        let TaskKind::Classification { labels } = task.kind else {
            return Err(format!("task {} is not a classification or translation task; a decoder answers those by label words or text", task.name).into());
        };
        let prompt = instructions::prompt(task)?;
        let examples = read_examples(task, &args.input)?;
        let choices = instructions::label_word_choices(&decoder.text, &prompt, &examples)?;
        let bar =
            super::decoder::progress_bar(choices.iter().map(Vec::len).sum(), "scoring label words");
        let nlls = instructions::choice_nlls(
            &decoder.model,
            &choices,
            args.common.batch_size,
            pad,
            |n| bar.inc(n as u64),
        )?;
        bar.finish_and_clear();
        nlls.iter()
            .map(|n| {
                let Label::Class(c) = instructions::likeliest(n) else {
                    unreachable!("label words give a class")
                };
                json!({"prediction": labels[c], "answer_nll": n})
            })
            .collect()
    };
    write_rows(&args.output, &rows)
}

/// Writes `rows` as JSON Lines, atomically, and says how many.
fn write_rows(output: &Path, rows: &[serde_json::Value]) -> Result<(), Error> {
    let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
    lora_mini::io::write_atomic(output, text.as_bytes())?;
    eprintln!("wrote {} predictions to {}", rows.len(), output.display());
    Ok(())
}

/// Options of `lora-mini predict`.
#[derive(Debug, Args)]
#[command(after_help = "Example:\n  \
    lora-mini predict --model ../shared/models/all-MiniLM-L6-v2 --adapter runs/quickstart/adapter-best.safetensors --task sst2 --input ../shared/data/glue/SST-2/test.tsv --output preds.jsonl\n  \
    lora-mini predict --model ../shared/models/SmolLM2-135M-Instruct-GGUF --task sst2 --input ../shared/data/glue/SST-2/test.tsv --output preds.jsonl\n\n\
On a decoder, a GLUE task is answered by the likelier label word ({\"prediction\", \"answer_nll\"} per row) and wmt16-en-ro by a greedy translation; --task causal-lm completes prompts.")]
pub struct PredictArgs {
    #[command(flatten)]
    pub common: ModelArgs,
    /// GLUE TSV, JSONL or CSV with Hugging Face's columns; for translation,
    /// JSONL {"translation": {"en": ...}} or plain text, one source per line.
    #[arg(long, value_name = "FILE")]
    pub input: PathBuf,
    /// JSON Lines, one object per input row, in input order.
    #[arg(long, value_name = "FILE")]
    pub output: PathBuf,
    /// How a decoder (--task causal-lm) picks tokens.
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Beam search width for translation (1 is greedy).
    #[arg(long, default_value_t = 1)]
    pub beams: usize,
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
}

/// Translation sources for `predict`: JSONL `{"translation": {"en": ...}}`
/// or plain text, one source per line.
pub(super) fn read_sources(input: &Path) -> Result<Vec<TranslationPair>, Error> {
    if input.extension().is_some_and(|e| e == "jsonl") {
        return read_translation_jsonl(input).map_err(Error::from);
    }
    let text = read_text(input)?;
    Ok(lines(&text)
        .iter()
        .map(|l| TranslationPair {
            en: l.to_string(),
            ro: String::new(),
        })
        .collect())
}

pub fn run_predict(args: &PredictArgs) -> Result<(), Error> {
    if args.common.task.as_deref() == Some(CAUSAL_LM) {
        let decoder = DecoderArgs::from_model_args(&args.common);
        let options = args.sampling.options(args.max_new_tokens);
        return super::decoder::run_predict(&decoder, &options, &args.input, &args.output);
    }
    if lora_mini::decoder::is_decoder(&args.common.model)? {
        return run_decoder_task_predict(args);
    }
    let Session {
        loaded,
        tokenizer,
        device,
        task,
        max_len,
        max_target_len,
        prefix,
    } = load(&args.common)?;
    let pad = loaded.pad_token_id();
    let mut rows: Vec<serde_json::Value> = Vec::new();
    match (&loaded.model, task.kind) {
        (TaskModel::T5(m), TaskKind::Translation) => {
            let sources = read_sources(&args.input)?;
            let enc = encode_translation(
                &tokenizer,
                &sources,
                Direction::EnRo,
                &prefix,
                max_len,
                max_target_len,
            )?;
            for chunk in enc.chunks(args.common.batch_size) {
                let items: Vec<_> = chunk.iter().collect();
                let b = collate_seq2seq(&items, pad, &device)?;
                let outs = if args.beams > 1 {
                    (0..items.len())
                        .map(|i| {
                            let ids = Tensor::new(&items[i].source[..], &device)?.unsqueeze(0)?;
                            m.generate_beam(&ids, args.beams, args.max_new_tokens, 1.0)
                        })
                        .collect::<candle::Result<Vec<_>>>()?
                } else {
                    m.generate_greedy(&b.input_ids, Some(&b.attention_mask), args.max_new_tokens)?
                };
                for ids in outs {
                    rows.push(json!({"translation": tokenizer.decode(&ids, true).map_err(|e| e.to_string())?}));
                }
            }
        }
        (model, TaskKind::Classification { .. } | TaskKind::Regression { .. }) => {
            let examples = read_examples(task, &args.input)?;
            let enc = encode_examples(&tokenizer, &examples, max_len)?;
            for chunk in enc.chunks(args.common.batch_size) {
                let items: Vec<_> = chunk.iter().collect();
                let b = collate_classification(&items, pad, &device)?;
                let logits = classify_batch(model, &b, false)?;
                let values: Vec<Vec<f32>> =
                    logits.to_dtype(DType::F32).and_then(|l| l.to_vec2())?;
                let argmax: Vec<u32> = logits.argmax(D::Minus1).and_then(|l| l.to_vec1())?;
                for (v, c) in values.into_iter().zip(argmax) {
                    let prediction = match task.kind {
                        TaskKind::Classification { labels } => json!(labels[c as usize]),
                        _ => json!(v[0]),
                    };
                    rows.push(json!({"logits": v, "prediction": prediction}));
                }
            }
        }
        _ => return Err(format!("task {} does not fit this model", task.name).into()),
    }
    write_rows(&args.output, &rows)
}
