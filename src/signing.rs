//! The gateway's manifest signing keys (Ed25519). The newest key signs; older keys stay in
//! the key directory so recordings they signed still verify after a rotation. Auditors get
//! the public keys with `breakglass keys show` and verify without trusting the gateway.

use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ring::rand::SystemRandom;
use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};
use sha2::{Digest, Sha256};

/// A signing-key problem.
#[derive(Debug, thiserror::Error)]
pub enum SigningError {
    #[error("signing key {path}: {why}")]
    Key { path: PathBuf, why: String },
}

/// A public key that verifies manifests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    /// The first 16 hex digits of SHA-256 of the raw key.
    pub id: String,
    pub raw: Vec<u8>,
}

impl PublicKey {
    pub fn from_raw(raw: Vec<u8>) -> PublicKey {
        let id = hex::encode(Sha256::digest(&raw))[..16].to_string();
        PublicKey { id, raw }
    }

    /// `ed25519 <base64> <key-id>`: the line `keys show` prints and `verify --public-key` reads.
    pub fn line(&self) -> String {
        format!("ed25519 {} {}", B64.encode(&self.raw), self.id)
    }

    /// Parses lines written by [`PublicKey::line`]; `#` comments and blank lines are skipped.
    pub fn parse_lines(text: &str) -> Result<Vec<PublicKey>, String> {
        let mut out = Vec::new();
        for (i, l) in text.lines().enumerate() {
            let l = l.trim();
            if l.is_empty() || l.starts_with('#') {
                continue;
            }
            let mut parts = l.split_whitespace();
            match (parts.next(), parts.next()) {
                (Some("ed25519"), Some(b)) => {
                    let raw = B64
                        .decode(b)
                        .map_err(|e| format!("line {}: bad base64: {e}", i + 1))?;
                    if raw.len() != 32 {
                        return Err(format!("line {}: an ed25519 key is 32 bytes", i + 1));
                    }
                    out.push(PublicKey::from_raw(raw));
                }
                _ => return Err(format!("line {}: expected `ed25519 BASE64 [ID]`", i + 1)),
            }
        }
        Ok(out)
    }

    /// Checks a signature over `msg`.
    pub fn verify(&self, msg: &[u8], sig: &[u8]) -> bool {
        UnparsedPublicKey::new(&ED25519, &self.raw)
            .verify(msg, sig)
            .is_ok()
    }
}

/// The signing keys in `<data_dir>/keys/signing/`, named `<seq>.pk8`; the highest signs.
pub struct Signer {
    current: Ed25519KeyPair,
    pub current_public: PublicKey,
    /// Every key, newest first (the current one included).
    pub all: Vec<PublicKey>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("current", &self.current_public.id)
            .finish()
    }
}

fn dir(data_dir: &Path) -> PathBuf {
    data_dir.join("keys").join("signing")
}

fn key_err(path: &Path, why: impl std::fmt::Display) -> SigningError {
    SigningError::Key {
        path: path.to_path_buf(),
        why: why.to_string(),
    }
}

fn new_key_file(d: &Path, seq: u32) -> Result<(), SigningError> {
    std::fs::create_dir_all(d).map_err(|e| key_err(d, e))?;
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
        .map_err(|_| key_err(d, "key generation failed"))?;
    let path = d.join(format!("{seq:06}.pk8"));
    crate::keys::write_private(&path, pkcs8.as_ref()).map_err(|e| key_err(&path, e))
}

impl Signer {
    /// Loads the keys, creating the first one if there is none.
    pub fn load_or_create(data_dir: &Path) -> Result<Signer, SigningError> {
        let d = dir(data_dir);
        let mut files: Vec<PathBuf> = std::fs::read_dir(&d)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|x| x == "pk8"))
                    .collect()
            })
            .unwrap_or_default();
        if files.is_empty() {
            new_key_file(&d, 1)?;
            return Signer::load_or_create(data_dir);
        }
        files.sort();
        files.reverse();
        let mut all = Vec::new();
        let mut current = None;
        for f in &files {
            let bytes = std::fs::read(f).map_err(|e| key_err(f, e))?;
            let kp = Ed25519KeyPair::from_pkcs8(&bytes).map_err(|e| key_err(f, e))?;
            all.push(PublicKey::from_raw(kp.public_key().as_ref().to_vec()));
            if current.is_none() {
                current = Some(kp);
            }
        }
        let current = current.ok_or_else(|| key_err(&d, "no usable key"))?;
        let current_public = all
            .first()
            .cloned()
            .ok_or_else(|| key_err(&d, "no usable key"))?;
        Ok(Signer {
            current_public,
            current,
            all,
        })
    }

    /// Adds a new signing key; older keys stay for verification.
    pub fn rotate(data_dir: &Path) -> Result<Signer, SigningError> {
        let existing = Signer::load_or_create(data_dir)?;
        new_key_file(&dir(data_dir), existing.all.len() as u32 + 1)?;
        Signer::load_or_create(data_dir)
    }

    /// Signs `msg` with the current key.
    pub fn sign(&self, msg: &[u8]) -> Vec<u8> {
        self.current.sign(msg).as_ref().to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_keeps_old_keys_verifying() {
        let d = tempfile::tempdir().expect("tempdir");
        let s1 = Signer::load_or_create(d.path()).expect("create");
        let sig1 = s1.sign(b"manifest one");
        let s2 = Signer::rotate(d.path()).expect("rotate");
        assert_ne!(s1.current_public, s2.current_public);
        assert_eq!(s2.all.len(), 2);
        assert!(
            s2.all.iter().any(|k| k.verify(b"manifest one", &sig1)),
            "old signature verifies"
        );
        assert!(!s2.current_public.verify(b"manifest one", &sig1));
        let lines: String = s2.all.iter().map(|k| k.line() + "\n").collect();
        assert_eq!(PublicKey::parse_lines(&lines).expect("parse"), s2.all);
        assert!(PublicKey::parse_lines("rsa AAAA").is_err());
    }
}
