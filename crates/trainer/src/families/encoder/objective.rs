//! Sequence classification on a BERT-style encoder: labelled texts, the label set that
//! sizes the head, the classification loss, and accuracy / macro-F1 on validation.

use super::labels::{self, LabelSet};
use super::model::{
    accuracy_macro_f1, classification_loss, EncodedText, Encoder, EncoderBatch, ProblemType,
    Targets,
};
use super::tokenize::PairTokenizer;
use super::EncoderOptions;
use crate::lora::{ForwardCtx, LoraModel};
use crate::train::{EvalMetrics, Objective, TrainSpec};
use crate::{Error, Result};
use candle_core::{Tensor, D};
use std::path::Path;

/// Sequence classification on a BERT-style encoder.
pub struct SeqCls {
    pub model: Encoder,
    pub labels: LabelSet,
    name: String,
    train: Vec<(EncodedText, Targets)>,
    valid: Option<Vec<(EncodedText, Targets)>>,
}

/// A classification micro-batch.
pub struct ClsBatch {
    inputs: EncoderBatch,
    targets: Targets,
    units: usize,
}

fn join_targets(parts: &[&Targets]) -> Targets {
    match parts.first() {
        Some(Targets::Classes(_)) => Targets::Classes(
            parts
                .iter()
                .flat_map(|t| match t {
                    Targets::Classes(c) => c.clone(),
                    Targets::Values(_) => Vec::new(),
                })
                .collect(),
        ),
        _ => Targets::Values(
            parts
                .iter()
                .flat_map(|t| match t {
                    Targets::Values(v) => v.clone(),
                    Targets::Classes(_) => Vec::new(),
                })
                .collect(),
        ),
    }
}

impl SeqCls {
    /// Reads the data first: the label set decides the size of the head. An adapter to
    /// start from or resume brings its own label set, which the data must fit.
    pub fn load(spec: &TrainSpec, adapter: Option<&Path>) -> Result<Self> {
        let train_rows = labels::read_numbered(&spec.data)?;
        let data_name = spec.data.display().to_string();
        let set = match adapter.filter(|d| d.join(labels::LABELS_FILE).is_file()) {
            Some(d) => {
                let set = LabelSet::load(d)?;
                set.check(&train_rows, &data_name)?;
                set
            }
            None => LabelSet::discover(
                &train_rows,
                spec.options
                    .get::<EncoderOptions>()
                    .and_then(|o| o.problem_type),
            )
            .map_err(|e| match e {
                Error::Data(m) => Error::Data(format!("{data_name}: {m}")),
                e => e,
            })?,
        };
        let mut model = Encoder::load(&spec.model, set.num_labels(), spec.seed, &spec.device)?;
        model.model_dropout = spec.model_dropout;
        let max_len = spec.max_seq_len.min(model.cfg.max_tokens());
        let tok = PairTokenizer::from_dir(&spec.model, max_len)?;
        let encode =
            |rows: &[labels::Numbered], what: &str| -> Result<Vec<(EncodedText, Targets)>> {
                rows.iter()
                    .map(|(line, e)| {
                        let at = |m: String| Error::Data(format!("{what}: line {line}: {m}"));
                        let enc = tok.encode(&e.input).map_err(at)?;
                        if let Some(&id) = enc
                            .input_ids
                            .iter()
                            .find(|&&id| id as usize >= model.cfg.vocab_size)
                        {
                            return Err(at(format!("token id {id} is outside the vocabulary")));
                        }
                        let t = set.targets(&[&e.label]).map_err(at)?;
                        Ok((enc, t))
                    })
                    .collect()
            };
        let train = encode(&train_rows, &data_name)?;
        let valid = match &spec.validation {
            Some(p) => {
                let rows = labels::read_numbered(p)?;
                Some(encode(&rows, &p.display().to_string())?)
            }
            None => None,
        };
        let name = crate::io::base_reference(&spec.model, None);
        Ok(Self {
            model,
            labels: set,
            name,
            train,
            valid,
        })
    }

