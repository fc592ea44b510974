//! TLS ClientHello `server_name` (SNI) extraction from the first bytes of a
//! TCP stream, and a minimal ClientHello encoder for the load tool.
//!
//! The engine peeks the first bytes of an accepted connection and calls
//! [`parse_sni`] to route or admit it by host name before any TLS library
//! sees it. The parser follows RFC 8446 §4.1.2 (ClientHello), §5.1 (record
//! layer) and RFC 6066 §3 (server_name):
//!
//! ```text
//! record:    type(1)=22 version(2)=3.x length(2)
//! handshake: type(1)=1 length(3)
//! hello:     legacy_version(2) random(32) session_id<0..32>
//!            cipher_suites<2..2^16-2> compression_methods<1..2^8-1>
//!            extensions<0..2^16-1>   (each: type(2) length(2) data)
//! server_name (type 0): ServerNameList<1..2^16-1> of
//!            name_type(1)=0 HostName<1..2^16-1>
//! ```
//!
//! Only the first TLS record is examined. A ClientHello that does not fit in
//! it (fragmented over several records, which mainstream clients do not do)
//! is reported as [`SniError::Invalid`] as soon as the handshake header shows
//! it, never as [`SniError::Incomplete`], so a caller that retries on
//! `Incomplete` never waits for bytes that would not help.
//!
//! The parser never panics and never reads out of bounds, on any input.

use std::fmt;

/// TLS record content type for handshake messages.
const CONTENT_TYPE_HANDSHAKE: u8 = 22;
/// Handshake message type of a ClientHello.
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
/// Extension number of server_name (RFC 6066).
const EXT_SERVER_NAME: u16 = 0;
/// Extension number of supported_groups (RFC 8422, RFC 8446).
const EXT_SUPPORTED_GROUPS: u16 = 10;
/// Extension number of signature_algorithms (RFC 8446).
const EXT_SIGNATURE_ALGORITHMS: u16 = 13;
/// Extension number of padding (RFC 7685).
const EXT_PADDING: u16 = 21;
/// Extension number of supported_versions (RFC 8446).
const EXT_SUPPORTED_VERSIONS: u16 = 43;
/// ServerName name_type of a DNS host name.
const NAME_TYPE_HOST_NAME: u8 = 0;
/// Length of the record header: type, version, length.
const RECORD_HEADER_LEN: usize = 5;
/// Length of the handshake header: type and 24-bit length.
const HANDSHAKE_HEADER_LEN: usize = 4;
/// Largest plaintext record payload allowed (2^14, RFC 8446 §5.1).
const MAX_RECORD_LEN: usize = 1 << 14;

/// Longest host name accepted by [`parse_sni`] and encodable by
/// [`client_hello`]: 255 bytes, the DNS limit on a name (RFC 1035 §2.3.4).
pub const MAX_HOST_NAME_LEN: usize = 255;

/// Why [`parse_sni`] did not return a result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SniError {
    /// The bytes so far are a valid prefix of a TLS record holding a
    /// ClientHello, but the ClientHello is not complete yet; peek again.
    Incomplete,
    /// The bytes do not start a TLS handshake record.
    NotTls,
    /// The bytes start a TLS handshake record but are not a well-formed
    /// single-record ClientHello; the value names what is wrong.
    Invalid(&'static str),
}

impl fmt::Display for SniError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SniError::Incomplete => f.write_str("incomplete TLS ClientHello"),
            SniError::NotTls => f.write_str("not a TLS handshake record"),
            SniError::Invalid(what) => write!(f, "invalid TLS ClientHello: {what}"),
        }
    }
}

impl std::error::Error for SniError {}

