//! `breakglass demo`: a self-contained playground in a temp dir. It makes keys for alice (who
//! asks) and bob (who approves), starts a local OpenSSH `sshd` as the target web-01 trusting
//! the gateway's user CA, and runs the gateway on free loopback ports; then it prints the
//! exact commands to try. Ctrl-C stops everything and removes the directory.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};

use anyhow::{anyhow, bail, Context, Result};
use breakglass::config::Config;

/// The playground's directory, removed when dropped (unless kept).
struct Playground {
    dir: PathBuf,
    keep: bool,
}

impl Drop for Playground {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The target's sshd, stopped when dropped.
struct Target(Child);

/// The PostgreSQL target; its postmaster is signalled itself when dropped, since `runuser`
/// (the child when the demo runs as root) passes no signal on.
struct PgTarget {
    child: Child,
    data: PathBuf,
}

impl Drop for PgTarget {
    fn drop(&mut self) {
        let pid = std::fs::read_to_string(self.data.join("postmaster.pid"))
            .ok()
            .and_then(|t| t.lines().next().map(str::to_string));
        if let Some(pid) = pid {
            let _ = Command::new("kill").args(["-INT", &pid]).status();
            for _ in 0..100 {
                if !self.data.join("postmaster.pid").exists() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A port nothing listens on, below Linux's ephemeral range (32768 and up) so that no
/// outgoing connection on this host takes it between this check and the bind that follows.
/// Each call gives a port not given before.
fn free_port() -> Result<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        uuid::Uuid::new_v4().as_u128() as u32 % SPAN,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..SPAN {
        let port = (LOW + NEXT.fetch_add(1, Ordering::SeqCst) % SPAN) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free port on 127.0.0.1 between {LOW} and {}", LOW + SPAN)
}

fn sshd_path() -> Result<PathBuf> {
    for p in ["/usr/sbin/sshd", "/usr/local/sbin/sshd", "/sbin/sshd"] {
        if Path::new(p).exists() {
            return Ok(PathBuf::from(p));
        }
    }
    bail!("the demo's target is a local OpenSSH sshd, and none is installed: apt install openssh-server")
}

/// The login name the target's sshd lets in: whoever runs the demo.
fn current_user() -> Result<String> {
    let out = Command::new("id").arg("-un").output().context("id -un")?;
    let name = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if name.is_empty() {
        bail!("cannot tell who runs the demo (id -un)");
    }
    Ok(name)
}

fn key(path: &Path, comment: &str) -> Result<String> {
    let k = breakglass::keys::load_or_create(path, comment)?;
    Ok(breakglass::keys::openssh_line(k.public_key()))
}

/// The newest Debian `initdb`, when PostgreSQL's server package is installed.
fn pg_bin(name: &str) -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("bin").join(name))
        .filter(|p| p.exists())
        .collect();
    found.sort();
    found.pop()
}

/// `program` as the `postgres` user when we are root (initdb refuses root).
fn as_postgres(program: &Path, root: bool) -> Command {
    if root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

/// A PostgreSQL cluster for the `orders-db` target: initdb in `dir/pg`, on `port`, with the
/// break-glass role `bg_dba` (its password `password`). The server stops when dropped.
fn start_postgres(d: &Path, port: u16, password: &str) -> Result<PgTarget> {
    use std::os::unix::fs::PermissionsExt;
    let (initdb, postgres) = match (pg_bin("initdb"), pg_bin("postgres")) {
        (Some(i), Some(p)) => (i, p),
        _ => bail!("no initdb"),
    };
    let root = current_user()? == "root";
    let dir = d.join("pg");
    std::fs::create_dir_all(&dir)?;
    std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755))?;
    let superuser = uuid::Uuid::new_v4().simple().to_string();
    {
        // Readable by its owner only, and gone once initdb read it.
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(dir.join("pwfile"))?;
        f.write_all(superuser.as_bytes())?;
    }
    if root {
        let _ = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(&dir)
            .status();
    }
    let out = as_postgres(&initdb, root)
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
        .arg(dir.join("pwfile"))
        .arg("-D")
        .arg(dir.join("data"))
        .output()?;
    let _ = std::fs::remove_file(dir.join("pwfile"));
    if !out.status.success() {
        bail!("initdb: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    let mut child = as_postgres(&postgres, root)
        .arg("-D")
        .arg(dir.join("data"))
        .args([
            "-p",
            &port.to_string(),
            "-c",
            "listen_addresses=127.0.0.1",
            "-k",
        ])
        .arg(&dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(d.join("postgres.log"))?)
        .spawn()?;
    let waited = wait_port(port, &mut child);
    let target = PgTarget {
        child,
        data: dir.join("data"),
    };
    waited?;
    // The port opens a moment before logins work.
    // Narrower than a superuser, as README advises: it reads every table, sees every
    // backend, and cancels or terminates them, which is what most incidents call for.
    let sql = format!(
        "CREATE ROLE bg_dba LOGIN PASSWORD '{password}' IN ROLE pg_read_all_data, pg_monitor, pg_signal_backend"
    );
    let url =
        format!("host=127.0.0.1 port={port} user=postgres password={superuser} dbname=postgres");
    let mut last = String::new();
    for _ in 0..100 {
        match run_sql(&url, &sql) {
            Ok(()) => return Ok(target),
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    bail!("the demo's PostgreSQL does not accept logins: {last}")
}

/// Runs one statement (on its own runtime: called before the gateway's starts).
fn run_sql(url: &str, sql: &str) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
        let task = tokio::spawn(conn);
        client.batch_execute(sql).await?;
        drop(client);
        let _ = task.await;
        Ok::<(), tokio_postgres::Error>(())
    })?;
    Ok(())
}

/// Waits until something accepts on `port` (the target's sshd), at most 10 s.
fn wait_port(port: u16, child: &mut Child) -> Result<()> {
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!("the target's sshd exited at start ({status})");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    bail!("the target's sshd is not listening on {port}")
}

/// Ctrl-C, SIGTERM, or SIGHUP (the terminal that ran the demo closed): each ends the demo
/// and removes the playground.
async fn stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let hup = signal(SignalKind::hangup());
    match hup {
        Ok(mut hup) => {
            tokio::select! {
                _ = super::shutdown_signal() => {}
                _ = hup.recv() => {}
            }
        }
        Err(_) => super::shutdown_signal().await,
    }
}

pub(super) async fn demo(dir: Option<PathBuf>, keep: bool) -> Result<ExitCode> {
    let sshd = sshd_path()?;
    let user = current_user()?;
    let dir = match dir {
        Some(d) => d,
        None => std::env::temp_dir().join(format!(
            "breakglass-demo-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        )),
    };
    if dir.exists() && std::fs::read_dir(&dir)?.next().is_some() {
        bail!(
            "{} is not empty: the demo starts from nothing",
            dir.display()
        );
    }
    std::fs::create_dir_all(&dir)?;
    let pg = Playground {
        dir: dir.clone(),
        keep,
    };
    let d = pg.dir.canonicalize()?;
    let (ssh_port, http_port, target_port) = (free_port()?, free_port()?, free_port()?);
    let (pg_listen, pg_target) = (free_port()?, free_port()?);

    // People and the gateway's identity.
    key(&d.join("alice"), "alice@breakglass-demo")?;
    key(&d.join("bob"), "bob@breakglass-demo")?;
    let keys_dir = d.join("data/keys");
    let gw_keys = breakglass::keys::GatewayKeys::load_or_create(&keys_dir)?;
    let ca_pub = d.join("user_ca.pub");
    std::fs::write(
        &ca_pub,
        format!(
            "{}\n",
            breakglass::keys::openssh_line(gw_keys.user_ca.public_key())
        ),
    )?;
    let line = super::known_hosts_line(
        "127.0.0.1",
        ssh_port,
        &breakglass::keys::openssh_line(gw_keys.host.public_key()),
    );
    std::fs::write(d.join("known_hosts"), format!("{line}\n"))?;

    // The target: a local sshd that trusts only the gateway's user CA.
    key(&d.join("target_host_key"), "web-01@breakglass-demo")?;
    let conf = d.join("sshd_config");
    std::fs::write(
        &conf,
        format!(
            "Port {target_port}\nListenAddress 127.0.0.1\nHostKey {host}\nTrustedUserCAKeys {ca}\n\
             AuthorizedKeysFile none\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
             PidFile {pid}\nStrictModes no\nUsePAM no\nPermitRootLogin prohibit-password\n\
             Subsystem sftp internal-sftp\nPrintMotd no\n",
            host = d.join("target_host_key").display(),
            ca = ca_pub.display(),
            pid = d.join("sshd.pid").display(),
        ),
    )?;
    // sshd's privilege separation directory, which a fresh machine may lack.
    let _ = std::fs::create_dir_all("/run/sshd");
    let child = Command::new(&sshd)
        .args(["-D", "-e", "-f"])
        .arg(&conf)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(d.join("sshd.log"))?)
        .spawn()
        .with_context(|| format!("start {}", sshd.display()))?;
    let mut target = Target(child);
    // Held first, so a target that fails to come up is stopped all the same.
    wait_port(target_port, &mut target.0)
        .map_err(|e| anyhow!("{e} (see {})", d.join("sshd.log").display()))?;

    // A PostgreSQL target too, when the server is installed.
    let pg_password = uuid::Uuid::new_v4().simple().to_string();
    let postgres = if pg_bin("initdb").is_some() {
        // Blocking work (initdb, the first login) off the async runtime.
        let (dd, pw) = (d.clone(), pg_password.clone());
        match tokio::task::spawn_blocking(move || start_postgres(&dd, pg_target, &pw)).await? {
            Ok(t) => Some(t),
            Err(e) => {
                eprintln!(
                    "breakglass demo: no PostgreSQL target ({e:#}); see {}",
                    d.join("postgres.log").display()
                );
                None
            }
        }
    } else {
        None
    };
    let pg_config = if postgres.is_some() {
        format!(
            r#"
[[targets]]
name = "orders-db"
protocol = "postgres"
address = "127.0.0.1:{pg_target}"
database = "postgres"
login = "bg_dba"
approvers = ["bob"]
"#
        )
    } else {
        String::new()
    };

    // The gateway's config.
    let config = d.join("breakglass.toml");
    std::fs::write(
        &config,
        format!(
            r#"# breakglass demo playground: removed when the demo stops.
data_dir = "{d}/data"

[listeners]
ssh = "127.0.0.1:{ssh_port}"
http = "127.0.0.1:{http_port}"
postgres = "127.0.0.1:{pg_listen}"

[[people]]
name = "alice"
ssh_key_files = ["{d}/alice.pub"]
roles = ["engineer"]

[[people]]
name = "bob"
ssh_key_files = ["{d}/bob.pub"]
roles = ["engineer", "reviewer"]

[[targets]]
name = "web-01"
address = "127.0.0.1:{target_port}"
host_key_file = "{d}/target_host_key.pub"
login = "{user}"
approvers = ["bob"]
{pg_config}"#,
            d = d.display()
        ),
    )?;
    let entry = |host: &str, login: &str, who: &str| {
        format!(
            "Host {host}\n  HostName 127.0.0.1\n  Port {ssh_port}\n  User {login}\n  IdentityFile {d}/{who}\n  IdentitiesOnly yes\n  UserKnownHostsFile {d}/known_hosts\n  StrictHostKeyChecking yes\n\n",
            d = d.display()
        )
    };
    std::fs::write(
        d.join("ssh_config"),
        entry("alice", "breakglass", "alice")
            + &entry("bob", "breakglass", "bob")
            + &entry("alice-web-01", "web-01", "alice"),
    )?;

    let cfg = Config::load(&config)?;
    if postgres.is_some() {
        // The break-glass role's first password, encrypted in the vault (`vault set`).
        let kek = breakglass::vault::kek(&cfg.kek)?;
        let store = breakglass::state::open(&cfg.state).await?;
        let blob = kek.seal(
            "orders-db",
            &breakglass::vault::Secret::new(pg_password.clone()),
        )?;
        store
            .vault_put("orders-db", "current", &blob, breakglass::clock::now())
            .await?;
    }
    let exe = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "breakglass".into());
    let ssh = format!("ssh -F {}/ssh_config", d.display());
    let c = config.display();
    let (bound, serve) = breakglass::server::start(cfg, stop_signal()).await?;
    println!(
        "breakglass demo: a playground in {} (removed on Ctrl-C)",
        d.display()
    );
    println!(
        "  gateway  ssh {}, web UI http://127.0.0.1:{http_port}",
        bound.ssh
    );
    println!("  target   web-01: a local sshd on 127.0.0.1:{target_port}, login {user}, trusting only the gateway's certificates");
    if postgres.is_some() {
        println!("  target   orders-db: a local PostgreSQL on 127.0.0.1:{pg_target}, role bg_dba (its password is in the vault and rotates after each grant); the gateway's PostgreSQL listener is 127.0.0.1:{pg_listen}");
    }
    println!(
        "  people   alice asks ({}/alice), bob approves ({}/bob)",
        d.display(),
        d.display()
    );
    println!();
    println!("Try, in another terminal:");
    println!("  1. alice asks for access (the answer names the request, R-…):");
    println!("     $ {ssh} alice request web-01 --reason disk full --incident DEMO-1 --for 15m");
    println!("  2. bob approves it (two people, always):");
    println!("     $ {ssh} bob approve R-ID");
    println!("  3. alice reaches web-01 through the gateway; everything is recorded:");
    println!("     $ {ssh} alice-web-01 'echo hello from web-01; id -un'");
    println!("     (or `{ssh} alice-web-01` for a shell)");
    println!("  4. the record: list, replay, verify:");
    println!("     $ {exe} sessions list --config {c}");
    println!("     $ {exe} replay SESSION --config {c}");
    println!("     $ {exe} verify --all --config {c}");
    println!("  5. the web UI: a single-use login link for bob, then open it:");
    println!("     $ {ssh} bob login");
    if postgres.is_some() {
        println!("  6. psql through the gateway to orders-db (a local PostgreSQL): request, approve, fetch the one-time password, connect:");
        println!(
            "     $ {ssh} alice request orders-db --reason slow query --incident DEMO-2 --for 15m"
        );
        println!("     $ {ssh} bob approve R-ID");
        println!("     $ {ssh} alice credential R-ID");
        println!("     $ PGPASSWORD=THE_ONE_TIME_PASSWORD psql \"host=127.0.0.1 port={pg_listen} user=alice dbname=orders-db sslmode=disable\" -c 'select 40+2'");
    } else {
        println!("  (no PostgreSQL target: install postgresql for one)");
    }
    println!();
    println!(
        "Ctrl-C stops the gateway and the target and removes {}.",
        d.display()
    );
    serve.await;
    drop(target);
    drop(postgres);
    let kept = pg.keep;
    drop(pg);
    if kept {
        println!("breakglass demo: stopped; {} kept", d.display());
    } else {
        println!("breakglass demo: stopped; {} removed", d.display());
    }
    Ok(ExitCode::SUCCESS)
}
