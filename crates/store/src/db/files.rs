//! The `files` table: uploaded datasets and result files, and what each owner stores.

use super::*;

/// What an owner (`$1`, '' for the keyless owner) keeps: its files (uploads and result
/// files) and its jobs' checkpoints.
const STORED_BYTES: &str = "SELECT CAST(\
      COALESCE((SELECT SUM(bytes) FROM files WHERE COALESCE(api_key_id, '') = $1), 0) \
    + COALESCE((SELECT SUM(c.bytes) FROM checkpoints c JOIN jobs j ON j.id = c.job_id \
                WHERE COALESCE(j.api_key_id, '') = $1), 0) AS BIGINT)";

impl Store {
    pub async fn insert_file(&self, f: &NewFile) -> Result<FileRecord> {
        self.insert_file_within(f, 0).await
    }

    /// Inserts a file unless its owner's files would then hold more than `max_bytes`
    /// bytes (0: no cap): the sum and the insert are one transaction, under a lock that
    /// concurrent uploads of the same owner wait for. [`Error::OverLimit`] carries the
    /// bytes the owner stores.
    pub async fn insert_file_within(&self, f: &NewFile, max_bytes: u64) -> Result<FileRecord> {
        let pg = self.backend() == Backend::Postgres;
        let sum = STORED_BYTES;
        let sql = concat!(
            "INSERT INTO files (",
            file_cols!(),
            ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) RETURNING ",
            file_cols!()
        );
        let owner = f.api_key_id.as_deref();
        Ok(write_tx!(self, tx => {
            if pg {
                sqlx::query(PG_OWNER_LOCK)
                    .bind(owner_lock_key(owner))
                    .execute(&mut *tx)
                    .await?;
            }
            if max_bytes > 0 {
                let used: i64 = sqlx::query_scalar(sum)
                    .bind(owner.unwrap_or(""))
                    .fetch_one(&mut *tx)
                    .await?;
                if used.max(0) as u64 + f.bytes.max(0) as u64 > max_bytes {
                    return Err(Error::OverLimit { used });
                }
            }
            sqlx::query_as(sql)
                .bind(&f.id)
                .bind(&f.purpose)
                .bind(&f.filename)
                .bind(f.bytes)
                .bind(&f.sha256)
                .bind(&f.storage_key)
                .bind(&f.status)
                .bind(&f.status_details)
                .bind(&f.format)
                .bind(f.examples)
                .bind(&f.errors)
                .bind(f.created_at)
                .bind(&f.api_key_id)
                .fetch_one(&mut *tx)
                .await?
        }))
    }

    pub async fn get_file(&self, id: &str) -> Result<Option<FileRecord>> {
        self.get_file_of(id, None).await
    }

    /// The file `id` if `owner` owns it (`None`: whoever does). Another owner's file
    /// reads as absent, exactly like one that does not exist.
    pub async fn get_file_of(&self, id: &str, owner: Option<&str>) -> Result<Option<FileRecord>> {
        self.row_of(concat!("SELECT ", file_cols!(), " FROM files"), id, owner)
            .await
    }

    /// Bytes of the files one owner stores (`None`: the rows made without a key).
    pub async fn stored_bytes(&self, owner: Option<&str>) -> Result<i64> {
        Ok(
            on_pool!(self, p => sqlx::query_scalar::<_, i64>(STORED_BYTES)
            .bind(owner.unwrap_or(""))
            .fetch_one(p)
            .await?),
        )
    }

    /// A page of files, newest first by default. `after` must name an existing file
    /// (the last item of the previous page), else [`Error::Invalid`].
    pub async fn list_files(&self, q: &ListFiles) -> Result<Page<FileRecord>> {
        let limit = q.limit.max(1);
        let cursor = match &q.after {
            Some(after) => Some(
                self.cursor_seq(Table::Files, after, q.owner.as_deref())
                    .await?,
            ),
            None => None,
        };
        // Every clause is fixed text and every value a bound parameter; only the
        // shape of the statement varies.
        let (cmp, dir) = match q.order {
            Order::Asc => (">", "ASC"),
            Order::Desc => ("<", "DESC"),
        };
        let mut sql = format!("SELECT {} FROM files WHERE 1 = 1", file_cols!());
        let mut n = 0;
        if cursor.is_some() {
            n += 1;
            sql.push_str(&format!(" AND seq {cmp} ${n}"));
        }
        if q.purpose.is_some() {
            n += 1;
            sql.push_str(&format!(" AND purpose = ${n}"));
        }
        if q.owner.is_some() {
            n += 1;
            sql.push_str(&format!(" AND api_key_id = ${n}"));
        }
        n += 1;
        sql.push_str(&format!(" ORDER BY seq {dir} LIMIT ${n}"));
        let mut rows: Vec<FileRecord> = on_pool!(self, p => {
            let mut query = sqlx::query_as(&sql);
            if let Some(c) = cursor {
                query = query.bind(c);
            }
            if let Some(purpose) = &q.purpose {
                query = query.bind(purpose);
            }
            if let Some(owner) = &q.owner {
                query = query.bind(owner);
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

    /// Deletes the file row unless a queued or running job uses the file. The check
    /// and the delete share one write transaction, so a job created concurrently
    /// (which reads the file row in its own write transaction) cannot slip between.
    /// The caller deletes the blob afterwards: an orphan blob is harmless, a row
    /// without its blob is not.
    pub async fn delete_file(&self, id: &str) -> Result<DeleteFile> {
        self.delete_file_of(id, None).await
    }

    /// [`Store::delete_file`] for `owner` (`None`: any owner): another owner's file is
    /// [`DeleteFile::NotFound`].
    pub async fn delete_file_of(&self, id: &str, owner: Option<&str>) -> Result<DeleteFile> {
        let mut get = concat!("SELECT ", file_cols!(), " FROM files WHERE id = $1").to_string();
        if owner.is_some() {
            get.push_str(" AND api_key_id = $2");
        }
        if self.backend() == Backend::Postgres {
            get.push_str(" FOR UPDATE");
        }
        let in_use = "SELECT id FROM jobs WHERE (training_file = $1 OR validation_file = $1) \
                      AND status IN ('queued', 'running') ORDER BY seq LIMIT 1";
        Ok(write_tx!(self, tx => {
            let mut q = sqlx::query_as(&get).bind(id);
            if let Some(o) = owner {
                q = q.bind(o);
            }
            let file: Option<FileRecord> = q.fetch_optional(&mut *tx).await?;
            match file {
                None => DeleteFile::NotFound,
                Some(file) => {
                    let job: Option<(String,)> =
                        sqlx::query_as(in_use).bind(id).fetch_optional(&mut *tx).await?;
                    match job {
                        Some((job_id,)) => DeleteFile::InUse(job_id),
                        None => {
                            sqlx::query("DELETE FROM files WHERE id = $1")
                                .bind(id)
                                .execute(&mut *tx)
                                .await?;
                            DeleteFile::Deleted(Box::new(file))
                        }
                    }
                }
            }
        }))
    }

    // ---- jobs --------------------------------------------------------------
}
