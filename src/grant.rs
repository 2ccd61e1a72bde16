//! Grant rules: whether a person may use a target now, and the session's one deadline.

use chrono::{DateTime, Utc};

/// A time-boxed permission for one person to use one target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub id: String,
    pub person: String,
    pub target: String,
    /// Why the access is needed, as the requester wrote it.
    pub reason: String,
    pub incident_id: String,
    /// Who created it (an operator on the host, or later an approval flow).
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub revoked_by: Option<String>,
    pub revoke_reason: Option<String>,
    /// The request this grant answers (None for operator grants).
    pub request_id: Option<String>,
    /// Emergency self-service grants must be reviewed.
    pub review_required: bool,
}

/// The state of a grant at a moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrantState {
    Active,
    Expired,
    Revoked,
}

impl Grant {
    /// Ties every event of this break-glass use together: the request id when there was a
    /// request, else the grant id.
    pub fn correlation_id(&self) -> &str {
        self.request_id.as_deref().unwrap_or(&self.id)
    }

    /// The grant's state at `at`.
    pub fn state_at(&self, at: DateTime<Utc>) -> GrantState {
        if self.revoked_at.is_some() {
            GrantState::Revoked
        } else if at >= self.expires_at {
            GrantState::Expired
        } else {
            GrantState::Active
        }
    }
}

/// Why a session was refused. The text is shown to the client and goes in the SIEM event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denial {
    UnknownKey {
        fingerprint: String,
    },
    UnknownTarget {
        target: String,
    },
    WrongProtocol {
        target: String,
    },
    NoGrant {
        person: String,
        target: String,
    },
    Expired {
        grant_id: String,
        at: DateTime<Utc>,
    },
    Revoked {
        grant_id: String,
        at: DateTime<Utc>,
    },
    HostKeyMismatch {
        target: String,
        expected: String,
        got: String,
    },
    Upstream {
        target: String,
        why: String,
    },
    RecordingUnavailable {
        why: String,
    },
    Internal {
        why: String,
    },
    /// The listener holds `limits.max_connections` authenticated connections already.
    AtCapacity {
        limit: usize,
    },
}

impl Denial {
    /// A short machine-readable code for SIEM events.
    pub fn code(&self) -> &'static str {
        match self {
            Denial::UnknownKey { .. } => "unknown_key",
            Denial::UnknownTarget { .. } => "unknown_target",
            Denial::WrongProtocol { .. } => "wrong_protocol",
            Denial::NoGrant { .. } => "no_grant",
            Denial::Expired { .. } => "grant_expired",
            Denial::Revoked { .. } => "grant_revoked",
            Denial::HostKeyMismatch { .. } => "host_key_mismatch",
            Denial::Upstream { .. } => "upstream_unreachable",
            Denial::RecordingUnavailable { .. } => "recording_unavailable",
            Denial::Internal { .. } => "internal_error",
            Denial::AtCapacity { .. } => "gateway_full",
        }
    }

    /// Which side caused it.
    pub fn side(&self) -> Side {
        match self {
            Denial::UnknownKey { .. }
            | Denial::UnknownTarget { .. }
            | Denial::WrongProtocol { .. }
            | Denial::NoGrant { .. }
            | Denial::Expired { .. }
            | Denial::Revoked { .. } => Side::Client,
            Denial::HostKeyMismatch { .. } | Denial::Upstream { .. } => Side::Upstream,
            Denial::RecordingUnavailable { .. }
            | Denial::Internal { .. }
            | Denial::AtCapacity { .. } => Side::Internal,
        }
    }
}

