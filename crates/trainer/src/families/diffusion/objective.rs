//! Text-to-image LoRA training on a Stable Diffusion folder, as a training-loop
//! [`Objective`]: the optimizer, schedules, clipping, checkpoints, cancel and progress
//! events are the shared ones.
//!
//! The VAE and the text encoder are frozen, so their outputs are computed once when the
//! run starts (VAE moments per image, hidden states per distinct caption) and the models
//! are dropped; each step then touches only the UNet. Every random draw (latent sample,
//! noise, noise offset, timesteps) comes from the step's seeded RNG, so a run, and a
//! resumed run, reproduce their losses exactly.

use super::clip::{ClipTextEncoder, ClipTokenizer};
use super::dataset::{read_zip, to_pixels, ZipLimits};
use super::ddpm::{normal, Prediction, Schedule};
use super::kohya::{write_kohya, BaseModel, KohyaMeta, KohyaNaming};
use super::unet::UNet;
use super::vae::{sample_latent, VaeEncoder};
use crate::lora::{ForwardCtx, LoraModel};
use crate::train::{EvalMetrics, Objective, TrainSpec};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// Image-training settings of a run: the diffusion family's options.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(default)]
pub struct ImageSettings {
    /// Square training resolution in pixels; `None` takes the model's native size
    /// (UNet `sample_size` × the VAE's downsampling).
    pub resolution: Option<u32>,
    /// Overrides the scheduler's `prediction_type` (e.g. `v_prediction`).
    pub prediction_type: Option<String>,
    /// min-SNR-γ loss weighting (5.0 is the paper's choice); `None` weights every sample 1.
    pub snr_gamma: Option<f64>,
    /// diffusers' `--noise_offset`: a per-channel constant added to the noise.
    pub noise_offset: f64,
    /// What the kohya file calls the LoRA (`ss_output_name`, `modelspec.title`); `None`
    /// names it after the base model.
    pub name: Option<String>,
}

impl Default for ImageSettings {
    fn default() -> Self {
        ImageSettings {
            resolution: None,
            prediction_type: None,
            snr_gamma: None,
            noise_offset: 0.0,
            name: None,
        }
    }
}

/// One training image, already at the training resolution: CHW pixels in [-1, 1].
pub struct TrainImage {
    pub pixels: Vec<f32>,
    pub size: usize,
    pub caption: String,
    pub repeats: u32,
}

struct Cached {
    mean: Tensor,
    logvar: Tensor,
    text: usize,
}

/// A micro-batch: latent moments and text conditioning.
pub struct SdBatch {
    mean: Tensor,
    logvar: Tensor,
    context: Tensor,
}

pub struct TextToImage {
    unet: UNet,
    schedule: Schedule,
    prediction: Prediction,
    latent_factor: f64,
    images: Vec<Cached>,
    texts: Vec<Tensor>,
    /// Where each image's rows end in an epoch (the running sum of the repeats): row
    /// `r` is image `ends.partition_point(|&e| e <= r)`. An epoch is never a vector of
    /// repeated images.
    ends: Vec<usize>,
    snr_gamma: Option<f32>,
    noise_offset: f32,
    base_name: String,
    device: Device,
    /// What the kohya file's metadata records about the run.
    meta: KohyaMeta,
    /// The image settings a checkpoint of this run must share to be resumed by it.
    fingerprint: Option<String>,
}

/// The file name of the kohya-format copy of an adapter, next to PEFT's files.
pub const KOHYA_FILE: &str = "kohya.safetensors";

/// The VAE's spatial downsampling: 2 per down block after the first.
fn vae_factor(model_dir: &Path) -> Result<usize> {
    let p = model_dir.join("vae/config.json");
    let v: serde_json::Value = crate::io::read_json(&p)?;
    let blocks = v
        .get("block_out_channels")
        .and_then(|b| b.as_array())
        .map_or(4, Vec::len);
    Ok(1 << blocks.saturating_sub(1))
}

/// The training resolutions a pipeline takes are multiples of this: the VAE's
/// downsampling times the UNet's (2 per down block after the first). Also returns the
/// native resolution (UNet `sample_size` × the VAE's factor).
pub fn resolution_rule(model_dir: &Path) -> Result<(usize, usize)> {
    let p = model_dir.join("unet/config.json");
    let cfg = super::unet::UNetConfig::from_diffusers_json(&crate::io::read_json(&p)?)?;
    let vae = vae_factor(model_dir)?;
    let multiple = vae << cfg.block_out_channels.len().saturating_sub(1);
    Ok((multiple, cfg.sample_size * vae))
}

