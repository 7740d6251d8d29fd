//! Loading a base model with an adapter, and writing merged model folders.

use crate::families::decoder::loader::{self, BaseModel};
use crate::lora;
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::Path;

/// Loads `model` and, when given, attaches and fills the PEFT adapter in `adapter`.
pub fn load_with_adapter(
    model: &Path,
    adapter: Option<&Path>,
    device: &Device,
) -> Result<BaseModel> {
    let mut base = loader::load(model, device)?;
    if let Some(dir) = adapter {
        let cfg = lora::read_adapter_config(dir)?;
        lora::attach(&mut base.model, &cfg, 0)?;
        lora::load_adapter_weights(&base.model, dir)?;
    }
    Ok(base)
}

/// Writes a full HF model folder with `W + scale·B·A` merged into every adapted weight,
/// its tensors stored as `dtype` (f32, bf16 or f16; the merge itself is in f32). An HF
/// source keeps its own `config.json` (its `torch_dtype` set to `dtype`) and tokenizer
/// files; a GGUF source gets them written from what was loaded.
pub fn write_merged(base: &BaseModel, source: &Path, out: &Path, dtype: DType) -> Result<()> {
    let torch_dtype = match dtype {
        DType::F32 => "float32",
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        other => {
            return Err(Error::Config(format!(
                "merged weights as {other:?} (f32, bf16 or f16)"
            )))
        }
    };
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let tensors: BTreeMap<String, Tensor> = base
        .model
        .merged_weights()?
        .into_iter()
        .map(|(k, t)| Ok((k, t.to_dtype(dtype)?)))
        .collect::<Result<_>>()?;
    lora::write_safetensors(&out.join("model.safetensors"), &tensors)?;
    let copy = |name: &str| -> Result<bool> {
        let src = source.join(name);
        if src.is_file() {
            std::fs::copy(&src, out.join(name)).map_err(|e| Error::io(&src, e))?;
            Ok(true)
        } else {
            Ok(false)
        }
    };
    if source.is_dir() {
        let mut config: serde_json::Value = crate::io::read_json(&source.join("config.json"))?;
        config["torch_dtype"] = json!(torch_dtype);
        let p = out.join("config.json");
        std::fs::write(&p, serde_json::to_string_pretty(&config)?).map_err(|e| Error::io(&p, e))?;
        for f in [
            "generation_config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "chat_template.jinja",
        ] {
            copy(f)?;
        }
        return Ok(());
    }
    let c = &base.model.cfg;
    let arch = match c.model_type.as_str() {
        "qwen2" => "Qwen2ForCausalLM",
        "qwen3" => "Qwen3ForCausalLM",
        "mistral" => "MistralForCausalLM",
        _ => "LlamaForCausalLM",
    };
    let config = json!({
        "architectures": [arch],
        "model_type": c.model_type,
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "max_position_embeddings": c.max_position_embeddings,
        "tie_word_embeddings": c.tie_word_embeddings,
        "attention_bias": c.o_bias,
        "hidden_act": "silu",
        "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_ids.first(),
        "torch_dtype": torch_dtype,
    });
    let w = |name: &str, v: &serde_json::Value| -> Result<()> {
        let p = out.join(name);
        std::fs::write(&p, serde_json::to_string_pretty(v)?).map_err(|e| Error::io(&p, e))
    };
    w("config.json", &config)?;
    w(
        "generation_config.json",
        &json!({"bos_token_id": c.bos_token_id, "eos_token_id": base.tokenizer.eos_ids}),
    )?;
    let t = &base.tokenizer;
    w(
        "tokenizer_config.json",
        &json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": t.bos_token,
            "eos_token": t.eos_token,
            "chat_template": t.chat_template,
        }),
    )?;
    let p = out.join("tokenizer.json");
    t.tokenizer
        .save(&p, false)
        .map_err(|e| Error::Tokenizer(format!("{}: {e}", p.display())))?;
    Ok(())
}
