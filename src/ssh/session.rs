//! A live SSH session: its one deadline, warnings, revocation, termination and sealing.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use russh::server;
use russh::ChannelId;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::upstream::UpstreamHandle;
use crate::clock;
use crate::record::{RecMsg, Recorder, SessionEndInfo, SessionInfo};
use crate::server::Gateway;
use crate::siem::{AccessEvent, Action};
use crate::state::{Grant, SessionEnd};

/// Why a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndReason {
    /// The client closed the connection.
    ClientClosed,
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
            EndReason::Deadline { .. } => "deadline",
            EndReason::Revoked { .. } => "revoked",
            EndReason::RecordingFailed(_) => "recording_failed",
            EndReason::Shutdown => "gateway_shutdown",
        }
    }

    /// The sentence shown to the user.
    pub fn message(&self) -> String {
        match self {
            EndReason::ClientClosed => "session closed by the client".into(),
            EndReason::Deadline { at, cause } => format!(
                "session ended: the break-glass deadline was reached at {} ({cause})",
                clock::rfc3339(*at)
            ),
            EndReason::Revoked { at } => format!(
                "session ended: your break-glass grant was revoked at {}",
                clock::rfc3339(*at)
            ),
            EndReason::RecordingFailed(why) => format!(
                "session ended: the recording failed ({why}); break-glass sessions never continue unrecorded"
            ),
            EndReason::Shutdown => "session ended: the gateway is shutting down".into(),
        }
    }
}

/// A client channel as the session sees it.
#[derive(Debug, Clone)]
pub struct ChanState {
    /// Channel number in the recording.
    pub rec_ch: u32,
    pub pty: bool,
}

/// One live session, shared by the connection handler, its channel pumps and the
/// supervisor.
pub struct LiveSession {
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
    /// Writes to the client outside the request/response cycle.
    pub client: server::Handle,
    pub upstream: UpstreamHandle,
    pub channels: Mutex<HashMap<ChannelId, ChanState>>,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    /// Notified whenever the client closes a channel.
    pub channel_closed: tokio::sync::Notify,
    kill: CancellationToken,
    reason: Mutex<Option<EndReason>>,
    finished: AtomicBool,
}

impl LiveSession {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        info: SessionInfo,
        grant: Grant,
        started_at: DateTime<Utc>,
        deadline: DateTime<Utc>,
        deadline_cause: &'static str,
        prefix: String,
        recorder: Recorder,
        client: server::Handle,
        upstream: UpstreamHandle,
    ) -> LiveSession {
        LiveSession {
            id: info.session_id.clone(),
            info,
            grant,
            started_at,
            started: Instant::now(),
            deadline,
            deadline_cause,
            prefix,
            recorder,
            client,
            upstream,
            channels: Mutex::new(HashMap::new()),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            channel_closed: tokio::sync::Notify::new(),
            kill: CancellationToken::new(),
            reason: Mutex::new(None),
            finished: AtomicBool::new(false),
        }
    }

    /// Ends the session for `reason` (the first reason wins).
    pub fn kill(&self, reason: EndReason) {
        let mut r = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        if r.is_none() {
            *r = Some(reason);
        }
        self.kill.cancel();
    }

    /// An audit event about this session, with its identity, grant and recording filled in.
    pub fn event(&self, action: Action) -> AccessEvent {
        let mut e = AccessEvent::new(action, &self.info.person);
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

    /// Whether the session is ending.
    pub fn is_killed(&self) -> bool {
        self.kill.is_cancelled()
    }

    /// Why the session is ending, as the user should read it.
    pub fn end_message(&self) -> Option<String> {
        self.reason().map(|r| r.message())
    }

    fn reason(&self) -> Option<EndReason> {
        self.reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The tokio instant of a wall-clock time, relative to the session start.
    fn instant_of(&self, t: DateTime<Utc>) -> Instant {
        let d = (t - self.started_at).to_std().unwrap_or(Duration::ZERO);
        self.started + d
    }

    fn channel_list(&self) -> Vec<(ChannelId, ChanState)> {
        self.channels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (*k, v.clone()))
            .collect()
    }

    /// Shows a line to the user on every channel (pty: inline; otherwise stderr) and records
    /// it as a marker.
    async fn tell(&self, text: &str) {
        let line = format!("\r\n*** breakglass: {text} ***\r\n");
        let now = Instant::now();
        let _ = self
            .recorder
            .send(RecMsg::Marker {
                ch: None,
                label: text.to_string(),
                at: now,
            })
            .await;
        for (id, st) in self.channel_list() {
            if st.pty {
                let _ = self
                    .recorder
                    .send(RecMsg::Data {
                        ch: st.rec_ch,
                        stream: crate::record::Stream::Out,
                        data: bytes::Bytes::from(line.clone().into_bytes()),
                        at: now,
                    })
                    .await;
                let _ = self
                    .recorder
                    .send(RecMsg::Marker {
                        ch: Some(st.rec_ch),
                        label: text.to_string(),
                        at: now,
                    })
                    .await;
                let _ = self.client.data(id, line.clone().into_bytes()).await;
            } else {
                let _ = self
                    .client
                    .extended_data(id, 1, format!("breakglass: {text}\n").into_bytes())
                    .await;
            }
        }
    }
}

