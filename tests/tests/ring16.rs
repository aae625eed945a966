//! Sixteen real nodes, fifteen of them joining at once, reach the ideal
//! ring. In a file of its own so that cargo runs it alone.

use std::time::Duration;

use peerstore_tests::{report, successor_list_len, Cluster};

/// The 20 s bound counts from the moment all sixteen nodes serve (answer
/// over the wire), not from their spawn: each node makes an RSA session
/// key between printing "listening on" and serving, and fifteen of those
/// at once on a shared two-core machine take from 3 s (idle) to over 12 s
/// (load 9): that is the host's CPU, not the ring. Both times are reported.
#[test]
fn sixteen_simultaneous_joins_reach_the_ideal_ring() {
    let n = 16;
    assert!(
        successor_list_len() < n - 1,
        "the test means to check full-length successor lists"
    );
    let mut c = Cluster::new("sim16", n);
    let all: Vec<usize> = (0..n).collect();
    let last_start = c.start_all_at_once();
    let serving = c.wait_serving(&all, Duration::from_secs(60));
    let startup = serving - last_start;
    let took = c.wait_ideal(&all, serving, Duration::from_secs(20));
    report(format!(
        "16 nodes, simultaneous joins: all serving {:.2} s after the last start, \
         ideal {:.2} s after that ({:.2} s after the last start; r = {})",
        startup.as_secs_f64(),
        took.as_secs_f64(),
        (startup + took).as_secs_f64(),
        successor_list_len()
    ));
    // A join asks its entry again after 5 s without an answer; with the
    // entry up all along that should not happen (see node/src/daemon.rs).
    report(format!(
        "join retries: {}",
        c.count_in_logs("no answer yet; asking again")
    ));
    c.assert_stays_ideal(&all, Duration::from_secs(2), "after convergence");
    c.assert_no_panics();
}
