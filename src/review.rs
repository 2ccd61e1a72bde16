//! Post-incident reviews: every grant that was used gets a review due 24–48 h later (by
//! scenario); a reviewer who took no part signs it off with findings and a root cause; the
//! signed review is immutable, kept in the write-once store and sent to the SIEM; an overdue
//! review raises an alert.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::clock;
use crate::config::ReviewRules;
use crate::session::Core;
use crate::siem::{AccessEvent, Action};
use crate::state::{Grant, Review, StateError};
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
    #[error("a sign-off needs --findings TEXT and --root-cause TEXT")]
    Incomplete,
    #[error(transparent)]
    State(#[from] StateError),
    #[error("the signed review could not be written to the recording store: {0}")]
    Store(String),
}

/// Signs a review off: checks who may, records it once, writes it create-only to the
/// recording store and emits the SIEM event.
pub async fn sign(
    core: &Core,
    rules: &ReviewRules,
    person: &str,
    roles: &[String],
    id: &str,
    findings: &str,
    root_cause: &str,
) -> Result<Review, SignError> {
    if !roles.iter().any(|r| r == "reviewer" || r == "admin") {
        return Err(SignError::NotReviewer(person.to_string()));
    }
    if findings.trim().is_empty() || root_cause.trim().is_empty() {
        return Err(SignError::Incomplete);
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
    let signed = core
        .store
        .sign_review(&r.id, person, findings, root_cause, clock::now())
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
    });
    let body = serde_json::to_vec_pretty(&doc).map_err(|e| SignError::Store(e.to_string()))?;
    core.recordings
        .put_new(
            &key::review(&signed.correlation_id, &signed.id),
            Bytes::from(body),
        )
        .await
        .map_err(|e| SignError::Store(e.to_string()))?;
    let mut e = event(Action::ReviewSigned, person, &signed);
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
