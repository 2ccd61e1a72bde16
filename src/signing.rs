//! The gateway's manifest signing keys (Ed25519) and what verification trusts. The newest
//! trusted key signs; older keys stay in the key directory so recordings they signed still
//! verify after a rotation.
//!
//! Trust is pinned, never discovered: a key is trusted only when it is given (the config's
//! `[signing] trusted_keys`, the file `trusted_keys_file` names, or `verify --public-key`) or
//! certified by a trusted key through a rotation certificate (`keys rotate-signing`). A key
//! file that merely appears in `<keys_dir>/signing/` is never trusted.

use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ring::rand::SystemRandom;
use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};

/// A signing-key problem.
#[derive(Debug, thiserror::Error)]
pub enum SigningError {
    #[error("signing key {path}: {why}")]
    Key { path: PathBuf, why: String },
}

pub use crate::config::signing::default_pin_file;
pub use crate::config::signing::PublicKey;
pub use crate::config::SigningConfig;

impl SigningConfig {
    /// The trust these settings give, with the rotation certificates of `keys_dir`.
    pub fn trust(&self, keys_dir: &Path) -> Result<TrustSet, SigningError> {
        configured_trust(&self.trusted_keys, &self.trusted_keys_file, keys_dir)
    }
}

impl PublicKey {
    /// Parses the key lines written by [`PublicKey::line`]; `#` comments, blank lines and
    /// rotation certificates (see [`parse_trust`]) are skipped.
    pub fn parse_lines(text: &str) -> Result<Vec<PublicKey>, String> {
        parse_trust(text).map(|(keys, _)| keys)
    }

    /// Checks a signature over `msg`.
    pub fn verify(&self, msg: &[u8], sig: &[u8]) -> bool {
        UnparsedPublicKey::new(&ED25519, &self.raw)
            .verify(msg, sig)
            .is_ok()
    }
}

/// A rotation certificate: the key `signed_by` vouches for `key` from `issued_at` on.
/// Written by `keys rotate-signing` (the old key signs the new public key) and printed by
/// `keys show --signing` as one line:
/// `ed25519-cert <new key base64> <new key id> <old key id> <RFC 3339 time> <signature base64>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyCertificate {
    pub key: PublicKey,
    /// The id of the key that signed this certificate.
    pub signed_by: String,
    pub issued_at: String,
    pub signature: Vec<u8>,
}

/// The first word of a certificate line.
pub const CERT_TAG: &str = "ed25519-cert";

impl KeyCertificate {
    /// The exact bytes the old key signs.
    fn payload(key: &PublicKey, signed_by: &str, issued_at: &str) -> Vec<u8> {
        format!(
            "breakglass-signing-key-certificate-v1\n{}\n{}\n{signed_by}\n{issued_at}\n",
            B64.encode(&key.raw),
            key.id
        )
        .into_bytes()
    }

    /// The one-line form (see the type's docs).
    pub fn line(&self) -> String {
        format!(
            "{CERT_TAG} {} {} {} {} {}",
            B64.encode(&self.key.raw),
            self.key.id,
            self.signed_by,
            self.issued_at,
            B64.encode(&self.signature)
        )
    }

    /// True when `signer` is the key this certificate names and its signature is valid.
    pub fn signed_validly_by(&self, signer: &PublicKey) -> bool {
        signer.id == self.signed_by
            && signer.verify(
                &KeyCertificate::payload(&self.key, &self.signed_by, &self.issued_at),
                &self.signature,
            )
    }

    fn parse(parts: &[&str]) -> Result<KeyCertificate, String> {
        let [key, id, signed_by, issued_at, sig] = parts else {
            return Err(format!(
                "expected `{CERT_TAG} KEY ID SIGNED_BY ISSUED_AT SIGNATURE`"
            ));
        };
        let key = PublicKey::parse(key, Some(id))?;
        if signed_by.len() != 16 || !signed_by.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("`{signed_by}` is not a key id"));
        }
        chrono::DateTime::parse_from_rfc3339(issued_at)
            .map_err(|e| format!("issued_at `{issued_at}`: {e}"))?;
        let signature = B64
            .decode(sig)
            .map_err(|e| format!("bad signature base64: {e}"))?;
        Ok(KeyCertificate {
            key,
            signed_by: signed_by.to_string(),
            issued_at: issued_at.to_string(),
            signature,
        })
    }
}

