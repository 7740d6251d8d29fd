//! Loading base models: HF folders (safetensors, sharded or not) and GGUF files.
//!
//! GGUF weights stay in their quant types unless asked otherwise (see [`BaseDtype`] and
//! [`Frozen`]), llama-arch Q/K rows are un-permuted back to HF's half-split RoPE layout
//! (whole packed rows move, so a packed matrix stays exact), and the
//! tokenizer is rebuilt from the GGUF vocabulary with the pre-tokenizer that its
//! `tokenizer.ggml.pre` names. A pre-tokenizer we do not know is an error: a silently
//! different tokenization would train a different model.

use crate::device::BaseDtype;
use crate::families::decoder::config::DecoderConfig;
use crate::families::decoder::model::Decoder;
use crate::families::decoder::tokenize::TokenizerBundle;
use crate::ops::Frozen;
use crate::{Error, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device};
use serde_json::json;
use std::collections::HashMap;
use std::path::Path;

/// A base model, ready for adapters.
pub struct BaseModel {
    pub model: Decoder,
    pub tokenizer: TokenizerBundle,
    /// What goes into `base_model_name_or_path` ([`crate::io::base_reference`]).
    pub name: String,
}

/// Loads an HF folder or a `.gguf` file with every weight dense in f32 (inference,
/// merging): [`load_with`] and [`BaseDtype::Dense`].
pub fn load(path: &Path, device: &Device) -> Result<BaseModel> {
    load_with(path, device, BaseDtype::Dense)
}

/// Loads an HF folder or a `.gguf` file, keeping the frozen matrices as `base` says.
pub fn load_with(path: &Path, device: &Device, base: BaseDtype) -> Result<BaseModel> {
    if path.is_dir() {
        let cfg = DecoderConfig::from_hf_json(&crate::io::read_json(&path.join("config.json"))?)?;
        let weights = hf_weights(path, device, base)?;
        let tokenizer = TokenizerBundle::from_hf_dir(path, &cfg)?;
        Ok(BaseModel {
            model: Decoder::new(cfg, weights, device)?,
            tokenizer,
            name: crate::io::base_reference(path, None),
        })
    } else if path.extension().is_some_and(|e| e == "gguf") {
        let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let ct =
            Content::read(&mut f).map_err(|e| Error::Model(format!("{}: {e}", path.display())))?;
        let mut cfg = gguf_config(&ct)?;
        let (weights, freq_factors) = gguf_weights(&ct, &mut f, &cfg, device, base)?;
        if let Some(f) = freq_factors {
            cfg.rope_freq_factors = Some(f);
        }
        let tokenizer = gguf_tokenizer(&ct, &cfg)?;
        Ok(BaseModel {
            model: Decoder::new(cfg, weights, device)?,
            tokenizer,
            name: crate::io::base_reference(path, gguf_source(&ct).as_deref()),
        })
    } else {
        Err(Error::Model(format!(
            "{}: not a model folder (config.json) or a .gguf file",
            path.display()
        )))
    }
}

/// A model's tokenizer and chat template alone, without its weights (an HF folder's
/// tokenizer files, or a GGUF file's metadata).
pub fn load_tokenizer(path: &Path) -> Result<TokenizerBundle> {
    if path.is_dir() {
        let cfg = DecoderConfig::from_hf_json(&crate::io::read_json(&path.join("config.json"))?)?;
        return TokenizerBundle::from_hf_dir(path, &cfg);
    }
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let ct = Content::read(&mut f).map_err(|e| Error::Model(format!("{}: {e}", path.display())))?;
    gguf_tokenizer(&ct, &gguf_config(&ct)?)
}

/// Whether a tensor is a matrix that packing applies to (not a norm, a bias, a table
/// of one row).
fn packable(dims: &[usize]) -> bool {
    dims.len() == 2 && dims[0] > 1 && dims[1] > 1
}

