//! HAProxy PROXY protocol, versions 1 and 2: a total parser and two encoders.
//!
//! A load balancer in front of the listener prepends a PROXY header to the
//! byte stream to tell the server who the real client is. The engine peeks
//! the first bytes of an accepted connection (`MSG_PEEK`) and calls [`parse`]
//! on them; on [`ProxyError::Incomplete`] it peeks again once more bytes have
//! arrived, so every strict prefix of a valid header yields `Incomplete`, and
//! bytes that can never become a valid header yield [`ProxyError::NotProxy`]
//! or [`ProxyError::Invalid`] as early as possible.
//!
//! Format, per the HAProxy specification (`doc/proxy-protocol.txt`):
//!
//! * **v1** is one text line of at most 107 bytes including `\r\n`:
//!   `PROXY TCP4 <src> <dst> <sport> <dport>\r\n`, `PROXY TCP6 ...`, or
//!   `PROXY UNKNOWN ...\r\n` (anything after `UNKNOWN` is ignored).
//! * **v2** is binary: the 12-byte signature `\r\n\r\n\0\r\nQUIT\n`, a
//!   version/command byte (`0x20` LOCAL, `0x21` PROXY), a family/transport
//!   byte (`0x11` TCP over IPv4, `0x21` TCP over IPv6, `0x00` UNSPEC, ...), a
//!   big-endian `u16` length of what follows, the addresses, then TLVs.
//!   TLVs are skipped but bound-checked; their CRC32c, if any, is not verified.
//!
//! The parser never panics and never reads out of bounds, on any input.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The 12-byte signature that starts every v2 header.
const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// The 6 bytes that start every v1 header.
const V1_PREFIX: &[u8; 6] = b"PROXY ";
/// Longest v1 header, `\r\n` included.
const V1_MAX_LEN: usize = 107;
/// Shortest v1 header: `PROXY UNKNOWN\r\n`.
const V1_MIN_LEN: usize = 15;
/// Fixed part of a v2 header: signature, version/command, family, length.
const V2_FIXED_LEN: usize = 16;

/// v2 command nibble: the connection was made by the proxy itself.
const V2_CMD_LOCAL: u8 = 0x0;
/// v2 command nibble: the connection is relayed on behalf of a client.
const V2_CMD_PROXY: u8 = 0x1;
/// v2 family/transport byte: TCP over IPv4.
const V2_FAM_TCP4: u8 = 0x11;
/// v2 family/transport byte: TCP over IPv6.
const V2_FAM_TCP6: u8 = 0x21;

/// Which version of the PROXY protocol a header was written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProxyVersion {
    /// The human-readable text format (`PROXY TCP4 ...\r\n`).
    V1,
    /// The binary format starting with `\r\n\r\n\0\r\nQUIT\n`.
    V2,
}

/// A parsed PROXY header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyHeader {
    /// The protocol version the header was written in.
    pub version: ProxyVersion,
    /// The original client address; `None` for v1 `UNKNOWN`, v2 `LOCAL`,
    /// v2 `UNSPEC`, and v2 families other than TCP over IPv4/IPv6.
    pub source: Option<SocketAddr>,
    /// The address the client connected to; `None` in the same cases as
    /// [`source`](Self::source).
    pub destination: Option<SocketAddr>,
    /// Number of bytes the header occupies at the start of the buffer; the
    /// application's own data starts at `buf[header_len..]`.
    pub header_len: usize,
}

/// Why [`parse`] did not return a header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyError {
    /// The buffer is a valid prefix of a PROXY header but too short to hold
    /// all of it; retry once the buffer holds at least `needed_at_least`
    /// bytes (always more than the buffer passed in).
    Incomplete {
        /// Lower bound on the total buffer length needed to make progress.
        needed_at_least: usize,
    },
    /// The bytes do not start with a v1 or v2 signature, so the connection
    /// does not carry a PROXY header.
    NotProxy,
    /// The bytes start like a PROXY header but are malformed; the value names
    /// what is wrong.
    Invalid(&'static str),
}

impl fmt::Display for ProxyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProxyError::Incomplete { needed_at_least } => write!(
                f,
                "incomplete PROXY header: need at least {needed_at_least} bytes"
            ),
            ProxyError::NotProxy => f.write_str("not a PROXY protocol header"),
            ProxyError::Invalid(what) => write!(f, "invalid PROXY header: {what}"),
        }
    }
}

