//! Two SHA-256 compressions at once on the x86 SHA extensions.
//!
//! `sha256rnds2` is fast but each round waits on the one before, so one
//! message keeps the unit busy only part of the time (about 1.8 GB/s on
//! the machines we measured). Two independent messages, their rounds
//! interleaved in one loop, fill those gaps: 3.4 GB/s for the pair. The
//! per-message steps are the published SHA-NI sequence (the one the `sha2`
//! crate runs for a single message); only the interleaving is ours. Every
//! result is checked against `sha2` in `hash`'s tests.

#[cfg(target_arch = "x86")]
use core::arch::x86::*;
#[cfg(target_arch = "x86_64")]
use core::arch::x86_64::*;

/// FIPS 180-4 round constants.
const K: [u32; 64] = [
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
];

/// Whether this CPU has what [`compress_two`] runs on.
pub(super) fn available() -> bool {
    std::arch::is_x86_feature_detected!("sha")
        && std::arch::is_x86_feature_detected!("sse2")
        && std::arch::is_x86_feature_detected!("ssse3")
        && std::arch::is_x86_feature_detected!("sse4.1")
}

/// `a` absorbs the 64-byte blocks of `da` and `b` those of `db`, as
/// `sha2::compress256` would one after the other. Both must hold the same
/// whole number of blocks. Panics if they do not or if the CPU lacks the
/// extensions ([`available`]): callers check first.
pub(super) fn compress_two(a: &mut [u32; 8], da: &[u8], b: &mut [u32; 8], db: &[u8]) {
    assert!(
        da.len() == db.len() && da.len().is_multiple_of(64),
        "two lanes of whole, equal blocks"
    );
    assert!(available(), "SHA extensions checked by the caller");
    // SAFETY: the CPU has every feature `two` is compiled for (just
    // checked), and both inputs hold `da.len() / 64` whole blocks, all
    // that `two` reads.
    unsafe { two([a, b], [da, db]) }
}

#[inline]
#[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
fn rounds4(abef: &mut [__m128i; 2], cdgh: &mut [__m128i; 2], w: &[__m128i; 2], kv: __m128i) {
    for l in 0..2 {
        let t1 = _mm_add_epi32(w[l], kv);
        cdgh[l] = _mm_sha256rnds2_epu32(cdgh[l], abef[l], t1);
        let t2 = _mm_shuffle_epi32(t1, 0x0E);
        abef[l] = _mm_sha256rnds2_epu32(abef[l], cdgh[l], t2);
    }
}

#[inline]
#[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
fn schedule(
    w0: &[__m128i; 2],
    w1: &[__m128i; 2],
    w2: &[__m128i; 2],
    w3: &[__m128i; 2],
) -> [__m128i; 2] {
    let one = |l: usize| {
        let t1 = _mm_sha256msg1_epu32(w0[l], w1[l]);
        let t2 = _mm_alignr_epi8(w3[l], w2[l], 4);
        _mm_sha256msg2_epu32(_mm_add_epi32(t1, t2), w3[l])
    };
    [one(0), one(1)]
}

/// # Safety
///
/// The CPU has SHA, SSE2, SSSE3 and SSE4.1, and `data[1]` holds at least
/// the `data[0].len() / 64` blocks read from `data[0]`.
#[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
unsafe fn two(states: [&mut [u32; 8]; 2], data: [&[u8]; 2]) {
    let blocks = data[0].len() / 64;
    let mask = _mm_set_epi64x(
        0x0C0D_0E0F_0809_0A0Bu64 as i64,
        0x0405_0607_0001_0203u64 as i64,
    );
    let mut abef = [_mm_setzero_si128(); 2];
    let mut cdgh = [_mm_setzero_si128(); 2];
    for l in 0..2 {
        // SAFETY: a `[u32; 8]` is two 16-byte vectors; unaligned loads.
        let (dcba, efgh) = unsafe {
            let p = states[l].as_ptr() as *const __m128i;
            (_mm_loadu_si128(p), _mm_loadu_si128(p.add(1)))
        };
        let cdab = _mm_shuffle_epi32(dcba, 0xB1);
        let efgh = _mm_shuffle_epi32(efgh, 0x1B);
        abef[l] = _mm_alignr_epi8(cdab, efgh, 8);
        cdgh[l] = _mm_blend_epi16(efgh, cdab, 0xF0);
    }
    for b in 0..blocks {
        let (abef_was, cdgh_was) = (abef, cdgh);
        let mut w = [[_mm_setzero_si128(); 2]; 4];
        for l in 0..2 {
            // SAFETY: block `b` of lane `l` is in bounds (the caller's
            // promise); unaligned loads.
            unsafe {
                let p = data[l].as_ptr().add(64 * b) as *const __m128i;
                for (j, wj) in w.iter_mut().enumerate() {
                    wj[l] = _mm_shuffle_epi8(_mm_loadu_si128(p.add(j)), mask);
                }
            }
        }
        let [mut w0, mut w1, mut w2, mut w3] = w;
        // SAFETY: `K` holds 64 words, 16 groups of four.
        let k = |i: usize| unsafe { _mm_loadu_si128(K.as_ptr().add(4 * i) as *const __m128i) };
        rounds4(&mut abef, &mut cdgh, &w0, k(0));
        rounds4(&mut abef, &mut cdgh, &w1, k(1));
        rounds4(&mut abef, &mut cdgh, &w2, k(2));
        rounds4(&mut abef, &mut cdgh, &w3, k(3));
        for i in 4..16 {
            let w4 = schedule(&w0, &w1, &w2, &w3);
            rounds4(&mut abef, &mut cdgh, &w4, k(i));
            (w0, w1, w2, w3) = (w1, w2, w3, w4);
        }
        for l in 0..2 {
            abef[l] = _mm_add_epi32(abef[l], abef_was[l]);
            cdgh[l] = _mm_add_epi32(cdgh[l], cdgh_was[l]);
        }
    }
    for l in 0..2 {
        let feba = _mm_shuffle_epi32(abef[l], 0x1B);
        let dchg = _mm_shuffle_epi32(cdgh[l], 0xB1);
        let dcba = _mm_blend_epi16(feba, dchg, 0xF0);
        let hgef = _mm_alignr_epi8(dchg, feba, 8);
        // SAFETY: as for the loads.
        unsafe {
            let p = states[l].as_mut_ptr() as *mut __m128i;
            _mm_storeu_si128(p, dcba);
            _mm_storeu_si128(p.add(1), hgef);
        }
    }
}
