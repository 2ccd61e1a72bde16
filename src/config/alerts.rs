//! Webhook alert destinations, as configured. Delivery lives in `alerts`.

/// The body shape a webhook expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WebhookFormat {
    /// `{"source", "summary", "custodians", "event"}`.
    Json,
    /// `{"text"}`, which Slack incoming webhooks (and many chat tools) accept.
    Slack,
}

/// One webhook destination.
#[derive(Debug, Clone)]
pub struct Webhook {
    pub url: crate::outbound::Url,
    pub format: WebhookFormat,
    /// Extra header sent with every post, e.g. `Authorization: Bearer ...`.
    pub header: Option<(String, String)>,
}
