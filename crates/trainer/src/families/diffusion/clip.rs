//! The CLIP text side of Stable Diffusion: the BPE tokenizer assembled from an SD
//! folder's `tokenizer/vocab.json` + `merges.txt` (SD folders ship no
//! `tokenizer.json`), and the frozen text encoder whose last hidden state conditions the
//! UNet. The encoder runs once per caption (its outputs are cached), so it is plain
//! inference code.

use super::layers::{attention, Affine, LayerNorm};
use crate::io::read_safetensors_f32;
use crate::io::Take;
use crate::{Error, Result};
use candle_core::{Device, Tensor};
use serde_json::Value;
use std::path::Path;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormSeq, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSeq;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{SplitDelimiterBehavior, Tokenizer};

/// CLIP's pre-tokenization pattern (transformers' `CLIPConverter`).
const SPLIT: &str = r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";
const BOS: &str = "<|startoftext|>";
const EOS: &str = "<|endoftext|>";

/// CLIP's tokenizer, padded and truncated to the text encoder's context.
pub struct ClipTokenizer {
    inner: Tokenizer,
    max_len: usize,
    pad_id: u32,
    eos_id: u32,
}

fn tok_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(format!("CLIP tokenizer: {what}: {e}"))
}

impl ClipTokenizer {
    /// Reads `dir/vocab.json` and `dir/merges.txt`. `tokenizer_config.json`, when
    /// present, gives the context length and the padding token (`<|endoftext|>` for
    /// SD 1.x, `!` for SD 2.x).
    pub fn load(dir: &Path) -> Result<Self> {
        let vocab = dir.join("vocab.json");
        let merges = dir.join("merges.txt");
        for f in [&vocab, &merges] {
            if !f.is_file() {
                return Err(Error::Tokenizer(format!("{}: missing", f.display())));
            }
        }
        let bpe = BPE::from_file(&vocab.to_string_lossy(), &merges.to_string_lossy())
            .end_of_word_suffix("</w>".into())
            .unk_token(EOS.into())
            .build()
            .map_err(|e| tok_err("vocab/merges", e))?;
        let mut inner = Tokenizer::new(bpe);
        let ws = Replace::new(
            tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()),
            " ",
        )
        .map_err(|e| tok_err("normalizer", e))?;
        inner
            .with_normalizer(Some(NormSeq::new(vec![
                NFC.into(),
                ws.into(),
                Lowercase.into(),
            ])))
            .map_err(|e| tok_err("normalizer", e))?;
        let split = Split::new(
            SplitPattern::Regex(SPLIT.into()),
            SplitDelimiterBehavior::Removed,
            true,
        )
        .map_err(|e| tok_err("pre-tokenizer", e))?;
        inner.with_pre_tokenizer(Some(PreSeq::new(vec![
            split.into(),
            ByteLevel::new(false, true, true).into(),
        ])));
        fn id(inner: &Tokenizer, t: &str) -> Result<u32> {
            inner
                .token_to_id(t)
                .ok_or_else(|| Error::Tokenizer(format!("CLIP tokenizer: vocabulary lacks {t}")))
        }
        let (bos_id, eos_id) = (id(&inner, BOS)?, id(&inner, EOS)?);
        let post = TemplateProcessing::builder()
            .try_single(format!("{BOS} $A {EOS}"))
            .map_err(|e| tok_err("template", e))?
            .special_tokens(vec![(BOS, bos_id), (EOS, eos_id)])
            .build()
            .map_err(|e| tok_err("template", e))?;
        inner.with_post_processor(Some(post));

