//! The durable SIEM spool: every event is committed here (SQLite, WAL, synchronous=FULL)
//! before `emit` returns, and each sink keeps its own cursor. An event leaves the spool only
//! when every configured sink has acknowledged it. Several processes (the server and CLI
//! commands) may append at once; SQLite serialises them.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use super::AccessEvent;

/// A spool failure.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("siem spool {path}: {why}")]
    Db { path: PathBuf, why: String },
    #[error(
        "the SIEM spool is full ({events} undelivered events, limit {limit}); new sessions are \
         refused until the SIEM catches up"
    )]
    Full { events: u64, limit: u64 },
    #[error("shared SIEM outbox (state store): {why}")]
    Shared { why: String },
    #[error("the SIEM delivery lease of sink `{sink}` passed to another node; it carries on from the same cursor")]
    Fenced { sink: String },
    #[error("shared SIEM outbox row {seq} cannot be read by this version ({why}); it is not passed over")]
    Unreadable { seq: i64, why: String },
}

/// One spooled event with its position.
#[derive(Debug, Clone)]
pub struct Spooled {
    pub seq: i64,
    /// Milliseconds since the Unix epoch when it was spooled.
    pub spooled_ms: i64,
    pub event: AccessEvent,
}

/// Delivery figures of one sink, kept in the spool so they survive restarts.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct SinkStats {
    pub sink: String,
    /// Events spooled but not yet acknowledged by this sink.
    pub queued: u64,
    pub delivered: u64,
    pub failed: u64,
    /// Events the sink refused for good (a 4xx that is not about credentials or the URL),
    /// written to the dead-letter file and passed over.
    pub dead_lettered: u64,
    /// Age of the oldest undelivered event, in seconds (0 when nothing is queued).
    pub oldest_age_secs: f64,
    pub last_error: Option<String>,
    /// The node delivering this sink while its lease holds (a cluster's shared outbox;
    /// None for a single node, whose own workers deliver).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    /// When that lease runs out unless renewed (RFC 3339).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worker_until: Option<String>,
}

/// The spool database.
pub struct Spool {
    path: PathBuf,
    conn: Mutex<Connection>,
    max_events: u64,
    /// A file of [`RESERVE_BYTES`] beside the database, given up when the disk is full so that
    /// the events closing what is running (session ends, denials) still commit; `None` while
    /// it is spent, with when it was last tried again.
    reserve: Mutex<Option<std::time::Instant>>,
}

/// Space the spool keeps back for a full disk (`<spool>.reserve`).
pub const RESERVE_BYTES: usize = 4 << 20;

/// How often a spent reserve is tried again.
const RESERVE_RETRY: Duration = Duration::from_secs(5);

/// Whether `e` says the disk (or the database's quota) is full.
fn disk_full(e: &rusqlite::Error) -> bool {
    matches!(
        e,
        rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::DiskFull
    )
}

fn now_ms() -> i64 {
    crate::clock::now().timestamp_millis()
}

impl Spool {
    /// Opens (creating) the spool at `path`; `max_events` bounds the undelivered backlog.
    pub fn open(path: &Path, max_events: u64) -> Result<Spool, SpoolError> {
        let err = |e: rusqlite::Error| SpoolError::Db {
            path: path.to_path_buf(),
            why: e.to_string(),
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| SpoolError::Db {
                path: path.to_path_buf(),
                why: e.to_string(),
            })?;
        }
        let conn = Connection::open(path).map_err(err)?;
        conn.busy_timeout(Duration::from_secs(10)).map_err(err)?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = FULL;
             CREATE TABLE IF NOT EXISTS events (
                 seq INTEGER PRIMARY KEY AUTOINCREMENT,
                 id TEXT NOT NULL UNIQUE,
                 spooled_ms INTEGER NOT NULL,
                 is_action INTEGER NOT NULL,
                 body TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS sinks (
                 name TEXT PRIMARY KEY,
                 cursor INTEGER NOT NULL DEFAULT 0,
                 delivered INTEGER NOT NULL DEFAULT 0,
                 failed INTEGER NOT NULL DEFAULT 0,
                 last_error TEXT);",
        )
        .map_err(err)?;
        // Spools from before dead-lettering lack its counter.
        let has_dead: bool = conn
            .query_row(
                "SELECT count(*) FROM pragma_table_info('sinks') WHERE name = 'dead_lettered'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .map_err(err)?
            > 0;
        if !has_dead {
            conn.execute_batch(
                "ALTER TABLE sinks ADD COLUMN dead_lettered INTEGER NOT NULL DEFAULT 0",
            )
            .map_err(err)?;
        }
        let spool = Spool {
            path: path.to_path_buf(),
            conn: Mutex::new(conn),
            max_events,
            reserve: Mutex::new(None),
        };
        spool.refill_reserve();
        Ok(spool)
    }

