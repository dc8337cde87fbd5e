//! OCSP stapling: checking a DER OCSP response before it is served.
//!
//! ferrule staples a response read from disk (fetched by whatever the operator already uses,
//! such as `openssl ocsp` in a cron job). Before serving it, ferrule checks that it is a
//! successful response about *this* certificate (serial number) that is not past its
//! `nextUpdate`: a stale or foreign staple makes strict clients fail, which is worse than no
//! staple. Many CAs have stopped running OCSP responders, so a missing file is normal.
//!
//! Only the fields needed for those checks are read (RFC 6960, section 4.2.1), with a small
//! DER reader; the response signature is the client's to verify.

use std::time::{SystemTime, UNIX_EPOCH};

/// One DER element: its tag byte and contents.
struct Element<'a> {
    tag: u8,
    body: &'a [u8],
}

/// Reads one DER element from the front of `input`, returning it and the rest.
fn element(input: &[u8]) -> Option<(Element<'_>, &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let count = usize::from(first & 0x7f);
        if count == 0 || count > 4 || rest.len() < count {
            return None;
        }
        let len = rest[..count]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, &rest[count..])
    };
    if rest.len() < len {
        return None;
    }
    Some((
        Element {
            tag,
            body: &rest[..len],
        },
        &rest[len..],
    ))
}

/// Reads an element that must carry `tag`.
fn expect(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (e, rest) = element(input)?;
    (e.tag == tag).then_some((e.body, rest))
}

const SEQUENCE: u8 = 0x30;
const ENUMERATED: u8 = 0x0a;
const OCTET_STRING: u8 = 0x04;
const INTEGER: u8 = 0x02;
const GENERALIZED_TIME: u8 = 0x18;

/// What the checks found in a response.
#[derive(Debug, PartialEq, Eq)]
pub struct StapleInfo {
    pub serial: Vec<u8>,
    /// Seconds since the epoch.
    pub this_update: i64,
    pub next_update: Option<i64>,
    /// The certificate status is `good` (not revoked, not unknown).
    pub good: bool,
}

/// Parses the parts of an OCSPResponse that ferrule checks.
pub fn inspect(der: &[u8]) -> Result<StapleInfo, String> {
    let bad = |what: &str| format!("not a valid OCSP response ({what})");

    // OCSPResponse ::= SEQUENCE { responseStatus, responseBytes [0] EXPLICIT ... }
    let (response, _) = expect(der, SEQUENCE).ok_or_else(|| bad("outer sequence"))?;
    let (status, rest) = expect(response, ENUMERATED).ok_or_else(|| bad("status"))?;
    if status != [0] {
        return Err(format!(
            "OCSP response status is {status:?}, not successful"
        ));
    }
    let (bytes, _) = expect(rest, 0xa0).ok_or_else(|| bad("responseBytes"))?;
    let (bytes, _) = expect(bytes, SEQUENCE).ok_or_else(|| bad("responseBytes"))?;
    let (_oid, rest) = element(bytes).ok_or_else(|| bad("responseType"))?;
    let (basic, _) = expect(rest, OCTET_STRING).ok_or_else(|| bad("response"))?;

    // BasicOCSPResponse ::= SEQUENCE { tbsResponseData ResponseData, ... }
    let (basic, _) = expect(basic, SEQUENCE).ok_or_else(|| bad("basic response"))?;
    let (data, _) = expect(basic, SEQUENCE).ok_or_else(|| bad("response data"))?;
    // ResponseData ::= SEQUENCE { version [0] OPTIONAL, responderID, producedAt, responses }
    let (mut first, mut rest) = element(data).ok_or_else(|| bad("response data"))?;
    if first.tag == 0xa0 {
        (first, rest) = element(rest).ok_or_else(|| bad("responder id"))?;
    }
    let _responder = first;
    let (_produced, rest) = expect(rest, GENERALIZED_TIME).ok_or_else(|| bad("producedAt"))?;
    let (responses, _) = expect(rest, SEQUENCE).ok_or_else(|| bad("responses"))?;

    // SingleResponse ::= SEQUENCE { certID, certStatus, thisUpdate, nextUpdate [0] OPTIONAL }
    let (single, _) = expect(responses, SEQUENCE).ok_or_else(|| bad("single response"))?;
    let (cert_id, rest) = expect(single, SEQUENCE).ok_or_else(|| bad("certID"))?;
    let (_algorithm, id_rest) = element(cert_id).ok_or_else(|| bad("certID"))?;
    let (_name_hash, id_rest) = expect(id_rest, OCTET_STRING).ok_or_else(|| bad("certID"))?;
    let (_key_hash, id_rest) = expect(id_rest, OCTET_STRING).ok_or_else(|| bad("certID"))?;
    let (serial, _) = expect(id_rest, INTEGER).ok_or_else(|| bad("serial"))?;
    let (status, rest) = element(rest).ok_or_else(|| bad("certStatus"))?;
    let (this_update, rest) = expect(rest, GENERALIZED_TIME).ok_or_else(|| bad("thisUpdate"))?;
    let next_update = match expect(rest, 0xa0) {
        Some((explicit, _)) => {
            let (time, _) = expect(explicit, GENERALIZED_TIME).ok_or_else(|| bad("nextUpdate"))?;
            Some(generalized_time(time).ok_or_else(|| bad("nextUpdate"))?)
        }
        None => None,
    };
    Ok(StapleInfo {
        serial: strip_leading_zero(serial).to_vec(),
        this_update: generalized_time(this_update).ok_or_else(|| bad("thisUpdate"))?,
        next_update,
        // good is [0] IMPLICIT NULL: context tag 0, primitive.
        good: status.tag == 0x80,
    })
}

