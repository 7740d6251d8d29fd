//! The `jobs` table: creation, listing, cancel/pause/resume requests, and the queue
//! (claim, lease, heartbeat, fenced progress and finish).

use super::*;

/// An owner's (`$1`, '' for the keyless owner) queued and running jobs.
const ACTIVE_JOBS: &str = "SELECT COUNT(*) FROM jobs WHERE status IN ('queued', 'running') \
                           AND COALESCE(api_key_id, '') = $1";

/// Binds a [`NewJob`] to the parameters of [`Store::insert_job_sql`], in its order.
macro_rules! bind_new_job {
    ($q:expr, $j:expr) => {
        $q.bind(&$j.id)
            .bind(&$j.api_key_id)
            .bind(&$j.model)
            .bind(&$j.training_file)
            .bind(&$j.validation_file)
            .bind(&$j.suffix)
            .bind(&$j.spec)
            .bind($j.priority)
            .bind($j.max_attempts)
            .bind(&$j.idempotency_key)
            .bind(now_secs())
            .bind(&$j.device_kind)
    };
}

impl Store {
    /// Queued or running jobs of one owner (`None`: the rows made without a key), for
    /// the per-owner cap on active jobs.
    pub async fn count_active_jobs(&self, owner: Option<&str>) -> Result<i64> {
        Ok(
            on_pool!(self, p => sqlx::query_scalar::<_, i64>(ACTIVE_JOBS)
            .bind(owner.unwrap_or(""))
            .fetch_one(p)
            .await?),
        )
    }

    /// Inserts a job, `queued` and due at once (`run_at_ms` is the database's now, the
    /// clock claims compare against).
    pub async fn insert_job(&self, j: &NewJob) -> Result<JobRecord> {
        let job = self.insert_job_row(j).await?;
        self.notify_jobs().await;
        Ok(job)
    }

    /// Inserts a job as one transaction with what must hold for it: its data files still
    /// exist (a file being deleted at the same moment either sees the job or is gone
    /// first), and its owner has fewer than `max_active` queued or running jobs (0: no
    /// cap), counted under a lock that concurrent inserts of the same owner wait for.
    /// [`Error::Invalid`] names a data file that is gone; [`Error::OverLimit`] says the
    /// cap is reached.
    pub async fn insert_job_within(&self, j: &NewJob, max_active: u64) -> Result<JobRecord> {
        let pg = self.backend() == Backend::Postgres;
        let lock_files = if pg {
            "SELECT id FROM files WHERE id = $1 FOR SHARE"
        } else {
            "SELECT id FROM files WHERE id = $1"
        };
        let sql = self.insert_job_sql();
        let owner = j.api_key_id.as_deref();
        let job: JobRecord = write_tx!(self, tx => {
            if pg {
                sqlx::query(PG_OWNER_LOCK)
                    .bind(owner_lock_key(owner))
                    .execute(&mut *tx)
                    .await?;
            }
            for file in std::iter::once(&j.training_file).chain(j.validation_file.as_ref()) {
                let found: Option<(String,)> = sqlx::query_as(lock_files)
                    .bind(file)
                    .fetch_optional(&mut *tx)
                    .await?;
                if found.is_none() {
                    return Err(Error::Invalid(format!("File {file} no longer exists.")));
                }
            }
            if max_active > 0 {
                let n: i64 = sqlx::query_scalar(ACTIVE_JOBS)
                    .bind(owner.unwrap_or(""))
                    .fetch_one(&mut *tx)
                    .await?;
                if n as u64 >= max_active {
                    return Err(Error::OverLimit { used: n });
                }
            }
            bind_new_job!(sqlx::query_as(&sql), j)
                .fetch_one(&mut *tx)
                .await?
        });
        self.notify_jobs().await;
        Ok(job)
    }

    /// The INSERT of a new job, `queued` and due at the database's now; its parameters
    /// are bound by `bind_new_job!`.
    fn insert_job_sql(&self) -> String {
        format!(
            "INSERT INTO jobs (id, api_key_id, model, training_file, validation_file, suffix, \
             spec, status, priority, run_at_ms, max_attempts, idempotency_key, created_at, \
             device_kind) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, 'queued', $8, {now}, $9, $10, $11, $12) RETURNING {}",
            job_cols!(),
            now = self.now_ms(),
        )
    }

