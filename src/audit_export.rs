//! The auditor's metadata export: every session of a period with its grant, incident,
//! approvers and review, as JSON or CSV, next to a manifest (file name, SHA-256, rows, who
//! exported it) that the gateway signs with its manifest key. `verify` checks the three
//! files offline with the gateway's public keys.
//!
//! On disk an export is a directory with `<file_name>`, `manifest.json` and
//! `manifest.json.sig` (the same signature document as a recording's `session.json.sig`).

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use base64::Engine;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::clock::rfc3339;
use crate::record::ManifestSignature;
use crate::signing::{PublicKey, Signer};
use crate::state::{Grant, Request, Review, SessionFilter, SessionRow, StateError, Store};

/// Version of the content (`sessions` documents and CSV columns) and of the manifest.
pub const SCHEMA_VERSION: u32 = 1;
/// The manifest's `kind`.
pub const KIND: &str = "breakglass-metadata-export";
/// The `kind` of an incident report's manifest (`crate::incident`): the same manifest shape,
/// signed by the same keys, so `audit-export verify` checks both.
pub const INCIDENT_KIND: &str = "breakglass-incident-report";
/// The manifest's file name in an export directory.
pub const MANIFEST_FILE: &str = "manifest.json";
/// The signature's file name in an export directory.
pub const SIGNATURE_FILE: &str = "manifest.json.sig";

/// An export failure.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("cannot encode the export")]
    Encode(#[from] serde_json::Error),
    #[error("{path}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} already exists; exports are evidence and are never overwritten")]
    Exists { path: PathBuf },
    #[error("{0} is not a metadata export manifest: {1}")]
    NotAManifest(PathBuf, String),
    #[error("a metadata export is JSON or CSV, not {0}")]
    Format(&'static str),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ExportError + '_ {
    move |source| ExportError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The content's encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExportFormat {
    Json,
    Csv,
    /// An incident report (one self-contained HTML file); never a metadata export.
    Html,
}

impl ExportFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            ExportFormat::Json => "json",
            ExportFormat::Csv => "csv",
            ExportFormat::Html => "html",
        }
    }
}

impl std::str::FromStr for ExportFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<ExportFormat, String> {
        match s {
            "json" => Ok(ExportFormat::Json),
            "csv" => Ok(ExportFormat::Csv),
            other => Err(format!("`{other}` is not one of json, csv")),
        }
    }
}

/// One exported session: the index row plus what its grant, request and review say.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SessionRecord {
    pub session_id: String,
    pub protocol: String,
    pub person: String,
    pub target: String,
    pub grant_id: String,
    /// The request the grant answers; `None` for operator grants.
    pub request_id: Option<String>,
    /// `None` only if the grant is missing from the state store.
    pub incident_id: Option<String>,
    pub justification: Option<String>,
    /// Who created the grant (an operator, or the request's requester for approvals).
    pub granted_by: Option<String>,
    /// Emergency self-service grant (no second person; review mandatory).
    pub emergency: bool,
    /// Who approved the request, in order.
    pub approvers: Vec<String>,
    pub client_addr: String,
    pub started_at: String,
    pub deadline: String,
    pub ended_at: Option<String>,
    pub end_reason: Option<String>,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub recording_prefix: String,
    pub review: Option<ReviewRecord>,
}

/// The post-incident review of the session's grant.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReviewRecord {
    pub review_id: String,
    /// `open` or `signed`.
    pub state: String,
    pub due_at: String,
    pub signed_by: Option<String>,
    pub signed_at: Option<String>,
}

/// The CSV columns, in order.
pub const CSV_COLUMNS: [&str; 24] = [
    "session_id",
    "protocol",
    "person",
    "target",
    "grant_id",
    "request_id",
    "incident_id",
    "justification",
    "granted_by",
    "emergency",
    "approvers",
    "client_addr",
    "started_at",
    "deadline",
    "ended_at",
    "end_reason",
    "bytes_in",
    "bytes_out",
    "recording_prefix",
    "review_id",
    "review_state",
    "review_due_at",
    "review_signed_by",
    "review_signed_at",
];

