//! A PEFT adapter as the LoRA GGUF that llama.cpp loads (`--lora`, llama-cpp-python's
//! `lora_path`, Ollama's `ADAPTER`), written natively: what llama.cpp's
//! `convert_lora_to_gguf.py` makes, without Python or the base's HF folder.
//!
//! The file holds each adapted module's A and B under llama.cpp's tensor names
//! (`blk.0.attn_q.weight.lora_a`), in their PEFT shapes (A `(r, in)`, B `(out, r)`: GGUF
//! lists dimensions innermost first, so llama.cpp reads `[in, r]` and `[r, out]`). Two
//! things differ from the PEFT file:
//! - llama-arch models interleave the rotary halves of Q and K rows in llama.cpp, so the
//!   rows of those modules' B are permuted as the base's rows were;
//! - llama.cpp scales every module by `alpha / r` with `r` read from A: `alpha` is written
//!   as `scale · r`, which keeps rsLoRA's `alpha / √r` exact too.

use super::config::DecoderConfig;
use super::loader;
use crate::lora;
use crate::{Error, Result};
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use std::collections::BTreeMap;
use std::path::Path;

/// The file name of the LoRA GGUF that training writes beside the PEFT files.
pub const LORA_GGUF_FILE: &str = "adapter_model.gguf";

/// The element type of a LoRA GGUF's tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GgufFloat {
    /// As trained (the default: the file is small, and llama.cpp applies it exactly).
    #[default]
    F32,
    /// Half the size, as `convert_lora_to_gguf.py` writes by default.
    F16,
}

impl GgufFloat {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(Self::F32),
            "f16" => Ok(Self::F16),
            other => Err(Error::Config(format!(
                "GGUF tensor type \"{other}\" (f32 or f16)"
            ))),
        }
    }
    fn ggml(self) -> GgmlDType {
        match self {
            Self::F32 => GgmlDType::F32,
            Self::F16 => GgmlDType::F16,
        }
    }
}

/// How llama.cpp knows a decoder: its architecture name, and whether its converter
/// interleaved the Q and K rows (the llama family's rotary layout).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LlamaCppArch {
    pub name: &'static str,
    pub permute_qk: bool,
}

/// llama.cpp's architecture for a decoder config (an HF `model_type`, or a GGUF file's
/// own `general.architecture`), or why llama.cpp cannot take its adapters.
pub fn llama_cpp_arch(model_type: &str) -> Result<LlamaCppArch> {
    // convert_hf_to_gguf.py converts Mistral (and SmolLM3) through its llama class, whose
    // Q/K permutation they share; the others keep HF's row order.
    let (name, permute_qk) = match model_type {
        "llama" | "mistral" => ("llama", true),
        "smollm3" => ("smollm3", true),
        "qwen2" => ("qwen2", false),
        "qwen3" => ("qwen3", false),
        "phi3" => ("phi3", false),
        "gemma2" => ("gemma2", false),
        "gemma3_text" | "gemma3" => ("gemma3", false),
        other => {
            return Err(Error::Unsupported(format!(
                "a LoRA GGUF for model type \"{other}\" (llama.cpp's names for it are not mapped)"
            )))
        }
    };
    Ok(LlamaCppArch { name, permute_qk })
}

/// What a LoRA GGUF needs to know of its base: llama.cpp's architecture and how its Q/K
/// rows are laid out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseShape {
    /// An HF `model_type`, or a GGUF file's `general.architecture`.
    pub model_type: String,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    /// The output head is the embedding table (no `lm_head` / `output.weight`).
    pub tie_word_embeddings: bool,
}

impl From<&DecoderConfig> for BaseShape {
    fn from(c: &DecoderConfig) -> Self {
        BaseShape {
            model_type: c.model_type.clone(),
            num_attention_heads: c.num_attention_heads,
            num_key_value_heads: c.num_key_value_heads,
            tie_word_embeddings: c.tie_word_embeddings,
        }
    }
}

