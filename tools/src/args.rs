//! Parsers for the command line's values: each refuses bad input with a
//! message that clap prefixes with the flag's name.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

/// The most source addresses `--sources` may name.
pub const MAX_SOURCES: usize = 4096;

/// A duration: `3s`, `500ms`, `250us`, `2m`, or plain seconds (`1.5`).
/// Zero is refused.
pub fn duration(s: &str) -> Result<Duration, String> {
    let d = duration_or_zero(s)?;
    if d.is_zero() {
        return Err("must be longer than zero".into());
    }
    Ok(d)
}

/// As [`duration`], but zero is allowed (it turns the thing off).
pub fn duration_or_zero(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (try 3s, 500ms, 2m)"))?;
    let scale = match unit {
        "s" => 1.0,
        "ms" => 1e-3,
        "us" | "µs" => 1e-6,
        "m" | "min" => 60.0,
        _ => return Err(format!("unknown unit `{unit}` (use us, ms, s or m)")),
    };
    let secs = v * scale;
    if !secs.is_finite() || !(0.0..=86_400.0).contains(&secs) {
        return Err(format!("`{s}` is out of range (0 to 24 h)"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// A loopback socket address (127.0.0.0/8 or `[::1]`).
pub fn loopback_addr(s: &str) -> Result<SocketAddr, String> {
    let a: SocketAddr = s
        .parse()
        .map_err(|_| format!("`{s}` is not an address:port (e.g. 127.0.0.1:9000)"))?;
    if !a.ip().is_loopback() {
        return Err(format!(
            "{a} is not a loopback address: only 127.0.0.0/8 and [::1] may be used"
        ));
    }
    Ok(a)
}

/// A positive rate (connections per second).
pub fn rate(s: &str) -> Result<f64, String> {
    let r: f64 = s
        .parse()
        .map_err(|_| format!("`{s}` is not a number of connections per second"))?;
    if !(r.is_finite() && r > 0.0) {
        return Err("must be a positive number of connections per second".into());
    }
    Ok(r)
}

/// A list of source addresses (a newtype, for clap).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sources(pub Vec<IpAddr>);

/// Source addresses: `127.0.0.2-127.0.0.50`, `127.0.0.2`, or a comma list
/// of either; loopback only, at most [`MAX_SOURCES`].
pub fn sources(s: &str) -> Result<Sources, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let a: Ipv4Addr = a
                    .trim()
                    .parse()
                    .map_err(|_| format!("`{a}` is not an IPv4 address"))?;
                let b: Ipv4Addr = b
                    .trim()
                    .parse()
                    .map_err(|_| format!("`{b}` is not an IPv4 address"))?;
                let (lo, hi) = (u32::from(a), u32::from(b));
                if lo > hi {
                    return Err(format!("range {part} runs backwards"));
                }
                if hi - lo >= MAX_SOURCES as u32 {
                    return Err(format!(
                        "range {part} has more than {MAX_SOURCES} addresses"
                    ));
                }
                out.extend((lo..=hi).map(|v| IpAddr::V4(Ipv4Addr::from(v))));
            }
            None => out.push(
                part.parse()
                    .map_err(|_| format!("`{part}` is not an IP address"))?,
            ),
        }
        if out.len() > MAX_SOURCES {
            return Err(format!("more than {MAX_SOURCES} addresses"));
        }
    }
    if out.is_empty() {
        return Err("no address given".into());
    }
    if let Some(bad) = out.iter().find(|ip| !ip.is_loopback()) {
        return Err(format!(
            "{bad} is not a loopback address: only 127.0.0.0/8 and ::1 may be used"
        ));
    }
    Ok(Sources(out))
}

/// Bytes given on the command line (a newtype, so that clap takes the
/// value whole rather than as a list of numbers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bytes(pub Vec<u8>);

/// A literal payload with `\r`, `\n`, `\t`, `\\`, `\0` and `\xHH` escapes.
pub fn payload(s: &str) -> Result<Bytes, String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        if b != b'\\' {
            out.push(b);
            continue;
        }
        match bytes.next() {
            Some(b'r') => out.push(b'\r'),
            Some(b'n') => out.push(b'\n'),
            Some(b't') => out.push(b'\t'),
            Some(b'0') => out.push(0),
            Some(b'\\') => out.push(b'\\'),
            Some(b'x') => {
                let hex: Vec<u8> = bytes.by_ref().take(2).collect();
                let text = std::str::from_utf8(&hex).unwrap_or("");
                let v = u8::from_str_radix(text, 16)
                    .ok()
                    .filter(|_| text.len() == 2)
                    .ok_or_else(|| format!("bad escape \\x{text}: want two hex digits"))?;
                out.push(v);
            }
            Some(other) => return Err(format!("unknown escape \\{}", other as char)),
            None => return Err("a trailing backslash".into()),
        }
    }
    if out.is_empty() {
        return Err("an empty payload sends nothing: leave the flag out".into());
    }
    Ok(Bytes(out))
}

/// A TLS SNI host name for `--tls-hello`: at most 255 bytes.
pub fn sni(s: &str) -> Result<String, String> {
    if s.len() > floodgate::sni::MAX_HOST_NAME_LEN {
        return Err(format!(
            "the name is {} bytes; a TLS host name has at most {}",
            s.len(),
            floodgate::sni::MAX_HOST_NAME_LEN
        ));
    }
    Ok(s.to_string())
}

/// A CIDR block for `--reject-cidr`.
pub fn cidr(s: &str) -> Result<floodgate::cidr::Cidr, String> {
    s.parse().map_err(|e| format!("{e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(duration("3s"), Ok(Duration::from_secs(3)));
        assert_eq!(duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(duration("1.5"), Ok(Duration::from_millis(1500)));
        assert_eq!(duration("2m"), Ok(Duration::from_secs(120)));
        assert!(duration("0s").is_err());
        assert!(duration("-1s").is_err());
        assert!(duration("soon").is_err());
        assert_eq!(duration_or_zero("0"), Ok(Duration::ZERO));
    }

    #[test]
    fn source_ranges() {
        let v = sources("127.0.0.2-127.0.0.4").unwrap().0;
        assert_eq!(v.len(), 3);
        assert_eq!(sources("127.0.0.9,::1").unwrap().0.len(), 2);
        assert!(sources("10.0.0.1-10.0.0.3").is_err());
        assert!(sources("127.0.0.5-127.0.0.2").is_err());
        assert!(sources("127.0.0.0-127.255.255.255").is_err());
        assert!(sources("").is_err());
    }

    #[test]
    fn payload_escapes() {
        assert_eq!(payload("GET /\\r\\n").unwrap().0, b"GET /\r\n");
        assert_eq!(payload("\\x41\\\\").unwrap().0, b"A\\");
        assert!(payload("\\q").is_err());
        assert!(payload("\\x4").is_err());
    }

    #[test]
    fn loopback_only() {
        assert!(loopback_addr("127.0.0.1:80").is_ok());
        assert!(loopback_addr("[::1]:80").is_ok());
        assert!(loopback_addr("192.168.1.1:80").is_err());
        assert!(loopback_addr("localhost").is_err());
        assert!(sni(&"a".repeat(256)).is_err());
        assert!(sni(&"a".repeat(255)).is_ok());
    }
}
