//! Scale-out on PostgreSQL and an S3-compatible store (moto's server on loopback): an
//! API-only `serve` and `loraforge worker` processes, each with a data directory of its
//! own, sharing nothing but the database URL and the bucket. Twenty jobs each finish
//! exactly once while one worker is killed with SIGKILL mid-job (another finishes that
//! job after the lease expires) and another is frozen with SIGSTOP past its lease (its
//! job moves on, and after SIGCONT the stale worker writes nothing). A second test makes
//! the freeze land where it is meant to, inside a transaction and between two.
//!
//! Needs `TEST_DATABASE_URL` and `moto_server` in `LORAFORGE_VENV`
//! (`scripts/setup-python.sh`); skipped without them unless
//! `LORAFORGE_REQUIRE_REAL_MODELS=1` (CI), which makes a missing piece a failure.

use crate::common;

use common::{copy_dir, get_json, root, upload_chat, wait_status, Backend, TestServer};
use loraforge_store::testing::{sessions_named, Session, StalledTransaction};
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

/// An API-only server on PostgreSQL and `storage`, with the tiny llama and a chat file
/// uploaded (its id returned).
async fn api_only(storage: &str) -> (TestServer, String) {
    let s = TestServer::start(
        Backend::Postgres,
        &["--devices", "none", "--storage-url", storage],
    )
    .await;
    copy_dir(
        &root().join("tests/fixtures/tiny-llama"),
        &s.models_dir().join("tiny-llama"),
    );
    let file = upload_chat(&s).await;
    (s, file)
}