        let cfg: Value = match std::fs::read_to_string(dir.join("tokenizer_config.json")) {
            Ok(text) => serde_json::from_str(&text)?,
            Err(_) => Value::Null,
        };
        let max_len = cfg
            .get("model_max_length")
            .and_then(Value::as_u64)
            .filter(|&n| n > 2 && n <= 4096)
            .unwrap_or(77) as usize;
        let pad = match cfg.get("pad_token") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Object(o)) => o
                .get("content")
                .and_then(Value::as_str)
                .unwrap_or(EOS)
                .to_string(),
            _ => EOS.to_string(),
        };
        let pad_id = id(&inner, &pad)?;
        Ok(ClipTokenizer {
            inner,
            max_len,
            pad_id,
            eos_id,
        })
    }

    /// The ids of `text` with BOS and EOS, neither truncated nor padded.
    pub fn encode_unpadded(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, true)
            .map_err(|e| tok_err("encode", e))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The ids as SD feeds them to the text encoder: truncated to the context (the last
    /// kept token is EOS) and padded to it.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = self.encode_unpadded(text)?;
        if ids.len() > self.max_len {
            ids.truncate(self.max_len - 1);
            ids.push(self.eos_id);
        }
        ids.resize(self.max_len, self.pad_id);
        Ok(ids)
    }

    pub fn max_len(&self) -> usize {
        self.max_len
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Act {
    QuickGelu,
    Gelu,
}

struct Layer {
    ln1: LayerNorm,
    q: Affine,
    k: Affine,
    v: Affine,
    out: Affine,
    ln2: LayerNorm,
    fc1: Affine,
    fc2: Affine,
}

/// transformers' `CLIPTextModel` (frozen): returns the last hidden state after the final
/// LayerNorm, which is what SD's UNet attends to.
pub struct ClipTextEncoder {
    token_embedding: Tensor,
    position_embedding: Tensor,
    layers: Vec<Layer>,
    final_norm: LayerNorm,
    heads: usize,
    act: Act,
    device: Device,
}

impl ClipTextEncoder {
    /// Loads a `text_encoder/` folder, with or without the `text_model.` key prefix.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let cfg: Value = crate::io::read_json(&cfg_path)?;
        let get = |k: &str| {
            cfg.get(k)
                .and_then(Value::as_u64)
                .map(|n| n as usize)
                .ok_or_else(|| Error::Config(format!("text encoder config: missing {k}")))
        };
        let (layers_n, heads) = (get("num_hidden_layers")?, get("num_attention_heads")?);
        let eps = cfg
            .get("layer_norm_eps")
            .and_then(Value::as_f64)
            .unwrap_or(1e-5);
        let act = match cfg
            .get("hidden_act")
            .and_then(Value::as_str)
            .unwrap_or("quick_gelu")
        {
            "quick_gelu" => Act::QuickGelu,
            "gelu" => Act::Gelu,
            other => {
                return Err(Error::Unsupported(format!(
                    "text encoder config: hidden_act {other}"
                )))
            }
        };
        let mut weights = read_safetensors_f32(dir, device)?;
        // transformers 5 writes bare names; real SD checkpoints carry the prefix.
        weights = weights
            .into_iter()
            .map(|(k, v)| {
                (
                    k.strip_prefix("text_model.")
                        .map(str::to_string)
                        .unwrap_or(k),
                    v,
                )
            })
            .collect();
        weights.remove("embeddings.position_ids");
        let t = &mut Take::new(&mut weights, "text encoder");
        let mut layers = Vec::new();
        for i in 0..layers_n {
            let p = format!("encoder.layers.{i}");
            layers.push(Layer {
                q: t.affine(&format!("{p}.self_attn.q_proj"))?,
                k: t.affine(&format!("{p}.self_attn.k_proj"))?,
                v: t.affine(&format!("{p}.self_attn.v_proj"))?,
                out: t.affine(&format!("{p}.self_attn.out_proj"))?,
                fc1: t.affine(&format!("{p}.mlp.fc1"))?,
                fc2: t.affine(&format!("{p}.mlp.fc2"))?,
                ln1: t.layer_norm(&format!("{p}.layer_norm1"), eps)?,
                ln2: t.layer_norm(&format!("{p}.layer_norm2"), eps)?,
            });
        }
        Ok(ClipTextEncoder {
            token_embedding: t.get("embeddings.token_embedding.weight")?,
            position_embedding: t.get("embeddings.position_embedding.weight")?,
            final_norm: t.layer_norm("final_layer_norm", eps)?,
            layers,
            heads,
            act,
            device: device.clone(),
        })
    }

    /// The last hidden state `(n, len, hidden)` of `n` padded id rows.
    pub fn forward(&self, ids: &[Vec<u32>]) -> Result<Tensor> {
        let n = ids.len();
        let len = ids.first().map_or(0, Vec::len);
        if n == 0 || ids.iter().any(|r| r.len() != len) {
            return Err(Error::Model(
                "text encoder: rows of unequal or zero length".into(),
            ));
        }
        if len > self.position_embedding.dim(0)? {
            return Err(Error::Model(format!(
                "text encoder: {len} tokens, but the model has {} positions",
                self.position_embedding.dim(0)?
            )));
        }
        let flat: Vec<u32> = ids.iter().flatten().copied().collect();
        let ids = Tensor::from_vec(flat, (n * len,), &self.device)?;
        let hidden = self.token_embedding.dim(1)?;
        let mut x = self
            .token_embedding
            .index_select(&ids, 0)?
            .reshape((n, len, hidden))?
            .broadcast_add(&self.position_embedding.narrow(0, 0, len)?)?;
        // CLIP's text transformer is causal.
        let mask: Vec<f32> = (0..len)
            .flat_map(|i| (0..len).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        let mask = Tensor::from_vec(mask, (len, len), &self.device)?;
        for l in &self.layers {
            let h = l.ln1.forward(&x)?;
            let (q, k, v) = (l.q.forward(&h)?, l.k.forward(&h)?, l.v.forward(&h)?);
            let o = attention(&q, &k, &v, self.heads, Some(&mask))?;
            x = (x + l.out.forward(&o)?)?;
            let h = l.fc1.forward(&l.ln2.forward(&x)?)?;
            let h = match self.act {
                Act::QuickGelu => (&h * candle_nn::ops::sigmoid(&(&h * 1.702)?)?)?,
                Act::Gelu => crate::ops::gelu_erf(&h)?,
            };
            x = (x + l.fc2.forward(&h)?)?;
        }
        self.final_norm.forward(&x)
    }
}
