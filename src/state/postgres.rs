//! The shared state store for a cluster: PostgreSQL through tokio-postgres, with the same
//! versioned migrations as the embedded SQLite store (one step each, same numbers), and the
//! same invariants, kept by row locks where SQLite had one writer.
//!
//! - Every request decision locks the request row (`SELECT … FOR UPDATE`) first, so two nodes
//!   deciding on one request serialise; the `approvals` primary key refuses a second approval
//!   by the same person even then.
//! - Migrations run under a transaction-level advisory lock, so nodes starting together apply
//!   each step once.
//! - A connection that broke is never handed out again; a stopped server makes every call fail
//!   fast (connect timeout), and the pool reconnects by itself when it is back.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, TimeZone, Utc};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, GenericClient, Row};
use tokio_rustls::rustls;

mod outbox;
pub use outbox::{Appended, NewOutboxRow, OutboxRow, OutboxSink};

use super::{
    Approval, CabReview, Grant, IncidentReportRow, LedgerEntry, LinkUse, NewGrant, NewRequest,
    NodeRow, Request, RequestStatus, Review, ReviewAnswers, ReviewFilter, SearchEntry, SearchHit,
    SessionEnd, SessionFilter, SessionRow, StateError, Store, StoredEvent,
};

/// The schema, one entry per SQLite migration with the same number. Never edit a released
/// migration: add a new one (to both stores).
const MIGRATIONS: &[&str] = &[
    // 1: grants and the session index.
    "CREATE TABLE grants (
        id TEXT PRIMARY KEY,
        person TEXT NOT NULL,
        target TEXT NOT NULL,
        reason TEXT NOT NULL,
        incident_id TEXT NOT NULL,
        created_by TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        expires_at BIGINT NOT NULL,
        revoked_at BIGINT,
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
        started_at BIGINT NOT NULL,
        deadline BIGINT NOT NULL,
        ended_at BIGINT,
        end_reason TEXT,
        bytes_in BIGINT NOT NULL DEFAULT 0,
        bytes_out BIGINT NOT NULL DEFAULT 0,
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
        duration_ms BIGINT NOT NULL,
        created_at BIGINT NOT NULL,
        expires_at BIGINT NOT NULL,
        status TEXT NOT NULL,
        decided_at BIGINT,
        decided_by TEXT,
        decision_reason TEXT,
        grant_id TEXT,
        emergency BIGINT NOT NULL DEFAULT 0
     );
     CREATE INDEX requests_status ON requests(status);
     CREATE TABLE approvals (
        request_id TEXT NOT NULL REFERENCES requests(id),
        approver TEXT NOT NULL,
        at BIGINT NOT NULL,
        PRIMARY KEY (request_id, approver)
     );
     CREATE TABLE events (
        seq BIGSERIAL PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        correlation_id TEXT NOT NULL,
        event_type TEXT NOT NULL,
        event_data TEXT NOT NULL,
        actor TEXT NOT NULL,
        created_at BIGINT NOT NULL
     );
     CREATE INDEX events_correlation ON events(correlation_id, seq);
     ALTER TABLE grants ADD COLUMN request_id TEXT;
     ALTER TABLE grants ADD COLUMN review_required BIGINT NOT NULL DEFAULT 0;",
    // 3: post-incident reviews; signed reviews are immutable (in code and by the trigger).
    "CREATE TABLE reviews (
        id TEXT PRIMARY KEY,
        correlation_id TEXT NOT NULL,
        grant_id TEXT NOT NULL UNIQUE,
        person TEXT NOT NULL,
        target TEXT NOT NULL,
        scenario TEXT NOT NULL,
        emergency BIGINT NOT NULL,
        approvers TEXT NOT NULL,
        opened_at BIGINT NOT NULL,
        due_at BIGINT NOT NULL,
        overdue_alerted BIGINT NOT NULL DEFAULT 0,
        signed_by TEXT,
        signed_at BIGINT,
        findings TEXT,
        root_cause TEXT
     );
     CREATE INDEX reviews_due ON reviews(signed_at, due_at);
     CREATE FUNCTION reviews_immutable() RETURNS trigger LANGUAGE plpgsql AS $$
     BEGIN RAISE EXCEPTION 'signed reviews are immutable'; END $$;
     CREATE TRIGGER reviews_immutable BEFORE UPDATE ON reviews
     FOR EACH ROW WHEN (OLD.signed_at IS NOT NULL) EXECUTE FUNCTION reviews_immutable();",
    // 4: JIT credentials (verifiers only) and key usage.
    "CREATE TABLE credentials (
        grant_id TEXT PRIMARY KEY,
        person TEXT NOT NULL,
        verifier TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        expires_at BIGINT NOT NULL
     );
     CREATE TABLE key_usage (
        fingerprint TEXT PRIMARY KEY,
        person TEXT NOT NULL,
        last_used BIGINT NOT NULL
     );",
    // 5: JSON API bearer tokens (hashes only).
    "CREATE TABLE api_tokens (
        hash TEXT PRIMARY KEY,
        person TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        expires_at BIGINT NOT NULL
     );",
    // 6: the vault (encrypted) and credential rotations.
    "CREATE TABLE vault (
        name TEXT NOT NULL,
        slot TEXT NOT NULL,
        blob TEXT NOT NULL,
        updated_at BIGINT NOT NULL,
        PRIMARY KEY (name, slot)
     );
     CREATE TABLE rotations (
        grant_id TEXT PRIMARY KEY,
        target TEXT NOT NULL,
        outcome TEXT NOT NULL,
        done_at BIGINT NOT NULL
     );",
    // 7: single-use web login links and the search index over commands and SQL.
    "CREATE TABLE login_links (
        hash TEXT PRIMARY KEY,
        person TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        expires_at BIGINT NOT NULL,
        used_at BIGINT
     );
     CREATE TABLE search_text (
        seq BIGSERIAL PRIMARY KEY,
        session_id TEXT NOT NULL,
        channel BIGINT NOT NULL,
        t DOUBLE PRECISION NOT NULL,
        kind TEXT NOT NULL,
        text TEXT NOT NULL
     );
     CREATE INDEX search_text_session ON search_text(session_id);
     CREATE TABLE search_indexed (
        session_id TEXT PRIMARY KEY,
        indexed_at BIGINT NOT NULL
     );",
    // 8: the evidence ledger, and whether the session's manifest is written.
    "CREATE TABLE recording_objects (
        seq BIGSERIAL,
        session_id TEXT NOT NULL,
        key TEXT NOT NULL,
        size BIGINT NOT NULL,
        sha256 TEXT NOT NULL,
        pos BIGINT,
        chain TEXT,
        PRIMARY KEY (session_id, key)
     );
     ALTER TABLE sessions ADD COLUMN sealed BIGINT NOT NULL DEFAULT 0;
     CREATE INDEX sessions_unsealed ON sessions(sealed) WHERE sealed = 0;",
    // 9: nodes and their leases; which node holds a session.
    "ALTER TABLE sessions ADD COLUMN node_id TEXT NOT NULL DEFAULT '';
     CREATE TABLE nodes (
        node_id TEXT PRIMARY KEY,
        started_at BIGINT NOT NULL,
        renewed_at BIGINT NOT NULL,
        expires_at BIGINT NOT NULL,
        draining BIGINT NOT NULL DEFAULT 0,
        live_sessions BIGINT NOT NULL DEFAULT 0,
        version TEXT NOT NULL DEFAULT ''
     );",
    // 10: the shared SIEM outbox (`outbox`): events, and each sink's cursor and delivery lease.
    "CREATE TABLE siem_outbox (
        seq BIGSERIAL PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        spooled_ms BIGINT NOT NULL,
        is_action BOOLEAN NOT NULL,
        body TEXT NOT NULL
     );
     CREATE TABLE siem_sinks (
        name TEXT PRIMARY KEY,
        cursor BIGINT NOT NULL DEFAULT 0,
        delivered BIGINT NOT NULL DEFAULT 0,
        failed BIGINT NOT NULL DEFAULT 0,
        dead_lettered BIGINT NOT NULL DEFAULT 0,
        last_error TEXT,
        holder TEXT,
        held_until BIGINT
     );",
    // 11: the review's answers; incident reports, CAB reviews (immutable) and the one alert
    // per overdue timeline item.
    "ALTER TABLE reviews ADD COLUMN answers TEXT;
     CREATE TABLE incident_reports (
        id TEXT PRIMARY KEY,
        incident_id TEXT NOT NULL,
        created_by TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        sha256 TEXT NOT NULL
     );
     CREATE INDEX incident_reports_incident ON incident_reports(incident_id, created_at);
     CREATE TABLE cab_reviews (
        incident_id TEXT PRIMARY KEY,
        signed_by TEXT NOT NULL,
        signed_at BIGINT NOT NULL,
        outcome TEXT NOT NULL,
        notes TEXT NOT NULL
     );
     CREATE FUNCTION cab_reviews_immutable() RETURNS trigger LANGUAGE plpgsql AS $$
     BEGIN RAISE EXCEPTION 'CAB reviews are immutable'; END $$;
     CREATE TRIGGER cab_reviews_immutable BEFORE UPDATE OR DELETE ON cab_reviews
     FOR EACH ROW EXECUTE FUNCTION cab_reviews_immutable();
     CREATE TABLE incident_alerts (
        incident_id TEXT NOT NULL,
        item TEXT NOT NULL,
        alerted_at BIGINT NOT NULL,
        PRIMARY KEY (incident_id, item)
     );",
];

