//! kohya-format LoRA files (`networks.lora` from kohya-ss/sd-scripts), and conversion
//! to and from PEFT adapter folders.
//!
//! kohya's layout is what A1111, ComfyUI, Forge, InvokeAI and SD.Next load, so it is the
//! format a Stable Diffusion LoRA is handed to users in; PEFT's is what diffusers and our
//! own adapter code read. Per adapted module a kohya file holds
//! `<name>.lora_down.weight` (PEFT's A, `[r, in]`), `<name>.lora_up.weight` (B,
//! `[out, r]`) and `<name>.alpha` (a 0-dim tensor; the layer computes
//! `up(down(x)) · alpha / r`), where `<name>` is a prefix plus the module path with
//! every `.` turned into `_`. The metadata carries kohya's `ss_*` training record, the
//! `sshs_*` hashes the UIs show, and Stability's `modelspec.*` keys.
//!
//! Because `_` also occurs inside module names (`down_blocks`, `to_q`, `proj_in`), a
//! kohya name cannot be split back into a path. Reading therefore resolves every name
//! against the module list of the model it is meant for, as ComfyUI and A1111 do, and
//! anything that resolves to nothing is an error naming the key rather than an adapter
//! that is silently half-applied.
//!
//! The SD 1.x/2.x UNet's linear layers and its convolutions (LoCon: `lora_down`
//! `[r, in, k, k]`, `lora_up` `[out, r, 1, 1]`, the layout kohya's `conv_dim` writes)
//! are covered. SDXL (kohya names its UNet modules after SGM's
//! `input_blocks`/`output_blocks`) would be a further [`KohyaNaming`] variant; the text
//! encoders (`lora_te_`, `lora_te1_`, `lora_te2_`) are refused as unsupported.

use crate::lora::hotswap::{self as adapters, AdapterWeights};
use crate::lora::{self, AdapterMeta, LoraConfig, LoraModel, LoraPair, Targets};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor, Var};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

const DOWN: &str = "lora_down.weight";
const UP: &str = "lora_up.weight";
const ALPHA: &str = "alpha";

/// How module paths become kohya names, per model family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KohyaNaming {
    /// The SD 1.x/2.x UNet: `lora_unet_` + the diffusers module path with `.` → `_`,
    /// e.g. `lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q`.
    SdUnet,
}

impl KohyaNaming {
    /// The name prefix, without the joining `_`.
    pub fn prefix(self) -> &'static str {
        match self {
            KohyaNaming::SdUnet => "lora_unet",
        }
    }

    /// The kohya name (the part of a key before the first `.`) of a module path.
    pub fn name(self, module_path: &str) -> String {
        format!("{}_{}", self.prefix(), module_path.replace('.', "_"))
    }

    /// kohya name → module path for every given path. Two paths that flatten to the same
    /// name would make the file ambiguous, so that is an error rather than a guess.
    pub fn resolver<'a>(
        self,
        module_paths: impl IntoIterator<Item = &'a str>,
    ) -> Result<HashMap<String, String>> {
        let mut map = HashMap::new();
        for p in module_paths {
            if let Some(prev) = map.insert(self.name(p), p.to_string()) {
                return Err(Error::Model(format!(
                    "modules {prev} and {p} share the kohya name {}",
                    self.name(p)
                )));
            }
        }
        Ok(map)
    }
}

/// One module's adapter as a kohya file stores it, in the file's dtype.
#[derive(Debug, Clone)]
pub struct KohyaModule {
    /// `lora_down.weight` = PEFT's `lora_A`: `[r, in]` for a linear layer (and a 1×1
    /// convolution held as one), `[r, in, k, k]` for a convolution.
    pub down: Tensor,
    /// `lora_up.weight` = PEFT's `lora_B`: `[out, r]`, or `[out, r, 1, 1]` for a
    /// convolution.
    pub up: Tensor,
    /// `alpha`; the effective scale is `alpha / r`.
    pub alpha: f64,
}

impl KohyaModule {
    pub fn rank(&self) -> usize {
        self.down.dims().first().copied().unwrap_or(0)
    }

    pub fn scale(&self) -> f64 {
        self.alpha / self.rank() as f64
    }
}

/// A kohya file read against a model: adapters by module path, and the metadata.
#[derive(Debug, Clone)]
pub struct KohyaFile {
    pub modules: BTreeMap<String, KohyaModule>,
    pub metadata: HashMap<String, String>,
}

