//! The log line format: `tracing-subscriber`'s default text ("full") format, with the access line
//! written directly.
//!
//! Every request ends with one `streamgate::access` event. Through the generic formatter it cost
//! about 15,000 instructions (callgrind): a `core::fmt` round trip and two no-op ANSI styles per field,
//! and a calendar date through `write!`. nginx writes its access line from cached time strings and
//! plain copies; [`LineFormat`] does the same for that one event and hands everything else (other
//! targets, events inside a span, coloured output) to the default formatter. The text is the same,
//! byte for byte: the tests format the same events both ways.

use std::fmt::{self, Write as _};
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::{Format, Full, Writer};
use tracing_subscriber::fmt::time::SystemTime as SystemTimer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// The target of the per-request access event (see [`crate::trace`]).
const ACCESS_TARGET: &str = "streamgate::access";

/// `tracing-subscriber`'s default event format, with a direct path for the access line.
#[derive(Debug, Default)]
pub(crate) struct LineFormat {
    full: Format<Full, SystemTimer>,
}

impl<S, N> FormatEvent<S, N> for LineFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        // Checked before the clock is read: other events pay nothing for the direct path.
        if meta.target() != ACCESS_TARGET
            || writer.has_ansi_escapes()
            || ctx.event_scope().is_some()
        {
            return self.full.format_event(ctx, writer, event);
        }
        let mut stamp = [0u8; 27];
        let Some(now) = timestamp(SystemTime::now(), &mut stamp) else {
            return self.full.format_event(ctx, writer, event);
        };
        writer.write_str(now)?;
        writer.write_str(match *meta.level() {
            Level::TRACE => " TRACE ",
            Level::DEBUG => " DEBUG ",
            Level::INFO => "  INFO ",
            Level::WARN => "  WARN ",
            _ => " ERROR ",
        })?;
        writer.write_str(meta.target())?;
        writer.write_str(": ")?;
        let sanitize = writer.sanitizes_ansi_escapes();
        let mut fields = Fields {
            w: &mut writer,
            sanitize,
            first: true,
            result: Ok(()),
        };
        event.record(&mut fields);
        fields.result?;
        writer.write_char('\n')
    }
}

