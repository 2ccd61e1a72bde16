//! The evidence API behind the web UI: the session list and page (metadata, grant, approvals,
//! review, integrity), channel replays as asciicast, PostgreSQL statement timelines, search
//! over commands and SQL, and post-incident reviews. Every look at a recording is itself an
//! audit event (`recording_viewed` / `recording_exported` / `recording_searched`): who watched or
//! searched for what, and when.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::api::{act_as, parsed_command, who, ApiError, Who};
use crate::clock;
use crate::record::export::{self, Loaded};
use crate::record::ChannelKind;
use crate::services::Gateway;
use crate::siem::{AccessEvent, Action};
use crate::state::{ReviewFilter, SearchEntry, SessionFilter, SessionRow, StateError};

/// Sessions indexed for search per request, so one search never stalls on a huge backlog.
const INDEX_BATCH: u32 = 200;

/// The longest search text, in characters: it goes into the `recording_searched` event.
const MAX_QUERY_CHARS: usize = 1000;

/// The most sessions one page lists.
const MAX_PER_PAGE: u32 = 200;

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, msg.into())
}

fn state_err(e: StateError) -> ApiError {
    match e {
        StateError::Ambiguous(_) => bad(e.to_string()),
        StateError::NoSuchReview(_) => ApiError(StatusCode::NOT_FOUND, e.to_string()),
        _ => ApiError::internal(e),
    }
}

/// A moment from a query parameter (see `clock::parse_when`).
pub(crate) fn when(key: &str, s: &str) -> Result<DateTime<Utc>, ApiError> {
    clock::parse_when(s).map_err(|e| bad(format!("{key}: {e}")))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    person: Option<String>,
    target: Option<String>,
    protocol: Option<String>,
    since: Option<String>,
    until: Option<String>,
    incident: Option<String>,
    /// none | open | overdue | signed
    review: Option<String>,
    page: Option<u32>,
    per_page: Option<u32>,
    /// Search only: the text to find.
    q: Option<String>,
}

