//! `peerstore init` and `whoami` as a user runs them: the key file is
//! created with mode 0600, never silently replaced, protected by a
//! passphrase when one is given, and every mistake is a clear error.

use std::path::Path;
use std::process::{Command, Output};

fn peerstore(args: &[&str], pass: Option<&str>) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_peerstore"));
    c.args(args).env_remove("PEERSTORE_PASSPHRASE");
    if let Some(p) = pass {
        c.env("PEERSTORE_PASSPHRASE", p);
    }
    c.output().expect("peerstore runs")
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn user_id_line(stdout: &str) -> String {
    stdout
        .lines()
        .find(|l| l.starts_with("user id"))
        .expect("prints the user id")
        .to_string()
}

#[cfg(unix)]
fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).expect("exists").permissions().mode() & 0o777
}

#[test]
fn init_writes_a_private_key_file_and_whoami_reads_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = dir.path().join("sub/user.pem");
    let k = key.to_str().expect("utf-8");
    let o = peerstore(&["--key", k, "init", "--no-passphrase"], None);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(out.contains("fingerprint"), "{out}");
    #[cfg(unix)]
    assert_eq!(mode(&key), 0o600);
    let who = peerstore(&["--key", k, "whoami"], None);
    assert!(who.status.success(), "{}", text(&who).1);
    assert_eq!(user_id_line(&text(&who).0), user_id_line(&out));

    // A second init does not replace the identity.
    let before = std::fs::read(&key).expect("read");
    let again = peerstore(&["--key", k, "init", "--no-passphrase"], None);
    assert!(!again.status.success());
    assert!(
        text(&again).1.contains("already exists"),
        "{}",
        text(&again).1
    );
    assert_eq!(
        std::fs::read(&key).expect("read"),
        before,
        "old key untouched"
    );

    // Import it elsewhere: same user.
    let copy = dir.path().join("copy.pem");
    let c = copy.to_str().expect("utf-8");
    let imp = peerstore(&["--key", c, "init", "--import", k], None);
    assert!(imp.status.success(), "{}", text(&imp).1);
    assert_eq!(user_id_line(&text(&imp).0), user_id_line(&out));
    #[cfg(unix)]
    assert_eq!(mode(&copy), 0o600);
}

#[test]
fn a_passphrase_protects_the_key_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = dir.path().join("user.pem");
    let k = key.to_str().expect("utf-8");
    let o = peerstore(&["--key", k, "init"], Some("correct horse"));
    assert!(o.status.success(), "{}", text(&o).1);
    let pem = std::fs::read_to_string(&key).expect("read");
    assert!(pem.contains("ENCRYPTED PRIVATE KEY"));
    assert!(!pem.contains("correct horse"));

    let none = peerstore(&["--key", k, "whoami"], None);
    assert!(!none.status.success());
    assert!(text(&none).1.contains("passphrase"), "{}", text(&none).1);
    let wrong = peerstore(&["--key", k, "whoami"], Some("battery staple"));
    assert!(!wrong.status.success());
    assert!(text(&wrong).1.contains("passphrase"), "{}", text(&wrong).1);
    let right = peerstore(&["--key", k, "whoami"], Some("correct horse"));
    assert!(right.status.success(), "{}", text(&right).1);
    assert_eq!(user_id_line(&text(&right).0), user_id_line(&text(&o).0));
}

#[test]
fn mistakes_are_clear_errors_and_write_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = dir.path().join("user.pem");
    let k = key.to_str().expect("utf-8");
    // No passphrase choice and no terminal to ask on.
    let o = peerstore(&["--key", k, "init"], None);
    assert!(!o.status.success());
    assert!(text(&o).1.contains("--no-passphrase"), "{}", text(&o).1);
    assert!(!key.exists());
    // Importing something that is not a key file.
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "-----BEGIN PRIVATE KEY-----\nnot base64\n").expect("write");
    let j = junk.to_str().expect("utf-8");
    let o = peerstore(&["--key", k, "init", "--import", j], None);
    assert!(!o.status.success());
    let err = text(&o).1;
    assert!(
        err.contains("junk.pem") && !err.contains("panicked"),
        "{err}"
    );
    assert!(!key.exists());
    // Whoami with no key file says how to make one.
    let o = peerstore(&["--key", k, "whoami"], None);
    assert!(text(&o).1.contains("peerstore init"), "{}", text(&o).1);
}

#[cfg(unix)]
#[test]
fn a_key_file_others_can_read_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let key = dir.path().join("user.pem");
    let k = key.to_str().expect("utf-8");
    assert!(peerstore(&["--key", k, "init", "--no-passphrase"], None)
        .status
        .success());
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let o = peerstore(&["--key", k, "whoami"], None);
    assert!(!o.status.success());
    assert!(text(&o).1.contains("chmod 600"), "{}", text(&o).1);
}
