//! Outbound HTTP POSTs to alert webhooks and HTTP SIEM collectors (Splunk HEC, webhooks),
//! over reqwest with our own rustls config (ring provider, the sink's trust roots). Every
//! answer is classified: delivered, retry later, or rejected for good.
//!
//! Bounds: the whole exchange has a time limit, a connection attempt a shorter one, and at
//! most [`MAX_RESPONSE`] bytes of a response body are read. No proxies from the environment
//! and no redirects: the collector is the configured URL and nothing else.

use std::time::Duration;

use std::sync::Arc;

/// Largest response body read; the rest is not read.
pub const MAX_RESPONSE: usize = 64 << 10;

/// Time allowed to set up the TCP (and TLS) connection, within the request's own limit.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A response: status code and the first [`MAX_RESPONSE`] bytes of the body.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

/// What a delivery attempt came to, and what to do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// Worth another try later: no connection, a time-out, a broken or garbled response,
    /// 429, 5xx, or a 4xx that says the collector or our credentials are wrong (401, 403,
    /// 404, 407, 408) rather than the event.
    Retry(String),
    /// The collector refused the request for what it holds (another 4xx): sending it again
    /// cannot succeed, so it is dead-lettered.
    Rejected { status: u16, why: String },
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Retry(why) => f.write_str(why),
            Failure::Rejected { why, .. } => f.write_str(why),
        }
    }
}

/// Classifies a non-2xx status. 401/403/404/407 mean the sink's URL or token is wrong (every
/// event would be refused, so dead-lettering would drain the whole spool); 408 is a time-out.
pub fn classify(status: u16, why: String) -> Failure {
    match status {
        429 | 401 | 403 | 404 | 407 | 408 => Failure::Retry(why),
        400..=499 => Failure::Rejected { status, why },
        _ => Failure::Retry(why),
    }
}

/// A reusable HTTP client bound to one set of TLS settings.
#[derive(Clone)]
pub struct Client {
    inner: reqwest::Client,
}

impl Client {
    /// A client trusting what `tls` trusts; `timeout` bounds each whole exchange.
    pub fn new(
        tls: &tokio_rustls::rustls::ClientConfig,
        timeout: Duration,
    ) -> Result<Client, String> {
        let inner = reqwest::Client::builder()
            .tls_backend_preconfigured(tls.clone())
            .timeout(timeout)
            .connect_timeout(CONNECT_TIMEOUT.min(timeout))
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .http1_only()
            .user_agent(concat!("breakglass/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("HTTP client: {}", chain(&e)))?;
        Ok(Client { inner })
    }

    /// POSTs `body` as JSON with the extra `headers`. Err is a transport failure (always
    /// worth a retry); any status comes back as a [`Response`].
    pub async fn post(
        &self,
        url: &Url,
        headers: &[(String, String)],
        body: Vec<u8>,
    ) -> Result<Response, String> {
        let target = reqwest::Url::parse(&to_string(url)).map_err(|e| format!("bad URL: {e}"))?;
        let mut req = self
            .inner
            .post(target)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(body);
        for (k, v) in headers {
            let name = http::HeaderName::from_bytes(k.as_bytes())
                .map_err(|_| format!("header name `{k}` is not valid"))?;
            let value = http::HeaderValue::from_str(v)
                .map_err(|_| format!("header {k} has a character HTTP does not allow"))?;
            req = req.header(name, value);
        }
        let mut resp = req
            .send()
            .await
            .map_err(|e| format!("{}:{}: {}", url.host, url.port, chain(&e)))?;
        let status = resp.status().as_u16();
        let mut body = Vec::new();
        while body.len() < MAX_RESPONSE {
            match resp.chunk().await {
                Ok(Some(c)) => {
                    let room = MAX_RESPONSE - body.len();
                    body.extend_from_slice(&c[..c.len().min(room)]);
                }
                Ok(None) => break,
                Err(e) => {
                    return Err(format!(
                        "{}:{}: HTTP {status} with a broken body: {}",
                        url.host,
                        url.port,
                        chain(&e)
                    ))
                }
            }
        }
        Ok(Response { status, body })
    }
}

/// `url` as text reqwest parses (IPv6 hosts in brackets).
fn to_string(url: &Url) -> String {
    let scheme = if url.tls { "https" } else { "http" };
    let host = if url.host.contains(':') {
        format!("[{}]", url.host)
    } else {
        url.host.clone()
    };
    format!("{scheme}://{host}:{}{}", url.port, url.path)
}

/// An error with its sources, `a: b: c`.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

/// A parsed `http://` or `https://` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// Path and query, starting with `/`.
    pub path: String,
}

impl Url {
    /// Parses `http(s)://host[:port][/path]`.
    pub fn parse(s: &str) -> Result<Url, String> {
        let (tls, rest) = if let Some(r) = s.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = s.strip_prefix("http://") {
            (false, r)
        } else {
            return Err(format!("`{s}` must start with http:// or https://"));
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if authority.is_empty() || authority.contains('@') {
            return Err(format!(
                "`{s}` has no host (or carries credentials in the URL)"
            ));
        }
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => {
                let port = p
                    .parse::<u16>()
                    .map_err(|_| format!("`{s}` has a bad port"))?;
                (
                    h.trim_start_matches('[').trim_end_matches(']').to_string(),
                    port,
                )
            }
            _ => (authority.to_string(), if tls { 443 } else { 80 }),
        };
        if host.is_empty() {
            return Err(format!("`{s}` has no host"));
        }
        Ok(Url {
            tls,
            host,
            port,
            path: path.to_string(),
        })
    }
}

/// A rustls client config (ring provider). With `pinned`, the CA file (PEM) is the only trust
/// root; otherwise it is added to the Mozilla roots.
pub fn client_tls(
    ca: Option<&std::path::Path>,
    pinned: bool,
) -> Result<Arc<tokio_rustls::rustls::ClientConfig>, String> {
    use tokio_rustls::rustls;
    let mut roots = rustls::RootCertStore::empty();
    if !pinned {
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    }
    if let Some(path) = ca {
        let pem =
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        use rustls::pki_types::pem::PemObject;
        for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| format!("{}: {e}", path.display()))?;
            roots
                .add(cert)
                .map_err(|e| format!("{}: {e}", path.display()))?;
        }
    }
    if roots.is_empty() {
        return Err("no trusted certificate (is the CA file empty?)".into());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_classify() {
        for s in [
            429u16, 500, 502, 503, 504, 599, 401, 403, 404, 408, 302, 100,
        ] {
            assert!(
                matches!(classify(s, String::new()), Failure::Retry(_)),
                "{s}"
            );
        }
        for s in [400u16, 405, 409, 410, 413, 415, 422, 499] {
            assert!(
                matches!(classify(s, String::new()), Failure::Rejected { status, .. } if status == s),
                "{s}"
            );
        }
    }

    #[test]
    fn urls_round_trip_to_reqwest() {
        for s in [
            "http://[::1]:8080/x?y=1",
            "https://h.example:443/a/b",
            "http://h/",
        ] {
            let u = Url::parse(s).expect("parses");
            let r = reqwest::Url::parse(&to_string(&u)).expect("reqwest parses");
            assert_eq!(
                r.host_str().map(|h| h.trim_matches(['[', ']'])),
                Some(u.host.as_str())
            );
            assert_eq!(r.port_or_known_default(), Some(u.port));
        }
    }
}
