//! Which requests may be answered from TLS 1.3 early data (RFC 8470).
//!
//! Early data can be replayed by an attacker who recorded it. ferrule's single-use tickets
//! stop replays at the TLS layer, but defence in depth is cheap here: only requests that
//! would do no harm if replayed are forwarded before the handshake completes, marked with
//! `Early-Data: 1` so the origin can still answer 425. Everything else waits for the
//! handshake and is then forwarded as an ordinary request; nothing is refused for having
//! arrived early.

use super::head::RequestHead;
use crate::config::EarlyData;

/// True if `request` may be forwarded before the handshake completes.
pub fn safe_early(request: &RequestHead, policy: &EarlyData) -> bool {
    if !policy.safe_methods.contains(&request.method) {
        return false;
    }
    if request.has_authorization || (policy.deny_cookie && request.has_cookie) {
        return false;
    }
    if request.upgrade.is_some() {
        return false;
    }
    if request
        .query_params()
        .any(|p| policy.deny_query_params.iter().any(|d| d == p))
    {
        return false;
    }
    policy.allow_path_prefixes.is_empty()
        || policy
            .allow_path_prefixes
            .iter()
            .any(|prefix| request.path().starts_with(prefix.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::head::{parse_request, Parsed};

    fn request(text: &str) -> RequestHead {
        let limits = crate::config::Config::default().limits;
        match parse_request(text.as_bytes(), &limits, &Default::default()) {
            Ok(Parsed::Complete(head)) => head,
            _ => panic!("test request must parse"),
        }
    }

    fn policy() -> EarlyData {
        let mut policy = crate::config::Config::default().early_data;
        policy.deny_query_params = vec!["action".into()];
        policy.deny_cookie = true;
        policy
    }

    #[test]
    fn only_harmless_requests_go_early() {
        let p = policy();
        assert!(safe_early(
            &request("GET /a HTTP/1.1\r\nHost: x\r\n\r\n"),
            &p
        ));
        assert!(!safe_early(
            &request("POST /a HTTP/1.1\r\nHost: x\r\n\r\n"),
            &p
        ));
        assert!(!safe_early(
            &request("GET /a HTTP/1.1\r\nHost: x\r\nAuthorization: b\r\n\r\n"),
            &p
        ));
        assert!(!safe_early(
            &request("GET /a HTTP/1.1\r\nHost: x\r\nCookie: c=1\r\n\r\n"),
            &p
        ));
        assert!(!safe_early(
            &request("GET /a?x=1&action=rm HTTP/1.1\r\nHost: x\r\n\r\n"),
            &p
        ));
    }

    #[test]
    fn path_prefixes_narrow_what_goes_early() {
        let mut p = policy();
        p.allow_path_prefixes = vec!["/static/".into()];
        assert!(safe_early(
            &request("GET /static/a.css HTTP/1.1\r\nHost: x\r\n\r\n"),
            &p
        ));
        assert!(!safe_early(
            &request("GET /api HTTP/1.1\r\nHost: x\r\n\r\n"),
            &p
        ));
    }
}
