//! SCRAM-SHA-256 (RFC 5802/7677) for both legs: the server side checks a DBA's JIT credential
//! against its stored verifier; the client side logs in upstream with the vault's password.
//! The server side takes no channel binding (`n,,`/`y,,`); the client side binds to the
//! target's TLS certificate (`tls-server-end-point`, SCRAM-SHA-256-PLUS) when it can.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ring::{digest, hmac, pbkdf2};

fn hmac_sha256(key: &[u8], msg: &[u8]) -> Vec<u8> {
    hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), msg)
        .as_ref()
        .to_vec()
}

fn nonce() -> String {
    let b: [u8; 18] = rand::random();
    B64.encode(b)
}

/// The parts of a stored verifier.
#[derive(Debug, Clone)]
pub struct Verifier {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub stored_key: Vec<u8>,
    pub server_key: Vec<u8>,
}

impl Verifier {
    /// A verifier no password matches, for a login the gateway will refuse anyway: the
    /// exchange looks the same as a real one. Its salt is derived from the user name under a
    /// key made at start, so repeated probes for one name see one salt, as for a real person.
    pub fn dummy(user: &str) -> Verifier {
        static KEY: std::sync::OnceLock<[u8; 32]> = std::sync::OnceLock::new();
        let key = KEY.get_or_init(rand::random);
        let salt = hmac_sha256(key, format!("salt\0{user}").as_bytes());
        Verifier {
            iterations: crate::credential::ITERATIONS,
            salt: salt[..16].to_vec(),
            stored_key: hmac_sha256(key, format!("stored\0{user}").as_bytes()),
            server_key: hmac_sha256(key, format!("server\0{user}").as_bytes()),
        }
    }

    /// Parses `SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>`.
    pub fn parse(s: &str) -> Option<Verifier> {
        let rest = s.strip_prefix("SCRAM-SHA-256$")?;
        let (is, keys) = rest.split_once('$')?;
        let (iters, salt) = is.split_once(':')?;
        let (stored, server) = keys.split_once(':')?;
        Some(Verifier {
            iterations: iters.parse().ok()?,
            salt: B64.decode(salt).ok()?,
            stored_key: B64.decode(stored).ok()?,
            server_key: B64.decode(server).ok()?,
        })
    }
}

/// Server side, step 1: from the client-first message, the server-first message.
pub struct ServerExchange {
    client_first_bare: String,
    server_first: String,
    nonce: String,
    gs2: String,
    verifier: Verifier,
}

/// Why a SCRAM exchange failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScramError {
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    #[error("channel binding is not supported")]
    ChannelBinding,
    #[error("password authentication failed")]
    BadProof,
    #[error("the server's SCRAM signature is wrong")]
    BadServer,
}

impl ServerExchange {
    pub fn start(
        client_first: &str,
        verifier: Verifier,
    ) -> Result<(ServerExchange, String), ScramError> {
        let gs2_end = client_first
            .match_indices(',')
            .nth(1)
            .map(|(i, _)| i)
            .ok_or(ScramError::Malformed("no gs2 header"))?;
        let gs2 = &client_first[..gs2_end + 1];
        if gs2.starts_with('p') {
            return Err(ScramError::ChannelBinding);
        }
        if !(gs2.starts_with("n,") || gs2.starts_with("y,")) {
            return Err(ScramError::Malformed("bad gs2 header"));
        }
        let bare = &client_first[gs2_end + 1..];
        let cnonce = bare
            .split(',')
            .find_map(|p| p.strip_prefix("r="))
            .ok_or(ScramError::Malformed("no client nonce"))?;
        let nonce = format!("{cnonce}{}", nonce());
        let server_first = format!(
            "r={nonce},s={},i={}",
            B64.encode(&verifier.salt),
            verifier.iterations
        );
        Ok((
            ServerExchange {
                client_first_bare: bare.to_string(),
                server_first: server_first.clone(),
                nonce,
                gs2: gs2.to_string(),
                verifier,
            },
            server_first,
        ))
    }

