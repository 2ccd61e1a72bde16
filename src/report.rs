//! Break-glass metrics for a period: how often, on which systems, by how many people, and how
//! much of it happened outside planned maintenance. The [`Report`] is the JSON API body and
//! the output of `breakglass report --format json`.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Datelike, Days, Months, NaiveDate, Utc};
use serde::Serialize;

use crate::clock::rfc3339;
use crate::config::{Config, MaintenanceWindow};
use crate::state::{SessionFilter, SessionRow, StateError, Store};

/// Version of the [`Report`] shape.
pub const SCHEMA_VERSION: u32 = 1;

/// The most `per_period` buckets one report may have.
pub const MAX_BUCKETS: i64 = 1000;

/// The width of one `per_period` bucket. Weeks start Monday 00:00 UTC, months on the 1st.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Period {
    Day,
    Week,
    Month,
}

impl Period {
    pub fn as_str(self) -> &'static str {
        match self {
            Period::Day => "day",
            Period::Week => "week",
            Period::Month => "month",
        }
    }

    /// Refuses a range that would need more than [`MAX_BUCKETS`] buckets: a chart of more bars
    /// helps nobody, and the limit bounds the work for the CLI and the web alike.
    pub fn check_range(self, since: DateTime<Utc>, until: DateTime<Utc>) -> Result<(), String> {
        let per = match self {
            Period::Day => 86_400,
            Period::Week => 7 * 86_400,
            Period::Month => 28 * 86_400,
        };
        if (until - since).num_seconds() / per > MAX_BUCKETS {
            return Err(format!(
                "that range has more than {MAX_BUCKETS} {}s; pick a longer period or a shorter range",
                self.as_str()
            ));
        }
        Ok(())
    }

    /// The start of the bucket holding `t`.
    fn floor(self, t: DateTime<Utc>) -> DateTime<Utc> {
        let d = t.date_naive();
        let d = match self {
            Period::Day => d,
            Period::Week => d - Days::new(u64::from(d.weekday().num_days_from_monday())),
            // Day 1 exists in every month.
            Period::Month => NaiveDate::from_ymd_opt(d.year(), d.month(), 1).unwrap_or(d),
        };
        d.and_time(chrono::NaiveTime::MIN).and_utc()
    }

    /// The start of the bucket after the one starting at `start`; `None` past chrono's range.
    fn next(self, start: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            Period::Day => start.checked_add_days(Days::new(1)),
            Period::Week => start.checked_add_days(Days::new(7)),
            Period::Month => start.checked_add_months(Months::new(1)),
        }
    }
}

impl std::str::FromStr for Period {
    type Err = String;
    fn from_str(s: &str) -> Result<Period, String> {
        match s {
            "day" => Ok(Period::Day),
            "week" => Ok(Period::Week),
            "month" => Ok(Period::Month),
            other => Err(format!("`{other}` is not one of day, week, month")),
        }
    }
}

impl std::fmt::Display for Period {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Break-glass metrics for `since..until` (start inclusive, end exclusive). A break-glass
/// event is one session through the gateway, counted at its start.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub schema_version: u32,
    pub since: String,
    pub until: String,
    pub period: Period,
    /// The configured windows, as written; an event starting outside all of them is counted
    /// in `outside_windows` (with no windows configured, every event is).
    pub maintenance_windows: Vec<String>,
    pub totals: Totals,
    /// One row per target with events, most events first.
    pub per_system: Vec<SystemRow>,
    /// One row per bucket from `since` to `until`, empty ones included; the first and last
    /// are cut to the range.
    pub per_period: Vec<PeriodRow>,
    /// Rehearsals (`breakglass drill`), counted apart: their sessions and grants are in none
    /// of the figures above.
    pub drills: Drills,
}

/// The drills whose request was made in the range.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Drills {
    pub drills: u64,
    pub passed: u64,
    pub failed: u64,
    /// Requested but with no outcome on record (still running, or stopped before the end).
    pub unfinished: u64,
    /// Percent (0-100) of finished drills that passed; `None` with none finished.
    pub pass_rate_pct: Option<f64>,
    /// Time to access of the passed drills (request to the first byte on the target).
    pub median_time_to_access_seconds: Option<f64>,
    pub max_time_to_access_seconds: Option<f64>,
    /// Drill sessions left out of the incident figures.
    pub sessions: u64,
    /// The latest drill that passed, per target (RFC 3339).
    pub last_passed: BTreeMap<String, String>,
}

