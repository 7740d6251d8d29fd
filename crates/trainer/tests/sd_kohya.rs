//! kohya-format LoRA files against diffusers and kohya's own conventions, on the tiny SD
//! fixture (`scripts/make_sd_fixture.py`): `kohya.safetensors` is a kohya-format LoRA
//! (to_q/to_k/to_v/to_out.0, r 4, alpha 2.0, with kohya's metadata and hashes) and
//! `kohya_out.safetensors` diffusers' UNet output after `load_lora_weights` of it.

mod common;

use common::{fixtures, max_abs_diff};

use candle_core::{DType, Device, Tensor};
use loraforge_trainer::families::diffusion::kohya::{
    self, BaseModel, KohyaMeta, KohyaModule, KohyaNaming,
};
use loraforge_trainer::families::diffusion::unet::UNet;
use loraforge_trainer::lora::hotswap::{self as adapters, AdapterWeights};
use loraforge_trainer::lora::{ForwardCtx, LoraModel};
use loraforge_trainer::Error;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

const NAMING: KohyaNaming = KohyaNaming::SdUnet;

fn golden_path() -> PathBuf {
    fixtures().join("sd-tiny-ref/kohya.safetensors")
}

fn load(p: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(p, &Device::Cpu).unwrap()
}

fn metadata(p: &Path) -> HashMap<String, String> {
    let bytes = std::fs::read(p).unwrap();
    let (_, m) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    m.metadata().clone().unwrap_or_default()
}

fn unet() -> UNet {
    UNet::load(&fixtures().join("sd-tiny/unet"), &Device::Cpu).unwrap()
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f32::to_bits)
        .collect()
}

fn forward(m: &UNet) -> Tensor {
    let x = load(&fixtures().join("sd-tiny-ref/unet.safetensors"));
    let ts: Vec<f32> = x["timesteps"]
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1()
        .unwrap();
    m.forward(
        &x["sample"],
        &ts,
        &x["encoder_hidden_states"],
        &ForwardCtx::eval(),
    )
    .unwrap()
}

/// The fields of the golden's metadata that a caller of ours would know, as `KohyaMeta`.
fn golden_meta() -> KohyaMeta {
    KohyaMeta {
        base: BaseModel::Sd1,
        output_name: Some("sd-tiny-kohya".into()),
        title: None,
        sd_model_name: Some("sd-tiny".into()),
        training_started_at: Some(1767225600.0),
        training_finished_at: Some(1767225660.0),
        learning_rate: Some(1e-4),
        unet_lr: Some(1e-4),
        lr_scheduler: Some("constant".into()),
        optimizer: Some("torch.optim.adamw.AdamW".into()),
        max_train_steps: Some(22),
        steps: Some(22),
        epoch: Some(1),
        num_epochs: Some(1),
        num_train_images: Some(22),
        batch_size: Some(1),
        resolution: Some((128, 128)),
        seed: Some(0),
        noise_offset: None,
        min_snr_gamma: None,
        mixed_precision: Some("no".into()),
        cache_latents: Some(true),
        tag_frequency: Some(serde_json::json!({
            "10_sks dog": {"sks dog": 1, "on grass": 1, "sks dog sitting": 1},
            "2_red ball": {"red ball": 1}
        })),
        dataset_dirs: Some(serde_json::json!({
            "10_sks dog": {"n_repeats": 10, "img_count": 2},
            "2_red ball": {"n_repeats": 2, "img_count": 1}
        })),
        training_comment: Some("loraforge sd-tiny test fixture (random weights)".into()),
        extra: BTreeMap::new(),
    }
}

#[test]
fn golden_kohya_file_reproduces_diffusers_output() {
    let mut m = unet();
    let base = forward(&m);
    let file = kohya::load_kohya(&mut m, &golden_path(), NAMING).unwrap();
    assert_eq!(file.modules.len(), 32);
    for (path, k) in &file.modules {
        assert_eq!((k.rank(), k.alpha), (4, 2.0), "{path}");
    }
    let adapted = m.linears().iter().filter(|l| l.lora.is_some()).count();
    assert_eq!(adapted, 32);
    for lin in m.linears() {
        if let Some(l) = &lin.lora {
            assert_eq!(l.scale, 0.5, "{}", lin.path);
        }
    }
    let out = forward(&m);
    let want = &load(&fixtures().join("sd-tiny-ref/kohya_out.safetensors"))["out"];
    let d = max_abs_diff(&out, want);
    let moved = max_abs_diff(&out, &base);
    println!("kohya load: max |ours - diffusers| = {d:.3e}; LoRA moved the output by {moved:.3e}");
    assert!(d <= 1e-4, "max abs diff {d}");
    assert!(moved > 1e-3, "the adapter changed nothing: {moved}");
}

