//! The worker pool: one worker per device claims jobs from the database (lease +
//! heartbeat, every write fenced by the claim), trains on a dedicated OS thread, and
//! turns the trainer's callbacks into stored events, progress, checkpoints and, at the
//! end, the adapter artifacts.
//!
//! A worker that loses its lease (it stalled past the expiry and another worker took the
//! job) stops training and writes nothing more: the store rejects its fenced writes.

use crate::app::AppState;
use crate::job::artifacts::{
    adapter_key, adapter_zip, checkpoint_adapter_key, checkpoint_key, extra_files, fine_tuned_name,
    model_card, sha256_hex, ADAPTER_TENSORS, CHECKPOINT_FILES, LORA_GGUF_FILE,
};
use crate::job::spec::train_spec;
use crate::job::workdir::{job_dir, job_ids, remove_job_dir};
use crate::job::{is_text_to_image, JobSpec};
use anyhow::Context;
use futures::StreamExt;
use loraforge_store::{
    CheckpointRecord, ClaimedJob, ExportOutcome, ExportRecord, FileRecord, JobOutcome, Lease,
    NewEvent,
};
use loraforge_trainer::families::diffusion::objective::KOHYA_FILE;
use loraforge_trainer::train::{TrainEvent, TrainSpec};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

/// What a worker needs besides the shared state.
#[derive(Clone)]
pub struct WorkerConfig {
    pub device: String,
    pub lease: Duration,
    pub data_dir: PathBuf,
    /// The most device memory this worker reports (`--device-memory-mib`), in bytes.
    pub memory_cap: Option<u64>,
}

/// Starts one worker task per device.
pub fn spawn(
    state: AppState,
    args: &crate::config::WorkerArgs,
    data_dir: &Path,
) -> Vec<tokio::task::JoinHandle<()>> {
    let lease = Duration::from_secs(args.lease_seconds.max(3));
    let mut handles = Vec::new();
    for (i, device) in args.devices.iter().enumerate() {
        let d = device.trim().to_string();
        if d.is_empty() || d == "none" {
            continue;
        }
        let cfg = WorkerConfig {
            device: d,
            lease,
            data_dir: data_dir.to_path_buf(),
            memory_cap: args.device_memory_mib.map(|m| m.saturating_mul(1 << 20)),
        };
        let worker_id = format!("{}-{}-{i}", hostname(), std::process::id());
        handles.push(tokio::spawn(run_worker(state.clone(), cfg, worker_id)));
    }
    if !handles.is_empty() {
        // Not joined on shutdown: it only wakes the workers, and ends with the runtime.
        tokio::spawn(relay_wakeups(state.clone()));
    }
    handles
}

/// Turns the database's job announcements (PostgreSQL LISTEN/NOTIFY) into wake-ups of
/// this process's idle workers, so a job queued through another server starts at
/// once; polling remains the fallback, and SQLite has only that and in-process wake-ups.
async fn relay_wakeups(state: AppState) {
    while !state.shutdown.is_cancelled() {
        let mut stream = match state.store.job_wakeups().await {
            Ok(Some(s)) => s,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, "LISTEN for jobs failed; polling meanwhile");
                tokio::time::sleep(Duration::from_secs(2)).await;
                continue;
            }
        };
        loop {
            tokio::select! {
                _ = state.shutdown.cancelled() => return,
                next = stream.next() => match next {
                    Some(Ok(())) => state.jobs_notify.notify_waiters(),
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "job listener interrupted");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                    None => break,
                },
            }
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

fn device_kind(device: &str) -> &'static str {
    if device.starts_with("cuda") {
        "cuda"
    } else {
        "cpu"
    }
}

/// Keeps this worker's row in `workers` fresh with its device's memory, so that any API
/// process can refuse a job no worker could hold; the row goes when the worker stops.
async fn report_device(state: AppState, device: String, cap: Option<u64>, worker_id: String) {
    let dev = {
        let d = device.clone();
        tokio::task::spawn_blocking(move || loraforge_trainer::device::parse(&d)).await
    };
    let dev = match dev {
        Ok(Ok(dev)) => dev,
        Ok(Err(e)) => {
            tracing::warn!(device = %device, error = %e, "device memory cannot be reported");
            return;
        }
        Err(_) => return,
    };
    let mut warned = false;
    while !state.shutdown.is_cancelled() {
        let d = dev.clone();
        let mem = tokio::task::spawn_blocking(move || loraforge_trainer::device::memory(&d)).await;
        match mem {
            Ok(Ok((total, free))) => {
                let to_i64 =
                    |b: u64| i64::try_from(b.min(cap.unwrap_or(u64::MAX))).unwrap_or(i64::MAX);
                if let Err(e) = state
                    .store
                    .report_worker(
                        &worker_id,
                        &device,
                        device_kind(&device),
                        to_i64(total),
                        to_i64(free),
                    )
                    .await
                {
                    tracing::debug!(error = %e, "reporting the device's memory failed");
                }
            }
            Ok(Err(e)) if !warned => {
                warned = true;
                tracing::warn!(device = %device, error = %e, "device memory cannot be read");
            }
            _ => {}
        }
        tokio::select! {
            _ = state.shutdown.cancelled() => {}
            _ = tokio::time::sleep(crate::job::WORKER_REPORT_EVERY) => {}
        }
    }
    let _ = state.store.remove_worker(&worker_id).await;
}

