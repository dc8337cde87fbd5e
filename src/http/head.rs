//! Request and response heads: parsing (httparse), framing decisions and header rewriting.
//!
//! Framing is decided here, once, and strictly (RFC 9112, section 6): a request with both
//! Content-Length and Transfer-Encoding, with differing Content-Lengths, or with a
//! Transfer-Encoding other than a final `chunked` is refused with 400 and never reaches an
//! origin. Those are the ambiguities request smuggling lives on.

use std::fmt::Write as _;
use std::net::IpAddr;

use crate::config::Limits;

/// How a message body is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// No body.
    Empty,
    /// Exactly this many bytes.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Until the sender closes the connection (responses only).
    UntilClose,
}

/// A request the client must be told about: the status to answer with, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reject {
    pub status: u16,
    pub reason: &'static str,
}

const fn reject(status: u16, reason: &'static str) -> Reject {
    Reject { status, reason }
}

/// Headers that describe one connection, not the message (RFC 9110, section 7.6.1), plus
/// ones ferrule sets itself. They are never copied from one side to the other.
fn is_hop_by_hop(name: &str) -> bool {
    const NAMES: [&str; 10] = [
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "expect",
        "early-data",
    ];
    NAMES.iter().any(|n| n.eq_ignore_ascii_case(name))
}

/// Whether `name` is listed in any Connection header's tokens (also hop-by-hop).
fn named_by_connection(connection_tokens: &[String], name: &str) -> bool {
    connection_tokens
        .iter()
        .any(|t| t.eq_ignore_ascii_case(name))
}

fn tokens(value: &[u8]) -> impl Iterator<Item = String> + '_ {
    value
        .split(|b| *b == b',')
        .map(|t| String::from_utf8_lossy(t).trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
}

/// What ferrule knows about the client that the origin should learn from headers.
#[derive(Debug, Default, Clone, Copy)]
pub struct Forwarding<'a> {
    pub client_ip: Option<IpAddr>,
    /// Header that carries the verified client certificate subject; a client-sent header of
    /// this name is always removed.
    pub cert_header: &'a str,
    pub cert_subject: Option<&'a str>,
}

/// A parsed request head, with the head to send upstream already written.
#[derive(Debug)]
pub struct RequestHead {
    pub method: String,
    pub target: String,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor: u8,
    pub framing: Framing,
    /// The client wants the connection kept open after this exchange.
    pub keep_alive: bool,
    pub expect_continue: bool,
    /// The protocol asked for with `Upgrade` (with `Connection: upgrade`).
    pub upgrade: Option<String>,
    pub has_cookie: bool,
    pub has_authorization: bool,
    /// Bytes of the head in the client's buffer.
    pub len: usize,
    /// Request line and headers for the origin, without the final empty line.
    pub upstream: Vec<u8>,
}

impl RequestHead {
    /// Safe to retry on a fresh connection if a pooled one failed (RFC 9110, 9.2.2).
    pub fn idempotent(&self) -> bool {
        matches!(
            self.method.as_str(),
            "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"
        )
    }

    /// The query parameter names of the target.
    pub fn query_params(&self) -> impl Iterator<Item = &str> {
        let query = self.target.split_once('?').map_or("", |(_, q)| q);
        query
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| p.split('=').next().unwrap_or(p))
    }

    pub fn path(&self) -> &str {
        self.target
            .split_once('?')
            .map_or(self.target.as_str(), |(p, _)| p)
    }
}

/// Result of trying to parse a request head from the bytes received so far.
pub enum Parsed<T> {
    Complete(T),
    /// More bytes are needed.
    Partial,
}

