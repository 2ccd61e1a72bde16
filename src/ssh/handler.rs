//! The per-connection russh server handler: identifies the person by key, admits them under a
//! grant, opens the recording and the upstream, and relays every channel through the recorder.
//!
//! Every byte is handed to the recorder before it is forwarded; if the recorder refuses, the
//! byte is not forwarded and the session ends (fail closed).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tracing::Instrument;

use bytes::Bytes;
use russh::server::{self, Auth, ChannelOpenHandle, Msg, Session};
use russh::{client, Channel, ChannelId, ChannelMsg, ChannelReadHalf, ChannelWriteHalf, Pty, Sig};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::session::{ChanState, LiveSession, SshIo};
use super::upstream;
use crate::clock;
use crate::grant::{self, Denial};
use crate::keys::fingerprint;
use crate::record::{ChannelKind, PtyInfo, RecMsg, Stream};
use crate::services::Gateway;
use crate::session::SessionIo;
use crate::siem::{AccessEvent, Action};

/// A handler error; it ends this connection only.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Russh(#[from] russh::Error),
}

/// Replies the target owes us for requests we forwarded with want_reply, oldest first.
type Pending = Arc<Mutex<VecDeque<oneshot::Sender<bool>>>>;

/// How long we wait for the target to answer a channel request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// A channel request forwarded upstream with want_reply.
enum UpReq {
    Pty {
        term: String,
        cols: u32,
        rows: u32,
        pw: u32,
        ph: u32,
        modes: Vec<(Pty, u32)>,
    },
    Shell,
    Exec(Vec<u8>),
    Subsystem(String),
}

/// One client channel and its upstream twin.
struct Chan {
    up: ChannelWriteHalf<client::Msg>,
    pending: Pending,
    rec_ch: u32,
    pty: Option<PtyInfo>,
    env: BTreeMap<String, String>,
}

/// Per-connection state.
pub struct Handler {
    gw: Arc<Gateway>,
    peer: SocketAddr,
    /// The established session, shared with the connection task so it can seal it.
    slot: Arc<Mutex<Option<Arc<LiveSession>>>>,
    authenticated: Arc<AtomicBool>,
    person: Option<String>,
    /// The SSH user name: the target.
    target: String,
    /// Fingerprint of a key offered that matches nobody.
    unknown_key: Option<String>,
    denial_reported: bool,
    denial: Option<Denial>,
    session: Option<Arc<LiveSession>>,
    chans: HashMap<ChannelId, Chan>,
    next_rec_ch: u32,
    /// The connection is for the control channel (workflow commands), not a target.
    control: bool,
    /// Control channels with a terminal (their output needs CR LF line ends).
    control_pty: std::collections::HashSet<ChannelId>,
    /// Channels opened after the session began to end; requests on them get the reason.
    ending: std::collections::HashSet<ChannelId>,
    /// The connection's place in the pre-auth table, until it authenticates.
    ticket: Option<crate::preauth::Ticket>,
    /// Its place among admitted connections, from authentication on.
    admitted: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// Runs one client connection to completion, then seals its session. Until it authenticates,
/// the connection is closed at its `login_grace` deadline (counted from accept, so the banner
/// and the key exchange are inside it) or when the pre-auth table evicts it.
pub async fn run_connection(
    gw: Arc<Gateway>,
    config: Arc<server::Config>,
    socket: TcpStream,
    peer: SocketAddr,
    ticket: crate::preauth::Ticket,
) {
    let deadline = tokio::time::Instant::now() + gw.config.limits.login_grace;
    let evicted = ticket.evicted.clone();
    let table = ticket.table().clone();
    let slot = Arc::new(Mutex::new(None));
    let authenticated = Arc::new(AtomicBool::new(false));
    let handler = Handler {
        gw: gw.clone(),
        peer,
        slot: slot.clone(),
        authenticated: authenticated.clone(),
        person: None,
        target: String::new(),
        unknown_key: None,
        denial_reported: false,
        denial: None,
        session: None,
        chans: HashMap::new(),
        next_rec_ch: 0,
        control: false,
        control_pty: Default::default(),
        ending: Default::default(),
        ticket: Some(ticket),
        admitted: None,
    };
    let timed_out = || {
        table
            .stats
            .timed_out
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::debug!(%peer, "login grace time exceeded, closing");
    };
    // The client's banner is read inside `run_stream`.
    let started = tokio::select! {
        r = tokio::time::timeout_at(deadline, server::run_stream(config, socket, handler)) => r,
        _ = evicted.cancelled() => return,
    };
    let running = match started {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "ssh handshake failed");
            return;
        }
        Err(_) => return timed_out(),
    };
    let mut running = std::pin::pin!(running);
    let preauth_over = async {
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => {}
            _ = evicted.cancelled() => {}
        }
        if authenticated.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        evicted.is_cancelled()
    };
    tokio::select! {
        r = &mut running => {
            if let Err(e) = r {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        }
        was_evicted = preauth_over => {
            // Dropping the session closes the socket; an unauthenticated peer is owed nothing.
            if !was_evicted {
                timed_out();
            }
        }
    }
    let live = slot.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some(s) = live {
        crate::session::finish(&gw.core, &s.core).await;
    }
}

