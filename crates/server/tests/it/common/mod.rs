//! Starts the real `loraforge` binary on a random port, against SQLite or (when
//! `TEST_DATABASE_URL` is set) a throw-away PostgreSQL database.

#![allow(dead_code)]

use futures::StreamExt;
use loraforge_store::testing::TempPgDatabase;
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// SQLite always; PostgreSQL too when `TEST_DATABASE_URL` is set.
pub fn backends() -> Vec<Backend> {
    let mut v = vec![Backend::Sqlite];
    if std::env::var("TEST_DATABASE_URL").is_ok() {
        v.push(Backend::Postgres);
    }
    v
}

pub struct TestServer {
    child: Child,
    pub base: String,
    pub backend: Backend,
    pub dir: tempfile::TempDir,
    pub database_url: String,
    logs: Arc<Mutex<String>>,
    _pg: Option<TempPgDatabase>,
}

impl TestServer {
    pub async fn start(backend: Backend, extra: &[&str]) -> TestServer {
        Self::start_on(backend, "127.0.0.1", extra).await
    }

    /// [`TestServer::start`] listening on `host` (e.g. `0.0.0.0`); requests still go to
    /// 127.0.0.1.
    pub async fn start_on(backend: Backend, host: &str, extra: &[&str]) -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let models = dir.path().join("models");
        std::fs::create_dir_all(&models).unwrap();
        let (database_url, pg) = match backend {
            Backend::Sqlite => (
                format!("sqlite://{}", data.join("loraforge.db").display()),
                None,
            ),
            Backend::Postgres => {
                let admin = std::env::var("TEST_DATABASE_URL").unwrap();
                let pg = TempPgDatabase::create(&admin)
                    .await
                    .expect("TEST_DATABASE_URL is set but a test database cannot be created");
                (pg.url().to_string(), Some(pg))
            }
        };
        let (child, base, logs) = launch(&data, &models, backend, &database_url, host, extra);
        let server = TestServer {
            child,
            base,
            backend,
            dir,
            database_url,
            logs,
            _pg: pg,
        };
        server.wait_ready().await;
        server
    }

    async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = reqwest::get(self.url("/readyz")).await {
                if r.status() == 200 {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "never ready:\n{}", self.logs());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn models_dir(&self) -> PathBuf {
        self.dir.path().join("models")
    }

    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().clone()
    }

    /// A field of /proc/<pid>/status in kB (`VmRSS`, `VmHWM`).
    pub fn proc_kb(&self, field: &str) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        s.lines()
            .find_map(|l| l.strip_prefix(&format!("{field}:")))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {field} in /proc status"))
    }

    /// A direct handle on the server's database, for arranging state (e.g. jobs)
    /// that no route creates yet.
    pub async fn store(&self) -> loraforge_store::Store {
        loraforge_store::Store::connect(&self.database_url)
            .await
            .unwrap()
    }

    /// Runs `loraforge keys <args>` against this server's database.
    pub fn keys(&self, args: &[&str]) -> std::process::Output {
        let mut cmd = loraforge();
        cmd.arg("keys")
            .args(args)
            .arg("--data-dir")
            .arg(self.data_dir());
        if self.backend == Backend::Postgres {
            cmd.arg("--database-url").arg(&self.database_url);
        }
        cmd.stdin(Stdio::null())
            .output()
            .expect("run loraforge keys")
    }

    /// Creates a key with `loraforge keys create` and returns it.
    pub fn create_key(&self, name: &str, admin: bool) -> String {
        let mut args = vec!["create", "--name", name];
        if admin {
            args.push("--admin");
        }
        let out = self.keys(&args);
        assert!(
            out.status.success(),
            "keys create failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8(out.stdout).unwrap();
        let lines: Vec<&str> = stdout.lines().collect();
        assert_eq!(
            lines.len(),
            1,
            "keys create prints the key alone: {stdout:?}"
        );
        lines[0].to_string()
    }

    /// Kills the server with SIGKILL (no cleanup, as a crash would) and starts a new
    /// one on the same data directory and database.
    pub async fn crash_and_restart(&mut self, extra: &[&str]) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let (child, base, logs) = launch(
            &self.dir.path().join("data"),
            &self.models_dir(),
            self.backend,
            &self.database_url.clone(),
            "127.0.0.1",
            extra,
        );
        self.child = child;
        self.base = base;
        self.logs = logs;
        self.wait_ready().await;
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(Instant::now() < deadline, "server ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The `loraforge` binary with none of the caller's `LORAFORGE_*` variables: the
/// tests' own configuration only.
pub fn loraforge() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_loraforge"));
    for (k, _) in std::env::vars() {
        if k.starts_with("LORAFORGE_") {
            cmd.env_remove(k);
        }
    }
    cmd
}

/// `loraforge serve` on `host`, a free port, and the given state.
pub fn serve_command(
    data: &Path,
    models: &Path,
    database_url: Option<&str>,
    host: &str,
    extra: &[&str],
) -> Command {
    let mut cmd = loraforge();
    cmd.args(["serve", "--host", host, "--port", "0"])
        .arg("--data-dir")
        .arg(data)
        .arg("--models-dir")
        .arg(models)
        .args(["--log", "info,loraforge=debug"]);
    if let Some(url) = database_url {
        cmd.arg("--database-url").arg(url);
    }
    cmd.args(extra);
    cmd
}

/// Starts `loraforge serve` on a free port and waits for its address line.
fn launch(
    data: &Path,
    models: &Path,
    backend: Backend,
    database_url: &str,
    host: &str,
    extra: &[&str],
) -> (Child, String, Arc<Mutex<String>>) {
    let url = (backend == Backend::Postgres).then_some(database_url);
    let mut cmd = serve_command(data, models, url, host, extra);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn loraforge");

    let logs = Arc::new(Mutex::new(String::new()));
    let stderr = child.stderr.take().unwrap();
    let sink = logs.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let mut l = sink.lock().unwrap();
            l.push_str(&line);
            l.push('\n');
        }
    });
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let line = rx
        .recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| panic!("server did not start:\n{}", logs.lock().unwrap()));
    let base = line
        .strip_prefix("loraforge listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        // A wildcard bind is reached through loopback.
        .replace("//0.0.0.0:", "//127.0.0.1:");
    (child, base, logs)
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every regular file under `dir`, relative to it.
pub fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    out.sort();
    out
}

