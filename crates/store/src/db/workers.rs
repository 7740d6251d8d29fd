//! The `workers` table: which workers are up, on what device, with how much memory.

use super::*;

impl Store {
    /// Records (or refreshes) a worker's report; `seen_at_ms` is the database's clock.
    pub async fn report_worker(
        &self,
        id: &str,
        device: &str,
        device_kind: &str,
        total_bytes: i64,
        free_bytes: i64,
    ) -> Result<()> {
        let sql = format!(
            "INSERT INTO workers (id, device, device_kind, total_bytes, free_bytes, seen_at_ms) \
             VALUES ($1, $2, $3, $4, $5, {now}) \
             ON CONFLICT (id) DO UPDATE SET device = excluded.device, \
             device_kind = excluded.device_kind, total_bytes = excluded.total_bytes, \
             free_bytes = excluded.free_bytes, seen_at_ms = excluded.seen_at_ms",
            now = self.now_ms()
        );
        on_pool!(self, p => sqlx::query(&sql)
            .bind(id)
            .bind(device)
            .bind(device_kind)
            .bind(total_bytes)
            .bind(free_bytes)
            .execute(p)
            .await
            .map(drop)?);
        Ok(())
    }

    /// The workers seen within the last `within`, by id.
    pub async fn live_workers(&self, within: Duration) -> Result<Vec<WorkerRecord>> {
        let sql = format!(
            "SELECT id, device, device_kind, total_bytes, free_bytes, seen_at_ms FROM workers \
             WHERE seen_at_ms >= {now} - $1 ORDER BY id",
            now = self.now_ms()
        );
        let within = i64::try_from(within.as_millis()).unwrap_or(i64::MAX);
        Ok(on_pool!(self, p => sqlx::query_as(&sql).bind(within).fetch_all(p).await?))
    }

    /// Forgets a worker (it is shutting down).
    pub async fn remove_worker(&self, id: &str) -> Result<()> {
        on_pool!(self, p => sqlx::query("DELETE FROM workers WHERE id = $1")
            .bind(id)
            .execute(p)
            .await
            .map(drop)?);
        Ok(())
    }
}
