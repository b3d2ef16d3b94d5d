//! `Host` and `Origin` values as the guard compares them, and which of them a listener accepts.
//!
//! Both are parsed strictly (a value a browser would never send is refused, never guessed at)
//! and normalized before any comparison: names in lower case without their one trailing dot
//! (`LocalHost.` is `localhost`), IP literals as addresses (`[0:0::1]` is `[::1]`,
//! `[::ffff:127.0.0.1]` is `127.0.0.1`), an origin's missing port as its scheme's default.
//! A name is compared whole, so `localhost.evil.example` or `127.0.0.1.nip.io` is just another
//! foreign name.

use std::net::{IpAddr, Ipv6Addr};

/// A host: an IP address or a (normalized) DNS name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Host {
    Ip(IpAddr),
    Name(String),
}

impl Host {
    /// True for `localhost`, 127.0.0.0/8 and ::1.
    pub fn is_loopback(&self) -> bool {
        match self {
            Host::Ip(ip) => ip.is_loopback(),
            Host::Name(n) => n == "localhost",
        }
    }
}

impl std::fmt::Display for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Host::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]"),
            Host::Ip(ip) => write!(f, "{ip}"),
            Host::Name(n) => f.write_str(n),
        }
    }
}

/// A `Host` header's value (or a request target's authority): host and optional port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Authority {
    pub host: Host,
    pub port: Option<u16>,
}

/// A browser origin: scheme, host and port (the scheme's default when the value has none).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    pub scheme: String,
    pub host: Host,
    pub port: Option<u16>,
}

impl Origin {
    /// The origin a page served by this listener has: `http://<host>:<port>`.
    pub fn http(host: Host, port: u16) -> Origin {
        Origin { scheme: "http".into(), host, port: Some(port) }
    }
}

/// Why a value was refused (said in the 403's message).
pub type Bad = &'static str;

fn parse_host(s: &str) -> Result<Host, Bad> {
    if let Some(inner) = s.strip_prefix('[') {
        let inner = inner.strip_suffix(']').ok_or("an IPv6 address must be closed with ']'")?;
        let ip: Ipv6Addr = inner.parse().map_err(|_| "not an IPv6 address inside [ ]")?;
        return Ok(Host::Ip(IpAddr::V6(ip).to_canonical()));
    }
    let name = s.strip_suffix('.').unwrap_or(s);
    if name.is_empty() {
        return Err("no host name");
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_')) {
        return Err("a host name has only letters, digits, '-', '_' and '.'");
    }
    if name.split('.').any(str::is_empty) {
        return Err("a host name has no empty labels");
    }
    let name = name.to_ascii_lowercase();
    Ok(match name.parse::<std::net::Ipv4Addr>() {
        Ok(ip) => Host::Ip(IpAddr::V4(ip)),
        Err(_) => Host::Name(name),
    })
}

fn parse_port(s: &str) -> Result<Option<u16>, Bad> {
    if s.is_empty() {
        return Ok(None);
    }
    if s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err("the port must be a number from 0 to 65535");
    }
    s.parse().map(Some).map_err(|_| "the port must be a number from 0 to 65535")
}

/// Parses `host[:port]` (IPv6 in brackets). No user info, path, or anything else.
pub fn parse_authority(s: &str) -> Result<Authority, Bad> {
    let (host, port) = match s.rfind(']') {
        Some(end) if s.starts_with('[') => match &s[end + 1..] {
            "" => (s, ""),
            rest => (&s[..=end], rest.strip_prefix(':').ok_or("only ':port' may follow an IPv6 address")?),
        },
        _ => s.rsplit_once(':').unwrap_or((s, "")),
    };
    Ok(Authority { host: parse_host(host)?, port: parse_port(port)? })
}

/// Parses an `Origin` value, `scheme://host[:port]`. `null` (sandboxed frames, `file:` pages,
/// some redirects) is refused: it names no one, so it can never be trusted.
pub fn parse_origin(s: &str) -> Result<Origin, Bad> {
    if s == "null" {
        return Err("the null origin (a sandboxed or file: page) is never allowed");
    }
    let (scheme, rest) = s.split_once("://").ok_or("an origin is scheme://host[:port]")?;
    let valid_scheme = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'));
    if !valid_scheme {
        return Err("an origin's scheme is letters, digits, '+', '-' and '.'");
    }
    let scheme = scheme.to_ascii_lowercase();
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.contains(['/', '@', '?', '#']) {
        return Err("an origin has no user, path, query or fragment");
    }
    let a = parse_authority(authority)?;
    let default = match scheme.as_str() {
        "http" | "ws" => Some(80),
        "https" | "wss" => Some(443),
        _ => None,
    };
    Ok(Origin { scheme, host: a.host, port: a.port.or(default) })
}

