//! `peerstore-bench`: the simulator's experiments at full size, printed as
//! figures beside their targets. Each experiment runs `peerstore-sim --json`
//! in its own process so wall time and peak memory are that run's alone.
//!
//!   cargo run --release -p peerstore-sim --bin peerstore-bench            # everything (~20 min)
//!   cargo run --release -p peerstore-sim --bin peerstore-bench -- --quick # smaller sizes
//!   cargo run --release -p peerstore-sim --bin peerstore-bench -- hops churn
//!
//! Sections: hops, failure, churn, safety, negative, replay, scale, load,
//! storage-seeds, storage-kill, storage-scale
//! (`load` runs in-process and needs no peerstore-sim binary).

use peerstore_core::vnode::{replica_load, vnode_ids};
use peerstore_core::Id;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::Value;
use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::time::Instant;

const QUIET: &[&str] = &[
    "--loss",
    "0",
    "--reorder",
    "0",
    "--crash-rate",
    "0",
    "--pause-rate",
    "0",
    "--partition-rate",
    "0",
    "--clog-rate",
    "0",
];

fn sim_path() -> PathBuf {
    let exe = std::env::current_exe().expect("own path");
    exe.with_file_name(format!("peerstore-sim{}", std::env::consts::EXE_SUFFIX))
}

