//! The embedded state store: one SQLite file in the data dir with versioned migrations.

use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use chrono::{DateTime, TimeZone, Utc};
use rusqlite::{params, Connection, OptionalExtension, Row};

use super::{
    Approval, CabReview, Grant, IncidentReportRow, LedgerEntry, LinkUse, NewGrant, NewRequest,
    NodeRow, Request, RequestStatus, Review, ReviewAnswers, ReviewFilter, SearchEntry, SearchHit,
    SessionEnd, SessionFilter, SessionRow, StateError, Store, StoredEvent,
};

/// Schema migrations, applied in order; `PRAGMA user_version` records how many ran.
/// Never edit a released migration: add a new one.
const MIGRATIONS: &[&str] = &[
    // 1: grants and the session index.
    "CREATE TABLE grants (
        id TEXT PRIMARY KEY,
        person TEXT NOT NULL,
        target TEXT NOT NULL,
        reason TEXT NOT NULL,
        incident_id TEXT NOT NULL,
        created_by TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        expires_at INTEGER NOT NULL,
        revoked_at INTEGER,
        revoked_by TEXT,
        revoke_reason TEXT
     );
     CREATE INDEX grants_person_target ON grants(person, target);
     CREATE TABLE sessions (
        id TEXT PRIMARY KEY,
        protocol TEXT NOT NULL,
        person TEXT NOT NULL,
        target TEXT NOT NULL,
        grant_id TEXT NOT NULL,
        client_addr TEXT NOT NULL,
        started_at INTEGER NOT NULL,
        deadline INTEGER NOT NULL,
        ended_at INTEGER,
        end_reason TEXT,
        bytes_in INTEGER NOT NULL DEFAULT 0,
        bytes_out INTEGER NOT NULL DEFAULT 0,
        recording_prefix TEXT NOT NULL
     );
     CREATE INDEX sessions_started ON sessions(started_at);",
    // 2: requests, approvals and the incident event store.
    "CREATE TABLE requests (
        id TEXT PRIMARY KEY,
        person TEXT NOT NULL,
        target TEXT NOT NULL,
        justification TEXT NOT NULL,
        incident_id TEXT NOT NULL,
        severity TEXT NOT NULL,
        scenario TEXT NOT NULL,
        duration_ms INTEGER NOT NULL,
        created_at INTEGER NOT NULL,
        expires_at INTEGER NOT NULL,
        status TEXT NOT NULL,
        decided_at INTEGER,
        decided_by TEXT,
        decision_reason TEXT,
        grant_id TEXT,
        emergency INTEGER NOT NULL DEFAULT 0
     );
     CREATE INDEX requests_status ON requests(status);
     CREATE TABLE approvals (
        request_id TEXT NOT NULL REFERENCES requests(id),
        approver TEXT NOT NULL,
        at INTEGER NOT NULL,
        PRIMARY KEY (request_id, approver)
     );
     CREATE TABLE events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        correlation_id TEXT NOT NULL,
        event_type TEXT NOT NULL,
        event_data TEXT NOT NULL,
        actor TEXT NOT NULL,
        created_at INTEGER NOT NULL
     );
     CREATE INDEX events_correlation ON events(correlation_id, seq);
     ALTER TABLE grants ADD COLUMN request_id TEXT;
     ALTER TABLE grants ADD COLUMN review_required INTEGER NOT NULL DEFAULT 0;",
    // 3: post-incident reviews. Signed reviews are never updated again (checked in code and
    // by the trigger).
    "CREATE TABLE reviews (
        id TEXT PRIMARY KEY,
        correlation_id TEXT NOT NULL,
        grant_id TEXT NOT NULL UNIQUE,
        person TEXT NOT NULL,
        target TEXT NOT NULL,
        scenario TEXT NOT NULL,
        emergency INTEGER NOT NULL,
        approvers TEXT NOT NULL,
        opened_at INTEGER NOT NULL,
        due_at INTEGER NOT NULL,
        overdue_alerted INTEGER NOT NULL DEFAULT 0,
        signed_by TEXT,
        signed_at INTEGER,
        findings TEXT,
        root_cause TEXT
     );
     CREATE INDEX reviews_due ON reviews(signed_at, due_at);
     CREATE TRIGGER reviews_immutable BEFORE UPDATE ON reviews
     WHEN OLD.signed_at IS NOT NULL
     BEGIN SELECT RAISE(ABORT, 'signed reviews are immutable'); END;",
    // 4: JIT credentials (verifiers only) and key usage.
    "CREATE TABLE credentials (
        grant_id TEXT PRIMARY KEY,
        person TEXT NOT NULL,
        verifier TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        expires_at INTEGER NOT NULL
     );
     CREATE TABLE key_usage (
        fingerprint TEXT PRIMARY KEY,
        person TEXT NOT NULL,
        last_used INTEGER NOT NULL
     );",
    // 5: JSON API bearer tokens (hashes only).
    "CREATE TABLE api_tokens (
        hash TEXT PRIMARY KEY,
        person TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        expires_at INTEGER NOT NULL
     );",
    // 6: the vault (encrypted) and credential rotations.
    "CREATE TABLE vault (
        name TEXT NOT NULL,
        slot TEXT NOT NULL,
        blob TEXT NOT NULL,
        updated_at INTEGER NOT NULL,
        PRIMARY KEY (name, slot)
     );
     CREATE TABLE rotations (
        grant_id TEXT PRIMARY KEY,
        target TEXT NOT NULL,
        outcome TEXT NOT NULL,
        done_at INTEGER NOT NULL
     );",
    // 7: single-use web login links and the search index over commands and SQL.
    "CREATE TABLE login_links (
        hash TEXT PRIMARY KEY,
        person TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        expires_at INTEGER NOT NULL,
        used_at INTEGER
     );
     CREATE TABLE search_text (
        session_id TEXT NOT NULL,
        channel INTEGER NOT NULL,
        t REAL NOT NULL,
        kind TEXT NOT NULL,
        text TEXT NOT NULL
     );
     CREATE INDEX search_text_session ON search_text(session_id);
     CREATE TABLE search_indexed (
        session_id TEXT PRIMARY KEY,
        indexed_at INTEGER NOT NULL
     );",
    // 8: the evidence ledger: every recording object the gateway wrote (or spooled), with its
    // hash and chain link, and whether the session's manifest is written.
    "CREATE TABLE recording_objects (
        session_id TEXT NOT NULL,
        key TEXT NOT NULL,
        size INTEGER NOT NULL,
        sha256 TEXT NOT NULL,
        pos INTEGER,
        chain TEXT,
        PRIMARY KEY (session_id, key)
     );
     ALTER TABLE sessions ADD COLUMN sealed INTEGER NOT NULL DEFAULT 0;
     CREATE INDEX sessions_unsealed ON sessions(sealed) WHERE sealed = 0;",
    // 9: nodes and their leases; which node holds a session.
    "ALTER TABLE sessions ADD COLUMN node_id TEXT NOT NULL DEFAULT '';
     CREATE TABLE nodes (
        node_id TEXT PRIMARY KEY,
        started_at INTEGER NOT NULL,
        renewed_at INTEGER NOT NULL,
        expires_at INTEGER NOT NULL,
        draining INTEGER NOT NULL DEFAULT 0,
        live_sessions INTEGER NOT NULL DEFAULT 0,
        version TEXT NOT NULL DEFAULT ''
     );",
    // 10: PostgreSQL's shared SIEM outbox. A single node keeps its own spool file
    // (`siem-spool.sqlite`, synchronous=FULL), so this step holds nothing here.
    "",
    // 11: the review's answers; incident reports, CAB reviews (immutable) and the one alert
    // per overdue timeline item.
    "ALTER TABLE reviews ADD COLUMN answers TEXT;
     CREATE TABLE incident_reports (
        id TEXT PRIMARY KEY,
        incident_id TEXT NOT NULL,
        created_by TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        sha256 TEXT NOT NULL
     );
     CREATE INDEX incident_reports_incident ON incident_reports(incident_id, created_at);
     CREATE TABLE cab_reviews (
        incident_id TEXT PRIMARY KEY,
        signed_by TEXT NOT NULL,
        signed_at INTEGER NOT NULL,
        outcome TEXT NOT NULL,
        notes TEXT NOT NULL
     );
     CREATE TRIGGER cab_reviews_immutable BEFORE UPDATE ON cab_reviews
     BEGIN SELECT RAISE(ABORT, 'CAB reviews are immutable'); END;
     CREATE TRIGGER cab_reviews_kept BEFORE DELETE ON cab_reviews
     BEGIN SELECT RAISE(ABORT, 'CAB reviews are immutable'); END;
     CREATE TABLE incident_alerts (
        incident_id TEXT NOT NULL,
        item TEXT NOT NULL,
        alerted_at INTEGER NOT NULL,
        PRIMARY KEY (incident_id, item)
     );",
];

