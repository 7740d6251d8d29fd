//! Whisper against transformers + PEFT (fixtures from `scripts/make_whisper_fixture.py`):
//! logits with and without LoRA on `q_proj`/`v_proj`, the label cross entropy, and the
//! gradient of every A and B.
//!
//! "Relative" below means max |ours - ref| / max |ref| over the compared tensor.

mod common;

use candle_core::{Device, Tensor};
use common::{fixtures, rel};
use loraforge_trainer::families::speech::whisper::Whisper;
use loraforge_trainer::lora::{self, ForwardCtx};
use std::collections::HashMap;

#[test]
fn whisper_logits_loss_and_lora_gradients_match_peft() {
    let dir = fixtures().join("tiny-whisper-ref");
    let r: HashMap<String, Tensor> =
        candle_core::safetensors::load(dir.join("ref.safetensors"), &Device::Cpu).unwrap();
    let mut m = Whisper::load(&fixtures().join("tiny-whisper"), &Device::Cpu).unwrap();
    let adapter = dir.join("adapter");
    let cfg = lora::read_adapter_config(&adapter).unwrap();
    let resolved = lora::attach(&mut m, &cfg, 1).unwrap();
    // q and v of 2 encoder self-attentions, 2 decoder self- and 2 cross-attentions.
    assert_eq!(resolved.len(), 12, "{resolved:?}");
    lora::load_adapter_weights(&m, &adapter).unwrap();

    let feats = &r["input_features"];
    let ids = r["decoder_input_ids"]
        .to_dtype(candle_core::DType::U32)
        .unwrap();
    let (b, t) = ids.dims2().unwrap();
    let vocab = m.cfg.vocab_size;
    let logits = |ctx: &ForwardCtx| {
        let states = m.encode(feats, ctx).unwrap();
        m.decode(&states, &ids, ctx)
            .unwrap()
            .reshape((b, t, vocab))
            .unwrap()
    };
    let e = rel(&logits(&ForwardCtx::reference()), &r["base_logits"]);
    assert!(e < 1e-5, "base logits off by {e:.2e}");
    let ours = logits(&ForwardCtx::eval());
    let e = rel(&ours, &r["logits"]);
    assert!(e < 1e-5, "LoRA logits off by {e:.2e}");

    let labels: Vec<i64> = r["labels"].flatten_all().unwrap().to_vec1().unwrap();
    let (sum, n) = m
        .loss_sum(feats, &ids, &labels, &ForwardCtx::eval())
        .unwrap();
    assert_eq!(n, labels.iter().filter(|&&l| l >= 0).count());
    let loss = (sum / n as f64).unwrap();
    let e = rel(&loss.reshape(1).unwrap(), &r["loss"]);
    assert!(e < 1e-5, "loss off by {e:.2e}");
    let grads = loss.backward().unwrap();
    let params = lora::params(&m);
    assert_eq!(params.len(), 24);
    let mut worst = 0f64;
    for (key, var) in &params {
        let got = grads
            .get(var.as_tensor())
            .expect("every A and B gets a gradient");
        let e = rel(got, &r[&format!("grad.{key}")]);
        assert!(e < 1e-4, "{key}: gradient off by {e:.2e}");
        worst = worst.max(e);
    }
    println!(
        "whisper: logits within {:.1e}, 24 LoRA gradients within {worst:.1e} of PEFT",
        rel(&ours, &r["logits"])
    );
}
