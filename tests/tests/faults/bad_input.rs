//! Bad input keeps a node serving: garbage on the wire and garbage on its
//! disk. After each kind, the node still answers `peerstore ring` and the
//! ring is still ideal.

use std::io::Write;
use std::time::{Duration, Instant};

use peerstore_tests::{
    client_preamble, frame, garbage, log, node_preamble, raw_connect, report, unused_port,
    wait_closed, Cluster,
};

/// How long the node may take to drop a connection it refuses. Its
/// preamble timeout is 5 s; a refused frame length closes at once.
const CLOSE_LIMIT: Duration = Duration::from_secs(10);

/// Checks the target answers both the library and the CLI and the ring is
/// ideal.
fn still_serving(c: &mut Cluster, target: usize, all: &[usize], after: &str) {
    c.assert_ideal(all, after);
    c.assert_cli_ring_ideal(target, all);
    log(format!("{after}: n{target} answers and the ring is ideal"));
}

#[test]
fn garbage_on_the_wire_and_on_disk_leaves_the_node_serving() {
    let mut c = Cluster::new("bad4", 4);
    let all: Vec<usize> = (0..4).collect();
    c.form_ring();
    let target = 1;
    let addr = c.node(target).addr();

    // A connection that never says anything: cut at the preamble timeout,
    // while everything else goes on.
    let mut silent = raw_connect(addr);
    let silent_since = Instant::now();

    // Garbage from the first byte (seeded, the same every run).
    {
        let mut s = raw_connect(addr);
        s.write_all(&garbage(0x5eed_0001, 512)).expect("write");
        let closed = wait_closed(&mut s, CLOSE_LIMIT);
        assert!(closed.is_some(), "the node kept a garbage connection open");
        log(format!("garbage connection closed after {closed:?}"));
    }
    still_serving(&mut c, target, &all, "after garbage bytes");

    // An oversized length prefix: as the preamble, and after a valid one;
    // and a frame one byte over the limit.
    for (what, bytes) in [
        ("0xFFFFFFFF as the preamble length", vec![0xFF; 4]),
        (
            "0xFFFFFFFF after a client preamble",
            [client_preamble(), vec![0xFF; 4]].concat(),
        ),
        (
            "a frame one byte over 2 MiB + 64 KiB after a client preamble",
            [
                client_preamble(),
                ((2 * 1024 * 1024 + 64 * 1024 + 1) as u32)
                    .to_be_bytes()
                    .to_vec(),
            ]
            .concat(),
        ),
    ] {
        let mut s = raw_connect(addr);
        s.write_all(&bytes).expect("write");
        let closed = wait_closed(&mut s, CLOSE_LIMIT);
        assert!(closed.is_some(), "{what}: the connection stayed open");
        log(format!("{what}: closed after {closed:?}"));
        still_serving(&mut c, target, &all, &format!("after {what}"));
    }

    // A valid preamble, then garbage packets, as a client and as a node
    // declaring an address nobody listens on. The connections stay open
    // (a bad packet is dropped, not fatal) while the node keeps serving.
    let mut kept = Vec::new();
    for (what, preamble) in [
        ("client", client_preamble()),
        ("node", node_preamble(unused_port())),
    ] {
        let mut s = raw_connect(addr);
        s.write_all(&preamble).expect("write");
        for (k, len) in [0usize, 1, 7, 100, 4096, 70_000].into_iter().enumerate() {
            s.write_all(&frame(&garbage(0x5eed_0100 + k as u64, len)))
                .expect("write");
        }
        s.flush().expect("flush");
        still_serving(
            &mut c,
            target,
            &all,
            &format!("after a {what} preamble and garbage packets"),
        );
        kept.push(s);
    }
    // A frame announced at 1 MiB that never arrives: the reader waits for
    // it (bounded by the frame timeout) without holding anyone else up.
    {
        let mut s = raw_connect(addr);
        s.write_all(&client_preamble()).expect("write");
        s.write_all(&(1u32 << 20).to_be_bytes()).expect("write");
        s.write_all(&garbage(0x5eed_0200, 10)).expect("write");
        still_serving(&mut c, target, &all, "with a stalled 1 MiB frame");
        kept.push(s);
    }
    drop(kept);

    let cut = wait_closed(
        &mut silent,
        (silent_since + CLOSE_LIMIT).saturating_duration_since(Instant::now()),
    );
    assert!(
        cut.is_some(),
        "a connection that sent nothing was still open {:?} after it opened",
        silent_since.elapsed()
    );
    log(format!(
        "the silent connection was cut {:.2} s after it opened",
        silent_since.elapsed().as_secs_f64()
    ));

    // Garbage in the store: stop the node, plant damaged files, restart.
    let stopped = Instant::now();
    c.terminate(target, Duration::from_secs(40));
    let others: Vec<usize> = all.iter().copied().filter(|&i| i != target).collect();
    let healed = c.wait_ideal(&others, stopped, Duration::from_secs(20));
    report(format!(
        "graceful leave of n{target}: the others are ideal {:.2} s after SIGTERM",
        healed.as_secs_f64()
    ));
    let items = c.node(target).store_items_dir();
    let hex = |b: u8| format!("{b:02x}").repeat(20);
    let mut truncated = b"PSI1".to_vec();
    truncated.extend_from_slice(&1u32.to_le_bytes());
    truncated.extend_from_slice(&1000u64.to_le_bytes());
    truncated.extend_from_slice(&[0u8; 10]);
    let planted = [
        (items.join("ab").join(hex(0xab)), garbage(0x5eed_0300, 300)),
        (items.join("cd").join(hex(0xcd)), truncated),
        (items.join("ef").join(hex(0xef)), Vec::new()),
        (items.join("12").join("not-an-item"), b"hello".to_vec()),
    ];
    for (path, bytes) in &planted {
        std::fs::create_dir_all(path.parent().expect("shard")).expect("shard dir");
        std::fs::write(path, bytes).expect("plant");
        log(format!(
            "planted {} ({} bytes)",
            path.display(),
            bytes.len()
        ));
    }
    // And the database of small items cut in half, as a torn copy or a
    // full disk might leave it.
    let db = items.parent().expect("store dir").join("packed.redb");
    let db_len = std::fs::metadata(&db)
        .expect("the node's packed.redb")
        .len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&db)
        .and_then(|f| f.set_len(db_len / 2))
        .expect("truncate packed.redb");
    log(format!(
        "truncated {} from {db_len} to {} bytes",
        db.display(),
        db_len / 2
    ));
    let restarted = Instant::now();
    c.restart(target);
    let back = c.wait_ideal(&all, restarted, Duration::from_secs(20));
    report(format!(
        "n{target} restarted over {} damaged store files and a truncated database: ring ideal {:.2} s after the restart",
        planted.len(),
        back.as_secs_f64()
    ));
    for (path, _) in &planted {
        assert!(
            !path.exists(),
            "{} is still in the store after the restart",
            path.display()
        );
    }
    let quarantined: Vec<String> = std::fs::read_dir(c.node(target).store_quarantine_dir())
        .expect("the quarantine directory")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    log(format!("quarantine holds {quarantined:?}"));
    assert_eq!(
        quarantined.len(),
        planted.len() + 1,
        "every damaged file and the database are quarantined: {quarantined:?}"
    );
    assert!(
        quarantined.iter().any(|n| n.starts_with("packed.redb.")),
        "the truncated database is set aside: {quarantined:?}"
    );
    still_serving(
        &mut c,
        target,
        &all,
        "after the restart over a damaged store",
    );
    c.assert_no_panics();
}
