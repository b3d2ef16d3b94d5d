//! Plumbing shared by the HTTP providers (Ollama, OpenAI-compatible, Anthropic) and by everything
//! else in Koubou that speaks HTTP: building a client (TLS trust, proxies), sending a request and
//! reading its body while honouring cancellation, and turning transport failures, rate limits and
//! error bodies into [`BackendError`]s.
//!
//! Why it exists: every provider must stop the moment the router cancels (even when the server
//! accepted the connection and never answers), must say "unreachable" vs "failed" vs "slow down"
//! the same way, and must reach hosted APIs over HTTPS while never sending a prompt meant for a
//! loopback server through a proxy — so that logic lives once here. [`ClientSetup`] is public so
//! `koubou-client` and model downloads build their clients the same way.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{Arc, OnceLock},
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use reqwest::{Url, header::HeaderMap};
use rustls::pki_types::{CertificateDer, pem::PemObject};
use serde_json::Value;

use crate::config::Auth;
use crate::{BackendError, CancellationToken};

/// How long health checks wait for an answer in total.
pub(crate) const HEALTH_TIMEOUT: Duration = Duration::from_secs(3);
/// How long reading an error body may take before we give up on its details.
const ERROR_BODY_TIMEOUT: Duration = Duration::from_secs(5);
/// Error bodies are cut to this many characters in messages.
const ERROR_BODY_MAX: usize = 600;

/// Who a client trusts and how it reaches servers (a backend's `ca_file` and `proxy`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientOptions {
    /// A PEM file of CA certificates trusted besides the bundled web roots and the system's.
    pub ca_file: Option<PathBuf>,
    /// `None`: the environment's `HTTPS_PROXY` / `HTTP_PROXY` / `ALL_PROXY` (either case), never
    /// for loopback or `NO_PROXY` hosts. `"none"`: never a proxy. A URL: always that proxy.
    pub proxy: Option<String>,
}

/// Why a client could not be set up.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum SetupError {
    #[error("ca_file {path}: {detail}")]
    CaFile { path: String, detail: String },
    #[error("{origin} = {value:?}: {detail}")]
    Proxy { origin: String, value: String, detail: String },
}

/// The fixed, costly part of an HTTP client — trust roots, TLS configuration, proxy choice —
/// built once (per backend) and stamped onto every [`reqwest::Client`] made from it, so that
/// throwing a connection pool away is cheap.
#[derive(Clone)]
pub struct ClientSetup {
    tls: rustls::ClientConfig,
    proxy: ProxyChoice,
}

impl std::fmt::Debug for ClientSetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientSetup").field("proxy", &self.proxy).finish_non_exhaustive()
    }
}

impl ClientSetup {
    /// Loads the roots (bundled web roots, the system store or the file `SSL_CERT_FILE` names,
    /// and `ca_file`) and decides the proxy, reading the environment now.
    pub fn new(opts: &ClientOptions) -> Result<ClientSetup, SetupError> {
        Self::with_env(opts, |k| std::env::var(k).ok())
    }

    fn with_env(opts: &ClientOptions, env: impl Fn(&str) -> Option<String>) -> Result<ClientSetup, SetupError> {
        let mut roots = base_roots().clone();
        if let Some(path) = &opts.ca_file {
            add_ca_file(&mut roots, path)?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("the ring provider supports the default protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let proxy = ProxyChoice::new(opts.proxy.as_deref(), env)?;
        Ok(ClientSetup { tls, proxy })
    }

    /// A builder with this setup's TLS and proxy applied; add timeouts and build.
    pub fn builder(&self) -> reqwest::ClientBuilder {
        let b = reqwest::Client::builder().use_preconfigured_tls(self.tls.clone());
        match &self.proxy {
            ProxyChoice::Never => b.no_proxy(),
            ProxyChoice::Always(url) => match reqwest::Proxy::all(url.clone()) {
                Ok(p) => b.proxy(p),
                Err(_) => b.no_proxy(), // cannot happen: the URL was checked in `new`
            },
            ProxyChoice::Env(env) if env.is_empty() => b.no_proxy(),
            ProxyChoice::Env(env) => {
                let env = env.clone();
                b.proxy(reqwest::Proxy::custom(move |url| env.proxy_for(url).cloned()))
            }
        }
    }

    /// The client the providers use: a connect timeout only (the overall budget is the
    /// router's); connections kept alive and reused.
    pub fn client(&self) -> reqwest::Client {
        self.builder()
            .connect_timeout(Duration::from_secs(10))
            .pool_idle_timeout(Duration::from_secs(20))
            .build()
            .unwrap_or_else(|_| reqwest::Client::new())
    }

    /// The proxy a request to `url` goes through, if any (for messages and checks).
    pub fn proxy_for(&self, url: &str) -> Option<String> {
        let url = Url::parse(url).ok()?;
        match &self.proxy {
            ProxyChoice::Never => None,
            ProxyChoice::Always(p) => Some(p.to_string()),
            ProxyChoice::Env(env) => env.proxy_for(&url).map(Url::to_string),
        }
    }

    /// Fails when the environment names a proxy for `url` that is not a usable URL (such a
    /// variable is otherwise ignored, so that it cannot break requests to loopback servers).
    pub fn check_target(&self, url: &str) -> Result<(), SetupError> {
        let (ProxyChoice::Env(env), Ok(url)) = (&self.proxy, Url::parse(url)) else { return Ok(()) };
        match env.bad_for(&url) {
            Some(bad) => Err(bad.clone()),
            None => Ok(()),
        }
    }
}

/// The roots every client trusts: Mozilla's (bundled, so a machine without a CA store still
/// reaches hosted APIs) plus the system's (or `SSL_CERT_FILE` / `SSL_CERT_DIR`), read once per
/// process.
fn base_roots() -> &'static rustls::RootCertStore {
    static ROOTS: OnceLock<rustls::RootCertStore> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let mut roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
        let native = rustls_native_certs::load_native_certs();
        for e in &native.errors {
            tracing::debug!(error = %e, "could not read part of the system certificate store");
        }
        let (added, ignored) = roots.add_parsable_certificates(native.certs);
        tracing::debug!(added, ignored, "loaded the system certificate store");
        roots
    })
}

