//! The PeerStore node: the host that runs a [`peerstore_core::Node`] against
//! real sockets, clocks and disks.

#![forbid(unsafe_code)]

pub mod daemon;
pub mod disk;
mod packed;
pub mod rejoin;