/// Sends the recording's chain head to the SIEM every `checkpoint_interval` while the session
/// lives, so truncation is detectable even by someone who controls the store.
pub async fn checkpoints(gw: Arc<Gateway>, s: Arc<LiveSession>) {
    let every = gw.config.limits.checkpoint_interval;
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
        if let Err(err) = gw.audit(&e).await {
            tracing::error!(session_id = %s.id, error = %err, "could not write checkpoint event");
        }
    }
}

/// Watches one session's deadline, warnings and failure signals, and cuts it off.
pub async fn supervise(gw: Arc<Gateway>, s: Arc<LiveSession>) {
    let deadline_at = s.instant_of(s.deadline);
    for w in gw.config.limits.warn_before.clone() {
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
                s.tell(&text).await;
            }
            _ = s.kill.cancelled() => break,
            _ = s.recorder.failure.token.cancelled() => break,
        }
    }
    tokio::select! {
        _ = tokio::time::sleep_until(deadline_at) => {
            s.kill(EndReason::Deadline { at: s.deadline, cause: s.deadline_cause });
        }
        _ = s.kill.cancelled() => {}
        _ = s.recorder.failure.token.cancelled() => {
            let why = s.recorder.failure.reason().unwrap_or_else(|| "recorder failed".into());
            s.kill(EndReason::RecordingFailed(why));
        }
    }
    let reason = s.reason().unwrap_or(EndReason::Shutdown);
    tracing::info!(session_id = %s.id, reason = reason.code(), "ending session");
    // Cut the target off first: from here nothing the client sends reaches it.
    let _ = s
        .upstream
        .disconnect(
            russh::Disconnect::ByApplication,
            "breakglass session ended",
            "en",
        )
        .await;
    if matches!(reason, EndReason::ClientClosed) {
        return;
    }
    s.tell(&reason.message()).await;
    for (id, _) in s.channel_list() {
        let _ = s.client.exit_status_request(id, 255).await;
        let _ = s.client.eof(id).await;
        let _ = s.client.close(id).await;
    }
    // OpenSSH drops output it has not written yet when a disconnect arrives, so give the
    // client up to a second to close its channels (and print the reason) before
    // disconnecting it. The target is already unreachable.
    let grace = Instant::now() + Duration::from_secs(1);
    while !s.channel_list().is_empty() {
        if tokio::time::timeout_at(grace, s.channel_closed.notified())
            .await
            .is_err()
        {
            break;
        }
    }
    let _ = s
        .client
        .disconnect(
            russh::Disconnect::ByApplication,
            reason.message(),
            "en".into(),
        )
        .await;
}

/// Seals the recording, closes the index row and emits the end events. Runs once, after the
/// client connection has ended.
pub async fn finish(gw: &Gateway, s: &Arc<LiveSession>) {
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
    if let Err(e) = &sealed {
        tracing::error!(session_id = %s.id, error = %e, "could not seal recording");
    }
    if let Err(e) = gw
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
        tracing::error!(session_id = %s.id, error = %e, "could not close session in the index");
    }
    let base = |action: Action| {
        let mut e = s.event(action);
        e.reason = Some(reason.code().into());
        e.message = Some(reason.message());
        e
    };
    let mut events = Vec::new();
    // SIEM copies of commands that were lost go on the record before the end event.
    events.extend(gw.siem.settle_actions(&s.id).await);
    match &reason {
        EndReason::Deadline { .. } => events.push(base(Action::SessionExpired)),
        EndReason::Revoked { .. } => events.push(base(Action::SessionRevoked)),
        EndReason::ClientClosed | EndReason::RecordingFailed(_) | EndReason::Shutdown => {}
    }
    let mut end_ev = base(Action::SessionEnd);
    end_ev.bytes_in = Some(bytes_in);
    end_ev.bytes_out = Some(bytes_out);
    end_ev.duration_ms = Some((ended_at - s.started_at).num_milliseconds().max(0) as u64);
    match &sealed {
        Ok(meta) => end_ev.chain_head = Some(meta.chain_head.clone()),
        Err(e) => {
            end_ev.outcome = "failure".into();
            end_ev.side = Some("internal".into());
            end_ev.message = Some(format!("{}; recording not sealed: {e}", reason.message()));
        }
    }
    if matches!(reason, EndReason::RecordingFailed(_)) {
        end_ev.outcome = "failure".into();
        end_ev.side = Some("internal".into());
    }
    events.push(end_ev);
    for e in events {
        if let Err(err) = gw.audit(&e).await {
            tracing::error!(session_id = %s.id, error = %err, "could not write SIEM event");
        }
    }
    gw.live
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&s.id);
}

