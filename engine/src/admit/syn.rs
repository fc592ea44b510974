//! Parsing of the SYN that Linux saved for an accepted connection.
//!
//! When a listener sets `TCP_SAVE_SYN` to 1, the kernel keeps the network
//! and TCP headers of each connection's SYN, and
//! `getsockopt(fd, IPPROTO_TCP, TCP_SAVED_SYN, ...)` on the accepted socket
//! returns them once (Linux 4.2+). From them [`parse_saved_syn`] extracts
//! what the client's stack announced: DSCP/ECN, TTL or hop limit, window,
//! and the TCP options (MSS, window scale, SACK permitted, timestamps) that
//! fingerprint a client and reveal its path.
//!
//! The buffer must start at the IP header: `TCP_SAVE_SYN` set to 2 (Linux
//! 5.10+) also saves the MAC header in front of it, which this parser does
//! not expect. IPv4 options are skipped by IHL; IPv6 hop-by-hop (0), routing
//! (43) and destination options (60) extension headers are walked by their
//! length byte, and any other next header is [`SynError::Invalid`]. Bytes
//! after the TCP header are ignored.
//!
//! The parser never panics and never reads out of bounds, on any input.

use std::fmt;

/// IP protocol / IPv6 next header number of TCP.
const IPPROTO_TCP: u8 = 6;
/// IPv6 next header: hop-by-hop options.
const NH_HOP_BY_HOP: u8 = 0;
/// IPv6 next header: routing header.
const NH_ROUTING: u8 = 43;
/// IPv6 next header: destination options.
const NH_DEST_OPTS: u8 = 60;
/// Length of an IPv4 header without options.
const IPV4_MIN_HEADER: usize = 20;
/// Length of the fixed IPv6 header.
const IPV6_HEADER: usize = 40;
/// Length of a TCP header without options.
const TCP_MIN_HEADER: usize = 20;
/// TCP flag bit: SYN.
const TCP_FLAG_SYN: u8 = 0x02;

/// TCP option kind: end of option list.
const OPT_EOL: u8 = 0;
/// TCP option kind: no-operation (padding).
const OPT_NOP: u8 = 1;
/// TCP option kind: maximum segment size.
const OPT_MSS: u8 = 2;
/// TCP option kind: window scale.
const OPT_WSCALE: u8 = 3;
/// TCP option kind: SACK permitted.
const OPT_SACK_PERM: u8 = 4;
/// TCP option kind: timestamps.
const OPT_TIMESTAMPS: u8 = 8;

/// What a client's SYN announced, from the IP and TCP headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SynInfo {
    /// Differentiated services code point: the upper 6 bits of the IPv4 TOS
    /// byte or IPv6 traffic class (46 is Expedited Forwarding).
    pub dscp: u8,
    /// Explicit congestion notification: the lower 2 bits of the same byte.
    pub ecn: u8,
    /// IPv4 time to live, or IPv6 hop limit, as received.
    pub ttl: u8,
    /// The MSS option's value, if present.
    pub mss: Option<u16>,
    /// The window scale option's shift count, as sent (Linux clamps values
    /// above 14 to 14 when using them; this reports the raw value).
    pub window_scale: Option<u8>,
    /// Whether the SACK-permitted option is present.
    pub sack_permitted: bool,
    /// Whether the timestamps option is present.
    pub timestamps: bool,
    /// The TCP window field (unscaled, as a SYN's window always is).
    pub window: u16,
}

/// Why [`parse_saved_syn`] could not parse a saved SYN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SynError {
    /// The buffer ends inside a header whose length it announced; the
    /// `getsockopt` buffer was probably too small.
    Truncated,
    /// The first nibble is neither 4 nor 6, so the buffer does not start with
    /// an IP header (a MAC header from `TCP_SAVE_SYN` = 2, for instance).
    NotIp,
    /// A header is malformed or not what a TCP SYN carries; the value names
    /// what is wrong.
    Invalid(&'static str),
}

impl fmt::Display for SynError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SynError::Truncated => f.write_str("saved SYN is truncated"),
            SynError::NotIp => f.write_str("saved SYN does not start with an IPv4 or IPv6 header"),
            SynError::Invalid(what) => write!(f, "invalid saved SYN: {what}"),
        }
    }
}

impl std::error::Error for SynError {}

