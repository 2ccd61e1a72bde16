//! Verification of recordings for auditors who do not trust the gateway's operator: every
//! object against the hash chain, the manifest (`session.json`) against its Ed25519 signature,
//! and the chain head against the SIEM copy when one is given.
//!
//! Verdicts: OK; INCOMPLETE (the gateway died: intact up to chunk N); TAMPERED (which object,
//! how).

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
}

impl Verdict {
    /// The process exit code for this verdict.
    pub fn exit_code(&self) -> u8 {
        match self {
            Verdict::Ok { .. } => 0,
            Verdict::Incomplete { .. } => 2,
            Verdict::Tampered { .. } => 3,
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
}

fn sha(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

/// Finds a session's key prefix by listing the store (for offline verification without the
/// state file).
pub async fn find_prefix(store: &RecordingStore, session_id: &str) -> Result<String, VerifyError> {
    for o in store.list("sessions").await? {
        if let Some(p) = o.key.strip_suffix("/session-start.json") {
            if p.ends_with(session_id)
                || p.rsplit('/')
                    .next()
                    .is_some_and(|id| id.starts_with(session_id))
            {
                return Ok(p.to_string());
            }
        }
    }
    Err(VerifyError::NotFound(session_id.to_string()))
}

/// Verifies one session's recording.
///
/// `keys`: the public keys the manifest may be signed with. `siem_head`: the chain head the
/// SIEM received in the session-end event, if known.
pub async fn verify_session(
    store: &RecordingStore,
    prefix: &str,
    keys: &[PublicKey],
    siem_head: Option<&str>,
) -> Result<Verdict, VerifyError> {
    let listed: BTreeMap<String, u64> = store
        .list(prefix)
        .await?
        .into_iter()
        .map(|o| (o.key, o.size))
        .collect();
    if listed.is_empty() {
        return Err(VerifyError::NotFound(prefix.to_string()));
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
            return Ok(unsealed(prefix, &listed, findings));
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

    // Every object against its hash and the chain.
    let mut link = chain_seed(&meta.session.session_id);
    let mut expected: BTreeSet<String> = BTreeSet::new();
    for (i, o) in meta.objects.iter().enumerate() {
        expected.insert(o.key.clone());
        match store.get(&o.key).await {
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
    if let Some(h) = siem_head {
        if h != meta.chain_head {
            findings.push(format!(
                "the SIEM recorded chain head {h} but session.json says {} (manifest replaced)",
                meta.chain_head
            ));
        }
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
            why: "the gateway stopped during the session; a restart sealed what was stored".into(),
        });
    }
    Ok(Verdict::Ok {
        objects: meta.objects.len(),
        head: meta.chain_head,
    })
}

/// A session without a manifest: live, or left by a crash not yet recovered.
fn unsealed(prefix: &str, listed: &BTreeMap<String, u64>, mut findings: Vec<String>) -> Verdict {
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
