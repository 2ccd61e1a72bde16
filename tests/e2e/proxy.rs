//! The PROXY protocol behind a load balancer: real HAProxy (`send-proxy-v2` for SSH,
//! `send-proxy` for HTTP) and real `ssh` and `curl` in front of the gateway, which trusts
//! 127.0.0.1 as its balancer. A trusted peer must send a header, whose client the record
//! names; an untrusted peer (127.0.0.2) is never read for one, so it cannot claim an address.

use std::process::{Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::*;

/// A ProxyCommand for `ssh`: connects from `bind` to the gateway, sends a PROXY v2 header
/// naming `src:sport` as the client, then relays stdin and stdout.
const PROXY_COMMAND: &str = r#"
import os, select, socket, struct, sys
host, port, src, sport, bind = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5]
s = socket.socket()
s.bind((bind, 0))
s.connect((host, port))
addrs = socket.inet_aton(src) + socket.inet_aton(host) + struct.pack("!HH", sport, port)
s.sendall(b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, 0x11]) + struct.pack("!H", len(addrs)) + addrs)
open_in = True
while True:
    r, _, _ = select.select([0, s] if open_in else [s], [], [])
    if 0 in r:
        d = os.read(0, 65536)
        if d:
            s.sendall(d)
        else:
            open_in = False
            s.shutdown(socket.SHUT_WR)
    if s in r:
        d = s.recv(65536)
        if not d:
            break
        os.write(1, d)
"#;

fn metric(w: &World, series: &str) -> f64 {
    // curl sends a PROXY v1 header itself: the HTTP listener trusts 127.0.0.1 as a balancer.
    metric_with(w, series, &["--haproxy-protocol"])
}

