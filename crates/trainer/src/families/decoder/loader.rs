//! Loading base models: HF folders (safetensors, sharded or not) and GGUF files.
//!
//! GGUF weights are dequantized to f32 at load (quantized matmuls have no backward),
//! llama-arch Q/K rows are un-permuted back to HF's half-split RoPE layout, and the
//! tokenizer is rebuilt from the GGUF vocabulary with the pre-tokenizer that its
//! `tokenizer.ggml.pre` names. A pre-tokenizer we do not know is an error: a silently
//! different tokenization would train a different model.

use crate::families::decoder::config::DecoderConfig;
use crate::families::decoder::model::Decoder;
use crate::families::decoder::tokenize::TokenizerBundle;
use crate::io::{read_safetensors_f32, Weights};
use crate::{Error, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{Device, Tensor};
use serde_json::json;
use std::path::Path;

/// A base model, ready for adapters.
pub struct BaseModel {
    pub model: Decoder,
    pub tokenizer: TokenizerBundle,
    /// What goes into `base_model_name_or_path`.
    pub name: String,
}

/// Loads an HF folder or a `.gguf` file.
pub fn load(path: &Path, device: &Device) -> Result<BaseModel> {
    let name = path
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string());
    if path.is_dir() {
        let (cfg, weights) = load_hf_weights(path, device)?;
        let tokenizer = TokenizerBundle::from_hf_dir(path, &cfg)?;
        Ok(BaseModel {
            model: Decoder::new(cfg, weights, device)?,
            tokenizer,
            name,
        })
    } else if path.extension().is_some_and(|e| e == "gguf") {
        let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let ct =
            Content::read(&mut f).map_err(|e| Error::Model(format!("{}: {e}", path.display())))?;
        let cfg = gguf_config(&ct)?;
        let weights = gguf_weights(&ct, &mut f, &cfg, device)?;
        let mut cfg = cfg;
        if let Some(f) = weights.1 {
            cfg.rope_freq_factors = Some(f);
        }
        let tokenizer = gguf_tokenizer(&ct, &cfg)?;
        Ok(BaseModel {
            model: Decoder::new(cfg, weights.0, device)?,
            tokenizer,
            name: name.trim_end_matches(".gguf").to_string(),
        })
    } else {
        Err(Error::Model(format!(
            "{}: not a model folder (config.json) or a .gguf file",
            path.display()
        )))
    }
}

/// Reads `config.json` and every safetensors tensor as f32.
pub fn load_hf_weights(dir: &Path, device: &Device) -> Result<(DecoderConfig, Weights)> {
    let cfg_path = dir.join("config.json");
    let cfg = DecoderConfig::from_hf_json(&crate::io::read_json(&cfg_path)?)?;
    Ok((cfg, read_safetensors_f32(dir, device)?))
}

fn meta<'a>(ct: &'a Content, key: &str) -> Result<&'a Value> {
    ct.metadata
        .get(key)
        .ok_or_else(|| Error::Model(format!("gguf: missing metadata {key}")))
}

fn meta_usize(ct: &Content, key: &str) -> Result<usize> {
    let v = meta(ct, key)?;
    v.to_u64()
        .map(|x| x as usize)
        .or_else(|_| v.to_i32().map(|x| x as usize))
        .map_err(|e| Error::Model(format!("gguf: {key}: {e}")))
}

fn meta_f64(ct: &Content, key: &str) -> Option<f64> {
    ct.metadata
        .get(key)
        .and_then(|v| v.to_f32().map(|x| x as f64).or_else(|_| v.to_f64()).ok())
}

fn meta_u32(ct: &Content, key: &str) -> Option<u32> {
    ct.metadata.get(key).and_then(|v| v.to_u32().ok())
}

