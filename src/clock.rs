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

/// Parses a moment as people write it: an RFC 3339 time, a `YYYY-MM-DD` date (midnight UTC), or
/// an age like `2h` or `30d` (meaning that long before now).
pub fn parse_when(s: &str) -> Result<DateTime<Utc>, String> {
    let s = s.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    if let Some(t) = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
    {
        return Ok(t.and_utc());
    }
    let bad =
        || format!("`{s}` is not an RFC 3339 time, a YYYY-MM-DD date or an age like 2h or 30d");
    let age = humantime::parse_duration(s).map_err(|_| bad())?;
    let age = chrono::Duration::from_std(age).map_err(|_| bad())?;
    now().checked_sub_signed(age).ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_when_takes_times_dates_and_ages() {
        let t = parse_when("2026-11-01T10:00:00Z").expect("rfc3339");
        assert_eq!(rfc3339(t), "2026-11-01T10:00:00.000Z");
        let d = parse_when("2026-11-01").expect("date");
        assert_eq!(rfc3339(d), "2026-11-01T00:00:00.000Z");
        let age = now() - parse_when("2h").expect("age");
        assert!((age.num_seconds() - 7200).abs() < 5, "{age}");
        for bad in ["yesterday", "2026-13-01", ""] {
            assert!(parse_when(bad).is_err(), "{bad}");
        }
    }
}