/// One valid chat example, numbered so that every line differs.
pub fn chat_line(i: usize) -> String {
    format!(
        "{{\"messages\":[{{\"role\":\"user\",\"content\":\"question {i}\"}},\
         {{\"role\":\"assistant\",\"content\":\"answer {i}\"}}]}}\n"
    )
}

pub fn chat_jsonl(n: usize) -> String {
    (0..n).map(chat_line).collect()
}

// ---- responses against openapi.yaml --------------------------------------

pub fn spec() -> Value {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../openapi.yaml"))
        .unwrap();
    serde_yaml::from_str(&text).unwrap()
}

fn resolve<'a>(spec: &'a Value, v: &'a Value) -> &'a Value {
    match v.get("$ref").and_then(Value::as_str) {
        Some(r) => {
            let mut cur = spec;
            for part in r.trim_start_matches("#/").split('/') {
                cur = &cur[part];
            }
            resolve(spec, cur)
        }
        None => v,
    }
}

fn type_ok(t: &str, v: &Value) -> bool {
    match t {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "integer" => v.is_i64() || v.is_u64(),
        "number" => v.is_number(),
        "boolean" => v.is_boolean(),
        "null" => v.is_null(),
        _ => false,
    }
}

/// Checks `v` against `schema`: types, enums, required fields, and that every field
/// in the response is described in the spec.
fn check(spec: &Value, schema: &Value, v: &Value, at: &str, errs: &mut Vec<String>) {
    let schema = resolve(spec, schema);
    let types: Vec<&str> = match &schema["type"] {
        Value::String(t) => vec![t.as_str()],
        Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
        _ => vec![],
    };
    if !types.is_empty() && !types.iter().any(|t| type_ok(t, v)) {
        errs.push(format!("{at}: {v} is not of type {types:?}"));
        return;
    }
    if let Some(e) = schema["enum"].as_array() {
        if !e.contains(v) {
            errs.push(format!("{at}: {v} is not one of {e:?}"));
        }
    }
    if let (Some(obj), Some(props)) = (v.as_object(), schema["properties"].as_object()) {
        for (k, val) in obj {
            match props.get(k) {
                None => errs.push(format!("{at}.{k}: field missing from openapi.yaml")),
                Some(p) => check(spec, p, val, &format!("{at}.{k}"), errs),
            }
        }
        for r in schema["required"].as_array().into_iter().flatten() {
            if !obj.contains_key(r.as_str().unwrap()) {
                errs.push(format!(
                    "{at}.{}: required by openapi.yaml but absent",
                    r.as_str().unwrap()
                ));
            }
        }
    }
    if let (Some(items), Some(arr)) = (schema.get("items"), v.as_array()) {
        for (i, item) in arr.iter().enumerate() {
            check(spec, items, item, &format!("{at}[{i}]"), errs);
        }
    }
}

