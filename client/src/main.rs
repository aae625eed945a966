//! `peerstore`: the PeerStore command-line client.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use peerstore_client::keyfile;
use peerstore_core::identity::{pem_is_encrypted, Identity, IdentityError, USER_KEY_BITS};
use peerstore_core::record::MIN_KEY_BITS_DEFAULT;
use zeroize::Zeroizing;

/// A passphrase, wiped when dropped.
type Secret = Zeroizing<Vec<u8>>;

/// The PeerStore client: your identity and, as the network milestone lands,
/// your files (backup, restore, ls, rm, share, revoke).
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
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("peerstore: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn key_path(args: &Args) -> Result<PathBuf> {
    match &args.key {
        Some(p) => Ok(p.clone()),
        None => {
            keyfile::default_path().context("no data directory on this system: pass --key PATH")
        }
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
    println!("user id      {:?}", id.user_id());
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
    }
}