/// Parses a trust file (`verify --public-key`, `[signing] trusted_keys_file`, the output of
/// `keys show --signing`): `ed25519 BASE64 [ID]` lines are trusted keys, `ed25519-cert ...`
/// lines are rotation certificates (trusted only when they chain from a trusted key). `#`
/// comments and blank lines are skipped.
pub fn parse_trust(text: &str) -> Result<(Vec<PublicKey>, Vec<KeyCertificate>), String> {
    let mut keys = Vec::new();
    let mut certs = Vec::new();
    for (i, l) in text.lines().enumerate() {
        let l = l.trim();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        let parts: Vec<&str> = l.split_whitespace().collect();
        let at = |e: String| format!("line {}: {e}", i + 1);
        match parts.as_slice() {
            ["ed25519", b] => keys.push(PublicKey::parse(b, None).map_err(at)?),
            ["ed25519", b, id] => keys.push(PublicKey::parse(b, Some(id)).map_err(at)?),
            [tag, rest @ ..] if *tag == CERT_TAG => {
                certs.push(KeyCertificate::parse(rest).map_err(at)?)
            }
            _ => {
                return Err(at(format!(
                    "expected `ed25519 BASE64 [ID]` or `{CERT_TAG} ...`"
                )))
            }
        }
    }
    Ok((keys, certs))
}

/// The keys a verifier trusts: the pinned ones, and every key certified by a trusted key
/// through a valid rotation certificate (transitively).
#[derive(Debug, Clone, Default)]
pub struct TrustSet {
    /// Keys given directly (config, trust file, `--public-key`).
    pub pinned: Vec<PublicKey>,
    /// Accepted certificates, in the order they chain.
    pub chain: Vec<KeyCertificate>,
    /// Certificates that were not accepted, and files that could not be read, and why.
    pub warnings: Vec<String>,
    /// Every certificate given, accepted or not, so more can be added later.
    given: Vec<KeyCertificate>,
    /// Warnings that are not about certificates (unreadable certificate files).
    read_warnings: Vec<String>,
}

impl TrustSet {
    /// Follows certificates from the pinned keys until no more can be accepted.
    pub fn build(pinned: Vec<PublicKey>, certs: Vec<KeyCertificate>) -> TrustSet {
        let mut t = TrustSet {
            pinned,
            given: certs.clone(),
            ..Default::default()
        };
        let mut pending = certs;
        loop {
            let before = pending.len();
            let mut rest = Vec::new();
            for c in pending {
                let accepted = t
                    .keys()
                    .iter()
                    .find(|k| k.id == c.signed_by)
                    .is_some_and(|k| c.signed_validly_by(k));
                if t.trusts(&c.key.id) {
                    continue;
                } else if accepted {
                    t.chain.push(c);
                } else {
                    rest.push(c);
                }
            }
            pending = rest;
            if pending.len() == before {
                break;
            }
        }
        for c in pending {
            if t.trusts(&c.key.id) {
                continue;
            }
            t.warnings.push(if t.trusts(&c.signed_by) {
                format!(
                    "the rotation certificate for key {} claims key {} signed it, but the signature is invalid; key {} is not trusted",
                    c.key.id, c.signed_by, c.key.id
                )
            } else {
                format!(
                    "the rotation certificate for key {} is signed by key {}, which is not trusted; key {} is not trusted",
                    c.key.id, c.signed_by, c.key.id
                )
            });
        }
        t
    }

    /// The same pinned keys with more certificates to follow (from the recording store) and
    /// more read problems to report.
    pub fn with_certificates(self, more: Vec<KeyCertificate>, problems: Vec<String>) -> TrustSet {
        let mut certs = self.given;
        for c in more {
            if !certs.contains(&c) {
                certs.push(c);
            }
        }
        let mut read_warnings = self.read_warnings;
        read_warnings.extend(problems);
        let mut t = TrustSet::build(self.pinned, certs);
        t.warnings.splice(0..0, read_warnings.iter().cloned());
        t.read_warnings = read_warnings;
        t
    }

    /// Every trusted key: pinned first, then certified ones in chain order.
    pub fn keys(&self) -> Vec<PublicKey> {
        let mut out = self.pinned.clone();
        out.extend(self.chain.iter().map(|c| c.key.clone()));
        out
    }

    pub fn trusts(&self, key_id: &str) -> bool {
        self.pinned.iter().any(|k| k.id == key_id) || self.chain.iter().any(|c| c.key.id == key_id)
    }

    /// The trust file: pinned keys, then the certificates that chain from them.
    pub fn lines(&self) -> String {
        let mut out = String::new();
        for k in &self.pinned {
            out.push_str(&k.line());
            out.push('\n');
        }
        for c in &self.chain {
            out.push_str(&c.line());
            out.push('\n');
        }
        out
    }
}

