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

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
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
    let gw_host = breakglass::keys::openssh_line(gw_keys.host.public_key());
    let gw_host: String = gw_host
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ");
    std::fs::write(
        d.join("known_hosts"),
        format!("[127.0.0.1]:{ssh_port} {gw_host}\n"),
    )?;

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
    let mut child = Command::new(&sshd)
        .args(["-D", "-e", "-f"])
        .arg(&conf)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(d.join("sshd.log"))?)
        .spawn()
        .with_context(|| format!("start {}", sshd.display()))?;
    wait_port(target_port, &mut child)
        .map_err(|e| anyhow!("{e} (see {})", d.join("sshd.log").display()))?;
    let target = Target(child);

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
"#,
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
    let exe = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "breakglass".into());
    let ssh = format!("ssh -F {}/ssh_config", d.display());
    let c = config.display();
    let (bound, serve) = breakglass::server::start(cfg, super::shutdown_signal()).await?;
    println!(
        "breakglass demo: a playground in {} (removed on Ctrl-C)",
        d.display()
    );
    println!(
        "  gateway  ssh {}, web UI http://127.0.0.1:{http_port}",
        bound.ssh
    );
    println!("  target   web-01: a local sshd on 127.0.0.1:{target_port}, login {user}, trusting only the gateway's certificates");
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
    println!();
    println!(
        "Ctrl-C stops the gateway and the target and removes {}.",
        d.display()
    );
    serve.await;
    drop(target);
    let kept = pg.keep;
    drop(pg);
    if kept {
        println!("breakglass demo: stopped; {} kept", d.display());
    } else {
        println!("breakglass demo: stopped; {} removed", d.display());
    }
    Ok(ExitCode::SUCCESS)
}
