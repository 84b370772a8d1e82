//! The built-in tasks as instructions for a decoder. A GLUE classification
//! example becomes a user turn asking a question, answered by a label word
//! ("positive", "negative"); WMT16 becomes `"Translate English to
//! Romanian:\n<sentence>"`, answered by the translation. Training learns
//! the answer turns only. A dev set is scored with the task's own metrics:
//! classification by the label word the model finds likeliest (the summed
//! log-likelihood of each word's whole answer turn, so every example gets a
//! valid prediction, as in lm-evaluation-harness's multiple choice),
//! translation by BLEU on greedy translations.

use super::data::{LmExample, LmRow};
use super::{ChatTokenizer, Message};
use crate::data::{Direction, Example, Label, Task, TaskKind, TranslationPair};
use crate::error::{Error, Result};
use crate::models::generate::{generate, Generation, Sampler, Sampling};
use crate::models::llama::{KvCache, LlamaForCausalLM};

/// How a classification task is asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Prompt {
    /// The question, naming the answer words.
    pub question: &'static str,
    /// How the prompt names the text fields (the second for pair tasks).
    pub fields: (&'static str, Option<&'static str>),
    /// One answer word per class, in the task's label order.
    pub words: &'static [&'static str],
}

const YES_NO: &[&str] = &["no", "yes"];
const ENTAILED_YES_NO: &[&str] = &["yes", "no"];

/// The prompt of a GLUE classification task; STS-B (regression) and the
/// non-GLUE tasks have none.
pub fn prompt(task: &Task) -> Result<Prompt> {
    let p = |question, fields, words| Prompt {
        question,
        fields,
        words,
    };
    let pair = |a, b| (a, Some(b));
    let prompt = match task.name {
        "cola" => p(
            "Is this sentence grammatically acceptable English? Answer acceptable or unacceptable.",
            ("Sentence", None),
            &["unacceptable", "acceptable"][..],
        ),
        "sst2" => p(
            "Is the sentiment of this sentence positive or negative? Answer positive or negative.",
            ("Sentence", None),
            &["negative", "positive"][..],
        ),
        "mrpc" => p(
            "Do these two sentences mean the same thing? Answer yes or no.",
            pair("Sentence 1", "Sentence 2"),
            YES_NO,
        ),
        "qqp" => p(
            "Do these two questions ask the same thing? Answer yes or no.",
            pair("Question 1", "Question 2"),
            YES_NO,
        ),
        "mnli" => p(
            "Does the premise entail the hypothesis, contradict it, or neither? Answer entailment, contradiction or neutral.",
            pair("Premise", "Hypothesis"),
            &["entailment", "neutral", "contradiction"][..],
        ),
        // QNLI and RTE label 0 "entailment", 1 "not_entailment".
        "qnli" => p(
            "Does the sentence answer the question? Answer yes or no.",
            pair("Question", "Sentence"),
            ENTAILED_YES_NO,
        ),
        "rte" => p(
            "Does the first sentence imply the second? Answer yes or no.",
            pair("Sentence 1", "Sentence 2"),
            ENTAILED_YES_NO,
        ),
        // WNLI labels 1 for entailment.
        "wnli" => p(
            "Does the first sentence imply the second? Answer yes or no.",
            pair("Sentence 1", "Sentence 2"),
            YES_NO,
        ),
        name => {
            return Err(Error::Message(format!(
                "task {name} has no instruction form for a decoder: it learns cola, sst2, mrpc, qqp, mnli, qnli, rte and wnli as label words, wmt16-en-ro as translation, and causal-lm on JSONL"
            )))
        }
    };
    debug_assert!(
        matches!(task.kind, TaskKind::Classification { labels } if labels.len() == prompt.words.len())
    );
    Ok(prompt)
}

impl Prompt {
    /// The user turn asking about `example`.
    pub fn user_text(&self, example: &Example) -> String {
        let mut text = format!("{}\n{}: {}", self.question, self.fields.0, example.text_a);
        if let (Some(name), Some(b)) = (self.fields.1, &example.text_b) {
            text.push_str(&format!("\n{name}: {b}"));
        }
        text
    }

    /// The conversation answering `example` with the word for `class`.
    pub fn answered(&self, example: &Example, class: usize) -> Vec<Message> {
        vec![
            Message::new("user", &self.user_text(example)),
            Message::new("assistant", self.words[class]),
        ]
    }
}

