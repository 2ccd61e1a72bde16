//! The gateway's TOML config: raw serde structs → pure `validate()` → [`Config`] → `build()`.
//!
//! `validate` does no I/O and yields a type that can only hold a valid config; files (key
//! files, the data dir) are touched only by [`Config::build`] and the health checks.

pub mod alerts;
pub mod cluster;
pub mod siem;
pub mod signing;

pub use alerts::{Webhook, WebhookFormat};
pub use cluster::{ClusterConfig, PgStateConfig, StateConfig, UrlSource};
pub use signing::SigningConfig;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use russh::keys::PublicKey;
use serde::Deserialize;

/// A config problem, naming the key at fault and why.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config is not valid TOML: {0}")]
    Parse(String),
    #[error("config key `{key}`: {why}")]
    Invalid { key: String, why: String },
}

fn invalid(key: impl Into<String>, why: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        why: why.into(),
    }
}

// ---------------------------------------------------------------- raw (serde) layer

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default = "default_data_dir")]
    data_dir: PathBuf,
    /// Where the long-lived keys live (default `<data_dir>/keys`).
    keys_dir: Option<PathBuf>,
    #[serde(default)]
    state: cluster::RawState,
    #[serde(default)]
    cluster: cluster::RawCluster,
    listeners: RawListeners,
    #[serde(default)]
    people: Vec<RawPerson>,
    #[serde(default)]
    targets: Vec<RawTarget>,
    #[serde(default)]
    storage: RawStorage,
    #[serde(default)]
    siem: RawSiem,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    alerts: RawAlerts,
    #[serde(default)]
    reviews: RawReviews,
    #[serde(default)]
    vault: RawVault,
    #[serde(default)]
    postgres: RawPostgres,
    #[serde(default)]
    web: RawWeb,
    #[serde(default)]
    reports: RawReports,
    #[serde(default)]
    drills: RawDrills,
    #[serde(default)]
    findings: RawFindings,
    #[serde(default)]
    incidents: RawIncidents,
    #[serde(default)]
    signing: RawSigning,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIncidents {
    report_within: Option<String>,
    cab_within: Option<String>,
}

/// `[incidents]`: the seed timeline after an incident is resolved (its last grant ended):
/// the credentials rotated within `limits.rotation_window`, the incident report written
/// within `report_within`, the CAB review signed within `cab_within`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IncidentsConfig {
    pub report_within: Duration,
    pub cab_within: Duration,
}

fn incidents_config(raw: &RawIncidents) -> Result<IncidentsConfig, ConfigError> {
    let get = |key: &str, v: &Option<String>, default: &str| {
        parse_duration(key, v.as_deref().unwrap_or(default))
    };
    Ok(IncidentsConfig {
        report_within: get("incidents.report_within", &raw.report_within, "24h")?,
        cab_within: get("incidents.cab_within", &raw.cab_within, "7d")?,
    })
}

