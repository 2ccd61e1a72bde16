//! Where committed events wait for their sinks.
//!
//! - [`LocalOutbox`]: the single node's spool file ([`Spool`], SQLite, synchronous=FULL).
//! - [`SharedOutbox`]: a cluster's outbox in the PostgreSQL state store. Any node appends;
//!   one node at a time delivers each sink, elected by a lease on the sink's row and fenced
//!   by it when it moves the cursor; so when a node dies, another carries on from the same
//!   cursor. When the state store cannot take an event that closes something already running
//!   (a session end, an action copy), the node keeps it in its own spool file and forwards it
//!   once the store is back; an event that opens something new is refused instead (fail
//!   closed).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use super::spool::{SinkStats, Spool, SpoolError, Spooled};
use super::{AccessEvent, SinkConfig, SinkKind};
use crate::state::{Appended, NewOutboxRow, OutboxRow, PgStore, StateError};

/// The fallback spool's one pseudo-sink: the shared outbox it forwards to.
pub const FORWARD: &str = "@shared-outbox";

/// Committed events and per-sink cursors.
#[async_trait]
pub trait Outbox: Send + Sync {
    /// True when several nodes share it (so each sink's delivery is elected).
    fn shared(&self) -> bool {
        false
    }
    /// Registers the configured sinks.
    async fn register(&self, sinks: &[String]) -> Result<(), SpoolError>;
    /// Commits events durably; the last sequence number. `opening` events are refused when
    /// the backlog is at its limit (see [`Spool::append`]).
    async fn append(&self, events: Vec<AccessEvent>, opening: bool) -> Result<i64, SpoolError>;
    /// Takes or renews the right to deliver `sink`; false while another node has it.
    async fn claim(&self, _sink: &str) -> Result<bool, SpoolError> {
        Ok(true)
    }
    /// Gives that right up (on shutdown), so another node takes over at once.
    async fn release(&self, _sink: &str) {}
    /// How often a worker renews its lease while it delivers (None: no lease).
    fn renew_every(&self) -> Option<Duration> {
        None
    }
    /// Moves events kept aside while the shared store was away into it; how many.
    async fn forward(&self) -> Result<u64, SpoolError> {
        Ok(0)
    }
    /// Up to `limit` events after the sink's cursor, and how far they reach (None when
    /// nothing is new). Action events are passed over when the sink does not take them.
    async fn batch(
        &self,
        sink: &str,
        limit: usize,
        actions: bool,
    ) -> Result<(Vec<Spooled>, Option<i64>), SpoolError>;
    /// Moves the cursor to `upto` after `n` events were delivered.
    async fn ack(&self, sink: &str, upto: i64, n: u64) -> Result<(), SpoolError>;
    /// Moves the cursor past `n` events refused for good (already in the dead-letter file).
    async fn dead_letter(&self, sink: &str, upto: i64, n: u64, why: &str)
        -> Result<(), SpoolError>;
    /// Counts a failed attempt.
    async fn fail(&self, sink: &str, why: &str) -> Result<(), SpoolError>;
    /// Writes a file sink from the cursor under an exclusive lock, so that no two writers
    /// write the same events.
    async fn deliver_file(&self, cfg: &SinkConfig) -> Result<usize, SpoolError>;
    /// Drops events every sink in `sinks` has passed.
    async fn prune(&self, sinks: &[String]) -> Result<u64, SpoolError>;
    /// A sink's delivery figures.
    async fn stats(&self, sink: &str, actions: bool) -> Result<SinkStats, SpoolError>;
}

/// Runs a spool call on the blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, SpoolError> + Send + 'static,
) -> Result<T, SpoolError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| SpoolError::Shared {
            why: format!("spool task failed: {e}"),
        })?
}

/// The single node's spool file.
pub struct LocalOutbox(pub Arc<Spool>);

