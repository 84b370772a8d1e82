//! What dynamic padding and length bucketing save on real GLUE batches,
//! measured apart from the fixed 32 × 128 case of `bench_train_step`.
//!
//! Trains LoRA-Mini (`dense+attention`, r=8, a=b=64, head in full, dropout
//! on) on the real all-MiniLM-L6-v2 over the first `--examples` training
//! examples of a local GLUE task, once per batching scheme, from the same
//! initial state:
//!
//! * `fixed`: every batch padded to `--max-len` (what a static-shape
//!   trainer does);
//! * `dynamic`: shuffled, each batch padded to its longest example;
//! * `bucketed`: shuffled, then sorted by length within windows of 50
//!   batches, so batches hold similar lengths (`run.bucket_by_length`).
//!
//! Prints one line per scheme and a JSON summary: tokens fed (padding
//! included), the share that is padding, wall time and examples/s.
//!
//! ```sh
//! cargo run --release --example bench_padding -- --data ../shared/data/glue/MRPC --task mrpc
//! ```

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use candle::{Device, Tensor};
use lora_mini::data::batch::{collate_classification, encode_examples, load_tokenizer, BatchPlan};
use lora_mini::data::{read_examples, task};
use lora_mini::models::bert::sequence_classification_loss;
use lora_mini::train::optim::{AdamWConfig, GroupedAdamW};
use lora_mini::train::trainer::classify_batch;

#[path = "common/workload.rs"]
mod workload;

struct Args {
    model: String,
    data: PathBuf,
    task: String,
    examples: usize,
    batch: usize,
    max_len: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        model: "../shared/models/all-MiniLM-L6-v2".into(),
        data: "../shared/data/glue/MRPC".into(),
        task: "mrpc".into(),
        examples: 640,
        batch: 32,
        max_len: 128,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        let number = |v: String| v.parse::<usize>().map_err(|e| format!("{flag}: {e}"));
        match flag.as_str() {
            "--model" => args.model = value()?,
            "--data" => args.data = value()?.into(),
            "--task" => args.task = value()?,
            "--examples" => args.examples = number(value()?)?,
            "--batch" => args.batch = number(value()?)?,
            "--max-len" => args.max_len = number(value()?)?,
            "--help" | "-h" => {
                println!(
                    "bench_padding [--model DIR] [--data GLUE_TASK_DIR] [--task NAME] \
                     [--examples 640] [--batch 32] [--max-len 128]"
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown flag {other}; see --help")),
        }
    }
    Ok(args)
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()?;
    lora_mini::alloc::keep_freed_buffers();
    lora_mini::threads::shorten_idle_spinning();
    let device = Device::Cpu;
    let task = task(&args.task)?;
    let mut examples = read_examples(task, &args.data.join("train.tsv"))?;
    examples.truncate(args.examples);
    let tokenizer = load_tokenizer(&PathBuf::from(&args.model).join("tokenizer.json"))?;
    let encoded = encode_examples(&tokenizer, &examples, args.max_len)?;
    let lengths: Vec<usize> = encoded.iter().map(|e| e.ids.len()).collect();

    let mut summary = Vec::new();
    for scheme in ["fixed", "dynamic", "bucketed"] {
        let loaded = workload::load_lora_mini_bert(&args.model, task.num_labels(), &device)?;
        let pad_id = loaded.pad_token_id();
        let vars = loaded.registry.trainable();
        let mut opt = GroupedAdamW::new(vars.clone(), AdamWConfig::default())?;
        let plan = BatchPlan {
            batch_size: args.batch,
            shuffle: true,
            bucket_by_length: scheme == "bucketed",
            seed: 42,
        };
        let (mut fed, mut real) = (0usize, 0usize);
        let start = Instant::now();
        for indices in plan.batches(&lengths, 0) {
            let items: Vec<_> = indices.iter().map(|&i| &encoded[i]).collect();
            let mut batch = collate_classification(&items, pad_id, &device)?;
            if scheme == "fixed" {
                let extra = args.max_len - batch.input_ids.dim(1)?;
                let pad_right = |t: &Tensor, value: u32| -> candle::Result<Tensor> {
                    let fill = Tensor::full(value, (t.dim(0)?, extra), &device)?;
                    Tensor::cat(&[t, &fill], 1)
                };
                batch.input_ids = pad_right(&batch.input_ids, pad_id)?;
                batch.token_type_ids = pad_right(&batch.token_type_ids, 0)?;
                batch.attention_mask = pad_right(&batch.attention_mask, 0)?;
            }
            fed += batch.input_ids.elem_count();
            real += indices.iter().map(|&i| lengths[i]).sum::<usize>();
            let logits = classify_batch(&loaded.model, &batch, true)?;
            let labels = batch
                .labels
                .as_ref()
                .ok_or("the training split has no labels")?;
            let loss = sequence_classification_loss(&logits, labels)?;
            let grads = loss.backward()?;
            let by_name: BTreeMap<_, _> = vars
                .iter()
                .filter_map(|(name, var)| {
                    grads
                        .get(var.as_tensor())
                        .map(|g| (name.clone(), g.clone()))
                })
                .collect();
            drop(grads);
            opt.step_with(&by_name, 1e-3, 1.0)?;
        }
        let seconds = start.elapsed().as_secs_f64();
        let padding = 1.0 - real as f64 / fed as f64;
        let per_second = encoded.len() as f64 / seconds;
        eprintln!(
            "{scheme:>9}: {fed} tokens fed, {:.1}% padding, {seconds:.1} s, {per_second:.1} examples/s",
            padding * 100.0
        );
        summary.push(serde_json::json!({
            "scheme": scheme,
            "tokens_fed": fed,
            "padding_fraction": padding,
            "seconds": seconds,
            "examples_per_second": per_second,
        }));
    }
    println!(
        "{}",
        serde_json::json!({
            "task": args.task,
            "examples": encoded.len(),
            "batch": args.batch,
            "max_len": args.max_len,
            "real_tokens": lengths.iter().sum::<usize>(),
            "schemes": summary,
        })
    );
    Ok(())
}
