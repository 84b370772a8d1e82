//! The attention core of BERT and RoBERTa, `softmax(q·kᵀ/√d + mask)·v`
//! with dropout on the probabilities, as one fused CPU op with a backward;
//! and of Llama-family decoders in training, with grouped-query heads and a
//! causal (or packed-document) mask per query.
//!
//! Built from Candle ops, the core transposes q, k and v into heads, keeps
//! the scores, the masked scores, the probabilities, the dropped
//! probabilities and the dropout mask of every layer alive until the
//! backward (five `batch·heads·t²` tensors a layer, 25 MB each at
//! 32 × 128 tokens and 12 heads), and makes a pass over them for each op.
//! The fused op reads q, k and v in place from the `(batch, t, hidden)`
//! projections, works one (sequence, head) pair at a time in cache-sized
//! buffers, keeps only the dropout mask as bytes, and recomputes the
//! probabilities in the backward from q and k: the recomputation costs one
//! `t × t × d` gemm per pair, a tenth of a layer's projection work.
//!
//! Under a decoder's mask the core works [`QUERY_BLOCK`] queries at a
//! time and reads only the keys up to the last one a query of the block
//! sees: past it every probability is exactly 0 (its mask is `-inf`), so
//! under a causal mask of 128 tokens the products shrink to 5/8.
//!
//! It runs for contiguous f32 CPU tensors; elsewhere (CUDA, Metal, other
//! dtypes) [`attention`] composes the same computation from Candle ops.

use std::borrow::Cow;
use std::ops::Range;

use candle::{CpuStorage, CustomOp1, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::dropout::SeededDropout;
use crate::kernels::fused::{softmax_in_place, vectorized};
use crate::kernels::{f32_rows, gemm_strided, with_cpu_f32};

/// The dropout mask of one call on the attention probabilities: one byte
/// per `(sequence, head, query, key)`, 1 where the probability is kept, and
/// the scale kept probabilities are multiplied by.
pub(crate) struct ProbsDropout {
    keep: Vec<u8>,
    scale: f32,
}

impl ProbsDropout {
    /// Draws the next mask of `dropout` for `batch · heads · t²`
    /// probabilities, or `None` when dropout is off (eval, or `p = 0`).
    pub(crate) fn draw(
        dropout: &SeededDropout,
        train: bool,
        batch: usize,
        heads: usize,
        t: usize,
    ) -> Option<Self> {
        (train && dropout.p() > 0.0).then(|| Self {
            keep: dropout.next_mask(batch * heads * t * t, 1u8, 0u8),
            scale: dropout.keep_scale(),
        })
    }
}

/// The attention context `softmax(q·kᵀ/√d + mask)·v` for `q`, `k`, `v` of
/// shape `(batch, t, heads · d)`, an additive `mask` of shape
/// `(batch, 1, 1, t)` and optional dropout on the probabilities; returns
/// `(batch, t, heads · d)`, the heads side by side as BERT concatenates
/// them.
pub(crate) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    heads: usize,
    dropout: Option<ProbsDropout>,
) -> Result<Tensor> {
    let (b, t, hidden) = q.dims3()?;
    let fusable = |x: &Tensor| x.device().is_cpu() && x.dtype() == DType::F32;
    if fusable(q) && fusable(k) && fusable(v) && fusable(mask) {
        let keys = mask.flatten_all()?.to_vec1::<f32>()?;
        if keys.len() != b * t {
            candle::bail!(
                "attention: the mask has {} entries, not {}",
                keys.len(),
                b * t
            );
        }
        let op = AttentionCore {
            heads,
            kv_heads: heads,
            mask: AttentionMask::Keys(keys),
            dropout,
        };
        return q
            .contiguous()?
            .apply_op3(&k.contiguous()?, &v.contiguous()?, op);
    }
    composed(q, k, v, mask, heads, dropout.as_ref(), (b, t, hidden))
}

