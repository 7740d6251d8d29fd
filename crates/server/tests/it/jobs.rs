//! Fine-tuning jobs end to end, through the real binary: create, follow the SSE stream,
//! download the adapter; cancel; a crashed server's job continued by the next one.

use crate::common;

use common::{
    backends, check_response, copy_dir, get_json as get, read_sse, spec, upload_chat, wait_status,
    Backend, TestServer,
};
use futures::StreamExt;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

async fn server(backend: Backend, extra: &[&str]) -> TestServer {
    let s = TestServer::start(backend, extra).await;
    copy_dir(&fixture("tiny-llama"), &s.models_dir().join("tiny-llama"));
    s
}

async fn create_job(s: &TestServer, file: &str, hp: Value) -> Value {
    let r = reqwest::Client::new()
        .post(s.url("/v1/fine_tuning/jobs"))
        .json(&json!({"model": "tiny-llama", "training_file": file, "hyperparameters": hp, "suffix": "t"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

/// Waits until the job has done at least `step` training steps.
async fn wait_step(s: &TestServer, id: &str, step: u64) {
    let t0 = Instant::now();
    loop {
        let j = get(s, &format!("/v1/fine_tuning/jobs/{id}")).await;
        if j["progress"]["step"].as_u64().unwrap_or(0) >= step {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "never reached step {step}: {}",
            s.logs()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A download's HTTP validators and ranges: its ETag answers If-None-Match with 304, the
/// byte range `first..=last` comes as a 206 with its Content-Range, and a Range header
/// that is not a byte range we understand is ignored (RFC 9110): the whole body, 200.
async fn assert_validators_and_ranges(
    url: &str,
    etag: &str,
    whole: &[u8],
    (first, last): (usize, usize),
) {
    let client = reqwest::Client::new();
    let again = client
        .get(url)
        .header("if-none-match", etag)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 304, "{url}");
    let part = client
        .get(url)
        .header("range", format!("bytes={first}-{last}"))
        .send()
        .await
        .unwrap();
    assert_eq!(part.status(), 206, "{url}");
    assert_eq!(
        part.headers()["content-range"],
        format!("bytes {first}-{last}/{}", whole.len()).as_str()
    );
    assert_eq!(part.bytes().await.unwrap(), whole[first..=last]);
    for bad in ["bytes=abc", "items=0-5", "bytes=5-2"] {
        let r = client.get(url).header("range", bad).send().await.unwrap();
        assert_eq!(r.status(), 200, "{url}: {bad}");
        assert_eq!(r.bytes().await.unwrap(), whole, "{url}: {bad}");
    }
}

fn zip_entry(zip: &[u8], name: &str) -> Vec<u8> {
    use std::io::Read;
    let mut z = zip::ZipArchive::new(std::io::Cursor::new(zip)).unwrap();
    let mut f = z.by_name(name).unwrap();
    let mut out = Vec::new();
    f.read_to_end(&mut out).unwrap();
    out
}

/// Upload, create, follow the stream to `done`, download the adapter; the zip holds the
/// very tensors the trainer wrote. Meanwhile 200 status requests all answer promptly.
#[tokio::test]
async fn job_trains_streams_and_serves_its_adapter() {
    let spec = spec();
    for backend in backends() {
        let s = server(backend, &[]).await;
        let file = upload_chat(&s).await;
        let job = create_job(
            &s,
            &file,
            json!({"max_steps": 120, "batch_size": 2, "lora_r": 4, "lora_alpha": 8, "checkpoint_interval": 40,
                   "learning_rate": 1e-3, "lora_target_modules": ["q_proj", "v_proj"]}),
        )
        .await;
        let mut errs = check_response(&spec, "/v1/fine_tuning/jobs", "post", 200, &job);
        let id = job["id"].as_str().unwrap().to_string();
        assert_eq!(job["status"], "queued");

        // Status polls while the job trains: each must answer, none may hang on training.
        let poller = {
            let url = s.url(&format!("/v1/fine_tuning/jobs/{id}"));
            tokio::spawn(async move {
                let c = reqwest::Client::new();
                let mut lat = Vec::new();
                let mut seen_running = 0;
                for _ in 0..200 {
                    let t0 = Instant::now();
                    let r = c.get(&url).send().await.unwrap();
                    assert_eq!(r.status(), 200);
                    let v: Value = r.json().await.unwrap();
                    lat.push(t0.elapsed());
                    if v["status"] == "running" {
                        seen_running += 1;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                (lat, seen_running)
            })
        };
        let frames = read_sse(&s, &id, None, None).await;
        let (mut lat, seen_running) = poller.await.unwrap();
        lat.sort();
        let p99 = lat[lat.len() * 99 / 100 - 1];
        println!("{backend:?}: 200 GET /v1/fine_tuning/jobs/{{id}} while training: p50 {:?}, p99 {p99:?}, max {:?}; {seen_running} saw running", lat[100], lat[199]);
        assert!(
            lat[199] < Duration::from_secs(1),
            "a status request took {:?}",
            lat[199]
        );
        assert!(seen_running > 0, "no poll saw the job running");

        let (_, last_ev, _) = frames.last().unwrap();
        assert_eq!(last_ev, "done");
        let metrics: Vec<Value> = frames
            .iter()
            .filter(|f| f.1 == "metrics")
            .map(|f| serde_json::from_str(&f.2).unwrap())
            .collect();
        assert_eq!(metrics.len(), 120, "one metrics event per step");
        assert!(metrics[0]["message"]
            .as_str()
            .unwrap()
            .starts_with("Step 1/120: training loss="));
        let ids: Vec<i64> = frames.iter().filter_map(|f| f.0).collect();
        assert!(
            ids.windows(2).all(|w| w[0] < w[1]),
            "event ids not increasing"
        );

        let job = wait_status(&s, &id, &["succeeded"], Duration::from_secs(10)).await;
        errs.extend(check_response(
            &spec,
            "/v1/fine_tuning/jobs/{fine_tuning_job_id}",
            "get",
            200,
            &job,
        ));
        assert_eq!(job["fine_tuned_model"], format!("ft:tiny-llama:t:{id}"));
        assert_eq!(job["progress"]["step"], 120);
        let list = get(&s, "/v1/fine_tuning/jobs?limit=5").await;
        errs.extend(check_response(
            &spec,
            "/v1/fine_tuning/jobs",
            "get",
            200,
            &list,
        ));
        let events = get(&s, &format!("/v1/fine_tuning/jobs/{id}/events?limit=1000")).await;
        errs.extend(check_response(
            &spec,
            "/v1/fine_tuning/jobs/{fine_tuning_job_id}/events",
            "get",
            200,
            &events,
        ));
        assert_eq!(
            events["data"][0]["message"],
            "The job has successfully completed"
        );
        let ckpts = get(&s, &format!("/v1/fine_tuning/jobs/{id}/checkpoints")).await;
        errs.extend(check_response(
            &spec,
            "/v1/fine_tuning/jobs/{fine_tuning_job_id}/checkpoints",
            "get",
            200,
            &ckpts,
        ));
        let steps: Vec<i64> = ckpts["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["step_number"].as_i64().unwrap())
            .collect();
        assert_eq!(steps, vec![80, 40]);

        // A checkpoint's adapter downloads as the files stored for that step.
        let ckpt_id = ckpts["data"][1]["id"].as_str().unwrap();
        let stored = |name: &str| {
            std::fs::read(s.data_dir().join(format!(
                "blobs/jobs/{id}/checkpoints/attempt-1/step-40/{name}"
            )))
            .unwrap()
        };
        let url = s.url(&format!(
            "/v1/fine_tuning/jobs/{id}/checkpoints/{ckpt_id}/adapter"
        ));
        let r = reqwest::get(&url).await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-type"], "application/zip");
        let ck_etag = r.headers()["etag"].to_str().unwrap().to_string();
        let zip = r.bytes().await.unwrap();
        for name in ["adapter_config.json", "adapter_model.safetensors"] {
            assert_eq!(zip_entry(&zip, name), stored(name), "{name} of step 40");
        }
        // The same download path as the final adapter: ETag, 304, and byte ranges.
        assert_validators_and_ranges(&url, &ck_etag, &zip, (5, 70)).await;
        let r = reqwest::get(format!("{url}?format=safetensors"))
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(
            r.bytes().await.unwrap().to_vec(),
            stored("adapter_model.safetensors")
        );
        // And as the LoRA GGUF llama.cpp loads, which training wrote beside it.
        let r = reqwest::get(format!("{url}?format=gguf")).await.unwrap();
        assert_eq!(r.status(), 200);
        assert!(r.headers()["content-disposition"]
            .to_str()
            .unwrap()
            .ends_with("-step-40-adapter_model.gguf\""));
        let gguf = r.bytes().await.unwrap().to_vec();
        assert_eq!(gguf, stored("adapter_model.gguf"));
        assert_eq!(&gguf[..4], b"GGUF");
        let r = reqwest::get(s.url(&format!(
            "/v1/fine_tuning/jobs/{id}/checkpoints/ftckpt-nope/adapter"
        )))
        .await
        .unwrap();
        assert_eq!(r.status(), 404);
        let e: Value = r.json().await.unwrap();
        assert_eq!(e["error"]["code"], "checkpoint_not_found");
        assert!(
            errs.is_empty(),
            "responses differ from openapi.yaml:\n{}",
            errs.join("\n")
        );

        // The adapter, as zip and as the bare tensor file, equals what was published; the
        // job's work folder (data copies, outputs, checkpoints) is gone with the job.
        let written = std::fs::read(
            s.data_dir()
                .join(format!("blobs/jobs/{id}/adapter_model.safetensors")),
        )
        .unwrap();
        // (The worker removes it once it has finished with the job, just after the
        // status changes.)
        let t0 = Instant::now();
        while s.data_dir().join(format!("jobs/{id}")).exists() {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "the ended job's folder stayed: {:?}",
                common::files_under(&s.data_dir().join(format!("jobs/{id}")))
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Its training file, deleted, leaves no copy anywhere under the data directory.
        let r = reqwest::Client::new()
            .delete(s.url(&format!("/v1/files/{file}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let copies: Vec<String> = common::files_under(&s.data_dir())
            .into_iter()
            .filter(|f| f.contains(file.as_str()))
            .collect();
        assert!(copies.is_empty(), "copies of the deleted file: {copies:?}");
        let r = reqwest::get(s.url(&format!("/v1/fine_tuning/jobs/{id}/adapter")))
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-type"], "application/zip");
        let etag = r.headers()["etag"].to_str().unwrap().to_string();
        assert!(r.headers()["content-disposition"]
            .to_str()
            .unwrap()
            .contains(".zip"));
        let zip = r.bytes().await.unwrap();
        assert_eq!(zip_entry(&zip, "adapter_model.safetensors"), written);
        let cfg: Value = serde_json::from_slice(&zip_entry(&zip, "adapter_config.json")).unwrap();
        assert_eq!(cfg["peft_type"], "LORA");
        assert_eq!(cfg["r"], 4);
        assert!(!zip_entry(&zip, "README.md").is_empty());
        let url = s.url(&format!("/v1/fine_tuning/jobs/{id}/adapter"));
        assert_validators_and_ranges(&url, &etag, &zip, (10, 109)).await;
        // The fine-tuned model joins the model list.
        let models = get(&s, "/v1/models").await;
        let mut errs = check_response(&spec, "/v1/models", "get", 200, &models);
        let ft = models["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["id"] == job["fine_tuned_model"])
            .cloned();
        let ft = ft.unwrap_or_else(|| panic!("{models}"));
        assert_eq!(ft["parent"], "tiny-llama");
        assert_eq!(ft["format"], "lora");
        let one = get(&s, &format!("/v1/models/{}", ft["id"].as_str().unwrap())).await;
        errs.extend(check_response(
            &spec,
            "/v1/models/{model}",
            "get",
            200,
            &one,
        ));
        assert_eq!(one["fine_tuning_job_id"], id.as_str());
        assert!(
            errs.is_empty(),
            "responses differ from openapi.yaml:\n{}",
            errs.join("\n")
        );
        let st = reqwest::get(s.url(&format!(
            "/v1/fine_tuning/jobs/{id}/adapter?format=safetensors"
        )))
        .await
        .unwrap();
        assert_eq!(st.bytes().await.unwrap().to_vec(), written);
        // The LoRA GGUF, stored as published and carried in the zip.
        let r = reqwest::get(s.url(&format!("/v1/fine_tuning/jobs/{id}/adapter?format=gguf")))
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert!(r.headers()["etag"].to_str().unwrap().len() > 60);
        let gguf = r.bytes().await.unwrap().to_vec();
        assert_eq!(gguf, zip_entry(&zip, "adapter_model.gguf"));
        assert_eq!(&gguf[..4], b"GGUF");

        // result_files: the metrics CSV and the same zip, through the files API.
        let files = job["result_files"].as_array().unwrap();
        assert_eq!(files.len(), 2);
        let csv = reqwest::get(s.url(&format!("/v1/files/{}/content", files[0].as_str().unwrap())))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(csv.starts_with("step,train_loss,valid_loss,learning_rate,tokens_per_second\n"));
        assert_eq!(csv.lines().count(), 121);
        let z2 = reqwest::get(s.url(&format!("/v1/files/{}/content", files[1].as_str().unwrap())))
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert_eq!(z2, zip);
    }
}

/// A client that drops the stream mid-job and reconnects with Last-Event-ID sees every
/// event exactly once, and the stream ends with `done`.
#[tokio::test]
async fn sse_reconnect_has_no_gap_and_no_duplicate() {
    for backend in backends() {
        let s = server(backend, &[]).await;
        let file = upload_chat(&s).await;
        let job = create_job(
            &s,
            &file,
            json!({"max_steps": 80, "batch_size": 2, "lora_r": 2}),
        )
        .await;
        let id = job["id"].as_str().unwrap().to_string();
        let first = read_sse(&s, &id, None, Some(10)).await;
        assert_eq!(first.len(), 10);
        let last = first.last().unwrap().0.unwrap();
        // The job keeps writing events while nobody listens.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let second = read_sse(&s, &id, Some(last), None).await;
        assert_eq!(second.last().unwrap().1, "done");
        let got: Vec<i64> = first.iter().chain(&second).filter_map(|f| f.0).collect();
        let unique: BTreeSet<i64> = got.iter().copied().collect();
        assert_eq!(
            unique.len(),
            got.len(),
            "duplicate events across the reconnect"
        );
        let stored = get(&s, &format!("/v1/fine_tuning/jobs/{id}/events?limit=1000")).await;
        let all: BTreeSet<i64> = stored["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                e["id"]
                    .as_str()
                    .unwrap()
                    .trim_start_matches("ftevent-")
                    .parse()
                    .unwrap()
            })
            .collect();
        assert_eq!(unique, all, "events missing from the two streams together");
    }
}

/// Cancel stops a running job promptly, leaves no adapter, and the worker goes on to
/// the next queued job.
#[tokio::test]
async fn cancel_stops_a_running_job_and_frees_the_worker() {
    for backend in backends() {
        cancel_stops_a_running_job(backend).await;
    }
}

async fn cancel_stops_a_running_job(backend: Backend) {
    let s = server(backend, &["--lease-seconds", "3"]).await;
    let file = upload_chat(&s).await;
    let long = create_job(&s, &file, json!({"max_steps": 100000, "batch_size": 2})).await;
    let next = create_job(&s, &file, json!({"max_steps": 3, "batch_size": 2})).await;
    let id = long["id"].as_str().unwrap();
    wait_step(&s, id, 2).await;
    let r: Value = reqwest::Client::new()
        .post(s.url(&format!("/v1/fine_tuning/jobs/{id}/cancel")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        r["status"] == "running" || r["status"] == "cancelled",
        "{r}"
    );
    let asked = Instant::now();
    // Within one step plus one heartbeat (a third of the 3 s lease).
    let j = wait_status(&s, id, &["cancelled"], Duration::from_secs(5)).await;
    println!("cancel took {:?}", asked.elapsed());
    assert!(j["fine_tuned_model"].is_null());
    let a = reqwest::get(s.url(&format!("/v1/fine_tuning/jobs/{id}/adapter")))
        .await
        .unwrap();
    assert_eq!(a.status(), 409);
    let n = wait_status(
        &s,
        next["id"].as_str().unwrap(),
        &["succeeded"],
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(n["progress"]["step"], 3);
    // Cancelling a finished job is refused with OpenAI's error envelope.
    let again = reqwest::Client::new()
        .post(s.url(&format!("/v1/fine_tuning/jobs/{id}/cancel")))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 400);
}

/// A server dies mid-job (SIGKILL, after a checkpoint); the next server re-claims the job
/// once the lease expires and continues it from that checkpoint, as the same job with the
/// same event stream; the dead attempt's late writes change nothing; one adapter results.
#[tokio::test]
async fn a_dead_workers_job_continues_from_its_checkpoint() {
    let mut s = server(
        Backend::Sqlite,
        &["--lease-seconds", "3", "--train-threads", "1"],
    )
    .await;
    let file = upload_chat(&s).await;
    let job = create_job(
        &s,
        &file,
        json!({"max_steps": 400, "batch_size": 2, "checkpoint_interval": 20}),
    )
    .await;
    let id = job["id"].as_str().unwrap().to_string();
    let t0 = Instant::now();
    loop {
        let c = get(&s, &format!("/v1/fine_tuning/jobs/{id}/checkpoints")).await;
        if !c["data"].as_array().unwrap().is_empty() {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no checkpoint: {}",
            s.logs()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let store = s.store().await;
    let before = store.get_job(&id).await.unwrap().unwrap();
    assert_eq!(before.attempt, 1);
    // A client following the stream before the crash...
    let seen = read_sse(&s, &id, None, Some(5)).await;
    let last = seen.last().unwrap().0.expect("event ids");
    s.crash_and_restart(&["--lease-seconds", "3", "--train-threads", "1"])
        .await;
    // ...reconnects with Last-Event-ID and sees the rest, resume included, once each.
    let rest = read_sse(&s, &id, Some(last), None).await;
    let ids: Vec<i64> = rest.iter().filter_map(|f| f.0).collect();
    assert!(
        ids.first().is_some_and(|&i| i > last),
        "replayed {last} or earlier"
    );
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "out of order or doubled"
    );
    assert!(
        rest.iter()
            .any(|f| f.2.contains("Resumed from the step-") && f.2.contains("(attempt 2)")),
        "the reconnected stream does not show the resume"
    );
    assert_eq!(rest.last().unwrap().1, "done");

    let done = wait_status(&s, &id, &["succeeded"], Duration::from_secs(120)).await;
    let after = store.get_job(&id).await.unwrap().unwrap();
    assert_eq!(after.attempt, 2, "the job was not re-claimed exactly once");
    let events = get(&s, &format!("/v1/fine_tuning/jobs/{id}/events?limit=1000")).await;
    let msgs: Vec<&str> = events["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["message"].as_str().unwrap())
        .collect();
    assert!(
        msgs.iter()
            .any(|m| m.starts_with("Resumed from the step-") && m.contains("(attempt 2)")),
        "no resume event: {msgs:?}"
    );
    // The resumed run did not start over: fewer than 400 step events from attempt 2.
    let steps_by_attempt2 = store
        .list_events(&id, None, 10_000)
        .await
        .unwrap()
        .iter()
        .filter(|e| e.attempt == 2 && e.kind == "metrics")
        .count();
    assert!(
        steps_by_attempt2 < 400 && steps_by_attempt2 > 0,
        "{steps_by_attempt2} steps in attempt 2"
    );

    // A write from the dead attempt (its lease, attempt 1) changes nothing.
    let stale = loraforge_store::Lease {
        job_id: id.clone(),
        worker_id: before.lease_owner.clone().unwrap(),
        attempt: 1,
        fencing_token: before.fencing_token,
        expires_at_ms: before.lease_expires_at_ms.unwrap(),
    };
    let e = store
        .finish_job(
            &stale,
            &loraforge_store::JobOutcome::Failed { error: "{}".into() },
        )
        .await
        .unwrap_err();
    assert!(e.is_lease_lost());
    assert!(store
        .append_job_event(&stale, "info", "message", "late", None)
        .await
        .unwrap_err()
        .is_lease_lost());
    let still = get(&s, &format!("/v1/fine_tuning/jobs/{id}")).await;
    assert_eq!(still["status"], "succeeded");
    assert_eq!(still["result_files"], done["result_files"]);
    // Exactly one adapter: one zip among the result files, one adapter blob.
    let zips = s
        .store()
        .await
        .list_files(&loraforge_store::ListFiles {
            after: None,
            limit: 100,
            order: loraforge_store::Order::Desc,
            purpose: Some("fine-tune-results".into()),
            owner: None,
        })
        .await
        .unwrap()
        .data
        .into_iter()
        .filter(|f| f.filename.ends_with("-adapter.zip"))
        .count();
    assert_eq!(zips, 1);
}

/// Pause a running job (it checkpoints and lets go), resume it, and it trains on exactly
/// as the same job run without a pause: their step-K checkpoints are the same bits.
///
/// Both jobs are endless (100,000 steps) and are cancelled once past step K, so a pause
/// can never lose a race against the end of training, however fast the machine.
#[tokio::test]
async fn pause_then_resume_gives_the_uninterrupted_adapter() {
    for backend in backends() {
        let s = server(backend, &["--lease-seconds", "3"]).await;
        let file = upload_chat(&s).await;
        let hp = json!({"max_steps": 100000, "batch_size": 2, "lora_r": 4, "lora_dropout": 0.1,
                        "learning_rate": 1e-3, "lr_scheduler": "cosine", "warmup_ratio": 0.0001,
                        "checkpoint_interval": 10, "keep_checkpoints": 1000});
        let post = |path: String| {
            let url = s.url(&path);
            async move {
                let r = reqwest::Client::new().post(url).send().await.unwrap();
                let st = r.status();
                let v: Value = r.json().await.unwrap();
                assert_eq!(st, 200, "{v}");
                v
            }
        };
        // The step-`step` checkpoint's tensors, once the job has written it.
        let checkpoint = |job: String, step: u64| {
            let s = &s;
            async move {
                let t0 = Instant::now();
                loop {
                    let c = get(s, &format!("/v1/fine_tuning/jobs/{job}/checkpoints")).await;
                    if let Some(c) = c["data"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .find(|c| c["step_number"].as_u64() == Some(step))
                    {
                        let url = s.url(&format!(
                            "/v1/fine_tuning/jobs/{job}/checkpoints/{}/adapter?format=safetensors",
                            c["id"].as_str().unwrap()
                        ));
                        return reqwest::get(url).await.unwrap().bytes().await.unwrap();
                    }
                    assert!(
                        t0.elapsed() < Duration::from_secs(120),
                        "{backend:?}: job {job} never checkpointed step {step}: {}",
                        s.logs()
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        };

        let paused = create_job(&s, &file, hp.clone()).await;
        let id = paused["id"].as_str().unwrap().to_string();
        wait_step(&s, &id, 5).await;
        post(format!("/v1/fine_tuning/jobs/{id}/pause")).await;
        let p = wait_status(&s, &id, &["paused"], Duration::from_secs(30)).await;
        let at = p["progress"]["step"].as_u64().unwrap();
        assert!(at >= 5);
        // A paused job stays put.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let still = get(&s, &format!("/v1/fine_tuning/jobs/{id}")).await;
        assert_eq!(still["status"], "paused");
        assert_eq!(still["progress"]["step"].as_u64().unwrap(), at);
        post(format!("/v1/fine_tuning/jobs/{id}/resume")).await;
        // The first regular checkpoint after the resumed run has taken a few steps.
        let k = (at / 10 + 2) * 10;
        let b = checkpoint(id.clone(), k).await;
        post(format!("/v1/fine_tuning/jobs/{id}/cancel")).await;
        wait_status(&s, &id, &["cancelled"], Duration::from_secs(30)).await;
        let events = get(&s, &format!("/v1/fine_tuning/jobs/{id}/events?limit=1000")).await;
        let msgs: Vec<&str> = events["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["message"].as_str().unwrap())
            .collect();
        assert!(
            msgs.contains(&format!("Job paused after step {at}").as_str()),
            "{msgs:?}"
        );
        assert!(
            msgs.iter()
                .any(|m| m.starts_with(&format!("Resumed from the step-{at} checkpoint"))),
            "{msgs:?}"
        );

        let plain = create_job(&s, &file, hp).await;
        let plain_id = plain["id"].as_str().unwrap().to_string();
        let a = checkpoint(plain_id.clone(), k).await;
        post(format!("/v1/fine_tuning/jobs/{plain_id}/cancel")).await;
        assert!(
            a == b,
            "{backend:?}: the paused-and-resumed step-{k} adapter differs from the uninterrupted one"
        );
    }
}

/// SIGTERM with open event streams and a running job: the server exits within 10 s, the
/// job goes back to the queue at its checkpoint, and after a restart it finishes.
#[tokio::test]
async fn sigterm_requeues_the_running_job_and_closes_streams() {
    let mut s = server(Backend::Sqlite, &["--train-threads", "1"]).await;
    let file = upload_chat(&s).await;
    let job = create_job(&s, &file, json!({"max_steps": 600, "batch_size": 2})).await;
    let id = job["id"].as_str().unwrap().to_string();
    wait_step(&s, &id, 5).await;
    // Open event streams, each reading until the server closes it.
    let mut clients = Vec::new();
    let open = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for _ in 0..50 {
        let url = s.url(&format!("/v1/fine_tuning/jobs/{id}/events?stream=true"));
        let open = open.clone();
        clients.push(tokio::spawn(async move {
            let r = reqwest::get(url).await.unwrap();
            open.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let mut body = r.bytes_stream();
            while let Some(Ok(_)) = body.next().await {}
        }));
    }
    // Every stream is open (its response head is in) before the signal.
    let t0 = Instant::now();
    while open.load(std::sync::atomic::Ordering::SeqCst) < 50 {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "streams did not open"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let asked = Instant::now();
    let status = s.terminate();
    let took = asked.elapsed();
    println!("SIGTERM with 50 SSE clients and a running job: exited {status:?} in {took:?}");
    assert!(status.success(), "{status:?}\n{}", s.logs());
    assert!(took < Duration::from_secs(10), "shutdown took {took:?}");
    for c in clients {
        tokio::time::timeout(Duration::from_secs(5), c)
            .await
            .expect("a stream stayed open")
            .unwrap();
    }
    let store = s.store().await;
    let j = store.get_job(&id).await.unwrap().unwrap();
    assert_eq!(j.status, "queued", "the job was not handed back");
    assert!(j.lease_owner.is_none());
    s.crash_and_restart(&["--train-threads", "1"]).await;
    let done = wait_status(&s, &id, &["succeeded"], Duration::from_secs(120)).await;
    assert_eq!(done["progress"]["step"], 600);
    let events = get(&s, &format!("/v1/fine_tuning/jobs/{id}/events?limit=1000")).await;
    let msgs: Vec<&str> = events["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["message"].as_str().unwrap())
        .collect();
    assert!(
        msgs.iter()
            .any(|m| m.starts_with("Worker shutting down; job re-queued after step")),
        "{msgs:?}"
    );
    assert!(
        msgs.iter().any(|m| m.starts_with("Resumed from the step-")),
        "{msgs:?}"
    );
}

/// `GET /v1/fine_tuning/jobs?metadata[key]=value` keeps the jobs whose metadata matches,
/// across pages.
#[tokio::test]
async fn jobs_are_filtered_by_metadata() {
    let s = server(Backend::Sqlite, &["--devices", "none"]).await;
    let file = upload_chat(&s).await;
    let mut team_a = Vec::new();
    for i in 0..5 {
        let team = if i % 2 == 0 { "a" } else { "b" };
        let r: Value = reqwest::Client::new()
            .post(s.url("/v1/fine_tuning/jobs"))
            .json(&json!({"model": "tiny-llama", "training_file": file, "metadata": {"team": team, "n": i}}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(r["metadata"]["team"], team);
        if team == "a" {
            team_a.push(r["id"].as_str().unwrap().to_string());
        }
    }
    team_a.reverse(); // newest first
    let page = get(&s, "/v1/fine_tuning/jobs?metadata[team]=a&limit=2").await;
    let ids: Vec<&str> = page["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        team_a[..2].iter().map(String::as_str).collect::<Vec<_>>()
    );
    assert_eq!(page["has_more"], true);
    let rest = get(
        &s,
        &format!(
            "/v1/fine_tuning/jobs?metadata[team]=a&limit=2&after={}",
            ids[1]
        ),
    )
    .await;
    let ids: Vec<&str> = rest["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![team_a[2].as_str()]);
    assert_eq!(rest["has_more"], false);
    let both = get(&s, "/v1/fine_tuning/jobs?metadata[team]=b&metadata[n]=3").await;
    assert_eq!(both["data"].as_array().unwrap().len(), 1);
    let none = get(&s, "/v1/fine_tuning/jobs?metadata[team]=c").await;
    assert_eq!(none["data"].as_array().unwrap().len(), 0);
}

/// Eight writers for 30 s on SQLite (`LORAFORGE_STRESS_SECONDS` to change it): uploads,
/// job creation (whose worker then appends events and checkpoints) and cancels, all at
/// once. None may fail, and the log must show no SQLITE_BUSY / "database is locked".
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eight_writers_for_thirty_seconds_never_see_sqlite_busy() {
    let secs: u64 = std::env::var("LORAFORGE_STRESS_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let s = std::sync::Arc::new(server(Backend::Sqlite, &["--train-threads", "1"]).await);
    let file = upload_chat(&s).await;
    let deadline = Instant::now() + Duration::from_secs(secs);
    let tasks: Vec<_> = (0..8)
        .map(|w| {
            let s = s.clone();
            let file = file.clone();
            tokio::spawn(async move {
                let c = reqwest::Client::new();
                let mut done = 0u64;
                while Instant::now() < deadline {
                    match w % 3 {
                        0 => {
                            let r = c
                                .post(s.url(&format!(
                                    "/v1/files?filename=w{w}-{done}.jsonl&purpose=fine-tune"
                                )))
                                .header("content-type", "application/jsonl")
                                .body(common::chat_jsonl(50))
                                .send()
                                .await
                                .unwrap();
                            assert_eq!(r.status(), 200, "upload by writer {w}");
                        }
                        1 => {
                            let j = create_job(
                                &s,
                                &file,
                                json!({"max_steps": 3, "batch_size": 2, "checkpoint_interval": 1}),
                            )
                            .await;
                            assert!(j["id"].is_string());
                        }
                        _ => {
                            let j =
                                create_job(&s, &file, json!({"max_steps": 50, "batch_size": 2}))
                                    .await;
                            let id = j["id"].as_str().unwrap();
                            let r = c
                                .post(s.url(&format!("/v1/fine_tuning/jobs/{id}/cancel")))
                                .send()
                                .await
                                .unwrap();
                            assert_eq!(r.status(), 200, "cancel by writer {w}");
                        }
                    }
                    done += 1;
                }
                done
            })
        })
        .collect();
    let mut total = 0;
    for t in tasks {
        total += t.await.expect("a writer failed");
    }
    let jobs = get(&s, "/v1/fine_tuning/jobs?status=succeeded&limit=100").await;
    let finished = jobs["data"].as_array().unwrap().len();
    let at_least = if finished == 100 { "at least " } else { "" };
    println!("{total} writes by 8 writers in {secs} s; meanwhile the worker finished {at_least}{finished} job(s) (events, checkpoints)");
    assert!(total >= 8, "the writers barely wrote: {total}");
    assert!(finished >= 1, "the worker wrote nothing during the run");
    common::assert_no_lock_errors(&s);
}

/// Retries with one Idempotency-Key, concurrent or not, make one job with one "Created"
/// event (a request that lost the insert race used to record a second one).
#[tokio::test]
async fn an_idempotency_key_makes_one_job_however_often_it_is_sent() {
    for backend in backends() {
        let s = server(backend, &["--devices", "none"]).await;
        let file = upload_chat(&s).await;
        let body = json!({"model": "tiny-llama", "training_file": file,
                          "hyperparameters": {"max_steps": 2}});
        let send = || {
            let (url, body) = (s.url("/v1/fine_tuning/jobs"), body.clone());
            async move {
                let r = reqwest::Client::new()
                    .post(url)
                    .header("Idempotency-Key", "retry-me")
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200);
                r.json::<Value>().await.unwrap()["id"]
                    .as_str()
                    .unwrap()
                    .to_string()
            }
        };
        let ids = futures::future::join_all((0..8).map(|_| send())).await;
        let again = send().await;
        assert!(
            ids.iter().all(|i| *i == again),
            "{backend:?}: {ids:?} vs {again}"
        );
        let jobs = get(&s, "/v1/fine_tuning/jobs").await;
        assert_eq!(
            jobs["data"].as_array().unwrap().len(),
            1,
            "{backend:?}: {jobs}"
        );
        let events = get(&s, &format!("/v1/fine_tuning/jobs/{again}/events")).await;
        let created = events["data"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["message"].as_str().unwrap_or("").starts_with("Created"))
            .count();
        assert_eq!(created, 1, "{backend:?}: {events}");
    }
}

/// Hostile-client finding 4: a follower that claims a position from the future (here
/// i64::MAX) neither freezes the job's live events for the others nor keeps them from
/// ending: every stream gets `done` when the job ends.
#[tokio::test]
async fn a_follower_from_the_future_freezes_no_one() {
    for backend in backends() {
        let s = server(backend, &["--lease-seconds", "3"]).await;
        let file = upload_chat(&s).await;
        let long = create_job(&s, &file, json!({"max_steps": 100000, "batch_size": 2})).await;
        let id = long["id"].as_str().unwrap().to_string();
        wait_step(&s, &id, 2).await;
        // The future follower comes first, so it would be the one to start the poller.
        let url = s.url(&format!("/v1/fine_tuning/jobs/{id}/events?stream=true"));
        let future = tokio::spawn(async move {
            let r = reqwest::Client::new()
                .get(url)
                .header("Last-Event-ID", i64::MAX.to_string())
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            let body = r.text().await.unwrap();
            body.contains("event: done")
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        // A normal follower sees the job move on: events after the ones it started with.
        let at = get(&s, &format!("/v1/fine_tuning/jobs/{id}")).await["progress"]["step"]
            .as_u64()
            .unwrap();
        let frames = tokio::time::timeout(
            Duration::from_secs(60),
            read_sse(&s, &id, None, Some((at as usize) * 2 + 40)),
        )
        .await
        .expect("the live events froze for this follower");
        let steps: Vec<u64> = frames
            .iter()
            .filter(|f| f.1 == "metrics")
            .filter_map(|f| serde_json::from_str::<Value>(&f.2).ok())
            .filter_map(|v| v["data"]["step"].as_u64())
            .collect();
        assert!(
            steps.iter().any(|&st| st > at + 5),
            "{backend:?}: no live step past {at}: {steps:?}"
        );
        // When the job ends, both streams end with `done`.
        reqwest::Client::new()
            .post(s.url(&format!("/v1/fine_tuning/jobs/{id}/cancel")))
            .send()
            .await
            .unwrap();
        let rest = tokio::time::timeout(Duration::from_secs(30), read_sse(&s, &id, None, None))
            .await
            .expect("a stream did not end after the job did");
        assert_eq!(rest.last().unwrap().1, "done");
        let done = tokio::time::timeout(Duration::from_secs(30), future)
            .await
            .expect("the future follower's stream did not end")
            .unwrap();
        assert!(done, "{backend:?}: the future follower got no `done`");
    }
}

/// Hostile-client findings 13, 14, 15 and 19: metadata within OpenAI's limits, an
/// Idempotency-Key that cannot be reused for another request or be empty, no suffix
/// that reads as a checkpoint, and response headers a client cannot forge.
#[tokio::test]
async fn job_creation_limits_and_headers() {
    for backend in backends() {
        let s = server(backend, &[]).await;
        let file = upload_chat(&s).await;
        let post = |body: Value, key: Option<&str>| {
            let mut r = reqwest::Client::new()
                .post(s.url("/v1/fine_tuning/jobs"))
                .json(&body);
            if let Some(k) = key {
                r = r.header("idempotency-key", k);
            }
            async move {
                let r = r.send().await.unwrap();
                (r.status().as_u16(), r.json::<Value>().await.unwrap())
            }
        };
        let base = json!({"model": "tiny-llama", "training_file": file, "hyperparameters": {"max_steps": 1}});
        let with = |k: &str, v: Value| {
            let mut b = base.clone();
            b[k] = v;
            b
        };
        let many: serde_json::Map<String, Value> =
            (0..17).map(|i| (format!("k{i}"), json!("v"))).collect();
        for (bad, why) in [
            (with("metadata", json!("str")), "an object"),
            (with("metadata", Value::Object(many)), "16 keys"),
            (with("metadata", json!({"k": "v".repeat(513)})), "512"),
            (with("metadata", json!({"k".repeat(65): "v"})), "64"),
            (with("metadata", json!({"k": [1]})), "a string"),
        ] {
            let (st, e) = post(bad, None).await;
            assert_eq!(st, 400, "{e}");
            assert_eq!(e["error"]["param"], "metadata", "{e}");
            assert!(e["error"]["message"].as_str().unwrap().contains(why), "{e}");
        }
        // A target module the model does not have is refused now, naming what it has.
        let mut typo = base.clone();
        typo["hyperparameters"]["lora_target_modules"] = json!(["q_proj", "qproj"]);
        let (st, e) = post(typo, None).await;
        assert_eq!(st, 400, "{e}");
        assert_eq!(
            e["error"]["param"], "hyperparameters.lora_target_modules",
            "{e}"
        );
        let m = e["error"]["message"].as_str().unwrap();
        assert!(
            m.contains("\"qproj\"") && m.contains("q_proj, up_proj, v_proj"),
            "{m}"
        );
        let (st, e) = post(with("suffix", json!("ckpt-step-5")), None).await;
        assert_eq!(
            (st, e["error"]["param"].as_str()),
            (400, Some("suffix")),
            "{e}"
        );

        // The same key and request: the same job. Another request: 409. No key: 400.
        let first = with("suffix", json!("first"));
        let (st, a) = post(first.clone(), Some("k-1")).await;
        assert_eq!(st, 200, "{a}");
        let (st, again) = post(first, Some("k-1")).await;
        assert_eq!((st, &again["id"]), (200, &a["id"]));
        let (st, e) = post(with("suffix", json!("second")), Some("k-1")).await;
        assert_eq!(st, 409, "{e}");
        assert_eq!(e["error"]["code"], "idempotency_key_reused", "{e}");
        let (st, e) = post(with("suffix", json!("x")), Some("")).await;
        assert_eq!(st, 400, "{e}");
        assert_eq!(e["error"]["code"], "invalid_idempotency_key", "{e}");

        // Our request id, not the client's; API answers are never sniffed or cached.
        let r = reqwest::Client::new()
            .get(s.url("/v1/files"))
            .header("x-request-id", "forged-id")
            .send()
            .await
            .unwrap();
        let h = r.headers();
        let rid = h["x-request-id"].to_str().unwrap();
        assert!(rid != "forged-id" && !rid.is_empty(), "{rid}");
        assert_eq!(h["x-content-type-options"], "nosniff");
        assert_eq!(h["cache-control"], "no-store");
    }
}

/// Hostile-client finding 12: checkpoints are pruned to the newest
/// `keep_checkpoints` (plus the best by validation loss), their files with them.
#[tokio::test]
async fn old_checkpoints_are_pruned() {
    for backend in backends() {
        let s = server(backend, &[]).await;
        let file = upload_chat(&s).await;
        let job = create_job(
            &s,
            &file,
            json!({"max_steps": 12, "batch_size": 2, "checkpoint_interval": 2, "keep_checkpoints": 2}),
        )
        .await;
        assert_eq!(job["hyperparameters"]["keep_checkpoints"], 2, "{job}");
        let id = job["id"].as_str().unwrap().to_string();
        wait_status(&s, &id, &["succeeded"], Duration::from_secs(120)).await;
        let c = get(&s, &format!("/v1/fine_tuning/jobs/{id}/checkpoints")).await;
        let steps: Vec<i64> = c["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["step_number"].as_i64().unwrap())
            .collect();
        assert_eq!(steps, vec![10, 8], "{backend:?}: {c}");
        let stored: Vec<String> = common::files_under(&s.data_dir().join("blobs"))
            .into_iter()
            .filter(|f| f.contains("/checkpoints/"))
            .collect();
        assert!(
            stored
                .iter()
                .all(|f| f.contains("step-10/") || f.contains("step-8/")),
            "{backend:?}: pruned checkpoints left files: {stored:?}"
        );
    }
}

/// Issue 17: workers report their device's memory (`GET /v1/workers`, capped here by
/// `--device-memory-mib`), a job that would not fit any worker is refused at creation
/// with both numbers, and `hyperparameters.dtype` is checked by name.
#[tokio::test]
async fn workers_report_memory_and_jobs_that_cannot_fit_are_refused() {
    for backend in backends() {
        let s = server(backend, &["--device-memory-mib", "64"]).await;
        let file = upload_chat(&s).await;
        let t0 = Instant::now();
        let workers = loop {
            let w = get(&s, "/v1/workers").await;
            if w["data"].as_array().is_some_and(|d| !d.is_empty()) {
                break w;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "no worker reported: {w}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let errs = check_response(&spec(), "/v1/workers", "get", 200, &workers);
        assert!(errs.is_empty(), "{errs:?}");
        let w = &workers["data"][0];
        assert_eq!(
            (w["device"].as_str(), w["device_kind"].as_str()),
            (Some("cpu"), Some("cpu"))
        );
        assert_eq!(w["memory_total_bytes"], 64 << 20, "{w}");
        let post = |hp: Value| {
            let r = reqwest::Client::new()
                .post(s.url("/v1/fine_tuning/jobs"))
                .json(
                    &json!({"model": "tiny-llama", "training_file": file, "hyperparameters": hp}),
                );
            async move {
                let r = r.send().await.unwrap();
                (r.status().as_u16(), r.json::<Value>().await.unwrap())
            }
        };
        // 1,024 sequences of 256 tokens keep about 2.4 GB of activations.
        let (st, e) = post(json!({"batch_size": 1024, "max_seq_len": 256})).await;
        assert_eq!(st, 400, "{e}");
        assert_eq!(e["error"]["code"], "insufficient_device_memory", "{e}");
        assert_eq!(e["error"]["param"], "hyperparameters.batch_size", "{e}");
        let m = e["error"]["message"].as_str().unwrap();
        assert!(m.contains("GiB in f32") && m.contains("has 0.1 GiB"), "{m}");
        for bad in [json!("fp64"), json!(16)] {
            let (st, e) = post(json!({"dtype": bad})).await;
            assert_eq!(st, 400, "{e}");
            assert_eq!(e["error"]["param"], "hyperparameters.dtype", "{e}");
        }
        // What fits is taken, in the precision asked for.
        let (st, j) = post(json!({"batch_size": 1, "max_steps": 2, "dtype": "bf16"})).await;
        assert_eq!(st, 200, "{j}");
        assert_eq!(j["hyperparameters"]["dtype"], "bf16", "{j}");
        wait_status(
            &s,
            j["id"].as_str().unwrap(),
            &["succeeded"],
            Duration::from_secs(120),
        )
        .await;
    }
}
