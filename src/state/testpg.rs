//! A real PostgreSQL cluster for the store tests: `initdb` once per test process in a temp
//! dir, listening on 127.0.0.1 with a free port, one fresh database per test. The server
//! stops when the test process exits (a shell holding our pipe kills it on EOF).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};

use super::{PgSettings, PgStore, Store};

struct Cluster {
    port: u16,
    /// Held so the watchdog's stdin stays open while the process lives.
    _watchdog: Mutex<Child>,
}

fn pg_bin(name: &str) -> PathBuf {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path().join("bin").join(name))
                .collect()
        })
        .unwrap_or_default();
    found.retain(|p| p.exists());
    found.sort();
    found.pop().unwrap_or_else(|| {
        panic!(
            "`{name}` is missing: install the Debian package `postgresql` (scripts/test.sh does)"
        )
    })
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    // The owner of a file we just made is our effective uid.
    let probe = std::env::temp_dir().join(format!("bg-uid-{}", uuid::Uuid::new_v4().simple()));
    let root = std::fs::write(&probe, b"")
        .and_then(|()| std::fs::metadata(&probe))
        .map(|m| m.uid() == 0)
        .unwrap_or(false);
    let _ = std::fs::remove_file(&probe);
    root
}

/// The command, as the `postgres` user when we are root (initdb refuses root).
fn as_postgres(program: PathBuf) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn start() -> Cluster {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!(
        "breakglass-state-pg-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&dir).expect("pg dir");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let data = dir.join("data");
    let out = as_postgres(pg_bin("initdb"))
        .args([
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
            "-E",
            "UTF8",
            "-D",
        ])
        .arg(&data)
        .output()
        .expect("run initdb");
    assert!(
        out.status.success(),
        "initdb failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let port = free_port();
    // The shell runs postgres in the background and stops it when our end of its stdin
    // closes, which is when this test process exits, however it exits.
    let script = "\"$0\" \"$@\" & pid=$!; read _; kill -INT $pid; wait $pid";
    let watchdog = as_postgres("/bin/sh".into())
        .args(["-c", script])
        .arg(pg_bin("postgres"))
        .arg("-D")
        .arg(&data)
        .args([
            "-p",
            &port.to_string(),
            "-c",
            "listen_addresses=127.0.0.1",
            "-k",
        ])
        .arg(&dir)
        .args(["-c", "fsync=off", "-c", "max_connections=200"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start postgres");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let ok = Command::new("psql")
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"])
            .args(["-d", "postgres", "-XAtc", "SELECT 1"])
            .stdin(Stdio::null())
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if ok {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "postgres did not accept logins within 30 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    Cluster {
        port,
        _watchdog: Mutex::new(watchdog),
    }
}

fn cluster() -> &'static Cluster {
    static C: OnceLock<Cluster> = OnceLock::new();
    C.get_or_init(start)
}

/// The URL of a fresh, empty database in the test cluster.
pub async fn fresh_database() -> String {
    let port = tokio::task::spawn_blocking(|| cluster().port)
        .await
        .expect("start the cluster");
    let name = format!("t_{}", uuid::Uuid::new_v4().simple());
    let (client, conn) = tokio_postgres::connect(
        &format!("host=127.0.0.1 port={port} user=postgres dbname=postgres"),
        tokio_postgres::NoTls,
    )
    .await
    .expect("connect as postgres");
    tokio::spawn(conn);
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .expect("create database");
    format!("host=127.0.0.1 port={port} user=postgres dbname={name}")
}

/// Two stores (two pools: two nodes) on one fresh database.
pub async fn two_nodes() -> ((), Arc<dyn Store>, Arc<dyn Store>) {
    let url = fresh_database().await;
    let settings = PgSettings {
        url,
        tls: None,
        pool_size: 4,
    };
    let a = PgStore::open(&settings).await.expect("open node a");
    let b = PgStore::open(&settings).await.expect("open node b");
    ((), Arc::new(a), Arc::new(b))
}

mod tests {
    crate::state::conformance::suite!(super::two_nodes());

    #[tokio::test]
    async fn migrations_run_once_when_nodes_start_together() {
        let url = super::fresh_database().await;
        let s = super::PgSettings {
            url,
            tls: None,
            pool_size: 2,
        };
        let (a, b, c) = tokio::join!(
            super::PgStore::open(&s),
            super::PgStore::open(&s),
            super::PgStore::open(&s)
        );
        for r in [a, b, c] {
            r.expect("open");
        }
    }

    #[tokio::test]
    async fn a_stopped_server_is_a_clear_error_not_a_hang() {
        let s = super::PgSettings {
            url: format!("host=127.0.0.1 port={} user=postgres", super::free_port()),
            tls: None,
            pool_size: 2,
        };
        let Err(e) = super::PgStore::open(&s).await else {
            panic!("opened a store on a closed port");
        };
        assert!(e.to_string().contains("state store"), "{e}");
    }
}
