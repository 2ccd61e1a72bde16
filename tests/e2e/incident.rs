//! The incident after the fact, over a real `ssh` session: the timeline's overdue alert, the
//! incident report (rendered by headless Chromium, its manifest verified, an edit detected),
//! the structured review's answers in it, and the CAB review signed once.

use std::path::Path;

use super::support::*;

/// The DOM headless Chromium builds from the report, with a screenshot next to it.
fn render_in_chromium(html: &Path, shot: &Path) -> String {
    let chromium = require("chromium", "chromium");
    let url = format!("file://{}", html.display());
    let common = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--window-size=1280,2400",
    ];
    let out = std::process::Command::new(&chromium)
        .args(common)
        .arg(format!("--screenshot={}", shot.display()))
        .arg(&url)
        .output()
        .expect("run chromium");
    assert!(
        shot.exists(),
        "chromium saved no screenshot: {}",
        text(&out.stderr)
    );
    let out = std::process::Command::new(&chromium)
        .args(common)
        .arg("--dump-dom")
        .arg(&url)
        .output()
        .expect("run chromium");
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout)
}

/// The `data-state` of a timeline row in the rendered DOM.
fn state_of(dom: &str, item: &str) -> String {
    let at = dom
        .find(&format!("data-item=\"{item}\""))
        .unwrap_or_else(|| panic!("no {item} row in the timeline"));
    let rest = &dom[at..];
    let s = rest.find("data-state=\"").expect("state") + "data-state=\"".len();
    rest[s..s + rest[s..].find('"').expect("quote")].to_string()
}

