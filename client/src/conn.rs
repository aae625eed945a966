//! A client's connections to the ring: secure client sessions
//! ([`Links::client`]) over TCP, on which signed requests go out and answers
//! come back, many in flight at once.
//!
//! It starts with the entry node (`--node`). [`NodeClient::spread`] then
//! opens sessions to a few more nodes the entry names (its successors,
//! predecessor and fingers), and every put or get goes to the node nearest
//! its key: usually a replica itself, so a block crosses one hop instead of
//! two, and the work of taking blocks in is shared between nodes instead of
//! all falling on the entry. A node other than the entry that fails or stops
//! answering is dropped and its calls are sent again through the entry, so
//! losing it costs time, not the command.
//!
//! The node's ring id (which every signed request names, so that a request
//! captured on its way to one node cannot be replayed to another) is
//! learned from the session itself: the handshake proves the node's key,
//! and the id derives from it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use peerstore_core::endorse::TrustStore;
use peerstore_core::gate::{ClientOp, ClientRequest, GateReply, RingStatus, KEYS_PAGE};
use peerstore_core::link::{LinkConfig, Links};
use peerstore_core::reqauth::BATCH_MAX;
use peerstore_core::{Addr, Id, Item, Peer, Signer};
use peerstore_net::transport::{NetEvent, Transport, TransportConfig};
use rand::rngs::OsRng;
use rand::RngCore;
use tokio::sync::mpsc;

/// Calls in flight at most, queued or on the wire, across all the nodes
/// the client talks to. Callers bound the bytes in flight themselves.
pub const WINDOW: usize = 128;

/// Calls on the wire to one node at most: a node answers "busy" to more
/// than 64 calls at once on one session (`LinkConfig::client_calls_max`).
/// Calls for a node that has this many wait in the queue. One window for
/// all nodes kept a 1000-file backup waiting on round trips: each node had
/// a third of it.
pub const NODE_WINDOW: usize = 64;

/// Calls signed with one signature at most.
pub const BATCH: usize = BATCH_MAX;

/// While at least this many signed calls are on the wire, waiting for an
/// answer does not sign the calls queued since: they wait for more to join
/// them (an RSA-3072 signature costs about as much CPU as sealing a 1 MiB
/// chunk, so a stream that signed each call as a slot freed up spent a
/// third of its time signing). Below it, the queue goes out at once so the
/// nodes never run dry. One signature covers calls to several nodes: each
/// names its node in its body, and each node checks its own call's place in
/// the signed list.
pub const LOW_WATER: usize = 8;

/// Bytes of block data in the queue that are signed and sent without
/// waiting for the wire to run low. [`LOW_WATER`] counts calls, which suits
/// small ones; but 1 MiB blocks held until fewer than eight calls were on
/// the wire went out 20 MiB or more at a time, after the client had spent
/// a fifth of a second sealing them while the nodes, their work done, sat
/// idle (a sixth of a backup's CPU time went unused that way). Here a
/// signature costs about an eighth of the sealing it covers, and the nodes
/// get new work every few blocks (a third of the block window). 2 and 4 MiB
/// were no faster: more signatures.
pub const BATCH_BYTES: usize = 8 << 20;

/// How long a call may wait for its answer.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// Nodes a client talks to at most, the entry included.
pub const SPREAD_MAX: usize = 4;

/// How long [`NodeClient::spread`] waits for the other nodes to answer.
pub const SPREAD_TIMEOUT: Duration = Duration::from_secs(5);

/// Pages of keys [`NodeClient::keys`] asks for at most: 2^14 full pages
/// are 33 million keys (about 700 MB of ids), far more than a node of this
/// store holds. A node still sending pages past that is taken to be
/// looping, not listing.
pub const KEYS_PAGES_MAX: usize = 1 << 14;

