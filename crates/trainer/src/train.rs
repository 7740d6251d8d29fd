//! The training loop: batches, gradient accumulation, clipping, AdamW, schedules,
//! validation, checkpoints and resume. Architecture-free apart from the loss call.

use crate::data::read_examples;
use crate::loader::{self, BaseModel};
use crate::lora::{self, AdapterMeta, ForwardCtx, LoraConfig};
use crate::model::causal_lm_loss;
use crate::optim::{clip_grad_norm, lr_at, AdamW, AdamWConfig, Scheduler};
use crate::tokenize::{EncodeOptions, Encoded, IGNORE};
use crate::{Error, Result};
use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// Everything a run needs.
#[derive(Debug, Clone)]
pub struct TrainSpec {
    pub model: PathBuf,
    pub data: PathBuf,
    pub validation: Option<PathBuf>,
    pub out: PathBuf,
    pub lora: LoraConfig,
    pub epochs: u64,
    pub max_steps: Option<u64>,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub lr: f64,
    pub scheduler: Scheduler,
    pub warmup_steps: Option<u64>,
    pub warmup_ratio: f64,
    pub adamw: AdamWConfig,
    /// 0 turns clipping off.
    pub max_grad_norm: f64,
    pub max_seq_len: usize,
    pub seed: u64,
    pub shuffle: bool,
    pub train_on_inputs: bool,
    pub init_adapter: Option<PathBuf>,
    pub eval_every: Option<u64>,
    pub checkpoint_every: Option<u64>,
    /// A checkpoint folder, or a run's output folder (its latest checkpoint).
    pub resume: Option<PathBuf>,
    pub device: Device,
    /// When set, the run writes a checkpoint at the current step and stops with
    /// [`Error::Paused`], so that `resume` can continue it exactly.
    pub pause: Option<std::sync::Arc<AtomicBool>>,
}

impl TrainSpec {
    /// Defaults that match PEFT/transformers' usual LoRA recipe.
    pub fn new(model: PathBuf, data: PathBuf, out: PathBuf) -> Self {
        Self {
            model,
            data,
            validation: None,
            out,
            lora: LoraConfig::default(),
            epochs: 1,
            max_steps: None,
            batch_size: 4,
            grad_accum: 1,
            lr: 2e-4,
            scheduler: Scheduler::Linear,
            warmup_steps: None,
            warmup_ratio: 0.0,
            adamw: AdamWConfig::default(),
            max_grad_norm: 1.0,
            max_seq_len: 1024,
            seed: 42,
            shuffle: true,
            train_on_inputs: false,
            init_adapter: None,
            eval_every: None,
            checkpoint_every: None,
            resume: None,
            device: Device::Cpu,
            pause: None,
        }
    }

