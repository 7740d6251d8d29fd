//! The LoRA layer, exactly as PEFT computes it, and PEFT adapter files.
//!
//! `y = W x + b + s · B(A(dropout(x)))` with `s = alpha / r` (or `alpha / sqrt(r)` with
//! rsLoRA). `A` starts as U(±1/sqrt(in)) (PEFT's kaiming-uniform with a = sqrt(5)), `B` as
//! zeros. Nothing here knows which architecture the layer sits in: a model names each
//! linear by its PEFT module path and the adapter follows the names. Convolutions carry
//! PEFT's conv LoRA ([`conv`]) the same way, targeted by name.

pub mod conv;
pub mod hotswap;

pub use conv::Conv2d;

use crate::ops::{
    frozen_linear, frozen_linear_bias, gelu_frozen_linear, lora_linear, lora_linear_a, Frozen,
};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// Which modules carry an adapter: PEFT module names, or every linear but the output head.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Targets {
    AllLinear,
    Names(Vec<String>),
}

impl Targets {
    /// Parses `all-linear` or a comma-separated list of module names.
    pub fn parse(s: &str) -> Result<Self> {
        let s = s.trim();
        if s == "all-linear" || s == "all_linear" {
            return Ok(Targets::AllLinear);
        }
        let names: Vec<String> = s
            .split(',')
            .map(|x| x.trim().to_string())
            .filter(|x| !x.is_empty())
            .collect();
        if names.is_empty() {
            return Err(Error::Config("target modules: empty list".into()));
        }
        Ok(Targets::Names(names))
    }

    /// PEFT's rule: a target matches the full module path or its last components.
    pub fn matches(&self, module_path: &str, is_output_head: bool) -> bool {
        match self {
            Targets::AllLinear => !is_output_head,
            Targets::Names(names) => names
                .iter()
                .any(|n| module_path == n || module_path.ends_with(&format!(".{n}"))),
        }
    }

    /// The form [`Targets::parse`] reads back: `all-linear` or comma-separated names.
    pub fn to_list(&self) -> String {
        match self {
            Targets::AllLinear => "all-linear".into(),
            Targets::Names(n) => n.join(","),
        }
    }

    /// The names as written to `adapter_config.json`.
    pub fn to_peft(&self, resolved: &[String]) -> serde_json::Value {
        match self {
            Targets::AllLinear => {
                let mut leaf: Vec<String> = resolved
                    .iter()
                    .map(|p| p.rsplit('.').next().unwrap_or(p).to_string())
                    .collect();
                leaf.sort();
                leaf.dedup();
                serde_json::json!(leaf)
            }
            Targets::Names(n) => serde_json::json!(n),
        }
    }
}

/// LoRA hyperparameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f32,
    pub targets: Targets,
    pub use_rslora: bool,
    /// kohya's `conv_dim` / `conv_alpha` (LoCon): the rank and alpha of adapted
    /// convolutions whose kernel is wider than 1×1; unset, they take `r` / `alpha`. An
    /// unset `conv_alpha` is `conv_r` (a scale of 1).
    #[serde(default)]
    pub conv_r: Option<usize>,
    #[serde(default)]
    pub conv_alpha: Option<f64>,
    /// PEFT's `rank_pattern` / `alpha_pattern`: a module whose path is a key, or ends with
    /// `.` and the key (PEFT's `(.*\.)?key$`; a leading `^` asks for the whole path),
    /// takes that rank / alpha; of several keys that match, the longest. Keys are names,
    /// not regular expressions.
    #[serde(default)]
    pub rank_pattern: BTreeMap<String, usize>,
    #[serde(default)]
    pub alpha_pattern: BTreeMap<String, f64>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            r: 8,
            alpha: 16.0,
            dropout: 0.0,
            // Family-neutral: every linear but the output head. A family's own default
            // (PEFT's usual sets) comes from `Family::default_targets`.
            targets: Targets::AllLinear,
            use_rslora: false,
            conv_r: None,
            conv_alpha: None,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
        }
    }
}

