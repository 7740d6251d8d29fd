//! `loraforge train | merge | export | generate | classify | transcribe`: the engine from the command line.

use crate::job::spec::train_spec;
use crate::job::JobSpec;
use anyhow::{bail, Context};
use clap::Args;
use loraforge_trainer::data::ClassInput;
use loraforge_trainer::device::Device;
use loraforge_trainer::families::decoder::generate::{generate_text, GenerateOptions};
use loraforge_trainer::families::for_task;
use loraforge_trainer::train::{Method, Task, TrainEvent, TrainSpec, DEFAULT_DPO_BETA};
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

#[derive(Debug, Args)]
pub struct DeviceArgs {
    /// `cpu` or `cuda:N` (needs a build with the `cuda` feature).
    #[arg(long, default_value = "cpu", env = "LORAFORGE_DEVICE")]
    pub device: String,
    /// Compute threads (default: every core).
    #[arg(long, env = "LORAFORGE_THREADS")]
    pub threads: Option<usize>,
}

impl DeviceArgs {
    fn resolve(&self) -> anyhow::Result<Device> {
        if let Some(n) = self.threads {
            if n == 0 {
                bail!("--threads must be at least 1");
            }
            loraforge_trainer::device::set_cpu_threads(n);
        }
        let dev = loraforge_trainer::device::parse(&self.device)?;
        if dev.is_cpu() {
            loraforge_trainer::ops::matmul::check()?;
        }
        Ok(dev)
    }
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Base model: a HuggingFace folder, a .gguf file, or (text_to_image) a diffusers
    /// Stable Diffusion folder.
    #[arg(long)]
    pub model: PathBuf,
    /// Training data (JSONL: chat, prompt/completion, text or input_ids; for
    /// sequence_classification text/text_pair/label; for text_to_image a zip of
    /// captioned images; for image_classification a zip of one folder per class; for
    /// speech_recognition a zip of WAV or FLAC clips with metadata.jsonl or .txt
    /// transcripts).
    #[arg(long)]
    pub data: PathBuf,
    /// causal_lm (decoder LLMs), sequence_classification (bert, roberta),
    /// text_to_image (Stable Diffusion 1.x/2.x), image_classification (resnet) or
    /// speech_recognition (whisper).
    #[arg(long, default_value = "causal_lm")]
    pub task: String,
    /// causal_lm: supervised (the next-token loss) or dpo (preference pairs in
    /// OpenAI's format, against the base without the adapter as reference).
    #[arg(long, default_value = "supervised", value_parser = ["supervised", "dpo"])]
    pub method: String,
    /// DPO's beta: how far the policy may move from the reference (default 0.1).
    #[arg(long)]
    pub beta: Option<f64>,
    /// Text-to-image: square training resolution (default: the model's native size).
    #[arg(long)]
    pub resolution: Option<u32>,
    /// Text-to-image: min-SNR-γ loss weighting (e.g. 5).
    #[arg(long)]
    pub snr_gamma: Option<f64>,
    /// Text-to-image: noise offset (e.g. 0.05).
    #[arg(long, default_value_t = 0.0)]
    pub noise_offset: f64,
    /// Text-to-image: epsilon, v_prediction or sample (default: the scheduler's).
    #[arg(long)]
    pub prediction_type: Option<String>,
    /// Text-to-image LoCon (kohya's conv_dim): also adapt the UNet's resnet and sampler
    /// convolutions and timestep projections, the 3x3 convolutions at this rank.
    #[arg(long)]
    pub conv_rank: Option<usize>,
    /// Text-to-image LoCon (kohya's conv_alpha; default: --conv-rank).
    #[arg(long, requires = "conv_rank")]
    pub conv_alpha: Option<f64>,
    /// Sequence classification: single_label_classification, multi_label_classification
    /// or regression (default: inferred from the labels).
    #[arg(long)]
    pub problem_type: Option<String>,
    /// Speech recognition: the language code of clips whose data names none (default
    /// en).
    #[arg(long)]
    pub language: Option<String>,
    /// Turn the base model's own dropout off (encoders; for exact comparisons).
    #[arg(long)]
    pub no_model_dropout: bool,
    /// Validation data (JSONL, same formats).
    #[arg(long)]
    pub validation: Option<PathBuf>,
    /// Output folder for the PEFT adapter (checkpoints go under OUT/checkpoints).
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 8)]
    pub rank: usize,
    #[arg(long, default_value_t = 16.0)]
    pub alpha: f64,
    #[arg(long, default_value_t = 0.0)]
    pub dropout: f32,
    /// Comma-separated PEFT module names, or `all-linear` (default: the seven
    /// projections for causal_lm, query,value for sequence_classification).
    #[arg(long)]
    pub target_modules: Option<String>,
    #[arg(long)]
    pub use_rslora: bool,
    #[arg(long, default_value_t = 1)]
    pub epochs: u64,
    /// Stop after this many optimizer steps (overrides --epochs).
    #[arg(long)]
    pub max_steps: Option<u64>,
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    #[arg(long, default_value_t = 2e-4)]
    pub lr: f64,
    /// constant, linear or cosine.
    #[arg(long, default_value = "linear")]
    pub scheduler: String,
    #[arg(long)]
    pub warmup_steps: Option<u64>,
    #[arg(long, default_value_t = 0.0)]
    pub warmup_ratio: f64,
    /// AdamW's decoupled weight decay; 0 turns it off.
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Global-norm gradient clipping; 0 turns it off.
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    #[arg(long, default_value_t = 1024)]
    pub max_seq_len: usize,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Keep the order: with --no-packing batch k is lines k·B .. k·B+B-1; packed, rows
    /// in packing order.
    #[arg(long)]
    pub no_shuffle: bool,
    /// Train on prompt/user tokens too, not only on completions.
    #[arg(long)]
    pub train_on_inputs: bool,
    /// Keep only each layer's input through the forward pass and recompute the layer in
    /// the backward one: activation memory of one layer instead of all, for one more
    /// forward pass of compute (decoders).
    #[arg(long)]
    pub gradient_checkpointing: bool,
    /// Pad every example to its batch's longest instead of packing examples into rows of
    /// --max-seq-len tokens (supervised causal_lm packs by default; attention never
    /// crosses from one example to another, and positions restart at each).
    #[arg(long)]
    pub no_packing: bool,
    /// Start from an existing PEFT adapter folder.
    #[arg(long)]
    pub init_adapter: Option<PathBuf>,
    /// Validate every N steps (and always at the end when --validation is given).
    #[arg(long)]
    pub eval_every: Option<u64>,
    /// Write a checkpoint every N steps.
    #[arg(long)]
    pub checkpoint_every: Option<u64>,
    /// Resume from a checkpoint folder, or from OUT's newest checkpoint.
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Write one JSON object per step here.
    #[arg(long)]
    pub metrics_jsonl: Option<PathBuf>,
    /// Compute precision of activations and frozen weights: f32, bf16 or f16 (LoRA
    /// weights and optimizer state stay f32). Default: bf16 on CUDA for decoders, else f32.
    #[arg(long, value_parser = ["f32", "bf16", "f16"])]
    pub dtype: Option<String>,
    /// How the frozen base is kept in memory: auto (a GGUF file's own quant types, an HF
    /// folder dense), f32, bf16, f16, q8_0, q4_0, q4_1, q5_0, q4_k, q5_k, q6_k. Packed
    /// weights are expanded one layer at a time for each product (QLoRA-style).
    #[arg(long, value_parser = ["auto", "f32", "bf16", "f16", "q8_0", "q4_0", "q4_1", "q5_0", "q4_k", "q5_k", "q6_k"])]
    pub base_dtype: Option<String>,
    #[command(flatten)]
    pub device: DeviceArgs,
}

