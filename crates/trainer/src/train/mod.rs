//! The training loop: batches, gradient accumulation, clipping, AdamW, schedules,
//! validation, checkpoints and resume. One loop for every model family: a family
//! brings its model, its batches and its loss as an [`Objective`].

pub mod optim;

use crate::lora::{self, AdapterMeta, ForwardCtx, LoraConfig, LoraModel};
use crate::train::optim::{clip_grad_norm, lr_at, AdamW, AdamWConfig, Scheduler};
use crate::{Error, Result};
use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// What a run trains the model for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    /// Next-token prediction on decoder LLMs.
    #[default]
    CausalLm,
    /// A label per text (or text pair) on BERT-style encoders.
    SequenceClassification,
    /// LoRA on a Stable Diffusion UNet from captioned images.
    TextToImage,
    /// A label per image on CNN classifiers (ResNet).
    ImageClassification,
    /// Transcripts of audio clips on Whisper.
    SpeechRecognition,
}

impl Task {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "causal_lm" => Ok(Task::CausalLm),
            "sequence_classification" => Ok(Task::SequenceClassification),
            "text_to_image" => Ok(Task::TextToImage),
            "image_classification" => Ok(Task::ImageClassification),
            "speech_recognition" => Ok(Task::SpeechRecognition),
            _ => Err(Error::Config(format!(
                "task \"{s}\": expected causal_lm, sequence_classification, text_to_image, image_classification or speech_recognition"
            ))),
        }
    }
    pub fn as_str(&self) -> &'static str {
        match self {
            Task::CausalLm => "causal_lm",
            Task::SequenceClassification => "sequence_classification",
            Task::TextToImage => "text_to_image",
            Task::ImageClassification => "image_classification",
            Task::SpeechRecognition => "speech_recognition",
        }
    }
}

/// TRL's and OpenAI's default DPO `beta`.
pub const DEFAULT_DPO_BETA: f64 = 0.1;

/// How a causal LM run learns from its data.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Method {
    /// The next-token loss on the scored tokens (chat, completions, text).
    #[default]
    Supervised,
    /// Direct preference optimisation (TRL's sigmoid loss) on preference pairs, against
    /// the base with its adapter switched off as the reference model.
    Dpo { beta: f64 },
}

impl Method {
    pub fn name(&self) -> &'static str {
        match self {
            Method::Supervised => "supervised",
            Method::Dpo { .. } => "dpo",
        }
    }
}

/// A step's (or a validation pass's) DPO rewards: the mean of
/// `beta·((π_c − ref_c) − (π_r − ref_r))` over its pairs, and the share of pairs where
/// it is positive.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Rewards {
    pub margin: f64,
    pub accuracy: f64,
}

/// Everything a run needs.
#[derive(Debug, Clone)]
pub struct TrainSpec {
    pub task: Task,
    /// Supervised or DPO (causal LM only).
    pub method: Method,
    /// Whether the base model's own dropout (encoders' hidden/attention dropout) is on
    /// in training, as transformers has it; off for exact comparisons.
    pub model_dropout: bool,
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
    /// Causal LM (supervised): pack examples into rows of `max_seq_len` tokens that keep
    /// them apart (see `families::decoder::objective::pack`); the loop then shuffles and
    /// batches rows, `batch_size` rows a micro-batch. Off here, as in PEFT/TRL; the CLI
    /// and the API turn it on by default.
    pub packing: bool,
    pub seed: u64,
    pub shuffle: bool,
    pub train_on_inputs: bool,
    pub init_adapter: Option<PathBuf>,
    pub eval_every: Option<u64>,
    pub checkpoint_every: Option<u64>,
    /// A checkpoint folder, or a run's output folder (its latest checkpoint).
    pub resume: Option<PathBuf>,
    pub device: Device,
    /// The compute precision (`None`: the family's default for the device, see
    /// `Family::compute_dtype`).
    pub dtype: Option<candle_core::DType>,
    /// How the frozen base is kept in memory (packed bases expand per product).
    pub base_dtype: crate::device::BaseDtype,
    /// Keep only each layer's input through the forward pass and recompute the layer in
    /// the backward one (families that support it; the others ignore it).
    pub gradient_checkpointing: bool,
    /// The family's own settings (a classifier's problem type, an image run's
    /// resolution), made by `Family::options`.
    pub options: FamilyOptions,
    /// When set, the run writes a checkpoint at the current step and stops with
    /// [`Error::Paused`], so that `resume` can continue it exactly.
    pub pause: Option<std::sync::Arc<AtomicBool>>,
}