/// Which base model the LoRA was trained on; decides `ss_v2`, `ss_base_model_version`
/// and the `modelspec` architecture and prediction type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BaseModel {
    #[default]
    Sd1,
    /// SD 2.x, 512 px, epsilon prediction.
    Sd2,
    /// SD 2.x, 768 px, v-prediction.
    Sd2V,
}

impl BaseModel {
    fn ss_version(self) -> &'static str {
        match self {
            BaseModel::Sd1 => "sd_v1",
            BaseModel::Sd2 => "sd_v2",
            BaseModel::Sd2V => "sd_v2_v",
        }
    }

    fn architecture(self) -> &'static str {
        match self {
            BaseModel::Sd1 => "stable-diffusion-v1/lora",
            BaseModel::Sd2 => "stable-diffusion-v2-512/lora",
            BaseModel::Sd2V => "stable-diffusion-v2-768-v/lora",
        }
    }

    fn prediction_type(self) -> &'static str {
        match self {
            BaseModel::Sd2V => "v",
            _ => "epsilon",
        }
    }
}

/// What the caller knows about the training run. `None` fields are left out of the
/// file: the UIs show what is there, and a made-up value would be worse than none.
/// Rank and alpha are not here: they are read off the adapters themselves.
#[derive(Debug, Clone, Default)]
pub struct KohyaMeta {
    pub base: BaseModel,
    /// `ss_output_name`: the alias A1111 lists the LoRA under.
    pub output_name: Option<String>,
    /// `modelspec.title`; defaults to the output name, then to the file stem (kohya's rule).
    pub title: Option<String>,
    /// `ss_sd_model_name`: the base checkpoint's name.
    pub sd_model_name: Option<String>,
    /// Unix times in seconds.
    pub training_started_at: Option<f64>,
    pub training_finished_at: Option<f64>,
    pub learning_rate: Option<f64>,
    pub unet_lr: Option<f64>,
    pub lr_scheduler: Option<String>,
    pub optimizer: Option<String>,
    pub max_train_steps: Option<u64>,
    /// Steps and epochs actually run.
    pub steps: Option<u64>,
    pub epoch: Option<u64>,
    pub num_epochs: Option<u64>,
    /// Images × repeats, as kohya counts them.
    pub num_train_images: Option<u64>,
    pub batch_size: Option<u64>,
    /// `(width, height)`.
    pub resolution: Option<(u32, u32)>,
    pub seed: Option<u64>,
    pub noise_offset: Option<f64>,
    pub min_snr_gamma: Option<f64>,
    pub mixed_precision: Option<String>,
    pub cache_latents: Option<bool>,
    /// `{dir: {tag: count}}`.
    pub tag_frequency: Option<serde_json::Value>,
    /// `{dir: {"n_repeats": n, "img_count": n}}`.
    pub dataset_dirs: Option<serde_json::Value>,
    pub training_comment: Option<String>,
    /// Further `ss_*` (or other) keys, written as given; the keys derived above win.
    pub extra: BTreeMap<String, String>,
}

/// The value of a one-element tensor.
fn scalar(t: &Tensor) -> Result<f64> {
    let v = t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    match v.as_slice() {
        [x] => Ok(*x),
        _ => Err(Error::Adapter(format!(
            "a scalar expected, shape {:?} found",
            t.dims()
        ))),
    }
}

/// Splits a key at its first `.` into the kohya name and the part (`lora_down.weight`,
/// `lora_up.weight`, `alpha`), as A1111 does.
fn split_key(key: &str) -> Result<(&str, &str)> {
    key.split_once('.')
        .ok_or_else(|| Error::Adapter(format!("{key}: not a kohya LoRA key (no `.`)")))
}