    pub(crate) async fn insert_job_row(&self, j: &NewJob) -> Result<JobRecord> {
        let sql = self.insert_job_sql();
        Ok(on_pool!(self, p => bind_new_job!(sqlx::query_as(&sql), j)
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

    /// Deletes the fine-tuned model of the succeeded job `id` (of `owner`, when given):
    /// marks it so that it is no longer listed or served. The job, its result files and
    /// checkpoints stay. Returns the job as it is now, or `None` when there is no such
    /// job, it has no fine-tuned model, or the model is deleted already.
    pub async fn delete_fine_tuned_model(
        &self,
        id: &str,
        owner: Option<&str>,
    ) -> Result<Option<JobRecord>> {
        let owned = if owner.is_some() {
            " AND api_key_id = $3"
        } else {
            ""
        };
        let sql = format!(
            "UPDATE jobs SET model_deleted_at = $2 WHERE id = $1{owned} \
             AND fine_tuned_model IS NOT NULL AND model_deleted_at IS NULL RETURNING {}",
            job_cols!()
        );
        Ok(on_pool!(self, p => {
            let mut q = sqlx::query_as(&sql).bind(id).bind(now_secs());
            if let Some(o) = owner {
                q = q.bind(o);
            }
            q.fetch_optional(p).await?
        }))
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
        // A running job whose worker is gone would wait for a worker that never comes:
        // it is cancelled now.
        self.reap_stranded_jobs().await?;
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
    pub(crate) async fn notify_jobs(&self) {
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
    ///
    /// A hand-back is no failure: the attempt it ends is given back to the job's budget
    /// (`max_attempts` grows by one), so that pauses and restarts never use up the
    /// attempts that crashed workers are allowed.
    pub async fn release_job(&self, lease: &Lease, pause: bool) -> Result<JobRecord> {
        let sql = format!(
            "UPDATE jobs SET status = 'queued', lease_owner = NULL, lease_expires_at_ms = NULL, \
             paused_at = COALESCE(paused_at, $3), max_attempts = max_attempts + 1 \
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
        self.reap_stranded_jobs().await?;
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

    /// Ends the running jobs that no worker will take again, whose lease has expired:
    /// one on its last attempt fails, one whose cancel was asked is cancelled. Each gets
    /// an event saying why (and its followers their `done`). Every claim runs this first,
    /// and so does a cancel. Returns the jobs it ended.
    pub async fn reap_stranded_jobs(&self) -> Result<Vec<JobRecord>> {
        let now = self.now_ms();
        let sql = format!(
            "UPDATE jobs SET \
               status = CASE WHEN cancel_requested_at IS NULL THEN 'failed' ELSE 'cancelled' END, \
               error = CASE WHEN cancel_requested_at IS NULL THEN $2 ELSE NULL END, \
               finished_at = $1, lease_owner = NULL, lease_expires_at_ms = NULL, \
               fencing_token = fencing_token + 1 \
             WHERE status = 'running' AND COALESCE(lease_expires_at_ms, 0) <= {now} \
               AND (attempt >= max_attempts OR cancel_requested_at IS NOT NULL) \
             RETURNING {}",
            job_cols!()
        );
        let error = serde_json::json!({
            "code": "worker_lost",
            "message": "The job's worker stopped on its last attempt.",
            "param": null,
        })
        .to_string();
        let jobs: Vec<JobRecord> = write_tx!(self, tx => sqlx::query_as(&sql)
            .bind(now_secs())
            .bind(&error)
            .fetch_all(&mut *tx)
            .await?);
        for j in &jobs {
            let cancelled = j.status() == Some(JobStatus::Cancelled);
            self.append_event(&NewEvent {
                job_id: j.id.clone(),
                attempt: j.attempt,
                level: if cancelled { "info" } else { "error" }.into(),
                kind: "message".into(),
                message: if cancelled {
                    "Job cancelled (it had no live worker).".into()
                } else {
                    format!(
                        "The job failed: its worker stopped on attempt {} of {}, the last one.",
                        j.attempt, j.max_attempts
                    )
                },
                data: None,
            })
            .await?;
        }
        Ok(jobs)
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
}
