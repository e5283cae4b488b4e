//! The IO edge around [`crate::core`]: each part reads the world, calls the pure core to decide,
//! and writes the result.

pub mod analysis;
pub mod certs;
pub mod clock;
pub mod commands;
pub mod controller;
pub mod events;
pub mod lease;
pub mod measurements;
pub mod owner_index;
pub mod policies;
pub mod serve;
pub mod server;
pub mod traffic;
