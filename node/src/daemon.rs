//! The daemon: a [`Machine`] driven by the TCP transport, the clock and the
//! disk store.
//!
//! One task owns the machine and runs a loop over four inputs: packets and
//! closed connections from the transport, finished disk work, the
//! machine's next deadline, and a housekeeping tick (re-reading the
//! operator's admission list, retrying a join that got no answer, saving
//! the ring's addresses for the next start). Disk work runs on one
//! blocking thread, in the order the machine asked for it, so writes and
//! removes of a key complete in issue order as the core requires.
//!
//! Time given to the core is Unix-epoch milliseconds (clients sign
//! requests with wall-clock timestamps and endorsements expire by it),
//! made monotonic so a clock step backwards never moves the core's time
//! back.
//!
//! On SIGINT or SIGTERM the node leaves gracefully: it hands its keys to
//! its successors (bounded by the core's leave timeout) and exits.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use peerstore_core::endorse::{encode_chain, endorse, TrustStore};
use peerstore_core::identity::{Identity, NODE_KEY_BITS};
use peerstore_core::link::{LinkConfig, Links};
use peerstore_core::machine::{Machine, MachineConfig, MachineEvent, MachineOutput};
use peerstore_core::node::StateAnswer;
use peerstore_core::record::MIN_KEY_BITS_DEFAULT;
use peerstore_core::session::{Responder, SessionConfig};
use peerstore_core::vnode::vnode_id;
use peerstore_core::{Addr, IoId, Peer, Signer, StorageOp, StorageResult};

/// Most packets the node takes in at once ([`Machine::receive_all`]). Two
/// are enough to pair blocks' ids; each one held costs up to a frame and
/// its decrypted copy on top of the transport's own bound (its incoming
/// queue), so few.
const RECEIVE_BATCH: usize = 4;
pub use peerstore_net::keyfile::fingerprint;
use peerstore_net::keyfile::{self, public_pem, read_public};
use peerstore_net::transport::{NetEvent, Transport, TransportConfig};
use rand::rngs::OsRng;
use rand::RngCore;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::disk::{DiskConfig, DiskStore};
use crate::rejoin::{Rejoin, Remembered};

/// How the daemon was started.
#[derive(Clone, Debug)]
pub struct Options {
    pub listen: SocketAddr,
    /// The address peers should dial, if not the listen address.
    pub advertise: Option<SocketAddr>,
    pub data_dir: PathBuf,
    /// A member of the ring to join (else: rejoin the ring this node was
    /// in, or start a new one).
    pub join: Option<SocketAddr>,
    /// Start a new ring even though this node remembers one (its old ring
    /// is gone for good, or the operator restarts a stopped ring here).
    pub create: bool,
    /// Public key files of nodes (ring roots) to trust.
    pub trust: Vec<PathBuf>,
    /// SHA-256 fingerprints (hex) of node keys allowed to register here.
    pub admit: Vec<String>,
    pub replicas: usize,
    pub capacity_bytes: Option<u64>,
}

/// Where the node keeps its state under its data directory.
#[derive(Clone, Debug)]
pub struct Paths {
    /// The node's identity (0600).
    pub key: PathBuf,
    /// Its public signing key, for other nodes' `--trust`.
    pub public: PathBuf,
    /// Its endorsement chain, once registered.
    pub chain: PathBuf,
    /// Public keys it trusts.
    pub trust_dir: PathBuf,
    /// Fingerprints its operator admitted, one per line.
    pub admitted: PathBuf,
    /// The successors and predecessor seen last ([`Remembered`]).
    pub peers: PathBuf,
    /// The item store.
    pub store: PathBuf,
}

impl Paths {
    pub fn new(data_dir: &Path) -> Paths {
        Paths {
            key: data_dir.join("node.key"),
            public: data_dir.join("node.pub.pem"),
            chain: data_dir.join("chain"),
            trust_dir: data_dir.join("trust"),
            admitted: data_dir.join("admitted"),
            peers: data_dir.join("peers"),
            store: data_dir.join("store"),
        }
    }
}