fn nonempty(o: &Option<String>) -> Option<String> {
    o.as_ref()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// The filter a query asks for, narrowed to what the person may see.
fn filter(w: &Who, q: &ListQuery) -> Result<SessionFilter, ApiError> {
    let mut f = SessionFilter {
        person: nonempty(&q.person),
        target: nonempty(&q.target),
        protocol: nonempty(&q.protocol),
        incident: nonempty(&q.incident),
        since: nonempty(&q.since).map(|s| when("since", &s)).transpose()?,
        until: nonempty(&q.until).map(|s| when("until", &s)).transpose()?,
        review: match nonempty(&q.review).as_deref() {
            None => None,
            Some("none") => Some(ReviewFilter::None),
            Some("open") => Some(ReviewFilter::Open),
            Some("overdue") => Some(ReviewFilter::Overdue(clock::now())),
            Some("signed") => Some(ReviewFilter::Signed),
            Some(other) => {
                return Err(bad(format!(
                    "review: `{other}` is not one of none, open, overdue, signed"
                )))
            }
        },
        ..Default::default()
    };
    if let Some(p) = &f.protocol {
        if p != "ssh" && p != "postgres" {
            return Err(bad(format!("protocol: `{p}` is not ssh or postgres")));
        }
    }
    if !w.sees_all_sessions() {
        match &f.person {
            Some(p) if p != &w.person => {
                return Err(ApiError(
                    StatusCode::FORBIDDEN,
                    format!(
                    "{} may see only their own sessions (reviewers, auditors and admins see all)",
                    w.person
                ),
                ))
            }
            _ => f.person = Some(w.person.clone()),
        }
    }
    Ok(f)
}

fn row_json(r: &SessionRow) -> Value {
    json!({
        "id": r.id, "protocol": r.protocol, "person": r.person, "target": r.target,
        "grant_id": r.grant_id, "client_addr": r.client_addr,
        "started_at": clock::rfc3339(r.started_at), "deadline": clock::rfc3339(r.deadline),
        "ended_at": r.ended_at.map(clock::rfc3339), "end_reason": r.end_reason,
        "bytes_in": r.bytes_in, "bytes_out": r.bytes_out, "recording": r.recording_prefix,
    })
}

async fn list_sessions(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    Query(q): Query<ListQuery>,
) -> Result<Response, ApiError> {
    let w = who(&gw, &headers).await?;
    let mut f = filter(&w, &q)?;
    let per_page = q.per_page.unwrap_or(50).clamp(1, MAX_PER_PAGE);
    let page = q.page.unwrap_or(1).max(1);
    // One extra row tells whether there is a next page.
    f.limit = Some(per_page + 1);
    f.offset = Some((page - 1).saturating_mul(per_page));
    let mut rows = gw.store.list_sessions(&f).await.map_err(state_err)?;
    let has_more = rows.len() > per_page as usize;
    rows.truncate(per_page as usize);
    let mut items = Vec::with_capacity(rows.len());
    for r in &rows {
        let mut v = row_json(r);
        let (incident, review) = grant_context(&gw, r).await;
        v["incident_id"] = json!(incident);
        v["review"] = review;
        items.push(v);
    }
    Ok(
        Json(
            json!({ "sessions": items, "page": page, "per_page": per_page, "has_more": has_more }),
        )
        .into_response(),
    )
}

/// The findings of one grant's ended sessions, most serious first.
async fn grant_findings(
    gw: &Gateway,
    grant_id: &str,
) -> Result<Vec<crate::findings::Finding>, ApiError> {
    let Ok(g) = gw.store.find_grant(grant_id).await else {
        return Ok(Vec::new());
    };
    let f = SessionFilter {
        incident: Some(g.incident_id.clone()),
        ..Default::default()
    };
    let ours: Vec<String> = gw
        .store
        .list_sessions(&f)
        .await
        .map_err(state_err)?
        .into_iter()
        .filter(|s| s.grant_id == g.id)
        .map(|s| s.id)
        .collect();
    let mut found: Vec<crate::findings::Finding> =
        crate::findings::of_filter(gw.store.as_ref(), &gw.config, &f)
            .await
            .map_err(state_err)?
            .into_iter()
            .filter(|x| ours.contains(&x.session_id))
            .collect();
    found.sort_by_key(|f| std::cmp::Reverse(f.severity));
    Ok(found)
}

/// The incident id and review state of a session's grant.
async fn grant_context(gw: &Gateway, r: &SessionRow) -> (Option<String>, Value) {
    let incident = gw
        .store
        .find_grant(&r.grant_id)
        .await
        .ok()
        .map(|g| g.incident_id);
    let review = match gw.store.find_review(&r.grant_id).await {
        Ok(v) => review_json(&v),
        Err(_) => Value::Null,
    };
    (incident, review)
}

fn review_json(r: &crate::state::Review) -> Value {
    let now = clock::now();
    json!({
        "id": r.id, "correlation_id": r.correlation_id, "grant_id": r.grant_id,
        "person": r.person, "target": r.target, "scenario": r.scenario, "emergency": r.emergency,
        "approvers": r.approvers, "opened_at": clock::rfc3339(r.opened_at),
        "due_at": clock::rfc3339(r.due_at), "signed_by": r.signed_by,
        "signed_at": r.signed_at.map(clock::rfc3339), "findings": r.findings,
        "root_cause": r.root_cause, "answers": r.answers,
        "state": if r.signed_at.is_some() { "signed" } else if r.due_at <= now { "overdue" } else { "open" },
    })
}

/// The answer to a session id that names nothing the caller may see: the same status and
/// body whether no session matches or the session is someone else's, and without the id, so
/// neither an id nor a prefix tells a stranger that a session exists.
fn no_such_session() -> ApiError {
    ApiError(
        StatusCode::NOT_FOUND,
        "no session you may see matches this id".into(),
    )
}

/// The session a person asked for, if they may see it. People who see only their own
/// sessions resolve the id among their own, so an ambiguous prefix says nothing either.
async fn visible_session(gw: &Gateway, w: &Who, id: &str) -> Result<SessionRow, ApiError> {
    let found = if w.sees_all_sessions() {
        gw.store.find_session(id).await
    } else {
        gw.store.find_session_of(id, &w.person).await
    };
    match found {
        Ok(Some(row)) if w.sees_all_sessions() || row.person == w.person => Ok(row),
        Ok(_) => Err(no_such_session()),
        Err(e) => Err(state_err(e)),
    }
}

/// Records that someone looked at (or took away) a recording.
async fn audit_view(
    gw: &Gateway,
    w: &Who,
    row: &SessionRow,
    action: Action,
    what: String,
) -> Result<(), ApiError> {
    let e = crate::siem::recording_access(gw.store.as_ref(), action, &w.person, row, &what).await;
    audit_or_refuse(gw, &e).await
}

/// Spools an audit event of a look at evidence. No view without its audit record: if the
/// event cannot be spooled, the view fails.
async fn audit_or_refuse(gw: &Gateway, e: &AccessEvent) -> Result<(), ApiError> {
    let what = match e.action {
        Action::RecordingSearched => "search",
        _ => "view",
    };
    gw.audit(e).await.map_err(|err| {
        tracing::error!(error = %err, action = e.action.as_str(), "evidence not served: its audit event could not be spooled");
        ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not served: the audit record of this {what} could not be written ({err})"),
        )
    })
}