/// The value of the longest key in `pattern` that names `path` (see
/// [`LoraConfig::rank_pattern`]).
fn pattern_value<T: Copy>(pattern: &BTreeMap<String, T>, path: &str) -> Option<T> {
    pattern
        .iter()
        .filter(|(k, _)| match k.strip_prefix('^') {
            Some(whole) => path == whole,
            None => path == k.as_str() || path.ends_with(&format!(".{k}")),
        })
        .max_by_key(|(k, _)| k.len())
        .map(|(_, v)| *v)
}

impl LoraConfig {
    /// The rank and alpha of the module at `path` (a convolution with a `kernel`-wide
    /// kernel, or a linear layer for `None`): the patterns', else LoCon's for a kernel
    /// wider than 1, else `r` and `alpha`. Returned as a config of its own.
    pub fn for_module(&self, path: &str, kernel: Option<usize>) -> LoraConfig {
        let mut c = self.clone();
        if kernel.is_some_and(|k| k > 1) {
            if let Some(r) = self.conv_r {
                c.r = r;
                c.alpha = self.conv_alpha.unwrap_or(r as f64);
            } else if let Some(a) = self.conv_alpha {
                c.alpha = a;
            }
        }
        if let Some(r) = pattern_value(&self.rank_pattern, path) {
            c.r = r;
        }
        if let Some(a) = pattern_value(&self.alpha_pattern, path) {
            c.alpha = a;
        }
        c
    }

    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.r == 0 {
            return Err(Error::Config("rank must be at least 1".into()));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::Config("dropout must be in [0, 1)".into()));
        }
        if self.alpha <= 0.0 || !self.alpha.is_finite() {
            return Err(Error::Config("alpha must be positive".into()));
        }
        if self.conv_r == Some(0) || self.rank_pattern.values().any(|&r| r == 0) {
            return Err(Error::Config("rank must be at least 1".into()));
        }
        if self
            .conv_alpha
            .iter()
            .chain(self.alpha_pattern.values())
            .any(|a| *a <= 0.0 || !a.is_finite())
        {
            return Err(Error::Config("alpha must be positive".into()));
        }
        Ok(())
    }
}

/// Per-forward state: training mode, the seeded RNG that drives dropout, and whether
/// the adapters take part.
pub struct ForwardCtx {
    pub train: bool,
    pub rng: RefCell<ChaCha8Rng>,
    /// Off: every adapted layer computes as its frozen base alone (DPO's reference
    /// model, without a second copy of the weights).
    pub adapters: bool,
}

impl ForwardCtx {
    pub fn eval() -> Self {
        Self {
            train: false,
            rng: RefCell::new(ChaCha8Rng::seed_from_u64(0)),
            adapters: true,
        }
    }
    pub fn train(rng: ChaCha8Rng) -> Self {
        Self {
            train: true,
            rng: RefCell::new(rng),
            adapters: true,
        }
    }
    /// The base model alone, as PEFT's `disable_adapter()` runs it.
    pub fn reference() -> Self {
        Self {
            adapters: false,
            ..Self::eval()
        }
    }
}

/// The trainable pair of one adapted module.
pub struct LoraPair {
    pub a: Var,
    pub b: Var,
    pub scale: f64,
    /// The alpha `scale` came from (what adapter configs record).
    pub alpha: f64,
    pub dropout: f32,
}

/// A frozen linear layer that may carry a LoRA adapter.
pub struct Linear {
    /// PEFT module path, e.g. `model.layers.0.self_attn.q_proj`.
    pub path: String,
    /// Dense, or packed (a quantized base) and expanded per product.
    pub weight: Frozen,
    pub bias: Option<Tensor>,
    pub lora: Option<LoraPair>,
    /// Stored as a 1×1 convolution (SD 1.x's `proj_in`/`proj_out`): the same map applied
    /// per pixel, so it computes as a linear layer, but adapter files hold its A and B
    /// as 4-D `[r, in, 1, 1]` / `[out, r, 1, 1]`, as PEFT and kohya write them.
    pub conv1x1: bool,
}