/// The whole range.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Totals {
    pub events: u64,
    /// Grants created in the range (operator grants, approvals, emergency self-service).
    pub grants: u64,
    pub unique_users: u64,
    /// Mean gap between consecutive session starts; `None` with fewer than two events.
    pub mean_time_between_events_seconds: Option<f64>,
    pub outside_windows: u64,
    /// Percent (0-100) of events outside maintenance windows; `None` with no events.
    pub outside_windows_pct: Option<f64>,
}

/// One target.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SystemRow {
    pub target: String,
    pub protocol: String,
    pub events: u64,
    pub unique_users: u64,
    pub mean_time_between_events_seconds: Option<f64>,
    pub outside_windows: u64,
    pub outside_windows_pct: Option<f64>,
    /// Start of the latest session on this target.
    pub last_event: String,
}

/// One bucket of `per_period`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PeriodRow {
    pub start: String,
    pub end: String,
    pub events: u64,
    pub unique_users: u64,
    pub outside_windows: u64,
}

/// When each target last passed a drill (the `drill_finished` success of a request made with
/// scenario `drill`).
pub async fn last_passed_drills(
    store: &dyn Store,
) -> Result<BTreeMap<String, DateTime<Utc>>, StateError> {
    let mut last: BTreeMap<String, DateTime<Utc>> = BTreeMap::new();
    for r in store.list_requests(None).await? {
        if r.scenario != "drill" {
            continue;
        }
        let events = store.events(&r.id).await?;
        if let Some(e) = events
            .iter()
            .filter(|e| e.event_type == "drill_finished" && e.event_data["outcome"] == "success")
            .max_by_key(|e| e.created_at)
        {
            let at = last.entry(r.target.clone()).or_insert(e.created_at);
            if *at < e.created_at {
                *at = e.created_at;
            }
        }
    }
    Ok(last)
}

/// Computes the report from the session index and the grants.
pub async fn compute(
    store: &dyn Store,
    cfg: &Config,
    since: DateTime<Utc>,
    until: DateTime<Utc>,
    period: Period,
) -> Result<Report, StateError> {
    // `list_sessions` takes started_at in [since, until) and, with no limit, returns all.
    let sessions = store
        .list_sessions(&SessionFilter {
            since: Some(since),
            until: Some(until),
            ..Default::default()
        })
        .await?;
    let all_grants = store.list_grants(None).await?;
    let drill_requests: Vec<crate::state::Request> = store
        .list_requests(None)
        .await?
        .into_iter()
        .filter(|r| r.scenario == "drill")
        .collect();
    let drill_ids: BTreeSet<&str> = drill_requests.iter().map(|r| r.id.as_str()).collect();
    let drill_grants: BTreeSet<&str> = all_grants
        .iter()
        .filter(|g| {
            g.request_id
                .as_deref()
                .is_some_and(|r| drill_ids.contains(r))
        })
        .map(|g| g.id.as_str())
        .collect();
    let grants = all_grants
        .iter()
        .filter(|g| g.created_at >= since && g.created_at < until)
        .filter(|g| !drill_grants.contains(g.id.as_str()))
        .count() as u64;
    let (drill_sessions, sessions): (Vec<SessionRow>, Vec<SessionRow>) = sessions
        .into_iter()
        .partition(|s| drill_grants.contains(s.grant_id.as_str()));
    let mut drills = Drills {
        sessions: drill_sessions.len() as u64,
        ..Drills::default()
    };
    let mut access = Vec::new();
    for r in drill_requests
        .iter()
        .filter(|r| r.created_at >= since && r.created_at < until)
    {
        drills.drills += 1;
        let events = store.events(&r.id).await?;
        match events
            .iter()
            .rev()
            .find(|e| e.event_type == "drill_finished")
        {
            Some(e) if e.event_data["outcome"] == "success" => {
                drills.passed += 1;
                if let Some(ms) = e.event_data["time_to_access_ms"].as_u64() {
                    access.push(ms as f64 / 1000.0);
                }
                let at = rfc3339(e.created_at);
                let last = drills.last_passed.entry(r.target.clone()).or_default();
                if *last < at {
                    *last = at;
                }
            }
            Some(_) => drills.failed += 1,
            None => drills.unfinished += 1,
        }
    }
    let finished = drills.passed + drills.failed;
    drills.pass_rate_pct = (finished > 0).then(|| 100.0 * drills.passed as f64 / finished as f64);
    access.sort_by(|a, b| a.total_cmp(b));
    drills.median_time_to_access_seconds = (!access.is_empty()).then(|| access[access.len() / 2]);
    drills.max_time_to_access_seconds = access.last().copied();
    let mut r = from_sessions(
        sessions,
        grants,
        &cfg.reports.maintenance_windows,
        since,
        until,
        period,
    );
    r.drills = drills;
    Ok(r)
}

