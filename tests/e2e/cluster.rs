//! Three gateway processes against one real PostgreSQL state store (initdb), moto S3 with
//! Object Lock and a real HAProxy in TCP mode in front of them, driven with real `ssh` and
//! `psql` through HAProxy: the journeys land on any node, revocation crosses nodes, a killed
//! node's session is taken over and sealed, a drain moves new sessions away, two nodes racing
//! one approval record it once, and a state-store outage fails closed and heals by itself.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::support::*;

/// One gateway process of the cluster.
pub struct Node {
    pub name: String,
    pub config: std::path::PathBuf,
    pub ssh: u16,
    pub http: u16,
    pub pg: u16,
    child: Option<Child>,
}

impl Node {
    fn start(&mut self, dir: &std::path::Path) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(format!("{}.log", self.name)))
            .expect("node log");
        let child = Command::new(env!("CARGO_BIN_EXE_breakglass"))
            .args(["serve", "--config"])
            .arg(&self.config)
            .envs(S3_ENV)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start a gateway node");
        self.child = Some(child);
        wait_port(self.ssh);
        wait_port(self.http);
    }

    /// `kill -9`.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM: the node drains and exits by itself.
    fn sigterm(&mut self) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
        }
    }

    fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let c = self.child.as_mut().expect("running");
        let status = wait_for(&format!("{} to exit", self.name), timeout, || {
            c.try_wait().expect("try_wait")
        });
        self.child = None;
        status
    }

    /// `/healthz`'s status code.
    fn health(&self) -> u16 {
        let out = Command::new(require("curl", "curl"))
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                "2",
            ])
            .arg(format!("http://127.0.0.1:{}/healthz", self.http))
            .output()
            .expect("curl");
        text(&out.stdout).trim().parse().unwrap_or(0)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The whole cluster: the world (sshd target, people), the state and target PostgreSQL
/// servers, S3, the SIEM receiver, the nodes and HAProxy.
pub struct Cluster {
    pub w: World,
    pub state: Postgres,
    /// The PostgreSQL target and S3, kept running for the test's length.
    _target: Postgres,
    _s3: S3Server,
    pub siem: HttpReceiver,
    pub nodes: Vec<Node>,
    haproxy: Child,
    pub lb_ssh: u16,
    pub lb_pg: u16,
    pub lb_http: u16,
    _dirs: Vec<tempfile::TempDir>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.haproxy.kill();
        let _ = self.haproxy.wait();
    }
}

