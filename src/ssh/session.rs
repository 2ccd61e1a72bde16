//! A live SSH session: the session core's [`Live`] plus what only SSH has (the client and
//! upstream connection handles and the channel map), and crash recovery and sealing of
//! sessions left behind.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use russh::server;
use russh::ChannelId;
use tokio::time::Instant;

use super::upstream::UpstreamHandle;
use crate::clock;
use crate::record::{RecMsg, SessionEndInfo, SessionInfo};
use crate::services::Gateway;
use crate::session::{Live, SessionIo};
use crate::siem::{AccessEvent, Action};
use crate::state::SessionEnd;

pub use crate::session::EndReason;

/// A client channel as the session sees it.
#[derive(Debug, Clone)]
pub struct ChanState {
    /// Channel number in the recording.
    pub rec_ch: u32,
    pub pty: bool,
}

/// One live SSH session, shared by the connection handler and its channel pumps; the
/// supervisor sees only its [`Live`] core and its [`SshIo`].
pub struct LiveSession {
    pub core: Arc<Live>,
    pub io: Arc<SshIo>,
}

impl std::ops::Deref for LiveSession {
    type Target = Live;
    fn deref(&self) -> &Live {
        &self.core
    }
}

/// The SSH side of a session: the client's and the target's connections and the channels.
pub struct SshIo {
    /// Writes to the client outside the request/response cycle.
    pub client: server::Handle,
    pub upstream: UpstreamHandle,
    pub channels: Mutex<HashMap<ChannelId, ChanState>>,
    /// Notified whenever the client closes a channel.
    pub channel_closed: tokio::sync::Notify,
}

impl SshIo {
    pub fn new(client: server::Handle, upstream: UpstreamHandle) -> SshIo {
        SshIo {
            client,
            upstream,
            channels: Mutex::new(HashMap::new()),
            channel_closed: tokio::sync::Notify::new(),
        }
    }

    fn channel_list(&self) -> Vec<(ChannelId, ChanState)> {
        self.channels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (*k, v.clone()))
            .collect()
    }
}

