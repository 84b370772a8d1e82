//! Rerunning the paper's Tables 1–4: the configs of a table are run one by
//! one (finished runs skipped, interrupted ones resumed from their
//! checkpoint), then written as a Markdown table in the paper's layout with
//! the paper's numbers beside ours, and as JSON.
//!
//! Shared by the `table*`, `appendix_grid` and `figure2_rank_vs_accuracy`
//! examples (each includes it with `#[path]` and uses part of it, hence the
//! `dead_code` allowance) and by the integration tests.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use clap::Parser;
use serde::Serialize;

use lora_mini::train::config::TrainConfig;
use lora_mini::train::interrupt::ctrl_c_flag;
use lora_mini::train::sweep::{read_results, run_or_skip, RunStatus};
use lora_mini::Error;

/// One of the paper's main tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PaperTable {
    /// RoBERTa-base on GLUE.
    Table1,
    /// BERT-base on GLUE.
    Table2,
    /// T5-small on WMT16 en-ro.
    Table3,
    /// T5-base on WMT16 en-ro.
    Table4,
}

impl PaperTable {
    /// The prefix of the table's configs in `configs/`.
    pub fn config_prefix(self) -> &'static str {
        match self {
            Self::Table1 => "roberta-",
            Self::Table2 => "bert-",
            Self::Table3 => "t5-small-wmt16-",
            Self::Table4 => "t5-base-wmt16-",
        }
    }

    fn is_glue(self) -> bool {
        matches!(self, Self::Table1 | Self::Table2)
    }

    /// The table's columns: GLUE tasks, or the translation metrics.
    pub fn columns(self) -> &'static [&'static str] {
        if self.is_glue() {
            &["stsb", "cola", "mrpc", "rte"]
        } else {
            &["bleu", "rougeL"]
        }
    }

    /// The first line of the table's header in the paper's text (tables
    /// 1 and 2, and 3 and 4, share a header; the n-th occurrence is taken).
    fn header(self) -> (&'static str, usize) {
        match self {
            Self::Table1 => ("Method | Parameters | Rank | STSB", 0),
            Self::Table2 => ("Method | Parameters | Rank | STSB", 1),
            Self::Table3 => ("Method | Params | Rank | BLEU", 0),
            Self::Table4 => ("Method | Params | Rank | BLEU", 1),
        }
    }
}

/// A row of a table: the paper's method label (`FFT`, `LoRA`, `Ours(D)`,
/// `Ours(D+A)`, `Ours`) and rank (`-` for full fine-tuning).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct RowKey {
    pub method: String,
    pub rank: String,
}

/// The paper's numbers for one table: parameters and one value per column.
pub fn paper_rows(table: PaperTable, paper_text: &str) -> BTreeMap<RowKey, (String, Vec<String>)> {
    let (header, nth) = table.header();
    let lines: Vec<&str> = paper_text.lines().collect();
    let Some(start) = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l.starts_with(header))
        .map(|(i, _)| i)
        .nth(nth)
    else {
        return BTreeMap::new();
    };
    let mut rows = BTreeMap::new();
    for line in &lines[start + 1..] {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let separator = cells[0].starts_with("---");
        if cells.len() < 3 + table.columns().len() || cells[0] == "Method" || separator {
            if separator {
                continue;
            }
            if !rows.is_empty() {
                break;
            }
            continue;
        }
        let key = RowKey {
            method: cells[0].to_string(),
            rank: cells[2].to_string(),
        };
        let values = cells[3..3 + table.columns().len()]
            .iter()
            .map(|s| s.to_string())
            .collect();
        rows.insert(key, (cells[1].to_string(), values));
    }
    rows
}

