//! The recorder: one task per session that turns relay taps into chunk objects in the
//! recording store, chains their hashes, extracts commands and file transfers, and writes the
//! session metadata when the session ends.
//!
//! Formats: a channel with a pty is recorded as asciicast v2 (`.cast` chunks whose
//! concatenation is a valid .cast file); a channel without a pty (exec, scp, sftp) carries
//! arbitrary binary data and is recorded exactly as framed raw bytes (`.raw` chunks, see
//! [`raw`], each chunk one LZ4 frame); `breakglass export` turns both into asciicast v2.

pub mod asciicast;
pub mod commands;
pub mod echo;
pub mod export;
pub mod raw;
pub mod transfer;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::storage::{key, RecordingStore, StorageError};

/// Version of the session metadata format (`recordings-schema/session.schema.json`).
pub const SESSION_SCHEMA_VERSION: u32 = 1;

/// A chunk is flushed early once its buffer reaches this size, bounding memory per channel.
const MAX_CHUNK_BYTES: usize = 4 << 20;

/// During a store outage the recorder holds at most this much unwritten data; beyond it the
/// recorder stops taking data, the relay waits, and after `recorder_stall_timeout` the session
/// ends (fail closed).
const SPOOL_LIMIT: usize = 64 << 20;

/// The most payload bytes queued for the recorder (data messages not yet taken in). With the
/// recorder's own buffers (at most [`SPOOL_LIMIT`] plus one message) and a pty channel's held
/// input ([`echo::MAX_HELD_BYTES`]), this bounds a session's recording memory.
pub const QUEUE_BYTES: usize = 16 << 20;

/// The recorder sleeps while data messages queue up and takes them in at its flush tick
/// (the flush covers them all the same), so that a relay does not wake another task for
/// every message: it is woken early by any other message, or once this many data bytes or
/// [`WAKE_MESSAGES`] messages wait.
const WAKE_BYTES: usize = 256 << 10;
const WAKE_MESSAGES: usize = 256;
const QUEUE_MESSAGES: usize = 4096;

/// A queued message and its share of [`QUEUE_BYTES`].
#[derive(Debug)]
struct Queued {
    msg: RecMsg,
    _permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// Messages queued for the recorder. The queue is bounded; when it is full the relay waits
/// (backpressure) up to `recorder_stall_timeout`, then the session ends (fail closed). Nothing
/// is ever dropped.
#[derive(Debug)]
pub enum RecMsg {
    /// A channel starts a shell, exec or subsystem. `pty` decides the format.
    Start {
        ch: u32,
        kind: ChannelKind,
        pty: Option<PtyInfo>,
        env: BTreeMap<String, String>,
        at: Instant,
    },
    Data {
        ch: u32,
        stream: Stream,
        data: Bytes,
        at: Instant,
    },
    Resize {
        ch: u32,
        cols: u32,
        rows: u32,
        at: Instant,
    },
    /// A marker: a deadline warning, a refusal, a signal.
    Marker {
        ch: Option<u32>,
        label: String,
        at: Instant,
    },
    Exit {
        ch: u32,
        status: Option<u32>,
        signal: Option<String>,
    },
    Close {
        ch: u32,
    },
    /// Flush everything, write the session metadata and report it.
    Finish {
        end: SessionEndInfo,
        reply: oneshot::Sender<Result<SessionMeta, StorageError>>,
    },
}

/// Which way the bytes went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// Client → target (keystrokes, uploads).
    In,
    /// Target → client stdout.
    Out,
    /// Target → client stderr.
    Err,
}

/// What a channel runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ChannelKind {
    Shell,
    Exec {
        command: String,
    },
    Subsystem {
        name: String,
    },
    /// A PostgreSQL session: the frames are protocol messages.
    Postgres {
        database: String,
        role: String,
    },
}

/// The pty a client asked for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PtyInfo {
    pub term: String,
    pub cols: u32,
    pub rows: u32,
}

/// Fixed facts about a session, written into every recording header and the metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionInfo {
    pub session_id: String,
    pub protocol: String,
    pub person: String,
    pub target: String,
    pub login: String,
    pub grant_id: String,
    pub justification: String,
    pub incident_id: String,
    pub client_addr: String,
    pub started_at: String,
    pub deadline: String,
}

/// How a session ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionEndInfo {
    pub ended_at: String,
    pub end_reason: String,
    pub end_message: String,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

/// One stored object in chain order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectEntry {
    pub key: String,
    pub size: u64,
    pub sha256: String,
    /// Chain link after this object.
    pub chain: String,
    /// The version id the store gave this object (S3 with versioning): verify and export read
    /// exactly this version, and a newer one over it is reported as tampering.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

/// A file moved over scp or sftp.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferMeta {
    pub protocol: String,
    pub direction: String,
    pub path: String,
    pub size: u64,
    pub sha256: String,
    pub complete: bool,
}

/// A command typed at a shell, as the line editor reconstructed it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandMeta {
    /// Seconds since the channel started.
    pub time: f64,
    pub text: String,
    pub complete: bool,
    /// True when completion or history keys were used, so the text may differ from what ran.
    pub uncertain: bool,
    /// Set when the line was typed without echo (a password): `text` is then a placeholder
    /// and the input itself was never stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redacted: Option<Redaction>,
}

/// What was kept out of the record, and how much of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Redaction {
    /// `no-echo`: typed while the target did not echo (see [`echo`]).
    pub kind: String,
    pub bytes: u64,
}

impl Redaction {
    /// The text that stands in for redacted input, in commands and in `i` events.
    pub fn placeholder(kind: &str, bytes: usize) -> String {
        format!("[redacted {kind}: {bytes} bytes]")
    }
}

/// Per-channel metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChannelMeta {
    pub channel: u32,
    pub kind: Option<ChannelKind>,
    pub pty: Option<PtyInfo>,
    /// `cast` or `raw`.
    pub format: String,
    pub env: BTreeMap<String, String>,
    pub started_at: String,
    pub exit_status: Option<u32>,
    pub exit_signal: Option<String>,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub commands: Vec<CommandMeta>,
    pub transfers: Vec<TransferMeta>,
    pub notes: Vec<String>,
    pub chunks: u64,
}

/// The session metadata object (`session.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionMeta {
    pub schema_version: u32,
    pub session: SessionInfo,
    pub end: SessionEndInfo,
    pub channels: Vec<ChannelMeta>,
    pub markers: Vec<String>,
    /// Every object of the recording, in the order written.
    pub objects: Vec<ObjectEntry>,
    /// Algorithm of the chain: see `chain_link`.
    pub chain_algorithm: String,
    pub chain_head: String,
    /// True when a restarted gateway sealed what a crashed one left (INCOMPLETE).
    #[serde(default)]
    pub recovered: bool,
    /// Objects the evidence ledger says the gateway wrote, which were gone or altered when
    /// the recording was sealed after a crash or an outage: `verify` says TAMPERED.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub missing: Vec<MissingObject>,
}

