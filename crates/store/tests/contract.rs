//! The store's contract: every test runs against SQLite, and against PostgreSQL too
//! when `TEST_DATABASE_URL` points at a server where we may create databases (each
//! test gets its own database, dropped afterwards).

use loraforge_store::testing::TempPgDatabase;
use loraforge_store::*;

struct Db {
    store: Store,
    _dir: Option<tempfile::TempDir>,
    _pg: Option<TempPgDatabase>,
}

async fn backends() -> Vec<Db> {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::connect_sqlite_file(&dir.path().join("t.db"))
        .await
        .unwrap();
    store.migrate().await.unwrap();
    let mut out = vec![Db {
        store,
        _dir: Some(dir),
        _pg: None,
    }];
    if let Ok(admin) = std::env::var("TEST_DATABASE_URL") {
        let pg = TempPgDatabase::create(&admin)
            .await
            .expect("TEST_DATABASE_URL is set but a test database cannot be created");
        let store = Store::connect(pg.url()).await.unwrap();
        store.migrate().await.unwrap();
        out.push(Db {
            store,
            _dir: None,
            _pg: Some(pg),
        });
    }
    out
}

fn file(id: &str, purpose: &str) -> NewFile {
    NewFile {
        id: id.into(),
        purpose: purpose.into(),
        filename: "../../etc/passwd".into(),
        bytes: 42,
        sha256: "ab".repeat(32),
        storage_key: format!("files/{id}.jsonl"),
        status: "processed".into(),
        status_details: None,
        format: Some("chat".into()),
        examples: Some(3),
        errors: None,
        created_at: now_secs(),
        api_key_id: None,
    }
}

fn job(id: &str, training_file: &str) -> NewJob {
    NewJob {
        id: id.into(),
        api_key_id: None,
        model: "tiny".into(),
        training_file: training_file.into(),
        validation_file: None,
        suffix: None,
        spec: "{}".into(),
        priority: 0,
        max_attempts: 3,
        idempotency_key: None,
        device_kind: None,
    }
}

#[tokio::test]
async fn files_round_trip() {
    for db in backends().await {
        let s = &db.store;
        let f = file("file-a", "fine-tune");
        assert_eq!(s.insert_file(&f).await.unwrap(), f);
        assert_eq!(s.get_file("file-a").await.unwrap(), Some(f.clone()));
        assert_eq!(s.get_file("file-b").await.unwrap(), None);
        // ids are unique
        assert!(matches!(s.insert_file(&f).await, Err(Error::Conflict(_))));
    }
}

#[tokio::test]
async fn cursor_pagination() {
    for db in backends().await {
        let s = &db.store;
        for i in 0..7 {
            s.insert_file(&file(&format!("file-{i}"), "fine-tune"))
                .await
                .unwrap();
        }
        s.insert_file(&file("file-other", "batch")).await.unwrap();
        let mut seen = Vec::new();
        let mut after = None;
        let mut pages = 0;
        loop {
            let page = s
                .list_files(&ListFiles {
                    after: after.clone(),
                    limit: 3,
                    order: Order::Desc,
                    purpose: Some("fine-tune".into()),
                    owner: None,
                })
                .await
                .unwrap();
            pages += 1;
            seen.extend(page.data.iter().map(|f| f.id.clone()));
            after = page.data.last().map(|f| f.id.clone());
            if !page.has_more {
                break;
            }
        }
        assert_eq!(pages, 3);
        let want: Vec<String> = (0..7).rev().map(|i| format!("file-{i}")).collect();
        assert_eq!(seen, want);

        let asc = s
            .list_files(&ListFiles {
                after: Some("file-5".into()),
                limit: 10,
                order: Order::Asc,
                purpose: None,
                owner: None,
            })
            .await
            .unwrap();
        let ids: Vec<_> = asc.data.iter().map(|f| f.id.as_str()).collect();
        assert_eq!(ids, ["file-6", "file-other"]);
        assert!(!asc.has_more);

        assert!(matches!(
            s.list_files(&ListFiles {
                after: Some("file-nope".into()),
                limit: 3,
                ..Default::default()
            })
            .await,
            Err(Error::Invalid(_))
        ));
    }
}

#[tokio::test]
async fn delete_is_refused_while_a_live_job_uses_the_file() {
    for db in backends().await {
        let s = &db.store;
        s.insert_file(&file("file-t", "fine-tune")).await.unwrap();
        s.insert_file(&file("file-v", "fine-tune")).await.unwrap();
        let mut j = job("ftjob-1", "file-t");
        j.validation_file = Some("file-v".into());
        s.insert_job(&j).await.unwrap();

        assert_eq!(s.delete_file("file-x").await.unwrap(), DeleteFile::NotFound);
        for status in [JobStatus::Queued, JobStatus::Running] {
            s.set_job_status("ftjob-1", status).await.unwrap();
            for id in ["file-t", "file-v"] {
                assert_eq!(
                    s.delete_file(id).await.unwrap(),
                    DeleteFile::InUse("ftjob-1".into())
                );
            }
        }
        s.set_job_status("ftjob-1", JobStatus::Succeeded)
            .await
            .unwrap();
        assert!(matches!(
            s.delete_file("file-t").await.unwrap(),
            DeleteFile::Deleted(f) if f.id == "file-t"
        ));
        assert_eq!(s.get_file("file-t").await.unwrap(), None);
        // The job keeps its reference for the record.
        let j = s.get_job("ftjob-1").await.unwrap().unwrap();
        assert_eq!(j.training_file, "file-t");
        assert_eq!(j.status(), Some(JobStatus::Succeeded));
        assert!(j.finished_at.is_some());
    }
}

#[tokio::test]
async fn new_jobs_start_queued_without_a_lease() {
    for db in backends().await {
        let s = &db.store;
        let j = s.insert_job(&job("ftjob-q", "file-1")).await.unwrap();
        assert_eq!(j.status, "queued");
        assert_eq!((j.attempt, j.fencing_token), (0, 0));
        assert_eq!(j.lease_owner, None);
        assert!(j.run_at_ms > 0);
        assert!(matches!(
            s.set_job_status("ftjob-nope", JobStatus::Failed).await,
            Err(Error::NotFound)
        ));
        // idempotency keys are unique (per api key)
        let mut a = job("ftjob-i1", "file-1");
        a.idempotency_key = Some("k".into());
        s.insert_job(&a).await.unwrap();
        let mut b = job("ftjob-i2", "file-1");
        b.idempotency_key = Some("k".into());
        assert!(matches!(s.insert_job(&b).await, Err(Error::Conflict(_))));
    }
}

