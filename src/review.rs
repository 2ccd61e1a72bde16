//! Post-incident reviews: every grant that was used gets a review due 24–48 h later (by
//! scenario); a reviewer who took no part signs it off by answering the seed procedure's
//! questions ([`QUESTIONS`]); the signed review is immutable, kept in the write-once store and
//! sent to the SIEM with every answer; an overdue review raises an alert.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::clock;
use crate::config::ReviewRules;
use crate::session::Core;
use crate::siem::{AccessEvent, Action};
use crate::state::{Grant, Review, ReviewAnswers, StateError};
use crate::storage::key;

fn event(action: Action, actor: &str, r: &Review) -> AccessEvent {
    let mut e = AccessEvent::new(action, actor);
    e.person = Some(r.person.clone());
    e.target = Some(r.target.clone());
    e.grant_id = Some(r.grant_id.clone());
    e.correlation_id = Some(r.correlation_id.clone());
    e.review_id = Some(r.id.clone());
    e.due_at = Some(clock::rfc3339(r.due_at));
    e.scenario = Some(r.scenario.clone());
    e.emergency = Some(r.emergency);
    e.approvers = Some(r.approvers.clone());
    e
}

/// Opens the review of a grant when a session first uses it (the session core's hook).
pub struct OpenReviews(pub ReviewRules);

#[async_trait::async_trait]
impl crate::session::FirstUse for OpenReviews {
    async fn first_use(&self, core: &Core, grant: &Grant) -> Result<(), String> {
        open_for(core, &self.0, grant)
            .await
            .map_err(|e| e.to_string())
    }
}

/// Opens the review of a grant at its first use (idempotent).
pub async fn open_for(core: &Core, rules: &ReviewRules, grant: &Grant) -> Result<(), StateError> {
    let (scenario, approvers) = match &grant.request_id {
        Some(rid) => match core.store.find_request(rid).await {
            Ok(r) => (
                r.scenario,
                r.approvals.into_iter().map(|(a, _)| a).collect(),
            ),
            Err(_) => ("other".to_string(), Vec::new()),
        },
        None => ("other".to_string(), vec![grant.created_by.clone()]),
    };
    let now = clock::now();
    let due = now + chrono::Duration::from_std(rules.due_after(&scenario)).unwrap_or_default();
    let review = Review {
        id: format!("V-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]),
        correlation_id: grant.correlation_id().to_string(),
        grant_id: grant.id.clone(),
        person: grant.person.clone(),
        target: grant.target.clone(),
        scenario,
        emergency: grant.review_required,
        approvers,
        opened_at: now,
        due_at: due,
        overdue_alerted: false,
        signed_by: None,
        signed_at: None,
        findings: None,
        root_cause: None,
        answers: None,
    };
    let (review, new) = core.store.open_review(&review).await?;
    if new {
        let mut e = event(Action::ReviewOpened, "breakglass", &review);
        e.message = Some(format!(
            "post-incident review {} opened for {}'s use of {}; due {}",
            review.id,
            review.person,
            review.target,
            clock::rfc3339(review.due_at)
        ));
        if let Err(err) = core.audit(&e).await {
            tracing::error!(error = %err, "could not write review event");
        }
    }
    Ok(())
}

/// Why a sign-off was refused.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("{0} is not a reviewer (needs the `reviewer` or `admin` role)")]
    NotReviewer(String),
    #[error("{who} took part in this incident ({role}) and may not review it")]
    Participant { who: String, role: &'static str },
    #[error("a sign-off answers every question of the review; not answered:\n{}", .0.join("\n"))]
    Incomplete(Vec<String>),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("the signed review could not be written to the recording store: {0}")]
    Store(String),
}

/// The questions a sign-off answers: the option that answers it and the question itself.
/// `yes`/`no` questions take `yes` or `no`; the others take text.
pub const QUESTIONS: [(&str, &str); 9] = [
    ("findings", "what did the recordings show?"),
    (
        "thresholds-met",
        "were the documented thresholds for break-glass access met? (yes or no)",
    ),
    (
        "thresholds-note",
        "why access went ahead below them (when not met)",
    ),
    (
        "escalation-possible",
        "could the standard escalation paths have worked instead? (yes or no)",
    ),
    (
        "escalation-note",
        "why they were not used (when they could have worked)",
    ),
    ("root-cause", "the root cause of the incident"),
    ("actions-taken", "what was done during the access"),
    (
        "procedure-update",
        "does the break-glass procedure need an update? (yes or no)",
    ),
    ("procedure-change", "which update (when one is needed)"),
];

