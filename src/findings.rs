//! Automated audit findings: a rule set run over every ended session, so that a reviewer
//! knows where to look first. Each finding names its rule, a severity, and the moment in the
//! recording (channel and seconds from its start) when there is one.
//!
//! The rules read what the gateway already holds: the session's index row, the commands and
//! SQL statements extracted into the search index (redacted as the recording is), the
//! configured maintenance windows and earlier sessions of the same person and target.
//!
//! Default rules (see [`Rules`]):
//! - `destructive`: `rm -rf`, `mkfs`, `dd of=/dev/…`, `chmod 777`, `curl … | sh` / `wget … |
//!   sh`, and SQL `DROP`, `TRUNCATE`, `DELETE` or `UPDATE` without `WHERE`.
//! - `data_out`: SQL `COPY … TO`, or more than `data_out_bytes` sent to the client.
//! - `outside_windows`: started outside every maintenance window (only with windows set).
//! - `odd_hours`: started between `odd_hours` (UTC, default 22–6).
//! - `new_target`: the person's first session on this target.
//! - `long_session`: longer than `long_factor` × the median of this target's earlier sessions
//!   (with at least 5 of them).
//! - `after_warning`: a command typed after the first deadline warning.
//!
//! Where it can be wrong: commands are what the line editor extracted (a command built in a
//! script or an editor is not seen); the SQL rules read the statement text, not the plan.

use std::collections::BTreeMap;

use chrono::{DateTime, Timelike, Utc};
use serde::Serialize;

use crate::config::MaintenanceWindow;
use crate::state::{SearchEntry, SessionRow};

/// How serious a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Info,
    Warning,
    High,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::High => "high",
        }
    }
}

/// One finding.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Finding {
    pub session_id: String,
    pub person: String,
    pub target: String,
    pub rule: &'static str,
    pub severity: Severity,
    /// The moment: channel and seconds since the channel started (None: the whole session).
    pub channel: Option<u32>,
    pub offset_seconds: Option<f64>,
    /// The wall-clock time of the moment (the session start when there is none).
    pub at: String,
    pub detail: String,
}

/// The rule settings.
#[derive(Debug, Clone)]
pub struct Rules {
    pub windows: Vec<MaintenanceWindow>,
    /// UTC hours [from, to) that count as odd (wrapping past midnight when from > to);
    /// None: the rule is off.
    pub odd_hours: Option<(u32, u32)>,
    pub data_out_bytes: u64,
    pub long_factor: f64,
    /// The first deadline warning before the deadline.
    pub first_warning: Option<std::time::Duration>,
}

impl Default for Rules {
    fn default() -> Self {
        Rules {
            windows: Vec::new(),
            odd_hours: Some((22, 6)),
            data_out_bytes: 100 << 20,
            long_factor: 3.0,
            first_warning: None,
        }
    }
}

/// The statements of a SQL text (a simple query may hold several), split at `;` outside
/// quotes.
fn statements(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut start, mut quote) = (0, None::<char>);
    for (i, c) in text.char_indices() {
        match (quote, c) {
            (None, '\'' | '"') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, ';') => {
                out.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&text[start..]);
    out.retain(|s| !s.trim().is_empty());
    out
}