    /// Step 2: checks the client proof; returns the server-final message.
    pub fn finish(self, client_final: &str) -> Result<String, ScramError> {
        let proof_at = client_final
            .rfind(",p=")
            .ok_or(ScramError::Malformed("no proof"))?;
        let without_proof = &client_final[..proof_at];
        let proof = B64
            .decode(&client_final[proof_at + 3..])
            .map_err(|_| ScramError::Malformed("proof is not base64"))?;
        let mut binding = None;
        let mut nonce = None;
        for part in without_proof.split(',') {
            if let Some(c) = part.strip_prefix("c=") {
                binding = Some(c);
            } else if let Some(r) = part.strip_prefix("r=") {
                nonce = Some(r);
            }
        }
        if binding != Some(B64.encode(self.gs2.as_bytes()).as_str()) {
            return Err(ScramError::ChannelBinding);
        }
        if nonce != Some(self.nonce.as_str()) {
            return Err(ScramError::Malformed("nonce mismatch"));
        }
        let auth_message = format!(
            "{},{},{}",
            self.client_first_bare, self.server_first, without_proof
        );
        let client_sig = hmac_sha256(&self.verifier.stored_key, auth_message.as_bytes());
        if proof.len() != client_sig.len() {
            return Err(ScramError::BadProof);
        }
        let client_key: Vec<u8> = proof.iter().zip(&client_sig).map(|(a, b)| a ^ b).collect();
        let stored = digest::digest(&digest::SHA256, &client_key);
        let same = stored.as_ref().len() == self.verifier.stored_key.len()
            && stored
                .as_ref()
                .iter()
                .zip(&self.verifier.stored_key)
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0;
        if !same {
            return Err(ScramError::BadProof);
        }
        let server_sig = hmac_sha256(&self.verifier.server_key, auth_message.as_bytes());
        Ok(format!("v={}", B64.encode(server_sig)))
    }
}

/// The client's channel binding for one exchange (RFC 5802 §6 gs2 header).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Binding {
    /// No TLS, or no binding data for the certificate: `n,,`.
    None,
    /// The client could bind but the server offered no -PLUS: `y,,` (a server that does
    /// support binding then refuses, which defeats a downgrade).
    Unoffered,
    /// SCRAM-SHA-256-PLUS with this `tls-server-end-point` data: `p=tls-server-end-point,,`.
    Used(Vec<u8>),
}

impl Binding {
    /// From the certificate's binding data (when under TLS) and whether -PLUS was offered.
    pub fn choose(data: Option<&[u8]>, plus_offered: bool) -> Binding {
        match (data, plus_offered) {
            (Some(d), true) => Binding::Used(d.to_vec()),
            (Some(_), false) => Binding::Unoffered,
            (None, _) => Binding::None,
        }
    }

    fn gs2(&self) -> &'static str {
        match self {
            Binding::None => "n,,",
            Binding::Unoffered => "y,,",
            Binding::Used(_) => "p=tls-server-end-point,,",
        }
    }

    /// The `c=` attribute: base64 of the gs2 header and any binding data.
    fn attribute(&self) -> String {
        let mut b = self.gs2().as_bytes().to_vec();
        if let Binding::Used(d) = self {
            b.extend_from_slice(d);
        }
        B64.encode(b)
    }
}

/// Client side of the exchange.
pub struct ClientExchange {
    password: String,
    binding: Binding,
    client_first_bare: String,
    auth_message: String,
    salted: Vec<u8>,
}

impl ClientExchange {
    /// The client-first message (`<gs2 header>n=,r=...`).
    pub fn start(password: &str, binding: Binding) -> (ClientExchange, String) {
        let bare = format!("n=,r={}", nonce());
        let first = format!("{}{bare}", binding.gs2());
        (
            ClientExchange {
                password: password.to_string(),
                binding,
                client_first_bare: bare,
                auth_message: String::new(),
                salted: Vec::new(),
            },
            first,
        )
    }

