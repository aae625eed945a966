//! `peerstore-sim`: run the PeerStore core in the deterministic simulator.

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use peerstore_core::Protocol;
use peerstore_sim::{CheckMode, Cut, Fault, FaultKind, Session, SimConfig, Start};
use std::process::ExitCode;
use std::time::Duration;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ProtocolArg {
    /// Zave's corrected Chord (the real protocol).
    Zave,
    /// The 2001 rules: the negative control that should break.
    Chord2001,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum SessionArg {
    Exp,
    Weibull,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum StartArg {
    Ideal,
    Join,
}

/// Simulate a PeerStore Chord ring deterministically: same seed, same run.
///
/// Runs N real protocol cores over a simulated network with latency, loss,
/// duplication, reordering, partitions, crashes, pauses and churn; checks
/// Zave's ring invariants after every change; then heals the network and
/// requires the ring to become ideal within a bound. Exit status 0 means every
/// run held every invariant and converged.
///
/// Examples:
///   peerstore-sim                                   # 256 nodes, 10 min, churn and loss
///   peerstore-sim --nodes 1000 --successors 20 --churn 0.4 --duration 1h
///   peerstore-sim --seed 42 --swarm --seeds 500     # 500 seeds, faults drawn per seed
///   peerstore-sim --protocol chord2001 --successors 2 --seeds 200 --swarm
///   peerstore-sim --partition sym:0.5@60s+2s --svg ring.svg
#[derive(Parser, Debug)]
#[command(name = "peerstore-sim", version, verbatim_doc_comment)]
struct Args {
    /// Number of nodes (machines) at the start.
    #[arg(long, default_value_t = 256)]
    nodes: usize,
    /// Virtual nodes per machine: ring positions that share the machine's
    /// address, disk and fate (a crash or departure takes all of them).
    /// Replicas go to distinct machines.
    #[arg(long, default_value_t = 1, value_name = "V")]
    vnodes: usize,
    /// Real identities on every machine (RSA keys; ids derive from them), an
    /// operator root that endorses every honest machine, and all traffic
    /// between machines in secure sessions (handshake, trust check, sealed
    /// frames) over ordered links. Slower: every message is encrypted.
    #[arg(long)]
    secure: bool,
    /// With --secure: this many machines whose endorsement chain leads to a
    /// root nobody trusts try to join and store. The run fails if any of
    /// their messages reaches an honest node, any honest node points at
    /// them, or any of their puts is acknowledged.
    #[arg(long, default_value_t = 0, value_name = "N")]
    attackers: usize,
    /// Seed of the run (every random choice derives from it).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Run this many seeds, starting at --seed; prints one line each.
    #[arg(long, default_value_t = 1)]
    seeds: u64,
    /// Length of the faulty phase (then the network heals), e.g. 90s, 10min, 1h.
    #[arg(long, default_value = "10min", value_parser = parse_duration)]
    duration: Duration,
    /// Successor list length r (0 = 2*log2(nodes), at least 3).
    #[arg(long, default_value_t = 0)]
    successors: usize,
    #[arg(long, value_enum, default_value_t = ProtocolArg::Zave)]
    protocol: ProtocolArg,
    /// How the ring starts: ideal (all at once) or join (r+1 base, rest join).
    #[arg(long, value_enum, default_value_t = StartArg::Join)]
    start: StartArg,
    /// Joins per second; departures follow from session lengths (mean N/RATE).
    #[arg(long = "churn", default_value_t = 0.05, value_name = "RATE_PER_S")]
    churn_per_s: f64,
    #[arg(long, value_enum, default_value_t = SessionArg::Exp)]
    session: SessionArg,
    /// Fraction of departures that leave gracefully (others crash).
    #[arg(long, default_value_t = 0.5)]
    graceful: f64,
    /// Fail this fraction of live nodes at one instant (--fail-at).
    #[arg(long, default_value_t = 0.0, value_name = "P")]
    fail_fraction: f64,
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    fail_at: Duration,
    /// After the mass failure, freeze maintenance and run this many lookups.
    #[arg(long, default_value_t = 0)]
    lookups_after_fail: u64,
    /// Message loss probability.
    #[arg(long, default_value_t = 0.01, value_name = "P")]
    loss: f64,
    #[arg(long, default_value_t = 0.0, value_name = "P")]
    duplicate: f64,
    /// Fraction of messages delayed by up to 500 ms extra (reordering).
    #[arg(long, default_value_t = 0.05, value_name = "P")]
    reorder: f64,
    /// Median one-way latency in ms (log-normal).
    #[arg(long, default_value_t = 40.0)]
    latency_ms: f64,
    /// A partition: sym:FRACTION@START+LENGTH, oneway:FRACTION@START+LENGTH or
    /// isolate:NODE@START+LENGTH (repeatable), e.g. sym:0.5@60s+2s.
    #[arg(long, value_parser = parse_partition)]
    partition: Vec<Fault>,
    /// Random crash-and-restart faults per second.
    #[arg(long, default_value_t = 0.01)]
    crash_rate: f64,
    #[arg(long, default_value_t = 0.01)]
    pause_rate: f64,
    #[arg(long, default_value_t = 0.005)]
    partition_rate: f64,
    #[arg(long, default_value_t = 0.01)]
    clog_rate: f64,
    /// Draw loss, duplication, reordering and fault rates from the seed.
    #[arg(long)]
    swarm: bool,
    #[arg(long, default_value_t = 1.0, value_name = "K")]
    lookups_per_node_per_min: f64,
    /// Route lookups with fingers and the first successor only (the Chord
    /// paper's setting); by default they also jump along successor lists.
    #[arg(long)]
    fingers_only: bool,
    /// Safety checks: every (after each ring change), sampled (every second),
    /// sampled:PERIOD, or off. auto = every up to 512 nodes, else sampled.
    #[arg(long, default_value = "auto")]
    check: String,
    /// Refuse crashes that break Zave's operating assumption (r+1 principals).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    fail_guard: bool,
    /// The ring must be ideal this long after healing, or the run fails.
    #[arg(long, default_value = "5min", value_parser = parse_duration)]
    converge_bound: Duration,
    /// Period of stabilize (check predecessor runs at twice this).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    stabilize: Duration,
    /// Period of finger repair: one far finger per tick. Fingers only speed
    /// lookups up; correctness rests on successor lists.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    fix_fingers: Duration,
    /// Events kept and printed when a run fails.
    #[arg(long, default_value_t = 24)]
    trace_tail: usize,
    /// Keep running after a violation (counts them all).
    #[arg(long)]
    keep_going: bool,
    /// Print the JSON report on stdout instead of the summary.
    #[arg(long)]
    json: bool,
    /// Write a picture of the ring and the convergence plot.
    #[arg(long, value_name = "FILE")]
    svg: Option<std::path::PathBuf>,
    /// Run replicated storage too: clients put blocks and write records
    /// (several users writing one manifest at once) while the faults run;
    /// after healing every acknowledged write must survive, every key must
    /// be back on its R replicas and record replicas must agree.
    #[arg(long)]
    storage: bool,
    /// R: copies of every stored item.
    #[arg(long, default_value_t = 3, value_name = "R")]
    replicas: usize,
    /// W: durable copies before a write is acknowledged.
    #[arg(long, default_value_t = 2, value_name = "W")]
    write_quorum: usize,
    /// Block puts per simulated second, across the ring.
    #[arg(long, default_value_t = 2.0)]
    puts_per_s: f64,
    /// Record writes (manifest versions, log entries) per simulated second.
    #[arg(long, default_value_t = 0.5)]
    record_writes_per_s: f64,
    /// Blocks placed on their replicas before the run starts.
    #[arg(long, default_value_t = 0)]
    preload_blocks: u64,
    /// Probability a block in flight is corrupted (replicas must refuse it).
    #[arg(long, default_value_t = 0.0, value_name = "P")]
    corrupt: f64,
    /// Kill this many ring neighbours for good at --fail-at (nodes holding
    /// replicas of the same keys).
    #[arg(long, default_value_t = 0, value_name = "N")]
    kill_adjacent: u32,
    /// Anti-entropy period.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    sync: Duration,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 500ms, 90s, 10min, 1h)"))
}

fn parse_partition(s: &str) -> Result<Fault, String> {
    let err = || {
        format!("bad partition {s:?}: use sym:0.5@60s+2s, oneway:0.3@10s+1s or isolate:3@5s+30s")
    };
    let (kind, rest) = s.split_once(':').ok_or_else(err)?;
    let (arg, when) = rest.split_once('@').ok_or_else(err)?;
    let (start, len) = when.split_once('+').ok_or_else(err)?;
    let at_ms = parse_duration(start)?.as_millis() as u64;
    let for_ms = parse_duration(len)?.as_millis() as u64;
    let cut = match kind {
        "sym" => Cut::Symmetric {
            fraction: arg.parse().map_err(|_| err())?,
        },
        "oneway" => Cut::OneWay {
            fraction: arg.parse().map_err(|_| err())?,
        },
        "isolate" => Cut::Isolate {
            node: arg.parse().map_err(|_| err())?,
        },
        _ => return Err(err()),
    };
    Ok(Fault {
        at_ms,
        kind: FaultKind::Partition { cut, for_ms },
    })
}

fn config(a: &Args, seed: u64) -> Result<SimConfig> {
    if a.nodes < 2 {
        bail!("--nodes must be at least 2");
    }
    for (name, p) in [
        ("--loss", a.loss),
        ("--duplicate", a.duplicate),
        ("--reorder", a.reorder),
        ("--fail-fraction", a.fail_fraction),
        ("--graceful", a.graceful),
        ("--corrupt", a.corrupt),
    ] {
        if !(0.0..=1.0).contains(&p) {
            bail!("{name} is a probability: give a number from 0 to 1, not {p}");
        }
    }
    if a.churn_per_s < 0.0 || a.lookups_per_node_per_min < 0.0 {
        bail!("--churn and --lookups-per-node-per-min cannot be negative");
    }
    let mut c = SimConfig {
        seed,
        nodes: a.nodes,
        vnodes: a.vnodes,
        secure: a.secure,
        attackers: a.attackers,
        duration_ms: a.duration.as_millis() as u64,
        successors: a.successors,
        protocol: match a.protocol {
            ProtocolArg::Zave => Protocol::Zave,
            ProtocolArg::Chord2001 => Protocol::Chord2001,
        },
        start: match a.start {
            StartArg::Ideal => Start::Ideal,
            StartArg::Join => Start::Join,
        },
        churn_per_s: a.churn_per_s,
        session: match a.session {
            SessionArg::Exp => Session::Exp,
            SessionArg::Weibull => Session::Weibull,
        },
        graceful_fraction: a.graceful,
        fail_fraction: a.fail_fraction,
        fail_at_ms: a.fail_at.as_millis() as u64,
        kill_adjacent: a.kill_adjacent,
        lookups_after_fail: a.lookups_after_fail,
        swarm: a.swarm,
        lookups_per_node_per_min: a.lookups_per_node_per_min,
        fail_guard: a.fail_guard,
        converge_bound_ms: a.converge_bound.as_millis() as u64,
        stabilize_ms: a.stabilize.as_millis().max(1) as u64,
        stop_on_violation: !a.keep_going,
        plan: a.partition.clone(),
        trace_tail: a.trace_tail,
        route_via_successor_lists: !a.fingers_only,
        ..SimConfig::default()
    };
    if a.attackers > 0 && !a.secure {
        bail!("--attackers needs --secure (without it there is no trust to refuse them)");
    }
    if a.secure && (a.nodes + a.attackers) as u64 > peerstore_sim::secure::POOL / 2 {
        bail!(
            "--secure runs at most {} machines (--nodes plus --attackers), leaving room for churn",
            peerstore_sim::secure::POOL / 2
        );
    }
    if !(1..=64).contains(&a.vnodes) {
        bail!("--vnodes must be between 1 and 64 (got {})", a.vnodes);
    }
    if c.r() >= c.positions() {
        bail!(
            "--successors (r = {}) must be below the ring positions (--nodes x --vnodes = {}): a ring needs at least r+1 members",
            c.r(),
            c.positions()
        );
    }
    c.check_pred_ms = c.stabilize_ms * 2;
    c.fix_fingers_ms = a.fix_fingers.as_millis().max(1) as u64;
    c.suspect_ms = c.stabilize_ms * 3;
    c.net.loss = a.loss;
    c.net.duplicate = a.duplicate;
    c.net.reorder = a.reorder;
    c.net.latency_median_ms = a.latency_ms;
    c.rates.crash_per_s = a.crash_rate;
    c.rates.pause_per_s = a.pause_rate;
    c.rates.partition_per_s = a.partition_rate;
    c.rates.clog_per_s = a.clog_rate;
    c.check = match a.check.as_str() {
        "auto" if a.nodes <= 512 => CheckMode::EveryChange,
        "auto" | "sampled" => CheckMode::EveryMs(1_000),
        s if s.starts_with("sampled:") => CheckMode::EveryMs(
            parse_duration(&s["sampled:".len()..])
                .map_err(anyhow::Error::msg)?
                .as_millis()
                .max(1) as u64,
        ),
        "every" => CheckMode::EveryChange,
        "off" => CheckMode::Off,
        other => bail!("--check takes auto, every, sampled, sampled:PERIOD (e.g. sampled:10s) or off, not {other:?}"),
    };
    if a.storage {
        if a.replicas == 0 || a.write_quorum == 0 || a.write_quorum > a.replicas {
            bail!(
                "need 1 <= --write-quorum <= --replicas (got W = {}, R = {})",
                a.write_quorum,
                a.replicas
            );
        }
        if a.replicas > c.r() + 1 {
            bail!(
                "--replicas ({}) cannot exceed the successor list length + 1 ({})",
                a.replicas,
                c.r() + 1
            );
        }
        if a.replicas > a.nodes {
            bail!(
                "--replicas ({}) cannot exceed --nodes ({}): copies go to distinct machines",
                a.replicas,
                a.nodes
            );
        }
        if a.puts_per_s < 0.0 || a.record_writes_per_s < 0.0 {
            bail!("--puts-per-s and --record-writes-per-s cannot be negative");
        }
        c.storage.enabled = true;
        c.storage.replicas = a.replicas;
        c.storage.write_quorum = a.write_quorum;
        c.storage.puts_per_s = a.puts_per_s;
        c.storage.gets_per_s = a.puts_per_s / 2.0;
        c.storage.record_writes_per_s = a.record_writes_per_s;
        c.storage.preload_blocks = a.preload_blocks;
        c.storage.corrupt = a.corrupt;
        c.storage.sync_ms = a.sync.as_millis().max(1) as u64;
    }
    // The convergence plot and liveness check sample the whole ring; large
    // rings are sampled less often so sampling does not dominate the run.
    c.sample_ms = match a.nodes {
        n if n > 20_000 => 10_000,
        n if n > 5_000 => 5_000,
        _ => 1_000,
    };
    Ok(c)
}

fn main() -> ExitCode {
    match real_main() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("peerstore-sim: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn real_main() -> Result<bool> {
    let a = Args::parse();
    let mut all_ok = true;
    let mut failed_seeds = Vec::new();
    for seed in a.seed..a.seed.saturating_add(a.seeds) {
        let cfg = config(&a, seed)?;
        let (rep, ring) = peerstore_sim::run_with_ring(cfg);
        if let Some(path) = &a.svg {
            std::fs::write(path, peerstore_sim::svg::render(&rep, &ring))
                .with_context(|| format!("writing {}", path.display()))?;
        }
        if a.json {
            println!("{}", serde_json::to_string_pretty(&rep)?);
        } else if a.seeds > 1 {
            println!(
                "seed {seed}: {} | violations {} | converge {} | lookups {} failed {} wrong {}",
                if rep.passed() { "ok" } else { "FAIL" },
                rep.invariant_violations.count,
                rep.converge_ms
                    .map(|m| format!("{m} ms"))
                    .unwrap_or_else(|| "-".into()),
                rep.lookups.count,
                rep.lookups.failed,
                rep.lookups.wrong
            );
            if !rep.passed() {
                eprint!("{}", rep.summary());
            }
        } else {
            print!("{}", rep.summary());
        }
        if !rep.passed() {
            all_ok = false;
            failed_seeds.push(seed);
        }
    }
    if a.seeds > 1 && !a.json {
        println!(
            "{} of {} seeds passed{}",
            a.seeds as usize - failed_seeds.len(),
            a.seeds,
            if failed_seeds.is_empty() {
                String::new()
            } else {
                format!("; failing seeds: {failed_seeds:?}")
            }
        );
    }
    Ok(all_ok)
}
