//! Rotation after use: when a grant ends (expiry, revoke), the break-glass credentials it
//! could have exposed are replaced within `limits.rotation_window`.
//!
//! - PostgreSQL targets: the gateway logs in as the break-glass role (over TLS when the
//!   target's `tls` says so, trusting its `ca_file` only) with the vault's current password and sets a new random one with `ALTER ROLE … PASSWORD 'SCRAM-SHA-256$…'` — a
//!   verifier computed here, so the new password never appears in the server's logs. The new
//!   password is sealed in the vault as `pending` first, checked by logging in with it, then
//!   promoted to `current`; a crash in between leaves both, and the next run tries `pending`.
//! - SSH targets with per-session certificates: nothing to rotate (certificates expire at the
//!   session deadline).
//! - SSH targets with a gateway-held key: the gateway makes a new ed25519 key, logs in with
//!   the old one and rewrites the target's authorized_keys (old key line out, new one in, in
//!   one `mv`), checks that the new key logs in, and keeps it sealed in the vault (entry
//!   `ssh-key:<target>`), which takes precedence over `key_file` from then on. The target
//!   learns the new key through that rewrite; nothing else has to change on it.

use std::sync::Arc;
use std::time::Duration;

use crate::clock;
use crate::config::{Protocol, TargetConfig, UpstreamAuth, UpstreamTls};
use crate::services::Gateway;
use crate::siem::{AccessEvent, Action};
use crate::vault::Secret;

