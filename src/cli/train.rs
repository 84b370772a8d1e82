//! `lora-mini train`: fine-tune a model on a task from a TOML config.

use std::path::PathBuf;

use clap::Args;

use super::Error;
use lora_mini::train::config::TrainConfig;
use lora_mini::train::interrupt::{ctrl_c_flag, INTERRUPTED_STATUS};
use lora_mini::train::trainer::{train_with, TrainOptions};

/// Options of `lora-mini train`.
#[derive(Debug, Args)]
#[command(
    after_help = "The output directory receives config.toml (the resolved config), \
metrics.jsonl (one line per log step and per evaluation), curves.svg (loss and dev metric), \
adapter-best.safetensors, adapter-last.safetensors, results.json and checkpoint.safetensors \
(adapter, optimizer moments, step, dropout counters and data position).\n\n\
Ctrl-C stops after the step in progress and writes a checkpoint (press it twice to quit at once; \
the previous checkpoint stays intact). --resume continues from the checkpoint; on the CPU the \
resumed run ends with the same adapter, bit for bit, as an uninterrupted one.\n\n\
Examples:\n  \
    lora-mini train --config configs/quickstart.toml\n  \
    lora-mini train --config configs/quickstart.toml --set optim.lr=5e-4 --set run.seed=7 --output-dir runs/seed7\n  \
    lora-mini train --config configs/quickstart.toml --resume"
)]
pub struct TrainArgs {
    /// The TOML config, with model, task, adapter, optim and run sections.
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// Override any key, e.g. --set optim.lr=1e-3 (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub set: Vec<String>,
    /// Where the run's files go (overrides run.output_dir).
    #[arg(long, value_name = "DIR")]
    pub output_dir: Option<PathBuf>,
    /// Continue the run in the output directory from its checkpoint. The
    /// config must match the checkpointed run's, except for run.output_dir,
    /// run.device, run.time_budget_minutes, run.log_every and run.save_every.
    #[arg(long, conflicts_with = "overwrite")]
    pub resume: bool,
    /// Start afresh in an output directory that holds an earlier run,
    /// replacing it. Without --resume or --overwrite that is refused.
    #[arg(long)]
    pub overwrite: bool,
}

pub fn run(args: &TrainArgs) -> Result<(), Error> {
    let mut config = TrainConfig::load(&args.config, &args.set)?;
    if let Some(dir) = &args.output_dir {
        config.run.output_dir = dir.clone();
    }
    let stop = ctrl_c_flag()?;
    let summary = train_with(
        &config,
        &TrainOptions {
            resume: args.resume,
            stop: Some(stop),
            overwrite: args.overwrite,
        },
    )?;
    if summary.interrupted {
        eprintln!(
            "stopped at step {}; resume with: lora-mini train --config {} --output-dir {} --resume",
            summary.steps,
            args.config.display(),
            summary.output_dir.display()
        );
        std::process::exit(INTERRUPTED_STATUS);
    }
    let best: Vec<String> = summary
        .best
        .iter()
        .map(|(k, v)| {
            format!(
                "{k} {}",
                v.map_or("undefined".into(), |v| format!("{v:.4}"))
            )
        })
        .collect();
    println!(
        "done ({}): {} steps in {:.0} s ({:.1} examples/s); best dev {} at step {}; files in {}",
        summary.stopped.name(),
        summary.steps,
        summary.wall_seconds,
        summary.train_examples_per_second,
        best.join(", "),
        summary.best_step,
        summary.output_dir.display()
    );
    Ok(())
}
