//! What a simulation run is: population, protocol, network model, faults and
//! workload. Everything is plain data so a run (and a fault plan) can be printed,
//! stored, replayed and shrunk.

use peerstore_core::Protocol;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Session {
    /// Exponential session lengths (memoryless churn).
    Exp,
    /// Weibull with shape 0.5: many short sessions and a long tail, as measured
    /// in deployed peer-to-peer systems.
    Weibull,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Start {
    /// All nodes start as an ideal ring (Zave's initialisation for r+1 nodes,
    /// extended to all for large experiments).
    Ideal,
    /// An ideal base of r+1 nodes; the rest join through random members,
    /// spread over `join_spread_ms`.
    Join,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CheckMode {
    /// Safety checkers after every event that changed any ring pointer or
    /// membership (the full guarantee; for small and medium runs).
    EveryChange,
    /// Safety checkers every `n` ms of simulated time (large runs).
    EveryMs(u64),
    Off,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NetConfig {
    /// One-way latency is log-normal with this median...
    pub latency_median_ms: f64,
    /// ...and this shape (sigma of the underlying normal).
    pub latency_sigma: f64,
    pub loss: f64,
    pub duplicate: f64,
    /// Fraction of messages held back by an extra random delay (reordering).
    pub reorder: f64,
    pub reorder_extra_ms: u64,
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            latency_median_ms: 40.0,
            latency_sigma: 0.5,
            loss: 0.0,
            duplicate: 0.0,
            reorder: 0.0,
            reorder_extra_ms: 500,
        }
    }
}

/// How a partition cuts the network.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum Cut {
    /// Nodes split into two sides (by a seeded coin with this bias); nothing crosses.
    Symmetric { fraction: f64 },
    /// Messages from side A to side B are lost; B to A still arrive.
    OneWay { fraction: f64 },
    /// One node hears nothing and is heard by no one.
    Isolate { node: u32 },
}

