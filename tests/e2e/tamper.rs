//! The tamper table: every attack an operator with write access to the data dir and the store
//! can make on a real recorded session, each on a fresh copy, must give TAMPERED or MISSING
//! from `breakglass verify`, with a message naming the object. The table of verdicts is
//! printed (run with `--nocapture` to read it).

use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use super::support::*;

/// Which SIEM copy an offline verification gets.
#[derive(Clone, Copy, PartialEq, Eq)]
enum SiemCopy {
    None,
    Full,
    /// The session's `session_end` line left out: the session crashed before it ended, so only
    /// its `recording_checkpoint` heads stand for it.
    WithoutEnd,
}

/// How `verify` is run on the copy.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// The copy's own config: trusted keys from `[signing]`, the SIEM file of the data dir.
    Online,
    /// `--store COPY --public-key KEYS`, the keys the auditor took before the attack.
    Offline(SiemCopy),
}

type Tamper = Box<dyn Fn(&Path)>;

struct Attack {
    name: &'static str,
    mode: Mode,
    /// `verify --all` instead of one id.
    all: bool,
    /// Give verify only the first 8 characters of the session id.
    abbreviated: bool,
    tamper: Tamper,
    /// `OK`, `TAMPERED` or `MISSING`.
    verdict: &'static str,
    /// What the verdict line must name (the object, the checkpoint or the session).
    names: String,
    /// What stderr must say (a warning), if anything.
    warns: Option<String>,
}

fn exit_code(verdict: &str) -> i32 {
    match verdict {
        "OK" => 0,
        "TAMPERED" => 3,
        "MISSING" => 4,
        other => panic!("unknown verdict {other}"),
    }
}

fn read_json(p: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(p).expect("read")).expect("json")
}

fn write_file(p: &Path, bytes: &[u8]) {
    if p.exists() {
        writable(p);
    }
    std::fs::write(p, bytes).expect("write");
}

/// Re-chains every object of a manifest from its (possibly edited) hashes.
fn rechain(meta: &mut Value) {
    let id = meta["session"]["session_id"]
        .as_str()
        .expect("session id")
        .to_string();
    let mut link = breakglass::record::chain_seed(&id);
    for o in meta["objects"].as_array_mut().expect("objects") {
        link = breakglass::record::chain_link(
            &link,
            o["key"].as_str().expect("key"),
            o["sha256"].as_str().expect("sha"),
        );
        o["chain"] = Value::String(link.clone());
    }
    meta["chain_head"] = Value::String(link);
}

/// Writes `meta` as the session's manifest, signed by `signer`, as the gateway would.
fn sign_manifest(store: &Path, prefix: &str, meta: &Value, signer: &breakglass::signing::Signer) {
    use base64::Engine;
    let body = serde_json::to_vec_pretty(meta).expect("json");
    let sig = serde_json::json!({
        "algorithm": "ed25519",
        "key_id": signer.current_public.id,
        "signature": base64::engine::general_purpose::STANDARD.encode(signer.sign(&body)),
        "sha256": sha256_hex(&body),
    });
    let dir = store.join(prefix);
    write_file(&dir.join("session.json"), &body);
    write_file(
        &dir.join("session.json.sig"),
        &serde_json::to_vec(&sig).expect("json"),
    );
}

/// The gateway's own signing key, as root on the gateway host has it.
fn real_key(data: &Path) -> breakglass::signing::Signer {
    breakglass::signing::Signer::load_or_create(&data.join("keys")).expect("the gateway's key")
}

