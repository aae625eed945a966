//! Crypto costs on this machine, printed as figures (not timed assertions):
//! handshake cost, session frame throughput, at-rest chunk encryption
//! against `openssl speed -evp aes-256-cbc`, and RSA sign/verify rates.
//!
//!     cargo bench -p peerstore-core --bench crypto
//!
//! `--quick` runs fewer iterations.

use std::hint::black_box;
use std::process::Command;
use std::time::{Duration, Instant};

use aes::Aes256;
use cbc::cipher::{block_padding::Pkcs7, BlockEncryptMut, KeyIvInit};
use peerstore_core::filecrypt::{new_file_id, Decryptor, Encryptor, FileKey, CHUNK_BYTES};
use peerstore_core::record::verify;
use peerstore_core::session::{Initiator, Opened, Responder, SessionConfig};
use peerstore_core::Signer;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use sha2::{Digest, Sha256};

const MIB: f64 = 1024.0 * 1024.0;

/// Runs `f` until `budget` has passed (at least `min` times); seconds per call.
fn time_per_call(budget: Duration, min: u32, mut f: impl FnMut()) -> f64 {
    let t = Instant::now();
    let mut n = 0u32;
    while n < min || t.elapsed() < budget {
        f();
        n += 1;
    }
    t.elapsed().as_secs_f64() / n as f64
}

