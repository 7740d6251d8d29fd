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
use candle_core::{Tensor, D};
use std::path::Path;
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

/// Greedy decoding of one clip from `prompt` on its encoder `states` `(positions, d)`:
/// the checkpoint's `suppress_tokens` never, its `begin_suppress_tokens` not first,
/// until `<|endoftext|>` or the model's last position. Returns the generated tokens.
pub fn greedy(
    model: &Whisper,
    text: &WhisperText,
    states: &Tensor,
    prompt: &[u32],
    ctx: &ForwardCtx,
) -> Result<Vec<u32>> {
    let device = model.device();
    let vocab = model.cfg.vocab_size;
    let mut ids = prompt.to_vec();
    let room = model.cfg.max_target_positions.saturating_sub(prompt.len());
    let mask = |list: &[u32]| -> Result<Tensor> {
        let mut m = vec![0f32; vocab];
        for &t in list {
            if let Some(x) = m.get_mut(t as usize) {
                *x = f32::NEG_INFINITY;
            }
        }
        Ok(Tensor::from_vec(m, vocab, device)?)
    };
    let always = mask(&text.suppress)?;
    let first = mask(&[text.suppress.as_slice(), text.begin_suppress.as_slice()].concat())?;
    let cross = model.cross_kv(states, ctx)?;
    let mut out = Vec::new();
    for k in 0..room {
        let input = Tensor::from_vec(ids.clone(), (1, ids.len()), device)?;
        let last = model
            .decode_with(states, &input, Some(&cross), true, ctx)?
            .get(0)?;
        let last = (last + if k == 0 { &first } else { &always })?;
        let next = last.argmax(D::Minus1)?.to_scalar::<u32>()?;
        if next == text.eot {
            break;
        }
        out.push(next);
        ids.push(next);
    }
    Ok(out)
}

/// One 30 s window's transcription.
pub struct Window<'a> {
    /// Seconds from the start of the audio.
    pub start: f64,
    pub end: f64,
    pub text: &'a str,
    /// The generated tokens.
    pub tokens: &'a [u32],
}

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

    /// The text of 16 kHz mono `samples` in language `code`, 30 s at a time, joined
    /// with spaces; `on_window` hears each window as it is done.
    pub fn transcribe(
        &self,
        samples: &[f32],
        code: &str,
        on_window: &mut dyn FnMut(&Window),
    ) -> Result<String> {
        let prompt = self.text.prompt(code)?;
        let ctx = ForwardCtx::eval();
        let mut parts = Vec::new();
        if samples.is_empty() {
            return Err(Error::Data("the audio has no samples".into()));
        }
        for (w, window) in samples.chunks(N_SAMPLES).enumerate() {
            let states = self.encode(window, &ctx)?;
            let ids = greedy(&self.model, &self.text, &states, &prompt, &ctx)?;
            let t = self.text.decode(&ids)?;
            let start = (w * N_SAMPLES) as f64 / f64::from(SAMPLE_RATE);
            on_window(&Window {
                start,
                end: start + window.len() as f64 / f64::from(SAMPLE_RATE),
                text: &t,
                tokens: &ids,
            });
            if !t.is_empty() {
                parts.push(t);
            }
        }
        Ok(parts.join(" "))
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