/// Runs one attack on a fresh copy of the world's data dir; returns the verdict line.
fn run(w: &World, i: usize, a: &Attack, id: &str, keys: &Path) -> String {
    let case = w.path(&format!("tamper{i}"));
    std::fs::create_dir_all(&case).expect("case dir");
    let data = case.join("data");
    copy_tree(&w.path("data"), &data);
    (a.tamper)(&data);
    let config = case.join("breakglass.toml");
    std::fs::write(
        &config,
        std::fs::read_to_string(&w.config_path)
            .expect("config")
            .replace(
                &format!("data_dir = \"{}\"", w.path("data").display()),
                &format!("data_dir = \"{}\"", data.display()),
            ),
    )
    .expect("config copy");
    let shown_id = if a.abbreviated { &id[..8] } else { id };
    let mut args: Vec<String> = vec!["verify".into()];
    if a.all {
        args.push("--all".into());
    } else {
        args.push(shown_id.into());
    }
    match a.mode {
        Mode::Online => args.extend(["--config".into(), config.display().to_string()]),
        Mode::Offline(siem) => {
            args.extend([
                "--store".into(),
                data.join("recordings").display().to_string(),
                "--public-key".into(),
                keys.display().to_string(),
            ]);
            let events = std::fs::read_to_string(w.path("data/siem.jsonl")).expect("siem");
            let copy = case.join("siem-copy.jsonl");
            match siem {
                SiemCopy::None => {}
                SiemCopy::Full => {
                    std::fs::write(&copy, &events).expect("siem copy");
                    args.extend(["--siem".into(), copy.display().to_string()]);
                }
                SiemCopy::WithoutEnd => {
                    let kept: String = events
                        .lines()
                        .filter(|l| {
                            let e: Value = serde_json::from_str(l).expect("json");
                            !(e["action"] == "session_end" && e["session_id"] == id)
                        })
                        .map(|l| format!("{l}\n"))
                        .collect();
                    std::fs::write(&copy, kept).expect("siem copy");
                    args.extend(["--siem".into(), copy.display().to_string()]);
                }
            }
        }
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = w.cli(&args);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    let line = stdout
        .lines()
        .find(|l| l.starts_with(id))
        .unwrap_or_else(|| {
            panic!(
                "{}: no verdict line for the full id {id}:\n{stdout}{stderr}",
                a.name
            )
        })
        .to_string();
    assert_eq!(
        out.status.code(),
        Some(exit_code(a.verdict)),
        "{}: {stdout}{stderr}",
        a.name
    );
    assert!(
        line.contains(&format!("  {}", a.verdict)),
        "{}: expected {} in {line}",
        a.name,
        a.verdict
    );
    assert!(
        line.contains(&a.names),
        "{}: the verdict must name `{}`: {line}",
        a.name,
        a.names
    );
    if let Some(w) = &a.warns {
        assert!(
            stderr.contains(w.as_str()),
            "{}: expected the warning `{w}` in {stderr}",
            a.name
        );
    }
    line
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_attack_on_a_recording_is_tampered_or_missing() {
    let w = World::with(Opts {
        extra_limits: "flush_interval = \"100ms\"\ncheckpoint_interval = \"400ms\"".into(),
        ..Default::default()
    });
    let gw = InProcess::start(&w).await;
    w.grant("alice", "30m");
    let out = output(w.ssh(
        "alice",
        "web-01",
        &["-tt"],
        &["for i in $(seq 1 40); do echo line-$i; sleep 0.05; done"],
    ))
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    w.wait_ended(1);
    gw.stop().await;
    let id = last_session_id(&w);
    let prefix = w.sessions()[0]["recording"]
        .as_str()
        .expect("prefix")
        .to_string();
    let store = |data: &Path| data.join("recordings");
    let meta = read_json(&store(&w.path("data")).join(&prefix).join("session.json"));
    let objects: Vec<String> = meta["objects"]
        .as_array()
        .expect("objects")
        .iter()
        .map(|o| o["key"].as_str().expect("key").to_string())
        .collect();
    assert!(objects.len() >= 6, "several chunks: {objects:?}");
    let checkpoints: Vec<Value> = w
        .siem_events()
        .into_iter()
        .filter(|e| e["action"] == "recording_checkpoint" && e["session_id"] == id.as_str())
        .collect();
    let covered = checkpoints
        .iter()
        .filter_map(|e| e["objects"].as_u64())
        .max()
        .expect("checkpoints with an object count reached the SIEM") as usize;
    assert!(
        covered >= 3,
        "a checkpoint covers some chunks: {checkpoints:?}"
    );
    let covering = checkpoints
        .iter()
        .find(|e| e["objects"].as_u64() == Some(covered as u64))
        .and_then(|e| e["event_id"].as_str())
        .expect("the covering checkpoint's event id")
        .to_string();
    let keys = w.path("trusted-signing.pub");
    std::fs::write(&keys, w.cli_ok(&["keys", "show", "--signing"])).expect("keys");
    let chunk = |i: usize| objects[i].clone();
    let (c1, c2, last) = (chunk(1), chunk(2), chunk(objects.len() - 1));

    let attacks: Vec<Attack> = vec![
        Attack {
            name: "none (control, offline)",
            mode: Mode::Offline(SiemCopy::Full),
            all: false,
            abbreviated: false,
            tamper: Box::new(|_| {}),
            verdict: "OK",
            names: "manifest signature valid".into(),
            warns: None,
        },
        Attack {
            name: "none (control, online)",
            mode: Mode::Online,
            all: false,
            abbreviated: false,
            tamper: Box::new(|_| {}),
            verdict: "OK",
            names: "manifest signature valid".into(),
            warns: None,
        },
        Attack {
            name: "edit a chunk (one byte)",
            mode: Mode::Offline(SiemCopy::Full),
            all: false,
            abbreviated: false,
            tamper: {
                let c = c2.clone();
                Box::new(move |d| {
                    let p = store(d).join(&c);
                    let mut b = std::fs::read(&p).expect("read");
                    let mid = b.len() / 2;
                    b[mid] ^= 0x01;
                    write_file(&p, &b);
                })
            },
            verdict: "TAMPERED",
            names: format!("{c2} (object 2) was modified"),
            warns: None,
        },
        Attack {
            name: "delete a chunk",
            mode: Mode::Online,
            all: false,
            abbreviated: false,
            tamper: {
                let c = c2.clone();
                Box::new(move |d| std::fs::remove_file(store(d).join(&c)).expect("rm"))
            },
            verdict: "TAMPERED",
            names: format!("{c2} (object 2 of {}) was deleted", objects.len()),
            warns: None,
        },
        Attack {
            name: "reorder two chunks",
            mode: Mode::Offline(SiemCopy::Full),
            all: false,
            abbreviated: false,
            tamper: {
                let (a, b) = (c1.clone(), c2.clone());
                Box::new(move |d| {
                    let (a, b) = (store(d).join(&a), store(d).join(&b));
                    let tmp = a.with_extension("swap");
                    std::fs::rename(&a, &tmp).expect("mv");
                    std::fs::rename(&b, &a).expect("mv");
                    std::fs::rename(&tmp, &b).expect("mv");
                })
            },
            verdict: "TAMPERED",
            names: format!("{c1} (object 1) was modified"),
            warns: None,
        },
        Attack {
            name: "add a chunk",
            mode: Mode::Offline(SiemCopy::None),
            all: false,
            abbreviated: false,
            tamper: {
                let p = prefix.clone();
                Box::new(move |d| {
                    write_file(
                        &store(d).join(&p).join("ch0000/00009999.cast"),
                        b"[0.1, \"o\", \"planted\"]\n",
                    )
                })
            },
            verdict: "TAMPERED",
            names: format!("{prefix}/ch0000/00009999.cast is not in the manifest"),
            warns: None,
        },
        Attack {
            name: "plant objects of the session under another date's prefix (offline, no SIEM copy)",
            mode: Mode::Offline(SiemCopy::None),
            all: false,
            abbreviated: false,
            tamper: {
                let (id, c) = (id.clone(), c1.clone());
                Box::new(move |d| {
                    let planted = store(d).join(format!("sessions/2020/01/01/{id}/ch0000"));
                    std::fs::create_dir_all(&planted).expect("mkdir");
                    std::fs::copy(store(d).join(&c), planted.join("00000000.cast"))
                        .expect("plant");
                })
            },
            verdict: "TAMPERED",
            names: format!("sessions/2020/01/01/{id}/ holds objects of this session too"),
            warns: None,
        },
        Attack {
            name: "edit the manifest, re-sign it with a key dropped into data_dir/keys/signing/ (online)",
            mode: Mode::Online,
            all: false,
            abbreviated: false,
            tamper: {
                let p = prefix.clone();
                Box::new(move |d| {
                    let stranger = tempfile::tempdir().expect("tempdir");
                    breakglass::signing::Signer::load_or_create(stranger.path()).expect("key");
                    std::fs::copy(
                        stranger.path().join("signing/000001.pk8"),
                        d.join("keys/signing/000002.pk8"),
                    )
                    .expect("drop the key in");
                    let dropped = breakglass::signing::Signer::load_or_create(&d.join("keys")).expect("load");
                    assert_eq!(dropped.all.len(), 2, "the dropped key is the newest");
                    let mut meta = read_json(&store(d).join(&p).join("session.json"));
                    meta["session"]["person"] = Value::String("mallory".into());
                    sign_manifest(&store(d), &p, &meta, &dropped);
                })
            },
            verdict: "TAMPERED",
            names: "session.json is signed by key".into(),
            warns: Some("is not trusted".into()),
        },
        Attack {
            name: "replace the manifest with a shorter one signed by the gateway's real key; abbreviated id (offline, SIEM copy)",
            mode: Mode::Offline(SiemCopy::Full),
            all: false,
            abbreviated: true,
            tamper: {
                let (p, last) = (prefix.clone(), last.clone());
                Box::new(move |d| {
                    let mut meta = read_json(&store(d).join(&p).join("session.json"));
                    meta["objects"].as_array_mut().expect("objects").pop();
                    rechain(&mut meta);
                    std::fs::remove_file(store(d).join(&last)).expect("rm");
                    sign_manifest(&store(d), &p, &meta, &real_key(d));
                })
            },
            verdict: "TAMPERED",
            names: "the SIEM recorded chain head".into(),
            warns: None,
        },
        Attack {
            name: "re-sign with a dropped-in key and plant a forged rotation certificate for it (data dir and store)",
            mode: Mode::Online,
            all: false,
            abbreviated: false,
            tamper: {
                let p = prefix.clone();
                Box::new(move |d| {
                    let stranger = tempfile::tempdir().expect("tempdir");
                    breakglass::signing::Signer::load_or_create(stranger.path()).expect("key");
                    std::fs::copy(
                        stranger.path().join("signing/000001.pk8"),
                        d.join("keys/signing/000002.pk8"),
                    )
                    .expect("drop the key in");
                    let dropped = breakglass::signing::Signer::load_or_create(&d.join("keys")).expect("load");
                    let forged = breakglass::signing::KeyCertificate {
                        key: dropped.current_public.clone(),
                        signed_by: dropped.all[1].id.clone(),
                        issued_at: "2026-01-01T00:00:00Z".into(),
                        signature: dropped.sign(b"not the old key's signature"),
                    };
                    let line = forged.line() + "\n";
                    write_file(&d.join("keys/signing/000002.cert"), line.as_bytes());
                    let in_store = store(d).join(breakglass::storage::key::signing_certificate(
                        &forged.key.id,
                    ));
                    std::fs::create_dir_all(in_store.parent().expect("dir")).expect("mkdir");
                    write_file(&in_store, line.as_bytes());
                    let mut meta = read_json(&store(d).join(&p).join("session.json"));
                    meta["session"]["target"] = Value::String("web-99".into());
                    sign_manifest(&store(d), &p, &meta, &dropped);
                })
            },
            verdict: "TAMPERED",
            names: "session.json is signed by key".into(),
            warns: Some("the signature is invalid".into()),
        },
        Attack {
            name: "rename the person in the manifest, re-signed with the gateway's real key (online)",
            mode: Mode::Online,
            all: false,
            abbreviated: false,
            tamper: {
                let p = prefix.clone();
                Box::new(move |d| {
                    let mut meta = read_json(&store(d).join(&p).join("session.json"));
                    meta["session"]["person"] = Value::String("mallory".into());
                    sign_manifest(&store(d), &p, &meta, &real_key(d));
                })
            },
            verdict: "TAMPERED",
            names: "session.json says person `mallory`".into(),
            warns: None,
        },
        Attack {
            name: "crashed session truncated below a checkpoint, sealed as recovered with the real key",
            mode: Mode::Offline(SiemCopy::WithoutEnd),
            all: false,
            abbreviated: false,
            tamper: {
                let (p, objects) = (prefix.clone(), objects.clone());
                Box::new(move |d| {
                    let mut meta = read_json(&store(d).join(&p).join("session.json"));
                    meta["objects"]
                        .as_array_mut()
                        .expect("objects")
                        .truncate(covered - 1);
                    meta["recovered"] = Value::Bool(true);
                    rechain(&mut meta);
                    for k in &objects[covered - 1..] {
                        std::fs::remove_file(store(d).join(k)).expect("rm");
                    }
                    sign_manifest(&store(d), &p, &meta, &real_key(d));
                })
            },
            verdict: "TAMPERED",
            names: format!("recording_checkpoint {covering} at"),
            warns: None,
        },
        Attack {
            name: "crashed session: a chunk before a checkpoint rewritten, re-chained, re-signed with the real key",
            mode: Mode::Offline(SiemCopy::WithoutEnd),
            all: false,
            abbreviated: false,
            tamper: {
                let (p, c) = (prefix.clone(), c1.clone());
                Box::new(move |d| {
                    let path = store(d).join(&c);
                    let forged = std::fs::read_to_string(&path)
                        .expect("read")
                        .replace("line-", "LINE-");
                    write_file(&path, forged.as_bytes());
                    let mut meta = read_json(&store(d).join(&p).join("session.json"));
                    let o = &mut meta["objects"][1];
                    o["sha256"] = Value::String(sha256_hex(forged.as_bytes()));
                    o["size"] = Value::from(forged.len());
                    meta["recovered"] = Value::Bool(true);
                    rechain(&mut meta);
                    sign_manifest(&store(d), &p, &meta, &real_key(d));
                })
            },
            verdict: "TAMPERED",
            names: "does not match the chain after".into(),
            warns: None,
        },
        Attack {
            name: "delete the whole session (offline verify --all --siem)",
            mode: Mode::Offline(SiemCopy::Full),
            all: true,
            abbreviated: false,
            tamper: {
                let p = prefix.clone();
                Box::new(move |d| std::fs::remove_dir_all(store(d).join(&p)).expect("rm -r"))
            },
            verdict: "MISSING",
            names: "the SIEM recorded its session_start".into(),
            warns: None,
        },
        Attack {
            name: "delete the whole session (online verify --all)",
            mode: Mode::Online,
            all: true,
            abbreviated: false,
            tamper: {
                let p = prefix.clone();
                Box::new(move |d| std::fs::remove_dir_all(store(d).join(&p)).expect("rm -r"))
            },
            verdict: "MISSING",
            names: format!("no object under {prefix}/"),
            warns: None,
        },
    ];
    let mut table = Vec::new();
    for (i, a) in attacks.iter().enumerate() {
        let line = run(&w, i, a, &id, &keys);
        table.push((a.name, line));
    }

    // On S3 (versioned, Object Lock): a new version put over a locked chunk with the gateway's
    // own credentials. The manifest pinned the original version.
    let logs = tempfile::tempdir().expect("tempdir");
    let s3 = S3Server::start(&logs.path().join("moto.log"));
    s3.bucket("bg-tamper", Some(1));
    let ws = World::with(Opts {
        extra_config: format!(
            "[storage]\nkind = \"s3\"\nbucket = \"bg-tamper\"\nprefix = \"prod\"\nendpoint = \"{}\"\nregion = \"us-east-1\"\nobject_lock = \"compliance\"\nretention_days = 1\n",
            s3.endpoint()
        ),
        extra_limits: "flush_interval = \"100ms\"".into(),
        ..Default::default()
    });
    let gw = Process::start(&ws);
    ws.grant("alice", "30m");
    let out = output(ws.ssh(
        "alice",
        "web-01",
        &["-tt"],
        &["for i in $(seq 1 10); do echo s3-line-$i; sleep 0.05; done"],
    ))
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    ws.wait_ended(1);
    drop(gw);
    let sid = last_session_id(&ws);
    let sprefix = ws.sessions()[0]["recording"]
        .as_str()
        .expect("prefix")
        .to_string();
    let before = ws.cli(&["verify", &sid]);
    assert_eq!(before.status.code(), Some(0), "{}", text(&before.stdout));
    // The manifest pins a version for every object, and validates against the schema.
    let got = s3.boto(&format!(
        "print(s3.get_object(Bucket='bg-tamper', Key='prod/{sprefix}/session.json')['Body'].read().decode())"
    ));
    let smeta: Value = serde_json::from_str(&text(&got.stdout)).expect("session.json from S3");
    validate("session.schema.json", &smeta);
    let pinned: Vec<&str> = smeta["objects"]
        .as_array()
        .expect("objects")
        .iter()
        .map(|o| o["version"].as_str().expect("a pinned version"))
        .collect();
    let target = smeta["objects"][1]["key"]
        .as_str()
        .expect("a chunk")
        .to_string();
    let put = s3.boto(&format!(
        "r = s3.put_object(Bucket='bg-tamper', Key='prod/{target}', Body=b'[0.1, \"o\", \"forged\"]\\n', ChecksumAlgorithm='SHA256')\n\
         print('NEW', r['VersionId'])"
    ));
    let said = text(&put.stdout);
    assert!(said.contains("NEW"), "{said}{}", text(&put.stderr));
    assert!(!said.contains(pinned[1]), "a new version: {said}");
    let out = ws.cli(&["verify", &sid]);
    let line = text(&out.stdout)
        .lines()
        .find(|l| l.starts_with(&sid))
        .expect("verdict line")
        .to_string();
    assert_eq!(out.status.code(), Some(3), "{line}{}", text(&out.stderr));
    assert!(
        line.contains(&format!("{target} (object 1) has a newer version")),
        "{line}"
    );
    let exported = ws.path("after.cast");
    ws.cli_ok(&["export", &sid, "-o", exported.to_str().expect("path")]);
    let cast = std::fs::read_to_string(&exported).expect("export");
    assert!(
        cast.contains("s3-line-1") && !cast.contains("forged"),
        "export reads the pinned original: {cast}"
    );
    table.push((
        "S3: put a new version over a locked chunk (export still yields the original)",
        line,
    ));

    // A real crash: kill -9 mid-session, delete a chunk older than the last checkpoint, and
    // let the restart seal what is left as a `recovered` manifest with the gateway's own key.
    let wc = World::with(Opts {
        extra_limits: "flush_interval = \"100ms\"\ncheckpoint_interval = \"300ms\"".into(),
        ..Default::default()
    });
    let mut gw = Process::start(&wc);
    wc.grant("alice", "30m");
    let mut child = wc
        .ssh(
            "alice",
            "web-01",
            &[],
            &["for i in $(seq 1 400); do echo line-$i; sleep 0.02; done; sleep 60"],
        )
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("start ssh");
    let cp = wc.wait_event("a checkpoint covering three chunks", |e| {
        e["action"] == "recording_checkpoint" && e["objects"].as_u64().is_some_and(|n| n >= 4)
    });
    gw.kill9();
    let _ = child.kill();
    let _ = child.wait();
    let cid = last_session_id(&wc);
    let cprefix = wc.sessions()[0]["recording"]
        .as_str()
        .expect("prefix")
        .to_string();
    let cdir = wc.path("data/recordings").join(&cprefix);
    let mut chunks: Vec<std::path::PathBuf> = std::fs::read_dir(cdir.join("ch0000"))
        .expect("chunks")
        .map(|e| e.expect("entry").path())
        .collect();
    chunks.sort();
    std::fs::remove_file(&chunks[1]).expect("delete a chunk the checkpoint covers");
    let deleted_key = chunks[1]
        .strip_prefix(wc.path("data/recordings"))
        .expect("in the store")
        .display()
        .to_string();
    // Plant a chunk in the store and one in the outage spool before the restart.
    let planted_store = format!("{cprefix}/ch0000/00009998.cast");
    write_file(
        &wc.path("data/recordings").join(&planted_store),
        b"[0.1, \"o\", \"planted-in-store\"]\n",
    );
    let planted_spool = format!("{cprefix}/ch0000/00009999.cast");
    let spool_file = wc.path("data/spool").join(&planted_spool);
    std::fs::create_dir_all(spool_file.parent().expect("dir")).expect("spool dir");
    write_file(
        &wc.path("data/spool").join(&planted_spool),
        b"[0.2, \"o\", \"planted-in-spool\"]\n",
    );
    let _gw2 = Process::start(&wc);
    wait_for(
        "the restart seals the crashed session",
        Duration::from_secs(15),
        || cdir.join("session.json.sig").exists().then_some(()),
    );
    let out = wc.cli(&["verify", &cid]);
    let line = text(&out.stdout)
        .lines()
        .find(|l| l.starts_with(&cid))
        .expect("verdict line")
        .to_string();
    assert_eq!(out.status.code(), Some(3), "{line}{}", text(&out.stderr));
    let cp_id = cp["event_id"].as_str().expect("event id");
    assert!(
        line.contains(&format!("recording_checkpoint {cp_id} at")),
        "the checkpoint is named: {line}"
    );
    assert!(
        line.contains(&format!("{deleted_key} was written by the gateway"))
            && line.contains("but was deleted before the recording was sealed"),
        "the evidence ledger names the deleted chunk: {line}"
    );
    assert!(
        line.contains(&format!("{planted_store} is not in the manifest")),
        "the planted store object is not adopted: {line}"
    );
    // The planted spool file was refused: never uploaded, moved aside, on the record.
    assert!(!wc.path("data/recordings").join(&planted_spool).exists());
    assert!(!wc.path("data/spool").join(&planted_spool).exists());
    assert!(wc.path("data/spool-refused").join(&planted_spool).exists());
    for (key, what) in [
        (&planted_spool, "outage spool"),
        (&planted_store, "never wrote it"),
        (&deleted_key, "deleted"),
    ] {
        wc.wait_event(&format!("evidence_refused for {key}"), |e| {
            e["action"] == "evidence_refused"
                && e["message"]
                    .as_str()
                    .is_some_and(|m| m.contains(key.as_str()) && m.contains(what))
        });
    }
    table.push((
        "kill -9, delete a chunk older than the last checkpoint, plant a chunk in the store and one in the spool; restart seals from the evidence ledger",
        line,
    ));

    // The same crash, but the operator also removes the session's rows from the evidence
    // ledger and plants a chunk: with nothing to vouch for them, nothing is adopted.
    let wl = World::with(Opts {
        extra_limits: "flush_interval = \"100ms\"\ncheckpoint_interval = \"300ms\"".into(),
        ..Default::default()
    });
    let mut gw = Process::start(&wl);
    wl.grant("alice", "30m");
    let mut child = wl
        .ssh(
            "alice",
            "web-01",
            &[],
            &["for i in $(seq 1 200); do echo line-$i; sleep 0.02; done; sleep 60"],
        )
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("start ssh");
    wl.wait_event("a checkpoint covering two chunks", |e| {
        e["action"] == "recording_checkpoint" && e["objects"].as_u64().is_some_and(|n| n >= 3)
    });
    gw.kill9();
    let _ = child.kill();
    let _ = child.wait();
    let lid = last_session_id(&wl);
    let lprefix = wl.sessions()[0]["recording"]
        .as_str()
        .expect("prefix")
        .to_string();
    let removed = rusqlite::Connection::open(wl.path("data/state.sqlite"))
        .expect("open the state file")
        .execute(
            "DELETE FROM recording_objects WHERE session_id = ?1",
            rusqlite::params![lid],
        )
        .expect("empty the ledger");
    assert!(
        removed >= 3,
        "the ledger listed the session's objects: {removed}"
    );
    let planted = format!("{lprefix}/ch0000/00009998.cast");
    write_file(
        &wl.path("data/recordings").join(&planted),
        b"[0.1, \"o\", \"planted-over-empty-ledger\"]\n",
    );
    let _gw2 = Process::start(&wl);
    let ldir = wl.path("data/recordings").join(&lprefix);
    wait_for(
        "the restart seals the crashed session",
        Duration::from_secs(15),
        || ldir.join("session.json.sig").exists().then_some(()),
    );
    let out = wl.cli(&["verify", &lid]);
    let line = text(&out.stdout)
        .lines()
        .find(|l| l.starts_with(&lid))
        .expect("verdict line")
        .to_string();
    assert_eq!(out.status.code(), Some(3), "{line}{}", text(&out.stderr));
    assert!(
        line.contains(&format!("{planted} is not in the manifest"))
            && line.contains(&format!(
                "{lprefix}/session-start.json is not in the manifest"
            )),
        "nothing is adopted without the ledger: {line}"
    );
    wl.wait_event(&format!("evidence_refused for {planted}"), |e| {
        e["action"] == "evidence_refused"
            && e["message"]
                .as_str()
                .is_some_and(|m| m.contains(planted.as_str()) && m.contains("never wrote it"))
    });
    table.push((
        "kill -9, delete the session's evidence-ledger rows from the state store and plant a chunk; restart adopts nothing",
        line,
    ));

    println!("\ntamper table (attack → verdict):");
    for (attack, line) in &table {
        println!("| {attack} | {line} |");
    }
    drop(s3);
}