/// An object the gateway wrote that was not found as written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MissingObject {
    pub key: String,
    /// What the gateway wrote.
    pub sha256: String,
    pub size: u64,
    /// `deleted` or `altered`.
    pub why: String,
}

/// The detached signature next to `session.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestSignature {
    pub algorithm: String,
    pub key_id: String,
    /// base64 of the Ed25519 signature over the exact bytes of `session.json`.
    pub signature: String,
    /// SHA-256 (hex) of the signed bytes.
    pub sha256: String,
}

/// Writes `session.json` and its signature `session.json.sig`, both create-only.
pub async fn write_manifest(
    store: &RecordingStore,
    prefix: &str,
    meta: &SessionMeta,
    signer: &crate::signing::Signer,
) -> Result<(), StorageError> {
    use base64::Engine;
    let body = serde_json::to_vec_pretty(meta).map_err(|e| StorageError::Backend(e.to_string()))?;
    let sig = ManifestSignature {
        algorithm: "ed25519".into(),
        key_id: signer.current_public.id.clone(),
        signature: base64::engine::general_purpose::STANDARD.encode(signer.sign(&body)),
        sha256: hex::encode(Sha256::digest(&body)),
    };
    let sig = serde_json::to_vec_pretty(&sig).map_err(|e| StorageError::Backend(e.to_string()))?;
    store
        .put_new(&key::session_end(prefix), Bytes::from(body))
        .await?;
    store
        .put_new(&key::manifest_signature(prefix), Bytes::from(sig))
        .await
        .map(|_| ())
}

/// First link of a session's hash chain.
pub fn chain_seed(session_id: &str) -> String {
    hex::encode(Sha256::digest(format!("breakglass-chain-v1\n{session_id}")))
}

/// `link_n = SHA-256(link_{n-1} ‖ "\n" ‖ key_n ‖ "\n" ‖ sha256_hex(content_n))`, hex encoded.
pub fn chain_link(prev: &str, key: &str, content_sha256: &str) -> String {
    let mut h = Sha256::new();
    h.update(prev.as_bytes());
    h.update(b"\n");
    h.update(key.as_bytes());
    h.update(b"\n");
    h.update(content_sha256.as_bytes());
    hex::encode(h.finalize())
}

/// Why recording stopped, shared with the session so it can end (fail closed).
#[derive(Clone, Default)]
pub struct Failure {
    pub token: CancellationToken,
    reason: Arc<Mutex<Option<String>>>,
}

impl Failure {
    /// Records the first failure and cancels the token.
    pub fn fail(&self, why: String) {
        let mut r = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        if r.is_none() {
            *r = Some(why);
        }
        self.token.cancel();
    }
    pub fn reason(&self) -> Option<String> {
        self.reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// The relay's handle to the session recorder.
#[derive(Clone)]
pub struct Recorder {
    tx: mpsc::Sender<Queued>,
    /// Wakes the recorder task early (see [`WAKE_BYTES`]).
    wake: Arc<tokio::sync::Notify>,
    /// Payload bytes the queue may hold ([`QUEUE_BYTES`]).
    budget: Arc<tokio::sync::Semaphore>,
    stall: Duration,
    pub failure: Failure,
    /// The chain head and object count after the last stored object (for checkpoints).
    checkpoint: Arc<Mutex<(String, usize)>>,
}

/// How a recorder behaves; the same for every session of a gateway.
#[derive(Clone)]
pub struct RecorderSettings {
    /// No more than this much data is held unflushed.
    pub flush_interval: Duration,
    /// How long the relay waits for a full recorder queue before the session ends.
    pub stall: Duration,
    /// How long a store outage may last before the session ends.
    pub grace: Duration,
    /// Where refused chunks wait on local disk.
    pub spool_dir: std::path::PathBuf,
    /// Authenticates each spooled chunk (a `.mac` file beside it); None when the vault's KEK
    /// is unavailable, and then only the evidence ledger vouches for the spool.
    pub spool_mac: Option<Arc<SpoolMac>>,
    /// Signs the manifest.
    pub signer: Arc<crate::signing::Signer>,
    /// Keep input typed without echo out of the record (the target's `redact_no_echo`).
    pub redact_no_echo: bool,
    /// The evidence ledger: every object written (or spooled) is committed here, so crash
    /// recovery adopts only what the gateway wrote. None only in unit tests.
    pub ledger: Option<Arc<dyn crate::state::Store>>,
}

/// Called for every action (channel, text, uncertain): by the recorder for SSH exec requests,
/// lines typed at a pty (and the placeholder of a redacted no-echo line), by the PostgreSQL
/// relay for each masked Query/Parse statement. Must not block.
pub type ActionHook = Arc<dyn Fn(u32, &str, bool) + Send + Sync>;

impl Recorder {
    /// Opens the recording: writes `session-start.json` (create-only) and starts the recorder
    /// task. An error here means the session must be refused.
    pub async fn open(
        store: RecordingStore,
        prefix: String,
        info: SessionInfo,
        settings: RecorderSettings,
    ) -> Result<Recorder, StorageError> {
        Recorder::open_with_actions(store, prefix, info, settings, None).await
    }

    /// [`Recorder::open`], also reporting each command to `actions` (per-action SIEM events).
    pub async fn open_with_actions(
        store: RecordingStore,
        prefix: String,
        info: SessionInfo,
        settings: RecorderSettings,
        actions: Option<ActionHook>,
    ) -> Result<Recorder, StorageError> {
        let RecorderSettings {
            flush_interval,
            stall,
            grace,
            spool_dir,
            spool_mac,
            signer,
            redact_no_echo,
            ledger,
        } = settings;
        let start = serde_json::to_vec_pretty(&serde_json::json!({
            "schema_version": SESSION_SCHEMA_VERSION,
            "session": &info,
        }))
        .map_err(|e| StorageError::Backend(e.to_string()))?;
        let start_key = key::session_start(&prefix);
        let sha = hex::encode(Sha256::digest(&start));
        let size = start.len() as u64;
        let version = store.put_new(&start_key, Bytes::from(start)).await?;
        let seed = chain_seed(&info.session_id);
        let link = chain_link(&seed, &start_key, &sha);
        let start_entry = crate::state::LedgerEntry {
            key: start_key.clone(),
            size,
            sha256: sha.clone(),
            chained: Some((0, link.clone())),
        };
        let objects = vec![ObjectEntry {
            key: start_key,
            size,
            sha256: sha,
            chain: link.clone(),
            version,
        }];
        // Bounded twice: 4096 messages, and QUEUE_BYTES of payload (a permit per byte travels
        // with each data message until the recorder has taken it in).
        let (tx, rx) = mpsc::channel(QUEUE_MESSAGES);
        let wake = Arc::new(tokio::sync::Notify::new());
        let budget = Arc::new(tokio::sync::Semaphore::new(QUEUE_BYTES));
        let failure = Failure::default();
        let checkpoint = Arc::new(Mutex::new((link.clone(), 1usize)));
        let task = RecorderTask {
            store,
            prefix,
            info,
            channels: BTreeMap::new(),
            markers: Vec::new(),
            objects,
            head: link,
            failure: failure.clone(),
            session_start: Instant::now(),
            signer,
            grace,
            spool_dir,
            spool_mac,
            outage_since: None,
            unrecorded: 0,
            checkpoint: checkpoint.clone(),
            actions,
            redact_no_echo,
            ledger,
            ledger_pending: vec![start_entry],
        };
        let wake_task = wake.clone();
        tokio::spawn(async move {
            let mut task = task;
            task.commit_ledger().await;
            task.run(rx, wake_task, flush_interval).await
        });
        Ok(Recorder {
            tx,
            wake,
            budget,
            stall,
            failure,
            checkpoint,
        })
    }

    /// Queues a message, waiting at most the stall timeout. On timeout or a dead recorder the
    /// session's failure token fires and an error is returned: the caller must stop relaying.
    pub async fn send(&self, msg: RecMsg) -> Result<(), ()> {
        if self.failure.token.is_cancelled() {
            return Err(());
        }
        let data_only = matches!(msg, RecMsg::Data { .. });
        let permit = match &msg {
            RecMsg::Data { data, .. } => {
                let n = u32::try_from(data.len().clamp(1, QUEUE_BYTES)).unwrap_or(u32::MAX);
                match self.budget.clone().try_acquire_many_owned(n) {
                    Ok(p) => Some(p),
                    Err(_) => match tokio::time::timeout(
                        self.stall,
                        self.budget.clone().acquire_many_owned(n),
                    )
                    .await
                    {
                        Ok(Ok(p)) => Some(p),
                        Ok(Err(_)) => {
                            self.failure.fail("recorder stopped".into());
                            return Err(());
                        }
                        Err(_) => {
                            self.failure
                                .fail(format!("recorder could not keep up for {:?}", self.stall));
                            return Err(());
                        }
                    },
                }
            }
            _ => None,
        };
        let item = Queued {
            msg,
            _permit: permit,
        };
        match self.tx.try_send(item) {
            Ok(()) => {
                let waiting_bytes = QUEUE_BYTES.saturating_sub(self.budget.available_permits());
                let waiting = QUEUE_MESSAGES.saturating_sub(self.tx.capacity());
                if !data_only || waiting_bytes >= WAKE_BYTES || waiting >= WAKE_MESSAGES {
                    self.wake.notify_one();
                }
                Ok(())
            }
            Err(mpsc::error::TrySendError::Full(item)) => {
                self.wake.notify_one();
                match tokio::time::timeout(self.stall, self.tx.send(item)).await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(_)) => {
                        self.failure.fail("recorder stopped".into());
                        Err(())
                    }
                    Err(_) => {
                        self.failure
                            .fail(format!("recorder could not keep up for {:?}", self.stall));
                        Err(())
                    }
                }
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.failure.fail("recorder stopped".into());
                Err(())
            }
        }
    }

