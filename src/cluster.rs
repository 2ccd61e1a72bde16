//! One node's membership of a cluster: its lease in the state store, whether it drains, and
//! which other nodes it may take over.
//!
//! Every node renews a lease row every third of `[cluster] lease`. A node whose lease lapsed
//! is taken for dead, and another node adopts its unsealed sessions (see
//! [`crate::state::Store::adopt_sessions`]: one statement, so each session goes to exactly one
//! taker) and seals them as `recovered`. A node takes over others only after its own
//! heartbeats have held for a whole lease: when the state store comes back from an outage
//! no node's lease is fresh, and the rule gives every node one lease to renew before anyone
//! counts it dead. A single node runs the same code against SQLite; it never finds another.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use crate::clock;
use crate::state::{NodeRow, StateError, Store};

/// This node's lease and drain state.
pub struct Membership {
    pub node_id: String,
    pub lease: Duration,
    started_at: DateTime<Utc>,
    store: Arc<dyn Store>,
    /// Since when every heartbeat succeeded; `None` after a failed one.
    healthy_since: Mutex<Option<Instant>>,
    draining: AtomicBool,
    /// Whether this node runs the cluster's singletons (see [`Membership::is_leader`]).
    leader: AtomicBool,
}

/// A node as `cluster status` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeStatus {
    pub row: NodeRow,
    /// `up`, `draining` or `lapsed` (no renewal within its lease).
    pub state: &'static str,
}

impl Membership {
    pub fn new(node_id: String, lease: Duration, store: Arc<dyn Store>) -> Membership {
        Membership {
            node_id,
            lease,
            started_at: clock::now(),
            store,
            healthy_since: Mutex::new(None),
            draining: AtomicBool::new(false),
            leader: AtomicBool::new(false),
        }
    }

    /// How often the lease is renewed.
    pub fn interval(&self) -> Duration {
        self.lease / 3
    }

    /// Renews the lease, saying how many sessions this node holds.
    pub async fn beat(&self, live_sessions: u64) -> Result<(), StateError> {
        let now = clock::now();
        let row = NodeRow {
            node_id: self.node_id.clone(),
            started_at: self.started_at,
            renewed_at: now,
            expires_at: now + chrono::Duration::from_std(self.lease).unwrap_or_default(),
            draining: self.is_draining(),
            live_sessions,
            version: env!("CARGO_PKG_VERSION").to_string(),
        };
        let res = self.store.heartbeat(&row).await;
        {
            let mut healthy = self.healthy_since.lock().unwrap_or_else(|p| p.into_inner());
            match &res {
                Ok(()) => {
                    healthy.get_or_insert_with(Instant::now);
                }
                Err(_) => *healthy = None,
            }
        }
        let leads = match &res {
            Ok(()) => match self.store.now().await {
                Ok(t) => self.leads(t).await,
                Err(_) => false,
            },
            Err(_) => false,
        };
        self.leader.store(leads, Ordering::SeqCst);
        res
    }

    /// The leader is the live, not draining node with the smallest id; a node that cannot
    /// reach the store never leads. Two nodes may both lead for at most one renewal interval
    /// while the membership changes (a node with a smaller id joins, or the leader dies and
    /// its lease has not lapsed yet: then nobody leads until it does).
    async fn leads(&self, now: DateTime<Utc>) -> bool {
        if self.is_draining() {
            return false;
        }
        match self.store.nodes().await {
            Ok(nodes) => nodes
                .iter()
                .filter(|n| n.expires_at >= now && !n.draining)
                .map(|n| n.node_id.as_str())
                .min()
                .is_some_and(|id| id == self.node_id),
            Err(_) => false,
        }
    }

    /// Whether this node runs the cluster-wide singletons (credential rotation) as of its
    /// last heartbeat.
    pub fn is_leader(&self) -> bool {
        self.leader.load(Ordering::SeqCst)
    }

