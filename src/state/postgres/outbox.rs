//! The shared SIEM outbox: events and per-sink cursors in the state store, so that any node
//! can carry on delivering what another node committed.
//!
//! - Appends take a transaction-level advisory lock, so sequence numbers are handed out in
//!   commit order: a reader that saw `seq = n` can never later see a committed `seq < n`
//!   appear behind its cursor.
//! - One node at a time delivers each sink: it holds the sink's lease (`holder`,
//!   `held_until`, stamped by the server's clock) and renews it before every batch. Moving
//!   the cursor is fenced by the lease: a node that lost it cannot move the cursor, so at
//!   worst a batch is delivered twice (same event ids), never skipped.
//!
//! Rows are raw here (the event body is JSON text); the SIEM layer owns their meaning.

use std::future::Future;
use std::time::Duration;

use super::{db, pg, PgStore, StateError, DB_NOW};

/// The advisory lock key of appends ("bgoutbox").
const OUTBOX_LOCK: i64 = 0x6267_6f75_7462_6f78;

/// An event to append.
pub struct NewOutboxRow {
    pub id: String,
    pub is_action: bool,
    pub body: String,
}

/// A committed event with its position.
#[derive(Debug, Clone)]
pub struct OutboxRow {
    pub seq: i64,
    pub spooled_ms: i64,
    pub is_action: bool,
    pub body: String,
}

/// What an append did.
#[derive(Debug, PartialEq, Eq)]
pub enum Appended {
    /// Committed; the last sequence number (0 when every event was already there).
    Seq(i64),
    /// Refused: the outbox already holds `events` undelivered events.
    Full { events: u64 },
}

/// One sink's row, with its backlog.
#[derive(Debug, Clone, Default)]
pub struct OutboxSink {
    pub cursor: i64,
    pub delivered: u64,
    pub failed: u64,
    pub dead_lettered: u64,
    pub last_error: Option<String>,
    /// The node delivering it, while its lease holds.
    pub holder: Option<String>,
    pub held_until_ms: Option<i64>,
    pub queued: u64,
    pub oldest_ms: Option<i64>,
    /// The server's clock when read, to judge `held_until_ms` and `oldest_ms` by.
    pub now_ms: i64,
}

impl PgStore {
    /// Registers sinks (a new one starts at the oldest event still held).
    pub async fn outbox_register(&self, sinks: &[String]) -> Result<(), StateError> {
        let names: Vec<String> = sinks.to_vec();
        self.exec(
            "INSERT INTO siem_sinks (name) SELECT unnest($1::text[]) ON CONFLICT (name) DO NOTHING",
            &[&names],
        )
        .await
        .map(drop)
    }