async fn run_worker(state: AppState, cfg: WorkerConfig, worker_id: String) {
    tracing::info!(worker = %worker_id, device = %cfg.device, "worker started");
    let reporter = tokio::spawn(report_device(
        state.clone(),
        cfg.device.clone(),
        cfg.memory_cap,
        worker_id.clone(),
    ));
    sweep_ended_jobs(&state, &cfg.data_dir).await;
    sweep_export_dirs(&state, &cfg.data_dir).await;
    while !state.shutdown.is_cancelled() {
        match state
            .store
            .claim_next_job(&worker_id, device_kind(&cfg.device), cfg.lease)
            .await
        {
            Ok(Some(claimed)) => {
                let id = claimed.job.id.clone();
                let lease = claimed.lease.clone();
                tracing::info!(job = %id, attempt = claimed.lease.attempt, "claimed job");
                if let Err(e) = run_job(&state, &cfg, claimed).await {
                    // A worker that stalled (a frozen VM, SIGSTOP) may come back to a
                    // database session the server has ended, and fail on that rather
                    // than on its fence: ask the fence before calling it a failure.
                    if still_holds(&state, &cfg, &lease).await {
                        tracing::error!(job = %id, error = format!("{e:#}"), "job run failed");
                    } else {
                        tracing::warn!(
                            job = %id,
                            attempt = lease.attempt,
                            error = format!("{e:#}"),
                            "lease lost; this attempt's results are dropped"
                        );
                    }
                }
                // However the run ended (finished, failed, paused, handed back), the
                // job's streams look at its new status now rather than at their next poll.
                state.feeds.wake(&id);
                if job_ended(&state, &id).await {
                    remove_job_dir(&cfg.data_dir, &id).await;
                }
            }
            // No job waiting: an export, if one is.
            Ok(None) => match state.store.claim_export(&worker_id, cfg.lease).await {
                Ok(Some(ex)) => {
                    tracing::info!(export = %ex.id, job = %ex.job_id, "claimed export");
                    if let Err(e) = run_export(&state, &cfg, &ex).await {
                        tracing::error!(export = %ex.id, error = format!("{e:#}"), "export failed");
                        // Ended here rather than taken up again when its lease lapses:
                        // what failed before the build (its job gone, the store down)
                        // would fail the same way for the next worker.
                        let failed = ExportOutcome::Failed {
                            error: format!("{e:#}"),
                        };
                        let _ = state
                            .store
                            .finish_export(&ex.id, ex.fencing_token, &failed)
                            .await;
                    }
                }
                Ok(None) => {
                    tokio::select! {
                        _ = state.jobs_notify.notified() => {}
                        _ = state.shutdown.cancelled() => {}
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "claiming an export failed");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, "claiming a job failed");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
    let _ = reporter.await;
    tracing::info!(worker = %worker_id, "worker stopped");
}

/// Where a claim of an export builds it: by claim, so that a holder whose lease lapsed
/// and the one that took the export over never share a folder.
fn export_work_dir(data_dir: &Path, ex: &ExportRecord) -> PathBuf {
    data_dir
        .join("exports")
        .join(format!("{}.{}", ex.id, ex.fencing_token))
}

/// The blob a claim of an export stores its zip under: by claim, so that a holder
/// fenced off removes its own zip and never the one that finished the export.
fn export_key(ex: &ExportRecord) -> String {
    format!("exports/{}/{}.{}.zip", ex.job_id, ex.id, ex.fencing_token)
}

/// Removes the export folders no claim here is building: left by a crash, or by a
/// claim that lost its export. A folder of a running export's current claim under a
/// live lease is kept (another worker of this process may be building it); a crashed
/// claim's lease has lapsed, and the next claim builds in a folder of its own.
async fn sweep_export_dirs(state: &AppState, data_dir: &Path) {
    let root = data_dir.join("exports");
    let Ok(mut dir) = tokio::fs::read_dir(&root).await else {
        return;
    };
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    while let Ok(Some(entry)) = dir.next_entry().await {
        let name = entry.file_name().to_string_lossy().into_owned();
        let held = match name.rsplit_once('.') {
            Some((id, token)) => match state.store.get_export(id).await {
                Ok(Some(e)) => {
                    e.status == "running"
                        && e.fencing_token.to_string() == token
                        && e.lease_expires_at_ms.is_some_and(|t| t > now_ms)
                }
                Ok(None) => false,
                // Unreadable: kept, to be looked at again by the next sweep.
                Err(_) => true,
            },
            None => false,
        };
        if !held {
            let _ = tokio::fs::remove_dir_all(entry.path()).await;
        }
    }
}

/// How a claim of an export ended before it could finish the row.
enum Held {
    /// The build ran to its end (well or not): the claim finishes the export.
    Built(anyhow::Result<(loraforge_store::Upload, u64, String)>),
    /// The export was taken over, handed back or deleted: nothing more is the claim's.
    Lost,
    /// The worker is shutting down: the export goes back to the queue.
    Stopping,
}

/// Builds a claimed export: the job's adapter zip fetched, merged into the base on a
/// blocking thread while the lease is renewed, the zip stored, the row finished. Each
/// step is an event on the job's stream. A claim that loses the export (its lease
/// taken over, or the export deleted) stops its build, waits for the thread to end and
/// drops what it made; a shutdown does the same and hands the export back to the queue.
async fn run_export(state: &AppState, cfg: &WorkerConfig, ex: &ExportRecord) -> anyhow::Result<()> {
    let job = state
        .store
        .get_job(&ex.job_id)
        .await?
        .context("the export's job is gone")?;
    let event = |level: &'static str, message: String, status: &'static str| {
        let e = NewEvent {
            job_id: job.id.clone(),
            attempt: job.attempt,
            level: level.into(),
            kind: "message".into(),
            message,
            data: Some(json!({"export_id": ex.id, "status": status}).to_string()),
        };
        async move {
            if let Err(err) = state.store.append_event(&e).await {
                tracing::warn!(error = %err, "could not record an export event");
            }
            state.feeds.wake(&e.job_id);
        }
    };
    event(
        "info",
        format!("Export {} started ({}, {})", ex.id, ex.format, ex.dtype),
        "running",
    )
    .await;
    let work = export_work_dir(&cfg.data_dir, ex);
    let _ = tokio::fs::remove_dir_all(&work).await;
    tokio::fs::create_dir_all(&work).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let held: anyhow::Result<Held> = async {
        let model = base_model(state, &job.model).await?;
        let zip = work.join("adapter.zip");
        fetch_blob(state, &adapter_key(&job.id, "zip"), &zip).await?;
        let upload = state.blobs.new_upload()?;
        let (out, w, format, dtype, flag) = (
            upload.path().to_path_buf(),
            work.clone(),
            ex.format.clone(),
            ex.dtype.clone(),
            stop.clone(),
        );
        let mut task = tokio::task::spawn_blocking(move || {
            crate::job::export::unzip_adapter(&zip, &w)?;
            crate::job::export::build(&model.path, &w, &format, &dtype, &w, &out, &flag)
        });
        let mut beat = tokio::time::interval(cfg.lease / 3);
        beat.tick().await;
        let held = loop {
            tokio::select! {
                // A build that has ended is taken, whatever else is ready at once.
                biased;
                r = &mut task => break Held::Built(r.map_err(anyhow::Error::from).and_then(|r| r)
                    .map(|(bytes, sha)| (upload, bytes, sha))),
                _ = state.shutdown.cancelled() => break Held::Stopping,
                _ = beat.tick() => {
                    // An outage shorter than the lease costs the export nothing; a longer
                    // one lets the lease lapse, and the next renewal says whether the
                    // export is still this claim's.
                    match patient(cfg.lease, || {
                        state.store.renew_export(&ex.id, ex.fencing_token, cfg.lease)
                    })
                    .await
                    {
                        Ok(true) => {}
                        Ok(false) => break Held::Lost,
                        Err(e) => tracing::warn!(export = %ex.id, error = %e, "renewing an export failed"),
                    }
                }
            }
        };
        if !matches!(held, Held::Built(_)) {
            // The thread reads the flag between steps and while it copies: waited for,
            // so that the next claim does not run beside it.
            stop.store(true, Ordering::Relaxed);
            let _ = task.await;
        }
        Ok(held)
    }
    .await;
    let _ = tokio::fs::remove_dir_all(&work).await;
    let built = match held? {
        Held::Built(built) => built,
        Held::Lost => {
            tracing::warn!(export = %ex.id, "export lost while it was built; build stopped and dropped");
            return Ok(());
        }
        Held::Stopping => {
            let released = patient(cfg.lease, || {
                state.store.release_export(&ex.id, ex.fencing_token)
            })
            .await;
            if matches!(released, Ok(true)) {
                tracing::info!(export = %ex.id, "worker shutting down; export handed back");
                event(
                    "info",
                    format!("Worker shutting down; export {} re-queued", ex.id),
                    "queued",
                )
                .await;
            }
            return Ok(());
        }
    };
    let key = export_key(ex);
    let outcome = match built {
        Ok((upload, bytes, sha256)) => {
            state.blobs.commit(upload, &key).await?;
            ExportOutcome::Succeeded {
                storage_key: key.clone(),
                bytes: bytes as i64,
                sha256,
            }
        }
        Err(e) => ExportOutcome::Failed {
            error: format!("{e:#}"),
        },
    };
    // An error here leaves the zip in place: the row may have been written after all,
    // and an orphan only costs space.
    let finished = patient(cfg.lease, || {
        state
            .store
            .finish_export(&ex.id, ex.fencing_token, &outcome)
    })
    .await?;
    if !finished {
        // Deleted or taken over meanwhile: what this claim stored is nobody's, and its
        // key is its own. Unless a retried write had landed the first time (its reply
        // lost): then the row names this key, and the zip is the export's.
        let ours = matches!(
            state.store.get_export(&ex.id).await,
            Ok(Some(ref e)) if e.storage_key.as_deref() == Some(key.as_str())
        );
        if ours {
            return Ok(());
        }
        if matches!(outcome, ExportOutcome::Succeeded { .. }) {
            let _ = state.blobs.delete(&key).await;
        }
        tracing::warn!(export = %ex.id, "export lost to another worker or deleted; dropped");
        return Ok(());
    }
    match outcome {
        ExportOutcome::Succeeded { bytes, .. } => {
            event(
                "info",
                format!("Export {} ready: {bytes} bytes", ex.id),
                "succeeded",
            )
            .await
        }
        ExportOutcome::Failed { error } => {
            event(
                "error",
                format!("Export {} failed: {error}", ex.id),
                "failed",
            )
            .await
        }
    }
    Ok(())
}

/// A base model in the models directory, by id (scanned on a blocking thread).
async fn base_model(
    state: &AppState,
    id: &str,
) -> anyhow::Result<loraforge_trainer::families::ModelInfo> {
    let dir = state.settings.models_dir.clone();
    tokio::task::spawn_blocking(move || loraforge_trainer::families::scan(&dir))
        .await?
        .into_iter()
        .find(|m| m.id == id)
        .with_context(|| format!("model {id} is no longer in the models directory"))
}

/// Copies a blob to a local file (the trainer reads files).
async fn fetch_blob(state: &AppState, key: &str, dest: &Path) -> anyhow::Result<()> {
    if dest.is_file() {
        return Ok(());
    }
    let tmp = dest.with_extension("part");
    let (_, mut stream) = state.blobs.get(key).await?;
    let mut f = tokio::fs::File::create(&tmp).await?;
    while let Some(chunk) = stream.next().await {
        f.write_all(&chunk?).await?;
    }
    f.sync_all().await?;
    tokio::fs::rename(&tmp, dest).await?;
    Ok(())
}

/// Outcome of feeding one trainer event to the store.
enum Fed {
    Ok,
    LeaseLost,
}

struct Run<'a> {
    state: &'a AppState,
    lease: &'a Lease,
    /// The claimed job as it was read: its id, and the names and model card of its
    /// checkpoints.
    job: loraforge_store::JobRecord,
    valid_loss: Option<f64>,
    /// The latest validation pass's mean token accuracy (causal LM).
    valid_token_accuracy: Option<f64>,
    /// Classification: the latest validation accuracy and macro-F1.
    valid_scores: Option<(f64, Option<f64>)>,
    /// Speech recognition: the last validation's word error rate.
    valid_wer: Option<f64>,
    /// The latest step's training loss.
    train_loss: Option<f64>,
    /// DPO: the latest step's reward margin and accuracy.
    rewards: Option<(f64, f64)>,
    /// How long a store write is retried while the database is unreachable: the lease.
    patience: Duration,
}

/// Whether the job has ended (or is gone), so that no worker will run it again.
async fn job_ended(state: &AppState, id: &str) -> bool {
    match state.store.get_job(id).await {
        Ok(Some(j)) => j.status().is_none_or(|s| s.is_terminal()),
        Ok(None) => true,
        Err(_) => false,
    }
}

/// Removes the folders of jobs that ended while no worker here was watching (a crash,
/// a job reaped or cancelled while its worker was gone).
async fn sweep_ended_jobs(state: &AppState, data_dir: &Path) {
    for id in job_ids(data_dir).await {
        if job_ended(state, &id).await {
            remove_job_dir(data_dir, &id).await;
        }
    }
}

/// Whether `lease` is still the job's current claim (read patiently: the database may
/// be coming back). An unreadable answer counts as held, so a real failure is reported.
async fn still_holds(state: &AppState, cfg: &WorkerConfig, lease: &Lease) -> bool {
    match patient(cfg.lease, || state.store.get_job(&lease.job_id)).await {
        // Every claim (and the reaper) moves the token on: the same token is our claim,
        // whatever the status our own writes gave the job.
        Ok(Some(j)) => j.fencing_token == lease.fencing_token,
        Ok(None) => false,
        Err(_) => true,
    }
}

/// Runs a store call again while the database is unreachable, for up to `patience` (the
/// lease): an outage shorter than the lease costs a running job nothing. Other errors,
/// and an outage that outlasts the lease, are returned.
async fn patient<T, F, Fut>(patience: Duration, mut call: F) -> loraforge_store::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = loraforge_store::Result<T>>,
{
    let deadline = tokio::time::Instant::now() + patience;
    let mut wait = Duration::from_millis(100);
    loop {
        match call().await {
            Err(e) if e.is_unavailable() && tokio::time::Instant::now() < deadline => {
                tracing::warn!(error = %e, "database unavailable; retrying");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(1));
            }
            r => return r,
        }
    }
}

impl Run<'_> {
    async fn event(
        &self,
        level: &str,
        kind: &str,
        message: String,
        data: Option<serde_json::Value>,
    ) -> anyhow::Result<Fed> {
        let data = data.map(|mut d| {
            // `created_at` is whole seconds; a metrics event also says when (to the
            // millisecond) it was made, so a subscriber can tell how late it arrived.
            if kind == "metrics" {
                if let Some(o) = d.as_object_mut() {
                    o.insert("created_at_ms".into(), loraforge_store::now_millis().into());
                }
            }
            d.to_string()
        });
        let store = &self.state.store;
        match patient(self.patience, || {
            store.append_job_event(self.lease, level, kind, &message, data.as_deref())
        })
        .await
        {
            Ok(_) => {
                // Streams of this job get the event now, not at their feed's next poll.
                self.state.feeds.wake(&self.job.id);
                Ok(Fed::Ok)
            }
            Err(e) if e.is_lease_lost() => Ok(Fed::LeaseLost),
            Err(e) => Err(e.into()),
        }
    }

    /// A checkpoint's metrics in OpenAI's names. Validation runs over the whole
    /// validation file, so `full_valid_*` are the latest pass's numbers; training's token
    /// accuracy is not measured (the fused loss computes no argmax) and stays null.
    fn checkpoint_metrics(&self, step: u64) -> serde_json::Value {
        let mut m = json!({
            "step": step,
            "train_loss": self.train_loss,
            "train_mean_token_accuracy": null,
            "valid_loss": self.valid_loss,
            "valid_mean_token_accuracy": self.valid_token_accuracy,
            "full_valid_loss": self.valid_loss,
            "full_valid_mean_token_accuracy": self.valid_token_accuracy,
        });
        if let Some((acc, f1)) = self.valid_scores {
            m["valid_accuracy"] = json!(acc);
            m["valid_macro_f1"] = json!(f1);
        }
        if let Some(w) = self.valid_wer {
            m["valid_wer"] = json!(w);
        }
        if let Some((margin, acc)) = self.rewards {
            m["train_reward_margin"] = json!(margin);
            m["train_reward_accuracy"] = json!(acc);
        }
        m
    }

    async fn feed(&mut self, ev: &TrainEvent) -> anyhow::Result<Fed> {
        match ev {
            TrainEvent::Started {
                total_steps,
                examples,
                packed,
                resumed_from,
            } => {
                let msg = match resumed_from {
                    Some(s) => format!("Resumed from the step-{s} checkpoint (attempt {}); {total_steps} steps in all", self.lease.attempt),
                    None => format!(
                        "Training on {examples} examples{} for {total_steps} steps",
                        crate::job::packed_note(*packed)
                    ),
                };
                self.event("info", "message", msg, None).await
            }
            TrainEvent::Step(m) => {
                self.train_loss = Some(m.loss);
                self.rewards = m.reward_margin.zip(m.reward_accuracy);
                let mut progress = json!({
                    "step": m.step,
                    "total_steps": m.total_steps,
                    "epoch": m.epoch,
                    "train_loss": m.loss,
                    "valid_loss": self.valid_loss,
                    "learning_rate": m.lr,
                    "grad_norm": m.grad_norm,
                    "tokens": m.tokens,
                    "tokens_per_second": m.tokens_per_second,
                    "eta_seconds": m.eta_seconds,
                });
                if let (Some(margin), Some(acc)) = (m.reward_margin, m.reward_accuracy) {
                    progress["reward_margin"] = json!(margin);
                    progress["reward_accuracy"] = json!(acc);
                }
                let progress_text = progress.to_string();
                let store = &self.state.store;
                match patient(self.patience, || {
                    store.update_job_progress(self.lease, &progress_text)
                })
                .await
                {
                    Ok(()) => {}
                    Err(e) if e.is_lease_lost() => return Ok(Fed::LeaseLost),
                    Err(e) => return Err(e.into()),
                }
                let msg = format!(
                    "Step {}/{}: training loss={:.4}{}",
                    m.step,
                    m.total_steps,
                    m.loss,
                    match (m.reward_margin, m.reward_accuracy) {
                        (Some(margin), Some(acc)) => {
                            format!(", reward margin={margin:.4}, reward accuracy={acc:.3}")
                        }
                        _ => String::new(),
                    }
                );
                self.event("info", "metrics", msg, Some(progress)).await
            }
            TrainEvent::Eval(e) => {
                self.valid_loss = Some(e.loss);
                self.valid_scores = e.accuracy.map(|a| (a, e.macro_f1));
                self.valid_wer = e.wer;
                let (msg, data) = match e.accuracy {
                    Some(acc) => (
                        format!(
                            "Step {}: validation loss={:.4}, accuracy={acc:.4}{}",
                            e.step,
                            e.loss,
                            e.macro_f1
                                .map(|f| format!(", macro F1={f:.4}"))
                                .unwrap_or_default()
                        ),
                        json!({"step": e.step, "valid_loss": e.loss, "valid_accuracy": acc,
                               "valid_macro_f1": e.macro_f1, "valid_mean_token_accuracy": acc}),
                    ),
                    None => {
                        let mut data = json!({"step": e.step, "valid_loss": e.loss,
                            "valid_mean_token_accuracy": e.mean_token_accuracy});
                        let mut msg = format!(
                            "Step {}: validation loss={:.4}, mean token accuracy={:.4}",
                            e.step, e.loss, e.mean_token_accuracy
                        );
                        if let (Some(m), Some(a)) = (e.reward_margin, e.reward_accuracy) {
                            data["valid_reward_margin"] = json!(m);
                            data["valid_reward_accuracy"] = json!(a);
                            msg += &format!(", reward margin={m:.4}, reward accuracy={a:.3}");
                        }
                        if let Some(w) = e.wer {
                            data["valid_wer"] = json!(w);
                            msg += &format!(", WER={w:.4}");
                        }
                        (msg, data)
                    }
                };
                self.valid_token_accuracy = Some(e.mean_token_accuracy);
                self.event("info", "metrics", msg, Some(data)).await
            }
            TrainEvent::Checkpoint { step, dir } => {
                let mut c = CheckpointRecord {
                    id: format!("ftckpt-{}", uuid::Uuid::new_v4().simple()),
                    job_id: self.job.id.clone(),
                    attempt: self.lease.attempt,
                    step: *step as i64,
                    storage_key: checkpoint_key(&self.job.id, self.lease.attempt, *step),
                    metrics: Some(self.checkpoint_metrics(*step).to_string()),
                    created_at: loraforge_store::now_secs(),
                    bytes: 0,
                };
                if let Fed::LeaseLost = self
                    .event(
                        "info",
                        "message",
                        format!("Checkpoint saved at step {step}"),
                        Some(json!({"step": step})),
                    )
                    .await?
                {
                    return Ok(Fed::LeaseLost);
                }
                // Into the blob store before the row: a row always names a whole checkpoint,
                // which any worker (on any machine) can resume from.
                c.bytes =
                    upload_checkpoint(self.state, &self.job, *step, dir, &c.storage_key).await?;
                let store = &self.state.store;
                match patient(self.patience, || store.record_checkpoint(self.lease, &c)).await {
                    Ok(()) => {
                        prune_checkpoints(self.state, &self.job).await;
                        Ok(Fed::Ok)
                    }
                    Err(e) if e.is_lease_lost() => Ok(Fed::LeaseLost),
                    Err(e) => Err(e.into()),
                }
            }
        }
    }
}

