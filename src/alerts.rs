//! Alerts: webhooks told within a second about requests, approvals, denials, session starts,
//! revocations and emergency grants, as a generic JSON body or a Slack-compatible one.
//!
//! Alerts never block access: events go into a bounded queue (full → the alert is dropped,
//! logged and counted) and a worker posts them with bounded, jittered retries. The SIEM file,
//! not the alert, is the record.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::mpsc;

use crate::siem::{summary, AccessEvent, Action};

pub use crate::config::{Webhook, WebhookFormat as Format};
pub use crate::outbound::{client_tls, Url};

/// Delivery counters (logged; exported with the metrics endpoint later).
#[derive(Debug, Default)]
pub struct Stats {
    pub sent: AtomicU64,
    pub failed: AtomicU64,
    pub dropped: AtomicU64,
}

/// An alert waiting to be posted.
#[derive(Debug, Clone, Serialize)]
struct Alert {
    source: &'static str,
    summary: String,
    custodians: Vec<String>,
    event: AccessEvent,
}

/// The sending side; cheap to clone.
#[derive(Clone)]
pub struct Alerter {
    tx: Option<mpsc::Sender<Alert>>,
    pub stats: Arc<Stats>,
}

/// Whether an event is worth waking someone for.
pub fn alertable(e: &AccessEvent) -> bool {
    match e.action {
        Action::RequestCreated
        | Action::RequestApproved
        | Action::RequestDenied
        | Action::SessionStart
        | Action::SessionRevoked
        | Action::GrantRevoked => true,
        Action::GrantCreated => e.emergency == Some(true),
        Action::ReviewOverdue | Action::IncidentOverdue => true,
        Action::IncidentReported | Action::CabSigned => false,
        Action::ReviewOpened | Action::ReviewSigned | Action::CredentialIssued => false,
        Action::CredentialRotated => e.outcome == crate::siem::Outcome::Failure,
        // A role that could not be switched off stays open between grants.
        // A failed drill is a procedure that would fail in a real event.
        Action::DrillFinished => e.outcome == crate::siem::Outcome::Failure,
        Action::DrillOverdue => true,
        // A reviewer should look at once only at the serious ones.
        Action::Finding => e.severity.as_deref() == Some("high"),
        Action::AccountEnabled | Action::AccountDisabled => {
            e.outcome == crate::siem::Outcome::Failure
        }
        // A new manifest signing key changes what verification trusts: custodians hear of it.
        Action::SigningKeyRotated => true,
        // Planted or removed evidence: custodians hear of it at once.
        Action::EvidenceRefused => true,
        Action::RecordingCheckpoint
        | Action::Command
        | Action::Statement
        | Action::SiemTest
        | Action::RecordingViewed
        | Action::RecordingExported
        | Action::MetadataExported
        | Action::WebLogin
        | Action::ActionsDropped
        | Action::RecordingSearched => false,
        Action::SessionEnd
        | Action::SessionDenied
        | Action::SessionExpired
        | Action::ForwardingRefused
        | Action::RequestExpired => false,
    }
}

/// The body posted to a Slack incoming webhook: the summary as mrkdwn text with `&`, `<` and
/// `>` escaped, so `<!channel>` or `<https://x|Approve>` in a reason is shown, not acted on.
pub fn slack_body(summary: &str) -> serde_json::Value {
    serde_json::json!({ "text": crate::text::mrkdwn(summary) })
}

impl Alerter {
    /// An alerter that sends nothing (no webhooks configured).
    pub fn disabled() -> Alerter {
        Alerter {
            tx: None,
            stats: Arc::new(Stats::default()),
        }
    }