/// The advisory lock key migrations run under ("breakglass" in ASCII, truncated to 8 bytes).
const MIGRATION_LOCK: i64 = 0x6272_6561_6b67_6c61;

/// How long a connection attempt or one call may take before it is a state-store outage.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

fn db(e: impl std::fmt::Display) -> StateError {
    StateError::Db(e.to_string())
}

/// tokio-postgres hides the cause (refused, TLS, auth) behind its own text; keep both.
fn pg(e: tokio_postgres::Error) -> StateError {
    if let Some(d) = e.as_db_error() {
        return StateError::Db(format!("{}: {}", d.code().code(), d.message()));
    }
    match std::error::Error::source(&e) {
        Some(cause) => StateError::Db(format!("{e}: {cause}")),
        None => StateError::Db(e.to_string()),
    }
}

fn is_unique_violation(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION)
}

fn ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

fn from_ms(v: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(v).single().unwrap_or_default()
}

/// Where and how to connect.
#[derive(Clone)]
pub struct PgSettings {
    /// A libpq-style URL or key/value string (`postgres://user:pw@host:5432/db`).
    pub url: String,
    /// TLS with this trust (verify-full); None: plain TCP (only for loopback tests).
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub pool_size: usize,
}

impl std::fmt::Debug for PgSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL can carry a password.
        f.debug_struct("PgSettings")
            .field("tls", &self.tls.is_some())
            .field("pool_size", &self.pool_size)
            .finish()
    }
}

/// A small pool: idle clients and a permit per connection.
struct Pool {
    cfg: tokio_postgres::Config,
    tls: Option<Arc<rustls::ClientConfig>>,
    idle: Mutex<Vec<Client>>,
    permits: tokio::sync::Semaphore,
}

/// A checked-out client; goes back to the pool on drop unless its connection ended.
struct Conn<'a> {
    client: Option<Client>,
    pool: &'a Pool,
    _permit: tokio::sync::SemaphorePermit<'a>,
}

impl std::ops::Deref for Conn<'_> {
    type Target = Client;
    fn deref(&self) -> &Client {
        // Some until drop.
        self.client.as_ref().unwrap_or_else(|| unreachable!())
    }
}

impl std::ops::DerefMut for Conn<'_> {
    fn deref_mut(&mut self) -> &mut Client {
        self.client.as_mut().unwrap_or_else(|| unreachable!())
    }
}

impl Drop for Conn<'_> {
    fn drop(&mut self) {
        if let Some(c) = self.client.take() {
            if !c.is_closed() {
                self.pool
                    .idle
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(c);
            }
        }
    }
}

impl Pool {
    async fn get(&self) -> Result<Conn<'_>, StateError> {
        let permit = tokio::time::timeout(CALL_TIMEOUT, self.permits.acquire())
            .await
            .map_err(|_| db("state store: every connection is busy"))?
            .map_err(db)?;
        let reuse = {
            let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            idle.retain(|c| !c.is_closed());
            idle.pop()
        };
        let client = match reuse {
            Some(c) => c,
            None => self.connect().await?,
        };
        Ok(Conn {
            client: Some(client),
            pool: self,
            _permit: permit,
        })
    }

    async fn connect(&self) -> Result<Client, StateError> {
        let fut = async {
            match &self.tls {
                Some(tls) => {
                    let (client, conn) = self.cfg.connect(Tls(tls.clone())).await.map_err(pg)?;
                    tokio::spawn(async move {
                        if let Err(e) = conn.await {
                            tracing::warn!(error = %e, "state store connection ended");
                        }
                    });
                    Ok(client)
                }
                None => {
                    let (client, conn) =
                        self.cfg.connect(tokio_postgres::NoTls).await.map_err(pg)?;
                    tokio::spawn(async move {
                        if let Err(e) = conn.await {
                            tracing::warn!(error = %e, "state store connection ended");
                        }
                    });
                    Ok(client)
                }
            }
        };
        tokio::time::timeout(CALL_TIMEOUT, fut)
            .await
            .map_err(|_| db("state store: connect timed out"))?
    }
}

/// PostgreSQL behind a small connection pool.
#[derive(Clone)]
pub struct PgStore {
    pool: Arc<Pool>,
}

impl PgStore {
    /// Connects and applies pending migrations (once across nodes starting together).
    pub async fn open(s: &PgSettings) -> Result<PgStore, StateError> {
        let mut cfg: tokio_postgres::Config = s.url.parse().map_err(|e| {
            db(format!(
                "state.url is not a PostgreSQL connection string: {e}"
            ))
        })?;
        cfg.connect_timeout(CALL_TIMEOUT);
        cfg.application_name("breakglass");
        cfg.ssl_mode(if s.tls.is_some() {
            tokio_postgres::config::SslMode::Require
        } else {
            tokio_postgres::config::SslMode::Disable
        });
        let store = PgStore {
            pool: Arc::new(Pool {
                cfg,
                tls: s.tls.clone(),
                idle: Mutex::new(Vec::new()),
                permits: tokio::sync::Semaphore::new(s.pool_size.max(1)),
            }),
        };
        store.migrate().await?;
        Ok(store)
    }

    async fn migrate(&self) -> Result<(), StateError> {
        let mut c = self.pool.get().await?;
        let tx = c.transaction().await.map_err(pg)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await
            .map_err(pg)?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS breakglass_schema (version BIGINT NOT NULL); \
             INSERT INTO breakglass_schema (version) \
               SELECT 0 WHERE NOT EXISTS (SELECT 1 FROM breakglass_schema)",
        )
        .await
        .map_err(pg)?;
        let version: i64 = tx
            .query_one("SELECT version FROM breakglass_schema", &[])
            .await
            .map_err(pg)?
            .get(0);
        let known = MIGRATIONS.len() as i64;
        if version > known {
            return Err(StateError::TooNew {
                found: version,
                known,
            });
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version.max(0) as usize) {
            tx.batch_execute(sql)
                .await
                .map_err(|e| db(format!("migration {}: {}", i + 1, pg(e))))?;
            tx.execute(
                "UPDATE breakglass_schema SET version = $1",
                &[&((i + 1) as i64)],
            )
            .await
            .map_err(pg)?;
        }
        tx.commit().await.map_err(pg)
    }

    /// Runs one call with the call timeout.
    /// One statement on a pooled connection, within the call timeout; how many rows it changed.
    async fn exec(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<u64, StateError> {
        self.call(async {
            let c = self.pool.get().await?;
            c.execute(sql, params).await.map_err(pg)
        })
        .await
    }

    async fn call<T>(
        &self,
        f: impl std::future::Future<Output = Result<T, StateError>>,
    ) -> Result<T, StateError> {
        tokio::time::timeout(CALL_TIMEOUT * 2, f)
            .await
            .map_err(|_| db("state store: call timed out"))?
    }
}

