//! Hyper-parameter sweeps: every combination of a grid of config overrides
//! and seeds, each run in its own folder, finished runs skipped and
//! interrupted ones resumed, and a table of mean ± std over seeds that
//! names the setting the validation metric chooses.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use serde::Serialize;

use super::config::TrainConfig;
use super::trainer::{train_with, TrainOptions, CHECKPOINT};
use crate::data::Metric;
use crate::Error;

/// One swept key and its values, from `section.key=v1,v2,...`.
#[derive(Clone, Debug, PartialEq)]
pub struct GridAxis {
    pub key: String,
    pub values: Vec<String>,
}

impl GridAxis {
    pub fn parse(text: &str) -> Result<Self, Error> {
        let (key, values) = text
            .split_once('=')
            .ok_or_else(|| format!("--grid {text:?}: expected section.key=v1,v2,..."))?;
        let values: Vec<String> = values
            .split(',')
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
            .collect();
        if values.is_empty() || key.trim().split('.').count() != 2 {
            return Err(format!(
                "--grid {text:?}: expected section.key=v1,v2,... (e.g. optim.lr=1e-3,3e-3)"
            )
            .into());
        }
        Ok(Self {
            key: key.trim().to_string(),
            values,
        })
    }
}

/// One grid point: the overrides it applies, in axis order.
pub type Setting = Vec<(String, String)>;

/// Every combination of the axes' values, the first axis varying slowest.
pub fn settings(axes: &[GridAxis]) -> Vec<Setting> {
    let mut out: Vec<Setting> = vec![Vec::new()];
    for axis in axes {
        out = out
            .into_iter()
            .flat_map(|s| {
                axis.values.iter().map(move |v| {
                    let mut next = s.clone();
                    next.push((axis.key.clone(), v.clone()));
                    next
                })
            })
            .collect();
    }
    out
}

/// The folder name of a setting and seed, e.g.
/// `optim.lr=3e-3_optim.head_lr=1e-3_seed=1`.
pub fn run_name(setting: &Setting, seed: u64) -> String {
    let mut parts: Vec<String> = setting
        .iter()
        .map(|(k, v)| format!("{k}={}", v.replace(['/', ' ', '"'], "-")))
        .collect();
    parts.push(format!("seed={seed}"));
    parts.join("_")
}

/// What a sweep runs.
#[derive(Clone, Debug)]
pub struct SweepOptions {
    pub config: PathBuf,
    /// Overrides applied to every run, before the grid's.
    pub set: Vec<String>,
    pub axes: Vec<GridAxis>,
    /// Each seed sets both `run.seed` (data order, head, dropout) and
    /// `adapter.seed` (LoRA-Mini's projections, inner init).
    pub seeds: Vec<u64>,
    pub out_dir: PathBuf,
    /// Set (by Ctrl-C) to stop the run in progress with a checkpoint.
    pub stop: Option<Arc<AtomicBool>>,
}

/// One finished run's outcome, read from its `results.json`.
#[derive(Clone, Debug, Serialize)]
pub struct SweepRun {
    pub name: String,
    pub setting: Setting,
    pub seed: u64,
    /// Dev metrics at the selected step.
    pub dev: BTreeMap<String, Option<f64>>,
    /// Validation-slice metrics at the selected step (empty without one).
    pub validation: BTreeMap<String, Option<f64>>,
    pub trainable: u64,
    pub train_seconds: f64,
    pub skipped: bool,
}

/// How a sweep ended.
#[derive(Debug)]
pub enum SweepEnd {
    Finished(Vec<SweepRun>),
    /// Stopped by the flag; the named run holds a checkpoint.
    Interrupted {
        run: String,
        runs: Vec<SweepRun>,
    },
}

/// Runs every setting × seed into `out_dir/<run name>`, skipping runs that
/// finished (their `results.json` exists) and resuming interrupted ones.
/// After every run it rewrites `sweep.md` and `sweep.json`, so a sweep
/// stopped half-way keeps its finished rows.
pub fn run_sweep(options: &SweepOptions, headline: &str) -> Result<SweepEnd, Error> {
    let grid = settings(&options.axes);
    let total = grid.len() * options.seeds.len();
    let mut runs = Vec::new();
    for setting in &grid {
        for &seed in &options.seeds {
            let name = run_name(setting, seed);
            let out = options.out_dir.join(&name);
            let mut set = options.set.clone();
            set.extend(setting.iter().map(|(k, v)| format!("{k}={v}")));
            set.push(format!("run.seed={seed}"));
            set.push(format!("adapter.seed={seed}"));
            set.push(format!("run.output_dir={}", out.display()));
            let config = TrainConfig::load(&options.config, &set)?;
            let progress = format!("[{}/{total}] {name}", runs.len() + 1);
            let skipped = match run_or_skip(&config, &name, &progress, options.stop.clone())? {
                RunStatus::Interrupted => return Ok(SweepEnd::Interrupted { run: name, runs }),
                RunStatus::Skipped => true,
                RunStatus::Trained => false,
            };
            let results = out.join("results.json");
            runs.push(read_run(&results, name, setting.clone(), seed, skipped)?);
            write_sweep(&options.out_dir, &runs, headline)?;
        }
    }
    Ok(SweepEnd::Finished(runs))
}

