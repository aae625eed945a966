//! `peerstore`: the PeerStore command-line client.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use peerstore_client::conn::NodeClient;
use peerstore_client::files::{self, Files};
use peerstore_client::keyfile;
use peerstore_core::endorse::TrustStore;
use peerstore_core::gate::RingStatus;
use peerstore_core::identity::{pem_is_encrypted, Identity, IdentityError, USER_KEY_BITS};
use peerstore_core::record::MIN_KEY_BITS_DEFAULT;
use peerstore_core::{Addr, Peer};
use zeroize::Zeroizing;

/// A passphrase, wiped when dropped.
type Secret = Zeroizing<Vec<u8>>;

/// The PeerStore client: your identity and your files in a PeerStore ring.
/// Everything is encrypted here before it leaves; nodes see no names, sizes
/// or contents.
///
/// First steps, against a ring whose first node's public key you have:
///   peerstore init                        # your key file
///   peerstore trust ROOT.pub.pem          # the ring's root, remembered
///   peerstore backup ~/docs               # --node ADDR picks the entry node
///   peerstore ls
///   peerstore restore ~/docs --to /tmp/docs-back
/// (--node defaults to 127.0.0.1:7400, peerstore-node's default address.)
///
/// Your key file is you: it holds your signing and encryption keys. Keep a
/// copy somewhere safe; nobody can recover it for you.
///
/// Passphrases come from PEERSTORE_PASSPHRASE, from --passphrase-file, or
/// from a prompt when the terminal can ask; they are never logged.
#[derive(Parser)]
#[command(name = "peerstore", version, verbatim_doc_comment)]
struct Args {
    /// Your key file [default: the platform data directory, e.g.
    /// ~/.local/share/peerstore/user.pem].
    #[arg(long, global = true, value_name = "PATH")]
    key: Option<PathBuf>,
    /// Read the passphrase from this file (its first line).
    #[arg(long, global = true, value_name = "FILE")]
    passphrase_file: Option<PathBuf>,
    /// The node to talk to.
    #[arg(
        long,
        global = true,
        value_name = "ADDR",
        default_value = "127.0.0.1:7400"
    )]
    node: std::net::SocketAddr,
    /// Trust nodes endorsed by this ring root key (a node.pub.pem), besides
    /// those added with `peerstore trust`; repeatable.
    #[arg(long, global = true, value_name = "PEM")]
    trust: Vec<PathBuf>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create your identity (a new key file), or import one you have.
    ///
    ///   peerstore init                    # asks for a passphrase
    ///   peerstore init --no-passphrase    # an unprotected key file
    ///   peerstore init --import old.pem   # bring an existing identity
    #[command(verbatim_doc_comment)]
    Init {
        /// Import this key file instead of creating a new identity.
        #[arg(long, value_name = "PEM")]
        import: Option<PathBuf>,
        /// Store the key file unencrypted (anyone who reads it is you).
        #[arg(long)]
        no_passphrase: bool,
        /// Replace an existing key file (its identity is lost).
        #[arg(long)]
        force: bool,
    },
    /// Show your user id and key fingerprint.
    Whoami,
    /// Trust the ring whose root key this is (its first node's
    /// node.pub.pem) from now on.
    Trust {
        /// The root's public key file.
        pem: PathBuf,
    },
    /// Register your public key in the ring (backup does it for you the
    /// first time). The first registration of a user id wins for ever.
    Register,
    /// Back up a file or a directory tree: every file is encrypted here,
    /// in 1 MiB chunks, before it is sent; unchanged files are skipped.
    ///
    ///   peerstore backup ~/Documents
    #[command(verbatim_doc_comment)]
    Backup {
        /// The file or directory to back up.
        path: PathBuf,
    },
    /// Restore a backed-up file or tree (every chunk is verified), or a
    /// file someone shared with you (OWNER:FILE, as `share` printed).
    ///
    ///   peerstore restore /home/me/Documents --to /tmp/r   # gives /tmp/r/Documents/...
    ///   peerstore restore 1f2e...:9a8b... --to /tmp/r     # a shared file
    #[command(verbatim_doc_comment)]
    Restore {
        /// A path as `peerstore ls` shows it (or relative to the current
        /// directory), or a share link.
        path: String,
        /// Where to write (created if missing).
        #[arg(long)]
        to: PathBuf,
    },
    /// List your backed-up files (all, or those at or under PATH).
    Ls {
        path: Option<String>,
        /// Also print each file's link (what `share` prints, and what a
        /// reader passes to `restore` once the file is shared with them).
        #[arg(long)]
        links: bool,
    },
    /// Remove a backed-up file or tree from the ring.
    Rm { path: String },
    /// Let another user read a file or tree: prints the links they restore
    /// with. USER is their user id (`peerstore whoami`) or public key file.
    Share {
        path: String,
        #[arg(long, value_name = "USER")]
        with: String,
    },
    /// Take a user's access away: the files get new keys and are
    /// re-encrypted, so nothing written from now on is readable to them.
    Revoke {
        path: String,
        #[arg(long, value_name = "USER")]
        from: String,
    },
    /// Show the ring as the node sees it: its id and address, successors,
    /// predecessor, distinct fingers, and what it stores.
    Ring {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    // Reuse freed chunk and frame buffers instead of faulting in new pages.
    peerstore_net::memory::keep_freed_memory();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("peerstore: {e:#}");
            match e.downcast_ref::<Interrupted>() {
                // The shell's convention: 128 + the signal's number.
                Some(Interrupted(signal)) => ExitCode::from(128 + signal),
                None => ExitCode::FAILURE,
            }
        }
    }
}