/// The decoder's attention core for `q: (batch, t, heads · d)` and `k`, `v`:
/// `(batch, t, kv_heads · d)` (grouped-query: each key-value head serves
/// `heads / kv_heads` query heads in a row, as transformers' `repeat_kv`),
/// with an additive `mask` broadcastable to `(batch, 1, t, t)` (causal,
/// padding, packed documents) and no dropout. Returns `(batch, t, heads ·
/// d)`, or `None` off the CPU or f32, for the caller to compose.
pub(crate) fn grouped_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    heads: usize,
    kv_heads: usize,
) -> Result<Option<Tensor>> {
    let (b, t, _) = q.dims3()?;
    let fusable = |x: &Tensor| x.device().is_cpu() && x.dtype() == DType::F32;
    if !(fusable(q) && fusable(k) && fusable(v) && fusable(mask)) {
        return Ok(None);
    }
    if kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
        candle::bail!(
            "attention: {heads} query heads are not a multiple of {kv_heads} key-value heads"
        );
    }
    let op = AttentionCore::grouped(mask, (b, t), heads, kv_heads)?;
    let out = q
        .contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)?;
    Ok(Some(out))
}

/// [`grouped_attention`] over one planar f32 CPU buffer `[q | k | v]`
/// (q's `batch·t·heads·d` values, then k's and v's `batch·t·kv_heads·d`,
/// each row-major `(batch, t, width)`), as `kernels::qkv` writes it; its
/// gradient comes back in the same layout. Returns `(batch, t, heads ·
/// d)`.
pub(crate) fn packed_grouped_attention(
    qkv: &Tensor,
    mask: &Tensor,
    (batch, t): (usize, usize),
    (heads, kv_heads, d): (usize, usize, usize),
) -> Result<Tensor> {
    if kv_heads == 0 || heads % kv_heads != 0 {
        candle::bail!(
            "attention: {heads} query heads are not a multiple of {kv_heads} key-value heads"
        );
    }
    let core = AttentionCore::grouped(mask, (batch, t), heads, kv_heads)?;
    let g = Geometry {
        batch,
        t,
        heads,
        kv_heads,
        d,
    };
    qkv.contiguous()?.apply_op1(PackedAttention { core, g })
}

impl AttentionCore {
    /// The decoder's core: no dropout, and the additive `mask`
    /// (broadcastable to `(batch, 1, t, t)`) as one value per pair.
    fn grouped(
        mask: &Tensor,
        (b, t): (usize, usize),
        heads: usize,
        kv_heads: usize,
    ) -> Result<Self> {
        let values = mask
            .broadcast_as((b, 1, t, t))?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let blocks = (0..b)
            .map(|s| QueryBlock::cover(&values[s * t * t..(s + 1) * t * t], t))
            .collect();
        Ok(Self {
            heads,
            kv_heads,
            mask: AttentionMask::Pairs { values, blocks },
            dropout: None,
        })
    }
}

/// The op behind [`packed_grouped_attention`]: argument the planar
/// `[q | k | v]`, state the core and its geometry.
struct PackedAttention {
    core: AttentionCore,
    g: Geometry,
}

impl PackedAttention {
    /// The lengths of q and of each of k and v in the planar buffer.
    fn split(&self, len: usize) -> Result<(usize, usize)> {
        let g = self.g;
        let (nq, nkv) = (g.batch * g.t * g.hidden(), g.batch * g.t * g.kv_hidden());
        if len != nq + 2 * nkv {
            candle::bail!(
                "attention: {len} packed q, k, v values, not {}",
                nq + 2 * nkv
            );
        }
        Ok((nq, nkv))
    }
}

impl CustomOp1 for PackedAttention {
    fn name(&self) -> &'static str {
        "lora-mini-packed-attention"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (qkv, _) = f32_rows(storage, layout, self.name())?;
        let (nq, nkv) = self.split(qkv.len())?;
        let (q, kv) = qkv.split_at(nq);
        let (k, v) = kv.split_at(nkv);
        let g = self.g;
        let shape = Shape::from((g.batch, g.t, g.hidden()));
        Ok((CpuStorage::F32(self.core.context(g, q, k, v)), shape))
    }

    fn bwd(&self, qkv: &Tensor, _out: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        let (nq, nkv) = self.split(qkv.elem_count())?;
        // Not zeroed: write_grads writes every value of dq, dk and dv.
        let mut d = Vec::<f32>::with_capacity(nq + 2 * nkv);
        let base = d.as_mut_ptr();
        // SAFETY: the three offsets stay within the allocation.
        let out = unsafe {
            Grads {
                dq: SharedOut(base),
                dk: SharedOut(base.add(nq)),
                dv: SharedOut(base.add(nq + nkv)),
            }
        };
        with_cpu_f32(qkv, "packed q, k, v", |qkv| {
            with_cpu_f32(&grad, "gradient", |go| {
                let (q, kv) = qkv.split_at(nq);
                let (k, v) = kv.split_at(nkv);
                self.core.write_grads(self.g, (q, k, v, go), out);
                Ok(())
            })
        })?;
        // SAFETY: write_grads wrote all of dq, dk and dv (see above).
        unsafe { d.set_len(nq + 2 * nkv) };
        Ok(Some(Tensor::from_vec(d, qkv.shape(), qkv.device())?))
    }
}

