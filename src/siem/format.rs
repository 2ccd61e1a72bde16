//! Event encodings a sink can choose: the seed procedure's JSON shape, OCSF 1.3 and CEF; and
//! RFC 5424 syslog framing around any of them.

use serde_json::{json, Map, Value};

use super::{AccessEvent, Action};

/// OCSF schema version the events declare.
pub const OCSF_VERSION: &str = "1.3.0";

pub use crate::config::siem::Format;

impl Format {
    /// The event as one line of text (no newline).
    pub fn line(self, e: &AccessEvent) -> String {
        match self {
            Format::Seed => json_escape_rest(serde_json::to_string(e).unwrap_or_default()),
            Format::Ocsf => json_escape_rest(ocsf(e).to_string()),
            Format::Cef => cef(e),
        }
    }

    /// The event as JSON (CEF becomes a JSON string).
    pub fn value(self, e: &AccessEvent) -> Value {
        match self {
            Format::Seed => serde_json::to_value(e).unwrap_or(Value::Null),
            Format::Ocsf => ocsf(e),
            Format::Cef => Value::String(cef(e)),
        }
    }
}

/// The OCSF class and activity of an event: (class_uid, class_name, category_uid,
/// category_name, activity_id, activity_name).
pub fn ocsf_class(e: &AccessEvent) -> (u32, &'static str, u32, &'static str, u32, &'static str) {
    const IAM: (u32, &str) = (3, "Identity & Access Management");
    const NET: (u32, &str) = (4, "Network Activity");
    const APP: (u32, &str) = (6, "Application Activity");
    let pg = e.protocol == "postgres";
    let (class, cname, (cat, catname), act, aname) = match e.action {
        Action::SessionStart if pg => (6005, "Datastore Activity", APP, 3, "Connect"),
        Action::SessionStart => (4007, "SSH Activity", NET, 1, "Open"),
        Action::SessionEnd if pg => (6005, "Datastore Activity", APP, 99, "Disconnect"),
        Action::SessionEnd => (4007, "SSH Activity", NET, 2, "Close"),
        // Cut by the gateway at the deadline or on revoke.
        Action::SessionExpired | Action::SessionRevoked if pg => {
            (6005, "Datastore Activity", APP, 99, "Terminate")
        }
        Action::SessionExpired | Action::SessionRevoked => (4007, "SSH Activity", NET, 3, "Reset"),
        Action::SessionDenied | Action::WebLogin => (3002, "Authentication", IAM, 1, "Logon"),
        Action::ForwardingRefused => (4007, "SSH Activity", NET, 5, "Refuse"),
        Action::Command => (4007, "SSH Activity", NET, 99, "Command"),
        Action::Statement => (6005, "Datastore Activity", APP, 4, "Query"),
        Action::RequestApproved | Action::GrantCreated => {
            (3005, "User Access Management", IAM, 1, "Assign Privileges")
        }
        Action::GrantRevoked | Action::RequestExpired => {
            (3005, "User Access Management", IAM, 2, "Revoke Privileges")
        }
        Action::RequestCreated => (3005, "User Access Management", IAM, 99, "Request"),
        Action::RequestDenied => (3005, "User Access Management", IAM, 99, "Deny"),
        Action::CredentialIssued => (3003, "Authorize Session", IAM, 1, "Assign Privileges"),
        Action::CredentialRotated => (3001, "Account Change", IAM, 4, "Password Reset"),
        Action::AccountEnabled => (3001, "Account Change", IAM, 2, "Enable"),
        Action::AccountDisabled => (3001, "Account Change", IAM, 5, "Disable"),
        Action::DrillFinished | Action::DrillOverdue | Action::Finding => {
            (0, "Base Event", (0, "Uncategorized"), 99, "Other")
        }
        Action::ReviewOpened
        | Action::ReviewSigned
        | Action::ReviewOverdue
        | Action::IncidentReported
        | Action::CabSigned
        | Action::IncidentOverdue
        | Action::RecordingCheckpoint
        | Action::SigningKeyRotated
        | Action::EvidenceRefused
        | Action::SiemTest
        | Action::RecordingViewed
        | Action::RecordingExported
        | Action::MetadataExported
        | Action::ActionsDropped
        | Action::RecordingSearched => (0, "Base Event", (0, "Uncategorized"), 99, "Other"),
    };
    (class, cname, cat, catname, act, aname)
}