/// SQLite behind a mutex; calls run on the blocking pool.
#[derive(Clone)]
pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
}

fn db(e: impl std::fmt::Display) -> StateError {
    StateError::Db(e.to_string())
}

fn ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

fn from_ms(v: i64) -> DateTime<Utc> {
    // Out-of-range values can only come from a hand-edited database; clamp them to the epoch
    // rather than panic.
    Utc.timestamp_millis_opt(v).single().unwrap_or_default()
}

impl SqliteStore {
    /// Opens (creating if needed) the state file and applies pending migrations.
    pub fn open(path: &Path) -> Result<SqliteStore, StateError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| db(format!("create {}: {e}", dir.display())))?;
        }
        let conn =
            Connection::open(path).map_err(|e| db(format!("open {}: {e}", path.display())))?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(db)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(db)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(db)?;
        Self::migrate(&conn)?;
        Ok(SqliteStore {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    fn migrate(conn: &Connection) -> Result<(), StateError> {
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(db)?;
        let known = MIGRATIONS.len() as i64;
        if version > known {
            return Err(StateError::TooNew {
                found: version,
                known,
            });
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            let tx = conn.unchecked_transaction().map_err(db)?;
            tx.execute_batch(sql).map_err(db)?;
            tx.pragma_update(None, "user_version", (i + 1) as i64)
                .map_err(db)?;
            tx.commit().map_err(db)?;
        }
        Ok(())
    }

    /// Runs `f` with the connection on the blocking pool.
    async fn with<T, F>(&self, f: F) -> Result<T, StateError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StateError> + Send + 'static,
    {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            // A poisoned mutex means another call panicked mid-query; SQLite rolled the
            // transaction back, so the connection is still usable.
            let guard = conn.lock().unwrap_or_else(|p| p.into_inner());
            f(&guard)
        })
        .await
        .map_err(|e| db(format!("state task failed: {e}")))?
    }
}

const GRANT_COLS: &str = "id, person, target, reason, incident_id, created_by, created_at, \
                          expires_at, revoked_at, revoked_by, revoke_reason, request_id, review_required";

fn grant_row(r: &Row<'_>) -> rusqlite::Result<Grant> {
    Ok(Grant {
        id: r.get(0)?,
        person: r.get(1)?,
        target: r.get(2)?,
        reason: r.get(3)?,
        incident_id: r.get(4)?,
        created_by: r.get(5)?,
        created_at: from_ms(r.get(6)?),
        expires_at: from_ms(r.get(7)?),
        revoked_at: r.get::<_, Option<i64>>(8)?.map(from_ms),
        revoked_by: r.get(9)?,
        revoke_reason: r.get(10)?,
        request_id: r.get(11)?,
        review_required: r.get::<_, i64>(12)? != 0,
    })
}

const SESSION_COLS: &str = "id, protocol, person, target, grant_id, client_addr, started_at, \
                            deadline, ended_at, end_reason, bytes_in, bytes_out, recording_prefix, \
                            node_id";
/// How many columns [`SESSION_COLS`] names (columns after them start at this index).
const SESSION_N: usize = 14;

fn session_row(r: &Row<'_>) -> rusqlite::Result<SessionRow> {
    Ok(SessionRow {
        id: r.get(0)?,
        protocol: r.get(1)?,
        person: r.get(2)?,
        target: r.get(3)?,
        grant_id: r.get(4)?,
        client_addr: r.get(5)?,
        started_at: from_ms(r.get(6)?),
        deadline: from_ms(r.get(7)?),
        ended_at: r.get::<_, Option<i64>>(8)?.map(from_ms),
        end_reason: r.get(9)?,
        bytes_in: r.get::<_, i64>(10)?.max(0) as u64,
        bytes_out: r.get::<_, i64>(11)?.max(0) as u64,
        recording_prefix: r.get(12)?,
        node_id: r.get(13)?,
    })
}

const NODE_COLS: &str =
    "node_id, started_at, renewed_at, expires_at, draining, live_sessions, version";

fn node_row(r: &Row<'_>) -> rusqlite::Result<NodeRow> {
    Ok(NodeRow {
        node_id: r.get(0)?,
        started_at: from_ms(r.get(1)?),
        renewed_at: from_ms(r.get(2)?),
        expires_at: from_ms(r.get(3)?),
        draining: r.get::<_, i64>(4)? != 0,
        live_sessions: r.get::<_, i64>(5)?.max(0) as u64,
        version: r.get(6)?,
    })
}

/// The WHERE clause of a session filter over the `sessions` table, using parameters ?1..?9
/// (given back in order).
fn session_where(f: &SessionFilter) -> (&'static str, [rusqlite::types::Value; 9]) {
    use rusqlite::types::Value as V;
    let text = |o: &Option<String>| o.clone().map(V::Text).unwrap_or(V::Null);
    let time = |o: Option<DateTime<Utc>>| o.map(|t| V::Integer(ms(t))).unwrap_or(V::Null);
    let (review, due) = match f.review {
        None => (V::Null, V::Null),
        Some(ReviewFilter::None) => (V::Text("none".into()), V::Null),
        Some(ReviewFilter::Open) => (V::Text("open".into()), V::Null),
        Some(ReviewFilter::Overdue(at)) => (V::Text("overdue".into()), V::Integer(ms(at))),
        Some(ReviewFilter::Signed) => (V::Text("signed".into()), V::Null),
    };
    (
        "(?1 IS NULL OR person = ?1) AND (?2 IS NULL OR target = ?2) \
         AND (?3 IS NULL OR started_at >= ?3) AND (?4 IS NULL OR started_at < ?4) \
         AND (?5 IS NULL OR protocol = ?5) \
         AND (?6 IS NULL OR grant_id IN (SELECT id FROM grants WHERE incident_id = ?6)) \
         AND (?7 IS NULL \
              OR (?7 = 'none' AND grant_id NOT IN (SELECT grant_id FROM reviews)) \
              OR (?7 = 'signed' AND grant_id IN \
                    (SELECT grant_id FROM reviews WHERE signed_at IS NOT NULL)) \
              OR (?7 = 'open' AND grant_id IN (SELECT grant_id FROM reviews \
                    WHERE signed_at IS NULL AND (?9 IS NULL OR due_at > ?9))) \
              OR (?7 = 'overdue' AND grant_id IN (SELECT grant_id FROM reviews \
                    WHERE signed_at IS NULL AND due_at <= ?8))) \
",
        [
            text(&f.person),
            text(&f.target),
            time(f.since),
            time(f.until),
            text(&f.protocol),
            text(&f.incident),
            review,
            due,
            match f.review {
                Some(ReviewFilter::Open) => V::Integer(ms(crate::clock::now())),
                _ => V::Null,
            },
        ],
    )
}