impl Linear {
    /// The frozen weight and bias in `dtype` (the compute precision); an adapter's
    /// weights stay f32, cast per product, as PEFT keeps them under autocast.
    pub fn cast_frozen(&mut self, dtype: DType) -> Result<()> {
        self.weight = self.weight.with_dtype(dtype)?;
        if let Some(b) = &self.bias {
            self.bias = Some(b.to_dtype(dtype)?);
        }
        Ok(())
    }

    pub fn new(path: String, weight: impl Into<Frozen>, bias: Option<Tensor>) -> Self {
        Self {
            path,
            weight: weight.into(),
            bias,
            lora: None,
            conv1x1: false,
        }
    }

    pub fn in_features(&self) -> usize {
        self.weight.dim(1).unwrap_or(0)
    }
    pub fn out_features(&self) -> usize {
        self.weight.dim(0).unwrap_or(0)
    }

    /// `x` is `(n, in)`.
    pub fn forward(&self, x: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        let Some(l) = self.lora.as_ref().filter(|_| ctx.adapters) else {
            return Ok(frozen_linear_bias(x, &self.weight, self.bias.as_ref())?);
        };
        let dropped = ctx.train && l.dropout > 0.0;
        if !dropped && x.dtype() == DType::F32 {
            return Ok(lora_linear_a(
                x,
                &self.weight,
                self.bias.as_ref(),
                l.a.as_tensor(),
                l.b.as_tensor(),
                l.scale,
            )?);
        }
        let xd = if dropped {
            dropout(x, l.dropout, &mut ctx.rng.borrow_mut())?
        } else {
            x.clone()
        };
        let a = l.a.as_tensor().to_dtype(x.dtype())?;
        let xa = xd.matmul(&a.t()?)?;
        if x.dtype() != DType::F32 {
            // Half-precision products: the update's second product and the sum run in
            // f32 and the result stays f32, so the adapter's first, small updates are not
            // rounded away against the base's output (bf16 keeps 8 bits of mantissa).
            // The caller rounds once, where its next product needs to.
            let mut y = frozen_linear(x, &self.weight)?;
            if let Some(bias) = &self.bias {
                y = y.broadcast_add(bias)?;
            }
            let delta = xa.to_dtype(DType::F32)?.matmul(&l.b.as_tensor().t()?)?;
            return Ok((y.to_dtype(DType::F32)? + (delta * l.scale)?)?);
        }
        let b = l.b.as_tensor().to_dtype(x.dtype())?;
        Ok(lora_linear(
            x,
            &self.weight,
            self.bias.as_ref(),
            &xa,
            &b,
            l.scale,
        )?)
    }

    /// `forward(gelu(h))` with the exact GELU: a layer with no adapter at work takes the
    /// pre-activation and makes the activation inside its product's op
    /// ([`gelu_frozen_linear`]); an adapter needs the activation itself (its A and B
    /// gradients read it), so with one it is made first.
    pub fn forward_gelu_input(&self, h: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        if self.lora.is_none() || !ctx.adapters {
            return Ok(gelu_frozen_linear(h, &self.weight, self.bias.as_ref())?);
        }
        self.forward(&crate::ops::gelu_erf(h)?, ctx)
    }

    /// Attaches a fresh adapter: A ~ U(±1/sqrt(in)), B = 0.
    pub fn attach_lora(&mut self, cfg: &LoraConfig, rng: &mut ChaCha8Rng) -> Result<()> {
        let (out, inp) = (self.out_features(), self.in_features());
        let dev = &self.weight.device();
        self.lora = Some(fresh_pair(cfg, inp, (cfg.r, inp), (out, cfg.r), dev, rng)?);
        Ok(())
    }

    /// `W + s·B·A`, for merging.
    pub fn merged_weight(&self) -> Result<Tensor> {
        match &self.lora {
            None => Ok(self.weight.dense()?),
            Some(l) => {
                let delta = l.b.as_tensor().matmul(l.a.as_tensor())?;
                let w = self.weight.dense()?;
                Ok((&w + (delta.to_dtype(w.dtype())? * l.scale)?)?)
            }
        }
    }
}