    fn reserve_path(&self) -> PathBuf {
        self.path.with_extension("reserve")
    }

    /// Writes the reserve file if it is missing (a partial one is removed again: the disk is
    /// still full). Returns whether it is in place.
    fn refill_reserve(&self) -> bool {
        let p = self.reserve_path();
        if std::fs::metadata(&p).is_ok_and(|m| m.len() as usize >= RESERVE_BYTES) {
            return true;
        }
        let written = (|| -> std::io::Result<()> {
            use std::io::Write;
            let mut f = std::fs::File::create(&p)?;
            f.write_all(&vec![0u8; RESERVE_BYTES])?;
            f.sync_all()
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&p);
            tracing::warn!(path = %p.display(), error = %e, "the SIEM spool's disk reserve could not be written");
            return false;
        }
        true
    }

    /// Gives up the reserve after a full-disk failure; true when there was one to give.
    fn spend_reserve(&self) -> bool {
        let mut r = self.reserve.lock().unwrap_or_else(|p| p.into_inner());
        let had = std::fs::remove_file(self.reserve_path()).is_ok();
        *r = Some(std::time::Instant::now());
        if had {
            tracing::error!(path = %self.path.display(), "the SIEM spool's disk is full: its reserve is spent so that running sessions can still end on the record; free space on it");
        }
        had
    }

    /// Puts a spent reserve back, at most every [`RESERVE_RETRY`].
    fn maybe_refill(&self) {
        let mut r = self.reserve.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(at) = *r {
            if at.elapsed() >= RESERVE_RETRY {
                *r = if self.refill_reserve() {
                    None
                } else {
                    Some(std::time::Instant::now())
                };
            }
        }
    }

