//! Whisper speech recognition against transformers + PEFT, end to end from the zips
//! (fixtures from `scripts/make_whisper_asr_fixture.py`: a tiny random Whisper with a
//! byte-level BPE tokenizer, espeak-ng clips in an audiofolder zip and a pairs zip):
//! the recipe's label ids, the features of every clip as read from the zip, 5 AdamW
//! steps of the training loop from PEFT's initial adapter, and the validation loss and
//! greedy transcriptions at that adapter.

mod common;

use candle_core::{Device, Tensor};
use common::{fixtures, rel};
use loraforge_trainer::archive::ZipLimits;
use loraforge_trainer::families::speech::dataset::read_speech_zip;
use loraforge_trainer::families::speech::features::{LogMel, N_FRAMES};
use loraforge_trainer::families::speech::objective::{features_batch, Asr};
use loraforge_trainer::families::speech::tokenize::WhisperText;
use loraforge_trainer::families::speech::transcribe::greedy;
use loraforge_trainer::lora::{self, ForwardCtx};
use loraforge_trainer::train::optim::{AdamWConfig, Scheduler};
use loraforge_trainer::train::{Objective, Task, TrainEvent, TrainSpec};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

fn model() -> PathBuf {
    fixtures().join("tiny-whisper-asr")
}

fn refdir() -> PathBuf {
    fixtures().join("tiny-whisper-asr-ref")
}

fn reference() -> (HashMap<String, Tensor>, serde_json::Value) {
    let t = candle_core::safetensors::load(refdir().join("ref.safetensors"), &Device::Cpu).unwrap();
    let j =
        serde_json::from_str(&std::fs::read_to_string(refdir().join("ref.json")).unwrap()).unwrap();
    (t, j)
}

fn ids(v: &serde_json::Value) -> Vec<Vec<u32>> {
    serde_json::from_value(v.clone()).unwrap()
}

fn spec(out: &std::path::Path) -> TrainSpec {
    let mut spec = TrainSpec::new(model(), refdir().join("train.zip"), out.to_path_buf());
    spec.task = Task::SpeechRecognition;
    spec.validation = Some(refdir().join("valid.zip"));
    spec.init_adapter = Some(refdir().join("adapter_init"));
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
    spec
}

#[test]
fn transcripts_tokenize_to_the_recipes_labels() {
    let (_, j) = reference();
    let text = WhisperText::load(&model()).unwrap();
    for split in ["train", "valid"] {
        let want = ids(&j[split]["label_ids"]);
        let texts: Vec<String> =
            serde_json::from_value(j[split]["transcriptions"].clone()).unwrap();
        for (t, w) in texts.iter().zip(&want) {
            assert_eq!(&text.full(t, "en").unwrap(), w, "{t:?}");
            // Decoding leaves the prompt and the end out.
            assert_eq!(text.decode(w).unwrap(), *t);
        }
    }
    let e = text.prompt("xx").unwrap_err().to_string();
    assert!(
        e.contains("\"xx\" is not one of the model's (de, en, fr)"),
        "{e}"
    );
    assert_eq!(text.prompt("de").unwrap(), vec![361, 363, 366, 370]);
    assert_eq!(text.suppress, vec![2, 9, 365, 366, 367, 368, 369]);
    assert_eq!(text.begin_suppress, vec![220, 360]);
}

#[test]
fn features_of_the_zipped_clips_match_the_feature_extractor() {
    let (r, j) = reference();
    let data = read_speech_zip(&refdir().join("train.zip"), &ZipLimits::default()).unwrap();
    let files: Vec<String> = serde_json::from_value(j["train"]["files"].clone()).unwrap();
    let names: Vec<&str> = data.examples.iter().map(|u| u.name.as_str()).collect();
    assert_eq!(names, files);
    let mel = LogMel::new(80);
    let clips: Vec<&[f32]> = data.examples.iter().map(|u| u.samples.as_slice()).collect();
    let f = features_batch(&mel, &clips, &Device::Cpu).unwrap();
    assert_eq!(f.dims(), [4, 80, N_FRAMES]);
    let e = rel(&f, &r["input_features"]);
    println!("4 clips: features within {e:.1e} of WhisperFeatureExtractor's");
    assert!(e < 1e-4, "features off by {e:.2e}");
}