/// Inverted dropout with a mask drawn from our seeded RNG (candle's CPU RNG cannot be seeded).
pub(crate) fn dropout(x: &Tensor, p: f32, rng: &mut ChaCha8Rng) -> Result<Tensor> {
    let keep = 1.0 / (1.0 - p);
    let mask: Vec<f32> = (0..x.elem_count())
        .map(|_| if rng.random::<f32>() < p { 0.0 } else { keep })
        .collect();
    let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
    Ok(x.mul(&mask)?)
}

/// Models whose linear layers can carry adapters.
pub trait LoraModel {
    /// Every linear layer, in a fixed order, with whether it is the output head.
    fn linears_mut(&mut self) -> Vec<(&mut Linear, bool)>;
    fn linears(&self) -> Vec<&Linear>;
    /// Every convolution that can carry an adapter (PEFT's `Conv2d` LoRA), in a fixed
    /// order; targeted by name only (`all-linear` takes none).
    fn convs_mut(&mut self) -> Vec<&mut Conv2d> {
        Vec::new()
    }
    fn convs(&self) -> Vec<&Conv2d> {
        Vec::new()
    }
    /// PEFT's `task_type`.
    fn task_type(&self) -> &'static str;
    /// Layers trained in full next to the adapters (PEFT's `modules_to_save`), keyed
    /// by the names PEFT stores them under.
    fn full_params(&self) -> Vec<(String, Var)> {
        Vec::new()
    }
    /// The `modules_to_save` recorded in `adapter_config.json`.
    fn modules_to_save(&self) -> Vec<String> {
        Vec::new()
    }
}

/// A or B as an adapter file stores it: 4-D for a 1×1 convolution.
pub fn to_file_shape(t: &Tensor, conv1x1: bool) -> Result<Tensor> {
    Ok(if conv1x1 {
        t.unsqueeze(2)?.unsqueeze(3)?
    } else {
        t.clone()
    })
}

/// A file's A or B in the `(rows, cols)` shape `want`: as is, or from a 1×1 convolution's
/// `[rows, cols, 1, 1]`; `None` when it is neither.
pub fn from_file_shape(t: &Tensor, want: &[usize]) -> Result<Option<Tensor>> {
    let d = t.dims();
    if d == want {
        return Ok(Some(t.clone()));
    }
    if d.len() == 4 && d[2] == 1 && d[3] == 1 && d[..2] == *want {
        return Ok(Some(t.reshape((d[0], d[1]))?));
    }
    Ok(None)
}

/// Module paths of the adapted 1×1 convolutions, whose A and B files hold 4-D.
fn conv1x1_keys<M: LoraModel + ?Sized>(model: &M) -> std::collections::HashSet<String> {
    adapted(model)
        .iter()
        .filter(|m| m.conv1x1)
        .flat_map(|m| [peft_key(m.path, "A"), peft_key(m.path, "B")])
        .collect()
}

/// PEFT's key prefix for a module path.
pub fn peft_key(module_path: &str, which: &str) -> String {
    format!("base_model.model.{module_path}.lora_{which}.weight")
}

/// Attaches fresh adapters to the targeted modules. Errors if nothing matched.
pub fn attach<M: LoraModel + ?Sized>(
    model: &mut M,
    cfg: &LoraConfig,
    seed: u64,
) -> Result<Vec<String>> {
    cfg.validate()?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut resolved = Vec::new();
    for (lin, is_head) in model.linears_mut() {
        if cfg.targets.matches(&lin.path, is_head) {
            lin.attach_lora(&cfg.for_module(&lin.path, None), &mut rng)?;
            resolved.push(lin.path.clone());
        }
    }
    if let Targets::Names(_) = cfg.targets {
        for conv in model.convs_mut() {
            if cfg.targets.matches(&conv.path, false) {
                let k = conv.kernel_size();
                conv.attach_lora(&cfg.for_module(&conv.path, Some(k)), &mut rng)?;
                resolved.push(conv.path.clone());
            }
        }
    }
    if resolved.is_empty() {
        return Err(Error::Config(format!(
            "target modules {:?} match no linear layer of this model",
            cfg.targets
        )));
    }
    Ok(resolved)
}

