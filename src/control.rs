//! The break-glass workflow over the gateway's own SSH endpoint: request, approve, deny,
//! revoke, status, grants, requests. The person is the one the SSH key identified.
//!
//! Syntax (`ssh -p 2222 breakglass@gw COMMAND ...`; any login name that is not a target and is
//! `breakglass` or the person's own name reaches the control channel):
//!
//! ```text
//! request TARGET --reason TEXT --incident ID [--severity low|medium|high|critical]
//!         [--scenario security_patch|production_outage|system_failure|other] [--for 4h] [--emergency]
//! approve REQUEST
//! deny REQUEST --reason TEXT
//! revoke GRANT|REQUEST [--reason TEXT]
//! status | grants | requests | help
//! ```
//!
//! Option values run to the next `--option`, so `--reason disk full on /var` needs no quotes
//! (ssh joins its arguments with spaces before sending them).

use std::collections::BTreeMap;
use std::time::Duration;

use crate::clock;
use crate::services::Gateway;
use crate::siem::{AccessEvent, Action};
use crate::state::{Approval, Grant, GrantState, NewRequest, Request, RequestStatus, StateError};

/// The stored form of an API token or login link: its SHA-256, hex.
pub fn token_hash(token: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// What a command printed, its exit status, and (for the JSON API) what it produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub text: String,
    pub code: u32,
    /// Why the command failed (None when it succeeded); the API's status comes from it.
    pub failure: Option<Failure>,
    /// Ids of what the command created or changed, e.g. `{"request_id": ..., "grant_id": ...}`.
    pub data: serde_json::Value,
}

fn ok(text: String) -> Outcome {
    Outcome {
        text,
        code: 0,
        failure: None,
        data: serde_json::Value::Null,
    }
}

fn ok_with(text: String, data: serde_json::Value) -> Outcome {
    Outcome {
        text,
        code: 0,
        failure: None,
        data,
    }
}

/// The kind of a workflow failure, fixed where the failure happens: the API answers 400, 403,
/// 404, 409 or 500 from it, never from the message's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The command is malformed or incomplete.
    Invalid,
    /// The caller may not do this (two-person rule, roles, read-only auditors).
    Forbidden,
    /// No such request, grant, review or target.
    NotFound,
    /// The thing is not in a state that allows it (already decided, revoked, signed).
    Conflict,
    /// The gateway failed (state store); not the caller's fault.
    Internal,
}

impl From<&StateError> for Failure {
    fn from(e: &StateError) -> Failure {
        match e {
            StateError::NoSuchGrant(_)
            | StateError::NoSuchRequest(_)
            | StateError::NoSuchReview(_) => Failure::NotFound,
            StateError::AlreadyRevoked(_)
            | StateError::NotPending { .. }
            | StateError::AlreadyApproved { .. }
            | StateError::AlreadySigned(_)
            | StateError::CabAlreadySigned(_) => Failure::Conflict,
            StateError::Ambiguous(_) => Failure::Invalid,
            StateError::Db(_) | StateError::TooNew { .. } => Failure::Internal,
        }
    }
}

/// A malformed or incomplete command.
fn fail(text: impl Into<String>) -> Outcome {
    refuse(Failure::Invalid, text)
}

fn refuse(kind: Failure, text: impl Into<String>) -> Outcome {
    Outcome {
        text: format!("breakglass: {}\n", text.into()),
        code: 1,
        failure: Some(kind),
        data: serde_json::Value::Null,
    }
}

/// A refused sign-off, with its kind.
fn sign_fail(e: &crate::review::SignError) -> Outcome {
    use crate::review::SignError as E;
    let kind = match e {
        E::NotReviewer(_) | E::Participant { .. } => Failure::Forbidden,
        E::Incomplete(_) => Failure::Invalid,
        E::State(s) => s.into(),
        E::Store(_) => Failure::Internal,
    };
    refuse(kind, e.to_string())
}

/// A state store refusal, with its kind.
fn state_fail(e: &StateError) -> Outcome {
    refuse(e.into(), e.to_string())
}

/// A parsed control command line.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Parsed {
    pub command: String,
    pub args: Vec<String>,
    pub opts: BTreeMap<String, String>,
    pub flags: Vec<String>,
}

/// Splits a command line into words, honouring single and double quotes, then groups
/// `--option value words...` (a value runs to the next `--option`). Options in `FLAGS` take no
/// value.
pub fn parse(line: &str) -> Result<Parsed, String> {
    const FLAGS: &[&str] = &["emergency", "all"];
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut quote: Option<char> = None;
    for c in line.chars() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => cur.push(c),
            None if c == '\'' || c == '"' => {
                quote = Some(c);
                in_word = true;
            }
            None if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            None => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if quote.is_some() {
        return Err("unterminated quote".into());
    }
    if in_word {
        words.push(cur);
    }
    let mut p = Parsed::default();
    let mut it = words.into_iter().peekable();
    p.command = it.next().unwrap_or_default().to_lowercase();
    while let Some(w) = it.next() {
        if let Some(name) = w.strip_prefix("--") {
            let (name, inline) = match name.split_once('=') {
                Some((n, v)) => (n.to_string(), Some(v.to_string())),
                None => (name.to_string(), None),
            };
            if FLAGS.contains(&name.as_str()) {
                p.flags.push(name);
                continue;
            }
            let mut value: Vec<String> = inline.into_iter().collect();
            while let Some(next) = it.peek() {
                if next.starts_with("--") {
                    break;
                }
                value.extend(it.next());
            }
            if value.is_empty() {
                return Err(format!("--{name} needs a value"));
            }
            if p.opts.insert(name.clone(), value.join(" ")).is_some() {
                return Err(format!("--{name} given twice"));
            }
        } else {
            p.args.push(w);
        }
    }
    Ok(p)
}

