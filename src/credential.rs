//! Just-in-time credentials for the database proxy: a random one-time secret bound to a grant,
//! valid until the grant ends, stored only as a SCRAM-SHA-256 verifier (the PostgreSQL format),
//! so the gateway can check a SCRAM login without ever keeping the secret.

use base64::engine::general_purpose::STANDARD as B64;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine;
use ring::{digest, hmac, pbkdf2};

/// PBKDF2 rounds; PostgreSQL's default for SCRAM-SHA-256.
pub const ITERATIONS: u32 = 4096;

/// A fresh secret: 24 random bytes, URL-safe base64 (32 characters).
pub fn new_secret() -> String {
    let bytes: [u8; 24] = rand::random();
    B64URL.encode(bytes)
}

fn salted(password: &str, salt: &[u8], iterations: u32) -> [u8; 32] {
    let mut out = [0u8; 32];
    // `iterations` is never zero: callers pass ITERATIONS or a parsed, checked value.
    let rounds = std::num::NonZeroU32::new(iterations.max(1)).unwrap_or(std::num::NonZeroU32::MIN);
    pbkdf2::derive(
        pbkdf2::PBKDF2_HMAC_SHA256,
        rounds,
        salt,
        password.as_bytes(),
        &mut out,
    );
    out
}

fn hmac_sha256(key: &[u8], msg: &[u8]) -> Vec<u8> {
    hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), msg)
        .as_ref()
        .to_vec()
}

/// The SCRAM-SHA-256 verifier of a secret, as PostgreSQL stores it:
/// `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>` (base64).
pub fn verifier(secret: &str) -> String {
    let salt: [u8; 16] = rand::random();
    verifier_with(secret, &salt, ITERATIONS)
}

fn verifier_with(secret: &str, salt: &[u8], iterations: u32) -> String {
    let sp = salted(secret, salt, iterations);
    let client_key = hmac_sha256(&sp, b"Client Key");
    let stored_key = digest::digest(&digest::SHA256, &client_key);
    let server_key = hmac_sha256(&sp, b"Server Key");
    format!(
        "SCRAM-SHA-256${iterations}:{}${}:{}",
        B64.encode(salt),
        B64.encode(stored_key.as_ref()),
        B64.encode(server_key)
    )
}

/// Checks a secret against a verifier (used by tests and by password-in-TLS fallbacks).
pub fn matches(secret: &str, verifier: &str) -> bool {
    let Some(rest) = verifier.strip_prefix("SCRAM-SHA-256$") else {
        return false;
    };
    let Some((iter_salt, _keys)) = rest.split_once('$') else {
        return false;
    };
    let Some((iters, salt)) = iter_salt.split_once(':') else {
        return false;
    };
    let (Ok(iters), Ok(salt)) = (iters.parse::<u32>(), B64.decode(salt)) else {
        return false;
    };
    if iters == 0 || iters > 1_000_000 {
        return false;
    }
    let want = verifier_with(secret, &salt, iters);
    // Compare without an early exit so timing does not reveal how much matched.
    want.len() == verifier.len()
        && want
            .bytes()
            .zip(verifier.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifier_matches_only_its_secret() {
        let s = new_secret();
        assert_eq!(s.len(), 32);
        let v = verifier(&s);
        assert!(v.starts_with("SCRAM-SHA-256$4096:"));
        assert!(!v.contains(&s));
        assert!(matches(&s, &v));
        assert!(!matches("wrong", &v));
        assert!(!matches(&s, "md5abc"));
        assert_ne!(
            verifier(&s),
            v,
            "salted: two verifiers of one secret differ"
        );
    }

    #[test]
    fn verifier_agrees_with_rfc7677_vector() {
        // RFC 7677 section 3: user "user", password "pencil", salt W22ZaJ0SNY7soEsUEjb6gQ==,
        // 4096 iterations; the server signature key and stored key follow from them.
        let salt = B64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").expect("salt");
        let v = verifier_with("pencil", &salt, 4096);
        let sp = salted("pencil", &salt, 4096);
        assert_eq!(
            B64.encode(sp),
            "xKSVEDI6tPlSysH6mUQZOeeOp01r6B3fcJbodRPcYV0=",
            "salted password per RFC 7677"
        );
        // StoredKey and ServerKey as RFC 7677's exchange implies (its server signature
        // v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4= follows from this ServerKey).
        assert_eq!(
            v,
            "SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=:wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU="
        );
    }
}