/// One node the client has (or is opening) a session with.
struct Conn {
    addr: Addr,
    /// Its ring id, from its own status answer (requests name it).
    id: Option<Id>,
    /// Dropped after a failure; its calls went to the entry.
    dead: bool,
    /// The nodes after it on the ring, from its status answer: with it,
    /// the replicas of the keys it is the successor of.
    succs: Vec<Peer>,
}

/// A call on the wire.
struct Sent {
    conn: usize,
    at: Instant,
    /// The operation, kept for a call to a node other than the entry so
    /// that it can go again through the entry if that node fails.
    op: Option<ClientOp>,
}

/// The entry's index in [`NodeClient::conns`].
const ENTRY: usize = 0;

/// Connections to the ring.
pub struct NodeClient {
    transport: Transport,
    events: mpsc::Receiver<NetEvent>,
    links: Links,
    user: Signer,
    conns: Vec<Conn>,
    /// Calls waiting to be signed together.
    unsigned: Vec<Queued<ClientOp>>,
    next_id: u64,
    pending: BTreeMap<u64, Sent>,
    answers: BTreeMap<u64, GateReply>,
    /// Copies the ring keeps of each key, as the entry said.
    replicas: usize,
    /// Calls on the wire below which the queue is signed and sent
    /// ([`NodeClient::set_low_water`]).
    low_water: usize,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl NodeClient {
    /// Connects to the node at `node` as `user`, talking only to a node
    /// whose endorsement chain leads to a key in `trust`.
    pub async fn connect(node: SocketAddr, user: Signer, trust: TrustStore) -> Result<NodeClient> {
        let cfg = TransportConfig {
            // Room for a whole window of 1 MiB blocks: a packet dropped
            // from the middle of the session would break it.
            send_queue_packets: 1024,
            send_queue_bytes: 64 << 20,
            ..TransportConfig::default()
        };
        let (transport, events) = Transport::connect_as_client(node, cfg)
            .await
            .with_context(|| {
                format!("cannot reach a node at {node}: is peerstore-node running there? (pick another with --node)")
            })?;
        let links = Links::client(LinkConfig::default(), user.clone(), trust, OsRng.next_u64());
        let mut c = NodeClient {
            transport,
            events,
            links,
            user,
            conns: vec![Conn::new(Addr::from(node))],
            unsigned: Vec::new(),
            next_id: 0,
            pending: BTreeMap::new(),
            answers: BTreeMap::new(),
            replicas: 1,
            low_water: LOW_WATER,
        };
        // The first call opens the session and tells us the node's id.
        let st = c.status().await?;
        c.learn(ENTRY, &st);
        Ok(c)
    }

    /// Opens sessions to up to [`SPREAD_MAX`] - 1 more nodes the entry
    /// knows, so that puts and gets go to the nodes nearest their keys.
    /// Nodes that do not answer within [`SPREAD_TIMEOUT`] (down, or not
    /// endorsed by a key you trust) are left out; the entry alone still
    /// works. Returns how many nodes the client now talks to.
    pub async fn spread(&mut self) -> Result<usize> {
        let st = self.status().await?;
        self.learn(ENTRY, &st);
        if !st.joined {
            return Ok(self.live());
        }
        let mut seen: BTreeSet<Addr> = self.conns.iter().map(|c| c.addr).collect();
        let candidates: Vec<Addr> = st
            .successors
            .iter()
            .chain(st.predecessor.iter())
            .chain(st.fingers.iter())
            .map(|p| p.addr)
            .filter(|a| matches!(a, Addr::Tcp(_)) && seen.insert(*a))
            .take(SPREAD_MAX.saturating_sub(self.conns.len()))
            .collect();
        let mut asked = BTreeMap::new();
        for addr in candidates {
            self.conns.push(Conn::new(addr));
            let at = self.conns.len() - 1;
            let id = self.queue(at, ClientOp::Status);
            asked.insert(id, at);
        }
        self.send_batch()?;
        let until = Instant::now() + SPREAD_TIMEOUT;
        while asked.keys().any(|id| self.pending.contains_key(id)) {
            if !self.pump(Some(until)).await? {
                break;
            }
        }
        for (id, at) in asked {
            match self.answers.remove(&id) {
                Some(GateReply::Status(st)) if st.joined => self.learn(at, &st),
                _ => {
                    // No answer in time, or not in the ring: unused. Its
                    // status call is forgotten, wherever it is (a late
                    // answer is dropped; one moved to the entry when the
                    // node failed is not sent).
                    self.pending.remove(&id);
                    self.unsigned.retain(|(i, _, _)| *i != id);
                    self.conns[at].dead = true;
                    self.links.reset(self.conns[at].addr);
                }
            }
        }
        Ok(self.live())
    }

    /// Nodes the client talks to now.
    pub fn live(&self) -> usize {
        self.conns
            .iter()
            .filter(|c| !c.dead && c.id.is_some())
            .count()
    }

    /// The ring as the entry node sees it.
    pub async fn status(&mut self) -> Result<RingStatus> {
        match self.call(ClientOp::Status).await? {
            GateReply::Status(st) => Ok(*st),
            other => bail!("unexpected answer to a status request: {other:?}"),
        }
    }

    /// Every key the entry node holds, in ascending order, asked for a page
    /// at a time ([`ClientOp::Keys`]) until the node answers an empty page.
    /// A page that is not strictly ascending from the key the request
    /// named, is larger than a page may be, or comes after
    /// [`KEYS_PAGES_MAX`] pages is an error: a misbehaving node cannot keep
    /// the client listing for ever.
    pub async fn keys(&mut self) -> Result<Vec<Id>> {
        let mut keys = Vec::new();
        let mut after = None;
        for _ in 0..KEYS_PAGES_MAX {
            let page = match self.call(ClientOp::Keys { after }).await? {
                GateReply::Keys(page) => page,
                other => bail!("unexpected answer to a keys request: {other:?}"),
            };
            let Some(&last) = page.last() else {
                return Ok(keys);
            };
            if page.len() > KEYS_PAGE {
                bail!(
                    "the node answered a keys request with {} keys, over the page of {KEYS_PAGE}",
                    page.len()
                );
            }
            if !ascending_after(after, &page) {
                bail!("the node answered a keys request with keys not in ascending order after the last page");
            }
            keys.extend(page);
            after = Some(last);
        }
        bail!("the node listed keys past {KEYS_PAGES_MAX} pages without an end")
    }

    /// Sends `op` and waits for its answer.
    pub async fn call(&mut self, op: ClientOp) -> Result<GateReply> {
        let id = self.submit(op).await?;
        self.wait(id).await
    }

    /// Takes in what node `at` said of itself: its id, the nodes after it
    /// and (from the entry) how many copies the ring keeps.
    fn learn(&mut self, at: usize, st: &RingStatus) {
        self.conns[at].id = Some(st.me.id);
        self.conns[at].succs = st.successors.clone();
        if at == ENTRY {
            self.replicas = usize::from(st.replicas.max(1));
        }
    }

    /// The node a call goes to: for a put or get, the least busy of the
    /// key's replicas the client talks to; anything else, the entry.
    ///
    /// The key's primary is taken to be the live node whose id is first at
    /// or after it, and its replicas that node and the next R - 1 machines
    /// on its successor list. Any replica serves a get from its own disk
    /// and takes a put as the primary would, so spreading calls over them
    /// by the calls each has on the wire keeps every node busy (one
    /// primary per key left the node with the widest arc serving most of
    /// a restore while the others idled) and steers around a slow node.
    /// On a tie the primary wins: it alone needs no lookup hop.
    fn route(&self, op: &ClientOp) -> usize {
        let key = match op {
            ClientOp::Put(item) => item.position(),
            ClientOp::Get(key) => *key,
            ClientOp::Status | ClientOp::Keys { .. } => return ENTRY,
        };
        pick_replica(key, &self.conns, self.replicas, |at| self.load(at)).unwrap_or(ENTRY)
    }

    /// Calls queued for or on the wire to node `at`.
    fn load(&self, at: usize) -> usize {
        self.pending.values().filter(|s| s.conn == at).count()
            + self.unsigned.iter().filter(|q| q.1 == at).count()
    }

    /// Queues `op` (waiting for room in the window first); returns the
    /// call id whose answer [`NodeClient::next_answer`] or
    /// [`NodeClient::wait`] gives. Queued calls are signed together, one
    /// signature per batch, when the batch is full (in calls, or in block
    /// bytes: [`BATCH_BYTES`]) or the calls on the wire run low.
    pub async fn submit(&mut self, op: ClientOp) -> Result<u64> {
        while self.in_flight() >= WINDOW {
            // Sign what is queued only when the wire runs low (or the queue
            // is a whole batch): signing at every freed slot would sign
            // one call at a time.
            self.send_low()?;
            self.pump(None).await?;
        }
        let at = self.route(&op);
        let id = self.queue(at, op);
        if batch_due(&self.unsigned) {
            self.send_batch()?;
        }
        Ok(id)
    }

    fn queue(&mut self, at: usize, op: ClientOp) -> u64 {
        self.next_id += 1;
        self.unsigned.push((self.next_id, at, op));
        self.next_id
    }

    /// Signs the queued calls with one signature and sends each to its
    /// node, in the order queued, leaving in the queue those for a node
    /// that has [`NODE_WINDOW`] calls on the wire.
    fn send_batch(&mut self) -> Result<()> {
        if self.unsigned.is_empty() {
            return Ok(());
        }
        let mut wire: Vec<usize> = vec![0; self.conns.len()];
        for s in self.pending.values() {
            wire[s.conn] += 1;
        }
        let (queued, held) = sendable(std::mem::take(&mut self.unsigned), wire);
        self.unsigned = held;
        if queued.is_empty() {
            return Ok(());
        }
        let ops: Vec<(Id, &ClientOp)> = queued
            .iter()
            .map(|(_, at, op)| (self.conns[*at].id.unwrap_or(Id([0; 20])), op))
            .collect();
        let reqs = ClientRequest::batch_to(&self.user, &ops, now_ms(), &mut OsRng);
        for ((id, at, op), req) in queued.into_iter().zip(reqs) {
            self.links.call(now_ms(), self.conns[at].addr, id, &req);
            // A call to a node other than the entry keeps its operation, to
            // go again through the entry if that node fails.
            let op = (at != ENTRY).then_some(op);
            self.pending.insert(
                id,
                Sent {
                    conn: at,
                    at: Instant::now(),
                    op,
                },
            );
        }
        self.flush()?;
        // Anything beyond one signature's reach goes in the next (each
        // round sends at least one call, so this ends).
        self.send_batch()
    }

    /// Sets how few calls on the wire make the queue go out: at least
    /// [`LOW_WATER`], at most [`NODE_WINDOW`]; [`LOW_WATER`] again with
    /// `None`. Eight small calls keep the nodes busy while the next batch
    /// is signed; eight gets of 1 MiB blocks do not (the client spends
    /// about a millisecond taking in each answer, and a node's turn on a
    /// get is shorter than that), so a restore asks for more.
    pub fn set_low_water(&mut self, calls: Option<usize>) {
        self.low_water = calls.map_or(LOW_WATER, |n| n.clamp(LOW_WATER, NODE_WINDOW));
    }

    /// Sends the queue if the calls on the wire ran low or it is full.
    fn send_low(&mut self) -> Result<()> {
        if self.pending.len() < self.low_water || batch_due(&self.unsigned) {
            self.send_batch()?;
        }
        Ok(())
    }

    /// Calls queued or sent and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.pending.len() + self.unsigned.len()
    }

