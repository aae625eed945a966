//! Files end to end on a five-node ring of real processes: backup, restore
//! (byte-identical), ls, rm, and sharing between two users, each step
//! entering the ring by a different node; and a node killed with SIGKILL
//! during and after a backup, after which everything whose backup reported
//! success still restores, the ring heals and every item is back on three
//! machines.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use peerstore_core::Id;
use peerstore_tests::{log, run_bounded, Cluster, Proc, Ran, COMMAND_TIMEOUT, POLL_EVERY};

/// Deterministic file contents (xorshift64 from `seed`).
fn bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A tree of files of awkward sizes: empty, one byte, a page, exactly one
/// chunk of plaintext, one MiB, and two and a half MiB.
fn make_tree(root: &Path, seed: u64) -> BTreeMap<PathBuf, Vec<u8>> {
    const CHUNK: usize = (1 << 20) - 64;
    let files: [(&str, usize); 7] = [
        ("empty", 0),
        ("one", 1),
        ("page.txt", 4096),
        ("sub/chunk.bin", CHUNK),
        ("sub/mib.bin", 1 << 20),
        // Ten chunks, the last partial: `revoke` re-encrypts it in groups.
        ("sub/deeper/big.bin", (19 << 20) / 2),
        ("sub/deeper/note.md", 300),
    ];
    let mut made = BTreeMap::new();
    for (i, (name, len)) in files.iter().enumerate() {
        let p = root.join(name);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        let data = bytes(*len, seed + i as u64);
        std::fs::write(&p, &data).expect("write");
        made.insert(PathBuf::from(name), data);
    }
    made
}

/// Every file under `root`, relative, with its contents.
fn read_tree(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let p = e.expect("entry").path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(root).expect("under root").to_path_buf();
                out.insert(rel, std::fs::read(&p).expect("read"));
            }
        }
    }
    out
}

fn assert_same(want: &BTreeMap<PathBuf, Vec<u8>>, got_root: &Path, what: &str) {
    let got = read_tree(got_root);
    let names = |m: &BTreeMap<PathBuf, Vec<u8>>| m.keys().cloned().collect::<Vec<_>>();
    assert_eq!(names(&got), names(want), "{what}: the same files");
    for (p, data) in want {
        assert!(got[p] == *data, "{what}: {} differs", p.display());
    }
}

/// `peerstore ARGS` as `key`'s user, entering by node `i`.
fn cli(c: &Cluster, key: &Path, i: usize, args: &[&str]) -> Ran {
    cli_in(c, key, i, c.dir(), args)
}

/// The command `peerstore ARGS` as `key`'s user, entering by node `i`, run
/// from the directory `cwd`.
fn cli_cmd(c: &Cluster, key: &Path, i: usize, cwd: &Path, args: &[&str]) -> Command {
    let mut cmd = c.cli_bare();
    cmd.current_dir(cwd);
    cmd.arg("--key")
        .arg(key)
        .arg("--node")
        .arg(c.node(i).addr().to_string())
        .arg("--trust")
        .arg(c.root_key())
        .args(args);
    cmd
}

/// [`cli`] run from the directory `cwd`.
fn cli_in(c: &Cluster, key: &Path, i: usize, cwd: &Path, args: &[&str]) -> Ran {
    let mut cmd = cli_cmd(c, key, i, cwd, args);
    run_bounded(
        &format!("peerstore {} (n{i})", args.join(" ")),
        &mut cmd,
        COMMAND_TIMEOUT * 3,
    )
}

fn ok(r: Ran, what: &str) -> Ran {
    assert!(r.status.success(), "{what} failed: {}", r.describe());
    r
}

/// A second user's key file, made by `peerstore init`.
fn second_user(c: &Cluster) -> PathBuf {
    let key = c.home().join("bob.pem");
    let mut cmd = c.cli_bare();
    cmd.arg("init")
        .arg("--no-passphrase")
        .arg("--key")
        .arg(&key);
    ok(
        run_bounded("peerstore init (bob)", &mut cmd, COMMAND_TIMEOUT),
        "init",
    );
    key
}

