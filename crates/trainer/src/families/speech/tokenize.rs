//! Whisper's text side: the model folder's `tokenizer.json`, the decoder prompt
//! (`<|startoftranscript|><|lang|><|transcribe|><|notimestamps|>`; English-only models
//! have no language or task token) and the labels transformers' fine-tuning recipe
//! builds from it, and what `generation_config.json` says about decoding.
//!
//! The recipe tokenizes a transcript with the prefix set (`tokenizer(text).input_ids` =
//! prompt + text tokens + `<|endoftext|>`); its collator cuts the leading
//! `<|startoftranscript|>` from the labels, and the model shifts them right to make the
//! decoder's input. So for `full` = prompt + text + end, the decoder reads `full[..n-1]`
//! and is scored on `full[1..]`: the language, task and no-timestamps tokens are
//! predicted too.

use crate::{Error, Result};
use std::collections::HashMap;
use std::path::Path;

pub const SOT: &str = "<|startoftranscript|>";
pub const EOT: &str = "<|endoftext|>";
pub const TRANSCRIBE: &str = "<|transcribe|>";
pub const NO_TIMESTAMPS: &str = "<|notimestamps|>";

/// The tokenizer and the special tokens a transcription is framed with.
#[derive(Clone)]
pub struct WhisperText {
    tok: tokenizers::Tokenizer,
    pub sot: u32,
    pub eot: u32,
    /// `None` on English-only models.
    pub transcribe: Option<u32>,
    pub no_timestamps: u32,
    /// Language codes (`en`) and their tokens, when the model is multilingual.
    languages: HashMap<String, u32>,
    /// Tokens generation never emits (`suppress_tokens`).
    pub suppress: Vec<u32>,
    /// Tokens it does not emit first (`begin_suppress_tokens`).
    pub begin_suppress: Vec<u32>,
    /// `<|nospeech|>` (`<|nocaptions|>` in older vocabularies), when there is one: its
    /// probability after `<|startoftranscript|>` is OpenAI's `no_speech_prob`.
    pub no_speech: Option<u32>,
    /// The first special token: Whisper's vocabularies put `<|endoftext|>` and every
    /// `<|...|>` after the text tokens, and decoded text leaves them out.
    special_from: u32,
}

fn ids(v: &serde_json::Value, key: &str) -> Vec<u32> {
    v.get(key)
        .and_then(|x| x.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|i| i.as_u64().and_then(|i| u32::try_from(i).ok()))
                .collect()
        })
        .unwrap_or_default()
}

impl WhisperText {
    /// Reads `tokenizer.json` and `generation_config.json` (optional) from a model
    /// folder.
    pub fn load(dir: &Path) -> Result<Self> {
        let tp = dir.join("tokenizer.json");
        if !tp.is_file() {
            return Err(Error::Tokenizer(format!(
                "{}: no tokenizer.json (a Whisper folder needs one to read and write \
                 transcripts)",
                dir.display()
            )));
        }
        let tok = tokenizers::Tokenizer::from_file(&tp)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", tp.display())))?;
        let id = |t: &str| {
            tok.token_to_id(t).ok_or_else(|| {
                Error::Tokenizer(format!(
                    "{}: no {t} token: not a Whisper tokenizer",
                    tp.display()
                ))
            })
        };
        let (sot, eot, no_timestamps) = (id(SOT)?, id(EOT)?, id(NO_TIMESTAMPS)?);
        let gen_path = dir.join("generation_config.json");
        let gen: serde_json::Value = if gen_path.is_file() {
            crate::io::read_json(&gen_path)?
        } else {
            serde_json::Value::Null
        };
        // A language token is `<|xx|>` with a short lower-case code, as Whisper's are.
        let mut languages = HashMap::new();
        for (t, i) in tok.get_added_vocabulary().get_vocab() {
            if let Some(code) = t.strip_prefix("<|").and_then(|c| c.strip_suffix("|>")) {
                if (2..=3).contains(&code.len()) && code.chars().all(|c| c.is_ascii_lowercase()) {
                    languages.insert(code.to_string(), *i);
                }
            }
        }
        // transformers' rule where the generation config does not say: English-only
        // vocabularies are one token shorter than the multilingual 51,865.
        let multilingual = gen
            .get("is_multilingual")
            .and_then(|m| m.as_bool())
            .unwrap_or(tok.get_vocab_size(true) >= 51_865);
        if !multilingual {
            languages.clear();
        }
        let transcribe = if multilingual {
            Some(id(TRANSCRIBE)?)
        } else {
            None
        };
        let no_speech = tok
            .token_to_id("<|nospeech|>")
            .or_else(|| tok.token_to_id("<|nocaptions|>"));
        Ok(Self {
            no_speech,
            special_from: eot,
            suppress: ids(&gen, "suppress_tokens"),
            begin_suppress: ids(&gen, "begin_suppress_tokens"),
            tok,
            sot,
            eot,
            transcribe,
            no_timestamps,
            languages,
        })
    }

    /// Whether the model takes a language token.
    pub fn multilingual(&self) -> bool {
        self.transcribe.is_some()
    }

    /// The token of language `code` (`en`); English-only models take none.
    pub fn language(&self, code: &str) -> Result<Option<u32>> {
        if !self.multilingual() {
            return if code.eq_ignore_ascii_case("en") {
                Ok(None)
            } else {
                Err(Error::Data(format!(
                    "language \"{code}\": the model is English-only"
                )))
            };
        }
        let c = code.trim().to_ascii_lowercase();
        self.languages.get(&c).map(|i| Some(*i)).ok_or_else(|| {
            let mut known: Vec<&str> = self.languages.keys().map(|s| s.as_str()).collect();
            known.sort();
            let shown: String = code.chars().take(32).collect();
            Error::Data(format!(
                "language \"{shown}\" is not one of the model's ({})",
                known.join(", ")
            ))
        })
    }

    /// The decoder's prompt for a transcription in language `code`.
    pub fn prompt(&self, code: &str) -> Result<Vec<u32>> {
        let mut p = vec![self.sot];
        if let Some(l) = self.language(code)? {
            p.push(l);
        }
        p.extend(self.transcribe);
        p.push(self.no_timestamps);
        Ok(p)
    }

    /// A transcript's tokens, no special tokens added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self
            .tok
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?
            .get_ids()
            .to_vec())
    }

    /// prompt + transcript + `<|endoftext|>`: what the recipe's tokenizer call returns.
    pub fn full(&self, text: &str, code: &str) -> Result<Vec<u32>> {
        let mut ids = self.prompt(code)?;
        ids.extend(self.encode(text)?);
        ids.push(self.eot);
        Ok(ids)
    }

    /// Text of generated tokens, special tokens left out, trimmed.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let kept: Vec<u32> = ids
            .iter()
            .copied()
            .filter(|&i| i < self.special_from)
            .collect();
        Ok(self
            .tok
            .decode(&kept, true)
            .map_err(|e| Error::Tokenizer(e.to_string()))?
            .trim()
            .to_string())
    }

    /// The language tokens, by code (empty on English-only models).
    pub fn languages(&self) -> impl Iterator<Item = (&str, u32)> {
        self.languages.iter().map(|(c, i)| (c.as_str(), *i))
    }
}
