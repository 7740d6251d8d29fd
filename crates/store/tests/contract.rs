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
        };
        s.insert_api_key(&key).await.unwrap();
        assert_eq!(
            s.find_api_key(&key.token_sha256).await.unwrap(),
            Some(key.clone())
        );
        s.revoke_api_key("key-1").await.unwrap();
        assert_eq!(s.find_api_key(&key.token_sha256).await.unwrap(), None);
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
