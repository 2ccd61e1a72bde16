//! The PostgreSQL listener: TLS, SCRAM login with the DBA's JIT credential, upstream login with
//! the vault's break-glass password, and a relay that records every protocol message (except
//! authentication) before forwarding it, with the same deadline and revocation as SSH.
//!
//! Login mapping: user name = the person, database name = the target.

pub mod log;
pub mod redact;
pub mod scram;
pub mod upstream;
pub mod wire;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

use crate::clock;
use crate::config::{Protocol, TargetConfig, UpstreamTls};
use crate::grant;
use crate::record::{ChannelKind, RecMsg, Recorder, Stream};
use crate::services::Gateway;
use crate::session::{self, EndReason, Live, SessionIo};
use crate::siem::{AccessEvent, Action};
use crate::state::Grant;
use wire::{Message, WireError};

/// Anything a client or upstream connection can be (plain TCP or TLS).
trait Conn: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Conn for T {}

/// Largest message accepted from the target (the client's limit is `postgres.max_message`).
const MAX_UPSTREAM_MESSAGE: usize = 64 << 20;

/// Accepts PostgreSQL connections until aborted. A connection takes a place in the
/// listener's pre-auth table (see [`crate::preauth`]) until SCRAM succeeds, and a place among
/// the `limits.max_connections` admitted sessions after.
pub async fn serve(
    listener: TcpListener,
    gw: Arc<Gateway>,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    loop {
        let Ok((socket, peer)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let _ = socket.set_nodelay(true);
        let (gw, tls) = (gw.clone(), tls.clone());
        gw.shutdown.tracker.clone().spawn(async move {
            let mut socket = socket;
            // The client behind a trusted proxy's PROXY header, then a place in the table.
            let (peer, ticket) = match gw.admission.pg.accept(&mut socket, peer).await {
                Ok(x) => x,
                Err(why) => {
                    tracing::debug!(%peer, ?why, "postgres pre-auth limit reached, closing");
                    return;
                }
            };
            let conn_span = tracing::info_span!("conn", protocol = "postgres", %peer);
            async move {
                if let Err(e) = handle(gw, socket, peer, tls, ticket).await {
                    tracing::info!(error = %e, "postgres connection ended");
                }
            }
            .instrument(conn_span)
            .await
        });
    }
}

/// Maps a client's cancel key to the upstream backend and cancels there; unknown keys are
/// ignored silently, as PostgreSQL does. The cancel goes on a new plain TCP connection even
/// to a target with `tls`: PostgreSQL reads a CancelRequest before pg_hba.conf applies, and
/// the packet carries only the backend's key, which is good for this one session.
async fn forward_cancel(gw: &Gateway, body: &[u8], peer: SocketAddr) {
    let Ok(key) = <[u8; 8]>::try_from(body) else {
        return;
    };
    let found = gw
        .pg_cancel
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&key)
        .cloned();
    if let Some((addr, upstream_key)) = found {
        cancel_backend(&addr, &upstream_key).await;
        tracing::info!(%peer, "forwarded a cancel request");
    }
}

/// Sends a CancelRequest for the backend with `key` at `addr` (see [`forward_cancel`]).
async fn cancel_backend(addr: &str, key: &[u8; 8]) {
    if let Ok(Ok(mut up)) =
        tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr)).await
    {
        let mut pkt = 16i32.to_be_bytes().to_vec();
        pkt.extend_from_slice(&wire::CANCEL_REQUEST.to_be_bytes());
        pkt.extend_from_slice(key);
        let _ = wire::send(&mut up, &pkt).await;
    }
}

/// Reads startup packets, answering SSLRequest (TLS when configured) and GSSENCRequest ('N'),
/// until the real startup (or cancel) packet.
async fn negotiate(
    mut conn: Box<dyn Conn>,
    tls: Option<tokio_rustls::TlsAcceptor>,
) -> Result<(Box<dyn Conn>, wire::Startup, bool), WireError> {
    let mut encrypted = false;
    loop {
        let s = wire::read_startup(&mut conn).await?;
        match s.code {
            wire::SSL_REQUEST if !encrypted => match &tls {
                Some(acceptor) => {
                    wire::send(&mut conn, b"S").await?;
                    conn = Box::new(acceptor.accept(conn).await?);
                    encrypted = true;
                }
                None => wire::send(&mut conn, b"N").await?,
            },
            wire::GSSENC_REQUEST => wire::send(&mut conn, b"N").await?,
            _ => return Ok((conn, s, encrypted)),
        }
    }
}

/// A refusal sent to the client as FATAL with a SQLSTATE.
struct Fatal {
    code: &'static str,
    msg: String,
}

fn fatal(code: &'static str, msg: impl Into<String>) -> Fatal {
    Fatal {
        code,
        msg: msg.into(),
    }
}