#[async_trait]
impl Outbox for LocalOutbox {
    async fn register(&self, sinks: &[String]) -> Result<(), SpoolError> {
        self.0.register(sinks)
    }

    async fn append(&self, events: Vec<AccessEvent>, opening: bool) -> Result<i64, SpoolError> {
        let sp = self.0.clone();
        blocking(move || sp.append(&events, opening)).await
    }

    async fn batch(
        &self,
        sink: &str,
        limit: usize,
        actions: bool,
    ) -> Result<(Vec<Spooled>, Option<i64>), SpoolError> {
        let (sp, sink) = (self.0.clone(), sink.to_string());
        blocking(move || sp.batch(&sink, limit, actions)).await
    }

    async fn ack(&self, sink: &str, upto: i64, n: u64) -> Result<(), SpoolError> {
        let (sp, sink) = (self.0.clone(), sink.to_string());
        blocking(move || sp.ack(&sink, upto, n)).await
    }

    async fn dead_letter(
        &self,
        sink: &str,
        upto: i64,
        n: u64,
        why: &str,
    ) -> Result<(), SpoolError> {
        let (sp, sink, why) = (self.0.clone(), sink.to_string(), why.to_string());
        blocking(move || sp.dead_letter(&sink, upto, n, &why)).await
    }

    async fn fail(&self, sink: &str, why: &str) -> Result<(), SpoolError> {
        let (sp, sink, why) = (self.0.clone(), sink.to_string(), why.to_string());
        blocking(move || sp.fail(&sink, &why)).await
    }

    async fn deliver_file(&self, cfg: &SinkConfig) -> Result<usize, SpoolError> {
        let SinkKind::File { path, rotate_bytes } = &cfg.kind else {
            return Ok(0);
        };
        let (sp, name, actions) = (self.0.clone(), cfg.name.clone(), cfg.actions);
        let (path, rotate, format) = (path.clone(), *rotate_bytes, cfg.format);
        blocking(move || {
            sp.deliver_exclusive(&name, actions, |events| {
                let refs: Vec<&AccessEvent> = events.iter().map(|s| &s.event).collect();
                super::sink::write_file(&path, rotate, format, &refs)
            })
        })
        .await
    }

    async fn prune(&self, sinks: &[String]) -> Result<u64, SpoolError> {
        let (sp, sinks) = (self.0.clone(), sinks.to_vec());
        blocking(move || sp.prune(&sinks)).await
    }

    async fn stats(&self, sink: &str, actions: bool) -> Result<SinkStats, SpoolError> {
        let (sp, sink) = (self.0.clone(), sink.to_string());
        blocking(move || sp.stats(&sink, actions)).await
    }
}

/// A cluster's outbox in the state store, with this node's spool file as the fallback for
/// events that must not be lost while the store is away.
pub struct SharedOutbox {
    pg: PgStore,
    /// This node's id: the holder name of the sink leases it takes.
    node: String,
    lease: Duration,
    max_events: u64,
    fallback: Arc<Spool>,
}

/// Ok when the cursor moved under this node's lease, `Fenced` when another node holds it.
fn fenced(held: bool, sink: &str) -> Result<(), SpoolError> {
    if held {
        Ok(())
    } else {
        Err(SpoolError::Fenced {
            sink: sink.to_string(),
        })
    }
}

fn shared(e: StateError) -> SpoolError {
    SpoolError::Shared { why: e.to_string() }
}

/// Reads rows back into events, passing over action events unless `actions`; `upto` is the
/// last row's position. A row this version cannot read (a newer node's event kind, or a
/// damaged row) is never passed over: the batch stops before it, and a batch that begins with
/// it is an error, so the cursor stays and a node that can read it delivers it.
fn spooled(rows: Vec<OutboxRow>, actions: bool) -> Result<(Vec<Spooled>, Option<i64>), SpoolError> {
    let mut events = Vec::new();
    let mut upto = None;
    for r in rows {
        match serde_json::from_str::<AccessEvent>(&r.body) {
            Ok(event) => {
                upto = Some(r.seq);
                if actions || !r.is_action {
                    events.push(Spooled {
                        seq: r.seq,
                        spooled_ms: r.spooled_ms,
                        event,
                    });
                }
            }
            Err(e) if upto.is_none() => {
                return Err(SpoolError::Unreadable {
                    seq: r.seq,
                    why: e.to_string(),
                })
            }
            Err(_) => break,
        }
    }
    Ok((events, upto))
}