/// A bounds-checked forward reader over a byte slice.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Takes `n` bytes, or fails with `Invalid(what)`.
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], SniError> {
        if n > self.buf.len() {
            return Err(SniError::Invalid(what));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, SniError> {
        self.take(1, what).map(|b| b[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, SniError> {
        self.take(2, what).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }

    /// Takes a vector with a `u8` length prefix.
    fn vec8(&mut self, what: &'static str) -> Result<&'a [u8], SniError> {
        let n = self.u8(what)?;
        self.take(usize::from(n), what)
    }

    /// Takes a vector with a `u16` length prefix.
    fn vec16(&mut self, what: &'static str) -> Result<&'a [u8], SniError> {
        let n = self.u16(what)?;
        self.take(usize::from(n), what)
    }
}

/// How many bytes from the start of the stream a ClientHello needs, as far
/// as `buf` tells: the record header (5 bytes) until it is there, then the
/// record's declared length, then the ClientHello's own length once its
/// handshake header is there. A condition that got
/// [`SniError::Incomplete`] asks for this many bytes instead of guessing a
/// fixed prefix (see [`crate::Verdict::NeedBytes`]). Never less than
/// `buf.len() + 1` for an incomplete hello; meaningless for other input.
///
/// ```
/// use floodgate::sni::{client_hello, needed_len};
///
/// let hello = client_hello("example.com");
/// assert_eq!(needed_len(&hello[..2]), 5);
/// assert_eq!(needed_len(&hello[..7]), hello.len());
/// assert_eq!(needed_len(&hello[..40]), hello.len());
/// ```
pub fn needed_len(buf: &[u8]) -> usize {
    let at_least = buf.len() + 1;
    let Some(&[_, _, _, hi, lo]) = buf.get(..RECORD_HEADER_LEN) else {
        return RECORD_HEADER_LEN.max(at_least);
    };
    let record = RECORD_HEADER_LEN + usize::from(u16::from_be_bytes([hi, lo]));
    match buf.get(RECORD_HEADER_LEN..RECORD_HEADER_LEN + HANDSHAKE_HEADER_LEN) {
        Some(&[_, a, b, c]) => {
            let hello = usize::from(a) << 16 | usize::from(b) << 8 | usize::from(c);
            (RECORD_HEADER_LEN + HANDSHAKE_HEADER_LEN + hello).max(at_least)
        }
        _ => record.max(at_least),
    }
}

/// Extracts the `server_name` host name from a TLS ClientHello at the start
/// of `buf`.
///
/// Returns `Ok(Some(name))` for a complete ClientHello carrying a host name,
/// `Ok(None)` for a complete ClientHello without a server_name extension.
/// The name is returned as sent (no case folding). It must be 1 to
/// [`MAX_HOST_NAME_LEN`] bytes of printable ASCII without spaces (RFC 6066
/// host names are ASCII; internationalised names travel as A-labels).
/// Bytes after the ClientHello are ignored.
///
/// # Errors
///
/// * [`SniError::Incomplete`] if `buf` is a valid prefix of a ClientHello
///   record; peek more bytes and call again.
/// * [`SniError::NotTls`] if `buf` does not start with a TLS handshake
///   record header (content type 22, major version 3).
/// * [`SniError::Invalid`] if the record is not a well-formed ClientHello,
///   the ClientHello spans more than the first record, a length overruns its
///   enclosing structure, server_name appears twice or is empty, or the host
///   name is not printable ASCII.
///
/// # Examples
///
/// ```
/// use floodgate::sni::{client_hello, parse_sni, SniError};
///
/// let hello = client_hello("example.com");
/// assert_eq!(parse_sni(&hello), Ok(Some("example.com".to_string())));
/// assert_eq!(parse_sni(&hello[..40]), Err(SniError::Incomplete));
/// assert_eq!(parse_sni(b"GET / HTTP/1.1\r\n"), Err(SniError::NotTls));
/// ```
pub fn parse_sni(buf: &[u8]) -> Result<Option<String>, SniError> {
    // Record header, checked byte by byte so garbage is rejected early.
    match buf.first() {
        None => return Err(SniError::Incomplete),
        Some(&CONTENT_TYPE_HANDSHAKE) => {}
        Some(_) => return Err(SniError::NotTls),
    }
    match buf.get(1) {
        None => return Err(SniError::Incomplete),
        Some(3) => {}
        Some(_) => return Err(SniError::NotTls),
    }
    let Some(&[_, _, _, hi, lo]) = buf.get(..RECORD_HEADER_LEN) else {
        return Err(SniError::Incomplete);
    };
    let record_len = usize::from(u16::from_be_bytes([hi, lo]));
    if record_len > MAX_RECORD_LEN {
        return Err(SniError::Invalid("record length exceeds 2^14"));
    }
    if record_len < HANDSHAKE_HEADER_LEN {
        return Err(SniError::Invalid("record too short for a handshake header"));
    }

    // Handshake header.
    match buf.get(RECORD_HEADER_LEN) {
        None => return Err(SniError::Incomplete),
        Some(&HANDSHAKE_CLIENT_HELLO) => {}
        Some(_) => return Err(SniError::Invalid("handshake message is not a ClientHello")),
    }
    let Some(&[_, a, b, c]) = buf.get(RECORD_HEADER_LEN..RECORD_HEADER_LEN + HANDSHAKE_HEADER_LEN)
    else {
        return Err(SniError::Incomplete);
    };
    let hello_len = usize::from(a) << 16 | usize::from(b) << 8 | usize::from(c);
    if HANDSHAKE_HEADER_LEN + hello_len > record_len {
        return Err(SniError::Invalid(
            "ClientHello spans more than one TLS record",
        ));
    }
    let start = RECORD_HEADER_LEN + HANDSHAKE_HEADER_LEN;
    let Some(hello) = buf.get(start..start + hello_len) else {
        return Err(SniError::Incomplete);
    };
    parse_client_hello(hello)
}

/// Parses a ClientHello body (after the handshake header).
fn parse_client_hello(hello: &[u8]) -> Result<Option<String>, SniError> {
    let mut r = Reader::new(hello);
    r.take(2, "truncated legacy_version")?;
    r.take(32, "truncated random")?;
    let session_id = r.vec8("truncated session_id")?;
    if session_id.len() > 32 {
        return Err(SniError::Invalid("session_id longer than 32 bytes"));
    }
    let suites = r.vec16("truncated cipher_suites")?;
    if suites.is_empty() || suites.len() % 2 != 0 {
        return Err(SniError::Invalid("cipher_suites length is zero or odd"));
    }
    let compression = r.vec8("truncated compression_methods")?;
    if compression.is_empty() {
        return Err(SniError::Invalid("compression_methods is empty"));
    }
    if r.is_empty() {
        // Pre-TLS-1.2 clients may omit the extensions block entirely.
        return Ok(None);
    }
    let extensions = r.vec16("truncated extensions")?;
    if !r.is_empty() {
        return Err(SniError::Invalid("trailing bytes after extensions"));
    }

    let mut exts = Reader::new(extensions);
    let mut name = None;
    while !exts.is_empty() {
        let ext_type = exts.u16("truncated extension header")?;
        let data = exts.vec16("extension data overruns the extensions block")?;
        if ext_type == EXT_SERVER_NAME {
            if name.is_some() {
                return Err(SniError::Invalid("duplicate server_name extension"));
            }
            name = Some(parse_server_name(data)?);
        }
    }
    Ok(name)
}

/// Parses the server_name extension data and returns its host name.
fn parse_server_name(data: &[u8]) -> Result<String, SniError> {
    let mut r = Reader::new(data);
    let list = r.vec16("server_name list overruns the extension")?;
    if !r.is_empty() {
        return Err(SniError::Invalid("trailing bytes after server_name list"));
    }
    if list.is_empty() {
        return Err(SniError::Invalid("server_name list is empty"));
    }
    let mut entries = Reader::new(list);
    let mut host = None;
    while !entries.is_empty() {
        let name_type = entries.u8("truncated server_name entry")?;
        // Every defined and plausible future name type is a u16-length vector.
        let value = entries.vec16("server_name entry overruns the list")?;
        if name_type != NAME_TYPE_HOST_NAME {
            continue;
        }
        if host.is_some() {
            return Err(SniError::Invalid("more than one host_name in server_name"));
        }
        host = Some(value);
    }
    let host = host.ok_or(SniError::Invalid("server_name has no host_name entry"))?;
    if host.is_empty() {
        return Err(SniError::Invalid("host_name is empty"));
    }
    if host.len() > MAX_HOST_NAME_LEN {
        return Err(SniError::Invalid("host_name longer than 255 bytes"));
    }
    if !host.iter().all(u8::is_ascii_graphic) {
        return Err(SniError::Invalid("host_name is not printable ASCII"));
    }
    std::str::from_utf8(host)
        .map(str::to_owned)
        .map_err(|_| SniError::Invalid("host_name is not printable ASCII"))
}

/// Builds a minimal, well-formed TLS ClientHello record offering TLS 1.3 and
/// TLS 1.2, with `sni` as its server_name.
///
/// The record carries: record version 3.1, legacy_version 3.3, a fixed
/// random, an empty session_id, five cipher suites (three TLS 1.3 AEADs,
/// two ECDHE-GCM TLS 1.2 suites), null compression, and the extensions
/// server_name, supported_versions (1.3, 1.2), supported_groups (x25519,
/// secp256r1) and signature_algorithms. It has no key_share, so a TLS 1.3
/// server answers with a HelloRetryRequest; the load tool only needs the
/// server to see the name.
///
/// An empty `sni` omits the server_name extension ([`parse_sni`] then
/// returns `Ok(None)`). The name is written as given, without validation,
/// so a name [`parse_sni`] would reject (non-ASCII, say) makes a
/// ClientHello that tests rejection.
///
/// # Panics
///
/// Panics if `sni` is longer than [`MAX_HOST_NAME_LEN`] bytes.
///
/// # Examples
///
/// ```
/// use floodgate::sni::{client_hello, parse_sni};
///
/// let hello = client_hello("api.example.net");
/// assert_eq!(hello[0], 22); // handshake record
/// assert_eq!(parse_sni(&hello), Ok(Some("api.example.net".into())));
/// assert_eq!(parse_sni(&client_hello("")), Ok(None));
/// ```
pub fn client_hello(sni: &str) -> Vec<u8> {
    client_hello_padded(sni, 0)
}

/// As [`client_hello`], padded with the padding extension (RFC 7685) to
/// `total` bytes on the wire when that is longer, as OpenSSL pads its
/// hellos to 517 bytes: the shape of what real clients send.
///
/// ```
/// use floodgate::sni::{client_hello_padded, parse_sni};
///
/// let hello = client_hello_padded("example.com", 517);
/// assert_eq!(hello.len(), 517);
/// assert_eq!(parse_sni(&hello), Ok(Some("example.com".to_string())));
/// ```
///
/// # Panics
/// As [`client_hello`].
pub fn client_hello_padded(sni: &str, total: usize) -> Vec<u8> {
    assert!(
        sni.len() <= MAX_HOST_NAME_LEN,
        "SNI host name is {} bytes, longer than {MAX_HOST_NAME_LEN}",
        sni.len()
    );
    // Lengths below are bounded by MAX_HOST_NAME_LEN plus small constants,
    // so every u16/u24 length field fits.
    let mut exts = Vec::new();
    if !sni.is_empty() {
        let name = sni.as_bytes();
        let mut entry = vec![NAME_TYPE_HOST_NAME];
        push_vec16(&mut entry, name);
        let mut list = Vec::new();
        push_vec16(&mut list, &entry);
        push_extension(&mut exts, EXT_SERVER_NAME, &list);
    }
    push_extension(
        &mut exts,
        EXT_SUPPORTED_VERSIONS,
        &[4, 0x03, 0x04, 0x03, 0x03],
    );
    push_extension(
        &mut exts,
        EXT_SUPPORTED_GROUPS,
        &[0x00, 0x04, 0x00, 0x1d, 0x00, 0x17],
    );
    push_extension(
        &mut exts,
        EXT_SIGNATURE_ALGORITHMS,
        &[0x00, 0x06, 0x04, 0x03, 0x08, 0x04, 0x04, 0x01],
    );
    // Everything but the extensions: record and handshake headers, version,
    // random, session id, 5 cipher suites, compression, extensions length.
    let fixed = RECORD_HEADER_LEN + HANDSHAKE_HEADER_LEN + 2 + 32 + 1 + 12 + 2 + 2;
    let unpadded = fixed + exts.len();
    if total >= unpadded + 4 {
        let pad = (total - unpadded - 4).min(MAX_RECORD_LEN / 2);
        push_extension(&mut exts, EXT_PADDING, &vec![0u8; pad]);
    }

    let mut hello = vec![0x03, 0x03];
    hello.extend((0u8..32).map(|i| i.wrapping_mul(37) ^ 0x5a));
    hello.push(0); // empty session_id
    push_vec16(
        &mut hello,
        &[0x13, 0x01, 0x13, 0x02, 0x13, 0x03, 0xc0, 0x2b, 0xc0, 0x2f],
    );
    hello.extend_from_slice(&[1, 0]); // compression: null
    push_vec16(&mut hello, &exts);

    let hs_len = u32::try_from(hello.len()).unwrap_or(u32::MAX).to_be_bytes();
    let mut out = Vec::with_capacity(RECORD_HEADER_LEN + HANDSHAKE_HEADER_LEN + hello.len());
    out.extend_from_slice(&[CONTENT_TYPE_HANDSHAKE, 0x03, 0x01]);
    out.extend_from_slice(&len16(HANDSHAKE_HEADER_LEN + hello.len()));
    out.extend_from_slice(&[HANDSHAKE_CLIENT_HELLO, hs_len[1], hs_len[2], hs_len[3]]);
    out.extend_from_slice(&hello);
    out
}

/// A length as a big-endian `u16`; callers keep lengths far below 2^16.
fn len16(n: usize) -> [u8; 2] {
    u16::try_from(n).unwrap_or(u16::MAX).to_be_bytes()
}

/// Appends `data` with a `u16` length prefix.
fn push_vec16(out: &mut Vec<u8>, data: &[u8]) {
    out.extend_from_slice(&len16(data.len()));
    out.extend_from_slice(data);
}

/// Appends one extension: type, length, data.
fn push_extension(out: &mut Vec<u8>, ext_type: u16, data: &[u8]) {
    out.extend_from_slice(&ext_type.to_be_bytes());
    push_vec16(out, data);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A hand-built TLS 1.2 ClientHello laid out as OpenSSL sends one: a
    /// 32-byte session_id, two suites (AES128-SHA and the renegotiation
    /// SCSV), null compression, server_name and ec_point_formats.
    fn openssl_style_hello() -> Vec<u8> {
        let mut hello = vec![0x03, 0x03];
        hello.extend_from_slice(&[0; 32]);
        hello.push(0x20);
        hello.extend_from_slice(&[0xab; 32]);
        hello.extend_from_slice(&[0x00, 0x04, 0x00, 0x2f, 0x00, 0xff]);
        hello.extend_from_slice(&[0x01, 0x00]);
        let exts: &[u8] = &[
            0x00, 0x00, 0x00, 0x10, // server_name, len 16
            0x00, 0x0e, // list len 14
            0x00, 0x00, 0x0b, // host_name, len 11
            b'e', b'x', b'a', b'm', b'p', b'l', b'e', b'.', b'c', b'o', b'm', //
            0x00, 0x0b, 0x00, 0x02, 0x01, 0x00, // ec_point_formats
        ];
        hello.extend_from_slice(&(exts.len() as u16).to_be_bytes());
        hello.extend_from_slice(exts);
        wrap(&hello)
    }

    /// Wraps a ClientHello body in handshake and record headers.
    fn wrap(hello: &[u8]) -> Vec<u8> {
        let mut out = vec![0x16, 0x03, 0x01];
        out.extend_from_slice(&((hello.len() + 4) as u16).to_be_bytes());
        out.push(0x01);
        out.extend_from_slice(&(hello.len() as u32).to_be_bytes()[1..]);
        out.extend_from_slice(hello);
        out
    }

    /// A ClientHello body whose extensions block is `exts`.
    fn hello_with_extensions(exts: &[u8]) -> Vec<u8> {
        let mut hello = vec![0x03, 0x03];
        hello.extend_from_slice(&[7; 32]);
        hello.push(0);
        hello.extend_from_slice(&[0x00, 0x02, 0x13, 0x01, 0x01, 0x00]);
        hello.extend_from_slice(&(exts.len() as u16).to_be_bytes());
        hello.extend_from_slice(exts);
        wrap(&hello)
    }

    fn sni_ext(list: &[u8]) -> Vec<u8> {
        let mut ext = vec![0x00, 0x00];
        ext.extend_from_slice(&((list.len() + 2) as u16).to_be_bytes());
        ext.extend_from_slice(&(list.len() as u16).to_be_bytes());
        ext.extend_from_slice(list);
        ext
    }

    #[test]
    fn openssl_style_hello_yields_its_host_name() {
        let buf = openssl_style_hello();
        assert_eq!(parse_sni(&buf), Ok(Some("example.com".into())));
        let mut with_more = buf.clone();
        with_more.extend_from_slice(&[0x14, 0x03, 0x03, 0x00, 0x01, 0x01]);
        assert_eq!(parse_sni(&with_more), Ok(Some("example.com".into())));
    }

    #[test]
    fn hello_without_server_name_is_none() {
        // Only supported_versions.
        let buf = hello_with_extensions(&[0x00, 0x2b, 0x00, 0x03, 0x02, 0x03, 0x04]);
        assert_eq!(parse_sni(&buf), Ok(None));
        // No extensions block at all.
        let mut hello = vec![0x03, 0x01];
        hello.extend_from_slice(&[0; 32]);
        hello.extend_from_slice(&[0x00, 0x00, 0x02, 0x00, 0x2f, 0x01, 0x00]);
        assert_eq!(parse_sni(&wrap(&hello)), Ok(None));
    }

    #[test]
    fn every_strict_prefix_is_incomplete() {
        let buf = openssl_style_hello();
        for cut in 0..buf.len() {
            assert_eq!(
                parse_sni(&buf[..cut]),
                Err(SniError::Incomplete),
                "cut {cut}"
            );
        }
    }

    #[test]
    fn non_tls_bytes_are_not_tls() {
        for buf in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"PROXY TCP4 ",
            b"\x17\x03\x03\x00\x10",
            b"\x16\x02",
            b"\x80\x2e\x01\x00\x02", // SSLv2-compatible hello
        ] {
            assert_eq!(parse_sni(buf), Err(SniError::NotTls));
        }
    }

    #[test]
    fn hello_spanning_two_records_is_invalid_early() {
        // Record of 100 bytes announcing a 5000-byte ClientHello.
        let buf = [0x16, 0x03, 0x01, 0x00, 0x64, 0x01, 0x00, 0x13, 0x88];
        assert_eq!(
            parse_sni(&buf),
            Err(SniError::Invalid(
                "ClientHello spans more than one TLS record"
            ))
        );
    }

    #[test]
    fn malformed_hellos_are_invalid() {
        let server_hello = [0x16, 0x03, 0x03, 0x00, 0x04, 0x02, 0x00, 0x00, 0x00];
        assert_eq!(
            parse_sni(&server_hello),
            Err(SniError::Invalid("handshake message is not a ClientHello"))
        );
        let huge = [0x16, 0x03, 0x01, 0x40, 0x01];
        assert_eq!(
            parse_sni(&huge),
            Err(SniError::Invalid("record length exceeds 2^14"))
        );
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (
                hello_with_extensions(&[0x00, 0x2b, 0x00, 0x09, 0x02]),
                "extension data overruns the extensions block",
            ),
            (
                hello_with_extensions(&sni_ext(&[0x00, 0x00, 0x05, b'a'])),
                "server_name entry overruns the list",
            ),
            (
                hello_with_extensions(&sni_ext(&[])),
                "server_name list is empty",
            ),
            (
                hello_with_extensions(&sni_ext(&[0x00, 0x00, 0x00])),
                "host_name is empty",
            ),
            (
                hello_with_extensions(&sni_ext(&[0x00, 0x00, 0x03, b'a', b' ', b'b'])),
                "host_name is not printable ASCII",
            ),
            (
                hello_with_extensions(&sni_ext(&[0x00, 0x00, 0x02, 0xc3, 0xa9])),
                "host_name is not printable ASCII",
            ),
            (
                hello_with_extensions(&sni_ext(&[0x05, 0x00, 0x01, b'x'])),
                "server_name has no host_name entry",
            ),
            (
                hello_with_extensions(&sni_ext(&[0, 0, 1, b'a', 0, 0, 1, b'b'])),
                "more than one host_name in server_name",
            ),
            (
                {
                    let mut two = sni_ext(&[0, 0, 1, b'a']);
                    two.extend(sni_ext(&[0, 0, 1, b'b']));
                    hello_with_extensions(&two)
                },
                "duplicate server_name extension",
            ),
        ];
        for (buf, why) in cases {
            assert_eq!(parse_sni(&buf), Err(SniError::Invalid(why)));
        }
    }

    #[test]
    fn unknown_name_types_are_skipped() {
        let buf = hello_with_extensions(&sni_ext(&[0x07, 0x00, 0x01, b'x', 0, 0, 2, b'o', b'k']));
        assert_eq!(parse_sni(&buf), Ok(Some("ok".into())));
    }

    #[test]
    fn client_hello_is_well_formed() {
        let buf = client_hello("example.com");
        assert_eq!(&buf[..3], &[0x16, 0x03, 0x01]);
        assert_eq!(
            usize::from(u16::from_be_bytes([buf[3], buf[4]])),
            buf.len() - 5
        );
        assert_eq!(buf[5], 1);
        assert_eq!(
            u32::from_be_bytes([0, buf[6], buf[7], buf[8]]) as usize,
            buf.len() - 9
        );
    }

    #[test]
    fn longest_host_name_round_trips_and_longer_is_rejected() {
        let name = "a".repeat(MAX_HOST_NAME_LEN);
        assert_eq!(parse_sni(&client_hello(&name)), Ok(Some(name)));
        let long = vec![b'a'; MAX_HOST_NAME_LEN + 1];
        let mut list = vec![0x00];
        list.extend_from_slice(&(long.len() as u16).to_be_bytes());
        list.extend_from_slice(&long);
        assert_eq!(
            parse_sni(&hello_with_extensions(&sni_ext(&list))),
            Err(SniError::Invalid("host_name longer than 255 bytes"))
        );
    }

    #[test]
    #[should_panic(expected = "longer than 255")]
    fn client_hello_panics_on_overlong_name() {
        let _ = client_hello(&"a".repeat(MAX_HOST_NAME_LEN + 1));
    }

    fn host_name() -> impl Strategy<Value = String> {
        proptest::string::string_regex(
            "[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\\.[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?){0,4}",
        )
        .expect("valid regex")
    }

    proptest! {
        #[test]
        fn parse_never_panics_on_arbitrary_bytes(buf in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = parse_sni(&buf);
        }

        #[test]
        fn parse_never_panics_on_mutated_hellos(
            name in host_name(),
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6),
            cut in any::<usize>(),
        ) {
            let mut buf = client_hello(&name);
            for (at, byte) in flips {
                let i = at % buf.len();
                buf[i] = byte;
            }
            let cut = cut % (buf.len() + 1);
            let _ = parse_sni(&buf[..cut]);
        }

        #[test]
        fn client_hello_round_trips(name in host_name()) {
            prop_assert_eq!(parse_sni(&client_hello(&name)), Ok(Some(name)));
        }

        #[test]
        fn printable_ascii_names_round_trip(name in "[!-~]{1,255}") {
            prop_assert_eq!(parse_sni(&client_hello(&name)), Ok(Some(name)));
        }

        #[test]
        fn strict_prefixes_of_generated_hellos_are_incomplete(name in host_name()) {
            let buf = client_hello(&name);
            for cut in 0..buf.len() {
                prop_assert_eq!(parse_sni(&buf[..cut]), Err(SniError::Incomplete));
            }
        }
    }
}
