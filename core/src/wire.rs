//! Messages between nodes. The transport authenticates `from`; everything in a
//! message body is untrusted and sanitised by the receiver before use.

use crate::id::{Id, NodeId};
use crate::store::{Block, Digest, Item, RangeSummary, StoreError};
use serde::{Deserialize, Serialize};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

/// The postcard encoding of `value` after `head` zero bytes, in one
/// allocation with room for `tail` more bytes after it: the size is taken
/// first, so a 1 MiB block is copied once and the buffer never regrows (a
/// growing vector copied it about once more, and a caller adding a header
/// or trailer once again).
pub(crate) fn encode_after<T: Serialize + ?Sized>(
    head: usize,
    value: &T,
    tail: usize,
) -> postcard::Result<Vec<u8>> {
    let size = postcard::experimental::serialized_size(value)?;
    let mut buf = Vec::with_capacity(head + size + tail);
    buf.resize(head, 0);
    postcard::serialize_with_flavor(value, VecFlavor(buf))
}

/// A postcard output appending to a vector with `extend_from_slice`.
struct VecFlavor(Vec<u8>);

impl postcard::ser_flavors::Flavor for VecFlavor {
    type Output = Vec<u8>;

    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        self.0.push(data);
        Ok(())
    }

    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        self.0.extend_from_slice(data);
        Ok(())
    }

    fn finalize(self) -> postcard::Result<Vec<u8>> {
        Ok(self.0)
    }
}

/// Where a node can be reached.
///
/// On the wire an `Addr` is the plain enum of a slot number or a
/// `SocketAddr`; in memory a TCP endpoint is packed into 20 bytes (a
/// `SocketAddr` takes 32), because peers ride in every successor list,
/// finger table and message, and a simulation holds millions of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(from = "AddrWire", into = "AddrWire")]
pub enum Addr {
    /// A slot in an in-process network (the simulator and core tests).
    Slot(u32),
    /// A real TCP endpoint.
    Tcp(TcpAddr),
}

/// `Addr` as it is encoded.
#[derive(Serialize, Deserialize)]
enum AddrWire {
    Slot(u32),
    Tcp(SocketAddr),
}

impl From<AddrWire> for Addr {
    fn from(a: AddrWire) -> Addr {
        match a {
            AddrWire::Slot(n) => Addr::Slot(n),
            AddrWire::Tcp(s) => Addr::Tcp(s.into()),
        }
    }
}

impl From<Addr> for AddrWire {
    fn from(a: Addr) -> AddrWire {
        match a {
            Addr::Slot(n) => AddrWire::Slot(n),
            Addr::Tcp(t) => AddrWire::Tcp(t.socket()),
        }
    }
}

impl From<SocketAddr> for Addr {
    fn from(s: SocketAddr) -> Addr {
        Addr::Tcp(s.into())
    }
}

impl Addr {
    /// The address an endorsement names (`slot:N` in-process, or a socket
    /// address), if it is one.
    pub fn parse(s: &str) -> Option<Addr> {
        match s.strip_prefix("slot:") {
            Some(n) => n.parse().ok().map(Addr::Slot),
            None => s.parse::<SocketAddr>().ok().map(Addr::from),
        }
    }

    /// The socket address of a TCP endpoint.
    pub fn socket(&self) -> Option<SocketAddr> {
        match self {
            Addr::Tcp(t) => Some(t.socket()),
            Addr::Slot(_) => None,
        }
    }
}

/// A TCP endpoint in 20 bytes: the IP (an IPv4 address kept as its 4 bytes
/// at the front) and the port. IPv6 flow labels and scope ids are not kept:
/// a ring address must be routable as it stands.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TcpAddr {
    ip: [u8; 16],
    port: u16,
    v4: bool,
}

impl TcpAddr {
    pub fn socket(&self) -> SocketAddr {
        if self.v4 {
            let [a, b, c, d, ..] = self.ip;
            SocketAddr::from((Ipv4Addr::new(a, b, c, d), self.port))
        } else {
            SocketAddr::from((Ipv6Addr::from(self.ip), self.port))
        }
    }
}