impl std::error::Error for ProxyError {}

/// Parses a PROXY protocol v1 or v2 header at the start of `buf`.
///
/// Bytes after the header (the application's data) are ignored; the header's
/// length is returned in [`ProxyHeader::header_len`].
///
/// # Errors
///
/// * [`ProxyError::Incomplete`] if `buf` is a strict prefix of a header that
///   may still turn out valid; peek more bytes and call again.
/// * [`ProxyError::NotProxy`] if `buf` cannot start a PROXY header.
/// * [`ProxyError::Invalid`] if `buf` starts like a header but is malformed:
///   a v1 line over 107 bytes, a bad address or port, an unknown v2 version
///   or command, a v2 length too short for its addresses, a TLV overrunning
///   the header, ...
///
/// # Examples
///
/// ```
/// use floodgate::proxy_protocol::{parse, ProxyError, ProxyVersion};
///
/// let buf = b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\nGET / HTTP/1.1\r\n";
/// let header = parse(buf)?;
/// assert_eq!(header.version, ProxyVersion::V1);
/// assert_eq!(header.source, Some("192.0.2.1:56324".parse()?));
/// assert_eq!(header.destination, Some("198.51.100.2:443".parse()?));
/// assert_eq!(&buf[header.header_len..], b"GET / HTTP/1.1\r\n");
///
/// // A prefix asks for more bytes; other protocols are recognised at once.
/// assert!(matches!(parse(b"PROXY TCP4 192.0"), Err(ProxyError::Incomplete { .. })));
/// assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Err(ProxyError::NotProxy));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn parse(buf: &[u8]) -> Result<ProxyHeader, ProxyError> {
    if buf.is_empty() {
        return Err(ProxyError::Incomplete {
            needed_at_least: V1_MIN_LEN,
        });
    }
    if is_prefix_match(buf, V1_PREFIX) {
        if buf.len() < V1_PREFIX.len() {
            return Err(ProxyError::Incomplete {
                needed_at_least: V1_MIN_LEN,
            });
        }
        return parse_v1(buf);
    }
    if is_prefix_match(buf, &V2_SIGNATURE) {
        return parse_v2(buf);
    }
    Err(ProxyError::NotProxy)
}

/// True if the first `min(buf.len(), sig.len())` bytes of `buf` equal the
/// same number of bytes of `sig`.
fn is_prefix_match(buf: &[u8], sig: &[u8]) -> bool {
    let n = buf.len().min(sig.len());
    buf.get(..n) == sig.get(..n)
}

/// Parses a v1 header; `buf` starts with `PROXY `.
fn parse_v1(buf: &[u8]) -> Result<ProxyHeader, ProxyError> {
    let rest = buf.get(V1_PREFIX.len()..).unwrap_or_default();
    check_v1_protocol_prefix(rest)?;

    // Find the end of the line, rejecting bytes a v1 line cannot contain.
    let mut line_end = None;
    for (i, &b) in buf.iter().enumerate().take(V1_MAX_LEN) {
        match b {
            b'\r' => match buf.get(i + 1) {
                Some(b'\n') if i + 2 <= V1_MAX_LEN => {
                    line_end = Some(i);
                    break;
                }
                Some(b'\n') => return Err(ProxyError::Invalid("v1 line longer than 107 bytes")),
                Some(_) => return Err(ProxyError::Invalid("v1 CR not followed by LF")),
                None => {
                    return Err(ProxyError::Incomplete {
                        needed_at_least: i + 2,
                    })
                }
            },
            b'\n' => return Err(ProxyError::Invalid("v1 LF without CR")),
            0x20..=0x7e => {}
            _ => return Err(ProxyError::Invalid("v1 line has a non-printable byte")),
        }
    }
    let Some(line_end) = line_end else {
        if buf.len() >= V1_MAX_LEN {
            return Err(ProxyError::Invalid("v1 line longer than 107 bytes"));
        }
        return Err(ProxyError::Incomplete {
            needed_at_least: (buf.len() + 1).max(V1_MIN_LEN),
        });
    };
    let header_len = line_end + 2;
    let line = buf.get(V1_PREFIX.len()..line_end).unwrap_or_default();
    let line =
        std::str::from_utf8(line).map_err(|_| ProxyError::Invalid("v1 line is not ASCII"))?;

    let mut fields = line.split(' ');
    let proto = fields.next().unwrap_or_default();
    let want_v4 = match proto {
        "UNKNOWN" => {
            return Ok(ProxyHeader {
                version: ProxyVersion::V1,
                source: None,
                destination: None,
                header_len,
            })
        }
        "TCP4" => true,
        "TCP6" => false,
        _ => {
            return Err(ProxyError::Invalid(
                "v1 protocol is not TCP4, TCP6 or UNKNOWN",
            ))
        }
    };
    let (Some(src), Some(dst), Some(sport), Some(dport), None) = (
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
    ) else {
        return Err(ProxyError::Invalid(
            "v1 line does not have exactly 4 fields after the protocol",
        ));
    };
    let src = parse_v1_ip(src, want_v4)?;
    let dst = parse_v1_ip(dst, want_v4)?;
    let sport = parse_v1_port(sport)?;
    let dport = parse_v1_port(dport)?;
    Ok(ProxyHeader {
        version: ProxyVersion::V1,
        source: Some(SocketAddr::new(src, sport)),
        destination: Some(SocketAddr::new(dst, dport)),
        header_len,
    })
}