/// Every floating-point tensor of an HF folder, one at a time from the mapped files, so
/// that packing never holds the whole model in f32.
pub(crate) fn hf_weights(
    dir: &Path,
    device: &Device,
    base: BaseDtype,
) -> Result<HashMap<String, Frozen>> {
    let files = crate::io::safetensors_files(dir)?;
    // SAFETY: candle maps the files read-only; a file changed while it is mapped is
    // what every safetensors reader accepts (the HF libraries map them the same way).
    let st = unsafe { candle_core::safetensors::MmapedSafetensors::multi(&files) }
        .map_err(|e| Error::Model(format!("{}: {e}", dir.display())))?;
    let mut out = HashMap::new();
    for (name, _) in st.tensors() {
        let t = st
            .load(&name, device)
            .map_err(|e| Error::Model(format!("{}: {name}: {e}", dir.display())))?;
        // Integer tensors are buffers, not weights (a saved `position_ids`).
        if !t.dtype().is_float() {
            continue;
        }
        let t = t.to_dtype(DType::F32)?;
        let w = match base {
            BaseDtype::Packed(kind) if packable(t.dims()) => Frozen::pack(&t, kind)?,
            _ => Frozen::Dense(t),
        };
        out.insert(name, w);
    }
    Ok(out)
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

/// The hub repository a GGUF file says it was converted from, if it says.
fn gguf_source(ct: &Content) -> Option<String> {
    let text = |k: &str| ct.metadata.get(k)?.to_string().ok().cloned();
    text("general.source.huggingface.repository").or_else(|| {
        let url = text("general.source.url")?;
        Some(url.strip_prefix("https://huggingface.co/")?.to_string())
    })
}

/// The architectures read from GGUF files (llama.cpp's names).
const GGUF_ARCHITECTURES: [&str; 4] = ["llama", "mistral", "qwen2", "qwen3"];

/// A GGUF file's decoder config, from its metadata alone.
pub fn gguf_config(ct: &Content) -> Result<DecoderConfig> {
    let arch = meta(ct, "general.architecture")?
        .to_string()
        .map_err(|e| Error::Model(format!("gguf: {e}")))?
        .clone();
    if !GGUF_ARCHITECTURES.contains(&arch.as_str()) {
        // llama.cpp's phi3 files fuse the projections under other names (attn_qkv, a
        // double-width ffn_up), its gemma and smollm3 files carry norms and per-layer
        // kinds not mapped yet: their HF folders train.
        let hint = if super::ARCHITECTURES.contains(&arch.as_str()) {
            ": train from its HF folder"
        } else {
            ""
        };
        return Err(Error::Unsupported(format!(
            "gguf architecture \"{arch}\"{hint}"
        )));
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
        rope_linear_factor: None,
        rope_freq_factors: None,
        max_position_embeddings: meta_usize(ct, &k("context_length")).unwrap_or(2048),
        tie_word_embeddings: !ct.tensor_infos.contains_key("output.weight"),
        qkv_bias: has_bias,
        o_bias: ct.tensor_infos.contains_key("blk.0.attn_output.bias"),
        mlp_bias: false,
        qk_norm: ct.tensor_infos.contains_key("blk.0.attn_q_norm.weight"),
        fused_projections: false,
        // As for HF configs: only where transformers applies it (qwen2 files carry a
        // window their models do not use).
        sliding_window: (arch == "mistral")
            .then(|| meta_usize(ct, &k("attention.sliding_window")).ok())
            .flatten(),
        sliding_layers: None,
        local_rope_theta: None,
        norm_unit_offset: false,
        scale_embeddings: false,
        sandwich_norms: false,
        mlp_activation: Default::default(),
        query_pre_attn_scalar: None,
        attn_logit_softcapping: None,
        final_logit_softcapping: None,
        rope_layers: None,
        bos_token_id: meta_u32(ct, "tokenizer.ggml.bos_token_id"),
        eos_token_ids: meta_u32(ct, "tokenizer.ggml.eos_token_id")
            .into_iter()
            .collect(),
        pad_token_id: meta_u32(ct, "tokenizer.ggml.padding_token_id"),
    })
}

