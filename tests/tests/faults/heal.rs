//! A crashed node: the survivors heal the ring, and the node comes back
//! from its data directory alone.

use std::time::{Duration, Instant};

use peerstore_tests::{log, report, Cluster};

/// Five nodes; one is killed with SIGKILL (no leave, no hand-off). The four
/// survivors reach the ideal ring over themselves; restarted with the same
/// data directory and no `--join` (it rejoins through the peers it saved),
/// the node is back in an ideal five-node ring.
#[test]
fn a_killed_node_is_healed_around_and_rejoins_from_its_data_dir() {
    let mut c = Cluster::new("heal5", 5);
    let all: Vec<usize> = (0..5).collect();
    let took = c.form_ring();
    log(format!(
        "5 nodes formed: ideal {:.2} s after all served",
        took.as_secs_f64()
    ));

    // The victim is a joiner (not the root), fixed so runs compare.
    let victim = 2;
    let survivors: Vec<usize> = all.iter().copied().filter(|&i| i != victim).collect();
    // Its restart depends on the peers file it saves once a second.
    let peers = c.node(victim).dir.join("peers");
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::fs::read_to_string(&peers).map_or(true, |t| t.trim().is_empty()) {
        if Instant::now() >= deadline {
            c.fail(&format!(
                "n{victim} saved no peers file at {}",
                peers.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    log(format!(
        "n{victim} peers file: {:?}",
        std::fs::read_to_string(&peers).unwrap_or_default()
    ));

    let killed_at = Instant::now();
    c.kill(victim);
    // The bound: the failure detector declares a successor dead only after
    // two timeouts spanning suspect_ms (3 s) and a witness's confirmation
    // (the dead node's successor must first give up on it as predecessor,
    // by the same rule on its 2 s check); then the corrected lists spread
    // one stabilize round (1 s) per hop. About 15 s on 127.0.0.1.
    let healed = c.wait_ideal(&survivors, killed_at, Duration::from_secs(30));
    report(format!(
        "kill -9 of n{victim}: the 4 survivors are ideal {:.2} s after the kill",
        healed.as_secs_f64()
    ));

    let restarted_at = Instant::now();
    c.restart(victim);
    let back = c.wait_ideal(&all, restarted_at, Duration::from_secs(20));
    report(format!(
        "n{victim} restarted from its data dir: 5-node ring ideal {:.2} s after the restart",
        back.as_secs_f64()
    ));
    c.assert_stays_ideal(&all, Duration::from_secs(2), "after the rejoin");
    c.assert_no_panics();
}
