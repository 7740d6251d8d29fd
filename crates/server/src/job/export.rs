//! Building an export (a job's adapter merged into its base) into one zip: the blocking
//! part of a worker's export, apart from the queue and the blob store.
//!
//! - `merged_safetensors`: the merged HF folder (`config.json`, `model.safetensors`,
//!   tokenizer files, generation config) that transformers loads;
//! - `merged_gguf`: `model.gguf` (the base GGUF's metadata, tokenizer and chat template
//!   carried over) and an Ollama `Modelfile` beside it.
//!
//! Weights are stored, not deflated: they do not compress, and the zip can be large.
//! A build looks at its stop flag between steps and while it copies, so that a worker
//! that lost the export (or is shutting down) gets its thread and memory back soon.

use anyhow::{bail, Context};
use loraforge_trainer::device::{parse_dtype, Device};
use loraforge_trainer::families::decoder::{export, merge};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

/// Why a build stopped before its end: its stop flag was raised.
#[derive(Debug, thiserror::Error)]
#[error("the export was stopped")]
pub struct Stopped;

fn check(stop: &AtomicBool) -> Result<(), Stopped> {
    if stop.load(Ordering::Relaxed) {
        Err(Stopped)
    } else {
        Ok(())
    }
}

/// Copies `from` into `to` a MiB at a time, minding `stop`; returns the bytes copied.
fn copy_minding(
    from: &mut impl Read,
    to: &mut impl Write,
    stop: &AtomicBool,
    buf: &mut [u8],
) -> anyhow::Result<u64> {
    let mut bytes = 0u64;
    loop {
        check(stop)?;
        let n = from.read(buf)?;
        if n == 0 {
            return Ok(bytes);
        }
        to.write_all(&buf[..n])?;
        bytes += n as u64;
    }
}

/// The adapter's PEFT files inside a job's adapter zip, extracted into `dir`.
pub fn unzip_adapter(zip_path: &Path, dir: &Path) -> anyhow::Result<()> {
    let mut z = zip::ZipArchive::new(std::fs::File::open(zip_path)?)?;
    for name in [
        crate::job::artifacts::ADAPTER_CONFIG,
        crate::job::artifacts::ADAPTER_TENSORS,
    ] {
        let mut entry = z
            .by_name(name)
            .with_context(|| format!("the adapter zip has no {name}"))?;
        let mut out = std::fs::File::create(dir.join(name))?;
        std::io::copy(&mut entry, &mut out)?;
    }
    Ok(())
}

/// Merges the adapter in `adapter` into the base `model` and writes the export's zip to
/// `out`, using `work` for the files it zips. Returns the zip's size and sha256, or
/// [`Stopped`] once `stop` is raised.
pub fn build(
    model: &Path,
    adapter: &Path,
    format: &str,
    dtype: &str,
    work: &Path,
    out: &Path,
    stop: &AtomicBool,
) -> anyhow::Result<(u64, String)> {
    check(stop)?;
    let base = merge::load_with_adapter(model, Some(adapter), &Device::Cpu)?;
    check(stop)?;
    let files: Vec<(String, std::path::PathBuf)> = match format {
        "merged_safetensors" => {
            let dir = work.join("merged");
            merge::write_merged(&base, model, &dir, parse_dtype(dtype)?)?;
            let mut names: Vec<String> = std::fs::read_dir(&dir)?
                .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
                .collect::<std::io::Result<_>>()?;
            names.sort();
            names
                .into_iter()
                .map(|n| (n.clone(), dir.join(n)))
                .collect()
        }
        "merged_gguf" => {
            let gguf = work.join("model.gguf");
            let merged = base.model.merged_weights()?;
            check(stop)?;
            export::write_merged_gguf(
                model,
                &base.model.cfg,
                merged,
                export::MergedType::parse(dtype)?,
                &gguf,
            )?;
            let modelfile = export::write_modelfile(&gguf, &base.tokenizer)?;
            vec![("model.gguf".into(), gguf), ("Modelfile".into(), modelfile)]
        }
        other => bail!("unknown export format {other}"),
    };
    drop(base);
    check(stop)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut z = zip::ZipWriter::new(std::fs::File::create(out)?);
    for (name, path) in &files {
        let size = std::fs::metadata(path)?.len();
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored)
            .large_file(size >= u32::MAX as u64);
        z.start_file(name.as_str(), opts)?;
        copy_minding(&mut std::fs::File::open(path)?, &mut z, stop, &mut buf)?;
    }
    z.finish()?.sync_all()?;
    // sha2's hasher is itself a `Write`.
    let mut hash = Sha256::new();
    let bytes = copy_minding(&mut std::fs::File::open(out)?, &mut hash, stop, &mut buf)?;
    Ok((bytes, format!("{:x}", hash.finalize())))
}
