//! Audit events for the SIEM, kept apart from operational logs. Every event is committed to
//! a durable spool before `emit` returns (so before a session may start); the local JSONL
//! file is written inline and every other sink is fed by its own delivery worker, with
//! per-sink acknowledgement, retries and restart recovery.

pub mod format;
pub mod sink;
pub mod spool;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

pub use format::Format;
use sink::Deliverer;
pub use sink::{SinkConfig, SinkKind, Transport};
pub use spool::{SinkStats, Spool, SpoolError};

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
    /// `breakglass keys rotate-signing`: a new manifest signing key, certified by the old one.
    SigningKeyRotated,
    /// A command: an SSH exec request or a line typed at a shell (`BREAK_GLASS_ACTION`).
    Command,
    /// A SQL statement sent through the PostgreSQL gateway (`BREAK_GLASS_ACTION`).
    Statement,
    /// `breakglass siem test`.
    SiemTest,
    /// Someone looked at a recording: its session page, a replay of a channel or its SQL
    /// timeline (web UI, API or `breakglass replay`). Auditing the auditors.
    RecordingViewed,
    /// Someone exported a recording (`breakglass export`, a download from the web UI).
    RecordingExported,
    /// An auditor exported session metadata for a period (`breakglass audit-export`, web UI).
    MetadataExported,
    /// A person logged in to the web UI with a single-use link.
    WebLogin,
    /// The store or the outage spool held an object the gateway did not write as found (planted,
    /// altered or deleted evidence); it was not adopted.
    EvidenceRefused,
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
            Action::SigningKeyRotated => "signing_key_rotated",
            Action::Command => "command",
            Action::Statement => "statement",
            Action::SiemTest => "siem_test",
            Action::RecordingViewed => "recording_viewed",
            Action::RecordingExported => "recording_exported",
            Action::MetadataExported => "metadata_exported",
            Action::WebLogin => "web_login",
            Action::EvidenceRefused => "evidence_refused",
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
    /// Action events: the command text (SSH) or SQL text (PostgreSQL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// Action events: the recording channel the command ran on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<u32>,
    /// Action events: line editing keys (Tab, history) were used, so the text may differ
    /// from what ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uncertain: Option<bool>,
    /// Checkpoint events: how many objects of the recording `chain_head` covers, so `verify`
    /// can compare the chain at exactly that point.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub objects: Option<u64>,
    /// Key rotation events: the new manifest signing key's id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_key_id: Option<String>,
    /// Key rotation events: the id of the key that certified the new one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_signing_key_id: Option<String>,
}

impl AccessEvent {
    /// A new event with a fresh id and timestamp; callers fill the rest.
    pub fn new(action: Action, actor: &str) -> AccessEvent {
        let event_type = match action {
            Action::Command | Action::Statement => "BREAK_GLASS_ACTION",
            _ => "BREAK_GLASS_ACCESS",
        };
        AccessEvent {
            schema_version: SCHEMA_VERSION,
            event_id: uuid::Uuid::new_v4().to_string(),
            event_type: event_type.into(),
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
            command: None,
            channel: None,
            uncertain: None,
            objects: None,
            signing_key_id: None,
            previous_signing_key_id: None,
        }
    }

    /// True for per-action events (`BREAK_GLASS_ACTION`): commands and SQL statements.
    pub fn is_action(&self) -> bool {
        matches!(self.action, Action::Command | Action::Statement)
    }
}

/// The event for someone looking at (or taking away) a session's recording: `what` says what
/// they did ("replayed channel 0"); the correlation id is the session's grant's.
pub async fn recording_access(
    store: &dyn crate::state::Store,
    action: Action,
    actor: &str,
    row: &crate::state::SessionRow,
    what: &str,
) -> AccessEvent {
    let mut e = AccessEvent::new(action, actor);
    e.person = Some(row.person.clone());
    e.target = Some(row.target.clone());
    e.protocol = row.protocol.clone();
    e.session_id = Some(row.id.clone());
    e.grant_id = Some(row.grant_id.clone());
    e.correlation_id = Some(match store.find_grant(&row.grant_id).await {
        Ok(g) => g.correlation_id().to_string(),
        Err(_) => row.grant_id.clone(),
    });
    e.recording = Some(row.recording_prefix.clone());
    e.reason = Some(what.to_string());
    e.message = Some(format!("{actor} {what}: session {}", row.id));
    e
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

/// A SIEM failure.
#[derive(Debug, thiserror::Error)]
pub enum SiemError {
    #[error("siem file {path}: {why}")]
    File { path: PathBuf, why: String },
    #[error(transparent)]
    Spool(#[from] SpoolError),
    #[error(
        "the SIEM backlog of sink `{sink}` is {queued} events (limit {limit}); new sessions are \
         refused until it is delivered"
    )]
    Backlog {
        sink: String,
        queued: u64,
        limit: u64,
    },
}

