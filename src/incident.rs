//! An incident after the fact: the seed procedure's timeline (credentials rotated within
//! `limits.rotation_window` of the resolution, the incident report within
//! `[incidents] report_within`, the CAB review within `cab_within`), the incident report (one
//! self-contained HTML file next to a signed manifest, like `audit-export`), and the change
//! advisory board's sign-off (immutable, kept with the evidence, in the SIEM).
//!
//! An incident is every grant whose incident id it is. It is resolved once its last grant
//! ended (expired or revoked) and every session of it ended; the timeline runs from then.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::clock;
use crate::findings::Finding;
use crate::record::{SessionMeta, TransferMeta};
use crate::session::Core;
use crate::siem::{AccessEvent, Action, Outcome, SinkStats};
use crate::signing::PublicKey;
use crate::state::{
    CabReview, Grant, IncidentReportRow, Request, Review, SearchEntry, SessionFilter, SessionRow,
    StateError, Store,
};
use crate::storage::{key, RecordingStore};

/// The limits of the timeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub rotation: Duration,
    pub report: Duration,
    pub cab: Duration,
}

impl Limits {
    pub fn of(cfg: &crate::config::Config) -> Limits {
        Limits {
            rotation: cfg.limits.rotation_window,
            report: cfg.incidents.report_within,
            cab: cfg.incidents.cab_within,
        }
    }
}

/// Where a timeline item stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ItemState {
    /// Done within its limit.
    Met,
    /// Not done, and its limit has not passed (or the incident is not resolved yet).
    Pending,
    /// Done late, or not done and past its limit.
    Overdue,
}

impl ItemState {
    pub fn as_str(self) -> &'static str {
        match self {
            ItemState::Met => "met",
            ItemState::Pending => "pending",
            ItemState::Overdue => "overdue",
        }
    }
}

/// One item of the timeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Item {
    /// `rotation`, `report` or `cab`.
    pub item: &'static str,
    pub what: &'static str,
    #[serde(skip)]
    pub limit: Duration,
    pub due_at: Option<DateTime<Utc>>,
    pub done_at: Option<DateTime<Utc>>,
    pub state: ItemState,
}

/// A recorded rotation: its outcome and when.
pub type Rotation = (String, DateTime<Utc>);

/// What the timeline of an incident is judged from (cheap: no recording is read).
#[derive(Debug, Clone)]
pub struct Facts {
    pub incident: String,
    pub grants: Vec<Grant>,
    pub sessions: Vec<SessionRow>,
    /// Each grant's rotation: its outcome and when, if one was recorded.
    pub rotations: Vec<(String, Option<Rotation>)>,
    pub reports: Vec<IncidentReportRow>,
    pub cab: Option<CabReview>,
}

/// The grants of an incident, oldest first.
async fn grants_of(store: &dyn Store, incident: &str) -> Result<Vec<Grant>, StateError> {
    let mut g: Vec<Grant> = store
        .list_grants(None)
        .await?
        .into_iter()
        .filter(|g| g.incident_id == incident)
        .collect();
    g.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
    Ok(g)
}

/// Reads what an incident's timeline needs.
pub async fn facts(store: &dyn Store, incident: &str) -> Result<Facts, StateError> {
    let grants = grants_of(store, incident).await?;
    let mut sessions = store
        .list_sessions(&SessionFilter {
            incident: Some(incident.to_string()),
            ..Default::default()
        })
        .await?;
    sessions.sort_by(|a, b| (a.started_at, &a.id).cmp(&(b.started_at, &b.id)));
    let mut rotations = Vec::with_capacity(grants.len());
    for g in &grants {
        rotations.push((g.id.clone(), store.rotation_of(&g.id).await?));
    }
    Ok(Facts {
        incident: incident.to_string(),
        grants,
        sessions,
        rotations,
        reports: store.incident_reports(incident).await?,
        cab: store.cab_review(incident).await?,
    })
}

fn ended(g: &Grant) -> DateTime<Utc> {
    g.revoked_at.unwrap_or(g.expires_at)
}

