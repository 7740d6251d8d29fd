//! Base-model discovery: what is in a models directory, without loading weights.

use crate::{Error, Result};
use serde::Serialize;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Decoder architectures the trainer can fine-tune for causal LM.
pub const TRAINABLE_ARCHITECTURES: [&str; 3] = ["llama", "mistral", "qwen2"];

/// The training tasks an architecture supports (empty: none).
pub fn tasks_of(arch: &str) -> Vec<String> {
    if TRAINABLE_ARCHITECTURES.contains(&arch) {
        vec!["causal_lm".into()]
    } else if crate::encoder::ENCODER_ARCHITECTURES.contains(&arch) {
        vec!["sequence_classification".into()]
    } else {
        Vec::new()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelFormat {
    /// A HuggingFace folder (`config.json` + safetensors).
    Hf,
    /// A single GGUF file (dequantized to f32 for training).
    Gguf,
    /// A diffusers pipeline folder (`model_index.json`, `unet/`, `vae/`, ...).
    Diffusers,
}

/// A base model as found on disk.
#[derive(Debug, Clone, Serialize)]
pub struct ModelInfo {
    /// The folder or file name inside the models directory.
    pub id: String,
    pub path: PathBuf,
    pub format: ModelFormat,
    pub architecture: String,
    pub parameters: u64,
    pub context_length: Option<u64>,
    pub trainable: bool,
    /// The tasks it can be fine-tuned for (`causal_lm`, `sequence_classification`).
    pub tasks: Vec<String>,
    /// Why the model is not trainable, when it is not.
    pub note: Option<String>,
}

/// Lists the models in `dir`: sub-folders with a `config.json` and `*.gguf` files.
/// An entry that cannot be read is listed as not trainable, with the reason.
pub fn scan(dir: &Path) -> Vec<ModelInfo> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<ModelInfo> = Vec::new();
    for entry in rd.flatten() {
        let path = entry.path();
        let is_candidate = (path.is_dir()
            && (path.join("config.json").is_file() || path.join("model_index.json").is_file()))
            || path.extension().is_some_and(|e| e == "gguf");
        if !is_candidate {
            continue;
        }
        let id = entry.file_name().to_string_lossy().into_owned();
        match inspect(&path) {
            Ok(mut info) => {
                info.id = id;
                out.push(info)
            }
            Err(e) => out.push(ModelInfo {
                id,
                format: if path.is_dir() {
                    ModelFormat::Hf
                } else {
                    ModelFormat::Gguf
                },
                path,
                architecture: "unknown".into(),
                parameters: 0,
                context_length: None,
                trainable: false,
                tasks: Vec::new(),
                note: Some(e.to_string()),
            }),
        }
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    out
}

fn trainability(arch: &str) -> (bool, Option<String>) {
    if !tasks_of(arch).is_empty() {
        (true, None)
    } else {
        (
            false,
            Some(format!(
                "architecture \"{arch}\" is not supported yet (supported: {}, {})",
                TRAINABLE_ARCHITECTURES.join(", "),
                crate::encoder::ENCODER_ARCHITECTURES.join(", ")
            )),
        )
    }
}

/// Reads a model's metadata: config.json and safetensors headers, or GGUF metadata.
pub fn inspect(path: &Path) -> Result<ModelInfo> {
    let id = path
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    if path.join("model_index.json").is_file() {
        return inspect_diffusers(path, id);
    }
    if path.is_dir() {
        let cfg_path = path.join("config.json");
        let cfg: serde_json::Value = crate::read_json(&cfg_path)?;
        let arch = cfg
            .get("model_type")
            .and_then(|v| v.as_str())
            .ok_or_else(|| Error::Model(format!("{}: no \"model_type\"", cfg_path.display())))?
            .to_string();
        let parameters = safetensors_files(path)?
            .iter()
            .map(|f| safetensors_param_count(f))
            .sum::<Result<u64>>()?;
        let context_length = cfg.get("max_position_embeddings").and_then(|v| v.as_u64());
        let (trainable, note) = trainability(&arch);
        let tasks = tasks_of(&arch);
        Ok(ModelInfo {
            id,
            path: path.to_path_buf(),
            format: ModelFormat::Hf,
            architecture: arch,
            parameters,
            context_length,
            trainable,
            tasks,
            note,
        })
    } else {
        let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let ct = candle_core::quantized::gguf_file::Content::read(&mut f)
            .map_err(|e| Error::Model(format!("{}: {e}", path.display())))?;
        let arch = ct
            .metadata
            .get("general.architecture")
            .and_then(|v| v.to_string().ok().cloned())
            .ok_or_else(|| Error::Model(format!("{}: no general.architecture", path.display())))?;
        let context_length = ct
            .metadata
            .get(&format!("{arch}.context_length"))
            .and_then(|v| v.to_u64().ok().or_else(|| v.to_u32().ok().map(u64::from)));
        let parameters = ct
            .tensor_infos
            .values()
            .map(|t| t.shape.elem_count() as u64)
            .sum();
        let (trainable, note) = trainability(&arch);
        let tasks = tasks_of(&arch);
        Ok(ModelInfo {
            id,
            path: path.to_path_buf(),
            format: ModelFormat::Gguf,
            architecture: arch,
            parameters,
            context_length,
            trainable,
            tasks,
            note,
        })
    }
}

/// The safetensors files of an HF or diffusers folder: the index's shards, or the single file.
pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    // transformers' names, then diffusers' (the components of an SD folder).
    for stem in ["model", "diffusion_pytorch_model"] {
        let index = dir.join(format!("{stem}.safetensors.index.json"));
        if index.is_file() {
            let v: serde_json::Value = crate::read_json(&index)?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::Model(format!("{}: no weight_map", index.display())))?;
            let mut files: Vec<PathBuf> = map
                .values()
                .filter_map(|f| f.as_str())
                .map(|f| dir.join(f))
                .collect();
            files.sort();
            files.dedup();
            return Ok(files);
        }
        let single = dir.join(format!("{stem}.safetensors"));
        if single.is_file() {
            return Ok(vec![single]);
        }
    }
    Err(Error::Model(format!(
        "{}: no model.safetensors or model.safetensors.index.json",
        dir.display()
    )))
}