/// Rejects early a v1 line whose protocol field can no longer become
/// `TCP4`, `TCP6` or `UNKNOWN`; `rest` is what follows `PROXY `.
fn check_v1_protocol_prefix(rest: &[u8]) -> Result<(), ProxyError> {
    const CANDIDATES: [&[u8]; 4] = [b"TCP4 ", b"TCP6 ", b"UNKNOWN ", b"UNKNOWN\r"];
    let ok = CANDIDATES.iter().any(|cand| is_prefix_match(rest, cand));
    if ok {
        Ok(())
    } else {
        Err(ProxyError::Invalid(
            "v1 protocol is not TCP4, TCP6 or UNKNOWN",
        ))
    }
}

/// Parses a v1 address field of the family announced by the protocol field.
fn parse_v1_ip(field: &str, want_v4: bool) -> Result<IpAddr, ProxyError> {
    if want_v4 {
        field
            .parse::<Ipv4Addr>()
            .map(IpAddr::V4)
            .map_err(|_| ProxyError::Invalid("v1 TCP4 address is not a valid IPv4 address"))
    } else {
        field
            .parse::<Ipv6Addr>()
            .map(IpAddr::V6)
            .map_err(|_| ProxyError::Invalid("v1 TCP6 address is not a valid IPv6 address"))
    }
}

/// Parses a v1 port field: 1 to 5 decimal digits, at most 65535.
fn parse_v1_port(field: &str) -> Result<u16, ProxyError> {
    if field.is_empty() || field.len() > 5 || !field.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ProxyError::Invalid("v1 port is not a decimal number"));
    }
    field
        .parse::<u16>()
        .map_err(|_| ProxyError::Invalid("v1 port is above 65535"))
}

