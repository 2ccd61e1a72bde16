//! Admission before trust: every listener counts its unauthenticated connections apart from
//! its admitted sessions, with a cap per source address and a cap in total.
//!
//! The rules, for one listener:
//! - A connection is *pre-auth* from accept until it has authenticated; it then leaves this
//!   table (see [`Ticket::promote`]) and counts against the listener's session limit instead,
//!   so an admitted user never waits behind strangers.
//! - A source (an IPv4 address, or an IPv6 /64, since one host holds a whole /64) may hold at
//!   most `per_source` pre-auth connections; more are closed at accept.
//! - When the table holds `total` connections, a new connection from a source that holds
//!   fewer than the busiest source evicts the busiest source's oldest connection. A flood from
//!   a few addresses therefore never locks out an address that is not flooding; only a flood
//!   from more addresses than `total` can, and then newcomers still displace the oldest.
//! - Every pre-auth connection also has a deadline (`login_grace`), which each listener
//!   enforces on every read before authentication.
//! - Behind a load balancer listed in `listeners.proxy_protocol_from`, the source is the
//!   client its PROXY header names ([`crate::proxy_protocol`]); [`PreAuth::accept`] reads it
//!   first, with at most `total` connections waiting for their header at once.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

/// Why a connection was not let in (or was let go) before authenticating.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Its source already holds `per_source` pre-auth connections.
    PerSource,
    /// The table is full and its source is among the busiest.
    Full,
    /// A trusted proxy's connection without a valid PROXY header (or too many waiting for
    /// theirs).
    ProxyHeader,
}

/// Counters, exported as metrics.
#[derive(Debug, Default)]
pub struct PreAuthStats {
    pub refused_per_source: AtomicU64,
    pub refused_full: AtomicU64,
    /// Connections closed to make room for a connection from a quieter source.
    pub evicted: AtomicU64,
    /// Connections closed because they did not authenticate within `login_grace`.
    pub timed_out: AtomicU64,
    /// Authenticated connections refused because the session limit was reached.
    pub refused_sessions: AtomicU64,
    /// Connections from a trusted proxy closed for a missing or bad PROXY header.
    pub refused_proxy_header: AtomicU64,
}

/// The pre-auth table of one listener.
#[derive(Debug)]
pub struct PreAuth {
    /// The listener's name in logs and metrics (`ssh`, `postgres`, `http`).
    pub name: &'static str,
    total: usize,
    per_source: usize,
    inner: Mutex<Inner>,
    pub stats: PreAuthStats,
    /// Peers whose PROXY header names the client.
    proxies: crate::proxy_protocol::Trusted,
    /// Places for connections from those peers still waiting for their header.
    awaiting_header: Arc<tokio::sync::Semaphore>,
}

#[derive(Debug, Default)]
struct Inner {
    next: u64,
    count: usize,
    /// Connections by source, oldest first.
    by_source: HashMap<Source, VecDeque<(u64, CancellationToken)>>,
}

/// The unit a per-source cap counts in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Source {
    V4([u8; 4]),
    /// The first 64 bits of an IPv6 address.
    V6([u8; 8]),
}

impl Source {
    pub fn of(ip: IpAddr) -> Source {
        match ip {
            IpAddr::V4(a) => Source::V4(a.octets()),
            IpAddr::V6(a) => match a.to_ipv4_mapped() {
                Some(v4) => Source::V4(v4.octets()),
                None => {
                    let o = a.octets();
                    let mut p = [0u8; 8];
                    p.copy_from_slice(&o[..8]);
                    Source::V6(p)
                }
            },
        }
    }
}

/// A connection's place in the table. Dropping it frees the place.
#[derive(Debug)]
pub struct Ticket {
    table: Arc<PreAuth>,
    source: Source,
    id: u64,
    /// Cancelled when the connection is evicted; the connection must then close.
    pub evicted: CancellationToken,
    held: bool,
}

impl PreAuth {
    pub fn new(name: &'static str, total: usize, per_source: usize) -> Arc<PreAuth> {
        Self::behind(name, total, per_source, Default::default())
    }

    /// A table whose connections from `proxies` name their client in a PROXY header.
    pub fn behind(
        name: &'static str,
        total: usize,
        per_source: usize,
        proxies: crate::proxy_protocol::Trusted,
    ) -> Arc<PreAuth> {
        Arc::new(PreAuth {
            name,
            total: total.max(1),
            per_source: per_source.max(1),
            inner: Mutex::new(Inner::default()),
            stats: PreAuthStats::default(),
            proxies,
            awaiting_header: Arc::new(tokio::sync::Semaphore::new(total.max(1))),
        })
    }

