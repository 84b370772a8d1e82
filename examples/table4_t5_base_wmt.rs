//! Reruns the paper's Table 4: T5-base on WMT16 en-ro (BLEU, ROUGE-L), with full fine-tuning, LoRA and
//! LoRA-Mini, from the configs in `configs/`.
//!
//! ```sh
//! cargo run --release --example table4_t5_base_wmt -- --help
//! cargo run --release --example table4_t5_base_wmt -- --quick --model PATH_TO_A_T5 --data ../shared/data/wmt16_en_ro/newsdev2016_newstest2016
//! ```

#[path = "common/tables.rs"]
mod tables;

fn main() {
    let args = std::env::args().skip(1).collect();
    tables::exit_on_error(tables::example_run(
        tables::PaperTable::Table4,
        "table4_t5_base_wmt",
        args,
    ));
}
