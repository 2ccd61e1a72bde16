//! The service bundle every connection and surface shares: the handles the composition root
//! (`server`) wires at start. Only types from the layers below appear here; `server` builds the
//! bundle ([`Gateway::build`] lives there, with the TLS settings and the I/O).
//!
//! The SSH listener hosts the control channel, a surface above it; it reaches the channel
//! through [`ControlChannel`], which the composition root supplies, so the adapter never
//! imports the workflow.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use crate::config::{Built, Config};
use crate::keys::GatewayKeys;
use crate::shutdown::Shutdown;
use crate::siem::Siem;
use crate::state::Store;
use crate::storage::RecordingStore;

/// Where a PostgreSQL cancel goes: the target's address and the upstream backend's key.
pub type CancelTarget = (String, [u8; 8]);

/// Everything a connection needs, shared by all of them.
pub struct Gateway {
    pub config: Config,
    pub built: Built,
    /// PostgreSQL target name → TLS client settings trusting only the target's `ca_file`.
    pub pg_tls: BTreeMap<String, Arc<tokio_rustls::rustls::ClientConfig>>,
    pub keys: GatewayKeys,
    pub store: Arc<dyn Store>,
    pub recordings: RecordingStore,
    pub siem: Arc<Siem>,
    /// Stops the SIEM delivery workers, after the sessions' end events are spooled.
    pub siem_stop: tokio_util::sync::CancellationToken,
    /// Signs recording manifests.
    pub signer: Arc<crate::signing::Signer>,
    /// Webhook alerts; never blocks.
    pub alerter: crate::alerts::Alerter,
    /// The session core's handle: store, SIEM, alerts, limits and the live registry.
    pub core: Arc<crate::session::Core>,
    /// PostgreSQL cancel keys: the key the client holds → (target address, upstream key).
    /// The upstream key never leaves the gateway.
    pub pg_cancel: Mutex<HashMap<[u8; 8], CancelTarget>>,
    pub shutdown: Shutdown,
    /// The address the HTTP listener got (the configured one may have port 0), for links.
    pub http_bound: std::sync::OnceLock<SocketAddr>,
    /// The outage spool's authentication key, from the vault (set at start).
    pub spool_mac: std::sync::OnceLock<Arc<crate::record::SpoolMac>>,
    /// Pre-auth tables and session permits of the listeners.
    pub admission: crate::preauth::Admission,
    /// This node's lease in the state store, and whether it drains.
    pub membership: Arc<crate::cluster::Membership>,
    /// The control channel the SSH listener hosts (the workflow's, wired by `server`).
    pub control: Arc<dyn ControlChannel>,
}

/// A control-channel command's answer: the text for the person and the exit status.
pub struct ControlReply {
    pub text: String,
    pub code: u32,
}

/// The control channel as the SSH listener sees it: one command line of a person in, one
/// reply out. The composition root wires the workflow's implementation.
#[async_trait]
pub trait ControlChannel: Send + Sync {
    async fn run(&self, gw: &Gateway, person: &str, roles: &[String], line: &str) -> ControlReply;
}

impl Gateway {
    /// The base URL of the UI for login links: `[web] public_url`, else the address the
    /// listener is bound to.
    pub fn public_url(&self) -> Option<String> {
        let cfg = &self.config;
        if let Some(u) = &cfg.web.public_url {
            return Some(u.clone());
        }
        let addr = self.http_bound.get().copied().or(cfg.http_listen)?;
        let scheme = if cfg.web.tls.is_some() {
            "https"
        } else {
            "http"
        };
        Some(format!("{scheme}://{addr}"))
    }

    /// Writes an audit event to the SIEM sink and the incident event store, and alerts.
    pub async fn audit(&self, e: &crate::siem::AccessEvent) -> Result<(), crate::siem::SiemError> {
        self.core.audit(e).await
    }

    /// How this gateway's recorders behave; `redact_no_echo` is the target's.
    pub fn recorder_settings(&self, redact_no_echo: bool) -> crate::record::RecorderSettings {
        crate::record::RecorderSettings {
            flush_interval: self.config.limits.flush_interval,
            stall: self.config.limits.recorder_stall_timeout,
            grace: self.config.limits.storage_grace,
            spool_dir: self.config.data_dir.join("spool"),
            spool_mac: self.spool_mac.get().cloned(),
            signer: self.signer.clone(),
            redact_no_echo,
            ledger: Some(self.store.clone()),
        }
    }

    /// Snapshot of the live sessions, of both protocols.
    pub fn live_sessions(&self) -> Vec<Arc<crate::session::Live>> {
        self.core.live.sessions()
    }
}
