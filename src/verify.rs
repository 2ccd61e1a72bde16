//! Verification of recordings for auditors who do not trust the gateway's operator: every
//! object against the hash chain (at the version the manifest pinned, on versioned stores),
//! the manifest (`session.json`) against its Ed25519 signature by a trusted key, and the chain
//! against what the SIEM copy recorded: the end head and every `recording_checkpoint` head.
//!
//! Verdicts: OK; INCOMPLETE (the gateway died: intact up to chunk N); TAMPERED (which object,
//! how); MISSING (the SIEM or the state store says the session started, the store has none of
//! it).

use std::collections::{BTreeMap, BTreeSet};

use base64::Engine;
use sha2::{Digest, Sha256};

use crate::record::{chain_link, chain_seed, ManifestSignature, SessionMeta};
use crate::signing::PublicKey;
use crate::storage::{key, RecordingStore, StorageError};

/// The outcome for one session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Ok { objects: usize, head: String },
    Incomplete { chunks: usize, why: String },
    Tampered { findings: Vec<String> },
    Missing { why: String },
}

impl Verdict {
    /// The process exit code for this verdict.
    pub fn exit_code(&self) -> u8 {
        match self {
            Verdict::Ok { .. } => 0,
            Verdict::Incomplete { .. } => 2,
            Verdict::Tampered { .. } => 3,
            Verdict::Missing { .. } => 4,
        }
    }

    /// The verdict's name in lower case, as the web UI and the incident report show it.
    pub fn label(&self) -> &'static str {
        match self {
            Verdict::Ok { .. } => "ok",
            Verdict::Incomplete { .. } => "incomplete",
            Verdict::Tampered { .. } => "tampered",
            Verdict::Missing { .. } => "missing",
        }
    }

    /// One line for people.
    pub fn summary(&self) -> String {
        match self {
            Verdict::Ok { objects, head } => {
                format!("OK: {objects} objects intact, chain head {head}, manifest signature valid")
            }
            Verdict::Incomplete { chunks, why } => {
                format!("INCOMPLETE: {why}; the recording is intact up to chunk {chunks}")
            }
            Verdict::Tampered { findings } => format!("TAMPERED: {}", findings.join("; ")),
            Verdict::Missing { why } => format!("MISSING: {why}"),
        }
    }
}

/// A verification that could not run.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("no recording found for session {0}")]
    NotFound(String),
    #[error("session id prefix `{0}` is ambiguous: it matches {1}")]
    Ambiguous(String, String),
}

fn sha(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

/// A session as the store holds it: every key prefix its id appears under (a session has
/// exactly one; more mean objects were planted under another date).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stored {
    /// Prefix → whether a `session.json` lies under it.
    pub prefixes: BTreeMap<String, bool>,
}

impl Stored {
    /// The prefix to verify: `known` (the state store's) when given, else the sealed one, else
    /// the first.
    pub fn pick(&self, known: Option<&str>) -> Option<String> {
        known
            .map(str::to_string)
            .or_else(|| {
                self.prefixes
                    .iter()
                    .find(|(_, sealed)| **sealed)
                    .map(|(p, _)| p.clone())
            })
            .or_else(|| self.prefixes.keys().next().cloned())
    }

    /// Findings for objects of this session under any prefix but `chosen`.
    pub fn strays(&self, chosen: &str) -> Vec<String> {
        self.prefixes
            .keys()
            .filter(|p| p.as_str() != chosen)
            .map(|p| format!("{p}/ holds objects of this session too, but a session has one prefix, {chosen}/ (objects planted)"))
            .collect()
    }
}

/// Every session in the store, by session id. A session is found by the directory its objects
/// are in (`sessions/YYYY/MM/DD/<id>/...`), so one whose `session-start.json` was deleted is
/// still found.
pub async fn store_sessions(
    store: &RecordingStore,
) -> Result<BTreeMap<String, Stored>, VerifyError> {
    let mut out: BTreeMap<String, Stored> = BTreeMap::new();
    for o in store.list("sessions").await? {
        let parts: Vec<&str> = o.key.split('/').collect();
        if let [root, y, m, d, id, rest @ ..] = parts.as_slice() {
            if rest.is_empty() {
                continue;
            }
            let sealed = out
                .entry(id.to_string())
                .or_default()
                .prefixes
                .entry(format!("{root}/{y}/{m}/{d}/{id}"))
                .or_insert(false);
            *sealed |= rest == ["session.json"];
        }
    }
    Ok(out)
}

