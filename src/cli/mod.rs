//! The operator's and auditor's commands: serve, check-config, grant, sessions, replay,
//! export, events, access-review, report, audit-export, vault, siem, verify, keys.

mod admin;
mod demo;
mod drill;
mod evidence;
mod output;
mod workflow;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{anyhow, bail, Result};
use breakglass::config::Config;
use breakglass::state::Store;
use breakglass::{clock, keys, text};
use chrono::{DateTime, Utc};
use clap::{Parser, Subcommand, ValueEnum};

use admin::{check_config, rotate_signing, siem, signing_chain, vault};
use evidence::{audit_export, audit_export_verify, export_cmd, replay, report, verify};
use output::{print_rows, Format};
use workflow::{access_review, grant, sessions};

/// Break-glass access gateway: approved, time-boxed, recorded SSH and PostgreSQL sessions.
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
    /// Operator grants, made without a request (bootstrap, scripted runbooks); people ask for
    /// access with the control channel's `request`, and approvers `approve` it.
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
    /// A self-contained playground: a gateway, a local sshd target and keys for alice (who
    /// asks) and bob (who approves), in a temp dir, with the exact commands to try printed.
    /// Ctrl-C stops it and removes the directory.
    Demo {
        /// Where to build it (must be empty or absent; default: a new temp dir).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Keep the directory when the demo stops.
        #[arg(long)]
        keep: bool,
    },
    /// Rehearse break-glass access to TARGET end to end, through the running gateway: a
    /// request (tagged as a drill), approval by a real second person, a session with a
    /// harmless scripted command, the deadline cut, verify, SIEM delivery, the alert, the
    /// rotation and the review. Prints a timed checklist and time-to-access; a failed step is
    /// named and the exit code is 1.
    Drill {
        target: String,
        /// The requester's SSH private key (the drill acts as that person).
        #[arg(long)]
        key: PathBuf,
        #[arg(
            long,
            short,
            env = "BREAKGLASS_CONFIG",
            default_value = "config/breakglass.toml"
        )]
        config: PathBuf,
        /// The gateway's SSH address (default: listeners.ssh of the config).
        #[arg(long)]
        gateway: Option<String>,
        /// How long the drill's grant lasts; the deadline step waits for it (default: 1m,
        /// or limits.min_grant_ttl when longer).
        #[arg(long = "for")]
        duration: Option<String>,
        /// How long to wait for the second person's approval.
        #[arg(long, default_value = "15m")]
        approval_timeout: String,
        /// How long any other step may take.
        #[arg(long, default_value = "60s")]
        step_timeout: String,
    },
    /// Automated audit findings over the sessions that started in a range: destructive
    /// commands and statements, data leaving, odd hours, outside maintenance windows, a
    /// target new to the person, sessions far longer than usual, commands after a deadline
    /// warning; each with the moment in the recording.
    Findings {
        #[arg(
            long,
            short,
            env = "BREAKGLASS_CONFIG",
            default_value = "config/breakglass.toml"
        )]
        config: PathBuf,
        /// RFC 3339 time, a date or an age like 30d.
        #[arg(long, default_value = "30d")]
        since: String,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// An incident's report: one self-contained HTML file (requests, approvals, grants,
    /// sessions, commands, transfers, findings, integrity verdicts, SIEM delivery, rotation,
    /// reviews, CAB, and the timeline) next to a signed manifest. Check it with
    /// `audit-export verify DIR`.
    IncidentReport {
        #[arg(
            long,
            short,
            env = "BREAKGLASS_CONFIG",
            default_value = "config/breakglass.toml"
        )]
        config: PathBuf,
        /// The incident id the grants carry.
        incident: String,
        /// Directory to write into (created; files are never overwritten).
        #[arg(long, short)]
        out: PathBuf,
    },
    /// The nodes sharing this config's state store: their leases and live sessions.
    Cluster {
        #[arg(
            long,
            short,
            env = "BREAKGLASS_CONFIG",
            global = true,
            default_value = "config/breakglass.toml"
        )]
        config: PathBuf,
        #[command(subcommand)]
        cmd: ClusterCmd,
    },
    /// Check recordings against their hash chain, signed manifest and the SIEM copy.
    ///
    /// Trusted keys: online, those of the config's `[signing]` table (`trusted_keys`, the
    /// `trusted_keys_file`) and keys certified by them through rotation certificates;
    /// offline, only `--public-key`. A key file found in `<keys_dir>/signing/` is never
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
        /// Why: several words need no quotes (`--reason disk full on db-1`), as on the
        /// control channel.
        #[arg(long, num_args = 1.., required = true)]
        reason: Vec<String>,
        #[arg(long, num_args = 1.., required = true)]
        incident: Vec<String>,
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
        /// Why (several words need no quotes).
        #[arg(long, num_args = 1.., default_value = "revoked by operator")]
        reason: Vec<String>,
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
enum ClusterCmd {
    /// Every node with a lease (up, draining or lapsed), when it renewed, how many sessions
    /// it holds, and who delivers each SIEM sink.
    Status {
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
        /// Print the SIEM sinks (their delivery worker, lease and backlog) instead of the
        /// nodes; the table format prints both.
        #[arg(long)]
        sinks: bool,
    },
}

