//! The state store: grants and the session index, behind a trait so that a PostgreSQL store
//! can replace the embedded SQLite one without changing callers.

#[cfg(test)]
mod conformance;
mod postgres;
mod sqlite;
#[cfg(test)]
pub(crate) mod testpg;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

pub use postgres::{Appended, NewOutboxRow, OutboxRow, OutboxSink, PgSettings, PgStore};
pub use sqlite::SqliteStore;

/// A state-store failure. Always on our side (internal), never the client's.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state store: {0}")]
    Db(String),
    #[error("no grant matches `{0}`")]
    NoSuchGrant(String),
    #[error("id prefix `{0}` matches more than one; give more of it")]
    Ambiguous(String),
    #[error("grant {0} is already revoked")]
    AlreadyRevoked(String),
    #[error("no request matches `{0}`")]
    NoSuchRequest(String),
    #[error("request {id} is {status}, not pending")]
    NotPending { id: String, status: String },
    #[error("{approver} has already approved request {id}")]
    AlreadyApproved { id: String, approver: String },
    #[error("no review matches `{0}`")]
    NoSuchReview(String),
    #[error("review {0} is already signed off; reviews are immutable")]
    AlreadySigned(String),
    #[error("incident {0} already has its CAB review; CAB reviews are immutable")]
    CabAlreadySigned(String),
    #[error("state store schema version {found} is newer than this binary knows ({known}); upgrade breakglass")]
    TooNew { found: i64, known: i64 },
}

pub use crate::grant::{Grant, GrantState};

/// Opens the state store the config names: the SQLite file, or the shared PostgreSQL
/// database (migrated to this binary's schema either way).
pub async fn open(
    cfg: &crate::config::StateConfig,
) -> Result<std::sync::Arc<dyn Store>, StateError> {
    use crate::config::StateConfig;
    match cfg {
        StateConfig::Sqlite(path) => Ok(std::sync::Arc::new(SqliteStore::open(path)?)),
        StateConfig::Postgres(pg) => {
            let url = pg.url.resolve().map_err(StateError::Db)?;
            // TLS here always checks the chain and the host name (verify-full); the driver
            // knows only disable/prefer/require, so the stricter libpq spellings map to it.
            let url = url
                .replace("sslmode=verify-full", "sslmode=require")
                .replace("sslmode=verify-ca", "sslmode=require");
            let tls = match &pg.ca_file {
                Some(ca) => Some(
                    crate::outbound::client_tls(Some(ca), true)
                        .map_err(|e| StateError::Db(format!("state.ca_file: {e}")))?,
                ),
                None if url_wants_tls(&url) => Some(
                    crate::outbound::client_tls(None, false)
                        .map_err(|e| StateError::Db(format!("state TLS: {e}")))?,
                ),
                None => None,
            };
            Ok(std::sync::Arc::new(
                PgStore::open(&PgSettings {
                    url,
                    tls,
                    pool_size: pg.pool_size,
                })
                .await?,
            ))
        }
    }
}

/// Whether a connection string asks for TLS (`sslmode=require`).
fn url_wants_tls(url: &str) -> bool {
    url.contains("sslmode=require")
}

/// Where a state config points, for messages (never the URL: it may hold a password).
pub fn describe(cfg: &crate::config::StateConfig) -> String {
    use crate::config::{StateConfig, UrlSource};
    match cfg {
        StateConfig::Sqlite(path) => path.display().to_string(),
        StateConfig::Postgres(pg) => match &pg.url {
            UrlSource::Env(v) => format!("postgres (${v})"),
            UrlSource::Inline(_) => "postgres (state.url)".into(),
        },
    }
}

/// Where a request stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestStatus {
    Pending,
    Approved,
    Denied,
    Expired,
}

impl RequestStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RequestStatus::Pending => "pending",
            RequestStatus::Approved => "approved",
            RequestStatus::Denied => "denied",
            RequestStatus::Expired => "expired",
        }
    }
    pub fn parse(s: &str) -> Option<RequestStatus> {
        match s {
            "pending" => Some(RequestStatus::Pending),
            "approved" => Some(RequestStatus::Approved),
            "denied" => Some(RequestStatus::Denied),
            "expired" => Some(RequestStatus::Expired),
            _ => None,
        }
    }
}

