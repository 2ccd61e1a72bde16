//! The web UI and the routes around it: login by single-use link, the browser session cookie,
//! our own UI files (compiled in), asciinema-player's bundle (from npm, served from disk), the
//! OpenAPI document, and the evidence API the UI reads (`evidence`).
//!
//! TLS: the HTTP listener speaks TLS itself (rustls) when `[web] tls_cert`/`tls_key` are set;
//! otherwise keep it on loopback or behind a TLS-terminating proxy.

pub mod evidence;
pub mod serve;

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use crate::api::{token_hash, ApiError, SESSION_COOKIE};
use crate::clock;
use crate::services::Gateway;
use crate::siem::{AccessEvent, Action};
use crate::state::LinkUse;

/// The OpenAPI 3.1 document describing every `/api/v1` route.
pub const OPENAPI: &str = include_str!("openapi.json");

const INDEX_HTML: &str = include_str!("../../web/ui/index.html");
const APP_JS: &str = include_str!("../../web/ui/app.js");
const APP_CSS: &str = include_str!("../../web/ui/app.css");

/// Security headers on every UI response: no framing, no sniffing, scripts only from us
/// (asciinema-player's terminal emulator is WebAssembly, hence `wasm-unsafe-eval`, which allows
/// compiling WebAssembly but not `eval`).
fn ui_headers(content_type: &'static str) -> [(header::HeaderName, HeaderValue); 5] {
    [
        (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
        (
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(
                "default-src 'self'; script-src 'self' 'wasm-unsafe-eval'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
            ),
        ),
        (
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ),
        (header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
        (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
    ]
}

async fn index() -> Response {
    (ui_headers("text/html; charset=utf-8"), INDEX_HTML).into_response()
}

async fn app_js() -> Response {
    (ui_headers("text/javascript; charset=utf-8"), APP_JS).into_response()
}

async fn app_css() -> Response {
    (ui_headers("text/css; charset=utf-8"), APP_CSS).into_response()
}

/// asciinema-player's two bundle files, from `[web] player_dir`. Nothing else is served from
/// disk.
async fn player(State(gw): State<Arc<Gateway>>, Path(file): Path<String>) -> Response {
    let content_type = match file.as_str() {
        "asciinema-player.min.js" => "text/javascript; charset=utf-8",
        "asciinema-player.css" => "text/css; charset=utf-8",
        _ => return (StatusCode::NOT_FOUND, "not found").into_response(),
    };
    let path = gw.config.web.player_dir.join(&file);
    match tokio::fs::read(&path).await {
        Ok(body) => (ui_headers(content_type), body).into_response(),
        Err(e) => (
            StatusCode::NOT_FOUND,
            format!(
                "asciinema-player is not installed ({}: {e}); run `npm ci --prefix web` or set [web] player_dir",
                path.display()
            ),
        )
            .into_response(),
    }
}

async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        OPENAPI.to_string(),
    )
        .into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LoginBody {
    token: String,
}

/// Spends a login link and starts a browser session: an HttpOnly, SameSite=Strict cookie
/// holding a fresh token (the link's own secret is never reused).
async fn login(
    State(gw): State<Arc<Gateway>>,
    Json(b): Json<LoginBody>,
) -> Result<Response, ApiError> {
    let now = clock::now();
    let person = match gw
        .store
        .use_login_link(&token_hash(b.token.trim()), now)
        .await
        .map_err(ApiError::internal)?
    {
        LinkUse::Person(p) => p,
        refused => {
            let why = match refused {
                LinkUse::Expired => "this login link has expired",
                LinkUse::AlreadyUsed => "this login link was already used; links work once",
                _ => "this is not a valid login link",
            };
            return Err(ApiError(
                StatusCode::UNAUTHORIZED,
                format!("{why}; get a new one with `ssh breakglass@GATEWAY login`"),
            ));
        }
    };
    if !gw.config.people.contains_key(&person) {
        return Err(ApiError(
            StatusCode::FORBIDDEN,
            format!("{person} is no longer configured"),
        ));
    }
    let session = crate::credential::new_secret();
    let until = now + chrono::Duration::from_std(gw.config.web.session_ttl).unwrap_or_default();
    gw.store
        .put_api_token(&token_hash(&session), &person, now, until)
        .await
        .map_err(ApiError::internal)?;
    let mut e = AccessEvent::new(Action::WebLogin, &person);
    e.person = Some(person.clone());
    e.message = Some(format!(
        "{person} logged in to the web UI with a single-use link; session until {}",
        clock::rfc3339(until)
    ));
    gw.audit(&e).await.map_err(ApiError::internal)?;
    let secure = if gw.config.web.tls.is_some()
        || gw.public_url().is_some_and(|u| u.starts_with("https://"))
    {
        "; Secure"
    } else {
        ""
    };
    let cookie = format!(
        "{SESSION_COOKIE}={session}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
        gw.config.web.session_ttl.as_secs()
    );
    Ok((
        [(header::SET_COOKIE, cookie)],
        Json(json!({ "ok": true, "person": person, "expires_at": clock::rfc3339(until) })),
    )
        .into_response())
}

/// Ends the browser session: the token stops working now, and the cookie is cleared.
async fn logout(State(gw): State<Arc<Gateway>>, headers: HeaderMap) -> Result<Response, ApiError> {
    if let Some(token) = crate::api::cookie(&headers, SESSION_COOKIE) {
        gw.store
            .end_api_token(&token_hash(token), clock::now())
            .await
            .map_err(ApiError::internal)?;
    }
    Ok((
        [(
            header::SET_COOKIE,
            format!("{SESSION_COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"),
        )],
        Json(json!({ "ok": true })),
    )
        .into_response())
}

/// Every HTTP route: the workflow API, the evidence API and the UI.
pub fn router(gw: Arc<Gateway>) -> Router {
    let ui = Router::new()
        .route("/", get(index))
        .route("/login", get(index))
        .route("/favicon.ico", get(|| async { StatusCode::NO_CONTENT }))
        .route("/ui/app.js", get(app_js))
        .route("/ui/app.css", get(app_css))
        .route("/ui/player/{file}", get(player))
        .route("/api/v1/openapi.json", get(openapi))
        .route("/api/v1/login", post(login))
        .route("/api/v1/logout", post(logout))
        .with_state(gw.clone());
    crate::api::router(gw.clone())
        .merge(evidence::router(gw))
        .merge(ui)
        .fallback(|uri: axum::http::Uri| async move {
            ApiError(
                StatusCode::NOT_FOUND,
                format!("no such path: {}", uri.path()),
            )
        })
        .layer(axum::middleware::from_fn(json_errors))
}

/// The framework answers some errors itself in plain text: a malformed JSON body, an unknown
/// query parameter, a path or method with no route. Under `/api/` every error is the
/// documented `{"ok": false, "error": ...}` object instead, with the same status and reason.
async fn json_errors(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let api = req.uri().path().starts_with("/api/");
    let res = next.run(req).await;
    let is_json = res
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !api || is_json || !(res.status().is_client_error() || res.status().is_server_error()) {
        return res;
    }
    let (parts, body) = res.into_parts();
    let bytes = axum::body::to_bytes(body, 16 * 1024)
        .await
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&bytes).trim().to_string();
    let error = if text.is_empty() {
        parts
            .status
            .canonical_reason()
            .unwrap_or("error")
            .to_lowercase()
    } else {
        text
    };
    let mut out = (parts.status, Json(json!({ "ok": false, "error": error }))).into_response();
    if let Some(allow) = parts.headers.get(header::ALLOW) {
        out.headers_mut().insert(header::ALLOW, allow.clone());
    }
    out
}