impl Handler {
    fn denial_event(&self, d: &Denial, grant_id: Option<String>) -> AccessEvent {
        let actor = self.person.clone().unwrap_or_else(|| "unknown".into());
        let mut e = AccessEvent::new(Action::SessionDenied, &actor);
        e.person = self.person.clone();
        e.target = (!self.target.is_empty()).then(|| self.target.clone());
        e.client_addr = Some(self.peer.to_string());
        e.outcome = crate::siem::Outcome::Failure;
        e.reason = Some(d.code().into());
        e.message = Some(d.to_string());
        e.side = Some(d.side());
        e.correlation_id = grant_id.clone();
        e.grant_id = grant_id;
        if let Denial::UnknownKey { fingerprint } = d {
            e.key_fingerprint = Some(fingerprint.clone());
        }
        e
    }

    async fn report_denial(&mut self, d: Denial, grant_id: Option<String>) {
        tracing::info!(peer = %self.peer, person = ?self.person, target = %self.target, reason = d.code(), "session denied");
        let ev = self.denial_event(&d, grant_id);
        if let Err(e) = self.gw.audit(&ev).await {
            tracing::error!(error = %e, "could not write SIEM denial event");
        }
        self.denial = Some(d);
        self.denial_reported = true;
    }

    /// Admission, upstream, recording, start event, in that order. Nothing is relayed before
    /// all of them succeed.
    async fn establish(&mut self, client: server::Handle) -> Result<(), (Denial, Option<String>)> {
        let gw = self.gw.clone();
        let person = self.person.clone().unwrap_or_default();
        let Some(target) = gw.config.targets.get(&self.target).cloned() else {
            return Err((
                Denial::UnknownTarget {
                    target: self.target.clone(),
                },
                None,
            ));
        };
        if target.protocol != crate::config::Protocol::Ssh {
            return Err((
                Denial::WrongProtocol {
                    target: target.name.clone(),
                },
                None,
            ));
        }
        let now = clock::now();
        let found = gw
            .store
            .grant_for(&person, &target.name, now)
            .await
            .map_err(|e| (Denial::Internal { why: e.to_string() }, None))?;
        let grant_id = found.as_ref().map(|g| g.id.clone());
        let grant =
            grant::admit(&person, &target.name, found, now).map_err(|d| (d, grant_id.clone()))?;
        let (deadline, cause) =
            crate::session::deadline(&grant, now, gw.config.limits.max_session_ttl);
        let session_id = uuid::Uuid::new_v4().to_string();
        let Some(pinned) = gw.built.host_keys.get(&target.name) else {
            return Err((
                Denial::Upstream {
                    target: target.name.clone(),
                    why: "its pinned host key file is missing; run `breakglass check-config`"
                        .into(),
                },
                grant_id,
            ));
        };
        let held = match &target.auth {
            crate::config::UpstreamAuth::Key(_) => {
                crate::vault::held_ssh_key(gw.store.as_ref(), &gw.config.kek, &target.name)
                    .await
                    .map_err(|e| (Denial::Internal { why: e.to_string() }, grant_id.clone()))?
            }
            crate::config::UpstreamAuth::Certificate => None,
        };
        let up = upstream::connect(
            &target,
            pinned,
            &gw.keys,
            held,
            &person,
            &session_id,
            deadline,
        )
        .await
        .map_err(|d| (d, grant_id.clone()))?;
        let io = Arc::new(SshIo::new(client, up));
        let opening = crate::session::Opening {
            session_id: session_id.clone(),
            protocol: "ssh",
            person: person.clone(),
            target: target.name.clone(),
            login: target.login.clone(),
            grant,
            client_addr: self.peer.to_string(),
            now,
            deadline: (deadline, cause),
            settings: gw.recorder_settings(target.redact_no_echo),
            actions: crate::session::Actions::Recorder,
            message: format!(
                "{person} started a break-glass session on {} as {}",
                target.name, target.login
            ),
        };
        let opened = match crate::session::open(&gw.core, opening, io.clone()).await {
            Ok(o) => o,
            Err(refusal) => {
                io.cut_upstream().await;
                let d = match refusal.code {
                    "recording_unavailable" => Denial::RecordingUnavailable { why: refusal.why },
                    _ => Denial::Internal { why: refusal.why },
                };
                return Err((d, grant_id));
            }
        };
        let live = Arc::new(LiveSession {
            core: opened.live,
            io,
        });
        // From here on the connection's end runs `finish` for this session.
        *self.slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(live.clone());
        gw.shutdown.tracker.spawn(crate::session::supervise(
            gw.core.clone(),
            live.core.clone(),
        ));
        gw.shutdown.tracker.spawn(crate::session::checkpoints(
            gw.core.clone(),
            live.core.clone(),
        ));
        self.session = Some(live);
        Ok(())
    }