/// Parses a request head from `buf`, enforcing `limits`, and writes its upstream form.
pub fn parse_request(
    buf: &[u8],
    limits: &Limits,
    forwarding: &Forwarding<'_>,
) -> Result<Parsed<RequestHead>, Reject> {
    // Limits on the unparsed prefix first: a request line or head that never ends must be
    // refused by size, not by waiting for the header timeout.
    let line_end = buf.windows(2).position(|w| w == b"\r\n");
    match line_end {
        None if buf.len() > limits.max_request_line_bytes => {
            return Err(reject(414, "request line too long"))
        }
        Some(end) if end > limits.max_request_line_bytes => {
            return Err(reject(414, "request line too long"))
        }
        _ => {}
    }

    let mut headers = vec![httparse::EMPTY_HEADER; limits.max_headers];
    let mut request = httparse::Request::new(&mut headers);
    let len = match request.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() > limits.max_header_bytes => {
            return Err(reject(431, "request header fields too large"))
        }
        Ok(httparse::Status::Partial) => return Ok(Parsed::Partial),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(reject(431, "too many request header fields"))
        }
        Err(_) => return Err(reject(400, "malformed request head")),
    };
    if len > limits.max_header_bytes {
        return Err(reject(431, "request header fields too large"));
    }
    let (Some(method), Some(target), Some(minor)) = (request.method, request.path, request.version)
    else {
        return Err(reject(400, "incomplete request line"));
    };

    // Framing and connection handling.
    let mut content_length: Option<u64> = None;
    let mut transfer_encoding: Vec<String> = Vec::new();
    let mut connection_tokens: Vec<String> = Vec::new();
    let mut hosts = 0;
    let mut head = RequestHead {
        method: method.to_string(),
        target: target.to_string(),
        minor,
        framing: Framing::Empty,
        keep_alive: minor == 1,
        expect_continue: false,
        upgrade: None,
        has_cookie: false,
        has_authorization: false,
        len,
        upstream: Vec::with_capacity(len + 128),
    };
    let mut upgrade_value: Option<String> = None;
    let mut forwarded_for: Option<String> = None;
    for h in request.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("content-length") {
            let value = std::str::from_utf8(h.value).ok().map(str::trim);
            let parsed = value
                .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) && v.len() <= 18)
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or(reject(400, "invalid Content-Length"))?;
            if content_length.is_some_and(|existing| existing != parsed) {
                return Err(reject(400, "conflicting Content-Length headers"));
            }
            content_length = Some(parsed);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            transfer_encoding.extend(tokens(h.value));
        } else if name.eq_ignore_ascii_case("connection") {
            connection_tokens.extend(tokens(h.value));
        } else if name.eq_ignore_ascii_case("host") {
            hosts += 1;
        } else if name.eq_ignore_ascii_case("expect") {
            if h.value.eq_ignore_ascii_case(b"100-continue") {
                head.expect_continue = true;
            } else {
                return Err(reject(417, "unsupported expectation"));
            }
        } else if name.eq_ignore_ascii_case("upgrade") {
            upgrade_value = Some(String::from_utf8_lossy(h.value).trim().to_string());
        } else if name.eq_ignore_ascii_case("cookie") {
            head.has_cookie = true;
        } else if name.eq_ignore_ascii_case("authorization") {
            head.has_authorization = true;
        } else if name.eq_ignore_ascii_case("x-forwarded-for") {
            let value = String::from_utf8_lossy(h.value).trim().to_string();
            forwarded_for = Some(match forwarded_for {
                Some(earlier) => format!("{earlier}, {value}"),
                None => value,
            });
        }
    }
    if minor == 1 && hosts != 1 {
        return Err(reject(400, "HTTP/1.1 requires exactly one Host header"));
    }
    if hosts > 1 {
        return Err(reject(400, "more than one Host header"));
    }

    head.framing = match (content_length, transfer_encoding.is_empty()) {
        (Some(_), false) => return Err(reject(400, "both Content-Length and Transfer-Encoding")),
        (_, false) => {
            // Only a final, single `chunked` is accepted: anything else leaves the body length
            // unknowable, and a proxy that guesses is a smuggling vector.
            if transfer_encoding != ["chunked"] || minor == 0 {
                return Err(reject(400, "unsupported Transfer-Encoding"));
            }
            Framing::Chunked
        }
        (Some(0), true) | (None, true) => Framing::Empty,
        (Some(n), true) => Framing::Length(n),
    };
    if connection_tokens.iter().any(|t| t == "close") {
        head.keep_alive = false;
    } else if minor == 0 && connection_tokens.iter().any(|t| t == "keep-alive") {
        head.keep_alive = true;
    }
    if connection_tokens.iter().any(|t| t == "upgrade") {
        head.upgrade = upgrade_value;
    }

    // The upstream head: request line, end-to-end headers, then ferrule's own.
    let out = &mut head.upstream;
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for h in request.headers.iter() {
        if is_hop_by_hop(h.name)
            || named_by_connection(&connection_tokens, h.name)
            || h.name.eq_ignore_ascii_case("x-forwarded-for")
            || h.name.eq_ignore_ascii_case("x-forwarded-proto")
            || (!forwarding.cert_header.is_empty()
                && h.name.eq_ignore_ascii_case(forwarding.cert_header))
        {
            continue;
        }
        out.extend_from_slice(h.name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(h.value);
        out.extend_from_slice(b"\r\n");
    }
    let mut extra = String::with_capacity(96);
    if let Some(subject) = forwarding.cert_subject {
        // Control characters cannot reach a header value: the subject comes from a verified
        // certificate, but its text is still attacker-chosen.
        let clean: String = subject.chars().filter(|c| !c.is_control()).collect();
        let _ = write!(extra, "{}: {clean}\r\n", forwarding.cert_header);
    }
    match (forwarded_for, forwarding.client_ip) {
        (Some(earlier), Some(ip)) => {
            let _ = write!(extra, "X-Forwarded-For: {earlier}, {ip}\r\n");
        }
        (None, Some(ip)) => {
            let _ = write!(extra, "X-Forwarded-For: {ip}\r\n");
        }
        (Some(earlier), None) => {
            let _ = write!(extra, "X-Forwarded-For: {earlier}\r\n");
        }
        (None, None) => {}
    }
    extra.push_str("X-Forwarded-Proto: https\r\n");
    match head.framing {
        Framing::Length(n) => {
            let _ = write!(extra, "Content-Length: {n}\r\n");
        }
        Framing::Chunked => extra.push_str("Transfer-Encoding: chunked\r\n"),
        Framing::Empty | Framing::UntilClose => {}
    }
    if let Some(protocol) = &head.upgrade {
        let _ = write!(extra, "Connection: upgrade\r\nUpgrade: {protocol}\r\n");
    }
    out.extend_from_slice(extra.as_bytes());
    Ok(Parsed::Complete(head))
}