/// [`attention`] from Candle ops (any device and dtype).
fn composed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    heads: usize,
    dropout: Option<&ProbsDropout>,
    (b, t, hidden): (usize, usize, usize),
) -> Result<Tensor> {
    let d = hidden / heads;
    let split = |x: &Tensor| -> Result<Tensor> {
        x.reshape((b, t, heads, d))?.transpose(1, 2)?.contiguous()
    };
    let (q, k, v) = (split(q)?, split(k)?, split(v)?);
    let scores = (q.matmul(&k.t()?)? / (d as f64).sqrt())?.broadcast_add(mask)?;
    let mut probs = crate::kernels::composed::composed_softmax_last_dim(&scores)?;
    if let Some(drop) = dropout {
        let factors: Vec<f32> = drop
            .keep
            .iter()
            .map(|&k| if k == 1 { drop.scale } else { 0.0 })
            .collect();
        let factors = Tensor::from_vec(factors, probs.shape(), probs.device())?;
        probs = probs.mul(&factors.to_dtype(probs.dtype())?)?;
    }
    probs.matmul(&v)?.transpose(1, 2)?.reshape((b, t, hidden))
}

/// The additive mask on the scores.
enum AttentionMask {
    /// `(batch, t)`: one value per key, the same for every query (BERT's
    /// padding).
    Keys(Vec<f32>),
    /// `(batch, t, t)`: one value per (query, key) (a decoder's causal and
    /// padding or document mask), and each sequence's query blocks, found
    /// once here rather than by every head.
    Pairs {
        values: Vec<f32>,
        blocks: Vec<Vec<QueryBlock>>,
    },
}

/// Query rows per block of [`QueryBlock::cover`]: under a causal
/// mask a block of `n` rows reads at most its own end's keys, so 32-row
/// blocks of 128 queries compute 5/8 of the scores; smaller blocks skip
/// more but make the gemms too small to run at speed.
const QUERY_BLOCK: usize = 32;

/// Consecutive query rows of one sequence, and the keys `0..keys` that any
/// of them sees.
#[derive(Clone)]
struct QueryBlock {
    rows: Range<usize>,
    keys: usize,
}

impl QueryBlock {
    /// The blocks of [`QUERY_BLOCK`] queries over one sequence's `t × t`
    /// additive mask, each reading up to the last key one of its rows sees:
    /// past a query's last key whose mask is not `-inf` its probabilities
    /// are exactly 0 (`e^-inf`), so no product needs those keys.
    fn cover(mask: &[f32], t: usize) -> Vec<Self> {
        let extent = |row: &[f32]| {
            row.iter()
                .rposition(|&m| m != f32::NEG_INFINITY)
                .map_or(1, |last| last + 1)
        };
        (0..t)
            .step_by(QUERY_BLOCK)
            .map(|start| {
                let rows = start..(start + QUERY_BLOCK).min(t);
                let keys = rows
                    .clone()
                    .map(|i| extent(&mask[i * t..(i + 1) * t]))
                    .max()
                    .unwrap_or(t);
                Self { rows, keys }
            })
            .collect()
    }
}

impl AttentionMask {
    /// The mask of query `i` of sequence `s`, over the `t` keys.
    fn row(&self, s: usize, i: usize, t: usize) -> &[f32] {
        match self {
            Self::Keys(m) => &m[s * t..(s + 1) * t],
            Self::Pairs { values, .. } => &values[(s * t + i) * t..(s * t + i + 1) * t],
        }
    }

    /// The query blocks of sequence `s`: one block of all keys for a
    /// per-key mask, else those [`QueryBlock::cover`] found.
    fn query_blocks(&self, s: usize, t: usize) -> Cow<'_, [QueryBlock]> {
        match self {
            Self::Keys(_) => Cow::Owned(vec![QueryBlock {
                rows: 0..t,
                keys: t,
            }]),
            Self::Pairs { blocks, .. } => Cow::Borrowed(&blocks[s]),
        }
    }
}