/// Parses the bytes returned by `getsockopt(TCP_SAVED_SYN)`: an IPv4 or IPv6
/// header followed by a TCP header with options.
///
/// Among the TCP options, EOL ends the list, NOP is skipped, MSS (length 4),
/// window scale (3), SACK permitted (2) and timestamps (10) are recorded, and
/// unknown options are skipped by their length. If an option appears twice,
/// the last occurrence wins.
///
/// # Errors
///
/// * [`SynError::Truncated`] if the buffer ends inside the IP header, an
///   IPv6 extension header, or the TCP header (as sized by its data offset).
/// * [`SynError::NotIp`] if the IP version nibble is not 4 or 6.
/// * [`SynError::Invalid`] if IHL or the TCP data offset is below 5, the
///   transport is not TCP, the IPv6 chain holds a header other than
///   hop-by-hop, routing or destination options, an IPv4 fragment is not the
///   first, the SYN flag is clear, or a TCP option's length is below 2,
///   beyond the header, or wrong for its kind.
///
/// # Examples
///
/// ```
/// use floodgate::syn::parse_saved_syn;
///
/// // IPv4, TOS 0xb8 (DSCP 46), TTL 64, TCP SYN, window 65495,
/// // options: MSS 65495, SACK permitted, timestamps, NOP, window scale 7.
/// let syn: [u8; 60] = [
///     0x45, 0xb8, 0x00, 0x3c, 0x12, 0x34, 0x40, 0x00, 0x40, 0x06, 0x00, 0x00,
///     127, 0, 0, 1, 127, 0, 0, 1,
///     0xc3, 0x50, 0x1f, 0x90, 0, 0, 0, 1, 0, 0, 0, 0, 0xa0, 0x02, 0xff, 0xd7,
///     0, 0, 0, 0,
///     0x02, 0x04, 0xff, 0xd7, 0x04, 0x02, 0x08, 0x0a, 0, 0, 0, 1, 0, 0, 0, 0,
///     0x01, 0x03, 0x03, 0x07,
/// ];
/// let info = parse_saved_syn(&syn)?;
/// assert_eq!((info.dscp, info.ecn, info.ttl), (46, 0, 64));
/// assert_eq!(info.mss, Some(65495));
/// assert_eq!(info.window_scale, Some(7));
/// assert!(info.sack_permitted && info.timestamps);
/// # Ok::<(), floodgate::syn::SynError>(())
/// ```
pub fn parse_saved_syn(buf: &[u8]) -> Result<SynInfo, SynError> {
    let first = *buf.first().ok_or(SynError::Truncated)?;
    let ip = match first >> 4 {
        4 => parse_ipv4(buf)?,
        6 => parse_ipv6(buf)?,
        _ => return Err(SynError::NotIp),
    };
    parse_tcp(ip)
}

/// The IP-level fields and the bytes from the TCP header on.
struct IpPart<'a> {
    tos: u8,
    ttl: u8,
    tcp: &'a [u8],
}

/// Parses an IPv4 header (version nibble already checked).
fn parse_ipv4(buf: &[u8]) -> Result<IpPart<'_>, SynError> {
    let Some(fixed) = buf.get(..IPV4_MIN_HEADER) else {
        return Err(SynError::Truncated);
    };
    let ihl = usize::from(fixed[0] & 0x0f) * 4;
    if ihl < IPV4_MIN_HEADER {
        return Err(SynError::Invalid("IPv4 IHL is below 5"));
    }
    let frag_offset = u16::from_be_bytes([fixed[6], fixed[7]]) & 0x1fff;
    if frag_offset != 0 {
        return Err(SynError::Invalid("IPv4 packet is not the first fragment"));
    }
    if fixed[9] != IPPROTO_TCP {
        return Err(SynError::Invalid("IPv4 protocol is not TCP"));
    }
    let tcp = buf.get(ihl..).ok_or(SynError::Truncated)?;
    Ok(IpPart {
        tos: fixed[1],
        ttl: fixed[8],
        tcp,
    })
}

