//! Causal language modelling on a decoder: the data encoded with the model's tokenizer
//! and chat template, padded batches, the token loss, and validation.

use super::loader::{self, BaseModel};
use super::model::{causal_lm_loss, logps_of_hidden, sequence_logps};
use super::tokenize::{EncodeOptions, Encoded, IGNORE};
use crate::data::{read_examples, Example};
use crate::families::family::Family;
use crate::lora::{ForwardCtx, LoraModel};
use crate::train::{EvalMetrics, Objective, Rewards, TrainSpec};
use crate::{Error, Result};
use candle_core::{Device, Tensor};
use std::path::Path;

/// A padded batch.
pub struct Batch {
    pub input_ids: Tensor,
    /// Per row and token: the id of the sequence the token belongs to (1, 2, ... when a
    /// row packs several examples, 1 otherwise), 0 for padding.
    pub attention_mask: Vec<Vec<u32>>,
    pub labels: Vec<Vec<i64>>,
    /// Scored positions (labels shifted by one that are not ignored).
    pub scored: usize,
    pub tokens: usize,
}

/// Right-pads `examples` into one batch, a row each.
pub fn make_batch(examples: &[&Encoded], pad_id: u32, device: &Device) -> Result<Batch> {
    let rows: Vec<Vec<&Encoded>> = examples.iter().map(|e| vec![*e]).collect();
    make_rows(&rows, pad_id, device)
}

/// Right-pads rows of examples into one batch, each row's examples back to back. The
/// first token of every example after a row's first is not scored: the token before it
/// belongs to another example, and unpacked it is never a target either. So the summed
/// loss is the unpacked batches' to rounding, given the model keeps the examples apart
/// (`attention_mask`'s sequence ids: block-diagonal causal attention, positions restarting).
pub fn make_rows(rows: &[Vec<&Encoded>], pad_id: u32, device: &Device) -> Result<Batch> {
    let len = |r: &Vec<&Encoded>| r.iter().map(|e| e.input_ids.len()).sum::<usize>();
    let t = rows.iter().map(len).max().unwrap_or(1).max(1);
    let mut ids = Vec::with_capacity(rows.len() * t);
    let mut mask = Vec::with_capacity(rows.len());
    let mut labels = Vec::with_capacity(rows.len());
    let mut scored = 0;
    let mut tokens = 0;
    for row in rows {
        let mut m = Vec::with_capacity(t);
        let mut l = Vec::with_capacity(t);
        for (k, e) in row.iter().enumerate() {
            ids.extend(&e.input_ids);
            m.extend(std::iter::repeat_n(k as u32 + 1, e.input_ids.len()));
            let first = l.len();
            l.extend(&e.labels);
            if k > 0 && first < l.len() {
                l[first] = IGNORE;
            }
        }
        let n = m.len();
        tokens += n;
        ids.extend(std::iter::repeat_n(pad_id, t - n));
        m.resize(t, 0);
        l.resize(t, IGNORE);
        scored += l.iter().skip(1).filter(|&&x| x != IGNORE).count();
        mask.push(m);
        labels.push(l);
    }
    Ok(Batch {
        input_ids: Tensor::from_vec(ids, (rows.len(), t), device)?,
        attention_mask: mask,
        labels,
        scored,
        tokens,
    })
}

/// Groups examples of the given lengths into rows of at most `capacity` tokens, best fit
/// decreasing (TRL's `bfd`): longest first, each into the fullest row it still fits, a new
/// row when none has room. Deterministic; every example lands in exactly one row, and
/// none is split (each is at most `capacity` long after truncation).
pub fn pack(lengths: &[usize], capacity: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(lengths[i]), i));
    let mut rows: Vec<Vec<usize>> = Vec::new();
    // (room left, row): the first entry with room >= len is the best fit.
    let mut room = std::collections::BTreeSet::new();
    for i in order {
        let n = lengths[i].min(capacity);
        match room.range((n, 0)..).next().copied() {
            Some((left, r)) => {
                room.remove(&(left, r));
                rows[r].push(i);
                room.insert((left - n, r));
            }
            None => {
                rows.push(vec![i]);
                room.insert((capacity - n, rows.len() - 1));
            }
        }
    }
    rows
}

