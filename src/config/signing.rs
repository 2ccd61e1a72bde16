//! The `[signing]` table's value types: manifest-verifying public keys as configured, and
//! where the gateway pins its first key. Trust is computed in `signing`.

use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use sha2::{Digest, Sha256};

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

    /// One key from its base64 and, when given, the id it must have.
    pub fn parse(b64: &str, id: Option<&str>) -> Result<PublicKey, String> {
        let raw = B64.decode(b64).map_err(|e| format!("bad base64: {e}"))?;
        if raw.len() != 32 {
            return Err("an ed25519 key is 32 bytes".into());
        }
        let k = PublicKey::from_raw(raw);
        match id {
            Some(id) if id != k.id => Err(format!(
                "the line names key id {id}, but the key's id is {}",
                k.id
            )),
            _ => Ok(k),
        }
    }

    /// One `ed25519 BASE64 [ID]` line, as `trusted_keys` holds them.
    pub fn parse_line(line: &str) -> Result<PublicKey, String> {
        match line.split_whitespace().collect::<Vec<_>>().as_slice() {
            ["ed25519", b] => PublicKey::parse(b, None),
            ["ed25519", b, id] => PublicKey::parse(b, Some(id)),
            _ => Err("expected one `ed25519 BASE64 [ID]` key".into()),
        }
    }
}

/// The `[signing]` table: the trust anchors of online verification. Keys found in
/// `<keys_dir>/signing/` are not among them unless pinned here or certified by a key that
/// is (see `crate::signing`).
#[derive(Debug, Clone)]
pub struct SigningConfig {
    /// Keys given inline (`trusted_keys`).
    pub trusted_keys: Vec<PublicKey>,
    /// A file of trusted keys (and rotation certificates); default
    /// `<keys_dir>/trusted-signing.pub`, where the gateway pins its first key when it
    /// creates it and the file does not exist yet.
    pub trusted_keys_file: PathBuf,
}

/// Where the gateway pins its first signing key when the config names no trust file:
/// `<keys_dir>/trusted-signing.pub`, outside the directory keys are loaded from.
pub fn default_pin_file(keys_dir: &Path) -> PathBuf {
    keys_dir.join("trusted-signing.pub")
}