fn severity(e: &AccessEvent) -> (u32, &'static str) {
    match (e.action, e.outcome.as_str(), e.emergency) {
        (_, _, Some(true)) => (4, "High"),
        (Action::SessionDenied | Action::ForwardingRefused, _, _) => (3, "Medium"),
        (Action::SessionRevoked | Action::ReviewOverdue | Action::IncidentOverdue, _, _) => {
            (3, "Medium")
        }
        (_, "failure", _) => (3, "Medium"),
        (Action::SessionStart, _, _) => (2, "Low"),
        _ => (1, "Informational"),
    }
}

fn split_addr(a: &str) -> (String, Option<u16>) {
    match a.parse::<std::net::SocketAddr>() {
        Ok(s) => (s.ip().to_string(), Some(s.port())),
        Err(_) => (a.to_string(), None),
    }
}

/// The event as OCSF 1.3.
pub fn ocsf(e: &AccessEvent) -> Value {
    let (class_uid, class_name, category_uid, category_name, activity_id, activity_name) =
        ocsf_class(e);
    let (severity_id, severity_name) = severity(e);
    let time = chrono::DateTime::parse_from_rfc3339(&e.timestamp)
        .map(|t| t.timestamp_millis())
        .unwrap_or(0);
    let success = e.outcome == crate::siem::Outcome::Success;
    let mut o = Map::new();
    o.insert("class_uid".into(), json!(class_uid));
    o.insert("class_name".into(), json!(class_name));
    o.insert("category_uid".into(), json!(category_uid));
    o.insert("category_name".into(), json!(category_name));
    o.insert("activity_id".into(), json!(activity_id));
    o.insert("activity_name".into(), json!(activity_name));
    o.insert(
        "type_uid".into(),
        json!(class_uid as u64 * 100 + activity_id as u64),
    );
    o.insert(
        "type_name".into(),
        json!(format!("{class_name}: {activity_name}")),
    );
    o.insert("time".into(), json!(time));
    o.insert("severity_id".into(), json!(severity_id));
    o.insert("severity".into(), json!(severity_name));
    o.insert("status_id".into(), json!(if success { 1 } else { 2 }));
    o.insert(
        "status".into(),
        json!(if success { "Success" } else { "Failure" }),
    );
    if let Some(r) = &e.reason {
        o.insert("status_detail".into(), json!(r));
    }
    let message = e
        .message
        .clone()
        .or_else(|| e.command.clone())
        .unwrap_or_else(|| super::summary(e));
    o.insert("message".into(), json!(message));
    let mut metadata = json!({
        "version": OCSF_VERSION,
        "uid": e.event_id,
        "product": {
            "name": "breakglass",
            "vendor_name": "breakglass",
            "version": env!("CARGO_PKG_VERSION"),
        },
        "log_name": e.event_type,
        "event_code": e.action.as_str(),
    });
    if let Some(c) = &e.correlation_id {
        metadata["correlation_uid"] = json!(c);
    }
    o.insert("metadata".into(), metadata);
    let mut user = json!({ "name": e.actor });
    if let Some(p) = &e.person {
        user["uid"] = json!(p);
    }
    let mut actor = json!({ "user": user });
    if let Some(s) = &e.session_id {
        actor["session"] = json!({ "uid": s, "is_remote": true });
    }
    o.insert("actor".into(), actor);
    if let Some(a) = &e.client_addr {
        let (ip, port) = split_addr(a);
        let mut src = json!({ "ip": ip });
        if let Some(p) = port {
            src["port"] = json!(p);
        }
        o.insert("src_endpoint".into(), src);
    }
    if let Some(t) = &e.target {
        o.insert(
            "dst_endpoint".into(),
            json!({ "name": t, "svc_name": e.protocol }),
        );
    }
    if let (Some(i), Some(o2)) = (e.bytes_in, e.bytes_out) {
        o.insert(
            "traffic".into(),
            json!({ "bytes_in": i, "bytes_out": o2, "bytes": i + o2 }),
        );
    }
    if let Some(d) = e.duration_ms {
        o.insert("duration".into(), json!(d));
    }
    // OCSF's `count`: how many events this one stands for (the lost action events).
    if let Some(n) = e.actions_dropped {
        o.insert("count".into(), json!(n));
    }
    match class_uid {
        6005 => {
            if let Some(t) = &e.target {
                o.insert(
                    "database".into(),
                    json!({ "name": t, "type_id": 99, "type": "PostgreSQL" }),
                );
            }
            if let Some(q) = &e.command {
                o.insert("query_info".into(), json!({ "query_string": q }));
            }
        }
        3002 => {
            o.insert("is_remote".into(), json!(true));
            o.insert("user".into(), json!({ "name": e.actor }));
            if let Some(t) = &e.target {
                o.insert("service".into(), json!({ "name": t }));
            }
        }
        3005 | 3003 | 3001 => {
            o.insert(
                "user".into(),
                json!({ "name": e.person.clone().unwrap_or_else(|| e.actor.clone()) }),
            );
            if class_uid != 3001 {
                o.insert(
                    "privileges".into(),
                    json!([format!(
                        "break-glass:{}",
                        e.target.clone().unwrap_or_default()
                    )]),
                );
            }
        }
        _ => {}
    }
    // Everything breakglass knows that OCSF has no attribute for.
    let mut unmapped = serde_json::to_value(e).unwrap_or(Value::Null);
    if let Some(m) = unmapped.as_object_mut() {
        m.retain(|_, v| !v.is_null());
    }
    o.insert("unmapped".into(), unmapped);
    Value::Object(o)
}

