//! Allocator settings for training on the CPU, and the peak memory a run
//! reports.
//!
//! A training step allocates and frees hundreds of activation-sized buffers.
//! glibc serves each one above 128 KiB with a fresh `mmap` and returns it
//! with `munmap`, so every step pays for the kernel zeroing new pages and
//! for TLB shootdowns: about a quarter of a MiniLM step's cycles in a
//! profile. Keeping those buffers in the heap and never trimming it lets
//! them be reused instead.

/// Makes glibc's malloc keep freed activation buffers for reuse: buffers up
/// to 32 MiB come from the heap rather than `mmap`, and the heap is not
/// trimmed back to the system. The process keeps its peak footprint; that is
/// the point. Does nothing off glibc. The `lora-mini` binary calls it at
/// start; a library user may call it from their own `main`.
pub fn keep_freed_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning parameters; it is
    // called before the allocation-heavy work starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
    }
}

/// The process's peak resident set size (`VmHWM`), where `/proc` has it.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}