/// A family's own settings, carried through the loop untouched: the family that made
/// them ([`crate::families::Family::options`]) reads them back by their type.
#[derive(Clone, Debug, Default)]
pub struct FamilyOptions(Option<Arc<dyn Options>>);

/// What a family's settings type is: anything debuggable and shareable.
pub trait Options: std::fmt::Debug + Send + Sync + 'static {
    fn as_any(&self) -> &dyn std::any::Any;
}

impl<T: std::fmt::Debug + Send + Sync + 'static> Options for T {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

impl FamilyOptions {
    pub fn new<T: Options>(options: T) -> Self {
        FamilyOptions(Some(Arc::new(options)))
    }

    /// The settings, if they are a `T`.
    pub fn get<T: Options>(&self) -> Option<&T> {
        self.0.as_deref().and_then(|o| o.as_any().downcast_ref())
    }
}

impl TrainSpec {
    /// Defaults that match PEFT/transformers' usual LoRA recipe.
    pub fn new(model: PathBuf, data: PathBuf, out: PathBuf) -> Self {
        Self {
            task: Task::CausalLm,
            method: Method::Supervised,
            model_dropout: true,
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
            packing: false,
            seed: 42,
            shuffle: true,
            train_on_inputs: false,
            init_adapter: None,
            eval_every: None,
            checkpoint_every: None,
            resume: None,
            device: Device::Cpu,
            dtype: None,
            base_dtype: crate::device::BaseDtype::Auto,
            gradient_checkpointing: false,
            options: FamilyOptions::default(),
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
        if let Method::Dpo { beta } = self.method {
            if self.task != Task::CausalLm {
                return bad("method dpo trains causal_lm models only");
            }
            if !(beta > 0.0 && beta.is_finite()) {
                return bad("beta must be positive");
            }
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
    /// DPO: the step's mean reward margin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reward_margin: Option<f64>,
    /// DPO: the share of the step's pairs with a positive margin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reward_accuracy: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EvalMetrics {
    pub step: u64,
    pub loss: f64,
    /// Next-token accuracy (causal LM), or example accuracy (classification).
    pub mean_token_accuracy: f64,
    /// Scored tokens (causal LM) or examples (classification).
    pub tokens: u64,
    /// Classification: share of examples whose predicted label is right (multi-label:
    /// every label right).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accuracy: Option<f64>,
    /// Classification: unweighted mean of the per-class F1 scores.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub macro_f1: Option<f64>,
    /// DPO: the mean reward margin over the validation pairs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reward_margin: Option<f64>,
    /// DPO: the share of validation pairs with a positive margin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reward_accuracy: Option<f64>,
    /// Speech recognition: the word error rate of greedy transcriptions, a fraction
    /// (see `families::speech::transcribe`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wer: Option<f64>,
}

/// What the loop reports as it goes.
#[derive(Debug, Clone)]
pub enum TrainEvent {
    Started {
        total_steps: u64,
        examples: usize,
        /// With packing: the rows the examples were packed into, and their length in tokens.
        packed: Option<(usize, usize)>,
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
    /// What the objective says must not change on resume ([`Objective::fingerprint`]);
    /// stored as `image` since text-to-image runs were the first to have one.
    #[serde(default, rename = "image")]
    settings: Option<String>,
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

/// What a model family brings to the shared loop: its model (which carries the
/// adapters), its batches and its loss.
pub trait Objective {
    type Batch;
    fn model(&self) -> &dyn LoraModel;
    fn model_mut(&mut self) -> &mut dyn LoraModel;
    /// What goes into `base_model_name_or_path`.
    fn base_name(&self) -> &str;
    /// Training items the loop shuffles and batches: examples, or rows of packed
    /// examples.
    fn len(&self) -> usize;
    /// Training examples (what `len` counts unless the objective packs them into rows).
    fn examples(&self) -> usize {
        self.len()
    }
    /// The rows the examples were packed into, if the objective packs.
    fn packed_rows(&self) -> Option<usize> {
        None
    }
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// A micro-batch of training items by index.
    fn batch(&self, idx: &[usize]) -> Result<Self::Batch>;
    /// Units the batch's loss is summed over (scored tokens, examples, or outputs).
    fn units(b: &Self::Batch) -> usize;
    /// Real (not padding) tokens in the batch.
    fn tokens(b: &Self::Batch) -> usize;
    /// The loss summed over the batch's units.
    fn loss_sum(&self, b: &Self::Batch, ctx: &ForwardCtx) -> Result<Tensor>;
    /// The batch's summed loss, and the gradients of that sum divided by `scale`. A
    /// family may compute them its own way (activation checkpointing).
    fn loss_and_grads(
        &self,
        b: &Self::Batch,
        ctx: &ForwardCtx,
        scale: f64,
    ) -> Result<(f64, GradStore)> {
        backward_sum(self.loss_sum(b, ctx)?, scale)
    }
    /// What the objective measured over the micro-batches since it was last asked (DPO's
    /// rewards), read once per step.
    fn take_rewards(&self) -> Option<Rewards> {
        None
    }
    /// Metrics on the validation set, if there is one.
    fn evaluate(&self, batch_size: usize, step: u64) -> Result<Option<EvalMetrics>>;
    /// Settings a checkpoint must have been trained with to be resumed by this run
    /// (compared as text); `None` when nothing beyond data and batches matters.
    fn fingerprint(&self) -> Option<String> {
        None
    }
    /// Files an adapter folder needs beyond PEFT's two (e.g. the label set).
    fn save_extra(&self, _dir: &Path) -> Result<()> {
        Ok(())
    }
}

/// A summed loss's value, and the gradients of it divided by `scale`.
pub fn backward_sum(nll: Tensor, scale: f64) -> Result<(f64, GradStore)> {
    let value = nll.to_scalar::<f32>()? as f64;
    Ok((value, (nll / scale)?.backward()?))
}

/// Runs the loop on a family's objective: attaches the adapter (fresh, from
/// `init_adapter`, or from `resume_dir`), trains, checkpoints, and writes the adapter.
pub fn run<O: Objective>(
    mut obj: O,
    spec: &TrainSpec,
    resume_dir: Option<PathBuf>,
    cancel: &AtomicBool,
    on_event: &mut dyn FnMut(&TrainEvent),
) -> Result<TrainOutcome> {
    let lora_cfg = match (&resume_dir, &spec.init_adapter) {
        (Some(d), _) => lora::read_adapter_config(d)?,
        (None, Some(d)) => {
            let mut c = lora::read_adapter_config(d)?;
            c.dropout = spec.lora.dropout;
            c
        }
        _ => spec.lora.clone(),
    };
    let resolved = lora::attach(obj.model_mut(), &lora_cfg, spec.seed)?;
    if let Some(d) = resume_dir.as_deref().or(spec.init_adapter.as_deref()) {
        lora::load_adapter_weights(obj.model(), d)?;
    }
    let n_examples = obj.len();
    let n_batches = n_examples.div_ceil(spec.batch_size) as u64;
    let steps_per_epoch = n_batches.div_ceil(spec.grad_accum as u64);
    let total = spec.max_steps.unwrap_or(spec.epochs * steps_per_epoch);
    let warmup = spec
        .warmup_steps
        .unwrap_or((spec.warmup_ratio * total as f64).ceil() as u64);

    let params = lora::params(obj.model());
    let mut opt = AdamW::new(params.clone(), spec.adamw)?;
    let mut start_step = 0u64;
    let mut tokens_total = 0u64;
    if let Some(d) = &resume_dir {
        opt.load(&d.join("optimizer.safetensors"))?;
        let st: TrainerState = crate::io::read_json(&d.join("trainer_state.json"))?;
        // Settings first: they name what differs (packing changes the item count too).
        if let (Some(was), Some(now)) = (&st.settings, obj.fingerprint()) {
            if *was != now {
                return Err(Error::Checkpoint(format!(
                    "the checkpoint was trained with {was}; this run asks for {now}"
                )));
            }
        }
        if st.examples != n_examples
            || st.batch_size != spec.batch_size
            || st.grad_accum != spec.grad_accum
        {
            // A checkpoint from before packing existed records no settings.
            let hint = match (&st.settings, obj.packed_rows()) {
                (None, Some(_)) => {
                    " (this run packs its examples into rows; runs made before packing \
                     existed did not: resume them with packing off)"
                }
                _ => "",
            };
            return Err(Error::Checkpoint(format!(
                "the checkpoint was made with other data or batch settings{hint}"
            )));
        }
        start_step = st.step;
        tokens_total = st.tokens;
    }
    let meta = AdapterMeta {
        base_model_name_or_path: obj.base_name().to_string(),
        task_type: obj.model().task_type().into(),
        target_modules: lora_cfg.targets.to_peft(&resolved),
        modules_to_save: obj.model().modules_to_save(),
    };
    on_event(&TrainEvent::Started {
        total_steps: total,
        examples: obj.examples(),
        packed: obj.packed_rows().map(|r| (r, spec.max_seq_len)),
        resumed_from: resume_dir.as_ref().map(|_| start_step),
    });
    let ck = |obj: &O, opt: &AdamW, step: u64, tokens: u64| {
        write_checkpoint(
            obj,
            &lora_cfg,
            &meta,
            opt,
            spec,
            TrainerState {
                step,
                total_steps: total,
                seed: spec.seed,
                examples: n_examples,
                batch_size: spec.batch_size,
                grad_accum: spec.grad_accum,
                tokens,
                settings: obj.fingerprint(),
            },
        )
    };

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
                let dir = ck(&obj, &opt, step, tokens_total)?;
                on_event(&TrainEvent::Checkpoint { step, dir });
            }
            return Err(Error::Paused(step));
        }
        let epoch = step / steps_per_epoch;
        let k = step % steps_per_epoch;
        if cached_epoch.as_ref().is_none_or(|(e, _)| *e != epoch) {
            cached_epoch = Some((
                epoch,
                epoch_batches(n_examples, spec.batch_size, spec.shuffle, spec.seed, epoch),
            ));
        }
        let batches = &cached_epoch.as_ref().expect("set above").1;
        let lo = (k as usize) * spec.grad_accum;
        let hi = (lo + spec.grad_accum).min(batches.len());
        let micro: Vec<O::Batch> = batches[lo..hi]
            .iter()
            .map(|idx| obj.batch(idx))
            .collect::<Result<_>>()?;
        let scored: usize = micro.iter().map(O::units).sum();
        let step_tokens: usize = micro.iter().map(O::tokens).sum();
        // Dropout masks come from a per-step stream so a resumed run draws the same ones.
        let ctx = ForwardCtx::train(ChaCha8Rng::seed_from_u64(
            spec.seed
                .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                .wrapping_add(step),
        ));
        let mut acc: Option<GradStore> = None;
        let mut loss_sum = 0f64;
        for b in &micro {
            if O::units(b) == 0 {
                continue;
            }
            let (nll, grads) = obj.loss_and_grads(b, &ctx, scored as f64)?;
            loss_sum += nll;
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
        let rewards = obj.take_rewards();
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
            reward_margin: rewards.map(|r| r.margin),
            reward_accuracy: rewards.map(|r| r.accuracy),
        };
        on_event(&TrainEvent::Step(m.clone()));
        last = Some(m);
        let s = step + 1;
        if let Some(every) = spec.eval_every {
            if every > 0 && s % every == 0 && s != total {
                if let Some(e) = obj.evaluate(spec.batch_size, s)? {
                    on_event(&TrainEvent::Eval(e.clone()));
                    last_eval = Some(e);
                }
            }
        }
        if let Some(every) = spec.checkpoint_every {
            if every > 0 && s % every == 0 && s != total {
                let dir = ck(&obj, &opt, s, tokens_total)?;
                on_event(&TrainEvent::Checkpoint { step: s, dir });
            }
        }
    }
    if let Some(e) = obj.evaluate(spec.batch_size, total)? {
        on_event(&TrainEvent::Eval(e.clone()));
        last_eval = Some(e);
    }
    lora::save_adapter(obj.model(), &lora_cfg, &meta, &spec.out)?;
    obj.save_extra(&spec.out)?;
    Ok(TrainOutcome {
        steps: total,
        last,
        eval: last_eval,
        adapter_dir: spec.out.clone(),
    })
}

fn write_checkpoint<O: Objective>(
    obj: &O,
    cfg: &LoraConfig,
    meta: &AdapterMeta,
    opt: &AdamW,
    spec: &TrainSpec,
    st: TrainerState,
) -> Result<PathBuf> {
    let root = spec.out.join("checkpoints");
    let dir = root.join(format!("checkpoint-{}", st.step));
    let tmp = root.join(format!(".checkpoint-{}.tmp", st.step));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    lora::save_adapter(obj.model(), cfg, meta, &tmp)?;
    obj.save_extra(&tmp)?;
    opt.save(&tmp.join("optimizer.safetensors"))?;
    let p = tmp.join("trainer_state.json");
    std::fs::write(&p, serde_json::to_string_pretty(&st)?).map_err(|e| Error::io(&p, e))?;
    let _ = std::fs::remove_dir_all(&dir);
    // The rename makes a checkpoint appear whole or not at all.
    std::fs::rename(&tmp, &dir).map_err(|e| Error::io(&dir, e))?;
    Ok(dir)
}