/// The node's identity: loaded, or made on first start (and its public key
/// written beside it).
pub fn load_or_create_identity(paths: &Paths) -> Result<Identity> {
    let identity = if paths.key.exists() {
        let pem = keyfile::read_private(&paths.key)?;
        Identity::from_pem(&pem, None, MIN_KEY_BITS_DEFAULT).with_context(|| {
            format!(
                "{} is not a usable node key (a passphrase-protected key cannot start a daemon)",
                paths.key.display()
            )
        })?
    } else {
        info!(bits = NODE_KEY_BITS, "generating the node's identity");
        let id = Identity::generate(&mut OsRng, NODE_KEY_BITS).context("generating node keys")?;
        let pem = id.to_pem(&mut OsRng, None).context("encoding node keys")?;
        keyfile::write_private(&paths.key, pem.as_bytes(), false)?;
        id
    };
    let public = public_pem(identity.signing_public_der())?;
    std::fs::write(&paths.public, public)
        .with_context(|| format!("writing {}", paths.public.display()))?;
    // The daemon signs with OsRng; ring signs the same signatures faster.
    Ok(identity.with_os_random_signing())
}

fn parse_fingerprint(s: &str) -> Option<[u8; 32]> {
    let s = s.trim();
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Adds a fingerprint to the node's admission list (`peerstore-node admit`).
pub fn admit(paths: &Paths, fpr: &str) -> Result<()> {
    if parse_fingerprint(fpr).is_none() {
        bail!("'{fpr}' is not a key fingerprint (64 hex digits, as `peerstore-node id` prints)");
    }
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&paths.admitted)
        .with_context(|| format!("opening {}", paths.admitted.display()))?;
    writeln!(f, "{}", fpr.trim().to_ascii_lowercase())?;
    f.sync_all()?;
    Ok(())
}