/// llama.cpp's converter interleaves Q/K rows for llama-arch models; row `i` of the HF
/// layout (half-split RoPE) is row `order[i]` of the file's.
fn unpermute_order(rows: usize, n_head: usize) -> Vec<usize> {
    let hd = rows / n_head;
    let half = hd / 2;
    (0..rows)
        .map(|r| {
            let (h, within) = (r / hd, r % hd);
            let (j, i) = (within / half, within % half);
            h * hd + 2 * i + j
        })
        .collect()
}

type GgufWeights = (HashMap<String, Frozen>, Option<Vec<f32>>);

fn gguf_weights(
    ct: &Content,
    f: &mut std::fs::File,
    cfg: &DecoderConfig,
    device: &Device,
    base: BaseDtype,
) -> Result<GgufWeights> {
    let permuted = cfg.model_type == "llama" || cfg.model_type == "mistral";
    let mut w = HashMap::new();
    let mut freq_factors = None;
    for name in ct.tensor_infos.keys() {
        let err = |e: candle_core::Error| Error::Model(format!("gguf tensor {name}: {e}"));
        let q = ct.tensor(f, name, device).map_err(err)?;
        if name == "rope_freqs.weight" {
            let t = q.dequantize(device).map_err(err)?;
            freq_factors = Some(t.flatten_all()?.to_vec1::<f32>()?);
            continue;
        }
        let hf = gguf_to_hf_name(name)
            .ok_or_else(|| Error::Unsupported(format!("gguf tensor {name}")))?;
        let packed_in_file = q.dtype() != GgmlDType::F32;
        let t = match base {
            BaseDtype::Auto if packable(q.shape().dims()) && packed_in_file => {
                Frozen::from_qtensor(q, device)?
            }
            BaseDtype::Packed(kind) if packable(q.shape().dims()) => {
                Frozen::pack(&q.dequantize(device).map_err(err)?, kind)?
            }
            _ => Frozen::Dense(q.dequantize(device).map_err(err)?),
        };
        let heads = match name.rsplit('.').nth(1) {
            Some("attn_q") => Some(cfg.num_attention_heads),
            Some("attn_k") => Some(cfg.num_key_value_heads),
            _ => None,
        };
        let t = match heads {
            Some(n) if permuted && name.ends_with(".weight") => {
                t.permute_rows(&unpermute_order(t.dim(0)?, n))?
            }
            _ => t,
        };
        w.insert(hf, t);
    }
    Ok((w, freq_factors))
}

/// llama.cpp's names of the model-wide tensors and HF's.
const TOP_NAMES: [(&str, &str); 3] = [
    ("token_embd", "model.embed_tokens"),
    ("output_norm", "model.norm"),
    ("output", "lm_head"),
];

/// llama.cpp's names of a block's modules and HF's (under `blk.N.` and `model.layers.N.`).
const LAYER_NAMES: [(&str, &str); 11] = [
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
    ("attn_norm", "input_layernorm"),
    ("attn_q_norm", "self_attn.q_norm"),
    ("attn_k_norm", "self_attn.k_norm"),
    ("ffn_norm", "post_attention_layernorm"),
];