async fn load(gw: &Gateway, row: &SessionRow) -> Result<Loaded, ApiError> {
    load_some(gw, row, export::Select::ALL).await
}

async fn load_some(
    gw: &Gateway,
    row: &SessionRow,
    select: export::Select,
) -> Result<Loaded, ApiError> {
    export::load_some(&gw.recordings, &row.recording_prefix, select)
        .await
        .map_err(|e| ApiError(StatusCode::BAD_GATEWAY, format!("recording store: {e}")))
}

fn is_pg_kind(k: &Option<ChannelKind>) -> bool {
    matches!(k, Some(ChannelKind::Postgres { .. }))
}

async fn session_page(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let w = who(&gw, &headers).await?;
    let row = visible_session(&gw, &w, &id).await?;
    audit_view(
        &gw,
        &w,
        &row,
        Action::RecordingViewed,
        "viewed the session page".into(),
    )
    .await?;
    // The page needs the metadata, each channel's kind and the statements: a bounded part of
    // each channel, never a multi-gigabyte recording in memory.
    let loaded = load_some(&gw, &row, PAGE_SELECT).await?;
    let grant = gw.store.find_grant(&row.grant_id).await.ok();
    let request = match grant.as_ref().and_then(|g| g.request_id.clone()) {
        Some(rid) => gw.store.find_request(&rid).await.ok(),
        None => None,
    };
    let review = gw.store.find_review(&row.grant_id).await.ok();
    // Only trusted keys (pinned in the config, or certified by one): never the key files found.
    let verdict = match gw.config.signing.trust(&gw.config.keys_dir) {
        Ok(trust) => crate::verify::verify_session(
            &gw.recordings,
            &row.recording_prefix,
            &trust.keys(),
            None,
        )
        .await
        .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    let integrity = match verdict {
        Ok(v) => json!({
            "verdict": v.label(),
            "summary": v.summary(),
        }),
        Err(e) => json!({ "verdict": "error", "summary": e }),
    };
    let channels: Vec<Value> = match &loaded.meta {
        Some(m) => m
            .channels
            .iter()
            .map(|c| {
                json!({
                    "channel": c.channel, "kind": c.kind, "pty": c.pty, "format": c.format,
                    "postgres": is_pg_kind(&c.kind), "started_at": c.started_at,
                    "exit_status": c.exit_status, "exit_signal": c.exit_signal,
                    "bytes_in": c.bytes_in, "bytes_out": c.bytes_out,
                    "commands": c.commands, "transfers": c.transfers, "notes": c.notes,
                })
            })
            .collect(),
        // Not sealed (the gateway died, or the session is live): what the store holds.
        None => loaded
            .channels
            .iter()
            .map(|(ch, d)| {
                json!({
                    "channel": ch, "kind": Value::Null, "pty": Value::Null,
                    "format": match d.format { export::Format::Cast => "cast", export::Format::Raw => "raw" },
                    "postgres": export::is_postgres(d), "commands": [], "transfers": [], "notes": ["not sealed"],
                })
            })
            .collect(),
    };
    let incident = grant.as_ref().map(|g| g.incident_id.clone());
    // Where to look first: the audit findings, most serious first (ended sessions only).
    let mut findings = if row.ended_at.is_some() {
        crate::findings::of_indexed(
            gw.store.as_ref(),
            &gw.config,
            &row,
            &search_entries(&loaded),
        )
        .await
        .map_err(state_err)?
    } else {
        Vec::new()
    };
    findings.sort_by_key(|f| std::cmp::Reverse(f.severity));
    Ok(Json(json!({
        "audit_findings": findings,
        "session": row_json(&row),
        "incident_id": incident,
        "sealed": loaded.meta.is_some(),
        "meta": loaded.meta.as_ref().map(|m| json!({
            "session": m.session, "end": m.end, "markers": m.markers, "chain_head": m.chain_head,
            "recovered": m.recovered, "objects": m.objects.len(),
        })),
        "grant": grant.map(|g| json!({
            "id": g.id, "person": g.person, "target": g.target, "reason": g.reason,
            "incident_id": g.incident_id, "created_by": g.created_by,
            "created_at": clock::rfc3339(g.created_at), "expires_at": clock::rfc3339(g.expires_at),
            "revoked_at": g.revoked_at.map(clock::rfc3339), "revoked_by": g.revoked_by,
            "revoke_reason": g.revoke_reason, "request_id": g.request_id,
            "emergency": g.review_required,
        })),
        "request": request.map(|r| json!({
            "id": r.id, "person": r.person, "justification": r.justification,
            "incident_id": r.incident_id, "severity": r.severity, "scenario": r.scenario,
            "created_at": clock::rfc3339(r.created_at), "status": r.status.as_str(),
            "emergency": r.emergency,
            "approvals": r.approvals.iter().map(|(a, t)| json!({"approver": a, "at": clock::rfc3339(*t)})).collect::<Vec<_>>(),
        })),
        "review": review.as_ref().map(review_json),
        "integrity": integrity,
        "channels": channels,
    }))
    .into_response())
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct CastQuery {
    /// Set to download the file (an export) rather than play it.
    download: Option<bool>,
}

async fn channel_cast(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    Path((id, ch)): Path<(String, u32)>,
    Query(q): Query<CastQuery>,
) -> Result<Response, ApiError> {
    let w = who(&gw, &headers).await?;
    let row = visible_session(&gw, &w, &id).await?;
    let download = q.download.unwrap_or(false);
    let (action, what) = if download {
        (
            Action::RecordingExported,
            format!("downloaded channel {ch}"),
        )
    } else {
        (Action::RecordingViewed, format!("replayed channel {ch}"))
    };
    audit_view(&gw, &w, &row, action, what).await?;
    let loaded = load(&gw, &row).await?;
    let (ch, data) = loaded
        .pick(Some(ch))
        .map_err(|e| ApiError(StatusCode::NOT_FOUND, e.to_string()))?;
    let body = if export::is_postgres(data) {
        crate::pg::log::sql_jsonl(ch, data, &row.id)
    } else {
        export::to_asciicast(ch, data)
    }
    .map_err(|e| ApiError(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()))?;
    let mut resp = ([(header::CONTENT_TYPE, "application/x-asciicast")], body).into_response();
    if download {
        let ext = if export::is_postgres(data) {
            "sql.jsonl"
        } else {
            "cast"
        };
        if let Ok(v) = format!("attachment; filename=\"{}-ch{ch}.{ext}\"", row.id).parse() {
            resp.headers_mut().insert(header::CONTENT_DISPOSITION, v);
        }
    }
    Ok(resp)
}

async fn channel_sql(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    Path((id, ch)): Path<(String, u32)>,
) -> Result<Response, ApiError> {
    let w = who(&gw, &headers).await?;
    let row = visible_session(&gw, &w, &id).await?;
    audit_view(
        &gw,
        &w,
        &row,
        Action::RecordingViewed,
        format!("read the SQL timeline of channel {ch}"),
    )
    .await?;
    let loaded = load(&gw, &row).await?;
    let (ch, data) = loaded
        .pick(Some(ch))
        .map_err(|e| ApiError(StatusCode::NOT_FOUND, e.to_string()))?;
    if !export::is_postgres(data) {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("channel {ch} is not a PostgreSQL session"),
        ));
    }
    let jsonl = crate::pg::log::sql_jsonl(ch, data, &row.id)
        .map_err(|e| ApiError(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()))?;
    let events: Vec<Value> = jsonl
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    Ok(Json(json!({ "session_id": row.id, "channel": ch, "events": events })).into_response())
}