/// Parses an IPv6 header and walks its extension headers.
fn parse_ipv6(buf: &[u8]) -> Result<IpPart<'_>, SynError> {
    let Some(fixed) = buf.get(..IPV6_HEADER) else {
        return Err(SynError::Truncated);
    };
    let tos = (fixed[0] << 4) | (fixed[1] >> 4);
    let ttl = fixed[7];
    let mut next = fixed[6];
    let mut rest = buf.get(IPV6_HEADER..).unwrap_or_default();
    // Each extension header is at least 8 bytes, so this loop ends.
    loop {
        match next {
            IPPROTO_TCP => {
                return Ok(IpPart {
                    tos,
                    ttl,
                    tcp: rest,
                })
            }
            NH_HOP_BY_HOP | NH_ROUTING | NH_DEST_OPTS => {
                let Some(&[nh, len]) = rest.get(..2) else {
                    return Err(SynError::Truncated);
                };
                let ext_len = (usize::from(len) + 1) * 8;
                rest = rest.get(ext_len..).ok_or(SynError::Truncated)?;
                next = nh;
            }
            _ => {
                return Err(SynError::Invalid(
                    "IPv6 next header is not TCP, hop-by-hop, routing or destination options",
                ))
            }
        }
    }
}

/// Parses the TCP header and its options.
fn parse_tcp(ip: IpPart<'_>) -> Result<SynInfo, SynError> {
    let Some(fixed) = ip.tcp.get(..TCP_MIN_HEADER) else {
        return Err(SynError::Truncated);
    };
    let header_len = usize::from(fixed[12] >> 4) * 4;
    if header_len < TCP_MIN_HEADER {
        return Err(SynError::Invalid("TCP data offset is below 5"));
    }
    if fixed[13] & TCP_FLAG_SYN == 0 {
        return Err(SynError::Invalid("TCP segment is not a SYN"));
    }
    let options = ip
        .tcp
        .get(TCP_MIN_HEADER..header_len)
        .ok_or(SynError::Truncated)?;
    let mut info = SynInfo {
        dscp: ip.tos >> 2,
        ecn: ip.tos & 0x03,
        ttl: ip.ttl,
        mss: None,
        window_scale: None,
        sack_permitted: false,
        timestamps: false,
        window: u16::from_be_bytes([fixed[14], fixed[15]]),
    };
    parse_options(options, &mut info)?;
    Ok(info)
}