fn session_starts(w: &World) -> Vec<String> {
    w.siem_events()
        .into_iter()
        .filter(|e| e["action"] == "session_start")
        .filter_map(|e| e["client_addr"].as_str().map(str::to_string))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_balancer_the_record_names_the_client_and_only_the_balancer_may_say_who() {
    let w = World::with(Opts {
        listeners_extra: "proxy_protocol_from = [\"127.0.0.1\"]".into(),
        // The spoofed header is garbage to the SSH parser, which waits for a banner line
        // until the grace runs out.
        extra_limits: "login_grace = \"5s\"".into(),
        ..Default::default()
    });
    let gw = InProcess::start(&w).await;
    w.grant("alice", "30m");
    let script = w.path("proxy_command.py");
    std::fs::write(&script, PROXY_COMMAND).expect("write the ProxyCommand");
    let python = require("python3", "python3");
    let via = |claim: &str, bind: &str| {
        format!(
            "ProxyCommand={} {} %h %p {claim} 4242 {bind}",
            python.display(),
            script.display()
        )
    };

    // 1. Through a header from the trusted balancer address: the record names the client.
    let out = output(w.ssh(
        "alice",
        "web-01",
        &["-o", &via("198.51.100.7", "127.0.0.1")],
        &["echo", "via-header"],
    ))
    .await;
    assert_eq!(
        text(&out.stdout).trim(),
        "via-header",
        "{}",
        text(&out.stderr)
    );
    w.wait_ended(1);
    assert_eq!(session_starts(&w), vec!["198.51.100.7:4242".to_string()]);

    // 2. The trusted address without a header: closed before SSH begins, and counted.
    let refused = "breakglass_preauth_refused_total{listener=\"ssh\",reason=\"proxy_header\"}";
    let before = metric(&w, refused);
    let out = output(w.ssh("alice", "web-01", &[], &["echo", "no-header"])).await;
    assert!(
        !out.status.success(),
        "a header-less connection from the balancer got in"
    );
    assert!(!text(&out.stdout).contains("no-header"));
    assert_eq!(metric(&w, refused), before + 1.0);

    // 3. Any other peer is not read for a header: a plain client from 127.0.0.2 gets in as
    // itself ...
    let out = output(w.ssh(
        "alice",
        "web-01",
        &["-b", "127.0.0.2"],
        &["echo", "untrusted-peer"],
    ))
    .await;
    assert_eq!(
        text(&out.stdout).trim(),
        "untrusted-peer",
        "{}",
        text(&out.stderr)
    );
    w.wait_ended(2);
    let starts = session_starts(&w);
    assert!(starts[1].starts_with("127.0.0.2:"), "{starts:?}");
    // ... and its claim of another address is only bytes to the SSH parser: refused.
    let out = output(w.ssh(
        "alice",
        "web-01",
        &["-o", &via("203.0.113.66", "127.0.0.2")],
        &["echo", "spoofed"],
    ))
    .await;
    assert!(!out.status.success(), "a spoofed PROXY header got in");
    assert!(!text(&out.stdout).contains("spoofed"));
    assert!(session_starts(&w)
        .iter()
        .all(|a| !a.starts_with("203.0.113.66")));

    // 4. The PostgreSQL listener consumes exactly the header: the SSLRequest after it is
    // answered; without a header the balancer's connection is closed unanswered.
    let mut c = tokio::net::TcpStream::connect(("127.0.0.1", w.pg_port))
        .await
        .expect("connect");
    let mut first = b"PROXY TCP4 203.0.113.5 127.0.0.1 5555 6432\r\n".to_vec();
    first.extend_from_slice(&8i32.to_be_bytes());
    first.extend_from_slice(&80877103i32.to_be_bytes());
    c.write_all(&first).await.expect("write");
    let mut answer = [0u8; 1];
    tokio::time::timeout(Duration::from_secs(10), c.read_exact(&mut answer))
        .await
        .expect("an answer in time")
        .expect("an answer to the SSLRequest");
    assert!(matches!(answer[0], b'S' | b'N'), "{answer:?}");
    let mut c = tokio::net::TcpStream::connect(("127.0.0.1", w.pg_port))
        .await
        .expect("connect");
    c.write_all(&first[first.len() - 8..]).await.expect("write");
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut rest))
        .await
        .expect("closed in time");
    assert!(
        n.is_err() || rest.is_empty(),
        "answered without a header: {rest:?}"
    );

    // 5. Real HAProxy in front: v2 to the SSH listener, v1 to the HTTP one.
    let (lb_ssh, lb_http) = (free_port(), free_port());
    let cfg = w.path("haproxy.cfg");
    std::fs::write(
        &cfg,
        format!(
            "global\n    maxconn 64\n\
             defaults\n    mode tcp\n    timeout connect 2s\n    timeout client 1m\n    timeout server 1m\n\
             frontend ssh\n    bind 127.0.0.1:{lb_ssh}\n    default_backend ssh\n\
             frontend http\n    bind 127.0.0.1:{lb_http}\n    default_backend http\n\
             backend ssh\n    server gw 127.0.0.1:{} send-proxy-v2\n\
             backend http\n    server gw 127.0.0.1:{} send-proxy\n",
            w.gw_port, w.http_port
        ),
    )
    .expect("haproxy.cfg");
    let mut haproxy = Command::new(require("haproxy", "haproxy"))
        .args(["-db", "-f"])
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(w.path("haproxy.log")).expect("haproxy log"))
        .spawn()
        .expect("start haproxy");
    wait_port(lb_ssh);
    let mut c = Command::new(require("ssh", "openssh-client"));
    c.args(w.ssh_args("alice"))
        .args([
            "-p",
            &lb_ssh.to_string(),
            "web-01@127.0.0.1",
            "echo",
            "via-haproxy",
        ])
        .stdin(Stdio::null());
    let out = output(c).await;
    assert_eq!(
        text(&out.stdout).trim(),
        "via-haproxy",
        "{}",
        text(&out.stderr)
    );
    w.wait_ended(3);
    let starts = session_starts(&w);
    assert!(starts[2].starts_with("127.0.0.1:"), "{starts:?}");
    let out = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "5",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .arg(format!("http://127.0.0.1:{lb_http}/healthz"))
        .output()
        .expect("curl");
    assert_eq!(text(&out.stdout), "200", "{}", text(&out.stderr));
    let _ = haproxy.kill();
    let _ = haproxy.wait();
    gw.stop().await;
    validate_all_events(&w);
}
