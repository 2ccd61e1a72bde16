//! breakglass: a gateway for break-glass (emergency) access that records everything.
//!
//! Module map (see ARCHITECTURE.md for the invariants and the layers, which
//! `layering` checks):
//!
//! - [`config`]: the TOML config, raw → validated → built; `check-config`.
//! - [`state`]: the state store trait (grants, session index) and its SQLite implementation.
//! - [`control`]: the workflow over SSH: request, approve, deny, revoke, status.
//! - [`credential`]: JIT database credentials, kept only as SCRAM-SHA-256 verifiers.
//! - [`policy`]: who may see what: the one visibility rule of every surface.
//! - [`grant`]: grant rules: which grant admits a person to a target, and the session deadline.
//! - [`keys`]: the gateway's own keys: SSH host key, upstream user CA, per-session certificates.
//! - [`storage`]: the recording store (object_store, create-only puts); the only module that
//!   talks to object_store, and the one place storage keys are made.
//! - [`record`]: the recorder: asciicast v2 and raw channel streams, chunking, hash chain,
//!   command extraction, file-transfer tracking, export and replay.
//! - [`review`]: post-incident reviews: opened at first use, signed off once, overdue alerts.
//! - [`vault`]: break-glass credentials the gateway holds, AES-256-GCM under a KEK.
//! - [`rotation`]: rotates exposed break-glass credentials after each grant ends.
//! - [`signing`]: Ed25519 manifest signing keys (rotatable; old keys keep verifying).
//! - [`verify`]: checks recordings against chain, manifest and signature: OK / INCOMPLETE / TAMPERED.
//! - [`siem`]: audit events (separate from operational logs) and their sinks.
//! - [`session`]: the protocol-neutral session core both adapters use: open, supervise over
//!   `SessionIo`, finish, the live registry, `EndReason` and `Refusal`.
//! - [`services`]: the service bundle (`Gateway`) the composition root wires and every
//!   adapter and surface shares, and the `ControlChannel` the SSH listener hosts.
//! - [`ssh`]: the SSH listener (russh server), the upstream client, and the per-channel relay.
//! - [`pg`]: the PostgreSQL listener: TLS, SCRAM with JIT credentials, recorded relay;
//!   `pg::upstream` connects to targets (TLS trusting only the target's `ca_file`);
//!   `pg::redact` masks `PASSWORD` literals and password messages before they are recorded.
//! - [`server`]: the composition root: `run(config, shutdown)`, the whole gateway as a library
//!   function; the only place TLS settings are built and services wired.
//! - [`shutdown`]: one cancellation token and task tracker with a documented drain order.
//! - [`clock`]: the one wall-clock function.
//! - [`api`]: the JSON API (bearer tokens fetched over SSH, or the web UI's cookie) for the
//!   workflow actions.
//! - [`web`]: the web UI: login links, our UI files, asciinema-player, OpenAPI, TLS, and the
//!   evidence API (sessions, replay, SQL timelines, search, reviews, reports, exports).
//! - [`alerts`]: webhooks (generic JSON, Slack) for requests, approvals, sessions, revocations.
//! - [`outbound`]: HTTP POSTs to webhooks and HTTP SIEM collectors (reqwest, our rustls
//!   config, bounded body reads and time limits) and how a failure is classified.
//! - [`findings`]: automated audit findings over ended sessions (destructive commands,
//!   data leaving, odd hours, new targets, long sessions, commands after a warning).
//! - [`report`]: break-glass metrics for a period (per system, per day/week/month, outside
//!   maintenance windows).
//! - [`audit_export`]: the auditor's metadata export of every session in a period, with a
//!   signed manifest, and its verification.
//! - [`csv`]: CSV quoting shared by the CLI, reports and exports.
//! - [`text`]: text from people is data: the control-character check every surface runs on
//!   input, and the terminal and Slack escapes for what is shown.
#![forbid(unsafe_code)]

pub mod alerts;
pub mod api;
pub mod audit_export;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod control;
pub mod credential;
pub mod csv;
pub mod findings;
pub mod grant;
pub mod incident;
pub mod keys;
#[cfg(test)]
mod layering;
pub mod outbound;
pub mod pg;
pub mod policy;
pub mod preauth;
pub mod proxy_protocol;
pub mod record;
pub mod report;
pub mod review;
pub mod rotation;
pub mod server;
pub mod services;
pub mod session;
pub mod shutdown;
pub mod siem;
pub mod signing;
pub mod ssh;
pub mod state;
pub mod storage;
pub mod text;
pub mod vault;
pub mod verify;
pub mod web;