/// The trust the gateway's config gives: `inline` keys (`[signing] trusted_keys`), the keys of
/// `file` (`[signing] trusted_keys_file`; a missing file adds nothing) and the rotation
/// certificates in `<keys_dir>/signing/`. Never the key files themselves.
pub fn configured_trust(
    inline: &[PublicKey],
    file: &Path,
    keys_dir: &Path,
) -> Result<TrustSet, SigningError> {
    let mut pinned = inline.to_vec();
    let mut certs = Vec::new();
    match std::fs::read_to_string(file) {
        Ok(text) => {
            let (k, c) = parse_trust(&text).map_err(|e| key_err(file, e))?;
            pinned.extend(k);
            certs.extend(c);
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(key_err(file, e)),
    }
    let mut warnings = Vec::new();
    for f in files_with(&dir(keys_dir), "cert") {
        match std::fs::read_to_string(&f)
            .map_err(|e| e.to_string())
            .and_then(|t| parse_trust(&t))
        {
            Ok((_, c)) => certs.extend(c),
            Err(e) => warnings.push(format!("{}: {e}", f.display())),
        }
    }
    let mut seen = std::collections::BTreeSet::new();
    pinned.retain(|k| seen.insert(k.id.clone()));
    Ok(TrustSet::build(pinned, Vec::new()).with_certificates(certs, warnings))
}

/// The public keys of the key files in `<keys_dir>/signing/`, newest first, without
/// creating any. Found is not trusted: callers use this to warn about keys nobody pinned.
pub fn found_keys(keys_dir: &Path) -> Vec<PublicKey> {
    let mut files = files_with(&dir(keys_dir), "pk8");
    files.reverse();
    files
        .iter()
        .filter_map(|f| std::fs::read(f).ok())
        .filter_map(|b| Ed25519KeyPair::from_pkcs8(&b).ok())
        .map(|kp| PublicKey::from_raw(kp.public_key().as_ref().to_vec()))
        .collect()
}

/// The directory signing keys are loaded from, for messages.
pub fn key_dir(keys_dir: &Path) -> PathBuf {
    dir(keys_dir)
}

/// The signing keys in `<keys_dir>/signing/`, named `<seq>.pk8`; the newest trusted one
/// signs (see [`Signer::use_trusted`]).
pub struct Signer {
    /// Every key pair, newest first, parallel to `all`.
    pairs: Vec<Ed25519KeyPair>,
    /// Index into `pairs` of the key that signs.
    current: usize,
    pub current_public: PublicKey,
    /// Every key found, newest first (the current one included). Found is not trusted: see
    /// [`TrustSet`].
    pub all: Vec<PublicKey>,
    /// The key directory, for messages.
    dir: PathBuf,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("current", &self.current_public.id)
            .finish()
    }
}

fn dir(keys_dir: &Path) -> PathBuf {
    keys_dir.join("signing")
}

fn key_err(path: &Path, why: impl std::fmt::Display) -> SigningError {
    SigningError::Key {
        path: path.to_path_buf(),
        why: why.to_string(),
    }
}

fn files_with(d: &Path, ext: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(d)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == ext))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

fn new_key_file(d: &Path, seq: u32) -> Result<(), SigningError> {
    std::fs::create_dir_all(d).map_err(|e| key_err(d, e))?;
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
        .map_err(|_| key_err(d, "key generation failed"))?;
    let path = d.join(format!("{seq:06}.pk8"));
    crate::keys::write_private(&path, pkcs8.as_ref()).map_err(|e| key_err(&path, e))
}

/// Writes a new public file (create-only) and makes it read-only.
fn write_public_once(path: &Path, text: &str) -> Result<(), SigningError> {
    use std::io::Write;
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p).map_err(|e| key_err(p, e))?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| key_err(path, e))?;
    f.write_all(text.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|e| key_err(path, e))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o444))
            .map_err(|e| key_err(path, e))?;
    }
    Ok(())
}

impl Signer {
    /// Loads the keys, creating the first one if there is none and pinning it in
    /// [`default_pin_file`].
    pub fn load_or_create(keys_dir: &Path) -> Result<Signer, SigningError> {
        Signer::load_or_create_pinned(keys_dir, &default_pin_file(keys_dir))
    }