/// A parsed response head from an origin.
#[derive(Debug)]
pub struct ResponseHead {
    pub status: u16,
    pub framing: Framing,
    /// The origin's Content-Length, kept for responses without a body (HEAD, 304) where it
    /// describes the representation rather than framing this message.
    pub content_length: Option<u64>,
    /// The origin allows the connection to carry another request.
    pub reusable: bool,
    pub len: usize,
    /// Status line and end-to-end headers for the client, without framing headers and
    /// without the final empty line.
    pub client: Vec<u8>,
}

/// Parses a response head to `request_method`. `Err` means the origin misbehaved (502).
pub fn parse_response(
    buf: &[u8],
    request_method: &str,
    max_headers: usize,
) -> Result<Parsed<ResponseHead>, &'static str> {
    let mut headers = vec![httparse::EMPTY_HEADER; max_headers];
    let mut response = httparse::Response::new(&mut headers);
    let len = match response.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(Parsed::Partial),
        Err(_) => return Err("malformed response head from origin"),
    };
    let (Some(status), Some(minor)) = (response.code, response.version) else {
        return Err("incomplete status line from origin");
    };

    let mut content_length: Option<u64> = None;
    let mut chunked = false;
    let mut other_coding = false;
    let mut connection_tokens: Vec<String> = Vec::new();
    for h in response.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            let value = std::str::from_utf8(h.value).ok().map(str::trim);
            let parsed = value
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or("invalid Content-Length from origin")?;
            if content_length.is_some_and(|c| c != parsed) {
                return Err("conflicting Content-Length from origin");
            }
            content_length = Some(parsed);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            for token in tokens(h.value) {
                chunked = token == "chunked";
                other_coding |= token != "chunked";
            }
        } else if h.name.eq_ignore_ascii_case("connection") {
            connection_tokens.extend(tokens(h.value));
        }
    }

    let bodiless =
        request_method == "HEAD" || (100..200).contains(&status) || status == 204 || status == 304;
    let framing = if bodiless {
        Framing::Empty
    } else if chunked {
        Framing::Chunked
    } else if other_coding {
        Framing::UntilClose
    } else {
        match content_length {
            Some(0) => Framing::Empty,
            Some(n) => Framing::Length(n),
            None => Framing::UntilClose,
        }
    };
    let closes = connection_tokens.iter().any(|t| t == "close")
        || (minor == 0 && !connection_tokens.iter().any(|t| t == "keep-alive"));
    let reusable = !closes && framing != Framing::UntilClose;

    let mut client = Vec::with_capacity(len + 64);
    let reason = response.reason.unwrap_or("");
    let _ = write!(VecWriter(&mut client), "HTTP/1.1 {status} {reason}\r\n");
    for h in response.headers.iter() {
        if is_hop_by_hop(h.name) || named_by_connection(&connection_tokens, h.name) {
            continue;
        }
        client.extend_from_slice(h.name.as_bytes());
        client.extend_from_slice(b": ");
        client.extend_from_slice(h.value);
        client.extend_from_slice(b"\r\n");
    }
    Ok(Parsed::Complete(ResponseHead {
        content_length: if bodiless { content_length } else { None },
        status,
        framing,
        reusable,
        len,
        client,
    }))
}

