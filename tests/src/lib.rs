//! The end-to-end test harness: real `peerstore-node` processes on
//! 127.0.0.1, watched through the client library and the `peerstore` CLI.
//!
//! # Binaries
//!
//! The tests run the `peerstore-node` and `peerstore` binaries of their own
//! build profile, found next to the test executable (`target/<profile>/`,
//! the parent of `deps/`). `cargo test --workspace` builds them (the node
//! and client packages have integration tests, which makes cargo build
//! their binaries); `cargo test -p peerstore-tests` alone does not, and
//! the tests then fail saying to run
//! `cargo build --workspace --profile <profile> --bins` first. Build with
//! an optimised profile (`--profile ci`): every node makes RSA keys.
//!
//! # Rules the harness keeps
//!
//! - Ports are chosen by the OS (`--listen 127.0.0.1:0`) and learned from
//!   the node's stdout line `listening on ADDR`, read on a thread and waited
//!   for with a deadline. Nothing listens anywhere but 127.0.0.1.
//! - Every child process is owned by a [`Proc`] guard whose `Drop` kills and
//!   reaps it, so a failing (panicking) test leaves no node behind; on Linux
//!   the kernel also kills it if the test process itself is killed.
//! - Every wait is bounded: status is polled until a deadline, and a wait
//!   that runs out panics with each node's view of the ring and the tail of
//!   its log ([`Cluster::diagnostics`]).
//! - Each cluster lives in its own temporary directory (data directories,
//!   logs, the user's key, a private `HOME` so no developer's
//!   `~/.local/share/peerstore/trust` leaks in). Set `PEERSTORE_E2E_KEEP=1`
//!   to keep the directory of a failed test for a look afterwards
//!   (`PEERSTORE_E2E_KEEP=all`: of every test).
//!
//! # Times
//!
//! Convergence is measured by polling every node's view (concurrently, one
//! client session per node kept open) every [`POLL_EVERY`]; a reported time
//! is the end of the first polling round that saw the ideal ring, so an
//! upper bound within about one round. A node prints "listening on" before
//! it makes its RSA session key, so on a loaded machine it may serve only
//! seconds later; [`Cluster::wait_serving`] marks when every node answers,
//! and tests say which reference point their bound counts from.
//!
//! Node identities come from the OS random generator (the daemon makes
//! them), so ring positions differ from run to run; the harness prints
//! every node's id, address and data directory, the ring order and the
//! command lines it ran, which is what a replay by hand needs.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::future::Future;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use peerstore_client::conn::NodeClient;
use peerstore_client::keyfile;
use peerstore_core::endorse::TrustStore;
use peerstore_core::gate::RingStatus;
use peerstore_core::identity::Identity;
use peerstore_core::record::MIN_KEY_BITS_DEFAULT;
use peerstore_core::vnode::vnode_id;
use peerstore_core::{Addr, Id, Peer, Signer};

/// How long a node may take from spawn to "listening on".
pub const LISTEN_TIMEOUT: Duration = Duration::from_secs(20);
/// How long one status call may take (the client library's own limit is a
/// minute, too long for a poll).
pub const STATUS_TIMEOUT: Duration = Duration::from_secs(3);
/// How long listing a node's keys may take ([`Cluster::keys`]): a few
/// round trips, one per page of keys, on a session reopened if need be.
pub const KEYS_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause between polling rounds. Polling is how the harness observes a
/// condition; it never stands in for one.
pub const POLL_EVERY: Duration = Duration::from_millis(250);
/// How long a short-lived command (`id`, `init`, `ring`, a refused start)
/// may run.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
/// Lines of a node's log shown in diagnostics.
const LOG_TAIL_LINES: usize = 25;

// ---------------------------------------------------------------------------
// Logging
// ---------------------------------------------------------------------------

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// A harness log line on stderr (captured by the test runner, shown when a
/// test fails or with `--nocapture`), stamped with seconds since the test
/// process started.
pub fn log(msg: impl std::fmt::Display) {
    let t = epoch().elapsed().as_secs_f64();
    let name = thread::current().name().unwrap_or("?").to_string();
    eprintln!("[e2e {t:8.3}s {name}] {msg}");
}

/// A measured result worth keeping: printed on stdout (so `--nocapture`
/// shows it) and logged.
pub fn report(msg: impl std::fmt::Display) {
    let name = thread::current().name().unwrap_or("?").to_string();
    println!("[e2e result] {name}: {msg}");
    log(format!("RESULT {msg}"));
}

// ---------------------------------------------------------------------------
// Binaries
// ---------------------------------------------------------------------------

/// Where the binaries under test are.
#[derive(Debug)]
pub struct Binaries {
    /// `target/<profile>`.
    pub dir: PathBuf,
    /// The cargo profile name (`dev` for `target/debug`).
    pub profile: String,
    pub node: PathBuf,
    pub cli: PathBuf,
}

/// The `peerstore-node` and `peerstore` binaries of this test's build
/// profile. Panics, saying what to build, if they are missing.
pub fn binaries() -> &'static Binaries {
    static BINS: OnceLock<Binaries> = OnceLock::new();
    BINS.get_or_init(|| {
        let exe = std::env::current_exe().expect("the test executable's path");
        // target/<profile>/deps/<test>-<hash>
        let mut dir = exe
            .parent()
            .expect("the test executable is in a directory")
            .to_path_buf();
        if dir.file_name().is_some_and(|n| n == "deps") {
            dir.pop();
        }
        let dir_name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let profile = match dir_name.as_str() {
            "debug" => "dev".to_string(),
            other => other.to_string(),
        };
        let exe_name = |n: &str| dir.join(format!("{n}{}", std::env::consts::EXE_SUFFIX));
        let bins = Binaries {
            node: exe_name("peerstore-node"),
            cli: exe_name("peerstore"),
            dir: dir.clone(),
            profile,
        };
        for b in [&bins.node, &bins.cli] {
            assert!(
                b.is_file(),
                "{} is missing. The end-to-end tests run the binaries built with \
                 the same profile as the tests; run \
                 `cargo build --workspace --profile {} --bins` first \
                 (`cargo test --workspace` builds them too).",
                b.display(),
                bins.profile
            );
        }
        // cargo does not rebuild them for `cargo test -p peerstore-tests`:
        // say how old they are, in case they are older than the sources.
        let age = |p: &Path| {
            std::fs::metadata(p)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .map_or("?".to_string(), |d| format!("{} s", d.as_secs()))
        };
        log(format!(
            "binaries (profile {}): {} (built {} ago), {} (built {} ago)",
            bins.profile,
            bins.node.display(),
            age(&bins.node),
            bins.cli.display(),
            age(&bins.cli)
        ));
        bins
    })
}

