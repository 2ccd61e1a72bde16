//! SIEM delivery against real receivers: rsyslog over TCP and TLS, and a local HTTP server
//! that plays Splunk HEC (indexer acknowledgement, failures, slow answers, an outage across a
//! gateway restart).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

use crate::support::*;

/// A real rsyslogd with one plain and one TLS (ossl driver) octet-counting TCP input, each
/// writing `msgid \t app \t structured-data \t msg` lines to its own file.
struct Rsyslog {
    child: Child,
    tcp: u16,
    tls: u16,
    dir: tempfile::TempDir,
}

impl Rsyslog {
    fn start(cert: &Path, key: &Path) -> Rsyslog {
        let bin = require("rsyslogd", "rsyslog");
        // The TLS driver is a separate package; fail loudly if it is missing.
        assert!(
            Path::new("/usr/lib/x86_64-linux-gnu/rsyslog/lmnsd_ossl.so").exists()
                || Path::new("/usr/lib/aarch64-linux-gnu/rsyslog/lmnsd_ossl.so").exists(),
            "rsyslog's TLS driver is missing: apt-get install rsyslog-openssl"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let (tcp, tls) = (free_port(), free_port());
        let conf = d.join("rsyslog.conf");
        std::fs::write(
            &conf,
            format!(
                r#"global(workDirectory="{d}" maxMessageSize="256k"
       DefaultNetstreamDriverCAFile="{cert}"
       DefaultNetstreamDriverCertFile="{cert}"
       DefaultNetstreamDriverKeyFile="{key}")
module(load="imtcp")
template(name="fields" type="string" string="%msgid%\t%app-name%\t%structured-data%\t%msg%\n")
input(type="imtcp" port="{tcp}" address="127.0.0.1" ruleset="plain")
input(type="imtcp" port="{tls}" address="127.0.0.1" ruleset="tls"
      streamDriver.name="ossl" streamDriver.mode="1" streamDriver.authMode="anon")
ruleset(name="plain") {{ action(type="omfile" file="{d}/plain.log" template="fields") }}
ruleset(name="tls") {{ action(type="omfile" file="{d}/tls.log" template="fields") }}
"#,
                d = d.display(),
                cert = cert.display(),
                key = key.display(),
            ),
        )
        .expect("write rsyslog.conf");
        let child = Command::new(bin)
            .arg("-n")
            .arg("-f")
            .arg(&conf)
            .arg("-i")
            .arg(d.join("rsyslogd.pid"))
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(d.join("rsyslogd.err")).expect("err file"))
            .spawn()
            .expect("start rsyslogd");
        for port in [tcp, tls] {
            wait_for("rsyslogd listening", Duration::from_secs(10), || {
                std::net::TcpStream::connect(("127.0.0.1", port))
                    .ok()
                    .map(|_| ())
            });
        }
        Rsyslog {
            child,
            tcp,
            tls,
            dir,
        }
    }

    /// What rsyslogd printed on stderr.
    fn errors(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("rsyslogd.err")).unwrap_or_default()
    }

    /// Parsed lines of one input: (msgid, app, structured data, msg).
    fn lines(&self, which: &str) -> Vec<(String, String, String, String)> {
        std::fs::read_to_string(self.dir.path().join(format!("{which}.log")))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let mut p = l.splitn(4, '\t');
                Some((
                    p.next()?.to_string(),
                    p.next()?.to_string(),
                    p.next()?.to_string(),
                    p.next()?.to_string(),
                ))
            })
            .collect()
    }
}

