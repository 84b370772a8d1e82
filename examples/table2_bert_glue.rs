//! Reruns the paper's Table 2: BERT-base on STS-B, CoLA, MRPC and RTE, with full fine-tuning, LoRA and
//! LoRA-Mini, from the configs in `configs/`.
//!
//! ```sh
//! cargo run --release --example table2_bert_glue -- --help
//! cargo run --release --example table2_bert_glue -- --quick --model ../shared/models/all-MiniLM-L6-v2 --data ../shared/data/glue
//! ```

#[path = "common/tables.rs"]
mod tables;

fn main() {
    let args = std::env::args().skip(1).collect();
    tables::exit_on_error(tables::example_run(
        tables::PaperTable::Table2,
        "table2_bert_glue",
        args,
    ));
}