const GRANT_COLS: &str = "id, person, target, reason, incident_id, created_by, created_at, \
                          expires_at, revoked_at, revoked_by, revoke_reason, request_id, review_required";

fn grant_row(r: &Row) -> Grant {
    Grant {
        id: r.get(0),
        person: r.get(1),
        target: r.get(2),
        reason: r.get(3),
        incident_id: r.get(4),
        created_by: r.get(5),
        created_at: from_ms(r.get(6)),
        expires_at: from_ms(r.get(7)),
        revoked_at: r.get::<_, Option<i64>>(8).map(from_ms),
        revoked_by: r.get(9),
        revoke_reason: r.get(10),
        request_id: r.get(11),
        review_required: r.get::<_, i64>(12) != 0,
    }
}

const SESSION_COLS: &str = "id, protocol, person, target, grant_id, client_addr, started_at, \
                            deadline, ended_at, end_reason, bytes_in, bytes_out, recording_prefix, \
                            node_id";
/// How many columns [`SESSION_COLS`] names (columns after them start at this index).
const SESSION_N: usize = 14;

fn session_row(r: &Row) -> SessionRow {
    SessionRow {
        id: r.get(0),
        protocol: r.get(1),
        person: r.get(2),
        target: r.get(3),
        grant_id: r.get(4),
        client_addr: r.get(5),
        started_at: from_ms(r.get(6)),
        deadline: from_ms(r.get(7)),
        ended_at: r.get::<_, Option<i64>>(8).map(from_ms),
        end_reason: r.get(9),
        bytes_in: r.get::<_, i64>(10).max(0) as u64,
        bytes_out: r.get::<_, i64>(11).max(0) as u64,
        recording_prefix: r.get(12),
        node_id: r.get(13),
    }
}

/// The server's clock in milliseconds since the epoch: leases are judged by it alone.
const DB_NOW: &str = "SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint";

const NODE_COLS: &str =
    "node_id, started_at, renewed_at, expires_at, draining, live_sessions, version";

fn node_row(r: &Row) -> NodeRow {
    NodeRow {
        node_id: r.get(0),
        started_at: from_ms(r.get(1)),
        renewed_at: from_ms(r.get(2)),
        expires_at: from_ms(r.get(3)),
        draining: r.get::<_, i64>(4) != 0,
        live_sessions: r.get::<_, i64>(5).max(0) as u64,
        version: r.get(6),
    }
}

/// The parameters of a session filter, $1..$9, for [`SESSION_WHERE`].
struct FilterParams {
    person: Option<String>,
    target: Option<String>,
    since: Option<i64>,
    until: Option<i64>,
    protocol: Option<String>,
    incident: Option<String>,
    review: Option<&'static str>,
    due: Option<i64>,
    open_after: Option<i64>,
}

impl FilterParams {
    fn of(f: &SessionFilter) -> FilterParams {
        let (review, due) = match f.review {
            None => (None, None),
            Some(ReviewFilter::None) => (Some("none"), None),
            Some(ReviewFilter::Open) => (Some("open"), None),
            Some(ReviewFilter::Overdue(at)) => (Some("overdue"), Some(ms(at))),
            Some(ReviewFilter::Signed) => (Some("signed"), None),
        };
        FilterParams {
            person: f.person.clone(),
            target: f.target.clone(),
            since: f.since.map(ms),
            until: f.until.map(ms),
            protocol: f.protocol.clone(),
            incident: f.incident.clone(),
            review,
            due,
            open_after: matches!(f.review, Some(ReviewFilter::Open))
                .then(|| ms(crate::clock::now())),
        }
    }

    fn params(&self) -> Vec<&(dyn ToSql + Sync)> {
        vec![
            &self.person,
            &self.target,
            &self.since,
            &self.until,
            &self.protocol,
            &self.incident,
            &self.review,
            &self.due,
            &self.open_after,
        ]
    }
}

const SESSION_WHERE: &str =
    "($1::text IS NULL OR person = $1) AND ($2::text IS NULL OR target = $2) \
     AND ($3::bigint IS NULL OR started_at >= $3) AND ($4::bigint IS NULL OR started_at < $4) \
     AND ($5::text IS NULL OR protocol = $5) \
     AND ($6::text IS NULL OR grant_id IN (SELECT id FROM grants WHERE incident_id = $6)) \
     AND ($7::text IS NULL \
          OR ($7 = 'none' AND grant_id NOT IN (SELECT grant_id FROM reviews)) \
          OR ($7 = 'signed' AND grant_id IN \
                (SELECT grant_id FROM reviews WHERE signed_at IS NOT NULL)) \
          OR ($7 = 'open' AND grant_id IN (SELECT grant_id FROM reviews \
                WHERE signed_at IS NULL AND ($9::bigint IS NULL OR due_at > $9))) \
          OR ($7 = 'overdue' AND grant_id IN (SELECT grant_id FROM reviews \
                WHERE signed_at IS NULL AND due_at <= $8::bigint)))";

async fn insert_grant(c: &impl GenericClient, g: &Grant) -> Result<(), StateError> {
    c.execute(
        &format!(
            "INSERT INTO grants ({GRANT_COLS}) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,NULL,NULL,NULL,$9,$10)"
        ),
        &[
            &g.id,
            &g.person,
            &g.target,
            &g.reason,
            &g.incident_id,
            &g.created_by,
            &ms(g.created_at),
            &ms(g.expires_at),
            &g.request_id,
            &i64::from(g.review_required),
        ],
    )
    .await
    .map_err(pg)?;
    Ok(())
}

async fn find_grant_in(c: &impl GenericClient, id: &str) -> Result<Grant, StateError> {
    let rows = c
        .query(
            &format!("SELECT {GRANT_COLS} FROM grants WHERE id LIKE $1 ESCAPE '\\' LIMIT 2"),
            &[&super::like_prefix(id)],
        )
        .await
        .map_err(pg)?;
    match rows.as_slice() {
        [] => Err(StateError::NoSuchGrant(id.to_string())),
        [one] => Ok(grant_row(one)),
        _ => Err(StateError::Ambiguous(id.to_string())),
    }
}

const REQUEST_COLS: &str = "id, person, target, justification, incident_id, severity, scenario, duration_ms, \
                            created_at, expires_at, status, decided_at, decided_by, decision_reason, grant_id, emergency";

fn request_row(r: &Row) -> Request {
    let status: String = r.get(10);
    Request {
        id: r.get(0),
        person: r.get(1),
        target: r.get(2),
        justification: r.get(3),
        incident_id: r.get(4),
        severity: r.get(5),
        scenario: r.get(6),
        duration: Duration::from_millis(r.get::<_, i64>(7).max(0) as u64),
        created_at: from_ms(r.get(8)),
        expires_at: from_ms(r.get(9)),
        status: RequestStatus::parse(&status).unwrap_or(RequestStatus::Expired),
        decided_at: r.get::<_, Option<i64>>(11).map(from_ms),
        decided_by: r.get(12),
        decision_reason: r.get(13),
        grant_id: r.get(14),
        emergency: r.get::<_, i64>(15) != 0,
        approvals: Vec::new(),
    }
}

async fn load_approvals(c: &impl GenericClient, req: &mut Request) -> Result<(), StateError> {
    req.approvals = c
        .query(
            "SELECT approver, at FROM approvals WHERE request_id = $1 ORDER BY at, approver",
            &[&req.id],
        )
        .await
        .map_err(pg)?
        .iter()
        .map(|r| (r.get::<_, String>(0), from_ms(r.get(1))))
        .collect();
    Ok(())
}

/// Finds a request by id or prefix; with `lock`, holds its row until the transaction ends.
async fn find_request_in(
    c: &impl GenericClient,
    id: &str,
    lock: bool,
) -> Result<Request, StateError> {
    let rows = c
        .query(
            &format!(
                "SELECT {REQUEST_COLS} FROM requests WHERE id LIKE $1 ESCAPE '\\' LIMIT 2{}",
                if lock { " FOR UPDATE" } else { "" }
            ),
            &[&super::like_prefix(id)],
        )
        .await
        .map_err(pg)?;
    match rows.as_slice() {
        [] => Err(StateError::NoSuchRequest(id.to_string())),
        [one] => {
            let mut r = request_row(one);
            load_approvals(c, &mut r).await?;
            Ok(r)
        }
        _ => Err(StateError::Ambiguous(id.to_string())),
    }
}

