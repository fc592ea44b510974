//! Parsers for the command line's values: each refuses bad input with a
//! message that clap prefixes with the flag's name.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

/// The most source addresses `--sources` may name.
pub const MAX_SOURCES: usize = 4096;

/// A whole number from `min` to `max` (a value parser for clap, which
/// names the flag): anything else, a negative number included, is refused
/// with the range and the value given. Numeric flags take
/// `allow_hyphen_values` so that `-5` reaches this parser instead of being
/// read as an unknown flag.
pub fn int_in<T>(min: T, max: T) -> impl Fn(&str) -> Result<T, String> + Clone + Send + Sync
where
    T: std::str::FromStr + PartialOrd + std::fmt::Display + Copy + Send + Sync,
{
    move |s: &str| int(s, min, Some(max))
}

/// As [`int_in`], with no upper bound but the type's.
pub fn int_from<T>(min: T) -> impl Fn(&str) -> Result<T, String> + Clone + Send + Sync
where
    T: std::str::FromStr + PartialOrd + std::fmt::Display + Copy + Send + Sync,
{
    move |s: &str| int(s, min, None)
}

fn int<T>(s: &str, min: T, max: Option<T>) -> Result<T, String>
where
    T: std::str::FromStr + PartialOrd + std::fmt::Display + Copy,
{
    let t = s.trim();
    match t.parse::<T>() {
        Ok(v) if v >= min && max.map_or(true, |m| v <= m) => Ok(v),
        _ => {
            let zero = "0".parse::<T>().ok();
            let what = if zero.is_some_and(|z| min > z) {
                "a positive integer"
            } else {
                "a whole number"
            };
            let range = match max {
                Some(m) => format!("{min} to {m}"),
                None => format!("{min} or more"),
            };
            Err(format!("must be {what} ({range}), got `{t}`"))
        }
    }
}

/// The longest duration any flag takes: 24 hours. It keeps every deadline
/// flood computes (now + a duration) far from the clock's limits.
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);

const DURATION_HINT: &str = "try 90, 2.5s, 500ms, 1m30s or 1h";

/// A duration: a plain number of seconds (`90`, `2.5`), or one or more
/// parts `<number><unit>` added up (`1m30s`, `1h`, `500ms`, `2.5s`,
/// `1h 15m`), with the units `ns`, `us` (`µs`), `ms`, `s`, `m` (`min`) and
/// `h`. At most [`MAX_DURATION`]; zero is refused.
pub fn duration(s: &str) -> Result<Duration, String> {
    let d = duration_or_zero(s)?;
    if d.is_zero() {
        return Err("must be longer than zero".into());
    }
    Ok(d)
}

/// As [`duration`], but zero is allowed (it turns the thing off).
pub fn duration_or_zero(s: &str) -> Result<Duration, String> {
    let text = s.trim();
    if text.is_empty() {
        return Err(format!("no duration given ({DURATION_HINT})"));
    }
    let too_long = || {
        format!(
            "`{text}` is longer than the {} h allowed",
            MAX_DURATION.as_secs() / 3600
        )
    };
    let is_number = |c: char| c.is_ascii_digit() || c == '.';
    let mut nanos: u128 = 0;
    if text.chars().all(is_number) {
        // A plain number: seconds.
        nanos = number_times(text, 1_000_000_000).ok_or_else(|| not_a_duration(text))?;
    } else {
        let mut rest = text;
        while !rest.is_empty() {
            let end = rest.find(|c: char| !is_number(c)).unwrap_or(rest.len());
            let (num, after) = rest.split_at(end);
            if num.is_empty() {
                return Err(not_a_duration(text));
            }
            let after = after.trim_start();
            let end = after
                .find(|c: char| !c.is_alphabetic())
                .unwrap_or(after.len());
            let (unit, after) = after.split_at(end);
            let scale: u128 = match unit {
                "ns" => 1,
                "us" | "µs" => 1_000,
                "ms" => 1_000_000,
                "s" => 1_000_000_000,
                "m" | "min" => 60_000_000_000,
                "h" => 3_600_000_000_000,
                "" => {
                    return Err(format!(
                        "`{num}` in `{text}` has no unit: a plain number of seconds \
                         must stand alone ({DURATION_HINT})"
                    ))
                }
                _ => {
                    return Err(format!(
                        "unknown unit `{unit}` in `{text}` (use ns, us, ms, s, m or h)"
                    ))
                }
            };
            let part = number_times(num, scale).ok_or_else(|| not_a_duration(text))?;
            nanos = nanos.saturating_add(part);
            rest = after.trim_start();
        }
    }
    if nanos > MAX_DURATION.as_nanos() {
        return Err(too_long());
    }
    // At most 24 h in nanoseconds: it fits in a u64.
    u64::try_from(nanos)
        .map(Duration::from_nanos)
        .map_err(|_| too_long())
}

fn not_a_duration(text: &str) -> String {
    format!("`{text}` is not a duration ({DURATION_HINT})")
}

