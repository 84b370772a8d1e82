//! The Porter stemmer as NLTK's `PorterStemmer()` runs it by default (its
//! `NLTK_EXTENSIONS` mode), which is what rouge-score uses with
//! `use_stemmer=True`.

fn is_consonant(w: &[char], i: usize) -> bool {
    match w[i] {
        'a' | 'e' | 'i' | 'o' | 'u' => false,
        'y' => i == 0 || !is_consonant(w, i - 1),
        _ => true,
    }
}

/// Porter's m: the number of vowel-consonant sequences.
fn measure(w: &[char]) -> usize {
    let cv: Vec<bool> = (0..w.len()).map(|i| is_consonant(w, i)).collect();
    cv.windows(2).filter(|p| !p[0] && p[1]).count()
}

fn contains_vowel(w: &[char]) -> bool {
    (0..w.len()).any(|i| !is_consonant(w, i))
}

fn ends_double_consonant(w: &[char]) -> bool {
    let n = w.len();
    n >= 2 && w[n - 1] == w[n - 2] && is_consonant(w, n - 1)
}

fn ends_cvc(w: &[char]) -> bool {
    let n = w.len();
    (n >= 3
        && is_consonant(w, n - 3)
        && !is_consonant(w, n - 2)
        && is_consonant(w, n - 1)
        && !matches!(w[n - 1], 'w' | 'x' | 'y'))
        || (n == 2 && !is_consonant(w, 0) && is_consonant(w, 1))
}

fn ends_with(w: &[char], suffix: &str) -> bool {
    let s: Vec<char> = suffix.chars().collect();
    w.len() >= s.len() && w[w.len() - s.len()..] == s[..]
}

fn strip(w: &[char], suffix: &str) -> Vec<char> {
    w[..w.len() - suffix.chars().count()].to_vec()
}

fn join(stem: &[char], tail: &str) -> Vec<char> {
    stem.iter().copied().chain(tail.chars()).collect()
}

type Condition<'a> = Option<&'a dyn Fn(&[char]) -> bool>;

/// NLTK's `_apply_rule_list`: the first rule whose suffix matches decides;
/// if its condition fails, no further rule is tried.
fn apply_rules(w: &[char], rules: &[(&str, &str, Condition)]) -> Vec<char> {
    for (suffix, replacement, condition) in rules {
        if *suffix == "*d" && ends_double_consonant(w) {
            let stem = &w[..w.len() - 2];
            return match condition {
                Some(c) if !c(stem) => w.to_vec(),
                _ => join(stem, replacement),
            };
        }
        if ends_with(w, suffix) {
            let stem = strip(w, suffix);
            return match condition {
                Some(c) if !c(&stem) => w.to_vec(),
                _ => join(&stem, replacement),
            };
        }
    }
    w.to_vec()
}

fn positive(w: &[char]) -> bool {
    measure(w) > 0
}

fn step1a(w: &[char]) -> Vec<char> {
    if ends_with(w, "ies") && w.len() == 4 {
        return join(&strip(w, "ies"), "ie");
    }
    apply_rules(
        w,
        &[
            ("sses", "ss", None),
            ("ies", "i", None),
            ("ss", "ss", None),
            ("s", "", None),
        ],
    )
}

fn step1b(w: &[char]) -> Vec<char> {
    if ends_with(w, "ied") {
        return join(&strip(w, "ied"), if w.len() == 4 { "ie" } else { "i" });
    }
    if ends_with(w, "eed") {
        let stem = strip(w, "eed");
        return if measure(&stem) > 0 {
            join(&stem, "ee")
        } else {
            w.to_vec()
        };
    }
    let mut intermediate = None;
    for suffix in ["ed", "ing"] {
        if ends_with(w, suffix) {
            let stem = strip(w, suffix);
            if contains_vowel(&stem) {
                intermediate = Some(stem);
                break;
            }
        }
    }
    let Some(stem) = intermediate else {
        return w.to_vec();
    };
    let last = *stem.last().expect("a stem with a vowel is not empty");
    let last_s = last.to_string();
    let not_lsz = move |_: &[char]| !matches!(last, 'l' | 's' | 'z');
    let short = |s: &[char]| measure(s) == 1 && ends_cvc(s);
    apply_rules(
        &stem,
        &[
            ("at", "ate", None),
            ("bl", "ble", None),
            ("iz", "ize", None),
            ("*d", &last_s, Some(&not_lsz)),
            ("", "e", Some(&short)),
        ],
    )
}