/// Creates the grant for a request that has what it needs, inside the caller's transaction.
async fn grant_request(
    c: &impl GenericClient,
    req: &Request,
    created_by: &str,
    at: DateTime<Utc>,
) -> Result<Grant, StateError> {
    let grant = super::grant_of_request(req, created_by, at);
    insert_grant(c, &grant).await?;
    c.execute(
        "UPDATE requests SET status = 'approved', decided_at = $2, decided_by = $3, grant_id = $4 WHERE id = $1",
        &[&req.id, &ms(at), &created_by, &grant.id],
    )
    .await
    .map_err(pg)?;
    Ok(grant)
}

const REVIEW_COLS: &str = "id, correlation_id, grant_id, person, target, scenario, emergency, approvers, \
                           opened_at, due_at, overdue_alerted, signed_by, signed_at, findings, root_cause, answers";

fn review_row(r: &Row) -> Review {
    let approvers: String = r.get(7);
    Review {
        id: r.get(0),
        correlation_id: r.get(1),
        grant_id: r.get(2),
        person: r.get(3),
        target: r.get(4),
        scenario: r.get(5),
        emergency: r.get::<_, i64>(6) != 0,
        approvers: approvers
            .split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect(),
        opened_at: from_ms(r.get(8)),
        due_at: from_ms(r.get(9)),
        overdue_alerted: r.get::<_, i64>(10) != 0,
        signed_by: r.get(11),
        signed_at: r.get::<_, Option<i64>>(12).map(from_ms),
        findings: r.get(13),
        root_cause: r.get(14),
        answers: r.get::<_, Option<String>>(15).and_then(|a| {
            match serde_json::from_str::<ReviewAnswers>(&a) {
                Ok(a) => Some(a),
                Err(e) => {
                    // Only someone writing the state store directly gets here.
                    tracing::error!(error = %e, "a review's stored answers do not parse");
                    None
                }
            }
        }),
    }
}

async fn find_review_in(
    c: &impl GenericClient,
    id: &str,
    lock: bool,
) -> Result<Review, StateError> {
    let rows = c
        .query(
            &format!(
                "SELECT {REVIEW_COLS} FROM reviews WHERE grant_id = $2 \
                 OR correlation_id LIKE $1 ESCAPE '\\' OR id LIKE $1 ESCAPE '\\' LIMIT 2{}",
                if lock { " FOR UPDATE" } else { "" }
            ),
            &[&super::like_prefix(id), &id],
        )
        .await
        .map_err(pg)?;
    match rows.as_slice() {
        [] => Err(StateError::NoSuchReview(id.to_string())),
        [one] => Ok(review_row(one)),
        _ => Err(StateError::Ambiguous(id.to_string())),
    }
}

/// Sessions by id or prefix, at most two (to tell ambiguity).
async fn sessions_like(
    c: &impl GenericClient,
    id: &str,
    person: Option<&str>,
) -> Result<Option<SessionRow>, StateError> {
    let rows = c
        .query(
            &format!(
                "SELECT {SESSION_COLS} FROM sessions WHERE id LIKE $1 ESCAPE '\\' \
                 AND ($2::text IS NULL OR person = $2) LIMIT 2"
            ),
            &[&super::like_prefix(id), &person],
        )
        .await
        .map_err(pg)?;
    match rows.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some(session_row(one))),
        _ => Err(StateError::Ambiguous(id.to_string())),
    }
}