fn user_id(c: &Cluster, key: &Path) -> String {
    let mut cmd = c.cli_bare();
    cmd.arg("whoami").arg("--key").arg(key);
    let r = ok(
        run_bounded("peerstore whoami", &mut cmd, COMMAND_TIMEOUT),
        "whoami",
    );
    r.stdout
        .lines()
        .find_map(|l| l.strip_prefix("user id"))
        .expect("a user id line")
        .trim()
        .to_string()
}

fn path_str(p: &Path) -> String {
    p.display().to_string()
}

#[test]
fn backup_restore_ls_rm_and_sharing_work_whatever_node_the_client_enters_by() {
    let mut c = Cluster::new("files", 5);
    c.form_ring();
    let alice = c.user_key().to_path_buf();
    let data = c.dir().join("data");
    let tree = make_tree(&data, 1);
    let data = data.canonicalize().expect("canonical");
    let ds = path_str(&data);

    // Backup through node 1; list through node 2.
    let r = ok(cli(&c, &alice, 1, &["backup", &ds]), "backup");
    assert!(r.stdout.contains("stored 7 files"), "{}", r.describe());
    let r = ok(cli(&c, &alice, 2, &["ls"]), "ls");
    for name in tree.keys() {
        let full = path_str(&data.join(name));
        assert!(r.stdout.contains(&full), "ls lists {full}:\n{}", r.stdout);
    }
    // Restore the whole tree through node 3: byte for byte.
    let out = c.dir().join("restored");
    ok(
        cli(&c, &alice, 3, &["restore", &ds, "--to", &path_str(&out)]),
        "restore",
    );
    assert_same(&tree, &out.join("data"), "restore through n3");
    // Paths relative to the current directory name the same files.
    let parent = data.parent().expect("parent").to_path_buf();
    let r = ok(
        cli_in(&c, &alice, 0, &parent, &["ls", "data/sub/../sub/deeper"]),
        "ls relative",
    );
    assert_eq!(r.stdout.lines().count(), 2, "{}", r.describe());
    let rel_out = c.dir().join("restored-relative");
    ok(
        cli_in(
            &c,
            &alice,
            2,
            &data,
            &["restore", "./sub", "--to", &path_str(&rel_out)],
        ),
        "restore relative",
    );
    let sub: BTreeMap<PathBuf, Vec<u8>> = tree
        .iter()
        .filter_map(|(p, d)| Some((p.strip_prefix("sub").ok()?.to_path_buf(), d.clone())))
        .collect();
    assert_same(&sub, &rel_out.join("sub"), "restore of a relative path");
    // Nothing changed: a second backup stores nothing.
    let r = ok(cli(&c, &alice, 4, &["backup", &ds]), "backup again");
    assert!(
        r.stdout.contains("stored 0 files") && r.stdout.contains("7 unchanged"),
        "{}",
        r.describe()
    );

    // rm through node 4: gone from ls, restore says so.
    let gone = path_str(&data.join("page.txt"));
    ok(cli(&c, &alice, 4, &["rm", &gone]), "rm");
    let r = ok(cli(&c, &alice, 0, &["ls"]), "ls after rm");
    assert!(!r.stdout.contains(&gone), "{}", r.stdout);
    let r = cli(
        &c,
        &alice,
        0,
        &["restore", &gone, "--to", &path_str(&c.dir().join("x"))],
    );
    assert!(
        !r.status.success() && r.stderr.contains("nothing backed up"),
        "{}",
        r.describe()
    );

    // Sharing: Bob cannot read Alice's file before she shares it, can
    // after, and cannot after she revokes; Alice always can.
    let bob = second_user(&c);
    ok(cli(&c, &bob, 0, &["register"]), "bob registers");
    let bob_id = user_id(&c, &bob);
    let file = path_str(&data.join("sub/mib.bin"));
    let want = tree[Path::new("sub/mib.bin")].clone();
    let r = ok(cli(&c, &alice, 2, &["ls", &file, "--links"]), "ls --links");
    let link = r
        .stdout
        .split_whitespace()
        .nth(3)
        .expect("a link column")
        .to_string();
    // Bob, entering by `node`, is refused `link` (restored to a scratch dir).
    let assert_denied = |node: usize, link: &str, when: &str| {
        let out = path_str(&c.dir().join("denied"));
        let r = cli(&c, &bob, node, &["restore", link, "--to", &out]);
        assert!(
            !r.status.success() && r.stderr.contains("not listed"),
            "bob reads {when}: {}",
            r.describe()
        );
    };
    assert_denied(3, &link, "before the share");
    let r = ok(
        cli(&c, &alice, 2, &["share", &file, "--with", &bob_id]),
        "share",
    );
    assert!(
        r.stdout.contains(&link),
        "share prints the link: {}",
        r.describe()
    );
    let bdir = c.dir().join("bob-out");
    ok(
        cli(&c, &bob, 4, &["restore", &link, "--to", &path_str(&bdir)]),
        "bob restores",
    );
    assert!(std::fs::read(bdir.join("mib.bin")).expect("restored") == want);
    ok(
        cli(&c, &alice, 0, &["revoke", &file, "--from", &bob_id]),
        "revoke",
    );
    assert_denied(1, &link, "after the revoke");
    let adir = c.dir().join("alice-after");
    ok(
        cli(&c, &alice, 4, &["restore", &file, "--to", &path_str(&adir)]),
        "alice restores after revoke",
    );
    assert!(std::fs::read(adir.join("mib.bin")).expect("restored") == want);

    // A directory: shared and revoked as a whole (a large and a small file).
    let dir = path_str(&data.join("sub/deeper"));
    let r = ok(
        cli(&c, &alice, 1, &["share", &dir, "--with", &bob_id]),
        "share a directory",
    );
    let links: Vec<(String, String)> = r
        .stdout
        .lines()
        .filter_map(|l| l.split_once("  "))
        .map(|(link, p)| (link.to_string(), p.to_string()))
        .collect();
    assert_eq!(links.len(), 2, "a link per file: {}", r.describe());
    for (link, p) in &links {
        let out = c.dir().join("bob-dir");
        ok(
            cli(&c, &bob, 2, &["restore", link, "--to", &path_str(&out)]),
            "bob restores a file of the shared directory",
        );
        let name = Path::new(p).file_name().expect("a file name");
        let rel = Path::new("sub/deeper").join(name);
        assert!(std::fs::read(out.join(name)).expect("restored") == tree[&rel]);
    }
    let r = ok(
        cli(&c, &alice, 3, &["revoke", &dir, "--from", &bob_id]),
        "revoke a directory",
    );
    assert!(r.stdout.contains("revoked on 2 files"), "{}", r.describe());
    for (link, _) in &links {
        assert_denied(0, link, "after the directory revoke");
    }
    let adir = c.dir().join("alice-dir-after");
    ok(
        cli(&c, &alice, 4, &["restore", &dir, "--to", &path_str(&adir)]),
        "alice restores the directory after the revoke",
    );
    for name in ["big.bin", "note.md"] {
        let rel = Path::new("sub/deeper").join(name);
        assert!(std::fs::read(adir.join("deeper").join(name)).expect("restored") == tree[&rel]);
    }
    c.assert_no_panics();
}