/// Resolves a kohya file's tensors against `model`'s LoRA-capable modules. Every key
/// must belong to a module of the model, every module needs both `lora_down` and
/// `lora_up` of matching shapes; a missing (or zero) `alpha` means `alpha = r`, kohya's
/// rule.
pub fn modules_from_tensors<M: LoraModel + ?Sized>(
    tensors: &HashMap<String, Tensor>,
    model: &M,
    naming: KohyaNaming,
) -> Result<BTreeMap<String, KohyaModule>> {
    let linears = model.linears();
    let convs = model.convs();
    let names = naming.resolver(
        linears
            .iter()
            .map(|l| l.path.as_str())
            .chain(convs.iter().map(|c| c.path.as_str())),
    )?;
    let dims: HashMap<&str, (usize, usize)> = linears
        .iter()
        .map(|l| (l.path.as_str(), (l.out_features(), l.in_features())))
        .collect();
    let kernels: HashMap<&str, (usize, usize, usize)> = convs
        .iter()
        .map(|c| {
            let shape = (c.out_channels(), c.in_channels(), c.kernel_size());
            (c.path.as_str(), shape)
        })
        .collect();
    // Sorted so that, of several bad keys, the same one is always reported.
    let mut keys: Vec<&String> = tensors.keys().collect();
    keys.sort();
    type Parts<'a> = (Option<&'a Tensor>, Option<&'a Tensor>, Option<&'a Tensor>);
    let mut parts: BTreeMap<&str, (&str, Parts)> = BTreeMap::new();
    for key in keys {
        let (name, part) = split_key(key)?;
        if name.starts_with("lora_te") {
            return Err(Error::Unsupported(format!(
                "{key}: text-encoder LoRA; only the UNet's adapters can be loaded"
            )));
        }
        let path = names.get(name).ok_or_else(|| {
            Error::Adapter(format!(
                "{key}: matches no LoRA-capable module of this model ({} names)",
                naming.prefix()
            ))
        })?;
        let entry = parts
            .entry(path.as_str())
            .or_insert((name, (None, None, None)));
        let t = tensors
            .get(key.as_str())
            .ok_or_else(|| Error::Adapter(format!("{key}: vanished")))?;
        match part {
            DOWN => entry.1 .0 = Some(t),
            UP => entry.1 .1 = Some(t),
            ALPHA => entry.1 .2 = Some(t),
            _ => {
                return Err(Error::Unsupported(format!(
                    "{key}: `{part}` is not plain LoRA (LyCORIS/DoRA parts are not supported)"
                )))
            }
        }
    }
    let mut out = BTreeMap::new();
    for (path, (name, (down, up, alpha))) in parts {
        let down =
            down.ok_or_else(|| Error::Adapter(format!("{name}.{DOWN}: missing from the file")))?;
        let up = up.ok_or_else(|| Error::Adapter(format!("{name}.{UP}: missing from the file")))?;
        let r = down.dims().first().copied().unwrap_or(0);
        let (down, up) = if let Some(&(o, i, k)) = kernels.get(path) {
            // A convolution's pair stays 4-D, as the layer and PEFT hold it.
            if r == 0 || down.dims() != [r, i, k, k] {
                return Err(Error::Adapter(format!(
                    "{name}.{DOWN}: shape {:?}, [r, {i}, {k}, {k}] expected for {path}",
                    down.dims()
                )));
            }
            if up.dims() != [o, r, 1, 1] {
                return Err(Error::Adapter(format!(
                    "{name}.{UP}: shape {:?}, [{o}, {r}, 1, 1] expected for {path}",
                    up.dims()
                )));
            }
            (down.clone(), up.clone())
        } else {
            let &(o, i) = dims
                .get(path)
                .ok_or_else(|| Error::Adapter(format!("{name}: no module {path}")))?;
            // A 1×1 convolution's pair (SD 1.x proj_in/proj_out) is a linear one in 4-D.
            let flat = |t: &Tensor| -> Result<Tensor> {
                let d = t.dims();
                Ok(if d.len() == 4 && d[2] == 1 && d[3] == 1 {
                    t.reshape((d[0], d[1]))?
                } else {
                    t.clone()
                })
            };
            if down.rank() == 4 && !(down.dims()[2] == 1 && down.dims()[3] == 1) {
                return Err(Error::Adapter(format!(
                    "{name}.{DOWN}: a {}x{} conv LoRA (shape {:?}) for {path}, a linear layer",
                    down.dims()[2],
                    down.dims()[3],
                    down.dims()
                )));
            }
            let (down, up) = (flat(down)?, flat(up)?);
            if down.rank() != 2 || r == 0 || down.dims()[1] != i {
                return Err(Error::Adapter(format!(
                    "{name}.{DOWN}: shape {:?}, [r, {i}] expected for {path}",
                    down.dims()
                )));
            }
            if up.dims() != [o, r] {
                return Err(Error::Adapter(format!(
                    "{name}.{UP}: shape {:?}, [{o}, {r}] expected for {path}",
                    up.dims()
                )));
            }
            (down, up)
        };
        let alpha = module_alpha(name, alpha, r)?;
        out.insert(path.to_string(), KohyaModule { down, up, alpha });
    }
    if out.is_empty() {
        return Err(Error::Adapter("the file holds no LoRA tensors".into()));
    }
    Ok(out)
}

