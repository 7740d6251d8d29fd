//! Device selection: `cpu` or `cuda:N`.

pub use candle_core::{DType, Device};

use candle_core::quantized::GgmlDType;

use crate::{Error, Result};

/// Parses `cpu`, `cuda` or `cuda:N`. CUDA needs the crate's `cuda` feature; without it,
/// or without a usable GPU, asking for CUDA is an error rather than a silent CPU run.
pub fn parse(s: &str) -> Result<Device> {
    let s = s.trim();
    if s == "cpu" {
        return Ok(Device::Cpu);
    }
    let ordinal = match s.strip_prefix("cuda") {
        Some("") => 0,
        Some(rest) => rest
            .strip_prefix(':')
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| Error::Config(format!("device \"{s}\": expected cpu or cuda:N")))?,
        None => {
            return Err(Error::Config(format!(
                "device \"{s}\": expected cpu or cuda:N"
            )))
        }
    };
    if !cfg!(feature = "cuda") {
        return Err(Error::Config(format!(
            "device \"{s}\": this build has no CUDA support (build with --features cuda)"
        )));
    }
    Device::new_cuda(ordinal).map_err(|e| Error::Config(format!("device \"{s}\": {e}")))
}

/// A device's memory in bytes, `(total, free)`: the machine's (`MemTotal`,
/// `MemAvailable`) for the CPU, the driver's for a GPU.
pub fn memory(device: &Device) -> Result<(u64, u64)> {
    match device {
        Device::Cpu => {
            let info = std::fs::read_to_string("/proc/meminfo")
                .map_err(|e| Error::io(std::path::Path::new("/proc/meminfo"), e))?;
            let kib = |k: &str| {
                info.lines()
                    .find(|l| l.starts_with(k))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|v| v.parse::<u64>().ok())
                    .map(|v| v * 1024)
                    .ok_or_else(|| Error::Unsupported(format!("/proc/meminfo has no {k}")))
            };
            Ok((kib("MemTotal:")?, kib("MemAvailable:")?))
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => {
            let (free, total) = d
                .cuda_stream()
                .context()
                .mem_get_info()
                .map_err(|e| Error::Unsupported(format!("GPU memory: {e}")))?;
            Ok((total as u64, free as u64))
        }
        #[allow(unreachable_patterns)]
        _ => Err(Error::Unsupported(
            "memory of a device other than the CPU or a CUDA GPU".into(),
        )),
    }
}

/// Bytes per element of a compute precision.
pub fn dtype_bytes(d: DType) -> u64 {
    d.size_in_bytes() as u64
}

/// Parses a compute precision: `f32`, `bf16` or `f16`.
pub fn parse_dtype(s: &str) -> Result<DType> {
    match s.trim() {
        "f32" | "float32" => Ok(DType::F32),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        "f16" | "float16" => Ok(DType::F16),
        other => Err(Error::Config(format!(
            "dtype \"{other}\": expected f32, bf16 or f16"
        ))),
    }
}

/// A precision's name as [`parse_dtype`] reads it.
pub fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        DType::F32 => "f32",
        DType::F64 => "f64",
        _ => "an integer type",
    }
}

/// The name a GGUF file and the API use for a storage type (`q4_k`, `bf16`, ...).
pub fn ggml_name(t: GgmlDType) -> &'static str {
    match t {
        GgmlDType::F32 => "f32",
        GgmlDType::F16 => "f16",
        GgmlDType::BF16 => "bf16",
        GgmlDType::Q4_0 => "q4_0",
        GgmlDType::Q4_1 => "q4_1",
        GgmlDType::Q5_0 => "q5_0",
        GgmlDType::Q5_1 => "q5_1",
        GgmlDType::Q8_0 => "q8_0",
        GgmlDType::Q8_1 => "q8_1",
        GgmlDType::Q2K => "q2_k",
        GgmlDType::Q3K => "q3_k",
        GgmlDType::Q4K => "q4_k",
        GgmlDType::Q5K => "q5_k",
        GgmlDType::Q6K => "q6_k",
        GgmlDType::Q8K => "q8_k",
    }
}

/// Bytes of `elems` values stored as `t`.
pub fn ggml_bytes(t: GgmlDType, elems: u64) -> u64 {
    elems / t.block_size() as u64 * t.type_size() as u64
}

