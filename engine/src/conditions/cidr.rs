//! CIDR address blocks and lists of them, for allow/deny conditions.
//!
//! A [`Cidr`] is an IPv4 or IPv6 network prefix such as `10.0.0.0/8` or
//! `2001:db8::/32`; a [`CidrList`] is a set of them, parsed from a
//! comma-separated string such as `"10.0.0.0/8, 192.168.0.0/16, ::1"`.
//!
//! IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`), which a dual-stack
//! listener reports for IPv4 peers, match IPv4 blocks as their IPv4 address.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// Why a [`Cidr`] or [`CidrList`] could not be built or parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CidrError {
    /// The text is empty (or, in a list, an entry between commas is empty).
    Empty,
    /// The part before `/` is not an IPv4 or IPv6 address.
    InvalidAddress {
        /// The text that failed to parse as an address.
        input: String,
    },
    /// The part after `/` is not a decimal number.
    InvalidPrefix {
        /// The text that failed to parse as a prefix length.
        input: String,
    },
    /// The prefix length exceeds the address width (32 or 128).
    PrefixTooLong {
        /// The prefix length given.
        prefix: u32,
        /// The largest prefix length for the address family.
        max: u8,
    },
    /// An entry of a comma-separated list is invalid.
    InList {
        /// Zero-based position of the entry in the list.
        index: usize,
        /// What is wrong with the entry.
        error: Box<CidrError>,
    },
}

impl fmt::Display for CidrError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CidrError::Empty => f.write_str("empty CIDR"),
            CidrError::InvalidAddress { input } => {
                write!(f, "invalid IP address {input:?} in CIDR")
            }
            CidrError::InvalidPrefix { input } => {
                write!(f, "invalid prefix length {input:?} in CIDR")
            }
            CidrError::PrefixTooLong { prefix, max } => {
                write!(f, "prefix length /{prefix} exceeds /{max}")
            }
            CidrError::InList { index, error } => {
                write!(f, "CIDR list entry {index}: {error}")
            }
        }
    }
}

impl std::error::Error for CidrError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            CidrError::InList { error, .. } => Some(error.as_ref()),
            _ => None,
        }
    }
}

/// An IPv4 or IPv6 network prefix, such as `10.0.0.0/8`.
///
/// The stored address always has its host bits cleared: `10.1.2.3/8` is
/// accepted and becomes `10.0.0.0/8`, so equal networks compare equal and
/// [`Display`](fmt::Display) shows the network address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    /// Network address; bits past `prefix` are zero.
    addr: IpAddr,
    /// Prefix length: at most 32 for IPv4, 128 for IPv6.
    prefix: u8,
}

/// Mask of the top `prefix` bits of a 128-bit value (`prefix` <= 128).
fn mask128(prefix: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0)
}

/// Mask of the top `prefix` bits of a 32-bit value (`prefix` <= 32).
fn mask32(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
}

impl Cidr {
    /// Builds the block of `addr` with a `prefix`-bit network part, clearing
    /// the host bits of `addr`.
    ///
    /// # Errors
    ///
    /// [`CidrError::PrefixTooLong`] if `prefix` exceeds 32 for IPv4 or 128
    /// for IPv6.
    pub fn new(addr: IpAddr, prefix: u8) -> Result<Self, CidrError> {
        let addr = match addr {
            IpAddr::V4(v4) => {
                if prefix > 32 {
                    return Err(CidrError::PrefixTooLong {
                        prefix: prefix.into(),
                        max: 32,
                    });
                }
                IpAddr::V4(Ipv4Addr::from(u32::from(v4) & mask32(prefix)))
            }
            IpAddr::V6(v6) => {
                if prefix > 128 {
                    return Err(CidrError::PrefixTooLong {
                        prefix: prefix.into(),
                        max: 128,
                    });
                }
                IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask128(prefix)))
            }
        };
        Ok(Cidr { addr, prefix })
    }

    /// The network address (host bits cleared).
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length in bits.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Whether `ip` lies in this block.
    ///
    /// An IPv4 block also matches IPv4-mapped IPv6 addresses
    /// (`::ffff:a.b.c.d`) by their IPv4 address. An IPv6 block never matches
    /// a plain IPv4 address (write the IPv4 block, or `::ffff:0:0/96` with a
    /// mapped address, instead).
    ///
    /// # Examples
    ///
    /// ```
    /// use floodgate::cidr::Cidr;
    ///
    /// let net: Cidr = "10.0.0.0/8".parse()?;
    /// assert!(net.contains("10.20.30.40".parse()?));
    /// assert!(net.contains("::ffff:10.1.1.1".parse()?));
    /// assert!(!net.contains("11.0.0.1".parse()?));
    /// assert_eq!("10.1.2.3/8".parse::<Cidr>()?.to_string(), "10.0.0.0/8");
    /// assert_eq!("::1".parse::<Cidr>()?.to_string(), "::1/128");
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => self.contains_v4(net, ip),
            (IpAddr::V4(net), IpAddr::V6(ip)) => ip
                .to_ipv4_mapped()
                .is_some_and(|ip| self.contains_v4(net, ip)),
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                (u128::from(ip) ^ u128::from(net)) & mask128(self.prefix) == 0
            }
            (IpAddr::V6(_), IpAddr::V4(_)) => false,
        }
    }

    fn contains_v4(&self, net: Ipv4Addr, ip: Ipv4Addr) -> bool {
        (u32::from(ip) ^ u32::from(net)) & mask32(self.prefix) == 0
    }
}