/// What [`run_or_skip`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunStatus {
    /// The run had finished before (its `results.json` exists).
    Skipped,
    /// It ran to its end now (from scratch or resumed).
    Trained,
    /// The stop flag ended it early, with a checkpoint.
    Interrupted,
}

/// The unit of every multi-run runner (sweeps, the paper's tables): skips
/// a run whose output folder holds `results.json`, resumes one that holds
/// a checkpoint, and trains the rest. `progress` prefixes the status line.
pub fn run_or_skip(
    config: &TrainConfig,
    name: &str,
    progress: &str,
    stop: Option<Arc<AtomicBool>>,
) -> Result<RunStatus, Error> {
    let out = &config.run.output_dir;
    if out.join("results.json").exists() {
        eprintln!("{progress}: finished earlier, skipped");
        return Ok(RunStatus::Skipped);
    }
    let resume = out.join(CHECKPOINT).exists();
    eprintln!("{progress}{}", if resume { ": resuming" } else { "" });
    // The runner owns the folder: a run that never reached its first
    // checkpoint is started again.
    let options = TrainOptions {
        resume,
        stop,
        overwrite: true,
    };
    let summary = train_with(config, &options).map_err(|e| format!("{name}: {e}"))?;
    Ok(if summary.interrupted {
        RunStatus::Interrupted
    } else {
        RunStatus::Trained
    })
}

/// A finished run's `results.json`, errors naming the file.
pub fn read_results(path: &Path) -> Result<serde_json::Value, Error> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()).into())
}

fn read_run(
    results: &Path,
    name: String,
    setting: Setting,
    seed: u64,
    skipped: bool,
) -> Result<SweepRun, Error> {
    let value = read_results(results)?;
    let metrics = |key: &str| serde_json::from_value(value[key].clone()).unwrap_or_default();
    Ok(SweepRun {
        name,
        setting,
        seed,
        dev: metrics("best"),
        validation: metrics("best_validation"),
        trainable: value["trainable"].as_u64().unwrap_or(0),
        train_seconds: value["train_seconds"].as_f64().unwrap_or(0.0),
        skipped,
    })
}