/// `[signing]`: which manifest signing keys verification trusts.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSigning {
    /// `ed25519 BASE64 [ID]` lines, as `breakglass keys show --signing` prints them.
    #[serde(default)]
    trusted_keys: Vec<String>,
    trusted_keys_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWeb {
    public_url: Option<String>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    player_dir: Option<PathBuf>,
    login_link_ttl: Option<String>,
    session_ttl: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReports {
    #[serde(default)]
    maintenance_windows: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDrills {
    every: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFindings {
    odd_hours: Option<String>,
    data_out_bytes: Option<u64>,
    long_factor: Option<f64>,
}

/// `[findings]`: the settings of the audit-finding rules (`crate::findings`).
#[derive(Debug, Clone, PartialEq)]
pub struct FindingsConfig {
    /// UTC hours [from, to) that count as odd; None turns the rule off.
    pub odd_hours: Option<(u32, u32)>,
    pub data_out_bytes: u64,
    pub long_factor: f64,
}

fn findings_config(raw: &RawFindings) -> Result<FindingsConfig, ConfigError> {
    let odd_hours = match raw.odd_hours.as_deref().map(str::trim) {
        None => Some((22, 6)),
        Some("off") => None,
        Some(v) => {
            let bad = || {
                invalid(
                    "findings.odd_hours",
                    format!("`{v}` is not like \"22-6\" (UTC hours) or \"off\""),
                )
            };
            let (a, b) = v.split_once('-').ok_or_else(bad)?;
            let (a, b): (u32, u32) = (
                a.trim().parse().map_err(|_| bad())?,
                b.trim().parse().map_err(|_| bad())?,
            );
            if a > 23 || b > 24 || a == b {
                return Err(bad());
            }
            Some((a, b))
        }
    };
    let long_factor = raw.long_factor.unwrap_or(3.0);
    if !(long_factor > 1.0 && long_factor.is_finite()) {
        return Err(invalid("findings.long_factor", "must be more than 1"));
    }
    Ok(FindingsConfig {
        odd_hours,
        data_out_bytes: raw.data_out_bytes.unwrap_or(100 << 20),
        long_factor,
    })
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPostgres {
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    max_message: Option<RawSize>,
}

/// A byte count: a number, or a string with a unit (`"64MiB"`, `"512 KiB"`).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawSize {
    Bytes(u64),
    Text(String),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVault {
    kek_file: Option<PathBuf>,
    kek_env: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReviews {
    security_patch: Option<String>,
    production_outage: Option<String>,
    system_failure: Option<String>,
    other: Option<String>,
    #[serde(default)]
    reviewer_may_be_participant: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAlerts {
    #[serde(default)]
    webhooks: Vec<RawWebhook>,
    ca_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWebhook {
    url: String,
    #[serde(default = "default_webhook_format")]
    format: String,
    /// `Name: value`, e.g. `Authorization: Bearer xyz`.
    header: Option<String>,
}

fn default_webhook_format() -> String {
    "json".into()
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("./data")
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListeners {
    ssh: String,
    http: Option<String>,
    postgres: Option<String>,
    /// Load balancers whose PROXY protocol header (v1 or v2) names the client.
    #[serde(default)]
    proxy_protocol_from: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPerson {
    name: String,
    #[serde(default)]
    ssh_keys: Vec<String>,
    #[serde(default)]
    ssh_key_files: Vec<PathBuf>,
    #[serde(default)]
    roles: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTarget {
    name: String,
    #[serde(default)]
    protocol: Option<String>,
    /// PostgreSQL targets: the database the gateway connects to for rotation.
    database: Option<String>,
    address: String,
    host_key: Option<String>,
    host_key_file: Option<PathBuf>,
    login: String,
    #[serde(default = "default_auth")]
    auth: String,
    key_file: Option<PathBuf>,
    #[serde(default)]
    approvers: Vec<String>,
    required_approvals: Option<usize>,
    max_duration: Option<String>,
    #[serde(default)]
    custodians: Vec<String>,
    #[serde(default)]
    emergency_self_service: bool,
    /// SSH targets: keep input typed without echo (passwords) out of the record.
    #[serde(default = "yes")]
    redact_no_echo: bool,
    /// auth = "key": the authorized_keys file on the target that rotation rewrites.
    authorized_keys: Option<String>,
    /// PostgreSQL targets: "disable" (default), "require" or "verify-full".
    tls: Option<String>,
    /// PostgreSQL targets: the PEM CA certificate(s), or the server's own certificate, trusted
    /// for upstream TLS.
    ca_file: Option<PathBuf>,
    /// PostgreSQL targets: answer a cleartext or md5 password request (only with
    /// tls = "verify-full"); off by default, so only SCRAM-SHA-256 is spoken upstream.
    #[serde(default)]
    allow_password_auth: bool,
    /// PostgreSQL targets under TLS: "require" (default) logs in only with
    /// SCRAM-SHA-256-PLUS, bound to the target's certificate; "prefer" also accepts plain
    /// SCRAM-SHA-256 from a server that offers no -PLUS (a TLS-terminating proxy in front).
    channel_binding: Option<String>,
    /// PostgreSQL targets: keep the break-glass role NOLOGIN while no grant needs it. SSH
    /// targets with auth = "key": keep the held key out of authorized_keys while no grant
    /// needs it.
    #[serde(default)]
    disable_between_grants: bool,
    /// PostgreSQL targets: the role that switches the break-glass role between LOGIN and
    /// NOLOGIN (its password is the vault's `admin` entry: `breakglass vault set T --admin`).
    /// SSH targets: the account that adds and removes the held key's line.
    admin_login: Option<String>,
    /// SSH targets with disable_between_grants: the private key that logs in as admin_login.
    admin_key_file: Option<PathBuf>,
}

fn yes() -> bool {
    true
}

fn default_auth() -> String {
    "certificate".to_string()
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStorage {
    #[serde(default)]
    kind: Option<String>,
    path: Option<PathBuf>,
    bucket: Option<String>,
    prefix: Option<String>,
    region: Option<String>,
    endpoint: Option<String>,
    object_lock: Option<String>,
    retention_days: Option<u32>,
    #[serde(default)]
    allow_unlocked: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSiem {
    file: Option<PathBuf>,
    /// Format of the default file: seed (default), ocsf or cef.
    format: Option<String>,
    /// Put per-action events (commands, SQL statements) in the default file too.
    #[serde(default)]
    actions: bool,
    /// Rotate the default file at this size, e.g. "100MiB".
    rotate: Option<String>,
    spool: Option<PathBuf>,
    spool_max_events: Option<u64>,
    fail_closed_backlog: Option<u64>,
    #[serde(default)]
    sinks: Vec<RawSink>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSink {
    name: String,
    /// file | syslog | splunk_hec | webhook
    kind: String,
    format: Option<String>,
    #[serde(default)]
    actions: bool,
    batch: Option<usize>,
    timeout: Option<String>,
    // file
    path: Option<PathBuf>,
    rotate: Option<String>,
    // syslog
    address: Option<String>,
    /// tcp (default) | tls | udp
    transport: Option<String>,
    ca_file: Option<PathBuf>,
    server_name: Option<String>,
    app_name: Option<String>,
    // http
    url: Option<String>,
    token: Option<String>,
    token_env: Option<String>,
    #[serde(default)]
    ack: bool,
    index: Option<String>,
    hmac_secret: Option<String>,
    hmac_secret_env: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_session_ttl: Option<String>,
    default_grant_ttl: Option<String>,
    max_grant_ttl: Option<String>,
    min_grant_ttl: Option<String>,
    warn_before: Option<Vec<String>>,
    max_connections: Option<usize>,
    preauth_max: Option<usize>,
    preauth_per_source: Option<usize>,
    http_max_connections: Option<usize>,
    env_allow: Option<Vec<String>>,
    recorder_stall_timeout: Option<String>,
    flush_interval: Option<String>,
    login_grace: Option<String>,
    request_ttl: Option<String>,
    rotation_window: Option<String>,
    storage_grace: Option<String>,
    checkpoint_interval: Option<String>,
}

// ---------------------------------------------------------------- validated layer

/// A validated gateway config. Only [`Config::from_toml`] makes one.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the SQLite state, the spools and (by default) recordings and keys live.
    pub data_dir: PathBuf,
    /// The host key, the user CA, the signing keys, the pinned signing keys and the vault
    /// KEK file (`keys_dir`, default `<data_dir>/keys`).
    pub keys_dir: PathBuf,
    /// Where the state lives: a SQLite file, or a PostgreSQL database shared by a cluster.
    pub state: StateConfig,
    /// This node's part in a cluster (used with a PostgreSQL state store).
    pub cluster: ClusterConfig,
    /// The address the SSH listener binds.
    pub ssh_listen: SocketAddr,
    /// The address the HTTP (JSON API) listener binds, if any.
    pub http_listen: Option<SocketAddr>,
    /// The address the PostgreSQL listener binds, if any.
    pub pg_listen: Option<SocketAddr>,
    /// Peers (load balancers) that must start every connection on every listener with a
    /// PROXY protocol header naming the client (see `proxy_protocol`).
    pub proxy_protocol_from: crate::proxy_protocol::Trusted,
    /// PEM certificate chain and key the PostgreSQL listener presents (TLS required when set).
    pub pg_tls: Option<(PathBuf, PathBuf)>,
    /// The web UI and its login links.
    pub web: WebConfig,
    /// Largest message a PostgreSQL client may send; a longer one ends the connection with
    /// FATAL 08P01 before its body is read.
    pub pg_max_message: usize,
    /// Everyone who may be admitted, keyed by name.
    pub people: BTreeMap<String, PersonConfig>,
    /// Everything people may be admitted to, keyed by name (the SSH login name).
    pub targets: BTreeMap<String, TargetConfig>,
    /// Directory of the local-filesystem recording store.
    pub storage_dir: PathBuf,
    /// The S3 recording store, when `storage.kind = "s3"` (else the local directory is used).
    pub s3: Option<S3Config>,
    /// JSONL file the SIEM events are appended to.
    pub siem_file: PathBuf,
    /// The spool and every SIEM sink (the default file is the sink named `file`).
    pub siem: siem::SiemSettings,
    /// Session and grant limits.
    pub limits: Limits,
    /// Where alerts go.
    pub webhooks: Vec<Webhook>,
    /// Extra CA (PEM) trusted for https webhooks.
    pub alerts_ca_file: Option<PathBuf>,
    /// Post-incident review rules.
    pub reviews: ReviewRules,
    /// Where the vault's key-encryption key comes from.
    pub kek: KekSource,
    /// What the break-glass reports compare sessions against.
    pub reports: ReportsConfig,
    /// `[drills] every`: each target needs a passed drill at least this often, else a
    /// `drill_overdue` alert is raised (None: drills are not required).
    pub drills_every: Option<Duration>,
    /// `[findings]`: the audit-finding rules' settings.
    pub findings: FindingsConfig,
    /// `[incidents]`: the post-incident timeline's limits.
    pub incidents: IncidentsConfig,
    /// Which manifest signing keys `verify` (online) trusts.
    pub signing: SigningConfig,
}

/// The `[reports]` table.
#[derive(Debug, Clone, Default)]
pub struct ReportsConfig {
    /// Planned maintenance (UTC). A break-glass session that starts outside every window is
    /// counted as `outside_windows`; with no windows, every session is.
    pub maintenance_windows: Vec<MaintenanceWindow>,
}

/// One recurring maintenance window, `DAYS HH:MM-HH:MM` in UTC: DAYS is `daily`, a day
/// (`Mon`..`Sun`) or a range (`Mon-Fri`; `Fri-Mon` wraps over the weekend). An end before
/// the start wraps past midnight into the next day; `24:00` is allowed as an end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaintenanceWindow {
    /// The text as configured, for reports and error messages.
    source: String,
    /// Days the window opens on, bit 0 = Monday .. bit 6 = Sunday.
    days: u8,
    /// Opening and closing minute of the day (`end` may be 1440, and less than `start` when
    /// the window wraps past midnight).
    start: u32,
    end: u32,
}

const DAY_NAMES: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

impl MaintenanceWindow {
    /// Parses `DAYS HH:MM-HH:MM`; the error says what is wrong, without the key.
    pub fn parse(text: &str) -> Result<MaintenanceWindow, String> {
        let shape = "expected `DAYS HH:MM-HH:MM` like `Sat 02:00-06:00` or `Mon-Fri 22:00-02:00`";
        let mut parts = text.split_whitespace();
        let (Some(days), Some(times), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(format!("`{text}`: {shape}"));
        };
        let day = |d: &str| -> Result<u32, String> {
            DAY_NAMES
                .iter()
                .position(|n| n.eq_ignore_ascii_case(d))
                .map(|i| i as u32)
                .ok_or_else(|| {
                    format!(
                        "`{text}`: `{d}` is not `daily` or a day Mon, Tue, Wed, Thu, Fri, Sat, Sun"
                    )
                })
        };
        let days = if days.eq_ignore_ascii_case("daily") {
            0x7f
        } else if let Some((from, to)) = days.split_once('-') {
            let (from, to) = (day(from)?, day(to)?);
            let mut set = 0u8;
            let mut d = from;
            loop {
                set |= 1 << d;
                if d == to {
                    break;
                }
                d = (d + 1) % 7;
            }
            set
        } else {
            1 << day(days)?
        };
        let (start, end) = times
            .split_once('-')
            .ok_or_else(|| format!("`{text}`: {shape}"))?;
        let minute = |t: &str, end: bool| -> Result<u32, String> {
            let bad = || format!("`{text}`: `{t}` is not a time HH:MM (00:00 to 23:59)");
            let (h, m) = t.split_once(':').ok_or_else(bad)?;
            if h.len() != 2 || m.len() != 2 {
                return Err(bad());
            }
            let (h, m): (u32, u32) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
            match (h, m) {
                (24, 0) if end => Ok(1440),
                (0..=23, 0..=59) => Ok(h * 60 + m),
                _ => Err(bad()),
            }
        };
        let (start, end) = (minute(start, false)?, minute(end, true)?);
        if start == end {
            return Err(format!("`{text}`: the window is empty (start equals end)"));
        }
        Ok(MaintenanceWindow {
            source: text.to_string(),
            days,
            start,
            end,
        })
    }

    /// Whether `at` falls in the window (start inclusive, end exclusive).
    pub fn contains(&self, at: chrono::DateTime<chrono::Utc>) -> bool {
        use chrono::{Datelike, Timelike};
        let day = at.weekday().num_days_from_monday();
        let yesterday = (day + 6) % 7;
        let open_on = |d: u32| self.days & (1 << d) != 0;
        // Seconds of the day, so 05:59:59 is before a 06:00 end.
        let t = at.num_seconds_from_midnight();
        let (start, end) = (self.start * 60, self.end * 60);
        if start < end {
            open_on(day) && start <= t && t < end
        } else {
            // Wraps past midnight: the evening part belongs to today, the morning part to
            // the window that opened yesterday.
            (open_on(day) && t >= start) || (open_on(yesterday) && t < end)
        }
    }
}

impl std::fmt::Display for MaintenanceWindow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.source)
    }
}

/// Post-incident review deadlines (by scenario) and who may sign off.
#[derive(Debug, Clone)]
pub struct ReviewRules {
    pub security_patch: Duration,
    pub production_outage: Duration,
    pub system_failure: Duration,
    pub other: Duration,
    /// Whether the requester or an approver may sign off their own incident's review.
    pub reviewer_may_be_participant: bool,
}

impl ReviewRules {
    /// The review deadline for a scenario.
    pub fn due_after(&self, scenario: &str) -> Duration {
        match scenario {
            "security_patch" => self.security_patch,
            "production_outage" => self.production_outage,
            "system_failure" => self.system_failure,
            _ => self.other,
        }
    }
}

/// One person: their keys identify them.
#[derive(Debug, Clone)]
pub struct PersonConfig {
    pub name: String,
    /// Inline OpenSSH public keys (already parsed).
    pub ssh_keys: Vec<PublicKey>,
    /// Public key files read at build time.
    pub ssh_key_files: Vec<PathBuf>,
    pub roles: Vec<String>,
}

/// How the gateway proves itself to a target's sshd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamAuth {
    /// A per-session ed25519 user certificate signed by the gateway's CA, valid until the
    /// session deadline; the target trusts the CA through `TrustedUserCAKeys`.
    Certificate,
    /// A private key held by the gateway for this target.
    Key(PathBuf),
}

/// Where a target's pinned host key comes from.
#[derive(Debug, Clone)]
pub enum HostKeySource {
    Inline(PublicKey),
    File(PathBuf),
}

/// S3 Object Lock mode applied to every recording object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectLock {
    /// Nobody, not even the root account, can delete or shorten retention.
    Compliance,
    /// Users with a special permission can bypass; for testing lock setups.
    Governance,
    /// No per-object lock headers (the bucket default, if any, still applies).
    None,
}

/// The S3 recording store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Config {
    pub bucket: String,
    /// Key prefix inside the bucket (no leading or trailing `/`).
    pub prefix: String,
    pub region: String,
    /// A custom endpoint (MinIO, Ceph, moto); unset for AWS.
    pub endpoint: Option<String>,
    pub object_lock: ObjectLock,
    pub retention_days: u32,
    /// Run even if the bucket has no Object Lock (not WORM!).
    pub allow_unlocked: bool,
}

/// What a target speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Ssh,
    Postgres,
}

impl Protocol {
    /// The name events and reports use (`ssh`, `postgres`).
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Ssh => "ssh",
            Protocol::Postgres => "postgres",
        }
    }
}

/// Whether and how the gateway encrypts its connection to a PostgreSQL target. The trust root
/// is always the target's own `ca_file`, never the public roots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamTls {
    /// Plain TCP (the default).
    Disable,
    /// TLS; the server's certificate must chain to a certificate in the file (or be one of
    /// them), but its name is not checked: for targets reached by an address the certificate
    /// does not name.
    Require(PathBuf),
    /// TLS; as `Require`, and the certificate must name the host part of the target's address.
    VerifyFull(PathBuf),
}

impl UpstreamTls {
    /// The file of trusted certificates, when TLS is on.
    pub fn ca_file(&self) -> Option<&Path> {
        match self {
            UpstreamTls::Disable => None,
            UpstreamTls::Require(f) | UpstreamTls::VerifyFull(f) => Some(f),
        }
    }
}

/// Where the vault's key-encryption key comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KekSource {
    /// A file (created with a random key on first start if absent).
    File(PathBuf),
    /// An environment variable holding 32 bytes as hex or base64.
    Env(String),
}