impl TrainArgs {
    /// The same mapping as a job's: the arguments as a job spec, then `train_spec`, then
    /// what only the command line sets (shuffle, warm-up steps, init and resume folders).
    fn spec(&self) -> anyhow::Result<TrainSpec> {
        let task = Task::parse(&self.task)?;
        let method = match (self.method.as_str(), self.beta) {
            ("dpo", beta) => Method::Dpo {
                beta: beta.unwrap_or(DEFAULT_DPO_BETA),
            },
            (_, Some(_)) => bail!("--beta applies to --method dpo only"),
            _ => Method::Supervised,
        };
        if self.conv_rank.is_some() && task != Task::TextToImage {
            bail!("--conv-rank applies to --task text_to_image only");
        }
        if self.language.is_some() && task != Task::SpeechRecognition {
            bail!("--language applies to --task speech_recognition only");
        }
        let job = JobSpec {
            task,
            method,
            problem_type: self.problem_type.clone(),
            language: self.language.clone(),
            n_epochs: self.epochs,
            batch_size: self.batch_size,
            learning_rate: self.lr,
            learning_rate_multiplier: 1.0,
            lora_r: self.rank,
            lora_alpha: self.alpha,
            lora_dropout: self.dropout,
            lora_target_modules: {
                let t = match &self.target_modules {
                    Some(t) => t.clone(),
                    None => for_task(task).default_targets_for(&self.model).to_list(),
                };
                match self.conv_rank {
                    None => t,
                    Some(_) => loraforge_trainer::families::diffusion::with_locon_targets(&t)
                        .context("--conv-rank needs named --target-modules (all-linear names no convolution)")?,
                }
            },
            use_rslora: self.use_rslora,
            lr_scheduler: self.scheduler.clone(),
            warmup_ratio: self.warmup_ratio,
            weight_decay: self.weight_decay,
            max_grad_norm: self.max_grad_norm,
            gradient_accumulation_steps: self.grad_accum,
            max_seq_len: self.max_seq_len,
            max_steps: self.max_steps,
            train_on_inputs: self.train_on_inputs,
            gradient_checkpointing: self.gradient_checkpointing,
            packing: task == Task::CausalLm && method == Method::Supervised && !self.no_packing,
            eval_interval: self.eval_every,
            checkpoint_interval: self.checkpoint_every,
            seed: self.seed,
            metadata: None,
            resolution: self.resolution,
            snr_gamma: self.snr_gamma,
            noise_offset: self.noise_offset,
            prediction_type: self.prediction_type.clone(),
            conv_rank: self.conv_rank,
            conv_alpha: self.conv_alpha,
            keep_checkpoints: crate::job::spec::DEFAULT_KEEP_CHECKPOINTS,
            dtype: self.dtype.clone(),
            base_dtype: self.base_dtype.clone(),
            request_sha256: None,
        };
        let mut s = train_spec(
            &job,
            self.model.clone(),
            self.data.clone(),
            self.validation.clone(),
            self.out.clone(),
            &self.device.device,
            self.out
                .file_name()
                .map(|n| n.to_string_lossy().into_owned()),
        )?;
        s.model_dropout = !self.no_model_dropout;
        s.warmup_steps = self.warmup_steps;
        s.shuffle = !self.no_shuffle;
        s.init_adapter = self.init_adapter.clone();
        s.resume = self.resume.clone();
        s.device = self.device.resolve()?;
        Ok(s)
    }
}

