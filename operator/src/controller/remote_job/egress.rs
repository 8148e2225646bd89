//! Which object-store endpoints the operator itself may call. The RemoteJob controller reads the
//! size and checksum of uploaded outputs with a signed HEAD to the store a user named
//! (`outputs[].endpoint`), from the operator's own network position: without a check a user could
//! make it probe the cloud's metadata service, the API server or any cluster Service (SSRF).
//! [`check`] is the pure rule; [`allowed`] resolves the name and applies it.

use std::net::IpAddr;

/// Names that mean "inside the cluster" or "the cloud's metadata service".
const INTERNAL_NAMES: &[&str] = &[
    "kubernetes",
    "kubernetes.default",
    "metadata",
    "metadata.google.internal",
    "instance-data",
];
/// Suffixes of cluster-internal DNS names.
const INTERNAL_SUFFIXES: &[&str] = &[".svc", ".svc.cluster.local", ".cluster.local"];

/// Whether `host`, resolved to `ips`, may be called, given the operator's allow list (host names,
/// IP addresses or CIDR ranges, from `--data-endpoints-allowed`). Refused unless allowed:
/// cluster-internal and metadata names, and loopback, link-local (the metadata address
/// 169.254.169.254 among them), unspecified and multicast addresses. Private ranges are allowed
/// (on-premises stores live there).
pub fn check(host: &str, ips: &[IpAddr], allow: &[String]) -> Result<(), String> {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let allowed = |ip: Option<&IpAddr>| {
        allow.iter().any(|a| {
            let a = a.trim().to_ascii_lowercase();
            a == host || ip.is_some_and(|ip| in_range(ip, &a))
        })
    };
    if allowed(None) {
        return Ok(());
    }
    if INTERNAL_NAMES.contains(&host.as_str()) || INTERNAL_SUFFIXES.iter().any(|s| host.ends_with(s)) {
        return Err(format!("{host} is a cluster-internal or metadata name"));
    }
    if ips.is_empty() {
        return Err(format!("{host} does not resolve"));
    }
    for ip in ips {
        if let Some(why) = refused(ip)
            && !allowed(Some(ip))
        {
            return Err(format!("{host} resolves to {ip}, {why}"));
        }
    }
    Ok(())
}

fn refused(ip: &IpAddr) -> Option<&'static str> {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(*ip),
        v4 => *v4,
    };
    match ip {
        IpAddr::V4(v4) if v4.is_loopback() => Some("a loopback address"),
        IpAddr::V4(v4) if v4.is_link_local() => Some("a link-local address (cloud metadata lives there)"),
        IpAddr::V4(v4) if v4.is_unspecified() || v4.is_multicast() || v4.is_broadcast() => {
            Some("not a host address")
        }
        IpAddr::V6(v6) if v6.is_loopback() => Some("a loopback address"),
        IpAddr::V6(v6) if v6.is_unicast_link_local() => Some("a link-local address"),
        IpAddr::V6(v6) if v6.is_unspecified() || v6.is_multicast() => Some("not a host address"),
        _ => None,
    }
}

/// Whether `ip` is `range`: an address, or `address/prefix`.
fn in_range(ip: &IpAddr, range: &str) -> bool {
    let (base, bits) = match range.split_once('/') {
        Some((b, n)) => (b, n.parse::<u32>().ok()),
        None => (range, None),
    };
    let Ok(base) = base.parse::<IpAddr>() else {
        return false;
    };
    match (ip, base) {
        (IpAddr::V4(ip), IpAddr::V4(base)) => {
            let bits = bits.unwrap_or(32).min(32);
            let mask = if bits == 0 { 0 } else { u32::MAX << (32 - bits) };
            u32::from(*ip) & mask == u32::from(base) & mask
        }
        (IpAddr::V6(ip), IpAddr::V6(base)) => {
            let bits = bits.unwrap_or(128).min(128);
            let mask = if bits == 0 { 0 } else { u128::MAX << (128 - bits) };
            u128::from(*ip) & mask == u128::from(base) & mask
        }
        _ => false,
    }
}

