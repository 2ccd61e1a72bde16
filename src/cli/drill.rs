//! `breakglass drill TARGET`: a break-glass exercise end to end against the real target,
//! through the running gateway, as a real person (their SSH key) with a real second person
//! approving. Each step is timed and printed as a checklist; the first failed step is named
//! and the drill exits non-zero.
//!
//! The drill is tagged (`--scenario drill`, incident `DRILL-…`), so reports count drills apart
//! from real incidents. It weakens nothing: the approval is the normal two-person approval,
//! the session is recorded and rotated like any other.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use breakglass::config::{Config, Protocol, TargetConfig};
use breakglass::state::{RequestStatus, SessionFilter, Store};
use tokio::io::AsyncBufReadExt;

use super::open_state;

/// What `drill` was asked.
pub(super) struct DrillArgs {
    pub config: PathBuf,
    pub target: String,
    pub key: PathBuf,
    pub gateway: Option<String>,
    pub duration: Option<String>,
    pub approval_timeout: Duration,
    pub step_timeout: Duration,
}

/// One line of the checklist.
struct Step {
    name: &'static str,
    started: Instant,
}

/// The checklist: printed as it goes, so an operator watching sees where it stands.
struct Checklist {
    passed: usize,
    skipped: usize,
    /// The step that failed, and why.
    failed: Option<(&'static str, String)>,
}

/// What the drill learnt, for its `drill_finished` event.
#[derive(Default)]
struct Facts {
    request: Option<String>,
    person: Option<String>,
    time_to_access: Option<Duration>,
}

impl Checklist {
    fn start(&self, name: &'static str) -> Step {
        Step {
            name,
            started: Instant::now(),
        }
    }

    fn ok(&mut self, s: Step, detail: &str) {
        self.passed += 1;
        println!(
            "  ok    {:<16} {:>7.1}s  {detail}",
            s.name,
            s.started.elapsed().as_secs_f64()
        );
    }

    fn skip(&mut self, name: &str, why: &str) {
        self.skipped += 1;
        println!("  skip  {name:<16} {:>8}  {why}", "-");
    }

    /// Prints the failed step and the verdict; the drill's exit code.
    fn fail(&mut self, s: Step, why: &str) -> ExitCode {
        self.failed = Some((s.name, why.to_string()));
        println!(
            "  FAIL  {:<16} {:>7.1}s  {why}",
            s.name,
            s.started.elapsed().as_secs_f64()
        );
        println!(
            "drill FAILED at step `{}` ({} passed before it)",
            s.name, self.passed
        );
        ExitCode::from(1)
    }
}

/// How the drill reaches the gateway as the person.
struct Client {
    host: String,
    port: u16,
    key: PathBuf,
    known_hosts: PathBuf,
    /// The gateway's PostgreSQL listener (PostgreSQL targets).
    pg_listen: Option<std::net::SocketAddr>,
    /// `require` when the listener has TLS (the drill's psql never falls back to plain TCP
    /// with the credential), `disable` when it is plain TCP by configuration.
    pg_sslmode: &'static str,
}

impl Client {
    fn ssh(&self, login: &str, command: &str) -> tokio::process::Command {
        let mut c = tokio::process::Command::new("ssh");
        c.args(["-F", "/dev/null", "-i"])
            .arg(&self.key)
            .args([
                "-o",
                "IdentitiesOnly=yes",
                "-o",
                "BatchMode=yes",
                "-o",
                "StrictHostKeyChecking=yes",
                "-o",
                "ConnectTimeout=10",
            ])
            .arg("-o")
            .arg(format!("UserKnownHostsFile={}", self.known_hosts.display()))
            .arg("-p")
            .arg(self.port.to_string())
            .arg(format!("{login}@{}", self.host))
            .arg(command)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        c
    }