impl Cluster {
    pub async fn start(n: usize) -> Cluster {
        let state_dir = tempfile::tempdir().expect("tempdir");
        let target_dir = tempfile::tempdir().expect("tempdir");
        let certs = tempfile::tempdir().expect("tempdir");
        let state = Postgres::start(state_dir.path());
        let out = state.psql(
            "postgres",
            &state.superuser_password,
            "CREATE DATABASE breakglass",
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
        let target = Postgres::start(target_dir.path());
        let out = target.psql(
            "postgres",
            &target.superuser_password,
            "CREATE ROLE bg_dba LOGIN SUPERUSER PASSWORD 'initial-bg-password'",
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
        let s3 = S3Server::start(&state_dir.path().join("moto.log"));
        s3.bucket("bg-cluster", Some(1));
        let siem = HttpReceiver::start(vec![200]).await;
        let (cert, key) = self_signed_cert(certs.path());
        let url = format!(
            "postgres://postgres:{}@127.0.0.1:{}/breakglass",
            state.superuser_password, state.port
        );
        let w = World::with(Opts {
            extra_limits: "checkpoint_interval = \"500ms\"\npreauth_per_source = 256".into(),
            extra_config: format!(
                r#"
[postgres]
tls_cert = "{cert}"
tls_key = "{key}"

[siem]
actions = true

[[siem.sinks]]
name = "receiver"
kind = "webhook"
url = "http://127.0.0.1:{siem}/siem"
timeout = "2s"

[storage]
kind = "s3"
bucket = "bg-cluster"
prefix = "prod"
endpoint = "{endpoint}"
region = "us-east-1"
object_lock = "compliance"
retention_days = 1

[state]
kind = "postgres"
url = "{url}"
pool_size = 4

[[targets]]
name = "orders-db"
protocol = "postgres"
address = "127.0.0.1:{target}"
login = "bg_dba"
approvers = ["bob"]
"#,
                cert = cert.display(),
                key = key.display(),
                siem = siem.port,
                endpoint = s3.endpoint(),
                target = target.port,
            ),
            ..Default::default()
        });
        // The identity every node shares, made once; then the target's password.
        w.cli_ok(&["keys", "init"]);
        w.vault_set("orders-db", "initial-bg-password");

        let base = std::fs::read_to_string(&w.config_path).expect("base config");
        let d = w.dir.path().display().to_string();
        let mut nodes = Vec::new();
        for i in 0..n {
            let name = format!("node-{}", (b'a' + i as u8) as char);
            let (ssh, http, pg) = (free_port(), free_port(), free_port());
            let text =
                base.replace(
                    &format!("data_dir = \"{d}/data\""),
                    &format!("data_dir = \"{d}/{name}\"\nkeys_dir = \"{d}/data/keys\""),
                )
                .replace(
                    &format!("ssh = \"127.0.0.1:{}\"", w.gw_port),
                    &format!("ssh = \"127.0.0.1:{ssh}\""),
                )
                .replace(
                    &format!("http = \"127.0.0.1:{}\"", w.http_port),
                    &format!("http = \"127.0.0.1:{http}\""),
                )
                .replace(
                    &format!("postgres = \"127.0.0.1:{}\"", w.pg_port),
                    &format!("postgres = \"127.0.0.1:{pg}\""),
                ) + &format!("\n[cluster]\nnode_id = \"{name}\"\nlease = \"3s\"\ndrain = \"4s\"\n");
            let config = w.path(&format!("{name}.toml"));
            std::fs::write(&config, text).expect("node config");
            nodes.push(Node {
                name,
                config,
                ssh,
                http,
                pg,
                child: None,
            });
        }
        for node in &mut nodes {
            node.start(w.dir.path());
        }
        let (lb_ssh, lb_pg, lb_http) = (free_port(), free_port(), free_port());
        let backend = |port: fn(&Node) -> u16| {
            nodes
                .iter()
                .map(|n| {
                    format!(
                        "    server {} 127.0.0.1:{} check port {}\n",
                        n.name,
                        port(n),
                        n.http
                    )
                })
                .collect::<String>()
        };
        let cfg = w.path("haproxy.cfg");
        std::fs::write(
            &cfg,
            format!(
                "global\n    maxconn 512\n\
                 defaults\n    mode tcp\n    timeout connect 1s\n    timeout client 10m\n    timeout server 10m\n    timeout check 1s\n    retries 3\n    option redispatch 1\n    balance roundrobin\n    option httpchk\n    http-check send meth GET uri /healthz\n    http-check expect status 200\n    default-server inter 200ms fall 1 rise 1\n\
                 frontend ssh\n    bind 127.0.0.1:{lb_ssh}\n    default_backend ssh\n\
                 frontend pg\n    bind 127.0.0.1:{lb_pg}\n    default_backend pg\n\
                 frontend http\n    bind 127.0.0.1:{lb_http}\n    default_backend http\n\
                 backend ssh\n{}\
                 backend pg\n{}\
                 backend http\n{}",
                backend(|n| n.ssh),
                backend(|n| n.pg),
                backend(|n| n.http),
            ),
        )
        .expect("haproxy.cfg");
        let haproxy = Command::new(require("haproxy", "haproxy"))
            .args(["-db", "-f"])
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(w.path("haproxy.log")).expect("haproxy log"))
            .spawn()
            .expect("start haproxy");
        wait_port(lb_ssh);
        let c = Cluster {
            w,
            state,
            _target: target,
            _s3: s3,
            siem,
            nodes,
            haproxy,
            lb_ssh,
            lb_pg,
            lb_http,
            _dirs: vec![state_dir, target_dir, certs],
        };
        c.wait_all_up();
        c
    }

    /// Waits until every running node's lease is in the store and HAProxy sees it healthy.
    pub fn wait_all_up(&self) {
        let running: Vec<&str> = self
            .nodes
            .iter()
            .filter(|n| n.child.is_some())
            .map(|n| n.name.as_str())
            .collect();
        wait_for(
            "every node up in `cluster status`",
            Duration::from_secs(20),
            || {
                let out = self.w.cli(&["cluster", "status", "--format", "json"]);
                let v: Value = serde_json::from_slice(&out.stdout).ok()?;
                let up: Vec<&str> = v
                    .as_array()?
                    .iter()
                    .filter(|n| n["state"] == "up")
                    .filter_map(|n| n["node"].as_str())
                    .collect();
                running.iter().all(|r| up.contains(r)).then_some(())
            },
        );
        // HAProxy's first checks (rise 1, every 200 ms).
        wait_for("HAProxy to route", Duration::from_secs(10), || {
            let out = self
                .ssh_cmd(self.lb_ssh, "alice", "breakglass", &["status"])
                .output()
                .ok()?;
            out.status.success().then_some(())
        });
    }

    /// `ssh -p PORT LOGIN@127.0.0.1 CMD...` as `person`.
    pub fn ssh_cmd(&self, port: u16, person: &str, login: &str, cmd: &[&str]) -> Command {
        let mut c = Command::new(require("ssh", "openssh-client"));
        c.args(self.w.ssh_args(person))
            .arg("-p")
            .arg(port.to_string())
            .arg(format!("{login}@127.0.0.1"))
            .args(cmd)
            .stdin(Stdio::null());
        c
    }

    /// A control-channel command through `port`: (exit code, stdout, stderr).
    pub async fn control(&self, port: u16, person: &str, command: &str) -> (i32, String, String) {
        let out = output(self.ssh_cmd(port, person, "breakglass", &[command])).await;
        (
            out.status.code().unwrap_or(-1),
            text(&out.stdout),
            text(&out.stderr),
        )
    }

    /// Every event the SIEM receiver got, in arrival order.
    pub fn events(&self) -> Vec<Value> {
        self.siem
            .bodies()
            .iter()
            .filter_map(|(_, b)| serde_json::from_str::<Value>(b).ok())
            .flat_map(|v| v.as_array().cloned().unwrap_or_default())
            .collect()
    }

    /// The session index row of `id`.
    pub fn session(&self, id: &str) -> Value {
        self.w
            .sessions()
            .into_iter()
            .find(|s| s["id"] == id)
            .unwrap_or_else(|| panic!("session {id} in the index"))
    }

    /// The newest session's id, once it is in the index.
    fn newest_session_after(&self, seen: usize) -> Value {
        wait_for(
            "a new session in the index",
            Duration::from_secs(15),
            || {
                let s = self.w.sessions();
                (s.len() > seen).then(|| s[0].clone())
            },
        )
    }

    fn node(&mut self, name: &str) -> &mut Node {
        self.nodes
            .iter_mut()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    /// psql through HAProxy with alice's JIT credential.
    fn psql(&self, password: &str, sql: &str) -> Command {
        let mut c = Command::new(require("psql", "postgresql-client"));
        c.arg(format!(
            "host=127.0.0.1 port={} user=alice dbname=orders-db sslmode=require",
            self.lb_pg
        ))
        .args(["-XAtc", sql])
        .env("PGPASSWORD", password)
        .env("PGCONNECT_TIMEOUT", "10")
        .stdin(Stdio::null());
        c
    }
}

fn request_of(out: &str) -> String {
    request_id(out)
}

/// Starts a long `ssh` session through `port`; returns it once its command printed "started".
fn long_session(c: &Cluster, port: u16) -> (Child, std::sync::mpsc::Receiver<(Instant, String)>) {
    let mut child = c
        .ssh_cmd(port, "alice", "web-01", &["echo started; sleep 60"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ssh");
    let rx = stamped_lines(&mut child);
    let (_, line) = rx
        .recv_timeout(Duration::from_secs(15))
        .expect("the long session started");
    assert_eq!(line, "started");
    (child, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_behind_haproxy_share_one_state_store() {
    let mut c = Cluster::start(3).await;
    let (a, b) = (c.nodes[0].ssh, c.nodes[1].ssh);

    // 1. alice requests on node A, bob approves on node B, alice's ssh lands on any node.
    let (code, out, err) = c
        .control(
            a,
            "alice",
            "request web-01 --reason disk full --incident INC-90 --for 30m",
        )
        .await;
    assert_eq!(code, 0, "request on node A: {out}{err}");
    let req = request_of(&out);
    let (code, out, err) = c.control(b, "bob", &format!("approve {req}")).await;
    assert_eq!(code, 0, "approve on node B: {out}{err}");
    let mut landed = std::collections::BTreeSet::new();
    for i in 0..3 {
        let out =
            output(c.ssh_cmd(c.lb_ssh, "alice", "web-01", &[&format!("echo hello-{i}")])).await;
        assert!(
            out.status.success(),
            "ssh through HAProxy: {}",
            text(&out.stderr)
        );
        assert_eq!(text(&out.stdout).trim(), format!("hello-{i}"));
    }
    wait_for("three ended sessions", Duration::from_secs(15), || {
        let s = c.w.sessions();
        (s.iter().filter(|s| !s["ended_at"].is_null()).count() >= 3).then_some(())
    });
    for s in c.w.sessions() {
        landed.insert(s["node"].as_str().expect("node").to_string());
    }
    eprintln!("ssh sessions landed on {landed:?}");
    assert!(
        landed.len() >= 2,
        "round robin spreads sessions: {landed:?}"
    );
    // psql through HAProxy too.
    let (_, out, _) = c
        .control(
            c.lb_ssh,
            "alice",
            "request orders-db --reason locks --incident INC-90 --for 30m",
        )
        .await;
    let pg_req = request_of(&out);
    let (code, out, err) = c
        .control(c.lb_ssh, "bob", &format!("approve {pg_req}"))
        .await;
    assert_eq!(code, 0, "{out}{err}");
    let (_, out, _) = c
        .control(c.lb_ssh, "alice", &format!("credential {pg_req}"))
        .await;
    let secret = out
        .lines()
        .find_map(|l| l.strip_prefix("password: "))
        .unwrap_or_else(|| panic!("a credential: {out}"))
        .to_string();
    let out = output(c.psql(&secret, "select 40 + 2")).await;
    assert!(
        out.status.success(),
        "psql through HAProxy: {}",
        text(&out.stderr)
    );
    assert_eq!(text(&out.stdout).trim(), "42");

    eprintln!("step:5. Two nodes");
    // 5. Two nodes race to approve the same request as the same approver: one approval.
    let (_, out, _) = c
        .control(
            a,
            "alice",
            "request web-02 --reason race --incident INC-91 --for 30m",
        )
        .await;
    let race = request_of(&out);
    let cmd = format!("approve {race}");
    let (ra, rb) = tokio::join!(c.control(a, "bob", &cmd), c.control(b, "bob", &cmd));
    eprintln!("racing approvals: A {ra:?}\nB {rb:?}");
    let out = Command::new(require("psql", "postgresql-client"))
        .arg(format!(
            "host=127.0.0.1 port={} user=postgres dbname=breakglass",
            c.state.port
        ))
        .args([
            "-XAtc",
            &format!("SELECT count(*) FROM approvals WHERE request_id = '{race}'"),
        ])
        .env("PGPASSWORD", &c.state.superuser_password)
        .output()
        .expect("psql");
    let counted = text(&out.stdout);
    assert_eq!(
        counted.lines().last().map(str::trim),
        Some("1"),
        "exactly one approval recorded: {counted}{}",
        text(&out.stderr)
    );
    assert!(
        [&ra, &rb].iter().filter(|r| r.0 == 0).count() == 1,
        "one node accepted the approval, the other refused it: {ra:?} {rb:?}"
    );

    eprintln!("step:2. A revoke");
    // 2. A revoke issued on node B cuts a live session on node A within a second.
    let grant = c.w.grant("alice", "30m");
    let (mut child, _rx) = long_session(&c, a);
    let (code, out, err) = c
        .control(b, "carol", &format!("revoke {grant} --reason contained"))
        .await;
    let revoked = Instant::now();
    assert_eq!(code, 0, "revoke on node B: {out}{err}");
    let (code, _, err) = wait_exit(&mut child, Duration::from_secs(5));
    let took = revoked.elapsed();
    eprintln!("a revoke on node B cut node A's session {took:?} after it returned");
    assert_ne!(code, Some(0));
    assert!(err.contains("revoked"), "the user is told why: {err}");
    assert!(took <= Duration::from_millis(1000), "cut after {took:?}");

    eprintln!("step:3. kill -9");
    // 3. kill -9 of the node holding a live session; it also delivers the SIEM sink, and
    // holds an event the collector has not taken yet.
    c.w.grant("alice", "30m");
    let victim = c.sink_worker();
    let victim_ssh = c.node(&victim).ssh;
    let seen = c.w.sessions().len();
    let (mut child, _rx) = long_session(&c, victim_ssh);
    let live = c.newest_session_after(seen);
    let id = live["id"].as_str().expect("id").to_string();
    assert_eq!(
        live["node"],
        victim.as_str(),
        "the session is on the node it came in by"
    );
    c.wait_event_for(&id, "recording_checkpoint");
    // The collector goes down; the victim commits an event it cannot deliver.
    c.siem
        .refusing
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let (code, out, err) = c
        .control(
            victim_ssh,
            "alice",
            "request orders-db --reason held back --incident INC-93 --for 30m",
        )
        .await;
    assert_eq!(code, 0, "request on the victim: {out}{err}");
    let held_back = request_of(&out);
    eprintln!("session {id} and request {held_back} are on {victim}; kill -9");
    let killed = Instant::now();
    c.node(&victim).kill9();
    c.siem
        .refusing
        .store(false, std::sync::atomic::Ordering::SeqCst);
    let _ = wait_exit(&mut child, Duration::from_secs(10));
    // alice gets back in through HAProxy at once.
    let out = output(c.ssh_cmd(c.lb_ssh, "alice", "web-01", &["echo back"])).await;
    assert!(
        out.status.success(),
        "reconnect through HAProxy: {}",
        text(&out.stderr)
    );
    assert_eq!(text(&out.stdout).trim(), "back");
    eprintln!("alice was back in {:?} after the kill", killed.elapsed());
    // Another node seals the dead node's session.
    let row = wait_for(
        "the dead node's session taken over",
        Duration::from_secs(20),
        || {
            let s = c.session(&id);
            (!s["ended_at"].is_null()).then_some(s)
        },
    );
    eprintln!("taken over {:?} after the kill: {row}", killed.elapsed());
    assert_eq!(row["end_reason"], "gateway_crashed");
    assert_ne!(row["node"], victim.as_str(), "another node holds it now");
    let out = c.w.cli(&["verify", &id]);
    let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(said.contains("INCOMPLETE"), "verify: {said}");
    assert!(!said.contains("TAMPERED"), "verify: {said}");
    let end = c.wait_event_for(&id, "session_end");
    assert_eq!(end["reason"], "gateway_crashed");
    assert!(
        end["message"].as_str().is_some_and(|m| m.contains(&victim)),
        "the end event names the lost node: {end}"
    );
    for action in ["session_start", "recording_checkpoint", "session_end"] {
        c.wait_event_for(&id, action);
    }
    // The event the dead node committed but never delivered reaches the collector from the
    // shared outbox, through the node that took the sink over.
    wait_for(
        "the dead node's undelivered request event",
        Duration::from_secs(20),
        || {
            c.events()
                .into_iter()
                .find(|e| e["action"] == "request_created" && e["request_id"] == held_back.as_str())
        },
    );
    let now = c.sink_worker();
    assert_ne!(now, victim, "another node delivers the sink");
    eprintln!(
        "{now} delivers the SIEM sink {:?} after the kill",
        killed.elapsed()
    );
    // The dead node comes back; the others keep serving.
    let dir = c.w.dir.path().to_path_buf();
    c.node(&victim).start(&dir);
    c.wait_all_up();

    eprintln!("step:4. A SIGTERM");
    // 4. A SIGTERM drain: the user is told, /healthz says 503, new sessions go elsewhere.
    let seen = c.w.sessions().len();
    let (mut child, _rx) = long_session(&c, c.lb_ssh);
    let live = c.newest_session_after(seen);
    let id = live["id"].as_str().expect("id").to_string();
    let draining = live["node"].as_str().expect("node").to_string();
    c.node(&draining).sigterm();
    let n = c.node(&draining);
    let code = wait_for(
        "/healthz 503 while draining",
        Duration::from_secs(5),
        || {
            let h = n.health();
            (h == 503 || h == 0).then_some(h)
        },
    );
    assert_eq!(code, 503, "the draining node answers 503");
    // HAProxy's next check (every 200 ms) takes the node out: its /healthz then answers
    // from a serving node.
    let health: Value = wait_for(
        "HAProxy to stop routing to the draining node",
        Duration::from_secs(5),
        || {
            let out = Command::new(require("curl", "curl"))
                .args(["-s", "--max-time", "2"])
                .arg(format!("http://127.0.0.1:{}/healthz", c.lb_http))
                .output()
                .ok()?;
            serde_json::from_slice::<Value>(&out.stdout)
                .ok()
                .filter(|h| h["ok"] == true)
        },
    );
    assert_ne!(health["node"], draining.as_str());
    let seen = c.w.sessions().len();
    let out = output(c.ssh_cmd(c.lb_ssh, "alice", "web-01", &["echo elsewhere"])).await;
    assert!(
        out.status.success(),
        "a new session during the drain: {}",
        text(&out.stderr)
    );
    let new = c.newest_session_after(seen);
    assert_ne!(
        new["node"],
        draining.as_str(),
        "the new session went to another node"
    );
    let (_, _, err) = wait_exit(&mut child, Duration::from_secs(15));
    assert!(err.contains("going away"), "the user is told: {err}");
    let status = c.node(&draining).wait_exit(Duration::from_secs(40));
    assert!(status.success(), "the drained node exits cleanly: {status}");
    let row = c.session(&id);
    assert_eq!(row["end_reason"], "gateway_shutdown");
    let out = c.w.cli(&["verify", &id]);
    assert!(
        out.status.success(),
        "a drained session verifies: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    c.wait_event_for(&id, "session_end");
    c.node(&draining).start(&dir);
    c.wait_all_up();

    eprintln!("step:6. The state store");
    // A second process with a running node's id is refused (it would close and seal that
    // node's live sessions as its own).
    let a_cfg = std::fs::read_to_string(&c.nodes[0].config).expect("node-a config");
    let mut dup = a_cfg.clone();
    for port in [c.nodes[0].ssh, c.nodes[0].http, c.nodes[0].pg] {
        dup = dup.replace(
            &format!("127.0.0.1:{port}\""),
            &format!("127.0.0.1:{}\"", free_port()),
        );
    }
    let dup_cfg = c.w.path("node-dup.toml");
    std::fs::write(&dup_cfg, dup).expect("dup config");
    let out = output({
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_breakglass"));
        cmd.args(["serve", "--config"]).arg(&dup_cfg).envs(S3_ENV);
        cmd
    })
    .await;
    assert!(!out.status.success(), "a duplicate node id started");
    assert!(
        text(&out.stderr).contains("node id `node-a` is in use"),
        "{}",
        text(&out.stderr)
    );

    // 6. The state store stops for 10 s: live sessions keep recording, new ones are refused
    // with a clear message, and service resumes by itself.
    c.w.grant("alice", "30m");
    let (mut child, rx) = {
        let mut child = c
            .ssh_cmd(
                c.nodes[0].ssh,
                "alice",
                "web-01",
                &["echo started; for i in $(seq 1 40); do echo tick-$i; sleep 0.5; done"],
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("ssh");
        let rx = stamped_lines(&mut child);
        let (_, line) = rx.recv_timeout(Duration::from_secs(15)).expect("started");
        assert_eq!(line, "started");
        (child, rx)
    };
    // A second session that ends while the store is away: its end event is kept aside on
    // its node and reaches the collector once the store is back.
    let seen = c.w.sessions().len();
    let mut short = c
        .ssh_cmd(
            c.nodes[0].ssh,
            "alice",
            "web-01",
            &["echo started; sleep 3; echo done"],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ssh");
    let short_rx = stamped_lines(&mut short);
    let (_, line) = short_rx
        .recv_timeout(Duration::from_secs(15))
        .expect("the short session started");
    assert_eq!(line, "started");
    let short_id = c.newest_session_after(seen)["id"]
        .as_str()
        .expect("id")
        .to_string();
    c.state.stop();
    let stopped = Instant::now();
    let out = output(c.ssh_cmd(c.lb_ssh, "alice", "web-01", &["echo during"])).await;
    assert!(
        !out.status.success(),
        "a new session while the state store is down"
    );
    let said = text(&out.stderr);
    assert!(said.contains("state store"), "the refusal says why: {said}");
    let left = Duration::from_secs(10).saturating_sub(stopped.elapsed());
    // The live session keeps printing while the store is down.
    let mut ticks = 0;
    let until = Instant::now() + left;
    while let Ok((_, line)) = rx.recv_timeout(until.saturating_duration_since(Instant::now())) {
        if line.starts_with("tick-") {
            ticks += 1;
        }
    }
    assert!(
        ticks >= 10,
        "the live session ran on through the outage ({ticks} ticks)"
    );
    let (done_at, line) = short_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the short session's last line");
    assert_eq!(line, "done");
    let (code, out, _) = wait_exit(&mut short, Duration::from_secs(10));
    assert_eq!(code, Some(0), "the short session ended: {out}");
    c.state.start_again();
    assert!(
        done_at.duration_since(stopped) < Duration::from_secs(8),
        "the short session ended while the store was away"
    );
    let end = c.wait_event_for(&short_id, "session_end");
    assert_eq!(end["reason"], "client_closed", "{end}");
    wait_for(
        "new sessions once the store is back",
        Duration::from_secs(20),
        || {
            let out = c
                .ssh_cmd(c.lb_ssh, "alice", "web-01", &["echo after"])
                .output()
                .ok()?;
            (out.status.success() && text(&out.stdout).trim() == "after").then_some(())
        },
    );
    let (code, out, _) = wait_exit(&mut child, Duration::from_secs(30));
    assert_eq!(code, Some(0), "the live session survived the outage: {out}");
    let id =
        c.w.sessions()
            .into_iter()
            .find(|s| {
                s["node"] == "node-a"
                    && s["end_reason"] == "client_closed"
                    && s["bytes_out"].as_u64().unwrap_or(0) > 100
            })
            .expect("the outage session")["id"]
            .as_str()
            .expect("id")
            .to_string();
    let out = c.w.cli(&["verify", &id]);
    assert!(
        out.status.success(),
        "the outage session verifies: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    c.wait_event_for(&id, "session_end");
}

impl Cluster {
    /// The node that delivers the SIEM sink now (it holds the sink's lease).
    fn sink_worker(&self) -> String {
        wait_for(
            "a node delivering the SIEM sink",
            Duration::from_secs(20),
            || {
                let out = self
                    .w
                    .cli(&["cluster", "status", "--sinks", "--format", "json"]);
                let v: Value = serde_json::from_slice(&out.stdout).ok()?;
                let sink = v.as_array()?.iter().find(|s| s["sink"] == "receiver")?;
                let worker = sink["worker"].as_str()?.to_string();
                self.nodes
                    .iter()
                    .any(|n| n.name == worker && n.child.is_some())
                    .then_some(worker)
            },
        )
    }

    /// Waits until the SIEM receiver has an event `action` of session `id`.
    fn wait_event_for(&self, id: &str, action: &str) -> Value {
        wait_for(
            &format!("{action} of {id} at the SIEM receiver"),
            Duration::from_secs(20),
            || {
                self.events()
                    .into_iter()
                    .find(|e| e["session_id"] == id && e["action"] == action)
            },
        )
    }
}
