//! The Stable Diffusion UNet port against diffusers + PEFT, on the tiny SD fixture
//! (`scripts/make_sd_fixture.py`: SD 1.x-shaped, random weights stored in f16): the
//! forward pass at per-sample timesteps, after one backward every LoRA gradient, the
//! CLIP tokenizer and text encoder, and the VAE encoder's moments.
//!
//! "Relative" below means max |ours - ref| / max |ref| over the compared tensor.

mod common;

use common::{fixtures, max_abs, max_abs_diff};

use candle_core::{DType, Device, Tensor};
use loraforge_trainer::families::diffusion::unet::{mse, UNet, UNetConfig};
use loraforge_trainer::lora::{self, ForwardCtx, LoraConfig, LoraModel, Targets};
use std::collections::HashMap;

fn golden(name: &str) -> HashMap<String, Tensor> {
    let p = fixtures().join("sd-tiny-ref").join(name);
    candle_core::safetensors::load(&p, &Device::Cpu).unwrap()
}

fn unet() -> UNet {
    UNet::load(&fixtures().join("sd-tiny/unet"), &Device::Cpu).unwrap()
}

fn timesteps(g: &HashMap<String, Tensor>) -> Vec<f32> {
    g["timesteps"]
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn forward_matches_diffusers_at_per_sample_timesteps() {
    let g = golden("unet.safetensors");
    let m = unet();
    let out = m
        .forward(
            &g["sample"],
            &timesteps(&g),
            &g["encoder_hidden_states"],
            &ForwardCtx::eval(),
        )
        .unwrap();
    assert_eq!(out.dims(), g["out"].dims());
    let d = max_abs_diff(&out, &g["out"]);
    println!("unet forward: max |ours - diffusers| = {d:.3e}");
    assert!(d <= 1e-4, "max abs diff {d}");
    // The timesteps are distinct: running each sample alone at its own timestep gives
    // the same rows, so the batch really carries one timestep per sample.
    let ts = timesteps(&g);
    for i in 0..2 {
        let one = m
            .forward(
                &g["sample"].narrow(0, i, 1).unwrap(),
                &ts[i..i + 1],
                &g["encoder_hidden_states"].narrow(0, i, 1).unwrap(),
                &ForwardCtx::eval(),
            )
            .unwrap();
        let d = max_abs_diff(&one, &g["out"].narrow(0, i, 1).unwrap());
        assert!(d <= 1e-4, "sample {i} alone: {d}");
    }
}

fn lora_config(targets: &str) -> LoraConfig {
    LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        targets: Targets::parse(targets).unwrap(),
        use_rslora: false,
        ..LoraConfig::default()
    }
}

fn eval_out(m: &UNet) -> Tensor {
    let x = golden("unet.safetensors");
    m.forward(
        &x["sample"],
        &timesteps(&x),
        &x["encoder_hidden_states"],
        &ForwardCtx::eval(),
    )
    .unwrap()
}

/// Attaches LoRA (r 4, alpha 8) on `targets` with PEFT's initial A and B from `file`
/// (1x1-convolution pairs there are 4-D, as PEFT keeps them), and checks the output, the
/// loss and every A and B gradient against PEFT's. Returns the adapted model.
fn lora_matches_peft(file: &str, targets: &str) -> UNet {
    // The inputs are unet.safetensors', the loss target lora.safetensors'.
    let x = golden("unet.safetensors");
    let target = golden("lora.safetensors")["target"].clone();
    let g = golden(file);
    let mut m = unet();
    let resolved = lora::attach(&mut m, &lora_config(targets), 0).unwrap();
    let expected: usize = g
        .keys()
        .filter(|k| k.starts_with("grad.") && k.ends_with("lora_A.weight"))
        .count();
    assert_eq!(resolved.len(), expected, "adapted modules: {resolved:?}");
    let flat = |t: &Tensor, want: &[usize]| lora::from_file_shape(t, want).unwrap().unwrap();
    for a in lora::adapted(&m) {
        for (which, var) in [("A", &a.pair.a), ("B", &a.pair.b)] {
            let t = &g[&format!("init.{}.lora_{which}.weight", a.path)];
            var.set(&flat(t, var.dims())).unwrap();
        }
    }
    let out = m
        .forward(
            &x["sample"],
            &timesteps(&x),
            &x["encoder_hidden_states"],
            &ForwardCtx::train(rand_chacha::rand_core::SeedableRng::seed_from_u64(0)),
        )
        .unwrap();
    let d = max_abs_diff(&out, &g["out"]);
    println!("{file}: unet + LoRA forward: max |ours - PEFT| = {d:.3e}");
    assert!(d <= 1e-4, "LoRA forward: {d}");
    let loss = mse(&out, &target).unwrap();
    let l: f32 = loss.to_scalar().unwrap();
    let l_ref: f32 = g["loss"].flatten_all().unwrap().to_vec1::<f32>().unwrap()[0];
    assert!(
        (l - l_ref).abs() <= 1e-5 * l_ref.abs().max(1.0),
        "loss {l} vs {l_ref}"
    );
    let grads = loss.backward().unwrap();
    // A gradient that is zero in exact arithmetic is rounding noise on both sides: the
    // timestep projection of a resnet whose output meets a GroupNorm of one channel per
    // group (sd-tiny: 32 and 32) shifts whole channels, which that norm removes. Each
    // gradient is held to 1e-3 of its own size, or of a thousandth of the largest one.
    let floor = 1e-3
        * g.iter()
            .filter(|(k, _)| k.starts_with("grad."))
            .map(|(_, t)| max_abs(t))
            .fold(0.0, f64::max);
    let mut worst = (0.0f64, String::new());
    let mut n = 0;
    for a in lora::adapted(&m) {
        for (which, var) in [("A", &a.pair.a), ("B", &a.pair.b)] {
            let name = format!("{}.lora_{which}.weight", a.path);
            let ours = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name} got no gradient"));
            let want = flat(&g[&format!("grad.{name}")], var.dims());
            let r = max_abs_diff(ours, &want) / max_abs(&want).max(floor);
            assert!(r <= 1e-3, "{name}: relative gradient error {r:.3e}");
            if r > worst.0 {
                worst = (r, name);
            }
            n += 1;
        }
    }
    println!(
        "{file}: {n} LoRA gradients; worst relative error {:.3e} ({})",
        worst.0, worst.1
    );
    m
}

