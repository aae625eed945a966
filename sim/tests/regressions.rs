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
    let default_r = [
        1, 3, 5, 6, 9, 10, 11, 14, 1554, 1591, 1733, 1265, 1272, 1284, 109_064, 300_141, 302_512,
        303_406, 305_381, 305_862, 308_671, 701_924, 803_314, 807_952,
    ];
    for seed in default_r {
        replay(24, 0, seed, 2);
    }
    for seed in [5018, 5083, 5111, 5121, 5125, 5214] {
        replay(40, 3, seed, 3);
    }
    replay(32, 3, 1_000_659, 2);
    for seed in [20, 29, 89, 9022, 9063, 9073, 1_000_350, 1_000_957] {
        replay(24, 2, seed, 2);
    }
}

/// Still failing, kept visible: 1 of 10,000 swarm seeds (24 nodes,
/// r = 10). Only a clogged link is at play. A base node's first successor
/// is slow behind the clog; the witness after it is a fresh joiner with no
/// predecessor yet. The node offers itself as that joiner's predecessor, and
/// the next walk reads the joiner's answer as proof that the suspect has
/// gone, so a live base node is dropped at exactly r+1 principals. Treating
/// a predecessor-less witness as weak evidence (drop only after long silence)
/// fixes this seed but made about 1 in 1,000 seeds fail behind long clogs,
/// so it was reverted. The real fix is probably to tell a fresh joiner from a
/// node that lost its predecessor (e.g. a "joined at" age in State).
#[test]
#[ignore = "known rare false failure verdict, seed 909414; see the comment"]
fn fresh_joiner_vouches_against_a_slow_successor() {
    replay(24, 0, 909_414, 2);
}

/// Also failing, not yet investigated: the one failing seed of the final
/// 10,000-seed sweep (seeds 1,200,000 and up), 10 principals where r+1 = 11
/// at 17 s, during the join phase.
#[test]
#[ignore = "known rare principal-count violation, seed 1202371; not yet investigated"]
fn final_sweep_failure() {
    replay(24, 0, 1_202_371, 2);
}

fn storage_seed(seed: u64, keep_going: bool) -> peerstore_sim::Report {
    let mut cfg = common::swarm(24, 0, seed);
    cfg.duration_ms = 120_000;
    cfg.stop_on_violation = !keep_going;
    cfg.storage = peerstore_sim::StorageConfig {
        enabled: true,
        record_writes_per_s: 2.0,
        corrupt: 0.02,
        ..peerstore_sim::StorageConfig::default()
    };
    peerstore_sim::run(cfg)
}

/// The storage sweep's only failures in 10,000 seeds (2,000,000 to
/// 2,009,999; `--storage --record-writes-per-s 2 --corrupt 0.02`): 10
/// principals where r+1 = 11 (at 38.5 s and 34.3 s), the class of
/// `final_sweep_failure`. The sweep stops a run at its first violation, so
/// the storage checks then saw keys not yet back on their R replicas; run on
/// (next test), storage is whole.
#[test]
#[ignore = "known rare principal-count violations in the storage sweep, seeds 2007076 and 2009840; the ring's open problem"]
fn storage_sweep_failure() {
    for seed in [2_007_076, 2_009_840] {
        let rep = storage_seed(seed, false);
        assert!(rep.passed(), "storage seed {seed}:\n{}", rep.summary());
    }
}

/// Past the ring's violation, the same seeds lose nothing: every acked
/// write is readable, no record diverges, every key is back on its R
/// replicas, and the ring becomes ideal after healing.
#[test]
fn storage_is_whole_after_the_principal_count_seeds() {
    for seed in [2_007_076, 2_009_840] {
        let rep = storage_seed(seed, true);
        let st = rep.storage.as_ref().expect("a storage report");
        assert!(
            !rep.no_liveness && st.passed() && st.repaired,
            "storage seed {seed} (run on past the ring's violation):\n{}",
            rep.summary()
        );
        assert!(
            rep.invariant_violations.count > 0,
            "seed {seed} no longer breaks the ring: move it to the seeds that once failed"
        );
    }
}
