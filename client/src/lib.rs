//! The PeerStore client library: what the `peerstore` command does, usable
//! from other programs. Today: the user's key file.

pub mod keyfile;