fn add_ca_file(roots: &mut rustls::RootCertStore, path: &Path) -> Result<(), SetupError> {
    let err = |detail: String| SetupError::CaFile { path: path.display().to_string(), detail };
    let pem = std::fs::read(path).map_err(|e| err(format!("cannot read it: {e}")))?;
    let mut n = 0;
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| err(format!("not a PEM certificate file: {e:?}")))?;
        roots.add(cert).map_err(|e| err(format!("a certificate in it is not a usable CA: {e}")))?;
        n += 1;
    }
    if n == 0 {
        return Err(err("it holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into()));
    }
    Ok(())
}

/// Where requests go: never through a proxy, always through one, or as the environment says.
#[derive(Clone, Debug)]
enum ProxyChoice {
    Never,
    Always(Url),
    Env(EnvProxies),
}

impl ProxyChoice {
    fn new(configured: Option<&str>, env: impl Fn(&str) -> Option<String>) -> Result<ProxyChoice, SetupError> {
        match configured.map(str::trim) {
            None => Ok(ProxyChoice::Env(EnvProxies::from_env(env))),
            Some(v) if v.eq_ignore_ascii_case("none") => Ok(ProxyChoice::Never),
            Some(v) => parse_proxy(v).map(ProxyChoice::Always).map_err(|detail| SetupError::Proxy {
                origin: "proxy".into(),
                value: v.to_owned(),
                detail,
            }),
        }
    }
}

/// A proxy URL: `http://`, `https://` or `socks5://` (and `socks5h`, `socks4`); a bare
/// `host:port` means `http://host:port`, as curl reads it.
fn parse_proxy(v: &str) -> Result<Url, String> {
    let with_scheme = if v.contains("://") { v.to_owned() } else { format!("http://{v}") };
    let url = Url::parse(&with_scheme).map_err(|e| format!("not a proxy URL ({e}); use e.g. http://host:3128"))?;
    match url.scheme() {
        "http" | "https" | "socks4" | "socks4a" | "socks5" | "socks5h" if url.host_str().is_some() => Ok(url),
        "http" | "https" | "socks4" | "socks4a" | "socks5" | "socks5h" => Err("the URL has no host".into()),
        other => Err(format!("unsupported proxy scheme {other:?}; use http, https or socks5")),
    }
}

/// The proxy variables as curl reads them: `https_proxy` for `https://` targets, `http_proxy`
/// for `http://`, `all_proxy` for either when the specific one is unset, each in lower or upper
/// case (lower first); `no_proxy` lists hosts to reach directly. Loopback is always direct.
#[derive(Clone, Debug, Default)]
struct EnvProxies {
    http: Option<Result<Url, SetupError>>,
    https: Option<Result<Url, SetupError>>,
    all: Option<Result<Url, SetupError>>,
    no_proxy: Vec<NoProxyRule>,
}

impl EnvProxies {
    fn from_env(env: impl Fn(&str) -> Option<String>) -> EnvProxies {
        let var = |name: &str| {
            let lower = name.to_ascii_lowercase();
            let upper = name.to_ascii_uppercase();
            [lower, upper].into_iter().find_map(|n| env(&n).filter(|v| !v.trim().is_empty()).map(|v| (n, v)))
        };
        let proxy = |name: &str| {
            var(name).map(|(origin, value)| {
                parse_proxy(value.trim()).map_err(|detail| SetupError::Proxy { origin, value, detail })
            })
        };
        let no_proxy = var("no_proxy").map(|(_, v)| v.split(',').filter_map(NoProxyRule::parse).collect());
        EnvProxies {
            http: proxy("http_proxy"),
            https: proxy("https_proxy"),
            all: proxy("all_proxy"),
            no_proxy: no_proxy.unwrap_or_default(),
        }
    }

    fn is_empty(&self) -> bool {
        self.http.is_none() && self.https.is_none() && self.all.is_none()
    }

    /// The variable that applies to `url`, unless its host is exempt.
    fn applicable(&self, url: &Url) -> Option<&Result<Url, SetupError>> {
        let host = url.host_str()?;
        if is_loopback_host(host) || self.no_proxy.iter().any(|r| r.matches(host)) {
            return None;
        }
        let specific = if url.scheme() == "https" { &self.https } else { &self.http };
        specific.as_ref().or(self.all.as_ref())
    }

    fn proxy_for(&self, url: &Url) -> Option<&Url> {
        self.applicable(url)?.as_ref().ok()
    }

    fn bad_for(&self, url: &Url) -> Option<&SetupError> {
        self.applicable(url)?.as_ref().err()
    }
}

/// `localhost`, `*.localhost`, 127.0.0.0/8 and `::1`: never proxied unless a backend names a
/// proxy itself.
pub fn is_loopback_host(host: &str) -> bool {
    let h = host.trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase();
    h == "localhost" || h.ends_with(".localhost") || h.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// One `NO_PROXY` entry: `*` (everything), a domain (`example.com` and `.example.com` both match
/// the domain and its subdomains), an IP address or a CIDR block. A `:port` suffix is ignored.
#[derive(Clone, Debug, PartialEq)]
enum NoProxyRule {
    All,
    Domain(String),
    Ip(IpAddr),
    Net(IpAddr, u8),
}

impl NoProxyRule {
    fn parse(entry: &str) -> Option<NoProxyRule> {
        let e = entry.trim().to_ascii_lowercase();
        if e.is_empty() {
            return None;
        }
        if e == "*" {
            return Some(NoProxyRule::All);
        }
        if let Some((net, bits)) = e.split_once('/') {
            let ip: IpAddr = net.trim_start_matches('[').trim_end_matches(']').parse().ok()?;
            return Some(NoProxyRule::Net(ip, bits.parse().ok()?));
        }
        let bare = e.trim_start_matches('[');
        if let Some((inside, _)) = bare.split_once(']') {
            return inside.parse().ok().map(NoProxyRule::Ip);
        }
        if let Ok(ip) = e.parse::<IpAddr>() {
            return Some(NoProxyRule::Ip(ip));
        }
        let host = match e.rsplit_once(':') {
            Some((h, port)) if port.chars().all(|c| c.is_ascii_digit()) => h,
            _ => e.as_str(),
        };
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Some(NoProxyRule::Ip(ip));
        }
        let domain = host.trim_start_matches("*.").trim_start_matches('.');
        (!domain.is_empty()).then(|| NoProxyRule::Domain(domain.to_owned()))
    }

    fn matches(&self, host: &str) -> bool {
        let h = host.trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase();
        match self {
            NoProxyRule::All => true,
            NoProxyRule::Domain(d) => h == *d || h.strip_suffix(d.as_str()).is_some_and(|rest| rest.ends_with('.')),
            NoProxyRule::Ip(ip) => h.parse::<IpAddr>().is_ok_and(|a| a == *ip),
            NoProxyRule::Net(net, bits) => h.parse::<IpAddr>().is_ok_and(|a| in_net(a, *net, *bits)),
        }
    }
}

fn in_net(addr: IpAddr, net: IpAddr, bits: u8) -> bool {
    match (addr, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) if bits <= 32 => {
            let mask = if bits == 0 { 0 } else { u32::MAX << (32 - bits) };
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) if bits <= 128 => {
            let mask = if bits == 0 { 0 } else { u128::MAX << (128 - bits) };
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

/// A backend's connection pool, thrown away whenever an answer broke: a connection that carried
/// a truncated or failed stream is never used again (a server may have left it half-closed).
/// Some servers (llama-cpp-python's, after cutting a stream on a context overflow or a cancelled
/// generation) leave a connection broken, so [`send`] also retries once a request that got no
/// answer at all. The [`ClientSetup`] stays: only the pool is new.
pub(crate) struct Pool {
    setup: ClientSetup,
    current: std::sync::Mutex<reqwest::Client>,
}

impl Pool {
    /// Sets up the client for a backend whose requests go to `base_url`.
    pub(crate) fn new(backend: &str, opts: &ClientOptions, base_url: &str) -> Result<Self, BackendError> {
        let config = |e: SetupError| BackendError::Config { backend: backend.to_owned(), detail: e.to_string() };
        let setup = ClientSetup::new(opts).map_err(config)?;
        setup.check_target(base_url).map_err(config)?;
        let current = std::sync::Mutex::new(setup.client());
        Ok(Pool { setup, current })
    }

    /// The current client (a cheap handle on the shared pool).
    pub(crate) fn get(&self) -> reqwest::Client {
        self.current.lock().map(|c| c.clone()).unwrap_or_else(|_| self.setup.client())
    }

    /// Starts a fresh pool when `r` is a broken answer; passes `r` through.
    pub(crate) fn check<T>(&self, r: Result<T, BackendError>) -> Result<T, BackendError> {
        if matches!(r, Err(BackendError::Truncated { .. } | BackendError::Failed { .. } | BackendError::Cancelled))
            && let Ok(mut c) = self.current.lock()
        {
            *c = self.setup.client();
        }
        r
    }

    /// [`send`] with this pool's proxy named in connection errors.
    pub(crate) async fn send(
        &self,
        backend: &str,
        url: &str,
        req: reqwest::RequestBuilder,
        cancel: &CancellationToken,
        unreachable_hint: &str,
    ) -> Result<reqwest::Response, BackendError> {
        let hint = match self.setup.proxy_for(url) {
            Some(p) => format!("{unreachable_hint} (through proxy {p})"),
            None => unreachable_hint.to_owned(),
        };
        send(backend, url, req, cancel, &hint).await
    }
}

/// What every request of an API backend carries: its key (sent as its `auth` says), extra
/// headers and query parameters. Built once, when the backend is.
pub(crate) struct Credentials {
    auth: Auth,
    key: Option<String>,
    /// Where the key came from, for error hints ("$OPENAI_API_KEY", "no key (…)").
    pub source: String,
    headers: HeaderMap,
    query: Vec<(String, String)>,
}

/// The parts of a backend's table that [`Credentials`] is made from.
pub(crate) struct CredentialConfig<'a> {
    pub auth: Auth,
    pub api_key: &'a Option<String>,
    pub api_key_env: &'a Option<String>,
    pub headers: &'a BTreeMap<String, String>,
    pub query: &'a BTreeMap<String, String>,
}

impl Credentials {
    pub(crate) fn new(backend: &str, cfg: CredentialConfig<'_>) -> Result<Credentials, BackendError> {
        Self::with_env(backend, cfg, |v| std::env::var(v).ok())
    }

    fn with_env(
        backend: &str,
        cfg: CredentialConfig<'_>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Credentials, BackendError> {
        let (key, source) = match cfg.auth {
            Auth::None => (None, "no key (auth = \"none\")".to_owned()),
            _ => resolve_key(cfg.api_key, cfg.api_key_env, env),
        };
        let mut headers = HeaderMap::new();
        for (name, value) in cfg.headers {
            let bad = |what: &str| BackendError::Config {
                backend: backend.to_owned(),
                detail: format!("headers: {name:?} = {value:?} is not a valid HTTP header {what}"),
            };
            let n = reqwest::header::HeaderName::from_bytes(name.trim().as_bytes()).map_err(|_| bad("name"))?;
            let v = reqwest::header::HeaderValue::from_str(value.trim()).map_err(|_| bad("value"))?;
            headers.insert(n, v);
        }
        let query = cfg.query.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        Ok(Credentials { auth: cfg.auth, key, source, headers, query })
    }

    /// Adds the key, the headers and the query parameters to `rb`.
    pub(crate) fn apply(&self, rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        let mut rb = rb.headers(self.headers.clone());
        if !self.query.is_empty() {
            rb = rb.query(&self.query);
        }
        match (&self.key, self.auth) {
            (Some(k), Auth::Bearer) => rb.bearer_auth(k),
            (Some(k), Auth::ApiKey) => rb.header("api-key", k),
            (Some(k), Auth::XApiKey) => rb.header("x-api-key", k),
            _ => rb,
        }
    }
}

/// The key to send: `api_key` when non-empty, else the variable `api_key_env` names, when set
/// and non-empty. Also says where it came from, for error hints.
fn resolve_key(
    api_key: &Option<String>,
    api_key_env: &Option<String>,
    env: impl Fn(&str) -> Option<String>,
) -> (Option<String>, String) {
    if let Some(k) = api_key.as_deref().map(str::trim).filter(|k| !k.is_empty()) {
        return (Some(k.to_owned()), "the configured `api_key`".into());
    }
    match api_key_env.as_deref().filter(|n| !n.is_empty()) {
        Some(var) => {
            let key = env(var).map(|k| k.trim().to_owned()).filter(|k| !k.is_empty());
            let source = if key.is_some() { format!("${var}") } else { format!("no key (${var} is unset or empty)") };
            (key, source)
        }
        None => (None, "no key (neither `api_key` nor `api_key_env` is set)".into()),
    }
}

/// Refuses URLs no HTTP backend can reach (no `http://` or `https://` scheme), with a clear
/// message rather than an obscure connect failure.
pub(crate) fn check_url(backend: &str, url: &str) -> Result<(), BackendError> {
    let lower = url.trim().to_ascii_lowercase();
    if lower.starts_with("http://") || lower.starts_with("https://") {
        return Ok(());
    }
    Err(BackendError::Config {
        backend: backend.to_owned(),
        detail: format!("{url}: the URL must start with http:// or https://"),
    })
}

/// Sends `req`, giving up with [`BackendError::Cancelled`] as soon as `cancel` fires (dropping
/// the request closes the connection).
pub(crate) async fn send(
    backend: &str,
    url: &str,
    req: reqwest::RequestBuilder,
    cancel: &CancellationToken,
    unreachable_hint: &str,
) -> Result<reqwest::Response, BackendError> {
    let retry = req.try_clone();
    let first = tokio::select! {
        biased;
        _ = cancel.cancelled() => return Err(BackendError::Cancelled),
        r = req.send() => r,
    };
    let e = match (first, retry) {
        (Ok(resp), _) => return Ok(resp),
        // No answer at all on what was probably a stale pooled connection: once more.
        (Err(e), Some(again)) if !e.is_connect() && !e.is_timeout() && !e.is_builder() && !e.is_status() => {
            tracing::debug!(backend, error = %error_chain(&e), "request failed before any answer; retrying once");
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return Err(BackendError::Cancelled),
                r = again.send() => match r {
                    Ok(resp) => return Ok(resp),
                    Err(e) => e,
                },
            }
        }
        (Err(e), _) => e,
    };
    Err(transport_error(backend, url, &e, unreachable_hint))
}

/// Maps a failure to get an answer at all. A certificate the client cannot verify is a
/// configuration error whose message says what to set.
pub(crate) fn transport_error(backend: &str, url: &str, e: &reqwest::Error, unreachable_hint: &str) -> BackendError {
    if let Some(tls) = tls_problem(e) {
        return BackendError::Config { backend: backend.to_owned(), detail: format!("{url}: {tls}") };
    }
    if e.is_connect() {
        let hint = if unreachable_hint.is_empty() { String::new() } else { format!("; {unreachable_hint}") };
        BackendError::Unreachable {
            backend: backend.to_owned(),
            detail: format!("cannot connect to {url}: {}{hint}", error_chain(e)),
        }
    } else if e.is_builder() {
        BackendError::Config { backend: backend.to_owned(), detail: format!("bad URL {url}: {}", error_chain(e)) }
    } else {
        BackendError::Failed {
            backend: backend.to_owned(),
            detail: format!("request to {url} failed: {}", error_chain(e)),
        }
    }
}

/// The error in words, with what to do when it is a certificate problem.
pub fn describe(e: &reqwest::Error) -> String {
    tls_problem(e).unwrap_or_else(|| error_chain(e))
}

/// When `e` failed on the server's certificate: what went wrong and what to set.
pub fn tls_problem(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        // `io::Error::source` skips the error it wraps, so look inside it too.
        let inner = err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .map(|i| i as &(dyn std::error::Error + 'static));
        for candidate in [Some(err), inner].into_iter().flatten() {
            if let Some(tls) = candidate.downcast_ref::<rustls::Error>() {
                return Some(explain_tls(tls));
            }
        }
        cur = err.source();
    }
    // Some layers re-wrap the TLS error as text; recognise rustls's wording then.
    let chain = error_chain(e);
    let (_, tail) = chain.split_once("invalid peer certificate: ")?;
    let cert = tail.split([';', ':', ',']).next().unwrap_or(tail).trim();
    let known = match cert {
        "UnknownIssuer" => rustls::CertificateError::UnknownIssuer,
        "NotValidForName" => rustls::CertificateError::NotValidForName,
        "Expired" => rustls::CertificateError::Expired,
        other => rustls::CertificateError::Other(rustls::OtherError(std::sync::Arc::new(std::io::Error::other(
            other.to_owned(),
        )))),
    };
    Some(explain_tls(&rustls::Error::InvalidCertificate(known)))
}

fn explain_tls(e: &rustls::Error) -> String {
    use rustls::CertificateError as C;
    match e {
        rustls::Error::InvalidCertificate(C::UnknownIssuer) => "the server's TLS certificate is signed by a CA this \
             machine does not trust (unknown issuer); set `ca_file` to that CA's PEM certificate, or point \
             SSL_CERT_FILE at a bundle that holds it"
            .into(),
        rustls::Error::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. }) => format!(
            "the server's TLS certificate is not valid for this host name ({e}); use the name the certificate \
             was issued for in the URL"
        ),
        rustls::Error::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => {
            format!("the server's TLS certificate has expired ({e})")
        }
        rustls::Error::InvalidCertificate(_) => {
            format!("the server's TLS certificate was refused: {e}; check `ca_file`")
        }
        other => format!("TLS failed: {other}"),
    }
}

