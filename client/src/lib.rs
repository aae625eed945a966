//! The PeerStore client library: what the `peerstore` command does, usable
//! from other programs: the user's key file and a connection to a node.

use std::path::PathBuf;

pub mod conn;
pub mod files;
pub use peerstore_net::keyfile;

/// Where the user's key file lives unless `--key` says otherwise.
pub fn default_key_path() -> Option<PathBuf> {
    dirs::data_dir().map(|d| d.join("peerstore").join("user.pem"))
}
