//! Image classification through the API on the tiny ResNet fixture: ImageFolder zips
//! checked at upload, task/file/target checks at job creation, a job with validation
//! whose metrics arrive over SSE, the adapter download, `loraforge classify --image`, and
//! PEFT loading that download and classifying the same images as we do
//! (`scripts/peft_classify_image.py`; skipped without the venv unless
//! `LORAFORGE_REQUIRE_REAL_MODELS=1`, as CI sets).

use crate::common;
use common::{run, unzip};

use common::{copy_dir, create_job, get_json, read_sse, root, wait_status, Backend, TestServer};
use serde_json::{json, Value};
use std::io::Write;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

/// A 32×32 PNG whose colour leans on `class`, textured by `seed`.
fn png(class: usize, seed: usize) -> Vec<u8> {
    let img = image::RgbImage::from_fn(32, 32, |x, y| {
        let v = ((x as usize * 7 + y as usize * 13 + seed * 31) % 64) as u8;
        let mut p = [v, v, v];
        p[class % 3] = p[class % 3].saturating_add(150);
        image::Rgb(p)
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

fn zip_of(entries: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut buf = std::io::Cursor::new(Vec::new());
    {
        let mut z = zip::ZipWriter::new(&mut buf);
        for (name, bytes) in entries {
            z.start_file(name.as_str(), zip::write::SimpleFileOptions::default())
                .unwrap();
            z.write_all(bytes).unwrap();
        }
        z.finish().unwrap();
    }
    buf.into_inner()
}

const CLASSES: [&str; 3] = ["bird", "cat", "dog"];

fn class_zip(per_class: usize, offset: usize) -> Vec<u8> {
    let mut entries = Vec::new();
    for (c, name) in CLASSES.iter().enumerate() {
        for i in 0..per_class {
            entries.push((format!("{name}/{i:03}.png"), png(c, offset + i)));
        }
    }
    zip_of(&entries)
}

async fn upload_zip(s: &TestServer, name: &str, body: Vec<u8>) -> Value {
    let (code, f) = common::upload_as(s, name, "application/zip", body).await;
    assert_eq!(code, 200, "{f}");
    f
}

#[tokio::test]
async fn a_tiny_resnet_trains_through_the_api_and_classifies_as_peft_does() {
    let s = TestServer::start(Backend::Sqlite, &[]).await;
    let fixtures = root().join("tests/fixtures");
    copy_dir(
        &fixtures.join("tiny-resnet"),
        &s.models_dir().join("tiny-resnet"),
    );
    let m = get_json(&s, "/v1/models/tiny-resnet").await;
    assert_eq!(m["tasks"], json!(["image_classification"]), "{m}");
    assert_eq!(m["architecture"], "resnet", "{m}");

    // Upload checks: an image outside any class folder, one class only, a path escape.
    let loose = zip_of(&[
        ("cat/a.png".into(), png(1, 0)),
        ("dog/b.png".into(), png(2, 0)),
        ("c.png".into(), png(0, 0)),
    ]);
    // A root image makes the zip a captioned one by its names; it has no captions either.
    let f = upload_zip(&s, "loose.zip", loose).await;
    assert_eq!(f["status"], "error", "{f}");
    assert!(
        f["status_details"]
            .as_str()
            .unwrap_or_default()
            .contains("a folder named for its class"),
        "{f}"
    );
    let one = zip_of(&[
        ("cat/a.png".into(), png(1, 0)),
        ("cat/b.png".into(), png(1, 1)),
    ]);
    let f = upload_zip(&s, "one.zip", one).await;
    assert_eq!(f["status"], "error", "{f}");
    let escape = zip_of(&[
        ("cat/a.png".into(), png(1, 0)),
        ("../dog/b.png".into(), png(2, 0)),
    ]);
    let f = upload_zip(&s, "escape.zip", escape).await;
    assert_eq!(f["status"], "error", "{f}");
    assert!(
        f["status_details"]
            .as_str()
            .unwrap_or_default()
            .contains("escapes the archive"),
        "{f}"
    );

    // Folders named like kohya's `10_name` read as captioned SD images (class words as
    // captions): such a zip cannot train a classifier, and the refusal says why.
    let kohya = zip_of(&[
        ("1_cat/a.png".into(), png(1, 0)),
        ("2_dog/b.png".into(), png(2, 0)),
    ]);
    let kohya = upload_zip(&s, "numbered.zip", kohya).await;
    assert_eq!(kohya["format"], "image_zip", "{kohya}");
    let (st, e) = create_job(
        &s,
        json!({"model": "tiny-resnet", "training_file": kohya["id"], "task": "image_classification"}),
    )
    .await;
    assert_eq!(st, 400, "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("kohya's 10_name"),
        "{e}"
    );

    let train = upload_zip(&s, "pets.zip", class_zip(8, 0)).await;
    assert_eq!(train["status"], "processed", "{train}");
    assert_eq!(train["format"], "image_classes", "{train}");
    let details = train["status_details"].as_str().unwrap_or_default();
    assert!(
        details.contains("24 image(s) in 3 classes: bird 8, cat 8, dog 8"),
        "{train}"
    );
    let train = train["id"].as_str().unwrap().to_string();
    let valid = upload_zip(&s, "pets-valid.zip", class_zip(2, 100)).await;
    assert_eq!(valid["format"], "image_classes", "{valid}");
    let valid = valid["id"].as_str().unwrap().to_string();

    // Job creation: files, task and targets must fit the model.
    let chat = common::upload_chat(&s).await;
    let cases = [
        (
            json!({"model": "tiny-resnet", "training_file": chat, "task": "image_classification"}),
            "training_file",
            "cannot train task image_classification",
        ),
        (
            json!({"model": "tiny-resnet", "training_file": train}),
            "task",
            "cannot be trained for task causal_lm",
        ),
        (
            json!({"model": "tiny-resnet", "training_file": train, "task": "image_classification",
                   "hyperparameters": {"lora_target_modules": "all-linear"}}),
            "hyperparameters.lora_target_modules",
            "all-linear takes no module",
        ),
        (
            json!({"model": "tiny-resnet", "training_file": train, "task": "image_classification",
                   "hyperparameters": {"lora_target_modules": ["convolutions"]}}),
            "hyperparameters.lora_target_modules",
            "\"convolutions\" is no module of tiny-resnet",
        ),
    ];
    for (body, param, msg) in cases {
        let (st, e) = create_job(&s, body.clone()).await;
        assert_eq!(st, 400, "{body}: {e}");
        assert_eq!(e["error"]["param"], param, "{body}: {e}");
        let m = e["error"]["message"].as_str().unwrap();
        assert!(m.contains(msg), "{body}: {m}");
    }

    let (st, job) = create_job(
        &s,
        json!({"model": "tiny-resnet", "training_file": train, "validation_file": valid,
               "task": "image_classification", "seed": 5,
               "hyperparameters": {"n_epochs": 3, "batch_size": 8, "learning_rate": 1e-2,
                                   "eval_interval": 3}}),
    )
    .await;
    assert_eq!(st, 200, "{job}");
    assert_eq!(job["task"], "image_classification");
    assert_eq!(
        job["hyperparameters"]["lora_target_modules"],
        json!(["convolution"])
    );
    let id = job["id"].as_str().unwrap().to_string();
    let frames = read_sse(&s, &id, None, None).await;
    assert_eq!(frames.last().unwrap().1, "done", "{frames:?}");
    let metrics: Vec<Value> = frames
        .iter()
        .filter(|f| f.1 == "metrics")
        .map(|f| serde_json::from_str(&f.2).unwrap())
        .collect();
    let steps = metrics
        .iter()
        .filter(|m| {
            m["message"]
                .as_str()
                .unwrap_or_default()
                .contains("training loss=")
        })
        .count();
    assert_eq!(steps, 9, "one metrics event per step: {frames:?}");
    let evals: Vec<&Value> = metrics
        .iter()
        .filter(|m| m["data"]["valid_accuracy"].is_number())
        .collect();
    assert!(
        !evals.is_empty(),
        "no validation metrics over SSE: {metrics:?}"
    );
    assert!(evals[0]["data"]["valid_macro_f1"].is_number(), "{evals:?}");
    let done = wait_status(&s, &id, &["succeeded", "failed"], Duration::from_secs(60)).await;
    assert_eq!(done["status"], "succeeded", "{done}\n{}", s.logs());

    let r = reqwest::get(s.url(&format!("/v1/fine_tuning/jobs/{id}/adapter")))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let dir = tempfile::tempdir().unwrap();
    let names = unzip(&r.bytes().await.unwrap(), dir.path());
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
        json!({"0": "bird", "1": "cat", "2": "dog"})
    );
    let cfg: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["modules_to_save"], json!(["classifier"]), "{cfg}");
    assert_eq!(cfg["task_type"], Value::Null, "{cfg}");

    // Classifiers do not chat: a clear 400 naming the model, for the base and the adapter.
    for m in [json!("tiny-resnet"), done["fine_tuned_model"].clone()] {
        let e = common::chat_refused(&s, &m).await;
        let msg = e["error"]["message"].as_str().unwrap_or_default();
        assert!(msg.contains("--image"), "{e}");
    }

    // The CLI and PEFT classify the same held-out images alike.
    let images: Vec<PathBuf> = (0..3)
        .map(|c| {
            let p = dir.path().join(format!("held-{c}.png"));
            std::fs::write(&p, png(c, 500 + c)).unwrap();
            p
        })
        .collect();
    let model = s.models_dir().join("tiny-resnet");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_loraforge"));
    cmd.args(["classify", "--model"])
        .arg(&model)
        .arg("--adapter")
        .arg(dir.path());
    for p in &images {
        cmd.arg("--image").arg(p);
    }
    let ours: Vec<Value> = run(&mut cmd)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(ours.len(), 3);
    for o in &ours {
        let sum: f64 = o["scores"]
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_f64().unwrap())
            .sum();
        assert!((sum - 1.0).abs() < 1e-4, "{o}");
    }
    let Some(python) = common::venv_python() else {
        return;
    };
    let mut cmd = Command::new(&python);
    cmd.arg(root().join("scripts/peft_classify_image.py"))
        .arg("--base")
        .arg(&model)
        .arg("--adapter")
        .arg(dir.path());
    for p in &images {
        cmd.arg("--image").arg(p);
    }
    let peft: Vec<Value> = run(&mut cmd)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(peft.len(), 3);
    for (o, p) in ours.iter().zip(&peft) {
        assert_eq!(o["labels"][0], p["label"], "loraforge {o} vs PEFT {p}");
        for (i, name) in CLASSES.iter().enumerate() {
            let a = o["scores"][name].as_f64().unwrap();
            let b = p["scores"][i].as_f64().unwrap();
            assert!((a - b).abs() < 1e-4, "{name}: loraforge {o} vs PEFT {p}");
        }
    }
    println!("loraforge and PEFT: {ours:?} / {peft:?}");
}

/// The README's demonstration (`scripts/digits_demo.py`): scikit-learn's 8×8 digits
/// through the API on a seeded random small ResNet, LoRA on its convolutions and a new
/// head; validation accuracy must clearly beat chance (0.10).
#[test]
fn the_digits_demonstration_beats_chance_by_far() {
    let Some(python) = common::venv_python() else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let out = run(Command::new(&python)
        .arg(root().join("scripts/digits_demo.py"))
        .arg("--bin")
        .arg(env!("CARGO_BIN_EXE_loraforge"))
        .arg("--work")
        .arg(work.path()));
    println!("{out}");
    let acc: f64 = out
        .lines()
        .find_map(|l| l.split("final validation accuracy ").nth(1))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no final accuracy in:\n{out}"));
    assert!(
        acc > 0.5,
        "validation accuracy {acc} is not clearly above chance (0.10)"
    );
}