/// One injected fault. Node numbers are taken modulo the live population at the
/// time the fault fires, so a shrunk plan stays meaningful.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum FaultKind {
    /// Crash (state lost) and restart from durable state (its identity) after `down_ms`.
    Crash {
        node: u32,
        down_ms: u64,
    },
    /// Crash for good.
    Kill {
        node: u32,
    },
    /// The process stops (no timers, messages queue) for `for_ms`.
    Pause {
        node: u32,
        for_ms: u64,
    },
    Partition {
        cut: Cut,
        for_ms: u64,
    },
    /// The link between two nodes holds all traffic for `for_ms`.
    Clog {
        a: u32,
        b: u32,
        for_ms: u64,
    },
    /// A fraction of the live nodes fails at this instant.
    MassFail {
        fraction: f64,
    },
    /// `count` ring neighbours fail for good at once, starting at `node`:
    /// nodes that hold replicas of the same keys.
    KillRun {
        node: u32,
        count: u32,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Fault {
    pub at_ms: u64,
    pub kind: FaultKind,
}

/// Random fault rates; the plan is drawn from these and the seed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Default)]
pub struct FaultRates {
    pub crash_per_s: f64,
    pub pause_per_s: f64,
    pub partition_per_s: f64,
    pub clog_per_s: f64,
    /// Longest partition in a drawn plan; keep it below the failure detector's
    /// suspicion window if the ring should ride partitions out.
    pub partition_max_ms: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SimConfig {
    pub seed: u64,
    /// Machines. Each runs `vnodes` ring positions.
    pub nodes: usize,
    /// Virtual nodes (ring positions) per machine; they share the machine's
    /// address, disk and fate (a crash, pause, partition or departure takes
    /// all of them).
    pub vnodes: usize,
    /// Real identities, endorsements and secure sessions on every link
    /// between machines (see `secure.rs`).
    pub secure: bool,
    /// Machines without a trusted endorsement that try to join and store
    /// (with `secure`).
    pub attackers: usize,
    /// Negative control: the attackers' chains lead to the trusted root
    /// (they are let in, and the security checker must say so).
    pub attackers_endorsed: bool,
    /// Length of the phase with churn, faults and lookups; then the network
    /// heals and liveness is checked.
    pub duration_ms: u64,
    /// r; 0 means 2*log2(nodes), at least 3.
    pub successors: usize,
    pub protocol: Protocol,
    pub start: Start,
    pub join_spread_ms: u64,
    pub stabilize_ms: u64,
    pub check_pred_ms: u64,
    pub fix_fingers_ms: u64,
    pub suspect_ms: u64,
    /// Joins per second, and (through session lengths) departures per second.
    pub churn_per_s: f64,
    pub session: Session,
    /// Fraction of departures that are graceful leaves (the rest crash).
    pub graceful_fraction: f64,
    pub fail_fraction: f64,
    pub fail_at_ms: u64,
    /// This many ring neighbours fail for good at `fail_at_ms`.
    #[serde(default)]
    pub kill_adjacent: u32,
    /// After a mass failure, turn maintenance off, run this many lookups, then
    /// turn it back on (ToN'03 "lookups before any repair").
    pub lookups_after_fail: u64,
    pub net: NetConfig,
    pub rates: FaultRates,
    /// Extra scripted faults (from the CLI or a stored plan).
    pub plan: Vec<Fault>,
    /// Draw network and fault rates from the seed (swarm testing).
    pub swarm: bool,
    pub lookups_per_node_per_min: f64,
    /// Lookups may jump along successor lists (off: fingers only).
    pub route_via_successor_lists: bool,
    pub check: CheckMode,
    /// Crashes that would break Zave's operating assumption (leave a member
    /// with no live successor, or drop principals to r+1) are refused.
    pub fail_guard: bool,
    /// Liveness: after healing, the ring must be Ideal within this long.
    pub converge_bound_ms: u64,
    /// Sampling period of the convergence plot and the ideal check.
    pub sample_ms: u64,
    /// Events kept for the failure trace.
    pub trace_tail: usize,
    /// Stop at the first invariant violation.
    pub stop_on_violation: bool,
    /// Replicated storage: workload, disk model, durability checkers.
    #[serde(default)]
    pub storage: crate::storage::StorageConfig,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            seed: 1,
            nodes: 64,
            vnodes: 1,
            secure: false,
            attackers: 0,
            attackers_endorsed: false,
            duration_ms: 600_000,
            successors: 0,
            protocol: Protocol::Zave,
            start: Start::Join,
            join_spread_ms: 30_000,
            stabilize_ms: 1_000,
            check_pred_ms: 2_000,
            fix_fingers_ms: 5_000,
            suspect_ms: 3_000,
            churn_per_s: 0.0,
            session: Session::Exp,
            graceful_fraction: 0.5,
            fail_fraction: 0.0,
            fail_at_ms: 0,
            kill_adjacent: 0,
            lookups_after_fail: 0,
            net: NetConfig::default(),
            rates: FaultRates::default(),
            plan: Vec::new(),
            swarm: false,
            lookups_per_node_per_min: 1.0,
            route_via_successor_lists: true,
            check: CheckMode::EveryChange,
            fail_guard: true,
            converge_bound_ms: 300_000,
            sample_ms: 1_000,
            trace_tail: 24,
            stop_on_violation: true,
            storage: crate::storage::StorageConfig::default(),
        }
    }
}

impl SimConfig {
    pub fn r(&self) -> usize {
        if self.successors > 0 {
            self.successors
        } else {
            peerstore_core::Config::successors_for(self.positions())
        }
    }

    /// Ring positions: machines times virtual nodes.
    pub fn positions(&self) -> usize {
        self.nodes * self.vnodes.max(1)
    }

    pub fn node_config(&self) -> peerstore_core::Config {
        peerstore_core::Config {
            protocol: self.protocol,
            successors_max: self.r(),
            stabilize_ms: self.stabilize_ms,
            check_pred_ms: self.check_pred_ms,
            fix_fingers_ms: self.fix_fingers_ms,
            suspect_ms: self.suspect_ms,
            route_via_successor_lists: self.route_via_successor_lists,
            // Without the storage workload, nodes run the ring alone (one
            // copy, so no anti-entropy traffic mixes into ring figures).
            replicas: if self.storage.enabled {
                self.storage.replicas
            } else {
                1
            },
            write_quorum: self.storage.write_quorum,
            sync_ms: self.storage.sync_ms,
            handoff_ms: self.storage.sync_ms,
            // The workload signs with 1024-bit keys to keep runs fast.
            min_key_bits: 1024,
            ..peerstore_core::Config::default()
        }
    }
}