impl From<SocketAddr> for TcpAddr {
    fn from(s: SocketAddr) -> TcpAddr {
        let mut ip = [0u8; 16];
        let v4 = match s.ip() {
            IpAddr::V4(a) => {
                ip[..4].copy_from_slice(&a.octets());
                true
            }
            IpAddr::V6(a) => {
                ip = a.octets();
                false
            }
        };
        TcpAddr {
            ip,
            port: s.port(),
            v4,
        }
    }
}

impl From<TcpAddr> for SocketAddr {
    fn from(t: TcpAddr) -> SocketAddr {
        t.socket()
    }
}

impl PartialEq<SocketAddr> for TcpAddr {
    fn eq(&self, other: &SocketAddr) -> bool {
        *self == TcpAddr::from(*other)
    }
}

/// The order of the socket addresses (IPv4 before IPv6, then address, then
/// port).
impl Ord for TcpAddr {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (!self.v4, self.ip, self.port).cmp(&(!other.v4, other.ip, other.port))
    }
}

impl PartialOrd for TcpAddr {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl std::fmt::Display for TcpAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.socket().fmt(f)
    }
}

impl std::fmt::Debug for TcpAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.socket().fmt(f)
    }
}

/// A node as others refer to it: its ring id and how to reach it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Peer {
    pub id: NodeId,
    pub addr: Addr,
}

/// A request id chosen by the sender; replies echo it.
pub type ReqId = u64;

/// The Chord wire protocol. Requests carry a `req` that the reply echoes; the
/// sender matches replies on (peer, req) and drops anything else.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// "Are you alive, and what are your predecessor and successor list?"
    /// Used by stabilize, the predecessor check, and lookup result checks.
    GetState {
        req: ReqId,
    },
    State {
        req: ReqId,
        /// False from a node that is not (or no longer) in a ring: a restarted
        /// node rejoining, or one that has not finished joining. Its empty
        /// pointers must not be adopted.
        member: bool,
        pred: Option<Peer>,
        /// Shared with the sender's own list: a reply to every stabilize
        /// carries `r` peers, and copying them was a tenth of a large
        /// simulation's time. On the wire it is a plain sequence.
        succs: Arc<[Peer]>,
    },
    /// "I believe I am your predecessor." One-way.
    Notify,
    /// One step of an iterative lookup for `key`.
    FindNext {
        req: ReqId,
        key: Id,
    },
    /// The responder's successor list and the nodes it knows that most closely
    /// precede the key (best first). An unjoined responder sends both empty.
    Next {
        req: ReqId,
        succs: Arc<[Peer]>,
        closer: Vec<Peer>,
    },
    /// A graceful leave: the sender is going away. One-way.
    Leaving,
    /// "Store this item durably at `key`." The receiver checks the item is
    /// valid and really belongs at `key` (a block must hash to it), merges it
    /// with what it holds and answers [`Message::PutAck`] only once the
    /// result is on disk.
    Put {
        req: ReqId,
        key: Id,
        item: Item,
    },
    PutAck {
        req: ReqId,
        result: Result<(), StoreError>,
    },
    /// "Send me the item at this position, if you hold it."
    Get {
        req: ReqId,
        key: Id,
    },
    Got {
        req: ReqId,
        result: Result<Option<Item>, StoreError>,
    },
    /// Anti-entropy: "here is my digest of the key range (lo, hi]".
    SyncRange {
        req: ReqId,
        lo: Id,
        hi: Id,
        mine: RangeSummary,
    },
    SyncReply {
        req: ReqId,
        answer: SyncAnswer,
    },
    /// "Ask `target` whether it is alive, and tell me." Sent before a node
    /// drops a first successor it cannot reach itself: a silent path is not
    /// a dead node, and a third party's answer tells the two apart.
    Probe {
        req: ReqId,
        target: Peer,
    },
    /// The answer to [`Message::Probe`]: whether `target` answered the
    /// prober as a ring member.
    ProbeResult {
        req: ReqId,
        alive: bool,
    },
}

/// How a replica answers a range digest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SyncAnswer {
    /// Same digest: nothing to do.
    Equal,
    /// Few enough keys to list: (position, version digest) of each.
    Keys(Vec<(Id, Digest)>),
    /// Too many to list: summaries of equal-width sub-ranges, in order.
    Split(Vec<(Id, Id, RangeSummary)>),
    /// The replica will not sync now (not joined, overloaded).
    Refused,
}