/// The pure part of [`compute`]: `sessions` must all start in `since..until`.
fn from_sessions(
    mut sessions: Vec<SessionRow>,
    grants: u64,
    windows: &[MaintenanceWindow],
    since: DateTime<Utc>,
    until: DateTime<Utc>,
    period: Period,
) -> Report {
    sessions.sort_by(|a, b| (a.started_at, &a.id).cmp(&(b.started_at, &b.id)));
    let outside = |s: &SessionRow| !windows.iter().any(|w| w.contains(s.started_at));
    let all: Vec<&SessionRow> = sessions.iter().collect();
    let totals = {
        let s = Stats::of(&all, &outside);
        Totals {
            events: s.events,
            grants,
            unique_users: s.unique_users,
            mean_time_between_events_seconds: s.mean_gap,
            outside_windows: s.outside,
            outside_windows_pct: s.outside_pct(),
        }
    };

    let mut by_target: BTreeMap<&str, Vec<&SessionRow>> = BTreeMap::new();
    for s in &sessions {
        by_target.entry(&s.target).or_default().push(s);
    }
    let mut per_system: Vec<SystemRow> = by_target
        .into_iter()
        .filter_map(|(target, rows)| {
            // Rows are in start order, so the last is the latest.
            let last = rows.last()?;
            let s = Stats::of(&rows, &outside);
            Some(SystemRow {
                target: target.to_string(),
                protocol: last.protocol.clone(),
                events: s.events,
                unique_users: s.unique_users,
                mean_time_between_events_seconds: s.mean_gap,
                outside_windows: s.outside,
                outside_windows_pct: s.outside_pct(),
                last_event: rfc3339(last.started_at),
            })
        })
        .collect();
    per_system.sort_by(|a, b| b.events.cmp(&a.events).then(a.target.cmp(&b.target)));

    let mut per_period = Vec::new();
    let mut start = since;
    while start < until {
        let end = period
            .next(period.floor(start))
            .map_or(until, |n| n.min(until));
        let rows: Vec<&SessionRow> = sessions
            .iter()
            .filter(|s| s.started_at >= start && s.started_at < end)
            .collect();
        let s = Stats::of(&rows, &outside);
        per_period.push(PeriodRow {
            start: rfc3339(start),
            end: rfc3339(end),
            events: s.events,
            unique_users: s.unique_users,
            outside_windows: s.outside,
        });
        start = end;
    }

    Report {
        schema_version: SCHEMA_VERSION,
        since: rfc3339(since),
        until: rfc3339(until),
        period,
        maintenance_windows: windows.iter().map(|w| w.to_string()).collect(),
        totals,
        per_system,
        per_period,
        drills: Drills::default(),
    }
}

/// Counts over some sessions (in start order).
struct Stats {
    events: u64,
    unique_users: u64,
    mean_gap: Option<f64>,
    outside: u64,
}

impl Stats {
    fn of(rows: &[&SessionRow], outside: &dyn Fn(&SessionRow) -> bool) -> Stats {
        let users: BTreeSet<&str> = rows.iter().map(|s| s.person.as_str()).collect();
        // The mean of consecutive gaps telescopes to (last - first) / (n - 1).
        let mean_gap = match (rows.first(), rows.last()) {
            (Some(first), Some(last)) if rows.len() >= 2 => {
                let span = (last.started_at - first.started_at).num_milliseconds() as f64;
                Some(span / 1000.0 / (rows.len() - 1) as f64)
            }
            _ => None,
        };
        Stats {
            events: rows.len() as u64,
            unique_users: users.len() as u64,
            mean_gap,
            outside: rows.iter().filter(|s| outside(s)).count() as u64,
        }
    }