/// One break-glass target.
#[derive(Debug, Clone)]
pub struct TargetConfig {
    pub name: String,
    pub protocol: Protocol,
    /// PostgreSQL targets: the database to connect to (default `postgres`).
    pub database: String,
    /// `host:port` of the target's sshd or PostgreSQL server.
    pub address: String,
    /// PostgreSQL targets: TLS to the target and what it trusts.
    pub tls: UpstreamTls,
    /// SSH targets: the pinned host key (PostgreSQL targets have none).
    pub host_key: Option<HostKeySource>,
    /// The break-glass account on the target.
    pub login: String,
    pub auth: UpstreamAuth,
    /// Who may approve requests: person names, or `role:NAME` for everyone with that role.
    pub approvers: Vec<String>,
    /// Approvals a request needs; 1 is the two-person rule (requester plus one approver).
    pub required_approvals: usize,
    /// Longest grant a request for this target may ask for.
    pub max_duration: Duration,
    /// People responsible for the break-glass account; told of every request.
    pub custodians: Vec<String>,
    /// Whether a person may grant themselves access in an emergency (loud alert, mandatory
    /// review).
    pub emergency_self_service: bool,
    /// Input typed while the target does not echo it (a password at a prompt) is kept out of
    /// the recording, the extracted commands, the SIEM and the search index (default true;
    /// see `record::echo` for the rule).
    pub redact_no_echo: bool,
    /// PostgreSQL targets: whether the gateway answers a cleartext or md5 password request
    /// with the vault's password. Off by default (SCRAM-SHA-256 only, -PLUS under TLS); only
    /// allowed with `tls = "verify-full"`, so the password never goes to an unverified server.
    pub allow_password_auth: bool,
    /// PostgreSQL targets under TLS: SCRAM must be SCRAM-SHA-256-PLUS, bound to the
    /// certificate the gateway saw (`channel_binding = "require"`, the default); false with
    /// `channel_binding = "prefer"`.
    pub channel_binding_required: bool,
    /// Targets with `disable_between_grants`: on PostgreSQL, the role that switches `login`
    /// between LOGIN (while a grant or its rotation needs it) and NOLOGIN; on SSH (auth =
    /// "key"), the account that puts the held key into `authorized_keys` and takes it out.
    pub admin_login: Option<String>,
    /// SSH targets with `disable_between_grants`: the private key that logs in as
    /// `admin_login`.
    pub admin_key: Option<PathBuf>,
    /// auth = "key": the target's authorized_keys file (relative to the login's home), which
    /// rotation rewrites to swap the gateway-held key.
    pub authorized_keys: String,
}

impl TargetConfig {
    /// Whether `person` (with `roles`) may approve requests for this target.
    pub fn is_approver(&self, person: &str, roles: &[String]) -> bool {
        self.approvers
            .iter()
            .any(|a| match a.strip_prefix("role:") {
                Some(role) => roles.iter().any(|r| r == role),
                None => a == person,
            })
    }
}

/// The web UI on the HTTP listener.
#[derive(Debug, Clone)]
pub struct WebConfig {
    /// The base URL people reach the UI at, used in login links (default: the listener's
    /// address, http or https by `tls`).
    pub public_url: Option<String>,
    /// PEM certificate chain and key: the HTTP listener speaks TLS (rustls) when set.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Where asciinema-player's bundle (from npm, `npm ci --prefix web`) is served from.
    pub player_dir: PathBuf,
    /// How long a login link from `ssh GATEWAY login` stays usable (it works once).
    pub login_link_ttl: Duration,
    /// How long a browser stays logged in after using a link.
    pub session_ttl: Duration,
}

/// Session and grant limits.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Upper bound on any one session, whatever the grant says.
    pub max_session_ttl: Duration,
    /// Grant length when `grant add` has no `--for`.
    pub default_grant_ttl: Duration,
    /// Upper bound on any grant.
    pub max_grant_ttl: Duration,
    /// Lower bound on any grant or request (`--for`): shorter ones are refused, since a
    /// break-glass session must have time to do anything (default 1m).
    pub min_grant_ttl: Duration,
    /// When to warn the user before the deadline, longest first.
    pub warn_before: Vec<Duration>,
    /// Authenticated connections per listener (SSH, PostgreSQL); more are refused after
    /// authentication, with a message. Connections still authenticating do not count.
    pub max_connections: usize,
    /// Connections per listener that have not authenticated yet (see `preauth`).
    pub preauth_max: usize,
    /// Of those, at most this many from one source address (IPv6: one /64).
    pub preauth_per_source: usize,
    /// Concurrent HTTP connections (API, web UI, metrics).
    pub http_max_connections: usize,
    /// Environment variables a client may pass (`*` suffix = prefix match).
    pub env_allow: Vec<String>,
    /// How long the relay waits for the recorder before ending the session (fail closed).
    pub recorder_stall_timeout: Duration,
    /// Recorder flush interval: no more than this much data is held unflushed.
    pub flush_interval: Duration,
    /// Time an unauthenticated connection may take to log in.
    pub login_grace: Duration,
    /// A request not approved within this time expires.
    pub request_ttl: Duration,
    /// Exposed break-glass credentials are rotated within this time after a grant ends.
    pub rotation_window: Duration,
    /// How long a live session survives a recording-store outage (data held and retried).
    pub storage_grace: Duration,
    /// How often a live session sends its recording's chain head to the SIEM.
    pub checkpoint_interval: Duration,
}

/// `postgres.max_message` when unset.
const DEFAULT_PG_MAX_MESSAGE: usize = 64 << 20;

/// PostgreSQL itself refuses messages over 1 GiB.
const MAX_PG_MAX_MESSAGE: usize = 1 << 30;

/// A byte count: a plain number, or a number with B, KiB, MiB or GiB (kB, MB and GB, as
/// PostgreSQL writes them, mean the same powers of 1024).
fn parse_size(key: &str, raw: RawSize) -> Result<u64, ConfigError> {
    let text = match raw {
        RawSize::Bytes(n) => return Ok(n),
        RawSize::Text(t) => t,
    };
    let t = text.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits);
    let scale: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "kB" => 1 << 10,
        "MiB" | "MB" => 1 << 20,
        "GiB" | "GB" => 1 << 30,
        _ => 0,
    };
    num.parse::<u64>()
        .ok()
        .filter(|_| scale > 0)
        .and_then(|n| n.checked_mul(scale))
        .ok_or_else(|| invalid(key, format!("`{text}` is not a size like 64MiB or 65536")))
}

/// A secret given inline or, better, through an environment variable.
fn secret(
    key: &str,
    inline: Option<String>,
    env: Option<String>,
) -> Result<Option<String>, ConfigError> {
    match (inline, env) {
        (Some(_), Some(_)) => Err(invalid(
            key,
            "set either the value or the _env name, not both",
        )),
        (Some(v), None) => Ok(Some(v)),
        (None, Some(var)) => std::env::var(&var).map(Some).map_err(|_| {
            invalid(
                format!("{key}_env"),
                format!("environment variable {var} is not set"),
            )
        }),
        (None, None) => Ok(None),
    }
}