/// A person's request for break-glass access, waiting for approvals.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub id: String,
    pub person: String,
    pub target: String,
    pub justification: String,
    pub incident_id: String,
    pub severity: String,
    pub scenario: String,
    /// How long the grant lasts once approved.
    pub duration: std::time::Duration,
    pub created_at: DateTime<Utc>,
    /// A request not approved by then expires.
    pub expires_at: DateTime<Utc>,
    pub status: RequestStatus,
    pub decided_at: Option<DateTime<Utc>>,
    pub decided_by: Option<String>,
    pub decision_reason: Option<String>,
    pub grant_id: Option<String>,
    /// Emergency self-service: granted without a second person, marked for mandatory review.
    pub emergency: bool,
    /// Who approved so far, in order.
    pub approvals: Vec<(String, DateTime<Utc>)>,
}

/// What `request` asks for.
#[derive(Debug, Clone)]
pub struct NewRequest {
    pub person: String,
    pub target: String,
    pub justification: String,
    pub incident_id: String,
    pub severity: String,
    pub scenario: String,
    pub duration: std::time::Duration,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub emergency: bool,
}

/// The result of recording one approval.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Approval {
    /// Recorded; `have` of `need` approvals so far.
    Recorded {
        request: Request,
        have: usize,
        need: usize,
    },
    /// That approval completed the request: here is the grant.
    Granted { request: Request, grant: Box<Grant> },
}

/// A post-incident review of one used grant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Review {
    pub id: String,
    pub correlation_id: String,
    pub grant_id: String,
    pub person: String,
    pub target: String,
    pub scenario: String,
    pub emergency: bool,
    /// Who approved the grant (reviewers must differ by default).
    pub approvers: Vec<String>,
    pub opened_at: DateTime<Utc>,
    pub due_at: DateTime<Utc>,
    pub overdue_alerted: bool,
    pub signed_by: Option<String>,
    pub signed_at: Option<DateTime<Utc>>,
    pub findings: Option<String>,
    pub root_cause: Option<String>,
    /// The answers to the review's questions (None before the sign-off, and for reviews
    /// signed before the questions existed).
    pub answers: Option<ReviewAnswers>,
}

/// The answers of a post-incident review sign-off, besides its findings and root cause:
/// the seed procedure's questions.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReviewAnswers {
    /// Were the documented thresholds for break-glass access met?
    pub thresholds_met: bool,
    pub thresholds_note: String,
    /// Could the standard escalation paths have worked instead?
    pub escalation_possible: bool,
    pub escalation_note: String,
    /// What was done during the access.
    pub actions_taken: String,
    /// Does the break-glass procedure need an update, and which?
    pub procedure_update: bool,
    pub procedure_change: String,
}

/// One incident report written by `incident-report` (its SHA-256 is the HTML file's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IncidentReportRow {
    pub id: String,
    pub incident_id: String,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub sha256: String,
}

/// The change advisory board's review of an incident: signed once, never changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CabReview {
    pub incident_id: String,
    pub signed_by: String,
    pub signed_at: DateTime<Utc>,
    /// `accepted` or `actions-required`.
    pub outcome: String,
    pub notes: String,
}

/// One record of the incident event store (the seed procedure's shape).
#[derive(Debug, Clone, PartialEq)]
pub struct StoredEvent {
    pub id: String,
    pub correlation_id: String,
    pub event_type: String,
    pub event_data: serde_json::Value,
    pub actor: String,
    pub created_at: DateTime<Utc>,
}

/// What `grant add` asks for.
#[derive(Debug, Clone)]
pub struct NewGrant {
    pub person: String,
    pub target: String,
    pub reason: String,
    pub incident_id: String,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

/// One session in the index. The recording itself lives in the recording store.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionRow {
    pub id: String,
    pub protocol: String,
    pub person: String,
    pub target: String,
    pub grant_id: String,
    pub client_addr: String,
    pub started_at: DateTime<Utc>,
    /// The absolute deadline fixed at start.
    pub deadline: DateTime<Utc>,
    pub ended_at: Option<DateTime<Utc>>,
    pub end_reason: Option<String>,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Where the recording objects live in the store.
    pub recording_prefix: String,
    /// The gateway node that holds (or held) the session; `""` for rows from before nodes.
    pub node_id: String,
}