pub fn check_response(
    spec: &Value,
    path: &str,
    method: &str,
    status: u16,
    body: &Value,
) -> Vec<String> {
    let op = &spec["paths"][path][method];
    assert!(op.is_object(), "{method} {path} is not in openapi.yaml");
    let resp = resolve(spec, &op["responses"][status.to_string()]);
    assert!(
        resp.is_object(),
        "{method} {path} does not document status {status}"
    );
    let schema = &resp["content"]["application/json"]["schema"];
    assert!(
        schema.is_object(),
        "{method} {path} {status} has no JSON schema"
    );
    let mut errs = Vec::new();
    check(
        spec,
        schema,
        body,
        &format!("{method} {path} {status}"),
        &mut errs,
    );
    errs
}

/// The repository root (fixtures, data sets, scripts).
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Copies `from` into `to`, sub-folders included.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        if e.path().is_dir() {
            // Diffusers folders nest their components (unet/, vae/, ...).
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// `GET path` as JSON.
pub async fn get_json(s: &TestServer, path: &str) -> Value {
    reqwest::get(s.url(path))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Uploads `body` as a raw JSONL request body (purpose fine-tune): status and JSON.
pub async fn upload_raw(
    s: &TestServer,
    filename: &str,
    body: impl Into<reqwest::Body>,
) -> (u16, Value) {
    upload_as(s, filename, "application/jsonl", body).await
}

/// Uploads `body` as a raw request body of `content_type` (purpose fine-tune).
pub async fn upload_as(
    s: &TestServer,
    filename: &str,
    content_type: &str,
    body: impl Into<reqwest::Body>,
) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(s.url("/v1/files"))
        .query(&[("filename", filename), ("purpose", "fine-tune")])
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

/// POSTs a JSON body (with a bearer key when given): status and JSON.
/// Asks `model` for a chat completion and checks it is refused as a model that does not
/// chat (400, `model_not_supported`); returns the error body for further checks.
pub async fn chat_refused(s: &TestServer, model: &Value) -> Value {
    let (st, e) = post_json(
        s,
        "/v1/chat/completions",
        None,
        &serde_json::json!({"model": model, "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(st, 400, "{model}: {e}");
    assert_eq!(e["error"]["code"], "model_not_supported", "{model}: {e}");
    e
}

pub async fn post_json(
    s: &TestServer,
    path: &str,
    key: Option<&str>,
    body: &Value,
) -> (u16, Value) {
    let mut r = reqwest::Client::new().post(s.url(path)).json(body);
    if let Some(k) = key {
        r = r.bearer_auth(k);
    }
    let r = r.send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

/// `POST /v1/fine_tuning/jobs`: status and JSON.
pub async fn create_job(s: &TestServer, body: Value) -> (u16, Value) {
    post_json(s, "/v1/fine_tuning/jobs", None, &body).await
}

/// Fails if the server logged SQLite lock contention or a failed request.
pub fn assert_no_lock_errors(s: &TestServer) {
    let logs = s.logs().to_lowercase();
    for needle in ["sqlite_busy", "database is locked", "request failed"] {
        assert!(
            !logs.contains(needle),
            "{needle} in the server log:\n{logs}"
        );
    }
}

/// Downloads a finished job's adapter zip and unpacks it into a new temporary folder.
pub async fn download_adapter(s: &TestServer, job_id: &str) -> tempfile::TempDir {
    let zip = reqwest::get(s.url(&format!("/v1/fine_tuning/jobs/{job_id}/adapter")))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    zip::ZipArchive::new(std::io::Cursor::new(zip.to_vec()))
        .unwrap()
        .extract(dir.path())
        .unwrap();
    dir
}

/// Uploads `tests/data/chat-small.jsonl` (raw body) and returns the processed file's id.
pub async fn upload_chat(s: &TestServer) -> String {
    let body = std::fs::read(root().join("tests/data/chat-small.jsonl")).unwrap();
    let (_, r) = upload_raw(s, "chat.jsonl", body).await;
    assert_eq!(r["status"], "processed", "{r}");
    r["id"].as_str().unwrap().to_string()
}

/// Polls a job until its status is one of `want`; fails after `within`.
pub async fn wait_status(s: &TestServer, id: &str, want: &[&str], within: Duration) -> Value {
    let t0 = Instant::now();
    loop {
        let j = get_json(s, &format!("/v1/fine_tuning/jobs/{id}")).await;
        if want.contains(&j["status"].as_str().unwrap()) {
            return j;
        }
        assert!(
            t0.elapsed() < within,
            "job {id} stuck at {}:\n{}",
            j["status"],
            s.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One SSE frame: (id, event, data).
pub type Frame = (Option<i64>, String, String);

/// Reads SSE frames until `done`, or until `stop_after` frames when given.
pub async fn read_sse(
    s: &TestServer,
    id: &str,
    last_event_id: Option<i64>,
    stop_after: Option<usize>,
) -> Vec<Frame> {
    let mut req =
        reqwest::Client::new().get(s.url(&format!("/v1/fine_tuning/jobs/{id}/events?stream=true")));
    if let Some(l) = last_event_id {
        req = req.header("Last-Event-ID", l.to_string());
    }
    let resp = req.send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    assert_eq!(resp.headers()["x-accel-buffering"], "no");
    let mut body = resp.bytes_stream();
    let mut buf = String::new();
    let mut frames = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while let Ok(Some(chunk)) = tokio::time::timeout_at(deadline.into(), body.next()).await {
        buf.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
        while let Some(end) = buf.find("\n\n") {
            let raw: String = buf.drain(..end + 2).collect();
            let (mut fid, mut ev, mut data) = (None, String::from("message"), String::new());
            for line in raw.lines() {
                if let Some(v) = line
                    .strip_prefix("id: ")
                    .or_else(|| line.strip_prefix("id:"))
                {
                    fid = v.trim().parse().ok();
                } else if let Some(v) = line
                    .strip_prefix("event: ")
                    .or_else(|| line.strip_prefix("event:"))
                {
                    ev = v.trim().to_string();
                } else if let Some(v) = line
                    .strip_prefix("data: ")
                    .or_else(|| line.strip_prefix("data:"))
                {
                    data.push_str(v);
                }
            }
            if raw.lines().all(|l| l.starts_with(':')) {
                continue; // keep-alive comment
            }
            let done = ev == "done";
            frames.push((fid, ev, data));
            if done || stop_after.is_some_and(|n| frames.len() >= n) {
                return frames;
            }
        }
    }
    panic!(
        "the event stream ended without `done` after {} frames:\n{}",
        frames.len(),
        s.logs()
    );
}

/// Loads `adapter` on `model` with HF PEFT (scripts/peft_check.py, in `LORAFORGE_VENV`):
/// fails on missing or unexpected keys, a tensor that does not load bit-exactly, or an
/// adapter that changes nothing. Skipped without the venv unless
/// `LORAFORGE_REQUIRE_REAL_MODELS=1`.
pub fn peft_check(model: &Path, adapter: &Path) {
    peft_check_merged(model, adapter, None)
}

/// The Python of `LORAFORGE_VENV` (transformers, peft: `scripts/setup-python.sh`); `None`
/// (the caller skips its check) when it is not set, unless
/// `LORAFORGE_REQUIRE_REAL_MODELS=1`, which makes that a failure.
pub fn venv_python() -> Option<PathBuf> {
    match std::env::var("LORAFORGE_VENV").map(PathBuf::from) {
        Ok(v) if v.join("bin/python").is_file() => Some(v.join("bin/python")),
        _ if std::env::var("LORAFORGE_REQUIRE_REAL_MODELS").as_deref() == Ok("1") => {
            panic!("LORAFORGE_VENV is not set to a venv with peft (scripts/setup-python.sh)")
        }
        _ => {
            eprintln!("Python check skipped: LORAFORGE_VENV not set");
            None
        }
    }
}

/// [`peft_check`], and with `merged` (a `loraforge merge` folder) also that transformers
/// computes the merged model as PEFT computes base + adapter.
pub fn peft_check_merged(model: &Path, adapter: &Path, merged: Option<&Path>) {
    let Some(python) = venv_python() else { return };
    let mut cmd = Command::new(python);
    cmd.arg(root().join("scripts/peft_check.py"))
        .arg("--base")
        .arg(model)
        .arg("--adapter")
        .arg(adapter);
    if let Some(m) = merged {
        cmd.arg("--merged").arg(m);
    }
    let out = cmd.output().expect("spawn python");
    assert!(
        out.status.success(),
        "peft_check.py failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{}", String::from_utf8_lossy(&out.stdout));
}

/// Unpacks a zip's bytes into `dir`; its entry names.
pub fn unzip(bytes: &[u8], dir: &Path) -> Vec<String> {
    let mut z = zip::ZipArchive::new(std::io::Cursor::new(bytes)).unwrap();
    let names: Vec<String> = z.file_names().map(String::from).collect();
    z.extract(dir).unwrap();
    names
}

/// Runs `cmd` to success (the failure shows its stdout and stderr); its stdout.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
