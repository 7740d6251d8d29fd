//! Limits: the JSON body cap, and the per-owner caps on active jobs and stored bytes,
//! each a clear error in OpenAI's envelope that loses nothing and leaves nothing behind.

use crate::common;

use common::{backends, chat_jsonl, copy_dir, files_under, post_json, root, Backend, TestServer};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

async fn upload(s: &TestServer, key: &str, body: String) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(s.url("/v1/files?filename=t.jsonl&purpose=fine-tune"))
        .bearer_auth(key)
        .header("content-type", "application/jsonl")
        .body(body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

/// Keys made after start-up are enforced within seconds: wait until they are.
async fn wait_keys_enforced(s: &TestServer, key: &str) {
    let t0 = Instant::now();
    loop {
        let open = reqwest::get(s.url("/v1/files")).await.unwrap().status();
        let keyed = reqwest::Client::new()
            .get(s.url("/v1/files"))
            .bearer_auth(key)
            .send()
            .await
            .unwrap()
            .status();
        if open == 401 && keyed == 200 {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "keys never enforced"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn json_bodies_over_the_cap_are_413_before_being_read() {
    let s = TestServer::start(Backend::Sqlite, &["--max-json-bytes", "2000"]).await;
    let big = json!({"model": "tiny-llama", "training_file": "file-x", "metadata": {"note": "x".repeat(5000)}});
    for path in [
        "/v1/fine_tuning/jobs",
        "/v1/chat/completions",
        "/v1/completions",
    ] {
        let (st, e) = post_json(&s, path, None, &big).await;
        assert_eq!(st, 413, "{path}: {e}");
        assert_eq!(e["error"]["code"], "request_too_large", "{path}: {e}");
        assert!(e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("2000 bytes"));
    }
    // Under the cap the request is read and judged on its merits.
    let (st, e) = post_json(
        &s,
        "/v1/fine_tuning/jobs",
        None,
        &json!({"model": "nope", "training_file": "file-x"}),
    )
    .await;
    assert_eq!(st, 400, "{e}");
}

#[tokio::test]
async fn each_owner_has_its_own_cap_on_active_jobs() {
    for backend in backends() {
        active_jobs_cap(backend).await;
    }
}

async fn active_jobs_cap(backend: Backend) {
    let s = TestServer::start(
        backend,
        &["--devices", "none", "--max-active-jobs-per-owner", "2"],
    )
    .await;
    copy_dir(
        &root().join("tests/fixtures/tiny-llama"),
        &s.models_dir().join("tiny-llama"),
    );
    let a = s.create_key("a", false);
    let b = s.create_key("b", false);
    wait_keys_enforced(&s, &a).await;
    let mut files = Vec::new();
    for k in [&a, &b] {
        let (st, f) = upload(&s, k, chat_jsonl(5)).await;
        assert_eq!(st, 200, "{f}");
        files.push(f["id"].as_str().unwrap().to_string());
    }
    let job = |i: usize| json!({"model": "tiny-llama", "training_file": files[i]});
    for _ in 0..2 {
        let (st, j) = post_json(&s, "/v1/fine_tuning/jobs", Some(&a), &job(0)).await;
        assert_eq!(st, 200, "{j}");
    }
    let (st, e) = post_json(&s, "/v1/fine_tuning/jobs", Some(&a), &job(0)).await;
    assert_eq!(st, 429, "{e}");
    assert_eq!(e["error"]["code"], "too_many_active_jobs");
    assert!(e["error"]["message"]
        .as_str()
        .unwrap()
        .contains("2 queued or running"));
    // Another owner is not held back by the first one's jobs.
    let (st, j) = post_json(&s, "/v1/fine_tuning/jobs", Some(&b), &job(1)).await;
    assert_eq!(st, 200, "{j}");
    // A cancelled job frees its slot.
    let list: Value = reqwest::Client::new()
        .get(s.url("/v1/fine_tuning/jobs"))
        .bearer_auth(&a)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let first = list["data"][0]["id"].as_str().unwrap().to_string();
    let (st, _) = post_json(
        &s,
        &format!("/v1/fine_tuning/jobs/{first}/cancel"),
        Some(&a),
        &json!({}),
    )
    .await;
    assert_eq!(st, 200);
    let (st, j) = post_json(&s, "/v1/fine_tuning/jobs", Some(&a), &job(0)).await;
    assert_eq!(st, 200, "{j}");
}

#[tokio::test]
async fn each_owner_has_its_own_storage_quota() {
    for backend in backends() {
        storage_quota(backend).await;
    }
}

async fn storage_quota(backend: Backend) {
    let body = chat_jsonl(40);
    let quota = body.len() * 3 / 2;
    let s = TestServer::start(
        backend,
        &["--max-stored-bytes-per-owner", &quota.to_string()],
    )
    .await;
    let a = s.create_key("a", false);
    let b = s.create_key("b", false);
    wait_keys_enforced(&s, &a).await;
    let (st, f) = upload(&s, &a, body.clone()).await;
    assert_eq!(st, 200, "{f}");
    let blobs_before = files_under(&s.data_dir().join("blobs"));
    let (st, e) = upload(&s, &a, body.clone()).await;
    assert_eq!(st, 413, "{e}");
    assert_eq!(e["error"]["code"], "storage_quota_exceeded");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains(&format!("quota of {quota}")),
        "{e}"
    );
    // Nothing of the refused upload is kept: no row, no blob, no temp file.
    let list: Value = reqwest::Client::new()
        .get(s.url("/v1/files"))
        .bearer_auth(&a)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["data"].as_array().unwrap().len(), 1, "{list}");
    assert_eq!(files_under(&s.data_dir().join("blobs")), blobs_before);
    assert!(files_under(&s.data_dir().join("tmp")).is_empty());
    // The other owner has a quota of its own; deleting frees room.
    let (st, f2) = upload(&s, &b, body.clone()).await;
    assert_eq!(st, 200, "{f2}");
    let id = f["id"].as_str().unwrap();
    let r = reqwest::Client::new()
        .delete(s.url(&format!("/v1/files/{id}")))
        .bearer_auth(&a)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (st, f3) = upload(&s, &a, body).await;
    assert_eq!(st, 200, "{f3}");
}
