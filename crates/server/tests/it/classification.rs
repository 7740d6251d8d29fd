//! Sequence classification through the API: labelled uploads and their line errors,
//! task/model/file checks at job creation, a job on the tiny BERT fixture, and on the
//! real all-MiniLM-L6-v2 (fetched by `scripts/fetch-models.sh`): accuracy well above
//! chance, `loraforge classify` agreeing with PEFT on held-out texts, and 20 steps
//! matching PEFT's losses (`scripts/peft-parity-bert.sh`).
//!
//! The MiniLM checks skip without the model or the venv unless
//! `LORAFORGE_REQUIRE_REAL_MODELS=1` (CI sets it).

use crate::common;
use common::{run, unzip};

use common::{copy_dir, create_job, get_json, root, wait_status, Backend, TestServer};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

async fn upload(s: &TestServer, name: &str, body: Vec<u8>) -> Value {
    common::upload_raw(s, name, body).await.1
}

async fn upload_ok(s: &TestServer, name: &str, body: Vec<u8>) -> String {
    let f = upload(s, name, body).await;
    assert_eq!(f["status"], "processed", "{f}");
    assert_eq!(f["format"], "classification", "{f}");
    f["id"].as_str().unwrap().to_string()
}

fn lines(rows: &[Value]) -> Vec<u8> {
    rows.iter()
        .map(|r| r.to_string() + "\n")
        .collect::<String>()
        .into_bytes()
}

async fn download_adapter(s: &TestServer, job: &str) -> Vec<u8> {
    let r = reqwest::get(s.url(&format!("/v1/fine_tuning/jobs/{job}/adapter")))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap().to_vec()
}