pub fn train(args: TrainArgs) -> anyhow::Result<()> {
    let spec = args.spec()?;
    let mut metrics = match &args.metrics_jsonl {
        Some(p) => Some(std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?,
        )),
        None => None,
    };
    let tty = std::io::stderr().is_terminal();
    let mut bar: Option<indicatif::ProgressBar> = None;
    let mut io_err: Option<std::io::Error> = None;
    let cancel = AtomicBool::new(false);
    let outcome = loraforge_trainer::train(&spec, &cancel, &mut |ev| match ev {
        TrainEvent::Started {
            total_steps,
            examples,
            packed,
            resumed_from,
        } => {
            if tty {
                let b = indicatif::ProgressBar::new(*total_steps);
                b.set_style(
                    indicatif::ProgressStyle::with_template(
                        "{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta_precise}]",
                    )
                    .expect("static template"),
                );
                if let Some(s) = resumed_from {
                    b.set_position(*s);
                }
                bar = Some(b);
            }
            eprintln!(
                "training on {examples} examples{} for {total_steps} steps{}",
                crate::job::packed_note(*packed),
                resumed_from
                    .map(|s| format!(" (resumed at step {s})"))
                    .unwrap_or_default()
            );
            if spec.device.is_cpu() {
                eprintln!(
                    "matrix products: {}",
                    loraforge_trainer::ops::matmul::describe()
                );
            }
        }
        TrainEvent::Step(m) => {
            let rewards = match (m.reward_margin, m.reward_accuracy) {
                (Some(margin), Some(acc)) => {
                    format!(" reward_margin {margin:.4} reward_accuracy {acc:.3}")
                }
                _ => String::new(),
            };
            let line = format!(
                "step {}/{} loss {:.4}{rewards} lr {:.3e} grad_norm {:.4} tok/s {:.1}",
                m.step, m.total_steps, m.loss, m.lr, m.grad_norm, m.tokens_per_second
            );
            match &bar {
                Some(b) => {
                    b.set_position(m.step);
                    b.set_message(format!(
                        "loss {:.4}  tok/s {:.0}",
                        m.loss, m.tokens_per_second
                    ));
                }
                None => eprintln!("{line}"),
            }
            if let Some(w) = metrics.as_mut() {
                let r = serde_json::to_writer(&mut *w, m)
                    .map_err(std::io::Error::other)
                    .and_then(|_| w.write_all(b"\n"))
                    .and_then(|_| w.flush());
                if let Err(e) = r {
                    io_err.get_or_insert(e);
                }
            }
        }
        TrainEvent::Eval(e) => {
            let line = match (e.accuracy, e.macro_f1) {
                (Some(a), f1) => format!(
                    "eval at step {}: loss {:.4} accuracy {a:.4}{}",
                    e.step,
                    e.loss,
                    f1.map(|f| format!(" macro_f1 {f:.4}")).unwrap_or_default()
                ),
                _ => format!(
                    "eval at step {}: loss {:.4} mean_token_accuracy {:.4}{}",
                    e.step,
                    e.loss,
                    e.mean_token_accuracy,
                    match (e.reward_margin, e.reward_accuracy, e.wer) {
                        (Some(m), Some(a), _) =>
                            format!(" reward_margin {m:.4} reward_accuracy {a:.3}"),
                        (_, _, Some(w)) => format!(" wer {w:.4}"),
                        _ => String::new(),
                    }
                ),
            };
            match &bar {
                Some(b) => b.println(line),
                None => eprintln!("{line}"),
            }
        }
        TrainEvent::Checkpoint { step, dir } => {
            let line = format!("checkpoint at step {step}: {}", dir.display());
            match &bar {
                Some(b) => b.println(line),
                None => eprintln!("{line}"),
            }
        }
    });
    if let Some(b) = bar {
        b.finish();
    }
    let outcome = outcome?;
    if let Some(e) = io_err {
        return Err(e).context("writing --metrics-jsonl");
    }
    eprintln!(
        "adapter written to {} after {} steps",
        outcome.adapter_dir.display(),
        outcome.steps
    );
    Ok(())
}

