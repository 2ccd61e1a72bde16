//! End-to-end tests: real OpenSSH `sshd` as the target, real `ssh`/`scp`/`sftp` as clients,
//! the real `asciinema` CLI replaying exports, all on 127.0.0.1.

mod accounts;
mod audit_views;
mod cluster;
mod demo;
mod deploy;
mod disk;
mod drill;
mod escapes;
mod findings;
mod flood;
mod frictions;
mod incident;
mod logs;
mod outage;
mod pg;
mod pg_secrets;
mod proxy;
mod rogue;
mod secrets;
mod siem;
mod ssh;
mod storage;
mod support;
mod tamper;
mod web;
mod workflow;
