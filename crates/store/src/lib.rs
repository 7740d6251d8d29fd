//! loraforge's storage: the database (SQLite embedded, PostgreSQL for scale-out) and
//! the blob store for uploads and artifacts.
//!
//! [`Store`] is the one interface to the database. It holds either backend and runs
//! the same runtime-checked SQL on both wherever the dialects agree (numbered `$n`
//! parameters, `RETURNING`, integer timestamps, JSON kept as text), and branches only
//! where they must differ: connection set-up, migrations, how a write transaction
//! begins (`BEGIN IMMEDIATE` on SQLite, so that concurrent writers queue on the busy
//! timeout instead of failing with `SQLITE_BUSY`), the database clock expression,
//! and the job claim (`FOR UPDATE SKIP LOCKED` on PostgreSQL).
//!
//! [`BlobStore`] wraps `object_store`: a local directory by default, any S3-compatible
//! bucket by URL. Every write is atomic: a local upload is renamed into place, a
//! remote one becomes visible only when its multipart upload completes.

mod blob;
mod db;
mod error;
mod migrations;
mod model;
pub mod testing;

pub use blob::{BlobStore, Upload};
pub use db::{Backend, DeleteFile, Store, JOBS_CHANNEL, PG_IDLE_IN_TRANSACTION_TIMEOUT};
pub use error::{Error, Result};
pub use model::*;

/// Unix time in seconds, the unit of every `*_at` column (and of OpenAI's objects).
pub fn now_secs() -> i64 {
    chrono::Utc::now().timestamp()
}

/// Unix time in milliseconds, the unit of the `*_at_ms` lease columns.
pub fn now_millis() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// A new public id: `prefix` + 24 hex characters of a random UUID.
pub fn new_id(prefix: &str) -> String {
    let u = uuid::Uuid::new_v4().simple().to_string();
    format!("{prefix}{}", &u[..24])
}