/// One gateway node's lease, as it last renewed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRow {
    pub node_id: String,
    /// When this run of the node first took its lease.
    pub started_at: DateTime<Utc>,
    pub renewed_at: DateTime<Utc>,
    /// Past this the node counts as gone and its sessions may be taken over.
    pub expires_at: DateTime<Utc>,
    /// Draining: accepting nothing new, ending its sessions.
    pub draining: bool,
    pub live_sessions: u64,
    /// The binary's version, so a rolling upgrade shows in `cluster status`.
    pub version: String,
}

/// One recording object as the gateway wrote it: the evidence ledger that crash recovery and
/// late sealing trust, never the listing of the store (which its owner can change).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerEntry {
    pub key: String,
    pub size: u64,
    pub sha256: String,
    /// Position in the session's hash chain and the link after it; None while the object
    /// waits in the local outage spool (written there, not yet stored).
    pub chained: Option<(u64, String)>,
}

/// Filters for `sessions list`.
#[derive(Debug, Clone, Default)]
pub struct SessionFilter {
    pub person: Option<String>,
    pub target: Option<String>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    pub limit: Option<u32>,
    /// `ssh` or `postgres`.
    pub protocol: Option<String>,
    /// The incident id of the session's grant.
    pub incident: Option<String>,
    /// The review state of the session's grant at `now`.
    pub review: Option<ReviewFilter>,
    /// Rows to skip (paging).
    pub offset: Option<u32>,
}

/// Sessions by the state of their grant's post-incident review.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReviewFilter {
    /// No review was opened for the grant.
    None,
    /// Open and not yet due.
    Open,
    /// Open and past due at the given moment.
    Overdue(DateTime<Utc>),
    Signed,
}

/// What became of a single-use web login link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkUse {
    /// The link was good; it is now spent.
    Person(String),
    Unknown,
    Expired,
    AlreadyUsed,
}

/// One searchable line of a recording: a shell command or a SQL statement.
#[derive(Debug, Clone, PartialEq)]
pub struct SearchEntry {
    pub channel: u32,
    /// Seconds since the channel started.
    pub time: f64,
    /// `command` or `sql`.
    pub kind: String,
    pub text: String,
}

/// A search result: where in which session the text was.
#[derive(Debug, Clone, PartialEq)]
pub struct SearchHit {
    pub session: SessionRow,
    pub entry: SearchEntry,
}

/// The end of a session, as written to the index.
#[derive(Debug, Clone)]
pub struct SessionEnd {
    pub ended_at: DateTime<Utc>,
    pub end_reason: String,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

/// The state store. Every method is one short transaction.
#[async_trait]
pub trait Store: Send + Sync {
    /// The PostgreSQL store behind this one, when it is shared by a cluster (the SIEM layer
    /// keeps its shared outbox there).
    fn postgres(&self) -> Option<&PgStore> {
        None
    }
    async fn create_grant(&self, g: NewGrant) -> Result<Grant, StateError>;
    /// All grants, newest first; with `active_at`, only those active then.
    async fn list_grants(&self, active_at: Option<DateTime<Utc>>)
        -> Result<Vec<Grant>, StateError>;
    /// A grant by id or unique id prefix.
    async fn find_grant(&self, id_or_prefix: &str) -> Result<Grant, StateError>;
    async fn revoke_grant(
        &self,
        id_or_prefix: &str,
        by: &str,
        reason: &str,
        at: DateTime<Utc>,
    ) -> Result<Grant, StateError>;
    /// The grant that best admits `person` to `target` at `at`: an active one (latest
    /// expiry) if any, else the most recent expired or revoked one, so a denial can say why.
    async fn grant_for(
        &self,
        person: &str,
        target: &str,
        at: DateTime<Utc>,
    ) -> Result<Option<Grant>, StateError>;
    /// Revocation times of the given grants, for live-session enforcement.
    async fn revocations(
        &self,
        grant_ids: &[String],
    ) -> Result<Vec<(String, DateTime<Utc>)>, StateError>;
    async fn insert_session(&self, s: &SessionRow) -> Result<(), StateError>;
    async fn finish_session(&self, id: &str, end: &SessionEnd) -> Result<(), StateError>;
    async fn list_sessions(&self, f: &SessionFilter) -> Result<Vec<SessionRow>, StateError>;
    /// A session by id or unique id prefix.
    async fn find_session(&self, id_or_prefix: &str) -> Result<Option<SessionRow>, StateError>;
    /// A session of `person` by id or an id prefix unique among that person's sessions, so a
    /// prefix says nothing about other people's sessions (not even that two share it).
    async fn find_session_of(
        &self,
        id_or_prefix: &str,
        person: &str,
    ) -> Result<Option<SessionRow>, StateError>;
    /// Sessions with no end: left by a gateway that died.
    async fn unfinished_sessions(&self) -> Result<Vec<SessionRow>, StateError>;
    /// Adds (or, for a spooled object now stored, completes) ledger entries of a session.
    async fn record_objects(
        &self,
        session_id: &str,
        entries: &[LedgerEntry],
    ) -> Result<(), StateError>;
    /// A session's ledger: chained entries in chain order, then spooled ones in the order
    /// they were spooled.
    async fn recorded_objects(&self, session_id: &str) -> Result<Vec<LedgerEntry>, StateError>;
    /// Marks a session's recording sealed (its manifest is written) or not.
    async fn set_sealed(&self, session_id: &str, sealed: bool) -> Result<(), StateError>;
    /// Ended sessions whose recording is not sealed (the store failed at the end).
    async fn unsealed_sessions(&self) -> Result<Vec<SessionRow>, StateError>;