/// Runs one simulation and returns its JSON report(s).
fn run(args: &[&str]) -> Vec<Value> {
    let out = Command::new(sim_path())
        .args(args)
        .arg("--json")
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {}: {e} (build it: cargo build --release -p peerstore-sim)",
                sim_path().display()
            )
        });
    let text = String::from_utf8_lossy(&out.stdout);
    // --json prints one pretty document per seed; split on top-level braces.
    let mut docs = Vec::new();
    let mut de = serde_json::Deserializer::from_str(&text).into_iter::<Value>();
    while let Some(Ok(v)) = de.next() {
        docs.push(v);
    }
    if docs.is_empty() {
        panic!(
            "peerstore-sim {args:?} printed no report: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    docs
}

/// Runs one simulation on a fault-free network (only the experiment's own
/// churn or failure) and returns its report.
fn run_quiet(args: &[&str]) -> Value {
    let mut a = args.to_vec();
    a.extend_from_slice(QUIET);
    run(&a).remove(0)
}

struct Verdicts {
    lines: Vec<(String, bool)>,
}

impl Verdicts {
    fn check(&mut self, what: String, ok: bool) {
        println!("  {} {what}", if ok { "PASS" } else { "FAIL" });
        self.lines.push((what, ok));
    }
}

fn f(v: &Value, path: &str) -> f64 {
    let mut cur = v;
    for k in path.split('.') {
        cur = &cur[k];
    }
    cur.as_f64().unwrap_or(f64::NAN)
}

fn mib(v: &Value) -> f64 {
    f(v, "peak_rss_bytes") / (1024.0 * 1024.0)
}

fn hops(v: &mut Verdicts, quick: bool) {
    println!("\n== 1. Stable ring path length (Chord SIGCOMM'01 Fig. 10: about 0.5*log2 N) ==");
    println!(
        "  {:>6} {:>14} {:>8} {:>8} {:>14} {:>8}",
        "N", "fingers: mean", "p50", "p99", "with lists", "p99"
    );
    let top = if quick { 12 } else { 14 };
    for exp in 3..=top {
        let n = (1u64 << exp).to_string();
        let base = [
            "--nodes",
            &n,
            "--start",
            "ideal",
            "--churn",
            "0",
            "--duration",
            "30s",
            "--seed",
            "1",
            "--check",
            "off",
        ];
        let k = if exp >= 12 { "2" } else { "8" };
        let mut a: Vec<&str> = base.to_vec();
        a.extend_from_slice(QUIET);
        a.extend_from_slice(&["--lookups-per-node-per-min", k]);
        let mut fo = a.clone();
        fo.push("--fingers-only");
        let r_fo = &run(&fo)[0];
        let r_wl = &run(&a)[0];
        println!(
            "  {:>6} {:>14.2} {:>8} {:>8} {:>14.2} {:>8}",
            n,
            f(r_fo, "lookups.mean_hops"),
            f(r_fo, "lookups.p50_hops"),
            f(r_fo, "lookups.p99_hops"),
            f(r_wl, "lookups.mean_hops"),
            f(r_wl, "lookups.p99_hops")
        );
        let log = exp as f64;
        let ok = f(r_fo, "lookups.mean_hops") <= 0.5 * log + 1.0
            && f(r_fo, "lookups.p99_hops") <= log + 2.0
            && f(r_fo, "lookups.failed") == 0.0
            && f(r_fo, "lookups.wrong") == 0.0;
        v.check(
            format!(
                "N={n} fingers only: mean {:.2} <= {:.1}, p99 {} <= {}, {} lookups, 0 failed/wrong",
                f(r_fo, "lookups.mean_hops"),
                0.5 * log + 1.0,
                f(r_fo, "lookups.p99_hops"),
                log + 2.0,
                f(r_fo, "lookups.count")
            ),
            ok,
        );
    }
}

fn mass_failure(v: &mut Verdicts) {
    println!("\n== 2. Half of 1,000 nodes fail at once; 10,000 lookups before any repair (ToN'03: ~5.1 hops, none failed) ==");
    let a = vec![
        "--nodes",
        "1000",
        "--successors",
        "20",
        "--start",
        "ideal",
        "--churn",
        "0",
        "--fail-fraction",
        "0.5",
        "--fail-at",
        "30s",
        "--lookups-after-fail",
        "10000",
        "--duration",
        "60s",
        "--lookups-per-node-per-min",
        "0",
        "--seed",
        "1",
    ];
    let r = &run_quiet(&a);
    println!(
        "  lookups {} wrong {} failed {} mean hops {:.2} p99 {} timeouts/lookup {:.2}; ideal again {} ms after repair resumed",
        f(r, "lookups.count"),
        f(r, "lookups.wrong"),
        f(r, "lookups.failed"),
        f(r, "lookups.mean_hops"),
        f(r, "lookups.p99_hops"),
        f(r, "lookups.mean_timeouts"),
        f(r, "converge_ms")
    );
    v.check(
        format!(
            "mass failure: 0 wrong ({}), 0 failed ({}), mean hops {:.2} <= 6, ideal after repair ({})",
            f(r, "lookups.wrong"),
            f(r, "lookups.failed"),
            f(r, "lookups.mean_hops"),
            r["converged"]
        ),
        f(r, "lookups.wrong") == 0.0
            && f(r, "lookups.failed") == 0.0
            && f(r, "lookups.mean_hops") <= 6.0
            && r["converged"] == true,
    );
}

fn churn(v: &mut Verdicts, quick: bool) {
    let dur = if quick { "10min" } else { "1h" };
    println!(
        "\n== 3. Churn: 1,000 nodes, r=20, 0.4 joins/s and 0.4 leaves/s for {dur} (ToN'03) =="
    );
    let a = vec![
        "--nodes",
        "1000",
        "--successors",
        "20",
        "--start",
        "ideal",
        "--churn",
        "0.4",
        "--duration",
        dur,
        "--lookups-per-node-per-min",
        "1",
        "--seed",
        "1",
    ];
    let r = &run_quiet(&a);
    let failed = f(r, "lookups.failed") / f(r, "lookups.count");
    println!(
        "  lookups {} failed {} ({:.3}%) wrong {} mean hops {:.2} p99 {}; msgs/node/s {:.2}; {:.0} events in {:.1} s wall ({:.0} events/s), peak {:.0} MiB",
        f(r, "lookups.count"),
        f(r, "lookups.failed"),
        failed * 100.0,
        f(r, "lookups.wrong"),
        f(r, "lookups.mean_hops"),
        f(r, "lookups.p99_hops"),
        f(r, "messages_per_node_per_s"),
        f(r, "events"),
        f(r, "wall_ms") / 1000.0,
        f(r, "events_per_s"),
        mib(r)
    );
    v.check(
        format!(
            "churn: failed {:.3}% <= 0.2%, mean hops {:.2} <= 4.5, invariants held, ideal after",
            failed * 100.0,
            f(r, "lookups.mean_hops")
        ),
        failed <= 0.002
            && f(r, "lookups.mean_hops") <= 4.5
            && f(r, "invariant_violations.count") == 0.0
            && r["converged"] == true,
    );
    if !quick {
        v.check(
            format!(
                "speed: 1,000 nodes x 1 simulated hour with churn in {:.1} s wall <= 60 s",
                f(r, "wall_ms") / 1000.0
            ),
            f(r, "wall_ms") <= 60_000.0,
        );
    }
}

fn safety(v: &mut Verdicts, seeds: u64) {
    println!("\n== 4. Safety over {seeds} swarm seeds (loss, duplication, reordering, partitions, clogs, pauses, crashes, churn) ==");
    let s = seeds.to_string();
    for (nodes, r) in [("24", "0"), ("32", "3"), ("24", "2")] {
        let reps = run(&[
            "--nodes",
            nodes,
            "--successors",
            r,
            "--swarm",
            "--seeds",
            &s,
            "--seed",
            "1000000",
            "--duration",
            "2min",
        ]);
        let failed: Vec<u64> = reps
            .iter()
            .filter(|x| x["invariant_violations"]["count"] != 0 || x["no_liveness"] == true)
            .map(|x| x["seed"].as_u64().unwrap_or(0))
            .collect();
        let wrong: f64 = reps.iter().map(|x| f(x, "lookups.wrong")).sum();
        let total: f64 = reps.iter().map(|x| f(x, "lookups.count")).sum();
        v.check(
            format!(
                "zave, {nodes} nodes, r={}: {} of {} seeds held every invariant and converged{} (lookups under faults: {:.2}% wrong)",
                reps[0]["successors"], reps.len() - failed.len(), reps.len(),
                if failed.is_empty() { String::new() } else { format!("; failing seeds {failed:?}") },
                100.0 * wrong / total.max(1.0)
            ),
            failed.is_empty(),
        );
    }
}

fn negative(v: &mut Verdicts, seeds: u64) {
    println!("\n== 5. Negative control: the 2001 rules with r=2 on the same kind of seeds ==");
    let s = seeds.to_string();
    let reps = run(&[
        "--nodes",
        "24",
        "--successors",
        "2",
        "--protocol",
        "chord2001",
        "--swarm",
        "--seeds",
        &s,
        "--seed",
        "1000000",
        "--duration",
        "2min",
    ]);
    let broken = reps
        .iter()
        .filter(|x| x["invariant_violations"]["count"] != 0)
        .count();
    let first = reps
        .iter()
        .find_map(|x| {
            x["invariant_violations"]["first"]
                .as_str()
                .map(str::to_string)
        })
        .unwrap_or_default();
    v.check(
        format!(
            "chord2001: checkers caught violations on {broken} of {} seeds (e.g. {first})",
            reps.len()
        ),
        broken * 5 >= reps.len(),
    );
}

fn determinism(v: &mut Verdicts) {
    println!("\n== 6. Replay ==");
    let a = &run(&[
        "--nodes",
        "64",
        "--swarm",
        "--seed",
        "42",
        "--duration",
        "5min",
    ])[0];
    let b = &run(&[
        "--nodes",
        "64",
        "--swarm",
        "--seed",
        "42",
        "--duration",
        "5min",
    ])[0];
    let c = &run(&[
        "--nodes",
        "64",
        "--swarm",
        "--seed",
        "43",
        "--duration",
        "5min",
    ])[0];
    v.check(
        format!(
            "seed 42 twice: {} / {}; seed 43: {}",
            a["trace_hash"], b["trace_hash"], c["trace_hash"]
        ),
        a["trace_hash"] == b["trace_hash"] && a["trace_hash"] != c["trace_hash"],
    );
}

fn scale(v: &mut Verdicts, quick: bool) {
    println!("\n== 7. Scale ==");
    let dur = if quick { "2min" } else { "10min" };
    // Maintenance every second is aggressive for 10,000 nodes (deployed Chord
    // rings stabilize every few to thirty seconds); both are reported.
    for (stab, fingers) in [("1s", "5s"), ("5s", "25s")] {
        let r = &run_quiet(&[
            "--nodes",
            "10000",
            "--start",
            "ideal",
            "--churn",
            "4",
            "--duration",
            dur,
            "--lookups-per-node-per-min",
            "0.2",
            "--seed",
            "1",
            "--check",
            "sampled:10s",
            "--converge-bound",
            "1s",
            "--stabilize",
            stab,
            "--fix-fingers",
            fingers,
        ]);
        let factor = f(r, "sim_ms") / f(r, "wall_ms");
        println!(
            "  10,000 nodes, churn 4/s, stabilize {stab}, fingers {fingers}: {:.0} s simulated in {:.1} s wall = {factor:.1}x real time, {:.0} events/s, {:.1} msgs/node/s, peak {:.0} MiB",
            f(r, "sim_ms") / 1000.0,
            f(r, "wall_ms") / 1000.0,
            f(r, "events_per_s"),
            f(r, "messages_per_node_per_s"),
            mib(r)
        );
        v.check(
            format!("10,000 nodes (stabilize {stab}) at {factor:.1}x real time >= 10x"),
            factor >= 10.0,
        );
    }
    let n = if quick { "30000" } else { "100000" };
    let r = &run_quiet(&[
        "--nodes",
        n,
        "--start",
        "ideal",
        "--churn",
        "0",
        "--duration",
        "60s",
        "--lookups-per-node-per-min",
        "0",
        "--seed",
        "1",
        "--check",
        "off",
        "--converge-bound",
        "1s",
    ]);
    println!(
        "  {n} nodes start and run 60 s of stabilization: {:.1} s wall, {:.0} events/s, ideal at the end: {}, peak {:.0} MiB",
        f(r, "wall_ms") / 1000.0,
        f(r, "events_per_s"),
        r["converged"],
        mib(r)
    );
    v.check(
        format!("{n} nodes under 8 GiB: peak {:.0} MiB", mib(r)),
        mib(r) < 8192.0,
    );
}

/// Nearest-rank percentile of an ascending slice.
fn percentile(sorted: &[u64], p: f64) -> u64 {
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn load(v: &mut Verdicts, quick: bool) {
    let (n, k) = if quick {
        (1_000usize, 100_000usize)
    } else {
        (10_000, 1_000_000)
    };
    println!(
        "\n== 8. Load balance: {n} nodes, {k} keys, v virtual nodes per node (Chord SIGCOMM'01 §6.2: p99 about 1.6x mean with 20) =="
    );
    let t0 = Instant::now();
    // Node identities stand in for public keys; block ids for stored blocks.
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let identities: Vec<[u8; 32]> = (0..n)
        .map(|_| {
            let mut b = [0u8; 32];
            rng.fill_bytes(&mut b);
            b
        })
        .collect();
    let keys: Vec<Id> = (0..k)
        .map(|_| {
            let mut b = [0u8; 32];
            rng.fill_bytes(&mut b);
            Id::hash(&b)
        })
        .collect();
    println!(
        "  {:>3} {:>3} {:>10} {:>9} {:>9} {:>9} {:>8}",
        "v", "R", "keys/node", "max/mean", "p99/mean", "p1/mean", "wall ms"
    );
    let (mut r1, mut r3) = (f64::NAN, None);
    for vcount in [1u32, 4, 16] {
        let vnodes: Vec<(Id, u32)> = identities
            .iter()
            .enumerate()
            .flat_map(|(p, ident)| {
                vnode_ids(ident, vcount)
                    .into_iter()
                    .map(move |id| (id, p as u32))
            })
            .collect();
        for r in [1usize, 3] {
            let t = Instant::now();
            let mut held = replica_load(&vnodes, keys.iter().copied(), r, n);
            let ms = t.elapsed().as_millis();
            held.sort_unstable();
            let mean = held.iter().sum::<u64>() as f64 / n as f64;
            let max = *held.last().unwrap_or(&0) as f64 / mean;
            let p99 = percentile(&held, 0.99) as f64 / mean;
            let p1 = percentile(&held, 0.01) as f64 / mean;
            println!("  {vcount:>3} {r:>3} {mean:>10.1} {max:>9.2} {p99:>9.2} {p1:>9.2} {ms:>8}");
            if vcount == 16 && r == 3 {
                r3 = Some((p99, max));
            }
            if vcount == 16 && r == 1 {
                r1 = p99;
            }
        }
    }
    // R = 1 is Chord's own setting. Random placement predicts p99/mean of
    // about 1.72 at v = 16 and 1.65 at v = 20 for 100 keys per node (a
    // negative binomial: Poisson key counts on Gamma(v) shares); the paper
    // reports about 1.6 at v = 20. The target applies to the R = 3 store.
    println!(
        "  v = 16, R = 1 (Chord's setting): p99/mean {r1:.2}; random placement predicts ~1.72 at 100 keys/node"
    );
    if let Some((p99, max)) = r3 {
        v.check(
            format!("load, v = 16, R = 3: p99/mean {p99:.2} <= 1.7 (max/mean {max:.2})"),
            p99 <= 1.7,
        );
    }
    // The same with running nodes: machines with v virtual nodes each, the
    // store filled, then bytes held per machine after the ring has run.
    let (machines, blocks) = if quick {
        ("100", "10000")
    } else {
        ("500", "50000")
    };
    println!(
        "  running simulator: {machines} machines, {blocks} blocks, R = 3 (bytes per machine):"
    );
    let mut running = Vec::new();
    for vcount in ["1", "16"] {
        let r = run(&[
            "--storage",
            "--nodes",
            machines,
            "--vnodes",
            vcount,
            "--start",
            "ideal",
            "--preload-blocks",
            blocks,
            "--puts-per-s",
            "0",
            "--record-writes-per-s",
            "0",
            "--duration",
            "30s",
            "--seed",
            "1",
            "--check",
            "sampled:10s",
        ])
        .remove(0);
        let (max, p99) = (
            f(&r, "storage.bytes_per_node_max_over_mean"),
            f(&r, "storage.bytes_per_node_p99_over_mean"),
        );
        println!(
            "  {vcount:>3}   3 max/mean {max:.2} p99/mean {p99:.2}; repaired {}; {:.0} s wall",
            r["storage"]["repaired"],
            f(&r, "wall_ms") / 1000.0
        );
        running.push((p99, r["storage"]["repaired"] == true));
    }
    v.check(
        format!(
            "running nodes, v = 16, R = 3: p99/mean {:.2} <= 1.7 and every key at R copies",
            running[1].0
        ),
        running[1].0 <= 1.7 && running[1].1,
    );
    println!("  load section: {:.1} s wall", t0.elapsed().as_secs_f64());
}

fn storage_seeds(v: &mut Verdicts, seeds: u64) {
    println!("\n== S1. Storage over {seeds} swarm seeds (crashes, partitions, churn, concurrent record writers, corruption in flight) ==");
    let s = seeds.to_string();
    let t = Instant::now();
    let reps = run(&[
        "--nodes",
        "24",
        "--swarm",
        "--storage",
        "--record-writes-per-s",
        "2",
        "--corrupt",
        "0.02",
        "--seeds",
        &s,
        "--seed",
        "2000000",
        "--duration",
        "2min",
    ]);
    let sum = |path: &str| reps.iter().map(|x| f(x, path)).sum::<f64>();
    let failed: Vec<u64> = reps
        .iter()
        .filter(|x| {
            x["invariant_violations"]["count"] != 0
                || x["no_liveness"] == true
                || f(x, "storage.lost_acked") > 0.0
                || f(x, "storage.divergent") > 0.0
                || f(x, "storage.under_replicated") > 0.0
                || f(x, "storage.bad_blocks") > 0.0
                || f(x, "storage.final_reads_failed") > 0.0
                || x["storage"]["repaired"] != true
        })
        .map(|x| x["seed"].as_u64().unwrap_or(0))
        .collect();
    println!(
        "  {} block puts and {} record writes acknowledged; {} lost ({} excused: R copies lost at once); {} divergent; {} keys under-replicated after healing; {} bad blocks stored; {} corrupted in flight; {:.0} s wall",
        sum("storage.puts_acked"), sum("storage.record_writes_acked"), sum("storage.lost_acked"),
        sum("storage.lost_excused"), sum("storage.divergent"), sum("storage.under_replicated"),
        sum("storage.bad_blocks"), sum("storage.corrupted_in_flight"), t.elapsed().as_secs_f64()
    );
    v.check(
        format!(
            "{} of {} seeds: no acknowledged write lost, replicas converged, every key at R copies after healing{}",
            reps.len() - failed.len(),
            reps.len(),
            if failed.is_empty() { String::new() } else { format!("; failing seeds {failed:?}") }
        ),
        failed.is_empty(),
    );
}

fn storage_kill(v: &mut Verdicts, quick: bool) {
    let (n, blocks) = if quick {
        ("200", "10000")
    } else {
        ("1000", "100000")
    };
    println!("\n== S2. N = {n}, R = 3, {blocks} blocks: two ring neighbours (replicas of the same keys) fail at once ==");
    for seed in ["1", "2", "3"] {
        let r = run_quiet(&[
            "--storage",
            "--nodes",
            n,
            "--start",
            "ideal",
            "--churn",
            "0",
            "--preload-blocks",
            blocks,
            "--kill-adjacent",
            "2",
            "--fail-at",
            "60s",
            "--duration",
            "2min",
            "--seed",
            seed,
        ]);
        let ratio = f(&r, "storage.repair_over_oracle");
        println!(
            "  seed {seed}: lost {} (excused {}), read back {} acked keys ({} failed), repair {:.0} bytes vs oracle {:.0} = {ratio:.2}x, {:.1} s wall, {:.0} MiB",
            f(&r, "storage.lost_acked"), f(&r, "storage.lost_excused"), f(&r, "storage.final_reads_ok"),
            f(&r, "storage.final_reads_failed"), f(&r, "storage.repair_bytes"), f(&r, "storage.oracle_repair_bytes"),
            f(&r, "wall_ms") / 1000.0, mib(&r)
        );
        v.check(
            format!("seed {seed}: every acknowledged object readable, back to R copies, repair {ratio:.2}x the oracle (target <= 1.5, Carbonite 1.44)"),
            f(&r, "storage.lost_acked") == 0.0
                && f(&r, "storage.lost_excused") == 0.0
                && f(&r, "storage.final_reads_failed") == 0.0
                && r["storage"]["repaired"] == true
                && ratio <= 1.5,
        );
    }
}

fn storage_scale(v: &mut Verdicts, quick: bool) {
    let (n, blocks, dur) = if quick {
        ("200", "10000", "10min")
    } else {
        ("1000", "100000", "1h")
    };
    println!("\n== S5. Storage scale: {n} nodes x {blocks} blocks, churn 0.4/s for {dur} (plus loss, crashes, partitions) ==");
    let r = run(&[
        "--storage",
        "--nodes",
        n,
        "--start",
        "ideal",
        "--churn",
        "0.4",
        "--preload-blocks",
        blocks,
        "--duration",
        dur,
        "--seed",
        "1",
        "--check",
        "sampled:10s",
    ])
    .remove(0);
    println!(
        "  {:.0} s wall, peak {:.0} MiB; {} puts acked, lost {}, under-replicated {}, divergent {}; bytes/node max/mean {:.2} p99/mean {:.2}; ack latency mean {:.0} ms p99 {:.0} ms; repair {:.2}x the permanent-loss oracle",
        f(&r, "wall_ms") / 1000.0, mib(&r), f(&r, "storage.puts_acked"), f(&r, "storage.lost_acked"),
        f(&r, "storage.under_replicated"), f(&r, "storage.divergent"),
        f(&r, "storage.bytes_per_node_max_over_mean"), f(&r, "storage.bytes_per_node_p99_over_mean"),
        f(&r, "storage.ack_latency_mean_ms"), f(&r, "storage.ack_latency_p99_ms"),
        f(&r, "storage.repair_over_oracle")
    );
    v.check(
        format!("{n} nodes x {blocks} blocks, {dur} of churn: nothing acknowledged lost, every key back at R copies"),
        f(&r, "storage.lost_acked") == 0.0 && r["storage"]["repaired"] == true,
    );
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let seeds: u64 = args
        .iter()
        .position(|a| a == "--seeds")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(if quick { 100 } else { 1000 });
    let picked: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|a| !a.starts_with("--") && a.parse::<u64>().is_err())
        .collect();
    let want = |name: &str| picked.is_empty() || picked.contains(&name);
    println!(
        "peerstore-bench{} (simulator: {})",
        if quick { " --quick" } else { "" },
        sim_path().display()
    );
    let mut v = Verdicts { lines: Vec::new() };
    if want("hops") {
        hops(&mut v, quick);
    }
    if want("failure") {
        mass_failure(&mut v);
    }
    if want("churn") {
        churn(&mut v, quick);
    }
    if want("safety") {
        safety(&mut v, seeds);
    }
    if want("negative") {
        negative(&mut v, seeds.min(200));
    }
    if want("replay") {
        determinism(&mut v);
    }
    if want("scale") {
        scale(&mut v, quick);
    }
    if want("load") {
        load(&mut v, quick);
    }
    if want("storage-seeds") {
        storage_seeds(&mut v, seeds);
    }
    if want("storage-kill") {
        storage_kill(&mut v, quick);
    }
    if want("storage-scale") {
        storage_scale(&mut v, quick);
    }
    let bad = v.lines.iter().filter(|(_, ok)| !ok).count();
    println!("\n{} passed, {} failed", v.lines.len() - bad, bad);
    if bad == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
