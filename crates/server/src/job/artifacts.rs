//! What a job leaves behind: blob keys, published names, and the adapter zip that the
//! final adapter and every checkpoint are downloaded as.

use loraforge_store::JobRecord;
pub use loraforge_trainer::families::decoder::export::LORA_GGUF_FILE;
use loraforge_trainer::FAMILIES;
use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::Path;

pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_TENSORS: &str = "adapter_model.safetensors";

/// The files of an adapter folder that its zip carries beside the model card, in zip
/// order: PEFT's two, which every adapter has, then those a family adds (a classifier's
/// label set, an SD adapter's kohya copy) where present.
fn zip_files() -> impl Iterator<Item = (&'static str, bool)> {
    [(ADAPTER_CONFIG, true), (ADAPTER_TENSORS, true)]
        .into_iter()
        .chain(extra_files().map(|f| (f, false)))
}

/// The files families keep beside an adapter's weights, each once (two classifier
/// families share `labels.json`).
pub fn extra_files() -> impl Iterator<Item = &'static str> {
    let mut files: Vec<&'static str> = Vec::new();
    for f in FAMILIES
        .iter()
        .flat_map(|f| f.adapter_files().iter().copied())
    {
        if !files.contains(&f) {
            files.push(f);
        }
    }
    files.into_iter()
}

/// The files of a checkpoint folder that resuming needs.
pub const CHECKPOINT_FILES: [&str; 4] = [
    ADAPTER_CONFIG,
    ADAPTER_TENSORS,
    "optimizer.safetensors",
    "trainer_state.json",
];

/// The zip of an adapter folder `dir`, with `card` as its README.md. The zip is
/// deterministic (fixed entry times), so the same folder always gives the same bytes.
pub fn adapter_zip(dir: &Path, card: &str) -> std::io::Result<Vec<u8>> {
    let mut files = Vec::new();
    for (name, required) in zip_files() {
        match std::fs::read(dir.join(name)) {
            Ok(bytes) => files.push((name, bytes)),
            Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(std::io::Error::new(
                    e.kind(),
                    format!("reading {name} of {}: {e}", dir.display()),
                ))
            }
        }
    }
    let mut buf = std::io::Cursor::new(Vec::new());
    let mut z = zip::ZipWriter::new(&mut buf);
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    for (name, bytes) in files.iter().map(|(n, b)| (*n, b.as_slice())) {
        z.start_file(name, opts).map_err(std::io::Error::other)?;
        z.write_all(bytes)?;
    }
    z.start_file("README.md", opts)
        .map_err(std::io::Error::other)?;
    z.write_all(card.as_bytes())?;
    z.finish().map_err(std::io::Error::other)?;
    Ok(buf.into_inner())
}

/// The README.md of an adapter zip: what it is and how to load it.
pub fn model_card(job: &JobRecord, step: Option<u64>) -> String {
    let name = fine_tuned_name(job);
    let what = match step {
        Some(s) => format!("{name}:ckpt-step-{s}\n\nThe step-{s} checkpoint of a LoRA adapter"),
        None => format!("{name}\n\nA LoRA adapter"),
    };
    format!(
        "# {what} for `{}`, trained by loraforge (job `{}`).\nLoad it with PEFT: \
         `PeftModel.from_pretrained(base_model, \"<this folder>\")`.\n",
        job.model, job.id
    )
}

/// `ft:<base>:<suffix>:<job id>`.
pub fn fine_tuned_name(job: &JobRecord) -> String {
    format!(
        "ft:{}:{}:{}",
        job.model,
        job.suffix.as_deref().unwrap_or("lora"),
        job.id
    )
}

/// Blob keys of a finished job's artifacts.
pub fn adapter_key(job_id: &str, format: &str) -> String {
    match format {
        "safetensors" => format!("jobs/{job_id}/{ADAPTER_TENSORS}"),
        // Named apart from the checkpoints' `kohya.safetensors`; kept as first stored.
        "kohya" => format!("jobs/{job_id}/lora_kohya.safetensors"),
        "gguf" => format!("jobs/{job_id}/{LORA_GGUF_FILE}"),
        _ => format!("jobs/{job_id}/adapter.zip"),
    }
}

/// Blob prefix of a job's checkpoint at `step`.
pub fn checkpoint_key(job_id: &str, attempt: i64, step: u64) -> String {
    // Per attempt, so a stale worker finishing an upload cannot overwrite the files of
    // the attempt that replaced it.
    format!("jobs/{job_id}/checkpoints/attempt-{attempt}/step-{step}")
}

/// Blob key of one format of the adapter stored under a checkpoint's prefix.
pub fn checkpoint_adapter_key(prefix: &str, format: &str) -> String {
    match format {
        "safetensors" => format!("{prefix}/{ADAPTER_TENSORS}"),
        "kohya" => format!("{prefix}/kohya.safetensors"),
        // Stored with the checkpoint's files (a decoder family's adapter file).
        "gguf" => format!("{prefix}/{LORA_GGUF_FILE}"),
        _ => format!("{prefix}/adapter.zip"),
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(zip: &[u8]) -> Vec<String> {
        let z = zip::ZipArchive::new(std::io::Cursor::new(zip)).unwrap();
        z.file_names().map(String::from).collect()
    }

    #[test]
    fn the_zip_carries_the_optional_files_when_present_and_is_deterministic() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(ADAPTER_CONFIG), b"{}").unwrap();
        std::fs::write(dir.path().join(ADAPTER_TENSORS), b"tensors").unwrap();
        let plain = adapter_zip(dir.path(), "card").unwrap();
        let mut names = entries(&plain);
        names.sort();
        assert_eq!(names, ["README.md", ADAPTER_CONFIG, ADAPTER_TENSORS]);
        assert_eq!(plain, adapter_zip(dir.path(), "card").unwrap());

        std::fs::write(dir.path().join("labels.json"), b"{\"id2label\":{}}").unwrap();
        let labelled = adapter_zip(dir.path(), "card").unwrap();
        assert!(entries(&labelled).iter().any(|n| n == "labels.json"));

        std::fs::remove_file(dir.path().join(ADAPTER_TENSORS)).unwrap();
        let e = adapter_zip(dir.path(), "card").unwrap_err();
        assert!(e.to_string().contains(ADAPTER_TENSORS), "{e}");
    }
}