// ---------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------

/// A child process that is killed and reaped when dropped (also while a
/// failing test unwinds).
pub struct Proc {
    name: String,
    child: Child,
    exited: Option<ExitStatus>,
}

impl Proc {
    /// Spawns `cmd` with stdin closed.
    pub fn spawn(name: impl Into<String>, cmd: &mut Command) -> Proc {
        let name = name.into();
        die_with_parent(cmd);
        let child = cmd
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({cmd:?}): {e}"));
        Proc {
            name,
            child,
            exited: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The exit status if the process has ended (reaping it).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().ok().flatten();
        }
        self.exited
    }

    /// Waits for the process to end, at most `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = self.exited() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILL, then reap.
    pub fn kill(&mut self) -> ExitStatus {
        if let Some(s) = self.exited() {
            return s;
        }
        let _ = self.child.kill();
        let s = self
            .child
            .wait()
            .unwrap_or_else(|e| panic!("cannot reap {}: {e}", self.name));
        self.exited = Some(s);
        s
    }

    /// SIGTERM (the node leaves gracefully); does not wait.
    pub fn terminate(&mut self) {
        self.signal(rustix::process::Signal::TERM);
    }

    /// SIGINT (what Ctrl-C sends); does not wait.
    pub fn interrupt(&mut self) {
        self.signal(rustix::process::Signal::INT);
    }

    /// Sends `sig` unless the process has ended.
    fn signal(&mut self, sig: rustix::process::Signal) {
        if self.exited().is_some() {
            return;
        }
        let pid = rustix::process::Pid::from_raw(self.pid() as i32).expect("a child's pid");
        rustix::process::kill_process(pid, sig)
            .unwrap_or_else(|e| panic!("cannot signal {}: {e}", self.name));
    }

    /// Takes the child's piped stdout.
    pub fn take_stdout(&mut self) -> Option<std::process::ChildStdout> {
        self.child.stdout.take()
    }

    /// Takes the child's piped stderr.
    pub fn take_stderr(&mut self) -> Option<std::process::ChildStderr> {
        self.child.stderr.take()
    }
}