    /// Waits for the answer to call `id`.
    pub async fn wait(&mut self, id: u64) -> Result<GateReply> {
        self.send_batch()?;
        loop {
            if let Some(r) = self.answers.remove(&id) {
                return Ok(r);
            }
            if !self.pending.contains_key(&id) && !self.is_queued(id) {
                bail!("call {id} was never sent");
            }
            if self.pending.is_empty() {
                // Everything left is queued (a failed node's calls moved to
                // the entry): nothing will answer until it is sent.
                self.send_batch()?;
            }
            self.pump(None).await?;
            self.send_low()?;
        }
    }

    fn is_queued(&self, id: u64) -> bool {
        self.unsigned.iter().any(|(i, _, _)| *i == id)
    }

    /// Waits for any answer. Queued calls are signed and sent first if
    /// fewer than [`LOW_WATER`] are on the wire to their node; otherwise
    /// they wait to fill a bigger batch.
    pub async fn next_answer(&mut self) -> Result<(u64, GateReply)> {
        self.send_low()?;
        loop {
            if let Some((&id, _)) = self.answers.iter().next() {
                let r = self.answers.remove(&id).expect("present");
                return Ok((id, r));
            }
            if self.pending.is_empty() {
                if self.in_flight() == 0 {
                    bail!("no call is waiting for an answer");
                }
                self.send_batch()?;
            }
            self.pump(None).await?;
            self.send_low()?;
        }
    }

