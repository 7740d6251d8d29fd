//! Image classification on a ResNet: labelled images, the label set that sizes the head,
//! cross entropy, and accuracy / macro-F1 on validation.

use super::dataset::{read_labelled_zip, LabelledImages};
use super::preprocess::Preprocessor;
use super::resnet::{ResNet, ResNetConfig};
use crate::archive::ZipLimits;
use crate::classes::{
    accuracy_macro_f1, classification_loss, LabelSet, ProblemType, Targets, LABELS_FILE,
};
use crate::io::file_name;
use crate::lora::{ForwardCtx, LoraModel};
use crate::train::{EvalMetrics, Objective, TrainSpec};
use crate::{Error, Result};
use candle_core::{Device, Tensor, D};
use image::RgbImage;
use std::collections::HashMap;
use std::path::Path;

/// Image classification on a ResNet.
pub struct ImageCls {
    pub model: ResNet,
    pub labels: LabelSet,
    pre: Preprocessor,
    name: String,
    train: Vec<(RgbImage, u32)>,
    valid: Option<Vec<(RgbImage, u32)>>,
}

/// A classification micro-batch: `(n, c, h, w)` pixels and a class per image.
pub struct ImageBatch {
    pixels: Tensor,
    classes: Vec<u32>,
}

/// A single-label set of these names.
pub fn label_set(names: Vec<String>) -> LabelSet {
    LabelSet {
        problem_type: ProblemType::SingleLabelClassification,
        names,
    }
}

/// A zip's prepared images with their label ids; every label must be in `set`, every
/// image the same size.
fn examples(
    data: LabelledImages,
    set: &LabelSet,
    what: &str,
    train_name: &str,
) -> Result<Vec<(RgbImage, u32)>> {
    let ids: HashMap<&str, u32> = set
        .names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.as_str(), i as u32))
        .collect();
    let mut size = None;
    data.examples
        .into_iter()
        .map(|e| {
            let id = *ids.get(e.label.as_str()).ok_or_else(|| {
                Error::Data(format!(
                    "{what}: {}: label \"{}\" is not one of the {} labels of {train_name} ({})",
                    e.name,
                    e.label,
                    set.names.len(),
                    set.names.join(", ")
                ))
            })?;
            let dims = e.image.dimensions();
            let first = *size.get_or_insert(dims);
            if first != dims {
                return Err(Error::Data(format!(
                    "{what}: {} is {}x{} and other images {}x{}: the model's {} does not resize, \
                     so every image must have one size",
                    e.name,
                    dims.0,
                    dims.1,
                    first.0,
                    first.1,
                    super::preprocess::PREPROCESSOR_FILE
                )));
            }
            Ok((e.image, id))
        })
        .collect()
}

impl ImageCls {
    /// Reads the data first: the training zip's folders are the label set, unless an
    /// adapter to start from or resume brings its own, which the data must fit. Each
    /// image is resized to the model's input as it is decoded.
    pub fn load(spec: &TrainSpec, adapter: Option<&Path>) -> Result<Self> {
        let limits = ZipLimits::default();
        let data_name = file_name(&spec.data);
        let cfg = ResNetConfig::load(&spec.model)?;
        let pre = Preprocessor::load(&spec.model, cfg.num_channels)?;
        let prepare = |img: &RgbImage| pre.prepare(img);
        let train = read_labelled_zip(&spec.data, &limits, &prepare)?;
        let set = match adapter.filter(|d| d.join(LABELS_FILE).is_file()) {
            Some(d) => LabelSet::load(d)?,
            None => {
                let names = train.labels();
                if names.len() < 2 {
                    return Err(Error::Data(format!(
                        "{data_name}: one class folder ({}); classification needs at least two",
                        names.join(", ")
                    )));
                }
                label_set(names)
            }
        };
        let train = examples(train, &set, &data_name, &data_name)?;
        let valid = match &spec.validation {
            Some(p) => {
                let v = read_labelled_zip(p, &limits, &prepare)?;
                Some(examples(v, &set, &file_name(p), &data_name)?)
            }
            None => None,
        };
        let model = ResNet::load_with(cfg, &spec.model, &set.names, spec.seed, &spec.device)?;
        Ok(Self {
            name: crate::io::base_reference(&spec.model, None),
            model,
            labels: set,
            pre,
            train,
            valid,
        })
    }

    fn make(&self, rows: &[&(RgbImage, u32)]) -> Result<ImageBatch> {
        pixel_batch(
            &self.pre,
            &rows.iter().map(|(img, _)| img).collect::<Vec<_>>(),
            self.model.device(),
        )
        .map(|pixels| ImageBatch {
            pixels,
            classes: rows.iter().map(|(_, c)| *c).collect(),
        })
    }
}

/// Prepared images as one `(n, c, h, w)` tensor.
pub fn pixel_batch(pre: &Preprocessor, images: &[&RgbImage], device: &Device) -> Result<Tensor> {
    let (w, h) = images
        .first()
        .map(|i| i.dimensions())
        .ok_or_else(|| Error::Data("an empty batch".into()))?;
    let mut v = Vec::with_capacity(images.len() * pre.channels * (w * h) as usize);
    for img in images {
        v.extend(pre.normalize(img));
    }
    Ok(Tensor::from_vec(
        v,
        (images.len(), pre.channels, h as usize, w as usize),
        device,
    )?)
}

impl Objective for ImageCls {
    type Batch = ImageBatch;
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
    fn batch(&self, idx: &[usize]) -> Result<ImageBatch> {
        self.make(&idx.iter().map(|&i| &self.train[i]).collect::<Vec<_>>())
    }
    fn units(b: &ImageBatch) -> usize {
        b.classes.len()
    }
    fn tokens(b: &ImageBatch) -> usize {
        // Progress counts images where text families count tokens.
        b.classes.len()
    }
    fn loss_sum(&self, b: &ImageBatch, ctx: &ForwardCtx) -> Result<Tensor> {
        let logits = self.model.logits(&b.pixels, ctx)?;
        Ok(classification_loss(
            &logits,
            ProblemType::SingleLabelClassification,
            &Targets::Classes(b.classes.clone()),
        )?
        .0)
    }
    fn evaluate(&self, batch_size: usize, step: u64) -> Result<Option<EvalMetrics>> {
        let Some(valid) = &self.valid else {
            return Ok(None);
        };
        let ctx = ForwardCtx::eval();
        let (mut sum, mut pred, mut gold) = (0f64, Vec::new(), Vec::new());
        for chunk in valid.chunks(batch_size.max(1)) {
            let b = self.make(&chunk.iter().collect::<Vec<_>>())?;
            let logits = self.model.logits(&b.pixels, &ctx)?;
            let (l, _) = classification_loss(
                &logits,
                ProblemType::SingleLabelClassification,
                &Targets::Classes(b.classes.clone()),
            )?;
            sum += l.to_scalar::<f32>()? as f64;
            pred.extend(logits.argmax(D::Minus1)?.to_vec1::<u32>()?);
            gold.extend(b.classes);
        }
        let (accuracy, macro_f1) = accuracy_macro_f1(&pred, &gold, self.labels.num_labels());
        Ok(Some(EvalMetrics {
            step,
            loss: sum / valid.len().max(1) as f64,
            mean_token_accuracy: accuracy,
            tokens: valid.len() as u64,
            accuracy: Some(accuracy),
            macro_f1: Some(macro_f1),
            reward_margin: None,
            reward_accuracy: None,
            wer: None,
        }))
    }
    fn save_extra(&self, dir: &Path) -> Result<()> {
        self.labels.save(dir)
    }
}