    /// The current chain head and how many objects it covers.
    pub fn checkpoint(&self) -> (String, usize) {
        self.checkpoint
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Flushes and seals the recording, returning its metadata.
    pub async fn finish(&self, end: SessionEndInfo) -> Result<SessionMeta, StorageError> {
        let (reply, rx) = oneshot::channel();
        // Woken before and after: a full queue must drain for the Finish to get in.
        self.wake.notify_one();
        self.tx
            .send(Queued {
                msg: RecMsg::Finish { end, reply },
                _permit: None,
            })
            .await
            .map_err(|_| {
                StorageError::Backend("recorder stopped before the session was sealed".into())
            })?;
        self.wake.notify_one();
        rx.await.map_err(|_| {
            StorageError::Backend("recorder stopped before the session was sealed".into())
        })?
    }
}

/// Per-channel recorder state.
struct ChanRec {
    meta: ChannelMeta,
    start: Instant,
    /// Encoded but not yet stored bytes.
    buf: Vec<u8>,
    seq: u64,
    cast: Option<CastState>,
    /// Pty channels: command extraction and no-echo redaction; every cast event of the
    /// channel passes through it (other events as encoded bytes) so order is kept.
    guard: Option<echo::EchoGuard<Vec<u8>>>,
    sftp: Option<transfer::SftpTracker>,
    scp: Option<transfer::ScpTracker>,
    header_done: bool,
    closed: bool,
}

struct CastState {
    out: asciicast::Utf8Carry,
    inp: asciicast::Utf8Carry,
}

struct RecorderTask {
    store: RecordingStore,
    prefix: String,
    info: SessionInfo,
    /// Boxed: a map node holds 11 values inline, and a ChanRec (trackers, echo guard) is
    /// large, so unboxed every idle session carried one wide node.
    channels: BTreeMap<u32, Box<ChanRec>>,
    markers: Vec<String>,
    objects: Vec<ObjectEntry>,
    head: String,
    failure: Failure,
    session_start: Instant,
    /// Signs the manifest when the session is sealed.
    signer: Arc<crate::signing::Signer>,
    /// How long a store outage may last before the session ends.
    grace: Duration,
    /// Where chunks the store refused wait on local disk (fsync'd), so a crash during an
    /// outage still loses at most one flush interval; drained at the next start.
    spool_dir: std::path::PathBuf,
    spool_mac: Option<Arc<SpoolMac>>,
    /// When the current store outage began.
    outage_since: Option<Instant>,
    /// Messages dropped after the recording failed with its buffers full (the session is
    /// being ended; the store could not take them). Noted in the manifest.
    unrecorded: u64,
    /// Shared with the session for periodic checkpoint events.
    checkpoint: Arc<Mutex<(String, usize)>>,
    /// Per-action SIEM events.
    actions: Option<ActionHook>,
    /// Whether pty channels redact input typed without echo.
    redact_no_echo: bool,
    /// Where every written or spooled object is committed (see [`RecorderSettings::ledger`]).
    ledger: Option<Arc<dyn crate::state::Store>>,
    /// Entries not committed yet (the state store was failing).
    ledger_pending: Vec<crate::state::LedgerEntry>,
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

impl RecorderTask {
    async fn run(
        mut self,
        mut rx: mpsc::Receiver<Queued>,
        wake: Arc<tokio::sync::Notify>,
        flush_interval: Duration,
    ) {
        let mut tick = tokio::time::interval(flush_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Taking messages in as they come; asleep (until woken or the tick) once none waits.
        let mut awake = true;
        loop {
            let full = self.buffered() >= SPOOL_LIMIT;
            // Once the recording has failed the session is ending: its Finish must get
            // through even when the buffers stay full (a full disk takes nothing back).
            let failed = self.failure.reason().is_some();
            if rx.is_empty() {
                awake = false;
            }
            tokio::select! {
                item = rx.recv(), if failed || (awake && !full) => {
                    if self.take(item, full, failed).await.is_break() {
                        return;
                    }
                }
                _ = wake.notified(), if !awake => awake = true,
                _ = tick.tick() => {
                    // What queued since the last tick first, so this flush covers it.
                    loop {
                        let full = self.buffered() >= SPOOL_LIMIT;
                        let failed = self.failure.reason().is_some();
                        if full && !failed {
                            break;
                        }
                        let item = match rx.try_recv() {
                            Ok(item) => Some(item),
                            Err(mpsc::error::TryRecvError::Empty) => break,
                            Err(mpsc::error::TryRecvError::Disconnected) => None,
                        };
                        if self.take(item, full, failed).await.is_break() {
                            return;
                        }
                    }
                    // Lines are judged by the clock only when no message waits: a backlog
                    // may hold the very echo that would clear them.
                    if rx.is_empty() {
                        self.tick_guards();
                    }
                    // After a failure only the seal writes (the queue drains first).
                    if self.failure.reason().is_none() {
                        let r = self.flush_all().await;
                        self.note_flush(r);
                        self.commit_ledger().await;
                    }
                }
            }
        }
    }

    /// Takes one message in (`None`: every sender is gone). Breaks once the recording is
    /// sealed or abandoned.
    async fn take(
        &mut self,
        item: Option<Queued>,
        full: bool,
        failed: bool,
    ) -> std::ops::ControlFlow<()> {
        use std::ops::ControlFlow;
        // The permit goes when the message is taken in: its bytes are in the recorder's
        // buffers (bounded by SPOOL_LIMIT) from then on.
        let Some(Queued { msg, .. }) = item else {
            // Every sender is gone without a Finish: flush what we have so a crash of the
            // session task loses nothing already tapped.
            let _ = self.flush_all().await;
            self.commit_ledger().await;
            return ControlFlow::Break(());
        };
        if let RecMsg::Finish { end, reply } = msg {
            let res = self.seal(end).await;
            let _ = reply.send(res);
            return ControlFlow::Break(());
        }
        if full {
            self.unrecorded += 1;
            return ControlFlow::Continue(());
        }
        self.handle(msg);
        // After a failure the session is ending: what is still queued is taken in without a
        // write per message (each would wait out the failing store), so the Finish behind it
        // comes through; the seal writes what it can.
        if !failed {
            let r = self.flush_big().await;
            self.note_flush(r);
            self.commit_ledger().await;
        }
        ControlFlow::Continue(())
    }

    /// Commits pending ledger entries; on failure they wait for the next flush. A state store
    /// that hangs does not hold up recording.
    async fn commit_ledger(&mut self) {
        let Some(ledger) = self.ledger.clone() else {
            self.ledger_pending.clear();
            return;
        };
        if self.ledger_pending.is_empty() {
            return;
        }
        let fut = ledger.record_objects(&self.info.session_id, &self.ledger_pending);
        match tokio::time::timeout(Duration::from_secs(2), fut).await {
            Ok(Ok(())) => self.ledger_pending.clear(),
            Ok(Err(e)) => {
                tracing::warn!(session_id = %self.info.session_id, error = %e, "evidence ledger not updated yet; retried at the next flush")
            }
            Err(_) => {
                tracing::warn!(session_id = %self.info.session_id, "evidence ledger timed out; retried at the next flush")
            }
        }
    }

    /// Lets every pty channel judge lines that waited too long for their echo.
    fn tick_guards(&mut self) {
        let hook = self.actions.clone();
        let now = Instant::now();
        for (&ch, c) in self.channels.iter_mut() {
            let t = secs(now.saturating_duration_since(c.start));
            if let Some(g) = c.guard.as_mut() {
                let mut evs = Vec::new();
                g.tick(t, &mut evs);
                apply_guarded(c, evs, hook.as_ref(), ch);
            }
        }
    }

    /// Bytes encoded but not yet stored.
    fn buffered(&self) -> usize {
        self.channels.values().map(|c| c.buf.len()).sum()
    }

    /// Tracks store outages: within the grace period data stays buffered and is retried; past
    /// it the session ends.
    fn note_flush(&mut self, r: Result<usize, StorageError>) {
        match r {
            // Nothing written proves nothing about the store.
            Ok(0) => {}
            Ok(_) => {
                if let Some(since) = self.outage_since.take() {
                    tracing::warn!(session_id = %self.info.session_id, outage = ?since.elapsed(), "recording store is back");
                }
            }
            Err(e) => {
                let since = *self.outage_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= self.grace {
                    self.failure.fail(format!(
                        "{e}; the store has been failing for {:?}",
                        since.elapsed()
                    ));
                } else {
                    tracing::warn!(session_id = %self.info.session_id, error = %e, "recording store failing; data held and retried");
                }
            }
        }
    }

    fn chan(&mut self, ch: u32, at: Instant) -> &mut ChanRec {
        self.channels.entry(ch).or_insert_with(|| {
            Box::new(ChanRec {
                meta: ChannelMeta {
                    channel: ch,
                    kind: None,
                    pty: None,
                    format: "raw".into(),
                    env: BTreeMap::new(),
                    started_at: crate::clock::rfc3339(crate::clock::now()),
                    exit_status: None,
                    exit_signal: None,
                    bytes_in: 0,
                    bytes_out: 0,
                    commands: Vec::new(),
                    transfers: Vec::new(),
                    notes: Vec::new(),
                    chunks: 0,
                },
                start: at,
                buf: Vec::new(),
                seq: 0,
                cast: None,
                guard: None,
                sftp: None,
                scp: None,
                header_done: false,
                closed: false,
            })
        })
    }

    fn handle(&mut self, msg: RecMsg) {
        match msg {
            RecMsg::Start {
                ch,
                kind,
                pty,
                env,
                at,
            } => {
                let info = self.info.clone();
                let hook = self.actions.clone();
                let redact_no_echo = self.redact_no_echo;
                let c = self.chan(ch, at);
                c.start = at;
                c.meta.started_at = crate::clock::rfc3339(crate::clock::now());
                c.meta.env = env.clone();
                match &kind {
                    ChannelKind::Subsystem { name } if name == "sftp" => {
                        c.sftp = Some(transfer::SftpTracker::new());
                    }
                    ChannelKind::Exec { command } => {
                        if let Some(hook) = &hook {
                            hook(ch, command, false);
                        }
                        if let Some((dir, path)) = transfer::scp_direction(command) {
                            c.scp = Some(transfer::ScpTracker::new(dir, path));
                        }
                    }
                    ChannelKind::Subsystem { .. }
                    | ChannelKind::Shell
                    | ChannelKind::Postgres { .. } => {}
                }
                if let Some(p) = &pty {
                    c.meta.format = "cast".into();
                    c.cast = Some(CastState {
                        out: asciicast::Utf8Carry::default(),
                        inp: asciicast::Utf8Carry::default(),
                    });
                    // Every pty channel: a shell, or `ssh -t host bash -i`.
                    c.guard = Some(echo::EchoGuard::new(redact_no_echo));
                    let header = asciicast::Header {
                        // A client without a real terminal (ssh -tt < file) reports 0x0.
                        width: if p.cols == 0 { 80 } else { p.cols },
                        height: if p.rows == 0 { 24 } else { p.rows },
                        timestamp: crate::clock::now().timestamp(),
                        command: match &kind {
                            ChannelKind::Exec { command } => Some(command.clone()),
                            ChannelKind::Subsystem { name } => Some(format!("subsystem:{name}")),
                            ChannelKind::Postgres { database, role } => {
                                Some(format!("postgres:{role}@{database}"))
                            }
                            ChannelKind::Shell => None,
                        },
                        title: Some(format!(
                            "{} on {} ({}) session {} channel {ch}",
                            info.person, info.target, info.incident_id, info.session_id
                        )),
                        env: {
                            let mut e = env.clone();
                            e.insert("TERM".into(), p.term.clone());
                            e
                        },
                        extra: Some(serde_json::json!({
                            "session": info,
                            "channel": ch,
                            "kind": kind,
                        })),
                    };
                    c.buf.extend_from_slice(&asciicast::encode_header(&header));
                    c.header_done = true;
                } else {
                    c.buf
                        .extend_from_slice(&raw::encode_header(&raw::RawHeader {
                            session_id: info.session_id.clone(),
                            channel: ch,
                            kind: kind.clone(),
                        }));
                    c.header_done = true;
                }
                c.meta.kind = Some(kind);
                c.meta.pty = pty;
            }
            RecMsg::Data {
                ch,
                stream,
                data,
                at,
            } => {
                let hook = self.actions.clone();
                let c = self.chan(ch, at);
                let t = secs(at.saturating_duration_since(c.start));
                if !c.header_done {
                    // Data before shell/exec/subsystem is unusual but legal: record it raw.
                    c.buf
                        .extend_from_slice(&raw::encode_header(&raw::RawHeader {
                            session_id: String::new(),
                            channel: ch,
                            kind: ChannelKind::Shell,
                        }));
                    c.header_done = true;
                }
                match stream {
                    Stream::In => c.meta.bytes_in += data.len() as u64,
                    Stream::Out | Stream::Err => c.meta.bytes_out += data.len() as u64,
                }
                // PostgreSQL statements reach the action hook from the relay (pg::relay), which
                // sees whole messages; here a large one may arrive in pieces.
                if let Some(s) = c.sftp.as_mut() {
                    let done = match stream {
                        Stream::In => s.from_client(&data),
                        Stream::Out => s.from_server(&data),
                        Stream::Err => Vec::new(),
                    };
                    c.meta.transfers.extend(done.into_iter().map(transfer_meta));
                    let t = secs(at.saturating_duration_since(c.start));
                    c.meta.notes.extend(
                        s.take_ops()
                            .into_iter()
                            .map(|op| format!("{t:.3}s sftp {op}")),
                    );
                }
                if let Some(s) = c.scp.as_mut() {
                    let done = match stream {
                        Stream::In => s.from_client(&data),
                        Stream::Out => s.from_server(&data),
                        Stream::Err => Vec::new(),
                    };
                    c.meta.transfers.extend(done.into_iter().map(transfer_meta));
                }
                if let Some(g) = c.guard.as_mut() {
                    let mut evs = Vec::new();
                    match stream {
                        Stream::In => g.input(t, &data, &mut evs),
                        Stream::Out | Stream::Err => g.output(t, &data, &mut evs),
                    }
                    apply_guarded(c, evs, hook.as_ref(), ch);
                } else if let Some(cs) = c.cast.as_mut() {
                    let (kind, text) = match stream {
                        Stream::In => (asciicast::EventKind::Input, cs.inp.push(&data)),
                        Stream::Out | Stream::Err => {
                            (asciicast::EventKind::Output, cs.out.push(&data))
                        }
                    };
                    if !text.is_empty() {
                        c.buf
                            .extend_from_slice(&asciicast::encode_event(t, kind, &text));
                    }
                } else {
                    raw::encode_frame(
                        &mut c.buf,
                        stream,
                        at.saturating_duration_since(c.start),
                        &data,
                    );
                }
            }
            RecMsg::Resize { ch, cols, rows, at } => {
                let hook = self.actions.clone();
                let c = self.chan(ch, at);
                let t = secs(at.saturating_duration_since(c.start));
                if let Some(p) = c.meta.pty.as_mut() {
                    p.cols = cols;
                    p.rows = rows;
                }
                if c.cast.is_some() {
                    let ev = asciicast::encode_event(
                        t,
                        asciicast::EventKind::Resize,
                        &format!("{cols}x{rows}"),
                    );
                    push_cast_event(c, t, ev, hook.as_ref(), ch);
                } else {
                    c.meta.notes.push(format!("{t:.3}s resize {cols}x{rows}"));
                }
            }
            RecMsg::Marker { ch, label, at } => {
                let hook = self.actions.clone();
                let since = secs(at.saturating_duration_since(self.session_start));
                self.markers.push(format!("{since:.3}s {label}"));
                if let Some(ch) = ch {
                    let c = self.chan(ch, at);
                    let t = secs(at.saturating_duration_since(c.start));
                    if c.cast.is_some() {
                        let ev = asciicast::encode_event(t, asciicast::EventKind::Marker, &label);
                        push_cast_event(c, t, ev, hook.as_ref(), ch);
                    } else {
                        c.meta.notes.push(format!("{t:.3}s {label}"));
                    }
                }
            }
            RecMsg::Exit { ch, status, signal } => {
                let c = self.chan(ch, Instant::now());
                if status.is_some() {
                    c.meta.exit_status = status;
                }
                if signal.is_some() {
                    c.meta.exit_signal = signal;
                }
            }
            RecMsg::Close { ch } => {
                let hook = self.actions.clone();
                let c = self.chan(ch, Instant::now());
                close_channel(c, hook.as_ref());
            }
            RecMsg::Finish { .. } => {
                // Handled by `run` before `handle` is called.
            }
        }
    }

    /// Flushes channels whose buffer is full; returns how many chunks were written.
    async fn flush_big(&mut self) -> Result<usize, StorageError> {
        let big: Vec<u32> = self
            .channels
            .iter()
            .filter(|(_, c)| c.buf.len() >= MAX_CHUNK_BYTES)
            .map(|(k, _)| *k)
            .collect();
        let mut n = 0;
        for ch in big {
            n += self.flush_channel(ch).await?;
        }
        Ok(n)
    }

    /// Flushes every channel with buffered data; returns how many chunks were written.
    async fn flush_all(&mut self) -> Result<usize, StorageError> {
        let chans: Vec<u32> = self.channels.keys().copied().collect();
        let mut n = 0;
        for ch in chans {
            n += self.flush_channel(ch).await?;
        }
        Ok(n)
    }

    /// Writes one channel's buffer as its next chunk; returns 1 if it wrote one.
    async fn flush_channel(&mut self, ch: u32) -> Result<usize, StorageError> {
        let Some(c) = self.channels.get_mut(&ch) else {
            return Ok(0);
        };
        if c.buf.is_empty() {
            return Ok(0);
        }
        let ext = if c.cast.is_some() { "cast" } else { "raw.lz4" };
        let k = key::chunk(&self.prefix, ch, c.seq, ext);
        let plain = std::mem::take(&mut c.buf);
        // Raw channels carry bulk data (scp, dumps): each chunk is one standard LZ4 frame
        // (`lz4 -d` reads it), which cuts storage and the write and hash cost of compressible
        // data. Terminal chunks stay plain asciicast.
        let data = if c.cast.is_some() {
            Bytes::from(plain.clone())
        } else {
            Bytes::from(
                raw::compress(&plain).map_err(|e| StorageError::Backend(format!("lz4: {e}")))?,
            )
        };
        let sha = hex::encode(Sha256::digest(&data));
        let size = data.len() as u64;
        // A hung store counts as a failed write: the outage clock must keep running.
        let put = match tokio::time::timeout(
            self.grace.max(Duration::from_secs(1)),
            self.store.put_new(&k, data),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(StorageError::Backend(format!("write of {k} timed out"))),
        };
        let version = put.as_ref().ok().cloned().flatten();
        if let Err(e) = put {
            // Keep the data for the retry, and a durable copy in the local spool.
            let spooled = plain_for_spool(&plain, ext);
            match spool_write(&self.spool_dir, &k, &spooled, self.spool_mac.as_deref()) {
                Ok(()) => self.ledger_pending.push(crate::state::LedgerEntry {
                    key: k.clone(),
                    size: spooled.len() as u64,
                    sha256: hex::encode(Sha256::digest(&spooled)),
                    chained: None,
                }),
                Err(se) => {
                    tracing::error!(key = %k, error = %se, "could not spool a chunk to local disk")
                }
            }
            if let Some(c) = self.channels.get_mut(&ch) {
                let mut restored = plain;
                restored.append(&mut c.buf);
                c.buf = restored;
            }
            return Err(e);
        }
        spool_remove(&self.spool_dir, &k);
        if let Some(c) = self.channels.get_mut(&ch) {
            c.seq += 1;
            c.meta.chunks = c.seq;
        }
        self.head = chain_link(&self.head, &k, &sha);
        *self.checkpoint.lock().unwrap_or_else(|p| p.into_inner()) =
            (self.head.clone(), self.objects.len() + 1);
        self.ledger_pending.push(crate::state::LedgerEntry {
            key: k.clone(),
            size,
            sha256: sha.clone(),
            chained: Some((self.objects.len() as u64, self.head.clone())),
        });
        self.objects.push(ObjectEntry {
            key: k,
            size,
            sha256: sha,
            chain: self.head.clone(),
            version,
        });
        Ok(1)
    }

    async fn seal(&mut self, end: SessionEndInfo) -> Result<SessionMeta, StorageError> {
        let hook = self.actions.clone();
        let unrecorded = self.unrecorded;
        for c in self.channels.values_mut() {
            close_channel(c, hook.as_ref());
            if unrecorded > 0 {
                c.meta.notes.push(format!(
                    "{unrecorded} message(s) after the recording failed were not recorded: the store took nothing more and the session was ended"
                ));
            }
        }
        // Within the grace period, keep retrying a failing store before giving up.
        loop {
            match self.flush_all().await {
                Ok(_) => break,
                Err(e) => {
                    let since = *self.outage_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= self.grace {
                        // What waits in the spool is on the ledger, so the gateway seals it
                        // once the store is back.
                        self.commit_ledger().await;
                        return Err(e);
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        let meta = SessionMeta {
            schema_version: SESSION_SCHEMA_VERSION,
            session: self.info.clone(),
            end,
            channels: self.channels.values().map(|c| c.meta.clone()).collect(),
            markers: self.markers.clone(),
            objects: self.objects.clone(),
            chain_algorithm: "sha256(prev \\n key \\n sha256hex(content)), seeded with sha256(\"breakglass-chain-v1\\n\" session_id)".into(),
            chain_head: self.head.clone(),
            recovered: false,
            missing: Vec::new(),
        };
        self.commit_ledger().await;
        write_manifest(&self.store, &self.prefix, &meta, &self.signer).await?;
        if let Some(ledger) = &self.ledger {
            if let Err(e) = ledger.set_sealed(&self.info.session_id, true).await {
                tracing::warn!(session_id = %self.info.session_id, error = %e, "could not mark the recording sealed");
            }
        }
        Ok(meta)
    }
}

/// The bytes a spooled chunk holds: exactly what the store would have received.
fn plain_for_spool(plain: &[u8], ext: &str) -> Vec<u8> {
    if ext == "cast" {
        plain.to_vec()
    } else {
        raw::compress(plain).unwrap_or_else(|_| plain.to_vec())
    }
}

/// Writes (replacing) a spooled chunk atomically and durably.
fn spool_write(
    dir: &std::path::Path,
    key: &str,
    bytes: &[u8],
    mac: Option<&SpoolMac>,
) -> std::io::Result<()> {
    crate::storage::keep_free(dir, bytes.len())?;
    use std::io::Write;
    let path = dir.join(key);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let write = |path: &std::path::Path, bytes: &[u8]| -> std::io::Result<()> {
        let tmp = path.with_extension("spooling");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    // The tag first: a chunk without a valid tag beside it is never uploaded.
    if let Some(mac) = mac {
        let sha = hex::encode(Sha256::digest(bytes));
        write(&mac_path(&path), mac.tag(key, &sha).as_bytes())?;
    }
    write(&path, bytes)
}

/// The authentication tag file of a spooled chunk.
fn mac_path(chunk: &std::path::Path) -> std::path::PathBuf {
    let mut p = chunk.as_os_str().to_owned();
    p.push(".mac");
    std::path::PathBuf::from(p)
}

fn spool_remove(dir: &std::path::Path, key: &str) {
    let path = dir.join(key);
    if path.exists() {
        let _ = std::fs::remove_file(&path);
    }
    let _ = std::fs::remove_file(mac_path(&path));
}

/// The spool's authenticated index: an HMAC-SHA256 over each spooled chunk's key and content
/// hash, under a key the vault holds (sealed with the KEK), so a file planted in the spool
/// directory without the KEK is refused even if the state store were edited too.
pub struct SpoolMac(ring::hmac::Key);

impl SpoolMac {
    /// The vault entry that holds the key.
    pub const VAULT_NAME: &'static str = "spool-index-key";

    pub fn new(secret: &[u8]) -> SpoolMac {
        SpoolMac(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret))
    }

    /// The hex tag of a chunk.
    pub fn tag(&self, key: &str, sha256: &str) -> String {
        hex::encode(ring::hmac::sign(
            &self.0,
            format!("breakglass-spool-v1\n{key}\n{sha256}").as_bytes(),
        ))
    }

    /// Whether `tag` (hex) authenticates the chunk.
    pub fn check(&self, key: &str, sha256: &str, tag: &str) -> bool {
        let Ok(raw) = hex::decode(tag.trim()) else {
            return false;
        };
        ring::hmac::verify(
            &self.0,
            format!("breakglass-spool-v1\n{key}\n{sha256}").as_bytes(),
            &raw,
        )
        .is_ok()
    }
}

impl std::fmt::Debug for SpoolMac {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SpoolMac(<redacted>)")
    }
}

/// What a pass over the outage spool did.
#[derive(Debug, Default)]
pub struct Drained {
    /// Chunks uploaded (or found already stored) and removed from the spool.
    pub uploaded: usize,
    /// Spool files the evidence ledger does not list with that content: planted or altered.
    /// They are moved to `spool-refused/` next to the spool, never uploaded.
    pub refused: Vec<String>,
    /// Sessions with chunks still in the spool (the store is still failing, or they are live):
    /// not to be sealed yet.
    pub waiting: std::collections::BTreeSet<String>,
}

/// The session id in a recording key (`sessions/YYYY/MM/DD/ID/...`).
pub fn session_of_key(key: &str) -> Option<&str> {
    let mut parts = key.split('/');
    (parts.next()? == "sessions").then_some(())?;
    parts.nth(3)
}

/// Uploads spooled chunks (create-only; an object already stored is fine) and removes them —
/// but only those the evidence ledger lists with the same SHA-256 and, with `mac`, whose tag
/// file authenticates them: the spool is a local directory anyone with the data dir can write. Sessions for which `skip` is true (live here:
/// their recorder retries its own chunks) are left alone.
pub async fn drain_spool(
    dir: &std::path::Path,
    store: &RecordingStore,
    ledger: &dyn crate::state::Store,
    mac: Option<&SpoolMac>,
    skip: &(dyn Fn(&str) -> bool + Send + Sync),
) -> Drained {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            // The entry's own type (a symlink is not followed): a link planted in the spool
            // could point at any file the gateway may read, so it is never uploaded.
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_symlink() {
                tracing::warn!(path = %p.display(), "a symlink in the recording spool is ignored");
            } else if ft.is_dir() {
                stack.push(p);
            } else if ft.is_file() && p.extension().is_none_or(|x| x != "spooling" && x != "mac") {
                files.push(p);
            }
        }
    }
    files.sort();
    let mut out = Drained::default();
    let mut ledgers: BTreeMap<String, Vec<crate::state::LedgerEntry>> = BTreeMap::new();
    for p in files {
        let Some(key) = p
            .strip_prefix(dir)
            .ok()
            .and_then(|k| k.to_str())
            .map(str::to_string)
        else {
            continue;
        };
        let Some(session) = session_of_key(&key).map(str::to_string) else {
            out.refused.push(key.clone());
            refuse_spooled(dir, &p, &key);
            continue;
        };
        if skip(&session) {
            out.waiting.insert(session);
            continue;
        }
        if !ledgers.contains_key(&session) {
            match ledger.recorded_objects(&session).await {
                Ok(l) => {
                    ledgers.insert(session.clone(), l);
                }
                Err(e) => {
                    tracing::warn!(key = %key, error = %e, "evidence ledger unavailable; spooled chunk kept");
                    out.waiting.insert(session);
                    continue;
                }
            }
        }
        let Ok(bytes) = std::fs::read(&p) else {
            out.waiting.insert(session);
            continue;
        };
        let sha = hex::encode(Sha256::digest(&bytes));
        let listed = ledgers
            .get(&session)
            .is_some_and(|l| l.iter().any(|e| e.key == key && e.sha256 == sha));
        let tagged = mac.is_none_or(|m| {
            std::fs::read_to_string(mac_path(&p)).is_ok_and(|t| m.check(&key, &sha, &t))
        });
        if !listed || !tagged {
            tracing::error!(key = %key, sha256 = %sha, "spooled file is not what the gateway wrote; refused");
            out.refused.push(key.clone());
            refuse_spooled(dir, &p, &key);
            continue;
        }
        match store.adopt_file(&key, &p, Bytes::from(bytes)).await {
            Ok(_) | Err(StorageError::AlreadyExists(_)) => {
                let _ = std::fs::remove_file(&p);
                let _ = std::fs::remove_file(mac_path(&p));
                out.uploaded += 1;
            }
            Err(e) => {
                tracing::warn!(key = %key, error = %e, "spooled chunk not uploaded yet");
                out.waiting.insert(session);
            }
        }
    }
    out
}

/// Moves a refused spool file out of the spool, keeping it for the investigation.
fn refuse_spooled(dir: &std::path::Path, path: &std::path::Path, key: &str) {
    let refused = dir.with_file_name("spool-refused").join(key);
    if let Some(parent) = refused.parent() {
        let _ = std::fs::create_dir_all(parent);
    }
    if std::fs::rename(path, &refused).is_err() {
        let _ = std::fs::remove_file(path);
    }
    let _ = std::fs::rename(mac_path(path), mac_path(&refused));
}

/// Flushes a channel's decoders and trackers into its buffer and metadata.
fn close_channel(c: &mut ChanRec, hook: Option<&ActionHook>) {
    let ch = c.meta.channel;
    if c.closed {
        return;
    }
    c.closed = true;
    let t = secs(Instant::now().saturating_duration_since(c.start));
    if let Some(mut g) = c.guard.take() {
        let mut evs = Vec::new();
        g.finish(t, &mut evs);
        apply_guarded(c, evs, hook, ch);
    }
    if let Some(cs) = c.cast.as_mut() {
        let rest = cs.out.finish();
        if !rest.is_empty() {
            c.buf.extend_from_slice(&asciicast::encode_event(
                t,
                asciicast::EventKind::Output,
                &rest,
            ));
        }
        let rest = cs.inp.finish();
        if !rest.is_empty() {
            c.buf.extend_from_slice(&asciicast::encode_event(
                t,
                asciicast::EventKind::Input,
                &rest,
            ));
        }
    }
    if let Some(s) = c.sftp.take() {
        if let Some(n) = s.note() {
            c.meta.notes.push(format!("sftp: {n}"));
        }
        c.meta
            .transfers
            .extend(s.finish().into_iter().map(transfer_meta));
    }
    if let Some(s) = c.scp.take() {
        if let Some(n) = s.note() {
            c.meta.notes.push(format!("scp: {n}"));
        }
        c.meta
            .transfers
            .extend(s.finish().into_iter().map(transfer_meta));
    }
}

fn transfer_meta(t: transfer::Transfer) -> TransferMeta {
    TransferMeta {
        protocol: t.protocol.to_string(),
        direction: match t.direction {
            transfer::Direction::Upload => "upload".into(),
            transfer::Direction::Download => "download".into(),
        },
        path: t.path,
        size: t.size,
        sha256: t.sha256,
        complete: t.complete,
    }
}

/// Writes what the channel's [`echo::EchoGuard`] released: cast events, commands (with their
/// action events) and redactions, in order.
fn apply_guarded(
    c: &mut ChanRec,
    evs: Vec<(f64, echo::Ev<Vec<u8>>)>,
    hook: Option<&ActionHook>,
    ch: u32,
) {
    for (t, ev) in evs {
        match ev {
            echo::Ev::Input(b) => {
                if let Some(cs) = c.cast.as_mut() {
                    let text = cs.inp.push(&b);
                    if !text.is_empty() {
                        c.buf.extend_from_slice(&asciicast::encode_event(
                            t,
                            asciicast::EventKind::Input,
                            &text,
                        ));
                    }
                }
            }
            echo::Ev::Redacted(n) => {
                c.buf.extend_from_slice(&asciicast::encode_event(
                    t,
                    asciicast::EventKind::Input,
                    &Redaction::placeholder("no-echo", n),
                ));
            }
            echo::Ev::Output(b) => {
                if let Some(cs) = c.cast.as_mut() {
                    let text = cs.out.push(&b);
                    if !text.is_empty() {
                        c.buf.extend_from_slice(&asciicast::encode_event(
                            t,
                            asciicast::EventKind::Output,
                            &text,
                        ));
                    }
                }
            }
            echo::Ev::Other(encoded) => c.buf.extend_from_slice(&encoded),
            echo::Ev::Command(cmd) => {
                if let Some(hook) = hook {
                    hook(ch, &cmd.text, cmd.uncertain);
                }
                c.meta.commands.push(CommandMeta {
                    time: t,
                    text: cmd.text,
                    complete: cmd.complete,
                    uncertain: cmd.uncertain,
                    redacted: None,
                });
            }
            echo::Ev::RedactedLine(n) => {
                let text = Redaction::placeholder("no-echo", n);
                if let Some(hook) = hook {
                    hook(ch, &text, false);
                }
                c.meta.commands.push(CommandMeta {
                    time: t,
                    text,
                    complete: true,
                    uncertain: false,
                    redacted: Some(Redaction {
                        kind: "no-echo".into(),
                        bytes: n as u64,
                    }),
                });
            }
        }
    }
}

/// A resize or marker on a cast channel: in order behind anything the guard holds.
fn push_cast_event(c: &mut ChanRec, t: f64, encoded: Vec<u8>, hook: Option<&ActionHook>, ch: u32) {
    match c.guard.as_mut() {
        Some(g) => {
            let mut evs = Vec::new();
            let size = encoded.len();
            g.other(t, encoded, size, &mut evs);
            apply_guarded(c, evs, hook, ch);
        }
        None => c.buf.extend_from_slice(&encoded),
    }
}

#[cfg(test)]
mod spool_tests {
    use super::*;
    use crate::state::{LedgerEntry, SqliteStore, Store};

    fn entry(key: &str, bytes: &[u8]) -> LedgerEntry {
        LedgerEntry {
            key: key.into(),
            size: bytes.len() as u64,
            sha256: hex::encode(Sha256::digest(bytes)),
            chained: None,
        }
    }

    #[tokio::test]
    async fn only_ledger_listed_and_tagged_spool_files_are_uploaded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spool = dir.path().join("spool");
        let store = RecordingStore::local(&dir.path().join("store")).expect("store");
        let ledger = SqliteStore::open(&dir.path().join("state.db")).expect("state");
        let mac = SpoolMac::new(&[7u8; 32]);
        let other = SpoolMac::new(&[8u8; 32]);
        let p = "sessions/2026/12/02/s-1/ch0000";
        let good = format!("{p}/00000001.cast");
        let wrong_tag = format!("{p}/00000002.cast");
        let unlisted = format!("{p}/00000003.cast");
        let not_a_session = "elsewhere/x.cast".to_string();
        spool_write(&spool, &good, b"good", Some(&mac)).expect("spool");
        spool_write(&spool, &wrong_tag, b"forged", Some(&other)).expect("spool");
        spool_write(&spool, &unlisted, b"planted", Some(&mac)).expect("spool");
        spool_write(&spool, &not_a_session, b"x", Some(&mac)).expect("spool");
        ledger
            .record_objects(
                "s-1",
                &[entry(&good, b"good"), entry(&wrong_tag, b"forged")],
            )
            .await
            .expect("ledger");
        let out = drain_spool(&spool, &store, &ledger, Some(&mac), &|_| false).await;
        assert_eq!(out.uploaded, 1);
        let mut refused = out.refused.clone();
        refused.sort();
        let mut want = vec![wrong_tag.clone(), unlisted.clone(), not_a_session.clone()];
        want.sort();
        assert_eq!(refused, want);
        assert_eq!(store.get(&good).await.expect("uploaded").as_ref(), b"good");
        for k in [&wrong_tag, &unlisted] {
            assert!(store.get(k).await.is_err(), "{k} must not be uploaded");
            assert!(!spool.join(k).exists());
            assert!(dir.path().join("spool-refused").join(k).exists());
        }
        assert!(!spool.join(&good).exists() && !mac_path(&spool.join(&good)).exists());
        // A live session's chunks are left for its recorder.
        spool_write(&spool, &format!("{p}/00000004.cast"), b"live", Some(&mac)).expect("spool");
        let out = drain_spool(&spool, &store, &ledger, Some(&mac), &|id| id == "s-1").await;
        assert_eq!((out.uploaded, out.refused.len()), (0, 0));
        assert!(out.waiting.contains("s-1"));
    }

    #[tokio::test]
    async fn a_symlink_in_the_spool_is_never_followed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spool = dir.path().join("spool");
        let store = RecordingStore::local(&dir.path().join("store")).expect("store");
        let ledger = SqliteStore::open(&dir.path().join("state.db")).expect("state");
        let mac = SpoolMac::new(&[7u8; 32]);
        let p = "sessions/2026/12/02/s-1/ch0000";
        let key = format!("{p}/00000001.cast");
        // A real chunk, then replaced by a link to another file with the same tag beside it.
        spool_write(&spool, &key, b"good", Some(&mac)).expect("spool");
        let secret = dir.path().join("secret");
        std::fs::write(&secret, b"good").expect("secret");
        std::fs::remove_file(spool.join(&key)).expect("remove");
        std::os::unix::fs::symlink(&secret, spool.join(&key)).expect("symlink");
        // A linked directory too.
        std::os::unix::fs::symlink(dir.path(), spool.join("sessions/2026/12/02/s-2"))
            .expect("symlink");
        ledger
            .record_objects("s-1", &[entry(&key, b"good")])
            .await
            .expect("ledger");
        let out = drain_spool(&spool, &store, &ledger, Some(&mac), &|_| false).await;
        assert_eq!(out.uploaded, 0);
        assert!(store.get(&key).await.is_err(), "a linked file was uploaded");
    }
}