const HELP: &str = "\
breakglass control commands (ssh -p PORT breakglass@GATEWAY COMMAND ...):
  request TARGET --reason TEXT --incident ID [--severity low|medium|high|critical]
          [--scenario security_patch|production_outage|system_failure|other] [--for 4h] [--emergency]
  approve REQUEST            approve someone else's request
  deny REQUEST --reason TEXT
  revoke GRANT|REQUEST [--reason TEXT]
  status                     your requests and grants, requests waiting for you, targets
  grants                     active grants you can see
  requests                   pending requests you can see
  credential GRANT|REQUEST    a one-time database password for your grant (shown once)
  token                      a bearer token for the JSON API (1 hour, shown once)
  login                      a single-use link that logs you in to the web UI (5 minutes)
  reviews                    open post-incident reviews (overdue first)
  review REVIEW|REQUEST      sign off (reviewers) by answering every question:
          --findings TEXT --thresholds-met yes|no [--thresholds-note TEXT]
          --escalation-possible yes|no [--escalation-note TEXT] --root-cause TEXT
          --actions-taken TEXT --procedure-update yes|no [--procedure-change TEXT]
  cab INCIDENT --outcome accepted|actions-required --notes TEXT
                             the change advisory board's review of a resolved incident
Then connect with: ssh -p PORT TARGET@GATEWAY
";

/// The person running a command, as the SSH key identified them.
pub struct Caller<'a> {
    pub person: &'a str,
    pub roles: &'a [String],
}

impl Caller<'_> {
    fn is_admin(&self) -> bool {
        self.roles.iter().any(|r| r == "admin")
    }
}

/// The workflow's control channel, as the SSH listener reaches it.
pub struct Channel;

#[async_trait::async_trait]
impl crate::services::ControlChannel for Channel {
    async fn run(
        &self,
        gw: &Gateway,
        person: &str,
        roles: &[String],
        line: &str,
    ) -> crate::services::ControlReply {
        let out = run(gw, &Caller { person, roles }, line).await;
        crate::services::ControlReply {
            text: out.text,
            code: out.code,
        }
    }
}

/// Runs one command line.
pub async fn run(gw: &Gateway, caller: &Caller<'_>, line: &str) -> Outcome {
    match parse(line) {
        Ok(p) => run_parsed(gw, caller, &p).await,
        Err(e) => fail(format!("{e}\n\n{HELP}")),
    }
}

/// The options and flags each command takes; anything else is refused, so a misspelt
/// `--severty` is an error rather than a silent default.
/// A workflow command, as every surface names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Help,
    Request,
    Approve,
    Deny,
    Revoke,
    Status,
    Grants,
    Requests,
    Reviews,
    Credential,
    Token,
    Login,
    Review,
    Cab,
}

impl Command {
    /// The command a word names; None for an unknown word.
    pub fn parse(word: &str) -> Option<Command> {
        Some(match word {
            "" | "help" | "--help" => Command::Help,
            "request" => Command::Request,
            "approve" => Command::Approve,
            "deny" => Command::Deny,
            "revoke" => Command::Revoke,
            "status" => Command::Status,
            "grants" => Command::Grants,
            "requests" => Command::Requests,
            "reviews" => Command::Reviews,
            "credential" => Command::Credential,
            "token" => Command::Token,
            "login" => Command::Login,
            "review" => Command::Review,
            "cab" => Command::Cab,
            _ => return None,
        })
    }

    /// Whether it changes the workflow's state (auditors, who are read-only, may not).
    pub fn writes(self) -> bool {
        matches!(
            self,
            Command::Request
                | Command::Approve
                | Command::Deny
                | Command::Revoke
                | Command::Review
                | Command::Cab
                | Command::Credential
        )
    }

    /// The options (with a value) and flags it takes.
    fn options(self) -> (&'static [&'static str], &'static [&'static str]) {
        match self {
            Command::Request => (
                &["reason", "incident", "severity", "scenario", "for"],
                &["emergency"],
            ),
            Command::Deny | Command::Revoke => (&["reason"], &[]),
            Command::Review => (&REVIEW_OPTIONS, &[]),
            Command::Cab => (&["outcome", "notes"], &[]),
            _ => (&[], &[]),
        }
    }
}

/// The review's options: one per question of [`crate::review::QUESTIONS`].
const REVIEW_OPTIONS: [&str; 9] = [
    "findings",
    "thresholds-met",
    "thresholds-note",
    "escalation-possible",
    "escalation-note",
    "root-cause",
    "actions-taken",
    "procedure-update",
    "procedure-change",
];

fn known_options(command: &str) -> (&'static [&'static str], &'static [&'static str]) {
    Command::parse(command).map_or((&[], &[]), Command::options)
}

