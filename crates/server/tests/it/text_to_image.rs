//! Stable Diffusion LoRA through the API, on the tiny SD fixture
//! (`tests/fixtures/sd-tiny`): a zip of captioned images is uploaded and checked (a
//! path-traversal zip is refused naming its entry), a text-to-image job trains while
//! its events stream, and the download is a kohya-format file whose keys and metadata
//! are what the SD UIs read.

use crate::common;

use common::{copy_dir, create_job, get_json, read_sse, root, wait_status, Backend, TestServer};
use serde_json::{json, Value};
use std::time::Duration;

async fn upload_zip(s: &TestServer, name: &str) -> Value {
    let body = std::fs::read(root().join("tests/data/sd").join(name)).unwrap();
    let (code, f) = common::upload_as(s, name, "application/zip", body).await;
    assert_eq!(code, 200, "{f}");
    f
}

/// A safetensors file's header: tensor entries and `__metadata__`.
fn header(bytes: &[u8]) -> serde_json::Map<String, Value> {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    serde_json::from_slice(&bytes[8..8 + n]).unwrap()
}

#[tokio::test]
async fn an_image_zip_trains_a_kohya_lora_through_the_api() {
    let s = TestServer::start(Backend::Sqlite, &[]).await;
    copy_dir(
        &root().join("tests/fixtures/sd-tiny"),
        &s.models_dir().join("sd-tiny"),
    );
    let models = get_json(&s, "/v1/models").await;
    let sd = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "sd-tiny")
        .unwrap_or_else(|| panic!("sd-tiny not listed: {models}"))
        .clone();
    assert_eq!(sd["tasks"], json!(["text_to_image"]), "{sd}");

    let f = upload_zip(&s, "kohya.zip").await;
    assert_eq!(f["status"], "processed", "{f}");
    assert_eq!(f["format"], "image_zip", "{f}");
    assert_eq!(f["examples"], 3, "{f}");
    let details = f["status_details"].as_str().unwrap_or_default();
    assert!(
        details.contains("kohya layout") && details.contains("22 with repeats"),
        "{f}"
    );
    let file = f["id"].as_str().unwrap().to_string();

    let bad = upload_zip(&s, "traversal.zip").await;
    assert_eq!(bad["status"], "error", "{bad}");
    assert!(
        bad["status_details"]
            .as_str()
            .unwrap_or_default()
            .contains("../evil.png"),
        "{bad}"
    );

    // Images nobody captioned teach nothing that could be prompted.
    let mut buf = std::io::Cursor::new(Vec::new());
    {
        let mut z = zip::ZipWriter::new(&mut buf);
        z.start_file("red.png", zip::write::SimpleFileOptions::default())
            .unwrap();
        let png = std::fs::read(root().join("tests/data/sd/red_square.png")).unwrap();
        std::io::Write::write_all(&mut z, &png).unwrap();
        z.finish().unwrap();
    }
    let (code, bare) = common::upload_as(&s, "bare.zip", "application/zip", buf.into_inner()).await;
    assert_eq!(code, 200, "{bare}");
    assert_eq!(bare["status"], "error", "{bare}");
    assert!(
        bare["status_details"]
            .as_str()
            .unwrap_or_default()
            .contains("no image has a caption"),
        "{bare}"
    );

    // A kohya folder asking for billions of repeats is refused at upload, by name.
    let mut buf = std::io::Cursor::new(Vec::new());
    {
        let mut z = zip::ZipWriter::new(&mut buf);
        z.start_file(
            "4294967295_sks dog/a.png",
            zip::write::SimpleFileOptions::default(),
        )
        .unwrap();
        let png = std::fs::read(root().join("tests/data/sd/red_square.png")).unwrap();
        std::io::Write::write_all(&mut z, &png).unwrap();
        z.finish().unwrap();
    }
    let (code, huge) = common::upload_as(&s, "huge.zip", "application/zip", buf.into_inner()).await;
    assert_eq!(code, 200, "{huge}");
    assert_eq!(huge["status"], "error", "{huge}");
    assert!(
        huge["status_details"]
            .as_str()
            .unwrap_or_default()
            .contains("4294967295_sks dog: 4294967295 repeats"),
        "{huge}"
    );

    // Files and tasks must fit each other, and image settings belong to image jobs.
    let chat = common::upload_chat(&s).await;
    for (body, param) in [
        (
            json!({"model": "sd-tiny", "training_file": chat, "task": "text_to_image"}),
            "training_file",
        ),
        (
            json!({"model": "sd-tiny", "training_file": bad["id"], "task": "text_to_image"}),
            "training_file",
        ),
        (json!({"model": "sd-tiny", "training_file": file}), "task"),
        (
            json!({"model": "sd-tiny", "training_file": file, "task": "text_to_image",
                "hyperparameters": {"resolution": 30}}),
            "hyperparameters.resolution",
        ),
        (
            json!({"model": "sd-tiny", "training_file": file, "validation_file": file,
                   "task": "text_to_image"}),
            "validation_file",
        ),
    ] {
        let (code, e) = create_job(&s, body.clone()).await;
        assert_eq!(code, 400, "{body}: {e}");
        assert_eq!(e["error"]["param"], param, "{body}: {e}");
    }

    let (code, job) = create_job(
        &s,
        json!({"model": "sd-tiny", "training_file": file, "task": "text_to_image", "suffix": "sks",
               "hyperparameters": {"max_steps": 8, "batch_size": 2, "learning_rate": 1e-3,
                                   "snr_gamma": 5.0, "checkpoint_interval": 4}}),
    )
    .await;
    assert_eq!(code, 200, "{job}");
    let id = job["id"].as_str().unwrap().to_string();
    assert_eq!(job["hyperparameters"]["lora_r"], 4, "{job}");
    assert_eq!(job["hyperparameters"]["lora_alpha"], 4.0, "{job}");
    assert_eq!(job["hyperparameters"]["snr_gamma"], 5.0, "{job}");

    let frames = read_sse(&s, &id, None, None).await;
    let steps = frames
        .iter()
        .filter(|(_, ev, data)| ev != "done" && data.contains("\"train_loss\""))
        .count();
    assert_eq!(steps, 8, "{frames:?}");
    let done = wait_status(&s, &id, &["succeeded", "failed"], Duration::from_secs(60)).await;
    assert_eq!(done["status"], "succeeded", "{done}\n{}", s.logs());

    let r = reqwest::get(s.url(&format!("/v1/fine_tuning/jobs/{id}/adapter")))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let disposition = r.headers()["content-disposition"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(disposition.ends_with(".safetensors\""), "{disposition}");
    let bytes = r.bytes().await.unwrap();
    let h = header(&bytes);
    let meta = h["__metadata__"].as_object().unwrap().clone();
    let keys: Vec<&String> = h.keys().filter(|k| *k != "__metadata__").collect();
    assert_eq!(keys.len(), 32 * 3, "{keys:?}");
    for k in &keys {
        assert!(k.starts_with("lora_unet_"), "{k}");
        assert!(
            k.ends_with(".lora_down.weight")
                || k.ends_with(".lora_up.weight")
                || k.ends_with(".alpha"),
            "{k}"
        );
    }
    let q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q";
    assert_eq!(h[&format!("{q}.lora_down.weight")]["shape"], json!([4, 32]));
    assert_eq!(h[&format!("{q}.lora_up.weight")]["shape"], json!([32, 4]));
    assert_eq!(meta["ss_network_module"], "networks.lora", "{meta:?}");
    assert_eq!(meta["ss_network_dim"], "4", "{meta:?}");
    assert_eq!(meta["ss_network_alpha"], "4.0", "{meta:?}");
    assert_eq!(
        meta["modelspec.architecture"], "stable-diffusion-v1/lora",
        "{meta:?}"
    );
    assert!(meta.contains_key("sshs_model_hash"), "{meta:?}");
    let name = meta["ss_output_name"].as_str().unwrap();
    assert!(name.starts_with("ft:sd-tiny:sks:"), "{meta:?}");
    assert_eq!(meta["modelspec.title"], name, "{meta:?}");

    // The zip carries PEFT's folder and the same kohya file.
    let zip = reqwest::get(s.url(&format!("/v1/fine_tuning/jobs/{id}/adapter?format=zip")))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let mut z = zip::ZipArchive::new(std::io::Cursor::new(zip.to_vec())).unwrap();
    let mut inner = Vec::new();
    std::io::Read::read_to_end(&mut z.by_name("kohya.safetensors").unwrap(), &mut inner).unwrap();
    assert_eq!(inner, bytes.to_vec());
    assert!(z.by_name("adapter_model.safetensors").is_ok());
    // An SD adapter has no LoRA GGUF (llama.cpp's LoRA is a decoder's): a 409 that says so.
    let r = reqwest::get(s.url(&format!("/v1/fine_tuning/jobs/{id}/adapter?format=gguf")))
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    let e: serde_json::Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "gguf_not_available", "{e}");
    assert_eq!(e["error"]["param"], "format", "{e}");

    // Its checkpoints download as kohya files too.
    let ckpts = get_json(&s, &format!("/v1/fine_tuning/jobs/{id}/checkpoints")).await;
    let ckpt = ckpts["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["step_number"] == 4)
        .unwrap_or_else(|| panic!("no step-4 checkpoint: {ckpts}"))
        .clone();
    let r = reqwest::get(s.url(&format!(
        "/v1/fine_tuning/jobs/{id}/checkpoints/{}/adapter",
        ckpt["id"].as_str().unwrap()
    )))
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    let ck = r.bytes().await.unwrap();
    let ch = header(&ck);
    assert_eq!(ch.keys().filter(|k| *k != "__metadata__").count(), 96);
    assert_ne!(ck, bytes, "the step-4 adapter equals the final one");
    // Neither the pipeline nor its LoRA writes text.
    let fine_tuned = done["fine_tuned_model"].as_str().unwrap().to_string();
    for m in ["sd-tiny", fine_tuned.as_str()] {
        let e = common::chat_refused(&s, &json!(m)).await;
        assert!(
            e["error"]["message"]
                .as_str()
                .unwrap()
                .contains("Stable Diffusion"),
            "{m}: {e}"
        );
    }
    println!(
        "text-to-image job {id}: 8 steps over SSE, kohya file of {} bytes with {} tensors",
        bytes.len(),
        keys.len()
    );
}