/// Whether the store at `endpoint` (`http(s)://host[:port]`) may be called: its host resolved
/// now and [`check`]ed.
pub async fn allowed(endpoint: &str, allow: &[String]) -> Result<(), String> {
    let url =
        reqwest::Url::parse(endpoint).map_err(|e| format!("endpoint {endpoint:?} is not a URL: {e}"))?;
    let host = url
        .host_str()
        .ok_or_else(|| format!("endpoint {endpoint:?} has no host"))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = url.port_or_known_default().unwrap_or(443);
    let ips: Vec<IpAddr> = match host.parse::<IpAddr>() {
        Ok(ip) => vec![ip],
        Err(_) => tokio::net::lookup_host((host.as_str(), port))
            .await
            .map(|addrs| addrs.map(|a| a.ip()).collect())
            .unwrap_or_default(),
    };
    check(&host, &ips, allow)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn metadata_loopback_and_cluster_names_are_refused_unless_allowed() {
        let none: &[String] = &[];
        for (host, ips) in [
            ("169.254.169.254", vec![ip("169.254.169.254")]),
            ("localhost", vec![ip("127.0.0.1"), ip("::1")]),
            ("rebind.example.org", vec![ip("198.51.100.7"), ip("127.0.0.2")]),
            ("mapped", vec![ip("::ffff:127.0.0.1")]),
            ("fe80-host", vec![ip("fe80::1")]),
            ("minio.storage.svc.cluster.local", vec![ip("10.96.0.12")]),
            ("kubernetes.default", vec![ip("10.96.0.1")]),
            ("metadata.google.internal", vec![ip("169.254.169.254")]),
            ("nowhere.example.org", vec![]),
        ] {
            assert!(check(host, &ips, none).is_err(), "{host} {ips:?}");
        }
        let e = check("169.254.169.254", &[ip("169.254.169.254")], none).unwrap_err();
        assert!(e.contains("link-local"), "{e}");
    }

    #[test]
    fn public_and_private_stores_pass_and_the_allow_list_opens_the_rest() {
        let none: &[String] = &[];
        assert!(check("s3.eu-west-1.amazonaws.com", &[ip("52.218.1.1")], none).is_ok());
        assert!(
            check("minio.lab", &[ip("10.0.4.20"), ip("fd00::20")], none).is_ok(),
            "private ranges are stores too"
        );
        let allow = vec![
            "127.0.0.1".to_string(),
            "minio.storage.svc.cluster.local".into(),
            "169.254.0.0/16".into(),
        ];
        assert!(check("127.0.0.1", &[ip("127.0.0.1")], &allow).is_ok());
        assert!(check("minio.storage.svc.cluster.local", &[ip("10.96.0.12")], &allow).is_ok());
        assert!(check("meta", &[ip("169.254.169.254")], &allow).is_ok(), "a CIDR");
        assert!(
            check("other", &[ip("127.0.0.2")], &allow).is_err(),
            "127.0.0.1 alone is allowed"
        );
    }

    #[test]
    fn ranges_match_by_prefix() {
        assert!(in_range(&ip("10.1.2.3"), "10.0.0.0/8"));
        assert!(!in_range(&ip("11.1.2.3"), "10.0.0.0/8"));
        assert!(in_range(&ip("2001:db8::5"), "2001:db8::/32"));
        assert!(!in_range(&ip("10.1.2.3"), "2001:db8::/32"));
        assert!(in_range(&ip("1.2.3.4"), "0.0.0.0/0"));
        assert!(!in_range(&ip("1.2.3.4"), "not-an-ip"));
    }

    #[tokio::test]
    async fn endpoints_are_parsed_and_resolved() {
        let none: &[String] = &[];
        assert!(allowed("http://127.0.0.1:8333", none).await.is_err());
        assert!(
            allowed("http://127.0.0.1:8333", &["127.0.0.1".to_string()])
                .await
                .is_ok()
        );
        assert!(allowed("http://[::1]:9000", none).await.is_err());
        assert!(allowed("not a url", none).await.is_err());
    }
}
