//! Service-account tokens sent with a pod: when they expire, and when to warn (pure).
//!
//! interLink 0.6.2 has no way to update a running pod's files, so a token the site received at
//! `/create` is never refreshed (docs/adr/0005). The operator records the earliest expiry of the
//! tokens it sent and warns with a `TokenExpiring` Event ahead of it.

use std::time::Duration;

use base64::Engine;

/// How long before a token expires the operator warns.
pub const WARN_BEFORE: Duration = Duration::from_secs(10 * 60);

/// The `exp` claim of a JWT (the API server's service-account tokens are JWTs); `None` for
/// anything else. The signature is not checked: the API server just issued the token.
pub fn expiry(token: &str) -> Option<jiff::Timestamp> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    jiff::Timestamp::from_second(claims.get("exp")?.as_i64()?).ok()
}

/// Whether a pod whose earliest token expires at `expires` should be warned about at `now`.
pub fn due(expires: jiff::Timestamp, now: jiff::Timestamp) -> bool {
    let lead = jiff::SignedDuration::try_from(WARN_BEFORE).unwrap_or_default();
    now >= expires - lead
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(claims: &str) -> String {
        let e = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!("{}.{}.sig", e.encode(r#"{"alg":"RS256"}"#), e.encode(claims))
    }

    #[test]
    fn the_expiry_is_read_from_the_token_s_claims() {
        let t = expiry(&jwt(
            r#"{"aud":["api"],"exp":1796300000,"sub":"system:serviceaccount:ns:default"}"#,
        ));
        assert_eq!(
            t,
            Some(jiff::Timestamp::from_second(1_796_300_000).expect("time"))
        );
        assert_eq!(expiry("not-a-jwt"), None);
        assert_eq!(expiry(&jwt(r#"{"sub":"no exp"}"#)), None);
        assert_eq!(expiry("a.!!!.c"), None);
    }

    #[test]
    fn a_warning_is_due_ten_minutes_before_the_expiry() {
        let exp: jiff::Timestamp = "2026-12-03T12:00:00Z".parse().expect("time");
        assert!(!due(exp, "2026-12-03T11:49:59Z".parse().expect("time")));
        assert!(due(exp, "2026-12-03T11:50:00Z".parse().expect("time")));
        assert!(
            due(exp, "2026-12-03T13:00:00Z".parse().expect("time")),
            "and after it"
        );
    }
}