    /// Commits `rows` in one transaction. With `max_events`, refuses (commits nothing) when
    /// the outbox already holds that many events. An id already present is left alone.
    pub async fn outbox_append(
        &self,
        rows: &[NewOutboxRow],
        max_events: Option<u64>,
    ) -> Result<Appended, StateError> {
        self.call(async {
            let mut c = self.pool.get().await?;
            let tx = c.transaction().await.map_err(pg)?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&OUTBOX_LOCK])
                .await
                .map_err(pg)?;
            if let Some(max) = max_events {
                let n: i64 = tx
                    .query_one("SELECT count(*) FROM siem_outbox", &[])
                    .await
                    .map_err(pg)?
                    .get(0);
                if n as u64 >= max {
                    return Ok(Appended::Full { events: n as u64 });
                }
            }
            let insert = tx
                .prepare(&format!(
                    "INSERT INTO siem_outbox (id, spooled_ms, is_action, body) \
                     SELECT $1, t, $2, $3 FROM ({DB_NOW}) AS now(t) \
                     ON CONFLICT (id) DO NOTHING RETURNING seq"
                ))
                .await
                .map_err(pg)?;
            let mut last = 0;
            for r in rows {
                if let Some(row) = tx
                    .query_opt(&insert, &[&r.id, &r.is_action, &r.body])
                    .await
                    .map_err(pg)?
                {
                    last = row.get(0);
                }
            }
            tx.commit().await.map_err(pg)?;
            Ok(Appended::Seq(last))
        })
        .await
    }

    /// Takes or renews the delivery lease of `sink` for `holder`; false while another
    /// holder's lease runs.
    pub async fn outbox_claim(
        &self,
        sink: &str,
        holder: &str,
        lease: Duration,
    ) -> Result<bool, StateError> {
        let lease_ms = lease.as_millis() as i64;
        let n = self
            .exec(
                &format!(
                    "UPDATE siem_sinks SET holder = $2, held_until = t + $3::bigint \
                     FROM ({DB_NOW}) AS now(t) \
                     WHERE name = $1 AND (holder IS NULL OR holder = $2 OR held_until < t)"
                ),
                &[&sink, &holder, &lease_ms],
            )
            .await?;
        Ok(n == 1)
    }

    /// Gives the lease of `sink` up, if `holder` has it.
    pub async fn outbox_release(&self, sink: &str, holder: &str) -> Result<(), StateError> {
        self.exec(
            "UPDATE siem_sinks SET holder = NULL, held_until = NULL WHERE name = $1 AND holder = $2",
            &[&sink, &holder],
        )
        .await
        .map(drop)
    }

    /// Up to `limit` events after the sink's cursor, oldest first, with the cursor.
    pub async fn outbox_batch(
        &self,
        sink: &str,
        limit: usize,
    ) -> Result<(i64, Vec<OutboxRow>), StateError> {
        self.call(async {
            let c = self.pool.get().await?;
            let cursor = cursor(&c, sink).await?;
            let rows = c
                .query(
                    "SELECT seq, spooled_ms, is_action, body FROM siem_outbox \
                     WHERE seq > $1 ORDER BY seq LIMIT $2",
                    &[&cursor, &(limit as i64)],
                )
                .await
                .map_err(pg)?;
            Ok((cursor, rows.iter().map(outbox_row).collect()))
        })
        .await
    }

    /// Moves the cursor to `upto` after `delivered` events reached the sink, or past
    /// `dead_lettered` refused ones. With `holder`, only while that holder has the lease:
    /// false when it lost it (nothing changed).
    pub async fn outbox_ack(
        &self,
        sink: &str,
        holder: Option<&str>,
        upto: i64,
        delivered: u64,
        dead_lettered: u64,
        error: Option<&str>,
    ) -> Result<bool, StateError> {
        let n = self
            .exec(
                "UPDATE siem_sinks SET cursor = GREATEST(cursor, $2), delivered = delivered + $3, \
                 dead_lettered = dead_lettered + $4, last_error = $5 \
                 WHERE name = $1 AND ($6::text IS NULL OR holder = $6)",
                &[
                    &sink,
                    &upto,
                    &(delivered as i64),
                    &(dead_lettered as i64),
                    &error,
                    &holder,
                ],
            )
            .await?;
        Ok(n == 1)
    }

    /// Counts a failed delivery attempt.
    pub async fn outbox_fail(&self, sink: &str, why: &str) -> Result<(), StateError> {
        self.exec(
            "UPDATE siem_sinks SET failed = failed + 1, last_error = $2 WHERE name = $1",
            &[&sink, &why],
        )
        .await
        .map(drop)
    }

    /// Delivers to a sink under the sink row's lock, so that no two nodes (or processes)
    /// write the same events: `write` gets the events after the cursor and answers how many
    /// it delivered; the cursor then moves past all of them.
    pub async fn outbox_deliver_locked<F, Fut>(
        &self,
        sink: &str,
        limit: usize,
        write: F,
    ) -> Result<usize, StateError>
    where
        F: FnOnce(Vec<OutboxRow>) -> Fut + Send,
        Fut: Future<Output = Result<u64, String>> + Send,
    {
        self.call(async {
            let mut c = self.pool.get().await?;
            let tx = c.transaction().await.map_err(pg)?;
            let cursor: i64 = tx
                .query_opt("SELECT cursor FROM siem_sinks WHERE name = $1 FOR UPDATE", &[&sink])
                .await
                .map_err(pg)?
                .ok_or_else(|| db(format!("sink `{sink}` is not registered")))?
                .get(0);
            let rows: Vec<OutboxRow> = tx
                .query(
                    "SELECT seq, spooled_ms, is_action, body FROM siem_outbox \
                     WHERE seq > $1 ORDER BY seq LIMIT $2",
                    &[&cursor, &(limit as i64)],
                )
                .await
                .map_err(pg)?
                .iter()
                .map(outbox_row)
                .collect();
            let Some(upto) = rows.last().map(|r| r.seq) else {
                return Ok(0);
            };
            match write(rows).await {
                Ok(n) => {
                    tx.execute(
                        "UPDATE siem_sinks SET cursor = $2, delivered = delivered + $3, \
                         last_error = NULL WHERE name = $1",
                        &[&sink, &upto, &(n as i64)],
                    )
                    .await
                    .map_err(pg)?;
                    tx.commit().await.map_err(pg)?;
                    Ok(n as usize)
                }
                Err(why) => {
                    tx.execute(
                        "UPDATE siem_sinks SET failed = failed + 1, last_error = $2 WHERE name = $1",
                        &[&sink, &why],
                    )
                    .await
                    .map_err(pg)?;
                    tx.commit().await.map_err(pg)?;
                    Err(db(why))
                }
            }
        })
        .await
    }

    /// Drops events every registered sink has passed: every sink any node was configured
    /// with, not only this node's (nodes being reconfigured one by one may differ). A sink
    /// removed from every config keeps its row, and so holds events back, until its row is
    /// deleted (`DELETE FROM siem_sinks WHERE name = '…'`).
    pub async fn outbox_prune(&self) -> Result<u64, StateError> {
        self.exec(
            "DELETE FROM siem_outbox WHERE seq <= (SELECT min(cursor) FROM siem_sinks)",
            &[],
        )
        .await
    }

    /// Events held, delivered or not.
    pub async fn outbox_len(&self) -> Result<u64, StateError> {
        self.call(async {
            let c = self.pool.get().await?;
            let n: i64 = c
                .query_one("SELECT count(*) FROM siem_outbox", &[])
                .await
                .map_err(pg)?
                .get(0);
            Ok(n as u64)
        })
        .await
    }

    /// One sink's figures; its backlog counts action events only when `actions`.
    pub async fn outbox_sink(&self, sink: &str, actions: bool) -> Result<OutboxSink, StateError> {
        self.call(async {
            let c = self.pool.get().await?;
            let row = c
                .query_opt(
                    &format!(
                        "SELECT cursor, delivered, failed, dead_lettered, last_error, holder, \
                         held_until, t FROM siem_sinks, ({DB_NOW}) AS now(t) WHERE name = $1"
                    ),
                    &[&sink],
                )
                .await
                .map_err(pg)?
                .ok_or_else(|| db(format!("sink `{sink}` is not registered")))?;
            let mut s = OutboxSink {
                cursor: row.get(0),
                delivered: row.get::<_, i64>(1) as u64,
                failed: row.get::<_, i64>(2) as u64,
                dead_lettered: row.get::<_, i64>(3) as u64,
                last_error: row.get(4),
                holder: row.get(5),
                held_until_ms: row.get(6),
                now_ms: row.get(7),
                ..OutboxSink::default()
            };
            let back = c
                .query_one(
                    "SELECT count(*), min(spooled_ms) FROM siem_outbox \
                     WHERE seq > $1 AND ($2 OR NOT is_action)",
                    &[&s.cursor, &actions],
                )
                .await
                .map_err(pg)?;
            s.queued = back.get::<_, i64>(0) as u64;
            s.oldest_ms = back.get(1);
            Ok(s)
        })
        .await
    }
}

async fn cursor(c: &tokio_postgres::Client, sink: &str) -> Result<i64, StateError> {
    Ok(
        c.query_opt("SELECT cursor FROM siem_sinks WHERE name = $1", &[&sink])
            .await
            .map_err(pg)?
            .ok_or_else(|| db(format!("sink `{sink}` is not registered")))?
            .get(0),
    )
}

fn outbox_row(r: &tokio_postgres::Row) -> OutboxRow {
    OutboxRow {
        seq: r.get(0),
        spooled_ms: r.get(1),
        is_action: r.get(2),
        body: r.get(3),
    }
}

#[cfg(test)]
impl PgStore {
    /// Runs `sql` as is (tests break and mend the schema with it).
    pub async fn outbox_test_exec(&self, sql: &str) -> Result<(), StateError> {
        let c = self.pool.get().await?;
        c.batch_execute(sql).await.map_err(pg)
    }
}