/// How many of the given nodes hold each key, as each node lists the keys
/// in its store; an error names a node that could not be asked.
fn holders(c: &mut Cluster, live: &[usize]) -> Result<BTreeMap<Id, usize>, String> {
    let mut count = BTreeMap::new();
    for &i in live {
        let keys = c
            .keys(i)
            .map_err(|e| format!("n{i} did not list its keys: {e:#}"))?;
        for k in keys {
            *count.entry(k).or_insert(0) += 1;
        }
    }
    Ok(count)
}

#[test]
fn kill_9_during_and_after_a_backup_loses_nothing_that_reported_success() {
    let mut c = Cluster::new("kill", 5);
    c.form_ring();
    let alice = c.user_key().to_path_buf();
    let during = c.dir().join("during");
    let during_tree = make_tree(&during, 10);
    // More data, so the backup is still running when the node dies.
    for i in 0..6 {
        std::fs::write(
            during.join(format!("extra{i}.bin")),
            bytes(3 << 20, 100 + i),
        )
        .expect("write");
    }
    let during_tree_all = read_tree(&during);
    assert!(during_tree_all.len() > during_tree.len());
    let during = during.canonicalize().expect("canonical");

    // Start the backup through node 0 and kill node 2 once it holds data.
    let mut cmd: Command = c.cli_bare();
    cmd.arg("--key")
        .arg(&alice)
        .arg("--node")
        .arg(c.node(0).addr().to_string())
        .arg("--trust")
        .arg(c.root_key())
        .arg("backup")
        .arg(&during);
    let victim = 2;
    let backup = std::thread::spawn(move || {
        run_bounded("backup during kill", &mut cmd, COMMAND_TIMEOUT * 3)
    });
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    loop {
        // A node that does not answer this round counts as holding nothing
        // yet: the next round asks again.
        let n = c.keys(victim).map_or(0, |k| k.len());
        if n >= 3 || backup.is_finished() || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(POLL_EVERY);
    }
    c.kill(victim);
    let r = backup.join().expect("backup thread");
    log(format!("backup during the kill: {}", r.describe()));
    let first_ok = r.status.success();

    // A second backup after the kill, then kill another node too.
    let after = c.dir().join("after");
    let after_tree = make_tree(&after, 20);
    let after = after.canonicalize().expect("canonical");
    ok(
        cli(&c, &alice, 1, &["backup", &path_str(&after)]),
        "backup after the kill",
    );
    // It comes back at its old address, as a node with a configured
    // --listen does (a restart at a new port is tested in faults/heal.rs).
    let old = c.node(victim).addr().to_string();
    c.start(victim, &["--listen".to_string(), old]);
    let all: Vec<usize> = (0..5).collect();
    c.wait_ideal(&all, Instant::now(), Duration::from_secs(60));
    let second = 4;
    c.kill(second);
    let live: Vec<usize> = vec![0, 1, 2, 3];
    c.wait_ideal(&live, Instant::now(), Duration::from_secs(60));

    // Everything whose backup reported success restores.
    let out = c.dir().join("out");
    if first_ok {
        ok(
            cli(
                &c,
                &alice,
                3,
                &["restore", &path_str(&during), "--to", &path_str(&out)],
            ),
            "restore during",
        );
        assert_same(
            &during_tree_all,
            &out.join("during"),
            "the backup interrupted by kill -9",
        );
    } else {
        // It said it failed; whatever it listed (files whose every block
        // and manifest were acknowledged) must still restore, intact.
        let r = ok(cli(&c, &alice, 3, &["ls"]), "ls");
        log(format!("listed after a failed backup:\n{}", r.stdout));
        if r.stdout.contains(&path_str(&during)) {
            ok(
                cli(
                    &c,
                    &alice,
                    3,
                    &["restore", &path_str(&during), "--to", &path_str(&out)],
                ),
                "restore what the failed backup listed",
            );
            for (p, data) in read_tree(&out.join("during")) {
                assert!(during_tree_all[&p] == data, "{} differs", p.display());
            }
        }
    }
    ok(
        cli(
            &c,
            &alice,
            2,
            &["restore", &path_str(&after), "--to", &path_str(&out)],
        ),
        "restore after",
    );
    assert_same(
        &after_tree,
        &out.join("after"),
        "the backup before the second kill",
    );

    // Every item is back on three of the four live machines.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let problem = match holders(&mut c, &live) {
            Ok(h) => {
                let under: Vec<(&Id, &usize)> = h.iter().filter(|(_, n)| **n < 3).collect();
                if under.is_empty() {
                    log(format!(
                        "{} items, each on at least 3 live machines",
                        h.len()
                    ));
                    break;
                }
                format!(
                    "{} of {} items under 3 copies, e.g. {:?}",
                    under.len(),
                    h.len(),
                    under.first()
                )
            }
            Err(e) => e,
        };
        if Instant::now() > deadline {
            c.fail(&problem);
        }
        std::thread::sleep(POLL_EVERY * 4);
    }
    c.assert_no_panics();
}