#[tokio::test]
async fn labelled_data_is_checked_and_a_tiny_bert_trains_through_the_api() {
    let s = TestServer::start(Backend::Sqlite, &[]).await;
    let fixtures = root().join("tests/fixtures");
    copy_dir(
        &fixtures.join("tiny-bert"),
        &s.models_dir().join("tiny-bert"),
    );
    copy_dir(
        &fixtures.join("tiny-llama"),
        &s.models_dir().join("tiny-llama"),
    );
    let m = get_json(&s, "/v1/models/tiny-bert").await;
    assert_eq!(m["tasks"], json!(["sequence_classification"]), "{m}");

    // A line without a label is named at upload.
    let f = upload(
        &s,
        "bad.jsonl",
        lines(&[
            json!({"text": "good", "label": "pos"}),
            json!({"text": "bad", "label": "neg"}),
            json!({"text": "no label here"}),
        ]),
    )
    .await;
    assert_eq!(f["status"], "error", "{f}");
    assert_eq!(
        f["validation_errors"],
        json!(["line 3: missing \"label\""]),
        "{f}"
    );

    let rows: Vec<Value> = (0..12)
        .map(|i| {
            let (t, l) = [("the film was great", "pos"), ("awful music and a terrible plot", "neg"), ("the story was fine", "neutral")][i % 3];
            json!({"text": format!("{t} {i}"), "text_pair": if i % 2 == 0 { Some("i felt the ending was brilliant") } else { None }, "label": l})
        })
        .collect();
    let train = upload_ok(&s, "train.jsonl", lines(&rows)).await;
    let one_class = upload_ok(
        &s,
        "one.jsonl",
        lines(&[
            json!({"text": "a", "label": "x"}),
            json!({"text": "b", "label": "x"}),
        ]),
    )
    .await;
    let unseen = upload_ok(
        &s,
        "valid.jsonl",
        lines(&[
            json!({"text": "a", "label": "pos"}),
            json!({"text": "b", "label": "angry"}),
        ]),
    )
    .await;
    let chat = common::upload_chat(&s).await;

    let cases = [
        (
            json!({"model": "tiny-bert", "training_file": one_class, "task": "sequence_classification"}),
            "training_file",
            "lines 1-2: the training file has only one class",
        ),
        (
            json!({"model": "tiny-bert", "training_file": train, "validation_file": unseen, "task": "sequence_classification"}),
            "validation_file",
            "line 2: label \"angry\" does not occur in the training file",
        ),
        (
            json!({"model": "tiny-bert", "training_file": train}),
            "task",
            "cannot be trained for task causal_lm",
        ),
        (
            json!({"model": "tiny-llama", "training_file": train, "task": "sequence_classification"}),
            "task",
            "cannot be trained for task sequence_classification",
        ),
        (
            json!({"model": "tiny-bert", "training_file": chat, "task": "sequence_classification"}),
            "training_file",
            "has format chat",
        ),
        (
            json!({"model": "tiny-bert", "training_file": train, "task": "summarize"}),
            "task",
            "not one of causal_lm, sequence_classification",
        ),
        (
            json!({"model": "tiny-bert", "training_file": train, "task": "sequence_classification", "problem_type": "ranking"}),
            "problem_type",
            "problem_type \"ranking\"",
        ),
    ];
    for (body, param, msg) in cases {
        let (st, e) = create_job(&s, body.clone()).await;
        assert_eq!(st, 400, "{body}: {e}");
        assert_eq!(e["error"]["param"], param, "{body}: {e}");
        let m = e["error"]["message"].as_str().unwrap();
        assert!(m.contains(msg), "{body}: {m}");
    }
    let list = get_json(&s, "/v1/fine_tuning/jobs").await;
    assert_eq!(list["data"], json!([]), "a rejected job left a row");

    let valid = upload_ok(&s, "valid-ok.jsonl", lines(&rows[..6])).await;
    let (st, job) = create_job(
        &s,
        json!({"model": "tiny-bert", "training_file": train, "validation_file": valid,
               "task": "sequence_classification",
               "hyperparameters": {"n_epochs": 2, "batch_size": 4, "learning_rate": 1e-2, "eval_interval": 3,
                                   "checkpoint_interval": 3}}),
    )
    .await;
    assert_eq!(st, 200, "{job}");
    assert_eq!(job["task"], "sequence_classification");
    assert_eq!(
        job["hyperparameters"]["lora_target_modules"],
        json!(["query", "value"])
    );
    let id = job["id"].as_str().unwrap();
    let done = wait_status(&s, id, &["succeeded", "failed"], Duration::from_secs(120)).await;
    assert_eq!(done["status"], "succeeded", "{done}\n{}", s.logs());
    let ev = get_json(&s, &format!("/v1/fine_tuning/jobs/{id}/events?limit=100")).await;
    let acc: Vec<&Value> = ev["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"]["valid_accuracy"].is_number())
        .collect();
    assert!(acc.len() >= 2, "validation accuracy events: {ev}");
    assert!(acc[0]["data"]["valid_macro_f1"].is_number());
    let ck = get_json(&s, &format!("/v1/fine_tuning/jobs/{id}/checkpoints")).await;
    let m = &ck["data"][0]["metrics"];
    assert!(
        m["valid_accuracy"].is_number() && m["valid_macro_f1"].is_number(),
        "{ck}"
    );
    // A checkpoint's zip carries the label set as the final one does: one zip builder.
    let ck_id = ck["data"][0]["id"].as_str().unwrap();
    let r = reqwest::get(s.url(&format!(
        "/v1/fine_tuning/jobs/{id}/checkpoints/{ck_id}/adapter"
    )))
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    let ck_dir = tempfile::tempdir().unwrap();
    let names = unzip(&r.bytes().await.unwrap(), ck_dir.path());
    for f in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "labels.json",
        "README.md",
    ] {
        assert!(
            names.iter().any(|n| n == f),
            "{f} not in checkpoint zip {names:?}"
        );
    }

    let dir = tempfile::tempdir().unwrap();
    let names = unzip(&download_adapter(&s, id).await, dir.path());
    for f in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "labels.json",
    ] {
        assert!(names.iter().any(|n| n == f), "{f} not in {names:?}");
    }
    let labels: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("labels.json")).unwrap())
            .unwrap();
    assert_eq!(
        labels["id2label"],
        json!({"0": "neg", "1": "neutral", "2": "pos"})
    );
    let cfg: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["task_type"], "SEQ_CLS");
    // The head, trained in full, is stored under PEFT's modules_to_save name.
    let st = std::fs::read(dir.path().join("adapter_model.safetensors")).unwrap();
    let n = u64::from_le_bytes(st[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&st[8..8 + n]).unwrap();
    assert_eq!(
        header["base_model.model.classifier.weight"]["shape"],
        json!([3, 32])
    );

    // Classifiers do not chat: a clear 400 naming the model, for the base and the adapter.
    for m in [json!("tiny-bert"), done["fine_tuned_model"].clone()] {
        common::chat_refused(&s, &m).await;
    }

    // The CLI classifies with the downloaded adapter.
    let out = Command::new(env!("CARGO_BIN_EXE_loraforge"))
        .args(["classify", "--model"])
        .arg(s.models_dir().join("tiny-bert"))
        .arg("--adapter")
        .arg(dir.path())
        .args(["--text", "the film was great", "--text", "awful music"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let preds: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(preds.len(), 2);
    let sum: f64 = preds[0]["scores"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_f64().unwrap())
        .sum();
    assert!((sum - 1.0).abs() < 1e-4, "{preds:?}");
}

fn minilm() -> Option<(PathBuf, PathBuf)> {
    let model = root().join("models/all-MiniLM-L6-v2");
    let venv = std::env::var("LORAFORGE_VENV").map(PathBuf::from).ok();
    let require = std::env::var("LORAFORGE_REQUIRE_REAL_MODELS").as_deref() == Ok("1");
    match venv.filter(|v| v.join("bin/python").is_file()) {
        Some(v) if model.join("model.safetensors").is_file() => Some((model, v)),
        _ if require => panic!(
            "{} or LORAFORGE_VENV is missing: run scripts/fetch-models.sh and scripts/setup-python.sh",
            model.display()
        ),
        _ => {
            eprintln!("skipped: MiniLM or LORAFORGE_VENV missing");
            None
        }
    }
}

#[tokio::test]
async fn minilm_learns_topics_through_the_api_and_classifies_like_peft() {
    let Some((model, venv)) = minilm() else {
        return;
    };
    let s = TestServer::start(Backend::Sqlite, &["--train-threads", "2"]).await;
    std::os::unix::fs::symlink(&model, s.models_dir().join("all-MiniLM-L6-v2")).unwrap();
    let data = root().join("tests/data");
    let train = upload_ok(
        &s,
        "train.jsonl",
        std::fs::read(data.join("topics-train.jsonl")).unwrap(),
    )
    .await;
    let valid = upload_ok(
        &s,
        "valid.jsonl",
        std::fs::read(data.join("topics-valid.jsonl")).unwrap(),
    )
    .await;
    let (st, job) = create_job(
        &s,
        json!({"model": "all-MiniLM-L6-v2", "training_file": train, "validation_file": valid,
               "task": "sequence_classification", "seed": 3,
               "hyperparameters": {"n_epochs": 4, "batch_size": 16, "learning_rate": 2e-3,
                                   "lr_scheduler": "constant", "eval_interval": 6}}),
    )
    .await;
    assert_eq!(st, 200, "{job}");
    let id = job["id"].as_str().unwrap();
    let done = wait_status(&s, id, &["succeeded", "failed"], Duration::from_secs(600)).await;
    assert_eq!(done["status"], "succeeded", "{done}\n{}", s.logs());
    let ev = get_json(&s, &format!("/v1/fine_tuning/jobs/{id}/events?limit=100")).await;
    let mut acc: Vec<(i64, f64, f64)> = ev["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"]["valid_accuracy"].is_number())
        .map(|e| {
            (
                e["data"]["step"].as_i64().unwrap(),
                e["data"]["valid_accuracy"].as_f64().unwrap(),
                e["data"]["valid_loss"].as_f64().unwrap(),
            )
        })
        .collect();
    acc.sort_by_key(|a| a.0);
    println!("MiniLM topics (3 classes, chance 0.33): validation (step, accuracy, loss) {acc:?}");
    let last = acc.last().expect("validation events");
    assert!(
        last.1 >= 0.8,
        "validation accuracy {} is not clearly above chance",
        last.1
    );

    // The download classifies held-out texts exactly as PEFT does with it.
    let dir = tempfile::tempdir().unwrap();
    unzip(&download_adapter(&s, id).await, dir.path());
    let heldout = data.join("topics-heldout.jsonl");
    let ours = run(Command::new(env!("CARGO_BIN_EXE_loraforge"))
        .args(["classify", "--model"])
        .arg(&model)
        .arg("--adapter")
        .arg(dir.path())
        .arg("--input")
        .arg(&heldout));
    let peft = run(Command::new(venv.join("bin/python"))
        .arg(root().join("scripts/peft_classify.py"))
        .arg("--base")
        .arg(&model)
        .arg("--adapter")
        .arg(dir.path())
        .arg("--input")
        .arg(&heldout));
    let ours: Vec<Value> = ours
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let peft: Vec<Value> = peft
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let gold: Vec<Value> = std::fs::read_to_string(&heldout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(ours.len(), gold.len());
    assert_eq!(peft.len(), gold.len());
    let mut right = 0;
    for ((o, p), g) in ours.iter().zip(&peft).zip(&gold) {
        assert_eq!(o["labels"][0], p["label"], "{g}: loraforge {o} vs PEFT {p}");
        right += usize::from(o["labels"][0] == g["label"]);
    }
    println!(
        "held-out: loraforge and PEFT agree on {0}/{0}; {right} correct",
        gold.len()
    );
}

#[test]
fn minilm_twenty_steps_match_peft() {
    let Some((_, venv)) = minilm() else { return };
    let out = tempfile::tempdir().unwrap();
    let o = run(Command::new("bash")
        .arg(root().join("scripts/peft-parity-bert.sh"))
        .arg(env!("CARGO_BIN_EXE_loraforge"))
        .arg(out.path())
        .env("LORAFORGE_VENV", &venv));
    println!("{o}");
    assert!(o.contains("PEFT load check: OK"), "{o}");
}