/// A module's `alpha` tensor as a number: missing or zero means `r`, kohya's rule.
fn module_alpha(name: &str, alpha: Option<&Tensor>, r: usize) -> Result<f64> {
    let Some(t) = alpha else {
        return Ok(r as f64);
    };
    if t.elem_count() != 1 {
        return Err(Error::Adapter(format!(
            "{name}.{ALPHA}: shape {:?}, a scalar expected",
            t.dims()
        )));
    }
    let a = scalar(t)?;
    if !a.is_finite() || a < 0.0 {
        return Err(Error::Adapter(format!("{name}.{ALPHA}: {a}")));
    }
    Ok(if a == 0.0 { r as f64 } else { a })
}

/// Reads a kohya `.safetensors` file and resolves it against `model` (see
/// [`modules_from_tensors`]). Tensors keep the file's dtype.
pub fn read_kohya<M: LoraModel + ?Sized>(
    path: &Path,
    model: &M,
    naming: KohyaNaming,
) -> Result<KohyaFile> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bad = |e: &dyn std::fmt::Display| Error::Adapter(format!("{}: {e}", path.display()));
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| bad(&e))?;
    let metadata = header.metadata().clone().unwrap_or_default();
    let tensors =
        candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).map_err(|e| bad(&e))?;
    let modules = modules_from_tensors(&tensors, model, naming)?;
    Ok(KohyaFile { modules, metadata })
}

/// Makes `model` run with exactly these adapters (scale `alpha / r`, no dropout): modules
/// not in `modules` lose any adapter they had. Nothing changes unless every module exists
/// with matching shapes.
pub fn attach_kohya<M: LoraModel + ?Sized>(
    model: &mut M,
    modules: &BTreeMap<String, KohyaModule>,
) -> Result<()> {
    let mut pairs = HashMap::new();
    {
        // Each module's A and B shapes for rank r, and what to call it in an error.
        type Fit = (
            Box<dyn Fn(usize) -> (Vec<usize>, Vec<usize>)>,
            String,
            Device,
        );
        let mut fits: HashMap<&str, Fit> = HashMap::new();
        for lin in model.linears() {
            let (o, i) = (lin.out_features(), lin.in_features());
            let shapes = Box::new(move |r| (vec![r, i], vec![o, r]));
            fits.insert(
                &lin.path,
                (shapes, format!("a {o}x{i} linear"), lin.weight.device()),
            );
        }
        for conv in model.convs() {
            let (o, i, k) = (conv.out_channels(), conv.in_channels(), conv.kernel_size());
            let shapes = Box::new(move |r| (vec![r, i, k, k], vec![o, r, 1, 1]));
            let what = format!("a {:?} convolution", conv.weight.dims());
            fits.insert(&conv.path, (shapes, what, conv.weight.device().clone()));
        }
        for (path, m) in modules {
            let (shapes, what, dev) = fits.get(path.as_str()).ok_or_else(|| {
                Error::Adapter(format!("{path}: no LoRA-capable module of that path"))
            })?;
            let (down, up) = shapes(m.rank());
            if m.down.dims() != down || m.up.dims() != up {
                return Err(Error::Adapter(format!(
                    "{path}: adapter shapes {:?} / {:?} do not fit {what}",
                    m.down.dims(),
                    m.up.dims(),
                )));
            }
            // Trainable state is f32 whatever the file's dtype, like every other adapter.
            let var = |t: &Tensor| -> Result<Var> {
                Ok(Var::from_tensor(&t.to_dtype(DType::F32)?.to_device(dev)?)?)
            };
            pairs.insert(
                path.clone(),
                LoraPair {
                    a: var(&m.down)?,
                    b: var(&m.up)?,
                    scale: m.scale(),
                    alpha: m.alpha,
                    dropout: 0.0,
                },
            );
        }
    }
    for (lin, _) in model.linears_mut() {
        lin.lora = pairs.remove(&lin.path);
    }
    for conv in model.convs_mut() {
        conv.lora = pairs.remove(&conv.path);
    }
    Ok(())
}

/// [`read_kohya`] then [`attach_kohya`]: the model runs with the file's adapters.
pub fn load_kohya<M: LoraModel + ?Sized>(
    model: &mut M,
    path: &Path,
    naming: KohyaNaming,
) -> Result<KohyaFile> {
    let file = read_kohya(path, model, naming)?;
    attach_kohya(model, &file.modules)?;
    Ok(file)
}