fn after(t: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(d)
        .ok()
        .and_then(|d| t.checked_add_signed(d))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// A rotation outcome that did not rotate anything (the target left the config).
fn rotated(outcome: &str) -> bool {
    outcome != "target no longer configured"
}

impl Facts {
    /// When the incident was resolved: its last grant ended and every session ended (None:
    /// not yet, or no grant has this incident id).
    pub fn resolved_at(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        if self.grants.is_empty() || self.grants.iter().any(|g| ended(g) > now) {
            return None;
        }
        let mut at = self.grants.iter().map(ended).max()?;
        for s in &self.sessions {
            // A session row a crash left open ended at its deadline at the latest (the gateway
            // cuts every session there); before that it may still run.
            let end = match s.ended_at {
                Some(e) => e,
                None if s.deadline <= now => s.deadline,
                None => return None,
            };
            at = at.max(end);
        }
        Some(at)
    }

    /// The timeline at `now`. `report_at` is a report being written now (it counts).
    pub fn timeline(
        &self,
        limits: &Limits,
        now: DateTime<Utc>,
        report_at: Option<DateTime<Utc>>,
    ) -> Vec<Item> {
        let resolved = self.resolved_at(now);
        // Each grant's credentials are due within the window after that grant ended; the
        // item is done when the last one was rotated (a non-rotation does not count).
        let rotation_of = |g: &Grant| {
            self.rotations
                .iter()
                .find(|(id, _)| *id == g.id)
                .and_then(|(_, r)| r.as_ref())
                .filter(|(outcome, _)| rotated(outcome))
                .map(|(_, at)| *at)
        };
        let rotated_at = self
            .grants
            .iter()
            .map(rotation_of)
            .collect::<Option<Vec<_>>>()
            .and_then(|v| v.into_iter().max());
        let rotation_state = resolved.map(|_| {
            let mut state = ItemState::Met;
            for g in &self.grants {
                let due = after(ended(g), limits.rotation);
                match rotation_of(g) {
                    Some(t) if t <= due => {}
                    Some(_) => state = ItemState::Overdue,
                    None if now > due => state = ItemState::Overdue,
                    None if state == ItemState::Met => state = ItemState::Pending,
                    None => {}
                }
            }
            state
        });
        // The first report written once the incident was resolved.
        let reported = resolved.and_then(|r| {
            self.reports
                .iter()
                .map(|x| x.created_at)
                .chain(report_at)
                .filter(|t| *t >= r)
                .min()
        });
        // A CAB review counts for this resolution only (an incident id reused later is a new
        // resolution the old review did not see).
        let cab = resolved.and_then(|r| self.cab.as_ref().map(|c| c.signed_at).filter(|t| *t >= r));
        let item = |item, what, limit: Duration, done: Option<DateTime<Utc>>| {
            let due_at = resolved.map(|r| after(r, limit));
            let state = match (due_at, done) {
                (None, _) => ItemState::Pending,
                (Some(d), Some(t)) if t <= d => ItemState::Met,
                (Some(_), Some(_)) => ItemState::Overdue,
                (Some(d), None) if now > d => ItemState::Overdue,
                (Some(_), None) => ItemState::Pending,
            };
            Item {
                item,
                what,
                limit,
                due_at,
                done_at: done,
                state,
            }
        };
        let mut rotation = item(
            "rotation",
            "credentials rotated after each grant ended",
            limits.rotation,
            rotated_at,
        );
        rotation.due_at = resolved.map(|_| {
            self.grants
                .iter()
                .map(|g| after(ended(g), limits.rotation))
                .max()
                .unwrap_or(DateTime::<Utc>::MAX_UTC)
        });
        if let Some(st) = rotation_state {
            rotation.state = st;
        }
        vec![
            rotation,
            item("report", "incident report written", limits.report, reported),
            item("cab", "CAB review signed", limits.cab, cab),
        ]
    }
}

/// One session in the report.
#[derive(Debug, Clone)]
pub struct SessionPart {
    pub row: SessionRow,
    /// `ok`, `incomplete`, `tampered`, `missing` or `error`.
    pub verdict: &'static str,
    pub summary: String,
    /// The commands and SQL statements, as indexed (redacted as the recording is).
    pub entries: Vec<SearchEntry>,
    pub transfers: Vec<TransferMeta>,
}

/// Everything the incident report shows.
#[derive(Debug, Clone)]
pub struct Report {
    pub facts: Facts,
    pub requests: Vec<Request>,
    pub sessions: Vec<SessionPart>,
    pub findings: Vec<Finding>,
    pub reviews: Vec<Review>,
    pub sinks: Vec<SinkStats>,
    /// Configured sinks whose delivery figures could not be read.
    pub sinks_unknown: Vec<String>,
    pub timeline: Vec<Item>,
    pub resolved_at: Option<DateTime<Utc>>,
    pub generated_at: DateTime<Utc>,
    pub generated_by: String,
}

/// Why an incident report could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("no grant has the incident id `{0}`")]
    NoSuchIncident(String),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Export(#[from] crate::audit_export::ExportError),
}

/// Which report is asked for, by whom, and whether it is being written (only a written one
/// counts for the timeline; a look at the web page does not).
#[derive(Debug, Clone, Copy)]
pub struct Ask<'a> {
    pub incident: &'a str,
    pub by: &'a str,
    pub writing: bool,
}