    fn flush(&mut self) -> Result<()> {
        while let Some(p) = self.links.poll_packet() {
            let dead = self.conns.iter().position(|c| c.addr == p.to && c.dead);
            if dead.is_some() {
                continue;
            }
            if let Err(e) = self.transport.send(p.to, p.bytes) {
                match self.conns.iter().position(|c| c.addr == p.to) {
                    Some(at) if at != ENTRY => self.fail_over(at),
                    _ => bail!("sending to the node failed: {e}"),
                }
            }
        }
        Ok(())
    }

    /// Drops node `at` (not the entry) and queues its calls for the entry.
    fn fail_over(&mut self, at: usize) {
        if at == ENTRY || self.conns[at].dead {
            return;
        }
        self.conns[at].dead = true;
        let addr = self.conns[at].addr;
        for q in self.unsigned.iter_mut().filter(|q| q.1 == at) {
            q.1 = ENTRY;
        }
        let mut moved: Vec<(u64, usize, ClientOp)> = Vec::new();
        let ids: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, s)| s.conn == at)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            if let Some(Sent { op: Some(op), .. }) = self.pending.remove(&id) {
                moved.push((id, ENTRY, op));
            }
        }
        self.links.reset(addr);
        self.unsigned.extend(moved);
    }

    /// Takes what arrives until something happened (an answer, a closed
    /// connection), failing over a node other than the entry whose oldest
    /// call timed out. With `until`, returns `false` when that time passed
    /// first.
    async fn pump(&mut self, until: Option<Instant>) -> Result<bool> {
        let oldest = self
            .pending
            .iter()
            .min_by_key(|(_, s)| s.at)
            .map(|(_, s)| (s.at + CALL_TIMEOUT, s.conn));
        let deadline = match (oldest, until) {
            (Some((d, _)), Some(u)) => Some(d.min(u)),
            (Some((d, _)), None) => Some(d),
            (None, u) => u,
        };
        let wait = deadline
            .map(|d| d.saturating_duration_since(Instant::now()))
            .unwrap_or(CALL_TIMEOUT);
        let ev = match tokio::time::timeout(wait, self.events.recv()).await {
            Ok(Some(ev)) => ev,
            Ok(None) => bail!("the connection to the node closed"),
            Err(_) => {
                if let Some(u) = until {
                    if Instant::now() >= u {
                        return Ok(false);
                    }
                }
                match oldest {
                    Some((_, at)) if at != ENTRY => {
                        self.fail_over(at);
                        return Ok(true);
                    }
                    _ => bail!(
                        "the node did not answer within {} s (is it overloaded, or not yet in a ring?)",
                        CALL_TIMEOUT.as_secs()
                    ),
                }
            }
        };
        match ev {
            NetEvent::Packet { from, bytes } => {
                self.links.receive(now_ms(), from, &bytes);
                let refused = self.links.stats().refused_untrusted;
                while let Some((_, id, reply)) = self.links.poll_answer() {
                    if self.pending.remove(&id).is_some() {
                        self.answers.insert(id, reply);
                    }
                }
                self.flush()?;
                if refused > 0 && self.conns[ENTRY].id.is_none() {
                    bail!(
                        "the node at {:?} is not endorsed by a key you trust: \
                         pass its ring's root key with --trust ROOT.pub.pem",
                        self.conns[ENTRY].addr
                    );
                }
            }
            NetEvent::Closed { peer, .. } => {
                self.links.reset(peer);
                match self.conns.iter().position(|c| c.addr == peer) {
                    Some(ENTRY) if self.pending.values().any(|s| s.conn == ENTRY) => {
                        bail!("the node closed the connection with requests unanswered");
                    }
                    Some(ENTRY) => {}
                    Some(at) => self.fail_over(at),
                    None => {}
                }
            }
        }
        Ok(true)
    }
}

