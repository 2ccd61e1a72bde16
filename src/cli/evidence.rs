//! Evidence: `verify`, `replay`, `export`, `report`, `audit-export` (and its `verify`).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context, Result};
use breakglass::config::Config;
use breakglass::record::{asciicast, export};
use breakglass::siem::{AccessEvent, Action, Siem};
use breakglass::state::SessionFilter;
use breakglass::storage::RecordingStore;
use breakglass::{clock, text};
use chrono::{DateTime, Utc};

use super::admin::untrusted_key_warnings;
use super::output::{opt_f64, print_rows, Format};
use super::{open_state, operator, parse_when};

/// Reads a SIEM copy: `path` and, when `rotations`, the rotated files beside it
/// (`<name>.<stamp>`), so sessions older than the last rotation are still cross-checked.
pub(super) fn read_siem(path: &Path, rotations: bool) -> Result<breakglass::verify::SiemCopy> {
    let mut text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the SIEM copy {}", path.display()))?;
    if rotations {
        if let (Some(dir), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str()))
        {
            let mut rotated: Vec<PathBuf> = std::fs::read_dir(dir)
                .map(|rd| {
                    rd.filter_map(|e| e.ok())
                        .map(|e| e.path())
                        .filter(|p| {
                            p.file_name()
                                .and_then(|n| n.to_str())
                                .is_some_and(|n| n.starts_with(&format!("{name}.")))
                        })
                        .collect()
                })
                .unwrap_or_default();
            rotated.sort();
            for r in rotated {
                if let Ok(t) = std::fs::read_to_string(&r) {
                    text.push('\n');
                    text.push_str(&t);
                }
            }
        }
    }
    Ok(breakglass::verify::SiemCopy::parse(&text))
}

/// The start time a session's key prefix implies (`sessions/YYYY/MM/DD/<id>`): the end of
/// that day, so `--since` never drops a session it should keep.
pub(super) fn prefix_day_end(prefix: &str) -> Option<DateTime<Utc>> {
    let mut p = prefix.split('/').skip(1);
    let (y, m, d) = (p.next()?, p.next()?, p.next()?);
    let day = chrono::NaiveDate::parse_from_str(&format!("{y}-{m}-{d}"), "%Y-%m-%d").ok()?;
    Some(day.succ_opt()?.and_hms_opt(0, 0, 0)?.and_utc())
}

