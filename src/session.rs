//! The session core, shared by the SSH and PostgreSQL adapters.
//!
//! A protocol adapter authenticates the client and logs in upstream; from there on a session's
//! life is the same for every protocol and lives here:
//!
//! - [`open`]: open the recording (fail closed), index the session, make its start event
//!   durable, and put it in the one live [`Registry`];
//! - [`supervise`]: the one deadline, the warnings before it, recorder failure, and the end:
//!   cut the upstream first, then tell and close the client, through the adapter's small
//!   [`SessionIo`];
//! - [`revocation_watcher`]: ends live sessions of either protocol whose grant was revoked;
//! - [`finish`]: seal the recording, close the index row, emit the end events, leave the
//!   registry;
//! - a typed [`EndReason`], and one [`Refusal`] with a [`Source`] tag.
//!
//! The core takes a narrow [`Core`] handle (state store, SIEM, alerts, limits), never the
//! whole gateway.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::alerts::Alerter;
use crate::clock;
use crate::record::{ActionHook, Recorder, RecorderSettings, SessionEndInfo, SessionInfo};
use crate::siem::{AccessEvent, Action, Siem, SiemError};
use crate::state::{Grant, SessionEnd, SessionRow, Store};
use crate::storage::{key, RecordingStore};

/// Why a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndReason {
    /// The client closed the connection.
    ClientClosed,
    /// The target closed the connection.
    UpstreamClosed,
    /// The client broke the protocol (an oversized or unknown message).
    ProtocolViolation(String),
    /// The deadline was reached; `cause` says which limit set it.
    Deadline {
        at: DateTime<Utc>,
        cause: &'static str,
    },
    /// The grant was revoked.
    Revoked { at: DateTime<Utc> },
    /// The recording could not keep up or the store failed (fail closed).
    RecordingFailed(String),
    /// The gateway is shutting down.
    Shutdown,
}

impl EndReason {
    /// Machine-readable code for the index and SIEM.
    pub fn code(&self) -> &'static str {
        match self {
            EndReason::ClientClosed => "client_closed",
            EndReason::UpstreamClosed => "upstream_closed",
            EndReason::ProtocolViolation(_) => "protocol_violation",
            EndReason::Deadline { .. } => "deadline",
            EndReason::Revoked { .. } => "revoked",
            EndReason::RecordingFailed(_) => "recording_failed",
            EndReason::Shutdown => "gateway_shutdown",
        }
    }

    /// What happened, as a clause: "the break-glass deadline was reached at …".
    pub fn why(&self) -> String {
        match self {
            EndReason::ClientClosed => "the client closed the session".into(),
            EndReason::UpstreamClosed => "the target closed the connection".into(),
            EndReason::ProtocolViolation(why) => format!("protocol violation: {why}"),
            EndReason::Deadline { at, cause } => format!(
                "the break-glass deadline was reached at {} ({cause})",
                clock::rfc3339(*at)
            ),
            EndReason::Revoked { at } => format!(
                "your break-glass grant was revoked at {}",
                clock::rfc3339(*at)
            ),
            EndReason::RecordingFailed(why) => format!(
                "the recording failed ({why}); break-glass sessions never continue unrecorded"
            ),
            EndReason::Shutdown => "the gateway is shutting down".into(),
        }
    }

    /// The sentence shown to the user.
    pub fn message(&self) -> String {
        match self {
            EndReason::ClientClosed => "session closed by the client".into(),
            other => format!("session ended: {}", other.why()),
        }
    }

    /// Whether the gateway ended the session (and so owes the client an explanation), rather
    /// than one of the two peers.
    pub fn by_gateway(&self) -> bool {
        !matches!(
            self,
            EndReason::ClientClosed | EndReason::UpstreamClosed | EndReason::ProtocolViolation(_)
        )
    }

    /// Whose failure ended the session, when it was one.
    pub fn failure(&self) -> Option<Source> {
        match self {
            EndReason::RecordingFailed(_) => Some(Source::Internal),
            EndReason::ProtocolViolation(_) => Some(Source::Client),
            _ => None,
        }
    }
}

/// Whose fault a refusal or failure is (the SIEM's `side`).
pub use crate::grant::Side as Source;