#[derive(Debug, Args)]
pub struct MergeArgs {
    /// Base model: a HuggingFace folder or a .gguf file.
    #[arg(long)]
    pub model: PathBuf,
    /// PEFT adapter folder.
    #[arg(long)]
    pub adapter: PathBuf,
    /// Output folder for the merged HF model.
    #[arg(long)]
    pub out: PathBuf,
    /// How the merged weights are stored: f32, bf16 or f16 (the merge is in f32).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
}

pub fn merge(args: MergeArgs) -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let base = loraforge_trainer::families::decoder::merge::load_with_adapter(
        &args.model,
        Some(&args.adapter),
        &dev,
    )?;
    let dtype = loraforge_trainer::device::parse_dtype(&args.dtype).context("--dtype")?;
    loraforge_trainer::families::decoder::merge::write_merged(
        &base,
        &args.model,
        &args.out,
        dtype,
    )?;
    eprintln!("merged model written to {}", args.out.display());
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    /// The LoRA GGUF llama.cpp loads over its base (`--lora`, llama-cpp-python's
    /// `lora_path`, Ollama's `ADAPTER`).
    LoraGguf,
    /// The base's GGUF with the adapter merged in, a model of its own (with an Ollama
    /// Modelfile beside it).
    MergedGguf,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// PEFT adapter folder.
    #[arg(long)]
    pub adapter: PathBuf,
    #[arg(long, value_enum, default_value = "lora-gguf")]
    pub format: ExportFormat,
    /// Base model: an HF folder or a .gguf file (a merged GGUF needs the base's GGUF). For
    /// a LoRA GGUF only its config is read, and the default is the adapter's
    /// `base_model_name_or_path` where that is a path here.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Output file. Default for a LoRA GGUF: `adapter_model.gguf` in the adapter folder.
    #[arg(long, required_if_eq("format", "merged-gguf"))]
    pub out: Option<PathBuf>,
    /// Tensor type. LoRA GGUF: `f32` (default, as trained) or `f16`. Merged GGUF: `f16`
    /// (default), `bf16`, `f32`, `q8_0` or `q4_k` (norms stay f32).
    #[arg(long)]
    pub dtype: Option<String>,
}