struct VecWriter<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for VecWriter<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

/// A complete response ferrule makes itself (errors, mostly).
pub fn simple_response(status: u16, reason: &str, close: bool) -> Vec<u8> {
    let body = format!("{status} {}\n", reason_phrase(status));
    let _ = reason;
    let connection = if close { "close" } else { "keep-alive" };
    format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
         Connection: {connection}\r\n\r\n{body}",
        reason_phrase(status),
        body.len()
    )
    .into_bytes()
}

pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        400 => "Bad Request",
        408 => "Request Timeout",
        413 => "Content Too Large",
        414 => "URI Too Long",
        417 => "Expectation Failed",
        425 => "Too Early",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        crate::config::Config::default().limits
    }

    fn parse(text: &str) -> Result<RequestHead, Reject> {
        let forwarding = Forwarding {
            client_ip: "192.0.2.1".parse().ok(),
            cert_header: "X-Client-Cert-Subject",
            cert_subject: None,
        };
        match parse_request(text.as_bytes(), &limits(), &forwarding)? {
            Parsed::Complete(head) => Ok(head),
            Parsed::Partial => panic!("partial"),
        }
    }

    #[test]
    fn smuggling_shapes_are_refused() {
        let both =
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(parse(both).unwrap_err().status, 400);
        let two = "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n";
        assert_eq!(parse(two).unwrap_err().status, 400);
        let gzip = "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked, x\r\n\r\n";
        assert_eq!(parse(gzip).unwrap_err().status, 400);
        let plus = "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +3\r\n\r\n";
        assert_eq!(parse(plus).unwrap_err().status, 400);
    }

    #[test]
    fn hop_by_hop_headers_are_dropped_and_forwarding_headers_added() {
        let head = parse(
            "GET /x HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, X-Secret\r\nX-Secret: 1\r\n\
             X-Forwarded-For: 10.0.0.1\r\nKeep-Alive: 5\r\nEarly-Data: 1\r\n\r\n",
        )
        .unwrap();
        let upstream = String::from_utf8(head.upstream).unwrap();
        assert!(!upstream.contains("X-Secret"));
        assert!(!upstream.contains("Keep-Alive"));
        assert!(!upstream.contains("Early-Data"));
        assert!(upstream.contains("X-Forwarded-For: 10.0.0.1, 192.0.2.1\r\n"));
        assert!(upstream.contains("X-Forwarded-Proto: https\r\n"));
    }

    #[test]
    fn oversized_heads_get_414_and_431() {
        let long_line = format!("GET /{} HTTP/1.1\r\n", "a".repeat(9000));
        assert_eq!(parse(&long_line).unwrap_err().status, 414);
        let many = format!(
            "GET / HTTP/1.1\r\nHost: a\r\n{}\r\n",
            "X-A: b\r\n".repeat(200)
        );
        assert_eq!(parse(&many).unwrap_err().status, 431);
    }

    #[test]
    fn http10_defaults_to_close() {
        assert!(!parse("GET / HTTP/1.0\r\n\r\n").unwrap().keep_alive);
        assert!(
            parse("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
                .unwrap()
                .keep_alive
        );
    }
}