/// A command stopped by SIGINT or SIGTERM (the signal's number).
#[derive(Debug)]
struct Interrupted(u8);

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = if self.0 == 2 { "SIGINT" } else { "SIGTERM" };
        write!(
            f,
            "interrupted by {name}: files finished so far are kept, none is left half-written; run the command again to finish"
        )
    }
}

impl std::error::Error for Interrupted {}

/// Waits for SIGINT or SIGTERM; forever if they cannot be watched.
async fn interrupted() -> Interrupted {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) {
            (Ok(mut int), Ok(mut term)) => tokio::select! {
                _ = int.recv() => Interrupted(2),
                _ = term.recv() => Interrupted(15),
            },
            _ => std::future::pending().await,
        }
    }
    #[cfg(not(unix))]
    {
        match tokio::signal::ctrl_c().await {
            Ok(()) => Interrupted(2),
            Err(_) => std::future::pending().await,
        }
    }
}

fn key_path(args: &Args) -> Result<PathBuf> {
    match &args.key {
        Some(p) => Ok(p.clone()),
        None => peerstore_client::default_key_path()
            .context("no data directory on this system: pass --key PATH"),
    }
}

/// The passphrase from the environment, a file, or (if `ask`) the terminal.
fn passphrase(args: &Args, ask: Option<&str>, confirm: bool) -> Result<Option<Secret>> {
    if let Some(v) = std::env::var_os("PEERSTORE_PASSPHRASE") {
        return Ok(Some(Zeroizing::new(v.into_encoded_bytes())));
    }
    if let Some(f) = &args.passphrase_file {
        let text = std::fs::read_to_string(f)
            .with_context(|| format!("cannot read the passphrase file {}", f.display()))?;
        let line = text.lines().next().unwrap_or("");
        if line.is_empty() {
            bail!("the passphrase file {} is empty", f.display());
        }
        return Ok(Some(Zeroizing::new(line.as_bytes().to_vec())));
    }
    let Some(prompt) = ask else { return Ok(None) };
    if !std::io::stdin().is_terminal() {
        return Ok(None);
    }
    let first =
        Zeroizing::new(rpassword::prompt_password(prompt).context("cannot read the passphrase")?);
    if confirm {
        let again = Zeroizing::new(
            rpassword::prompt_password("Again: ").context("cannot read the passphrase")?,
        );
        if *again != *first {
            bail!("the passphrases differ; nothing was written");
        }
    }
    if first.is_empty() {
        bail!("an empty passphrase protects nothing; use --no-passphrase if that is what you want");
    }
    Ok(Some(Zeroizing::new(first.as_bytes().to_vec())))
}