/// A session the gateway would not (or could not) start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub source: Source,
    /// Machine-readable code for the SIEM (`recording_unavailable`, …).
    pub code: &'static str,
    /// The cause, unphrased.
    pub why: String,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.code {
            "recording_unavailable" => write!(
                f,
                "session refused: the recording cannot be opened ({}); break-glass sessions never run unrecorded",
                self.why
            ),
            _ => write!(f, "session refused: {}", self.why),
        }
    }
}

impl std::error::Error for Refusal {}

/// What the core needs from the gateway: a narrow handle, shared by every session.
pub struct Core {
    pub store: Arc<dyn Store>,
    pub siem: Arc<Siem>,
    pub alerter: Alerter,
    pub recordings: RecordingStore,
    /// The custodians of each target, who get its alerts.
    pub custodians: HashMap<String, Vec<String>>,
    /// Warnings before the deadline.
    pub warn_before: Vec<Duration>,
    /// How often a live session's chain head goes to the SIEM.
    pub checkpoint_interval: Duration,
    /// The one registry of live sessions, of both protocols.
    pub live: Registry,
    /// This gateway node (its sessions' `node_id` in the store).
    pub node_id: String,
    /// Cancelled when the gateway drains: every live session ends with `Shutdown`.
    pub shutdown: CancellationToken,
    /// What the workflow does when a session first uses a grant (opens its review).
    pub first_use: Option<Arc<dyn FirstUse>>,
}

/// The workflow's part in a session start: opening the grant's post-incident review. The
/// composition root wires it; the core does not import the workflow.
#[async_trait]
pub trait FirstUse: Send + Sync {
    async fn first_use(&self, core: &Core, grant: &Grant) -> Result<(), String>;
}

impl Core {
    /// Writes an audit event to the SIEM sink and the incident event store, and alerts.
    pub async fn audit(&self, e: &AccessEvent) -> Result<(), SiemError> {
        let res = crate::siem::audit(&self.siem, self.store.as_ref(), e).await;
        let custodians = e
            .target
            .as_ref()
            .and_then(|t| self.custodians.get(t))
            .cloned()
            .unwrap_or_default();
        self.alerter.notify(e, custodians);
        res
    }
}

/// Live sessions by id, for revocation, shutdown and the live-sessions metric.
#[derive(Default)]
pub struct Registry(Mutex<HashMap<String, Arc<Live>>>);

impl Registry {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Live>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn insert(&self, s: Arc<Live>) {
        self.map().insert(s.id.clone(), s);
    }

    pub fn remove(&self, id: &str) {
        self.map().remove(id);
    }

    /// A snapshot.
    pub fn sessions(&self) -> Vec<Arc<Live>> {
        self.map().values().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.map().len()
    }

    pub fn is_empty(&self) -> bool {
        self.map().is_empty()
    }

    /// Live sessions per protocol.
    pub fn counts(&self) -> Vec<(String, usize)> {
        let mut by: std::collections::BTreeMap<String, usize> = Default::default();
        for s in self.map().values() {
            *by.entry(s.info.protocol.clone()).or_default() += 1;
        }
        by.into_iter().collect()
    }
}

/// What a protocol adapter does for the core: wire I/O only.
#[async_trait]
pub trait SessionIo: Send + Sync {
    /// Shows `text` to the user now (and records in `s`'s recording that it was shown).
    async fn tell(&self, s: &Live, text: &str);
    /// Stops anything more reaching the target.
    async fn cut_upstream(&self);
    /// Tells the user why the session ends and closes the client connection.
    async fn close_client(&self, s: &Live, reason: &EndReason);
}

/// One live session of either protocol.
pub struct Live {
    pub id: String,
    pub info: SessionInfo,
    pub grant: Grant,
    pub started_at: DateTime<Utc>,
    pub started: Instant,
    /// The one absolute deadline, fixed at start.
    pub deadline: DateTime<Utc>,
    pub deadline_cause: &'static str,
    pub prefix: String,
    pub recorder: Recorder,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    /// `session{session_id protocol person target client}`: every task of the session runs
    /// in it, so one `grep session_id=…` of the logs tells the session's story.
    pub span: tracing::Span,
    io: Arc<dyn SessionIo>,
    kill: CancellationToken,
    reason: Mutex<Option<EndReason>>,
    finished: AtomicBool,
}

impl Live {
    /// Ends the session for `reason` (the first reason wins).
    pub fn kill(&self, reason: EndReason) {
        let mut r = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        if r.is_none() {
            *r = Some(reason);
        }
        self.kill.cancel();
    }