fn strip_leading_zero(serial: &[u8]) -> &[u8] {
    match serial {
        [0, rest @ ..] if !rest.is_empty() => rest,
        other => other,
    }
}

/// Parses `YYYYMMDDHHMMSS[.fff]Z` into seconds since the epoch.
fn generalized_time(text: &[u8]) -> Option<i64> {
    let text = std::str::from_utf8(text).ok()?;
    let digits = text.get(..14)?;
    if !digits.bytes().all(|b| b.is_ascii_digit()) || !text.ends_with('Z') {
        return None;
    }
    let n = |range: std::ops::Range<usize>| digits[range].parse::<i64>().ok();
    let (year, month, day) = (n(0..4)?, n(4..6)?, n(6..8)?);
    let (hour, minute, second) = (n(8..10)?, n(10..12)?, n(12..14)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    Some(days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let yoe = year - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

pub fn now_seconds() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Checks that `der` is a current, successful response for the certificate with `serial`.
pub fn check(der: &[u8], serial: &[u8]) -> Result<StapleInfo, String> {
    let info = inspect(der)?;
    if info.serial != strip_leading_zero(serial) {
        return Err("OCSP response is for another certificate (serial number differs)".into());
    }
    if let Some(next) = info.next_update {
        if next < now_seconds() {
            return Err("OCSP response is past its nextUpdate".into());
        }
    }
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generalized_times_convert_to_epoch_seconds() {
        assert_eq!(generalized_time(b"19700101000000Z"), Some(0));
        assert_eq!(generalized_time(b"20000301000000Z"), Some(951_868_800));
        assert_eq!(generalized_time(b"2000030100000Z"), None);
        assert_eq!(generalized_time(b"20001301000000Z"), None);
    }

    #[test]
    fn garbage_is_not_a_response() {
        assert!(inspect(b"").is_err());
        assert!(inspect(&[0x30, 0x82, 0xff]).is_err());
        assert!(inspect(&[0x30, 0x03, 0x0a, 0x01, 0x01]).is_err());
    }
}

// ---- fetching from the responder ------------------------------------------------------------

/// Where and what to ask for one certificate: its responder URL and a DER OCSPRequest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchPlan {
    pub url: String,
    pub request: Vec<u8>,
}

fn der(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    match body.len() {
        n if n < 0x80 => out.push(n as u8),
        n if n <= 0xff => out.extend([0x81, n as u8]),
        n => out.extend([0x82, (n >> 8) as u8, n as u8]),
    }
    out.extend_from_slice(body);
    out
}

/// Builds the OCSP request for `chain[0]` (issued by `chain[1]`) and finds its responder.
///
/// `None` when the certificate names no HTTP responder or the chain lacks its issuer.
pub fn plan(chain: &[rustls::pki_types::CertificateDer<'_>]) -> Option<FetchPlan> {
    use x509_parser::prelude::*;

    let (_, leaf) = X509Certificate::from_der(chain.first()?).ok()?;
    let (_, issuer) = X509Certificate::from_der(chain.get(1)?).ok()?;
    let url = leaf
        .extensions()
        .iter()
        .find_map(|ext| match ext.parsed_extension() {
            ParsedExtension::AuthorityInfoAccess(aia) => aia.accessdescs.iter().find_map(|d| {
                let ocsp = d.access_method.to_id_string() == "1.3.6.1.5.5.7.48.1";
                match &d.access_location {
                    GeneralName::URI(uri) if ocsp && uri.starts_with("http://") => {
                        Some(uri.to_string())
                    }
                    _ => None,
                }
            }),
            _ => None,
        })?;

    // CertID (RFC 6960, 4.1.1) with SHA-1, which every responder supports.
    let sha1 = |data: &[u8]| {
        ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, data)
            .as_ref()
            .to_vec()
    };
    let name_hash = sha1(issuer.subject().as_raw());
    let key_hash = sha1(&issuer.public_key().subject_public_key.data);
    let algorithm = der(
        0x30,
        &[
            &der(0x06, &[0x2b, 0x0e, 0x03, 0x02, 0x1a])[..],
            &[0x05, 0x00],
        ]
        .concat(),
    );
    let cert_id = der(
        0x30,
        &[
            algorithm,
            der(OCTET_STRING, &name_hash),
            der(OCTET_STRING, &key_hash),
            der(INTEGER, leaf.raw_serial()),
        ]
        .concat(),
    );
    let request = der(0x30, &der(0x30, &der(0x30, &der(0x30, &cert_id))));
    Some(FetchPlan { url, request })
}

/// POSTs `plan.request` to its responder and returns the DER response body.
pub fn fetch(plan: &FetchPlan, timeout: std::time::Duration) -> Result<Vec<u8>, String> {
    use std::io::{Read, Write};

    let rest = plan
        .url
        .strip_prefix("http://")
        .ok_or("only http:// responders")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let with_port = if authority.contains(':') {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    let address = std::net::ToSocketAddrs::to_socket_addrs(&with_port)
        .map_err(|e| format!("{}: {e}", plan.url))?
        .next()
        .ok_or_else(|| format!("{}: no address", plan.url))?;
    let mut stream = std::net::TcpStream::connect_timeout(&address, timeout)
        .map_err(|e| format!("{}: {e}", plan.url))?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    stream
        .set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    let head = format!(
        "POST {path} HTTP/1.0\r\nHost: {authority}\r\nContent-Type: application/ocsp-request\r\n\
         Content-Length: {}\r\n\r\n",
        plan.request.len()
    );
    stream
        .write_all(&[head.as_bytes(), &plan.request].concat())
        .map_err(|e| format!("{}: {e}", plan.url))?;
    let mut response = Vec::new();
    stream
        .take(1 << 20)
        .read_to_end(&mut response)
        .map_err(|e| format!("{}: {e}", plan.url))?;
    let end = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("{}: no HTTP response", plan.url))?;
    let status_line = String::from_utf8_lossy(&response[..end]);
    if status_line.split_whitespace().nth(1) != Some("200") {
        let first = status_line.lines().next().unwrap_or_default().to_string();
        return Err(format!("{}: {first}", plan.url));
    }
    Ok(response[end + 4..].to_vec())
}