#[test]
fn every_lora_gradient_matches_peft() {
    lora_matches_peft("lora.safetensors", "to_q,to_k,to_v,to_out.0");
}

/// kohya's attention+MLP set: SD 1.x's proj_in/proj_out are 1x1 convolutions, which PEFT
/// and kohya adapt with 4-D A/B; they compute as linear layers here.
#[test]
fn lora_on_the_1x1_conv_projections_and_feed_forward_matches_peft() {
    let targets = "to_q,to_k,to_v,to_out.0,proj_in,proj_out,ff.net.0.proj,ff.net.2";
    let m = lora_matches_peft("lora_proj.safetensors", targets);
    let g = golden("lora_proj.safetensors");
    let want = eval_out(&m);
    let dir = std::env::temp_dir().join(format!("loraforge-sd-proj-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);

    // PEFT's folder holds every tensor in PEFT's own shape, and loads back.
    let meta = lora::AdapterMeta {
        base_model_name_or_path: "sd-tiny".into(),
        task_type: String::new(),
        target_modules: serde_json::json!(targets.split(',').collect::<Vec<_>>()),
        modules_to_save: Vec::new(),
    };
    lora::save_adapter(&m, &lora_config(targets), &meta, &dir).unwrap();
    let file = candle_core::safetensors::load(dir.join("adapter_model.safetensors"), &Device::Cpu)
        .unwrap();
    for (k, t) in &file {
        let path = k.strip_prefix("base_model.model.").unwrap();
        assert_eq!(t.dims(), g[&format!("init.{path}")].dims(), "{k}");
    }
    let mut back = unet();
    lora::attach(&mut back, &lora::read_adapter_config(&dir).unwrap(), 0).unwrap();
    lora::load_adapter_weights(&back, &dir).unwrap();
    assert_eq!(max_abs_diff(&eval_out(&back), &want), 0.0);

    // kohya writes the conv pairs 4-D too, and reads them back.
    use loraforge_trainer::families::diffusion::kohya::{
        load_kohya, write_kohya, KohyaMeta, KohyaNaming,
    };
    let k = dir.join("kohya.safetensors");
    write_kohya(
        &m,
        KohyaNaming::SdUnet,
        &KohyaMeta::default(),
        DType::F32,
        &k,
    )
    .unwrap();
    let kt = candle_core::safetensors::load(&k, &Device::Cpu).unwrap();
    let p = "lora_unet_down_blocks_0_attentions_0_proj_in";
    assert_eq!(kt[&format!("{p}.lora_down.weight")].dims(), [4, 32, 1, 1]);
    assert_eq!(kt[&format!("{p}.lora_up.weight")].dims(), [32, 4, 1, 1]);
    let mut back = unet();
    load_kohya(&mut back, &k, KohyaNaming::SdUnet).unwrap();
    assert_eq!(max_abs_diff(&eval_out(&back), &want), 0.0);
    let _ = std::fs::remove_dir_all(&dir);
    println!("proj_in/proj_out pairs: 4-D in PEFT's and kohya's files, both load back exactly");
}

/// kohya's LoCon set: besides the attention blocks' layers, every ResnetBlock2D's
/// conv1/conv2 (3x3), conv_shortcut (1x1) and time_emb_proj, and the down- and
/// upsamplers' 3x3 convolution (the stride-2 one included), against PEFT's `Conv2d`
/// LoRA on diffusers' UNet: output, loss and every A and B gradient.
#[test]
fn locon_on_the_resnets_and_samplers_matches_peft() {
    let targets = "to_q,to_k,to_v,to_out.0,proj_in,proj_out,ff.net.0.proj,ff.net.2,\
                   conv1,conv2,conv_shortcut,time_emb_proj,downsamplers.0.conv,upsamplers.0.conv";
    let m = lora_matches_peft("locon_peft.safetensors", targets);
    let convs: Vec<&str> = m
        .convs()
        .into_iter()
        .filter(|c| c.lora.is_some())
        .map(|c| c.path.as_str())
        .collect();
    assert_eq!(convs.len(), 23, "{convs:?}");
    assert!(convs.contains(&"down_blocks.0.downsamplers.0.conv"));
    assert!(!convs.contains(&"conv_in") && !convs.contains(&"conv_out"));
}

#[test]
fn unsupported_config_options_are_named() {
    let text = std::fs::read_to_string(fixtures().join("sd-tiny/unet/config.json")).unwrap();
    let base: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert!(UNetConfig::from_diffusers_json(&base).is_ok());
    for (key, value, expect) in [
        (
            "addition_embed_type",
            serde_json::json!("text_time"),
            "addition_embed_type",
        ),
        (
            "class_embed_type",
            serde_json::json!("timestep"),
            "class_embed_type",
        ),
        (
            "resnet_time_scale_shift",
            serde_json::json!("scale_shift"),
            "resnet_time_scale_shift",
        ),
        (
            "only_cross_attention",
            serde_json::json!(true),
            "only_cross_attention",
        ),
        (
            "down_block_types",
            serde_json::json!(["SimpleCrossAttnDownBlock2D", "DownBlock2D"]),
            "SimpleCrossAttnDownBlock2D",
        ),
        ("norm_num_groups", serde_json::json!(5), "norm_num_groups 5"),
    ] {
        let mut v = base.clone();
        v[key] = value;
        let e = UNetConfig::from_diffusers_json(&v).unwrap_err().to_string();
        assert!(e.contains(expect), "{key}: {e}");
    }
}

#[test]
fn a_missing_weight_is_named() {
    let dir = fixtures().join("sd-tiny/unet");
    let text = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let cfg = UNetConfig::from_diffusers_json(&serde_json::from_str(&text).unwrap()).unwrap();
    let mut w = loraforge_trainer::io::read_safetensors_f32(&dir, &Device::Cpu).unwrap();
    let key = "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight";
    assert!(w.remove(key).is_some());
    let e = UNet::new(cfg.clone(), w, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains(key), "{e}");
    let mut w = loraforge_trainer::io::read_safetensors_f32(&dir, &Device::Cpu).unwrap();
    w.insert(
        "extra.weight".into(),
        Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap(),
    );
    let e = UNet::new(cfg, w, &Device::Cpu).err().unwrap().to_string();
    assert!(e.contains("extra.weight"), "{e}");
}

#[test]
fn clip_tokenizer_matches_transformers() {
    use loraforge_trainer::families::diffusion::clip::ClipTokenizer;
    let tok = ClipTokenizer::load(&fixtures().join("sd-tiny/tokenizer")).unwrap();
    let text = std::fs::read_to_string(fixtures().join("sd-tiny-ref/tokens.json")).unwrap();
    let cases: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    let g = golden("clip.safetensors");
    let rows = g["input_ids"].to_vec2::<i64>().unwrap();
    assert_eq!(rows.len(), cases.len());
    for (case, row) in cases.iter().zip(&rows) {
        let prompt = case["prompt"].as_str().unwrap();
        let want: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(tok.encode_unpadded(prompt).unwrap(), want, "{prompt:?}");
        let padded: Vec<u32> = row.iter().map(|&x| x as u32).collect();
        assert_eq!(
            tok.encode(prompt).unwrap(),
            padded,
            "{prompt:?} padded to 77"
        );
    }
    println!("{} prompts tokenized as transformers does", cases.len());
}

#[test]
fn clip_text_encoder_matches_transformers() {
    use loraforge_trainer::families::diffusion::clip::ClipTextEncoder;
    let enc =
        ClipTextEncoder::load(&fixtures().join("sd-tiny/text_encoder"), &Device::Cpu).unwrap();
    let g = golden("clip.safetensors");
    let ids: Vec<Vec<u32>> = g["input_ids"]
        .to_vec2::<i64>()
        .unwrap()
        .iter()
        .map(|r| r.iter().map(|&x| x as u32).collect())
        .collect();
    let out = enc.forward(&ids).unwrap();
    let d = max_abs_diff(&out, &g["last_hidden_state"]);
    println!("CLIP last hidden state: max |ours - transformers| = {d:.3e}");
    assert!(d <= 1e-4, "{d}");
}

#[test]
fn vae_moments_match_diffusers() {
    use loraforge_trainer::families::diffusion::vae::VaeEncoder;
    let vae = VaeEncoder::load(&fixtures().join("sd-tiny/vae"), &Device::Cpu).unwrap();
    let g = golden("vae.safetensors");
    let (mean, logvar) = vae.moments(&g["image"]).unwrap();
    let (dm, dl) = (
        max_abs_diff(&mean, &g["mean"]),
        max_abs_diff(&logvar, &g["logvar"]),
    );
    println!("VAE moments: max |ours - diffusers| mean {dm:.3e}, logvar {dl:.3e}");
    assert!(dm <= 1e-4 && dl <= 1e-4, "{dm} {dl}");
    assert_eq!(vae.scaling_factor, 0.18215);
}