/// Training rows of labelled classification examples.
pub fn classification_rows(prompt: &Prompt, examples: &[Example]) -> Result<Vec<LmRow>> {
    examples
        .iter()
        .map(|e| match e.label {
            Some(Label::Class(c)) if c < prompt.words.len() => {
                Ok(LmRow::Messages(prompt.answered(e, c)))
            }
            _ => Err(Error::Message(format!(
                "an example has no class label to learn as a word: {:?}",
                e.text_a
            ))),
        })
        .collect()
}

/// The user turn asking to translate `source` in `direction`, phrased
/// like T5's prefix: "Translate English to Romanian:\n<source>".
pub fn translation_request(direction: Direction, source: &str) -> Message {
    let prefix = direction.t5_prefix().trim_end();
    let instruction = format!("{}{}", prefix[..1].to_uppercase(), &prefix[1..]);
    Message::new("user", &format!("{instruction}\n{source}"))
}

/// Training rows of translation pairs.
pub fn translation_rows(direction: Direction, pairs: &[TranslationPair]) -> Vec<LmRow> {
    pairs
        .iter()
        .map(|p| {
            let (source, target) = direction.split(p);
            LmRow::Messages(vec![
                translation_request(direction, source),
                Message::new("assistant", target),
            ])
        })
        .collect()
}

/// A decoder's evaluation set for a built-in task.
#[derive(Clone, Debug)]
pub enum InstructionSet {
    /// Per example, one tokenised conversation per class, answered with
    /// that class's word; the likeliest one is the prediction.
    LabelWords {
        choices: Vec<Vec<LmExample>>,
        gold: Vec<Label>,
    },
    /// Prompts (rendered up to the assistant's turn) and their references.
    Translation {
        prompts: Vec<Vec<u32>>,
        refs: Vec<String>,
        /// The tokens that end an answer.
        eos_ids: Vec<u32>,
    },
}

impl InstructionSet {
    /// Labelled `examples` as label-word choices. They are not truncated:
    /// cutting a prompt would cut the answer being scored.
    pub fn label_words(
        text: &ChatTokenizer,
        prompt: &Prompt,
        examples: &[Example],
    ) -> Result<Self> {
        let gold = examples
            .iter()
            .map(|e| {
                e.label
                    .ok_or_else(|| Error::Message("evaluation needs labelled rows".into()))
            })
            .collect::<Result<Vec<_>>>()?;
        let choices = label_word_choices(text, prompt, examples)?;
        Ok(Self::LabelWords { choices, gold })
    }

    /// Translation requests for `pairs`, with their references.
    pub fn translation(
        text: &ChatTokenizer,
        direction: Direction,
        pairs: &[TranslationPair],
    ) -> Result<Self> {
        let template = text.chat_template()?;
        let mut prompts = Vec::with_capacity(pairs.len());
        for p in pairs {
            let request = translation_request(direction, direction.split(p).0);
            prompts.push(text.encode(&template.render(&[request], true)?, true)?);
        }
        Ok(Self::Translation {
            prompts,
            refs: pairs
                .iter()
                .map(|p| direction.split(p).1.to_string())
                .collect(),
            eos_ids: text.eos_ids.clone(),
        })
    }

