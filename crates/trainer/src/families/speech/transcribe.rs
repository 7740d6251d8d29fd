//! Transcribing with a Whisper model (and an adapter): greedy decoding over 30 s windows
//! with the checkpoint's token suppression, and the word error rate the validation set
//! is scored with.
//!
//! WER is computed as the HF Whisper fine-tuning recipe does with `evaluate`'s `wer`
//! (jiwer): word edits (substitutions, deletions, insertions) summed over the set,
//! divided by the reference words, after both sides pass transformers'
//! `BasicTextNormalizer`: lower case, `[...]`/`<...>` and `(...)` removed, NFKC, every
//! Unicode mark, symbol and punctuation character made a space, runs of whitespace one
//! space. It is reported as a fraction (0.25, not 25).

use super::audio::SAMPLE_RATE;
use super::features::{LogMel, N_FRAMES, N_SAMPLES};
use super::tokenize::WhisperText;
use super::whisper::Whisper;
use crate::lora::hotswap::{apply, AdapterWeights};
use crate::lora::ForwardCtx;
use crate::{Error, Result};
use candle_core::Tensor;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use unicode_categories::UnicodeCategories;
use unicode_normalization::UnicodeNormalization;

/// transformers' `BasicTextNormalizer` (without diacritics removal), which the Whisper
/// fine-tuning recipe scores with.
pub fn normalize(s: &str) -> String {
    let s = s.to_lowercase();
    let s = drop_spans(&s, &[('[', ']'), ('<', '>'), ('[', '>'), ('<', ']')], false);
    let s = drop_spans(&s, &[('(', ')')], true);
    let cleaned: String = s
        .nfkc()
        .map(|c| {
            if c.is_mark() || c.is_symbol() || c.is_punctuation() {
                ' '
            } else {
                c
            }
        })
        .collect();
    cleaned
        .to_lowercase()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// Removes `open … close` spans as the recipe's regexes do: `[<\[][^>\]]*[>\]]` (no
/// closer of either kind inside) and `\(([^)]+?)\)` (`nonempty`: at least one char).
fn drop_spans(s: &str, pairs: &[(char, char)], nonempty: bool) -> String {
    let chars: Vec<char> = s.chars().collect();
    let closers: Vec<char> = pairs.iter().map(|p| p.1).collect();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if pairs.iter().any(|p| p.0 == c) {
            // The first closer of any pair ends the span; it must pair with this opener.
            if let Some(j) = (i + 1..chars.len()).find(|&j| closers.contains(&chars[j])) {
                if pairs.contains(&(c, chars[j])) && (!nonempty || j > i + 1) {
                    i = j + 1;
                    continue;
                }
            }
        }
        out.push(c);
        i += 1;
    }
    out
}

/// Word edits between a normalised reference and hypothesis, and the reference's words.
pub fn word_errors(reference: &str, hypothesis: &str) -> (usize, usize) {
    let r: Vec<&str> = reference.split_whitespace().collect();
    let h: Vec<&str> = hypothesis.split_whitespace().collect();
    let mut prev: Vec<usize> = (0..=h.len()).collect();
    for (i, rw) in r.iter().enumerate() {
        let mut cur = vec![i + 1; h.len() + 1];
        for (j, hw) in h.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(rw != hw))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    (prev[h.len()], r.len())
}

/// WER over pairs of `(reference, hypothesis)` as written (both are normalised here);
/// `None` when the references have no words at all.
pub fn wer<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Option<f64> {
    let (mut errors, mut words) = (0usize, 0usize);
    for (r, h) in pairs {
        let (e, n) = word_errors(&normalize(r), &normalize(h));
        errors += e;
        words += n;
    }
    (words > 0).then(|| errors as f64 / words as f64)
}

/// What greedy decoding produced for one window.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    /// The generated tokens, `<|endoftext|>` left out.
    pub tokens: Vec<u32>,
    /// The mean log-probability of the chosen tokens, the end included (OpenAI's
    /// `avg_logprob`), after suppression.
    pub avg_logprob: f64,
}

/// `log Σ exp(x)`, stably.
fn log_sum_exp(x: &[f32]) -> f64 {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    if !max.is_finite() {
        return max;
    }
    max + x.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln()
}

/// The index of the largest value (the first of equals, as torch's argmax).
fn argmax(x: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best
}

