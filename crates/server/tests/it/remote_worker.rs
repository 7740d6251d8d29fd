//! `loraforge worker` processes with their own data directories, sharing only the
//! database and the blob store with an API-only `serve`.

use crate::common;

use common::{backends, copy_dir, get_json, root, upload_chat, wait_status, TestServer};
use serde_json::{json, Value};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A worker with a fresh data directory of its own.
fn worker(s: &TestServer, dir: &Path) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_loraforge"));
    for (k, _) in std::env::vars() {
        if k.starts_with("LORAFORGE_") {
            cmd.env_remove(k);
        }
    }
    cmd.arg("worker")
        .arg("--data-dir")
        .arg(dir)
        .arg("--database-url")
        .arg(&s.database_url)
        .arg("--storage-url")
        .arg(format!("file://{}", s.data_dir().join("blobs").display()))
        .arg("--models-dir")
        .arg(s.models_dir())
        .args(["--lease-seconds", "3", "--train-threads", "1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// A job trained by a remote worker; the worker dies after a checkpoint (SIGKILL) and a
/// second worker, on another data directory, continues it from the checkpoint in the
/// blob store.
#[tokio::test]
async fn a_remote_worker_trains_and_another_continues_from_the_blob_store() {
    for backend in backends() {
        let s = TestServer::start(backend, &["--devices", "none"]).await;
        copy_dir(
            &root().join("tests/fixtures/tiny-llama"),
            &s.models_dir().join("tiny-llama"),
        );
        let c = reqwest::Client::new();
        let file = upload_chat(&s).await;
        let job: Value = c
            .post(s.url("/v1/fine_tuning/jobs"))
            .json(&json!({"model": "tiny-llama", "training_file": file,
                          "hyperparameters": {"max_steps": 400, "batch_size": 2, "checkpoint_interval": 20}}))
            .send().await.unwrap().json().await.unwrap();
        let id = job["id"].as_str().unwrap().to_string();
        // The API alone never starts it.
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert_eq!(
            get_json(&s, &format!("/v1/fine_tuning/jobs/{id}")).await["status"],
            "queued"
        );

        let dirs = tempfile::tempdir().unwrap();
        let mut w1 = worker(&s, &dirs.path().join("w1"));
        let t0 = Instant::now();
        loop {
            let ck: Value = reqwest::get(s.url(&format!("/v1/fine_tuning/jobs/{id}/checkpoints")))
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if !ck["data"].as_array().unwrap().is_empty() {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "no checkpoint from the remote worker"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        w1.kill().unwrap();
        w1.wait().unwrap();
        let mut w2 = worker(&s, &dirs.path().join("w2"));
        let done = wait_status(&s, &id, &["succeeded", "failed"], Duration::from_secs(120)).await;
        assert_eq!(done["status"], "succeeded", "{done}");
        let events: Value =
            reqwest::get(s.url(&format!("/v1/fine_tuning/jobs/{id}/events?limit=1000")))
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
        let msgs: Vec<&str> = events["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["message"].as_str().unwrap())
            .collect();
        assert!(
            msgs.iter()
                .any(|m| m.starts_with("Resumed from the step-") && m.contains("(attempt 2)")),
            "{msgs:?}"
        );
        // The second worker resumed from the blob store's checkpoint (the message above)
        // and, the job done, kept no folder for it.
        let t0 = std::time::Instant::now();
        while dirs.path().join(format!("w2/jobs/{id}")).exists() {
            assert!(
                t0.elapsed() < std::time::Duration::from_secs(30),
                "the worker kept the ended job's folder"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        // Only now: the worker removes the folder just after it records the job's end,
        // and killing it as soon as the status reads "succeeded" could beat it to that.
        let _ = w2.kill();
        let _ = w2.wait();
        let zip = reqwest::get(s.url(&format!("/v1/fine_tuning/jobs/{id}/adapter")))
            .await
            .unwrap();
        assert_eq!(zip.status(), 200);
    }
}