/// Adds findings to a verdict: any finding makes it TAMPERED (MISSING stays MISSING).
pub fn with_findings(v: Verdict, more: Vec<String>) -> Verdict {
    if more.is_empty() {
        return v;
    }
    match v {
        Verdict::Tampered { mut findings } => {
            findings.extend(more);
            Verdict::Tampered { findings }
        }
        Verdict::Missing { why } => Verdict::Missing { why },
        Verdict::Ok { .. } | Verdict::Incomplete { .. } => Verdict::Tampered { findings: more },
    }
}

/// The rotation certificates kept in the store (`storage::key::SIGNING_CERTIFICATES`). They
/// prove themselves (each must chain from a trusted key), so where they come from does not
/// matter; unreadable ones come back as warnings.
pub async fn store_certificates(
    store: &RecordingStore,
) -> Result<(Vec<crate::signing::KeyCertificate>, Vec<String>), VerifyError> {
    let mut certs = Vec::new();
    let mut warnings = Vec::new();
    for o in store.list(key::SIGNING_CERTIFICATES).await? {
        // A certificate is one line of a few hundred bytes; anything bigger is not one.
        if o.size > 4096 {
            warnings.push(format!(
                "{} is not a rotation certificate ({} bytes)",
                o.key, o.size
            ));
            continue;
        }
        let body = store.get(&o.key).await?;
        match std::str::from_utf8(&body)
            .map_err(|e| e.to_string())
            .and_then(crate::signing::parse_trust)
        {
            Ok((_, c)) => certs.extend(c),
            Err(e) => warnings.push(format!("{}: {e}", o.key)),
        }
    }
    Ok((certs, warnings))
}

/// Resolves an id or unique id prefix to the full session id among `known` ids (from the
/// store, the state store and the SIEM copy together), before any cross-check. An exact match
/// wins; several matches are an error.
pub fn resolve_id<'a>(
    given: &str,
    known: impl IntoIterator<Item = &'a String>,
) -> Result<String, VerifyError> {
    let mut matches: BTreeSet<&String> = BTreeSet::new();
    for id in known {
        if id == given {
            return Ok(id.clone());
        }
        if !given.is_empty() && id.starts_with(given) {
            matches.insert(id);
        }
    }
    let mut it = matches.iter();
    match (it.next(), it.next()) {
        (Some(one), None) => Ok((*one).clone()),
        (None, _) => Err(VerifyError::NotFound(given.to_string())),
        (Some(_), Some(_)) => Err(VerifyError::Ambiguous(
            given.to_string(),
            matches
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        )),
    }
}

/// A `recording_checkpoint` the SIEM received: the chain head after `objects` objects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub event_id: String,
    pub timestamp: String,
    pub objects: usize,
    pub head: String,
}

impl Checkpoint {
    fn name(&self) -> String {
        format!(
            "recording_checkpoint {} at {} ({} objects, chain head {})",
            self.event_id, self.timestamp, self.objects, self.head
        )
    }
}

/// What the SIEM copy says about one session.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SiemSession {
    /// The `session_start` event: (event id, timestamp).
    pub started: Option<(String, String)>,
    /// What the `session_start` event said about the session (person, target, grant_id,
    /// incident_id): the manifest must say the same.
    pub facts: Vec<(&'static str, String)>,
    /// The chain head of the `session_end` event.
    pub end_head: Option<String>,
    pub checkpoints: Vec<Checkpoint>,
}

/// The SIEM JSONL copy (seed format), by session id. Lines that are not such events are
/// skipped: the copy is input from outside and must never stop a verification.
#[derive(Debug, Clone, Default)]
pub struct SiemCopy {
    pub sessions: BTreeMap<String, SiemSession>,
    /// Signing keys announced by `signing_key_rotated` events.
    pub rotated_keys: BTreeSet<String>,
    /// Non-empty lines, and how many of them were seed-format events (an `action` field): a
    /// copy in another format (OCSF, CEF) gives nothing to compare against.
    pub lines: usize,
    pub events: usize,
}