/// What the login phase ends with: an authenticated client, or nothing more to do.
struct LoggedIn {
    conn: Box<dyn Conn>,
    ctx: Ctx,
    grant: Grant,
    target: TargetConfig,
}

/// Startup, TLS and SCRAM, all before trust. Refusals here say nothing about whether the
/// person, the target or a grant exists: a client without a usable credential runs SCRAM
/// against a dummy verifier and gets the same 28P01 as a wrong password. Only after SCRAM
/// succeeds does a refusal say why (grant expired or revoked). The SIEM denial event always
/// carries the real reason.
async fn login(
    gw: Arc<Gateway>,
    socket: TcpStream,
    peer: SocketAddr,
    tls: Option<tokio_rustls::TlsAcceptor>,
) -> Result<Option<LoggedIn>, WireError> {
    let (mut conn, startup, encrypted) = negotiate(Box::new(socket), tls.clone()).await?;
    if startup.code == wire::CANCEL_REQUEST {
        forward_cancel(&gw, &startup.body, peer).await;
        return Ok(None);
    }
    if startup.code != wire::PROTOCOL_3 {
        let e = wire::error(
            "FATAL",
            "0A000",
            &format!("unsupported frontend protocol {}", startup.code),
        );
        wire::send(&mut conn, &e).await?;
        return Ok(None);
    }
    let params = wire::startup_params(&startup.body)?;
    let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let person = get("user").unwrap_or_default();
    let target_name = get("database").unwrap_or_else(|| person.clone());
    let ctx = Ctx {
        gw: gw.clone(),
        peer,
        person: person.clone(),
        target: target_name.clone(),
    };
    if tls.is_some() && !encrypted {
        let f = fatal(
            "28000",
            "the breakglass gateway requires TLS (sslmode=require)",
        );
        ctx.refuse(&mut conn, f, "tls_required").await?;
        return Ok(None);
    }
    let found = ctx.lookup().await;
    // An internal error (the state store is down) is said as it is: it tells an outsider
    // nothing about people or targets, and the on-call engineer needs to know.
    if let Lookup::Internal(f) = found {
        ctx.refuse(&mut conn, f, "internal_error").await?;
        return Ok(None);
    }
    let verifier = match &found {
        Lookup::Found { grant, .. } => ctx
            .gw
            .store
            .credential(&grant.id)
            .await
            .ok()
            .flatten()
            .and_then(|(v, _)| scram::Verifier::parse(&v)),
        _ => None,
    };
    let real = verifier.is_some();
    let verifier = verifier.unwrap_or_else(|| scram::Verifier::dummy(&person));
    let scram_result = server_scram(&mut conn, verifier).await;
    let (why, code) = match (&found, scram_result) {
        (Lookup::Found { .. }, Ok(())) if real => (None, ""),
        (Lookup::Refused(f, code), _) => (Some(f.msg.clone()), *code),
        (Lookup::Found { grant, .. }, _) if !real => (
            Some(format!("no database credential for grant {}", grant.id)),
            "no_credential",
        ),
        (_, Err(e)) => {
            tracing::info!(%peer, error = %e, "scram failed");
            (Some(format!("SCRAM failed: {e}")), "bad_password")
        }
        (_, Ok(())) => (
            Some("SCRAM against a dummy verifier".into()),
            "bad_password",
        ),
    };
    if let Some(why) = why {
        ctx.refuse_as(&mut conn, &why, code, generic_auth_failure())
            .await?;
        return Ok(None);
    }
    let Lookup::Found {
        grant,
        target,
        denial,
    } = found
    else {
        return Ok(None);
    };
    // Authenticated: now a refusal may say why.
    if let Some((f, code)) = denial {
        ctx.refuse(&mut conn, f, code).await?;
        return Ok(None);
    }
    Ok(Some(LoggedIn {
        conn,
        ctx,
        grant,
        target: *target,
    }))
}

/// The one answer an unauthenticated client gets, whatever was wrong.
fn generic_auth_failure() -> Fatal {
    fatal(
        "28P01",
        "password authentication failed: use the credential from `ssh breakglass@GATEWAY credential REQUEST`, with an active grant for this target",
    )
}