pub fn export(args: ExportArgs) -> anyhow::Result<()> {
    use loraforge_trainer::families::decoder::{export, merge};
    let model = match args.model {
        Some(m) => m,
        None => {
            let p = args.adapter.join("adapter_config.json");
            let cfg: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?,
            )
            .with_context(|| format!("{}", p.display()))?;
            let named = cfg
                .get("base_model_name_or_path")
                .and_then(|v| v.as_str())
                .unwrap_or_default();
            let path = PathBuf::from(named);
            if named.is_empty() || !path.exists() {
                bail!(
                    "the base model is needed (--model): {} names {named:?}, which is not a \
                     file or folder here",
                    p.display()
                );
            }
            path
        }
    };
    match args.format {
        ExportFormat::LoraGguf => {
            let float = export::GgufFloat::parse(args.dtype.as_deref().unwrap_or("f32"))
                .context("--dtype")?;
            let base = export::read_base_shape(&model)?;
            let out = args
                .out
                .unwrap_or_else(|| args.adapter.join(export::LORA_GGUF_FILE));
            let done = export::write_lora_gguf(&args.adapter, &base, float, &out)?;
            eprintln!(
                "LoRA GGUF written to {} ({} modules, architecture {}, alpha {})",
                out.display(),
                done.modules,
                done.arch,
                done.alpha
            );
        }
        ExportFormat::MergedGguf => {
            let ty = export::MergedType::parse(args.dtype.as_deref().unwrap_or("f16"))
                .context("--dtype")?;
            let out = args.out.context("--out is required")?;
            if model.is_dir() {
                bail!(
                    "{}: a merged GGUF is made from the base's GGUF (its tokenizer and \
                     hyperparameters are carried over); for an HF folder, `loraforge merge` \
                     and llama.cpp's convert_hf_to_gguf.py",
                    model.display()
                );
            }
            let base = merge::load_with_adapter(&model, Some(&args.adapter), &Device::Cpu)?;
            let n = export::write_merged_gguf(
                &model,
                &base.model.cfg,
                base.model.merged_weights()?,
                ty,
                &out,
            )?;
            let modelfile = export::write_modelfile(&out, &base.tokenizer)?;
            eprintln!(
                "merged GGUF written to {} ({n} tensors); Ollama: ollama create NAME -f {}",
                out.display(),
                modelfile.display()
            );
        }
    }
    Ok(())
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Base model: a HuggingFace folder or a .gguf file.
    #[arg(long)]
    pub model: PathBuf,
    /// PEFT adapter folder to apply.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    #[arg(long)]
    pub prompt: String,
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Feed the prompt as is, without the chat template.
    #[arg(long)]
    pub raw: bool,
    /// Print a JSON object with the prompt's and the generated token ids beside the text.
    #[arg(long)]
    pub json: bool,
    /// Go on past end-of-sequence tokens: exactly --max-new-tokens tokens.
    #[arg(long)]
    pub ignore_eos: bool,
    #[command(flatten)]
    pub device: DeviceArgs,
}

