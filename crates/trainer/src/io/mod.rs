//! Reading what models are made of: JSON configs, safetensors (single or sharded, HF or
//! diffusers names), and one way of taking named weights out of what was read. GGUF
//! files are read by the decoder family, whose architectures they carry.

use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::Value;
use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

/// A JSON file (a model's `config.json`, an adapter's config, ...), naming the file when
/// it cannot be read.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    Ok(serde_json::from_str(&text)?)
}

/// The last part of `path` as error messages name a data file (the whole path when it
/// has none, as `..`).
pub fn file_name(path: &Path) -> String {
    path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

/// What an adapter's `base_model_name_or_path` records for the base at `path`: the hub id
/// the base comes from when that is known for sure (`source`, a GGUF's source repository;
/// or a folder in the Hugging Face cache, `models--owner--name/snapshots/<rev>`), else
/// the base's canonical path. Either resolves where the adapter is used (PEFT's
/// `AutoPeftModelForCausalLM`, llama.cpp's `convert_lora_to_gguf.py`); a bare folder
/// name resolves nowhere. A `config.json`'s `_name_or_path` is not trusted: transformers
/// 4 saved there whatever the model was loaded from, often its parent.
pub fn base_reference(path: &Path, source: Option<&str>) -> String {
    if let Some(id) = source.filter(|s| is_hub_id(s)) {
        return id.to_string();
    }
    // Canonical where the path exists (no `..` left in it), else made absolute.
    let full = std::fs::canonicalize(path)
        .or_else(|_| std::path::absolute(path))
        .unwrap_or_else(|_| path.to_path_buf());
    let parts: Vec<&str> = full.iter().filter_map(|c| c.to_str()).collect();
    let cached = match parts.as_slice() {
        [.., repo, "snapshots", _rev] if path.is_dir() => repo
            .strip_prefix("models--")
            .map(|r| r.replacen("--", "/", 1)),
        _ => None,
    };
    match cached.filter(|id| is_hub_id(id)) {
        Some(id) => id,
        None => full.display().to_string(),
    }
}

/// `owner/name` as the Hugging Face hub spells repository ids, and not a path that
/// exists here.
fn is_hub_id(s: &str) -> bool {
    let part = |p: &str| {
        !p.is_empty()
            && !p.starts_with(['.', '-'])
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    let mut parts = s.split('/');
    let shaped = matches!(
        (parts.next(), parts.next(), parts.next()),
        (Some(a), Some(b), None) if part(a) && part(b)
    );
    shaped && !Path::new(s).exists()
}

/// A required unsigned integer of a `config.json`.
pub(crate) fn get_usize(v: &Value, key: &str) -> Result<usize> {
    v.get(key)
        .and_then(|x| x.as_u64())
        .map(|x| x as usize)
        .ok_or_else(|| Error::Config(format!("config.json: missing or invalid \"{key}\"")))
}

/// Frozen weights by their HF names.
pub type Weights = HashMap<String, Tensor>;

/// Takes named tensors out of a weight map, each once, under an optional path prefix
/// (as candle's `VarBuilder::pp`), naming the model and the whole key when one is missing.
pub struct Take<'a, T = Tensor> {
    w: &'a mut HashMap<String, T>,
    /// Which model, for error messages.
    what: &'static str,
    prefix: Option<String>,
}

impl<'a, T> Take<'a, T> {
    pub fn new(w: &'a mut HashMap<String, T>, what: &'static str) -> Self {
        Take {
            w,
            what,
            prefix: None,
        }
    }

    /// Keys are looked up as `prefix.name` from here on.
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = Some(prefix.into());
        self
    }

    fn key(&self, name: &str) -> String {
        match &self.prefix {
            Some(p) => format!("{p}.{name}"),
            None => name.to_string(),
        }
    }

    pub fn get(&mut self, name: &str) -> Result<T> {
        let key = self.key(name);
        self.w
            .remove(&key)
            .ok_or_else(|| Error::Model(format!("{}: missing weight {key}", self.what)))
    }

    /// A weight the model may or may not have.
    pub fn get_opt(&mut self, name: &str) -> Option<T> {
        let key = self.key(name);
        self.w.remove(&key)
    }

    pub fn has(&self, name: &str) -> bool {
        self.w.contains_key(&self.key(name))
    }

    /// The names not taken yet, sorted.
    pub fn rest(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.w.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }
}

