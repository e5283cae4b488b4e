//! Test support shared by the integration tests (`mod support;` in a test file).
//!
//! Each integration test is its own crate and uses only part of this module, hence the
//! `dead_code` allowance.
#![allow(dead_code, unused_imports)]

pub mod apiserver;
pub mod chart;
pub mod e2e;
pub mod fleet;
pub mod http_stub;
pub mod kubectl;
pub mod prometheus;
pub mod webhook;