#[tokio::test]
async fn event_ids_are_monotonic() {
    for db in backends().await {
        let s = &db.store;
        s.insert_job(&job("ftjob-e", "file-1")).await.unwrap();
        s.insert_job(&job("ftjob-f", "file-1")).await.unwrap();
        let mut ids = Vec::new();
        for i in 0..6 {
            let e = s
                .append_event(&NewEvent {
                    job_id: if i % 2 == 0 { "ftjob-e" } else { "ftjob-f" }.into(),
                    attempt: 1,
                    level: "info".into(),
                    kind: "metrics".into(),
                    message: format!("step {i}"),
                    data: Some(format!("{{\"step\":{i}}}")),
                })
                .await
                .unwrap();
            ids.push(e.id);
        }
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
        let evs = s.list_events("ftjob-e", None, 100).await.unwrap();
        assert_eq!(evs.len(), 3);
        assert_eq!(evs[0].kind, "metrics");
        let after = s
            .list_events("ftjob-e", Some(evs[0].id), 100)
            .await
            .unwrap();
        assert_eq!(after, evs[1..].to_vec());
        assert_eq!(s.list_events("ftjob-e", None, 1).await.unwrap().len(), 1);
        // unknown job: refused by the foreign key
        assert!(s
            .append_event(&NewEvent {
                job_id: "ftjob-nope".into(),
                attempt: 1,
                level: "info".into(),
                kind: "message".into(),
                message: "x".into(),
                data: None,
            })
            .await
            .is_err());
    }
}

#[tokio::test]
async fn checkpoints_and_api_keys() {
    for db in backends().await {
        let s = &db.store;
        s.insert_job(&job("ftjob-c", "file-1")).await.unwrap();
        for step in [10, 20] {
            s.insert_checkpoint(&CheckpointRecord {
                id: format!("ftckpt-{step}"),
                job_id: "ftjob-c".into(),
                attempt: 1,
                step,
                storage_key: format!("jobs/ftjob-c/1/ckpt-{step}"),
                metrics: None,
                bytes: 0,
                created_at: now_secs(),
            })
            .await
            .unwrap();
        }
        let cks = s.list_checkpoints("ftjob-c").await.unwrap();
        assert_eq!(cks.iter().map(|c| c.step).collect::<Vec<_>>(), [20, 10]);
        let dup = CheckpointRecord {
            id: "ftckpt-dup".into(),
            ..cks[0].clone()
        };
        assert!(matches!(
            s.insert_checkpoint(&dup).await,
            Err(Error::Conflict(_))
        ));

        let key = ApiKeyRecord {
            id: "key-1".into(),
            name: "ci".into(),
            prefix: "lf-abc".into(),
            token_sha256: "cd".repeat(32),
            created_at: now_secs(),
            last_used_at: None,
            revoked_at: None,
            admin: false,
        };
        assert!(!s.has_live_api_keys().await.unwrap());
        s.insert_api_key(&key).await.unwrap();
        assert!(s.has_live_api_keys().await.unwrap());
        assert_eq!(
            s.find_api_key(&key.token_sha256).await.unwrap(),
            Some(key.clone())
        );
        s.revoke_api_key("key-1").await.unwrap();
        assert_eq!(s.find_api_key(&key.token_sha256).await.unwrap(), None);
        assert!(!s.has_live_api_keys().await.unwrap());
        assert!(matches!(
            s.revoke_api_key("key-1").await,
            Err(Error::NotFound)
        ));
    }
}

#[tokio::test]
async fn migrations_are_idempotent_and_ping_works() {
    for db in backends().await {
        db.store.migrate().await.unwrap();
        db.store.ping().await.unwrap();
    }
}

/// Many writers at once, mixing single statements and IMMEDIATE transactions:
/// SQLite must queue them on its busy timeout, never fail with SQLITE_BUSY.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_never_see_busy() {
    for db in backends().await {
        let s = db.store.clone();
        let tasks: Vec<_> = (0..32)
            .map(|i| {
                let s = s.clone();
                tokio::spawn(async move {
                    let id = format!("file-c{i}");
                    s.insert_file(&file(&id, "fine-tune")).await?;
                    if i % 2 == 0 {
                        s.delete_file(&id).await?;
                    }
                    Ok::<_, Error>(())
                })
            })
            .collect();
        for t in tasks {
            if let Err(e) = t.await.unwrap() {
                panic!("writer failed (busy: {}): {e}", e.is_busy());
            }
        }
        let page = s
            .list_files(&ListFiles {
                limit: 100,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(page.data.len(), 16);
    }
}

#[tokio::test]
async fn blobs_commit_atomically_and_leave_no_temp_files() {
    use futures::TryStreamExt;
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let tmp = dir.path().join("tmp");
    let blobs = BlobStore::local(&dir.path().join("blobs"), &tmp).unwrap();

    let up = blobs.new_upload().unwrap();
    up.handle().unwrap().write_all(b"hello\n").unwrap();
    assert_eq!(std::fs::read_dir(&tmp).unwrap().count(), 1);
    blobs.commit(up, "files/file-1.jsonl").await.unwrap();
    assert_eq!(std::fs::read_dir(&tmp).unwrap().count(), 0);
    assert_eq!(
        std::fs::read(dir.path().join("blobs/files/file-1.jsonl")).unwrap(),
        b"hello\n"
    );
    // A committed blob has the mode any created file gets here (0644 under the usual
    // umask), not the temp file's private 0600.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let plain = dir.path().join("plain");
        std::fs::File::create(&plain).unwrap();
        assert_eq!(
            mode(&dir.path().join("blobs/files/file-1.jsonl")),
            mode(&plain)
        );
    }
    let (size, stream) = blobs.get("files/file-1.jsonl").await.unwrap();
    assert_eq!(size, 6);
    let chunks: Vec<bytes::Bytes> = stream.try_collect().await.unwrap();
    assert_eq!(chunks.concat(), b"hello\n");

    // an abandoned upload vanishes with its handle
    let up = blobs.new_upload().unwrap();
    up.handle().unwrap().write_all(b"partial").unwrap();
    drop(up);
    assert_eq!(std::fs::read_dir(&tmp).unwrap().count(), 0);

    // a crash's leftovers are swept at start-up
    std::fs::write(tmp.join("upload-stale"), b"x").unwrap();
    assert_eq!(blobs.sweep_tmp().unwrap(), 1);

    blobs.delete("files/file-1.jsonl").await.unwrap();
    blobs.delete("files/file-1.jsonl").await.unwrap();
    assert!(matches!(
        blobs.get("files/file-1.jsonl").await,
        Err(Error::NotFound)
    ));
}

