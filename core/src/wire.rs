//! Messages between nodes. The transport authenticates `from`; everything in a
//! message body is untrusted and sanitised by the receiver before use.

use crate::id::{Id, NodeId};
use crate::store::{Digest, Item, RangeSummary, StoreError};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::sync::Arc;

/// Where a node can be reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Addr {
    /// A slot in an in-process network (the simulator and core tests).
    Slot(u32),
    /// A real TCP endpoint.
    Tcp(SocketAddr),
}

impl Addr {
    /// The address an endorsement names (`slot:N` in-process, or a socket
    /// address), if it is one.
    pub fn parse(s: &str) -> Option<Addr> {
        match s.strip_prefix("slot:") {
            Some(n) => n.parse().ok().map(Addr::Slot),
            None => s.parse().ok().map(Addr::Tcp),
        }
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