async fn sessions_where(
    c: &impl GenericClient,
    cond: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Vec<SessionRow>, StateError> {
    Ok(c.query(
        &format!("SELECT {SESSION_COLS} FROM sessions WHERE {cond}"),
        params,
    )
    .await
    .map_err(pg)?
    .iter()
    .map(session_row)
    .collect())
}

#[async_trait]
impl Store for PgStore {
    fn postgres(&self) -> Option<&PgStore> {
        Some(self)
    }

    async fn create_grant(&self, g: NewGrant) -> Result<Grant, StateError> {
        let grant = super::grant_row_of(g);
        self.call(async {
            let c = self.pool.get().await?;
            insert_grant(&*c, &grant).await
        })
        .await?;
        Ok(grant)
    }

    async fn list_grants(
        &self,
        active_at: Option<DateTime<Utc>>,
    ) -> Result<Vec<Grant>, StateError> {
        self.call(async {
            let c = self.pool.get().await?;
            let at = active_at.map(ms);
            Ok(c.query(
                &format!(
                    "SELECT {GRANT_COLS} FROM grants WHERE $1::bigint IS NULL \
                     OR (revoked_at IS NULL AND expires_at > $1) ORDER BY created_at DESC"
                ),
                &[&at],
            )
            .await
            .map_err(pg)?
            .iter()
            .map(grant_row)
            .collect())
        })
        .await
    }

    async fn find_grant(&self, id_or_prefix: &str) -> Result<Grant, StateError> {
        self.call(async {
            let c = self.pool.get().await?;
            find_grant_in(&*c, id_or_prefix).await
        })
        .await
    }

    async fn revoke_grant(
        &self,
        id_or_prefix: &str,
        by: &str,
        reason: &str,
        at: DateTime<Utc>,
    ) -> Result<Grant, StateError> {
        self.call(async {
            let mut c = self.pool.get().await?;
            let tx = c.transaction().await.map_err(pg)?;
            let g = find_grant_in(&tx, id_or_prefix).await?;
            let n = tx
                .execute(
                    "UPDATE grants SET revoked_at = $2, revoked_by = $3, revoke_reason = $4 \
                     WHERE id = $1 AND revoked_at IS NULL",
                    &[&g.id, &ms(at), &by, &reason],
                )
                .await
                .map_err(pg)?;
            if n == 0 {
                return Err(StateError::AlreadyRevoked(g.id));
            }
            let out = find_grant_in(&tx, &g.id).await?;
            tx.commit().await.map_err(pg)?;
            Ok(out)
        })
        .await
    }

    async fn grant_for(
        &self,
        person: &str,
        target: &str,
        at: DateTime<Utc>,
    ) -> Result<Option<Grant>, StateError> {
        self.call(async {
            let c = self.pool.get().await?;
            // Active grants first (latest expiry wins), then the most recent inactive one.
            Ok(c.query_opt(
                &format!(
                    "SELECT {GRANT_COLS} FROM grants WHERE person = $1 AND target = $2 \
                     ORDER BY (revoked_at IS NULL AND expires_at > $3) DESC, \
                              CASE WHEN revoked_at IS NULL AND expires_at > $3 THEN expires_at ELSE created_at END DESC \
                     LIMIT 1"
                ),
                &[&person, &target, &ms(at)],
            )
            .await
            .map_err(pg)?
            .as_ref()
            .map(grant_row))
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
        self.call(async {
            let c = self.pool.get().await?;
            Ok(c.query(
                "SELECT id, revoked_at FROM grants WHERE revoked_at IS NOT NULL AND id = ANY($1)",
                &[&grant_ids],
            )
            .await
            .map_err(pg)?
            .iter()
            .map(|r| (r.get::<_, String>(0), from_ms(r.get(1))))
            .collect())
        })
        .await
    }

    async fn insert_session(&self, s: &SessionRow) -> Result<(), StateError> {
        self.exec(
                &format!(
                    "INSERT INTO sessions ({SESSION_COLS}) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14)"
                ),
                &[
                    &s.id,
                    &s.protocol,
                    &s.person,
                    &s.target,
                    &s.grant_id,
                    &s.client_addr,
                    &ms(s.started_at),
                    &ms(s.deadline),
                    &s.ended_at.map(ms),
                    &s.end_reason,
                    &(s.bytes_in as i64),
                    &(s.bytes_out as i64),
                    &s.recording_prefix,
                    &s.node_id,
                ],
        )
        .await
        .map(drop)
    }

    async fn finish_session(&self, id: &str, end: &SessionEnd) -> Result<(), StateError> {
        self.exec(
            "UPDATE sessions SET ended_at = $2, end_reason = $3, bytes_in = $4, bytes_out = $5 \
                 WHERE id = $1",
            &[
                &id,
                &ms(end.ended_at),
                &end.end_reason,
                &(end.bytes_in as i64),
                &(end.bytes_out as i64),
            ],
        )
        .await
        .map(drop)
    }

    async fn list_sessions(&self, f: &SessionFilter) -> Result<Vec<SessionRow>, StateError> {
        self.call(async {
            let c = self.pool.get().await?;
            let fp = FilterParams::of(f);
            let limit: Option<i64> = f.limit.map(i64::from);
            let offset: i64 = f.offset.map(i64::from).unwrap_or(0);
            let mut p = fp.params();
            p.push(&limit);
            p.push(&offset);
            sessions_where(
                &*c,
                &format!("{SESSION_WHERE} ORDER BY started_at DESC LIMIT $10 OFFSET $11"),
                &p,
            )
            .await
        })
        .await
    }

    async fn find_session(&self, id_or_prefix: &str) -> Result<Option<SessionRow>, StateError> {
        self.call(async {
            let c = self.pool.get().await?;
            sessions_like(&*c, id_or_prefix, None).await
        })
        .await
    }

    async fn find_session_of(
        &self,
        id_or_prefix: &str,
        person: &str,
    ) -> Result<Option<SessionRow>, StateError> {
        self.call(async {
            let c = self.pool.get().await?;
            sessions_like(&*c, id_or_prefix, Some(person)).await
        })
        .await
    }

    async fn heartbeat(&self, n: &NodeRow) -> Result<(), StateError> {
        let lease_ms = (n.expires_at - n.renewed_at).num_milliseconds().max(0);
        self.exec(
                &format!(
                    "INSERT INTO nodes ({NODE_COLS}) \
                     SELECT $1::text, $2::bigint, t, t + $3::bigint, $4::bigint, $5::bigint, $6::text \
                     FROM ({DB_NOW}) AS now(t) \
                     ON CONFLICT (node_id) DO UPDATE SET started_at = excluded.started_at, \
                       renewed_at = excluded.renewed_at, expires_at = excluded.expires_at, \
                       draining = excluded.draining, live_sessions = excluded.live_sessions, \
                       version = excluded.version"
                ),
                &[
                    &n.node_id,
                    &ms(n.started_at),
                    &lease_ms,
                    &i64::from(n.draining),
                    &(n.live_sessions as i64),
                    &n.version,
                ],
        )
        .await
        .map(drop)
    }

    async fn now(&self) -> Result<DateTime<Utc>, StateError> {
        self.call(async {
            let c = self.pool.get().await?;
            let r = c.query_one(DB_NOW, &[]).await.map_err(pg)?;
            Ok(from_ms(r.get(0)))
        })
        .await
    }

    async fn nodes(&self) -> Result<Vec<NodeRow>, StateError> {
        self.call(async {
            let c = self.pool.get().await?;
            Ok(c.query(
                &format!("SELECT {NODE_COLS} FROM nodes ORDER BY node_id"),
                &[],
            )
            .await
            .map_err(pg)?
            .iter()
            .map(node_row)
            .collect())
        })
        .await
    }

    async fn leave(&self, node_id: &str) -> Result<(), StateError> {
        self.call(async {
            let c = self.pool.get().await?;
            c.execute("DELETE FROM nodes WHERE node_id = $1", &[&node_id])
                .await
                .map_err(pg)?;
            Ok(())
        })
        .await
    }

    async fn adopt_sessions(&self, from: &str, to: &str) -> Result<Vec<SessionRow>, StateError> {
        self.call(async {
            let c = self.pool.get().await?;
            Ok(c.query(
                &format!(
                    "UPDATE sessions SET node_id = $2 WHERE node_id = $1 AND sealed = 0 \
                     RETURNING {SESSION_COLS}"
                ),
                &[&from, &to],
            )
            .await
            .map_err(pg)?
            .iter()
            .map(session_row)
            .collect())
        })
        .await
    }

    async fn unfinished_sessions(&self) -> Result<Vec<SessionRow>, StateError> {
        self.call(async {
            let c = self.pool.get().await?;
            sessions_where(&*c, "ended_at IS NULL", &[]).await
        })
        .await
    }

    async fn record_objects(
        &self,
        session_id: &str,
        entries: &[LedgerEntry],
    ) -> Result<(), StateError> {
        self.call(async {
            let mut c = self.pool.get().await?;
            let tx = c.transaction().await.map_err(pg)?;
            for e in entries {
                let (pos, chain) = match &e.chained {
                    Some((p, l)) => (Some(*p as i64), Some(l.clone())),
                    None => (None, None),
                };
                // A chained entry is final; a spooled one is replaced while it waits.
                tx.execute(
                    "INSERT INTO recording_objects (session_id, key, size, sha256, pos, chain) \
                     VALUES ($1, $2, $3, $4, $5, $6) \
                     ON CONFLICT (session_id, key) DO UPDATE SET size = excluded.size, \
                        sha256 = excluded.sha256, pos = excluded.pos, chain = excluded.chain \
                     WHERE recording_objects.chain IS NULL",
                    &[
                        &session_id,
                        &e.key,
                        &(e.size as i64),
                        &e.sha256,
                        &pos,
                        &chain,
                    ],
                )
                .await
                .map_err(pg)?;
            }
            tx.commit().await.map_err(pg)
        })
        .await
    }

    async fn recorded_objects(&self, session_id: &str) -> Result<Vec<LedgerEntry>, StateError> {
        self.call(async {
            let c = self.pool.get().await?;
            Ok(c.query(
                "SELECT key, size, sha256, pos, chain FROM recording_objects \
                 WHERE session_id = $1 ORDER BY pos IS NULL, pos, seq",
                &[&session_id],
            )
            .await
            .map_err(pg)?
            .iter()
            .map(|r| {
                let pos: Option<i64> = r.get(3);
                let chain: Option<String> = r.get(4);
                LedgerEntry {
                    key: r.get(0),
                    size: r.get::<_, i64>(1).max(0) as u64,
                    sha256: r.get(2),
                    chained: pos.zip(chain).map(|(p, l)| (p.max(0) as u64, l)),
                }
            })
            .collect())
        })
        .await
    }

    async fn set_sealed(&self, session_id: &str, sealed: bool) -> Result<(), StateError> {
        self.exec(
            "UPDATE sessions SET sealed = $2 WHERE id = $1",
            &[&session_id, &i64::from(sealed)],
        )
        .await
        .map(drop)
    }

    async fn unsealed_sessions(&self) -> Result<Vec<SessionRow>, StateError> {
        self.call(async {
            let c = self.pool.get().await?;
            sessions_where(&*c, "ended_at IS NOT NULL AND sealed = 0", &[]).await
        })
        .await
    }

    async fn create_request(&self, r: NewRequest) -> Result<Request, StateError> {
        let req = super::request_row_of(r);
        self.call(async {
            let c = self.pool.get().await?;
            c.execute(
                &format!(
                    "INSERT INTO requests ({REQUEST_COLS}) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,'pending',NULL,NULL,NULL,NULL,$11)"
                ),
                &[
                    &req.id,
                    &req.person,
                    &req.target,
                    &req.justification,
                    &req.incident_id,
                    &req.severity,
                    &req.scenario,
                    &(req.duration.as_millis().min(i64::MAX as u128) as i64),
                    &ms(req.created_at),
                    &ms(req.expires_at),
                    &i64::from(req.emergency),
                ],
            )
            .await
            .map_err(pg)?;
            Ok(())
        })
        .await?;
        Ok(req)
    }

    async fn find_request(&self, id_or_prefix: &str) -> Result<Request, StateError> {
        self.call(async {
            let c = self.pool.get().await?;
            find_request_in(&*c, id_or_prefix, false).await
        })
        .await
    }

    async fn list_requests(
        &self,
        status: Option<RequestStatus>,
    ) -> Result<Vec<Request>, StateError> {
        self.call(async {
            let c = self.pool.get().await?;
            let st = status.map(|s| s.as_str());
            let mut rows: Vec<Request> = c
                .query(
                    &format!(
                        "SELECT {REQUEST_COLS} FROM requests WHERE ($1::text IS NULL OR status = $1) \
                         ORDER BY created_at DESC"
                    ),
                    &[&st],
                )
                .await
                .map_err(pg)?
                .iter()
                .map(request_row)
                .collect();
            for r in rows.iter_mut() {
                load_approvals(&*c, r).await?;
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
        self.call(async {
            let mut c = self.pool.get().await?;
            let tx = c.transaction().await.map_err(pg)?;
            // The row lock serialises every decision on this request, across nodes.
            let req = find_request_in(&tx, id, true).await?;
            super::check_pending(&req, at)?;
            let already = || StateError::AlreadyApproved {
                id: req.id.clone(),
                approver: approver.to_string(),
            };
            if req.approvals.iter().any(|(a, _)| a == approver) {
                return Err(already());
            }
            if let Err(e) = tx
                .execute(
                    "INSERT INTO approvals (request_id, approver, at) VALUES ($1, $2, $3)",
                    &[&req.id, &approver, &ms(at)],
                )
                .await
            {
                return Err(if is_unique_violation(&e) {
                    already()
                } else {
                    pg(e)
                });
            }
            let have = req.approvals.len() + 1;
            let out = if have >= need.max(1) {
                let by: Vec<String> = req
                    .approvals
                    .iter()
                    .map(|(a, _)| a.clone())
                    .chain(std::iter::once(approver.to_string()))
                    .collect();
                let grant =
                    grant_request(&tx, &req, &format!("approved:{}", by.join(",")), at).await?;
                Approval::Granted {
                    request: find_request_in(&tx, &req.id, false).await?,
                    grant: Box::new(grant),
                }
            } else {
                Approval::Recorded {
                    request: find_request_in(&tx, &req.id, false).await?,
                    have,
                    need,
                }
            };
            tx.commit().await.map_err(pg)?;
            Ok(out)
        })
        .await
    }

    async fn self_grant(&self, id: &str, at: DateTime<Utc>) -> Result<Approval, StateError> {
        self.call(async {
            let mut c = self.pool.get().await?;
            let tx = c.transaction().await.map_err(pg)?;
            let req = find_request_in(&tx, id, true).await?;
            super::check_pending(&req, at)?;
            let grant = grant_request(
                &tx,
                &req,
                &format!("emergency-self-service:{}", req.person),
                at,
            )
            .await?;
            let request = find_request_in(&tx, &req.id, false).await?;
            tx.commit().await.map_err(pg)?;
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
        self.call(async {
            let mut c = self.pool.get().await?;
            let tx = c.transaction().await.map_err(pg)?;
            let req = find_request_in(&tx, id, true).await?;
            super::check_pending(&req, at)?;
            tx.execute(
                "UPDATE requests SET status = 'denied', decided_at = $2, decided_by = $3, decision_reason = $4 WHERE id = $1",
                &[&req.id, &ms(at), &by, &reason],
            )
            .await
            .map_err(pg)?;
            let out = find_request_in(&tx, &req.id, false).await?;
            tx.commit().await.map_err(pg)?;
            Ok(out)
        })
        .await
    }

    async fn expire_requests(&self, at: DateTime<Utc>) -> Result<Vec<Request>, StateError> {
        self.call(async {
            let mut c = self.pool.get().await?;
            let tx = c.transaction().await.map_err(pg)?;
            // Rows another node is deciding on are left for the next round.
            let ids: Vec<String> = tx
                .query(
                    "SELECT id FROM requests WHERE status = 'pending' AND expires_at <= $1 \
                     FOR UPDATE SKIP LOCKED",
                    &[&ms(at)],
                )
                .await
                .map_err(pg)?
                .iter()
                .map(|r| r.get(0))
                .collect();
            let mut out = Vec::new();
            for id in ids {
                tx.execute(
                    "UPDATE requests SET status = 'expired', decided_at = $2, decided_by = 'breakglass', \
                     decision_reason = 'not approved in time' WHERE id = $1 AND status = 'pending'",
                    &[&id, &ms(at)],
                )
                .await
                .map_err(pg)?;
                out.push(find_request_in(&tx, &id, false).await?);
            }
            tx.commit().await.map_err(pg)?;
            Ok(out)
        })
        .await
    }

    async fn append_event(&self, e: &StoredEvent) -> Result<(), StateError> {
        self.exec(
            "INSERT INTO events (id, correlation_id, event_type, event_data, actor, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6)",
            &[
                &e.id,
                &e.correlation_id,
                &e.event_type,
                &e.event_data.to_string(),
                &e.actor,
                &ms(e.created_at),
            ],
        )
        .await
        .map(drop)
    }

    async fn events(&self, correlation_id: &str) -> Result<Vec<StoredEvent>, StateError> {
        self.call(async {
            let c = self.pool.get().await?;
            Ok(c.query(
                "SELECT id, correlation_id, event_type, event_data, actor, created_at FROM events \
                 WHERE correlation_id = $1 ORDER BY seq",
                &[&correlation_id],
            )
            .await
            .map_err(pg)?
            .iter()
            .map(|r| {
                let data: String = r.get(3);
                StoredEvent {
                    id: r.get(0),
                    correlation_id: r.get(1),
                    event_type: r.get(2),
                    event_data: serde_json::from_str(&data)
                        .unwrap_or(serde_json::Value::String(data)),
                    actor: r.get(4),
                    created_at: from_ms(r.get(5)),
                }
            })
            .collect())
        })
        .await
    }

    async fn open_review(&self, r: &Review) -> Result<(Review, bool), StateError> {
        self.call(async {
            let c = self.pool.get().await?;
            let n = c
                .execute(
                    &format!(
                        "INSERT INTO reviews ({REVIEW_COLS}) \
                         VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,0,NULL,NULL,NULL,NULL,NULL) \
                         ON CONFLICT DO NOTHING"
                    ),
                    &[
                        &r.id,
                        &r.correlation_id,
                        &r.grant_id,
                        &r.person,
                        &r.target,
                        &r.scenario,
                        &i64::from(r.emergency),
                        &r.approvers.join(","),
                        &ms(r.opened_at),
                        &ms(r.due_at),
                    ],
                )
                .await
                .map_err(pg)?;
            Ok((find_review_in(&*c, &r.grant_id, false).await?, n == 1))
        })
        .await
    }

    async fn find_review(&self, id: &str) -> Result<Review, StateError> {
        self.call(async {
            let c = self.pool.get().await?;
            find_review_in(&*c, id, false).await
        })
        .await
    }

    async fn open_reviews(&self) -> Result<Vec<Review>, StateError> {
        self.call(async {
            let c = self.pool.get().await?;
            Ok(c.query(
                &format!(
                    "SELECT {REVIEW_COLS} FROM reviews WHERE signed_at IS NULL ORDER BY due_at"
                ),
                &[],
            )
            .await
            .map_err(pg)?
            .iter()
            .map(review_row)
            .collect())
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
        let answers = serde_json::to_string(answers).map_err(db)?;
        self.call(async {
            let mut c = self.pool.get().await?;
            let tx = c.transaction().await.map_err(pg)?;
            let r = find_review_in(&tx, id, true).await?;
            if r.signed_at.is_some() {
                return Err(StateError::AlreadySigned(r.id));
            }
            tx.execute(
                "UPDATE reviews SET signed_by = $2, signed_at = $3, findings = $4, root_cause = $5, \
                 answers = $6 WHERE id = $1",
                &[&r.id, &by, &ms(at), &findings, &root_cause, &answers],
            )
            .await
            .map_err(pg)?;
            let out = find_review_in(&tx, &r.id, false).await?;
            tx.commit().await.map_err(pg)?;
            Ok(out)
        })
        .await
    }

    async fn take_overdue_reviews(&self, at: DateTime<Utc>) -> Result<Vec<Review>, StateError> {
        self.call(async {
            let c = self.pool.get().await?;
            // One statement claims the rows, so two nodes never alert the same review.
            Ok(c.query(
                &format!(
                    "UPDATE reviews SET overdue_alerted = 1 WHERE id IN ( \
                       SELECT id FROM reviews WHERE signed_at IS NULL AND overdue_alerted = 0 \
                       AND due_at <= $1 FOR UPDATE SKIP LOCKED) \
                     RETURNING {REVIEW_COLS}"
                ),
                &[&ms(at)],
            )
            .await
            .map_err(pg)?
            .iter()
            .map(review_row)
            .map(|mut r| {
                // As the caller saw it before the claim.
                r.overdue_alerted = false;
                r
            })
            .collect())
        })
        .await
    }

    async fn put_credential(
        &self,
        grant: &Grant,
        verifier: &str,
        at: DateTime<Utc>,
    ) -> Result<(), StateError> {
        self.exec(
                "INSERT INTO credentials (grant_id, person, verifier, created_at, expires_at) VALUES ($1,$2,$3,$4,$5) \
                 ON CONFLICT (grant_id) DO UPDATE SET verifier = excluded.verifier, created_at = excluded.created_at",
                &[&grant.id, &grant.person, &verifier, &ms(at), &ms(grant.expires_at)],
        )
        .await
        .map(drop)
    }

    async fn credential(
        &self,
        grant_id: &str,
    ) -> Result<Option<(String, DateTime<Utc>)>, StateError> {
        self.call(async {
            let c = self.pool.get().await?;
            Ok(c.query_opt(
                "SELECT verifier, expires_at FROM credentials WHERE grant_id = $1",
                &[&grant_id],
            )
            .await
            .map_err(pg)?
            .map(|r| (r.get::<_, String>(0), from_ms(r.get(1)))))
        })
        .await
    }

    async fn touch_key(
        &self,
        fingerprint: &str,
        person: &str,
        at: DateTime<Utc>,
    ) -> Result<(), StateError> {
        self.exec(
                "INSERT INTO key_usage (fingerprint, person, last_used) VALUES ($1,$2,$3) \
                 ON CONFLICT (fingerprint) DO UPDATE SET person = excluded.person, last_used = excluded.last_used",
                &[&fingerprint, &person, &ms(at)],
        )
        .await
        .map(drop)
    }

    async fn key_usage(&self) -> Result<Vec<(String, String, DateTime<Utc>)>, StateError> {
        self.call(async {
            let c = self.pool.get().await?;
            Ok(c.query(
                "SELECT fingerprint, person, last_used FROM key_usage ORDER BY person",
                &[],
            )
            .await
            .map_err(pg)?
            .iter()
            .map(|r| (r.get(0), r.get(1), from_ms(r.get(2))))
            .collect())
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
        self.exec(
            "INSERT INTO api_tokens (hash, person, created_at, expires_at) VALUES ($1,$2,$3,$4)",
            &[&hash, &person, &ms(at), &ms(expires_at)],
        )
        .await
        .map(drop)
    }

    async fn end_api_token(&self, hash: &str, at: DateTime<Utc>) -> Result<(), StateError> {
        self.exec(
            "UPDATE api_tokens SET expires_at = $2 WHERE hash = $1 AND expires_at > $2",
            &[&hash, &ms(at)],
        )
        .await
        .map(drop)
    }

    async fn api_token_person(
        &self,
        hash: &str,
        at: DateTime<Utc>,
    ) -> Result<Option<String>, StateError> {
        self.call(async {
            let c = self.pool.get().await?;
            Ok(c.query_opt(
                "SELECT person FROM api_tokens WHERE hash = $1 AND expires_at > $2",
                &[&hash, &ms(at)],
            )
            .await
            .map_err(pg)?
            .map(|r| r.get(0)))
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
        self.exec(
            "INSERT INTO login_links (hash, person, created_at, expires_at) VALUES ($1,$2,$3,$4)",
            &[&hash, &person, &ms(at), &ms(expires_at)],
        )
        .await
        .map(drop)
    }

    async fn use_login_link(&self, hash: &str, at: DateTime<Utc>) -> Result<LinkUse, StateError> {
        self.call(async {
            let mut c = self.pool.get().await?;
            let tx = c.transaction().await.map_err(pg)?;
            let row = tx
                .query_opt(
                    "SELECT person, expires_at, used_at FROM login_links WHERE hash = $1 FOR UPDATE",
                    &[&hash],
                )
                .await
                .map_err(pg)?
                .map(|r| {
                    (
                        r.get::<_, String>(0),
                        r.get::<_, i64>(1),
                        r.get::<_, Option<i64>>(2),
                    )
                });
            let outcome = match row {
                None => LinkUse::Unknown,
                Some((_, _, Some(_))) => LinkUse::AlreadyUsed,
                Some((_, exp, None)) if exp <= ms(at) => LinkUse::Expired,
                Some((person, _, None)) => {
                    let n = tx
                        .execute(
                            "UPDATE login_links SET used_at = $2 WHERE hash = $1 AND used_at IS NULL",
                            &[&hash, &ms(at)],
                        )
                        .await
                        .map_err(pg)?;
                    if n == 1 {
                        LinkUse::Person(person)
                    } else {
                        LinkUse::AlreadyUsed
                    }
                }
            };
            tx.commit().await.map_err(pg)?;
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
        self.call(async {
            let mut c = self.pool.get().await?;
            let tx = c.transaction().await.map_err(pg)?;
            let fresh = tx
                .execute(
                    "INSERT INTO search_indexed (session_id, indexed_at) VALUES ($1, $2) \
                     ON CONFLICT DO NOTHING",
                    &[&session_id, &ms(at)],
                )
                .await
                .map_err(pg)?;
            if fresh == 1 {
                let stmt = tx
                    .prepare(
                        "INSERT INTO search_text (session_id, channel, t, kind, text) \
                         VALUES ($1,$2,$3,$4,$5)",
                    )
                    .await
                    .map_err(pg)?;
                for e in &entries {
                    tx.execute(
                        &stmt,
                        &[
                            &session_id,
                            &i64::from(e.channel),
                            &e.time,
                            &e.kind,
                            &e.text,
                        ],
                    )
                    .await
                    .map_err(pg)?;
                }
            }
            tx.commit().await.map_err(pg)?;
            Ok(fresh == 1)
        })
        .await
    }

    async fn unindexed_sessions(&self, limit: u32) -> Result<Vec<SessionRow>, StateError> {
        self.call(async {
            let c = self.pool.get().await?;
            sessions_where(
                &*c,
                "ended_at IS NOT NULL AND id NOT IN (SELECT session_id FROM search_indexed) \
                 ORDER BY started_at LIMIT $1",
                &[&i64::from(limit)],
            )
            .await
        })
        .await
    }

    async fn search_text(
        &self,
        needle: &str,
        f: &SessionFilter,
    ) -> Result<Vec<SearchHit>, StateError> {
        self.call(async {
            let c = self.pool.get().await?;
            let pattern = format!("%{}", super::like_prefix(needle));
            let limit: i64 = f.limit.map(i64::from).unwrap_or(200);
            let fp = FilterParams::of(f);
            let mut p = fp.params();
            p.push(&pattern);
            p.push(&limit);
            let cols = SESSION_COLS
                .split(", ")
                .map(|c| format!("s.{}", c.trim()))
                .collect::<Vec<_>>()
                .join(", ");
            Ok(c.query(
                &format!(
                    "SELECT {cols}, x.channel, x.t, x.kind, x.text \
                     FROM search_text x JOIN (SELECT * FROM sessions WHERE {SESSION_WHERE}) s \
                       ON s.id = x.session_id \
                     WHERE x.text ILIKE $10 ESCAPE '\\' \
                     ORDER BY s.started_at DESC, x.channel, x.t LIMIT $11"
                ),
                &p,
            )
            .await
            .map_err(pg)?
            .iter()
            .map(|r| SearchHit {
                session: session_row(r),
                entry: SearchEntry {
                    channel: u32::try_from(r.get::<_, i64>(SESSION_N)).unwrap_or(0),
                    time: r.get(SESSION_N + 1),
                    kind: r.get(SESSION_N + 2),
                    text: r.get(SESSION_N + 3),
                },
            })
            .collect())
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
        self.exec(
                "INSERT INTO vault (name, slot, blob, updated_at) VALUES ($1,$2,$3,$4) \
                 ON CONFLICT (name, slot) DO UPDATE SET blob = excluded.blob, updated_at = excluded.updated_at",
                &[&name, &slot, &blob, &ms(at)],
        )
        .await
        .map(drop)
    }

    async fn vault_put_new(
        &self,
        name: &str,
        slot: &str,
        blob: &str,
        at: DateTime<Utc>,
    ) -> Result<bool, StateError> {
        let changed = self
            .exec(
                "INSERT INTO vault (name, slot, blob, updated_at) VALUES ($1,$2,$3,$4) \
                 ON CONFLICT (name, slot) DO NOTHING",
                &[&name, &slot, &blob, &ms(at)],
            )
            .await?;
        Ok(changed == 1)
    }

    async fn vault_get(&self, name: &str, slot: &str) -> Result<Option<String>, StateError> {
        self.call(async {
            let c = self.pool.get().await?;
            Ok(c.query_opt(
                "SELECT blob FROM vault WHERE name = $1 AND slot = $2",
                &[&name, &slot],
            )
            .await
            .map_err(pg)?
            .map(|r| r.get(0)))
        })
        .await
    }

    async fn vault_promote(&self, name: &str, at: DateTime<Utc>) -> Result<(), StateError> {
        self.call(async {
            let mut c = self.pool.get().await?;
            let tx = c.transaction().await.map_err(pg)?;
            let blob: Option<String> = tx
                .query_opt(
                    "SELECT blob FROM vault WHERE name = $1 AND slot = 'pending' FOR UPDATE",
                    &[&name],
                )
                .await
                .map_err(pg)?
                .map(|r| r.get(0));
            if let Some(b) = blob {
                tx.execute(
                    "INSERT INTO vault (name, slot, blob, updated_at) VALUES ($1,'current',$2,$3) \
                     ON CONFLICT (name, slot) DO UPDATE SET blob = excluded.blob, updated_at = excluded.updated_at",
                    &[&name, &b, &ms(at)],
                )
                .await
                .map_err(pg)?;
                tx.execute(
                    "DELETE FROM vault WHERE name = $1 AND slot = 'pending'",
                    &[&name],
                )
                .await
                .map_err(pg)?;
            }
            tx.commit().await.map_err(pg)
        })
        .await
    }

    async fn grants_to_rotate(&self, at: DateTime<Utc>) -> Result<Vec<Grant>, StateError> {
        self.call(async {
            let c = self.pool.get().await?;
            Ok(c.query(
                &format!(
                    "SELECT {GRANT_COLS} FROM grants WHERE (expires_at <= $1 OR revoked_at IS NOT NULL) \
                     AND id NOT IN (SELECT grant_id FROM rotations) ORDER BY created_at"
                ),
                &[&ms(at)],
            )
            .await
            .map_err(pg)?
            .iter()
            .map(grant_row)
            .collect())
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
        self.exec(
            "INSERT INTO rotations (grant_id, target, outcome, done_at) VALUES ($1,$2,$3,$4) \
                 ON CONFLICT (grant_id) DO UPDATE SET target = excluded.target, \
                   outcome = excluded.outcome, done_at = excluded.done_at",
            &[&grant_id, &target, &outcome, &ms(at)],
        )
        .await
        .map(drop)
    }

    async fn rotation_of(
        &self,
        grant_id: &str,
    ) -> Result<Option<(String, DateTime<Utc>)>, StateError> {
        self.call(async {
            let c = self.pool.get().await?;
            Ok(c.query_opt(
                "SELECT outcome, done_at FROM rotations WHERE grant_id = $1",
                &[&grant_id],
            )
            .await
            .map_err(pg)?
            .map(|r| (r.get::<_, String>(0), from_ms(r.get(1)))))
        })
        .await
    }

    async fn add_incident_report(&self, r: &IncidentReportRow) -> Result<(), StateError> {
        self.exec(
            "INSERT INTO incident_reports (id, incident_id, created_by, created_at, sha256) \
             VALUES ($1,$2,$3,$4,$5)",
            &[
                &r.id,
                &r.incident_id,
                &r.created_by,
                &ms(r.created_at),
                &r.sha256,
            ],
        )
        .await
        .map(drop)
    }

    async fn incident_reports(&self, incident: &str) -> Result<Vec<IncidentReportRow>, StateError> {
        self.call(async {
            let c = self.pool.get().await?;
            Ok(c.query(
                "SELECT id, incident_id, created_by, created_at, sha256 FROM incident_reports \
                 WHERE incident_id = $1 ORDER BY created_at, id",
                &[&incident],
            )
            .await
            .map_err(pg)?
            .iter()
            .map(|r| IncidentReportRow {
                id: r.get(0),
                incident_id: r.get(1),
                created_by: r.get(2),
                created_at: from_ms(r.get(3)),
                sha256: r.get(4),
            })
            .collect())
        })
        .await
    }

    async fn sign_cab(&self, cab: &CabReview) -> Result<(), StateError> {
        let n = self
            .exec(
                "INSERT INTO cab_reviews (incident_id, signed_by, signed_at, outcome, notes) \
                 VALUES ($1,$2,$3,$4,$5) ON CONFLICT DO NOTHING",
                &[
                    &cab.incident_id,
                    &cab.signed_by,
                    &ms(cab.signed_at),
                    &cab.outcome,
                    &cab.notes,
                ],
            )
            .await?;
        if n == 0 {
            return Err(StateError::CabAlreadySigned(cab.incident_id.clone()));
        }
        Ok(())
    }

    async fn cab_review(&self, incident: &str) -> Result<Option<CabReview>, StateError> {
        self.call(async {
            let c = self.pool.get().await?;
            Ok(c.query_opt(
                "SELECT incident_id, signed_by, signed_at, outcome, notes FROM cab_reviews \
                 WHERE incident_id = $1",
                &[&incident],
            )
            .await
            .map_err(pg)?
            .map(|r| CabReview {
                incident_id: r.get(0),
                signed_by: r.get(1),
                signed_at: from_ms(r.get(2)),
                outcome: r.get(3),
                notes: r.get(4),
            }))
        })
        .await
    }

    async fn take_incident_alert(
        &self,
        incident: &str,
        item: &str,
        at: DateTime<Utc>,
    ) -> Result<bool, StateError> {
        Ok(self
            .exec(
                "INSERT INTO incident_alerts (incident_id, item, alerted_at) VALUES ($1,$2,$3) \
                 ON CONFLICT DO NOTHING",
                &[&incident, &item, &ms(at)],
            )
            .await?
            == 1)
    }
}

/// TLS to the state store with the configured trust (verify-full: the URL's host must be in
/// the certificate). SCRAM runs without channel binding here; the trust is the CA.
#[derive(Clone)]
struct Tls(Arc<rustls::ClientConfig>);

impl<S> tokio_postgres::tls::MakeTlsConnect<S> for Tls
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    type Stream = TlsStream<S>;
    type TlsConnect = TlsConnect;
    type Error = rustls::pki_types::InvalidDnsNameError;

    fn make_tls_connect(&mut self, host: &str) -> Result<TlsConnect, Self::Error> {
        Ok(TlsConnect {
            cfg: self.0.clone(),
            name: rustls::pki_types::ServerName::try_from(host.to_string())?,
        })
    }
}

struct TlsConnect {
    cfg: Arc<rustls::ClientConfig>,
    name: rustls::pki_types::ServerName<'static>,
}

type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S> tokio_postgres::tls::TlsConnect<S> for TlsConnect
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    type Stream = TlsStream<S>;
    type Error = std::io::Error;
    type Future = BoxFuture<std::io::Result<TlsStream<S>>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let s = tokio_rustls::TlsConnector::from(self.cfg)
                .connect(self.name, stream)
                .await?;
            Ok(TlsStream(s))
        })
    }
}

struct TlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> tokio::io::AsyncRead
    for TlsStream<S>
{
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite
    for TlsStream<S>
{
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> tokio_postgres::tls::TlsStream
    for TlsStream<S>
{
    fn channel_binding(&self) -> tokio_postgres::tls::ChannelBinding {
        tokio_postgres::tls::ChannelBinding::none()
    }
}
