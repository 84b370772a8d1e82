//! Readers over the real GLUE and WMT16 files, a table of bad inputs,
//! parquet, tokenising and batching.

use std::path::{Path, PathBuf};

use candle::Device;
use lora_mini::data::batch::{
    collate_classification, collate_seq2seq, encode_examples, encode_translation, load_tokenizer,
    BatchPlan,
};
use lora_mini::data::examples::{read_csv_examples, read_jsonl_examples};
use lora_mini::data::parquet::{read_parquet_examples, read_parquet_translation};
use lora_mini::data::{
    read_glue_tsv, read_parallel, read_translation_jsonl, task, Direction, Label, TASKS,
};

use crate::common::shared;

fn glue(dir: &str, split: &str) -> PathBuf {
    shared(&format!("data/glue/{dir}/{split}.tsv"))
}

#[test]
fn reads_every_shared_glue_file_with_the_official_counts() {
    let expected = [
        ("cola", [8551, 1043, 1063]),
        ("sst2", [67349, 872, 1821]),
        ("mrpc", [3668, 408, 1725]),
        ("stsb", [5749, 1500, 1379]),
        ("rte", [2490, 277, 3000]),
        ("wnli", [635, 71, 146]),
    ];
    for (name, counts) in expected {
        let t = task(name).unwrap();
        for (split, n) in ["train", "dev", "test"].iter().zip(counts) {
            let rows = read_glue_tsv(t, &glue(t.glue_dir, split)).unwrap();
            assert_eq!(rows.len(), n, "{name} {split}");
            assert_eq!(
                rows.iter().all(|r| r.label.is_some()),
                *split != "test",
                "{name} {split}"
            );
            assert_eq!(rows.iter().all(|r| r.text_b.is_some()), t.text_b.is_some());
        }
    }
    let qnli = task("qnli").unwrap();
    assert_eq!(
        read_glue_tsv(qnli, &glue("QNLI", "dev")).unwrap().len(),
        5463
    );
    // Label counts from the PROVENANCE files.
    let count = |name: &str, split: &str, class: usize| {
        let t = task(name).unwrap();
        read_glue_tsv(t, &glue(t.glue_dir, split))
            .unwrap()
            .iter()
            .filter(|e| e.label == Some(Label::Class(class)))
            .count()
    };
    assert_eq!(
        (count("cola", "train", 1), count("cola", "train", 0)),
        (6023, 2528)
    );
    assert_eq!(
        (count("cola", "dev", 1), count("cola", "dev", 0)),
        (721, 322)
    );
    assert_eq!(
        (count("mrpc", "dev", 1), count("mrpc", "dev", 0)),
        (279, 129)
    );
    // The BOM does not leak into the first row, and CoLA's last row (no final newline) is whole.
    let mrpc = read_glue_tsv(task("mrpc").unwrap(), &glue("MRPC", "dev")).unwrap();
    assert!(!mrpc[0].text_a.starts_with('\u{feff}'));
    let cola = read_glue_tsv(task("cola").unwrap(), &glue("CoLA", "dev")).unwrap();
    assert!(cola.last().unwrap().text_a.ends_with('.'));
    let stsb = read_glue_tsv(task("stsb").unwrap(), &glue("STS-B", "dev")).unwrap();
    assert_eq!(stsb[0].label, Some(Label::Score(5.0)));
}

#[test]
fn reads_wmt16_parallel_text() {
    let dir = shared("data/wmt16_en_ro/newsdev2016_newstest2016");
    for set in ["newsdev2016", "newstest2016"] {
        let pairs = read_parallel(
            &dir.join(format!("{set}-enro.en")),
            &dir.join(format!("{set}-enro.ro")),
        )
        .unwrap();
        assert_eq!(pairs.len(), 1999, "{set}");
    }
    let pairs = read_parallel(
        &dir.join("newstest2016-enro.en"),
        &dir.join("newstest2016-enro.ro"),
    )
    .unwrap();
    assert!(pairs[0].ro.starts_with("Șeful ONU"));
    assert_eq!(Direction::EnRo.split(&pairs[0]).1, pairs[0].ro);
    assert_eq!(
        Direction::EnRo.t5_prefix(),
        "translate English to Romanian: "
    );
}