/// What a reviewer submitted, as typed: one entry per answered question (option name →
/// answer). Every surface (SSH control channel, API, web) fills it from its options.
#[derive(Debug, Clone, Default)]
pub struct SignOff(pub std::collections::BTreeMap<String, String>);

impl SignOff {
    fn text(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(|v| v.trim()).filter(|v| !v.is_empty())
    }

    fn yes_no(&self, name: &str) -> Option<bool> {
        match self.text(name)?.to_ascii_lowercase().as_str() {
            "yes" | "y" | "true" => Some(true),
            "no" | "n" | "false" => Some(false),
            _ => None,
        }
    }

    /// The findings, the root cause and the answers, or every question left unanswered
    /// (a yes/no question answered with anything else counts as unanswered).
    pub fn check(&self) -> Result<(String, String, ReviewAnswers), SignError> {
        let mut missing = Vec::new();
        let mut need = |name: &str, ok: bool| {
            if !ok {
                let q = QUESTIONS
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map_or("", |(_, q)| *q);
                missing.push(format!("  --{name}: {q}"));
            }
        };
        let text = |n: &str| self.text(n).unwrap_or("").to_string();
        need("findings", self.text("findings").is_some());
        let thresholds = self.yes_no("thresholds-met");
        need("thresholds-met", thresholds.is_some());
        need(
            "thresholds-note",
            thresholds != Some(false) || self.text("thresholds-note").is_some(),
        );
        let escalation = self.yes_no("escalation-possible");
        need("escalation-possible", escalation.is_some());
        need(
            "escalation-note",
            escalation != Some(true) || self.text("escalation-note").is_some(),
        );
        need("root-cause", self.text("root-cause").is_some());
        need("actions-taken", self.text("actions-taken").is_some());
        let update = self.yes_no("procedure-update");
        need("procedure-update", update.is_some());
        need(
            "procedure-change",
            update != Some(true) || self.text("procedure-change").is_some(),
        );
        if !missing.is_empty() {
            return Err(SignError::Incomplete(missing));
        }
        Ok((
            text("findings"),
            text("root-cause"),
            ReviewAnswers {
                thresholds_met: thresholds.unwrap_or(false),
                thresholds_note: text("thresholds-note"),
                escalation_possible: escalation.unwrap_or(false),
                escalation_note: text("escalation-note"),
                actions_taken: text("actions-taken"),
                procedure_update: update.unwrap_or(false),
                procedure_change: text("procedure-change"),
            },
        ))
    }
}

/// Signs a review off: checks who may and that every question is answered, records it once,
/// writes it create-only to the recording store and emits the SIEM event.
pub async fn sign(
    core: &Core,
    rules: &ReviewRules,
    person: &str,
    roles: &[String],
    id: &str,
    answers: &SignOff,
) -> Result<Review, SignError> {
    if !roles.iter().any(|r| r == "reviewer" || r == "admin") {
        return Err(SignError::NotReviewer(person.to_string()));
    }
    let r = core.store.find_review(id).await?;
    if !rules.reviewer_may_be_participant {
        if r.person == person {
            return Err(SignError::Participant {
                who: person.into(),
                role: "requester",
            });
        }
        if r.approvers.iter().any(|a| a == person) {
            return Err(SignError::Participant {
                who: person.into(),
                role: "approver",
            });
        }
    }
    let (findings, root_cause, answers) = answers.check()?;
    let signed = core
        .store
        .sign_review(
            &r.id,
            person,
            &findings,
            &root_cause,
            &answers,
            clock::now(),
        )
        .await?;
    let doc = serde_json::json!({
        "schema_version": 1,
        "review_id": signed.id,
        "correlation_id": signed.correlation_id,
        "grant_id": signed.grant_id,
        "person": signed.person,
        "target": signed.target,
        "scenario": signed.scenario,
        "emergency": signed.emergency,
        "approvers": signed.approvers,
        "opened_at": clock::rfc3339(signed.opened_at),
        "due_at": clock::rfc3339(signed.due_at),
        "signed_by": signed.signed_by,
        "signed_at": signed.signed_at.map(clock::rfc3339),
        "findings": signed.findings,
        "root_cause": signed.root_cause,
        "answers": signed.answers,
    });
    let body = serde_json::to_vec_pretty(&doc).map_err(|e| SignError::Store(e.to_string()))?;
    core.recordings
        .put_new(
            &key::review(&signed.correlation_id, &signed.id),
            Bytes::from(body),
        )
        .await
        .map_err(|e| SignError::Store(e.to_string()))?;
    let mut e = event(Action::ReviewSigned, person, &signed).with_answers(&answers);
    e.findings = signed.findings.clone();
    e.root_cause = signed.root_cause.clone();
    e.message = Some(format!("{person} signed off review {}", signed.id));
    core.audit(&e)
        .await
        .map_err(|err| SignError::Store(format!("SIEM: {err}")))?;
    Ok(signed)
}

