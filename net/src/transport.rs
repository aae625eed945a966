//! A Tokio TCP transport for opaque packets.
//!
//! The core's secure links ([`peerstore_core::link::Links`]) are sans-IO:
//! they emit `Packet { to: Addr, bytes }` and take `receive(now, from,
//! bytes)`. This module is the wire under them. It moves byte strings
//! between machines named by `Addr::Tcp(listen address)` and reports where
//! each one came from; it never parses them.
//!
//! ## Framing
//!
//! Every packet is a `u32` big-endian length followed by that many bytes.
//! A length above [`TransportConfig::max_frame_bytes`] closes the
//! connection before anything is allocated for it, and the body buffer
//! grows only as bytes actually arrive, so a peer that announces a large
//! frame and sends little of it costs little.
//!
//! ## Preamble: who is on the other end
//!
//! Right after connecting, the opener sends one frame: the magic `PSNET1`,
//! a role byte (`0` node, `1` client) and, for a node, its listen address
//! as text (`"192.0.2.7:4000"`). The acceptor reads it within
//! [`TransportConfig::preamble_timeout`], bounded to a few dozen bytes, and
//! refuses anything else. From then on a node's packets are reported as
//! coming from `Addr::Tcp(declared listen address)`, the address the core
//! knows it by; a client has no listener, so its packets come from
//! `Addr::Tcp(remote socket address)`, which is unique per connection. The
//! declared address is only a routing hint: the link layer above proves
//! who holds which key, and a peer lying about its address only misroutes
//! ciphertext it cannot read. Still, a newcomer may not take over the
//! address of a live connection from another host: only a reconnect from
//! the same host, or a node declaring an address of the host it connects
//! from, replaces one (see `may_replace`), so a stranger cannot keep
//! kicking an honest peer off.
//!
//! ## One-way connections
//!
//! The core's design is that each machine sends over the connection it
//! opened to a peer and receives over the peer's, so two machines that
//! start talking at once never race to share one connection; the
//! responder answers handshake packets back on the initiator's connection.
//! [`Transport::send`] routes accordingly: to the connection we opened to
//! that address if there is one, else back on the accepted connection
//! whose sender is that address (how replies reach clients and
//! initiators), else it opens a new connection and keeps reusing it. A
//! packet therefore only changes connection when one closes, and every
//! close is reported ([`NetEvent::Closed`]) so the caller can
//! `Links::reset` that peer; the link layer then handshakes again.
//!
//! ## Bounds, backpressure and fairness
//!
//! Nothing a peer does may stop this machine from serving the others, and
//! nothing the node does may block on a peer:
//!
//! - [`Transport::send`] never waits. Each connection has a bounded queue
//!   (packets and bytes); a packet that does not fit is dropped, counted
//!   and reported as an error. The link layer above retransmits or
//!   handshakes again, which is the right response to a congested peer.
//! - Incoming packets go to the node over one bounded channel. A
//!   connection's reader waits for room before reading its next frame, so a
//!   node that falls behind pushes back on the senders through TCP instead
//!   of buffering without end. Tokio's channel hands out room first come
//!   first served, so one busy connection cannot starve the others.
//! - At most [`TransportConfig::max_connections`] connections, accepted and
//!   opened together (including ones still in their preamble); further
//!   accepts are closed at once and counted.
//! - Every read has a deadline: the preamble, each frame once its first
//!   byte arrived (a peer dribbling a frame is cut), and silence in both
//!   directions ([`TransportConfig::idle_timeout`]). Writes, connects too.
//!
//! Memory is therefore bounded by about
//! `max_connections × (max_frame_bytes + send_queue_bytes)` plus
//! `incoming_queue_packets × max_frame_bytes` (plus what the caller
//! holds after taking packets off the queue), and is much less unless
//! peers actually send that much data.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use peerstore_core::wire::Addr;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::{timeout, timeout_at, Instant};
use tracing::{debug, warn};