/// `SystemTime` as `tracing-subscriber` prints it, `2026-12-02T13:03:22.400371Z`, in `buf`; `None`
/// before 1970 or after 9999 (which it prints differently).
fn timestamp(now: SystemTime, buf: &mut [u8; 27]) -> Option<&str> {
    let since = now.duration_since(UNIX_EPOCH).ok()?;
    let secs = since.as_secs();
    let (year, month, day) = civil_from_days(secs / 86_400);
    if year > 9999 {
        return None;
    }
    let tod = secs % 86_400;
    let mut put = |at: usize, v: u64, width: usize| {
        let mut v = v;
        for i in (at..at + width).rev() {
            buf[i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(0, year, 4);
    put(5, month, 2);
    put(8, day, 2);
    put(11, tod / 3600, 2);
    put(14, tod / 60 % 60, 2);
    put(17, tod % 60, 2);
    put(20, u64::from(since.subsec_micros()), 6);
    for (at, c) in [
        (4, b'-'),
        (7, b'-'),
        (10, b'T'),
        (13, b':'),
        (16, b':'),
        (19, b'.'),
    ] {
        buf[at] = c;
    }
    buf[26] = b'Z';
    std::str::from_utf8(buf).ok()
}

/// Year, month (1–12) and day (1–31) of a day count since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`, for days on or after the epoch).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

/// The fields as `tracing-subscriber`'s `DefaultVisitor` writes them without ANSI styles:
/// the message first as is, then `name=value` with values in their `Debug` form.
struct Fields<'a, 'w> {
    w: &'a mut Writer<'w>,
    sanitize: bool,
    first: bool,
    result: fmt::Result,
}

impl Fields<'_, '_> {
    /// The separator and `name=`; false when the field is not written (log metadata, an earlier error).
    fn start(&mut self, field: &Field) -> bool {
        let name = field.name();
        if self.result.is_err() || name.starts_with("log.") {
            return false;
        }
        if !std::mem::take(&mut self.first) {
            self.result = self.w.write_char(' ');
        }
        if name != "message" {
            let name = name.strip_prefix("r#").unwrap_or(name);
            self.result = self
                .result
                .and_then(|()| self.w.write_str(name))
                .and_then(|()| self.w.write_char('='));
        }
        self.result.is_ok()
    }

    fn put(&mut self, s: &str) {
        self.result = self.w.write_str(s);
    }
}

impl Visit for Fields<'_, '_> {
    fn record_u64(&mut self, field: &Field, value: u64) {
        if self.start(field) {
            let mut buf = [0u8; 20];
            self.put(decimal(value, &mut buf));
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        if self.start(field) {
            if value < 0 {
                self.put("-");
            }
            let mut buf = [0u8; 20];
            self.put(decimal(value.unsigned_abs(), &mut buf));
        }
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        if self.start(field) {
            let mut buf = [0u8; 40];
            match thousandths(value, &mut buf) {
                Some(s) => self.put(s),
                None => self.result = write!(self.w, "{value:?}"),
            }
        }
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        if self.start(field) {
            self.put(if value { "true" } else { "false" });
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            return self.record_debug(field, &format_args!("{value}"));
        }
        if self.start(field) {
            // `Debug` of a `str`: quoted and escaped. Plain text is copied as is.
            if value
                .bytes()
                .all(|b| b == b' ' || b.is_ascii_graphic() && b != b'"' && b != b'\\')
            {
                self.put("\"");
                self.put(value);
                self.put("\"");
            } else {
                self.result = write!(self.w, "{value:?}");
            }
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        if !self.start(field) {
            return;
        }
        let sanitize = self.sanitize;
        let name = field.name();
        let mut out = Escaping {
            w: &mut *self.w,
            sanitize,
        };
        self.result = write!(out, "{value}").and_then(|()| match value.source() {
            None => Ok(()),
            Some(source) => {
                write!(out.w, " {name}.sources=[")?;
                let mut next = Some(source);
                let mut first = true;
                while let Some(e) = next {
                    if !std::mem::take(&mut first) {
                        out.w.write_str(", ")?;
                    }
                    write!(out, "{e}")?;
                    next = e.source();
                }
                out.w.write_char(']')
            }
        });
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if !self.start(field) {
            return;
        }
        self.result = if field.name() == "message" {
            let mut out = Escaping {
                w: &mut *self.w,
                sanitize: self.sanitize,
            };
            write!(out, "{value:?}")
        } else {
            write!(self.w, "{value:?}")
        };
    }
}

/// A writer that escapes the control characters terminals act on, as `tracing-subscriber` does for
/// messages and errors when it sanitizes.
struct Escaping<'a, 'w> {
    w: &'a mut Writer<'w>,
    sanitize: bool,
}

impl fmt::Write for Escaping<'_, '_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        if !self.sanitize || !s.chars().any(escaped) {
            return self.w.write_str(s);
        }
        for c in s.chars() {
            match c {
                '\x1b' => self.w.write_str("\\x1b")?,
                '\x07' => self.w.write_str("\\x07")?,
                '\x08' => self.w.write_str("\\x08")?,
                '\x0c' => self.w.write_str("\\x0c")?,
                '\x7f' => self.w.write_str("\\x7f")?,
                c if escaped(c) => write!(self.w, "\\u{{{:x}}}", c as u32)?,
                c => self.w.write_char(c)?,
            }
        }
        Ok(())
    }
}

fn escaped(c: char) -> bool {
    matches!(
        c,
        '\x1b' | '\x07' | '\x08' | '\x0c' | '\x7f' | '\u{80}'..='\u{9f}'
    )
}

/// `v` in decimal, in the end of `buf`.
fn decimal(mut v: u64, buf: &mut [u8; 20]) -> &str {
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    std::str::from_utf8(&buf[at..]).unwrap_or("")
}

/// `v`'s `Debug` text when `v` is a whole number of thousandths below 10^12 (the milliseconds with
/// microseconds of the access line); `None` otherwise, for `core::fmt` to print.
///
/// For such a value the shortest decimal that reads back as `v` is `n / 1000` itself (the gap to the
/// next double is far below 0.001), so the digits are `n`'s with the trailing zeros of the fraction
/// dropped, and `.0` for a whole number, as `Debug` prints it.
fn thousandths(v: f64, buf: &mut [u8; 40]) -> Option<&str> {
    if !(0.0..1e12).contains(&v) || v.is_sign_negative() {
        return None;
    }
    let n = (v * 1000.0).round();
    if n / 1000.0 != v {
        return None;
    }
    let n = n as u64;
    let mut digits = [0u8; 20];
    let whole = decimal(n / 1000, &mut digits);
    let len = whole.len();
    buf[..len].copy_from_slice(whole.as_bytes());
    buf[len] = b'.';
    let mut frac = n % 1000;
    let mut end = len + 1;
    if frac == 0 {
        buf[end] = b'0';
        end += 1;
    } else {
        let mut width = 3;
        while frac % 10 == 0 {
            frac /= 10;
            width -= 1;
        }
        for i in (0..width).rev() {
            buf[end + i] = b'0' + (frac % 10) as u8;
            frac /= 10;
        }
        end += width;
    }
    std::str::from_utf8(&buf[..end]).ok()
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use tracing_subscriber::fmt::MakeWriter;
    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Buf {
        type Writer = Buf;
        fn make_writer(&'a self) -> Buf {
            self.clone()
        }
    }

    impl Buf {
        fn lines(&self) -> Vec<String> {
            String::from_utf8(self.0.lock().unwrap().clone())
                .unwrap()
                .lines()
                .map(str::to_owned)
                .collect()
        }
    }

    #[derive(Debug)]
    struct Failed(Option<Box<Failed>>, &'static str);

    impl fmt::Display for Failed {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.1)
        }
    }

    impl std::error::Error for Failed {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.0.as_deref().map(|e| e as _)
        }
    }

    /// The events the test formats both ways: every kind of field value, escapes included.
    fn emit() {
        let err = Failed(
            Some(Box::new(Failed(None, "refused \x1b[31m"))),
            "connect failed",
        );
        for (ttfb, total) in [
            (0.608, 0.717),
            (0.0, 1.0),
            (12.5, 30_000.0),
            (0.001, 1e11 + 0.25),
            (f64::NAN, 1e13),
            (-0.0, -2.5),
            (1e-9, 0.1 + 0.2),
        ] {
            tracing::info!(
                target: "streamgate::access",
                parent: None,
                method = %http::Method::POST,
                path = %"/v1/chat/completions",
                route = "/v1",
                status = 200u16,
                bytes = u64::MAX,
                ttfb_ms = ttfb,
                duration_ms = total,
                end_reason = "complete",
                source = "none",
                "request finished"
            );
        }
        tracing::warn!(
            target: "streamgate::access",
            parent: None,
            route = "quote \" back\\slash tab\t é \u{85}",
            delta = -42i64,
            ok = true,
            error = &err as &(dyn std::error::Error + 'static),
            "odd {} \x07 message",
            7
        );
        tracing::error!(target: "streamgate::access", parent: None, r#type = "x", "no fields but raw");
        tracing::debug!(target: "streamgate::access", parent: None, message = "message as a str \x1b");
        // Not the access line: the default formatter, in a span.
        let span = tracing::info_span!("outer", id = 3);
        span.in_scope(|| tracing::info!(target: "streamgate::access", n = 1, "inside a span"));
        tracing::info!(target: "streamgate::other", n = 1, "another target");
    }

    fn format_with(fast: bool) -> Vec<String> {
        format_by(fast.then(LineFormat::default))
    }

    fn format_by(fast: Option<LineFormat>) -> Vec<String> {
        let buf = Buf::default();
        let layer = tracing_subscriber::fmt::layer()
            .with_writer(buf.clone())
            .with_ansi(false);
        let subscriber =
            tracing_subscriber::registry().with(tracing_subscriber::filter::LevelFilter::TRACE);
        if let Some(fast) = fast {
            let s = subscriber.with(layer.event_format(fast));
            tracing::subscriber::with_default(s, emit);
        } else {
            tracing::subscriber::with_default(subscriber.with(layer), emit);
        }
        buf.lines()
    }

    #[test]
    fn lines_are_those_of_the_default_format() {
        let (fast, full) = (format_with(true), format_with(false));
        assert_eq!(fast.len(), 12, "{fast:#?}");
        assert_eq!(fast.len(), full.len());
        for (f, d) in fast.iter().zip(&full) {
            // The timestamps differ by the time between the two runs; the rest must not.
            let (tf, rf) = f.split_once(' ').unwrap();
            let (td, rd) = d.split_once(' ').unwrap();
            assert_eq!(rf, rd);
            assert_eq!(tf.len(), td.len(), "{tf} vs {td}");
            assert_eq!(tf.as_bytes()[..4], td.as_bytes()[..4]);
        }
        // Which lines took the direct path: with a fallback that prints no level, only they have one.
        let probe = format_by(Some(LineFormat {
            full: Format::default().with_level(false),
        }));
        let levels = ["TRACE", "DEBUG", "INFO", "WARN", "ERROR"];
        let direct: Vec<bool> = probe
            .iter()
            .map(|l| levels.contains(&l.split_whitespace().nth(1).unwrap()))
            .collect();
        let mut want = vec![true; 10];
        want.extend([false, false]);
        assert_eq!(direct, want, "{probe:#?}");
        assert!(fast[0].ends_with(
            "  INFO streamgate::access: request finished method=POST path=/v1/chat/completions \
             route=\"/v1\" status=200 bytes=18446744073709551615 ttfb_ms=0.608 duration_ms=0.717 \
             end_reason=\"complete\" source=\"none\""
        ));
    }

    #[test]
    fn timestamps_are_utc_with_microseconds() {
        let mut buf = [0u8; 27];
        for (secs, micros, want) in [
            (0, 0, "1970-01-01T00:00:00.000000Z"),
            (951_782_400, 7, "2000-02-29T00:00:00.000007Z"),
            (951_868_799, 999_999, "2000-02-29T23:59:59.999999Z"),
            (951_868_800, 0, "2000-03-01T00:00:00.000000Z"),
            (1_764_680_602, 400_371, "2025-12-02T13:03:22.400371Z"),
            (4_107_542_399, 1, "2100-02-28T23:59:59.000001Z"),
            (253_402_300_799, 0, "9999-12-31T23:59:59.000000Z"),
        ] {
            let t = UNIX_EPOCH + Duration::new(secs, micros * 1000);
            assert_eq!(timestamp(t, &mut buf), Some(want));
        }
        assert_eq!(
            timestamp(UNIX_EPOCH + Duration::from_secs(253_402_300_800), &mut buf),
            None
        );
        assert_eq!(
            timestamp(UNIX_EPOCH - Duration::from_secs(1), &mut buf),
            None
        );
    }

    #[test]
    fn dates_follow_the_calendar_day_by_day() {
        // Against a plain day-by-day walk through 1970..=2400.
        let (mut y, mut m, mut d) = (1970u64, 1u64, 1u64);
        for days in 0..157_000 {
            assert_eq!(civil_from_days(days), (y, m, d), "day {days}");
            let leap = y % 4 == 0 && (y % 100 != 0 || y % 400 == 0);
            let len = [
                31,
                28 + u64::from(leap),
                31,
                30,
                31,
                30,
                31,
                31,
                30,
                31,
                30,
                31,
            ];
            d += 1;
            if d > len[(m - 1) as usize] {
                d = 1;
                m += 1;
                if m > 12 {
                    m = 1;
                    y += 1;
                }
            }
        }
    }

    #[test]
    fn milliseconds_print_as_debug_does() {
        let mut buf = [0u8; 40];
        let mut checked = 0;
        let mut probe = |v: f64| {
            if let Some(s) = thousandths(v, &mut buf) {
                assert_eq!(s, format!("{v:?}"), "{v}");
                checked += 1;
            }
        };
        for n in 0..200_000u64 {
            probe(n as f64 / 1000.0);
        }
        for n in [
            999_999_999_999_999u64,
            123_456_789_012_345,
            1_000_000_000_000_001,
        ] {
            probe(n as f64 / 1000.0);
            probe((n as f64 / 1000.0 * 1e6).round() / 1e3);
        }
        let mut x = 0.001f64;
        while x < 1e12 {
            probe(x);
            probe((x * 1e6).round() / 1e3);
            x *= 1.37;
        }
        assert!(checked > 200_000, "{checked}");
        for v in [0.0001, 1e12, f64::NAN, f64::INFINITY, -1.0, -0.0, 0.1 + 0.2] {
            assert_eq!(thousandths(v, &mut buf), None, "{v}");
        }
    }
}
