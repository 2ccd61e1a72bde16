//! Test helpers: a real OpenSSH sshd target, the gateway (in-process or as a process), real
//! `ssh`/`scp`/`sftp` clients, and waits with deadlines. Everything listens on 127.0.0.1 with a
//! free port and lives in a temp dir; servers are killed on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use breakglass::config::Config;
use breakglass::keys::GatewayKeys;
use serde_json::Value;

/// Fails loudly (never skips) when a program the tests need is missing.
pub fn require(program: &str, package: &str) -> PathBuf {
    for dir in ["/usr/sbin", "/usr/bin", "/usr/local/bin", "/sbin", "/bin"] {
        let p = Path::new(dir).join(program);
        if p.exists() {
            return p;
        }
    }
    panic!(
        "`{program}` is missing: install the Debian package `{package}` (tests/run.sh installs it)"
    );
}

/// A free TCP port on 127.0.0.1 for a server a test starts.
///
/// Asking the kernel for port 0 and handing the number on races: between closing the probe and
/// the server binding, any outgoing connection may be given that same ephemeral port (CI saw
/// `AddrInUse` this way). So ports come from below the kernel's ephemeral range (which starts
/// at 32768 by default), each handed out once per process, starting at an offset from the pid
/// so two test processes rarely probe the same ports. Each one is still checked by binding.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        (std::process::id() * 613) % SPAN,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..SPAN {
        let port = (LOW + NEXT.fetch_add(1, Ordering::SeqCst) % SPAN) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!(
        "no free TCP port on 127.0.0.1 between {LOW} and {}",
        LOW + SPAN
    )
}

/// Polls `f` until it returns Some or the deadline passes.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < end,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn wait_port(port: u16) {
    wait_for(
        &format!("port {port} to accept"),
        Duration::from_secs(10),
        || std::net::TcpStream::connect(("127.0.0.1", port)).ok(),
    );
}

fn keygen(path: &Path) {
    let st = Command::new(require("ssh-keygen", "openssh-client"))
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "test", "-f"])
        .arg(path)
        .status()
        .expect("run ssh-keygen");
    assert!(st.success(), "ssh-keygen failed");
}

/// The user name the tests run as; sshd (possibly unprivileged) logs in as this account.
pub fn current_user() -> String {
    let out = Command::new("id").arg("-un").output().expect("run id -un");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A local account for tests that need a second login on the target (this machine's own
/// sshd): created once (no home, `/bin/sh`) and kept. The tests run as root to do so.
pub fn throwaway_user(name: &str) -> String {
    let uid =
        String::from_utf8_lossy(&Command::new("id").arg("-u").output().expect("id -u").stdout)
            .trim()
            .to_string();
    assert_eq!(
        uid, "0",
        "this test creates the throwaway account {name} and must run as root"
    );
    if !Command::new("id")
        .arg(name)
        .output()
        .expect("id")
        .status
        .success()
    {
        let st = Command::new(require("useradd", "passwd"))
            .args(["-M", "-s", "/bin/sh", name])
            .status()
            .expect("useradd");
        assert!(st.success(), "useradd {name}");
    }
    // `*`, not useradd's `!`: no password, but not locked (sshd refuses a locked account's
    // key logins when PAM is off).
    let st = Command::new(require("usermod", "passwd"))
        .args(["-p", "*", name])
        .status()
        .expect("usermod");
    assert!(st.success(), "usermod -p '*' {name}");
    name.to_string()
}

/// A world: temp dir, people's keys, the gateway's data dir and an sshd target.
pub struct World {
    pub dir: tempfile::TempDir,
    pub sshd: Sshd,
    pub gw_port: u16,
    pub http_port: u16,
    pub pg_port: u16,
    pub config_path: PathBuf,
}

/// A real OpenSSH sshd that trusts the gateway's user CA.
pub struct Sshd {
    pub port: u16,
    child: Child,
    pub host_pub: PathBuf,
    #[allow(dead_code)] // Kept so a failing test can be debugged from the temp dir.
    pub log: PathBuf,
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Sshd {
    /// Stops the target (a broken target for drills and failure tests).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn start(dir: &Path, ca_pub: &Path, extra: &str) -> Sshd {
        let sshd = require("sshd", "openssh-server");
        std::fs::create_dir_all("/run/sshd").ok();
        let host = dir.join("target_host_key");
        keygen(&host);
        let port = free_port();
        let conf = dir.join("sshd_config");
        std::fs::write(
            &conf,
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {host}\nTrustedUserCAKeys {ca}\n\
                 AuthorizedKeysFile {ak}\nPidFile {pid}\nStrictModes no\nUsePAM no\n\
                 PermitRootLogin prohibit-password\nSubsystem sftp internal-sftp\nLogLevel VERBOSE\n\
                 PrintMotd no\nPrintLastLog no\nAcceptEnv LANG LC_*\n{extra}",
                host = host.display(),
                ca = ca_pub.display(),
                ak = dir.join("authorized_keys").display(),
                pid = dir.join("sshd.pid").display(),
            ),
        )
        .expect("write sshd_config");
        let log = dir.join("sshd.log");
        let child = Command::new(sshd)
            .args(["-D", "-e", "-f"])
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("sshd log"))
            .spawn()
            .expect("start sshd");
        wait_port(port);
        Sshd {
            port,
            child,
            host_pub: host.with_extension("pub"),
            log,
        }
    }
}

