//! Metrics against values computed by sacreBLEU, rouge-score (with NLTK's
//! Porter stemmer), scipy and scikit-learn: tests/fixtures/metrics/.

use lora_mini::metrics::{
    accuracy, corpus_bleu, corpus_rouge, f1_binary, matthews_corrcoef, pearson, porter::stem,
    spearman,
};
use serde_json::Value;

use crate::common::shared;

fn fixture() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/metrics/metrics.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn lines(path: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(String::from)
        .collect()
}

fn close(a: Option<f64>, b: &Value, tol: f64, what: &str) -> f64 {
    match (a, b.as_f64()) {
        (None, None) => 0.0,
        (Some(a), Some(b)) => {
            let d = (a - b).abs();
            assert!(d <= tol, "{what}: {a} vs {b}");
            d
        }
        (a, _) => panic!("{what}: {a:?} vs {b}"),
    }
}

#[test]
fn classification_matches_scikit_learn() {
    for case in fixture()["classification"].as_array().unwrap() {
        let p: Vec<usize> = serde_json::from_value(case["pred"].clone()).unwrap();
        let l: Vec<usize> = serde_json::from_value(case["label"].clone()).unwrap();
        close(accuracy(&p, &l), &case["accuracy"], 1e-12, "accuracy");
        close(matthews_corrcoef(&p, &l), &case["mcc"], 1e-12, "mcc");
        if case.get("f1").is_some() {
            close(f1_binary(&p, &l), &case["f1"], 1e-12, "f1");
        }
    }
}

#[test]
fn correlations_match_scipy_with_undefined_as_none() {
    for case in fixture()["correlation"].as_array().unwrap() {
        let x: Vec<f64> = serde_json::from_value(case["x"].clone()).unwrap();
        let y: Vec<f64> = serde_json::from_value(case["y"].clone()).unwrap();
        close(pearson(&x, &y), &case["pearson"], 1e-12, "pearson");
        close(spearman(&x, &y), &case["spearman"], 1e-12, "spearman");
    }
}

fn check_bleu_rouge(hyps: &[String], refs: &[String], expected: &Value, what: &str) -> (f64, f64) {
    let b = corpus_bleu(hyps, refs);
    let e = &expected["bleu"];
    let mut worst_bleu = close(Some(b.score), &e["score"], 0.01, &format!("{what} bleu"));
    for (i, p) in b.precisions.iter().enumerate() {
        worst_bleu = worst_bleu.max(close(
            Some(*p),
            &e["precisions"][i],
            0.01,
            &format!("{what} bleu-{}", i + 1),
        ));
    }
    assert_eq!(b.hyp_len as u64, e["sys_len"].as_u64().unwrap(), "{what}");
    assert_eq!(b.ref_len as u64, e["ref_len"].as_u64().unwrap(), "{what}");
    let mut worst_rouge: f64 = 0.0;
    for (key, stemmed) in [("rouge", false), ("rouge_stem", true)] {
        let r = corpus_rouge(hyps, refs, stemmed).unwrap();
        let e = &expected[key];
        for (name, v) in [
            ("rouge1", r.rouge1),
            ("rouge2", r.rouge2),
            ("rougeL", r.rouge_l),
        ] {
            worst_rouge = worst_rouge.max(close(
                Some(v),
                &e[name],
                1e-9,
                &format!("{what} {key} {name}"),
            ));
        }
    }
    (worst_bleu, worst_rouge)
}

#[test]
fn bleu_and_rouge_match_sacrebleu_and_rouge_score_on_edge_cases() {
    for case in fixture()["bleu_rouge"].as_array().unwrap() {
        let hyps: Vec<String> = serde_json::from_value(case["hyps"].clone()).unwrap();
        let refs: Vec<String> = serde_json::from_value(case["refs"].clone()).unwrap();
        check_bleu_rouge(&hyps, &refs, case, &format!("{hyps:?}"));
    }
}

#[test]
fn bleu_and_rouge_match_on_newstest2016() {
    let f = fixture();
    for lang in ["ro", "en"] {
        let refs = lines(&shared(&format!(
            "data/wmt16_en_ro/newsdev2016_newstest2016/newstest2016-enro.{lang}"
        )));
        let hyps = lines(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join(format!("tests/fixtures/metrics/hyp.newstest2016.{lang}")),
        );
        assert_eq!(hyps.len(), 1999);
        let (bleu, rouge) = check_bleu_rouge(&hyps, &refs, &f["newstest2016"][lang], lang);
        eprintln!("newstest2016.{lang}: max |BLEU and precisions - sacreBLEU| = {bleu:e}, max |ROUGE - rouge-score| = {rouge:e}");
    }
}

#[test]
fn porter_matches_nltk_on_newstest_vocabulary() {
    let f = fixture();
    let table = f["porter"].as_object().unwrap();
    assert!(table.len() > 5000);
    let wrong: Vec<String> = table
        .iter()
        .filter(|(w, s)| stem(w) != s.as_str().unwrap())
        .map(|(w, s)| format!("{w}: ours {} nltk {s}", stem(w)))
        .collect();
    assert!(
        wrong.is_empty(),
        "{} of {} differ: {:?}",
        wrong.len(),
        table.len(),
        &wrong[..wrong.len().min(10)]
    );
}