/// A call waiting to be signed: (call id, node, operation).
type Queued<T> = (u64, usize, T);

/// Whether the calls `queued` make a whole batch, to sign and send now:
/// [`BATCH`] calls, or [`BATCH_BYTES`] of block data.
fn batch_due(queued: &[Queued<ClientOp>]) -> bool {
    let bytes: usize = queued
        .iter()
        .map(|(_, _, op)| match op {
            ClientOp::Put(Item::Block(b)) => b.data().len(),
            _ => 0,
        })
        .sum();
    queued.len() >= BATCH || bytes >= BATCH_BYTES
}

/// Splits queued calls into one signed
/// batch's worth (at most [`BATCH_MAX`], none to a node that would then
/// have more than [`NODE_WINDOW`] on the wire, given `wire` calls on the
/// wire to each node now) and the rest, both in the order queued.
fn sendable<T>(queued: Vec<Queued<T>>, mut wire: Vec<usize>) -> (Vec<Queued<T>>, Vec<Queued<T>>) {
    let mut batch = Vec::new();
    let mut held = Vec::new();
    for q in queued {
        if batch.len() < BATCH_MAX && wire[q.1] < NODE_WINDOW {
            wire[q.1] += 1;
            batch.push(q);
        } else {
            held.push(q);
        }
    }
    (batch, held)
}