/// Options for a world's config.
#[derive(Default)]
pub struct Opts {
    pub extra_limits: String,
    /// Pin this host key file instead of the target's real one.
    pub wrong_host_key: bool,
    /// Log in upstream with a gateway-held key (in the target's authorized_keys) instead of a
    /// per-session certificate.
    pub held_key: bool,
    /// With `held_key`: keep the held key out of authorized_keys between grants, switched by
    /// the test's own user with the key `gateway_admin_key` (`disable_between_grants`).
    pub key_admin: bool,
    /// web-01's login instead of the test's own user.
    pub login: Option<String>,
    /// Appended to the config (extra top-level tables such as [alerts]).
    pub extra_config: String,
    /// Appended to the target's sshd_config (MaxStartups, MaxSessions for the benches).
    pub sshd_extra: String,
    /// Appended to the `[listeners]` table (`proxy_protocol_from`).
    pub listeners_extra: String,
}

impl World {
    pub fn new() -> World {
        World::with(Opts::default())
    }

    pub fn with(opts: Opts) -> World {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        // Generate the gateway's keys first so sshd can trust the CA from its first start.
        let keys = GatewayKeys::load_or_create(&data.join("keys")).expect("gateway keys");
        let ca_pub = dir.path().join("gateway_ca.pub");
        std::fs::write(
            &ca_pub,
            breakglass::keys::openssh_line(keys.user_ca.public_key()),
        )
        .expect("write ca");
        for who in ["alice", "bob", "carol", "dave", "mallory"] {
            keygen(&dir.path().join(who));
        }
        let sshd = Sshd::start(dir.path(), &ca_pub, &opts.sshd_extra);
        let pinned = if opts.wrong_host_key {
            let other = dir.path().join("other_host_key");
            keygen(&other);
            other.with_extension("pub")
        } else {
            sshd.host_pub.clone()
        };
        let auth = if opts.held_key {
            let key = dir.path().join("gateway_held_key");
            keygen(&key);
            std::fs::copy(
                key.with_extension("pub"),
                dir.path().join("authorized_keys"),
            )
            .expect("authorized_keys");
            let mut auth = format!(
                "auth = \"key\"\nkey_file = \"{}\"\nauthorized_keys = \"{}\"",
                key.display(),
                dir.path().join("authorized_keys").display()
            );
            if opts.key_admin {
                let admin = dir.path().join("gateway_admin_key");
                keygen(&admin);
                let mut ak = std::fs::read_to_string(dir.path().join("authorized_keys"))
                    .expect("authorized_keys");
                ak.push_str(
                    &std::fs::read_to_string(admin.with_extension("pub")).expect("admin pub"),
                );
                std::fs::write(dir.path().join("authorized_keys"), ak).expect("authorized_keys");
                auth.push_str(&format!(
                    "\ndisable_between_grants = true\nadmin_login = \"{}\"\nadmin_key_file = \"{}\"",
                    current_user(),
                    admin.display()
                ));
            }
            auth
        } else {
            "auth = \"certificate\"".to_string()
        };
        let gw_port = free_port();
        let http_port = free_port();
        let pg_port = free_port();
        let config_path = dir.path().join("breakglass.toml");
        let d = dir.path().display();
        std::fs::write(
            &config_path,
            format!(
                r#"data_dir = "{d}/data"
[listeners]
ssh = "127.0.0.1:{gw_port}"
http = "127.0.0.1:{http_port}"
postgres = "127.0.0.1:{pg_port}"
{listeners_extra}

[[people]]
name = "alice"
ssh_key_files = ["{d}/alice.pub"]
roles = ["engineer"]

[[people]]
name = "bob"
ssh_key_files = ["{d}/bob.pub"]
roles = ["engineer", "reviewer"]

[[people]]
name = "dave"
ssh_key_files = ["{d}/dave.pub"]
roles = ["reviewer"]

[[people]]
name = "carol"
ssh_key_files = ["{d}/carol.pub"]
roles = ["sre-lead"]

[[targets]]
name = "web-01"
address = "127.0.0.1:{port}"
host_key_file = "{pinned}"
login = "{login}"
{auth}
approvers = ["bob", "role:sre-lead"]
custodians = ["carol"]

[[targets]]
name = "web-02"
address = "127.0.0.1:{port}"
host_key_file = "{pinned}"
login = "{user}"
approvers = ["bob", "carol"]
required_approvals = 2
emergency_self_service = true

[limits]
max_session_ttl = "1h"
# The tests cut sessions at deadlines seconds away.
min_grant_ttl = "1s"
{extra}

{extra_config}
"#,
                port = sshd.port,
                pinned = pinned.display(),
                user = current_user(),
                login = opts.login.clone().unwrap_or_else(current_user),
                extra = opts.extra_limits,
                extra_config = opts.extra_config,
                listeners_extra = opts.listeners_extra,
            ),
        )
        .expect("write config");
        World {
            dir,
            sshd,
            gw_port,
            http_port,
            pg_port,
            config_path,
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn config(&self) -> Config {
        Config::load(&self.config_path).expect("test config is valid")
    }

    /// Runs the `breakglass` binary with this world's config.
    pub fn cli(&self, args: &[&str]) -> Output {
        let out = Command::new(env!("CARGO_BIN_EXE_breakglass"))
            .args(args)
            .envs(S3_ENV)
            .env("BREAKGLASS_CONFIG", &self.config_path)
            .env("RUST_LOG", "warn")
            .output()
            .expect("run breakglass");
        out
    }

    /// Runs a CLI command that must succeed; returns stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "breakglass {args:?} failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Drives `ssh -tt LOGIN@gateway` as `person` in a real pty through `pty_drive.py`'s
    /// steps (send / expect / resize / wait_exit); returns the driver's output.
    pub async fn pty_ssh(&self, person: &str, login: &str, steps: serde_json::Value) -> Output {
        let mut c = Command::new("python3");
        c.arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/e2e/pty_drive.py"
        ))
        .arg(steps.to_string())
        .arg("--")
        .arg("ssh")
        .args(self.ssh_args(person))
        .args(["-tt", "-p", &self.gw_port.to_string()])
        .arg(format!("{login}@127.0.0.1"));
        output(c).await
    }

