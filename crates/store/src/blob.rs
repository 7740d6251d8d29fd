//! Blob storage for uploads and artifacts, over `object_store`.

use crate::{Error, Result};
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, WriteMultipart};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where blobs live: a local directory (default) or an object store. Either way,
/// uploads are first written to a local temp directory, then committed atomically.
#[derive(Clone)]
pub struct BlobStore {
    store: Arc<dyn ObjectStore>,
    /// Set for the local backend: commits are a rename from the temp directory,
    /// which must be on the same filesystem.
    local_root: Option<Arc<LocalFileSystem>>,
    tmp_dir: PathBuf,
    description: String,
}

impl std::fmt::Debug for BlobStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.description)
    }
}

/// A file being uploaded: a named temp file that disappears if it is dropped
/// before [`BlobStore::commit`], whatever the reason (error, cap, client gone).
#[derive(Debug)]
pub struct Upload {
    file: tempfile::NamedTempFile,
}

impl Upload {
    pub fn path(&self) -> &Path {
        self.file.path()
    }

    /// A second handle on the temp file, for writing from async code.
    pub fn handle(&self) -> std::io::Result<std::fs::File> {
        self.file.as_file().try_clone()
    }
}

const MULTIPART_CHUNK: usize = 8 << 20;

impl BlobStore {
    /// Blobs under `root`, temp files under `tmp_dir`; both are created if missing
    /// and should be on one filesystem so a commit is a rename.
    pub fn local(root: &Path, tmp_dir: &Path) -> Result<BlobStore> {
        std::fs::create_dir_all(root)?;
        std::fs::create_dir_all(tmp_dir)?;
        let fs = Arc::new(LocalFileSystem::new_with_prefix(root)?);
        Ok(BlobStore {
            store: fs.clone(),
            local_root: Some(fs),
            tmp_dir: tmp_dir.to_path_buf(),
            description: format!("local:{}", root.display()),
        })
    }

    /// A blob store from a URL: `file:///abs/dir`, or `s3://bucket[/prefix]` with
    /// credentials, region and endpoint from the usual `AWS_*` environment variables
    /// (`AWS_ENDPOINT` for S3-compatible stores such as MinIO).
    pub fn from_url(url: &str, tmp_dir: &Path) -> Result<BlobStore> {
        if let Some(path) = url.strip_prefix("file://") {
            return Self::local(Path::new(path), tmp_dir);
        }
        let Some(rest) = url.strip_prefix("s3://") else {
            return Err(Error::Invalid(format!(
                "unsupported storage URL {url:?}: expected file:///… or s3://bucket/prefix"
            )));
        };
        std::fs::create_dir_all(tmp_dir)?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let s3 = object_store::aws::AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .build()?;
        let store: Arc<dyn ObjectStore> = if prefix.trim_matches('/').is_empty() {
            Arc::new(s3)
        } else {
            Arc::new(object_store::prefix::PrefixStore::new(
                s3,
                prefix.trim_matches('/'),
            ))
        };
        Ok(BlobStore {
            store,
            local_root: None,
            tmp_dir: tmp_dir.to_path_buf(),
            description: format!("s3://{bucket}/{prefix}"),
        })
    }

    pub fn tmp_dir(&self) -> &Path {
        &self.tmp_dir
    }

    /// Deletes every file in the temp directory: uploads cut short by a crash. Call
    /// at start-up, before serving (the temp directory belongs to one process).
    pub fn sweep_tmp(&self) -> std::io::Result<usize> {
        let mut n = 0;
        for entry in std::fs::read_dir(&self.tmp_dir)?.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_file()) {
                std::fs::remove_file(entry.path())?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// A fresh temp file for an incoming upload.
    pub fn new_upload(&self) -> Result<Upload> {
        let mut b = tempfile::Builder::new();
        b.prefix("upload-");
        // A stored blob gets the mode any created file gets (0666 less the umask), not
        // the temp file's private 0600.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            b.permissions(std::fs::Permissions::from_mode(0o666));
        }
        let file = b.tempfile_in(&self.tmp_dir)?;
        Ok(Upload { file })
    }