fn temp(name: &str, bytes: &[u8]) -> PathBuf {
    let dir = crate::common::scratch("data");
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// Every malformed input gives an error with the file, the line and what
/// was expected.
#[test]
fn bad_inputs_are_errors_naming_file_line_and_expectation() {
    type Reader = fn(&Path) -> Result<usize, String>;
    let rte: Reader = |p| {
        read_glue_tsv(task("rte").unwrap(), p)
            .map(|v| v.len())
            .map_err(|e| e.to_string())
    };
    let stsb: Reader = |p| {
        read_glue_tsv(task("stsb").unwrap(), p)
            .map(|v| v.len())
            .map_err(|e| e.to_string())
    };
    let sst_jsonl: Reader = |p| {
        read_jsonl_examples(task("sst2").unwrap(), p)
            .map(|v| v.len())
            .map_err(|e| e.to_string())
    };
    let mrpc_csv: Reader = |p| {
        read_csv_examples(task("mrpc").unwrap(), p)
            .map(|v| v.len())
            .map_err(|e| e.to_string())
    };
    let wmt_jsonl: Reader = |p| {
        read_translation_jsonl(p)
            .map(|v| v.len())
            .map_err(|e| e.to_string())
    };
    let header = "index\tsentence1\tsentence2\tlabel\n";
    let sts_header =
        "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n";
    let cases: Vec<(&str, Vec<u8>, Reader, &str)> = vec![
        (
            "columns.tsv",
            format!("{header}0\ta\tb\tentailment\n1\ta\tentailment\n").into_bytes(),
            rte,
            ":3: expected 4 tab-separated columns",
        ),
        (
            "label.tsv",
            format!("{header}0\ta\tb\tmaybe\n").into_bytes(),
            rte,
            ":2: label \"maybe\" is not one of",
        ),
        (
            "score.tsv",
            format!("{sts_header}0\tg\tf\ty\t0\tn\tn\ta\tb\tfive\n").into_bytes(),
            stsb,
            ":2: score \"five\" is not a number",
        ),
        (
            "range.tsv",
            format!("{sts_header}0\tg\tf\ty\t0\tn\tn\ta\tb\t7.5\n").into_bytes(),
            stsb,
            ":2: score 7.5 is outside [0, 5]",
        ),
        (
            "utf8.tsv",
            [
                header.as_bytes(),
                b"0\ta\tb\tentailment\n1\t\xff\tb\tentailment\n",
            ]
            .concat(),
            rte,
            ":3: invalid UTF-8",
        ),
        ("empty.tsv", Vec::new(), rte, "the file is empty"),
        (
            "header-only.tsv",
            header.as_bytes().to_vec(),
            rte,
            "no examples after the header",
        ),
        (
            "bad.jsonl",
            b"{\"sentence\": \"ok\", \"label\": 1}\n{\"sentence\": 3, \"label\": 1}\n".to_vec(),
            sst_jsonl,
            ":2: column \"sentence\" should be text",
        ),
        (
            "missing.jsonl",
            b"{\"label\": 1}\n".to_vec(),
            sst_jsonl,
            ":1: missing column \"sentence\"",
        ),
        (
            "notjson.jsonl",
            b"{\"sentence\": \"a\", \"label\": 0}\nnot json\n".to_vec(),
            sst_jsonl,
            ":2: invalid JSON",
        ),
        (
            "fields.csv",
            b"sentence1,sentence2,label\na,b,1\na,b\n".to_vec(),
            mrpc_csv,
            ":3: expected 3 comma-separated fields",
        ),
        (
            "quote.csv",
            b"sentence1,sentence2,label\n\"a,b,1\n".to_vec(),
            mrpc_csv,
            ":2: a quoted field is not closed",
        ),
        (
            "label.csv",
            b"sentence1,sentence2,label\na,b,2\n".to_vec(),
            mrpc_csv,
            ":2: label \"2\" is not one of",
        ),
        (
            "wmt.jsonl",
            b"{\"translation\": {\"en\": \"a\"}}\n".to_vec(),
            wmt_jsonl,
            ":1: expected {\"translation\"",
        ),
    ];
    for (name, bytes, reader, expected) in cases {
        let path = temp(name, &bytes);
        let err = reader(&path).expect_err(name);
        assert!(
            err.contains(name) && err.contains(expected),
            "{name}: {err}"
        );
    }
    let en = temp("a.en", b"one\ntwo\nthree\n");
    let ro = temp("a.ro", "unu\ndoi\n".as_bytes());
    let err = read_parallel(&en, &ro).unwrap_err().to_string();
    assert!(
        err.contains("a.ro") && err.contains("2 lines") && err.contains("a.en has 3"),
        "{err}"
    );
}

#[test]
fn jsonl_csv_and_translation_jsonl_read_hugging_face_columns() {
    let jsonl = temp("ok.jsonl", "{\"premise\": \"Ploaia cade.\", \"hypothesis\": \"Plouă.\", \"label\": \"neutral\"}\n{\"premise\": \"x\", \"hypothesis\": \"y\", \"label\": -1}\n".as_bytes());
    let rows = read_jsonl_examples(task("mnli").unwrap(), &jsonl).unwrap();
    assert_eq!(rows[0].label, Some(Label::Class(1)));
    assert_eq!(rows[1].label, None);
    let csv = temp(
        "ok.csv",
        b"sentence1,sentence2,label\n\"He said \"\"hi\"\", then left\",b,1\n",
    );
    let rows = read_csv_examples(task("mrpc").unwrap(), &csv).unwrap();
    assert_eq!(rows[0].text_a, "He said \"hi\", then left");
    let wmt = temp(
        "ok-wmt.jsonl",
        "{\"translation\": {\"en\": \"Hello\", \"ro\": \"Bună ziua\"}}\n".as_bytes(),
    );
    assert_eq!(read_translation_jsonl(&wmt).unwrap()[0].ro, "Bună ziua");
}

/// Writes a small snappy-compressed parquet file as the hub's GLUE and
/// WMT16 files are laid out, then reads it back.
#[test]
fn parquet_files_like_the_hubs_are_read() {
    use parquet::basic::Compression;
    use parquet::data_type::{ByteArray, ByteArrayType, Int64Type};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use parquet::schema::parser::parse_message_type;
    use std::sync::Arc;

    let props = Arc::new(
        WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .build(),
    );
    let write = |name: &str,
                 schema: &str,
                 columns: Vec<Result<Vec<ByteArray>, Vec<i64>>>|
     -> PathBuf {
        let path = temp(name, b"");
        let schema = Arc::new(parse_message_type(schema).unwrap());
        let mut writer =
            SerializedFileWriter::new(std::fs::File::create(&path).unwrap(), schema, props.clone())
                .unwrap();
        let mut group = writer.next_row_group().unwrap();
        for column in columns {
            let mut col = group.next_column().unwrap().unwrap();
            match column {
                Ok(strings) => col
                    .typed::<ByteArrayType>()
                    .write_batch(&strings, None, None)
                    .unwrap(),
                Err(ints) => col
                    .typed::<Int64Type>()
                    .write_batch(&ints, None, None)
                    .unwrap(),
            };
            col.close().unwrap();
        }
        group.close().unwrap();
        writer.close().unwrap();
        path
    };
    let text = |v: &[&str]| v.iter().map(|s| ByteArray::from(*s)).collect::<Vec<_>>();
    let glue = write(
        "rte.parquet",
        "message schema { REQUIRED BYTE_ARRAY sentence1 (UTF8); REQUIRED BYTE_ARRAY sentence2 (UTF8); REQUIRED INT64 label; REQUIRED INT64 idx; }",
        vec![Ok(text(&["A man sleeps.", "Ploaia cade."])), Ok(text(&["Someone rests.", "E soare."])), Err(vec![0, 1]), Err(vec![0, 1])],
    );
    let rows = read_parquet_examples(task("rte").unwrap(), &glue).unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(
        (rows[1].text_a.as_str(), rows[1].label),
        ("Ploaia cade.", Some(Label::Class(1)))
    );
    let wmt = write(
        "wmt.parquet",
        "message schema { REQUIRED group translation { REQUIRED BYTE_ARRAY en (UTF8); REQUIRED BYTE_ARRAY ro (UTF8); } }",
        vec![Ok(text(&["Hello", "Thank you"])), Ok(text(&["Bună", "Mulțumesc"]))],
    );
    let pairs = read_parquet_translation(&wmt).unwrap();
    assert_eq!(pairs[1].ro, "Mulțumesc");
    assert_eq!(
        lora_mini::data::parquet::hub_parquet_path(task("cola").unwrap(), "validation"),
        "cola/validation-00000-of-00001.parquet"
    );
    let err = read_parquet_examples(task("rte").unwrap(), &temp("not.parquet", b"plain text"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("not.parquet") && err.contains("not a parquet file"),
        "{err}"
    );
}

#[test]
fn tokenising_and_batching_are_dynamic_and_reproducible() {
    let tokenizer = load_tokenizer(&shared("models/all-MiniLM-L6-v2/tokenizer.json")).unwrap();
    let cola = task("cola").unwrap();
    let examples = read_glue_tsv(cola, &glue("CoLA", "dev")).unwrap();
    let encoded = encode_examples(&tokenizer, &examples, 32).unwrap();
    let lengths: Vec<usize> = encoded.iter().map(|e| e.ids.len()).collect();
    // The file's fixed padding to 128 is off; truncation holds.
    assert!(lengths.iter().all(|&l| l <= 32) && lengths.iter().min() < lengths.iter().max());
    let pairs = encode_examples(
        &tokenizer,
        &read_glue_tsv(task("rte").unwrap(), &glue("RTE", "dev")).unwrap()[..4],
        64,
    )
    .unwrap();
    assert!(pairs
        .iter()
        .all(|e| e.type_ids.contains(&1) && e.ids.len() <= 64));

    let plan = BatchPlan {
        batch_size: 16,
        shuffle: true,
        bucket_by_length: false,
        seed: 7,
    };
    let a = plan.batches(&lengths, 0);
    assert_eq!(a, plan.batches(&lengths, 0));
    assert_ne!(a, plan.batches(&lengths, 1));
    assert_ne!(
        a,
        BatchPlan {
            seed: 8,
            ..plan.clone()
        }
        .batches(&lengths, 0)
    );
    let mut all: Vec<usize> = a.concat();
    all.sort();
    assert_eq!(all, (0..lengths.len()).collect::<Vec<_>>());
    let padding = |batches: &[Vec<usize>]| -> usize {
        batches
            .iter()
            .map(|b| {
                b.iter().map(|&i| lengths[i]).max().unwrap() * b.len()
                    - b.iter().map(|&i| lengths[i]).sum::<usize>()
            })
            .sum()
    };
    let bucketed = BatchPlan {
        bucket_by_length: true,
        ..plan.clone()
    }
    .batches(&lengths, 0);
    assert!(
        padding(&bucketed) * 2 < padding(&a),
        "{} vs {}",
        padding(&bucketed),
        padding(&a)
    );

    let items: Vec<_> = a[0].iter().map(|&i| &encoded[i]).collect();
    let batch = collate_classification(&items, 0, &Device::Cpu).unwrap();
    let t = items.iter().map(|e| e.ids.len()).max().unwrap();
    assert_eq!(batch.input_ids.dims(), &[16, t]);
    let mask_sum: u32 = batch.attention_mask.sum_all().unwrap().to_scalar().unwrap();
    assert_eq!(
        mask_sum as usize,
        items.iter().map(|e| e.ids.len()).sum::<usize>()
    );
    assert_eq!(batch.labels.unwrap().dims(), &[16]);

    // T5: the prefix, and -100 at padded label positions.
    let t5 = load_tokenizer(&shared("tokenizers/t5/tokenizer.json")).unwrap();
    let dir = shared("data/wmt16_en_ro/newsdev2016_newstest2016");
    let wmt = read_parallel(
        &dir.join("newstest2016-enro.en"),
        &dir.join("newstest2016-enro.ro"),
    )
    .unwrap();
    let enc = encode_translation(
        &t5,
        &wmt[..3],
        Direction::EnRo,
        Direction::EnRo.t5_prefix(),
        64,
        64,
    )
    .unwrap();
    let prefix = t5.encode("translate English to Romanian: ", false).unwrap();
    assert_eq!(&enc[0].source[..prefix.len()], prefix.get_ids());
    assert!(enc
        .iter()
        .all(|e| e.target.last() == Some(&1) && e.source.len() <= 64));
    let batch = collate_seq2seq(&enc.iter().collect::<Vec<_>>(), 0, &Device::Cpu).unwrap();
    let labels: Vec<Vec<i64>> = batch.labels.to_vec2().unwrap();
    let shortest = enc.iter().map(|e| e.target.len()).min().unwrap();
    let row = enc.iter().position(|e| e.target.len() == shortest).unwrap();
    assert!(labels[row][shortest..].iter().all(|&l| l == -100));
    // The nine GLUE tasks, WMT16 en-ro, and causal-lm for decoders.
    assert!(TASKS.len() == 11);
}
