//! Test support shared by this crate's contract suite and the server's end-to-end
//! tests: a throw-away PostgreSQL database per test, made from an admin URL
//! (`TEST_DATABASE_URL`) and dropped again when the guard goes out of scope; and a
//! stalled transaction, as a worker frozen mid-write leaves behind; and what PostgreSQL
//! reports of another process's sessions, so a test can tell where that process stopped.

use sqlx::Connection;

/// A uniquely named database, dropped (with `FORCE`) on drop.
#[derive(Debug)]
pub struct TempPgDatabase {
    admin_url: String,
    name: String,
    url: String,
}

impl TempPgDatabase {
    /// Creates `loraforge_test_<random>` on the server of `admin_url`.
    pub async fn create(admin_url: &str) -> crate::Result<TempPgDatabase> {
        let name = format!("loraforge_test_{}", uuid::Uuid::new_v4().simple());
        let mut conn = sqlx::PgConnection::connect(admin_url).await?;
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await?;
        conn.close().await?;
        Ok(TempPgDatabase {
            admin_url: admin_url.to_string(),
            url: with_database(admin_url, &name),
            name,
        })
    }

    /// The URL of the new database.
    pub fn url(&self) -> &str {
        &self.url
    }
}

impl Drop for TempPgDatabase {
    fn drop(&mut self) {
        // Drop runs outside any async context we could borrow, so the clean-up gets
        // its own thread and runtime.
        let admin = self.admin_url.clone();
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async {
                let mut conn = sqlx::PgConnection::connect(&admin).await.ok()?;
                sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .execute(&mut conn)
                    .await
                    .ok()
            })
        })
        .join();
    }
}

/// `url` with its database name replaced by `name` (query parameters kept).
pub fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let host_part = match base[scheme_end..].find('/') {
        Some(i) => &base[..scheme_end + i],
        None => base,
    };
    match query {
        Some(q) => format!("{host_part}/{name}?{q}"),
        None => format!("{host_part}/{name}"),
    }
}

/// A transaction on one of a store's own PostgreSQL sessions that has locked a job's row
/// and then gone quiet, as a worker frozen in the middle of a write leaves it.
pub struct StalledTransaction(sqlx::Transaction<'static, sqlx::Postgres>);

impl StalledTransaction {
    /// Locks job `id`'s row in a new transaction of `store`'s and leaves it open.
    /// PostgreSQL only (SQLite has no row locks to hold).
    pub async fn lock_job(store: &crate::Store, id: &str) -> crate::Result<StalledTransaction> {
        let pool = store.pg_pool().ok_or_else(|| {
            crate::Error::Invalid("a stalled transaction needs PostgreSQL".into())
        })?;
        let mut tx = pool.begin().await?;
        let locked = sqlx::query("SELECT id FROM jobs WHERE id = $1 FOR UPDATE")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
        if locked.is_none() {
            return Err(crate::Error::NotFound);
        }
        Ok(StalledTransaction(tx))
    }

    /// Wakes up and carries on: one more statement, then commit.
    pub async fn resume(mut self) -> crate::Result<()> {
        sqlx::query("SELECT 1").execute(&mut *self.0).await?;
        self.0.commit().await?;
        Ok(())
    }
}

/// One PostgreSQL session as `pg_stat_activity` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub pid: i32,
    /// `active`, `idle`, `idle in transaction`, …
    pub state: String,
    /// Waiting for a lock another session holds (a row lock, say).
    pub waiting_on_lock: bool,
}

impl Session {
    /// Between transactions, with no statement running.
    pub fn is_idle(&self) -> bool {
        self.state == "idle"
    }

    /// Inside a transaction, waiting for its client's next statement.
    pub fn is_idle_in_transaction(&self) -> bool {
        self.state == "idle in transaction"
    }
}

/// The sessions on `store`'s database whose `application_name` is `app` (a process can
/// name its sessions with `?application_name=` in its database URL).
pub async fn sessions_named(store: &crate::Store, app: &str) -> crate::Result<Vec<Session>> {
    let pool = store
        .pg_pool()
        .ok_or_else(|| crate::Error::Invalid("sessions are PostgreSQL's".into()))?;
    let rows: Vec<(i32, Option<String>, Option<String>)> = sqlx::query_as(
        "SELECT pid, state, wait_event_type FROM pg_stat_activity \
         WHERE application_name = $1 AND datname = current_database() ORDER BY pid",
    )
    .bind(app)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(pid, state, wait)| Session {
            pid,
            state: state.unwrap_or_default(),
            waiting_on_lock: wait.as_deref() == Some("Lock"),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    #[test]
    fn replaces_the_database_name() {
        use super::with_database as w;
        assert_eq!(w("postgres://u@h:5432/test", "x"), "postgres://u@h:5432/x");
        assert_eq!(w("postgres://u@h:5432", "x"), "postgres://u@h:5432/x");
        assert_eq!(
            w("postgres://h/db?sslmode=disable", "x"),
            "postgres://h/x?sslmode=disable"
        );
    }
}
