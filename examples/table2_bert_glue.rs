//! Reruns the paper's Table 2: BERT-base on STS-B, CoLA, MRPC and RTE, with full fine-tuning, LoRA and
//! LoRA-Mini, from the configs in `configs/`.
//!
//! ```sh
//! cargo run --release --example table2_bert_glue -- --help
//! cargo run --release --example table2_bert_glue -- --quick --model ../shared/models/all-MiniLM-L6-v2 --data ../shared/data/glue
//! ```

fn main() {
    lora_mini::train::tables::example_main(
        lora_mini::train::tables::PaperTable::Table2,
        "table2_bert_glue",
    );
}