/// JSON text with the characters `serde_json` leaves raw but a terminal or log viewer acts
/// on (DEL, C1 controls, bidirectional overrides) written as `\uXXXX` escapes. They can occur
/// only inside JSON strings, where the escape means the same character, so the value is
/// unchanged; C0 controls are already escaped by `serde_json`.
fn json_escape_rest(line: String) -> String {
    if !line.chars().any(crate::text::is_refused) {
        return line;
    }
    let mut out = String::with_capacity(line.len() + 16);
    for c in line.chars() {
        if crate::text::is_refused(c) {
            out.push_str(&format!("\\u{:04x}", c as u32));
        } else {
            out.push(c);
        }
    }
    out
}

/// A control character or bidirectional override in CEF text, as the literal text
/// `\u{..}` (its backslash escaped, so a CEF parser reads a backslash, not an escape).
fn cef_control(out: &mut String, c: char) {
    out.push_str(&format!("\\\\u{{{:x}}}", c as u32));
}

/// A CEF header field: `\` and `|` escaped; line breaks become spaces and other control
/// characters escapes, so a header never ends early or carries terminal sequences.
fn cef_header(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '|' => out.push_str("\\|"),
            '\r' | '\n' => out.push(' '),
            c if crate::text::is_refused(c) => cef_control(&mut out, c),
            c => out.push(c),
        }
    }
    out
}

/// A CEF extension value: `\`, `=` escaped, line breaks as `\n`/`\r` as CEF defines them,
/// other control characters and bidirectional overrides as escapes.
fn cef_value(s: &str) -> String {
    let s = s.replace("\r\n", "\n");
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '=' => out.push_str("\\="),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c if crate::text::is_refused(c) => cef_control(&mut out, c),
            c => out.push(c),
        }
    }
    out
}