impl Message {
    /// The block the message carries, if it carries one (a put of a
    /// block, or a block found).
    pub fn block(&self) -> Option<&Block> {
        match self {
            Message::Put {
                item: Item::Block(b),
                ..
            }
            | Message::Got {
                result: Ok(Some(Item::Block(b))),
                ..
            } => Some(b),
            _ => None,
        }
    }

    /// A short name for traces and counters.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::GetState { .. } => "get_state",
            Message::State { .. } => "state",
            Message::Notify => "notify",
            Message::FindNext { .. } => "find_next",
            Message::Next { .. } => "next",
            Message::Leaving => "leaving",
            Message::Put { .. } => "put",
            Message::PutAck { .. } => "put_ack",
            Message::Get { .. } => "get",
            Message::Got { .. } => "got",
            Message::SyncRange { .. } => "sync_range",
            Message::SyncReply { .. } => "sync_reply",
            Message::Probe { .. } => "probe",
            Message::ProbeResult { .. } => "probe_result",
        }
    }

    /// A stable small tag for hashing traces.
    pub fn tag(&self) -> u8 {
        match self {
            Message::GetState { .. } => 1,
            Message::State { .. } => 2,
            Message::Notify => 3,
            Message::FindNext { .. } => 4,
            Message::Next { .. } => 5,
            Message::Leaving => 6,
            Message::Put { .. } => 7,
            Message::PutAck { .. } => 8,
            Message::Get { .. } => 9,
            Message::Got { .. } => 10,
            Message::SyncRange { .. } => 11,
            Message::SyncReply { .. } => 12,
            Message::Probe { .. } => 13,
            Message::ProbeResult { .. } => 14,
        }
    }

    pub fn req(&self) -> Option<ReqId> {
        match self {
            Message::GetState { req }
            | Message::State { req, .. }
            | Message::FindNext { req, .. }
            | Message::Next { req, .. }
            | Message::Put { req, .. }
            | Message::PutAck { req, .. }
            | Message::Get { req, .. }
            | Message::Got { req, .. }
            | Message::SyncRange { req, .. }
            | Message::SyncReply { req, .. }
            | Message::Probe { req, .. }
            | Message::ProbeResult { req, .. } => Some(*req),
            Message::Notify | Message::Leaving => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The encoding `Addr` had while it held a `SocketAddr`.
    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    enum Plain {
        Slot(u32),
        Tcp(SocketAddr),
    }

    fn socket() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::from((ip, port))),
            (any::<[u8; 16]>(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::from((ip, port))),
        ]
    }

    proptest! {
        #[test]
        fn tcp_addresses_round_trip_encode_and_order_as_socket_addresses(a in socket(), b in socket(), n in any::<u32>()) {
            let (x, y) = (Addr::from(a), Addr::from(b));
            prop_assert_eq!(x.socket(), Some(a));
            prop_assert_eq!(x.cmp(&y), a.cmp(&b));
            prop_assert_eq!(x == y, a == b);
            let Addr::Tcp(t) = x else { unreachable!() };
            prop_assert_eq!(t.to_string(), a.to_string());
            // Same bytes on the wire as before the compact form.
            let bytes = postcard::to_allocvec(&x).unwrap();
            prop_assert_eq!(&bytes, &postcard::to_allocvec(&Plain::Tcp(a)).unwrap());
            prop_assert_eq!(postcard::from_bytes::<Addr>(&bytes).unwrap(), x);
            let slot = postcard::to_allocvec(&Addr::Slot(n)).unwrap();
            prop_assert_eq!(&slot, &postcard::to_allocvec(&Plain::Slot(n)).unwrap());
            prop_assert!(Addr::Slot(n) < x);
        }
    }

    #[test]
    fn peers_stay_small() {
        // Peers fill every successor list and message; a simulation holds
        // millions of them.
        assert!(std::mem::size_of::<Peer>() <= 40);
        assert_eq!(
            Addr::parse("[::1]:7000").and_then(|a| a.socket()),
            Some("[::1]:7000".parse().unwrap())
        );
        assert_eq!(Addr::parse("slot:3"), Some(Addr::Slot(3)));
    }
}
