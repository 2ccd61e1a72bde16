//! The operator's and auditor's commands: serve, check-config, grant, sessions, replay,
//! export, events, access-review, report, audit-export, vault, siem, verify, keys.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use breakglass::config::Config;
use breakglass::record::{asciicast, export};
use breakglass::siem::{AccessEvent, Action, Siem};
use breakglass::state::{NewGrant, SessionFilter, SqliteStore, Store};
use breakglass::storage::RecordingStore;
use breakglass::{clock, keys, text};
use chrono::{DateTime, Utc};
use clap::{Parser, Subcommand, ValueEnum};

/// Break-glass access gateway: time-boxed, recorded SSH sessions.
#[derive(Parser, Debug)]
#[command(name = "breakglass", version)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the gateway.
    Serve {
        #[arg(long, short, env = "BREAKGLASS_CONFIG")]
        config: PathBuf,
    },
    /// Validate a config file and check that what it names is usable.
    CheckConfig {
        file: PathBuf,
        /// Only validate; do not touch files or the network.
        #[arg(long)]
        offline: bool,
    },
    /// Operator grants (bootstrap; requests and approvals come later).
    Grant {
        #[arg(
            long,
            short,
            env = "BREAKGLASS_CONFIG",
            global = true,
            default_value = "config/breakglass.toml"
        )]
        config: PathBuf,
        #[command(subcommand)]
        cmd: GrantCmd,
    },
    /// The session index.
    Sessions {
        #[arg(
            long,
            short,
            env = "BREAKGLASS_CONFIG",
            global = true,
            default_value = "config/breakglass.toml"
        )]
        config: PathBuf,
        #[command(subcommand)]
        cmd: SessionsCmd,
    },
    /// Play a recorded channel in this terminal.
    Replay {
        session: String,
        #[arg(
            long,
            short,
            env = "BREAKGLASS_CONFIG",
            default_value = "config/breakglass.toml"
        )]
        config: PathBuf,
        /// Channel number; default: the first with a pty.
        #[arg(long)]
        channel: Option<u32>,
        /// Playback speed factor.
        #[arg(long, default_value_t = 1.0)]
        speed: f64,
        /// Cap pauses at this many seconds.
        #[arg(long)]
        idle_limit: Option<f64>,
    },
    /// Write a recorded channel as one asciicast v2 file.
    Export {
        session: String,
        #[arg(
            long,
            short,
            env = "BREAKGLASS_CONFIG",
            default_value = "config/breakglass.toml"
        )]
        config: PathBuf,
        #[arg(short, long)]
        output: PathBuf,
        #[arg(long)]
        channel: Option<u32>,
    },
    /// Every recorded event of one incident (request, approvals, grant, sessions), oldest first.
    Events {
        #[arg(
            long,
            short,
            env = "BREAKGLASS_CONFIG",
            default_value = "config/breakglass.toml"
        )]
        config: PathBuf,
        /// The correlation id: a request id (R-...), or a grant id for operator grants.
        #[arg(long)]
        correlation: String,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Quarterly access review: accounts and custodians, who may request and approve, the
    /// grants in the period, and keys unused for 90 days.
    AccessReview {
        #[arg(
            long,
            short,
            env = "BREAKGLASS_CONFIG",
            default_value = "config/breakglass.toml"
        )]
        config: PathBuf,
        /// Start of the period: RFC 3339, a date, or an age like 90d.
        #[arg(long, default_value = "90d")]
        since: String,
    },
    /// Break-glass metrics for a period: totals, one row per system, one row per day, week
    /// or month (empty ones included), and how many sessions started outside the
    /// `[reports] maintenance_windows`.
    ///
    /// `--format csv` prints one tidy CSV: a `section` column says whether a row is the
    /// `total`, a `system` or a `period`; columns that do not apply to a section are empty.
    Report {
        #[arg(
            long,
            short,
            env = "BREAKGLASS_CONFIG",
            default_value = "config/breakglass.toml"
        )]
        config: PathBuf,
        /// Start of the period: RFC 3339, a date, or an age like 90d.
        #[arg(long, default_value = "90d")]
        since: String,
        /// End of the period (default: now).
        #[arg(long)]
        until: Option<String>,
        /// Bucket width of the per-period rows (weeks start on Monday, UTC).
        #[arg(long, default_value = "week", value_parser = parse_period)]
        period: breakglass::report::Period,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Export every session of a period with its grant, incident, approvers and review for
    /// auditors, next to a manifest signed by the gateway: writes `<file>`, `manifest.json`
    /// and `manifest.json.sig` into --out (never overwriting). `audit-export verify DIR`
    /// checks one: exit 0 OK, 3 TAMPERED, 1 error.
    AuditExport {
        #[arg(
            long,
            short,
            env = "BREAKGLASS_CONFIG",
            global = true,
            default_value = "config/breakglass.toml"
        )]
        config: PathBuf,
        /// Start of the period: RFC 3339, a date, or an age like 30d.
        #[arg(long, default_value = "30d")]
        since: String,
        /// End of the period (default: now).
        #[arg(long)]
        until: Option<String>,
        #[arg(long, value_enum, default_value_t = ExportFormatArg::Json)]
        format: ExportFormatArg,
        /// Directory to write the export into (created if needed).
        #[arg(long)]
        out: Option<PathBuf>,
        #[command(subcommand)]
        cmd: Option<AuditExportCmd>,
    },
    /// Break-glass credentials the gateway holds (encrypted under the KEK).
    Vault {
        #[arg(
            long,
            short,
            env = "BREAKGLASS_CONFIG",
            global = true,
            default_value = "config/breakglass.toml"
        )]
        config: PathBuf,
        #[command(subcommand)]
        cmd: VaultCmd,
    },
    /// SIEM delivery: test each sink, or show the spool's backlog per sink.
    Siem {
        #[arg(
            long,
            short,
            env = "BREAKGLASS_CONFIG",
            global = true,
            default_value = "config/breakglass.toml"
        )]
        config: PathBuf,
        #[command(subcommand)]
        cmd: SiemCmd,
    },
    /// Check recordings against their hash chain, signed manifest and the SIEM copy.
    ///
    /// Trusted keys: online, those of the config's `[signing]` table (`trusted_keys`, the
    /// `trusted_keys_file`) and keys certified by them through rotation certificates;
    /// offline, only `--public-key`. A key file found in `<data_dir>/keys/signing/` is never
    /// trusted by being there (verify warns about it).
    ///
    /// The chain is compared with the SIEM's session-end head and with every
    /// `recording_checkpoint` head at its object count. With a SIEM copy, `--all` also lists
    /// sessions the SIEM saw start that the store lacks, as MISSING.
    ///
    /// Exit codes: 0 OK; 1 error (verification could not run); 2 INCOMPLETE (the gateway
    /// died; intact up to chunk N); 3 TAMPERED; 4 MISSING. With several sessions, the highest
    /// code of any session.
    Verify {
        /// Session id (or unique prefix; an ambiguous prefix is an error).
        session: Option<String>,
        #[arg(
            long,
            short,
            env = "BREAKGLASS_CONFIG",
            default_value = "config/breakglass.toml"
        )]
        config: PathBuf,
        /// Every session (with --since, those started since then).
        #[arg(long)]
        all: bool,
        #[arg(long)]
        since: Option<String>,
        /// Offline: a recording store directory (a copy of the recordings), no config needed.
        #[arg(long, requires = "public_key")]
        store: Option<PathBuf>,
        /// The signing keys to trust, and rotation certificates (`breakglass keys show
        /// --signing`, checked by you). Required offline; online it replaces `[signing]`.
        #[arg(long)]
        public_key: Option<PathBuf>,
        /// A SIEM JSONL copy (seed format) to cross-check chain heads and checkpoints and to
        /// find missing sessions (default online: the configured SIEM file and its rotations).
        #[arg(long)]
        siem: Option<PathBuf>,
    },
    /// The gateway's public keys.
    Keys {
        #[arg(
            long,
            short,
            env = "BREAKGLASS_CONFIG",
            global = true,
            default_value = "config/breakglass.toml"
        )]
        config: PathBuf,
        #[command(subcommand)]
        cmd: KeysCmd,
    },
}