/// The event as `CEF:0|breakglass|breakglass|VERSION|ACTION|NAME|SEVERITY|EXTENSIONS`.
pub fn cef(e: &AccessEvent) -> String {
    let (_, _, _, _, _, activity) = ocsf_class(e);
    let sev = match severity(e).0 {
        4 => 8,
        3 => 6,
        2 => 3,
        _ => 1,
    };
    let time = chrono::DateTime::parse_from_rfc3339(&e.timestamp)
        .map(|t| t.timestamp_millis())
        .unwrap_or(0);
    let mut ext: Vec<(&str, String)> = vec![
        ("rt", time.to_string()),
        ("externalId", e.event_id.clone()),
        ("suser", e.actor.clone()),
        ("act", e.action.as_str().to_string()),
        ("outcome", e.outcome.as_str().to_string()),
        ("app", e.protocol.clone()),
        ("cat", e.event_type.clone()),
    ];
    let mut opt = |k: &'static str, v: &Option<String>| {
        if let Some(v) = v {
            ext.push((k, v.clone()));
        }
    };
    opt("duser", &e.person);
    opt("dhost", &e.target);
    opt("cs1", &e.session_id);
    opt("cs2", &e.correlation_id);
    opt("cs3", &e.incident_id);
    opt("cs4", &e.justification);
    opt("reason", &e.reason);
    opt("msg", &e.message);
    opt("request", &e.command);
    if let Some(a) = &e.client_addr {
        let (ip, port) = split_addr(a);
        ext.push(("src", ip));
        if let Some(p) = port {
            ext.push(("spt", p.to_string()));
        }
    }
    if let Some(b) = e.bytes_in {
        ext.push(("in", b.to_string()));
    }
    if let Some(b) = e.bytes_out {
        ext.push(("out", b.to_string()));
    }
    if let Some(n) = e.actions_dropped {
        ext.push(("cnt", n.to_string()));
    }
    if let Some(q) = &e.query {
        ext.push(("cs5", q.clone()));
    }
    if let Some(ids) = &e.session_ids {
        ext.push(("cs6", ids.join(",")));
    }
    for (k, label) in [
        ("cs1Label", "sessionId"),
        ("cs2Label", "correlationId"),
        ("cs3Label", "incidentId"),
        ("cs4Label", "justification"),
        ("cs5Label", "searchQuery"),
        ("cs6Label", "sessionIds"),
    ] {
        let base = &k[..3];
        if ext.iter().any(|(n, _)| *n == base) {
            ext.push((k, label.to_string()));
        }
    }
    let ext = ext
        .into_iter()
        .map(|(k, v)| format!("{k}={}", cef_value(&v)))
        .collect::<Vec<_>>()
        .join(" ");
    format!(
        "CEF:0|breakglass|breakglass|{}|{}|{}|{}|{}",
        cef_header(env!("CARGO_PKG_VERSION")),
        cef_header(e.action.as_str()),
        cef_header(&format!("break-glass {activity}")),
        sev,
        ext
    )
}