/// Why a command or statement is destructive, if it is.
pub fn destructive(kind: &str, text: &str) -> Option<&'static str> {
    if kind == "sql" {
        return statements(text).into_iter().find_map(|st| {
            let t = st.to_lowercase();
            let words: Vec<&str> = t.split_whitespace().collect();
            let first = words.first().copied().unwrap_or("");
            let has_where = words.contains(&"where");
            match first {
                "drop" => Some("DROP"),
                "truncate" => Some("TRUNCATE"),
                "delete" if !has_where => Some("DELETE without WHERE"),
                "update" if !has_where => Some("UPDATE without WHERE"),
                _ => None,
            }
        });
    }
    let t = text.to_lowercase();
    // Shell: look at each command of a pipeline or list.
    let piped_to_shell = t.contains("curl ") || t.contains("wget ");
    if piped_to_shell
        && t.split('|').skip(1).any(|p| {
            let p = p.trim_start().trim_start_matches("sudo ").trim_start();
            ["sh", "bash", "zsh", "dash"]
                .iter()
                .any(|s| p == *s || p.starts_with(&format!("{s} ")))
        })
    {
        return Some("a download piped to a shell");
    }
    for cmd in t.split(['|', ';', '&']) {
        let w: Vec<&str> = cmd
            .split_whitespace()
            .skip_while(|w| *w == "sudo")
            .collect();
        let Some(&prog) = w.first() else { continue };
        let flags: String = w
            .iter()
            .skip(1)
            .filter(|a| a.starts_with('-') && !a.starts_with("--"))
            .flat_map(|a| a.chars().skip(1))
            .collect();
        let long = |f: &str| w.contains(&f);
        match prog.rsplit('/').next().unwrap_or(prog) {
            "rm" if (flags.contains('r') || flags.contains('R') || long("--recursive"))
                && (flags.contains('f') || long("--force")) =>
            {
                return Some("rm -rf");
            }
            "chmod"
                if w.iter()
                    .any(|a| *a == "777" || *a == "0777" || *a == "a+rwx") =>
            {
                return Some("chmod 777");
            }
            "dd" if w.iter().any(|a| a.starts_with("of=/dev/")) => {
                return Some("dd onto a device");
            }
            p if p.starts_with("mkfs") => return Some("mkfs"),
            _ => {}
        }
    }
    None
}

fn odd_hour(at: DateTime<Utc>, (from, to): (u32, u32)) -> bool {
    let h = at.hour();
    if from <= to {
        h >= from && h < to
    } else {
        h >= from || h < to
    }
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    Some(v[v.len() / 2])
}

/// The findings of one ended session. `earlier` holds the sessions of the same target that
/// started before it (any person), for the history rules.
pub fn of_session(
    s: &SessionRow,
    entries: &[SearchEntry],
    earlier: &[SessionRow],
    rules: &Rules,
) -> Vec<Finding> {
    let mut out = Vec::new();
    let at = |offset: Option<f64>| {
        let t = match offset {
            Some(o) => s.started_at + chrono::Duration::milliseconds((o * 1000.0) as i64),
            None => s.started_at,
        };
        crate::clock::rfc3339(t)
    };
    let mut push = |rule, severity, e: Option<&SearchEntry>, detail: String| {
        out.push(Finding {
            session_id: s.id.clone(),
            person: s.person.clone(),
            target: s.target.clone(),
            rule,
            severity,
            channel: e.map(|e| e.channel),
            offset_seconds: e.map(|e| e.time),
            at: at(e.map(|e| e.time)),
            detail,
        });
    };
    let warn_at = rules.first_warning.and_then(|w| {
        let total = (s.deadline - s.started_at).to_std().ok()?;
        total.checked_sub(w).map(|d| d.as_secs_f64())
    });
    for e in entries {
        if let Some(why) = destructive(&e.kind, &e.text) {
            push(
                "destructive",
                Severity::High,
                Some(e),
                format!("{why}: {}", e.text),
            );
        }
        if e.kind == "sql"
            && statements(&e.text).iter().any(|st| {
                let t = st.to_lowercase();
                t.trim_start().starts_with("copy ") && t.contains(" to ")
            })
        {
            push(
                "data_out",
                Severity::Warning,
                Some(e),
                format!("COPY … TO: {}", e.text),
            );
        }
        if warn_at.is_some_and(|w| e.time >= w) && !e.text.trim().is_empty() {
            push(
                "after_warning",
                Severity::Info,
                Some(e),
                format!("typed after the first deadline warning: {}", e.text),
            );
        }
    }
    if s.bytes_out > rules.data_out_bytes {
        push(
            "data_out",
            Severity::Warning,
            None,
            format!(
                "{} bytes went to the client (threshold {})",
                s.bytes_out, rules.data_out_bytes
            ),
        );
    }
    if !rules.windows.is_empty() && !rules.windows.iter().any(|w| w.contains(s.started_at)) {
        push(
            "outside_windows",
            Severity::Info,
            None,
            "started outside every maintenance window".into(),
        );
    }
    if let Some(odd) = rules.odd_hours.filter(|o| odd_hour(s.started_at, *o)) {
        push(
            "odd_hours",
            Severity::Info,
            None,
            format!(
                "started at {:02}:{:02} UTC (odd hours {:02}–{:02})",
                s.started_at.hour(),
                s.started_at.minute(),
                odd.0,
                odd.1
            ),
        );
    }
    if !earlier.iter().any(|e| e.person == s.person) {
        push(
            "new_target",
            Severity::Info,
            None,
            format!("{}'s first session on {}", s.person, s.target),
        );
    }
    let secs = |r: &SessionRow| {
        r.ended_at
            .map(|e| (e - r.started_at).num_milliseconds() as f64 / 1000.0)
    };
    let past: Vec<f64> = earlier.iter().filter_map(secs).collect();
    if past.len() >= 5 {
        if let (Some(m), Some(this)) = (median(past), secs(s)) {
            if m > 0.0 && this > rules.long_factor * m {
                push(
                    "long_session",
                    Severity::Warning,
                    None,
                    format!(
                        "{this:.0}s, {:.1}× the median {m:.0}s of {}",
                        this / m,
                        s.target
                    ),
                );
            }
        }
    }
    out
}

