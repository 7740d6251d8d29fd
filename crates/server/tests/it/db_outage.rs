//! A PostgreSQL outage shorter than a lease: while the database is down the API answers
//! 503 on the routes that need it and `/readyz` fails (`/healthz` does not); when it is
//! back everything recovers without a restart, and the job that was training finishes
//! as the same attempt (the outage, about 5 s, is well inside the 20 s lease).
//!
//! The test runs its own PostgreSQL (initdb + pg_ctl as the `postgres` user, on a free
//! port), so stopping it disturbs nothing else. It needs root and PostgreSQL's server
//! binaries; without them it is skipped, unless `LORAFORGE_REQUIRE_REAL_MODELS=1` (CI).

use crate::common;

use common::{copy_dir, root, upload_chat, Backend, TestServer};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

struct PrivatePg {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
}

fn as_postgres(bin: &Path, tool: &str, args: &[&str]) -> std::process::Output {
    Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(bin.join(tool))
        .args(args)
        .output()
        .expect("runuser")
}

impl PrivatePg {
    fn find() -> Option<PathBuf> {
        let is_root = Command::new("id")
            .arg("-u")
            .output()
            .ok()
            .is_some_and(|o| o.stdout.starts_with(b"0"));
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .flatten()
            .map(|e| e.path().join("bin"))
            .find(|b| b.join("initdb").is_file() && b.join("pg_ctl").is_file())?;
        is_root.then_some(bin)
    }

    fn start_new(bin: PathBuf) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let st = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(st.success());
        let data = dir.path().join("data");
        let o = as_postgres(
            &bin,
            "initdb",
            &[
                "-D",
                data.to_str().unwrap(),
                "-A",
                "trust",
                "-U",
                "postgres",
            ],
        );
        assert!(
            o.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let pg = PrivatePg { dir, bin, port };
        pg.start();
        pg
    }

    fn ctl(&self, args: &[&str]) {
        let data = self.dir.path().join("data");
        let log = self.dir.path().join("pg.log");
        let mut all = vec!["-D", data.to_str().unwrap(), "-l", log.to_str().unwrap()];
        all.extend_from_slice(args);
        let o = as_postgres(&self.bin, "pg_ctl", &all);
        assert!(
            o.status.success(),
            "pg_ctl {args:?}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    fn start(&self) {
        let opts = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {}",
            self.port,
            self.dir.path().display()
        );
        self.ctl(&["-w", "-o", &opts, "start"]);
    }

    fn stop(&self) {
        self.ctl(&["-w", "-m", "fast", "stop"]);
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for PrivatePg {
    fn drop(&mut self) {
        let data = self.dir.path().join("data");
        let _ = as_postgres(
            &self.bin,
            "pg_ctl",
            &["-D", data.to_str().unwrap(), "-m", "immediate", "stop"],
        );
    }
}

async fn status_of(url: &str) -> (u16, Value) {
    let r = reqwest::Client::new()
        .get(url)
        .timeout(Duration::from_secs(20))
        .send()
        .await
        .unwrap();
    let st = r.status().as_u16();
    (st, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn a_database_outage_shorter_than_a_lease_costs_nothing() {
    let Some(bin) = PrivatePg::find() else {
        if std::env::var("LORAFORGE_REQUIRE_REAL_MODELS").as_deref() == Ok("1") {
            panic!("the outage test needs root and PostgreSQL's initdb/pg_ctl");
        }
        eprintln!("skipped: needs root and PostgreSQL's server binaries");
        return;
    };
    let pg = PrivatePg::start_new(bin);
    let url = pg.url();
    let s = TestServer::start(
        Backend::Sqlite,
        &[
            "--database-url",
            &url,
            "--lease-seconds",
            "20",
            "--train-threads",
            "1",
        ],
    )
    .await;
    copy_dir(
        &root().join("tests/fixtures/tiny-llama"),
        &s.models_dir().join("tiny-llama"),
    );
    let file = upload_chat(&s).await;
    let job: Value = reqwest::Client::new()
        .post(s.url("/v1/fine_tuning/jobs"))
        .json(&json!({"model": "tiny-llama", "training_file": file,
                      "hyperparameters": {"max_steps": 1500, "batch_size": 2}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = job["id"].as_str().unwrap().to_string();
    let job_url = s.url(&format!("/v1/fine_tuning/jobs/{id}"));
    let t0 = Instant::now();
    loop {
        let (_, j) = status_of(&job_url).await;
        if j["progress"]["step"].as_u64().unwrap_or(0) >= 20 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the job never ran: {j}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    pg.stop();
    let down = Instant::now();
    // Asked together: each waits up to the pool's connect timeout (5 s) for its 503.
    let (h, r, f) = (s.url("/healthz"), s.url("/readyz"), s.url("/v1/files"));
    let (health, ready, files, job_now) = tokio::join!(
        status_of(&h),
        status_of(&r),
        status_of(&f),
        status_of(&job_url)
    );
    assert_eq!(health.0, 200, "/healthz needs no database");
    assert_eq!(ready.0, 503, "/readyz must fail while the database is down");
    assert_eq!(files.0, 503, "{}", files.1);
    assert_eq!(
        files.1["error"]["code"], "database_unavailable",
        "{}",
        files.1
    );
    assert_eq!(job_now.0, 503, "{}", job_now.1);
    let took = down.elapsed();
    assert!(took < Duration::from_secs(12), "the checks took {took:?}");
    pg.start();
    println!("PostgreSQL was down for {took:.1?}");

    // Back without a restart.
    let t0 = Instant::now();
    loop {
        let (ready, _) = status_of(&s.url("/readyz")).await;
        let (files, _) = status_of(&s.url("/v1/files")).await;
        if ready == 200 && files == 200 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "no recovery: readyz {ready}, files {files}\n{}",
            s.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let t0 = Instant::now();
    let done = loop {
        let (_, j) = status_of(&job_url).await;
        if ["succeeded", "failed", "cancelled"].contains(&j["status"].as_str().unwrap_or("")) {
            break j;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(240),
            "job stuck: {j}\n{}",
            s.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(done["status"], "succeeded", "{done}\n{}", s.logs());
    let store = loraforge_store::Store::connect(&url).await.unwrap();
    let j = store.get_job(&id).await.unwrap().unwrap();
    assert_eq!(j.attempt, 1, "the job was re-claimed instead of surviving");
    let steps = store
        .list_events(&id, None, 100_000)
        .await
        .unwrap()
        .iter()
        .filter(|e| e.kind == "metrics")
        .count();
    assert_eq!(steps, 1500, "a step's metrics event was lost or doubled");
}