/// A rotation failure.
#[derive(Debug, thiserror::Error)]
pub enum RotateError {
    #[error("vault: {0}")]
    Vault(#[from] crate::vault::VaultError),
    #[error("state: {0}")]
    State(#[from] crate::state::StateError),
    #[error("no password for {0} in the vault (set one with `breakglass vault set {0}`)")]
    NoPassword(String),
    #[error("target {target}: {why}")]
    Target { target: String, why: String },
}

use crate::vault::kek;

fn pg_config(
    t: &TargetConfig,
    login: &str,
    password: &str,
) -> Result<tokio_postgres::Config, RotateError> {
    let (host, port) = t
        .address
        .rsplit_once(':')
        .ok_or_else(|| RotateError::Target {
            target: t.name.clone(),
            why: "address is not host:port".into(),
        })?;
    let port: u16 = port.parse().map_err(|_| RotateError::Target {
        target: t.name.clone(),
        why: "bad port".into(),
    })?;
    let mut c = tokio_postgres::Config::new();
    c.host(host)
        .port(port)
        .user(login)
        .password(password)
        .dbname(&t.database)
        .application_name("breakglass-rotation")
        .connect_timeout(Duration::from_secs(10));
    Ok(c)
}

/// Logs in as the target's break-glass role, over TLS when the target's `tls` says so (with
/// the same trust as the relay).
async fn pg_login(
    gw: &Gateway,
    t: &TargetConfig,
    password: &str,
) -> Result<tokio_postgres::Client, RotateError> {
    pg_login_as(gw, t, &t.login, password).await
}

/// Logs in to the target as `login` (the break-glass role, or the admin role that switches
/// it on and off).
async fn pg_login_as(
    gw: &Gateway,
    t: &TargetConfig,
    login: &str,
    password: &str,
) -> Result<tokio_postgres::Client, RotateError> {
    let failed = |e: tokio_postgres::Error| RotateError::Target {
        target: t.name.clone(),
        why: match std::error::Error::source(&e) {
            // tokio-postgres's own text hides the cause (a refused password request, a TLS
            // failure) behind "error communicating with the server".
            Some(cause) => format!("login as {login} failed: {e}: {cause}"),
            None => format!("login as {login} failed: {e}"),
        },
    };
    let mut c = pg_config(t, login, password)?;
    if t.tls == UpstreamTls::Disable {
        // Connected here so that the guard reads the target's messages before tokio-postgres
        // could answer a password request.
        let tcp = tokio::time::timeout(
            Duration::from_secs(10),
            tokio::net::TcpStream::connect(&t.address),
        )
        .await
        .map_err(|_| RotateError::Target {
            target: t.name.clone(),
            why: "connect timed out".into(),
        })?
        .map_err(|e| RotateError::Target {
            target: t.name.clone(),
            why: format!("connect failed: {e}"),
        })?;
        let guarded = crate::pg::upstream::AuthGuard::new(tcp, t);
        c.ssl_mode(tokio_postgres::config::SslMode::Disable);
        let (client, conn) = c
            .connect_raw(guarded, tokio_postgres::NoTls)
            .await
            .map_err(failed)?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        return Ok(client);
    }
    let tls = gw.pg_tls.get(&t.name).ok_or_else(|| RotateError::Target {
        target: t.name.clone(),
        why: "the target's ca_file was not loaded when the gateway started".into(),
    })?;
    c.ssl_mode(tokio_postgres::config::SslMode::Require);
    // As the relay: SCRAM only with -PLUS under TLS, unless the target prefers (or allows
    // md5, which has no binding).
    c.channel_binding(if t.channel_binding_required && !t.allow_password_auth {
        tokio_postgres::config::ChannelBinding::Require
    } else {
        tokio_postgres::config::ChannelBinding::Prefer
    });
    let (client, conn) = c
        .connect(crate::pg::upstream::PostgresTls(tls.clone(), t.clone()))
        .await
        .map_err(failed)?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// Quotes an identifier for SQL.
fn ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Checks that the vault's current password logs in (for `vault verify` and check-config).
pub async fn verify_pg(gw: &Gateway, t: &TargetConfig) -> Result<Verified, RotateError> {
    let kek = kek(&gw.config.kek)?;
    let blob = gw
        .store
        .vault_get(&t.name, "current")
        .await?
        .ok_or_else(|| RotateError::NoPassword(t.name.clone()))?;
    let pw = kek.open(&t.name, &blob)?;
    let current = match pg_login(gw, t, pw.expose()).await {
        Ok(_) => return Ok(Verified::Current),
        Err(e) => e,
    };
    // A rotation in flight (or cut short) has set the pending password on the target
    // before promoting it in the vault: that one logging in is a healthy vault.
    if let Some(pending) = gw.store.vault_get(&t.name, "pending").await? {
        let pw = kek.open(&t.name, &pending)?;
        if pg_login(gw, t, pw.expose()).await.is_ok() {
            return Ok(Verified::Pending);
        }
    }
    Err(current)
}

/// Which of the vault's passwords logs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verified {
    Current,
    /// The pending one of a rotation in flight or interrupted; the next rotation promotes it.
    Pending,
}

/// Rotates a PostgreSQL target's break-glass password.
pub async fn rotate_pg(gw: &Gateway, t: &TargetConfig) -> Result<(), RotateError> {
    let kek = kek(&gw.config.kek)?;
    let now = clock::now();
    // A pending password from an interrupted rotation may be the live one.
    if let Some(pending) = gw.store.vault_get(&t.name, "pending").await? {
        let pw = kek.open(&t.name, &pending)?;
        if pg_login(gw, t, pw.expose()).await.is_ok() {
            gw.store.vault_promote(&t.name, now).await?;
        }
    }
    let blob = gw
        .store
        .vault_get(&t.name, "current")
        .await?
        .ok_or_else(|| RotateError::NoPassword(t.name.clone()))?;
    let current = kek.open(&t.name, &blob)?;
    let client = pg_login(gw, t, current.expose()).await?;
    let new = Secret::new(crate::credential::new_secret());
    gw.store
        .vault_put(&t.name, "pending", &kek.seal(&t.name, &new)?, now)
        .await?;
    let verifier = crate::credential::verifier(new.expose());
    client
        .batch_execute(&format!(
            "ALTER ROLE {} PASSWORD '{verifier}'",
            ident(&t.login)
        ))
        .await
        .map_err(|e| RotateError::Target {
            target: t.name.clone(),
            why: format!("ALTER ROLE failed: {e}"),
        })?;
    pg_login(gw, t, new.expose()).await?;
    gw.store.vault_promote(&t.name, clock::now()).await?;
    Ok(())
}

fn ssh_vault_name(t: &TargetConfig) -> String {
    crate::vault::ssh_key_name(&t.name)
}

/// The gateway-held SSH key of a target: the vault's (after a rotation), else `None`.
async fn held_ssh_key(
    gw: &Gateway,
    t: &TargetConfig,
) -> Result<Option<russh::keys::PrivateKey>, RotateError> {
    Ok(crate::vault::held_ssh_key(gw.store.as_ref(), &gw.config.kek, &t.name).await?)
}

async fn login_with(
    gw: &Gateway,
    t: &TargetConfig,
    key: russh::keys::PrivateKey,
) -> Result<crate::ssh::upstream::UpstreamHandle, RotateError> {
    let pinned = gw
        .built
        .host_keys
        .get(&t.name)
        .ok_or_else(|| RotateError::Target {
            target: t.name.clone(),
            why: "no pinned host key".into(),
        })?;
    crate::ssh::upstream::connect_as(t, pinned, crate::ssh::upstream::Login::Key(Box::new(key)))
        .await
        .map_err(|d| RotateError::Target {
            target: t.name.clone(),
            why: d.to_string(),
        })
}

/// The key the gateway logs in with now: the vault's, else the configured `key_file`.
async fn current_ssh_key(
    gw: &Gateway,
    t: &TargetConfig,
    key_file: &std::path::Path,
) -> Result<russh::keys::PrivateKey, RotateError> {
    match held_ssh_key(gw, t).await? {
        Some(k) => Ok(k),
        None => {
            russh::keys::PrivateKey::read_openssh_file(key_file).map_err(|e| RotateError::Target {
                target: t.name.clone(),
                why: format!("cannot load {}: {e}", key_file.display()),
            })
        }
    }
}

/// The base64 body of a public key's authorized_keys line (what `grep -F` looks for).
fn key_blob(key: &russh::keys::PublicKey) -> String {
    crate::keys::openssh_line(key)
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_string()
}

/// Runs `script` on an open connection; Ok(stdout) when it exits 0, else an error naming
/// `what` with the script's stderr.
async fn run_script(
    t: &TargetConfig,
    handle: &crate::ssh::upstream::UpstreamHandle,
    script: &str,
    what: &str,
) -> Result<String, RotateError> {
    let fail = |why: String| RotateError::Target {
        target: t.name.clone(),
        why,
    };
    let mut ch = handle
        .channel_open_session()
        .await
        .map_err(|e| fail(format!("channel: {e}")))?;
    ch.exec(true, script.as_bytes().to_vec())
        .await
        .map_err(|e| fail(format!("exec: {e}")))?;
    let mut status = None;
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    while let Some(msg) = ch.wait().await {
        match msg {
            russh::ChannelMsg::ExitStatus { exit_status } => status = Some(exit_status),
            russh::ChannelMsg::Data { data } if stdout.len() < 64 * 1024 => {
                stdout.extend_from_slice(&data)
            }
            russh::ChannelMsg::ExtendedData { data, .. } if stderr.len() < 64 * 1024 => {
                stderr.extend_from_slice(&data)
            }
            russh::ChannelMsg::Close => break,
            _ => {}
        }
    }
    if status != Some(0) {
        return Err(fail(format!(
            "{what} failed (exit {status:?}): {}",
            String::from_utf8_lossy(&stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&stdout).into_owned())
}

/// Replaces a target's gateway-held SSH key.
pub async fn rotate_ssh_key(gw: &Gateway, t: &TargetConfig) -> Result<(), RotateError> {
    let crate::config::UpstreamAuth::Key(path) = &t.auth else {
        return Ok(());
    };
    if t.authorized_keys.contains(['\'', '\n', '\r']) {
        return Err(RotateError::Target {
            target: t.name.clone(),
            why: "authorized_keys path must not contain quotes or newlines".into(),
        });
    }
    let kek = kek(&gw.config.kek)?;
    let name = ssh_vault_name(t);
    let now = clock::now();
    // A pending key from an interrupted rotation may be the one the target now trusts.
    if let Some(pending) = gw.store.vault_get(&name, "pending").await? {
        let pem = kek.open(&name, &pending)?;
        if let Ok(k) = russh::keys::PrivateKey::from_openssh(pem.expose().as_bytes()) {
            if login_with(gw, t, k).await.is_ok() {
                gw.store.vault_promote(&name, now).await?;
            }
        }
    }
    let old = current_ssh_key(gw, t, path).await?;
    let old_blob = key_blob(old.public_key());
    let new = crate::keys::generate_ed25519(&format!("breakglass-held-{}", t.name));
    let new_line = crate::keys::openssh_line(new.public_key());
    let pem = new
        .to_openssh(russh::keys::ssh_key::LineEnding::LF)
        .map_err(|e| RotateError::Target {
            target: t.name.clone(),
            why: e.to_string(),
        })?;
    gw.store
        .vault_put(
            &name,
            "pending",
            &kek.seal(&name, &Secret::new(pem.to_string()))?,
            now,
        )
        .await?;
    // With an admin account (disable_between_grants), it rewrites the file: the break-glass
    // login may not own it. Otherwise the old key logs in and rewrites its own file.
    let (handle, f) = match &t.admin_login {
        Some(_) => (admin_connect(gw, t).await?, authorized_keys_word(t)),
        None => (
            login_with(gw, t, old).await?,
            format!("'{}'", t.authorized_keys),
        ),
    };
    let script = format!(
        "set -e; umask 077; f={f}; t=\"$f.breakglass.$$\"; {{ [ -e \"$f\" ] && cp -p \"$f\" \"$t\"; }} || true; {{ grep -vF '{old_blob}' \"$f\" || true; printf '%s\\n' '{new_line}'; }} > \"$t\"; mv \"$t\" \"$f\""
    );
    let r = run_script(t, &handle, &script, &format!("rewriting {f}")).await;
    let _ = handle
        .disconnect(russh::Disconnect::ByApplication, "rotation done", "en")
        .await;
    r?;
    login_with(gw, t, new).await?;
    gw.store.vault_promote(&name, clock::now()).await?;
    Ok(())
}

/// The vault slot of a target's admin role password.
pub const ADMIN_SLOT: &str = "admin";

/// Switches the target's break-glass role to LOGIN (`enable`) or NOLOGIN, as its
/// `admin_login`; Ok(false) when the target does not disable its role between grants.
pub async fn set_login(gw: &Gateway, t: &TargetConfig, enable: bool) -> Result<bool, RotateError> {
    switch(gw, t, enable, false).await
}

/// The admin role's password from the vault.
fn admin_password(
    gw: &Gateway,
    t: &TargetConfig,
    admin: &str,
    blob: Option<String>,
) -> Result<crate::vault::Secret<String>, RotateError> {
    let kek = kek(&gw.config.kek)?;
    let blob = blob.ok_or_else(|| RotateError::Target {
        target: t.name.clone(),
        why: format!(
            "no password for admin_login {admin} in the vault (set it with `breakglass vault set {} --admin`)",
            t.name
        ),
    })?;
    Ok(kek.open(&t.name, &blob)?)
}

/// [`set_login`], or with `dry_run` only tried inside a transaction that is rolled back (the
/// privilege is tested and nothing changes).
async fn switch(
    gw: &Gateway,
    t: &TargetConfig,
    enable: bool,
    dry_run: bool,
) -> Result<bool, RotateError> {
    let Some(admin) = &t.admin_login else {
        return Ok(false);
    };
    if t.protocol == crate::config::Protocol::Ssh {
        return ssh_switch(gw, t, enable, dry_run).await.map(|_| true);
    }
    let blob = gw.store.vault_get(&t.name, ADMIN_SLOT).await?;
    let pw = admin_password(gw, t, admin, blob)?;
    let alter = format!(
        "ALTER ROLE {} {}",
        ident(&t.login),
        if enable { "LOGIN" } else { "NOLOGIN" }
    );
    let sql = if dry_run {
        format!("BEGIN; {alter}; ROLLBACK")
    } else {
        alter
    };
    bounded(t, async {
        let client = pg_login_as(gw, t, admin, pw.expose()).await?;
        client
            .batch_execute(&sql)
            .await
            .map_err(|e| RotateError::Target {
                target: t.name.clone(),
                why: format!(
                    "{admin} could not {} {}: {}",
                    if enable { "enable" } else { "disable" },
                    t.login,
                    e.as_db_error()
                        .map(|d| d.message().to_string())
                        .unwrap_or_else(|| e.to_string())
                ),
            })
    })
    .await?;
    Ok(true)
}

/// A call to a target within [`TARGET_CALL`]: a target that accepts and then stalls must not
/// hang the rotation worker or an approval.
async fn bounded<T>(
    t: &TargetConfig,
    f: impl std::future::Future<Output = Result<T, RotateError>>,
) -> Result<T, RotateError> {
    tokio::time::timeout(TARGET_CALL, f)
        .await
        .map_err(|_| RotateError::Target {
            target: t.name.clone(),
            why: format!("no answer within {}s", TARGET_CALL.as_secs()),
        })?
}

/// The authorized_keys file as a shell word for a script run by the admin account: absolute
/// as configured, else under the break-glass login's home (`~login/…`; config checks that
/// the login is a plain name).
fn authorized_keys_word(t: &TargetConfig) -> String {
    if t.authorized_keys.starts_with('/') {
        format!("'{}'", t.authorized_keys)
    } else {
        format!("~{}/'{}'", t.login, t.authorized_keys)
    }
}

/// An SSH key target's switch, run as its admin account: `enable` puts the held key's line
/// into the login's authorized_keys (once), otherwise every line of a key the gateway holds or
/// held for it (current, pending, the configured key_file) is taken out; the file keeps its
/// owner and mode and is replaced in one `mv`. With `dry_run`, nothing changes: the script
/// checks that the admin may write the file and answers whether the current key is in it.
/// Ok(whether the current key is in the file, after the switch).
async fn ssh_switch(
    gw: &Gateway,
    t: &TargetConfig,
    enable: bool,
    dry_run: bool,
) -> Result<bool, RotateError> {
    let (Some(admin), UpstreamAuth::Key(key_file)) = (&t.admin_login, &t.auth) else {
        return Ok(true);
    };
    if t.authorized_keys.contains(['\'', '\n', '\r']) {
        return Err(RotateError::Target {
            target: t.name.clone(),
            why: "authorized_keys path must not contain quotes or newlines".into(),
        });
    }
    let current = current_ssh_key(gw, t, key_file).await?;
    let blob = key_blob(current.public_key());
    let f = authorized_keys_word(t);
    let script = if dry_run {
        format!(
            "f={f}; if [ -e \"$f\" ]; then test -w \"$f\"; else test -w \"$(dirname \"$f\")\"; fi || {{ echo \"cannot write $f\" >&2; exit 1; }}; if grep -qF '{blob}' \"$f\" 2>/dev/null; then echo in; else echo out; fi"
        )
    } else if enable {
        let line = crate::keys::openssh_line(current.public_key());
        format!(
            "set -e; umask 077; f={f}; mkdir -p \"$(dirname \"$f\")\"; touch \"$f\"; grep -qF '{blob}' \"$f\" || printf '%s\\n' '{line}' >> \"$f\"; echo in"
        )
    } else {
        let mut blobs = vec![blob];
        let name = ssh_vault_name(t);
        if let Some(pending) = gw.store.vault_get(&name, "pending").await? {
            let pem = kek(&gw.config.kek)?.open(&name, &pending)?;
            if let Ok(k) = russh::keys::PrivateKey::from_openssh(pem.expose().as_bytes()) {
                blobs.push(key_blob(k.public_key()));
            }
        }
        if let Ok(k) = russh::keys::PrivateKey::read_openssh_file(key_file) {
            blobs.push(key_blob(k.public_key()));
        }
        let patterns: String = blobs.iter().map(|b| format!(" -e '{b}'")).collect();
        format!(
            "set -e; umask 077; f={f}; [ -e \"$f\" ] || {{ echo out; exit 0; }}; t=\"$f.breakglass.$$\"; cp -p \"$f\" \"$t\"; {{ grep -vF{patterns} \"$f\" || true; }} > \"$t\"; mv \"$t\" \"$f\"; echo out"
        )
    };
    let what = format!("{admin} switching {}'s held key", t.login);
    bounded(t, async {
        let handle = admin_connect(gw, t).await?;
        let out = run_script(t, &handle, &script, &what).await;
        let _ = handle
            .disconnect(russh::Disconnect::ByApplication, "switch done", "en")
            .await;
        Ok(out?.trim() == "in")
    })
    .await
}

/// Logs in to an SSH target as its `admin_login` with `admin_key_file`.
async fn admin_connect(
    gw: &Gateway,
    t: &TargetConfig,
) -> Result<crate::ssh::upstream::UpstreamHandle, RotateError> {
    let fail = |why: String| RotateError::Target {
        target: t.name.clone(),
        why,
    };
    let (Some(admin), Some(admin_key)) = (&t.admin_login, &t.admin_key) else {
        return Err(fail("no admin_login and admin_key_file".into()));
    };
    let key = russh::keys::PrivateKey::read_openssh_file(admin_key).map_err(|e| {
        fail(format!(
            "cannot load admin_key_file {}: {e}",
            admin_key.display()
        ))
    })?;
    let pinned = gw
        .built
        .host_keys
        .get(&t.name)
        .ok_or_else(|| fail("no pinned host key".into()))?;
    crate::ssh::upstream::connect_as(
        t,
        pinned,
        crate::ssh::upstream::Login::KeyAs(admin, Box::new(key)),
    )
    .await
    .map_err(|d| fail(d.to_string()))
}

/// The longest one login-and-statement to a target may take.
const TARGET_CALL: Duration = Duration::from_secs(15);

/// Whether the break-glass role may log in now (`rolcanlogin`), read as the admin role.
pub async fn can_login(gw: &Gateway, t: &TargetConfig) -> Result<bool, RotateError> {
    let Some(admin) = &t.admin_login else {
        return Ok(true);
    };
    if t.protocol == crate::config::Protocol::Ssh {
        return ssh_switch(gw, t, true, true).await;
    }
    let blob = gw.store.vault_get(&t.name, ADMIN_SLOT).await?;
    let pw = admin_password(gw, t, admin, blob)?;
    bounded(t, async {
        let client = pg_login_as(gw, t, admin, pw.expose()).await?;
        let row = client
            .query_one(
                "SELECT rolcanlogin FROM pg_roles WHERE rolname = $1",
                &[&t.login],
            )
            .await
            .map_err(|e| RotateError::Target {
                target: t.name.clone(),
                why: format!("cannot read the role {}: {e}", t.login),
            })?;
        Ok(row.get(0))
    })
    .await
}

/// Checks that the admin role can switch the break-glass role: reads its state and sets it
/// again to what it is (no change). Ok(whether it may log in now).
pub async fn check_switch(gw: &Gateway, t: &TargetConfig) -> Result<bool, RotateError> {
    let now = can_login(gw, t).await?;
    switch(gw, t, !now, true).await?;
    Ok(now)
}

/// Switches the role on for a grant that just started (best effort: the worker's next pass
/// retries), and says so on the record.
pub async fn open_for_grant(gw: &Gateway, target: &str) {
    let Some(t) = gw.config.targets.get(target) else {
        return;
    };
    if t.admin_login.is_none() {
        return;
    }
    let r = set_login(gw, t, true).await.map(drop);
    account_event(gw, t, true, "a grant started", r).await;
}

/// What a switchable target's break-glass account is when switched on or off: `LOGIN` /
/// `NOLOGIN` for a PostgreSQL role, and for an SSH login whether the held key is in its
/// authorized_keys.
pub fn state_word(t: &TargetConfig, on: bool) -> &'static str {
    match (t.protocol, on) {
        (Protocol::Postgres, true) => "LOGIN",
        (Protocol::Postgres, false) => "NOLOGIN",
        (Protocol::Ssh, true) => "KEY-IN (the held key is in authorized_keys)",
        (Protocol::Ssh, false) => "KEY-OUT (no held key in authorized_keys)",
    }
}

/// [`state_word`] without its explanation: `LOGIN`, `NOLOGIN`, `KEY-IN` or `KEY-OUT`.
pub fn state_tag(t: &TargetConfig, on: bool) -> &'static str {
    let w = state_word(t, on);
    w.split(' ').next().unwrap_or(w)
}

/// The `account_enabled` / `account_disabled` event of a switch.
async fn account_event(
    gw: &Gateway,
    t: &TargetConfig,
    enable: bool,
    why: &str,
    r: Result<(), RotateError>,
) {
    let action = if enable {
        Action::AccountEnabled
    } else {
        Action::AccountDisabled
    };
    let mut e = AccessEvent::new(action, "breakglass");
    e.target = Some(t.name.clone());
    e.protocol = t.protocol.as_str().into();
    match r {
        Ok(()) => {
            e.message = Some(format!(
                "{} is {} on {} ({why})",
                t.login,
                state_word(t, enable),
                t.name
            ));
        }
        Err(err) => {
            tracing::error!(target = %t.name, error = %err, enable, "could not switch the break-glass role");
            e.outcome = crate::siem::Outcome::Failure;
            e.side = Some(crate::grant::Side::Upstream);
            e.message = Some(format!(
                "could not make {} {} on {} ({why}): {err}",
                t.login,
                state_word(t, enable),
                t.name
            ));
        }
    }
    if let Err(err) = gw.audit(&e).await {
        tracing::error!(error = %err, "could not write the account event");
    }
}

/// How often a role switch that keeps failing is put on the record (and alerts) again.
const FAILURE_REPEAT: Duration = Duration::from_secs(600);

/// Whether a failure of `name` was put on the record less than [`FAILURE_REPEAT`] ago.
fn reported_lately(
    failing: &std::collections::BTreeMap<String, chrono::DateTime<chrono::Utc>>,
    name: &str,
    now: chrono::DateTime<chrono::Utc>,
) -> bool {
    let repeat = chrono::Duration::from_std(FAILURE_REPEAT).unwrap_or(chrono::Duration::MAX);
    failing.get(name).is_some_and(|at| now - *at < repeat)
}

/// Keeps each switchable target's role LOGIN exactly while a grant is active or an ended
/// grant still waits for its rotation (which logs in as the role), NOLOGIN otherwise.
/// `known` is what this node last set (None at start: the first pass sets every target).
/// `failing` holds when each target's last failed switch was put on the record: a switch that
/// keeps failing is retried every pass but reported once per [`FAILURE_REPEAT`], so a broken
/// target does not page the custodians every 2 s.
async fn keep_roles(
    gw: &Gateway,
    known: &mut std::collections::BTreeMap<String, bool>,
    failing: &mut std::collections::BTreeMap<String, chrono::DateTime<chrono::Utc>>,
    awaiting_rotation: &std::collections::BTreeSet<String>,
    now: chrono::DateTime<chrono::Utc>,
) {
    let switchable: Vec<&TargetConfig> = gw
        .config
        .targets
        .values()
        .filter(|t| t.admin_login.is_some())
        .collect();
    if switchable.is_empty() {
        return;
    }
    // The pass's own time: a grant that ended during the pass's rotations is in neither set
    // otherwise, and its role would go NOLOGIN before its rotation logged in as it.
    let active = match gw.store.list_grants(Some(now)).await {
        Ok(g) => g,
        Err(e) => {
            tracing::warn!(error = %e, "cannot list active grants to switch roles");
            return;
        }
    };
    for t in switchable {
        let want = awaiting_rotation.contains(&t.name) || active.iter().any(|g| g.target == t.name);
        if known.get(&t.name) == Some(&want) {
            continue;
        }
        let r = set_login(gw, t, want).await.map(drop);
        let ok = r.is_ok();
        let why = if want {
            "a grant needs it"
        } else {
            "no grant needs it"
        };
        let reported_lately = reported_lately(failing, &t.name, now);
        match &r {
            Err(e) if reported_lately => {
                tracing::warn!(target = %t.name, error = %e, "the break-glass role still cannot be switched; retried")
            }
            _ => account_event(gw, t, want, why, r).await,
        }
        if ok {
            failing.remove(&t.name);
            known.insert(t.name.clone(), want);
        } else {
            if !reported_lately {
                failing.insert(t.name.clone(), now);
            }
            known.remove(&t.name);
        }
    }
}

/// Raises `drill_overdue` for each target whose last passed drill is older than `[drills]
/// every` (or that never passed one), at most once a day per target on this node.
async fn check_drills(
    gw: &Gateway,
    alerted: &mut std::collections::BTreeMap<String, chrono::DateTime<chrono::Utc>>,
) {
    let Some(every) = gw.config.drills_every else {
        return;
    };
    let last = match crate::report::last_passed_drills(gw.store.as_ref()).await {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the drills' outcomes");
            return;
        }
    };
    let now = clock::now();
    let every_c = chrono::Duration::from_std(every).unwrap_or(chrono::Duration::MAX);
    for t in gw.config.targets.values() {
        let passed = last.get(&t.name);
        if passed.is_some_and(|at| now - *at <= every_c) {
            alerted.remove(&t.name);
            continue;
        }
        if alerted
            .get(&t.name)
            .is_some_and(|at| now - *at < chrono::Duration::hours(24))
        {
            continue;
        }
        let mut e = AccessEvent::new(Action::DrillOverdue, "breakglass");
        e.target = Some(t.name.clone());
        e.outcome = crate::siem::Outcome::Failure;
        e.message = Some(match passed {
            Some(at) => format!(
                "the last passed drill of {} was at {}; [drills] every = {} (run `breakglass drill {}`)",
                t.name,
                clock::rfc3339(*at),
                humantime::format_duration(every),
                t.name
            ),
            None => format!(
                "{} has never passed a drill; [drills] every = {} (run `breakglass drill {}`)",
                t.name,
                humantime::format_duration(every),
                t.name
            ),
        });
        if let Err(err) = gw.audit(&e).await {
            tracing::error!(error = %err, "could not write the drill_overdue event");
            continue;
        }
        alerted.insert(t.name.clone(), now);
    }
}

/// Forgets what this node set for a target whose role is not in that state any more.
async fn recheck_roles(gw: &Gateway, known: &mut std::collections::BTreeMap<String, bool>) {
    let names: Vec<(String, bool)> = known.iter().map(|(k, v)| (k.clone(), *v)).collect();
    for (name, set) in names {
        let Some(t) = gw.config.targets.get(&name) else {
            continue;
        };
        match can_login(gw, t).await {
            Ok(now) if now == set => {}
            Ok(_) => {
                tracing::warn!(target = %name, "the break-glass role was switched outside the gateway; switching it back");
                known.remove(&name);
            }
            Err(e) => {
                tracing::warn!(target = %name, error = %e, "cannot read the break-glass role's state")
            }
        }
    }
}

/// Rotates after every ended grant; checks every two seconds, retries failures, and raises an
/// alert-worthy event when the window is missed.
pub async fn worker(gw: Arc<Gateway>) {
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    let mut roles = std::collections::BTreeMap::new();
    let mut failing_roles = std::collections::BTreeMap::new();
    let mut passes: u64 = 0;
    let mut drill_alerts = std::collections::BTreeMap::new();
    loop {
        tick.tick().await;
        passes += 1;
        // About every 30 s, what the targets say wins over what this node last set, so a
        // role switched by hand is put right (and that shows on the record).
        if passes % 15 == 0 {
            recheck_roles(&gw, &mut roles).await;
        }
        // Drills: at the first pass and every 10 minutes.
        if passes % 300 == 1 {
            check_drills(&gw, &mut drill_alerts).await;
        }
        // One node rotates for the cluster: two rotating one target at once would leave the
        // target and the vault with different passwords.
        if !gw.membership.is_leader() {
            roles.clear();
            continue;
        }
        let now = clock::now();
        let grants = match gw.store.grants_to_rotate(now).await {
            Ok(g) => g,
            Err(e) => {
                tracing::warn!(error = %e, "rotation check failed");
                continue;
            }
        };
        // One rotation per target covers every grant of it that ended.
        let mut done: std::collections::BTreeMap<String, Result<String, String>> =
            Default::default();
        for g in grants {
            let Some(t) = gw.config.targets.get(&g.target) else {
                let _ = gw
                    .store
                    .rotation_done(&g.id, &g.target, "target no longer configured", now)
                    .await;
                continue;
            };
            let outcome = match done.get(&t.name) {
                Some(o) => o.clone(),
                None => {
                    let o = match (t.protocol, &t.auth) {
                        (Protocol::Postgres, _) => rotate_pg(&gw, t)
                            .await
                            .map(|_| "password rotated".to_string())
                            .map_err(|e| e.to_string()),
                        (Protocol::Ssh, UpstreamAuth::Certificate) => {
                            Ok("nothing to rotate: per-session certificates expired".to_string())
                        }
                        (Protocol::Ssh, UpstreamAuth::Key(_)) => rotate_ssh_key(&gw, t)
                            .await
                            .map(|_| "gateway-held SSH key replaced".to_string())
                            .map_err(|e| e.to_string()),
                    };
                    done.insert(t.name.clone(), o.clone());
                    o
                }
            };
            let ended = g.revoked_at.unwrap_or(g.expires_at);
            let late =
                (now - ended).to_std().unwrap_or(Duration::ZERO) > gw.config.limits.rotation_window;
            match outcome {
                Ok(what) => {
                    if let Err(e) = gw.store.rotation_done(&g.id, &g.target, &what, now).await {
                        tracing::error!(error = %e, "could not record rotation");
                        continue;
                    }
                    let mut e = AccessEvent::new(Action::CredentialRotated, "breakglass");
                    e.person = Some(g.person.clone());
                    e.target = Some(g.target.clone());
                    e.grant_id = Some(g.id.clone());
                    e.correlation_id = Some(g.correlation_id().to_string());
                    e.incident_id = Some(g.incident_id.clone());
                    e.message = Some(format!("{} after grant {} ended: {what}", g.target, g.id));
                    if let Err(err) = gw.audit(&e).await {
                        tracing::error!(error = %err, "could not write rotation event");
                    }
                }
                Err(why) => {
                    tracing::error!(target = %g.target, grant_id = %g.id, error = %why, late, "rotation failed; will retry");
                    if late {
                        let mut e = AccessEvent::new(Action::CredentialRotated, "breakglass");
                        e.outcome = crate::siem::Outcome::Failure;
                        e.side = Some(crate::grant::Side::Upstream);
                        e.target = Some(g.target.clone());
                        e.grant_id = Some(g.id.clone());
                        e.correlation_id = Some(g.correlation_id().to_string());
                        e.message = Some(format!("rotation of {} is overdue: {why}", g.target));
                        let _ = gw.audit(&e).await;
                    }
                }
            }
        }
        // A grant that ended was live, so its role was switched on, perhaps by another node
        // (approvals switch it on wherever they happen): set each such target afresh.
        for t in done.keys() {
            roles.remove(t);
        }
        // A target whose rotation failed keeps its role on: the retry logs in as it.
        let awaiting = done
            .iter()
            .filter(|(_, o)| o.is_err())
            .map(|(t, _)| t.clone())
            .collect();
        keep_roles(&gw, &mut roles, &mut failing_roles, &awaiting, now).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn a_role_switch_that_keeps_failing_is_reported_once_per_ten_minutes() {
        let t0 = chrono::Utc
            .timestamp_opt(1_700_000_000, 0)
            .single()
            .expect("ts");
        let mut failing = std::collections::BTreeMap::new();
        assert!(
            !reported_lately(&failing, "db", t0),
            "the first failure is reported"
        );
        failing.insert("db".to_string(), t0);
        for secs in [2, 4, 599] {
            assert!(
                reported_lately(&failing, "db", t0 + chrono::Duration::seconds(secs)),
                "not again after {secs} s"
            );
        }
        assert!(!reported_lately(
            &failing,
            "db",
            t0 + chrono::Duration::seconds(600)
        ));
        assert!(!reported_lately(&failing, "other", t0));
    }
}