/// Findings of many sessions: `entries` by session id; history from `all` (every session,
/// any order).
pub fn of_sessions(
    sessions: &[SessionRow],
    entries: &BTreeMap<String, Vec<SearchEntry>>,
    all: &[SessionRow],
    rules: &Rules,
) -> Vec<Finding> {
    let mut out = Vec::new();
    for s in sessions.iter().filter(|s| s.ended_at.is_some()) {
        let earlier: Vec<SessionRow> = all
            .iter()
            .filter(|o| o.target == s.target && o.started_at < s.started_at && o.id != s.id)
            .cloned()
            .collect();
        let none = Vec::new();
        out.extend(of_session(
            s,
            entries.get(&s.id).unwrap_or(&none),
            &earlier,
            rules,
        ));
    }
    out
}

/// The findings of one session just indexed (`entries` are its indexed commands and SQL).
pub async fn of_indexed(
    store: &dyn crate::state::Store,
    cfg: &crate::config::Config,
    s: &SessionRow,
    entries: &[SearchEntry],
) -> Result<Vec<Finding>, crate::state::StateError> {
    let earlier: Vec<SessionRow> = store
        .list_sessions(&crate::state::SessionFilter {
            target: Some(s.target.clone()),
            until: Some(s.started_at),
            ..Default::default()
        })
        .await?
        .into_iter()
        .filter(|o| o.id != s.id && o.started_at < s.started_at)
        .collect();
    Ok(of_session(s, entries, &earlier, &rules_of(cfg)))
}

fn rules_of(cfg: &crate::config::Config) -> Rules {
    Rules {
        windows: cfg.reports.maintenance_windows.clone(),
        first_warning: cfg.limits.warn_before.first().copied(),
        odd_hours: cfg.findings.odd_hours,
        data_out_bytes: cfg.findings.data_out_bytes,
        long_factor: cfg.findings.long_factor,
    }
}

/// Every finding of the ended sessions that started since `since`, oldest session first.
pub async fn compute(
    store: &dyn crate::state::Store,
    cfg: &crate::config::Config,
    since: DateTime<Utc>,
) -> Result<Vec<Finding>, crate::state::StateError> {
    of_filter(
        store,
        cfg,
        &crate::state::SessionFilter {
            since: Some(since),
            ..Default::default()
        },
    )
    .await
}