/// The op: arguments q, k, v; state the head counts, the additive mask and
/// the probabilities' dropout mask.
struct AttentionCore {
    heads: usize,
    kv_heads: usize,
    mask: AttentionMask,
    dropout: Option<ProbsDropout>,
}

/// A pointer the parallel (sequence, head) tasks write through: each task
/// writes only its own head's columns of its own sequence's rows.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
// SAFETY: tasks write disjoint elements (see above) and the buffer outlives
// the parallel loop.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

/// Operand geometry shared by the forward and the backward.
#[derive(Clone, Copy)]
struct Geometry {
    batch: usize,
    t: usize,
    heads: usize,
    kv_heads: usize,
    d: usize,
}

impl Geometry {
    /// The row width of q and the output.
    fn hidden(&self) -> usize {
        self.heads * self.d
    }
    /// The row width of k and v.
    fn kv_hidden(&self) -> usize {
        self.kv_heads * self.d
    }
    /// Offset of query head `h` of sequence `s` in a `(batch, t, hidden)`
    /// buffer (q, the output and their gradients).
    fn base(&self, s: usize, h: usize) -> usize {
        s * self.t * self.hidden() + h * self.d
    }
    /// Offset of the key-value head serving query head `h` of sequence `s`
    /// in a `(batch, t, kv_hidden)` buffer (k, v and their gradients).
    fn kv_base(&self, s: usize, h: usize) -> usize {
        s * self.t * self.kv_hidden() + (h / (self.heads / self.kv_heads)) * self.d
    }
    fn scale(&self) -> f32 {
        1.0 / (self.d as f32).sqrt()
    }
}

/// Each head's products are small and the heads themselves run in
/// parallel, so every [`gemm_strided`] here stays on the calling thread.
const ON_THIS_THREAD: gemm::Parallelism = gemm::Parallelism::None;

impl AttentionCore {
    fn geometry(&self, layout: &Layout) -> Result<Geometry> {
        let (batch, t, hidden) = layout.shape().dims3()?;
        if self.heads == 0 || hidden % self.heads != 0 {
            candle::bail!(
                "attention: hidden {hidden} is not a multiple of {} heads",
                self.heads
            );
        }
        Ok(Geometry {
            batch,
            t,
            heads: self.heads,
            kv_heads: self.kv_heads,
            d: hidden / self.heads,
        })
    }

    /// Writes the probabilities (before dropout) of `block`'s queries of
    /// head `h` of sequence `s` over its keys into their rows and leading
    /// columns of `probs` (`t × t`, row-major).
    #[inline(always)]
    fn probabilities(
        &self,
        g: Geometry,
        (s, h): (usize, usize),
        block: &QueryBlock,
        q: &[f32],
        k: &[f32],
        probs: &mut [f32],
    ) {
        let (t, start) = (g.t, block.rows.start);
        let (row, kv_row) = (g.hidden() as isize, g.kv_hidden() as isize);
        // SAFETY: q holds batch·t·hidden values and k batch·t·kv_hidden;
        // head h of sequence s spans t rows of stride `hidden` (q) or
        // `kv_hidden` (k) and d columns from its base; the block's rows
        // and keys lie within them. kᵀ's element (i, j) is k[j][i]: row
        // stride 1, column stride `kv_hidden`.
        unsafe {
            gemm_strided(
                (block.rows.len(), block.keys, g.d),
                (probs.as_mut_ptr().add(start * t), 1, t as isize),
                (q.as_ptr().add(g.base(s, h) + start * g.hidden()), 1, row),
                (k.as_ptr().add(g.kv_base(s, h)), kv_row, 1),
                0.0,
                g.scale(),
                ON_THIS_THREAD,
            );
        }
        for i in block.rows.clone() {
            let r = &mut probs[i * t..i * t + block.keys];
            for (x, &m) in r.iter_mut().zip(self.mask.row(s, i, t)) {
                *x += m;
            }
            softmax_in_place(r);
        }
    }

