//! The responses the gateway makes on its own (SPEC §4): APIM's statuses, messages and headers.

use crate::clock::{ceil_seconds, format_timespan, Millis};
use std::borrow::Cow;

/// A response the gateway sends instead of calling the upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalResponse {
    pub status: u16,
    /// Header names lower-case. The gateway's own names and values are not copied.
    pub headers: Vec<(Cow<'static, str>, Cow<'static, str>)>,
    pub body: String,
}

/// The body of a JSON error, `{"statusCode": N, "message": "..."}` exactly, written piece by
/// piece with no formatting machinery: a busy edge sends 401s and 429s by the thousand.
struct Body(String);

impl Body {
    /// A body whose message has about `message_len` bytes.
    fn new(status: u16, message_len: usize) -> Self {
        let mut body = String::with_capacity(40 + message_len);
        body.push_str("{\"statusCode\": ");
        body.push_str(itoa::Buffer::new().format(status));
        body.push_str(", \"message\": \"");
        Body(body)
    }

    /// The gateway's own text, written as it is (it has nothing to escape).
    fn text(mut self, text: &str) -> Self {
        self.0.push_str(text);
        self
    }

    fn number(mut self, n: u64) -> Self {
        self.0.push_str(itoa::Buffer::new().format(n));
        self
    }

    /// Text from a policy or a request, escaped for a JSON string.
    fn escaped(mut self, text: &str) -> Self {
        let mut rest = text;
        while let Some(at) = rest.find(|c: char| c == '"' || c == '\\' || c < ' ') {
            self.0.push_str(&rest[..at]);
            match rest.as_bytes()[at] {
                b'"' => self.0.push_str("\\\""),
                b'\\' => self.0.push_str("\\\\"),
                b'\n' => self.0.push_str("\\n"),
                b'\r' => self.0.push_str("\\r"),
                b'\t' => self.0.push_str("\\t"),
                c => {
                    const HEX: &[u8; 16] = b"0123456789abcdef";
                    self.0.push_str("\\u00");
                    self.0.push(char::from(HEX[usize::from(c >> 4)]));
                    self.0.push(char::from(HEX[usize::from(c & 0xf)]));
                }
            }
            rest = &rest[at + 1..];
        }
        self.0.push_str(rest);
        self
    }

    fn end(mut self) -> String {
        self.0.push_str("\"}");
        self.0
    }
}

/// A JSON error response: `content-type`, then the `extra` header if any.
fn json(
    status: u16,
    body: String,
    extra: Option<(Cow<'static, str>, Cow<'static, str>)>,
) -> LocalResponse {
    let mut headers = Vec::with_capacity(2);
    headers.push((
        Cow::Borrowed("content-type"),
        Cow::Borrowed("application/json"),
    ));
    headers.extend(extra);
    LocalResponse {
        status,
        headers,
        body,
    }
}

/// A JSON error response whose message is all the gateway's own text.
fn plain(
    status: u16,
    message: &str,
    extra: Option<(Cow<'static, str>, Cow<'static, str>)>,
) -> LocalResponse {
    json(
        status,
        Body::new(status, message.len()).text(message).end(),
        extra,
    )
}

/// A number as a header value.
pub(crate) fn number_text(n: u64) -> Cow<'static, str> {
    Cow::Owned(itoa::Buffer::new().format(n).to_owned())
}

pub(crate) fn not_found() -> LocalResponse {
    plain(404, "Resource not found", None)
}

pub(crate) fn missing_key(host: &str, api_path: &str, header_name: &str) -> LocalResponse {
    plain(
        401,
        "Access denied due to missing subscription key. Make sure to include subscription key when making requests to an API.",
        Some((
            Cow::Borrowed("www-authenticate"),
            Cow::Owned(format!(
                "AzureApiManagementKey realm=\"https://{host}/{api_path}\",name=\"{header_name}\",type=\"header\""
            )),
        )),
    )
}

pub(crate) fn invalid_key() -> LocalResponse {
    plain(
        401,
        "Access denied due to invalid subscription key. Make sure to provide a valid key for an active subscription.",
        None,
    )
}