#[test]
fn export_writes_kohyas_keys_metadata_and_hashes() {
    let golden = load(&golden_path());
    let gmeta = metadata(&golden_path());

    // The hashes, recomputed from the golden's tensors and metadata, are the stored ones.
    let gt: BTreeMap<String, Tensor> = golden.clone().into_iter().collect();
    let (h, lh) = kohya::kohya_hashes(&gt, &gmeta).unwrap();
    println!("golden: sshs_model_hash {h}, sshs_legacy_hash {lh}");
    assert_eq!(h, gmeta["sshs_model_hash"]);
    assert_eq!(lh, gmeta["sshs_legacy_hash"]);

    let mut m = unet();
    kohya::load_kohya(&mut m, &golden_path(), NAMING).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("export.safetensors");
    let written = kohya::write_kohya(&m, NAMING, &golden_meta(), DType::F32, &out).unwrap();
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        1,
        "a temp file was left behind"
    );
    let ours = load(&out);
    let meta = metadata(&out);
    assert_eq!(meta, written);

    assert_eq!(ours.len(), 3 * 32);
    for lin in m.linears().into_iter().filter(|l| l.lora.is_some()) {
        let name = NAMING.name(&lin.path);
        let down = &ours[&format!("{name}.lora_down.weight")];
        let up = &ours[&format!("{name}.lora_up.weight")];
        let alpha = &ours[&format!("{name}.alpha")];
        assert_eq!(down.dims(), [4, lin.in_features()], "{name}");
        assert_eq!(up.dims(), [lin.out_features(), 4], "{name}");
        assert_eq!(alpha.dims(), [0usize; 0], "{name}: alpha must be 0-dim");
        assert_eq!(alpha.to_scalar::<f32>().unwrap(), 2.0, "{name}");
        for k in ["lora_down.weight", "lora_up.weight", "alpha"] {
            let key = format!("{name}.{k}");
            assert_eq!(bits(&ours[&key]), bits(&golden[&key]), "{key}");
        }
    }
    assert_eq!(
        ours.keys().collect::<std::collections::BTreeSet<_>>(),
        golden.keys().collect(),
    );

    // Every key we write has the golden's value (the JSON ones as JSON: Python keeps
    // insertion order, serde_json sorts).
    let mut compared = 0;
    for (k, v) in &meta {
        if k.starts_with("sshs_") {
            continue;
        }
        let g = gmeta
            .get(k)
            .unwrap_or_else(|| panic!("{k} is not in the golden"));
        if k == "ss_tag_frequency" || k == "ss_dataset_dirs" {
            let p = |s: &str| serde_json::from_str::<serde_json::Value>(s).unwrap();
            assert_eq!(p(v), p(g), "{k}");
            assert!(
                v.contains("\": ") && v.contains(", \""),
                "{k}: not json.dumps' form: {v}"
            );
        } else {
            assert_eq!(v, g, "{k}");
        }
        compared += 1;
    }
    for k in [
        "ss_network_module",
        "ss_network_dim",
        "ss_network_alpha",
        "ss_v2",
        "ss_base_model_version",
        "ss_output_name",
        "ss_training_started_at",
        "ss_training_finished_at",
        "ss_learning_rate",
        "ss_max_train_steps",
        "ss_num_train_images",
        "ss_resolution",
        "ss_seed",
        "modelspec.sai_model_spec",
        "modelspec.architecture",
        "modelspec.implementation",
        "modelspec.title",
        "modelspec.date",
        "modelspec.resolution",
        "modelspec.prediction_type",
    ] {
        assert!(meta.contains_key(k), "{k} missing");
    }
    assert_eq!(meta["ss_network_dim"], "4");
    assert_eq!(meta["ss_network_alpha"], "2.0");
    // Same tensors, same bytes after the header: the model hash is the golden's.
    assert_eq!(meta["sshs_model_hash"], gmeta["sshs_model_hash"]);
    assert_eq!(meta["sshs_legacy_hash"], gmeta["sshs_legacy_hash"]);
    let (h2, lh2) = kohya::kohya_hashes(&ours.into_iter().collect(), &meta).unwrap();
    assert_eq!(
        (&h2, &lh2),
        (&meta["sshs_model_hash"], &meta["sshs_legacy_hash"])
    );
    println!(
        "export: 96 tensors bit-identical to the golden, {compared} metadata values equal to the golden's, \
         {} golden keys we do not write",
        gmeta.keys().filter(|k| !meta.contains_key(*k)).count()
    );

    // fp16 export: alpha is cast with the weights, as kohya does.
    let out16 = dir.path().join("export16.safetensors");
    kohya::write_kohya(&m, NAMING, &KohyaMeta::default(), DType::F16, &out16).unwrap();
    let t16 = load(&out16);
    assert!(t16.values().all(|t| t.dtype() == DType::F16));
    let m16 = metadata(&out16);
    assert_eq!(m16["modelspec.title"], "export16");
    assert!(
        !m16.contains_key("ss_seed"),
        "an unknown seed must be left out"
    );
}