/// First bytes of every connection's preamble.
const MAGIC: &[u8; 6] = b"PSNET1";
const ROLE_NODE: u8 = 0;
const ROLE_CLIENT: u8 = 1;
/// Magic, role, and the longest socket address text
/// (`[fe80:ffff:ffff:ffff:ffff:ffff:ffff:ffff%4294967295]:65535` is 59).
const PREAMBLE_MAX_BYTES: usize = MAGIC.len() + 1 + 64;
/// The smallest step in which a frame's buffer grows.
const READ_CHUNK_BYTES: usize = 64 * 1024;
const READ_BUFFER_BYTES: usize = 16 * 1024;
const WRITE_BUFFER_BYTES: usize = 16 * 1024;
/// Addresses of closed client connections remembered, so that a late
/// reply to one is dropped instead of dialling a client's ephemeral port.
const GONE_CLIENTS_MAX: usize = 4096;
/// Pause after a failed accept (out of file descriptors, say) so the loop
/// does not spin while the condition lasts.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// Limits and timeouts. Every field has a default; see [`Default`].
#[derive(Clone, Debug)]
pub struct TransportConfig {
    /// Largest packet, either way. Blocks are up to 1 MiB and travel
    /// inside encrypted session frames, hence 2 MiB + 64 KiB.
    pub max_frame_bytes: usize,
    /// Most connections at once, accepted and opened together.
    pub max_connections: usize,
    /// Most packets waiting to be written on one connection.
    pub send_queue_packets: usize,
    /// Most bytes waiting to be written on one connection (one packet is
    /// always let into an empty queue, whatever its size).
    pub send_queue_bytes: usize,
    /// Capacity of the channel of [`NetEvent`]s to the node.
    pub incoming_queue_packets: usize,
    /// How long an accepted connection has to send its preamble.
    pub preamble_timeout: Duration,
    /// How long a frame may take to arrive once its first byte has.
    pub frame_read_timeout: Duration,
    /// A connection with no complete frame in either direction for this
    /// long is closed.
    pub idle_timeout: Duration,
    /// How long opening a connection may take.
    pub connect_timeout: Duration,
    /// How long writing one frame may take (a peer that stops reading).
    pub write_timeout: Duration,
    /// The address a node declares to peers; `None` means the address it
    /// is bound to, which must then not be unspecified (`0.0.0.0`).
    /// Unused by a client transport.
    pub advertise_addr: Option<SocketAddr>,
}

impl Default for TransportConfig {
    /// 2 MiB + 64 KiB frames; 1024 connections; 64 packets or 4 MiB queued
    /// per connection; 128 events queued for the node; 5 s preamble and
    /// connect, 30 s per frame and per write, 5 min idle.
    fn default() -> TransportConfig {
        TransportConfig {
            max_frame_bytes: 2 * 1024 * 1024 + 64 * 1024,
            max_connections: 1024,
            send_queue_packets: 64,
            send_queue_bytes: 4 * 1024 * 1024,
            incoming_queue_packets: 128,
            preamble_timeout: Duration::from_secs(5),
            frame_read_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(5 * 60),
            connect_timeout: Duration::from_secs(5),
            write_timeout: Duration::from_secs(30),
            advertise_addr: None,
        }
    }
}

impl TransportConfig {
    fn validate(&self) -> io::Result<()> {
        let bad = |what: &str| Err(io::Error::new(io::ErrorKind::InvalidInput, what.to_owned()));
        if self.max_frame_bytes == 0 || u32::try_from(self.max_frame_bytes).is_err() {
            return bad("max_frame_bytes must be between 1 and 2^32 - 1");
        }
        if self.max_connections == 0 || self.max_connections > Semaphore::MAX_PERMITS {
            return bad("max_connections must be at least 1");
        }
        if self.send_queue_packets == 0 || self.incoming_queue_packets == 0 {
            return bad("send_queue_packets and incoming_queue_packets must be at least 1");
        }
        Ok(())
    }
}

/// What the transport tells the node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetEvent {
    /// A packet arrived from `from` (see the module docs for what the
    /// address means).
    Packet { from: Addr, bytes: Vec<u8> },
    /// A connection to or from `peer` closed, or could not be opened.
    /// Packets in flight on it may be lost: reset the peer's link state.
    Closed { peer: Addr },
}

/// Why [`Transport::send`] dropped a packet. Every case is counted in
/// [`TransportStats::dropped`]; none needs handling beyond that, since the
/// link layer retransmits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    #[error("packet of {len} bytes is over the {max}-byte frame limit")]
    TooLarge { len: usize, max: usize },
    #[error("the connection's send queue is full")]
    QueueFull,
    #[error("the connection is closing")]
    Closing,
    #[error("no route: not a TCP address, or a client connection that has closed")]
    NoRoute,
    #[error("at the connection limit; cannot open another")]
    ConnectionLimit,
    #[error("the transport has shut down")]
    ShutDown,
}

/// Counters since the transport started (a snapshot).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TransportStats {
    /// Connections held now, accepted and opened, including ones still in
    /// their preamble.
    pub connections_open: usize,
    /// TCP connections accepted (before their preamble was checked).
    pub accepted: u64,
    /// Accepts closed at once because of `max_connections`.
    pub refused: u64,
    /// Accepted connections whose preamble was malformed or not allowed.
    pub preamble_rejected: u64,
    /// Connections opened by us (preamble sent).
    pub connected: u64,
    /// Connections we failed to open (refused, unreachable, timed out).
    pub connect_failed: u64,
    pub frames_in: u64,
    pub frames_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Packets [`Transport::send`] did not queue.
    pub dropped: u64,
    /// Connections closed for announcing a frame over `max_frame_bytes`.
    pub oversized: u64,
    pub preamble_timeouts: u64,
    /// Connections cut because a started frame took too long.
    pub frame_timeouts: u64,
    pub idle_timeouts: u64,
    pub write_timeouts: u64,
}

