//! `lora-mini export`: a trained adapter as a standard PEFT LoRA adapter, or
//! folded into a full Hugging Face checkpoint.

use std::path::PathBuf;

use candle::{DType, Device};
use clap::{Args, ValueEnum};

use super::Error;
use lora_mini::adapter::{export_peft, AdapterFile, LinearFactory, PeftExportOptions};
use lora_mini::models::presets::Family;
use lora_mini::models::task::load_task_model;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// adapter_config.json + adapter_model.safetensors for PEFT's
    /// `PeftModel.from_pretrained` (LoRA-Mini becomes an exact rank-r LoRA).
    Peft,
    /// config.json + model.safetensors (+ tokenizer.json) with the adapter
    /// folded into the weights.
    Merged,
}

/// Options of `lora-mini export`.
#[derive(Debug, Args)]
#[command(after_help = "Example:\n  \
    lora-mini export --model ../shared/models/all-MiniLM-L6-v2 --adapter runs/quickstart/adapter-best.safetensors --format peft --output runs/quickstart/peft")]
pub struct ExportArgs {
    /// The base model: a checkpoint folder, a hub id, or a .gguf file (or a
    /// folder holding one; merged, it is written dequantized to f32).
    #[arg(long)]
    pub model: String,
    /// A lora-mini adapter file (as `train` writes).
    #[arg(long, value_name = "FILE")]
    pub adapter: PathBuf,
    #[arg(long, value_enum)]
    pub format: Format,
    /// The folder to write.
    #[arg(long, value_name = "DIR")]
    pub output: PathBuf,
}

pub fn run(args: &ExportArgs) -> Result<(), Error> {
    let device = Device::Cpu;
    let file = AdapterFile::read(&args.adapter, &device)?;
    // The head's width is the adapter's: its trained classifier says how many labels.
    let labels = ["classifier.weight", "classifier.out_proj.weight"]
        .iter()
        .find_map(|n| file.tensors.get(*n).map(|t| t.dims()[0]))
        .or(Some(2));
    let factory = LinearFactory::new(file.config.clone())?;
    let mut loaded = load_task_model(&args.model, None, labels, factory, DType::F32, &device, 0)?;
    // GLUE's class names, when the adapter records its task.
    if let Some(settings) = file.data_settings() {
        if let Ok(task) = lora_mini::data::task(&settings.task) {
            if let lora_mini::data::TaskKind::Classification { labels } = task.kind {
                loaded = loaded.with_label_names(labels);
            }
        }
    }
    file.apply(&loaded.registry)?;
    match args.format {
        Format::Merged => loaded.save_merged(&args.output)?,
        Format::Peft => {
            let options = PeftExportOptions {
                task_type: match loaded.family {
                    Family::T5 => "SEQ_2_SEQ_LM",
                    Family::Llama => "CAUSAL_LM",
                    Family::Bert | Family::Roberta => "SEQ_CLS",
                }
                .into(),
                base_model: Some(base_model_name(&args.model)),
                modules_to_save: match loaded.family {
                    Family::Bert | Family::Roberta => vec!["classifier".into()],
                    Family::T5 | Family::Llama => vec![],
                },
                ..Default::default()
            };
            export_peft(&loaded.registry, &options, &args.output)?;
        }
    }
    println!("wrote {}", args.output.display());
    Ok(())
}

/// What the PEFT config names as its base model: the hub id as given, or a
/// local folder's absolute path (a relative one would only hold from the
/// folder the export ran in).
fn base_model_name(spec: &str) -> String {
    if lora_mini::models::loader::looks_like_path(spec) {
        if let Ok(path) = std::fs::canonicalize(spec) {
            return path.display().to_string();
        }
    }
    spec.to_string()
}