    /// Starts draining: `/healthz` answers 503 and the next heartbeat says so.
    pub fn drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Whether this node's heartbeats have held for a whole lease, so it may judge others.
    fn may_take_over(&self) -> bool {
        self.healthy_since
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|t| t.elapsed() >= self.lease)
    }

    /// Other nodes whose lease lapsed, once this node may take over (else none).
    pub async fn lapsed(&self) -> Result<Vec<String>, StateError> {
        if !self.may_take_over() {
            return Ok(Vec::new());
        }
        let now = self.store.now().await?;
        Ok(self
            .store
            .nodes()
            .await?
            .into_iter()
            .filter(|n| n.node_id != self.node_id && n.expires_at < now)
            .map(|n| n.node_id)
            .collect())
    }

    /// Forgets a lapsed node that held nothing more, once it is long gone (ten leases), so
    /// `cluster status` keeps showing a dead node for a while and then drops it.
    pub async fn forget_if_gone(&self, node_id: &str) -> Result<(), StateError> {
        let long = chrono::Duration::from_std(self.lease * 10).unwrap_or_default();
        let now = self.store.now().await?;
        let gone = self
            .store
            .nodes()
            .await?
            .iter()
            .any(|n| n.node_id == node_id && n.expires_at + long < now);
        if gone {
            self.store.leave(node_id).await?;
        }
        Ok(())
    }

    /// Drops this node's lease row (a clean stop: nothing of it is left to take over).
    pub async fn leave(&self) {
        if let Err(e) = self.store.leave(&self.node_id).await {
            tracing::warn!(error = %e, "could not drop this node's lease; it lapses by itself");
        }
    }
}

/// Every node with a lease row, and what state it is in by the store's clock.
pub async fn status(store: &dyn Store) -> Result<Vec<NodeStatus>, StateError> {
    let now = store.now().await?;
    Ok(store
        .nodes()
        .await?
        .into_iter()
        .map(|row| NodeStatus {
            state: if row.expires_at < now {
                "lapsed"
            } else if row.draining {
                "draining"
            } else {
                "up"
            },
            row,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, Arc<dyn Store>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = crate::state::SqliteStore::open(&dir.path().join("s.sqlite")).expect("open");
        (dir, Arc::new(s))
    }

    #[tokio::test]
    async fn a_node_judges_others_only_after_its_own_lease_held() {
        let (_d, store) = store();
        let dead = NodeRow {
            node_id: "dead".into(),
            started_at: clock::now(),
            renewed_at: clock::now() - chrono::Duration::seconds(60),
            expires_at: clock::now() - chrono::Duration::seconds(50),
            draining: false,
            live_sessions: 1,
            version: String::new(),
        };
        store.heartbeat(&dead).await.expect("dead");
        let me = Membership::new("me".into(), Duration::from_millis(0), store.clone());
        assert!(
            me.lapsed().await.expect("lapsed").is_empty(),
            "before any beat"
        );
        me.beat(0).await.expect("beat");
        assert_eq!(me.lapsed().await.expect("lapsed"), ["dead"]);
        let slow = Membership::new("slow".into(), Duration::from_secs(3600), store.clone());
        slow.beat(0).await.expect("beat");
        assert!(
            slow.lapsed().await.expect("lapsed").is_empty(),
            "lease not held yet"
        );

        slow.drain();
        slow.beat(0).await.expect("beat");
        let st = status(&*store).await.expect("status");
        let states: Vec<(&str, &str)> = st
            .iter()
            .map(|n| (n.row.node_id.as_str(), n.state))
            .collect();
        assert_eq!(
            states,
            [("dead", "lapsed"), ("me", "lapsed"), ("slow", "draining")]
        );
        me.forget_if_gone("dead").await.expect("forget");
        assert!(store
            .nodes()
            .await
            .expect("nodes")
            .iter()
            .all(|n| n.node_id != "dead"));
    }
}
