//! RoBERTa (`RobertaForSequenceClassification` layout). The encoder is
//! BERT's; the differences are position ids that start after the padding
//! index, a single token type, no pooler in the task model, and a two-layer
//! classification head.

use candle::{Result, Tensor};

use super::bert::{BertConfig, BertModel, Positions};
use crate::adapter::AdaptedLinear;
use crate::dropout::SeededDropout;
use crate::nn::{linear, VarBuilder};

/// `RobertaForSequenceClassification`: `classifier.dense`, tanh, then
/// `classifier.out_proj`, on the `<s>` token, with dropout before each.
#[derive(Clone, Debug)]
pub struct RobertaForSequenceClassification {
    pub roberta: BertModel,
    dense: AdaptedLinear,
    out_proj: AdaptedLinear,
    dropout: SeededDropout,
    num_labels: usize,
}

/// RoBERTa's padding index (`pad_token_id`, 1 in every released checkpoint).
pub fn padding_idx(config: &BertConfig) -> u32 {
    config.pad_token_id.unwrap_or(1) as u32
}

impl RobertaForSequenceClassification {
    /// `vb` is the checkpoint root (holding `roberta.*` and `classifier.*`).
    pub fn new(vb: VarBuilder, config: &BertConfig, num_labels: usize) -> Result<Self> {
        let positions = Positions::AfterPadding {
            padding_idx: padding_idx(config),
        };
        let roberta = BertModel::with_options(vb.pp("roberta"), config, false, positions)?;
        let h = config.hidden_size;
        let head = vb.pp("classifier");
        let p = config
            .classifier_dropout
            .unwrap_or(config.hidden_dropout_prob);
        Ok(Self {
            roberta,
            dense: linear(h, h, head.pp("dense"))?,
            out_proj: linear(h, num_labels, head.pp("out_proj"))?,
            dropout: head.dropout(p)?,
            num_labels,
        })
    }

    pub fn num_labels(&self) -> usize {
        self.num_labels
    }

    /// Logits `(B, num_labels)`.
    pub fn forward_t(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        let hidden = self
            .roberta
            .forward_t(input_ids, None, attention_mask, train)?;
        let first = hidden.narrow(1, 0, 1)?.squeeze(1)?;
        let x = self
            .dense
            .forward_t(&self.dropout.forward_t(&first, train)?, train)?
            .tanh()?;
        self.out_proj
            .forward_t(&self.dropout.forward_t(&x, train)?, train)
    }
}