/// `openssl speed` on 16 KiB blocks for one algorithm, in MB/s (10^6), or
/// None if openssl is not installed.
fn openssl_mb_s(secs: u32, alg: &[&str], label: &str) -> Option<f64> {
    let out = Command::new("openssl")
        .args(["speed", "-seconds", &secs.to_string(), "-bytes", "16384"])
        .args(alg)
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    // The last line: "AES-256-CBC   123456.78k"; k = 1000 bytes per second.
    let line = text
        .lines()
        .rev()
        .find(|l| l.to_ascii_lowercase().starts_with(label))?;
    let k = line.split_whitespace().last()?.trim_end_matches('k');
    Some(k.parse::<f64>().ok()? / 1000.0)
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let budget = Duration::from_millis(if quick { 300 } else { 2_000 });
    let mut rng = ChaCha20Rng::seed_from_u64(1);
    println!(
        "peerstore crypto bench{}",
        if quick { " --quick" } else { "" }
    );

    // --- RSA sign / verify -------------------------------------------------
    println!("\n== RSA-PSS (SHA-256), blinded signing ==");
    let mut signers = Vec::new();
    for bits in [2048usize, 3072] {
        let t = Instant::now();
        let s = Signer::generate(&mut rng, bits).expect("keygen");
        let gen_s = t.elapsed().as_secs_f64();
        let msg = [7u8; 64];
        let sign = time_per_call(budget, 5, || {
            black_box(s.sign(&mut rng, &msg));
        });
        let sig = s.sign(&mut rng, &msg);
        let ver = time_per_call(budget, 20, || {
            verify(s.public_der(), &msg, &sig, 1024).expect("verifies");
        });
        println!(
            "  {bits} bits: keygen {:.2} s; sign {:.0}/s ({:.2} ms); verify {:.0}/s ({:.3} ms)",
            gen_s,
            1.0 / sign,
            sign * 1e3,
            1.0 / ver,
            ver * 1e3
        );
        signers.push(s);
    }

    // --- Handshake ---------------------------------------------------------
    println!("\n== Session handshake (2048-bit identities, 2048-bit ephemeral key) ==");
    let cfg = SessionConfig::default();
    let now = 1_000_000u64;
    let (a, b) = (
        &signers[0],
        &Signer::generate(&mut rng, 2048).expect("keygen"),
    );
    let t = Instant::now();
    let responder = Responder::new(&mut rng, now, &cfg, b, Vec::new()).expect("responder");
    println!(
        "  responder start-up (ephemeral key generation, once per rotation): {:.0} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
    let mut session_pair = None;
    let hs = time_per_call(budget, 5, || {
        let (init, hello) = Initiator::new(&mut rng, &cfg, a, Vec::new()).expect("init");
        let (pending, challenge) = responder
            .handle_hello(&mut rng, now, &hello)
            .expect("hello");
        let (wait, auth) = init
            .handle_challenge(&mut rng, now, &challenge)
            .expect("challenge");
        let (server, finish) = responder
            .handle_auth(&mut rng, now, pending, &auth)
            .expect("auth");
        let client = wait.handle_finish(&finish).expect("finish");
        session_pair = Some((client, server));
    });
    println!(
        "  full handshake, both sides on one core: {:.1} ms ({:.0} handshakes/s)",
        hs * 1e3,
        1.0 / hs
    );

    // --- Frames ------------------------------------------------------------
    println!("\n== Session frames (AES-256-CBC + HMAC-SHA256, seal and open) ==");
    let (mut client, mut server) = session_pair.expect("handshake ran");
    for size in [1024usize, 64 * 1024, 1024 * 1024] {
        let mut payload = vec![0u8; size];
        rng.fill_bytes(&mut payload);
        let per = time_per_call(budget, 3, || {
            let f = client.seal(&mut rng, &payload).expect("seal");
            match server.open(&f) {
                Ok(Opened::Data(p)) => assert_eq!(p.len(), size),
                other => panic!("frame did not open: {other:?}"),
            }
        });
        println!(
            "  {:>7} B frames: {:.0} MB/s seal+open ({:.0} MB/s per side)",
            size,
            size as f64 / per / MIB,
            2.0 * size as f64 / per / MIB
        );
    }

    // --- At rest -----------------------------------------------------------
    println!("\n== At-rest encryption against openssl speed -evp aes-256-cbc ==");
    let mut chunk = vec![0u8; 1024 * 1024];
    rng.fill_bytes(&mut chunk);
    let key = [3u8; 32];
    let iv = [4u8; 16];
    let mut buf = vec![0u8; chunk.len() + 16];
    let raw = time_per_call(budget, 3, || {
        let enc = cbc::Encryptor::<Aes256>::new(&key.into(), &iv.into());
        black_box(
            enc.encrypt_padded_b2b_mut::<Pkcs7>(&chunk, &mut buf)
                .expect("buffer fits")
                .len(),
        );
    });
    let raw_mb = chunk.len() as f64 / raw / 1e6;
    println!("  cbc crate, AES-256-CBC only, 1 MiB: {raw_mb:.0} MB/s");
    let sha = time_per_call(budget, 3, || {
        black_box(Sha256::digest(&chunk));
    });
    println!(
        "  sha2 crate, SHA-256 only, 1 MiB: {:.0} MB/s",
        chunk.len() as f64 / sha / 1e6
    );
    let two = time_per_call(budget, 3, || {
        let (mut a, mut b) = (
            peerstore_core::hash::Sha256::new(),
            peerstore_core::hash::Sha256::new(),
        );
        peerstore_core::hash::update_two(&mut a, &chunk, &mut b, &chunk);
        black_box((a.finalize(), b.finalize()));
    });
    println!(
        "  two SHA-256 side by side (hash::update_two{}), 1 MiB each: {:.0} MB/s hashed, {:.2}x one alone",
        if peerstore_core::hash::two_at_once() { ", SHA extensions" } else { ", one after the other here" },
        2.0 * chunk.len() as f64 / two / 1e6,
        2.0 * sha / two
    );
    let (seal, open) = at_rest_mb_s(&mut rng, budget);
    println!("  file chunks (AES-256-CBC + HMAC-SHA256; seal also hashes the block id), 1 MiB: seal {seal:.0} MB/s, open {open:.0} MB/s");
    let secs = if quick { 1 } else { 3 };
    match (
        openssl_mb_s(secs, &["-evp", "aes-256-cbc"], "aes-256-cbc"),
        openssl_mb_s(secs, &["-hmac", "sha256"], "hmac(sha256)"),
        openssl_mb_s(secs, &["-evp", "sha256"], "sha256"),
    ) {
        (Some(ossl), hmac, sha) => {
            println!("  openssl speed -evp aes-256-cbc, 16 KiB blocks: {ossl:.0} MB/s");
            println!(
                "  ratio, cbc crate / openssl aes-256-cbc: {:.2} (target >= 0.7)",
                raw_mb / ossl
            );
            if let (Some(hmac), Some(sha)) = (hmac, sha) {
                // Encrypt-then-MAC costs both passes, and sealing also
                // hashes the sealed chunk for its block id: the fair
                // baseline is openssl doing the same passes in sequence.
                let open_base = 1.0 / (1.0 / ossl + 1.0 / hmac);
                let seal_base = 1.0 / (1.0 / ossl + 1.0 / hmac + 1.0 / sha);
                println!(
                    "  openssl speed -hmac sha256: {hmac:.0} MB/s; -evp sha256: {sha:.0} MB/s"
                );
                println!(
                    "  openssl doing the same passes: seal (aes + hmac + block-id sha256) {seal_base:.0} MB/s, open (hmac + aes) {open_base:.0} MB/s"
                );
                println!(
                    "  ratio, file chunks / openssl same passes: seal {:.2}, open {:.2}",
                    seal / seal_base,
                    open / open_base
                );
            }
        }
        (None, _, _) => println!("  openssl not found: no baseline (apt-get install openssl)"),
    }
}

/// Seals and opens a 16-chunk file with the at-rest construction
/// (`filecrypt`); plaintext MB/s (10^6) each way.
fn at_rest_mb_s(rng: &mut ChaCha20Rng, budget: Duration) -> (f64, f64) {
    let key = FileKey::generate(rng);
    let file_id = new_file_id(rng);
    let mut plain = vec![0u8; 16 * CHUNK_BYTES];
    rng.fill_bytes(&mut plain);
    let mut sealed = Vec::new();
    let seal = time_per_call(budget, 2, || {
        let mut enc = Encryptor::new(&key, file_id);
        let mut chunks = enc.push(rng, &plain).expect("within the file limit");
        chunks.push(enc.finish(rng).last_chunk);
        sealed = chunks;
    });
    let open = time_per_call(budget, 2, || {
        let mut dec = Decryptor::new(&key, file_id);
        let mut n = 0;
        for c in &sealed {
            n += dec.push(c).expect("chunk verifies").len();
        }
        dec.finish().expect("complete");
        assert_eq!(n, plain.len());
    });
    let mb = plain.len() as f64 / 1e6;
    (mb / seal, mb / open)
}
