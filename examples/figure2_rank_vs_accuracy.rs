//! Reruns the paper's Figure 2: rank against dev score for LoRA-Mini
//! `dense+attention` on RoBERTa (Table 1's r = 8, 16, 32 runs, shared with
//! `table1_roberta_glue` when given the same `--out`), drawn as SVG.
//!
//! ```sh
//! cargo run --release --example figure2_rank_vs_accuracy -- --help
//! ```

#[path = "common/tables.rs"]
mod tables;

fn main() {
    tables::exit_on_error(tables::figure2_main(std::env::args().skip(1).collect()));
}