/// A whole ring stops at once (kill -9 of every node: a power cut) and
/// every node starts again from its data directory alone, at its old
/// address. Nobody is in a ring any more, so no rejoin can succeed until
/// one node starts the ring again: the one with the lowest id (it finds
/// its remembered peers out of any ring), and the others join through it.
/// The ring is ideal again and the files restore.
#[test]
fn a_whole_ring_stopped_at_once_starts_again_with_its_data() {
    let mut c = Cluster::new("restart", 5);
    let all: Vec<usize> = (0..5).collect();
    c.form_ring();
    let alice = c.user_key().to_path_buf();
    let data = c.dir().join("data");
    let tree = make_tree(&data, 30);
    let data = data.canonicalize().expect("canonical");
    let ds = path_str(&data);
    ok(cli(&c, &alice, 1, &["backup", &ds]), "backup");

    // The restart works from what each node saved of its place in the
    // ring (once a second): wait until every node saved its predecessor.
    let deadline = Instant::now() + Duration::from_secs(10);
    for i in 0..5 {
        let peers = c.node(i).dir.join("peers");
        while !std::fs::read_to_string(&peers).is_ok_and(|t| t.contains("pred ")) {
            if Instant::now() >= deadline {
                c.fail(&format!("n{i} saved no predecessor in {}", peers.display()));
            }
            std::thread::sleep(POLL_EVERY);
        }
    }
    let addrs: Vec<String> = all.iter().map(|&i| c.node(i).addr().to_string()).collect();
    for &i in &all {
        c.kill(i);
    }

    // All at once, in index order (which is not ring order).
    let started = Instant::now();
    for &i in &all {
        c.spawn(i, &["--listen".to_string(), addrs[i].clone()]);
    }
    for &i in &all {
        let a = c.wait_listening(i);
        assert_eq!(a.to_string(), addrs[i], "n{i} back at its address");
    }
    let took = c.wait_ideal(&all, started, Duration::from_secs(60));
    peerstore_tests::report(format!(
        "a 5-node ring killed at once and restarted: ideal {:.2} s after the restart",
        took.as_secs_f64()
    ));
    assert_eq!(
        c.count_in_logs("starting the ring again"),
        1,
        "exactly one node starts the ring again"
    );
    let out = c.dir().join("out");
    ok(
        cli(&c, &alice, 3, &["restore", &ds, "--to", &path_str(&out)]),
        "restore after the restart",
    );
    assert_same(
        &tree,
        &out.join("data"),
        "restore after the whole ring restarted",
    );
    c.assert_no_panics();
}