impl TextToImage {
    /// Loads the UNet from `model_dir` (a diffusers SD folder) and caches the VAE moments
    /// and caption hidden states of `images`.
    pub fn prepare(
        model_dir: &Path,
        images: &[TrainImage],
        settings: &ImageSettings,
        device: &Device,
    ) -> Result<Self> {
        if images.is_empty() {
            return Err(Error::Data("the dataset has no images".into()));
        }
        let unet = UNet::load(&model_dir.join("unet"), device)?;
        let mut schedule = Schedule::load(&model_dir.join("scheduler"))?;
        if let Some(p) = &settings.prediction_type {
            schedule.prediction = Prediction::parse(p)?;
        }
        let (mut cached, mut texts) = (Vec::new(), Vec::new());
        let latent_factor;
        {
            let vae = VaeEncoder::load(&model_dir.join("vae"), device)?;
            latent_factor = vae.scaling_factor;
            let tok = ClipTokenizer::load(&model_dir.join("tokenizer"))?;
            let clip = ClipTextEncoder::load(&model_dir.join("text_encoder"), device)?;
            let mut by_caption: HashMap<&str, usize> = HashMap::new();
            for img in images {
                let s = img.size;
                if img.pixels.len() != 3 * s * s {
                    return Err(Error::Data(format!(
                        "an image of {} values is not 3x{s}x{s}",
                        img.pixels.len()
                    )));
                }
                let x = Tensor::from_slice(&img.pixels, (1, 3, s, s), device)?;
                let (mean, logvar) = vae.moments(&x)?;
                let text = match by_caption.get(img.caption.as_str()) {
                    Some(&i) => i,
                    None => {
                        let ids = tok.encode(&img.caption)?;
                        texts.push(clip.forward(&[ids])?.squeeze(0)?);
                        by_caption.insert(&img.caption, texts.len() - 1);
                        texts.len() - 1
                    }
                };
                cached.push(Cached {
                    mean: mean.squeeze(0)?,
                    logvar: logvar.squeeze(0)?,
                    text,
                });
            }
            let hidden = texts[0].dim(1)?;
            if hidden != unet.cfg.cross_attention_dim {
                return Err(Error::Model(format!(
                    "the text encoder's hidden size {hidden} differs from the UNet's cross_attention_dim {}",
                    unet.cfg.cross_attention_dim
                )));
            }
        }
        let ends = images
            .iter()
            .scan(0usize, |end, img| {
                *end += img.repeats.max(1) as usize;
                Some(*end)
            })
            .collect();
        Ok(TextToImage {
            prediction: schedule.prediction,
            schedule,
            latent_factor,
            images: cached,
            texts,
            ends,
            snr_gamma: settings.snr_gamma.map(|g| g as f32),
            noise_offset: settings.noise_offset as f32,
            base_name: crate::io::base_reference(model_dir, None),
            device: device.clone(),
            meta: KohyaMeta::default(),
            fingerprint: None,
            unet,
        })
    }

    /// A run's objective: the images of the zip at `spec.data`, at the training
    /// resolution (the model's native one unless set), centre-cropped.
    pub fn load(spec: &TrainSpec) -> Result<Self> {
        let image = spec
            .options
            .get::<ImageSettings>()
            .cloned()
            .unwrap_or_default();
        let (multiple, native) = resolution_rule(&spec.model)?;
        let res = image.resolution.map_or(native, |r| r as usize);
        if res == 0 || !res.is_multiple_of(multiple) {
            return Err(Error::Config(format!(
                "resolution {res}: this model trains at multiples of {multiple} pixels"
            )));
        }
        let limits = ZipLimits {
            shrink_to: Some(res as u32),
            ..ZipLimits::default()
        };
        let ds = read_zip(&spec.data, &limits)?;
        let images: Vec<TrainImage> = ds
            .examples
            .iter()
            .map(|e| TrainImage {
                pixels: to_pixels(&e.image, res as u32, true),
                size: res,
                caption: e.caption.clone(),
                repeats: e.repeats,
            })
            .collect();
        let mut obj = Self::prepare(&spec.model, &images, &image, &spec.device)?;
        // Its name may change between attempts; what it trains on may not.
        obj.fingerprint = Some(format!(
            "resolution {:?}, prediction_type {:?}, snr_gamma {:?}, noise_offset {}",
            image.resolution, image.prediction_type, image.snr_gamma, image.noise_offset
        ));
        obj.meta = KohyaMeta {
            base: if obj.unet.cfg.cross_attention_dim == 1024 {
                if obj.prediction == Prediction::VPrediction {
                    BaseModel::Sd2V
                } else {
                    BaseModel::Sd2
                }
            } else {
                BaseModel::Sd1
            },
            sd_model_name: spec
                .model
                .file_name()
                .map(|n| n.to_string_lossy().into_owned()),
            output_name: Some(image.name.clone().unwrap_or_else(|| {
                let base = spec
                    .model
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned());
                format!("{} LoRA", base.unwrap_or_default())
            })),
            learning_rate: Some(spec.lr),
            unet_lr: Some(spec.lr),
            max_train_steps: spec.max_steps,
            num_train_images: Some(obj.len() as u64),
            batch_size: Some(spec.batch_size as u64),
            resolution: Some((res as u32, res as u32)),
            seed: Some(spec.seed),
            noise_offset: Some(image.noise_offset),
            min_snr_gamma: image.snr_gamma,
            mixed_precision: Some("no".into()),
            cache_latents: Some(true),
            ..KohyaMeta::default()
        };
        Ok(obj)
    }
}