impl fmt::Display for Cidr {
    /// Writes `address/prefix`, always with the prefix.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Cidr {
    type Err = CidrError;

    /// Parses `address/prefix`, or a bare address meaning `/32` (IPv4) or
    /// `/128` (IPv6). Host bits are cleared. No surrounding whitespace is
    /// allowed (a [`CidrList`] trims its entries).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(CidrError::Empty);
        }
        let (addr_text, prefix_text) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr_text.parse().map_err(|_| CidrError::InvalidAddress {
            input: addr_text.to_owned(),
        })?;
        let max: u8 = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix_text {
            None => max,
            Some(p) => {
                if p.is_empty() || p.len() > 9 || !p.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(CidrError::InvalidPrefix {
                        input: p.to_owned(),
                    });
                }
                let n: u32 = p.parse().map_err(|_| CidrError::InvalidPrefix {
                    input: p.to_owned(),
                })?;
                u8::try_from(n)
                    .ok()
                    .filter(|&n| n <= max)
                    .ok_or(CidrError::PrefixTooLong { prefix: n, max })?
            }
        };
        Cidr::new(addr, prefix)
    }
}

/// A list of [`Cidr`] blocks; an address is contained if any block holds it.
///
/// `contains` checks the blocks in order, O(n) in the list length, which
/// suits the short allow/deny lists of a listener configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CidrList {
    /// The blocks, in the order given.
    cidrs: Vec<Cidr>,
}

impl CidrList {
    /// An empty list, which contains no address.
    pub fn new() -> Self {
        CidrList { cidrs: Vec::new() }
    }

    /// Appends a block.
    pub fn push(&mut self, cidr: Cidr) {
        self.cidrs.push(cidr);
    }

    /// Whether any block of the list contains `ip` (see [`Cidr::contains`]).
    ///
    /// # Examples
    ///
    /// ```
    /// use floodgate::cidr::CidrList;
    ///
    /// let allow: CidrList = "10.0.0.0/8, 192.168.0.0/16, 2001:db8::/32".parse()?;
    /// assert_eq!(allow.len(), 3);
    /// assert!(allow.contains("192.168.7.1".parse()?));
    /// assert!(allow.contains("2001:db8::42".parse()?));
    /// assert!(!allow.contains("8.8.8.8".parse()?));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.cidrs.iter().any(|c| c.contains(ip))
    }

    /// Whether the list has no blocks.
    pub fn is_empty(&self) -> bool {
        self.cidrs.is_empty()
    }

    /// Number of blocks in the list.
    pub fn len(&self) -> usize {
        self.cidrs.len()
    }

    /// The blocks, in order.
    pub fn iter(&self) -> std::slice::Iter<'_, Cidr> {
        self.cidrs.iter()
    }
}

impl<'a> IntoIterator for &'a CidrList {
    type Item = &'a Cidr;
    type IntoIter = std::slice::Iter<'a, Cidr>;

    fn into_iter(self) -> Self::IntoIter {
        self.cidrs.iter()
    }
}

impl FromIterator<Cidr> for CidrList {
    fn from_iter<I: IntoIterator<Item = Cidr>>(iter: I) -> Self {
        CidrList {
            cidrs: iter.into_iter().collect(),
        }
    }
}

impl fmt::Display for CidrList {
    /// Writes the blocks separated by `,`, which [`FromStr`] reads back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, c) in self.cidrs.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{c}")?;
        }
        Ok(())
    }
}

impl FromStr for CidrList {
    type Err = CidrError;

