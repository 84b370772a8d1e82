//! Packing: several short training rows share one sequence of up to
//! `task.max_len` tokens, so a batch computes fewer padding positions.
//!
//! Each row stays whole and on its own: the packed sequence numbers its
//! documents (`LmExample::documents`), the model lets a token attend only
//! within its document and restarts positions at each one, and the first
//! token of every document is not predicted from the one before. A packed
//! sequence therefore gives every row exactly the loss it has alone; only
//! the number of rows per batch changes.

use super::data::{LmExample, IGNORE};

/// Packs `examples` (each at most `max_len` tokens) by best-fit decreasing:
/// longest rows first, each into the fullest sequence it still fits. The
/// result is deterministic for a given input, so resumed runs see the same
/// sequences.
pub fn pack(examples: &[LmExample], max_len: usize) -> Vec<LmExample> {
    let mut order: Vec<usize> = (0..examples.len()).collect();
    // Stable: equal lengths keep their input order.
    order.sort_by_key(|&i| std::cmp::Reverse(examples[i].ids.len()));
    let mut bins: Vec<Vec<usize>> = Vec::new();
    let mut used: Vec<usize> = Vec::new();
    for i in order {
        let len = examples[i].ids.len();
        let best = (0..bins.len())
            .filter(|&b| used[b] + len <= max_len)
            .max_by_key(|&b| (used[b], std::cmp::Reverse(b)));
        match best {
            Some(b) => {
                bins[b].push(i);
                used[b] += len;
            }
            None => {
                bins.push(vec![i]);
                used.push(len);
            }
        }
    }
    bins.iter()
        .map(|bin| concatenate(bin.iter().map(|&i| &examples[i])))
        .collect()
}

/// One sequence of the given rows, numbered as documents 1, 2, ...
fn concatenate<'a>(rows: impl Iterator<Item = &'a LmExample>) -> LmExample {
    let mut packed = LmExample {
        ids: Vec::new(),
        labels: Vec::new(),
        documents: Vec::new(),
    };
    for (document, row) in (1u32..).zip(rows.filter(|r| !r.ids.is_empty())) {
        packed.ids.extend_from_slice(&row.ids);
        // A document's first token is never predicted: alone it has no
        // token before it, packed it would follow another document.
        packed.labels.push(IGNORE);
        packed.labels.extend_from_slice(&row.labels[1..]);
        packed
            .documents
            .extend(std::iter::repeat_n(document, row.ids.len()));
    }
    packed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(len: usize, first: u32) -> LmExample {
        let ids: Vec<u32> = (first..first + len as u32).collect();
        LmExample {
            labels: ids.iter().map(|&t| i64::from(t)).collect(),
            documents: vec![1; len],
            ids,
        }
    }

    #[test]
    fn packing_keeps_every_row_whole_within_max_len() {
        let rows: Vec<LmExample> = [5, 3, 8, 2, 6, 1, 4]
            .iter()
            .enumerate()
            .map(|(i, &len)| row(len, 100 * i as u32))
            .collect();
        let packed = pack(&rows, 10);
        // 29 tokens in sequences of 10: best-fit decreasing needs 3.
        assert_eq!(packed.len(), 3);
        let mut seen: Vec<Vec<u32>> = Vec::new();
        for p in &packed {
            assert!(p.ids.len() <= 10);
            assert_eq!(p.labels.len(), p.ids.len());
            assert_eq!(p.documents.len(), p.ids.len());
            let mut start = 0;
            for d in 1..=*p.documents.last().unwrap() {
                let len = p.documents.iter().filter(|&&x| x == d).count();
                assert_eq!(p.labels[start], IGNORE, "document {d} starts unpredicted");
                seen.push(p.ids[start..start + len].to_vec());
                start += len;
            }
        }
        seen.sort();
        let mut want: Vec<Vec<u32>> = rows.iter().map(|r| r.ids.clone()).collect();
        want.sort();
        assert_eq!(seen, want, "every row once, whole and in order");
        let predicted = |e: &[LmExample]| e.iter().map(LmExample::predicted).sum::<usize>();
        assert_eq!(predicted(&packed), predicted(&rows));
        assert_eq!(pack(&rows, 10), packed, "deterministic");
    }

    #[test]
    fn a_row_as_long_as_max_len_packs_alone() {
        let rows = vec![row(4, 0), row(2, 10)];
        let packed = pack(&rows, 4);
        assert_eq!(packed.len(), 2);
        assert_eq!(packed[0].ids, rows[0].ids);
        assert_eq!(packed[0].documents, vec![1; 4]);
    }
}
