//! Classification metrics, as scikit-learn computes them.

/// The fraction of predictions equal to their label (`accuracy_score`);
/// `None` for no examples.
pub fn accuracy<T: PartialEq>(predictions: &[T], labels: &[T]) -> Option<f64> {
    if predictions.is_empty() || predictions.len() != labels.len() {
        return None;
    }
    let hits = predictions
        .iter()
        .zip(labels)
        .filter(|(p, l)| p == l)
        .count();
    Some(hits as f64 / predictions.len() as f64)
}

/// Binary F1 with class 1 positive (`f1_score`, `average="binary"`). With
/// no predicted and no true positives scikit-learn warns and returns 0.
pub fn f1_binary(predictions: &[usize], labels: &[usize]) -> Option<f64> {
    if predictions.is_empty() || predictions.len() != labels.len() {
        return None;
    }
    let (mut tp, mut fp, mut fn_) = (0usize, 0usize, 0usize);
    for (&p, &l) in predictions.iter().zip(labels) {
        match (p == 1, l == 1) {
            (true, true) => tp += 1,
            (true, false) => fp += 1,
            (false, true) => fn_ += 1,
            (false, false) => {}
        }
    }
    let denominator = 2 * tp + fp + fn_;
    Some(if denominator == 0 {
        0.0
    } else {
        2.0 * tp as f64 / denominator as f64
    })
}

/// Matthews correlation for any number of classes (`matthews_corrcoef`):
/// 0 when it is undefined (a constant prediction or label), as scikit-learn
/// returns.
pub fn matthews_corrcoef(predictions: &[usize], labels: &[usize]) -> Option<f64> {
    if predictions.is_empty() || predictions.len() != labels.len() {
        return None;
    }
    let k = predictions.iter().chain(labels).copied().max().unwrap_or(0) + 1;
    let mut t = vec![0f64; k]; // true counts per class
    let mut p = vec![0f64; k]; // predicted counts per class
    let mut correct = 0f64;
    for (&pr, &la) in predictions.iter().zip(labels) {
        t[la] += 1.0;
        p[pr] += 1.0;
        if pr == la {
            correct += 1.0;
        }
    }
    let s = predictions.len() as f64;
    let tp: f64 = t.iter().zip(&p).map(|(a, b)| a * b).sum();
    let cov_ytyp = correct * s - tp;
    let cov_ypyp = s * s - p.iter().map(|x| x * x).sum::<f64>();
    let cov_ytyt = s * s - t.iter().map(|x| x * x).sum::<f64>();
    if cov_ypyp * cov_ytyt == 0.0 {
        return Some(0.0);
    }
    Some(cov_ytyp / (cov_ytyt * cov_ypyp).sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_cases() {
        assert_eq!(accuracy(&[1, 0, 1], &[1, 1, 1]), Some(2.0 / 3.0));
        assert_eq!(accuracy::<usize>(&[], &[]), None);
        assert_eq!(f1_binary(&[1, 0, 1, 1], &[1, 1, 0, 1]), Some(2.0 / 3.0));
        assert_eq!(f1_binary(&[0, 0], &[0, 0]), Some(0.0));
        assert_eq!(matthews_corrcoef(&[1, 1, 1], &[0, 1, 1]), Some(0.0));
        assert_eq!(matthews_corrcoef(&[1, 0], &[1, 0]), Some(1.0));
        assert_eq!(matthews_corrcoef(&[0, 1], &[1, 0]), Some(-1.0));
    }
}