/// The kohya tensors of `model`'s attached adapters, cast to `dtype` (alpha included, as
/// kohya casts it). alpha is `scale · r`, which is kohya's alpha for plain LoRA and the
/// equivalent one for rsLoRA (kohya has no rsLoRA: `alpha_k / r` must equal the scale).
pub fn kohya_tensors<M: LoraModel + ?Sized>(
    model: &M,
    naming: KohyaNaming,
    dtype: DType,
) -> Result<BTreeMap<String, Tensor>> {
    let mut out = BTreeMap::new();
    let cpu = |t: &Tensor| -> Result<Tensor> { Ok(t.to_dtype(dtype)?.to_device(&Device::Cpu)?) };
    // Each pair in the shape the file holds: 2-D for a linear layer, 4-D for a
    // convolution (LoCon's `[r, in, k, k]` / `[out, r, 1, 1]`, or a 1×1 one held 2-D).
    for m in lora::adapted(model) {
        let name = naming.name(m.path);
        let a = m.pair.a.as_tensor();
        let alpha = m.pair.scale * a.dim(0)? as f64;
        out.insert(
            format!("{name}.{DOWN}"),
            cpu(&lora::to_file_shape(a, m.conv1x1)?)?,
        );
        out.insert(
            format!("{name}.{UP}"),
            cpu(&lora::to_file_shape(m.pair.b.as_tensor(), m.conv1x1)?)?,
        );
        out.insert(
            format!("{name}.{ALPHA}"),
            Tensor::new(alpha as f32, &Device::Cpu)?.to_dtype(dtype)?,
        );
    }
    if out.is_empty() {
        return Err(Error::Adapter(
            "the model has no LoRA adapters to export".into(),
        ));
    }
    Ok(out)
}