    /// Takes or renews a node's lease. A shared store stamps `renewed_at` with its own clock
    /// and sets `expires_at` that plus the lease (`n.expires_at - n.renewed_at`), so node
    /// clocks never decide who is alive; see [`Store::now`].
    async fn heartbeat(&self, n: &NodeRow) -> Result<(), StateError>;
    /// The store's clock, which leases are judged by (SQLite: this machine's).
    async fn now(&self) -> Result<DateTime<Utc>, StateError>;
    /// Every node with a lease row, by id.
    async fn nodes(&self) -> Result<Vec<NodeRow>, StateError>;
    /// Drops a node's lease row (it stopped cleanly).
    async fn leave(&self, node_id: &str) -> Result<(), StateError>;
    /// Hands every unsealed session (live or ended) of node `from` to node `to` in one
    /// statement, so of two nodes taking over the same dead node each session goes to one;
    /// returns the sessions `to` now holds.
    async fn adopt_sessions(&self, from: &str, to: &str) -> Result<Vec<SessionRow>, StateError>;

    async fn create_request(&self, r: NewRequest) -> Result<Request, StateError>;
    /// A request by id or unique id prefix.
    async fn find_request(&self, id_or_prefix: &str) -> Result<Request, StateError>;
    /// Requests, newest first, optionally only those in one status.
    async fn list_requests(
        &self,
        status: Option<RequestStatus>,
    ) -> Result<Vec<Request>, StateError>;
    /// Records an approval in one transaction: the request must be pending and unexpired, the
    /// approver must not have approved it already; when `need` approvals are reached the grant
    /// is created (valid for the requested duration from `at`).
    async fn approve(
        &self,
        id: &str,
        approver: &str,
        need: usize,
        at: DateTime<Utc>,
    ) -> Result<Approval, StateError>;
    /// Grants a pending emergency request without approvals (the caller checked the target
    /// allows it).
    async fn self_grant(&self, id: &str, at: DateTime<Utc>) -> Result<Approval, StateError>;
    async fn deny(
        &self,
        id: &str,
        by: &str,
        reason: &str,
        at: DateTime<Utc>,
    ) -> Result<Request, StateError>;
    /// Marks pending requests whose time ran out as expired and returns them.
    async fn expire_requests(&self, at: DateTime<Utc>) -> Result<Vec<Request>, StateError>;
    async fn append_event(&self, e: &StoredEvent) -> Result<(), StateError>;
    /// Every event of one incident, oldest first.
    async fn events(&self, correlation_id: &str) -> Result<Vec<StoredEvent>, StateError>;

