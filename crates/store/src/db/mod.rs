//! The database behind one interface, [`Store`], for SQLite and PostgreSQL: the pool,
//! connection set-up and the helpers every table shares live here, each table's
//! statements in a module of its own.

use crate::error::Redacted;
use crate::model::*;
use crate::{migrations, now_secs, Error, Result};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

/// Which database a [`Store`] talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

#[derive(Clone)]
pub(crate) enum Pool {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// The outcome of [`Store::delete_file`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeleteFile {
    Deleted(Box<FileRecord>),
    NotFound,
    /// A queued or running job references the file; its id is given.
    InUse(String),
}

/// The database: a pool for one of the two backends, cheap to clone.
#[derive(Clone)]
pub struct Store {
    pool: Pool,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("backend", &self.backend())
            .finish()
    }
}

/// Runs `$body` with `$p` bound to whichever pool this store holds. Both arms are
/// the same source text, type-checked once per backend.
/// The PostgreSQL channel that announces claimable jobs.
pub const JOBS_CHANNEL: &str = "loraforge_jobs";

macro_rules! on_pool {
    ($self:expr, $p:ident => $body:expr) => {
        match &$self.pool {
            Pool::Sqlite($p) => $body,
            Pool::Postgres($p) => $body,
        }
    };
}

/// Runs `$body` inside a write transaction bound to `$tx` and commits it. On SQLite
/// the transaction begins IMMEDIATE: it takes the write lock up front, so a
/// concurrent writer waits on the busy timeout; a deferred transaction that reads
/// and then writes would instead fail at once with SQLITE_BUSY.
macro_rules! write_tx {
    ($self:expr, $tx:ident => $body:expr) => {
        match &$self.pool {
            Pool::Sqlite(p) => {
                let mut $tx = p.begin_with("BEGIN IMMEDIATE").await?;
                let out = $body;
                $tx.commit().await?;
                out
            }
            Pool::Postgres(p) => {
                let mut $tx = p.begin().await?;
                let out = $body;
                $tx.commit().await?;
                out
            }
        }
    };
}

macro_rules! file_cols {
    () => {
        "id, purpose, filename, bytes, sha256, storage_key, status, status_details, format, \
         examples, errors, created_at, api_key_id"
    };
}

macro_rules! job_cols {
    () => {
        "id, api_key_id, model, training_file, validation_file, suffix, spec, status, priority, \
         run_at_ms, attempt, max_attempts, lease_owner, lease_expires_at_ms, heartbeat_at_ms, \
         fencing_token, cancel_requested_at, idempotency_key, progress, error, fine_tuned_model, \
         result, created_at, started_at, finished_at, device_kind, paused_at, model_deleted_at"
    };
}

macro_rules! api_key_cols {
    () => {
        "id, name, prefix, token_sha256, created_at, last_used_at, revoked_at, admin"
    };
}

/// Tables with cursor pagination.
#[derive(Clone, Copy)]
pub(crate) enum Table {
    Files,
    Jobs,
}

const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a PostgreSQL session may sit idle inside a transaction before the server
/// ends it, releasing its locks (see [`Store::connect`]).
pub const PG_IDLE_IN_TRANSACTION_TIMEOUT: Duration = Duration::from_secs(5);

mod api_keys;
mod checkpoints;
mod events;
mod exports;
mod files;
mod jobs;
mod workers;

impl Store {
    /// Connects to `url`: `sqlite:…` or `postgres://…` / `postgresql://…`. Does not
    /// migrate; call [`Store::migrate`].
    pub async fn connect(url: &str) -> Result<Store> {
        if url.starts_with("sqlite:") {
            let opts = SqliteConnectOptions::from_str(url)?;
            Self::connect_sqlite(opts).await
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            // A process frozen inside a transaction (SIGSTOP, a suspended VM, a stalled
            // host) keeps its row locks while its socket stays open, and claims skip
            // locked rows: without this limit its job could never be taken over. Our
            // transactions are a few statements long, so a session that sits idle inside
            // one this long is stalled; the server ends it and frees its locks.
            let opts = PgConnectOptions::from_str(url)?.options([(
                "idle_in_transaction_session_timeout",
                format!("{}ms", PG_IDLE_IN_TRANSACTION_TIMEOUT.as_millis()),
            )]);
            let pool = PgPoolOptions::new()
                .max_connections(16)
                // Short enough that requests during an outage get their 503 promptly.
                .acquire_timeout(Duration::from_secs(5))
                .connect_with(opts)
                .await?;
            tracing::debug!(url = %Redacted(url), "connected to PostgreSQL");
            Ok(Store {
                pool: Pool::Postgres(pool),
            })
        } else {
            Err(Error::Invalid(format!(
                "unsupported database URL {}: expected sqlite:… or postgres://…",
                Redacted(url)
            )))
        }
    }

    /// Opens (creating it if needed) the SQLite database file at `path`.
    pub async fn connect_sqlite_file(path: &Path) -> Result<Store> {
        Self::connect_sqlite(SqliteConnectOptions::new().filename(path)).await
    }