// ---- queue ------------------------------------------------------------------

use std::time::Duration;

const LONG: Duration = Duration::from_secs(60);

/// Inserts `ftjob-<name>` on a fresh training file id.
async fn queued(s: &Store, name: &str) -> JobRecord {
    s.insert_job(&job(&format!("ftjob-{name}"), "file-1"))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_claimers_take_each_job_exactly_once() {
    for db in backends().await {
        let s = db.store.clone();
        for i in 0..20 {
            queued(&s, &format!("c{i:02}")).await;
        }
        let tasks: Vec<_> = (0..8)
            .map(|w| {
                let s = s.clone();
                tokio::spawn(async move {
                    let mut got = Vec::new();
                    while let Some(c) = s
                        .claim_next_job(&format!("worker-{w}"), "cpu", LONG)
                        .await
                        .map_err(|e| format!("claim failed (busy: {}): {e}", e.is_busy()))?
                    {
                        assert_eq!(c.lease.worker_id, format!("worker-{w}"));
                        assert_eq!((c.lease.attempt, c.lease.fencing_token), (1, 1));
                        got.push(c.job.id);
                    }
                    Ok::<_, String>(got)
                })
            })
            .collect();
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap().unwrap());
        }
        all.sort();
        let want: Vec<String> = (0..20).map(|i| format!("ftjob-c{i:02}")).collect();
        assert_eq!(all, want, "{:?}", db.store.backend());
        assert!(s
            .claim_next_job("late", "cpu", LONG)
            .await
            .unwrap()
            .is_none());
    }
}

#[tokio::test]
async fn claims_follow_priority_then_age_and_device_kind() {
    for db in backends().await {
        let s = &db.store;
        queued(s, "old").await;
        queued(s, "gpu").await;
        s.set_job_device_kind("ftjob-gpu", Some("cuda"))
            .await
            .unwrap();
        let mut urgent = job("ftjob-urgent", "file-1");
        urgent.priority = -1;
        s.insert_job(&urgent).await.unwrap();
        queued(s, "new").await;
        // A kind given at insert (a big text-to-image job) routes the same way.
        let mut born_gpu = job("ftjob-born-gpu", "file-1");
        born_gpu.device_kind = Some("cuda".into());
        s.insert_job(&born_gpu).await.unwrap();

        let mut order = Vec::new();
        while let Some(c) = s.claim_next_job("w", "cpu", LONG).await.unwrap() {
            let j = s.get_job(&c.job.id).await.unwrap().unwrap();
            assert_eq!(j, c.job);
            assert_eq!(j.status(), Some(JobStatus::Running));
            assert_eq!(j.lease_owner.as_deref(), Some("w"));
            assert!(j.started_at.is_some());
            assert_eq!(j.lease_expires_at_ms, Some(c.lease.expires_at_ms));
            order.push(c.job.id);
        }
        assert_eq!(order, ["ftjob-urgent", "ftjob-old", "ftjob-new"]);
        let c = s.claim_next_job("g", "cuda", LONG).await.unwrap().unwrap();
        assert_eq!(c.job.id, "ftjob-gpu");
        let c = s.claim_next_job("g", "cuda", LONG).await.unwrap().unwrap();
        assert_eq!(
            (c.job.id.as_str(), c.job.device_kind.as_deref()),
            ("ftjob-born-gpu", Some("cuda"))
        );
        assert!(matches!(
            s.set_job_device_kind("ftjob-nope", None).await,
            Err(Error::NotFound)
        ));
        assert!(matches!(
            s.claim_next_job("w", "cpu", Duration::ZERO).await,
            Err(Error::Invalid(_))
        ));
    }
}

