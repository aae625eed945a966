//! The `peerstore-sim` command as a person or a script uses it.

use std::process::Command;

fn sim() -> Command {
    Command::new(env!("CARGO_BIN_EXE_peerstore-sim"))
}

/// Runs a simulation with `--json` and returns its report.
fn run_json(args: &[&str]) -> serde_json::Value {
    let out = sim().args(args).arg("--json").output().expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("valid JSON")
}

#[test]
fn json_report_has_the_promised_fields() {
    let v = run_json(&["--nodes", "16", "--duration", "30s", "--seed", "5"]);
    for key in [
        "seed",
        "nodes",
        "successors",
        "protocol",
        "events",
        "sim_ms",
        "wall_ms",
        "events_per_s",
        "invariant_violations",
        "converged",
        "converge_ms",
        "lookups",
        "messages_per_node_per_s",
        "trace_hash",
        "peak_rss_bytes",
    ] {
        assert!(v.get(key).is_some(), "missing {key}");
    }
    for key in [
        "count",
        "failed",
        "wrong",
        "mean_hops",
        "p50_hops",
        "p99_hops",
        "mean_timeouts",
    ] {
        assert!(v["lookups"].get(key).is_some(), "missing lookups.{key}");
    }
    assert_eq!(v["seed"], 5);
    assert_eq!(v["invariant_violations"]["count"], 0);
    assert_eq!(v["converged"], true);
}

#[test]
fn svg_shows_the_ring_and_the_plot() {
    let dir = std::env::temp_dir().join(format!("peerstore-sim-svg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("ring.svg");
    let out = sim()
        .args([
            "--nodes",
            "20",
            "--start",
            "ideal",
            "--churn",
            "0",
            "--crash-rate",
            "0",
            "--duration",
            "20s",
            "--svg",
        ])
        .arg(&path)
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let svg = std::fs::read_to_string(&path).expect("svg written");
    assert!(svg.starts_with("<svg"));
    assert!(svg.contains("Convergence over simulated time"));
    // One dot per live member plus any crosses for dead ones.
    assert_eq!(svg.matches("r=\"2.5\"").count(), 20, "one dot per member");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bad_input_is_a_clear_error_not_a_panic() {
    for args in [
        vec!["--loss", "2"],
        vec!["--nodes", "1"],
        vec!["--duration", "soon"],
        vec!["--partition", "sideways:0.5@1s+1s"],
        vec!["--successors", "50", "--nodes", "10"],
    ] {
        let out = sim().args(&args).output().expect("runs");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} should fail");
        assert_ne!(out.status.code(), Some(101), "{args:?} panicked: {err}");
        assert!(!err.trim().is_empty(), "{args:?}: no message");
    }
}

#[test]
fn a_broken_run_exits_non_zero_and_prints_its_seed() {
    let out = sim()
        .args([
            "--protocol",
            "chord2001",
            "--successors",
            "2",
            "--nodes",
            "24",
            "--swarm",
            "--duration",
            "2min",
            "--seed",
            "500",
        ])
        .output()
        .expect("runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("seed 500"), "{text}");
    assert!(text.contains("replay with"), "{text}");
    assert!(text.contains("last events"), "{text}");
}

#[test]
fn storage_report_has_the_promised_figures_and_bad_storage_flags_are_refused() {
    let v = run_json(&[
        "--nodes",
        "16",
        "--duration",
        "30s",
        "--seed",
        "6",
        "--storage",
    ]);
    for key in [
        "puts_acked",
        "lost_acked",
        "under_replicated",
        "divergent",
        "bad_blocks",
        "bytes_per_node_max_over_mean",
        "bytes_per_node_p99_over_mean",
        "repair_bytes",
        "oracle_repair_bytes",
        "ack_latency_mean_ms",
        "ack_latency_p99_ms",
    ] {
        assert!(v["storage"].get(key).is_some(), "missing storage.{key}");
    }
    assert!(v["storage"]["puts_acked"].as_u64().unwrap_or(0) > 0);
    for bad in [
        vec!["--storage", "--replicas", "3", "--write-quorum", "4"],
        vec!["--storage", "--replicas", "0"],
        vec!["--storage", "--corrupt", "2"],
        vec!["--attackers", "1"],
        vec!["--secure", "--nodes", "400"],
        vec!["--vnodes", "0"],
        vec![
            "--storage",
            "--nodes",
            "2",
            "--successors",
            "1",
            "--replicas",
            "3",
        ],
    ] {
        let out = sim().args(&bad).output().expect("runs");
        assert!(!out.status.success(), "{bad:?} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "{bad:?}: {err}");
        assert!(!err.is_empty(), "{bad:?}: no message");
    }
}

#[test]
fn a_secure_run_reports_its_links_and_attackers() {
    let v = run_json(&[
        "--nodes",
        "12",
        "--duration",
        "20s",
        "--seed",
        "3",
        "--secure",
        "--attackers",
        "1",
    ]);
    let sec = &v["security"];
    assert!(
        sec["links"]["handshakes_done"].as_u64().unwrap_or(0) > 0,
        "{sec}"
    );
    assert!(
        sec["links"]["frames_received"].as_u64().unwrap_or(0) > 0,
        "{sec}"
    );
    assert_eq!(sec["attackers"], 1);
    assert_eq!(sec["attacker_members"], 0);
    assert_eq!(sec["attacker_messages_delivered"], 0);
}
