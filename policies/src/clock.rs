//! Time as the engine sees it: instants in milliseconds since the Unix epoch, RFC 3339 parsing,
//! fixed-window arithmetic (proleptic Gregorian, from year 1) and .NET TimeSpan text.

/// An instant: milliseconds since 1970-01-01T00:00:00Z (negative before it).
pub type Millis = i64;

/// 0001-01-01T00:00:00Z, the default `first-period-start` of `quota-by-key`.
pub(crate) const YEAR_ONE: Millis = -62_135_596_800_000;

/// Parses an RFC 3339 timestamp (`2026-01-05T10:00:00Z`, fractions and offsets allowed).
pub fn parse_rfc3339(text: &str) -> Option<Millis> {
    let t =
        time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).ok()?;
    i64::try_from(t.unix_timestamp_nanos().div_euclid(1_000_000)).ok()
}

/// The start of the fixed window that contains `now`, for windows of `period` ms laid end to
/// end from `origin`. A `period` of 0 is one window that never renews.
pub(crate) fn window_start(origin: Millis, period: Millis, now: Millis) -> Millis {
    if period <= 0 {
        return origin;
    }
    origin + (now - origin).div_euclid(period) * period
}

/// Whole seconds, rounded up, in a positive duration of milliseconds (at least 1 when positive).
pub(crate) fn ceil_seconds(ms: Millis) -> u64 {
    if ms <= 0 {
        0
    } else {
        (ms as u64).div_ceil(1000)
    }
}

/// The seconds of .NET's `TimeSpan.MaxValue`, used where a quota never renews.
pub(crate) const NEVER_SECONDS: u64 = 922_337_203_685;

/// .NET TimeSpan text of whole seconds: `00:08:24`, and `5.03:23:11` past a day.
pub fn format_timespan(seconds: u64) -> String {
    let days = seconds / 86_400;
    let h = (seconds / 3600) % 24;
    let m = (seconds / 60) % 60;
    let s = seconds % 60;
    if days > 0 {
        format!("{days}.{h:02}:{m:02}:{s:02}")
    } else {
        format!("{h:02}:{m:02}:{s:02}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timespan_text_matches_dotnet() {
        assert_eq!(format_timespan(504), "00:08:24");
        assert_eq!(
            format_timespan(5 * 86_400 + 3 * 3600 + 23 * 60 + 11),
            "5.03:23:11"
        );
        assert_eq!(format_timespan(0), "00:00:00");
        assert_eq!(format_timespan(NEVER_SECONDS), "10675199.02:48:05");
    }

    #[test]
    fn rfc3339_and_year_one() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:01Z"), Some(1000));
        assert_eq!(parse_rfc3339("0001-01-01T00:00:00Z"), Some(YEAR_ONE));
        assert_eq!(
            parse_rfc3339("2026-01-05T10:00:00.5+01:00"),
            Some(1_767_603_600_500)
        );
        assert_eq!(parse_rfc3339("yesterday"), None);
    }

    #[test]
    fn windows_from_year_one_do_not_align_with_the_epoch() {
        let week = 7 * 86_400_000;
        // 1970-01-01 was a Thursday; 0001-01-01 a Monday (proleptic Gregorian).
        let start = window_start(YEAR_ONE, week, 0);
        assert_eq!(start, -3 * 86_400_000);
        assert_eq!(window_start(0, week, 0), 0);
    }

    #[test]
    fn rounding_up() {
        assert_eq!(ceil_seconds(1), 1);
        assert_eq!(ceil_seconds(1000), 1);
        assert_eq!(ceil_seconds(1001), 2);
        assert_eq!(ceil_seconds(0), 0);
    }
}
