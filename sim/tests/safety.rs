//! Safety over many seeds: swarm-drawn loss, duplication, reordering,
//! partitions, clogs, pauses, crashes and churn. Zave's invariants must hold
//! after every ring change and every run must converge once healed.
//! `PEERSTORE_SEEDS=10000` runs the long sweep (the bench does too).

mod common;

fn sweep(nodes: usize, successors: usize, first: u64, default_seeds: u64) {
    let n = common::seeds(default_seeds);
    let bad = common::failing_seeds(n, first, |s| common::swarm(nodes, successors, s));
    assert!(
        bad.is_empty(),
        "{} of {n} seeds failed; replay one with `peerstore-sim --nodes {nodes} --successors {successors} --swarm --duration 2min --seed SEED`:\n{}",
        bad.len(),
        bad.iter().map(|(s, d)| format!("seed {s}:\n{d}")).collect::<Vec<_>>().join("\n")
    );
}

#[test]
fn zave_holds_on_small_rings_default_r() {
    sweep(24, 0, 1, 300);
}

#[test]
fn zave_holds_with_three_successors() {
    sweep(32, 3, 20_000, 100);
}

#[test]
fn zave_holds_with_two_successors() {
    sweep(24, 2, 40_000, 100);
}