/// The table row and column a config belongs to, from its file name
/// (`<model>-<task>-<method>[-<targets>][-r<R>]`).
pub fn row_of(table: PaperTable, stem: &str) -> Option<(RowKey, Option<String>)> {
    let rest = stem.strip_prefix(table.config_prefix())?;
    let (task, rest) = if table.is_glue() {
        let (task, rest) = rest.split_once('-')?;
        (Some(task.to_string()), rest)
    } else {
        (None, rest)
    };
    let (body, rank) = match rest.rsplit_once("-r") {
        Some((b, r)) if r.chars().all(|c| c.is_ascii_digit()) => (b, r.to_string()),
        _ => (rest, "-".to_string()),
    };
    let method = match body {
        "full" => "FFT",
        "lora" | "lora-dense" => "LoRA",
        "lora-mini-dense" => "Ours(D)",
        "lora-mini-dense+attention" if table.is_glue() => "Ours(D+A)",
        "lora-mini-dense+attention" => "Ours",
        _ => return None,
    };
    Some((
        RowKey {
            method: method.to_string(),
            rank,
        },
        task,
    ))
}

/// How to run a table.
#[derive(Clone, Debug)]
pub struct TableOptions {
    pub configs_dir: PathBuf,
    pub out_dir: PathBuf,
    /// Replaces every config's `model.source`.
    pub model: Option<String>,
    /// Local data: GLUE's root (holding `CoLA/`, `STS-B/`, ...) or the
    /// WMT16 folder; without it the configs read the hub.
    pub data: Option<PathBuf>,
    /// A few steps on a small slice, for smoke tests.
    pub quick: bool,
    /// Only configs whose name contains each of these.
    pub only: Vec<String>,
    /// Extra `section.key=value` overrides for every run.
    pub set: Vec<String>,
    /// Set (by Ctrl-C) to stop the current run at its next step, with a
    /// checkpoint, and the table after it; rerunning resumes.
    pub stop: Option<Arc<AtomicBool>>,
}

/// One run's outcome, as written to the table's JSON.
#[derive(Clone, Debug, Serialize)]
pub struct RunRecord {
    pub config: String,
    pub row: RowKey,
    pub task: Option<String>,
    #[serde(flatten)]
    pub outcome: RunOutcome,
}

/// The paper's number for a measured metric: accuracy for CoLA, MRPC and
/// RTE (the paper's tables report accuracy), Pearson for STS-B, and BLEU or
/// ROUGE-L, all in percent.
fn reported(metrics: &BTreeMap<String, Option<f64>>, column: &str) -> Option<f64> {
    let key = match column {
        "stsb" => "pearson",
        "bleu" => "bleu",
        "rougeL" => "rougeL",
        _ => "accuracy",
    };
    let v = metrics.get(key).copied().flatten()?;
    // BLEU is already on sacreBLEU's 0-100 scale.
    Some(if key == "bleu" { v } else { 100.0 * v })
}

fn quick_overrides(glue: bool) -> Vec<String> {
    let mut set = vec![
        "task.max_train_examples=64".to_string(),
        "task.max_dev_examples=32".into(),
        "task.max_len=32".into(),
        "optim.batch_size=8".into(),
        "optim.epochs=1".into(),
        "optim.max_steps=4".into(),
        "run.log_every=2".into(),
    ];
    if !glue {
        set.push("task.max_target_len=16".into());
    }
    set
}

/// Runs (or skips, or resumes) every config of `table` and returns the
/// records; see [`write_table`] for the files.
pub fn run_table(table: PaperTable, options: &TableOptions) -> Result<Vec<RunRecord>, Error> {
    run_table_with(table, options, &mut |_| Ok(()))
}

