//! The 2001 rules are kept as a negative control: on the same seeds where
//! Zave's rules hold, they break the invariants the checkers exist to catch.

mod common;

use peerstore_core::Protocol;
use peerstore_sim::script::zave_join_then_fail;

#[test]
fn chord2001_breaks_on_a_clear_share_of_seeds_zave_on_none() {
    let seeds = 40u64;
    let mut broken_2001 = 0;
    for seed in 500..500 + seeds {
        let mut cfg = common::swarm(24, 2, seed);
        cfg.protocol = Protocol::Chord2001;
        let rep = peerstore_sim::run(cfg);
        if rep.invariant_violations.count > 0 {
            broken_2001 += 1;
        }
        let zave = peerstore_sim::run(common::swarm(24, 2, seed));
        assert!(
            zave.passed(),
            "seed {seed} failed under Zave's rules:\n{}",
            zave.summary()
        );
    }
    // Observed: every one of these seeds breaks under the 2001 rules.
    assert!(
        broken_2001 * 4 >= seeds,
        "only {broken_2001} of {seeds} seeds broke under chord2001: the checkers lost their teeth"
    );
}

#[test]
fn zave_counterexample_is_a_permanent_gap_under_2001_only() {
    let (_, v2001) = zave_join_then_fail(Protocol::Chord2001);
    assert!(
        !v2001.is_empty(),
        "the 2001 rules should leave the ring broken"
    );
    let (_, vzave) = zave_join_then_fail(Protocol::Zave);
    assert!(
        vzave.is_empty(),
        "Zave's rules should heal the ring: {vzave:?}"
    );
}