    /// Adds a grant through the operator CLI; returns its id.
    pub fn grant(&self, person: &str, duration: &str) -> String {
        self.cli_ok(&[
            "grant",
            "add",
            "--person",
            person,
            "--target",
            "web-01",
            "--for",
            duration,
            "--reason",
            "disk full on /var",
            "--incident",
            "INC-7",
        ])
        .trim()
        .to_string()
    }

    /// Base `ssh` arguments as `person` against the gateway.
    pub fn ssh_args(&self, person: &str) -> Vec<String> {
        vec![
            "-F".into(),
            "/dev/null".into(),
            "-i".into(),
            self.path(person).display().to_string(),
            "-o".into(),
            "IdentitiesOnly=yes".into(),
            "-o".into(),
            "StrictHostKeyChecking=no".into(),
            "-o".into(),
            format!("UserKnownHostsFile={}", self.path("known_hosts").display()),
            "-o".into(),
            "ConnectTimeout=10".into(),
        ]
    }

    /// `ssh -p PORT [extra] LOGIN@127.0.0.1 [command...]`.
    pub fn ssh(&self, person: &str, login: &str, extra: &[&str], command: &[&str]) -> Command {
        let mut c = Command::new(require("ssh", "openssh-client"));
        c.args(self.ssh_args(person))
            .arg("-p")
            .arg(self.gw_port.to_string())
            .args(extra)
            .arg(format!("{login}@127.0.0.1"))
            .args(command)
            .stdin(Stdio::null());
        c
    }

    /// Lines of the SIEM file parsed as JSON.
    pub fn siem_events(&self) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(self.path("data/siem.jsonl")).unwrap_or_default();
        text.lines()
            .map(|l| serde_json::from_str(l).expect("every SIEM line is JSON"))
            .collect()
    }

    /// Waits for a SIEM event matching `pred`.
    pub fn wait_event(
        &self,
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        wait_for(what, Duration::from_secs(15), || {
            self.siem_events().into_iter().find(|e| pred(e))
        })
    }

    /// Waits until `n` sessions have written their end event (the client's exit comes first).
    pub fn wait_ended(&self, n: usize) {
        wait_for(
            &format!("{n} session end events"),
            Duration::from_secs(15),
            || {
                (self
                    .siem_events()
                    .iter()
                    .filter(|e| e["action"] == "session_end")
                    .count()
                    >= n)
                    .then_some(())
            },
        );
    }

    /// The session list as JSON.
    pub fn sessions(&self) -> Vec<serde_json::Value> {
        let out = self.cli_ok(&["sessions", "list", "--format", "json"]);
        serde_json::from_str(&out).expect("sessions list --format json is JSON")
    }
}