/// [`run_table`], calling `after_each` with the records so far after every
/// run (finished or skipped), so that a table interrupted half-way still
/// leaves its finished rows written.
pub fn run_table_with(
    table: PaperTable,
    options: &TableOptions,
    after_each: &mut dyn FnMut(&[RunRecord]) -> Result<(), Error>,
) -> Result<Vec<RunRecord>, Error> {
    let mut configs: Vec<PathBuf> = std::fs::read_dir(&options.configs_dir)
        .map_err(|e| format!("{}: {e}", options.configs_dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .filter(|p| row_of(table, &stem(p)).is_some())
        .filter(|p| options.only.iter().all(|o| stem(p).contains(o.as_str())))
        .collect();
    configs.sort();
    if configs.is_empty() {
        return Err(format!(
            "no {:?} configs ({}*.toml) in {}",
            table,
            table.config_prefix(),
            options.configs_dir.display()
        )
        .into());
    }
    let mut records = Vec::new();
    for (i, path) in configs.iter().enumerate() {
        let name = stem(path);
        let (row, task) = row_of(table, &name).expect("filtered above");
        let mut set = if options.quick {
            quick_overrides(table.is_glue())
        } else {
            Vec::new()
        };
        if let Some(data) = &options.data {
            let dir = match &task {
                Some(t) => data.join(lora_mini::data::task(t)?.glue_dir),
                None => data.clone(),
            };
            set.push(format!("task.data={}", dir.display()));
        }
        let progress = format!("[{}/{}] {name}", i + 1, configs.len());
        let outcome = run_one(path, &name, set, options, &progress)?;
        records.push(RunRecord {
            config: name,
            row,
            task,
            outcome,
        });
        after_each(&records)?;
    }
    Ok(records)
}

/// Runs one config into `options.out_dir/<name>` (or reads its finished
/// results): the best metrics, trainable parameters, training seconds and
/// whether it was skipped. `set` comes before the options' own overrides.
fn run_one(
    path: &Path,
    name: &str,
    mut set: Vec<String>,
    options: &TableOptions,
    progress: &str,
) -> Result<RunOutcome, Error> {
    let out = options.out_dir.join(name);
    if let Some(model) = &options.model {
        set.push(format!("model.source={model}"));
    }
    set.push(format!("run.output_dir={}", out.display()));
    set.extend(options.set.iter().cloned());
    let config = TrainConfig::load(path, &set)?;
    let results = out.join("results.json");
    let status = run_or_skip(&config, name, progress, options.stop.clone())?;
    if status == RunStatus::Interrupted {
        return Err(format!(
            "{name}: interrupted with a checkpoint; rerun the same command to resume"
        )
        .into());
    }
    let skipped = status == RunStatus::Skipped;
    let value = read_results(&results)?;
    Ok(RunOutcome {
        metrics: serde_json::from_value(value["best"].clone()).unwrap_or_default(),
        trainable: value["trainable"].as_u64().unwrap_or(0),
        train_seconds: value["train_seconds"].as_f64().unwrap_or(0.0),
        skipped,
    })
}

/// What one run reports: its best dev metrics, trainable parameters,
/// training seconds, and whether it had finished before (and was skipped).
#[derive(Clone, Debug, Serialize)]
pub struct RunOutcome {
    pub metrics: BTreeMap<String, Option<f64>>,
    pub trainable: u64,
    pub train_seconds: f64,
    pub skipped: bool,
}

fn stem(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The Markdown table: one row per paper row, each cell `ours (paper)`;
/// rows we ran that the paper lacks, or the reverse, show a dash.
pub fn markdown(table: PaperTable, records: &[RunRecord], paper_text: &str) -> String {
    let paper = paper_rows(table, paper_text);
    let mut keys: Vec<RowKey> = paper.keys().cloned().collect();
    for r in records {
        if !keys.contains(&r.row) {
            keys.push(r.row.clone());
        }
    }
    let order = |k: &RowKey| {
        let m = ["FFT", "LoRA", "Ours(D)", "Ours", "Ours(D+A)"]
            .iter()
            .position(|m| *m == k.method)
            .unwrap_or(9);
        (m, k.rank.parse::<u32>().unwrap_or(0))
    };
    keys.sort_by_key(order);
    let columns = table.columns();
    let mut out = format!(
        "| Method | Rank | Trainable (ours) | Parameters (paper) | {} |\n|{}\n",
        columns.join(" | "),
        " --- |".repeat(4 + columns.len())
    );
    for key in keys {
        let paper_row = paper.get(&key);
        let cells: Vec<String> = columns
            .iter()
            .enumerate()
            .map(|(c, column)| {
                let ours = records
                    .iter()
                    .find(|r| {
                        r.row == key && (r.task.as_deref() == Some(column) || r.task.is_none())
                    })
                    .and_then(|r| reported(&r.outcome.metrics, column));
                let theirs = paper_row.map_or("-", |(_, v)| v[c].as_str());
                format!(
                    "{} ({theirs})",
                    ours.map_or("-".to_string(), |v| format!("{v:.2}"))
                )
            })
            .collect();
        let trainable = records
            .iter()
            .find(|r| r.row == key)
            .map_or("-".to_string(), |r| r.outcome.trainable.to_string());
        out += &format!(
            "| {} | {} | {trainable} | {} | {} |\n",
            key.method,
            key.rank,
            paper_row.map_or("-", |(p, _)| p.as_str()),
            cells.join(" | ")
        );
    }
    out
}

/// Writes `table.md` and `results.json` into the options' output folder.
pub fn write_table(
    table: PaperTable,
    records: &[RunRecord],
    paper_text: &str,
    out_dir: &Path,
) -> Result<(), Error> {
    let md = format!(
        "# {table:?}: ours (paper)\n\nCells are `measured (paper)`: accuracy for CoLA, MRPC and RTE, Pearson for STS-B, in percent; BLEU and ROUGE-L for WMT16.\n\n{}",
        markdown(table, records, paper_text)
    );
    write_outputs(out_dir, "table.md", &md, records)
}

/// Writes an example's document (`table.md`, `figure2.svg`) and its raw
/// records as `results.json` into `dir`, each atomically.
fn write_outputs(
    dir: &Path,
    document_name: &str,
    document: &str,
    records: &(impl Serialize + ?Sized),
) -> Result<(), Error> {
    let write = |name: &str, bytes: &[u8]| {
        lora_mini::io::write_atomic(&dir.join(name), bytes).map_err(Error::from)
    };
    write(document_name, document.as_bytes())?;
    let json = serde_json::to_string_pretty(records).map_err(|e| e.to_string())?;
    write("results.json", json.as_bytes())
}

/// The options every table example takes.
#[derive(clap::Args, Debug)]
pub struct TableArgs {
    /// Checkpoint for every run: a folder or hub id (default: each config's).
    #[arg(long)]
    pub model: Option<String>,
    /// Local data: GLUE's root (CoLA/, STS-B/, ...) or the WMT16 folder
    /// (default: what each config says, the hub for the paper's configs).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// 4 steps on 64 examples per run, for smoke tests.
    #[arg(long)]
    pub quick: bool,
    /// Only configs whose name contains TEXT (repeatable: all must match;
    /// TEXT may start with a dash, as in `-r16-a64`).
    #[arg(long, value_name = "TEXT", allow_hyphen_values = true)]
    pub only: Vec<String>,
    /// Extra config override for every run, e.g. `optim.lr=3e-3`
    /// (repeatable).
    #[arg(long, value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Output folder [default: runs/tables/<example>].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// The configs folder.
    #[arg(long, default_value = "configs")]
    pub configs: PathBuf,
    /// The paper's text, for its numbers beside ours.
    #[arg(long, default_value = "../shared/paper/lora-mini-paper.txt")]
    pub paper: PathBuf,
}

impl TableArgs {
    /// The runner's options, with a Ctrl-C handler that stops the run in
    /// progress at its next step (resumable).
    fn options(&self, example: &str) -> Result<TableOptions, Error> {
        Ok(TableOptions {
            configs_dir: self.configs.clone(),
            out_dir: self
                .out
                .clone()
                .unwrap_or_else(|| PathBuf::from("runs/tables").join(example)),
            model: self.model.clone(),
            data: self.data.clone(),
            quick: self.quick,
            only: self.only.clone(),
            set: self.set.clone(),
            stop: Some(ctrl_c_flag()?),
        })
    }
}

/// The command line of a table example.
#[derive(Parser, Debug)]
#[command(
    about = "Reruns one of the paper's tables and writes table.md and results.json",
    after_help = "Finished runs (results.json present) are skipped and interrupted ones resume from their checkpoint, so a long table can be stopped and rerun."
)]
struct TableCli {
    #[command(flatten)]
    common: TableArgs,
}

/// The command line of `appendix_grid`.
#[derive(Parser, Debug)]
#[command(
    about = "Reruns the appendix's r, a, b sweep for one model and task",
    after_help = "Finished runs are skipped and interrupted ones resumed."
)]
struct AppendixCli {
    /// Whose configs and appendix table.
    #[arg(long, value_parser = ["roberta", "bert"], default_value = "roberta")]
    family: String,
    /// The GLUE task.
    #[arg(long, value_parser = ["cola", "rte", "mrpc", "stsb"], default_value = "cola")]
    task: String,
    #[command(flatten)]
    common: TableArgs,
}