    /// Opens the review of a grant unless it has one; returns it and whether it is new.
    async fn open_review(&self, r: &Review) -> Result<(Review, bool), StateError>;
    /// A review by review id, grant id, correlation id or unique id prefix.
    async fn find_review(&self, id: &str) -> Result<Review, StateError>;
    /// Reviews not signed off yet, oldest due first.
    async fn open_reviews(&self) -> Result<Vec<Review>, StateError>;
    /// Signs a review off once; later attempts fail.
    async fn sign_review(
        &self,
        id: &str,
        by: &str,
        findings: &str,
        root_cause: &str,
        answers: &ReviewAnswers,
        at: DateTime<Utc>,
    ) -> Result<Review, StateError>;
    /// Marks overdue open reviews as alerted and returns those that were not yet.
    async fn take_overdue_reviews(&self, at: DateTime<Utc>) -> Result<Vec<Review>, StateError>;

    /// Stores (replacing any earlier one) the verifier of a grant's JIT credential.
    async fn put_credential(
        &self,
        grant: &Grant,
        verifier: &str,
        at: DateTime<Utc>,
    ) -> Result<(), StateError>;
    /// The verifier of a grant's JIT credential and when it stops working.
    async fn credential(
        &self,
        grant_id: &str,
    ) -> Result<Option<(String, DateTime<Utc>)>, StateError>;
    /// Records that a person's key was used (for the access review's unused-key list).
    async fn touch_key(
        &self,
        fingerprint: &str,
        person: &str,
        at: DateTime<Utc>,
    ) -> Result<(), StateError>;
    /// Last use of every key seen: (fingerprint, person, last used).
    async fn key_usage(&self) -> Result<Vec<(String, String, DateTime<Utc>)>, StateError>;

    /// Stores an API token's hash for a person until `expires_at`.
    async fn put_api_token(
        &self,
        hash: &str,
        person: &str,
        at: DateTime<Utc>,
        expires_at: DateTime<Utc>,
    ) -> Result<(), StateError>;
    /// Ends an API token or web session now (logout).
    async fn end_api_token(&self, hash: &str, at: DateTime<Utc>) -> Result<(), StateError>;
    /// The person an unexpired API token hash belongs to.
    async fn api_token_person(
        &self,
        hash: &str,
        at: DateTime<Utc>,
    ) -> Result<Option<String>, StateError>;

    /// Stores a single-use web login link's hash for a person until `expires_at`.
    async fn put_login_link(
        &self,
        hash: &str,
        person: &str,
        at: DateTime<Utc>,
        expires_at: DateTime<Utc>,
    ) -> Result<(), StateError>;
    /// Spends a login link in one transaction: it works once, before it expires.
    async fn use_login_link(&self, hash: &str, at: DateTime<Utc>) -> Result<LinkUse, StateError>;

    /// Stores the searchable text of an ended session (once; later calls are no-ops). Says
    /// whether this call stored it: of nodes racing to index one session, exactly one wins,
    /// and only the winner reports the session's findings.
    async fn index_session_text(
        &self,
        session_id: &str,
        entries: Vec<SearchEntry>,
        at: DateTime<Utc>,
    ) -> Result<bool, StateError>;
    /// Ended sessions whose text is not indexed yet, oldest first.
    async fn unindexed_sessions(&self, limit: u32) -> Result<Vec<SessionRow>, StateError>;
    /// Case-insensitive substring search over indexed commands and SQL, newest session first.
    async fn search_text(
        &self,
        needle: &str,
        f: &SessionFilter,
    ) -> Result<Vec<SearchHit>, StateError>;

    /// Stores an encrypted vault entry (`slot` is `current` or `pending`).
    async fn vault_put(
        &self,
        name: &str,
        slot: &str,
        blob: &str,
        at: DateTime<Utc>,
    ) -> Result<(), StateError>;
    /// Stores an encrypted vault entry only if the slot is empty; says whether it did (of
    /// nodes racing to create one entry, exactly one wins).
    async fn vault_put_new(
        &self,
        name: &str,
        slot: &str,
        blob: &str,
        at: DateTime<Utc>,
    ) -> Result<bool, StateError>;
    /// An encrypted vault entry.
    async fn vault_get(&self, name: &str, slot: &str) -> Result<Option<String>, StateError>;
    /// Makes `pending` the `current` entry (after the target accepted it).
    async fn vault_promote(&self, name: &str, at: DateTime<Utc>) -> Result<(), StateError>;
    /// Ended grants (expired or revoked before `at`) whose credentials were not rotated yet.
    async fn grants_to_rotate(&self, at: DateTime<Utc>) -> Result<Vec<Grant>, StateError>;
    /// Records the rotation outcome for a grant.
    async fn rotation_done(
        &self,
        grant_id: &str,
        target: &str,
        outcome: &str,
        at: DateTime<Utc>,
    ) -> Result<(), StateError>;
    /// The rotation recorded for a grant: its outcome and when.
    async fn rotation_of(
        &self,
        grant_id: &str,
    ) -> Result<Option<(String, DateTime<Utc>)>, StateError>;