/// The gateway running in this process through the library's `start`.
pub struct InProcess {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl InProcess {
    pub async fn start(world: &World) -> InProcess {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let (_bound, serve) = breakglass::server::start(world.config(), async move {
            let _ = rx.await;
        })
        .await
        .expect("gateway starts");
        let task = tokio::spawn(serve);
        InProcess {
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// Graceful shutdown: waits until every session is sealed.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

/// The gateway as a separate process (for kill -9).
pub struct Process {
    pub child: Child,
}

impl Process {
    pub fn start(world: &World) -> Process {
        let child = Command::new(env!("CARGO_BIN_EXE_breakglass"))
            .args(["serve", "--config"])
            .arg(&world.config_path)
            .envs(S3_ENV)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(world.path("gateway.log")).expect("log"))
            .spawn()
            .expect("start gateway");
        wait_port(world.gw_port);
        Process { child }
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Runs a blocking command off the async runtime.
pub async fn output(mut c: Command) -> Output {
    tokio::task::spawn_blocking(move || c.output().expect("run command"))
        .await
        .expect("join")
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Validates `instance` against a schema in recordings-schema/.
pub fn validate(schema_file: &str, instance: &serde_json::Value) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("recordings-schema")
        .join(schema_file);
    let schema: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("read schema"))
            .expect("schema is JSON");
    let v = jsonschema::validator_for(&schema).expect("schema compiles");
    let errors: Vec<String> = v
        .iter_errors(instance)
        .map(|e| format!("{e} at {}", e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "{schema_file} rejects {instance}: {errors:?}"
    );
}

/// Checks one API response against the OpenAPI document the server serves
/// (src/web/openapi.json): the path and method are documented, so is the status (a success
/// status explicitly, an error at least by `default`), and a JSON body matches the declared
/// schema, formats included. Schemas from recordings-schema/ are resolved by their `$id`.
pub fn check_openapi(method: &str, path: &str, status: u16, body: &serde_json::Value) {
    use serde_json::{json, Value};
    static DOC: std::sync::OnceLock<Value> = std::sync::OnceLock::new();
    let doc = DOC.get_or_init(|| {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/web/openapi.json");
        serde_json::from_str(&std::fs::read_to_string(p).expect("read openapi.json"))
            .expect("openapi.json is JSON")
    });
    let path = path.split('?').next().unwrap_or(path);
    let segs: Vec<&str> = path.split('/').collect();
    let found = doc["paths"]
        .as_object()
        .expect("paths")
        .iter()
        .find(|(tpl, _)| {
            let t: Vec<&str> = tpl.split('/').collect();
            t.len() == segs.len()
                && t.iter()
                    .zip(&segs)
                    .all(|(t, s)| t == s || (t.starts_with('{') && !s.is_empty()))
        });
    let Some((tpl, ops)) = found else {
        // The one answer for a path the document does not have.
        let unrouted = status == 404
            && body["ok"] == false
            && body["error"]
                .as_str()
                .is_some_and(|e| e.starts_with("no such path"));
        assert!(unrouted, "{method} {path} is not in the OpenAPI document");
        return;
    };
    let op = &ops[method.to_lowercase()];
    assert!(
        op.is_object(),
        "{method} {tpl} is not in the OpenAPI document"
    );
    let mut resp = &op["responses"][status.to_string()];
    if resp.is_null() {
        assert!(
            status >= 400,
            "{method} {tpl} answered {status}, which the OpenAPI document does not list: {body}"
        );
        resp = &op["responses"]["default"];
    }
    assert!(
        !resp.is_null(),
        "{method} {tpl}: no response for {status} or default in the OpenAPI document"
    );
    if let Some(r) = resp["$ref"].as_str() {
        resp = doc
            .pointer(r.trim_start_matches('#'))
            .unwrap_or_else(|| panic!("{r} resolves"));
    }
    let Some(schema) = resp.pointer("/content/application~1json/schema") else {
        return;
    };
    let mut root = doc.clone();
    root["$defs"] = json!({ "response": schema });
    root["$ref"] = json!("#/$defs/response");
    static SCHEMAS: std::sync::OnceLock<Vec<(String, Value)>> = std::sync::OnceLock::new();
    let schemas = SCHEMAS.get_or_init(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("recordings-schema");
        std::fs::read_dir(&dir)
            .expect("recordings-schema")
            .map(|e| {
                let text = std::fs::read_to_string(e.expect("entry").path()).expect("read schema");
                let s: Value = serde_json::from_str(&text).expect("schema is JSON");
                let id = s["$id"]
                    .as_str()
                    .expect("every schema has an $id")
                    .to_string();
                (id, s)
            })
            .collect()
    });
    let mut opts = jsonschema::options()
        .with_draft(jsonschema::Draft::Draft202012)
        .should_validate_formats(true);
    for (id, s) in schemas {
        opts = opts.with_resource(id.clone(), jsonschema::Resource::from_contents(s.clone()));
    }
    let v = opts.build(&root).expect("the OpenAPI schemas compile");
    let errors: Vec<String> = v
        .iter_errors(body)
        .take(5)
        .map(|e| format!("{e} at {}", e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "{method} {path} answered {status} with a body the OpenAPI document rejects: {errors:?}\n{body}"
    );
}

/// A local HTTP server that records every request body and answers with a scripted status
/// sequence (the last status repeats).
pub struct HttpReceiver {
    pub port: u16,
    pub hits: std::sync::Arc<std::sync::Mutex<Vec<(Instant, String, String)>>>,
    /// While set, every request gets a 503 and is not kept (a collector that is down).
    pub refusing: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for HttpReceiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads one HTTP/1.1 request: the head, then Content-Length bytes of body.
pub async fn read_request(sock: &mut tokio::net::TcpStream) -> Option<(String, String)> {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let (head_end, len) = loop {
        let m = sock.read(&mut chunk).await.ok().filter(|m| *m > 0)?;
        buf.extend_from_slice(&chunk[..m]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..i]).to_lowercase();
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            break (i + 4, len);
        }
    };
    while buf.len() < head_end + len {
        match sock.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(m) => buf.extend_from_slice(&chunk[..m]),
        }
    }
    Some((
        String::from_utf8_lossy(&buf[..head_end]).into_owned(),
        String::from_utf8_lossy(&buf[head_end..]).into_owned(),
    ))
}

impl HttpReceiver {
    pub async fn start(statuses: Vec<u16>) -> HttpReceiver {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind receiver");
        let port = listener.local_addr().expect("addr").port();
        let hits = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let h = hits.clone();
        let refusing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let refuse = refusing.clone();
        let task = tokio::spawn(async move {
            let mut n = 0usize;
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    return;
                };
                let status = statuses.get(n).or(statuses.last()).copied().unwrap_or(200);
                n += 1;
                let (h, refuse) = (h.clone(), refuse.clone());
                tokio::spawn(async move {
                    let Some((head, body)) = read_request(&mut sock).await else {
                        return;
                    };
                    let status = if refuse.load(std::sync::atomic::Ordering::SeqCst) {
                        503
                    } else {
                        h.lock().expect("lock").push((Instant::now(), head, body));
                        status
                    };
                    let resp = format!(
                        "HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    );
                    let _ = sock.write_all(resp.as_bytes()).await;
                });
            }
        });
        HttpReceiver {
            port,
            hits,
            refusing,
            task,
        }
    }

    /// Bodies received so far.
    pub fn bodies(&self) -> Vec<(Instant, String)> {
        self.hits
            .lock()
            .expect("lock")
            .iter()
            .map(|(t, _, b)| (*t, b.clone()))
            .collect()
    }
}

/// A real PostgreSQL cluster made with `initdb` in a temp dir (SCRAM auth), listening on
/// 127.0.0.1 with a free port; stopped on drop. As root it runs as the `postgres` user.
pub struct Postgres {
    pub port: u16,
    pub superuser_password: String,
    child: Child,
    /// The `postgres` arguments and log file, to start it again after [`Postgres::stop`].
    args: Vec<std::ffi::OsString>,
    log: PathBuf,
    /// Where the cluster and its socket live (kept for debugging a failed test).
    #[allow(dead_code)]
    pub dir: PathBuf,
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A PostgreSQL program (initdb, postgres, pgbench) from the newest installed version.
pub fn pg_bin(name: &str) -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path().join("bin").join(name))
                .collect()
        })
        .unwrap_or_default();
    versions.retain(|p| p.exists());
    versions.sort();
    versions
        .pop()
        .unwrap_or_else(|| panic!("`{name}` is missing: install the Debian package `postgresql` (scripts/test.sh installs it)"))
}