    /// Shows `text` to the user now (recorded like every message the gateway shows).
    pub async fn tell(&self, text: &str) {
        self.io.tell(self, text).await
    }

    /// Whether the session is ending.
    pub fn is_killed(&self) -> bool {
        self.kill.is_cancelled()
    }

    /// Resolves when the session starts ending.
    pub async fn killed(&self) {
        self.kill.cancelled().await
    }

    /// Why the session is ending.
    pub fn reason(&self) -> Option<EndReason> {
        self.reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Why the session is ending, as the user should read it.
    pub fn end_message(&self) -> Option<String> {
        self.reason().map(|r| r.message())
    }

    /// An audit event about this session, with its identity, grant and recording filled in.
    pub fn event(&self, action: Action) -> AccessEvent {
        let mut e = AccessEvent::new(action, &self.info.person);
        e.protocol = self.info.protocol.clone();
        e.person = Some(self.info.person.clone());
        e.target = Some(self.info.target.clone());
        e.session_id = Some(self.id.clone());
        e.grant_id = Some(self.grant.id.clone());
        e.correlation_id = Some(self.grant.correlation_id().to_string());
        e.justification = Some(self.grant.reason.clone());
        e.incident_id = Some(self.grant.incident_id.clone());
        e.client_addr = Some(self.info.client_addr.clone());
        e.deadline = Some(clock::rfc3339(self.deadline));
        e.recording = Some(self.prefix.clone());
        e
    }

    /// The tokio instant of a wall-clock time, relative to the session start: the one place
    /// wall-clock deadlines become timers.
    pub fn instant_of(&self, t: DateTime<Utc>) -> Instant {
        let d = (t - self.started_at).to_std().unwrap_or(Duration::ZERO);
        self.started + d
    }
}

/// The deadline of a session that starts `now` under `grant`, and which limit set it.
pub fn deadline(
    grant: &Grant,
    now: DateTime<Utc>,
    max_ttl: Duration,
) -> (DateTime<Utc>, &'static str) {
    let d = crate::grant::deadline(grant, now, max_ttl);
    let cause = if d == grant.expires_at {
        "grant expiry"
    } else {
        "maximum session length"
    };
    (d, cause)
}

/// Who runs a statement or command's per-action SIEM events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Actions {
    /// The recorder (SSH: it extracts commands from what it records).
    Recorder,
    /// The adapter (PostgreSQL: the relay sees whole, masked messages).
    Adapter,
}