    /// Multiplies `block`'s part of `probs` of head `h` of sequence `s` by
    /// its dropout factors.
    fn apply_dropout(
        &self,
        g: Geometry,
        (s, h): (usize, usize),
        block: &QueryBlock,
        probs: &mut [f32],
    ) {
        if let Some(drop) = &self.dropout {
            let t = g.t;
            let start = (s * g.heads + h) * t * t;
            for i in block.rows.clone() {
                let keep = &drop.keep[start + i * t..start + i * t + block.keys];
                for (p, &k) in probs[i * t..].iter_mut().zip(keep) {
                    *p = if k == 1 { *p * drop.scale } else { 0.0 };
                }
            }
        }
    }
}

impl CustomOp3 for AttentionCore {
    fn name(&self) -> &'static str {
        "lora-mini-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = self.geometry(l1)?;
        let kv_shape = Shape::from((g.batch, g.t, g.kv_hidden()));
        if l2.shape() != &kv_shape || l3.shape() != &kv_shape {
            candle::bail!(
                "attention: k {:?} and v {:?} do not fit q {:?} with {} key-value heads",
                l2.dims(),
                l3.dims(),
                l1.dims(),
                g.kv_heads
            );
        }
        let (q, _) = f32_rows(s1, l1, self.name())?;
        let (k, _) = f32_rows(s2, l2, self.name())?;
        let (v, _) = f32_rows(s3, l3, self.name())?;
        Ok((
            CpuStorage::F32(self.context(g, q, k, v)),
            l1.shape().clone(),
        ))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = self.geometry(q.layout())?;
        let grad = grad.contiguous()?;
        let (n, n_kv) = (q.elem_count(), k.elem_count());
        // Not zeroed: each query head writes its columns of dq, and the
        // first query head of each group writes its key-value head's
        // columns of dk and dv, with gemms that do not accumulate; the
        // group's later heads add onto them.
        let (mut dq, mut dk, mut dv) = (
            Vec::<f32>::with_capacity(n),
            Vec::<f32>::with_capacity(n_kv),
            Vec::<f32>::with_capacity(n_kv),
        );
        let out = Grads {
            dq: SharedOut(dq.as_mut_ptr()),
            dk: SharedOut(dk.as_mut_ptr()),
            dv: SharedOut(dv.as_mut_ptr()),
        };
        with_cpu_f32(q, "q", |q| {
            with_cpu_f32(k, "k", |k| {
                with_cpu_f32(v, "v", |v| {
                    with_cpu_f32(&grad, "gradient", |go| {
                        self.write_grads(g, (q, k, v, go), out);
                        Ok(())
                    })
                })
            })
        })?;
        // SAFETY: the tasks wrote every value of the three (see above).
        unsafe {
            dq.set_len(n);
            dk.set_len(n_kv);
            dv.set_len(n_kv);
        }
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, q.shape(), dev)?),
            Some(Tensor::from_vec(dk, k.shape(), dev)?),
            Some(Tensor::from_vec(dv, v.shape(), dev)?),
        ))
    }
}

/// Where the backward writes q's, k's and v's gradients.
#[derive(Clone, Copy)]
struct Grads {
    dq: SharedOut,
    dk: SharedOut,
    dv: SharedOut,
}

impl AttentionCore {
    /// The context (`batch·t·hidden` values) from q, k and v of geometry
    /// `g`.
    fn context(&self, g: Geometry, q: &[f32], k: &[f32], v: &[f32]) -> Vec<f32> {
        // Not zeroed: every (sequence, head) task below writes its head's
        // columns of its sequence's rows with a gemm that does not
        // accumulate, and together they cover the output.
        let mut out = Vec::<f32>::with_capacity(q.len());
        let out_ptr = SharedOut(out.as_mut_ptr());
        let (row, kv_row) = (g.hidden() as isize, g.kv_hidden() as isize);
        (0..g.batch * g.heads).into_par_iter().for_each(|task| {
            vectorized!({
                let (s, h) = (task / g.heads, task % g.heads);
                let mut probs = vec![0f32; g.t * g.t];
                for block in self.mask.query_blocks(s, g.t).iter() {
                    self.probabilities(g, (s, h), block, q, k, &mut probs);
                    self.apply_dropout(g, (s, h), block, &mut probs);
                    let (out, start) = (out_ptr, block.rows.start);
                    // SAFETY: this task writes only head h's d columns of
                    // sequence s's rows, the block's rows here; probs is
                    // t × t, v's head spans t rows of stride `kv_hidden`.
                    unsafe {
                        gemm_strided(
                            (block.rows.len(), g.d, block.keys),
                            (out.0.add(g.base(s, h) + start * g.hidden()), 1, row),
                            (probs.as_ptr().add(start * g.t), 1, g.t as isize),
                            (v.as_ptr().add(g.kv_base(s, h)), 1, kv_row),
                            0.0,
                            1.0,
                            ON_THIS_THREAD,
                        );
                    }
                }
            })
        });
        // SAFETY: the tasks wrote all q.len() values (see above).
        unsafe { out.set_len(q.len()) };
        out
    }

