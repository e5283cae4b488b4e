//! fledge: progressive canary delivery for plain Kubernetes Deployments.
//!
//! The data flows one way and the module tree follows it, in two layers:
//! - [`core`], pure (plain values in, plain values out; no client, no runtime, no clock):
//!   annotations → typed spec → admission decision → rollout state machine → desired objects per
//!   traffic router → plan;
//! - [`runtime`], the IO edge: the HTTPS server, the controller (read → decide → apply), the
//!   commands, the Lease, Events, certificates on disk.
#![forbid(unsafe_code)]

pub mod core;
pub mod runtime;
