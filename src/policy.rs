//! Who may see what: the one visibility rule every surface applies (the SSH control channel,
//! the JSON API, the web UI). People see their own requests, grants and sessions; approvers
//! and custodians of a target see that target's; reviewers, auditors and admins see
//! everything (auditors read-only, which the surfaces enforce on writes).

use crate::config::TargetConfig;

/// Whether these roles see every person's requests, grants and sessions.
pub fn sees_everything(roles: &[String]) -> bool {
    roles
        .iter()
        .any(|r| r == "reviewer" || r == "auditor" || r == "admin")
}

/// Whether `viewer` (with `roles`) may see a request, grant or session of `person` on
/// `target` (None: a target the config no longer names).
pub fn may_see(
    viewer: &str,
    roles: &[String],
    person: &str,
    target: Option<&TargetConfig>,
) -> bool {
    person == viewer
        || sees_everything(roles)
        || target.is_some_and(|t| {
            t.is_approver(viewer, roles) || t.custodians.iter().any(|c| c == viewer)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn people_see_their_own_and_their_targets_and_overseers_see_all() {
        const KEY: &str =
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGb7mZ1Bq0Ckq8xN3sKZ0x0pXqk8iJ9C1m3xNnXo9b7c alice";
        let mut cfg = crate::config::Config::from_toml(&format!(
            "data_dir = \"/tmp/bg\"\n[listeners]\nssh = \"127.0.0.1:2222\"\n\
             [[people]]\nname = \"alice\"\nssh_keys = [\"{KEY}\"]\n\
             [[targets]]\nname = \"web-01\"\naddress = \"127.0.0.1:22\"\nhost_key = \"{KEY}\"\nlogin = \"root\"\n"
        ))
        .expect("config");
        let web = cfg.targets.get_mut("web-01").expect("target");
        web.approvers = vec!["bob".into(), "role:oncall-lead".into()];
        web.custodians = vec!["carol".into()];
        let t = cfg.targets.get("web-01");
        let none: Vec<String> = Vec::new();
        let role = |r: &str| vec![r.to_string()];
        assert!(may_see("alice", &none, "alice", t));
        assert!(!may_see("dave", &none, "alice", t));
        assert!(
            may_see("bob", &none, "alice", t),
            "an approver sees the target's"
        );
        assert!(
            may_see("carol", &none, "alice", t),
            "a custodian sees the target's"
        );
        assert!(
            may_see("erin", &role("oncall-lead"), "alice", t),
            "an approver by role"
        );
        for r in ["reviewer", "auditor", "admin"] {
            assert!(
                may_see("erin", &role(r), "alice", None),
                "{r} sees everything"
            );
        }
        assert!(
            !may_see("bob", &none, "alice", None),
            "no target, no approver rights"
        );
    }
}