impl SiemCopy {
    pub fn parse(text: &str) -> SiemCopy {
        let mut c = SiemCopy::default();
        for l in text.lines() {
            if l.trim().is_empty() {
                continue;
            }
            c.lines += 1;
            let Ok(e) = serde_json::from_str::<serde_json::Value>(l) else {
                continue;
            };
            if e["action"].is_string() {
                c.events += 1;
            }
            let id = e["session_id"].as_str().unwrap_or("");
            let str_of = |k: &str| e[k].as_str().unwrap_or("").to_string();
            match e["action"].as_str() {
                Some("session_start") if !id.is_empty() => {
                    let s = c.sessions.entry(id.to_string()).or_default();
                    s.started = Some((str_of("event_id"), str_of("timestamp")));
                    s.facts = ["person", "target", "grant_id", "incident_id"]
                        .into_iter()
                        .filter_map(|k| Some((k, e[k].as_str()?.to_string())))
                        .collect();
                }
                Some("signing_key_rotated") => {
                    if let Some(k) = e["signing_key_id"].as_str() {
                        c.rotated_keys.insert(k.to_string());
                    }
                }
                Some("session_end") if !id.is_empty() => {
                    if let Some(h) = e["chain_head"].as_str() {
                        c.sessions.entry(id.to_string()).or_default().end_head =
                            Some(h.to_string());
                    }
                }
                Some("recording_checkpoint") if !id.is_empty() => {
                    // Older events carry the count only in their message.
                    let objects = e["objects"]
                        .as_u64()
                        .or_else(|| {
                            e["message"]
                                .as_str()?
                                .strip_prefix("recording checkpoint: ")?
                                .split(' ')
                                .next()?
                                .parse()
                                .ok()
                        })
                        .and_then(|n| usize::try_from(n).ok());
                    if let (Some(objects), Some(head)) = (objects, e["chain_head"].as_str()) {
                        c.sessions
                            .entry(id.to_string())
                            .or_default()
                            .checkpoints
                            .push(Checkpoint {
                                event_id: str_of("event_id"),
                                timestamp: str_of("timestamp"),
                                objects,
                                head: head.to_string(),
                            });
                    }
                }
                _ => {}
            }
        }
        c
    }

    /// Sessions the SIEM saw start: id → (event id, timestamp).
    pub fn started(&self) -> impl Iterator<Item = (&String, &(String, String))> {
        self.sessions
            .iter()
            .filter_map(|(id, s)| s.started.as_ref().map(|st| (id, st)))
    }
}