/// A base model's shape, from an HF folder's `config.json` or a GGUF file's metadata
/// alone: also for the GGUF architectures loraforge does not train from (phi3, gemma,
/// smollm3 files), whose adapters llama.cpp users still apply.
pub fn read_base_shape(model: &Path) -> Result<BaseShape> {
    if model.is_dir() {
        let cfg = DecoderConfig::from_hf_json(&crate::io::read_json(&model.join("config.json"))?)?;
        return Ok(BaseShape::from(&cfg));
    }
    let mut f = std::fs::File::open(model).map_err(|e| Error::io(model, e))?;
    let ct = gguf_file::Content::read(&mut f)
        .map_err(|e| Error::Model(format!("{}: {e}", model.display())))?;
    let meta = |k: &str| {
        ct.metadata
            .get(k)
            .ok_or_else(|| Error::Model(format!("{}: no {k}", model.display())))
    };
    let arch = meta("general.architecture")?
        .to_string()
        .map_err(|e| Error::Model(format!("{}: {e}", model.display())))?
        .clone();
    let count = |k: &str| -> Result<usize> {
        let v = meta(&format!("{arch}.{k}"))?;
        v.to_u32()
            .map(|x| x as usize)
            .or_else(|_| v.to_u64().map(|x| x as usize))
            .map_err(|e| Error::Model(format!("{}: {arch}.{k}: {e}", model.display())))
    };
    let heads = count("attention.head_count")?;
    Ok(BaseShape {
        num_key_value_heads: count("attention.head_count_kv").unwrap_or(heads),
        num_attention_heads: heads,
        tie_word_embeddings: !ct.tensor_infos.contains_key("output.weight"),
        model_type: arch,
    })
}

/// The rows of a matrix whose output is llama.cpp's `module` (`blk.0.attn_q`) in the
/// order llama.cpp's converter gives them: Q's and K's interleaved per head for
/// llama-arch models, as is.
fn to_file_rows(t: Tensor, module: &str, cfg: &BaseShape, arch: &LlamaCppArch) -> Result<Tensor> {
    let heads = match module.rsplit('.').next() {
        Some("attn_q") => cfg.num_attention_heads,
        Some("attn_k") => cfg.num_key_value_heads,
        _ => return Ok(t),
    };
    if !arch.permute_qk {
        return Ok(t);
    }
    let order: Vec<u32> = loader::permute_order(t.dim(0)?, heads)
        .into_iter()
        .map(|i| i as u32)
        .collect();
    Ok(t.index_select(&Tensor::new(order, &Device::Cpu)?, 0)?)
}

/// What [`write_lora_gguf`] wrote.
#[derive(Debug, Clone)]
pub struct LoraGguf {
    pub arch: &'static str,
    /// Adapted modules (two tensors each).
    pub modules: usize,
    /// `adapter.lora.alpha` as written.
    pub alpha: f32,
}

