//! Seeds that once broke the ring, kept so they never break it again. Each
//! found a real bug (see the commit history): a joiner settling on a later
//! node, a lost reply skipping a live node, a graceful leave below r+1
//! principals, a long witness chain stalling repair, a wrapped list sending a
//! join the wrong way, an isolated node blaming its successor, and the fail
//! guard leaning on a node that had just rejoined under its old id or had
//! just come back from isolation with a stale list.

mod common;

fn replay(nodes: usize, successors: usize, seed: u64, minutes: u64) {
    let mut cfg = common::swarm(nodes, successors, seed);
    cfg.duration_ms = minutes * 60_000;
    let rep = peerstore_sim::run(cfg);
    assert!(
        rep.passed(),
        "regression seed {seed} (nodes {nodes}, r {successors}):\n{}",
        rep.summary()
    );
}

#[test]
fn swarm_seeds_that_once_failed() {
    for seed in [
        1, 3, 5, 6, 9, 10, 11, 14, 1554, 1591, 1733, 1265, 1272, 1284,
    ] {
        replay(24, 0, seed, 2);
    }
    for seed in [5018, 5083, 5111, 5121, 5125, 5214] {
        replay(40, 3, seed, 3);
    }
    for seed in [20, 29, 89, 9022, 9063, 9073] {
        replay(24, 2, seed, 2);
    }
}

/// Still failing, kept visible: 2 of 10,000 swarm seeds (803314, 807952) in
/// the last sweep. In 803314 only the 11 base nodes are members (r+1 = 11,
/// no margin), loss is 6% with duplication and a link is clogged. A node's
/// first successor stays silent to it for seconds; the node after that has
/// also lost it as predecessor (its own check timed out), so the node offers
/// itself, is taken as that witness's predecessor, and reads this as
/// evidence that the suspect is gone. Two independent paths failing at once
/// is the failure detector's residual false positive; a third opinion, or
/// a longer window before offering oneself, would make it rarer still.
#[test]
#[ignore = "known rare false failure detection under heavy loss; see the comment"]
fn heavy_loss_drops_a_live_successor() {
    replay(24, 0, 803_314, 2);
    replay(24, 0, 807_952, 2);
}
