//! The deployment examples stay deployable: the Kubernetes manifests in `deploy/kubernetes/`
//! validate against the Kubernetes 1.30 schemas (strict: no unknown field), the Deployment has
//! what a drain needs, and `deploy/haproxy/haproxy.cfg` passes `haproxy -c`. Both programs are
//! required: a missing one fails the test, never skips it (scripts/test.sh installs them).

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use super::support::{require, text};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `program` as found on PATH (pip installs console scripts in places `require` does not look).
fn on_path(program: &str, install: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let p = dir.join(program);
        if p.is_file() {
            return p;
        }
    }
    panic!("`{program}` is not on PATH: install it with `{install}` (scripts/test.sh does)");
}

/// Every YAML document in `file`, parsed by PyYAML and handed over as JSON.
fn yaml_documents(file: &Path) -> Vec<Value> {
    let out = Command::new(require("python3", "python3"))
        .args([
            "-c",
            "import json, sys, yaml\n\
             docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d is not None]\n\
             json.dump(docs, sys.stdout)",
        ])
        .arg(file)
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "python3 could not parse {} as YAML (is PyYAML installed?): {}",
        file.display(),
        text(&out.stderr)
    );
    match serde_json::from_slice(&out.stdout).expect("PyYAML's JSON") {
        Value::Array(docs) => docs,
        other => panic!("expected a list of documents, got {other}"),
    }
}

/// The manifests kubernetes-validate checks: every `*.yaml` in deploy/kubernetes/ except
/// kustomization.yaml (not a Kubernetes resource).
fn manifests() -> Vec<PathBuf> {
    let dir = repo().join("deploy/kubernetes");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .filter(|p| p.file_name().is_some_and(|n| n != "kustomization.yaml"))
        .collect();
    files.sort();
    files
}

fn name_of(p: &Path) -> String {
    p.file_name()
        .expect("file name")
        .to_string_lossy()
        .into_owned()
}

#[test]
fn kubernetes_manifests_validate_against_the_schemas() {
    let validate = on_path(
        "kubernetes-validate",
        "python3 -m pip install kubernetes-validate",
    );
    let files = manifests();
    let names: Vec<String> = files.iter().map(|p| name_of(p)).collect();
    for expected in [
        "configmap.yaml",
        "deployment.yaml",
        "pdb.yaml",
        "secret-example.yaml",
        "service.yaml",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "deploy/kubernetes/{expected} is missing (found {names:?})"
        );
    }

    let mut failed = Vec::new();
    for f in &files {
        let out = Command::new(&validate)
            .args(["--strict", "--kubernetes-version", "1.30.0"])
            .arg(f)
            .current_dir(repo())
            .output()
            .expect("run kubernetes-validate");
        let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
        println!("kubernetes-validate {}: {}\n{said}", name_of(f), out.status);
        if !out.status.success() || !said.contains("passed") {
            failed.push(format!("{}: {}\n{said}", name_of(f), out.status));
        }
    }
    assert!(
        failed.is_empty(),
        "manifests that do not validate against Kubernetes 1.30 (strict):\n{}",
        failed.join("\n")
    );

    // kustomization.yaml, if there, lists only files that exist.
    let kustomization = repo().join("deploy/kubernetes/kustomization.yaml");
    if kustomization.exists() {
        let k = &yaml_documents(&kustomization)[0];
        for r in k["resources"].as_array().expect("resources") {
            let r = r.as_str().expect("resource path");
            assert!(
                repo().join("deploy/kubernetes").join(r).is_file(),
                "kustomization.yaml lists {r}, which does not exist"
            );
        }
    }

    // What a drain and a rolling update need.
    let docs = yaml_documents(&repo().join("deploy/kubernetes/deployment.yaml"));
    let d = docs
        .iter()
        .find(|d| d["kind"] == "Deployment")
        .expect("a Deployment in deployment.yaml");
    assert_eq!(d["spec"]["replicas"], 3, "replicas");
    let pod = &d["spec"]["template"]["spec"];
    let containers = pod["containers"].as_array().expect("containers");
    let c = containers
        .iter()
        .find(|c| c["name"] == "breakglass")
        .expect("a container named breakglass");
    let ready = &c["readinessProbe"]["httpGet"];
    assert_eq!(ready["path"], "/healthz", "readiness probe: {ready}");
    assert_eq!(ready["port"], 8443, "readiness probe: {ready}");
    assert_eq!(ready["scheme"], "HTTPS", "readiness probe: {ready}");
    let pre_stop = &c["lifecycle"]["preStop"];
    assert!(
        pre_stop.get("exec").is_some() || pre_stop.get("sleep").is_some(),
        "the container needs a preStop hook that gives the drain time, got {pre_stop}"
    );
    assert!(
        pod["terminationGracePeriodSeconds"].as_u64().unwrap_or(30) >= 60,
        "terminationGracePeriodSeconds: {}",
        pod["terminationGracePeriodSeconds"]
    );
    let args: Vec<&str> = c["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|a| a.as_str().expect("arg"))
        .collect();
    assert_eq!(
        args[0], "serve",
        "the gateway is started with `serve`: {args:?}"
    );

    // Every Secret and ConfigMap key the pod mounts exists in the example files.
    let mut keys: Vec<(String, String)> = Vec::new();
    for f in ["secret-example.yaml", "configmap.yaml"] {
        for doc in yaml_documents(&repo().join("deploy/kubernetes").join(f)) {
            let name = doc["metadata"]["name"].as_str().expect("name").to_string();
            for field in ["data", "stringData"] {
                if let Some(m) = doc[field].as_object() {
                    keys.extend(m.keys().map(|k| (name.clone(), k.clone())));
                }
            }
        }
    }
    for v in pod["volumes"].as_array().expect("volumes") {
        let (source, name) = if let Some(s) = v.get("secret") {
            (s, s["secretName"].as_str())
        } else if let Some(s) = v.get("configMap") {
            (s, s["name"].as_str())
        } else {
            continue;
        };
        let name = name.expect("a volume's secret/configMap name");
        for item in source["items"].as_array().into_iter().flatten() {
            let key = item["key"].as_str().expect("item key");
            assert!(
                keys.contains(&(name.to_string(), key.to_string())),
                "volume {} maps key {key} of {name}, which the examples do not have",
                v["name"]
            );
        }
    }
    for e in c["envFrom"].as_array().into_iter().flatten() {
        if let Some(s) = e["secretRef"]["name"].as_str() {
            assert!(
                keys.iter().any(|(n, _)| n == s),
                "envFrom names Secret {s}, which secret-example.yaml lacks"
            );
        }
    }
}