fn siem_settings(
    raw: RawSiem,
    file: &Path,
    data_dir: &Path,
) -> Result<siem::SiemSettings, ConfigError> {
    use siem::{Format, SinkConfig, SinkKind, Transport};
    let format = |key: &str, v: Option<String>| -> Result<Format, ConfigError> {
        let v = v.unwrap_or_else(|| "seed".into());
        Format::parse(&v).ok_or_else(|| {
            invalid(
                key,
                format!("`{v}` is not one of \"seed\", \"ocsf\", \"cef\""),
            )
        })
    };
    let rotate = |key: &str, v: Option<String>| -> Result<u64, ConfigError> {
        match v {
            None => Ok(100 << 20),
            Some(v) => {
                let n = parse_size(key, RawSize::Text(v))?;
                if n < 4096 {
                    return Err(invalid(key, "must be at least 4KiB"));
                }
                Ok(n)
            }
        }
    };
    let mut settings = siem::SiemSettings::file_only(
        file,
        &raw.spool
            .map(|p| expand_home(&p))
            .unwrap_or_else(|| data_dir.join("siem-spool.sqlite")),
    );
    settings.sinks[0].format = format("siem.format", raw.format)?;
    settings.sinks[0].actions = raw.actions;
    settings.sinks[0].kind = SinkKind::File {
        path: file.to_path_buf(),
        rotate_bytes: rotate("siem.rotate", raw.rotate)?,
    };
    if let Some(n) = raw.spool_max_events {
        if n == 0 {
            return Err(invalid("siem.spool_max_events", "must be more than zero"));
        }
        settings.spool_max_events = n;
    }
    settings.fail_closed_backlog = raw.fail_closed_backlog;
    for (i, r) in raw.sinks.into_iter().enumerate() {
        let key = format!("siem.sinks[{i}]");
        let k = |f: &str| format!("{key}.{f}");
        if r.name.is_empty()
            || !r
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(invalid(k("name"), "use letters, digits, - and _"));
        }
        if settings.sinks.iter().any(|s| s.name == r.name) {
            return Err(invalid(
                k("name"),
                format!("`{}` is used twice (`file` is the default file)", r.name),
            ));
        }
        let need = |f: &str, v: Option<String>| -> Result<String, ConfigError> {
            v.filter(|v| !v.is_empty())
                .ok_or_else(|| invalid(k(f), format!("required for kind = \"{}\"", r.kind)))
        };
        let url = |v: Option<String>| -> Result<crate::outbound::Url, ConfigError> {
            crate::outbound::Url::parse(&need("url", v)?).map_err(|e| invalid(k("url"), e))
        };
        let ca_file = r.ca_file.map(|p| expand_home(&p));
        if let Some(p) = &ca_file {
            if !p.is_file() {
                return Err(invalid(
                    k("ca_file"),
                    format!("{} is not a file", p.display()),
                ));
            }
        }
        let kind = match r.kind.as_str() {
            "file" => SinkKind::File {
                path: r
                    .path
                    .map(|p| expand_home(&p))
                    .ok_or_else(|| invalid(k("path"), "required for kind = \"file\""))?,
                rotate_bytes: rotate(&k("rotate"), r.rotate)?,
            },
            "syslog" => {
                let address = need("address", r.address)?;
                if !address.contains(':') {
                    return Err(invalid(
                        k("address"),
                        format!("`{address}` needs a port, e.g. 127.0.0.1:6514"),
                    ));
                }
                let transport = match r.transport.as_deref().unwrap_or("tcp") {
                    "tcp" => Transport::Tcp,
                    "tls" => Transport::Tls,
                    "udp" => Transport::Udp,
                    other => {
                        return Err(invalid(
                            k("transport"),
                            format!("`{other}` is not one of \"tcp\", \"tls\", \"udp\""),
                        ))
                    }
                };
                SinkKind::Syslog {
                    address,
                    transport,
                    ca_file,
                    server_name: r.server_name,
                    app_name: r.app_name.unwrap_or_else(|| "breakglass".into()),
                }
            }
            "splunk_hec" => {
                let mut url = url(r.url)?;
                if url.path == "/" {
                    url.path = "/services/collector/event".into();
                }
                SinkKind::SplunkHec {
                    url,
                    token: secret(&k("token"), r.token, r.token_env)?.ok_or_else(|| {
                        invalid(
                            k("token"),
                            "required for kind = \"splunk_hec\" (or token_env)",
                        )
                    })?,
                    ack: r.ack,
                    index: r.index,
                    ca_file,
                }
            }
            "webhook" => SinkKind::Webhook {
                url: url(r.url)?,
                bearer: secret(&k("token"), r.token, r.token_env)?,
                hmac_secret: secret(&k("hmac_secret"), r.hmac_secret, r.hmac_secret_env)?,
                ca_file,
            },
            other => {
                return Err(invalid(
                    k("kind"),
                    format!(
                        "`{other}` is not one of \"file\", \"syslog\", \"splunk_hec\", \"webhook\""
                    ),
                ))
            }
        };
        let batch = r.batch.unwrap_or(100);
        if batch == 0 || batch > 10_000 {
            return Err(invalid(k("batch"), "must be between 1 and 10000"));
        }
        let timeout = parse_duration(&k("timeout"), r.timeout.as_deref().unwrap_or("10s"))?;
        if timeout.is_zero() {
            return Err(invalid(k("timeout"), "must be more than zero"));
        }
        settings.sinks.push(SinkConfig {
            name: r.name,
            format: format(&k("format"), r.format)?,
            actions: r.actions,
            batch,
            timeout,
            kind,
        });
    }
    Ok(settings)
}

fn parse_duration(key: &str, s: &str) -> Result<Duration, ConfigError> {
    humantime::parse_duration(s.trim())
        .map_err(|e| invalid(key, format!("`{s}` is not a duration like 30m or 4h: {e}")))
}

/// Expands a leading `~/` to `$HOME/`.
pub fn expand_home(p: &Path) -> PathBuf {
    if let Ok(rest) = p.strip_prefix("~") {
        if let Some(home) = std::env::var_os("HOME") {
            return PathBuf::from(home).join(rest);
        }
    }
    p.to_path_buf()
}

/// The SSH login name of the control channel (`ssh breakglass@gateway status`).
pub const CONTROL_LOGIN: &str = "breakglass";

/// Names used as SSH login names and storage key parts: letters, digits, `.`, `_`, `-`.
fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-')
}

/// An account name safe to write unquoted after `~` in a shell word.
fn valid_login(s: &str) -> bool {
    valid_name(s) && !s.starts_with(['-', '.'])
}

fn parse_pubkey(key: &str, s: &str) -> Result<PublicKey, ConfigError> {
    PublicKey::from_openssh(s.trim())
        .map_err(|e| invalid(key, format!("not a valid OpenSSH public key: {e}")))
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let cfg = Config::from_toml(&text)?;
        // Relative paths in the config are relative to the config file's directory's parent
        // working directory: we keep them relative to the process working directory, which is
        // what the README quickstart and systemd unit (WorkingDirectory=) use.
        Ok(cfg)
    }

    /// Parses and validates config text. Pure: no I/O.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        validate(raw)
    }

    /// Whether several nodes may share this config's state: a PostgreSQL state store.
    pub fn is_cluster(&self) -> bool {
        matches!(self.state, StateConfig::Postgres(_))
    }
}

