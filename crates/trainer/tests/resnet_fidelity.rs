//! ResNet image classification against transformers + PEFT (fixtures from
//! `scripts/make_resnet_fixtures.py`): logits with and without the adapter, the cross
//! entropy, every LoRA and head gradient, and the adapter files; then ImageFolder zips
//! and a short training run through the family.
//!
//! "Relative" below means max |ours - ref| / max |ref| over the compared tensor.

mod common;

use candle_core::{Device, Tensor};
use common::{fixtures, rel};
use loraforge_trainer::families::encoder::model::{classification_loss, ProblemType, Targets};
use loraforge_trainer::families::vision::dataset::read_labelled_zip;
use loraforge_trainer::families::vision::resnet::ResNet;
use loraforge_trainer::lora::{self, ForwardCtx, LoraConfig};
use loraforge_trainer::train::{Task, TrainEvent, TrainSpec};
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::AtomicBool;

fn labels_of(model: &Path) -> Vec<String> {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("config.json")).unwrap()).unwrap();
    let m = v["id2label"].as_object().unwrap();
    (0..m.len())
        .map(|i| m[&i.to_string()].as_str().unwrap().to_string())
        .collect()
}

fn check_against_peft(name: &str) {
    let model_dir = fixtures().join(name);
    let ref_dir = fixtures().join("tiny-resnet-ref").join(name);
    let adapter = ref_dir.join("adapter");
    let r: HashMap<String, Tensor> =
        candle_core::safetensors::load(ref_dir.join("ref.safetensors"), &Device::Cpu).unwrap();
    let labels = labels_of(&model_dir);
    let mut m = ResNet::load(&model_dir, &labels, 0, &Device::Cpu).unwrap();
    let cfg = lora::read_adapter_config(&adapter).unwrap();
    let resolved = lora::attach(&mut m, &cfg, 3).unwrap();
    assert_eq!(resolved, m.cfg.conv_paths(), "every convolution is adapted");
    lora::load_adapter_weights(&m, &adapter).unwrap();

    let x = &r["pixel_values"];
    let base = m.logits(x, &ForwardCtx::reference()).unwrap();
    let e = rel(&base, &r["base_logits"]);
    assert!(e < 1e-5, "{name}: base logits off by {e:.2e}");
    let logits = m.logits(x, &ForwardCtx::eval()).unwrap();
    let e = rel(&logits, &r["logits"]);
    assert!(e < 1e-5, "{name}: LoRA logits off by {e:.2e}");
    assert!(
        rel(&logits, &base) > 1e-2,
        "{name}: the adapter changes nothing"
    );

    let classes: Vec<u32> = r["labels"]
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|c| c as u32)
        .collect();
    let n = classes.len();
    let (sum, units) = classification_loss(
        &logits,
        ProblemType::SingleLabelClassification,
        &Targets::Classes(classes),
    )
    .unwrap();
    assert_eq!(units, n);
    let loss = (sum / n as f64).unwrap();
    let e = rel(&loss.reshape(1).unwrap(), &r["loss"]);
    assert!(e < 1e-5, "{name}: loss off by {e:.2e}");
    let grads = loss.backward().unwrap();
    let params = lora::params(&m);
    let mut worst = 0f64;
    assert_eq!(
        params.len(),
        2 * resolved.len() + 2,
        "LoRA pairs and the head"
    );
    for (key, var) in &params {
        let want = &r[&format!("grad.{key}")];
        let got = grads.get(var.as_tensor()).unwrap();
        let got = got.reshape(want.shape()).unwrap();
        let e = rel(&got, want);
        assert!(e < 1e-4, "{name}: {key}: gradient off by {e:.2e}");
        worst = worst.max(e);
    }
    println!(
        "{name}: logits within {:.1e}, {} gradients within {worst:.1e} of PEFT",
        rel(&logits, &r["logits"]),
        params.len()
    );

    // What we save is what PEFT saved: the same keys, shapes and config fields.
    let saved = tempfile::tempdir().unwrap();
    let meta = lora::AdapterMeta {
        base_model_name_or_path: name.into(),
        task_type: String::new(),
        target_modules: cfg.targets.to_peft(&resolved),
        modules_to_save: vec!["classifier".into()],
    };
    lora::save_adapter(&m, &cfg, &meta, saved.path()).unwrap();
    let shapes = |p: &Path| -> Vec<(String, Vec<usize>)> {
        let t = candle_core::safetensors::load(p.join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap();
        let mut v: Vec<_> = t.into_iter().map(|(k, t)| (k, t.dims().to_vec())).collect();
        v.sort();
        v
    };
    assert_eq!(shapes(saved.path()), shapes(&adapter), "{name}");
    let ours: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(saved.path().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(ours["modules_to_save"], serde_json::json!(["classifier"]));
    assert_eq!(ours["task_type"], serde_json::Value::Null);
}

#[test]
fn basic_resnet_logits_gradients_and_adapter_files_match_peft() {
    check_against_peft("tiny-resnet");
}

#[test]
fn bottleneck_resnet_of_one_channel_matches_peft() {
    check_against_peft("tiny-resnet-bottleneck");
}

/// A PNG of `w`×`h` whose colour leans on `class` (so that a few steps can learn it).
fn png(class: usize, seed: usize, w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        let v = ((x as usize * 7 + y as usize * 13 + seed * 31) % 64) as u8;
        let mut p = [v, v, v];
        p[class % 3] = p[class % 3].saturating_add(150);
        image::Rgb(p)
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

fn write_zip(path: &Path, entries: &[(String, Vec<u8>)]) {
    let mut z = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    for (name, bytes) in entries {
        z.start_file(name.as_str(), zip::write::SimpleFileOptions::default())
            .unwrap();
        z.write_all(bytes).unwrap();
    }
    z.finish().unwrap();
}

fn class_zip(path: &Path, classes: &[&str], per_class: usize) {
    let mut entries = Vec::new();
    for (c, name) in classes.iter().enumerate() {
        for i in 0..per_class {
            entries.push((format!("pets/{name}/{i:03}.png"), png(c, i, 32, 32)));
        }
    }
    entries.push(("pets/README.txt".into(), b"not an image".to_vec()));
    write_zip(path, &entries);
}

#[test]
fn image_folder_zips_are_read_by_their_folders() {
    let dir = tempfile::tempdir().unwrap();
    let z = dir.path().join("train.zip");
    class_zip(&z, &["dog", "cat", "bird"], 2);
    let d = read_labelled_zip(&z, &Default::default(), &|i| Ok(i.clone())).unwrap();
    assert_eq!(d.labels(), ["bird", "cat", "dog"]);
    assert_eq!(d.report.images, 6);
    assert_eq!(d.report.ignored, ["pets/README.txt"]);
    // Integer folders keep their values as ids.
    class_zip(&z, &["10", "2", "1"], 1);
    let d = read_labelled_zip(&z, &Default::default(), &|i| Ok(i.clone())).unwrap();
    assert_eq!(d.labels(), ["1", "2", "10"]);
    // An image with no folder has no label.
    write_zip(
        &z,
        &[
            ("cat/a.png".into(), png(0, 0, 8, 8)),
            ("b.png".into(), png(1, 0, 8, 8)),
        ],
    );
    let e = read_labelled_zip(&z, &Default::default(), &|i| Ok(i.clone()))
        .unwrap_err()
        .to_string();
    assert!(e.contains("\"b.png\" is in no folder"), "{e}");
    // Entries that escape the archive are refused before anything is read.
    write_zip(&z, &[("../cat/a.png".into(), png(0, 0, 8, 8))]);
    let e = read_labelled_zip(&z, &Default::default(), &|i| Ok(i.clone()))
        .unwrap_err()
        .to_string();
    assert!(e.contains("escapes the archive"), "{e}");
}

fn spec(dir: &Path, validation: Option<&Path>) -> TrainSpec {
    let mut s = TrainSpec::new(
        fixtures().join("tiny-resnet"),
        dir.join("train.zip"),
        dir.join("out"),
    );
    s.task = Task::ImageClassification;
    s.lora = LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        targets: lora::Targets::parse("convolution").unwrap(),
        ..LoraConfig::default()
    };
    s.validation = validation.map(Path::to_path_buf);
    s.max_steps = Some(6);
    s.batch_size = 4;
    s.lr = 1e-2;
    s.eval_every = Some(3);
    s.options = loraforge_trainer::families::for_task(Task::ImageClassification)
        .options(&serde_json::json!({}))
        .unwrap();
    s
}

#[test]
fn a_run_trains_lora_and_a_new_head_and_reports_accuracy() {
    let dir = tempfile::tempdir().unwrap();
    class_zip(&dir.path().join("train.zip"), &["cat", "dog"], 6);
    class_zip(&dir.path().join("valid.zip"), &["cat", "dog"], 2);
    let s = spec(dir.path(), Some(&dir.path().join("valid.zip")));
    let mut losses = Vec::new();
    let mut evals = Vec::new();
    loraforge_trainer::train(&s, &AtomicBool::new(false), &mut |e| match e {
        TrainEvent::Step(m) => losses.push(m.loss),
        TrainEvent::Eval(m) => evals.push(m.clone()),
        _ => {}
    })
    .unwrap();
    assert_eq!(losses.len(), 6);
    assert!(losses.iter().all(|l| l.is_finite()), "{losses:?}");
    let last = evals.last().expect("validation metrics");
    assert!(last.accuracy.is_some() && last.macro_f1.is_some());
    let out = dir.path().join("out");
    let labels: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("labels.json")).unwrap()).unwrap();
    assert_eq!(
        labels["id2label"],
        serde_json::json!({"0": "cat", "1": "dog"})
    );
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["modules_to_save"], serde_json::json!(["classifier"]));
    // The tiny model's head has 3 labels: a 2-label run trains a new one.
    let w = candle_core::safetensors::load(out.join("adapter_model.safetensors"), &Device::Cpu)
        .unwrap();
    assert_eq!(w["base_model.model.classifier.1.weight"].dims(), [2, 16]);

    // The classifier reads the adapter folder back.
    let c = loraforge_trainer::families::vision::classify::ImageClassifier::load(
        &fixtures().join("tiny-resnet"),
        &out,
        &Device::Cpu,
    )
    .unwrap();
    let img = image::load_from_memory(&png(0, 1, 40, 36))
        .unwrap()
        .to_rgb8();
    let p = c.predict(&[img]).unwrap();
    let total: f32 = p[0].scores.iter().map(|(_, s)| s).sum();
    assert!((total - 1.0).abs() < 1e-5, "{p:?}");
}

#[test]
fn validation_labels_must_be_training_labels() {
    let dir = tempfile::tempdir().unwrap();
    class_zip(&dir.path().join("train.zip"), &["cat", "dog"], 2);
    class_zip(&dir.path().join("valid.zip"), &["cat", "fox"], 1);
    let s = spec(dir.path(), Some(&dir.path().join("valid.zip")));
    let e = loraforge_trainer::train(&s, &AtomicBool::new(false), &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("valid.zip") && e.contains("label \"fox\""),
        "{e}"
    );
    class_zip(&dir.path().join("train.zip"), &["cat"], 3);
    let e = loraforge_trainer::train(
        &spec(dir.path(), None),
        &AtomicBool::new(false),
        &mut |_| {},
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("at least two"), "{e}");
}