impl SharedOutbox {
    /// The outbox in `pg`; `fallback` is this node's spool file (registered for forwarding).
    pub fn new(
        pg: PgStore,
        node: &str,
        lease: Duration,
        max_events: u64,
        fallback: Arc<Spool>,
    ) -> Result<SharedOutbox, SpoolError> {
        fallback.register(&[FORWARD.to_string()])?;
        Ok(SharedOutbox {
            pg,
            node: node.to_string(),
            lease,
            max_events,
            fallback,
        })
    }

    fn rows(events: &[AccessEvent]) -> Result<Vec<NewOutboxRow>, SpoolError> {
        events
            .iter()
            .map(|e| {
                Ok(NewOutboxRow {
                    id: e.event_id.clone(),
                    is_action: e.is_action(),
                    body: serde_json::to_string(e)
                        .map_err(|e| SpoolError::Shared { why: e.to_string() })?,
                })
            })
            .collect()
    }

    /// Moves what the fallback spool holds into the shared outbox, oldest first; how many
    /// events it moved. Runs until the fallback is empty or the store fails.
    async fn forward_all(&self) -> Result<u64, SpoolError> {
        let mut moved = 0;
        loop {
            let sp = self.fallback.clone();
            let (events, upto) = blocking(move || sp.batch(FORWARD, 500, true)).await?;
            let Some(upto) = upto else {
                return Ok(moved);
            };
            let list: Vec<AccessEvent> = events.into_iter().map(|s| s.event).collect();
            let n = list.len() as u64;
            self.pg
                .outbox_append(&Self::rows(&list)?, None)
                .await
                .map_err(shared)?;
            let sp = self.fallback.clone();
            blocking(move || {
                sp.ack(FORWARD, upto, n)?;
                sp.prune(&[FORWARD.to_string()])
            })
            .await?;
            moved += n;
        }
    }
}

#[async_trait]
impl Outbox for SharedOutbox {
    fn shared(&self) -> bool {
        true
    }

    async fn register(&self, sinks: &[String]) -> Result<(), SpoolError> {
        self.pg.outbox_register(sinks).await.map_err(shared)
    }

    async fn append(&self, events: Vec<AccessEvent>, opening: bool) -> Result<i64, SpoolError> {
        let rows = Self::rows(&events)?;
        match self
            .pg
            .outbox_append(&rows, opening.then_some(self.max_events))
            .await
        {
            Ok(Appended::Seq(seq)) => Ok(seq),
            Ok(Appended::Full { events }) => Err(SpoolError::Full {
                events,
                limit: self.max_events,
            }),
            // Something new is refused: it could not be delivered from the cluster either.
            Err(e) if opening => Err(shared(e)),
            Err(e) => {
                tracing::error!(error = %e, events = events.len(), "the state store did not take SIEM events; kept in this node's spool until it is back");
                let sp = self.fallback.clone();
                blocking(move || sp.append(&events, false)).await?;
                Ok(0)
            }
        }
    }

    async fn forward(&self) -> Result<u64, SpoolError> {
        self.forward_all().await
    }

    fn renew_every(&self) -> Option<Duration> {
        Some((self.lease / 3).max(Duration::from_millis(100)))
    }

    async fn claim(&self, sink: &str) -> Result<bool, SpoolError> {
        self.pg
            .outbox_claim(sink, &self.node, self.lease)
            .await
            .map_err(shared)
    }

