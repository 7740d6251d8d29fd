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
        ..LoraConfig::default()
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

/// LoCon through the trainer, as kohya's `conv_dim 2 / conv_alpha 1` runs it: the
/// resnets' and samplers' convolutions train (every conv B leaves zero), the 3x3 ones at
/// rank 2 and the rest at the run's 4; the kohya file carries them 4-D with kohya's names
/// and `conv_dim`/`conv_alpha` in `ss_network_args`; the PEFT folder names the 3x3 ones
/// in `rank_pattern`/`alpha_pattern` and loads back into a fresh UNet as trained.
#[test]
fn locon_trains_the_convolutions_at_their_rank_and_exports_them() {
    use loraforge_trainer::families::diffusion::unet::UNet;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("locon");
    let mut s = spec(7, 3, &out);
    s.lora.targets = Targets::parse(
        &loraforge_trainer::families::diffusion::with_locon_targets("to_q,to_k,to_v,to_out.0")
            .unwrap(),
    )
    .unwrap();
    s.lora.conv_r = Some(2);
    s.lora.conv_alpha = Some(1.0);
    loraforge_trainer::train(&s, &AtomicBool::new(false), &mut |_| {}).unwrap();
    let cpu = candle_core::Device::Cpu;
    let peft = candle_core::safetensors::load(out.join("adapter_model.safetensors"), &cpu).unwrap();
    let key = |p: &str, w: &str| format!("base_model.model.{p}.lora_{w}.weight");
    let b = &peft[&key("down_blocks.0.resnets.0.conv1", "B")];
    assert_eq!(b.dims(), [32, 2, 1, 1]);
    assert!(common::max_abs(b) > 0.0, "conv1's B did not train");
    let shortcut = &peft[&key("down_blocks.1.resnets.0.conv_shortcut", "A")];
    assert_eq!(
        shortcut.dims(),
        [4, 32, 1, 1],
        "a 1x1 convolution takes the run's rank"
    );
    assert_eq!(
        peft[&key("down_blocks.0.resnets.0.time_emb_proj", "A")].dims()[0],
        4
    );

    let kohya = out.join(loraforge_trainer::families::diffusion::objective::KOHYA_FILE);
    let k = candle_core::safetensors::load(&kohya, &cpu).unwrap();
    let down = &k["lora_unet_down_blocks_0_downsamplers_0_conv.lora_down.weight"];
    assert_eq!(down.dims(), [2, 32, 3, 3]);
    let alpha = &k["lora_unet_down_blocks_0_downsamplers_0_conv.alpha"];
    assert_eq!(alpha.to_scalar::<f32>().unwrap(), 1.0);
    let bytes = std::fs::read(&kohya).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = header.metadata().clone().unwrap_or_default();
    let args: serde_json::Value = serde_json::from_str(&meta["ss_network_args"]).unwrap();
    assert_eq!(
        args,
        serde_json::json!({"conv_dim": "2", "conv_alpha": "1.0"})
    );
    assert_eq!(meta["ss_network_dim"], "4");

    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["r"], 4);
    assert_eq!(cfg["rank_pattern"]["down_blocks.0.resnets.0.conv1"], 2);
    assert_eq!(cfg["alpha_pattern"]["up_blocks.0.upsamplers.0.conv"], 1.0);
    assert!(cfg["rank_pattern"]
        .get("down_blocks.1.resnets.0.conv_shortcut")
        .is_none());
    let back_cfg = lora::read_adapter_config(&out).unwrap();
    let mut back = UNet::load(&fixtures().join("sd-tiny/unet"), &cpu).unwrap();
    lora::attach(&mut back, &back_cfg, 0).unwrap();
    lora::load_adapter_weights(&back, &out).unwrap();
    let mut via_kohya = UNet::load(&fixtures().join("sd-tiny/unet"), &cpu).unwrap();
    loraforge_trainer::families::diffusion::kohya::load_kohya(
        &mut via_kohya,
        &kohya,
        loraforge_trainer::families::diffusion::kohya::KohyaNaming::SdUnet,
    )
    .unwrap();
    let x = candle_core::safetensors::load(fixtures().join("sd-tiny-ref/unet.safetensors"), &cpu)
        .unwrap();
    let ts: Vec<f32> = x["timesteps"].to_vec1().unwrap();
    let run = |m: &UNet| {
        m.forward(
            &x["sample"],
            &ts,
            &x["encoder_hidden_states"],
            &ForwardCtx::eval(),
        )
        .unwrap()
    };
    let d = common::max_abs_diff(&run(&back), &run(&via_kohya));
    assert!(
        d <= 1e-5,
        "the PEFT folder and the kohya file compute {d} apart"
    );
}