fn validate(raw: RawConfig) -> Result<Config, ConfigError> {
    let data_dir = expand_home(&raw.data_dir);
    let keys_dir = raw
        .keys_dir
        .as_deref()
        .map(expand_home)
        .unwrap_or_else(|| data_dir.join("keys"));
    let state = cluster::state(raw.state, &data_dir)?;
    let cluster = cluster::cluster(raw.cluster)?;
    let ssh_listen: SocketAddr = raw.listeners.ssh.parse().map_err(|e| {
        invalid(
            "listeners.ssh",
            format!(
                "`{}` is not an address like 127.0.0.1:2222: {e}",
                raw.listeners.ssh
            ),
        )
    })?;

    let http_listen = match &raw.listeners.http {
        Some(a) => Some(a.parse::<SocketAddr>().map_err(|e| {
            invalid(
                "listeners.http",
                format!("`{a}` is not an address like 127.0.0.1:8080: {e}"),
            )
        })?),
        None => None,
    };
    let pg_listen = match &raw.listeners.postgres {
        Some(a) => Some(a.parse::<SocketAddr>().map_err(|e| {
            invalid(
                "listeners.postgres",
                format!("`{a}` is not an address like 127.0.0.1:6432: {e}"),
            )
        })?),
        None => None,
    };
    let proxy_protocol_from =
        crate::proxy_protocol::Trusted::parse(&raw.listeners.proxy_protocol_from)
            .map_err(|why| invalid("listeners.proxy_protocol_from", why))?;
    let pg_tls = match (raw.postgres.tls_cert, raw.postgres.tls_key) {
        (Some(c), Some(k)) => Some((expand_home(&c), expand_home(&k))),
        (None, None) => None,
        _ => return Err(invalid("postgres.tls_key", "set both tls_cert and tls_key")),
    };
    let pg_max_message = match raw.postgres.max_message {
        None => DEFAULT_PG_MAX_MESSAGE,
        Some(size) => {
            let n = parse_size("postgres.max_message", size)?;
            if !(1024..=MAX_PG_MAX_MESSAGE as u64).contains(&n) {
                return Err(invalid(
                    "postgres.max_message",
                    "must be at least 1KiB and at most 1GiB (PostgreSQL's own limit)",
                ));
            }
            n as usize
        }
    };
    let web = {
        let w = raw.web;
        let tls = match (w.tls_cert, w.tls_key) {
            (Some(c), Some(k)) => Some((expand_home(&c), expand_home(&k))),
            (None, None) => None,
            _ => return Err(invalid("web.tls_key", "set both tls_cert and tls_key")),
        };
        if let Some(u) = &w.public_url {
            if !(u.starts_with("http://") || u.starts_with("https://")) {
                return Err(invalid(
                    "web.public_url",
                    format!("`{u}` must start with http:// or https://"),
                ));
            }
        }
        let login_link_ttl = match &w.login_link_ttl {
            Some(s) => parse_duration("web.login_link_ttl", s)?,
            None => Duration::from_secs(300),
        };
        if login_link_ttl > Duration::from_secs(3600) || login_link_ttl.is_zero() {
            return Err(invalid(
                "web.login_link_ttl",
                "must be more than 0 and at most 1h: a login link is a bearer secret",
            ));
        }
        let session_ttl = match &w.session_ttl {
            Some(s) => parse_duration("web.session_ttl", s)?,
            None => Duration::from_secs(8 * 3600),
        };
        if session_ttl > Duration::from_secs(24 * 3600) || session_ttl.is_zero() {
            return Err(invalid(
                "web.session_ttl",
                "must be more than 0 and at most 24h",
            ));
        }
        WebConfig {
            public_url: w.public_url.map(|u| u.trim_end_matches('/').to_string()),
            tls,
            player_dir: w
                .player_dir
                .map(|d| expand_home(&d))
                .unwrap_or_else(|| PathBuf::from("web/node_modules/asciinema-player/dist/bundle")),
            login_link_ttl,
            session_ttl,
        }
    };
    let mut people = BTreeMap::new();
    let mut seen_keys: BTreeMap<String, String> = BTreeMap::new();
    for (i, p) in raw.people.into_iter().enumerate() {
        let base = format!("people[{i}]");
        if !valid_name(&p.name) {
            return Err(invalid(
                format!("{base}.name"),
                format!("`{}` must be 1-64 letters, digits, '.', '_' or '-'", p.name),
            ));
        }
        if p.ssh_keys.is_empty() && p.ssh_key_files.is_empty() {
            return Err(invalid(
                format!("{base}.ssh_keys"),
                format!(
                    "person `{}` has no SSH key, so they could never log in",
                    p.name
                ),
            ));
        }
        let mut keys = Vec::new();
        for (j, k) in p.ssh_keys.iter().enumerate() {
            let key = format!("{base}.ssh_keys[{j}]");
            let pk = parse_pubkey(&key, k)?;
            let fp = pk.fingerprint(Default::default()).to_string();
            if let Some(other) = seen_keys.insert(fp.clone(), p.name.clone()) {
                return Err(invalid(
                    key,
                    format!(
                        "key {fp} is already the key of `{other}`; a key must identify one person"
                    ),
                ));
            }
            keys.push(pk);
        }
        let person = PersonConfig {
            name: p.name.clone(),
            ssh_keys: keys,
            ssh_key_files: p.ssh_key_files.iter().map(|f| expand_home(f)).collect(),
            roles: p.roles,
        };
        if people.insert(p.name.clone(), person).is_some() {
            return Err(invalid(
                format!("{base}.name"),
                format!("`{}` appears twice", p.name),
            ));
        }
    }

    let max_grant_ttl_for_targets = parse_duration(
        "limits.max_grant_ttl",
        raw.limits.max_grant_ttl.as_deref().unwrap_or("24h"),
    )?;
    let mut targets = BTreeMap::new();
    for (i, t) in raw.targets.into_iter().enumerate() {
        let base = format!("targets[{i}]");
        if t.name == CONTROL_LOGIN {
            return Err(invalid(
                format!("{base}.name"),
                format!("`{CONTROL_LOGIN}` is reserved for the control channel"),
            ));
        }
        if !valid_name(&t.name) {
            return Err(invalid(
                format!("{base}.name"),
                format!("`{}` must be 1-64 letters, digits, '.', '_' or '-'", t.name),
            ));
        }
        if !t.address.contains(':')
            || t.address
                .rsplit(':')
                .next()
                .and_then(|p| p.parse::<u16>().ok())
                .is_none()
        {
            return Err(invalid(
                format!("{base}.address"),
                format!("`{}` must be host:port", t.address),
            ));
        }
        let protocol = match t.protocol.as_deref() {
            None | Some("ssh") => Protocol::Ssh,
            Some("postgres") | Some("postgresql") => Protocol::Postgres,
            Some(other) => {
                return Err(invalid(
                    format!("{base}.protocol"),
                    format!("`{other}` is not one of \"ssh\", \"postgres\""),
                ))
            }
        };
        let host_key = match (t.host_key, t.host_key_file) {
            _ if protocol == Protocol::Postgres => None,
            (Some(k), None) => Some(HostKeySource::Inline(parse_pubkey(
                &format!("{base}.host_key"),
                &k,
            )?)),
            (None, Some(f)) => Some(HostKeySource::File(expand_home(&f))),
            (Some(_), Some(_)) => {
                return Err(invalid(
                    format!("{base}.host_key"),
                    "set host_key or host_key_file, not both",
                ))
            }
            (None, None) => {
                return Err(invalid(
                    format!("{base}.host_key"),
                    "the target's host key must be pinned (host_key or host_key_file)",
                ))
            }
        };
        let tls = match (t.tls.as_deref(), t.ca_file) {
            (Some(_), _) | (_, Some(_)) if protocol != Protocol::Postgres => {
                return Err(invalid(
                    format!("{base}.tls"),
                    "tls and ca_file are for PostgreSQL targets (SSH targets pin host_key)",
                ))
            }
            (None | Some("disable"), None) => UpstreamTls::Disable,
            (None | Some("disable"), Some(_)) => {
                return Err(invalid(
                    format!("{base}.ca_file"),
                    "only used with tls = \"require\" or \"verify-full\"",
                ))
            }
            (Some("require"), Some(f)) => UpstreamTls::Require(expand_home(&f)),
            (Some("verify-full"), Some(f)) => UpstreamTls::VerifyFull(expand_home(&f)),
            (Some(mode @ ("require" | "verify-full")), None) => {
                return Err(invalid(
                    format!("{base}.ca_file"),
                    format!("tls = \"{mode}\" needs ca_file, the CA or server certificate to trust (the gateway never trusts public roots or an unverified server)"),
                ))
            }
            (Some(other), _) => {
                return Err(invalid(
                    format!("{base}.tls"),
                    format!("`{other}` is not one of \"disable\", \"require\", \"verify-full\""),
                ))
            }
        };
        let channel_binding_required = match t.channel_binding.as_deref() {
            None | Some("require") => true,
            Some("prefer") => false,
            Some(other) => {
                return Err(invalid(
                    format!("{base}.channel_binding"),
                    format!("`{other}` is not one of \"require\", \"prefer\""),
                ))
            }
        };
        if t.allow_password_auth && !matches!(tls, UpstreamTls::VerifyFull(_)) {
            return Err(invalid(
                format!("{base}.allow_password_auth"),
                "a cleartext or md5 password goes only to a verified server: set tls = \"verify-full\" and ca_file, or leave it off (SCRAM-SHA-256)",
            ));
        }
        if t.login.is_empty() {
            return Err(invalid(
                format!("{base}.login"),
                "must name the break-glass account",
            ));
        }
        let admin_login = match (t.disable_between_grants, t.admin_login) {
            (false, None) => None,
            (false, Some(_)) => {
                return Err(invalid(
                    format!("{base}.admin_login"),
                    "only used with disable_between_grants = true",
                ))
            }
            (true, _) if protocol != Protocol::Postgres && t.auth != "key" => {
                return Err(invalid(
                    format!("{base}.disable_between_grants"),
                    "only PostgreSQL targets and SSH targets with auth = \"key\" (SSH certificate targets need no account switched off: a certificate lives as long as its session)",
                ))
            }
            (true, None) if protocol == Protocol::Ssh => {
                return Err(invalid(
                    format!("{base}.admin_login"),
                    "disable_between_grants needs admin_login, an account that may rewrite the break-glass login's authorized_keys (the held key cannot put itself back)",
                ))
            }
            (true, None) => {
                return Err(invalid(
                    format!("{base}.admin_login"),
                    "disable_between_grants needs admin_login, a role that may ALTER ROLE the break-glass role (a NOLOGIN role cannot switch itself back on)",
                ))
            }
            (true, Some(a)) if a == t.login || a.is_empty() => {
                return Err(invalid(
                    format!("{base}.admin_login"),
                    "must be another role than login",
                ))
            }
            (true, Some(a)) => Some(a),
        };
        let admin_key = match (&admin_login, t.admin_key_file, protocol) {
            (Some(_), Some(f), Protocol::Ssh) => Some(expand_home(&f)),
            (Some(_), None, Protocol::Ssh) => {
                return Err(invalid(
                    format!("{base}.admin_key_file"),
                    "an SSH target with disable_between_grants needs admin_key_file, the private key that logs in as admin_login",
                ))
            }
            (_, None, _) => None,
            (_, Some(_), _) => {
                return Err(invalid(
                    format!("{base}.admin_key_file"),
                    "only used by SSH targets with disable_between_grants = true",
                ))
            }
        };
        if admin_key.is_some() && !valid_login(&t.login) {
            return Err(invalid(
                format!("{base}.login"),
                "with disable_between_grants an SSH login must be a plain account name (letters, digits, `.`, `_`, `-`)",
            ));
        }
        let auth = match (t.auth.as_str(), t.key_file) {
            ("certificate", None) => UpstreamAuth::Certificate,
            ("certificate", Some(_)) => {
                return Err(invalid(
                    format!("{base}.key_file"),
                    "only used with auth = \"key\"",
                ))
            }
            ("key", Some(f)) => UpstreamAuth::Key(expand_home(&f)),
            ("key", None) => {
                return Err(invalid(
                    format!("{base}.key_file"),
                    "auth = \"key\" needs key_file, the private key the gateway holds",
                ))
            }
            (other, _) => {
                return Err(invalid(
                    format!("{base}.auth"),
                    format!("`{other}` is not one of \"certificate\", \"key\""),
                ))
            }
        };
        for (j, a) in t.approvers.iter().chain(t.custodians.iter()).enumerate() {
            let name = a.strip_prefix("role:").unwrap_or(a);
            if !valid_name(name) {
                return Err(invalid(
                    format!("{base}.approvers/custodians[{j}]"),
                    format!("`{a}` is not a person name or role:NAME"),
                ));
            }
            if !a.starts_with("role:") && !people.contains_key(a) {
                return Err(invalid(
                    format!("{base}.approvers/custodians[{j}]"),
                    format!("`{a}` is not a person in [[people]]"),
                ));
            }
        }
        let required_approvals = t.required_approvals.unwrap_or(1);
        if required_approvals == 0 {
            return Err(invalid(
                format!("{base}.required_approvals"),
                "must be at least 1 (the two-person rule); use emergency_self_service for self-granted access",
            ));
        }
        let max_duration = match t.max_duration {
            Some(d) => parse_duration(&format!("{base}.max_duration"), &d)?,
            None => max_grant_ttl_for_targets,
        };
        let target = TargetConfig {
            name: t.name.clone(),
            protocol,
            database: t.database.unwrap_or_else(|| "postgres".into()),
            address: t.address,
            tls,
            host_key,
            login: t.login,
            auth,
            approvers: t.approvers,
            required_approvals,
            max_duration,
            custodians: t.custodians,
            emergency_self_service: t.emergency_self_service,
            redact_no_echo: t.redact_no_echo,
            allow_password_auth: t.allow_password_auth,
            channel_binding_required,
            admin_login,
            admin_key,
            authorized_keys: t
                .authorized_keys
                .unwrap_or_else(|| ".ssh/authorized_keys".into()),
        };
        if targets.insert(t.name.clone(), target).is_some() {
            return Err(invalid(
                format!("{base}.name"),
                format!("`{}` appears twice", t.name),
            ));
        }
    }

    let s3 = match raw.storage.kind.as_deref() {
        None | Some("local") => None,
        Some("s3") => {
            let bucket = raw
                .storage
                .bucket
                .clone()
                .filter(|b| !b.is_empty())
                .ok_or_else(|| invalid("storage.bucket", "kind = \"s3\" needs a bucket"))?;
            let lock = match raw.storage.object_lock.as_deref().unwrap_or("compliance") {
                "compliance" => ObjectLock::Compliance,
                "governance" => ObjectLock::Governance,
                "none" => ObjectLock::None,
                other => {
                    return Err(invalid(
                        "storage.object_lock",
                        format!("`{other}` is not one of \"compliance\", \"governance\", \"none\""),
                    ))
                }
            };
            let retention_days = raw.storage.retention_days.unwrap_or(365);
            if lock != ObjectLock::None && retention_days == 0 {
                return Err(invalid(
                    "storage.retention_days",
                    "must be at least 1 with object_lock",
                ));
            }
            if let Some(e) = &raw.storage.endpoint {
                if !(e.starts_with("http://") || e.starts_with("https://")) {
                    return Err(invalid(
                        "storage.endpoint",
                        format!("`{e}` must start with http:// or https://"),
                    ));
                }
            }
            Some(S3Config {
                bucket,
                prefix: raw
                    .storage
                    .prefix
                    .clone()
                    .unwrap_or_default()
                    .trim_matches('/')
                    .to_string(),
                region: raw
                    .storage
                    .region
                    .clone()
                    .unwrap_or_else(|| "us-east-1".into()),
                endpoint: raw.storage.endpoint.clone(),
                object_lock: lock,
                retention_days,
                allow_unlocked: raw.storage.allow_unlocked,
            })
        }
        Some(other) => {
            return Err(invalid(
                "storage.kind",
                format!("`{other}` is not one of \"local\", \"s3\""),
            ))
        }
    };
    let storage_dir = raw
        .storage
        .path
        .map(|p| expand_home(&p))
        .unwrap_or_else(|| data_dir.join("recordings"));
    let siem_file = raw
        .siem
        .file
        .clone()
        .map(|p| expand_home(&p))
        .unwrap_or_else(|| data_dir.join("siem.jsonl"));
    let siem = siem_settings(raw.siem, &siem_file, &data_dir)?;

    let l = raw.limits;
    let dur = |key: &str, v: Option<String>, default: &str| -> Result<Duration, ConfigError> {
        parse_duration(&format!("limits.{key}"), v.as_deref().unwrap_or(default))
    };
    let max_session_ttl = dur("max_session_ttl", l.max_session_ttl, "8h")?;
    let default_grant_ttl = dur("default_grant_ttl", l.default_grant_ttl, "4h")?;
    let max_grant_ttl = dur("max_grant_ttl", l.max_grant_ttl, "24h")?;
    let min_grant_ttl = dur("min_grant_ttl", l.min_grant_ttl, "1m")?;
    if min_grant_ttl.is_zero() || min_grant_ttl > default_grant_ttl {
        return Err(invalid(
            "limits.min_grant_ttl",
            "must be more than zero and at most limits.default_grant_ttl",
        ));
    }
    if max_session_ttl.is_zero() {
        return Err(invalid("limits.max_session_ttl", "must be more than zero"));
    }
    if default_grant_ttl.is_zero() || default_grant_ttl > max_grant_ttl {
        return Err(invalid(
            "limits.default_grant_ttl",
            "must be more than zero and at most limits.max_grant_ttl",
        ));
    }
    let mut warn_before = Vec::new();
    for (i, w) in l
        .warn_before
        .unwrap_or_else(|| vec!["5m".into(), "1m".into()])
        .iter()
        .enumerate()
    {
        warn_before.push(parse_duration(&format!("limits.warn_before[{i}]"), w)?);
    }
    warn_before.sort_by(|a, b| b.cmp(a));
    warn_before.dedup();
    let max_connections = l.max_connections.unwrap_or(512);
    if max_connections == 0 {
        return Err(invalid("limits.max_connections", "must be at least 1"));
    }
    let preauth_max = l.preauth_max.unwrap_or(512);
    if preauth_max == 0 {
        return Err(invalid("limits.preauth_max", "must be at least 1"));
    }
    let preauth_per_source = l.preauth_per_source.unwrap_or(32);
    if preauth_per_source == 0 {
        return Err(invalid("limits.preauth_per_source", "must be at least 1"));
    }
    let http_max_connections = l.http_max_connections.unwrap_or(256);
    if http_max_connections == 0 {
        return Err(invalid("limits.http_max_connections", "must be at least 1"));
    }
    let env_allow = l
        .env_allow
        .unwrap_or_else(|| vec!["LANG".into(), "LC_*".into(), "TZ".into()]);
    let recorder_stall_timeout = dur("recorder_stall_timeout", l.recorder_stall_timeout, "5s")?;
    let flush_interval = dur("flush_interval", l.flush_interval, "500ms")?;
    if flush_interval.is_zero() || flush_interval > Duration::from_secs(1) {
        return Err(invalid(
            "limits.flush_interval",
            "must be more than zero and at most 1s (a crash may lose at most this much)",
        ));
    }
    let login_grace = dur("login_grace", l.login_grace, "30s")?;
    let request_ttl = dur("request_ttl", l.request_ttl, "1h")?;
    let rotation_window = dur("rotation_window", l.rotation_window, "1h")?;
    let storage_grace = dur("storage_grace", l.storage_grace, "10s")?;
    let checkpoint_interval = dur("checkpoint_interval", l.checkpoint_interval, "5m")?;
    if checkpoint_interval.is_zero() {
        return Err(invalid(
            "limits.checkpoint_interval",
            "must be more than zero",
        ));
    }

    let mut webhooks = Vec::new();
    for (i, h) in raw.alerts.webhooks.into_iter().enumerate() {
        let key = format!("alerts.webhooks[{i}]");
        let url =
            crate::outbound::Url::parse(&h.url).map_err(|e| invalid(format!("{key}.url"), e))?;
        let format = match h.format.as_str() {
            "json" => WebhookFormat::Json,
            "slack" => WebhookFormat::Slack,
            other => {
                return Err(invalid(
                    format!("{key}.format"),
                    format!("`{other}` is not one of \"json\", \"slack\""),
                ))
            }
        };
        let header = match h.header {
            Some(hv) => match hv.split_once(':') {
                Some((k, v))
                    if !k.trim().is_empty()
                        && !k.contains(['\r', '\n'])
                        && !v.contains(['\r', '\n']) =>
                {
                    Some((k.trim().to_string(), v.trim().to_string()))
                }
                _ => {
                    return Err(invalid(
                        format!("{key}.header"),
                        "must be `Name: value` on one line",
                    ))
                }
            },
            None => None,
        };
        webhooks.push(Webhook {
            url,
            format,
            header,
        });
    }

    let mut names = BTreeSet::new();
    for t in targets.keys() {
        names.insert(t.clone());
    }

    Ok(Config {
        ssh_listen,
        http_listen,
        pg_listen,
        proxy_protocol_from,
        pg_tls,
        pg_max_message,
        web,
        people,
        targets,
        storage_dir,
        s3,
        siem_file,
        siem,
        limits: Limits {
            max_session_ttl,
            default_grant_ttl,
            max_grant_ttl,
            min_grant_ttl,
            warn_before,
            max_connections,
            preauth_max,
            preauth_per_source,
            http_max_connections,
            env_allow,
            recorder_stall_timeout,
            flush_interval,
            login_grace,
            request_ttl,
            rotation_window,
            storage_grace,
            checkpoint_interval,
        },
        webhooks,
        alerts_ca_file: raw.alerts.ca_file.map(|p| expand_home(&p)),
        reviews: ReviewRules {
            security_patch: parse_duration(
                "reviews.security_patch",
                raw.reviews.security_patch.as_deref().unwrap_or("24h"),
            )?,
            production_outage: parse_duration(
                "reviews.production_outage",
                raw.reviews.production_outage.as_deref().unwrap_or("48h"),
            )?,
            system_failure: parse_duration(
                "reviews.system_failure",
                raw.reviews.system_failure.as_deref().unwrap_or("48h"),
            )?,
            other: parse_duration(
                "reviews.other",
                raw.reviews.other.as_deref().unwrap_or("48h"),
            )?,
            reviewer_may_be_participant: raw.reviews.reviewer_may_be_participant,
        },
        kek: match (raw.vault.kek_file, raw.vault.kek_env) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "vault.kek_env",
                    "set kek_file or kek_env, not both",
                ))
            }
            (Some(f), None) => KekSource::File(expand_home(&f)),
            (None, Some(v)) => KekSource::Env(v),
            (None, None) => KekSource::File(keys_dir.join("vault.kek")),
        },
        findings: findings_config(&raw.findings)?,
        incidents: incidents_config(&raw.incidents)?,
        drills_every: raw
            .drills
            .every
            .as_deref()
            .map(|v| parse_duration("drills.every", v))
            .transpose()?,
        reports: ReportsConfig {
            maintenance_windows: raw
                .reports
                .maintenance_windows
                .iter()
                .enumerate()
                .map(|(i, w)| {
                    MaintenanceWindow::parse(w)
                        .map_err(|why| invalid(format!("reports.maintenance_windows[{i}]"), why))
                })
                .collect::<Result<_, _>>()?,
        },
        signing: SigningConfig {
            trusted_keys: raw
                .signing
                .trusted_keys
                .iter()
                .enumerate()
                .map(|(i, l)| {
                    signing::PublicKey::parse_line(l)
                        .map_err(|why| invalid(format!("signing.trusted_keys[{i}]"), why))
                })
                .collect::<Result<_, _>>()?,
            trusted_keys_file: raw
                .signing
                .trusted_keys_file
                .map(|p| expand_home(&p))
                .unwrap_or_else(|| signing::default_pin_file(&keys_dir)),
        },
        data_dir,
        keys_dir,
        state,
        cluster,
    })
}

