//! Speech recognition on Whisper: clips and transcripts, teacher-forced cross entropy on
//! the transcript's tokens after the decoder prompt (the labels of transformers' Whisper
//! fine-tuning recipe, see [`super::tokenize`]), and on validation the loss, the
//! next-token accuracy and the WER of greedy transcriptions.

use super::dataset::{read_speech_zip, Utterance};
use super::features::{LogMel, N_FRAMES};
use super::tokenize::WhisperText;
use super::transcribe::{greedy, wer};
use super::whisper::Whisper;
use super::SpeechOptions;
use crate::archive::ZipLimits;
use crate::io::file_name;
use crate::lora::{ForwardCtx, LoraModel};
use crate::train::{EvalMetrics, Objective, TrainSpec};
use crate::{Error, Result};
use candle_core::{Device, Tensor, D};
use std::sync::atomic::AtomicBool;

/// A clip ready to batch: its samples, and `prompt + transcript + <|endoftext|>`.
struct Example {
    samples: Vec<f32>,
    ids: Vec<u32>,
    text: String,
    language: String,
}

/// Speech recognition on a Whisper model.
pub struct Asr {
    pub model: Whisper,
    pub text: WhisperText,
    mel: LogMel,
    name: String,
    train: Vec<Example>,
    valid: Option<Vec<Example>>,
}

/// A micro-batch: `(b, bins, frames)` features, `(b, t)` decoder input, the labels row by
/// row (`-100` where a shorter row is padded).
pub struct SpeechBatch {
    features: Tensor,
    decoder_ids: Tensor,
    labels: Vec<i64>,
    scored: usize,
}

fn examples(
    data: Vec<Utterance>,
    text: &WhisperText,
    default_language: &str,
    max_tokens: usize,
    what: &str,
) -> Result<Vec<Example>> {
    data.into_iter()
        .map(|u| {
            let language = u
                .language
                .clone()
                .unwrap_or_else(|| default_language.to_string());
            let at = |m: String| Error::Data(format!("{what}: {}: {m}", u.name));
            let ids = text.full(&u.text, &language).map_err(|e| match e {
                Error::Data(m) | Error::Tokenizer(m) => at(m),
                e => e,
            })?;
            // The decoder reads all but the last token.
            if ids.len() - 1 > max_tokens {
                return Err(at(format!(
                    "the transcript is {} tokens with its prompt; the model's decoder has {} \
                     positions",
                    ids.len(),
                    max_tokens
                )));
            }
            Ok(Example {
                samples: u.samples,
                ids,
                text: u.text,
                language,
            })
        })
        .collect()
}

impl Asr {
    pub fn load(spec: &TrainSpec) -> Result<Self> {
        let language = spec
            .options
            .get::<SpeechOptions>()
            .map(|o| o.language.clone())
            .unwrap_or_else(|| super::DEFAULT_LANGUAGE.to_string());
        let model = Whisper::load(&spec.model, &spec.device)?;
        let text = WhisperText::load(&spec.model)?;
        let mel = super::check_preprocessor(&spec.model, &model.cfg)?;
        let limits = ZipLimits::default();
        let max = model.cfg.max_target_positions;
        let train = read_speech_zip(&spec.data, &limits)?;
        let train = examples(
            train.examples,
            &text,
            &language,
            max,
            &file_name(&spec.data),
        )?;
        let valid = match &spec.validation {
            Some(p) => {
                let v = read_speech_zip(p, &limits)?;
                Some(examples(v.examples, &text, &language, max, &file_name(p))?)
            }
            None => None,
        };
        Ok(Self {
            name: crate::io::base_reference(&spec.model, None),
            model,
            text,
            mel,
            train,
            valid,
        })
    }

    fn features(&self, rows: &[&Example]) -> Result<Tensor> {
        features_batch(
            &self.mel,
            &rows
                .iter()
                .map(|e| e.samples.as_slice())
                .collect::<Vec<_>>(),
            self.model.device(),
        )
    }

