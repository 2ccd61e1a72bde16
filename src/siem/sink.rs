//! SIEM sinks and their delivery loops. Each sink reads the spool after its own cursor,
//! delivers a batch, and moves the cursor only once the receiver has taken it: fsync for
//! files, a written and flushed stream for syslog (checked for a closed peer first), a 2xx
//! (and, with indexer acknowledgement, a confirmed ack id) for HTTP.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::format::{syslog5424, Format};
use super::spool::{Spool, Spooled};
use super::AccessEvent;
use crate::alerts::Url;
use crate::outbound::classify;
pub use crate::outbound::Failure;

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

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "breakglass".into())
}

/// Writes a batch to a JSONL (or CEF) file durably, rotating first when it would grow past
/// the limit. Rotated files are kept; retention is the operator's.
pub fn write_file(
    path: &std::path::Path,
    rotate_bytes: u64,
    format: Format,
    events: &[&AccessEvent],
) -> Result<(), String> {
    use std::io::Write;
    if events.is_empty() {
        return Ok(());
    }
    let mut buf = Vec::new();
    for e in events {
        buf.extend_from_slice(format.line(e).as_bytes());
        buf.push(b'\n');
    }
    let err = |e: std::io::Error| format!("{}: {e}", path.display());
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    if size > 0 && size + buf.len() as u64 > rotate_bytes {
        let stamp = crate::clock::now().format("%Y%m%dT%H%M%S%.3fZ");
        let rotated = PathBuf::from(format!("{}.{stamp}", path.display()));
        std::fs::rename(path, &rotated).map_err(err)?;
        if let Some(dir) = path.parent() {
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
        }
        tracing::info!(file = %rotated.display(), "SIEM file rotated");
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(err)?;
    f.write_all(&buf).map_err(err)?;
    f.sync_data().map_err(err)
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// A sink's delivery state between batches (an open syslog connection, the HEC channel).
pub struct Deliverer {
    cfg: Arc<SinkConfig>,
    conn: Option<Box<dyn Stream>>,
    udp: Option<tokio::net::UdpSocket>,
    tls: Arc<tokio_rustls::rustls::ClientConfig>,
    /// The HTTP client of HEC and webhook sinks (its connection pool lives between batches).
    http: Option<crate::outbound::Client>,
    channel: String,
    host: String,
}

impl Deliverer {
    pub fn new(cfg: Arc<SinkConfig>) -> Result<Deliverer, String> {
        let ca = match &cfg.kind {
            SinkKind::Syslog { ca_file, .. }
            | SinkKind::SplunkHec { ca_file, .. }
            | SinkKind::Webhook { ca_file, .. } => ca_file.clone(),
            SinkKind::File { .. } => None,
        };
        let tls = tls_config(ca.as_deref())?;
        let http = match &cfg.kind {
            SinkKind::SplunkHec { .. } | SinkKind::Webhook { .. } => {
                Some(crate::outbound::Client::new(&tls, cfg.timeout)?)
            }
            SinkKind::File { .. } | SinkKind::Syslog { .. } => None,
        };
        Ok(Deliverer {
            cfg,
            conn: None,
            udp: None,
            tls,
            http,
            channel: uuid::Uuid::new_v4().to_string(),
            host: hostname(),
        })
    }

    pub fn config(&self) -> &SinkConfig {
        &self.cfg
    }

    /// Delivers one batch; Ok means the receiver has it, and the error says whether trying
    /// again can help.
    pub async fn deliver(&mut self, events: &[&AccessEvent]) -> Result<(), Failure> {
        if events.is_empty() {
            return Ok(());
        }
        let timeout = self.cfg.timeout;
        match tokio::time::timeout(timeout, self.deliver_inner(events)).await {
            Ok(r) => r,
            Err(_) => {
                self.conn = None;
                Err(Failure::Retry(format!(
                    "no answer within {}",
                    humantime::format_duration(timeout)
                )))
            }
        }
    }

    async fn deliver_inner(&mut self, events: &[&AccessEvent]) -> Result<(), Failure> {
        let cfg = self.cfg.clone();
        match &cfg.kind {
            SinkKind::File { path, rotate_bytes } => {
                let owned: Vec<AccessEvent> = events.iter().map(|e| (*e).clone()).collect();
                let (path, rotate, format) = (path.clone(), *rotate_bytes, cfg.format);
                tokio::task::spawn_blocking(move || {
                    let refs: Vec<&AccessEvent> = owned.iter().collect();
                    write_file(&path, rotate, format, &refs)
                })
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r)
                .map_err(Failure::Retry)
            }
            SinkKind::Syslog {
                address,
                transport,
                server_name,
                app_name,
                ..
            } => {
                let msgs: Vec<String> = events
                    .iter()
                    .map(|e| syslog5424(e, cfg.format, &self.host, app_name))
                    .collect();
                if *transport == Transport::Udp {
                    return self.send_udp(address, &msgs).await.map_err(Failure::Retry);
                }
                let r = self
                    .send_stream(address, *transport, server_name.as_deref(), &msgs)
                    .await;
                if r.is_err() {
                    self.conn = None;
                }
                r.map_err(Failure::Retry)
            }
            SinkKind::SplunkHec {
                url,
                token,
                ack,
                index,
                ..
            } => {
                self.send_hec(url, token, *ack, index.as_deref(), events)
                    .await
            }
            SinkKind::Webhook {
                url,
                bearer,
                hmac_secret,
                ..
            } => {
                let body = serde_json::to_vec(
                    &events
                        .iter()
                        .map(|e| cfg.format.value(e))
                        .collect::<Vec<_>>(),
                )
                .map_err(|e| Failure::Retry(e.to_string()))?;
                let mut headers = Vec::new();
                if let Some(b) = bearer {
                    headers.push(("Authorization".to_string(), format!("Bearer {b}")));
                }
                if let Some(secret) = hmac_secret {
                    let ts = crate::clock::now().timestamp().to_string();
                    headers.push(("X-Breakglass-Timestamp".to_string(), ts.clone()));
                    headers.push((
                        "X-Breakglass-Signature".to_string(),
                        format!("sha256={}", sign(secret, &ts, &body)),
                    ));
                }
                let r = self
                    .http()?
                    .post(url, &headers, body)
                    .await
                    .map_err(Failure::Retry)?;
                if (200..300).contains(&r.status) {
                    Ok(())
                } else {
                    Err(classify(
                        r.status,
                        format!("HTTP {}: {}", r.status, reason(&r.body)),
                    ))
                }
            }
        }
    }

    async fn send_udp(&mut self, address: &str, msgs: &[String]) -> Result<(), String> {
        if self.udp.is_none() {
            let s = tokio::net::UdpSocket::bind("0.0.0.0:0")
                .await
                .map_err(|e| e.to_string())?;
            s.connect(address)
                .await
                .map_err(|e| format!("{address}: {e}"))?;
            self.udp = Some(s);
        }
        let s = self.udp.as_ref().ok_or("no socket")?;
        for m in msgs {
            s.send(m.as_bytes()).await.map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    async fn send_stream(
        &mut self,
        address: &str,
        transport: Transport,
        server_name: Option<&str>,
        msgs: &[String],
    ) -> Result<(), String> {
        // A collector that went away closes our socket; writes into the kernel buffer would
        // still succeed, so look for the close before trusting the connection.
        if let Some(c) = self.conn.as_mut() {
            if peer_closed(c).await {
                self.conn = None;
            }
        }
        if self.conn.is_none() {
            let tcp = tokio::net::TcpStream::connect(address)
                .await
                .map_err(|e| format!("connect {address}: {e}"))?;
            let _ = tcp.set_nodelay(true);
            self.conn = Some(if transport == Transport::Tls {
                let host = server_name
                    .map(str::to_string)
                    .unwrap_or_else(|| host_of(address));
                let name = tokio_rustls::rustls::pki_types::ServerName::try_from(host.clone())
                    .map_err(|e| format!("bad TLS server name {host}: {e}"))?;
                Box::new(
                    tokio_rustls::TlsConnector::from(self.tls.clone())
                        .connect(name, tcp)
                        .await
                        .map_err(|e| format!("TLS with {address}: {e}"))?,
                )
            } else {
                Box::new(tcp)
            });
        }
        let c = self.conn.as_mut().ok_or("not connected")?;
        let mut buf = Vec::new();
        for m in msgs {
            buf.extend_from_slice(format!("{} ", m.len()).as_bytes());
            buf.extend_from_slice(m.as_bytes());
        }
        c.write_all(&buf).await.map_err(|e| e.to_string())?;
        c.flush().await.map_err(|e| e.to_string())
    }

    async fn send_hec(
        &mut self,
        url: &Url,
        token: &str,
        ack: bool,
        index: Option<&str>,
        events: &[&AccessEvent],
    ) -> Result<(), Failure> {
        let format = self.cfg.format;
        let sourcetype = match format {
            Format::Seed => "breakglass:json",
            Format::Ocsf => "breakglass:ocsf",
            Format::Cef => "breakglass:cef",
        };
        let mut body = Vec::new();
        for e in events {
            let time = chrono::DateTime::parse_from_rfc3339(&e.timestamp)
                .map(|t| t.timestamp_millis() as f64 / 1000.0)
                .unwrap_or(0.0);
            let mut o = serde_json::json!({
                "time": time,
                "host": self.host,
                "source": "breakglass",
                "sourcetype": sourcetype,
                "event": format.value(e),
                "fields": { "event_id": e.event_id },
            });
            if let Some(i) = index {
                o["index"] = serde_json::json!(i);
            }
            body.extend_from_slice(o.to_string().as_bytes());
        }
        let mut headers = vec![("Authorization".to_string(), format!("Splunk {token}"))];
        if ack {
            headers.push(("X-Splunk-Request-Channel".to_string(), self.channel.clone()));
        }
        let http = self.http()?.clone();
        let r = http
            .post(url, &headers, body)
            .await
            .map_err(Failure::Retry)?;
        let reply: serde_json::Value = serde_json::from_slice(&r.body).unwrap_or_default();
        if !(200..300).contains(&r.status) {
            let why = format!(
                "HTTP {}: {}",
                r.status,
                reply["text"].as_str().unwrap_or("no reason given")
            );
            return Err(classify(r.status, why));
        }
        if !ack {
            return Ok(());
        }
        let id = reply["ackId"].as_u64().ok_or_else(|| {
            Failure::Retry("indexer acknowledgement is on but the collector sent no ackId".into())
        })?;
        let mut ack_url = url.clone();
        ack_url.path = format!("/services/collector/ack?channel={}", self.channel);
        let q = serde_json::json!({ "acks": [id] }).to_string();
        let mut wait = Duration::from_millis(100);
        loop {
            let r = http
                .post(&ack_url, &headers, q.clone().into_bytes())
                .await
                .map_err(Failure::Retry)?;
            let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap_or_default();
            if (200..300).contains(&r.status) && v["acks"][id.to_string()] == true {
                return Ok(());
            }
            if !(200..300).contains(&r.status) {
                // The batch itself was accepted; a refused ack query says nothing against
                // the events, so it is always retried (the batch is sent again).
                return Err(Failure::Retry(format!("ack query: HTTP {}", r.status)));
            }
            // The attempt's time limit bounds this loop.
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(2));
        }
    }
}

impl Deliverer {
    fn http(&self) -> Result<&crate::outbound::Client, Failure> {
        self.http
            .as_ref()
            .ok_or_else(|| Failure::Retry("no HTTP client for this sink".into()))
    }
}

/// A short, printable reason from a refusal's body (its first 200 characters).
fn reason(body: &[u8]) -> String {
    let text: String = String::from_utf8_lossy(body)
        .chars()
        .filter(|c| !c.is_control())
        .take(200)
        .collect();
    if text.trim().is_empty() {
        "no reason given".into()
    } else {
        text
    }
}

/// True when the peer has closed the connection (EOF or error), without blocking.
async fn peer_closed(c: &mut Box<dyn Stream>) -> bool {
    use tokio::io::AsyncReadExt;
    let mut b = [0u8; 256];
    match tokio::time::timeout(Duration::from_millis(0), c.read(&mut b)).await {
        Err(_) => false,
        Ok(Ok(0)) | Ok(Err(_)) => true,
        // Collectors do not talk back on syslog; anything read is ignored.
        Ok(Ok(_)) => false,
    }
}

fn host_of(address: &str) -> String {
    match address.rsplit_once(':') {
        Some((h, _)) => h.trim_start_matches('[').trim_end_matches(']').to_string(),
        None => address.to_string(),
    }
}

/// `hex(HMAC-SHA256(secret, timestamp + "." + body))`, as a webhook receiver recomputes it.
pub fn sign(secret: &str, timestamp: &str, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let mut ctx = ring::hmac::Context::with_key(&key);
    ctx.update(timestamp.as_bytes());
    ctx.update(b".");
    ctx.update(body);
    hex::encode(ctx.sign().as_ref())
}

/// A configured CA is the only trust root (the collector is pinned to it); without one, the
/// Mozilla roots.
fn tls_config(
    ca: Option<&std::path::Path>,
) -> Result<Arc<tokio_rustls::rustls::ClientConfig>, String> {
    crate::alerts::client_tls(ca, ca.is_some())
}

/// Delivers from the spool until `stop` fires: batches in spool order, jittered exponential
/// backoff (250 ms doubling to 30 s) on failure, and a wake-up on every new event.
pub async fn run_worker(
    spool: Arc<Spool>,
    mut d: Deliverer,
    mut wake: tokio::sync::watch::Receiver<i64>,
    all_sinks: Vec<String>,
    stop: tokio_util::sync::CancellationToken,
) {
    let name = d.config().name.clone();
    let (batch, actions) = (d.config().batch, d.config().actions);
    let mut backoff = Duration::from_millis(250);
    loop {
        if stop.is_cancelled() {
            return;
        }
        let sp = spool.clone();
        let n2 = name.clone();
        let got = tokio::task::spawn_blocking(move || sp.batch(&n2, batch, actions)).await;
        let (events, upto): (Vec<Spooled>, Option<i64>) = match got {
            Ok(Ok(x)) => x,
            Ok(Err(e)) => {
                tracing::error!(sink = %name, error = %e, "cannot read the SIEM spool");
                (Vec::new(), None)
            }
            Err(_) => (Vec::new(), None),
        };
        let Some(upto) = upto else {
            tokio::select! {
                _ = wake.changed() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = stop.cancelled() => return,
            }
            continue;
        };
        let refs: Vec<&AccessEvent> = events.iter().map(|s| &s.event).collect();
        match d.deliver(&refs).await {
            Ok(()) => {
                backoff = Duration::from_millis(250);
                let sp = spool.clone();
                let (n2, all) = (name.clone(), all_sinks.clone());
                let n = events.len() as u64;
                let r = tokio::task::spawn_blocking(move || {
                    sp.ack(&n2, upto, n)?;
                    sp.prune(&all)
                })
                .await;
                if let Ok(Err(e)) = r {
                    tracing::error!(sink = %name, error = %e, "cannot record SIEM delivery");
                }
            }
            Err(why) => {
                tracing::warn!(sink = %name, error = %why, queued = events.len(), "SIEM delivery failed; will retry");
                let sp = spool.clone();
                let n2 = name.clone();
                let w = why.to_string();
                let _ = tokio::task::spawn_blocking(move || sp.fail(&n2, &w)).await;
                let jitter = 0.5 + rand::random::<f64>();
                tokio::select! {
                    _ = tokio::time::sleep(backoff.mul_f64(jitter)) => {}
                    _ = stop.cancelled() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_signature_covers_timestamp_and_body() {
        // Known answer computed with Python's hmac module over b"1700000000.[]".
        let a = sign("Jefe", "1700000000", b"[]");
        assert_eq!(
            a,
            "42718ec36cce5340b5a05af041e58b5572bc6b2fc8fda0030119319cba986520"
        );
        assert_ne!(a, sign("Jefe", "1700000001", b"[]"));
        assert_ne!(a, sign("Jefe", "1700000000", b"[{}]"));
    }

    #[test]
    fn files_rotate_before_passing_the_limit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("siem.jsonl");
        let e = AccessEvent::new(super::super::Action::GrantCreated, "op");
        let line = Format::Seed.line(&e).len() as u64 + 1;
        for _ in 0..3 {
            write_file(&path, line * 2, Format::Seed, &[&e]).expect("write");
        }
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .expect("dir")
            .map(|d| d.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names.len(), 2, "{names:?}");
        assert_eq!(
            std::fs::read_to_string(&path)
                .expect("read")
                .lines()
                .count(),
            1
        );
    }
}