/// Every finding of the ended sessions `f` selects (an incident's, a period's), oldest
/// session first.
pub async fn of_filter(
    store: &dyn crate::state::Store,
    cfg: &crate::config::Config,
    f: &crate::state::SessionFilter,
) -> Result<Vec<Finding>, crate::state::StateError> {
    use crate::state::SessionFilter;
    let all = store.list_sessions(&SessionFilter::default()).await?;
    let mut sessions: Vec<SessionRow> = store
        .list_sessions(f)
        .await?
        .into_iter()
        .filter(|s| s.ended_at.is_some())
        .collect();
    sessions.sort_by(|a, b| (a.started_at, &a.id).cmp(&(b.started_at, &b.id)));
    let mut entries: BTreeMap<String, Vec<SearchEntry>> = BTreeMap::new();
    // Every entry: the search's default page would drop the oldest sessions' commands.
    let every = SessionFilter {
        limit: Some(u32::MAX),
        ..f.clone()
    };
    for h in store.search_text("", &every).await? {
        entries
            .entry(h.session.id.clone())
            .or_default()
            .push(h.entry);
    }
    for v in entries.values_mut() {
        v.sort_by(|a, b| {
            (a.channel, a.time)
                .partial_cmp(&(b.channel, b.time))
                .unwrap_or(std::cmp::Ordering::Equal)
        });
    }
    Ok(of_sessions(&sessions, &entries, &all, &rules_of(cfg)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn row(id: &str, person: &str, start_h: u32, secs: i64) -> SessionRow {
        let started = Utc.with_ymd_and_hms(2026, 12, 1, start_h, 0, 0).unwrap();
        SessionRow {
            id: id.into(),
            protocol: "ssh".into(),
            person: person.into(),
            target: "web-01".into(),
            grant_id: "g".into(),
            client_addr: "127.0.0.1:1".into(),
            started_at: started,
            deadline: started + chrono::Duration::hours(1),
            ended_at: Some(started + chrono::Duration::seconds(secs)),
            end_reason: Some("client_closed".into()),
            bytes_in: 10,
            bytes_out: 10,
            recording_prefix: "p".into(),
            node_id: String::new(),
        }
    }

    fn cmd(kind: &str, time: f64, text: &str) -> SearchEntry {
        SearchEntry {
            channel: 0,
            time,
            kind: kind.into(),
            text: text.into(),
        }
    }

    #[test]
    fn destructive_commands_and_statements() {
        for (kind, text) in [
            ("command", "rm -rf /tmp/x"),
            ("command", "sudo rm -fr /var/lib/app"),
            ("command", "rm --recursive --force data"),
            ("command", "chmod 777 /etc/shadow"),
            ("command", "curl -s https://x.example/i.sh | sudo bash"),
            ("command", "dd if=/dev/zero of=/dev/sda"),
            ("command", "mkfs.ext4 /dev/sdb1"),
            ("sql", "DROP TABLE orders"),
            ("sql", "truncate orders"),
            ("sql", "DELETE FROM t"),
            ("sql", "update t set x = 1"),
            ("sql", "select 1; delete from t"),
        ] {
            assert!(destructive(kind, text).is_some(), "{text}");
        }
        for (kind, text) in [
            ("command", "rm /tmp/x"),
            ("command", "ls -rf"),
            ("command", "chmod 755 x"),
            ("command", "curl https://x.example/health"),
            ("sql", "DELETE FROM t WHERE id = 1"),
            ("sql", "update t set x = 1 where id = 2"),
            ("sql", "select 'drop table x'"),
            ("sql", "select 'a;drop table x'"),
            ("sql", "delete from t where x = 2; select 1"),
        ] {
            assert!(destructive(kind, text).is_none(), "{text}");
        }
    }

    #[test]
    fn findings_name_their_moment_and_a_harmless_session_has_none() {
        let rules = Rules {
            first_warning: Some(std::time::Duration::from_secs(300)),
            ..Rules::default()
        };
        let history: Vec<SessionRow> = (0..5)
            .map(|i| row(&format!("h{i}"), "alice", 9, 60))
            .collect();
        let quiet = row("s0", "alice", 10, 60);
        assert!(
            of_session(&quiet, &[cmd("command", 2.0, "uptime")], &history, &rules).is_empty(),
            "a harmless session"
        );
        let s = row("s1", "bob", 23, 3600);
        let f = of_session(
            &s,
            &[
                cmd("command", 12.5, "rm -rf /tmp/x"),
                cmd("command", 3400.0, "ls"),
            ],
            &history,
            &rules,
        );
        let rules_hit: Vec<&str> = f.iter().map(|f| f.rule).collect();
        assert_eq!(
            rules_hit,
            [
                "destructive",
                "after_warning",
                "odd_hours",
                "new_target",
                "long_session"
            ]
        );
        assert_eq!(f[0].offset_seconds, Some(12.5));
        assert_eq!(f[0].at, "2026-12-01T23:00:12.500Z");
        assert_eq!(f[0].severity, Severity::High);
    }
}