/// Refuses options a command does not take and text holding control characters. Every
/// surface (SSH control channel, JSON API, web UI) ends in [`run_parsed`], which calls this
/// first, so what an approver is shown is what the requester typed, as text.
pub fn check_input(p: &Parsed) -> Result<(), String> {
    let (opts, flags) = known_options(&p.command);
    for name in p.opts.keys().chain(p.flags.iter()) {
        if !opts.contains(&name.as_str()) && !flags.contains(&name.as_str()) {
            let known: Vec<String> = opts
                .iter()
                .chain(flags.iter())
                .map(|o| format!("--{o}"))
                .collect();
            return Err(format!(
                "unknown option --{} for {} (known: {})",
                crate::text::terminal(name),
                if p.command.is_empty() {
                    "help"
                } else {
                    &p.command
                },
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            ));
        }
        if opts.contains(&name.as_str()) && p.flags.contains(name) {
            return Err(format!("--{name} needs a value"));
        }
        if flags.contains(&name.as_str()) && p.opts.contains_key(name) {
            return Err(format!("--{name} takes no value"));
        }
    }
    for (name, value) in &p.opts {
        let lines = if matches!(
            name.as_str(),
            "findings"
                | "root-cause"
                | "thresholds-note"
                | "escalation-note"
                | "actions-taken"
                | "procedure-change"
                | "notes"
        ) {
            crate::text::Lines::Many
        } else {
            crate::text::Lines::One
        };
        crate::text::check(name, value, lines)?;
    }
    for a in &p.args {
        crate::text::check("an argument", a, crate::text::Lines::One)?;
    }
    Ok(())
}

/// Runs one parsed command (the SSH control channel and the JSON API both end here).
pub async fn run_parsed(gw: &Gateway, caller: &Caller<'_>, p: &Parsed) -> Outcome {
    if let Err(e) = check_input(p) {
        return fail(e);
    }
    let Some(cmd) = Command::parse(&p.command) else {
        return fail(format!(
            "unknown command `{}`\n\n{HELP}",
            crate::text::terminal(&p.command)
        ));
    };
    if cmd.writes() && caller.roles.iter().any(|r| r == "auditor") {
        return refuse(
            Failure::Forbidden,
            format!(
                "{} is an auditor; auditors are read-only and cannot {}",
                caller.person, p.command
            ),
        );
    }
    let res = match cmd {
        Command::Help => Ok(ok(HELP.to_string())),
        Command::Request => request(gw, caller, p).await,
        Command::Approve => approve(gw, caller, p).await,
        Command::Deny => deny(gw, caller, p).await,
        Command::Revoke => revoke(gw, caller, p).await,
        Command::Status => status(gw, caller).await,
        Command::Grants => grants(gw, caller).await,
        Command::Requests => requests(gw, caller).await,
        Command::Reviews => reviews(gw, caller).await,
        Command::Credential => credential(gw, caller, p).await,
        Command::Token => token(gw, caller).await,
        Command::Login => login(gw, caller).await,
        Command::Review => review(gw, caller, p).await,
        Command::Cab => cab(gw, caller, p).await,
    };
    res.unwrap_or_else(|e| state_fail(&e))
}

fn request_event(action: Action, actor: &str, r: &Request) -> AccessEvent {
    let mut e = AccessEvent::new(action, actor);
    e.person = Some(r.person.clone());
    e.target = Some(r.target.clone());
    e.request_id = Some(r.id.clone());
    e.correlation_id = Some(r.id.clone());
    e.justification = Some(r.justification.clone());
    e.incident_id = Some(r.incident_id.clone());
    e.severity = Some(r.severity.clone());
    e.scenario = Some(r.scenario.clone());
    e.grant_id = r.grant_id.clone();
    e.emergency = Some(r.emergency);
    e.approvers = Some(r.approvals.iter().map(|(a, _)| a.clone()).collect());
    e
}

async fn emit(gw: &Gateway, e: &AccessEvent) -> Result<(), StateError> {
    gw.audit(e)
        .await
        .map_err(|err| StateError::Db(format!("audit event not written: {err}")))
}

const SEVERITIES: &[&str] = &["low", "medium", "high", "critical"];
const SCENARIOS: &[&str] = &[
    "security_patch",
    "production_outage",
    "system_failure",
    "other",
    // A rehearsal (`breakglass drill`): counted apart from real incidents.
    "drill",
];