/// Writes the adapter folder `adapter` (PEFT's two files) as a LoRA GGUF at `out` for a
/// base with config `base`: atomically, with the mode any created file gets.
pub fn write_lora_gguf(
    adapter: &Path,
    base: &BaseShape,
    float: GgufFloat,
    out: &Path,
) -> Result<LoraGguf> {
    let arch = llama_cpp_arch(&base.model_type)?;
    let cfg = lora::read_adapter_config(adapter)?;
    let config_path = adapter.join("adapter_config.json");
    let raw: serde_json::Value = crate::io::read_json(&config_path)?;
    if let Some(m) = raw
        .get("modules_to_save")
        .and_then(|m| m.as_array())
        .filter(|m| !m.is_empty())
    {
        return Err(Error::Unsupported(format!(
            "a LoRA GGUF of an adapter that also trains whole modules ({m:?}): llama.cpp \
             adapters carry only LoRA pairs; export a merged model instead"
        )));
    }
    for pattern in ["rank_pattern", "alpha_pattern"] {
        if raw
            .get(pattern)
            .and_then(|p| p.as_object())
            .is_some_and(|p| !p.is_empty())
        {
            return Err(Error::Unsupported(format!(
                "{}: a per-module {pattern}",
                config_path.display()
            )));
        }
    }
    let tensors_path = adapter.join("adapter_model.safetensors");
    let file = candle_core::safetensors::load(&tensors_path, &Device::Cpu)
        .map_err(|e| Error::Adapter(format!("{}: {e}", tensors_path.display())))?;
    // module -> (A, B), in llama.cpp's names, ordered by block then name.
    let mut pairs: BTreeMap<(usize, String), [Option<Tensor>; 2]> = BTreeMap::new();
    for (key, t) in file {
        let k = key.replace(".default.", ".");
        let Some((module, which)) = k
            .strip_prefix("base_model.model.")
            .and_then(|k| k.strip_suffix(".weight"))
            .and_then(|k| {
                k.strip_suffix(".lora_A")
                    .map(|m| (m, 0))
                    .or_else(|| k.strip_suffix(".lora_B").map(|m| (m, 1)))
            })
        else {
            return Err(Error::Unsupported(format!(
                "{}: tensor {key} is not a LoRA A or B matrix of a linear layer",
                tensors_path.display()
            )));
        };
        if module == "lm_head" && base.tie_word_embeddings {
            return Err(Error::Unsupported(
                "an adapter on lm_head of a model whose output head is its embedding table: \
                 llama.cpp has no separate output tensor to apply it to"
                    .into(),
            ));
        }
        let name = loader::hf_to_gguf_module(module).ok_or_else(|| {
            Error::Unsupported(format!(
                "module {module} has no llama.cpp tensor (a LoRA GGUF covers the \
                 attention and MLP projections and the output head)"
            ))
        })?;
        let block = name
            .strip_prefix("blk.")
            .and_then(|r| r.split('.').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(usize::MAX);
        pairs.entry((block, name)).or_default()[which] = Some(t);
    }
    if pairs.is_empty() {
        return Err(Error::Adapter(format!(
            "{}: no LoRA tensors",
            tensors_path.display()
        )));
    }
    let mut named: Vec<(String, QTensor)> = Vec::with_capacity(2 * pairs.len());
    for ((_, name), [a, b]) in &pairs {
        let (Some(a), Some(b)) = (a, b) else {
            return Err(Error::Adapter(format!(
                "{}: {name} lacks its lora_A or lora_B",
                tensors_path.display()
            )));
        };
        let (a, b) = (a.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?);
        // llama.cpp scales by alpha over A's rank: every pair must have the config's.
        if a.rank() != 2 || b.rank() != 2 || a.dim(0)? != cfg.r || b.dim(1)? != cfg.r {
            return Err(Error::Adapter(format!(
                "{name}: A {:?} and B {:?} are not a rank-{} pair",
                a.dims(),
                b.dims(),
                cfg.r
            )));
        }
        let b = to_file_rows(b, name, base, &arch)?;
        for (suffix, t) in [("lora_a", a), ("lora_b", b)] {
            let q = QTensor::quantize(&t.contiguous()?, float.ggml())?;
            named.push((format!("{name}.weight.{suffix}"), q));
        }
    }
    let alpha = alpha_for(&cfg);
    let metadata: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String(arch.name.into())),
        ("general.type", Value::String("adapter".into())),
        ("adapter.type", Value::String("lora".into())),
        ("adapter.lora.alpha", Value::F32(alpha)),
    ];
    let meta_refs: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = named.iter().map(|(k, t)| (k.as_str(), t)).collect();
    lora::write_atomically(out, |w| {
        gguf_file::write(w, &meta_refs, &tensor_refs).map_err(Error::from)
    })?;
    Ok(LoraGguf {
        arch: arch.name,
        modules: pairs.len(),
        alpha,
    })
}

/// The `adapter.lora.alpha` that makes llama.cpp's `alpha / r` the adapter's scale.
fn alpha_for(cfg: &lora::LoraConfig) -> f32 {
    (cfg.scale() * cfg.r as f64) as f32
}

/// Writes [`LORA_GGUF_FILE`] into the adapter folder `dir` when llama.cpp can take the
/// adapter, as training does beside every adapter and checkpoint; an adapter it cannot
/// take (an architecture not mapped, whole trained modules) gets none, and `loraforge
/// export` says why. Never fails the caller: a write that fails is logged.
pub fn save_lora_gguf(base: &DecoderConfig, dir: &Path) {
    let out = dir.join(LORA_GGUF_FILE);
    match write_lora_gguf(dir, &BaseShape::from(base), GgufFloat::F32, &out) {
        Ok(_) => {}
        Err(e) => {
            // An older run's file in a reused folder would belong to another adapter.
            let _ = std::fs::remove_file(&out);
            // The PEFT adapter is written: a copy llama.cpp cannot have is no reason
            // to fail the run that trained it.
            if !matches!(e, Error::Unsupported(_)) {
                tracing::warn!(dir = %dir.display(), error = %e, "no LoRA GGUF written");
            }
        }
    }
}

