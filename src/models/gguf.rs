//! Llama-family checkpoints in llama.cpp's GGUF format, read through
//! Candle's GGUF reader: the config from the metadata, and the tensors
//! under their Hugging Face names in the Hugging Face row order.

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use candle::quantized::gguf_file::{Content, Value};
use std::sync::Arc;

use candle::quantized::{GgmlDType, QTensor};
use candle::{DType, Device, Result, Tensor};

use super::llama::{LlamaConfig, TokenIds};
use crate::kernels::quantized_matmul::reorder_rows;

/// A quantized base: the dense tensors and the quantized linear weights,
/// each under its Hugging Face name.
pub type QuantizedBase = (HashMap<String, Tensor>, HashMap<String, Arc<QTensor>>);

/// The GGUF `general.architecture`s this crate reads, all Llama-family.
pub const ARCHITECTURES: &[&str] = &["llama", "mistral", "qwen2"];

/// An open GGUF file: its metadata and tensor index (the tensor data stays
/// on disk until asked for).
pub struct GgufFile {
    path: PathBuf,
    content: Content,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GgufFile({})", self.path.display())
    }
}

impl GgufFile {
    /// Reads the header of `path`; an unknown architecture is an error
    /// naming it and the file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let in_file = |e: candle::Error| {
            candle::Error::msg(format!("{}: {}", path.display(), crate::error::message(&e)))
        };
        let mut reader = BufReader::new(File::open(&path).map_err(|e| in_file(e.into()))?);
        let content = Content::read(&mut reader).map_err(in_file)?;
        let file = Self { path, content };
        let arch = file.architecture()?;
        if !ARCHITECTURES.contains(&arch) {
            candle::bail!(
                "{}: architecture {arch:?} is not supported (the Llama family: {ARCHITECTURES:?})",
                file.path.display()
            );
        }
        Ok(file)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.content.metadata
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> Result<&str> {
        Ok(self.value("general.architecture")?.to_string()?.as_str())
    }

    fn value(&self, key: &str) -> Result<&Value> {
        self.content.metadata.get(key).ok_or_else(|| {
            candle::Error::msg(format!("{}: metadata has no {key}", self.path.display()))
        })
    }

    /// An architecture-scoped number (`llama.block_count`...).
    fn arch_usize(&self, key: &str) -> Result<usize> {
        let key = format!("{}.{key}", self.architecture()?);
        Ok(self
            .value(&key)?
            .to_u64()
            .or_else(|_| self.value(&key)?.to_u32().map(u64::from))? as usize)
    }

    fn arch_f64(&self, key: &str) -> Result<Option<f64>> {
        let key = format!("{}.{key}", self.architecture()?);
        self.content
            .metadata
            .get(&key)
            .map(|v| v.to_f32().map(f64::from).or_else(|_| v.to_f64()))
            .transpose()
    }

    fn token_id(&self, key: &str) -> Option<u32> {
        let v = self
            .content
            .metadata
            .get(&format!("tokenizer.ggml.{key}"))?;
        v.to_u32().ok()
    }

    /// The chat template the file carries (`tokenizer.chat_template`).
    pub fn chat_template(&self) -> Option<String> {
        let v = self.content.metadata.get("tokenizer.chat_template")?;
        v.to_string().ok().cloned()
    }

    /// The Hugging Face config the metadata describes. The embeddings are
    /// tied when the file has no `output.weight`.
    pub fn config(&self) -> Result<LlamaConfig> {
        let arch = self.architecture()?.to_string();
        let heads = self.arch_usize("attention.head_count")?;
        let hidden = self.arch_usize("embedding_length")?;
        let vocab = match self.arch_usize("vocab_size") {
            Ok(v) => v,
            Err(_) => self.tensor_dims("token_embd.weight")?[0],
        };
        let head_dim = self.arch_usize("attention.key_length").ok();
        let config = LlamaConfig {
            model_type: Some(arch.clone()),
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: self.arch_usize("feed_forward_length")?,
            num_hidden_layers: self.arch_usize("block_count")?,
            num_attention_heads: heads,
            num_key_value_heads: Some(self.arch_usize("attention.head_count_kv").unwrap_or(heads)),
            head_dim: head_dim.filter(|d| *d != hidden / heads),
            // GGUF stores f32; transformers' configs hold the decimal value.
            rms_norm_eps: round_f32(
                self.arch_f64("attention.layer_norm_rms_epsilon")?
                    .unwrap_or(1e-5),
            ),
            rope_theta: self.arch_f64("rope.freq_base")?.unwrap_or(10_000.0),
            rope_scaling: None,
            max_position_embeddings: self.arch_usize("context_length").ok(),
            hidden_act: crate::nn::Activation::Silu,
            tie_word_embeddings: !self.content.tensor_infos.contains_key("output.weight"),
            attention_bias: arch != "qwen2"
                && self
                    .content
                    .tensor_infos
                    .contains_key("blk.0.attn_output.bias"),
            mlp_bias: false,
            sliding_window: None,
            use_sliding_window: None,
            bos_token_id: self.token_id("bos_token_id"),
            eos_token_id: self.token_id("eos_token_id").map(TokenIds::One),
            pad_token_id: self.token_id("padding_token_id"),
        };
        if self
            .arch_f64("rope.scaling.factor")?
            .is_some_and(|f| f != 1.0)
        {
            candle::bail!(
                "{}: rope scaling in GGUF metadata is not supported yet",
                self.path.display()
            );
        }
        config.validate()?;
        Ok(config)
    }

    fn tensor_dims(&self, name: &str) -> Result<Vec<usize>> {
        match self.content.tensor_infos.get(name) {
            Some(info) => Ok(info.shape.dims().to_vec()),
            None => candle::bail!("{}: no tensor {name}", self.path.display()),
        }
    }

    /// Every tensor, quantized as stored, under its Hugging Face name (Q and
    /// K rows still in llama.cpp's order; see [`GgufFile::dequantized`]).
    pub fn quantized(&self, device: &Device) -> Result<HashMap<String, QTensor>> {
        let mut reader = BufReader::new(File::open(&self.path)?);
        let mut out = HashMap::new();
        for name in self.content.tensor_infos.keys() {
            let Some(hf) = hf_name(name) else {
                candle::bail!("{}: unexpected tensor {name}", self.path.display());
            };
            out.insert(hf, self.content.tensor(&mut reader, name, device)?);
        }
        Ok(out)
    }

    /// Every tensor dequantized to f32, under its Hugging Face name, with
    /// the query and key rows (and biases) back in Hugging Face's order.
    pub fn dequantized(&self, device: &Device) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for (name, q) in self.quantized(device)? {
            let t = q.dequantize(device)?;
            out.insert(name.clone(), self.unpermute_dense(&name, t)?);
        }
        Ok(out)
    }

    /// The tensors of a quantized base: the linear weights
    /// (`model.layers.N.*_proj.weight` and `lm_head.weight`, the embedding
    /// table when tied) as stored in a block format (query
    /// and key rows moved back into Hugging Face's order, whole rows of
    /// blocks at a time), and everything else, including any linear weight
    /// stored as plain floats, dequantized to f32.
    pub fn quantized_base(&self, device: &Device) -> Result<QuantizedBase> {
        let (mut dense, mut quantized) = (HashMap::new(), HashMap::new());
        let tensors = self.quantized(device)?;
        let tied = !tensors.contains_key("lm_head.weight");
        for (name, q) in tensors {
            let float = matches!(q.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16);
            let linear = name == "lm_head.weight"
                || name.starts_with("model.layers.") && name.ends_with("_proj.weight");
            if name == "model.embed_tokens.weight" && tied && !float {
                // A tied head multiplies by the quantized table, as
                // llama.cpp does; the lookup reads it dequantized.
                dense.insert(name, q.dequantize(device)?);
                quantized.insert("lm_head.weight".to_string(), Arc::new(q));
            } else if linear && !float && q.rank() == 2 {
                let q = match self.permuted_heads(&name)? {
                    Some(heads) => {
                        reorder_rows(&q, &unpermuted_order(q.shape().dims()[0], heads)?)?
                    }
                    None => q,
                };
                quantized.insert(name, Arc::new(q));
            } else {
                let t = q.dequantize(device)?;
                dense.insert(name.clone(), self.unpermute_dense(&name, t)?);
            }
        }
        Ok((dense, quantized))
    }

    /// The head count whose rows llama.cpp permuted in tensor `name` (the
    /// query and key projections of a `llama` file), or `None`.
    fn permuted_heads(&self, name: &str) -> Result<Option<usize>> {
        if self.architecture()? != "llama" {
            return Ok(None);
        }
        let config = self.config()?;
        Ok(if name.contains("self_attn.q_proj") {
            Some(config.num_attention_heads)
        } else if name.contains("self_attn.k_proj") {
            Some(config.num_kv_heads())
        } else {
            None
        })
    }

    fn unpermute_dense(&self, name: &str, t: Tensor) -> Result<Tensor> {
        match self.permuted_heads(name)? {
            Some(heads) => unpermute_rows(&t, heads),
            None => Ok(t),
        }
    }
}