/// A person's keys after reading key files; used by the SSH listener to identify people.
#[derive(Debug, Clone)]
pub struct KeyIndex {
    /// Fingerprint (SHA-256) → person name.
    by_fingerprint: BTreeMap<String, String>,
}

impl KeyIndex {
    /// Every (fingerprint, person) pair.
    pub fn entries(&self) -> impl Iterator<Item = (&str, &str)> {
        self.by_fingerprint
            .iter()
            .map(|(f, p)| (f.as_str(), p.as_str()))
    }

    /// The person a verified public key belongs to.
    pub fn person_for(&self, key: &PublicKey) -> Option<&str> {
        self.by_fingerprint
            .get(&key.fingerprint(Default::default()).to_string())
            .map(String::as_str)
    }
}

/// Everything `build` loads from disk.
#[derive(Debug, Clone)]
pub struct Built {
    pub keys: KeyIndex,
    /// Problems that leave one person or target unusable but the gateway running (a key file
    /// that does not exist yet); `serve` logs them and `check-config` prints them.
    pub warnings: Vec<String>,
    /// Target name → pinned host key.
    pub host_keys: BTreeMap<String, PublicKey>,
    /// PostgreSQL target name → the certificates of its `ca_file`, the only ones its TLS
    /// trusts. The composition root (`server::pg_client_tls`) builds the TLS settings.
    pub pg_ca: BTreeMap<String, PinnedCa>,
}

