//! Starts the real `loraforge` binary on a random port, against SQLite or (when
//! `TEST_DATABASE_URL` is set) a throw-away PostgreSQL database.

#![allow(dead_code)]

use loraforge_store::testing::TempPgDatabase;
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
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_loraforge"));
        // The tests' own configuration only: nothing from the caller's environment.
        for (k, _) in std::env::vars() {
            if k.starts_with("LORAFORGE_") {
                cmd.env_remove(k);
            }
        }
        cmd.args(["serve", "--host", "127.0.0.1", "--port", "0"])
            .arg("--data-dir")
            .arg(&data)
            .arg("--models-dir")
            .arg(&models)
            .args(["--log", "info,loraforge=debug"]);
        if backend == Backend::Postgres {
            cmd.arg("--database-url").arg(&database_url);
        }
        cmd.args(extra)
            .stdin(Stdio::null())
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
            .to_string();
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