/// The element type of a merged GGUF's matrices; norms and other vectors stay f32, as
/// llama.cpp's converter keeps them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MergedType {
    F32,
    F16,
    Bf16,
    Q8_0,
    /// 4-bit K-quant; matrices whose rows are not a multiple of 256 wide take q5_0, as
    /// llama.cpp's quantizer falls back.
    Q4K,
}

impl MergedType {
    pub const NAMES: [&'static str; 5] = ["f16", "bf16", "f32", "q8_0", "q4_k"];

    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "f32" => Self::F32,
            "f16" => Self::F16,
            "bf16" => Self::Bf16,
            "q8_0" => Self::Q8_0,
            "q4_k" => Self::Q4K,
            other => {
                return Err(Error::Config(format!(
                    "merged GGUF type \"{other}\" (one of {})",
                    Self::NAMES.join(", ")
                )))
            }
        })
    }

    fn ggml(self) -> GgmlDType {
        match self {
            Self::F32 => GgmlDType::F32,
            Self::F16 => GgmlDType::F16,
            Self::Bf16 => GgmlDType::BF16,
            Self::Q8_0 => GgmlDType::Q8_0,
            Self::Q4K => GgmlDType::Q4K,
        }
    }

    /// The type a matrix with rows of `cols` values is stored as: this one, or where
    /// its blocks do not divide the rows what llama.cpp's quantizer falls back to
    /// (`llama_tensor_get_type`: q4_k → q5_0), and f16 where that does not divide them
    /// either.
    fn kind_for_rows(self, cols: usize) -> GgmlDType {
        let want = self.ggml();
        let fallback = match want {
            GgmlDType::Q4K => GgmlDType::Q5_0,
            other => other,
        };
        [want, fallback]
            .into_iter()
            .find(|k| cols.is_multiple_of(k.block_size()))
            .unwrap_or(GgmlDType::F16)
    }

    /// llama.cpp's `general.file_type` (`LLAMA_FTYPE_*`): the file's main type.
    fn file_type(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q8_0 => 7,
            Self::Q4K => 14,
            Self::Bf16 => 32,
        }
    }
}

/// Writes `merged` (a base with its adapter merged, [`super::model::Decoder::merged_weights`])
/// as a GGUF for llama.cpp at `out`, with every key of the base GGUF `source` (tokenizer,
/// chat template, hyperparameters), its tensors in the file's order, the Q/K rows of
/// llama-arch models interleaved back as the file had them, matrices as `ty`. Returns
/// the number of tensors written.
pub fn write_merged_gguf(
    source: &Path,
    cfg: &DecoderConfig,
    merged: Vec<(String, Tensor)>,
    ty: MergedType,
    out: &Path,
) -> Result<usize> {
    if source.is_dir() {
        return Err(Error::Unsupported(
            "a merged GGUF from an HF folder (its tokenizer and hyperparameters would have to \
             be converted): write the merged HF folder and convert it with llama.cpp's \
             convert_hf_to_gguf.py, or start from the base's GGUF"
                .into(),
        ));
    }
    let arch = llama_cpp_arch(&cfg.model_type)?;
    let shape = BaseShape::from(cfg);
    let mut f = std::fs::File::open(source).map_err(|e| Error::io(source, e))?;
    let ct = gguf_file::Content::read(&mut f)
        .map_err(|e| Error::Model(format!("{}: {e}", source.display())))?;
    let mut merged: std::collections::HashMap<String, Tensor> = merged.into_iter().collect();
    let mut names: Vec<(&String, u64)> = ct
        .tensor_infos
        .iter()
        .map(|(n, info)| (n, info.offset))
        .collect();
    names.sort_by_key(|(_, offset)| *offset);
    let mut tensors: Vec<(String, QTensor)> = Vec::with_capacity(names.len());
    for (name, _) in names {
        let err = |e: candle_core::Error| Error::Model(format!("gguf tensor {name}: {e}"));
        let Some(hf) = loader::gguf_to_hf_name(name) else {
            // Not a weight of the model (llama3's rope_freqs): as the file has it.
            let q = ct.tensor(&mut f, name, &Device::Cpu).map_err(err)?;
            tensors.push((name.clone(), q));
            continue;
        };
        let t = merged
            .remove(&hf)
            .ok_or_else(|| Error::Model(format!("merged model lacks {hf} (gguf {name})")))?
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?;
        let t = match name.strip_suffix(".weight") {
            Some(module) => to_file_rows(t, module, &shape, &arch)?,
            None => t,
        };
        let kind = match t.dims() {
            [rows, cols] if *rows > 1 && *cols > 1 => ty.kind_for_rows(*cols),
            _ => GgmlDType::F32,
        };
        tensors.push((name.clone(), QTensor::quantize(&t.contiguous()?, kind)?));
    }
    if let Some(extra) = merged.keys().next() {
        return Err(Error::Model(format!(
            "{}: the merged model's {extra} has no tensor in the base GGUF",
            source.display()
        )));
    }
    let mut metadata: Vec<(&str, &Value)> = ct
        .metadata
        .iter()
        // What no longer describes the file: its type, its alignment (candle's writer
        // aligns to 32, the default), and the importance matrix of a quantization
        // this one did not use.
        .filter(|(k, _)| {
            !matches!(k.as_str(), "general.file_type" | "general.alignment")
                && !k.starts_with("quantize.imatrix.")
        })
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    let file_type = Value::U32(ty.file_type());
    metadata.push(("general.file_type", &file_type));
    // The architecture first, as llama.cpp's writer orders it; then by key, so that the
    // same merge always gives the same bytes.
    metadata.sort_by_key(|(k, _)| (*k != "general.architecture", *k));
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    lora::write_atomically(out, |w| {
        gguf_file::write(w, &metadata, &refs).map_err(Error::from)
    })?;
    Ok(refs.len())
}