/// An RFC 5424 message: `<PRI>1 TIMESTAMP HOST APP PROCID MSGID [SD] MSG`. Facility is
/// authpriv (10); severity is notice for failures and informational otherwise. The event id
/// goes into structured data so a receiver can de-duplicate without parsing the body. The
/// SD-ID uses 32473, the private enterprise number IANA reserves for examples (RFC 5612).
pub fn syslog5424(e: &AccessEvent, format: Format, host: &str, app: &str) -> String {
    let sev = if e.outcome == crate::siem::Outcome::Failure {
        5
    } else {
        6
    };
    let pri = 10 * 8 + sev;
    let sd_escape = |s: &str| {
        s.replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace(']', "\\]")
    };
    let mut sd = format!("[breakglass@32473 eventId=\"{}\"", sd_escape(&e.event_id));
    if let Some(s) = &e.session_id {
        sd.push_str(&format!(" sessionId=\"{}\"", sd_escape(s)));
    }
    if let Some(c) = &e.correlation_id {
        sd.push_str(&format!(" correlationId=\"{}\"", sd_escape(c)));
    }
    sd.push(']');
    let field = |s: &str, max: usize| -> String {
        let v: String = s
            .chars()
            .filter(|c| c.is_ascii_graphic())
            .take(max)
            .collect();
        if v.is_empty() {
            "-".into()
        } else {
            v
        }
    };
    format!(
        "<{pri}>1 {} {} {} {} {} {sd} {}",
        e.timestamp,
        field(host, 255),
        field(app, 48),
        std::process::id(),
        field(e.action.as_str(), 32),
        format.line(e)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every_action() -> Vec<AccessEvent> {
        let all = [
            Action::SessionStart,
            Action::SessionEnd,
            Action::SessionDenied,
            Action::SessionExpired,
            Action::SessionRevoked,
            Action::ForwardingRefused,
            Action::GrantCreated,
            Action::GrantRevoked,
            Action::RequestCreated,
            Action::RequestApproved,
            Action::RequestDenied,
            Action::RequestExpired,
            Action::ReviewOpened,
            Action::ReviewSigned,
            Action::ReviewOverdue,
            Action::CredentialIssued,
            Action::CredentialRotated,
            Action::AccountEnabled,
            Action::AccountDisabled,
            Action::DrillFinished,
            Action::DrillOverdue,
            Action::Finding,
            Action::IncidentReported,
            Action::CabSigned,
            Action::IncidentOverdue,
            Action::RecordingCheckpoint,
            Action::SigningKeyRotated,
            Action::Command,
            Action::Statement,
            Action::SiemTest,
            Action::RecordingViewed,
            Action::RecordingExported,
            Action::MetadataExported,
            Action::WebLogin,
            Action::EvidenceRefused,
            Action::ActionsDropped,
            Action::RecordingSearched,
        ];
        let mut out = Vec::new();
        for proto in ["ssh", "postgres"] {
            for a in all {
                let mut e = AccessEvent::new(a, "alice");
                e.protocol = proto.into();
                e.person = Some("alice".into());
                e.target = Some("web-01".into());
                e.session_id = Some("s-1".into());
                e.correlation_id = Some("g-1".into());
                e.client_addr = Some("127.0.0.1:5555".into());
                e.command = Some("DROP TABLE x; -- a=b|c\\d\nnext".into());
                out.push(e);
            }
        }
        out
    }

    #[test]
    fn ocsf_classes_and_type_uids_are_consistent() {
        let schema: Value = serde_json::from_str(include_str!(
            "../../recordings-schema/ocsf-event.schema.json"
        ))
        .expect("schema");
        let v = jsonschema::validator_for(&schema).expect("valid schema");
        let mut classes = std::collections::BTreeSet::new();
        for e in every_action() {
            let o = ocsf(&e);
            let errs: Vec<String> = v.iter_errors(&o).map(|e| e.to_string()).collect();
            assert!(errs.is_empty(), "{}: {errs:?}", e.action.as_str());
            let class = o["class_uid"].as_u64().expect("class");
            let act = o["activity_id"].as_u64().expect("activity");
            assert_eq!(o["type_uid"].as_u64(), Some(class * 100 + act));
            assert_eq!(o["metadata"]["uid"], json!(e.event_id));
            assert_eq!(o["metadata"]["correlation_uid"], json!("g-1"));
            classes.insert(class);
        }
        for want in [4007, 6005, 3003, 3005, 3001, 3002] {
            assert!(classes.contains(&want), "class {want} is used");
        }
    }

    #[test]
    fn cef_escapes_headers_and_extensions() {
        let mut e = AccessEvent::new(Action::Statement, "al|ice");
        e.command = Some("a=b\\c\nd".into());
        let c = cef(&e);
        assert!(c.starts_with("CEF:0|breakglass|breakglass|"), "{c}");
        let parts: Vec<&str> = c.splitn(8, '|').collect();
        assert_eq!(parts[5], "break-glass Query", "{c}");
        assert!(
            parts[7].starts_with("rt="),
            "extensions follow the seventh pipe: {c}"
        );
        assert!(c.contains("request=a\\=b\\\\c\\nd"), "{c}");
        e.justification = Some("\x1b]52;c;ZXZpbA==\x07 \u{202E}x\r\ny".into());
        let c = cef(&e);
        assert!(
            c.contains("cs4=\\\\u{1b}]52;c;ZXZpbA\\=\\=\\\\u{7} \\\\u{202e}x\\ny"),
            "{c}"
        );
        assert!(!c.chars().any(crate::text::is_refused), "{c:?}");
        assert!(
            c.contains("suser=al|ice"),
            "pipes are literal in extensions: {c}"
        );
        assert!(!c.contains('\n'));
    }

    #[test]
    fn audit_pipeline_fields_reach_ocsf_and_cef() {
        let mut dropped = AccessEvent::new(Action::ActionsDropped, "alice");
        dropped.outcome = crate::siem::Outcome::Failure;
        dropped.actions_dropped = Some(7);
        let mut searched = AccessEvent::new(Action::RecordingSearched, "bob");
        searched.query = Some("rm -rf|x=y".into());
        searched.session_ids = Some(vec!["s-1".into(), "s-2".into()]);
        let table: [(&AccessEvent, &str, &[&str]); 2] = [
            (&dropped, "actions_dropped", &["cnt=7", "outcome=failure"]),
            (
                &searched,
                "recording_searched",
                &[
                    "cs5=rm -rf|x\\=y",
                    "cs5Label=searchQuery",
                    "cs6=s-1,s-2",
                    "cs6Label=sessionIds",
                ],
            ),
        ];
        for (e, code, cef_has) in table {
            let o = ocsf(e);
            assert_eq!(o["metadata"]["event_code"], code);
            assert_eq!(o["unmapped"]["action"], code);
            let c = cef(e);
            for want in cef_has {
                assert!(c.contains(want), "{want} in {c}");
            }
        }
        assert_eq!(ocsf(&dropped)["count"], 7);
        assert_eq!(ocsf(&dropped)["severity_id"], 3, "a loss is a failure");
        assert_eq!(ocsf(&searched)["unmapped"]["query"], "rm -rf|x=y");
        assert_eq!(
            ocsf(&searched)["unmapped"]["session_ids"],
            json!(["s-1", "s-2"])
        );
        assert!(ocsf(&searched).get("count").is_none());
    }

    #[test]
    fn syslog_lines_follow_rfc5424() {
        let mut e = AccessEvent::new(Action::SessionDenied, "alice");
        e.outcome = crate::siem::Outcome::Failure;
        e.session_id = Some("s\"]1".into());
        let m = syslog5424(&e, Format::Seed, "gw host", "breakglass");
        assert!(m.starts_with("<85>1 "), "{m}");
        let parts: Vec<&str> = m.splitn(7, ' ').collect();
        assert_eq!(parts[2], "gwhost");
        assert_eq!(parts[3], "breakglass");
        assert_eq!(parts[5], "session_denied");
        assert!(m.contains("sessionId=\"s\\\"\\]1\""), "{m}");
        assert!(m.ends_with('}'), "the JSON body ends the message: {m}");

        // No raw control character or bidi override in MSG, whatever the event holds; the
        // JSON still reads back as the same text.
        e.justification = Some("a\x1b[2J\nb\u{9b}c\u{7f}\u{202E}d".into());
        for format in [Format::Seed, Format::Ocsf, Format::Cef] {
            let m = syslog5424(&e, format, "gw", "breakglass");
            assert!(!m.chars().any(crate::text::is_refused), "{format:?}: {m:?}");
        }
        let line = Format::Seed.line(&e);
        let back: Value = serde_json::from_str(&line).expect("json");
        assert_eq!(back["justification"], "a\x1b[2J\nb\u{9b}c\u{7f}\u{202E}d");
    }
}
