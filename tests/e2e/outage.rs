//! A store outage that ends a session: its spooled chunks go up and its recording is sealed
//! (signed, chain head to the SIEM) by the running gateway as soon as the store is back — not
//! at the next restart, and never left unsealed with a tail anyone could cut unnoticed.

use std::time::Duration;

use crate::support::*;

/// A gateway (with `extra_config`) whose one long session has stored at least `chunks` chunks;
/// returns it with the session's ssh, its recording prefix and dir, and the chunk count.
async fn long_session(
    extra_config: &str,
    chunks: usize,
) -> (
    World,
    InProcess,
    std::process::Child,
    String,
    std::path::PathBuf,
    usize,
) {
    let w = World::with(Opts {
        extra_limits:
            "flush_interval = \"100ms\"\nstorage_grace = \"1s\"\ncheckpoint_interval = \"300ms\""
                .into(),
        extra_config: extra_config.into(),
        ..Default::default()
    });
    let gw = InProcess::start(&w).await;
    w.grant("alice", "30m");
    let child = start_long_session(
        &w,
        &[],
        "i=0; while true; do i=$((i+1)); echo tick-$i; sleep 0.05; done",
    );
    let prefix = w.sessions()[0]["recording"]
        .as_str()
        .expect("prefix")
        .to_string();
    let dir = w.path("data/recordings").join(&prefix);
    let chdir = dir.join("ch0000");
    let stored = wait_for("stored chunks", Duration::from_secs(10), || {
        let n = stored_chunks(&chdir)?;
        (n >= chunks).then_some(n)
    });
    (w, gw, child, prefix, dir, stored)
}

/// Stored chunks in a channel directory, not counting the store's in-flight staging files
/// (`NAME#N`, renamed into place when complete), which a moved directory may lose.
fn stored_chunks(dir: &std::path::Path) -> Option<usize> {
    Some(
        std::fs::read_dir(dir)
            .ok()?
            .flatten()
            .filter(|e| !e.file_name().to_string_lossy().contains('#'))
            .count(),
    )
}

/// The outage: the channel's directory is replaced by a file, so every write fails; the
/// session ends fail-closed. Returns where the directory went.
fn block_store(dir: &std::path::Path, child: &mut std::process::Child) -> std::path::PathBuf {
    let chdir = dir.join("ch0000");
    let away = dir.join("ch0000.away");
    std::fs::rename(&chdir, &away).expect("move the channel dir away");
    std::fs::write(&chdir, b"blocked").expect("block the path");
    let (code, _out, err) = wait_exit(child, Duration::from_secs(15));
    assert_ne!(code, Some(0));
    assert!(err.contains("recording failed"), "{err}");
    away
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_ended_by_a_store_outage_is_sealed_once_the_store_is_back() {
    let (w, gw, mut child, prefix, dir, stored_before) = long_session("", 3).await;
    let id = last_session_id(&w);
    let chdir = dir.join("ch0000");
    let away = block_store(&dir, &mut child);
    let end = w.wait_event("the failed end", |e| e["action"] == "session_end");
    assert_eq!(end["reason"], "recording_failed");
    assert!(end["chain_head"].is_null(), "not sealed yet: {end}");
    assert!(!dir.join("session.json").exists());
    let spooled = w.path("data/spool").join(&prefix).join("ch0000");
    // Chunks only: each spooled chunk has its `.mac` tag beside it.
    let waiting = std::fs::read_dir(&spooled)
        .map(|r| {
            r.flatten()
                .filter(|e| {
                    e.path()
                        .extension()
                        .is_none_or(|x| x != "mac" && x != "spooling")
                })
                .count()
        })
        .unwrap_or(0);
    assert!(waiting >= 1, "the outage's data waits in the spool");

    // The store comes back; the running gateway uploads the spool and seals the session.
    let stored = stored_chunks(&away).unwrap_or(0);
    assert!(stored >= stored_before);
    std::fs::remove_file(&chdir).expect("unblock");
    std::fs::rename(&away, &chdir).expect("move the channel dir back");
    wait_for("the late seal", Duration::from_secs(20), || {
        dir.join("session.json.sig").exists().then_some(())
    });
    let meta = session_meta(&w, &id);
    assert_eq!(meta["recovered"], true, "{meta}");
    let objects = meta["objects"].as_array().expect("objects").len();
    assert!(
        objects >= stored + waiting,
        "the spooled chunks are adopted: {objects} objects, {stored} stored before the outage and {waiting} spooled"
    );
    assert!(meta["missing"].is_null(), "nothing missing: {meta}");
    let head = meta["chain_head"].as_str().expect("head").to_string();
    w.wait_event("the sealed chain head in the SIEM", |e| {
        e["action"] == "recording_checkpoint"
            && e["session_id"] == id.as_str()
            && e["chain_head"] == head.as_str()
    });
    assert_eq!(
        std::fs::read_dir(&spooled).map(|r| r.count()).unwrap_or(0),
        0,
        "the spool is drained"
    );
    gw.stop().await;

    let out = w.cli(&["verify", &id]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "INCOMPLETE, nothing tampered: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    // The tail written during the outage is in the export.
    let cast = export(&w, &id);
    let last = cast
        .lines()
        .filter_map(|l| l.split("tick-").nth(1))
        .filter_map(|t| {
            t.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse::<u32>()
                .ok()
        })
        .max()
        .expect("ticks in the export");
    assert!(last > 10, "the export runs to tick {last}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_spool_key_the_outage_spool_is_neither_uploaded_nor_sealed() {
    // The vault's key comes from an environment variable nobody sets, so the spool key
    // cannot load: the spool cannot be authenticated.
    let (w, gw, mut child, prefix, dir, _) = long_session(
        "[vault]\nkek_env = \"BREAKGLASS_TEST_KEK_NOBODY_SETS\"\n",
        1,
    )
    .await;
    let chdir = dir.join("ch0000");
    let away = block_store(&dir, &mut child);
    w.wait_event("the failed end", |e| e["action"] == "session_end");
    let spooled = w.path("data/spool").join(&prefix).join("ch0000");
    let count = || std::fs::read_dir(&spooled).map(|r| r.count()).unwrap_or(0);
    let waiting = count();
    assert!(waiting >= 1, "the outage's data waits in the spool");
    std::fs::remove_file(&chdir).expect("unblock");
    std::fs::rename(&away, &chdir).expect("move the channel dir back");
    gw.stop().await;
    // A start runs the spool drain and late sealing once before it serves: without the key
    // it uploads nothing and seals nothing.
    let gw = InProcess::start(&w).await;
    assert_eq!(count(), waiting, "the spool is kept whole");
    assert!(
        !dir.join("session.json.sig").exists(),
        "sealed from an unauthenticated spool"
    );
    gw.stop().await;
}