/// Where events go. Delivery is durable when `emit` returns Ok.
#[async_trait]
pub trait EventSink: Send + Sync {
    async fn emit(&self, event: &AccessEvent) -> Result<(), SiemError>;
}

/// SIEM settings from the config file.
#[derive(Debug, Clone)]
pub struct SiemSettings {
    /// The spool database.
    pub spool: PathBuf,
    /// Undelivered events at which opening events (session start, request) are refused.
    pub spool_max_events: u64,
    /// When set, new sessions are refused while any sink has more undelivered events.
    pub fail_closed_backlog: Option<u64>,
    /// Every sink, the default JSONL file (`file`) first.
    pub sinks: Vec<SinkConfig>,
}

impl SiemSettings {
    /// Just the JSONL file at `path` (seed format, no action events).
    pub fn file_only(path: &Path, spool: &Path) -> SiemSettings {
        SiemSettings {
            spool: spool.to_path_buf(),
            spool_max_events: 1_000_000,
            fail_closed_backlog: None,
            sinks: vec![SinkConfig {
                name: "file".into(),
                format: Format::Seed,
                actions: false,
                batch: 1000,
                timeout: std::time::Duration::from_secs(10),
                kind: SinkKind::File {
                    path: path.to_path_buf(),
                    rotate_bytes: u64::MAX,
                },
            }],
        }
    }
}

/// Events that start something new; a full spool or an over-limit backlog refuses them.
fn opening(a: Action) -> bool {
    matches!(a, Action::SessionStart | Action::RequestCreated)
}

/// The SIEM pipeline: every event is committed to the durable spool, then local files get
/// it inline and every sink's worker delivers it in spool order.
pub struct Siem {
    settings: SiemSettings,
    spool: Arc<Spool>,
    names: Vec<String>,
    wake: tokio::sync::watch::Sender<i64>,
    full_alarm: std::sync::atomic::AtomicBool,
    actions: Option<tokio::sync::mpsc::Sender<AccessEvent>>,
}

impl Siem {
    /// Opens the spool and registers the sinks. No delivery happens in the background until
    /// [`Siem::start`]; local files are still written inline by `emit`.
    pub fn open(settings: SiemSettings) -> Result<Siem, SiemError> {
        let spool = Arc::new(Spool::open(&settings.spool, settings.spool_max_events)?);
        let names: Vec<String> = settings.sinks.iter().map(|s| s.name.clone()).collect();
        spool.register(&names)?;
        Ok(Siem {
            settings,
            spool,
            names,
            wake: tokio::sync::watch::channel(0).0,
            full_alarm: std::sync::atomic::AtomicBool::new(false),
            actions: None,
        })
    }

    /// Starts one delivery worker per sink and the batcher for action events; they stop
    /// when `stop` is cancelled (undelivered events stay in the spool for the next start).
    pub fn start(
        mut self,
        stop: tokio_util::sync::CancellationToken,
    ) -> Result<Arc<Siem>, SiemError> {
        if self.settings.sinks.iter().any(|s| s.actions) {
            let (tx, rx) = tokio::sync::mpsc::channel(65_536);
            self.actions = Some(tx);
            let spool = self.spool.clone();
            let wake = self.wake.clone();
            tokio::spawn(batch_actions(rx, spool, wake));
        }
        for cfg in &self.settings.sinks {
            let d = Deliverer::new(Arc::new(cfg.clone())).map_err(|why| SiemError::File {
                path: PathBuf::from(&cfg.name),
                why,
            })?;
            tokio::spawn(sink::run_worker(
                self.spool.clone(),
                d,
                self.wake.subscribe(),
                self.names.clone(),
                stop.clone(),
            ));
        }
        Ok(Arc::new(self))
    }

