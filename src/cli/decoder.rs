//! The decoder side of the CLI: `lora-mini chat`, and `eval` / `predict`
//! with `--task causal-lm`.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};

use clap::Args;
use serde_json::json;

use super::eval::LoadArgs;
use super::Error;
use lora_mini::decoder::data::{read_lm_jsonl, LmRow};
use lora_mini::decoder::{
    load_decoder, remainder, Decoder, DecoderSource, GenerateOptions, Message,
};
use lora_mini::models::generate::Sampling;

/// The task name that selects a decoder in `eval` and `predict`.
pub const CAUSAL_LM: &str = "causal-lm";

/// The model and adapter of a decoder command.
#[derive(Debug, Args)]
pub struct DecoderArgs {
    /// A .gguf file, a folder holding one, a Hugging Face folder or a hub id.
    #[arg(long)]
    pub model: String,
    /// A lora-mini adapter file trained on this model.
    #[arg(long, value_name = "FILE")]
    pub adapter: Option<PathBuf>,
    /// A tokenizer.json to use instead of the model's (a GGUF without one
    /// gets the tokenizer its metadata describes).
    #[arg(long, value_name = "FILE")]
    pub tokenizer: Option<PathBuf>,
    #[command(flatten)]
    pub load: LoadArgs,
}

/// How `chat` and `predict` generate: greedy unless a temperature is given.
#[derive(Debug, Args)]
pub struct SamplingArgs {
    /// Sample at this temperature instead of taking the likeliest token.
    #[arg(long)]
    pub temperature: Option<f64>,
    /// With --temperature: sample among the K likeliest tokens (0: all).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// With --temperature: sample from the smallest set of tokens whose
    /// probability reaches P.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    /// With --temperature: the sampling seed (the same seed gives the same text).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop when the answer contains this text (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
}

impl SamplingArgs {
    pub fn options(&self, max_new_tokens: usize) -> GenerateOptions {
        let sampling = match self.temperature {
            Some(temperature) => Sampling::Sample {
                temperature,
                top_k: self.top_k,
                top_p: self.top_p,
                seed: self.seed,
            },
            None => Sampling::Greedy,
        };
        GenerateOptions {
            max_new_tokens,
            sampling,
            stop: self.stop.clone(),
        }
    }
}

impl DecoderArgs {
    /// The decoder arguments within `eval` and `predict`'s model arguments.
    pub fn from_model_args(args: &super::eval::ModelArgs) -> Self {
        Self {
            model: args.model.clone(),
            adapter: args.adapter.clone(),
            tokenizer: None,
            load: args.load.clone(),
        }
    }
}

/// Loads the model with the adapter applied.
pub fn load(args: &DecoderArgs) -> Result<Decoder, Error> {
    let (device, file, factory) =
        super::eval::device_and_adapter(&args.load, args.adapter.as_deref())?;
    let source = DecoderSource {
        model: args.model.clone(),
        tokenizer: args.tokenizer.clone(),
        dtype: args.load.dtype.dtype(),
        device,
        dequantize: args.load.dequantize,
    };
    let decoder = load_decoder(&source, factory)?;
    if let Some(file) = file {
        file.apply(&decoder.registry)?;
    }
    decoder.registry.set_training(false);
    Ok(decoder)
}

/// Options of `lora-mini chat`.
#[derive(Debug, Args)]
#[command(
    after_help = "Type a message and press Enter. /reset starts a new conversation; /quit or end of input (Ctrl-D) leaves.\n\nExample:\n  \
    lora-mini chat --model ../shared/models/SmolLM2-135M-Instruct-GGUF"
)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: DecoderArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// A system message to start every conversation with.
    #[arg(long)]
    pub system: Option<String>,
}