#[derive(Default)]
struct Counters {
    accepted: AtomicU64,
    refused: AtomicU64,
    preamble_rejected: AtomicU64,
    connected: AtomicU64,
    connect_failed: AtomicU64,
    frames_in: AtomicU64,
    frames_out: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    dropped: AtomicU64,
    oversized: AtomicU64,
    preamble_timeouts: AtomicU64,
    frame_timeouts: AtomicU64,
    idle_timeouts: AtomicU64,
    write_timeouts: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// What this machine is on the wire.
#[derive(Clone, Copy, Debug)]
enum Role {
    /// Listens; declares this address in its preamble.
    Node(SocketAddr),
    /// Does not listen.
    Client,
}

impl Role {
    fn preamble(self) -> Vec<u8> {
        let mut bytes = MAGIC.to_vec();
        match self {
            Role::Node(addr) => {
                bytes.push(ROLE_NODE);
                bytes.extend_from_slice(addr.to_string().as_bytes());
            }
            Role::Client => bytes.push(ROLE_CLIENT),
        }
        debug_assert!(bytes.len() <= PREAMBLE_MAX_BYTES);
        bytes
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
enum PreambleError {
    #[error("bad magic")]
    Magic,
    #[error("unknown role")]
    Role,
    #[error("bad listen address")]
    Address,
}

/// The declared listen address of a node, or `None` for a client.
fn parse_preamble(body: &[u8]) -> Result<Option<SocketAddr>, PreambleError> {
    let rest = body.strip_prefix(MAGIC).ok_or(PreambleError::Magic)?;
    match rest.split_first() {
        Some((&ROLE_CLIENT, [])) => Ok(None),
        Some((&ROLE_NODE, text)) => {
            let addr: SocketAddr = std::str::from_utf8(text)
                .ok()
                .and_then(|t| t.parse().ok())
                .ok_or(PreambleError::Address)?;
            if addr.port() == 0 || addr.ip().is_unspecified() || addr.ip().is_multicast() {
                return Err(PreambleError::Address);
            }
            Ok(Some(addr))
        }
        _ => Err(PreambleError::Role),
    }
}

/// Why a connection ended.
#[derive(Debug)]
enum Close {
    /// The peer closed between frames.
    Eof,
    Io(io::ErrorKind),
    Oversized(usize),
    FrameTimeout,
    IdleTimeout,
    WriteTimeout,
    /// Our side let go of the connection (shutdown, or a newer connection
    /// from the same address took its place).
    Released,
    /// The node dropped its event receiver.
    NodeGone,
}

impl std::fmt::Display for Close {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Close::Eof => write!(f, "closed by the peer"),
            Close::Io(kind) => write!(f, "i/o error: {kind}"),
            Close::Oversized(len) => write!(f, "announced a {len}-byte frame"),
            Close::FrameTimeout => write!(f, "frame not received in time"),
            Close::IdleTimeout => write!(f, "idle"),
            Close::WriteTimeout => write!(f, "peer not reading"),
            Close::Released => write!(f, "released"),
            Close::NodeGone => write!(f, "node no longer taking events"),
        }
    }
}

/// Our handle on a live connection: where [`Transport::send`] queues.
struct Conn {
    id: u64,
    tx: mpsc::Sender<Vec<u8>>,
    queued_bytes: Arc<AtomicUsize>,
    /// An accepted client connection (its address is not dialable).
    client: bool,
    /// The remote host of an accepted connection.
    remote_ip: Option<IpAddr>,
}

/// Whether a new accepted connection from host `remote` may take the
/// place of `old`, the live accepted connection with the same
/// from-address; `declared` is the new one's declared listen address
/// (`None` for a client). A client's address is a fact, its socket
/// address, so it always may. A node's is a claim: it may replace a node
/// connection from the same host (a restart, or a reconnect before we saw
/// the old connection die), or claim an address of the host it connects
/// from, but not take over another host's address.
fn may_replace(old: &Conn, remote: IpAddr, declared: Option<SocketAddr>) -> bool {
    match declared {
        None => true,
        Some(declared) => !old.client && (old.remote_ip == Some(remote) || declared.ip() == remote),
    }
}

impl Conn {
    fn enqueue(&self, cfg: &TransportConfig, bytes: Vec<u8>) -> Result<(), SendError> {
        let len = bytes.len();
        let before = self.queued_bytes.fetch_add(len, Ordering::Relaxed);
        if before > 0 && before + len > cfg.send_queue_bytes {
            self.queued_bytes.fetch_sub(len, Ordering::Relaxed);
            return Err(SendError::QueueFull);
        }
        match self.tx.try_send(bytes) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.queued_bytes.fetch_sub(len, Ordering::Relaxed);
                Err(match e {
                    mpsc::error::TrySendError::Full(_) => SendError::QueueFull,
                    mpsc::error::TrySendError::Closed(_) => SendError::Closing,
                })
            }
        }
    }
}

/// The other end of a [`Conn`]: what the connection's task drains.
struct ConnQueue {
    id: u64,
    rx: mpsc::Receiver<Vec<u8>>,
    queued_bytes: Arc<AtomicUsize>,
}

#[derive(Clone, Copy, Debug)]
enum Dir {
    Outgoing,
    Accepted,
}

#[derive(Default)]
struct State {
    outgoing: HashMap<Addr, Conn>,
    accepted: HashMap<Addr, Conn>,
    gone_clients: VecDeque<Addr>,
    gone_client_set: HashSet<Addr>,
    shut_down: bool,
}

