//! A client's connection to one node: a TCP connection carrying a secure
//! client session ([`Links::client`]), on which signed requests go out and
//! answers come back, several in flight at once.
//!
//! The node's ring id (which every signed request names, so that a request
//! captured on its way to one node cannot be replayed to another) is
//! learned from the session itself: the handshake proves the node's key,
//! and the id derives from it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use peerstore_core::endorse::TrustStore;
use peerstore_core::gate::{ClientOp, ClientRequest, GateReply, RingStatus};
use peerstore_core::link::{LinkConfig, Links};
use peerstore_core::{Addr, Id, Signer};
use peerstore_net::transport::{NetEvent, Transport, TransportConfig};
use rand::rngs::OsRng;
use rand::RngCore;
use tokio::sync::mpsc;

/// Calls in flight at most (the node answers more with "busy").
pub const WINDOW: usize = 32;

/// Calls signed with one signature at most.
pub const BATCH: usize = 16;

/// While at least this many signed calls are on the wire, waiting for an
/// answer does not sign the calls queued since: they wait for more to join
/// them (an RSA-3072 signature costs about as much CPU as sealing a 1 MiB
/// chunk, so a stream that signed each call as a slot freed up spent a
/// third of its time signing). Below it, the queue goes out at once so the
/// node never runs dry.
pub const LOW_WATER: usize = BATCH / 2;

/// How long a call may wait for its answer.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// A connection to one node.
pub struct NodeClient {
    transport: Transport,
    events: mpsc::Receiver<NetEvent>,
    links: Links,
    user: Signer,
    node: Addr,
    node_id: Option<Id>,
    next_id: u64,
    /// Calls sent and not yet answered: id -> when sent.
    pending: BTreeMap<u64, Instant>,
    /// Calls waiting to be signed together (one signature per batch).
    unsigned: Vec<(u64, ClientOp)>,
    answers: BTreeMap<u64, GateReply>,
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
            node: Addr::Tcp(node),
            node_id: None,
            next_id: 0,
            pending: BTreeMap::new(),
            unsigned: Vec::new(),
            answers: BTreeMap::new(),
        };
        // The first call opens the session and tells us the node's id.
        let st = c.status().await?;
        c.node_id = Some(st.me.id);
        Ok(c)
    }

    /// The ring as the node sees it.
    pub async fn status(&mut self) -> Result<RingStatus> {
        match self.call(ClientOp::Status).await? {
            GateReply::Status(st) => Ok(*st),
            other => bail!("unexpected answer to a status request: {other:?}"),
        }
    }

    /// Sends `op` and waits for its answer.
    pub async fn call(&mut self, op: ClientOp) -> Result<GateReply> {
        let id = self.submit(op).await?;
        self.wait(id).await
    }

    /// Queues `op` (waiting for room in the window first); returns the
    /// call id whose answer [`NodeClient::next_answer`] or
    /// [`NodeClient::wait`] gives. Queued calls are signed together, one
    /// signature per batch, when the batch is full or an answer is awaited.
    pub async fn submit(&mut self, op: ClientOp) -> Result<u64> {
        while self.in_flight() >= WINDOW {
            self.send_batch()?;
            self.pump().await?;
        }
        self.next_id += 1;
        let id = self.next_id;
        self.unsigned.push((id, op));
        if self.unsigned.len() >= BATCH {
            self.send_batch()?;
        }
        Ok(id)
    }

    /// Signs and sends the queued calls.
    fn send_batch(&mut self) -> Result<()> {
        if self.unsigned.is_empty() {
            return Ok(());
        }
        let node_id = self.node_id.unwrap_or(Id([0; 20]));
        let (ids, ops): (Vec<u64>, Vec<ClientOp>) = self.unsigned.drain(..).unzip();
        let reqs = ClientRequest::batch(&self.user, node_id, ops, now_ms(), &mut OsRng);
        for (id, req) in ids.into_iter().zip(reqs) {
            self.links.call(now_ms(), self.node, id, &req);
            self.pending.insert(id, Instant::now());
        }
        self.flush()
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
            if !self.pending.contains_key(&id) {
                bail!("call {id} was never sent");
            }
            self.pump().await?;
        }
    }

    /// Waits for any answer. Queued calls are signed and sent first if
    /// fewer than [`LOW_WATER`] are on the wire; otherwise they wait to
    /// fill a bigger batch.
    pub async fn next_answer(&mut self) -> Result<(u64, GateReply)> {
        if self.pending.len() < LOW_WATER || self.unsigned.len() >= BATCH {
            self.send_batch()?;
        }
        loop {
            if let Some((&id, _)) = self.answers.iter().next() {
                let r = self.answers.remove(&id).expect("present");
                return Ok((id, r));
            }
            if self.pending.is_empty() {
                if self.unsigned.is_empty() {
                    bail!("no call is waiting for an answer");
                }
                self.send_batch()?;
            }
            self.pump().await?;
            if self.pending.len() < LOW_WATER {
                self.send_batch()?;
            }
        }
    }

    fn flush(&mut self) -> Result<()> {
        while let Some(p) = self.links.poll_packet() {
            self.transport
                .send(p.to, p.bytes)
                .map_err(|e| anyhow!("sending to the node failed: {e}"))?;
        }
        Ok(())
    }

    /// Takes what arrives until at least one answer came in (or the
    /// oldest call timed out).
    async fn pump(&mut self) -> Result<()> {
        let oldest = self.pending.values().min().copied();
        let deadline = oldest.map(|t| t + CALL_TIMEOUT);
        let wait = deadline
            .map(|d| d.saturating_duration_since(Instant::now()))
            .unwrap_or(CALL_TIMEOUT);
        let ev = match tokio::time::timeout(wait, self.events.recv()).await {
            Ok(Some(ev)) => ev,
            Ok(None) => bail!("the connection to the node closed"),
            Err(_) => bail!(
                "the node did not answer within {} s (is it overloaded, or not yet in a ring?)",
                CALL_TIMEOUT.as_secs()
            ),
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
                if refused > 0 && self.node_id.is_none() {
                    bail!(
                        "the node at {:?} is not endorsed by a key you trust: \
                         pass its ring's root key with --trust ROOT.pub.pem",
                        self.node
                    );
                }
            }
            NetEvent::Closed { .. } => {
                self.links.reset(self.node);
                if !self.pending.is_empty() {
                    bail!("the node closed the connection with requests unanswered");
                }
            }
        }
        Ok(())
    }
}