pub(crate) fn gguf_to_hf_name(name: &str) -> Option<String> {
    let (module, kind) = name.rsplit_once('.')?;
    if let Some((_, hf)) = TOP_NAMES.iter().find(|(g, _)| *g == module) {
        return Some(format!("{hf}.{kind}"));
    }
    let (layer, part) = module.strip_prefix("blk.")?.split_once('.')?;
    let (_, hf) = LAYER_NAMES.iter().find(|(g, _)| *g == part)?;
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

/// The llama.cpp name of an HF module (`model.layers.3.self_attn.q_proj` ->
/// `blk.3.attn_q`), for the modules [`gguf_to_hf_name`] knows and phi3's fused ones.
pub(crate) fn hf_to_gguf_module(module: &str) -> Option<String> {
    if let Some((g, _)) = TOP_NAMES.iter().find(|(_, hf)| *hf == module) {
        return Some(g.to_string());
    }
    let (layer, part) = module.strip_prefix("model.layers.")?.split_once('.')?;
    layer.parse::<usize>().ok()?;
    // phi3's fused projections are llama.cpp's attn_qkv and its double-width ffn_up.
    const FUSED: [(&str, &str); 2] = [
        ("attn_qkv", "self_attn.qkv_proj"),
        ("ffn_up", "mlp.gate_up_proj"),
    ];
    let (g, _) = LAYER_NAMES
        .iter()
        .chain(FUSED.iter())
        .find(|(_, hf)| *hf == part)?;
    Some(format!("blk.{layer}.{g}"))
}

/// The inverse of [`unpermute_order`]: row `i` of llama.cpp's interleaved Q/K layout is
/// row `order[i]` of HF's.
pub(crate) fn permute_order(rows: usize, n_head: usize) -> Vec<usize> {
    let hd = rows / n_head;
    let half = hd / 2;
    (0..rows)
        .map(|r| {
            let (h, within) = (r / hd, r % hd);
            let (i, j) = (within / 2, within % 2);
            h * hd + j * half + i
        })
        .collect()
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

/// The BPE merges of a SentencePiece vocabulary, as transformers derives them when it
/// converts one (`SentencePieceExtractor`): every split of a piece into two pieces of
/// the vocabulary is a merge, ranked by the whole piece's score (highest first; ties in
/// vocabulary order), a piece's own splits by the ids of their halves. SentencePiece's
/// BPE merges the adjacent pair whose union scores highest: the same order.
fn sentencepiece_merges(tokens: &[String], scores: &[f32]) -> Vec<String> {
    let id: HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    let mut merges: Vec<(f32, usize, usize, usize)> = Vec::new();
    for (i, piece) in tokens.iter().enumerate() {
        let mut local: Vec<(usize, usize)> = piece
            .char_indices()
            .skip(1)
            .filter_map(|(at, _)| Some((*id.get(&piece[..at])?, *id.get(&piece[at..])?)))
            .collect();
        local.sort_unstable();
        let score = scores.get(i).copied().unwrap_or(0.0);
        merges.extend(local.into_iter().map(|(l, r)| (score, i, l, r)));
    }
    // Stable: equal scores keep the vocabulary's order, as Python's sort does.
    merges.sort_by(|a, b| b.0.total_cmp(&a.0));
    merges
        .into_iter()
        .map(|(_, _, l, r)| format!("{} {}", tokens[l], tokens[r]))
        .collect()
}

fn gguf_tokenizer(ct: &Content, cfg: &DecoderConfig) -> Result<TokenizerBundle> {
    let model = meta(ct, "tokenizer.ggml.model")?
        .to_string()
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
    if model != "gpt2" && model != "llama" {
        return Err(Error::Unsupported(format!(
            "GGUF tokenizer model \"{model}\" (byte-level BPE \"gpt2\" and SentencePiece \"llama\" are rebuilt); use an HF folder with tokenizer.json"
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
    // Unknown (2), control (3) and user-defined (4) tokens are matched whole, before the
    // BPE; all but user-defined ones are special.
    let added: Vec<serde_json::Value> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| matches!(types.get(*i), Some(2..=4)))
        .map(|(i, t)| {
            json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": types.get(i) != Some(&4)})
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
    // The two vocabularies differ in how text is split, decoded and merged; the rest of
    // the tokenizer is the same.
    let (pre_tokenizer, decoder, bpe) = if model == "llama" {
        let scores: Vec<f32> = meta(ct, "tokenizer.ggml.scores")?
            .to_vec()
            .map_err(|e| Error::Tokenizer(format!("tokenizer.ggml.scores: {e}")))?
            .iter()
            .map(|v| v.to_f32().unwrap_or(0.0))
            .collect();
        let unk = types
            .iter()
            .position(|&t| t == 2)
            .map(|i| tokens[i].clone());
        let prefix = ct
            .metadata
            .get("tokenizer.ggml.add_space_prefix")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(true);
        (
            json!({"type": "Metaspace", "replacement": "\u{2581}",
                   "prepend_scheme": if prefix { "first" } else { "never" }, "split": false}),
            json!({"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
                {"type": "ByteFallback"}, {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": if prefix { 1 } else { 0 }, "stop": 0}]}),
            json!({"type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
                   "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                   "vocab": vocab, "merges": sentencepiece_merges(&tokens, &scores)}),
        )
    } else {
        (
            pre_tokenizer_for(&pre)?,
            json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true}),
            json!({"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                   "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                   "vocab": vocab, "merges": strings("tokenizer.ggml.merges")?}),
        )
    };
    let tj = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post,
        "decoder": decoder,
        "model": bpe
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

    /// llama.cpp's files of the families built only from HF folders (their GGUF names
    /// and layouts are not mapped) are refused before any tensor is read, pointing at
    /// the folder; an architecture not built at all is refused plainly.
    #[test]
    fn gguf_architectures_not_mapped_are_refused() {
        for (arch, hint) in [
            ("phi3", true),
            ("gemma2", true),
            ("smollm3", true),
            ("gemma3", false),
            ("falcon", false),
        ] {
            let ct = Content {
                magic: candle_core::quantized::gguf_file::VersionedMagic::GgufV3,
                metadata: [(
                    "general.architecture".to_string(),
                    Value::String(arch.into()),
                )]
                .into_iter()
                .collect(),
                tensor_infos: Default::default(),
                tensor_data_offset: 0,
            };
            let e = gguf_config(&ct).unwrap_err().to_string();
            assert!(e.contains(&format!("gguf architecture \"{arch}\"")), "{e}");
            assert_eq!(e.contains("train from its HF folder"), hint, "{e}");
        }
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() -> Result<()> {
        use candle_core::Tensor;
        // llama.cpp: reshape(n_head, 2, hd/2, in).swapaxes(1, 2)
        let (nh, hd, inp) = (2usize, 4usize, 3usize);
        let w =
            Tensor::arange(0f32, (nh * hd * inp) as f32, &Device::Cpu)?.reshape((nh * hd, inp))?;
        let permuted = w
            .reshape((nh, 2, hd / 2, inp))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((nh * hd, inp))?;
        let back = Frozen::Dense(permuted.clone()).permute_rows(&unpermute_order(nh * hd, nh))?;
        assert_eq!(back.dense()?.to_vec2::<f32>()?, w.to_vec2::<f32>()?);
        // And the export's way there: llama.cpp's layout from HF's.
        let order = Tensor::new(
            permute_order(nh * hd, nh)
                .into_iter()
                .map(|i| i as u32)
                .collect::<Vec<_>>(),
            &Device::Cpu,
        )?;
        assert_eq!(
            w.index_select(&order, 0)?.to_vec2::<f32>()?,
            permuted.to_vec2::<f32>()?
        );
        Ok(())
    }

    #[test]
    fn hf_and_llama_cpp_names_map_both_ways() {
        for (gguf, hf) in [
            (
                "blk.0.attn_q.weight",
                "model.layers.0.self_attn.q_proj.weight",
            ),
            (
                "blk.17.ffn_down.weight",
                "model.layers.17.mlp.down_proj.weight",
            ),
            (
                "blk.2.attn_k_norm.weight",
                "model.layers.2.self_attn.k_norm.weight",
            ),
            ("output.weight", "lm_head.weight"),
            ("token_embd.weight", "model.embed_tokens.weight"),
        ] {
            assert_eq!(gguf_to_hf_name(gguf).as_deref(), Some(hf));
            let (g, _) = gguf.rsplit_once('.').unwrap();
            let (h, _) = hf.rsplit_once('.').unwrap();
            assert_eq!(hf_to_gguf_module(h).as_deref(), Some(g));
        }
        assert_eq!(
            hf_to_gguf_module("model.layers.1.self_attn.qkv_proj").as_deref(),
            Some("blk.1.attn_qkv")
        );
        assert_eq!(hf_to_gguf_module("model.layers.x.mlp.up_proj"), None);
        assert_eq!(hf_to_gguf_module("model.vision.proj"), None);
        assert_eq!(gguf_to_hf_name("blk.0.attn_qkv.weight"), None);
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