pub(crate) async fn request(
    gw: &Gateway,
    caller: &Caller<'_>,
    p: &Parsed,
) -> Result<Outcome, StateError> {
    let Some(target_name) = p.args.first() else {
        return Ok(fail(
            "request needs a target: request TARGET --reason TEXT --incident ID",
        ));
    };
    let Some(target) = gw.config.targets.get(target_name) else {
        return Ok(refuse(
            Failure::NotFound,
            format!("there is no target named `{target_name}`"),
        ));
    };
    let Some(reason) = p.opts.get("reason").filter(|r| !r.trim().is_empty()) else {
        return Ok(fail("a request needs a justification: --reason TEXT"));
    };
    let Some(incident) = p.opts.get("incident").filter(|r| !r.trim().is_empty()) else {
        return Ok(fail("a request needs an incident id: --incident ID"));
    };
    let severity = p
        .opts
        .get("severity")
        .map(|s| s.to_lowercase())
        .unwrap_or_else(|| "high".into());
    if !SEVERITIES.contains(&severity.as_str()) {
        return Ok(fail(format!(
            "--severity must be one of {}",
            SEVERITIES.join(", ")
        )));
    }
    let scenario = p
        .opts
        .get("scenario")
        .map(|s| s.to_lowercase().replace('-', "_"))
        .unwrap_or_else(|| "other".into());
    let scenario = match scenario.as_str() {
        "outage" => "production_outage".to_string(),
        "patch" => "security_patch".to_string(),
        "failure" => "system_failure".to_string(),
        s => s.to_string(),
    };
    if !SCENARIOS.contains(&scenario.as_str()) {
        return Ok(fail(format!(
            "--scenario must be one of {}",
            SCENARIOS.join(", ")
        )));
    }
    let duration = match p.opts.get("for") {
        Some(d) => match humantime::parse_duration(d) {
            Ok(d) if !d.is_zero() => d,
            _ => {
                return Ok(fail(format!(
                    "--for `{d}` is not a duration like 30m or 2h"
                )))
            }
        },
        None => gw.config.limits.default_grant_ttl,
    };
    let min = gw.config.limits.min_grant_ttl;
    if duration < min {
        return Ok(fail(format!(
            "--for must be at least {} (limits.min_grant_ttl): a break-glass session needs time to do anything",
            humantime::format_duration(min)
        )));
    }
    let capped = duration.min(target.max_duration);
    let emergency = p.flags.iter().any(|f| f == "emergency");
    if emergency && !target.emergency_self_service {
        return Ok(fail(format!(
            "{} does not allow emergency self-service; ask an approver ({})",
            target.name,
            target.approvers.join(", ")
        )));
    }
    // A drill is counted apart from real incidents, so it must look like one everywhere:
    // never without a second person, and under its own incident id (a real incident cannot
    // be filed as a drill to leave the incident figures).
    if scenario == "drill" {
        if emergency {
            return Ok(fail(
                "a drill never uses emergency self-service: it rehearses the two-person rule",
            ));
        }
        if !incident.starts_with("DRILL-") {
            return Ok(fail(format!(
                "a drill's incident id starts with DRILL- (got `{}`); `breakglass drill` makes one",
                term(incident)
            )));
        }
    }
    let now = clock::now();
    let req = gw
        .store
        .create_request(NewRequest {
            person: caller.person.to_string(),
            target: target.name.clone(),
            justification: reason.clone(),
            incident_id: incident.clone(),
            severity,
            scenario,
            duration: capped,
            created_at: now,
            expires_at: now
                + chrono::Duration::from_std(gw.config.limits.request_ttl).unwrap_or_default(),
            emergency,
        })
        .await?;
    let mut ev = request_event(Action::RequestCreated, caller.person, &req);
    ev.message = Some(format!(
        "{} requests break-glass access to {} for {} ({}); custodians: {}",
        req.person,
        req.target,
        humantime::format_duration(req.duration),
        req.incident_id,
        if target.custodians.is_empty() {
            "none".to_string()
        } else {
            target.custodians.join(", ")
        }
    ));
    emit(gw, &ev).await?;
    let mut text = format!(
        "request {} created for {} on {}\n",
        req.id, req.person, req.target
    );
    if capped < duration {
        text.push_str(&format!(
            "note: duration capped at {} (the target's maximum)\n",
            humantime::format_duration(capped)
        ));
    }
    if emergency {
        let granted = gw.store.self_grant(&req.id, now).await?;
        if let Approval::Granted { request, grant } = granted {
            let mut ev = request_event(Action::RequestApproved, caller.person, &request);
            ev.message = Some(format!(
                "EMERGENCY SELF-SERVICE: {} granted themselves access to {} without a second person; mandatory review",
                request.person, request.target
            ));
            emit(gw, &ev).await?;
            let mut gev = AccessEvent::for_grant(Action::GrantCreated, caller.person, &grant);
            gev.emergency = Some(true);
            emit(gw, &gev).await?;
            crate::rotation::open_for_grant(gw, &grant.target).await;
            text.push_str(&format!(
                "EMERGENCY self-service grant {} until {}: this use is flagged for mandatory review\nconnect: ssh -p PORT {}@GATEWAY\n",
                grant.id,
                clock::rfc3339(grant.expires_at),
                grant.target
            ));
            return Ok(ok_with(
                text,
                serde_json::json!({"request_id": req.id, "grant_id": grant.id, "emergency": true}),
            ));
        }
        return Ok(ok(text));
    }
    text.push_str(&format!(
        "it needs {} approval(s) from: {}; it expires if not approved by {}\n",
        target.required_approvals,
        target.approvers.join(", "),
        clock::rfc3339(req.expires_at)
    ));
    Ok(ok_with(
        text,
        serde_json::json!({"request_id": req.id, "status": "pending", "expires_at": clock::rfc3339(req.expires_at)}),
    ))
}

pub(crate) async fn approve(
    gw: &Gateway,
    caller: &Caller<'_>,
    p: &Parsed,
) -> Result<Outcome, StateError> {
    let Some(id) = p.args.first() else {
        return Ok(fail("approve needs a request id"));
    };
    let req = gw.store.find_request(id).await?;
    let Some(target) = gw.config.targets.get(&req.target) else {
        return Ok(fail(format!(
            "target {} is no longer configured",
            req.target
        )));
    };
    // The two-person rule: nobody approves their own request.
    if req.person == caller.person {
        return Ok(refuse(
            Failure::Forbidden,
            format!(
                "you cannot approve your own request {} (two-person rule)",
                req.id
            ),
        ));
    }
    if !target.is_approver(caller.person, caller.roles) {
        return Ok(refuse(
            Failure::Forbidden,
            format!(
                "{} is not an approver for {} (approvers: {})",
                caller.person,
                target.name,
                target.approvers.join(", ")
            ),
        ));
    }
    let now = clock::now();
    match gw
        .store
        .approve(&req.id, caller.person, target.required_approvals, now)
        .await
    {
        Ok(Approval::Recorded {
            request,
            have,
            need,
        }) => {
            let mut ev = request_event(Action::RequestApproved, caller.person, &request);
            ev.message = Some(format!("{} approved ({have} of {need})", caller.person));
            emit(gw, &ev).await?;
            Ok(ok_with(
                format!(
                    "approval recorded for {}: {have} of {need}; more approvals needed\n",
                    request.id
                ),
                serde_json::json!({"request_id": request.id, "approvals": have, "needed": need}),
            ))
        }
        Ok(Approval::Granted { request, grant }) => {
            let mut ev = request_event(Action::RequestApproved, caller.person, &request);
            ev.message = Some(format!("{} approved; access granted", caller.person));
            emit(gw, &ev).await?;
            emit(
                gw,
                &AccessEvent::for_grant(Action::GrantCreated, caller.person, &grant),
            )
            .await?;
            // A role kept NOLOGIN between grants is switched on before the approver hears
            // back, so the requester's first login finds it open.
            crate::rotation::open_for_grant(gw, &grant.target).await;
            Ok(ok_with(
                format!(
                    "approved {}: grant {} gives {} access to {} until {}\n",
                    request.id,
                    grant.id,
                    grant.person,
                    grant.target,
                    clock::rfc3339(grant.expires_at)
                ),
                serde_json::json!({"request_id": request.id, "grant_id": grant.id, "expires_at": clock::rfc3339(grant.expires_at)}),
            ))
        }
        Err(StateError::AlreadyApproved { id, .. }) => Ok(refuse(
            Failure::Conflict,
            format!("you have already approved {id}; another approver is needed"),
        )),
        Err(e) => Ok(state_fail(&e)),
    }
}