    /// Takes a new connection from `peer` in: reads the PROXY header first when `peer` is a
    /// trusted proxy, then admits the client it names (or `peer`). Returns the client's
    /// address and its ticket.
    pub async fn accept<S: tokio::io::AsyncRead + Unpin>(
        self: &Arc<Self>,
        socket: &mut S,
        peer: SocketAddr,
    ) -> Result<(SocketAddr, Ticket), Refusal> {
        let client = if self.proxies.contains(peer.ip()) {
            let Ok(_wait) = self.awaiting_header.clone().try_acquire_owned() else {
                self.stats.refused_proxy_header.fetch_add(1, Relaxed);
                return Err(Refusal::ProxyHeader);
            };
            match crate::proxy_protocol::client_of(socket, peer, &self.proxies).await {
                Ok(c) => c,
                Err(e) => {
                    self.stats.refused_proxy_header.fetch_add(1, Relaxed);
                    tracing::debug!(listener = self.name, %peer, error = %e, "PROXY header refused");
                    return Err(Refusal::ProxyHeader);
                }
            }
        } else {
            peer
        };
        Ok((client, self.admit(client.ip())?))
    }

    /// Connections now waiting to authenticate.
    pub fn active(&self) -> usize {
        self.lock().count
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a place for a new connection from `ip`, evicting as the module doc says.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Ticket, Refusal> {
        let source = Source::of(ip);
        let mut guard = self.lock();
        let inner = &mut *guard;
        let mine = inner.by_source.get(&source).map_or(0, |q| q.len());
        if mine >= self.per_source {
            self.stats.refused_per_source.fetch_add(1, Relaxed);
            return Err(Refusal::PerSource);
        }
        if inner.count >= self.total {
            // The busiest source; among equals, the one whose oldest connection is oldest.
            let busiest = inner
                .by_source
                .iter()
                .filter_map(|(s, q)| {
                    q.front()
                        .map(|(id, _)| (q.len(), std::cmp::Reverse(*id), *s))
                })
                .max()
                .map(|(n, _, s)| (n, s));
            match busiest {
                Some((n, victim)) if n > mine => {
                    if let Some(q) = inner.by_source.get_mut(&victim) {
                        if let Some((_, token)) = q.pop_front() {
                            token.cancel();
                            inner.count = inner.count.saturating_sub(1);
                            self.stats.evicted.fetch_add(1, Relaxed);
                        }
                        if q.is_empty() {
                            inner.by_source.remove(&victim);
                        }
                    }
                }
                _ => {
                    self.stats.refused_full.fetch_add(1, Relaxed);
                    return Err(Refusal::Full);
                }
            }
        }
        inner.next += 1;
        let id = inner.next;
        let evicted = CancellationToken::new();
        inner
            .by_source
            .entry(source)
            .or_default()
            .push_back((id, evicted.clone()));
        inner.count += 1;
        Ok(Ticket {
            table: self.clone(),
            source,
            id,
            evicted,
            held: true,
        })
    }

    fn release(&self, source: Source, id: u64) {
        let mut inner = self.lock();
        let mut removed = false;
        if let Some(q) = inner.by_source.get_mut(&source) {
            if let Some(at) = q.iter().position(|(i, _)| *i == id) {
                q.remove(at);
                removed = true;
            }
            if q.is_empty() {
                inner.by_source.remove(&source);
            }
        }
        if removed {
            inner.count -= 1;
        }
    }
}

impl Ticket {
    /// The connection authenticated: it leaves the pre-auth table and can no longer be evicted.
    pub fn promote(mut self) {
        self.free();
    }

    /// Counts a connection closed at its `login_grace` deadline.
    pub fn timed_out(&self) {
        self.table.stats.timed_out.fetch_add(1, Relaxed);
    }

    /// The table this ticket is in.
    pub fn table(&self) -> &Arc<PreAuth> {
        &self.table
    }

    fn free(&mut self) {
        if std::mem::take(&mut self.held) {
            self.table.release(self.source, self.id);
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.free();
    }
}

/// The admission state of every listener: the pre-auth tables and the admitted-session
/// permits (`limits.max_connections` each for SSH and PostgreSQL).
#[derive(Debug)]
pub struct Admission {
    pub ssh: Arc<PreAuth>,
    pub pg: Arc<PreAuth>,
    pub http: Arc<PreAuth>,
    pub ssh_sessions: Arc<tokio::sync::Semaphore>,
    pub pg_sessions: Arc<tokio::sync::Semaphore>,
    max_sessions: usize,
}

impl Admission {
    pub fn new(l: &crate::config::Limits, proxies: &crate::proxy_protocol::Trusted) -> Admission {
        Admission {
            ssh: PreAuth::behind("ssh", l.preauth_max, l.preauth_per_source, proxies.clone()),
            pg: PreAuth::behind(
                "postgres",
                l.preauth_max,
                l.preauth_per_source,
                proxies.clone(),
            ),
            // HTTP has no login at the connection level: every connection stays in its table,
            // which is then the connection cap (total and per source).
            http: PreAuth::behind(
                "http",
                l.http_max_connections,
                l.preauth_per_source,
                proxies.clone(),
            ),
            ssh_sessions: Arc::new(tokio::sync::Semaphore::new(l.max_connections)),
            pg_sessions: Arc::new(tokio::sync::Semaphore::new(l.max_connections)),
            max_sessions: l.max_connections,
        }
    }