/// Parses a v2 header; `buf` is a (possibly partial) prefix matching the
/// signature.
fn parse_v2(buf: &[u8]) -> Result<ProxyHeader, ProxyError> {
    let Some(fixed) = buf.get(..V2_FIXED_LEN) else {
        return Err(ProxyError::Incomplete {
            needed_at_least: V2_FIXED_LEN,
        });
    };
    let (ver_cmd, fam) = (fixed[12], fixed[13]);
    let len = usize::from(u16::from_be_bytes([fixed[14], fixed[15]]));
    if ver_cmd >> 4 != 2 {
        return Err(ProxyError::Invalid("v2 version is not 2"));
    }
    let cmd = ver_cmd & 0x0f;
    if cmd != V2_CMD_LOCAL && cmd != V2_CMD_PROXY {
        return Err(ProxyError::Invalid("v2 command is neither LOCAL nor PROXY"));
    }
    // Address block length per family, when the family is known.
    let addr_len = match fam {
        0x11 | 0x12 => Some(12),
        0x21 | 0x22 => Some(36),
        0x31 | 0x32 => Some(216),
        _ => None,
    };
    // The specification (2.2): values other than UNSPEC and the six
    // INET/INET6/UNIX x STREAM/DGRAM combinations "must be rejected as
    // invalid by receivers". LOCAL ignores the family byte altogether.
    if cmd == V2_CMD_PROXY && fam != 0x00 && addr_len.is_none() {
        return Err(ProxyError::Invalid(
            "v2 address family or transport protocol is not one the specification defines",
        ));
    }
    if cmd == V2_CMD_PROXY && addr_len.is_some_and(|need| len < need) {
        return Err(ProxyError::Invalid(
            "v2 length is too short for the address family",
        ));
    }
    let header_len = V2_FIXED_LEN + len;
    let Some(body) = buf.get(V2_FIXED_LEN..header_len) else {
        return Err(ProxyError::Incomplete {
            needed_at_least: header_len,
        });
    };
    let mut header = ProxyHeader {
        version: ProxyVersion::V2,
        source: None,
        destination: None,
        header_len,
    };
    // LOCAL: the receiver uses the real endpoints and discards the block.
    if cmd == V2_CMD_LOCAL {
        return Ok(header);
    }
    let Some(addr_len) = addr_len else {
        // UNSPEC or an unknown family: the block's layout is unknown.
        return Ok(header);
    };
    let (addrs, tlvs) = body.split_at(addr_len.min(body.len()));
    match fam {
        V2_FAM_TCP4 => {
            let (src, dst, sport, dport) = split_v2_addrs::<4>(addrs)?;
            header.source = Some(SocketAddr::new(Ipv4Addr::from(src).into(), sport));
            header.destination = Some(SocketAddr::new(Ipv4Addr::from(dst).into(), dport));
        }
        V2_FAM_TCP6 => {
            let (src, dst, sport, dport) = split_v2_addrs::<16>(addrs)?;
            header.source = Some(SocketAddr::new(Ipv6Addr::from(src).into(), sport));
            header.destination = Some(SocketAddr::new(Ipv6Addr::from(dst).into(), dport));
        }
        // UDP and UNIX families: addresses are not reported.
        _ => {}
    }
    skip_tlvs(tlvs)?;
    Ok(header)
}

/// Splits a v2 address block into source, destination and the two ports.
fn split_v2_addrs<const N: usize>(
    addrs: &[u8],
) -> Result<([u8; N], [u8; N], u16, u16), ProxyError> {
    const SHORT: ProxyError = ProxyError::Invalid("v2 length is too short for the address family");
    let src: [u8; N] = addrs
        .get(..N)
        .and_then(|s| s.try_into().ok())
        .ok_or(SHORT)?;
    let dst: [u8; N] = addrs
        .get(N..2 * N)
        .and_then(|s| s.try_into().ok())
        .ok_or(SHORT)?;
    let ports = addrs.get(2 * N..2 * N + 4).ok_or(SHORT)?;
    let sport = u16::from_be_bytes([ports[0], ports[1]]);
    let dport = u16::from_be_bytes([ports[2], ports[3]]);
    Ok((src, dst, sport, dport))
}

/// Walks the TLVs after the address block, checking each fits the header.
fn skip_tlvs(mut tlvs: &[u8]) -> Result<(), ProxyError> {
    while !tlvs.is_empty() {
        let Some(&[_type, hi, lo]) = tlvs.get(..3) else {
            return Err(ProxyError::Invalid("v2 TLV header is truncated"));
        };
        let end = 3 + usize::from(u16::from_be_bytes([hi, lo]));
        tlvs = tlvs
            .get(end..)
            .ok_or(ProxyError::Invalid("v2 TLV value overruns the header"))?;
    }
    Ok(())
}

/// Encodes a PROXY protocol v1 header for a connection from `src` to `dst`.
///
/// Two IPv4 addresses give `PROXY TCP4 ...`, two IPv6 addresses
/// `PROXY TCP6 ...`. Mixed families cannot be expressed in v1 and give
/// `PROXY UNKNOWN\r\n`, which receivers treat as "use the real endpoints".
/// IPv6 flow info and scope id are not carried.
///
/// # Examples
///
/// ```
/// use floodgate::proxy_protocol::encode_v1;
///
/// let hdr = encode_v1("192.0.2.1:56324".parse()?, "198.51.100.2:443".parse()?);
/// assert_eq!(hdr, b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn encode_v1(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let proto = match (src, dst) {
        (SocketAddr::V4(_), SocketAddr::V4(_)) => "TCP4",
        (SocketAddr::V6(_), SocketAddr::V6(_)) => "TCP6",
        _ => return b"PROXY UNKNOWN\r\n".to_vec(),
    };
    format!(
        "PROXY {proto} {} {} {} {}\r\n",
        src.ip(),
        dst.ip(),
        src.port(),
        dst.port()
    )
    .into_bytes()
}