fn gguf_config(ct: &Content) -> Result<DecoderConfig> {
    let arch = meta(ct, "general.architecture")?
        .to_string()
        .map_err(|e| Error::Model(format!("gguf: {e}")))?
        .clone();
    if !super::ARCHITECTURES.contains(&arch.as_str()) {
        return Err(Error::Unsupported(format!("gguf architecture \"{arch}\"")));
    }
    let k = |s: &str| format!("{arch}.{s}");
    let hidden = meta_usize(ct, &k("embedding_length"))?;
    let heads = meta_usize(ct, &k("attention.head_count"))?;
    let kv = meta_usize(ct, &k("attention.head_count_kv")).unwrap_or(heads);
    let vocab = meta(ct, "tokenizer.ggml.tokens")?
        .to_vec()
        .map_err(|e| Error::Model(format!("gguf: {e}")))?
        .len();
    let head_dim = meta_usize(ct, &k("attention.key_length")).unwrap_or(hidden / heads);
    let has_bias = ct.tensor_infos.contains_key("blk.0.attn_q.bias");
    Ok(DecoderConfig {
        model_type: arch.clone(),
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: meta_usize(ct, &k("feed_forward_length"))?,
        num_hidden_layers: meta_usize(ct, &k("block_count"))?,
        num_attention_heads: heads,
        num_key_value_heads: kv,
        head_dim,
        rms_norm_eps: meta_f64(ct, &k("attention.layer_norm_rms_epsilon")).unwrap_or(1e-5),
        rope_theta: meta_f64(ct, &k("rope.freq_base")).unwrap_or(10000.0),
        llama3_rope: None,
        rope_freq_factors: None,
        max_position_embeddings: meta_usize(ct, &k("context_length")).unwrap_or(2048),
        tie_word_embeddings: !ct.tensor_infos.contains_key("output.weight"),
        qkv_bias: has_bias,
        o_bias: ct.tensor_infos.contains_key("blk.0.attn_output.bias"),
        mlp_bias: false,
        bos_token_id: meta_u32(ct, "tokenizer.ggml.bos_token_id"),
        eos_token_ids: meta_u32(ct, "tokenizer.ggml.eos_token_id")
            .into_iter()
            .collect(),
        pad_token_id: meta_u32(ct, "tokenizer.ggml.padding_token_id"),
    })
}

/// llama.cpp's converter interleaves Q/K rows for llama-arch models; undo it so the
/// half-split RoPE of the HF layout applies.
fn unpermute(w: &Tensor, n_head: usize) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    let hd = out / n_head;
    Ok(w.reshape((n_head, hd / 2, 2, inp))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((out, inp))?)
}

type GgufWeights = (Weights, Option<Vec<f32>>);

fn gguf_weights(
    ct: &Content,
    f: &mut std::fs::File,
    cfg: &DecoderConfig,
    device: &Device,
) -> Result<GgufWeights> {
    let permuted = cfg.model_type == "llama" || cfg.model_type == "mistral";
    let mut w = Weights::new();
    let mut freq_factors = None;
    for name in ct.tensor_infos.keys() {
        let t = ct
            .tensor(f, name, device)
            .and_then(|q| q.dequantize(device))
            .map_err(|e| Error::Model(format!("gguf tensor {name}: {e}")))?;
        if name == "rope_freqs.weight" {
            freq_factors = Some(t.flatten_all()?.to_vec1::<f32>()?);
            continue;
        }
        let hf = gguf_to_hf_name(name)
            .ok_or_else(|| Error::Unsupported(format!("gguf tensor {name}")))?;
        let t = match (permuted, name.rsplit('.').nth(1)) {
            (true, Some("attn_q")) if name.ends_with(".weight") => {
                unpermute(&t, cfg.num_attention_heads)?
            }
            (true, Some("attn_k")) if name.ends_with(".weight") => {
                unpermute(&t, cfg.num_key_value_heads)?
            }
            _ => t,
        };
        w.insert(hf, t);
    }
    Ok((w, freq_factors))
}

