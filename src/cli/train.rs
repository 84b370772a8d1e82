//! `lora-mini train`: fine-tune a model on a task from a TOML config.

use std::path::PathBuf;

use clap::Args;

use super::CliError;
use crate::train::config::TrainConfig;
use crate::train::trainer::train;

/// Options of `lora-mini train`.
#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
    lora-mini train --config configs/quickstart.toml\n  \
    lora-mini train --config configs/quickstart.toml --set optim.lr=5e-4 --set run.seed=7 --output-dir runs/seed7")]
pub struct TrainArgs {
    /// The TOML config: [model], [task], [adapter], [optim] and [run] sections.
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// Override any key, e.g. --set optim.lr=1e-3 (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub set: Vec<String>,
    /// Where the run's files go (overrides run.output_dir).
    #[arg(long, value_name = "DIR")]
    pub output_dir: Option<PathBuf>,
}

pub fn run(args: &TrainArgs) -> Result<(), CliError> {
    let mut config = TrainConfig::load(&args.config, &args.set)?;
    if let Some(dir) = &args.output_dir {
        config.run.output_dir = dir.clone();
    }
    let summary = train(&config)?;
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
        "done: {} steps in {:.0} s ({:.1} examples/s); best dev {} at step {}; files in {}",
        summary.steps,
        summary.wall_seconds,
        summary.train_examples_per_second,
        best.join(", "),
        summary.best_step,
        summary.output_dir.display()
    );
    Ok(())
}