fn load(args: &Args) -> Result<Identity> {
    let path = key_path(args)?;
    let text = keyfile::read_private(&path)?;
    let pass = if pem_is_encrypted(&text) {
        passphrase(args, Some("Passphrase: "), false)?
    } else {
        None
    };
    Identity::from_pem(
        &text,
        pass.as_ref().map(|p| p.as_slice()),
        MIN_KEY_BITS_DEFAULT,
    )
    .map(Identity::with_os_random_signing)
    .map_err(|e| explain(e, &path))
}

fn explain(e: IdentityError, path: &std::path::Path) -> anyhow::Error {
    match e {
        IdentityError::PassphraseRequired => anyhow::anyhow!(
            "{} is passphrase-protected: set PEERSTORE_PASSPHRASE, pass --passphrase-file, or run in a terminal",
            path.display()
        ),
        other => anyhow::anyhow!("{}: {other}", path.display()),
    }
}

fn show(id: &Identity, path: &std::path::Path) {
    println!("key file     {}", path.display());
    println!("user id      {}", id.user_id());
    println!("fingerprint  {}", id.fingerprint());
}

fn run(args: Args) -> Result<()> {
    let mut rng = rand::rngs::OsRng;
    match &args.command {
        Cmd::Init {
            import,
            no_passphrase,
            force,
        } => {
            let path = key_path(&args)?;
            if !force {
                // Before the slow key generation, not only at the write.
                keyfile::ensure_free(&path)?;
            }
            let (identity, text) = match import {
                Some(src) => {
                    // Validate before anything is written.
                    let text = std::fs::read_to_string(src)
                        .with_context(|| format!("cannot read {}", src.display()))?;
                    let pass = if pem_is_encrypted(&text) {
                        passphrase(&args, Some("Passphrase of the imported file: "), false)?
                    } else {
                        None
                    };
                    let id = Identity::from_pem(
                        &text,
                        pass.as_ref().map(|p| p.as_slice()),
                        MIN_KEY_BITS_DEFAULT,
                    )
                    .map_err(|e| explain(e, src))?;
                    (id, Zeroizing::new(text))
                }
                None => {
                    let pass = if *no_passphrase {
                        None
                    } else {
                        match passphrase(&args, Some("New passphrase: "), true)? {
                            Some(p) => Some(p),
                            None => bail!(
                                "choose how to protect the key file: set PEERSTORE_PASSPHRASE, pass --passphrase-file, run in a terminal to be asked, or pass --no-passphrase"
                            ),
                        }
                    };
                    eprintln!("generating a {USER_KEY_BITS}-bit identity (a few seconds)...");
                    let id = Identity::generate(&mut rng, USER_KEY_BITS)
                        .map_err(|e| anyhow::anyhow!("cannot generate keys: {e}"))?;
                    let pem = id
                        .to_pem(&mut rng, pass.as_ref().map(|p| p.as_slice()))
                        .map_err(|e| anyhow::anyhow!("cannot encode the key file: {e}"))?;
                    (id, pem)
                }
            };
            keyfile::write_private(&path, text.as_bytes(), *force)?;
            show(&identity, &path);
            Ok(())
        }
        Cmd::Whoami => {
            let id = load(&args)?;
            show(&id, &key_path(&args)?);
            Ok(())
        }
        Cmd::Trust { pem } => {
            let key = keyfile::read_public(pem)?;
            let dir = trust_dir()?;
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            let fpr = keyfile::fingerprint(&key);
            let path = dir.join(format!("{}.pem", &fpr[..16]));
            std::fs::write(&path, keyfile::public_pem(&key)?)
                .with_context(|| format!("cannot write {}", path.display()))?;
            println!("trusting the ring root {fpr}");
            Ok(())
        }
        Cmd::Register => with_files(&args, |mut f| async move {
            if f.register().await? {
                println!("registered user {}", hex(&f.user_id().0));
            } else {
                println!("user {} was already registered", hex(&f.user_id().0));
            }
            Ok(())
        }),
        Cmd::Backup { path } => {
            let path = path.clone();
            with_files(&args, |mut f| async move {
                f.register().await?;
                f.client().spread().await?;
                let bar = Bar::new(tree_size(&path));
                let started = std::time::Instant::now();
                let rep = f.backup(&path, &bar).await?;
                bar.finish();
                let secs = started.elapsed().as_secs_f64().max(1e-3);
                println!(
                    "stored {} files ({}), {} unchanged, in {:.1} s ({:.1} MB/s)",
                    rep.files_stored,
                    human(rep.bytes_stored),
                    rep.files_unchanged,
                    secs,
                    rep.bytes_stored as f64 / secs / 1e6
                );
                if !rep.failed.is_empty() {
                    for (p, why) in &rep.failed {
                        eprintln!("not backed up: {p}: {why}");
                    }
                    bail!(
                        "{} files were not backed up (see above); run the backup again",
                        rep.failed.len()
                    );
                }
                Ok(())
            })
        }
        Cmd::Restore { path, to } => {
            let (path, to) = (path.clone(), to.clone());
            with_files(&args, |mut f| async move {
                std::fs::create_dir_all(&to)
                    .with_context(|| format!("cannot create {}", to.display()))?;
                f.client().spread().await?;
                let bar = Bar::new(0);
                let started = std::time::Instant::now();
                let rep = if files::parse_link(&path).is_ok() {
                    f.restore_shared(&path, &to, &bar).await?
                } else {
                    f.restore(&path, &to, &bar).await?
                };
                bar.finish();
                let secs = started.elapsed().as_secs_f64().max(1e-3);
                println!(
                    "restored {} files ({}) in {:.1} s ({:.1} MB/s)",
                    rep.files,
                    human(rep.bytes),
                    secs,
                    rep.bytes as f64 / secs / 1e6
                );
                if !rep.failed.is_empty() {
                    for (p, why) in &rep.failed {
                        eprintln!("not restored: {p}: {why}");
                    }
                    bail!("{} files were not restored (see above)", rep.failed.len());
                }
                Ok(())
            })
        }
        Cmd::Ls { path, links } => {
            let path = path.clone().unwrap_or_default();
            let links = *links;
            with_files(&args, |mut f| async move {
                let me = f.user_id();
                let cat = f.catalog().await?;
                let path = cat.resolve(&path);
                let list = cat.under(&path);
                if list.is_empty() && !path.is_empty() {
                    bail!("nothing backed up at {path}");
                }
                let mut out = std::io::stdout().lock();
                for (p, e) in list {
                    let line = if links {
                        let l = files::link(me, &e.file_id);
                        writeln!(out, "{:>12}  {}  {}  {}", e.size, when(e.mtime_ms), l, p)
                    } else {
                        writeln!(out, "{:>12}  {}  {}", e.size, when(e.mtime_ms), p)
                    };
                    if let Err(e) = line {
                        // `peerstore ls | head` closes the pipe early: fine.
                        if e.kind() == std::io::ErrorKind::BrokenPipe {
                            return Ok(());
                        }
                        return Err(e.into());
                    }
                }
                Ok(())
            })
        }
        Cmd::Rm { path } => {
            let path = path.clone();
            with_files(&args, |mut f| async move {
                let n = f.rm(&path).await?;
                println!("removed {n} files");
                Ok(())
            })
        }
        Cmd::Share { path, with } => {
            let (path, user) = (path.clone(), files::parse_user(with)?);
            with_files(&args, |mut f| async move {
                for (p, link) in f.share(&path, user).await? {
                    println!("{link}  {p}");
                }
                Ok(())
            })
        }
        Cmd::Revoke { path, from } => {
            let (path, user) = (path.clone(), files::parse_user(from)?);
            with_files(&args, |mut f| async move {
                let n = f.revoke(&path, user).await?;
                println!("revoked on {n} files (re-encrypted under new keys)");
                Ok(())
            })
        }
        Cmd::Ring { json } => {
            let json = *json;
            with_files(&args, |mut f| async move {
                let st = f.client().status().await?;
                print_ring(&st, json);
                Ok(())
            })
        }
    }
}