/// The searchable lines of a loaded recording: commands from the metadata, SQL from the
/// PostgreSQL channels. Blank commands and empty statements are not indexed.
pub fn search_entries(loaded: &Loaded) -> Vec<SearchEntry> {
    let mut out = Vec::new();
    if let Some(m) = &loaded.meta {
        for c in &m.channels {
            for cmd in c.commands.iter().filter(|c| !c.text.trim().is_empty()) {
                out.push(SearchEntry {
                    channel: c.channel,
                    time: cmd.time,
                    kind: "command".into(),
                    text: cmd.text.clone(),
                });
            }
            if let Some(ChannelKind::Exec { command }) = &c.kind {
                out.push(SearchEntry {
                    channel: c.channel,
                    time: 0.0,
                    kind: "command".into(),
                    text: command.clone(),
                });
            }
        }
    }
    for (ch, data) in &loaded.channels {
        if !export::is_postgres(data) {
            continue;
        }
        let Ok(jsonl) = crate::pg::log::sql_jsonl(*ch, data, "") else {
            continue;
        };
        for e in jsonl
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        {
            if let (Some(sql), Some(t)) = (e["sql"].as_str(), e["time"].as_f64()) {
                // An empty statement (`;`, white space, comments only) says nothing to find.
                if matches!(e["event"].as_str(), Some("query" | "parse"))
                    && !crate::pg::redact::is_blank(sql.as_bytes())
                {
                    out.push(SearchEntry {
                        channel: *ch,
                        time: t,
                        kind: "sql".into(),
                        text: sql.to_string(),
                    });
                }
            }
        }
    }
    out
}

