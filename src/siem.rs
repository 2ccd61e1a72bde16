//! Audit events for the SIEM, kept apart from operational logs, and their first sink: an
//! append-only JSONL file written durably (fsync) before a session may start.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

/// Version of the event shape in `recordings-schema/siem-event.schema.json`.
pub const SCHEMA_VERSION: u32 = 1;

/// What happened. Serialized in snake_case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    SessionStart,
    SessionEnd,
    SessionDenied,
    SessionExpired,
    SessionRevoked,
    ForwardingRefused,
    GrantCreated,
    GrantRevoked,
    RequestCreated,
    RequestApproved,
    RequestDenied,
    RequestExpired,
    ReviewOpened,
    ReviewSigned,
    ReviewOverdue,
    CredentialIssued,
    CredentialRotated,
    RecordingCheckpoint,
}

impl Action {
    /// The snake_case name, as serialized.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::SessionStart => "session_start",
            Action::SessionEnd => "session_end",
            Action::SessionDenied => "session_denied",
            Action::SessionExpired => "session_expired",
            Action::SessionRevoked => "session_revoked",
            Action::ForwardingRefused => "forwarding_refused",
            Action::GrantCreated => "grant_created",
            Action::GrantRevoked => "grant_revoked",
            Action::RequestCreated => "request_created",
            Action::RequestApproved => "request_approved",
            Action::RequestDenied => "request_denied",
            Action::RequestExpired => "request_expired",
            Action::ReviewOpened => "review_opened",
            Action::ReviewSigned => "review_signed",
            Action::ReviewOverdue => "review_overdue",
            Action::CredentialIssued => "credential_issued",
            Action::CredentialRotated => "credential_rotated",
            Action::RecordingCheckpoint => "recording_checkpoint",
        }
    }
}

/// One break-glass audit event in the seed procedure's shape
/// (`event_type`, `actor`, `action`, `justification`, `timestamp`, `incident_id`) plus the
/// session context.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AccessEvent {
    pub schema_version: u32,
    /// Stable id for de-duplication downstream.
    pub event_id: String,
    /// Always `BREAK_GLASS_ACCESS` for these events.
    pub event_type: String,
    pub action: Action,
    /// RFC 3339 UTC.
    pub timestamp: String,
    /// The verified person, or `unknown` when the key matched nobody.
    pub actor: String,
    pub person: Option<String>,
    pub target: Option<String>,
    pub protocol: String,
    pub session_id: Option<String>,
    pub grant_id: Option<String>,
    /// Ties every event of one break-glass use together: the grant id when there is one,
    /// else the session id.
    pub correlation_id: Option<String>,
    pub justification: Option<String>,
    pub incident_id: Option<String>,
    pub client_addr: Option<String>,
    /// `success` or `failure`.
    pub outcome: String,
    /// Machine-readable reason (denial code or end reason).
    pub reason: Option<String>,
    /// The human sentence the client saw.
    pub message: Option<String>,
    /// `client`, `upstream` or `internal`: who caused a failure.
    pub side: Option<String>,
    pub deadline: Option<String>,
    pub bytes_in: Option<u64>,
    pub bytes_out: Option<u64>,
    pub duration_ms: Option<u64>,
    /// Where the recording lives in the recording store.
    pub recording: Option<String>,
    /// Head of the recording's hash chain (session end only).
    pub chain_head: Option<String>,
    /// The key that was offered (denials for unknown keys).
    pub key_fingerprint: Option<String>,
    /// Request fields (request, approval and denial events).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub severity: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scenario: Option<String>,
    /// Approvers so far (approval events) or the approver/denier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approvers: Option<Vec<String>>,
    /// Emergency self-service: no second person approved; mandatory review.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub emergency: Option<bool>,
    /// Review fields (review events).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub review_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub due_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub findings: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_cause: Option<String>,
}

