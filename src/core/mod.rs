//! The pure core: plain values in, plain values out. Nothing here talks to the API server, reads
//! the clock or spawns a task; `now` and what was observed are arguments. `tests/layers.rs` checks
//! that no module here uses the client or the runtime.

pub mod admission;
pub mod analysis;
#[cfg(test)]
pub mod builders;
pub mod converge;
pub mod objects;
pub mod observe;
pub mod plan;
pub mod podratio;
pub mod policy;
pub mod rollout;
pub mod routes;
pub mod spec;
pub mod template;