/// Verifies one session's recording.
///
/// `keys`: the trusted public keys (pinned or certified; never merely found) the manifest may
/// be signed with. `siem`: what the SIEM copy recorded for this session, if there is a copy.
pub async fn verify_session(
    store: &RecordingStore,
    prefix: &str,
    keys: &[PublicKey],
    siem: Option<&SiemSession>,
) -> Result<Verdict, VerifyError> {
    let siem_head = siem.and_then(|s| s.end_head.as_deref());
    let checkpoints: &[Checkpoint] = siem.map(|s| s.checkpoints.as_slice()).unwrap_or(&[]);
    let listed: BTreeMap<String, u64> = store
        .list(prefix)
        .await?
        .into_iter()
        .map(|o| (o.key, o.size))
        .collect();
    if listed.is_empty() {
        let said = match siem.and_then(|s| s.started.as_ref()) {
            Some((event, at)) => {
                format!("the SIEM recorded its session_start at {at} (event {event})")
            }
            None => "the gateway's state store lists it".to_string(),
        };
        return Ok(Verdict::Missing {
            why: format!(
                "{said}, but the store has no object under {prefix}/ (session-start.json and every chunk are gone: session deleted)"
            ),
        });
    }
    let manifest_key = key::session_end(prefix);
    let sig_key = key::manifest_signature(prefix);
    let mut findings = Vec::new();

    let body = match store.get(&manifest_key).await {
        Ok(b) => b,
        Err(StorageError::NotFound(_)) => {
            if let Some(h) = siem_head {
                findings.push(format!(
                    "session.json is missing, but the SIEM recorded the session as sealed with chain head {h} (manifest deleted)"
                ));
            }
            return Ok(unsealed(prefix, &listed, checkpoints, findings));
        }
        Err(e) => return Err(e.into()),
    };

    // The signature over the exact manifest bytes.
    match store.get(&sig_key).await {
        Ok(sig_bytes) => match serde_json::from_slice::<ManifestSignature>(&sig_bytes) {
            Ok(sig) => {
                let raw = base64::engine::general_purpose::STANDARD
                    .decode(&sig.signature)
                    .unwrap_or_default();
                match keys.iter().find(|k| k.id == sig.key_id) {
                    None => findings.push(format!(
                        "session.json is signed by key {} which is not among the trusted keys",
                        sig.key_id
                    )),
                    Some(k) if !k.verify(&body, &raw) => findings.push(
                        "session.json does not match its signature (manifest modified)".into(),
                    ),
                    Some(_) => {}
                }
            }
            Err(e) => findings.push(format!(
                "session.json.sig is not a valid signature document: {e}"
            )),
        },
        Err(StorageError::NotFound(_)) => {
            findings.push("session.json.sig is missing (signature deleted)".into())
        }
        Err(e) => return Err(e.into()),
    }

    let meta: SessionMeta = match serde_json::from_slice(&body) {
        Ok(m) => m,
        Err(e) => {
            findings.push(format!("session.json is not a valid manifest: {e}"));
            return Ok(Verdict::Tampered { findings });
        }
    };

    // The facts the SIEM received when the session started are what the manifest says.
    if let Some(s) = siem {
        for (field, said) in &s.facts {
            let ours = match *field {
                "person" => &meta.session.person,
                "target" => &meta.session.target,
                "grant_id" => &meta.session.grant_id,
                "incident_id" => &meta.session.incident_id,
                _ => continue,
            };
            if ours != said {
                findings.push(format!(
                    "session.json says {field} `{ours}`, but the SIEM's session_start event says `{said}` (manifest edited)"
                ));
            }
        }
    }

    // Every object against its hash and the chain.
    let mut link = chain_seed(&meta.session.session_id);
    let mut expected: BTreeSet<String> = BTreeSet::new();
    for (i, o) in meta.objects.iter().enumerate() {
        expected.insert(o.key.clone());
        if let Some(pinned) = &o.version {
            match store.current_version(&o.key).await {
                Ok(Some(current)) if current == *pinned => {}
                Ok(Some(current)) => findings.push(format!(
                    "{} (object {i}) has a newer version {current} over the pinned version {pinned} (overwritten; the pinned version is what the gateway wrote)",
                    o.key
                )),
                Ok(None) => findings.push(format!(
                    "{} (object {i}): the store reports no version, but the manifest pinned version {pinned}",
                    o.key
                )),
                Err(StorageError::NotFound(_)) => findings.push(format!(
                    "{} (object {i}) was deleted (its current version is gone; pinned version {pinned})",
                    o.key
                )),
                Err(e) => return Err(e.into()),
            }
        }
        match store.get_version(&o.key, o.version.as_deref()).await {
            Ok(content) => {
                let h = sha(&content);
                if h != o.sha256 {
                    findings.push(format!(
                        "{} (object {i}) was modified: SHA-256 {h}, manifest says {} ({} bytes stored, {} written)",
                        o.key,
                        o.sha256,
                        content.len(),
                        o.size
                    ));
                }
            }
            Err(StorageError::NotFound(_)) => findings.push(format!(
                "{} (object {i} of {}) was deleted",
                o.key,
                meta.objects.len()
            )),
            Err(e) => return Err(e.into()),
        }
        link = chain_link(&link, &o.key, &o.sha256);
        if link != o.chain {
            findings.push(format!(
                "the hash chain breaks at {} (object {i}): entries reordered or edited",
                o.key
            ));
        }
    }
    if link != meta.chain_head {
        findings.push("the chain head in session.json does not match its objects".into());
    }
    // A recovered manifest chains in the evidence ledger's order, which is the order the
    // gateway wrote (one chain over all channels), so every checkpoint head is comparable.
    for cp in checkpoints {
        if cp.objects > meta.objects.len() {
            findings.push(format!(
                "{} covers more than the {} objects session.json lists (recording truncated)",
                cp.name(),
                meta.objects.len()
            ));
        } else if let Some(at) = cp.objects.checked_sub(1).and_then(|i| meta.objects.get(i)) {
            if at.chain != cp.head {
                findings.push(format!(
                    "{} does not match the chain after {} (object {}), which is {} (objects before it replaced, removed or reordered)",
                    cp.name(),
                    at.key,
                    cp.objects - 1,
                    at.chain
                ));
            }
        }
    }
    if let Some(h) = siem_head {
        if h != meta.chain_head {
            findings.push(format!(
                "the SIEM recorded chain head {h} but session.json says {} (manifest replaced)",
                meta.chain_head
            ));
        }
    }
    // Sealed from the evidence ledger: what the gateway wrote but the store no longer held.
    for m in &meta.missing {
        findings.push(format!(
            "{} was written by the gateway (SHA-256 {}, {} bytes) but was {} before the recording was sealed",
            m.key, m.sha256, m.size, m.why
        ));
    }
    for k in listed.keys() {
        if *k != manifest_key && *k != sig_key && !expected.contains(k) {
            findings.push(format!(
                "{k} is not in the manifest (object added or renamed)"
            ));
        }
    }
    if !findings.is_empty() {
        return Ok(Verdict::Tampered { findings });
    }
    if meta.recovered {
        return Ok(Verdict::Incomplete {
            chunks: meta.objects.len().saturating_sub(1),
            why: if meta.end.end_reason == "gateway_crashed" {
                "the gateway stopped during the session; a restart sealed what was stored".into()
            } else {
                format!(
                    "the session ended with {} and could not seal its recording; the gateway sealed what was stored once the store was back (what the session produced after the failure is not in it)",
                    meta.end.end_reason
                )
            },
        });
    }
    Ok(Verdict::Ok {
        objects: meta.objects.len(),
        head: meta.chain_head,
    })
}