/// Encodes a PROXY protocol v2 `PROXY` header (TCP, no TLVs) for a
/// connection from `src` to `dst`.
///
/// Two IPv4 addresses use family `0x11` (TCP over IPv4), anything else
/// family `0x21` (TCP over IPv6). With mixed families the IPv4 address is
/// written IPv4-mapped (`::ffff:a.b.c.d`), which loses nothing; [`parse`]
/// then returns it as that IPv6 address. IPv6 flow info and scope id are not
/// carried.
///
/// # Examples
///
/// ```
/// use floodgate::proxy_protocol::{encode_v2, parse};
///
/// let src = "[2001:db8::1]:56324".parse()?;
/// let dst = "[2001:db8::2]:443".parse()?;
/// let hdr = encode_v2(src, dst);
/// assert_eq!(hdr.len(), 16 + 36);
/// assert_eq!(parse(&hdr)?.source, Some(src));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn encode_v2(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let mut out = Vec::with_capacity(V2_FIXED_LEN + 36);
    out.extend_from_slice(&V2_SIGNATURE);
    out.push(0x20 | V2_CMD_PROXY);
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            out.push(V2_FAM_TCP4);
            out.extend_from_slice(&12u16.to_be_bytes());
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
        }
        (s, d) => {
            out.push(V2_FAM_TCP6);
            out.extend_from_slice(&36u16.to_be_bytes());
            out.extend_from_slice(&to_v6(s).octets());
            out.extend_from_slice(&to_v6(d).octets());
        }
    }
    out.extend_from_slice(&src.port().to_be_bytes());
    out.extend_from_slice(&dst.port().to_be_bytes());
    out
}