    pub fn validate(&self) -> Result<()> {
        self.lora.validate()?;
        let bad = |m: &str| Err(Error::Config(m.to_string()));
        if self.batch_size == 0 {
            return bad("batch_size must be at least 1");
        }
        if self.grad_accum == 0 {
            return bad("grad_accum must be at least 1");
        }
        if self.epochs == 0 && self.max_steps.is_none() {
            return bad("epochs must be at least 1 (or give max_steps)");
        }
        if self.max_steps == Some(0) {
            return bad("max_steps must be at least 1");
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return bad("learning rate must be positive");
        }
        if !(0.0..1.0).contains(&self.warmup_ratio) {
            return bad("warmup_ratio must be in [0, 1)");
        }
        if self.max_seq_len < 2 {
            return bad("max_seq_len must be at least 2");
        }
        if self.max_grad_norm < 0.0 || self.adamw.weight_decay < 0.0 {
            return bad("max_grad_norm and weight_decay must not be negative");
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StepMetrics {
    pub step: u64,
    pub total_steps: u64,
    pub epoch: f64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    /// Tokens (not padding) processed so far.
    pub tokens: u64,
    pub tokens_per_second: f64,
    pub elapsed_seconds: f64,
    pub eta_seconds: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EvalMetrics {
    pub step: u64,
    pub loss: f64,
    pub mean_token_accuracy: f64,
    pub tokens: u64,
}

/// What the loop reports as it goes.
#[derive(Debug, Clone)]
pub enum TrainEvent {
    Started {
        total_steps: u64,
        examples: usize,
        resumed_from: Option<u64>,
    },
    Step(StepMetrics),
    Eval(EvalMetrics),
    Checkpoint {
        step: u64,
        dir: PathBuf,
    },
}

#[derive(Debug, Clone)]
pub struct TrainOutcome {
    pub steps: u64,
    pub last: Option<StepMetrics>,
    pub eval: Option<EvalMetrics>,
    pub adapter_dir: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct TrainerState {
    step: u64,
    total_steps: u64,
    seed: u64,
    examples: usize,
    batch_size: usize,
    grad_accum: usize,
    tokens: u64,
}

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

/// Micro-batches of one epoch, in example indices.
fn epoch_batches(n: usize, batch: usize, shuffle: bool, seed: u64, epoch: u64) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..n).collect();
    if shuffle {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed_0000_0000_0000 ^ epoch);
        order.shuffle(&mut rng);
    }
    order.chunks(batch).map(|c| c.to_vec()).collect()
}

/// Finds the checkpoint folder for `--resume`: the folder itself, or the newest under `out/checkpoints`.
pub fn resolve_checkpoint(p: &Path) -> Result<PathBuf> {
    if p.join("trainer_state.json").is_file() {
        return Ok(p.to_path_buf());
    }
    let dir = p.join("checkpoints");
    let mut best: Option<(u64, PathBuf)> = None;
    for e in std::fs::read_dir(&dir)
        .map_err(|e| Error::io(&dir, e))?
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(step) = name
            .strip_prefix("checkpoint-")
            .and_then(|s| s.parse::<u64>().ok())
        {
            if e.path().join("trainer_state.json").is_file()
                && best.as_ref().is_none_or(|(b, _)| step > *b)
            {
                best = Some((step, e.path()));
            }
        }
    }
    best.map(|(_, p)| p)
        .ok_or_else(|| Error::Checkpoint(format!("no checkpoint under {}", p.display())))
}

/// Runs a whole training job.
pub fn train(
    spec: &TrainSpec,
    cancel: &AtomicBool,
    on_event: &mut dyn FnMut(&TrainEvent),
) -> Result<TrainOutcome> {
    spec.validate()?;
    if spec.device.is_cpu() {
        crate::device::tune_allocator_for_training();
    }
    let mut base = loader::load(&spec.model, &spec.device)?;
    let resume_dir = spec.resume.as_deref().map(resolve_checkpoint).transpose()?;
    let lora_cfg = match (&resume_dir, &spec.init_adapter) {
        (Some(d), _) => lora::read_adapter_config(d)?,
        (None, Some(d)) => {
            let mut c = lora::read_adapter_config(d)?;
            c.dropout = spec.lora.dropout;
            c
        }
        _ => spec.lora.clone(),
    };
    let resolved = lora::attach(&mut base.model, &lora_cfg, spec.seed)?;
    if let Some(d) = resume_dir.as_deref().or(spec.init_adapter.as_deref()) {
        lora::load_adapter_weights(&base.model, d)?;
    }
    let train_set = encode_file(&base, &spec.data, spec)?;
    let val_set = match &spec.validation {
        Some(p) => Some(encode_file(&base, p, spec)?),
        None => None,
    };
    let n_batches = train_set.len().div_ceil(spec.batch_size) as u64;
    let steps_per_epoch = n_batches.div_ceil(spec.grad_accum as u64);
    let total = spec.max_steps.unwrap_or(spec.epochs * steps_per_epoch);
    let warmup = spec
        .warmup_steps
        .unwrap_or((spec.warmup_ratio * total as f64).ceil() as u64);

    let params = lora::params(&base.model);
    let mut opt = AdamW::new(params.clone(), spec.adamw)?;
    let mut start_step = 0u64;
    let mut tokens_total = 0u64;
    if let Some(d) = &resume_dir {
        opt.load(&d.join("optimizer.safetensors"))?;
        let st: TrainerState = serde_json::from_str(
            &std::fs::read_to_string(d.join("trainer_state.json")).map_err(|e| Error::io(d, e))?,
        )?;
        if st.examples != train_set.len()
            || st.batch_size != spec.batch_size
            || st.grad_accum != spec.grad_accum
        {
            return Err(Error::Checkpoint(
                "the checkpoint was made with other data or batch settings".into(),
            ));
        }
        start_step = st.step;
        tokens_total = st.tokens;
    }
    let meta = AdapterMeta {
        base_model_name_or_path: base.name.clone(),
        task_type: "CAUSAL_LM".into(),
        target_modules: lora_cfg.targets.to_peft(&resolved),
    };
    on_event(&TrainEvent::Started {
        total_steps: total,
        examples: train_set.len(),
        resumed_from: resume_dir.as_ref().map(|_| start_step),
    });

    let started = Instant::now();
    let mut tokens_this_run = 0u64;
    let mut last: Option<StepMetrics> = None;
    let mut last_eval = None;
    let mut cached_epoch: Option<(u64, Vec<Vec<usize>>)> = None;
    for step in start_step..total {
        if cancel.load(Ordering::Relaxed) {
            return Err(Error::Cancelled);
        }
        if spec
            .pause
            .as_ref()
            .is_some_and(|p| p.load(Ordering::Relaxed))
        {
            if step > start_step {
                let dir = write_checkpoint(
                    &base,
                    &lora_cfg,
                    &meta,
                    &opt,
                    spec,
                    step,
                    total,
                    train_set.len(),
                    tokens_total,
                )?;
                on_event(&TrainEvent::Checkpoint { step, dir });
            }
            return Err(Error::Paused(step));
        }
        let epoch = step / steps_per_epoch;
        let k = step % steps_per_epoch;
        if cached_epoch.as_ref().is_none_or(|(e, _)| *e != epoch) {
            cached_epoch = Some((
                epoch,
                epoch_batches(
                    train_set.len(),
                    spec.batch_size,
                    spec.shuffle,
                    spec.seed,
                    epoch,
                ),
            ));
        }
        let batches = &cached_epoch.as_ref().expect("set above").1;
        let lo = (k as usize) * spec.grad_accum;
        let hi = (lo + spec.grad_accum).min(batches.len());
        let micro: Vec<Batch> = batches[lo..hi]
            .iter()
            .map(|idx| {
                let ex: Vec<&Encoded> = idx.iter().map(|&i| &train_set[i]).collect();
                make_batch(&ex, base.tokenizer.pad_id, &spec.device)
            })
            .collect::<Result<_>>()?;
        let scored: usize = micro.iter().map(|b| b.scored).sum();
        let step_tokens: usize = micro.iter().map(|b| b.tokens).sum();
        // Dropout masks come from a per-step stream so a resumed run draws the same ones.
        let ctx = ForwardCtx::train(ChaCha8Rng::seed_from_u64(
            spec.seed
                .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                .wrapping_add(step),
        ));
        let mut acc: Option<GradStore> = None;
        let mut loss_sum = 0f64;
        for b in &micro {
            if b.scored == 0 {
                continue;
            }
            let (nll, _, _) = causal_lm_loss(
                &base.model,
                &b.input_ids,
                &b.attention_mask,
                &b.labels,
                &ctx,
            )?;
            loss_sum += nll.to_scalar::<f32>()? as f64;
            let loss = (nll / scored as f64)?;
            let grads = loss.backward()?;
            acc = Some(match acc {
                None => {
                    let mut g = GradStore::default();
                    for (name, p) in &params {
                        let gp = grads.get(p.as_tensor()).ok_or_else(|| {
                            Error::Model(format!(
                                "no gradient reached {name}: an op without a backward pass is in the graph"
                            ))
                        })?;
                        g.insert(p.as_tensor(), gp.clone());
                    }
                    g
                }
                Some(mut g) => {
                    for (_, p) in &params {
                        if let (Some(a), Some(n)) = (g.get(p.as_tensor()), grads.get(p.as_tensor()))
                        {
                            let s = (a + n)?;
                            g.insert(p.as_tensor(), s);
                        }
                    }
                    g
                }
            });
        }
        let lr = lr_at(spec.scheduler, spec.lr, step, warmup, total);
        let mut grad_norm = 0.0;
        if let Some(g) = acc {
            let (g, norm) = clip_grad_norm(g, &params, spec.max_grad_norm)?;
            grad_norm = norm;
            opt.step(&g, lr)?;
        }
        let loss = if scored > 0 {
            loss_sum / scored as f64
        } else {
            0.0
        };
        if !loss.is_finite() {
            return Err(Error::Model(format!(
                "loss became {loss} at step {}",
                step + 1
            )));
        }
        tokens_total += step_tokens as u64;
        tokens_this_run += step_tokens as u64;
        let elapsed = started.elapsed().as_secs_f64();
        let done = step + 1 - start_step;
        let m = StepMetrics {
            step: step + 1,
            total_steps: total,
            epoch: step as f64 / steps_per_epoch as f64 + 1.0 / steps_per_epoch as f64,
            loss,
            lr,
            grad_norm,
            tokens: tokens_total,
            tokens_per_second: tokens_this_run as f64 / elapsed.max(1e-9),
            elapsed_seconds: elapsed,
            eta_seconds: elapsed / done as f64 * (total - step - 1) as f64,
        };
        on_event(&TrainEvent::Step(m.clone()));
        last = Some(m);
        let s = step + 1;
        if let (Some(every), Some(vs)) = (spec.eval_every, &val_set) {
            if every > 0 && s % every == 0 && s != total {
                let e = evaluate(&base, vs, spec.batch_size, s)?;
                on_event(&TrainEvent::Eval(e.clone()));
                last_eval = Some(e);
            }
        }
        if let Some(every) = spec.checkpoint_every {
            if every > 0 && s % every == 0 && s != total {
                let dir = write_checkpoint(
                    &base,
                    &lora_cfg,
                    &meta,
                    &opt,
                    spec,
                    s,
                    total,
                    train_set.len(),
                    tokens_total,
                )?;
                on_event(&TrainEvent::Checkpoint { step: s, dir });
            }
        }
    }
    if let Some(vs) = &val_set {
        let e = evaluate(&base, vs, spec.batch_size, total)?;
        on_event(&TrainEvent::Eval(e.clone()));
        last_eval = Some(e);
    }
    lora::save_adapter(&base.model, &lora_cfg, &meta, &spec.out)?;
    Ok(TrainOutcome {
        steps: total,
        last,
        eval: last_eval,
        adapter_dir: spec.out.clone(),
    })
}

#[allow(clippy::too_many_arguments)]
fn write_checkpoint(
    base: &BaseModel,
    cfg: &LoraConfig,
    meta: &AdapterMeta,
    opt: &AdamW,
    spec: &TrainSpec,
    step: u64,
    total: u64,
    examples: usize,
    tokens: u64,
) -> Result<PathBuf> {
    let root = spec.out.join("checkpoints");
    let dir = root.join(format!("checkpoint-{step}"));
    let tmp = root.join(format!(".checkpoint-{step}.tmp"));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    lora::save_adapter(&base.model, cfg, meta, &tmp)?;
    opt.save(&tmp.join("optimizer.safetensors"))?;
    let st = TrainerState {
        step,
        total_steps: total,
        seed: spec.seed,
        examples,
        batch_size: spec.batch_size,
        grad_accum: spec.grad_accum,
        tokens,
    };
    let p = tmp.join("trainer_state.json");
    std::fs::write(&p, serde_json::to_string_pretty(&st)?).map_err(|e| Error::io(&p, e))?;
    let _ = std::fs::remove_dir_all(&dir);
    // The rename makes a checkpoint appear whole or not at all.
    std::fs::rename(&tmp, &dir).map_err(|e| Error::io(&dir, e))?;
    Ok(dir)
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
    })
}