#[derive(Subcommand, Debug)]
enum GrantCmd {
    /// Grant a person time-boxed access to a target.
    Add {
        #[arg(long)]
        person: String,
        #[arg(long)]
        target: String,
        /// How long, e.g. 30m or 2h (default: limits.default_grant_ttl).
        #[arg(long = "for")]
        duration: Option<String>,
        #[arg(long)]
        reason: String,
        #[arg(long)]
        incident: String,
    },
    /// List grants.
    List {
        /// Include expired and revoked grants.
        #[arg(long)]
        all: bool,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Revoke a grant; its live sessions end within a second.
    Revoke {
        id: String,
        #[arg(long, default_value = "revoked by operator")]
        reason: String,
    },
}

#[derive(Subcommand, Debug)]
enum SessionsCmd {
    /// List sessions, newest first.
    List {
        #[arg(long)]
        person: Option<String>,
        #[arg(long)]
        target: Option<String>,
        /// RFC 3339 time, a date (YYYY-MM-DD) or an age like 2h or 7d.
        #[arg(long)]
        since: Option<String>,
        #[arg(long)]
        until: Option<String>,
        #[arg(long)]
        limit: Option<u32>,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
}

#[derive(Subcommand, Debug)]
enum AuditExportCmd {
    /// Check an export directory: the manifest's signature and the content's SHA-256.
    /// Exit 0 OK, 3 TAMPERED, 1 error.
    Verify {
        dir: PathBuf,
        /// Offline: the signing public keys (`breakglass keys show --signing`) instead of
        /// the gateway's key directory.
        #[arg(long)]
        public_key: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum ExportFormatArg {
    Json,
    Csv,
}

fn parse_period(s: &str) -> Result<breakglass::report::Period, String> {
    s.parse()
}

#[derive(Subcommand, Debug)]
enum SiemCmd {
    /// Send a `siem_test` event straight to every sink and report each result (exit 1 if
    /// any failed). The event does not go through the spool.
    Test,
    /// Queued, delivered and failed events and the oldest undelivered age, per sink.
    Status {
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
}

#[derive(Subcommand, Debug)]
enum VaultCmd {
    /// Store a PostgreSQL target's break-glass password, read from standard input.
    Set { target: String },
    /// Check that the stored password logs in to the target.
    Verify { target: String },
}

#[derive(Subcommand, Debug)]
enum KeysCmd {
    /// Print the host key (known_hosts), the user CA (TrustedUserCAKeys) and the manifest
    /// signing keys (for `verify --public-key`).
    Show {
        /// Print only the user CA public key line.
        #[arg(long)]
        ca: bool,
        /// Print only the signing trust chain (the pinned keys, then each rotation
        /// certificate), the file `verify --public-key` reads.
        #[arg(long)]
        signing: bool,
    },
    /// Start signing with a new key, certified by the current one (the certificate is kept
    /// and announced to the SIEM as `signing_key_rotated`); older keys keep verifying older
    /// recordings. A running gateway signs with the new key after its next start.
    RotateSigning,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum Format {
    Table,
    Json,
    Csv,
}

/// Runs one command.
pub async fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Serve { config } => {
            let cfg = Config::load(&config)?;
            breakglass::server::run(cfg, shutdown_signal()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::CheckConfig { file, offline } => check_config(&file, offline).await,
        Command::Grant { config, cmd } => grant(&config, cmd).await,
        Command::Sessions { config, cmd } => sessions(&config, cmd).await,
        Command::Replay {
            session,
            config,
            channel,
            speed,
            idle_limit,
        } => replay(&config, &session, channel, speed, idle_limit).await,
        Command::Export {
            session,
            config,
            output,
            channel,
        } => export_cmd(&config, &session, &output, channel).await,
        Command::Events {
            config,
            correlation,
            format,
        } => {
            let cfg = Config::load(&config)?;
            let store = open_state(&cfg)?;
            let events = store.events(&correlation).await?;
            if format == Format::Json {
                let v: Vec<serde_json::Value> = events
                    .iter()
                    .map(|e| {
                        serde_json::json!({
                            "correlation_id": e.correlation_id, "event_type": e.event_type,
                            "event_data": e.event_data, "actor": e.actor,
                            "created_at": clock::rfc3339(e.created_at),
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                let rows: Vec<Vec<String>> = events
                    .iter()
                    .map(|e| {
                        vec![
                            clock::rfc3339(e.created_at),
                            e.event_type.clone(),
                            e.actor.clone(),
                            e.event_data["message"].as_str().unwrap_or("").to_string(),
                        ]
                    })
                    .collect();
                print_rows(
                    format,
                    &["created_at", "event_type", "actor", "message"],
                    &rows,
                )?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::AccessReview { config, since } => access_review(&config, &since).await,
        Command::Report {
            config,
            since,
            until,
            period,
            format,
        } => report(&config, &since, until.as_deref(), period, format).await,
        Command::AuditExport {
            config,
            since,
            until,
            format,
            out,
            cmd,
        } => match cmd {
            Some(AuditExportCmd::Verify { dir, public_key }) => {
                if out.is_some() || until.is_some() {
                    bail!("`audit-export verify DIR` takes no --out or --until: it checks DIR");
                }
                audit_export_verify(&config, &dir, public_key.as_deref())
            }
            None => {
                let out = out.ok_or_else(|| anyhow!("--out DIR is required"))?;
                let format = match format {
                    ExportFormatArg::Json => breakglass::audit_export::ExportFormat::Json,
                    ExportFormatArg::Csv => breakglass::audit_export::ExportFormat::Csv,
                };
                audit_export(&config, &since, until.as_deref(), format, &out).await
            }
        },
        Command::Vault { config, cmd } => vault(&config, cmd).await,
        Command::Siem { config, cmd } => siem(&config, cmd).await,
        Command::Verify {
            session,
            config,
            all,
            since,
            store,
            public_key,
            siem,
        } => verify(&config, session, all, since, store, public_key, siem).await,
        Command::Keys { config, cmd } => match cmd {
            KeysCmd::RotateSigning => rotate_signing(&config).await,
            KeysCmd::Show { ca, signing } => {
                let cfg = Config::load(&config)?;
                let k = keys::GatewayKeys::load_or_create(&cfg.data_dir)?;
                breakglass::signing::Signer::load_or_create_pinned(
                    &cfg.data_dir,
                    &cfg.signing.trusted_keys_file,
                )?;
                if ca {
                    println!("{}", keys::openssh_line(k.user_ca.public_key()));
                } else if signing {
                    print!("{}", signing_chain(&cfg)?);
                } else {
                    print!("{}", signing_chain(&cfg)?);
                    println!("# host key (clients pin it in known_hosts)");
                    println!("{}", keys::openssh_line(k.host.public_key()));
                    println!("# user CA (targets trust it with TrustedUserCAKeys)");
                    println!("{}", keys::openssh_line(k.user_ca.public_key()));
                }
                Ok(ExitCode::SUCCESS)
            }
        },
    }
}

/// The signing trust chain as `verify --public-key` reads it: pinned keys, then each rotation
/// certificate. Keys found in the key directory but not trusted appear only as comments (and
/// a warning), so a file made from this output never trusts them.
fn signing_chain(cfg: &Config) -> Result<String> {
    let trust = cfg.signing.trust(&cfg.data_dir)?;
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

/// One sentence per key file in `<data_dir>/keys/signing/` that nothing trusts.
fn untrusted_key_warnings(cfg: &Config, trust: &breakglass::signing::TrustSet) -> Vec<String> {
    let dir = breakglass::signing::key_dir(&cfg.data_dir);
    breakglass::signing::found_keys(&cfg.data_dir)
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
async fn rotate_signing(config: &Path) -> Result<ExitCode> {
    let cfg = Config::load(config)?;
    let trust = cfg.signing.trust(&cfg.data_dir)?;
    let current = breakglass::signing::Signer::load_or_create_pinned(
        &cfg.data_dir,
        &cfg.signing.trusted_keys_file,
    )?
    .use_trusted(&trust)?;
    let previous = current.current_public.id.clone();
    let store = open_state(&cfg)?;
    let siem = std::sync::Arc::new(Siem::open(cfg.siem.clone())?);
    let (s, cert) = breakglass::signing::Signer::rotate_from(&cfg.data_dir, current)?;
    let by = operator();
    let mut e = AccessEvent::new(Action::SigningKeyRotated, &by);
    e.signing_key_id = Some(cert.key.id.clone());
    e.previous_signing_key_id = Some(previous.clone());
    e.message = Some(format!(
        "{by} rotated the manifest signing key: key {} is certified by key {previous} ({})",
        cert.key.id, cert.issued_at
    ));
    breakglass::siem::audit(&siem, &store, &e)
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
                eprintln!("warning: the certificate is in {} but could not be stored as {key}: {err}; `keys show --signing` prints it", breakglass::signing::key_dir(&cfg.data_dir).display());
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

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

async fn check_config(file: &Path, offline: bool) -> Result<ExitCode> {
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
    let mut signing_warnings = Vec::new();
    check(
        format!(
            "manifest signing trust ([signing], {})",
            cfg.signing.trusted_keys_file.display()
        ),
        cfg.signing
            .trust(&cfg.data_dir)
            .map(|t| {
                signing_warnings.extend(t.warnings.iter().cloned());
                signing_warnings.extend(untrusted_key_warnings(&cfg, &t));
                let found = breakglass::signing::found_keys(&cfg.data_dir);
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
    check(
        format!("state store {}", cfg.state_path().display()),
        SqliteStore::open(&cfg.state_path())
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

fn writable(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| "cannot create".to_string())?;
    let probe = dir.join(format!(".breakglass-probe-{}", uuid::Uuid::new_v4()));
    std::fs::write(&probe, b"probe").with_context(|| "cannot write".to_string())?;
    std::fs::remove_file(&probe).with_context(|| "cannot remove probe file".to_string())?;
    Ok(())
}

fn open_state(cfg: &Config) -> Result<SqliteStore> {
    Ok(SqliteStore::open(&cfg.state_path())?)
}

/// Who runs this command, as the OS says: `operator:NAME`, the user name of the real uid in
/// `/etc/passwd` (or `operator:uid:N` without an entry). Under sudo (effective uid 0) the
/// invoking user's `SUDO_UID` names the operator; sudo sets it, and whoever is root could
/// name anyone anyway. `USER` and `SUDO_USER` are never read: anyone can set them.
fn operator() -> String {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let sudo_uid = std::env::var("SUDO_UID").ok();
    operator_from(&status, &passwd, sudo_uid.as_deref())
}

/// The pure part of [`operator`]: `/proc/self/status` and `/etc/passwd` as text.
fn operator_from(status: &str, passwd: &str, sudo_uid: Option<&str>) -> String {
    let Some((real, effective)) = status_uids(status) else {
        return "operator:unknown".into();
    };
    let uid = match sudo_uid.and_then(|u| u.trim().parse::<u32>().ok()) {
        Some(u) if effective == 0 => u,
        _ => real,
    };
    match passwd_name(passwd, uid) {
        Some(name) => format!("operator:{}", text::terminal(name)),
        None => format!("operator:uid:{uid}"),
    }
}

/// The real and effective uid from the `Uid:` line of `/proc/<pid>/status`.
fn status_uids(status: &str) -> Option<(u32, u32)> {
    let line = status.lines().find_map(|l| l.strip_prefix("Uid:"))?;
    let mut ids = line.split_whitespace().map(|v| v.parse::<u32>().ok());
    Some((ids.next()??, ids.next()??))
}

/// The first user name with `uid` in `/etc/passwd` text.
fn passwd_name(passwd: &str, uid: u32) -> Option<&str> {
    passwd.lines().find_map(|l| {
        let mut f = l.split(':');
        let name = f.next()?;
        let _password = f.next()?;
        (f.next()?.parse::<u32>().ok()? == uid && !name.is_empty()).then_some(name)
    })
}

async fn grant(config: &Path, cmd: GrantCmd) -> Result<ExitCode> {
    let cfg = Config::load(config)?;
    let store = open_state(&cfg)?;
    let siem = std::sync::Arc::new(Siem::open(cfg.siem.clone())?);
    match cmd {
        GrantCmd::Add {
            person,
            target,
            duration,
            reason,
            incident,
        } => {
            if !cfg.people.contains_key(&person) {
                bail!("no person named `{person}` in {}", config.display());
            }
            if !cfg.targets.contains_key(&target) {
                bail!("no target named `{target}` in {}", config.display());
            }
            if reason.trim().is_empty() || incident.trim().is_empty() {
                bail!("--reason and --incident must not be empty");
            }
            text::check("--reason", &reason, text::Lines::One).map_err(|e| anyhow!(e))?;
            text::check("--incident", &incident, text::Lines::One).map_err(|e| anyhow!(e))?;
            let ttl = match duration {
                Some(d) => humantime::parse_duration(&d)
                    .with_context(|| format!("--for `{d}` is not a duration like 30m"))?,
                None => cfg.limits.default_grant_ttl,
            };
            if ttl.is_zero() || ttl > cfg.limits.max_grant_ttl {
                bail!(
                    "--for must be more than zero and at most {} (limits.max_grant_ttl)",
                    humantime::format_duration(cfg.limits.max_grant_ttl)
                );
            }
            let now = clock::now();
            let g = store
                .create_grant(NewGrant {
                    person,
                    target,
                    reason,
                    incident_id: incident,
                    created_by: operator(),
                    created_at: now,
                    expires_at: now + chrono::Duration::from_std(ttl)?,
                })
                .await?;
            let mut e = AccessEvent::new(Action::GrantCreated, &g.created_by);
            e.person = Some(g.person.clone());
            e.target = Some(g.target.clone());
            e.grant_id = Some(g.id.clone());
            e.correlation_id = Some(g.id.clone());
            e.justification = Some(g.reason.clone());
            e.incident_id = Some(g.incident_id.clone());
            e.deadline = Some(clock::rfc3339(g.expires_at));
            e.message = Some(format!(
                "{} granted {} access to {}",
                g.created_by, g.person, g.target
            ));
            breakglass::siem::audit(&siem, &store, &e).await?;
            println!("{}", g.id);
            eprintln!(
                "granted {} access to {} until {}",
                g.person,
                g.target,
                clock::rfc3339(g.expires_at)
            );
            Ok(ExitCode::SUCCESS)
        }
        GrantCmd::List { all, format } => {
            let now = clock::now();
            let grants = store
                .list_grants(if all { None } else { Some(now) })
                .await?;
            let rows: Vec<Vec<String>> = grants
                .iter()
                .map(|g| {
                    vec![
                        g.id.clone(),
                        g.person.clone(),
                        g.target.clone(),
                        format!("{:?}", g.state_at(now)).to_lowercase(),
                        clock::rfc3339(g.expires_at),
                        g.incident_id.clone(),
                        g.reason.clone(),
                    ]
                })
                .collect();
            print_rows(
                format,
                &[
                    "id",
                    "person",
                    "target",
                    "state",
                    "expires_at",
                    "incident_id",
                    "reason",
                ],
                &rows,
            )?;
            Ok(ExitCode::SUCCESS)
        }
        GrantCmd::Revoke { id, reason } => {
            text::check("--reason", &reason, text::Lines::One).map_err(|e| anyhow!(e))?;
            let by = operator();
            let g = store.revoke_grant(&id, &by, &reason, clock::now()).await?;
            let mut e = AccessEvent::new(Action::GrantRevoked, &by);
            e.person = Some(g.person.clone());
            e.target = Some(g.target.clone());
            e.grant_id = Some(g.id.clone());
            e.correlation_id = Some(g.id.clone());
            e.justification = Some(g.reason.clone());
            e.incident_id = Some(g.incident_id.clone());
            e.reason = Some(reason);
            e.message = Some(format!(
                "{by} revoked grant {} of {} on {}",
                g.id, g.person, g.target
            ));
            breakglass::siem::audit(&siem, &store, &e).await?;
            println!(
                "revoked {} ({} on {}); live sessions end within a second",
                g.id, g.person, g.target
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Parses `--since`/`--until`: RFC 3339, a date, or an age ("2h", "7d").
fn parse_when(s: &str) -> Result<DateTime<Utc>> {
    clock::parse_when(s).map_err(|e| anyhow!(e))
}

async fn sessions(config: &Path, cmd: SessionsCmd) -> Result<ExitCode> {
    let cfg = Config::load(config)?;
    let store = open_state(&cfg)?;
    match cmd {
        SessionsCmd::List {
            person,
            target,
            since,
            until,
            limit,
            format,
        } => {
            let f = SessionFilter {
                person,
                target,
                since: since.as_deref().map(parse_when).transpose()?,
                until: until.as_deref().map(parse_when).transpose()?,
                limit,
                ..Default::default()
            };
            let rows = store.list_sessions(&f).await?;
            if format == Format::Json {
                let v: Vec<serde_json::Value> = rows
                    .iter()
                    .map(|s| {
                        serde_json::json!({
                            "id": s.id, "protocol": s.protocol, "person": s.person, "target": s.target,
                            "grant_id": s.grant_id, "client_addr": s.client_addr,
                            "started_at": clock::rfc3339(s.started_at),
                            "deadline": clock::rfc3339(s.deadline),
                            "ended_at": s.ended_at.map(clock::rfc3339),
                            "end_reason": s.end_reason, "bytes_in": s.bytes_in, "bytes_out": s.bytes_out,
                            "recording": s.recording_prefix,
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(ExitCode::SUCCESS);
            }
            let table: Vec<Vec<String>> = rows
                .iter()
                .map(|s| {
                    vec![
                        s.id.clone(),
                        s.protocol.clone(),
                        s.person.clone(),
                        s.target.clone(),
                        clock::rfc3339(s.started_at),
                        s.ended_at
                            .map(clock::rfc3339)
                            .unwrap_or_else(|| "live".into()),
                        s.end_reason.clone().unwrap_or_default(),
                        s.bytes_in.to_string(),
                        s.bytes_out.to_string(),
                    ]
                })
                .collect();
            print_rows(
                format,
                &[
                    "id",
                    "protocol",
                    "person",
                    "target",
                    "started_at",
                    "ended_at",
                    "end_reason",
                    "bytes_in",
                    "bytes_out",
                ],
                &table,
            )?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Reads a SIEM copy: `path` and, when `rotations`, the rotated files beside it
/// (`<name>.<stamp>`), so sessions older than the last rotation are still cross-checked.
fn read_siem(path: &Path, rotations: bool) -> Result<breakglass::verify::SiemCopy> {
    let mut text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the SIEM copy {}", path.display()))?;
    if rotations {
        if let (Some(dir), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str()))
        {
            let mut rotated: Vec<PathBuf> = std::fs::read_dir(dir)
                .map(|rd| {
                    rd.filter_map(|e| e.ok())
                        .map(|e| e.path())
                        .filter(|p| {
                            p.file_name()
                                .and_then(|n| n.to_str())
                                .is_some_and(|n| n.starts_with(&format!("{name}.")))
                        })
                        .collect()
                })
                .unwrap_or_default();
            rotated.sort();
            for r in rotated {
                if let Ok(t) = std::fs::read_to_string(&r) {
                    text.push('\n');
                    text.push_str(&t);
                }
            }
        }
    }
    Ok(breakglass::verify::SiemCopy::parse(&text))
}

/// The start time a session's key prefix implies (`sessions/YYYY/MM/DD/<id>`): the end of
/// that day, so `--since` never drops a session it should keep.
fn prefix_day_end(prefix: &str) -> Option<DateTime<Utc>> {
    let mut p = prefix.split('/').skip(1);
    let (y, m, d) = (p.next()?, p.next()?, p.next()?);
    let day = chrono::NaiveDate::parse_from_str(&format!("{y}-{m}-{d}"), "%Y-%m-%d").ok()?;
    Some(day.succ_opt()?.and_hms_opt(0, 0, 0)?.and_utc())
}

async fn verify(
    config: &Path,
    session: Option<String>,
    all: bool,
    since: Option<String>,
    store_dir: Option<PathBuf>,
    public_key: Option<PathBuf>,
    siem: Option<PathBuf>,
) -> Result<ExitCode> {
    use breakglass::signing::{parse_trust, TrustSet};
    use breakglass::verify::{resolve_id, store_sessions, verify_session, Verdict};
    use std::collections::BTreeMap;
    let since = since.as_deref().map(parse_when).transpose()?;
    let trust_file = |pk: &Path| -> Result<TrustSet> {
        let (keys, certs) =
            parse_trust(&std::fs::read_to_string(pk).with_context(|| pk.display().to_string())?)
                .map_err(|e| anyhow!("{}: {e}", pk.display()))?;
        Ok(TrustSet::build(keys, certs))
    };
    // The session index (online): id → (key prefix, start).
    let mut indexed: BTreeMap<String, (String, DateTime<Utc>)> = BTreeMap::new();
    let mut warnings = Vec::new();
    let (store, trust, siem_copy) = if let Some(dir) = store_dir {
        // Offline: a store copy and the keys the auditor trusts, nothing from the gateway.
        let pk = public_key.ok_or_else(|| anyhow!("--store needs --public-key"))?;
        let trust = trust_file(&pk)?;
        let copy = siem.as_deref().map(|p| read_siem(p, false)).transpose()?;
        (RecordingStore::local(&dir)?, trust, copy)
    } else {
        let cfg = Config::load(config)?;
        let state = open_state(&cfg)?;
        let trust = match &public_key {
            Some(pk) => trust_file(pk)?,
            None => cfg.signing.trust(&cfg.data_dir)?,
        };
        warnings.extend(untrusted_key_warnings(&cfg, &trust));
        for r in state.list_sessions(&SessionFilter::default()).await? {
            indexed.insert(r.id, (r.recording_prefix, r.started_at));
        }
        let copy = match siem {
            Some(p) => Some(read_siem(&p, false)?),
            None if cfg.siem_file.exists() => Some(read_siem(&cfg.siem_file, true)?),
            None => {
                warnings.push(format!(
                    "the SIEM file {} does not exist: no chain heads, checkpoints or missing sessions to compare against",
                    cfg.siem_file.display()
                ));
                None
            }
        };
        (RecordingStore::from_config(&cfg)?, trust, copy)
    };
    // Rotation certificates kept with the evidence: an auditor who pinned only the first key
    // still follows the chain in a copy of the store.
    let (store_certs, cert_warnings) = breakglass::verify::store_certificates(&store).await?;
    let trust = trust.with_certificates(store_certs, cert_warnings);
    warnings.extend(trust.warnings.iter().cloned());
    if let Some(copy) = &siem_copy {
        if copy.lines > 0 && copy.events == 0 {
            warnings.push("the SIEM copy holds no seed-format events (only `format = \"seed\"` is read, not OCSF or CEF): nothing to cross-check against".into());
        }
        for c in &trust.chain {
            if !copy.rotated_keys.contains(&c.key.id) {
                warnings.push(format!(
                    "signing key {} is certified by key {}, but the SIEM copy has no signing_key_rotated event for it (a certificate not made by `breakglass keys rotate-signing`, or an older SIEM file)",
                    c.key.id, c.signed_by
                ));
            }
        }
    }
    let keys = trust.keys();
    if keys.is_empty() {
        warnings.push("no trusted signing keys: every sealed manifest verifies as TAMPERED; pin keys in [signing] trusted_keys or trusted_keys_file, or pass --public-key".into());
    }
    for w in &warnings {
        eprintln!("warning: {w}");
    }
    let in_store = store_sessions(&store).await?;
    let empty = breakglass::verify::SiemCopy::default();
    let copy = siem_copy.as_ref().unwrap_or(&empty);
    // Every id any source knows: the index, the store and the SIEM copy.
    let mut known: BTreeMap<String, Option<DateTime<Utc>>> = BTreeMap::new();
    for (id, (_, t)) in &indexed {
        known.insert(id.clone(), Some(*t));
    }
    for (id, st) in &in_store {
        let day = st.prefixes.keys().next().and_then(|p| prefix_day_end(p));
        known.entry(id.clone()).or_insert(day);
    }
    for (id, (_, at)) in copy.started() {
        let t = DateTime::parse_from_rfc3339(at)
            .ok()
            .map(|t| t.with_timezone(&Utc));
        known.entry(id.clone()).or_insert(t);
    }
    let ids: Vec<String> = if all {
        known
            .iter()
            .filter(|(_, t)| match (since, t) {
                (Some(s), Some(t)) => *t >= s,
                _ => true,
            })
            .map(|(id, _)| id.clone())
            .collect()
    } else {
        let given = session.ok_or_else(|| anyhow!("give a session id or --all"))?;
        vec![resolve_id(&given, known.keys())?]
    };
    let mut worst = 0u8;
    let total = ids.len();
    for (i, id) in ids.iter().enumerate() {
        if all {
            eprint!("\r[{}/{total}] verifying {id} ", i + 1);
        }
        let stored = in_store.get(id).cloned().unwrap_or_default();
        let prefix = stored.pick(indexed.get(id).map(|(p, _)| p.as_str()));
        let from_siem = copy.sessions.get(id);
        let verdict = match prefix {
            Some(p) => verify_session(&store, &p, &keys, from_siem)
                .await
                .map(|v| breakglass::verify::with_findings(v, stored.strays(&p))),
            None => Ok(Verdict::Missing {
                why: match from_siem.and_then(|s| s.started.as_ref()) {
                    Some((event, at)) => format!(
                        "the SIEM recorded its session_start at {at} (event {event}), but the store has no object of it (session deleted)"
                    ),
                    None => "no recording of it is in the store".into(),
                },
            }),
        };
        let (code, line) = match verdict {
            Ok(v) => (v.exit_code(), v.summary()),
            Err(e) => (1, format!("ERROR: {e}")),
        };
        if all {
            eprintln!();
        }
        println!("{id}  {line}");
        worst = worst.max(code);
    }
    if total == 0 {
        println!("(no sessions)");
    }
    Ok(ExitCode::from(worst))
}

async fn siem(config: &Path, cmd: SiemCmd) -> Result<ExitCode> {
    let cfg = Config::load(config)?;
    let siem = Siem::open(cfg.siem.clone())?;
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
            let rows: Vec<Vec<String>> = stats
                .iter()
                .map(|s| {
                    vec![
                        s.sink.clone(),
                        s.queued.to_string(),
                        s.delivered.to_string(),
                        s.failed.to_string(),
                        format!("{:.1}", s.oldest_age_secs),
                        s.last_error.clone().unwrap_or_default(),
                    ]
                })
                .collect();
            print_rows(
                format,
                &[
                    "sink",
                    "queued",
                    "delivered",
                    "failed",
                    "oldest_age_s",
                    "last_error",
                ],
                &rows,
            )?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn vault(config: &Path, cmd: VaultCmd) -> Result<ExitCode> {
    let cfg = Config::load(config)?;
    let (VaultCmd::Set { target } | VaultCmd::Verify { target }) = &cmd;
    let t = cfg
        .targets
        .get(target)
        .ok_or_else(|| anyhow!("no target named `{target}`"))?
        .clone();
    if t.protocol != breakglass::config::Protocol::Postgres {
        bail!("{target} is not a PostgreSQL target; SSH targets use certificates or key_file");
    }
    match cmd {
        VaultCmd::Set { .. } => {
            let mut pw = String::new();
            std::io::stdin().read_line(&mut pw)?;
            let pw = pw.trim_end_matches(['\r', '\n']).to_string();
            if pw.is_empty() {
                bail!("no password on standard input");
            }
            let kek = breakglass::rotation::kek(&cfg.kek)?;
            let store = open_state(&cfg)?;
            let blob = kek.seal(&t.name, &breakglass::vault::Secret::new(pw))?;
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
            let gw = breakglass::server::Gateway::build(cfg)?;
            breakglass::rotation::verify_pg(&gw, &t).await?;
            println!(
                "ok: the vault's password for {} logs in as {}",
                t.name, t.login
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn access_review(config: &Path, since: &str) -> Result<ExitCode> {
    let cfg = Config::load(config)?;
    let built = cfg.build()?;
    let store = open_state(&cfg)?;
    let since_t = parse_when(since)?;
    let now = clock::now();
    println!(
        "breakglass access review, {} to {}\n",
        clock::rfc3339(since_t),
        clock::rfc3339(now)
    );
    println!("break-glass accounts:");
    for t in cfg.targets.values() {
        println!(
            "  {} ({} as {}): custodians {}; approvers {} (needs {}){}",
            t.name,
            t.address,
            t.login,
            if t.custodians.is_empty() {
                "NONE".to_string()
            } else {
                t.custodians.join(", ")
            },
            t.approvers.join(", "),
            t.required_approvals,
            if t.emergency_self_service {
                "; emergency self-service ALLOWED"
            } else {
                ""
            }
        );
    }
    println!("\nwho may request (every configured person) and approve:");
    for p in cfg.people.values() {
        let approves: Vec<&str> = cfg
            .targets
            .values()
            .filter(|t| t.is_approver(&p.name, &p.roles))
            .map(|t| t.name.as_str())
            .collect();
        println!(
            "  {} (roles: {}): may approve {}",
            p.name,
            p.roles.join(", "),
            if approves.is_empty() {
                "nothing".to_string()
            } else {
                approves.join(", ")
            }
        );
    }
    println!("\ngrants in the period:");
    let grants: Vec<_> = store
        .list_grants(None)
        .await?
        .into_iter()
        .filter(|g| g.created_at >= since_t)
        .collect();
    if grants.is_empty() {
        println!("  (none)");
    }
    for g in &grants {
        println!(
            "  {}  {} on {}  {} to {}  by {}  {}{}",
            g.id,
            g.person,
            g.target,
            clock::rfc3339(g.created_at),
            clock::rfc3339(g.revoked_at.unwrap_or(g.expires_at)),
            text::terminal(&g.created_by),
            text::terminal(&g.incident_id),
            if g.review_required { "  EMERGENCY" } else { "" }
        );
    }
    println!("\nkeys not used in 90 days:");
    let used: std::collections::BTreeMap<String, DateTime<Utc>> = store
        .key_usage()
        .await?
        .into_iter()
        .map(|(f, _, t)| (f, t))
        .collect();
    let cutoff = now - chrono::Duration::days(90);
    let mut any = false;
    for (fp, person) in built.keys.entries() {
        match used.get(fp) {
            Some(t) if *t >= cutoff => {}
            Some(t) => {
                any = true;
                println!("  {person}  {fp}  last used {}", clock::rfc3339(*t));
            }
            None => {
                any = true;
                println!("  {person}  {fp}  never used");
            }
        }
    }
    if !any {
        println!("  (none)");
    }
    Ok(ExitCode::SUCCESS)
}

fn print_rows(format: Format, headers: &[&str], rows: &[Vec<String>]) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match format {
        Format::Csv => {
            write!(out, "{}", breakglass::csv::line(headers))?;
            for r in rows {
                write!(out, "{}", breakglass::csv::line(r))?;
            }
        }
        Format::Json => {
            let v: Vec<serde_json::Map<String, serde_json::Value>> = rows
                .iter()
                .map(|r| {
                    headers
                        .iter()
                        .zip(r)
                        .map(|(h, v)| (h.to_string(), serde_json::Value::String(v.clone())))
                        .collect()
                })
                .collect();
            writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
        }
        Format::Table => {
            // A table is read in a terminal: stored text shows its control characters as
            // escapes (CSV and JSON carry the values unchanged, quoted for their format).
            let rows: Vec<Vec<String>> = rows
                .iter()
                .map(|r| r.iter().map(|f| text::terminal(f).into_owned()).collect())
                .collect();
            let rows = &rows;
            let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
            for r in rows {
                for (i, f) in r.iter().enumerate() {
                    if let Some(w) = widths.get_mut(i) {
                        *w = (*w).max(f.chars().count());
                    }
                }
            }
            let line = |fields: Vec<String>| -> String {
                fields
                    .iter()
                    .enumerate()
                    .map(|(i, f)| format!("{f:<w$}", w = widths.get(i).copied().unwrap_or(0)))
                    .collect::<Vec<_>>()
                    .join("  ")
                    .trim_end()
                    .to_string()
            };
            writeln!(
                out,
                "{}",
                line(headers.iter().map(|h| h.to_uppercase()).collect())
            )?;
            for r in rows {
                writeln!(out, "{}", line(r.clone()))?;
            }
            if rows.is_empty() {
                writeln!(out, "(none)")?;
            }
        }
    }
    Ok(())
}

/// Loads a session's recording for `what` (`replayed` or `exported`), after putting that on
/// the record: auditing the auditors covers the CLI as much as the web UI.
async fn load_recording(
    config: &Path,
    session: &str,
    action: Action,
    what: &str,
) -> Result<(String, export::Loaded)> {
    let cfg = Config::load(config)?;
    let store = open_state(&cfg)?;
    let row = store.find_session(session).await?.ok_or_else(|| {
        anyhow!("no session matches `{session}` (see `breakglass sessions list`)")
    })?;
    let what = format!("{what} with the CLI");
    let e = breakglass::siem::recording_access(&store, action, &operator(), &row, &what).await;
    let siem = std::sync::Arc::new(Siem::open(cfg.siem.clone())?);
    breakglass::siem::audit(&siem, &store, &e).await?;
    let rec = RecordingStore::from_config(&cfg)?;
    let loaded = export::load(&rec, &row.recording_prefix).await?;
    Ok((row.id, loaded))
}

async fn replay(
    config: &Path,
    session: &str,
    channel: Option<u32>,
    speed: f64,
    idle: Option<f64>,
) -> Result<ExitCode> {
    let (id, loaded) = load_recording(config, session, Action::RecordingViewed, "replayed").await?;
    let (ch, data) = loaded.pick(channel)?;
    if export::is_postgres(data) {
        // A PostgreSQL session replays as its statement timeline.
        for line in breakglass::pg::log::sql_jsonl(ch, data, &id)?.lines() {
            let e: serde_json::Value = serde_json::from_str(line)?;
            let t = e["time"].as_f64().unwrap_or(0.0);
            let what = match e["event"].as_str().unwrap_or("") {
                "query" | "parse" => e["sql"].as_str().unwrap_or("").to_string(),
                "complete" => format!(
                    "-> {} ({} rows)",
                    e["command_tag"].as_str().unwrap_or(""),
                    e["rows_returned"]
                ),
                "error" => format!(
                    "-> ERROR {} {}",
                    e["error"]["sqlstate"].as_str().unwrap_or(""),
                    e["error"]["message"].as_str().unwrap_or("")
                ),
                other => other.to_string(),
            };
            println!("{t:>10.3}s  {}", text::terminal(&what));
        }
        return Ok(ExitCode::SUCCESS);
    }
    let cast = export::to_asciicast(ch, data)?;
    let (_, events) = asciicast::parse(&cast)?;
    eprintln!("replaying session {id} channel {ch} at {speed}x (Ctrl-C to stop)");
    let mut out = std::io::stdout().lock();
    asciicast::replay(&events, &mut out, speed, idle, &mut |d| {
        std::thread::sleep(d)
    })?;
    writeln!(out)?;
    Ok(ExitCode::SUCCESS)
}

async fn export_cmd(
    config: &Path,
    session: &str,
    output: &Path,
    channel: Option<u32>,
) -> Result<ExitCode> {
    let (id, loaded) =
        load_recording(config, session, Action::RecordingExported, "exported").await?;
    let (ch, data) = loaded.pick(channel)?;
    // PostgreSQL sessions export as their SQL timeline (JSONL); terminals as asciicast v2.
    let cast = if export::is_postgres(data) {
        breakglass::pg::log::sql_jsonl(ch, data, &id)?
    } else {
        export::to_asciicast(ch, data)?
    };
    // Never overwrite: exports are evidence too.
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(output)
        .with_context(|| format!("cannot create {} (it must not exist yet)", output.display()))?;
    f.write_all(cast.as_bytes())?;
    f.sync_all()?;
    eprintln!(
        "exported session {id} channel {ch} ({} chunks{}) to {}",
        data.chunks,
        if loaded.meta.is_none() {
            ", session not sealed"
        } else {
            ""
        },
        output.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// Formats an optional float for tables and CSV (empty when there is no value).
fn opt_f64(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.1}")).unwrap_or_default()
}

async fn report(
    config: &Path,
    since: &str,
    until: Option<&str>,
    period: breakglass::report::Period,
    format: Format,
) -> Result<ExitCode> {
    let cfg = Config::load(config)?;
    let store = open_state(&cfg)?;
    let since = parse_when(since)?;
    let until = until
        .map(parse_when)
        .transpose()?
        .unwrap_or_else(clock::now);
    if since > until {
        bail!("--since is after --until");
    }
    period
        .check_range(since, until)
        .map_err(|e| anyhow!("{e}"))?;
    let r = breakglass::report::compute(&store, &cfg, since, until, period).await?;
    let t = &r.totals;
    match format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&r)?),
        Format::Csv => {
            let headers = [
                "section",
                "target",
                "protocol",
                "start",
                "end",
                "events",
                "grants",
                "unique_users",
                "mean_time_between_events_seconds",
                "outside_windows",
                "outside_windows_pct",
                "last_event",
            ];
            let mut rows = vec![vec![
                "total".into(),
                String::new(),
                String::new(),
                r.since.clone(),
                r.until.clone(),
                t.events.to_string(),
                t.grants.to_string(),
                t.unique_users.to_string(),
                opt_f64(t.mean_time_between_events_seconds),
                t.outside_windows.to_string(),
                opt_f64(t.outside_windows_pct),
                String::new(),
            ]];
            for s in &r.per_system {
                rows.push(vec![
                    "system".into(),
                    s.target.clone(),
                    s.protocol.clone(),
                    String::new(),
                    String::new(),
                    s.events.to_string(),
                    String::new(),
                    s.unique_users.to_string(),
                    opt_f64(s.mean_time_between_events_seconds),
                    s.outside_windows.to_string(),
                    opt_f64(s.outside_windows_pct),
                    s.last_event.clone(),
                ]);
            }
            for p in &r.per_period {
                rows.push(vec![
                    "period".into(),
                    String::new(),
                    String::new(),
                    p.start.clone(),
                    p.end.clone(),
                    p.events.to_string(),
                    String::new(),
                    p.unique_users.to_string(),
                    String::new(),
                    p.outside_windows.to_string(),
                    String::new(),
                    String::new(),
                ]);
            }
            print_rows(Format::Csv, &headers, &rows)?;
        }
        Format::Table => {
            println!(
                "breakglass report, {} to {}, per {}",
                r.since, r.until, r.period
            );
            println!(
                "maintenance windows (UTC): {}\n",
                if r.maintenance_windows.is_empty() {
                    "none configured".to_string()
                } else {
                    r.maintenance_windows.join(", ")
                }
            );
            print_rows(
                Format::Table,
                &[
                    "events",
                    "grants",
                    "unique_users",
                    "mean_between_s",
                    "outside_windows",
                    "outside_pct",
                ],
                &[vec![
                    t.events.to_string(),
                    t.grants.to_string(),
                    t.unique_users.to_string(),
                    opt_f64(t.mean_time_between_events_seconds),
                    t.outside_windows.to_string(),
                    opt_f64(t.outside_windows_pct),
                ]],
            )?;
            println!("\nper system:");
            let systems: Vec<Vec<String>> = r
                .per_system
                .iter()
                .map(|s| {
                    vec![
                        s.target.clone(),
                        s.protocol.clone(),
                        s.events.to_string(),
                        s.unique_users.to_string(),
                        opt_f64(s.mean_time_between_events_seconds),
                        s.outside_windows.to_string(),
                        opt_f64(s.outside_windows_pct),
                        s.last_event.clone(),
                    ]
                })
                .collect();
            print_rows(
                Format::Table,
                &[
                    "target",
                    "protocol",
                    "events",
                    "unique_users",
                    "mean_between_s",
                    "outside_windows",
                    "outside_pct",
                    "last_event",
                ],
                &systems,
            )?;
            println!("\nper {}:", r.period);
            let periods: Vec<Vec<String>> = r
                .per_period
                .iter()
                .map(|p| {
                    vec![
                        p.start.clone(),
                        p.end.clone(),
                        p.events.to_string(),
                        p.unique_users.to_string(),
                        p.outside_windows.to_string(),
                    ]
                })
                .collect();
            print_rows(
                Format::Table,
                &["start", "end", "events", "unique_users", "outside_windows"],
                &periods,
            )?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn audit_export(
    config: &Path,
    since: &str,
    until: Option<&str>,
    format: breakglass::audit_export::ExportFormat,
    out: &Path,
) -> Result<ExitCode> {
    let cfg = Config::load(config)?;
    let store = open_state(&cfg)?;
    let siem = std::sync::Arc::new(Siem::open(cfg.siem.clone())?);
    let signer = breakglass::signing::Signer::load_or_create_pinned(
        &cfg.data_dir,
        &cfg.signing.trusted_keys_file,
    )?
    .use_trusted(&cfg.signing.trust(&cfg.data_dir)?)?;
    let since = parse_when(since)?;
    let until = until
        .map(parse_when)
        .transpose()?
        .unwrap_or_else(clock::now);
    if since > until {
        bail!("--since is after --until");
    }
    let by = operator();
    let bundle =
        breakglass::audit_export::build(&store, &signer, since, until, format, &by).await?;
    let written = breakglass::audit_export::write(&bundle, out)?;
    // Auditing the auditors: the export itself is an audit event.
    let mut e = AccessEvent::new(Action::MetadataExported, &by);
    e.message = Some(format!(
        "{by} exported the metadata of {} sessions from {} to {} ({}) to {}",
        bundle.rows,
        clock::rfc3339(since),
        clock::rfc3339(until),
        format.as_str(),
        out.display()
    ));
    breakglass::siem::audit(&siem, &store, &e).await?;
    for p in &written {
        println!("{}", p.display());
    }
    eprintln!(
        "exported {} sessions, manifest signed with key {}",
        bundle.rows, bundle.signature.key_id
    );
    Ok(ExitCode::SUCCESS)
}

fn audit_export_verify(config: &Path, dir: &Path, public_key: Option<&Path>) -> Result<ExitCode> {
    // Trusted keys only (as for `verify`): never a key file found in the data dir.
    let keys = match public_key {
        Some(pk) => {
            let (keys, certs) = breakglass::signing::parse_trust(&std::fs::read_to_string(pk)?)
                .map_err(|e| anyhow!("{}: {e}", pk.display()))?;
            breakglass::signing::TrustSet::build(keys, certs).keys()
        }
        None => {
            let cfg = Config::load(config)?;
            cfg.signing.trust(&cfg.data_dir)?.keys()
        }
    };
    let v = breakglass::audit_export::verify_dir(dir, &keys)?;
    let what = v
        .manifest
        .as_ref()
        .map(|m| format!(" ({}, {} rows, {} to {})", m.file, m.rows, m.since, m.until))
        .unwrap_or_default();
    if v.is_ok() {
        println!("{}  OK{what}", dir.display());
        Ok(ExitCode::SUCCESS)
    } else {
        println!("{}  TAMPERED{what}", dir.display());
        for f in &v.findings {
            println!("  {f}");
        }
        Ok(ExitCode::from(3))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash\n\
        daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n\
        alice:x:1000:1000:Alice:/home/alice:/bin/bash\n\
        bob:x:1001:1001::/home/bob:/bin/sh\n";

    fn status(real: u32, effective: u32) -> String {
        format!("Name:\tbreakglass\nPid:\t42\nUid:\t{real}\t{effective}\t{effective}\t{effective}\nGid:\t0\t0\t0\t0\n")
    }

    #[test]
    fn operator_comes_from_the_os() {
        // (real uid, effective uid, SUDO_UID, operator)
        let cases: &[(u32, u32, Option<&str>, &str)] = &[
            (1000, 1000, None, "operator:alice"),
            // SUDO_UID counts only when the effective uid is root.
            (1000, 1000, Some("1001"), "operator:alice"),
            (0, 0, Some("1001"), "operator:bob"),
            (1000, 0, Some("1001"), "operator:bob"),
            (0, 0, None, "operator:root"),
            (0, 0, Some("not a number"), "operator:root"),
            (4242, 4242, None, "operator:uid:4242"),
        ];
        for (real, effective, sudo, want) in cases {
            assert_eq!(
                operator_from(&status(*real, *effective), PASSWD, *sudo),
                *want,
                "{real} {effective} {sudo:?}"
            );
        }
        assert_eq!(
            operator_from("Name:\tx\n", PASSWD, None),
            "operator:unknown"
        );
        assert_eq!(status_uids("Uid:\t7\t8\t9\t10\n"), Some((7, 8)));
        assert_eq!(status_uids("Uid:\t7\n"), None);
        assert_eq!(
            passwd_name("broken line\n::5:5\nx:x:5:5::/:/bin/sh\n", 5),
            Some("x")
        );
    }

    #[test]
    fn operator_ignores_user_and_sudo_user() {
        // The real process: whatever USER says, the name is the real uid's.
        let me = operator();
        let status = std::fs::read_to_string("/proc/self/status").expect("linux /proc");
        let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
        let (real, _) = status_uids(&status).expect("a Uid line");
        let want = passwd_name(&passwd, real)
            .map(|n| format!("operator:{n}"))
            .unwrap_or_else(|| format!("operator:uid:{real}"));
        if std::env::var("SUDO_UID").is_err() {
            assert_eq!(me, want);
        }
    }
}