impl Objective for TextToImage {
    type Batch = SdBatch;

    fn model(&self) -> &dyn LoraModel {
        &self.unet
    }
    fn fingerprint(&self) -> Option<String> {
        self.fingerprint.clone()
    }
    fn model_mut(&mut self) -> &mut dyn LoraModel {
        &mut self.unet
    }
    fn base_name(&self) -> &str {
        &self.base_name
    }
    fn len(&self) -> usize {
        self.ends.last().copied().unwrap_or(0)
    }

    fn batch(&self, idx: &[usize]) -> Result<SdBatch> {
        let pick = |f: &dyn Fn(&Cached) -> Tensor| -> Result<Tensor> {
            let ts: Vec<Tensor> = idx
                .iter()
                .map(|&r| f(&self.images[self.ends.partition_point(|&e| e <= r)]))
                .collect();
            Ok(Tensor::stack(&ts, 0)?)
        };
        Ok(SdBatch {
            mean: pick(&|c| c.mean.clone())?,
            logvar: pick(&|c| c.logvar.clone())?,
            context: pick(&|c| self.texts[c.text].clone())?,
        })
    }

    fn units(b: &SdBatch) -> usize {
        b.mean.dim(0).unwrap_or(0)
    }

    /// Images, not tokens: the progress events' throughput counts examples here.
    fn tokens(b: &SdBatch) -> usize {
        Self::units(b)
    }

    fn loss_sum(&self, b: &SdBatch, ctx: &ForwardCtx) -> Result<Tensor> {
        let (n, c, h, w) = b.mean.dims4()?;
        let len = n * c * h * w;
        // Every draw before the forward pass, which borrows the same RNG for dropout.
        let (eps, noise, offset, ts) = {
            let mut rng = ctx.rng.borrow_mut();
            let eps = normal(len, &mut rng);
            let noise = normal(len, &mut rng);
            let offset = (self.noise_offset > 0.0).then(|| normal(n * c, &mut rng));
            (
                eps,
                noise,
                offset,
                self.schedule.draw_timesteps(n, &mut rng),
            )
        };
        let dev = &self.device;
        let latents = sample_latent(
            &b.mean,
            &b.logvar,
            &Tensor::from_vec(eps, (n, c, h, w), dev)?,
            self.latent_factor,
        )?;
        let mut noise = Tensor::from_vec(noise, (n, c, h, w), dev)?;
        if let Some(o) = offset {
            let o = (Tensor::from_vec(o, (n, c, 1, 1), dev)? * self.noise_offset as f64)?;
            noise = noise.broadcast_add(&o)?;
        }
        let coef: Vec<(f32, f32)> = ts.iter().map(|&t| self.schedule.coefficients(t)).collect();
        let col = |v: Vec<f32>| Tensor::from_vec(v, (n, 1, 1, 1), dev);
        let sa = col(coef.iter().map(|c| c.0).collect())?;
        let s1 = col(coef.iter().map(|c| c.1).collect())?;
        let noisy = (latents.broadcast_mul(&sa)? + noise.broadcast_mul(&s1)?)?;
        let target = match self.prediction {
            Prediction::Epsilon => noise,
            Prediction::VPrediction => (noise.broadcast_mul(&sa)? - latents.broadcast_mul(&s1)?)?,
            Prediction::Sample => latents,
        };
        let t_f32: Vec<f32> = ts.iter().map(|&t| t as f32).collect();
        let pred = self.unet.forward(&noisy, &t_f32, &b.context, ctx)?;
        let per_sample = (pred - target)?.sqr()?.flatten_from(1)?.mean(1)?;
        let per_sample = match self.snr_gamma {
            Some(g) => {
                let wts: Vec<f32> = ts
                    .iter()
                    .map(|&t| self.schedule.min_snr_weight(t, g, self.prediction))
                    .collect();
                (per_sample * Tensor::from_vec(wts, n, dev)?)?
            }
            None => per_sample,
        };
        Ok(per_sample.sum_all()?)
    }

    fn evaluate(&self, _batch_size: usize, _step: u64) -> Result<Option<EvalMetrics>> {
        Ok(None)
    }

    /// The same adapter in kohya's format, which the SD UIs load.
    fn save_extra(&self, dir: &Path) -> Result<()> {
        write_kohya(
            &self.unet,
            KohyaNaming::SdUnet,
            &self.meta,
            DType::F32,
            &dir.join(KOHYA_FILE),
        )?;
        Ok(())
    }
}
