//! The upstream leg: a russh client to the target's sshd with its host key pinned, logging in
//! as the break-glass account with credentials only the gateway holds.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use russh::client;
use russh::keys::{PrivateKeyWithHashAlg, PublicKey, PublicKeyOrCertificate};

use crate::config::{TargetConfig, UpstreamAuth};
use crate::grant::Denial;
use crate::keys::{fingerprint, GatewayKeys};

/// The upstream client handler: it only checks the pinned host key.
pub struct Upstream {
    pinned: PublicKey,
    /// The key the target actually presented, kept for the mismatch report.
    seen: Arc<Mutex<Option<String>>>,
}

impl client::Handler for Upstream {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let presented = match key {
            PublicKeyOrCertificate::PublicKey { key, .. } => key.clone(),
            // A host certificate is accepted only if its key is the pinned one.
            PublicKeyOrCertificate::Certificate(c) => PublicKey::from(c.public_key().clone()),
        };
        let ok = presented.key_data() == self.pinned.key_data();
        *self.seen.lock().unwrap_or_else(|p| p.into_inner()) = Some(fingerprint(&presented));
        Ok(ok)
    }
}

/// The upstream connection of one session.
pub type UpstreamHandle = client::Handle<Upstream>;

/// On the upstream leg we choose: AES-GCM first (hardware AES makes it several times cheaper
/// than ChaCha20-Poly1305), which matters because the gateway pays for two legs.
const UPSTREAM_CIPHERS: &[russh::cipher::Name] = &[
    russh::cipher::AES_256_GCM,
    russh::cipher::AES_128_GCM,
    russh::cipher::CHACHA20_POLY1305,
    russh::cipher::AES_256_CTR,
    russh::cipher::AES_128_CTR,
];

fn client_config() -> Arc<client::Config> {
    Arc::new(client::Config {
        preferred: russh::Preferred {
            cipher: std::borrow::Cow::Borrowed(UPSTREAM_CIPHERS),
            ..Default::default()
        },
        // The session deadline, not inactivity, ends sessions.
        inactivity_timeout: None,
        keepalive_interval: Some(Duration::from_secs(30)),
        keepalive_max: 3,
        nodelay: true,
        window_size: 8 << 20,
        ..Default::default()
    })
}

/// Connects and authenticates to a target. Errors are denials the client will be shown.
/// How the gateway logs in upstream for one connection.
pub enum Login<'a> {
    /// A per-session certificate from the gateway CA.
    Certificate {
        keys: &'a GatewayKeys,
        person: &'a str,
        session_id: &'a str,
        deadline: DateTime<Utc>,
    },
    /// A private key the gateway holds for the target.
    Key(Box<russh::keys::PrivateKey>),
    /// A private key that logs in as another account than the target's login (the admin
    /// account of `disable_between_grants`).
    KeyAs(&'a str, Box<russh::keys::PrivateKey>),
}

/// Connects for a person's session: certificate targets get a per-session certificate, key
/// targets use the gateway-held key (from the vault once rotated, else `key_file`).
pub async fn connect(
    target: &TargetConfig,
    pinned: &PublicKey,
    keys: &GatewayKeys,
    held_key: Option<russh::keys::PrivateKey>,
    person: &str,
    session_id: &str,
    deadline: DateTime<Utc>,
) -> Result<UpstreamHandle, Denial> {
    let login = match (&target.auth, held_key) {
        (UpstreamAuth::Certificate, _) => Login::Certificate {
            keys,
            person,
            session_id,
            deadline,
        },
        (UpstreamAuth::Key(_), Some(k)) => Login::Key(Box::new(k)),
        (UpstreamAuth::Key(path), None) => Login::Key(Box::new(
            russh::keys::PrivateKey::read_openssh_file(path).map_err(|e| Denial::Internal {
                why: format!("cannot load the key for {}: {e}", target.name),
            })?,
        )),
    };
    connect_as(target, pinned, login).await
}

/// Public-key authentication as `user`, with the best RSA hash the server offers.
async fn key_auth(
    handle: &mut UpstreamHandle,
    user: &str,
    key: russh::keys::PrivateKey,
) -> Result<client::AuthResult, russh::Error> {
    let hash = handle
        .best_supported_rsa_hash()
        .await
        .ok()
        .flatten()
        .flatten();
    let key = PrivateKeyWithHashAlg::new(Arc::new(key), hash);
    handle.authenticate_publickey(user.to_string(), key).await
}

/// Connects and authenticates to a target. Errors are denials the client will be shown.
pub async fn connect_as(
    target: &TargetConfig,
    pinned: &PublicKey,
    login: Login<'_>,
) -> Result<UpstreamHandle, Denial> {
    let seen = Arc::new(Mutex::new(None));
    let handler = Upstream {
        pinned: pinned.clone(),
        seen: seen.clone(),
    };
    let up_err = |why: String| Denial::Upstream {
        target: target.name.clone(),
        why,
    };
    let connect = client::connect(client_config(), target.address.as_str(), handler);
    let mut handle = match tokio::time::timeout(Duration::from_secs(10), connect).await {
        Err(_) => return Err(up_err("connection timed out after 10s".into())),
        Ok(Ok(h)) => h,
        Ok(Err(e)) => {
            let got = seen.lock().unwrap_or_else(|p| p.into_inner()).clone();
            return Err(match (e, got) {
                (russh::Error::UnknownKey, Some(got)) => Denial::HostKeyMismatch {
                    target: target.name.clone(),
                    expected: fingerprint(pinned),
                    got,
                },
                (e, _) => up_err(e.to_string()),
            });
        }
    };
    let is_cert = matches!(login, Login::Certificate { .. });
    let mut user = target.login.as_str();
    let auth = match login {
        Login::Certificate {
            keys,
            person,
            session_id,
            deadline,
        } => {
            let (key, cert) = keys
                .session_certificate(&target.login, person, session_id, deadline)
                .map_err(|e| Denial::Internal { why: e.to_string() })?;
            handle
                .authenticate_openssh_cert(target.login.clone(), key, cert)
                .await
        }
        Login::Key(key) => {
            user = target.login.as_str();
            key_auth(&mut handle, user, *key).await
        }
        Login::KeyAs(as_user, key) => {
            user = as_user;
            key_auth(&mut handle, user, *key).await
        }
    };
    match auth {
        Ok(r) if r.success() => Ok(handle),
        Ok(_) if is_cert => Err(up_err(format!(
            "the target refused the gateway's credentials for `{user}` (is the gateway CA in TrustedUserCAKeys?)"
        ))),
        Ok(_) => Err(up_err(format!(
            "the target refused the gateway-held key for `{user}` (is it in that account's authorized_keys?)"
        ))),
        Err(e) => Err(up_err(format!("authentication failed: {e}"))),
    }
}