impl State {
    fn map(&mut self, dir: Dir) -> &mut HashMap<Addr, Conn> {
        match dir {
            Dir::Outgoing => &mut self.outgoing,
            Dir::Accepted => &mut self.accepted,
        }
    }

    fn remember_gone_client(&mut self, addr: Addr) {
        if self.gone_client_set.insert(addr) {
            self.gone_clients.push_back(addr);
            if self.gone_clients.len() > GONE_CLIENTS_MAX {
                if let Some(old) = self.gone_clients.pop_front() {
                    self.gone_client_set.remove(&old);
                }
            }
        }
    }
}

struct Shared {
    cfg: TransportConfig,
    role: Role,
    runtime: Handle,
    events: mpsc::Sender<NetEvent>,
    /// One permit per connection, held by its task until the end.
    permits: Arc<Semaphore>,
    state: Mutex<State>,
    counters: Counters,
    next_id: AtomicU64,
    /// Origin of the per-connection activity clocks.
    epoch: Instant,
}

impl Shared {
    fn new(cfg: TransportConfig, role: Role) -> (Arc<Shared>, mpsc::Receiver<NetEvent>) {
        let (events, rx) = mpsc::channel(cfg.incoming_queue_packets);
        let shared = Arc::new(Shared {
            permits: Arc::new(Semaphore::new(cfg.max_connections)),
            cfg,
            role,
            runtime: Handle::current(),
            events,
            state: Mutex::new(State::default()),
            counters: Counters::default(),
            next_id: AtomicU64::new(0),
            epoch: Instant::now(),
        });
        (shared, rx)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // The lock is never held across a panic point that leaves the maps
        // inconsistent, so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn new_conn(&self, client: bool, remote_ip: Option<IpAddr>) -> (Conn, ConnQueue) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(self.cfg.send_queue_packets);
        let queued_bytes = Arc::new(AtomicUsize::new(0));
        let conn = Conn {
            id,
            tx,
            queued_bytes: queued_bytes.clone(),
            client,
            remote_ip,
        };
        (
            conn,
            ConnQueue {
                id,
                rx,
                queued_bytes,
            },
        )
    }

    fn send(self: &Arc<Self>, to: Addr, bytes: Vec<u8>) -> Result<(), SendError> {
        if bytes.len() > self.cfg.max_frame_bytes {
            return Err(SendError::TooLarge {
                len: bytes.len(),
                max: self.cfg.max_frame_bytes,
            });
        }
        let mut state = self.state();
        if state.shut_down {
            return Err(SendError::ShutDown);
        }
        if let Some(conn) = state.outgoing.get(&to) {
            return conn.enqueue(&self.cfg, bytes);
        }
        if let Some(conn) = state.accepted.get(&to) {
            return conn.enqueue(&self.cfg, bytes);
        }
        if state.gone_client_set.contains(&to) {
            return Err(SendError::NoRoute);
        }
        let Some(socket) = to.socket() else {
            return Err(SendError::NoRoute);
        };
        let permit = self
            .permits
            .clone()
            .try_acquire_owned()
            .map_err(|_| SendError::ConnectionLimit)?;
        let (conn, queue) = self.new_conn(false, None);
        conn.enqueue(&self.cfg, bytes)?;
        state.outgoing.insert(to, conn);
        drop(state);
        self.runtime
            .spawn(self.clone().dial(to, socket, queue, permit));
        Ok(())
    }

    /// Opens a connection that [`Shared::send`] registered, then serves it.
    async fn dial(
        self: Arc<Self>,
        peer: Addr,
        socket: SocketAddr,
        queue: ConnQueue,
        permit: OwnedSemaphorePermit,
    ) {
        match timeout(self.cfg.connect_timeout, TcpStream::connect(socket)).await {
            Ok(Ok(stream)) => self.serve_outgoing(stream, peer, queue, permit).await,
            Ok(Err(e)) => {
                bump(&self.counters.connect_failed);
                debug!(?peer, error = %e, "connect failed");
                self.finish(Dir::Outgoing, peer, queue.id, permit).await;
            }
            Err(_) => {
                bump(&self.counters.connect_failed);
                debug!(?peer, "connect timed out");
                self.finish(Dir::Outgoing, peer, queue.id, permit).await;
            }
        }
    }

    async fn serve_outgoing(
        self: Arc<Self>,
        mut stream: TcpStream,
        peer: Addr,
        mut queue: ConnQueue,
        permit: OwnedSemaphorePermit,
    ) {
        // Small request/reply packets must not wait for Nagle.
        let _ = stream.set_nodelay(true);
        let preamble = self.role.preamble();
        match timeout(
            self.cfg.write_timeout,
            write_frame(&mut stream, &preamble, true),
        )
        .await
        {
            Ok(Ok(())) => {
                bump(&self.counters.connected);
                debug!(?peer, "connected");
                self.run(stream, peer, &mut queue).await;
            }
            Ok(Err(e)) => debug!(?peer, error = %e, "preamble not sent"),
            Err(_) => {
                bump(&self.counters.write_timeouts);
                debug!(?peer, "preamble not sent in time");
            }
        }
        self.finish(Dir::Outgoing, peer, queue.id, permit).await;
    }