#[test]
fn validation_loss_and_greedy_transcripts_match_transformers_at_the_initial_adapter() {
    let (_, j) = reference();
    let tmp = std::env::temp_dir().join(format!("lf-asr-eval-{}", std::process::id()));
    let spec = spec(&tmp);
    let mut obj = Asr::load(&spec).unwrap();
    let adapter = refdir().join("adapter_init");
    let cfg = lora::read_adapter_config(&adapter).unwrap();
    lora::attach(&mut obj.model, &cfg, 0).unwrap();
    lora::load_adapter_weights(&obj.model, &adapter).unwrap();
    let m = obj.evaluate(2, 0).unwrap().unwrap();
    let want = j["valid_loss_init"].as_f64().unwrap();
    println!("validation loss {:.6} (transformers {want:.6})", m.loss);
    assert!((m.loss - want).abs() / want < 1e-5, "{} vs {want}", m.loss);
    // A random model transcribes nothing that matches: every reference word is an error.
    assert!(m.wer.unwrap() >= 1.0, "{:?}", m.wer);

    // Greedy decoding, token for token as generate(language="en", task="transcribe").
    let data = read_speech_zip(&refdir().join("valid.zip"), &ZipLimits::default()).unwrap();
    let mel = LogMel::new(80);
    let ctx = ForwardCtx::eval();
    let prompt = obj.text.prompt("en").unwrap();
    for (u, g) in data
        .examples
        .iter()
        .zip(j["greedy_at_init"].as_array().unwrap())
    {
        let f = features_batch(&mel, &[u.samples.as_slice()], &Device::Cpu).unwrap();
        let states = obj.model.encode(&f, &ctx).unwrap();
        let got = greedy(
            &obj.model,
            &obj.text,
            &states,
            &prompt,
            &ctx,
            &AtomicBool::new(false),
        )
        .unwrap()
        .tokens;
        let want: Vec<u32> = serde_json::from_value(g["ids"].clone()).unwrap();
        assert_eq!(&got[..want.len()], want.as_slice(), "{}", u.name);
    }
    let _ = std::fs::remove_dir_all(&tmp);
}

#[test]
fn five_adamw_steps_from_the_zips_match_peft() {
    let (_, j) = reference();
    let tmp = std::env::temp_dir().join(format!("lf-asr-train-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let out = tmp.join("out");
    let mut spec = spec(&out);
    spec.eval_every = Some(5);
    let (mut losses, mut evals) = (Vec::new(), Vec::new());
    loraforge_trainer::train(&spec, &AtomicBool::new(false), &mut |e| match e {
        TrainEvent::Step(m) => losses.push(m.loss),
        TrainEvent::Eval(e) => evals.push(e.clone()),
        _ => {}
    })
    .unwrap();
    let want: Vec<f64> = serde_json::from_value(j["train_losses"].clone()).unwrap();
    assert_eq!(losses.len(), want.len());
    for (i, (g, w)) in losses.iter().zip(&want).enumerate() {
        let d = (g - w).abs() / w;
        println!(
            "step {}: loraforge {g:.6} PEFT {w:.6} ({:.5}%)",
            i + 1,
            d * 100.0
        );
        assert!(d < 1e-5, "step {}: {g} vs PEFT {w}", i + 1);
    }
    let last = evals.last().expect("an evaluation at the last step");
    assert!(last.wer.is_some() && last.loss.is_finite(), "{last:?}");
    // The adapter is PEFT's, the task type left unset as the Whisper recipes leave it.
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(
        cfg["target_modules"],
        serde_json::json!(["q_proj", "v_proj"])
    );
    // Every trained tensor is where PEFT's 5 steps left it.
    let (r, _) = reference();
    let ours = candle_core::safetensors::load(out.join("adapter_model.safetensors"), &Device::Cpu)
        .unwrap();
    assert_eq!(ours.len(), 24);
    let mut worst = 0f64;
    for (k, t) in &ours {
        let e = rel(t, &r[&format!("final.{k}")]);
        worst = worst.max(e);
        assert!(e < 1e-4, "{k}: off by {e:.2e}");
    }
    println!("24 adapter tensors after 5 steps within {worst:.1e} of PEFT's");
    let _ = std::fs::remove_dir_all(&tmp);
}
