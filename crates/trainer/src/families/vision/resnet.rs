//! transformers' `ResNetForImageClassification`, built from differentiable ops with its
//! module names, so that adapters are PEFT's.
//!
//! Every convolution is a [`Conv2d`] that can carry PEFT's conv LoRA; the classifier
//! (`classifier.1`, a linear layer on the average-pooled features) is trained in full, as
//! PEFT's `modules_to_save: ["classifier"]` does. BatchNorm runs in eval mode with its
//! running statistics, frozen: a LoRA run does not update them (PEFT's would in
//! `model.train()`; with a frozen backbone and small batches, frozen statistics are the
//! usual choice and make a step independent of its batch's make-up).

use crate::io::{get_usize, Take, Weights};
use crate::lora::{Conv2d, ForwardCtx, Linear, LoraModel};
use crate::nn::FullLinear;
use crate::{Error, Result};
use candle_core::{Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::Value;
use std::path::Path;

/// Architectures with a port here (`model_type` in `config.json`).
pub const ARCHITECTURES: [&str; 1] = ["resnet"];

/// The most channels a layer may have, and residual layers a model, by its config.
const MAX_CHANNELS: usize = 65_536;
const MAX_LAYERS: usize = 1_000;

/// transformers' `BatchNorm2d` default.
const BN_EPS: f64 = 1e-5;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerType {
    /// Two 3×3 convolutions.
    Basic,
    /// 1×1 down, 3×3, 1×1 up (a quarter of the output channels inside).
    Bottleneck,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ResNetConfig {
    pub num_channels: usize,
    pub embedding_size: usize,
    pub hidden_sizes: Vec<usize>,
    pub depths: Vec<usize>,
    pub layer_type: LayerType,
    pub downsample_in_first_stage: bool,
    pub downsample_in_bottleneck: bool,
    /// The checkpoint's `id2label` names, in id order (transformers writes `LABEL_0`...
    /// when it was given none).
    pub id2label: Vec<String>,
}

fn usizes(v: &Value, key: &str) -> Result<Vec<usize>> {
    v.get(key)
        .and_then(|x| x.as_array())
        .and_then(|a| {
            a.iter()
                .map(|n| n.as_u64().map(|n| n as usize))
                .collect::<Option<Vec<_>>>()
        })
        .filter(|a| !a.is_empty())
        .ok_or_else(|| Error::Config(format!("config.json: \"{key}\" is not a list of sizes")))
}

impl ResNetConfig {
    /// Parses a HF `config.json` of a resnet model; options the port does not implement
    /// are an error that names them.
    pub fn from_hf_json(v: &Value) -> Result<Self> {
        let model_type = v.get("model_type").and_then(|x| x.as_str()).unwrap_or("");
        if model_type != "resnet" {
            return Err(Error::Unsupported(format!(
                "image model_type \"{model_type}\" (supported: {})",
                ARCHITECTURES.join(", ")
            )));
        }
        let act = v
            .get("hidden_act")
            .and_then(|x| x.as_str())
            .unwrap_or("relu");
        if act != "relu" {
            return Err(Error::Unsupported(format!(
                "config.json: hidden_act \"{act}\" (only relu)"
            )));
        }
        let layer_type = match v
            .get("layer_type")
            .and_then(|x| x.as_str())
            .unwrap_or("bottleneck")
        {
            "basic" => LayerType::Basic,
            "bottleneck" => LayerType::Bottleneck,
            other => {
                return Err(Error::Unsupported(format!(
                    "config.json: layer_type \"{other}\" (basic or bottleneck)"
                )))
            }
        };
        let hidden_sizes = usizes(v, "hidden_sizes")?;
        let depths = usizes(v, "depths")?;
        // Bounds before anything is sized from them: a config is read when a job is
        // created, in the server's process.
        let num_channels = get_usize(v, "num_channels")?;
        let embedding_size = get_usize(v, "embedding_size")?;
        let sizes_ok = |n: usize| (1..=MAX_CHANNELS).contains(&n);
        if !sizes_ok(num_channels)
            || !sizes_ok(embedding_size)
            || !hidden_sizes.iter().all(|&h| sizes_ok(h))
        {
            return Err(Error::Config(format!(
                "config.json: num_channels, embedding_size and hidden_sizes must be within 1..={MAX_CHANNELS}"
            )));
        }
        if depths.iter().fold(0usize, |a, &d| a.saturating_add(d)) > MAX_LAYERS {
            return Err(Error::Config(format!(
                "config.json: depths {depths:?} add up to more than {MAX_LAYERS} layers"
            )));
        }
        if hidden_sizes.len() != depths.len() || depths.contains(&0) {
            return Err(Error::Config(format!(
                "config.json: hidden_sizes {hidden_sizes:?} and depths {depths:?} must pair up, \
                 each stage at least one layer deep"
            )));
        }
        if layer_type == LayerType::Bottleneck && hidden_sizes.iter().any(|&h| h < 4) {
            return Err(Error::Config(
                "config.json: a bottleneck stage needs at least 4 channels".into(),
            ));
        }
        let mut id2label: Vec<(usize, String)> = v
            .get("id2label")
            .and_then(|m| m.as_object())
            .map(|m| {
                m.iter()
                    .filter_map(|(k, n)| Some((k.parse().ok()?, n.as_str()?.to_string())))
                    .collect()
            })
            .unwrap_or_default();
        id2label.sort();
        let flag = |k: &str| v.get(k).and_then(|x| x.as_bool()).unwrap_or(false);
        Ok(Self {
            num_channels,
            embedding_size,
            hidden_sizes,
            depths,
            layer_type,
            downsample_in_first_stage: flag("downsample_in_first_stage"),
            downsample_in_bottleneck: flag("downsample_in_bottleneck"),
            id2label: id2label.into_iter().map(|(_, n)| n).collect(),
        })
    }

    /// Reads a model folder's `config.json`.
    pub fn load(dir: &Path) -> Result<Self> {
        Self::from_hf_json(&crate::io::read_json(&dir.join("config.json"))?)
    }

    /// The stem's convolution and each residual layer's, in forward order.
    pub fn layout(&self) -> (ConvSpec, Vec<BlockSpec>) {
        let stem = ConvSpec {
            path: "resnet.embedder.embedder.convolution".into(),
            cin: self.num_channels,
            cout: self.embedding_size,
            k: 7,
            stride: 2,
            relu: true,
        };
        let mut blocks = Vec::new();
        let mut cin = self.embedding_size;
        for (s, (&cout, &depth)) in self.hidden_sizes.iter().zip(&self.depths).enumerate() {
            let first_stride = if s > 0 || self.downsample_in_first_stage {
                2
            } else {
                1
            };
            for l in 0..depth {
                let (inp, stride) = if l == 0 {
                    (cin, first_stride)
                } else {
                    (cout, 1)
                };
                let p = format!("resnet.encoder.stages.{s}.layers.{l}");
                let conv = |i: usize, cin, cout, k, stride, relu| ConvSpec {
                    path: format!("{p}.layer.{i}.convolution"),
                    cin,
                    cout,
                    k,
                    stride,
                    relu,
                };
                let convs = match self.layer_type {
                    LayerType::Basic => vec![
                        conv(0, inp, cout, 3, stride, true),
                        conv(1, cout, cout, 3, 1, false),
                    ],
                    LayerType::Bottleneck => {
                        let r = cout / 4;
                        let (s1, s3) = if self.downsample_in_bottleneck {
                            (stride, 1)
                        } else {
                            (1, stride)
                        };
                        vec![
                            conv(0, inp, r, 1, s1, true),
                            conv(1, r, r, 3, s3, true),
                            conv(2, r, cout, 1, 1, false),
                        ]
                    }
                };
                let shortcut = (inp != cout || stride != 1).then(|| ConvSpec {
                    path: format!("{p}.shortcut.convolution"),
                    cin: inp,
                    cout,
                    k: 1,
                    stride,
                    relu: false,
                });
                blocks.push(BlockSpec { shortcut, convs });
            }
            cin = cout;
        }
        (stem, blocks)
    }

    /// Every convolution's module path, in forward order.
    pub fn conv_paths(&self) -> Vec<String> {
        let (stem, blocks) = self.layout();
        std::iter::once(stem.path)
            .chain(
                blocks
                    .into_iter()
                    .flat_map(|b| b.shortcut.into_iter().chain(b.convs).map(|c| c.path)),
            )
            .collect()
    }

    /// The features the classifier reads.
    pub fn features(&self) -> usize {
        *self.hidden_sizes.last().unwrap_or(&self.embedding_size)
    }
}

/// One `ResNetConvLayer`: its convolution's path and shape, and whether a ReLU follows
/// (not after a layer's last conv or a shortcut: those add first).
#[derive(Debug, Clone, PartialEq)]
pub struct ConvSpec {
    pub path: String,
    pub cin: usize,
    pub cout: usize,
    pub k: usize,
    pub stride: usize,
    pub relu: bool,
}

/// One residual layer.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockSpec {
    pub shortcut: Option<ConvSpec>,
    pub convs: Vec<ConvSpec>,
}

/// An eval-mode BatchNorm folded into a per-channel scale and shift.
struct BatchNorm {
    scale: Tensor,
    shift: Tensor,
}

impl BatchNorm {
    fn load(t: &mut Take, path: &str, channels: usize, device: &Device) -> Result<Self> {
        let get = |t: &mut Take, k: &str| -> Result<Vec<f32>> {
            let v = t.get(&format!("{path}.{k}"))?;
            if v.dims() != [channels] {
                return Err(Error::Model(format!(
                    "{path}.{k} has shape {:?}, expected [{channels}]",
                    v.dims()
                )));
            }
            Ok(v.to_vec1::<f32>()?)
        };
        let (w, b) = (get(t, "weight")?, get(t, "bias")?);
        let (mean, var) = (get(t, "running_mean")?, get(t, "running_var")?);
        let scale: Vec<f32> = w
            .iter()
            .zip(&var)
            .map(|(w, v)| (f64::from(*w) / (f64::from(*v) + BN_EPS).sqrt()) as f32)
            .collect();
        let shift: Vec<f32> = b
            .iter()
            .zip(&mean)
            .zip(&scale)
            .map(|((b, m), s)| b - m * s)
            .collect();
        Ok(Self {
            scale: Tensor::from_vec(scale, (1, channels, 1, 1), device)?,
            shift: Tensor::from_vec(shift, (1, channels, 1, 1), device)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.broadcast_mul(&self.scale)?.broadcast_add(&self.shift)?)
    }
}

/// transformers' `ResNetConvLayer`: convolution, BatchNorm, ReLU unless it is a layer's
/// last.
struct ConvLayer {
    conv: Conv2d,
    norm: BatchNorm,
    relu: bool,
}

impl ConvLayer {
    fn forward(&self, x: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        let y = self.norm.forward(&self.conv.forward(x, ctx)?)?;
        Ok(if self.relu { y.relu()? } else { y })
    }
}

/// A residual layer: its convs, and the shortcut that reshapes the input when the
/// channels or the stride change.
struct Block {
    shortcut: Option<ConvLayer>,
    layers: Vec<ConvLayer>,
}

pub struct ResNet {
    pub cfg: ResNetConfig,
    pub num_labels: usize,
    stem: ConvLayer,
    blocks: Vec<Block>,
    /// The trained head, `classifier.1`.
    pub head: FullLinear,
    device: Device,
}

impl ResNet {
    /// Builds the model from HF-named f32 weights (with or without the `resnet.` prefix
    /// of a classifier checkpoint). The checkpoint's classifier is kept when its labels
    /// are `labels` (same names, same order); otherwise the head starts as PyTorch
    /// initialises a `Linear` (weight and bias U(±1/√in)), from `seed`.
    pub fn new(
        cfg: ResNetConfig,
        mut w: Weights,
        labels: &[String],
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        let num_labels = labels.len();
        if num_labels == 0 {
            return Err(Error::Config("num_labels must be at least 1".into()));
        }
        let (stem_spec, block_specs) = cfg.layout();
        let (stem, blocks) = {
            let mut t = Take::new(&mut w, "resnet");
            // A bare ResNetModel checkpoint names its modules without `resnet.`.
            let prefixed = t.has("resnet.embedder.embedder.convolution.weight");
            let t = &mut t;
            let mut layer = |c: &ConvSpec| -> Result<ConvLayer> {
                let key = if prefixed {
                    c.path.clone()
                } else {
                    c.path.trim_start_matches("resnet.").to_string()
                };
                let weight = t.get(&format!("{key}.weight"))?;
                let (cin, cout, k) = (c.cin, c.cout, c.k);
                if weight.dims() != [cout, cin, k, k] {
                    return Err(Error::Model(format!(
                        "{key}.weight has shape {:?}, the config says [{cout}, {cin}, {k}, {k}]",
                        weight.dims()
                    )));
                }
                let norm = key.replace(".convolution", ".normalization");
                Ok(ConvLayer {
                    conv: Conv2d::new(c.path.clone(), weight, None, c.stride, k / 2),
                    norm: BatchNorm::load(t, &norm, cout, device)?,
                    relu: c.relu,
                })
            };
            let stem = layer(&stem_spec)?;
            let blocks = block_specs
                .iter()
                .map(|b| {
                    Ok(Block {
                        shortcut: b.shortcut.as_ref().map(&mut layer).transpose()?,
                        layers: b.convs.iter().map(&mut layer).collect::<Result<_>>()?,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            (stem, blocks)
        };
        let f = cfg.features();
        let kept = match (
            w.remove("classifier.1.weight"),
            w.remove("classifier.1.bias"),
        ) {
            (Some(wt), Some(bt))
                if wt.dims() == [num_labels, f]
                    && bt.dims() == [num_labels]
                    && cfg.id2label == labels =>
            {
                Some((wt, bt))
            }
            _ => None,
        };
        let (weight, bias) = match kept {
            Some(p) => p,
            None => {
                let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x1A6E_C1A5_0000_0000);
                let bound = 1.0 / (f as f64).sqrt();
                let mut uniform = |n: usize| -> Vec<f32> {
                    (0..n)
                        .map(|_| (rng.random::<f64>() * 2.0 - 1.0) as f32 * bound as f32)
                        .collect()
                };
                (
                    Tensor::from_vec(uniform(num_labels * f), (num_labels, f), device)?,
                    Tensor::from_vec(uniform(num_labels), num_labels, device)?,
                )
            }
        };
        Ok(Self {
            cfg,
            num_labels,
            stem,
            blocks,
            head: FullLinear {
                path: "classifier.1".into(),
                weight: Var::from_tensor(&weight)?,
                bias: Var::from_tensor(&bias)?,
            },
            device: device.clone(),
        })
    }

    /// Loads `config.json` + safetensors from an HF folder, with a head for `labels`.
    pub fn load(dir: &Path, labels: &[String], seed: u64, device: &Device) -> Result<Self> {
        Self::load_with(ResNetConfig::load(dir)?, dir, labels, seed, device)
    }

    /// [`Self::load`] with the folder's config already read.
    pub fn load_with(
        cfg: ResNetConfig,
        dir: &Path,
        labels: &[String],
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        let weights = crate::io::read_safetensors_f32(dir, device)?;
        Self::new(cfg, weights, labels, seed, device)
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Logits `(n, num_labels)` of `pixel_values` `(n, channels, h, w)`.
    pub fn logits(&self, pixel_values: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        let c = pixel_values.dim(1)?;
        if c != self.cfg.num_channels {
            return Err(Error::Data(format!(
                "images have {c} channels, the model takes {}",
                self.cfg.num_channels
            )));
        }
        let x = self.stem.forward(pixel_values, ctx)?;
        let mut x = crate::ops::max_pool2d(&x, 3, 2, 1)?;
        for b in &self.blocks {
            let residual = match &b.shortcut {
                Some(s) => s.forward(&x, ctx)?,
                None => x.clone(),
            };
            let mut h = x;
            for l in &b.layers {
                h = l.forward(&h, ctx)?;
            }
            x = (h + residual)?.relu()?;
        }
        // AdaptiveAvgPool2d((1, 1)) and Flatten.
        let pooled = x.flatten_from(2)?.mean(2)?;
        self.head.forward(&pooled)
    }

    fn layers(&self) -> impl Iterator<Item = &ConvLayer> {
        std::iter::once(&self.stem).chain(
            self.blocks
                .iter()
                .flat_map(|b| b.shortcut.iter().chain(b.layers.iter())),
        )
    }
}

impl LoraModel for ResNet {
    fn linears_mut(&mut self) -> Vec<(&mut Linear, bool)> {
        Vec::new()
    }
    fn linears(&self) -> Vec<&Linear> {
        Vec::new()
    }
    fn convs_mut(&mut self) -> Vec<&mut Conv2d> {
        let mut out = vec![&mut self.stem.conv];
        for b in self.blocks.iter_mut() {
            if let Some(s) = b.shortcut.as_mut() {
                out.push(&mut s.conv);
            }
            out.extend(b.layers.iter_mut().map(|l| &mut l.conv));
        }
        out
    }
    fn convs(&self) -> Vec<&Conv2d> {
        self.layers().map(|l| &l.conv).collect()
    }
    fn task_type(&self) -> &'static str {
        // PEFT has no image-classification task type: its examples leave it null.
        ""
    }
    fn full_params(&self) -> Vec<(String, Var)> {
        self.head.params().into()
    }
    fn modules_to_save(&self) -> Vec<String> {
        vec!["classifier".into()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_configs_are_refused_before_anything_is_sized() {
        let base = serde_json::json!({"model_type": "resnet", "num_channels": 3, "embedding_size": 8,
            "hidden_sizes": [8, 16], "depths": [1, 1], "layer_type": "basic"});
        let cfg = ResNetConfig::from_hf_json(&base).unwrap();
        assert_eq!(cfg.conv_paths().len(), 1 + 2 + 3);
        for (key, value, says) in [
            (
                "depths",
                serde_json::json!([1_000_000_000_000u64, 1]),
                "layers",
            ),
            ("hidden_sizes", serde_json::json!([0, 16]), "within"),
            ("embedding_size", serde_json::json!(10_000_000), "within"),
            ("depths", serde_json::json!([1]), "pair up"),
            ("hidden_act", serde_json::json!("gelu"), "gelu"),
        ] {
            let mut v = base.clone();
            v[key] = value;
            let e = ResNetConfig::from_hf_json(&v).unwrap_err().to_string();
            assert!(e.contains(says), "{key}: {e}");
        }
    }
}