    /// True when some sink takes per-action events, so producers should make them.
    pub fn wants_actions(&self) -> bool {
        self.actions.is_some()
    }

    /// Queues a per-action event (command, SQL statement) without waiting: action events
    /// are spooled in batches. The recording holds the same facts durably; a crash can lose
    /// at most the last batch of these copies.
    pub fn action(&self, e: AccessEvent) {
        if let Some(tx) = &self.actions {
            if tx.try_send(e).is_err() {
                tracing::error!("SIEM action queue full; an action event was not spooled (it is in the recording)");
            }
        }
    }

    /// A recorder hook that turns each command or statement of the session described by
    /// `info` into a `BREAK_GLASS_ACTION` event; None when no sink takes action events.
    pub fn action_hook(
        self: &Arc<Self>,
        info: &crate::record::SessionInfo,
        correlation_id: &str,
    ) -> Option<crate::record::ActionHook> {
        if !self.wants_actions() {
            return None;
        }
        let siem = self.clone();
        let info = info.clone();
        let correlation_id = correlation_id.to_string();
        let action = if info.protocol == "postgres" {
            Action::Statement
        } else {
            Action::Command
        };
        Some(Arc::new(
            move |channel: u32, text: &str, uncertain: bool| {
                let mut e = AccessEvent::new(action, &info.person);
                e.person = Some(info.person.clone());
                e.target = Some(info.target.clone());
                e.protocol = info.protocol.clone();
                e.session_id = Some(info.session_id.clone());
                e.grant_id = Some(info.grant_id.clone());
                e.correlation_id = Some(correlation_id.clone());
                e.justification = Some(info.justification.clone());
                e.incident_id = Some(info.incident_id.clone());
                e.client_addr = Some(info.client_addr.clone());
                e.command = Some(text.to_string());
                e.channel = Some(channel);
                e.uncertain = uncertain.then_some(true);
                siem.action(e);
            },
        ))
    }

    /// Delivery figures per sink.
    pub async fn stats(&self) -> Vec<SinkStats> {
        let spool = self.spool.clone();
        let sinks: Vec<(String, bool)> = self
            .settings
            .sinks
            .iter()
            .map(|s| (s.name.clone(), s.actions))
            .collect();
        tokio::task::spawn_blocking(move || {
            sinks
                .iter()
                .filter_map(|(n, a)| spool.stats(n, *a).ok())
                .collect()
        })
        .await
        .unwrap_or_default()
    }

    /// The configured sinks.
    pub fn sinks(&self) -> &[SinkConfig] {
        &self.settings.sinks
    }

    /// Sends `e` straight to every sink (not through the spool) and reports each result.
    pub async fn test(&self, e: &AccessEvent) -> Vec<(String, Result<(), String>)> {
        let mut out = Vec::new();
        for cfg in &self.settings.sinks {
            let r = match Deliverer::new(Arc::new(cfg.clone())) {
                Ok(mut d) => d.deliver(&[e]).await,
                Err(e) => Err(e),
            };
            out.push((cfg.name.clone(), r));
        }
        out
    }

    fn admit(&self, e: &AccessEvent) -> Result<(), SiemError> {
        let Some(limit) = self
            .settings
            .fail_closed_backlog
            .filter(|_| opening(e.action))
        else {
            return Ok(());
        };
        for cfg in &self.settings.sinks {
            let st = self.spool.stats(&cfg.name, cfg.actions)?;
            if st.queued > limit {
                return Err(SiemError::Backlog {
                    sink: cfg.name.clone(),
                    queued: st.queued,
                    limit,
                });
            }
        }
        Ok(())
    }

    /// Writes every local file sink from the spool, under the spool's write lock.
    fn deliver_local(&self) {
        for cfg in self.settings.sinks.iter().filter(|s| s.is_local()) {
            let SinkKind::File { path, rotate_bytes } = &cfg.kind else {
                continue;
            };
            let r = self
                .spool
                .deliver_exclusive(&cfg.name, cfg.actions, |events| {
                    let refs: Vec<&AccessEvent> = events.iter().map(|s| &s.event).collect();
                    sink::write_file(path, *rotate_bytes, cfg.format, &refs)
                });
            if let Err(e) = r {
                tracing::error!(sink = %cfg.name, error = %e, "SIEM file not written; the event stays spooled and is retried");
            }
        }
        if let Err(e) = self.spool.prune(&self.names) {
            tracing::warn!(error = %e, "SIEM spool not pruned");
        }
    }