    /// Starts the delivery worker.
    pub fn start(hooks: Vec<Webhook>, tls: Arc<tokio_rustls::rustls::ClientConfig>) -> Alerter {
        if hooks.is_empty() {
            return Alerter::disabled();
        }
        // Full queue policy: drop the alert (counted and logged); access is never delayed.
        let (tx, mut rx) = mpsc::channel::<Alert>(1024);
        let stats = Arc::new(Stats::default());
        let st = stats.clone();
        let client = match crate::outbound::Client::new(&tls, ALERT_TIMEOUT) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "alert webhooks disabled: no HTTP client");
                return Alerter::disabled();
            }
        };
        tokio::spawn(async move {
            while let Some(alert) = rx.recv().await {
                for hook in &hooks {
                    let Some(body) = body_for(hook, &alert) else {
                        continue;
                    };
                    let (hook, st, client) = (hook.clone(), st.clone(), client.clone());
                    // Each delivery runs on its own so a slow hook does not delay the others.
                    tokio::spawn(async move { deliver(&hook, body, &st, &client).await });
                }
            }
        });
        Alerter {
            tx: Some(tx),
            stats,
        }
    }

    /// Queues an alert for an event if it is alertable. Never waits.
    pub fn notify(&self, e: &AccessEvent, custodians: Vec<String>) {
        let Some(tx) = &self.tx else { return };
        if !alertable(e) {
            return;
        }
        let alert = Alert {
            source: "breakglass",
            summary: summary(e),
            custodians,
            event: e.clone(),
        };
        if tx.try_send(alert).is_err() {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(event_id = %e.event_id, "alert queue full, alert dropped");
        }
    }
}

/// Posts the alert of an event to every hook and waits for the outcome: for the CLI, which
/// has no delivery worker and exits right after. Returns how many hooks took it (retried like
/// the worker's; never an error, since the event is already on the record).
pub async fn send_now(
    hooks: &[Webhook],
    tls: &Arc<tokio_rustls::rustls::ClientConfig>,
    e: &AccessEvent,
    custodians: Vec<String>,
) -> usize {
    if hooks.is_empty() || !alertable(e) {
        return 0;
    }
    let client = match crate::outbound::Client::new(tls, ALERT_TIMEOUT) {
        Ok(c) => c,
        Err(err) => {
            tracing::error!(error = %err, "alert not sent: no HTTP client");
            return 0;
        }
    };
    let alert = Alert {
        source: "breakglass",
        summary: summary(e),
        custodians,
        event: e.clone(),
    };
    let stats = Stats::default();
    let posts = hooks
        .iter()
        .filter_map(|hook| Some(deliver(hook, body_for(hook, &alert)?, &stats, &client)));
    // A hook that does not answer must not hold the operator's terminal for long.
    if tokio::time::timeout(
        ALERT_TIMEOUT + Duration::from_secs(1),
        futures::future::join_all(posts),
    )
    .await
    .is_err()
    {
        tracing::warn!("an alert webhook did not answer in time; the event is on the record");
    }
    stats.sent.load(Ordering::Relaxed) as usize
}

/// The body a hook gets for an alert, in its format.
fn body_for(hook: &Webhook, alert: &Alert) -> Option<Vec<u8>> {
    match hook.format {
        Format::Json => serde_json::to_vec(alert),
        Format::Slack => serde_json::to_vec(&slack_body(&alert.summary)),
    }
    .ok()
}

/// The time limit of one alert post (connection, request and response).
const ALERT_TIMEOUT: Duration = Duration::from_secs(5);

impl Alerter {
    /// Tells custodians that a SIEM sink refused `e` for good and where it is kept. Not
    /// subject to [`alertable`]: a dead-lettered event is always worth a look.
    pub fn notify_dead_letter(
        &self,
        sink: &str,
        e: &AccessEvent,
        why: &str,
        file: &std::path::Path,
    ) {
        let Some(tx) = &self.tx else { return };
        let alert = Alert {
            source: "breakglass",
            summary: format!(
                "[breakglass] SIEM sink {sink} refused the {} event {} for good ({why}); it will not be retried and is kept in {}",
                e.action.as_str(),
                e.event_id,
                file.display()
            ),
            custodians: Vec::new(),
            event: e.clone(),
        };
        if tx.try_send(alert).is_err() {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(event_id = %e.event_id, "alert queue full, dead-letter alert dropped");
        }
    }
}