pub fn generate(args: GenerateArgs) -> anyhow::Result<()> {
    let dev = args.device.resolve()?;
    let base = loraforge_trainer::families::decoder::merge::load_with_adapter(
        &args.model,
        args.adapter.as_deref(),
        &dev,
    )?;
    let g = generate_text(
        &base,
        &args.prompt,
        &GenerateOptions {
            max_new_tokens: args.max_new_tokens,
            temperature: args.temperature,
            top_p: args.top_p,
            seed: args.seed,
            chat: !args.raw,
            stop: Vec::new(),
            ignore_eos: args.ignore_eos,
        },
    )?;
    if args.json {
        let v = serde_json::json!({
            "text": g.text,
            "prompt_ids": g.prompt_ids,
            "ids": g.ids,
            "finish_reason": g.finish_reason,
        });
        println!("{v}");
    } else {
        println!("{}", g.text);
    }
    Ok(())
}

#[derive(Debug, Args)]
pub struct ClassifyArgs {
    /// Base model: a HuggingFace folder (bert, roberta for texts; resnet for images).
    #[arg(long)]
    pub model: PathBuf,
    /// Classification adapter folder (with labels.json).
    #[arg(long)]
    pub adapter: PathBuf,
    /// Text to classify; repeat for several.
    #[arg(long, required_unless_present_any = ["input", "image"])]
    pub text: Vec<String>,
    /// Image (PNG or JPEG) to classify with an image-classification adapter; repeat for
    /// several.
    #[arg(long, conflicts_with_all = ["text", "input", "text_pair"])]
    pub image: Vec<PathBuf>,
    /// Second text of a pair (with exactly one --text).
    #[arg(long)]
    pub text_pair: Option<String>,
    /// JSONL of {"text", "text_pair"?} lines to classify instead of --text.
    #[arg(long, conflicts_with = "text")]
    pub input: Option<PathBuf>,
    #[arg(long, default_value_t = 512)]
    pub max_seq_len: usize,
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// Prints one JSON object per input: the predicted label(s) and every label's score.
pub fn classify(args: ClassifyArgs) -> anyhow::Result<()> {
    let dev = args.device.resolve()?;
    if !args.image.is_empty() {
        return classify_images(&args, &dev);
    }
    let inputs: Vec<ClassInput> = match &args.input {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            text.lines()
                .enumerate()
                .filter(|(_, l)| !l.trim().is_empty())
                .map(|(i, l)| {
                    let v: serde_json::Value = serde_json::from_str(l)
                        .with_context(|| format!("{}: line {}", p.display(), i + 1))?;
                    let text = v.get("text").and_then(|t| t.as_str()).with_context(|| {
                        format!("{}: line {}: missing \"text\"", p.display(), i + 1)
                    })?;
                    Ok(ClassInput::Text {
                        text: text.to_string(),
                        text_pair: v
                            .get("text_pair")
                            .and_then(|t| t.as_str())
                            .map(String::from),
                    })
                })
                .collect::<anyhow::Result<_>>()?
        }
        None => {
            if args.text_pair.is_some() && args.text.len() != 1 {
                bail!("--text-pair goes with exactly one --text");
            }
            args.text
                .iter()
                .map(|t| ClassInput::Text {
                    text: t.clone(),
                    text_pair: args.text_pair.clone(),
                })
                .collect()
        }
    };
    let c = loraforge_trainer::families::encoder::classify::Classifier::load(
        &args.model,
        &args.adapter,
        args.max_seq_len,
        &dev,
    )?;
    let mut out = std::io::stdout().lock();
    for chunk in inputs.chunks(32) {
        for p in c.predict(chunk)? {
            writeln!(out, "{}", prediction_json(&p, None))?;
        }
    }
    Ok(())
}

