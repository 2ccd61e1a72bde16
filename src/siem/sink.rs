//! SIEM sinks and their delivery loops. Each sink reads the spool after its own cursor,
//! delivers a batch, and moves the cursor only once the receiver has taken it: fsync for
//! files, a written and flushed stream for syslog (checked for a closed peer first), a 2xx
//! (and, with indexer acknowledgement, a confirmed ack id) for HTTP.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::format::{syslog5424, Format};
use super::outbox::Outbox;
use super::spool::{SpoolError, Spooled};
use super::AccessEvent;
pub use crate::config::siem::{SinkConfig, SinkKind, Transport};
use crate::outbound::classify;
pub use crate::outbound::Failure;
use crate::outbound::Url;

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
    crate::outbound::client_tls(ca, ca.is_some())
}

/// What a sink worker shares with the rest of the pipeline; cloned for every restart.
#[derive(Clone)]
pub struct WorkerContext {
    pub outbox: Arc<dyn Outbox>,
    /// Subscribed afresh by each (re)started worker.
    pub wake: tokio::sync::watch::Sender<i64>,
    /// Every configured sink, for pruning.
    pub all_sinks: Vec<String>,
    /// Where refused events are kept (JSONL, one object per event).
    pub dead_letters: PathBuf,
    /// Custodians hear of every dead-lettered event once the gateway has set an alerter.
    pub alerter: Arc<std::sync::OnceLock<super::DeadLetterHook>>,
    pub stop: tokio_util::sync::CancellationToken,
}

/// One line of the dead-letter file.
#[derive(serde::Serialize)]
struct DeadLetter<'a> {
    sink: &'a str,
    dead_lettered_at: String,
    status: u16,
    reason: &'a str,
    spool_seq: i64,
    event: &'a AccessEvent,
}

