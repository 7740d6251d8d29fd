//! The model families, one folder each, and the registry that the loop, the server and
//! the CLI ask: which family trains a task ([`for_task`]), and what is in a models
//! directory ([`scan`], [`inspect`], without loading weights).

pub mod decoder;
pub mod diffusion;
pub mod encoder;
mod family;
pub mod speech;
pub mod vision;

pub use family::{Family, Field, JobCheck, MemoryEstimate, Named, Refusal};

use crate::train::Task;

/// Every family the engine has.
pub static ALL: &[&dyn Family] = &[
    &decoder::DecoderFamily,
    &encoder::EncoderFamily,
    &diffusion::DiffusionFamily,
    &vision::VisionFamily,
    &speech::SpeechFamily,
];

/// The family that trains `task`.
pub fn for_task(task: Task) -> &'static dyn Family {
    *ALL.iter()
        .find(|f| f.task() == task)
        .expect("every task has a family in ALL")
}

use crate::io::{safetensors_files, safetensors_params};
use crate::{Error, Result};
use serde::Serialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The training tasks an architecture supports (empty: none).
pub fn tasks_of(arch: &str) -> Vec<String> {
    ALL.iter()
        .filter(|f| f.architectures().contains(&arch))
        .map(|f| f.task().as_str().to_string())
        .collect()
}

/// The training tasks a diffusers pipeline class supports (empty: none).
fn pipeline_tasks(class: &str) -> Vec<String> {
    ALL.iter()
        .filter(|f| f.pipelines().contains(&class))
        .map(|f| f.task().as_str().to_string())
        .collect()
}

/// Every name that `pick` gives the families, for "supported: ..." messages.
fn supported(pick: impl Fn(&dyn Family) -> &'static [&'static str]) -> String {
    ALL.iter()
        .flat_map(|f| pick(*f).iter().copied())
        .collect::<Vec<_>>()
        .join(", ")
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
    /// The stored type of most of its parameters (`bf16`, `q4_k`, ...).
    pub weights_dtype: Option<String>,
    /// Training memory of a default job (batch 4 × 1,024 tokens, f32 on the CPU, the
    /// base as `auto` keeps it), by the family's estimator; `None` when it has none.
    pub training_memory_bytes: Option<u64>,
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
                weights_dtype: None,
                training_memory_bytes: None,
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
                "architecture \"{arch}\" is not supported yet (supported: {})",
                supported(|f| f.architectures())
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
        let cfg: serde_json::Value = crate::io::read_json(&cfg_path)?;
        let arch = cfg
            .get("model_type")
            .and_then(|v| v.as_str())
            .ok_or_else(|| Error::Model(format!("{}: no \"model_type\"", cfg_path.display())))?
            .to_string();
        let mut by_dtype = HashMap::new();
        for f in safetensors_files(path)? {
            for (d, n) in safetensors_params(&f)? {
                *by_dtype.entry(d).or_insert(0) += n;
            }
        }
        let parameters = by_dtype.values().sum();
        let context_length = cfg.get("max_position_embeddings").and_then(|v| v.as_u64());
        let (trainable, note) = trainability(&arch);
        let tasks = tasks_of(&arch);
        Ok(ModelInfo {
            training_memory_bytes: default_job_memory(path, &arch),
            id,
            path: path.to_path_buf(),
            format: ModelFormat::Hf,
            architecture: arch,
            parameters,
            weights_dtype: most(by_dtype),
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
        let mut by_dtype = HashMap::new();
        for t in ct.tensor_infos.values() {
            *by_dtype
                .entry(crate::device::ggml_name(t.ggml_dtype).to_string())
                .or_insert(0) += t.shape.elem_count() as u64;
        }
        let parameters = by_dtype.values().sum();
        let (trainable, note) = trainability(&arch);
        let tasks = tasks_of(&arch);
        Ok(ModelInfo {
            training_memory_bytes: default_job_memory(path, &arch),
            id,
            path: path.to_path_buf(),
            format: ModelFormat::Gguf,
            architecture: arch,
            parameters,
            weights_dtype: most(by_dtype),
            context_length,
            trainable,
            tasks,
            note,
        })
    }
}

/// A diffusers pipeline folder: its class from `model_index.json`, the parameters of
/// its UNet, VAE and text encoder.
/// The stored type that holds the most parameters.
fn most(by_dtype: HashMap<String, u64>) -> Option<String> {
    by_dtype
        .into_iter()
        .max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(&a.0)))
        .map(|(d, _)| d)
}

/// The default job's training memory on the CPU, by the first family that trains `arch`.
fn default_job_memory(path: &Path, arch: &str) -> Option<u64> {
    let family = ALL.iter().find(|f| f.architectures().contains(&arch))?;
    family
        .estimate_memory(path, &serde_json::json!({}), candle_core::DType::F32)
        .map(|e| e.total())
}

fn inspect_diffusers(path: &Path, id: String) -> Result<ModelInfo> {
    let idx = path.join("model_index.json");
    let v: serde_json::Value = crate::io::read_json(&idx)?;
    let class = v
        .get("_class_name")
        .and_then(|c| c.as_str())
        .ok_or_else(|| Error::Model(format!("{}: no \"_class_name\"", idx.display())))?
        .to_string();
    let mut by_dtype = HashMap::new();
    for part in ["unet", "vae", "text_encoder"] {
        let dir = path.join(part);
        if dir.is_dir() {
            for f in safetensors_files(&dir)? {
                for (d, n) in safetensors_params(&f)? {
                    *by_dtype.entry(d).or_insert(0) += n;
                }
            }
        }
    }
    let parameters = by_dtype.values().sum();
    let tasks = pipeline_tasks(&class);
    let trainable = !tasks.is_empty();
    Ok(ModelInfo {
        id,
        path: path.to_path_buf(),
        format: ModelFormat::Diffusers,
        architecture: class.clone(),
        parameters,
        weights_dtype: most(by_dtype),
        training_memory_bytes: None,
        context_length: None,
        trainable,
        tasks,
        note: (!trainable).then(|| {
            format!(
                "pipeline \"{class}\" is not supported yet (supported: {})",
                supported(|f| f.pipelines())
            )
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::TrainSpec;
    use candle_core::DType;

    /// Decoders train in f32, bf16 and f16, bf16 by default on a GPU; the other families
    /// in f32 only, and a run asking them for bf16 is refused by name.
    #[test]
    fn compute_precisions_by_family() {
        let dec = for_task(Task::CausalLm);
        assert_eq!(dec.default_dtype(true), DType::BF16);
        assert_eq!(dec.default_dtype(false), DType::F32);
        let mut spec = TrainSpec::new("m".into(), "d".into(), "o".into());
        assert_eq!(dec.compute_dtype(&spec).unwrap(), DType::F32);
        spec.dtype = Some(DType::F16);
        assert_eq!(dec.compute_dtype(&spec).unwrap(), DType::F16);
        for task in [Task::SequenceClassification, Task::TextToImage] {
            let f = for_task(task);
            assert_eq!(f.default_dtype(true), DType::F32);
            let e = f.compute_dtype(&spec).unwrap_err().to_string();
            assert!(e.contains("dtype f16") && e.contains("in f32 here"), "{e}");
        }
    }
}