fn the_html(dir: &Path) -> std::path::PathBuf {
    std::fs::read_dir(dir)
        .expect("report dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "html"))
        .expect("an html file")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incident_gets_its_timeline_report_and_cab_review() {
    let w = World::with(Opts {
        // The report is due 2 s after the resolution, so this test sees it go overdue; the
        // CAB has an hour.
        extra_config: "[incidents]\nreport_within = \"2s\"\ncab_within = \"1h\"\n\n[findings]\nodd_hours = \"off\"\n".into(),
        ..Default::default()
    });
    let gw = InProcess::start(&w).await;
    let (code, out, err) = control(
        &w,
        "alice",
        "breakglass",
        "request web-01 --reason disk full on web-01 --incident INC-77 --scenario production_outage --for 10m",
    )
    .await;
    assert_eq!(code, 0, "{out}{err}");
    let req = request_id(&out);
    let (code, out, err) = control(&w, "bob", "breakglass", &format!("approve {req}")).await;
    assert_eq!(code, 0, "{out}{err}");
    let run = output(w.ssh("alice", "web-01", &[], &["rm -rf /tmp/bg-incident-x"])).await;
    assert!(run.status.success(), "{}", text(&run.stderr));
    w.wait_ended(1);
    // A CAB review before the incident is resolved is refused.
    let (code, _, err) = control(
        &w,
        "dave",
        "breakglass",
        "cab INC-77 --outcome accepted --notes early",
    )
    .await;
    assert_eq!(code, 1);
    assert!(err.contains("not resolved"), "{err}");
    // Revoking the grant resolves the incident; rotation follows.
    let (code, out, err) = control(
        &w,
        "bob",
        "breakglass",
        &format!("revoke {req} --reason resolved"),
    )
    .await;
    assert_eq!(code, 0, "{out}{err}");
    w.wait_event("the rotation after the grant", |e| {
        e["action"] == "credential_rotated" && e["correlation_id"] == req.as_str()
    });
    // No report 2 s after the resolution: one overdue event (and alert), once.
    let overdue = w.wait_event("the report overdue", |e| {
        e["action"] == "incident_overdue" && e["item"] == "report"
    });
    assert_eq!(overdue["incident_id"], "INC-77", "{overdue}");
    assert_eq!(overdue["outcome"], "failure", "{overdue}");

    // The review, answered in full.
    let (code, out, err) = control(
        &w,
        "dave",
        "breakglass",
        &format!(
            "review {req} --findings one rm -rf of a scratch dir --thresholds-met yes \
             --escalation-possible no --root-cause log rotation stopped --actions-taken removed the scratch dir \
             --procedure-update no"
        ),
    )
    .await;
    assert_eq!(code, 0, "{out}{err}");

    // The report.
    let dir = w.path("report-1");
    let out = w.cli(&[
        "incident-report",
        "INC-77",
        "-o",
        dir.to_str().expect("utf-8"),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let html_path = the_html(&dir);
    let html = std::fs::read_to_string(&html_path).expect("html");
    for external in ["<script", "src=", "href=", "url(", "@import"] {
        assert!(
            !html.contains(external),
            "{external}: the report is self-contained"
        );
    }
    let dom = render_in_chromium(&html_path, &w.path("incident-report.png"));
    assert_eq!(
        state_of(&dom, "rotation"),
        "met",
        "rotation within the hour"
    );
    assert_eq!(state_of(&dom, "report"), "overdue", "written after 2 s");
    assert_eq!(state_of(&dom, "cab"), "pending");
    for part in [
        req.as_str(),
        "rm -rf /tmp/bg-incident-x",
        "destructive",
        "removed the scratch dir",
        "log rotation stopped",
        "bob at ",
    ] {
        assert!(dom.contains(part), "the report shows {part}");
    }
    assert!(
        dom.contains("<span class=\"ok\""),
        "an integrity verdict and SIEM delivery are shown"
    );
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("manifest.json")).expect("manifest"),
    )
    .expect("json");
    validate("metadata-export-manifest.schema.json", &manifest);
    assert_eq!(manifest["kind"], "breakglass-incident-report");
    let verify = |d: &Path| w.cli(&["audit-export", "verify", d.to_str().expect("utf-8")]);
    assert_eq!(verify(&dir).status.code(), Some(0));
    // An edited report is caught.
    let copy = w.path("report-edited");
    copy_tree(&dir, &copy);
    let edited = the_html(&copy);
    writable(&edited);
    std::fs::write(&edited, html.replace("overdue", "met")).expect("edit");
    let v = verify(&copy);
    assert_eq!(v.status.code(), Some(3), "{}", text(&v.stdout));
    assert!(
        text(&v.stdout).contains("content modified"),
        "{}",
        text(&v.stdout)
    );

    // The approver may not sign the CAB review of the incident they approved.
    let (code, _, err) = control(
        &w,
        "bob",
        "breakglass",
        "cab INC-77 --outcome accepted --notes fine by me",
    )
    .await;
    assert_eq!(code, 1);
    assert!(
        err.contains("took part in this incident (approver)"),
        "{err}"
    );
    // The CAB signs once; the record is kept with the evidence and in the SIEM.
    let (code, out, err) = control(
        &w,
        "dave",
        "breakglass",
        "cab INC-77 --outcome actions-required --notes restart log rotation monitoring",
    )
    .await;
    assert_eq!(code, 0, "{out}{err}");
    let signed = w.wait_event("the CAB review", |e| e["action"] == "cab_signed");
    assert_eq!(signed["item"], "actions-required", "{signed}");
    let (code, _, err) = control(
        &w,
        "dave",
        "breakglass",
        "cab INC-77 --outcome accepted --notes changed my mind",
    )
    .await;
    assert_eq!(code, 1);
    assert!(err.contains("immutable"), "{err}");
    let dir2 = w.path("report-2");
    let out = w.cli(&[
        "incident-report",
        "INC-77",
        "-o",
        dir2.to_str().expect("utf-8"),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let html2 = std::fs::read_to_string(the_html(&dir2)).expect("html");
    assert!(
        html2.contains("data-item=\"cab\" data-state=\"met\""),
        "{html2}"
    );
    assert!(html2.contains("restart log rotation monitoring"));
    // The web page serves the same report to reviewers, and to nobody else.
    let dave = api_token(&w, "dave").await;
    let page = std::process::Command::new(require("curl", "curl"))
        .args(["-s", "-H", &format!("Authorization: Bearer {dave}")])
        .arg(format!(
            "http://127.0.0.1:{}/api/v1/incidents/INC-77/report",
            w.http_port
        ))
        .output()
        .expect("curl");
    let page = text(&page.stdout);
    assert!(
        page.contains("data-item=\"cab\" data-state=\"met\""),
        "{page}"
    );
    let alice = api_token(&w, "alice").await;
    let (code, body) = api(
        &w,
        Some(&alice),
        "GET",
        "/api/v1/incidents/INC-77/report",
        None,
    )
    .await;
    assert_eq!(code, 403, "{body}");
    let (code, body) = api(
        &w,
        Some(&dave),
        "GET",
        "/api/v1/incidents/INC-NONE/report",
        None,
    )
    .await;
    assert_eq!(code, 404, "{body}");
    w.wait_event("the look at the report is on the record", |e| {
        e["action"] == "recording_viewed" && e["incident_id"] == "INC-77" && e["actor"] == "dave"
    });
    // An unknown incident is an error, not an empty report.
    let out = w.cli(&[
        "incident-report",
        "INC-NONE",
        "-o",
        w.path("r3").to_str().expect("utf-8"),
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("no grant has the incident id"),
        "{}",
        text(&out.stderr)
    );
    gw.stop().await;
    // The overdue item alerted once however long the gateway ran.
    let n = w
        .siem_events()
        .into_iter()
        .filter(|e| e["action"] == "incident_overdue" && e["item"] == "report")
        .count();
    assert_eq!(n, 1);
    validate_all_events(&w);
}
