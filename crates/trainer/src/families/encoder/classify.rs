//! Inference with a sequence-classification adapter: label probabilities for texts.

pub use crate::classes::Prediction;
use crate::data::ClassInput;
use crate::families::encoder::labels::LabelSet;
use crate::families::encoder::model::{Encoder, ProblemType};
use crate::families::encoder::tokenize::PairTokenizer;
use crate::lora::{self, ForwardCtx};
use crate::{Error, Result};
use candle_core::{Device, D};
use std::path::Path;

/// A base encoder with an adapter (LoRA + head) and its label set.
pub struct Classifier {
    pub model: Encoder,
    pub labels: LabelSet,
    tokenizer: PairTokenizer,
}

impl Classifier {
    pub fn load(model: &Path, adapter: &Path, max_len: usize, device: &Device) -> Result<Self> {
        let labels = LabelSet::load(adapter)?;
        let mut enc = Encoder::load(model, labels.num_labels(), 0, device)?;
        let cfg = lora::read_adapter_config(adapter)?;
        lora::attach(&mut enc, &cfg, 0)?;
        lora::load_adapter_weights(&enc, adapter)?;
        let tokenizer = PairTokenizer::from_dir(model, max_len.min(enc.cfg.max_tokens()))?;
        Ok(Self {
            model: enc,
            labels,
            tokenizer,
        })
    }

    /// Predictions for a batch of inputs.
    pub fn predict(&self, inputs: &[ClassInput]) -> Result<Vec<Prediction>> {
        let enc = inputs
            .iter()
            .map(|i| self.tokenizer.encode(i).map_err(Error::Data))
            .collect::<Result<Vec<_>>>()?;
        let batch = self.model.batch(&enc.iter().collect::<Vec<_>>())?;
        let logits = self.model.logits(&batch, &ForwardCtx::eval())?;
        let scores = match self.labels.problem_type {
            ProblemType::SingleLabelClassification => {
                crate::ops::softmax_last(&logits)?.to_vec2::<f32>()?
            }
            ProblemType::MultiLabelClassification => {
                candle_nn::ops::sigmoid(&logits)?.to_vec2::<f32>()?
            }
            ProblemType::Regression => logits.to_vec2::<f32>()?,
        };
        let argmax: Vec<u32> = logits.argmax(D::Minus1)?.to_vec1()?;
        Ok(scores
            .into_iter()
            .zip(argmax)
            .map(|(row, am)| {
                let names: Vec<String> = match self.labels.problem_type {
                    ProblemType::Regression => vec!["value".into()],
                    _ => self.labels.names.clone(),
                };
                let labels = match self.labels.problem_type {
                    ProblemType::SingleLabelClassification => vec![names[am as usize].clone()],
                    ProblemType::MultiLabelClassification => names
                        .iter()
                        .zip(&row)
                        .filter(|(_, &p)| p > 0.5)
                        .map(|(n, _)| n.clone())
                        .collect(),
                    ProblemType::Regression => Vec::new(),
                };
                Prediction {
                    labels,
                    scores: names.into_iter().zip(row).collect(),
                }
            })
            .collect())
    }
}