    /// Records an incident report that was written.
    async fn add_incident_report(&self, r: &IncidentReportRow) -> Result<(), StateError>;
    /// The reports written for an incident, oldest first.
    async fn incident_reports(&self, incident: &str) -> Result<Vec<IncidentReportRow>, StateError>;
    /// Records the CAB review of an incident once; a second is `CabAlreadySigned`.
    async fn sign_cab(&self, c: &CabReview) -> Result<(), StateError>;
    async fn cab_review(&self, incident: &str) -> Result<Option<CabReview>, StateError>;
    /// Claims the one alert of an overdue timeline item (`rotation`, `report`, `cab`) of an
    /// incident: true for exactly one caller, however many nodes ask.
    async fn take_incident_alert(
        &self,
        incident: &str,
        item: &str,
        at: DateTime<Utc>,
    ) -> Result<bool, StateError>;
}

/// Checks a request can still be acted on.
pub(crate) fn check_pending(req: &Request, at: DateTime<Utc>) -> Result<(), StateError> {
    if req.status != RequestStatus::Pending {
        return Err(StateError::NotPending {
            id: req.id.clone(),
            status: req.status.as_str().into(),
        });
    }
    if at >= req.expires_at {
        return Err(StateError::NotPending {
            id: req.id.clone(),
            status: "expired".into(),
        });
    }
    Ok(())
}

/// Escapes `%`, `_` and `\` so user input is a literal LIKE prefix.
pub(crate) fn like_prefix(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 1);
    for c in s.chars() {
        if matches!(c, '%' | '_' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('%');
    out
}

/// The row of a grant made by hand (`create_grant`): a fresh id, not revoked.
pub(crate) fn grant_row_of(g: NewGrant) -> Grant {
    Grant {
        id: uuid::Uuid::new_v4().to_string(),
        person: g.person,
        target: g.target,
        reason: g.reason,
        incident_id: g.incident_id,
        created_by: g.created_by,
        created_at: g.created_at,
        expires_at: g.expires_at,
        revoked_at: None,
        revoked_by: None,
        revoke_reason: None,
        request_id: None,
        review_required: false,
    }
}

/// The grant a request gets once it has what it needs.
pub(crate) fn grant_of_request(req: &Request, created_by: &str, at: DateTime<Utc>) -> Grant {
    Grant {
        id: uuid::Uuid::new_v4().to_string(),
        person: req.person.clone(),
        target: req.target.clone(),
        reason: req.justification.clone(),
        incident_id: req.incident_id.clone(),
        created_by: created_by.to_string(),
        created_at: at,
        expires_at: at
            + chrono::Duration::from_std(req.duration)
                .unwrap_or_else(|_| chrono::Duration::hours(4)),
        revoked_at: None,
        revoked_by: None,
        revoke_reason: None,
        request_id: Some(req.id.clone()),
        review_required: req.emergency,
    }
}

/// The row of a new request: a fresh `R-` id, pending, no approvals.
pub(crate) fn request_row_of(r: NewRequest) -> Request {
    Request {
        id: format!("R-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]),
        person: r.person,
        target: r.target,
        justification: r.justification,
        incident_id: r.incident_id,
        severity: r.severity,
        scenario: r.scenario,
        duration: r.duration,
        created_at: r.created_at,
        expires_at: r.expires_at,
        status: RequestStatus::Pending,
        decided_at: None,
        decided_by: None,
        decision_reason: None,
        grant_id: None,
        emergency: r.emergency,
        approvals: Vec::new(),
    }
}
