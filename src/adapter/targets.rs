//! Matching module paths against target names, as PEFT's `target_modules`
//! and `modules_to_save` do.

/// Matches every linear layer (PEFT's spelling).
pub const ALL_LINEAR: &str = "all-linear";

/// True when `path` is the target itself or ends in `.{target}`, so `query`
/// matches `bert.encoder.layer.0.attention.self.query` and a full path matches
/// only itself.
///
/// ```
/// use lora_mini::adapter::targets::matches_target;
/// assert!(matches_target("encoder.layer.0.attention.self.query", "query"));
/// assert!(matches_target("encoder.layer.0.attention.self.query", "self.query"));
/// assert!(!matches_target("encoder.layer.0.attention.self.query_proj", "query"));
/// ```
pub fn matches_target(path: &str, target: &str) -> bool {
    target == ALL_LINEAR
        || path == target
        || (path.len() > target.len()
            && path.ends_with(target)
            && path.as_bytes()[path.len() - target.len() - 1] == b'.')
}

/// True when `path` is module `module` or lies inside it; `module` may be a
/// name (`classifier`) or a dotted path (`roberta.pooler`).
///
/// ```
/// use lora_mini::adapter::targets::is_within;
/// assert!(is_within("classifier.out_proj", "classifier"));
/// assert!(is_within("bert.pooler.dense", "pooler"));
/// assert!(!is_within("my_classifier.dense", "classifier"));
/// ```
pub fn is_within(path: &str, module: &str) -> bool {
    let mut start = 0;
    let segments: Vec<&str> = path.split('.').collect();
    let wanted: Vec<&str> = module.split('.').collect();
    while start + wanted.len() <= segments.len() {
        if segments[start..start + wanted.len()] == wanted[..] {
            return true;
        }
        start += 1;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suffix_matching_respects_segment_boundaries() {
        assert!(matches_target("a.dense", "dense"));
        assert!(matches_target("dense", "dense"));
        assert!(!matches_target("a.xdense", "dense"));
        assert!(!matches_target("a.dense.b", "dense"));
        assert!(matches_target("anything.at.all", ALL_LINEAR));
    }

    #[test]
    fn within_matches_whole_segments() {
        assert!(is_within("classifier", "classifier"));
        assert!(is_within("roberta.pooler.dense", "roberta.pooler"));
        assert!(!is_within("roberta.pooler_x.dense", "roberta.pooler"));
    }
}
