//! The `lora-mini` command line. `main.rs` only parses and dispatches; each
//! subcommand lives in its own file.

pub mod decoder;
pub mod eval;
pub mod export;
pub mod params;
pub mod score;
pub mod sweep;
pub mod train;

use clap::{Parser, Subcommand};

/// LoRA-Mini parameter-efficient fine-tuning on Candle.
///
/// LoRA-Mini trains only small inner matrices between frozen, seeded random
/// projections: r·(a+b) parameters per adapted layer.
#[derive(Debug, Parser)]
#[command(name = "lora-mini", version, about, long_about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Fine-tune a model on a task from a TOML config (full, LoRA or
    /// LoRA-Mini).
    Train(train::TrainArgs),
    /// Print a task's official metrics for a model (and adapter) on its data.
    Eval(eval::EvalArgs),
    /// Write one JSON prediction per input row (labels, scores or translations).
    Predict(eval::PredictArgs),
    /// Talk with a decoder (a GGUF file or a Hugging Face Llama-family
    /// folder), optionally with an adapter: streams answers, keeps the
    /// conversation; /reset and /quit.
    Chat(decoder::ChatArgs),
    /// Write a trained adapter as a PEFT LoRA adapter or a merged checkpoint.
    Export(export::ExportArgs),
    /// Count trainable and total parameters for a model config, task and
    /// adapter, without loading weights.
    Params(params::ParamsArgs),
    /// Score a predictions file against references with the task's official
    /// metrics (sacreBLEU, rouge-score, scikit-learn and scipy definitions).
    Score(score::ScoreArgs),
    /// Train every combination of a grid of config values and seeds
    /// (resumable), and tabulate mean ± std with the setting the
    /// validation slice chooses.
    Sweep(sweep::SweepArgs),
}

/// A message for the user; the binary prints it and exits with status 1.
pub use lora_mini::Error;

/// Runs the parsed command.
pub fn run(cli: Cli) -> Result<(), Error> {
    match cli.command {
        Command::Train(args) => train::run(&args),
        Command::Export(args) => export::run(&args),
        Command::Eval(args) => eval::run_eval(&args),
        Command::Predict(args) => eval::run_predict(&args),
        Command::Chat(args) => decoder::run_chat(&args),
        Command::Params(args) => params::run(&args),
        Command::Score(args) => score::run(&args),
        Command::Sweep(args) => sweep::run(&args),
    }
}