fn as_postgres(program: PathBuf) -> Command {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| text(&o.stdout).trim() == "0")
        .unwrap_or(false);
    if root {
        let mut c = Command::new(require("runuser", "util-linux"));
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

/// Server-side options for [`Postgres::start_with`].
#[derive(Default)]
pub struct PgServerOpts<'a> {
    /// `ssl = on` with this certificate and key (PEM); copied into the cluster directory.
    pub tls: Option<(&'a Path, &'a Path)>,
    /// Lines put before initdb's own in `pg_hba.conf` (the first matching line wins).
    pub hba_first: &'a str,
    /// More `-c name=value` settings (max_connections for the benches).
    pub settings: &'a [&'a str],
}

impl Postgres {
    pub fn start(parent: &Path) -> Postgres {
        Postgres::start_with(parent, PgServerOpts::default())
    }

    pub fn start_with(parent: &Path, opts: PgServerOpts) -> Postgres {
        use std::os::unix::fs::PermissionsExt;
        let dir = parent.join("pg");
        std::fs::create_dir_all(&dir).expect("pg dir");
        // The cluster runs as `postgres`: it must reach and own its directory.
        std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let _ = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(&dir)
            .status();
        let password = "super-secret-for-tests".to_string();
        let pwfile = dir.join("pwfile");
        std::fs::write(&pwfile, &password).expect("pwfile");
        let _ = Command::new("chown")
            .args(["postgres:postgres"])
            .arg(&pwfile)
            .status();
        let data = dir.join("data");
        let out = as_postgres(pg_bin("initdb"))
            .args([
                "-A",
                "scram-sha-256",
                "-U",
                "postgres",
                "--no-sync",
                "-E",
                "UTF8",
                "--pwfile",
            ])
            .arg(&pwfile)
            .arg("-D")
            .arg(&data)
            .output()
            .expect("run initdb");
        assert!(out.status.success(), "initdb failed: {}", text(&out.stderr));
        if !opts.hba_first.is_empty() {
            let hba = data.join("pg_hba.conf");
            let old = std::fs::read_to_string(&hba).expect("read pg_hba.conf");
            std::fs::write(&hba, format!("{}\n{old}", opts.hba_first)).expect("pg_hba.conf");
        }
        let mut tls_args = Vec::new();
        if let Some((cert, key)) = opts.tls {
            // The server reads them as `postgres`; the key must be 0600 and its own.
            let (c, k) = (dir.join("server.crt"), dir.join("server.key"));
            std::fs::copy(cert, &c).expect("copy cert");
            std::fs::copy(key, &k).expect("copy key");
            std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o600)).expect("chmod");
            let _ = Command::new("chown")
                .args(["postgres:postgres"])
                .arg(&c)
                .arg(&k)
                .status();
            tls_args = vec![
                "-c".to_string(),
                "ssl=on".to_string(),
                "-c".to_string(),
                format!("ssl_cert_file={}", c.display()),
                "-c".to_string(),
                format!("ssl_key_file={}", k.display()),
            ];
        }
        let port = free_port();
        let mut args: Vec<std::ffi::OsString> = vec!["-D".into(), data.clone().into()];
        for a in [
            "-p",
            &port.to_string(),
            "-c",
            "listen_addresses=127.0.0.1",
            "-k",
        ] {
            args.push(a.into());
        }
        args.push(dir.clone().into());
        args.extend(["-c".into(), "fsync=off".into()]);
        for setting in opts.settings {
            args.extend(["-c".into(), (*setting).into()]);
        }
        args.extend(tls_args.iter().map(Into::into));
        let log = parent.join("postgres.log");
        let child = spawn_postgres(&args, &log);
        wait_port(port);
        let pg = Postgres {
            port,
            superuser_password: password,
            child,
            args,
            log,
            dir,
        };
        // The port opens slightly before the server accepts logins.
        wait_for("postgres to accept logins", Duration::from_secs(20), || {
            pg.psql("postgres", &pg.superuser_password.clone(), "SELECT 1")
                .status
                .success()
                .then_some(())
        });
        pg
    }

    /// Stops the server (fast shutdown) and waits until it is gone.
    pub fn stop(&mut self) {
        // The child may be `runuser`, which does not pass signals on: signal the postmaster.
        let pid = std::fs::read_to_string(self.dir.join("data/postmaster.pid"))
            .ok()
            .and_then(|t| t.lines().next().map(str::to_string))
            .unwrap_or_else(|| self.child.id().to_string());
        let _ = Command::new("kill").args(["-INT", &pid]).status();
        let _ = self.child.wait();
    }

    /// Starts the stopped server again on the same port and data.
    pub fn start_again(&mut self) {
        self.child = spawn_postgres(&self.args, &self.log);
        wait_port(self.port);
        wait_for("postgres to accept logins", Duration::from_secs(20), || {
            self.psql("postgres", &self.superuser_password.clone(), "SELECT 1")
                .status
                .success()
                .then_some(())
        });
    }

    /// Runs `psql -c SQL` as `user` with `password` against this cluster.
    pub fn psql(&self, user: &str, password: &str, sql: &str) -> Output {
        Command::new(require("psql", "postgresql-client"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                user,
                "-d",
                "postgres",
                "-XAtc",
                sql,
            ])
            .env("PGPASSWORD", password)
            .env("PGCONNECT_TIMEOUT", "5")
            .stdin(Stdio::null())
            .output()
            .expect("run psql")
    }
}

