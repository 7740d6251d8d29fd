//! The encoders' tokenizer: texts and text pairs, with the special tokens and token
//! types of the model's own `tokenizer.json` post-processor.

use crate::{Error, Result};
use std::path::Path;

/// An encoder's `tokenizer.json` for texts and text pairs: special tokens and
/// token types from its post-processor, truncation longest-first to `max_len`, as
/// transformers' `tokenizer(text, text_pair, truncation=True, max_length=...)`.
pub struct PairTokenizer {
    tokenizer: tokenizers::Tokenizer,
    max_len: usize,
}

impl PairTokenizer {
    pub fn from_dir(dir: &Path, max_len: usize) -> Result<Self> {
        let tp = dir.join("tokenizer.json");
        let mut tokenizer = tokenizers::Tokenizer::from_file(&tp)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", tp.display())))?;
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(tokenizers::TruncationParams {
                max_length: max_len,
                strategy: tokenizers::TruncationStrategy::LongestFirst,
                ..Default::default()
            }))
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(Self { tokenizer, max_len })
    }

    /// Tokenizes one input; pre-tokenized inputs pass through (too long is an error,
    /// since cutting ids could drop a separator the data meant to keep).
    pub fn encode(
        &self,
        input: &crate::data::ClassInput,
    ) -> std::result::Result<crate::families::encoder::model::EncodedText, String> {
        use crate::data::ClassInput;
        match input {
            ClassInput::Text { text, text_pair } => {
                let enc = match text_pair {
                    Some(p) => self.tokenizer.encode((text.as_str(), p.as_str()), true),
                    None => self.tokenizer.encode(text.as_str(), true),
                }
                .map_err(|e| format!("tokenizer: {e}"))?;
                Ok(crate::families::encoder::model::EncodedText {
                    input_ids: enc.get_ids().to_vec(),
                    token_type_ids: enc.get_type_ids().to_vec(),
                })
            }
            ClassInput::Tokens {
                input_ids,
                token_type_ids,
            } => {
                if input_ids.len() > self.max_len {
                    return Err(format!(
                        "{} tokens exceed max_seq_len {}",
                        input_ids.len(),
                        self.max_len
                    ));
                }
                Ok(crate::families::encoder::model::EncodedText {
                    input_ids: input_ids.clone(),
                    token_type_ids: token_type_ids
                        .clone()
                        .unwrap_or_else(|| vec![0; input_ids.len()]),
                })
            }
        }
    }
}
