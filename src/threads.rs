//! Thread-pool settings for training on the CPU.
//!
//! Candle (0.11) runs its elementwise ops on a pool of its own, whose
//! workers spin after each op for up to 25,000 pause instructions (about a
//! millisecond on recent Intel cores) before they sleep. This crate's
//! kernels and the gemm crate run on rayon's pool instead. In a training
//! step a Candle op is followed by a rayon kernel hundreds of times, and
//! each time the spinning Candle worker takes a core from the rayon
//! workers: on 2 cores, 6% of a SmolLM2 step's CPU time went to that
//! spinning.

/// The spin limit [`shorten_idle_spinning`] sets.
pub const CANDLE_SPIN_LIMIT: u32 = 500;

/// The environment variable Candle reads its workers' spin limit from.
const SPIN_LIMIT_VAR: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";

/// Makes Candle's pool workers spin for [`CANDLE_SPIN_LIMIT`] pauses
/// before sleeping instead of 25,000. On 2 Intel cores (2026-12-05,
/// interleaved runs) a SmolLM2 LoRA step took 4% less time (median of 18
/// steps each way) and a MiniLM LoRA-Mini step 1-8% less in each of 4
/// rounds.
///
/// Candle reads `CANDLE_BARRIER_POOL_SPIN_LIMIT` when it starts its pool,
/// at its first parallel op; a value already set wins. This sets the
/// variable, so call it at the start of `main`, before other threads
/// start. The `lora-mini` binary does.
///
/// With the `mkl` feature it also sets `KMP_BLOCKTIME=0` (unless set), so
/// that the OpenMP threads of Candle's own MKL calls sleep at once instead
/// of spinning for 200 ms; this crate's kernels call MKL on one thread
/// per rayon worker and start none.
pub fn shorten_idle_spinning() {
    if std::env::var_os(SPIN_LIMIT_VAR).is_none() {
        std::env::set_var(SPIN_LIMIT_VAR, CANDLE_SPIN_LIMIT.to_string());
    }
    #[cfg(feature = "mkl")]
    if std::env::var_os("KMP_BLOCKTIME").is_none() {
        std::env::set_var("KMP_BLOCKTIME", "0");
    }
}