/// A worker that stops heartbeating loses the job to the next claimer, which gets
/// the next attempt; everything the stale worker writes afterwards is refused.
#[tokio::test]
async fn expired_lease_is_reclaimed_and_the_stale_attempt_is_fenced_off() {
    for db in backends().await {
        let s = &db.store;
        queued(s, "x").await;
        let old = s
            .claim_next_job("w1", "cpu", Duration::from_millis(300))
            .await
            .unwrap()
            .unwrap()
            .lease;
        assert_eq!((old.attempt, old.fencing_token), (1, 1));
        s.append_job_event(&old, "info", "message", "attempt 1 started", None)
            .await
            .unwrap();
        // Not yet expired: nobody else may take it.
        assert!(s.claim_next_job("w2", "cpu", LONG).await.unwrap().is_none());

        tokio::time::sleep(Duration::from_millis(400)).await;
        let new = s.claim_next_job("w2", "cpu", LONG).await.unwrap().unwrap();
        assert_eq!(new.job.id, "ftjob-x");
        assert_eq!((new.lease.attempt, new.lease.fencing_token), (2, 2));
        assert_eq!(new.job.lease_owner.as_deref(), Some("w2"));
        let new = new.lease;

        let lost = |r: Result<_>| matches!(r, Err(Error::LeaseLost { ref job_id, attempt: 1 }) if job_id == "ftjob-x");
        assert!(lost(s.heartbeat(&old, LONG).await.map(drop)));
        assert!(lost(
            s.append_job_event(&old, "info", "message", "late", None)
                .await
                .map(drop)
        ));
        assert!(lost(s.update_job_progress(&old, "{\"step\":99}").await));
        assert!(lost(
            s.finish_job(
                &old,
                &JobOutcome::Succeeded {
                    fine_tuned_model: "ft:stale".into(),
                    result: None,
                },
            )
            .await
            .map(drop)
        ));

        // The current attempt writes normally and decides the outcome.
        s.heartbeat(&new, LONG).await.unwrap();
        s.update_job_progress(&new, "{\"step\":5}").await.unwrap();
        s.append_job_event(&new, "info", "message", "attempt 2 resumed", None)
            .await
            .unwrap();
        let done = s
            .finish_job(
                &new,
                &JobOutcome::Succeeded {
                    fine_tuned_model: "ft:tiny::ftjob-x".into(),
                    result: Some("{\"result_files\":[]}".into()),
                },
            )
            .await
            .unwrap();
        assert_eq!(done.status(), Some(JobStatus::Succeeded));
        assert_eq!(done.attempt, 2);
        assert_eq!(done.progress.as_deref(), Some("{\"step\":5}"));
        assert_eq!(done.fine_tuned_model.as_deref(), Some("ft:tiny::ftjob-x"));
        assert_eq!((done.lease_owner, done.lease_expires_at_ms), (None, None));
        assert!(done.finished_at.is_some());
        assert_eq!(s.get_job("ftjob-x").await.unwrap().unwrap().attempt, 2);

        let evs = s.list_events("ftjob-x", None, 100).await.unwrap();
        let msgs: Vec<_> = evs
            .iter()
            .map(|e| (e.attempt, e.message.as_str()))
            .collect();
        assert_eq!(msgs, [(1, "attempt 1 started"), (2, "attempt 2 resumed")]);

        // Finished: even the last holder is fenced off now, and nothing is claimable.
        assert!(s.heartbeat(&new, LONG).await.unwrap_err().is_lease_lost());
        assert!(s
            .finish_job(&new, &JobOutcome::Cancelled)
            .await
            .unwrap_err()
            .is_lease_lost());
        assert!(s.claim_next_job("w3", "cpu", LONG).await.unwrap().is_none());
    }
}

/// Hostile-client finding 3: a job whose worker dies on its last attempt is not left
/// `running` for ever. It fails, with an event, and frees its file and its slot.
#[tokio::test]
async fn an_expired_lease_on_the_last_attempt_fails_the_job() {
    for db in backends().await {
        let s = &db.store;
        let mut j = job("ftjob-once", "file-1");
        j.max_attempts = 1;
        s.insert_job(&j).await.unwrap();
        let c = s
            .claim_next_job("w1", "cpu", Duration::from_millis(20))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(c.lease.attempt, 1);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(s.claim_next_job("w2", "cpu", LONG).await.unwrap().is_none());
        let j = s.get_job("ftjob-once").await.unwrap().unwrap();
        assert_eq!((j.status(), j.attempt), (Some(JobStatus::Failed), 1));
        assert!(j.finished_at.is_some());
        assert!(
            j.error
                .as_deref()
                .unwrap_or_default()
                .contains("worker_lost"),
            "{j:?}"
        );
        let events = s.list_events("ftjob-once", None, 100).await.unwrap();
        assert!(
            events.iter().any(|e| e.message.contains("last one")),
            "{events:?}"
        );
        assert_eq!(s.count_active_jobs(None).await.unwrap(), 0);
        // The late worker's writes are refused.
        assert!(s
            .heartbeat(&c.lease, LONG)
            .await
            .unwrap_err()
            .is_lease_lost());
    }
}

/// Pausing and resuming hands a job back; that must not spend the attempts a crashed
/// worker is allowed, however often it happens.
#[tokio::test]
async fn pauses_do_not_spend_attempts() {
    for db in backends().await {
        let s = &db.store;
        let mut j = job("ftjob-paused", "file-1");
        j.max_attempts = 2;
        s.insert_job(&j).await.unwrap();
        for _ in 0..5 {
            let c = s.claim_next_job("w1", "cpu", LONG).await.unwrap().unwrap();
            s.request_pause("ftjob-paused").await.unwrap();
            s.release_job(&c.lease, true).await.unwrap();
            s.resume_job("ftjob-paused").await.unwrap();
        }
        // Now a crash: the job is taken over, as on its first attempt.
        let c = s
            .claim_next_job("w1", "cpu", Duration::from_millis(20))
            .await
            .unwrap()
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let again = s.claim_next_job("w2", "cpu", LONG).await.unwrap();
        let again = again.expect("the crashed attempt was its last: pauses spent attempts");
        assert_eq!(again.lease.attempt, c.lease.attempt + 1);
    }
}

/// A cancel of a job whose worker is gone takes effect at once.
#[tokio::test]
async fn cancelling_a_job_without_a_live_worker_ends_it_at_once() {
    for db in backends().await {
        let s = &db.store;
        queued(s, "orphan").await;
        s.claim_next_job("w1", "cpu", Duration::from_millis(20))
            .await
            .unwrap()
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let j = s.request_cancel("ftjob-orphan").await.unwrap();
        assert_eq!(j.status(), Some(JobStatus::Cancelled), "{j:?}");
        // A live worker's job only gets the request.
        queued(s, "live").await;
        s.claim_next_job("w1", "cpu", LONG).await.unwrap().unwrap();
        let j = s.request_cancel("ftjob-live").await.unwrap();
        assert_eq!(j.status(), Some(JobStatus::Running));
        assert!(j.cancel_requested_at.is_some());
    }
}

