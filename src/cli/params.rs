//! `lora-mini params`: trainable and total parameter counts from a
//! `config.json` alone.

use std::path::PathBuf;

use clap::{Args, ValueEnum};

use super::Error;
use lora_mini::adapter::targets::ALL_LINEAR;
use lora_mini::adapter::{AdapterConfig, LoraConfig, LoraMiniConfig, Method};
use lora_mini::models::bert::BertConfig;
use lora_mini::models::llama::LlamaConfig;
use lora_mini::models::presets::{resolve_targets, Family};
use lora_mini::models::shapes::{encoder_classifier, llama_causal_lm, t5_conditional_generation};
use lora_mini::models::t5::T5Config;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum MethodArg {
    /// Full fine-tuning: every parameter trains.
    Full,
    /// Standard LoRA: r·(d_in + d_out) per adapted layer.
    Lora,
    /// LoRA-Mini: r·(a + b) per adapted layer.
    LoraMini,
}

/// Options of `lora-mini params`.
#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
    lora-mini params --model ../shared/model-configs/roberta-base.json --task cola --method lora-mini --targets dense --r 8 --a 16 --b 16\n  \
    lora-mini params --model ../shared/model-configs/t5-small.json --task wmt16-en-ro --method lora --targets q,v --r 4 --json")]
pub struct ParamsArgs {
    /// A Hugging Face config.json, or a model folder holding one.
    #[arg(long, value_name = "CONFIG_OR_DIR")]
    pub model: PathBuf,
    /// cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli (BERT, RoBERTa) or wmt16-en-ro (T5).
    #[arg(long)]
    pub task: String,
    #[arg(long, value_enum)]
    pub method: MethodArg,
    /// A preset (dense, attention, dense+attention) or a comma list of module
    /// names; ignored for full fine-tuning.
    #[arg(long, default_value = "dense+attention")]
    pub targets: String,
    /// Rank r.
    #[arg(long, default_value_t = 8)]
    pub r: usize,
    /// LoRA-Mini's input-side width a.
    #[arg(long, default_value_t = 64)]
    pub a: usize,
    /// LoRA-Mini's output-side width b.
    #[arg(long, default_value_t = 64)]
    pub b: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: &ParamsArgs) -> Result<(), Error> {
    let path = if args.model.is_dir() {
        args.model.join("config.json")
    } else {
        args.model.clone()
    };
    let text = std::fs::read_to_string(&path).map_err(Error::io(&path))?;
    let err = |e: candle::Error| Error::from(e).context(path.display());
    let family = Family::from_config_json(&text).map_err(err)?;
    let labels = lora_mini::data::task(&args.task)?.num_labels();
    let (shapes, gated) = match (family, labels) {
        (Family::Llama, None) => {
            let c = LlamaConfig::from_json(&text).map_err(err)?;
            (llama_causal_lm(&c), false)
        }
        (Family::Llama, Some(_)) => {
            return Err(format!("a decoder trains on task causal-lm, not {}", args.task).into())
        }
        (Family::T5, None) => {
            let c = T5Config::from_json(&text).map_err(err)?;
            (t5_conditional_generation(&c), c.is_gated())
        }
        (Family::T5, Some(_)) => {
            return Err(format!("task {} needs a BERT or RoBERTa model", args.task).into())
        }
        (_, None) => {
            return Err(format!("task {} needs a T5 or Llama-family model", args.task).into())
        }
        (_, Some(n)) => (
            encoder_classifier(family, &BertConfig::from_json(&text).map_err(err)?, n),
            false,
        ),
    };
    let (method, targets) = match args.method {
        MethodArg::Full => (Method::Full, vec![ALL_LINEAR.to_string()]),
        MethodArg::Lora => (
            Method::Lora(LoraConfig::new(args.r)),
            resolve_targets(family, &args.targets, gated).map_err(err)?,
        ),
        MethodArg::LoraMini => (
            Method::LoraMini(LoraMiniConfig::new(args.r, args.a, args.b)),
            resolve_targets(family, &args.targets, gated).map_err(err)?,
        ),
    };
    let config = AdapterConfig {
        method,
        targets,
        modules_to_save: family.head_modules(),
    };
    let count = shapes.count(&config).map_err(err)?;
    if args.json {
        let json = serde_json::json!({
            "model": path.display().to_string(),
            "task": args.task,
            "method": config.method,
            "targets": config.targets,
            "modules_to_save": config.modules_to_save,
            "trainable": count.trainable,
            "total": count.total,
            "percentage": count.percentage(),
            "frozen_aux": count.frozen_aux,
        });
        println!("{json}");
    } else {
        println!("model       {} ({family:?})", path.display());
        println!(
            "task        {}{}",
            args.task,
            labels.map(|n| format!(" ({n} labels)")).unwrap_or_default()
        );
        println!(
            "method      {} on {}",
            config.method.name(),
            config.targets.join(",")
        );
        println!("trainable   {}", count.trainable);
        println!("total       {}", count.total);
        println!("percentage  {:.4}%", count.percentage());
        if count.frozen_aux > 0 {
            println!("frozen aux  {} (LoRA-Mini's A_aux and B_aux, regenerated from the seed; not in total)", count.frozen_aux);
        }
    }
    Ok(())
}