/// Walks the TCP options, recording the ones [`SynInfo`] reports.
fn parse_options(options: &[u8], info: &mut SynInfo) -> Result<(), SynError> {
    let mut rest = options;
    while let Some((&kind, after_kind)) = rest.split_first() {
        match kind {
            OPT_EOL => break,
            OPT_NOP => {
                rest = after_kind;
                continue;
            }
            _ => {}
        }
        let len = usize::from(
            *after_kind
                .first()
                .ok_or(SynError::Invalid("TCP option has no length byte"))?,
        );
        if len < 2 {
            return Err(SynError::Invalid("TCP option length is below 2"));
        }
        let body = rest
            .get(2..len)
            .ok_or(SynError::Invalid("TCP option overruns the TCP header"))?;
        match kind {
            OPT_MSS => match *body {
                [hi, lo] => info.mss = Some(u16::from_be_bytes([hi, lo])),
                _ => return Err(SynError::Invalid("TCP MSS option length is not 4")),
            },
            OPT_WSCALE => match *body {
                [shift] => info.window_scale = Some(shift),
                _ => return Err(SynError::Invalid("TCP window scale option length is not 3")),
            },
            OPT_SACK_PERM => {
                if !body.is_empty() {
                    return Err(SynError::Invalid(
                        "TCP SACK permitted option length is not 2",
                    ));
                }
                info.sack_permitted = true;
            }
            OPT_TIMESTAMPS => {
                if body.len() != 8 {
                    return Err(SynError::Invalid("TCP timestamps option length is not 10"));
                }
                info.timestamps = true;
            }
            _ => {}
        }
        rest = rest.get(len..).unwrap_or_default();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// TCP options as a typical Linux SYN carries them.
    fn linux_options(mss: u16, wscale: u8) -> Vec<u8> {
        let mut o = vec![OPT_MSS, 4];
        o.extend_from_slice(&mss.to_be_bytes());
        o.extend_from_slice(&[OPT_SACK_PERM, 2, OPT_TIMESTAMPS, 10]);
        o.extend_from_slice(&[0x00, 0x0a, 0xbc, 0xde, 0, 0, 0, 0]);
        o.extend_from_slice(&[OPT_NOP, OPT_WSCALE, 3, wscale]);
        o
    }

    /// A TCP SYN header with `options`, padded with EOL to a multiple of 4.
    fn tcp_syn(window: u16, options: &[u8]) -> Vec<u8> {
        let mut opts = options.to_vec();
        while opts.len() % 4 != 0 {
            opts.push(OPT_EOL);
        }
        let doff = u8::try_from((TCP_MIN_HEADER + opts.len()) / 4).expect("options fit");
        let mut t = vec![0xc3, 0x50, 0x01, 0xbb]; // ports 50000 -> 443
        t.extend_from_slice(&0x1234_5678u32.to_be_bytes()); // seq
        t.extend_from_slice(&[0, 0, 0, 0]); // ack
        t.extend_from_slice(&[doff << 4, TCP_FLAG_SYN]);
        t.extend_from_slice(&window.to_be_bytes());
        t.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent
        t.extend(opts);
        t
    }

    /// An IPv4 header (with `ip_options`, a multiple of 4 bytes) + `tcp`.
    fn ipv4_packet(tos: u8, ttl: u8, ip_options: &[u8], tcp: &[u8]) -> Vec<u8> {
        let ihl = u8::try_from((IPV4_MIN_HEADER + ip_options.len()) / 4).expect("fits");
        let total = u16::try_from(usize::from(ihl) * 4 + tcp.len()).expect("fits");
        let mut p = vec![0x40 | ihl, tos];
        p.extend_from_slice(&total.to_be_bytes());
        p.extend_from_slice(&[0xab, 0xcd, 0x40, 0x00, ttl, IPPROTO_TCP, 0, 0]);
        p.extend_from_slice(&[192, 0, 2, 1, 198, 51, 100, 2]);
        p.extend_from_slice(ip_options);
        p.extend_from_slice(tcp);
        p
    }

    /// An IPv6 header, `ext` extension headers (kind, body of 6 + 8k bytes),
    /// then `tcp`.
    fn ipv6_packet(tclass: u8, hop: u8, ext: &[(u8, Vec<u8>)], tcp: &[u8]) -> Vec<u8> {
        let first_next = ext.first().map_or(IPPROTO_TCP, |(k, _)| *k);
        let mut chain = Vec::new();
        for (i, (_, body)) in ext.iter().enumerate() {
            let next = ext.get(i + 1).map_or(IPPROTO_TCP, |(k, _)| *k);
            assert_eq!((body.len() + 2) % 8, 0, "extension header size");
            chain.push(next);
            chain.push(u8::try_from((body.len() + 2) / 8 - 1).expect("fits"));
            chain.extend_from_slice(body);
        }
        let payload = u16::try_from(chain.len() + tcp.len()).expect("fits");
        let mut p = vec![0x60 | (tclass >> 4), (tclass << 4) | 0x0a, 0xbc, 0xde];
        p.extend_from_slice(&payload.to_be_bytes());
        p.extend_from_slice(&[first_next, hop]);
        p.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        p.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        p.extend(chain);
        p.extend_from_slice(tcp);
        p
    }

    const EXPECTED_LINUX: SynInfo = SynInfo {
        dscp: 46,
        ecn: 0,
        ttl: 64,
        mss: Some(65483),
        window_scale: Some(7),
        sack_permitted: true,
        timestamps: true,
        window: 65495,
    };

    #[test]
    fn ipv4_linux_syn_with_dscp_ef() {
        let pkt = ipv4_packet(46 << 2, 64, &[], &tcp_syn(65495, &linux_options(65483, 7)));
        assert_eq!(pkt.len(), 60);
        assert_eq!(parse_saved_syn(&pkt), Ok(EXPECTED_LINUX));
    }

    #[test]
    fn ipv4_options_are_skipped_by_ihl() {
        // Router alert (4 bytes) + NOP padding to 8 bytes.
        let ip_opts = [0x94, 0x04, 0x00, 0x00, 0x01, 0x01, 0x01, 0x00];
        let pkt = ipv4_packet(
            0b1011_1001,
            64,
            &ip_opts,
            &tcp_syn(65495, &linux_options(65483, 7)),
        );
        let info = parse_saved_syn(&pkt).expect("valid");
        assert_eq!((info.dscp, info.ecn), (46, 1));
        assert_eq!(info.mss, Some(65483));
    }

    #[test]
    fn ipv6_linux_syn_with_hop_limit_and_ecn() {
        let pkt = ipv6_packet(
            (46 << 2) | 2,
            64,
            &[],
            &tcp_syn(65495, &linux_options(65483, 7)),
        );
        assert_eq!(
            parse_saved_syn(&pkt),
            Ok(SynInfo {
                ecn: 2,
                ..EXPECTED_LINUX
            })
        );
    }

    #[test]
    fn ipv6_extension_headers_are_walked() {
        let ext = vec![
            (NH_HOP_BY_HOP, vec![0x01, 0x04, 0, 0, 0, 0]), // PadN
            (NH_ROUTING, vec![0; 14]),
            (NH_DEST_OPTS, vec![0x01, 0x04, 0, 0, 0, 0]),
        ];
        let pkt = ipv6_packet(0, 57, &ext, &tcp_syn(1024, &[OPT_MSS, 4, 0x05, 0xa0]));
        let info = parse_saved_syn(&pkt).expect("valid");
        assert_eq!((info.ttl, info.mss, info.window), (57, Some(1440), 1024));
        assert_eq!(
            (info.window_scale, info.sack_permitted, info.timestamps),
            (None, false, false)
        );
    }

    #[test]
    fn ipv6_fragment_or_other_next_header_is_invalid() {
        let tcp = tcp_syn(1024, &[]);
        for ext in [(44u8, vec![0; 6]), (17u8, vec![0; 6])] {
            let pkt = ipv6_packet(0, 64, &[ext], &tcp);
            assert!(matches!(parse_saved_syn(&pkt), Err(SynError::Invalid(_))));
        }
    }

    #[test]
    fn options_stop_at_eol_and_skip_unknown_kinds() {
        // Unknown kind 30 (MPTCP) len 4, then EOL, then garbage that is ignored.
        let opts = [
            30, 4, 0x00, 0x81, OPT_MSS, 4, 0x05, 0xb4, OPT_EOL, 0xff, 0xff, 0xff,
        ];
        let info =
            parse_saved_syn(&ipv4_packet(0, 128, &[], &tcp_syn(64240, &opts))).expect("valid");
        assert_eq!((info.mss, info.ttl, info.window), (Some(1460), 128, 64240));
    }

    #[test]
    fn bad_option_lengths_are_invalid() {
        let cases: [(&[u8], &str); 7] = [
            (&[OPT_MSS, 3, 0, 0], "TCP MSS option length is not 4"),
            (
                &[OPT_WSCALE, 4, 7, 0],
                "TCP window scale option length is not 3",
            ),
            (
                &[OPT_SACK_PERM, 3, 0, 0],
                "TCP SACK permitted option length is not 2",
            ),
            (
                &[OPT_TIMESTAMPS, 4, 0, 0],
                "TCP timestamps option length is not 10",
            ),
            (&[30, 1, 0, 0], "TCP option length is below 2"),
            (
                &[OPT_NOP, OPT_NOP, 30, 9],
                "TCP option overruns the TCP header",
            ),
            (
                &[OPT_NOP, OPT_NOP, OPT_NOP, 30],
                "TCP option has no length byte",
            ),
        ];
        for (opts, why) in cases {
            let pkt = ipv4_packet(0, 64, &[], &tcp_syn(1, opts));
            assert_eq!(
                parse_saved_syn(&pkt),
                Err(SynError::Invalid(why)),
                "{opts:?}"
            );
        }
    }

    #[test]
    fn truncated_headers_are_truncated() {
        let pkt = ipv4_packet(0, 64, &[], &tcp_syn(65495, &linux_options(65483, 7)));
        for cut in 0..pkt.len() {
            assert_eq!(
                parse_saved_syn(&pkt[..cut]),
                Err(SynError::Truncated),
                "cut {cut}"
            );
        }
        let ext = vec![(NH_DEST_OPTS, vec![0; 14])];
        let pkt = ipv6_packet(0, 64, &ext, &tcp_syn(65495, &linux_options(65483, 7)));
        for cut in 0..pkt.len() {
            assert_eq!(
                parse_saved_syn(&pkt[..cut]),
                Err(SynError::Truncated),
                "cut {cut}"
            );
        }
    }

    #[test]
    fn malformed_headers_are_invalid_or_not_ip() {
        let good = ipv4_packet(0, 64, &[], &tcp_syn(1, &[]));
        let mut mac = vec![0u8; 14];
        mac.extend_from_slice(&good);
        assert_eq!(parse_saved_syn(&mac), Err(SynError::NotIp));

        let mut low_ihl = good.clone();
        low_ihl[0] = 0x44;
        assert_eq!(
            parse_saved_syn(&low_ihl),
            Err(SynError::Invalid("IPv4 IHL is below 5"))
        );

        let mut udp = good.clone();
        udp[9] = 17;
        assert_eq!(
            parse_saved_syn(&udp),
            Err(SynError::Invalid("IPv4 protocol is not TCP"))
        );

        let mut frag = good.clone();
        frag[7] = 0x10;
        assert!(matches!(parse_saved_syn(&frag), Err(SynError::Invalid(_))));

        let mut ack = good.clone();
        ack[20 + 13] = 0x10;
        assert_eq!(
            parse_saved_syn(&ack),
            Err(SynError::Invalid("TCP segment is not a SYN"))
        );

        let mut low_doff = good;
        low_doff[20 + 12] = 0x40;
        assert_eq!(
            parse_saved_syn(&low_doff),
            Err(SynError::Invalid("TCP data offset is below 5"))
        );
    }

    fn tcp_options() -> impl Strategy<Value = (Vec<u8>, Option<u16>, Option<u8>, bool, bool)> {
        (
            any::<Option<u16>>(),
            any::<Option<u8>>(),
            any::<bool>(),
            any::<bool>(),
            0usize..4,
        )
            .prop_map(|(mss, ws, sack, ts, nops)| {
                let mut o = vec![OPT_NOP; nops];
                if let Some(m) = mss {
                    o.extend_from_slice(&[OPT_MSS, 4]);
                    o.extend_from_slice(&m.to_be_bytes());
                }
                if sack {
                    o.extend_from_slice(&[OPT_SACK_PERM, 2]);
                }
                if ts {
                    o.extend_from_slice(&[OPT_TIMESTAMPS, 10, 1, 2, 3, 4, 5, 6, 7, 8]);
                }
                o.extend_from_slice(&[34, 2]); // TFO cookie request: unknown kind
                if let Some(w) = ws {
                    o.extend_from_slice(&[OPT_NOP, OPT_WSCALE, 3, w]);
                }
                (o, mss, ws, sack, ts)
            })
    }

    proptest! {
        #[test]
        fn parse_never_panics_on_arbitrary_bytes(buf in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse_saved_syn(&buf);
        }

        #[test]
        fn parse_never_panics_on_ip_like_bytes(
            first in prop_oneof![Just(0x45u8), Just(0x46), Just(0x4f), Just(0x60)],
            next in prop_oneof![Just(6u8), Just(0), Just(43), Just(60), any::<u8>()],
            mut tail in proptest::collection::vec(any::<u8>(), 0..200),
        ) {
            tail.insert(0, first);
            if tail.len() > 9 && first >> 4 == 4 { tail[9] = 6; }
            if tail.len() > 6 && first >> 4 == 6 { tail[6] = next; }
            let _ = parse_saved_syn(&tail);
        }

        #[test]
        fn built_syns_parse_back(
            v6 in any::<bool>(),
            tos in any::<u8>(),
            ttl in any::<u8>(),
            window in any::<u16>(),
            (opts, mss, ws, sack, ts) in tcp_options(),
            hbh in any::<bool>(),
        ) {
            let tcp = tcp_syn(window, &opts);
            let pkt = if v6 {
                let ext = if hbh { vec![(NH_HOP_BY_HOP, vec![1, 4, 0, 0, 0, 0])] } else { vec![] };
                ipv6_packet(tos, ttl, &ext, &tcp)
            } else {
                ipv4_packet(tos, ttl, &[], &tcp)
            };
            let expected = SynInfo {
                dscp: tos >> 2,
                ecn: tos & 3,
                ttl,
                mss,
                window_scale: ws,
                sack_permitted: sack,
                timestamps: ts,
                window,
            };
            prop_assert_eq!(parse_saved_syn(&pkt), Ok(expected));
        }
    }
}