/// Posts with up to 5 attempts, backing off 250 ms × 2ⁿ with ±50 % jitter.
async fn deliver(hook: &Webhook, body: Vec<u8>, stats: &Stats, client: &crate::outbound::Client) {
    let mut delay = Duration::from_millis(250);
    for attempt in 1..=5u32 {
        // The client's own limit bounds the attempt; this one also covers the header checks.
        match tokio::time::timeout(ALERT_TIMEOUT, post(hook, body.clone(), client)).await {
            Ok(Ok(status)) if (200..300).contains(&status) => {
                stats.sent.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Ok(Ok(status)) => {
                tracing::warn!(host = %hook.url.host, status, attempt, "webhook refused the alert")
            }
            Ok(Err(e)) => {
                tracing::warn!(host = %hook.url.host, error = %e, attempt, "webhook failed")
            }
            Err(_) => tracing::warn!(host = %hook.url.host, attempt, "webhook timed out"),
        }
        if attempt == 5 {
            break;
        }
        let jitter = 0.5 + rand::random::<f64>();
        tokio::time::sleep(delay.mul_f64(jitter)).await;
        delay = delay.saturating_mul(2);
    }
    stats.failed.fetch_add(1, Ordering::Relaxed);
    tracing::error!(host = %hook.url.host, "alert not delivered after 5 attempts");
}

/// Posts the alert; returns the status code.
async fn post(
    hook: &Webhook,
    body: Vec<u8>,
    client: &crate::outbound::Client,
) -> Result<u16, String> {
    let headers: Vec<(String, String)> = hook.header.iter().cloned().collect();
    client
        .post(&hook.url, &headers, body)
        .await
        .map(|r| r.status)
}

/// TLS settings for webhooks: the Mozilla roots plus an optional extra CA file (PEM).
pub fn tls_config(
    extra_ca: Option<&std::path::Path>,
) -> Result<Arc<tokio_rustls::rustls::ClientConfig>, String> {
    client_tls(extra_ca, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_table() {
        type Want<'a> = Option<(bool, &'a str, u16, &'a str)>;
        let cases: &[(&str, Want)] = &[
            (
                "http://127.0.0.1:9000/hook",
                Some((false, "127.0.0.1", 9000, "/hook")),
            ),
            (
                "https://hooks.slack.com/services/T/B/X",
                Some((true, "hooks.slack.com", 443, "/services/T/B/X")),
            ),
            ("http://example.org", Some((false, "example.org", 80, "/"))),
            (
                "http://[::1]:8080/x?y=1",
                Some((false, "::1", 8080, "/x?y=1")),
            ),
            ("ftp://x/y", None),
            ("http://:80/", None),
            ("http://user:pw@host/", None),
            ("http://host:99999/", None),
        ];
        for (s, want) in cases {
            let got = Url::parse(s).ok().map(|u| (u.tls, u.host, u.port, u.path));
            let want = want.map(|(t, h, p, path)| (t, h.to_string(), p, path.to_string()));
            assert_eq!(got, want, "{s}");
        }
    }

    #[test]
    fn only_actionable_events_alert() {
        let mut e = AccessEvent::new(Action::GrantCreated, "op");
        assert!(!alertable(&e));
        e.emergency = Some(true);
        assert!(alertable(&e));
        assert!(summary(&e).contains("EMERGENCY"));
        assert!(alertable(&AccessEvent::new(Action::SessionStart, "alice")));
        assert!(!alertable(&AccessEvent::new(Action::SessionEnd, "alice")));
    }

    #[test]
    fn slack_text_is_text() {
        let mut e = AccessEvent::new(Action::RequestCreated, "alice");
        e.justification =
            Some("<!channel> \x1b]52;c;ZXZpbA==\x07 <https://evil|Approve> & co".into());
        e.incident_id = Some("INC-\u{202E}1".into());
        let s = summary(&e);
        assert!(!s.chars().any(crate::text::is_refused), "{s:?}");
        assert!(s.contains("\\u{1b}]52;c;ZXZpbA==\\u{7}"), "{s}");
        let body = slack_body(&s);
        let text = body["text"].as_str().expect("text");
        assert!(
            text.contains("&lt;!channel&gt; \\u{1b}]52;c;ZXZpbA==\\u{7} &lt;https://evil|Approve&gt; &amp; co"),
            "{text}"
        );
        assert!(text.contains("INC-\\u{202e}1"), "{text}");
        assert!(!text.contains('<') && !text.contains('>'), "{text}");
    }
}