    /// Records a refused feature (forwarding, agent, X11) as a marker and a SIEM event.
    async fn refuse(&mut self, what: &str) {
        let text = format!("{what} refused: break-glass sessions do not allow it");
        tracing::info!(peer = %self.peer, what, "refused");
        if let Some(s) = &self.session {
            let _ = s
                .recorder
                .send(RecMsg::Marker {
                    ch: None,
                    label: text.clone(),
                    at: Instant::now(),
                })
                .await;
        }
        let actor = self.person.clone().unwrap_or_else(|| "unknown".into());
        let mut e = AccessEvent::new(Action::ForwardingRefused, &actor);
        e.person = self.person.clone();
        e.target = Some(self.target.clone());
        e.session_id = self.session.as_ref().map(|s| s.id.clone());
        e.grant_id = self.session.as_ref().map(|s| s.grant.id.clone());
        e.correlation_id = self
            .session
            .as_ref()
            .map(|s| s.grant.correlation_id().to_string());
        e.client_addr = Some(self.peer.to_string());
        e.outcome = crate::siem::Outcome::Failure;
        e.side = Some(crate::grant::Side::Client);
        e.reason = Some(what.replace(' ', "_"));
        e.message = Some(text);
        if let Err(err) = self.gw.audit(&e).await {
            tracing::error!(error = %err, "could not write SIEM event");
        }
    }

    /// Sends a request upstream with want_reply and waits for the target's answer.
    async fn ask_upstream(&mut self, channel: ChannelId, req: UpReq) -> bool {
        let Some(c) = self.chans.get(&channel) else {
            return false;
        };
        let (tx, rx) = oneshot::channel();
        c.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back(tx);
        let sent = match req {
            UpReq::Pty {
                term,
                cols,
                rows,
                pw,
                ph,
                modes,
            } => {
                c.up.request_pty(true, &term, cols, rows, pw, ph, &modes)
                    .await
            }
            UpReq::Shell => c.up.request_shell(true).await,
            UpReq::Exec(cmd) => c.up.exec(true, cmd).await,
            UpReq::Subsystem(name) => c.up.request_subsystem(true, name).await,
        };
        if sent.is_err() {
            return false;
        }
        matches!(
            tokio::time::timeout(REQUEST_TIMEOUT, rx).await,
            Ok(Ok(true))
        )
    }

