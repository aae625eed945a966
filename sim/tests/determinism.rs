//! Same seed and same code give the same run; different seeds do not.

mod common;

#[test]
fn same_seed_same_trace_different_seed_different_trace() {
    let cfg = |seed| common::swarm(32, 0, seed);
    let a = peerstore_sim::run(cfg(7));
    let b = peerstore_sim::run(cfg(7));
    let c = peerstore_sim::run(cfg(8));
    assert!(
        a.events > 10_000,
        "a real run, not an empty one: {} events",
        a.events
    );
    assert_eq!(a.trace_hash, b.trace_hash, "seed 7 replayed differently");
    assert_eq!(a.events, b.events);
    assert_eq!(a.lookups.count, b.lookups.count);
    assert_ne!(
        a.trace_hash, c.trace_hash,
        "seeds 7 and 8 gave the same trace"
    );
}

#[test]
fn replay_with_a_fault_plan_is_exact_too() {
    use peerstore_sim::{Cut, Fault, FaultKind};
    let mut cfg = common::calm(24, 3);
    cfg.duration_ms = 60_000;
    cfg.plan = vec![
        Fault {
            at_ms: 10_000,
            kind: FaultKind::Crash {
                node: 3,
                down_ms: 5_000,
            },
        },
        Fault {
            at_ms: 20_000,
            kind: FaultKind::Partition {
                cut: Cut::Symmetric { fraction: 0.5 },
                for_ms: 800,
            },
        },
    ];
    let a = peerstore_sim::run(cfg.clone());
    let b = peerstore_sim::run(cfg);
    assert_eq!(a.trace_hash, b.trace_hash);
    assert_eq!(a.crashes, 1, "the planned crash happened");
}
