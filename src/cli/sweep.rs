//! `lora-mini sweep`: a grid of config overrides × seeds, resumable, with a
//! mean ± std table that chooses on the validation slice.

use std::path::PathBuf;

use clap::Args;

use super::Error;
use lora_mini::train::config::TrainConfig;
use lora_mini::train::interrupt::{ctrl_c_flag, INTERRUPTED_STATUS};
use lora_mini::train::sweep::{markdown, run_sweep, GridAxis, SweepEnd, SweepOptions};

/// Options of `lora-mini sweep`.
#[derive(Debug, Args)]
#[command(
    after_help = "Every combination of the --grid values, once per seed, trains into \
OUT/<key=value_..._seed=N>/ with the usual files. A run whose results.json exists is skipped; \
one with only a checkpoint resumes from it. After each run OUT/sweep.md and OUT/sweep.json \
hold mean ± std over seeds of the headline metric on the validation slice and on the dev set, \
and mark the setting with the best mean validation metric as chosen. Set \
task.validation_split (e.g. --set task.validation_split=0.1) so that the dev set never \
chooses anything; without it no setting is chosen.\n\n\
Ctrl-C stops the run in progress with a checkpoint; rerun the same command to continue.\n\n\
Example:\n  \
    lora-mini sweep --config configs/minilm/bert-cola-lora-mini-dense+attention-r8.toml \\\n    \
    --set task.validation_split=0.1 --grid optim.lr=1e-3,3e-3,1e-2 --grid optim.head_lr=1e-3 \\\n    \
    --seeds 1,2,3 --out runs/sweeps/cola-mini"
)]
pub struct SweepArgs {
    /// The base TOML config.
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// Override a key in every run, e.g. --set task.validation_split=0.1
    /// (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub set: Vec<String>,
    /// A swept key and its values, e.g. --grid optim.lr=1e-3,3e-3
    /// (repeatable; the runs are the cartesian product).
    #[arg(long = "grid", value_name = "SECTION.KEY=V1,V2,...", required = true)]
    pub grid: Vec<String>,
    /// Seeds, each setting both run.seed and adapter.seed.
    #[arg(long, value_delimiter = ',', default_value = "42")]
    pub seeds: Vec<u64>,
    /// The sweep's folder.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
}

pub fn run(args: &SweepArgs) -> Result<(), Error> {
    let axes = args
        .grid
        .iter()
        .map(|g| GridAxis::parse(g))
        .collect::<Result<Vec<_>, _>>()?;
    let base = TrainConfig::load(&args.config, &args.set)?;
    let task = lora_mini::data::task(&base.task.name)?;
    let headline = task.metrics[0].name();
    let options = SweepOptions {
        config: args.config.clone(),
        set: args.set.clone(),
        axes,
        seeds: args.seeds.clone(),
        out_dir: args.out.clone(),
        stop: Some(ctrl_c_flag()?),
    };
    match run_sweep(&options, &headline)? {
        SweepEnd::Finished(runs) => {
            println!("{}", markdown(&runs, &headline));
            eprintln!("wrote {}", args.out.join("sweep.md").display());
            Ok(())
        }
        SweepEnd::Interrupted { run, .. } => {
            eprintln!(
                "stopped in {run} with a checkpoint; rerun the same command to continue the sweep"
            );
            std::process::exit(INTERRUPTED_STATUS);
        }
    }
}
