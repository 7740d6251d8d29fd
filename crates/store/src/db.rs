//! The database behind one interface, [`Store`], for SQLite and PostgreSQL.

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
         result, created_at, started_at, finished_at, device_kind, paused_at"
    };
}

macro_rules! api_key_cols {
    () => {
        "id, name, prefix, token_sha256, created_at, last_used_at, revoked_at, admin"
    };
}

/// Tables with cursor pagination.
#[derive(Clone, Copy)]
enum Table {
    Files,
    Jobs,
}

const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a PostgreSQL session may sit idle inside a transaction before the server
/// ends it, releasing its locks (see [`Store::connect`]).
pub const PG_IDLE_IN_TRANSACTION_TIMEOUT: Duration = Duration::from_secs(5);

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

    pub async fn insert_file(&self, f: &NewFile) -> Result<FileRecord> {
        let sql = concat!(
            "INSERT INTO files (",
            file_cols!(),
            ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) RETURNING ",
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
            .bind(&f.api_key_id)
            .fetch_one(p)
            .await?))
    }

    pub async fn get_file(&self, id: &str) -> Result<Option<FileRecord>> {
        self.get_file_of(id, None).await
    }

    /// The file `id` if `owner` owns it (`None`: whoever does). Another owner's file
    /// reads as absent, exactly like one that does not exist.
    pub async fn get_file_of(&self, id: &str, owner: Option<&str>) -> Result<Option<FileRecord>> {
        self.row_of(concat!("SELECT ", file_cols!(), " FROM files"), id, owner)
            .await
    }

    /// The row of `select` (`SELECT … FROM <table>`) with this `id`, if `owner` owns it
    /// (`None`: whoever does): the one owner filter every by-id read goes through.
    async fn row_of<T>(&self, select: &str, id: &str, owner: Option<&str>) -> Result<Option<T>>
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

    /// Queued or running jobs of one owner (`None`: the rows made without a key), for
    /// the per-owner cap on active jobs.
    pub async fn count_active_jobs(&self, owner: Option<&str>) -> Result<i64> {
        let sql = match owner {
            None => "SELECT COUNT(*) FROM jobs WHERE status IN ('queued', 'running') AND api_key_id IS NULL",
            Some(_) => "SELECT COUNT(*) FROM jobs WHERE status IN ('queued', 'running') AND api_key_id = $1",
        };
        Ok(on_pool!(self, p => {
            let mut q = sqlx::query_scalar::<_, i64>(sql);
            if let Some(o) = owner {
                q = q.bind(o);
            }
            q.fetch_one(p).await?
        }))
    }

    /// Bytes of the files one owner stores (`None`: the rows made without a key).
    pub async fn stored_bytes(&self, owner: Option<&str>) -> Result<i64> {
        let sql = match owner {
            None => {
                "SELECT CAST(COALESCE(SUM(bytes), 0) AS BIGINT) FROM files WHERE api_key_id IS NULL"
            }
            Some(_) => {
                "SELECT CAST(COALESCE(SUM(bytes), 0) AS BIGINT) FROM files WHERE api_key_id = $1"
            }
        };
        Ok(on_pool!(self, p => {
            let mut q = sqlx::query_scalar::<_, i64>(sql);
            if let Some(o) = owner {
                q = q.bind(o);
            }
            q.fetch_one(p).await?
        }))
    }

    /// The `seq` of the row a pagination cursor names: `after` must be an existing id (the
    /// last item of the previous page) of `owner`'s (when given), else [`Error::Invalid`].
    async fn cursor_seq(&self, table: Table, after: &str, owner: Option<&str>) -> Result<i64> {
        let (select, noun) = match table {
            Table::Files => ("SELECT seq FROM files", "file"),
            Table::Jobs => ("SELECT seq FROM jobs", "job"),
        };
        let seq: Option<(i64,)> = self.row_of(select, after, owner).await?;
        seq.map(|(s,)| s)
            .ok_or_else(|| Error::Invalid(format!("no {noun} with id {after:?}")))
    }

    /// A page of files, newest first by default. `after` must name an existing file
    /// (the last item of the previous page), else [`Error::Invalid`].
    pub async fn list_files(&self, q: &ListFiles) -> Result<Page<FileRecord>> {
        let limit = q.limit.max(1);
        let cursor = match &q.after {
            Some(after) => Some(
                self.cursor_seq(Table::Files, after, q.owner.as_deref())
                    .await?,
            ),
            None => None,
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
        if q.owner.is_some() {
            n += 1;
            sql.push_str(&format!(" AND api_key_id = ${n}"));
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
            if let Some(owner) = &q.owner {
                query = query.bind(owner);
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
        self.delete_file_of(id, None).await
    }

    /// [`Store::delete_file`] for `owner` (`None`: any owner): another owner's file is
    /// [`DeleteFile::NotFound`].
    pub async fn delete_file_of(&self, id: &str, owner: Option<&str>) -> Result<DeleteFile> {
        let mut get = concat!("SELECT ", file_cols!(), " FROM files WHERE id = $1").to_string();
        if owner.is_some() {
            get.push_str(" AND api_key_id = $2");
        }
        if self.backend() == Backend::Postgres {
            get.push_str(" FOR UPDATE");
        }
        let in_use = "SELECT id FROM jobs WHERE (training_file = $1 OR validation_file = $1) \
                      AND status IN ('queued', 'running') ORDER BY seq LIMIT 1";
        Ok(write_tx!(self, tx => {
            let mut q = sqlx::query_as(&get).bind(id);
            if let Some(o) = owner {
                q = q.bind(o);
            }
            let file: Option<FileRecord> = q.fetch_optional(&mut *tx).await?;
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

    // ---- jobs --------------------------------------------------------------

    /// Inserts a job, `queued` and due at once (`run_at_ms` is the database's now, the
    /// clock claims compare against).
    pub async fn insert_job(&self, j: &NewJob) -> Result<JobRecord> {
        let job = self.insert_job_row(j).await?;
        self.notify_jobs().await;
        Ok(job)
    }

    async fn insert_job_row(&self, j: &NewJob) -> Result<JobRecord> {
        let sql = format!(
            "INSERT INTO jobs (id, api_key_id, model, training_file, validation_file, suffix, \
             spec, status, priority, run_at_ms, max_attempts, idempotency_key, created_at, \
             device_kind) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, 'queued', $8, {now}, $9, $10, $11, $12) RETURNING {}",
            job_cols!(),
            now = self.now_ms(),
        );
        Ok(on_pool!(self, p => sqlx::query_as(&sql)
            .bind(&j.id)
            .bind(&j.api_key_id)
            .bind(&j.model)
            .bind(&j.training_file)
            .bind(&j.validation_file)
            .bind(&j.suffix)
            .bind(&j.spec)
            .bind(j.priority)
            .bind(j.max_attempts)
            .bind(&j.idempotency_key)
            .bind(now_secs())
            .bind(&j.device_kind)
            .fetch_one(p)
            .await?))
    }

    pub async fn get_job(&self, id: &str) -> Result<Option<JobRecord>> {
        self.get_job_of(id, None).await
    }

    /// The job `id` if `owner` owns it (`None`: whoever does). Another owner's job
    /// reads as absent, exactly like one that does not exist.
    pub async fn get_job_of(&self, id: &str, owner: Option<&str>) -> Result<Option<JobRecord>> {
        self.row_of(concat!("SELECT ", job_cols!(), " FROM jobs"), id, owner)
            .await
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

    /// The job an earlier request created with this idempotency key, if any.
    pub async fn find_job_by_idempotency_key(
        &self,
        api_key_id: Option<&str>,
        key: &str,
    ) -> Result<Option<JobRecord>> {
        let sql = concat!(
            "SELECT ",
            job_cols!(),
            " FROM jobs WHERE COALESCE(api_key_id, '') = $1 AND idempotency_key = $2"
        );
        Ok(on_pool!(self, p => sqlx::query_as(sql)
            .bind(api_key_id.unwrap_or(""))
            .bind(key)
            .fetch_optional(p)
            .await?))
    }

    /// A page of jobs, newest first; `after` names the last job of the previous page.
    pub async fn list_jobs(
        &self,
        after: Option<&str>,
        limit: i64,
        status: Option<JobStatus>,
    ) -> Result<Page<JobRecord>> {
        self.list_jobs_of(after, limit, status, None).await
    }

    /// [`Store::list_jobs`], only `owner`'s jobs (`None`: everyone's). `after` must be
    /// one of them.
    pub async fn list_jobs_of(
        &self,
        after: Option<&str>,
        limit: i64,
        status: Option<JobStatus>,
        owner: Option<&str>,
    ) -> Result<Page<JobRecord>> {
        let limit = limit.max(1);
        let cursor = match after {
            Some(after) => Some(self.cursor_seq(Table::Jobs, after, owner).await?),
            None => None,
        };
        let mut sql = format!("SELECT {} FROM jobs WHERE 1 = 1", job_cols!());
        let mut n = 0;
        if cursor.is_some() {
            n += 1;
            sql.push_str(&format!(" AND seq < ${n}"));
        }
        if status.is_some() {
            n += 1;
            sql.push_str(&format!(" AND status = ${n}"));
        }
        if owner.is_some() {
            n += 1;
            sql.push_str(&format!(" AND api_key_id = ${n}"));
        }
        n += 1;
        sql.push_str(&format!(" ORDER BY seq DESC LIMIT ${n}"));
        let mut rows: Vec<JobRecord> = on_pool!(self, p => {
            let mut query = sqlx::query_as(&sql);
            if let Some(c) = cursor {
                query = query.bind(c);
            }
            if let Some(s) = status {
                query = query.bind(s.as_str());
            }
            if let Some(o) = owner {
                query = query.bind(o);
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

    /// Asks a job to stop. A queued job is cancelled at once (nobody holds it); a
    /// running one gets `cancel_requested_at`, which its worker sees on the next
    /// heartbeat. Returns the job as it is afterwards; a finished job is unchanged.
    pub async fn request_cancel(&self, id: &str) -> Result<JobRecord> {
        let now = now_secs();
        on_pool!(self, p => sqlx::query(
            "UPDATE jobs SET status = 'cancelled', finished_at = $2, lease_owner = NULL, \
             lease_expires_at_ms = NULL WHERE id = $1 AND status = 'queued'"
        )
        .bind(id)
        .bind(now)
        .execute(p)
        .await
        .map(drop)?);
        on_pool!(self, p => sqlx::query(
            "UPDATE jobs SET cancel_requested_at = COALESCE(cancel_requested_at, $2) \
             WHERE id = $1 AND status = 'running'"
        )
        .bind(id)
        .bind(now)
        .execute(p)
        .await
        .map(drop)?);
        self.get_job(id).await?.ok_or(Error::NotFound)
    }

    /// Pauses a job: a queued one at once (claims skip it), a running one by asking its
    /// worker, which sees the request on its next heartbeat, checkpoints and calls
    /// [`Store::release_job`]. Returns the job as it is afterwards.
    pub async fn request_pause(&self, id: &str) -> Result<JobRecord> {
        on_pool!(self, p => sqlx::query(
            "UPDATE jobs SET paused_at = COALESCE(paused_at, $2) \
             WHERE id = $1 AND status IN ('queued', 'running')"
        )
        .bind(id)
        .bind(now_secs())
        .execute(p)
        .await
        .map(drop)?);
        self.get_job(id).await?.ok_or(Error::NotFound)
    }

    /// Lifts a pause: the job becomes claimable again (a worker continues it from its
    /// newest checkpoint), or, if its worker had not paused yet, simply keeps running.
    pub async fn resume_job(&self, id: &str) -> Result<JobRecord> {
        on_pool!(self, p => sqlx::query(
            "UPDATE jobs SET paused_at = NULL WHERE id = $1 AND status IN ('queued', 'running')"
        )
        .bind(id)
        .execute(p)
        .await
        .map(drop)?);
        self.notify_jobs().await;
        self.get_job(id).await?.ok_or(Error::NotFound)
    }

    /// Tells listening workers (PostgreSQL `NOTIFY` on [`JOBS_CHANNEL`]) that a job may
    /// be claimable. Best effort: workers also poll, so a lost wake-up only costs time.
    async fn notify_jobs(&self) {
        if let Pool::Postgres(p) = &self.pool {
            let r = sqlx::query("SELECT pg_notify($1, '')")
                .bind(JOBS_CHANNEL)
                .execute(p)
                .await;
            if let Err(e) = r {
                tracing::debug!(error = %e, "NOTIFY failed");
            }
        }
    }

    /// Wake-ups for workers: one item per `NOTIFY` on [`JOBS_CHANNEL`] (PostgreSQL;
    /// `None` on SQLite, where the server's own notifications and polling suffice). The
    /// listener reconnects by itself after a lost connection.
    pub async fn job_wakeups(
        &self,
    ) -> Result<Option<futures::stream::BoxStream<'static, Result<()>>>> {
        let Pool::Postgres(p) = &self.pool else {
            return Ok(None);
        };
        let mut l = sqlx::postgres::PgListener::connect_with(p).await?;
        l.listen(JOBS_CHANNEL).await?;
        Ok(Some(Box::pin(futures::stream::unfold(
            l,
            |mut l| async move {
                let r = l.recv().await.map(drop).map_err(Error::from);
                Some((r, l))
            },
        ))))
    }

    /// A worker hands a job back unfinished: `queued` again, no lease. With `pause` the job
    /// is also marked paused (no claim takes it until it is resumed); without, the next
    /// claim by any worker continues it from its checkpoint (a worker shutting down).
    /// Fenced like every worker write.
    pub async fn release_job(&self, lease: &Lease, pause: bool) -> Result<JobRecord> {
        let sql = format!(
            "UPDATE jobs SET status = 'queued', lease_owner = NULL, lease_expires_at_ms = NULL, \
             paused_at = COALESCE(paused_at, $3) \
             WHERE id = $1 AND fencing_token = $2 AND status = 'running' RETURNING {}",
            job_cols!()
        );
        let job: Option<JobRecord> = on_pool!(self, p => sqlx::query_as(&sql)
            .bind(&lease.job_id)
            .bind(lease.fencing_token)
            .bind(pause.then(now_secs))
            .fetch_optional(p)
            .await?);
        let job = job.ok_or_else(|| lease_lost(lease))?;
        if !pause {
            self.notify_jobs().await;
        }
        Ok(job)
    }

    /// Restricts a job to workers of one device kind (`None`: any worker).
    pub async fn set_job_device_kind(&self, id: &str, device_kind: Option<&str>) -> Result<()> {
        let n = on_pool!(self, p => sqlx::query("UPDATE jobs SET device_kind = $2 WHERE id = $1")
            .bind(id)
            .bind(device_kind)
            .execute(p)
            .await?
            .rows_affected());
        if n == 0 {
            return Err(Error::NotFound);
        }
        Ok(())
    }

    // ---- queue: claim, heartbeat and fenced worker writes -------------------
    //
    // A claim bumps `attempt` and `fencing_token` and sets a lease that heartbeats
    // renew. Every later write by the worker names its `Lease` and is conditioned on
    // `fencing_token` (and `status = 'running'`) in the same statement or transaction,
    // so once another worker has re-claimed the job, or the job ended, the stale
    // worker's writes change nothing and it gets `Error::LeaseLost`.
    //
    // Lease and schedule times use the database clock, never the worker's: with
    // workers on several machines, one whose clock runs fast would otherwise see
    // healthy leases as expired and take jobs that are still running.

    /// The database's clock in unix ms, as an SQL expression. Constant within one
    /// statement on both backends.
    fn now_ms(&self) -> &'static str {
        match self.backend() {
            Backend::Sqlite => "CAST(unixepoch('subsec') * 1000 AS INTEGER)",
            Backend::Postgres => "FLOOR(EXTRACT(EPOCH FROM now()) * 1000)::BIGINT",
        }
    }

    /// Takes the next job `worker_id` may run on a device of `device_kind`, with a
    /// lease of `lease` from now, or `None` when there is none.
    ///
    /// Candidates are queued jobs that are due, and running jobs whose lease expired
    /// (their worker died or stalled) with attempts left; the latter come back as the
    /// same job with the next attempt, so the new worker can resume from the job's
    /// checkpoints. Order: `priority` (lower first), then `run_at_ms`, then age. A job
    /// with a `device_kind` goes only to workers of that kind.
    ///
    /// Running jobs whose lease expired on their last attempt are not taken; they stay
    /// `running` until something fails them.
    pub async fn claim_next_job(
        &self,
        worker_id: &str,
        device_kind: &str,
        lease: Duration,
    ) -> Result<Option<ClaimedJob>> {
        let lease_ms = lease_millis(lease)?;
        let now = self.now_ms();
        // A running row without an expiry has no holder (e.g. set by operator
        // tooling), so it counts as expired.
        let pick = format!(
            "SELECT id AS claim_id FROM jobs \
             WHERE (device_kind IS NULL OR device_kind = $2) \
             AND ((status = 'queued' AND paused_at IS NULL AND run_at_ms <= {now}) \
                  OR (status = 'running' AND COALESCE(lease_expires_at_ms, 0) <= {now} \
                      AND attempt < max_attempts)) \
             ORDER BY priority, run_at_ms, seq LIMIT 1"
        );
        let set = format!(
            "status = 'running', attempt = attempt + 1, fencing_token = fencing_token + 1, \
             lease_owner = $1, lease_expires_at_ms = {now} + $3, heartbeat_at_ms = {now}, \
             started_at = COALESCE(started_at, $4)"
        );
        let sql = match self.backend() {
            // SQLite has one writer, and the IMMEDIATE transaction holds the write lock
            // from its start, so the subquery and the update are atomic.
            Backend::Sqlite => format!(
                "UPDATE jobs SET {set} WHERE id = ({pick}) RETURNING {}",
                job_cols!()
            ),
            // Concurrent claimers lock different rows: SKIP LOCKED passes over a row
            // another claimer is taking instead of waiting for it (and then finding it
            // gone), and the locked row is re-checked, so nobody takes it twice.
            Backend::Postgres => format!(
                "WITH c AS ({pick} FOR UPDATE SKIP LOCKED) \
                 UPDATE jobs SET {set} FROM c WHERE jobs.id = c.claim_id RETURNING {}",
                job_cols!()
            ),
        };
        let job: Option<JobRecord> = write_tx!(self, tx => sqlx::query_as(&sql)
            .bind(worker_id)
            .bind(device_kind)
            .bind(lease_ms)
            .bind(now_secs())
            .fetch_optional(&mut *tx)
            .await?);
        let Some(job) = job else {
            return Ok(None);
        };
        let expires_at_ms = job
            .lease_expires_at_ms
            .ok_or_else(|| Error::Corrupt(format!("claimed job {} has no lease", job.id).into()))?;
        let lease = Lease {
            job_id: job.id.clone(),
            worker_id: worker_id.to_string(),
            attempt: job.attempt,
            fencing_token: job.fencing_token,
            expires_at_ms,
        };
        Ok(Some(ClaimedJob { job, lease }))
    }

    /// Renews `lease` to `duration` from now. Also reports whether a cancel was
    /// requested, so that the heartbeat is the worker's one regular poll.
    /// [`Error::LeaseLost`] once the lease is no longer current.
    pub async fn heartbeat(&self, lease: &Lease, duration: Duration) -> Result<Heartbeat> {
        let lease_ms = lease_millis(duration)?;
        let sql = format!(
            "UPDATE jobs SET lease_expires_at_ms = {now} + $3, heartbeat_at_ms = {now} \
             WHERE id = $1 AND fencing_token = $2 AND status = 'running' \
             RETURNING lease_expires_at_ms, cancel_requested_at, paused_at",
            now = self.now_ms()
        );
        let row: Option<(i64, Option<i64>, Option<i64>)> = on_pool!(self, p => sqlx::query_as(&sql)
            .bind(&lease.job_id)
            .bind(lease.fencing_token)
            .bind(lease_ms)
            .fetch_optional(p)
            .await?);
        match row {
            Some((lease_expires_at_ms, cancel_requested_at, pause_requested_at)) => Ok(Heartbeat {
                lease_expires_at_ms,
                cancel_requested_at,
                pause_requested_at,
            }),
            None => Err(lease_lost(lease)),
        }
    }

    /// Appends an event for the attempt that `lease` holds; [`Error::LeaseLost`]
    /// (and no event) once the lease is no longer current.
    pub async fn append_job_event(
        &self,
        lease: &Lease,
        level: &str,
        kind: &str,
        message: &str,
        data: Option<&str>,
    ) -> Result<EventRecord> {
        let insert = "INSERT INTO job_events (job_id, attempt, level, type, message, data, \
                      created_at) VALUES ($1, $2, $3, $4, $5, $6, $7) \
                      RETURNING id, job_id, attempt, level, type, message, data, created_at";
        let event = write_tx!(self, tx => {
            // The fence check is an update that changes nothing: on PostgreSQL it
            // row-locks the job until commit, so a re-claim cannot slip in between
            // the check and the insert (on SQLite the write lock already excludes it).
            let held = sqlx::query(
                "UPDATE jobs SET fencing_token = fencing_token \
                 WHERE id = $1 AND fencing_token = $2 AND status = 'running'",
            )
            .bind(&lease.job_id)
            .bind(lease.fencing_token)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if held == 0 {
                // Dropping the transaction rolls it back.
                return Err(lease_lost(lease));
            }
            sqlx::query_as(insert)
                .bind(&lease.job_id)
                .bind(lease.attempt)
                .bind(level)
                .bind(kind)
                .bind(message)
                .bind(data)
                .bind(now_secs())
                .fetch_one(&mut *tx)
                .await?
        });
        Ok(event)
    }

    /// Replaces the job's `progress` (JSON) for the attempt that `lease` holds;
    /// [`Error::LeaseLost`] once the lease is no longer current.
    pub async fn update_job_progress(&self, lease: &Lease, progress: &str) -> Result<()> {
        let n = on_pool!(self, p => sqlx::query(
            "UPDATE jobs SET progress = $3 \
             WHERE id = $1 AND fencing_token = $2 AND status = 'running'"
        )
        .bind(&lease.job_id)
        .bind(lease.fencing_token)
        .bind(progress)
        .execute(p)
        .await?
        .rows_affected());
        if n == 0 {
            return Err(lease_lost(lease));
        }
        Ok(())
    }

    /// Ends the attempt that `lease` holds, and with it the job: sets the terminal
    /// status and its fields and releases the lease. [`Error::LeaseLost`] (and no
    /// change) once the lease is no longer current, so only the current attempt can
    /// decide how a job ends.
    pub async fn finish_job(&self, lease: &Lease, outcome: &JobOutcome) -> Result<JobRecord> {
        let (error, fine_tuned_model, result) = match outcome {
            JobOutcome::Succeeded {
                fine_tuned_model,
                result,
            } => (None, Some(fine_tuned_model.as_str()), result.as_deref()),
            JobOutcome::Failed { error } => (Some(error.as_str()), None, None),
            JobOutcome::Cancelled => (None, None, None),
        };
        let sql = concat!(
            "UPDATE jobs SET status = $3, finished_at = $4, error = $5, \
             fine_tuned_model = COALESCE($6, fine_tuned_model), result = COALESCE($7, result), \
             lease_owner = NULL, lease_expires_at_ms = NULL \
             WHERE id = $1 AND fencing_token = $2 AND status = 'running' RETURNING ",
            job_cols!()
        );
        let job: Option<JobRecord> = on_pool!(self, p => sqlx::query_as(sql)
            .bind(&lease.job_id)
            .bind(lease.fencing_token)
            .bind(outcome.status().as_str())
            .bind(now_secs())
            .bind(error)
            .bind(fine_tuned_model)
            .bind(result)
            .fetch_optional(p)
            .await?);
        job.ok_or_else(|| lease_lost(lease))
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

    /// Inserts a checkpoint row without a fence (tools and tests; workers use
    /// [`Store::record_checkpoint`]).
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

    /// Records a worker's checkpoint, fenced like its other writes: a worker whose claim
    /// is no longer current gets [`Error::LeaseLost`] and adds nothing.
    pub async fn record_checkpoint(&self, lease: &Lease, c: &CheckpointRecord) -> Result<()> {
        write_tx!(self, tx => {
            let held = sqlx::query(
                "UPDATE jobs SET fencing_token = fencing_token \
                 WHERE id = $1 AND fencing_token = $2 AND status = 'running'",
            )
            .bind(&lease.job_id)
            .bind(lease.fencing_token)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if held == 0 {
                return Err(lease_lost(lease));
            }
            sqlx::query(
                "INSERT INTO checkpoints (id, job_id, attempt, step, storage_key, metrics, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .bind(&c.id)
            .bind(&c.job_id)
            .bind(c.attempt)
            .bind(c.step)
            .bind(&c.storage_key)
            .bind(&c.metrics)
            .bind(c.created_at)
            .execute(&mut *tx)
            .await
            .map(drop)?
        });
        Ok(())
    }

    /// A job's checkpoints, newest step first.
    pub async fn list_checkpoints(&self, job_id: &str) -> Result<Vec<CheckpointRecord>> {
        let sql = "SELECT id, job_id, attempt, step, storage_key, metrics, created_at \
                   FROM checkpoints WHERE job_id = $1 ORDER BY step DESC";
        Ok(on_pool!(self, p => sqlx::query_as(sql).bind(job_id).fetch_all(p).await?))
    }

    // ---- api keys ----------------------------------------------------------
    //
    // Only a token's sha256 (hex) and a short display prefix are stored; lookups are by
    // hash, so the token itself never reaches the database or its logs.

    pub async fn insert_api_key(&self, k: &ApiKeyRecord) -> Result<()> {
        on_pool!(self, p => sqlx::query(
            "INSERT INTO api_keys (id, name, prefix, token_sha256, created_at, last_used_at, \
             revoked_at, admin) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
        )
        .bind(&k.id)
        .bind(&k.name)
        .bind(&k.prefix)
        .bind(&k.token_sha256)
        .bind(k.created_at)
        .bind(k.last_used_at)
        .bind(k.revoked_at)
        .bind(k.admin)
        .execute(p)
        .await
        .map(drop)?);
        Ok(())
    }

    /// The live (not revoked) key whose token hashes to `token_sha256`.
    pub async fn find_api_key(&self, token_sha256: &str) -> Result<Option<ApiKeyRecord>> {
        let sql = concat!(
            "SELECT ",
            api_key_cols!(),
            " FROM api_keys WHERE token_sha256 = $1 AND revoked_at IS NULL"
        );
        Ok(on_pool!(self, p => sqlx::query_as(sql).bind(token_sha256).fetch_optional(p).await?))
    }

    /// Every key, revoked ones included, oldest first.
    pub async fn list_api_keys(&self) -> Result<Vec<ApiKeyRecord>> {
        let sql = concat!(
            "SELECT ",
            api_key_cols!(),
            " FROM api_keys ORDER BY created_at, id"
        );
        Ok(on_pool!(self, p => sqlx::query_as(sql).fetch_all(p).await?))
    }

    /// Whether any key is live (not revoked): the server enforces authentication then.
    pub async fn has_live_api_keys(&self) -> Result<bool> {
        let sql = "SELECT id FROM api_keys WHERE revoked_at IS NULL LIMIT 1";
        let row: Option<(String,)> =
            on_pool!(self, p => sqlx::query_as(sql).fetch_optional(p).await?);
        Ok(row.is_some())
    }

    /// Records a use of key `id` at `at` (unix s). Callers throttle it (the API writes at
    /// most once a minute per key), so requests do not each cost a write.
    pub async fn touch_api_key(&self, id: &str, at: i64) -> Result<()> {
        on_pool!(self, p => sqlx::query("UPDATE api_keys SET last_used_at = $2 WHERE id = $1")
            .bind(id)
            .bind(at)
            .execute(p)
            .await
            .map(drop)?);
        Ok(())
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

fn lease_lost(lease: &Lease) -> Error {
    Error::LeaseLost {
        job_id: lease.job_id.clone(),
        attempt: lease.attempt,
    }
}

/// A lease length in ms; it must be positive (a zero lease would expire as it is
/// granted) and fit the column.
fn lease_millis(d: Duration) -> Result<i64> {
    match i64::try_from(d.as_millis()) {
        Ok(ms) if ms > 0 => Ok(ms),
        _ => Err(Error::Invalid(format!("lease duration {d:?} out of range"))),
    }
}