/// Polls the state store for revoked grants of live sessions and ends those sessions.
/// A poll every 250 ms keeps revocation well inside the one-second target, whichever process
/// (this gateway, `breakglass grant revoke`, another gateway) did the revoking.
pub async fn revocation_watcher(gw: Arc<Gateway>) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tick.tick().await;
        let live = gw.live_sessions();
        if live.is_empty() {
            continue;
        }
        let ids: Vec<String> = live.iter().map(|s| s.grant.id.clone()).collect();
        match gw.store.revocations(&ids).await {
            Ok(revoked) => {
                for (gid, at) in revoked {
                    for s in live.iter().filter(|s| s.grant.id == gid && !s.is_killed()) {
                        tracing::info!(session_id = %s.id, grant_id = %gid, "grant revoked, ending session");
                        s.kill(EndReason::Revoked { at });
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "revocation check failed"),
        }
    }
}

/// A base event about a session known only from its index row.
async fn row_event(gw: &Gateway, row: &crate::state::SessionRow, action: Action) -> AccessEvent {
    let mut e = AccessEvent::new(action, &row.person);
    e.person = Some(row.person.clone());
    e.target = Some(row.target.clone());
    e.protocol = row.protocol.clone();
    e.session_id = Some(row.id.clone());
    e.grant_id = Some(row.grant_id.clone());
    e.correlation_id = Some(match gw.store.find_grant(&row.grant_id).await {
        Ok(g) => g.correlation_id().to_string(),
        Err(_) => row.grant_id.clone(),
    });
    e.recording = Some(row.recording_prefix.clone());
    e
}

/// What sealing a session from its evidence ledger found.
struct LedgerSeal {
    objects: usize,
    head: String,
    /// Written by the gateway, gone or altered.
    missing: Vec<crate::record::MissingObject>,
    /// Under the session's prefix, never written by the gateway: not adopted.
    foreign: Vec<String>,
}

