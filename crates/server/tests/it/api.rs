//! End-to-end tests of the HTTP API: each starts the real server binary on a random
//! port, against SQLite and, when `TEST_DATABASE_URL` is set, PostgreSQL.

use crate::common;

use common::{
    backends, chat_jsonl, chat_line, check_response, files_under, spec, upload_raw, Backend,
    TestServer,
};
use futures::StreamExt;
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `bytes` as a streamed (chunked) request body, 64 KiB a chunk, as a client that does
/// not announce its length sends it.
fn streamed(bytes: &[u8]) -> reqwest::Body {
    let chunks: Vec<Result<bytes::Bytes, std::io::Error>> = bytes
        .chunks(64 << 10)
        .map(|c| Ok(bytes::Bytes::copy_from_slice(c)))
        .collect();
    reqwest::Body::wrap_stream(futures::stream::iter(chunks))
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(300))
        .build()
        .unwrap()
}

async fn upload_multipart(s: &TestServer, filename: &str, body: Vec<u8>) -> (u16, Value) {
    let form = reqwest::multipart::Form::new()
        .text("purpose", "fine-tune")
        .part(
            "file",
            reqwest::multipart::Part::bytes(body).file_name(filename.to_string()),
        );
    let r = client()
        .post(s.url("/v1/files"))
        .multipart(form)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

async fn get_json(s: &TestServer, path: &str) -> (u16, Value) {
    let r = client().get(s.url(path)).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

fn assert_error(body: &Value, code: Option<&str>) {
    let e = &body["error"];
    assert!(e["message"].is_string(), "not an error envelope: {body}");
    assert!(e["type"].is_string(), "{body}");
    assert!(
        e.get("param").is_some() && e.get("code").is_some(),
        "{body}"
    );
    if let Some(code) = code {
        assert_eq!(e["code"], code, "{body}");
    }
}

/// A stream of `n` valid chat lines in ~256 KiB chunks, hashed as it is produced.
fn jsonl_stream(
    total_bytes: u64,
    hasher: std::sync::Arc<std::sync::Mutex<(Sha256, u64, u64)>>,
) -> impl futures::Stream<Item = Result<bytes::Bytes, std::io::Error>> {
    futures::stream::unfold((0usize, 0u64), move |(i, sent)| {
        let hasher = hasher.clone();
        async move {
            if sent >= total_bytes {
                return None;
            }
            let mut chunk = String::with_capacity(260 << 10);
            let mut i = i;
            let pad = "x".repeat(900);
            while chunk.len() < 256 << 10 && sent + (chunk.len() as u64) < total_bytes {
                chunk.push_str(&format!(
                    "{{\"messages\":[{{\"role\":\"user\",\"content\":\"question {i}\"}},\
                     {{\"role\":\"assistant\",\"content\":\"answer {i} {pad}\"}}]}}\n"
                ));
                i += 1;
            }
            let mut h = hasher.lock().unwrap();
            h.0.update(chunk.as_bytes());
            h.1 += chunk.len() as u64;
            h.2 = i as u64;
            let n = chunk.len() as u64;
            Some((Ok(bytes::Bytes::from(chunk)), (i, sent + n)))
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_1_gib_upload_streams_with_bounded_memory() {
    for backend in backends() {
        // Just over the default 1 GiB cap: the stream ends after the line that crosses 1 GiB.
        let s = TestServer::start(backend, &["--max-upload-bytes", "1100000000"]).await;
        // Warm up the paths an upload uses, so the baseline includes them.
        let (st, _) = upload_raw(&s, "warm.jsonl", chat_jsonl(10)).await;
        assert_eq!(st, 200);
        let rss_before = s.proc_kb("VmRSS");

        // Sample RSS while the upload runs (VmHWM also records the peak).
        let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(rss_before));
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sampler = {
            let (peak, done, pid) = (peak.clone(), done.clone(), s.pid());
            std::thread::spawn(move || {
                while !done.load(std::sync::atomic::Ordering::SeqCst) {
                    if let Ok(st) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
                        if let Some(kb) = st
                            .lines()
                            .find_map(|l| l.strip_prefix("VmRSS:"))
                            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                        {
                            peak.fetch_max(kb, std::sync::atomic::Ordering::SeqCst);
                        }
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
        };

        let size = 1u64 << 30;
        let hasher = std::sync::Arc::new(std::sync::Mutex::new((Sha256::new(), 0u64, 0u64)));
        let t0 = Instant::now();
        let body = reqwest::Body::wrap_stream(jsonl_stream(size, hasher.clone()));
        let (st, f) = upload_raw(&s, "big.jsonl", body).await;
        let took = t0.elapsed();
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        sampler.join().unwrap();
        assert_eq!(st, 200, "{f}");

        let (h, sent, lines) = {
            let g = hasher.lock().unwrap();
            (hex::encode(g.0.clone().finalize()), g.1, g.2)
        };
        assert!(sent >= size);
        assert_eq!(f["bytes"], sent, "{f}");
        assert_eq!(f["sha256"], h, "{f}");
        assert_eq!(f["status"], "processed", "{f}");
        assert_eq!(f["format"], "chat");
        assert_eq!(f["examples"], lines);

        let hwm = s.proc_kb("VmHWM");
        let peak = peak.load(std::sync::atomic::Ordering::SeqCst).max(hwm);
        let growth_mb = (peak.saturating_sub(rss_before)) as f64 / 1024.0;
        eprintln!(
            "{backend:?}: {} MiB in {took:.1?}; RSS {rss_before} kB before, peak {peak} kB: +{growth_mb:.1} MiB",
            sent >> 20
        );
        assert!(
            growth_mb < 64.0,
            "RSS grew by {growth_mb:.1} MiB during the upload"
        );

        // The content comes back byte for byte (hashed while streaming).
        let r = client()
            .get(s.url(&format!("/v1/files/{}/content", f["id"].as_str().unwrap())))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["etag"], format!("\"{h}\"").as_str());
        let mut stream = r.bytes_stream();
        let mut dh = Sha256::new();
        let mut n = 0u64;
        while let Some(c) = stream.next().await {
            let c = c.unwrap();
            n += c.len() as u64;
            dh.update(&c);
        }
        assert_eq!((n, hex::encode(dh.finalize())), (sent, h));
    }
}

async fn assert_nothing_left(s: &TestServer) {
    let data = s.data_dir();
    let tmp = files_under(&data.join("tmp"));
    assert!(tmp.is_empty(), "temp files left behind: {tmp:?}");
    let blobs = files_under(&data.join("blobs"));
    assert!(blobs.is_empty(), "blobs left behind: {blobs:?}");
    let (st, list) = get_json(s, "/v1/files").await;
    assert_eq!(st, 200);
    assert_eq!(
        list["data"].as_array().unwrap().len(),
        0,
        "rows left: {list}"
    );
}

/// Reads an HTTP/1.1 status line from a raw socket.
async fn raw_status(sock: &mut tokio::net::TcpStream) -> String {
    let mut buf = vec![0u8; 4096];
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !got.windows(2).any(|w| w == b"\r\n") {
        let n = tokio::time::timeout_at(deadline.into(), sock.read(&mut buf))
            .await
            .expect("no response")
            .unwrap();
        assert!(n > 0, "connection closed without a response");
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&got)
        .lines()
        .next()
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn over_cap_uploads_are_413_and_leave_nothing_behind() {
    for backend in backends() {
        let s = TestServer::start(backend, &["--max-upload-bytes", "1048576"]).await;
        let addr = s.base.trim_start_matches("http://").to_string();

        // Announced too large: refused before a byte of the body is sent.
        for ctype in ["application/jsonl", "multipart/form-data; boundary=x"] {
            let mut sock = tokio::net::TcpStream::connect(&addr).await.unwrap();
            let head = format!(
                "POST /v1/files?filename=a.jsonl HTTP/1.1\r\nHost: {addr}\r\n\
                 Content-Type: {ctype}\r\nContent-Length: 10737418240\r\n\r\n"
            );
            sock.write_all(head.as_bytes()).await.unwrap();
            let status = raw_status(&mut sock).await;
            assert!(status.starts_with("HTTP/1.1 413"), "{ctype}: {status}");
        }

        // Not announced (chunked): cut off mid-stream once past the cap.
        let big = chat_jsonl(40_000); // ~3 MB
        assert!(big.len() > 2 << 20);
        let r = client()
            .post(s.url("/v1/files?filename=big.jsonl"))
            .header("content-type", "application/jsonl")
            .body(streamed(big.as_bytes()))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 413);
        assert_error(&r.json().await.unwrap(), Some("file_too_large"));

        // Multipart, chunked: the same.
        let form = reqwest::multipart::Form::new()
            .text("purpose", "fine-tune")
            .part(
                "file",
                reqwest::multipart::Part::stream(streamed(big.as_bytes())).file_name("big.jsonl"),
            );
        let r = client()
            .post(s.url("/v1/files"))
            .multipart(form)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 413);
        assert_error(&r.json().await.unwrap(), Some("file_too_large"));

        assert_nothing_left(&s).await;
        // Just under the cap is fine.
        let (st, f) = upload_raw(&s, "ok.jsonl", chat_jsonl(100)).await;
        assert_eq!((st, f["status"].as_str()), (200, Some("processed")), "{f}");
    }
}

#[tokio::test]
async fn a_bad_line_7_is_reported_as_line_7() {
    let mut body = chat_jsonl(6);
    body.push_str("{\"messages\": []}\n");
    body.push_str(&chat_jsonl(5));
    let fixture =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/data/bad-line7.jsonl");
    for backend in backends() {
        let s = TestServer::start(backend, &[]).await;
        let mut cases = vec![("raw", upload_raw(&s, "bad.jsonl", body.clone()).await)];
        cases.push((
            "multipart",
            upload_multipart(&s, "bad.jsonl", body.clone().into_bytes()).await,
        ));
        if let Ok(bytes) = std::fs::read(&fixture) {
            cases.push((
                "fixture",
                upload_multipart(&s, "bad-line7.jsonl", bytes).await,
            ));
        }
        for (how, (st, f)) in cases {
            assert_eq!(st, 200, "{how}: {f}");
            assert_eq!(f["status"], "error", "{how}: {f}");
            let errors = f["validation_errors"].as_array().unwrap();
            assert_eq!(errors.len(), 1, "{how}: {f}");
            let e = errors[0].as_str().unwrap();
            assert!(e.starts_with("line 7: "), "{how}: {e}");
            assert!(
                e.contains("\"messages\" must be a non-empty array"),
                "{how}: {e}"
            );
            assert!(
                f["status_details"]
                    .as_str()
                    .unwrap()
                    .starts_with("line 7: "),
                "{f}"
            );
            // and it stays that way on retrieval
            let (st, again) =
                get_json(&s, &format!("/v1/files/{}", f["id"].as_str().unwrap())).await;
            assert_eq!(st, 200);
            assert_eq!(again, f);
        }
    }
}

#[tokio::test]
async fn a_traversal_filename_is_harmless_metadata() {
    let passwd_before = std::fs::read("/etc/passwd").ok();
    for backend in backends() {
        let s = TestServer::start(backend, &[]).await;
        let name = "../../etc/passwd";
        let (st1, a) = upload_raw(&s, name, chat_jsonl(3)).await;
        let (st2, b) = upload_multipart(&s, name, chat_jsonl(3).into_bytes()).await;
        for (st, f) in [(st1, &a), (st2, &b)] {
            assert_eq!(st, 200, "{f}");
            assert_eq!(f["filename"], name);
            assert_eq!(f["status"], "processed");
        }
        // Stored under server-made names only.
        let blobs = files_under(&s.data_dir().join("blobs"));
        assert_eq!(blobs, {
            let mut v = vec![
                format!("files/{}.jsonl", a["id"].as_str().unwrap()),
                format!("files/{}.jsonl", b["id"].as_str().unwrap()),
            ];
            v.sort();
            v
        });
        let outside = files_under(s.dir.path());
        assert!(
            outside.iter().all(|p| p.starts_with("data/")),
            "files outside the data dir: {outside:?}"
        );
        let r = client()
            .get(s.url(&format!("/v1/files/{}/content", a["id"].as_str().unwrap())))
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.headers()["content-disposition"],
            "attachment; filename=\"passwd\""
        );
        assert_eq!(r.text().await.unwrap(), chat_jsonl(3));
    }
    assert_eq!(std::fs::read("/etc/passwd").ok(), passwd_before);
}

#[tokio::test]
async fn pagination_walks_three_pages() {
    for backend in backends() {
        let s = TestServer::start(backend, &[]).await;
        let mut ids = Vec::new();
        for i in 0..7 {
            let (st, f) = upload_raw(&s, &format!("f{i}.jsonl"), chat_line(i)).await;
            assert_eq!(st, 200, "{f}");
            ids.push(f["id"].as_str().unwrap().to_string());
        }
        ids.reverse(); // newest first
        let mut seen = Vec::new();
        let mut after: Option<String> = None;
        let mut pages = Vec::new();
        loop {
            let q = match &after {
                Some(a) => format!("/v1/files?limit=3&after={a}"),
                None => "/v1/files?limit=3".to_string(),
            };
            let (st, page) = get_json(&s, &q).await;
            assert_eq!(st, 200, "{page}");
            assert_eq!(page["object"], "list");
            let data = page["data"].as_array().unwrap();
            pages.push((data.len(), page["has_more"].as_bool().unwrap()));
            seen.extend(data.iter().map(|f| f["id"].as_str().unwrap().to_string()));
            assert_eq!(
                page["last_id"],
                data.last().map(|f| f["id"].clone()).unwrap_or(Value::Null)
            );
            after = data.last().map(|f| f["id"].as_str().unwrap().to_string());
            if !page["has_more"].as_bool().unwrap() {
                break;
            }
            assert!(pages.len() < 10, "pagination does not end");
        }
        assert_eq!(pages, [(3, true), (3, true), (1, false)]);
        assert_eq!(seen, ids);

        let (_, asc) = get_json(&s, "/v1/files?order=asc&limit=2").await;
        let asc_ids: Vec<_> = asc["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["id"].as_str().unwrap())
            .collect();
        assert_eq!(asc_ids, [ids[6].as_str(), ids[5].as_str()]);

        for bad in [
            "/v1/files?limit=0",
            "/v1/files?limit=abc",
            "/v1/files?after=file-nope",
            "/v1/files?order=up",
        ] {
            let (st, e) = get_json(&s, bad).await;
            assert_eq!(st, 400, "{bad}: {e}");
            assert_error(&e, None);
        }
        let (_, none) = get_json(&s, "/v1/files?purpose=batch").await;
        assert_eq!(none["data"].as_array().unwrap().len(), 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_concurrent_uploads_never_see_sqlite_busy() {
    for backend in backends() {
        let s = std::sync::Arc::new(TestServer::start(backend, &[]).await);
        let tasks: Vec<_> = (0..8)
            .map(|i| {
                let s = s.clone();
                tokio::spawn(async move {
                    let body = chat_jsonl(20_000 + i); // ~1.3 MB each
                    if i % 2 == 0 {
                        upload_raw(&s, &format!("c{i}.jsonl"), body).await
                    } else {
                        upload_multipart(&s, &format!("c{i}.jsonl"), body.into_bytes()).await
                    }
                })
            })
            .collect();
        for (i, t) in tasks.into_iter().enumerate() {
            let (st, f) = t.await.unwrap();
            assert_eq!(st, 200, "upload {i}: {f}\n{}", s.logs());
            assert_eq!(f["status"], "processed");
            assert_eq!(f["examples"], 20_000 + i);
        }
        let (_, list) = get_json(&s, "/v1/files").await;
        assert_eq!(list["data"].as_array().unwrap().len(), 8);
        common::assert_no_lock_errors(&s);
    }
}

#[tokio::test]
async fn retrieve_content_delete_and_errors() {
    for backend in backends() {
        let s = TestServer::start(backend, &[]).await;
        let body = chat_jsonl(4);
        let (st, f) = upload_raw(&s, "t.jsonl", body.clone()).await;
        assert_eq!(st, 200);
        let id = f["id"].as_str().unwrap().to_string();
        assert!(id.starts_with("file-"));
        assert_eq!(f["object"], "file");
        assert_eq!(f["purpose"], "fine-tune");
        assert_eq!(f["bytes"], body.len());
        assert_eq!(f["examples"], 4);
        assert_eq!(f["status_details"], Value::Null);
        assert_eq!(f["sha256"], hex::encode(Sha256::digest(body.as_bytes())));

        let (st, got) = get_json(&s, &format!("/v1/files/{id}")).await;
        assert_eq!((st, &got), (200, &f));
        let r = client()
            .get(s.url(&format!("/v1/files/{id}/content")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(
            r.headers()["content-length"],
            body.len().to_string().as_str()
        );
        assert_eq!(r.text().await.unwrap(), body);

        // A queued or running job holds the file.
        let store = s.store().await;
        store
            .insert_job(&loraforge_store::NewJob {
                id: "ftjob-holder".into(),
                api_key_id: None,
                model: "tiny".into(),
                training_file: id.clone(),
                validation_file: None,
                suffix: None,
                spec: "{}".into(),
                priority: 0,
                max_attempts: 1,
                idempotency_key: None,
                device_kind: None,
            })
            .await
            .unwrap();
        for status in [
            loraforge_store::JobStatus::Queued,
            loraforge_store::JobStatus::Running,
        ] {
            store.set_job_status("ftjob-holder", status).await.unwrap();
            let r = client()
                .delete(s.url(&format!("/v1/files/{id}")))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 409);
            assert_eq!(r.headers()["x-should-retry"], "false");
            assert_error(&r.json().await.unwrap(), Some("file_in_use"));
        }
        store
            .set_job_status("ftjob-holder", loraforge_store::JobStatus::Succeeded)
            .await
            .unwrap();
        store.close().await;

        let r = client()
            .delete(s.url(&format!("/v1/files/{id}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let d: Value = r.json().await.unwrap();
        assert_eq!(
            d,
            serde_json::json!({"id": id, "object": "file", "deleted": true})
        );
        assert!(files_under(&s.data_dir().join("blobs")).is_empty());
        for path in [format!("/v1/files/{id}"), format!("/v1/files/{id}/content")] {
            let (st, e) = get_json(&s, &path).await;
            assert_eq!(st, 404, "{path}");
            assert_error(&e, Some("file_not_found"));
        }
        let r = client()
            .delete(s.url(&format!("/v1/files/{id}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404);

        // Wrong media type, purpose, filename; incomplete multipart.
        let r = client()
            .post(s.url("/v1/files"))
            .header("content-type", "text/plain")
            .body("x")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 415);
        assert_error(&r.json().await.unwrap(), None);
        let r = client()
            .post(s.url("/v1/files?purpose=assistants"))
            .header("content-type", "application/jsonl")
            .body(chat_jsonl(1))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400);
        let e: Value = r.json().await.unwrap();
        assert_eq!(e["error"]["param"], "purpose");
        let r = client()
            .post(s.url("/v1/files"))
            .multipart(reqwest::multipart::Form::new().text("purpose", "fine-tune"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400);
        let e: Value = r.json().await.unwrap();
        assert_eq!(e["error"]["param"], "file");
        let (st, e) = get_json(&s, "/v1/nowhere").await;
        assert_eq!(st, 404);
        assert_error(&e, Some("unknown_url"));

        // An empty file is an error object, not a failed request.
        let (st, f) = upload_raw(&s, "empty.jsonl", "").await;
        assert_eq!((st, f["status"].as_str()), (200, Some("error")), "{f}");
    }
}

/// Writes a tiny llama-style HF folder: config.json + a safetensors file whose
/// header declares `params` f32 parameters.
fn write_hf_model(dir: &std::path::Path, model_type: &str, shapes: &[(&str, &[usize])]) -> u64 {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("config.json"),
        format!("{{\"model_type\":\"{model_type}\",\"max_position_embeddings\":128}}"),
    )
    .unwrap();
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    let mut total = 0u64;
    for (name, shape) in shapes {
        let n: usize = shape.iter().product();
        total += n as u64;
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + 4 * n]}),
        );
        offset += 4 * n;
    }
    let h = serde_json::to_vec(&header).unwrap();
    let mut bytes = (h.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&h);
    bytes.extend(std::iter::repeat_n(0u8, offset));
    std::fs::write(dir.join("model.safetensors"), bytes).unwrap();
    total
}

#[tokio::test]
async fn models_are_listed_from_the_models_dir() {
    let s = TestServer::start(Backend::Sqlite, &[]).await;
    let (st, empty) = get_json(&s, "/v1/models").await;
    assert_eq!(st, 200);
    assert_eq!(empty, serde_json::json!({"object": "list", "data": []}));

    let params = write_hf_model(
        &s.models_dir().join("tiny-llama"),
        "llama",
        &[
            ("model.embed_tokens.weight", &[32, 8]),
            ("lm_head.weight", &[32, 8]),
        ],
    );
    write_hf_model(&s.models_dir().join("odd-gpt2"), "gpt2", &[("w", &[2, 2])]);
    std::fs::create_dir_all(s.models_dir().join("not-a-model")).unwrap();

    let (st, list) = get_json(&s, "/v1/models").await;
    assert_eq!(st, 200);
    let ids: Vec<_> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["odd-gpt2", "tiny-llama"]);

    let (st, m) = get_json(&s, "/v1/models/tiny-llama").await;
    assert_eq!(st, 200, "{m}");
    assert_eq!(m["object"], "model");
    assert_eq!(m["owned_by"], "loraforge");
    assert_eq!(m["format"], "hf");
    assert_eq!(m["architecture"], "llama");
    assert_eq!(m["parameters"], params);
    assert_eq!(m["context_length"], 128);
    assert_eq!(m["trainable"], true);
    assert_eq!(m["tasks"], serde_json::json!(["causal_lm"]));
    assert_eq!(m["note"], Value::Null);
    assert!(m["created"].as_i64().unwrap() > 0);
    assert!(m.get("path").is_none(), "server paths must not leak: {m}");

    let (_, gpt2) = get_json(&s, "/v1/models/odd-gpt2").await;
    assert_eq!(gpt2["trainable"], false);
    assert_eq!(gpt2["tasks"], serde_json::json!([]));
    assert!(gpt2["note"].as_str().unwrap().contains("gpt2"), "{gpt2}");

    let (st, e) = get_json(&s, "/v1/models/nope").await;
    assert_eq!(st, 404);
    assert_error(&e, Some("model_not_found"));
}

#[tokio::test]
async fn health_spec_cors_auth_and_graceful_shutdown() {
    let mut s = TestServer::start(
        Backend::Sqlite,
        &[
            "--cors-origins",
            "http://app.example",
            "--api-key",
            "sekret",
        ],
    )
    .await;
    assert_eq!(
        get_json(&s, "/healthz").await,
        (200, serde_json::json!({"status": "ok"}))
    );
    assert_eq!(
        get_json(&s, "/readyz").await,
        (200, serde_json::json!({"status": "ready"}))
    );
    let r = client().get(s.url("/openapi.yaml")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/yaml");
    let served = r.text().await.unwrap();
    let committed =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../openapi.yaml"))
            .unwrap();
    assert_eq!(served, committed);

    // API key on /v1 only.
    let (st, e) = get_json(&s, "/v1/files").await;
    assert_eq!(st, 401);
    assert_error(&e, Some("invalid_api_key"));
    let r = client()
        .get(s.url("/v1/files"))
        .bearer_auth("wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = client()
        .get(s.url("/v1/files"))
        .bearer_auth("sekret")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().contains_key("x-request-id"));

    // CORS for the configured origin only.
    let r = client()
        .request(reqwest::Method::OPTIONS, s.url("/v1/files"))
        .header("origin", "http://app.example")
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization,content-type",
        )
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "http://app.example"
    );
    let r = client()
        .get(s.url("/healthz"))
        .header("origin", "http://evil.example")
        .send()
        .await
        .unwrap();
    assert!(!r.headers().contains_key("access-control-allow-origin"));

    let status = s.terminate();
    assert!(status.success(), "exit status {status}");
    assert!(s.logs().contains("stopped"), "{}", s.logs());
}

// ---- the responses against openapi.yaml ------------------------------------

#[tokio::test]
async fn responses_match_openapi_yaml() {
    let spec = spec();
    let s = TestServer::start(Backend::Sqlite, &["--max-upload-bytes", "100000"]).await;
    write_hf_model(&s.models_dir().join("tiny"), "llama", &[("w", &[4, 4])]);
    let mut seen: Vec<(&str, &str, u16, Value)> = Vec::new();

    let (st, ok) = upload_raw(&s, "a.jsonl", chat_jsonl(3)).await;
    seen.push(("/v1/files", "post", st, ok.clone()));
    let (st, bad) = upload_multipart(&s, "b.jsonl", b"{\"nope\": 1}\n".to_vec()).await;
    assert_eq!(bad["status"], "error");
    seen.push(("/v1/files", "post", st, bad.clone()));
    let (st, big) = upload_raw(&s, "c.jsonl", chat_jsonl(3000)).await;
    assert_eq!(st, 413);
    seen.push(("/v1/files", "post", st, big));
    let r = client()
        .post(s.url("/v1/files"))
        .header("content-type", "text/csv")
        .body("a,b")
        .send()
        .await
        .unwrap();
    seen.push((
        "/v1/files",
        "post",
        r.status().as_u16(),
        r.json().await.unwrap(),
    ));
    let id = ok["id"].as_str().unwrap();
    for (path, route) in [
        ("/v1/files?limit=1".to_string(), "/v1/files"),
        ("/v1/files?after=nope".to_string(), "/v1/files"),
        (format!("/v1/files/{id}"), "/v1/files/{file_id}"),
        ("/v1/files/file-nope".to_string(), "/v1/files/{file_id}"),
        ("/v1/models".to_string(), "/v1/models"),
        ("/v1/models/tiny".to_string(), "/v1/models/{model}"),
        ("/v1/models/nope".to_string(), "/v1/models/{model}"),
        ("/healthz".to_string(), "/healthz"),
        ("/readyz".to_string(), "/readyz"),
    ] {
        let (st, body) = get_json(&s, &path).await;
        seen.push((route, "get", st, body));
    }
    let r = client()
        .get(s.url("/v1/files/file-nope/content"))
        .send()
        .await
        .unwrap();
    seen.push((
        "/v1/files/{file_id}/content",
        "get",
        r.status().as_u16(),
        r.json().await.unwrap(),
    ));
    for _ in 0..2 {
        let r = client()
            .delete(s.url(&format!("/v1/files/{id}")))
            .send()
            .await
            .unwrap();
        seen.push((
            "/v1/files/{file_id}",
            "delete",
            r.status().as_u16(),
            r.json().await.unwrap(),
        ));
    }

    let statuses: Vec<u16> = seen.iter().map(|x| x.2).collect();
    assert_eq!(
        statuses,
        [200, 200, 413, 415, 200, 400, 200, 404, 200, 200, 404, 200, 200, 404, 200, 404]
    );
    let errs: Vec<String> = seen
        .iter()
        .flat_map(|(path, method, st, body)| check_response(&spec, path, method, *st, body))
        .collect();
    assert!(
        errs.is_empty(),
        "responses disagree with openapi.yaml:\n{}",
        errs.join("\n")
    );

    // The checker itself catches an undocumented field.
    let mut extra = ok.clone();
    extra["surprise"] = Value::from(1);
    assert!(!check_response(&spec, "/v1/files", "post", 200, &extra).is_empty());
}

#[tokio::test]
async fn the_committed_fixture_models_are_listed() {
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
    let hf = fixtures.join("tiny-llama");
    let gguf = fixtures.join("tiny-llama-gguf/tiny-llama.gguf");
    if !hf.is_dir() || !gguf.is_file() {
        eprintln!("skipped: fixtures not present");
        return;
    }
    let s = TestServer::start(Backend::Sqlite, &[]).await;
    let dest = s.models_dir().join("tiny-llama");
    std::fs::create_dir_all(&dest).unwrap();
    for e in std::fs::read_dir(&hf).unwrap().flatten() {
        std::fs::copy(e.path(), dest.join(e.file_name())).unwrap();
    }
    std::fs::copy(&gguf, s.models_dir().join("tiny-llama.gguf")).unwrap();

    let (st, list) = get_json(&s, "/v1/models").await;
    assert_eq!(st, 200, "{list}");
    let data = list["data"].as_array().unwrap();
    assert_eq!(data.len(), 2, "{list}");
    let (st, a) = get_json(&s, "/v1/models/tiny-llama").await;
    assert_eq!(st, 200);
    let (st, b) = get_json(&s, "/v1/models/tiny-llama.gguf").await;
    assert_eq!(st, 200, "{b}");
    assert_eq!(
        (a["format"].as_str(), b["format"].as_str()),
        (Some("hf"), Some("gguf"))
    );
    assert_eq!(a["architecture"], "llama");
    assert_eq!(b["architecture"], "llama");
    assert!(a["parameters"].as_u64().unwrap() > 0);
    assert!(b["parameters"].as_u64().unwrap() > 0);
}

#[test]
fn migrate_and_models_subcommands() {
    let dir = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_loraforge");
    let out = std::process::Command::new(bin)
        .args(["migrate", "--data-dir"])
        .arg(dir.path().join("data"))
        .env_remove("LORAFORGE_DATABASE_URL")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(dir.path().join("data/loraforge.db").is_file());

    let models = dir.path().join("models");
    write_hf_model(&models.join("tiny"), "llama", &[("w", &[4, 4])]);
    let out = std::process::Command::new(bin)
        .args(["models", "--json", "--models-dir"])
        .arg(&models)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["id"], "tiny");
    assert_eq!(v[0]["parameters"], 16);
    let out = std::process::Command::new(bin)
        .args(["models", "--models-dir"])
        .arg(&models)
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("tiny") && table.contains("llama"), "{table}");
}

#[tokio::test]
async fn server_errors_are_logged_with_the_request_id_and_stay_vague() {
    let s = TestServer::start(Backend::Sqlite, &[]).await;
    let (_, f) = upload_raw(&s, "t.jsonl", chat_jsonl(2)).await;
    let id = f["id"].as_str().unwrap();
    // Damage: the blob disappears under the row.
    std::fs::remove_file(s.data_dir().join(format!("blobs/files/{id}.jsonl"))).unwrap();
    let r = client()
        .get(s.url(&format!("/v1/files/{id}/content")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 500);
    let rid = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let body: Value = r.json().await.unwrap();
    assert_error(&body, None);
    assert_eq!(body["error"]["type"], "server_error");
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(
        !msg.contains("blob") && !msg.contains('/'),
        "internals leaked: {msg}"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let logs = s.logs();
        if logs
            .lines()
            .any(|l| l.contains("ERROR") && l.contains(&rid) && l.contains("is missing"))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no error line with {rid}:\n{logs}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A crash in the middle of an upload leaves no file row, and the next start sweeps the
/// temp file it was writing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_mid_upload_leaves_no_row_and_the_temp_file_is_swept() {
    for backend in backends() {
        let mut s = TestServer::start(backend, &[]).await;
        // 8 MiB of lines, then the client stalls with the request still open.
        let hasher = std::sync::Arc::new(std::sync::Mutex::new((Sha256::new(), 0u64, 0u64)));
        let body = reqwest::Body::wrap_stream(
            jsonl_stream(8 << 20, hasher).chain(futures::stream::pending()),
        );
        let url = s.url("/v1/files?filename=big.jsonl&purpose=fine-tune");
        let upload = tokio::spawn(async move {
            reqwest::Client::new()
                .post(url)
                .header("content-type", "application/jsonl")
                .body(body)
                .send()
                .await
        });
        let tmp = s.data_dir().join("tmp");
        let t0 = Instant::now();
        loop {
            let written: u64 = files_under(&tmp)
                .iter()
                .filter_map(|f| std::fs::metadata(tmp.join(f)).ok())
                .map(|m| m.len())
                .sum();
            if written >= 2 << 20 {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "the upload never reached the temp file"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        s.crash_and_restart(&[]).await;
        assert!(
            upload.await.unwrap().is_err(),
            "the upload cannot have succeeded"
        );
        assert_nothing_left(&s).await;
        assert!(
            s.logs()
                .contains("removed temp files left by an earlier run"),
            "the start-up sweep is not logged:\n{}",
            s.logs()
        );
    }
}

/// Hostile-client finding 1: a huge non-file multipart field is refused while it streams
/// (never held whole), and no error quotes more than a short prefix of what a client sent.
#[tokio::test]
async fn huge_fields_are_capped_and_never_echoed() {
    let s = TestServer::start(Backend::Sqlite, &[]).await;
    // An 8 MiB `purpose`: refused at its cap, with a short answer.
    let mut body = b"--XyZ\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n".to_vec();
    body.extend(std::iter::repeat_n(b'A', 8 << 20));
    body.extend_from_slice(
        b"\r\n--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.jsonl\"\r\n\r\n{\"text\":\"a\"}\n\r\n--XyZ--\r\n",
    );
    let r = client()
        .post(s.url("/v1/files"))
        .header("content-type", "multipart/form-data; boundary=XyZ")
        .body(streamed(&body))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let text = r.text().await.unwrap();
    assert!(text.len() < 1024, "a {}-byte answer", text.len());
    let e: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(e["error"]["param"], "purpose", "{e}");
    // An invalid purpose under the cap is quoted by its start only.
    let form = reqwest::multipart::Form::new()
        .text("purpose", "B".repeat(3000))
        .part(
            "file",
            reqwest::multipart::Part::bytes(b"{\"text\":\"a\"}\n".to_vec()).file_name("x.jsonl"),
        );
    let r = client()
        .post(s.url("/v1/files"))
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let e: Value = r.json().await.unwrap();
    let m = e["error"]["message"].as_str().unwrap();
    assert!(m.contains("Invalid purpose") && m.len() < 300, "{m}");
    // JSON bodies: a huge model name, file id or hyperparameter key comes back clipped.
    common::copy_dir(
        &common::root().join("tests/fixtures/tiny-llama"),
        &s.models_dir().join("tiny-llama"),
    );
    let file = common::upload_chat(&s).await;
    for body in [
        serde_json::json!({"model": "m".repeat(100_000), "training_file": file}),
        serde_json::json!({"model": "tiny-llama", "training_file": "f".repeat(100_000)}),
        serde_json::json!({"model": "tiny-llama", "training_file": file,
                           "hyperparameters": {"k".repeat(100_000): 1}}),
    ] {
        let r = client()
            .post(s.url("/v1/fine_tuning/jobs"))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        assert_eq!(status, 400, "{text:.200}");
        assert!(
            text.len() < 2048,
            "a {}-byte answer: {:.200}",
            text.len(),
            text
        );
    }
}

/// Hostile-client finding 6: a stalled upload does not hold a shutdown open (the drain
/// is bounded, the upload's temp file goes with its connection), and a second signal
/// ends the process at once.
#[tokio::test]
async fn a_stalled_upload_does_not_hold_up_shutdown() {
    for second_signal in [false, true] {
        let mut s = TestServer::start(Backend::Sqlite, &["--devices", "none"]).await;
        let addr = s.base.trim_start_matches("http://").to_string();
        let mut sock = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let head = format!(
            "POST /v1/files?filename=a.jsonl HTTP/1.1\r\nHost: {addr}\r\n\
             Content-Type: application/jsonl\r\nContent-Length: 100000000\r\n\r\n"
        );
        sock.write_all(head.as_bytes()).await.unwrap();
        sock.write_all(b"{\"text\": \"a\"}\n").await.unwrap();
        // The upload is under way: its temp file exists.
        let tmp = s.data_dir().join("tmp");
        let t0 = Instant::now();
        while files_under(&tmp).is_empty() {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "no temp file appeared"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let status = if second_signal {
            let pid = s.pid().to_string();
            std::process::Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap();
            tokio::time::sleep(Duration::from_millis(300)).await;
            s.terminate()
        } else {
            s.terminate()
        };
        if second_signal {
            assert_eq!(status.code(), Some(130), "{status:?}");
        } else {
            assert!(status.success(), "{status:?}\n{}", s.logs());
            assert!(
                s.logs().contains("closing their connections"),
                "{}",
                s.logs()
            );
            let left = files_under(&tmp);
            assert!(
                left.is_empty(),
                "the stalled upload's temp file stayed: {left:?}"
            );
        }
        drop(sock);
    }
}

/// Hostile-client finding 8: in the default open-loopback mode a web page can neither
/// drive the API across sites (CSRF) nor read it through a rebound domain.
#[tokio::test]
async fn browsers_cannot_drive_an_open_loopback_server() {
    let s = TestServer::start(Backend::Sqlite, &["--allowed-hosts", "lf.test"]).await;
    let addr = s.base.trim_start_matches("http://").to_string();
    let port = addr.rsplit(':').next().unwrap().to_string();
    let raw = |req: String| {
        let addr = addr.clone();
        async move {
            let mut sock = tokio::net::TcpStream::connect(&addr).await.unwrap();
            sock.write_all(req.as_bytes()).await.unwrap();
            raw_status(&mut sock).await
        }
    };
    // DNS rebinding: a page on evil.example, now resolving to 127.0.0.1, reads nothing.
    let st = raw(format!(
        "GET /v1/files HTTP/1.1\r\nHost: evil.example:{port}\r\nConnection: close\r\n\r\n"
    ))
    .await;
    assert!(st.starts_with("HTTP/1.1 403"), "{st}");
    for ok in [format!("localhost:{port}"), format!("lf.test:{port}")] {
        let st = raw(format!(
            "GET /v1/files HTTP/1.1\r\nHost: {ok}\r\nConnection: close\r\n\r\n"
        ))
        .await;
        assert!(st.starts_with("HTTP/1.1 200"), "{ok}: {st}");
    }
    // CSRF: a cross-site form cannot create a job (text/plain body) or act on one.
    let r = client()
        .post(s.url("/v1/fine_tuning/jobs"))
        .header("content-type", "text/plain")
        .body(r#"{"model":"tiny-llama","training_file":"file-x"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 415);
    for (path, origin) in [
        ("/v1/fine_tuning/jobs/ftjob-x/cancel", "http://evil.example"),
        ("/v1/files", "null"),
    ] {
        let r = client()
            .post(s.url(path))
            .header("origin", origin)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403, "{path} from {origin}");
        let e: Value = r.json().await.unwrap();
        assert_eq!(e["error"]["code"], "cross_site_request", "{e}");
    }
    let r = client()
        .get(s.url("/v1/files"))
        .header("sec-fetch-site", "cross-site")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    // The server's own pages (same origin) and plain clients (no Origin) are served.
    let r = client()
        .get(s.url("/v1/files"))
        .header("origin", s.base.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// Hostile-client finding 5: half-sent headers and stalled uploads hold nothing for long
/// (here 1 s limits): the connection is closed, the upload's temp file removed.
#[tokio::test]
async fn slow_clients_are_cut_off() {
    let s = TestServer::start(
        Backend::Sqlite,
        &[
            "--header-timeout-seconds",
            "1",
            "--upload-idle-seconds",
            "1",
            "--devices",
            "none",
        ],
    )
    .await;
    let addr = s.base.trim_start_matches("http://").to_string();
    // Headers that never end: the server hangs up.
    let mut sock = tokio::net::TcpStream::connect(&addr).await.unwrap();
    sock.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-a: ")
        .await
        .unwrap();
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(20), async {
        let mut total = 0;
        loop {
            match sock.read(&mut buf).await {
                Ok(0) | Err(_) => return total,
                Ok(n) => total += n,
            }
        }
    })
    .await
    .expect("a half-sent request kept its connection");
    println!("half-sent headers: connection closed after {n} response bytes");
    // An upload that stops sending: answered, and its temp file gone.
    let mut sock = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST /v1/files?filename=a.jsonl HTTP/1.1\r\nHost: {addr}\r\n\
         Content-Type: application/jsonl\r\nContent-Length: 100000000\r\n\r\n"
    );
    sock.write_all(head.as_bytes()).await.unwrap();
    sock.write_all(b"{\"text\": \"a\"}\n").await.unwrap();
    let status = raw_status(&mut sock).await;
    assert!(status.starts_with("HTTP/1.1 400"), "{status}");
    let tmp = s.data_dir().join("tmp");
    let t0 = Instant::now();
    while !files_under(&tmp).is_empty() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the stalled upload's temp file stayed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(get_json(&s, "/healthz").await.0, 200);
}
