//! Migrations are embedded in the binary (a deployed server has no source tree), one
//! list per backend because the DDL differs; `migrations/<backend>/` is the source.

use futures::future::BoxFuture;
use sqlx::migrate::{Migration, MigrationSource, MigrationType, Migrator};
use std::borrow::Cow;

type Embedded = &'static [(i64, &'static str, &'static str)];

const SQLITE: Embedded = &[
    (
        1,
        "init",
        include_str!("../../../migrations/sqlite/0001_init.sql"),
    ),
    (
        2,
        "job device kind",
        include_str!("../../../migrations/sqlite/0002_job_device_kind.sql"),
    ),
    (
        3,
        "job pause",
        include_str!("../../../migrations/sqlite/0003_job_pause.sql"),
    ),
    (
        4,
        "api key owners",
        include_str!("../../../migrations/sqlite/0004_api_key_owners.sql"),
    ),
    (
        5,
        "checkpoint bytes",
        include_str!("../../../migrations/sqlite/0005_checkpoint_bytes.sql"),
    ),
    (
        6,
        "workers",
        include_str!("../../../migrations/sqlite/0006_workers.sql"),
    ),
    (
        7,
        "model deleted",
        include_str!("../../../migrations/sqlite/0007_model_deleted.sql"),
    ),
    (
        8,
        "exports",
        include_str!("../../../migrations/sqlite/0008_exports.sql"),
    ),
    (
        9,
        "export claims",
        include_str!("../../../migrations/sqlite/0009_export_claims.sql"),
    ),
];

const POSTGRES: Embedded = &[
    (
        1,
        "init",
        include_str!("../../../migrations/postgres/0001_init.sql"),
    ),
    (
        2,
        "job device kind",
        include_str!("../../../migrations/postgres/0002_job_device_kind.sql"),
    ),
    (
        3,
        "job pause",
        include_str!("../../../migrations/postgres/0003_job_pause.sql"),
    ),
    (
        4,
        "api key owners",
        include_str!("../../../migrations/postgres/0004_api_key_owners.sql"),
    ),
    (
        5,
        "checkpoint bytes",
        include_str!("../../../migrations/postgres/0005_checkpoint_bytes.sql"),
    ),
    (
        6,
        "workers",
        include_str!("../../../migrations/postgres/0006_workers.sql"),
    ),
    (
        7,
        "model deleted",
        include_str!("../../../migrations/postgres/0007_model_deleted.sql"),
    ),
    (
        8,
        "exports",
        include_str!("../../../migrations/postgres/0008_exports.sql"),
    ),
    (
        9,
        "export claims",
        include_str!("../../../migrations/postgres/0009_export_claims.sql"),
    ),
];

#[derive(Debug)]
struct Source(Embedded);

impl MigrationSource<'static> for Source {
    fn resolve(
        self,
    ) -> BoxFuture<'static, Result<Vec<Migration>, Box<dyn std::error::Error + Send + Sync>>> {
        Box::pin(async move {
            Ok(self
                .0
                .iter()
                .map(|(version, desc, sql)| {
                    Migration::new(
                        *version,
                        Cow::Borrowed(*desc),
                        MigrationType::Simple,
                        Cow::Borrowed(*sql),
                        false,
                    )
                })
                .collect())
        })
    }
}

pub(crate) async fn sqlite() -> Result<Migrator, sqlx::migrate::MigrateError> {
    Migrator::new(Source(SQLITE)).await
}

pub(crate) async fn postgres() -> Result<Migrator, sqlx::migrate::MigrateError> {
    Migrator::new(Source(POSTGRES)).await
}
