//! The responses the gateway makes on its own (SPEC §4): APIM's statuses, messages and headers.

use crate::clock::{ceil_seconds, format_timespan, Millis};
use std::borrow::Cow;
use std::fmt::{self, Arguments, Write as _};

/// A response the gateway sends instead of calling the upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalResponse {
    pub status: u16,
    /// Header names lower-case. The gateway's own names and values are not copied.
    pub headers: Vec<(Cow<'static, str>, Cow<'static, str>)>,
    pub body: String,
}

/// `{"statusCode": N, "message": "..."}` exactly. The message is the gateway's own text, written
/// as it is: any text that comes from a policy or a request goes in through [`JsonText`].
pub(crate) fn error_body(status: u16, message: Arguments<'_>) -> String {
    // Room for the gateway's own messages: a literal's length is known, a formatted one's
    // is under 100.
    let mut body = String::with_capacity(40 + message.as_str().map_or(100, str::len));
    // Writing to a String cannot fail.
    let _ = write!(
        body,
        "{{\"statusCode\": {status}, \"message\": \"{message}\"}}"
    );
    body
}

/// Text inside a JSON string, escaped as it is written.
struct JsonText<'a>(&'a str);

impl fmt::Display for JsonText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rest = self.0;
        while let Some(at) = rest.find(|c: char| c == '"' || c == '\\' || c < ' ') {
            f.write_str(&rest[..at])?;
            let c = rest.as_bytes()[at];
            match c {
                b'"' => f.write_str("\\\""),
                b'\\' => f.write_str("\\\\"),
                b'\n' => f.write_str("\\n"),
                b'\r' => f.write_str("\\r"),
                b'\t' => f.write_str("\\t"),
                c => write!(f, "\\u{c:04x}"),
            }?;
            rest = &rest[at + 1..];
        }
        f.write_str(rest)
    }
}

/// A JSON error response: `content-type`, then the `extra` header if any.
fn json(
    status: u16,
    message: Arguments<'_>,
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
        body: error_body(status, message),
    }
}

pub(crate) fn not_found() -> LocalResponse {
    json(404, format_args!("Resource not found"), None)
}

pub(crate) fn missing_key(host: &str, api_path: &str, header_name: &str) -> LocalResponse {
    json(
        401,
        format_args!("Access denied due to missing subscription key. Make sure to include subscription key when making requests to an API."),
        Some((
            Cow::Borrowed("www-authenticate"),
            Cow::Owned(format!(
                "AzureApiManagementKey realm=\"https://{host}/{api_path}\",name=\"{header_name}\",type=\"header\""
            )),
        )),
    )
}

pub(crate) fn invalid_key() -> LocalResponse {
    json(
        401,
        format_args!("Access denied due to invalid subscription key. Make sure to provide a valid key for an active subscription."),
        None,
    )
}

/// A 429, its wait in the header `retry_after_header`.
pub(crate) fn rate_limited(wait: Millis, retry_after_header: Cow<'static, str>) -> LocalResponse {
    let n = ceil_seconds(wait).max(1);
    json(
        429,
        format_args!("Rate limit is exceeded. Try again in {n} seconds."),
        Some((retry_after_header, Cow::Owned(n.to_string()))),
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
        format_args!(
            "{what}. Quota will be replenished in {}.",
            format_timespan(wait_seconds)
        ),
        Some((
            Cow::Borrowed("retry-after"),
            Cow::Owned(wait_seconds.to_string()),
        )),
    )
}

pub(crate) fn ip_forbidden(ip: &str) -> LocalResponse {
    json(
        403,
        format_args!(
            "Caller IP address {} is not allowed. Access denied.",
            JsonText(ip)
        ),
        None,
    )
}

pub(crate) fn header_check_failed(status: u16, message: &str) -> LocalResponse {
    json(status, format_args!("{}", JsonText(message)), None)
}

pub(crate) fn internal_error() -> LocalResponse {
    json(500, format_args!("Internal server error"), None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_is_exact() {
        assert_eq!(
            error_body(404, format_args!("Resource not found")),
            r#"{"statusCode": 404, "message": "Resource not found"}"#
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