    fn key(key: &str) -> Result<ObjectPath> {
        ObjectPath::parse(key).map_err(|e| Error::Invalid(format!("blob key {key:?}: {e}")))
    }

    /// Makes the upload visible under `key`, atomically: locally by fsync + rename,
    /// remotely by a multipart upload that only exists once completed.
    pub async fn commit(&self, upload: Upload, key: &str) -> Result<()> {
        let path = Self::key(key)?;
        if let Some(fs) = &self.local_root {
            let dest = fs.path_to_filesystem(&path)?;
            tokio::task::spawn_blocking(move || -> std::io::Result<()> {
                upload.file.as_file().sync_all()?;
                let parent = dest.parent().expect("blob path has a parent");
                std::fs::create_dir_all(parent)?;
                upload.file.persist(&dest).map_err(|e| e.error)?;
                // Make the rename itself durable.
                std::fs::File::open(parent)?.sync_all()?;
                Ok(())
            })
            .await
            .map_err(|e| Error::Io(std::io::Error::other(e)))??;
            return Ok(());
        }
        let mut writer = WriteMultipart::new(self.store.put_multipart(&path).await?);
        let mut file = std::fs::File::open(upload.path())?;
        let result: Result<()> = async {
            loop {
                let mut buf = vec![0u8; MULTIPART_CHUNK];
                let (n, b) = tokio::task::spawn_blocking(move || {
                    let n = file.read(&mut buf);
                    (n, (buf, file))
                })
                .await
                .map_err(|e| Error::Io(std::io::Error::other(e)))?;
                let (mut buf, f) = b;
                file = f;
                let n = n?;
                if n == 0 {
                    break;
                }
                buf.truncate(n);
                writer.wait_for_capacity(4).await?;
                writer.put(Bytes::from(buf));
            }
            Ok(())
        }
        .await;
        match result {
            Ok(()) => {
                writer.finish().await?;
                Ok(())
            }
            Err(e) => {
                let _ = writer.abort().await;
                Err(e)
            }
        }
    }

    /// The blob's size and a stream of its bytes.
    pub async fn get(
        &self,
        key: &str,
    ) -> Result<(u64, BoxStream<'static, std::result::Result<Bytes, Error>>)> {
        let got = self
            .store
            .get(&Self::key(key)?)
            .await
            .map_err(|e| match e {
                object_store::Error::NotFound { .. } => Error::NotFound,
                e => Error::Blob(e),
            })?;
        let size = got.meta.size;
        Ok((
            size,
            got.into_stream().map(|r| r.map_err(Error::Blob)).boxed(),
        ))
    }

    /// Whether a blob is stored under `key`.
    pub async fn exists(&self, key: &str) -> Result<bool> {
        match self.store.head(&Self::key(key)?).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(Error::Blob(e)),
        }
    }

    /// Stores `bytes` under `key` (through a temp upload and [`BlobStore::commit`]), for
    /// what is small enough to be in memory already (adapters, zips, CSVs).
    pub async fn put(&self, key: &str, bytes: &[u8]) -> Result<()> {
        let up = self.new_upload()?;
        {
            use std::io::Write;
            let mut f = up.handle()?;
            f.write_all(bytes)?;
            f.flush()?;
        }
        self.commit(up, key).await
    }

    /// A whole blob in memory, for what is small enough to be (adapters, checkpoints,
    /// label checks of bounded files).
    pub async fn read(&self, key: &str) -> Result<Vec<u8>> {
        let (size, mut stream) = self.get(key).await?;
        let mut bytes = Vec::with_capacity(size as usize);
        while let Some(chunk) = stream.next().await {
            bytes.extend_from_slice(&chunk?);
        }
        Ok(bytes)
    }

    /// Deletes a blob; a missing blob is not an error.
    pub async fn delete(&self, key: &str) -> Result<()> {
        match self.store.delete(&Self::key(key)?).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(Error::Blob(e)),
        }
    }
}