    fn outside_pct(&self) -> Option<f64> {
        (self.events > 0).then(|| self.outside as f64 * 100.0 / self.events as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::SqliteStore;
    use chrono::TimeZone;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .expect("test time is RFC 3339")
            .with_timezone(&Utc)
    }

    fn row(n: usize, person: &str, target: &str, start: &str) -> SessionRow {
        let started_at = t(start);
        SessionRow {
            id: format!("s-{n:03}"),
            protocol: if target.starts_with("db") {
                "postgres".into()
            } else {
                "ssh".into()
            },
            person: person.into(),
            target: target.into(),
            grant_id: format!("g-{n}"),
            client_addr: "127.0.0.1:5000".into(),
            started_at,
            deadline: started_at + chrono::Duration::hours(1),
            ended_at: Some(started_at + chrono::Duration::minutes(5)),
            end_reason: Some("client_closed".into()),
            bytes_in: 10,
            bytes_out: 20,
            recording_prefix: format!("sessions/x/s-{n:03}"),
            node_id: "n1".into(),
        }
    }

    /// Puts `rows` in a fresh store and computes the report through [`compute`].
    async fn report(
        rows: &[SessionRow],
        windows: &[&str],
        since: &str,
        until: &str,
        period: Period,
    ) -> Report {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SqliteStore::open(&dir.path().join("s.sqlite")).expect("open");
        for r in rows {
            store.insert_session(r).await.expect("insert");
        }
        let text = format!(
            r#"
data_dir = "/tmp/bg"
[listeners]
ssh = "127.0.0.1:2222"
[reports]
maintenance_windows = {windows:?}
"#
        );
        let cfg = Config::from_toml(&text).expect("test config is valid");
        compute(&store, &cfg, t(since), t(until), period)
            .await
            .expect("compute")
    }

    #[tokio::test]
    async fn mean_time_between_events() {
        let cases: &[(&[&str], Option<f64>)] = &[
            (&[], None),
            (&["2024-06-03T10:00:00Z"], None),
            (
                &["2024-06-03T10:00:00Z", "2024-06-03T10:01:00Z"],
                Some(60.0),
            ),
            (
                // Gaps of 60 s and 3540 s: mean 1800 s, whatever the insertion order.
                &[
                    "2024-06-03T11:00:00Z",
                    "2024-06-03T10:00:00Z",
                    "2024-06-03T10:01:00Z",
                ],
                Some(1800.0),
            ),
            (
                &["2024-06-03T10:00:00.500Z", "2024-06-03T10:00:01Z"],
                Some(0.5),
            ),
        ];
        for (starts, want) in cases {
            let rows: Vec<SessionRow> = starts
                .iter()
                .enumerate()
                .map(|(i, s)| row(i, "alice", "web-01", s))
                .collect();
            let r = report(
                &rows,
                &[],
                "2024-06-01T00:00:00Z",
                "2024-07-01T00:00:00Z",
                Period::Month,
            )
            .await;
            assert_eq!(
                r.totals.mean_time_between_events_seconds, *want,
                "{starts:?}"
            );
            assert_eq!(r.totals.events, starts.len() as u64);
        }
    }

    #[test]
    fn ranges_needing_too_many_buckets_are_refused() {
        let since = "2020-01-01T00:00:00Z"
            .parse::<DateTime<Utc>>()
            .expect("since");
        let days = |n| since + chrono::Duration::days(n);
        assert!(Period::Day.check_range(since, days(MAX_BUCKETS)).is_ok());
        let e = Period::Day
            .check_range(since, days(MAX_BUCKETS + 1))
            .expect_err("1001 days");
        assert!(e.contains("more than 1000 days"), "{e}");
        assert!(Period::Week
            .check_range(since, days(MAX_BUCKETS + 1))
            .is_ok());
        assert!(Period::Month.check_range(since, days(28 * 1001)).is_err());
    }

    #[tokio::test]
    async fn buckets_cover_the_range_including_empty_ones() {
        let rows = vec![
            row(1, "alice", "web-01", "2024-06-03T10:00:00Z"),
            row(2, "bob", "web-01", "2024-06-03T23:59:59Z"),
            row(3, "alice", "db-01", "2024-06-05T08:00:00Z"),
            row(4, "carol", "web-01", "2024-06-30T12:00:00Z"),
            // Outside the range on both sides.
            row(5, "dave", "web-01", "2024-06-02T23:59:59Z"),
            row(6, "dave", "web-01", "2024-07-01T00:00:00Z"),
        ];
        // (period, since, until, expected [(start, end, events, unique_users)])
        type Bucket = (&'static str, &'static str, u64, u64);
        let cases: &[(Period, &str, &str, &[Bucket])] = &[
            (
                Period::Day,
                "2024-06-03T00:00:00Z",
                "2024-06-06T00:00:00Z",
                &[
                    ("2024-06-03T00:00:00.000Z", "2024-06-04T00:00:00.000Z", 2, 2),
                    ("2024-06-04T00:00:00.000Z", "2024-06-05T00:00:00.000Z", 0, 0),
                    ("2024-06-05T00:00:00.000Z", "2024-06-06T00:00:00.000Z", 1, 1),
                ],
            ),
            (
                // 2024-06-05 is a Wednesday: the first week is cut at `since`, the next
                // starts on Monday 2024-06-10.
                Period::Week,
                "2024-06-05T06:00:00Z",
                "2024-06-18T00:00:00Z",
                &[
                    ("2024-06-05T06:00:00.000Z", "2024-06-10T00:00:00.000Z", 1, 1),
                    ("2024-06-10T00:00:00.000Z", "2024-06-17T00:00:00.000Z", 0, 0),
                    ("2024-06-17T00:00:00.000Z", "2024-06-18T00:00:00.000Z", 0, 0),
                ],
            ),
            (
                Period::Month,
                "2024-05-15T00:00:00Z",
                "2024-07-02T00:00:00Z",
                &[
                    ("2024-05-15T00:00:00.000Z", "2024-06-01T00:00:00.000Z", 0, 0),
                    ("2024-06-01T00:00:00.000Z", "2024-07-01T00:00:00.000Z", 5, 4),
                    ("2024-07-01T00:00:00.000Z", "2024-07-02T00:00:00.000Z", 1, 1),
                ],
            ),
            (
                Period::Day,
                "2024-06-03T00:00:00Z",
                "2024-06-03T00:00:00Z",
                &[],
            ),
        ];
        for (period, since, until, want) in cases {
            let r = report(&rows, &[], since, until, *period).await;
            let got: Vec<(String, String, u64, u64)> = r
                .per_period
                .iter()
                .map(|b| (b.start.clone(), b.end.clone(), b.events, b.unique_users))
                .collect();
            let want: Vec<(String, String, u64, u64)> = want
                .iter()
                .map(|w| (w.0.to_string(), w.1.to_string(), w.2, w.3))
                .collect();
            assert_eq!(got, want, "{period} {since}..{until}");
            let sum: u64 = r.per_period.iter().map(|b| b.events).sum();
            assert_eq!(sum, r.totals.events, "buckets add up to the total");
        }
    }

    #[tokio::test]
    async fn outside_window_percentage() {
        let rows = vec![
            // Saturday 03:00, inside "Sat 02:00-06:00".
            row(1, "alice", "web-01", "2024-06-08T03:00:00Z"),
            // Monday 23:00 and Tuesday 01:00, inside "Mon-Fri 22:00-02:00".
            row(2, "bob", "web-01", "2024-06-03T23:00:00Z"),
            row(3, "bob", "db-01", "2024-06-04T01:00:00Z"),
            // Wednesday noon: outside.
            row(4, "carol", "db-01", "2024-06-05T12:00:00Z"),
        ];
        // (windows, outside, outside %, per system [(target, outside, outside %)])
        type System = (&'static str, u64, Option<f64>);
        type Case = (&'static [&'static str], u64, Option<f64>, &'static [System]);
        let cases: &[Case] = &[
            (
                &[],
                4,
                Some(100.0),
                &[("db-01", 2, Some(100.0)), ("web-01", 2, Some(100.0))],
            ),
            (
                &["Sat 02:00-06:00"],
                3,
                Some(75.0),
                &[("db-01", 2, Some(100.0)), ("web-01", 1, Some(50.0))],
            ),
            (
                &["Sat 02:00-06:00", "Mon-Fri 22:00-02:00"],
                1,
                Some(25.0),
                &[("db-01", 1, Some(50.0)), ("web-01", 0, Some(0.0))],
            ),
        ];
        for (windows, outside, pct, systems) in cases {
            let r = report(
                &rows,
                windows,
                "2024-06-01T00:00:00Z",
                "2024-07-01T00:00:00Z",
                Period::Week,
            )
            .await;
            assert_eq!(r.totals.outside_windows, *outside, "{windows:?}");
            assert_eq!(r.totals.outside_windows_pct, *pct, "{windows:?}");
            assert_eq!(r.maintenance_windows, *windows);
            let got: Vec<(&str, u64, Option<f64>)> = r
                .per_system
                .iter()
                .map(|s| (s.target.as_str(), s.outside_windows, s.outside_windows_pct))
                .collect();
            assert_eq!(&got, systems, "{windows:?}");
            let bucketed: u64 = r.per_period.iter().map(|b| b.outside_windows).sum();
            assert_eq!(bucketed, *outside);
        }
        let empty = report(
            &[],
            &[],
            "2024-06-01T00:00:00Z",
            "2024-06-02T00:00:00Z",
            Period::Day,
        )
        .await;
        assert_eq!(empty.totals.outside_windows_pct, None);
        assert!(empty.per_system.is_empty());
        assert_eq!(empty.per_period.len(), 1);
    }

    #[tokio::test]
    async fn per_system_rows_and_grants_in_the_range() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SqliteStore::open(&dir.path().join("s.sqlite")).expect("open");
        let rows = [
            row(1, "alice", "web-01", "2024-06-03T10:00:00Z"),
            row(2, "bob", "web-01", "2024-06-03T12:00:00Z"),
            row(3, "alice", "web-01", "2024-06-04T10:00:00Z"),
            row(4, "carol", "db-01", "2024-06-05T10:00:00Z"),
        ];
        for r in &rows {
            store.insert_session(r).await.expect("insert");
        }
        for (person, at) in [
            ("alice", "2024-06-03T09:59:00Z"),
            ("bob", "2024-06-03T11:59:00Z"),
            ("zed", "2024-05-31T23:59:59Z"),
        ] {
            store
                .create_grant(crate::state::NewGrant {
                    person: person.into(),
                    target: "web-01".into(),
                    reason: "disk full".into(),
                    incident_id: "INC-1".into(),
                    created_by: "operator:root".into(),
                    created_at: t(at),
                    expires_at: t(at) + chrono::Duration::hours(1),
                })
                .await
                .expect("grant");
        }
        let cfg = Config::from_toml("[listeners]\nssh = \"127.0.0.1:2222\"\n").expect("config");
        let since = Utc
            .with_ymd_and_hms(2024, 6, 1, 0, 0, 0)
            .single()
            .expect("valid");
        let r = compute(
            &store,
            &cfg,
            since,
            since + chrono::Duration::days(30),
            Period::Week,
        )
        .await
        .expect("compute");
        assert_eq!(
            r.totals.grants, 2,
            "the grant before the range is not counted"
        );
        assert_eq!(r.totals.unique_users, 3);
        let web = &r.per_system[0];
        assert_eq!(
            (
                web.target.as_str(),
                web.protocol.as_str(),
                web.events,
                web.unique_users
            ),
            ("web-01", "ssh", 3, 2)
        );
        assert_eq!(web.mean_time_between_events_seconds, Some(43_200.0));
        assert_eq!(web.last_event, "2024-06-04T10:00:00.000Z");
        let db = &r.per_system[1];
        assert_eq!(
            (db.target.as_str(), db.protocol.as_str()),
            ("db-01", "postgres")
        );
        assert_eq!(db.mean_time_between_events_seconds, None);
        let json = serde_json::to_value(&r).expect("serialize");
        let schema: serde_json::Value =
            serde_json::from_str(include_str!("../recordings-schema/report.schema.json"))
                .expect("schema is JSON");
        let v = jsonschema::validator_for(&schema).expect("schema compiles");
        let errors: Vec<String> = v.iter_errors(&json).map(|e| e.to_string()).collect();
        assert!(errors.is_empty(), "{json}: {errors:?}");
        assert_eq!(json["period"], "week");
        assert_eq!(json["since"], "2024-06-01T00:00:00.000Z");
        assert!(json["totals"]["outside_windows_pct"].is_number());
    }
}
