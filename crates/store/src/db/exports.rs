//! The `exports` table: models made from finished jobs' adapters, queued by the API and
//! built by workers, each held under a renewable lease so that a dead worker's export is
//! taken up by another.

use super::*;

const EXPORT_COLS: &str = "id, job_id, format, dtype, status, error, storage_key, bytes, sha256, \
                           worker_id, lease_expires_at_ms, created_at, finished_at, fencing_token";

impl Store {
    /// Adds an export; `false` (and nothing written) when the job already has one of
    /// the same format and dtype that has not failed.
    pub async fn insert_export(&self, e: &ExportRecord) -> Result<bool> {
        // The conflict is the partial unique index's: the target names it, so that a
        // clash of ids is still an error.
        let sql = format!(
            "INSERT INTO exports ({EXPORT_COLS}) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14) \
             ON CONFLICT (job_id, format, dtype) WHERE status <> 'failed' DO NOTHING"
        );
        Ok(on_pool!(self, p => sqlx::query(&sql)
            .bind(&e.id)
            .bind(&e.job_id)
            .bind(&e.format)
            .bind(&e.dtype)
            .bind(&e.status)
            .bind(&e.error)
            .bind(&e.storage_key)
            .bind(e.bytes)
            .bind(&e.sha256)
            .bind(&e.worker_id)
            .bind(e.lease_expires_at_ms)
            .bind(e.created_at)
            .bind(e.finished_at)
            .bind(e.fencing_token)
            .execute(p)
            .await?
            .rows_affected())
            == 1)
    }

    pub async fn get_export(&self, id: &str) -> Result<Option<ExportRecord>> {
        let sql = format!("SELECT {EXPORT_COLS} FROM exports WHERE id = $1");
        Ok(on_pool!(self, p => sqlx::query_as(&sql).bind(id).fetch_optional(p).await?))
    }

    /// A job's exports, newest first.
    pub async fn list_exports(&self, job_id: &str) -> Result<Vec<ExportRecord>> {
        let sql = format!(
            "SELECT {EXPORT_COLS} FROM exports WHERE job_id = $1 ORDER BY created_at DESC, id DESC"
        );
        Ok(on_pool!(self, p => sqlx::query_as(&sql).bind(job_id).fetch_all(p).await?))
    }

    /// Takes the oldest queued export, or a running one whose lease expired (its worker
    /// died), for `worker_id` with a lease of `lease` from now. The claim moves the
    /// export's fencing token on: the returned record's token is this claim's.
    pub async fn claim_export(
        &self,
        worker_id: &str,
        lease: Duration,
    ) -> Result<Option<ExportRecord>> {
        let lease_ms = lease_millis(lease)?;
        let now = self.now_ms();
        let pick = format!(
            "SELECT id AS claim_id FROM exports \
             WHERE status = 'queued' \
                OR (status = 'running' AND COALESCE(lease_expires_at_ms, 0) <= {now}) \
             ORDER BY created_at, id LIMIT 1"
        );
        let set = format!(
            "status = 'running', worker_id = $1, lease_expires_at_ms = {now} + $2, \
             fencing_token = fencing_token + 1"
        );
        let sql = match self.backend() {
            Backend::Sqlite => {
                format!("UPDATE exports SET {set} WHERE id = ({pick}) RETURNING {EXPORT_COLS}")
            }
            Backend::Postgres => format!(
                "WITH c AS ({pick} FOR UPDATE SKIP LOCKED) \
                 UPDATE exports SET {set} FROM c WHERE exports.id = c.claim_id \
                 RETURNING {}",
                EXPORT_COLS
                    .split(", ")
                    .map(|c| format!("exports.{c}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        Ok(write_tx!(self, tx => sqlx::query_as(&sql)
            .bind(worker_id)
            .bind(lease_ms)
            .fetch_optional(&mut *tx)
            .await?))
    }

    /// Extends the lease of the claim `token` on a running export; `false` when that
    /// claim no longer holds it (taken over, handed back, or deleted).
    pub async fn renew_export(&self, id: &str, token: i64, lease: Duration) -> Result<bool> {
        let sql = format!(
            "UPDATE exports SET lease_expires_at_ms = {} + $3 \
             WHERE id = $1 AND fencing_token = $2 AND status = 'running'",
            self.now_ms()
        );
        let n = on_pool!(self, p => sqlx::query(&sql)
            .bind(id)
            .bind(token)
            .bind(lease_millis(lease)?)
            .execute(p)
            .await?
            .rows_affected());
        Ok(n == 1)
    }

    /// Ends the claim `token`'s running export; `false` (and nothing written) when that
    /// claim no longer holds it.
    pub async fn finish_export(
        &self,
        id: &str,
        token: i64,
        outcome: &ExportOutcome,
    ) -> Result<bool> {
        let (status, error, key, bytes, sha) = match outcome {
            ExportOutcome::Succeeded {
                storage_key,
                bytes,
                sha256,
            } => (
                "succeeded",
                None,
                Some(storage_key),
                Some(*bytes),
                Some(sha256),
            ),
            ExportOutcome::Failed { error } => ("failed", Some(error), None, None, None),
        };
        let n = on_pool!(self, p => sqlx::query(
            "UPDATE exports SET status = $3, error = $4, storage_key = $5, bytes = $6, \
             sha256 = $7, finished_at = $8, lease_expires_at_ms = NULL \
             WHERE id = $1 AND fencing_token = $2 AND status = 'running'",
        )
        .bind(id)
        .bind(token)
        .bind(status)
        .bind(error)
        .bind(key)
        .bind(bytes)
        .bind(sha)
        .bind(now_secs())
        .execute(p)
        .await?
        .rows_affected());
        Ok(n == 1)
    }

    /// Puts the claim `token`'s running export back in the queue (its worker is shutting
    /// down), for the next worker to build; `false` when that claim no longer holds it.
    pub async fn release_export(&self, id: &str, token: i64) -> Result<bool> {
        let n = on_pool!(self, p => sqlx::query(
            "UPDATE exports SET status = 'queued', worker_id = NULL, lease_expires_at_ms = NULL \
             WHERE id = $1 AND fencing_token = $2 AND status = 'running'",
        )
        .bind(id)
        .bind(token)
        .execute(p)
        .await?
        .rows_affected());
        Ok(n == 1)
    }

    /// Removes an export's row, returning it (its blob is the caller's to remove).
    pub async fn delete_export(&self, id: &str) -> Result<Option<ExportRecord>> {
        let sql = format!("DELETE FROM exports WHERE id = $1 RETURNING {EXPORT_COLS}");
        Ok(on_pool!(self, p => sqlx::query_as(&sql).bind(id).fetch_optional(p).await?))
    }
}