/// Where `peerstore trust` keeps the ring roots it trusts.
fn trust_dir() -> Result<PathBuf> {
    dirs::data_dir()
        .map(|d| d.join("peerstore").join("trust"))
        .context("no data directory on this system")
}

/// The ring roots to trust: `--trust` files and the trusted directory.
fn trust_store(args: &Args) -> Result<TrustStore> {
    let mut files = args.trust.clone();
    if let Ok(dir) = trust_dir() {
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                files.push(e.path());
            }
        }
    }
    if files.is_empty() {
        bail!(
            "no ring root is trusted yet: pass --trust ROOT.pub.pem (the node.pub.pem of the ring's first node) or run `peerstore trust ROOT.pub.pem` once"
        );
    }
    let mut trust = TrustStore::new(MIN_KEY_BITS_DEFAULT);
    for f in files {
        let key = keyfile::read_public(&f)?;
        trust
            .add_root(&key)
            .map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?;
    }
    Ok(trust)
}

/// Runs `f` with the user's files in the ring.
fn with_files<F, Fut>(args: &Args, f: F) -> Result<()>
where
    F: FnOnce(Files) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let id = load(args)?;
    let trust = trust_store(args)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    let node = args.node;
    // On SIGINT or SIGTERM the command's future is dropped: a restore's
    // writer thread then sees its input end and deletes the file it was
    // writing, and the runtime waits for it before the process exits.
    let r = rt.block_on(async move {
        let work = async {
            let c = NodeClient::connect(node, id.signer().clone(), trust).await?;
            f(Files::new(c, id)).await
        };
        tokio::select! {
            r = work => r,
            i = interrupted() => Err(anyhow::Error::new(i)),
        }
    });
    rt.shutdown_timeout(std::time::Duration::from_secs(10));
    r
}