/// Which of `conns` a call for `key` goes to (see [`NodeClient::route`]):
/// the least loaded live one among the key's primary and the next
/// `replicas` - 1 machines on the primary's successor list, the primary on
/// a tie. `None` if no live node's id is known.
fn pick_replica(
    key: Id,
    conns: &[Conn],
    replicas: usize,
    load: impl Fn(usize) -> usize,
) -> Option<usize> {
    let primary = conns
        .iter()
        .enumerate()
        .filter(|(_, c)| !c.dead)
        .filter_map(|(i, c)| c.id.map(|id| (key.distance_to(id), i)))
        .min()
        .map(|(_, i)| i)?;
    let mut hosts: Vec<Addr> = vec![conns[primary].addr];
    let mut best = (load(primary), primary);
    for p in &conns[primary].succs {
        if hosts.len() >= replicas {
            break;
        }
        if hosts.contains(&p.addr) {
            continue;
        }
        hosts.push(p.addr);
        let at = conns
            .iter()
            .position(|c| !c.dead && c.addr == p.addr && c.id == Some(p.id));
        // Strictly less: on a tie the primary (or the replica seen first)
        // keeps it, whatever the order of the sessions.
        if let Some(at) = at {
            let l = load(at);
            if l < best.0 {
                best = (l, at);
            }
        }
    }
    Some(best.1)
}