/// A worker process with its own data directory and its own copy of the base model. Its
/// database sessions carry `app` as their `application_name`.
fn worker(s: &TestServer, dir: &Path, storage: &str, app: &str) -> Killed {
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
        .arg(with_app_name(&s.database_url, app))
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

fn with_app_name(url: &str, app: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}application_name={app}")
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
    let (s, file) = api_only(&storage).await;
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
    let w1 = worker(&s, &dirs.path().join("w1"), &storage, "lf-w1");
    let w2 = worker(&s, &dirs.path().join("w2"), &storage, "lf-w2");

    // SIGKILL w1 in the middle of a job, after its first checkpoint.
    let (killed_job, _) = running_job_of(&store, &s, &ids, &w1, 30).await;
    drop(w1);
    let w3 = worker(&s, &dirs.path().join("w3"), &storage, "lf-w3");

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

fn signal(w: &Killed, sig: &str) {
    let st = Command::new("kill")
        .args([sig, &w.0.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success(), "kill {sig}");
}

async fn sessions(store: &loraforge_store::Store, app: &str) -> Vec<Session> {
    sessions_named(store, app).await.unwrap()
}

/// Freezes `w` inside one of its transactions on job `id`: holds the job's row until one
/// of `w`'s sessions waits on it, freezes `w`, lets the waiting statement through, and
/// keeps the freeze when that session is left idle inside a transaction (an event's
/// fence-and-insert; a heartbeat is a transaction of one statement, so on that one `w` is
/// thawed and the catch tried again). Returns the session PostgreSQL must now end.
async fn freeze_inside_a_transaction(
    store: &loraforge_store::Store,
    w: &Killed,
    app: &str,
    id: &str,
) -> i32 {
    for _ in 0..50 {
        let held = StalledTransaction::lock_job(store, id).await.unwrap();
        let t0 = Instant::now();
        let pid = loop {
            if let Some(s) = sessions(store, app)
                .await
                .iter()
                .find(|s| s.waiting_on_lock)
            {
                break s.pid;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "no session of {app} ever waited on job {id}'s row"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        signal(w, "-STOP");
        held.resume().await.unwrap();
        // The waiting statement runs to its end on the server; the session then shows
        // where the frozen client stands.
        let t0 = Instant::now();
        let after = loop {
            let now = sessions(store, app).await;
            let s = now.into_iter().find(|s| s.pid == pid);
            match s {
                Some(s) if s.state == "active" => {}
                other => break other,
            }
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "session {pid} stayed active"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        if after.as_ref().is_some_and(|s| s.is_idle_in_transaction()) {
            return pid;
        }
        signal(w, "-CONT");
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    panic!("{app} was never caught inside a transaction on job {id}");
}

/// Freezes `w` between transactions: freezes it, waits for any statement in flight to
/// end, and keeps the freeze only when every session of `w`'s is idle outside a
/// transaction (else thaws it and tries again).
async fn freeze_between_transactions(store: &loraforge_store::Store, w: &Killed, app: &str) {
    for i in 0..50u64 {
        signal(w, "-STOP");
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = sessions(store, app).await;
        if !now.is_empty() && now.iter().all(Session::is_idle) {
            return;
        }
        signal(w, "-CONT");
        tokio::time::sleep(Duration::from_millis(20 + 17 * (i % 5))).await;
    }
    panic!("{app} was never caught between transactions");
}

/// Issue 16 #20, made deterministic: one worker is frozen (SIGSTOP) inside a transaction
/// on its job's row, which PostgreSQL ends after its idle-in-transaction timeout, and
/// later one is frozen between transactions. Each time the other worker takes the job
/// over once the lease runs out, and the frozen one, thawed, reports `lease lost` for
/// that job (never `job run failed`) and writes nothing more for its attempt. PostgreSQL
/// and a shared blob folder; needs `TEST_DATABASE_URL` (required in CI).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_frozen_inside_or_between_transactions_knows_its_lease_is_lost() {
    if std::env::var("TEST_DATABASE_URL").is_err() {
        assert!(
            std::env::var("LORAFORGE_REQUIRE_REAL_MODELS").as_deref() != Ok("1"),
            "this test needs TEST_DATABASE_URL"
        );
        eprintln!("skipped: TEST_DATABASE_URL is not set");
        return;
    }
    let dirs = tempfile::tempdir().unwrap();
    let storage = format!("file://{}", dirs.path().join("blobs").display());
    let (s, file) = api_only(&storage).await;
    let store = s.store().await;
    let apps = ["lf-w1", "lf-w2"];
    let workers = [
        worker(&s, &dirs.path().join("w1"), &storage, apps[0]),
        worker(&s, &dirs.path().join("w2"), &storage, apps[1]),
    ];
    let c = reqwest::Client::new();
    for inside in [true, false] {
        // Long enough never to end by itself; it is cancelled once the test has seen
        // what it came for. Unpacked, so that its short steps write an event (a
        // fence-and-insert transaction) far more often than a heartbeat: packed, one step
        // is a whole row of examples and the catch mostly meets heartbeats.
        let job: Value = c
            .post(s.url("/v1/fine_tuning/jobs"))
            .json(&json!({"model": "tiny-llama", "training_file": file,
                          "hyperparameters": {"max_steps": 1_000_000, "batch_size": 1,
                                              "packing": false,
                                              "checkpoint_interval": 1_000_000}}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let id = job["id"].as_str().unwrap().to_string();
        let ids = [id.clone()];
        let (who, attempt) = {
            let t0 = Instant::now();
            loop {
                let j = store.get_job(&id).await.unwrap().unwrap();
                if let Some(i) = workers.iter().position(|w| owned_by(&j, w)) {
                    break (i, j.attempt);
                }
                assert!(
                    t0.elapsed() < Duration::from_secs(60),
                    "nobody claimed {id}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        let (frozen, other) = (&workers[who], &workers[1 - who]);
        running_job_of(&store, &s, &ids, frozen, 3).await;
        if inside {
            let pid = freeze_inside_a_transaction(&store, frozen, apps[who], &id).await;
            // PostgreSQL ends the stalled session, which frees the job's row.
            let t0 = Instant::now();
            while sessions(&store, apps[who])
                .await
                .iter()
                .any(|s| s.pid == pid)
            {
                assert!(
                    t0.elapsed() < Duration::from_secs(30),
                    "PostgreSQL never ended the frozen session {pid}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        } else {
            freeze_between_transactions(&store, frozen, apps[who]).await;
        }
        // The other worker takes the job over once the lease has run out.
        running_job_of(&store, &s, &ids, other, 1).await;
        let j = store.get_job(&id).await.unwrap().unwrap();
        assert!(j.attempt > attempt, "{j:?}");
        signal(frozen, "-CONT");
        let log_path = dirs.path().join(["w1", "w2"][who]).join("worker.log");
        let t0 = Instant::now();
        let log = loop {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            if log
                .lines()
                .any(|l| l.contains("lease lost") && l.contains(&id))
            {
                break log;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "frozen {} transaction, the worker never reported the lost lease of {id}:\n{log}",
                if inside { "inside a" } else { "between" }
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(
            !log.lines().any(|l| l.contains("job run failed")),
            "a lost lease was reported as a failure:\n{log}"
        );
        let r = c
            .post(s.url(&format!("/v1/fine_tuning/jobs/{id}/cancel")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        // Fencing: once the new attempt has written, the old one writes nothing.
        let events = store.list_events(&id, None, 10_000).await.unwrap();
        let mut latest = 0;
        for e in &events {
            assert!(
                e.attempt >= latest,
                "attempt {} wrote after attempt {latest}: {:?}",
                e.attempt,
                e.message
            );
            latest = e.attempt;
        }
        wait_status(&s, &id, &["cancelled"], Duration::from_secs(60)).await;
    }
}