/// Every floating-point tensor of an HF folder's safetensors, as f32, by name. Integer
/// tensors are buffers, not weights (e.g. BERT's saved `position_ids`), and are skipped.
pub fn read_safetensors_f32(dir: &Path, device: &Device) -> Result<Weights> {
    let mut weights = Weights::new();
    for file in safetensors_files(dir)? {
        let tensors = candle_core::safetensors::load(&file, device)
            .map_err(|e| Error::Model(format!("{}: {e}", file.display())))?;
        for (k, t) in tensors {
            if t.dtype().is_float() {
                weights.insert(k, t.to_dtype(DType::F32)?);
            }
        }
    }
    Ok(weights)
}

/// The safetensors files of an HF or diffusers folder: the index's shards, or the single file.
pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    // transformers' names, then diffusers' (the components of an SD folder).
    for stem in ["model", "diffusion_pytorch_model"] {
        let index = dir.join(format!("{stem}.safetensors.index.json"));
        if index.is_file() {
            let v: serde_json::Value = read_json(&index)?;
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

/// A safetensors file's header (8-byte length + JSON), without mapping the data.
fn safetensors_header(path: &Path) -> Result<serde_json::Map<String, Value>> {
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
    let mut v: serde_json::Map<String, Value> = serde_json::from_slice(&header)?;
    v.remove("__metadata__");
    Ok(v)
}

/// Parameters per stored dtype (`f32`, `bf16`, ...) from a safetensors header alone.
pub fn safetensors_params(path: &Path) -> Result<HashMap<String, u64>> {
    let mut out = HashMap::new();
    for t in safetensors_header(path)?.values() {
        let n: u64 = t
            .get("shape")
            .and_then(|s| s.as_array())
            .map(|s| s.iter().filter_map(|d| d.as_u64()).product())
            .unwrap_or(0);
        let dtype = t
            .get("dtype")
            .and_then(|d| d.as_str())
            .unwrap_or("?")
            .to_lowercase();
        *out.entry(dtype).or_insert(0) += n;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_reference_is_a_known_hub_id_else_the_canonical_path() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("my-model");
        std::fs::create_dir(&model).unwrap();
        let here = std::fs::canonicalize(&model).unwrap().display().to_string();
        let config = |v: serde_json::Value| {
            std::fs::write(model.join("config.json"), v.to_string()).unwrap();
        };
        // transformers 4 saved what the model was loaded from (often its parent): not
        // trusted, whatever it looks like.
        for named in [
            "HuggingFaceTB/SmolLM2-135M",
            "/home/me/models/x",
            "./x/y",
            "x",
        ] {
            config(serde_json::json!({ "_name_or_path": named }));
            assert_eq!(base_reference(&model, None), here);
        }
        // A folder in the Hugging Face cache is its repository.
        let snap = dir
            .path()
            .join("hub/models--HuggingFaceTB--SmolLM2-135M-Instruct/snapshots/0123abc");
        std::fs::create_dir_all(&snap).unwrap();
        assert_eq!(
            base_reference(&snap, None),
            "HuggingFaceTB/SmolLM2-135M-Instruct"
        );
        // A GGUF's source repository, and a relative path made absolute.
        let gguf = Path::new("models/x.gguf");
        assert_eq!(
            base_reference(gguf, Some("Qwen/Qwen3-0.6B")),
            "Qwen/Qwen3-0.6B"
        );
        let abs = base_reference(gguf, None);
        assert!(
            Path::new(&abs).is_absolute() && abs.ends_with("models/x.gguf"),
            "{abs}"
        );
    }
}