fn insert_grant(c: &Connection, g: &Grant) -> Result<(), StateError> {
    c.execute(
        &format!("INSERT INTO grants ({GRANT_COLS}) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,NULL,NULL,NULL,?9,?10)"),
        params![
            g.id,
            g.person,
            g.target,
            g.reason,
            g.incident_id,
            g.created_by,
            ms(g.created_at),
            ms(g.expires_at),
            g.request_id,
            g.review_required as i64
        ],
    )
    .map_err(db)?;
    Ok(())
}

const REQUEST_COLS: &str = "id, person, target, justification, incident_id, severity, scenario, duration_ms, \
                            created_at, expires_at, status, decided_at, decided_by, decision_reason, grant_id, emergency";

fn request_row(r: &Row<'_>) -> rusqlite::Result<Request> {
    let status: String = r.get(10)?;
    Ok(Request {
        id: r.get(0)?,
        person: r.get(1)?,
        target: r.get(2)?,
        justification: r.get(3)?,
        incident_id: r.get(4)?,
        severity: r.get(5)?,
        scenario: r.get(6)?,
        duration: std::time::Duration::from_millis(r.get::<_, i64>(7)?.max(0) as u64),
        created_at: from_ms(r.get(8)?),
        expires_at: from_ms(r.get(9)?),
        status: RequestStatus::parse(&status).unwrap_or(RequestStatus::Expired),
        decided_at: r.get::<_, Option<i64>>(11)?.map(from_ms),
        decided_by: r.get(12)?,
        decision_reason: r.get(13)?,
        grant_id: r.get(14)?,
        emergency: r.get::<_, i64>(15)? != 0,
        approvals: Vec::new(),
    })
}

fn load_approvals(c: &Connection, req: &mut Request) -> Result<(), StateError> {
    let mut stmt = c
        .prepare("SELECT approver, at FROM approvals WHERE request_id = ?1 ORDER BY at, approver")
        .map_err(db)?;
    req.approvals = stmt
        .query_map([&req.id], |r| {
            Ok((r.get::<_, String>(0)?, from_ms(r.get(1)?)))
        })
        .map_err(db)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(db)?;
    Ok(())
}

fn find_request_sync(c: &Connection, id: &str) -> Result<Request, StateError> {
    let mut stmt = c
        .prepare(&format!(
            "SELECT {REQUEST_COLS} FROM requests WHERE id LIKE ?1 ESCAPE '\\' LIMIT 2"
        ))
        .map_err(db)?;
    let rows: Vec<Request> = stmt
        .query_map([super::like_prefix(id)], request_row)
        .map_err(db)?
        .collect::<Result<_, _>>()
        .map_err(db)?;
    let mut it = rows.into_iter();
    match (it.next(), it.next()) {
        (None, _) => Err(StateError::NoSuchRequest(id.to_string())),
        (Some(mut r), None) => {
            load_approvals(c, &mut r)?;
            Ok(r)
        }
        (Some(_), Some(_)) => Err(StateError::Ambiguous(id.to_string())),
    }
}

/// Creates the grant for a request that has what it needs, inside the caller's transaction.
fn grant_request(
    c: &Connection,
    req: &Request,
    created_by: &str,
    at: DateTime<Utc>,
) -> Result<Grant, StateError> {
    let grant = super::grant_of_request(req, created_by, at);
    insert_grant(c, &grant)?;
    c.execute(
        "UPDATE requests SET status = 'approved', decided_at = ?2, decided_by = ?3, grant_id = ?4 WHERE id = ?1",
        params![req.id, ms(at), created_by, grant.id],
    )
    .map_err(db)?;
    Ok(grant)
}

const REVIEW_COLS: &str = "id, correlation_id, grant_id, person, target, scenario, emergency, approvers, \
                           opened_at, due_at, overdue_alerted, signed_by, signed_at, findings, root_cause, answers";

fn review_row(r: &Row<'_>) -> rusqlite::Result<Review> {
    let approvers: String = r.get(7)?;
    Ok(Review {
        id: r.get(0)?,
        correlation_id: r.get(1)?,
        grant_id: r.get(2)?,
        person: r.get(3)?,
        target: r.get(4)?,
        scenario: r.get(5)?,
        emergency: r.get::<_, i64>(6)? != 0,
        approvers: approvers
            .split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect(),
        opened_at: from_ms(r.get(8)?),
        due_at: from_ms(r.get(9)?),
        overdue_alerted: r.get::<_, i64>(10)? != 0,
        signed_by: r.get(11)?,
        signed_at: r.get::<_, Option<i64>>(12)?.map(from_ms),
        findings: r.get(13)?,
        root_cause: r.get(14)?,
        answers: r.get::<_, Option<String>>(15)?.and_then(|a| {
            match serde_json::from_str::<ReviewAnswers>(&a) {
                Ok(a) => Some(a),
                Err(e) => {
                    // Only someone writing the state store directly gets here.
                    tracing::error!(error = %e, "a review's stored answers do not parse");
                    None
                }
            }
        }),
    })
}

fn find_review_sync(c: &Connection, id: &str) -> Result<Review, StateError> {
    let mut stmt = c
        .prepare(&format!(
            "SELECT {REVIEW_COLS} FROM reviews WHERE grant_id = ?2 \
             OR correlation_id LIKE ?1 ESCAPE '\\' OR id LIKE ?1 ESCAPE '\\' LIMIT 2"
        ))
        .map_err(db)?;
    let rows: Vec<Review> = stmt
        .query_map(params![super::like_prefix(id), id], review_row)
        .map_err(db)?
        .collect::<Result<_, _>>()
        .map_err(db)?;
    let mut it = rows.into_iter();
    match (it.next(), it.next()) {
        (None, _) => Err(StateError::NoSuchReview(id.to_string())),
        (Some(r), None) => Ok(r),
        (Some(_), Some(_)) => Err(StateError::Ambiguous(id.to_string())),
    }
}

