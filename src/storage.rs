//! The recording store: object_store behind create-only puts. The only module that talks to
//! object_store, and the one place where storage keys are made.

use std::sync::Arc;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjPath;
use object_store::{GetOptions, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};

/// A recording-store failure. Always fatal for the session that hit it (fail closed).
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("recording store: object {0} already exists (stores are write-once)")]
    AlreadyExists(String),
    #[error("recording store: object {0} not found")]
    NotFound(String),
    #[error("recording store: {0}")]
    Backend(String),
}

fn backend(e: object_store::Error) -> StorageError {
    StorageError::Backend(e.to_string())
}

/// One stored object's name and size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    pub key: String,
    pub size: u64,
}

/// The recording store. Cheap to clone.
#[derive(Clone)]
pub struct RecordingStore {
    inner: Arc<dyn ObjectStore>,
    /// The root directory of the local backend, whose files are made read-only once written.
    local_root: Option<std::path::PathBuf>,
}

impl RecordingStore {
    /// The local-filesystem backend rooted at `dir` (created if missing). Every write is
    /// fsync'd (file and directory) before it counts as stored.
    pub fn local(dir: &std::path::Path) -> Result<RecordingStore, StorageError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| StorageError::Backend(format!("create {}: {e}", dir.display())))?;
        let fs = LocalFileSystem::new_with_prefix(dir)
            .map_err(backend)?
            .with_fsync(true);
        Ok(RecordingStore {
            inner: Arc::new(fs),
            local_root: Some(dir.to_path_buf()),
        })
    }

    /// The store the config names: the local directory, or S3 with Object Lock headers.
    pub fn from_config(cfg: &crate::config::Config) -> Result<RecordingStore, StorageError> {
        match &cfg.s3 {
            None => RecordingStore::local(&cfg.storage_dir),
            Some(s3) => RecordingStore::s3(s3),
        }
    }

    /// S3 through object_store: credentials from the usual environment (AWS_ACCESS_KEY_ID,
    /// AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, instance metadata). Every put carries an
    /// `x-amz-checksum-sha256` (locked puts need a checksum) and, unless `object_lock = "none"`,
    /// `x-amz-object-lock-mode` with a retain-until date `retention_days` after the store is
    /// opened (object_store sends lock headers only client-wide). The bucket's default
    /// retention covers every object as well; `check_object_lock` proves the bucket has it.
    pub fn s3(c: &crate::config::S3Config) -> Result<RecordingStore, StorageError> {
        use object_store::aws::{AmazonS3Builder, Checksum};
        use object_store::ClientOptions;
        // reqwest is built without a default crypto provider: use ring, as everywhere else.
        let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
        let mut headers = http::HeaderMap::new();
        let mode = match c.object_lock {
            crate::config::ObjectLock::Compliance => Some("COMPLIANCE"),
            crate::config::ObjectLock::Governance => Some("GOVERNANCE"),
            crate::config::ObjectLock::None => None,
        };
        // S3 wants Content-MD5 or x-amz-sdk-checksum-algorithm on locked puts; object_store
        // sends x-amz-checksum-sha256 but not the algorithm header, so add it client-wide.
        headers.insert(
            "x-amz-sdk-checksum-algorithm",
            http::HeaderValue::from_static("SHA256"),
        );
        if let Some(mode) = mode {
            let until = crate::clock::now() + chrono::Duration::days(i64::from(c.retention_days));
            let until = until.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
            let bad = |e: String| StorageError::Backend(format!("lock header: {e}"));
            headers.insert(
                "x-amz-object-lock-mode",
                http::HeaderValue::from_str(mode).map_err(|e| bad(e.to_string()))?,
            );
            headers.insert(
                "x-amz-object-lock-retain-until-date",
                http::HeaderValue::from_str(&until).map_err(|e| bad(e.to_string()))?,
            );
        }
        // Fail fast: the recorder's own retry loop and storage_grace decide how long an outage
        // may last, so object_store must not sit on a request for minutes.
        let mut options = ClientOptions::new()
            .with_default_headers(headers)
            .with_connect_timeout(std::time::Duration::from_secs(2))
            .with_timeout(std::time::Duration::from_secs(10));
        let mut b = AmazonS3Builder::from_env()
            .with_bucket_name(&c.bucket)
            .with_region(&c.region)
            .with_checksum_algorithm(Checksum::SHA256)
            .with_retry(object_store::RetryConfig {
                max_retries: 2,
                retry_timeout: std::time::Duration::from_secs(3),
                ..Default::default()
            });
        if let Some(e) = &c.endpoint {
            b = b.with_endpoint(e);
            if e.starts_with("http://") {
                options = options.with_allow_http(true);
            }
        }
        let s3 = b.with_client_options(options).build().map_err(backend)?;
        let inner: Arc<dyn ObjectStore> = if c.prefix.is_empty() {
            Arc::new(s3)
        } else {
            Arc::new(object_store::prefix::PrefixStore::new(
                s3,
                c.prefix.as_str(),
            ))
        };
        Ok(RecordingStore {
            inner,
            local_root: None,
        })
    }

    /// Proves the bucket enforces Object Lock: a put with lock headers is refused by S3 on a
    /// bucket without Object Lock. The probe object (a few bytes) stays, locked, under
    /// `.breakglass/lock-probe/`.
    pub async fn check_object_lock(&self) -> Result<(), StorageError> {
        let key = format!(".breakglass/lock-probe/{}", uuid::Uuid::new_v4());
        self.put_new(&key, Bytes::from_static(b"object lock probe"))
            .await
            .map(|_| ())
            .map_err(|e| {
                StorageError::Backend(format!(
                "the bucket refused a locked write, so Object Lock is not enabled or not allowed: {e}"
            ))
            })
    }

    /// Any object_store backend (tests use the in-memory one).
    pub fn from_object_store(inner: Arc<dyn ObjectStore>) -> RecordingStore {
        RecordingStore {
            inner,
            local_root: None,
        }
    }

    /// Local backend: drops write permission on a stored object (0444). Create-only puts
    /// already refuse overwrites; this also stops other local tools from editing it.
    fn seal_local(&self, key: &str) {
        #[cfg(unix)]
        if let Some(root) = &self.local_root {
            use std::os::unix::fs::PermissionsExt;
            let path = root.join(key);
            if let Err(e) = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o444))
            {
                tracing::warn!(path = %path.display(), error = %e, "could not make a stored object read-only");
            }
        }
    }

    /// Writes a new object; refuses to overwrite an existing one. Returns the version id the
    /// store gave the object (S3 with versioning, which Object Lock requires), so a manifest
    /// can pin exactly what was written; `None` on unversioned stores (the local directory).
    pub async fn put_new(&self, key: &str, bytes: Bytes) -> Result<Option<String>, StorageError> {
        if let Some(root) = &self.local_root {
            keep_free(root, bytes.len()).map_err(|e| StorageError::Backend(e.to_string()))?;
        }
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        match self
            .inner
            .put_opts(&ObjPath::from(key), PutPayload::from_bytes(bytes), opts)
            .await
        {
            Ok(r) => {
                self.seal_local(key);
                Ok(r.version)
            }
            Err(object_store::Error::AlreadyExists { .. }) => {
                Err(StorageError::AlreadyExists(key.into()))
            }
            Err(e) => Err(backend(e)),
        }
    }

    /// Stores `bytes`, read from the local file `from`, as a new object, as [`Self::put_new`]
    /// does. On the local backend with `from` on the same filesystem the file is hard-linked
    /// into place instead of copied, so it needs no new space: the outage spool of a full
    /// disk drains once a little is free. The linked file is hashed again and must still be
    /// `bytes` (a file swapped after it was read is unlinked and refused).
    pub async fn adopt_file(
        &self,
        key: &str,
        from: &std::path::Path,
        bytes: Bytes,
    ) -> Result<Option<String>, StorageError> {
        use sha2::Digest;
        let Some(root) = &self.local_root else {
            return self.put_new(key, bytes).await;
        };
        let dest = root.join(key);
        let io = |what: &str, e: std::io::Error| {
            StorageError::Backend(format!("{what} {}: {e}", dest.display()))
        };
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent).map_err(|e| io("create the directory of", e))?;
        }
        match std::fs::hard_link(from, &dest) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(StorageError::AlreadyExists(key.into()))
            }
            // Another filesystem (EXDEV) or no links: a copy, with its free-space check.
            Err(_) => return self.put_new(key, bytes).await,
        }
        let linked = std::fs::read(&dest).map_err(|e| io("read", e))?;
        if sha2::Sha256::digest(&linked) != sha2::Sha256::digest(&bytes) {
            let _ = std::fs::remove_file(&dest);
            return Err(StorageError::Backend(format!(
                "{} changed while it was adopted; refused",
                from.display()
            )));
        }
        std::fs::File::open(&dest)
            .and_then(|f| f.sync_all())
            .map_err(|e| io("fsync", e))?;
        if let Some(parent) = dest.parent() {
            std::fs::File::open(parent)
                .and_then(|f| f.sync_all())
                .map_err(|e| io("fsync the directory of", e))?;
        }
        self.seal_local(key);
        Ok(None)
    }

    /// Reads a whole object.
    pub async fn get(&self, key: &str) -> Result<Bytes, StorageError> {
        match self.inner.get(&ObjPath::from(key)).await {
            Ok(r) => r.bytes().await.map_err(backend),
            Err(object_store::Error::NotFound { .. }) => Err(StorageError::NotFound(key.into())),
            Err(e) => Err(backend(e)),
        }
    }

    /// Reads one version of an object: the pinned `version` when given (a newer version put
    /// over it is not what the gateway wrote), else the current one.
    pub async fn get_version(
        &self,
        key: &str,
        version: Option<&str>,
    ) -> Result<Bytes, StorageError> {
        let Some(v) = version else {
            return self.get(key).await;
        };
        let opts = GetOptions {
            version: Some(v.to_string()),
            ..Default::default()
        };
        match self.inner.get_opts(&ObjPath::from(key), opts).await {
            Ok(r) => r.bytes().await.map_err(backend),
            Err(object_store::Error::NotFound { .. }) => Err(StorageError::NotFound(key.into())),
            Err(e) => Err(backend(e)),
        }
    }

    /// The version id of the current (newest) version of an object; `None` on unversioned
    /// stores.
    pub async fn current_version(&self, key: &str) -> Result<Option<String>, StorageError> {
        match self.inner.head(&ObjPath::from(key)).await {
            Ok(m) => Ok(m.version),
            Err(object_store::Error::NotFound { .. }) => Err(StorageError::NotFound(key.into())),
            Err(e) => Err(backend(e)),
        }
    }

    /// Lists every object under a prefix, sorted by key.
    pub async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StorageError> {
        let p = ObjPath::from(prefix);
        let mut out: Vec<ObjectInfo> = self
            .inner
            .list(Some(&p))
            .map_ok(|m| ObjectInfo {
                key: m.location.to_string(),
                size: m.size,
            })
            .try_collect()
            .await
            .map_err(backend)?;
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }
}