/// A progress bar on a terminal, nothing otherwise.
struct Bar(Option<indicatif::ProgressBar>);

impl Bar {
    fn new(total: u64) -> Bar {
        if !std::io::stderr().is_terminal() {
            return Bar(None);
        }
        let b = if total > 0 {
            indicatif::ProgressBar::new(total)
        } else {
            indicatif::ProgressBar::no_length()
        };
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{bytes}/{total_bytes} {wide_bar} {bytes_per_sec} {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        Bar(Some(b))
    }

    fn finish(&self) {
        if let Some(b) = &self.0 {
            b.finish_and_clear();
        }
    }
}

impl files::Progress for Bar {
    fn bytes(&self, n: u64) {
        if let Some(b) = &self.0 {
            b.inc(n);
        }
    }

    fn note(&self, line: &str) {
        match &self.0 {
            Some(b) => b.println(line),
            None => eprintln!("{line}"),
        }
    }
}

/// Bytes under `path` (for the progress bar's total).
fn tree_size(path: &std::path::Path) -> u64 {
    walkdir::WalkDir::new(path)
        .into_iter()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_file())
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}

fn human(n: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

fn when(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}",
        rem / 3600,
        (rem % 3600) / 60
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian.
fn civil(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn addr_text(a: &Addr) -> String {
    match a {
        Addr::Tcp(s) => s.to_string(),
        Addr::Slot(n) => format!("slot:{n}"),
    }
}

fn peer_json(p: &Peer) -> serde_json::Value {
    serde_json::json!({ "id": hex(&p.id.0), "addr": addr_text(&p.addr) })
}

fn print_ring(st: &RingStatus, json: bool) {
    if json {
        let v = serde_json::json!({
            "id": hex(&st.me.id.0),
            "addr": addr_text(&st.me.addr),
            "joined": st.joined,
            "successors": st.successors.iter().map(peer_json).collect::<Vec<_>>(),
            "predecessor": st.predecessor.as_ref().map(peer_json),
            "fingers": st.fingers.iter().map(peer_json).collect::<Vec<_>>(),
            "items": st.items,
            "bytes": st.bytes,
            "replicas": st.replicas,
        });
        println!("{v}");
        return;
    }
    let short = |p: &Peer| format!("{}  {}", &hex(&p.id.0)[..12], addr_text(&p.addr));
    println!(
        "node         {}  ({})",
        short(&st.me),
        if st.joined {
            "in the ring"
        } else {
            "not in a ring"
        }
    );
    println!("stores       {} items, {} bytes", st.items, st.bytes);
    println!("replicas     {} per key", st.replicas);
    match &st.predecessor {
        Some(p) => println!("predecessor  {}", short(p)),
        None => println!("predecessor  (none)"),
    }
    println!("successors");
    for (i, p) in st.successors.iter().enumerate() {
        println!("  {:>2}  {}", i + 1, short(p));
    }
    println!("fingers      {} distinct", st.fingers.len());
}