/// The trainable tensors, in model order, keyed by PEFT name (A before B), then the
/// layers trained in full.
pub fn params<M: LoraModel + ?Sized>(model: &M) -> Vec<(String, Var)> {
    let mut out = Vec::new();
    for m in adapted(model) {
        out.push((peft_key(m.path, "A"), m.pair.a.clone()));
        out.push((peft_key(m.path, "B"), m.pair.b.clone()));
    }
    out.extend(model.full_params());
    out
}

/// One adapted module: its path, its pair, and whether its pair is a 1×1 convolution's
/// held 2-D (files store it 4-D; a [`Conv2d`]'s pair is held 4-D already).
pub struct Adapted<'a> {
    pub path: &'a str,
    pub pair: &'a LoraPair,
    pub conv1x1: bool,
}

/// The adapted modules in model order, linear layers then convolutions.
pub fn adapted<M: LoraModel + ?Sized>(model: &M) -> Vec<Adapted<'_>> {
    let linears = model.linears().into_iter().filter_map(|l| {
        l.lora.as_ref().map(|pair| Adapted {
            path: &l.path,
            pair,
            conv1x1: l.conv1x1,
        })
    });
    let convs = model.convs().into_iter().filter_map(|c| {
        c.lora.as_ref().map(|pair| Adapted {
            path: &c.path,
            pair,
            conv1x1: false,
        })
    });
    linears.chain(convs).collect()
}

/// A fresh pair for `cfg`: A `a_shape` (its rows the rank) ~ U(±1/√fan_in), PEFT's
/// kaiming-uniform with a = √5; B `b_shape` zeros.
pub(crate) fn fresh_pair(
    cfg: &LoraConfig,
    fan_in: usize,
    a_shape: impl Into<candle_core::Shape>,
    b_shape: impl Into<candle_core::Shape>,
    dev: &Device,
    rng: &mut ChaCha8Rng,
) -> Result<LoraPair> {
    let bound = 1.0 / (fan_in as f32).sqrt();
    let a: Vec<f32> = (0..cfg.r * fan_in)
        .map(|_| rng.random_range(-bound..bound))
        .collect();
    Ok(LoraPair {
        a: Var::from_tensor(&Tensor::from_vec(a, a_shape, dev)?)?,
        b: Var::from_tensor(&Tensor::zeros(b_shape, DType::F32, dev)?)?,
        scale: cfg.scale(),
        alpha: cfg.alpha,
        dropout: cfg.dropout,
    })
}

/// What `adapter_config.json` records (PEFT's keys).
#[derive(Debug, Clone)]
pub struct AdapterMeta {
    pub base_model_name_or_path: String,
    pub task_type: String,
    pub target_modules: serde_json::Value,
    /// PEFT's `modules_to_save` (empty: `null`).
    pub modules_to_save: Vec<String>,
}

fn peft_config_json(cfg: &LoraConfig, meta: &AdapterMeta) -> serde_json::Value {
    serde_json::json!({
        "alpha_pattern": cfg.alpha_pattern,
        "auto_mapping": null,
        "base_model_name_or_path": meta.base_model_name_or_path,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "layers_pattern": null,
        "layers_to_transform": null,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "modules_to_save": if meta.modules_to_save.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::json!(meta.modules_to_save)
        },
        "peft_type": "LORA",
        "r": cfg.r,
        "rank_pattern": cfg.rank_pattern,
        "revision": null,
        "target_modules": meta.target_modules,
        // PEFT records null for models without a task type (diffusers UNets) and refuses "".
        "task_type": if meta.task_type.is_empty() { serde_json::Value::Null } else { meta.task_type.clone().into() },
        "use_dora": false,
        "use_rslora": cfg.use_rslora,
    })
}