/// A one-node ring keeping one copy of each key, in its ring.
fn lone_node(name: &str) -> Cluster {
    let mut c = Cluster::new(name, 1);
    c.start(0, &["--replicas".to_string(), "1".to_string()]);
    c.wait_joined(0, Duration::from_secs(10));
    c
}

/// Many small files through a lone node (R = 1): the client may have 128
/// calls in flight but keeps at most 64 on the wire to one node, which
/// answers "busy" beyond that (without the per-node bound, files 64 and on
/// failed here with "the gate is busy").
#[test]
fn many_small_files_through_a_lone_node_are_never_refused_as_busy() {
    let c = lone_node("one-node-window");
    let files = (0..300u64).map(|i| (format!("f{i:03}"), bytes(100 + i as usize, i + 7)));
    round_trip(&c, "many", files, "300 small files through one node");
}

/// Writes `files` into a directory `name` of the cluster's, backs it up as
/// the cluster's user (all of them stored) and restores it byte for byte.
/// Returns the directory's canonical path.
fn round_trip(
    c: &Cluster,
    name: &str,
    files: impl Iterator<Item = (String, Vec<u8>)>,
    what: &str,
) -> PathBuf {
    let data = c.dir().join(name);
    std::fs::create_dir_all(&data).expect("data dir");
    let mut want = BTreeMap::new();
    for (file, body) in files {
        std::fs::write(data.join(&file), &body).expect("write a file");
        want.insert(PathBuf::from(file), body);
    }
    let data = data.canonicalize().expect("canonical");
    let alice = c.user_key().to_path_buf();
    let r = ok(cli(c, &alice, 0, &["backup", &path_str(&data)]), "backup");
    let stored = format!("stored {} files", want.len());
    assert!(r.stdout.contains(&stored), "{}", r.describe());
    let out = c.dir().join(format!("{name}-restored"));
    ok(
        cli(
            c,
            &alice,
            0,
            &["restore", &path_str(&data), "--to", &path_str(&out)],
        ),
        "restore",
    );
    assert_same(&want, &out.join(name), what);
    data
}