/// Raises one alert per review that passes its deadline unsigned. Checks every second.
pub async fn overdue_watcher(core: Arc<Core>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        match core.store.take_overdue_reviews(clock::now()).await {
            Ok(rows) => {
                for r in rows {
                    let mut e = event(Action::ReviewOverdue, "breakglass", &r);
                    e.outcome = crate::siem::Outcome::Failure;
                    e.message = Some(format!(
                        "post-incident review {} is overdue (due {})",
                        r.id,
                        clock::rfc3339(r.due_at)
                    ));
                    if let Err(err) = core.audit(&e).await {
                        tracing::error!(error = %err, "could not write overdue review event");
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "overdue review check failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sign_off(pairs: &[(&str, &str)]) -> SignOff {
        SignOff(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    const FULL: [(&str, &str); 7] = [
        ("findings", "ran a vacuum"),
        ("thresholds-met", "yes"),
        ("escalation-possible", "no"),
        ("root-cause", "a stuck lock"),
        ("actions-taken", "killed the vacuum"),
        ("procedure-update", "no"),
        ("thresholds-note", ""),
    ];

    #[test]
    fn every_question_must_be_answered_and_the_refusal_names_each() {
        let (findings, root, a) = sign_off(&FULL).check().expect("complete");
        assert_eq!(
            (findings.as_str(), root.as_str()),
            ("ran a vacuum", "a stuck lock")
        );
        assert!(a.thresholds_met && !a.escalation_possible && !a.procedure_update);
        let Err(SignError::Incomplete(missing)) = sign_off(&[]).check() else {
            panic!("nothing answered is refused");
        };
        let named: Vec<&str> = missing
            .iter()
            .filter_map(|m| m.trim().strip_prefix("--"))
            .filter_map(|m| m.split(':').next())
            .collect();
        assert_eq!(
            named,
            [
                "findings",
                "thresholds-met",
                "escalation-possible",
                "root-cause",
                "actions-taken",
                "procedure-update"
            ]
        );
    }

    #[test]
    fn an_answer_that_needs_a_reason_needs_its_note() {
        let with = |k: &'static str, v: &'static str| {
            let mut p: Vec<(&str, &str)> = FULL.to_vec();
            p.retain(|(n, _)| *n != k);
            p.push((k, v));
            sign_off(&p).check()
        };
        for (k, v, note) in [
            ("thresholds-met", "no", "thresholds-note"),
            ("escalation-possible", "yes", "escalation-note"),
            ("procedure-update", "yes", "procedure-change"),
        ] {
            match with(k, v) {
                Err(SignError::Incomplete(m)) => {
                    assert_eq!(m.len(), 1, "{m:?}");
                    assert!(m[0].contains(note), "{k}={v}: {m:?}");
                }
                other => panic!("{k}={v} without --{note}: {other:?}"),
            }
        }
        // A yes/no question answered with something else is not answered.
        assert!(matches!(
            with("thresholds-met", "maybe"),
            Err(SignError::Incomplete(_))
        ));
    }
}