/// The wait a refusal asks for: `retry-after-ms` (milliseconds, as OpenAI's and Anthropic's
/// APIs send it), else `Retry-After` as seconds or as an HTTP date (RFC 9110 §10.2.3), measured
/// from `now`. A date in the past means "now" (zero).
pub fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
    let secs = |v: &str, scale: f64| {
        v.parse::<f64>().ok().filter(|n| n.is_finite() && *n >= 0.0).map(|n| Duration::from_secs_f64(n / scale))
    };
    if let Some(d) = text("retry-after-ms").and_then(|v| secs(v, 1000.0)) {
        return Some(d);
    }
    let v = text("retry-after")?;
    secs(v, 1.0)
        .or_else(|| httpdate::parse_http_date(v).ok().map(|at| at.duration_since(now).unwrap_or(Duration::ZERO)))
}

/// A refused request: its status, the provider's message and any wait it asked for.
#[derive(Clone, Debug)]
pub(crate) struct Refusal {
    pub status: u16,
    pub message: String,
    pub retry_after: Option<Duration>,
}

impl Refusal {
    /// Reads `resp`'s error body (bounded in time and size, cancellable).
    pub(crate) async fn read(resp: reqwest::Response, cancel: &CancellationToken) -> Result<Refusal, BackendError> {
        let status = resp.status().as_u16();
        let retry_after = retry_after(resp.headers(), SystemTime::now());
        let message = error_message(resp, cancel).await?;
        Ok(Refusal { status, message, retry_after })
    }

