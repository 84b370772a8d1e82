//! Products with one thin side, as a low-rank update's factors make them:
//! `h = x·Aᵀ` and `dh = g·B` (`rows × r`), `dA = dhᵀ·x` (`r × d_in`) and
//! `dB = gᵀ·h` (`d_out × r`), with `r` the rank.
//!
//! The `gemm` crate packs both operands into panels sized for square
//! products. With 8 columns it ran these at 40–47 GFLOP/s in the decoder
//! step (against 255–280 GFLOP/s for the layers' own products): 7% of the
//! step for 2% of its FLOPs. The kernels here keep the thin operand's few
//! rows in cache, stream the wide one once, and hold their sums in vector
//! registers: [`GROUP`] thin rows at a time, over two rows (or two
//! vectors) of the wide operand.
//!
//! They are written with AVX-512 intrinsics: written as plain loops for
//! the compiler to vectorise, the transposed product came out as gathers
//! and scatters of its sums on the stack (8 GFLOP/s). On a CPU without
//! AVX-512, and for a thin side wider than [`MAX_THIN`], each function
//! returns `false` and the caller multiplies with the gemm.

use rayon::prelude::*;

/// The widest thin side these kernels take.
pub(crate) const MAX_THIN: usize = 16;

/// Thin rows per pass: two wide rows (or vectors) times 8 sums are 16
/// vector registers, half of AVX-512's file.
const GROUP: usize = 8;

/// Lanes of one AVX-512 vector.
const LANES: usize = 16;

/// Columns per parallel task in [`st_y`]: two vectors.
const WIDTH: usize = 2 * LANES;

/// Wide rows per parallel task in [`x_wt`].
const ROWS_PER_TASK: usize = 64;