fn spawn_postgres(args: &[std::ffi::OsString], log: &Path) -> Child {
    as_postgres(pg_bin("postgres"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .expect("pg log"),
        )
        .spawn()
        .expect("start postgres")
}

/// A real S3-compatible server (moto, from PyPI) on 127.0.0.1 with a free port; killed on
/// drop. Buckets are made with boto3 (moto's dependency).
pub struct S3Server {
    pub port: u16,
    child: Child,
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Credentials moto accepts; the gateway reads them from the environment like on AWS.
pub const S3_ENV: [(&str, &str); 3] = [
    ("AWS_ACCESS_KEY_ID", "testing"),
    ("AWS_SECRET_ACCESS_KEY", "testing"),
    ("AWS_DEFAULT_REGION", "us-east-1"),
];

impl S3Server {
    pub fn start(log: &Path) -> S3Server {
        let moto = ["/root/.pyenv/shims/moto_server", "/usr/local/bin/moto_server", "/usr/bin/moto_server"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .or_else(|| {
                Command::new("sh")
                    .args(["-c", "command -v moto_server"])
                    .output()
                    .ok()
                    .map(|o| PathBuf::from(text(&o.stdout).trim()))
                    .filter(|p| p.exists())
            })
            .unwrap_or_else(|| panic!("`moto_server` is missing: pip install 'moto[server]' (scripts/test.sh installs it)"));
        let port = free_port();
        let child = Command::new(moto)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).expect("moto log"))
            .spawn()
            .expect("start moto_server");
        wait_port(port);
        S3Server { port, child }
    }

    /// Stops the server (a storage outage).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Runs a boto3 snippet with `s3` bound to a client for this server; returns stdout.
    pub fn boto(&self, code: &str) -> Output {
        let script = format!(
            "import boto3, sys\ns3 = boto3.client('s3', endpoint_url='{}', region_name='us-east-1', aws_access_key_id='testing', aws_secret_access_key='testing')\n{code}\n",
            self.endpoint()
        );
        Command::new("python3")
            .arg("-c")
            .arg(script)
            .output()
            .expect("python3 boto3")
    }

    /// Creates a bucket, with Object Lock (COMPLIANCE default retention of `days`) or without.
    pub fn bucket(&self, name: &str, locked: Option<u32>) {
        let code = match locked {
            Some(days) => format!(
                "s3.create_bucket(Bucket='{name}', ObjectLockEnabledForBucket=True)\n\
                 s3.put_object_lock_configuration(Bucket='{name}', ObjectLockConfiguration={{'ObjectLockEnabled': 'Enabled', 'Rule': {{'DefaultRetention': {{'Mode': 'COMPLIANCE', 'Days': {days}}}}}}})"
            ),
            None => format!("s3.create_bucket(Bucket='{name}')"),
        };
        let out = self.boto(&code);
        assert!(
            out.status.success(),
            "create bucket {name}: {}",
            text(&out.stderr)
        );
    }
}

/// A self-signed certificate for 127.0.0.1 (openssl CLI): (cert.pem, key.pem) in `dir`.
pub fn self_signed_cert(dir: &Path) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let out = Command::new(require("openssl", "openssl"))
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            // An end-entity certificate (rustls refuses a CA certificate as a server's).
            "-addext",
            "basicConstraints=critical,CA:FALSE",
            "-keyout",
        ])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("run openssl");
    assert!(out.status.success(), "openssl: {}", text(&out.stderr));
    (cert, key)
}