    /// Runs a control-channel command; (exit code, stdout, stderr).
    async fn control(&self, command: &str, timeout: Duration) -> Result<(i32, String, String)> {
        let out = tokio::time::timeout(timeout, self.ssh("breakglass", command).output())
            .await
            .map_err(|_| anyhow!("no answer from the gateway within {timeout:?}"))?
            .context("cannot run ssh (install openssh-client)")?;
        Ok((
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }
}

/// The word after `request` in the gateway's answer.
fn request_id(out: &str) -> Option<String> {
    out.split_whitespace()
        .skip_while(|w| *w != "request")
        .nth(1)
        .map(str::to_string)
}

pub(super) async fn drill(a: DrillArgs) -> Result<ExitCode> {
    let cfg = Config::load(&a.config)?;
    let t = cfg
        .targets
        .get(&a.target)
        .ok_or_else(|| anyhow!("no target named `{}`", a.target))?
        .clone();
    let store = open_state(&cfg).await?;
    let (host, port) = match &a.gateway {
        Some(g) => {
            let (h, p) = g
                .rsplit_once(':')
                .ok_or_else(|| anyhow!("--gateway `{g}` is not HOST:PORT"))?;
            (h.to_string(), p.parse().context("--gateway port")?)
        }
        None if cfg.ssh_listen.ip().is_unspecified() => {
            ("127.0.0.1".to_string(), cfg.ssh_listen.port())
        }
        None => (cfg.ssh_listen.ip().to_string(), cfg.ssh_listen.port()),
    };
    let known_hosts = TempFile(std::env::temp_dir().join(format!(
        "breakglass-drill-{}.known_hosts",
        uuid::Uuid::new_v4().simple()
    )));
    let keys = breakglass::keys::GatewayKeys::load_or_create(&cfg.keys_dir)?;
    let line = super::known_hosts_line(
        &host,
        port,
        &breakglass::keys::openssh_line(keys.host.public_key()),
    );
    std::fs::write(&known_hosts.0, format!("{line}\n"))?;
    let client = Client {
        host,
        port,
        key: a.key.clone(),
        known_hosts: known_hosts.0.clone(),
        pg_listen: cfg.pg_listen,
        pg_sslmode: if cfg.pg_tls.is_some() {
            "require"
        } else {
            "disable"
        },
    };
    let duration = match &a.duration {
        Some(d) => humantime::parse_duration(d).with_context(|| format!("--for `{d}`"))?,
        None => cfg.limits.min_grant_ttl.max(Duration::from_secs(60)),
    };
    let incident = format!(
        "DRILL-{}",
        breakglass::clock::now().format("%Y%m%dT%H%M%SZ")
    );
    println!(
        "drill of {} ({}) through {}:{} as the owner of {}",
        t.name,
        t.protocol.as_str(),
        client.host,
        client.port,
        a.key.display()
    );
    let alerts_before = alert_counts(&cfg).await;
    let mut list = Checklist {
        passed: 0,
        skipped: 0,
        failed: None,
    };
    let mut facts = Facts::default();
    let began = Instant::now();
    let code = async {

    // 0. A role kept NOLOGIN between grants must be NOLOGIN now, and switchable.
    if t.admin_login.is_some() {
        let s = list.start("account off");
        match vault_verify(&a.config, &t.name, a.step_timeout).await {
            Ok(said) if said.contains("NOLOGIN now") || said.contains("KEY-OUT now") => list.ok(
                s,
                &format!(
                    "{} is {} between grants and can be switched",
                    t.login,
                    breakglass::rotation::state_tag(&t, false)
                ),
            ),
            Ok(said) => {
                return Ok(list.fail(
                    s,
                    &format!(
                        "{} can log in although no drill grant exists yet: {}",
                        t.login,
                        said.trim()
                    ),
                ))
            }
            Err(e) => return Ok(list.fail(s, &format!("the role cannot be switched: {e:#}"))),
        }
    }

    // 1. The request, tagged as a drill.
    let s = list.start("request");
    let cmd = format!(
        "request {} --reason break-glass drill: harmless scripted command --incident {incident} --scenario drill --for {}",
        t.name,
        humantime::format_duration(duration)
    );
    let req = match client.control(&cmd, a.step_timeout).await {
        Ok((0, out, _)) => match request_id(&out) {
            Some(r) => r,
            None => return Ok(list.fail(s, &format!("no request id in the answer: {out}"))),
        },
        Ok((_, out, err)) => {
            return Ok(list.fail(s, &format!("refused: {}{}", out.trim(), err.trim())))
        }
        Err(e) => return Ok(list.fail(s, &format!("{e:#}"))),
    };
    let person = match store.find_request(&req).await {
        Ok(r) => r.person,
        Err(e) => return Ok(list.fail(s, &format!("{e}"))),
    };
    list.ok(
        s,
        &format!("{req} by {person} (scenario drill, incident {incident})"),
    );
    facts.request = Some(req.clone());
    facts.person = Some(person.clone());

    // 2. A real second person approves; the drill never approves itself.
    let s = list.start("approval");
    println!(
        "        waiting up to {} for a second person: ssh -p {} breakglass@GATEWAY approve {req}",
        humantime::format_duration(a.approval_timeout),
        client.port
    );
    let grant_id = loop {
        match store.find_request(&req).await {
            Ok(r) => match r.status {
                RequestStatus::Approved => {
                    let by: Vec<String> = r.approvals.iter().map(|(p, _)| p.clone()).collect();
                    match r.grant_id {
                        Some(g) => {
                            list.ok(s, &format!("approved by {}", by.join(", ")));
                            break g;
                        }
                        None => return Ok(list.fail(s, "approved, but no grant was made")),
                    }
                }
                RequestStatus::Denied => {
                    return Ok(list.fail(
                        s,
                        &format!(
                            "denied by {}: {}",
                            r.decided_by.unwrap_or_default(),
                            r.decision_reason.unwrap_or_default()
                        ),
                    ))
                }
                RequestStatus::Expired => {
                    return Ok(list.fail(s, "the request expired before anyone approved it"))
                }
                RequestStatus::Pending => {}
            },
            Err(e) => return Ok(list.fail(s, &format!("{e}"))),
        }
        if s.started.elapsed() > a.approval_timeout {
            return Ok(list.fail(s, "nobody approved in time"));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let grant = store.find_grant(&grant_id).await?;

    // 3. A session with a harmless scripted command; time to access ends at its first byte.
    let s = list.start("session");
    let marker = format!("breakglass-drill-{req}");
    let first_byte = match first_output(&client, &t, &req, &marker, a.step_timeout).await {
        Ok(at) => at,
        Err(e) => return Ok(list.fail(s, &format!("{e:#}"))),
    };
    let to_access = first_byte.duration_since(began);
    facts.time_to_access = Some(to_access);
    list.ok(
        s,
        &format!(
            "the scripted command answered on {}; time to access {:.1}s",
            t.name,
            to_access.as_secs_f64()
        ),
    );

    // 4. The gateway cuts a session at the grant's deadline.
    let s = list.start("deadline cut");
    let left = (grant.expires_at - breakglass::clock::now())
        .to_std()
        .unwrap_or_default();
    if let Err(e) = held_until_cut(&client, &t, &req, left + a.step_timeout).await {
        return Ok(list.fail(s, &format!("{e:#}")));
    }
    let sessions = match wait_sessions_ended(&*store, &incident, a.step_timeout).await {
        Ok(v) => v,
        Err(e) => return Ok(list.fail(s, &format!("{e:#}"))),
    };
    match sessions
        .iter()
        .find(|r| r.end_reason.as_deref() == Some("deadline"))
    {
        Some(r) => list.ok(
            s,
            &format!("session {} ended at the deadline", short(&r.id)),
        ),
        None => {
            let why: Vec<String> = sessions
                .iter()
                .map(|r| {
                    format!(
                        "{} {}",
                        short(&r.id),
                        r.end_reason.as_deref().unwrap_or("?")
                    )
                })
                .collect();
            return Ok(list.fail(
                s,
                &format!("no session ended with reason deadline: {}", why.join(", ")),
            ));
        }
    }

    // 5. Every recording of the drill verifies.
    let s = list.start("verify");
    for r in &sessions {
        match verify(&a.config, &r.id, a.step_timeout).await {
            Ok(()) => {}
            Err(e) => return Ok(list.fail(s, &format!("session {}: {e:#}", short(&r.id)))),
        }
    }
    list.ok(s, &format!("{} recording(s) OK", sessions.len()));

    // 6. Every sink acknowledged everything (the drill's events among them).
    let s = list.start("siem delivery");
    match siem_drained(&cfg, &*store, a.step_timeout).await {
        Ok(names) => list.ok(s, &format!("acknowledged by every sink ({names})")),
        Err(e) => return Ok(list.fail(s, &format!("{e:#}"))),
    }

    // 7. Custodians heard of it.
    match (&alerts_before, cfg.webhooks.is_empty()) {
        (_, true) => list.skip(
            "alert",
            "no alert webhook is configured ([alerts] webhooks)",
        ),
        (None, false) => list.skip(
            "alert",
            "the gateway's /metrics is not reachable (listeners.http), so delivery cannot be read",
        ),
        (Some(before), false) => {
            let s = list.start("alert");
            match alert_delivered(&cfg, *before, a.step_timeout).await {
                Ok(n) => list.ok(s, &format!("{n} alert(s) delivered")),
                Err(e) => return Ok(list.fail(s, &format!("{e:#}"))),
            }
        }
    }

    // 8. The credential rotated after the grant ended.
    let s = list.start("rotation");
    match rotated(&*store, &req, &t, a.step_timeout).await {
        Ok(what) => list.ok(s, &what),
        Err(e) => return Ok(list.fail(s, &format!("{e:#}"))),
    }

    // 9. The post-incident review is open.
    let s = list.start("review opened");
    match store.find_review(&req).await {
        Ok(r) => list.ok(
            s,
            &format!("{} due {}", r.id, breakglass::clock::rfc3339(r.due_at)),
        ),
        Err(e) => return Ok(list.fail(s, &format!("{e}"))),
    }

    println!(
        "time to access (request to first byte on the target): {:.1}s",
        to_access.as_secs_f64()
    );
    println!(
        "drill PASSED ({} steps ok, {} skipped) in {:.1}s",
        list.passed,
        list.skipped,
        began.elapsed().as_secs_f64()
    );
    anyhow::Ok(ExitCode::SUCCESS)
    }
    .await?;
    finished(&cfg, &*store, &t, &incident, &facts, &list, began.elapsed()).await;
    Ok(code)
}

/// Puts the drill's outcome on the record (`drill_finished`): reports count drills, their
/// pass rate and time to access from it.
async fn finished(
    cfg: &Config,
    store: &dyn Store,
    t: &TargetConfig,
    incident: &str,
    facts: &Facts,
    list: &Checklist,
    took: Duration,
) {
    use breakglass::siem::{AccessEvent, Action, Outcome};
    let actor = facts.person.clone().unwrap_or_else(|| "breakglass".into());
    let mut e = AccessEvent::new(Action::DrillFinished, &actor);
    e.person = facts.person.clone();
    e.target = Some(t.name.clone());
    e.protocol = t.protocol.as_str().into();
    e.correlation_id = facts.request.clone();
    e.request_id = facts.request.clone();
    e.incident_id = Some(incident.to_string());
    e.scenario = Some("drill".into());
    e.duration_ms = Some(took.as_millis() as u64);
    e.time_to_access_ms = facts.time_to_access.map(|d| d.as_millis() as u64);
    match &list.failed {
        None => {
            e.message = Some(format!(
                "passed: {} steps ok, {} skipped; time to access {:.1}s",
                list.passed,
                list.skipped,
                facts.time_to_access.unwrap_or_default().as_secs_f64()
            ));
        }
        Some((step, why)) => {
            e.outcome = Outcome::Failure;
            e.reason = Some(step.to_string());
            e.message = Some(format!("failed at step `{step}`: {why}"));
        }
    }
    let siem = match breakglass::siem::Siem::open_for(cfg, store).await {
        Ok(s) => std::sync::Arc::new(s),
        Err(err) => {
            eprintln!("breakglass: the drill's outcome is not on the record: {err}");
            return;
        }
    };
    if let Err(err) = breakglass::siem::audit(&siem, store, &e).await {
        eprintln!("breakglass: the drill's outcome is not on the record: {err}");
    }
}

/// A file removed when dropped.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn short(id: &str) -> &str {
    id.get(..8).unwrap_or(id)
}

/// (user, one-time password) of the grant of `req` (PostgreSQL targets); each fetch
/// replaces the last.
async fn credential(client: &Client, req: &str, timeout: Duration) -> Result<(String, String)> {
    let (code, out, err) = client
        .control(&format!("credential {req}"), timeout)
        .await?;
    if code != 0 {
        bail!("credential refused: {}{}", out.trim(), err.trim());
    }
    let field = |name: &str| {
        out.lines()
            .find_map(|l| l.trim().strip_prefix(name).map(|v| v.trim().to_string()))
    };
    match (field("user:"), field("password:")) {
        (Some(u), Some(p)) => Ok((u, p)),
        _ => bail!("no user and password in the gateway's answer"),
    }
}

/// A psql through the gateway's PostgreSQL listener under the grant of `req`.
async fn psql(
    client: &Client,
    t: &TargetConfig,
    req: &str,
    sql: &str,
    timeout: Duration,
) -> Result<tokio::process::Command> {
    let listen = client
        .pg_listen
        .ok_or_else(|| anyhow!("the config has no PostgreSQL listener (listeners.postgres)"))?;
    let (user, pw) = credential(client, req, timeout).await?;
    let mut c = tokio::process::Command::new("psql");
    c.arg(format!(
        "host={} port={} user={user} dbname={} sslmode={}",
        client.host,
        listen.port(),
        t.name,
        client.pg_sslmode
    ))
    .args(["-XAtc", sql])
    .env("PGPASSWORD", pw)
    .env("PGCONNECT_TIMEOUT", "10")
    .stdin(std::process::Stdio::null())
    .kill_on_drop(true);
    Ok(c)
}

/// Runs the harmless command on the target through the gateway and returns when its output
/// (the marker) arrived.
async fn first_output(
    client: &Client,
    t: &TargetConfig,
    req: &str,
    marker: &str,
    timeout: Duration,
) -> Result<Instant> {
    let mut cmd = match t.protocol {
        Protocol::Ssh => client.ssh(&t.name, &format!("echo {marker}")),
        Protocol::Postgres => psql(client, t, req, &format!("SELECT '{marker}'"), timeout).await?,
    };
    cmd.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().context("cannot start the client")?;
    let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let seen = tokio::time::timeout(timeout, async {
        while let Ok(Some(l)) = lines.next_line().await {
            if l.contains(marker) {
                return Some(Instant::now());
            }
        }
        None
    })
    .await
    .ok()
    .flatten();
    let out = tokio::time::timeout(timeout, child.wait_with_output()).await;
    match (seen, out) {
        (Some(at), _) => Ok(at),
        (None, Ok(Ok(o))) => bail!(
            "the scripted command did not answer (exit {}): {}",
            o.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        (None, _) => bail!("the scripted command did not answer within {timeout:?}"),
    }
}

/// Holds a session open until the gateway ends it; Err if it ends before `within` for any
/// other reason than the gateway's cut, or outlives it.
async fn held_until_cut(
    client: &Client,
    t: &TargetConfig,
    req: &str,
    within: Duration,
) -> Result<()> {
    let started = Instant::now();
    let mut cmd = match t.protocol {
        // Never longer than the step allows, so nothing is left running on the target.
        Protocol::Ssh => client.ssh(&t.name, &format!("sleep {}", within.as_secs() + 1)),
        Protocol::Postgres => {
            psql(
                client,
                t,
                req,
                &format!("SELECT pg_sleep({})", within.as_secs() + 1),
                within,
            )
            .await?
        }
    };
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let out = tokio::time::timeout(within, cmd.output())
        .await
        .map_err(|_| anyhow!("the session outlived its deadline by more than the step timeout"))?
        .context("cannot start the client")?;
    if out.status.success() {
        bail!(
            "the session ended by itself after {:.1}s instead of being cut",
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// The drill's sessions once every one has ended (they are indexed by the incident id).
async fn wait_sessions_ended(
    store: &dyn Store,
    incident: &str,
    timeout: Duration,
) -> Result<Vec<breakglass::state::SessionRow>> {
    let started = Instant::now();
    loop {
        let rows = store
            .list_sessions(&SessionFilter {
                incident: Some(incident.to_string()),
                ..Default::default()
            })
            .await?;
        if !rows.is_empty() && rows.iter().all(|r| r.ended_at.is_some()) {
            return Ok(rows);
        }
        if started.elapsed() > timeout {
            bail!(
                "the drill's sessions are not all ended in the index ({} found)",
                rows.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// `breakglass verify ID` of this binary; Err with its words unless it says OK.
async fn verify(config: &Path, id: &str, timeout: Duration) -> Result<()> {
    let exe = std::env::current_exe()?;
    let started = Instant::now();
    loop {
        let out = tokio::time::timeout(
            timeout,
            tokio::process::Command::new(&exe)
                .args(["verify", id, "--config"])
                .arg(config)
                .kill_on_drop(true)
                .output(),
        )
        .await
        .map_err(|_| anyhow!("verify gave no answer within {timeout:?}"))??;
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if out.status.success() {
            return Ok(());
        }
        // A recording is sealed a moment after its session ends.
        if started.elapsed() > timeout {
            bail!("{}", said.trim());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// `breakglass vault verify TARGET` of this binary: what it said, or Err with its words.
async fn vault_verify(config: &Path, target: &str, timeout: Duration) -> Result<String> {
    let exe = std::env::current_exe()?;
    let out = tokio::time::timeout(
        timeout,
        tokio::process::Command::new(&exe)
            .args(["vault", "verify", target, "--config"])
            .arg(config)
            .output(),
    )
    .await
    .map_err(|_| anyhow!("vault verify gave no answer within {timeout:?}"))??;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(said)
    } else {
        bail!("{}", said.trim())
    }
}

/// Waits until no sink has anything undelivered; the sink names.
async fn siem_drained(cfg: &Config, store: &dyn Store, timeout: Duration) -> Result<String> {
    let siem = breakglass::siem::Siem::open_for(cfg, store).await?;
    let started = Instant::now();
    loop {
        let stats = siem.stats().await;
        let lagging: Vec<String> = stats
            .iter()
            .filter(|s| s.queued > 0)
            .map(|s| {
                format!(
                    "sink `{}` has {} undelivered event(s){}",
                    s.sink,
                    s.queued,
                    s.last_error
                        .as_deref()
                        .map(|e| format!(" (last error: {e})"))
                        .unwrap_or_default()
                )
            })
            .collect();
        if lagging.is_empty() {
            return Ok(stats
                .iter()
                .map(|s| s.sink.as_str())
                .collect::<Vec<_>>()
                .join(", "));
        }
        if started.elapsed() > timeout {
            bail!("{}", lagging.join("; "));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// (sent, failed) alert counters from the gateway's /metrics; None when unreachable.
async fn alert_counts(cfg: &Config) -> Option<(u64, u64)> {
    let addr = cfg.http_listen?;
    let host = if addr.ip().is_unspecified() {
        "127.0.0.1".to_string()
    } else {
        addr.ip().to_string()
    };
    let mut s = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::TcpStream::connect((host.as_str(), addr.port())),
    )
    .await
    .ok()?
    .ok()?;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(
        format!("GET /metrics HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .ok()?;
    let mut body = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut body))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&body);
    let read = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name).map(|v| v.trim().parse::<u64>().ok()))
            .flatten()
    };
    Some((
        read("breakglass_alerts_sent_total ")?,
        read("breakglass_alerts_failed_total ").unwrap_or(0),
    ))
}

/// Waits until more alerts were delivered than `before`; how many more.
async fn alert_delivered(cfg: &Config, before: (u64, u64), timeout: Duration) -> Result<u64> {
    let started = Instant::now();
    loop {
        if let Some((sent, failed)) = alert_counts(cfg).await {
            if sent > before.0 {
                return Ok(sent - before.0);
            }
            if failed > before.1 && started.elapsed() > timeout {
                bail!(
                    "{} alert(s) failed to reach the webhook(s)",
                    failed - before.1
                );
            }
        }
        if started.elapsed() > timeout {
            bail!("no alert was delivered within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Waits for the successful rotation after the drill's grant.
async fn rotated(
    store: &dyn Store,
    req: &str,
    t: &TargetConfig,
    timeout: Duration,
) -> Result<String> {
    let started = Instant::now();
    loop {
        let events = store.events(req).await?;
        if let Some(e) = events.iter().find(|e| e.event_type == "credential_rotated") {
            let outcome = e.event_data["outcome"].as_str().unwrap_or("?");
            let msg = e.event_data["message"].as_str().unwrap_or("").to_string();
            if outcome == "success" {
                return Ok(msg);
            }
            if started.elapsed() > timeout {
                bail!("rotation of {} failed: {msg}", t.name);
            }
        }
        if started.elapsed() > timeout {
            bail!("no rotation of {} was recorded within {timeout:?}", t.name);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
