//! The JSON API: the workflow actions of the SSH control channel over HTTP, for tools and the
//! web UI. A person authenticates with a bearer token fetched over SSH (`ssh breakglass@gw
//! token`), so every API action is tied to the person their SSH key proved.
//!
//! Plain HTTP on the configured listener; put it behind a TLS-terminating proxy or keep it on
//! loopback (the web UI issue adds rustls).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::clock;
use crate::control::{self, Caller, Parsed};
use crate::services::Gateway;
use crate::state::{GrantState, RequestStatus};

pub use crate::control::token_hash;

/// The cookie that carries a web UI session (a token like the API's, set by the login link).
pub const SESSION_COOKIE: &str = "bg_session";

/// The header the web UI sends on every write; a cross-site form cannot set it, so a cookie
/// alone never authorizes a change (CSRF).
pub const CSRF_HEADER: &str = "x-breakglass-csrf";

/// An API error: a status and a message.
pub(crate) struct ApiError(pub StatusCode, pub String);

impl ApiError {
    pub(crate) fn internal(e: impl std::fmt::Display) -> ApiError {
        ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "ok": false, "error": self.1 }))).into_response()
    }
}

/// The verified person behind a request.
pub(crate) struct Who {
    pub person: String,
    pub roles: Vec<String>,
    /// Authenticated by the web UI's cookie rather than a bearer token.
    pub via_cookie: bool,
}

impl Who {
    pub(crate) fn has(&self, role: &str) -> bool {
        self.roles.iter().any(|r| r == role)
    }

    /// Reviewers, auditors and admins see every session; others see their own.
    pub(crate) fn sees_all_sessions(&self) -> bool {
        crate::policy::sees_everything(&self.roles)
    }

    /// Refuses a change the person may not make here: auditors are read-only, and a browser
    /// session must show the CSRF header.
    pub(crate) fn may_write(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        if self.has("auditor") {
            return Err(ApiError(
                StatusCode::FORBIDDEN,
                format!("{} is an auditor; auditors are read-only", self.person),
            ));
        }
        if self.via_cookie && !headers.contains_key(CSRF_HEADER) {
            return Err(ApiError(
                StatusCode::FORBIDDEN,
                format!("a change from the browser needs the {CSRF_HEADER} header"),
            ));
        }
        Ok(())
    }
}

/// The value of one cookie.
pub(crate) fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// Who is asking: a bearer token (`ssh GATEWAY token`) or the web UI's session cookie.
pub(crate) async fn who(gw: &Gateway, headers: &HeaderMap) -> Result<Who, ApiError> {
    let bearer = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let (token, via_cookie) = match (bearer, cookie(headers, SESSION_COOKIE)) {
        (Some(t), _) => (t, false),
        (None, Some(c)) => (c, true),
        (None, None) => {
            return Err(ApiError(
                StatusCode::UNAUTHORIZED,
                "not logged in: get a login link with `ssh breakglass@GATEWAY login`, or a bearer token with `ssh breakglass@GATEWAY token`".into(),
            ))
        }
    };
    let person = gw
        .store
        .api_token_person(&token_hash(token.trim()), clock::now())
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .ok_or_else(|| {
            ApiError(
                StatusCode::UNAUTHORIZED,
                "unknown or expired token; log in again".into(),
            )
        })?;
    let roles = gw
        .config
        .people
        .get(&person)
        .map(|p| p.roles.clone())
        .ok_or_else(|| {
            ApiError(
                StatusCode::FORBIDDEN,
                format!("{person} is no longer configured"),
            )
        })?;
    Ok(Who {
        person,
        roles,
        via_cookie,
    })
}