/// Writes an Ollama Modelfile beside a merged GGUF (`x.gguf` → `x.Modelfile`): `FROM`
/// the file; the chat template as Ollama's Go template where it is ChatML or Llama 3's
/// (a default system prompt the template inserts becomes `SYSTEM`, which Ollama adds
/// the same way: when a chat has no system message); and the end-of-turn tokens as
/// `stop`. Another template is left to Ollama, which reads the GGUF's own.
pub fn write_modelfile(
    gguf: &Path,
    tok: &super::tokenize::TokenizerBundle,
) -> Result<std::path::PathBuf> {
    let out = gguf.with_extension("Modelfile");
    let file = gguf
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let text = modelfile(&file, tok);
    lora::write_atomically(&out, |w| {
        std::io::Write::write_all(w, text.as_bytes()).map_err(|e| Error::io(&out, e))
    })?;
    Ok(out)
}

fn modelfile(file: &str, tok: &super::tokenize::TokenizerBundle) -> String {
    let template = tok.chat_template.as_deref().unwrap_or("");
    let mut m = format!("FROM ./{file}\n");
    let mut stops: Vec<String> = Vec::new();
    if template.contains("<|im_start|>") && template.contains("<|im_end|>") {
        m.push_str(
            "TEMPLATE \"\"\"{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n\"\"\"\n",
        );
        // A system turn written out whole in the template (SmolLM2's, Qwen2's) is its
        // default system prompt.
        let open = "<|im_start|>system\n";
        if let Some(rest) = template.find(open).map(|i| &template[i + open.len()..]) {
            if let Some(default) = rest.split("<|im_end|>").next() {
                let literal = !default.is_empty()
                    && !default.contains(['{', '}', '\'', '"', '+'])
                    && !default.contains("\"\"\"");
                if literal {
                    m.push_str(&format!("SYSTEM \"\"\"{default}\"\"\"\n"));
                }
            }
        }
        stops.push("<|im_end|>".into());
    } else if template.contains("<|start_header_id|>") && template.contains("<|eot_id|>") {
        m.push_str(
            "TEMPLATE \"\"\"{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n\"\"\"\n",
        );
        stops.push("<|eot_id|>".into());
    }
    stops.extend(tok.eos_token.clone());
    stops.extend(
        tok.eos_ids
            .iter()
            .filter_map(|&id| tok.tokenizer.id_to_token(id)),
    );
    let mut seen = std::collections::HashSet::new();
    for s in stops {
        if !s.is_empty() && !s.contains('"') && seen.insert(s.clone()) {
            m.push_str(&format!("PARAMETER stop \"{s}\"\n"));
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::families::decoder::merge::load_with_adapter;
    use crate::lora::ForwardCtx;
    use std::collections::HashMap;

    fn fixtures() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
    }

    fn read_gguf(path: &Path) -> (gguf_file::Content, HashMap<String, Tensor>) {
        let mut f = std::fs::File::open(path).unwrap();
        let ct = gguf_file::Content::read(&mut f).unwrap();
        let tensors = ct
            .tensor_infos
            .keys()
            .map(|n| {
                let q = ct.tensor(&mut f, n, &Device::Cpu).unwrap();
                (n.clone(), q.dequantize(&Device::Cpu).unwrap())
            })
            .collect();
        (ct, tensors)
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// What llama.cpp computes from our LoRA GGUF over the base, `W + (alpha / r)·B·A` per
    /// module in the file's own layout, is the base's weight with PEFT's adapter merged
    /// as loraforge (and PEFT) merge it, in every module: names, shapes, the Q/K row
    /// interleaving and the scale all have to be right for that. On the tiny llama's GGUF
    /// (interleaved Q/K rows), and on qwen2 and phi3 (fused `attn_qkv` and `ffn_up`),
    /// whose converted files keep HF's rows: their file weights are the HF folder's
    /// under llama.cpp's names.
    #[test]
    fn lora_gguf_applied_as_llama_cpp_does_is_the_merged_model() {
        let dir = tempfile::tempdir().unwrap();
        for (name, base_path, modules) in [
            (
                "llama",
                fixtures().join("tiny-llama-gguf/tiny-llama.gguf"),
                14,
            ),
            ("qwen2", fixtures().join("tiny-qwen2"), 14),
            ("phi3", fixtures().join("tiny-phi3"), 8),
        ] {
            let adapter = fixtures().join(format!("tiny-{name}-ref/adapter_nonzero"));
            let out = dir.path().join(format!("{name}.gguf"));
            let shape = read_base_shape(&base_path).unwrap();
            let arch = llama_cpp_arch(&shape.model_type).unwrap();
            let done = write_lora_gguf(&adapter, &shape, GgufFloat::F32, &out).unwrap();
            // r 4, alpha 8: llama.cpp's alpha / r is PEFT's scale.
            assert_eq!((done.arch, done.alpha, done.modules), (name, 8.0, modules));
            let (ct, lora) = read_gguf(&out);
            let text = |k: &str| ct.metadata[k].to_string().unwrap().clone();
            assert_eq!(text("general.architecture"), name);
            assert_eq!(text("general.type"), "adapter");
            assert_eq!(text("adapter.type"), "lora");
            assert_eq!(ct.metadata["adapter.lora.alpha"].to_f32().unwrap(), 8.0);
            assert_eq!(lora.len(), 2 * modules);

            let file_weights: HashMap<String, Tensor> = if base_path.is_dir() {
                assert!(!arch.permute_qk);
                crate::io::read_safetensors_f32(&base_path, &Device::Cpu)
                    .unwrap()
                    .into_iter()
                    .filter_map(|(k, w)| {
                        let m = loader::hf_to_gguf_module(k.strip_suffix(".weight")?)?;
                        Some((format!("{m}.weight"), w))
                    })
                    .collect()
            } else {
                read_gguf(&base_path).1
            };
            let merged: HashMap<String, Tensor> =
                load_with_adapter(&base_path, Some(&adapter), &Device::Cpu)
                    .unwrap()
                    .model
                    .merged_weights()
                    .unwrap()
                    .into_iter()
                    .collect();
            // HF's name of a llama.cpp module, fused ones included.
            let hf_name = |g: &str| -> String {
                merged
                    .keys()
                    .find(|k| {
                        k.strip_suffix(".weight")
                            .and_then(loader::hf_to_gguf_module)
                            .is_some_and(|m| format!("{m}.weight") == g)
                    })
                    .unwrap_or_else(|| panic!("{name}: no HF weight for {g}"))
                    .clone()
            };
            let mut checked = 0;
            for (g, w) in &file_weights {
                let (Some(a), Some(b)) = (
                    lora.get(&format!("{g}.lora_a")),
                    lora.get(&format!("{g}.lora_b")),
                ) else {
                    continue;
                };
                let applied = (w + (b.matmul(a).unwrap() * (8.0 / 4.0)).unwrap()).unwrap();
                // Back to HF's row order the way the loader reads a GGUF base (the
                // inverse of llama.cpp's interleaving), then against the merged model.
                let heads = match g.as_str() {
                    n if n.ends_with("attn_q.weight") => Some(shape.num_attention_heads),
                    n if n.ends_with("attn_k.weight") => Some(shape.num_key_value_heads),
                    _ => None,
                };
                let applied = match heads {
                    Some(n) if arch.permute_qk => {
                        let order = loader::permute_order(applied.dim(0).unwrap(), n);
                        let mut inverse = vec![0u32; order.len()];
                        for (file_row, &hf_row) in order.iter().enumerate() {
                            inverse[hf_row] = file_row as u32;
                        }
                        applied
                            .index_select(&Tensor::new(inverse, &Device::Cpu).unwrap(), 0)
                            .unwrap()
                    }
                    _ => applied,
                };
                let d = max_abs_diff(&applied, &merged[&hf_name(g)]);
                assert!(d < 1e-5, "{name} {g}: {d}");
                checked += 1;
            }
            assert_eq!(checked, modules, "{name}");
        }
    }

    /// rsLoRA's scale `alpha / √r` is kept by the alpha written; whole trained modules,
    /// an unknown architecture and LoRA on a tied output head are refused by name.
    #[test]
    fn lora_gguf_scale_and_refusals() {
        let src = fixtures().join("tiny-llama-ref/adapter_nonzero");
        let shape = read_base_shape(&fixtures().join("tiny-llama")).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let adapter = dir.path().join("a");
        std::fs::create_dir(&adapter).unwrap();
        std::fs::copy(
            src.join("adapter_model.safetensors"),
            adapter.join("adapter_model.safetensors"),
        )
        .unwrap();
        let config: serde_json::Value =
            crate::io::read_json(&src.join("adapter_config.json")).unwrap();
        let write_config = |edit: &dyn Fn(&mut serde_json::Value)| {
            let mut c = config.clone();
            edit(&mut c);
            std::fs::write(adapter.join("adapter_config.json"), c.to_string()).unwrap();
        };
        let out = dir.path().join("x.gguf");
        write_config(&|c| c["use_rslora"] = true.into());
        let done = write_lora_gguf(&adapter, &shape, GgufFloat::F16, &out).unwrap();
        // 8 / √4 · 4
        assert_eq!(done.alpha, 16.0);
        std::fs::remove_file(&out).unwrap();
        write_config(&|c| c["modules_to_save"] = serde_json::json!(["score"]));
        let e = write_lora_gguf(&adapter, &shape, GgufFloat::F32, &out).unwrap_err();
        assert!(e.to_string().contains("whole modules"), "{e}");
        write_config(&|_| {});
        let other = BaseShape {
            model_type: "falcon".into(),
            ..shape.clone()
        };
        let e = write_lora_gguf(&adapter, &other, GgufFloat::F32, &out).unwrap_err();
        assert!(e.to_string().contains("\"falcon\""), "{e}");
        // An adapter on lm_head: fine where the head is its own tensor, refused where it
        // is the embedding table.
        let mut tensors =
            candle_core::safetensors::load(adapter.join("adapter_model.safetensors"), &Device::Cpu)
                .unwrap();
        tensors.insert(
            "base_model.model.lm_head.lora_A.weight".into(),
            Tensor::zeros((4, 64), DType::F32, &Device::Cpu).unwrap(),
        );
        tensors.insert(
            "base_model.model.lm_head.lora_B.weight".into(),
            Tensor::zeros((400, 4), DType::F32, &Device::Cpu).unwrap(),
        );
        candle_core::safetensors::save(&tensors, adapter.join("adapter_model.safetensors"))
            .unwrap();
        let done = write_lora_gguf(&adapter, &shape, GgufFloat::F32, &out).unwrap();
        assert_eq!(done.modules, 15);
        let tied = BaseShape {
            tie_word_embeddings: true,
            ..shape.clone()
        };
        std::fs::remove_file(&out).unwrap();
        let e = write_lora_gguf(&adapter, &tied, GgufFloat::F32, &out).unwrap_err();
        assert!(e.to_string().contains("lm_head"), "{e}");
        assert!(!out.exists());
    }

    /// A merged GGUF written in f32 computes as the base with its adapter; in q8_0 close
    /// to it; both keep the base file's tokenizer, template and rope factors.
    #[test]
    fn merged_gguf_computes_as_base_with_adapter() {
        let base_path = fixtures().join("tiny-llama-gguf/tiny-llama.gguf");
        let adapter = fixtures().join("tiny-llama-ref/adapter_nonzero");
        let with = load_with_adapter(&base_path, Some(&adapter), &Device::Cpu).unwrap();
        let ids: Vec<u32> = with
            .tokenizer
            .encode("The capital of France is Paris.", false)
            .unwrap();
        let n = ids.len();
        let x = Tensor::from_vec(ids, (1, n), &Device::Cpu).unwrap();
        let want = with.model.logits(&x, None, &ForwardCtx::eval()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let scale = want
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let mut q8_from_f32 = None;
        for ty in [MergedType::F32, MergedType::Q8_0] {
            let out = dir.path().join(format!("merged-{ty:?}.gguf"));
            let written = write_merged_gguf(
                &base_path,
                &with.model.cfg,
                with.model.merged_weights().unwrap(),
                ty,
                &out,
            )
            .unwrap();
            let (ct, _) = read_gguf(&out);
            assert_eq!(written, ct.tensor_infos.len());
            let (base_ct, _) = read_gguf(&base_path);
            assert_eq!(
                ct.metadata["general.file_type"].to_u32().unwrap(),
                ty.file_type()
            );
            for k in [
                "tokenizer.ggml.tokens",
                "tokenizer.chat_template",
                "llama.rope.freq_base",
            ] {
                assert_eq!(
                    format!("{:?}", ct.metadata[k]),
                    format!("{:?}", base_ct.metadata[k]),
                    "{k}"
                );
            }
            assert_eq!(
                base_ct
                    .tensor_infos
                    .keys()
                    .collect::<std::collections::BTreeSet<_>>(),
                ct.tensor_infos
                    .keys()
                    .collect::<std::collections::BTreeSet<_>>()
            );
            let merged =
                loader::load_with(&out, &Device::Cpu, crate::device::BaseDtype::Auto).unwrap();
            let got = merged.model.logits(&x, None, &ForwardCtx::eval()).unwrap();
            let d = max_abs_diff(&got, &want) / scale;
            println!(
                "merged {ty:?}: logits within {d:.2e} of base + adapter (relative to the largest)"
            );
            match ty {
                // Exact but for the order of sums.
                MergedType::F32 => {
                    assert!(d < 1e-5, "{d}");
                    // The f32 file's matrices packed as q8_0 at load: what the q8_0 file
                    // must hold, quantized by the same code.
                    let packed = loader::load_with(
                        &out,
                        &Device::Cpu,
                        crate::device::BaseDtype::Packed(GgmlDType::Q8_0),
                    )
                    .unwrap();
                    q8_from_f32 = Some(packed.model.logits(&x, None, &ForwardCtx::eval()).unwrap());
                }
                _ => {
                    let d = max_abs_diff(&got, q8_from_f32.as_ref().unwrap()) / scale;
                    assert!(
                        d < 1e-6,
                        "q8_0 file against the f32 file packed as q8_0: {d}"
                    );
                }
            }
        }
        // An HF folder has no GGUF metadata to carry: refused, pointing elsewhere.
        let e = write_merged_gguf(
            &fixtures().join("tiny-llama"),
            &with.model.cfg,
            Vec::new(),
            MergedType::F16,
            &dir.path().join("x.gguf"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("convert_hf_to_gguf.py"), "{e}");
    }

    #[test]
    fn modelfile_maps_chatml_with_its_default_system_prompt() {
        let base = loader::load_tokenizer(&fixtures().join("tiny-llama")).unwrap();
        let m = modelfile("m.gguf", &base);
        assert!(m.starts_with("FROM ./m.gguf\n"), "{m}");
        assert!(
            m.contains("TEMPLATE \"\"\"{{- range .Messages }}<|im_start|>{{ .Role }}\n"),
            "{m}"
        );
        assert!(
            m.contains("SYSTEM \"\"\"You are a helpful AI assistant named SmolLM, trained by Hugging Face\"\"\"\n"),
            "{m}"
        );
        assert!(m.contains("PARAMETER stop \"<|im_end|>\"\n"), "{m}");
        assert_eq!(m.matches("PARAMETER stop \"<|im_end|>\"").count(), 1, "{m}");
    }
}