/// An IPv6 address as is, an IPv4 address IPv4-mapped.
fn to_v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().expect("test address")
    }

    #[test]
    fn v1_tcp4_parses_addresses_and_length() {
        let buf = b"PROXY TCP4 1.2.3.4 5.6.7.8 1111 2222\r\npayload";
        let h = parse(buf).expect("valid");
        assert_eq!(h.version, ProxyVersion::V1);
        assert_eq!(h.source, Some(sa("1.2.3.4:1111")));
        assert_eq!(h.destination, Some(sa("5.6.7.8:2222")));
        assert_eq!(h.header_len, 38);
        assert_eq!(&buf[h.header_len..], b"payload");
    }

    #[test]
    fn v1_tcp6_parses_addresses() {
        let buf = b"PROXY TCP6 2001:db8::1 ::1 65535 0\r\n";
        let h = parse(buf).expect("valid");
        assert_eq!(h.source, Some(sa("[2001:db8::1]:65535")));
        assert_eq!(h.destination, Some(sa("[::1]:0")));
        assert_eq!(h.header_len, buf.len());
    }

    #[test]
    fn v1_unknown_has_no_addresses_and_ignores_the_rest() {
        for buf in [
            &b"PROXY UNKNOWN\r\n"[..],
            b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n",
        ] {
            let h = parse(buf).expect("valid");
            assert_eq!((h.source, h.destination), (None, None));
            assert_eq!(h.header_len, buf.len());
        }
    }

    #[test]
    fn v1_longest_line_is_accepted_and_longer_rejected() {
        let mut line = b"PROXY UNKNOWN ".to_vec();
        line.resize(V1_MAX_LEN - 2, b'x');
        line.extend_from_slice(b"\r\n");
        assert_eq!(parse(&line).map(|h| h.header_len), Ok(V1_MAX_LEN));

        let mut long = b"PROXY UNKNOWN ".to_vec();
        long.resize(V1_MAX_LEN - 1, b'x');
        long.extend_from_slice(b"\r\n");
        assert_eq!(
            parse(&long),
            Err(ProxyError::Invalid("v1 line longer than 107 bytes"))
        );
        let mut no_end = b"PROXY UNKNOWN ".to_vec();
        no_end.resize(200, b'x');
        assert_eq!(
            parse(&no_end),
            Err(ProxyError::Invalid("v1 line longer than 107 bytes"))
        );
    }

    #[test]
    fn v1_malformed_lines_are_invalid() {
        let cases: &[&[u8]] = &[
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1111\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1111 2222 3\r\n",
            b"PROXY TCP4 1.2.3.4  5.6.7.8 1111 2222\r\n",
            b"PROXY TCP4 ::1 5.6.7.8 1111 2222\r\n",
            b"PROXY TCP6 1.2.3.4 ::1 1111 2222\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2222\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2222\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1111 \r\n",
            b"PROXY TCP4 1.2.3.256 5.6.7.8 1111 2222\r\n",
            b"PROXY UDP4 1.2.3.4 5.6.7.8 1111 2222\r\n",
            b"PROXY TCP4 1.2.3.4\n",
            b"PROXY TCP4 1.2.3.4\rX",
            b"PROXY TCP4 1.2.3.4\x00",
            b"PROXY TCP44",
            b"PROXY X",
        ];
        for case in cases {
            assert!(
                matches!(parse(case), Err(ProxyError::Invalid(_))),
                "{:?} gave {:?}",
                String::from_utf8_lossy(case),
                parse(case)
            );
        }
    }

    #[test]
    fn non_proxy_bytes_are_not_proxy() {
        for case in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"\x16\x03\x01\x02\x00",
            b"PROXZ",
            b"proxy TCP4",
            b"\r\n\r\n\0\r\nQUIX",
        ] {
            assert_eq!(parse(case), Err(ProxyError::NotProxy));
        }
    }

    #[test]
    fn short_prefixes_are_incomplete() {
        assert_eq!(
            parse(b""),
            Err(ProxyError::Incomplete {
                needed_at_least: 15
            })
        );
        assert_eq!(
            parse(b"PRO"),
            Err(ProxyError::Incomplete {
                needed_at_least: 15
            })
        );
        assert_eq!(
            parse(b"\r\n\r\n"),
            Err(ProxyError::Incomplete {
                needed_at_least: 16
            })
        );
        assert_eq!(
            parse(b"PROXY TCP4 1.2.3.4 5.6.7.8 1111 2222\r"),
            Err(ProxyError::Incomplete {
                needed_at_least: 38
            })
        );
    }

    /// The v2 example from the spec's section 2.2 layout, built by hand.
    fn v2_tcp4_bytes(tlvs: &[u8]) -> Vec<u8> {
        let mut v = b"\r\n\r\n\x00\r\nQUIT\n\x21\x11".to_vec();
        v.extend_from_slice(&(12 + tlvs.len() as u16).to_be_bytes());
        v.extend_from_slice(&[192, 0, 2, 1, 198, 51, 100, 2, 0xdc, 0x04, 0x01, 0xbb]);
        v.extend_from_slice(tlvs);
        v
    }

    #[test]
    fn v2_tcp4_parses_and_skips_tlvs() {
        // PP2_TYPE_ALPN "h2" then PP2_TYPE_NOOP with 3 bytes of padding.
        let tlvs = [0x01, 0x00, 0x02, b'h', b'2', 0x04, 0x00, 0x03, 0, 0, 0];
        let mut buf = v2_tcp4_bytes(&tlvs);
        let len = buf.len();
        buf.extend_from_slice(b"\x16\x03\x01");
        let h = parse(&buf).expect("valid");
        assert_eq!(h.version, ProxyVersion::V2);
        assert_eq!(h.source, Some(sa("192.0.2.1:56324")));
        assert_eq!(h.destination, Some(sa("198.51.100.2:443")));
        assert_eq!(h.header_len, len);
    }

    #[test]
    fn v2_tlv_overrunning_the_header_is_invalid() {
        let buf = v2_tcp4_bytes(&[0x01, 0x00, 0x05, b'h', b'2']);
        assert_eq!(
            parse(&buf),
            Err(ProxyError::Invalid("v2 TLV value overruns the header"))
        );
        let buf = v2_tcp4_bytes(&[0x01, 0x00]);
        assert_eq!(
            parse(&buf),
            Err(ProxyError::Invalid("v2 TLV header is truncated"))
        );
    }

    #[test]
    fn v2_tcp6_parses() {
        let mut buf = b"\r\n\r\n\x00\r\nQUIT\n\x21\x21\x00\x24".to_vec();
        buf.extend_from_slice(
            &"2001:db8::1"
                .parse::<Ipv6Addr>()
                .expect("test address")
                .octets(),
        );
        buf.extend_from_slice(&Ipv6Addr::LOCALHOST.octets());
        buf.extend_from_slice(&[0x30, 0x39, 0x00, 0x50]);
        let h = parse(&buf).expect("valid");
        assert_eq!(h.source, Some(sa("[2001:db8::1]:12345")));
        assert_eq!(h.destination, Some(sa("[::1]:80")));
        assert_eq!(h.header_len, 52);
    }

    #[test]
    fn v2_local_unspec_and_other_families_have_no_addresses() {
        // LOCAL with an empty block (health check).
        let local = b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00";
        let h = parse(local).expect("valid");
        assert_eq!((h.source, h.destination, h.header_len), (None, None, 16));
        // LOCAL with a short TCP4 block is still fine: the block is ignored.
        let local_short = b"\r\n\r\n\x00\r\nQUIT\n\x20\x11\x00\x02ab";
        assert_eq!(parse(local_short).map(|h| h.header_len), Ok(18));
        // PROXY UNSPEC with 3 opaque bytes.
        let unspec = b"\r\n\r\n\x00\r\nQUIT\n\x21\x00\x00\x03abc";
        let h = parse(unspec).expect("valid");
        assert_eq!((h.source, h.header_len), (None, 19));
        // PROXY UDP4: addresses not reported.
        let mut udp = b"\r\n\r\n\x00\r\nQUIT\n\x21\x12\x00\x0c".to_vec();
        udp.extend_from_slice(&[0; 12]);
        assert_eq!(parse(&udp).map(|h| h.source), Ok(None));
    }

    #[test]
    fn v2_bad_version_command_or_length_is_invalid() {
        let bad_ver = b"\r\n\r\n\x00\r\nQUIT\n\x11\x11\x00\x0c";
        assert_eq!(
            parse(bad_ver),
            Err(ProxyError::Invalid("v2 version is not 2"))
        );
        let bad_cmd = b"\r\n\r\n\x00\r\nQUIT\n\x22\x11\x00\x0c";
        assert_eq!(
            parse(bad_cmd),
            Err(ProxyError::Invalid("v2 command is neither LOCAL nor PROXY"))
        );
        // Reported before waiting for the body.
        let short = b"\r\n\r\n\x00\r\nQUIT\n\x21\x21\x00\x0c";
        assert_eq!(
            parse(short),
            Err(ProxyError::Invalid(
                "v2 length is too short for the address family"
            ))
        );
    }

    #[test]
    fn v2_unknown_family_is_rejected_unless_local() {
        // 0x51: address family 5 does not exist; nor does transport 3.
        for fam in [0x51u8, 0x13, 0x01, 0x10, 0xff] {
            let mut buf = b"\r\n\r\n\x00\r\nQUIT\n\x21".to_vec();
            buf.push(fam);
            buf.extend_from_slice(&[0x00, 0x0c]);
            buf.extend_from_slice(&[0; 12]);
            assert!(
                matches!(parse(&buf), Err(ProxyError::Invalid(_))),
                "family {fam:#04x} must be refused"
            );
            // Refused from the fixed header, before the body arrives.
            assert!(matches!(parse(&buf[..16]), Err(ProxyError::Invalid(_))));
            // LOCAL ignores the family byte.
            buf[12] = 0x20;
            assert_eq!(parse(&buf).map(|h| h.source), Ok(None));
        }
    }

    #[test]
    fn v2_waits_for_the_declared_length() {
        let buf = v2_tcp4_bytes(&[]);
        assert_eq!(
            parse(&buf[..20]),
            Err(ProxyError::Incomplete {
                needed_at_least: 28
            })
        );
        assert_eq!(
            parse(&buf[..11]),
            Err(ProxyError::Incomplete {
                needed_at_least: 16
            })
        );
    }

    #[test]
    fn encoders_handle_mixed_families() {
        let v4 = sa("192.0.2.1:1000");
        let v6 = sa("[2001:db8::2]:2000");
        assert_eq!(encode_v1(v4, v6), b"PROXY UNKNOWN\r\n");
        let h = parse(&encode_v2(v4, v6)).expect("valid");
        assert_eq!(h.source, Some(sa("[::ffff:192.0.2.1]:1000")));
        assert_eq!(h.destination, Some(v6));
    }

    fn socket_addr() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<[u8; 4]>(), any::<u16>())
                .prop_map(|(ip, port)| SocketAddr::new(Ipv4Addr::from(ip).into(), port)),
            (any::<[u8; 16]>(), any::<u16>())
                .prop_map(|(ip, port)| SocketAddr::new(Ipv6Addr::from(ip).into(), port)),
        ]
    }

    /// Bytes that often get past the signature checks.
    fn proxyish_bytes() -> impl Strategy<Value = Vec<u8>> {
        let prefix = prop_oneof![
            Just(Vec::new()),
            Just(b"PROXY ".to_vec()),
            Just(b"PROXY TCP4 ".to_vec()),
            Just(b"PROXY TCP6 ".to_vec()),
            Just(b"PROXY UNKNOWN".to_vec()),
            Just(V2_SIGNATURE.to_vec()),
            Just(b"\r\n\r\n\x00\r\nQUIT\n\x21\x11".to_vec()),
            Just(b"\r\n\r\n\x00\r\nQUIT\n\x21\x21".to_vec()),
        ];
        (prefix, proptest::collection::vec(any::<u8>(), 0..300)).prop_map(|(mut p, tail)| {
            p.extend(tail);
            p
        })
    }

    fn check_error_contract(buf: &[u8]) {
        match parse(buf) {
            Ok(h) => assert!(h.header_len <= buf.len() && h.header_len >= V1_MIN_LEN),
            Err(ProxyError::Incomplete { needed_at_least }) => {
                assert!(needed_at_least > buf.len())
            }
            Err(_) => {}
        }
    }

    proptest! {
        #[test]
        fn parse_never_panics_on_arbitrary_bytes(buf in proptest::collection::vec(any::<u8>(), 0..300)) {
            check_error_contract(&buf);
        }

        #[test]
        fn parse_never_panics_on_proxy_like_bytes(buf in proxyish_bytes()) {
            check_error_contract(&buf);
        }

        #[test]
        fn v1_round_trips(src in socket_addr(), dst in socket_addr(), tail in proptest::collection::vec(any::<u8>(), 0..16)) {
            let hdr = encode_v1(src, dst);
            prop_assert!(hdr.len() <= V1_MAX_LEN);
            let mut buf = hdr.clone();
            buf.extend(tail);
            let h = parse(&buf).expect("encoded header parses");
            prop_assert_eq!(h.version, ProxyVersion::V1);
            prop_assert_eq!(h.header_len, hdr.len());
            if src.is_ipv4() == dst.is_ipv4() {
                prop_assert_eq!((h.source, h.destination), (Some(src), Some(dst)));
            } else {
                prop_assert_eq!((h.source, h.destination), (None, None));
            }
        }

        #[test]
        fn v2_round_trips(src in socket_addr(), dst in socket_addr(), tail in proptest::collection::vec(any::<u8>(), 0..16)) {
            let hdr = encode_v2(src, dst);
            let mut buf = hdr.clone();
            buf.extend(tail);
            let h = parse(&buf).expect("encoded header parses");
            prop_assert_eq!(h.version, ProxyVersion::V2);
            prop_assert_eq!(h.header_len, hdr.len());
            let norm = |a: SocketAddr| if src.is_ipv4() == dst.is_ipv4() {
                a
            } else {
                SocketAddr::new(to_v6(a.ip()).into(), a.port())
            };
            prop_assert_eq!((h.source, h.destination), (Some(norm(src)), Some(norm(dst))));
        }

        #[test]
        fn every_strict_prefix_of_a_header_is_incomplete(src in socket_addr(), dst in socket_addr(), v2 in any::<bool>()) {
            let hdr = if v2 { encode_v2(src, dst) } else { encode_v1(src, dst) };
            for cut in 0..hdr.len() {
                match parse(&hdr[..cut]) {
                    Err(ProxyError::Incomplete { needed_at_least }) => {
                        prop_assert!(needed_at_least > cut && needed_at_least <= hdr.len());
                    }
                    other => prop_assert!(false, "prefix {} gave {:?}", cut, other),
                }
            }
        }
    }
}