/// `num` (digits with at most one decimal point) times `scale`, truncated
/// to a whole number; `None` if `num` is not such a number. Saturates
/// instead of overflowing (the caller refuses anything that large).
fn number_times(num: &str, scale: u128) -> Option<u128> {
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    let digits = |t: &str| t.bytes().all(|b| b.is_ascii_digit());
    if (int.is_empty() && frac.is_empty()) || !digits(int) || !digits(frac) {
        return None;
    }
    let mut v: u128 = 0;
    for b in int.bytes() {
        v = v.saturating_mul(10).saturating_add(u128::from(b - b'0'));
    }
    v = v.saturating_mul(scale);
    // Digits past the 18th are below a nanosecond at any scale.
    let (mut f, mut den): (u128, u128) = (0, 1);
    for b in frac.bytes().take(18) {
        f = f * 10 + u128::from(b - b'0');
        den *= 10;
    }
    Some(v.saturating_add(f * scale / den))
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

/// The address `flood run` connects to: a loopback address and a port
/// other than 0 (port 0 and the unspecified addresses 0.0.0.0 and `[::]`
/// name no server: every connect would be refused).
pub fn target_addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        if a.ip().is_unspecified() {
            return Err(format!(
                "{} is the unspecified address, which names no server: give the \
                 server's address (127.0.0.1 or [::1])",
                a.ip()
            ));
        }
    }
    let a = loopback_addr(s)?;
    if a.port() == 0 {
        return Err("port 0 names no server: give the port the server listens on".into());
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
        let ms = Duration::from_millis;
        assert_eq!(duration("3s"), Ok(Duration::from_secs(3)));
        assert_eq!(duration("500ms"), Ok(ms(500)));
        assert_eq!(duration("1.5"), Ok(ms(1500)));
        assert_eq!(duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(duration("2min"), Ok(Duration::from_secs(120)));
        assert_eq!(duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(duration("2.5s"), Ok(ms(2500)));
        assert_eq!(duration("1h 15m"), Ok(Duration::from_secs(4500)));
        assert_eq!(duration(" 1 m 30 s "), Ok(Duration::from_secs(90)));
        assert_eq!(duration("1s500ms"), Ok(ms(1500)));
        assert_eq!(duration(".5s"), Ok(ms(500)));
        assert_eq!(duration("250us"), Ok(Duration::from_micros(250)));
        assert_eq!(duration("250µs"), Ok(Duration::from_micros(250)));
        assert_eq!(duration("10ns"), Ok(Duration::from_nanos(10)));
        assert_eq!(duration("0.1s"), Ok(ms(100)));
        assert_eq!(duration("1.0000000000000000000001s"), Ok(ms(1000)));
        assert_eq!(duration("24h"), Ok(MAX_DURATION));
        assert_eq!(duration("23h60m"), Ok(MAX_DURATION));
        assert_eq!(duration("86400"), Ok(MAX_DURATION));
        assert_eq!(duration_or_zero("0"), Ok(Duration::ZERO));
        assert_eq!(duration_or_zero("0s"), Ok(Duration::ZERO));
    }

    #[test]
    fn bad_durations_say_why() {
        let err = |s: &str| duration(s).expect_err(s);
        assert!(err("0s").contains("longer than zero"));
        assert!(err("0m0s").contains("longer than zero"));
        for s in ["-1s", "soon", "s", "1.2.3s", "1..s", ".", "1m-30s", "+1s"] {
            assert!(err(s).contains("not a duration"), "{s}: {}", err(s));
        }
        assert!(err("").contains("no duration"));
        assert!(err("1m30").contains("no unit"));
        assert!(err("1m30x").contains("unknown unit `x`"));
        assert!(err("3d").contains("unknown unit `d`"));
        for s in [
            "25h",
            "24h1ns",
            "86401",
            "1e9",
            "99999999999999999999999999999999999999999h",
        ] {
            let e = duration(s).expect_err(s);
            assert!(
                e.contains("longer than") || e.contains("unknown unit"),
                "{s}: {e}"
            );
        }
        assert!(err("99999999999999999999999999999999999999999h").contains("longer than"));
    }

    #[test]
    fn integers_say_their_range() {
        let c = int_in(1u64, 1_000_000);
        assert_eq!(c("64"), Ok(64));
        assert_eq!(c(" 7 "), Ok(7));
        assert_eq!(c("1000000"), Ok(1_000_000));
        for bad in ["-5", "0", "1000001", "1.5", "x", "", "+-1"] {
            let e = c(bad).expect_err(bad);
            assert!(
                e.starts_with("must be a positive integer (1 to 1000000)"),
                "{e}"
            );
        }
        assert!(c("-5").expect_err("-5").ends_with("got `-5`"));
        let e = int_in(0u64, 10)("-1").expect_err("-1");
        assert!(e.starts_with("must be a whole number (0 to 10)"), "{e}");
        let e = int_from(0usize)("-1").expect_err("-1");
        assert_eq!(e, "must be a whole number (0 or more), got `-1`");
        assert_eq!(int_from(1u32)("4294967295"), Ok(u32::MAX));
        assert!(int_from(1u32)("4294967296").is_err());
        assert!(int_from(1u64)("18446744073709551616").is_err());
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
        assert!(loopback_addr("127.0.0.1:0").is_ok());
        assert!(target_addr("127.0.0.1:9000").is_ok());
        assert!(target_addr("[::1]:9000").is_ok());
        assert!(target_addr("127.0.0.1:0").unwrap_err().contains("port 0"));
        assert!(target_addr("[::1]:0").unwrap_err().contains("port 0"));
        assert!(target_addr("0.0.0.0:80")
            .unwrap_err()
            .contains("unspecified"));
        assert!(target_addr("[::]:80").unwrap_err().contains("unspecified"));
        assert!(target_addr("10.0.0.1:80").unwrap_err().contains("loopback"));
        assert!(sni(&"a".repeat(256)).is_err());
        assert!(sni(&"a".repeat(255)).is_ok());
    }
}
