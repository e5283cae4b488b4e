//! fledge: progressive canary delivery for plain Kubernetes Deployments.
//!
//! The data flows one way and the module tree follows it:
//! [`spec`] (annotations → typed spec) → [`admission`] (the webhook's decision) →
//! [`rollout`] (rollout state, step timeline, and the state machine fed by [`observe`]) →
//! [`objects`] (desired objects per traffic router) → [`plan`] (offline report) and [`server`]
//! (HTTPS, the only IO). [`certs`] makes webhook certificates.
//! Everything but `server` is pure: plain values in, plain values out.
#![forbid(unsafe_code)]

pub mod admission;
pub mod certs;
pub mod commands;
pub mod controller;
pub mod events;
pub mod lease;
pub mod objects;
pub mod observe;
pub mod plan;
pub mod rollout;
pub mod server;
pub mod spec;
pub mod template;