/// Writes `tensors` to `path` atomically (temp file + rename) with PEFT's `{"format": "pt"}`.
pub fn write_safetensors(path: &Path, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
    let cpu: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(k, t)| Ok((k.clone(), t.to_device(&Device::Cpu)?.contiguous()?)))
        .collect::<Result<_>>()?;
    let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    let tmp = path.with_extension("safetensors.tmp");
    safetensors::tensor::serialize_to_file(
        cpu.iter().map(|(k, t)| (k.as_str(), t)),
        Some(meta),
        &tmp,
    )
    .map_err(|e| Error::Adapter(format!("{}: {e}", tmp.display())))?;
    usual_permissions(&tmp).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
    Ok(())
}

/// Writes `path` through a temp file beside it and a rename, so that a reader sees the
/// whole file or none, with the mode any created file gets (as [`write_safetensors`]).
pub fn write_atomically(
    path: &Path,
    write: impl FnOnce(&mut std::io::BufWriter<std::fs::File>) -> Result<()>,
) -> Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    let written = (|| {
        let f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let mut w = std::io::BufWriter::new(f);
        write(&mut w)?;
        let f = w
            .into_inner()
            .map_err(|e| Error::io(&tmp, e.into_error()))?;
        f.sync_all().map_err(|e| Error::io(&tmp, e))?;
        usual_permissions(&tmp).map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Gives `path` the mode a file created here gets (0666 less the umask): safetensors
/// writes through a private temp file (0600), and an adapter or merged model is read by
/// other users and serving containers.
#[cfg(unix)]
fn usual_permissions(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    // The kernel applies the umask to a created file's mode: a probe file reads it.
    let probe = tempfile::Builder::new()
        .permissions(std::fs::Permissions::from_mode(0o666))
        .tempfile_in(dir)?;
    let mode = probe.as_file().metadata()?.permissions();
    std::fs::set_permissions(path, mode)
}

#[cfg(not(unix))]
fn usual_permissions(_path: &Path) -> std::io::Result<()> {
    Ok(())
}

/// Writes a PEFT adapter folder (`adapter_config.json` + `adapter_model.safetensors`).
pub fn save_adapter<M: LoraModel + ?Sized>(
    model: &M,
    cfg: &LoraConfig,
    meta: &AdapterMeta,
    dir: &Path,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let conv = conv1x1_keys(model);
    let tensors: BTreeMap<String, Tensor> = params(model)
        .into_iter()
        .map(|(k, v)| {
            let t = to_file_shape(v.as_tensor(), conv.contains(&k))?;
            Ok((k, t))
        })
        .collect::<Result<_>>()?;
    write_safetensors(&dir.join("adapter_model.safetensors"), &tensors)?;
    write_adapter_config(&with_patterns(model, cfg), meta, dir)
}

/// `cfg` with PEFT's patterns naming every adapted module whose rank or alpha is not
/// `r` / `alpha` (LoCon's convolutions, a kohya file's own ranks), by its whole path, so
/// that PEFT (and [`read_adapter_config`]) rebuilds each module as it is.
pub fn with_patterns<M: LoraModel + ?Sized>(model: &M, cfg: &LoraConfig) -> LoraConfig {
    let mut out = cfg.clone();
    out.conv_r = None;
    out.conv_alpha = None;
    out.rank_pattern.clear();
    out.alpha_pattern.clear();
    for m in adapted(model) {
        let r = m.pair.a.dim(0).unwrap_or(cfg.r);
        if r != cfg.r {
            out.rank_pattern.insert(m.path.to_string(), r);
        }
        if m.pair.alpha != cfg.alpha {
            out.alpha_pattern.insert(m.path.to_string(), m.pair.alpha);
        }
    }
    out
}

/// Writes `adapter_config.json` into `dir` atomically: shared by [`save_adapter`] and the
/// converters that produce PEFT folders without a model holding the adapter.
pub fn write_adapter_config(cfg: &LoraConfig, meta: &AdapterMeta, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let cfg_path = dir.join("adapter_config.json");
    let tmp = dir.join("adapter_config.json.tmp");
    let text = serde_json::to_string_pretty(&peft_config_json(cfg, meta))?;
    std::fs::write(&tmp, text).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, &cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
    Ok(())
}

/// Reads `adapter_config.json` into our config.
pub fn read_adapter_config(dir: &Path) -> Result<LoraConfig> {
    let p = dir.join("adapter_config.json");
    let v: serde_json::Value = crate::io::read_json(&p)?;
    if let Some(t) = v.get("peft_type").and_then(|x| x.as_str()) {
        if t != "LORA" {
            return Err(Error::Adapter(format!("peft_type {t} is not LORA")));
        }
    }
    if v.get("use_dora").and_then(|x| x.as_bool()).unwrap_or(false) {
        return Err(Error::Unsupported("DoRA adapters".into()));
    }
    let r = v
        .get("r")
        .and_then(|x| x.as_u64())
        .ok_or_else(|| Error::Adapter(format!("{}: no \"r\"", p.display())))? as usize;
    let alpha = v.get("lora_alpha").and_then(|x| x.as_f64()).unwrap_or(8.0);
    let targets = match v.get("target_modules") {
        Some(serde_json::Value::String(s)) => Targets::parse(s)?,
        Some(serde_json::Value::Array(a)) => Targets::Names(
            a.iter()
                .filter_map(|x| x.as_str().map(String::from))
                .collect(),
        ),
        _ => {
            return Err(Error::Adapter(format!(
                "{}: no \"target_modules\"",
                p.display()
            )))
        }
    };
    Ok(LoraConfig {
        r,
        alpha,
        dropout: v
            .get("lora_dropout")
            .and_then(|x| x.as_f64())
            .unwrap_or(0.0) as f32,
        targets,
        use_rslora: v
            .get("use_rslora")
            .and_then(|x| x.as_bool())
            .unwrap_or(false),
        conv_r: None,
        conv_alpha: None,
        rank_pattern: pattern(&v, "rank_pattern", &p, |x| {
            x.as_u64().filter(|&r| r > 0).map(|r| r as usize)
        })?,
        alpha_pattern: pattern(&v, "alpha_pattern", &p, |x| {
            x.as_f64().filter(|a| *a > 0.0 && a.is_finite())
        })?,
    })
}

/// `adapter_config.json`'s `rank_pattern` or `alpha_pattern` (absent or null: empty).
fn pattern<T>(
    v: &serde_json::Value,
    key: &str,
    p: &Path,
    value: impl Fn(&serde_json::Value) -> Option<T>,
) -> Result<BTreeMap<String, T>> {
    match v.get(key) {
        None | Some(serde_json::Value::Null) => Ok(BTreeMap::new()),
        Some(serde_json::Value::Object(m)) => m
            .iter()
            .map(|(k, x)| {
                value(x)
                    .map(|x| (k.clone(), x))
                    .ok_or_else(|| Error::Adapter(format!("{}: {key}[{k:?}] is {x}", p.display())))
            })
            .collect(),
        Some(other) => Err(Error::Adapter(format!(
            "{}: {key} is {other}, an object expected",
            p.display()
        ))),
    }
}

/// Loads a PEFT adapter's weights into a model that has adapters attached with the
/// same config. Every file key must match a module and every module must be filled.
pub fn load_adapter_weights<M: LoraModel + ?Sized>(model: &M, dir: &Path) -> Result<()> {
    let p = dir.join("adapter_model.safetensors");
    let dev = match (model.linears().first(), model.convs().first()) {
        (Some(l), _) => l.weight.device(),
        (None, Some(c)) => c.weight.device().clone(),
        (None, None) => Device::Cpu,
    };
    let file = candle_core::safetensors::load(&p, &dev)
        .map_err(|e| Error::Adapter(format!("{}: {e}", p.display())))?;
    // PEFT writes keys without the adapter name; tolerate `.default.` as older tools write it.
    let file: HashMap<String, Tensor> = file
        .into_iter()
        .map(|(k, v)| {
            (
                k.replace(".lora_A.default.", ".lora_A.")
                    .replace(".lora_B.default.", ".lora_B.")
                    .replace(".modules_to_save.default.", "."),
                v,
            )
        })
        .collect();
    let mut used = 0usize;
    for (key, var) in params(model) {
        let t = file
            .get(&key)
            .ok_or_else(|| Error::Adapter(format!("{}: missing tensor {key}", p.display())))?;
        let Some(t) = from_file_shape(t, var.dims())? else {
            return Err(Error::Adapter(format!(
                "{key}: shape {:?} in the file, {:?} expected",
                t.dims(),
                var.dims()
            )));
        };
        var.set(&t.to_dtype(DType::F32)?)?;
        used += 1;
    }
    if used != file.len() {
        let known: std::collections::HashSet<String> =
            params(model).into_iter().map(|(k, _)| k).collect();
        let extra: Vec<&String> = file
            .keys()
            .filter(|k| !known.contains(*k))
            .take(5)
            .collect();
        return Err(Error::Adapter(format!(
            "{}: tensors that match no adapted module: {extra:?}",
            p.display()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod file_mode_tests {
    use super::*;

    /// A writer that fails partway leaves neither the file nor its temp file; one that
    /// succeeds replaces the old file whole.
    #[test]
    fn write_atomically_leaves_nothing_half_written() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.bin");
        let e = write_atomically(&path, |w| {
            w.write_all(b"half")
                .map_err(|e| Error::io(Path::new("x"), e))?;
            Err(Error::Adapter("failed partway".into()))
        })
        .unwrap_err();
        assert!(e.to_string().contains("failed partway"));
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert!(left.is_empty(), "{left:?}");
        write_atomically(&path, |w| {
            w.write_all(b"whole").map_err(|e| Error::io(&path, e))
        })
        .unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"whole");
    }

    /// safetensors writes through a 0600 temp file; an adapter gets what any created file
    /// gets here (0644 under the usual umask) so that other users can read it.
    #[cfg(unix)]
    #[test]
    fn safetensors_files_get_the_mode_created_files_get() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.safetensors");
        let t = Tensor::zeros(3, candle_core::DType::F32, &Device::Cpu).unwrap();
        write_safetensors(&path, &[("x".to_string(), t)].into()).unwrap();
        let plain = dir.path().join("plain");
        std::fs::File::create(&plain).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), mode(&plain));
    }
}

#[cfg(test)]
mod pattern_tests {
    use super::*;

    /// PEFT's rule: a key names a path that is it or ends with `.key`, `^key` the whole
    /// path only; the longest matching key wins. LoCon's rank and alpha go to kernels
    /// wider than 1×1, and a pattern overrides them.
    #[test]
    fn module_ranks_follow_peft_patterns_and_locon() {
        let cfg = LoraConfig {
            r: 4,
            alpha: 8.0,
            conv_r: Some(2),
            rank_pattern: [
                ("conv1".to_string(), 3),
                ("resnets.0.conv1".to_string(), 5),
                ("^up.conv".to_string(), 6),
            ]
            .into(),
            alpha_pattern: [("to_q".to_string(), 1.5)].into(),
            ..LoraConfig::default()
        };
        let ra = |p: &str, k: Option<usize>| {
            let c = cfg.for_module(p, k);
            (c.r, c.alpha)
        };
        assert_eq!(ra("a.to_q", None), (4, 1.5));
        assert_eq!(ra("a.xto_q", None), (4, 8.0));
        assert_eq!(
            ra("down.conv2", Some(3)),
            (2, 2.0),
            "LoCon: conv_alpha defaults to conv_r"
        );
        assert_eq!(
            ra("down.conv_shortcut", Some(1)),
            (4, 8.0),
            "a 1x1 kernel keeps r"
        );
        assert_eq!(ra("b.resnets.1.conv1", Some(3)), (3, 2.0));
        assert_eq!(
            ra("b.resnets.0.conv1", Some(3)),
            (5, 2.0),
            "the longest key wins"
        );
        assert_eq!(ra("up.conv", Some(3)), (6, 2.0));
        assert_eq!(
            ra("x.up.conv", Some(3)),
            (2, 2.0),
            "^ asks for the whole path"
        );
        let bad = LoraConfig {
            rank_pattern: [("c".to_string(), 0)].into(),
            ..LoraConfig::default()
        };
        assert!(bad.validate().is_err());
    }
}
