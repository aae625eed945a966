//! Mistakes a user or an operator makes end in a non-zero exit and a
//! message that says what to do, never a panic or a hang.

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::Command;

use peerstore_tests::{log, run_bounded, unused_port, Cluster, Ran, COMMAND_TIMEOUT};

/// Runs `cmd` and checks it failed cleanly (exit code 1 or 2, not a
/// signal or a panic) with every one of `says` in its stderr.
fn refused(what: &str, cmd: &mut Command, says: &[&str]) -> Ran {
    let ran = run_bounded(what, cmd, COMMAND_TIMEOUT);
    log(format!(
        "{what}: {:?}: {}",
        ran.status,
        ran.stderr.trim_end()
    ));
    assert!(
        !ran.status.success(),
        "{what}: succeeded\n{}",
        ran.describe()
    );
    assert!(
        matches!(ran.status.code(), Some(1 | 2)),
        "{what}: not a clean error exit\n{}",
        ran.describe()
    );
    assert!(
        !ran.stderr.contains("panicked"),
        "{what}: panicked\n{}",
        ran.describe()
    );
    for s in says {
        assert!(
            ran.stderr.contains(s),
            "{what}: stderr does not say {s:?}\n{}",
            ran.describe()
        );
    }
    ran
}

fn ring_cmd(c: &Cluster, node: SocketAddr, trust: Option<&Path>) -> Command {
    let mut cmd = c.cli();
    cmd.arg("ring")
        .arg("--json")
        .arg("--node")
        .arg(node.to_string());
    if let Some(t) = trust {
        cmd.arg("--trust").arg(t);
    }
    cmd
}

#[test]
fn peerstore_ring_fails_clearly_on_an_untrusted_node_or_a_dead_port() {
    // Node 1 is never started: its key is one the ring does not know.
    let mut c = Cluster::new("cli-ring", 2);
    let node = c.start_root();
    let stranger = c.node(1).public_key();

    refused(
        "ring, trusting another key",
        &mut ring_cmd(&c, node, Some(&stranger)),
        &["not endorsed by a key you trust", "--trust"],
    );
    refused(
        "ring, trusting nothing",
        &mut ring_cmd(&c, node, None),
        &["no ring root is trusted", "--trust"],
    );
    let dead = unused_port();
    refused(
        "ring against a dead port",
        &mut ring_cmd(&c, dead, Some(&c.root_key())),
        &[
            &format!("cannot reach a node at {dead}"),
            "is peerstore-node running there",
            "--node",
        ],
    );
    let mut no_key = c.cli_bare();
    no_key
        .arg("--key")
        .arg(c.dir().join("nobody.pem"))
        .arg("ring")
        .arg("--node")
        .arg(node.to_string())
        .arg("--trust")
        .arg(c.root_key());
    refused("ring without a key file", &mut no_key, &["peerstore init"]);

    // And the same command done right works.
    c.assert_cli_ring_ideal(0, &[0]);
    c.assert_no_panics();
}

#[test]
fn peerstore_node_refuses_bad_arguments_clearly() {
    let mut c = Cluster::new("cli-node", 1);
    let dir = c.dir().to_path_buf();
    let fresh = |name: &str| dir.join(name).display().to_string();

    // --join with nothing trusted.
    refused(
        "--join without --trust",
        c.node_cmd().args([
            "--data-dir",
            &fresh("nojoin"),
            "--listen",
            "127.0.0.1:0",
            "--join",
            &unused_port().to_string(),
        ]),
        &["must trust its root", "--trust ROOT.pub.pem"],
    );

    // --create and --join contradict each other.
    refused(
        "--create with --join",
        c.node_cmd().args([
            "--data-dir",
            &fresh("createjoin"),
            "--create",
            "--join",
            &unused_port().to_string(),
        ]),
        &["--create", "cannot be used with", "--join"],
    );

    // --trust files that are not public keys.
    let not_a_key = c.dir().join("not-a-key.pem");
    std::fs::write(&not_a_key, "this is not a key\n").expect("write");
    refused(
        "--trust of a text file",
        c.node_cmd()
            .args(["--data-dir", &fresh("badtrust1"), "--listen", "127.0.0.1:0"])
            .args(["--join", &unused_port().to_string(), "--trust"])
            .arg(&not_a_key),
        &["not-a-key.pem", "is not a PEM public key", "node.pub.pem"],
    );
    let private = c.node(0).dir.join("node.key");
    refused(
        "--trust of a private key file",
        c.node_cmd()
            .args(["--data-dir", &fresh("badtrust2"), "--listen", "127.0.0.1:0"])
            .args(["--join", &unused_port().to_string(), "--trust"])
            .arg(&private),
        &["node.key", "node.pub.pem"],
    );
    refused(
        "--trust of a missing file",
        c.node_cmd()
            .args(["--data-dir", &fresh("badtrust3"), "--listen", "127.0.0.1:0"])
            .args(["--join", &unused_port().to_string(), "--trust"])
            .arg(c.dir().join("missing.pem")),
        &["missing.pem", "cannot read"],
    );

    // A data directory another running node holds.
    let addr = c.start_root();
    let d0 = c.node(0).dir.display().to_string();
    refused(
        "a data directory in use",
        c.node_cmd()
            .args(["--data-dir", &d0, "--listen", "127.0.0.1:0"]),
        &["in use by another peerstore-node"],
    );
    // A listen address in use.
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken_addr = taken.local_addr().expect("addr").to_string();
    refused(
        "a listen address in use",
        c.node_cmd()
            .args(["--data-dir", &fresh("busyport"), "--listen", &taken_addr]),
        &[
            &format!("cannot listen on {taken_addr}"),
            "--listen 127.0.0.1:0",
        ],
    );
    drop(taken);

    // A damaged key file, and one others can read.
    let damaged = c.dir().join("damaged");
    std::fs::create_dir_all(&damaged).expect("dir");
    peerstore_client::keyfile::write_private(&damaged.join("node.key"), b"garbage\n", false)
        .expect("write");
    refused(
        "a damaged node.key",
        c.node_cmd().args([
            "--data-dir",
            &damaged.display().to_string(),
            "--listen",
            "127.0.0.1:0",
        ]),
        &["node.key", "not a usable node key"],
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let open = c.dir().join("open");
        std::fs::create_dir_all(&open).expect("dir");
        std::fs::copy(&private, open.join("node.key")).expect("copy");
        std::fs::set_permissions(
            open.join("node.key"),
            std::fs::Permissions::from_mode(0o644),
        )
        .expect("chmod");
        refused(
            "a node.key others can read",
            c.node_cmd().args([
                "--data-dir",
                &open.display().to_string(),
                "--listen",
                "127.0.0.1:0",
            ]),
            &["can be read by other users", "chmod 600"],
        );
    }

    // Malformed arguments.
    refused(
        "admit of a bad fingerprint",
        c.node_cmd()
            .args(["admit", "not-hex", "--data-dir", &fresh("admit")]),
        &["not a key fingerprint", "peerstore-node id"],
    );
    refused(
        "--listen that is not an address",
        c.node_cmd()
            .args(["--data-dir", &fresh("noaddr"), "--listen", "localhost"]),
        &["--listen"],
    );
    refused(
        "--replicas 0",
        c.node_cmd()
            .args(["--data-dir", &fresh("norepl"), "--replicas", "0"]),
        &["--replicas"],
    );

    // None of that disturbed the running node.
    c.assert_ideal(&[0], "after the refused starts");
    log(format!("the root at {addr} still serves"));
    c.assert_no_panics();
}
