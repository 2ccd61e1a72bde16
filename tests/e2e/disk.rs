//! A full disk: the data dir sits on a small tmpfs; a session that writes more than fits ends
//! fail-closed naming the disk, new sessions are refused clearly, the state file and the SIEM
//! spool stay consistent, and once space is freed the gateway serves again without a restart
//! and seals the cut recording late.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::*;

/// Mounts a tmpfs of `mib` MiB at `dir` (the test runs as root, as CI does) and returns a guard
/// that unmounts it.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &std::path::Path, mib: u32) -> Tmpfs {
        std::fs::create_dir_all(dir).expect("mount point");
        let out = Command::new(require("mount", "mount"))
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={mib}m,mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "the full-disk test mounts a tmpfs and needs root (CAP_SYS_ADMIN): {}",
            text(&out.stderr)
        );
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    let out = Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", from.display()))
        .arg(to)
        .output()
        .expect("cp");
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_data_disk_ends_the_session_fail_closed_and_the_gateway_recovers_without_a_restart()
{
    let t0 = std::time::Instant::now();
    let w = World::with(Opts {
        extra_limits: "flush_interval = \"100ms\"\nstorage_grace = \"1s\"".into(),
        ..Default::default()
    });
    // The data dir (state, SIEM spool and file, recordings) moves onto a 24 MiB tmpfs, with
    // 6 MiB of ballast that the test frees later.
    let data = w.path("data");
    let orig = w.path("data.orig");
    std::fs::rename(&data, &orig).expect("move data");
    let _disk = Tmpfs::mount(&data, 24);
    copy_dir(&orig, &data);
    let ballast = data.join("ballast");
    std::fs::write(&ballast, vec![0u8; 6 << 20]).expect("ballast");
    let gw = InProcess::start(&w).await;
    w.grant("alice", "30m");
    // A session that prints far more than fits (random, so it does not compress away).
    let mut child = w
        .ssh(
            "alice",
            "web-01",
            &[],
            &["head -c 64000000 /dev/urandom | base64"],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ssh");
    let status = wait_for("the session to end", Duration::from_secs(60), || {
        child.try_wait().expect("try_wait")
    });
    let mut err = String::new();
    use std::io::Read;
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut err)
        .ok();
    eprintln!(
        "[{:?}] the session ended ({status}): {}",
        t0.elapsed(),
        err.trim()
    );
    assert!(!status.success());
    assert!(
        err.contains("recording failed") && err.contains("No space left on device"),
        "the session ends fail-closed naming the disk: {err}"
    );
    let first = last_session_id(&w);
    let df = Command::new("df").arg(&data).output().expect("df");
    eprintln!("{}", text(&df.stdout));
    // A new session while the disk is full is refused, naming the disk.
    let out = output(w.ssh("alice", "web-01", &[], &["echo second"])).await;
    let said = text(&out.stderr);
    eprintln!("[{:?}] a second session: {}", t0.elapsed(), said.trim());
    assert!(!text(&out.stdout).contains("second"), "ran unrecorded");
    assert!(
        said.contains("session refused") && said.contains("No space left on device"),
        "{said}"
    );
    // Space comes back: the gateway serves again, without a restart.
    std::fs::remove_file(&ballast).expect("free the ballast");
    let out = output(w.ssh("alice", "web-01", &[], &["echo third-$((6*7))"])).await;
    eprintln!("[{:?}] a third session after freeing space", t0.elapsed());
    assert!(
        text(&out.stdout).contains("third-42"),
        "after space is freed: {}",
        text(&out.stderr)
    );
    // Everything the gateway spooled reaches the SIEM file: the first session's start and its
    // fail-closed end, the refusal, the third session.
    let end = w.wait_event("the first session's end", |e| {
        e["action"] == "session_end" && e["session_id"] == first.as_str()
    });
    assert_eq!(end["reason"], "recording_failed", "{end}");
    assert!(
        end["message"]
            .as_str()
            .is_some_and(|m| m.contains("No space left on device")),
        "{end}"
    );
    w.wait_event("the refusal", |e| {
        e["action"] == "session_denied"
            && e["message"]
                .as_str()
                .is_some_and(|m| m.contains("No space left"))
    });
    w.wait_ended(2);
    // Once space is back the first session's recording is sealed late, from the evidence
    // ledger (what it stored before the disk filled), and its chain head reaches the SIEM.
    let sealed = w.wait_event("the first session's late seal", |e| {
        e["action"] == "recording_checkpoint"
            && e["session_id"] == first.as_str()
            && e["message"]
                .as_str()
                .is_some_and(|m| m.contains("sealed from the evidence ledger"))
    });
    eprintln!("[{:?}] sealed late: {sealed}", t0.elapsed());
    eprintln!("[{:?}] stopping", t0.elapsed());
    gw.stop().await;
    eprintln!("[{:?}] stopped", t0.elapsed());
    // The state file is whole.
    let db = rusqlite::Connection::open(data.join("state.sqlite")).expect("open the state file");
    let check: String = db
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .expect("integrity_check");
    assert_eq!(check, "ok");
    let out = w.cli(&["verify", &first]);
    eprintln!(
        "verify {first}: {:?} {}",
        out.status.code(),
        text(&out.stdout).trim()
    );
    assert_eq!(
        out.status.code(),
        Some(2),
        "a recording cut by a full disk is INCOMPLETE, never OK"
    );
    let said = text(&out.stdout);
    assert!(
        said.contains("ended with recording_failed")
            && said.contains("sealed what was stored once the store was back"),
        "{said}"
    );
    validate_all_events(&w);
}