/// Maps a control outcome to HTTP: 200 with its data, or 409/403/404/400 with the message.
fn outcome(o: control::Outcome) -> Response {
    let message = o.text.trim().trim_start_matches("breakglass: ").to_string();
    if o.code == 0 {
        let mut body = json!({ "ok": true, "message": message });
        if let (Some(b), Value::Object(d)) = (body.as_object_mut(), o.data) {
            b.extend(d);
        }
        return (StatusCode::OK, Json(body)).into_response();
    }
    let status = match o.failure {
        Some(control::Failure::Forbidden) => StatusCode::FORBIDDEN,
        Some(control::Failure::NotFound) => StatusCode::NOT_FOUND,
        Some(control::Failure::Conflict) => StatusCode::CONFLICT,
        Some(control::Failure::Internal) => StatusCode::INTERNAL_SERVER_ERROR,
        Some(control::Failure::Invalid) | None => StatusCode::BAD_REQUEST,
    };
    ApiError(status, message).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewRequestBody {
    target: String,
    reason: String,
    incident: String,
    severity: Option<String>,
    scenario: Option<String>,
    /// A duration such as "2h".
    duration: Option<String>,
    #[serde(default)]
    emergency: bool,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ReasonBody {
    reason: Option<String>,
}

fn parsed(
    command: &str,
    args: Vec<String>,
    opts: Vec<(&str, Option<String>)>,
    flags: Vec<&str>,
) -> Parsed {
    Parsed {
        command: command.into(),
        args,
        opts: opts
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| (k.to_string(), v)))
            .collect::<BTreeMap<_, _>>(),
        flags: flags.into_iter().map(str::to_string).collect(),
    }
}

/// Runs a workflow action as the token's person.
async fn act(gw: &Gateway, headers: &HeaderMap, p: Parsed) -> Result<Response, ApiError> {
    let w = who(gw, headers).await?;
    w.may_write(headers)?;
    let caller = Caller {
        person: &w.person,
        roles: &w.roles,
    };
    Ok(outcome(control::run_parsed(gw, &caller, &p).await))
}

async fn create_request(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    Json(b): Json<NewRequestBody>,
) -> Result<Response, ApiError> {
    let p = parsed(
        "request",
        vec![b.target],
        vec![
            ("reason", Some(b.reason)),
            ("incident", Some(b.incident)),
            ("severity", b.severity),
            ("scenario", b.scenario),
            ("for", b.duration),
        ],
        if b.emergency {
            vec!["emergency"]
        } else {
            vec![]
        },
    );
    act(&gw, &headers, p).await
}

async fn approve(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    act(&gw, &headers, parsed("approve", vec![id], vec![], vec![])).await
}

async fn deny(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Option<Json<ReasonBody>>,
) -> Result<Response, ApiError> {
    let reason = body.and_then(|Json(b)| b.reason);
    act(
        &gw,
        &headers,
        parsed("deny", vec![id], vec![("reason", reason)], vec![]),
    )
    .await
}

async fn revoke(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Option<Json<ReasonBody>>,
) -> Result<Response, ApiError> {
    let reason = body.and_then(|Json(b)| b.reason);
    act(
        &gw,
        &headers,
        parsed("revoke", vec![id], vec![("reason", reason)], vec![]),
    )
    .await
}

fn may_see(gw: &Gateway, w: &Who, person: &str, target: &str) -> bool {
    crate::policy::may_see(&w.person, &w.roles, person, gw.config.targets.get(target))
}

async fn list_requests(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let w = who(&gw, &headers).await?;
    let reqs = gw
        .store
        .list_requests(Some(RequestStatus::Pending))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let items: Vec<Value> = reqs
        .into_iter()
        .filter(|r| may_see(&gw, &w, &r.person, &r.target))
        .map(|r| {
            json!({
                "id": r.id, "person": r.person, "target": r.target, "justification": r.justification,
                "incident_id": r.incident_id, "severity": r.severity, "scenario": r.scenario,
                "duration_seconds": r.duration.as_secs(), "created_at": clock::rfc3339(r.created_at),
                "expires_at": clock::rfc3339(r.expires_at), "status": r.status.as_str(),
                "emergency": r.emergency,
                "approvals": r.approvals.iter().map(|(a, t)| json!({"approver": a, "at": clock::rfc3339(*t)})).collect::<Vec<_>>(),
            })
        })
        .collect();
    Ok(Json(json!({ "requests": items })).into_response())
}

async fn list_grants(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let w = who(&gw, &headers).await?;
    let now = clock::now();
    let grants = gw
        .store
        .list_grants(Some(now))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let items: Vec<Value> = grants
        .into_iter()
        .filter(|g| may_see(&gw, &w, &g.person, &g.target))
        .map(|g| {
            json!({
                "id": g.id, "person": g.person, "target": g.target, "reason": g.reason,
                "incident_id": g.incident_id, "created_by": g.created_by,
                "created_at": clock::rfc3339(g.created_at), "expires_at": clock::rfc3339(g.expires_at),
                "state": match g.state_at(now) { GrantState::Active => "active", GrantState::Expired => "expired", GrantState::Revoked => "revoked" },
                "request_id": g.request_id, "correlation_id": g.correlation_id(), "emergency": g.review_required,
            })
        })
        .collect();
    Ok(Json(json!({ "grants": items })).into_response())
}