/// The decimal an f32 metadata value was written from (`1e-5`, not
/// `9.99999974e-6`).
fn round_f32(v: f64) -> f64 {
    format!("{}", v as f32).parse().unwrap_or(v)
}

/// The Hugging Face name of a llama.cpp tensor name, or `None` if unknown.
pub fn hf_name(gguf: &str) -> Option<String> {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(name) = fixed {
        return Some(name.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, param) = rest.rsplit_once('.')?;
    let hf = match module {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{param}"))
}

/// Undoes llama.cpp's `permute` of a query or key weight (or bias), which
/// interleaves the two rotary halves of each head: the GGUF rows of a head
/// are `(d/2, 2)`, Hugging Face's `(2, d/2)`.
pub fn unpermute_rows(t: &Tensor, heads: usize) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    let rows = dims[0];
    if heads == 0 || !rows.is_multiple_of(2 * heads) {
        candle::bail!("cannot unpermute {rows} rows into {heads} heads");
    }
    let rest: usize = dims[1..].iter().product();
    t.reshape((heads, rows / heads / 2, 2, rest))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)
}

/// Row `i` of the unpermuted tensor is row `order[i]` of the GGUF one:
/// [`unpermute_rows`] applied to the row indices.
fn unpermuted_order(rows: usize, heads: usize) -> Result<Vec<usize>> {
    let index = Tensor::arange(0u32, rows as u32, &Device::Cpu)?
        .to_dtype(DType::F32)?
        .reshape((rows, 1))?;
    let order = unpermute_rows(&index, heads)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    Ok(order.into_iter().map(|r| r as usize).collect())
}

