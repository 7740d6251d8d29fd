//! Causal language modelling on a decoder: the data encoded with the model's tokenizer
//! and chat template, padded batches, the token loss, and validation.

use super::loader::{self, BaseModel};
use super::model::causal_lm_loss;
use super::tokenize::{EncodeOptions, Encoded, IGNORE};
use crate::data::read_examples;
use crate::families::family::Family;
use crate::lora::{ForwardCtx, LoraModel};
use crate::train::{EvalMetrics, Objective, TrainSpec};
use crate::{Error, Result};
use candle_core::{Device, Tensor};
use std::path::Path;

/// A padded batch.
pub struct Batch {
    pub input_ids: Tensor,
    pub attention_mask: Vec<Vec<u32>>,
    pub labels: Vec<Vec<i64>>,
    /// Scored positions (labels shifted by one that are not ignored).
    pub scored: usize,
    pub tokens: usize,
}

/// Right-pads `examples` into one batch.
pub fn make_batch(examples: &[&Encoded], pad_id: u32, device: &Device) -> Result<Batch> {
    let t = examples
        .iter()
        .map(|e| e.input_ids.len())
        .max()
        .unwrap_or(1)
        .max(1);
    let mut ids = Vec::with_capacity(examples.len() * t);
    let mut mask = Vec::new();
    let mut labels = Vec::new();
    let mut scored = 0;
    let mut tokens = 0;
    for e in examples {
        let n = e.input_ids.len();
        tokens += n;
        ids.extend(&e.input_ids);
        ids.extend(std::iter::repeat_n(pad_id, t - n));
        mask.push((0..t).map(|i| u32::from(i < n)).collect());
        let mut l = e.labels.clone();
        l.resize(t, IGNORE);
        scored += l.iter().skip(1).filter(|&&x| x != IGNORE).count();
        labels.push(l);
    }
    Ok(Batch {
        input_ids: Tensor::from_vec(ids, (examples.len(), t), device)?,
        attention_mask: mask,
        labels,
        scored,
        tokens,
    })
}

/// Causal language modelling on a decoder.
pub struct CausalLm {
    pub base: BaseModel,
    train: Vec<Encoded>,
    valid: Option<Vec<Encoded>>,
    device: Device,
    checkpointing: bool,
}

impl CausalLm {
    pub fn load(spec: &TrainSpec) -> Result<Self> {
        let mut base = loader::load_with(&spec.model, &spec.device, spec.base_dtype)?;
        base.model
            .set_dtype(super::DecoderFamily.compute_dtype(spec)?)?;
        let train = encode_file(&base, &spec.data, spec)?;
        let valid = match &spec.validation {
            Some(p) => Some(encode_file(&base, p, spec)?),
            None => None,
        };
        Ok(Self {
            base,
            train,
            valid,
            device: spec.device.clone(),
            checkpointing: spec.gradient_checkpointing,
        })
    }
}

impl Objective for CausalLm {
    type Batch = Batch;
    fn model(&self) -> &dyn LoraModel {
        &self.base.model
    }
    fn model_mut(&mut self) -> &mut dyn LoraModel {
        &mut self.base.model
    }
    fn base_name(&self) -> &str {
        &self.base.name
    }
    fn len(&self) -> usize {
        self.train.len()
    }
    fn batch(&self, idx: &[usize]) -> Result<Batch> {
        let ex: Vec<&Encoded> = idx.iter().map(|&i| &self.train[i]).collect();
        make_batch(&ex, self.base.tokenizer.pad_id, &self.device)
    }
    fn units(b: &Batch) -> usize {
        b.scored
    }
    fn tokens(b: &Batch) -> usize {
        b.tokens
    }
    fn loss_sum(&self, b: &Batch, ctx: &ForwardCtx) -> Result<Tensor> {
        let (nll, _, _) = causal_lm_loss(
            &self.base.model,
            &b.input_ids,
            &b.attention_mask,
            &b.labels,
            ctx,
        )?;
        Ok(nll)
    }
    fn loss_and_grads(
        &self,
        b: &Batch,
        ctx: &ForwardCtx,
        scale: f64,
    ) -> Result<(f64, candle_core::backprop::GradStore)> {
        if !self.checkpointing {
            return crate::train::backward_sum(self.loss_sum(b, ctx)?, scale);
        }
        self.base.model.checkpointed_loss_and_grads(
            &b.input_ids,
            &b.attention_mask,
            &b.labels,
            ctx,
            scale,
        )
    }
    fn evaluate(&self, batch_size: usize, step: u64) -> Result<Option<EvalMetrics>> {
        self.valid
            .as_ref()
            .map(|v| evaluate(&self.base, v, batch_size, step))
            .transpose()
    }
}

fn encode_file(base: &BaseModel, path: &Path, spec: &TrainSpec) -> Result<Vec<Encoded>> {
    let examples = read_examples(path)?;
    let opts = EncodeOptions {
        train_on_inputs: spec.train_on_inputs,
        max_seq_len: Some(spec.max_seq_len),
    };
    examples
        .iter()
        .enumerate()
        .map(|(i, ex)| {
            base.tokenizer
                .encode_example(ex, opts)
                .map_err(|e| Error::Data(format!("{}: example {}: {e}", path.display(), i + 1)))
        })
        .collect()
}

/// Mean token loss and next-token accuracy on a data set.
pub fn evaluate(
    base: &BaseModel,
    set: &[Encoded],
    batch_size: usize,
    step: u64,
) -> Result<EvalMetrics> {
    let ctx = ForwardCtx::eval();
    let (mut nll, mut n, mut correct) = (0f64, 0usize, 0usize);
    for chunk in set.chunks(batch_size) {
        let ex: Vec<&Encoded> = chunk.iter().collect();
        let b = make_batch(&ex, base.tokenizer.pad_id, base.model.device())?;
        let (l, k, c) = causal_lm_loss(
            &base.model,
            &b.input_ids,
            &b.attention_mask,
            &b.labels,
            &ctx,
        )?;
        nll += l.to_scalar::<f32>()? as f64;
        n += k;
        correct += c.unwrap_or(0);
    }
    Ok(EvalMetrics {
        step,
        loss: if n > 0 { nll / n as f64 } else { 0.0 },
        mean_token_accuracy: if n > 0 {
            correct as f64 / n as f64
        } else {
            0.0
        },
        tokens: n as u64,
        accuracy: None,
        macro_f1: None,
    })
}
