//! The kernels' f32 gemm through MKL's `sgemm`, in a build with the `mkl`
//! feature: Candle's own `mkl` feature links the MKL found at `$MKLROOT`
//! (static, with Intel's OpenMP runtime), and this calls it where the
//! `gemm` crate would be called. On the layer shapes of a SmolLM2
//! training step MKL's sgemm ran 1.04-1.42x as fast as the `gemm` crate's
//! (2 cores, AVX-512, measured 2026-12-05).

use std::os::raw::{c_char, c_int};

extern "C" {
    /// Fortran BLAS (column-major), provided by the linked MKL.
    fn sgemm_(
        transa: *const c_char,
        transb: *const c_char,
        m: *const c_int,
        n: *const c_int,
        k: *const c_int,
        alpha: *const f32,
        a: *const f32,
        lda: *const c_int,
        b: *const f32,
        ldb: *const c_int,
        beta: *const f32,
        c: *mut f32,
        ldc: *const c_int,
    );
    /// MKL's thread count for the calling thread (0: the process's);
    /// returns the previous one.
    fn MKL_Set_Num_Threads_Local(threads: c_int) -> c_int;
}

/// Runs `f` with MKL on the calling thread alone: our products are split
/// over rayon's threads instead (see [`sgemm_on_rayon`]). Other threads,
/// and Candle's own MKL matmuls, keep MKL's setting.
fn on_one_mkl_thread<R>(f: impl FnOnce() -> R) -> R {
    // SAFETY: a thread-local MKL setting, restored below.
    let previous = unsafe { MKL_Set_Num_Threads_Local(1) };
    let result = f();
    // SAFETY: as above.
    unsafe { MKL_Set_Num_Threads_Local(previous) };
    result
}

/// A row-major view `(rows x cols)` with strides `(col, row)` as a
/// column-major BLAS operand of its transpose: `'N'` with the row stride
/// as leading dimension when columns are contiguous, `'T'` with the
/// column stride when rows are; `None` when neither is, or when the
/// leading dimension is shorter than BLAS requires.
fn blas_operand((cs, rs): (isize, isize), rows: usize, cols: usize) -> Option<(u8, c_int)> {
    let (trans, ld, min_ld) = if cs == 1 {
        (b'N', rs, cols)
    } else if rs == 1 {
        (b'T', cs, rows)
    } else {
        return None;
    };
    let ld = usize::try_from(ld).ok().filter(|&ld| ld >= min_ld.max(1))?;
    Some((trans, c_int::try_from(ld).ok()?))
}

/// How a product's operands go to `sgemm_`: transpose flags and leading
/// dimensions, found once per product. A block of its rows or columns has
/// the same strides and needs no longer leading dimensions, so the
/// blocks of a split product share it.
#[derive(Clone, Copy)]
struct BlasLayout {
    trans_a: c_char,
    lda: c_int,
    trans_b: c_char,
    ldb: c_int,
    ldc: c_int,
}

impl BlasLayout {
    /// `None` for strides or sizes BLAS cannot express. Row-major
    /// `C = lhs·rhs` is column-major `Cᵀ = rhsᵀ·lhsᵀ`, and each row-major
    /// operand is the column-major storage of its transpose.
    fn of(
        (m, n, k): (usize, usize, usize),
        dst: (isize, isize),
        lhs: (isize, isize),
        rhs: (isize, isize),
    ) -> Option<Self> {
        let (trans_a, lda) = blas_operand(rhs, k, n)?;
        let (trans_b, ldb) = blas_operand(lhs, m, k)?;
        let (b'N', ldc) = blas_operand(dst, m, n)? else {
            return None;
        };
        let fits = |v: usize| c_int::try_from(v).is_ok();
        (fits(m) && fits(n) && fits(k)).then_some(Self {
            trans_a: trans_a as c_char,
            lda,
            trans_b: trans_b as c_char,
            ldb,
            ldc,
        })
    }

    /// `dst (m × n) = alpha·dst + beta·lhs·rhs` through `sgemm_`, on the
    /// calling thread alone.
    ///
    /// SAFETY: as for [`super::gemm_strided`], with `(m, n, k)` no larger
    /// than the product this layout was found for. BLAS does not read
    /// `dst` when `alpha` (its `beta`) is 0.
    unsafe fn multiply(
        self,
        (m, n, k): (usize, usize, usize),
        dst: *mut f32,
        lhs: *const f32,
        rhs: *const f32,
        alpha: f32,
        beta: f32,
    ) {
        if m == 0 || n == 0 {
            return;
        }
        // The sizes fit (checked in `of`, and these are no larger).
        let (bm, bn, bk) = (n as c_int, m as c_int, k as c_int);
        on_one_mkl_thread(|| {
            // SAFETY: the caller guarantees the pointers cover what the
            // strides reach; the leading dimensions were checked in `of`.
            unsafe {
                sgemm_(
                    &self.trans_a,
                    &self.trans_b,
                    &bm,
                    &bn,
                    &bk,
                    &beta,
                    rhs,
                    &self.lda,
                    lhs,
                    &self.ldb,
                    &alpha,
                    dst,
                    &self.ldc,
                )
            }
        })
    }
}

