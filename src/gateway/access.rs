//! Who may connect to the WebSocket endpoint and what each connection may do: the browser
//! Origin check at the upgrade, connection tokens (see [`crate::token`]) proving which user is
//! at the other end, and the topic grants those tokens carry.
//!
//! Without this any web page open in a user's browser could subscribe to any topic, so nothing
//! private could be pushed. A token comes as `?token=` on the upgrade URL (browsers cannot set
//! headers on a WebSocket) or in a first `{"action":"auth"}` frame; the event loop keeps the
//! verdict per connection as an [`Access`] and closes the connection when its token expires.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::token::{Claims, TokenError, TokenKeys, TopicGrants};

/// `--ws-auth`: whether WebSocket clients must show a connection token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WsAuth {
    /// Tokens are not read: every connection is anonymous and may subscribe to any topic.
    Off,
    /// A connection may show a token (then it is that user, limited to the token's topics) or
    /// not (anonymous, any topic): for moving clients over to tokens.
    Optional,
    /// Every connection must show a valid token, at the upgrade or in its first frame.
    Required,
}

impl FromStr for WsAuth {
    type Err = String;

    fn from_str(s: &str) -> Result<WsAuth, String> {
        match s {
            "off" => Ok(WsAuth::Off),
            "optional" => Ok(WsAuth::Optional),
            "required" => Ok(WsAuth::Required),
            other => Err(format!("{other:?} is not a --ws-auth mode; use off, optional or required")),
        }
    }
}

impl fmt::Display for WsAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WsAuth::Off => "off",
            WsAuth::Optional => "optional",
            WsAuth::Required => "required",
        })
    }
}

/// One entry of `--allowed-origins`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum OriginPattern {
    /// `*`: any origin.
    Any,
    /// `https://app.example.com`: that origin exactly (compared without case).
    Exact(String),
    /// `*.example.com` (any scheme) or `https://*.example.com`: any subdomain of it, any port.
    Subdomains { scheme: Option<String>, suffix: String },
}

impl OriginPattern {
    fn parse(pattern: &str) -> Result<OriginPattern, String> {
        let bad = |why: &str| Err(format!("--allowed-origins: {pattern:?} {why}"));
        if pattern == "*" {
            return Ok(OriginPattern::Any);
        }
        let (scheme, host) = match pattern.split_once("://") {
            Some((scheme, host)) => (Some(scheme.to_ascii_lowercase()), host),
            None => (None, pattern),
        };
        if pattern.chars().any(|c| c.is_whitespace() || c.is_control()) || host.is_empty() || host.contains('/') {
            return bad("is not an origin like https://app.example.com or *.example.com");
        }
        if let Some(domain) = host.strip_prefix("*.") {
            if domain.is_empty() || domain.contains('*') {
                return bad("has a wildcard in the wrong place: only a leading *. is allowed");
            }
            return Ok(OriginPattern::Subdomains { scheme, suffix: format!(".{}", domain.to_ascii_lowercase()) });
        }
        if host.contains('*') {
            return bad("has a wildcard in the wrong place: only a leading *. is allowed");
        }
        if scheme.is_none() {
            return bad("needs its scheme (https://...), or a leading *. for every subdomain");
        }
        Ok(OriginPattern::Exact(pattern.to_ascii_lowercase()))
    }

    fn matches(&self, origin: &str) -> bool {
        match self {
            OriginPattern::Any => true,
            OriginPattern::Exact(exact) => origin.eq_ignore_ascii_case(exact),
            OriginPattern::Subdomains { scheme, suffix } => {
                let Some((origin_scheme, rest)) = origin.split_once("://") else { return false };
                if scheme.as_deref().is_some_and(|s| !origin_scheme.eq_ignore_ascii_case(s)) {
                    return false;
                }
                // Ports are not part of the match; a host ending in ".example.com" is.
                let host = rest.rsplit_once(':').map_or(rest, |(host, port)| {
                    if port.chars().all(|c| c.is_ascii_digit()) {
                        host
                    } else {
                        rest
                    }
                });
                host.len() > suffix.len() && host.to_ascii_lowercase().ends_with(suffix.as_str())
            }
        }
    }
}

/// `--allowed-origins` and `--require-origin`: which web pages may open connections.
#[derive(Debug, Clone, Default)]
pub(crate) struct OriginPolicy {
    /// Empty: every origin.
    allowed: Vec<OriginPattern>,
    /// Refuse requests without an `Origin` header (non-browser clients send none).
    require: bool,
}

impl OriginPolicy {
    pub(crate) fn new(allowed: &[String], require: bool) -> Result<OriginPolicy, String> {
        let allowed = allowed.iter().map(|p| OriginPattern::parse(p)).collect::<Result<_, _>>()?;
        Ok(OriginPolicy { allowed, require })
    }

    /// Accepts the upgrade's `Origin` header, or says why not (the body of an HTTP 403).
    pub(crate) fn check(&self, origin: Option<&str>) -> Result<(), String> {
        let Some(origin) = origin else {
            return if self.require {
                Err("an Origin header is required on this node (--require-origin)\n".into())
            } else {
                Ok(())
            };
        };
        if self.allowed.is_empty() || self.allowed.iter().any(|p| p.matches(origin)) {
            Ok(())
        } else {
            Err(format!("origin {origin:?} is not allowed on this node (--allowed-origins)\n"))
        }
    }
}

/// A verified token, as a connection keeps it.
#[derive(Debug, Clone)]
pub(crate) struct Identity {
    /// The token's `sub`.
    pub(crate) user: Box<str>,
    pub(crate) grants: TopicGrants,
    /// When the connection is closed with 4002 unless a fresh token came: `exp` plus the
    /// leeway, on this process's monotonic clock.
    pub(crate) expires_at: Instant,
    /// `exp` as sent to the client in acks, seconds since the epoch.
    pub(crate) exp: u64,
}