/// The command line of `figure2_rank_vs_accuracy`.
#[derive(Parser, Debug)]
#[command(
    about = "Plots rank against dev score for LoRA-Mini dense+attention on RoBERTa (Table 1's runs)"
)]
struct FigureCli {
    #[command(flatten)]
    common: TableArgs,
}

/// Parses `args` (without the program name) for `example`; `None` when
/// `--help` or `--version` was printed instead.
fn parse<P: Parser>(example: &str, args: Vec<String>) -> Result<Option<P>, Error> {
    match P::try_parse_from(std::iter::once(example.to_string()).chain(args)) {
        Ok(parsed) => Ok(Some(parsed)),
        Err(e) if !e.use_stderr() => {
            e.print().map_err(|e| e.to_string())?;
            Ok(None)
        }
        // One line, as every error of this crate: clap's first line, without
        // its own `error: ` (the caller adds one).
        Err(e) => {
            let text = e.to_string();
            let first = text.lines().next().unwrap_or_default();
            Err(first.trim_start_matches("error: ").into())
        }
    }
}

/// Runs an example's `main` body: `error: …` and exit status 1 on failure.
pub fn exit_on_error(result: Result<(), Error>) {
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn read_paper(path: &Path) -> Result<String, Error> {
    std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()).into())
}

