//! AWS Signature Version 4 for S3 requests with the signature in the `Authorization` header
//! (pure: the caller passes the time). Only what the stage tool sends: one object per request,
//! no query string, the payload's SHA-256 known up front.

use aws_lc_rs::{digest, hmac};

/// Credentials of an S3 identity.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// Access key id.
    pub access_key_id: String,
    /// Secret access key.
    pub secret_access_key: String,
}

// Never print the secret.
impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key_id", &self.access_key_id)
            .finish_non_exhaustive()
    }
}

/// SHA-256 of `data`, lower-case hex.
pub fn sha256_hex(data: &[u8]) -> String {
    hex(digest::digest(&digest::SHA256, data).as_ref())
}

/// The SHA-256 of an empty payload.
pub const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn hmac_sha256(key: &[u8], data: &[u8]) -> Vec<u8> {
    hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), data)
        .as_ref()
        .to_vec()
}

/// An object key path-encoded as S3 wants it in the canonical request: every byte but the
/// unreserved ones and `/` as `%XX`.
pub fn encode_path(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for b in path.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// What to sign.
#[derive(Debug)]
pub struct Request<'a> {
    /// `GET`, `PUT`, `HEAD`.
    pub method: &'a str,
    /// The encoded path (`/bucket/key`, see [`encode_path`]).
    pub path: &'a str,
    /// Headers to sign besides `x-amz-date` and `x-amz-content-sha256` (which this adds), `host`
    /// among them; names in lower case.
    pub headers: &'a [(&'a str, &'a str)],
    /// Hex SHA-256 of the body ([`EMPTY_SHA256`] when there is none).
    pub payload_sha256: &'a str,
    /// Region, e.g. `us-east-1`.
    pub region: &'a str,
    /// `YYYYMMDDTHHMMSSZ`.
    pub amz_date: &'a str,
}

/// The headers to add to the request: `x-amz-date`, `x-amz-content-sha256` and `authorization`.
pub fn sign(req: &Request<'_>, creds: &Credentials) -> Vec<(String, String)> {
    let date = &req.amz_date[..8.min(req.amz_date.len())];
    let mut headers: Vec<(String, String)> = req
        .headers
        .iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    headers.push(("x-amz-content-sha256".into(), req.payload_sha256.into()));
    headers.push(("x-amz-date".into(), req.amz_date.into()));
    headers.sort();
    let canonical_headers: String = headers.iter().map(|(k, v)| format!("{k}:{v}\n")).collect();
    let signed: Vec<&str> = headers.iter().map(|(k, _)| k.as_str()).collect();
    let signed = signed.join(";");
    let canonical = format!(
        "{}\n{}\n\n{canonical_headers}\n{signed}\n{}",
        req.method, req.path, req.payload_sha256
    );
    let scope = format!("{date}/{}/s3/aws4_request", req.region);
    let to_sign = format!(
        "AWS4-HMAC-SHA256\n{}\n{scope}\n{}",
        req.amz_date,
        sha256_hex(canonical.as_bytes())
    );
    let k_date = hmac_sha256(
        format!("AWS4{}", creds.secret_access_key).as_bytes(),
        date.as_bytes(),
    );
    let k_region = hmac_sha256(&k_date, req.region.as_bytes());
    let k_service = hmac_sha256(&k_region, b"s3");
    let k_signing = hmac_sha256(&k_service, b"aws4_request");
    let signature = hex(&hmac_sha256(&k_signing, to_sign.as_bytes()));
    vec![
        ("x-amz-date".into(), req.amz_date.into()),
        ("x-amz-content-sha256".into(), req.payload_sha256.into()),
        (
            "authorization".into(),
            format!(
                "AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders={signed}, Signature={signature}",
                creds.access_key_id
            ),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    // The "GET Object" example of AWS's SigV4 documentation for S3 (header authentication).
    #[test]
    fn matches_the_aws_documentation_example() {
        let creds = Credentials {
            access_key_id: "AKIAIOSFODNN7EXAMPLE".into(),
            secret_access_key: "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY".into(),
        };
        let headers = sign(
            &Request {
                method: "GET",
                path: "/test.txt",
                headers: &[("host", "examplebucket.s3.amazonaws.com"), ("range", "bytes=0-9")],
                payload_sha256: EMPTY_SHA256,
                region: "us-east-1",
                amz_date: "20130524T000000Z",
            },
            &creds,
        );
        let auth = &headers.iter().find(|(k, _)| k == "authorization").unwrap().1;
        assert_eq!(
            auth,
            "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, \
             SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, \
             Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
        );
    }

    #[test]
    fn keys_are_percent_encoded_except_slashes() {
        assert_eq!(encode_path("/b/a dir/x+y.bin"), "/b/a%20dir/x%2By.bin");
        assert_eq!(sha256_hex(b""), EMPTY_SHA256);
    }

    #[test]
    fn credentials_do_not_print_the_secret() {
        let c = Credentials {
            access_key_id: "id".into(),
            secret_access_key: "very-secret".into(),
        };
        assert!(!format!("{c:?}").contains("very-secret"));
    }
}