    /// From the server-first message, the client-final message.
    pub fn respond(&mut self, server_first: &str) -> Result<String, ScramError> {
        let mut nonce = None;
        let mut salt = None;
        let mut iters = None;
        for part in server_first.split(',') {
            if let Some(v) = part.strip_prefix("r=") {
                nonce = Some(v);
            } else if let Some(v) = part.strip_prefix("s=") {
                salt = B64.decode(v).ok();
            } else if let Some(v) = part.strip_prefix("i=") {
                iters = v.parse::<u32>().ok();
            }
        }
        let (Some(nonce), Some(salt), Some(iters)) = (nonce, salt, iters) else {
            return Err(ScramError::Malformed("server-first"));
        };
        if iters == 0 || iters > 1_000_000 {
            return Err(ScramError::Malformed("iteration count"));
        }
        let mut salted = [0u8; 32];
        let rounds =
            std::num::NonZeroU32::new(iters).ok_or(ScramError::Malformed("iteration count"))?;
        pbkdf2::derive(
            pbkdf2::PBKDF2_HMAC_SHA256,
            rounds,
            &salt,
            self.password.as_bytes(),
            &mut salted,
        );
        let client_key = hmac_sha256(&salted, b"Client Key");
        let stored = digest::digest(&digest::SHA256, &client_key);
        let without_proof = format!("c={},r={nonce}", self.binding.attribute());
        self.auth_message = format!("{},{server_first},{without_proof}", self.client_first_bare);
        let sig = hmac_sha256(stored.as_ref(), self.auth_message.as_bytes());
        let proof: Vec<u8> = client_key.iter().zip(&sig).map(|(a, b)| a ^ b).collect();
        self.salted = salted.to_vec();
        Ok(format!("{without_proof},p={}", B64.encode(proof)))
    }

    /// Checks the server-final message.
    pub fn verify(&self, server_final: &str) -> Result<(), ScramError> {
        let v = server_final
            .strip_prefix("v=")
            .ok_or(ScramError::BadServer)?;
        let server_key = hmac_sha256(&self.salted, b"Server Key");
        let want = B64.encode(hmac_sha256(&server_key, self.auth_message.as_bytes()));
        if want == v {
            Ok(())
        } else {
            Err(ScramError::BadServer)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_and_server_agree_and_wrong_passwords_fail() {
        let v = Verifier::parse(&crate::credential::verifier("right-password")).expect("verifier");
        for (pw, ok) in [("right-password", true), ("wrong-password", false)] {
            let (mut c, first) = ClientExchange::start(pw, Binding::None);
            let (s, server_first) = ServerExchange::start(&first, v.clone()).expect("start");
            let client_final = c.respond(&server_first).expect("respond");
            match s.finish(&client_final) {
                Ok(server_final) => {
                    assert!(ok, "{pw} must not log in");
                    c.verify(&server_final).expect("server proves itself");
                }
                Err(e) => {
                    assert!(!ok, "{pw}: {e}");
                    assert_eq!(e, ScramError::BadProof);
                }
            }
        }
        assert!(ServerExchange::start("p=tls-server-end-point,,n=,r=x", v.clone()).is_err());
        let (_, first) = ClientExchange::start("pw", Binding::Used(vec![1, 2]));
        assert!(
            first.starts_with("p=tls-server-end-point,,n=,r="),
            "{first}"
        );
        let (mut c, first) = ClientExchange::start("pw", Binding::Unoffered);
        assert!(first.starts_with("y,,n=,r="), "{first}");
        let fin = c.respond("r=abc,s=c2FsdA==,i=4096").expect("respond");
        assert!(fin.starts_with("c=eSws,r=abc,p="), "{fin}");
        assert!(ServerExchange::start("garbage", v).is_err());
    }
}