/// What an adapter knows when it asks the core to open a session.
pub struct Opening {
    pub session_id: String,
    pub protocol: &'static str,
    pub person: String,
    pub target: String,
    pub login: String,
    pub grant: Grant,
    pub client_addr: String,
    pub now: DateTime<Utc>,
    pub deadline: (DateTime<Utc>, &'static str),
    pub settings: RecorderSettings,
    pub actions: Actions,
    /// The start event's message.
    pub message: String,
}

/// A session that is open: on the record, indexed, announced and registered.
pub struct Opened {
    pub live: Arc<Live>,
    /// The per-action SIEM hook, for [`Actions::Adapter`].
    pub actions: Option<ActionHook>,
}

/// Opens a session: the recording (fail closed), the index row, the durable start event,
/// then the registry. A failure after the recording opened seals what was recorded and
/// closes the index row before the refusal is returned.
pub async fn open(core: &Core, o: Opening, io: Arc<dyn SessionIo>) -> Result<Opened, Refusal> {
    let (deadline, deadline_cause) = o.deadline;
    let prefix = key::session_prefix(o.now, &o.session_id);
    let info = SessionInfo {
        session_id: o.session_id.clone(),
        protocol: o.protocol.into(),
        person: o.person.clone(),
        target: o.target.clone(),
        login: o.login.clone(),
        grant_id: o.grant.id.clone(),
        justification: o.grant.reason.clone(),
        incident_id: o.grant.incident_id.clone(),
        client_addr: o.client_addr.clone(),
        started_at: clock::rfc3339(o.now),
        deadline: clock::rfc3339(deadline),
    };
    let hook = core.siem.action_hook(&info, o.grant.correlation_id());
    let (in_recorder, for_adapter) = match o.actions {
        Actions::Recorder => (hook, None),
        Actions::Adapter => (None, hook),
    };
    let recorder = Recorder::open_with_actions(
        core.recordings.clone(),
        prefix.clone(),
        info.clone(),
        o.settings,
        in_recorder,
    )
    .await
    .map_err(|e| Refusal {
        source: Source::Internal,
        code: "recording_unavailable",
        why: e.to_string(),
    })?;
    let row = SessionRow {
        id: o.session_id.clone(),
        protocol: o.protocol.into(),
        person: o.person.clone(),
        target: o.target.clone(),
        grant_id: o.grant.id.clone(),
        client_addr: o.client_addr.clone(),
        started_at: o.now,
        deadline,
        ended_at: None,
        end_reason: None,
        bytes_in: 0,
        bytes_out: 0,
        recording_prefix: prefix.clone(),
        node_id: core.node_id.clone(),
    };
    let span = tracing::info_span!(
        "session",
        session_id = %o.session_id,
        protocol = o.protocol,
        person = %o.person,
        target = %o.target,
        client = %o.client_addr,
    );
    let live = Arc::new(Live {
        span: span.clone(),
        id: o.session_id.clone(),
        info,
        grant: o.grant,
        started_at: o.now,
        started: Instant::now(),
        deadline,
        deadline_cause,
        prefix,
        recorder,
        bytes_in: AtomicU64::new(0),
        bytes_out: AtomicU64::new(0),
        io,
        kill: CancellationToken::new(),
        reason: Mutex::new(None),
        finished: AtomicBool::new(false),
    });
    let internal = |why: String| Refusal {
        source: Source::Internal,
        code: "internal",
        why,
    };
    // From here on the session exists: a failure ends it through `finish`, which seals the
    // recording and closes the index row.
    if let Err(e) = core.store.insert_session(&row).await {
        live.kill(EndReason::RecordingFailed(format!("session index: {e}")));
        finish(core, &live).await;
        return Err(internal(format!("session index: {e}")));
    }
    let mut ev = live.event(Action::SessionStart);
    ev.message = Some(o.message);
    if let Err(e) = core.audit(&ev).await {
        // Invariant: no session starts unless its start event is durable.
        live.kill(EndReason::RecordingFailed(format!(
            "start event not written: {e}"
        )));
        finish(core, &live).await;
        return Err(internal(format!("audit event not written: {e}")));
    }
    core.live.insert(live.clone());
    if let Some(hook) = &core.first_use {
        if let Err(e) = hook.first_use(core, &live.grant).await {
            tracing::error!(parent: &live.span, error = %e, "could not open the post-incident review");
        }
    }
    tracing::info!(
        parent: &live.span,
        deadline = %clock::rfc3339(deadline),
        "session started"
    );
    Ok(Opened {
        live,
        actions: for_adapter,
    })
}

/// Watches one session's deadline, warnings and recorder failure, and ends it: the upstream
/// is cut first, then the client is told why and closed.
pub async fn supervise(core: Arc<Core>, s: Arc<Live>) {
    let span = s.span.clone();
    supervise_in(core, s).instrument(span).await
}

async fn supervise_in(core: Arc<Core>, s: Arc<Live>) {
    let deadline_at = s.instant_of(s.deadline);
    for w in core.warn_before.clone() {
        let Some(when) = s
            .deadline
            .checked_sub_signed(chrono::Duration::from_std(w).unwrap_or_default())
        else {
            continue;
        };
        if when <= clock::now() {
            continue;
        }
        tokio::select! {
            _ = tokio::time::sleep_until(s.instant_of(when)) => {
                let text = format!(
                    "this session ends in {} (at {}, {})",
                    humantime::format_duration(w),
                    clock::rfc3339(s.deadline),
                    s.deadline_cause
                );
                s.io.tell(&s, &text).await;
            }
            _ = s.kill.cancelled() => break,
            _ = s.recorder.failure.token.cancelled() => break,
            _ = core.shutdown.cancelled() => break,
        }
    }
    tokio::select! {
        _ = tokio::time::sleep_until(deadline_at) => {
            s.kill(EndReason::Deadline { at: s.deadline, cause: s.deadline_cause });
        }
        _ = s.kill.cancelled() => {}
        _ = core.shutdown.cancelled() => s.kill(EndReason::Shutdown),
        _ = s.recorder.failure.token.cancelled() => {
            let why = s.recorder.failure.reason().unwrap_or_else(|| "recorder failed".into());
            s.kill(EndReason::RecordingFailed(why));
        }
    }
    let reason = s.reason().unwrap_or(EndReason::Shutdown);
    tracing::info!(parent: &s.span, reason = reason.code(), "ending session");
    // Cut the target off first: from here nothing the client sends reaches it.
    s.io.cut_upstream().await;
    if reason.by_gateway() {
        s.io.close_client(&s, &reason).await;
    }
}

/// Sends the recording's chain head to the SIEM every `checkpoint_interval` while the session
/// lives, so truncation is detectable even by someone who controls the store.
pub async fn checkpoints(core: Arc<Core>, s: Arc<Live>) {
    let span = s.span.clone();
    checkpoints_in(core, s).instrument(span).await
}

async fn checkpoints_in(core: Arc<Core>, s: Arc<Live>) {
    let every = core.checkpoint_interval;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = s.kill.cancelled() => return,
        }
        let (head, objects) = s.recorder.checkpoint();
        let mut e = s.event(Action::RecordingCheckpoint);
        e.chain_head = Some(head);
        e.objects = Some(objects as u64);
        e.message = Some(format!("recording checkpoint: {objects} objects stored"));
        if let Err(err) = core.audit(&e).await {
            tracing::error!(parent: &s.span, error = %err, "could not write checkpoint event");
        }
    }
}

