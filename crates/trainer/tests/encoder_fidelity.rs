//! Encoder sequence classification against transformers + PEFT (fixtures from
//! `scripts/make_encoder_fixtures.py`): tokenization, logits with and without an
//! adapter (head included), every LoRA and head gradient, BCE / MSE losses, and
//! 5 AdamW steps of the training loop from PEFT's initial adapter.
//!
//! "Relative" below means max |ours - ref| / max |ref| over the compared tensor.

mod common;

use common::{fixtures, rel};

use candle_core::{Device, Tensor};
use loraforge_trainer::data::ClassInput;
use loraforge_trainer::families::encoder::model::{
    classification_loss, EncodedText, Encoder, ProblemType, Targets,
};
use loraforge_trainer::families::encoder::tokenize::PairTokenizer;
use loraforge_trainer::lora::{self, ForwardCtx};
use loraforge_trainer::train::optim::{AdamWConfig, Scheduler};
use loraforge_trainer::train::{Task, TrainEvent, TrainSpec};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

/// A scratch folder removed on drop.
struct TempDir(PathBuf);
impl TempDir {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("loraforge-enc-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
    fn path(&self) -> &std::path::Path {
        &self.0
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn reference(kind: &str) -> HashMap<String, Tensor> {
    let p = fixtures().join(format!("tiny-{kind}-ref/ref.safetensors"));
    candle_core::safetensors::load(&p, &Device::Cpu).unwrap()
}

/// The reference batch as unpadded examples (right padding, mask 1 then 0).
fn examples(r: &HashMap<String, Tensor>) -> Vec<EncodedText> {
    let ids = r["input_ids"].to_vec2::<i64>().unwrap();
    let types = r["token_type_ids"].to_vec2::<i64>().unwrap();
    let mask = r["attention_mask"].to_vec2::<i64>().unwrap();
    ids.iter()
        .zip(&types)
        .zip(&mask)
        .map(|((i, t), m)| {
            let n = m.iter().filter(|&&x| x == 1).count();
            EncodedText {
                input_ids: i[..n].iter().map(|&x| x as u32).collect(),
                token_type_ids: t[..n].iter().map(|&x| x as u32).collect(),
            }
        })
        .collect()
}

fn model(kind: &str, adapter: Option<&str>) -> Encoder {
    let dir = fixtures().join(format!("tiny-{kind}"));
    let mut m = Encoder::load(&dir, 3, 0, &Device::Cpu).unwrap();
    if let Some(a) = adapter {
        let adir = fixtures().join(format!("tiny-{kind}-ref/{a}"));
        let cfg = lora::read_adapter_config(&adir).unwrap();
        lora::attach(&mut m, &cfg, 0).unwrap();
        lora::load_adapter_weights(&m, &adir).unwrap();
    }
    m
}

fn tokenizer_matches(kind: &str) {
    let r = reference(kind);
    let dir = fixtures().join(format!("tiny-{kind}"));
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join(format!("tiny-{kind}-ref/ref.json"))).unwrap(),
    )
    .unwrap();
    let tok = PairTokenizer::from_dir(&dir, 64).unwrap();
    let pairs = meta["forward"]["pairs"].as_array().unwrap();
    for (pair, want) in pairs.iter().zip(examples(&r)) {
        let input = ClassInput::Text {
            text: pair[0].as_str().unwrap().into(),
            text_pair: pair[1].as_str().map(String::from),
        };
        let got = tok.encode(&input).unwrap();
        assert_eq!(got, want, "{pair}");
    }
}

fn base_logits_match(kind: &str) {
    let r = reference(kind);
    let m = model(kind, None);
    let ex = examples(&r);
    let b = m.batch(&ex.iter().collect::<Vec<_>>()).unwrap();
    let logits = m.logits(&b, &ForwardCtx::eval()).unwrap();
    let d = rel(&logits, &r["logits_base"]);
    println!("{kind} base logits: relative {d:.2e}");
    assert!(d < 1e-4, "{kind} base logits differ: {d:e}");
}

fn lora_logits_and_gradients_match(kind: &str) {
    let r = reference(kind);
    let m = model(kind, Some("adapter_nonzero"));
    let ex = examples(&r);
    let b = m.batch(&ex.iter().collect::<Vec<_>>()).unwrap();
    let ctx = ForwardCtx::train(<rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(0));
    let logits = m.logits(&b, &ctx).unwrap();
    let d = rel(&logits, &r["logits_lora"]);
    println!("{kind} LoRA logits: relative {d:.2e}");
    assert!(d < 1e-4, "{kind} LoRA logits differ: {d:e}");

    let labels: Vec<u32> = r["labels"]
        .to_vec1::<i64>()
        .unwrap()
        .iter()
        .map(|&x| x as u32)
        .collect();
    let (sum, n) = classification_loss(
        &logits,
        ProblemType::SingleLabelClassification,
        &Targets::Classes(labels),
    )
    .unwrap();
    let loss = (sum / n as f64).unwrap();
    let want = r["loss_lora"].to_vec1::<f32>().unwrap()[0];
    let got = loss.to_scalar::<f32>().unwrap();
    assert!(((got - want) / want).abs() < 1e-5, "loss {got} vs {want}");
    let grads = loss.backward().unwrap();
    let params = lora::params(&m);
    let n_ref = r.keys().filter(|k| k.starts_with("grad.")).count();
    assert_eq!(params.len(), n_ref, "every PEFT-trainable tensor is ours");
    let mut worst = 0f64;
    for (name, var) in &params {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient reached {name}"));
        let nz = g
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(nz > 0.0, "{name}: zero gradient");
        let d = rel(g, &r[&format!("grad.{name}")]);
        assert!(d < 1e-3, "{name}: gradient differs, relative {d:e}");
        worst = worst.max(d);
    }
    println!(
        "{kind} gradients ({} tensors): worst relative {worst:.2e}",
        params.len()
    );

    // The other problem types' losses, on the same logits.
    let multi = r["multi_targets"]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let (s, n) = classification_loss(
        &logits,
        ProblemType::MultiLabelClassification,
        &Targets::Values(multi),
    )
    .unwrap();
    let bce = (s / n as f64).unwrap().to_scalar::<f32>().unwrap();
    let want = r["loss_bce"].to_vec1::<f32>().unwrap()[0];
    assert!(((bce - want) / want).abs() < 1e-5, "BCE {bce} vs {want}");
    let reg = r["regression_targets"].to_vec1::<f32>().unwrap();
    let first = logits.narrow(1, 0, 1).unwrap();
    let (s, n) =
        classification_loss(&first, ProblemType::Regression, &Targets::Values(reg)).unwrap();
    let mse = (s / n as f64).unwrap().to_scalar::<f32>().unwrap();
    let want = r["loss_mse"].to_vec1::<f32>().unwrap()[0];
    assert!(((mse - want) / want).abs() < 1e-5, "MSE {mse} vs {want}");
}

/// The shared training loop, from PEFT's initial adapter on the reference batch.
fn five_steps_match(kind: &str) {
    let r = reference(kind);
    let tmp = TempDir::new(kind);
    let data = tmp.path().join("train.jsonl");
    let labels = r["labels"].to_vec1::<i64>().unwrap();
    let lines: Vec<String> = examples(&r)
        .iter()
        .zip(&labels)
        .map(|(e, l)| {
            serde_json::json!({"input_ids": e.input_ids, "token_type_ids": e.token_type_ids, "label": l})
                .to_string()
        })
        .collect();
    std::fs::write(&data, lines.join("\n") + "\n").unwrap();
    let mut spec = TrainSpec::new(
        fixtures().join(format!("tiny-{kind}")),
        data,
        tmp.path().join("out"),
    );
    spec.task = Task::SequenceClassification;
    spec.init_adapter = Some(fixtures().join(format!("tiny-{kind}-ref/adapter_init")));
    spec.batch_size = 4;
    spec.max_steps = Some(5);
    spec.lr = 1e-2;
    spec.scheduler = Scheduler::Constant;
    spec.adamw = AdamWConfig {
        weight_decay: 0.01,
        ..AdamWConfig::default()
    };
    spec.max_grad_norm = 1.0;
    spec.shuffle = false;
    let mut losses = Vec::new();
    loraforge_trainer::train(&spec, &AtomicBool::new(false), &mut |e| {
        if let TrainEvent::Step(m) = e {
            losses.push(m.loss);
        }
    })
    .unwrap();
    let want = r["train_losses"].to_vec1::<f32>().unwrap();
    assert_eq!(losses.len(), want.len());
    for (i, (g, w)) in losses.iter().zip(&want).enumerate() {
        let d = (g - *w as f64).abs() / *w as f64;
        println!(
            "{kind} step {}: loraforge {g:.6} PEFT {w:.6} ({:.4}%)",
            i + 1,
            d * 100.0
        );
        assert!(d < 0.005, "{kind} step {}: {g} vs PEFT {w}", i + 1);
    }
    // The adapter folder is PEFT's SEQ_CLS layout, with the label set next to it.
    let out = tmp.path().join("out");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["task_type"], "SEQ_CLS");
    assert_eq!(
        cfg["modules_to_save"],
        serde_json::json!(["classifier", "score"])
    );
    let labels: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("labels.json")).unwrap()).unwrap();
    assert_eq!(
        labels["id2label"],
        serde_json::json!({"0": "0", "1": "1", "2": "2"})
    );
}

#[test]
fn bert_tokenizer_matches_tokenizers_pairs() {
    tokenizer_matches("bert");
}
#[test]
fn roberta_tokenizer_matches_tokenizers_pairs() {
    tokenizer_matches("roberta");
}
#[test]
fn bert_base_logits_match_transformers() {
    base_logits_match("bert");
}
#[test]
fn roberta_base_logits_match_transformers() {
    base_logits_match("roberta");
}
#[test]
fn bert_lora_logits_and_gradients_match_peft() {
    lora_logits_and_gradients_match("bert");
}
#[test]
fn roberta_lora_logits_and_gradients_match_peft() {
    lora_logits_and_gradients_match("roberta");
}
#[test]
fn bert_five_adamw_steps_match_peft() {
    five_steps_match("bert");
}
#[test]
fn roberta_five_adamw_steps_match_peft() {
    five_steps_match("roberta");
}