/// Indexes ended sessions that are not indexed yet (a batch per call); the findings of the
/// sessions this call indexed (and no other indexer did) go to the SIEM.
pub async fn index_pending(gw: &Gateway) -> Result<usize, StateError> {
    let done = index_pending_in(gw.store.as_ref(), &gw.recordings).await?;
    let n = done.len();
    for (row, entries) in done {
        for f in crate::findings::of_indexed(gw.store.as_ref(), &gw.config, &row, &entries).await? {
            if let Err(e) = gw.audit(&crate::siem::finding_event(&f)).await {
                tracing::error!(session_id = %row.id, error = %e, "finding not written to the SIEM");
            }
        }
    }
    Ok(n)
}

/// Indexes ended sessions every 2 s, so that their findings reach the SIEM soon after they
/// end (a finding's event id is derived from it: a second indexing node repeats the id).
pub async fn indexer(gw: Arc<Gateway>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(2));
    loop {
        tick.tick().await;
        if let Err(e) = index_pending(&gw).await {
            tracing::warn!(error = %e, "session indexing failed; retried");
        }
    }
}

/// What indexing reads of a recording: the session metadata (commands) and PostgreSQL
/// channels (statements), each up to 64 MiB, never terminal output; a session of gigabytes is
/// indexed in bounded memory.
const INDEX_SELECT: export::Select = export::Select {
    terminal: false,
    other_raw: false,
    max_channel_bytes: 64 << 20,
};

/// What the session page reads: like [`INDEX_SELECT`], and terminal channels too (an unsealed
/// session lists what the store holds), each up to 64 MiB.
const PAGE_SELECT: export::Select = export::Select {
    terminal: true,
    other_raw: true,
    max_channel_bytes: 64 << 20,
};

/// [`index_pending`] on a store and a recording store (the CLI has no gateway).
pub async fn index_pending_in(
    store: &dyn crate::state::Store,
    recordings: &crate::storage::RecordingStore,
) -> Result<Vec<(crate::state::SessionRow, Vec<SearchEntry>)>, StateError> {
    let rows = store.unindexed_sessions(INDEX_BATCH).await?;
    let mut n = Vec::new();
    for r in rows {
        match export::load_some(recordings, &r.recording_prefix, INDEX_SELECT).await {
            Ok(loaded) => {
                if !loaded.cut.is_empty() {
                    tracing::warn!(
                        session_id = %r.id,
                        channels = ?loaded.cut,
                        "search indexes the first {} MiB of each PostgreSQL channel; the rest of these is not searchable",
                        INDEX_SELECT.max_channel_bytes >> 20
                    );
                }
                let entries = search_entries(&loaded);
                if store
                    .index_session_text(&r.id, entries.clone(), clock::now())
                    .await?
                {
                    n.push((r, entries));
                }
            }
            // Left for the next search: the store may be back by then.
            Err(e) => {
                tracing::warn!(session_id = %r.id, error = %e, "cannot index session for search")
            }
        }
    }
    Ok(n)
}

