//! Serving adapters: one base model in memory, any number of small PEFT adapters kept
//! as tensors and switched in per request, never merged into the shared base weights.

use crate::lora::{self, LoraConfig, LoraModel};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// A PEFT adapter held in memory.
pub struct AdapterWeights {
    pub config: LoraConfig,
    /// Tensors by PEFT key (`base_model.model.<module>.lora_A.weight`).
    pub tensors: HashMap<String, Tensor>,
}

impl AdapterWeights {
    /// Reads `adapter_config.json` and `adapter_model.safetensors` from `dir`.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let config = lora::read_adapter_config(dir)?;
        let p = dir.join("adapter_model.safetensors");
        let tensors = candle_core::safetensors::load(&p, device)
            .map_err(|e| Error::Adapter(format!("{}: {e}", p.display())))?
            .into_iter()
            .map(|(k, v)| {
                let k = k
                    .replace(".lora_A.default.", ".lora_A.")
                    .replace(".lora_B.default.", ".lora_B.");
                Ok((k, v.to_dtype(DType::F32)?))
            })
            .collect::<Result<_>>()?;
        Ok(Self { config, tensors })
    }

    /// Bytes held, for cache accounting.
    pub fn bytes(&self) -> usize {
        self.tensors.values().map(|t| t.elem_count() * 4).sum()
    }
}

/// Makes `model` compute with `adapter` (or with no adapter at all). Every tensor of the
/// adapter must find its module and every adapted module its tensors.
pub fn apply<M: LoraModel + ?Sized>(model: &mut M, adapter: Option<&AdapterWeights>) -> Result<()> {
    clear(model);
    let Some(a) = adapter else {
        return Ok(());
    };
    lora::attach(model, &a.config, 0)?;
    let params = lora::params(model);
    if params.len() != a.tensors.len() {
        clear(model);
        return Err(Error::Adapter(format!(
            "the adapter has {} tensors, the model's targeted modules need {}",
            a.tensors.len(),
            params.len()
        )));
    }
    for (key, var) in params {
        let t = a
            .tensors
            .get(&key)
            .ok_or_else(|| Error::Adapter(format!("missing tensor {key}")))?;
        let Some(t) = lora::from_file_shape(t, var.dims())? else {
            return Err(Error::Adapter(format!(
                "{key}: shape {:?}, {:?} expected",
                t.dims(),
                var.dims()
            )));
        };
        var.set(&t)?;
    }
    Ok(())
}

/// Takes every adapter off the model.
fn clear<M: LoraModel + ?Sized>(model: &mut M) {
    for (lin, _) in model.linears_mut() {
        lin.lora = None;
    }
    for conv in model.convs_mut() {
        conv.lora = None;
    }
}
