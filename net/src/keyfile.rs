//! Key files on disk, a user's or a node's: private keys written
//! atomically with mode 0600, never over an existing identity unless asked,
//! and refused when others can read them; public keys as SPKI PEM, which
//! is what operators hand each other to trust.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use peerstore_core::identity::MAX_PEM_BYTES;

/// Fails, saying how to proceed, if a key file is already at `path` (an
/// identity is never replaced unless asked).
pub fn ensure_free(path: &Path) -> Result<()> {
    if path.exists() {
        bail!(
            "{} already exists: it holds an identity; pass --force to replace it (the old identity is lost unless you kept a copy)",
            path.display()
        );
    }
    Ok(())
}

/// Writes `contents` to `path` with mode 0600: to a temporary file in the
/// same directory, synced, then linked into place (which fails if `path`
/// exists and `replace` is false), and the directory synced. A crash
/// leaves either the old file or the new one, never half of one.
pub fn write_private(path: &Path, contents: &[u8], replace: bool) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    create_dir_private(&dir)?;
    if !replace {
        ensure_free(path)?;
    }
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("key"),
        std::process::id()
    ));
    let _ = fs::remove_file(&tmp);
    let mut f = open_private(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let written = f.write_all(contents).and_then(|()| f.sync_all());
    drop(f);
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("cannot write {}", tmp.display()));
    }
    let placed = if replace {
        fs::rename(&tmp, path)
    } else {
        // A hard link never replaces an existing file.
        fs::hard_link(&tmp, path).and_then(|()| fs::remove_file(&tmp))
    };
    if let Err(e) = placed {
        let _ = fs::remove_file(&tmp);
        if e.kind() == io::ErrorKind::AlreadyExists {
            // Someone put one there since the check above.
            ensure_free(path)?;
        }
        return Err(e).with_context(|| format!("cannot put the key file at {}", path.display()));
    }
    File::open(&dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot sync {}", dir.display()))?;
    Ok(())
}

#[cfg(unix)]
fn open_private(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
}

#[cfg(not(unix))]
fn open_private(path: &Path) -> io::Result<File> {
    OpenOptions::new().write(true).create_new(true).open(path)
}

#[cfg(unix)]
fn create_dir_private(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.is_dir() {
        return Ok(());
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))
}

#[cfg(not(unix))]
fn create_dir_private(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))
}

/// Reads a key file: refused if others may read it (as ssh does) or if it
/// is larger than any key file.
pub fn read_private(path: &Path) -> Result<String> {
    let f = File::open(path).with_context(|| {
        format!(
            "cannot open the key file {} (create one with `peerstore init`)",
            path.display()
        )
    })?;
    check_mode(path, &f)?;
    let mut text = String::new();
    f.take(MAX_PEM_BYTES as u64 + 1)
        .read_to_string(&mut text)
        .with_context(|| format!("{} is not a text key file", path.display()))?;
    if text.len() > MAX_PEM_BYTES {
        bail!("{} is too large to be a key file", path.display());
    }
    Ok(text)
}

#[cfg(unix)]
fn check_mode(path: &Path, f: &File) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = f.metadata()?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        bail!(
            "{} can be read by other users (mode {mode:03o}); run `chmod 600 {}`",
            path.display(),
            path.display()
        );
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_mode(_path: &Path, _f: &File) -> Result<()> {
    Ok(())
}

const PUBLIC_LABEL: &str = "PUBLIC KEY";

/// A public key (SPKI DER) as PEM text.
pub fn public_pem(der: &[u8]) -> Result<String> {
    pkcs8::der::pem::encode_string(PUBLIC_LABEL, pkcs8::der::pem::LineEnding::LF, der)
        .map_err(|e| anyhow::anyhow!("encoding a public key: {e}"))
}

/// The SPKI DER in a public key file (a node's `node.pub.pem`).
pub fn read_public(path: &Path) -> Result<Vec<u8>> {
    let meta = fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    if meta.len() > 16 * 1024 {
        bail!("{} is too large to be a public key file", path.display());
    }
    let text =
        fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let (label, der) = pkcs8::der::pem::decode_vec(text.as_bytes()).map_err(|_| {
        anyhow::anyhow!(
            "{} is not a PEM public key (use a node's node.pub.pem)",
            path.display()
        )
    })?;
    if label != PUBLIC_LABEL {
        bail!(
            "{} holds a '{label}', not a public key (use a node's node.pub.pem)",
            path.display()
        );
    }
    Ok(der)
}

/// Hex SHA-256 of a public key (SPKI DER): the fingerprint operators pass
/// to `peerstore-node admit`.
pub fn fingerprint(der: &[u8]) -> String {
    peerstore_core::link::key_sha256(der)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
