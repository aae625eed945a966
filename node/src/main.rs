//! `peerstore-node`: the PeerStore daemon.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use peerstore_node::daemon::{self, Options, Paths};

/// A PeerStore node: one member of an encrypted, replicated file store ring.
///
/// With no arguments it starts a new ring of its own on 127.0.0.1:7400,
/// keeping its identity and data under the platform data directory
/// (e.g. ~/.local/share/peerstore/node). To grow a ring:
///
///   1. on the new machine, `peerstore-node id --data-dir D2` prints its
///      key fingerprint (making its identity if needed);
///   2. on a member, `peerstore-node admit FINGERPRINT --data-dir D1`
///      lets that key register there (or start the member with --admit);
///   3. start the new node with `--join MEMBER_ADDR --trust ROOT.pub.pem`,
///      where ROOT.pub.pem is the node.pub.pem of the node that started
///      the ring.
///
/// A node that was in a ring rejoins it on the next start through the
/// successors it remembers. If the whole ring stopped, the node that had
/// the lowest id starts it again once it finds the others out of any ring,
/// and the rest rejoin through it.
///
/// Logs go to stderr (RUST_LOG=debug for more). SIGINT or SIGTERM hands the
/// node's data to its successors and exits; a second signal exits at once.
#[derive(Parser, Debug)]
#[command(name = "peerstore-node", version, verbatim_doc_comment)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    /// Address to listen on (port 0 lets the OS pick one; the address in
    /// use is printed on stdout as "listening on ADDR").
    #[arg(long, default_value = "127.0.0.1:7400")]
    listen: SocketAddr,
    /// Address other nodes should use to reach this one, if not --listen.
    #[arg(long)]
    advertise: Option<SocketAddr>,
    /// Where the node keeps its identity and data.
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    /// A member of an existing ring to join.
    #[arg(long)]
    join: Option<SocketAddr>,
    /// Start a new ring here even though this node remembers one. Needed
    /// only when a whole ring was stopped and its lowest node (the one that
    /// restarts it by itself) is gone for good; the others then rejoin
    /// through this node.
    #[arg(long, conflicts_with = "join")]
    create: bool,
    /// A public key (a node.pub.pem) to trust as a ring root; repeatable.
    #[arg(long)]
    trust: Vec<PathBuf>,
    /// A node key fingerprint allowed to register here; repeatable.
    #[arg(long)]
    admit: Vec<String>,
    /// Copies kept of every item (R).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=16))]
    replicas: u16,
    /// Most bytes the node stores (default: until the disk is full).
    #[arg(long)]
    capacity_bytes: Option<u64>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Print this node's key fingerprint and public key file (creating the
    /// identity if there is none yet).
    Id,
    /// Let the node whose key has this fingerprint register here.
    Admit {
        /// 64 hex digits, as `peerstore-node id` prints them.
        fingerprint: String,
    },
}

fn data_dir(given: Option<PathBuf>) -> Result<PathBuf> {
    match given {
        Some(d) => Ok(d),
        None => dirs::data_dir()
            .map(|d| d.join("peerstore").join("node"))
            .context("no platform data directory here: pass --data-dir DIR"),
    }
}

fn main() {
    // Reuse freed block and frame buffers instead of faulting in new pages.
    peerstore_net::memory::keep_freed_memory();
    if let Err(e) = real_main() {
        eprintln!("peerstore-node: error: {e:#}");
        std::process::exit(1);
    }
}

fn real_main() -> Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let dir = data_dir(cli.data_dir)?;
    match cli.cmd {
        Some(Cmd::Id) => {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let paths = Paths::new(&dir);
            let id = daemon::load_or_create_identity(&paths)?;
            println!(
                "fingerprint {}",
                daemon::fingerprint(id.signing_public_der())
            );
            println!("public key  {}", paths.public.display());
            Ok(())
        }
        Some(Cmd::Admit { fingerprint }) => {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            daemon::admit(&Paths::new(&dir), &fingerprint)?;
            println!("admitted {fingerprint}; that node may now register here");
            Ok(())
        }
        None => {
            let opts = Options {
                listen: cli.listen,
                advertise: cli.advertise,
                data_dir: dir,
                join: cli.join,
                create: cli.create,
                trust: cli.trust,
                admit: cli.admit,
                replicas: usize::from(cli.replicas),
                capacity_bytes: cli.capacity_bytes,
            };
            // One thread for the sockets and the protocol core alike: the
            // core is one state machine on one thread anyway, and with the
            // sockets on worker threads every packet crossed between
            // threads twice (a wake-up and a context switch each way). On
            // a 3-node ring on two cores this runs backups 5-15 % faster
            // and restores 5-10 % with less CPU in the nodes. The disk and
            // its direct writes keep their own threads.
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the runtime")?;
            rt.block_on(daemon::run(opts))
        }
    }
}
