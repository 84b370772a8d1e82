//! Ctrl-C during training: the first one asks the loop to stop after the
//! current step and save a checkpoint, a second one quits at once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use crate::Error;

/// The exit status of a run stopped by Ctrl-C (128 + SIGINT, as shells use).
pub const INTERRUPTED_STATUS: i32 = 130;

/// The process-wide stop flag, set by Ctrl-C; the handler is installed on
/// the first call (later calls share it, since a process has one handler).
/// Pass it as [`TrainOptions::stop`](super::trainer::TrainOptions).
pub fn ctrl_c_flag() -> Result<Arc<AtomicBool>, Error> {
    // The outcome is kept as text: a process installs its handler once.
    static FLAG: OnceLock<Result<Arc<AtomicBool>, String>> = OnceLock::new();
    FLAG.get_or_init(|| {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        ctrlc::set_handler(move || {
            if flag.swap(true, Ordering::SeqCst) {
                eprintln!("\nsecond Ctrl-C: quitting without a new checkpoint");
                std::process::exit(INTERRUPTED_STATUS);
            }
            eprintln!(
                "\nCtrl-C: stopping after this step and saving a checkpoint (Ctrl-C again quits at once)"
            );
        })
        .map_err(|e| format!("installing the Ctrl-C handler: {e}"))?;
        Ok(stop)
    })
    .clone()
    .map_err(Error::from)
}