    /// Whether the reserve is spent (the disk filled and has not been freed since).
    pub fn reserve_spent(&self) -> bool {
        self.reserve
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    fn err(&self, e: impl std::fmt::Display) -> SpoolError {
        SpoolError::Db {
            path: self.path.clone(),
            why: e.to_string(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A poisoned lock only means another call panicked; the connection is still usable.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers the configured sinks (new ones start at the oldest spooled event).
    pub fn register(&self, sinks: &[String]) -> Result<(), SpoolError> {
        let conn = self.lock();
        for s in sinks {
            conn.execute("INSERT OR IGNORE INTO sinks(name) VALUES (?1)", params![s])
                .map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    /// Number of events still in the spool.
    pub fn len(&self) -> Result<u64, SpoolError> {
        let conn = self.lock();
        conn.query_row("SELECT count(*) FROM events", [], |r| r.get::<_, i64>(0))
            .map(|n| n as u64)
            .map_err(|e| self.err(e))
    }

    /// True when nothing is spooled.
    pub fn is_empty(&self) -> Result<bool, SpoolError> {
        Ok(self.len()? == 0)
    }

    /// Commits events durably and returns the last sequence number. `opening` events (those
    /// that start something new: a session, a request) are refused when the backlog is at the
    /// limit; everything else is accepted so that what is already running is never lost.
    pub fn append(&self, events: &[AccessEvent], opening: bool) -> Result<i64, SpoolError> {
        let r = self.append_once(events, opening);
        match r {
            // A full disk: what closes something running may use the reserve; something new
            // is refused (it could not be recorded either).
            Err(Fail::Sqlite(e)) if disk_full(&e) && !opening && self.spend_reserve() => self
                .append_once(events, opening)
                .map_err(|e| self.failure(e)),
            Err(Fail::Sqlite(e)) if disk_full(&e) => {
                self.spend_reserve();
                Err(self.failure(Fail::Sqlite(e)))
            }
            Err(e) => Err(self.failure(e)),
            Ok(seq) => {
                self.maybe_refill();
                Ok(seq)
            }
        }
    }

    fn failure(&self, f: Fail) -> SpoolError {
        match f {
            Fail::Sqlite(e) if disk_full(&e) => self.err(format!(
                "{e}: the disk is full (No space left on device); free space on it"
            )),
            Fail::Sqlite(e) => self.err(e),
            Fail::Spool(e) => e,
        }
    }

    fn append_once(&self, events: &[AccessEvent], opening: bool) -> Result<i64, Fail> {
        let mut conn = self.lock();
        if opening {
            let n: i64 = conn.query_row("SELECT count(*) FROM events", [], |r| r.get(0))?;
            if n as u64 >= self.max_events {
                return Err(Fail::Spool(SpoolError::Full {
                    events: n as u64,
                    limit: self.max_events,
                }));
            }
        }
        let tx = conn.transaction()?;
        let mut last = 0;
        for e in events {
            let body = serde_json::to_string(e).map_err(|e| Fail::Spool(self.err(e)))?;
            tx.execute(
                "INSERT OR IGNORE INTO events(id, spooled_ms, is_action, body) VALUES (?1, ?2, ?3, ?4)",
                params![e.event_id, now_ms(), e.is_action() as i64, body],
            )?;
            last = tx.last_insert_rowid();
        }
        tx.commit()?;
        Ok(last)
    }

    /// Up to `limit` events after the sink's cursor, oldest first. Action events are skipped
    /// (but still passed over by the cursor) when the sink does not take them.
    pub fn batch(
        &self,
        sink: &str,
        limit: usize,
        actions: bool,
    ) -> Result<(Vec<Spooled>, Option<i64>), SpoolError> {
        let conn = self.lock();
        let cursor = cursor_of(&conn, sink).map_err(|e| self.err(e))?;
        let (events, upto) = batch_in(&conn, sink, limit, actions).map_err(|e| self.err(e))?;
        Ok((events, (upto > cursor).then_some(upto)))
    }

    /// Moves the sink's cursor to `upto` after a successful delivery of `n` events.
    pub fn ack(&self, sink: &str, upto: i64, n: u64) -> Result<(), SpoolError> {
        let conn = self.lock();
        conn.execute(
            "UPDATE sinks SET cursor = max(cursor, ?2), delivered = delivered + ?3, last_error = NULL WHERE name = ?1",
            params![sink, upto, n as i64],
        )
        .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Moves the sink's cursor past events it refused for good (already written to the
    /// dead-letter file), counting `n` of them.
    pub fn dead_letter(&self, sink: &str, upto: i64, n: u64, why: &str) -> Result<(), SpoolError> {
        let conn = self.lock();
        conn.execute(
            "UPDATE sinks SET cursor = max(cursor, ?2), dead_lettered = dead_lettered + ?3, last_error = ?4 WHERE name = ?1",
            params![sink, upto, n as i64, why],
        )
        .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Counts a failed delivery attempt.
    pub fn fail(&self, sink: &str, why: &str) -> Result<(), SpoolError> {
        let conn = self.lock();
        conn.execute(
            "UPDATE sinks SET failed = failed + 1, last_error = ?2 WHERE name = ?1",
            params![sink, why],
        )
        .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Delivers to a local sink under an exclusive spool transaction, so that two processes
    /// never write the same events twice: `write` gets the events after the cursor and must
    /// make them durable before returning Ok.
    pub fn deliver_exclusive(
        &self,
        sink: &str,
        actions: bool,
        write: impl FnOnce(&[Spooled]) -> Result<(), String>,
    ) -> Result<usize, SpoolError> {
        let mut conn = self.lock();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| self.err(e))?;
        let (events, upto) = batch_in(&tx, sink, 10_000, actions).map_err(|e| self.err(e))?;
        let cursor: i64 = tx
            .query_row(
                "SELECT cursor FROM sinks WHERE name = ?1",
                params![sink],
                |r| r.get(0),
            )
            .map_err(|e| self.err(e))?;
        if upto <= cursor {
            return Ok(0);
        }
        match write(&events) {
            Ok(()) => {
                tx.execute(
                    "UPDATE sinks SET cursor = ?2, delivered = delivered + ?3, last_error = NULL WHERE name = ?1",
                    params![sink, upto, events.len() as i64],
                )
                .map_err(|e| self.err(e))?;
                tx.commit().map_err(|e| self.err(e))?;
                Ok(events.len())
            }
            Err(why) => {
                tx.execute(
                    "UPDATE sinks SET failed = failed + 1, last_error = ?2 WHERE name = ?1",
                    params![sink, why],
                )
                .map_err(|e| self.err(e))?;
                tx.commit().map_err(|e| self.err(e))?;
                Err(self.err(why))
            }
        }
    }

    /// Drops events every configured sink has acknowledged.
    pub fn prune(&self, sinks: &[String]) -> Result<u64, SpoolError> {
        if sinks.is_empty() {
            return Ok(0);
        }
        let conn = self.lock();
        let marks = vec!["?"; sinks.len()].join(",");
        let sql = format!(
            "DELETE FROM events WHERE seq <= (SELECT min(cursor) FROM sinks WHERE name IN ({marks}))"
        );
        let n = conn
            .execute(&sql, rusqlite::params_from_iter(sinks.iter()))
            .map_err(|e| self.err(e))?;
        Ok(n as u64)
    }

    /// Delivery figures of one sink.
    pub fn stats(&self, sink: &str, actions: bool) -> Result<SinkStats, SpoolError> {
        let conn = self.lock();
        let row = conn
            .query_row(
                "SELECT cursor, delivered, failed, last_error, dead_lettered FROM sinks WHERE name = ?1",
                params![sink],
                |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, Option<String>>(3)?,
                        r.get::<_, i64>(4)?,
                    ))
                },
            )
            .optional()
            .map_err(|e| self.err(e))?;
        let (cursor, delivered, failed, last_error, dead) = row.unwrap_or((0, 0, 0, None, 0));
        let filter = if actions { "" } else { " AND is_action = 0" };
        let (queued, oldest): (i64, Option<i64>) = conn
            .query_row(
                &format!("SELECT count(*), min(spooled_ms) FROM events WHERE seq > ?1{filter}"),
                params![cursor],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(|e| self.err(e))?;
        Ok(SinkStats {
            sink: sink.to_string(),
            queued: queued as u64,
            delivered: delivered as u64,
            failed: failed as u64,
            dead_lettered: dead as u64,
            oldest_age_secs: oldest
                .map(|ms| (now_ms() - ms).max(0) as f64 / 1000.0)
                .unwrap_or(0.0),
            last_error,
            worker: None,
            worker_until: None,
        })
    }
}

/// Why one append attempt failed.
enum Fail {
    Sqlite(rusqlite::Error),
    Spool(SpoolError),
}

impl From<rusqlite::Error> for Fail {
    fn from(e: rusqlite::Error) -> Fail {
        Fail::Sqlite(e)
    }
}

fn cursor_of(conn: &Connection, sink: &str) -> Result<i64, String> {
    conn.query_row(
        "SELECT cursor FROM sinks WHERE name = ?1",
        params![sink],
        |r| r.get(0),
    )
    .optional()
    .map_err(|e| e.to_string())?
    .ok_or_else(|| format!("sink `{sink}` is not registered"))
}

fn batch_in(
    conn: &Connection,
    sink: &str,
    limit: usize,
    actions: bool,
) -> Result<(Vec<Spooled>, i64), String> {
    let cursor: i64 = conn
        .query_row(
            "SELECT cursor FROM sinks WHERE name = ?1",
            params![sink],
            |r| r.get(0),
        )
        .optional()
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("sink `{sink}` is not registered"))?;
    let mut stmt = conn
        .prepare_cached(
            "SELECT seq, spooled_ms, is_action, body FROM events WHERE seq > ?1 ORDER BY seq LIMIT ?2",
        )
        .map_err(|e| e.to_string())?;
    let rows = stmt
        .query_map(params![cursor, limit as i64], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)? != 0,
                r.get::<_, String>(3)?,
            ))
        })
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    let mut upto = cursor;
    for row in rows {
        let (seq, spooled_ms, is_action, body) = row.map_err(|e| e.to_string())?;
        upto = seq;
        if is_action && !actions {
            continue;
        }
        match serde_json::from_str::<AccessEvent>(&body) {
            Ok(event) => out.push(Spooled {
                seq,
                spooled_ms,
                event,
            }),
            // A row this version cannot read is passed over loudly rather than blocking the
            // sink forever; it stays readable in the spool file until pruned.
            Err(e) => tracing::error!(seq, error = %e, "unreadable SIEM spool row skipped"),
        }
    }
    Ok((out, upto))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::siem::Action;

    fn ev(a: Action) -> AccessEvent {
        AccessEvent::new(a, "alice")
    }

    #[test]
    fn cursors_are_per_sink_and_survive_reopening() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("spool.sqlite");
        let sinks = vec!["a".to_string(), "b".to_string()];
        {
            let s = Spool::open(&path, 100).expect("open");
            s.register(&sinks).expect("register");
            s.append(&[ev(Action::SessionStart), ev(Action::Command)], true)
                .expect("append");
            s.append(&[ev(Action::SessionEnd)], false).expect("append");
            let (b, upto) = s.batch("a", 10, true).expect("batch");
            assert_eq!(b.len(), 3);
            let upto = upto.expect("the cursor moves");
            s.ack("a", upto, 3).expect("ack");
            // Sink b takes no action events: two to deliver, the cursor still covers three.
            let (b, upto_b) = s.batch("b", 10, false).expect("batch");
            assert_eq!(b.len(), 2);
            assert_eq!(upto_b, Some(upto));
            assert_eq!(s.prune(&sinks).expect("prune"), 0, "b has not acked");
        }
        let s = Spool::open(&path, 100).expect("reopen");
        s.register(&sinks).expect("register");
        assert_eq!(s.batch("a", 10, true).expect("batch").1, None);
        let st = s.stats("b", false).expect("stats");
        assert_eq!((st.queued, st.delivered), (2, 0));
        let (_, upto) = s.batch("b", 10, false).expect("batch");
        s.ack("b", upto.expect("moves"), 2).expect("ack");
        assert_eq!(s.prune(&sinks).expect("prune"), 3);
        assert!(s.is_empty().expect("len"));
        assert_eq!(s.stats("a", true).expect("stats").delivered, 3);
    }

