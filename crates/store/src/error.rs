use std::fmt;

/// Storage failures. `NotFound` and `Conflict` are expected outcomes that callers
/// map to API errors; the rest are internal.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("not found")]
    NotFound,
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("invalid argument: {0}")]
    Invalid(String),
    #[error("database: {0}")]
    Database(#[source] sqlx::Error),
    #[error("migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("blob store: {0}")]
    Blob(#[from] object_store::Error),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// A worker's fenced write found that its claim is no longer current: the job was
    /// re-claimed (a newer attempt holds it) or is no longer running. The worker must
    /// stop and write nothing more; its lease is not coming back.
    #[error("lease lost: job {job_id} attempt {attempt} is no longer current")]
    LeaseLost { job_id: String, attempt: i64 },
    /// An owner's cap (active jobs, stored bytes) would be passed; `used` is what the
    /// owner has now.
    #[error("over the owner's limit ({used} in use)")]
    OverLimit { used: i64 },
    #[error("corrupt row: {0}")]
    Corrupt(Box<dyn std::error::Error + Send + Sync>),
}

impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Self {
        match e {
            sqlx::Error::RowNotFound => Error::NotFound,
            sqlx::Error::Database(ref d) if d.is_unique_violation() => {
                Error::Conflict(d.message().to_string())
            }
            e => Error::Database(e),
        }
    }
}

impl Error {
    pub fn is_lease_lost(&self) -> bool {
        matches!(self, Error::LeaseLost { .. })
    }

    /// True when the database could not be reached (refused or dropped connections,
    /// no connection within the pool's timeout, a server shutting down or starting):
    /// a condition that passes, unlike a failed query.
    pub fn is_unavailable(&self) -> bool {
        match self {
            Error::Database(e) => match e {
                sqlx::Error::Io(_)
                | sqlx::Error::Tls(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::WorkerCrashed => true,
                // SQLSTATE class 08 (connection exception); 57P01-57P03 (admin
                // shutdown, crash shutdown, cannot connect now); 25P03 (the server
                // ended a session left idle in a transaction: a new one will do).
                sqlx::Error::Database(d) => d.code().is_some_and(|c| {
                    c.starts_with("08")
                        || matches!(c.as_ref(), "57P01" | "57P02" | "57P03" | "25P03")
                }),
                _ => false,
            },
            _ => false,
        }
    }

    /// True when SQLite reported `SQLITE_BUSY`/`SQLITE_LOCKED`: the one failure
    /// our transaction discipline is meant to make impossible, so tests look for it.
    pub fn is_busy(&self) -> bool {
        match self {
            Error::Database(sqlx::Error::Database(d)) => {
                matches!(d.code().as_deref(), Some("5") | Some("6") | Some("517"))
            }
            _ => false,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Keeps secrets out of logs when a database URL is printed.
pub struct Redacted<'a>(pub &'a str);

impl fmt::Display for Redacted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.0.find("://"), self.0.rfind('@')) {
            (Some(s), Some(at)) if at > s => write!(f, "{}://***{}", &self.0[..s], &self.0[at..]),
            _ => f.write_str(self.0),
        }
    }
}