    /// Prometheus lines for every listener.
    pub fn metrics(&self, out: &mut String) {
        let used =
            |s: &tokio::sync::Semaphore, max: usize| max.saturating_sub(s.available_permits());
        metrics(
            out,
            &[
                (&self.ssh, Some(used(&self.ssh_sessions, self.max_sessions))),
                (&self.pg, Some(used(&self.pg_sessions, self.max_sessions))),
                (&self.http, None),
            ],
        );
    }
}

/// Prometheus lines for the pre-auth tables and session counts of the listeners.
pub fn metrics(out: &mut String, tables: &[(&PreAuth, Option<usize>)]) {
    use std::fmt::Write;
    let _ = writeln!(
        out,
        "# HELP breakglass_preauth_connections Connections accepted that have not authenticated yet.\n# TYPE breakglass_preauth_connections gauge"
    );
    for (t, _) in tables {
        let _ = writeln!(
            out,
            "breakglass_preauth_connections{{listener=\"{}\"}} {}",
            t.name,
            t.active()
        );
    }
    let _ = writeln!(
        out,
        "# HELP breakglass_admitted_connections Authenticated connections (sessions and control channels).\n# TYPE breakglass_admitted_connections gauge"
    );
    for (t, n) in tables {
        let Some(n) = n else { continue };
        let _ = writeln!(
            out,
            "breakglass_admitted_connections{{listener=\"{}\"}} {n}",
            t.name
        );
    }
    let _ = writeln!(
        out,
        "# HELP breakglass_preauth_refused_total Connections refused or closed before authentication, by reason.\n# TYPE breakglass_preauth_refused_total counter"
    );
    for (t, _) in tables {
        let s = &t.stats;
        for (reason, v) in [
            ("per_source", &s.refused_per_source),
            ("full", &s.refused_full),
            ("evicted", &s.evicted),
            ("login_grace", &s.timed_out),
            ("session_limit", &s.refused_sessions),
            ("proxy_header", &s.refused_proxy_header),
        ] {
            let _ = writeln!(
                out,
                "breakglass_preauth_refused_total{{listener=\"{}\",reason=\"{reason}\"}} {}",
                t.name,
                v.load(Relaxed)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_source_is_capped_and_its_places_come_back() {
        let t = PreAuth::new("t", 100, 2);
        let a = t.admit(ip("10.0.0.1")).unwrap();
        let _b = t.admit(ip("10.0.0.1")).unwrap();
        assert_eq!(t.admit(ip("10.0.0.1")).unwrap_err(), Refusal::PerSource);
        assert!(t.admit(ip("10.0.0.2")).is_ok());
        drop(a);
        assert!(t.admit(ip("10.0.0.1")).is_ok());
        assert_eq!(t.stats.refused_per_source.load(Relaxed), 1);
    }

    #[test]
    fn a_full_table_evicts_the_busiest_source_not_the_newcomer() {
        let t = PreAuth::new("t", 4, 10);
        let flood: Vec<_> = (0..3).map(|_| t.admit(ip("10.0.0.9")).unwrap()).collect();
        let quiet = t.admit(ip("10.0.0.1")).unwrap();
        assert_eq!(t.active(), 4);
        // The flooder cannot grow: it is the busiest.
        assert_eq!(t.admit(ip("10.0.0.9")).unwrap_err(), Refusal::Full);
        // A newcomer displaces the flooder's oldest connection.
        let new = t.admit(ip("10.0.0.2")).unwrap();
        assert!(flood[0].evicted.is_cancelled());
        assert!(!flood[1].evicted.is_cancelled());
        assert!(!quiet.evicted.is_cancelled());
        assert_eq!(t.active(), 4);
        // Dropping an evicted ticket does not free a second place.
        drop(flood);
        assert_eq!(t.active(), 2);
        drop((quiet, new));
        assert_eq!(t.active(), 0);
    }

    #[test]
    fn equals_are_not_evicted_for_each_other() {
        let t = PreAuth::new("t", 2, 10);
        let _a = t.admit(ip("10.0.0.1")).unwrap();
        let _b = t.admit(ip("10.0.0.2")).unwrap();
        // Busiest holds 1, the newcomer holds 0: evict the oldest (10.0.0.1's).
        let _c = t.admit(ip("10.0.0.3")).unwrap();
        assert!(_a.evicted.is_cancelled());
        // 10.0.0.2 now holds one, as does 10.0.0.3; a second from 10.0.0.3 is refused.
        assert_eq!(t.admit(ip("10.0.0.3")).unwrap_err(), Refusal::Full);
    }

    #[test]
    fn promotion_frees_the_place_and_ipv6_counts_by_64() {
        let t = PreAuth::new("t", 10, 1);
        let a = t.admit(ip("2001:db8::1")).unwrap();
        assert_eq!(t.admit(ip("2001:db8::2")).unwrap_err(), Refusal::PerSource);
        assert!(t.admit(ip("2001:db8:0:1::2")).is_ok());
        a.promote();
        assert!(t.admit(ip("2001:db8::2")).is_ok());
        assert_eq!(
            Source::of(ip("::ffff:10.0.0.1")),
            Source::of(ip("10.0.0.1"))
        );
    }
}