/// A worker frozen inside a transaction keeps its row lock while its connection stays
/// open, and claims skip locked rows; the server must end such a session so the job can
/// be taken over, and the frozen worker, woken, must see an outage to retry past, not a
/// failure.
#[tokio::test]
async fn a_worker_frozen_inside_a_transaction_does_not_pin_its_job() {
    let Ok(admin) = std::env::var("TEST_DATABASE_URL") else {
        eprintln!("skipped: TEST_DATABASE_URL is not set");
        return;
    };
    let pg = TempPgDatabase::create(&admin).await.unwrap();
    // Two processes: the frozen worker's and the one that takes over.
    let frozen = Store::connect(pg.url()).await.unwrap();
    frozen.migrate().await.unwrap();
    let other = Store::connect(pg.url()).await.unwrap();
    queued(&frozen, "pinned").await;
    frozen
        .claim_next_job("w1", "cpu", Duration::from_millis(200))
        .await
        .unwrap()
        .unwrap();
    let stalled = testing::StalledTransaction::lock_job(&frozen, "ftjob-pinned")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t0 = std::time::Instant::now();
    let taken = loop {
        if let Some(c) = other.claim_next_job("w2", "cpu", LONG).await.unwrap() {
            break c;
        }
        assert!(
            t0.elapsed() < PG_IDLE_IN_TRANSACTION_TIMEOUT * 4,
            "the expired job stayed locked by the stalled transaction"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        (taken.job.id.as_str(), taken.lease.attempt),
        ("ftjob-pinned", 2)
    );
    let woke = stalled.resume().await.unwrap_err();
    assert!(woke.is_unavailable(), "{woke:?}");
}

#[tokio::test]
async fn heartbeats_extend_the_lease() {
    for db in backends().await {
        let s = &db.store;
        queued(s, "hb").await;
        let lease = s
            .claim_next_job("w1", "cpu", Duration::from_millis(300))
            .await
            .unwrap()
            .unwrap()
            .lease;
        // Heartbeat well past the first lease: the job is never up for grabs.
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let hb = s
                .heartbeat(&lease, Duration::from_millis(300))
                .await
                .unwrap();
            assert!(hb.lease_expires_at_ms > lease.expires_at_ms);
            assert_eq!(hb.cancel_requested_at, None);
            assert!(s.claim_next_job("w2", "cpu", LONG).await.unwrap().is_none());
        }
        let hb = s.heartbeat(&lease, LONG).await.unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(s.claim_next_job("w2", "cpu", LONG).await.unwrap().is_none());
        let j = s.get_job("ftjob-hb").await.unwrap().unwrap();
        assert_eq!(j.lease_expires_at_ms, Some(hb.lease_expires_at_ms));
        assert_eq!((j.attempt, j.lease_owner.as_deref()), (1, Some("w1")));
        assert!(j.heartbeat_at_ms.is_some());
        assert!(matches!(
            s.heartbeat(&lease, Duration::ZERO).await,
            Err(Error::Invalid(_))
        ));
    }
}

#[tokio::test]
async fn fenced_event_ids_are_monotonic_across_jobs() {
    for db in backends().await {
        let s = &db.store;
        queued(s, "m1").await;
        queued(s, "m2").await;
        let a = s
            .claim_next_job("w1", "cpu", LONG)
            .await
            .unwrap()
            .unwrap()
            .lease;
        let b = s
            .claim_next_job("w2", "cpu", LONG)
            .await
            .unwrap()
            .unwrap()
            .lease;
        let mut ids = Vec::new();
        for i in 0..10 {
            let lease = if i % 3 == 0 { &b } else { &a };
            let data = format!("{{\"step\":{i}}}");
            let e = s
                .append_job_event(lease, "info", "metrics", &format!("Step {i}"), Some(&data))
                .await
                .unwrap();
            assert_eq!((e.job_id.as_str(), e.attempt), (lease.job_id.as_str(), 1));
            assert_eq!(e.data.as_deref(), Some(data.as_str()));
            ids.push(e.id);
        }
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
        let evs = s.list_events(&a.job_id, None, 100).await.unwrap();
        assert_eq!(evs.len(), 6);
        assert!(evs.windows(2).all(|w| w[0].id < w[1].id));
    }
}

fn api_key(id: &str, admin: bool) -> ApiKeyRecord {
    ApiKeyRecord {
        id: id.into(),
        name: format!("name of {id}"),
        prefix: format!("lf-{id}"),
        token_sha256: format!("{:0>64}", id.replace('-', "")),
        created_at: now_secs(),
        last_used_at: None,
        revoked_at: None,
        admin,
    }
}

#[tokio::test]
async fn api_keys_admin_flag_listing_and_last_use() {
    for db in backends().await {
        let s = &db.store;
        s.insert_api_key(&api_key("key-a", false)).await.unwrap();
        s.insert_api_key(&api_key("key-z", true)).await.unwrap();
        // The hash is unique: a second row for the same token is a conflict.
        assert!(matches!(
            s.insert_api_key(&ApiKeyRecord {
                id: "key-dup".into(),
                ..api_key("key-a", false)
            })
            .await,
            Err(Error::Conflict(_))
        ));
        let admin = s
            .find_api_key(&api_key("key-z", true).token_sha256)
            .await
            .unwrap()
            .unwrap();
        assert!(admin.admin);
        s.touch_api_key("key-a", 1234).await.unwrap();
        s.revoke_api_key("key-z").await.unwrap();
        let all = s.list_api_keys().await.unwrap();
        let ids: Vec<_> = all.iter().map(|k| k.id.as_str()).collect();
        assert_eq!(ids, ["key-a", "key-z"]);
        assert_eq!(all[0].last_used_at, Some(1234));
        assert!(!all[0].admin && all[0].revoked_at.is_none());
        assert!(all[1].admin && all[1].revoked_at.is_some());
        // A revoked key is still listed but no longer found.
        assert_eq!(s.find_api_key(&all[1].token_sha256).await.unwrap(), None);
        assert!(s.has_live_api_keys().await.unwrap());
    }
}

