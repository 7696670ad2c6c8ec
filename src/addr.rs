//! `host:port` checking, shared by everything that takes an address from a user or from etcd
//! (etcd endpoints, node records, `--advertise`), so all of them refuse the same things the
//! same way.

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

#[cfg(test)]
mod tests {
    use super::validate_host_port as check;

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