pub(super) async fn verify(
    config: &Path,
    session: Option<String>,
    all: bool,
    since: Option<String>,
    store_dir: Option<PathBuf>,
    public_key: Option<PathBuf>,
    siem: Option<PathBuf>,
) -> Result<ExitCode> {
    use breakglass::signing::{parse_trust, TrustSet};
    use breakglass::verify::{resolve_id, store_sessions, verify_session, Verdict};
    use std::collections::BTreeMap;
    let since = since.as_deref().map(parse_when).transpose()?;
    let trust_file = |pk: &Path| -> Result<TrustSet> {
        let (keys, certs) =
            parse_trust(&std::fs::read_to_string(pk).with_context(|| pk.display().to_string())?)
                .map_err(|e| anyhow!("{}: {e}", pk.display()))?;
        Ok(TrustSet::build(keys, certs))
    };
    // The session index (online): id → (key prefix, start).
    let mut indexed: BTreeMap<String, (String, DateTime<Utc>)> = BTreeMap::new();
    let mut warnings = Vec::new();
    let (store, trust, siem_copy) = if let Some(dir) = store_dir {
        // Offline: a store copy and the keys the auditor trusts, nothing from the gateway.
        let pk = public_key.ok_or_else(|| anyhow!("--store needs --public-key"))?;
        let trust = trust_file(&pk)?;
        let copy = siem.as_deref().map(|p| read_siem(p, false)).transpose()?;
        (RecordingStore::local(&dir)?, trust, copy)
    } else {
        let cfg = Config::load(config)?;
        let state = open_state(&cfg).await?;
        let trust = match &public_key {
            Some(pk) => trust_file(pk)?,
            None => cfg.signing.trust(&cfg.keys_dir)?,
        };
        warnings.extend(untrusted_key_warnings(&cfg, &trust));
        for r in state.list_sessions(&SessionFilter::default()).await? {
            indexed.insert(r.id, (r.recording_prefix, r.started_at));
        }
        let copy = match siem {
            Some(p) => Some(read_siem(&p, false)?),
            None if cfg.siem_file.exists() => Some(read_siem(&cfg.siem_file, true)?),
            None => {
                warnings.push(format!(
                    "the SIEM file {} does not exist: no chain heads, checkpoints or missing sessions to compare against",
                    cfg.siem_file.display()
                ));
                None
            }
        };
        (RecordingStore::from_config(&cfg)?, trust, copy)
    };
    // Rotation certificates kept with the evidence: an auditor who pinned only the first key
    // still follows the chain in a copy of the store.
    let (store_certs, cert_warnings) = breakglass::verify::store_certificates(&store).await?;
    let trust = trust.with_certificates(store_certs, cert_warnings);
    warnings.extend(trust.warnings.iter().cloned());
    if let Some(copy) = &siem_copy {
        if copy.lines > 0 && copy.events == 0 {
            warnings.push("the SIEM copy holds no seed-format events (only `format = \"seed\"` is read, not OCSF or CEF): nothing to cross-check against".into());
        }
        for c in &trust.chain {
            if !copy.rotated_keys.contains(&c.key.id) {
                warnings.push(format!(
                    "signing key {} is certified by key {}, but the SIEM copy has no signing_key_rotated event for it (a certificate not made by `breakglass keys rotate-signing`, or an older SIEM file)",
                    c.key.id, c.signed_by
                ));
            }
        }
    }
    let keys = trust.keys();
    if keys.is_empty() {
        warnings.push("no trusted signing keys: every sealed manifest verifies as TAMPERED; pin keys in [signing] trusted_keys or trusted_keys_file, or pass --public-key".into());
    }
    for w in &warnings {
        eprintln!("warning: {w}");
    }
    let in_store = store_sessions(&store).await?;
    let empty = breakglass::verify::SiemCopy::default();
    let copy = siem_copy.as_ref().unwrap_or(&empty);
    // Every id any source knows: the index, the store and the SIEM copy.
    let mut known: BTreeMap<String, Option<DateTime<Utc>>> = BTreeMap::new();
    for (id, (_, t)) in &indexed {
        known.insert(id.clone(), Some(*t));
    }
    for (id, st) in &in_store {
        let day = st.prefixes.keys().next().and_then(|p| prefix_day_end(p));
        known.entry(id.clone()).or_insert(day);
    }
    for (id, (_, at)) in copy.started() {
        let t = DateTime::parse_from_rfc3339(at)
            .ok()
            .map(|t| t.with_timezone(&Utc));
        known.entry(id.clone()).or_insert(t);
    }
    let ids: Vec<String> = if all {
        known
            .iter()
            .filter(|(_, t)| match (since, t) {
                (Some(s), Some(t)) => *t >= s,
                _ => true,
            })
            .map(|(id, _)| id.clone())
            .collect()
    } else {
        let given = session.ok_or_else(|| anyhow!("give a session id or --all"))?;
        vec![resolve_id(&given, known.keys())?]
    };
    let mut worst = 0u8;
    let total = ids.len();
    for (i, id) in ids.iter().enumerate() {
        if all {
            eprint!("\r[{}/{total}] verifying {id} ", i + 1);
        }
        let stored = in_store.get(id).cloned().unwrap_or_default();
        let prefix = stored.pick(indexed.get(id).map(|(p, _)| p.as_str()));
        let from_siem = copy.sessions.get(id);
        let verdict = match prefix {
            Some(p) => verify_session(&store, &p, &keys, from_siem)
                .await
                .map(|v| breakglass::verify::with_findings(v, stored.strays(&p))),
            None => Ok(Verdict::Missing {
                why: match from_siem.and_then(|s| s.started.as_ref()) {
                    Some((event, at)) => format!(
                        "the SIEM recorded its session_start at {at} (event {event}), but the store has no object of it (session deleted)"
                    ),
                    None => "no recording of it is in the store".into(),
                },
            }),
        };
        let (code, line) = match verdict {
            Ok(v) => (v.exit_code(), v.summary()),
            Err(e) => (1, format!("ERROR: {e}")),
        };
        if all {
            eprintln!();
        }
        println!("{id}  {line}");
        worst = worst.max(code);
    }
    if total == 0 {
        println!("(no sessions)");
    }
    Ok(ExitCode::from(worst))
}