impl SessionRecord {
    /// The CSV fields in [`CSV_COLUMNS`] order; approvers are joined with `;`.
    fn csv_fields(&self) -> [String; 24] {
        let o = |v: &Option<String>| v.clone().unwrap_or_default();
        let r = self.review.as_ref();
        [
            self.session_id.clone(),
            self.protocol.clone(),
            self.person.clone(),
            self.target.clone(),
            self.grant_id.clone(),
            o(&self.request_id),
            o(&self.incident_id),
            o(&self.justification),
            o(&self.granted_by),
            self.emergency.to_string(),
            self.approvers.join(";"),
            self.client_addr.clone(),
            self.started_at.clone(),
            self.deadline.clone(),
            o(&self.ended_at),
            o(&self.end_reason),
            self.bytes_in.to_string(),
            self.bytes_out.to_string(),
            self.recording_prefix.clone(),
            r.map(|r| r.review_id.clone()).unwrap_or_default(),
            r.map(|r| r.state.clone()).unwrap_or_default(),
            r.map(|r| r.due_at.clone()).unwrap_or_default(),
            r.and_then(|r| r.signed_by.clone()).unwrap_or_default(),
            r.and_then(|r| r.signed_at.clone()).unwrap_or_default(),
        ]
    }
}

/// The signed manifest (`recordings-schema/metadata-export-manifest.schema.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub schema_version: u32,
    /// Always [`KIND`], so a manifest cannot pass for another signed document.
    pub kind: String,
    /// The content file's name, next to the manifest.
    pub file: String,
    /// SHA-256 (hex) of the content file's exact bytes.
    pub sha256: String,
    /// Sessions in the content.
    pub rows: u64,
    pub format: ExportFormat,
    pub since: String,
    pub until: String,
    pub exported_by: String,
    pub exported_at: String,
    /// The gateway signing key that signed this manifest.
    pub key_id: String,
}

/// A built export, not yet written anywhere.
#[derive(Debug, Clone)]
pub struct Bundle {
    pub file_name: String,
    pub content: String,
    pub manifest: serde_json::Value,
    /// The exact bytes the signature covers; write these, not a re-encoding of `manifest`.
    pub manifest_bytes: Vec<u8>,
    pub signature: ManifestSignature,
    /// Sessions in the content.
    pub rows: u64,
}

/// Exports every session that started in `since..until` (start inclusive, end exclusive),
/// oldest first, and signs the manifest.
pub async fn build(
    store: &dyn Store,
    signer: &Signer,
    since: DateTime<Utc>,
    until: DateTime<Utc>,
    format: ExportFormat,
    exported_by: &str,
) -> Result<Bundle, ExportError> {
    let mut sessions = store
        .list_sessions(&SessionFilter {
            since: Some(since),
            until: Some(until),
            ..Default::default()
        })
        .await?;
    sessions.sort_by(|a, b| (a.started_at, &a.id).cmp(&(b.started_at, &b.id)));
    let mut records = Vec::with_capacity(sessions.len());
    let mut context = Context::default();
    for s in &sessions {
        records.push(context.record(store, s).await?);
    }
    let content = match format {
        ExportFormat::Json => {
            let mut text = serde_json::to_string_pretty(&serde_json::json!({
                "schema_version": SCHEMA_VERSION,
                "sessions": records,
            }))?;
            text.push('\n');
            text
        }
        ExportFormat::Csv => {
            let mut text = crate::csv::line(&CSV_COLUMNS);
            for r in &records {
                text.push_str(&crate::csv::line(&r.csv_fields()));
            }
            text
        }
        ExportFormat::Html => return Err(ExportError::Format("html")),
    };
    let stamp = |t: DateTime<Utc>| t.format("%Y%m%dT%H%M%SZ").to_string();
    let file_name = format!(
        "breakglass-metadata-{}-{}.{}",
        stamp(since),
        stamp(until),
        format.as_str()
    );
    signed(
        signer,
        KIND,
        file_name,
        content,
        records.len() as u64,
        format,
        (since, until),
        exported_by,
    )
}

