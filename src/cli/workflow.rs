//! The access workflow from the command line: `grant`, `sessions`, `access-review`.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context, Result};
use breakglass::config::Config;
use breakglass::siem::{AccessEvent, Action, Siem};
use breakglass::state::{NewGrant, SessionFilter};
use breakglass::{clock, text};
use chrono::{DateTime, Utc};

use super::output::{print_rows, Format};
use super::{open_state, operator, parse_when, GrantCmd, SessionsCmd};

pub(super) async fn grant(config: &Path, cmd: GrantCmd) -> Result<ExitCode> {
    let cfg = Config::load(config)?;
    let store = open_state(&cfg).await?;
    let siem = std::sync::Arc::new(Siem::open_for(&cfg, &*store).await?);
    match cmd {
        GrantCmd::Add {
            person,
            target,
            duration,
            reason,
            incident,
        } => {
            let (reason, incident) = (reason.join(" "), incident.join(" "));
            if !cfg.people.contains_key(&person) {
                bail!("no person named `{person}` in {}", config.display());
            }
            if !cfg.targets.contains_key(&target) {
                bail!("no target named `{target}` in {}", config.display());
            }
            if reason.trim().is_empty() || incident.trim().is_empty() {
                bail!("--reason and --incident must not be empty");
            }
            text::check("--reason", &reason, text::Lines::One).map_err(|e| anyhow!(e))?;
            text::check("--incident", &incident, text::Lines::One).map_err(|e| anyhow!(e))?;
            let ttl = match duration {
                Some(d) => humantime::parse_duration(&d)
                    .with_context(|| format!("--for `{d}` is not a duration like 30m"))?,
                None => cfg.limits.default_grant_ttl,
            };
            if ttl < cfg.limits.min_grant_ttl || ttl > cfg.limits.max_grant_ttl {
                bail!(
                    "--for must be at least {} (limits.min_grant_ttl) and at most {} (limits.max_grant_ttl)",
                    humantime::format_duration(cfg.limits.min_grant_ttl),
                    humantime::format_duration(cfg.limits.max_grant_ttl)
                );
            }
            let now = clock::now();
            let g = store
                .create_grant(NewGrant {
                    person,
                    target,
                    reason,
                    incident_id: incident,
                    created_by: operator(),
                    created_at: now,
                    expires_at: now + chrono::Duration::from_std(ttl)?,
                })
                .await?;
            let mut e = AccessEvent::new(Action::GrantCreated, &g.created_by);
            e.person = Some(g.person.clone());
            e.target = Some(g.target.clone());
            e.grant_id = Some(g.id.clone());
            e.correlation_id = Some(g.id.clone());
            e.justification = Some(g.reason.clone());
            e.incident_id = Some(g.incident_id.clone());
            e.deadline = Some(clock::rfc3339(g.expires_at));
            e.message = Some(format!(
                "{} granted {} access to {}",
                g.created_by, g.person, g.target
            ));
            breakglass::siem::audit(&siem, &*store, &e).await?;
            if cfg.targets[&g.target].admin_login.is_some() {
                // Switch the account on now, as an approval does, rather than at the
                // gateway's next pass (best effort: the pass retries).
                let gw = breakglass::server::Gateway::build(cfg.clone()).await?;
                breakglass::rotation::open_for_grant(&gw, &g.target).await;
            }
            println!("{}", g.id);
            eprintln!(
                "granted {} access to {} until {}",
                g.person,
                g.target,
                clock::rfc3339(g.expires_at)
            );
            Ok(ExitCode::SUCCESS)
        }
        GrantCmd::List { all, format } => {
            let now = clock::now();
            let grants = store
                .list_grants(if all { None } else { Some(now) })
                .await?;
            let rows: Vec<Vec<String>> = grants
                .iter()
                .map(|g| {
                    vec![
                        g.id.clone(),
                        g.person.clone(),
                        g.target.clone(),
                        format!("{:?}", g.state_at(now)).to_lowercase(),
                        clock::rfc3339(g.expires_at),
                        g.incident_id.clone(),
                        g.reason.clone(),
                    ]
                })
                .collect();
            print_rows(
                format,
                &[
                    "id",
                    "person",
                    "target",
                    "state",
                    "expires_at",
                    "incident_id",
                    "reason",
                ],
                &rows,
            )?;
            Ok(ExitCode::SUCCESS)
        }
        GrantCmd::Revoke { id, reason } => {
            let reason = reason.join(" ");
            text::check("--reason", &reason, text::Lines::One).map_err(|e| anyhow!(e))?;
            let by = operator();
            let g = store.revoke_grant(&id, &by, &reason, clock::now()).await?;
            // The same event as every other revoke: the request's correlation id, not the
            // grant's own id.
            let mut e = AccessEvent::for_grant(Action::GrantRevoked, &by, &g);
            e.reason = Some(reason);
            e.message = Some(format!(
                "{by} revoked grant {} of {} on {}",
                g.id, g.person, g.target
            ));
            breakglass::siem::audit(&siem, &*store, &e).await?;
            // The custodians hear of it as of a revoke over the control channel.
            let tls = breakglass::alerts::tls_config(cfg.alerts_ca_file.as_deref())
                .map_err(|e| anyhow!("alerts.ca_file: {e}"))?;
            let custodians = cfg
                .targets
                .get(&g.target)
                .map(|t| t.custodians.clone())
                .unwrap_or_default();
            breakglass::alerts::send_now(&cfg.webhooks, &tls, &e, custodians).await;
            println!(
                "revoked {} ({} on {}); live sessions end within a second",
                g.id, g.person, g.target
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

pub(super) async fn sessions(config: &Path, cmd: SessionsCmd) -> Result<ExitCode> {
    let cfg = Config::load(config)?;
    let store = open_state(&cfg).await?;
    match cmd {
        SessionsCmd::List {
            person,
            target,
            since,
            until,
            limit,
            format,
        } => {
            let f = SessionFilter {
                person,
                target,
                since: since.as_deref().map(parse_when).transpose()?,
                until: until.as_deref().map(parse_when).transpose()?,
                limit,
                ..Default::default()
            };
            let rows = store.list_sessions(&f).await?;
            if format == Format::Json {
                let v: Vec<serde_json::Value> = rows
                    .iter()
                    .map(|s| {
                        serde_json::json!({
                            "id": s.id, "protocol": s.protocol, "person": s.person, "target": s.target,
                            "grant_id": s.grant_id, "client_addr": s.client_addr,
                            "started_at": clock::rfc3339(s.started_at),
                            "deadline": clock::rfc3339(s.deadline),
                            "ended_at": s.ended_at.map(clock::rfc3339),
                            "end_reason": s.end_reason, "bytes_in": s.bytes_in, "bytes_out": s.bytes_out,
                            "recording": s.recording_prefix,
                            "node": s.node_id,
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(ExitCode::SUCCESS);
            }
            let table: Vec<Vec<String>> = rows
                .iter()
                .map(|s| {
                    vec![
                        s.id.clone(),
                        s.protocol.clone(),
                        s.person.clone(),
                        s.target.clone(),
                        clock::rfc3339(s.started_at),
                        s.ended_at
                            .map(clock::rfc3339)
                            .unwrap_or_else(|| "live".into()),
                        s.end_reason.clone().unwrap_or_default(),
                        s.bytes_in.to_string(),
                        s.bytes_out.to_string(),
                    ]
                })
                .collect();
            print_rows(
                format,
                &[
                    "id",
                    "protocol",
                    "person",
                    "target",
                    "started_at",
                    "ended_at",
                    "end_reason",
                    "bytes_in",
                    "bytes_out",
                ],
                &table,
            )?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

pub(super) async fn access_review(config: &Path, since: &str) -> Result<ExitCode> {
    let cfg = Config::load(config)?;
    let built = cfg.build()?;
    let store = open_state(&cfg).await?;
    let since_t = parse_when(since)?;
    let now = clock::now();
    println!(
        "breakglass access review, {} to {}\n",
        clock::rfc3339(since_t),
        clock::rfc3339(now)
    );
    println!("break-glass accounts:");
    for t in cfg.targets.values() {
        println!(
            "  {} ({} as {}): custodians {}; approvers {} (needs {}){}",
            t.name,
            t.address,
            t.login,
            if t.custodians.is_empty() {
                "NONE".to_string()
            } else {
                t.custodians.join(", ")
            },
            t.approvers.join(", "),
            t.required_approvals,
            if t.emergency_self_service {
                "; emergency self-service ALLOWED"
            } else {
                ""
            }
        );
    }
    println!("\nwho may request (every configured person) and approve:");
    for p in cfg.people.values() {
        let approves: Vec<&str> = cfg
            .targets
            .values()
            .filter(|t| t.is_approver(&p.name, &p.roles))
            .map(|t| t.name.as_str())
            .collect();
        println!(
            "  {} (roles: {}): may approve {}",
            p.name,
            p.roles.join(", "),
            if approves.is_empty() {
                "nothing".to_string()
            } else {
                approves.join(", ")
            }
        );
    }
    println!("\ngrants in the period:");
    let grants: Vec<_> = store
        .list_grants(None)
        .await?
        .into_iter()
        .filter(|g| g.created_at >= since_t)
        .collect();
    if grants.is_empty() {
        println!("  (none)");
    }
    for g in &grants {
        println!(
            "  {}  {} on {}  {} to {}  by {}  {}{}",
            g.id,
            g.person,
            g.target,
            clock::rfc3339(g.created_at),
            clock::rfc3339(g.revoked_at.unwrap_or(g.expires_at)),
            text::terminal(&g.created_by),
            text::terminal(&g.incident_id),
            if g.review_required { "  EMERGENCY" } else { "" }
        );
    }
    println!("\nkeys not used in 90 days:");
    let used: std::collections::BTreeMap<String, DateTime<Utc>> = store
        .key_usage()
        .await?
        .into_iter()
        .map(|(f, _, t)| (f, t))
        .collect();
    let cutoff = now - chrono::Duration::days(90);
    let mut any = false;
    for (fp, person) in built.keys.entries() {
        match used.get(fp) {
            Some(t) if *t >= cutoff => {}
            Some(t) => {
                any = true;
                println!("  {person}  {fp}  last used {}", clock::rfc3339(*t));
            }
            None => {
                any = true;
                println!("  {person}  {fp}  never used");
            }
        }
    }
    if !any {
        println!("  (none)");
    }
    Ok(ExitCode::SUCCESS)
}