/// On Linux, has the kernel kill the child if the thread that spawned it
/// ends: the [`Proc`] guard covers a test that fails, this covers a test
/// process that is itself killed (a CI timeout), which would otherwise leave
/// nodes running for ever. Every child is spawned from its test's thread.
#[cfg(target_os = "linux")]
fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the child between fork and exec, where
    // only async-signal-safe calls are allowed; it makes one prctl system
    // call and allocates nothing.
    unsafe {
        cmd.pre_exec(|| {
            rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))
                .map_err(std::io::Error::from)
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn die_with_parent(_cmd: &mut Command) {}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.exited().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// What a finished command printed.
#[derive(Debug)]
pub struct Ran {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Ran {
    /// For assertion messages.
    pub fn describe(&self) -> String {
        format!(
            "exit {:?}\n--- stdout ---\n{}--- stderr ---\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

fn read_all_on_thread<R: Read + Send + 'static>(r: Option<R>) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut bytes = Vec::new();
        if let Some(mut r) = r {
            let _ = r.read_to_end(&mut bytes);
        }
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// Runs `cmd` to completion, at most `limit` (then kills it and panics),
/// capturing its output.
pub fn run_bounded(what: &str, cmd: &mut Command, limit: Duration) -> Ran {
    log(format!("run {what}: {cmd:?}"));
    let mut p = Proc::spawn(what, cmd.stdout(Stdio::piped()).stderr(Stdio::piped()));
    let out = read_all_on_thread(p.take_stdout());
    let err = read_all_on_thread(p.take_stderr());
    let status = p.wait_exit(limit);
    if status.is_none() {
        p.kill();
    }
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    let Some(status) = status else {
        panic!(
            "{what} did not finish within {limit:?} and was killed ({cmd:?})\n--- stdout ---\n{stdout}--- stderr ---\n{stderr}"
        );
    };
    Ran {
        status,
        stdout,
        stderr,
    }
}

/// Keeps a child away from the developer's own PeerStore files.
fn isolate(cmd: &mut Command, home: &Path) {
    cmd.env("HOME", home)
        .env("XDG_DATA_HOME", home.join(".local/share"))
        .env("XDG_CONFIG_HOME", home.join(".config"))
        .env_remove("PEERSTORE_PASSPHRASE")
        .env("RUST_BACKTRACE", "1");
}

// ---------------------------------------------------------------------------
// The user
// ---------------------------------------------------------------------------

/// The harness's user: a key file's text, made once per test process.
///
/// It is a 2048-bit identity (the smallest the node accepts) made with the
/// library rather than `peerstore init`, whose 3072-bit default is what a
/// person should use: the harness signs one request per node per polling
/// round, and on a two-core machine shared with the nodes under test the
/// cheaper signatures keep the observer from slowing what it measures.
/// (`peerstore init` itself is tested in client/tests/init.rs.)
pub fn user_key_pem() -> &'static str {
    static PEM: OnceLock<String> = OnceLock::new();
    PEM.get_or_init(|| {
        let t = Instant::now();
        let mut rng = rand::rngs::OsRng;
        let id = Identity::generate(&mut rng, MIN_KEY_BITS_DEFAULT).expect("a user identity");
        let pem = id.to_pem(&mut rng, None).expect("the user key as PEM");
        log(format!(
            "user key made ({} bits, {:.2} s)",
            MIN_KEY_BITS_DEFAULT,
            t.elapsed().as_secs_f64()
        ));
        pem.to_string()
    })
}

// ---------------------------------------------------------------------------
// Nodes and clusters
// ---------------------------------------------------------------------------

/// One node of a [`Cluster`]: its data directory and identity, and the
/// process while it runs.
pub struct Node {
    pub index: usize,
    pub dir: PathBuf,
    /// Its ring id (of its public key, as the daemon computes it).
    pub id: Id,
    /// The key fingerprint `peerstore-node admit` takes.
    pub fingerprint: String,
    /// Where it listened last.
    pub addr: Option<SocketAddr>,
    /// Its stderr (the tracing log), appended across restarts.
    pub log: PathBuf,
    proc: Option<Proc>,
    /// The "listening on" line, from the stdout reader thread.
    listening: Option<mpsc::Receiver<Result<SocketAddr, String>>>,
    /// A client session kept open between polls.
    client: Option<NodeClient>,
    /// When it was last spawned.
    pub started: Option<Instant>,
    starts: u32,
}

impl Node {
    pub fn is_running(&mut self) -> bool {
        self.proc.as_mut().is_some_and(|p| p.exited().is_none())
    }

    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(Proc::pid)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
            .unwrap_or_else(|| panic!("node {} has not listened yet", self.index))
    }

    /// Its store's item and quarantine directories (see node/src/disk.rs).
    pub fn store_items_dir(&self) -> PathBuf {
        self.dir.join("store").join("items")
    }

    pub fn store_quarantine_dir(&self) -> PathBuf {
        self.dir.join("store").join("quarantine")
    }

    pub fn public_key(&self) -> PathBuf {
        self.dir.join("node.pub.pem")
    }
}

/// A problem with the ring, or the ring as every node saw it.
pub struct Snapshot {
    pub views: BTreeMap<usize, std::result::Result<RingStatus, String>>,
    pub problems: Vec<String>,
}

/// A set of nodes in one temporary directory, node 0 being the ring's root.
pub struct Cluster {
    // Field order is drop order: the processes and sessions go first, the
    // runtime next, the directory last.
    nodes: Vec<Node>,
    rt: tokio::runtime::Runtime,
    user: Signer,
    user_key: PathBuf,
    home: PathBuf,
    name: String,
    tmp: Option<tempfile::TempDir>,
}

/// The successor list length r the node uses: the core's default, which
/// the daemon does not change (node/src/daemon.rs builds its
/// `MachineConfig` from the default and only sets the replica counts).
pub fn successor_list_len() -> usize {
    peerstore_core::Config::default().successors_max
}

fn short(id: &Id) -> String {
    id.0[..4].iter().map(|b| format!("{b:02x}")).collect()
}

fn addr_text(a: &Addr) -> String {
    match a {
        Addr::Tcp(s) => s.to_string(),
        Addr::Slot(n) => format!("slot:{n}"),
    }
}

/// Full hex of an id (as `peerstore ring --json` prints it).
pub fn hex_id(id: &Id) -> String {
    id.0.iter().map(|b| format!("{b:02x}")).collect()
}

impl Cluster {
    /// A cluster of `n` nodes, none started: makes each node's identity
    /// (`peerstore-node id`, all at once) and the user's key file.
    pub fn new(name: &str, n: usize) -> Cluster {
        assert!(n >= 1);
        let bins = binaries();
        let tmp = tempfile::Builder::new()
            .prefix(&format!("peerstore-e2e-{name}-"))
            .tempdir()
            .expect("a temporary directory");
        let root = tmp.path().to_path_buf();
        let home = root.join("home");
        std::fs::create_dir_all(&home).expect("home directory");
        log(format!(
            "cluster {name}: {n} nodes under {}",
            root.display()
        ));

        // Identities, made in parallel (RSA key generation is the slow part).
        let made = Instant::now();
        let mut running: Vec<(usize, PathBuf, Proc, thread::JoinHandle<String>)> = (0..n)
            .map(|i| {
                let dir = root.join(format!("node{i}"));
                let mut cmd = Command::new(&bins.node);
                isolate(&mut cmd, &home);
                cmd.arg("id")
                    .arg("--data-dir")
                    .arg(&dir)
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped());
                let mut p = Proc::spawn(format!("{name}/node{i} id"), &mut cmd);
                let out = read_all_on_thread(p.take_stdout());
                // stderr only carries log lines here; drain it so the
                // child never blocks on a full pipe.
                drop(read_all_on_thread(p.take_stderr()));
                (i, dir, p, out)
            })
            .collect();
        let deadline = Instant::now() + COMMAND_TIMEOUT * 2;
        let mut nodes = Vec::with_capacity(n);
        for (i, dir, mut p, out) in running.drain(..) {
            let status = p.wait_exit(deadline.saturating_duration_since(Instant::now()));
            let Some(status) = status else {
                panic!("`peerstore-node id` for node {i} did not finish in time");
            };
            let stdout = out.join().unwrap_or_default();
            assert!(
                status.success(),
                "`peerstore-node id` for node {i}: {status:?}\n{stdout}"
            );
            let fingerprint = stdout
                .lines()
                .find_map(|l| l.strip_prefix("fingerprint "))
                .unwrap_or_else(|| panic!("`peerstore-node id` printed no fingerprint: {stdout}"))
                .trim()
                .to_string();
            let der = keyfile::read_public(&dir.join("node.pub.pem")).expect("node.pub.pem");
            assert_eq!(keyfile::fingerprint(&der), fingerprint);
            let id = vnode_id(&der, 0);
            nodes.push(Node {
                index: i,
                log: root.join(format!("node{i}.log")),
                dir,
                id,
                fingerprint,
                addr: None,
                proc: None,
                listening: None,
                client: None,
                started: None,
                starts: 0,
            });
        }
        log(format!(
            "cluster {name}: {n} node identities made in {:.2} s",
            made.elapsed().as_secs_f64()
        ));

        let user_key = root.join("user.pem");
        keyfile::write_private(&user_key, user_key_pem().as_bytes(), false)
            .expect("writing the user key");
        let user = Identity::from_pem(user_key_pem(), None, MIN_KEY_BITS_DEFAULT)
            .expect("the user key loads")
            .signer()
            .clone();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let c = Cluster {
            nodes,
            rt,
            user,
            user_key,
            home,
            name: name.to_string(),
            tmp: Some(tmp),
        };
        log(c.roster());
        c
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    pub fn node(&self, i: usize) -> &Node {
        &self.nodes[i]
    }

    pub fn node_mut(&mut self, i: usize) -> &mut Node {
        &mut self.nodes[i]
    }

    /// The cluster's temporary directory.
    pub fn dir(&self) -> &Path {
        self.tmp.as_ref().expect("the directory").path()
    }

    /// The user's key file.
    pub fn user_key(&self) -> &Path {
        &self.user_key
    }

    /// The private home directory children run with.
    pub fn home(&self) -> &Path {
        &self.home
    }

    /// The root's public key: what joiners and the client trust.
    pub fn root_key(&self) -> PathBuf {
        self.nodes[0].public_key()
    }

    /// Every node's index, id and data directory, and the ring order.
    pub fn roster(&self) -> String {
        let mut s = format!("cluster {} roster:", self.name);
        for n in &self.nodes {
            let _ = write!(
                s,
                "\n  n{:<2} id {}  fpr {}..  dir {}",
                n.index,
                hex_id(&n.id),
                &n.fingerprint[..16],
                n.dir.display()
            );
        }
        let all: Vec<usize> = (0..self.nodes.len()).collect();
        let order: Vec<String> = self
            .ring_order(&all)
            .iter()
            .map(|i| format!("n{i}"))
            .collect();
        let _ = write!(s, "\n  ring order: {}", order.join(" -> "));
        s
    }

    /// `live` sorted by ring id.
    pub fn ring_order(&self, live: &[usize]) -> Vec<usize> {
        let mut v = live.to_vec();
        v.sort_by_key(|&i| self.nodes[i].id);
        v.dedup();
        v
    }

    /// The name of the node with this id, for messages.
    fn who(&self, p: &Peer) -> String {
        match self.nodes.iter().find(|n| n.id == p.id) {
            Some(n) if n.addr.map(Addr::from) == Some(p.addr) => format!("n{}", n.index),
            Some(n) => format!("n{}@{}", n.index, addr_text(&p.addr)),
            None => format!("?{}@{}", short(&p.id), addr_text(&p.addr)),
        }
    }

    // ----- starting and stopping ---------------------------------------

    /// Spawns node `i` with `args` besides `--data-dir` and
    /// `--listen 127.0.0.1:0`; does not wait for it to listen.
    pub fn spawn(&mut self, i: usize, args: &[String]) {
        let bins = binaries();
        let home = self.home.clone();
        let node = &mut self.nodes[i];
        assert!(
            !node.is_running(),
            "node {i} is already running (pid {:?})",
            node.pid()
        );
        node.client = None;
        node.starts += 1;
        let mut log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .expect("the node's log file");
        let _ = writeln!(
            log_file,
            "===== e2e harness: start {} of node {i} =====",
            node.starts
        );
        let mut cmd = Command::new(&bins.node);
        isolate(&mut cmd, &home);
        cmd.arg("--data-dir").arg(&node.dir);
        if !args.iter().any(|a| a == "--listen") {
            cmd.arg("--listen").arg("127.0.0.1:0");
        }
        cmd.args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log_file));
        log(format!(
            "start n{i} (start {}): {cmd:?}; log {}",
            node.starts,
            node.log.display()
        ));
        let mut p = Proc::spawn(format!("{}/n{i}", self.name), &mut cmd);
        node.started = Some(Instant::now());
        let stdout = p.take_stdout().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        thread::Builder::new()
            .name(format!("n{i}-stdout"))
            .spawn(move || {
                // The first line says where the node listens; anything after
                // it is drained so the node never blocks on stdout.
                let mut r = BufReader::new(stdout);
                let mut line = String::new();
                let mut tx = Some(tx);
                loop {
                    line.clear();
                    match r.read_line(&mut line) {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {
                            if let Some(tx) = tx.take() {
                                let parsed = line
                                    .trim()
                                    .strip_prefix("listening on ")
                                    .and_then(|a| a.parse::<SocketAddr>().ok())
                                    .ok_or_else(|| {
                                        format!("unexpected first stdout line {line:?}")
                                    });
                                let _ = tx.send(parsed);
                            }
                        }
                    }
                }
            })
            .expect("a reader thread");
        node.listening = Some(rx);
        node.proc = Some(p);
    }

    /// Waits (at most [`LISTEN_TIMEOUT`]) for a spawned node to say where it
    /// listens.
    pub fn wait_listening(&mut self, i: usize) -> SocketAddr {
        let rx = self.nodes[i]
            .listening
            .take()
            .unwrap_or_else(|| panic!("node {i} was not spawned"));
        let got = rx.recv_timeout(LISTEN_TIMEOUT);
        let addr = match got {
            Ok(Ok(a)) => a,
            Ok(Err(e)) => self.fail(&format!("node {i} did not start: {e}")),
            Err(mpsc::RecvTimeoutError::Timeout) => self.fail(&format!(
                "node {i} did not print \"listening on\" within {LISTEN_TIMEOUT:?}"
            )),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = self.nodes[i]
                    .proc
                    .as_mut()
                    .and_then(|p| p.wait_exit(Duration::from_secs(5)));
                self.fail(&format!(
                    "node {i} closed its stdout without listening (exit {status:?})"
                ))
            }
        };
        assert!(
            addr.ip().is_loopback(),
            "node {i} listens on {addr}, not 127.0.0.1"
        );
        let node = &mut self.nodes[i];
        node.addr = Some(addr);
        log(format!(
            "n{i} listening on {addr} (pid {:?}, {:.2} s after spawn)",
            node.pid(),
            node.started.map_or(0.0, |t| t.elapsed().as_secs_f64())
        ));
        addr
    }

    /// Spawns node `i` and waits until it listens.
    pub fn start(&mut self, i: usize, args: &[String]) -> SocketAddr {
        self.spawn(i, args);
        self.wait_listening(i)
    }

    /// Arguments that start the root with every other node admitted.
    pub fn root_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        for n in &self.nodes[1..] {
            args.push("--admit".to_string());
            args.push(n.fingerprint.clone());
        }
        args
    }

    /// Arguments that make a node join through node `via`, trusting the
    /// root.
    pub fn join_args(&self, via: usize) -> Vec<String> {
        vec![
            "--join".to_string(),
            self.nodes[via].addr().to_string(),
            "--trust".to_string(),
            self.root_key().display().to_string(),
        ]
    }

    /// Starts node 0 as a new ring's root, every other node admitted, and
    /// waits until it is in its ring.
    pub fn start_root(&mut self) -> SocketAddr {
        let args = self.root_args();
        let a = self.start(0, &args);
        self.wait_joined(0, Duration::from_secs(10));
        a
    }

    /// Starts the root, then every other node at once (each joining
    /// through the root); returns when the last one was spawned.
    pub fn start_all_at_once(&mut self) -> Instant {
        self.start_root();
        let args = self.join_args(0);
        let mut last = Instant::now();
        for i in 1..self.nodes.len() {
            self.spawn(i, &args);
            last = Instant::now();
        }
        for i in 1..self.nodes.len() {
            self.wait_listening(i);
        }
        last
    }

    /// Sets a ring up for a test that is about something else: every node
    /// started (all at once), serving, and the ring ideal, with generous
    /// bounds. Returns how long the ring took from the last node serving.
    pub fn form_ring(&mut self) -> Duration {
        let all: Vec<usize> = (0..self.nodes.len()).collect();
        let last = self.start_all_at_once();
        let serving = self.wait_serving(&all, Duration::from_secs(60));
        log(format!(
            "all {} nodes serving {:.2} s after the last start",
            all.len(),
            (serving - last).as_secs_f64()
        ));
        self.wait_ideal(&all, serving, Duration::from_secs(30))
    }

    /// Restarts node `i` from its data directory alone: no `--join`, no
    /// `--trust` (it rejoins through the peers it saved).
    pub fn restart(&mut self, i: usize) -> SocketAddr {
        self.start(i, &[])
    }

    /// kill -9.
    pub fn kill(&mut self, i: usize) -> ExitStatus {
        let node = &mut self.nodes[i];
        node.client = None;
        let p = node.proc.as_mut().expect("node was started");
        let s = p.kill();
        log(format!("n{i} killed with SIGKILL: {s:?}"));
        s
    }

    /// SIGTERM, then waits at most `limit` for the node to leave and exit.
    pub fn terminate(&mut self, i: usize, limit: Duration) -> ExitStatus {
        let t = Instant::now();
        let node = &mut self.nodes[i];
        node.client = None;
        let p = node.proc.as_mut().expect("node was started");
        p.terminate();
        match p.wait_exit(limit) {
            Some(s) => {
                log(format!(
                    "n{i} exited {:.2} s after SIGTERM: {s:?}",
                    t.elapsed().as_secs_f64()
                ));
                s
            }
            None => self.fail(&format!("n{i} did not exit within {limit:?} of SIGTERM")),
        }
    }

    // ----- observing -----------------------------------------------------

    fn trust(&self) -> Result<TrustStore> {
        let der = keyfile::read_public(&self.root_key())?;
        let mut t = TrustStore::new(MIN_KEY_BITS_DEFAULT);
        t.add_root(&der).map_err(|e| anyhow!("root key: {e}"))?;
        Ok(t)
    }

    /// Node `i`'s view of the ring, over a client session kept open between
    /// calls (reopened once if it broke), within [`STATUS_TIMEOUT`].
    pub fn status(&mut self, i: usize) -> Result<RingStatus> {
        self.statuses(&[i])
            .remove(&i)
            .unwrap_or_else(|| Err(anyhow!("not asked")))
    }

    /// The views of several nodes, asked concurrently (so a round of polls
    /// is close to one moment, and one slow node costs one
    /// [`STATUS_TIMEOUT`], not one per node).
    pub fn statuses(&mut self, which: &[usize]) -> BTreeMap<usize, Result<RingStatus>> {
        let mut out = BTreeMap::new();
        let trust = match self.trust() {
            Ok(t) => t,
            Err(e) => {
                for &i in which {
                    out.insert(i, Err(anyhow!("{e:#}")));
                }
                return out;
            }
        };
        let _in_rt = self.rt.enter();
        let mut tasks = tokio::task::JoinSet::new();
        for &i in which {
            if !self.nodes[i].is_running() {
                out.insert(i, Err(anyhow!("not running")));
                continue;
            }
            let Some(addr) = self.nodes[i].addr else {
                out.insert(i, Err(anyhow!("not listening yet")));
                continue;
            };
            let cached = self.nodes[i].client.take();
            let (user, trust) = (self.user.clone(), trust.clone());
            tasks.spawn(async move {
                let (client, result) =
                    ask_on(addr, cached, user, trust, STATUS_TIMEOUT, ask_status).await;
                (i, client, result)
            });
        }
        let done = self.rt.block_on(tasks.join_all());
        for (i, client, result) in done {
            self.nodes[i].client = client;
            out.insert(i, result);
        }
        out
    }

    /// The keys node `i` holds, in ascending order, as it lists them from
    /// its own index ([`NodeClient::keys`]), over the session
    /// [`Cluster::status`] keeps open (reopened once if it broke), within
    /// [`KEYS_TIMEOUT`]. How a test counts a key's copies without knowing
    /// how a node lays its store out on disk.
    pub fn keys(&mut self, i: usize) -> Result<Vec<Id>> {
        let trust = self.trust()?;
        if !self.nodes[i].is_running() {
            bail!("not running");
        }
        let Some(addr) = self.nodes[i].addr else {
            bail!("not listening yet");
        };
        let cached = self.nodes[i].client.take();
        let user = self.user.clone();
        let (client, result) =
            self.rt
                .block_on(ask_on(addr, cached, user, trust, KEYS_TIMEOUT, ask_keys));
        self.nodes[i].client = client;
        result
    }

    /// Waits until node `i` says it is in the ring; returns how long that
    /// took from the call.
    pub fn wait_joined(&mut self, i: usize, limit: Duration) -> Duration {
        let t = Instant::now();
        let deadline = t + limit;
        let mut last: String;
        loop {
            match self.status(i) {
                Ok(st) if st.joined => {
                    log(format!("n{i} joined ({:.2} s)", t.elapsed().as_secs_f64()));
                    return t.elapsed();
                }
                Ok(_) => last = "answers, not joined yet".into(),
                Err(e) => last = format!("{e:#}"),
            }
            if Instant::now() >= deadline {
                self.fail(&format!(
                    "n{i} did not report joined within {limit:?} (last: {last})"
                ));
            }
            thread::sleep(POLL_EVERY);
        }
    }

    /// Waits until every node in `which` answers over the wire: its event
    /// loop runs, past the start-up work (a node prints "listening on"
    /// before it makes its session key, which on a loaded machine takes
    /// seconds). A status reply counts, and so does the client's refusal
    /// of a node that is not endorsed yet: that comes from the node's own
    /// handshake answer. Returns when the last one answered.
    pub fn wait_serving(&mut self, which: &[usize], limit: Duration) -> Instant {
        let deadline = Instant::now() + limit;
        let mut waiting: Vec<usize> = which.to_vec();
        loop {
            let got = self.statuses(&waiting);
            waiting.retain(|i| match &got[i] {
                Ok(_) => false,
                Err(e) => !format!("{e:#}").contains("not endorsed by a key you trust"),
            });
            if waiting.is_empty() {
                return Instant::now();
            }
            if Instant::now() >= deadline {
                self.fail(&format!(
                    "nodes {waiting:?} did not answer within {limit:?} of the call"
                ));
            }
            thread::sleep(POLL_EVERY);
        }
    }

    /// Asks every node in `live` for its view and lists how the ring falls
    /// short of the ideal over exactly `live`: every node joined, its
    /// predecessor the previous node in ring order, its successor list
    /// exactly the next min(r, n-1) nodes (ids and addresses).
    pub fn snapshot(&mut self, live: &[usize]) -> Snapshot {
        let order = self.ring_order(live);
        let n = order.len();
        let r = successor_list_len();
        let want_len = r.min(n.saturating_sub(1));
        let peer = |c: &Cluster, i: usize| Peer {
            id: c.nodes[i].id,
            addr: Addr::from(c.nodes[i].addr()),
        };
        let mut views = BTreeMap::new();
        let mut problems = Vec::new();
        let mut got = self.statuses(&order);
        for (k, &i) in order.iter().enumerate() {
            let st = match got.remove(&i).unwrap_or_else(|| Err(anyhow!("not asked"))) {
                Ok(st) => st,
                Err(e) => {
                    problems.push(format!("n{i}: no answer: {e:#}"));
                    views.insert(i, Err(format!("{e:#}")));
                    continue;
                }
            };
            if st.me != peer(self, i) {
                problems.push(format!("n{i}: reports itself as {}", self.who(&st.me)));
            }
            if !st.joined {
                problems.push(format!("n{i}: not joined"));
            }
            if n > 1 {
                let pred = peer(self, order[(k + n - 1) % n]);
                if st.predecessor != Some(pred) {
                    problems.push(format!(
                        "n{i}: predecessor {} (want {})",
                        st.predecessor
                            .as_ref()
                            .map_or("none".to_string(), |p| self.who(p)),
                        self.who(&pred)
                    ));
                }
            }
            let want: Vec<Peer> = (1..=want_len)
                .map(|d| peer(self, order[(k + d) % n]))
                .collect();
            if st.successors != want {
                problems.push(format!(
                    "n{i}: successors [{}] (want [{}])",
                    st.successors
                        .iter()
                        .map(|p| self.who(p))
                        .collect::<Vec<_>>()
                        .join(" "),
                    want.iter()
                        .map(|p| self.who(p))
                        .collect::<Vec<_>>()
                        .join(" ")
                ));
            }
            views.insert(i, Ok(st));
        }
        Snapshot { views, problems }
    }

    /// Polls until the ring over `live` is ideal, failing at `since + limit`;
    /// returns the time from `since` to the first ideal snapshot (measured
    /// at the end of that polling round, so an upper bound).
    pub fn wait_ideal(&mut self, live: &[usize], since: Instant, limit: Duration) -> Duration {
        let deadline = since + limit;
        let mut rounds = 0u32;
        let mut next_progress = Instant::now() + Duration::from_secs(2);
        loop {
            rounds += 1;
            let snap = self.snapshot(live);
            if Instant::now() >= next_progress && !snap.problems.is_empty() {
                next_progress += Duration::from_secs(2);
                log(format!(
                    "{:.2} s (round {rounds}): {} problems, e.g. {}",
                    since.elapsed().as_secs_f64(),
                    snap.problems.len(),
                    snap.problems[..snap.problems.len().min(3)].join("; ")
                ));
            }
            if snap.problems.is_empty() {
                let took = since.elapsed();
                log(format!(
                    "ring over {:?} is ideal after {:.2} s ({rounds} polling rounds)",
                    self.ring_order(live),
                    took.as_secs_f64()
                ));
                return took;
            }
            if Instant::now() >= deadline {
                let msg = format!(
                    "the ring over {:?} did not reach the ideal state within {limit:?} \
                     ({rounds} polling rounds); last problems:\n  {}",
                    self.ring_order(live),
                    snap.problems.join("\n  ")
                );
                self.fail(&msg);
            }
            thread::sleep(POLL_EVERY);
        }
    }

    /// Fails at once (with diagnostics) unless the ring over `live` is
    /// ideal now.
    pub fn assert_ideal(&mut self, live: &[usize], context: &str) {
        let snap = self.snapshot(live);
        if !snap.problems.is_empty() {
            let msg = format!(
                "{context}: the ring is not ideal:\n  {}",
                snap.problems.join("\n  ")
            );
            self.fail(&msg);
        }
    }

    /// Fails unless the ring over `live` is ideal at every poll for `span`.
    pub fn assert_stays_ideal(&mut self, live: &[usize], span: Duration, context: &str) {
        let end = Instant::now() + span;
        let mut rounds = 0;
        while Instant::now() < end {
            self.assert_ideal(live, context);
            rounds += 1;
            thread::sleep(POLL_EVERY);
        }
        log(format!(
            "{context}: stayed ideal for {:.1} s ({rounds} checks)",
            span.as_secs_f64()
        ));
    }

    /// The last `lines` lines of node `i`'s log.
    pub fn log_tail(&self, i: usize, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.nodes[i].log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Every node's state, view of the ring and log tail.
    pub fn diagnostics(&mut self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "{}", self.roster());
        for i in 0..self.nodes.len() {
            let running = self.nodes[i].is_running();
            let state = match self.nodes[i].proc.as_mut() {
                None => "never started".to_string(),
                Some(p) => match p.exited() {
                    None => format!("running, pid {}", p.pid()),
                    Some(st) => format!("exited: {st:?}"),
                },
            };
            let _ = writeln!(
                s,
                "--- n{i}  id {}  addr {:?}  {state}  (starts: {})",
                short(&self.nodes[i].id),
                self.nodes[i].addr,
                self.nodes[i].starts
            );
            if running {
                match self.status(i) {
                    Ok(st) => {
                        let _ = writeln!(
                            s,
                            "    view: joined {}  pred {}  succs [{}]  fingers {}  items {}  bytes {}",
                            st.joined,
                            st.predecessor
                                .as_ref()
                                .map_or("none".to_string(), |p| self.who(p)),
                            st.successors
                                .iter()
                                .map(|p| self.who(p))
                                .collect::<Vec<_>>()
                                .join(" "),
                            st.fingers.len(),
                            st.items,
                            st.bytes
                        );
                    }
                    Err(e) => {
                        let _ = writeln!(s, "    view: no answer: {e:#}");
                    }
                }
            }
            if self.nodes[i].starts > 0 {
                let _ = writeln!(s, "    log tail ({}):", self.nodes[i].log.display());
                for l in self.log_tail(i, LOG_TAIL_LINES).lines() {
                    let _ = writeln!(s, "      {l}");
                }
            }
        }
        s
    }

    /// How many lines of the nodes' logs contain `text`.
    pub fn count_in_logs(&self, text: &str) -> usize {
        self.nodes
            .iter()
            .map(|n| {
                std::fs::read_to_string(&n.log)
                    .unwrap_or_default()
                    .lines()
                    .filter(|l| l.contains(text))
                    .count()
            })
            .sum()
    }

    /// Fails if any node's log shows a panic.
    pub fn assert_no_panics(&mut self) {
        for i in 0..self.nodes.len() {
            let text = std::fs::read_to_string(&self.nodes[i].log).unwrap_or_default();
            if text.contains("panicked") {
                self.fail(&format!(
                    "n{i} panicked (see {})",
                    self.nodes[i].log.display()
                ));
            }
        }
    }

    /// Panics with `msg` and the cluster's diagnostics.
    pub fn fail(&mut self, msg: &str) -> ! {
        let diag = self.diagnostics();
        panic!(
            "{msg}\n\n===== cluster {} diagnostics =====\n{diag}",
            self.name
        );
    }

    // ----- the CLI -----------------------------------------------------------

    /// A `peerstore` command with a private home (and no arguments).
    pub fn cli_bare(&self) -> Command {
        let mut cmd = Command::new(&binaries().cli);
        isolate(&mut cmd, &self.home);
        cmd
    }

    /// A `peerstore` command with the user's key and a private home.
    pub fn cli(&self) -> Command {
        let mut cmd = self.cli_bare();
        cmd.arg("--key").arg(&self.user_key);
        cmd
    }

    /// A `peerstore-node` command with a private home.
    pub fn node_cmd(&self) -> Command {
        let mut cmd = Command::new(&binaries().node);
        isolate(&mut cmd, &self.home);
        cmd
    }

    /// `peerstore ring --json` against node `i`, trusting the root.
    pub fn cli_ring_json(&self, i: usize) -> Result<serde_json::Value> {
        let mut cmd = self.cli();
        cmd.arg("ring")
            .arg("--json")
            .arg("--node")
            .arg(self.nodes[i].addr().to_string())
            .arg("--trust")
            .arg(self.root_key());
        let ran = run_bounded(&format!("peerstore ring (n{i})"), &mut cmd, COMMAND_TIMEOUT);
        if !ran.status.success() {
            bail!("peerstore ring failed: {}", ran.describe());
        }
        serde_json::from_str(ran.stdout.trim()).with_context(|| format!("not JSON: {}", ran.stdout))
    }

    /// Checks `peerstore ring --json` on node `i` against the ideal ring
    /// over `live`: joined, and the same successors and predecessor the
    /// library sees.
    pub fn assert_cli_ring_ideal(&mut self, i: usize, live: &[usize]) {
        let v = match self.cli_ring_json(i) {
            Ok(v) => v,
            Err(e) => self.fail(&format!("{e:#}")),
        };
        let order = self.ring_order(live);
        let n = order.len();
        let k = order.iter().position(|&x| x == i).expect("i is live");
        let want_len = successor_list_len().min(n - 1);
        let want_succs: Vec<(String, String)> = (1..=want_len)
            .map(|d| {
                let j = order[(k + d) % n];
                (hex_id(&self.nodes[j].id), self.nodes[j].addr().to_string())
            })
            .collect();
        let got_succs: Vec<(String, String)> = v["successors"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|p| {
                        (
                            p["id"].as_str().unwrap_or("").to_string(),
                            p["addr"].as_str().unwrap_or("").to_string(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        // A lone node has no predecessor.
        let want_pred = (n > 1).then(|| hex_id(&self.nodes[order[(k + n - 1) % n]].id));
        let ok = v["joined"] == serde_json::Value::Bool(true)
            && v["id"].as_str() == Some(hex_id(&self.nodes[i].id).as_str())
            && v["addr"].as_str() == Some(self.nodes[i].addr().to_string().as_str())
            && got_succs == want_succs
            && v["predecessor"]["id"].as_str() == want_pred.as_deref();
        if !ok {
            self.fail(&format!(
                "`peerstore ring --json` on n{i} does not show the ideal ring: {v}"
            ));
        }
    }
}

/// A question [`ask_on`] puts to a node over a client session: boxed and
/// `Send` so that [`Cluster::statuses`] can ask several nodes at once on
/// tasks.
type Asked<'c, T> = Pin<Box<dyn Future<Output = Result<T>> + Send + 'c>>;

fn ask_status(c: &mut NodeClient) -> Asked<'_, RingStatus> {
    Box::pin(c.status())
}

fn ask_keys(c: &mut NodeClient) -> Asked<'_, Vec<Id>> {
    Box::pin(c.keys())
}

/// One question to the node at `addr`, each try within `limit`: on the
/// cached session if it still works, else on a new one; gives back the
/// session worth keeping.
async fn ask_on<T>(
    addr: SocketAddr,
    cached: Option<NodeClient>,
    user: Signer,
    trust: TrustStore,
    limit: Duration,
    ask: for<'c> fn(&'c mut NodeClient) -> Asked<'c, T>,
) -> (Option<NodeClient>, Result<T>) {
    if let Some(mut c) = cached {
        if let Ok(Ok(v)) = tokio::time::timeout(limit, ask(&mut c)).await {
            return (Some(c), Ok(v));
        }
    }
    let fresh = tokio::time::timeout(limit, async move {
        let mut c = NodeClient::connect(addr, user, trust).await?;
        let v = ask(&mut c).await?;
        anyhow::Ok((c, v))
    })
    .await;
    match fresh {
        Ok(Ok((c, v))) => (Some(c), Ok(v)),
        Ok(Err(e)) => (None, Err(e)),
        Err(_) => (None, Err(anyhow!("no answer within {limit:?}"))),
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            n.client = None;
            if let Some(mut p) = n.proc.take() {
                p.kill();
            }
        }
        let keep = std::env::var("PEERSTORE_E2E_KEEP").unwrap_or_default();
        if (thread::panicking() && !keep.is_empty()) || keep == "all" {
            if let Some(tmp) = self.tmp.take() {
                let kept = tmp.keep();
                eprintln!(
                    "[e2e] PEERSTORE_E2E_KEEP: kept {} for inspection",
                    kept.display()
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Raw bytes on the wire (see net/src/transport.rs for the format)
// ---------------------------------------------------------------------------

/// The preamble's magic.
pub const MAGIC: &[u8] = b"PSNET1";
/// Preamble role bytes.
pub const ROLE_NODE: u8 = 0;
pub const ROLE_CLIENT: u8 = 1;

/// A frame: a u32 big-endian length and the bytes.
pub fn frame(body: &[u8]) -> Vec<u8> {
    let mut v = (body.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(body);
    v
}

/// A client's preamble frame.
pub fn client_preamble() -> Vec<u8> {
    let mut body = MAGIC.to_vec();
    body.push(ROLE_CLIENT);
    frame(&body)
}

/// A node's preamble frame declaring `listen`.
pub fn node_preamble(listen: SocketAddr) -> Vec<u8> {
    let mut body = MAGIC.to_vec();
    body.push(ROLE_NODE);
    body.extend_from_slice(listen.to_string().as_bytes());
    frame(&body)
}

/// `len` bytes from a fixed-seed xorshift generator: garbage that is the
/// same on every run.
pub fn garbage(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// An address on 127.0.0.1 where nothing listens (a port the OS handed
/// out and that was closed again at once).
pub fn unused_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("its address")
}

/// A raw TCP connection to `addr` with bounded reads and writes.
pub fn raw_connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("cannot connect to {addr}: {e}"));
    s.set_write_timeout(Some(Duration::from_secs(5)))
        .expect("write timeout");
    s
}

/// Waits at most `limit` for the other end to close `s` (reading and
/// discarding anything it sends); returns how long that took, or `None`
/// if it stayed open.
pub fn wait_closed(s: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let t = Instant::now();
    let deadline = t + limit;
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        s.set_read_timeout(Some(left)).expect("read timeout");
        match s.read(&mut buf) {
            Ok(0) => return Some(t.elapsed()),
            Ok(_) => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return None
            }
            Err(_) => return Some(t.elapsed()),
        }
    }
}