/// Mean and sample standard deviation (0 for one value); `None` when empty.
pub fn mean_std(values: &[f64]) -> Option<(f64, f64)> {
    if values.is_empty() {
        return None;
    }
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let var = if values.len() > 1 {
        values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    Some((mean, var.sqrt()))
}

/// One grid point summarised over its finished seeds.
#[derive(Clone, Debug, Serialize)]
pub struct SettingSummary {
    pub setting: Setting,
    pub seeds: usize,
    /// `(mean, std)` of the headline metric on the validation slice and on
    /// the dev set.
    pub validation: Option<(f64, f64)>,
    pub dev: Option<(f64, f64)>,
    pub trainable: u64,
    pub mean_train_seconds: f64,
}

/// Groups `runs` by setting (in first-seen order) and summarises each.
pub fn summarise(runs: &[SweepRun], headline: &str) -> Vec<SettingSummary> {
    let mut order: Vec<&Setting> = Vec::new();
    for r in runs {
        if !order.contains(&&r.setting) {
            order.push(&r.setting);
        }
    }
    order
        .into_iter()
        .map(|setting| {
            let mine: Vec<&SweepRun> = runs.iter().filter(|r| &r.setting == setting).collect();
            let values = |pick: fn(&SweepRun) -> &BTreeMap<String, Option<f64>>| -> Vec<f64> {
                mine.iter()
                    .filter_map(|r| pick(r).get(headline).copied().flatten())
                    .collect()
            };
            SettingSummary {
                setting: setting.clone(),
                seeds: mine.len(),
                validation: mean_std(&values(|r| &r.validation)),
                dev: mean_std(&values(|r| &r.dev)),
                trainable: mine[0].trainable,
                mean_train_seconds: mine.iter().map(|r| r.train_seconds).sum::<f64>()
                    / mine.len() as f64,
            }
        })
        .collect()
}

/// The index of the setting with the best mean validation `headline`
/// (the highest, or the lowest for a loss); `None` when no run held out a
/// validation slice (choosing on dev is not offered).
pub fn chosen(summaries: &[SettingSummary], headline: &str) -> Option<usize> {
    let metric = Metric::named(headline).unwrap_or(Metric::Accuracy);
    let mut best: Option<(usize, f64)> = None;
    for (i, s) in summaries.iter().enumerate() {
        let Some((m, _)) = s.validation else { continue };
        // Ties go to the later setting, as `max_by` did before.
        if best.is_none_or(|(_, b)| !metric.improves(b, m)) {
            best = Some((i, m));
        }
    }
    best.map(|(i, _)| i)
}

/// The sweep's Markdown table.
pub fn markdown(runs: &[SweepRun], headline: &str) -> String {
    let summaries = summarise(runs, headline);
    let pick = chosen(&summaries, headline);
    let cell = |v: Option<(f64, f64)>| v.map_or("–".into(), |(m, s)| format!("{m:.4} ± {s:.4}"));
    let mut out = format!(
        "| setting | seeds | validation {headline} | dev {headline} | trainable | train s (mean) |\n\
         | --- | --- | --- | --- | --- | --- |\n"
    );
    for (i, s) in summaries.iter().enumerate() {
        let name: Vec<String> = s.setting.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let mark = if Some(i) == pick { " **(chosen)**" } else { "" };
        out.push_str(&format!(
            "| {}{mark} | {} | {} | {} | {} | {:.0} |\n",
            name.join(" "),
            s.seeds,
            cell(s.validation),
            cell(s.dev),
            s.trainable,
            s.mean_train_seconds
        ));
    }
    if pick.is_none() {
        out.push_str(
            "\nNo run held out a validation slice (task.validation_split), so no setting is chosen.\n",
        );
    }
    out
}

/// Writes `sweep.md` and `sweep.json` (the runs and the summaries) into
/// `dir`, each atomically.
pub fn write_sweep(dir: &Path, runs: &[SweepRun], headline: &str) -> Result<(), Error> {
    let summaries = summarise(runs, headline);
    let json = serde_json::to_string_pretty(&serde_json::json!({
        "headline": headline,
        "chosen": chosen(&summaries, headline).map(|i| &summaries[i].setting),
        "settings": summaries,
        "runs": runs,
    }))
    .map_err(|e| e.to_string())?;
    let write = |name: &str, bytes: &[u8]| {
        crate::io::write_atomic(&dir.join(name), bytes).map_err(Error::from)
    };
    write("sweep.md", markdown(runs, headline).as_bytes())?;
    write("sweep.json", json.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_expands_in_axis_order_and_names_runs() {
        let axes = vec![
            GridAxis::parse("optim.lr=1e-3,3e-3").unwrap(),
            GridAxis::parse("optim.head_lr=1e-3").unwrap(),
        ];
        let s = settings(&axes);
        assert_eq!(s.len(), 2);
        assert_eq!(
            run_name(&s[1], 2),
            "optim.lr=3e-3_optim.head_lr=1e-3_seed=2"
        );
        assert!(GridAxis::parse("lr=1").is_err());
        assert!(GridAxis::parse("optim.lr=").is_err());
    }

    fn run(lr: &str, seed: u64, val: f64, dev: f64) -> SweepRun {
        SweepRun {
            name: String::new(),
            setting: vec![("optim.lr".into(), lr.into())],
            seed,
            dev: [("mcc".to_string(), Some(dev))].into(),
            validation: [("mcc".to_string(), Some(val))].into(),
            trainable: 10,
            train_seconds: 1.0,
            skipped: false,
        }
    }

    #[test]
    fn summaries_choose_by_validation_never_dev() {
        let runs = vec![
            run("1e-3", 1, 0.30, 0.10),
            run("1e-3", 2, 0.20, 0.12),
            run("1e-2", 1, 0.10, 0.50),
        ];
        let s = summarise(&runs, "mcc");
        assert_eq!(s[0].seeds, 2);
        let (m, sd) = s[0].validation.unwrap();
        assert!((m - 0.25).abs() < 1e-12 && (sd - 0.0707106781).abs() < 1e-9);
        assert_eq!(chosen(&s, "mcc"), Some(0));
        assert!(markdown(&runs, "mcc").contains("optim.lr=1e-3 **(chosen)**"));
    }

    /// A decoder sweep's headline is a loss: the lowest validation wins.
    #[test]
    fn a_loss_headline_chooses_the_lowest() {
        let rename = |mut r: SweepRun| {
            r.validation = [("loss".to_string(), r.validation["mcc"])].into();
            r
        };
        let runs = vec![
            rename(run("1e-3", 1, 2.5, 0.0)),
            rename(run("1e-2", 1, 1.5, 0.0)),
        ];
        assert_eq!(chosen(&summarise(&runs, "loss"), "loss"), Some(1));
    }
}