/// A table example's `main` on its arguments (without the program name).
pub fn example_run(table: PaperTable, example: &str, args: Vec<String>) -> Result<(), Error> {
    let Some(TableCli { common }) = parse(example, args)? else {
        return Ok(());
    };
    let options = common.options(example)?;
    let paper = &common.paper;
    let paper_text = read_paper(paper)?;
    let records = run_table_with(table, &options, &mut |records| {
        write_table(table, records, &paper_text, &options.out_dir)
    })?;
    println!("{}", markdown(table, &records, &paper_text));
    eprintln!(
        "wrote {} and {}",
        options.out_dir.join("table.md").display(),
        options.out_dir.join("results.json").display()
    );
    Ok(())
}

/// The appendix's `(r, a, b)` grid, in its row order.
pub const APPENDIX_GRID: [(usize, usize, usize); 14] = [
    (8, 16, 16),
    (8, 16, 32),
    (8, 16, 64),
    (8, 32, 16),
    (8, 32, 32),
    (8, 32, 64),
    (8, 64, 16),
    (8, 64, 32),
    (8, 64, 64),
    (16, 32, 32),
    (16, 32, 64),
    (16, 64, 32),
    (16, 64, 64),
    (32, 64, 64),
];

/// The paper's appendix rows for `family` (`roberta` or `bert`) and a GLUE
/// task, by `(r, a, b)`: `[metric D, parameters D, metric D+A, parameters
/// D+A]`. The appendix has four tables per model, CoLA, RTE, MRPC and STS-B
/// in that order, RoBERTa's first.
pub fn appendix_rows(
    paper_text: &str,
    family: &str,
    task: &str,
) -> BTreeMap<(usize, usize, usize), [String; 4]> {
    let index = match family {
        "roberta" => 0,
        "bert" => 4,
        _ => return BTreeMap::new(),
    } + match task {
        "cola" => 0,
        "rte" => 1,
        "mrpc" => 2,
        "stsb" => 3,
        _ => return BTreeMap::new(),
    };
    let mut tables: Vec<BTreeMap<(usize, usize, usize), [String; 4]>> = Vec::new();
    for line in paper_text.lines() {
        if line.starts_with("r | a | b") {
            tables.push(BTreeMap::new());
            continue;
        }
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let (Some(table), true) = (tables.last_mut(), cells.len() >= 8) else {
            continue;
        };
        let n: Vec<Option<usize>> = cells[..3].iter().map(|c| c.parse().ok()).collect();
        if let [Some(r), Some(a), Some(b)] = n[..] {
            let pct = |c: &str| c.trim_end_matches('%').to_string();
            table.insert(
                (r, a, b),
                [
                    pct(cells[3]),
                    cells[4].into(),
                    pct(cells[6]),
                    cells[7].into(),
                ],
            );
        }
    }
    tables.into_iter().nth(index).unwrap_or_default()
}