#[tokio::test]
async fn a_pipeline_too_big_for_cpu_workers_waits_for_cuda() {
    // The tiny pipeline counts as big when the operator sets the bar below its size.
    let s = TestServer::start(Backend::Sqlite, &["--cpu-image-max-params", "1000"]).await;
    copy_dir(
        &root().join("tests/fixtures/sd-tiny"),
        &s.models_dir().join("sd-tiny"),
    );
    let f = upload_zip(&s, "flat.zip").await;
    assert_eq!(f["status"], "processed", "{f}");
    let (code, job) = create_job(
        &s,
        json!({"model": "sd-tiny", "training_file": f["id"], "task": "text_to_image",
               "hyperparameters": {"max_steps": 2}}),
    )
    .await;
    assert_eq!(code, 200, "{job}");
    assert_eq!(job["device_kind"], "cuda", "{job}");
    let id = job["id"].as_str().unwrap();
    // The server's CPU worker leaves it alone.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let j = get_json(&s, &format!("/v1/fine_tuning/jobs/{id}")).await;
    assert_eq!(j["status"], "queued", "{j}");
    let ev = get_json(&s, &format!("/v1/fine_tuning/jobs/{id}/events")).await;
    assert!(ev.to_string().contains("waits for a cuda worker"), "{ev}");
}
