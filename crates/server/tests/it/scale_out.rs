//! Scale-out on PostgreSQL and an S3-compatible store (moto's server on loopback): an
//! API-only `serve` and `loraforge worker` processes, each with a data directory of its
//! own, sharing nothing but the database URL and the bucket. Twenty jobs each finish
//! exactly once while one worker is killed with SIGKILL mid-job (another finishes that
//! job after the lease expires) and another is frozen with SIGSTOP past its lease (its
//! job moves on, and after SIGCONT the stale worker writes nothing).
//!
//! Needs `TEST_DATABASE_URL` and `moto_server` in `LORAFORGE_VENV`
//! (`scripts/setup-python.sh`); skipped without them unless
//! `LORAFORGE_REQUIRE_REAL_MODELS=1` (CI), which makes a missing piece a failure.

use crate::common;

use common::{copy_dir, get_json, root, upload_chat, Backend, TestServer};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const LEASE: &str = "3";

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-CONT", &self.0.id().to_string()])
            .status();
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn requirements() -> Option<(String, PathBuf)> {
    let require = std::env::var("LORAFORGE_REQUIRE_REAL_MODELS").as_deref() == Ok("1");
    let db = std::env::var("TEST_DATABASE_URL").ok();
    let moto = std::env::var("LORAFORGE_VENV")
        .ok()
        .map(|v| PathBuf::from(v).join("bin/moto_server"))
        .filter(|p| p.is_file());
    match (db, moto) {
        (Some(_), Some(m)) => Some(("".into(), m)),
        _ if require => panic!(
            "the scale-out test needs TEST_DATABASE_URL and moto_server in LORAFORGE_VENV (scripts/setup-python.sh)"
        ),
        _ => {
            eprintln!("skipped: TEST_DATABASE_URL or moto_server (LORAFORGE_VENV) missing");
            None
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// moto's S3 server on a free loopback port, with one bucket.
async fn start_moto(bin: &Path, bucket: &str) -> (Killed, String) {
    let port = free_port();
    let child = Command::new(bin)
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn moto_server");
    let guard = Killed(child);
    let endpoint = format!("http://127.0.0.1:{port}");
    let t0 = Instant::now();
    loop {
        if let Ok(r) = reqwest::Client::new()
            .put(format!("{endpoint}/{bucket}"))
            .send()
            .await
        {
            assert!(r.status().is_success(), "bucket creation: {}", r.status());
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "moto never came up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (guard, endpoint)
}

/// A worker process with its own data directory and its own copy of the base model.
fn worker(s: &TestServer, dir: &Path, storage: &str) -> Killed {
    let models = dir.join("models");
    std::fs::create_dir_all(&models).unwrap();
    copy_dir(
        &root().join("tests/fixtures/tiny-llama"),
        &models.join("tiny-llama"),
    );
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_loraforge"));
    for (k, _) in std::env::vars() {
        if k.starts_with("LORAFORGE_") {
            cmd.env_remove(k);
        }
    }
    let child = cmd
        .arg("worker")
        .arg("--data-dir")
        .arg(dir.join("data"))
        .arg("--database-url")
        .arg(&s.database_url)
        .arg("--storage-url")
        .arg(storage)
        .arg("--models-dir")
        .arg(&models)
        .args(["--lease-seconds", LEASE, "--train-threads", "1"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("worker.log")).unwrap())
        .spawn()
        .unwrap();
    Killed(child)
}

/// The tail of every worker's log, for failure messages.
fn worker_logs(dir: &Path) -> String {
    let mut out = String::new();
    for w in ["w1", "w2", "w3"] {
        let log = std::fs::read_to_string(dir.join(w).join("worker.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        out += &format!("--- {w} (last 40 lines)\n");
        for l in &lines[lines.len().saturating_sub(40)..] {
            out += l;
            out.push('\n');
        }
    }
    out
}

fn owned_by(j: &loraforge_store::JobRecord, w: &Killed) -> bool {
    j.lease_owner
        .as_deref()
        .is_some_and(|o| o.contains(&format!("-{}-", w.0.id())))
}

/// Waits for a running job of `w` past `step`; returns (id, attempt).
async fn running_job_of(
    store: &loraforge_store::Store,
    s: &TestServer,
    ids: &[String],
    w: &Killed,
    step: u64,
) -> (String, i64) {
    let t0 = Instant::now();
    loop {
        for id in ids {
            let j = store.get_job(id).await.unwrap().unwrap();
            if j.status == "running" && owned_by(&j, w) {
                let v = get_json(s, &format!("/v1/fine_tuning/jobs/{id}")).await;
                if v["progress"]["step"].as_u64().unwrap_or(0) >= step {
                    return (id.clone(), j.attempt);
                }
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "worker {} never ran a job past step {step}",
            w.0.id()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_jobs_on_postgres_and_s3_survive_a_killed_and_a_frozen_worker() {
    let Some((_, moto)) = requirements() else {
        return;
    };
    let bucket = "loraforge-scale";
    let (_moto, endpoint) = start_moto(&moto, bucket).await;
    // The usual AWS variables; every process started below inherits them.
    for (k, v) in [
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
        ("AWS_REGION", "us-east-1"),
        ("AWS_ENDPOINT", endpoint.as_str()),
        ("AWS_ALLOW_HTTP", "true"),
    ] {
        std::env::set_var(k, v);
    }
    let storage = format!("s3://{bucket}/run");
    let s = TestServer::start(
        Backend::Postgres,
        &["--devices", "none", "--storage-url", &storage],
    )
    .await;
    copy_dir(
        &root().join("tests/fixtures/tiny-llama"),
        &s.models_dir().join("tiny-llama"),
    );
    let file = upload_chat(&s).await;
    let c = reqwest::Client::new();
    let mut ids = Vec::new();
    for i in 0..20 {
        let j: Value = c
            .post(s.url("/v1/fine_tuning/jobs"))
            .json(&json!({"model": "tiny-llama", "training_file": file, "suffix": format!("j{i}"),
                          "hyperparameters": {"max_steps": 120, "batch_size": 2, "checkpoint_interval": 20}}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        ids.push(j["id"].as_str().unwrap().to_string());
    }
    let store = s.store().await;
    let dirs = tempfile::tempdir().unwrap();
    let w1 = worker(&s, &dirs.path().join("w1"), &storage);
    let w2 = worker(&s, &dirs.path().join("w2"), &storage);

    // SIGKILL w1 in the middle of a job, after its first checkpoint.
    let (killed_job, _) = running_job_of(&store, &s, &ids, &w1, 30).await;
    drop(w1);
    let w3 = worker(&s, &dirs.path().join("w3"), &storage);

    // SIGSTOP w2 mid-job, past its lease: w3 (or nobody else) must take the job over.
    let (frozen_job, frozen_attempt) = running_job_of(&store, &s, &ids, &w2, 30).await;
    let stop = |sig: &str| {
        let st = Command::new("kill")
            .args([sig, &w2.0.id().to_string()])
            .status()
            .unwrap();
        assert!(st.success());
    };
    stop("-STOP");
    let t0 = Instant::now();
    loop {
        let j = store.get_job(&frozen_job).await.unwrap().unwrap();
        if j.attempt > frozen_attempt && j.status == "running" {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "nobody took over the frozen worker's job: {j:?}\n{}",
            worker_logs(dirs.path())
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Let the new owner make progress, then wake the stale one: its next heartbeat or
    // write is refused, and it drops what it had (checked below).
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop("-CONT");
    let t0 = Instant::now();
    loop {
        let mut left = 0;
        for id in &ids {
            let j = store.get_job(id).await.unwrap().unwrap();
            assert!(
                j.status != "failed" && j.status != "cancelled",
                "{id} ended {}: {:?}",
                j.status,
                j.error
            );
            left += usize::from(j.status != "succeeded");
        }
        if left == 0 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "{left} job(s) unfinished\n{}",
            worker_logs(dirs.path())
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let w2_log = dirs.path().join("w2/worker.log");
    let t0 = Instant::now();
    loop {
        let log = std::fs::read_to_string(&w2_log).unwrap_or_default();
        if log
            .lines()
            .any(|l| l.contains("lease lost") && l.contains(&frozen_job))
        {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "the stale worker never noticed it lost the lease:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    drop((w2, w3));

    for id in &ids {
        let j = store.get_job(id).await.unwrap().unwrap();
        let events = store.list_events(id, None, 10_000).await.unwrap();
        let done = events
            .iter()
            .filter(|e| e.message == "The job has successfully completed")
            .count();
        assert_eq!(done, 1, "{id} completed {done} times");
        let expected_attempts = if *id == killed_job || *id == frozen_job {
            2..=3
        } else {
            1..=1
        };
        assert!(
            expected_attempts.contains(&j.attempt),
            "{id}: attempt {} (killed {killed_job}, frozen {frozen_job})",
            j.attempt
        );
        // Fencing: once a later attempt has written, no earlier attempt writes again.
        let mut latest = 0;
        for e in &events {
            assert!(
                e.attempt >= latest,
                "{id}: attempt {} wrote after attempt {latest}: {:?}",
                e.attempt,
                e.message
            );
            latest = e.attempt;
        }
        let adapter = c
            .get(s.url(&format!("/v1/fine_tuning/jobs/{id}/adapter")))
            .send()
            .await
            .unwrap();
        assert_eq!(adapter.status(), 200, "{id}");
    }
    let stale: Vec<String> = store
        .list_events(&frozen_job, None, 10_000)
        .await
        .unwrap()
        .iter()
        .map(|e| format!("{} {}", e.attempt, e.message))
        .collect();
    println!(
        "20 jobs on PostgreSQL + S3 (moto): all succeeded once; {killed_job} survived SIGKILL, \
         {frozen_job} moved on from a SIGSTOPped worker (events by attempt: {} lines)",
        stale.len()
    );
}