/// Loads a session's recording for `what` (`replayed` or `exported`), after putting that on
/// the record: auditing the auditors covers the CLI as much as the web UI.
pub(super) async fn load_recording(
    config: &Path,
    session: &str,
    action: Action,
    what: &str,
) -> Result<(String, export::Loaded)> {
    let cfg = Config::load(config)?;
    let store = open_state(&cfg).await?;
    let row = store.find_session(session).await?.ok_or_else(|| {
        anyhow!("no session matches `{session}` (see `breakglass sessions list`)")
    })?;
    let what = format!("{what} with the CLI");
    let e = breakglass::siem::recording_access(&*store, action, &operator(), &row, &what).await;
    let siem = std::sync::Arc::new(Siem::open_for(&cfg, &*store).await?);
    breakglass::siem::audit(&siem, &*store, &e).await?;
    let rec = RecordingStore::from_config(&cfg)?;
    let loaded = export::load(&rec, &row.recording_prefix).await?;
    Ok((row.id, loaded))
}

pub(super) async fn replay(
    config: &Path,
    session: &str,
    channel: Option<u32>,
    speed: f64,
    idle: Option<f64>,
) -> Result<ExitCode> {
    let (id, loaded) = load_recording(config, session, Action::RecordingViewed, "replayed").await?;
    let (ch, data) = loaded.pick(channel)?;
    if export::is_postgres(data) {
        // A PostgreSQL session replays as its statement timeline.
        for line in breakglass::pg::log::sql_jsonl(ch, data, &id)?.lines() {
            let e: serde_json::Value = serde_json::from_str(line)?;
            let t = e["time"].as_f64().unwrap_or(0.0);
            let what = match e["event"].as_str().unwrap_or("") {
                "query" | "parse" => e["sql"].as_str().unwrap_or("").to_string(),
                "complete" => format!(
                    "-> {} ({} rows)",
                    e["command_tag"].as_str().unwrap_or(""),
                    e["rows_returned"]
                ),
                "error" => format!(
                    "-> ERROR {} {}",
                    e["error"]["sqlstate"].as_str().unwrap_or(""),
                    e["error"]["message"].as_str().unwrap_or("")
                ),
                other => other.to_string(),
            };
            println!("{t:>10.3}s  {}", text::terminal(&what));
        }
        return Ok(ExitCode::SUCCESS);
    }
    let cast = export::to_asciicast(ch, data)?;
    let (_, events) = asciicast::parse(&cast)?;
    eprintln!("replaying session {id} channel {ch} at {speed}x (Ctrl-C to stop)");
    let mut out = std::io::stdout().lock();
    asciicast::replay(&events, &mut out, speed, idle, &mut |d| {
        std::thread::sleep(d)
    })?;
    writeln!(out)?;
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn export_cmd(
    config: &Path,
    session: &str,
    output: &Path,
    channel: Option<u32>,
) -> Result<ExitCode> {
    let (id, loaded) =
        load_recording(config, session, Action::RecordingExported, "exported").await?;
    let (ch, data) = loaded.pick(channel)?;
    // PostgreSQL sessions export as their SQL timeline (JSONL); terminals as asciicast v2.
    let cast = if export::is_postgres(data) {
        breakglass::pg::log::sql_jsonl(ch, data, &id)?
    } else {
        export::to_asciicast(ch, data)?
    };
    // Never overwrite: exports are evidence too.
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(output)
        .with_context(|| format!("cannot create {} (it must not exist yet)", output.display()))?;
    f.write_all(cast.as_bytes())?;
    f.sync_all()?;
    eprintln!(
        "exported session {id} channel {ch} ({} chunks{}) to {}",
        data.chunks,
        if loaded.meta.is_none() {
            ", session not sealed"
        } else {
            ""
        },
        output.display()
    );
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn report(
    config: &Path,
    since: &str,
    until: Option<&str>,
    period: breakglass::report::Period,
    format: Format,
) -> Result<ExitCode> {
    let cfg = Config::load(config)?;
    let store = open_state(&cfg).await?;
    let since = parse_when(since)?;
    let until = until
        .map(parse_when)
        .transpose()?
        .unwrap_or_else(clock::now);
    if since > until {
        bail!("--since is after --until");
    }
    period
        .check_range(since, until)
        .map_err(|e| anyhow!("{e}"))?;
    let r = breakglass::report::compute(&*store, &cfg, since, until, period).await?;
    let t = &r.totals;
    match format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&r)?),
        Format::Csv => {
            let headers = [
                "section",
                "target",
                "protocol",
                "start",
                "end",
                "events",
                "grants",
                "unique_users",
                "mean_time_between_events_seconds",
                "outside_windows",
                "outside_windows_pct",
                "last_event",
            ];
            let mut rows = vec![vec![
                "total".into(),
                String::new(),
                String::new(),
                r.since.clone(),
                r.until.clone(),
                t.events.to_string(),
                t.grants.to_string(),
                t.unique_users.to_string(),
                opt_f64(t.mean_time_between_events_seconds),
                t.outside_windows.to_string(),
                opt_f64(t.outside_windows_pct),
                String::new(),
            ]];
            for s in &r.per_system {
                rows.push(vec![
                    "system".into(),
                    s.target.clone(),
                    s.protocol.clone(),
                    String::new(),
                    String::new(),
                    s.events.to_string(),
                    String::new(),
                    s.unique_users.to_string(),
                    opt_f64(s.mean_time_between_events_seconds),
                    s.outside_windows.to_string(),
                    opt_f64(s.outside_windows_pct),
                    s.last_event.clone(),
                ]);
            }
            for p in &r.per_period {
                rows.push(vec![
                    "period".into(),
                    String::new(),
                    String::new(),
                    p.start.clone(),
                    p.end.clone(),
                    p.events.to_string(),
                    String::new(),
                    p.unique_users.to_string(),
                    String::new(),
                    p.outside_windows.to_string(),
                    String::new(),
                    String::new(),
                ]);
            }
            print_rows(Format::Csv, &headers, &rows)?;
        }
        Format::Table => {
            println!(
                "breakglass report, {} to {}, per {}",
                r.since, r.until, r.period
            );
            println!(
                "maintenance windows (UTC): {}\n",
                if r.maintenance_windows.is_empty() {
                    "none configured".to_string()
                } else {
                    r.maintenance_windows.join(", ")
                }
            );
            print_rows(
                Format::Table,
                &[
                    "events",
                    "grants",
                    "unique_users",
                    "mean_between_s",
                    "outside_windows",
                    "outside_pct",
                ],
                &[vec![
                    t.events.to_string(),
                    t.grants.to_string(),
                    t.unique_users.to_string(),
                    opt_f64(t.mean_time_between_events_seconds),
                    t.outside_windows.to_string(),
                    opt_f64(t.outside_windows_pct),
                ]],
            )?;
            let d = &r.drills;
            println!(
                "drills (not in the figures above): {} run, {} passed, {} failed, {} unfinished; pass rate {}%; time to access median {}s, max {}s",
                d.drills,
                d.passed,
                d.failed,
                d.unfinished,
                opt_f64(d.pass_rate_pct),
                opt_f64(d.median_time_to_access_seconds),
                opt_f64(d.max_time_to_access_seconds)
            );
            println!("\nper system:");
            let systems: Vec<Vec<String>> = r
                .per_system
                .iter()
                .map(|s| {
                    vec![
                        s.target.clone(),
                        s.protocol.clone(),
                        s.events.to_string(),
                        s.unique_users.to_string(),
                        opt_f64(s.mean_time_between_events_seconds),
                        s.outside_windows.to_string(),
                        opt_f64(s.outside_windows_pct),
                        s.last_event.clone(),
                    ]
                })
                .collect();
            print_rows(
                Format::Table,
                &[
                    "target",
                    "protocol",
                    "events",
                    "unique_users",
                    "mean_between_s",
                    "outside_windows",
                    "outside_pct",
                    "last_event",
                ],
                &systems,
            )?;
            println!("\nper {}:", r.period);
            let periods: Vec<Vec<String>> = r
                .per_period
                .iter()
                .map(|p| {
                    vec![
                        p.start.clone(),
                        p.end.clone(),
                        p.events.to_string(),
                        p.unique_users.to_string(),
                        p.outside_windows.to_string(),
                    ]
                })
                .collect();
            print_rows(
                Format::Table,
                &["start", "end", "events", "unique_users", "outside_windows"],
                &periods,
            )?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn audit_export(
    config: &Path,
    since: &str,
    until: Option<&str>,
    format: breakglass::audit_export::ExportFormat,
    out: &Path,
) -> Result<ExitCode> {
    let cfg = Config::load(config)?;
    let store = open_state(&cfg).await?;
    let siem = std::sync::Arc::new(Siem::open_for(&cfg, &*store).await?);
    let signer = breakglass::signing::Signer::load_or_create_pinned(
        &cfg.keys_dir,
        &cfg.signing.trusted_keys_file,
    )?
    .use_trusted(&cfg.signing.trust(&cfg.keys_dir)?)?;
    let since = parse_when(since)?;
    let until = until
        .map(parse_when)
        .transpose()?
        .unwrap_or_else(clock::now);
    if since > until {
        bail!("--since is after --until");
    }
    let by = operator();
    let bundle =
        breakglass::audit_export::build(&*store, &signer, since, until, format, &by).await?;
    let written = breakglass::audit_export::write(&bundle, out)?;
    // Auditing the auditors: the export itself is an audit event.
    let mut e = AccessEvent::new(Action::MetadataExported, &by);
    e.message = Some(format!(
        "{by} exported the metadata of {} sessions from {} to {} ({}) to {}",
        bundle.rows,
        clock::rfc3339(since),
        clock::rfc3339(until),
        format.as_str(),
        out.display()
    ));
    breakglass::siem::audit(&siem, &*store, &e).await?;
    for p in &written {
        println!("{}", p.display());
    }
    eprintln!(
        "exported {} sessions, manifest signed with key {}",
        bundle.rows, bundle.signature.key_id
    );
    Ok(ExitCode::SUCCESS)
}

pub(super) fn audit_export_verify(
    config: &Path,
    dir: &Path,
    public_key: Option<&Path>,
) -> Result<ExitCode> {
    // Trusted keys only (as for `verify`): never a key file found in the data dir.
    let keys = match public_key {
        Some(pk) => {
            let (keys, certs) = breakglass::signing::parse_trust(&std::fs::read_to_string(pk)?)
                .map_err(|e| anyhow!("{}: {e}", pk.display()))?;
            breakglass::signing::TrustSet::build(keys, certs).keys()
        }
        None => {
            let cfg = Config::load(config)?;
            cfg.signing.trust(&cfg.keys_dir)?.keys()
        }
    };
    let v = breakglass::audit_export::verify_dir(dir, &keys)?;
    let what = v
        .manifest
        .as_ref()
        .map(|m| format!(" ({}, {} rows, {} to {})", m.file, m.rows, m.since, m.until))
        .unwrap_or_default();
    if v.is_ok() {
        println!("{}  OK{what}", dir.display());
        Ok(ExitCode::SUCCESS)
    } else {
        println!("{}  TAMPERED{what}", dir.display());
        for f in &v.findings {
            println!("  {f}");
        }
        Ok(ExitCode::from(3))
    }
}

/// Indexes every ended session not indexed yet (the findings rules and the incident report
/// read the index); the findings of the sessions this command indexed go to the SIEM as the
/// gateway's do.
async fn index_all(
    cfg: &Config,
    store: &dyn breakglass::state::Store,
    rec: &RecordingStore,
    siem: &std::sync::Arc<breakglass::siem::Siem>,
) -> Result<()> {
    for _ in 0..1000 {
        let done = breakglass::web::evidence::index_pending_in(store, rec).await?;
        if done.is_empty() {
            break;
        }
        for (row, entries) in done {
            for f in breakglass::findings::of_indexed(store, cfg, &row, &entries).await? {
                breakglass::siem::audit(siem, store, &breakglass::siem::finding_event(&f)).await?;
            }
        }
    }
    Ok(())
}

/// `incident-report`: gathers the incident, renders the HTML, signs the manifest, writes the
/// three files create-only, records the report (the timeline counts it) and emits its event.
pub(super) async fn incident_report(config: &Path, incident: &str, out: &Path) -> Result<ExitCode> {
    breakglass::text::check("incident", incident, breakglass::text::Lines::One)
        .map_err(|e| anyhow!(e))?;
    let cfg = Config::load(config)?;
    let store = open_state(&cfg).await?;
    let rec = RecordingStore::from_config(&cfg)?;
    let siem = std::sync::Arc::new(Siem::open_for(&cfg, &*store).await?);
    index_all(&cfg, &*store, &rec, &siem).await?;
    let trust = cfg.signing.trust(&cfg.keys_dir)?;
    let signer = breakglass::signing::Signer::load_or_create_pinned(
        &cfg.keys_dir,
        &cfg.signing.trusted_keys_file,
    )?
    .use_trusted(&trust)?;
    let by = operator();
    let report = breakglass::incident::gather(
        &*store,
        &rec,
        &cfg,
        &trust.keys(),
        &siem,
        breakglass::incident::Ask {
            incident,
            by: &by,
            writing: true,
        },
    )
    .await?;
    let html = breakglass::incident::render(&report);
    let bundle = breakglass::incident::sign(&report, html, &signer)?;
    let written = breakglass::audit_export::write(&bundle, out)?;
    let sha = bundle.manifest["sha256"].as_str().unwrap_or("").to_string();
    let (row, e) = breakglass::incident::reported_event(&report, &sha, &out.display().to_string());
    store.add_incident_report(&row).await?;
    breakglass::siem::audit(&siem, &*store, &e).await?;
    for p in &written {
        println!("{}", p.display());
    }
    for i in &report.timeline {
        eprintln!(
            "{:<9} {:<8} {}",
            i.item,
            i.state.as_str(),
            i.due_at
                .map(|d| format!("due {}", clock::rfc3339(d)))
                .unwrap_or_else(|| "not resolved yet".into())
        );
    }
    eprintln!(
        "incident {incident}: {} sessions, {} findings; manifest signed with key {}",
        report.sessions.len(),
        report.findings.len(),
        bundle.signature.key_id
    );
    Ok(ExitCode::SUCCESS)
}

/// `findings`: the rule set over every ended session that started since `since`.
pub(super) async fn findings(config: &Path, since: &str, format: Format) -> Result<ExitCode> {
    let cfg = Config::load(config)?;
    let store = open_state(&cfg).await?;
    let since = parse_when(since)?;
    // The rules read the search index: fill it for sessions that ended since the last search.
    let rec = RecordingStore::from_config(&cfg)?;
    let siem = std::sync::Arc::new(breakglass::siem::Siem::open_for(&cfg, &*store).await?);
    index_all(&cfg, &*store, &rec, &siem).await?;
    let found = breakglass::findings::compute(&*store, &cfg, since).await?;
    if format == Format::Json {
        println!("{}", serde_json::to_string_pretty(&found)?);
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<Vec<String>> = found
        .iter()
        .map(|f| {
            vec![
                f.at.clone(),
                f.severity.as_str().to_string(),
                f.rule.to_string(),
                f.session_id.clone(),
                f.person.clone(),
                f.target.clone(),
                f.channel.map(|c| c.to_string()).unwrap_or_default(),
                f.offset_seconds
                    .map(|o| format!("{o:.1}"))
                    .unwrap_or_default(),
                f.detail.clone(),
            ]
        })
        .collect();
    print_rows(
        format,
        &[
            "at", "severity", "rule", "session", "person", "target", "channel", "offset_s",
            "detail",
        ],
        &rows,
    )?;
    Ok(ExitCode::SUCCESS)
}
