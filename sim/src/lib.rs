//! PeerStore's deterministic simulator: many `peerstore_core::Node`s, one
//! seeded event queue, a faulty network, and checkers that prove the ring
//! stays correct (see README, "The simulator").

pub mod check;
pub mod config;
pub mod net;
pub mod queue;
pub mod report;
pub mod script;
pub mod secure;
pub mod storage;
pub mod svg;
pub mod world;

pub use config::{
    CheckMode, Cut, Fault, FaultKind, FaultRates, NetConfig, Session, SimConfig, Start,
};
pub use report::Report;
pub use storage::{StorageConfig, StorageReport};
pub use world::{run_with_ring, RingPoint, World};

/// Runs one simulation.
pub fn run(cfg: SimConfig) -> Report {
    World::new(cfg).run()
}