/// Files of one to four chunks are read whole and sealed several at a
/// time (eight files or 8 MiB at most a group); files around them take the
/// streaming path. Twenty of them, in sizes on either side of the limits,
/// restore byte for byte, and a second backup finds all unchanged.
#[test]
fn files_of_a_few_chunks_sealed_in_groups_restore_exactly() {
    const CHUNK: usize = (1 << 20) - 64;
    let c = lone_node("grouped-files");
    let sizes = [
        CHUNK - 1,
        CHUNK,
        CHUNK + 1,
        1 << 20,
        2 * CHUNK + 17,
        3 * CHUNK,
        4 * CHUNK - 1,
        4 * CHUNK,
        10,
    ];
    let files = (0..20u64).map(|i| {
        let body = bytes(sizes[i as usize % sizes.len()], i + 300);
        (format!("g{i:02}"), body)
    });
    let data = round_trip(&c, "grouped", files, "files sealed in groups");
    let alice = c.user_key().to_path_buf();
    let again = ok(
        cli(&c, &alice, 0, &["backup", &path_str(&data)]),
        "second backup",
    );
    assert!(
        again.stdout.contains("20 unchanged"),
        "{}",
        again.describe()
    );
}

/// A restore stopped with Ctrl-C (SIGINT) part-way through a large file
/// deletes the file it was writing and exits with 130, as shells expect.
#[test]
fn an_interrupted_restore_leaves_no_partial_file() {
    let c = lone_node("interrupt");
    let data = c.dir().join("big");
    std::fs::create_dir_all(&data).expect("data dir");
    std::fs::write(data.join("big.bin"), bytes(160 << 20, 9)).expect("write the file");
    let data = data.canonicalize().expect("canonical");
    let alice = c.user_key().to_path_buf();
    ok(cli(&c, &alice, 0, &["backup", &path_str(&data)]), "backup");

    let out = c.dir().join("restored");
    let mut cmd = cli_cmd(
        &c,
        &alice,
        0,
        c.dir(),
        &["restore", &path_str(&data), "--to", &path_str(&out)],
    );
    let mut p = Proc::spawn("peerstore restore (to interrupt)", &mut cmd);
    let partial = out.join("big").join(".big.bin.peerstore-partial");
    // Bounded wait until the restore is writing the file.
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    while !partial.exists() && p.exited().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        partial.exists(),
        "the restore never wrote its partial file (exit: {:?})",
        p.exited()
    );
    p.interrupt();
    let status = p.wait_exit(COMMAND_TIMEOUT).expect("the client stops");
    assert_eq!(status.code(), Some(130), "exit status after SIGINT");
    assert!(!partial.exists(), "the partial file is deleted");
    assert!(
        !out.join("big").join("big.bin").exists(),
        "nothing half-restored in place"
    );
}