/// Writes a signed manifest, marked `recovered` (verify reports INCOMPLETE), over what a
/// session left when its own recorder could not seal it (a crash, or a store outage at its
/// end). Only objects the evidence ledger lists with the same hash are adopted, in the order
/// the gateway chained them (so every checkpoint the SIEM holds still matches); objects the
/// ledger lists but the store lacks or holds altered are named in `missing`; anything else
/// under the prefix is left out, so `verify` reports it. None: already sealed.
async fn seal_from_ledger(
    gw: &Gateway,
    row: &crate::state::SessionRow,
) -> Result<Option<LedgerSeal>, crate::storage::StorageError> {
    use crate::storage::{key, StorageError};
    use sha2::Digest;
    let prefix = &row.recording_prefix;
    if gw.recordings.get(&key::session_end(prefix)).await.is_ok() {
        return Ok(None);
    }
    let ledger = gw
        .store
        .recorded_objects(&row.id)
        .await
        .map_err(|e| StorageError::Backend(format!("evidence ledger: {e}")))?;
    let start_key = key::session_start(prefix);
    let start = gw.recordings.get(&start_key).await?;
    let info: SessionInfo = serde_json::from_slice::<serde_json::Value>(&start)
        .ok()
        .and_then(|v| serde_json::from_value(v["session"].clone()).ok())
        .ok_or_else(|| StorageError::Backend("session-start.json is unreadable".into()))?;
    let listed: Vec<String> = gw
        .recordings
        .list(prefix)
        .await?
        .into_iter()
        .map(|o| o.key)
        .collect();
    // A session from before the ledger existed: adopt what is stored, in key order.
    let entries: Vec<crate::state::LedgerEntry> = if ledger.is_empty() {
        tracing::warn!(session_id = %row.id, "no evidence ledger for this session (written by an older gateway); adopting the stored objects as listed");
        let mut keys = listed.clone();
        keys.sort_by_key(|k| (*k != start_key, k.clone()));
        let mut v = Vec::new();
        for k in keys {
            let content = gw.recordings.get(&k).await?;
            v.push(crate::state::LedgerEntry {
                key: k,
                size: content.len() as u64,
                sha256: hex::encode(sha2::Sha256::digest(&content)),
                chained: None,
            });
        }
        v
    } else {
        ledger
    };
    let mut head = crate::record::chain_seed(&info.session_id);
    let mut objects = Vec::new();
    let mut missing = Vec::new();
    for e in &entries {
        let why = match gw.recordings.get(&e.key).await {
            Ok(content) if hex::encode(sha2::Sha256::digest(&content)) == e.sha256 => None,
            Ok(_) => Some("altered"),
            Err(StorageError::NotFound(_)) => Some("deleted"),
            Err(err) => return Err(err),
        };
        match why {
            None => {
                head = crate::record::chain_link(&head, &e.key, &e.sha256);
                objects.push(crate::record::ObjectEntry {
                    key: e.key.clone(),
                    size: e.size,
                    sha256: e.sha256.clone(),
                    chain: head.clone(),
                    version: None,
                });
            }
            Some(why) => missing.push(crate::record::MissingObject {
                key: e.key.clone(),
                sha256: e.sha256.clone(),
                size: e.size,
                why: why.into(),
            }),
        }
    }
    let foreign: Vec<String> = listed
        .into_iter()
        .filter(|k| !entries.iter().any(|e| e.key == *k))
        .collect();
    let ended_at = row.ended_at.unwrap_or_else(clock::now);
    let (end_reason, end_message) = match row.end_reason.as_deref() {
        Some("gateway_crashed") | None => (
            "gateway_crashed".to_string(),
            "the gateway stopped during this session; sealed from the evidence ledger".to_string(),
        ),
        Some(r) => (
            r.to_string(),
            "the recording store failed as the session ended; sealed from the evidence ledger once it was back".to_string(),
        ),
    };
    let meta = crate::record::SessionMeta {
        schema_version: crate::record::SESSION_SCHEMA_VERSION,
        session: info,
        end: SessionEndInfo {
            ended_at: clock::rfc3339(ended_at),
            end_reason,
            end_message,
            bytes_in: row.bytes_in,
            bytes_out: row.bytes_out,
        },
        channels: Vec::new(),
        markers: Vec::new(),
        objects,
        chain_algorithm: "sha256(prev \\n key \\n sha256hex(content)), seeded with sha256(\"breakglass-chain-v1\\n\" session_id); recovered: the evidence ledger's order".into(),
        chain_head: head.clone(),
        recovered: true,
        missing: missing.clone(),
    };
    let n = meta.objects.len();
    crate::record::write_manifest(&gw.recordings, prefix, &meta, &gw.signer).await?;
    Ok(Some(LedgerSeal {
        objects: n,
        head,
        missing,
        foreign,
    }))
}

/// Puts on the record that the store or the spool held something the gateway did not write
/// as found (log and an alerting SIEM event naming the object).
async fn report_refused(
    gw: &Gateway,
    row: Option<&crate::state::SessionRow>,
    key: &str,
    what: &str,
) {
    tracing::error!(key = %key, "{what}");
    let mut e = match row {
        Some(r) => row_event(gw, r, Action::EvidenceRefused).await,
        None => AccessEvent::new(Action::EvidenceRefused, "gateway"),
    };
    e.recording = Some(key.to_string());
    e.outcome = "failure".into();
    e.side = Some("internal".into());
    e.message = Some(format!("{key}: {what}"));
    if let Err(err) = gw.audit(&e).await {
        tracing::error!(error = %err, "could not write SIEM event");
    }
}