/// Signs `content` as `file_name`: the manifest (of `kind`) over its SHA-256, and the
/// signature over the manifest's exact bytes.
#[allow(clippy::too_many_arguments)]
pub fn signed(
    signer: &Signer,
    kind: &str,
    file_name: String,
    content: String,
    rows: u64,
    format: ExportFormat,
    (since, until): (DateTime<Utc>, DateTime<Utc>),
    exported_by: &str,
) -> Result<Bundle, ExportError> {
    let manifest = Manifest {
        schema_version: SCHEMA_VERSION,
        kind: kind.into(),
        file: file_name.clone(),
        sha256: hex::encode(Sha256::digest(content.as_bytes())),
        rows,
        format,
        since: rfc3339(since),
        until: rfc3339(until),
        exported_by: exported_by.into(),
        exported_at: rfc3339(crate::clock::now()),
        key_id: signer.current_public.id.clone(),
    };
    let manifest_bytes = serde_json::to_vec_pretty(&manifest)?;
    let signature = ManifestSignature {
        algorithm: "ed25519".into(),
        key_id: signer.current_public.id.clone(),
        signature: base64::engine::general_purpose::STANDARD.encode(signer.sign(&manifest_bytes)),
        sha256: hex::encode(Sha256::digest(&manifest_bytes)),
    };
    Ok(Bundle {
        file_name,
        content,
        manifest: serde_json::to_value(&manifest)?,
        manifest_bytes,
        signature,
        rows: manifest.rows,
    })
}

/// Grants, requests and reviews already looked up: sessions of one grant share them.
#[derive(Default)]
struct Context {
    grants: HashMap<String, Option<Grant>>,
    requests: HashMap<String, Option<Request>>,
    reviews: HashMap<String, Option<Review>>,
}

impl Context {
    async fn record(
        &mut self,
        store: &dyn Store,
        s: &SessionRow,
    ) -> Result<SessionRecord, ExportError> {
        if !self.grants.contains_key(&s.grant_id) {
            // A missing grant leaves its fields empty rather than hiding the session.
            let g = match store.find_grant(&s.grant_id).await {
                Ok(g) => Some(g),
                Err(StateError::NoSuchGrant(_)) => None,
                Err(e) => return Err(e.into()),
            };
            self.grants.insert(s.grant_id.clone(), g);
        }
        let grant = self.grants.get(&s.grant_id).cloned().flatten();
        let request_id = grant.as_ref().and_then(|g| g.request_id.clone());
        if let Some(id) = &request_id {
            if !self.requests.contains_key(id) {
                let r = match store.find_request(id).await {
                    Ok(r) => Some(r),
                    Err(StateError::NoSuchRequest(_)) => None,
                    Err(e) => return Err(e.into()),
                };
                self.requests.insert(id.clone(), r);
            }
        }
        let approvers = request_id
            .as_ref()
            .and_then(|id| self.requests.get(id).cloned().flatten())
            .map(|r| r.approvals.into_iter().map(|(who, _)| who).collect())
            .unwrap_or_default();
        if !self.reviews.contains_key(&s.grant_id) {
            let r = match store.find_review(&s.grant_id).await {
                Ok(r) => Some(r),
                Err(StateError::NoSuchReview(_)) => None,
                Err(e) => return Err(e.into()),
            };
            self.reviews.insert(s.grant_id.clone(), r);
        }
        let review = self
            .reviews
            .get(&s.grant_id)
            .cloned()
            .flatten()
            .map(|r| ReviewRecord {
                review_id: r.id,
                state: if r.signed_at.is_some() {
                    "signed"
                } else {
                    "open"
                }
                .into(),
                due_at: rfc3339(r.due_at),
                signed_by: r.signed_by,
                signed_at: r.signed_at.map(rfc3339),
            });
        Ok(SessionRecord {
            session_id: s.id.clone(),
            protocol: s.protocol.clone(),
            person: s.person.clone(),
            target: s.target.clone(),
            grant_id: s.grant_id.clone(),
            request_id,
            incident_id: grant.as_ref().map(|g| g.incident_id.clone()),
            justification: grant.as_ref().map(|g| g.reason.clone()),
            granted_by: grant.as_ref().map(|g| g.created_by.clone()),
            emergency: grant.as_ref().is_some_and(|g| g.review_required),
            approvers,
            client_addr: s.client_addr.clone(),
            started_at: rfc3339(s.started_at),
            deadline: rfc3339(s.deadline),
            ended_at: s.ended_at.map(rfc3339),
            end_reason: s.end_reason.clone(),
            bytes_in: s.bytes_in,
            bytes_out: s.bytes_out,
            recording_prefix: s.recording_prefix.clone(),
            review,
        })
    }
}

