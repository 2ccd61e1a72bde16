//! The gateway as a library function: [`run`] builds everything from a validated config,
//! serves until `shutdown` resolves, then drains in order.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;

use crate::config::{Built, Config};
use crate::keys::GatewayKeys;
use crate::shutdown::Shutdown;
use crate::siem::Siem;
use crate::storage::RecordingStore;

pub use crate::services::{CancelTarget, Gateway};

/// The TLS client settings of each PostgreSQL target: trust only the certificates of its
/// `ca_file`. The composition root builds TLS settings; `config` only reads the files.
pub fn pg_client_tls(
    built: &Built,
) -> Result<BTreeMap<String, Arc<tokio_rustls::rustls::ClientConfig>>, crate::config::ConfigError> {
    built
        .pg_ca
        .iter()
        .map(|(name, ca)| {
            crate::pg::upstream::tls_config(&ca.pem, ca.verify_name)
                .map(|c| (name.clone(), c))
                .map_err(|e| crate::config::ConfigError::Invalid {
                    key: format!("targets.{name}.ca_file"),
                    why: format!("{}: {e}", ca.file.display()),
                })
        })
        .collect()
}

/// A startup failure.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Keys(#[from] crate::keys::KeyError),
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    #[error(transparent)]
    Storage(#[from] crate::storage::StorageError),
    #[error(transparent)]
    Siem(#[from] crate::siem::SiemError),
    #[error(transparent)]
    Signing(#[from] crate::signing::SigningError),
    #[error("cluster identity: {0}. Every node of a cluster must load the same keys, so none is generated: create them once with `breakglass keys init` and give every node the same keys_dir")]
    Identity(String),
    #[error("node id `{0}` is in use: another running gateway renews its lease; give each node its own [cluster] node_id (or $BREAKGLASS_NODE_ID)")]
    NodeIdInUse(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// The long-lived keys a start would generate because their files are missing: the host
/// key, the user CA, the first signing key and its pin, the vault KEK file. A single node
/// generates them; a cluster node refuses (see [`Gateway::build`]).
pub fn identity_missing(config: &Config) -> Vec<String> {
    let mut missing = Vec::new();
    for (what, path) in [
        ("the SSH host key", GatewayKeys::host_path(&config.keys_dir)),
        ("the user CA", GatewayKeys::ca_path(&config.keys_dir)),
    ] {
        if !path.is_file() {
            missing.push(format!("{what} {} is missing", path.display()));
        }
    }
    if crate::signing::found_keys(&config.keys_dir).is_empty() {
        missing.push(format!(
            "a signing key in {} is missing",
            crate::signing::key_dir(&config.keys_dir).display()
        ));
    }
    if config.signing.trusted_keys.is_empty() && !config.signing.trusted_keys_file.is_file() {
        missing.push(format!(
            "the signing key pin file {} is missing",
            config.signing.trusted_keys_file.display()
        ));
    }
    if let crate::config::KekSource::File(p) = &config.kek {
        if !p.is_file() {
            missing.push(format!("the vault KEK {} is missing", p.display()));
        }
    }
    missing
}

/// Where a started gateway listens.
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    pub ssh: SocketAddr,
    pub http: Option<SocketAddr>,
    pub postgres: Option<SocketAddr>,
}

impl Gateway {
    /// Builds the gateway's parts (I/O: keys, state file, stores).
    pub async fn build(config: Config) -> Result<Arc<Gateway>, StartError> {
        let built = config.build()?;
        let pg_tls = pg_client_tls(&built)?;
        for w in &built.warnings {
            tracing::warn!("{w}");
        }
        std::fs::create_dir_all(&config.data_dir).map_err(|e| {
            crate::storage::StorageError::Backend(format!(
                "create data dir {}: {e}",
                config.data_dir.display()
            ))
        })?;
        if config.is_cluster() {
            let missing = identity_missing(&config);
            if !missing.is_empty() {
                return Err(StartError::Identity(missing.join("; ")));
            }
        }
        let keys = GatewayKeys::load_or_create(&config.keys_dir)?;
        let store = crate::state::open(&config.state).await?;
        let recordings = RecordingStore::from_config(&config)?;
        let siem_stop = tokio_util::sync::CancellationToken::new();
        let siem = Siem::open_for(&config, &*store)
            .await?
            .start(siem_stop.clone())?;
        // The newest *trusted* key signs: a key dropped into the key directory is never used.
        let signer = crate::signing::Signer::load_or_create_pinned(
            &config.keys_dir,
            &config.signing.trusted_keys_file,
        )?;
        let trust = config.signing.trust(&config.keys_dir)?;
        for w in &trust.warnings {
            tracing::warn!("{w}");
        }
        let signer = Arc::new(signer.use_trusted(&trust)?);
        let tls = crate::alerts::tls_config(config.alerts_ca_file.as_deref()).map_err(|e| {
            crate::config::ConfigError::Invalid {
                key: "alerts.ca_file".into(),
                why: e,
            }
        })?;
        let alerter = crate::alerts::Alerter::start(config.webhooks.clone(), tls);
        {
            let alerter = alerter.clone();
            siem.on_dead_letter(Arc::new(move |sink, e, why, file| {
                alerter.notify_dead_letter(sink, e, why, file)
            }));
        }
        let admission = crate::preauth::Admission::new(&config.limits, &config.proxy_protocol_from);
        let shutdown = Shutdown::new();
        let membership = Arc::new(crate::cluster::Membership::new(
            config.cluster.node_id(),
            config.cluster.lease,
            store.clone(),
        ));
        let core = Arc::new(crate::session::Core {
            store: store.clone(),
            siem: siem.clone(),
            alerter: alerter.clone(),
            recordings: recordings.clone(),
            custodians: config
                .targets
                .iter()
                .map(|(name, t)| (name.clone(), t.custodians.clone()))
                .collect(),
            warn_before: config.limits.warn_before.clone(),
            checkpoint_interval: config.limits.checkpoint_interval,
            live: Default::default(),
            node_id: membership.node_id.clone(),
            shutdown: shutdown.token.clone(),
            first_use: Some(Arc::new(crate::review::OpenReviews(config.reviews.clone()))),
        });
        Ok(Arc::new(Gateway {
            core,
            admission,
            config,
            built,
            pg_tls,
            keys,
            store,
            recordings,
            siem,
            siem_stop,
            signer,
            alerter,
            pg_cancel: Mutex::new(HashMap::new()),
            shutdown,
            http_bound: std::sync::OnceLock::new(),
            spool_mac: std::sync::OnceLock::new(),
            membership,
            control: Arc::new(crate::control::Channel),
        }))
    }
}

/// The listen backlog of every listener (the kernel caps it at `net.core.somaxconn`). A flood
/// that opens connections faster than the accept loop takes them must not fill the queue: a
/// full queue drops the next SYN, and the person with a grant waits for its retransmission.
pub const LISTEN_BACKLOG: u32 = 4096;

/// Binds `addr` with [`LISTEN_BACKLOG`] (`TcpListener::bind` would use 1024).
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Binds the listeners and returns their addresses plus the future that serves until
/// `shutdown` resolves. Tests bind `127.0.0.1:0` and read the port from [`Bound`].
pub async fn start(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(Bound, impl Future<Output = ()> + Send), StartError> {
    let gw = Gateway::build(config).await?;
    let addr = gw.config.ssh_listen;
    let listener = listen(addr).map_err(|source| StartError::Bind { addr, source })?;
    let ssh = listener
        .local_addr()
        .map_err(|source| StartError::Bind { addr, source })?;
    let http_listener = match gw.config.http_listen {
        Some(addr) => Some(listen(addr).map_err(|source| StartError::Bind { addr, source })?),
        None => None,
    };
    let pg_listener = match gw.config.pg_listen {
        Some(addr) => Some(listen(addr).map_err(|source| StartError::Bind { addr, source })?),
        None => None,
    };
    let postgres = match &pg_listener {
        Some(l) => Some(
            l.local_addr()
                .map_err(|source| StartError::Bind { addr, source })?,
        ),
        None => None,
    };
    let pg_tls = match &gw.config.pg_tls {
        Some((cert, key)) => Some(tls_acceptor("postgres", cert, key, &[])?),
        None => None,
    };
    let http = match &http_listener {
        Some(l) => Some(
            l.local_addr()
                .map_err(|source| StartError::Bind { addr, source })?,
        ),
        None => None,
    };
    if let Some(a) = http {
        let _ = gw.http_bound.set(a);
    }
    let web_tls = match &gw.config.web.tls {
        Some((cert, key)) => Some(tls_acceptor("web", cert, key, &[b"http/1.1"])?),
        None => None,
    };
    if let Some(s3) = &gw.config.s3 {
        check_worm(s3, &gw.recordings).await?;
    }
    match spool_key(&gw).await {
        Ok(k) => {
            let _ = gw.spool_mac.set(Arc::new(k));
        }
        Err(e) => tracing::warn!(
            error = %e,
            "the outage spool cannot be authenticated (no vault key): spooled chunks stay in the spool, unuploaded, until the gateway starts with the key"
        ),
    }
    if gw.config.is_cluster() && node_id_in_use(&gw).await {
        return Err(StartError::NodeIdInUse(gw.membership.node_id.clone()));
    }
    if let Err(e) = gw.membership.beat(0).await {
        tracing::warn!(error = %e, "could not take this node's lease; retried");
    }
    crate::ssh::session::recover_unfinished(&gw).await;
    crate::ssh::session::seal_pending(&gw).await;
    let serve = async move {
        let members = tokio::spawn(crate::ssh::session::cluster_worker(gw.clone()));
        let accept = tokio::spawn(crate::ssh::serve(listener, gw.clone()));
        let watcher = tokio::spawn(crate::session::revocation_watcher(gw.core.clone()));
        let sealer = tokio::spawn(crate::ssh::session::seal_pending_worker(gw.clone()));
        let expiry = tokio::spawn(crate::control::request_expiry(gw.clone()));
        let overdue = tokio::spawn(crate::review::overdue_watcher(gw.core.clone()));
        let leads: Arc<dyn Fn() -> bool + Send + Sync> = {
            let gw = gw.clone();
            Arc::new(move || gw.membership.is_leader())
        };
        let timeline = tokio::spawn(crate::incident::overdue_watcher(
            gw.core.clone(),
            crate::incident::Limits::of(&gw.config),
            leads,
        ));
        let rotation = tokio::spawn(crate::rotation::worker(gw.clone()));
        let indexer = tokio::spawn(crate::web::evidence::indexer(gw.clone()));
        let pg = pg_listener.map(|l| tokio::spawn(crate::pg::serve(l, gw.clone(), pg_tls)));
        let api = http_listener.map(|l| {
            let token = gw.shutdown.token.clone();
            let app = crate::web::router(gw.clone());
            tokio::spawn(crate::web::serve::serve(l, gw.clone(), app, web_tls, token))
        });
        shutdown.await;
        // Drain order: say so (/healthz 503, the lease row) → stop accepting → in a cluster,
        // tell the users and give their sessions `[cluster] drain` to end → end the rest (each
        // seals its recording and emits its end event) → wait for session tasks → give the
        // SIEM workers a moment to deliver → drop the lease → exit. Every event is already in
        // the durable spool; what is not delivered now is delivered by the next start.
        gw.membership.drain();
        let _ = gw.membership.beat(gw.live_sessions().len() as u64).await;
        accept.abort();
        if let Some(pg) = pg {
            pg.abort();
        }
        let live = gw.live_sessions();
        if gw.config.is_cluster() && !live.is_empty() && !gw.config.cluster.drain.is_zero() {
            let drain = gw.config.cluster.drain;
            tracing::info!(sessions = live.len(), drain = ?drain, "draining: no new connections, live sessions told");
            let text = format!(
                "this gateway node ({}) is going away: the session ends in {}. Reconnect and you reach another node.",
                gw.membership.node_id,
                humantime::format_duration(drain)
            );
            // A client that stops reading must not hold up the drain.
            futures::future::join_all(
                live.iter()
                    .map(|s| tokio::time::timeout(Duration::from_secs(1), s.tell(&text))),
            )
            .await;
            let until = tokio::time::Instant::now() + drain;
            while tokio::time::Instant::now() < until && !gw.live_sessions().is_empty() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        tracing::info!("shutting down: no new connections, ending live sessions");
        gw.shutdown.token.cancel();
        for s in gw.live_sessions() {
            s.kill(crate::session::EndReason::Shutdown);
        }
        gw.shutdown.tracker.close();
        let sealed = tokio::time::timeout(Duration::from_secs(30), gw.shutdown.tracker.wait())
            .await
            .is_ok();
        if !sealed {
            tracing::warn!("sessions did not finish sealing within 30s");
        }
        let flush_until = tokio::time::Instant::now() + Duration::from_secs(3);
        while tokio::time::Instant::now() < flush_until
            && gw.siem.stats().await.iter().any(|s| s.queued > 0)
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        gw.siem_stop.cancel();
        members.abort();
        // With every session sealed nothing is left to take over; otherwise the lease lapses
        // and another node seals what is left.
        if sealed && nothing_left_to_seal(&gw).await {
            gw.membership.leave().await;
        }
        watcher.abort();
        sealer.abort();
        expiry.abort();
        overdue.abort();
        timeline.abort();
        rotation.abort();
        indexer.abort();
        if let Some(api) = api {
            let _ = tokio::time::timeout(Duration::from_secs(5), api).await;
        }
    };
    Ok((
        Bound {
            ssh,
            http,
            postgres,
        },
        serve,
    ))
}

/// Whether another running process holds this node's id: its lease row is live and is renewed
/// again while we watch it for one renewal interval. A live row that is not renewed is this
/// node's own, left by a crash a moment ago.
async fn node_id_in_use(gw: &Gateway) -> bool {
    let me = gw.membership.node_id.as_str();
    let row = |nodes: Vec<crate::state::NodeRow>| nodes.into_iter().find(|n| n.node_id == me);
    let Ok(Some(first)) = gw.store.nodes().await.map(row) else {
        return false;
    };
    if first.expires_at < crate::clock::now() {
        return false;
    }
    tracing::info!(
        node = me,
        "this node id's lease is live; watching it for one renewal before taking it"
    );
    tokio::time::sleep(gw.membership.interval() + Duration::from_millis(500)).await;
    matches!(gw.store.nodes().await.map(row), Ok(Some(again)) if again.renewed_at != first.renewed_at)
}

/// Whether no session of this node is open or unsealed in the store: only then may its lease
/// row go (a row that lapses instead gets what is left taken over by another node).
async fn nothing_left_to_seal(gw: &Gateway) -> bool {
    let me = gw.membership.node_id.as_str();
    match (
        gw.store.unfinished_sessions().await,
        gw.store.unsealed_sessions().await,
    ) {
        (Ok(open), Ok(unsealed)) => open.iter().chain(&unsealed).all(|r| r.node_id != me),
        _ => false,
    }
}

/// The PostgreSQL listener's TLS acceptor (ring provider) from PEM files.
/// A TLS acceptor from PEM files; `section` names the config table in errors and `alpn` the
/// protocols offered.
fn tls_acceptor(
    section: &str,
    cert: &std::path::Path,
    key: &std::path::Path,
    alpn: &[&[u8]],
) -> Result<tokio_rustls::TlsAcceptor, StartError> {
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    let bad = |key: &str, why: String| {
        StartError::Config(crate::config::ConfigError::Invalid {
            key: key.into(),
            why,
        })
    };
    let certs: Vec<_> = rustls::pki_types::CertificateDer::pem_file_iter(cert)
        .map_err(|e| {
            bad(
                &format!("{section}.tls_cert"),
                format!("{}: {e}", cert.display()),
            )
        })?
        .collect::<Result<_, _>>()
        .map_err(|e| {
            bad(
                &format!("{section}.tls_cert"),
                format!("{}: {e}", cert.display()),
            )
        })?;
    let key_der = rustls::pki_types::PrivateKeyDer::from_pem_file(key).map_err(|e| {
        bad(
            &format!("{section}.tls_key"),
            format!("{}: {e}", key.display()),
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(&format!("{section}.tls_cert"), e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)
        .map_err(|e| bad(&format!("{section}.tls_cert"), e.to_string()))?;
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
}

/// Refuses an S3 store that is not write-once, unless the config explicitly allows it.
pub async fn check_worm(
    s3: &crate::config::S3Config,
    store: &RecordingStore,
) -> Result<(), StartError> {
    if s3.allow_unlocked {
        tracing::warn!(bucket = %s3.bucket, "storage.allow_unlocked: recordings may not be write-once");
        return Ok(());
    }
    if s3.object_lock == crate::config::ObjectLock::None {
        return Err(StartError::Storage(crate::storage::StorageError::Backend(format!(
            "bucket {}: object_lock = \"none\" is not write-once; set storage.allow_unlocked = true to run anyway",
            s3.bucket
        ))));
    }
    store.check_object_lock().await.map_err(|e| {
        StartError::Storage(crate::storage::StorageError::Backend(format!(
            "bucket {}: {e}; enable Object Lock on the bucket, or set storage.allow_unlocked = true",
            s3.bucket
        )))
    })
}

/// Runs the gateway until `shutdown` resolves.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    let (bound, serve) = start(config, shutdown).await?;
    tracing::info!(ssh = %bound.ssh, http = ?bound.http, "breakglass listening");
    serve.await;
    Ok(())
}

/// Loads the outage spool's authentication key from the vault, creating it on first start.
async fn spool_key(gw: &Gateway) -> Result<crate::record::SpoolMac, String> {
    use crate::record::SpoolMac;
    let kek = crate::vault::kek(&gw.config.kek).map_err(|e| e.to_string())?;
    let name = SpoolMac::VAULT_NAME;
    let hex_key = match gw
        .store
        .vault_get(name, "current")
        .await
        .map_err(|e| e.to_string())?
    {
        Some(blob) => kek.open(name, &blob).map_err(|e| e.to_string())?,
        None => {
            let mut raw = [0u8; 32];
            ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut raw)
                .map_err(|_| "no randomness".to_string())?;
            let secret = crate::vault::Secret::new(hex::encode(raw));
            let blob = kek.seal(name, &secret).map_err(|e| e.to_string())?;
            // Of nodes starting together, the first write wins; the others use the stored one.
            let won = gw
                .store
                .vault_put_new(name, "current", &blob, crate::clock::now())
                .await
                .map_err(|e| e.to_string())?;
            if won {
                secret
            } else {
                match gw.store.vault_get(name, "current").await {
                    Ok(Some(stored)) => kek.open(name, &stored).map_err(|e| e.to_string())?,
                    Ok(None) => return Err("the spool key vanished from the vault".into()),
                    Err(e) => return Err(e.to_string()),
                }
            }
        }
    };
    let raw = hex::decode(hex_key.expose())
        .map_err(|_| "the spool key in the vault is malformed".to_string())?;
    Ok(SpoolMac::new(&raw))
}