#[test]
fn the_haproxy_example_config_is_valid() {
    let haproxy = require("haproxy", "haproxy");
    let cfg = repo().join("deploy/haproxy/haproxy.cfg");
    let out = Command::new(haproxy)
        .args(["-c", "-f"])
        .arg(&cfg)
        .output()
        .expect("run haproxy -c");
    let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
    println!("haproxy -c: {}\n{said}", out.status);
    assert!(
        out.status.success(),
        "haproxy -c -f {} failed ({}):\n{said}",
        cfg.display(),
        out.status
    );
    let conf = std::fs::read_to_string(&cfg).expect("read haproxy.cfg");
    // Live sessions must survive a health flap: HAProxy must not cut them when a server is
    // marked down (only a comment may mention the option).
    assert!(
        !conf
            .lines()
            .map(|l| l.split('#').next().unwrap_or(""))
            .any(|l| l.contains("shutdown-sessions")),
        "haproxy.cfg must not set on-marked-down shutdown-sessions"
    );
}

/// The TOML the ConfigMap embeds, written to a file in `dir`.
fn configmap_toml(dir: &Path) -> PathBuf {
    let docs = yaml_documents(&repo().join("deploy/kubernetes/configmap.yaml"));
    let toml = docs
        .iter()
        .find(|d| d["kind"] == "ConfigMap")
        .and_then(|d| d["data"]["breakglass.toml"].as_str())
        .expect("configmap.yaml holds data.breakglass.toml");
    let file = dir.join("breakglass.toml");
    std::fs::write(&file, toml).expect("write the config");
    file
}

#[test]
fn the_cluster_configmap_embeds_a_config_the_gateway_reads() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = configmap_toml(dir.path());
    let out = Command::new(env!("CARGO_BIN_EXE_breakglass"))
        .args(["check-config", "--offline"])
        .arg(&file)
        .env("BREAKGLASS_NODE_ID", "breakglass-0")
        .env(
            "BREAKGLASS_STATE_URL",
            "postgres://breakglass:pw@127.0.0.1:1/breakglass",
        )
        .env("BREAKGLASS_KEK", "a".repeat(64))
        .env("SPLUNK_HEC_TOKEN", "token")
        .output()
        .expect("run check-config");
    let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "check-config --offline: {said}");
    assert!(
        said.contains("valid (1 people, 2 targets)"),
        "check-config --offline: {said}"
    );
}

/// A cluster node never generates its identity: `check-config` says what is missing, `serve`
/// refuses to start, and after `keys init` both find the keys.
#[test]
fn a_cluster_config_refuses_to_generate_keys() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let file = d.join("cluster.toml");
    std::fs::write(
        &file,
        format!(
            "data_dir = \"{data}\"\nkeys_dir = \"{keys}\"\n\
             [listeners]\nssh = \"127.0.0.1:0\"\n\
             [state]\nkind = \"postgres\"\nurl = \"postgres://breakglass@127.0.0.1:1/breakglass\"\n\
             [storage]\nkind = \"local\"\npath = \"{rec}\"\n",
            data = d.join("data").display(),
            keys = d.join("keys").display(),
            rec = d.join("rec").display(),
        ),
    )
    .expect("write the config");
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_breakglass"))
            .args(args)
            .arg(&file)
            .output()
            .expect("run breakglass");
        (
            out.status.success(),
            format!("{}{}", text(&out.stdout), text(&out.stderr)),
        )
    };
    let (ok, said) = run(&["check-config"]);
    assert!(
        !ok,
        "check-config passed a cluster config without keys: {said}"
    );
    assert!(
        said.contains("FAIL  cluster identity")
            && said.contains("ssh_host_ed25519_key is missing")
            && said.contains("a cluster node would generate its own"),
        "check-config: {said}"
    );
    let (ok, said) = run(&["serve", "--config"]);
    assert!(!ok, "serve started a cluster node without keys: {said}");
    assert!(
        said.contains("cluster identity") && said.contains("keys init"),
        "serve: {said}"
    );
    assert!(
        !d.join("keys/ssh_host_ed25519_key").exists(),
        "a refused start generated a host key"
    );
    let (ok, said) = run(&["keys", "init", "--config"]);
    assert!(ok, "keys init: {said}");
    assert!(
        said.contains("created: the SSH host key"),
        "keys init: {said}"
    );
    let (_, said) = run(&["check-config"]);
    assert!(
        said.contains("ok    cluster identity"),
        "check-config after keys init: {said}"
    );
}