/// The `Host` values one listener accepts.
#[derive(Clone, Debug, Default)]
pub struct HostRules {
    /// `localhost`, 127.0.0.0/8 and ::1.
    pub loopback: bool,
    /// Any IP literal (a server bound to every interface answers to all of its addresses, and a
    /// literal address cannot be DNS-rebound).
    pub any_ip: bool,
    /// Hosts named in `server.allowed_hosts` (or the bind address), with an optional port.
    pub listed: Vec<Authority>,
}

impl HostRules {
    /// The rules for a listener bound to `bind` (the configured `server.host`) at `local`,
    /// plus `allowed_hosts`. Fails on an entry of `allowed_hosts` that is no `host[:port]`.
    pub fn new(bind: &str, local: IpAddr, allowed_hosts: &[String]) -> Result<HostRules, String> {
        let mut r = HostRules::default();
        if local.is_unspecified() {
            r.loopback = true;
            r.any_ip = true;
        } else if local.is_loopback() {
            r.loopback = true;
        } else {
            r.listed.push(Authority { host: Host::Ip(local.to_canonical()), port: None });
        }
        let bind = bind.trim_start_matches('[').trim_end_matches(']');
        if !bind.is_empty()
            && bind.parse::<IpAddr>().is_err()
            && let Ok(host) = parse_host(bind)
        {
            r.listed.push(Authority { host, port: None });
        }
        for (i, h) in allowed_hosts.iter().enumerate() {
            let a = parse_authority(h.trim())
                .map_err(|e| format!("server.allowed_hosts[{i}] = {h:?} is not host or host:port: {e}"))?;
            r.listed.push(a);
        }
        Ok(r)
    }

    pub fn allows(&self, a: &Authority) -> bool {
        (self.loopback && a.host.is_loopback())
            || (self.any_ip && matches!(a.host, Host::Ip(_)))
            || self.listed.iter().any(|l| l.host == a.host && l.port.is_none_or(|p| a.port == Some(p)))
    }
}