/// Appends refused events to the dead-letter file and syncs it; the cursor moves past them
/// only after this returned Ok.
pub fn write_dead_letters(
    path: &std::path::Path,
    sink: &str,
    status: u16,
    reason: &str,
    events: &[&Spooled],
) -> Result<(), String> {
    use std::io::Write;
    let err = |e: std::io::Error| format!("dead-letter file {}: {e}", path.display());
    let mut buf = Vec::new();
    let at = crate::clock::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    for s in events {
        let line = DeadLetter {
            sink,
            dead_lettered_at: at.clone(),
            status,
            reason,
            spool_seq: s.seq,
            event: &s.event,
        };
        serde_json::to_writer(&mut buf, &line).map_err(|e| e.to_string())?;
        buf.push(b'\n');
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(err)?;
    f.write_all(&buf).map_err(err)?;
    f.sync_data().map_err(err)
}

/// Delivers from the outbox until `stop` fires: batches in outbox order, jittered
/// exponential backoff (250 ms doubling to 30 s) on a failure worth retrying, and a wake-up
/// on every new event. A batch the collector refuses for good is sent again one event at a
/// time, so only the refused events are dead-lettered. On a shared outbox the worker first
/// takes the sink's delivery lease, renews it before every batch and waits while another
/// node holds it. Returns Err only when it cannot go on (the supervisor restarts it).
pub async fn run_worker(cfg: Arc<SinkConfig>, ctx: WorkerContext) -> Result<(), String> {
    let mut d = Deliverer::new(cfg)?;
    let mut wake = ctx.wake.subscribe();
    let outbox = ctx.outbox.clone();
    let name = d.config().name.clone();
    let (batch, actions) = (d.config().batch, d.config().actions);
    let mut backoff = Duration::from_millis(250);
    let mut held = false;
    let result = loop {
        if ctx.stop.is_cancelled() {
            break Ok(());
        }
        match outbox.claim(&name).await {
            Ok(true) => {
                if !held && outbox.shared() {
                    tracing::info!(sink = %name, "this node delivers the SIEM sink now");
                }
                held = true;
            }
            Ok(false) => {
                held = false;
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = ctx.stop.cancelled() => break Ok(()),
                }
                continue;
            }
            Err(e) => {
                held = false;
                tracing::warn!(sink = %name, error = %e, "cannot take the SIEM delivery lease; will retry");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = ctx.stop.cancelled() => break Ok(()),
                }
                continue;
            }
        }
        if d.config().is_local() && !outbox.shared() {
            // A file sink on a local spool is written under the spool's exclusive
            // transaction, as `emit` writes it inline (and as other processes on this data
            // dir do): reading a batch here and acknowledging it after the write would let
            // both write the same events.
            match outbox.deliver_file(d.config()).await {
                Ok(0) => {
                    tokio::select! {
                        _ = wake.changed() => {}
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = ctx.stop.cancelled() => break Ok(()),
                    }
                }
                Ok(_) => {
                    backoff = Duration::from_millis(250);
                    if let Err(e) = outbox.prune(&ctx.all_sinks).await {
                        tracing::warn!(sink = %name, error = %e, "SIEM spool not pruned");
                    }
                }
                Err(e) => {
                    tracing::warn!(sink = %name, error = %e, "SIEM file not written; will retry");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = ctx.stop.cancelled() => break Ok(()),
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
            continue;
        }
        let (events, upto): (Vec<Spooled>, Option<i64>) = match outbox
            .batch(&name, batch, actions)
            .await
        {
            Ok(x) => x,
            Err(e @ SpoolError::Unreadable { .. }) => {
                // Written by a newer version, perhaps: let another node deliver it.
                tracing::error!(sink = %name, error = %e, "giving the SIEM delivery lease up for 30 s");
                outbox.release(&name).await;
                held = false;
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(30)) => {}
                    _ = ctx.stop.cancelled() => break Ok(()),
                }
                continue;
            }
            Err(e) => {
                tracing::error!(sink = %name, error = %e, "cannot read the SIEM spool");
                (Vec::new(), None)
            }
        };
        let Some(upto) = upto else {
            tokio::select! {
                _ = wake.changed() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = ctx.stop.cancelled() => break Ok(()),
            }
            continue;
        };
        let refs: Vec<&AccessEvent> = events.iter().map(|s| &s.event).collect();
        // Ok holds how many events the final acknowledgement counts as delivered: the whole
        // batch, or none when they were settled (acknowledged or dead-lettered) one by one.
        let delivery = async {
            match d.deliver(&refs).await {
                Ok(()) => Ok(events.len() as u64),
                Err(Failure::Rejected { status, why }) if events.len() == 1 => {
                    dead_letter(&ctx, &name, status, &why, &events)
                        .await
                        .map(|()| 0)
                }
                Err(Failure::Rejected { .. }) => {
                    tracing::warn!(sink = %name, events = events.len(), "SIEM batch refused; sending its events one at a time");
                    one_by_one(&mut d, &ctx, &events).await.map(|()| 0)
                }
                Err(f @ Failure::Retry(_)) => Err(f),
            }
        };
        // On a shared outbox the lease is renewed while a slow collector takes its time, so
        // that no other node takes the sink over mid-batch and both get fenced, forever.
        let result = match outbox.renew_every() {
            Some(every) => {
                let renew = async {
                    loop {
                        tokio::time::sleep(every).await;
                        if let Err(e) = outbox.claim(&name).await {
                            tracing::warn!(sink = %name, error = %e, "cannot renew the SIEM delivery lease");
                        }
                    }
                };
                tokio::select! {
                    r = delivery => r,
                    () = renew => Err(Failure::Retry("lease renewal stopped".into())),
                }
            }
            None => delivery.await,
        };
        match result {
            Ok(n) => {
                backoff = Duration::from_millis(250);
                let r = match outbox.ack(&name, upto, n).await {
                    Ok(()) => outbox.prune(&ctx.all_sinks).await.map(drop),
                    Err(e) => Err(e),
                };
                match r {
                    Ok(()) => {}
                    Err(e @ SpoolError::Fenced { .. }) => {
                        tracing::warn!(sink = %name, error = %e, "SIEM batch delivered after this node lost the lease; the receiver may see it twice (same event ids)");
                    }
                    Err(e) => {
                        tracing::error!(sink = %name, error = %e, "cannot record SIEM delivery")
                    }
                }
            }
            Err(why) => {
                tracing::warn!(sink = %name, error = %why, queued = events.len(), "SIEM delivery failed; will retry");
                let _ = outbox.fail(&name, &why.to_string()).await;
                let jitter = 0.5 + rand::random::<f64>();
                tokio::select! {
                    _ = tokio::time::sleep(backoff.mul_f64(jitter)) => {}
                    _ = ctx.stop.cancelled() => break Ok(()),
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    };
    if held && outbox.shared() {
        outbox.release(&name).await;
    }
    result
}

/// Sends each event of a refused batch on its own: delivered ones are acknowledged, refused
/// ones dead-lettered, and the first failure worth retrying stops the pass (the cursor stays
/// before the event it was about).
async fn one_by_one(
    d: &mut Deliverer,
    ctx: &WorkerContext,
    events: &[Spooled],
) -> Result<(), Failure> {
    let name = d.config().name.clone();
    for s in events {
        match d.deliver(&[&s.event]).await {
            Ok(()) => {
                ctx.outbox
                    .ack(&name, s.seq, 1)
                    .await
                    .map_err(|e| Failure::Retry(e.to_string()))?;
            }
            Err(Failure::Rejected { status, why }) => {
                dead_letter(ctx, &name, status, &why, std::slice::from_ref(s)).await?;
            }
            Err(f @ Failure::Retry(_)) => return Err(f),
        }
    }
    Ok(())
}

/// Keeps refused events in the dead-letter file, moves the cursor past them, counts them and
/// alerts. Err (retry) when the file cannot be written: nothing is passed over unseen.
async fn dead_letter(
    ctx: &WorkerContext,
    sink: &str,
    status: u16,
    why: &str,
    events: &[Spooled],
) -> Result<(), Failure> {
    let Some(upto) = events.iter().map(|s| s.seq).max() else {
        return Ok(());
    };
    let owned: Vec<Spooled> = events.to_vec();
    let (path, n2, w) = (ctx.dead_letters.clone(), sink.to_string(), why.to_string());
    let n = owned.len() as u64;
    let written = tokio::task::spawn_blocking(move || {
        let refs: Vec<&Spooled> = owned.iter().collect();
        write_dead_letters(&path, &n2, status, &w, &refs)
    })
    .await
    .map_err(|e| e.to_string())
    .and_then(|r| r);
    let r = match written {
        Ok(()) => ctx
            .outbox
            .dead_letter(sink, upto, n, &format!("dead-lettered: {why}"))
            .await
            .map_err(|e| e.to_string()),
        Err(e) => Err(e),
    };
    if let Err(e) = r {
        return Err(Failure::Retry(format!(
            "the collector refused an event ({why}) and it could not be dead-lettered: {e}"
        )));
    }
    for s in events {
        tracing::error!(sink, event_id = %s.event.event_id, status, reason = %why, file = %ctx.dead_letters.display(), "SIEM event refused for good; dead-lettered");
        if let Some(a) = ctx.alerter.get() {
            a(sink, &s.event, why, &ctx.dead_letters);
        }
    }
    Ok(())
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

    /// A hostile or flaky HTTP peer in the test process: for each request, `answer` gets the
    /// body and returns the raw bytes to send back (then the connection is closed).
    /// Every request body is recorded.
    struct Peer {
        port: u16,
        bodies: Arc<std::sync::Mutex<Vec<String>>>,
    }

    impl Peer {
        async fn start(answer: impl Fn(usize, &str) -> Vec<u8> + Send + Sync + 'static) -> Peer {
            use tokio::io::AsyncReadExt;
            let l = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let port = l.local_addr().expect("addr").port();
            let bodies = Arc::new(std::sync::Mutex::new(Vec::new()));
            let (b2, answer) = (bodies.clone(), Arc::new(answer));
            tokio::spawn(async move {
                while let Ok((mut sock, _)) = l.accept().await {
                    let (b2, answer) = (b2.clone(), answer.clone());
                    tokio::spawn(async move {
                        let mut buf = Vec::new();
                        let mut chunk = [0u8; 4096];
                        let body = loop {
                            let Ok(n) = sock.read(&mut chunk).await else {
                                return;
                            };
                            if n == 0 {
                                return;
                            }
                            buf.extend_from_slice(&chunk[..n]);
                            let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                                continue;
                            };
                            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                            let len: usize = head
                                .lines()
                                .find_map(|l| l.strip_prefix("content-length:"))
                                .and_then(|v| v.trim().parse().ok())
                                .unwrap_or(0);
                            if buf.len() >= end + 4 + len {
                                break String::from_utf8_lossy(&buf[end + 4..end + 4 + len])
                                    .into_owned();
                            }
                        };
                        let n = {
                            let mut b = b2.lock().expect("lock");
                            b.push(body.clone());
                            b.len()
                        };
                        let _ = sock.write_all(&answer(n, &body)).await;
                        let _ = sock.shutdown().await;
                    });
                }
            });
            Peer { port, bodies }
        }

        fn bodies(&self) -> Vec<String> {
            self.bodies.lock().expect("lock").clone()
        }
    }

    fn reply(status: u16, body: &str) -> Vec<u8> {
        format!(
            "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    }

    /// A SIEM with one webhook sink at `port` (batches of `batch`), started.
    fn webhook_siem(dir: &std::path::Path, port: u16, batch: usize) -> Arc<super::super::Siem> {
        super::super::Siem::open(webhook_settings(dir, port, batch))
            .expect("open")
            .start(tokio_util::sync::CancellationToken::new())
            .expect("start")
    }

    fn webhook_settings(
        dir: &std::path::Path,
        port: u16,
        batch: usize,
    ) -> super::super::SiemSettings {
        super::super::SiemSettings {
            spool: dir.join("spool.sqlite"),
            spool_max_events: 1000,
            fail_closed_backlog: None,
            sinks: vec![SinkConfig {
                name: "hook".into(),
                format: Format::Seed,
                actions: false,
                batch,
                timeout: Duration::from_secs(5),
                kind: SinkKind::Webhook {
                    url: Url::parse(&format!("http://127.0.0.1:{port}/siem")).expect("url"),
                    bearer: None,
                    hmac_secret: None,
                    ca_file: None,
                },
            }],
        }
    }

    fn event(actor: &str) -> AccessEvent {
        AccessEvent::new(super::super::Action::GrantCreated, actor)
    }

    /// Waits (up to 60 s) until the sink's figures satisfy `done`.
    async fn wait_stats(
        siem: &super::super::Siem,
        what: &str,
        done: impl Fn(&super::super::SinkStats) -> bool,
    ) -> super::super::SinkStats {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let st = siem.stats().await.remove(0);
            if done(&st) {
                return st;
            }
            assert!(tokio::time::Instant::now() < deadline, "{what}: {st:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn emit(siem: &Arc<super::super::Siem>, e: &AccessEvent) {
        use super::super::EventSink;
        siem.emit(e).await.expect("emit");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refused_event_is_dead_lettered_and_delivery_moves_on() {
        let dir = tempfile::tempdir().expect("tempdir");
        let peer = Peer::start(|_, body| {
            if body.contains("poison") {
                reply(400, r#"{"text":"bad event"}"#)
            } else {
                reply(200, "{}")
            }
        })
        .await;
        // Spooled before the worker runs (a SIEM that is only opened delivers nothing in
        // the background), so the first attempt is one batch of three.
        {
            let idle = Arc::new(
                super::super::Siem::open(webhook_settings(dir.path(), peer.port, 10))
                    .expect("open"),
            );
            for actor in ["ok-1", "poison", "ok-2"] {
                emit(&idle, &event(actor)).await;
            }
        }
        let siem = webhook_siem(dir.path(), peer.port, 10);
        let st = wait_stats(&siem, "the refused event is passed over", |s| {
            s.dead_lettered == 1 && s.delivered == 2 && s.queued == 0
        })
        .await;
        assert_eq!(st.failed, 0, "a refusal is not a failed attempt: {st:?}");
        // Later events still go through.
        emit(&siem, &event("ok-3")).await;
        wait_stats(&siem, "a later event is delivered", |s| s.delivered == 3).await;
        let bodies = peer.bodies();
        assert!(bodies.iter().any(|b| b.contains("ok-3")), "{bodies:?}");
        // The poison event was sent once in a batch and once alone, never again.
        assert_eq!(
            bodies.iter().filter(|b| b.contains("poison")).count(),
            2,
            "{bodies:?}"
        );
        let kept = std::fs::read_to_string(siem.dead_letter_path()).expect("dead-letter file");
        let lines: Vec<serde_json::Value> = kept
            .lines()
            .map(|l| serde_json::from_str(l).expect("json line"))
            .collect();
        assert_eq!(lines.len(), 1, "{kept}");
        assert_eq!(lines[0]["sink"], "hook");
        assert_eq!(lines[0]["status"], 400);
        assert_eq!(lines[0]["event"]["actor"], "poison");
        assert!(lines[0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("bad event")));
        let mut m = String::new();
        siem.metrics(&mut m).await;
        assert!(
            m.contains("breakglass_siem_dead_letter_total{sink=\"hook\"} 1"),
            "{m}"
        );
        assert!(
            m.contains("breakglass_siem_worker_restarts_total{sink=\"hook\"} 0"),
            "{m}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_503_is_retried_until_delivered() {
        let dir = tempfile::tempdir().expect("tempdir");
        let peer = Peer::start(|n, _| {
            if n <= 2 {
                reply(503, "busy")
            } else {
                reply(204, "")
            }
        })
        .await;
        let siem = webhook_siem(dir.path(), peer.port, 10);
        emit(&siem, &event("retry-me")).await;
        let st = wait_stats(&siem, "delivered after two 503s", |s| s.delivered == 1).await;
        assert_eq!((st.failed, st.dead_lettered), (2, 0), "{st:?}");
        assert_eq!(peer.bodies().len(), 3);
        assert!(!siem.dead_letter_path().exists());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hostile_responses_do_not_kill_delivery() {
        let dir = tempfile::tempdir().expect("tempdir");
        let peer = Peer::start(|n, _| match n {
            // A chunk size of 2^64 (one past u64::MAX).
            1 => {
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10000000000000000\r\nabc\r\n"
                    .to_vec()
            }
            // A chunk size of u64::MAX, then the connection ends.
            2 => b"HTTP/1.1 400 OK\r\nTransfer-Encoding: chunked\r\n\r\nFFFFFFFFFFFFFFFF\r\nabc"
                .to_vec(),
            3 => b"\x00\xffgarbage\r\n\r\n".to_vec(),
            4 => b"HTTP/1.1 2000 Weird\r\nContent-Length: 99999999999999999999999\r\n\r\n".to_vec(),
            // A huge body: only the first 64 KiB are read.
            5 => {
                let mut r = reply(500, "");
                r.truncate(r.len() - 4);
                let mut r = String::from_utf8(r)
                    .expect("ascii")
                    .replace("Content-Length: 0", "Content-Length: 10000000");
                r.push_str("\r\n\r\n");
                let mut r = r.into_bytes();
                r.extend(std::iter::repeat_n(b'x', 1 << 20));
                r
            }
            _ => reply(200, "{}"),
        })
        .await;
        let siem = webhook_siem(dir.path(), peer.port, 10);
        emit(&siem, &event("survivor")).await;
        let st = wait_stats(&siem, "delivered after five hostile answers", |s| {
            s.delivered == 1
        })
        .await;
        assert_eq!((st.failed, st.dead_lettered), (5, 0), "{st:?}");
        assert_eq!(peer.bodies().len(), 6);
    }
}
