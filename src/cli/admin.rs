//! Keys and administration: `keys show`/`keys rotate-signing`, `check-config`, `siem`, `vault`.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use breakglass::clock;
use breakglass::config::Config;
use breakglass::siem::{AccessEvent, Action, Siem};
use breakglass::storage::RecordingStore;

use super::output::{print_rows, Format};
use super::{open_state, operator, ClusterCmd, SiemCmd, VaultCmd};

/// The signing trust chain as `verify --public-key` reads it: pinned keys, then each rotation
/// certificate. Keys found in the key directory but not trusted appear only as comments (and
/// a warning), so a file made from this output never trusts them.
pub(super) fn signing_chain(cfg: &Config) -> Result<String> {
    let trust = cfg.signing.trust(&cfg.keys_dir)?;
    let mut out = String::from(
        "# manifest signing keys `breakglass verify` trusts (verify --public-key FILE):\n# pinned keys, then rotation certificates, each signed by the key before it\n",
    );
    for k in &trust.pinned {
        out.push_str(&format!("# pinned: key {}\n{}\n", k.id, k.line()));
    }
    for c in &trust.chain {
        out.push_str(&format!(
            "# key {} certified by key {} at {}\n{}\n",
            c.key.id,
            c.signed_by,
            c.issued_at,
            c.line()
        ));
    }
    for w in untrusted_key_warnings(cfg, &trust) {
        out.push_str(&format!("# NOT TRUSTED: {w}\n"));
        eprintln!("warning: {w}");
    }
    for w in &trust.warnings {
        eprintln!("warning: {w}");
    }
    Ok(out)
}

/// One sentence per key file in `<keys_dir>/signing/` that nothing trusts.
pub(super) fn untrusted_key_warnings(
    cfg: &Config,
    trust: &breakglass::signing::TrustSet,
) -> Vec<String> {
    let dir = breakglass::signing::key_dir(&cfg.keys_dir);
    breakglass::signing::found_keys(&cfg.keys_dir)
        .into_iter()
        .filter(|k| !trust.trusts(&k.id))
        .map(|k| {
            format!(
                "signing key {} in {} is not trusted (not pinned in [signing], no valid rotation certificate from a trusted key): it is never used to verify, and what it signed verifies as TAMPERED",
                k.id,
                dir.display()
            )
        })
        .collect()
}

/// `keys rotate-signing`: a new key certified by the newest trusted one, announced to the SIEM.
pub(super) async fn rotate_signing(config: &Path) -> Result<ExitCode> {
    let cfg = Config::load(config)?;
    let trust = cfg.signing.trust(&cfg.keys_dir)?;
    let current = breakglass::signing::Signer::load_or_create_pinned(
        &cfg.keys_dir,
        &cfg.signing.trusted_keys_file,
    )?
    .use_trusted(&trust)?;
    let previous = current.current_public.id.clone();
    let store = open_state(&cfg).await?;
    let siem = std::sync::Arc::new(Siem::open_for(&cfg, &*store).await?);
    let (s, cert) = breakglass::signing::Signer::rotate_from(&cfg.keys_dir, current)?;
    let by = operator();
    let mut e = AccessEvent::new(Action::SigningKeyRotated, &by);
    e.signing_key_id = Some(cert.key.id.clone());
    e.previous_signing_key_id = Some(previous.clone());
    e.message = Some(format!(
        "{by} rotated the manifest signing key: key {} is certified by key {previous} ({})",
        cert.key.id, cert.issued_at
    ));
    breakglass::siem::audit(&siem, &*store, &e)
        .await
        .with_context(|| {
            format!(
                "key {} was created and certified, but the SIEM event could not be written",
                cert.key.id
            )
        })?;
    // Kept with the evidence too (write-once), so offline verification finds the chain.
    let key = breakglass::storage::key::signing_certificate(&cert.key.id);
    match RecordingStore::from_config(&cfg) {
        Ok(rec) => {
            if let Err(err) = rec
                .put_new(&key, bytes::Bytes::from(cert.line() + "\n"))
                .await
            {
                eprintln!("warning: the certificate is in {} but could not be stored as {key}: {err}; `keys show --signing` prints it", breakglass::signing::key_dir(&cfg.keys_dir).display());
            }
        }
        Err(err) => eprintln!("warning: the certificate could not be stored as {key}: {err}"),
    }
    println!("{}", cert.key.line());
    println!("{}", cert.line());
    eprintln!(
        "new manifests are signed with key {} (certified by {previous}) after the gateway's next start; {} key(s) kept for verification",
        cert.key.id,
        s.all.len()
    );
    Ok(ExitCode::SUCCESS)
}