pub(crate) async fn deny(
    gw: &Gateway,
    caller: &Caller<'_>,
    p: &Parsed,
) -> Result<Outcome, StateError> {
    let Some(id) = p.args.first() else {
        return Ok(fail("deny needs a request id"));
    };
    let Some(reason) = p.opts.get("reason").filter(|r| !r.trim().is_empty()) else {
        return Ok(fail("a denial needs a reason: --reason TEXT"));
    };
    let req = gw.store.find_request(id).await?;
    let may = gw
        .config
        .targets
        .get(&req.target)
        .is_some_and(|t| t.is_approver(caller.person, caller.roles))
        || caller.is_admin();
    if !may || req.person == caller.person {
        return Ok(refuse(Failure::Forbidden, format!(
            "{} may not deny request {} (approvers of {} and admins may; withdraw your own by letting it expire)",
            caller.person, req.id, req.target
        )));
    }
    let req = match gw
        .store
        .deny(&req.id, caller.person, reason, clock::now())
        .await
    {
        Ok(r) => r,
        Err(e) => return Ok(state_fail(&e)),
    };
    let mut ev = request_event(Action::RequestDenied, caller.person, &req);
    ev.outcome = crate::siem::Outcome::Failure;
    ev.reason = Some(reason.clone());
    ev.message = Some(format!("{} denied {}: {reason}", caller.person, req.id));
    emit(gw, &ev).await?;
    Ok(ok_with(
        format!("denied {}: {reason}\n", req.id),
        serde_json::json!({"request_id": req.id, "status": "denied"}),
    ))
}

pub(crate) async fn revoke(
    gw: &Gateway,
    caller: &Caller<'_>,
    p: &Parsed,
) -> Result<Outcome, StateError> {
    let Some(id) = p.args.first() else {
        return Ok(fail("revoke needs a grant or request id"));
    };
    let reason = p
        .opts
        .get("reason")
        .cloned()
        .unwrap_or_else(|| format!("revoked by {}", caller.person));
    // A request id revokes the grant it produced.
    let grant_id = match grant_id_of(gw, id).await {
        Ok(g) => g,
        Err(why) => return Ok(fail(why)),
    };
    let g = gw.store.find_grant(&grant_id).await?;
    let may = g.person == caller.person
        || caller.is_admin()
        || gw.config.targets.get(&g.target).is_some_and(|t| {
            t.is_approver(caller.person, caller.roles)
                || t.custodians.iter().any(|c| c == caller.person)
        });
    if !may {
        return Ok(refuse(Failure::Forbidden, format!(
            "{} may not revoke grant {} (its holder, approvers and custodians of {} and admins may)",
            caller.person, g.id, g.target
        )));
    }
    let g = match gw
        .store
        .revoke_grant(&g.id, caller.person, &reason, clock::now())
        .await
    {
        Ok(g) => g,
        Err(e) => return Ok(state_fail(&e)),
    };
    let mut ev = AccessEvent::for_grant(Action::GrantRevoked, caller.person, &g);
    ev.reason = Some(reason.clone());
    ev.message = Some(format!(
        "{} revoked grant {} of {} on {}",
        caller.person, g.id, g.person, g.target
    ));
    emit(gw, &ev).await?;
    Ok(ok_with(
        format!(
            "revoked {} ({} on {}); live sessions end within a second\n",
            g.id, g.person, g.target
        ),
        serde_json::json!({"grant_id": g.id, "status": "revoked"}),
    ))
}

/// Stored text as a terminal shows it: control characters as escapes (`text::terminal`).
/// Input is checked, but rows written before the check (or straight into the state file)
/// must still reach an approver's terminal as text.
fn term(s: &str) -> std::borrow::Cow<'_, str> {
    crate::text::terminal(s)
}

fn fmt_left(until: chrono::DateTime<chrono::Utc>) -> String {
    let left = (until - clock::now()).to_std().unwrap_or(Duration::ZERO);
    humantime::format_duration(Duration::from_secs(left.as_secs())).to_string()
}

