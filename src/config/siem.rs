//! The SIEM's configuration types: where events go and how they are encoded. Their
//! behaviour (delivery, encodings) lives in `siem`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::outbound::Url;

/// How a sink encodes events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `BREAK_GLASS_ACCESS` / `BREAK_GLASS_ACTION` JSON (recordings-schema/siem-event).
    Seed,
    /// OCSF 1.3 JSON (recordings-schema/ocsf-event).
    Ocsf,
    /// ArcSight CEF:0 text.
    Cef,
}

impl Format {
    pub fn parse(s: &str) -> Option<Format> {
        match s {
            "seed" | "json" => Some(Format::Seed),
            "ocsf" => Some(Format::Ocsf),
            "cef" => Some(Format::Cef),
            _ => None,
        }
    }
}

/// SIEM settings from the config file.
#[derive(Debug, Clone)]
pub struct SiemSettings {
    /// The spool database.
    pub spool: PathBuf,
    /// Undelivered events at which opening events (session start, request) are refused.
    pub spool_max_events: u64,
    /// When set, new sessions are refused while any sink has more undelivered events.
    pub fail_closed_backlog: Option<u64>,
    /// Every sink, the default JSONL file (`file`) first.
    pub sinks: Vec<SinkConfig>,
}

impl SiemSettings {
    /// Just the JSONL file at `path` (seed format, no action events).
    pub fn file_only(path: &Path, spool: &Path) -> SiemSettings {
        SiemSettings {
            spool: spool.to_path_buf(),
            spool_max_events: 1_000_000,
            fail_closed_backlog: None,
            sinks: vec![SinkConfig {
                name: "file".into(),
                format: Format::Seed,
                actions: false,
                batch: 1000,
                timeout: std::time::Duration::from_secs(10),
                kind: SinkKind::File {
                    path: path.to_path_buf(),
                    rotate_bytes: u64::MAX,
                },
            }],
        }
    }
}

/// How a syslog sink reaches its collector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// RFC 6587 octet counting over TCP.
    Tcp,
    /// RFC 5425: octet counting over TLS.
    Tls,
    /// RFC 5426: one message per datagram (no delivery guarantee; for legacy collectors).
    Udp,
}

/// Where a sink sends events.
#[derive(Debug, Clone)]
pub enum SinkKind {
    File {
        path: PathBuf,
        /// Rotate (rename with a UTC timestamp suffix) when the file would pass this size.
        rotate_bytes: u64,
    },
    Syslog {
        address: String,
        transport: Transport,
        /// TLS: the CA (PEM) that signs the collector's certificate; the system's web roots
        /// when absent.
        ca_file: Option<PathBuf>,
        /// TLS: the name to verify (default: the host part of `address`).
        server_name: Option<String>,
        app_name: String,
    },
    SplunkHec {
        url: Url,
        token: String,
        /// Wait for indexer acknowledgement before counting a batch delivered.
        ack: bool,
        index: Option<String>,
        ca_file: Option<PathBuf>,
    },
    Webhook {
        url: Url,
        bearer: Option<String>,
        hmac_secret: Option<String>,
        ca_file: Option<PathBuf>,
    },
}

/// One configured sink.
#[derive(Debug, Clone)]
pub struct SinkConfig {
    pub name: String,
    pub format: Format,
    /// Also send per-action events (commands, SQL statements).
    pub actions: bool,
    /// Events per delivery.
    pub batch: usize,
    /// Per-attempt time limit.
    pub timeout: Duration,
    pub kind: SinkKind,
}

impl SinkConfig {
    /// Files are local and fast: delivered inline by `emit` as well as by the worker.
    pub fn is_local(&self) -> bool {
        matches!(self.kind, SinkKind::File { .. })
    }

    pub fn kind_name(&self) -> &'static str {
        match self.kind {
            SinkKind::File { .. } => "file",
            SinkKind::Syslog {
                transport: Transport::Tcp,
                ..
            } => "syslog-tcp",
            SinkKind::Syslog {
                transport: Transport::Tls,
                ..
            } => "syslog-tls",
            SinkKind::Syslog {
                transport: Transport::Udp,
                ..
            } => "syslog-udp",
            SinkKind::SplunkHec { .. } => "splunk-hec",
            SinkKind::Webhook { .. } => "webhook",
        }
    }
}