/// Parameter count from a safetensors header alone (8-byte length + JSON), without mapping the data.
fn safetensors_param_count(path: &Path) -> Result<u64> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(|e| Error::io(path, e))?;
    let n = u64::from_le_bytes(len);
    if n > 100 << 20 {
        return Err(Error::Model(format!(
            "{}: implausible header size",
            path.display()
        )));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(|e| Error::io(path, e))?;
    let v: serde_json::Value = serde_json::from_slice(&header)?;
    let mut total = 0u64;
    for (k, t) in v.as_object().into_iter().flatten() {
        if k == "__metadata__" {
            continue;
        }
        if let Some(shape) = t.get("shape").and_then(|s| s.as_array()) {
            total += shape.iter().filter_map(|d| d.as_u64()).product::<u64>();
        }
    }
    Ok(total)
}

/// Pipelines whose UNet the trainer can fine-tune (SD 1.x / 2.x).
pub const TRAINABLE_PIPELINES: [&str; 1] = ["StableDiffusionPipeline"];

/// A diffusers pipeline folder: its class from `model_index.json`, the parameters of
/// its UNet, VAE and text encoder.
fn inspect_diffusers(path: &Path, id: String) -> Result<ModelInfo> {
    let idx = path.join("model_index.json");
    let v: serde_json::Value = crate::read_json(&idx)?;
    let class = v
        .get("_class_name")
        .and_then(|c| c.as_str())
        .ok_or_else(|| Error::Model(format!("{}: no \"_class_name\"", idx.display())))?
        .to_string();
    let mut parameters = 0;
    for part in ["unet", "vae", "text_encoder"] {
        let dir = path.join(part);
        if dir.is_dir() {
            for f in safetensors_files(&dir)? {
                parameters += safetensors_param_count(&f)?;
            }
        }
    }
    let trainable = TRAINABLE_PIPELINES.contains(&class.as_str());
    Ok(ModelInfo {
        id,
        path: path.to_path_buf(),
        format: ModelFormat::Diffusers,
        architecture: class.clone(),
        parameters,
        context_length: None,
        trainable,
        tasks: if trainable {
            vec!["text_to_image".into()]
        } else {
            Vec::new()
        },
        note: (!trainable).then(|| {
            format!(
                "pipeline \"{class}\" is not supported yet (supported: {})",
                TRAINABLE_PIPELINES.join(", ")
            )
        }),
    })
}