fn find_grant_sync(conn: &Connection, id: &str) -> Result<Grant, StateError> {
    let mut stmt = conn
        .prepare(&format!(
            "SELECT {GRANT_COLS} FROM grants WHERE id LIKE ?1 ESCAPE '\\' LIMIT 2"
        ))
        .map_err(db)?;
    let rows: Vec<Grant> = stmt
        .query_map([super::like_prefix(id)], grant_row)
        .map_err(db)?
        .collect::<Result<_, _>>()
        .map_err(db)?;
    match rows.len() {
        0 => Err(StateError::NoSuchGrant(id.to_string())),
        1 => Ok(rows
            .into_iter()
            .next()
            .ok_or_else(|| StateError::NoSuchGrant(id.to_string()))?),
        _ => Err(StateError::Ambiguous(id.to_string())),
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn create_grant(&self, g: NewGrant) -> Result<Grant, StateError> {
        let grant = super::grant_row_of(g);
        let row = grant.clone();
        self.with(move |c| insert_grant(c, &row)).await?;
        Ok(grant)
    }

    async fn list_grants(
        &self,
        active_at: Option<DateTime<Utc>>,
    ) -> Result<Vec<Grant>, StateError> {
        self.with(move |c| {
            let (sql, at) = match active_at {
                Some(t) => (
                    format!(
                        "SELECT {GRANT_COLS} FROM grants WHERE revoked_at IS NULL AND expires_at > ?1 \
                         ORDER BY created_at DESC"
                    ),
                    ms(t),
                ),
                None => (
                    format!("SELECT {GRANT_COLS} FROM grants WHERE ?1 = ?1 ORDER BY created_at DESC"),
                    0,
                ),
            };
            let mut stmt = c.prepare(&sql).map_err(db)?;
            let rows = stmt
                .query_map([at], grant_row)
                .map_err(db)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(db)?;
            Ok(rows)
        })
        .await
    }

    async fn find_grant(&self, id_or_prefix: &str) -> Result<Grant, StateError> {
        let id = id_or_prefix.to_string();
        self.with(move |c| find_grant_sync(c, &id)).await
    }

    async fn revoke_grant(
        &self,
        id_or_prefix: &str,
        by: &str,
        reason: &str,
        at: DateTime<Utc>,
    ) -> Result<Grant, StateError> {
        let (id, by, reason) = (id_or_prefix.to_string(), by.to_string(), reason.to_string());
        self.with(move |c| {
            let g = find_grant_sync(c, &id)?;
            if g.revoked_at.is_some() {
                return Err(StateError::AlreadyRevoked(g.id));
            }
            c.execute(
                "UPDATE grants SET revoked_at = ?2, revoked_by = ?3, revoke_reason = ?4 \
                 WHERE id = ?1 AND revoked_at IS NULL",
                params![g.id, ms(at), by, reason],
            )
            .map_err(db)?;
            find_grant_sync(c, &g.id)
        })
        .await
    }

    async fn grant_for(
        &self,
        person: &str,
        target: &str,
        at: DateTime<Utc>,
    ) -> Result<Option<Grant>, StateError> {
        let (person, target) = (person.to_string(), target.to_string());
        self.with(move |c| {
            // Active grants first (latest expiry wins), then the most recent inactive one.
            c.query_row(
                &format!(
                    "SELECT {GRANT_COLS} FROM grants WHERE person = ?1 AND target = ?2 \
                     ORDER BY (revoked_at IS NULL AND expires_at > ?3) DESC, \
                              CASE WHEN revoked_at IS NULL AND expires_at > ?3 THEN expires_at ELSE created_at END DESC \
                     LIMIT 1"
                ),
                params![person, target, ms(at)],
                grant_row,
            )
            .optional()
            .map_err(db)
        })
        .await
    }

    async fn revocations(
        &self,
        grant_ids: &[String],
    ) -> Result<Vec<(String, DateTime<Utc>)>, StateError> {
        if grant_ids.is_empty() {
            return Ok(Vec::new());
        }
        let ids = grant_ids.to_vec();
        self.with(move |c| {
            let marks = vec!["?"; ids.len()].join(",");
            let mut stmt = c
                .prepare(&format!(
                    "SELECT id, revoked_at FROM grants WHERE revoked_at IS NOT NULL AND id IN ({marks})"
                ))
                .map_err(db)?;
            let rows = stmt
                .query_map(rusqlite::params_from_iter(ids.iter()), |r| {
                    Ok((r.get::<_, String>(0)?, from_ms(r.get(1)?)))
                })
                .map_err(db)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(db)?;
            Ok(rows)
        })
        .await
    }

    async fn insert_session(&self, s: &SessionRow) -> Result<(), StateError> {
        let s = s.clone();
        self.with(move |c| {
            c.execute(
                &format!(
                    "INSERT INTO sessions ({SESSION_COLS}) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13,?14)"
                ),
                params![
                    s.id,
                    s.protocol,
                    s.person,
                    s.target,
                    s.grant_id,
                    s.client_addr,
                    ms(s.started_at),
                    ms(s.deadline),
                    s.ended_at.map(ms),
                    s.end_reason,
                    s.bytes_in as i64,
                    s.bytes_out as i64,
                    s.recording_prefix,
                    s.node_id
                ],
            )
            .map_err(db)?;
            Ok(())
        })
        .await
    }

    async fn finish_session(&self, id: &str, end: &SessionEnd) -> Result<(), StateError> {
        let (id, end) = (id.to_string(), end.clone());
        self.with(move |c| {
            c.execute(
                "UPDATE sessions SET ended_at = ?2, end_reason = ?3, bytes_in = ?4, bytes_out = ?5 \
                 WHERE id = ?1",
                params![
                    id,
                    ms(end.ended_at),
                    end.end_reason,
                    end.bytes_in as i64,
                    end.bytes_out as i64
                ],
            )
            .map_err(db)?;
            Ok(())
        })
        .await
    }

    async fn list_sessions(&self, f: &SessionFilter) -> Result<Vec<SessionRow>, StateError> {
        let f = f.clone();
        self.with(move |c| {
            let (where_sql, p) = session_where(&f);
            let mut stmt = c
                .prepare(&format!(
                    "SELECT {SESSION_COLS} FROM sessions WHERE {where_sql} \
                     ORDER BY started_at DESC LIMIT ?10 OFFSET ?11"
                ))
                .map_err(db)?;
            let rows = stmt
                .query_map(
                    params![
                        p[0],
                        p[1],
                        p[2],
                        p[3],
                        p[4],
                        p[5],
                        p[6],
                        p[7],
                        p[8],
                        f.limit.map(i64::from).unwrap_or(-1),
                        f.offset.map(i64::from).unwrap_or(0)
                    ],
                    session_row,
                )
                .map_err(db)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(db)?;
            Ok(rows)
        })
        .await
    }

    async fn find_session(&self, id_or_prefix: &str) -> Result<Option<SessionRow>, StateError> {
        let id = id_or_prefix.to_string();
        self.with(move |c| {
            let mut stmt = c
                .prepare(&format!(
                    "SELECT {SESSION_COLS} FROM sessions WHERE id LIKE ?1 ESCAPE '\\' LIMIT 2"
                ))
                .map_err(db)?;
            let rows: Vec<SessionRow> = stmt
                .query_map([super::like_prefix(&id)], session_row)
                .map_err(db)?
                .collect::<Result<_, _>>()
                .map_err(db)?;
            match rows.len() {
                0 => Ok(None),
                1 => Ok(rows.into_iter().next()),
                _ => Err(StateError::Ambiguous(id)),
            }
        })
        .await
    }

    async fn find_session_of(
        &self,
        id_or_prefix: &str,
        person: &str,
    ) -> Result<Option<SessionRow>, StateError> {
        let (id, person) = (id_or_prefix.to_string(), person.to_string());
        self.with(move |c| {
            let mut stmt = c
                .prepare(&format!(
                    "SELECT {SESSION_COLS} FROM sessions WHERE id LIKE ?1 ESCAPE '\\' AND person = ?2 LIMIT 2"
                ))
                .map_err(db)?;
            let rows: Vec<SessionRow> = stmt
                .query_map(params![super::like_prefix(&id), person], session_row)
                .map_err(db)?
                .collect::<Result<_, _>>()
                .map_err(db)?;
            match rows.len() {
                0 => Ok(None),
                1 => Ok(rows.into_iter().next()),
                _ => Err(StateError::Ambiguous(id)),
            }
        })
        .await
    }

    async fn unfinished_sessions(&self) -> Result<Vec<SessionRow>, StateError> {
        self.with(|c| {
            let mut stmt = c
                .prepare(&format!(
                    "SELECT {SESSION_COLS} FROM sessions WHERE ended_at IS NULL"
                ))
                .map_err(db)?;
            let rows = stmt
                .query_map([], session_row)
                .map_err(db)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(db)?;
            Ok(rows)
        })
        .await
    }

    async fn record_objects(
        &self,
        session_id: &str,
        entries: &[LedgerEntry],
    ) -> Result<(), StateError> {
        let (id, entries) = (session_id.to_string(), entries.to_vec());
        self.with(move |c| {
            let tx = c.unchecked_transaction().map_err(db)?;
            for e in &entries {
                let (pos, chain) = match &e.chained {
                    Some((p, l)) => (Some(*p as i64), Some(l.clone())),
                    None => (None, None),
                };
                // A chained entry is final. A spooled one is replaced while it waits (a
                // retried flush spools the same key with more data) and when it is stored.
                tx.execute(
                    "INSERT INTO recording_objects (session_id, key, size, sha256, pos, chain) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6) \
                     ON CONFLICT (session_id, key) DO UPDATE SET size = excluded.size, \
                        sha256 = excluded.sha256, pos = excluded.pos, chain = excluded.chain \
                     WHERE recording_objects.chain IS NULL",
                    params![id, e.key, e.size as i64, e.sha256, pos, chain],
                )
                .map_err(db)?;
            }
            tx.commit().map_err(db)
        })
        .await
    }

    async fn recorded_objects(&self, session_id: &str) -> Result<Vec<LedgerEntry>, StateError> {
        let id = session_id.to_string();
        self.with(move |c| {
            let mut stmt = c
                .prepare(
                    "SELECT key, size, sha256, pos, chain FROM recording_objects \
                     WHERE session_id = ?1 ORDER BY pos IS NULL, pos, rowid",
                )
                .map_err(db)?;
            let rows = stmt
                .query_map(params![id], |r| {
                    let pos: Option<i64> = r.get(3)?;
                    let chain: Option<String> = r.get(4)?;
                    Ok(LedgerEntry {
                        key: r.get(0)?,
                        size: r.get::<_, i64>(1)?.max(0) as u64,
                        sha256: r.get(2)?,
                        chained: pos.zip(chain).map(|(p, l)| (p.max(0) as u64, l)),
                    })
                })
                .map_err(db)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(db)?;
            Ok(rows)
        })
        .await
    }

    async fn set_sealed(&self, session_id: &str, sealed: bool) -> Result<(), StateError> {
        let id = session_id.to_string();
        self.with(move |c| {
            c.execute(
                "UPDATE sessions SET sealed = ?2 WHERE id = ?1",
                params![id, i64::from(sealed)],
            )
            .map_err(db)?;
            Ok(())
        })
        .await
    }

    async fn unsealed_sessions(&self) -> Result<Vec<SessionRow>, StateError> {
        self.with(|c| {
            let mut stmt = c
                .prepare(&format!(
                    "SELECT {SESSION_COLS} FROM sessions WHERE ended_at IS NOT NULL AND sealed = 0"
                ))
                .map_err(db)?;
            let rows = stmt
                .query_map([], session_row)
                .map_err(db)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(db)?;
            Ok(rows)
        })
        .await
    }

    async fn heartbeat(&self, n: &NodeRow) -> Result<(), StateError> {
        let n = n.clone();
        self.with(move |c| {
            c.execute(
                &format!(
                    "INSERT INTO nodes ({NODE_COLS}) VALUES (?1,?2,?3,?4,?5,?6,?7) \
                     ON CONFLICT (node_id) DO UPDATE SET started_at = excluded.started_at, \
                       renewed_at = excluded.renewed_at, expires_at = excluded.expires_at, \
                       draining = excluded.draining, live_sessions = excluded.live_sessions, \
                       version = excluded.version"
                ),
                params![
                    n.node_id,
                    ms(n.started_at),
                    ms(n.renewed_at),
                    ms(n.expires_at),
                    i64::from(n.draining),
                    n.live_sessions as i64,
                    n.version
                ],
            )
            .map_err(db)?;
            Ok(())
        })
        .await
    }

    async fn now(&self) -> Result<DateTime<Utc>, StateError> {
        Ok(crate::clock::now())
    }

    async fn nodes(&self) -> Result<Vec<NodeRow>, StateError> {
        self.with(|c| {
            let mut stmt = c
                .prepare(&format!("SELECT {NODE_COLS} FROM nodes ORDER BY node_id"))
                .map_err(db)?;
            let rows = stmt
                .query_map([], node_row)
                .map_err(db)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(db)?;
            Ok(rows)
        })
        .await
    }

    async fn leave(&self, node_id: &str) -> Result<(), StateError> {
        let id = node_id.to_string();
        self.with(move |c| {
            c.execute("DELETE FROM nodes WHERE node_id = ?1", params![id])
                .map_err(db)?;
            Ok(())
        })
        .await
    }

    async fn adopt_sessions(&self, from: &str, to: &str) -> Result<Vec<SessionRow>, StateError> {
        let (from, to) = (from.to_string(), to.to_string());
        self.with(move |c| {
            let mut stmt = c
                .prepare(&format!(
                    "UPDATE sessions SET node_id = ?2 WHERE node_id = ?1 AND sealed = 0 \
                     RETURNING {SESSION_COLS}"
                ))
                .map_err(db)?;
            let rows = stmt
                .query_map(params![from, to], session_row)
                .map_err(db)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(db)?;
            Ok(rows)
        })
        .await
    }

    async fn create_request(&self, r: NewRequest) -> Result<Request, StateError> {
        let req = super::request_row_of(r);
        let row = req.clone();
        self.with(move |c| {
            c.execute(
                &format!(
                    "INSERT INTO requests ({REQUEST_COLS}) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,'pending',NULL,NULL,NULL,NULL,?11)"
                ),
                params![
                    row.id,
                    row.person,
                    row.target,
                    row.justification,
                    row.incident_id,
                    row.severity,
                    row.scenario,
                    row.duration.as_millis().min(i64::MAX as u128) as i64,
                    ms(row.created_at),
                    ms(row.expires_at),
                    row.emergency as i64
                ],
            )
            .map_err(db)?;
            Ok(())
        })
        .await?;
        Ok(req)
    }

    async fn find_request(&self, id_or_prefix: &str) -> Result<Request, StateError> {
        let id = id_or_prefix.to_string();
        self.with(move |c| find_request_sync(c, &id)).await
    }

    async fn list_requests(
        &self,
        status: Option<RequestStatus>,
    ) -> Result<Vec<Request>, StateError> {
        self.with(move |c| {
            let mut stmt = c
                .prepare(&format!(
                    "SELECT {REQUEST_COLS} FROM requests WHERE (?1 IS NULL OR status = ?1) ORDER BY created_at DESC"
                ))
                .map_err(db)?;
            let mut rows = stmt
                .query_map([status.map(|s| s.as_str())], request_row)
                .map_err(db)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(db)?;
            for r in rows.iter_mut() {
                load_approvals(c, r)?;
            }
            Ok(rows)
        })
        .await
    }

    async fn approve(
        &self,
        id: &str,
        approver: &str,
        need: usize,
        at: DateTime<Utc>,
    ) -> Result<Approval, StateError> {
        let (id, approver) = (id.to_string(), approver.to_string());
        self.with(move |c| {
            let tx = c.unchecked_transaction().map_err(db)?;
            let req = find_request_sync(&tx, &id)?;
            super::check_pending(&req, at)?;
            if req.approvals.iter().any(|(a, _)| *a == approver) {
                return Err(StateError::AlreadyApproved {
                    id: req.id,
                    approver,
                });
            }
            tx.execute(
                "INSERT INTO approvals (request_id, approver, at) VALUES (?1, ?2, ?3)",
                params![req.id, approver, ms(at)],
            )
            .map_err(db)?;
            let have = req.approvals.len() + 1;
            let out = if have >= need.max(1) {
                let by: Vec<String> = req
                    .approvals
                    .iter()
                    .map(|(a, _)| a.clone())
                    .chain(std::iter::once(approver.clone()))
                    .collect();
                let grant = grant_request(&tx, &req, &format!("approved:{}", by.join(",")), at)?;
                Approval::Granted {
                    request: find_request_sync(&tx, &req.id)?,
                    grant: Box::new(grant),
                }
            } else {
                Approval::Recorded {
                    request: find_request_sync(&tx, &req.id)?,
                    have,
                    need,
                }
            };
            tx.commit().map_err(db)?;
            Ok(out)
        })
        .await
    }

    async fn self_grant(&self, id: &str, at: DateTime<Utc>) -> Result<Approval, StateError> {
        let id = id.to_string();
        self.with(move |c| {
            let tx = c.unchecked_transaction().map_err(db)?;
            let req = find_request_sync(&tx, &id)?;
            super::check_pending(&req, at)?;
            let grant = grant_request(
                &tx,
                &req,
                &format!("emergency-self-service:{}", req.person),
                at,
            )?;
            let request = find_request_sync(&tx, &req.id)?;
            tx.commit().map_err(db)?;
            Ok(Approval::Granted {
                request,
                grant: Box::new(grant),
            })
        })
        .await
    }

    async fn deny(
        &self,
        id: &str,
        by: &str,
        reason: &str,
        at: DateTime<Utc>,
    ) -> Result<Request, StateError> {
        let (id, by, reason) = (id.to_string(), by.to_string(), reason.to_string());
        self.with(move |c| {
            let tx = c.unchecked_transaction().map_err(db)?;
            let req = find_request_sync(&tx, &id)?;
            super::check_pending(&req, at)?;
            tx.execute(
                "UPDATE requests SET status = 'denied', decided_at = ?2, decided_by = ?3, decision_reason = ?4 WHERE id = ?1",
                params![req.id, ms(at), by, reason],
            )
            .map_err(db)?;
            let out = find_request_sync(&tx, &req.id)?;
            tx.commit().map_err(db)?;
            Ok(out)
        })
        .await
    }

    async fn expire_requests(&self, at: DateTime<Utc>) -> Result<Vec<Request>, StateError> {
        self.with(move |c| {
            let tx = c.unchecked_transaction().map_err(db)?;
            let ids: Vec<String> = {
                let mut stmt = tx
                    .prepare("SELECT id FROM requests WHERE status = 'pending' AND expires_at <= ?1")
                    .map_err(db)?;
                let rows = stmt
                    .query_map([ms(at)], |r| r.get::<_, String>(0))
                    .map_err(db)?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(db)?;
                rows
            };
            let mut out = Vec::new();
            for id in ids {
                tx.execute(
                    "UPDATE requests SET status = 'expired', decided_at = ?2, decided_by = 'breakglass', \
                     decision_reason = 'not approved in time' WHERE id = ?1 AND status = 'pending'",
                    params![id, ms(at)],
                )
                .map_err(db)?;
                out.push(find_request_sync(&tx, &id)?);
            }
            tx.commit().map_err(db)?;
            Ok(out)
        })
        .await
    }

    async fn append_event(&self, e: &StoredEvent) -> Result<(), StateError> {
        let e = e.clone();
        self.with(move |c| {
            c.execute(
                "INSERT INTO events (id, correlation_id, event_type, event_data, actor, created_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![e.id, e.correlation_id, e.event_type, e.event_data.to_string(), e.actor, ms(e.created_at)],
            )
            .map_err(db)?;
            Ok(())
        })
        .await
    }

    async fn events(&self, correlation_id: &str) -> Result<Vec<StoredEvent>, StateError> {
        let id = correlation_id.to_string();
        self.with(move |c| {
            let mut stmt = c
                .prepare(
                    "SELECT id, correlation_id, event_type, event_data, actor, created_at FROM events \
                     WHERE correlation_id = ?1 ORDER BY seq",
                )
                .map_err(db)?;
            let rows = stmt
                .query_map([id], |r| {
                    let data: String = r.get(3)?;
                    Ok(StoredEvent {
                        id: r.get(0)?,
                        correlation_id: r.get(1)?,
                        event_type: r.get(2)?,
                        event_data: serde_json::from_str(&data).unwrap_or(serde_json::Value::String(data)),
                        actor: r.get(4)?,
                        created_at: from_ms(r.get(5)?),
                    })
                })
                .map_err(db)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(db)?;
            Ok(rows)
        })
        .await
    }

    async fn open_review(&self, r: &Review) -> Result<(Review, bool), StateError> {
        let r = r.clone();
        self.with(move |c| {
            let n = c
                .execute(
                    &format!(
                        "INSERT OR IGNORE INTO reviews ({REVIEW_COLS}) \
                         VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,0,NULL,NULL,NULL,NULL,NULL)"
                    ),
                    params![
                        r.id,
                        r.correlation_id,
                        r.grant_id,
                        r.person,
                        r.target,
                        r.scenario,
                        r.emergency as i64,
                        r.approvers.join(","),
                        ms(r.opened_at),
                        ms(r.due_at)
                    ],
                )
                .map_err(db)?;
            Ok((find_review_sync(c, &r.grant_id)?, n == 1))
        })
        .await
    }

    async fn find_review(&self, id: &str) -> Result<Review, StateError> {
        let id = id.to_string();
        self.with(move |c| find_review_sync(c, &id)).await
    }

    async fn open_reviews(&self) -> Result<Vec<Review>, StateError> {
        self.with(|c| {
            let mut stmt = c
                .prepare(&format!(
                    "SELECT {REVIEW_COLS} FROM reviews WHERE signed_at IS NULL ORDER BY due_at"
                ))
                .map_err(db)?;
            let rows = stmt
                .query_map([], review_row)
                .map_err(db)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(db)?;
            Ok(rows)
        })
        .await
    }

    async fn sign_review(
        &self,
        id: &str,
        by: &str,
        findings: &str,
        root_cause: &str,
        answers: &ReviewAnswers,
        at: DateTime<Utc>,
    ) -> Result<Review, StateError> {
        let (id, by, findings, root_cause) = (
            id.to_string(),
            by.to_string(),
            findings.to_string(),
            root_cause.to_string(),
        );
        let answers = serde_json::to_string(answers).map_err(db)?;
        self.with(move |c| {
            let tx = c.unchecked_transaction().map_err(db)?;
            let r = find_review_sync(&tx, &id)?;
            if r.signed_at.is_some() {
                return Err(StateError::AlreadySigned(r.id));
            }
            tx.execute(
                "UPDATE reviews SET signed_by = ?2, signed_at = ?3, findings = ?4, root_cause = ?5, \
                 answers = ?6 WHERE id = ?1",
                params![r.id, by, ms(at), findings, root_cause, answers],
            )
            .map_err(db)?;
            let out = find_review_sync(&tx, &r.id)?;
            tx.commit().map_err(db)?;
            Ok(out)
        })
        .await
    }

    async fn take_overdue_reviews(&self, at: DateTime<Utc>) -> Result<Vec<Review>, StateError> {
        self.with(move |c| {
            let tx = c.unchecked_transaction().map_err(db)?;
            let rows: Vec<Review> = {
                let mut stmt = tx
                    .prepare(&format!(
                        "SELECT {REVIEW_COLS} FROM reviews WHERE signed_at IS NULL AND overdue_alerted = 0 AND due_at <= ?1"
                    ))
                    .map_err(db)?;
                let rows = stmt
                    .query_map([ms(at)], review_row)
                    .map_err(db)?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(db)?;
                rows
            };
            for r in &rows {
                tx.execute("UPDATE reviews SET overdue_alerted = 1 WHERE id = ?1", [&r.id])
                    .map_err(db)?;
            }
            tx.commit().map_err(db)?;
            Ok(rows)
        })
        .await
    }

    async fn put_credential(
        &self,
        grant: &Grant,
        verifier: &str,
        at: DateTime<Utc>,
    ) -> Result<(), StateError> {
        let (g, v) = (grant.clone(), verifier.to_string());
        self.with(move |c| {
            c.execute(
                "INSERT INTO credentials (grant_id, person, verifier, created_at, expires_at) VALUES (?1,?2,?3,?4,?5) \
                 ON CONFLICT(grant_id) DO UPDATE SET verifier = excluded.verifier, created_at = excluded.created_at",
                params![g.id, g.person, v, ms(at), ms(g.expires_at)],
            )
            .map_err(db)?;
            Ok(())
        })
        .await
    }

    async fn credential(
        &self,
        grant_id: &str,
    ) -> Result<Option<(String, DateTime<Utc>)>, StateError> {
        let id = grant_id.to_string();
        self.with(move |c| {
            c.query_row(
                "SELECT verifier, expires_at FROM credentials WHERE grant_id = ?1",
                [id],
                |r| Ok((r.get::<_, String>(0)?, from_ms(r.get(1)?))),
            )
            .optional()
            .map_err(db)
        })
        .await
    }

    async fn touch_key(
        &self,
        fingerprint: &str,
        person: &str,
        at: DateTime<Utc>,
    ) -> Result<(), StateError> {
        let (f, p) = (fingerprint.to_string(), person.to_string());
        self.with(move |c| {
            c.execute(
                "INSERT INTO key_usage (fingerprint, person, last_used) VALUES (?1,?2,?3) \
                 ON CONFLICT(fingerprint) DO UPDATE SET person = excluded.person, last_used = excluded.last_used",
                params![f, p, ms(at)],
            )
            .map_err(db)?;
            Ok(())
        })
        .await
    }

    async fn key_usage(&self) -> Result<Vec<(String, String, DateTime<Utc>)>, StateError> {
        self.with(|c| {
            let mut stmt = c
                .prepare("SELECT fingerprint, person, last_used FROM key_usage ORDER BY person")
                .map_err(db)?;
            let rows = stmt
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, from_ms(r.get(2)?))))
                .map_err(db)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(db)?;
            Ok(rows)
        })
        .await
    }

    async fn put_api_token(
        &self,
        hash: &str,
        person: &str,
        at: DateTime<Utc>,
        expires_at: DateTime<Utc>,
    ) -> Result<(), StateError> {
        let (h, p) = (hash.to_string(), person.to_string());
        self.with(move |c| {
            c.execute(
                "INSERT INTO api_tokens (hash, person, created_at, expires_at) VALUES (?1,?2,?3,?4)",
                params![h, p, ms(at), ms(expires_at)],
            )
            .map_err(db)?;
            Ok(())
        })
        .await
    }

    async fn end_api_token(&self, hash: &str, at: DateTime<Utc>) -> Result<(), StateError> {
        let h = hash.to_string();
        self.with(move |c| {
            c.execute(
                "UPDATE api_tokens SET expires_at = ?2 WHERE hash = ?1 AND expires_at > ?2",
                params![h, ms(at)],
            )
            .map_err(db)?;
            Ok(())
        })
        .await
    }

    async fn api_token_person(
        &self,
        hash: &str,
        at: DateTime<Utc>,
    ) -> Result<Option<String>, StateError> {
        let h = hash.to_string();
        self.with(move |c| {
            c.query_row(
                "SELECT person FROM api_tokens WHERE hash = ?1 AND expires_at > ?2",
                params![h, ms(at)],
                |r| r.get::<_, String>(0),
            )
            .optional()
            .map_err(db)
        })
        .await
    }

    async fn put_login_link(
        &self,
        hash: &str,
        person: &str,
        at: DateTime<Utc>,
        expires_at: DateTime<Utc>,
    ) -> Result<(), StateError> {
        let (h, p) = (hash.to_string(), person.to_string());
        self.with(move |c| {
            c.execute(
                "INSERT INTO login_links (hash, person, created_at, expires_at) VALUES (?1,?2,?3,?4)",
                params![h, p, ms(at), ms(expires_at)],
            )
            .map_err(db)?;
            Ok(())
        })
        .await
    }

    async fn use_login_link(&self, hash: &str, at: DateTime<Utc>) -> Result<LinkUse, StateError> {
        let h = hash.to_string();
        self.with(move |c| {
            let tx = c.unchecked_transaction().map_err(db)?;
            let row = tx
                .query_row(
                    "SELECT person, expires_at, used_at FROM login_links WHERE hash = ?1",
                    [&h],
                    |r| {
                        Ok((
                            r.get::<_, String>(0)?,
                            r.get::<_, i64>(1)?,
                            r.get::<_, Option<i64>>(2)?,
                        ))
                    },
                )
                .optional()
                .map_err(db)?;
            let outcome = match row {
                None => LinkUse::Unknown,
                Some((_, _, Some(_))) => LinkUse::AlreadyUsed,
                Some((_, exp, None)) if exp <= ms(at) => LinkUse::Expired,
                Some((person, _, None)) => {
                    let n = tx
                        .execute(
                            "UPDATE login_links SET used_at = ?2 WHERE hash = ?1 AND used_at IS NULL",
                            params![h, ms(at)],
                        )
                        .map_err(db)?;
                    if n == 1 {
                        LinkUse::Person(person)
                    } else {
                        LinkUse::AlreadyUsed
                    }
                }
            };
            tx.commit().map_err(db)?;
            Ok(outcome)
        })
        .await
    }

    async fn index_session_text(
        &self,
        session_id: &str,
        entries: Vec<SearchEntry>,
        at: DateTime<Utc>,
    ) -> Result<bool, StateError> {
        let id = session_id.to_string();
        self.with(move |c| {
            let tx = c.unchecked_transaction().map_err(db)?;
            let fresh = tx
                .execute(
                    "INSERT OR IGNORE INTO search_indexed (session_id, indexed_at) VALUES (?1, ?2)",
                    params![id, ms(at)],
                )
                .map_err(db)?;
            if fresh == 1 {
                let mut stmt = tx
                    .prepare(
                        "INSERT INTO search_text (session_id, channel, t, kind, text) \
                         VALUES (?1,?2,?3,?4,?5)",
                    )
                    .map_err(db)?;
                for e in &entries {
                    stmt.execute(params![id, e.channel, e.time, e.kind, e.text])
                        .map_err(db)?;
                }
            }
            tx.commit().map_err(db)?;
            Ok(fresh == 1)
        })
        .await
    }

    async fn unindexed_sessions(&self, limit: u32) -> Result<Vec<SessionRow>, StateError> {
        self.with(move |c| {
            let mut stmt = c
                .prepare(&format!(
                    "SELECT {SESSION_COLS} FROM sessions WHERE ended_at IS NOT NULL \
                     AND id NOT IN (SELECT session_id FROM search_indexed) \
                     ORDER BY started_at LIMIT ?1"
                ))
                .map_err(db)?;
            let rows = stmt
                .query_map([i64::from(limit)], session_row)
                .map_err(db)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(db)?;
            Ok(rows)
        })
        .await
    }

    async fn search_text(
        &self,
        needle: &str,
        f: &SessionFilter,
    ) -> Result<Vec<SearchHit>, StateError> {
        let pattern = format!("%{}", super::like_prefix(needle));
        let f = f.clone();
        self.with(move |c| {
            let (where_sql, p) = session_where(&f);
            let cols = SESSION_COLS
                .split(", ")
                .map(|c| format!("s.{}", c.trim()))
                .collect::<Vec<_>>()
                .join(", ");
            let mut stmt = c
                .prepare(&format!(
                    "SELECT {cols}, x.channel, x.t, x.kind, x.text \
                     FROM search_text x JOIN (SELECT * FROM sessions WHERE {where_sql}) s \
                       ON s.id = x.session_id \
                     WHERE x.text LIKE ?10 ESCAPE '\\' \
                     ORDER BY s.started_at DESC, x.channel, x.t LIMIT ?11"
                ))
                .map_err(db)?;
            let rows = stmt
                .query_map(
                    params![
                        p[0],
                        p[1],
                        p[2],
                        p[3],
                        p[4],
                        p[5],
                        p[6],
                        p[7],
                        p[8],
                        pattern,
                        f.limit.map(i64::from).unwrap_or(200)
                    ],
                    |r| {
                        Ok(SearchHit {
                            session: session_row(r)?,
                            entry: SearchEntry {
                                channel: r.get(SESSION_N)?,
                                time: r.get(SESSION_N + 1)?,
                                kind: r.get(SESSION_N + 2)?,
                                text: r.get(SESSION_N + 3)?,
                            },
                        })
                    },
                )
                .map_err(db)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(db)?;
            Ok(rows)
        })
        .await
    }

    async fn vault_put(
        &self,
        name: &str,
        slot: &str,
        blob: &str,
        at: DateTime<Utc>,
    ) -> Result<(), StateError> {
        let (n, s, b) = (name.to_string(), slot.to_string(), blob.to_string());
        self.with(move |c| {
            c.execute(
                "INSERT INTO vault (name, slot, blob, updated_at) VALUES (?1,?2,?3,?4) \
                 ON CONFLICT(name, slot) DO UPDATE SET blob = excluded.blob, updated_at = excluded.updated_at",
                params![n, s, b, ms(at)],
            )
            .map_err(db)?;
            Ok(())
        })
        .await
    }

    async fn vault_put_new(
        &self,
        name: &str,
        slot: &str,
        blob: &str,
        at: DateTime<Utc>,
    ) -> Result<bool, StateError> {
        let (n, s, b) = (name.to_string(), slot.to_string(), blob.to_string());
        self.with(move |c| {
            let changed = c
                .execute(
                    "INSERT INTO vault (name, slot, blob, updated_at) VALUES (?1,?2,?3,?4) \
                     ON CONFLICT(name, slot) DO NOTHING",
                    params![n, s, b, ms(at)],
                )
                .map_err(db)?;
            Ok(changed == 1)
        })
        .await
    }

    async fn vault_get(&self, name: &str, slot: &str) -> Result<Option<String>, StateError> {
        let (n, s) = (name.to_string(), slot.to_string());
        self.with(move |c| {
            c.query_row(
                "SELECT blob FROM vault WHERE name = ?1 AND slot = ?2",
                params![n, s],
                |r| r.get::<_, String>(0),
            )
            .optional()
            .map_err(db)
        })
        .await
    }

    async fn vault_promote(&self, name: &str, at: DateTime<Utc>) -> Result<(), StateError> {
        let n = name.to_string();
        self.with(move |c| {
            let tx = c.unchecked_transaction().map_err(db)?;
            let blob: Option<String> = tx
                .query_row("SELECT blob FROM vault WHERE name = ?1 AND slot = 'pending'", [&n], |r| r.get(0))
                .optional()
                .map_err(db)?;
            if let Some(b) = blob {
                tx.execute(
                    "INSERT INTO vault (name, slot, blob, updated_at) VALUES (?1,'current',?2,?3) \
                     ON CONFLICT(name, slot) DO UPDATE SET blob = excluded.blob, updated_at = excluded.updated_at",
                    params![n, b, ms(at)],
                )
                .map_err(db)?;
                tx.execute("DELETE FROM vault WHERE name = ?1 AND slot = 'pending'", [&n])
                    .map_err(db)?;
            }
            tx.commit().map_err(db)?;
            Ok(())
        })
        .await
    }

    async fn grants_to_rotate(&self, at: DateTime<Utc>) -> Result<Vec<Grant>, StateError> {
        self.with(move |c| {
            let mut stmt = c
                .prepare(&format!(
                    "SELECT {GRANT_COLS} FROM grants WHERE (expires_at <= ?1 OR revoked_at IS NOT NULL) \
                     AND id NOT IN (SELECT grant_id FROM rotations) ORDER BY created_at"
                ))
                .map_err(db)?;
            let rows = stmt
                .query_map([ms(at)], grant_row)
                .map_err(db)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(db)?;
            Ok(rows)
        })
        .await
    }

    async fn rotation_done(
        &self,
        grant_id: &str,
        target: &str,
        outcome: &str,
        at: DateTime<Utc>,
    ) -> Result<(), StateError> {
        let (g, t, o) = (
            grant_id.to_string(),
            target.to_string(),
            outcome.to_string(),
        );
        self.with(move |c| {
            c.execute(
                "INSERT OR REPLACE INTO rotations (grant_id, target, outcome, done_at) VALUES (?1,?2,?3,?4)",
                params![g, t, o, ms(at)],
            )
            .map_err(db)?;
            Ok(())
        })
        .await
    }

    async fn rotation_of(
        &self,
        grant_id: &str,
    ) -> Result<Option<(String, DateTime<Utc>)>, StateError> {
        let g = grant_id.to_string();
        self.with(move |c| {
            c.query_row(
                "SELECT outcome, done_at FROM rotations WHERE grant_id = ?1",
                [g],
                |r| Ok((r.get::<_, String>(0)?, from_ms(r.get(1)?))),
            )
            .optional()
            .map_err(db)
        })
        .await
    }

    async fn add_incident_report(&self, r: &IncidentReportRow) -> Result<(), StateError> {
        let r = r.clone();
        self.with(move |c| {
            c.execute(
                "INSERT INTO incident_reports (id, incident_id, created_by, created_at, sha256) \
                 VALUES (?1,?2,?3,?4,?5)",
                params![
                    r.id,
                    r.incident_id,
                    r.created_by,
                    ms(r.created_at),
                    r.sha256
                ],
            )
            .map_err(db)?;
            Ok(())
        })
        .await
    }

    async fn incident_reports(&self, incident: &str) -> Result<Vec<IncidentReportRow>, StateError> {
        let i = incident.to_string();
        self.with(move |c| {
            let mut stmt = c
                .prepare(
                    "SELECT id, incident_id, created_by, created_at, sha256 FROM incident_reports \
                     WHERE incident_id = ?1 ORDER BY created_at, id",
                )
                .map_err(db)?;
            let rows = stmt
                .query_map([i], |r| {
                    Ok(IncidentReportRow {
                        id: r.get(0)?,
                        incident_id: r.get(1)?,
                        created_by: r.get(2)?,
                        created_at: from_ms(r.get(3)?),
                        sha256: r.get(4)?,
                    })
                })
                .map_err(db)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(db)?;
            Ok(rows)
        })
        .await
    }

    async fn sign_cab(&self, cab: &CabReview) -> Result<(), StateError> {
        let cab = cab.clone();
        self.with(move |c| {
            let n = c
                .execute(
                    "INSERT OR IGNORE INTO cab_reviews (incident_id, signed_by, signed_at, outcome, notes) \
                     VALUES (?1,?2,?3,?4,?5)",
                    params![cab.incident_id, cab.signed_by, ms(cab.signed_at), cab.outcome, cab.notes],
                )
                .map_err(db)?;
            if n == 0 {
                return Err(StateError::CabAlreadySigned(cab.incident_id));
            }
            Ok(())
        })
        .await
    }

    async fn cab_review(&self, incident: &str) -> Result<Option<CabReview>, StateError> {
        let i = incident.to_string();
        self.with(move |c| {
            c.query_row(
                "SELECT incident_id, signed_by, signed_at, outcome, notes FROM cab_reviews \
                 WHERE incident_id = ?1",
                [i],
                |r| {
                    Ok(CabReview {
                        incident_id: r.get(0)?,
                        signed_by: r.get(1)?,
                        signed_at: from_ms(r.get(2)?),
                        outcome: r.get(3)?,
                        notes: r.get(4)?,
                    })
                },
            )
            .optional()
            .map_err(db)
        })
        .await
    }

    async fn take_incident_alert(
        &self,
        incident: &str,
        item: &str,
        at: DateTime<Utc>,
    ) -> Result<bool, StateError> {
        let (i, it) = (incident.to_string(), item.to_string());
        self.with(move |c| {
            let n = c
                .execute(
                    "INSERT OR IGNORE INTO incident_alerts (incident_id, item, alerted_at) VALUES (?1,?2,?3)",
                    params![i, it, ms(at)],
                )
                .map_err(db)?;
            Ok(n == 1)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One store, twice: a single node has one connection, so its races are in-process.
    async fn open() -> (
        tempfile::TempDir,
        std::sync::Arc<dyn Store>,
        std::sync::Arc<dyn Store>,
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store: std::sync::Arc<dyn Store> =
            std::sync::Arc::new(SqliteStore::open(&dir.path().join("s.sqlite")).expect("open"));
        (dir, store.clone(), store)
    }

    crate::state::conformance::suite!(open());

    #[tokio::test]
    async fn migrations_are_idempotent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.sqlite");
        let store = SqliteStore::open(&path).expect("open");
        crate::state::conformance::sessions_filter(&store).await;
        drop(store);
        let store = SqliteStore::open(&path).expect("reopen");
        assert_eq!(store.unfinished_sessions().await.expect("u").len(), 2);
    }
}
