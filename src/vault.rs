//! The secret vault: break-glass credentials the gateway holds (PostgreSQL role passwords),
//! encrypted at rest with AES-256-GCM under a key-encryption key (KEK) from a file or an
//! environment variable. Plaintext lives only in [`Secret`], whose Debug/Display are redacted.

use std::path::Path;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};

/// A secret value. Never printed, never logged.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret<T>(T);

impl<T> Secret<T> {
    pub fn new(v: T) -> Secret<T> {
        Secret(v)
    }
    /// The value, for the one place that must use it.
    pub fn expose(&self) -> &T {
        &self.0
    }
}

impl<T> std::fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl<T> std::fmt::Display for Secret<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A vault problem.
#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    #[error("key-encryption key: {0}")]
    Kek(String),
    #[error("vault entry `{0}` cannot be decrypted (wrong KEK or tampered)")]
    Decrypt(String),
    #[error("vault entry `{0}` is malformed")]
    Malformed(String),
    #[error("vault entry `{name}`: not a usable SSH key: {why}")]
    BadKey { name: String, why: String },
    #[error("state store: {0}")]
    Store(#[from] crate::state::StateError),
}

/// Loads the KEK the config names.
pub fn kek(source: &crate::config::KekSource) -> Result<Kek, VaultError> {
    match source {
        crate::config::KekSource::File(p) => Kek::from_file(p, true),
        crate::config::KekSource::Env(v) => Kek::from_env(v),
    }
}

/// The vault entry that holds a target's gateway-held SSH key.
pub fn ssh_key_name(target: &str) -> String {
    format!("ssh-key:{target}")
}

/// A target's gateway-held SSH key as the vault holds it after a rotation (entry
/// [`ssh_key_name`], slot `current`); `None` before the first rotation, when `key_file` is
/// the key.
pub async fn held_ssh_key(
    store: &dyn crate::state::Store,
    source: &crate::config::KekSource,
    target: &str,
) -> Result<Option<russh::keys::PrivateKey>, VaultError> {
    let name = ssh_key_name(target);
    let Some(blob) = store.vault_get(&name, "current").await? else {
        return Ok(None);
    };
    let pem = kek(source)?.open(&name, &blob)?;
    russh::keys::PrivateKey::from_openssh(pem.expose().as_bytes())
        .map(Some)
        .map_err(|e| VaultError::BadKey {
            name,
            why: e.to_string(),
        })
}

/// The key-encryption key.
pub struct Kek(LessSafeKey);

impl std::fmt::Debug for Kek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Kek(<redacted>)")
    }
}

fn parse_key(text: &str) -> Result<[u8; 32], VaultError> {
    let t = text.trim();
    let bytes = hex::decode(t)
        .ok()
        .or_else(|| B64.decode(t).ok())
        .ok_or_else(|| {
            VaultError::Kek("must be 32 bytes as hex (64 characters) or base64".into())
        })?;
    bytes
        .try_into()
        .map_err(|_| VaultError::Kek("must be exactly 32 bytes".into()))
}

impl Kek {
    /// From an environment variable (hex or base64 of 32 bytes).
    pub fn from_env(var: &str) -> Result<Kek, VaultError> {
        let v = std::env::var(var)
            .map_err(|_| VaultError::Kek(format!("environment variable {var} is not set")))?;
        Kek::from_bytes(&parse_key(&v)?)
    }

    /// From a file; created with a random key (mode 0600) when `create` and it is absent.
    pub fn from_file(path: &Path, create: bool) -> Result<Kek, VaultError> {
        if !path.exists() && create {
            let key: [u8; 32] = rand::random();
            if let Some(d) = path.parent() {
                std::fs::create_dir_all(d)
                    .map_err(|e| VaultError::Kek(format!("{}: {e}", path.display())))?;
            }
            crate::keys::write_private(path, hex::encode(key).as_bytes())
                .map_err(|e| VaultError::Kek(format!("{}: {e}", path.display())))?;
        }
        let text = std::fs::read_to_string(path)
            .map_err(|e| VaultError::Kek(format!("{}: {e}", path.display())))?;
        Kek::from_bytes(&parse_key(&text)?)
    }

    fn from_bytes(key: &[u8; 32]) -> Result<Kek, VaultError> {
        let k = UnboundKey::new(&AES_256_GCM, key)
            .map_err(|_| VaultError::Kek("unusable key".into()))?;
        Ok(Kek(LessSafeKey::new(k)))
    }

    /// Encrypts a secret for entry `name` (bound as associated data, so entries cannot be
    /// swapped). Output: base64(nonce ‖ ciphertext ‖ tag).
    pub fn seal(&self, name: &str, secret: &Secret<String>) -> Result<String, VaultError> {
        let nonce_bytes: [u8; NONCE_LEN] = rand::random();
        let mut buf = secret.expose().as_bytes().to_vec();
        self.0
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce_bytes),
                Aad::from(name.as_bytes()),
                &mut buf,
            )
            .map_err(|_| VaultError::Kek("encryption failed".into()))?;
        let mut out = nonce_bytes.to_vec();
        out.extend_from_slice(&buf);
        Ok(B64.encode(out))
    }

    /// Decrypts an entry sealed by [`Kek::seal`].
    pub fn open(&self, name: &str, blob: &str) -> Result<Secret<String>, VaultError> {
        let raw = B64
            .decode(blob.trim())
            .map_err(|_| VaultError::Malformed(name.into()))?;
        if raw.len() < NONCE_LEN + 16 {
            return Err(VaultError::Malformed(name.into()));
        }
        let (n, ct) = raw.split_at(NONCE_LEN);
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(n);
        let mut buf = ct.to_vec();
        let plain = self
            .0
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(name.as_bytes()),
                &mut buf,
            )
            .map_err(|_| VaultError::Decrypt(name.into()))?;
        let s =
            String::from_utf8(plain.to_vec()).map_err(|_| VaultError::Malformed(name.into()))?;
        Ok(Secret::new(s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_round_trip_and_binding() {
        let dir = tempfile::tempdir().expect("tempdir");
        let kek = Kek::from_file(&dir.path().join("kek"), true).expect("kek");
        let s = Secret::new("hunter2-long-secret".to_string());
        let blob = kek.seal("orders-db", &s).expect("seal");
        assert!(!blob.contains("hunter2"));
        assert_eq!(kek.open("orders-db", &blob).expect("open"), s);
        assert!(
            matches!(kek.open("other-db", &blob), Err(VaultError::Decrypt(_))),
            "bound to its name"
        );
        let other = Kek::from_file(&dir.path().join("kek2"), true).expect("kek2");
        assert!(
            other.open("orders-db", &blob).is_err(),
            "another KEK cannot open it"
        );
        assert_eq!(format!("{s:?} {s}"), "Secret(<redacted>) <redacted>");
        assert!(matches!(parse_key("abc"), Err(VaultError::Kek(_))));
    }
}
