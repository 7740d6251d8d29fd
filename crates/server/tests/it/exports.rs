//! Exports: a finished job's adapter merged into its base over the API, built by a
//! worker, downloaded and deleted; the HF folder checked in transformers, the GGUF by
//! loading it back.

use crate::common;
use common::unzip;

use common::{
    check_response, copy_dir, download_adapter, get_json as get, peft_check_merged, root, spec,
    upload_chat, wait_status, Backend, TestServer,
};
use serde_json::{json, Value};
use std::io::Read;
use std::time::{Duration, Instant};

async fn post(s: &TestServer, path: &str, body: Value) -> (u16, Value) {
    common::post_json(s, path, None, &body).await
}

async fn trained(s: &TestServer, model: &str, file: &str) -> String {
    let (code, job) = post(
        s,
        "/v1/fine_tuning/jobs",
        json!({"model": model, "training_file": file,
               "hyperparameters": {"max_steps": 6, "batch_size": 2, "lora_r": 4, "lora_alpha": 8,
                                   "learning_rate": 1e-2, "packing": false}}),
    )
    .await;
    assert_eq!(code, 200, "{job}");
    let id = job["id"].as_str().unwrap().to_string();
    let done = wait_status(s, &id, &["succeeded", "failed"], Duration::from_secs(120)).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    id
}