/// Causal language modelling on a decoder.
pub struct CausalLm {
    pub base: BaseModel,
    train: Vec<Encoded>,
    /// With packing, the rows of examples ([`pack`]) that the loop batches and shuffles;
    /// without, every example is a row of its own.
    rows: Option<Packing>,
    valid: Option<Vec<Encoded>>,
    device: Device,
    checkpointing: bool,
}

/// How a packed run groups its examples.
struct Packing {
    capacity: usize,
    rows: Vec<Vec<usize>>,
}

/// The run's base model, in its compute dtype.
fn load_base(spec: &TrainSpec) -> Result<BaseModel> {
    let mut base = loader::load_with(&spec.model, &spec.device, spec.base_dtype)?;
    base.model
        .set_dtype(super::DecoderFamily.compute_dtype(spec)?)?;
    Ok(base)
}

impl CausalLm {
    pub fn load(spec: &TrainSpec) -> Result<Self> {
        let base = load_base(spec)?;
        let train = encode_file(&base, &spec.data, spec)?;
        let valid = spec
            .validation
            .as_deref()
            .map(|p| encode_file(&base, p, spec))
            .transpose()?;
        let rows = spec.packing.then(|| {
            // Positions restart per example: a row may hold more tokens than the model
            // has positions, as long as no example does.
            let capacity = spec.max_seq_len;
            let lengths: Vec<usize> = train.iter().map(|e| e.input_ids.len()).collect();
            Packing {
                capacity,
                rows: pack(&lengths, capacity),
            }
        });
        Ok(Self {
            base,
            train,
            rows,
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
    fn save_extra(&self, dir: &Path) -> Result<()> {
        super::export::save_lora_gguf(&self.base.model.cfg, dir);
        Ok(())
    }
    fn len(&self) -> usize {
        self.rows
            .as_ref()
            .map_or(self.train.len(), |p| p.rows.len())
    }
    fn examples(&self) -> usize {
        self.train.len()
    }
    fn packed_rows(&self) -> Option<usize> {
        self.rows.as_ref().map(|p| p.rows.len())
    }
    fn batch(&self, idx: &[usize]) -> Result<Batch> {
        let pad = self.base.tokenizer.pad_id;
        match &self.rows {
            Some(p) => {
                let rows: Vec<Vec<&Encoded>> = idx
                    .iter()
                    .map(|&r| p.rows[r].iter().map(|&i| &self.train[i]).collect())
                    .collect();
                make_rows(&rows, pad, &self.device)
            }
            None => {
                let ex: Vec<&Encoded> = idx.iter().map(|&i| &self.train[i]).collect();
                make_batch(&ex, pad, &self.device)
            }
        }
    }
    fn fingerprint(&self) -> Option<String> {
        Some(match &self.rows {
            Some(p) => format!("packing into rows of {} tokens", p.capacity),
            None => "no packing".into(),
        })
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
        reward_margin: None,
        reward_accuracy: None,
        wer: None,
    })
}

/// A batch of preference pairs: the chosen sequences, then the rejected ones, padded
/// together.
pub struct PairBatch {
    seqs: Batch,
    pairs: usize,
}

/// DPO (TRL's sigmoid loss) on preference pairs. The reference model is the same base
/// with the adapters switched off, so no second copy of the weights is held; with an
/// initial adapter the reference is the base without it (TRL's default with a PEFT
/// model).
pub struct Dpo {
    pub base: BaseModel,
    beta: f64,
    train: Vec<(Encoded, Encoded)>,
    valid: Option<Vec<(Encoded, Encoded)>>,
    device: Device,
    checkpointing: bool,
    /// Summed margins, pairs with a positive one, and pairs, since `take_rewards`.
    seen: std::sync::Mutex<(f64, usize, usize)>,
}

impl Dpo {
    pub fn load(spec: &TrainSpec, beta: f64) -> Result<Self> {
        let base = load_base(spec)?;
        let train = encode_pairs(&base, &spec.data, spec)?;
        let valid = spec
            .validation
            .as_deref()
            .map(|p| encode_pairs(&base, p, spec))
            .transpose()?;
        Ok(Self {
            base,
            beta,
            train,
            valid,
            device: spec.device.clone(),
            checkpointing: spec.gradient_checkpointing,
            seen: Default::default(),
        })
    }

    fn pair_batch(&self, pairs: &[&(Encoded, Encoded)]) -> Result<PairBatch> {
        let seqs: Vec<&Encoded> = pairs
            .iter()
            .map(|p| &p.0)
            .chain(pairs.iter().map(|p| &p.1))
            .collect();
        Ok(PairBatch {
            seqs: make_batch(&seqs, self.base.tokenizer.pad_id, &self.device)?,
            pairs: pairs.len(),
        })
    }

    /// Per pair `beta·((π_c − ref_c) − (π_r − ref_r))` under `ctx` (differentiable when
    /// it trains), and how many of both replies' tokens the policy's argmax gets right
    /// (eval).
    fn margins(&self, b: &PairBatch, ctx: &ForwardCtx) -> Result<(Tensor, Option<usize>)> {
        let s = &b.seqs;
        let (policy, correct) = sequence_logps(
            &self.base.model,
            &s.input_ids,
            &s.attention_mask,
            &s.labels,
            ctx,
        )?;
        Ok((self.margins_of(b, &policy, &self.reference(b)?)?, correct))
    }

    /// The reference model's summed log-probabilities: the base with no adapter.
    fn reference(&self, b: &PairBatch) -> Result<Tensor> {
        let s = &b.seqs;
        let (r, _) = sequence_logps(
            &self.base.model,
            &s.input_ids,
            &s.attention_mask,
            &s.labels,
            &ForwardCtx::reference(),
        )?;
        Ok(r.detach())
    }

    fn margins_of(&self, b: &PairBatch, policy: &Tensor, reference: &Tensor) -> Result<Tensor> {
        let ratio = (policy - reference)?;
        let p = b.pairs;
        Ok(((ratio.narrow(0, 0, p)? - ratio.narrow(0, p, p)?)? * self.beta)?)
    }

    /// The batch's summed loss from its margins, counting the margins for the step's
    /// rewards.
    fn loss_of(&self, z: &Tensor) -> Result<Tensor> {
        let (sum, pos, n) = tally(z)?;
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.0 += sum;
        seen.1 += pos;
        seen.2 += n;
        dpo_loss_sum(z)
    }
}

/// The summed margins, how many are positive, and how many there are.
fn tally(z: &Tensor) -> Result<(f64, usize, usize)> {
    let zs: Vec<f32> = z.to_vec1()?;
    Ok((
        zs.iter().map(|&x| x as f64).sum(),
        zs.iter().filter(|&&x| x > 0.0).count(),
        zs.len(),
    ))
}

/// `-log σ(z) = log(1 + e^{-z})` summed. Below `z = -30` the log term is `-z` to f32's
/// precision, so `z` is held there and the rest added back linearly: no exponential
/// overflows, and the gradient is `-σ(-z)` everywhere. (The textbook
/// `relu(-z) + log(1 + e^{-|z|})` has kinks at 0 whose one-sided derivatives add up to
/// three times the true gradient exactly where a fresh adapter starts, `z = 0`.)
fn dpo_loss_sum(z: &Tensor) -> Result<Tensor> {
    let held = z.maximum(-30f64)?;
    let soft = ((held.neg()?.exp()? + 1.0)?.log()? + (&held - z)?)?;
    Ok(soft.sum_all()?)
}

impl Objective for Dpo {
    type Batch = PairBatch;
    fn model(&self) -> &dyn LoraModel {
        &self.base.model
    }
    fn model_mut(&mut self) -> &mut dyn LoraModel {
        &mut self.base.model
    }
    fn base_name(&self) -> &str {
        &self.base.name
    }
    fn save_extra(&self, dir: &Path) -> Result<()> {
        super::export::save_lora_gguf(&self.base.model.cfg, dir);
        Ok(())
    }
    fn len(&self) -> usize {
        self.train.len()
    }
    fn batch(&self, idx: &[usize]) -> Result<PairBatch> {
        let pairs: Vec<&(Encoded, Encoded)> = idx.iter().map(|&i| &self.train[i]).collect();
        self.pair_batch(&pairs)
    }
    fn units(b: &PairBatch) -> usize {
        b.pairs
    }
    fn tokens(b: &PairBatch) -> usize {
        b.seqs.tokens
    }
    fn loss_sum(&self, b: &PairBatch, ctx: &ForwardCtx) -> Result<Tensor> {
        let (z, _) = self.margins(b, ctx)?;
        self.loss_of(&z)
    }
    fn loss_and_grads(
        &self,
        b: &PairBatch,
        ctx: &ForwardCtx,
        scale: f64,
    ) -> Result<(f64, candle_core::backprop::GradStore)> {
        if !self.checkpointing {
            return crate::train::backward_sum(self.loss_sum(b, ctx)?, scale);
        }
        let reference = self.reference(b)?;
        let s = &b.seqs;
        let (n, t) = s.input_ids.dims2()?;
        self.base
            .model
            .checkpointed_grads(&s.input_ids, &s.attention_mask, ctx, scale, &|h| {
                let (policy, _) = logps_of_hidden(&self.base.model, h, n, t, &s.labels, ctx)?;
                self.loss_of(&self.margins_of(b, &policy, &reference)?)
            })
    }
    fn take_rewards(&self) -> Option<Rewards> {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let (sum, pos, n) = std::mem::take(&mut *seen);
        (n > 0).then(|| Rewards {
            margin: sum / n as f64,
            accuracy: pos as f64 / n as f64,
        })
    }
    fn evaluate(&self, batch_size: usize, step: u64) -> Result<Option<EvalMetrics>> {
        let Some(valid) = &self.valid else {
            return Ok(None);
        };
        let ctx = ForwardCtx::eval();
        let (mut loss, mut margin, mut pos, mut correct, mut scored) = (0f64, 0f64, 0, 0, 0);
        for chunk in valid.chunks(batch_size) {
            let pairs: Vec<&(Encoded, Encoded)> = chunk.iter().collect();
            let b = self.pair_batch(&pairs)?;
            let (z, c) = self.margins(&b, &ctx)?;
            loss += dpo_loss_sum(&z)?.to_scalar::<f32>()? as f64;
            let (m, p, _) = tally(&z)?;
            margin += m;
            pos += p;
            correct += c.unwrap_or(0);
            scored += b.seqs.scored;
        }
        let n = valid.len().max(1) as f64;
        Ok(Some(EvalMetrics {
            step,
            loss: loss / n,
            mean_token_accuracy: if scored > 0 {
                correct as f64 / scored as f64
            } else {
                0.0
            },
            tokens: scored as u64,
            accuracy: None,
            macro_f1: None,
            reward_margin: Some(margin / n),
            reward_accuracy: Some(pos as f64 / n),
            wer: None,
        }))
    }
    fn fingerprint(&self) -> Option<String> {
        Some(format!("method dpo, beta {}", self.beta))
    }
}

fn encode_pairs(
    base: &BaseModel,
    path: &Path,
    spec: &TrainSpec,
) -> Result<Vec<(Encoded, Encoded)>> {
    read_examples(path)?
        .iter()
        .enumerate()
        .map(|(i, ex)| {
            let at = |e: Error| Error::Data(format!("{}: example {}: {e}", path.display(), i + 1));
            match ex {
                Example::Preference(p) => base
                    .tokenizer
                    .encode_preference(p, Some(spec.max_seq_len))
                    .map_err(at),
                other => Err(at(Error::Data(format!(
                    "method dpo trains on preference pairs; this example is {}",
                    other.format().as_str()
                )))),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::dpo_loss_sum;
    use candle_core::{Device, Tensor, Var};

    /// `-log σ(z)` and its gradient `-σ(-z)`, at the kink-prone 0 and far out on both
    /// sides, where a naive formula overflows.
    #[test]
    fn dpo_loss_is_smooth_and_finite() {
        let zs = [0.0f32, 1.5, -1.5, 200.0, -200.0];
        let z = Var::from_tensor(&Tensor::new(&zs, &Device::Cpu).unwrap()).unwrap();
        let loss = dpo_loss_sum(z.as_tensor()).unwrap();
        let grads = loss.backward().unwrap();
        let g: Vec<f32> = grads.get(z.as_tensor()).unwrap().to_vec1().unwrap();
        let want_loss: f64 = zs.iter().map(|&z| (1.0 + (-z as f64).exp()).ln()).sum();
        let got = loss.to_scalar::<f32>().unwrap() as f64;
        assert!(
            (got - want_loss).abs() < 1e-4 * want_loss,
            "{got} vs {want_loss}"
        );
        for (z, g) in zs.iter().zip(g) {
            let want = -1.0 / (1.0 + (*z as f64).exp());
            assert!((g as f64 - want).abs() < 1e-6, "d/dz at {z}: {g} vs {want}");
        }
    }
}