/// `keys init`: creates the missing long-lived keys of `keys_dir` and names each file.
pub(super) fn keys_init(config: &Path) -> Result<ExitCode> {
    let cfg = Config::load(config)?;
    let before = breakglass::server::identity_missing(&cfg);
    breakglass::keys::GatewayKeys::load_or_create(&cfg.keys_dir)?;
    breakglass::signing::Signer::load_or_create_pinned(
        &cfg.keys_dir,
        &cfg.signing.trusted_keys_file,
    )?;
    if let breakglass::config::KekSource::File(_) = &cfg.kek {
        breakglass::vault::kek(&cfg.kek)?;
    }
    for m in &before {
        println!("created: {}", m.trim_end_matches(" is missing"));
    }
    if before.is_empty() {
        println!("every key exists already in {}", cfg.keys_dir.display());
    }
    println!(
        "keys_dir {}: give every node of a cluster this same directory (read-only), e.g. as a Kubernetes Secret",
        cfg.keys_dir.display()
    );
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn check_config(file: &Path, offline: bool) -> Result<ExitCode> {
    let cfg = match Config::load(file) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("breakglass: {}: {e}", file.display());
            return Ok(ExitCode::from(1));
        }
    };
    println!(
        "config {}: valid ({} people, {} targets)",
        file.display(),
        cfg.people.len(),
        cfg.targets.len()
    );
    if offline {
        return Ok(ExitCode::SUCCESS);
    }
    let mut failed = false;
    let mut check = |what: String, res: Result<String>| match res {
        Ok(detail) => println!("  ok    {what}{detail}"),
        Err(e) => {
            failed = true;
            println!("  FAIL  {what}: {e:#}");
        }
    };
    let mut warnings = Vec::new();
    check(
        "files named by the config".into(),
        cfg.build()
            .and_then(|b| breakglass::server::pg_client_tls(&b).map(|_| b))
            .map(|b| {
                warnings.extend(b.warnings);
                String::new()
            })
            .map_err(Into::into),
    );
    if cfg.is_cluster() {
        let missing = breakglass::server::identity_missing(&cfg);
        check(
            format!("cluster identity {}", cfg.keys_dir.display()),
            if missing.is_empty() {
                Ok(" (loaded, never generated)".into())
            } else {
                Err(anyhow::anyhow!(
                    "{}: a cluster node would generate its own, so nodes would disagree; run `breakglass keys init` once and give every node this keys_dir",
                    missing.join("; ")
                ))
            },
        );
    }
    let mut signing_warnings = Vec::new();
    check(
        format!(
            "manifest signing trust ([signing], {})",
            cfg.signing.trusted_keys_file.display()
        ),
        cfg.signing
            .trust(&cfg.keys_dir)
            .map(|t| {
                signing_warnings.extend(t.warnings.iter().cloned());
                signing_warnings.extend(untrusted_key_warnings(&cfg, &t));
                let found = breakglass::signing::found_keys(&cfg.keys_dir);
                if t.keys().is_empty() && !found.is_empty() {
                    signing_warnings.push("none of the signing keys is trusted: the gateway will not start; pin one in [signing] trusted_keys or trusted_keys_file".into());
                }
                if t.keys().is_empty() {
                    " (no key yet: the first one is pinned when the gateway creates it)".into()
                } else {
                    format!(
                        " ({} trusted: {})",
                        t.keys().len(),
                        t.keys()
                            .iter()
                            .map(|k| k.id.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                }
            })
            .map_err(Into::into),
    );
    warnings.extend(signing_warnings);
    check(
        format!("data dir {}", cfg.data_dir.display()),
        writable(&cfg.data_dir).map(|_| String::new()),
    );
    match &cfg.s3 {
        None => check(
            format!("recording store {}", cfg.storage_dir.display()),
            writable(&cfg.storage_dir).map(|_| String::new()),
        ),
        Some(s3) => {
            let res = match RecordingStore::from_config(&cfg) {
                Ok(store) => breakglass::server::check_worm(s3, &store)
                    .await
                    .map(|_| " (Object Lock enforced)".to_string())
                    .map_err(anyhow::Error::from),
                Err(e) => Err(e.into()),
            };
            check(
                format!("recording store s3://{}/{}", s3.bucket, s3.prefix),
                res,
            );
        }
    }
    let switchable: Vec<_> = cfg
        .targets
        .values()
        .filter(|t| t.admin_login.is_some())
        .cloned()
        .collect();
    if !switchable.is_empty() {
        match breakglass::server::Gateway::build(cfg.clone()).await {
            Ok(gw) => {
                for t in &switchable {
                    let res = breakglass::rotation::check_switch(&gw, t).await;
                    check(
                        match t.protocol {
                            breakglass::config::Protocol::Postgres => format!(
                                "{}: {} switches {} between LOGIN and NOLOGIN",
                                t.name,
                                t.admin_login.as_deref().unwrap_or("?"),
                                t.login
                            ),
                            breakglass::config::Protocol::Ssh => format!(
                                "{}: {} puts the held key of {} into its authorized_keys and takes it out",
                                t.name,
                                t.admin_login.as_deref().unwrap_or("?"),
                                t.login
                            ),
                        },
                        res.map(|on| {
                            format!(" ({} now)", breakglass::rotation::state_tag(t, on))
                        })
                        .map_err(Into::into),
                    );
                }
            }
            Err(e) => check(
                "targets that disable their role between grants".into(),
                Err(anyhow::anyhow!(
                    "cannot open the gateway's state and vault: {e}"
                )),
            ),
        }
    }
    check(
        format!("SIEM spool {}", cfg.siem.spool.display()),
        Siem::open(cfg.siem.clone())
            .map(|_| String::new())
            .map_err(Into::into),
    );
    check(
        format!("SIEM file {}", cfg.siem_file.display()),
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&cfg.siem_file)
            .map(|_| String::new())
            .with_context(|| "cannot append".to_string()),
    );
    if let breakglass::config::StateConfig::Postgres(pg) = &cfg.state {
        let plain = pg.ca_file.is_none()
            && pg
                .url
                .resolve()
                .is_ok_and(|u| !u.contains("sslmode=require") && !u.contains("sslmode=verify"));
        if plain {
            warnings.push("the state store connection is plain TCP (no [state] ca_file, no sslmode=require): grants, the evidence ledger and the sealed vault cross the network unencrypted; set ca_file".into());
        }
    }
    check(
        format!("state store {}", breakglass::state::describe(&cfg.state)),
        breakglass::state::open(&cfg.state)
            .await
            .map(|_| String::new())
            .map_err(Into::into),
    );
    if cfg.http_listen.is_some() {
        let player = cfg.web.player_dir.join("asciinema-player.min.js");
        if player.is_file() {
            println!("  ok    web UI player {}", cfg.web.player_dir.display());
        } else {
            warnings.push(format!(
                "web UI: {} is missing, so sessions cannot be replayed in the browser; run `npm ci --prefix web` or set [web] player_dir",
                player.display()
            ));
        }
    }
    for t in cfg.targets.values() {
        if t.protocol == breakglass::config::Protocol::Postgres {
            match &t.tls {
                breakglass::config::UpstreamTls::VerifyFull(_) => {}
                breakglass::config::UpstreamTls::Require(_) => warnings.push(format!(
                    "target {}: tls = \"require\" does not check the certificate's name; prefer tls = \"verify-full\"",
                    t.name
                )),
                breakglass::config::UpstreamTls::Disable => warnings.push(format!(
                    "target {}: the break-glass login goes over plain TCP (tls = \"disable\"); set tls = \"verify-full\" and ca_file",
                    t.name
                )),
            }
            if !t.channel_binding_required && t.tls != breakglass::config::UpstreamTls::Disable {
                warnings.push(format!(
                    "target {}: channel_binding = \"prefer\" accepts a SCRAM login not bound to the certificate, so a man in the middle that strips -PLUS can relay it; use it only behind a TLS-terminating proxy",
                    t.name
                ));
            }
        }
        let addr = t.address.clone();
        let res = tokio::time::timeout(
            Duration::from_secs(3),
            tokio::net::TcpStream::connect(&addr),
        )
        .await;
        match res {
            Ok(Ok(_)) => println!("  ok    target {} reachable at {addr}", t.name),
            Ok(Err(e)) => warnings.push(format!(
                "target {} ({addr}) is not reachable now: {e}",
                t.name
            )),
            Err(_) => warnings.push(format!(
                "target {} ({addr}) did not answer within 3s",
                t.name
            )),
        }
    }
    for w in &warnings {
        println!("  WARN  {w}");
    }
    if failed {
        eprintln!("breakglass: {}: health checks failed", file.display());
        return Ok(ExitCode::from(2));
    }
    Ok(ExitCode::SUCCESS)
}