/// A session without a manifest: live, or left by a crash not yet recovered.
fn unsealed(
    prefix: &str,
    listed: &BTreeMap<String, u64>,
    checkpoints: &[Checkpoint],
    mut findings: Vec<String>,
) -> Verdict {
    // Without a manifest the write order is unknown, so a checkpoint can be held only to its
    // object count.
    for cp in checkpoints {
        if cp.objects > listed.len() {
            findings.push(format!(
                "{} covers more than the {} objects in the store (recording truncated)",
                cp.name(),
                listed.len()
            ));
        }
    }
    // Chunks are written in order per channel: a gap is not a crash, it is a deletion.
    let mut per_channel: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for k in listed.keys() {
        let Some(rest) = k.strip_prefix(prefix).and_then(|r| r.strip_prefix('/')) else {
            continue;
        };
        let Some((ch, file)) = rest.split_once('/') else {
            continue;
        };
        if let Some(seq) = file.split('.').next().and_then(|s| s.parse::<u64>().ok()) {
            per_channel.entry(ch.to_string()).or_default().push(seq);
        }
    }
    let mut chunks = 0;
    for (ch, mut seqs) in per_channel {
        seqs.sort_unstable();
        for (i, s) in seqs.iter().enumerate() {
            if *s != i as u64 {
                findings.push(format!(
                    "{ch}: chunk {i} is missing before chunk {s} (deleted)"
                ));
                break;
            }
        }
        chunks += seqs.len();
    }
    if !listed.contains_key(&key::session_start(prefix)) {
        findings.push("session-start.json is missing (deleted)".into());
    }
    if !findings.is_empty() {
        return Verdict::Tampered { findings };
    }
    Verdict::Incomplete {
        chunks,
        why: "no manifest: the session is live or the gateway died before sealing it".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{ObjectEntry, SessionEndInfo, SessionInfo};
    use bytes::Bytes;

    fn info(id: &str) -> SessionInfo {
        SessionInfo {
            session_id: id.into(),
            protocol: "ssh".into(),
            person: "alice".into(),
            target: "web-01".into(),
            login: "root".into(),
            grant_id: "G-1".into(),
            justification: "disk full".into(),
            incident_id: "INC-7".into(),
            client_addr: "127.0.0.1:1".into(),
            started_at: "2026-01-01T00:00:00Z".into(),
            deadline: "2026-01-01T01:00:00Z".into(),
        }
    }

    /// A sealed recording of three objects in an in-memory store; returns its chain links.
    async fn recording(
        store: &RecordingStore,
        prefix: &str,
        signer: &crate::signing::Signer,
    ) -> Vec<String> {
        let mut objects = Vec::new();
        let mut link = chain_seed("s-1");
        for (k, body) in [
            (key::session_start(prefix), "start"),
            (key::chunk(prefix, 0, 0, "cast"), "chunk 0"),
            (key::chunk(prefix, 0, 1, "cast"), "chunk 1"),
        ] {
            store
                .put_new(&k, Bytes::from(body.as_bytes().to_vec()))
                .await
                .expect("put");
            let h = sha(body.as_bytes());
            link = chain_link(&link, &k, &h);
            objects.push(ObjectEntry {
                key: k,
                size: body.len() as u64,
                sha256: h,
                chain: link.clone(),
                version: None,
            });
        }
        let links = objects.iter().map(|o| o.chain.clone()).collect();
        let meta = SessionMeta {
            schema_version: 1,
            session: info("s-1"),
            end: SessionEndInfo {
                ended_at: "2026-01-01T00:10:00Z".into(),
                end_reason: "client_closed".into(),
                end_message: String::new(),
                bytes_in: 0,
                bytes_out: 0,
            },
            channels: Vec::new(),
            markers: Vec::new(),
            objects,
            missing: Vec::new(),
            chain_algorithm: "test".into(),
            chain_head: link,
            recovered: false,
        };
        crate::record::write_manifest(store, prefix, &meta, signer)
            .await
            .expect("seal");
        links
    }

    fn checkpoint(objects: usize, head: &str) -> Checkpoint {
        Checkpoint {
            event_id: format!("ev-{objects}"),
            timestamp: "2026-01-01T00:05:00Z".into(),
            objects,
            head: head.into(),
        }
    }

    #[tokio::test]
    async fn every_checkpoint_is_held_against_the_chain() {
        let store = RecordingStore::from_object_store(std::sync::Arc::new(
            object_store::memory::InMemory::new(),
        ));
        let dir = tempfile::tempdir().expect("tempdir");
        let signer = crate::signing::Signer::load_or_create(dir.path()).expect("key");
        let keys = vec![signer.current_public.clone()];
        let prefix = "sessions/2026/01/01/s-1";
        let links = recording(&store, prefix, &signer).await;
        let verdict = |s: SiemSession| {
            let store = store.clone();
            let keys = keys.clone();
            async move {
                verify_session(&store, prefix, &keys, Some(&s))
                    .await
                    .expect("verify")
            }
        };
        let good = SiemSession {
            checkpoints: vec![checkpoint(1, &links[0]), checkpoint(2, &links[1])],
            end_head: Some(links[2].clone()),
            ..Default::default()
        };
        assert!(matches!(verdict(good).await, Verdict::Ok { .. }));

        let longer = SiemSession {
            checkpoints: vec![checkpoint(4, &links[2])],
            ..Default::default()
        };
        let v = verdict(longer).await;
        assert_eq!(v.exit_code(), 3);
        assert!(
            v.summary().contains("recording_checkpoint ev-4")
                && v.summary().contains("recording truncated"),
            "{}",
            v.summary()
        );

        let other = SiemSession {
            checkpoints: vec![checkpoint(2, &links[0])],
            ..Default::default()
        };
        let v = verdict(other).await;
        assert!(
            v.summary().contains("recording_checkpoint ev-2")
                && v.summary().contains("00000000.cast (object 1)"),
            "{}",
            v.summary()
        );

        let renamed = SiemSession {
            facts: vec![("person", "mallory".into())],
            ..Default::default()
        };
        let v = verdict(renamed).await;
        assert!(v.summary().contains("person `alice`"), "{}", v.summary());

        // Nothing under the prefix, though the SIEM saw the session start: MISSING.
        let gone = SiemSession {
            started: Some(("ev-start".into(), "2026-01-01T00:00:00Z".into())),
            ..Default::default()
        };
        let v = verify_session(&store, "sessions/2026/01/01/s-2", &keys, Some(&gone))
            .await
            .expect("verify");
        assert_eq!(v.exit_code(), 4);
        assert!(v.summary().contains("ev-start"), "{}", v.summary());

        // Found by its directory even without session-start.json; a second prefix is planted.
        store
            .put_new(
                "sessions/2020/01/01/s-1/ch0000/00000000.cast",
                Bytes::from_static(b"x"),
            )
            .await
            .expect("put");
        let found = store_sessions(&store).await.expect("list");
        let s1 = &found["s-1"];
        assert_eq!(s1.pick(None).as_deref(), Some(prefix), "the sealed prefix");
        let strays = s1.strays(prefix);
        assert!(
            strays[0].starts_with("sessions/2020/01/01/s-1/"),
            "{strays:?}"
        );
        let v = with_findings(
            Verdict::Incomplete {
                chunks: 1,
                why: "x".into(),
            },
            strays,
        );
        assert_eq!(v.exit_code(), 3);
    }

    #[test]
    fn ids_resolve_to_one_full_id_or_an_error() {
        let ids: Vec<String> = ["abc-1", "abc-2", "abd-3"].map(String::from).to_vec();
        assert_eq!(resolve_id("abd", &ids).expect("unique"), "abd-3");
        assert_eq!(resolve_id("abc-1", &ids).expect("exact"), "abc-1");
        assert!(matches!(
            resolve_id("abc", &ids),
            Err(VerifyError::Ambiguous(_, m)) if m == "abc-1, abc-2"
        ));
        assert!(matches!(
            resolve_id("x", &ids),
            Err(VerifyError::NotFound(_))
        ));
        assert!(matches!(
            resolve_id("", &ids),
            Err(VerifyError::NotFound(_))
        ));
    }

    #[test]
    fn the_siem_copy_parser_takes_any_input() {
        let text = concat!(
            "{\"action\":\"recording_checkpoint\",\"session_id\":\"s\",\"chain_head\":\"h1\",\"objects\":3,\"event_id\":\"e1\"}\n",
            "{\"action\":\"recording_checkpoint\",\"session_id\":\"s\",\"chain_head\":\"h2\",\"message\":\"recording checkpoint: 7 objects stored\"}\n",
            "{\"action\":\"recording_checkpoint\",\"session_id\":\"s\",\"chain_head\":5,\"objects\":-1}\n",
            "{\"action\":\"session_end\",\"session_id\":\"s\",\"chain_head\":\"h3\"}\n",
            "{\"action\":\"session_start\",\"session_id\":\"s\",\"person\":\"alice\",\"timestamp\":\"t\"}\n",
            "{\"action\":\"signing_key_rotated\",\"signing_key_id\":\"0123456789abcdef\"}\n",
            "not json\n[1,2]\nnull\n{\"session_id\":{}}\n",
        );
        let c = SiemCopy::parse(text);
        let s = &c.sessions["s"];
        let counts: Vec<usize> = s.checkpoints.iter().map(|c| c.objects).collect();
        assert_eq!(counts, vec![3, 7]);
        assert_eq!(s.end_head.as_deref(), Some("h3"));
        assert_eq!(s.facts, vec![("person", "alice".to_string())]);
        assert!(c.rotated_keys.contains("0123456789abcdef"));
        assert_eq!((c.lines, c.events), (10, 6));
        // Random bytes and mangled events never panic.
        let pieces = [
            "{",
            "}",
            "\"action\"",
            ":",
            "\"recording_checkpoint\"",
            "\"session_id\"",
            "\"s\"",
            ",",
            "\"objects\"",
            "18446744073709551615",
            "\"message\"",
            "\"recording checkpoint: 99999999999999999999999 objects\"",
            "\n",
            "\u{0}",
            "é",
        ];
        for seed in 0..20_000u64 {
            let mut x = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let mut line = String::new();
            for _ in 0..(seed % 40) {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                line.push_str(pieces[(x >> 33) as usize % pieces.len()]);
            }
            let _ = SiemCopy::parse(&line);
            let _ = crate::signing::parse_trust(&line);
        }
    }
}