    async fn accept_loop(self: Arc<Self>, listener: TcpListener) {
        loop {
            match listener.accept().await {
                Ok((stream, remote)) => match self.permits.clone().try_acquire_owned() {
                    Ok(permit) => {
                        bump(&self.counters.accepted);
                        tokio::spawn(self.clone().serve_accepted(stream, remote, permit));
                    }
                    Err(_) => {
                        bump(&self.counters.refused);
                        debug!(%remote, "refused a connection: at max_connections");
                    }
                },
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                }
            }
        }
    }

    async fn serve_accepted(
        self: Arc<Self>,
        mut stream: TcpStream,
        remote: SocketAddr,
        permit: OwnedSemaphorePermit,
    ) {
        let _ = stream.set_nodelay(true);
        let deadline = Instant::now() + self.cfg.preamble_timeout;
        let body = match read_frame(&mut stream, None, deadline, PREAMBLE_MAX_BYTES).await {
            Ok(body) => body,
            Err(Close::FrameTimeout) => {
                bump(&self.counters.preamble_timeouts);
                debug!(%remote, "no preamble in time");
                return;
            }
            Err(close) => {
                bump(&self.counters.preamble_rejected);
                debug!(%remote, %close, "preamble not read");
                return;
            }
        };
        let declared = match parse_preamble(&body) {
            Ok(declared) => declared,
            Err(e) => {
                bump(&self.counters.preamble_rejected);
                debug!(%remote, error = %e, "preamble refused");
                return;
            }
        };
        let client = declared.is_none();
        let from = Addr::from(declared.unwrap_or(remote));
        let (conn, mut queue) = self.new_conn(client, Some(remote.ip()));
        let replaced = {
            let mut state = self.state();
            if state.shut_down {
                return;
            }
            if let Some(old) = state.accepted.get(&from) {
                if !may_replace(old, remote.ip(), declared) {
                    drop(state);
                    bump(&self.counters.preamble_rejected);
                    debug!(%remote, peer = ?from, "declared an address another host holds");
                    return;
                }
            }
            if client {
                state.gone_client_set.remove(&from);
            }
            state.accepted.insert(from, conn).is_some()
        };
        if replaced {
            // The older connection from this address is released without
            // reporting its own close: report it here, before any packet of
            // the new one, so a reset cannot land in the new session.
            debug!(peer = ?from, "a new connection replaces the one from the same address");
            let _ = self.events.send(NetEvent::Closed { peer: from }).await;
        }
        debug!(%remote, peer = ?from, "accepted");
        self.run(stream, from, &mut queue).await;
        self.finish(Dir::Accepted, from, queue.id, permit).await;
    }

    /// Serves an established connection until either direction ends.
    async fn run(&self, mut stream: TcpStream, peer: Addr, queue: &mut ConnQueue) {
        let activity_ms = AtomicU64::new(self.now_ms());
        let (read, write) = stream.split();
        let reader = self.read_loop(
            BufReader::with_capacity(READ_BUFFER_BYTES, read),
            peer,
            &activity_ms,
        );
        let writer = self.write_loop(write, queue, &activity_ms);
        let close = tokio::select! {
            close = reader => close,
            close = writer => close,
        };
        // Counted before the socket closes, so whoever sees the close can
        // also see why.
        self.note_close(peer, &close);
    }

    async fn read_loop<R: AsyncRead + Unpin>(
        &self,
        mut read: R,
        from: Addr,
        activity_ms: &AtomicU64,
    ) -> Close {
        loop {
            // Wait for the next frame's first byte as long as the
            // connection is active in either direction.
            let first = loop {
                let idle_at = self.at(activity_ms.load(Ordering::Relaxed)) + self.cfg.idle_timeout;
                match timeout_at(idle_at, read.read_u8()).await {
                    Ok(Ok(byte)) => break byte,
                    Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => return Close::Eof,
                    Ok(Err(e)) => return Close::Io(e.kind()),
                    Err(_) => {
                        let idle_at =
                            self.at(activity_ms.load(Ordering::Relaxed)) + self.cfg.idle_timeout;
                        if idle_at <= Instant::now() {
                            return Close::IdleTimeout;
                        }
                    }
                }
            };
            let deadline = Instant::now() + self.cfg.frame_read_timeout;
            let bytes = match read_frame(&mut read, Some(first), deadline, self.cfg.max_frame_bytes)
                .await
            {
                Ok(bytes) => bytes,
                Err(close) => return close,
            };
            activity_ms.store(self.now_ms(), Ordering::Relaxed);
            bump(&self.counters.frames_in);
            self.counters
                .bytes_in
                .fetch_add(bytes.len() as u64, Ordering::Relaxed);
            // Waiting here is the backpressure: this connection is not
            // read again until the node has room for its packet.
            if self
                .events
                .send(NetEvent::Packet { from, bytes })
                .await
                .is_err()
            {
                return Close::NodeGone;
            }
        }
    }

    async fn write_loop<W: AsyncWrite + Unpin>(
        &self,
        write: W,
        queue: &mut ConnQueue,
        activity_ms: &AtomicU64,
    ) -> Close {
        let mut write = BufWriter::with_capacity(WRITE_BUFFER_BYTES, write);
        while let Some(bytes) = queue.rx.recv().await {
            queue.queued_bytes.fetch_sub(bytes.len(), Ordering::Relaxed);
            // Flush only when nothing else is waiting, so a burst of small
            // packets leaves in few segments.
            let flush = queue.rx.is_empty();
            match timeout(
                self.cfg.write_timeout,
                write_frame(&mut write, &bytes, flush),
            )
            .await
            {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Close::Io(e.kind()),
                Err(_) => return Close::WriteTimeout,
            }
            activity_ms.store(self.now_ms(), Ordering::Relaxed);
            bump(&self.counters.frames_out);
            self.counters
                .bytes_out
                .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        }
        // Released: everything queued has been written; say goodbye.
        let _ = timeout(self.cfg.write_timeout, async {
            write.flush().await?;
            write.shutdown().await
        })
        .await;
        Close::Released
    }

    fn note_close(&self, peer: Addr, close: &Close) {
        let counter = match close {
            Close::Oversized(_) => &self.counters.oversized,
            Close::FrameTimeout => &self.counters.frame_timeouts,
            Close::IdleTimeout => &self.counters.idle_timeouts,
            Close::WriteTimeout => &self.counters.write_timeouts,
            Close::Eof | Close::Io(_) | Close::Released | Close::NodeGone => {
                debug!(?peer, %close, "connection closed");
                return;
            }
        };
        bump(counter);
        debug!(?peer, %close, "connection cut");
    }

    /// Forgets connection `id` if it is still the one registered for
    /// `peer`, and reports the close. The permit is held until the report
    /// is delivered, so a node that stops taking events also stops
    /// accumulating closed connections.
    async fn finish(&self, dir: Dir, peer: Addr, id: u64, permit: OwnedSemaphorePermit) {
        let removed = {
            let mut state = self.state();
            let map = state.map(dir);
            if map.get(&peer).is_some_and(|c| c.id == id) {
                let conn = map.remove(&peer);
                if conn.is_some_and(|c| c.client) {
                    state.remember_gone_client(peer);
                }
                true
            } else {
                false
            }
        };
        if removed {
            let _ = self.events.send(NetEvent::Closed { peer }).await;
        }
        drop(permit);
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn at(&self, ms: u64) -> Instant {
        self.epoch + Duration::from_millis(ms)
    }

    fn stats(&self) -> TransportStats {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        TransportStats {
            connections_open: self.cfg.max_connections - self.permits.available_permits(),
            accepted: get(&c.accepted),
            refused: get(&c.refused),
            preamble_rejected: get(&c.preamble_rejected),
            connected: get(&c.connected),
            connect_failed: get(&c.connect_failed),
            frames_in: get(&c.frames_in),
            frames_out: get(&c.frames_out),
            bytes_in: get(&c.bytes_in),
            bytes_out: get(&c.bytes_out),
            dropped: get(&c.dropped),
            oversized: get(&c.oversized),
            preamble_timeouts: get(&c.preamble_timeouts),
            frame_timeouts: get(&c.frame_timeouts),
            idle_timeouts: get(&c.idle_timeouts),
            write_timeouts: get(&c.write_timeouts),
        }
    }

    fn shut_down(&self) {
        let mut state = self.state();
        state.shut_down = true;
        // Dropping the senders lets each connection write what it has
        // queued, then close.
        state.outgoing.clear();
        state.accepted.clear();
    }
}

