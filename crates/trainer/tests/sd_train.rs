//! Text-to-image LoRA training on the tiny SD fixture and the fixture image zip
//! (`tests/data/sd/kohya.zip`), through `train::train` as the CLI and workers run it:
//! the same seed reproduces the same loss sequence exactly, and the trained adapter
//! lowers the loss on fixed noise and timesteps (the per-step loss itself is too noisy,
//! with a random timestep per sample, to show learning in a few dozen steps).

mod common;

use common::fixtures;

use loraforge_trainer::families::diffusion::objective::TextToImage;
use loraforge_trainer::families::for_task;
use loraforge_trainer::lora::{self, ForwardCtx, LoraConfig, Targets};
use loraforge_trainer::train::optim::Scheduler;
use loraforge_trainer::train::{Objective, Task, TrainEvent, TrainSpec};
use rand_chacha::rand_core::SeedableRng;
use std::sync::atomic::AtomicBool;

/// The fixture dataset: kohya folders, 3 images, 22 rows with repeats.
fn spec(seed: u64, steps: u64, out: &std::path::Path) -> TrainSpec {
    let mut spec = TrainSpec::new(
        fixtures().join("sd-tiny"),
        fixtures().join("../data/sd/kohya.zip"),
        out.to_path_buf(),
    );
    spec.task = Task::TextToImage;
    spec.lora = LoraConfig {
        r: 4,
        alpha: 4.0,
        dropout: 0.0,
        targets: Targets::parse("to_q,to_k,to_v,to_out.0").unwrap(),
        use_rslora: false,
    };
    spec.max_steps = Some(steps);
    spec.batch_size = 4;
    spec.lr = 3e-3;
    spec.scheduler = Scheduler::Constant;
    spec.seed = seed;
    spec
}

/// The mean loss over every row under 8 fixed draws of latents, noise and timesteps.
fn fixed_loss(obj: &TextToImage) -> f64 {
    let rows: Vec<usize> = (0..obj.len()).collect();
    let b = obj.batch(&rows).unwrap();
    let mut total = 0.0;
    for seed in 0..8 {
        let ctx = ForwardCtx::train(rand_chacha::ChaCha8Rng::seed_from_u64(1000 + seed));
        total += obj.loss_sum(&b, &ctx).unwrap().to_scalar::<f32>().unwrap() as f64;
    }
    total / (8 * rows.len()) as f64
}

fn run(seed: u64, steps: u64, out: &std::path::Path) -> Vec<f64> {
    let mut losses = Vec::new();
    loraforge_trainer::train(&spec(seed, steps, out), &AtomicBool::new(false), &mut |e| {
        if let TrainEvent::Step(m) = e {
            losses.push(m.loss);
        }
    })
    .unwrap();
    losses
}

#[test]
fn a_resolution_the_unet_cannot_divide_is_refused_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = spec(7, 1, dir.path());
    s.options = for_task(Task::TextToImage)
        .options(&serde_json::json!({"resolution": 30}))
        .unwrap();
    let e = TextToImage::load(&s).err().unwrap().to_string();
    assert!(e.contains("multiples of 4"), "{e}");
}

#[test]
fn the_loss_falls_and_a_seed_reproduces_it() {
    let dir = tempfile::tempdir().unwrap();
    let a = run(7, 40, &dir.path().join("a"));
    let b = run(7, 40, &dir.path().join("b"));
    assert_eq!(a.len(), 40);
    assert_eq!(a, b, "same seed, different losses");
    let c = run(8, 3, &dir.path().join("c"));
    assert_ne!(
        a[..3],
        c[..],
        "another seed draws other noise and timesteps"
    );
    let before = fixed_loss(&TextToImage::load(&spec(7, 1, dir.path())).unwrap());
    let mut trained = TextToImage::load(&spec(7, 1, dir.path())).unwrap();
    let adapter = dir.path().join("a");
    let cfg = lora::read_adapter_config(&adapter).unwrap();
    lora::attach(trained.model_mut(), &cfg, 0).unwrap();
    lora::load_adapter_weights(trained.model(), &adapter).unwrap();
    let after = fixed_loss(&trained);
    println!(
        "text-to-image: per-step loss {:.4} (first) .. {:.4} (last); on fixed draws {before:.4} -> {after:.4}",
        a[0], a[39]
    );
    assert!(
        after < 0.95 * before,
        "the adapter did not lower the loss: {before} -> {after}"
    );
    assert!(dir.path().join("a/adapter_model.safetensors").is_file());
    assert!(dir.path().join("a/kohya.safetensors").is_file());
}

#[test]
fn a_checkpoint_resumes_only_with_its_image_settings() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let mut s = spec(7, 2, &out);
    s.checkpoint_every = Some(1);
    loraforge_trainer::train(&s, &AtomicBool::new(false), &mut |_| {}).unwrap();
    let mut other = spec(7, 3, &out);
    other.resume = Some(out.clone());
    other.options = for_task(Task::TextToImage)
        .options(&serde_json::json!({"noise_offset": 0.1}))
        .unwrap();
    let e = loraforge_trainer::train(&other, &AtomicBool::new(false), &mut |_| {})
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("noise_offset 0.1") && e.contains("noise_offset 0"),
        "{e}"
    );
    let mut same = spec(7, 3, &out);
    same.resume = Some(out.clone());
    let mut resumed = None;
    loraforge_trainer::train(&same, &AtomicBool::new(false), &mut |e| {
        if let TrainEvent::Started { resumed_from, .. } = e {
            resumed = *resumed_from;
        }
    })
    .unwrap();
    assert!(resumed.is_some_and(|s| s >= 1), "{resumed:?}");
}

/// LoCon through the trainer: naming the UNet's resnet and sampler convolutions trains
/// conv LoRA on them (every conv B leaves zero), and the run's kohya file carries them
/// 4-D with kohya's names and `conv_dim` in `ss_network_args`.
#[test]
fn locon_targets_train_the_convolutions_and_reach_the_kohya_file() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("locon");
    let mut s = spec(7, 3, &out);
    s.lora.targets =
        Targets::parse("to_q,to_k,to_v,to_out.0,conv1,conv2,downsamplers.0.conv").unwrap();
    loraforge_trainer::train(&s, &AtomicBool::new(false), &mut |_| {}).unwrap();
    let peft = candle_core::safetensors::load(
        out.join("adapter_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let b = &peft["base_model.model.down_blocks.0.resnets.0.conv1.lora_B.weight"];
    assert_eq!(b.dims(), [32, 4, 1, 1]);
    assert!(common::max_abs(b) > 0.0, "conv1's B did not train");
    let kohya = out.join(loraforge_trainer::families::diffusion::objective::KOHYA_FILE);
    let k = candle_core::safetensors::load(&kohya, &candle_core::Device::Cpu).unwrap();
    let down = &k["lora_unet_down_blocks_0_downsamplers_0_conv.lora_down.weight"];
    assert_eq!(down.dims(), [4, 32, 3, 3]);
    let bytes = std::fs::read(&kohya).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = header.metadata().clone().unwrap_or_default();
    let args: serde_json::Value = serde_json::from_str(&meta["ss_network_args"]).unwrap();
    assert_eq!(
        args,
        serde_json::json!({"conv_dim": "4", "conv_alpha": "4.0"})
    );
}
