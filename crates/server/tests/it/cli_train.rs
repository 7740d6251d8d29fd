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
            // Unpacked, forty examples make five micro-batches of four a epoch: the
            // run accumulates and crosses epochs (packed, they would fill one).
            "--no-packing",
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
            .args(["--batch-size", "2", "--target-modules", "all-linear"])
            // The adapter that gets merged trains long and fast enough to move the model
            // (two steps at the default rate leave B ≈ 0, and any merge would pass).
            .args(if i == 1 {
                ["--max-steps", "30", "--lr", "1e-2"]
            } else {
                ["--max-steps", "2", "--lr", "2e-4"]
            })
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
    merge(&model, &adapter, &merged);
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
    let tuned = gen(&model, Some(&adapter));
    assert_ne!(
        gen(&model, None),
        tuned,
        "the adapter does not change the model's output: the merge check would prove nothing"
    );
    assert_eq!(tuned, gen(&merged, None));

    // Weight by weight: every targeted matrix is W + (alpha / r)·B·A, and moved.
    let base = std::fs::read(model.join("model.safetensors")).unwrap();
    let base = safetensors::SafeTensors::deserialize(&base).unwrap();
    let lora = std::fs::read(adapter.join("adapter_model.safetensors")).unwrap();
    let lora = safetensors::SafeTensors::deserialize(&lora).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(adapter.join("adapter_config.json")).unwrap())
            .unwrap();
    let scale = cfg["lora_alpha"].as_f64().unwrap() / cfg["r"].as_f64().unwrap();
    let merged_bytes = merged_weights(&merged);
    let merged = safetensors::SafeTensors::deserialize(&merged_bytes).unwrap();
    let mut checked = 0;
    for name in lora.names() {
        let Some(module) = name
            .strip_prefix("base_model.model.")
            .and_then(|n| n.strip_suffix(".lora_A.weight"))
        else {
            continue;
        };
        let (a, a_shape) = f32s(&lora, name);
        let (b, b_shape) = f32s(&lora, &name.replace("lora_A", "lora_B"));
        let key = format!("{module}.weight");
        let (w, w_shape) = f32s(&base, &key);
        let (m, m_shape) = f32s(&merged, &key);
        assert_eq!(w_shape, m_shape, "{key}");
        let (out, r, inp) = (b_shape[0], a_shape[0], a_shape[1]);
        assert_eq!(w_shape, [out, inp], "{key}");
        let (mut moved, mut worst) = (0f64, 0f64);
        for o in 0..out {
            for i in 0..inp {
                let ba: f64 = (0..r)
                    .map(|k| b[o * r + k] as f64 * a[k * inp + i] as f64)
                    .sum();
                let want = w[o * inp + i] as f64 + scale * ba;
                worst = worst.max((m[o * inp + i] as f64 - want).abs());
                moved = moved.max((m[o * inp + i] - w[o * inp + i]).abs() as f64);
            }
        }
        assert!(
            worst < 1e-5,
            "{key}: merged differs from W + s·BA by {worst}"
        );
        assert!(
            moved > 1e-3,
            "{key}: the merge left the base weight in place"
        );
        checked += 1;
    }
    assert!(checked >= 7, "only {checked} merged matrices checked");
}

/// The merged folder's weights (one `model.safetensors`).
fn merged_weights(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join("model.safetensors")).unwrap_or_else(|e| {
        let names: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        panic!("{}: {e}; the folder has {names:?}", dir.display())
    })
}

/// An f32 tensor's values and shape.
fn f32s(st: &safetensors::SafeTensors, name: &str) -> (Vec<f32>, Vec<usize>) {
    let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(t.dtype(), safetensors::Dtype::F32, "{name}");
    let v = t
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    (v, t.shape().to_vec())
}

/// `loraforge merge` of `adapter` into `model`, written to `out`.
fn merge(model: &Path, adapter: &Path, out: &Path) {
    let o = Command::new(env!("CARGO_BIN_EXE_loraforge"))
        .arg("merge")
        .arg("--model")
        .arg(model)
        .arg("--adapter")
        .arg(adapter)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// Trains `model` for three steps with its default targets into `out`.
fn train_tiny(model: &Path, out: &Path) {
    let o = Command::new(env!("CARGO_BIN_EXE_loraforge"))
        .arg("train")
        .arg("--model")
        .arg(model)
        .arg("--data")
        .arg(root().join("tests/data/chat-small.jsonl"))
        .arg("--out")
        .arg(out)
        .args(["--max-steps", "3", "--batch-size", "2", "--lr", "1e-2"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// The adapter's tensor names, sorted, and its `target_modules`.
fn adapter_names(dir: &Path) -> (Vec<String>, serde_json::Value) {
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("adapter_config.json")).unwrap()).unwrap();
    let st = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&st).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
    names.sort();
    (names, cfg["target_modules"].clone())
}

/// phi3 fuses q/k/v and gate/up: with no targets named, LoRA goes on the fused modules
/// (PEFT's names), and PEFT loads the adapter on the base with no key missing or extra.
#[test]
fn phi3_trains_its_fused_projections_and_peft_loads_the_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let model = root().join("tests/fixtures/tiny-phi3");
    train_tiny(&model, dir.path());
    let (names, targets) = adapter_names(dir.path());
    assert_eq!(
        targets,
        serde_json::json!(["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])
    );
    // 2 layers × 4 modules × (A, B).
    assert_eq!(names.len(), 16, "{names:?}");
    assert!(names
        .iter()
        .any(|n| n.ends_with("self_attn.qkv_proj.lora_A.weight")));
    crate::common::peft_check(&model, dir.path());
}

/// Gemma 3 text trains on every projection; PEFT loads the adapter cleanly, and the
/// merged folder (norm weights written as stored, not as the `1 + w` they scale by)
/// computes in transformers as PEFT's base + adapter.
#[test]
fn gemma3_trains_and_its_adapter_and_merge_load_in_transformers() {
    let dir = tempfile::tempdir().unwrap();
    let model = root().join("tests/fixtures/tiny-gemma3");
    let adapter = dir.path().join("adapter");
    train_tiny(&model, &adapter);
    let (names, targets) = adapter_names(&adapter);
    assert_eq!(targets.as_array().map(Vec::len), Some(7), "{targets}");
    // 2 layers × 7 modules × (A, B).
    assert_eq!(names.len(), 28, "{names:?}");
    let merged = dir.path().join("merged");
    merge(&model, &adapter, &merged);
    crate::common::peft_check_merged(&model, &adapter, Some(&merged));
}
