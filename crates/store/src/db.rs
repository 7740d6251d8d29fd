//! The database behind one interface, [`Store`], for SQLite and PostgreSQL.

use crate::error::Redacted;
use crate::model::*;
use crate::{migrations, now_millis, now_secs, Error, Result};
use sqlx::postgres::{PgPool, PgPoolOptions};
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
enum Pool {
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
         examples, errors, created_at"
    };
}

macro_rules! job_cols {
    () => {
        "id, api_key_id, model, training_file, validation_file, suffix, spec, status, priority, \
         run_at_ms, attempt, max_attempts, lease_owner, lease_expires_at_ms, heartbeat_at_ms, \
         fencing_token, cancel_requested_at, idempotency_key, progress, error, fine_tuned_model, \
         result, created_at, started_at, finished_at"
    };
}

const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(30);

impl Store {
    /// Connects to `url`: `sqlite:…` or `postgres://…` / `postgresql://…`. Does not
    /// migrate; call [`Store::migrate`].
    pub async fn connect(url: &str) -> Result<Store> {
        if url.starts_with("sqlite:") {
            let opts = SqliteConnectOptions::from_str(url)?;
            Self::connect_sqlite(opts).await
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let pool = PgPoolOptions::new()
                .max_connections(16)
                .acquire_timeout(Duration::from_secs(10))
                .connect(url)
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

    async fn connect_sqlite(opts: SqliteConnectOptions) -> Result<Store> {
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

    pub async fn insert_file(&self, f: &NewFile) -> Result<FileRecord> {
        let sql = concat!(
            "INSERT INTO files (",
            file_cols!(),
            ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) RETURNING ",
            file_cols!()
        );
        Ok(on_pool!(self, p => sqlx::query_as(sql)
            .bind(&f.id)
            .bind(&f.purpose)
            .bind(&f.filename)
            .bind(f.bytes)
            .bind(&f.sha256)
            .bind(&f.storage_key)
            .bind(&f.status)
            .bind(&f.status_details)
            .bind(&f.format)
            .bind(f.examples)
            .bind(&f.errors)
            .bind(f.created_at)
            .fetch_one(p)
            .await?))
    }

    pub async fn get_file(&self, id: &str) -> Result<Option<FileRecord>> {
        let sql = concat!("SELECT ", file_cols!(), " FROM files WHERE id = $1");
        Ok(on_pool!(self, p => sqlx::query_as(sql).bind(id).fetch_optional(p).await?))
    }

    /// A page of files, newest first by default. `after` must name an existing file
    /// (the last item of the previous page), else [`Error::Invalid`].
    pub async fn list_files(&self, q: &ListFiles) -> Result<Page<FileRecord>> {
        let limit = q.limit.max(1);
        let cursor: Option<i64> = match &q.after {
            None => None,
            Some(after) => {
                let seq: Option<(i64,)> = on_pool!(self, p => sqlx::query_as(
                    "SELECT seq FROM files WHERE id = $1"
                )
                .bind(after)
                .fetch_optional(p)
                .await?);
                match seq {
                    Some((s,)) => Some(s),
                    None => return Err(Error::Invalid(format!("no file with id {after:?}"))),
                }
            }
        };
        // Every clause is fixed text and every value a bound parameter; only the
        // shape of the statement varies.
        let (cmp, dir) = match q.order {
            Order::Asc => (">", "ASC"),
            Order::Desc => ("<", "DESC"),
        };
        let mut sql = format!("SELECT {} FROM files WHERE 1 = 1", file_cols!());
        let mut n = 0;
        if cursor.is_some() {
            n += 1;
            sql.push_str(&format!(" AND seq {cmp} ${n}"));
        }
        if q.purpose.is_some() {
            n += 1;
            sql.push_str(&format!(" AND purpose = ${n}"));
        }
        n += 1;
        sql.push_str(&format!(" ORDER BY seq {dir} LIMIT ${n}"));
        let mut rows: Vec<FileRecord> = on_pool!(self, p => {
            let mut query = sqlx::query_as(&sql);
            if let Some(c) = cursor {
                query = query.bind(c);
            }
            if let Some(purpose) = &q.purpose {
                query = query.bind(purpose);
            }
            query.bind(limit + 1).fetch_all(p).await?
        });
        let has_more = rows.len() as i64 > limit;
        rows.truncate(limit as usize);
        Ok(Page {
            data: rows,
            has_more,
        })
    }

    /// Deletes the file row unless a queued or running job uses the file. The check
    /// and the delete share one write transaction, so a job created concurrently
    /// (which reads the file row in its own write transaction) cannot slip between.
    /// The caller deletes the blob afterwards: an orphan blob is harmless, a row
    /// without its blob is not.
    pub async fn delete_file(&self, id: &str) -> Result<DeleteFile> {
        let get = concat!("SELECT ", file_cols!(), " FROM files WHERE id = $1");
        let get_pg = concat!(
            "SELECT ",
            file_cols!(),
            " FROM files WHERE id = $1 FOR UPDATE"
        );
        let in_use = "SELECT id FROM jobs WHERE (training_file = $1 OR validation_file = $1) \
                      AND status IN ('queued', 'running') ORDER BY seq LIMIT 1";
        let get = match self.backend() {
            Backend::Sqlite => get,
            Backend::Postgres => get_pg,
        };
        Ok(write_tx!(self, tx => {
            let file: Option<FileRecord> =
                sqlx::query_as(get).bind(id).fetch_optional(&mut *tx).await?;
            match file {
                None => DeleteFile::NotFound,
                Some(file) => {
                    let job: Option<(String,)> =
                        sqlx::query_as(in_use).bind(id).fetch_optional(&mut *tx).await?;
                    match job {
                        Some((job_id,)) => DeleteFile::InUse(job_id),
                        None => {
                            sqlx::query("DELETE FROM files WHERE id = $1")
                                .bind(id)
                                .execute(&mut *tx)
                                .await?;
                            DeleteFile::Deleted(Box::new(file))
                        }
                    }
                }
            }
        }))
    }

    // ---- jobs (the queue operations arrive with the jobs API) ---------------

    pub async fn insert_job(&self, j: &NewJob) -> Result<JobRecord> {
        let sql = concat!(
            "INSERT INTO jobs (id, api_key_id, model, training_file, validation_file, suffix, \
             spec, status, priority, run_at_ms, max_attempts, idempotency_key, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, 'queued', $8, $9, $10, $11, $12) RETURNING ",
            job_cols!()
        );
        Ok(on_pool!(self, p => sqlx::query_as(sql)
            .bind(&j.id)
            .bind(&j.api_key_id)
            .bind(&j.model)
            .bind(&j.training_file)
            .bind(&j.validation_file)
            .bind(&j.suffix)
            .bind(&j.spec)
            .bind(j.priority)
            .bind(now_millis())
            .bind(j.max_attempts)
            .bind(&j.idempotency_key)
            .bind(now_secs())
            .fetch_one(p)
            .await?))
    }

    pub async fn get_job(&self, id: &str) -> Result<Option<JobRecord>> {
        let sql = concat!("SELECT ", job_cols!(), " FROM jobs WHERE id = $1");
        Ok(on_pool!(self, p => sqlx::query_as(sql).bind(id).fetch_optional(p).await?))
    }

    /// Sets a job's status unconditionally (operator tooling and tests; workers use
    /// fenced transitions).
    pub async fn set_job_status(&self, id: &str, status: JobStatus) -> Result<()> {
        let finished = status.is_terminal().then(now_secs);
        let n = on_pool!(self, p => sqlx::query(
            "UPDATE jobs SET status = $2, finished_at = COALESCE($3, finished_at) WHERE id = $1"
        )
        .bind(id)
        .bind(status.as_str())
        .bind(finished)
        .execute(p)
        .await?
        .rows_affected());
        if n == 0 {
            return Err(Error::NotFound);
        }
        Ok(())
    }

    // ---- job events --------------------------------------------------------

    pub async fn append_event(&self, e: &NewEvent) -> Result<EventRecord> {
        let sql =
            "INSERT INTO job_events (job_id, attempt, level, type, message, data, created_at) \
                   VALUES ($1, $2, $3, $4, $5, $6, $7) \
                   RETURNING id, job_id, attempt, level, type, message, data, created_at";
        Ok(on_pool!(self, p => sqlx::query_as(sql)
            .bind(&e.job_id)
            .bind(e.attempt)
            .bind(&e.level)
            .bind(&e.kind)
            .bind(&e.message)
            .bind(&e.data)
            .bind(now_secs())
            .fetch_one(p)
            .await?))
    }

    /// A job's events with ids above `after` (all when `None`), oldest first.
    pub async fn list_events(
        &self,
        job_id: &str,
        after: Option<i64>,
        limit: i64,
    ) -> Result<Vec<EventRecord>> {
        let sql = "SELECT id, job_id, attempt, level, type, message, data, created_at \
                   FROM job_events WHERE job_id = $1 AND id > $2 ORDER BY id LIMIT $3";
        Ok(on_pool!(self, p => sqlx::query_as(sql)
            .bind(job_id)
            .bind(after.unwrap_or(0))
            .bind(limit)
            .fetch_all(p)
            .await?))
    }

    // ---- checkpoints -------------------------------------------------------

    pub async fn insert_checkpoint(&self, c: &CheckpointRecord) -> Result<()> {
        on_pool!(self, p => sqlx::query(
            "INSERT INTO checkpoints (id, job_id, attempt, step, storage_key, metrics, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)"
        )
        .bind(&c.id)
        .bind(&c.job_id)
        .bind(c.attempt)
        .bind(c.step)
        .bind(&c.storage_key)
        .bind(&c.metrics)
        .bind(c.created_at)
        .execute(p)
        .await
        .map(drop)?);
        Ok(())
    }

    /// A job's checkpoints, newest step first.
    pub async fn list_checkpoints(&self, job_id: &str) -> Result<Vec<CheckpointRecord>> {
        let sql = "SELECT id, job_id, attempt, step, storage_key, metrics, created_at \
                   FROM checkpoints WHERE job_id = $1 ORDER BY step DESC";
        Ok(on_pool!(self, p => sqlx::query_as(sql).bind(job_id).fetch_all(p).await?))
    }

    // ---- api keys ----------------------------------------------------------

    pub async fn insert_api_key(&self, k: &ApiKeyRecord) -> Result<()> {
        on_pool!(self, p => sqlx::query(
            "INSERT INTO api_keys (id, name, prefix, token_sha256, created_at, last_used_at, \
             revoked_at) VALUES ($1, $2, $3, $4, $5, $6, $7)"
        )
        .bind(&k.id)
        .bind(&k.name)
        .bind(&k.prefix)
        .bind(&k.token_sha256)
        .bind(k.created_at)
        .bind(k.last_used_at)
        .bind(k.revoked_at)
        .execute(p)
        .await
        .map(drop)?);
        Ok(())
    }

    /// The live (not revoked) key whose token hashes to `token_sha256`.
    pub async fn find_api_key(&self, token_sha256: &str) -> Result<Option<ApiKeyRecord>> {
        let sql = "SELECT id, name, prefix, token_sha256, created_at, last_used_at, revoked_at \
                   FROM api_keys WHERE token_sha256 = $1 AND revoked_at IS NULL";
        Ok(on_pool!(self, p => sqlx::query_as(sql).bind(token_sha256).fetch_optional(p).await?))
    }

    pub async fn revoke_api_key(&self, id: &str) -> Result<()> {
        let n = on_pool!(self, p => sqlx::query(
            "UPDATE api_keys SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL"
        )
        .bind(id)
        .bind(now_secs())
        .execute(p)
        .await?
        .rows_affected());
        if n == 0 {
            return Err(Error::NotFound);
        }
        Ok(())
    }
}