/// Storage keys. Every key the gateway writes is made here.
pub mod key {
    use super::*;

    /// `sessions/YYYY/MM/DD/<session-id>`: date first so listing a period is cheap.
    pub fn session_prefix(started: DateTime<Utc>, session_id: &str) -> String {
        format!("sessions/{}/{session_id}", started.format("%Y/%m/%d"))
    }

    /// Written when the recording opens, before any byte is relayed.
    pub fn session_start(prefix: &str) -> String {
        format!("{prefix}/session-start.json")
    }

    /// Written when the session ends: metadata, object list and hash-chain head.
    pub fn session_end(prefix: &str) -> String {
        format!("{prefix}/session.json")
    }

    /// The detached Ed25519 signature of `session.json`.
    pub fn manifest_signature(prefix: &str) -> String {
        format!("{prefix}/session.json.sig")
    }

    /// Where rotation certificates are kept with the evidence (one per certified key), so an
    /// offline verifier with only the first pinned key finds the chain in a copy of the store.
    pub const SIGNING_CERTIFICATES: &str = ".breakglass/signing-keys";

    /// The rotation certificate of signing key `key_id`.
    pub fn signing_certificate(key_id: &str) -> String {
        format!("{SIGNING_CERTIFICATES}/{key_id}.cert")
    }