    /// "Slow down": 429 and 529 (overloaded) always, 503 when it says how long to wait.
    pub(crate) fn rate_limited(&self, backend: &str) -> Option<BackendError> {
        let limited = matches!(self.status, 429 | 529) || (self.status == 503 && self.retry_after.is_some());
        limited.then(|| BackendError::RateLimited {
            backend: backend.to_owned(),
            status: self.status,
            retry_after: self.retry_after,
            detail: self.message.clone(),
        })
    }
}

/// The error and its sources, joined (reqwest's own message alone says little).
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        let m = inner.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        src = inner.source();
    }
    s
}

/// A response body as a stream of chunks, read under cancellation.
pub(crate) struct Body {
    stream: BoxStream<'static, reqwest::Result<Bytes>>,
}

impl Body {
    pub(crate) fn new(resp: reqwest::Response) -> Self {
        Body { stream: resp.bytes_stream().boxed() }
    }

    /// The next chunk; `Ok(None)` at the end of the body.
    pub(crate) async fn next(
        &mut self,
        backend: &str,
        cancel: &CancellationToken,
    ) -> Result<Option<Bytes>, BackendError> {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => Err(BackendError::Cancelled),
            c = self.stream.next() => match c {
                None => Ok(None),
                Some(Ok(b)) => Ok(Some(b)),
                Some(Err(e)) => Err(BackendError::Truncated {
                    backend: backend.to_owned(),
                    detail: format!("reading the stream failed: {}", error_chain(&e)),
                }),
            },
        }
    }
}