impl Drop for Rsyslog {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the HEC receiver does with the n-th event post.
#[derive(Clone, Copy, Debug)]
enum Step {
    Ok,
    Status(u16),
    /// Takes the events but answers only after this long (past the sink's time limit).
    Slow(Duration),
}

/// An event envelope and when it arrived.
type Received = (chrono::DateTime<chrono::Utc>, Value);

/// A local HTTP server that plays Splunk HEC: token check, `/services/collector/event` with
/// concatenated JSON events, and `/services/collector/ack` (each ack id is pending on the
/// first query, so the gateway has to poll).
struct Hec {
    port: u16,
    /// (received at, event envelope)
    events: Arc<Mutex<Vec<Received>>>,
    posts: Arc<Mutex<usize>>,
    /// Requests accepted and not yet answered.
    busy: Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Hec {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Hec {
    async fn start(port: u16, script: Vec<Step>, token: &'static str) -> Hec {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("bind HEC");
        let port = listener.local_addr().expect("addr").port();
        let events = Arc::new(Mutex::new(Vec::new()));
        let ev = events.clone();
        let busy = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let busy2 = busy.clone();
        let posts = Arc::new(Mutex::new(0usize));
        let posts2 = posts.clone();
        let task = tokio::spawn(async move {
            let posts = posts2;
            let acks = Arc::new(Mutex::new(BTreeMap::<u64, u32>::new()));
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    return;
                };
                let (ev, posts, acks, script) =
                    (ev.clone(), posts.clone(), acks.clone(), script.clone());
                let busy = busy2.clone();
                busy.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    let _done = Done(busy);
                    let Some((head, body)) = read_request(&mut sock).await else {
                        return;
                    };
                    let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
                    let authorized = head
                        .lines()
                        .any(|l| l.eq_ignore_ascii_case(&format!("authorization: Splunk {token}")));
                    let (status, reply) = if !authorized {
                        (
                            401,
                            r#"{"text":"Invalid authorization","code":3}"#.to_string(),
                        )
                    } else if path.starts_with("/services/collector/ack") {
                        let q: Value = serde_json::from_str(&body).unwrap_or_default();
                        let mut a = acks.lock().expect("lock");
                        let mut out = serde_json::Map::new();
                        for id in q["acks"].as_array().cloned().unwrap_or_default() {
                            let id = id.as_u64().unwrap_or(u64::MAX);
                            let seen = a.entry(id).or_insert(0);
                            *seen += 1;
                            out.insert(id.to_string(), Value::Bool(*seen > 1));
                        }
                        (200, serde_json::json!({ "acks": out }).to_string())
                    } else if path == "/services/collector/event" {
                        let n = {
                            let mut p = posts.lock().expect("lock");
                            *p += 1;
                            *p - 1
                        };
                        let step = script.get(n).copied().unwrap_or(Step::Ok);
                        match step {
                            Step::Status(s) => {
                                (s, r#"{"text":"Server is busy","code":9}"#.to_string())
                            }
                            Step::Ok | Step::Slow(_) => {
                                if let Step::Slow(d) = step {
                                    tokio::time::sleep(d).await;
                                }
                                let now = chrono::Utc::now();
                                let mut e = ev.lock().expect("lock");
                                for v in
                                    serde_json::Deserializer::from_str(&body).into_iter::<Value>()
                                {
                                    e.push((now, v.expect("HEC body is concatenated JSON")));
                                }
                                (200, format!(r#"{{"text":"Success","code":0,"ackId":{n}}}"#))
                            }
                        }
                    } else {
                        (404, r#"{"text":"not found"}"#.to_string())
                    };
                    let resp = format!(
                        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{reply}",
                        reply.len()
                    );
                    let _ = sock.write_all(resp.as_bytes()).await;
                });
            }
        });
        Hec {
            port,
            events,
            posts,
            busy,
            task,
        }
    }

    /// Event posts received (answered or not).
    fn posts(&self) -> usize {
        *self.posts.lock().expect("lock")
    }

    /// True when every accepted request has been answered.
    fn idle(&self) -> bool {
        self.busy.load(std::sync::atomic::Ordering::SeqCst) == 0
    }

    fn events(&self) -> Vec<Received> {
        self.events.lock().expect("lock").clone()
    }
}

/// Counts a request as answered when dropped.
struct Done(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for Done {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// The event id inside a HEC envelope, whatever the sink's format.
fn hec_id(env: &Value) -> String {
    let e = &env["event"];
    e["event_id"]
        .as_str()
        .or(e["metadata"]["uid"].as_str())
        .unwrap_or_default()
        .to_string()
}

/// The SIEM file once it holds `n` command events (action events are spooled in batches,
/// beside the session's own events).
fn file_with_commands(w: &World, n: usize) -> Vec<Value> {
    wait_for(
        &format!("{n} command events in the SIEM file"),
        Duration::from_secs(15),
        || {
            let f = w.siem_events();
            (f.iter().filter(|e| e["action"] == "command").count() >= n).then_some(f)
        },
    )
}

/// `breakglass siem status --format json`.
fn siem_status(w: &World) -> Vec<Value> {
    let out = w.cli_ok(&["siem", "status", "--format", "json"]);
    serde_json::from_str::<Vec<Value>>(&out).expect("siem status is a JSON array")
}

async fn http_get(port: u16, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn siem_events_reach_rsyslog_over_tcp_and_tls_and_splunk_hec_in_every_format() {
    let certs = tempfile::tempdir().expect("tempdir");
    let (cert, key) = self_signed_cert(certs.path());
    let rs = Rsyslog::start(&cert, &key);
    let hec = Hec::start(0, vec![], "hec-token-1").await;
    let w = World::with(Opts {
        extra_config: format!(
            r#"
[siem]
actions = true

[[siem.sinks]]
name = "syslog-plain"
kind = "syslog"
address = "127.0.0.1:{tcp}"
format = "cef"

[[siem.sinks]]
name = "syslog-tls"
kind = "syslog"
transport = "tls"
address = "127.0.0.1:{tls}"
ca_file = "{cert}"
format = "ocsf"
actions = true

[[siem.sinks]]
name = "hec"
kind = "splunk_hec"
url = "http://127.0.0.1:{hec}"
token = "hec-token-1"
ack = true
format = "ocsf"
actions = true
"#,
            tcp = rs.tcp,
            tls = rs.tls,
            cert = cert.display(),
            hec = hec.port,
        ),
        ..Default::default()
    });
    let gw = InProcess::start(&w).await;
    w.grant("alice", "30m");
    let out = output(w.ssh("alice", "web-01", &[], &["echo siem-check"])).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    w.wait_ended(1);

    // The seed-shaped file: every event valid, the exec command as a BREAK_GLASS_ACTION
    // (action events are spooled in batches, beside the session's own events).
    let file = file_with_commands(&w, 1);
    for e in &file {
        validate("siem-event.schema.json", e);
    }
    let cmd = file
        .iter()
        .find(|e| e["action"] == "command")
        .expect("a command event in the file");
    assert_eq!(cmd["event_type"], "BREAK_GLASS_ACTION");
    assert_eq!(cmd["command"], "echo siem-check");
    let start = file
        .iter()
        .find(|e| e["action"] == "session_start")
        .expect("start");
    assert_eq!(cmd["correlation_id"], start["correlation_id"]);

    // Splunk HEC (OCSF, with indexer acknowledgement): every file event arrives.
    let ids: BTreeSet<String> = file
        .iter()
        .map(|e| e["event_id"].as_str().expect("id").to_string())
        .collect();
    let got = wait_for("every event at HEC", Duration::from_secs(20), || {
        let got = hec.events();
        let have: BTreeSet<String> = got.iter().map(|(_, e)| hec_id(e)).collect();
        ids.is_subset(&have).then_some(got)
    });
    for (_, env) in &got {
        assert_eq!(env["sourcetype"], "breakglass:ocsf");
        validate("ocsf-event.schema.json", &env["event"]);
    }
    let ocsf = |code: &str| {
        got.iter()
            .map(|(at, env)| (*at, env["event"].clone()))
            .find(|(_, e)| e["metadata"]["event_code"] == code)
            .unwrap_or_else(|| panic!("{code} at HEC"))
    };
    let (start_at, start_ocsf) = ocsf("session_start");
    assert_eq!(
        (
            start_ocsf["class_uid"].as_u64(),
            start_ocsf["activity_id"].as_u64()
        ),
        (Some(4007), Some(1))
    );
    assert_eq!(start_ocsf["type_uid"].as_u64(), Some(400701));
    assert_eq!(
        start_ocsf["metadata"]["correlation_uid"],
        start["correlation_id"]
    );
    let (_, cmd_ocsf) = ocsf("command");
    assert_eq!(cmd_ocsf["message"], "echo siem-check");
    let (_, grant_ocsf) = ocsf("grant_created");
    assert_eq!(grant_ocsf["class_uid"].as_u64(), Some(3005));
    let emitted = chrono::DateTime::parse_from_rfc3339(start["timestamp"].as_str().expect("ts"))
        .expect("rfc3339");
    println!(
        "session_start reached HEC {} ms after it was emitted",
        (start_at - emitted.with_timezone(&chrono::Utc)).num_milliseconds()
    );

    // rsyslog over TCP (CEF, no action events) and TLS (OCSF with action events).
    let plain = wait_for(
        "session end over syslog TCP",
        Duration::from_secs(15),
        || {
            let l = rs.lines("plain");
            l.iter().any(|x| x.0 == "session_end").then_some(l)
        },
    );
    for (msgid, app, sd, msg) in &plain {
        assert_eq!(app, "breakglass");
        assert!(sd.starts_with("[breakglass@32473 eventId=\""), "{sd}");
        assert!(
            msg.starts_with(&format!(
                "CEF:0|breakglass|breakglass|{}|{msgid}|",
                env!("CARGO_PKG_VERSION")
            )),
            "{msg}"
        );
        assert_ne!(msgid, "command", "this sink takes no action events");
    }
    assert!(plain
        .iter()
        .any(|x| x.0 == "session_start" && x.3.contains("suser=alice")));
    let tls = wait_for("command over syslog TLS", Duration::from_secs(15), || {
        let l = rs.lines("tls");
        (l.iter().any(|x| x.0 == "command") && l.iter().any(|x| x.0 == "session_end")).then_some(l)
    });
    assert!(
        rs.errors().is_empty() || !rs.errors().contains("certificate"),
        "TLS errors at rsyslog: {}",
        rs.errors()
    );
    for (msgid, _, _, msg) in &tls {
        let v: Value = serde_json::from_str(msg).expect("OCSF JSON over TLS");
        validate("ocsf-event.schema.json", &v);
        assert_eq!(v["metadata"]["event_code"], msgid.as_str());
    }

    // `siem test` reaches every sink; `siem status` and /metrics show nothing queued.
    let out = w.cli(&["siem", "test"]);
    let said = text(&out.stdout);
    assert!(out.status.success(), "{said}{}", text(&out.stderr));
    for sink in ["file", "syslog-plain", "syslog-tls", "hec"] {
        assert!(said.contains(&format!("ok      {sink} (")), "{said}");
    }
    wait_for("the test event at HEC", Duration::from_secs(10), || {
        hec.events()
            .iter()
            .any(|(_, e)| e["event"]["metadata"]["event_code"] == "siem_test")
            .then_some(())
    });
    wait_for("nothing queued", Duration::from_secs(15), || {
        siem_status(&w)
            .iter()
            .all(|x| x["queued"] == 0)
            .then_some(())
    });
    let m = http_get(w.http_port, "/metrics").await;
    assert!(
        m.contains("breakglass_siem_queued_events{sink=\"hec\"} 0"),
        "{m}"
    );
    assert!(
        m.contains("breakglass_siem_oldest_undelivered_age_seconds{sink=\"syslog-tls\"} 0"),
        "{m}"
    );
    let delivered = m
        .lines()
        .find_map(|l| l.strip_prefix("breakglass_siem_delivered_events_total{sink=\"hec\"} "))
        .and_then(|v| v.parse::<f64>().ok())
        .expect("delivered counter");
    assert!(delivered >= ids.len() as f64, "{m}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_siem_outage_across_a_restart_loses_nothing_and_duplicates_carry_their_id() {
    let port = free_port();
    let w = World::with(Opts {
        extra_config: format!(
            r#"
[siem]
actions = true

[[siem.sinks]]
name = "hec"
kind = "splunk_hec"
url = "http://127.0.0.1:{port}"
token = "hec-token-2"
format = "seed"
actions = true
timeout = "1s"
batch = 5
"#
        ),
        ..Default::default()
    });
    // The collector is down for the whole first run. (Another test's receiver that happens
    // to get this port refuses the token, which is an outage too.)
    let gw = InProcess::start(&w).await;
    w.grant("alice", "30m");
    let out = output(w.ssh("alice", "web-01", &[], &["echo during-outage"])).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    w.wait_ended(1);
    gw.stop().await;
    let hec_status = siem_status(&w)
        .into_iter()
        .find(|s| s["sink"] == "hec")
        .expect("hec status");
    assert!(
        hec_status["queued"].as_u64().unwrap_or(0) >= 4,
        "{hec_status}"
    );
    assert!(
        hec_status["failed"].as_u64().unwrap_or(0) >= 1,
        "{hec_status}"
    );
    assert!(hec_status["last_error"].as_str().is_some(), "{hec_status}");

    // It comes back busy, then slow (past the 1 s limit, so that batch is sent twice), then
    // healthy; the gateway restarts in between and runs another session.
    let hec = Hec::start(
        port,
        vec![Step::Status(503), Step::Slow(Duration::from_millis(2500))],
        "hec-token-2",
    )
    .await;
    let gw = InProcess::start(&w).await;
    let out = output(w.ssh("alice", "web-01", &[], &["echo after-restart"])).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    w.wait_ended(2);

    let file = file_with_commands(&w, 2);
    let ids: Vec<String> = file
        .iter()
        .map(|e| e["event_id"].as_str().expect("id").to_string())
        .collect();
    // Wait for the slow answer too, so its copies are counted.
    let got = wait_for("every event at HEC", Duration::from_secs(30), || {
        let got = hec.events();
        let have: BTreeSet<String> = got.iter().map(|(_, e)| hec_id(e)).collect();
        (ids.iter().all(|i| have.contains(i)) && hec.idle() && hec.posts() >= 3).then_some(got)
    });
    gw.stop().await;
    // Duplicates exist only as exact copies with the same id.
    let mut by_id: BTreeMap<String, Vec<&Value>> = BTreeMap::new();
    for (_, env) in &got {
        validate("siem-event.schema.json", &env["event"]);
        by_id.entry(hec_id(env)).or_default().push(&env["event"]);
    }
    for (id, copies) in &by_id {
        assert!(
            copies.iter().all(|c| *c == copies[0]),
            "copies of {id} differ"
        );
    }
    let dups = got.len() - by_id.len();
    println!(
        "{} events, {} delivered copies, {dups} duplicates told apart by event_id",
        by_id.len(),
        got.len()
    );
    assert!(dups > 0, "the slow answer made the gateway resend a batch");
    // Order within each session is the order of the file.
    let first_seen: Vec<String> = {
        let mut seen = BTreeSet::new();
        got.iter()
            .map(|(_, e)| hec_id(e))
            .filter(|i| seen.insert(i.clone()))
            .collect()
    };
    let sessions: BTreeSet<String> = file
        .iter()
        .filter_map(|e| e["session_id"].as_str().map(str::to_string))
        .collect();
    assert_eq!(sessions.len(), 2);
    for s in &sessions {
        let of = |list: &[String]| -> Vec<String> {
            list.iter()
                .filter(|i| {
                    file.iter()
                        .any(|e| e["event_id"] == i.as_str() && e["session_id"] == s.as_str())
                })
                .cloned()
                .collect()
        };
        assert_eq!(of(&first_seen), of(&ids), "order of session {s}");
    }
    assert!(file
        .iter()
        .any(|e| e["action"] == "command" && e["command"] == "echo during-outage"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_siem_backlog_over_the_limit_refuses_new_sessions() {
    let w = World::with(Opts {
        extra_config: format!(
            r#"
[siem]
fail_closed_backlog = 0

[[siem.sinks]]
name = "dead-hook"
kind = "webhook"
url = "http://127.0.0.1:{}/siem"
hmac_secret = "s3cret"
timeout = "1s"
"#,
            free_port()
        ),
        ..Default::default()
    });
    let gw = InProcess::start(&w).await;
    w.grant("alice", "30m");
    let out = output(w.ssh("alice", "web-01", &[], &["echo nope"])).await;
    assert!(!out.status.success());
    let said = text(&out.stderr);
    assert!(
        said.contains("SIEM backlog"),
        "the user is told why: {said}"
    );
    let denied = w.wait_event("denial", |e| e["action"] == "session_denied");
    assert!(
        denied["message"]
            .as_str()
            .unwrap_or_default()
            .contains("SIEM backlog"),
        "{denied}"
    );
    gw.stop().await;
}

#[test]
fn malformed_siem_config_gets_a_clear_error() {
    let w = World::new();
    let base = std::fs::read_to_string(&w.config_path).expect("config");
    for (sink, key, why) in [
        ("kind = \"kafka\"", "siem.sinks[0].kind", "is not one of"),
        ("kind = \"webhook\"", "siem.sinks[0].url", "required"),
        (
            "kind = \"syslog\"\naddress = \"127.0.0.1:514\"\ntransport = \"sctp\"",
            "siem.sinks[0].transport",
            "is not one of",
        ),
        (
            "kind = \"syslog\"\naddress = \"localhost\"",
            "siem.sinks[0].address",
            "needs a port",
        ),
        (
            "kind = \"splunk_hec\"\nurl = \"http://127.0.0.1:8088\"",
            "siem.sinks[0].token",
            "required",
        ),
        (
            "kind = \"file\"\npath = \"/tmp/x.jsonl\"\nformat = \"leef\"",
            "siem.sinks[0].format",
            "is not one of",
        ),
    ] {
        let path = w.path("bad.toml");
        std::fs::write(
            &path,
            format!("{base}\n[[siem.sinks]]\nname = \"s\"\n{sink}\n"),
        )
        .expect("write");
        let out = Command::new(env!("CARGO_BIN_EXE_breakglass"))
            .args(["check-config", "--offline"])
            .arg(&path)
            .output()
            .expect("run");
        let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
        assert_eq!(out.status.code(), Some(1), "{sink}: {said}");
        assert!(said.contains(key) && said.contains(why), "{sink}: {said}");
    }
}
