//! Inference with an image-classification adapter: label probabilities for images.

use super::objective::pixel_batch;
use super::preprocess::Preprocessor;
use super::resnet::ResNet;
use crate::classes::{LabelSet, Prediction};
use crate::lora::{self, ForwardCtx};
use crate::Result;
use candle_core::Device;
use image::RgbImage;
use std::path::Path;

/// A base ResNet with an adapter (LoRA + head), its label set and image processor.
pub struct ImageClassifier {
    pub model: ResNet,
    pub labels: LabelSet,
    pre: Preprocessor,
}

impl ImageClassifier {
    pub fn load(model: &Path, adapter: &Path, device: &Device) -> Result<Self> {
        let labels = LabelSet::load(adapter)?;
        let mut net = ResNet::load(model, &labels.names, 0, device)?;
        let cfg = lora::read_adapter_config(adapter)?;
        lora::attach(&mut net, &cfg, 0)?;
        lora::load_adapter_weights(&net, adapter)?;
        let pre = Preprocessor::load(model, net.cfg.num_channels)?;
        Ok(Self {
            model: net,
            labels,
            pre,
        })
    }

    /// Softmax probabilities per label for each image, with the arg-max label.
    pub fn predict(&self, images: &[RgbImage]) -> Result<Vec<Prediction>> {
        let prepared = images
            .iter()
            .map(|i| self.pre.prepare(i))
            .collect::<Result<Vec<_>>>()?;
        let mut out = Vec::with_capacity(images.len());
        // One at a time: images of different shapes prepare to one size only when the
        // processor resizes.
        for img in &prepared {
            let x = pixel_batch(&self.pre, &[img], self.model.device())?;
            let logits = self.model.logits(&x, &ForwardCtx::eval())?;
            let p: Vec<f32> = crate::ops::softmax_last(&logits)?
                .flatten_all()?
                .to_vec1()?;
            let best = p
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map_or(0, |(i, _)| i);
            out.push(Prediction {
                labels: vec![self.labels.names[best].clone()],
                scores: self.labels.names.iter().cloned().zip(p).collect(),
            });
        }
        Ok(out)
    }
}