    async fn release(&self, sink: &str) {
        if let Err(e) = self.pg.outbox_release(sink, &self.node).await {
            tracing::warn!(sink, error = %e, "could not give up the SIEM delivery lease; it lapses by itself");
        }
    }

    async fn batch(
        &self,
        sink: &str,
        limit: usize,
        actions: bool,
    ) -> Result<(Vec<Spooled>, Option<i64>), SpoolError> {
        let (_, rows) = self.pg.outbox_batch(sink, limit).await.map_err(shared)?;
        spooled(rows, actions)
    }

    async fn ack(&self, sink: &str, upto: i64, n: u64) -> Result<(), SpoolError> {
        let held = self
            .pg
            .outbox_ack(sink, Some(&self.node), upto, n, 0, None)
            .await
            .map_err(shared)?;
        fenced(held, sink)
    }

    async fn dead_letter(
        &self,
        sink: &str,
        upto: i64,
        n: u64,
        why: &str,
    ) -> Result<(), SpoolError> {
        let held = self
            .pg
            .outbox_ack(sink, Some(&self.node), upto, 0, n, Some(why))
            .await
            .map_err(shared)?;
        fenced(held, sink)
    }

    async fn fail(&self, sink: &str, why: &str) -> Result<(), SpoolError> {
        self.pg.outbox_fail(sink, why).await.map_err(shared)
    }

    async fn deliver_file(&self, cfg: &SinkConfig) -> Result<usize, SpoolError> {
        let SinkKind::File { path, rotate_bytes } = &cfg.kind else {
            return Ok(0);
        };
        let (path, rotate, format, actions) =
            (path.clone(), *rotate_bytes, cfg.format, cfg.actions);
        self.pg
            .outbox_deliver_locked(&cfg.name, 10_000, move |rows| async move {
                let (events, _) = spooled(rows, actions).map_err(|e| e.to_string())?;
                let n = events.len() as u64;
                tokio::task::spawn_blocking(move || {
                    let refs: Vec<&AccessEvent> = events.iter().map(|s| &s.event).collect();
                    super::sink::write_file(&path, rotate, format, &refs)
                })
                .await
                .map_err(|e| e.to_string())??;
                Ok(n)
            })
            .await
            .map_err(shared)
    }

    async fn prune(&self, _sinks: &[String]) -> Result<u64, SpoolError> {
        // Every registered sink counts, not only this node's (see `outbox_prune`).
        self.pg.outbox_prune().await.map_err(shared)
    }