fn gguf_to_hf_name(name: &str) -> Option<String> {
    match name {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (part, kind) = rest.rsplit_once('.')?;
    let hf = match part {
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The HF pre-tokenizer equivalent to llama.cpp's `tokenizer.ggml.pre`.
fn pre_tokenizer_for(pre: &str) -> Result<serde_json::Value> {
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let split = |re: &str| json!({"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false});
    Ok(match pre {
        "gpt2" | "default" => byte_level(true),
        // SmolLM / StarCoder: digits one by one, then GPT-2's byte-level split.
        "smollm" | "starcoder" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
        "llama-bpe" | "llama3" | "smaug-bpe" => {
            json!({"type": "Sequence", "pretokenizers": [split(LLAMA3_SPLIT), byte_level(false)]})
        }
        "qwen2" => json!({"type": "Sequence", "pretokenizers": [split(QWEN2_SPLIT), byte_level(false)]}),
        other => {
            return Err(Error::Unsupported(format!(
                "GGUF pre-tokenizer \"{other}\" (known: gpt2, smollm, starcoder, llama-bpe, llama3, smaug-bpe, qwen2); use an HF folder with tokenizer.json"
            )))
        }
    })
}

fn gguf_tokenizer(ct: &Content, cfg: &DecoderConfig) -> Result<TokenizerBundle> {
    let model = meta(ct, "tokenizer.ggml.model")?
        .to_string()
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
    if model != "gpt2" {
        return Err(Error::Unsupported(format!(
            "GGUF tokenizer model \"{model}\" (only byte-level BPE \"gpt2\" is rebuilt); use an HF folder with tokenizer.json"
        )));
    }
    let pre = ct
        .metadata
        .get("tokenizer.ggml.pre")
        .and_then(|v| v.to_string().ok().cloned())
        .unwrap_or_else(|| "default".into());
    let strings = |key: &str| -> Result<Vec<String>> {
        meta(ct, key)?
            .to_vec()
            .map_err(|e| Error::Tokenizer(format!("{key}: {e}")))?
            .iter()
            .map(|v| {
                v.to_string()
                    .cloned()
                    .map_err(|e| Error::Tokenizer(format!("{key}: {e}")))
            })
            .collect()
    };
    let tokens = strings("tokenizer.ggml.tokens")?;
    let merges = strings("tokenizer.ggml.merges")?;
    let types: Vec<i32> = match ct.metadata.get("tokenizer.ggml.token_type") {
        Some(v) => v
            .to_vec()
            .map_err(|e| Error::Tokenizer(e.to_string()))?
            .iter()
            .map(|x| x.to_i32().unwrap_or(1))
            .collect(),
        None => vec![1; tokens.len()],
    };
    let vocab: serde_json::Map<String, serde_json::Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    // Control (3) and user-defined (4) tokens are matched whole, before the BPE.
    let added: Vec<serde_json::Value> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| matches!(types.get(*i), Some(3) | Some(4)))
        .map(|(i, t)| {
            json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": types.get(i) == Some(&3)})
        })
        .collect();
    let add_bos = ct
        .metadata
        .get("tokenizer.ggml.add_bos_token")
        .and_then(|v| v.to_bool().ok())
        .unwrap_or(false);
    let bos = meta_u32(ct, "tokenizer.ggml.bos_token_id");
    let post = match (add_bos, bos) {
        (true, Some(id)) => {
            let tok = &tokens[id as usize];
            json!({"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": tok, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": tok, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": tok, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {tok: {"id": tok, "ids": [id], "tokens": [tok]}}})
        }
        _ => serde_json::Value::Null,
    };
    let tj = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer_for(&pre)?,
        "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": merges}
    });
    let tokenizer: tokenizers::Tokenizer = serde_json::from_value(tj)
        .map_err(|e| Error::Tokenizer(format!("rebuilding the GGUF tokenizer: {e}")))?;
    let template = ct
        .metadata
        .get("tokenizer.chat_template")
        .and_then(|v| v.to_string().ok().cloned());
    let name_of = |id: Option<u32>| id.and_then(|i| tokens.get(i as usize).cloned());
    Ok(TokenizerBundle::new(
        tokenizer,
        template,
        name_of(bos),
        name_of(cfg.eos_token_ids.first().copied()),
        cfg,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_llama_cpp_permute() -> Result<()> {
        // llama.cpp: reshape(n_head, 2, hd/2, in).swapaxes(1, 2)
        let (nh, hd, inp) = (2usize, 4usize, 3usize);
        let w =
            Tensor::arange(0f32, (nh * hd * inp) as f32, &Device::Cpu)?.reshape((nh * hd, inp))?;
        let permuted = w
            .reshape((nh, 2, hd / 2, inp))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((nh * hd, inp))?;
        let back = unpermute(&permuted, nh)?;
        assert_eq!(back.to_vec2::<f32>()?, w.to_vec2::<f32>()?);
        Ok(())
    }

    #[test]
    fn unknown_pre_tokenizer_is_an_error() {
        assert!(matches!(
            pre_tokenizer_for("falcon"),
            Err(Error::Unsupported(_))
        ));
        assert!(pre_tokenizer_for("smollm").is_ok());
    }
}