/// What one connection may do, as far as tokens go.
#[derive(Debug, Clone)]
pub(crate) enum Access {
    /// No token, and none needed: any topic, no user.
    Anonymous,
    /// A token is required and has not come yet: only `auth` is accepted, until `deadline`.
    Pending { deadline: Instant },
    /// Authenticated.
    User(Identity),
}

impl Access {
    /// Whether the connection still owes its token: it receives nothing, and is counted apart.
    pub(crate) fn is_pending(&self) -> bool {
        matches!(self, Access::Pending { .. })
    }

    /// Whether the connection may subscribe to `topic`.
    pub(crate) fn allows(&self, topic: &str) -> bool {
        match self {
            Access::Anonymous => true,
            Access::Pending { .. } => false,
            Access::User(identity) => identity.grants.allows(topic),
        }
    }
}

/// Everything the event loops need to decide [`Access`]: built once by the gateway and shared.
#[derive(Debug)]
pub(crate) struct Gatekeeper {
    pub(crate) mode: WsAuth,
    /// Present unless `mode` is off.
    keys: Option<Arc<TokenKeys>>,
    leeway: Duration,
    auth_timeout: Duration,
    pub(crate) origins: OriginPolicy,
}

impl Gatekeeper {
    pub(crate) fn new(
        mode: WsAuth,
        keys: Option<Arc<TokenKeys>>,
        leeway: Duration,
        auth_timeout: Duration,
        origins: OriginPolicy,
    ) -> Gatekeeper {
        debug_assert!(mode == WsAuth::Off || keys.is_some(), "validated: --ws-auth {mode} has keys");
        let keys = if mode == WsAuth::Off { None } else { keys };
        Gatekeeper { mode, keys, leeway, auth_timeout, origins }
    }

    /// A gatekeeper that lets everyone in, as `--ws-auth off` does.
    #[cfg(test)]
    pub(crate) fn open() -> Gatekeeper {
        Gatekeeper::new(WsAuth::Off, None, Duration::ZERO, Duration::from_secs(10), OriginPolicy::default())
    }

    /// Whether tokens are read at all.
    pub(crate) fn reads_tokens(&self) -> bool {
        self.keys.is_some()
    }

    /// What a connection that showed no token gets when it opens.
    pub(crate) fn without_token(&self, now: Instant) -> Access {
        match self.mode {
            WsAuth::Off | WsAuth::Optional => Access::Anonymous,
            WsAuth::Required => Access::Pending { deadline: now + self.auth_timeout },
        }
    }

    /// Verifies a token shown by a client.
    pub(crate) fn verify(&self, token: &str) -> Result<Identity, TokenError> {
        let keys = self.keys.as_ref().expect("callers check reads_tokens() first");
        let claims = keys.verify(token, SystemTime::now(), self.leeway)?;
        Ok(self.identity(&claims))
    }

    fn identity(&self, claims: &Claims) -> Identity {
        let left = claims.expires().duration_since(SystemTime::now()).unwrap_or(Duration::ZERO);
        Identity {
            user: claims.sub.as_str().into(),
            grants: claims.grants(),
            expires_at: Instant::now() + left + self.leeway,
            exp: claims.exp,
        }
    }

    /// How long a connection may wait before its auth frame, for messages.
    pub(crate) fn auth_timeout(&self) -> Duration {
        self.auth_timeout
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(allowed: &[&str], require: bool) -> OriginPolicy {
        OriginPolicy::new(&allowed.iter().map(|s| s.to_string()).collect::<Vec<_>>(), require).unwrap()
    }

    #[test]
    fn origins_match_exactly_or_by_subdomain() {
        let p = policy(&["https://app.example.com", "*.example.org", "http://*.test.net"], false);
        p.check(Some("https://app.example.com")).unwrap();
        p.check(Some("HTTPS://APP.EXAMPLE.COM")).unwrap();
        p.check(Some("https://a.example.org")).unwrap();
        p.check(Some("http://a.b.example.org:8443")).unwrap();
        p.check(Some("http://x.test.net")).unwrap();
        for refused in [
            "https://app.example.com:8443",
            "https://evil.com",
            "https://example.org",
            "https://badexample.org",
            "https://x.test.net",
            "null",
        ] {
            let err = p.check(Some(refused)).unwrap_err();
            assert!(err.contains("--allowed-origins") && err.contains(refused), "{err}");
        }
        p.check(None).unwrap();
        assert!(policy(&[], true).check(None).unwrap_err().contains("--require-origin"));
        policy(&[], false).check(Some("https://anything")).unwrap();
        policy(&["*"], true).check(Some("https://anything")).unwrap();
    }

    #[test]
    fn bad_origin_patterns_are_refused_with_the_flag() {
        for bad in ["", "app.example.com", "https://a*.example.com", "*.", "https://x.com/path", "a b"] {
            let err = OriginPolicy::new(&[bad.to_string()], false).unwrap_err();
            assert!(err.starts_with("--allowed-origins"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn ws_auth_modes_parse_and_print() {
        for mode in [WsAuth::Off, WsAuth::Optional, WsAuth::Required] {
            assert_eq!(mode.to_string().parse::<WsAuth>().unwrap(), mode);
        }
        assert!("on".parse::<WsAuth>().unwrap_err().contains("off, optional or required"));
    }

    #[test]
    fn pending_connections_may_subscribe_to_nothing_and_anonymous_ones_to_anything() {
        let now = Instant::now();
        let open = Gatekeeper::open();
        assert!(open.without_token(now).allows("news"));
        assert!(!open.reads_tokens());
        assert!(!Access::Pending { deadline: now }.allows("news"));
    }
}