async fn search(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    Query(q): Query<ListQuery>,
) -> Result<Response, ApiError> {
    let w = who(&gw, &headers).await?;
    let needle = nonempty(&q.q).ok_or_else(|| bad("q: give the text to search for"))?;
    if needle.chars().count() > MAX_QUERY_CHARS {
        return Err(bad(format!(
            "q: at most {MAX_QUERY_CHARS} characters can be searched for"
        )));
    }
    if needle.chars().any(char::is_control) {
        return Err(bad("q: control characters cannot be searched for"));
    }
    let mut f = filter(&w, &q)?;
    f.limit = Some(q.per_page.unwrap_or(100).clamp(1, 500));
    index_pending(&gw).await.map_err(state_err)?;
    let hits = gw.store.search_text(&needle, &f).await.map_err(state_err)?;
    // The search is itself on the record before anything is served.
    let mut session_ids: Vec<String> = Vec::new();
    for h in &hits {
        if !session_ids.contains(&h.session.id) {
            session_ids.push(h.session.id.clone());
        }
    }
    let narrowed: Vec<String> = [
        ("person", &f.person),
        ("target", &f.target),
        ("protocol", &f.protocol),
        ("incident", &f.incident),
    ]
    .into_iter()
    .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={v}")))
    .chain(f.since.map(|t| format!("since={}", clock::rfc3339(t))))
    .chain(f.until.map(|t| format!("until={}", clock::rfc3339(t))))
    .collect();
    let mut e =
        crate::siem::recording_search(&w.person, &needle, &narrowed, hits.len(), session_ids);
    // The schema needs one protocol: the filter's, else the default (`ssh`).
    if let Some(p) = &f.protocol {
        e.protocol = p.clone();
    }
    audit_or_refuse(&gw, &e).await?;
    let items: Vec<Value> = hits
        .iter()
        .map(|h| {
            json!({
                "session_id": h.session.id, "person": h.session.person, "target": h.session.target,
                "protocol": h.session.protocol, "started_at": clock::rfc3339(h.session.started_at),
                "channel": h.entry.channel, "time": h.entry.time, "kind": h.entry.kind,
                "text": h.entry.text,
                "at": clock::rfc3339(h.session.started_at + chrono::Duration::milliseconds((h.entry.time * 1000.0) as i64)),
            })
        })
        .collect();
    Ok(Json(json!({ "q": needle, "hits": items })).into_response())
}

async fn list_reviews(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let w = who(&gw, &headers).await?;
    let reviews = gw.store.open_reviews().await.map_err(state_err)?;
    let mut items: Vec<Value> = Vec::new();
    for r in reviews
        .iter()
        .filter(|r| w.sees_all_sessions() || r.person == w.person)
    {
        let mut v = review_json(r);
        v["you_may_sign"] = json!(
            (w.has("reviewer") || w.has("admin"))
                && !w.has("auditor")
                && (gw.config.reviews.reviewer_may_be_participant
                    || (r.person != w.person && !r.approvers.contains(&w.person)))
        );
        // Where to look first: the findings of this grant's sessions.
        v["audit_findings"] = json!(grant_findings(&gw, &r.grant_id).await?);
        items.push(v);
    }
    Ok(Json(json!({ "reviews": items })).into_response())
}