    /// Writes all of dq, dk and dv through `out` from q, k, v and the
    /// output gradient.
    fn write_grads(&self, g: Geometry, inputs: (&[f32], &[f32], &[f32], &[f32]), out: Grads) {
        // One task per (sequence, key-value head): the query heads it
        // serves add into the same dk and dv, so they run in turn.
        (0..g.batch * g.kv_heads).into_par_iter().for_each(|task| {
            let (s, kv_head) = (task / g.kv_heads, task % g.kv_heads);
            let group = g.heads / g.kv_heads;
            for (j, h) in (kv_head * group..(kv_head + 1) * group).enumerate() {
                vectorized!(self.head_grads(g, s, h, j > 0, inputs, out));
            }
        });
    }

    /// The gradients from query head `h` of sequence `s`: its own dq, and
    /// its share of its key-value head's dk and dv, added to what the
    /// group's earlier heads wrote when `accumulate`.
    #[inline(always)]
    fn head_grads(
        &self,
        g: Geometry,
        s: usize,
        h: usize,
        accumulate: bool,
        inputs: (&[f32], &[f32], &[f32], &[f32]),
        out: Grads,
    ) {
        if !accumulate {
            // Every block adds into dk and dv, and keys that no query sees
            // get nothing from any block.
            for i in 0..g.t {
                let at = g.kv_base(s, h) + i * g.kv_hidden();
                // SAFETY: row i of this key-value head's d columns, which
                // only this task writes (see write_grads).
                unsafe {
                    out.dk.0.add(at).write_bytes(0, g.d);
                    out.dv.0.add(at).write_bytes(0, g.d);
                }
            }
        }
        let tt = g.t * g.t;
        let mut scratch = Scratch {
            probs: vec![0f32; tt],
            dprobs: vec![0f32; tt],
            dropped: self.dropout.as_ref().map(|_| vec![0f32; tt]),
        };
        for block in self.mask.query_blocks(s, g.t).iter() {
            self.block_grads(g, (s, h), block, inputs, out, &mut scratch);
        }
    }

