//! Audit events for the SIEM, kept apart from operational logs. Every event is committed to
//! a durable spool before `emit` returns (so before a session may start); the local JSONL
//! file is written inline and every other sink is fed by its own delivery worker, with
//! per-sink acknowledgement, retries and restart recovery.

pub mod format;
pub mod outbox;
pub mod sink;
pub mod spool;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

pub use format::Format;
pub use outbox::{LocalOutbox, Outbox, SharedOutbox};
use sink::Deliverer;
pub use sink::{SinkConfig, SinkKind, Transport};
pub use spool::{SinkStats, Spool, SpoolError};

/// Version of the event shape in `recordings-schema/siem-event.schema.json`.
pub const SCHEMA_VERSION: u32 = 1;

/// Whether what an event reports succeeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Success,
    Failure,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Failure => "failure",
        }
    }
}

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
    /// A PostgreSQL target's break-glass role got LOGIN because a grant (or its rotation)
    /// needs it.
    AccountEnabled,
    /// The role went back to NOLOGIN: no grant needs it.
    AccountDisabled,
    /// `breakglass drill` finished: passed (success) or failed at `reason` (the step).
    DrillFinished,
    /// A target has had no passed drill for longer than `[drills] every`.
    DrillOverdue,
    /// An automated audit finding about an ended session (`crate::findings`).
    Finding,
    /// `breakglass incident-report` wrote an incident's report (signed manifest).
    IncidentReported,
    /// The change advisory board signed its review of an incident (`item`: the outcome).
    CabSigned,
    /// An item of an incident's timeline (`item`: rotation, report, cab) passed its limit.
    IncidentOverdue,
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
    /// `BREAK_GLASS_ACTION` events of a session that never reached the spool (the action
    /// queue was full, or spooling them failed); `actions_dropped` holds the count. The
    /// recording still holds every command and statement.
    ActionsDropped,
    /// Someone searched the commands and SQL of recordings (`query`, `session_ids`).
    RecordingSearched,
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
            Action::AccountEnabled => "account_enabled",
            Action::AccountDisabled => "account_disabled",
            Action::DrillFinished => "drill_finished",
            Action::DrillOverdue => "drill_overdue",
            Action::Finding => "finding",
            Action::IncidentReported => "incident_reported",
            Action::CabSigned => "cab_signed",
            Action::IncidentOverdue => "incident_overdue",
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
            Action::ActionsDropped => "actions_dropped",
            Action::RecordingSearched => "recording_searched",
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
    pub outcome: Outcome,
    /// Machine-readable reason (denial code or end reason).
    pub reason: Option<String>,
    /// The human sentence the client saw.
    pub message: Option<String>,
    /// `client`, `upstream` or `internal`: who caused a failure.
    pub side: Option<crate::grant::Side>,
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
    /// `actions_dropped`: how many action events of the session never reached the spool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actions_dropped: Option<u64>,
    /// `recording_searched`: the text searched for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
    /// `recording_searched`: every session with a hit that was served, in hit order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_ids: Option<Vec<String>>,
    /// `drill_finished`: from the request to the first byte of the scripted command's output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_to_access_ms: Option<u64>,
    /// `finding`: the moment in the recording, in milliseconds from the channel's start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset_ms: Option<u64>,
    /// `review_signed`: the answers to the review's questions (see `ReviewAnswers`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thresholds_met: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thresholds_note: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub escalation_possible: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub escalation_note: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actions_taken: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub procedure_update: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub procedure_change: Option<String>,
    /// `incident_overdue`: the timeline item (`rotation`, `report`, `cab`); `cab_signed`:
    /// the CAB's outcome (`accepted`, `actions-required`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub item: Option<String>,
}