/// `dst (m × n) = alpha·dst + beta·lhs·rhs` as [`super::gemm_strided`]
/// defines it, through MKL; `false` (nothing done) for strides or sizes
/// BLAS cannot express, which the caller hands to the `gemm` crate.
/// Products of at least 2^21 multiply-adds are split over the rayon
/// threads, each piece a block of `dst`'s rows or columns (whichever
/// dimension is longer) on one MKL thread: MKL's own OpenMP threads would
/// be a third pool, beside rayon's and Candle's, spinning on the same
/// cores between calls. In a SmolLM2 training step (2 cores, 2026-12-05,
/// steps alternating in one process, 12 each way) MKL's OpenMP threads
/// made the step 7% slower than the `gemm` crate with their default
/// 200 ms spin, and 7% faster with `KMP_BLOCKTIME=0`; this split made it
/// 8% faster.
///
/// SAFETY: as for [`super::gemm_strided`].
pub(super) unsafe fn sgemm_on_rayon(
    (m, n, k): (usize, usize, usize),
    dst: (*mut f32, isize, isize),
    lhs: (*const f32, isize, isize),
    rhs: (*const f32, isize, isize),
    alpha: f32,
    beta: f32,
) -> bool {
    let strides = ((dst.1, dst.2), (lhs.1, lhs.2), (rhs.1, rhs.2));
    let Some(layout) = BlasLayout::of((m, n, k), strides.0, strides.1, strides.2) else {
        return false;
    };
    let threads = rayon::current_num_threads();
    if threads < 2 || m * n * k < 1 << 21 {
        // SAFETY: the caller's guarantees, for the product itself.
        unsafe { layout.multiply((m, n, k), dst.0, lhs.0, rhs.0, alpha, beta) };
        return true;
    }
    #[derive(Clone, Copy)]
    struct Ptrs(*mut f32, *const f32, *const f32);
    // SAFETY: the pieces write disjoint blocks of dst and only read the
    // operands, for the duration of the scope below.
    unsafe impl Send for Ptrs {}
    unsafe impl Sync for Ptrs {}
    impl Ptrs {
        // Called on the whole struct, so that a closure captures it (and
        // its Send) rather than its raw-pointer fields one by one.
        fn get(self) -> Self {
            self
        }
    }
    let ptrs = Ptrs(dst.0, lhs.0, rhs.0);
    let along_rows = m >= n;
    let total = if along_rows { m } else { n };
    let piece = total.div_ceil(threads).next_multiple_of(16);
    rayon::scope(|s| {
        for start in (0..total).step_by(piece) {
            let len = piece.min(total - start);
            s.spawn(move |_| {
                let Ptrs(mut d, mut l, mut r) = ptrs.get();
                let shape = if along_rows {
                    d = d.wrapping_offset(start as isize * dst.2);
                    l = l.wrapping_offset(start as isize * lhs.2);
                    (len, n, k)
                } else {
                    d = d.wrapping_offset(start as isize * dst.1);
                    r = r.wrapping_offset(start as isize * rhs.1);
                    (m, len, k)
                };
                // SAFETY: a block of the caller's operands, inside them.
                unsafe { layout.multiply(shape, d, l, r, alpha, beta) };
            });
        }
    });
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Products large enough to be split, along rows and along columns,
    /// against a direct loop; the transposed right operand is how a
    /// linear layer's weight is read.
    #[test]
    fn split_products_match_the_definition() {
        for (m, n, k) in [(300, 40, 200), (40, 300, 200)] {
            assert!(m * n * k >= 1 << 21, "large enough to split");
            let lhs: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
            let w: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.53).cos()).collect();
            let mut dst = vec![f32::NAN; m * n];
            let done = unsafe {
                sgemm_on_rayon(
                    (m, n, k),
                    (dst.as_mut_ptr(), 1, n as isize),
                    (lhs.as_ptr(), 1, k as isize),
                    (w.as_ptr(), k as isize, 1),
                    0.0,
                    1.0,
                )
            };
            assert!(done);
            for i in 0..m {
                for j in 0..n {
                    let dot: f32 = (0..k).map(|l| lhs[i * k + l] * w[j * k + l]).sum();
                    assert!((dst[i * n + j] - dot).abs() < 1e-3, "({i}, {j}) of {m}x{n}");
                }
            }
        }
    }

    /// All four operand layouts against a direct triple loop, with and
    /// without accumulation.
    #[test]
    fn sgemm_matches_the_definition_for_every_layout() {
        let (m, n, k) = (5, 7, 3);
        let lhs: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let rhs: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.53).cos()).collect();
        let at = |v: &[f32], (cs, rs): (isize, isize), i: usize, j: usize| {
            v[(i as isize * rs + j as isize * cs) as usize]
        };
        for lhs_s in [(1, k as isize), (m as isize, 1)] {
            for rhs_s in [(1, n as isize), (k as isize, 1)] {
                for accumulate in [false, true] {
                    let mut dst = vec![0.5f32; m * n];
                    let alpha = if accumulate { 1.0 } else { 0.0 };
                    let done = unsafe {
                        sgemm_on_rayon(
                            (m, n, k),
                            (dst.as_mut_ptr(), 1, n as isize),
                            (lhs.as_ptr(), lhs_s.0, lhs_s.1),
                            (rhs.as_ptr(), rhs_s.0, rhs_s.1),
                            alpha,
                            2.0,
                        )
                    };
                    assert!(done);
                    for i in 0..m {
                        for j in 0..n {
                            let dot: f32 = (0..k)
                                .map(|l| at(&lhs, lhs_s, i, l) * at(&rhs, rhs_s, l, j))
                                .sum();
                            let expected = alpha * 0.5 + 2.0 * dot;
                            assert!((dst[i * n + j] - expected).abs() < 1e-5);
                        }
                    }
                }
            }
        }
    }
}