    fn make(&self, rows: &[&(EncodedText, Targets)]) -> Result<ClsBatch> {
        let enc: Vec<&EncodedText> = rows.iter().map(|(e, _)| e).collect();
        let targets = join_targets(&rows.iter().map(|(_, t)| t).collect::<Vec<_>>());
        let units = match self.labels.problem_type {
            ProblemType::SingleLabelClassification => rows.len(),
            _ => rows.len() * self.labels.num_labels(),
        };
        Ok(ClsBatch {
            inputs: self.model.batch(&enc)?,
            targets,
            units,
        })
    }
}

impl Objective for SeqCls {
    type Batch = ClsBatch;
    fn model(&self) -> &dyn LoraModel {
        &self.model
    }
    fn model_mut(&mut self) -> &mut dyn LoraModel {
        &mut self.model
    }
    fn base_name(&self) -> &str {
        &self.name
    }
    fn len(&self) -> usize {
        self.train.len()
    }
    fn batch(&self, idx: &[usize]) -> Result<ClsBatch> {
        self.make(&idx.iter().map(|&i| &self.train[i]).collect::<Vec<_>>())
    }
    fn units(b: &ClsBatch) -> usize {
        b.units
    }
    fn tokens(b: &ClsBatch) -> usize {
        b.inputs.tokens
    }
    fn loss_sum(&self, b: &ClsBatch, ctx: &ForwardCtx) -> Result<Tensor> {
        let logits = self.model.logits(&b.inputs, ctx)?;
        Ok(classification_loss(&logits, self.labels.problem_type, &b.targets)?.0)
    }
    fn evaluate(&self, batch_size: usize, step: u64) -> Result<Option<EvalMetrics>> {
        let Some(valid) = &self.valid else {
            return Ok(None);
        };
        let ctx = ForwardCtx::eval();
        let (mut sum, mut units) = (0f64, 0usize);
        let (mut pred, mut gold) = (Vec::new(), Vec::new());
        let mut exact = 0usize;
        let k = self.labels.num_labels();
        for chunk in valid.chunks(batch_size) {
            let b = self.make(&chunk.iter().collect::<Vec<_>>())?;
            let logits = self.model.logits(&b.inputs, &ctx)?;
            let (l, n) = classification_loss(&logits, self.labels.problem_type, &b.targets)?;
            sum += l.to_scalar::<f32>()? as f64;
            units += n;
            match (&b.targets, self.labels.problem_type) {
                (Targets::Classes(c), _) => {
                    pred.extend(logits.argmax(D::Minus1)?.to_vec1::<u32>()?);
                    gold.extend(c);
                }
                (Targets::Values(v), ProblemType::MultiLabelClassification) => {
                    let l: Vec<f32> = logits.flatten_all()?.to_vec1()?;
                    for (row, want) in l.chunks(k).zip(v.chunks(k)) {
                        let hit: Vec<bool> = row.iter().map(|&x| x > 0.0).collect();
                        if hit.iter().zip(want).all(|(h, w)| *h == (*w > 0.5)) {
                            exact += 1;
                        }
                    }
                }
                _ => {}
            }
        }
        let (accuracy, macro_f1) = match self.labels.problem_type {
            ProblemType::SingleLabelClassification => {
                let (a, f) = accuracy_macro_f1(&pred, &gold, k);
                (Some(a), Some(f))
            }
            ProblemType::MultiLabelClassification => {
                (Some(exact as f64 / valid.len().max(1) as f64), None)
            }
            ProblemType::Regression => (None, None),
        };
        Ok(Some(EvalMetrics {
            step,
            loss: if units > 0 { sum / units as f64 } else { 0.0 },
            mean_token_accuracy: accuracy.unwrap_or(0.0),
            tokens: valid.len() as u64,
            accuracy,
            macro_f1,
            reward_margin: None,
            reward_accuracy: None,
            wer: None,
        }))
    }
    fn save_extra(&self, dir: &Path) -> Result<()> {
        self.labels.save(dir)
    }
}