/// A device allocation that failed (CUDA's, as candle reports it). The run's tensors are
/// dropped with its error, so the device is free again for the next job.
fn out_of_memory(e: &loraforge_trainer::Error) -> bool {
    let m = e.to_string();
    m.contains("OUT_OF_MEMORY") || m.contains("out of memory")
}

async fn run_job(state: &AppState, cfg: &WorkerConfig, claimed: ClaimedJob) -> anyhow::Result<()> {
    let ClaimedJob { job, lease } = claimed;
    let fail = |code: &str, message: String| JobOutcome::Failed {
        error: json!({"code": code, "message": message, "param": null}).to_string(),
    };
    let spec: JobSpec = serde_json::from_str(&job.spec).context("job spec")?;
    let work = job_dir(&cfg.data_dir, &job.id);
    tokio::fs::create_dir_all(&work).await?;
    let prepared: anyhow::Result<TrainSpec> = async {
        let model = base_model(state, &job.model).await?;
        // Named by file id, so that the trainer's messages name the file as the API does;
        // zips keep their extension.
        let file_path = |f: &loraforge_store::FileRecord| {
            let zip = matches!(
                f.format.as_deref(),
                Some("image_zip" | "image_classes" | "audio_transcripts")
            );
            work.join(format!("{}.{}", f.id, if zip { "zip" } else { "jsonl" }))
        };
        let f = state
            .store
            .get_file(&job.training_file)
            .await?
            .context("training file is gone")?;
        let training = file_path(&f);
        fetch_blob(state, &f.storage_key, &training).await?;
        let validation = match &job.validation_file {
            Some(v) => {
                let f = state
                    .store
                    .get_file(v)
                    .await?
                    .context("validation file is gone")?;
                fetch_blob(state, &f.storage_key, &file_path(&f)).await?;
                Some(file_path(&f))
            }
            None => None,
        };
        let mut t = train_spec(
            &spec,
            model.path,
            training,
            validation,
            work.join("out"),
            &cfg.device,
            // The name SD UIs list the LoRA under.
            Some(fine_tuned_name(&job)),
        )?;
        // A job that ran before (a dead worker, a restart) continues from its newest checkpoint.
        if let Some(c) = state
            .store
            .list_checkpoints(&job.id)
            .await?
            .into_iter()
            .next()
        {
            let local = work
                .join("out")
                .join("checkpoints")
                .join(format!("checkpoint-{}", c.step));
            fetch_checkpoint(state, &c.storage_key, &local).await?;
            t.resume = Some(local);
        }
        Ok(t)
    }
    .await;
    let tspec = match prepared {
        Ok(t) => t,
        Err(e) => {
            let msg = format!("{e:#}");
            let _ = state
                .store
                .append_job_event(&lease, "error", "message", &msg, None)
                .await;
            state
                .store
                .finish_job(&lease, &fail("job_setup_failed", msg))
                .await?;
            return Ok(());
        }
    };

    let cancel = Arc::new(AtomicBool::new(false));
    let pause = Arc::new(AtomicBool::new(false));
    let mut tspec = tspec;
    tspec.pause = Some(pause.clone());
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<TrainEvent>();
    let (done_tx, mut done_rx) = tokio::sync::oneshot::channel();
    {
        let cancel = cancel.clone();
        let tspec = tspec.clone();
        std::thread::Builder::new()
            .name(format!("train-{}", job.id))
            .spawn(move || {
                let r = loraforge_trainer::train(&tspec, &cancel, &mut |ev| {
                    let _ = tx.send(ev.clone());
                });
                let _ = done_tx.send(r);
            })?;
    }
    let mut run = Run {
        state,
        lease: &lease,
        job: job.clone(),
        valid_loss: None,
        valid_token_accuracy: None,
        valid_scores: None,
        valid_wer: None,
        train_loss: None,
        rewards: None,
        patience: cfg.lease,
    };
    let mut lost = false;
    let mut cancel_requested = false;
    let mut beat = tokio::time::interval(cfg.lease / 3);
    beat.tick().await;
    let mut control = state.job_control.subscribe();
    // Shutting down: checkpoint like a pause, then hand the job back to the queue.
    let mut stopping = false;
    let mut user_pause = false;
    let result = loop {
        tokio::select! {
            _ = state.shutdown.cancelled(), if !stopping => {
                stopping = true;
                pause.store(true, Ordering::Relaxed);
            }
            Some(ev) = rx.recv(), if !lost => {
                if let Fed::LeaseLost = run.feed(&ev).await? {
                    lost = true;
                    cancel.store(true, Ordering::Relaxed);
                }
            }
            // The heartbeat also brings pause and cancel requests; one made in this
            // process brings it forward.
            _ = async {
                tokio::select! {
                    _ = beat.tick() => {}
                    _ = control.changed() => {}
                }
            }, if !lost => {
                match state.store.heartbeat(&lease, cfg.lease).await {
                    Ok(hb) => {
                        if hb.cancel_requested_at.is_some() {
                            cancel_requested = true;
                            cancel.store(true, Ordering::Relaxed);
                        }
                        user_pause = hb.pause_requested_at.is_some();
                        pause.store(user_pause || stopping, Ordering::Relaxed);
                    }
                    Err(e) if e.is_lease_lost() => {
                        lost = true;
                        cancel.store(true, Ordering::Relaxed);
                    }
                    Err(e) => tracing::warn!(job = %job.id, error = %e, "heartbeat failed"),
                }
            }
            r = &mut done_rx => break r.context("training thread ended without a result")?,
        }
    };
    // Events sent just before the thread ended.
    while let Ok(ev) = rx.try_recv() {
        if lost {
            break;
        }
        if let Fed::LeaseLost = run.feed(&ev).await? {
            lost = true;
        }
    }
    if lost {
        tracing::warn!(job = %job.id, attempt = lease.attempt, "lease lost; this attempt's results are dropped");
        return Ok(());
    }
    if !cancel_requested {
        // A cancel may have been requested after the last heartbeat.
        cancel_requested = state
            .store
            .get_job(&job.id)
            .await?
            .is_some_and(|j| j.cancel_requested_at.is_some());
    }
    match result {
        Ok(_) if cancel_requested => finish_cancelled(&run, &lease).await,
        Err(loraforge_trainer::Error::Cancelled) => finish_cancelled(&run, &lease).await,
        Err(loraforge_trainer::Error::Paused(step)) => {
            // A pause the user asked for keeps the job held; a shutdown re-queues it.
            let shutting_down = stopping && !user_pause;
            let msg = if shutting_down {
                format!("Worker shutting down; job re-queued after step {step}")
            } else {
                format!("Job paused after step {step}")
            };
            run.event("info", "message", msg, None).await?;
            match patient(run.patience, || {
                state.store.release_job(&lease, !shutting_down)
            })
            .await
            {
                Ok(_) => Ok(()),
                Err(e) if e.is_lease_lost() => Ok(()),
                Err(e) => Err(e.into()),
            }
        }
        Ok(outcome) => {
            let artifacts = match publish(state, &job, &outcome.adapter_dir).await {
                Ok(a) => a,
                Err(e) => {
                    let msg = format!("storing the adapter failed: {e:#}");
                    run.event("error", "message", msg.clone(), None).await?;
                    let outcome = fail("artifact_upload_failed", msg);
                    patient(run.patience, || state.store.finish_job(&lease, &outcome)).await?;
                    return Ok(());
                }
            };
            let name = fine_tuned_name(&job);
            run.event(
                "info",
                "message",
                format!("New fine-tuned model created: {name}"),
                None,
            )
            .await?;
            run.event(
                "info",
                "message",
                "The job has successfully completed".into(),
                None,
            )
            .await?;
            let outcome = JobOutcome::Succeeded {
                fine_tuned_model: name,
                result: Some(artifacts.to_string()),
            };
            patient(run.patience, || state.store.finish_job(&lease, &outcome)).await?;
            Ok(())
        }
        Err(e) => {
            let code = match &e {
                loraforge_trainer::Error::Data(_) | loraforge_trainer::Error::Template(_) => {
                    "invalid_training_file"
                }
                loraforge_trainer::Error::Config(_) | loraforge_trainer::Error::Unsupported(_) => {
                    "invalid_hyperparameters"
                }
                _ if out_of_memory(&e) => "out_of_memory",
                _ => "training_failed",
            };
            let msg = if out_of_memory(&e) {
                format!(
                    "{} ran out of memory: lower batch_size or max_seq_len ({e})",
                    cfg.device
                )
            } else {
                e.to_string()
            };
            run.event("error", "message", format!("Training failed: {msg}"), None)
                .await?;
            let outcome = fail(code, msg);
            patient(run.patience, || state.store.finish_job(&lease, &outcome)).await?;
            Ok(())
        }
    }
}