fn read_admitted(paths: &Paths) -> BTreeSet<[u8; 32]> {
    match std::fs::read_to_string(&paths.admitted) {
        Ok(text) => text.lines().filter_map(parse_fingerprint).collect(),
        Err(_) => BTreeSet::new(),
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Unix-epoch milliseconds, never going backwards.
struct Clock {
    last_ms: u64,
}

impl Clock {
    fn now(&mut self) -> u64 {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        self.last_ms = self.last_ms.max(wall);
        self.last_ms
    }
}

/// Runs the node until SIGINT/SIGTERM. `ready` receives the advertised
/// address once the node listens.
pub async fn run(opts: Options) -> Result<()> {
    std::fs::create_dir_all(&opts.data_dir)
        .with_context(|| format!("creating {}", opts.data_dir.display()))?;
    let paths = Paths::new(&opts.data_dir);
    let _lock = lock_data_dir(&opts.data_dir)?;
    let identity = load_or_create_identity(&paths)?;
    let signer: Signer = identity.signer().clone();
    let der = signer.public_der().to_vec();

    // Trust: every --trust key is remembered; a node that starts a ring
    // trusts itself.
    std::fs::create_dir_all(&paths.trust_dir)?;
    for t in &opts.trust {
        let key = read_public(t)?;
        let name = format!("{}.pem", &fingerprint(&key)[..16]);
        std::fs::write(paths.trust_dir.join(name), public_pem(&key)?)?;
    }
    let mut trust = TrustStore::new(MIN_KEY_BITS_DEFAULT);
    let mut trusted = 0;
    for entry in std::fs::read_dir(&paths.trust_dir)? {
        let path = entry?.path();
        let key = read_public(&path)?;
        trust
            .add_root(&key)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        trusted += 1;
    }

    let (transport, mut net_rx) = Transport::bind(
        opts.listen,
        TransportConfig {
            advertise_addr: opts.advertise,
            // The core bounds what it keeps in flight (storage bytes,
            // calls per client), so a connection's queue only has to be
            // large enough never to drop a packet from the middle of a
            // session: a gap kills the session and everything queued
            // behind it.
            send_queue_packets: 4096,
            send_queue_bytes: 64 << 20,
            ..TransportConfig::default()
        },
    )
    .await
    .with_context(|| {
        format!(
            "cannot listen on {} (is another node using it? pick another with --listen 127.0.0.1:0)",
            opts.listen
        )
    })?;
    let me = transport
        .advertised()
        .context("the transport has no address")?;
    let Some(me_sock) = me.socket() else {
        bail!("not a TCP address");
    };
    // Tests and scripts read this line to learn an OS-chosen port.
    println!("listening on {me_sock}");
    {
        use std::io::Write;
        let _ = std::io::stdout().flush();
    }

    let mut clock = Clock { last_ms: 0 };
    let now = clock.now();
    let mut chain = std::fs::read(&paths.chain).unwrap_or_default();
    let remembered = if opts.create {
        Remembered::default()
    } else {
        Remembered::parse(
            &std::fs::read_to_string(&paths.peers).unwrap_or_default(),
            me_sock,
        )
    };
    let remembered_entries = remembered.entries();
    let creating = opts.join.is_none() && remembered_entries.is_empty();
    if creating && chain.is_empty() {
        // A new ring: this node is its root.
        let e = endorse(
            &mut OsRng,
            &signer,
            &der,
            signer.user_id(),
            &me_sock.to_string(),
            u64::MAX / 2,
        )
        .context("endorsing ourselves")?;
        chain = encode_chain(&[e]);
        write_atomic(&paths.chain, &chain)?;
        std::fs::write(
            paths
                .trust_dir
                .join(format!("{}.pem", &fingerprint(&der)[..16])),
            public_pem(&der)?,
        )?;
        trust.add_root(&der).map_err(|e| anyhow::anyhow!("{e}"))?;
        trusted += 1;
    }
    if trusted == 0 {
        bail!(
            "to join a ring this node must trust its root: pass --trust ROOT.pub.pem \
             (the root's node.pub.pem)"
        );
    }

    let mut cfg = MachineConfig::default();
    cfg.node.replicas = opts.replicas.max(1);
    cfg.node.write_quorum = cfg.node.replicas.min(2);
    cfg.link = LinkConfig {
        session: SessionConfig::default(),
        ..LinkConfig::default()
    };
    let responder = Responder::new(&mut OsRng, now, &cfg.link.session, &signer, chain.clone())
        .context("preparing the handshake responder")?;
    let links = Links::new(
        cfg.link.clone(),
        signer.clone(),
        chain,
        trust,
        responder,
        OsRng.next_u64(),
    );
    let id = vnode_id(&der, 0);
    let mut machine = Machine::new(cfg, links, id, me, OsRng.next_u64());

    // The disk: restore the index, then serve.
    let store = DiskStore::open(
        &paths.store,
        DiskConfig {
            capacity_bytes: opts.capacity_bytes,
        },
    )
    .with_context(|| format!("opening the store in {}", paths.store.display()))?;
    let bad = machine.restore(store.scan());
    let stats = store.stats();
    info!(
        items = stats.items,
        bytes = stats.bytes,
        corrupt = stats.corrupt_found,
        "store opened"
    );
    let (disk_tx, disk_rx) = std::sync::mpsc::channel::<(IoId, StorageOp)>();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(IoId, StorageResult)>();
    let disk_thread = std::thread::Builder::new()
        .name("disk".into())
        .spawn(move || disk_loop(store, disk_rx, done_tx))?;
    for key in bad {
        // Invalid on disk: the core skipped it; delete it.
        let _ = disk_tx.send((u64::MAX, StorageOp::Remove { key }));
    }

    for f in &opts.admit {
        admit(&paths, f)?;
    }
    for fpr in read_admitted(&paths) {
        machine.admit(fpr);
    }

    info!(
        id = %hex(&id.0[..8]),
        addr = %me_sock,
        fingerprint = %fingerprint(&der),
        public_key = %paths.public.display(),
        "node up"
    );
    // The work since `now` was read (the responder's ephemeral key, the
    // store scan) can take seconds on a busy machine. Read the clock again:
    // with the old reading the first housekeeping tick counted those
    // seconds as the join going unanswered and restarted it at once, which
    // lost the registration under way and cost one more retry period.
    let now = clock.now();
    let entry = opts.join.or_else(|| remembered_entries.first().copied());
    match entry {
        Some(e) => {
            info!(entry = %e, "joining");
            machine.join(now, Addr::from(e), &me_sock.to_string());
        }
        None => {
            info!("starting a new ring");
            machine.create(now);
        }
    }
    let mut entries: Vec<SocketAddr> = entry.into_iter().chain(remembered_entries).collect();
    entries.dedup();
    let mut join_since = now;
    let mut entry_at = 0usize;
    // Rejoining on our own (no --join): ask the remembered peers whether
    // they are in a ring, to join through one that is; the remembered
    // ring's lowest node also starts the ring again if it is gone.
    let mut rejoin = if opts.join.is_none() && entry.is_some() {
        Rejoin::new(id, &remembered)
    } else {
        None
    };
    let mut via_member = false;
    if let Some(r) = &rejoin {
        if r.is_lowest() {
            info!("this node starts the ring again if it finds it gone (it had the lowest id)");
        }
        for p in r.peers().to_vec() {
            machine.ask_state(now, p);
        }
    }

    let mut housekeeping = tokio::time::interval(Duration::from_secs(1));
    let mut leaving: Option<u64> = None;
    let mut sigterm = signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut sigint = signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut admitted_seen = read_admitted(&paths);

    loop {
        for (peer, state) in drain(&mut machine, &transport, &disk_tx, &paths)? {
            let Some(r) = rejoin.as_mut() else { continue };
            if !machine.join_pending() {
                continue;
            }
            if let (Some(m), Some(a)) = (
                r.heard(peer, state.map(|(member, _)| member)),
                peer.addr.socket(),
            ) {
                // The first member to answer in a round: later answers of
                // the round would only restart the join again.
                if !via_member && entries.get(entry_at) != Some(&a) {
                    via_member = true;
                    info!(entry = %a, "a remembered peer is in the ring: joining through it");
                    entry_at = entries.iter().position(|e| *e == a).unwrap_or(entry_at);
                    machine.join(clock.now(), m.addr, &me_sock.to_string());
                    join_since = clock.now();
                }
            } else if r.ring_is_gone() {
                info!("no remembered peer is in a ring: starting the ring again");
                machine.create(clock.now());
                rejoin = None;
            }
        }
        let deadline = machine.poll_timeout();
        let sleep_for = match deadline {
            Some(at) => Duration::from_millis(at.saturating_sub(clock.now())),
            None => Duration::from_secs(3600),
        };
        tokio::select! {
            ev = net_rx.recv() => match ev {
                Some(NetEvent::Packet { from, bytes }) => {
                    // Whatever else has arrived meanwhile goes in with it
                    // (a bounded number), so blocks' ids can be hashed two at
                    // a time; anything but a packet waits its turn after.
                    let mut packets = vec![(from, bytes)];
                    let mut after = None;
                    while packets.len() < RECEIVE_BATCH {
                        match net_rx.try_recv() {
                            Ok(NetEvent::Packet { from, bytes }) => packets.push((from, bytes)),
                            Ok(other) => {
                                after = Some(other);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    let now = clock.now();
                    let refs: Vec<(Addr, &[u8])> = packets.iter().map(|(f, b)| (*f, &b[..])).collect();
                    machine.receive_all(now, &refs);
                    match after {
                        Some(NetEvent::Closed { peer }) => machine.disconnected(peer),
                        Some(NetEvent::Packet { from, bytes }) => machine.receive(now, from, &bytes),
                        None => {}
                    }
                }
                Some(NetEvent::Closed { peer }) => machine.disconnected(peer),
                None => bail!("the transport stopped"),
            },
            done = done_rx.recv() => match done {
                Some((u64::MAX, _)) => {}
                Some((io, result)) => machine.storage_done(clock.now(), io, result),
                None => bail!("the disk thread stopped"),
            },
            _ = tokio::time::sleep(sleep_for) => machine.tick(clock.now()),
            _ = housekeeping.tick() => {
                let now = clock.now();
                let admitted = read_admitted(&paths);
                for fpr in admitted.difference(&admitted_seen) {
                    machine.admit(*fpr);
                }
                admitted_seen = admitted;
                if machine.join_pending() && now.saturating_sub(join_since) >= 5_000 && !entries.is_empty() {
                    // No answer: try the next entry we know.
                    entry_at = (entry_at + 1) % entries.len();
                    let e = entries[entry_at];
                    info!(entry = %e, "no answer yet; asking again");
                    machine.disconnected(Addr::from(e));
                    machine.join(now, Addr::from(e), &me_sock.to_string());
                    join_since = now;
                    via_member = false;
                    if let Some(r) = &rejoin {
                        for p in r.peers().to_vec() {
                            machine.ask_state(now, p);
                        }
                    }
                }
                if !machine.join_pending() {
                    rejoin = None;
                }
                if machine.node().is_joined() {
                    save_peers(&paths, &machine, me_sock);
                }
                if let Some(started) = leaving {
                    if now.saturating_sub(started) > 35_000 || machine.node().status() == peerstore_core::Status::Left {
                        break;
                    }
                }
            }
            _ = sigterm.recv() => { if begin_leave(&mut machine, &mut leaving, clock.now()) { break; } }
            _ = sigint.recv() => { if begin_leave(&mut machine, &mut leaving, clock.now()) { break; } }
        }
    }
    drain(&mut machine, &transport, &disk_tx, &paths)?;
    info!(links = ?machine.links().stats(), "link counters");
    info!(store = ?machine.node().store_stats(), node = ?machine.node().stats(), "node counters");
    info!(transport = ?transport.stats(), "transport counters");
    info!("node stopped");
    transport.shutdown();
    drop(disk_tx);
    let _ = disk_thread.join();
    Ok(())
}

fn signal(kind: tokio::signal::unix::SignalKind) -> Result<tokio::signal::unix::Signal> {
    tokio::signal::unix::signal(kind).context("installing a signal handler")
}

/// Starts a graceful leave; true if the node should stop at once (a second
/// signal, or nothing to hand off).
fn begin_leave(machine: &mut Machine, leaving: &mut Option<u64>, now: u64) -> bool {
    if leaving.is_some() {
        info!("second signal: stopping now");
        return true;
    }
    if !machine.node().is_joined() {
        return true;
    }
    info!("leaving the ring: handing keys to the successors");
    machine.leave(now);
    *leaving = Some(now);
    false
}

/// Carries out the machine's outputs; returns the answers to
/// [`Machine::ask_state`] for the caller.
fn drain(
    machine: &mut Machine,
    transport: &Transport,
    disk: &std::sync::mpsc::Sender<(IoId, StorageOp)>,
    paths: &Paths,
) -> Result<Vec<(Peer, StateAnswer)>> {
    let mut answers = Vec::new();
    while let Some(o) = machine.poll() {
        match o {
            MachineOutput::Packet(p) => {
                let to = p.to;
                if let Err(e) = transport.send(to, p.bytes) {
                    // A packet missing from a session's stream breaks it:
                    // start a new session with that peer next time.
                    debug!(peer = ?to, error = %e, "packet dropped; resetting the link");
                    machine.disconnected(to);
                }
            }
            MachineOutput::Storage { io, op } => {
                disk.send((io, op)).context("the disk thread stopped")?;
            }
            MachineOutput::Event(e) => match e {
                MachineEvent::Registered {
                    by,
                    chain_len,
                    chain,
                } => {
                    info!(by = ?by, chain_len, "registered: endorsed");
                    write_atomic(&paths.chain, &chain)?;
                }
                MachineEvent::Joined { successor } => {
                    info!(successor = ?successor.addr, "joined the ring");
                }
                MachineEvent::JoinFailed(why) => warn!(%why, "join failed; will retry"),
                MachineEvent::SuccessorsLost => warn!("lost every successor"),
                MachineEvent::PeerState { peer, state } => {
                    debug!(peer = ?peer.addr, ?state, "remembered peer answered");
                    answers.push((peer, state));
                }
            },
        }
    }
    Ok(answers)
}

fn save_peers(paths: &Paths, machine: &Machine, me: SocketAddr) {
    let node = machine.node();
    let Some(text) = Remembered::render(node.successors(), node.predecessor(), me) else {
        return;
    };
    if std::fs::read_to_string(&paths.peers).ok().as_deref() != Some(text.as_str()) {
        if let Err(e) = write_atomic(&paths.peers, text.as_bytes()) {
            debug!(error = %e, "could not save the ring's addresses");
        }
    }
}

fn disk_loop(
    mut store: DiskStore,
    ops: std::sync::mpsc::Receiver<(IoId, StorageOp)>,
    done: mpsc::UnboundedSender<(IoId, StorageResult)>,
) {
    // Whatever queued up while the disk was busy goes in one group commit
    // (bounded, so a long queue still answers in steps).
    const GROUP_MAX: usize = 256;
    const GROUP_BYTES: usize = 16 << 20;
    let size = |op: &StorageOp| match op {
        StorageOp::Write { item, .. } => item.size(),
        _ => 0,
    };
    while let Ok(first) = ops.recv() {
        let mut bytes = size(&first.1);
        let mut group = vec![first];
        while group.len() < GROUP_MAX && bytes < GROUP_BYTES {
            match ops.try_recv() {
                Ok(op) => {
                    bytes += size(&op.1);
                    group.push(op);
                }
                Err(_) => break,
            }
        }
        let (ios, group): (Vec<IoId>, Vec<StorageOp>) = group.into_iter().unzip();
        let mut failed = Vec::new();
        let mut stopped = false;
        store.apply_batch_each(group, |i, result| {
            if let StorageResult::Failed(e) = &result {
                failed.push(e.clone());
            }
            stopped |= done.send((ios[i], result)).is_err();
        });
        for e in failed {
            warn!(error = %e, detail = ?store.stats().last_error, "disk operation failed");
        }
        if stopped {
            return;
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// An exclusive lock on the data directory, so two daemons never share one.
fn lock_data_dir(dir: &Path) -> Result<std::fs::File> {
    let path = dir.join("lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(std::fs::TryLockError::WouldBlock) => bail!(
            "{} is in use by another peerstore-node (one data directory per node)",
            dir.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("locking {}", path.display()))
        }
    }
}