/// The incident report as one HTML page (the same page `breakglass incident-report` signs),
/// for reviewers, auditors and admins. Looking at it is an audit event.
async fn incident_report(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let w = who(&gw, &headers).await?;
    if !w.sees_all_sessions() {
        return Err(ApiError(
            StatusCode::FORBIDDEN,
            format!(
                "{} may not see incident reports (reviewers, auditors and admins may)",
                w.person
            ),
        ));
    }
    crate::text::check("incident", &id, crate::text::Lines::One).map_err(bad)?;
    let keys = gw
        .config
        .signing
        .trust(&gw.config.keys_dir)
        .map(|t| t.keys())
        .map_err(|e| {
            ApiError(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("the trusted signing keys cannot be read: {e}"),
            )
        })?;
    let report = crate::incident::gather(
        gw.store.as_ref(),
        &gw.recordings,
        &gw.config,
        &keys,
        &gw.core.siem,
        crate::incident::Ask {
            incident: &id,
            by: &w.person,
            writing: false,
        },
    )
    .await
    .map_err(|e| match e {
        crate::incident::ReportError::NoSuchIncident(_) => {
            ApiError(StatusCode::NOT_FOUND, e.to_string())
        }
        e => ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    })?;
    let mut e = AccessEvent::new(Action::RecordingViewed, &w.person);
    e.incident_id = Some(id.clone());
    e.message = Some(format!(
        "{} viewed the incident report of {id} ({} sessions)",
        w.person,
        report.sessions.len()
    ));
    audit_or_refuse(&gw, &e).await?;
    Ok((
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; style-src 'unsafe-inline'",
            ),
        ],
        crate::incident::render(&report),
    )
        .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CabBody {
    outcome: Option<String>,
    notes: Option<String>,
}

async fn sign_cab(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Json(b): Json<CabBody>,
) -> Result<Response, ApiError> {
    let w = who(&gw, &headers).await?;
    act_as(
        &gw,
        &w,
        &headers,
        parsed_command(
            "cab",
            vec![id],
            vec![("outcome", b.outcome), ("notes", b.notes)],
        ),
    )
    .await
}

/// A yes/no answer: JSON `true`/`false`, or the text `yes`/`no` (what the web form sends).
#[derive(Deserialize)]
#[serde(untagged)]
enum YesNo {
    Bool(bool),
    Text(String),
}

impl YesNo {
    fn text(self) -> String {
        match self {
            YesNo::Bool(true) => "yes".into(),
            YesNo::Bool(false) => "no".into(),
            YesNo::Text(t) => t,
        }
    }
}

/// The sign-off: the answers to the review's questions (`review::QUESTIONS`); a missing one
/// is refused by name.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SignBody {
    findings: Option<String>,
    thresholds_met: Option<YesNo>,
    thresholds_note: Option<String>,
    escalation_possible: Option<YesNo>,
    escalation_note: Option<String>,
    root_cause: Option<String>,
    actions_taken: Option<String>,
    procedure_update: Option<YesNo>,
    procedure_change: Option<String>,
}

