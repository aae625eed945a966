//! PeerStore's sans-IO protocol core.
//!
//! A [`Node`] is a value: inputs go in through [`Node::handle`] with the
//! current logical time in milliseconds, effects come out of
//! [`Node::poll_output`], and [`Node::poll_timeout`] says when the node next
//! wants to be woken. No sockets, clocks, threads or OS randomness live here,
//! so the same code runs in the deterministic simulator and the real daemon.

pub mod config;
pub mod endorse;
pub mod filecrypt;
pub mod gate;
pub mod hash;
pub mod id;
pub mod identity;
pub mod lanes;
pub mod link;
pub mod lookup;
pub mod machine;
pub mod merkle;
pub mod node;
pub mod record;
pub mod reqauth;
mod reqtable;
pub mod rtt;
pub mod session;
pub mod store;
pub mod vnode;
pub mod wire;

pub use config::{Config, Protocol};
pub use id::{Id, NodeId, ID_BITS};
pub use lookup::{LookupError, LookupId};
pub use node::{
    CmdId, CmdResult, Command, Event, Input, IoId, LookupOk, Node, NodeStats, Output, PutOk,
    Status, StorageOp, StorageResult, StoreStats,
};
pub use record::{Record, RecordError, Signer, UserId};
pub use store::{Block, BlockId, Held, Item, StoreError, Tombstone};
pub use wire::{Addr, Message, Peer, ReqId, SyncAnswer, TcpAddr};