pub fn run_chat(args: &ChatArgs) -> Result<(), Error> {
    let decoder = load(&args.model)?;
    let gguf = lora_mini::models::loader::gguf_file_of(&args.model.model)?;
    if gguf.is_some() && !args.model.load.dequantize {
        // Said once, because the two bases can answer differently.
        eprintln!(
            "{}: linear weights kept quantized (8-bit activations when decoding); --dequantize loads them as f32",
            args.model.model
        );
    }
    let template = decoder.text.chat_template()?.clone();
    let options = args.sampling.options(args.max_new_tokens);
    let fresh = || -> Vec<Message> {
        args.system
            .iter()
            .map(|s| Message::new("system", s))
            .collect()
    };
    let mut messages = fresh();
    let interactive = std::io::stdin().is_terminal();
    let mut out = std::io::stdout();
    let mut lines = std::io::stdin().lock().lines();
    loop {
        if interactive {
            let _ = write!(out, "> ");
            let _ = out.flush();
        }
        let Some(line) = lines
            .next()
            .transpose()
            .map_err(Error::io("standard input"))?
        else {
            return Ok(());
        };
        match line.trim() {
            "" => continue,
            "/quit" | "/exit" => return Ok(()),
            "/reset" => {
                messages = fresh();
                eprintln!("(new conversation)");
                continue;
            }
            _ => {}
        }
        messages.push(Message::new("user", &line));
        let prompt = decoder
            .text
            .encode(&template.render(&messages, true)?, true)?;
        let mut streamed = String::new();
        let answer = decoder.complete(&prompt, &options, |piece| {
            streamed.push_str(piece);
            print!("{piece}");
            let _ = std::io::stdout().flush();
        })?;
        println!("{}", remainder(&answer, &streamed));
        messages.push(Message::new("assistant", &answer));
    }
}

/// `predict --task causal-lm`: one `{"completion"}` per `{"prompt"}` or
/// `{"messages"}` row.
pub fn run_predict(
    args: &DecoderArgs,
    options: &GenerateOptions,
    input: &Path,
    output: &Path,
) -> Result<(), Error> {
    let decoder = load(args)?;
    let rows = read_lm_jsonl(input, true)?;
    let progress = progress_bar(rows.len(), "predicting");
    let mut lines = Vec::new();
    for (i, row) in rows.iter().enumerate() {
        let prompt = decoder.text.encode_prompt(row)?;
        let completion = decoder
            .complete(&prompt, options, |_| {})
            .map_err(|e| Error::from(format!("{}:{}: {e}", input.display(), i + 1)))?;
        lines.push(json!({ "completion": completion }).to_string());
        progress.inc(1);
    }
    progress.finish_and_clear();
    lora_mini::io::write_atomic(output, (lines.join("\n") + "\n").as_bytes())?;
    eprintln!("wrote {} completions to {}", lines.len(), output.display());
    Ok(())
}

/// `eval --task causal-lm`: the mean negative log-likelihood per predicted
/// token over the file, its perplexity and the token count.
pub fn run_eval(
    args: &DecoderArgs,
    data: &Path,
    max_len: usize,
    batch_size: usize,
    as_json: bool,
) -> Result<(), Error> {
    let decoder = load(args)?;
    let rows = read_lm_jsonl(data, false)?;
    let examples = rows
        .iter()
        .map(|r: &LmRow| decoder.text.encode_row(r, max_len))
        .collect::<Result<Vec<_>, _>>()?;
    let (nll, tokens) = decoder.score(&examples, batch_size)?;
    if tokens == 0 {
        return Err(format!("{}: no token to score", data.display()).into());
    }
    let loss = nll / tokens as f64;
    if as_json {
        println!(
            "{}",
            json!({"loss": loss, "perplexity": loss.exp(), "tokens": tokens})
        );
    } else {
        println!(
            "loss {loss:.4} | perplexity {:.3} | tokens {tokens}",
            loss.exp()
        );
    }
    Ok(())
}

/// A progress bar over `len` units of `what` (on stderr).
pub fn progress_bar(len: usize, what: &str) -> indicatif::ProgressBar {
    let template = format!("{what} [{{bar:30}}] {{pos}}/{{len}} ({{eta}})");
    indicatif::ProgressBar::new(len as u64).with_style(
        indicatif::ProgressStyle::with_template(&template)
            .expect("a valid template")
            .progress_chars("=> "),
    )
}