async fn handle(
    gw: Arc<Gateway>,
    socket: TcpStream,
    peer: SocketAddr,
    tls: Option<tokio_rustls::TlsAcceptor>,
    ticket: crate::preauth::Ticket,
) -> Result<(), WireError> {
    // Everything before trust runs within login_grace of accept, and ends early when the
    // pre-auth table evicts the connection.
    let deadline = Instant::now() + gw.config.limits.login_grace;
    let logged_in = tokio::select! {
        // Boxed, as are the upstream login, the session opening and the relay: the
        // connection task then holds only the step it is at (an idle session keeps the
        // relay's state, not the login's as well).
        r = tokio::time::timeout_at(deadline, Box::pin(login(gw.clone(), socket, peer, tls))) => match r {
            Ok(r) => r?,
            Err(_) => {
                ticket.timed_out();
                return Err(WireError::Malformed("login grace time exceeded".into()));
            }
        },
        _ = ticket.evicted.cancelled() => return Ok(()),
    };
    let Some(LoggedIn {
        mut conn,
        ctx,
        grant,
        target,
    }) = logged_in
    else {
        return Ok(());
    };
    ticket.promote();
    let person = ctx.person.clone();
    let Ok(_admitted) = gw.admission.pg_sessions.clone().try_acquire_owned() else {
        gw.admission
            .pg
            .stats
            .refused_sessions
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let limit = gw.config.limits.max_connections;
        let f = fatal(
            "53300",
            format!("sorry, too many clients already: the breakglass gateway is at its limit of {limit} sessions (limits.max_connections)"),
        );
        return ctx.refuse(&mut conn, f, "gateway_full").await;
    };
    // Upstream with the gateway's credentials, before any client message is relayed.
    let (mut up, upstream_startup) = match Box::pin(upstream_login(&ctx.gw, &target)).await {
        Ok(x) => x,
        Err(why) => {
            let f = fatal(
                "08006",
                format!("cannot reach target {}: {why}", target.name),
            );
            return ctx.refuse(&mut conn, f, "upstream_unreachable").await;
        }
    };
    let now = clock::now();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let deadline = session::deadline(&grant, now, gw.config.limits.max_session_ttl);
    let opening = session::Opening {
        session_id: uuid::Uuid::new_v4().to_string(),
        protocol: "postgres",
        person: person.clone(),
        target: target.name.clone(),
        login: target.login.clone(),
        grant,
        client_addr: peer.to_string(),
        now,
        deadline,
        // No pty channels here; PostgreSQL secrets are masked by the relay.
        settings: gw.recorder_settings(true),
        // Per-statement SIEM events come from the relay, which sees whole messages (the
        // recorder may get a large one in pieces) and only ever the masked copy.
        actions: session::Actions::Adapter,
        message: format!(
            "{person} started a break-glass session on {} as {}",
            target.name, target.login
        ),
    };
    let opened = match Box::pin(session::open(&gw.core, opening, Arc::new(PgIo { tx }))).await {
        Ok(o) => o,
        Err(refusal) => {
            let f = fatal(
                if refusal.source == session::Source::Internal {
                    "58030"
                } else {
                    "XX000"
                },
                refusal.to_string(),
            );
            return ctx.refuse(&mut conn, f, refusal.code).await;
        }
    };
    let live = opened.live;
    let started = live
        .recorder
        .send(RecMsg::Start {
            ch: 0,
            kind: ChannelKind::Postgres {
                database: target.database.clone(),
                role: target.login.clone(),
            },
            pty: None,
            env: Default::default(),
            at: Instant::now(),
        })
        .await
        .is_ok();
    if !started {
        live.kill(EndReason::RecordingFailed(
            "the channel start was not recorded".into(),
        ));
        session::finish(&gw.core, &live).await;
        let f = fatal(
            "58030",
            "session refused: the session could not be put on the record",
        );
        let _ = wire::send(&mut conn, &wire::error("FATAL", f.code, &f.msg)).await;
        return Ok(());
    }
    // The client sees the upstream's session parameters; our own cancel key stands in for the
    // upstream's, which never leaves the gateway.
    let mut hello = wire::auth(0, &[]);
    let client_key: [u8; 8] = rand::random();
    for m in &upstream_startup {
        if m.tag == b'K' {
            if let Ok(upstream_key) = <[u8; 8]>::try_from(m.body()) {
                gw.pg_cancel
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(client_key, (target.address.clone(), upstream_key));
            }
            hello.extend_from_slice(&wire::message(b'K', &client_key));
        } else {
            hello.extend_from_slice(&m.frame);
        }
    }
    // The deadline, warnings, revocation and shutdown come from the session core, which
    // reaches the relay through `PgIo`.
    gw.shutdown
        .tracker
        .spawn(session::supervise(gw.core.clone(), live.clone()));
    gw.shutdown
        .tracker
        .spawn(session::checkpoints(gw.core.clone(), live.clone()));
    let reason = Box::pin(
        relay(
            &gw,
            &mut conn,
            &mut up,
            (&live, opened.actions.as_ref()),
            rx,
            hello,
        )
        .instrument(live.span.clone()),
    )
    .await;
    let upstream = gw
        .pg_cancel
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&client_key);
    // The session is over (deadline, revocation, shutdown, a recording failure, the client
    // gone): the query the backend is running must stop with it, not run on after it. Closing the
    // connection alone does not stop it (PostgreSQL notices only when it next talks to the
    // client), so the backend is cancelled first.
    // Also when the client went away: a long statement must not run on past the session
    // (a cancel that reaches an idle or exited backend does nothing).
    if let Some((addr, key)) = &upstream {
        cancel_backend(addr, key).await;
        tracing::debug!(
            reason = reason.code(),
            "cancelled the target backend's query at the session's end"
        );
    }
    live.kill(reason);
    session::finish(&gw.core, &live).await;
    Ok(())
}

