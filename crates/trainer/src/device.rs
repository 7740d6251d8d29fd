//! Device selection: `cpu` or `cuda:N`.

pub use candle_core::Device;

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