    /// [`Self::head_grads`] for one block of queries: their rows of dq, and
    /// their additions to dk and dv over the keys they see.
    #[inline(always)]
    fn block_grads(
        &self,
        g: Geometry,
        (s, h): (usize, usize),
        block: &QueryBlock,
        (q, k, v, go): (&[f32], &[f32], &[f32], &[f32]),
        out: Grads,
        scratch: &mut Scratch,
    ) {
        let (t, rows, keys) = (g.t, block.rows.len(), block.keys);
        let (row, kv_row, tt) = (g.hidden() as isize, g.kv_hidden() as isize, t as isize);
        // The block's first query in q, dq and dout; its first row in the
        // t × t buffers; its key-value head's first key.
        let query = g.base(s, h) + block.rows.start * g.hidden();
        let first = block.rows.start * t;
        let kv_base = g.kv_base(s, h);
        let Scratch {
            probs,
            dprobs,
            dropped,
        } = scratch;
        self.probabilities(g, (s, h), block, q, k, probs);
        // The dropped probabilities need a copy only when dropout is on.
        let dropped: &[f32] = match dropped {
            Some(d) => {
                d[first..first + rows * t].copy_from_slice(&probs[first..first + rows * t]);
                self.apply_dropout(g, (s, h), block, d);
                d
            }
            None => probs,
        };
        // SAFETY (all four gemms): q, dq and dout heads span t rows of
        // stride `hidden`, k, v, dk and dv heads t rows of stride
        // `kv_hidden`, each d columns from their base; the block's rows and
        // keys lie within them, and t × t buffers are row-major. The caller
        // runs the heads sharing a key-value head in turn, and only this
        // head writes its dq columns.
        unsafe {
            // dv[..keys] += dropped_probsᵀ · dout
            gemm_strided(
                (keys, g.d, rows),
                (out.dv.0.add(kv_base), 1, kv_row),
                (dropped.as_ptr().add(first), tt, 1),
                (go.as_ptr().add(query), 1, row),
                1.0,
                1.0,
                ON_THIS_THREAD,
            );
            // d(dropped_probs) = dout · v[..keys]ᵀ
            gemm_strided(
                (rows, keys, g.d),
                (dprobs.as_mut_ptr().add(first), 1, tt),
                (go.as_ptr().add(query), 1, row),
                (v.as_ptr().add(kv_base), kv_row, 1),
                0.0,
                1.0,
                ON_THIS_THREAD,
            );
        }
        // Through dropout, then the softmax: dscores = p ∘ (dp − Σ dp ∘ p),
        // times the scale.
        self.apply_dropout(g, (s, h), block, dprobs);
        let scale = g.scale();
        for i in block.rows.clone() {
            let (dp, p) = (
                &mut dprobs[i * t..i * t + keys],
                &probs[i * t..i * t + keys],
            );
            let dot: f32 = dp.iter().zip(p).map(|(a, b)| a * b).sum();
            for (x, &p) in dp.iter_mut().zip(p) {
                *x = p * (*x - dot) * scale;
            }
        }
        unsafe {
            // dq = dscores · k[..keys]
            gemm_strided(
                (rows, g.d, keys),
                (out.dq.0.add(query), 1, row),
                (dprobs.as_ptr().add(first), 1, tt),
                (k.as_ptr().add(kv_base), 1, kv_row),
                0.0,
                1.0,
                ON_THIS_THREAD,
            );
            // dk[..keys] += dscoresᵀ · q
            gemm_strided(
                (keys, g.d, rows),
                (out.dk.0.add(kv_base), 1, kv_row),
                (dprobs.as_ptr().add(first), tt, 1),
                (q.as_ptr().add(query), 1, row),
                1.0,
                1.0,
                ON_THIS_THREAD,
            );
        }
    }
}

/// One backward task's `t × t` buffers, reused across its query blocks.
struct Scratch {
    probs: Vec<f32>,
    dprobs: Vec<f32>,
    /// The probabilities after dropout, when dropout is on.
    dropped: Option<Vec<f32>>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle::{Device, Var};

    /// BERT's `(B, T)` 0/1 mask in additive `(B, 1, 1, T)` form.
    fn additive_mask(keep: &Tensor) -> Result<Tensor> {
        let (b, t) = keep.dims2()?;
        ((keep - 1.0)? * -(f32::MIN as f64))?.reshape((b, 1, 1, t))
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
    }