#[derive(Subcommand, Debug)]
enum VaultCmd {
    /// Store a PostgreSQL target's break-glass password, read from standard input.
    Set {
        target: String,
        /// Store the password of the target's `admin_login` instead (the role that switches
        /// the break-glass role between LOGIN and NOLOGIN).
        #[arg(long)]
        admin: bool,
    },
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
    /// Create whatever of the gateway's long-lived keys is missing in keys_dir (host key, user
    /// CA, first signing key and its pin, the vault KEK file) and list them. A cluster node
    /// never generates keys: run this once, then give every node the same keys_dir.
    Init,
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
            let store = open_state(&cfg).await?;
            let correlation = resolve_correlation(&*store, &correlation).await?;
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
        Command::Cluster { config, cmd } => admin::cluster(&config, cmd).await,
        Command::Demo { dir, keep } => demo::demo(dir, keep).await,
        Command::Findings {
            config,
            since,
            format,
        } => evidence::findings(&config, &since, format).await,
        Command::IncidentReport {
            config,
            incident,
            out,
        } => evidence::incident_report(&config, &incident, &out).await,
        Command::Drill {
            target,
            key,
            config,
            gateway,
            duration,
            approval_timeout,
            step_timeout,
        } => {
            let dur = |name: &str, v: &str| {
                humantime::parse_duration(v).map_err(|e| anyhow!("--{name} `{v}`: {e}"))
            };
            drill::drill(drill::DrillArgs {
                config,
                target,
                key,
                gateway,
                duration,
                approval_timeout: dur("approval-timeout", &approval_timeout)?,
                step_timeout: dur("step-timeout", &step_timeout)?,
            })
            .await
        }
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
            KeysCmd::Init => admin::keys_init(&config),
            KeysCmd::Show { ca, signing } => {
                let cfg = Config::load(&config)?;
                if cfg.is_cluster() {
                    let missing = breakglass::server::identity_missing(&cfg);
                    if !missing.is_empty() {
                        bail!(
                            "{}; a cluster node never generates keys: run `breakglass keys init` once",
                            missing.join("; ")
                        );
                    }
                }
                let k = keys::GatewayKeys::load_or_create(&cfg.keys_dir)?;
                breakglass::signing::Signer::load_or_create_pinned(
                    &cfg.keys_dir,
                    &cfg.signing.trusted_keys_file,
                )?;
                if ca {
                    println!("{}", keys::openssh_line(k.user_ca.public_key()));
                } else if signing {
                    print!("{}", signing_chain(&cfg)?);
                } else {
                    print!("{}", signing_chain(&cfg)?);
                    println!(
                        "# host key: a ready known_hosts line (use the name clients connect to)"
                    );
                    println!(
                        "{}",
                        known_hosts_line(
                            &listen_host(cfg.ssh_listen),
                            cfg.ssh_listen.port(),
                            &keys::openssh_line(k.host.public_key())
                        )
                    );
                    println!("# user CA (targets trust it with TrustedUserCAKeys)");
                    println!("{}", keys::openssh_line(k.user_ca.public_key()));
                }
                Ok(ExitCode::SUCCESS)
            }
        },
    }
}

/// A known_hosts line for the gateway's host key at `listen`: `[host]:port` unless the port is
/// 22; an unspecified address (0.0.0.0, ::) becomes this machine's host name.
fn listen_host(listen: std::net::SocketAddr) -> String {
    if listen.ip().is_unspecified() {
        std::fs::read_to_string("/etc/hostname")
            .ok()
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".into())
    } else {
        listen.ip().to_string()
    }
}

/// A known_hosts line for `key` (an OpenSSH public key line; its comment is dropped) at
/// `host` and `port`: `[host]:port` unless the port is 22.
fn known_hosts_line(host: &str, port: u16, key: &str) -> String {
    let key = key.split_whitespace().take(2).collect::<Vec<_>>().join(" ");
    if port == 22 {
        format!("{host} {key}")
    } else {
        format!("[{host}]:{port} {key}")
    }
}

/// A correlation id from a request id, a grant id or an unambiguous prefix of either; an id
/// that matches nothing is an error (not an empty answer).
async fn resolve_correlation(store: &dyn breakglass::state::Store, id: &str) -> Result<String> {
    use breakglass::state::StateError;
    match store.find_request(id).await {
        Ok(r) => return Ok(r.id),
        Err(StateError::NoSuchRequest(_)) => {}
        Err(e) => return Err(e.into()),
    }
    match store.find_grant(id).await {
        Ok(g) => Ok(g.correlation_id().to_string()),
        Err(StateError::NoSuchGrant(_)) => {
            bail!("no request or grant matches `{id}` (see `breakglass grant list` and the control channel's `requests`)")
        }
        Err(e) => Err(e.into()),
    }
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

async fn open_state(cfg: &Config) -> Result<std::sync::Arc<dyn Store>> {
    Ok(breakglass::state::open(&cfg.state).await?)
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

/// Parses `--since`/`--until`: RFC 3339, a date, or an age ("2h", "7d").
fn parse_when(s: &str) -> Result<DateTime<Utc>> {
    clock::parse_when(s).map_err(|e| anyhow!(e))
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
