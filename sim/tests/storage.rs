//! Replicated storage under faults. Every run is judged by the durability
//! checkers: (a) no acknowledged write lost unless R of its copies were lost
//! at once, (b) every key back on its R right nodes after healing, (c) record
//! replicas agree, (d) no stored block fails its hash; then acknowledged keys
//! are read back. `PEERSTORE_SEEDS=10000` runs the long sweep.

mod common;

use peerstore_sim::{SimConfig, StorageConfig};

fn with_storage(mut cfg: SimConfig) -> SimConfig {
    cfg.storage = StorageConfig {
        enabled: true,
        puts_per_s: 2.0,
        gets_per_s: 1.0,
        record_writes_per_s: 2.0,
        corrupt: 0.02,
        ..StorageConfig::default()
    };
    cfg
}

/// Swarm faults (loss, duplication, reordering, partitions, clogs, pauses,
/// crashes, churn) with block puts, concurrent manifest writers, log appends
/// and corruption in flight.
fn swarm_storage(seed: u64) -> SimConfig {
    with_storage(common::swarm(24, 0, seed))
}

/// Runs `n` seeds from `first` (two halves run on the test threads at once).
fn storage_sweep(first: u64, n: u64) {
    let (mut acked, mut records, mut corrupted) = (0, 0, 0);
    let bad = common::sweep(n, first, swarm_storage, |rep| {
        let st = rep.storage.as_ref().expect("storage ran");
        acked += st.puts_acked;
        records += st.record_writes_acked;
        corrupted += st.corrupted_in_flight;
    });
    assert!(
        bad.is_empty(),
        "{} of {n} seeds failed; replay with `peerstore-sim --nodes 24 --swarm --storage \
         --record-writes-per-s 2 --corrupt 0.02 --duration 2min --seed SEED`:\n{}",
        bad.len(),
        common::listed(&bad)
    );
    // Not vacuous: the runs stored, wrote records and saw corruption.
    assert!(acked > 100 * n, "{acked} block puts acked over {n} seeds");
    assert!(
        records > 100 * n,
        "{records} record writes acked over {n} seeds"
    );
    assert!(corrupted > 0, "no block was corrupted in flight");
}

#[test]
fn storage_survives_swarm_faults_first_half() {
    storage_sweep(100_000, common::seeds(200) / 2);
}

#[test]
fn storage_survives_swarm_faults_second_half() {
    let n = common::seeds(200);
    storage_sweep(100_000 + n / 2, n - n / 2);
}

fn kill_neighbours(nodes: usize, blocks: u64, killed: u32, seed: u64) -> SimConfig {
    let mut cfg = with_storage(common::calm(nodes, seed));
    cfg.storage.corrupt = 0.0;
    cfg.storage.preload_blocks = blocks;
    cfg.kill_adjacent = killed;
    cfg.fail_at_ms = 30_000;
    cfg.duration_ms = 60_000;
    cfg
}

#[test]
fn losing_two_neighbours_loses_nothing_and_repair_costs_about_the_oracle() {
    for seed in 1..=3 {
        let rep = peerstore_sim::run(kill_neighbours(200, 5_000, 2, seed));
        let st = rep.storage.as_ref().expect("storage ran");
        assert!(rep.passed(), "seed {seed}:\n{}", rep.summary());
        assert_eq!(st.lost_acked + st.lost_excused, 0, "seed {seed}");
        assert!(st.final_reads_ok >= 400, "seed {seed}: {}", rep.summary());
        assert!(st.oracle_repair_bytes > 0, "the two nodes held replicas");
        let ratio = st.repair_over_oracle.expect("oracle > 0");
        assert!(
            ratio <= 1.5,
            "seed {seed}: repair cost {ratio:.2}x the oracle\n{}",
            rep.summary()
        );
    }
}

#[test]
fn losing_r_neighbours_at_once_is_reported_as_excused_loss() {
    // R = 3 copies and 3 neighbours gone at once: keys held only by them are
    // gone, and the checker says so (excused), rather than passing silently.
    let rep = peerstore_sim::run(kill_neighbours(100, 3_000, 3, 4));
    let st = rep.storage.as_ref().expect("storage ran");
    assert!(st.lost_excused > 0, "{}", rep.summary());
    assert_eq!(st.lost_acked, 0, "{}", rep.summary());
}