impl World {
    /// `breakglass vault set TARGET` with the password on stdin, as an operator would.
    pub fn vault_set(&self, target: &str, password: &str) {
        self.vault_set_with(&[target], password)
    }

    /// `breakglass vault set ARGS...` with `password` on standard input.
    pub fn vault_set_with(&self, args: &[&str], password: &str) {
        use std::io::Write;
        let mut child = Command::new(env!("CARGO_BIN_EXE_breakglass"))
            .args(["vault", "set"])
            .args(args)
            .env("BREAKGLASS_CONFIG", &self.config_path)
            .stdin(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("vault set");
        child
            .stdin
            .take()
            .expect("stdin is piped")
            .write_all(format!("{password}\n").as_bytes())
            .expect("write password");
        assert!(child.wait().expect("wait").success(), "vault set failed");
    }
}

/// The recording metadata (session.json) of a finished session.
pub fn session_meta(w: &World, session_id: &str) -> Value {
    let s = w
        .sessions()
        .into_iter()
        .find(|s| s["id"] == session_id)
        .unwrap_or_else(|| panic!("session {session_id} is in the index"));
    let path = w
        .path("data/recordings")
        .join(s["recording"].as_str().expect("recording prefix"))
        .join("session.json");
    let meta: Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("session.json exists"))
            .expect("session.json is JSON");
    validate("session.schema.json", &meta);
    meta
}

/// Every SIEM event written so far validates against the schema.
pub fn validate_all_events(w: &World) {
    let events = w.siem_events();
    assert!(!events.is_empty(), "some SIEM events were written");
    for e in &events {
        validate("siem-event.schema.json", e);
    }
}