/// A 429, its wait in the header `retry_after_header`.
pub(crate) fn rate_limited(wait: Millis, retry_after_header: Cow<'static, str>) -> LocalResponse {
    let n = ceil_seconds(wait).max(1);
    json(
        429,
        Body::new(429, 60)
            .text("Rate limit is exceeded. Try again in ")
            .number(n)
            .text(" seconds.")
            .end(),
        Some((retry_after_header, number_text(n))),
    )
}

/// Seconds until a quota renews; `None` for a quota that never renews.
pub(crate) fn quota_exceeded(bandwidth: bool, wait_seconds: u64) -> LocalResponse {
    let what = if bandwidth {
        "Out of bandwidth quota"
    } else {
        "Out of call volume quota"
    };
    json(
        403,
        Body::new(403, 80)
            .text(what)
            .text(". Quota will be replenished in ")
            .text(&format_timespan(wait_seconds))
            .text(".")
            .end(),
        Some((Cow::Borrowed("retry-after"), number_text(wait_seconds))),
    )
}

pub(crate) fn ip_forbidden(ip: &str) -> LocalResponse {
    json(
        403,
        Body::new(403, 60)
            .text("Caller IP address ")
            .escaped(ip)
            .text(" is not allowed. Access denied.")
            .end(),
        None,
    )
}

pub(crate) fn header_check_failed(status: u16, message: &str) -> LocalResponse {
    json(
        status,
        Body::new(status, message.len()).escaped(message).end(),
        None,
    )
}

/// `validate-jwt` refused the call: the policy's status and message.
pub(crate) fn jwt_invalid(status: u16, message: &str) -> LocalResponse {
    header_check_failed(status, message)
}

/// An empty 200 with `headers`: a CORS preflight's answer, or the end of a cross-origin call
/// a `cors` does not allow.
pub(crate) fn empty_ok(headers: Vec<(Cow<'static, str>, Cow<'static, str>)>) -> LocalResponse {
    LocalResponse {
        status: 200,
        headers,
        body: String::new(),
    }
}

pub(crate) fn internal_error() -> LocalResponse {
    plain(500, "Internal server error", None)
}

/// Shared counters could not be reached, under `onUnavailable: "deny"` (SPEC §7).
pub(crate) fn counters_unavailable() -> LocalResponse {
    plain(503, "Service Unavailable", None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_is_exact() {
        assert_eq!(
            counters_unavailable().body,
            r#"{"statusCode": 503, "message": "Service Unavailable"}"#
        );
        assert_eq!(
            not_found().body,
            r#"{"statusCode": 404, "message": "Resource not found"}"#
        );
        assert_eq!(
            quota_exceeded(false, 504).body,
            r#"{"statusCode": 403, "message": "Out of call volume quota. Quota will be replenished in 00:08:24."}"#
        );
        assert_eq!(
            ip_forbidden("2001:db8::1").body,
            r#"{"statusCode": 403, "message": "Caller IP address 2001:db8::1 is not allowed. Access denied."}"#
        );
    }

    #[test]
    fn a_policy_message_is_escaped() {
        let r = header_check_failed(400, "a \"b\" \\ c\n\r\t\u{1}é");
        assert_eq!(r.status, 400);
        assert_eq!(
            r.body,
            r#"{"statusCode": 400, "message": "a \"b\" \\ c\n\r\t\u0001é"}"#
        );
        let parsed: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(parsed["message"], "a \"b\" \\ c\n\r\t\u{1}é");
    }

    #[test]
    fn rate_limit_rounds_up() {
        let r = rate_limited(59_001, Cow::Borrowed("retry-after"));
        assert_eq!(r.status, 429);
        assert_eq!(
            r.body,
            r#"{"statusCode": 429, "message": "Rate limit is exceeded. Try again in 60 seconds."}"#
        );
        assert_eq!(r.headers[1], ("retry-after".into(), "60".into()));
        // A renamed header keeps its name.
        let r = rate_limited(1, Cow::Owned("x-retry-in".to_string()));
        assert_eq!(r.headers[1], ("x-retry-in".into(), "1".into()));
    }
}