async fn wait_export(s: &TestServer, job: &str, id: &str) -> Value {
    let t0 = Instant::now();
    loop {
        let e = get(s, &format!("/v1/fine_tuning/jobs/{job}/exports/{id}")).await;
        if e["status"] == "succeeded" || e["status"] == "failed" {
            return e;
        }
        assert!(t0.elapsed() < Duration::from_secs(120), "{e}\n{}", s.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn exports_merge_a_job_into_a_model_built_by_a_worker() {
    let spec = spec();
    let s = TestServer::start(Backend::Sqlite, &[]).await;
    let fixtures = root().join("tests/fixtures");
    copy_dir(
        &fixtures.join("tiny-llama"),
        &s.models_dir().join("tiny-llama"),
    );
    std::fs::copy(
        fixtures.join("tiny-llama-gguf/tiny-llama.gguf"),
        s.models_dir().join("tiny-llama.gguf"),
    )
    .unwrap();
    let file = upload_chat(&s).await;
    let hf_job = trained(&s, "tiny-llama", &file).await;
    let gguf_job = trained(&s, "tiny-llama.gguf", &file).await;
    let exports = |job: &str| format!("/v1/fine_tuning/jobs/{job}/exports");
    let mut errs = Vec::new();

    // Refusals name the field; nothing is queued by them.
    for (body, param) in [
        (json!({"format": "zip"}), "format"),
        (
            json!({"format": "merged_gguf", "dtype": "q2_k"}),
            "format_dtype",
        ),
        (
            json!({"format": "merged_safetensors", "dtype": "q8_0"}),
            "format_dtype",
        ),
        (json!({"format": "merged_gguf"}), "hf_base"),
    ] {
        let (code, e) = post(&s, &exports(&hf_job), body.clone()).await;
        assert_eq!(code, 400, "{body}: {e}");
        errs.extend(check_response(
            &spec,
            "/v1/fine_tuning/jobs/{fine_tuning_job_id}/exports",
            "post",
            400,
            &e,
        ));
        match param {
            "hf_base" => {
                assert_eq!(e["error"]["code"], "export_not_supported", "{e}");
                assert!(e["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("convert_hf_to_gguf.py"));
            }
            "format_dtype" => assert_eq!(e["error"]["param"], "dtype", "{e}"),
            p => assert_eq!(e["error"]["param"], p, "{e}"),
        }
    }
    assert_eq!(get(&s, &exports(&hf_job)).await["data"], json!([]));
    let (code, _) = post(&s, "/v1/fine_tuning/jobs/ftjob-nope/exports", json!({})).await;
    assert_eq!(code, 404);

    // The merged HF folder, in f32: queued once however often it is asked for, built,
    // and what transformers loads computes as PEFT's base + adapter.
    let ask = json!({"format": "merged_safetensors", "dtype": "f32"});
    let (code, e) = post(&s, &exports(&hf_job), ask.clone()).await;
    assert_eq!(code, 201, "{e}");
    errs.extend(check_response(
        &spec,
        "/v1/fine_tuning/jobs/{fine_tuning_job_id}/exports",
        "post",
        201,
        &e,
    ));
    let id = e["id"].as_str().unwrap().to_string();
    let (code, again) = post(&s, &exports(&hf_job), ask).await;
    assert_eq!((code, again["id"].as_str()), (200, Some(id.as_str())));
    let done = wait_export(&s, &hf_job, &id).await;
    assert_eq!(done["status"], "succeeded", "{done}\n{}", s.logs());
    errs.extend(check_response(
        &spec,
        "/v1/fine_tuning/jobs/{fine_tuning_job_id}/exports/{export_id}",
        "get",
        200,
        &done,
    ));
    let r = reqwest::get(s.url(&format!("{}/{id}/content", exports(&hf_job))))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["etag"],
        format!("\"{}\"", done["sha256"].as_str().unwrap()).as_str()
    );
    let zip = r.bytes().await.unwrap();
    assert_eq!(zip.len() as u64, done["bytes"].as_u64().unwrap());
    let merged = tempfile::tempdir().unwrap();
    let names = unzip(&zip, merged.path());
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(names.iter().any(|n| n == f), "{f} missing from {names:?}");
    }
    let adapter = download_adapter(&s, &hf_job).await;
    peft_check_merged(
        &fixtures.join("tiny-llama"),
        adapter.path(),
        Some(merged.path()),
    );

    // A merged GGUF (from the GGUF base) with its Modelfile; f32, so that it computes
    // as the base with the adapter.
    let (code, e) = post(
        &s,
        &exports(&gguf_job),
        json!({"format": "merged_gguf", "dtype": "f32"}),
    )
    .await;
    assert_eq!(code, 201, "{e}");
    let gid = e["id"].as_str().unwrap().to_string();
    let done = wait_export(&s, &gguf_job, &gid).await;
    assert_eq!(done["status"], "succeeded", "{done}\n{}", s.logs());
    let zip = reqwest::get(s.url(&format!("{}/{gid}/content", exports(&gguf_job))))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let out = tempfile::tempdir().unwrap();
    let mut names = unzip(&zip, out.path());
    names.sort();
    assert_eq!(names, ["Modelfile", "model.gguf"]);
    let modelfile = std::fs::read_to_string(out.path().join("Modelfile")).unwrap();
    assert!(modelfile.starts_with("FROM ./model.gguf\n"), "{modelfile}");
    let mut magic = [0u8; 4];
    std::fs::File::open(out.path().join("model.gguf"))
        .unwrap()
        .read_exact(&mut magic)
        .unwrap();
    assert_eq!(&magic, b"GGUF");
    {
        use loraforge_trainer::families::decoder::{loader, merge};
        use loraforge_trainer::lora::ForwardCtx;
        let cpu = loraforge_trainer::device::Device::Cpu;
        let adapter = download_adapter(&s, &gguf_job).await;
        let want = merge::load_with_adapter(
            &fixtures.join("tiny-llama-gguf/tiny-llama.gguf"),
            Some(adapter.path()),
            &cpu,
        )
        .unwrap();
        let got = loader::load(&out.path().join("model.gguf"), &cpu).unwrap();
        let ids = want
            .tokenizer
            .encode("The capital of France", false)
            .unwrap();
        let n = ids.len();
        let x = candle_core::Tensor::from_vec(ids, (1, n), &cpu).unwrap();
        let a = want.model.logits(&x, None, &ForwardCtx::eval()).unwrap();
        let b = got.model.logits(&x, None, &ForwardCtx::eval()).unwrap();
        let d = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < 1e-4, "the merged GGUF's logits differ by {d}");
    }

    // Its progress is on the job's event stream.
    let events = get(
        &s,
        &format!("/v1/fine_tuning/jobs/{gguf_job}/events?limit=100"),
    )
    .await;
    let messages: Vec<&str> = events["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["message"].as_str())
        .collect();
    for want in ["queued", "started", "ready"] {
        assert!(
            messages
                .iter()
                .any(|m| m.starts_with(&format!("Export {gid}")) && m.contains(want)),
            "no \"{want}\" event: {messages:?}"
        );
    }

    // Listed, then deleted with its file.
    let list = get(&s, &exports(&gguf_job)).await;
    errs.extend(check_response(
        &spec,
        "/v1/fine_tuning/jobs/{fine_tuning_job_id}/exports",
        "get",
        200,
        &list,
    ));
    assert_eq!(list["data"][0]["id"], gid.as_str());
    let stored = stored_zips(&s, &gguf_job, &gid);
    assert_eq!(stored.len(), 1, "{stored:?}");
    let stored = &stored[0];
    let r = reqwest::Client::new()
        .delete(s.url(&format!("{}/{gid}", exports(&gguf_job))))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["deleted"], true);
    assert!(!stored.exists());
    let r = reqwest::get(s.url(&format!("{}/{gid}", exports(&gguf_job))))
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "export_not_found");

    // The same request four times at once queues one export; deleted while it is
    // queued or built, it leaves no zip and no folder behind, and the worker goes on.
    let ask = json!({"format": "merged_safetensors", "dtype": "bf16"});
    let path = exports(&hf_job);
    let answers = futures::future::join_all((0..4).map(|_| post(&s, &path, ask.clone()))).await;
    let ids: std::collections::BTreeSet<&str> = answers
        .iter()
        .map(|(_, e)| e["id"].as_str().unwrap_or_else(|| panic!("{e}")))
        .collect();
    assert_eq!(ids.len(), 1, "{answers:?}");
    let mut codes: Vec<u16> = answers.iter().map(|(c, _)| *c).collect();
    codes.sort();
    assert_eq!(codes, [200, 200, 200, 201], "{answers:?}");
    let dropped = ids.into_iter().next().unwrap().to_string();
    let r = reqwest::Client::new()
        .delete(s.url(&format!("{}/{dropped}", exports(&hf_job))))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (code, e) = post(
        &s,
        &exports(&hf_job),
        json!({"format": "merged_safetensors", "dtype": "f16"}),
    )
    .await;
    assert_eq!(code, 201, "{e}");
    let after = wait_export(&s, &hf_job, e["id"].as_str().unwrap()).await;
    assert_eq!(after["status"], "succeeded", "{after}\n{}", s.logs());
    assert_eq!(
        stored_zips(&s, &hf_job, &dropped),
        Vec::<std::path::PathBuf>::new()
    );
    let work = s.data_dir().join("exports");
    let left: Vec<_> = std::fs::read_dir(&work)
        .map(|d| d.map(|e| e.unwrap().file_name()).collect())
        .unwrap_or_default();
    assert!(
        left.is_empty(),
        "export folders left in {}: {left:?}",
        work.display()
    );

    // A fine-tuned model its owner deleted is not exported.
    let model = get(&s, &format!("/v1/fine_tuning/jobs/{hf_job}")).await["fine_tuned_model"]
        .as_str()
        .unwrap()
        .to_string();
    let r = reqwest::Client::new()
        .delete(s.url(&format!("/v1/models/{model}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (code, e) = post(
        &s,
        &exports(&hf_job),
        json!({"format": "merged_safetensors", "dtype": "f32"}),
    )
    .await;
    assert_eq!(
        (code, e["error"]["code"].as_str()),
        (404, Some("model_not_found")),
        "{e}"
    );
    errs.extend(check_response(
        &spec,
        "/v1/fine_tuning/jobs/{fine_tuning_job_id}/exports",
        "post",
        404,
        &e,
    ));
    assert!(
        errs.is_empty(),
        "responses differ from openapi.yaml:\n{}",
        errs.join("\n")
    );
}

/// The zips stored for an export (one per claim that finished it), in the blob folder.
fn stored_zips(s: &TestServer, job: &str, export: &str) -> Vec<std::path::PathBuf> {
    let dir = s.data_dir().join(format!("blobs/exports/{job}"));
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    entries
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("{export}.")))
        })
        .collect()
}