    fn make(&self, rows: &[&Example]) -> Result<SpeechBatch> {
        let t = rows.iter().map(|e| e.ids.len() - 1).max().unwrap_or(0);
        let mut dec = Vec::with_capacity(rows.len() * t);
        let mut labels = Vec::with_capacity(rows.len() * t);
        for e in rows {
            let n = e.ids.len() - 1;
            dec.extend_from_slice(&e.ids[..n]);
            dec.extend(std::iter::repeat_n(self.text.eot, t - n));
            labels.extend(e.ids[1..].iter().map(|&i| i64::from(i)));
            labels.extend(std::iter::repeat_n(-100, t - n));
        }
        let scored = labels.iter().filter(|&&l| l >= 0).count();
        Ok(SpeechBatch {
            features: self.features(rows)?,
            decoder_ids: Tensor::from_vec(dec, (rows.len(), t), self.model.device())?,
            labels,
            scored,
        })
    }
}

/// Log-mel features of 16 kHz clips as one `(n, bins, 3000)` tensor.
pub fn features_batch(mel: &LogMel, clips: &[&[f32]], device: &Device) -> Result<Tensor> {
    let mut v = Vec::with_capacity(clips.len() * mel.bins * N_FRAMES);
    for c in clips {
        v.extend(mel.compute(c));
    }
    Ok(Tensor::from_vec(
        v,
        (clips.len(), mel.bins, N_FRAMES),
        device,
    )?)
}

impl Objective for Asr {
    type Batch = SpeechBatch;
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
    fn batch(&self, idx: &[usize]) -> Result<SpeechBatch> {
        self.make(&idx.iter().map(|&i| &self.train[i]).collect::<Vec<_>>())
    }
    fn units(b: &SpeechBatch) -> usize {
        b.scored
    }
    fn tokens(b: &SpeechBatch) -> usize {
        b.scored
    }
    fn loss_sum(&self, b: &SpeechBatch, ctx: &ForwardCtx) -> Result<Tensor> {
        Ok(self
            .model
            .loss_sum(&b.features, &b.decoder_ids, &b.labels, ctx)?
            .0)
    }
    fn evaluate(&self, batch_size: usize, step: u64) -> Result<Option<EvalMetrics>> {
        let Some(valid) = &self.valid else {
            return Ok(None);
        };
        let ctx = ForwardCtx::eval();
        // The loop checks its own stop flag between steps; an evaluation runs whole.
        let never = AtomicBool::new(false);
        let (mut sum, mut right, mut scored) = (0f64, 0usize, 0usize);
        let mut pairs: Vec<(String, String)> = Vec::new();
        for chunk in valid.chunks(batch_size.max(1)) {
            let rows: Vec<&Example> = chunk.iter().collect();
            let b = self.make(&rows)?;
            let states = self.model.encode(&b.features, &ctx)?;
            let (kept, gold) =
                self.model
                    .scored_logits(&states, &b.decoder_ids, &b.labels, &ctx)?;
            sum += crate::ops::cross_entropy_rows(&kept, &gold)?
                .sum_all()?
                .to_scalar::<f32>()? as f64;
            let pred = kept.argmax(D::Minus1)?.to_vec1::<u32>()?;
            right += pred.iter().zip(&gold).filter(|(p, g)| p == g).count();
            scored += gold.len();
            // Greedy transcriptions, a clip at a time, on the states just computed.
            let s = self.model.cfg.max_source_positions;
            for (i, e) in chunk.iter().enumerate() {
                let one = states.narrow(0, i * s, s)?;
                let prompt = self.text.prompt(&e.language)?;
                let d = greedy(&self.model, &self.text, &one, &prompt, &ctx, &never)?;
                pairs.push((e.text.clone(), self.text.decode(&d.tokens)?));
            }
        }
        let accuracy = right as f64 / scored.max(1) as f64;
        Ok(Some(EvalMetrics {
            step,
            loss: sum / scored.max(1) as f64,
            mean_token_accuracy: accuracy,
            tokens: scored as u64,
            accuracy: None,
            macro_f1: None,
            reward_margin: None,
            reward_accuracy: None,
            wer: wer(pairs.iter().map(|(r, h)| (r.as_str(), h.as_str()))),
        }))
    }
}
