//! Shared configurations for the simulator's integration tests.
#![allow(dead_code)]

use peerstore_sim::{CheckMode, NetConfig, SimConfig, Start};

/// A fault-free network: no loss, no reordering, no crashes, no churn.
pub fn calm(nodes: usize, seed: u64) -> SimConfig {
    SimConfig {
        seed,
        nodes,
        start: Start::Ideal,
        churn_per_s: 0.0,
        net: NetConfig {
            loss: 0.0,
            duplicate: 0.0,
            reorder: 0.0,
            ..NetConfig::default()
        },
        check: if nodes <= 512 {
            CheckMode::EveryChange
        } else {
            CheckMode::EveryMs(1_000)
        },
        ..SimConfig::default()
    }
}

/// The swarm-testing configuration used for safety seeds: a small ring
/// joining from an r+1 base, with loss, duplication, reordering, partitions,
/// clogs, pauses, crashes and churn whose rates are drawn from the seed.
pub fn swarm(nodes: usize, successors: usize, seed: u64) -> SimConfig {
    SimConfig {
        seed,
        nodes,
        successors,
        duration_ms: 120_000,
        churn_per_s: 0.05,
        swarm: true,
        ..SimConfig::default()
    }
}

/// Runs `count` seeds from `first` and returns the failing ones with their
/// first violation (or "no liveness").
pub fn failing_seeds(
    count: u64,
    first: u64,
    make: impl Fn(u64) -> SimConfig,
) -> Vec<(u64, String)> {
    sweep(count, first, make, |_| {})
}

/// [`failing_seeds`], showing every report to `each` (to total figures).
pub fn sweep(
    count: u64,
    first: u64,
    make: impl Fn(u64) -> SimConfig,
    mut each: impl FnMut(&peerstore_sim::Report),
) -> Vec<(u64, String)> {
    let mut bad = Vec::new();
    for seed in first..first + count {
        let rep = peerstore_sim::run(make(seed));
        each(&rep);
        if !rep.passed() {
            bad.push((seed, rep.summary()));
        }
    }
    bad
}

/// The failures of a sweep, one per seed, for an assertion message.
pub fn listed(bad: &[(u64, String)]) -> String {
    bad.iter()
        .map(|(seed, summary)| format!("seed {seed}:\n{summary}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// How many seeds a sweep runs: `PEERSTORE_SEEDS` if set, else `default`.
pub fn seeds(default: u64) -> u64 {
    std::env::var("PEERSTORE_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
