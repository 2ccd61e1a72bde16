//! The recording store: a failing store, `verify` against every kind of tampering, a short
//! outage, S3 with Object Lock, and a crash during an outage.

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_failure_refuses_new_sessions_and_ends_live_ones() {
    let w = World::with(Opts {
        extra_limits: "storage_grace = \"1s\"".into(),
        ..Default::default()
    });
    let gw = InProcess::start(&w).await;
    w.grant("alice", "30m");

    // A live session whose recording directory disappears and is replaced by a file.
    let mut child = start_long_session(&w, &[], "while true; do echo tick; sleep 0.05; done");
    let prefix = w.sessions()[0]["recording"]
        .as_str()
        .expect("prefix")
        .to_string();
    let dir = w.path("data/recordings").join(&prefix);
    std::fs::remove_dir_all(&dir).expect("remove session dir");
    std::fs::write(&dir, b"blocked").expect("block the path");
    let (code, _out, err) = wait_exit(&mut child, Duration::from_secs(10));
    assert_ne!(code, Some(0));
    assert!(
        err.contains("recording failed"),
        "the user is told why: {err}"
    );
    let ev = w.wait_event("end event", |e| e["action"] == "session_end");
    assert_eq!(ev["outcome"], "failure");
    assert_eq!(ev["reason"], "recording_failed");

    // New sessions are refused while the store is unusable.
    let sessions_dir = w.path("data/recordings/sessions");
    std::fs::remove_dir_all(&sessions_dir).expect("remove store dir");
    std::fs::write(&sessions_dir, b"blocked").expect("block the store");
    let out = output(w.ssh("alice", "web-01", &[], &["echo should-not-run"])).await;
    assert!(!text(&out.stdout).contains("should-not-run"));
    assert!(
        text(&out.stderr).contains("never run unrecorded"),
        "{}",
        text(&out.stderr)
    );
    w.wait_event("recording denial", |e| {
        e["reason"] == "recording_unavailable"
    });
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_detects_every_kind_of_tampering() {
    let w = World::with(Opts {
        extra_limits: "flush_interval = \"100ms\"".into(),
        ..Default::default()
    });
    let gw = InProcess::start(&w).await;
    w.grant("alice", "30m");
    let out = output(w.ssh(
        "alice",
        "web-01",
        &[],
        &["for i in $(seq 1 30); do echo line-$i; sleep 0.03; done"],
    ))
    .await;
    assert!(out.status.success());
    w.wait_ended(1);
    gw.stop().await;
    let id = last_session_id(&w);
    let prefix = w.sessions()[0]["recording"]
        .as_str()
        .expect("prefix")
        .to_string();

    // Online: OK.
    let out = w.cli(&["verify", &id]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(text(&out.stdout).contains("OK"), "{}", text(&out.stdout));

    // Offline, with only the public keys and a copy of the store.
    let keys = w.path("signing.pub");
    std::fs::write(&keys, w.cli_ok(&["keys", "show", "--signing"])).expect("keys");
    let chunks: Vec<std::path::PathBuf> = {
        let dir = w.path("data/recordings").join(&prefix).join("ch0000");
        let mut v: Vec<_> = std::fs::read_dir(&dir)
            .expect("chunks")
            .map(|e| e.expect("entry").path())
            .collect();
        v.sort();
        v
    };
    assert!(
        chunks.len() >= 4,
        "several chunks to tamper with: {chunks:?}"
    );
    let store_root = w.path("data/recordings");
    let rels: Vec<std::path::PathBuf> = chunks
        .iter()
        .map(|p| {
            p.strip_prefix(&store_root)
                .expect("inside store")
                .to_path_buf()
        })
        .collect();
    let (c2, c1b, c2b) = (rels[2].clone(), rels[1].clone(), rels[2].clone());
    let (c1f, clast) = (rels[1].clone(), rels[rels.len() - 1].clone());
    let manifest = std::path::PathBuf::from(&prefix).join("session.json");
    let sig = std::path::PathBuf::from(&prefix).join("session.json.sig");

    // An attacker's own signing key, to re-sign manifests.
    let stranger_dir = tempfile::tempdir().expect("tempdir");
    let stranger = std::sync::Arc::new(
        breakglass::signing::Signer::load_or_create(stranger_dir.path()).expect("stranger key"),
    );
    let resign = {
        let stranger = stranger.clone();
        move |root: &std::path::Path, m: &std::path::Path, sg: &std::path::Path, body: Vec<u8>| {
            use base64::Engine;
            let (mp, sp) = (root.join(m), root.join(sg));
            writable(&mp);
            writable(&sp);
            let sig = serde_json::json!({
                "algorithm": "ed25519",
                "key_id": stranger.current_public.id,
                "signature": base64::engine::general_purpose::STANDARD.encode(stranger.sign(&body)),
                "sha256": sha256_hex(&body),
            });
            std::fs::write(&mp, &body).expect("write manifest");
            std::fs::write(&sp, serde_json::to_vec(&sig).expect("json")).expect("write sig");
        }
    };
    let (resign1, resign2) = (resign.clone(), resign);

    type Tamper = Box<dyn Fn(&std::path::Path)>;
    let cases: Vec<(&str, Tamper, Option<i32>, &str, bool)> = vec![
        ("untouched", Box::new(|_| {}), Some(0), "OK", false),
        (
            "sign with another key",
            {
                let (m, sg) = (manifest.clone(), sig.clone());
                Box::new(move |root| {
                    let body = std::fs::read(root.join(&m)).expect("read");
                    resign1(root, &m, &sg, body);
                })
            },
            Some(3),
            "not among the trusted keys",
            false,
        ),
        (
            "replace the manifest (drop the last chunk, re-chain, re-sign)",
            {
                let (m, sg) = (manifest.clone(), sig.clone());
                Box::new(move |root| {
                    let mut meta: Value =
                        serde_json::from_slice(&std::fs::read(root.join(&m)).expect("read"))
                            .expect("json");
                    let objs = meta["objects"].as_array_mut().expect("objects");
                    objs.pop();
                    let head = objs.last().expect("objects")["chain"].clone();
                    meta["chain_head"] = head;
                    resign2(
                        root,
                        &m,
                        &sg,
                        serde_json::to_vec_pretty(&meta).expect("json"),
                    );
                })
            },
            Some(3),
            "manifest replaced",
            true,
        ),
        (
            "flip a byte",
            Box::new(move |root| {
                let p = root.join(&c1f);
                writable(&p);
                let mut b = std::fs::read(&p).expect("read");
                let mid = b.len() / 2;
                b[mid] ^= 0x01;
                std::fs::write(&p, b).expect("write");
            }),
            Some(3),
            "was modified",
            false,
        ),
        (
            "delete a middle chunk",
            Box::new(move |root| std::fs::remove_file(root.join(&c2)).expect("rm")),
            Some(3),
            "was deleted",
            false,
        ),
        (
            "delete the last chunk",
            Box::new(move |root| std::fs::remove_file(root.join(&clast)).expect("rm")),
            Some(3),
            "was deleted",
            false,
        ),
        (
            "reorder two chunks",
            Box::new(move |root| {
                let (a, b) = (root.join(&c1b), root.join(&c2b));
                let tmp = root.join("swap");
                std::fs::rename(&a, &tmp).expect("mv");
                std::fs::rename(&b, &a).expect("mv");
                std::fs::rename(&tmp, &b).expect("mv");
            }),
            Some(3),
            "was modified",
            false,
        ),
        (
            "edit the manifest",
            {
                let m = manifest.clone();
                Box::new(move |root| {
                    let p = root.join(&m);
                    writable(&p);
                    let t = std::fs::read_to_string(&p)
                        .expect("read")
                        .replace("\"alice\"", "\"mallory\"");
                    std::fs::write(&p, t).expect("write");
                })
            },
            Some(3),
            "does not match its signature",
            false,
        ),
        (
            "delete the signature",
            {
                let s = sig.clone();
                Box::new(move |root| std::fs::remove_file(root.join(&s)).expect("rm"))
            },
            Some(3),
            "signature deleted",
            false,
        ),
        (
            "add an object",
            {
                let pfx = prefix.clone();
                Box::new(move |root| {
                    std::fs::write(
                        root.join(&pfx).join("ch0000").join("99999999.raw.lz4"),
                        b"extra",
                    )
                    .expect("write")
                })
            },
            Some(3),
            "not in the manifest",
            false,
        ),
        (
            "delete the manifest (SIEM has the head)",
            {
                let (m, s) = (manifest.clone(), sig.clone());
                Box::new(move |root| {
                    std::fs::remove_file(root.join(&m)).expect("rm");
                    std::fs::remove_file(root.join(&s)).expect("rm");
                })
            },
            Some(3),
            "manifest deleted",
            true,
        ),
        (
            "delete the manifest (no SIEM copy)",
            {
                let (m, s) = (manifest.clone(), sig.clone());
                Box::new(move |root| {
                    std::fs::remove_file(root.join(&m)).expect("rm");
                    std::fs::remove_file(root.join(&s)).expect("rm");
                })
            },
            Some(2),
            "INCOMPLETE",
            false,
        ),
    ];
    for (i, (name, tamper, code, want, with_siem)) in cases.iter().enumerate() {
        let copy = w.path(&format!("case{i}"));
        copy_tree(&w.path("data/recordings"), &copy);
        tamper(&copy);
        let mut args = vec![
            "verify".to_string(),
            id.clone(),
            "--store".into(),
            copy.display().to_string(),
            "--public-key".into(),
            keys.display().to_string(),
        ];
        if *with_siem {
            args.extend([
                "--siem".into(),
                w.path("data/siem.jsonl").display().to_string(),
            ]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = w.cli(&args);
        let report = text(&out.stdout);
        assert_eq!(
            out.status.code(),
            *code,
            "{name}: {report}{}",
            text(&out.stderr)
        );
        assert!(
            report.contains(want),
            "{name}: expected `{want}` in {report}"
        );
    }

    // A rotated signing key still verifies what the old key signed; a stranger's key does not.
    let old_key = text(&w.cli(&["keys", "show", "--signing"]).stdout);
    w.cli_ok(&["keys", "rotate-signing"]);
    let out = w.cli(&["verify", &id]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));
    // The rotation is announced with both key ids, and the new key is certified by the old.
    let rotated = w.wait_event("the rotation event", |e| {
        e["action"] == "signing_key_rotated"
    });
    validate("siem-event.schema.json", &rotated);
    let (new_id, old_id) = (
        rotated["signing_key_id"]
            .as_str()
            .expect("new id")
            .to_string(),
        rotated["previous_signing_key_id"]
            .as_str()
            .expect("old id")
            .to_string(),
    );
    assert!(old_key.contains(&old_id), "{old_key}");
    let chain = w.cli_ok(&["keys", "show", "--signing"]);
    assert!(
        chain.contains(&format!("# key {new_id} certified by key {old_id}"))
            && chain.contains("ed25519-cert "),
        "keys show --signing prints the chain: {chain}"
    );
    // A session signed by the new key verifies through the chain: online, and offline with the
    // printed chain; offline with only the old key (no certificate) it does not.
    let gw = InProcess::start(&w).await;
    w.grant("bob", "30m");
    let out = output(w.ssh("bob", "web-01", &[], &["echo after-rotation"])).await;
    assert!(out.status.success());
    w.wait_ended(2);
    gw.stop().await;
    let id2 = last_session_id(&w);
    let sig2 = w.sessions()[0]["recording"]
        .as_str()
        .expect("prefix")
        .to_string();
    let sig2: Value = serde_json::from_slice(
        &std::fs::read(
            w.path("data/recordings")
                .join(sig2)
                .join("session.json.sig"),
        )
        .expect("sig"),
    )
    .expect("json");
    assert_eq!(sig2["key_id"], new_id.as_str(), "signed by the new key");
    let out = w.cli(&["verify", &id2]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));
    let (chain_file, old_file) = (w.path("chain.pub"), w.path("old.pub"));
    std::fs::write(&chain_file, &chain).expect("write");
    std::fs::write(&old_file, &old_key).expect("write");
    let store = w.path("data/recordings");
    let offline = |keys: &std::path::Path, store: &std::path::Path| {
        w.cli(&[
            "verify",
            &id2,
            "--store",
            store.to_str().expect("p"),
            "--public-key",
            keys.to_str().expect("p"),
        ])
    };
    let out = offline(&chain_file, &store);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));
    // The certificate is kept with the evidence, so the key pinned at install time is enough.
    let out = offline(&old_file, &store);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));
    // Without the certificate, the old key alone does not vouch for the new one.
    let no_cert = w.path("store-without-certificates");
    copy_tree(&store, &no_cert);
    std::fs::remove_dir_all(no_cert.join(".breakglass/signing-keys")).expect("rm certificates");
    let out = offline(&old_file, &no_cert);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stdout));
    assert!(
        text(&out.stdout).contains(&format!(
            "signed by key {new_id} which is not among the trusted keys"
        )),
        "{}",
        text(&out.stdout)
    );
    let stranger = w.path("stranger.pub");
    std::fs::write(
        &stranger,
        "ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGb7mZ1Bq0Ckq8xN3sKZ0x0pXqk8iJ9C\n",
    )
    .expect("write");
    let out = w.cli(&[
        "verify",
        &id,
        "--store",
        w.path("data/recordings").to_str().expect("p"),
        "--public-key",
        stranger.to_str().expect("p"),
    ]);
    assert_ne!(out.status.code(), Some(0), "{}", text(&out.stdout));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_store_outage_loses_nothing_and_checkpoints_reach_the_siem() {
    let w = World::with(Opts {
        extra_limits:
            "storage_grace = \"10s\"\ncheckpoint_interval = \"1s\"\nflush_interval = \"200ms\""
                .into(),
        ..Default::default()
    });
    let gw = InProcess::start(&w).await;
    w.grant("alice", "30m");
    let mut child = start_long_session(
        &w,
        &[],
        "for i in $(seq 1 60); do echo tick-$i; sleep 0.05; done",
    );
    let prefix = w.sessions()[0]["recording"]
        .as_str()
        .expect("prefix")
        .to_string();
    let dir = w.path("data/recordings").join(&prefix);
    let aside = w.path("aside");
    // The store fails (the session's directory is a file) for about a second, then comes back.
    wait_for("a first chunk", Duration::from_secs(10), || {
        dir.join("ch0000").exists().then_some(())
    });
    std::fs::rename(&dir, &aside).expect("move aside");
    std::fs::write(&dir, b"outage").expect("block");
    let cp = w.wait_event("a checkpoint", |e| e["action"] == "recording_checkpoint");
    assert!(
        cp["chain_head"].as_str().is_some_and(|h| h.len() == 64),
        "{cp}"
    );
    std::fs::remove_file(&dir).expect("unblock");
    std::fs::rename(&aside, &dir).expect("move back");
    let (code, out, err) = wait_exit(&mut child, Duration::from_secs(20));
    assert_eq!(code, Some(0), "the session survived the outage: {err}");
    assert!(out.contains("tick-60"));
    w.wait_ended(1);
    gw.stop().await;
    let id = last_session_id(&w);
    let cast = export(&w, &id);
    for i in 1..=60 {
        assert!(
            cast.contains(&format!("tick-{i}\\n")),
            "tick-{i} recorded despite the outage"
        );
    }
    let out = w.cli(&["verify", &id]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recordings_go_to_s3_with_object_lock_and_unlocked_buckets_are_refused() {
    let logs = tempfile::tempdir().expect("tempdir");
    let mut s3 = S3Server::start(&logs.path().join("moto.log"));
    s3.bucket("bg-locked", Some(1));
    s3.bucket("bg-plain", None);
    let storage = |bucket: &str| {
        format!(
            "[storage]\nkind = \"s3\"\nbucket = \"{bucket}\"\nprefix = \"prod\"\nendpoint = \"{}\"\nregion = \"us-east-1\"\nobject_lock = \"compliance\"\nretention_days = 1\n",
            s3.endpoint()
        )
    };

    // A bucket without Object Lock: check-config fails and the gateway refuses to start.
    let plain = World::with(Opts {
        extra_config: storage("bg-plain"),
        ..Default::default()
    });
    let out = plain.cli(&["check-config", plain.config_path.to_str().expect("path")]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stdout));
    assert!(
        text(&out.stdout).contains("Object Lock"),
        "{}",
        text(&out.stdout)
    );
    let mut serve = Command::new(env!("CARGO_BIN_EXE_breakglass"))
        .args(["serve", "--config"])
        .arg(&plain.config_path)
        .envs(S3_ENV)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("serve");
    let status = wait_for("serve to refuse", Duration::from_secs(20), || {
        serve.try_wait().expect("try_wait")
    });
    assert!(
        !status.success(),
        "the gateway must not run on an unlocked bucket"
    );

    // A locked bucket: sessions are recorded there and verify against it.
    let w = World::with(Opts {
        extra_config: storage("bg-locked"),
        extra_limits: "storage_grace = \"2s\"".into(),
        ..Default::default()
    });
    let out = w.cli(&["check-config", w.config_path.to_str().expect("path")]);
    assert!(out.status.success(), "{}", text(&out.stdout));
    let _gw = Process::start(&w);
    w.grant("alice", "30m");
    let out = output(w.ssh("alice", "web-01", &[], &["echo into-s3"])).await;
    assert_eq!(text(&out.stdout), "into-s3\n", "{}", text(&out.stderr));
    w.wait_ended(1);
    let id = last_session_id(&w);
    let out = w.cli(&["verify", &id]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(export(&w, &id).contains("into-s3"));

    // The objects carry a COMPLIANCE lock: deleting a version is refused, and nothing was
    // written to the local directory.
    let out = s3.boto(
        "objs = s3.list_object_versions(Bucket='bg-locked', Prefix='prod/sessions/')['Versions']\n\
         k = [o for o in objs if o['Key'].endswith('session.json')][0]\n\
         h = s3.head_object(Bucket='bg-locked', Key=k['Key'], VersionId=k['VersionId'])\n\
         print('MODE', h.get('ObjectLockMode'))\n\
         try:\n    s3.delete_object(Bucket='bg-locked', Key=k['Key'], VersionId=k['VersionId'])\n    print('DELETED')\n\
         except Exception as e:\n    print('REFUSED', e)",
    );
    let said = text(&out.stdout);
    assert!(
        said.contains("MODE COMPLIANCE"),
        "{said}{}",
        text(&out.stderr)
    );
    assert!(
        said.contains("REFUSED") && !said.contains("DELETED"),
        "{said}"
    );
    assert!(
        !w.path("data/recordings/sessions").exists(),
        "recordings went to S3 only"
    );

    // Overwrites are refused: the gateway writes with If-None-Match, and so does this attempt.
    let out = s3.boto(
        "k = [o['Key'] for o in s3.list_objects_v2(Bucket='bg-locked', Prefix='prod/sessions/')['Contents'] if o['Key'].endswith('session.json')][0]\n\
         try:\n    s3.put_object(Bucket='bg-locked', Key=k, Body=b'forged', IfNoneMatch='*', ChecksumAlgorithm='SHA256')\n    print('OVERWRITTEN')\n\
         except Exception as e:\n    print('REFUSED', e)",
    );
    let said = text(&out.stdout);
    assert!(
        said.contains("REFUSED") && !said.contains("OVERWRITTEN"),
        "{said}{}",
        text(&out.stderr)
    );

    // The store goes away mid-session: the session ends within the grace period and new
    // sessions are refused.
    w.grant("bob", "30m");
    let mut child = w
        .ssh(
            "bob",
            "web-01",
            &[],
            &["while true; do echo tick; sleep 0.05; done"],
        )
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start ssh");
    wait_for("bob's session", Duration::from_secs(10), || {
        (w.siem_events()
            .iter()
            .filter(|e| e["action"] == "session_start")
            .count()
            >= 2)
            .then_some(())
    });
    let down = Instant::now();
    s3.stop();
    let (code, _out, err) = wait_exit(&mut child, Duration::from_secs(15));
    eprintln!(
        "session ended {:?} after the S3 server stopped (grace 2s)",
        down.elapsed()
    );
    assert!(
        down.elapsed() < Duration::from_secs(6),
        "ended within the grace period (plus a flush)"
    );
    assert_ne!(code, Some(0));
    assert!(err.contains("recording failed"), "{err}");
    let out = output(w.ssh("bob", "web-01", &[], &["echo should-not-run"])).await;
    assert!(!text(&out.stdout).contains("should-not-run"));
    assert!(
        text(&out.stderr).contains("never run unrecorded"),
        "{}",
        text(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_during_a_store_outage_still_loses_at_most_a_second() {
    let w = World::with(Opts {
        extra_limits: "storage_grace = \"30s\"\nflush_interval = \"200ms\"".into(),
        ..Default::default()
    });
    let mut gw = Process::start(&w);
    w.grant("alice", "30m");
    let mut child = w
        .ssh(
            "alice",
            "web-01",
            &[],
            &["for i in $(seq 1 400); do echo line-$i; sleep 0.02; done; sleep 60"],
        )
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start ssh");
    let rx = stamped_lines(&mut child);
    let mut seen = Vec::new();
    while let Ok(x) = rx.recv_timeout(Duration::from_secs(15)) {
        seen.push(x);
        if seen.len() >= 40 {
            break;
        }
    }
    let prefix = w.sessions()[0]["recording"]
        .as_str()
        .expect("prefix")
        .to_string();
    let dir = w.path("data/recordings").join(&prefix);
    let aside = w.path("aside");
    std::fs::rename(&dir, &aside).expect("move aside");
    std::fs::write(&dir, b"outage").expect("block");
    // The store is down: chunks go to the local spool.
    let spool = w.path("data/spool").join(&prefix).join("ch0000");
    wait_for("a spooled chunk", Duration::from_secs(10), || {
        std::fs::read_dir(&spool)
            .ok()
            .and_then(|mut d| d.next())
            .map(|_| ())
    });
    while let Ok(x) = rx.recv_timeout(Duration::from_millis(1500)) {
        seen.push(x);
        if seen.len() >= 150 {
            break;
        }
    }
    let killed_at = Instant::now();
    gw.kill9();
    let _ = child.kill();
    let _ = child.wait();
    std::fs::remove_file(&dir).expect("unblock");
    std::fs::rename(&aside, &dir).expect("move back");

    // The restart drains the spool, then seals the session as INCOMPLETE.
    let _gw2 = Process::start(&w);
    let id = last_session_id(&w);
    w.wait_event("crash recovery", |e| e["reason"] == "gateway_crashed");
    let cast = export(&w, &id);
    let must: Vec<&String> = seen
        .iter()
        .filter(|(t, _)| *t + Duration::from_secs(1) <= killed_at)
        .map(|(_, l)| l)
        .collect();
    assert!(must.len() > 40, "lines were seen during the outage");
    for l in must {
        assert!(
            cast.contains(&format!("{l}\\n")),
            "{l} (seen over 1 s before the kill, during the outage) survived"
        );
    }
    let out = w.cli(&["verify", &id]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stdout));
}