async fn status(State(gw): State<Arc<Gateway>>, headers: HeaderMap) -> Result<Response, ApiError> {
    let w = who(&gw, &headers).await?;
    let targets: Vec<Value> = gw
        .config
        .targets
        .values()
        .map(|t| {
            json!({
                "name": t.name, "login": t.login, "approvers": t.approvers,
                "required_approvals": t.required_approvals, "custodians": t.custodians,
                "emergency_self_service": t.emergency_self_service,
                "max_duration_seconds": t.max_duration.as_secs(),
                "you_may_approve": t.is_approver(&w.person, &w.roles),
            })
        })
        .collect();
    Ok(Json(json!({ "person": w.person, "roles": w.roles, "targets": targets })).into_response())
}

/// Runs a workflow action as the person (for the other HTTP modules).
pub(crate) async fn act_as(
    gw: &Gateway,
    w: &Who,
    headers: &HeaderMap,
    p: Parsed,
) -> Result<Response, ApiError> {
    w.may_write(headers)?;
    let caller = Caller {
        person: &w.person,
        roles: &w.roles,
    };
    Ok(outcome(control::run_parsed(gw, &caller, &p).await))
}

pub(crate) fn parsed_command(
    command: &str,
    args: Vec<String>,
    opts: Vec<(&str, Option<String>)>,
) -> Parsed {
    parsed(command, args, opts, vec![])
}

/// Readiness: 503 once the node drains, so a load balancer sends new sessions elsewhere.
async fn healthz(State(gw): State<Arc<Gateway>>) -> Response {
    let node = gw.membership.node_id.as_str();
    if gw.membership.is_draining() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "ok": false, "draining": true, "node": node })),
        )
            .into_response();
    }
    Json(json!({ "ok": true, "node": node })).into_response()
}

/// Prometheus text exposition: SIEM delivery per sink, alerts and live sessions. Counts only,
/// no names or secrets, so it is served without a token like `/healthz`.
async fn metrics(State(gw): State<Arc<Gateway>>) -> impl IntoResponse {
    use std::fmt::Write;
    use std::sync::atomic::Ordering::Relaxed;
    let mut out = String::new();
    let stats = gw.siem.stats().await;
    type Series = (
        &'static str,
        &'static str,
        &'static str,
        fn(&crate::siem::SinkStats) -> f64,
    );
    let series: [Series; 4] = [
        (
            "breakglass_siem_queued_events",
            "gauge",
            "Events spooled but not yet acknowledged by the sink.",
            |s| s.queued as f64,
        ),
        (
            "breakglass_siem_delivered_events_total",
            "counter",
            "Events the sink acknowledged.",
            |s| s.delivered as f64,
        ),
        (
            "breakglass_siem_failed_deliveries_total",
            "counter",
            "Delivery attempts that failed (each is retried).",
            |s| s.failed as f64,
        ),
        (
            "breakglass_siem_oldest_undelivered_age_seconds",
            "gauge",
            "Age of the oldest event the sink has not acknowledged.",
            |s| s.oldest_age_secs,
        ),
    ];
    for (name, kind, help, f) in series {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for s in &stats {
            let _ = writeln!(out, "{name}{{sink=\"{}\"}} {}", s.sink, f(s));
        }
    }
    gw.siem.metrics(&mut out).await;
    let a = &gw.alerter.stats;
    for (name, v) in [
        ("breakglass_alerts_sent_total", a.sent.load(Relaxed)),
        ("breakglass_alerts_failed_total", a.failed.load(Relaxed)),
        ("breakglass_alerts_dropped_total", a.dropped.load(Relaxed)),
    ] {
        let _ = writeln!(out, "# TYPE {name} counter\n{name} {v}");
    }
    gw.admission.metrics(&mut out);
    let _ = writeln!(
        out,
        "# TYPE breakglass_live_sessions gauge\nbreakglass_live_sessions {}",
        gw.live_sessions().len()
    );
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        out,
    )
}

/// The API routes.
pub fn router(gw: Arc<Gateway>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/api/v1/status", get(status))
        .route("/api/v1/requests", get(list_requests).post(create_request))
        .route("/api/v1/requests/{id}/approve", post(approve))
        .route("/api/v1/requests/{id}/deny", post(deny))
        .route("/api/v1/grants", get(list_grants))
        .route("/api/v1/grants/{id}/revoke", post(revoke))
        .with_state(gw)
}