pub(super) fn writable(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| "cannot create".to_string())?;
    let probe = dir.join(format!(".breakglass-probe-{}", uuid::Uuid::new_v4()));
    std::fs::write(&probe, b"probe").with_context(|| "cannot write".to_string())?;
    std::fs::remove_file(&probe).with_context(|| "cannot remove probe file".to_string())?;
    Ok(())
}

pub(super) async fn siem(config: &Path, cmd: SiemCmd) -> Result<ExitCode> {
    let cfg = Config::load(config)?;
    let store = open_state(&cfg).await?;
    let siem = Siem::open_for(&cfg, &*store).await?;
    match cmd {
        SiemCmd::Test => {
            let mut e = AccessEvent::new(Action::SiemTest, &operator());
            e.message = Some("breakglass siem test: if you can read this, the sink works".into());
            let mut failed = 0;
            for (name, r) in siem.test(&e).await {
                let kind = siem
                    .sinks()
                    .iter()
                    .find(|s| s.name == name)
                    .map(|s| s.kind_name())
                    .unwrap_or("?");
                match r {
                    Ok(()) => println!("ok      {name} ({kind})"),
                    Err(why) => {
                        failed += 1;
                        println!("FAILED  {name} ({kind}): {why}");
                    }
                }
            }
            println!("test event id {}", e.event_id);
            Ok(if failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        SiemCmd::Status { format } => {
            let stats = siem.stats().await;
            if matches!(format, Format::Json) {
                println!("{}", serde_json::to_string_pretty(&stats)?);
                return Ok(ExitCode::SUCCESS);
            }
            print_sinks(format, &stats, siem.shared())?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The delivery figures of each sink; on a shared outbox, with the node delivering it.
fn print_sinks(format: Format, stats: &[breakglass::siem::SinkStats], shared: bool) -> Result<()> {
    let rows: Vec<Vec<String>> = stats
        .iter()
        .map(|s| {
            let worker = match (&s.worker, shared) {
                (Some(w), _) => w.clone(),
                (None, true) => "(none: the lease lapsed; any node takes it)".into(),
                (None, false) => "this node".into(),
            };
            vec![
                s.sink.clone(),
                worker,
                s.worker_until.clone().unwrap_or_default(),
                s.queued.to_string(),
                s.delivered.to_string(),
                s.failed.to_string(),
                s.dead_lettered.to_string(),
                format!("{:.1}", s.oldest_age_secs),
                s.last_error.clone().unwrap_or_default(),
            ]
        })
        .collect();
    print_rows(
        format,
        &[
            "sink",
            "worker",
            "worker_lease_until",
            "queued",
            "delivered",
            "failed",
            "dead_lettered",
            "oldest_age_s",
            "last_error",
        ],
        &rows,
    )
}

/// `cluster status`: the lease table, with the sessions each node holds.
pub(super) async fn cluster(config: &Path, cmd: ClusterCmd) -> Result<ExitCode> {
    let cfg = Config::load(config)?;
    let ClusterCmd::Status { format, sinks } = cmd;
    let store = open_state(&cfg).await?;
    let mut sink_table = None;
    if sinks || format == Format::Table {
        let siem = Siem::open_for(&cfg, &*store).await?;
        let stats = siem.stats().await;
        if sinks {
            if format == Format::Json {
                println!("{}", serde_json::to_string_pretty(&stats)?);
            } else {
                print_sinks(format, &stats, siem.shared())?;
            }
            return Ok(ExitCode::SUCCESS);
        }
        sink_table = Some((stats, siem.shared()));
    }
    let nodes = breakglass::cluster::status(&*store).await?;
    let open = store.unfinished_sessions().await?;
    let ts = |t| breakglass::clock::rfc3339(t);
    let rows: Vec<Vec<String>> = nodes
        .iter()
        .map(|n| {
            let held = open.iter().filter(|s| s.node_id == n.row.node_id).count();
            vec![
                n.row.node_id.clone(),
                n.state.to_string(),
                ts(n.row.renewed_at),
                ts(n.row.expires_at),
                n.row.live_sessions.to_string(),
                held.to_string(),
                n.row.version.clone(),
                ts(n.row.started_at),
            ]
        })
        .collect();
    print_rows(
        format,
        &[
            "node",
            "state",
            "renewed_at",
            "lease_until",
            "live_sessions",
            "open_sessions",
            "version",
            "started_at",
        ],
        &rows,
    )?;
    if let Some((stats, shared)) = sink_table {
        println!();
        print_sinks(format, &stats, shared)?;
    }
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn vault(config: &Path, cmd: VaultCmd) -> Result<ExitCode> {
    let cfg = Config::load(config)?;
    let (VaultCmd::Set { target, .. } | VaultCmd::Verify { target }) = &cmd;
    let t = cfg
        .targets
        .get(target)
        .ok_or_else(|| anyhow!("no target named `{target}`"))?
        .clone();
    let ssh_switch = matches!(cmd, VaultCmd::Verify { .. })
        && t.protocol == breakglass::config::Protocol::Ssh
        && t.admin_login.is_some();
    if ssh_switch {
        // An SSH key target kept out of authorized_keys between grants: check the switch.
        let gw = breakglass::server::Gateway::build(cfg).await?;
        let on = breakglass::rotation::check_switch(&gw, &t).await?;
        println!(
            "ok: {} can put {}'s held key into authorized_keys and take it out (it is {} now)",
            t.admin_login.as_deref().unwrap_or("?"),
            t.login,
            breakglass::rotation::state_tag(&t, on)
        );
        return Ok(ExitCode::SUCCESS);
    }
    if t.protocol != breakglass::config::Protocol::Postgres {
        bail!("{target} is not a PostgreSQL target; SSH targets use certificates or key_file");
    }
    match cmd {
        VaultCmd::Set { admin, .. } => {
            if admin && t.admin_login.is_none() {
                bail!("{target} has no admin_login (it is set with disable_between_grants = true)");
            }
            let mut pw = String::new();
            std::io::stdin().read_line(&mut pw)?;
            let pw = pw.trim_end_matches(['\r', '\n']).to_string();
            if pw.is_empty() {
                bail!("no password on standard input");
            }
            let kek = breakglass::vault::kek(&cfg.kek)?;
            let store = open_state(&cfg).await?;
            let blob = kek.seal(&t.name, &breakglass::vault::Secret::new(pw))?;
            if admin {
                store
                    .vault_put(
                        &t.name,
                        breakglass::rotation::ADMIN_SLOT,
                        &blob,
                        clock::now(),
                    )
                    .await?;
                eprintln!(
                    "stored the password of {}'s admin role {} (encrypted); it switches {} between LOGIN and NOLOGIN",
                    t.name,
                    t.admin_login.as_deref().unwrap_or("?"),
                    t.login
                );
                return Ok(ExitCode::SUCCESS);
            }
            store
                .vault_put(&t.name, "current", &blob, clock::now())
                .await?;
            eprintln!(
                "stored the break-glass password of {} (encrypted); it rotates after every grant",
                t.name
            );
            Ok(ExitCode::SUCCESS)
        }
        VaultCmd::Verify { .. } => {
            let gw = breakglass::server::Gateway::build(cfg).await?;
            if t.admin_login.is_some() {
                let on = breakglass::rotation::check_switch(&gw, &t).await?;
                println!(
                    "ok: {} can switch {} between LOGIN and NOLOGIN (it is {} now)",
                    t.admin_login.as_deref().unwrap_or("?"),
                    t.login,
                    if on { "LOGIN" } else { "NOLOGIN" }
                );
                if !on {
                    // Between grants the role cannot log in: nothing more to check.
                    return Ok(ExitCode::SUCCESS);
                }
            }
            match breakglass::rotation::verify_pg(&gw, &t).await? {
                breakglass::rotation::Verified::Current => println!(
                    "ok: the vault's password for {} logs in as {}",
                    t.name, t.login
                ),
                breakglass::rotation::Verified::Pending => println!(
                    "ok: the vault's pending password for {} logs in as {} (a rotation is in flight or was cut short; the next rotation promotes it)",
                    t.name, t.login
                ),
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
