//! API keys with owners, end to end through the real binary: `loraforge keys`, 401s,
//! owner isolation (another owner's rows are 404s, admins see all), and secure
//! defaults (no keys on a non-loopback address: refuse to start).

use crate::common;

use common::{backends, chat_jsonl, copy_dir, root, serve_command, Backend, TestServer};
use reqwest::Method;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::process::Stdio;
use std::time::{Duration, Instant};

/// A request with an optional bearer key: (status, headers, body as JSON or Null).
async fn call(
    s: &TestServer,
    method: Method,
    path: &str,
    key: Option<&str>,
    body: Option<Value>,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let mut req = reqwest::Client::new().request(method, s.url(path));
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let bytes = r.bytes().await.unwrap();
    (
        status,
        headers,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

async fn get(s: &TestServer, path: &str, key: Option<&str>) -> (u16, Value) {
    let (st, _, v) = call(s, Method::GET, path, key, None).await;
    (st, v)
}

/// The 401 of a refused key: OpenAI's envelope and a `WWW-Authenticate` challenge.
fn assert_401(st: u16, headers: &reqwest::header::HeaderMap, body: &Value) {
    assert_eq!(st, 401, "{body}");
    assert_eq!(headers["www-authenticate"], "Bearer");
    let e = &body["error"];
    assert!(e["message"].is_string(), "{body}");
    assert_eq!(e["type"], "invalid_request_error", "{body}");
    assert_eq!(e["param"], Value::Null, "{body}");
    assert_eq!(e["code"], "invalid_api_key", "{body}");
}

async fn upload(s: &TestServer, key: Option<&str>, name: &str) -> String {
    let mut req = reqwest::Client::new()
        .post(s.url(&format!("/v1/files?filename={name}&purpose=fine-tune")))
        .header("content-type", "application/jsonl")
        .body(chat_jsonl(8));
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    let r: Value = req.send().await.unwrap().json().await.unwrap();
    assert_eq!(r["status"], "processed", "{r}");
    r["id"].as_str().unwrap().to_string()
}

/// Polls until a request without a key is refused: a key created while the server runs
/// is enforced within a few seconds.
async fn wait_enforced(s: &TestServer) {
    let t0 = Instant::now();
    loop {
        if get(s, "/v1/files", None).await.0 == 401 {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "a new key was never enforced:\n{}",
            s.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `s` with the key swapped in case at its first letter after the prefix.
fn case_altered(key: &str) -> String {
    let i = key[3..].find(|c: char| c.is_ascii_alphabetic()).unwrap() + 3;
    let mut chars: Vec<char> = key.chars().collect();
    let c = chars[i];
    chars[i] = if c.is_ascii_lowercase() {
        c.to_ascii_uppercase()
    } else {
        c.to_ascii_lowercase()
    };
    chars.into_iter().collect()
}

/// Every column of every `api_keys` row, as text.
async fn api_key_rows(s: &TestServer) -> Vec<Vec<String>> {
    use sqlx::{Column, Row};
    match s.backend {
        Backend::Sqlite => {
            let pool = sqlx::SqlitePool::connect(&s.database_url).await.unwrap();
            let rows = sqlx::query("SELECT * FROM api_keys")
                .fetch_all(&pool)
                .await
                .unwrap();
            let out = rows
                .iter()
                .map(|r| {
                    (0..r.columns().len())
                        .map(|i| {
                            r.try_get::<Option<String>, _>(i)
                                .map(|v| v.unwrap_or_default())
                                .or_else(|_| {
                                    r.try_get::<Option<i64>, _>(i)
                                        .map(|v| v.map(|n| n.to_string()).unwrap_or_default())
                                })
                                .unwrap_or_else(|e| panic!("column {}: {e}", r.column(i).name()))
                        })
                        .collect()
                })
                .collect();
            pool.close().await;
            out
        }
        Backend::Postgres => {
            let pool = sqlx::PgPool::connect(&s.database_url).await.unwrap();
            // row_to_json covers every column, whatever the schema adds later.
            let rows: Vec<(String,)> =
                sqlx::query_as("SELECT row_to_json(k)::text FROM api_keys k")
                    .fetch_all(&pool)
                    .await
                    .unwrap();
            pool.close().await;
            rows.into_iter()
                .map(|(j,)| {
                    let v: Value = serde_json::from_str(&j).unwrap();
                    v.as_object()
                        .unwrap()
                        .values()
                        .map(|c| match c {
                            Value::String(t) => t.clone(),
                            other => other.to_string(),
                        })
                        .collect()
                })
                .collect()
        }
    }
}

#[tokio::test]
async fn keys_create_prints_the_key_once_and_stores_only_its_hash() {
    for backend in backends() {
        let s = TestServer::start(backend, &["--devices", "none"]).await;
        let key = s.create_key("ci robot", false);
        assert!(key.starts_with("lf-"), "{key}");
        assert!(key.len() >= 40, "{key}");
        let admin = s.create_key("ops", true);
        assert_ne!(key, admin);
        // The table holds the sha256 and a short prefix, and the key in no column.
        let rows = api_key_rows(&s).await;
        assert_eq!(rows.len(), 2);
        for k in [&key, &admin] {
            let digest = hex::encode(Sha256::digest(k.as_bytes()));
            let row = rows
                .iter()
                .find(|r| r.contains(&digest))
                .unwrap_or_else(|| panic!("no row holds the key's sha256: {rows:?}"));
            assert!(row.contains(&k[..11].to_string()), "prefix: {row:?}");
            for col in row {
                assert!(!col.contains(k.as_str()), "the key is stored: {row:?}");
            }
        }
        if backend == Backend::Sqlite {
            // Nothing in the database files either (pages, WAL).
            for f in std::fs::read_dir(s.data_dir()).unwrap().flatten() {
                if !f.path().is_file() {
                    continue;
                }
                let bytes = std::fs::read(f.path()).unwrap();
                for k in [&key, &admin] {
                    assert!(
                        !bytes.windows(k.len()).any(|w| w == k.as_bytes()),
                        "{} holds a key",
                        f.path().display()
                    );
                }
            }
        }

        // keys list: never the key; the table and the JSON name the rest.
        let out = s.keys(&["list"]);
        assert!(out.status.success());
        let table = String::from_utf8(out.stdout).unwrap();
        assert!(!table.contains(&key) && !table.contains(&admin), "{table}");
        assert!(
            table.contains("ci robot") && table.contains(&key[..11]),
            "{table}"
        );
        let out = s.keys(&["list", "--json"]);
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(!text.contains(&key) && !text.contains(&admin), "{text}");
        let mut list: Vec<Value> = serde_json::from_str(&text).unwrap();
        assert_eq!(list.len(), 2);
        // Keys made in the same second list in any order.
        list.sort_by_key(|k| k["name"].as_str().unwrap().to_string());
        let fields: Vec<&String> = list[0].as_object().unwrap().keys().collect();
        assert_eq!(
            fields,
            [
                "admin",
                "created_at",
                "id",
                "last_used_at",
                "name",
                "prefix",
                "revoked_at"
            ]
        );
        assert_eq!(list[0]["name"], "ci robot");
        assert_eq!(list[0]["admin"], false);
        assert_eq!(list[1]["admin"], true);
        assert_eq!(list[0]["last_used_at"], Value::Null);

        // The key works, and its use is recorded.
        wait_enforced(&s).await;
        assert_eq!(get(&s, "/v1/files", Some(&key)).await.0, 200);
        let list: Vec<Value> = serde_json::from_slice(&s.keys(&["list", "--json"]).stdout).unwrap();
        let used = list.iter().find(|k| k["name"] == "ci robot").unwrap();
        assert!(used["last_used_at"].is_i64(), "{list:?}");

        // The human message on stderr reads as one sentence (no run of spaces from a lost
        // line continuation).
        let out = s.keys(&["create", "--name", "msg"]);
        let msg = String::from_utf8(out.stderr).unwrap();
        let line = msg
            .lines()
            .find(|l| l.starts_with("created key"))
            .unwrap_or_else(|| panic!("no 'created key' line: {msg}"));
        assert!(line.contains("is shown: store it now"), "{line}");
        assert!(!line.contains("  "), "stray spaces: {line:?}");
    }
}

#[tokio::test]
async fn wrong_revoked_case_altered_and_missing_keys_get_401() {
    for backend in backends() {
        let s = TestServer::start(backend, &["--devices", "none"]).await;
        let key = s.create_key("a", false);
        let other = s.create_key("b", false);
        wait_enforced(&s).await;

        assert_eq!(get(&s, "/v1/files", Some(&key)).await.0, 200);
        let refused = [
            None,
            Some("wrong".to_string()),
            Some(format!("{key}x")),
            Some(key[..key.len() - 1].to_string()),
            Some(case_altered(&key)),
            Some(key.to_uppercase()),
        ];
        for k in &refused {
            for (m, path) in [
                (Method::GET, "/v1/files"),
                (Method::GET, "/v1/fine_tuning/jobs"),
                (Method::POST, "/v1/fine_tuning/jobs"),
                (Method::GET, "/v1/models"),
                (Method::GET, "/v1/files/file-nope"),
            ] {
                let (st, h, body) = call(&s, m, path, k.as_deref(), None).await;
                assert_401(st, &h, &body);
            }
        }
        // Not a bearer token at all.
        let r = reqwest::Client::new()
            .get(s.url("/v1/files"))
            .header("authorization", key.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
        // The scheme's case does not matter.
        let r = reqwest::Client::new()
            .get(s.url("/v1/files"))
            .header("authorization", format!("bearer {key}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);

        // Health, the spec and the dashboard shell stay open.
        for path in ["/healthz", "/readyz", "/openapi.yaml", "/"] {
            let r = reqwest::get(s.url(path)).await.unwrap();
            assert_eq!(r.status(), 200, "{path}");
        }

        // Revoked (by its displayed prefix): refused from the next request on.
        let out = s.keys(&["revoke", &key[..11]]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let (st, h, body) = call(&s, Method::GET, "/v1/files", Some(&key), None).await;
        assert_401(st, &h, &body);
        assert_eq!(get(&s, "/v1/files", Some(&other)).await.0, 200);
        // Revoking twice, or an unknown key, is an error.
        assert!(!s.keys(&["revoke", &key[..11]]).status.success());
        assert!(!s.keys(&["revoke", "key-nope"]).status.success());
        // Revoking the last key does not open the server.
        let id = serde_json::from_slice::<Vec<Value>>(&s.keys(&["list", "--json"]).stdout)
            .unwrap()
            .into_iter()
            .find(|k| k["name"] == "b")
            .unwrap()["id"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(s.keys(&["revoke", &id]).status.success());
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let (st, h, body) = call(&s, Method::GET, "/v1/files", None, None).await;
        assert_401(st, &h, &body);
        let (st, h, body) = call(&s, Method::GET, "/v1/files", Some(&other), None).await;
        assert_401(st, &h, &body);
    }
}

#[tokio::test]
async fn the_static_api_key_is_an_admin_beside_database_keys() {
    let s = TestServer::start(
        Backend::Sqlite,
        &["--devices", "none", "--api-key", "sekret"],
    )
    .await;
    let key = s.create_key("a", false);
    let (st, h, body) = call(&s, Method::GET, "/v1/files", None, None).await;
    assert_401(st, &h, &body);
    let mine = upload(&s, Some(&key), "mine.jsonl").await;
    let admins = upload(&s, Some("sekret"), "admins.jsonl").await;
    let (_, list) = get(&s, "/v1/files", Some("sekret")).await;
    let ids: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [admins.as_str(), mine.as_str()]);
    // The static admin's own rows have no owner: a plain key does not see them.
    let (_, list) = get(&s, "/v1/files", Some(&key)).await;
    assert_eq!(list["data"].as_array().unwrap().len(), 1);
    assert_eq!(
        get(&s, &format!("/v1/files/{admins}"), Some(&key)).await.0,
        404
    );
    let (st, h, body) = call(&s, Method::GET, "/v1/files", Some("Sekret"), None).await;
    assert_401(st, &h, &body);
}

async fn wait_succeeded(s: &TestServer, id: &str, key: &str) {
    let t0 = Instant::now();
    loop {
        let (_, j) = get(s, &format!("/v1/fine_tuning/jobs/{id}"), Some(key)).await;
        match j["status"].as_str().unwrap() {
            "succeeded" => return,
            "failed" | "cancelled" => panic!("job ended {j}:\n{}", s.logs()),
            _ => {}
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "job stuck: {j}\n{}",
            s.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn ids(list: &Value) -> Vec<String> {
    list["data"]
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {list}"))
        .iter()
        .map(|x| x["id"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn owners_see_only_their_own_rows_and_admins_see_all() {
    for backend in backends() {
        let s = TestServer::start(backend, &[]).await;
        copy_dir(
            &root().join("tests/fixtures/tiny-llama"),
            &s.models_dir().join("tiny-llama"),
        );
        let a = s.create_key("a", false);
        let b = s.create_key("b", false);
        let admin = s.create_key("c", true);
        wait_enforced(&s).await;

        // A: a file and a job that trains to the end (checkpoints, adapter, ft model).
        let file_a = upload(&s, Some(&a), "a.jsonl").await;
        let file_b = upload(&s, Some(&b), "b.jsonl").await;
        let (st, _, job) = call(
            &s,
            Method::POST,
            "/v1/fine_tuning/jobs",
            Some(&a),
            Some(
                json!({"model": "tiny-llama", "training_file": file_a, "suffix": "a",
                        "hyperparameters": {"max_steps": 4, "batch_size": 2, "lora_r": 2,
                                            "checkpoint_interval": 2}}),
            ),
        )
        .await;
        assert_eq!(st, 200, "{job}");
        let job_a = job["id"].as_str().unwrap().to_string();
        wait_succeeded(&s, &job_a, &a).await;
        let (_, job) = get(&s, &format!("/v1/fine_tuning/jobs/{job_a}"), Some(&a)).await;
        let ft = job["fine_tuned_model"].as_str().unwrap().to_string();
        let result_files: Vec<String> = job["result_files"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f.as_str().unwrap().to_string())
            .collect();
        assert_eq!(result_files.len(), 2, "{job}");
        let (st, ckpts) = get(
            &s,
            &format!("/v1/fine_tuning/jobs/{job_a}/checkpoints"),
            Some(&a),
        )
        .await;
        assert_eq!(st, 200);
        let ckpt = ckpts["data"][0]["id"].as_str().unwrap().to_string();

        // Everything of A's is a 404 for B, with the message a missing id gets.
        let a_paths = [
            (Method::GET, format!("/v1/files/{file_a}")),
            (Method::GET, format!("/v1/files/{file_a}/content")),
            (Method::DELETE, format!("/v1/files/{file_a}")),
            (Method::GET, format!("/v1/files/{}", result_files[1])),
            (Method::GET, format!("/v1/fine_tuning/jobs/{job_a}")),
            (Method::GET, format!("/v1/fine_tuning/jobs/{job_a}/events")),
            (
                Method::GET,
                format!("/v1/fine_tuning/jobs/{job_a}/events?stream=true"),
            ),
            (
                Method::GET,
                format!("/v1/fine_tuning/jobs/{job_a}/checkpoints"),
            ),
            (
                Method::GET,
                format!("/v1/fine_tuning/jobs/{job_a}/checkpoints/{ckpt}/adapter"),
            ),
            (Method::GET, format!("/v1/fine_tuning/jobs/{job_a}/adapter")),
            (Method::POST, format!("/v1/fine_tuning/jobs/{job_a}/cancel")),
            (Method::POST, format!("/v1/fine_tuning/jobs/{job_a}/pause")),
            (Method::POST, format!("/v1/fine_tuning/jobs/{job_a}/resume")),
        ];
        let (no_file, no_job) = (
            "file-000000000000000000000000",
            "ftjob-00000000000000000000000000000000",
        );
        let anon = |v: &Value| {
            let mut m = v["error"]["message"].as_str().unwrap_or("").to_string();
            for id in [&file_a, &result_files[1], &job_a] {
                m = m.replace(id.as_str(), "ID");
            }
            m = m.replace(no_file, "ID").replace(no_job, "ID");
            (m, v["error"]["code"].clone(), v["error"]["param"].clone())
        };
        for (m, path) in &a_paths {
            let (st, _, body) = call(&s, m.clone(), path, Some(&b), None).await;
            assert_eq!(st, 404, "B {m} {path}: {body}");
            let missing = path
                .replace(&file_a, no_file)
                .replace(&result_files[1], no_file)
                .replace(&job_a, no_job);
            let (st2, _, body2) = call(&s, m.clone(), &missing, Some(&b), None).await;
            assert_eq!(st2, 404, "{missing}: {body2}");
            assert_eq!(anon(&body), anon(&body2), "{path}");
        }
        // B's lists do not show A's rows; B cannot train on A's file.
        let (_, files) = get(&s, "/v1/files", Some(&b)).await;
        assert_eq!(ids(&files), [file_b.as_str()]);
        let (_, jobs) = get(&s, "/v1/fine_tuning/jobs", Some(&b)).await;
        assert_eq!(ids(&jobs), Vec::<String>::new());
        let (st, _, _) = call(
            &s,
            Method::GET,
            &format!("/v1/files?after={file_a}"),
            Some(&b),
            None,
        )
        .await;
        assert_eq!(st, 400);
        let (_, models) = get(&s, "/v1/models", Some(&b)).await;
        assert!(ids(&models).contains(&"tiny-llama".to_string()));
        assert!(!ids(&models).contains(&ft), "{models}");
        assert_eq!(get(&s, &format!("/v1/models/{ft}"), Some(&b)).await.0, 404);
        let (st, _, body) = call(
            &s,
            Method::POST,
            "/v1/chat/completions",
            Some(&b),
            Some(json!({"model": ft, "max_tokens": 2,
                        "messages": [{"role": "user", "content": "hi"}]})),
        )
        .await;
        assert_eq!(st, 404, "{body}");
        assert_eq!(body["error"]["code"], "model_not_found");
        let nope = "file-000000000000000000000000";
        let mut answers = Vec::new();
        for f in [file_a.as_str(), nope] {
            let (st, _, body) = call(
                &s,
                Method::POST,
                "/v1/fine_tuning/jobs",
                Some(&b),
                Some(json!({"model": "tiny-llama", "training_file": f})),
            )
            .await;
            assert_eq!(st, 400, "{body}");
            answers.push((
                body["error"]["message"].as_str().unwrap().replace(f, "ID"),
                body["error"]["code"].clone(),
                body["error"]["param"].clone(),
            ));
        }
        assert_eq!(answers[0], answers[1]);
        let (st, _, body) = call(
            &s,
            Method::POST,
            "/v1/fine_tuning/jobs",
            Some(&b),
            Some(json!({"model": "tiny-llama", "training_file": file_b,
                        "validation_file": file_a})),
        )
        .await;
        assert_eq!(
            (st, &body["error"]["param"]),
            (400, &json!("validation_file"))
        );
        // B's refused attempts changed nothing of A's.
        let (st, job) = get(&s, &format!("/v1/fine_tuning/jobs/{job_a}"), Some(&a)).await;
        assert_eq!((st, job["status"].as_str()), (200, Some("succeeded")));
        assert_eq!(
            get(&s, &format!("/v1/files/{file_a}"), Some(&a)).await.0,
            200
        );

        // A sees its own: lists, the model, chat on it, the adapter, result files.
        let (_, files) = get(&s, "/v1/files", Some(&a)).await;
        let mut want = result_files.clone();
        want.push(file_a.clone());
        let mut got = ids(&files);
        got.sort();
        want.sort();
        assert_eq!(got, want);
        let (_, jobs) = get(&s, "/v1/fine_tuning/jobs", Some(&a)).await;
        assert_eq!(ids(&jobs), [job_a.as_str()]);
        let (_, models) = get(&s, "/v1/models", Some(&a)).await;
        assert!(ids(&models).contains(&ft));
        let (st, _, body) = call(
            &s,
            Method::POST,
            "/v1/chat/completions",
            Some(&a),
            Some(json!({"model": ft, "max_tokens": 2,
                        "messages": [{"role": "user", "content": "hi"}]})),
        )
        .await;
        assert_eq!(st, 200, "{body}");

        // The admin sees and reads both owners' rows.
        let (_, files) = get(&s, "/v1/files", Some(&admin)).await;
        let all = ids(&files);
        assert!(all.contains(&file_a) && all.contains(&file_b), "{files}");
        let (_, jobs) = get(&s, "/v1/fine_tuning/jobs", Some(&admin)).await;
        assert_eq!(ids(&jobs), [job_a.as_str()]);
        let (_, models) = get(&s, "/v1/models", Some(&admin)).await;
        assert!(ids(&models).contains(&ft));
        for (m, path) in &a_paths {
            if *m != Method::GET {
                continue;
            }
            let (st, _, body) = call(&s, m.clone(), path, Some(&admin), None).await;
            assert_eq!(st, 200, "admin {path}: {body}");
        }
        assert_eq!(
            get(&s, &format!("/v1/files/{file_b}/content"), Some(&admin))
                .await
                .0,
            200
        );
        // A deletes its file (the admin could too); B's delete did not.
        let (st, _, _) = call(
            &s,
            Method::DELETE,
            &format!("/v1/files/{file_a}"),
            Some(&a),
            None,
        )
        .await;
        assert_eq!(st, 200);
    }
}

/// Runs `serve` to its exit (it must not start) and returns (success, stderr).
fn serve_until_exit(cmd: &mut std::process::Command) -> (bool, String) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
            return (status.success(), err);
        }
        if t0.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            panic!("serve kept running without keys on a non-loopback address");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test]
async fn secure_by_default_refuses_an_open_non_loopback_bind() {
    let dir = tempfile::tempdir().unwrap();
    let (data, models) = (dir.path().join("data"), dir.path().join("models"));
    std::fs::create_dir_all(&models).unwrap();

    // No keys, a wildcard address: refused, naming the ways out.
    let (ok, err) = serve_until_exit(&mut serve_command(&data, &models, None, "0.0.0.0", &[]));
    assert!(!ok, "{err}");
    assert!(err.contains("--insecure-no-auth"), "{err}");
    assert!(err.contains("loraforge keys create"), "{err}");

    // With --insecure-no-auth it starts, open, and warns.
    let s = TestServer::start_on(
        Backend::Sqlite,
        "0.0.0.0",
        &["--devices", "none", "--insecure-no-auth"],
    )
    .await;
    assert_eq!(get(&s, "/v1/files", None).await.0, 200);
    assert!(
        s.logs().contains("running without authentication"),
        "{}",
        s.logs()
    );
    // A key created later is enforced from then on.
    let key = s.create_key("late", false);
    wait_enforced(&s).await;
    assert_eq!(get(&s, "/v1/files", Some(&key)).await.0, 200);
}

#[tokio::test]
async fn secure_by_default_loopback_runs_open_with_a_warning_and_keys_close_it() {
    let s = TestServer::start(Backend::Sqlite, &["--devices", "none"]).await;
    assert!(
        s.logs().contains("running without authentication"),
        "{}",
        s.logs()
    );
    // Open: no key needed, and any bearer token (the openai client always sends one)
    // is ignored.
    assert_eq!(get(&s, "/v1/files", None).await.0, 200);
    assert_eq!(get(&s, "/v1/files", Some("anything")).await.0, 200);

    // With a key in the database the same data dir serves a wildcard address, keyed.
    let mut s = s;
    let key = s.create_key("k", true);
    s.terminate();
    let mut child = serve_command(
        &s.data_dir(),
        &s.models_dir(),
        None,
        "0.0.0.0",
        &["--devices", "none"],
    )
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let port = line
        .trim()
        .strip_prefix("loraforge listening on http://0.0.0.0:")
        .unwrap_or_else(|| panic!("{line:?}"))
        .to_string();
    let url = format!("http://127.0.0.1:{port}/v1/files");
    let r = reqwest::get(&url).await.unwrap();
    let status = r.status().as_u16();
    let keyed = reqwest::Client::new()
        .get(&url)
        .bearer_auth(&key)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16();
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!((status, keyed), (401, 200));
}

/// Hostile-client finding 16: revoking a key ends the event streams it opened within
/// seconds (its jobs run on: an admin cancels them if they must stop).
#[tokio::test]
async fn revoking_a_key_ends_its_open_streams() {
    use futures::StreamExt;
    let s = TestServer::start(Backend::Sqlite, &[]).await;
    copy_dir(
        &root().join("tests/fixtures/tiny-llama"),
        &s.models_dir().join("tiny-llama"),
    );
    let dave = s.create_key("dave", false);
    let admin = s.create_key("ops", true);
    wait_enforced(&s).await;
    let file = upload(&s, Some(&dave), "d.jsonl").await;
    let (st, _, job) = call(
        &s,
        Method::POST,
        "/v1/fine_tuning/jobs",
        Some(&dave),
        Some(json!({"model": "tiny-llama", "training_file": file,
                    "hyperparameters": {"max_steps": 100000, "batch_size": 2}})),
    )
    .await;
    assert_eq!(st, 200, "{job}");
    let id = job["id"].as_str().unwrap().to_string();
    let r = reqwest::Client::new()
        .get(s.url(&format!("/v1/fine_tuning/jobs/{id}/events?stream=true")))
        .bearer_auth(&dave)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut body = r.bytes_stream();
    assert!(body.next().await.is_some(), "the stream sent nothing");
    let out = s.keys(&["revoke", &dave[..11]]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ended = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(chunk) = body.next().await {
            if chunk.is_err() {
                break;
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the revoked key's stream stayed open");
    // The job itself runs on until someone with the right cancels it.
    let (st, job) = get(&s, &format!("/v1/fine_tuning/jobs/{id}"), Some(&admin)).await;
    assert_eq!(
        (st, job["status"].as_str()),
        (200, Some("running")),
        "{job}"
    );
    let (st, _, _) = call(
        &s,
        Method::POST,
        &format!("/v1/fine_tuning/jobs/{id}/cancel"),
        Some(&admin),
        None,
    )
    .await;
    assert_eq!(st, 200);
}
