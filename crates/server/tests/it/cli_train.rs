//! `loraforge train` from the command line on the tiny fixture model: checkpoints,
//! resume after a kill, clear errors for bad input.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn train_cmd(out: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_loraforge"));
    c.arg("train")
        .arg("--model")
        .arg(root().join("tests/fixtures/tiny-llama"))
        .arg("--data")
        .arg(root().join("tests/data/chat-small.jsonl"))
        .arg("--out")
        .arg(out)
        .args([
            "--max-steps",
            "8",
            "--batch-size",
            "4",
            "--grad-accum",
            "2",
            "--lr",
            "1e-2",
            "--scheduler",
            "cosine",
            "--warmup-steps",
            "2",
            "--dropout",
            "0.1",
            "--weight-decay",
            "0.01",
            "--seed",
            "3",
            "--threads",
            "1",
        ])
        .args(extra);
    c
}

/// A run killed after its step-4 checkpoint and resumed with `--resume` ends with the
/// same adapter, bit for bit, as an uninterrupted run (shuffled data crossing an epoch
/// boundary, dropout, gradient accumulation, warmup + cosine, weight decay).
#[test]
fn resume_after_kill_gives_the_same_adapter_bitwise() {
    let dir = tempfile::tempdir().unwrap();
    let full = dir.path().join("full");
    let st = train_cmd(&full, &[])
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());

    let cut = dir.path().join("cut");
    let mut child = train_cmd(&cut, &["--checkpoint-every", "4"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let ckpt = cut.join("checkpoints/checkpoint-4");
    let t0 = Instant::now();
    while !ckpt.join("trainer_state.json").is_file() && t0.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(2));
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(ckpt.is_dir(), "no checkpoint was written");
    // Whatever the kill left behind, the resumed run rewrites the final adapter.
    let _ = std::fs::remove_file(cut.join("adapter_model.safetensors"));
    let out = train_cmd(&cut, &["--checkpoint-every", "4", "--resume"])
        .arg(&ckpt)
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "resume failed: {log}");
    assert!(log.contains("resumed at step 4"), "{log}");
    let a = std::fs::read(full.join("adapter_model.safetensors")).unwrap();
    let b = std::fs::read(cut.join("adapter_model.safetensors")).unwrap();
    assert!(
        a == b,
        "the resumed adapter differs from the uninterrupted one"
    );
    // And training did something: the adapter is not PEFT's B = 0 start.
    let t = candle_free_nonzero_b(&a);
    assert!(t, "lora_B is still all zeros after 8 steps");
}

/// True when some `lora_B` tensor has a non-zero byte (f32 zeros are all-zero bytes).
fn candle_free_nonzero_b(file: &[u8]) -> bool {
    let n = u64::from_le_bytes(file[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&file[8..8 + n]).unwrap();
    let data = &file[8 + n..];
    header.as_object().unwrap().iter().any(|(k, v)| {
        k.contains("lora_B")
            && v["data_offsets"].as_array().is_some_and(|o| {
                let (s, e) = (
                    o[0].as_u64().unwrap() as usize,
                    o[1].as_u64().unwrap() as usize,
                );
                data[s..e].iter().any(|&b| b != 0)
            })
    })
}

/// Bad data fails before training with a message that names the line; nothing is written.
#[test]
fn bad_line_is_named_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let o = Command::new(env!("CARGO_BIN_EXE_loraforge"))
        .arg("train")
        .arg("--model")
        .arg(root().join("tests/fixtures/tiny-llama"))
        .arg("--data")
        .arg(root().join("tests/data/bad-line7.jsonl"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("line 7") && err.contains("\"messages\" must be a non-empty array"),
        "{err}"
    );
    assert!(!out.join("adapter_model.safetensors").exists());
}

/// Every data format trains; a merged model folder loads and generates like the adapter.
#[test]
fn every_format_trains_and_merge_matches_adapter() {
    let dir = tempfile::tempdir().unwrap();
    for (i, f) in ["prompt-completion.jsonl", "text.jsonl", "tokenized.jsonl"]
        .iter()
        .enumerate()
    {
        let out = dir.path().join(format!("f{i}"));
        let o = Command::new(env!("CARGO_BIN_EXE_loraforge"))
            .arg("train")
            .arg("--model")
            .arg(root().join("tests/fixtures/tiny-qwen2"))
            .arg("--data")
            .arg(root().join("tests/data").join(f))
            .arg("--out")
            .arg(&out)
            .args([
                "--max-steps",
                "2",
                "--batch-size",
                "2",
                "--target-modules",
                "all-linear",
            ])
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{f}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(out.join("adapter_model.safetensors").is_file(), "{f}");
    }
    // Merge the all-linear adapter trained on text and compare greedy generations.
    let model = root().join("tests/fixtures/tiny-qwen2");
    let adapter = dir.path().join("f1");
    let merged = dir.path().join("merged");
    let st = Command::new(env!("CARGO_BIN_EXE_loraforge"))
        .arg("merge")
        .arg("--model")
        .arg(&model)
        .arg("--adapter")
        .arg(&adapter)
        .arg("--out")
        .arg(&merged)
        .status()
        .unwrap();
    assert!(st.success());
    let gen = |m: &Path, a: Option<&Path>| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_loraforge"));
        c.arg("generate").arg("--model").arg(m).args([
            "--prompt",
            "hello",
            "--max-new-tokens",
            "12",
        ]);
        if let Some(a) = a {
            c.arg("--adapter").arg(a);
        }
        let o = c.output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    assert_eq!(gen(&model, Some(&adapter)), gen(&merged, None));
}