fn step1c(w: &[char]) -> Vec<char> {
    let condition = |s: &[char]| s.len() > 1 && is_consonant(s, s.len() - 1);
    apply_rules(w, &[("y", "i", Some(&condition))])
}

fn step2(w: &[char]) -> Vec<char> {
    if ends_with(w, "alli") && positive(&strip(w, "alli")) {
        return step2(&join(&strip(w, "alli"), "al"));
    }
    let p: Condition = Some(&positive);
    let word = w.to_vec();
    let logi = move |_: &[char]| positive(&word[..word.len() - 3]);
    apply_rules(
        w,
        &[
            ("ational", "ate", p),
            ("tional", "tion", p),
            ("enci", "ence", p),
            ("anci", "ance", p),
            ("izer", "ize", p),
            ("bli", "ble", p),
            ("alli", "al", p),
            ("entli", "ent", p),
            ("eli", "e", p),
            ("ousli", "ous", p),
            ("ization", "ize", p),
            ("ation", "ate", p),
            ("ator", "ate", p),
            ("alism", "al", p),
            ("iveness", "ive", p),
            ("fulness", "ful", p),
            ("ousness", "ous", p),
            ("aliti", "al", p),
            ("iviti", "ive", p),
            ("biliti", "ble", p),
            ("fulli", "ful", p),
            ("logi", "log", Some(&logi)),
        ],
    )
}

fn step3(w: &[char]) -> Vec<char> {
    let p: Condition = Some(&positive);
    apply_rules(
        w,
        &[
            ("icate", "ic", p),
            ("ative", "", p),
            ("alize", "al", p),
            ("iciti", "ic", p),
            ("ical", "ic", p),
            ("ful", "", p),
            ("ness", "", p),
        ],
    )
}

fn step4(w: &[char]) -> Vec<char> {
    let gt1 = |s: &[char]| measure(s) > 1;
    let ion = |s: &[char]| measure(s) > 1 && matches!(s.last(), Some('s' | 't'));
    let m: Condition = Some(&gt1);
    apply_rules(
        w,
        &[
            ("al", "", m),
            ("ance", "", m),
            ("ence", "", m),
            ("er", "", m),
            ("ic", "", m),
            ("able", "", m),
            ("ible", "", m),
            ("ant", "", m),
            ("ement", "", m),
            ("ment", "", m),
            ("ent", "", m),
            ("ion", "", Some(&ion)),
            ("ou", "", m),
            ("ism", "", m),
            ("ate", "", m),
            ("iti", "", m),
            ("ous", "", m),
            ("ive", "", m),
            ("ize", "", m),
        ],
    )
}

fn step5a(w: &[char]) -> Vec<char> {
    if ends_with(w, "e") {
        let stem = strip(w, "e");
        let m = measure(&stem);
        if m > 1 || (m == 1 && !ends_cvc(&stem)) {
            return stem;
        }
    }
    w.to_vec()
}

fn step5b(w: &[char]) -> Vec<char> {
    let word = w.to_vec();
    let condition = move |_: &[char]| measure(&word[..word.len() - 1]) > 1;
    apply_rules(w, &[("ll", "l", Some(&condition))])
}

/// Stems one word (lowercased first), as `nltk.stem.porter.PorterStemmer().stem`.
///
/// ```
/// use lora_mini::metrics::porter::stem;
/// assert_eq!(stem("running"), "run");
/// assert_eq!(stem("generalizations"), "gener");
/// ```
pub fn stem(word: &str) -> String {
    let lower = word.to_lowercase();
    let irregular = match word {
        "sky" | "skies" => Some("sky"),
        "dying" => Some("die"),
        "lying" => Some("lie"),
        "tying" => Some("tie"),
        "news" => Some("news"),
        "innings" | "inning" => Some("inning"),
        "outings" | "outing" => Some("outing"),
        "cannings" | "canning" => Some("canning"),
        "howe" => Some("howe"),
        "proceed" => Some("proceed"),
        "exceed" => Some("exceed"),
        "succeed" => Some("succeed"),
        _ => None,
    };
    if let Some(s) = irregular {
        return s.to_string();
    }
    let w: Vec<char> = lower.chars().collect();
    if w.len() <= 2 {
        return lower;
    }
    let mut w = step1a(&w);
    for step in [step1b, step1c, step2, step3, step4, step5a, step5b] {
        w = step(&w);
    }
    w.into_iter().collect()
}