async fn status(gw: &Gateway, caller: &Caller<'_>) -> Result<Outcome, StateError> {
    let now = clock::now();
    let mut t = format!(
        "you are {} (roles: {})\n",
        caller.person,
        caller.roles.join(", ")
    );
    let grants = gw.store.list_grants(Some(now)).await?;
    let mine: Vec<&Grant> = grants
        .iter()
        .filter(|g| g.person == caller.person)
        .collect();
    t.push_str("\nyour active grants:\n");
    if mine.is_empty() {
        t.push_str("  (none)\n");
    }
    for g in mine {
        t.push_str(&format!(
            "  {}  {}  until {} ({} left)  {}\n",
            g.id,
            g.target,
            clock::rfc3339(g.expires_at),
            fmt_left(g.expires_at),
            term(&g.incident_id)
        ));
    }
    let pending = gw.store.list_requests(Some(RequestStatus::Pending)).await?;
    t.push_str("\nyour pending requests:\n");
    let own: Vec<&Request> = pending
        .iter()
        .filter(|r| r.person == caller.person)
        .collect();
    if own.is_empty() {
        t.push_str("  (none)\n");
    }
    for r in own {
        t.push_str(&format!(
            "  {}  {}  {} approval(s) so far  expires in {}\n",
            r.id,
            r.target,
            r.approvals.len(),
            fmt_left(r.expires_at)
        ));
    }
    t.push_str("\nwaiting for your approval:\n");
    let mut any = false;
    for r in pending.iter().filter(|r| r.person != caller.person) {
        if gw
            .config
            .targets
            .get(&r.target)
            .is_some_and(|tc| tc.is_approver(caller.person, caller.roles))
            && !r.approvals.iter().any(|(a, _)| a == caller.person)
        {
            any = true;
            t.push_str(&format!(
                "  {}  {} wants {} for {}: {} ({}, {}, {})\n",
                r.id,
                r.person,
                r.target,
                humantime::format_duration(r.duration),
                term(&r.justification),
                term(&r.incident_id),
                r.severity,
                r.scenario
            ));
        }
    }
    if !any {
        t.push_str("  (none)\n");
    }
    t.push_str("\ntargets:\n");
    for tc in gw.config.targets.values() {
        t.push_str(&format!(
            "  {}  login {}  approvers: {}  needs {}  custodians: {}{}\n",
            tc.name,
            tc.login,
            tc.approvers.join(", "),
            tc.required_approvals,
            if tc.custodians.is_empty() {
                "none".to_string()
            } else {
                tc.custodians.join(", ")
            },
            if tc.emergency_self_service {
                "  (emergency self-service)"
            } else {
                ""
            }
        ));
    }
    Ok(ok(t))
}

/// Whether the caller may see another person's grant or request for `target`.
fn may_see(gw: &Gateway, caller: &Caller<'_>, person: &str, target: &str) -> bool {
    crate::policy::may_see(
        caller.person,
        caller.roles,
        person,
        gw.config.targets.get(target),
    )
}

async fn grants(gw: &Gateway, caller: &Caller<'_>) -> Result<Outcome, StateError> {
    let now = clock::now();
    let mut t = String::from(
        "ID                                    PERSON  TARGET  STATE  EXPIRES_AT  INCIDENT\n",
    );
    for g in gw.store.list_grants(Some(now)).await? {
        if !may_see(gw, caller, &g.person, &g.target) {
            continue;
        }
        let state = match g.state_at(now) {
            GrantState::Active => "active",
            GrantState::Expired => "expired",
            GrantState::Revoked => "revoked",
        };
        t.push_str(&format!(
            "{}  {}  {}  {}  {}  {}{}\n",
            g.id,
            g.person,
            g.target,
            state,
            clock::rfc3339(g.expires_at),
            term(&g.incident_id),
            if g.review_required { "  EMERGENCY" } else { "" }
        ));
    }
    Ok(ok(t))
}

async fn requests(gw: &Gateway, caller: &Caller<'_>) -> Result<Outcome, StateError> {
    let mut t = String::from("ID  PERSON  TARGET  FOR  APPROVALS  EXPIRES_AT  INCIDENT  REASON\n");
    for r in gw.store.list_requests(Some(RequestStatus::Pending)).await? {
        if !may_see(gw, caller, &r.person, &r.target) {
            continue;
        }
        t.push_str(&format!(
            "{}  {}  {}  {}  {}  {}  {}  {}\n",
            r.id,
            r.person,
            r.target,
            humantime::format_duration(r.duration),
            r.approvals
                .iter()
                .map(|(a, _)| a.as_str())
                .collect::<Vec<_>>()
                .join(","),
            clock::rfc3339(r.expires_at),
            term(&r.incident_id),
            term(&r.justification)
        ));
    }
    Ok(ok(t))
}

async fn credential(gw: &Gateway, caller: &Caller<'_>, p: &Parsed) -> Result<Outcome, StateError> {
    let Some(id) = p.args.first() else {
        return Ok(fail("credential needs your grant or request id"));
    };
    let grant_id = match grant_id_of(gw, id).await {
        Ok(g) => g,
        Err(why) => return Ok(fail(why)),
    };
    let g = gw.store.find_grant(&grant_id).await?;
    if g.person != caller.person {
        return Ok(refuse(
            Failure::Forbidden,
            format!("grant {} is not yours", g.id),
        ));
    }
    let now = clock::now();
    if g.state_at(now) != GrantState::Active {
        return Ok(refuse(
            Failure::Conflict,
            format!("grant {} is not active", g.id),
        ));
    }
    let secret = crate::credential::new_secret();
    gw.store
        .put_credential(&g, &crate::credential::verifier(&secret), now)
        .await?;
    let mut e = AccessEvent::for_grant(Action::CredentialIssued, caller.person, &g);
    e.message = Some(format!(
        "{} fetched a JIT database credential for {} (valid until {})",
        caller.person,
        g.target,
        clock::rfc3339(g.expires_at)
    ));
    emit(gw, &e).await?;
    Ok(ok(format!(
        "user: {}\ndatabase: {}\npassword: {secret}\nvalid until: {}\n(shown once; the gateway keeps only a SCRAM verifier; fetching again replaces it)\n",
        g.person,
        g.target,
        clock::rfc3339(g.expires_at)
    )))
}