/// One appendix run.
#[derive(Clone, Debug, Serialize)]
pub struct GridRecord {
    pub r: usize,
    pub a: usize,
    pub b: usize,
    pub targets: String,
    #[serde(flatten)]
    pub outcome: RunOutcome,
}

/// Runs the appendix sweep (LoRA-Mini `dense` and `dense+attention` over
/// [`APPENDIX_GRID`]) for one model family and task, from that task's
/// `lora-mini-dense+attention-r8` config.
pub fn run_appendix(
    family: &str,
    task: &str,
    options: &TableOptions,
) -> Result<Vec<GridRecord>, Error> {
    let base = options
        .configs_dir
        .join(format!("{family}-{task}-lora-mini-dense+attention-r8.toml"));
    let glue_dir = lora_mini::data::task(task)?.glue_dir;
    let mut records = Vec::new();
    let total = 2 * APPENDIX_GRID.len();
    for (t, targets) in ["dense", "dense+attention"].iter().enumerate() {
        for (g, &(r, a, b)) in APPENDIX_GRID.iter().enumerate() {
            let name = format!("{family}-{task}-lora-mini-{targets}-r{r}-a{a}-b{b}");
            if !options.only.iter().all(|o| name.contains(o.as_str())) {
                continue;
            }
            let mut set = if options.quick {
                quick_overrides(true)
            } else {
                Vec::new()
            };
            if let Some(data) = &options.data {
                set.push(format!("task.data={}", data.join(glue_dir).display()));
            }
            set.extend([
                format!("adapter.targets={targets}"),
                format!("adapter.r={r}"),
                format!("adapter.a={a}"),
                format!("adapter.b={b}"),
            ]);
            let progress = format!("[{}/{total}] {name}", t * APPENDIX_GRID.len() + g + 1);
            let outcome = run_one(&base, &name, set, options, &progress)?;
            records.push(GridRecord {
                r,
                a,
                b,
                targets: targets.to_string(),
                outcome,
            });
        }
    }
    Ok(records)
}

/// The appendix table in the paper's layout, cells `ours (paper)`.
pub fn appendix_markdown(
    records: &[GridRecord],
    paper: &BTreeMap<(usize, usize, usize), [String; 4]>,
    task: &str,
) -> String {
    let mut out = format!(
        "| r | a | b | {task} (D) | Parameters (D) | {task} (D+A) | Parameters (D+A) |\n|{}\n",
        " --- |".repeat(7)
    );
    for &(r, a, b) in &APPENDIX_GRID {
        let find = |targets: &str| {
            records
                .iter()
                .find(|g| (g.r, g.a, g.b) == (r, a, b) && g.targets == targets)
        };
        let theirs = paper.get(&(r, a, b));
        let cell = |targets: &str, metric_col: usize| {
            let ours = find(targets)
                .and_then(|g| reported(&g.outcome.metrics, task))
                .map_or("-".to_string(), |v| format!("{v:.2}"));
            let paper_value = theirs.map_or("-", |p| p[metric_col].as_str());
            let params = find(targets).map_or("-".to_string(), |g| g.outcome.trainable.to_string());
            let paper_params = theirs.map_or("-", |p| p[metric_col + 1].as_str());
            format!("{ours} ({paper_value}) | {params} ({paper_params})")
        };
        out += &format!(
            "| {r} | {a} | {b} | {} | {} |\n",
            cell("dense", 0),
            cell("dense+attention", 2)
        );
    }
    out
}

/// The `main` of `examples/appendix_grid.rs` on its arguments.
pub fn appendix_main(args: Vec<String>) -> Result<(), Error> {
    let Some(AppendixCli {
        family,
        task,
        common,
    }) = parse("appendix_grid", args)?
    else {
        return Ok(());
    };
    let options = common.options("appendix_grid")?;
    let (family, task) = (family.as_str(), task.as_str());
    let paper_text = read_paper(&common.paper)?;
    let records = run_appendix(family, task, &options)?;
    let paper_rows = appendix_rows(&paper_text, family, task);
    let md = appendix_markdown(&records, &paper_rows, task);
    write_outputs(
        &options.out_dir,
        "table.md",
        &format!("# Appendix sweep: {family} on {task}, ours (paper)\n\n{md}"),
        &records,
    )?;
    println!("{md}");
    Ok(())
}

