//! The SSH side: the accept loop, the per-connection handler that turns russh callbacks into
//! relay actions, the per-channel pumps, the upstream client and the session lifecycle.
//!
//! Login syntax: the SSH user name is the target name (`ssh -p 2222 web-01@gateway`); the
//! person is identified by their key.

pub mod handler;
pub mod session;
pub mod upstream;

use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument;

use russh::server;
use tokio::net::TcpListener;

use crate::services::Gateway;

/// What the gateway announces before the key exchange.
pub const SSH_ID: &str = "SSH-2.0-breakglass";

/// The russh server config shared by every connection.
pub fn server_config(gw: &Gateway) -> Arc<server::Config> {
    let mut methods = russh::MethodSet::empty();
    methods.push(russh::MethodKind::PublicKey);
    methods.push(russh::MethodKind::KeyboardInteractive);
    Arc::new(server::Config {
        // The product, not the library or a version: an unauthenticated probe learns no
        // more than what it reached.
        server_id: russh::SshId::Standard(SSH_ID.into()),
        methods,
        auth_rejection_time: Duration::from_millis(300),
        auth_rejection_time_initial: Some(Duration::ZERO),
        keys: vec![gw.keys.host.as_ref().clone()],
        // The session deadline ends sessions; before authentication, `login_grace` bounds
        // the whole connection, banner and key exchange included (`handler::run_connection`).
        inactivity_timeout: None,
        keepalive_interval: Some(Duration::from_secs(30)),
        keepalive_max: 3,
        nodelay: true,
        window_size: 8 << 20,
        max_auth_attempts: 6,
        ..Default::default()
    })
}

/// Accepts connections until aborted. Each connection runs in its own task; an error ends that
/// connection only. A connection first takes a place in the listener's pre-auth table (see
/// [`crate::preauth`]), which it leaves when it authenticates; admitted connections are capped
/// by `limits.max_connections` apart from it.
pub async fn serve(listener: TcpListener, gw: Arc<Gateway>) {
    let config = server_config(&gw);
    loop {
        let (socket, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = socket.set_nodelay(true);
        let gw = gw.clone();
        let config = config.clone();
        gw.shutdown.tracker.clone().spawn(async move {
            let mut socket = socket;
            // The client behind a trusted proxy's PROXY header, then a place in the table.
            let (peer, ticket) = match gw.admission.ssh.accept(&mut socket, peer).await {
                Ok(x) => x,
                Err(why) => {
                    // Counted in /metrics; a log line per refused connection would let a
                    // flood fill the disk.
                    tracing::debug!(%peer, ?why, "pre-auth limit reached, closing");
                    return;
                }
            };
            let conn_span = tracing::info_span!("conn", protocol = "ssh", %peer);
            handler::run_connection(gw, config, socket, peer, ticket)
                .instrument(conn_span)
                .await
        });
    }
}
