//! The `checkpoints` table: a job's saved steps, recorded under its lease.

use super::*;

impl Store {
    /// Inserts a checkpoint row without a fence (tools and tests; workers use
    /// [`Store::record_checkpoint`]).
    pub async fn insert_checkpoint(&self, c: &CheckpointRecord) -> Result<()> {
        on_pool!(self, p => sqlx::query(
            "INSERT INTO checkpoints (id, job_id, attempt, step, storage_key, metrics, created_at, bytes) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
        )
        .bind(&c.id)
        .bind(&c.job_id)
        .bind(c.attempt)
        .bind(c.step)
        .bind(&c.storage_key)
        .bind(&c.metrics)
        .bind(c.created_at)
        .bind(c.bytes)
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
                "INSERT INTO checkpoints (id, job_id, attempt, step, storage_key, metrics, created_at, bytes) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            )
            .bind(&c.id)
            .bind(&c.job_id)
            .bind(c.attempt)
            .bind(c.step)
            .bind(&c.storage_key)
            .bind(&c.metrics)
            .bind(c.created_at)
            .bind(c.bytes)
            .execute(&mut *tx)
            .await
            .map(drop)?
        });
        Ok(())
    }

    /// A job's checkpoints, newest step first.
    pub async fn list_checkpoints(&self, job_id: &str) -> Result<Vec<CheckpointRecord>> {
        let sql = "SELECT id, job_id, attempt, step, storage_key, metrics, created_at, bytes \
                   FROM checkpoints WHERE job_id = $1 ORDER BY step DESC";
        Ok(on_pool!(self, p => sqlx::query_as(sql).bind(job_id).fetch_all(p).await?))
    }

    /// Removes a checkpoint's row (its blobs are the caller's to remove first).
    pub async fn delete_checkpoint(&self, id: &str) -> Result<()> {
        on_pool!(self, p => sqlx::query("DELETE FROM checkpoints WHERE id = $1")
            .bind(id)
            .execute(p)
            .await
            .map(drop)?);
        Ok(())
    }

    // ---- api keys ----------------------------------------------------------
    //
    // Only a token's sha256 (hex) and a short display prefix are stored; lookups are by
    // hash, so the token itself never reaches the database or its logs.
}