/// Uploads spooled chunks the ledger vouches for (refusing planted ones) and seals every ended
/// session whose recording is not sealed yet. Runs at start and then every few seconds, so a
/// session that ended during a store outage is sealed as soon as the store is back.
pub async fn seal_pending(gw: &Gateway) {
    let live: std::collections::HashSet<String> = match gw.store.unfinished_sessions().await {
        Ok(rows) => rows.into_iter().map(|r| r.id).collect(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot list live sessions; spool and sealing wait");
            return;
        }
    };
    let spool = gw.config.data_dir.join("spool");
    let skip = move |id: &str| live.contains(id);
    // Fail closed: without the spool key nothing in the spool can be told from a planted
    // file, so nothing is uploaded and nothing sealed (sealing would call the waiting chunks
    // deleted); the spool keeps everything until the key loads.
    let Some(mac) = gw.spool_mac.get().cloned() else {
        tracing::error!("the outage spool cannot be authenticated (the spool key did not load from the vault): spooled chunks stay in the spool and recordings are not sealed late until it does");
        return;
    };
    let drained =
        crate::record::drain_spool(&spool, &gw.recordings, &*gw.store, Some(&mac), &skip).await;
    if drained.uploaded > 0 {
        tracing::warn!(
            chunks = drained.uploaded,
            "uploaded chunks spooled during a store outage"
        );
    }
    for key in &drained.refused {
        let row = match crate::record::session_of_key(key) {
            Some(id) => gw.store.find_session(id).await.ok().flatten(),
            None => None,
        };
        report_refused(
            gw,
            row.as_ref(),
            key,
            "a file in the outage spool is not what the gateway wrote (not in the evidence ledger with that hash, or without a valid spool index tag); refused and moved to spool-refused/",
        )
        .await;
    }
    let rows = match gw.store.unsealed_sessions().await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "cannot look for unsealed sessions");
            return;
        }
    };
    for row in rows {
        // Its spooled chunks first: sealing without them would call them deleted.
        if drained.waiting.contains(&row.id) {
            continue;
        }
        match seal_from_ledger(gw, &row).await {
            Ok(None) => {}
            Ok(Some(sealed)) => {
                tracing::warn!(session_id = %row.id, objects = sealed.objects, "sealed a recording its session could not seal (INCOMPLETE)");
                for m in &sealed.missing {
                    report_refused(
                        gw,
                        Some(&row),
                        &m.key,
                        &format!(
                            "the gateway wrote this object (SHA-256 {}), but at sealing it was {}",
                            m.sha256, m.why
                        ),
                    )
                    .await;
                }
                for k in &sealed.foreign {
                    report_refused(
                        gw,
                        Some(&row),
                        k,
                        "this object is under the session's prefix but the gateway never wrote it; not adopted",
                    )
                    .await;
                }
                // The head of the sealed chain reaches the SIEM, so a later cut is caught.
                let mut e = row_event(gw, &row, Action::RecordingCheckpoint).await;
                e.chain_head = Some(sealed.head.clone());
                e.objects = Some(sealed.objects as u64);
                e.message = Some(format!(
                    "recording sealed from the evidence ledger: {} objects",
                    sealed.objects
                ));
                if let Err(err) = gw.audit(&e).await {
                    tracing::error!(error = %err, "could not write SIEM event");
                }
            }
            Err(e) => {
                tracing::warn!(session_id = %row.id, error = %e, "recording not sealed yet; retried");
                continue;
            }
        }
        if let Err(e) = gw.store.set_sealed(&row.id, true).await {
            tracing::warn!(session_id = %row.id, error = %e, "could not mark the recording sealed");
        }
    }
}

/// Runs [`seal_pending`] every few seconds until shutdown.
pub async fn seal_pending_worker(gw: Arc<Gateway>) {
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        seal_pending(&gw).await;
    }
}

/// Closes index rows left open by a gateway that died, so `sessions list` tells the truth.
/// [`seal_pending`] then seals their recordings from the evidence ledger.
pub async fn recover_unfinished(gw: &Gateway) {
    let rows = match gw.store.unfinished_sessions().await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "cannot look for unfinished sessions");
            return;
        }
    };
    for row in rows {
        let now = clock::now();
        let end = SessionEnd {
            ended_at: now,
            end_reason: "gateway_crashed".into(),
            bytes_in: row.bytes_in,
            bytes_out: row.bytes_out,
        };
        if let Err(e) = gw.store.finish_session(&row.id, &end).await {
            tracing::warn!(session_id = %row.id, error = %e, "cannot close unfinished session");
            continue;
        }
        let mut e = AccessEvent::new(Action::SessionEnd, &row.person);
        e.person = Some(row.person.clone());
        e.target = Some(row.target.clone());
        e.session_id = Some(row.id.clone());
        e.grant_id = Some(row.grant_id.clone());
        e.correlation_id = Some(match gw.store.find_grant(&row.grant_id).await {
            Ok(g) => g.correlation_id().to_string(),
            Err(_) => row.grant_id.clone(),
        });
        e.recording = Some(row.recording_prefix.clone());
        e.outcome = "failure".into();
        e.side = Some("internal".into());
        e.reason = Some("gateway_crashed".into());
        e.message =
            Some("the gateway stopped during this session; the recording is incomplete".into());
        if let Err(err) = gw.audit(&e).await {
            tracing::error!(error = %err, "could not write SIEM event");
        }
    }
}