    /// The units of work scoring takes (choice rows, or prompts), which
    /// the scoring functions' progress callbacks count.
    pub fn work(&self) -> usize {
        match self {
            Self::LabelWords { choices, .. } => choices.iter().map(Vec::len).sum(),
            Self::Translation { prompts, .. } => prompts.len(),
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Self::LabelWords { gold, .. } => gold.len(),
            Self::Translation { refs, .. } => refs.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Per example (labelled or not), one tokenised conversation per class,
/// answered with that class's word. Not truncated: cutting a prompt would
/// cut the answer being scored.
pub fn label_word_choices(
    text: &ChatTokenizer,
    prompt: &Prompt,
    examples: &[Example],
) -> Result<Vec<Vec<LmExample>>> {
    examples
        .iter()
        .map(|e| {
            (0..prompt.words.len())
                .map(|c| text.encode_row(&LmRow::Messages(prompt.answered(e, c)), usize::MAX))
                .collect()
        })
        .collect()
}

/// The summed negative log-likelihood of each class's answer turn, per
/// example; all choice rows run `batch_size` at a time, and `on_rows`
/// hears how many rows each batch scored.
pub fn choice_nlls(
    model: &LlamaForCausalLM,
    choices: &[Vec<LmExample>],
    batch_size: usize,
    pad: u32,
    mut on_rows: impl FnMut(usize),
) -> candle::Result<Vec<Vec<f64>>> {
    let rows: Vec<&LmExample> = choices.iter().flatten().collect();
    let mut nlls = Vec::with_capacity(rows.len());
    for chunk in rows.chunks(batch_size.max(1)) {
        nlls.extend(super::row_nlls(model, chunk, batch_size, pad)?);
        on_rows(chunk.len());
    }
    let mut rest = nlls.as_slice();
    Ok(choices
        .iter()
        .map(|c| {
            let (mine, after) = rest.split_at(c.len());
            rest = after;
            mine.to_vec()
        })
        .collect())
}

/// The likeliest class of each example's [`choice_nlls`]: the first of
/// equal likelihoods, as argmax takes the first maximum.
pub fn likeliest(nlls: &[f64]) -> Label {
    let best = (0..nlls.len())
        .reduce(|b, i| if nlls[i] < nlls[b] { i } else { b })
        .unwrap_or(0);
    Label::Class(best)
}

/// The class whose answer turn `model` finds likeliest, per example (see
/// [`choice_nlls`]).
pub fn predict_labels(
    model: &LlamaForCausalLM,
    choices: &[Vec<LmExample>],
    batch_size: usize,
    pad: u32,
    on_rows: impl FnMut(usize),
) -> candle::Result<Vec<Label>> {
    let nlls = choice_nlls(model, choices, batch_size, pad, on_rows)?;
    Ok(nlls.iter().map(|n| likeliest(n)).collect())
}

/// Greedy answers to `prompts` (token ids), up to `max_new_tokens` each,
/// with a key/value cache; `on_done` is called with 1 after each.
pub fn greedy_answers(
    model: &LlamaForCausalLM,
    prompts: &[Vec<u32>],
    eos_ids: &[u32],
    max_new_tokens: usize,
    mut on_done: impl FnMut(usize),
) -> candle::Result<Vec<Vec<u32>>> {
    let mut answers = Vec::with_capacity(prompts.len());
    for prompt in prompts {
        let mut sampler = Sampler::new(Sampling::Greedy)?;
        let mut cache = KvCache::default();
        let generation = Generation {
            max_new_tokens,
            eos_ids: eos_ids.to_vec(),
            stop: None,
        };
        answers.push(generate(prompt, &mut sampler, generation, |t| {
            model.next_logits(t, &mut cache)
        })?);
        on_done(1);
    }
    Ok(answers)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{task, TASKS};

    #[test]
    fn every_glue_classification_task_has_one_word_per_label() {
        for t in TASKS {
            match (t.kind, prompt(t)) {
                (TaskKind::Classification { labels }, Ok(p)) => {
                    assert_eq!(p.words.len(), labels.len(), "{}", t.name);
                    assert_eq!(p.fields.1.is_some(), t.text_b.is_some(), "{}", t.name);
                }
                (TaskKind::Classification { .. }, Err(e)) => panic!("{}: {e}", t.name),
                (_, Ok(_)) => panic!("{} is not a classification task", t.name),
                (_, Err(e)) => assert!(e.to_string().contains(t.name), "{e}"),
            }
        }
    }

    #[test]
    fn rows_ask_with_both_fields_and_answer_with_the_label_word() {
        let mrpc = task("mrpc").unwrap();
        let p = prompt(mrpc).unwrap();
        let example = |label| Example {
            text_a: "He left.".into(),
            text_b: Some("He went away.".into()),
            label,
        };
        let rows = classification_rows(&p, &[example(Some(Label::Class(1)))]).unwrap();
        let LmRow::Messages(m) = &rows[0] else {
            panic!("{rows:?}")
        };
        assert_eq!(
            m[0].content,
            "Do these two sentences mean the same thing? Answer yes or no.\nSentence 1: He left.\nSentence 2: He went away."
        );
        assert_eq!(
            (m[1].role.as_str(), m[1].content.as_str()),
            ("assistant", "yes")
        );
        // RTE's class 0 is "entailment": yes.
        let rte = prompt(task("rte").unwrap()).unwrap();
        assert_eq!(rte.answered(&example(None), 0)[1].content, "yes");
        assert!(classification_rows(&p, &[example(None)]).is_err());
    }

    #[test]
    fn translation_is_asked_like_t5s_prefix() {
        let pair = TranslationPair {
            en: "Hello.".into(),
            ro: "Salut.".into(),
        };
        let rows = translation_rows(Direction::EnRo, std::slice::from_ref(&pair));
        let LmRow::Messages(m) = &rows[0] else {
            panic!("{rows:?}")
        };
        assert_eq!(m[0].content, "Translate English to Romanian:\nHello.");
        assert_eq!(m[1].content, "Salut.");
        let back = translation_request(Direction::RoEn, "Salut.");
        assert_eq!(back.content, "Translate Romanian to English:\nSalut.");
    }
}