/// Writes the bundle into `dir` (created if needed) as `<file_name>`, `manifest.json` and
/// `manifest.json.sig`, each create-new, fsync'd and read-only: an export never replaces a
/// file.
/// Returns the paths written.
pub fn write(bundle: &Bundle, dir: &Path) -> Result<Vec<PathBuf>, ExportError> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let sig = serde_json::to_vec_pretty(&bundle.signature)?;
    let files: [(&str, &[u8]); 3] = [
        (&bundle.file_name, bundle.content.as_bytes()),
        (MANIFEST_FILE, &bundle.manifest_bytes),
        (SIGNATURE_FILE, &sig),
    ];
    // Refuse before writing anything; `create_new` below still catches a race.
    for (name, _) in &files {
        let path = dir.join(name);
        if path.exists() {
            return Err(ExportError::Exists { path });
        }
    }
    let mut written = Vec::new();
    for (name, bytes) in files {
        let path = dir.join(name);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::AlreadyExists => ExportError::Exists { path: path.clone() },
                _ => io_err(&path)(e),
            })?;
        f.write_all(bytes).map_err(io_err(&path))?;
        f.sync_all().map_err(io_err(&path))?;
        // Read-only, like the local recording store's objects.
        let mut perms = f.metadata().map_err(io_err(&path))?.permissions();
        perms.set_readonly(true);
        std::fs::set_permissions(&path, perms).map_err(io_err(&path))?;
        written.push(path);
    }
    // The new names are durable only once the directory is synced.
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))?;
    Ok(written)
}

/// What [`verify`] found. No findings means OK; any finding means TAMPERED.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// The manifest, when it parsed (even if its signature does not hold).
    pub manifest: Option<Manifest>,
    pub findings: Vec<String>,
}

impl Verdict {
    pub fn is_ok(&self) -> bool {
        self.findings.is_empty()
    }
}

/// Checks an export from its parts: the signature over the exact manifest bytes with one of
/// `keys`, the manifest's kind, and the content's SHA-256 and name (`content` is the file the
/// manifest names, `None` if it is missing). Pure: [`verify_dir`] does the reading.
pub fn verify(
    manifest_bytes: &[u8],
    signature_bytes: Option<&[u8]>,
    content: Option<(&str, &[u8])>,
    keys: &[PublicKey],
) -> Verdict {
    let mut findings = Vec::new();
    match signature_bytes.map(serde_json::from_slice::<ManifestSignature>) {
        None => findings.push(format!("{SIGNATURE_FILE} is missing (signature deleted)")),
        Some(Err(e)) => findings.push(format!(
            "{SIGNATURE_FILE} is not a valid signature document: {e}"
        )),
        Some(Ok(sig)) => {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(&sig.signature)
                .unwrap_or_default();
            match keys.iter().find(|k| k.id == sig.key_id) {
                None => findings.push(format!(
                    "{MANIFEST_FILE} is signed by key {} which is not among the trusted keys",
                    sig.key_id
                )),
                Some(k) if !k.verify(manifest_bytes, &raw) => findings.push(format!(
                    "{MANIFEST_FILE} does not match its signature (manifest modified)"
                )),
                Some(_) => {}
            }
        }
    }
    let manifest = match serde_json::from_slice::<Manifest>(manifest_bytes) {
        Ok(m) => m,
        Err(e) => {
            findings.push(format!("{MANIFEST_FILE} is not a valid manifest: {e}"));
            return Verdict {
                manifest: None,
                findings,
            };
        }
    };
    if ![KIND, INCIDENT_KIND].contains(&manifest.kind.as_str())
        || manifest.schema_version != SCHEMA_VERSION
    {
        findings.push(format!(
            "{MANIFEST_FILE} is a `{}` version {} document, not a {KIND} or {INCIDENT_KIND} version {SCHEMA_VERSION}",
            manifest.kind, manifest.schema_version
        ));
    }
    match content {
        None => findings.push(format!("{} is missing (content deleted)", manifest.file)),
        Some((name, _)) if name != manifest.file => findings.push(format!(
            "the content file is {name}, but the manifest names {}",
            manifest.file
        )),
        Some((_, bytes)) => {
            let got = hex::encode(Sha256::digest(bytes));
            if got != manifest.sha256 {
                findings.push(format!(
                    "{} has SHA-256 {got}, the manifest says {} (content modified)",
                    manifest.file, manifest.sha256
                ));
            }
        }
    }
    Verdict {
        manifest: Some(manifest),
        findings,
    }
}