    async fn stats(&self, sink: &str, actions: bool) -> Result<SinkStats, SpoolError> {
        let s = self.pg.outbox_sink(sink, actions).await.map_err(shared)?;
        let worker = s
            .holder
            .filter(|_| s.held_until_ms.is_some_and(|u| u >= s.now_ms));
        Ok(SinkStats {
            sink: sink.to_string(),
            queued: s.queued,
            delivered: s.delivered,
            failed: s.failed,
            dead_lettered: s.dead_lettered,
            oldest_age_secs: s
                .oldest_ms
                .map(|ms| (s.now_ms - ms).max(0) as f64 / 1000.0)
                .unwrap_or(0.0),
            last_error: s.last_error,
            worker_until: worker.as_ref().and(s.held_until_ms).map(|ms| {
                chrono::DateTime::from_timestamp_millis(ms)
                    .unwrap_or_default()
                    .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
            }),
            worker,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::siem::Action;
    use crate::state::{PgSettings, PgStore};

    /// Two nodes' outboxes on one fresh database; each with its own fallback spool in `dir`.
    async fn two_nodes(
        dir: &std::path::Path,
        lease: Duration,
    ) -> (PgStore, SharedOutbox, SharedOutbox) {
        let url = crate::state::testpg::fresh_database().await;
        let settings = PgSettings {
            url,
            tls: None,
            pool_size: 4,
        };
        let pg = PgStore::open(&settings).await.expect("open");
        let node = |name: &str| {
            let spool =
                Arc::new(Spool::open(&dir.join(format!("{name}.sqlite")), 100).expect("spool"));
            SharedOutbox::new(pg.clone(), name, lease, 1000, spool).expect("outbox")
        };
        let (a, b) = (node("node-a"), node("node-b"));
        a.register(&["hook".to_string()]).await.expect("register");
        b.register(&["hook".to_string()]).await.expect("register");
        (pg, a, b)
    }

    fn events(n: usize, actor: &str) -> Vec<AccessEvent> {
        (0..n)
            .map(|_| AccessEvent::new(Action::GrantCreated, actor))
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_node_delivers_what_every_node_committed_in_commit_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_pg, a, b) = two_nodes(dir.path(), Duration::from_secs(30)).await;
        let (a, b) = (Arc::new(a), Arc::new(b));
        let mut tasks = Vec::new();
        for (o, who) in [(a.clone(), "a"), (b.clone(), "b")] {
            tasks.push(tokio::spawn(async move {
                for _ in 0..40 {
                    o.append(events(3, who), false).await.expect("append");
                }
            }));
        }
        // The reader runs while both write: a cursor must never pass an event that commits
        // later with a smaller sequence number.
        assert!(a.claim("hook").await.expect("claim"));
        assert!(
            !b.claim("hook").await.expect("claim"),
            "one worker per sink"
        );
        let mut seen = Vec::new();
        let mut last = 0;
        loop {
            let (got, upto) = a.batch("hook", 7, true).await.expect("batch");
            if let Some(upto) = upto {
                for s in &got {
                    assert!(s.seq > last, "in order");
                    last = s.seq;
                    seen.push(s.event.event_id.clone());
                }
                a.ack("hook", upto, got.len() as u64).await.expect("ack");
            } else if tasks.iter().all(|t| t.is_finished()) {
                let (_, upto) = a.batch("hook", 7, true).await.expect("batch");
                if upto.is_none() {
                    break;
                }
            } else {
                tokio::task::yield_now().await;
            }
        }
        for t in tasks {
            t.await.expect("writer");
        }
        let unique: std::collections::BTreeSet<_> = seen.iter().collect();
        assert_eq!(seen.len(), 240, "every event once");
        assert_eq!(unique.len(), 240);
        let st = b.stats("hook", true).await.expect("stats");
        assert_eq!(st.worker.as_deref(), Some("node-a"));
        assert_eq!((st.queued, st.delivered), (0, 240));
        assert_eq!(a.prune(&["hook".to_string()]).await.expect("prune"), 240);
    }

    #[tokio::test]
    async fn a_node_that_lost_the_lease_cannot_move_the_cursor() {
        let dir = tempfile::tempdir().expect("tempdir");
        // A zero lease lapses at once: node b may take it over straight away.
        let (pg, a, b) = two_nodes(dir.path(), Duration::ZERO).await;
        a.append(events(2, "x"), false).await.expect("append");
        assert!(a.claim("hook").await.expect("claim"));
        let (got, upto) = a.batch("hook", 10, true).await.expect("batch");
        assert_eq!(got.len(), 2);
        let b = SharedOutbox {
            lease: Duration::from_secs(60),
            ..b
        };
        assert!(b.claim("hook").await.expect("b takes the lapsed lease"));
        let late = a.ack("hook", upto.expect("upto"), 2).await;
        assert!(matches!(late, Err(SpoolError::Fenced { .. })), "{late:?}");
        // b carries on from the same cursor: nothing was skipped.
        let (again, upto) = b.batch("hook", 10, true).await.expect("batch");
        assert_eq!(again.len(), 2);
        b.ack("hook", upto.expect("upto"), 2).await.expect("ack");
        assert!(!a.claim("hook").await.expect("claim"), "b holds it now");
        b.release("hook").await;
        assert!(a.claim("hook").await.expect("released: a may take it"));
        drop(pg);
    }

    #[tokio::test]
    async fn an_outage_keeps_closing_events_aside_and_refuses_opening_ones() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (pg, a, _b) = two_nodes(dir.path(), Duration::from_secs(30)).await;
        // Break and mend the outbox table under the store's feet.
        let admin = pg.clone();
        admin_exec(&admin, "ALTER TABLE siem_outbox RENAME TO siem_outbox_away").await;
        let end = AccessEvent::new(Action::SessionEnd, "alice");
        a.append(vec![end.clone()], false)
            .await
            .expect("a closing event is kept aside, not lost");
        let start = AccessEvent::new(Action::SessionStart, "alice");
        let refused = a.append(vec![start], true).await;
        assert!(
            matches!(refused, Err(SpoolError::Shared { .. })),
            "{refused:?}"
        );
        assert!(a.forward().await.is_err(), "the store is still away");
        admin_exec(&admin, "ALTER TABLE siem_outbox_away RENAME TO siem_outbox").await;
        assert_eq!(a.forward().await.expect("forward"), 1);
        assert_eq!(a.forward().await.expect("nothing left"), 0);
        let (got, _) = a.batch("hook", 10, true).await.expect("batch");
        let ids: Vec<_> = got.iter().map(|s| s.event.event_id.clone()).collect();
        assert_eq!(ids, vec![end.event_id], "only the closing event, once");
    }

    #[tokio::test]
    async fn a_row_this_version_cannot_read_is_never_passed_over() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (pg, a, _b) = two_nodes(dir.path(), Duration::from_secs(30)).await;
        a.append(events(1, "x"), false).await.expect("append");
        admin_exec(
            &pg,
            "INSERT INTO siem_outbox (id, spooled_ms, is_action, body) \
             VALUES ('from-a-newer-node', 0, false, '{\"action\":\"not_known_yet\"}')",
        )
        .await;
        a.append(events(1, "y"), false).await.expect("append");
        assert!(a.claim("hook").await.expect("claim"));
        // The batch stops before the unreadable row...
        let (got, upto) = a.batch("hook", 10, true).await.expect("batch");
        assert_eq!(got.len(), 1);
        a.ack("hook", upto.expect("upto"), 1).await.expect("ack");
        // ...and a batch that begins with it is an error: the cursor stays.
        let r = a.batch("hook", 10, true).await;
        assert!(matches!(r, Err(SpoolError::Unreadable { .. })), "{r:?}");
        assert_eq!(a.stats("hook", true).await.expect("stats").queued, 2);
    }