/// The `main` of `examples/figure2_rank_vs_accuracy.rs`: Table 1's
/// LoRA-Mini `dense+attention` rows, plotted as rank against each task's
/// dev score (`figure2.svg`).
pub fn figure2_main(args: Vec<String>) -> Result<(), Error> {
    let Some(FigureCli { common }) = parse("figure2_rank_vs_accuracy", args)? else {
        return Ok(());
    };
    let mut options = common.options("figure2_rank_vs_accuracy")?;
    options.only.push("lora-mini-dense+attention".to_string());
    let records = run_table(PaperTable::Table1, &options)?;
    let mut series: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    for column in PaperTable::Table1.columns() {
        let mut points: Vec<(f64, f64)> = records
            .iter()
            .filter(|r| r.task.as_deref() == Some(*column))
            .filter_map(|r| {
                Some((
                    r.row.rank.parse::<f64>().ok()?,
                    reported(&r.outcome.metrics, column)?,
                ))
            })
            .collect();
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        if !points.is_empty() {
            series.push((column.to_string(), points));
        }
    }
    let svg = lora_mini::train::plot::render_series_svg(
        "LoRA-Mini dense+attention: rank vs dev score",
        "rank r",
        "dev score (%)",
        &series,
    )?;
    write_outputs(&options.out_dir, "figure2.svg", &svg, &records)?;
    eprintln!("wrote {}", options.out_dir.join("figure2.svg").display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAPER: &str = "text\nMethod | Parameters | Rank | STSB | COLA | MRPC | RTE |\n\
        --- | --- | --- | --- | --- | --- | --- |\n\
        FFT | 125M | - | 90.77 | 80.54 | 89.46 | 74.01 |\n\
        LoRA | 0.90M | 8 | 88.49 | 80.53 | 87.50 | 62.81 |\n\
        Ours(D+A) | 0.08M | 8 | 89.62 | 82.35 | 87.01 | 70.75 |\n\
        Method | Parameters | Rank | STSB | COLA | MRPC | RTE |\n\
        FFT | 110M | - | 88.74 | 81.69 | 82.11 | 64.98 |\n";

    #[test]
    fn reads_the_nth_table_and_maps_config_names_to_rows() {
        let t1 = paper_rows(PaperTable::Table1, PAPER);
        assert_eq!(t1.len(), 3);
        let fft = RowKey {
            method: "FFT".into(),
            rank: "-".into(),
        };
        assert_eq!(t1[&fft].1[3], "74.01");
        assert_eq!(paper_rows(PaperTable::Table2, PAPER)[&fft].1[3], "64.98");
        assert_eq!(
            row_of(
                PaperTable::Table1,
                "roberta-cola-lora-mini-dense+attention-r8"
            ),
            Some((
                RowKey {
                    method: "Ours(D+A)".into(),
                    rank: "8".into()
                },
                Some("cola".into())
            ))
        );
        assert_eq!(
            row_of(PaperTable::Table3, "t5-small-wmt16-lora-r16")
                .unwrap()
                .0,
            RowKey {
                method: "LoRA".into(),
                rank: "16".into()
            }
        );
        assert_eq!(row_of(PaperTable::Table2, "roberta-cola-full"), None);
        assert_eq!(row_of(PaperTable::Table1, "roberta-cola"), None);
    }

    #[test]
    fn markdown_puts_ours_beside_the_paper() {
        let record = RunRecord {
            config: "roberta-rte-full".into(),
            row: RowKey {
                method: "FFT".into(),
                rank: "-".into(),
            },
            task: Some("rte".into()),
            outcome: RunOutcome {
                metrics: BTreeMap::from([("accuracy".to_string(), Some(0.6))]),
                trainable: 125,
                train_seconds: 1.0,
                skipped: false,
            },
        };
        let md = markdown(PaperTable::Table1, &[record], PAPER);
        let fft = md.lines().find(|l| l.starts_with("| FFT")).unwrap();
        assert_eq!(
            fft,
            "| FFT | - | 125 | 125M | - (90.77) | - (80.54) | - (89.46) | 60.00 (74.01) |"
        );
        assert!(md.contains("| LoRA | 8 | - | 0.90M |"));
    }
}