fn serialize(
    tensors: &BTreeMap<String, Tensor>,
    metadata: HashMap<String, String>,
) -> Result<Vec<u8>> {
    let cpu: Vec<(&str, Tensor)> = tensors
        .iter()
        .map(|(k, t)| Ok((k.as_str(), t.to_device(&Device::Cpu)?.contiguous()?)))
        .collect::<Result<_>>()?;
    safetensors::tensor::serialize(cpu.iter().map(|(k, t)| (*k, t)), Some(metadata))
        .map_err(|e| Error::Adapter(format!("serialising the kohya file: {e}")))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `(sshs_model_hash, sshs_legacy_hash)` as kohya's `precalculate_safetensors_hashes`
/// computes them: the file is serialised with only the `ss_*` metadata, the model hash is
/// the sha256 of everything after the header, the legacy hash the first 8 hex digits of
/// the sha256 of bytes 0x100000..0x110000 (of nothing, for files under 1 MiB).
pub fn kohya_hashes(
    tensors: &BTreeMap<String, Tensor>,
    metadata: &HashMap<String, String>,
) -> Result<(String, String)> {
    let ss: HashMap<String, String> = metadata
        .iter()
        .filter(|(k, _)| k.starts_with("ss_"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let bytes = serialize(tensors, ss)?;
    let header_len = bytes
        .get(..8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_le_bytes)
        .ok_or_else(|| Error::Adapter("serialised kohya file has no header".into()))?;
    let start = (8 + header_len as usize).min(bytes.len());
    let model = hex(&Sha256::digest(&bytes[start..]));
    let legacy = &bytes[0x100000.min(bytes.len())..0x110000.min(bytes.len())];
    let legacy = hex(&Sha256::digest(legacy))[..8].to_string();
    Ok((model, legacy))
}

/// A float as Python's `str()` writes it (`2.0`, `0.0001`, `1e-05`), since kohya's
/// metadata values are `str()` of Python floats and readers compare them as strings.
pub fn py_float(x: f64) -> String {
    if x.is_nan() {
        return "nan".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "inf" } else { "-inf" }.into();
    }
    let sci = format!("{x:e}");
    let (mant, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if x != 0.0 && !(-4..16).contains(&exp) {
        let sign = if exp < 0 { '-' } else { '+' };
        return format!("{mant}e{sign}{:02}", exp.abs());
    }
    let s = format!("{x}");
    if s.contains('.') {
        s
    } else {
        format!("{s}.0")
    }
}

/// JSON as Python's `json.dumps` writes it (`", "` and `": "` separators, non-ASCII
/// escaped), the form kohya's JSON-valued metadata has.
fn py_json(v: &serde_json::Value) -> String {
    use serde_json::Value;
    match v {
        Value::Object(m) => {
            let items: Vec<String> = m
                .iter()
                .map(|(k, v)| format!("{}: {}", py_json(&Value::String(k.clone())), py_json(v)))
                .collect();
            format!("{{{}}}", items.join(", "))
        }
        Value::Array(a) => {
            let items: Vec<String> = a.iter().map(py_json).collect();
            format!("[{}]", items.join(", "))
        }
        Value::String(_) => {
            let mut out = String::new();
            for c in v.to_string().chars() {
                if c.is_ascii() {
                    out.push(c);
                } else {
                    let mut buf = [0u16; 2];
                    for u in c.encode_utf16(&mut buf) {
                        out.push_str(&format!("\\u{u:04x}"));
                    }
                }
            }
            out
        }
        Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() => py_float(f),
            _ => n.to_string(),
        },
        other => other.to_string(),
    }
}

/// A naive ISO-8601 UTC time (`2026-01-01T00:01:00`, microseconds only when non-zero),
/// as Python's `datetime.isoformat()` writes it.
fn iso_utc(t: f64) -> String {
    let mut secs = t.floor() as i64;
    let mut micros = ((t - secs as f64) * 1e6).round() as i64;
    if micros >= 1_000_000 {
        secs += 1;
        micros -= 1_000_000;
    }
    let (days, sod) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's days → civil date.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let mut s = format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60
    );
    if micros != 0 {
        s.push_str(&format!(".{micros:06}"));
    }
    s
}

/// The `ss_*` and `modelspec.*` metadata for these tensors (the hashes are added on
/// writing). `ss_network_dim`/`ss_network_alpha` come from the tensors: one value, or
/// kohya's `Dynamic` when modules differ.
pub fn kohya_metadata(
    tensors: &BTreeMap<String, Tensor>,
    meta: &KohyaMeta,
    default_title: &str,
) -> Result<HashMap<String, String>> {
    // kohya records the linear layers' (and 1×1 convolutions') rank and alpha as the
    // network's, and LoCon's 3×3 ones as `conv_dim` / `conv_alpha` among its arguments.
    let mut ranks = BTreeSet::new();
    let mut alphas: BTreeMap<u64, f64> = BTreeMap::new();
    let mut conv_ranks = BTreeSet::new();
    let mut conv_alphas: BTreeMap<u64, f64> = BTreeMap::new();
    let is_conv = |name: &str| {
        tensors
            .get(&format!("{name}.{DOWN}"))
            .is_some_and(|d| d.rank() == 4 && d.dims()[2] * d.dims()[3] > 1)
    };
    for (k, t) in tensors {
        if let Some(name) = k.strip_suffix(&format!(".{DOWN}")) {
            if is_conv(name) {
                conv_ranks.insert(t.dim(0)?);
            } else {
                ranks.insert(t.dim(0)?);
            }
        } else if let Some(name) = k.strip_suffix(&format!(".{ALPHA}")) {
            let a = scalar(t)?;
            if is_conv(name) {
                conv_alphas.insert(a.to_bits(), a);
            } else {
                alphas.insert(a.to_bits(), a);
            }
        }
    }
    // Convolutions alone: their rank and alpha are the network's too.
    if ranks.is_empty() {
        ranks.clone_from(&conv_ranks);
        alphas.clone_from(&conv_alphas);
    }
    let mut m: HashMap<String, String> = meta.extra.clone().into_iter().collect();
    let mut set = |k: &str, v: String| {
        m.insert(k.to_string(), v);
    };
    set("ss_network_module", "networks.lora".into());
    set(
        "ss_network_dim",
        match ranks.len() {
            1 => ranks.iter().map(|r| r.to_string()).collect(),
            _ => "Dynamic".into(),
        },
    );
    set(
        "ss_network_alpha",
        match alphas.len() {
            1 => alphas.values().map(|a| py_float(*a)).collect(),
            _ => "Dynamic".into(),
        },
    );
    if !conv_ranks.is_empty() {
        // The command line's strings, as kohya records them: `--network_args conv_dim=2`.
        let one = |v: Vec<String>| match v.len() {
            1 => v.into_iter().next().unwrap_or_default(),
            _ => "Dynamic".to_string(),
        };
        let args = serde_json::json!({
            "conv_dim": one(conv_ranks.iter().map(|r| r.to_string()).collect()),
            "conv_alpha": one(conv_alphas.values().map(|a| py_float(*a)).collect()),
        });
        set("ss_network_args", py_json(&args));
    }
    let py_bool = |b: bool| if b { "True" } else { "False" }.to_string();
    set("ss_v2", py_bool(meta.base != BaseModel::Sd1));
    set("ss_base_model_version", meta.base.ss_version().into());
    let opt_s = [
        ("ss_output_name", &meta.output_name),
        ("ss_sd_model_name", &meta.sd_model_name),
        ("ss_lr_scheduler", &meta.lr_scheduler),
        ("ss_optimizer", &meta.optimizer),
        ("ss_mixed_precision", &meta.mixed_precision),
        ("ss_training_comment", &meta.training_comment),
    ];
    for (k, v) in opt_s {
        if let Some(v) = v {
            set(k, v.clone());
        }
    }
    let opt_f = [
        ("ss_training_started_at", meta.training_started_at),
        ("ss_training_finished_at", meta.training_finished_at),
        ("ss_learning_rate", meta.learning_rate),
        ("ss_unet_lr", meta.unet_lr),
        ("ss_noise_offset", meta.noise_offset),
        ("ss_min_snr_gamma", meta.min_snr_gamma),
    ];
    for (k, v) in opt_f {
        if let Some(v) = v {
            set(k, py_float(v));
        }
    }
    let opt_u = [
        ("ss_max_train_steps", meta.max_train_steps),
        ("ss_steps", meta.steps),
        ("ss_epoch", meta.epoch),
        ("ss_num_epochs", meta.num_epochs),
        ("ss_num_train_images", meta.num_train_images),
        ("ss_batch_size_per_device", meta.batch_size),
        ("ss_seed", meta.seed),
    ];
    for (k, v) in opt_u {
        if let Some(v) = v {
            set(k, v.to_string());
        }
    }
    if let Some(b) = meta.cache_latents {
        set("ss_cache_latents", py_bool(b));
    }
    if let Some((w, h)) = meta.resolution {
        set("ss_resolution", format!("({w}, {h})"));
        set("modelspec.resolution", format!("{w}x{h}"));
    }
    if let Some(v) = &meta.tag_frequency {
        set("ss_tag_frequency", py_json(v));
    }
    if let Some(v) = &meta.dataset_dirs {
        set("ss_dataset_dirs", py_json(v));
    }
    set("modelspec.sai_model_spec", "1.0.0".into());
    set("modelspec.architecture", meta.base.architecture().into());
    set("modelspec.implementation", "diffusers".into());
    set(
        "modelspec.prediction_type",
        meta.base.prediction_type().into(),
    );
    let title = meta
        .title
        .clone()
        .or_else(|| meta.output_name.clone())
        .unwrap_or_else(|| default_title.to_string());
    set("modelspec.title", title);
    if let Some(t) = meta.training_finished_at {
        set("modelspec.date", iso_utc(t));
    }
    Ok(m)
}

/// Writes `tensors` with `metadata` plus the `sshs_*` hashes to `path`, atomically (a
/// temp file renamed over it), and returns the metadata written.
pub fn write_kohya_tensors(
    tensors: &BTreeMap<String, Tensor>,
    mut metadata: HashMap<String, String>,
    path: &Path,
) -> Result<HashMap<String, String>> {
    let (model_hash, legacy_hash) = kohya_hashes(tensors, &metadata)?;
    metadata.insert("sshs_model_hash".into(), model_hash);
    metadata.insert("sshs_legacy_hash".into(), legacy_hash);
    let bytes = serialize(tensors, metadata.clone())?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    std::fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
    Ok(metadata)
}

/// Exports `model`'s attached adapters as a kohya file at `path` (tensors in `dtype`;
/// kohya saves fp16 by default, f32 keeps the trained values exactly). Returns the
/// metadata written.
pub fn write_kohya<M: LoraModel + ?Sized>(
    model: &M,
    naming: KohyaNaming,
    meta: &KohyaMeta,
    dtype: DType,
    path: &Path,
) -> Result<HashMap<String, String>> {
    let tensors = kohya_tensors(model, naming, dtype)?;
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let metadata = kohya_metadata(&tensors, meta, &stem)?;
    write_kohya_tensors(&tensors, metadata, path)
}

/// PEFT `target_modules` for these paths: the short names (`to_q`, `to_out.0`) when they
/// select exactly these modules of the model, else the full paths, so that PEFT never
/// adapts a module the kohya file did not.
fn peft_targets<M: LoraModel + ?Sized>(model: &M, paths: &BTreeSet<&str>) -> Vec<String> {
    let short = |p: &str| -> String {
        let mut it = p.rsplitn(3, '.');
        let last = it.next().unwrap_or(p);
        match it.next() {
            Some(prev) if last.chars().all(|c| c.is_ascii_digit()) => format!("{prev}.{last}"),
            _ => last.to_string(),
        }
    };
    let leaves: BTreeSet<String> = paths.iter().map(|p| short(p)).collect();
    let targets = Targets::Names(leaves.iter().cloned().collect());
    let selected: BTreeSet<&str> = model
        .linears()
        .into_iter()
        .map(|l| l.path.as_str())
        .chain(model.convs().into_iter().map(|c| c.path.as_str()))
        .filter(|p| targets.matches(p, false))
        .collect();
    if &selected == paths {
        leaves.into_iter().collect()
    } else {
        paths.iter().map(|p| p.to_string()).collect()
    }
}

/// Converts a kohya file into a PEFT adapter folder (`adapter_model.safetensors` with
/// `base_model.model.<path>.lora_A/B.weight`, and `adapter_config.json`), tensors
/// unchanged. `model` only resolves the names. Per-module ranks and alphas (LoCon's) go
/// into PEFT's `rank_pattern` / `alpha_pattern` by whole path.
pub fn kohya_to_peft<M: LoraModel + ?Sized>(
    model: &M,
    kohya: &Path,
    naming: KohyaNaming,
    base_model_name_or_path: &str,
    dir: &Path,
) -> Result<LoraConfig> {
    let file = read_kohya(kohya, model, naming)?;
    // PEFT's one `r` and `lora_alpha` are the most common ones (the network's); a module
    // with its own (LoCon's conv_dim, a resized file) is named in the patterns.
    let most = |counts: BTreeMap<u64, usize>| {
        counts
            .into_iter()
            .max_by_key(|&(v, n)| (n, std::cmp::Reverse(v)))
            .map(|(v, _)| v)
    };
    let mut ranks: BTreeMap<u64, usize> = BTreeMap::new();
    let mut alphas: BTreeMap<u64, usize> = BTreeMap::new();
    for m in file.modules.values() {
        *ranks.entry(m.rank() as u64).or_default() += 1;
        *alphas.entry(m.alpha.to_bits()).or_default() += 1;
    }
    let (Some(r), Some(alpha)) = (most(ranks), most(alphas)) else {
        return Err(Error::Adapter(format!("{}: no modules", kohya.display())));
    };
    let (r, alpha) = (r as usize, f64::from_bits(alpha));
    let paths: BTreeSet<&str> = file.modules.keys().map(|s| s.as_str()).collect();
    let targets = peft_targets(model, &paths);
    let mut cfg = LoraConfig {
        r,
        alpha,
        dropout: 0.0,
        targets: Targets::Names(targets.clone()),
        use_rslora: false,
        ..LoraConfig::default()
    };
    for (path, m) in &file.modules {
        if m.rank() != r {
            cfg.rank_pattern.insert(path.clone(), m.rank());
        }
        if m.alpha != alpha {
            cfg.alpha_pattern.insert(path.clone(), m.alpha);
        }
    }
    let conv: BTreeSet<&str> = model
        .linears()
        .into_iter()
        .filter(|l| l.conv1x1)
        .map(|l| l.path.as_str())
        .collect();
    let mut tensors = BTreeMap::new();
    for (path, m) in &file.modules {
        let c = conv.contains(path.as_str());
        tensors.insert(lora::peft_key(path, "A"), lora::to_file_shape(&m.down, c)?);
        tensors.insert(lora::peft_key(path, "B"), lora::to_file_shape(&m.up, c)?);
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    lora::write_safetensors(&dir.join("adapter_model.safetensors"), &tensors)?;
    let meta = AdapterMeta {
        base_model_name_or_path: base_model_name_or_path.to_string(),
        task_type: model.task_type().to_string(),
        target_modules: serde_json::json!(targets),
        modules_to_save: Vec::new(),
    };
    lora::write_adapter_config(&cfg, &meta, dir)?;
    Ok(cfg)
}

/// Converts a PEFT adapter folder into a kohya file: the adapter is applied to `model`
/// (which therefore runs with it afterwards) and exported from there, so the PEFT side
/// is read by the same code that serves adapters.
pub fn peft_to_kohya<M: LoraModel + ?Sized>(
    model: &mut M,
    dir: &Path,
    naming: KohyaNaming,
    meta: &KohyaMeta,
    dtype: DType,
    out: &Path,
) -> Result<HashMap<String, String>> {
    let dev = model
        .linears()
        .first()
        .map(|l| l.weight.device())
        .unwrap_or(Device::Cpu);
    let weights = AdapterWeights::load(dir, &dev)?;
    adapters::apply(model, Some(&weights))?;
    write_kohya(model, naming, meta, dtype, out)
}