impl AccessEvent {
    /// An event about a grant, with its person, target, request, incident, deadline and the
    /// correlation id that ties it to its request (every surface builds grant events here).
    pub fn for_grant(action: Action, actor: &str, g: &crate::grant::Grant) -> AccessEvent {
        let mut e = AccessEvent::new(action, actor);
        e.person = Some(g.person.clone());
        e.target = Some(g.target.clone());
        e.grant_id = Some(g.id.clone());
        e.request_id = g.request_id.clone();
        e.correlation_id = Some(g.correlation_id().to_string());
        e.justification = Some(g.reason.clone());
        e.incident_id = Some(g.incident_id.clone());
        e.deadline = Some(crate::clock::rfc3339(g.expires_at));
        e
    }

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
            outcome: Outcome::Success,
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
            actions_dropped: None,
            time_to_access_ms: None,
            offset_ms: None,
            query: None,
            session_ids: None,
            thresholds_met: None,
            thresholds_note: None,
            escalation_possible: None,
            escalation_note: None,
            actions_taken: None,
            procedure_update: None,
            procedure_change: None,
            item: None,
        }
    }

    /// Puts a review's answers on a `review_signed` event.
    pub fn with_answers(mut self, a: &crate::state::ReviewAnswers) -> AccessEvent {
        self.thresholds_met = Some(a.thresholds_met);
        self.thresholds_note = Some(a.thresholds_note.clone());
        self.escalation_possible = Some(a.escalation_possible);
        self.escalation_note = Some(a.escalation_note.clone());
        self.actions_taken = Some(a.actions_taken.clone());
        self.procedure_update = Some(a.procedure_update);
        self.procedure_change = Some(a.procedure_change.clone());
        self
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

/// The event for a search over recordings (`recording_searched`): who searched, for what,
/// under which filter (`narrowed`, e.g. "person=bob"), and every session whose hits were
/// served. A search spans sessions, so it has no session or correlation id of its own.
pub fn recording_search(
    actor: &str,
    query: &str,
    narrowed: &[String],
    hits: usize,
    session_ids: Vec<String>,
) -> AccessEvent {
    let mut e = AccessEvent::new(Action::RecordingSearched, actor);
    e.reason = Some("searched".into());
    let within = if narrowed.is_empty() {
        String::new()
    } else {
        format!(" ({})", narrowed.join(", "))
    };
    e.message = Some(format!(
        "{actor} searched recordings for {query:?}{within}: {hits} hit(s) in {} session(s)",
        session_ids.len()
    ));
    e.query = Some(query.to_string());
    e.session_ids = Some(session_ids);
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

pub use crate::config::siem::SiemSettings;

/// Events that start something new; a full spool or an over-limit backlog refuses them.
fn opening(a: Action) -> bool {
    matches!(a, Action::SessionStart | Action::RequestCreated)
}

/// The most action events waiting for the batcher. Full-queue policy: the event is not
/// queued (the recorder must never wait on the SIEM) and is counted as dropped for its
/// session; the count goes on the record as an `actions_dropped` event at session end.
pub const ACTION_QUEUE_EVENTS: usize = 65_536;

/// The most bytes (counted by [`queued_size`]) of action events waiting for the batcher;
/// same full-queue policy as [`ACTION_QUEUE_EVENTS`]. An event costs over 1 KB even with a
/// short command, so for short commands this bound, not the event count, is reached first
/// (at some 25,000 to 30,000 queued events).
pub const ACTION_QUEUE_BYTES: usize = 32 << 20;

/// How long a session end waits for its queued action events to be spooled before it
/// reports what it knows.
const ACTION_SETTLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The action events of one session that did not reach the spool. Shared by the session's
/// hook (drops at the queue), the batcher (events whose spooling failed) and the session end
/// (which reports the count).
struct SessionActions {
    /// Who and where, for the `actions_dropped` event.
    info: crate::record::SessionInfo,
    correlation_id: String,
    /// Events lost so far.
    dropped: std::sync::atomic::AtomicU64,
    /// Set once the count has been reported; a later loss can then only be logged.
    settled: std::sync::atomic::AtomicBool,
}

impl SessionActions {
    fn drop_one(&self) {
        self.dropped
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if self.settled.load(std::sync::atomic::Ordering::SeqCst) {
            tracing::error!(session_id = %self.info.session_id, "a SIEM action event was lost after its session's actions_dropped count was reported (it is in the recording)");
        }
    }
}

/// What waits in the action queue.
enum Queued {
    /// An action event, its estimated size and the session it counts against.
    Event(Box<AccessEvent>, usize, Arc<SessionActions>),
    /// Answered once everything queued before it is spooled (or counted as dropped).
    Drain(tokio::sync::oneshot::Sender<()>),
}

/// The size an action event is charged in the queue: the event itself, its box, and the
/// text of every field an action hook fills.
fn queued_size(e: &AccessEvent) -> usize {
    let opt = |o: &Option<String>| o.as_ref().map_or(0, String::len);
    std::mem::size_of::<AccessEvent>()
        + e.event_id.len()
        + e.event_type.len()
        + e.timestamp.len()
        + e.actor.len()
        + e.protocol.len()
        + e.outcome.as_str().len()
        + [
            &e.person,
            &e.target,
            &e.session_id,
            &e.grant_id,
            &e.correlation_id,
            &e.justification,
            &e.incident_id,
            &e.client_addr,
            &e.command,
        ]
        .into_iter()
        .map(opt)
        .sum::<usize>()
}

/// The bounded queue in front of the action batcher.
struct ActionQueue {
    tx: tokio::sync::mpsc::Sender<Queued>,
    /// Estimated bytes queued, bounded by `max_bytes`.
    bytes: Arc<std::sync::atomic::AtomicUsize>,
    max_bytes: usize,
    /// Sessions whose action hook exists; removed when the session settles.
    sessions: std::sync::Mutex<std::collections::HashMap<String, Arc<SessionActions>>>,
}

/// The SIEM pipeline: every event is committed to the durable spool, then local files get
/// it inline and every sink's worker delivers it in spool order.
pub struct Siem {
    settings: SiemSettings,
    /// Where events wait for their sinks.
    outbox: Arc<dyn Outbox>,
    names: Vec<String>,
    wake: tokio::sync::watch::Sender<i64>,
    full_alarm: std::sync::atomic::AtomicBool,
    /// Present when some sink takes action events.
    actions: Option<ActionQueue>,
    /// Set once by the gateway: custodians hear of dead-lettered events.
    alerter: Arc<std::sync::OnceLock<DeadLetterHook>>,
    /// Restarts of each sink's worker (panics and errors), for `/metrics`.
    restarts: Vec<(String, Arc<std::sync::atomic::AtomicU64>)>,
}

/// Called for every event a sink refused for good: (sink, event, why, dead-letter file).
pub type DeadLetterHook = Arc<dyn Fn(&str, &AccessEvent, &str, &std::path::Path) + Send + Sync>;

/// The `finding` event of an audit finding. Its id is derived from the finding, so that a
/// session indexed twice (two nodes, or the CLI and the gateway) yields the same event ids,
/// which the spool and the shared outbox keep once.
pub fn finding_event(f: &crate::findings::Finding) -> AccessEvent {
    use sha2::Digest;
    let mut e = AccessEvent::new(Action::Finding, "breakglass");
    let key = format!(
        "{}|{}|{:?}|{:?}|{}",
        f.session_id, f.rule, f.channel, f.offset_seconds, f.detail
    );
    let digest = sha2::Sha256::digest(key.as_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    e.event_id = uuid::Builder::from_custom_bytes(bytes)
        .into_uuid()
        .to_string();
    e.person = Some(f.person.clone());
    e.target = Some(f.target.clone());
    e.session_id = Some(f.session_id.clone());
    e.reason = Some(f.rule.to_string());
    e.severity = Some(
        match f.severity {
            crate::findings::Severity::Info => "low",
            crate::findings::Severity::Warning => "medium",
            crate::findings::Severity::High => "high",
        }
        .to_string(),
    );
    e.channel = f.channel;
    e.offset_ms = f.offset_seconds.map(|o| (o.max(0.0) * 1000.0) as u64);
    e.message = Some(format!("{} at {}: {}", f.rule, f.at, f.detail));
    e
}

/// One line a human reads in a chat channel. The event's text came from people (a reason, an
/// incident id), so its control characters are shown as escapes (`text::terminal`); the Slack
/// body escapes markup on top (`alerts::slack_body`).
pub fn summary(e: &AccessEvent) -> String {
    crate::text::terminal(&summary_raw(e)).into_owned()
}

fn summary_raw(e: &AccessEvent) -> String {
    let who = e.person.as_deref().unwrap_or(&e.actor);
    let target = e.target.as_deref().unwrap_or("?");
    let incident = e.incident_id.as_deref().unwrap_or("-");
    let why = e.justification.as_deref().unwrap_or("");
    match e.action {
        Action::RequestCreated => format!(
            "[breakglass] {who} requests break-glass access to {target} ({incident}, {}, {}): {why}. Request {}",
            e.severity.as_deref().unwrap_or("-"),
            e.scenario.as_deref().unwrap_or("-"),
            e.request_id.as_deref().unwrap_or("?")
        ),
        Action::RequestApproved => format!(
            "[breakglass] {} approved {who}'s request for {target} ({incident})",
            e.actor
        ),
        Action::RequestDenied => format!(
            "[breakglass] {} denied {who}'s request for {target} ({incident}): {}",
            e.actor,
            e.reason.as_deref().unwrap_or("")
        ),
        Action::SessionStart => format!(
            "[breakglass] {who} started a break-glass session on {target} ({incident}) until {}",
            e.deadline.as_deref().unwrap_or("?")
        ),
        Action::SessionRevoked | Action::GrantRevoked => format!(
            "[breakglass] {}: {who}'s access to {target} ({incident}) was revoked",
            e.actor
        ),
        Action::GrantCreated if e.emergency == Some(true) => format!(
            "[breakglass] EMERGENCY SELF-SERVICE: {who} granted themselves access to {target} ({incident}) without a second person: {why}. Mandatory review."
        ),
        Action::ReviewOverdue => format!(
            "[breakglass] OVERDUE: the post-incident review {} of {who}'s access to {target} ({incident}) was due at {}",
            e.review_id.as_deref().unwrap_or("?"),
            e.due_at.as_deref().unwrap_or("?")
        ),
        Action::CredentialRotated => format!(
            "[breakglass] credential rotation for {target}: {}",
            e.message.as_deref().unwrap_or(e.outcome.as_str())
        ),
        Action::SigningKeyRotated => format!(
            "[breakglass] {} rotated the manifest signing key: {} is certified by {}",
            e.actor,
            e.signing_key_id.as_deref().unwrap_or("?"),
            e.previous_signing_key_id.as_deref().unwrap_or("?")
        ),
        Action::EvidenceRefused => format!(
            "[breakglass] evidence refused for {who} on {target}: {}",
            e.message.as_deref().unwrap_or("?")
        ),
        // Not alertable (see `alertable`), but a webhook test or a future rule may send them.
        Action::Finding => format!(
            "[breakglass] finding on {who}'s session on {target}: {}",
            e.message.as_deref().unwrap_or("")
        ),
        Action::IncidentOverdue => format!(
            "[breakglass] OVERDUE ({incident}): {}",
            e.message.as_deref().unwrap_or("an item of the incident's timeline is late")
        ),
        Action::DrillOverdue => format!(
            "[breakglass] DRILL OVERDUE for {target}: {}",
            e.message.as_deref().unwrap_or("no drill passed in time")
        ),
        Action::DrillFinished => format!(
            "[breakglass] drill of {target} by {who}: {}",
            e.message.as_deref().unwrap_or(e.outcome.as_str())
        ),
        Action::AccountEnabled | Action::AccountDisabled => format!(
            "[breakglass] {target}: {}",
            e.message.as_deref().unwrap_or(e.action.as_str())
        ),
        Action::GrantCreated
        | Action::SessionEnd
        | Action::SessionDenied
        | Action::SessionExpired
        | Action::ForwardingRefused
        | Action::RequestExpired
        | Action::ReviewOpened
        | Action::ReviewSigned
        | Action::IncidentReported
        | Action::CabSigned
        | Action::CredentialIssued
        | Action::RecordingCheckpoint
        | Action::Command
        | Action::Statement
        | Action::SiemTest
        | Action::RecordingViewed
        | Action::RecordingExported
        | Action::MetadataExported
        | Action::WebLogin
        | Action::ActionsDropped
        | Action::RecordingSearched => {
            format!("[breakglass] {} {who} {target} ({incident})", e.action.as_str())
        }
    }
}

impl Siem {
    /// Opens the spool and registers the sinks. No delivery happens in the background until
    /// [`Siem::start`]; local files are still written inline by `emit`.
    pub fn open(settings: SiemSettings) -> Result<Siem, SiemError> {
        let spool = Arc::new(Spool::open(&settings.spool, settings.spool_max_events)?);
        let names: Vec<String> = settings.sinks.iter().map(|s| s.name.clone()).collect();
        spool.register(&names)?;
        Ok(Siem::with_outbox(
            settings,
            Arc::new(LocalOutbox(spool)),
            names,
        ))
    }

    /// Opens the SIEM of a cluster node: events go to the shared outbox in the state store
    /// `pg`; `node` names this node as the holder of the sink leases it takes, for `lease`.
    pub async fn open_shared(
        settings: SiemSettings,
        pg: crate::state::PgStore,
        node: &str,
        lease: std::time::Duration,
    ) -> Result<Siem, SiemError> {
        let spool = Arc::new(Spool::open(&settings.spool, settings.spool_max_events)?);
        let names: Vec<String> = settings.sinks.iter().map(|s| s.name.clone()).collect();
        let outbox = SharedOutbox::new(pg, node, lease, settings.spool_max_events, spool.clone())?;
        outbox.register(&names).await?;
        Ok(Siem::with_outbox(settings, Arc::new(outbox), names))
    }

    /// Opens the SIEM on the outbox the state store calls for: the shared one when the store
    /// is a cluster's PostgreSQL, else this node's spool file.
    pub async fn open_for(
        cfg: &crate::config::Config,
        store: &dyn crate::state::Store,
    ) -> Result<Siem, SiemError> {
        match store.postgres() {
            Some(pg) => {
                Siem::open_shared(
                    cfg.siem.clone(),
                    pg.clone(),
                    &cfg.cluster.node_id(),
                    cfg.cluster.lease,
                )
                .await
            }
            None => Siem::open(cfg.siem.clone()),
        }
    }

    fn with_outbox(settings: SiemSettings, outbox: Arc<dyn Outbox>, names: Vec<String>) -> Siem {
        Siem {
            settings,
            outbox,
            names,
            wake: tokio::sync::watch::channel(0).0,
            full_alarm: std::sync::atomic::AtomicBool::new(false),
            actions: None,
            alerter: Arc::new(std::sync::OnceLock::new()),
            restarts: Vec::new(),
        }
    }

    /// Starts one delivery worker per sink and the batcher for action events; they stop
    /// when `stop` is cancelled (undelivered events stay in the spool for the next start).
    pub fn start(
        mut self,
        stop: tokio_util::sync::CancellationToken,
    ) -> Result<Arc<Siem>, SiemError> {
        if self.settings.sinks.iter().any(|s| s.actions) {
            self.start_actions(ACTION_QUEUE_EVENTS, ACTION_QUEUE_BYTES);
        }
        if self.outbox.shared() {
            tokio::spawn(forward(self.outbox.clone(), stop.clone()));
        }
        let ctx = sink::WorkerContext {
            outbox: self.outbox.clone(),
            wake: self.wake.clone(),
            all_sinks: self.names.clone(),
            dead_letters: self.dead_letter_path(),
            alerter: self.alerter.clone(),
            stop: stop.clone(),
        };
        for cfg in &self.settings.sinks {
            // Settings a worker cannot start with are a config error now, not a restart loop.
            Deliverer::new(Arc::new(cfg.clone())).map_err(|why| SiemError::File {
                path: PathBuf::from(&cfg.name),
                why,
            })?;
            let restarts = Arc::new(std::sync::atomic::AtomicU64::new(0));
            self.restarts.push((cfg.name.clone(), restarts.clone()));
            let (cfg, ctx) = (Arc::new(cfg.clone()), ctx.clone());
            tokio::spawn(supervise(
                cfg.name.clone(),
                restarts,
                stop.clone(),
                move || sink::run_worker(cfg.clone(), ctx.clone()),
            ));
        }
        Ok(Arc::new(self))
    }

    /// The dead-letter file: events a sink refused for good, next to the spool.
    pub fn dead_letter_path(&self) -> PathBuf {
        self.settings
            .spool
            .parent()
            .unwrap_or(Path::new("."))
            .join("siem-dead-letter.jsonl")
    }

    /// Lets dead-lettered events alert custodians (the alerter starts after the SIEM).
    pub fn on_dead_letter(&self, alerter: DeadLetterHook) {
        // Set once at start-up; a second call changes nothing.
        let _ = self.alerter.set(alerter);
    }

    /// Dead-letter and worker-restart counters in Prometheus text format.
    pub async fn metrics(&self, out: &mut String) {
        use std::fmt::Write;
        let stats = self.stats().await;
        let _ = writeln!(
            out,
            "# HELP breakglass_siem_dead_letter_total Events the sink refused for good, kept in the dead-letter file.\n# TYPE breakglass_siem_dead_letter_total counter"
        );
        for s in &stats {
            let _ = writeln!(
                out,
                "breakglass_siem_dead_letter_total{{sink=\"{}\"}} {}",
                s.sink, s.dead_lettered
            );
        }
        let _ = writeln!(
            out,
            "# HELP breakglass_siem_worker_restarts_total Restarts of the sink's delivery worker after a panic or an error.\n# TYPE breakglass_siem_worker_restarts_total counter"
        );
        for (name, n) in &self.restarts {
            let _ = writeln!(
                out,
                "breakglass_siem_worker_restarts_total{{sink=\"{name}\"}} {}",
                n.load(std::sync::atomic::Ordering::Relaxed)
            );
        }
    }

    /// True when some sink takes per-action events, so producers should make them.
    pub fn wants_actions(&self) -> bool {
        self.actions.is_some()
    }

    /// Opens the action queue (`events` and `max_bytes` bound it) and starts its batcher.
    fn start_actions(&mut self, events: usize, max_bytes: usize) {
        let (tx, rx) = tokio::sync::mpsc::channel(events);
        let bytes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        tokio::spawn(batch_actions(
            rx,
            bytes.clone(),
            self.outbox.clone(),
            self.wake.clone(),
        ));
        self.actions = Some(ActionQueue {
            tx,
            bytes,
            max_bytes,
            sessions: Default::default(),
        });
    }

    /// Queues a per-action event (command, SQL statement) without waiting: action events
    /// are spooled in batches. When the queue is full (in events or bytes) the event is
    /// counted as dropped for its session instead; [`Siem::settle_actions`] puts the count
    /// on the record. The recording holds the same facts durably; a crash can lose at most
    /// the queued copies.
    fn action(&self, e: AccessEvent, session: &Arc<SessionActions>) {
        use std::sync::atomic::Ordering;
        let Some(q) = &self.actions else {
            return;
        };
        let size = queued_size(&e);
        if q.bytes.fetch_add(size, Ordering::SeqCst) + size > q.max_bytes {
            q.bytes.fetch_sub(size, Ordering::SeqCst);
            session.drop_one();
            return;
        }
        if q.tx
            .try_send(Queued::Event(Box::new(e), size, session.clone()))
            .is_err()
        {
            q.bytes.fetch_sub(size, Ordering::SeqCst);
            session.drop_one();
        }
    }

    /// A recorder hook that turns each command or statement of the session described by
    /// `info` into a `BREAK_GLASS_ACTION` event; None when no sink takes action events.
    /// The session must end with [`Siem::settle_actions`].
    pub fn action_hook(
        self: &Arc<Self>,
        info: &crate::record::SessionInfo,
        correlation_id: &str,
    ) -> Option<crate::record::ActionHook> {
        let q = self.actions.as_ref()?;
        let session = Arc::new(SessionActions {
            info: info.clone(),
            correlation_id: correlation_id.to_string(),
            dropped: Default::default(),
            settled: Default::default(),
        });
        {
            let mut sessions = q.sessions.lock().unwrap_or_else(|p| p.into_inner());
            // A session refused after its hook was made never settles: once nothing but
            // this map holds its tally and it lost nothing, there is nothing to report.
            sessions.retain(|_, s| {
                Arc::strong_count(s) > 1 || s.dropped.load(std::sync::atomic::Ordering::SeqCst) > 0
            });
            sessions.insert(info.session_id.clone(), session.clone());
        }
        let siem = self.clone();
        let action = if info.protocol == "postgres" {
            Action::Statement
        } else {
            Action::Command
        };
        Some(Arc::new(
            move |channel: u32, text: &str, uncertain: bool| {
                let info = &session.info;
                let mut e = AccessEvent::new(action, &info.person);
                e.person = Some(info.person.clone());
                e.target = Some(info.target.clone());
                e.protocol = info.protocol.clone();
                e.session_id = Some(info.session_id.clone());
                e.grant_id = Some(info.grant_id.clone());
                e.correlation_id = Some(session.correlation_id.clone());
                e.justification = Some(info.justification.clone());
                e.incident_id = Some(info.incident_id.clone());
                e.client_addr = Some(info.client_addr.clone());
                e.command = Some(text.to_string());
                e.channel = Some(channel);
                e.uncertain = uncertain.then_some(true);
                siem.action(e, &session);
            },
        ))
    }

    /// Ends the action accounting of a session whose recorder has finished (so its hook
    /// fires no more): waits until every action event it queued is spooled or counted as
    /// lost, then returns the `actions_dropped` event to audit when any was lost. A caller
    /// emits it through the durable audit path before the session's end event.
    pub async fn settle_actions(&self, session_id: &str) -> Option<AccessEvent> {
        use std::sync::atomic::Ordering;
        let q = self.actions.as_ref()?;
        let session = q
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(session_id)?;
        let (ack, acked) = tokio::sync::oneshot::channel();
        let drained = tokio::time::timeout(ACTION_SETTLE_TIMEOUT, async {
            q.tx.send(Queued::Drain(ack)).await.is_ok() && acked.await.is_ok()
        })
        .await
        .unwrap_or(false);
        session.settled.store(true, Ordering::SeqCst);
        let dropped = session.dropped.load(Ordering::SeqCst);
        if dropped == 0 && drained {
            return None;
        }
        let info = &session.info;
        let mut e = AccessEvent::new(Action::ActionsDropped, &info.person);
        e.person = Some(info.person.clone());
        e.target = Some(info.target.clone());
        e.protocol = info.protocol.clone();
        e.session_id = Some(info.session_id.clone());
        e.grant_id = Some(info.grant_id.clone());
        e.correlation_id = Some(session.correlation_id.clone());
        e.justification = Some(info.justification.clone());
        e.incident_id = Some(info.incident_id.clone());
        e.client_addr = Some(info.client_addr.clone());
        e.outcome = crate::siem::Outcome::Failure;
        e.side = Some(crate::grant::Side::Internal);
        e.actions_dropped = Some(dropped);
        if drained {
            e.reason = Some("action_queue".into());
            e.message = Some(format!(
                "{dropped} action event(s) of this session never reached the SIEM spool; the recording holds every command and statement"
            ));
        } else {
            e.reason = Some("action_queue_undrained".into());
            e.message = Some(format!(
                "{dropped} action event(s) of this session never reached the SIEM spool, and its queued action events were not spooled within {}s of the session end (any later loss is only logged); the recording holds every command and statement",
                ACTION_SETTLE_TIMEOUT.as_secs()
            ));
        }
        tracing::error!(session_id = %info.session_id, dropped, drained, "SIEM action events lost; reported as actions_dropped");
        Some(e)
    }

    /// Delivery figures per sink.
    pub async fn stats(&self) -> Vec<SinkStats> {
        let mut out = Vec::new();
        for s in &self.settings.sinks {
            match self.outbox.stats(&s.name, s.actions).await {
                Ok(st) => out.push(st),
                Err(e) => {
                    tracing::warn!(sink = %s.name, error = %e, "SIEM delivery figures unavailable")
                }
            }
        }
        out
    }

    /// The configured sinks' names, in config order.
    pub fn sink_names(&self) -> Vec<String> {
        self.settings.sinks.iter().map(|s| s.name.clone()).collect()
    }

    /// True when a cluster's nodes share this SIEM's outbox.
    pub fn shared(&self) -> bool {
        self.outbox.shared()
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
                Ok(mut d) => d.deliver(&[e]).await.map_err(|f| f.to_string()),
                Err(e) => Err(e),
            };
            out.push((cfg.name.clone(), r));
        }
        out
    }

    async fn admit(&self, e: &AccessEvent) -> Result<(), SiemError> {
        let Some(limit) = self
            .settings
            .fail_closed_backlog
            .filter(|_| opening(e.action))
        else {
            return Ok(());
        };
        for cfg in &self.settings.sinks {
            let st = self.outbox.stats(&cfg.name, cfg.actions).await?;
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

    /// Writes every local file sink from the outbox, under its write lock.
    async fn deliver_local(&self) {
        // In a cluster a file sink is written only by the node holding its lease (its
        // worker): writing inline on every node too would write events twice. The workers
        // prune after each acknowledgement, so emit adds no round trip of its own.
        if self.outbox.shared() {
            return;
        }
        for cfg in self.settings.sinks.iter().filter(|s| s.is_local()) {
            if let Err(e) = self.outbox.deliver_file(cfg).await {
                tracing::error!(sink = %cfg.name, error = %e, "SIEM file not written; the event stays spooled and is retried");
            }
        }
        if let Err(e) = self.outbox.prune(&self.names).await {
            tracing::warn!(error = %e, "SIEM spool not pruned");
        }
    }
}

#[async_trait]
impl EventSink for Arc<Siem> {
    async fn emit(&self, event: &AccessEvent) -> Result<(), SiemError> {
        self.admit(event).await?;
        let seq = match self
            .outbox
            .append(vec![event.clone()], opening(event.action))
            .await
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
        self.deliver_local().await;
        self.wake.send_replace(seq);
        Ok(())
    }
}

/// Moves events a cluster node kept aside while the state store was away into the shared
/// outbox, every second until `stop`.
async fn forward(outbox: Arc<dyn Outbox>, stop: tokio_util::sync::CancellationToken) {
    loop {
        match outbox.forward().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                events = n,
                "SIEM events kept aside during a state-store outage are in the shared outbox now"
            ),
            Err(e) => {
                tracing::debug!(error = %e, "SIEM events still kept aside; the state store is not back")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// Spools action events in groups: one transaction per burst. An event whose transaction
/// fails is counted as dropped for its session; a drain marker is answered once the events
/// queued before it are spooled or counted.
async fn batch_actions(
    mut rx: tokio::sync::mpsc::Receiver<Queued>,
    bytes: Arc<std::sync::atomic::AtomicUsize>,
    outbox: Arc<dyn Outbox>,
    wake: tokio::sync::watch::Sender<i64>,
) {
    while let Some(first) = rx.recv().await {
        let mut batch = Vec::new();
        let mut sessions = Vec::new();
        let mut acks = Vec::new();
        let mut next = Some(first);
        while let Some(q) = next.take() {
            match q {
                Queued::Event(e, size, s) => {
                    bytes.fetch_sub(size, std::sync::atomic::Ordering::SeqCst);
                    batch.push(*e);
                    sessions.push(s);
                }
                Queued::Drain(ack) => {
                    acks.push(ack);
                    break;
                }
            }
            if batch.len() < 1000 {
                next = rx.try_recv().ok();
            }
        }
        if !batch.is_empty() {
            let failed = match outbox.append(batch, false).await {
                Ok(seq) => {
                    wake.send_replace(seq);
                    false
                }
                Err(e) => {
                    tracing::error!(error = %e, "SIEM action events not spooled; counted as dropped");
                    true
                }
            };
            if failed {
                for s in &sessions {
                    s.drop_one();
                }
            }
        }
        for ack in acks {
            // The waiter may have given up (timeout); nothing to tell it then.
            let _ = ack.send(());
        }
    }
}

/// Keeps a sink worker running: a panic or an error restarts it after a jittered backoff
/// (1 s doubling to 60 s, back to 1 s after a minute of good running), counted in
/// `restarts`. Returns when the worker stops because `stop` fired.
async fn supervise<F, Fut>(
    sink: String,
    restarts: Arc<std::sync::atomic::AtomicU64>,
    stop: tokio_util::sync::CancellationToken,
    mut start: F,
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>> + Send + 'static,
{
    const FIRST: std::time::Duration = std::time::Duration::from_secs(1);
    const MOST: std::time::Duration = std::time::Duration::from_secs(60);
    let mut backoff = FIRST;
    loop {
        let began = tokio::time::Instant::now();
        let why = match tokio::spawn(start()).await {
            Ok(Ok(())) => return,
            Ok(Err(e)) => e,
            Err(e) if e.is_panic() => {
                let p = e.into_panic();
                let msg = p
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| p.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic".into());
                format!("panicked: {msg}")
            }
            // Cancelled: the runtime is shutting down.
            Err(_) => return,
        };
        if stop.is_cancelled() {
            return;
        }
        restarts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if began.elapsed() > MOST {
            backoff = FIRST;
        }
        tracing::error!(sink = %sink, error = %why, backoff = ?backoff, "SIEM sink worker stopped; restarting it");
        let jitter = 0.5 + rand::random::<f64>();
        tokio::select! {
            _ = tokio::time::sleep(backoff.mul_f64(jitter)) => {}
            _ = stop.cancelled() => return,
        }
        backoff = (backoff * 2).min(MOST);
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
            spool_of(&siem).is_empty().expect("len"),
            "delivered events leave the spool"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_file_sink_written_inline_and_by_its_worker_gets_each_event_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("siem.jsonl");
        let stop = tokio_util::sync::CancellationToken::new();
        let siem = Siem::open(SiemSettings::file_only(
            &path,
            &dir.path().join("spool.sqlite"),
        ))
        .expect("open")
        .start(stop.clone())
        .expect("start");
        // Emitters on both threads while the sink's worker runs: inline and worker writes
        // interleave.
        let mut tasks = Vec::new();
        for t in 0..4 {
            let siem = siem.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..50 {
                    let mut e = AccessEvent::new(Action::SessionStart, &format!("p{t}-{i}"));
                    e.target = Some("web-01".into());
                    siem.emit(&e).await.expect("emit");
                }
            }));
        }
        for t in tasks {
            t.await.expect("emitter");
        }
        stop.cancel();
        let text = std::fs::read_to_string(&path).expect("read");
        let ids: Vec<String> = text
            .lines()
            .map(|l| {
                serde_json::from_str::<AccessEvent>(l)
                    .expect("each line is an event")
                    .event_id
            })
            .collect();
        let unique: std::collections::BTreeSet<&String> = ids.iter().collect();
        assert_eq!(ids.len(), 200, "every event is in the file");
        assert_eq!(unique.len(), ids.len(), "no event is in the file twice");
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
                url: crate::outbound::Url::parse("http://127.0.0.1:9/").expect("url"),
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

    fn info(id: &str) -> crate::record::SessionInfo {
        crate::record::SessionInfo {
            session_id: id.into(),
            protocol: "postgres".into(),
            person: "alice".into(),
            target: "db-01".into(),
            login: "app".into(),
            grant_id: "g-1".into(),
            justification: "outage".into(),
            incident_id: "INC-1".into(),
            client_addr: "127.0.0.1:5555".into(),
            started_at: "2026-01-01T00:00:00Z".into(),
            deadline: "2026-01-01T01:00:00Z".into(),
        }
    }

    /// A pipeline whose file sink takes action events, with an action queue of `events`
    /// events and `bytes` bytes; no delivery workers, so what is spooled stays spooled.
    fn action_siem(dir: &Path, events: usize, bytes: usize) -> Arc<Siem> {
        let mut settings =
            SiemSettings::file_only(&dir.join("siem.jsonl"), &dir.join("spool.sqlite"));
        settings.sinks[0].actions = true;
        let mut siem = Siem::open(settings).expect("open");
        siem.start_actions(events, bytes);
        Arc::new(siem)
    }

    /// A second handle on the spool file of a single-node SIEM.
    fn spool_of(siem: &Siem) -> Spool {
        Spool::open(&siem.settings.spool, siem.settings.spool_max_events).expect("spool")
    }

    fn spooled(siem: &Siem) -> Vec<AccessEvent> {
        spool_of(siem)
            .batch("file", 10_000, true)
            .expect("batch")
            .0
            .into_iter()
            .map(|s| s.event)
            .collect()
    }

    #[tokio::test]
    async fn a_full_action_queue_puts_the_loss_on_the_record() {
        let dir = tempfile::tempdir().expect("tempdir");
        let siem = action_siem(dir.path(), 3, 1 << 20);
        let hook = siem
            .action_hook(&info("s-1"), "g-1")
            .expect("actions wanted");
        let other = siem
            .action_hook(&info("s-2"), "g-2")
            .expect("actions wanted");
        // The test runtime has one thread and nothing here yields, so the batcher cannot run
        // until the session settles: the queue holds 3 and the rest are lost.
        for i in 0..10 {
            hook(0, &format!("SELECT {i}"), false);
        }
        other(0, "SELECT 'other'", false);
        let e = siem
            .settle_actions("s-1")
            .await
            .expect("a loss is reported");
        assert_eq!(e.action, Action::ActionsDropped);
        assert_eq!(e.event_type, "BREAK_GLASS_ACCESS", "goes to every sink");
        assert_eq!(e.actions_dropped, Some(7));
        assert_eq!(e.session_id.as_deref(), Some("s-1"));
        assert_eq!(e.correlation_id.as_deref(), Some("g-1"));
        assert_eq!(e.reason.as_deref(), Some("action_queue"));
        assert_eq!(e.outcome, Outcome::Failure);
        let cmds: Vec<String> = spooled(&siem)
            .into_iter()
            .filter_map(|e| e.command)
            .collect();
        assert_eq!(
            cmds,
            ["SELECT 0", "SELECT 1", "SELECT 2"],
            "queued ones are spooled before settle returns"
        );
        let e2 = siem
            .settle_actions("s-2")
            .await
            .expect("the other session lost its only event");
        assert_eq!(e2.actions_dropped, Some(1));
        assert_eq!(e2.session_id.as_deref(), Some("s-2"));
        assert!(
            siem.settle_actions("s-1").await.is_none(),
            "a session settles once"
        );
        // Once drained, the queue takes events again; a session that lost nothing reports
        // nothing.
        let third = siem
            .action_hook(&info("s-3"), "g-3")
            .expect("actions wanted");
        third(0, "SELECT 3", false);
        assert!(siem.settle_actions("s-3").await.is_none());
        assert!(spooled(&siem)
            .iter()
            .any(|e| e.command.as_deref() == Some("SELECT 3")));
        assert_eq!(
            siem.actions
                .as_ref()
                .expect("queue")
                .bytes
                .load(std::sync::atomic::Ordering::SeqCst),
            0,
            "every queued byte is released"
        );
    }

    #[tokio::test]
    async fn a_session_that_never_settles_is_forgotten_only_if_it_lost_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let siem = action_siem(dir.path(), 1, 1 << 20);
        let tracked = |siem: &Siem| {
            let mut ids: Vec<String> = siem
                .actions
                .as_ref()
                .expect("queue")
                .sessions
                .lock()
                .expect("lock")
                .keys()
                .cloned()
                .collect();
            ids.sort();
            ids
        };
        // Refused after their hooks were made: one lost nothing, one lost an event.
        drop(siem.action_hook(&info("quiet"), "g-1"));
        let lossy = siem.action_hook(&info("lossy"), "g-2").expect("hook");
        lossy(0, "SELECT 1", false);
        lossy(0, "SELECT 2", false);
        drop(lossy);
        let _live = siem.action_hook(&info("live"), "g-3").expect("hook");
        assert_eq!(tracked(&siem), ["live", "lossy"]);
        let e = siem
            .settle_actions("lossy")
            .await
            .expect("its loss is still reported");
        assert_eq!(e.actions_dropped, Some(1));
        assert_eq!(tracked(&siem), ["live"]);
    }

    #[tokio::test]
    async fn the_action_queue_is_bounded_in_bytes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let siem = action_siem(dir.path(), 1000, 25_000);
        let hook = siem
            .action_hook(&info("s-1"), "g-1")
            .expect("actions wanted");
        let big = "x".repeat(10_000);
        for _ in 0..5 {
            hook(0, &big, false);
        }
        let e = siem
            .settle_actions("s-1")
            .await
            .expect("a loss is reported");
        // Some 11 KB each (the text and the event around it) against 25 KB: two fit.
        assert_eq!(e.actions_dropped, Some(3));
        assert_eq!(spooled(&siem).len(), 2);
    }

    #[tokio::test]
    async fn action_events_the_spool_refuses_are_counted_as_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let siem = action_siem(dir.path(), 100, 1 << 20);
        // The spool refuses action events (as a full disk would), and nothing else.
        rusqlite::Connection::open(dir.path().join("spool.sqlite"))
            .expect("open spool")
            .execute_batch(
                "CREATE TRIGGER refuse_actions BEFORE INSERT ON events WHEN NEW.is_action = 1 \
                 BEGIN SELECT RAISE(ABORT, 'disk full'); END;",
            )
            .expect("trigger");
        let hook = siem
            .action_hook(&info("s-1"), "g-1")
            .expect("actions wanted");
        for i in 0..4 {
            hook(0, &format!("SELECT {i}"), false);
        }
        let e = siem
            .settle_actions("s-1")
            .await
            .expect("a loss is reported");
        assert_eq!(e.actions_dropped, Some(4));
        siem.emit(&e).await.expect("the report itself is spooled");
        let text = std::fs::read_to_string(dir.path().join("siem.jsonl")).expect("siem file");
        let last: AccessEvent =
            serde_json::from_str(text.lines().last().expect("a line")).expect("an event");
        assert_eq!(last.action, Action::ActionsDropped);
        assert_eq!(last.actions_dropped, Some(4));
    }

    #[tokio::test]
    async fn a_panicking_or_failing_worker_is_restarted_and_counted() {
        let restarts = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let runs = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let stop = tokio_util::sync::CancellationToken::new();
        let r2 = runs.clone();
        // First run panics, the second returns an error, the third stops cleanly.
        supervise("s".into(), restarts.clone(), stop.clone(), move || {
            let n = r2.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async move {
                match n {
                    0 => panic!("injected worker panic"),
                    1 => Err("injected worker error".to_string()),
                    _ => Ok(()),
                }
            }
        })
        .await;
        assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 3);
        assert_eq!(restarts.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_stopped_supervisor_does_not_restart() {
        let restarts = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let stop = tokio_util::sync::CancellationToken::new();
        stop.cancel();
        supervise("s".into(), restarts.clone(), stop, || async {
            Err::<(), _>("fails after stop".to_string())
        })
        .await;
        assert_eq!(restarts.load(std::sync::atomic::Ordering::SeqCst), 0);
    }
}