/// Whether the kernels run: on x86-64 with AVX-512, and not in a build with
/// MKL, whose own products were the ones measured there. Callers that must
/// prepare an operand for a kernel ask first.
pub(crate) fn available() -> bool {
    if cfg!(feature = "mkl") {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `y (m × n) (+)= x · Wᵀ` for `x` holding `m` rows of stride `x_stride`
/// (the first `k` values of each are read) and row-major `W (n × k)`, when
/// `n ≤ MAX_THIN`; `accumulate` adds onto `y`. Returns `false`, having done
/// nothing, where it does not apply.
///
/// # Panics
/// If the slices do not hold the values the shapes say.
pub(crate) fn x_wt(
    y: &mut [f32],
    x: &[f32],
    x_stride: usize,
    w: &[f32],
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
) -> bool {
    if n == 0 || n > MAX_THIN || k == 0 || !available() {
        return false;
    }
    let x_needed = if m == 0 { 0 } else { (m - 1) * x_stride + k };
    assert!(y.len() == m * n && x.len() >= x_needed && k <= x_stride && w.len() >= n * k);
    y.par_chunks_mut(ROWS_PER_TASK * n)
        .enumerate()
        .for_each(|(task, y)| {
            let x = &x[task * ROWS_PER_TASK * x_stride..];
            let rows = y.len() / n;
            for j in (0..n).step_by(GROUP) {
                let cols = (n - j).min(GROUP);
                // SAFETY: the CPU has AVX-512 (checked above); x holds
                // `rows` rows of stride x_stride from here, each with k
                // values (asserted above), W's rows j..j + cols hold k
                // values each, and y `rows` rows of n from column j.
                unsafe {
                    avx512::dots(
                        cols,
                        (x.as_ptr(), x_stride, rows),
                        (w.as_ptr().add(j * k), k),
                        (y.as_mut_ptr().add(j), n),
                        accumulate,
                    )
                }
            }
        });
    true
}

/// How [`st_y`] lays out its `p × q` result.
#[derive(Clone, Copy, PartialEq)]
pub(crate) enum Out {
    /// Row-major `p × q`.
    AsIs,
    /// Row-major `q × p`, the transpose: `yᵀ·s` for a thin `y`.
    Transposed,
}

/// `out = sᵀ · y` (`p × q`, laid out as `layout` says) over `m` rows, for
/// row-major `s (m × p)` and `y (m × q)`, when `p ≤ MAX_THIN`. Returns
/// `false`, having done nothing, where it does not apply.
///
/// # Panics
/// If the slices do not hold the values the shapes say.
pub(crate) fn st_y(
    out: &mut [f32],
    s: &[f32],
    y: &[f32],
    (p, q, m): (usize, usize, usize),
    layout: Out,
) -> bool {
    if p == 0 || p > MAX_THIN || q == 0 || !available() {
        return false;
    }
    assert!(out.len() == p * q && s.len() == m * p && y.len() == m * q);
    // Each task sums one block of WIDTH columns for all p rows; the blocks
    // are copied into the output afterwards.
    let blocks: Vec<Vec<f32>> = (0..q.div_ceil(WIDTH))
        .into_par_iter()
        .map(|b| {
            let cols = (q - b * WIDTH).min(WIDTH);
            let mut block = vec![0f32; p * WIDTH];
            for j in (0..p).step_by(GROUP) {
                let rows = (p - j).min(GROUP);
                // SAFETY: the CPU has AVX-512 (checked above); s holds m
                // rows of p with columns j..j + rows among them, y m rows of
                // q with columns b·WIDTH..+cols among them (asserted
                // above), and the block `rows` rows of WIDTH from row j.
                unsafe {
                    avx512::sums(
                        rows,
                        (s.as_ptr().add(j), p, m),
                        (y.as_ptr().add(b * WIDTH), q, cols),
                        block.as_mut_ptr().add(j * WIDTH),
                    )
                }
            }
            block
        })
        .collect();
    for (b, block) in blocks.iter().enumerate() {
        let cols = (q - b * WIDTH).min(WIDTH);
        for (j, sums) in block.chunks_exact(WIDTH).enumerate() {
            let sums = &sums[..cols];
            match layout {
                Out::AsIs => out[j * q + b * WIDTH..][..cols].copy_from_slice(sums),
                Out::Transposed => {
                    for (l, &v) in sums.iter().enumerate() {
                        out[(b * WIDTH + l) * p + j] = v;
                    }
                }
            }
        }
    }
    true
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{GROUP, LANES, WIDTH};

    /// The lanes below `n` (at most 16).
    fn first(n: usize) -> __mmask16 {
        ((1u32 << n.min(LANES)) - 1) as __mmask16
    }

    /// [`dots_of`] for `cols ≤ GROUP` thin rows, as a constant.
    ///
    /// # Safety
    /// As [`dots_of`].
    pub(super) unsafe fn dots(
        cols: usize,
        x: (*const f32, usize, usize),
        w: (*const f32, usize),
        y: (*mut f32, usize),
        acc: bool,
    ) {
        debug_assert!(cols <= GROUP);
        // SAFETY: the caller's guarantees are dots_of's.
        unsafe {
            match cols {
                1 => dots_of::<1>(x, w, y, acc),
                2 => dots_of::<2>(x, w, y, acc),
                3 => dots_of::<3>(x, w, y, acc),
                4 => dots_of::<4>(x, w, y, acc),
                5 => dots_of::<5>(x, w, y, acc),
                6 => dots_of::<6>(x, w, y, acc),
                7 => dots_of::<7>(x, w, y, acc),
                _ => dots_of::<8>(x, w, y, acc),
            }
        }
    }

    /// `y[i][j] (+)= x[i] · w[j]` over `k` values for the `rows` rows of
    /// `x` (stride `xs`) and the `N` rows of `w` (stride `k`), into rows of
    /// `y` (stride `ys`); two rows of `x` at a time.
    ///
    /// # Safety
    /// The CPU has AVX-512F; the pointers cover those elements.
    #[target_feature(enable = "avx512f")]
    unsafe fn dots_of<const N: usize>(
        (x, xs, rows): (*const f32, usize, usize),
        (w, k): (*const f32, usize),
        (y, ys): (*mut f32, usize),
        acc: bool,
    ) {
        let (full, tail) = (k / LANES, first(k % LANES));
        // SAFETY: every load reads within the rows the caller covers (the
        // tail's masked-off lanes are not read) and every store writes y's
        // `rows × N` elements.
        unsafe {
            for i in (0..rows).step_by(2) {
                let x0 = x.add(i * xs);
                // An odd last row is summed twice and written once.
                let x1 = if i + 1 < rows {
                    x.add((i + 1) * xs)
                } else {
                    x0
                };
                let mut s0 = [_mm512_setzero_ps(); N];
                let mut s1 = [_mm512_setzero_ps(); N];
                for c in 0..=full {
                    let mask = if c < full { first(LANES) } else { tail };
                    if mask == 0 {
                        break;
                    }
                    let v0 = _mm512_maskz_loadu_ps(mask, x0.add(c * LANES));
                    let v1 = _mm512_maskz_loadu_ps(mask, x1.add(c * LANES));
                    for j in 0..N {
                        let wv = _mm512_maskz_loadu_ps(mask, w.add(j * k + c * LANES));
                        s0[j] = _mm512_fmadd_ps(v0, wv, s0[j]);
                        s1[j] = _mm512_fmadd_ps(v1, wv, s1[j]);
                    }
                }
                for (r, sums) in [s0, s1].iter().enumerate().take(rows - i) {
                    let out = y.add((i + r) * ys);
                    for (j, sum) in sums.iter().enumerate() {
                        let v = _mm512_reduce_add_ps(*sum);
                        *out.add(j) = if acc { *out.add(j) + v } else { v };
                    }
                }
            }
        }
    }

    /// [`sums_of`] for `rows ≤ GROUP` thin columns, as a constant.
    ///
    /// # Safety
    /// As [`sums_of`].
    pub(super) unsafe fn sums(
        rows: usize,
        s: (*const f32, usize, usize),
        y: (*const f32, usize, usize),
        out: *mut f32,
    ) {
        debug_assert!(rows <= GROUP);
        // SAFETY: the caller's guarantees are sums_of's.
        unsafe {
            match rows {
                1 => sums_of::<1>(s, y, out),
                2 => sums_of::<2>(s, y, out),
                3 => sums_of::<3>(s, y, out),
                4 => sums_of::<4>(s, y, out),
                5 => sums_of::<5>(s, y, out),
                6 => sums_of::<6>(s, y, out),
                7 => sums_of::<7>(s, y, out),
                _ => sums_of::<8>(s, y, out),
            }
        }
    }

    /// `out[j][l] = Σ_i s[i][j] · y[i][l]` for `j < N`, `l < cols ≤ WIDTH`
    /// and the `m` rows of `s` (stride `ss`) and `y` (stride `ys`); `out`
    /// holds `N` rows of `WIDTH`, and gets zeros from lane `cols` on.
    ///
    /// # Safety
    /// The CPU has AVX-512F; the pointers cover those elements.
    #[target_feature(enable = "avx512f")]
    unsafe fn sums_of<const N: usize>(
        (s, ss, m): (*const f32, usize, usize),
        (y, ys, cols): (*const f32, usize, usize),
        out: *mut f32,
    ) {
        let (lo_mask, hi_mask) = (first(cols), first(cols.saturating_sub(LANES)));
        let mut lo = [_mm512_setzero_ps(); N];
        let mut hi = [_mm512_setzero_ps(); N];
        // SAFETY: the loads read y's `cols` columns of each row (masked-off
        // lanes are not read; wrapping_add because the high half may start
        // past the row's end) and s's N columns; the stores write out's
        // N rows.
        unsafe {
            for i in 0..m {
                let row = y.add(i * ys);
                let v0 = _mm512_maskz_loadu_ps(lo_mask, row);
                let v1 = _mm512_maskz_loadu_ps(hi_mask, row.wrapping_add(LANES));
                let thin = s.add(i * ss);
                for j in 0..N {
                    let t = _mm512_set1_ps(*thin.add(j));
                    lo[j] = _mm512_fmadd_ps(t, v0, lo[j]);
                    hi[j] = _mm512_fmadd_ps(t, v1, hi[j]);
                }
            }
            for j in 0..N {
                _mm512_storeu_ps(out.add(j * WIDTH), lo[j]);
                _mm512_storeu_ps(out.add(j * WIDTH + LANES), hi[j]);
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod avx512 {
    pub(super) unsafe fn dots(
        _: usize,
        _: (*const f32, usize, usize),
        _: (*const f32, usize),
        _: (*mut f32, usize),
        _: bool,
    ) {
        unreachable!("available() is false off x86-64")
    }
    pub(super) unsafe fn sums(
        _: usize,
        _: (*const f32, usize, usize),
        _: (*const f32, usize, usize),
        _: *mut f32,
    ) {
        unreachable!("available() is false off x86-64")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plain triple loop.
    fn reference_x_wt(
        x: &[f32],
        xs: usize,
        w: &[f32],
        (m, n, k): (usize, usize, usize),
    ) -> Vec<f32> {
        let mut y = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                y[i * n + j] = (0..k)
                    .map(|l| x[i * xs + l] as f64 * w[j * k + l] as f64)
                    .sum::<f64>() as f32;
            }
        }
        y
    }

    fn values(n: usize, seed: f32) -> Vec<f32> {
        (0..n).map(|i| (i as f32 * 0.731 + seed).sin()).collect()
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max)
    }

    /// Every width from 1 to 16 (one and two groups), odd row counts and
    /// more than one task of rows, `k` with and without a tail, a strided
    /// `x`, writing and accumulating.
    #[test]
    fn x_wt_matches_the_triple_loop() {
        if !available() {
            return;
        }
        for (m, k, pad) in [(1, 5, 0), (7, 16, 3), (131, 83, 0), (64, 576, 8)] {
            for n in 1..=MAX_THIN {
                let xs = k + pad;
                let (x, w) = (values(m * xs, 0.3), values(n * k, 1.9));
                let want = reference_x_wt(&x, xs, &w, (m, n, k));
                let mut y = vec![f32::NAN; m * n];
                assert!(x_wt(&mut y, &x, xs, &w, (m, n, k), false));
                assert!(
                    max_diff(&y, &want) < 1e-4,
                    "m {m} n {n} k {k}: {}",
                    max_diff(&y, &want)
                );
                let mut acc = vec![1f32; m * n];
                assert!(x_wt(&mut acc, &x, xs, &w, (m, n, k), true));
                let shifted: Vec<f32> = want.iter().map(|v| v + 1.0).collect();
                assert!(
                    max_diff(&acc, &shifted) < 1e-4,
                    "accumulating, m {m} n {n} k {k}"
                );
            }
        }
        let mut y = vec![0f32; 4 * 17];
        assert!(!x_wt(
            &mut y,
            &values(4 * 3, 0.0),
            3,
            &values(17 * 3, 0.0),
            (4, 17, 3),
            false
        ));
    }

    /// Every height from 1 to 16, widths with and without a partial block,
    /// against the triple loop on the transposed operands.
    #[test]
    fn st_y_matches_the_triple_loop() {
        if !available() {
            return;
        }
        for (m, q) in [(1, 3), (9, 32), (130, 77), (1024, 192)] {
            for p in 1..=MAX_THIN {
                let (s, y) = (values(m * p, 0.7), values(m * q, 2.3));
                let transpose = |v: &[f32], cols: usize| -> Vec<f32> {
                    (0..cols)
                        .flat_map(|c| (0..m).map(move |r| v[r * cols + c]))
                        .collect()
                };
                // sᵀ·y is x·Wᵀ with x = sᵀ (p × m) and W = yᵀ (q × m).
                let want = reference_x_wt(&transpose(&s, p), m, &transpose(&y, q), (p, q, m));
                let mut out = vec![f32::NAN; p * q];
                assert!(st_y(&mut out, &s, &y, (p, q, m), Out::AsIs));
                assert!(
                    max_diff(&out, &want) < 1e-3,
                    "m {m} p {p} q {q}: {}",
                    max_diff(&out, &want)
                );
            }
        }
    }

    /// `rows × cols` row-major `v`, transposed.
    fn transpose(v: &[f32], rows: usize, cols: usize) -> Vec<f32> {
        (0..cols)
            .flat_map(|c| (0..rows).map(move |r| v[r * cols + c]))
            .collect()
    }

    /// The kernels' helpers route a rank-8 factor's four products here,
    /// the transposed ones included (`g·B` through `Bᵀ`, `gᵀ·h` through
    /// `(hᵀ·g)ᵀ`), and give what the triple loop gives.
    #[test]
    fn factor_products_through_the_helpers() -> candle::Result<()> {
        if !available() {
            return Ok(());
        }
        let (m, r, d) = (70, 8, 40);
        let (x, g) = (values(m * d, 0.1), values(m * d, 1.3));
        let (a, b) = (values(r * d, 0.5), values(d * r, 0.9));
        let mut h = vec![f32::NAN; m * r];
        crate::kernels::add_x_wt(&mut h, &x, &a, (m, r, d), false)?;
        assert!(max_diff(&h, &reference_x_wt(&x, d, &a, (m, r, d))) < 1e-4);
        let mut dh = vec![f32::NAN; m * r];
        crate::kernels::add_g_w(&mut dh, &g, d, &b, (m, r, d), false)?;
        let want = reference_x_wt(&g, d, &transpose(&b, d, r), (m, r, d));
        assert!(max_diff(&dh, &want) < 1e-4);
        let mut da = vec![f32::NAN; r * d];
        crate::kernels::gt_x(&mut da, &dh, &x, (r, d, m))?;
        let want = reference_x_wt(&transpose(&dh, m, r), m, &transpose(&x, m, d), (r, d, m));
        assert!(max_diff(&da, &want) < 1e-3);
        let mut db = vec![f32::NAN; d * r];
        crate::kernels::gt_x(&mut db, &g, &h, (d, r, m))?;
        let want = reference_x_wt(&transpose(&g, m, d), m, &transpose(&h, m, r), (d, r, m));
        assert!(max_diff(&db, &want) < 1e-3);
        Ok(())
    }
}
