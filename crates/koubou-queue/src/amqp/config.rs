//! `[queue]` with an `amqp://` or `amqps://` URL, and the secrets in it.
//!
//! The password may be in the URL or, better, in an environment variable the config names
//! (`password_env`); the whole URL may also come from `KOUBOU_AMQP_URL`. Neither is ever
//! written out: `Debug` and every error show the URL with `***` for the password.

use std::{fmt, path::PathBuf};

use lapin::uri::{AMQPScheme, AMQPUri};
use serde::{Deserialize, Serialize};

use crate::QueueError;

/// The environment variable [`AmqpConfig::from_env`] takes the broker's URL from.
pub const URL_ENV: &str = "KOUBOU_AMQP_URL";

/// RabbitMQ as the dispatcher.
#[derive(Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AmqpConfig {
    /// `amqp://user:password@host:5672/vhost` (the vhost URL-encoded: `%2f` is `/`), or
    /// `amqps://…` for TLS.
    pub url: String,
    /// Take the password from this environment variable (it replaces the URL's).
    pub password_env: Option<String>,
    /// PEM file with the CA certificates an `amqps://` broker's certificate is checked against,
    /// beside the system's.
    pub ca_file: Option<PathBuf>,
    /// Dispatchers with the same namespace on the same broker (vhost) are one queue: the
    /// durable queue `koubou.<namespace>.tasks` and the wake-up exchange `koubou.<namespace>.wake`.
    pub namespace: String,
    /// The outbox sweep runs at least this often (milliseconds), and whenever a retry or a
    /// lease falls due: it publishes the claimable tasks no confirmed delivery covers.
    pub sweep_ms: u64,
    /// Longest wait for the broker (connecting, a publish's confirm, a `basic.get`) before the
    /// operation fails as unavailable.
    pub timeout_ms: u64,
}

impl Default for AmqpConfig {
    fn default() -> Self {
        AmqpConfig {
            url: "amqp://127.0.0.1:5672/%2f".into(),
            password_env: None,
            ca_file: None,
            namespace: "default".into(),
            sweep_ms: 10_000,
            timeout_ms: 10_000,
        }
    }
}

impl fmt::Debug for AmqpConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpConfig")
            .field("url", &redact_url(&self.url))
            .field("password_env", &self.password_env)
            .field("ca_file", &self.ca_file)
            .field("namespace", &self.namespace)
            .field("sweep_ms", &self.sweep_ms)
            .field("timeout_ms", &self.timeout_ms)
            .finish()
    }
}

/// What connecting takes, resolved from the config: the URI with its password, and the CA.
pub(crate) struct Resolved {
    pub uri: AMQPUri,
    /// The URL for messages, password replaced.
    pub shown: String,
    /// The password, to scrub from error messages.
    pub secret: Option<String>,
    /// PEM of extra CA certificates.
    pub ca_pem: Option<String>,
}

impl AmqpConfig {
    /// The defaults, with the URL from `KOUBOU_AMQP_URL` when it is set.
    pub fn from_env() -> AmqpConfig {
        let mut cfg = AmqpConfig::default();
        if let Ok(url) = std::env::var(URL_ENV) {
            cfg.url = url;
        }
        cfg
    }

    /// Whether `url` reads as an AMQP URL (`amqp://` or `amqps://`); the error never shows
    /// its password.
    pub fn check_url(url: &str) -> Result<(), String> {
        if !(url.starts_with("amqp://") || url.starts_with("amqps://")) {
            return Err(format!("{:?} is not an AMQP URL: it must start with amqp:// or amqps://", redact_url(url)));
        }
        // The parser's message may quote the URL: none of it is shown.
        url.parse::<AMQPUri>().map(drop).map_err(|_| {
            format!("{:?} is not an AMQP URL (amqp://user:password@host:port/vhost or amqps://…)", redact_url(url))
        })
    }

    /// The durable queue the tasks' ids travel through.
    pub fn queue_name(&self) -> String {
        format!("koubou.{}.tasks", self.namespace)
    }

    /// The fanout exchange that tells every dispatcher a delivery is there.
    pub fn wake_exchange(&self) -> String {
        format!("koubou.{}.wake", self.namespace)
    }