    pub(crate) async fn connect_sqlite(opts: SqliteConnectOptions) -> Result<Store> {
        // sqlx leaves the journal mode alone; WAL lets readers run beside the one
        // writer, and NORMAL sync is durable enough in WAL mode.
        let opts = opts
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(SQLITE_BUSY_TIMEOUT)
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .acquire_timeout(SQLITE_BUSY_TIMEOUT)
            .connect_with(opts)
            .await?;
        Ok(Store {
            pool: Pool::Sqlite(pool),
        })
    }

    /// The PostgreSQL pool, for test support that must act on the store's own sessions.
    pub(crate) fn pg_pool(&self) -> Option<&PgPool> {
        match &self.pool {
            Pool::Postgres(p) => Some(p),
            Pool::Sqlite(_) => None,
        }
    }

    pub fn backend(&self) -> Backend {
        match self.pool {
            Pool::Sqlite(_) => Backend::Sqlite,
            Pool::Postgres(_) => Backend::Postgres,
        }
    }

    /// Applies the embedded migrations of this backend (idempotent).
    pub async fn migrate(&self) -> Result<()> {
        match &self.pool {
            Pool::Sqlite(p) => migrations::sqlite().await?.run(p).await?,
            Pool::Postgres(p) => migrations::postgres().await?.run(p).await?,
        }
        Ok(())
    }

    /// A round trip to the database, for readiness checks.
    pub async fn ping(&self) -> Result<()> {
        on_pool!(self, p => sqlx::query("SELECT 1").execute(p).await.map(drop)?);
        Ok(())
    }

    pub async fn close(&self) {
        on_pool!(self, p => p.close().await)
    }

    // ---- files -------------------------------------------------------------

    /// The row of `select` (`SELECT … FROM <table>`) with this `id`, if `owner` owns it
    /// (`None`: whoever does): the one owner filter every by-id read goes through.
    pub(crate) async fn row_of<T>(
        &self,
        select: &str,
        id: &str,
        owner: Option<&str>,
    ) -> Result<Option<T>>
    where
        T: for<'r> sqlx::FromRow<'r, sqlx::sqlite::SqliteRow>
            + for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow>
            + Send
            + Unpin,
    {
        let sql = match owner {
            None => format!("{select} WHERE id = $1"),
            Some(_) => format!("{select} WHERE id = $1 AND api_key_id = $2"),
        };
        Ok(on_pool!(self, p => {
            let mut q = sqlx::query_as(&sql).bind(id);
            if let Some(o) = owner {
                q = q.bind(o);
            }
            q.fetch_optional(p).await?
        }))
    }

    /// The `seq` of the row a pagination cursor names: `after` must be an existing id (the
    /// last item of the previous page) of `owner`'s (when given), else [`Error::Invalid`].
    pub(crate) async fn cursor_seq(
        &self,
        table: Table,
        after: &str,
        owner: Option<&str>,
    ) -> Result<i64> {
        let (select, noun) = match table {
            Table::Files => ("SELECT seq FROM files", "file"),
            Table::Jobs => ("SELECT seq FROM jobs", "job"),
        };
        let seq: Option<(i64,)> = self.row_of(select, after, owner).await?;
        seq.map(|(s,)| s)
            .ok_or_else(|| Error::Invalid(format!("no {noun} with id {after:?}")))
    }

    /// The database's clock in unix ms, as an SQL expression. Constant within one
    /// statement on both backends.
    pub(crate) fn now_ms(&self) -> &'static str {
        match self.backend() {
            Backend::Sqlite => "CAST(unixepoch('subsec') * 1000 AS INTEGER)",
            Backend::Postgres => "FLOOR(EXTRACT(EPOCH FROM now()) * 1000)::BIGINT",
        }
    }
}

/// On PostgreSQL, the statement that makes one owner's capped inserts (and their counts)
/// take turns until the transaction ends; SQLite's IMMEDIATE transactions already do.
pub(crate) const PG_OWNER_LOCK: &str = "SELECT pg_advisory_xact_lock(hashtext($1))";

/// The key [`PG_OWNER_LOCK`] locks for an owner (`None`: the keyless owner).
pub(crate) fn owner_lock_key(owner: Option<&str>) -> String {
    format!("loraforge-owner:{}", owner.unwrap_or(""))
}

pub(crate) fn lease_lost(lease: &Lease) -> Error {
    Error::LeaseLost {
        job_id: lease.job_id.clone(),
        attempt: lease.attempt,
    }
}

/// A lease length in ms; it must be positive (a zero lease would expire as it is
/// granted) and fit the column.
pub(crate) fn lease_millis(d: Duration) -> Result<i64> {
    match i64::try_from(d.as_millis()) {
        Ok(ms) if ms > 0 => Ok(ms),
        _ => Err(Error::Invalid(format!("lease duration {d:?} out of range"))),
    }
}