#[test]
fn kohya_peft_kohya_is_lossless_and_peft_runs_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let peft = dir.path().join("peft");
    let model = unet();
    let cfg = kohya::kohya_to_peft(&model, &golden_path(), NAMING, "sd-tiny", &peft).unwrap();
    assert_eq!((cfg.r, cfg.alpha), (4, 2.0));
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(peft.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(j["peft_type"], "LORA");
    assert_eq!(j["r"], 4);
    assert_eq!(j["lora_alpha"], 2.0);
    // PEFT refuses "" and records null for diffusers models.
    assert!(j["task_type"].is_null(), "{j}");
    assert_eq!(
        j["target_modules"],
        serde_json::json!(["to_k", "to_out.0", "to_q", "to_v"])
    );
    let pt = load(&peft.join("adapter_model.safetensors"));
    assert_eq!(pt.len(), 64);
    assert!(pt.contains_key(
        "base_model.model.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"
    ));

    // PEFT → kohya gives back the golden's tensors bit for bit.
    let back = dir.path().join("back.safetensors");
    let mut m2 = unet();
    kohya::peft_to_kohya(
        &mut m2,
        &peft,
        NAMING,
        &KohyaMeta::default(),
        DType::F32,
        &back,
    )
    .unwrap();
    let golden = load(&golden_path());
    let again = load(&back);
    assert_eq!(again.len(), golden.len());
    for (k, g) in &golden {
        assert_eq!(bits(&again[k]), bits(g), "{k}");
    }

    // PEFT loaded the way adapters are served runs like the kohya file.
    let mut via_peft = unet();
    let w = AdapterWeights::load(&peft, &Device::Cpu).unwrap();
    adapters::apply(&mut via_peft, Some(&w)).unwrap();
    let mut via_kohya = unet();
    kohya::load_kohya(&mut via_kohya, &golden_path(), NAMING).unwrap();
    let d = max_abs_diff(&forward(&via_peft), &forward(&via_kohya));
    println!(
        "kohya → PEFT → kohya: 96 tensors bit-identical; PEFT vs kohya load: max diff {d:.3e}"
    );
    assert!(d <= 1e-6, "{d}");
}

/// A kohya LoCon file (linears and 1x1 convolutions at network_dim 4 / alpha 2, 3x3
/// convolutions at conv_dim 2 / alpha 1) computes what diffusers computes after
/// `load_lora_weights` of it, and written back it is the same file: every tensor
/// bit-identical, 4-D where kohya's are, and `conv_dim`/`conv_alpha` in
/// `ss_network_args` beside the linear rank in `ss_network_dim`.
#[test]
fn locon_file_reproduces_diffusers_output_and_writes_back_the_same() {
    let path = fixtures().join("sd-tiny-ref/locon.safetensors");
    let mut m = unet();
    let file = kohya::load_kohya(&mut m, &path, NAMING).unwrap();
    assert_eq!(file.modules.len(), 79);
    let convs = file.modules.values().filter(|k| k.down.rank() == 4).count();
    assert_eq!(convs, 18 + 5, "3x3 and 1x1 convolutions");
    let want = load(&fixtures().join("sd-tiny-ref/locon_out.safetensors"))["out"].clone();
    let got = forward(&m);
    let d = max_abs_diff(&got, &want);
    println!("LoCon kohya file vs diffusers' load_lora_weights: max diff {d:.3e}");
    assert!(d <= 1e-4, "{d}");
    assert!(max_abs_diff(&got, &forward(&unet())) > 1e-2);

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("locon.safetensors");
    kohya::write_kohya(&m, NAMING, &KohyaMeta::default(), DType::F32, &out).unwrap();
    let (a, b) = (load(&path), load(&out));
    let mut keys: Vec<&String> = a.keys().collect();
    keys.sort();
    let mut back: Vec<&String> = b.keys().collect();
    back.sort();
    assert_eq!(keys, back);
    for k in keys {
        assert_eq!(a[k].dims(), b[k].dims(), "{k}");
        assert_eq!(bits(&a[k]), bits(&b[k]), "{k}");
    }
    let meta = metadata(&out);
    assert_eq!(meta["ss_network_dim"], "4");
    assert_eq!(meta["ss_network_alpha"], "2.0");
    let args: serde_json::Value = serde_json::from_str(&meta["ss_network_args"]).unwrap();
    assert_eq!(
        args,
        serde_json::json!({"conv_dim": "2", "conv_alpha": "1.0"})
    );
}