    /// Loads the keys. When there is none, creates the first one and pins it: its public line
    /// goes to `pin` unless that file exists already. Only this first key is pinned this way;
    /// later keys are trusted through rotation certificates.
    pub fn load_or_create_pinned(keys_dir: &Path, pin: &Path) -> Result<Signer, SigningError> {
        let d = dir(keys_dir);
        let files = files_with(&d, "pk8");
        if files.is_empty() {
            new_key_file(&d, 1)?;
            let s = Signer::load(&d, files_with(&d, "pk8"))?;
            if !pin.exists() {
                write_public_once(
                    pin,
                    &format!(
                        "# breakglass: the manifest signing key pinned when it was created ({}).\n# Keys rotated later are trusted through the certificates in {}.\n{}\n",
                        crate::clock::rfc3339(crate::clock::now()),
                        d.display(),
                        s.current_public.line()
                    ),
                )?;
            }
            return Ok(s);
        }
        Signer::load(&d, files)
    }

    /// Loads `files` (key files of the directory `d`), ordering them newest first.
    fn load(d: &Path, mut files: Vec<PathBuf>) -> Result<Signer, SigningError> {
        let mut all = Vec::new();
        let mut pairs = Vec::new();
        files.sort();
        files.reverse();
        for f in &files {
            let bytes = std::fs::read(f).map_err(|e| key_err(f, e))?;
            let kp = Ed25519KeyPair::from_pkcs8(&bytes).map_err(|e| key_err(f, e))?;
            all.push(PublicKey::from_raw(kp.public_key().as_ref().to_vec()));
            pairs.push(kp);
        }
        let current_public = all
            .first()
            .cloned()
            .ok_or_else(|| key_err(d, "no usable key"))?;
        Ok(Signer {
            pairs,
            current: 0,
            current_public,
            all,
            dir: d.to_path_buf(),
        })
    }

    /// Signs with the newest key `trust` trusts. A newer key that is not trusted (one dropped
    /// into the key directory) is never used: manifests it signed would not verify.
    pub fn use_trusted(mut self, trust: &TrustSet) -> Result<Signer, SigningError> {
        let Some(i) = self.all.iter().position(|k| trust.trusts(&k.id)) else {
            return Err(SigningError::Key {
                path: self.dir.clone(),
                why: format!(
                    "none of the signing keys ({}) is trusted, so the gateway will not sign manifests verify would reject: pin one in [signing] trusted_keys or trusted_keys_file (`breakglass keys show --signing` lists them as NOT TRUSTED; check the id first)",
                    self.all.iter().map(|k| k.id.as_str()).collect::<Vec<_>>().join(", ")
                ),
            });
        };
        for k in &self.all[..i] {
            tracing::warn!(key_id = %k.id, "a signing key in the key directory is not trusted (not pinned, no valid rotation certificate); it is not used");
        }
        self.current = i;
        self.current_public = self.all[i].clone();
        Ok(self)
    }

    /// Adds a new signing key and certifies it with the current one: the certificate is
    /// written next to it (`<seq>.cert`) and returned. Older keys stay for verification.
    pub fn rotate(keys_dir: &Path) -> Result<(Signer, KeyCertificate), SigningError> {
        let existing = Signer::load_or_create(keys_dir)?;
        Signer::rotate_from(keys_dir, existing)
    }

    /// [`Signer::rotate`] from an already chosen signer (the newest trusted key).
    pub fn rotate_from(
        keys_dir: &Path,
        existing: Signer,
    ) -> Result<(Signer, KeyCertificate), SigningError> {
        let d = dir(keys_dir);
        let seq = files_with(&d, "pk8")
            .iter()
            .filter_map(|p| p.file_stem()?.to_str()?.parse::<u32>().ok())
            .max()
            .unwrap_or(0)
            + 1;
        new_key_file(&d, seq)?;
        let path = d.join(format!("{seq:06}.pk8"));
        let bytes = std::fs::read(&path).map_err(|e| key_err(&path, e))?;
        let kp = Ed25519KeyPair::from_pkcs8(&bytes).map_err(|e| key_err(&path, e))?;
        let key = PublicKey::from_raw(kp.public_key().as_ref().to_vec());
        let issued_at = crate::clock::rfc3339(crate::clock::now());
        let signed_by = existing.current_public.id.clone();
        let signature = existing.sign(&KeyCertificate::payload(&key, &signed_by, &issued_at));
        let cert = KeyCertificate {
            key,
            signed_by,
            issued_at,
            signature,
        };
        write_public_once(&d.join(format!("{seq:06}.cert")), &(cert.line() + "\n"))?;
        let s = Signer::load(&d, files_with(&d, "pk8"))?;
        Ok((s, cert))
    }

