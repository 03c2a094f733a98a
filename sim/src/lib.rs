//! holdfast-sim: runs the production `holdfast-core` state machines in one thread under a
//! seeded discrete-event simulation of networks, processes and disks, and checks Raft's
//! safety on every step, then liveness after everything heals.
//!
//! One `u64` seed decides everything; the same seed gives the same run, bit for bit, which
//! the trace hash shows.

pub mod checker;
pub mod coverage;
pub mod disk;
pub mod faults;
pub mod kernel;
pub mod membership;
pub mod network;
pub mod options;
pub mod queue;
pub mod raft_checks;
pub mod report;
pub mod runner;
pub mod swarm;
pub mod timeline;
pub mod trace;
pub mod world;

pub use options::{Options, Workload};
pub use world::{Outcome, Stats};

/// Runs one seed of the workload the options choose.
pub fn run(options: &Options) -> Outcome {
    match options.workload {
        Workload::Raft => world::run(options),
        Workload::Queue => queue::run(options),
    }
}

/// Whether this build plants canaries when asked to (`--features canaries`).
pub const CANARIES_BUILT: bool = cfg!(feature = "canaries");
