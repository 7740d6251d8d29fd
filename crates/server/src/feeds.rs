//! Live job events for SSE subscribers: one database poller per followed job, shared by
//! every stream of that job.
//!
//! Polling the database (rather than an in-process channel) lets streams follow workers
//! in other processes. Each stream used to poll on its own, so a thousand subscribers of
//! one job cost a thousand queries every poll; now the job's [`Feed`] polls once and
//! publishes what it found, with the newest events kept in memory, and a stream reads
//! the database only for its own backlog (a replay, or a subscriber that fell behind).
//!
//! A poll every [`POLL`] alone would delay an event by up to a poll; so writers in this
//! process (the in-process worker, the API's own notes and cancels) call
//! [`Feeds::wake`] after writing, and the job's poller reads at once. The timed poll
//! stays as the fallback for events that other processes write.

use crate::app::AppState;
use loraforge_store::EventRecord;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::sync::{watch, Notify};

/// How often a feed looks for new events that no in-process writer announced.
pub const POLL: Duration = Duration::from_millis(100);
/// Events a feed keeps for subscribers that are slightly behind.
const RECENT: usize = 2048;

/// What a feed knows about its job.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// The newest events, oldest first (ids increasing): every event after `covered_from`.
    pub recent: Arc<VecDeque<EventRecord>>,
    /// The position after which `recent` holds every event.
    pub covered_from: i64,
    /// The highest event id seen.
    pub last_id: i64,
    /// The job is finished and every event up to `last_id` is in.
    pub finished: bool,
    /// The poller has read the database at least once (before that the snapshot knows
    /// nothing, and a stream reads its backlog itself).
    pub polled: bool,
}

impl Snapshot {
    /// The events after `after` if the snapshot holds all of them; `None` when the
    /// caller is further behind than [`RECENT`] and must read the database.
    pub fn after(&self, after: i64) -> Option<Vec<EventRecord>> {
        if !self.polled {
            return None;
        }
        if after >= self.last_id {
            return Some(Vec::new());
        }
        if after < self.covered_from {
            return None;
        }
        Some(
            self.recent
                .iter()
                .filter(|e| e.id > after)
                .cloned()
                .collect(),
        )
    }
}

/// One job's shared poller.
pub struct Feed {
    rx: watch::Receiver<Snapshot>,
    /// Wakes the poller before its next timed poll (see [`Feeds::wake`]).
    wake: Arc<Notify>,
}

impl Feed {
    pub fn subscribe(&self) -> watch::Receiver<Snapshot> {
        self.rx.clone()
    }
}

/// The feeds of the jobs being followed; a feed lives while a stream holds it.
#[derive(Default)]
pub struct Feeds {
    jobs: Mutex<HashMap<String, Weak<Feed>>>,
}

impl Feeds {
    /// The job's feed, started if no stream follows the job yet. `from` is where the
    /// new feed starts reading: the job's own newest event when the stream starts (not
    /// a follower's position, which a client chooses); streams catch up from the
    /// database for anything older than the feed's buffer.
    pub fn follow(&self, state: &AppState, job_id: &str, from: i64) -> Arc<Feed> {
        let mut jobs = self.jobs.lock().expect("feeds lock");
        jobs.retain(|_, f| f.strong_count() > 0);
        if let Some(f) = jobs.get(job_id).and_then(Weak::upgrade) {
            return f;
        }
        let (tx, rx) = watch::channel(Snapshot {
            last_id: from,
            covered_from: from,
            ..Snapshot::default()
        });
        let wake = Arc::new(Notify::new());
        let feed = Arc::new(Feed {
            rx,
            wake: wake.clone(),
        });
        jobs.insert(job_id.to_string(), Arc::downgrade(&feed));
        tokio::spawn(poll(
            state.clone(),
            job_id.to_string(),
            from,
            tx,
            Arc::downgrade(&feed),
            wake,
        ));
        feed
    }

    /// Tells the job's poller, if anyone follows the job, that it has a new event or a
    /// new status: it reads now instead of at its next [`POLL`]. A wake that arrives
    /// while the poller is reading is kept (a `Notify` permit), so the event that
    /// caused it is read by the next pass at the latest; extra wakes cost one empty read.
    pub fn wake(&self, job_id: &str) {
        let feed = self
            .jobs
            .lock()
            .expect("feeds lock")
            .get(job_id)
            .and_then(Weak::upgrade);
        if let Some(f) = feed {
            f.wake.notify_one();
        }
    }
}

/// Reads the job's new events every [`POLL`], or at once when woken, while anyone
/// follows it, until the job is finished and its last events are published.
async fn poll(
    state: AppState,
    job_id: String,
    mut last: i64,
    tx: watch::Sender<Snapshot>,
    alive: Weak<Feed>,
    wake: Arc<Notify>,
) {
    let mut recent: VecDeque<EventRecord> = VecDeque::new();
    let mut covered_from = last;
    let mut polled = false;
    loop {
        if alive.strong_count() == 0 || state.shutdown.is_cancelled() {
            return;
        }
        let mut fresh = Vec::new();
        let mut failed = false;
        loop {
            match state.store.list_events(&job_id, Some(last), 500).await {
                Ok(b) if b.is_empty() => break,
                Ok(b) => {
                    last = b.last().map(|e| e.id).unwrap_or(last);
                    let full = b.len() == 500;
                    fresh.extend(b);
                    if !full {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, job = %job_id, "event feed: database read failed");
                    failed = true;
                    break;
                }
            }
        }
        let mut finished = false;
        if fresh.is_empty() && !failed {
            finished = match state.store.get_job(&job_id).await {
                Ok(Some(j)) => j.status().is_none_or(|st| st.is_terminal()),
                Ok(None) => true,
                Err(_) => false,
            };
            if finished {
                // One more read closes the gap between the last poll and the status change.
                match state.store.list_events(&job_id, Some(last), 500).await {
                    Ok(tail) if !tail.is_empty() => {
                        last = tail.last().map(|e| e.id).unwrap_or(last);
                        fresh.extend(tail);
                        finished = false;
                    }
                    Ok(_) => {}
                    Err(_) => finished = false,
                }
            }
        }
        if !fresh.is_empty() || finished || !polled {
            polled = true;
            recent.extend(fresh);
            while recent.len() > RECENT {
                if let Some(e) = recent.pop_front() {
                    covered_from = e.id;
                }
            }
            let snap = Snapshot {
                recent: Arc::new(recent.clone()),
                covered_from,
                last_id: last,
                finished,
                polled: true,
            };
            if tx.send(snap).is_err() || finished {
                return;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = wake.notified() => {}
            _ = state.shutdown.cancelled() => return,
        }
    }
}