async fn sign_review(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Json(b): Json<SignBody>,
) -> Result<Response, ApiError> {
    let w = who(&gw, &headers).await?;
    act_as(
        &gw,
        &w,
        &headers,
        parsed_command(
            "review",
            vec![id],
            vec![
                ("findings", b.findings),
                ("thresholds-met", b.thresholds_met.map(YesNo::text)),
                ("thresholds-note", b.thresholds_note),
                (
                    "escalation-possible",
                    b.escalation_possible.map(YesNo::text),
                ),
                ("escalation-note", b.escalation_note),
                ("root-cause", b.root_cause),
                ("actions-taken", b.actions_taken),
                ("procedure-update", b.procedure_update.map(YesNo::text)),
                ("procedure-change", b.procedure_change),
            ],
        ),
    )
    .await
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ReportQuery {
    since: Option<String>,
    until: Option<String>,
    period: Option<String>,
    format: Option<String>,
}

/// The range a report or export covers: `since` (default 90 days ago) to `until` (now).
fn range(q: &ReportQuery) -> Result<(DateTime<Utc>, DateTime<Utc>), ApiError> {
    let since = when("since", nonempty(&q.since).as_deref().unwrap_or("90d"))?;
    let until = match nonempty(&q.until) {
        Some(u) => when("until", &u)?,
        None => clock::now(),
    };
    if until <= since {
        return Err(bad("until must be after since"));
    }
    Ok((since, until))
}

async fn report(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    Query(q): Query<ReportQuery>,
) -> Result<Response, ApiError> {
    let w = who(&gw, &headers).await?;
    if !w.sees_all_sessions() && !w.has("approver") {
        return Err(ApiError(
            StatusCode::FORBIDDEN,
            format!(
                "{} may not see reports (reviewers, auditors and admins may)",
                w.person
            ),
        ));
    }
    let (since, until) = range(&q)?;
    let period: crate::report::Period = nonempty(&q.period)
        .as_deref()
        .unwrap_or("week")
        .parse()
        .map_err(|e: String| bad(format!("period: {e}")))?;
    period.check_range(since, until).map_err(bad)?;
    let r = crate::report::compute(gw.store.as_ref(), &gw.config, since, until, period)
        .await
        .map_err(state_err)?;
    Ok(Json(r).into_response())
}

async fn audit_export(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    Query(q): Query<ReportQuery>,
) -> Result<Response, ApiError> {
    use crate::audit_export::{self, ExportFormat};
    let w = who(&gw, &headers).await?;
    if !(w.has("auditor") || w.has("admin")) {
        return Err(ApiError(
            StatusCode::FORBIDDEN,
            format!(
                "{} may not export session metadata (auditors and admins may)",
                w.person
            ),
        ));
    }
    let (since, until) = range(&q)?;
    let format = match nonempty(&q.format).as_deref().unwrap_or("json") {
        "json" => ExportFormat::Json,
        "csv" => ExportFormat::Csv,
        other => return Err(bad(format!("format: `{other}` is not json or csv"))),
    };
    let b = audit_export::build(
        gw.store.as_ref(),
        &gw.signer,
        since,
        until,
        format,
        &w.person,
    )
    .await
    .map_err(ApiError::internal)?;
    // Auditing the auditors: no export leaves without its audit event.
    let mut e = AccessEvent::new(Action::MetadataExported, &w.person);
    e.message = Some(format!(
        "{} exported the metadata of {} sessions from {} to {} ({}) from the web UI",
        w.person,
        b.rows,
        clock::rfc3339(since),
        clock::rfc3339(until),
        format.as_str()
    ));
    gw.audit(&e).await.map_err(ApiError::internal)?;
    Ok(Json(json!({
        "file_name": b.file_name,
        "content": b.content,
        "manifest": b.manifest,
        "manifest_text": String::from_utf8_lossy(&b.manifest_bytes),
        "signature": b.signature,
    }))
    .into_response())
}

/// The evidence routes.
pub fn router(gw: Arc<Gateway>) -> Router {
    Router::new()
        .route("/api/v1/sessions", get(list_sessions))
        .route("/api/v1/sessions/{id}", get(session_page))
        .route(
            "/api/v1/sessions/{id}/channels/{ch}/cast",
            get(channel_cast),
        )
        .route("/api/v1/sessions/{id}/channels/{ch}/sql", get(channel_sql))
        .route("/api/v1/search", get(search))
        .route("/api/v1/reviews", get(list_reviews))
        .route("/api/v1/reviews/{id}/sign", post(sign_review))
        .route("/api/v1/incidents/{id}/report", get(incident_report))
        .route("/api/v1/incidents/{id}/cab", post(sign_cab))
        .route("/api/v1/reports", get(report))
        .route("/api/v1/audit-export", get(audit_export))
        .with_state(gw)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::raw::{encode_frame, encode_header, RawHeader};
    use crate::record::Stream;

    /// A loaded PostgreSQL channel whose client sent each of `queries` as a simple Query.
    fn pg_channel(queries: &[&str]) -> Loaded {
        let mut bytes = encode_header(&RawHeader {
            session_id: "s-1".into(),
            channel: 0,
            kind: ChannelKind::Postgres {
                database: "d".into(),
                role: "r".into(),
            },
        });
        for (i, q) in queries.iter().enumerate() {
            let mut body = q.as_bytes().to_vec();
            body.push(0);
            encode_frame(
                &mut bytes,
                Stream::In,
                std::time::Duration::from_millis(i as u64),
                &crate::pg::wire::message(b'Q', &body),
            );
        }
        Loaded {
            meta: None,
            channels: [(
                0,
                export::ChannelData {
                    format: export::Format::Raw,
                    bytes,
                    chunks: 1,
                },
            )]
            .into_iter()
            .collect(),
            cut: Default::default(),
        }
    }

    #[test]
    fn empty_statements_are_not_indexed() {
        let loaded = pg_channel(&[
            ";",
            "  \n\t ",
            "-- only a comment",
            "/* a block */ ; ;",
            "select 1",
            "-- a note\nselect 2",
        ]);
        let texts: Vec<String> = search_entries(&loaded)
            .into_iter()
            .map(|e| e.text)
            .collect();
        assert_eq!(texts, ["select 1", "-- a note\nselect 2"]);
    }
}