/// The LoCon file as a PEFT folder: the network's rank and alpha as PEFT's `r` and
/// `lora_alpha`, the 3x3 convolutions' own in `rank_pattern` / `alpha_pattern` by whole
/// path; read back, it computes diffusers' output.
#[test]
fn a_locon_file_converts_to_peft_with_patterns() {
    let path = fixtures().join("sd-tiny-ref/locon.safetensors");
    let dir = tempfile::tempdir().unwrap();
    let cfg = kohya::kohya_to_peft(&unet(), &path, NAMING, "sd-tiny", dir.path()).unwrap();
    assert_eq!((cfg.r, cfg.alpha), (4, 2.0));
    assert_eq!(cfg.rank_pattern.len(), 18);
    assert_eq!(cfg.rank_pattern["down_blocks.0.downsamplers.0.conv"], 2);
    assert_eq!(cfg.alpha_pattern["mid_block.resnets.1.conv2"], 1.0);
    assert!(!cfg
        .rank_pattern
        .contains_key("down_blocks.1.resnets.0.conv_shortcut"));
    let back = loraforge_trainer::lora::read_adapter_config(dir.path()).unwrap();
    assert_eq!(
        (back.rank_pattern.clone(), back.alpha_pattern.clone()),
        (cfg.rank_pattern, cfg.alpha_pattern)
    );
    let mut m = unet();
    let w = AdapterWeights::load(dir.path(), &Device::Cpu).unwrap();
    adapters::apply(&mut m, Some(&w)).unwrap();
    let want = load(&fixtures().join("sd-tiny-ref/locon_out.safetensors"))["out"].clone();
    let d = max_abs_diff(&forward(&m), &want);
    assert!(d <= 1e-4, "{d}");
}

fn expect_err(tensors: &HashMap<String, Tensor>, key: &str) -> Error {
    let m = unet();
    let e = kohya::modules_from_tensors(tensors, &m, NAMING).unwrap_err();
    assert!(e.to_string().contains(key), "error {e} does not name {key}");
    println!("{e}");
    e
}

#[test]
fn bad_files_are_errors_naming_the_key() {
    let golden = load(&golden_path());
    let n = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q";
    let t = |shape: &[usize]| Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap();

    let mut f = golden.clone();
    let k = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_z.lora_down.weight";
    f.insert(k.into(), t(&[4, 32]));
    assert!(matches!(expect_err(&f, k), Error::Adapter(_)));

    let mut f = golden.clone();
    let k = "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight";
    f.insert(k.into(), t(&[4, 32]));
    assert!(matches!(expect_err(&f, k), Error::Unsupported(_)));

    let mut f = golden.clone();
    let k = format!("{n}.lora_up.weight");
    f.remove(&k);
    expect_err(&f, &k);

    let mut f = golden.clone();
    let k = format!("{n}.lora_down.weight");
    f.insert(k.clone(), t(&[4, 31]));
    expect_err(&f, &k);

    let mut f = golden.clone();
    let k = format!("{n}.lora_up.weight");
    f.insert(k.clone(), t(&[32, 3]));
    expect_err(&f, &k);

    // LoCon pairs must fit their convolution; a 3x3 pair for a linear layer is refused.
    let c = "lora_unet_down_blocks_0_resnets_0_conv1";
    let mut f = golden.clone();
    f.insert(format!("{c}.lora_down.weight"), t(&[2, 32, 1, 1]));
    f.insert(format!("{c}.lora_up.weight"), t(&[32, 2, 1, 1]));
    expect_err(&f, &format!("{c}.lora_down.weight"));
    let mut f = golden.clone();
    f.insert(format!("{c}.lora_down.weight"), t(&[2, 32, 3, 3]));
    f.insert(format!("{c}.lora_up.weight"), t(&[32, 3, 1, 1]));
    expect_err(&f, &format!("{c}.lora_up.weight"));
    let mut f = golden.clone();
    let k = format!("{n}.lora_down.weight");
    f.insert(k.clone(), t(&[4, 32, 3, 3]));
    expect_err(&f, &k);

    // A file without alpha tensors means alpha = r (kohya's rule): scale 1.
    let f: HashMap<String, Tensor> = golden
        .into_iter()
        .filter(|(k, _)| !k.ends_with(".alpha"))
        .collect();
    let m = unet();
    let mods: BTreeMap<String, KohyaModule> = kohya::modules_from_tensors(&f, &m, NAMING).unwrap();
    assert!(mods.values().all(|k| k.alpha == 4.0 && k.scale() == 1.0));
}

#[test]
fn python_formatting_of_metadata_values() {
    use kohya::py_float;
    assert_eq!(py_float(2.0), "2.0");
    assert_eq!(py_float(1e-4), "0.0001");
    assert_eq!(py_float(1e-5), "1e-05");
    assert_eq!(py_float(1.5e-5), "1.5e-05");
    assert_eq!(py_float(1767225600.0), "1767225600.0");
    assert_eq!(py_float(1e16), "1e+16");
    assert_eq!(py_float(0.0), "0.0");
}