    /// On a denied connection, a shell/exec/subsystem request gets the reason on stderr and
    /// the channel closes.
    fn deny_channel(&self, channel: ChannelId, session: &mut Session) -> Result<(), Error> {
        let why = match (&self.denial, &self.session) {
            (Some(d), _) => d.to_string(),
            (None, Some(s)) => s.end_message().unwrap_or_else(|| "session ended".into()),
            (None, None) => "access denied".into(),
        };
        session.channel_success(channel)?;
        session.extended_data(channel, 1, Bytes::from(format!("breakglass: {why}\r\n")))?;
        session.exit_status_request(channel, 1)?;
        session.eof(channel)?;
        session.close(channel)?;
        Ok(())
    }

    /// Tells the recorder a channel starts, before the request is forwarded so that no output
    /// can be recorded ahead of the channel's header.
    async fn start_channel(&mut self, channel: ChannelId, kind: ChannelKind) -> bool {
        let (Some(s), Some(c)) = (&self.session, self.chans.get(&channel)) else {
            return false;
        };
        s.recorder
            .send(RecMsg::Start {
                ch: c.rec_ch,
                kind,
                pty: c.pty.clone(),
                env: c.env.clone(),
                at: Instant::now(),
            })
            .await
            .is_ok()
    }

    /// Runs a workflow command for the identified person and closes the channel.
    async fn run_control(
        &mut self,
        channel: ChannelId,
        line: &str,
        session: &mut Session,
    ) -> Result<(), Error> {
        let person = self.person.clone().unwrap_or_default();
        let roles = self
            .gw
            .config
            .people
            .get(&person)
            .map(|p| p.roles.clone())
            .unwrap_or_default();
        tracing::info!(person = %person, command = %line.split_whitespace().next().unwrap_or(""), "control command");
        let out = self.gw.control.run(&self.gw, &person, &roles, line).await;
        session.channel_success(channel)?;
        let text = if self.control_pty.contains(&channel) {
            out.text.replace('\n', "\r\n")
        } else {
            out.text
        };
        if out.code == 0 {
            session.data(channel, Bytes::from(text))?;
        } else {
            session.extended_data(channel, 1, Bytes::from(text))?;
        }
        session.exit_status_request(channel, out.code)?;
        session.eof(channel)?;
        session.close(channel)?;
        Ok(())
    }

    fn reply(session: &mut Session, channel: ChannelId, ok: bool) -> Result<(), Error> {
        if ok {
            session.channel_success(channel)?;
        } else {
            session.channel_failure(channel)?;
        }
        Ok(())
    }
}

impl Drop for Handler {
    fn drop(&mut self) {
        // A client that offered only unknown keys and gave up without keyboard-interactive
        // (e.g. BatchMode) still leaves a denial on the record.
        if !self.denial_reported && self.person.is_none() {
            if let Some(fp) = self.unknown_key.take() {
                let d = Denial::UnknownKey { fingerprint: fp };
                let ev = self.denial_event(&d, None);
                let siem = self.gw.siem.clone();
                tokio::spawn(async move {
                    if let Err(e) = crate::siem::EventSink::emit(&siem, &ev).await {
                        tracing::error!(error = %e, "could not write SIEM denial event");
                    }
                });
            }
        }
    }
}