impl std::fmt::Display for Denial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ts = |t: &DateTime<Utc>| crate::clock::rfc3339(*t);
        match self {
            Denial::UnknownKey { fingerprint } => {
                write!(f, "access denied: key {fingerprint} is not registered to any person")
            }
            Denial::UnknownTarget { target } => {
                write!(f, "access denied: there is no target named `{target}`")
            }
            Denial::WrongProtocol { target } => write!(
                f,
                "access denied: {target} is a PostgreSQL target; connect to it with psql through the gateway"
            ),
            Denial::NoGrant { person, target } => write!(
                f,
                "access denied: {person} has no break-glass grant for {target}; ask for one first"
            ),
            Denial::Expired { grant_id, at } => write!(
                f,
                "access denied: your grant {grant_id} for this target expired at {}",
                ts(at)
            ),
            Denial::Revoked { grant_id, at } => write!(
                f,
                "access denied: your grant {grant_id} for this target was revoked at {}",
                ts(at)
            ),
            Denial::HostKeyMismatch { target, expected, got } => write!(
                f,
                "session refused: target {target} presented host key {got}, but {expected} is pinned; possible man-in-the-middle"
            ),
            Denial::Upstream { target, why } => {
                write!(f, "session refused: cannot reach target {target}: {why}")
            }
            Denial::RecordingUnavailable { why } => write!(
                f,
                "session refused: the recording cannot be opened ({why}); break-glass sessions never run unrecorded"
            ),
            Denial::Internal { why } => write!(f, "session refused: gateway error: {why}"),
            Denial::AtCapacity { limit } => write!(
                f,
                "session refused: the gateway holds its limit of {limit} sessions (limits.max_connections); try again shortly"
            ),
        }
    }
}

/// Decides admission from the grant the store found for (person, target).
pub fn admit(
    person: &str,
    target: &str,
    grant: Option<Grant>,
    now: DateTime<Utc>,
) -> Result<Grant, Denial> {
    let Some(g) = grant else {
        return Err(Denial::NoGrant {
            person: person.to_string(),
            target: target.to_string(),
        });
    };
    match g.state_at(now) {
        GrantState::Active => Ok(g),
        GrantState::Expired => Err(Denial::Expired {
            grant_id: g.id,
            at: g.expires_at,
        }),
        GrantState::Revoked => Err(Denial::Revoked {
            at: g.revoked_at.unwrap_or(now),
            grant_id: g.id,
        }),
    }
}

/// The one absolute deadline of a session: min(grant expiry, start + max session TTL).
/// Revocation later moves it to "now".
pub fn deadline(
    grant: &Grant,
    started: DateTime<Utc>,
    max_ttl: std::time::Duration,
) -> DateTime<Utc> {
    let cap = chrono::Duration::from_std(max_ttl)
        .ok()
        .and_then(|d| started.checked_add_signed(d))
        .unwrap_or(grant.expires_at);
    grant.expires_at.min(cap)
}

/// Whose fault a refusal or failure is: the SIEM's `side`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    /// The client asked for something it may not have, or broke the protocol.
    Client,
    /// The target could not be reached or refused the gateway.
    Upstream,
    /// The gateway's own parts (recording, state store, SIEM) failed.
    Internal,
}

impl Side {
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Upstream => "upstream",
            Side::Internal => "internal",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Duration;

    fn grant(now: DateTime<Utc>, mins: i64, revoked: bool) -> Grant {
        Grant {
            id: "g1".into(),
            person: "alice".into(),
            target: "web".into(),
            reason: "r".into(),
            incident_id: "INC-1".into(),
            created_by: "op".into(),
            created_at: now,
            expires_at: now + Duration::minutes(mins),
            revoked_at: revoked.then_some(now),
            revoked_by: None,
            revoke_reason: None,
            request_id: None,
            review_required: false,
        }
    }

    #[test]
    fn admission_table() {
        let now = Utc::now();
        let cases: Vec<(Option<Grant>, &str)> = vec![
            (None, "no_grant"),
            (Some(grant(now, 10, false)), "ok"),
            (Some(grant(now, -1, false)), "grant_expired"),
            (Some(grant(now, 0, false)), "grant_expired"),
            (Some(grant(now, 10, true)), "grant_revoked"),
        ];
        for (g, want) in cases {
            let got = match admit("alice", "web", g, now) {
                Ok(_) => "ok",
                Err(d) => d.code(),
            };
            assert_eq!(got, want);
        }
    }

    #[test]
    fn deadline_is_the_earlier_of_grant_and_ttl() {
        let now = Utc::now();
        let g = grant(now, 30, false);
        assert_eq!(
            deadline(&g, now, std::time::Duration::from_secs(3600)),
            g.expires_at
        );
        assert_eq!(
            deadline(&g, now, std::time::Duration::from_secs(60)),
            now + Duration::seconds(60)
        );
    }
}