/// Whether `page` is strictly ascending and every key in it is after
/// `after` (the lowest key of the ring on, if `None`).
fn ascending_after(after: Option<Id>, page: &[Id]) -> bool {
    let first_ok = match (after, page.first()) {
        (Some(a), Some(f)) => *f > a,
        _ => true,
    };
    first_ok && page.windows(2).all(|w| w[0] < w[1])
}

impl Conn {
    fn new(addr: Addr) -> Conn {
        Conn {
            addr,
            id: None,
            dead: false,
            succs: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use peerstore_core::Block;

    #[test]
    fn a_batch_never_takes_a_node_past_its_window() {
        // Node 0 has 60 calls on the wire, node 1 none; 10 calls queued for
        // node 0 alternate with 10 for node 1.
        let queued: Vec<(u64, usize, ())> = (0..20).map(|i| (i, (i % 2) as usize, ())).collect();
        let (batch, held) = sendable(queued, vec![60, 0]);
        let ids = |v: &[(u64, usize, ())]| v.iter().map(|q| q.0).collect::<Vec<_>>();
        assert_eq!(ids(&batch), [0, 1, 2, 3, 4, 5, 6, 7, 9, 11, 13, 15, 17, 19]);
        assert_eq!(ids(&held), [8, 10, 12, 14, 16, 18]);
        // Nothing on the wire: one batch of at most BATCH_MAX, in order.
        let queued: Vec<(u64, usize, ())> = (0..200).map(|i| (i, (i % 3) as usize, ())).collect();
        let (batch, held) = sendable(queued, vec![0, 0, 0]);
        assert_eq!(batch.len(), BATCH_MAX);
        assert_eq!(ids(&batch), (0..BATCH_MAX as u64).collect::<Vec<_>>());
        assert_eq!(held.len(), 200 - BATCH_MAX);
        // Every node full: nothing goes.
        let (batch, held) = sendable(vec![(1, 0, ()), (2, 1, ())], vec![NODE_WINDOW; 2]);
        assert!(batch.is_empty());
        assert_eq!(held.len(), 2);
    }

    #[test]
    fn a_batch_is_due_at_so_many_calls_or_so_many_block_bytes() {
        let block = |n: usize| ClientOp::Put(Item::Block(Block::new(Id([7; 20]), vec![0; n])));
        let queue = |ops: Vec<ClientOp>| -> Vec<Queued<ClientOp>> {
            ops.into_iter()
                .enumerate()
                .map(|(i, op)| (i as u64, 0, op))
                .collect()
        };
        // Block bytes: 1 MiB chunks (and their small final chunks) wait
        // until the last that makes BATCH_BYTES.
        let n = BATCH_BYTES >> 20;
        let mut ops: Vec<ClientOp> = (0..n - 1)
            .flat_map(|_| [block(1 << 20), block(48)])
            .collect();
        assert!(!batch_due(&queue(ops.clone())));
        ops.push(block(1 << 20));
        assert!(batch_due(&queue(ops)));
        // Calls: small ones wait for a whole batch of them.
        let small: Vec<ClientOp> = (0..BATCH - 1).map(|_| block(4096)).collect();
        assert!(!batch_due(&queue(small.clone())));
        let mut small = small;
        small.push(ClientOp::Get(Id([1; 20])));
        assert!(batch_due(&queue(small)));
        // Gets carry no block bytes, however many fit under the count.
        let gets: Vec<ClientOp> = (0..BATCH - 1)
            .map(|i| ClientOp::Get(Id([i as u8; 20])))
            .collect();
        assert!(!batch_due(&queue(gets)));
    }

    #[test]
    fn a_page_of_keys_must_ascend_past_the_last_one() {
        assert!(ascending_after(None, &[]));
        assert!(ascending_after(None, &[id(1), id(2), id(9)]));
        assert!(ascending_after(Some(id(1)), &[id(2), id(3)]));
        assert!(!ascending_after(Some(id(2)), &[id(2), id(3)]), "not after");
        assert!(!ascending_after(Some(id(5)), &[id(3)]), "going back");
        assert!(!ascending_after(None, &[id(1), id(1)]), "a repeat");
        assert!(!ascending_after(None, &[id(3), id(2)]), "descending");
    }

    fn id(b: u8) -> Id {
        let mut x = [0u8; 20];
        x[0] = b;
        Id(x)
    }

    fn peer(b: u8) -> Peer {
        Peer {
            id: id(b),
            addr: Addr::Slot(b.into()),
        }
    }

    /// A client talking to nodes 10, 20, 30 and 40 of a ring of those
    /// four plus 50, each knowing the nodes after it.
    fn conns() -> Vec<Conn> {
        let ring = [10u8, 20, 30, 40, 50];
        [10u8, 20, 30, 40]
            .iter()
            .map(|&b| {
                let at = ring.iter().position(|&r| r == b).unwrap();
                let mut c = Conn::new(peer(b).addr);
                c.id = Some(id(b));
                c.succs = (1..ring.len())
                    .map(|k| peer(ring[(at + k) % ring.len()]))
                    .collect();
                c
            })
            .collect()
    }

    #[test]
    fn calls_go_to_the_least_loaded_replica_and_the_primary_on_a_tie() {
        let cs = conns();
        // Key 15: primary 20, replicas 20, 30, 40 (R = 3).
        let key = id(15);
        assert_eq!(pick_replica(key, &cs, 3, |_| 0), Some(1));
        let loads = [0usize, 5, 2, 1];
        assert_eq!(pick_replica(key, &cs, 3, |at| loads[at]), Some(3));
        // Node 10 is idle but is not a replica of key 15.
        let loads = [0usize, 5, 5, 5];
        assert_eq!(pick_replica(key, &cs, 3, |at| loads[at]), Some(1));
        // With R = 1 only the primary will do.
        let loads = [0usize, 9, 0, 0];
        assert_eq!(pick_replica(key, &cs, 1, |at| loads[at]), Some(1));
    }

    #[test]
    fn replicas_the_client_does_not_talk_to_or_that_failed_are_skipped() {
        let mut cs = conns();
        // Key 35: primary 40, replicas 40, 50 (no session), 10.
        let key = id(35);
        let loads = [1usize, 0, 0, 3];
        assert_eq!(pick_replica(key, &cs, 3, |at| loads[at]), Some(0));
        // Equally busy: the primary, though node 10's session came first.
        let loads = [2usize, 0, 0, 2];
        assert_eq!(pick_replica(key, &cs, 3, |at| loads[at]), Some(3));
        // Node 10 failed: only the primary is left.
        cs[0].dead = true;
        assert_eq!(pick_replica(key, &cs, 3, |at| loads[at]), Some(3));
        // The primary failed too: the next live node after the key stands in.
        cs[3].dead = true;
        assert_eq!(pick_replica(key, &cs, 3, |at| loads[at]), Some(1));
        for c in &mut cs {
            c.dead = true;
        }
        assert_eq!(pick_replica(key, &cs, 3, |_| 0), None);
    }

    #[test]
    fn one_machine_counts_once_among_the_replicas() {
        let mut cs = conns();
        // Node 20's machine holds a second ring position, first on 20's
        // list: with R = 2 the replicas are 20 and 30, not 20 twice.
        let twin = Peer {
            id: id(22),
            addr: peer(20).addr,
        };
        cs[1].succs = vec![twin, peer(30), peer(40)];
        let loads = [0usize, 4, 0, 0];
        assert_eq!(pick_replica(id(15), &cs, 2, |at| loads[at]), Some(2));
    }
}