#[test]
fn without_anti_entropy_the_checkers_see_under_replication() {
    // The negative control: the same kill with repair switched off must be
    // caught by checker (b).
    let mut cfg = kill_neighbours(100, 3_000, 2, 5);
    cfg.storage.sync_ms = 1 << 40;
    cfg.storage.repair_bound_ms = 30_000;
    let rep = peerstore_sim::run(cfg);
    let st = rep.storage.as_ref().expect("storage ran");
    assert!(!rep.passed());
    assert!(!st.repaired);
    assert!(st.under_replicated > 0, "{}", rep.summary());
}

/// Machines running four virtual nodes each: a crash, pause, partition or
/// departure takes all four positions at once, so copies must sit on
/// distinct machines or a single failure takes several.
#[test]
fn storage_survives_swarm_faults_on_virtual_nodes() {
    let n = common::seeds(200) / 8;
    let mut acked = 0;
    let on_four = |seed| {
        let mut cfg = swarm_storage(seed);
        cfg.vnodes = 4;
        cfg
    };
    let bad = common::sweep(n, 300_000, on_four, |rep| {
        acked += rep.storage.as_ref().expect("storage ran").puts_acked;
    });
    assert!(
        bad.is_empty(),
        "{} of {n} seeds failed; replay with `peerstore-sim --nodes 24 --vnodes 4 --swarm \
         --storage --record-writes-per-s 2 --corrupt 0.02 --duration 2min --seed SEED`:\n{}",
        bad.len(),
        common::listed(&bad)
    );
    assert!(acked > 100 * n, "{acked} block puts acked over {n} seeds");
}

#[test]
fn losing_two_machines_of_sixteen_virtual_nodes_loses_nothing() {
    // 2 machines x 16 positions gone for good at once; with copies on
    // distinct machines every key keeps at least one of its three.
    let mut cfg = kill_neighbours(60, 3_000, 2, 6);
    cfg.vnodes = 16;
    let rep = peerstore_sim::run(cfg);
    let st = rep.storage.as_ref().expect("storage ran");
    assert!(rep.passed(), "{}", rep.summary());
    assert_eq!(st.lost_acked + st.lost_excused, 0, "{}", rep.summary());
    assert!(st.oracle_repair_bytes > 0, "the machines held replicas");
    assert!(st.final_reads_ok >= 400, "{}", rep.summary());
}

#[test]
fn storage_runs_replay_exactly() {
    let a = peerstore_sim::run(swarm_storage(7));
    let b = peerstore_sim::run(swarm_storage(7));
    assert_eq!(a.trace_hash, b.trace_hash);
    let (sa, sb) = (a.storage.expect("ran"), b.storage.expect("ran"));
    assert_eq!(sa.puts_acked, sb.puts_acked);
    assert_eq!(sa.repair_bytes, sb.repair_bytes);
}

/// Seeds that once failed a storage checker, each fixed since (kept so the
/// fix stays): an acknowledged block lost when its coordinator crashed before
/// the third copy, the primary's other partner was paused and its list had
/// not yet learned of the right third node (200278); right nodes declared
/// repaired while a newer copy sat elsewhere, while a crashed replica had yet
/// to return, or while a graceful leave or a late join was still moving keys;
/// a graceful leave finishing its hand-off after the fail guard had already
/// counted the node as live (100005); both acknowledged copies of a W = 2
/// write lost while the third copy's lost put waited out a fixed 5 s storage
/// timeout (4009xx, 400414).
#[test]
fn storage_seeds_that_once_failed() {
    let mut bad = Vec::new();
    for seed in [
        100_005, 100_066, 100_075, 100_097, 100_100, 100_113, 100_127, 100_158, 100_176, 100_190,
        200_151, 200_235, 200_278,
    ] {
        let rep = peerstore_sim::run(swarm_storage(seed));
        if !rep.passed() {
            bad.push(format!("seed {seed}:\n{}", rep.summary()));
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}