    async fn admin_exec(pg: &PgStore, sql: &str) {
        pg.outbox_test_exec(sql).await.expect(sql);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_nodes_writing_one_file_sink_write_each_event_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_pg, a, b) = two_nodes(dir.path(), Duration::from_secs(30)).await;
        let file = dir.path().join("siem.jsonl");
        let mut cfg = crate::config::siem::SiemSettings::file_only(&file, &dir.path().join("x"))
            .sinks
            .remove(0);
        cfg.name = "hook".into();
        let (a, b) = (Arc::new(a), Arc::new(b));
        let mut tasks = Vec::new();
        for o in [a.clone(), b.clone()] {
            let cfg = cfg.clone();
            tasks.push(tokio::spawn(async move {
                for _ in 0..20 {
                    o.append(events(2, "w"), false).await.expect("append");
                    o.deliver_file(&cfg).await.expect("deliver");
                }
            }));
        }
        for t in tasks {
            t.await.expect("writer");
        }
        let text = std::fs::read_to_string(&file).expect("file");
        let ids: Vec<String> = text
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).expect("json line");
                v["event_id"].as_str().expect("event_id").to_string()
            })
            .collect();
        let unique: std::collections::BTreeSet<_> = ids.iter().collect();
        assert_eq!((ids.len(), unique.len()), (80, 80), "each event once");
    }
}