    /// Checks the config and reads the secrets it names.
    pub(crate) fn resolve(&self) -> Result<Resolved, QueueError> {
        let shown = redact_url(&self.url);
        let refuse = |detail: String| QueueError::Open { path: shown.clone(), detail };
        let ns_ok = !self.namespace.is_empty()
            && self.namespace.len() <= 200
            && self.namespace.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        if !ns_ok {
            return Err(refuse(format!(
                "namespace {:?} must be 1–200 characters of A–Z, a–z, 0–9, '-', '_' and '.'",
                self.namespace
            )));
        }
        // The parser's message may quote the URL: none of it is shown.
        let mut uri: AMQPUri =
            self.url.parse().map_err(|_| refuse("not an AMQP URL (amqp://user:password@host:port/vhost)".into()))?;
        if let Some(var) = &self.password_env {
            uri.authority.userinfo.password = std::env::var(var)
                .map_err(|_| refuse(format!("password_env names {var}, which is not set (or not UTF-8)")))?;
        }
        let ca_pem = match &self.ca_file {
            Some(path) => {
                if uri.scheme != AMQPScheme::AMQPS {
                    return Err(refuse("ca_file is set but the URL is not amqps://".into()));
                }
                Some(
                    std::fs::read_to_string(path)
                        .map_err(|e| refuse(format!("cannot read ca_file {}: {e}", path.display())))?,
                )
            }
            None => None,
        };
        let secret = Some(uri.authority.userinfo.password.clone()).filter(|p| !p.is_empty());
        Ok(Resolved { uri, shown, secret, ca_pem })
    }
}

/// The URL with its password (if any) replaced by `***`.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let userinfo = &url[s + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// `text` with every occurrence of `secret` replaced by `***`.
pub(crate) fn scrub(text: String, secret: Option<&str>) -> String {
    match secret {
        Some(s) if !s.is_empty() && text.contains(s) => text.replace(s, "***"),
        _ => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_show() {
        let cfg = AmqpConfig { url: "amqp://koubou:s3cret-pw@broker:5672/%2f".into(), ..AmqpConfig::default() };
        let debug = format!("{cfg:?}");
        assert!(!debug.contains("s3cret-pw") && debug.contains("koubou:***@broker"), "{debug}");
        let r = cfg.resolve().unwrap();
        assert_eq!(
            (r.uri.authority.userinfo.password.as_str(), r.shown.as_str()),
            ("s3cret-pw", "amqp://koubou:***@broker:5672/%2f")
        );
        assert_eq!(scrub("auth failed for s3cret-pw".into(), r.secret.as_deref()), "auth failed for ***");
        assert_eq!(redact_url("amqp://host/%2f"), "amqp://host/%2f");
        assert_eq!(redact_url("amqp://user@host/"), "amqp://user@host/");

        let bad = AmqpConfig { url: "amqp://u:s3cret-pw@host:notaport/".into(), ..AmqpConfig::default() };
        let e = bad.resolve().err().unwrap().to_string();
        assert!(!e.contains("s3cret-pw"), "{e}");
    }

    #[test]
    fn the_password_can_come_from_the_environment() {
        let var = format!("KOUBOU_TEST_AMQP_PW_{:x}", fastrand::u64(..));
        // SAFETY: a variable of this test's own (random) name, read only by this test.
        unsafe { std::env::set_var(&var, "from-env") };
        let cfg = AmqpConfig {
            url: "amqp://koubou:in-url@host/%2f".into(),
            password_env: Some(var.clone()),
            ..AmqpConfig::default()
        };
        let r = cfg.resolve().unwrap();
        assert_eq!(r.uri.authority.userinfo.password, "from-env");
        assert_eq!(r.secret.as_deref(), Some("from-env"));
        let missing = AmqpConfig { password_env: Some(format!("{var}_UNSET")), ..cfg };
        let e = missing.resolve().err().unwrap().to_string();
        assert!(e.contains("not set") && !e.contains("in-url"), "{e}");
        unsafe { std::env::remove_var(&var) };
    }

    #[test]
    fn urls_are_checked_without_showing_the_password() {
        assert!(AmqpConfig::check_url("amqp://guest:guest@127.0.0.1:5672/%2f").is_ok());
        assert!(AmqpConfig::check_url("amqps://broker.lan/vhost").is_ok());
        let e = AmqpConfig::check_url("amqp://u:s3cret-pw@host:notaport/").unwrap_err();
        assert!(e.contains("not an AMQP URL") && e.contains("u:***@host") && !e.contains("s3cret-pw"), "{e}");
        let e = AmqpConfig::check_url("redis://u:s3cret-pw@host/0").unwrap_err();
        assert!(e.contains("amqp://") && !e.contains("s3cret-pw"), "{e}");
    }

    #[test]
    fn namespaces_are_checked() {
        for ns in ["", "a b", "a/b", "{x}"] {
            assert!(AmqpConfig { namespace: ns.into(), ..AmqpConfig::default() }.resolve().is_err(), "{ns:?}");
        }
        assert_eq!(AmqpConfig::default().queue_name(), "koubou.default.tasks");
    }
}