/// A target's `ca_file`, read.
#[derive(Debug, Clone)]
pub struct PinnedCa {
    /// The file, for error messages.
    pub file: PathBuf,
    /// Its PEM text.
    pub pem: Vec<u8>,
    /// `verify-full`: the certificate must also name the host.
    pub verify_name: bool,
}

impl Config {
    /// Reads the files the config names (key files, pinned host key files). Errors name the
    /// config key at fault.
    pub fn build(&self) -> Result<Built, ConfigError> {
        let mut by_fingerprint = BTreeMap::new();
        let mut warnings = Vec::new();
        for p in self.people.values() {
            let mut all = p.ssh_keys.clone();
            for (j, f) in p.ssh_key_files.iter().enumerate() {
                let key = format!("people.{}.ssh_key_files[{j}]", p.name);
                if !f.exists() {
                    warnings.push(format!(
                        "config key `{key}`: {} does not exist; {} cannot log in with it",
                        f.display(),
                        p.name
                    ));
                    continue;
                }
                let text = std::fs::read_to_string(f)
                    .map_err(|e| invalid(&key, format!("cannot read {}: {e}", f.display())))?;
                for line in text
                    .lines()
                    .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
                {
                    all.push(parse_pubkey(&key, line)?);
                }
            }
            for k in all {
                let fp = k.fingerprint(Default::default()).to_string();
                if let Some(other) = by_fingerprint.insert(fp.clone(), p.name.clone()) {
                    if other != p.name {
                        return Err(invalid(
                            format!("people.{}", p.name),
                            format!("key {fp} also belongs to `{other}`; a key must identify one person"),
                        ));
                    }
                }
            }
        }
        if let (Some(a), None) = (self.http_listen, &self.web.public_url) {
            if a.ip().is_unspecified() {
                warnings.push(format!(
                    "config key `web.public_url` is not set and listeners.http is {a}: login links will name {a}, which browsers cannot reach; set it to the address people use"
                ));
            }
        }
        let mut host_keys = BTreeMap::new();
        let mut pg_ca = BTreeMap::new();
        for t in self.targets.values() {
            let Some(f) = t.tls.ca_file() else {
                continue;
            };
            let key = format!("targets.{}.ca_file", t.name);
            if !f.exists() {
                warnings.push(format!(
                    "config key `{key}`: {} does not exist; sessions to {} are refused until it does",
                    f.display(),
                    t.name
                ));
                continue;
            }
            let pem = std::fs::read(f)
                .map_err(|e| invalid(&key, format!("cannot read {}: {e}", f.display())))?;
            let verify_name = matches!(t.tls, UpstreamTls::VerifyFull(_));
            pg_ca.insert(
                t.name.clone(),
                PinnedCa {
                    file: f.to_path_buf(),
                    pem,
                    verify_name,
                },
            );
        }
        for t in self.targets.values() {
            let key = format!("targets.{}.host_key_file", t.name);
            let pk = match &t.host_key {
                None => continue,
                Some(HostKeySource::Inline(k)) => k.clone(),
                Some(HostKeySource::File(f)) if !f.exists() => {
                    warnings.push(format!(
                        "config key `{key}`: {} does not exist; sessions to {} are refused until it does",
                        f.display(),
                        t.name
                    ));
                    continue;
                }
                Some(HostKeySource::File(f)) => {
                    let text = std::fs::read_to_string(f)
                        .map_err(|e| invalid(&key, format!("cannot read {}: {e}", f.display())))?;
                    parse_pubkey(&key, &text)?
                }
            };
            host_keys.insert(t.name.clone(), pk);
            if let UpstreamAuth::Key(f) = &t.auth {
                let key = format!("targets.{}.key_file", t.name);
                russh::keys::PrivateKey::read_openssh_file(f).map_err(|e| {
                    invalid(
                        &key,
                        format!("cannot load private key {}: {e}", f.display()),
                    )
                })?;
            }
        }
        Ok(Built {
            keys: KeyIndex { by_fingerprint },
            warnings,
            host_keys,
            pg_ca,
        })
    }