/// Relays one upstream channel to the client: record first, then forward.
async fn pump(
    s: Arc<LiveSession>,
    mut read: ChannelReadHalf,
    client_id: ChannelId,
    rec_ch: u32,
    pending: Pending,
) {
    use std::sync::atomic::Ordering::Relaxed;
    // The target's EOF is held back until its exit status (or the close) has been relayed.
    // sshd sends EOF before the exit status; a client whose own input is already at EOF (a
    // ControlMaster with `-S` clients, `ssh host cmd </dev/null`) answers our EOF with a
    // close at once, and a channel that is closed on both sides takes no exit status: the
    // client would report 255 instead of the command's status. The client keeps its own
    // stdout open until the channel closes, so nobody sees the EOF arrive later.
    let mut eof_held = false;
    let mut closed = false;
    while let Some(msg) = read.wait().await {
        match msg {
            ChannelMsg::Data { data } => {
                let n = data.len() as u64;
                if s.recorder
                    .send(RecMsg::Data {
                        ch: rec_ch,
                        stream: Stream::Out,
                        data: data.clone(),
                        at: Instant::now(),
                    })
                    .await
                    .is_err()
                {
                    break;
                }
                s.bytes_out.fetch_add(n, Relaxed);
                if s.io.client.data(client_id, data).await.is_err() {
                    break;
                }
            }
            ChannelMsg::ExtendedData { data, ext } => {
                let n = data.len() as u64;
                if s.recorder
                    .send(RecMsg::Data {
                        ch: rec_ch,
                        stream: Stream::Err,
                        data: data.clone(),
                        at: Instant::now(),
                    })
                    .await
                    .is_err()
                {
                    break;
                }
                s.bytes_out.fetch_add(n, Relaxed);
                if s.io
                    .client
                    .extended_data(client_id, ext, data)
                    .await
                    .is_err()
                {
                    break;
                }
            }
            ChannelMsg::Eof => eof_held = true,
            ChannelMsg::Close => {
                closed = true;
                break;
            }
            ChannelMsg::ExitStatus { exit_status } => {
                let _ = s
                    .recorder
                    .send(RecMsg::Exit {
                        ch: rec_ch,
                        status: Some(exit_status),
                        signal: None,
                    })
                    .await;
                let _ =
                    s.io.client
                        .exit_status_request(client_id, exit_status)
                        .await;
                release_eof(&s, client_id, &mut eof_held).await;
            }
            ChannelMsg::ExitSignal {
                signal_name,
                core_dumped,
                error_message,
                lang_tag,
            } => {
                let _ = s
                    .recorder
                    .send(RecMsg::Exit {
                        ch: rec_ch,
                        status: None,
                        signal: Some(format!("{signal_name:?}")),
                    })
                    .await;
                let _ =
                    s.io.client
                        .exit_signal_request(
                            client_id,
                            signal_name,
                            core_dumped,
                            error_message,
                            lang_tag,
                        )
                        .await;
                release_eof(&s, client_id, &mut eof_held).await;
            }
            ChannelMsg::Success | ChannelMsg::Failure => {
                let ok = matches!(msg, ChannelMsg::Success);
                let waiter = pending
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .pop_front();
                if let Some(w) = waiter {
                    let _ = w.send(ok);
                }
            }
            // Flow control and requests a server never sends to a client are not relayed.
            _ => {}
        }
    }
    release_eof(&s, client_id, &mut eof_held).await;
    if closed {
        let _ = s.io.client.close(client_id).await;
    }
}

/// Sends the target's held-back EOF to the client, once.
async fn release_eof(s: &LiveSession, client_id: ChannelId, held: &mut bool) {
    if std::mem::take(held) {
        let _ = s.io.client.eof(client_id).await;
    }
}

impl server::Handler for Handler {
    type Error = Error;

    async fn auth_publickey_offered(
        &mut self,
        _user: &str,
        offer: server::PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        if self.gw.built.keys.person_for(offer.public_key).is_some() {
            Ok(Auth::Accept)
        } else {
            self.unknown_key = Some(fingerprint(offer.public_key));
            Ok(Auth::reject())
        }
    }