/// Every owner-scoped read treats another owner's row as absent; `None` reads all.
#[tokio::test]
async fn rows_are_filtered_by_owner() {
    for db in backends().await {
        let s = &db.store;
        s.insert_api_key(&api_key("key-a", false)).await.unwrap();
        s.insert_api_key(&api_key("key-b", false)).await.unwrap();
        let owned = |id: &str, owner: Option<&str>| NewFile {
            api_key_id: owner.map(str::to_string),
            ..file(id, "fine-tune")
        };
        s.insert_file(&owned("file-a1", Some("key-a")))
            .await
            .unwrap();
        s.insert_file(&owned("file-a2", Some("key-a")))
            .await
            .unwrap();
        s.insert_file(&owned("file-b1", Some("key-b")))
            .await
            .unwrap();
        s.insert_file(&owned("file-n", None)).await.unwrap();
        assert_eq!(
            s.get_file("file-a1")
                .await
                .unwrap()
                .unwrap()
                .api_key_id
                .as_deref(),
            Some("key-a")
        );

        // get
        assert!(s
            .get_file_of("file-a1", Some("key-a"))
            .await
            .unwrap()
            .is_some());
        assert!(s
            .get_file_of("file-a1", Some("key-b"))
            .await
            .unwrap()
            .is_none());
        assert!(s
            .get_file_of("file-n", Some("key-a"))
            .await
            .unwrap()
            .is_none());
        assert!(s.get_file_of("file-a1", None).await.unwrap().is_some());

        // list, and a cursor naming another owner's file is refused like an unknown one
        let list = |owner: Option<&str>, after: Option<&str>| ListFiles {
            after: after.map(str::to_string),
            limit: 100,
            order: Order::Desc,
            purpose: None,
            owner: owner.map(str::to_string),
        };
        let ids = |p: Page<FileRecord>| p.data.into_iter().map(|f| f.id).collect::<Vec<_>>();
        assert_eq!(
            ids(s.list_files(&list(Some("key-a"), None)).await.unwrap()),
            ["file-a2", "file-a1"]
        );
        assert_eq!(
            ids(s
                .list_files(&list(Some("key-a"), Some("file-a2")))
                .await
                .unwrap()),
            ["file-a1"]
        );
        assert!(matches!(
            s.list_files(&list(Some("key-a"), Some("file-b1"))).await,
            Err(Error::Invalid(_))
        ));
        assert_eq!(ids(s.list_files(&list(None, None)).await.unwrap()).len(), 4);

        // delete
        assert_eq!(
            s.delete_file_of("file-a1", Some("key-b")).await.unwrap(),
            DeleteFile::NotFound
        );
        assert!(s.get_file("file-a1").await.unwrap().is_some());
        assert!(matches!(
            s.delete_file_of("file-a1", Some("key-a")).await.unwrap(),
            DeleteFile::Deleted(_)
        ));

        // jobs
        let owned_job = |id: &str, owner: Option<&str>| NewJob {
            api_key_id: owner.map(str::to_string),
            ..job(id, "file-a2")
        };
        s.insert_job(&owned_job("ftjob-a", Some("key-a")))
            .await
            .unwrap();
        s.insert_job(&owned_job("ftjob-b", Some("key-b")))
            .await
            .unwrap();
        s.insert_job(&owned_job("ftjob-n", None)).await.unwrap();
        assert!(s
            .get_job_of("ftjob-a", Some("key-a"))
            .await
            .unwrap()
            .is_some());
        assert!(s
            .get_job_of("ftjob-a", Some("key-b"))
            .await
            .unwrap()
            .is_none());
        assert!(s
            .get_job_of("ftjob-n", Some("key-b"))
            .await
            .unwrap()
            .is_none());
        assert!(s.get_job_of("ftjob-b", None).await.unwrap().is_some());
        let job_ids = |p: Page<JobRecord>| p.data.into_iter().map(|j| j.id).collect::<Vec<_>>();
        assert_eq!(
            job_ids(s.list_jobs_of(None, 10, None, Some("key-b")).await.unwrap()),
            ["ftjob-b"]
        );
        assert_eq!(
            job_ids(s.list_jobs_of(None, 10, None, None).await.unwrap()),
            ["ftjob-n", "ftjob-b", "ftjob-a"]
        );
        assert!(matches!(
            s.list_jobs_of(Some("ftjob-a"), 10, None, Some("key-b"))
                .await,
            Err(Error::Invalid(_))
        ));
        assert_eq!(
            job_ids(
                s.list_jobs_of(None, 10, Some(JobStatus::Queued), Some("key-a"))
                    .await
                    .unwrap()
            ),
            ["ftjob-a"]
        );
    }
}

/// PostgreSQL announces new, resumed and handed-back jobs to listening workers; SQLite
/// has no listener (its server notifies its own workers in-process).
#[tokio::test]
async fn new_jobs_wake_listening_workers_on_postgres() {
    use futures::StreamExt;
    for db in backends().await {
        let s = &db.store;
        let Some(mut wakeups) = s.job_wakeups().await.unwrap() else {
            assert_eq!(s.backend(), Backend::Sqlite);
            continue;
        };
        s.insert_job(&job("ftjob-w", "file-1")).await.unwrap();
        let got = tokio::time::timeout(std::time::Duration::from_secs(10), wakeups.next())
            .await
            .expect("no wake-up after a job was queued");
        assert!(matches!(got, Some(Ok(()))));
    }
}

