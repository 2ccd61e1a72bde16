//! The gateway's own keys: its SSH host key, the user CA that signs per-session upstream
//! certificates, and target-held keys. Generated on first start and kept in the data dir.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use russh::keys::ssh_key::certificate::{Builder, CertType};
use russh::keys::ssh_key::private::Ed25519Keypair;
use russh::keys::ssh_key::LineEnding;
use russh::keys::{Certificate, PrivateKey, PublicKey};

/// A key file problem.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read key {path}: {why}")]
    Read { path: PathBuf, why: String },
    #[error("cannot write key {path}: {why}")]
    Write { path: PathBuf, why: String },
    #[error("cannot sign certificate: {0}")]
    Sign(String),
}

/// A fresh ed25519 private key from the OS random source.
pub fn generate_ed25519(comment: &str) -> PrivateKey {
    let seed: [u8; 32] = rand::random();
    let mut key = PrivateKey::from(Ed25519Keypair::from_seed(&seed));
    key.set_comment(comment);
    key
}

/// Loads an OpenSSH private key, or creates an ed25519 one (mode 0600) if the file is absent.
pub fn load_or_create(path: &Path, comment: &str) -> Result<PrivateKey, KeyError> {
    if path.exists() {
        return PrivateKey::read_openssh_file(path).map_err(|e| KeyError::Read {
            path: path.to_path_buf(),
            why: e.to_string(),
        });
    }
    let key = generate_ed25519(comment);
    let werr = |why: String| KeyError::Write {
        path: path.to_path_buf(),
        why,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| werr(e.to_string()))?;
    }
    let pem = key
        .to_openssh(LineEnding::LF)
        .map_err(|e| werr(e.to_string()))?;
    write_private(path, pem.as_bytes()).map_err(|e| werr(e.to_string()))?;
    let public = key
        .public_key()
        .to_openssh()
        .map_err(|e| werr(e.to_string()))?;
    std::fs::write(path.with_extension("pub"), format!("{public}\n"))
        .map_err(|e| werr(e.to_string()))?;
    Ok(key)
}

/// Writes a new file readable only by its owner (0600), refusing to overwrite, and syncs it.
#[cfg(unix)]
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

#[cfg(not(unix))]
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::write(path, bytes)
}

/// The gateway's long-lived keys.
#[derive(Clone)]
pub struct GatewayKeys {
    /// Presented to clients; clients pin it in known_hosts.
    pub host: Arc<PrivateKey>,
    /// Signs per-session user certificates that targets trust via TrustedUserCAKeys.
    pub user_ca: Arc<PrivateKey>,
}

impl GatewayKeys {
    pub fn host_path(keys_dir: &Path) -> PathBuf {
        keys_dir.join("ssh_host_ed25519_key")
    }
    pub fn ca_path(keys_dir: &Path) -> PathBuf {
        keys_dir.join("user_ca_ed25519_key")
    }

    /// Loads the keys from the data dir, generating any that are missing.
    pub fn load_or_create(keys_dir: &Path) -> Result<GatewayKeys, KeyError> {
        Ok(GatewayKeys {
            host: Arc::new(load_or_create(
                &Self::host_path(keys_dir),
                "breakglass host key",
            )?),
            user_ca: Arc::new(load_or_create(
                &Self::ca_path(keys_dir),
                "breakglass user CA",
            )?),
        })
    }

    /// Issues a per-session certificate for `login`, valid from a minute ago (clock skew) until
    /// `valid_until`. The key id names the person and session, so the target's auth log shows
    /// who is behind the shared break-glass account.
    pub fn session_certificate(
        &self,
        login: &str,
        person: &str,
        session_id: &str,
        valid_until: DateTime<Utc>,
    ) -> Result<(Arc<PrivateKey>, Certificate), KeyError> {
        let key = generate_ed25519(&format!("breakglass session {session_id}"));
        let now = crate::clock::now().timestamp();
        let after = (now - 60).max(0) as u64;
        let before = (valid_until.timestamp().max(now) + 1) as u64;
        let nonce: [u8; 32] = rand::random();
        let sign = |e: russh::keys::ssh_key::Error| KeyError::Sign(e.to_string());
        let mut b = Builder::new(
            nonce.to_vec(),
            key.public_key().key_data().clone(),
            after,
            before,
        )
        .map_err(sign)?;
        b.serial(rand::random()).map_err(sign)?;
        b.cert_type(CertType::User).map_err(sign)?;
        b.key_id(format!("breakglass:{person}:{session_id}"))
            .map_err(sign)?;
        b.valid_principal(login).map_err(sign)?;
        // Only a pty: no port, agent or X11 forwarding, no user rc, on the target either.
        b.extension("permit-pty", "").map_err(sign)?;
        let cert = b.sign(self.user_ca.as_ref()).map_err(sign)?;
        Ok((Arc::new(key), cert))
    }
}

/// The OpenSSH one-line form of a public key.
pub fn openssh_line(key: &PublicKey) -> String {
    key.to_openssh()
        .unwrap_or_else(|e| format!("<unencodable key: {e}>"))
}

/// SHA-256 fingerprint as OpenSSH prints it.
pub fn fingerprint(key: &PublicKey) -> String {
    key.fingerprint(Default::default()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_persist_across_loads() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = GatewayKeys::load_or_create(dir.path()).expect("create");
        let b = GatewayKeys::load_or_create(dir.path()).expect("load");
        assert_eq!(a.host.public_key(), b.host.public_key());
        assert_ne!(a.host.public_key(), a.user_ca.public_key());
    }

    #[test]
    fn certificate_is_bounded_and_names_the_person() {
        let dir = tempfile::tempdir().expect("tempdir");
        let k = GatewayKeys::load_or_create(dir.path()).expect("create");
        let until = crate::clock::now() + chrono::Duration::minutes(5);
        let (_key, cert) = k
            .session_certificate("root", "alice", "s1", until)
            .expect("cert");
        assert_eq!(cert.valid_principals(), &["root".to_string()]);
        assert!(cert.key_id().contains("alice"));
        assert!(cert.valid_before() <= until.timestamp() as u64 + 1);
        assert_eq!(cert.signature_key(), k.user_ca.public_key().key_data());
    }
}
