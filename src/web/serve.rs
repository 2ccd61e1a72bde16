//! The HTTP listener's accept loop (API, web UI, `/healthz`, `/metrics`), plain or TLS, with
//! its limits before trust:
//!
//! - at most `limits.http_max_connections` connections, and `limits.preauth_per_source` from
//!   one address, through the listener's table in [`crate::preauth`] (a connection from a quieter
//!   address displaces the busiest address's oldest one);
//! - a TLS handshake finishes within [`HANDSHAKE_TIMEOUT`];
//! - request headers arrive within [`HEADER_TIMEOUT`] (this also closes an idle keep-alive
//!   connection), and a whole request, body included, is handled within [`REQUEST_TIMEOUT`]
//!   or answered 408;
//! - request bodies are limited by the extractors (axum's 2 MiB default).

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::services::Gateway;

/// A client gets this long to finish its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// ... and this long to send each request's headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// ... and this long for a whole request, body included, before it gets 408.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves `app` on `listener` until `stop` is cancelled; then open connections finish their
/// current request and close.
pub async fn serve(
    listener: TcpListener,
    gw: Arc<Gateway>,
    app: Router,
    tls: Option<tokio_rustls::TlsAcceptor>,
    stop: CancellationToken,
) {
    let app = app.layer(axum::middleware::from_fn(request_deadline));
    let tracker = tokio_util::task::TaskTracker::new();
    loop {
        let (sock, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "HTTP accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = sock.set_nodelay(true);
        let (app, tls, stop, gw) = (app.clone(), tls.clone(), stop.clone(), gw.clone());
        tracker.spawn(async move {
            let mut sock = sock;
            // The client behind a trusted proxy's PROXY header, then a place in the table.
            let (peer, ticket) = match gw.admission.http.accept(&mut sock, peer).await {
                Ok(x) => x,
                Err(why) => {
                    tracing::debug!(%peer, ?why, "HTTP connection limit reached, closing");
                    return;
                }
            };
            let evicted = ticket.evicted.clone();
            let run = async {
                match tls {
                    Some(acceptor) => {
                        match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(sock)).await {
                            Ok(Ok(s)) => connection(s, app, &stop).await,
                            Ok(Err(e)) => {
                                tracing::debug!(%peer, error = %e, "HTTPS handshake failed")
                            }
                            Err(_) => {
                                ticket.timed_out();
                                tracing::debug!(%peer, "HTTPS handshake timed out");
                            }
                        }
                    }
                    None => connection(sock, app, &stop).await,
                }
            };
            tokio::select! {
                _ = run => {}
                _ = evicted.cancelled() => {}
            }
            drop(ticket);
        });
    }
    tracker.close();
    if tokio::time::timeout(Duration::from_secs(5), tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("HTTP connections did not finish within 5s of shutdown");
    }
}

/// One HTTP/1.1 connection.
async fn connection<S>(io: S, app: Router, stop: &CancellationToken)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper_util::service::TowerToHyperService::new(app);
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(hyper_util::rt::TokioIo::new(io), service);
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(error = %e, "HTTP connection ended with an error");
            }
        }
        _ = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
        }
    }
}

/// Answers 408 to a request not handled within [`REQUEST_TIMEOUT`] (a body sent slowly).
async fn request_deadline(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    match tokio::time::timeout(REQUEST_TIMEOUT, next.run(req)).await {
        Ok(r) => r,
        Err(_) => (
            axum::http::StatusCode::REQUEST_TIMEOUT,
            [(axum::http::header::CONNECTION, "close")],
            "request not received within 30s\n",
        )
            .into_response(),
    }
}
