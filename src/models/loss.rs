//! The token-level cross-entropy every generative model here trains on.

use candle::{DType, Result, Tensor};

/// Mean token cross-entropy of `logits (B, T, V)` against `labels (B, T)`,
/// skipping `-100`.
pub fn token_cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let (b, t, v) = logits.dims3()?;
    let (rows, targets) = labelled_rows(labels)?;
    let picked = logits.reshape((b * t, v))?.index_select(&rows, 0)?;
    rows_cross_entropy(&picked, targets)
}

/// The flat indices `(n)` of the positions of `labels (B, T)` that are not
/// `-100`, and their labels: the rows a loss is computed on.
pub fn labelled_rows(labels: &Tensor) -> Result<(Tensor, Vec<u32>)> {
    let dev = labels.device().clone();
    let labels: Vec<i64> = labels.to_dtype(DType::I64)?.flatten_all()?.to_vec1()?;
    let (keep, targets): (Vec<u32>, Vec<u32>) = labels
        .iter()
        .enumerate()
        .filter(|(_, &l)| l != -100)
        .map(|(i, &l)| (i as u32, l as u32))
        .unzip();
    if keep.is_empty() {
        candle::bail!("every label is -100: nothing to compute a loss on");
    }
    let n = keep.len();
    Ok((Tensor::from_vec(keep, n, &dev)?, targets))
}

/// Mean cross-entropy of `logits (n, V)`, one row per scored token, against
/// its `targets` (computed in f32).
pub fn rows_cross_entropy(logits: &Tensor, targets: Vec<u32>) -> Result<Tensor> {
    token_nlls(logits, targets)?.mean_all()
}

/// The negative log-likelihood `(n)` of each row's target in `logits (n,
/// V)` (computed in f32; fused on the CPU, see [`crate::nn::ops::target_nlls`]).
pub fn token_nlls(logits: &Tensor, targets: Vec<u32>) -> Result<Tensor> {
    crate::nn::ops::target_nlls(logits, targets)
}