    #[test]
    fn a_full_spool_refuses_opening_events_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Spool::open(&dir.path().join("spool.sqlite"), 2).expect("open");
        s.register(&["a".to_string()]).expect("register");
        s.append(&[ev(Action::SessionStart), ev(Action::SessionStart)], true)
            .expect("append");
        match s.append(&[ev(Action::SessionStart)], true) {
            Err(SpoolError::Full {
                events: 2,
                limit: 2,
            }) => {}
            other => panic!("expected Full, got {other:?}"),
        }
        s.append(&[ev(Action::SessionEnd)], false)
            .expect("a running session's end is never refused");
        assert_eq!(s.len().expect("len"), 3);
    }

    #[test]
    fn exclusive_delivery_writes_each_event_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Spool::open(&dir.path().join("spool.sqlite"), 100).expect("open");
        s.register(&["file".to_string()]).expect("register");
        s.append(&[ev(Action::GrantCreated)], true).expect("append");
        let mut seen = 0;
        s.deliver_exclusive("file", true, |e| {
            seen += e.len();
            Ok(())
        })
        .expect("deliver");
        assert_eq!(seen, 1);
        let n = s
            .deliver_exclusive("file", true, |_| Err("must not be called".into()))
            .expect("nothing to do");
        assert_eq!(n, 0);
        s.append(&[ev(Action::GrantRevoked)], true).expect("append");
        assert!(s
            .deliver_exclusive("file", true, |_| Err("disk full".into()))
            .is_err());
        let st = s.stats("file", true).expect("stats");
        assert_eq!((st.queued, st.failed), (1, 1));
        assert_eq!(st.last_error.as_deref(), Some("disk full"));
    }
}
