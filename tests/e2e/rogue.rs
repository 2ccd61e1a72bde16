//! A rogue PostgreSQL target: whatever listens at a target's address and asks for the
//! password itself (cleartext, then md5) gets nothing, from the relay's login or from
//! rotation's (`vault verify`).

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::support::*;

/// Serves one connection per entry of `asks` (an authentication request code): reads the
/// startup packet, asks, and returns every byte the gateway sent after the startup packet
/// until it closed the connection.
async fn rogue_target(listener: TcpListener, asks: Vec<i32>) -> Vec<(i32, Vec<u8>)> {
    let mut got = Vec::new();
    for code in asks {
        let (mut s, _) = listener.accept().await.expect("accept");
        let mut len = [0u8; 4];
        s.read_exact(&mut len).await.expect("startup length");
        let mut startup = vec![0u8; (i32::from_be_bytes(len) as usize).saturating_sub(4)];
        s.read_exact(&mut startup).await.expect("startup packet");
        let mut ask = vec![b'R'];
        let mut body = code.to_be_bytes().to_vec();
        if code == 5 {
            body.extend_from_slice(b"salt");
        }
        ask.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        ask.extend_from_slice(&body);
        s.write_all(&ask).await.expect("ask for the password");
        let mut after = Vec::new();
        // Until the gateway closes (a bounded wait, so that a gateway that stays connected
        // fails the test rather than hanging it).
        let read = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut after)).await;
        assert!(read.is_ok(), "the gateway kept the rogue connection open");
        got.push((code, after));
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rogue_target_asking_for_a_cleartext_or_md5_password_gets_nothing() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let rogue = tokio::spawn(rogue_target(listener, vec![3, 5, 3, 5]));
    let more = format!(
        "[[targets]]\nname = \"rogue-db\"\nprotocol = \"postgres\"\naddress = \"127.0.0.1:{port}\"\nlogin = \"bg_dba\"\napprovers = [\"bob\"]\n"
    );
    let (_pg, _pgdir, w, gw, _certs) = super::pg::pg_world_with(super::pg::PgOpts {
        client_tls: true,
        more: &more,
        vault: &[("rogue-db", "rogue-vault-secret")],
        ..Default::default()
    })
    .await;
    let (_req, secret) = super::pg::pg_credential_for(&w, "rogue-db", "30m").await;
    for what in ["cleartext", "md5"] {
        let out = output(super::pg::psql_cmd_to(&w, "rogue-db", &secret, "select 1")).await;
        assert!(!out.status.success(), "psql got in through a rogue target");
        let err = text(&out.stderr);
        eprintln!("psql via the relay, target asks for {what}: {}", err.trim());
        assert!(
            err.contains(&format!("asked for a {what}"))
                || err.contains(&format!("asked for an {what}")),
            "{err}"
        );
    }
    // Rotation's login (tokio-postgres under the guard), as `vault verify` runs it.
    for what in ["cleartext", "md5"] {
        let out = w.cli(&["vault", "verify", "rogue-db"]);
        assert!(
            !out.status.success(),
            "vault verify logged in to a rogue target"
        );
        let err = text(&out.stderr) + &text(&out.stdout);
        eprintln!("vault verify, target asks for {what}: {}", err.trim());
        assert!(err.contains(what), "{err}");
    }
    let got = rogue.await.expect("rogue target");
    for (code, after) in got {
        assert!(
            after.is_empty(),
            "the gateway answered request {code} with {} bytes: {:?}",
            after.len(),
            String::from_utf8_lossy(&after)
        );
    }
    gw.stop().await;
}