/// The grant a grant id or request id names (a request id means the grant it produced).
async fn grant_id_of(gw: &Gateway, id: &str) -> Result<String, String> {
    match gw.store.find_request(id).await {
        Ok(r) => r
            .grant_id
            .ok_or_else(|| format!("request {} has no grant ({})", r.id, r.status.as_str())),
        Err(_) => Ok(id.to_string()),
    }
}

/// How long an API token lives.
pub const API_TOKEN_TTL: Duration = Duration::from_secs(3600);

async fn token(gw: &Gateway, caller: &Caller<'_>) -> Result<Outcome, StateError> {
    let secret = crate::credential::new_secret();
    let now = clock::now();
    let until = now + chrono::Duration::from_std(API_TOKEN_TTL).unwrap_or_default();
    gw.store
        .put_api_token(&token_hash(&secret), caller.person, now, until)
        .await?;
    Ok(ok(format!(
        "token: {secret}\nvalid until: {}\nuse: curl -H 'Authorization: Bearer {secret}' http://GATEWAY/api/v1/status\n",
        clock::rfc3339(until)
    )))
}

/// Issues a single-use, short-lived link that logs the person in to the web UI.
async fn login(gw: &Gateway, caller: &Caller<'_>) -> Result<Outcome, StateError> {
    let Some(base) = gw.public_url() else {
        return Ok(fail(
            "the web UI is not enabled on this gateway (set listeners.http)",
        ));
    };
    let secret = crate::credential::new_secret();
    let now = clock::now();
    let until = now + chrono::Duration::from_std(gw.config.web.login_link_ttl).unwrap_or_default();
    gw.store
        .put_login_link(&token_hash(&secret), caller.person, now, until)
        .await?;
    let url = format!("{base}/login#{secret}");
    Ok(ok_with(
        format!(
            "open this link in your browser; it works once, until {}:\n{url}\n",
            clock::rfc3339(until)
        ),
        serde_json::json!({ "url": url, "expires_at": clock::rfc3339(until) }),
    ))
}

/// Open reviews the caller may see: reviewers, auditors and admins see all (as in the web
/// UI's `GET /api/v1/reviews`), everyone else the reviews of their own grants.
async fn reviews(gw: &Gateway, caller: &Caller<'_>) -> Result<Outcome, StateError> {
    let now = clock::now();
    let sees_all = caller
        .roles
        .iter()
        .any(|r| r == "reviewer" || r == "auditor" || r == "admin");
    let mut t = String::from("ID  CORRELATION  PERSON  TARGET  SCENARIO  DUE_AT  STATE\n");
    for r in gw.store.open_reviews().await? {
        if !sees_all && r.person != caller.person {
            continue;
        }
        t.push_str(&format!(
            "{}  {}  {}  {}  {}  {}  {}{}\n",
            r.id,
            r.correlation_id,
            r.person,
            r.target,
            term(&r.scenario),
            clock::rfc3339(r.due_at),
            if r.due_at <= now { "OVERDUE" } else { "open" },
            if r.emergency { "  EMERGENCY" } else { "" }
        ));
    }
    Ok(ok(t))
}