/// Polls the state store for revoked grants of live sessions and ends those sessions, of
/// either protocol. A poll every 250 ms keeps revocation well inside the one-second target,
/// whichever process (this gateway, `breakglass grant revoke`, another gateway) revoked.
pub async fn revocation_watcher(core: Arc<Core>) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tick.tick().await;
        let live = core.live.sessions();
        if live.is_empty() {
            continue;
        }
        let mut ids: Vec<String> = live.iter().map(|s| s.grant.id.clone()).collect();
        ids.sort();
        ids.dedup();
        match core.store.revocations(&ids).await {
            Ok(revoked) => {
                for (gid, at) in revoked {
                    for s in live.iter().filter(|s| s.grant.id == gid && !s.is_killed()) {
                        tracing::info!(parent: &s.span, grant_id = %gid, "grant revoked, ending session");
                        s.kill(EndReason::Revoked { at });
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "revocation check failed"),
        }
    }
}

/// Seals the recording, closes the index row and emits the end events. Runs once, after the
/// client connection has ended (or a start failed).
pub async fn finish(core: &Core, s: &Arc<Live>) {
    let span = s.span.clone();
    finish_in(core, s).instrument(span).await
}

async fn finish_in(core: &Core, s: &Arc<Live>) {
    if s.finished.swap(true, Ordering::SeqCst) {
        return;
    }
    if !s.is_killed() {
        s.kill(EndReason::ClientClosed);
    }
    let reason = s.reason().unwrap_or(EndReason::ClientClosed);
    let ended_at = clock::now();
    let bytes_in = s.bytes_in.load(Ordering::Relaxed);
    let bytes_out = s.bytes_out.load(Ordering::Relaxed);
    let end = SessionEndInfo {
        ended_at: clock::rfc3339(ended_at),
        end_reason: reason.code().into(),
        end_message: reason.message(),
        bytes_in,
        bytes_out,
    };
    let sealed = s.recorder.finish(end).await;
    match &sealed {
        Ok(_) => tracing::info!(
            parent: &s.span,
            reason = reason.code(),
            bytes_in,
            bytes_out,
            "session ended; recording sealed"
        ),
        Err(e) => tracing::error!(
            parent: &s.span,
            reason = reason.code(),
            error = %e,
            "session ended; could not seal recording"
        ),
    }
    if let Err(e) = core
        .store
        .finish_session(
            &s.id,
            &SessionEnd {
                ended_at,
                end_reason: reason.code().into(),
                bytes_in,
                bytes_out,
            },
        )
        .await
    {
        tracing::error!(parent: &s.span, error = %e, "could not close session in the index");
    }
    let base = |action: Action| {
        let mut e = s.event(action);
        e.reason = Some(reason.code().into());
        e.message = Some(reason.message());
        e
    };
    let mut events = Vec::new();
    // SIEM copies of commands that were lost go on the record before the end event.
    events.extend(core.siem.settle_actions(&s.id).await);
    match &reason {
        EndReason::Deadline { .. } => events.push(base(Action::SessionExpired)),
        EndReason::Revoked { .. } => events.push(base(Action::SessionRevoked)),
        _ => {}
    }
    let mut end_ev = base(Action::SessionEnd);
    end_ev.bytes_in = Some(bytes_in);
    end_ev.bytes_out = Some(bytes_out);
    end_ev.duration_ms = Some((ended_at - s.started_at).num_milliseconds().max(0) as u64);
    match &sealed {
        Ok(meta) => end_ev.chain_head = Some(meta.chain_head.clone()),
        Err(e) => {
            end_ev.outcome = crate::siem::Outcome::Failure;
            end_ev.side = Some(Source::Internal);
            end_ev.message = Some(format!("{}; recording not sealed: {e}", reason.message()));
        }
    }
    if let Some(side) = reason.failure() {
        end_ev.outcome = crate::siem::Outcome::Failure;
        end_ev.side = Some(side);
    }
    events.push(end_ev);
    for e in events {
        if let Err(err) = core.audit(&e).await {
            tracing::error!(parent: &s.span, error = %err, "could not write SIEM event");
        }
    }
    core.live.remove(&s.id);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A protocol adapter that only writes down what the core asked of it.
    #[derive(Default)]
    struct Script(Mutex<Vec<String>>);

    impl Script {
        fn lines(&self) -> Vec<String> {
            self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
        }
        fn push(&self, l: String) {
            self.0.lock().unwrap_or_else(|p| p.into_inner()).push(l);
        }
    }

    #[async_trait]
    impl SessionIo for Script {
        async fn tell(&self, _s: &Live, text: &str) {
            self.push(format!("tell {text}"));
        }
        async fn cut_upstream(&self) {
            self.push("cut".into());
        }
        async fn close_client(&self, _s: &Live, reason: &EndReason) {
            self.push(format!("close {}", reason.code()));
        }
    }

    /// A core with real stores in `dir`, and one live session whose deadline is `ttl` away,
    /// warned `warn_before` ahead. The clock that counts is tokio's (paused in these tests).
    async fn live_session(
        dir: &std::path::Path,
        ttl: Duration,
        warn_before: Vec<Duration>,
    ) -> (Arc<Core>, Arc<Live>, Arc<Script>) {
        let recordings = RecordingStore::local(&dir.join("store")).expect("store");
        let siem = crate::siem::Siem::open(crate::config::siem::SiemSettings::file_only(
            &dir.join("siem.jsonl"),
            &dir.join("spool.db"),
        ))
        .expect("siem");
        let core = Arc::new(Core {
            store: Arc::new(crate::state::SqliteStore::open(&dir.join("state.db")).expect("state")),
            siem: Arc::new(siem),
            alerter: Alerter::disabled(),
            recordings: recordings.clone(),
            custodians: HashMap::new(),
            warn_before,
            checkpoint_interval: Duration::from_secs(3600),
            live: Registry::default(),
            node_id: "test-node".into(),
            shutdown: CancellationToken::new(),
            first_use: None,
        });
        let pin = dir.join("trusted.pub");
        let signer = crate::signing::Signer::load_or_create_pinned(dir, &pin).expect("signer");
        let trust = crate::signing::configured_trust(&[], &pin, dir).expect("trust");
        let now = clock::now();
        let deadline = now + chrono::Duration::from_std(ttl).expect("ttl");
        let info = SessionInfo {
            session_id: "s1".into(),
            protocol: "ssh".into(),
            person: "alice".into(),
            target: "web-01".into(),
            login: "root".into(),
            grant_id: "g1".into(),
            justification: "test".into(),
            incident_id: "INC-1".into(),
            client_addr: "127.0.0.1:1".into(),
            started_at: clock::rfc3339(now),
            deadline: clock::rfc3339(deadline),
        };
        let settings = RecorderSettings {
            flush_interval: Duration::from_secs(1),
            stall: Duration::from_secs(5),
            grace: Duration::from_secs(30),
            spool_dir: dir.join("spool"),
            spool_mac: None,
            signer: Arc::new(signer.use_trusted(&trust).expect("trusted signer")),
            redact_no_echo: true,
            ledger: None,
        };
        let recorder = Recorder::open(recordings, "p/s1".into(), info.clone(), settings)
            .await
            .expect("recorder");
        let io = Arc::new(Script::default());
        let live = Arc::new(Live {
            id: "s1".into(),
            info,
            grant: Grant {
                id: "g1".into(),
                person: "alice".into(),
                target: "web-01".into(),
                reason: "test".into(),
                incident_id: "INC-1".into(),
                created_by: "op".into(),
                created_at: now,
                expires_at: deadline,
                revoked_at: None,
                revoked_by: None,
                revoke_reason: None,
                request_id: None,
                review_required: false,
            },
            started_at: now,
            started: Instant::now(),
            deadline,
            deadline_cause: "grant expiry",
            prefix: "p/s1".into(),
            recorder,
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            span: tracing::Span::none(),
            io: io.clone(),
            kill: CancellationToken::new(),
            reason: Mutex::new(None),
            finished: AtomicBool::new(false),
        });
        (core, live, io)
    }

    #[tokio::test(start_paused = true)]
    async fn the_supervisor_warns_then_cuts_the_upstream_before_closing_at_the_deadline() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ttl = Duration::from_secs(600);
        let (core, live, io) = live_session(
            dir.path(),
            ttl,
            vec![Duration::from_secs(300), Duration::from_secs(60)],
        )
        .await;
        let t0 = Instant::now();
        supervise(core, live.clone()).await;
        let took = t0.elapsed();
        assert!(
            took + Duration::from_secs(1) >= ttl && took <= ttl + Duration::from_secs(1),
            "ended after {took:?}, deadline {ttl:?}"
        );
        let lines = io.lines();
        assert_eq!(lines.len(), 4, "{lines:?}");
        assert!(
            lines[0].starts_with("tell this session ends in 5m"),
            "{lines:?}"
        );
        assert!(
            lines[1].starts_with("tell this session ends in 1m"),
            "{lines:?}"
        );
        assert!(lines[0].contains("grant expiry"), "{lines:?}");
        assert_eq!(lines[2..], ["cut", "close deadline"]);
        assert_eq!(live.reason().map(|r| r.code()), Some("deadline"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_revoke_cuts_at_once_and_skips_the_warnings_still_due() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (core, live, io) = live_session(
            dir.path(),
            Duration::from_secs(600),
            vec![Duration::from_secs(300)],
        )
        .await;
        let sup = tokio::spawn(supervise(core, live.clone()));
        tokio::time::sleep(Duration::from_secs(120)).await;
        let at = clock::now();
        live.kill(EndReason::Revoked { at });
        sup.await.expect("supervisor");
        assert_eq!(io.lines(), ["cut", "close revoked"]);
        // The first reason wins: a later deadline does not rewrite why it ended.
        live.kill(EndReason::Deadline {
            at,
            cause: "grant expiry",
        });
        assert_eq!(live.reason().map(|r| r.code()), Some("revoked"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_leaves_is_not_told_and_a_drain_tells_everyone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (core, live, io) = live_session(dir.path(), Duration::from_secs(600), Vec::new()).await;
        let sup = tokio::spawn(supervise(core, live.clone()));
        live.kill(EndReason::ClientClosed);
        sup.await.expect("supervisor");
        assert_eq!(io.lines(), ["cut"]);

        let dir = tempfile::tempdir().expect("tempdir");
        let (core, live, io) = live_session(dir.path(), Duration::from_secs(600), Vec::new()).await;
        let sup = tokio::spawn(supervise(core.clone(), live.clone()));
        core.shutdown.cancel();
        sup.await.expect("supervisor");
        assert_eq!(io.lines(), ["cut", "close gateway_shutdown"]);
    }

    #[test]
    fn end_reasons_keep_their_codes_and_say_who_ended_them() {
        let at = clock::now();
        let cases = [
            (EndReason::ClientClosed, "client_closed", false),
            (EndReason::UpstreamClosed, "upstream_closed", false),
            (
                EndReason::ProtocolViolation("x".into()),
                "protocol_violation",
                false,
            ),
            (
                EndReason::Deadline {
                    at,
                    cause: "grant expiry",
                },
                "deadline",
                true,
            ),
            (EndReason::Revoked { at }, "revoked", true),
            (
                EndReason::RecordingFailed("disk".into()),
                "recording_failed",
                true,
            ),
            (EndReason::Shutdown, "gateway_shutdown", true),
        ];
        for (r, code, by_gateway) in cases {
            assert_eq!(r.code(), code);
            assert_eq!(r.by_gateway(), by_gateway, "{code}");
        }
        assert!(EndReason::Revoked { at }
            .message()
            .contains("was revoked at"));
        assert_eq!(
            EndReason::RecordingFailed("x".into()).failure(),
            Some(Source::Internal)
        );
        assert_eq!(EndReason::ClientClosed.failure(), None);
    }
}