async fn finish_cancelled(run: &Run<'_>, lease: &Lease) -> anyhow::Result<()> {
    run.event("info", "message", "Job cancelled".into(), None)
        .await?;
    let store = &run.state.store;
    patient(run.patience, || {
        store.finish_job(lease, &JobOutcome::Cancelled)
    })
    .await?;
    Ok(())
}

/// Stores the adapter (zip and bare safetensors) and the metrics CSV, registers the zip
/// and the CSV as result files, and returns the job's `result` JSON.
async fn publish(
    state: &AppState,
    job: &loraforge_store::JobRecord,
    dir: &Path,
) -> anyhow::Result<serde_json::Value> {
    let card = model_card(job, None);
    let dir2 = dir.to_path_buf();
    let (zip, st) = tokio::task::spawn_blocking(move || -> anyhow::Result<(Vec<u8>, Vec<u8>)> {
        Ok((
            adapter_zip(&dir2, &card)?,
            std::fs::read(dir2.join(ADAPTER_TENSORS))?,
        ))
    })
    .await??;
    state.blobs.put(&adapter_key(&job.id, "zip"), &zip).await?;
    state
        .blobs
        .put(&adapter_key(&job.id, "safetensors"), &st)
        .await?;
    // Text-to-image runs also write the adapter in kohya's format, the one SD UIs load;
    // such a job without it has not produced what it promises.
    let kohya = if is_text_to_image(job) {
        let bytes = tokio::fs::read(dir.join(KOHYA_FILE))
            .await
            .context("the text-to-image run wrote no kohya file")?;
        state
            .blobs
            .put(&adapter_key(&job.id, "kohya"), &bytes)
            .await?;
        Some(sha256_hex(&bytes))
    } else {
        None
    };
    // Decoder runs write the LoRA GGUF llama.cpp loads, where its architecture has one.
    let gguf = match tokio::fs::read(dir.join(LORA_GGUF_FILE)).await {
        Ok(bytes) => {
            state
                .blobs
                .put(&adapter_key(&job.id, "gguf"), &bytes)
                .await?;
            Some(sha256_hex(&bytes))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).context("reading the LoRA GGUF"),
    };

    // Metrics CSV from the stored metrics events (they survive a worker change); DPO jobs
    // add their rewards.
    let dpo = serde_json::from_str::<crate::job::JobSpec>(&job.spec)
        .is_ok_and(|s| matches!(s.method, loraforge_trainer::train::Method::Dpo { .. }));
    let mut columns = vec![
        "step",
        "train_loss",
        "valid_loss",
        "learning_rate",
        "tokens_per_second",
    ];
    if dpo {
        columns.extend(["reward_margin", "reward_accuracy"]);
    }
    let mut csv = columns.join(",") + "\n";
    for e in state.store.list_events(&job.id, None, i64::MAX).await? {
        if e.kind != "metrics" {
            continue;
        }
        let d: serde_json::Value = e
            .data
            .as_deref()
            .and_then(|s| serde_json::from_str(s).ok())
            .unwrap_or_default();
        if d.get("train_loss").is_none() {
            continue;
        }
        let f = |k: &str| {
            d.get(k)
                .filter(|v| !v.is_null())
                .map(|v| v.to_string())
                .unwrap_or_default()
        };
        let row: Vec<String> = columns.iter().map(|k| f(k)).collect();
        csv.push_str(&(row.join(",") + "\n"));
    }
    // Result files get blobs of their own: deleting one through the files API must not
    // take the job's adapter download with it.
    let mut ids = Vec::new();
    for (filename, bytes) in [
        (format!("{}-metrics.csv", job.id), csv.into_bytes()),
        (format!("{}-adapter.zip", job.id), zip.clone()),
    ] {
        let id = format!("file-{}", uuid::Uuid::new_v4().simple());
        let key = format!("files/{id}");
        state.blobs.put(&key, &bytes).await?;
        let rec = FileRecord {
            id,
            purpose: "fine-tune-results".into(),
            filename,
            bytes: bytes.len() as i64,
            sha256: sha256_hex(&bytes),
            storage_key: key,
            status: "processed".into(),
            status_details: None,
            format: None,
            examples: None,
            errors: None,
            created_at: loraforge_store::now_secs(),
            // The job's owner owns its results.
            api_key_id: job.api_key_id.clone(),
        };
        ids.push(state.store.insert_file(&rec).await?.id);
    }
    let mut sums = json!({"zip": sha256_hex(&zip), "safetensors": sha256_hex(&st)});
    for (format, sum) in [("kohya", kohya), ("gguf", gguf)] {
        if let Some(sum) = sum {
            sums[format] = json!(sum);
        }
    }
    Ok(json!({
        "result_files": ids,
        "adapter_sha256": sums,
    }))
}