/// Reads an error response's body (bounded in time and size, cancellable) and pulls the
/// provider's message out of it: `{"error":"..."}`, `{"error":{"message":...}}`, `{"detail":...}`
/// or `{"message":...}`, else the text itself.
pub(crate) async fn error_message(resp: reqwest::Response, cancel: &CancellationToken) -> Result<String, BackendError> {
    let text = tokio::select! {
        biased;
        _ = cancel.cancelled() => return Err(BackendError::Cancelled),
        r = tokio::time::timeout(ERROR_BODY_TIMEOUT, resp.text()) => match r {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => format!("(error body unreadable: {e})"),
            Err(_) => "(error body did not arrive)".to_owned(),
        },
    };
    Ok(message_of(&text))
}

pub(crate) fn message_of(text: &str) -> String {
    let msg = match serde_json::from_str::<Value>(text) {
        Ok(v) => json_message(&v).unwrap_or_else(|| text.trim().to_owned()),
        Err(_) => text.trim().to_owned(),
    };
    let msg = if msg.is_empty() { "(empty body)".to_owned() } else { msg };
    truncate(&msg, ERROR_BODY_MAX)
}

/// The message in an error object, if it has one.
pub(crate) fn json_message(v: &Value) -> Option<String> {
    let e = v.get("error").or_else(|| v.get("detail")).unwrap_or(v);
    match e {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => match o.get("message") {
            Some(Value::String(s)) => Some(s.clone()),
            _ => {
                if std::ptr::eq(e, v) {
                    None
                } else {
                    Some(e.to_string())
                }
            }
        },
        Value::Null => None,
        other if !std::ptr::eq(other, v) => Some(other.to_string()),
        _ => None,
    }
}