    /// A signed-off post-incident review, kept with the evidence.
    pub fn review(correlation_id: &str, review_id: &str) -> String {
        format!("reviews/{correlation_id}/{review_id}.json")
    }

    /// An incident's CAB review. Incident ids are text from people, so the key holds a hash
    /// of the id (the document holds the id itself).
    pub fn cab_review(incident_id: &str) -> String {
        use sha2::Digest;
        let h = hex::encode(sha2::Sha256::digest(incident_id.as_bytes()));
        format!("incidents/{}/cab-review.json", &h[..32])
    }

    /// Chunk `seq` of channel `channel`. `ext` is `cast` (pty, asciicast v2) or `raw.lz4`
    /// (non-pty, exact bytes in an LZ4 frame). Zero-padded so key order is chunk order.
    pub fn chunk(prefix: &str, channel: u32, seq: u64, ext: &str) -> String {
        format!("{prefix}/ch{channel:04}/{seq:08}.{ext}")
    }
}

/// Space that recordings never take on a local disk: the state file and the SIEM spool, which
/// end what runs on the record, keep it when recordings fill the disk.
pub const KEEP_FREE_BYTES: u64 = 8 << 20;

/// Refuses a write of `len` bytes under `dir` that would leave less than [`KEEP_FREE_BYTES`]
/// available on its file system (an error that names the disk).
pub fn keep_free(dir: &std::path::Path, len: usize) -> std::io::Result<()> {
    let Some(avail) = available(dir) else {
        return Ok(());
    };
    if avail < KEEP_FREE_BYTES + len as u64 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::StorageFull,
            format!(
                "No space left on device for recordings: {} has {} KiB free, and the last {} MiB stay for the state and the SIEM spool",
                dir.display(),
                avail / 1024,
                KEEP_FREE_BYTES >> 20
            ),
        ));
    }
    Ok(())
}

