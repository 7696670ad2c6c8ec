//! `host:port` checking, shared by everything that takes an address from a user or from etcd
//! (etcd endpoints, node records, `--advertise`), so all of them refuse the same things the
//! same way; and what an address bound to a wildcard is published as.

use std::net::SocketAddr;

/// `host:port` with a non-empty host (name, IPv4, or IPv6 in brackets) and a port in 1..=65535.
/// The error names the address and what is wrong with it.
pub fn validate_host_port(addr: &str) -> Result<(), String> {
    if addr.contains("://") {
        return Err(format!("{addr:?} must be host:port without a scheme"));
    }
    let Some((host, port)) = addr.rsplit_once(':') else {
        return Err(format!("{addr:?} is not host:port"));
    };
    if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c.is_control() || c == '/') {
        return Err(format!("{addr:?} has no valid host before the port"));
    }
    if host.contains(':') && !(host.starts_with('[') && host.ends_with(']')) {
        return Err(format!("{addr:?}: an IPv6 host must be in brackets, like [::1]:50061"));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err(format!("{addr:?} has no valid port (1-65535)")),
    }
}

/// The address to publish for a bound one, `host:port`: a wildcard IP is not callable from
/// elsewhere, so it becomes `host` (the host of another address already published, so that a
/// role's endpoints are published under one name) or, without one, 127.0.0.1.
pub fn advertised(bound: SocketAddr, host: Option<&str>) -> String {
    if !bound.ip().is_unspecified() {
        return bound.to_string();
    }
    format!("{}:{}", host.unwrap_or("127.0.0.1"), bound.port())
}

/// The host of a `host:port` (brackets kept for IPv6), or the whole text if it has no port.
pub fn host_of(addr: &str) -> &str {
    addr.rsplit_once(':').map_or(addr, |(host, _)| host)
}

#[cfg(test)]
mod tests {
    use super::validate_host_port as check;
    use super::{advertised, host_of};

    #[test]
    fn a_wildcard_is_published_under_another_endpoint_s_host_or_loopback() {
        let any = "0.0.0.0:8090".parse().unwrap();
        assert_eq!(advertised(any, None), "127.0.0.1:8090");
        assert_eq!(advertised(any, Some("node1")), "node1:8090");
        assert_eq!(advertised("10.0.0.1:8090".parse().unwrap(), Some("node1")), "10.0.0.1:8090");
        assert_eq!(host_of("node1:50061"), "node1");
        assert_eq!(host_of("[::1]:50061"), "[::1]");
    }

    #[test]
    fn accepts_names_ipv4_and_bracketed_ipv6() {
        for ok in ["h:1", "10.0.0.2:50061", "[::1]:9000", "node-1.example:65535"] {
            check(ok).unwrap();
        }
    }

    #[test]
    fn refuses_with_the_reason() {
        assert!(check("nonsense").unwrap_err().contains("not host:port"));
        assert!(check("http://h:1").unwrap_err().contains("without a scheme"));
        assert!(check(":80").unwrap_err().contains("host"));
        assert!(check("a b:80").unwrap_err().contains("host"));
        assert!(check("::1:80").unwrap_err().contains("brackets"));
        assert!(check("h:0").unwrap_err().contains("port"));
        assert!(check("h:70000").unwrap_err().contains("port"));
    }
}