/// Greedy decoding of one clip from `prompt` on its encoder `states` `(positions, d)`:
/// the checkpoint's `suppress_tokens` never, its `begin_suppress_tokens` not first,
/// until `<|endoftext|>` or half the model's positions (224 new tokens on Whisper's 448,
/// OpenAI's `sample_len`); stops with [`Error::Cancelled`] when `cancel` is set.
pub fn greedy(
    model: &Whisper,
    text: &WhisperText,
    states: &Tensor,
    prompt: &[u32],
    ctx: &ForwardCtx,
    cancel: &AtomicBool,
) -> Result<Decoded> {
    let cross = model.cross_kv(states, ctx)?;
    greedy_with(model, text, states, &cross, prompt, ctx, cancel)
}

/// [`greedy`] on cross-attention keys and values already computed ([`Whisper::cross_kv`]
/// of `states`), so that a window's language detection and decoding share them.
pub fn greedy_with(
    model: &Whisper,
    text: &WhisperText,
    states: &Tensor,
    cross: &[(Tensor, Tensor)],
    prompt: &[u32],
    ctx: &ForwardCtx,
    cancel: &AtomicBool,
) -> Result<Decoded> {
    let device = model.device();
    let max_new = (model.cfg.max_target_positions / 2)
        .min(model.cfg.max_target_positions.saturating_sub(prompt.len()));
    let mut ids = prompt.to_vec();
    let (mut tokens, mut logprob) = (Vec::new(), 0f64);
    for k in 0..max_new {
        if cancel.load(Ordering::Relaxed) {
            return Err(Error::Cancelled);
        }
        let input = Tensor::from_vec(ids.clone(), (1, ids.len()), device)?;
        let mut last: Vec<f32> = model
            .decode_with(states, &input, Some(cross), true, ctx)?
            .get(0)?
            .to_vec1()?;
        let lists: [&[u32]; 2] = [&text.suppress, &text.begin_suppress];
        for list in &lists[..if k == 0 { 2 } else { 1 }] {
            for &t in *list {
                if let Some(x) = last.get_mut(t as usize) {
                    *x = f32::NEG_INFINITY;
                }
            }
        }
        let next = argmax(&last);
        logprob += last[next] as f64 - log_sum_exp(&last);
        if next as u32 == text.eot {
            return Ok(Decoded {
                avg_logprob: logprob / (tokens.len() + 1) as f64,
                tokens,
            });
        }
        tokens.push(next as u32);
        ids.push(next as u32);
    }
    Ok(Decoded {
        avg_logprob: logprob / tokens.len().max(1) as f64,
        tokens,
    })
}

/// What the decoder says after `<|startoftranscript|>` alone: the most likely language
/// (multilingual models) and the probability of `<|nospeech|>`; `cross` is
/// [`Whisper::cross_kv`] of `states`.
pub fn first_step(
    model: &Whisper,
    text: &WhisperText,
    states: &Tensor,
    cross: &[(Tensor, Tensor)],
    ctx: &ForwardCtx,
) -> Result<(Option<String>, Option<f64>)> {
    let input = Tensor::from_vec(vec![text.sot], (1, 1), model.device())?;
    let logits: Vec<f32> = model
        .decode_with(states, &input, Some(cross), true, ctx)?
        .get(0)?
        .to_vec1()?;
    let language = text
        .languages()
        .filter(|(_, i)| (*i as usize) < logits.len())
        .max_by(|a, b| logits[a.1 as usize].total_cmp(&logits[b.1 as usize]))
        .map(|(c, _)| c.to_string());
    let lse = log_sum_exp(&logits);
    let no_speech = text
        .no_speech
        .and_then(|t| logits.get(t as usize))
        .map(|&v| (v as f64 - lse).exp());
    Ok((language, no_speech))
}

/// One 30 s window's transcription.
pub struct Window<'a> {
    /// Seconds from the start of the audio.
    pub start: f64,
    pub end: f64,
    pub text: &'a str,
    pub decoded: &'a Decoded,
    /// OpenAI's `no_speech_prob`, when the vocabulary has the token.
    pub no_speech_prob: Option<f64>,
}

/// A transcription: its text and the language it was decoded in.
#[derive(Debug, Clone, PartialEq)]
pub struct Transcript {
    pub text: String,
    /// The code asked for, the detected one, or `en` on English-only models.
    pub language: String,
}

/// A tail shorter than this (0.1 s) after a full window is not decoded: no word fits,
/// and Whisper invents text for silence.
const MIN_TAIL_SAMPLES: usize = 1_600;

/// A Whisper model ready to transcribe: its weights, tokenizer and feature extractor.
pub struct Transcriber {
    pub model: Whisper,
    pub text: WhisperText,
    pub mel: LogMel,
}