/// Hostile-client finding 10: an owner's caps hold under concurrent requests (10 job
/// inserts against a cap of 2; 12 uploads of 10 bytes against a quota of 50).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn owner_caps_hold_under_concurrent_inserts() {
    for db in backends().await {
        let s = db.store.clone();
        let mut f = file("file-cap", "fine-tune");
        f.api_key_id = None;
        s.insert_file(&f).await.unwrap();
        let jobs: Vec<_> = (0..10)
            .map(|i| {
                let s = s.clone();
                tokio::spawn(async move {
                    s.insert_job_within(&job(&format!("ftjob-cap{i}"), "file-cap"), 2)
                        .await
                })
            })
            .collect();
        let (mut ok, mut over) = (0, 0);
        for t in jobs {
            match t.await.unwrap() {
                Ok(_) => ok += 1,
                Err(Error::OverLimit { used }) => {
                    assert_eq!(used, 2);
                    over += 1
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!((ok, over), (2, 8), "{:?}", s.backend());
        assert_eq!(s.count_active_jobs(None).await.unwrap(), 2);

        s.insert_api_key(&api_key("key-q", false)).await.unwrap();
        let uploads: Vec<_> = (0..12)
            .map(|i| {
                let s = s.clone();
                tokio::spawn(async move {
                    let mut f = file(&format!("file-q{i:02}"), "fine-tune");
                    f.bytes = 10;
                    f.api_key_id = Some("key-q".into());
                    s.insert_file_within(&f, 50).await
                })
            })
            .collect();
        let mut stored = 0;
        for t in uploads {
            match t.await.unwrap() {
                Ok(_) => stored += 1,
                Err(Error::OverLimit { .. }) => {}
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(stored, 5, "{:?}", s.backend());
        assert_eq!(s.stored_bytes(Some("key-q")).await.unwrap(), 50);
    }
}

/// Hostile-client finding 11: a job created while its file is being deleted never ends
/// up with a deleted file: one of the two wins, every time.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn creating_a_job_and_deleting_its_file_never_both_succeed() {
    for db in backends().await {
        let s = db.store.clone();
        for i in 0..25 {
            let fid = format!("file-race{i:02}");
            s.insert_file(&file(&fid, "fine-tune")).await.unwrap();
            let (a, b) = (s.clone(), s.clone());
            let (f1, f2) = (fid.clone(), fid.clone());
            let create = tokio::spawn(async move {
                a.insert_job_within(&job(&format!("ftjob-race{i:02}"), &f1), 0)
                    .await
            });
            let delete = tokio::spawn(async move { b.delete_file_of(&f2, None).await });
            let created = create.await.unwrap();
            let deleted = delete.await.unwrap().unwrap();
            match (&created, &deleted) {
                (Ok(_), DeleteFile::InUse(_)) => {}
                (Err(Error::Invalid(m)), DeleteFile::Deleted(_)) => {
                    assert!(m.contains(&fid), "{m}")
                }
                other => panic!("{:?}: round {i}: {other:?}", s.backend()),
            }
        }
    }
}

/// Hostile-client finding 9: an owner's storage counts its jobs' checkpoints too.
#[tokio::test]
async fn stored_bytes_count_checkpoints() {
    for db in backends().await {
        let s = &db.store;
        s.insert_api_key(&api_key("key-z", false)).await.unwrap();
        let mut f = file("file-z", "fine-tune");
        f.api_key_id = Some("key-z".into());
        f.bytes = 40;
        s.insert_file(&f).await.unwrap();
        let mut j = job("ftjob-z", "file-z");
        j.api_key_id = Some("key-z".into());
        s.insert_job(&j).await.unwrap();
        s.insert_checkpoint(&CheckpointRecord {
            id: "ftckpt-z".into(),
            job_id: "ftjob-z".into(),
            attempt: 1,
            step: 5,
            storage_key: "jobs/ftjob-z/checkpoints/attempt-1/step-5".into(),
            metrics: None,
            created_at: now_secs(),
            bytes: 100,
        })
        .await
        .unwrap();
        assert_eq!(s.stored_bytes(Some("key-z")).await.unwrap(), 140);
        assert_eq!(s.stored_bytes(None).await.unwrap(), 0);
        let mut more = file("file-z2", "fine-tune");
        more.api_key_id = Some("key-z".into());
        more.bytes = 20;
        assert!(matches!(
            s.insert_file_within(&more, 150).await,
            Err(Error::OverLimit { used: 140 })
        ));
        s.insert_file_within(&more, 160).await.unwrap();
    }
}

#[tokio::test]
async fn workers_report_their_memory_and_go_stale() {
    for db in backends().await {
        let s = &db.store;
        s.report_worker("w1", "cuda:0", "cuda", 80 << 30, 70 << 30)
            .await
            .unwrap();
        s.report_worker("w2", "cpu", "cpu", 24 << 30, 20 << 30)
            .await
            .unwrap();
        // A second report replaces the first.
        s.report_worker("w1", "cuda:0", "cuda", 80 << 30, 10 << 30)
            .await
            .unwrap();
        let live = s
            .live_workers(std::time::Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(live.len(), 2);
        assert_eq!((live[0].id.as_str(), live[0].free_bytes), ("w1", 10 << 30));
        assert_eq!(
            (live[1].device.as_str(), live[1].total_bytes),
            ("cpu", 24 << 30)
        );
        // Reports older than the window do not count.
        tokio::time::sleep(std::time::Duration::from_millis(30)).await;
        assert!(s
            .live_workers(std::time::Duration::from_millis(1))
            .await
            .unwrap()
            .is_empty());
        s.remove_worker("w1").await.unwrap();
        let live = s
            .live_workers(std::time::Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(live.len(), 1);
        assert_eq!(live[0].id, "w2");
    }
}

/// Deleting a fine-tuned model marks its job once, only for its owner, and only when the
/// job has a model; the job itself stays.
#[tokio::test]
async fn a_fine_tuned_model_is_deleted_once_by_its_owner() {
    for db in backends().await {
        let s = db.store.clone();
        s.insert_api_key(&api_key("key-a", false)).await.unwrap();
        s.insert_api_key(&api_key("key-b", false)).await.unwrap();
        let mut j = job("ftjob-m", "file-1");
        j.api_key_id = Some("key-a".into());
        s.insert_job(&j).await.unwrap();
        assert!(
            s.delete_fine_tuned_model("ftjob-m", None)
                .await
                .unwrap()
                .is_none(),
            "a job without a model has nothing to delete"
        );
        let c = s.claim_next_job("w", "cpu", LONG).await.unwrap().unwrap();
        s.finish_job(
            &c.lease,
            &JobOutcome::Succeeded {
                fine_tuned_model: "ft:tiny::ftjob-m".into(),
                result: None,
            },
        )
        .await
        .unwrap();
        assert!(s
            .delete_fine_tuned_model("ftjob-m", Some("key-b"))
            .await
            .unwrap()
            .is_none());
        let gone = s
            .delete_fine_tuned_model("ftjob-m", Some("key-a"))
            .await
            .unwrap()
            .expect("the owner deletes it");
        assert!(gone.model_deleted_at.is_some());
        assert_eq!(gone.status(), Some(JobStatus::Succeeded));
        assert!(s
            .delete_fine_tuned_model("ftjob-m", None)
            .await
            .unwrap()
            .is_none());
        let kept = s.get_job("ftjob-m").await.unwrap().unwrap();
        assert_eq!(kept.fine_tuned_model.as_deref(), Some("ft:tiny::ftjob-m"));
        assert_eq!(kept.model_deleted_at, gone.model_deleted_at);
    }
}

fn export(id: &str, dtype: &str, created_at: i64) -> ExportRecord {
    ExportRecord {
        id: id.into(),
        job_id: "ftjob-x".into(),
        format: "merged_gguf".into(),
        dtype: dtype.into(),
        status: "queued".into(),
        error: None,
        storage_key: None,
        bytes: None,
        sha256: None,
        worker_id: None,
        lease_expires_at_ms: None,
        created_at,
        finished_at: None,
        fencing_token: 0,
    }
}

/// Exports are claimed oldest first, once; a claim renews and finishes its own export
/// and nobody else's; an expired lease hands the export to another claim, after which
/// the first can neither renew, finish nor hand it back, even under the same worker name.
#[tokio::test]
async fn exports_are_claimed_once_and_fenced_by_their_claim() {
    for db in backends().await {
        let s = &db.store;
        assert!(s
            .insert_export(&export("ftexp-b", "f16", 20))
            .await
            .unwrap());
        assert!(s
            .insert_export(&export("ftexp-a", "q8_0", 10))
            .await
            .unwrap());
        let long = std::time::Duration::from_secs(60);
        let a = s.claim_export("w1", long).await.unwrap().unwrap();
        assert_eq!((a.id.as_str(), a.status.as_str()), ("ftexp-a", "running"));
        assert_eq!(a.worker_id.as_deref(), Some("w1"));
        let b = s.claim_export("w2", long).await.unwrap().unwrap();
        assert_eq!(b.id, "ftexp-b");
        assert!(s.claim_export("w3", long).await.unwrap().is_none());
        assert!(s
            .renew_export("ftexp-a", a.fencing_token, long)
            .await
            .unwrap());
        assert!(!s
            .renew_export("ftexp-a", a.fencing_token + 1, long)
            .await
            .unwrap());
        let done = ExportOutcome::Succeeded {
            storage_key: "exports/ftexp-a".into(),
            bytes: 42,
            sha256: "ab".into(),
        };
        assert!(!s
            .finish_export("ftexp-a", a.fencing_token - 1, &done)
            .await
            .unwrap());
        assert!(s
            .finish_export("ftexp-a", a.fencing_token, &done)
            .await
            .unwrap());
        let a = s.get_export("ftexp-a").await.unwrap().unwrap();
        assert_eq!(a.status, "succeeded");
        assert_eq!((a.bytes, a.sha256.as_deref()), (Some(42), Some("ab")));
        assert!(a.finished_at.is_some() && a.lease_expires_at_ms.is_none());
        // w2's lease runs out: a worker of the same name (a restarted process) takes the
        // export over with a new claim, and the old claim is fenced off.
        assert!(s
            .renew_export(
                "ftexp-b",
                b.fencing_token,
                std::time::Duration::from_millis(1)
            )
            .await
            .unwrap());
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let again = s.claim_export("w2", long).await.unwrap().unwrap();
        assert_eq!(
            (again.id.as_str(), again.worker_id.as_deref()),
            ("ftexp-b", Some("w2"))
        );
        assert_ne!(again.fencing_token, b.fencing_token);
        let failed = ExportOutcome::Failed {
            error: "boom".into(),
        };
        assert!(!s
            .renew_export("ftexp-b", b.fencing_token, long)
            .await
            .unwrap());
        assert!(!s.release_export("ftexp-b", b.fencing_token).await.unwrap());
        assert!(!s
            .finish_export("ftexp-b", b.fencing_token, &failed)
            .await
            .unwrap());
        // Handed back (a shutdown), queued for the next claim, which the old one is not.
        assert!(s
            .release_export("ftexp-b", again.fencing_token)
            .await
            .unwrap());
        let queued = s.get_export("ftexp-b").await.unwrap().unwrap();
        assert_eq!(queued.status, "queued");
        assert!(queued.worker_id.is_none() && queued.lease_expires_at_ms.is_none());
        let third = s.claim_export("w3", long).await.unwrap().unwrap();
        assert_eq!(third.id, "ftexp-b");
        assert!(!s
            .finish_export("ftexp-b", again.fencing_token, &failed)
            .await
            .unwrap());
        assert!(s
            .finish_export("ftexp-b", third.fencing_token, &failed)
            .await
            .unwrap());
        let ids: Vec<String> = s
            .list_exports("ftjob-x")
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.id)
            .collect();
        assert_eq!(ids, ["ftexp-b", "ftexp-a"]);
        assert_eq!(
            s.delete_export("ftexp-a")
                .await
                .unwrap()
                .map(|e| e.id)
                .as_deref(),
            Some("ftexp-a")
        );
        assert!(s.delete_export("ftexp-a").await.unwrap().is_none());
        assert_eq!(s.list_exports("ftjob-x").await.unwrap().len(), 1);
    }
}

/// A job has one export per format and dtype that has not failed: the same one again is
/// refused (two POSTs at once queue one), another dtype or a retry of a failed one is not.
#[tokio::test]
async fn a_job_has_one_live_export_of_each_kind() {
    for db in backends().await {
        let s = &db.store;
        assert!(s
            .insert_export(&export("ftexp-1", "f16", 10))
            .await
            .unwrap());
        assert!(!s
            .insert_export(&export("ftexp-2", "f16", 11))
            .await
            .unwrap());
        assert!(s.get_export("ftexp-2").await.unwrap().is_none());
        assert!(s
            .insert_export(&export("ftexp-3", "q8_0", 12))
            .await
            .unwrap());
        // A clash of ids is an error, not a silent no-op.
        assert!(s
            .insert_export(&export("ftexp-1", "bf16", 13))
            .await
            .is_err());
        let c = s
            .claim_export("w1", std::time::Duration::from_secs(60))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(c.id, "ftexp-1");
        let failed = ExportOutcome::Failed {
            error: "boom".into(),
        };
        assert!(s
            .finish_export("ftexp-1", c.fencing_token, &failed)
            .await
            .unwrap());
        assert!(s
            .insert_export(&export("ftexp-4", "f16", 14))
            .await
            .unwrap());
        let mut kinds: Vec<(String, String)> = s
            .list_exports("ftjob-x")
            .await
            .unwrap()
            .into_iter()
            .map(|e| (e.id, e.status))
            .collect();
        kinds.sort();
        assert_eq!(
            kinds,
            [
                ("ftexp-1".to_string(), "failed".to_string()),
                ("ftexp-3".into(), "queued".into()),
                ("ftexp-4".into(), "queued".into()),
            ]
        );
    }
}