/// Parses `server.allowed_origins`, naming the first entry that is no origin.
pub fn parse_allowed_origins(list: &[String]) -> Result<Vec<Origin>, String> {
    list.iter()
        .enumerate()
        .map(|(i, o)| {
            parse_origin(o.trim())
                .map_err(|e| format!("server.allowed_origins[{i}] = {o:?} is not scheme://host[:port]: {e}"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(s: &str) -> Host {
        parse_authority(s).unwrap().host
    }

    fn rules(bind: &str, local: &str, allowed: &[&str]) -> HostRules {
        let allowed: Vec<String> = allowed.iter().map(|s| s.to_string()).collect();
        HostRules::new(bind, local.parse().unwrap(), &allowed).unwrap()
    }

    fn allows(r: &HostRules, h: &str) -> bool {
        parse_authority(h).is_ok_and(|a| r.allows(&a))
    }

    #[test]
    fn authorities_parse_and_normalize() {
        assert_eq!(
            parse_authority("LocalHost.:8765").unwrap(),
            Authority { host: host("localhost"), port: Some(8765) }
        );
        assert_eq!(host("[::1]"), Host::Ip("::1".parse().unwrap()));
        assert_eq!(host("[0:0:0:0:0:0:0:1]"), host("[::1]"));
        assert_eq!(host("[::ffff:127.0.0.1]:80"), host("127.0.0.1"));
        assert_eq!(parse_authority("[::1]:8765").unwrap().port, Some(8765));
        assert_eq!(parse_authority("localhost:").unwrap().port, None);
        assert_eq!(host("127.0.0.1."), Host::Ip("127.0.0.1".parse().unwrap()));
        for bad in [
            "",
            ":8765",
            "::1",
            "[::1",
            "[::1]x",
            "[fe80::1%25eth0]",
            "localhost:99999",
            "localhost:+80",
            "local host",
            "user@localhost",
            "localhost/x",
            "localhost..",
            "a..b",
            "lоcalhost", // Cyrillic 'о'
            "localhost:80:80",
        ] {
            assert!(parse_authority(bad).is_err(), "{bad:?} must not parse");
        }
        // Not IPv4 (std parses dotted quads only): these are names, and no loopback.
        assert_eq!(host("127.1"), Host::Name("127.1".into()));
        assert!(!host("127.1").is_loopback() && !host("0x7f.0.0.1").is_loopback());
    }

    #[test]
    fn loopback_listener_accepts_loopback_hosts_only() {
        let r = rules("127.0.0.1", "127.0.0.1", &[]);
        for ok in ["127.0.0.1:8765", "localhost", "LOCALHOST:8765", "localhost.:1", "[::1]:8765", "127.0.0.2"] {
            assert!(allows(&r, ok), "{ok}");
        }
        for bad in [
            "evil.example",
            "localhost.evil.example",
            "127.0.0.1.nip.io",
            "xn--localhost-9ya.example",
            "sub.localhost",
            "192.168.1.5:8765",
            "0.0.0.0",
            "127.1",
        ] {
            assert!(!allows(&r, bad), "{bad}");
        }
    }

    #[test]
    fn allowed_hosts_with_and_without_port() {
        let r = rules("127.0.0.1", "127.0.0.1", &["Koubou.LAN", "box.lan:9000"]);
        assert!(allows(&r, "koubou.lan") && allows(&r, "koubou.lan.:8765"));
        assert!(allows(&r, "box.lan:9000") && !allows(&r, "box.lan:8765") && !allows(&r, "box.lan"));
        assert!(!allows(&r, "evil.koubou.lan"));
        let bad = HostRules::new("127.0.0.1", "127.0.0.1".parse().unwrap(), &["http://x".into()]).unwrap_err();
        assert!(bad.contains("server.allowed_hosts[0]"), "{bad}");
    }

    #[test]
    fn other_binds() {
        let any = rules("0.0.0.0", "0.0.0.0", &[]);
        assert!(allows(&any, "192.168.1.5:8765") && allows(&any, "[2001:db8::1]") && allows(&any, "localhost"));
        assert!(!allows(&any, "evil.example") && !allows(&any, "192.168.1.5.nip.io"));
        let one = rules("192.168.1.5", "192.168.1.5", &[]);
        assert!(allows(&one, "192.168.1.5:8765"));
        assert!(!allows(&one, "192.168.1.6") && !allows(&one, "localhost"));
        let named = rules("koubou.lan", "192.168.1.5", &[]);
        assert!(allows(&named, "koubou.lan:8765") && allows(&named, "192.168.1.5"));
    }

    #[test]
    fn origins_parse_and_compare_whole() {
        let o = parse_origin("HTTP://LocalHost:8765").unwrap();
        assert_eq!(o, Origin::http(host("localhost"), 8765));
        assert_eq!(parse_origin("http://localhost").unwrap().port, Some(80));
        assert_eq!(parse_origin("http://localhost:80").unwrap(), parse_origin("http://localhost").unwrap());
        assert_eq!(parse_origin("https://app.example").unwrap().port, Some(443));
        assert_eq!(parse_origin("http://[::1]:8765/").unwrap(), Origin::http(host("[::1]"), 8765));
        assert_ne!(parse_origin("https://localhost:8765").unwrap(), Origin::http(host("localhost"), 8765));
        assert_ne!(parse_origin("http://localhost:3000").unwrap(), Origin::http(host("localhost"), 8765));
        assert_ne!(parse_origin("http://localhost.evil.example:8765").unwrap(), Origin::http(host("localhost"), 8765));
        for bad in ["null", "localhost:8765", "http://", "http://a/b", "http://u@localhost", "1http://x", "http://x?y"]
        {
            assert!(parse_origin(bad).is_err(), "{bad:?} must not parse");
        }
        assert!(parse_allowed_origins(&["null".into()]).unwrap_err().contains("server.allowed_origins[0]"));
        assert_eq!(parse_allowed_origins(&["http://localhost:3000/".into()]).unwrap().len(), 1);
    }
}