/// Gathers an incident's report. `keys` are the trusted signing keys (the integrity verdict
/// of each session); `siem` gives the delivery figures at this moment.
pub async fn gather(
    store: &dyn Store,
    recordings: &RecordingStore,
    cfg: &crate::config::Config,
    keys: &[PublicKey],
    siem: &crate::siem::Siem,
    ask: Ask<'_>,
) -> Result<Report, ReportError> {
    let sinks = siem.stats().await;
    let sinks_unknown: Vec<String> = siem
        .sink_names()
        .into_iter()
        .filter(|n| !sinks.iter().any(|s| &s.sink == n))
        .collect();
    let Ask {
        incident,
        by,
        writing,
    } = ask;
    let facts = facts(store, incident).await?;
    if facts.grants.is_empty() {
        return Err(ReportError::NoSuchIncident(incident.to_string()));
    }
    let now = clock::now();
    let filter = SessionFilter {
        incident: Some(incident.to_string()),
        ..Default::default()
    };
    let mut entries: BTreeMap<String, Vec<SearchEntry>> = BTreeMap::new();
    let every = SessionFilter {
        limit: Some(u32::MAX),
        ..filter.clone()
    };
    for h in store.search_text("", &every).await? {
        entries.entry(h.session.id).or_default().push(h.entry);
    }
    let mut sessions = Vec::with_capacity(facts.sessions.len());
    for row in &facts.sessions {
        let (verdict, summary) = match crate::verify::verify_session(
            recordings,
            &row.recording_prefix,
            keys,
            None,
        )
        .await
        {
            Ok(v) => (v.label(), v.summary()),
            Err(e) => ("error", e.to_string()),
        };
        let transfers = match recordings
            .get(&key::session_end(&row.recording_prefix))
            .await
            .ok()
            .and_then(|b| serde_json::from_slice::<SessionMeta>(&b).ok())
        {
            Some(m) => m.channels.into_iter().flat_map(|c| c.transfers).collect(),
            None => Vec::new(),
        };
        let mut e = entries.remove(&row.id).unwrap_or_default();
        e.sort_by(|a, b| {
            (a.channel, a.time)
                .partial_cmp(&(b.channel, b.time))
                .unwrap_or(std::cmp::Ordering::Equal)
        });
        sessions.push(SessionPart {
            row: row.clone(),
            verdict,
            summary,
            entries: e,
            transfers,
        });
    }
    let requests: Vec<Request> = store
        .list_requests(None)
        .await?
        .into_iter()
        .filter(|r| r.incident_id == incident)
        .collect();
    let mut reviews = Vec::new();
    for g in &facts.grants {
        match store.find_review(&g.id).await {
            Ok(r) => reviews.push(r),
            Err(StateError::NoSuchReview(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let findings = crate::findings::of_filter(store, cfg, &filter).await?;
    // Only a report being written counts for the timeline (a look at the web page does not).
    let timeline = facts.timeline(&Limits::of(cfg), now, writing.then_some(now));
    Ok(Report {
        resolved_at: facts.resolved_at(now),
        facts,
        requests,
        sessions,
        findings,
        reviews,
        sinks,
        sinks_unknown,
        timeline,
        generated_at: now,
        generated_by: by.to_string(),
    })
}

/// HTML text: escaped for the page, control characters shown as escapes.
fn h(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\n' | '\t' => out.push(c),
            c if crate::text::is_refused(c) => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The first 8 characters of an id.
fn short(id: &str) -> String {
    id.chars().take(8).collect()
}

fn t(at: DateTime<Utc>) -> String {
    clock::rfc3339(at)
}

fn opt_t(at: Option<DateTime<Utc>>) -> String {
    at.map(t).unwrap_or_else(|| "—".into())
}

fn dur(d: chrono::Duration) -> String {
    let s = d.num_seconds().max(0);
    match s {
        s if s >= 86_400 => format!("{}d {}h", s / 86_400, (s % 86_400) / 3600),
        s if s >= 3600 => format!("{}h {}m", s / 3600, (s % 3600) / 60),
        s if s >= 60 => format!("{}m {}s", s / 60, s % 60),
        s => format!("{s}s"),
    }
}

/// A table: headers, then rows of already-escaped cells.
fn table(out: &mut String, id: &str, head: &[&str], rows: &[Vec<String>]) {
    let _ = write!(out, "<table id=\"{id}\"><thead><tr>");
    for c in head {
        let _ = write!(out, "<th>{}</th>", h(c));
    }
    out.push_str("</tr></thead><tbody>");
    if rows.is_empty() {
        let _ = write!(out, "<tr><td colspan=\"{}\">none</td></tr>", head.len());
    }
    for r in rows {
        out.push_str("<tr>");
        for c in r {
            let _ = write!(out, "<td>{c}</td>");
        }
        out.push_str("</tr>");
    }
    out.push_str("</tbody></table>\n");
}

const STYLE: &str = "body{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#111}\
table{border-collapse:collapse;margin:.5em 0 1.5em}th,td{border:1px solid #bbb;padding:3px 6px;\
text-align:left;vertical-align:top}th{background:#eee}code,pre{font-family:monospace}\
.met{background:#d8f5d8}.pending{background:#fff3c4}.overdue{background:#f8d0d0}\
.ok{color:#060}.tampered,.missing,.error{color:#a00;font-weight:bold}.incomplete{color:#a60}\
.high{color:#a00;font-weight:bold}";

/// Renders the report as one self-contained HTML page: inline style, no script, no external
/// asset, readable offline.
pub fn render(r: &Report) -> String {
    let mut o = String::new();
    let inc = h(&r.facts.incident);
    let _ = write!(
        o,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">\
         <title>Incident {inc}: break-glass report</title><style>{STYLE}</style></head><body>\n\
         <h1>Incident <span id=\"incident\">{inc}</span>: break-glass report</h1>\n\
         <p>Generated {} by {}. {}</p>\n",
        t(r.generated_at),
        h(&r.generated_by),
        match r.resolved_at {
            Some(at) => format!("Resolved {} (the last grant and session ended).", t(at)),
            None => "<strong>Not resolved</strong>: a grant or a session is still running.".into(),
        }
    );
    o.push_str("<h2>Timeline</h2>\n");
    o.push_str("<table id=\"timeline\"><thead><tr><th>item</th><th>limit after resolution</th><th>due</th><th>done</th><th>state</th></tr></thead><tbody>");
    for i in &r.timeline {
        let _ = write!(
            o,
            "<tr data-item=\"{}\" data-state=\"{}\" class=\"{}\"><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            i.item,
            i.state.as_str(),
            i.state.as_str(),
            h(i.what),
            humantime::format_duration(i.limit),
            opt_t(i.due_at),
            opt_t(i.done_at),
            i.state.as_str()
        );
    }
    o.push_str("</tbody></table>\n");

    o.push_str("<h2>Requests and approvals</h2>\n");
    let rows: Vec<Vec<String>> = r
        .requests
        .iter()
        .map(|q| {
            vec![
                h(&q.id),
                h(&q.person),
                h(&q.target),
                h(&q.justification),
                h(&q.severity),
                h(&q.scenario),
                t(q.created_at),
                h(q.status.as_str()),
                h(&q.approvals
                    .iter()
                    .map(|(a, at)| format!("{a} at {}", t(*at)))
                    .collect::<Vec<_>>()
                    .join("; ")),
                if q.emergency {
                    "emergency self-service".into()
                } else {
                    String::new()
                },
            ]
        })
        .collect();
    table(
        &mut o,
        "requests",
        &[
            "request",
            "person",
            "target",
            "reason",
            "severity",
            "scenario",
            "asked",
            "status",
            "approvals",
            "",
        ],
        &rows,
    );

    o.push_str("<h2>Grants and rotation</h2>\n");
    let rows: Vec<Vec<String>> = r
        .facts
        .grants
        .iter()
        .map(|g| {
            let rot = r
                .facts
                .rotations
                .iter()
                .find(|(id, _)| id == &g.id)
                .and_then(|(_, x)| x.as_ref());
            vec![
                h(&g.id),
                h(&g.person),
                h(&g.target),
                t(g.created_at),
                t(g.expires_at),
                g.revoked_at
                    .map(|at| format!("{} by {}", t(at), h(g.revoked_by.as_deref().unwrap_or("?"))))
                    .unwrap_or_default(),
                rot.map(|(what, at)| format!("{} at {}", h(what), t(*at)))
                    .unwrap_or_else(|| "not rotated".into()),
            ]
        })
        .collect();
    table(
        &mut o,
        "grants",
        &[
            "grant", "person", "target", "from", "until", "revoked", "rotation",
        ],
        &rows,
    );

    o.push_str("<h2>Sessions</h2>\n");
    let rows: Vec<Vec<String>> = r
        .sessions
        .iter()
        .map(|s| {
            let x = &s.row;
            vec![
                format!("<code>{}</code>", h(&x.id)),
                h(&x.person),
                h(&x.target),
                h(&x.protocol),
                t(x.started_at),
                opt_t(x.ended_at),
                x.ended_at
                    .map(|e| dur(e - x.started_at))
                    .unwrap_or_else(|| "live".into()),
                h(x.end_reason.as_deref().unwrap_or("")),
                format!("{} in / {} out", x.bytes_in, x.bytes_out),
                format!(
                    "<span class=\"{v}\" title=\"{}\">{v}</span>",
                    h(&s.summary),
                    v = s.verdict
                ),
            ]
        })
        .collect();
    table(
        &mut o,
        "sessions",
        &[
            "session",
            "person",
            "target",
            "protocol",
            "started",
            "ended",
            "duration",
            "end",
            "bytes",
            "integrity",
        ],
        &rows,
    );

    o.push_str("<h2>Commands and statements</h2>\n<p>As the recorder extracted them, redacted as the recording is.</p>\n");
    let rows: Vec<Vec<String>> = r
        .sessions
        .iter()
        .flat_map(|s| {
            s.entries.iter().map(move |e| {
                vec![
                    format!("<code>{}</code>", h(&short(&s.row.id))),
                    e.channel.to_string(),
                    format!("{:.1}", e.time),
                    h(&e.kind),
                    format!("<pre>{}</pre>", h(&e.text)),
                ]
            })
        })
        .collect();
    table(
        &mut o,
        "commands",
        &["session", "channel", "offset (s)", "kind", "text"],
        &rows,
    );

    o.push_str("<h2>File transfers</h2>\n");
    let rows: Vec<Vec<String>> = r
        .sessions
        .iter()
        .flat_map(|s| {
            s.transfers.iter().map(move |f| {
                vec![
                    format!("<code>{}</code>", h(&short(&s.row.id))),
                    h(&f.protocol),
                    h(&f.direction),
                    h(&f.path),
                    f.size.to_string(),
                    format!("<code>{}</code>", h(&f.sha256)),
                    if f.complete { "yes" } else { "no" }.into(),
                ]
            })
        })
        .collect();
    table(
        &mut o,
        "transfers",
        &[
            "session",
            "protocol",
            "direction",
            "path",
            "bytes",
            "sha256",
            "complete",
        ],
        &rows,
    );

    o.push_str("<h2>Findings</h2>\n");
    let rows: Vec<Vec<String>> = r
        .findings
        .iter()
        .map(|f| {
            vec![
                h(&f.at),
                format!("<span class=\"{s}\">{s}</span>", s = f.severity.as_str()),
                h(f.rule),
                format!("<code>{}</code>", h(&short(&f.session_id))),
                f.channel.map(|c| c.to_string()).unwrap_or_default(),
                f.offset_seconds
                    .map(|x| format!("{x:.1}"))
                    .unwrap_or_default(),
                h(&f.detail),
            ]
        })
        .collect();
    table(
        &mut o,
        "findings",
        &[
            "at",
            "severity",
            "rule",
            "session",
            "channel",
            "offset (s)",
            "detail",
        ],
        &rows,
    );

    o.push_str("<h2>SIEM delivery</h2>\n<p>At the time of this report. A sink with nothing queued has acknowledged every event written before it, this incident's included.</p>\n");
    let rows: Vec<Vec<String>> = r
        .sinks
        .iter()
        .map(|s| {
            vec![
                h(&s.sink),
                s.delivered.to_string(),
                s.queued.to_string(),
                s.dead_lettered.to_string(),
                if s.queued == 0 && s.dead_lettered == 0 {
                    "<span class=\"ok\">all delivered</span>".into()
                } else if s.queued == 0 {
                    "<span class=\"tampered\">not all delivered: some events were refused and dead-lettered</span>".into()
                } else {
                    format!(
                        "<span class=\"incomplete\">{} waiting, oldest {:.0}s</span>",
                        s.queued, s.oldest_age_secs
                    )
                },
                h(s.last_error.as_deref().unwrap_or("")),
            ]
        })
        .chain(r.sinks_unknown.iter().map(|n| {
            vec![
                h(n),
                "?".into(),
                "?".into(),
                "?".into(),
                "<span class=\"error\">unknown: its figures could not be read</span>".into(),
                String::new(),
            ]
        }))
        .collect();
    table(
        &mut o,
        "siem",
        &[
            "sink",
            "delivered",
            "queued",
            "dead-lettered",
            "state",
            "last error",
        ],
        &rows,
    );

    o.push_str("<h2>Post-incident reviews</h2>\n");
    if r.reviews.is_empty() {
        o.push_str("<p>No review was opened (no grant was used).</p>\n");
    }
    for v in &r.reviews {
        let _ = write!(
            o,
            "<section class=\"review\" data-id=\"{}\"><h3>{} ({}'s use of {})</h3>",
            h(&v.id),
            h(&v.id),
            h(&v.person),
            h(&v.target)
        );
        match (&v.signed_by, v.signed_at) {
            (Some(by), Some(at)) => {
                let _ = write!(o, "<p>Signed off by {} at {}.</p><dl>", h(by), t(at));
                let mut qa = |q: &str, a: String| {
                    let _ = write!(o, "<dt>{}</dt><dd>{a}</dd>", h(q));
                };
                qa("Findings", h(v.findings.as_deref().unwrap_or("")));
                if let Some(a) = &v.answers {
                    let yn = |b: bool| if b { "yes" } else { "no" };
                    let with = |b: bool, note: &str| {
                        if note.is_empty() {
                            yn(b).to_string()
                        } else {
                            format!("{}: {}", yn(b), h(note))
                        }
                    };
                    qa(
                        "Were the documented thresholds met?",
                        with(a.thresholds_met, &a.thresholds_note),
                    );
                    qa(
                        "Could standard escalation paths have worked?",
                        with(a.escalation_possible, &a.escalation_note),
                    );
                    qa("Root cause", h(v.root_cause.as_deref().unwrap_or("")));
                    qa("Actions taken", h(&a.actions_taken));
                    qa(
                        "Does the procedure need an update?",
                        with(a.procedure_update, &a.procedure_change),
                    );
                } else {
                    qa("Root cause", h(v.root_cause.as_deref().unwrap_or("")));
                }
                o.push_str("</dl>");
            }
            _ => {
                let _ = write!(o, "<p>Not signed off; due {}.</p>", t(v.due_at));
            }
        }
        o.push_str("</section>\n");
    }

    o.push_str("<h2>CAB review</h2>\n");
    match &r.facts.cab {
        Some(c) => {
            let _ = writeln!(
                o,
                "<p id=\"cab\">{} by {} at {}: {}</p>",
                h(&c.outcome),
                h(&c.signed_by),
                t(c.signed_at),
                h(&c.notes)
            );
        }
        None => o.push_str("<p id=\"cab\">Not signed yet.</p>\n"),
    }
    o.push_str("</body></html>\n");
    o
}

/// The file name of an incident's report (incident ids are text from people: only a safe
/// form of it goes in a file name).
pub fn file_name(incident: &str, at: DateTime<Utc>) -> String {
    let safe: String = incident
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    format!(
        "breakglass-incident-{safe}-{}.html",
        at.format("%Y%m%dT%H%M%SZ")
    )
}

/// Signs a rendered report: the manifest (kind [`crate::audit_export::INCIDENT_KIND`])
/// spans the incident from its first request or grant to its resolution (or now).
pub fn sign(
    r: &Report,
    html: String,
    signer: &crate::signing::Signer,
) -> Result<crate::audit_export::Bundle, ReportError> {
    let since = r
        .requests
        .iter()
        .map(|q| q.created_at)
        .chain(r.facts.grants.iter().map(|g| g.created_at))
        .min()
        .unwrap_or(r.generated_at);
    let until = r.resolved_at.unwrap_or(r.generated_at).max(since);
    Ok(crate::audit_export::signed(
        signer,
        crate::audit_export::INCIDENT_KIND,
        file_name(&r.facts.incident, r.generated_at),
        html,
        r.sessions.len() as u64,
        crate::audit_export::ExportFormat::Html,
        (since, until),
        &r.generated_by,
    )?)
}

/// Records a written report (so the timeline counts it) and emits its SIEM event.
pub fn reported_event(r: &Report, sha256: &str, dir: &str) -> (IncidentReportRow, AccessEvent) {
    let row = IncidentReportRow {
        id: format!("IR-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]),
        incident_id: r.facts.incident.clone(),
        created_by: r.generated_by.clone(),
        created_at: r.generated_at,
        sha256: sha256.to_string(),
    };
    let mut e = AccessEvent::new(Action::IncidentReported, &r.generated_by);
    e.incident_id = Some(r.facts.incident.clone());
    e.message = Some(format!(
        "{} wrote the report of incident {} ({} sessions, {} findings) to {dir}",
        r.generated_by,
        r.facts.incident,
        r.sessions.len(),
        r.findings.len()
    ));
    (row, e)
}

/// Why a CAB sign-off was refused.
#[derive(Debug, thiserror::Error)]
pub enum CabError {
    #[error("{0} may not sign a CAB review (needs the `reviewer` or `admin` role)")]
    NotReviewer(String),
    #[error("a CAB review needs --outcome accepted|actions-required and --notes TEXT")]
    Incomplete,
    #[error("{who} took part in this incident ({role}) and may not sign its CAB review")]
    Participant { who: String, role: &'static str },
    #[error("no grant has the incident id `{0}`")]
    NoSuchIncident(String),
    #[error("incident {0} is not resolved yet: a grant or a session is still running")]
    NotResolved(String),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("the CAB review could not be written to the recording store: {0}")]
    Store(String),
}

/// Signs the CAB review of a resolved incident once: recorded in the state store, written
/// create-only next to the evidence, and sent to the SIEM.
pub async fn sign_cab(
    core: &Core,
    may_be_participant: bool,
    person: &str,
    roles: &[String],
    incident: &str,
    outcome: &str,
    notes: &str,
) -> Result<CabReview, CabError> {
    if !roles.iter().any(|r| r == "reviewer" || r == "admin") {
        return Err(CabError::NotReviewer(person.to_string()));
    }
    let outcome = outcome.trim();
    if !matches!(outcome, "accepted" | "actions-required") || notes.trim().is_empty() {
        return Err(CabError::Incomplete);
    }
    let f = facts(core.store.as_ref(), incident).await?;
    if f.grants.is_empty() {
        return Err(CabError::NoSuchIncident(incident.to_string()));
    }
    if !may_be_participant {
        for g in &f.grants {
            let role = if g.person == person {
                Some("requester")
            } else if g.created_by == person {
                Some("grantor")
            } else {
                None
            };
            let approver = match &g.request_id {
                Some(rid) => core
                    .store
                    .find_request(rid)
                    .await
                    .map(|r| r.approvals.iter().any(|(a, _)| a == person))
                    .unwrap_or(false),
                None => false,
            };
            if let Some(role) = role.or(approver.then_some("approver")) {
                return Err(CabError::Participant {
                    who: person.to_string(),
                    role,
                });
            }
        }
    }
    let now = clock::now();
    if f.resolved_at(now).is_none() {
        return Err(CabError::NotResolved(incident.to_string()));
    }
    let cab = CabReview {
        incident_id: incident.to_string(),
        signed_by: person.to_string(),
        signed_at: now,
        outcome: outcome.to_string(),
        notes: notes.trim().to_string(),
    };
    if let Err(e) = core.store.sign_cab(&cab).await {
        // An earlier sign-off may have stopped after its row (the copy or the event failed):
        // finish it from the stored row, then refuse this one.
        if matches!(e, StateError::CabAlreadySigned(_)) {
            if let Some(first) = core.store.cab_review(incident).await? {
                let missing = matches!(
                    core.recordings.get(&key::cab_review(incident)).await,
                    Err(crate::storage::StorageError::NotFound(_))
                );
                if missing {
                    tracing::warn!(incident = %incident, "completing an earlier CAB sign-off");
                    keep_cab(core, &first, &f).await?;
                }
            }
        }
        return Err(e.into());
    }
    keep_cab(core, &cab, &f).await?;
    Ok(cab)
}

/// Writes a signed CAB review create-only next to the evidence and sends its event.
async fn keep_cab(core: &Core, cab: &CabReview, f: &Facts) -> Result<(), CabError> {
    let incident = cab.incident_id.as_str();
    let person = cab.signed_by.as_str();
    let doc = serde_json::json!({
        "schema_version": 1,
        "incident_id": cab.incident_id,
        "signed_by": cab.signed_by,
        "signed_at": clock::rfc3339(cab.signed_at),
        "outcome": cab.outcome,
        "notes": cab.notes,
        "grants": f.grants.iter().map(|g| g.id.clone()).collect::<Vec<_>>(),
    });
    let body = serde_json::to_vec_pretty(&doc).map_err(|e| CabError::Store(e.to_string()))?;
    core.recordings
        .put_new(&key::cab_review(incident), Bytes::from(body))
        .await
        .map_err(|e| CabError::Store(e.to_string()))?;
    let mut e = AccessEvent::new(Action::CabSigned, person);
    e.incident_id = Some(incident.to_string());
    e.item = Some(cab.outcome.clone());
    e.message = Some(format!(
        "{person} signed the CAB review of incident {incident}: {}",
        cab.outcome
    ));
    core.audit(&e)
        .await
        .map_err(|err| CabError::Store(format!("SIEM: {err}")))
}

/// How far back the watcher looks: incidents resolved longer ago than this were alerted
/// already (each item alerts once) or met their limits.
fn horizon(limits: &Limits) -> chrono::Duration {
    let longest = limits.rotation.max(limits.report).max(limits.cab);
    chrono::Duration::from_std(
        longest
            .saturating_mul(2)
            .saturating_add(Duration::from_secs(86_400)),
    )
    .unwrap_or(chrono::Duration::MAX)
}

/// One pass of the watcher: an `incident_overdue` event (and alert) for each timeline item
/// that passed its limit, once per incident and item however many nodes run it.
pub async fn check_overdue(core: &Core, limits: &Limits) -> Result<usize, StateError> {
    let now = clock::now();
    let since = now
        .checked_sub_signed(horizon(limits))
        .unwrap_or(DateTime::<Utc>::MIN_UTC);
    let mut incidents: Vec<String> = core
        .store
        .list_grants(None)
        .await?
        .into_iter()
        .filter(|g| ended(g) >= since)
        .map(|g| g.incident_id)
        .collect();
    incidents.sort();
    incidents.dedup();
    let mut raised = 0;
    for inc in incidents {
        let f = facts(core.store.as_ref(), &inc).await?;
        let Some(resolved) = f.resolved_at(now) else {
            continue;
        };
        for i in f.timeline(limits, now, None) {
            if i.state != ItemState::Overdue || i.done_at.is_some() {
                continue;
            }
            // One alert per item of each resolution (an incident id reused later alerts again).
            let claim = format!("{}@{}", i.item, resolved.timestamp_millis());
            if !core.store.take_incident_alert(&inc, &claim, now).await? {
                continue;
            }
            let mut e = AccessEvent::new(Action::IncidentOverdue, "breakglass");
            e.outcome = Outcome::Failure;
            e.incident_id = Some(inc.clone());
            if let Some(g) = f.grants.last() {
                e.person = Some(g.person.clone());
                e.target = Some(g.target.clone());
            }
            e.item = Some(i.item.to_string());
            e.due_at = i.due_at.map(clock::rfc3339);
            e.message = Some(format!(
                "incident {inc}: {} was due {} ({} after the resolution)",
                i.what,
                opt_t(i.due_at),
                humantime::format_duration(i.limit)
            ));
            if let Err(err) = core.audit(&e).await {
                tracing::error!(error = %err, incident = %inc, "could not write the overdue event");
            }
            raised += 1;
        }
    }
    Ok(raised)
}

/// Checks every incident's timeline every 2 s on the node that `leads` (the cluster's
/// singletons run on one node; the claim in the store keeps an alert single even while two
/// nodes both lead for a moment).
pub async fn overdue_watcher(
    core: Arc<Core>,
    limits: Limits,
    leads: Arc<dyn Fn() -> bool + Send + Sync>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tick.tick().await;
        if !leads() {
            continue;
        }
        if let Err(e) = check_overdue(&core, &limits).await {
            tracing::warn!(error = %e, "incident timeline check failed; retried");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(s: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_700_000_000 + s, 0)
            .single()
            .expect("ts")
    }

    fn grant(id: &str, until: i64) -> Grant {
        Grant {
            id: id.into(),
            person: "alice".into(),
            target: "db".into(),
            reason: "r".into(),
            incident_id: "INC-1".into(),
            created_by: "bob".into(),
            created_at: at(0),
            expires_at: at(until),
            revoked_at: None,
            revoked_by: None,
            revoke_reason: None,
            request_id: None,
            review_required: false,
        }
    }

    const LIMITS: Limits = Limits {
        rotation: Duration::from_secs(3600),
        report: Duration::from_secs(86_400),
        cab: Duration::from_secs(7 * 86_400),
    };

    fn states(f: &Facts, now: i64) -> Vec<&'static str> {
        f.timeline(&LIMITS, at(now), None)
            .iter()
            .map(|i| i.state.as_str())
            .collect()
    }

    #[test]
    fn the_timeline_runs_from_the_resolution_and_marks_met_pending_and_overdue() {
        let mut f = Facts {
            incident: "INC-1".into(),
            grants: vec![grant("g1", 100), grant("g2", 200)],
            sessions: vec![],
            rotations: vec![
                ("g1".into(), Some(("ok".into(), at(150)))),
                ("g2".into(), None),
            ],
            reports: vec![],
            cab: None,
        };
        // A grant still running: nothing is due yet.
        assert_eq!(f.resolved_at(at(150)), None);
        assert_eq!(states(&f, 150), ["pending", "pending", "pending"]);
        // Resolved at 200; g2 not rotated an hour later is overdue.
        assert_eq!(f.resolved_at(at(300)), Some(at(200)));
        assert_eq!(states(&f, 300), ["pending", "pending", "pending"]);
        assert_eq!(states(&f, 200 + 3601), ["overdue", "pending", "pending"]);
        // Rotated in time, a report before the resolution does not count, one after does.
        f.rotations[1].1 = Some(("ok".into(), at(900)));
        f.reports.push(IncidentReportRow {
            id: "IR-0".into(),
            incident_id: "INC-1".into(),
            created_by: "op".into(),
            created_at: at(50),
            sha256: String::new(),
        });
        assert_eq!(states(&f, 200 + 86_401), ["met", "overdue", "pending"]);
        f.reports.push(IncidentReportRow {
            created_at: at(1000),
            ..f.reports[0].clone()
        });
        f.cab = Some(CabReview {
            incident_id: "INC-1".into(),
            signed_by: "erin".into(),
            signed_at: at(8 * 86_400),
            outcome: "accepted".into(),
            notes: "n".into(),
        });
        // The CAB signed after 7 days is late: overdue, though done.
        assert_eq!(states(&f, 9 * 86_400), ["met", "met", "overdue"]);
        // One signed before this resolution (an incident id used again) does not count.
        f.cab.as_mut().expect("cab").signed_at = at(10);
        assert_eq!(states(&f, 300), ["met", "met", "pending"]);
        // A target that left the config was not rotated: that grant stays due.
        f.rotations[1].1 = Some(("target no longer configured".into(), at(900)));
        assert_eq!(states(&f, 300), ["pending", "met", "pending"]);
        assert_eq!(states(&f, 200 + 3601), ["overdue", "met", "pending"]);
        // Each grant has its own window: g1 rotated more than an hour after it ended is late
        // even though the incident resolved later.
        f.rotations[0].1 = Some(("ok".into(), at(100 + 3700)));
        f.rotations[1].1 = Some(("ok".into(), at(300)));
        assert_eq!(states(&f, 5000), ["overdue", "met", "pending"]);
    }

    #[test]
    fn a_session_a_crash_left_open_ends_at_its_deadline_at_the_latest() {
        let open = SessionRow {
            id: "s".into(),
            protocol: "ssh".into(),
            person: "alice".into(),
            target: "db".into(),
            grant_id: "g1".into(),
            client_addr: String::new(),
            started_at: at(10),
            deadline: at(400),
            ended_at: None,
            end_reason: None,
            bytes_in: 0,
            bytes_out: 0,
            recording_prefix: String::new(),
            node_id: String::new(),
        };
        let f = Facts {
            incident: "INC-1".into(),
            grants: vec![grant("g1", 100)],
            sessions: vec![open],
            rotations: vec![],
            reports: vec![],
            cab: None,
        };
        assert_eq!(f.resolved_at(at(300)), None);
        assert_eq!(f.resolved_at(at(500)), Some(at(400)));
        // Huge limits saturate instead of overflowing.
        let huge = Limits {
            rotation: Duration::MAX,
            report: Duration::MAX,
            cab: Duration::MAX,
        };
        assert!(f
            .timeline(&huge, at(500), None)
            .iter()
            .all(|i| i.state == ItemState::Pending));
        assert!(horizon(&huge) > chrono::Duration::zero());
    }

    #[test]
    fn the_report_escapes_what_people_typed_and_needs_nothing_outside_the_file() {
        let f = Facts {
            incident: "INC-<script>alert(1)</script>".into(),
            grants: vec![grant("g1", 100)],
            sessions: vec![],
            rotations: vec![("g1".into(), None)],
            reports: vec![],
            cab: None,
        };
        let r = Report {
            timeline: f.timeline(&LIMITS, at(500), Some(at(500))),
            resolved_at: f.resolved_at(at(500)),
            facts: f,
            requests: vec![],
            sessions: vec![],
            findings: vec![],
            reviews: vec![],
            sinks: vec![],
            sinks_unknown: vec!["collector".into()],
            generated_at: at(500),
            generated_by: "operator:\u{1b}[2Jroot".into(),
        };
        let html = render(&r);
        assert!(!html.contains("<script"), "{html}");
        assert!(html.contains("INC-&lt;script&gt;"), "{html}");
        assert!(!html.contains('\u{1b}'));
        for external in ["src=", "href=", "url(", "@import"] {
            assert!(!html.contains(external), "{external} in the report");
        }
        assert!(
            html.contains("data-item=\"report\" data-state=\"met\""),
            "{html}"
        );
        assert!(
            html.contains("collector</td><td>?"),
            "an unreadable sink is shown: {html}"
        );
        assert_eq!(
            file_name("INC/../../x y", at(0)),
            "breakglass-incident-INC_______x_y-20231114T221320Z.html"
        );
    }
}