    /// Whether a client-supplied environment variable may be passed upstream.
    pub fn env_allowed(&self, name: &str) -> bool {
        self.limits
            .env_allow
            .iter()
            .any(|pat| match pat.strip_suffix('*') {
                Some(prefix) => name.starts_with(prefix),
                None => pat == name,
            })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    const KEY: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGb7mZ1Bq0Ckq8xN3sKZ0x0pXqk8iJ9C1m3xNnXo9b7c alice";

    pub(crate) fn base() -> String {
        format!(
            r#"
data_dir = "/tmp/bg"
[listeners]
ssh = "127.0.0.1:2222"
[[people]]
name = "alice"
ssh_keys = ["{KEY}"]
[[targets]]
name = "web-01"
address = "127.0.0.1:22"
host_key = "{KEY}"
login = "root"
"#
        )
    }

    #[test]
    fn valid_config_has_defaults() {
        let c = Config::from_toml(&base()).expect("base config is valid");
        assert_eq!(c.limits.default_grant_ttl, Duration::from_secs(4 * 3600));
        assert_eq!(
            c.limits.warn_before,
            vec![Duration::from_secs(300), Duration::from_secs(60)]
        );
        assert_eq!(c.targets["web-01"].auth, UpstreamAuth::Certificate);
        assert_eq!(c.storage_dir, PathBuf::from("/tmp/bg/recordings"));
    }

    #[test]
    fn errors_name_the_key() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "ssh = \"127.0.0.1:2222\"",
                "ssh = \"nope\"",
                "listeners.ssh",
            ),
            ("name = \"web-01\"", "name = \"web 01\"", "targets[0].name"),
            (
                "address = \"127.0.0.1:22\"",
                "address = \"host\"",
                "targets[0].address",
            ),
            (
                "login = \"root\"",
                "login = \"root\"\nauth = \"magic\"",
                "targets[0].auth",
            ),
            (
                "login = \"root\"",
                "login = \"root\"\nauth = \"key\"",
                "targets[0].key_file",
            ),
            (
                "[[targets]]",
                "[limits]\nmax_session_ttl = \"soon\"\n[[targets]]",
                "limits.max_session_ttl",
            ),
            (
                "[[targets]]",
                "[limits]\nflush_interval = \"5s\"\n[[targets]]",
                "limits.flush_interval",
            ),
            (
                "login = \"root\"",
                "login = \"root\"\ntls = \"require\"\nca_file = \"/ca.pem\"",
                "targets[0].tls",
            ),
            (
                "login = \"root\"",
                "login = \"root\"\ndisable_between_grants = true\nadmin_login = \"keeper\"",
                "targets[0].disable_between_grants",
            ),
            (
                "login = \"root\"",
                "login = \"root\"\nauth = \"key\"\nkey_file = \"/k\"\ndisable_between_grants = true",
                "targets[0].admin_login",
            ),
            (
                "login = \"root\"",
                "login = \"root\"\nauth = \"key\"\nkey_file = \"/k\"\ndisable_between_grants = true\nadmin_login = \"keeper\"",
                "targets[0].admin_key_file",
            ),
            (
                "login = \"root\"",
                "login = \"-root\"\nauth = \"key\"\nkey_file = \"/k\"\ndisable_between_grants = true\nadmin_login = \"keeper\"\nadmin_key_file = \"/a\"",
                "targets[0].login",
            ),
            (
                "login = \"root\"",
                "login = \"root\"\nadmin_key_file = \"/a\"",
                "targets[0].admin_key_file",
            ),
        ];
        for (from, to, key) in cases {
            let text = base().replacen(from, to, 1);
            let err = Config::from_toml(&text).expect_err(key).to_string();
            assert!(err.contains(key), "error `{err}` should name `{key}`");
        }
    }

    #[test]
    fn signing_trust_is_pinned_in_the_config() {
        let c = Config::from_toml(&base()).expect("valid");
        assert!(c.signing.trusted_keys.is_empty());
        assert_eq!(
            c.signing.trusted_keys_file,
            PathBuf::from("/tmp/bg/keys/trusted-signing.pub")
        );
        let key = signing::PublicKey::from_raw(vec![7; 32]);
        let c = Config::from_toml(&format!(
            "{}\n[signing]\ntrusted_keys = [\"{}\"]\ntrusted_keys_file = \"/etc/bg/trust.pub\"\n",
            base(),
            key.line()
        ))
        .expect("valid");
        assert_eq!(c.signing.trusted_keys, vec![key.clone()]);
        assert_eq!(
            c.signing.trusted_keys_file,
            PathBuf::from("/etc/bg/trust.pub")
        );
        for bad in [
            "ed25519 AAAA".to_string(),
            format!("{} \\n{}", key.line(), key.line()),
            key.line().replace(&key.id, "0000000000000000"),
            String::new(),
        ] {
            let err = Config::from_toml(&format!(
                "{}\n[signing]\ntrusted_keys = [\"{bad}\"]\n",
                base()
            ))
            .expect_err(&bad)
            .to_string();
            assert!(err.contains("signing.trusted_keys[0]"), "{err}");
        }
    }

    #[test]
    fn postgres_max_message_takes_bytes_or_units() {
        let with =
            |v: &str| Config::from_toml(&format!("{}\n[postgres]\nmax_message = {v}\n", base()));
        assert_eq!(
            Config::from_toml(&base()).expect("valid").pg_max_message,
            64 << 20
        );
        for (v, want) in [
            ("65536", 65536),
            ("\"64MiB\"", 64 << 20),
            ("\"512 KiB\"", 512 << 10),
            ("\"1kB\"", 1024),
            ("\"1GiB\"", 1 << 30),
        ] {
            assert_eq!(with(v).expect(v).pg_max_message, want, "{v}");
        }
        for v in [
            "1023",
            "\"2GiB\"",
            "\"lots\"",
            "\"5 parsecs\"",
            "\"MiB\"",
            "-1",
        ] {
            let err = with(v).expect_err(v).to_string();
            assert!(err.contains("max_message"), "{v}: {err}");
        }
    }

    #[test]
    fn postgres_target_tls_needs_a_ca_file() {
        let pg = |extra: &str| {
            Config::from_toml(&format!(
                "{}\n[[targets]]\nname = \"db\"\nprotocol = \"postgres\"\naddress = \"db.internal:5432\"\nlogin = \"bg\"\n{extra}\n",
                base()
            ))
        };
        assert_eq!(
            pg("").expect("valid").targets["db"].tls,
            UpstreamTls::Disable
        );
        assert_eq!(
            pg("tls = \"verify-full\"\nca_file = \"/etc/ca.pem\"")
                .expect("valid")
                .targets["db"]
                .tls,
            UpstreamTls::VerifyFull("/etc/ca.pem".into())
        );
        assert_eq!(
            pg("tls = \"require\"\nca_file = \"/etc/ca.pem\"")
                .expect("valid")
                .targets["db"]
                .tls,
            UpstreamTls::Require("/etc/ca.pem".into())
        );
        assert!(pg("").expect("valid").targets["db"].channel_binding_required);
        assert!(
            !pg("channel_binding = \"prefer\"").expect("valid").targets["db"]
                .channel_binding_required
        );
        for (extra, key, why) in [
            ("tls = \"require\"", "targets[1].ca_file", "needs ca_file"),
            (
                "tls = \"verify-full\"",
                "targets[1].ca_file",
                "needs ca_file",
            ),
            (
                "ca_file = \"/etc/ca.pem\"",
                "targets[1].ca_file",
                "only used with",
            ),
            (
                "tls = \"prefer\"\nca_file = \"/ca\"",
                "targets[1].tls",
                "not one of",
            ),
            (
                "allow_password_auth = true",
                "targets[1].allow_password_auth",
                "verify-full",
            ),
            (
                "allow_password_auth = true\ntls = \"require\"\nca_file = \"/ca\"",
                "targets[1].allow_password_auth",
                "verify-full",
            ),
            (
                "channel_binding = \"disable\"",
                "targets[1].channel_binding",
                "not one of",
            ),
        ] {
            let err = pg(extra).expect_err(extra).to_string();
            assert!(err.contains(key) && err.contains(why), "{extra}: {err}");
        }
    }

    #[test]
    fn maintenance_window_errors_name_the_key_and_the_problem() {
        let cases: &[(&str, &str)] = &[
            ("Sat", "expected `DAYS HH:MM-HH:MM`"),
            ("Sat 02:00-06:00 extra", "expected `DAYS HH:MM-HH:MM`"),
            ("Someday 02:00-06:00", "`Someday` is not `daily` or a day"),
            ("Mon-Funday 02:00-06:00", "`Funday` is not `daily` or a day"),
            ("Sat 02:00", "expected `DAYS HH:MM-HH:MM`"),
            ("Sat 2:00-06:00", "`2:00` is not a time HH:MM"),
            ("Sat 02:60-06:00", "`02:60` is not a time HH:MM"),
            ("Sat 24:00-06:00", "`24:00` is not a time HH:MM"),
            ("Sat 02:00-25:00", "`25:00` is not a time HH:MM"),
            ("Sat 0a:00-06:00", "`0a:00` is not a time HH:MM"),
            ("daily 03:00-03:00", "the window is empty"),
        ];
        for (window, want) in cases {
            let text = format!(
                "{}\n[reports]\nmaintenance_windows = [\"daily 01:00-01:30\", \"{window}\"]\n",
                base()
            );
            let err = Config::from_toml(&text).expect_err(window).to_string();
            assert!(
                err.contains("reports.maintenance_windows[1]") && err.contains(want),
                "{window}: error `{err}` should name the key and say `{want}`"
            );
        }
        let text = format!("{}\n[reports]\nwindows = []\n", base());
        assert!(
            Config::from_toml(&text).is_err(),
            "unknown key in [reports]"
        );
    }

    #[test]
    fn maintenance_windows_contain_the_right_times() {
        use chrono::TimeZone;
        // 2024-06-03 is a Monday.
        let at = |day: u32, h: u32, m: u32, s: u32| {
            chrono::Utc
                .with_ymd_and_hms(2024, 6, day, h, m, s)
                .single()
                .expect("valid time")
        };
        let cases: &[(&str, chrono::DateTime<chrono::Utc>, bool)] = &[
            ("Sat 02:00-06:00", at(8, 2, 0, 0), true),
            ("Sat 02:00-06:00", at(8, 5, 59, 59), true),
            ("Sat 02:00-06:00", at(8, 6, 0, 0), false),
            ("Sat 02:00-06:00", at(8, 1, 59, 59), false),
            ("Sat 02:00-06:00", at(9, 3, 0, 0), false),
            ("daily 01:00-01:30", at(4, 1, 15, 0), true),
            ("DAILY 01:00-01:30", at(9, 1, 29, 0), true),
            ("daily 01:00-01:30", at(4, 1, 30, 0), false),
            // Mon-Fri evenings, wrapping into the next morning.
            ("Mon-Fri 22:00-02:00", at(3, 22, 0, 0), true),
            ("Mon-Fri 22:00-02:00", at(4, 1, 59, 0), true),
            ("Mon-Fri 22:00-02:00", at(3, 1, 0, 0), false),
            ("Mon-Fri 22:00-02:00", at(8, 1, 0, 0), true),
            ("Mon-Fri 22:00-02:00", at(8, 22, 30, 0), false),
            ("Mon-Fri 22:00-02:00", at(9, 1, 0, 0), false),
            ("Mon-Fri 22:00-02:00", at(5, 12, 0, 0), false),
            // A day range that wraps over the weekend.
            ("Fri-Mon 10:00-11:00", at(9, 10, 30, 0), true),
            ("Fri-Mon 10:00-11:00", at(3, 10, 30, 0), true),
            ("Fri-Mon 10:00-11:00", at(4, 10, 30, 0), false),
            ("sun 23:00-24:00", at(9, 23, 59, 59), true),
            ("sun 23:00-24:00", at(10, 0, 0, 0), false),
            ("daily 00:00-24:00", at(5, 17, 0, 0), true),
        ];
        for (window, t, want) in cases {
            let w = MaintenanceWindow::parse(window).expect(window);
            assert_eq!(w.contains(*t), *want, "{window} at {t}");
            assert_eq!(w.to_string(), *window, "Display gives back the source");
        }
    }

    #[test]
    fn a_wildcard_http_listener_without_public_url_warns_about_login_links() {
        let with = |extra: &str| {
            let text = base().replace(
                "ssh = \"127.0.0.1:2222\"",
                &format!("ssh = \"127.0.0.1:2222\"\n{extra}"),
            );
            Config::from_toml(&text)
                .expect("valid")
                .build()
                .expect("builds")
                .warnings
        };
        let w = with("http = \"0.0.0.0:8080\"");
        assert!(
            w.iter()
                .any(|w| w.contains("web.public_url") && w.contains("0.0.0.0:8080")),
            "{w:?}"
        );
        assert!(with("http = \"127.0.0.1:8080\"").is_empty());
        let text = format!(
            "{}\n[web]\npublic_url = \"https://gw.example\"\n",
            base().replace(
                "ssh = \"127.0.0.1:2222\"",
                "ssh = \"127.0.0.1:2222\"\nhttp = \"0.0.0.0:8080\""
            )
        );
        let c = Config::from_toml(&text).expect("valid");
        assert!(c.build().expect("builds").warnings.is_empty());
    }

    #[test]
    fn unknown_keys_are_refused() {
        let text = base().replace("login = \"root\"", "login = \"root\"\npassword = \"x\"");
        let err = Config::from_toml(&text)
            .expect_err("unknown key")
            .to_string();
        assert!(err.contains("password"), "{err}");
    }

    #[test]
    fn env_allow_list_matches_prefixes() {
        let c = Config::from_toml(&base()).expect("valid");
        assert!(c.env_allowed("LANG"));
        assert!(c.env_allowed("LC_ALL"));
        assert!(!c.env_allowed("LD_PRELOAD"));
    }
}
