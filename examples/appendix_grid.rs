//! Reruns the paper's appendix sweep: LoRA-Mini `dense` and
//! `dense+attention` at r ∈ {8, 16, 32} and a, b ∈ {16, 32, 64}, for one
//! model family and GLUE task, with accuracy (or Pearson) and trainable
//! parameters beside the paper's.
//!
//! ```sh
//! cargo run --release --example appendix_grid -- --help
//! cargo run --release --example appendix_grid -- --family bert --task rte \
//!     --model ../shared/models/all-MiniLM-L6-v2 --data ../shared/data/glue --quick
//! ```

#[path = "common/tables.rs"]
mod tables;

fn main() {
    tables::exit_on_error(tables::appendix_main(std::env::args().skip(1).collect()));
}