/// Bytes available to this process on the file system holding `dir` (`statvfs`).
fn available(dir: &std::path::Path) -> Option<u64> {
    let st = rustix::fs::statvfs(dir).ok()?;
    Some(st.f_bavail.saturating_mul(st.f_frsize))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn adopting_a_spool_file_links_it_and_refuses_a_swap_or_an_existing_object() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let s = RecordingStore::local(&dir.path().join("store")).expect("store");
        let spooled = dir.path().join("spooled");
        std::fs::write(&spooled, b"chunk").expect("write");
        s.adopt_file("a/1", &spooled, Bytes::from_static(b"chunk"))
            .await
            .expect("adopt");
        let stored = dir.path().join("store/a/1");
        // Linked, not copied: no new space on a full disk.
        assert_eq!(
            std::fs::metadata(&stored).expect("stored").ino(),
            std::fs::metadata(&spooled).expect("spooled").ino()
        );
        assert_eq!(s.get("a/1").await.expect("get").as_ref(), b"chunk");
        assert!(matches!(
            s.adopt_file("a/1", &spooled, Bytes::from_static(b"chunk"))
                .await,
            Err(StorageError::AlreadyExists(_))
        ));
        // Content that is not what was read (swapped in between) is unlinked and refused.
        let other = dir.path().join("other");
        std::fs::write(&other, b"forged").expect("write");
        assert!(s
            .adopt_file("a/2", &other, Bytes::from_static(b"chunk"))
            .await
            .is_err());
        assert!(!dir.path().join("store/a/2").exists());
    }

    #[tokio::test]
    async fn local_store_is_create_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = RecordingStore::local(dir.path()).expect("store");
        s.put_new("a/b/1", Bytes::from_static(b"one"))
            .await
            .expect("first put");
        let again = s.put_new("a/b/1", Bytes::from_static(b"two")).await;
        assert!(
            matches!(again, Err(StorageError::AlreadyExists(_))),
            "{again:?}"
        );
        assert_eq!(
            s.get("a/b/1").await.expect("get"),
            Bytes::from_static(b"one")
        );
        s.put_new("a/b/0", Bytes::from_static(b"zero"))
            .await
            .expect("put");
        let keys: Vec<String> = s
            .list("a")
            .await
            .expect("list")
            .into_iter()
            .map(|o| o.key)
            .collect();
        assert_eq!(keys, vec!["a/b/0", "a/b/1"]);
        assert!(matches!(s.get("a/x").await, Err(StorageError::NotFound(_))));
    }

    #[test]
    fn chunk_keys_sort_in_order() {
        let p = key::session_prefix(Utc::now(), "s1");
        assert!(key::chunk(&p, 0, 9, "cast") < key::chunk(&p, 0, 10, "cast"));
        assert!(key::chunk(&p, 1, 0, "raw") > key::chunk(&p, 0, 99, "raw"));
    }
}