/// Reads one frame whose first length byte may already have been read,
/// all of it by `deadline`. The body buffer grows as bytes arrive, never
/// ahead of them by more than three times what it already holds (or one
/// chunk).
async fn read_frame<R: AsyncRead + Unpin>(
    read: &mut R,
    first: Option<u8>,
    deadline: Instant,
    max_bytes: usize,
) -> Result<Vec<u8>, Close> {
    let work = async {
        let mut header = [0u8; 4];
        let rest = match first {
            Some(byte) => {
                header[0] = byte;
                &mut header[1..]
            }
            None => &mut header[..],
        };
        read.read_exact(rest)
            .await
            .map_err(|e| Close::Io(e.kind()))?;
        let len = u32::from_be_bytes(header) as usize;
        if len > max_bytes {
            return Err(Close::Oversized(len));
        }
        // Room grows with what arrives (a peer that claims a large frame
        // and sends nothing holds little), four times over each time it
        // fills: a 1 MiB frame is moved twice (64 KiB, then 256 KiB) on
        // its way in, where doubling moved it four times; a peer holds at
        // most four times what it sent. The bytes are read straight into
        // the spare room, never zeroed first.
        let mut bytes: Vec<u8> = Vec::new();
        while bytes.len() < len {
            if bytes.len() == bytes.capacity() {
                let grown = (bytes.len() * 4).clamp(READ_CHUNK_BYTES.min(len), len);
                bytes.reserve_exact(grown - bytes.len());
            }
            let want = (bytes.capacity().min(len) - bytes.len()) as u64;
            let n = (&mut *read)
                .take(want)
                .read_buf(&mut bytes)
                .await
                .map_err(|e| Close::Io(e.kind()))?;
            if n == 0 {
                return Err(Close::Io(io::ErrorKind::UnexpectedEof));
            }
        }
        Ok(bytes)
    };
    timeout_at(deadline, work)
        .await
        .unwrap_or(Err(Close::FrameTimeout))
}