async fn upload_checkpoint(
    state: &AppState,
    job: &loraforge_store::JobRecord,
    step: u64,
    dir: &Path,
    key: &str,
) -> anyhow::Result<i64> {
    let mut stored = 0i64;
    for name in CHECKPOINT_FILES {
        let bytes = tokio::fs::read(dir.join(name))
            .await
            .with_context(|| format!("reading checkpoint file {name}"))?;
        state.blobs.put(&format!("{key}/{name}"), &bytes).await?;
        stored += bytes.len() as i64;
    }
    // Not needed to resume (the label set is rediscovered from the same data, the kohya
    // file rewritten from the adapter), but a downloaded classification checkpoint is
    // usable only with its labels, and an SD one in the UIs only as a kohya file.
    for extra in extra_files() {
        if let Ok(bytes) = tokio::fs::read(dir.join(extra)).await {
            state.blobs.put(&format!("{key}/{extra}"), &bytes).await?;
            stored += bytes.len() as i64;
        }
    }
    // The checkpoint's zip, built as the final adapter's is, so that its download is a
    // stored blob streamed like the final adapter (Range, ETag) and carries the same files.
    let (dir2, card) = (dir.to_path_buf(), model_card(job, Some(step)));
    let zip = tokio::task::spawn_blocking(move || adapter_zip(&dir2, &card)).await??;
    state
        .blobs
        .put(&checkpoint_adapter_key(key, "zip"), &zip)
        .await?;
    Ok(stored + zip.len() as i64)
}