    /// Parses comma-separated [`Cidr`]s, trimming whitespace around each.
    /// A string that is empty or only whitespace is the empty list; an empty
    /// entry between commas (or a trailing comma) is an error.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.trim().is_empty() {
            return Ok(CidrList::new());
        }
        s.split(',')
            .enumerate()
            .map(|(index, entry)| {
                entry.trim().parse().map_err(|e| CidrError::InList {
                    index,
                    error: Box::new(e),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cidr(s: &str) -> Cidr {
        s.parse().expect("test CIDR")
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    #[test]
    fn parses_blocks_and_bare_addresses() {
        assert_eq!(cidr("10.0.0.0/8").prefix(), 8);
        assert_eq!(cidr("10.0.0.0/8").addr(), ip("10.0.0.0"));
        assert_eq!(cidr("192.0.2.7"), cidr("192.0.2.7/32"));
        assert_eq!(cidr("::1"), cidr("::1/128"));
        assert_eq!(cidr("0.0.0.0/0").to_string(), "0.0.0.0/0");
        assert_eq!(cidr("::/0").to_string(), "::/0");
    }

    #[test]
    fn host_bits_are_masked() {
        assert_eq!(cidr("10.1.2.3/8"), cidr("10.0.0.0/8"));
        assert_eq!(cidr("10.1.2.3/8").to_string(), "10.0.0.0/8");
        assert_eq!(cidr("2001:db8:ffff::1/32").to_string(), "2001:db8::/32");
        assert_eq!(cidr("255.255.255.255/0").to_string(), "0.0.0.0/0");
    }

    #[test]
    fn parse_errors_name_the_problem() {
        let err = |s: &str| s.parse::<Cidr>().expect_err(s);
        assert_eq!(err(""), CidrError::Empty);
        assert_eq!(
            err("10.0.0/8"),
            CidrError::InvalidAddress {
                input: "10.0.0".into()
            }
        );
        assert_eq!(
            err("10.0.0.0/"),
            CidrError::InvalidPrefix { input: "".into() }
        );
        assert_eq!(
            err("10.0.0.0/+8"),
            CidrError::InvalidPrefix { input: "+8".into() }
        );
        assert_eq!(
            err("10.0.0.0/8/8"),
            CidrError::InvalidPrefix {
                input: "8/8".into()
            }
        );
        assert_eq!(
            err("10.0.0.0/33"),
            CidrError::PrefixTooLong {
                prefix: 33,
                max: 32
            }
        );
        assert_eq!(
            err("::/129"),
            CidrError::PrefixTooLong {
                prefix: 129,
                max: 128
            }
        );
        assert_eq!(
            err("::/999999999"),
            CidrError::PrefixTooLong {
                prefix: 999_999_999,
                max: 128
            }
        );
        assert_eq!(
            err("::/9999999999"),
            CidrError::InvalidPrefix {
                input: "9999999999".into()
            }
        );
        assert_eq!(
            err(" 10.0.0.0/8"),
            CidrError::InvalidAddress {
                input: " 10.0.0.0".into()
            }
        );
        assert_eq!(
            err("fe80::1%eth0/64"),
            CidrError::InvalidAddress {
                input: "fe80::1%eth0".into()
            }
        );
        assert_eq!(
            err("10.0.0.0/33").to_string(),
            "prefix length /33 exceeds /32"
        );
        assert_eq!(err("x/8").to_string(), "invalid IP address \"x\" in CIDR");
        assert!(Cidr::new(ip("10.0.0.0"), 33).is_err());
    }

    #[test]
    fn contains_respects_the_prefix() {
        let net = cidr("192.168.0.0/16");
        assert!(net.contains(ip("192.168.0.0")));
        assert!(net.contains(ip("192.168.255.255")));
        assert!(!net.contains(ip("192.169.0.0")));
        assert!(cidr("0.0.0.0/0").contains(ip("203.0.113.9")));
        assert!(cidr("2001:db8::/32").contains(ip("2001:db8:1::1")));
        assert!(!cidr("2001:db8::/32").contains(ip("2001:db9::1")));
        assert!(cidr("::/0").contains(ip("::1")));
    }

    #[test]
    fn ipv4_mapped_addresses_match_ipv4_blocks() {
        assert!(cidr("10.0.0.0/8").contains(ip("::ffff:10.9.8.7")));
        assert!(!cidr("10.0.0.0/8").contains(ip("::ffff:11.9.8.7")));
        // IPv4-compatible (deprecated) addresses are not mapped.
        assert!(!cidr("10.0.0.0/8").contains(ip("::10.9.8.7")));
        // IPv6 blocks see mapped addresses as IPv6 and never match plain IPv4.
        assert!(cidr("::ffff:0:0/96").contains(ip("::ffff:10.9.8.7")));
        assert!(!cidr("::ffff:0:0/96").contains(ip("10.9.8.7")));
        assert!(!cidr("::/0").contains(ip("10.9.8.7")));
    }

    #[test]
    fn list_parses_trims_and_matches_any() {
        let list: CidrList = " 10.0.0.0/8 ,192.168.1.1, ::1 ".parse().expect("valid");
        assert_eq!(list.len(), 3);
        assert!(list.contains(ip("10.2.3.4")));
        assert!(list.contains(ip("192.168.1.1")));
        assert!(!list.contains(ip("192.168.1.2")));
        assert!(list.contains(ip("::1")));
        assert_eq!(list.to_string(), "10.0.0.0/8,192.168.1.1/32,::1/128");
        assert_eq!(list.iter().count(), 3);
    }

    #[test]
    fn empty_list_contains_nothing() {
        let list: CidrList = "  ".parse().expect("valid");
        assert!(list.is_empty());
        assert!(!list.contains(ip("10.0.0.1")));
        let mut list = CidrList::new();
        list.push(cidr("10.0.0.0/8"));
        assert!(!list.is_empty());
        assert!(list.contains(ip("10.0.0.1")));
    }

    #[test]
    fn list_errors_name_the_entry() {
        let err = "10.0.0.0/8,,::1"
            .parse::<CidrList>()
            .expect_err("empty entry");
        assert_eq!(
            err,
            CidrError::InList {
                index: 1,
                error: Box::new(CidrError::Empty)
            }
        );
        assert_eq!(err.to_string(), "CIDR list entry 1: empty CIDR");
        let err = "10.0.0.0/8,10.0.0.0/40"
            .parse::<CidrList>()
            .expect_err("bad prefix");
        assert_eq!(
            err.to_string(),
            "CIDR list entry 1: prefix length /40 exceeds /32"
        );
        assert!("10.0.0.0/8,".parse::<CidrList>().is_err());
    }

    /// Reference membership: compare the first `prefix` bits one at a time.
    fn reference_contains(net: &[u8], prefix: u8, ip: &[u8]) -> bool {
        (0..usize::from(prefix)).all(|bit| {
            let byte = bit / 8;
            let m = 0x80u8 >> (bit % 8);
            net[byte] & m == ip[byte] & m
        })
    }

    fn any_cidr() -> impl Strategy<Value = Cidr> {
        prop_oneof![
            (any::<[u8; 4]>(), 0u8..=32)
                .prop_map(|(a, p)| Cidr::new(Ipv4Addr::from(a).into(), p).expect("valid")),
            (any::<[u8; 16]>(), 0u8..=128).prop_map(|(a, p)| Cidr::new(
                Ipv6Addr::from(a).into(),
                p
            )
            .expect("valid")),
        ]
    }

    proptest! {
        #[test]
        fn v4_contains_agrees_with_bit_reference(net in any::<[u8; 4]>(), prefix in 0u8..=32, addr in any::<[u8; 4]>(), share in 0u8..=32) {
            // Make `addr` share `share` leading bits with `net` half the time.
            let mixed = if share % 2 == 0 {
                let m = mask32(share);
                (u32::from_be_bytes(net) & m) | (u32::from_be_bytes(addr) & !m)
            } else {
                u32::from_be_bytes(addr)
            };
            let addr = mixed.to_be_bytes();
            let c = Cidr::new(Ipv4Addr::from(net).into(), prefix).expect("valid");
            let expect = reference_contains(&net, prefix, &addr);
            prop_assert_eq!(c.contains(Ipv4Addr::from(addr).into()), expect);
            prop_assert_eq!(c.contains(Ipv4Addr::from(addr).to_ipv6_mapped().into()), expect);
        }

        #[test]
        fn v6_contains_agrees_with_bit_reference(net in any::<[u8; 16]>(), prefix in 0u8..=128, addr in any::<[u8; 16]>(), share in 0u8..=128) {
            let m = mask128(share);
            let mixed = (u128::from_be_bytes(net) & m) | (u128::from_be_bytes(addr) & !m);
            let addr = mixed.to_be_bytes();
            let c = Cidr::new(Ipv6Addr::from(net).into(), prefix).expect("valid");
            prop_assert_eq!(c.contains(Ipv6Addr::from(addr).into()), reference_contains(&net, prefix, &addr));
        }

        #[test]
        fn display_parses_back(c in any_cidr()) {
            prop_assert_eq!(c.to_string().parse::<Cidr>(), Ok(c));
            prop_assert!(c.contains(c.addr()));
        }

        #[test]
        fn list_display_parses_back(cs in proptest::collection::vec(any_cidr(), 0..8)) {
            let list: CidrList = cs.into_iter().collect();
            prop_assert_eq!(list.to_string().parse::<CidrList>(), Ok(list));
        }

        #[test]
        fn parse_never_panics(s in "\\PC{0,60}") {
            let _ = s.parse::<Cidr>();
            let _ = s.parse::<CidrList>();
        }

        #[test]
        fn parse_never_panics_on_cidr_like_text(s in "[0-9a-f:./, ]{0,50}") {
            let _ = s.parse::<Cidr>();
            let _ = s.parse::<CidrList>();
        }
    }
}
