//! The `job_events` table: a job's event log, in order.

use super::*;

impl Store {
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

    /// The id of the job's newest event (0 when it has none).
    pub async fn last_event_id(&self, job_id: &str) -> Result<i64> {
        let sql = "SELECT COALESCE(MAX(id), 0) FROM job_events WHERE job_id = $1";
        let (id,): (i64,) = on_pool!(self, p => sqlx::query_as(sql)
            .bind(job_id)
            .fetch_one(p)
            .await?);
        Ok(id)
    }

    /// The job's newest events, newest first: at most `limit` with ids below `before`
    /// (all when `None`). One page from the database, however many events the job has.
    pub async fn list_events_newest(
        &self,
        job_id: &str,
        before: Option<i64>,
        limit: i64,
    ) -> Result<Vec<EventRecord>> {
        let sql = "SELECT id, job_id, attempt, level, type, message, data, created_at \
                   FROM job_events WHERE job_id = $1 AND id < $2 ORDER BY id DESC LIMIT $3";
        Ok(on_pool!(self, p => sqlx::query_as(sql)
            .bind(job_id)
            .bind(before.unwrap_or(i64::MAX))
            .bind(limit)
            .fetch_all(p)
            .await?))
    }

    // ---- checkpoints -------------------------------------------------------
}