    async fn auth_publickey(
        &mut self,
        user: &str,
        key: server::VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        match self.gw.built.keys.person_for(key.public_key) {
            Some(p) => {
                self.person = Some(p.to_string());
                self.target = user.to_string();
                if let Err(e) = self
                    .gw
                    .store
                    .touch_key(&fingerprint(key.public_key), p, clock::now())
                    .await
                {
                    tracing::warn!(error = %e, "could not record key use");
                }
                Ok(Auth::Accept)
            }
            None => {
                self.unknown_key = Some(fingerprint(key.public_key));
                Ok(Auth::reject())
            }
        }
    }

    async fn auth_keyboard_interactive<'a>(
        &'a mut self,
        user: &str,
        _submethods: &str,
        response: Option<server::Response<'a>>,
    ) -> Result<Auth, Self::Error> {
        // Keyboard-interactive is never a way in: it only carries the reason for the refusal
        // to the user's terminal, since publickey failures cannot carry a message.
        let d = Denial::UnknownKey {
            fingerprint: self
                .unknown_key
                .clone()
                .unwrap_or_else(|| "(none offered)".into()),
        };
        if response.is_none() {
            return Ok(Auth::Partial {
                name: "breakglass".into(),
                instructions: format!("{d}\n").into(),
                prompts: Vec::new().into(),
            });
        }
        self.target = user.to_string();
        if !self.denial_reported {
            self.report_denial(d, None).await;
        }
        // No method can succeed now: tell the client to stop asking.
        Ok(Auth::Reject {
            proceed_with_methods: Some(russh::MethodSet::empty()),
            partial_success: false,
        })
    }

    async fn auth_succeeded(&mut self, session: &mut Session) -> Result<(), Self::Error> {
        self.authenticated.store(true, Ordering::SeqCst);
        if let Some(t) = self.ticket.take() {
            t.promote();
        }
        match self.gw.admission.ssh_sessions.clone().try_acquire_owned() {
            Ok(p) => self.admitted = Some(p),
            Err(_) => {
                self.gw
                    .admission
                    .ssh
                    .stats
                    .refused_sessions
                    .fetch_add(1, Ordering::Relaxed);
                let d = Denial::AtCapacity {
                    limit: self.gw.config.limits.max_connections,
                };
                let msg = d.to_string();
                self.report_denial(d, None).await;
                let handle = session.handle();
                tokio::spawn(async move {
                    let _ = handle
                        .disconnect(russh::Disconnect::TooManyConnections, msg, "en".into())
                        .await;
                });
                return Ok(());
            }
        }
        let is_target = self.gw.config.targets.contains_key(&self.target);
        if !is_target
            && (self.target == crate::config::CONTROL_LOGIN
                || Some(&self.target) == self.person.as_ref())
        {
            self.control = true;
            return Ok(());
        }
        if let Err((d, grant_id)) = self.establish(session.handle()).await {
            self.report_denial(d, grant_id).await;
            // A client that opens no channel (ssh -N) is disconnected after a short grace.
            let handle = session.handle();
            let msg = self
                .denial
                .as_ref()
                .map(|d| d.to_string())
                .unwrap_or_default();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(10)).await;
                let _ = handle
                    .disconnect(russh::Disconnect::ByApplication, msg, "en".into())
                    .await;
            });
        }
        Ok(())
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let id = channel.id();
        // Requests and data reach us through the callbacks below; the channel object is not
        // read, so drop it (russh then skips it without blocking).
        drop(channel);
        let Some(s) = self.session.clone() else {
            // Denied: accept so the shell/exec request can carry the reason.
            reply.accept().await;
            return Ok(());
        };
        if s.is_killed() {
            // Accept, so the shell/exec request can carry the reason the session is ending.
            self.ending.insert(id);
            reply.accept().await;
            return Ok(());
        }
        let up = match s.io.upstream.channel_open_session().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(parent: &s.span, error = %e, "upstream channel open failed");
                reply.reject(russh::ChannelOpenFailure::ConnectFailed).await;
                return Ok(());
            }
        };
        let (read, write) = up.split();
        let rec_ch = self.next_rec_ch;
        self.next_rec_ch += 1;
        let pending: Pending = Arc::new(Mutex::new(VecDeque::new()));
        s.io.channels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, ChanState { rec_ch, pty: false });
        self.chans.insert(
            id,
            Chan {
                up: write,
                pending: pending.clone(),
                rec_ch,
                pty: None,
                env: BTreeMap::new(),
            },
        );
        let span = s.span.clone();
        // Tracked: the drain waits for every pump to hand its last bytes to the recorder.
        self.gw
            .shutdown
            .tracker
            .spawn(pump(s, read, id, rec_ch, pending).instrument(span));
        reply.accept().await;
        Ok(())
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        _channel: Channel<Msg>,
        host: &str,
        port: u32,
        _oa: &str,
        _op: u32,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.refuse(&format!("port forwarding to {host}:{port}"))
            .await;
        reply
            .reject(russh::ChannelOpenFailure::AdministrativelyProhibited)
            .await;
        Ok(())
    }

    async fn channel_open_direct_streamlocal(
        &mut self,
        _channel: Channel<Msg>,
        path: &str,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.refuse(&format!("socket forwarding to {path}")).await;
        reply
            .reject(russh::ChannelOpenFailure::AdministrativelyProhibited)
            .await;
        Ok(())
    }

    async fn channel_open_x11(
        &mut self,
        _channel: Channel<Msg>,
        _oa: &str,
        _op: u32,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.refuse("X11 forwarding").await;
        reply
            .reject(russh::ChannelOpenFailure::AdministrativelyProhibited)
            .await;
        Ok(())
    }

    async fn tcpip_forward(
        &mut self,
        address: &str,
        port: &mut u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        self.refuse(&format!("remote port forwarding from {address}:{port}"))
            .await;
        Ok(false)
    }

    async fn streamlocal_forward(
        &mut self,
        path: &str,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        self.refuse(&format!("remote socket forwarding from {path}"))
            .await;
        Ok(false)
    }

    async fn agent_request(
        &mut self,
        _channel: ChannelId,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        self.refuse("agent forwarding").await;
        Ok(false)
    }

    async fn x11_request(
        &mut self,
        channel: ChannelId,
        _single: bool,
        _proto: &str,
        _cookie: &str,
        _screen: u32,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.refuse("X11 forwarding").await;
        session.channel_failure(channel)?;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn pty_request(
        &mut self,
        channel: ChannelId,
        term: &str,
        cols: u32,
        rows: u32,
        pw: u32,
        ph: u32,
        modes: &[(Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if self.session.is_none() {
            if self.control {
                self.control_pty.insert(channel);
            }
            session.channel_success(channel)?;
            return Ok(());
        }
        let req = UpReq::Pty {
            term: term.to_string(),
            cols,
            rows,
            pw,
            ph,
            modes: modes.to_vec(),
        };
        let ok = self.ask_upstream(channel, req).await;
        if ok {
            if let Some(c) = self.chans.get_mut(&channel) {
                c.pty = Some(PtyInfo {
                    term: term.to_string(),
                    cols,
                    rows,
                });
                if let Some(s) = &self.session {
                    if let Some(st) =
                        s.io.channels
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .get_mut(&channel)
                    {
                        st.pty = true;
                    }
                }
            }
        }
        Self::reply(session, channel, ok)
    }

    async fn env_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        value: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if self.session.is_none() || !self.gw.config.env_allowed(name) {
            return Self::reply(session, channel, false);
        }
        let Some(c) = self.chans.get_mut(&channel) else {
            return Self::reply(session, channel, false);
        };
        c.env.insert(name.to_string(), value.to_string());
        let ok = c.up.set_env(false, name, value).await.is_ok();
        Self::reply(session, channel, ok)
    }

    async fn shell_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if self.control {
            return self.run_control(channel, "status", session).await;
        }
        if self.session.is_none() || self.ending.contains(&channel) {
            return self.deny_channel(channel, session);
        }
        if !self.start_channel(channel, ChannelKind::Shell).await {
            return Self::reply(session, channel, false);
        }
        let ok = self.ask_upstream(channel, UpReq::Shell).await;
        Self::reply(session, channel, ok)
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if self.control {
            let line = String::from_utf8_lossy(data).into_owned();
            return self.run_control(channel, &line, session).await;
        }
        if self.session.is_none() || self.ending.contains(&channel) {
            return self.deny_channel(channel, session);
        }
        let command = String::from_utf8_lossy(data).into_owned();
        if !self
            .start_channel(channel, ChannelKind::Exec { command })
            .await
        {
            return Self::reply(session, channel, false);
        }
        let ok = self.ask_upstream(channel, UpReq::Exec(data.to_vec())).await;
        Self::reply(session, channel, ok)
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if self.session.is_none() || self.ending.contains(&channel) {
            return self.deny_channel(channel, session);
        }
        if !self
            .start_channel(
                channel,
                ChannelKind::Subsystem {
                    name: name.to_string(),
                },
            )
            .await
        {
            return Self::reply(session, channel, false);
        }
        let ok = self
            .ask_upstream(channel, UpReq::Subsystem(name.to_string()))
            .await;
        Self::reply(session, channel, ok)
    }

    async fn window_change_request(
        &mut self,
        channel: ChannelId,
        cols: u32,
        rows: u32,
        pw: u32,
        ph: u32,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let (Some(s), Some(c)) = (&self.session, self.chans.get(&channel)) else {
            return Ok(());
        };
        if s.recorder
            .send(RecMsg::Resize {
                ch: c.rec_ch,
                cols,
                rows,
                at: Instant::now(),
            })
            .await
            .is_ok()
        {
            let _ = c.up.window_change(cols, rows, pw, ph).await;
        }
        Ok(())
    }

    async fn signal(
        &mut self,
        channel: ChannelId,
        signal: Sig,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let (Some(s), Some(c)) = (&self.session, self.chans.get(&channel)) else {
            return Ok(());
        };
        let _ = s
            .recorder
            .send(RecMsg::Marker {
                ch: Some(c.rec_ch),
                label: format!("signal {signal:?}"),
                at: Instant::now(),
            })
            .await;
        let _ = c.up.signal(signal).await;
        Ok(())
    }

    async fn data(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let (Some(s), Some(c)) = (&self.session, self.chans.get(&channel)) else {
            return Ok(());
        };
        let bytes = Bytes::copy_from_slice(data);
        if s.recorder
            .send(RecMsg::Data {
                ch: c.rec_ch,
                stream: Stream::In,
                data: bytes.clone(),
                at: Instant::now(),
            })
            .await
            .is_err()
        {
            // Fail closed: unrecorded input is never forwarded; the supervisor ends the session.
            return Ok(());
        }
        s.bytes_in.fetch_add(data.len() as u64, Ordering::Relaxed);
        let _ = c.up.data_bytes(bytes).await;
        Ok(())
    }

    async fn extended_data(
        &mut self,
        channel: ChannelId,
        code: u32,
        data: &[u8],
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let (Some(s), Some(c)) = (&self.session, self.chans.get(&channel)) else {
            return Ok(());
        };
        let bytes = Bytes::copy_from_slice(data);
        if s.recorder
            .send(RecMsg::Data {
                ch: c.rec_ch,
                stream: Stream::In,
                data: bytes.clone(),
                at: Instant::now(),
            })
            .await
            .is_err()
        {
            return Ok(());
        }
        s.bytes_in.fetch_add(data.len() as u64, Ordering::Relaxed);
        let _ = c.up.extended_data_bytes(code, bytes).await;
        Ok(())
    }

    async fn channel_eof(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(c) = self.chans.get(&channel) {
            let _ = c.up.eof().await;
        }
        Ok(())
    }

    async fn channel_close(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(c) = self.chans.remove(&channel) {
            let _ = c.up.close().await;
            if let Some(s) = &self.session {
                let _ = s.recorder.send(RecMsg::Close { ch: c.rec_ch }).await;
                s.io.channels
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&channel);
                s.io.channel_closed.notify_waiters();
            }
        }
        Ok(())
    }
}
