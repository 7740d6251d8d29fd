//! The training loop: batches, gradient accumulation, clipping, AdamW, schedules,
//! validation, checkpoints and resume. One loop for every model family: a family
//! brings its model, its batches and its loss as an [`Objective`].

use crate::data::read_examples;
use crate::encoder::{
    accuracy_macro_f1, classification_loss, EncodedText, Encoder, ProblemType, Targets,
};
use crate::labels::{self, LabelSet};
use crate::loader::{self, BaseModel};
use crate::lora::{self, AdapterMeta, ForwardCtx, LoraConfig, LoraModel};
use crate::model::causal_lm_loss;
use crate::optim::{clip_grad_norm, lr_at, AdamW, AdamWConfig, Scheduler};
use crate::tokenize::PairTokenizer;
use crate::tokenize::{EncodeOptions, Encoded, IGNORE};
use crate::{Error, Result};
use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, D};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
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
}

impl Task {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "causal_lm" => Ok(Task::CausalLm),
            "sequence_classification" => Ok(Task::SequenceClassification),
            "text_to_image" => Ok(Task::TextToImage),
            _ => Err(Error::Config(format!(
                "task \"{s}\": expected causal_lm, sequence_classification or text_to_image"
            ))),
        }
    }
    /// The modules a LoRA goes on when the job names none: PEFT's usual decoder set,
    /// PEFT's BERT default, diffusers' `train_text_to_image_lora.py`.
    pub fn default_targets(&self) -> lora::Targets {
        let names: &[&str] = match self {
            Task::CausalLm => &lora::DECODER_TARGETS,
            Task::SequenceClassification => &lora::ENCODER_TARGETS,
            Task::TextToImage => &["to_q", "to_k", "to_v", "to_out.0"],
        };
        lora::Targets::Names(names.iter().map(|s| s.to_string()).collect())
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            Task::CausalLm => "causal_lm",
            Task::SequenceClassification => "sequence_classification",
            Task::TextToImage => "text_to_image",
        }
    }
}

/// Everything a run needs.
#[derive(Debug, Clone)]
pub struct TrainSpec {
    pub task: Task,
    /// Sequence classification: transformers' problem type; `None` infers it from the labels.
    pub problem_type: Option<ProblemType>,
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
    pub seed: u64,
    pub shuffle: bool,
    pub train_on_inputs: bool,
    pub init_adapter: Option<PathBuf>,
    pub eval_every: Option<u64>,
    pub checkpoint_every: Option<u64>,
    /// A checkpoint folder, or a run's output folder (its latest checkpoint).
    pub resume: Option<PathBuf>,
    pub device: Device,
    /// Text-to-image: resolution, prediction type, min-SNR, noise offset.
    pub image: crate::sd::objective::ImageSettings,
    /// When set, the run writes a checkpoint at the current step and stops with
    /// [`Error::Paused`], so that `resume` can continue it exactly.
    pub pause: Option<std::sync::Arc<AtomicBool>>,
}

impl TrainSpec {
    /// Defaults that match PEFT/transformers' usual LoRA recipe.
    pub fn new(model: PathBuf, data: PathBuf, out: PathBuf) -> Self {
        Self {
            task: Task::CausalLm,
            problem_type: None,
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
            seed: 42,
            shuffle: true,
            train_on_inputs: false,
            init_adapter: None,
            eval_every: None,
            checkpoint_every: None,
            resume: None,
            device: Device::Cpu,
            image: Default::default(),
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
    /// Text-to-image: the image settings the run trained with (absent in other runs and
    /// in checkpoints written before it existed).
    #[serde(default)]
    image: Option<String>,
}

/// What must not change when a text-to-image run resumes (its name may).
fn image_fingerprint(spec: &TrainSpec) -> Option<String> {
    let i = &spec.image;
    (spec.task == Task::TextToImage).then(|| {
        format!(
            "resolution {:?}, prediction_type {:?}, snr_gamma {:?}, noise_offset {}",
            i.resolution, i.prediction_type, i.snr_gamma, i.noise_offset
        )
    })
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
    /// Training examples.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// A micro-batch of training examples by index.
    fn batch(&self, idx: &[usize]) -> Result<Self::Batch>;
    /// Units the batch's loss is summed over (scored tokens, examples, or outputs).
    fn units(b: &Self::Batch) -> usize;
    /// Real (not padding) tokens in the batch.
    fn tokens(b: &Self::Batch) -> usize;
    /// The loss summed over the batch's units.
    fn loss_sum(&self, b: &Self::Batch, ctx: &ForwardCtx) -> Result<Tensor>;
    /// Metrics on the validation set, if there is one.
    fn evaluate(&self, batch_size: usize, step: u64) -> Result<Option<EvalMetrics>>;
    /// Files an adapter folder needs beyond PEFT's two (e.g. the label set).
    fn save_extra(&self, _dir: &Path) -> Result<()> {
        Ok(())
    }
}

/// Causal language modelling on a decoder.
pub struct CausalLm {
    pub base: BaseModel,
    train: Vec<Encoded>,
    valid: Option<Vec<Encoded>>,
    device: Device,
}

impl CausalLm {
    pub fn load(spec: &TrainSpec) -> Result<Self> {
        let base = loader::load(&spec.model, &spec.device)?;
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
    fn evaluate(&self, batch_size: usize, step: u64) -> Result<Option<EvalMetrics>> {
        self.valid
            .as_ref()
            .map(|v| evaluate(&self.base, v, batch_size, step))
            .transpose()
    }
}

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
    inputs: crate::encoder::EncoderBatch,
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
            None => LabelSet::discover(&train_rows, spec.problem_type).map_err(|e| match e {
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
        let name = spec
            .model
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
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
        }))
    }
    fn save_extra(&self, dir: &Path) -> Result<()> {
        self.labels.save(dir)
    }
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
    let resume_dir = spec.resume.as_deref().map(resolve_checkpoint).transpose()?;
    match spec.task {
        Task::CausalLm => run(CausalLm::load(spec)?, spec, resume_dir, cancel, on_event),
        Task::SequenceClassification => {
            let from = resume_dir.as_deref().or(spec.init_adapter.as_deref());
            run(
                SeqCls::load(spec, from)?,
                spec,
                resume_dir,
                cancel,
                on_event,
            )
        }
        Task::TextToImage => run(
            crate::sd::objective::TextToImage::load(spec)?,
            spec,
            resume_dir,
            cancel,
            on_event,
        ),
    }
}

fn run<O: Objective>(
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
        let st: TrainerState = crate::read_json(&d.join("trainer_state.json"))?;
        if st.examples != n_examples
            || st.batch_size != spec.batch_size
            || st.grad_accum != spec.grad_accum
        {
            return Err(Error::Checkpoint(
                "the checkpoint was made with other data or batch settings".into(),
            ));
        }
        if let (Some(was), Some(now)) = (&st.image, image_fingerprint(spec)) {
            if *was != now {
                return Err(Error::Checkpoint(format!(
                    "the checkpoint was trained with {was}; this run asks for {now}"
                )));
            }
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
        examples: n_examples,
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
                image: image_fingerprint(spec),
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
            let nll = obj.loss_sum(b, &ctx)?;
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