    /// The fused op against the composed ops, with padding in the mask and
    /// dropout on, in values and in the gradients of q, k and v.
    #[test]
    fn fused_matches_composed_in_values_and_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let (b, t, heads, d) = (3, 7, 4, 5);
        let var = |seed: f32| -> Result<Var> {
            let n = b * t * heads * d;
            let values: Vec<f32> = (0..n)
                .map(|i| (i as f32 * 0.37 + seed).sin() * 1.3)
                .collect();
            Var::from_tensor(&Tensor::from_vec(values, (b, t, heads * d), &dev)?)
        };
        let (q, k, v) = (var(0.1)?, var(1.7)?, var(2.9)?);
        // Sequence 1 has two padded keys, sequence 2 one.
        let keep = Tensor::new(
            &[
                [1f32, 1., 1., 1., 1., 1., 1.],
                [1., 1., 1., 1., 1., 0., 0.],
                [1., 1., 1., 1., 1., 1., 0.],
            ],
            &dev,
        )?;
        let mask = additive_mask(&keep)?;
        let probe = var(4.2)?.as_tensor().clone();
        for p in [0.0, 0.3] {
            let drop = |dropout: &SeededDropout| ProbsDropout::draw(dropout, true, b, heads, t);
            let fused = attention(
                &q,
                &k,
                &v,
                &mask,
                heads,
                drop(&SeededDropout::new(p, 5, "a")),
            )?;
            let reference = composed(
                &q,
                &k,
                &v,
                &mask,
                heads,
                drop(&SeededDropout::new(p, 5, "a")).as_ref(),
                (b, t, heads * d),
            )?;
            assert!(max_diff(&fused, &reference)? < 1e-5, "p = {p}");
            let gf = (fused * &probe)?.sum_all()?.backward()?;
            let gr = (reference * &probe)?.sum_all()?.backward()?;
            for x in [&q, &k, &v] {
                let (a, b) = (gf.get(x).unwrap(), gr.get(x).unwrap());
                assert!(max_diff(a, b)? < 1e-5, "p = {p}: {}", max_diff(a, b)?);
                assert!(a.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0);
            }
        }
        Ok(())
    }

    /// The decoder's grouped-query core against `nn::ops::sdpa` on the
    /// heads-first layout: 6 query heads over 2 key-value heads, a causal
    /// mask plus padding on the last keys of one sequence (as `-1e9` or as
    /// `-inf`, which the core skips); values and the gradients of q, k and
    /// v. At 70 queries the core works in blocks of 32, 32 and 6 rows, each
    /// reading only the keys its rows see.
    #[test]
    fn grouped_core_matches_sdpa_with_a_causal_padded_mask() -> Result<()> {
        for (t, padded) in [(6, 2), (70, 27)] {
            for padding in [-1e9, f32::NEG_INFINITY] {
                grouped_core_matches_sdpa(t, padded, padding)?;
            }
        }
        Ok(())
    }

    /// Two sequences of `t` tokens, the second one's last `padded` keys
    /// masked with `padding`.
    fn grouped_core_matches_sdpa(t: usize, padded: usize, padding: f32) -> Result<()> {
        let dev = Device::Cpu;
        let (b, heads, kv_heads, d) = (2, 6, 2, 4);
        let var = |width: usize| Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, t, width), &dev)?);
        let (q, k, v) = (var(heads * d)?, var(kv_heads * d)?, var(kv_heads * d)?);
        let mask: Vec<f32> = (0..b)
            .flat_map(|s| {
                (0..t).flat_map(move |i| {
                    (0..t).map(move |j| match (j <= i, s == 1 && j >= t - padded) {
                        (false, _) => f32::NEG_INFINITY,
                        (true, true) => padding,
                        (true, false) => 0.0,
                    })
                })
            })
            .collect();
        let mask = Tensor::from_vec(mask, (b, 1, t, t), &dev)?;
        let fused = grouped_attention(&q, &k, &v, &mask, heads, kv_heads)?.expect("CPU f32");
        let split = |x: &Tensor, h: usize| -> Result<Tensor> {
            x.reshape((b, t, h, d))?.transpose(1, 2)?.contiguous()
        };
        let scale = 1.0 / (d as f32).sqrt();
        let reference = crate::nn::ops::sdpa(
            &split(&q, heads)?,
            &split(&k, kv_heads)?,
            &split(&v, kv_heads)?,
            Some(&mask),
            false,
            scale,
            1.0,
        )?
        .transpose(1, 2)?
        .reshape((b, t, heads * d))?;
        let rel_diff = crate::kernels::rel_diff;
        assert!(
            rel_diff(&fused, &reference)? < 1e-5,
            "t = {t}, padding {padding}"
        );
        let probe = Tensor::randn(0f32, 1.0, (b, t, heads * d), &dev)?;
        let gf = (fused * &probe)?.sum_all()?.backward()?;
        let gr = (reference * &probe)?.sum_all()?.backward()?;
        for x in [&q, &k, &v] {
            let (a, r) = (gf.get(x).unwrap(), gr.get(x).unwrap());
            let diff = rel_diff(a, r)?;
            assert!(
                diff < 1e-5,
                "t = {t}, padding {padding}, {:?}: {diff}",
                x.dims()
            );
            assert!(r.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0);
        }
        // A head count the key-value heads do not divide is refused.
        assert!(grouped_attention(&q, &k, &v, &mask, 5, kv_heads).is_err());
        Ok(())
    }

    #[test]
    fn padded_keys_get_no_attention() -> Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::ones((1, 3, 4), DType::F32, &dev)?;
        let k = q.clone();
        // Value rows 0..2 are 1, row 2 (padding) is 100.
        let v = Tensor::new(&[[[1f32; 4], [1.; 4], [100.; 4]]], &dev)?;
        let mask = additive_mask(&Tensor::new(&[[1f32, 1., 0.]], &dev)?)?;
        let out = attention(&q, &k, &v, &mask, 2, None)?;
        assert!(max_diff(&out, &Tensor::ones((1, 3, 4), DType::F32, &dev)?)? < 1e-6);
        Ok(())
    }
}
