//! The `api_keys` table: hashes of the keys, never the keys.

use super::*;

impl Store {
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

    /// Whether the key `id` exists and is not revoked.
    pub async fn api_key_is_live(&self, id: &str) -> Result<bool> {
        let sql = "SELECT COUNT(*) FROM api_keys WHERE id = $1 AND revoked_at IS NULL";
        let n: i64 = on_pool!(self, p => sqlx::query_scalar(sql).bind(id).fetch_one(p).await?);
        Ok(n > 0)
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
