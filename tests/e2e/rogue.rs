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

/// Serves `n` connections as a TLS PostgreSQL server (with `cert`/`key`) that offers only
/// plain SCRAM-SHA-256, as a man in the middle that strips -PLUS would. Returns, per
/// connection, the first message the gateway sent after its startup packet (empty when it
/// closed without sending any).
async fn plain_scram_target(
    listener: TcpListener,
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
    n: usize,
) -> Vec<Vec<u8>> {
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    let certs: Vec<_> = rustls::pki_types::CertificateDer::pem_file_iter(&cert)
        .expect("cert")
        .collect::<Result<_, _>>()
        .expect("cert");
    let key = rustls::pki_types::PrivateKeyDer::from_pem_file(&key).expect("key");
    let cfg = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocols")
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(cfg));
    let mut got = Vec::new();
    for _ in 0..n {
        let (mut s, _) = listener.accept().await.expect("accept");
        let mut ssl = [0u8; 8];
        s.read_exact(&mut ssl).await.expect("SSLRequest");
        assert_eq!(&ssl[4..], &80877103i32.to_be_bytes(), "an SSLRequest first");
        s.write_all(b"S").await.expect("S");
        let mut s = acceptor.accept(s).await.expect("TLS handshake");
        let mut len = [0u8; 4];
        s.read_exact(&mut len).await.expect("startup length");
        let mut startup = vec![0u8; (i32::from_be_bytes(len) as usize).saturating_sub(4)];
        s.read_exact(&mut startup).await.expect("startup packet");
        let body = b"\0\0\0\x0aSCRAM-SHA-256\0\0";
        let mut ask = vec![b'R'];
        ask.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        ask.extend_from_slice(body);
        s.write_all(&ask).await.expect("offer SCRAM-SHA-256");
        s.flush().await.expect("flush");
        // One message, or the close: a bounded wait, so that a gateway that neither answers
        // nor closes fails the test rather than hanging it.
        let mut first = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(20), async {
            let mut head = [0u8; 5];
            if s.read_exact(&mut head).await.is_err() {
                return;
            }
            let len = i32::from_be_bytes([head[1], head[2], head[3], head[4]]);
            let mut rest = vec![0u8; (len as usize).saturating_sub(4).min(1 << 16)];
            if s.read_exact(&mut rest).await.is_ok() {
                first.extend_from_slice(&head);
                first.extend_from_slice(&rest);
            }
        })
        .await;
        assert!(read.is_ok(), "the gateway neither answered nor closed");
        got.push(first);
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_tls_a_target_that_offers_no_scram_plus_is_refused_unless_it_is_preferred() {
    let tls = tempfile::tempdir().expect("tempdir");
    let (cert, key) = self_signed_cert(tls.path());
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    // Relay and `vault verify` on the strict target, then the relay on the lenient one.
    let rogue = tokio::spawn(plain_scram_target(listener, cert.clone(), key, 3));
    let target = |name: &str, extra: &str| {
        format!(
            "[[targets]]\nname = \"{name}\"\nprotocol = \"postgres\"\naddress = \"127.0.0.1:{port}\"\nlogin = \"bg_dba\"\napprovers = [\"bob\"]\ntls = \"verify-full\"\nca_file = \"{}\"\n{extra}\n",
            cert.display()
        )
    };
    let more = target("stripped-db", "") + &target("proxied-db", "channel_binding = \"prefer\"");
    let (_pg, _pgdir, w, gw, _certs) = super::pg::pg_world_with(super::pg::PgOpts {
        client_tls: true,
        more: &more,
        vault: &[
            ("stripped-db", "strip-vault-secret"),
            ("proxied-db", "proxy-vault-secret"),
        ],
        ..Default::default()
    })
    .await;
    let (_req, secret) = super::pg::pg_credential_for(&w, "stripped-db", "30m").await;
    let out = output(super::pg::psql_cmd_to(
        &w,
        "stripped-db",
        &secret,
        "select 1",
    ))
    .await;
    assert!(!out.status.success(), "psql got in without channel binding");
    let err = text(&out.stderr);
    assert!(err.contains("offers no SCRAM-SHA-256-PLUS"), "{err}");
    let out = w.cli(&["vault", "verify", "stripped-db"]);
    assert!(
        !out.status.success(),
        "vault verify logged in without -PLUS"
    );
    let err = text(&out.stderr) + &text(&out.stdout);
    assert!(err.contains("channel binding"), "{err}");
    // `prefer`: the gateway answers with plain SCRAM, saying it could have bound (`y,,`).
    let (_req, secret) = super::pg::pg_credential_for(&w, "proxied-db", "30m").await;
    let out = output(super::pg::psql_cmd_to(
        &w,
        "proxied-db",
        &secret,
        "select 1",
    ))
    .await;
    assert!(
        !out.status.success(),
        "the fake target never lets anyone in"
    );
    let got = rogue.await.expect("rogue target");
    assert_eq!(got.len(), 3);
    for (i, first) in got[..2].iter().enumerate() {
        assert!(
            first.is_empty(),
            "connection {i}: the gateway answered a stripped offer with {:?}",
            String::from_utf8_lossy(first)
        );
    }
    let answer = String::from_utf8_lossy(&got[2]).into_owned();
    assert!(
        got[2].first() == Some(&b'p')
            && answer.contains("SCRAM-SHA-256\0")
            && answer.contains("y,,"),
        "{answer:?}"
    );
    gw.stop().await;
}