/// The `.gguf` file `path` names: the file itself, or the only one in a
/// folder. `None` when `path` is a folder without one.
pub fn find_gguf(path: &Path) -> Result<Option<PathBuf>> {
    if path.is_file() {
        return Ok(path
            .extension()
            .is_some_and(|e| e == "gguf")
            .then(|| path.to_path_buf()));
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|e| candle::Error::msg(format!("{}: {e}", path.display())))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "gguf"))
        .collect();
    found.sort();
    match found.len() {
        0 => Ok(None),
        1 => Ok(found.pop()),
        n => candle::bail!("{} holds {n} .gguf files; name one", path.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_hugging_face() {
        assert_eq!(
            hf_name("blk.12.attn_k.weight").unwrap(),
            "model.layers.12.self_attn.k_proj.weight"
        );
        assert_eq!(
            hf_name("blk.0.ffn_down.weight").unwrap(),
            "model.layers.0.mlp.down_proj.weight"
        );
        assert_eq!(
            hf_name("blk.3.attn_q.bias").unwrap(),
            "model.layers.3.self_attn.q_proj.bias"
        );
        assert_eq!(
            hf_name("token_embd.weight").unwrap(),
            "model.embed_tokens.weight"
        );
        assert_eq!(hf_name("blk.0.mystery.weight"), None);
    }

    /// llama.cpp's convert script: `w.reshape(heads, 2, d/2, in)
    /// .swapaxes(1, 2).reshape(w.shape)`; unpermuting must invert it.
    #[test]
    fn unpermute_inverts_llama_cpp_permute() -> Result<()> {
        let (heads, d, d_in) = (3, 8, 5);
        let hf = Tensor::arange(0f32, (heads * d * d_in) as f32, &Device::Cpu)?
            .reshape((heads * d, d_in))?;
        let gguf = hf
            .reshape((heads, 2, d / 2, d_in))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((heads * d, d_in))?;
        assert_ne!(gguf.to_vec2::<f32>()?, hf.to_vec2::<f32>()?);
        assert_eq!(
            unpermute_rows(&gguf, heads)?.to_vec2::<f32>()?,
            hf.to_vec2::<f32>()?
        );
        Ok(())
    }
}