/// How a frozen base is kept in memory (`--base-dtype`, `hyperparameters.base_dtype`):
/// storage, not the compute precision (`--dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BaseDtype {
    /// A GGUF file's tensors each in its own quant type; an HF folder dense (in the
    /// compute precision).
    #[default]
    Auto,
    /// Dense in the compute precision (a GGUF file dequantized at load).
    Dense,
    /// Packed as this type, expanded per product.
    Packed(GgmlDType),
}

/// The names [`BaseDtype::parse`] reads.
pub const BASE_DTYPES: &str = "auto, f32, bf16, f16, q8_0, q4_0, q4_1, q5_0, q4_k, q5_k, q6_k";

impl BaseDtype {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s.trim() {
            "auto" => Self::Auto,
            "f32" => Self::Dense,
            "bf16" => Self::Packed(GgmlDType::BF16),
            "f16" => Self::Packed(GgmlDType::F16),
            "q8_0" => Self::Packed(GgmlDType::Q8_0),
            "q4_0" => Self::Packed(GgmlDType::Q4_0),
            "q4_1" => Self::Packed(GgmlDType::Q4_1),
            "q5_0" => Self::Packed(GgmlDType::Q5_0),
            "q4_k" => Self::Packed(GgmlDType::Q4K),
            "q5_k" => Self::Packed(GgmlDType::Q5K),
            "q6_k" => Self::Packed(GgmlDType::Q6K),
            other => {
                return Err(Error::Config(format!(
                    "base dtype \"{other}\": expected one of {BASE_DTYPES}"
                )))
            }
        })
    }

    /// The name [`BaseDtype::parse`] reads back.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Dense => "f32",
            Self::Packed(t) => ggml_name(*t),
        }
    }
}

/// How long candle's element-wise workers spin for the next op before they sleep: its
/// default, 25,000 rounds, keeps a core busy after every element-wise op, and on a machine
/// whose every core runs a matmul thread that spinning is taken from the matmuls
/// (+5-8% tokens/s on SmolLM2 with 2 cores when shortened; BENCHMARKS.md).
const ELEMENTWISE_SPIN: u32 = 200;

/// Sizes candle's CPU thread pools (rayon's, for matmuls, and candle's own, for
/// element-wise ops) to `threads`, and shortens the element-wise workers' spinning unless
/// `CANDLE_BARRIER_POOL_SPIN_LIMIT` says otherwise. The pools read these once, when first
/// used: call this before any tensor work.
pub fn set_cpu_threads(threads: usize) {
    let n = threads.max(1).to_string();
    std::env::set_var("RAYON_NUM_THREADS", &n);
    std::env::set_var("CANDLE_NUM_THREADS", &n);
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var(
            "CANDLE_BARRIER_POOL_SPIN_LIMIT",
            ELEMENTWISE_SPIN.to_string(),
        );
    }
}

/// Keeps freed activation buffers in the process for reuse.
///
/// A training step allocates and frees hundreds of multi-megabyte tensors. glibc serves
/// those above its mmap threshold with fresh `mmap`s and returns them on free, so every
/// step page-faults (and zeroes) gigabytes anew: a fifth of a step's CPU time in the
/// kernel on SmolLM2-135M. Raising the threshold to glibc's maximum and not trimming the
/// heap lets the next step reuse the same pages. The threshold cannot pass 32 MiB, and an
/// SD 1.5 step at 512 px allocates many larger buffers (a feed-forward's 40 MiB hidden
/// state at 64×64 latents), which still faulted about 4 GB of fresh pages a step and spent
/// 15% of the step's CPU time in the kernel: chunk mmaps are turned off altogether, so
/// those come from the heap too (system time 11.3 → 4.2 s over three steps, peak RSS
/// unchanged). Process-wide and idempotent; a no-op on other C libraries.
pub fn tune_allocator_for_training() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn mallopt(param: i32, value: i32) -> i32;
        }
        const M_TRIM_THRESHOLD: i32 = -1;
        const M_MMAP_THRESHOLD: i32 = -3;
        const M_MMAP_MAX: i32 = -4;
        // glibc's ceiling for the mmap threshold on 64-bit targets (HEAP_MAX_SIZE / 2).
        const THRESHOLD_CEILING: i32 = 32 << 20;
        // SAFETY: mallopt only changes allocator parameters; any value is accepted or
        // rejected with a return code.
        unsafe {
            mallopt(M_MMAP_THRESHOLD, THRESHOLD_CEILING);
            mallopt(M_MMAP_MAX, 0);
            mallopt(M_TRIM_THRESHOLD, i32::MAX);
        }
    }
}