async fn review(gw: &Gateway, caller: &Caller<'_>, p: &Parsed) -> Result<Outcome, StateError> {
    let Some(id) = p.args.first() else {
        return Ok(fail("review needs a review or request id"));
    };
    let answers = crate::review::SignOff(
        p.opts
            .iter()
            .filter(|(k, _)| REVIEW_OPTIONS.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    );
    match crate::review::sign(
        &gw.core,
        &gw.config.reviews,
        caller.person,
        caller.roles,
        id,
        &answers,
    )
    .await
    {
        Ok(r) => Ok(ok(format!(
            "review {} signed off by {}; stored as {}\n",
            r.id,
            caller.person,
            crate::storage::key::review(&r.correlation_id, &r.id)
        ))),
        Err(e) => Ok(sign_fail(&e)),
    }
}

async fn cab(gw: &Gateway, caller: &Caller<'_>, p: &Parsed) -> Result<Outcome, StateError> {
    use crate::incident::CabError as E;
    let Some(incident) = p.args.first() else {
        return Ok(fail("cab needs an incident id"));
    };
    let opt = |k: &str| p.opts.get(k).map(String::as_str).unwrap_or("");
    match crate::incident::sign_cab(
        &gw.core,
        gw.config.reviews.reviewer_may_be_participant,
        caller.person,
        caller.roles,
        incident,
        opt("outcome"),
        opt("notes"),
    )
    .await
    {
        Ok(c) => Ok(ok(format!(
            "CAB review of incident {} signed by {}: {}; stored as {}\n",
            term(&c.incident_id),
            caller.person,
            c.outcome,
            crate::storage::key::cab_review(&c.incident_id)
        ))),
        Err(e) => {
            let kind = match &e {
                E::NotReviewer(_) | E::Participant { .. } => Failure::Forbidden,
                E::Incomplete => Failure::Invalid,
                E::NoSuchIncident(_) => Failure::NotFound,
                E::NotResolved(_) => Failure::Conflict,
                E::State(s) => s.into(),
                E::Store(_) => Failure::Internal,
            };
            Ok(refuse(kind, e.to_string()))
        }
    }
}

/// Expires pending requests that ran out of time, with an event each. Runs every few seconds.
pub async fn request_expiry(gw: std::sync::Arc<Gateway>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        match gw.store.expire_requests(clock::now()).await {
            Ok(expired) => {
                for r in expired {
                    let mut ev = request_event(Action::RequestExpired, "breakglass", &r);
                    ev.outcome = crate::siem::Outcome::Failure;
                    ev.reason = Some("not_approved_in_time".into());
                    ev.message = Some(format!("request {} expired without enough approvals", r.id));
                    if let Err(e) = gw.audit(&ev).await {
                        tracing::error!(error = %e, "could not write request expiry event");
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "request expiry check failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_table() {
        // (line, command, args, options, flags)
        type Case<'a> = (
            &'a str,
            &'a str,
            &'a [&'a str],
            &'a [(&'a str, &'a str)],
            &'a [&'a str],
        );
        let cases: &[Case] = &[
            (
                "request web-01 --reason disk full on /var --incident INC-7 --for 2h",
                "request",
                &["web-01"],
                &[
                    ("reason", "disk full on /var"),
                    ("incident", "INC-7"),
                    ("for", "2h"),
                ],
                &[],
            ),
            (
                "request web-01 --reason 'a --b' --emergency --incident=INC-1",
                "request",
                &["web-01"],
                &[("reason", "a --b"), ("incident", "INC-1")],
                &["emergency"],
            ),
            ("APPROVE R-1", "approve", &["R-1"], &[], &[]),
            ("", "", &[], &[], &[]),
        ];
        for (line, cmd, args, opts, flags) in cases {
            let p = parse(line).expect(line);
            assert_eq!(p.command, *cmd, "{line}");
            assert_eq!(
                p.args,
                args.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
                "{line}"
            );
            let want: BTreeMap<String, String> = opts
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            assert_eq!(p.opts, want, "{line}");
            assert_eq!(
                p.flags,
                flags.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
                "{line}"
            );
        }
        assert!(parse("deny R-1 --reason").is_err());
        assert!(parse("deny R-1 --reason 'x").is_err());
        assert!(parse("request --for 1h --for 2h").is_err());
    }

    #[test]
    fn input_check_table() {
        // (line, the error, if any)
        let cases: &[(&str, Option<&str>)] = &[
            ("request web-01 --reason disk full --incident INC-7 --severity low --emergency", None),
            (
                "request web-01 --reason x --incident I --severty low",
                Some("unknown option --severty for request (known: --reason, --incident, --severity, --scenario, --for, --emergency)"),
            ),
            ("approve R-1 --reason x", Some("unknown option --reason for approve (known: none)")),
            ("status --all", Some("unknown option --all for status (known: none)")),
            ("deny R-1 --reason no --emergency", Some("unknown option --emergency for deny (known: --reason)")),
            ("revoke G-1 --reason done", None),
            ("review V-1 --findings a --root-cause b", None),
            (
                "request web-01 --reason \x1b]52;c;ZXZpbA==\x07 --incident I",
                Some("reason contains a control character (U+001B)"),
            ),
            (
                "request web-01 --reason ok --incident INC\u{202E}1",
                Some("incident contains a bidirectional override (U+202E)"),
            ),
            ("deny R-1 --reason 'two\nlines'", Some("reason contains a control character (U+000A)")),
            ("review V-1 --findings 'line one\nline two' --root-cause b", None),
            ("approve R-\x1b[2J1", Some("an argument contains a control character (U+001B)")),
            ("request web-01 --x\x1b[2J y", Some("unknown option --x\\u{1b}[2J for request (known: --reason, --incident, --severity, --scenario, --for, --emergency)")),
        ];
        for (line, want) in cases {
            let p = parse(line).expect(line);
            assert_eq!(check_input(&p).err().as_deref(), *want, "{line:?}");
        }
    }

    #[test]
    fn a_state_refusal_keeps_its_kind_and_a_store_failure_is_not_the_callers() {
        let cases = [
            (StateError::NoSuchGrant("g".into()), Failure::NotFound),
            (StateError::NoSuchReview("v".into()), Failure::NotFound),
            (StateError::AlreadyRevoked("g".into()), Failure::Conflict),
            (
                StateError::NotPending {
                    id: "r".into(),
                    status: "denied".into(),
                },
                Failure::Conflict,
            ),
            (StateError::Ambiguous("a".into()), Failure::Invalid),
            (StateError::Db("disk I/O error".into()), Failure::Internal),
        ];
        for (e, want) in cases {
            let o = state_fail(&e);
            assert_eq!((o.code, o.failure), (1, Some(want)), "{e}");
        }
        assert_eq!(ok("fine".into()).failure, None);
    }

    #[test]
    fn commands_parse_and_only_changes_count_as_writes() {
        for w in [
            "request",
            "approve",
            "deny",
            "revoke",
            "review",
            "credential",
        ] {
            assert!(Command::parse(w).is_some_and(Command::writes), "{w} writes");
        }
        for w in [
            "", "help", "status", "grants", "requests", "reviews", "token", "login",
        ] {
            assert!(
                Command::parse(w).is_some_and(|c| !c.writes()),
                "{w} only reads"
            );
        }
        assert_eq!(Command::parse("rm"), None);
        assert_eq!(known_options("deny"), (&["reason"][..], &[][..]));
        assert_eq!(known_options("rm"), (&[][..], &[][..]));
    }
}