async fn write_frame<W: AsyncWrite + Unpin>(
    write: &mut W,
    bytes: &[u8],
    flush: bool,
) -> io::Result<()> {
    // Callers check the length against max_frame_bytes, which fits a u32.
    let len = u32::try_from(bytes.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "frame over 4 GiB"))?;
    write.write_all(&len.to_be_bytes()).await?;
    write.write_all(bytes).await?;
    if flush {
        write.flush().await?;
    }
    Ok(())
}

/// A TCP transport for one machine: a node (listening) or a client.
///
/// Dropping it shuts it down (see [`Transport::shutdown`]).
pub struct Transport {
    shared: Arc<Shared>,
    listener: Option<(SocketAddr, JoinHandle<()>)>,
}

impl Transport {
    /// Listens on `listen` (port 0 picks a free port) as a node. Must be
    /// called within a Tokio runtime. Returns the transport and the
    /// channel of what arrives; keep taking from it, since a full channel
    /// stops reading from peers.
    pub async fn bind(
        listen: SocketAddr,
        cfg: TransportConfig,
    ) -> io::Result<(Transport, mpsc::Receiver<NetEvent>)> {
        cfg.validate()?;
        let listener = TcpListener::bind(listen).await?;
        let local = listener.local_addr()?;
        let advertised = cfg.advertise_addr.unwrap_or(local);
        if advertised.ip().is_unspecified() || advertised.port() == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{advertised} cannot be dialled by peers: set advertise_addr to the address they should use"
                ),
            ));
        }
        let (shared, events) = Shared::new(cfg, Role::Node(advertised));
        let accept = tokio::spawn(shared.clone().accept_loop(listener));
        debug!(%local, %advertised, "listening");
        Ok((
            Transport {
                shared,
                listener: Some((local, accept)),
            },
            events,
        ))
    }

    /// A client transport, with no listener, connected to `node`. Packets
    /// to `Addr::Tcp(node)` use this connection (reopened on demand if it
    /// closes); replies arrive from `Addr::Tcp(node)`. Fails if `node`
    /// cannot be reached within the connect timeout.
    pub async fn connect_as_client(
        node: SocketAddr,
        cfg: TransportConfig,
    ) -> io::Result<(Transport, mpsc::Receiver<NetEvent>)> {
        cfg.validate()?;
        let (shared, events) = Shared::new(cfg, Role::Client);
        let stream = timeout(shared.cfg.connect_timeout, TcpStream::connect(node))
            .await
            .map_err(|_| {
                io::Error::new(io::ErrorKind::TimedOut, format!("connecting to {node}"))
            })??;
        let permit = shared
            .permits
            .clone()
            .try_acquire_owned()
            .map_err(|_| io::Error::other("no connection allowed (max_connections)"))?;
        let peer = Addr::from(node);
        let (conn, queue) = shared.new_conn(false, None);
        shared.state().outgoing.insert(peer, conn);
        tokio::spawn(shared.clone().serve_outgoing(stream, peer, queue, permit));
        Ok((
            Transport {
                shared,
                listener: None,
            },
            events,
        ))
    }

    /// The address the listener is bound to (`None` for a client).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.as_ref().map(|(addr, _)| *addr)
    }

    /// The address this node declares to peers, which they report its
    /// packets as coming from (`None` for a client).
    pub fn advertised(&self) -> Option<Addr> {
        match self.shared.role {
            Role::Node(addr) => Some(Addr::from(addr)),
            Role::Client => None,
        }
    }

    /// Queues `bytes` for `to` and returns at once; never waits on a peer.
    /// Routing: the connection we opened to `to`, else the accepted one
    /// from `to`, else a new connection (opened in the background; a
    /// failure is reported as [`NetEvent::Closed`]). An error means the
    /// packet was dropped (and counted).
    pub fn send(&self, to: Addr, bytes: Vec<u8>) -> Result<(), SendError> {
        let sent = self.shared.send(to, bytes);
        if let Err(e) = &sent {
            bump(&self.shared.counters.dropped);
            debug!(peer = ?to, error = %e, "packet dropped");
        }
        sent
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> TransportStats {
        self.shared.stats()
    }

    /// Stops accepting, refuses further sends, and lets every connection
    /// write what it has queued and close. Idempotent.
    pub fn shutdown(&self) {
        if let Some((_, accept)) = &self.listener {
            accept.abort();
        }
        self.shared.shut_down();
    }
}