#[async_trait]
impl SessionIo for SshIo {
    /// Shows a line to the user on every channel (pty: inline; otherwise stderr) and records
    /// it as a marker.
    async fn tell(&self, s: &Live, text: &str) {
        let line = format!("\r\n*** breakglass: {text} ***\r\n");
        let now = Instant::now();
        let r = &s.recorder;
        let _ = r
            .send(RecMsg::Marker {
                ch: None,
                label: text.to_string(),
                at: now,
            })
            .await;
        for (id, st) in self.channel_list() {
            if st.pty {
                let _ = r
                    .send(RecMsg::Data {
                        ch: st.rec_ch,
                        stream: crate::record::Stream::Out,
                        data: bytes::Bytes::from(line.clone().into_bytes()),
                        at: now,
                    })
                    .await;
                let _ = r
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

    async fn cut_upstream(&self) {
        let _ = self
            .upstream
            .disconnect(
                russh::Disconnect::ByApplication,
                "breakglass session ended",
                "en",
            )
            .await;
    }

    async fn close_client(&self, s: &Live, reason: &EndReason) {
        self.tell(s, &reason.message()).await;
        for (id, _) in self.channel_list() {
            let _ = self.client.exit_status_request(id, 255).await;
            let _ = self.client.eof(id).await;
            let _ = self.client.close(id).await;
        }
        // OpenSSH drops output it has not written yet when a disconnect arrives, so give the
        // client up to a second to close its channels (and print the reason) before
        // disconnecting it. The target is already unreachable.
        let grace = Instant::now() + Duration::from_secs(1);
        while !self.channel_list().is_empty() {
            if tokio::time::timeout_at(grace, self.channel_closed.notified())
                .await
                .is_err()
            {
                break;
            }
        }
        let _ = self
            .client
            .disconnect(
                russh::Disconnect::ByApplication,
                reason.message(),
                "en".into(),
            )
            .await;
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
    // Only the ledger vouches for an object. An empty one (its rows removed, or a crash
    // before the first commit) adopts nothing: every stored object is reported as foreign
    // and verify says TAMPERED, never OK over objects nobody can vouch for.
    if ledger.is_empty() && !listed.is_empty() {
        tracing::error!(session_id = %row.id, objects = listed.len(), "the evidence ledger lists nothing for this session; no stored object is adopted");
    }
    let entries = ledger;
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
    e.outcome = crate::siem::Outcome::Failure;
    e.side = Some(crate::grant::Side::Internal);
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
        Ok(r) => r.into_iter().filter(|r| ours(gw, r)).collect::<Vec<_>>(),
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

/// Whether this node acts for a session row: its own, or one from before sessions had nodes.
fn ours(gw: &Gateway, row: &crate::state::SessionRow) -> bool {
    row.node_id == gw.membership.node_id || row.node_id.is_empty()
}

/// Closes index rows this node left open when it died, so `sessions list` tells the truth.
/// [`seal_pending`] then seals their recordings from the evidence ledger.
pub async fn recover_unfinished(gw: &Gateway) {
    let rows = match gw.store.unfinished_sessions().await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "cannot look for unfinished sessions");
            return;
        }
    };
    let rows = rows.into_iter().filter(|r| ours(gw, r)).collect();
    close_crashed(
        gw,
        rows,
        "the gateway stopped during this session; the recording is incomplete",
    )
    .await;
}

/// Ends sessions whose gateway died: the index row is closed and the SIEM end event emitted.
async fn close_crashed(gw: &Gateway, rows: Vec<crate::state::SessionRow>, message: &str) {
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
        e.outcome = crate::siem::Outcome::Failure;
        e.side = Some(crate::grant::Side::Internal);
        e.reason = Some("gateway_crashed".into());
        e.message = Some(message.to_string());
        if let Err(err) = gw.audit(&e).await {
            tracing::error!(error = %err, "could not write SIEM event");
        }
    }
}

/// Renews this node's lease every third of `[cluster] lease` and takes over the sessions
/// of nodes whose lease lapsed (see [`crate::cluster`]).
pub async fn cluster_worker(gw: Arc<Gateway>) {
    let mut tick = tokio::time::interval(gw.membership.interval());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Taking over (sealing reads every object of a session) runs beside the heartbeat, one
    // pass at a time, so a long seal never lets this node's own lease lapse.
    let busy = Arc::new(std::sync::atomic::AtomicBool::new(false));
    loop {
        tick.tick().await;
        let live = gw.live_sessions().len() as u64;
        if let Err(e) = gw.membership.beat(live).await {
            tracing::warn!(error = %e, "could not renew this node's lease");
            continue;
        }
        if busy.swap(true, std::sync::atomic::Ordering::SeqCst) {
            continue;
        }
        let (gw, busy) = (gw.clone(), busy.clone());
        tokio::spawn(async move {
            take_over_lapsed(&gw).await;
            busy.store(false, std::sync::atomic::Ordering::SeqCst);
        });
    }
}

/// Adopts the unsealed sessions of every node whose lease lapsed, ends the live ones as
/// `gateway_crashed` and seals them all from the evidence ledger.
pub async fn take_over_lapsed(gw: &Gateway) {
    let nodes = match gw.membership.lapsed().await {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!(error = %e, "cannot list the cluster's nodes");
            return;
        }
    };
    let me = gw.membership.node_id.clone();
    let mut took = 0;
    for node in nodes {
        let rows = match gw.store.adopt_sessions(&node, &me).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(node = %node, error = %e, "cannot take over a lapsed node's sessions");
                continue;
            }
        };
        if !rows.is_empty() {
            tracing::warn!(node = %node, sessions = rows.len(), "took over the sessions of a node whose lease lapsed");
        }
        took += rows.len();
        // The dead node's SIEM events need no copying: they were committed to the shared
        // outbox, whose elected delivery worker (another node's, once that lease lapses too)
        // carries on from the same cursor.
        let open = rows.into_iter().filter(|r| r.ended_at.is_none()).collect();
        close_crashed(
            gw,
            open,
            &format!("gateway node {node} stopped renewing its lease during this session; node {me} took it over and sealed the recording from the evidence ledger (incomplete)"),
        )
        .await;
        if let Err(e) = gw.membership.forget_if_gone(&node).await {
            tracing::warn!(node = %node, error = %e, "cannot drop a long-gone node's lease");
        }
    }
    if took > 0 {
        seal_pending(gw).await;
    }
}