/// Cuts `s` to at most `max` characters, marking the cut.
pub(crate) fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_from_error_bodies() {
        assert_eq!(
            message_of(r#"{"error":"model \"x\" not found, try pulling it first"}"#),
            "model \"x\" not found, try pulling it first"
        );
        assert_eq!(message_of(r#"{"error":{"message":"bad key","type":"auth"}}"#), "bad key");
        assert_eq!(message_of(r#"{"detail":"Not Found"}"#), "Not Found");
        assert_eq!(message_of(r#"{"message":"nope"}"#), "nope");
        assert_eq!(message_of("Internal Server Error\n"), "Internal Server Error");
        assert_eq!(message_of(""), "(empty body)");
        assert_eq!(message_of(r#"{"error":{"code":5}}"#), r#"{"code":5}"#);
        assert_eq!(message_of(r#"{"x":1}"#), r#"{"x":1}"#);
        assert_eq!(truncate("日本語", 2), "日本…");
        assert!(check_url("b", "http://127.0.0.1:1/v1").is_ok());
        assert!(check_url("b", "https://api.example/v1").is_ok());
        assert!(matches!(check_url("b", "127.0.0.1:8080"), Err(BackendError::Config { .. })));
    }

    #[test]
    fn retry_after_in_its_three_forms() {
        use reqwest::header::{HeaderName, HeaderValue};
        let h = |pairs: &[(&'static str, &str)]| {
            let mut m = HeaderMap::new();
            for (k, v) in pairs {
                m.insert(HeaderName::from_static(k), HeaderValue::from_str(v).unwrap());
            }
            m
        };
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_445_412_480); // Wed, 21 Oct 2015 07:28:00 GMT
        assert_eq!(retry_after(&h(&[("retry-after", "120")]), now), Some(Duration::from_secs(120)));
        assert_eq!(retry_after(&h(&[("retry-after", " 1.5 ")]), now), Some(Duration::from_millis(1500)));
        assert_eq!(
            retry_after(&h(&[("retry-after", "Wed, 21 Oct 2015 07:28:30 GMT")]), now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(retry_after(&h(&[("retry-after", "Wed, 21 Oct 2015 07:00:00 GMT")]), now), Some(Duration::ZERO));
        assert_eq!(
            retry_after(&h(&[("retry-after-ms", "250"), ("retry-after", "9")]), now),
            Some(Duration::from_millis(250)),
            "retry-after-ms is the more precise of the two"
        );
        assert_eq!(
            retry_after(&h(&[("retry-after-ms", "soon"), ("retry-after", "9")]), now),
            Some(Duration::from_secs(9))
        );
        assert_eq!(retry_after(&h(&[("retry-after", "later")]), now), None);
        assert_eq!(retry_after(&h(&[("retry-after", "-3")]), now), None);
        assert_eq!(retry_after(&HeaderMap::new(), now), None);
    }

    fn env_of(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |k| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| (*v).to_owned())
    }

    fn setup(proxy: Option<&str>, env: &'static [(&'static str, &'static str)]) -> ClientSetup {
        ClientSetup::with_env(&ClientOptions { ca_file: None, proxy: proxy.map(str::to_owned) }, env_of(env)).unwrap()
    }

    #[test]
    fn loopback_and_no_proxy_hosts_bypass_the_environments_proxy() {
        let env = &[
            ("HTTP_PROXY", "http://proxy.corp:3128"),
            ("https_proxy", "proxy.corp:3129"),
            ("ALL_PROXY", "socks5://socks.corp"),
            ("no_proxy", "internal.example, .corp.example,10.0.0.0/8, 192.168.1.7:8080, [fd00::1]"),
        ];
        let s = setup(None, env);
        let p = |u: &str| s.proxy_for(u);
        assert_eq!(p("http://api.example/v1").as_deref(), Some("http://proxy.corp:3128/"));
        assert_eq!(p("https://api.example/v1").as_deref(), Some("http://proxy.corp:3129/"));
        for direct in [
            "http://127.0.0.1:11434",
            "http://127.8.9.10:1",
            "http://localhost:8765",
            "http://LOCALHOST:8765",
            "http://app.localhost/",
            "http://[::1]:8765",
            "https://internal.example/x",
            "https://gpu.internal.example/x",
            "https://a.corp.example/",
            "http://corp.example/",
            "http://10.1.2.3:8000/v1",
            "http://192.168.1.7:9999/",
            "http://[fd00::1]:80/",
        ] {
            assert_eq!(p(direct), None, "{direct} must not be proxied");
        }
        assert!(p("http://notinternal.example/").is_some(), "a suffix match needs a dot boundary");
        assert!(p("http://11.0.0.1/").is_some());
        // Only ALL_PROXY: it serves both schemes.
        let s = setup(None, &[("all_proxy", "socks5h://127.0.0.1:1080")]);
        assert_eq!(s.proxy_for("https://api.example").as_deref(), Some("socks5h://127.0.0.1:1080"));
        assert_eq!(s.proxy_for("http://127.0.0.1:1"), None);
        // Lower case wins over upper case; empty values are unset.
        let s = setup(None, &[("http_proxy", "http://lower:1"), ("HTTP_PROXY", "http://upper:1")]);
        assert_eq!(s.proxy_for("http://api.example").as_deref(), Some("http://lower:1/"));
        let s = setup(None, &[("http_proxy", " "), ("HTTP_PROXY", "http://upper:1")]);
        assert_eq!(s.proxy_for("http://api.example").as_deref(), Some("http://upper:1/"));
        let s = setup(None, &[("HTTP_PROXY", "http://p:1"), ("NO_PROXY", "*")]);
        assert_eq!(s.proxy_for("http://api.example"), None);
    }

    #[test]
    fn a_configured_proxy_overrides_the_environment() {
        let env = &[("HTTP_PROXY", "http://env:1")];
        let s = setup(Some("http://mine:8888"), env);
        assert_eq!(s.proxy_for("http://127.0.0.1:9/").as_deref(), Some("http://mine:8888/"), "even for loopback");
        assert_eq!(s.proxy_for("https://api.example/").as_deref(), Some("http://mine:8888/"));
        let s = setup(Some("NONE"), env);
        assert_eq!(s.proxy_for("http://api.example/"), None);
        let bad = ClientSetup::with_env(&ClientOptions { proxy: Some("ftp://x".into()), ca_file: None }, env_of(env));
        assert!(matches!(&bad, Err(SetupError::Proxy { origin, .. }) if origin == "proxy"), "{bad:?}");
    }

    #[test]
    fn a_broken_environment_proxy_fails_only_the_targets_it_applies_to() {
        let s = setup(None, &[("HTTPS_PROXY", "ftp://nope")]);
        assert!(s.check_target("http://127.0.0.1:11434").is_ok());
        assert!(s.check_target("http://api.example").is_ok(), "HTTPS_PROXY does not apply to http://");
        let e = s.check_target("https://api.example").unwrap_err();
        assert!(e.to_string().contains("HTTPS_PROXY"), "{e}");
        assert_eq!(s.proxy_for("https://api.example"), None);
    }

    #[test]
    fn ca_file_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let opts = |p: &Path| ClientOptions { ca_file: Some(p.to_owned()), proxy: None };
        let e = ClientSetup::new(&opts(&missing)).unwrap_err();
        assert!(matches!(&e, SetupError::CaFile { path, .. } if path.contains("missing.pem")), "{e}");
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "hello").unwrap();
        let e = ClientSetup::new(&opts(&junk)).unwrap_err();
        assert!(e.to_string().contains("no PEM certificate"), "{e}");
    }

    #[test]
    fn key_resolution() {
        let env = |v: &str| match v {
            "SET" => Some("sk-env".to_owned()),
            "EMPTY" => Some(String::new()),
            _ => None,
        };
        let r =
            |key: Option<&str>, var: Option<&str>| resolve_key(&key.map(str::to_owned), &var.map(str::to_owned), env);
        assert_eq!(r(Some("sk-cfg"), Some("SET")).0.as_deref(), Some("sk-cfg"));
        assert_eq!(r(Some(""), Some("SET")), (Some("sk-env".into()), "$SET".into()));
        assert_eq!(r(None, Some("EMPTY")), (None, "no key ($EMPTY is unset or empty)".into()));
        assert_eq!(r(None, Some("UNSET")).0, None);
        assert_eq!(r(None, None).0, None);
    }

    #[test]
    fn credentials_refuse_bad_headers_and_send_no_key_for_auth_none() {
        let key = Some("k".to_owned());
        let empty = BTreeMap::new();
        let cfg = |auth, headers| CredentialConfig { auth, api_key: &key, api_key_env: &None, headers, query: &empty };
        let bad = BTreeMap::from([("bad header".to_owned(), "v".to_owned())]);
        let e = Credentials::new("b", cfg(Auth::Bearer, &bad)).err().unwrap();
        assert!(e.to_string().contains("bad header"), "{e}");
        let c = Credentials::new("b", cfg(Auth::None, &empty)).unwrap();
        assert!(c.key.is_none() && c.source.contains("none"), "{}", c.source);
    }
}
