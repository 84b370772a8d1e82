use candle::{DType, Device, Result, Tensor};
use candle_nn::Linear;
use lora_mini::rng::SeededRng;

/// A deterministic tensor with entries uniform in [-scale, scale).
pub fn uniform(seed: u64, dims: &[usize], scale: f64, dtype: DType) -> Result<Tensor> {
    let n: usize = dims.iter().product();
    let values = SeededRng::new(seed).uniform_symmetric_f32(n, scale);
    Tensor::from_vec(values, dims, &Device::Cpu)?.to_dtype(dtype)
}

/// A random "pretrained" linear layer `d_in -> d_out`.
pub fn base_linear(
    seed: u64,
    d_in: usize,
    d_out: usize,
    bias: bool,
    dtype: DType,
) -> Result<Linear> {
    let w = uniform(seed, &[d_out, d_in], 1.0 / (d_in as f64).sqrt(), dtype)?;
    let b = if bias {
        Some(uniform(seed + 1, &[d_out], 0.1, dtype)?)
    } else {
        None
    };
    Ok(Linear::new(w, b))
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    (a.to_dtype(DType::F64)? - b.to_dtype(DType::F64)?)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f64>()
}

pub fn values(t: &Tensor) -> Result<Vec<f32>> {
    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
}

/// The path of ../shared from the crate root (tests run there).
pub fn shared(rel: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared")
        .join(rel)
}

use lora_mini::adapter::{AdaptedLinear, AdapterConfig, AdapterRegistry, LinearFactory};

/// A toy model: two "layers" of query/value/dense projections and a
/// classifier, built through the factory with fixed pretrained weights.
pub struct ToyModel {
    pub layers: Vec<(String, AdaptedLinear)>,
    pub registry: AdapterRegistry,
}

pub const TOY_PATHS: [(&str, usize, usize); 7] = [
    ("roberta.encoder.layer.0.attention.self.query", 32, 32),
    ("roberta.encoder.layer.0.attention.self.value", 32, 32),
    ("roberta.encoder.layer.0.intermediate.dense", 32, 64),
    ("roberta.encoder.layer.1.attention.self.query", 32, 32),
    ("roberta.encoder.layer.1.attention.self.value", 32, 32),
    ("classifier.dense", 32, 32),
    ("classifier.out_proj", 32, 2),
];

impl ToyModel {
    pub fn build(config: AdapterConfig) -> Result<Self> {
        Self::build_with(LinearFactory::new(config)?)
    }

    pub fn build_with(mut factory: LinearFactory) -> Result<Self> {
        let mut layers = Vec::new();
        for (i, (path, d_in, d_out)) in TOY_PATHS.iter().enumerate() {
            let base = base_linear(100 + i as u64, *d_in, *d_out, true, DType::F32)?;
            layers.push((path.to_string(), factory.build(path, &base)?));
        }
        Ok(Self {
            layers,
            registry: factory.finish()?,
        })
    }

    /// Every layer's output on a fixed input, concatenated.
    pub fn outputs(&self, x: &Tensor) -> Result<Vec<f32>> {
        let mut out = Vec::new();
        for (_, layer) in &self.layers {
            let d_in = layer.dims()?.1;
            out.extend(values(&layer.forward_t(&x.narrow(1, 0, d_in)?, false)?)?);
        }
        Ok(out)
    }

    /// Sets every trainable tensor to fresh random values, as training would.
    pub fn perturb(&self, seed: u64) -> Result<()> {
        for (i, (_, var)) in self.registry.trainable().iter().enumerate() {
            let t = uniform(seed + i as u64, var.dims(), 0.2, var.dtype())?;
            var.set(&t)?;
        }
        Ok(())
    }
}

/// Every tensor of a BERT-layout encoder under `root` (`bert` or `roberta`)
/// with `[vocab, hidden, intermediate, layers, max_positions, type_vocab]`,
/// plus the `head` linears `(path, d_in, d_out)`. Weights are spread wider than
/// transformers' init so that outputs depend on the input.
pub fn random_encoder(
    root: &str,
    [v, h, ff, layers, p, types]: [usize; 6],
    head: &[(&str, usize, usize)],
) -> Result<std::collections::HashMap<String, Tensor>> {
    let mut shapes: Vec<(String, Vec<usize>)> = vec![
        (
            format!("{root}.embeddings.word_embeddings.weight"),
            vec![v, h],
        ),
        (
            format!("{root}.embeddings.position_embeddings.weight"),
            vec![p, h],
        ),
        (
            format!("{root}.embeddings.token_type_embeddings.weight"),
            vec![types, h],
        ),
    ];
    let mut linears: Vec<(String, usize, usize)> = head
        .iter()
        .map(|(n, i, o)| (n.to_string(), *i, *o))
        .collect();
    let mut norms = vec![format!("{root}.embeddings.LayerNorm")];
    for i in 0..layers {
        let l = format!("{root}.encoder.layer.{i}");
        for (m, d_in, d_out) in [
            ("attention.self.query", h, h),
            ("attention.self.key", h, h),
            ("attention.self.value", h, h),
            ("attention.output.dense", h, h),
            ("intermediate.dense", h, ff),
            ("output.dense", ff, h),
        ] {
            linears.push((format!("{l}.{m}"), d_in, d_out));
        }
        norms.push(format!("{l}.attention.output.LayerNorm"));
        norms.push(format!("{l}.output.LayerNorm"));
    }
    for (name, d_in, d_out) in linears {
        shapes.push((format!("{name}.weight"), vec![d_out, d_in]));
        shapes.push((format!("{name}.bias"), vec![d_out]));
    }
    let mut tensors = std::collections::HashMap::new();
    for (i, (name, dims)) in shapes.into_iter().enumerate() {
        let fan_in = *dims.last().unwrap() as f64;
        tensors.insert(
            name,
            uniform(500 + i as u64, &dims, 1.5 / fan_in.sqrt(), DType::F32)?,
        );
    }
    for (i, norm) in norms.into_iter().enumerate() {
        tensors.insert(
            format!("{norm}.weight"),
            (uniform(900 + i as u64, &[h], 0.3, DType::F32)? + 1.0)?,
        );
        tensors.insert(
            format!("{norm}.bias"),
            uniform(950 + i as u64, &[h], 0.3, DType::F32)?,
        );
    }
    Ok(tensors)
}

/// An error's text without Candle's backtrace.
pub fn message(e: candle::Error) -> String {
    lora_mini::error::message(&e)
}

/// A fresh folder for one test's files, under one folder per test process
/// that is removed when the test binary exits (set
/// `LORA_MINI_KEEP_TEST_FILES=1` to keep it for a look after a failure).
/// The binary's own exit is the only point that every test has finished
/// with its files, hence `atexit` rather than a guard per test.
pub fn scratch(name: &str) -> std::path::PathBuf {
    static CLEANUP: std::sync::Once = std::sync::Once::new();
    CLEANUP.call_once(|| {
        if std::env::var_os("LORA_MINI_KEEP_TEST_FILES").is_none() {
            extern "C" fn remove_root() {
                let _ = std::fs::remove_dir_all(scratch_root());
            }
            extern "C" {
                fn atexit(callback: extern "C" fn()) -> std::os::raw::c_int;
            }
            // SAFETY: atexit is the C library's, the callback takes no
            // arguments and touches no state that exit has torn down.
            unsafe { atexit(remove_root) };
        }
    });
    let dir = scratch_root().join(name);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn scratch_root() -> std::path::PathBuf {
    std::env::temp_dir().join(format!("lora-mini-tests-{}", std::process::id()))
}