    fn emit_blocking(&self, e: &AccessEvent) -> Result<i64, SiemError> {
        self.admit(e)?;
        let seq = match self
            .spool
            .append(std::slice::from_ref(e), opening(e.action))
        {
            Ok(seq) => seq,
            Err(err @ SpoolError::Full { .. }) => {
                if !self
                    .full_alarm
                    .swap(true, std::sync::atomic::Ordering::Relaxed)
                {
                    tracing::error!(error = %err, "ALARM: SIEM spool full");
                }
                return Err(err.into());
            }
            Err(err) => return Err(err.into()),
        };
        self.full_alarm
            .store(false, std::sync::atomic::Ordering::Relaxed);
        self.deliver_local();
        Ok(seq)
    }
}

#[async_trait]
impl EventSink for Arc<Siem> {
    async fn emit(&self, event: &AccessEvent) -> Result<(), SiemError> {
        let me = self.clone();
        let e = event.clone();
        let seq = tokio::task::spawn_blocking(move || me.emit_blocking(&e))
            .await
            .map_err(|e| SiemError::File {
                path: self.settings.spool.clone(),
                why: e.to_string(),
            })??;
        self.wake.send_replace(seq);
        Ok(())
    }
}

/// Spools action events in groups: one transaction per burst.
async fn batch_actions(
    mut rx: tokio::sync::mpsc::Receiver<AccessEvent>,
    spool: Arc<Spool>,
    wake: tokio::sync::watch::Sender<i64>,
) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < 1000 {
            match rx.try_recv() {
                Ok(e) => batch.push(e),
                Err(_) => break,
            }
        }
        let sp = spool.clone();
        match tokio::task::spawn_blocking(move || sp.append(&batch, false)).await {
            Ok(Ok(seq)) => {
                wake.send_replace(seq);
            }
            Ok(Err(e)) => tracing::error!(error = %e, "SIEM action events not spooled"),
            Err(e) => tracing::error!(error = %e, "SIEM action batcher failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn events_reach_the_file_before_emit_returns() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("siem.jsonl");
        let siem = Arc::new(
            Siem::open(SiemSettings::file_only(
                &path,
                &dir.path().join("spool.sqlite"),
            ))
            .expect("open"),
        );
        let mut e = AccessEvent::new(Action::SessionStart, "alice");
        e.target = Some("web-01".into());
        siem.emit(&e).await.expect("emit");
        siem.emit(&AccessEvent::new(Action::SessionEnd, "alice"))
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
        assert!(
            siem.spool.is_empty().expect("len"),
            "delivered events leave the spool"
        );
    }

    #[tokio::test]
    async fn an_over_limit_backlog_refuses_new_sessions_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut settings =
            SiemSettings::file_only(&dir.path().join("siem.jsonl"), &dir.path().join("s.sqlite"));
        settings.fail_closed_backlog = Some(1);
        settings.sinks.push(SinkConfig {
            name: "down".into(),
            format: Format::Ocsf,
            actions: false,
            batch: 10,
            timeout: std::time::Duration::from_secs(1),
            kind: SinkKind::Webhook {
                url: crate::alerts::Url::parse("http://127.0.0.1:9/").expect("url"),
                bearer: None,
                hmac_secret: None,
                ca_file: None,
            },
        });
        let siem = Arc::new(Siem::open(settings).expect("open"));
        for _ in 0..2 {
            siem.emit(&AccessEvent::new(Action::SessionStart, "alice"))
                .await
                .expect("under the limit");
        }
        match siem
            .emit(&AccessEvent::new(Action::SessionStart, "alice"))
            .await
        {
            Err(SiemError::Backlog {
                sink,
                queued: 2,
                limit: 1,
            }) => assert_eq!(sink, "down"),
            other => panic!("expected a backlog refusal, got {other:?}"),
        }
        siem.emit(&AccessEvent::new(Action::SessionEnd, "alice"))
            .await
            .expect("ends are never refused");
    }
}