/// What the session core asks of the relay.
enum Ctl {
    /// Show the user a notice (and record it).
    Tell(String),
    /// End the session with a FATAL that says why.
    End(EndReason),
}

/// The PostgreSQL side of a session, for the session core: messages to the relay, which owns
/// both connections.
struct PgIo {
    tx: tokio::sync::mpsc::UnboundedSender<Ctl>,
}

#[async_trait::async_trait]
impl SessionIo for PgIo {
    async fn tell(&self, _s: &Live, text: &str) {
        let _ = self.tx.send(Ctl::Tell(text.to_string()));
    }

    /// Nothing to send: the relay checks the kill switch before forwarding each client
    /// message, so a session that is ending forwards nothing more to the target.
    async fn cut_upstream(&self) {}

    async fn close_client(&self, _s: &Live, reason: &EndReason) {
        let _ = self.tx.send(Ctl::End(reason.clone()));
    }
}

/// Connection facts used for refusals.
struct Ctx {
    gw: Arc<Gateway>,
    peer: SocketAddr,
    person: String,
    target: String,
}

impl Ctx {
    /// Finds the person, the target and their grant. A grant that is found but not active
    /// is returned with its denial, since its holder may learn why once authenticated.
    async fn lookup(&self) -> Lookup {
        if !self.gw.config.people.contains_key(&self.person) {
            return Lookup::Refused(
                fatal(
                    "28000",
                    format!("\"{}\" is not a breakglass person", self.person),
                ),
                "unknown_person",
            );
        }
        let Some(t) = self.gw.config.targets.get(&self.target).cloned() else {
            return Lookup::Refused(
                fatal(
                    "3D000",
                    format!("there is no target named \"{}\"", self.target),
                ),
                "unknown_target",
            );
        };
        if t.protocol != Protocol::Postgres {
            return Lookup::Refused(
                fatal(
                    "28000",
                    format!("{} is an SSH target; connect with ssh", t.name),
                ),
                "wrong_protocol",
            );
        }
        let now = clock::now();
        let found = match self.gw.store.grant_for(&self.person, &t.name, now).await {
            Ok(g) => g,
            Err(e) => return Lookup::Internal(fatal("XX000", e.to_string())),
        };
        let Some(g) = found else {
            let d = grant::Denial::NoGrant {
                person: self.person.clone(),
                target: t.name.clone(),
            };
            return Lookup::Refused(fatal("28000", d.to_string()), d.code());
        };
        let denial = match grant::admit(&self.person, &t.name, Some(g.clone()), now) {
            Ok(_) => None,
            Err(d) => Some((fatal("28000", d.to_string()), d.code())),
        };
        Lookup::Found {
            grant: g,
            target: Box::new(t),
            denial,
        }
    }

    /// Refuses with `client` on the wire while the SIEM event carries the real reason.
    async fn refuse_as(
        &self,
        conn: &mut Box<dyn Conn>,
        why: &str,
        code: &str,
        client: Fatal,
    ) -> Result<(), WireError> {
        self.audit_denial(why, code, crate::grant::Side::Client)
            .await;
        wire::send(conn, &wire::error("FATAL", client.code, &client.msg)).await
    }

    async fn audit_denial(&self, why: &str, code: &str, side: crate::grant::Side) {
        let mut e = AccessEvent::new(Action::SessionDenied, &self.person);
        e.protocol = "postgres".into();
        e.person = Some(self.person.clone());
        e.target = Some(self.target.clone());
        e.client_addr = Some(self.peer.to_string());
        e.outcome = crate::siem::Outcome::Failure;
        e.reason = Some(code.to_string());
        e.message = Some(why.to_string());
        e.side = Some(side);
        let _ = self.gw.audit(&e).await;
    }

    async fn refuse(
        &self,
        conn: &mut Box<dyn Conn>,
        f: Fatal,
        code: &str,
    ) -> Result<(), WireError> {
        let side = match f.code {
            "08006" => crate::grant::Side::Upstream,
            "XX000" | "58030" | "53300" => crate::grant::Side::Internal,
            _ => crate::grant::Side::Client,
        };
        self.audit_denial(&f.msg, code, side).await;
        wire::send(conn, &wire::error("FATAL", f.code, &f.msg)).await
    }
}