pub fn last_session_id(w: &World) -> String {
    let s = w.sessions();
    s.first().expect("a session in the index")["id"]
        .as_str()
        .expect("id")
        .to_string()
}

pub fn export(w: &World, session: &str) -> String {
    let out = w.path(&format!("{session}.cast"));
    w.cli_ok(&["export", session, "-o", out.to_str().expect("utf-8 path")]);
    // Auditing the auditors: the export is on the record.
    assert!(
        w.siem_events()
            .iter()
            .any(|e| e["action"] == "recording_exported"
                && e["session_id"]
                    .as_str()
                    .is_some_and(|id| id.starts_with(session))),
        "no recording_exported event for {session}"
    );
    std::fs::read_to_string(out).expect("export written")
}

/// Reads a child's stdout lines as they arrive, each with its arrival time.
pub fn stamped_lines(
    child: &mut std::process::Child,
) -> std::sync::mpsc::Receiver<(Instant, String)> {
    let stdout = child.stdout.take().expect("stdout is piped");
    let (tx, rx) = std::sync::mpsc::channel::<(Instant, String)>();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send((Instant::now(), line));
        }
    });
    rx
}

/// Starts `ssh ... sleep 60` in the background and waits until the session is live.
pub fn start_long_session(w: &World, extra: &[&str], cmd: &str) -> std::process::Child {
    let child = w
        .ssh("alice", "web-01", extra, &[cmd])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start ssh");
    w.wait_event("session start", |e| e["action"] == "session_start");
    child
}

pub fn wait_exit(
    child: &mut std::process::Child,
    timeout: Duration,
) -> (Option<i32>, String, String) {
    let status = wait_for("ssh to exit", timeout, || {
        child.try_wait().expect("try_wait")
    });
    let mut out = String::new();
    let mut err = String::new();
    use std::io::Read;
    if let Some(mut s) = child.stdout.take() {
        let _ = s.read_to_string(&mut out);
    }
    if let Some(mut s) = child.stderr.take() {
        let _ = s.read_to_string(&mut err);
    }
    (status.code(), out, err)
}

pub fn sha256_hex(b: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(b))
}

/// Runs a control command over the gateway's SSH endpoint as `person`.
pub async fn control(w: &World, person: &str, login: &str, command: &str) -> (i32, String, String) {
    let out = output(w.ssh(person, login, &[], &[command])).await;
    (
        out.status.code().unwrap_or(-1),
        text(&out.stdout),
        text(&out.stderr),
    )
}

pub fn request_id(out: &str) -> String {
    out.split_whitespace()
        .skip_while(|w| *w != "request")
        .nth(1)
        .unwrap_or_else(|| panic!("a request id in {out}"))
        .to_string()
}

/// Calls the JSON API with the real `curl`; returns (status, body).
pub async fn api(
    w: &World,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut c = Command::new(require("curl", "curl"));
    c.args(["-s", "-o", "-", "-w", "\n%{http_code}", "-X", method])
        .arg(format!("http://127.0.0.1:{}{path}", w.http_port));
    if let Some(t) = token {
        c.args(["-H", &format!("Authorization: Bearer {t}")]);
    }
    if let Some(b) = body {
        c.args([
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            &b.to_string(),
        ]);
    }
    let out = output(c).await;
    let text = text(&out.stdout);
    let (body, code) = text.rsplit_once('\n').expect("status line");
    let code: u16 = code.trim().parse().expect("status code");
    let body = serde_json::from_str(body).unwrap_or(Value::Null);
    check_openapi(method, path, code, &body);
    (code, body)
}

pub async fn api_token(w: &World, person: &str) -> String {
    let (code, out, err) = control(w, person, "breakglass", "token").await;
    assert_eq!(code, 0, "{err}");
    out.lines()
        .find_map(|l| l.strip_prefix("token: "))
        .expect("token line")
        .to_string()
}

/// Copies a directory tree (the recording store) so each tamper case starts from the original.
pub fn copy_tree(from: &std::path::Path, to: &std::path::Path) {
    let st = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .expect("cp");
    assert!(st.success());
}

pub fn writable(p: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o644)).expect("chmod");
}

/// One line of the gateway's `/metrics` with its value, fetched with the real `curl` and
/// `extra` arguments.
pub fn metric_with(w: &World, series: &str, extra: &[&str]) -> f64 {
    let out = Command::new(require("curl", "curl"))
        .args(["-sS", "--max-time", "5"])
        .args(extra)
        .arg(format!("http://127.0.0.1:{}/metrics", w.http_port))
        .output()
        .expect("curl");
    let body = text(&out.stdout);
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{series} in /metrics:\n{body}\n{}", text(&out.stderr)))
}