impl Drop for Transport {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field("role", &self.shared.role)
            .field("local_addr", &self.local_addr())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(body: &[u8]) -> Vec<u8> {
        let mut bytes = (body.len() as u32).to_be_bytes().to_vec();
        bytes.extend_from_slice(body);
        bytes
    }

    #[test]
    fn preambles_round_trip() {
        let addr: SocketAddr = "192.0.2.7:4000".parse().unwrap();
        assert_eq!(parse_preamble(&Role::Node(addr).preamble()), Ok(Some(addr)));
        assert_eq!(parse_preamble(&Role::Client.preamble()), Ok(None));
        let v6: SocketAddr = "[fe80:ffff:ffff:ffff:ffff:ffff:ffff:ffff%4294967295]:65535"
            .parse()
            .unwrap();
        let longest = Role::Node(v6).preamble();
        assert!(longest.len() <= PREAMBLE_MAX_BYTES, "{}", longest.len());
        assert_eq!(parse_preamble(&longest), Ok(Some(v6)));
    }

    #[test]
    fn bad_preambles_are_refused() {
        let refused: &[(&[u8], PreambleError)] = &[
            (b"", PreambleError::Magic),
            (b"PSNET2\x01", PreambleError::Magic),
            (b"PSNET1", PreambleError::Role),
            (b"PSNET1\x07", PreambleError::Role),
            (b"PSNET1\x01extra", PreambleError::Role),
            (b"PSNET1\x00", PreambleError::Address),
            (b"PSNET1\x00not an address", PreambleError::Address),
            (b"PSNET1\x00127.0.0.1:0", PreambleError::Address),
            (b"PSNET1\x000.0.0.0:4000", PreambleError::Address),
            (b"PSNET1\x00224.0.0.1:4000", PreambleError::Address),
            (b"PSNET1\x00\xff\xfe", PreambleError::Address),
        ];
        for (body, error) in refused {
            assert_eq!(parse_preamble(body), Err(*error), "{body:?}");
        }
    }

    #[test]
    fn only_the_same_host_takes_over_a_node_address() {
        let (tx, _rx) = mpsc::channel(1);
        let conn = |client: bool, ip: &str| Conn {
            id: 0,
            tx: tx.clone(),
            queued_bytes: Arc::new(AtomicUsize::new(0)),
            client,
            remote_ip: Some(ip.parse().unwrap()),
        };
        let host: IpAddr = "192.0.2.1".parse().unwrap();
        let stranger: IpAddr = "198.51.100.9".parse().unwrap();
        let nat: IpAddr = "203.0.113.5".parse().unwrap();
        let declared: SocketAddr = "192.0.2.1:4000".parse().unwrap();
        let node_there = conn(false, "192.0.2.1");
        let node_behind_nat = conn(false, "203.0.113.5");
        let client_there = conn(true, "192.0.2.1");
        // A restart from the same host, or the host whose address it is.
        assert!(may_replace(&node_there, host, Some(declared)));
        assert!(may_replace(&node_behind_nat, host, Some(declared)));
        assert!(may_replace(&node_behind_nat, nat, Some(declared)));
        // A stranger claiming someone else's address.
        assert!(!may_replace(&node_there, stranger, Some(declared)));
        // A node never displaces a live client; a client always may.
        assert!(!may_replace(&client_there, host, Some(declared)));
        assert!(may_replace(&node_there, stranger, None));
    }

    #[tokio::test]
    async fn frames_are_read_whole_and_bounded() {
        let far = Instant::now() + Duration::from_secs(10);
        let mut bytes = frame(b"hello");
        bytes.extend(frame(&[7; 200_000]));
        let mut read = &bytes[..];
        assert_eq!(
            read_frame(&mut read, None, far, 200_000).await.unwrap(),
            b"hello"
        );
        let big = read_frame(&mut read, None, far, 200_000).await.unwrap();
        assert_eq!(big, vec![7; 200_000]);
        assert_eq!(big.capacity(), 200_000);

        let oversized = frame(&[0; 11]);
        assert!(matches!(
            read_frame(&mut &oversized[..], None, far, 10).await,
            Err(Close::Oversized(11))
        ));
        let cut = &frame(b"hello")[..6];
        assert!(matches!(
            read_frame(&mut &cut[..], None, far, 10).await,
            Err(Close::Io(io::ErrorKind::UnexpectedEof))
        ));
        // The first length byte already taken by the idle wait.
        let whole = frame(b"abc");
        assert_eq!(
            read_frame(&mut &whole[1..], Some(whole[0]), far, 10)
                .await
                .unwrap(),
            b"abc"
        );
    }

    #[tokio::test]
    async fn a_stalled_frame_times_out() {
        let (mut near, far) = tokio::io::duplex(64);
        near.write_all(&[0, 0, 0, 5, 1]).await.unwrap();
        let mut far = far;
        let deadline = Instant::now() + Duration::from_millis(50);
        assert!(matches!(
            read_frame(&mut far, None, deadline, 10).await,
            Err(Close::FrameTimeout)
        ));
        drop(near);
    }
}