/// What the login phase found for a (person, target). One lives per login, briefly.
#[allow(clippy::large_enum_variant)]
enum Lookup {
    /// A grant exists (its denial, if not active, is said only after authentication).
    Found {
        grant: Grant,
        target: Box<TargetConfig>,
        denial: Option<(Fatal, &'static str)>,
    },
    /// No person, no target, no grant: said to nobody but the SIEM.
    Refused(Fatal, &'static str),
    Internal(Fatal),
}

async fn server_scram(conn: &mut Box<dyn Conn>, v: scram::Verifier) -> Result<(), String> {
    wire::send(conn, &wire::auth(10, b"SCRAM-SHA-256\0\0"))
        .await
        .map_err(|e| e.to_string())?;
    let m = wire::read_message(conn, 64 * 1024)
        .await
        .map_err(|e| e.to_string())?;
    if m.tag != b'p' {
        return Err("expected SASLInitialResponse".into());
    }
    let (mech, rest) = wire::cstr(m.body()).ok_or("malformed SASLInitialResponse")?;
    if mech != b"SCRAM-SHA-256" || rest.len() < 4 {
        return Err("unsupported SASL mechanism".into());
    }
    let first = String::from_utf8_lossy(&rest[4..]).into_owned();
    let (ex, server_first) = scram::ServerExchange::start(&first, v).map_err(|e| e.to_string())?;
    wire::send(conn, &wire::auth(11, server_first.as_bytes()))
        .await
        .map_err(|e| e.to_string())?;
    let m = wire::read_message(conn, 64 * 1024)
        .await
        .map_err(|e| e.to_string())?;
    if m.tag != b'p' {
        return Err("expected SASLResponse".into());
    }
    let fin = ex
        .finish(&String::from_utf8_lossy(m.body()))
        .map_err(|e| e.to_string())?;
    wire::send(conn, &wire::auth(12, fin.as_bytes()))
        .await
        .map_err(|e| e.to_string())
}

/// Logs in to the target as its break-glass role with the vault's password (over TLS when
/// the target's `tls` says so); returns the connection and the messages it sent up to
/// ReadyForQuery.
async fn upstream_login(
    gw: &Gateway,
    t: &TargetConfig,
) -> Result<(Box<dyn Conn>, Vec<Message>), String> {
    let kek = crate::vault::kek(&gw.config.kek).map_err(|e| e.to_string())?;
    let blob = gw
        .store
        .vault_get(&t.name, "current")
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| {
            format!(
                "no break-glass password in the vault (breakglass vault set {})",
                t.name
            )
        })?;
    let password = kek.open(&t.name, &blob).map_err(|e| e.to_string())?;
    let (mut up, binding) = upstream::connect(t, gw.pg_tls.get(&t.name)).await?;
    let mut body = wire::PROTOCOL_3.to_be_bytes().to_vec();
    for (k, v) in [
        ("user", t.login.as_str()),
        ("database", t.database.as_str()),
        ("application_name", "breakglass"),
    ] {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut pkt = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    pkt.extend_from_slice(&body);
    wire::send(&mut up, &pkt).await.map_err(|e| e.to_string())?;
    let mut scram: Option<scram::ClientExchange> = None;
    // The server's SCRAM signature checked (SASLFinal): it knows the password.
    let mut proven = false;
    let mut after = Vec::new();
    loop {
        let m = wire::read_message(&mut up, MAX_UPSTREAM_MESSAGE)
            .await
            .map_err(|e| e.to_string())?;
        match m.tag {
            b'R' => {
                let b = m.body();
                let code = b
                    .get(..4)
                    .map(|c| i32::from_be_bytes([c[0], c[1], c[2], c[3]]))
                    .unwrap_or(-1);
                let payload = b.get(4..).unwrap_or_default();
                if let Some(why) = upstream::password_request(t, code) {
                    return Err(why);
                }
                match code {
                    0 => {
                        // Under required binding, a login the server never proved (trust,
                        // or AuthenticationOk before SASLFinal) may be a look-alike server
                        // with a certificate of the same CA: the session's SQL would go to it.
                        if t.tls != UpstreamTls::Disable
                            && t.channel_binding_required
                            && !t.allow_password_auth
                            && !proven
                        {
                            return Err(format!(
                                "the target {} let the gateway in without a verified SCRAM-SHA-256-PLUS exchange; refused: under TLS the target must prove it knows the password (set channel_binding = \"prefer\" to allow it)",
                                t.name
                            ));
                        }
                    }
                    3 => {
                        let mut p = password.expose().as_bytes().to_vec();
                        p.push(0);
                        wire::send(&mut up, &wire::message(b'p', &p))
                            .await
                            .map_err(|e| e.to_string())?;
                    }
                    5 => {
                        use md5::Digest;
                        let inner = hex::encode(md5::Md5::digest(format!(
                            "{}{}",
                            password.expose(),
                            t.login
                        )));
                        let mut h = md5::Md5::new();
                        h.update(inner.as_bytes());
                        h.update(payload);
                        let mut p = format!("md5{}", hex::encode(h.finalize())).into_bytes();
                        p.push(0);
                        wire::send(&mut up, &wire::message(b'p', &p))
                            .await
                            .map_err(|e| e.to_string())?;
                    }
                    10 => {
                        let offered: Vec<&[u8]> = payload
                            .split(|b| *b == 0)
                            .filter(|m| !m.is_empty())
                            .collect();
                        let plus = offered.contains(&&b"SCRAM-SHA-256-PLUS"[..]);
                        if !plus && !offered.contains(&&b"SCRAM-SHA-256"[..]) {
                            return Err(format!(
                                "the target offers no SCRAM-SHA-256 ({}); the gateway speaks no other SASL mechanism",
                                offered.iter().map(|m| String::from_utf8_lossy(m)).collect::<Vec<_>>().join(" ")
                            ));
                        }
                        if t.tls != UpstreamTls::Disable
                            && t.channel_binding_required
                            && !(plus && binding.is_some())
                        {
                            return Err(format!(
                                "the target {} {}; refused: under TLS the gateway logs in only with SCRAM-SHA-256-PLUS, bound to the certificate it saw (set channel_binding = \"prefer\" for a server behind a TLS-terminating proxy)",
                                t.name,
                                if plus {
                                    "sent a certificate the gateway cannot bind to (no tls-server-end-point hash for its signature algorithm)"
                                } else {
                                    "offers no SCRAM-SHA-256-PLUS"
                                }
                            ));
                        }
                        let bind = scram::Binding::choose(binding.as_deref(), plus);
                        let mechanism: &[u8] = if matches!(bind, scram::Binding::Used(_)) {
                            b"SCRAM-SHA-256-PLUS\0"
                        } else {
                            b"SCRAM-SHA-256\0"
                        };
                        let (ex, first) = scram::ClientExchange::start(password.expose(), bind);
                        let mut p = mechanism.to_vec();
                        p.extend_from_slice(&(first.len() as i32).to_be_bytes());
                        p.extend_from_slice(first.as_bytes());
                        wire::send(&mut up, &wire::message(b'p', &p))
                            .await
                            .map_err(|e| e.to_string())?;
                        scram = Some(ex);
                    }
                    11 => {
                        let ex = scram.as_mut().ok_or("unexpected SASLContinue")?;
                        let fin = ex
                            .respond(&String::from_utf8_lossy(payload))
                            .map_err(|e| e.to_string())?;
                        wire::send(&mut up, &wire::message(b'p', fin.as_bytes()))
                            .await
                            .map_err(|e| e.to_string())?;
                    }
                    12 => {
                        let ex = scram.as_ref().ok_or("unexpected SASLFinal")?;
                        ex.verify(&String::from_utf8_lossy(payload))
                            .map_err(|e| e.to_string())?;
                        proven = true;
                    }
                    other => {
                        return Err(format!(
                            "unsupported upstream authentication method {other}"
                        ))
                    }
                }
            }
            b'E' => {
                return Err(format!(
                    "the target refused the login: {}",
                    error_text(m.body())
                ))
            }
            b'Z' => {
                after.push(m);
                return Ok((up, after));
            }
            _ => after.push(m),
        }
    }
}

/// The message field of an ErrorResponse body.
fn error_text(body: &[u8]) -> String {
    let mut rest = body;
    while let Some((&t, tail)) = rest.split_first() {
        if t == 0 {
            break;
        }
        let Some((v, next)) = wire::cstr(tail) else {
            break;
        };
        if t == b'M' {
            return String::from_utf8_lossy(v).into_owned();
        }
        rest = next;
    }
    "unknown error".into()
}

/// The first message in a batch whose type a client may not send after startup.
fn first_unknown_frontend_tag(batch: &[u8]) -> Option<u8> {
    const FRONTEND: &[u8] = b"BCdcfDEHFPpQSX";
    let mut at = 0usize;
    while let (Some(&tag), Some(l)) = (batch.get(at), batch.get(at + 1..at + 5)) {
        if !FRONTEND.contains(&tag) {
            return Some(tag);
        }
        at += 1 + i32::from_be_bytes([l[0], l[1], l[2], l[3]]).max(4) as usize;
    }
    None
}

/// Counts a batch and hands it to the recorder: in pieces of at most `raw::MAX_FRAME_DATA`
/// (reference-counted slices, no byte copy), so the recorder can cut a chunk between the pieces
/// of a message larger than a chunk, and, from the client, with its secrets masked
/// (`redact::mask_frontend`). Returns the recorded bytes, or `None` when the recorder refused
/// them and the session must end.
async fn tap(
    recorder: &Recorder,
    counter: &std::sync::atomic::AtomicU64,
    stream: Stream,
    batch: &Bytes,
) -> Option<Bytes> {
    counter.fetch_add(batch.len() as u64, std::sync::atomic::Ordering::Relaxed);
    let at = Instant::now();
    let masked = match stream {
        Stream::In => redact::mask_frontend(batch),
        Stream::Out | Stream::Err => None,
    };
    let recorded = match masked {
        Some(m) => {
            // The redaction itself goes on the record (session.json notes), where and how much.
            for (kind, bytes) in &m.redacted {
                let label = format!("redacted {kind} ({bytes} bytes) in the next client batch");
                recorder
                    .send(RecMsg::Marker {
                        ch: Some(0),
                        label,
                        at,
                    })
                    .await
                    .ok()?;
            }
            Bytes::from(m.bytes)
        }
        None => batch.clone(),
    };
    let mut from = 0;
    loop {
        let to = recorded
            .len()
            .min(from + crate::record::raw::MAX_FRAME_DATA);
        let rec = RecMsg::Data {
            ch: 0,
            stream,
            data: recorded.slice(from..to),
            at,
        };
        recorder.send(rec).await.ok()?;
        from = to;
        if from >= recorded.len() {
            return Some(recorded);
        }
    }
}

/// Reads one message and every further message already complete in the buffer, as one
/// batch (at most 256 KiB): one record, one write, one flush per burst. Messages longer than
/// `limit` are refused. Returns the batch and whether it holds a Terminate.
async fn read_batch<R: AsyncRead + Unpin>(
    r: &mut tokio::io::BufReader<R>,
    limit: usize,
) -> Result<(Vec<u8>, bool), WireError> {
    let first = wire::read_message(r, limit).await?;
    let mut terminate = first.tag == b'X';
    let mut batch = first.frame;
    while batch.len() < 256 * 1024 && !terminate {
        let buf = r.buffer();
        let Some(len) = buf
            .get(1..5)
            .map(|l| i32::from_be_bytes([l[0], l[1], l[2], l[3]]))
        else {
            break;
        };
        if len < 4 || buf.len() < 1 + len as usize {
            break;
        }
        // The whole message is buffered: this read cannot block.
        let m = wire::read_message(r, limit).await?;
        terminate |= m.tag == b'X';
        batch.extend_from_slice(&m.frame);
    }
    Ok((batch, terminate))
}

/// A relay's read buffer: small while the session idles (most sessions, most of the time:
/// 1,000 idle sessions hold 4 MiB of buffers instead of 128 MiB), large while data streams.
struct ReadBuf<R> {
    /// Always Some between calls (taken only to rewrap it).
    r: Option<tokio::io::BufReader<R>>,
    capacity: usize,
}

impl<R: AsyncRead + Unpin> ReadBuf<R> {
    const SMALL: usize = 2 * 1024;
    const LARGE: usize = 64 * 1024;

    fn new(inner: R) -> ReadBuf<R> {
        ReadBuf {
            r: Some(tokio::io::BufReader::with_capacity(Self::SMALL, inner)),
            capacity: Self::SMALL,
        }
    }

    /// Reads a batch ([`read_batch`]), then fits the buffer to the traffic while it holds
    /// nothing: large after a batch that filled the small buffer (more was waiting), small
    /// again after a batch a quarter of the small one would hold.
    async fn batch(&mut self, limit: usize) -> Result<(Vec<u8>, bool), WireError> {
        let Some(r) = self.r.as_mut() else {
            return Err(WireError::Closed);
        };
        let got = read_batch(r, limit).await?;
        let len = got.0.len();
        let want = if len >= Self::SMALL {
            Self::LARGE
        } else if len < Self::SMALL / 4 {
            Self::SMALL
        } else {
            self.capacity
        };
        if want != self.capacity && r.buffer().is_empty() {
            // Nothing is buffered, so rewrapping the stream loses nothing.
            if let Some(old) = self.r.take() {
                self.r = Some(tokio::io::BufReader::with_capacity(want, old.into_inner()));
                self.capacity = want;
            }
        }
        Ok(got)
    }
}

/// Relays both ways, recording every message first, until either side ends, a recording
/// failure, or the session core ends the session (deadline, revocation, shutdown).
async fn relay(
    gw: &Arc<Gateway>,
    conn: &mut Box<dyn Conn>,
    up: &mut Box<dyn Conn>,
    // The session, and the per-statement SIEM hook fed from what it recorded.
    (live, actions): (&Arc<Live>, Option<&crate::record::ActionHook>),
    mut ctl: tokio::sync::mpsc::UnboundedReceiver<Ctl>,
    hello: Vec<u8>,
) -> EndReason {
    let recorder = &live.recorder;
    let (client_r, client_w) = tokio::io::split(conn);
    let client_w = tokio::sync::Mutex::new(client_w);
    let (up_r, mut up_w) = tokio::io::split(up);
    if wire::send(&mut *client_w.lock().await, &hello)
        .await
        .is_err()
    {
        return EndReason::ClientClosed;
    }
    let recording_failed = || {
        EndReason::RecordingFailed(
            recorder
                .failure
                .reason()
                .unwrap_or_else(|| "the recorder refused a message".into()),
        )
    };
    // Client → target: record, then forward.
    let client_to_up = async {
        let mut r = ReadBuf::new(client_r);
        loop {
            let limit = gw.config.pg_max_message;
            let (batch, terminate) = match r.batch(limit).await.and_then(|(b, t)| {
                // Only frontend message types reach the target.
                match first_unknown_frontend_tag(&b) {
                    Some(tag) => Err(WireError::Malformed(format!(
                        "unknown frontend message type {:?}",
                        tag as char
                    ))),
                    None => Ok((b, t)),
                }
            }) {
                Ok(x) => x,
                Err(e @ (WireError::TooLong { .. } | WireError::Malformed(_))) => {
                    let hint = match e {
                        WireError::TooLong { .. } => " (postgres.max_message)",
                        _ => "",
                    };
                    let why = format!("{e}{hint}");
                    let msg = format!("terminating connection: protocol violation: {why}");
                    let _ = wire::send(
                        &mut *client_w.lock().await,
                        &wire::error("FATAL", "08P01", &msg),
                    )
                    .await;
                    return EndReason::ProtocolViolation(why);
                }
                Err(_) => return EndReason::ClientClosed,
            };
            if live.is_killed() {
                // Ending: nothing more reaches the target; the core closes the client.
                std::future::pending::<()>().await;
            }
            let batch = Bytes::from(batch);
            let Some(recorded) = tap(recorder, &live.bytes_in, Stream::In, &batch).await else {
                let reason = recording_failed();
                fatal_end(&mut *client_w.lock().await, &reason).await;
                return reason;
            };
            if let Some(hook) = actions {
                for sql in log::statements(&recorded) {
                    hook(0, &sql, false);
                }
            }
            if wire::send(&mut up_w, &batch).await.is_err() || terminate {
                return EndReason::ClientClosed;
            }
        }
    };
    // Target → client: record, then forward under the writer lock, so the gateway's own
    // notices land between whole messages.
    let up_to_client = async {
        let mut r = ReadBuf::new(up_r);
        loop {
            let Ok((batch, _)) = r.batch(MAX_UPSTREAM_MESSAGE).await else {
                return EndReason::UpstreamClosed;
            };
            let batch = Bytes::from(batch);
            if tap(recorder, &live.bytes_out, Stream::Out, &batch)
                .await
                .is_none()
            {
                let reason = recording_failed();
                fatal_end(&mut *client_w.lock().await, &reason).await;
                return reason;
            }
            if wire::send(&mut *client_w.lock().await, &batch)
                .await
                .is_err()
            {
                return EndReason::ClientClosed;
            }
        }
    };
    // What the session core says: warnings, and the end.
    let control = async {
        loop {
            match ctl.recv().await {
                Some(Ctl::Tell(text)) => {
                    let text = format!("breakglass: {text}");
                    let _ = recorder
                        .send(RecMsg::Marker {
                            ch: Some(0),
                            label: text.clone(),
                            at: Instant::now(),
                        })
                        .await;
                    let _ = wire::send(&mut *client_w.lock().await, &wire::notice("01000", &text))
                        .await;
                }
                Some(Ctl::End(reason)) => {
                    fatal_end(&mut *client_w.lock().await, &reason).await;
                    return reason;
                }
                // The core is gone: end with what it decided.
                None => return live.reason().unwrap_or(EndReason::Shutdown),
            }
        }
    };
    tokio::select! {
        r = client_to_up => r,
        r = up_to_client => r,
        r = control => r,
    }
}

/// Tells the client why the gateway ends its session (SQLSTATE 57P01, admin shutdown).
async fn fatal_end<W: AsyncWrite + Unpin>(w: &mut W, reason: &EndReason) {
    let msg = format!("terminating connection: {}", reason.why());
    let _ = wire::send(w, &wire::error("FATAL", "57P01", &msg)).await;
}
