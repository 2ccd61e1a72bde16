//! The one wall-clock function: every timestamp the gateway writes comes from here.

use chrono::{DateTime, Utc};

/// Returns the current wall-clock time in UTC.
///
/// Deadlines are enforced with `tokio::time::Instant`, which tests can pause and advance;
/// this function only stamps records.
pub fn now() -> DateTime<Utc> {
    Utc::now()
}

/// Formats a timestamp as RFC 3339 with millisecond precision and a `Z` suffix.
pub fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}