/// Reads an export directory and [`verify`]s it. A directory without a readable
/// `manifest.json` is an error, not a verdict.
pub fn verify_dir(dir: &Path, keys: &[PublicKey]) -> Result<Verdict, ExportError> {
    let manifest_path = dir.join(MANIFEST_FILE);
    let manifest_bytes = std::fs::read(&manifest_path).map_err(io_err(&manifest_path))?;
    let read_opt = |path: &Path| -> Result<Option<Vec<u8>>, ExportError> {
        match std::fs::read(path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(path)(e)),
        }
    };
    let sig = read_opt(&dir.join(SIGNATURE_FILE))?;
    // Only the file the manifest names, and only a plain name inside `dir`.
    let file = serde_json::from_slice::<serde_json::Value>(&manifest_bytes)
        .ok()
        .and_then(|m| m["file"].as_str().map(str::to_string))
        .ok_or_else(|| ExportError::NotAManifest(manifest_path.clone(), "no `file`".into()))?;
    if file.is_empty() || file.contains(['/', '\\']) || file == "." || file == ".." {
        return Err(ExportError::NotAManifest(
            manifest_path,
            format!("`file` is `{file}`, not a plain file name"),
        ));
    }
    let content = read_opt(&dir.join(&file))?;
    Ok(verify(
        &manifest_bytes,
        sig.as_deref(),
        content.as_deref().map(|c| (file.as_str(), c)),
        keys,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{NewGrant, NewRequest, SqliteStore};

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .expect("test time is RFC 3339")
            .with_timezone(&Utc)
    }

    fn session(id: &str, grant: &str, start: &str) -> SessionRow {
        let started_at = t(start);
        SessionRow {
            id: id.into(),
            protocol: "ssh".into(),
            person: "alice".into(),
            target: "web-01".into(),
            grant_id: grant.into(),
            client_addr: "127.0.0.1:5000".into(),
            started_at,
            deadline: started_at + chrono::Duration::hours(1),
            ended_at: Some(started_at + chrono::Duration::minutes(5)),
            end_reason: Some("client_closed".into()),
            bytes_in: 10,
            bytes_out: 20,
            recording_prefix: format!("sessions/2024/06/03/{id}"),
            node_id: "n1".into(),
        }
    }

    /// A store with an approved request's grant (two sessions) and an operator grant whose
    /// justification needs CSV quoting (one session), plus one session outside the range.
    async fn world(dir: &Path) -> (SqliteStore, Signer) {
        let store = SqliteStore::open(&dir.join("s.sqlite")).expect("open");
        let signer = Signer::load_or_create(dir).expect("signer");
        let now = t("2024-06-03T09:00:00Z");
        let req = store
            .create_request(NewRequest {
                person: "alice".into(),
                target: "web-01".into(),
                justification: "disk full".into(),
                incident_id: "INC-7".into(),
                severity: "high".into(),
                scenario: "production_outage".into(),
                duration: std::time::Duration::from_secs(3600),
                created_at: now,
                expires_at: now + chrono::Duration::minutes(30),
                emergency: false,
            })
            .await
            .expect("request");
        let granted = match store
            .approve(&req.id, "bob", 1, now)
            .await
            .expect("approve")
        {
            crate::state::Approval::Granted { grant, .. } => grant,
            other => panic!("one approval grants: {other:?}"),
        };
        store
            .open_review(&Review {
                id: "V-1".into(),
                correlation_id: req.id.clone(),
                grant_id: granted.id.clone(),
                person: "alice".into(),
                target: "web-01".into(),
                scenario: "production_outage".into(),
                emergency: false,
                approvers: vec!["bob".into()],
                opened_at: now,
                due_at: now + chrono::Duration::hours(48),
                overdue_alerted: false,
                signed_by: None,
                signed_at: None,
                findings: None,
                root_cause: None,
                answers: None,
            })
            .await
            .expect("review");
        let op = store
            .create_grant(NewGrant {
                person: "alice".into(),
                target: "web-01".into(),
                reason: "said \"urgent\", then left".into(),
                incident_id: "INC-8".into(),
                created_by: "operator:root".into(),
                created_at: now,
                expires_at: now + chrono::Duration::hours(1),
            })
            .await
            .expect("grant");
        for s in [
            session("s-2", &granted.id, "2024-06-03T10:30:00Z"),
            session("s-1", &granted.id, "2024-06-03T10:00:00Z"),
            session("s-3", &op.id, "2024-06-03T11:00:00Z"),
            session("s-0", &op.id, "2024-06-01T11:00:00Z"),
        ] {
            store.insert_session(&s).await.expect("insert");
        }
        (store, signer)
    }

    #[tokio::test]
    async fn json_export_has_every_session_with_its_context() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, signer) = world(dir.path()).await;
        let b = build(
            &store,
            &signer,
            t("2024-06-03T00:00:00Z"),
            t("2024-06-04T00:00:00Z"),
            ExportFormat::Json,
            "operator:auditor",
        )
        .await
        .expect("build");
        assert_eq!(
            b.file_name,
            "breakglass-metadata-20240603T000000Z-20240604T000000Z.json"
        );
        let v: serde_json::Value = serde_json::from_str(&b.content).expect("JSON");
        assert_eq!(v["schema_version"], 1);
        validate(
            include_str!("../recordings-schema/metadata-export.schema.json"),
            &v,
        );
        let ids: Vec<&str> = v["sessions"]
            .as_array()
            .expect("sessions")
            .iter()
            .map(|s| s["session_id"].as_str().expect("id"))
            .collect();
        assert_eq!(ids, ["s-1", "s-2", "s-3"], "oldest first, only the range");
        let s1 = &v["sessions"][0];
        assert_eq!(s1["incident_id"], "INC-7");
        assert_eq!(s1["justification"], "disk full");
        assert_eq!(s1["approvers"], serde_json::json!(["bob"]));
        assert!(s1["request_id"].as_str().expect("request").starts_with('R'));
        assert_eq!(s1["review"]["review_id"], "V-1");
        assert_eq!(s1["review"]["state"], "open");
        assert_eq!(s1["review"]["due_at"], "2024-06-05T09:00:00.000Z");
        let s3 = &v["sessions"][2];
        assert_eq!(s3["incident_id"], "INC-8");
        assert_eq!(s3["approvers"], serde_json::json!([]));
        assert_eq!(s3["granted_by"], "operator:root");
        assert_eq!(s3["review"], serde_json::Value::Null);
        assert_eq!(b.manifest["rows"], 3);
        assert_eq!(b.manifest["exported_by"], "operator:auditor");
        assert_eq!(b.manifest["key_id"], signer.current_public.id.as_str());
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&b.manifest_bytes).expect("JSON"),
            b.manifest
        );
        validate_manifest(&b.manifest);
    }

    #[tokio::test]
    async fn csv_export_quotes_fields_and_has_one_row_per_session() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, signer) = world(dir.path()).await;
        let b = build(
            &store,
            &signer,
            t("2024-06-01T00:00:00Z"),
            t("2024-06-04T00:00:00Z"),
            ExportFormat::Csv,
            "operator:auditor",
        )
        .await
        .expect("build");
        let lines: Vec<&str> = b.content.lines().collect();
        assert_eq!(lines[0], CSV_COLUMNS.join(","));
        assert_eq!(lines.len(), 5, "header and four sessions");
        assert!(
            lines[4].contains(",\"said \"\"urgent\"\", then left\","),
            "{}",
            lines[4]
        );
        assert_eq!(b.manifest["format"], "csv");
        assert_eq!(b.manifest["rows"], 4);
        validate_manifest(&b.manifest);
    }

    #[tokio::test]
    async fn verify_says_ok_and_finds_every_kind_of_tampering() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, signer) = world(dir.path()).await;
        let b = build(
            &store,
            &signer,
            t("2024-06-03T00:00:00Z"),
            t("2024-06-04T00:00:00Z"),
            ExportFormat::Json,
            "operator:auditor",
        )
        .await
        .expect("build");
        let sig = serde_json::to_vec(&b.signature).expect("sig");
        let keys = &signer.all;
        let ok = verify(
            &b.manifest_bytes,
            Some(&sig),
            Some((&b.file_name, b.content.as_bytes())),
            keys,
        );
        assert!(ok.is_ok(), "{:?}", ok.findings);

        let flipped = b.content.replacen("INC-7", "INC-9", 1);
        let rows_edited = String::from_utf8(b.manifest_bytes.clone())
            .expect("utf8")
            .replace("\"rows\": 3", "\"rows\": 2");
        let other = Signer::load_or_create(&dir.path().join("other")).expect("other key");
        // (what, manifest, signature, content, expected finding)
        type Case<'a> = (
            &'a str,
            &'a [u8],
            Option<&'a [u8]>,
            Option<(&'a str, &'a [u8])>,
            &'a str,
        );
        let cases: &[Case] = &[
            (
                "content edited",
                &b.manifest_bytes,
                Some(&sig),
                Some((&b.file_name, flipped.as_bytes())),
                "content modified",
            ),
            (
                "content deleted",
                &b.manifest_bytes,
                Some(&sig),
                None,
                "content deleted",
            ),
            (
                "content swapped",
                &b.manifest_bytes,
                Some(&sig),
                Some(("other.json", b.content.as_bytes())),
                "the manifest names",
            ),
            (
                "manifest edited",
                rows_edited.as_bytes(),
                Some(&sig),
                Some((&b.file_name, b.content.as_bytes())),
                "manifest modified",
            ),
            (
                "signature deleted",
                &b.manifest_bytes,
                None,
                Some((&b.file_name, b.content.as_bytes())),
                "signature deleted",
            ),
            (
                "signature garbage",
                &b.manifest_bytes,
                Some(b"{}"),
                Some((&b.file_name, b.content.as_bytes())),
                "not a valid signature document",
            ),
        ];
        for (what, manifest, sig, content, want) in cases {
            let v = verify(manifest, *sig, *content, keys);
            assert!(
                v.findings.iter().any(|f| f.contains(want)),
                "{what}: {:?}",
                v.findings
            );
        }
        let v = verify(
            &b.manifest_bytes,
            Some(&sig),
            Some((&b.file_name, b.content.as_bytes())),
            &other.all,
        );
        assert!(
            v.findings[0].contains("not among the trusted keys"),
            "{:?}",
            v.findings
        );
    }

    #[tokio::test]
    async fn write_never_overwrites_and_verify_dir_reads_what_it_wrote() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, signer) = world(dir.path()).await;
        let b = build(
            &store,
            &signer,
            t("2024-06-03T00:00:00Z"),
            t("2024-06-04T00:00:00Z"),
            ExportFormat::Csv,
            "operator:auditor",
        )
        .await
        .expect("build");
        let out = dir.path().join("export");
        let written = write(&b, &out).expect("write");
        assert_eq!(written.len(), 3);
        assert!(verify_dir(&out, &signer.all).expect("verify").is_ok());
        match write(&b, &out) {
            Err(ExportError::Exists { .. }) => {}
            other => panic!("a second write must refuse: {other:?}"),
        }
        assert_eq!(
            std::fs::read_to_string(out.join(&b.file_name)).expect("read"),
            b.content,
            "the first export is untouched"
        );
    }

    fn validate_manifest(m: &serde_json::Value) {
        validate(
            include_str!("../recordings-schema/metadata-export-manifest.schema.json"),
            m,
        );
    }

    fn validate(schema: &str, m: &serde_json::Value) {
        let schema: serde_json::Value = serde_json::from_str(schema).expect("schema is JSON");
        let v = jsonschema::validator_for(&schema).expect("schema compiles");
        let errors: Vec<String> = v.iter_errors(m).map(|e| e.to_string()).collect();
        assert!(errors.is_empty(), "{m}: {errors:?}");
    }
}