/// Keeps a job's newest `keep_checkpoints` checkpoints and the one with the best
/// validation loss, and removes the others (blobs first, then the row, so that a row
/// always names a whole checkpoint). Best effort: a failure leaves a checkpoint more.
async fn prune_checkpoints(state: &AppState, job: &loraforge_store::JobRecord) {
    let keep = serde_json::from_str::<JobSpec>(&job.spec)
        .map(|s| s.keep_checkpoints)
        .unwrap_or(crate::job::spec::DEFAULT_KEEP_CHECKPOINTS) as usize;
    let Ok(all) = state.store.list_checkpoints(&job.id).await else {
        return;
    };
    if all.len() <= keep {
        return;
    }
    let loss = |c: &loraforge_store::CheckpointRecord| {
        c.metrics
            .as_deref()
            .and_then(|m| serde_json::from_str::<serde_json::Value>(m).ok())
            .and_then(|m| m.get("valid_loss").and_then(|v| v.as_f64()))
    };
    let best = all
        .iter()
        .filter_map(|c| loss(c).map(|l| (l, &c.id)))
        .min_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, id)| id.clone());
    // Newest first: the first `keep` stay.
    for c in all.iter().skip(keep) {
        if Some(&c.id) == best.as_ref() {
            continue;
        }
        let names = CHECKPOINT_FILES
            .into_iter()
            .chain(extra_files())
            .map(|n| format!("{}/{n}", c.storage_key))
            .chain([checkpoint_adapter_key(&c.storage_key, "zip")]);
        for key in names {
            if let Err(e) = state.blobs.delete(&key).await {
                tracing::warn!(%key, error = %e, "could not remove a pruned checkpoint's file");
                return;
            }
        }
        if let Err(e) = state.store.delete_checkpoint(&c.id).await {
            tracing::warn!(checkpoint = %c.id, error = %e, "could not remove a pruned checkpoint");
            return;
        }
    }
}

/// Copies a checkpoint from the blob store into `local` (unless it is already there),
/// through a temp folder so a half copy never looks like a checkpoint.
pub async fn fetch_checkpoint(state: &AppState, key: &str, local: &Path) -> anyhow::Result<()> {
    if local.join("trainer_state.json").is_file() {
        return Ok(());
    }
    let parent = local.parent().context("checkpoint folder has no parent")?;
    tokio::fs::create_dir_all(parent).await?;
    let tmp = parent.join(format!(".fetch-{}", uuid::Uuid::new_v4().simple()));
    tokio::fs::create_dir_all(&tmp).await?;
    for name in CHECKPOINT_FILES {
        fetch_blob(state, &format!("{key}/{name}"), &tmp.join(name)).await?;
    }
    let _ = tokio::fs::remove_dir_all(local).await;
    tokio::fs::rename(&tmp, local).await?;
    Ok(())
}