    /// Signs `msg` with the current key.
    pub fn sign(&self, msg: &[u8]) -> Vec<u8> {
        self.pairs[self.current].sign(msg).as_ref().to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_keeps_old_keys_verifying() {
        let d = tempfile::tempdir().expect("tempdir");
        let s1 = Signer::load_or_create(d.path()).expect("create");
        let sig1 = s1.sign(b"manifest one");
        let (s2, cert) = Signer::rotate(d.path()).expect("rotate");
        assert_ne!(s1.current_public, s2.current_public);
        assert_eq!(s2.all.len(), 2);
        assert!(
            s2.all.iter().any(|k| k.verify(b"manifest one", &sig1)),
            "old signature verifies"
        );
        assert!(!s2.current_public.verify(b"manifest one", &sig1));
        let lines: String = s2.all.iter().map(|k| k.line() + "\n").collect();
        assert_eq!(PublicKey::parse_lines(&lines).expect("parse"), s2.all);
        assert!(PublicKey::parse_lines("rsa AAAA").is_err());
        assert_eq!(cert.key, s2.current_public);
        assert_eq!(cert.signed_by, s1.current_public.id);
    }

    #[test]
    fn only_pinned_keys_and_their_certified_successors_are_trusted() {
        let d = tempfile::tempdir().expect("tempdir");
        let pin = default_pin_file(d.path());
        let s1 = Signer::load_or_create(d.path()).expect("create");
        assert!(pin.exists(), "the first key is pinned at creation");
        let (s2, _) = Signer::rotate(d.path()).expect("rotate");
        let (s3, _) = Signer::rotate(d.path()).expect("rotate again");
        // A key dropped into the directory: found, never trusted, never used.
        let stranger = tempfile::tempdir().expect("tempdir");
        Signer::load_or_create(stranger.path()).expect("stranger");
        std::fs::copy(
            stranger.path().join("signing/000001.pk8"),
            d.path().join("signing/999999.pk8"),
        )
        .expect("drop a key");
        let t = configured_trust(&[], &pin, d.path()).expect("trust");
        let ids: Vec<String> = t.keys().into_iter().map(|k| k.id).collect();
        assert_eq!(
            ids,
            vec![
                s1.current_public.id.clone(),
                s2.current_public.id.clone(),
                s3.current_public.id.clone()
            ]
        );
        let found = Signer::load_or_create(d.path()).expect("load");
        assert_eq!(found.all.len(), 4);
        let used = found.use_trusted(&t).expect("a trusted key");
        assert_eq!(used.current_public, s3.current_public);
        // The printed chain round-trips: the first key alone plus the certificates.
        let (keys, certs) = parse_trust(&t.lines()).expect("parse");
        assert_eq!(keys.len(), 1);
        assert_eq!(TrustSet::build(keys.clone(), certs.clone()).keys().len(), 3);
        // Certificates found later (in the recording store) extend the chain; stale warnings
        // about them go.
        let first = TrustSet::build(keys, certs[1..].to_vec());
        assert_eq!(first.keys().len(), 1);
        assert_eq!(first.warnings.len(), 1, "{:?}", first.warnings);
        let later = first.with_certificates(certs[..1].to_vec(), vec!["unreadable".into()]);
        assert_eq!(later.keys().len(), 3);
        assert_eq!(later.warnings, vec!["unreadable".to_string()]);
        // Nothing is trusted without a pinned key.
        assert!(configured_trust(&[], &d.path().join("none"), d.path())
            .expect("trust")
            .keys()
            .is_empty());
    }

    #[test]
    fn forged_certificates_are_refused() {
        let d = tempfile::tempdir().expect("tempdir");
        let s1 = Signer::load_or_create(d.path()).expect("create");
        let (_, cert) = Signer::rotate(d.path()).expect("rotate");
        let mut forged = cert.clone();
        forged.issued_at = "2020-01-01T00:00:00Z".into();
        let t = TrustSet::build(vec![s1.current_public.clone()], vec![forged]);
        assert_eq!(t.keys().len(), 1);
        assert!(
            t.warnings[0].contains("signature is invalid"),
            "{:?}",
            t.warnings
        );
        let t = TrustSet::build(vec![], vec![cert.clone()]);
        assert!(t.keys().is_empty());
        assert!(t.warnings[0].contains("not trusted"), "{:?}", t.warnings);
        for bad in [
            "ed25519-cert",
            "ed25519-cert a b c d e",
            "ed25519 AAAA",
            "ed25519-cert AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA= 0000000000000000 zz 2020 x",
        ] {
            assert!(parse_trust(bad).is_err(), "{bad}");
        }
        let line = cert.line();
        let wrong_id = line.replacen(&cert.key.id, "0123456789abcdef", 1);
        assert!(parse_trust(&wrong_id).is_err());
    }
}