impl AccessEvent {
    /// A new event with a fresh id and timestamp; callers fill the rest.
    pub fn new(action: Action, actor: &str) -> AccessEvent {
        AccessEvent {
            schema_version: SCHEMA_VERSION,
            event_id: uuid::Uuid::new_v4().to_string(),
            event_type: "BREAK_GLASS_ACCESS".into(),
            action,
            timestamp: crate::clock::rfc3339(crate::clock::now()),
            actor: actor.into(),
            person: None,
            target: None,
            protocol: "ssh".into(),
            session_id: None,
            grant_id: None,
            correlation_id: None,
            justification: None,
            incident_id: None,
            client_addr: None,
            outcome: "success".into(),
            reason: None,
            message: None,
            side: None,
            deadline: None,
            bytes_in: None,
            bytes_out: None,
            duration_ms: None,
            recording: None,
            chain_head: None,
            key_fingerprint: None,
            request_id: None,
            severity: None,
            scenario: None,
            approvers: None,
            emergency: None,
            review_id: None,
            due_at: None,
            findings: None,
            root_cause: None,
        }
    }
}

/// Writes an audit event to the SIEM sink and, when it has a correlation id, to the incident
/// event store (`breakglass events --correlation ID`). The SIEM write decides the result; an
/// event-store failure is logged, since the SIEM copy is the durable one.
pub async fn audit(
    sink: &dyn EventSink,
    store: &dyn crate::state::Store,
    event: &AccessEvent,
) -> Result<(), SiemError> {
    sink.emit(event).await?;
    if let Some(c) = &event.correlation_id {
        let stored = crate::state::StoredEvent {
            id: event.event_id.clone(),
            correlation_id: c.clone(),
            event_type: event.action.as_str().to_string(),
            event_data: serde_json::to_value(event).unwrap_or(serde_json::Value::Null),
            actor: event.actor.clone(),
            created_at: crate::clock::now(),
        };
        if let Err(e) = store.append_event(&stored).await {
            tracing::error!(error = %e, event_id = %event.event_id, "could not add event to the event store");
        }
    }
    Ok(())
}

/// A SIEM sink failure.
#[derive(Debug, thiserror::Error)]
pub enum SiemError {
    #[error("siem file {path}: {why}")]
    File { path: PathBuf, why: String },
}

/// Where events go. Delivery is durable when `emit` returns Ok.
#[async_trait]
pub trait EventSink: Send + Sync {
    async fn emit(&self, event: &AccessEvent) -> Result<(), SiemError>;
}

/// Appends one JSON object per line and fsyncs before returning.
#[derive(Clone)]
pub struct JsonlFileSink {
    path: PathBuf,
    file: Arc<Mutex<std::fs::File>>,
}

impl JsonlFileSink {
    /// Opens (creating) the file in append mode.
    pub fn open(path: &Path) -> Result<JsonlFileSink, SiemError> {
        let err = |e: std::io::Error| SiemError::File {
            path: path.to_path_buf(),
            why: e.to_string(),
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(err)?;
        Ok(JsonlFileSink {
            path: path.to_path_buf(),
            file: Arc::new(Mutex::new(file)),
        })
    }
}

#[async_trait]
impl EventSink for JsonlFileSink {
    async fn emit(&self, event: &AccessEvent) -> Result<(), SiemError> {
        let mut line = serde_json::to_vec(event).map_err(|e| SiemError::File {
            path: self.path.clone(),
            why: e.to_string(),
        })?;
        line.push(b'\n');
        let file = self.file.clone();
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            // A poisoned lock only means another write panicked; the file handle is fine.
            let mut f = file.lock().unwrap_or_else(|p| p.into_inner());
            f.write_all(&line)?;
            f.sync_data()
        })
        .await
        .map_err(|e| SiemError::File {
            path: path.clone(),
            why: e.to_string(),
        })?
        .map_err(|e| SiemError::File {
            path,
            why: e.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn events_append_as_jsonl() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("siem.jsonl");
        let sink = JsonlFileSink::open(&path).expect("open");
        let mut e = AccessEvent::new(Action::SessionStart, "alice");
        e.target = Some("web-01".into());
        sink.emit(&e).await.expect("emit");
        sink.emit(&AccessEvent::new(Action::SessionEnd, "alice"))
            .await
            .expect("emit");
        let text = std::fs::read_to_string(&path).expect("read");
        let lines: Vec<AccessEvent> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("each line is an event"))
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0], e);
        assert_ne!(lines[0].event_id, lines[1].event_id);
    }
}