impl Transcriber {
    /// Loads a Whisper folder.
    pub fn load(dir: &Path, device: &candle_core::Device) -> Result<Self> {
        let model = Whisper::load(dir, device)?;
        let text = WhisperText::load(dir)?;
        let mel = super::check_preprocessor(dir, &model.cfg)?;
        Ok(Self { model, text, mel })
    }

    /// Computes with `adapter` switched in (or none); see [`crate::lora::hotswap`].
    pub fn use_adapter(&mut self, adapter: Option<&AdapterWeights>) -> Result<()> {
        apply(&mut self.model, adapter)
    }

    /// The encoder's states of one window of 16 kHz samples (at most 30 s).
    pub fn encode(&self, samples: &[f32], ctx: &ForwardCtx) -> Result<Tensor> {
        let feats = self.mel.compute(samples);
        let t = Tensor::from_vec(feats, (1, self.mel.bins, N_FRAMES), self.model.device())?;
        self.model.encode(&t, ctx)
    }

    /// The text of 16 kHz mono `samples`, 30 s at a time, joined with spaces, in
    /// language `code`, or (`None`) the one detected on the first window; `on_window`
    /// hears each window as it is done. Transcripts of up to 30 s are token for token
    /// transformers' `generate(language=..., task="transcribe")`; longer audio is cut
    /// into windows that do not overlap (transformers seeks by timestamps instead).
    pub fn transcribe(
        &self,
        samples: &[f32],
        code: Option<&str>,
        cancel: &AtomicBool,
        on_window: &mut dyn FnMut(&Window),
    ) -> Result<Transcript> {
        if samples.is_empty() {
            return Err(Error::Data("the audio has no samples".into()));
        }
        let ctx = ForwardCtx::eval();
        let mut language = code.map(str::to_string);
        if let Some(c) = &language {
            self.text.prompt(c)?;
        }
        let mut parts = Vec::new();
        for (w, window) in samples.chunks(N_SAMPLES).enumerate() {
            if w > 0 && window.len() < MIN_TAIL_SAMPLES {
                break;
            }
            let states = self.encode(window, &ctx)?;
            let cross = self.model.cross_kv(&states, &ctx)?;
            let (detected, no_speech_prob) =
                first_step(&self.model, &self.text, &states, &cross, &ctx)?;
            let code = language
                .get_or_insert_with(|| detected.unwrap_or_else(|| "en".to_string()))
                .clone();
            let prompt = self.text.prompt(&code)?;
            let decoded = greedy_with(
                &self.model,
                &self.text,
                &states,
                &cross,
                &prompt,
                &ctx,
                cancel,
            )?;
            let t = self.text.decode(&decoded.tokens)?;
            let start = (w * N_SAMPLES) as f64 / f64::from(SAMPLE_RATE);
            on_window(&Window {
                start,
                end: start + window.len() as f64 / f64::from(SAMPLE_RATE),
                text: &t,
                decoded: &decoded,
                no_speech_prob,
            });
            if !t.is_empty() {
                parts.push(t);
            }
        }
        Ok(Transcript {
            text: parts.join(" "),
            language: language.unwrap_or_else(|| "en".to_string()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_normaliser_is_transformers_basic_one() {
        // transformers' BasicTextNormalizer()(s), trimmed (it keeps an edge space).
        assert_eq!(normalize("Hello, World!"), "hello world");
        assert_eq!(normalize("  It's [MUSIC] a (quiet) test.  "), "it s a test");
        assert_eq!(normalize("Zorblax-3000: $5 <unk>"), "zorblax 3000 5");
        assert_eq!(normalize("Ｆｕｌｌ width"), "full width");
        assert_eq!(normalize("a () b"), "a b");
        assert_eq!(normalize("Crème brûlée"), "crème brûlée");
        assert_eq!(normalize("[a [b] c"), "c");
        assert_eq!(normalize("x <y] z"), "x z");
    }

    #[test]
    fn word_error_rate_counts_edits_over_reference_words() {
        assert_eq!(word_errors("a b c d", "a x c d"), (1, 4));
        assert_eq!(word_errors("a b c d", "a c d"), (1, 4));
        assert_eq!(word_errors("a b", "a b c d"), (2, 2));
        assert_eq!(word_errors("", "a"), (1, 0));
        let w = wer([("Hello world.", "hello, world"), ("The cat sat", "the hat")]).unwrap();
        assert!((w - 2.0 / 5.0).abs() < 1e-12, "{w}");
        assert_eq!(wer([("...", "x")]), None);
    }
}