fn prediction_json(
    p: &loraforge_trainer::families::encoder::classify::Prediction,
    image: Option<&std::path::Path>,
) -> serde_json::Value {
    let scores: serde_json::Map<String, serde_json::Value> = p
        .scores
        .iter()
        .map(|(n, s)| (n.clone(), serde_json::json!(s)))
        .collect();
    let mut line = serde_json::json!({"labels": p.labels, "scores": scores});
    if let Some(i) = image {
        line["image"] = serde_json::json!(i.display().to_string());
    }
    line
}

#[derive(Debug, Args)]
pub struct TranscribeArgs {
    /// Base model: a HuggingFace Whisper folder.
    #[arg(long)]
    pub model: PathBuf,
    /// A speech-recognition adapter folder (PEFT's), switched in over the base.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// WAV or FLAC file to transcribe (any rate and channel count; longer than 30 s is
    /// transcribed 30 s at a time); repeat for several.
    #[arg(long, required = true)]
    pub audio: Vec<PathBuf>,
    /// The speech's language code (multilingual models; default: detected on the first
    /// 30 s).
    #[arg(long)]
    pub language: Option<String>,
    /// Print one JSON object per file ({"audio", "text"}) instead of the text alone.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// Greedy transcription, 30 s windows, one line per file.
pub fn transcribe(args: TranscribeArgs) -> anyhow::Result<()> {
    use loraforge_trainer::families::speech::{audio, transcribe::Transcriber};
    use loraforge_trainer::lora::hotswap::AdapterWeights;
    let dev = args.device.resolve()?;
    let mut t = Transcriber::load(&args.model, &dev)?;
    if let Some(a) = &args.adapter {
        t.use_adapter(Some(&AdapterWeights::load(a, &dev)?))?;
    }
    // A bad language is an error before any audio is read.
    if let Some(l) = &args.language {
        t.text.prompt(l)?;
    }
    let never = std::sync::atomic::AtomicBool::new(false);
    let mut out = std::io::stdout().lock();
    for path in &args.audio {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let samples =
            audio::decode_16k(&bytes, &path.display().to_string(), audio::MAX_FILE_SECONDS)?;
        let r = t.transcribe(&samples, args.language.as_deref(), &never, &mut |_| {})?;
        if args.json {
            let line = serde_json::json!({"audio": path.display().to_string(), "text": r.text,
                                          "language": r.language});
            writeln!(out, "{line}")?;
        } else {
            writeln!(out, "{}", r.text)?;
        }
    }
    Ok(())
}

/// `classify --image`: each image decoded as uploads are (EXIF-upright, alpha on white),
/// then the model's own preprocessing.
fn classify_images(args: &ClassifyArgs, dev: &Device) -> anyhow::Result<()> {
    use loraforge_trainer::archive::{decode_image, ZipLimits};
    let c = loraforge_trainer::families::vision::classify::ImageClassifier::load(
        &args.model,
        &args.adapter,
        dev,
    )?;
    let mut out = std::io::stdout().lock();
    for path in &args.image {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let img = decode_image(&bytes, &path.display().to_string(), &ZipLimits::default())?;
        for p in c.predict(&[img])? {
            writeln!(out, "{}", prediction_json(&p, Some(path)))?;
        }
    }
    Ok(())
}
