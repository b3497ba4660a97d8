//! Incremental Server-Sent Events boundary tracker (pure logic, no I/O).
//!
//! [`SseTracker`] watches the bytes of an event stream go by, in chunks split anywhere, and answers one
//! question: *may bytes be inserted here without changing the events a client parses?* It also counts
//! the events and lines it has seen, so the tracing layer can report them without parsing twice.
//!
//! The rules follow the [WHATWG event-stream grammar](https://html.spec.whatwg.org/multipage/server-sent-events.html#parsing-an-event-stream):
//! lines end in CRLF, LF or a lone CR; a blank line dispatches the event; a line starting with `:` is a
//! comment and is ignored by parsers. So a comment line may be inserted only
//!
//! - at the start of a line (never mid-line, which would corrupt a field), and
//! - not right after a chunk that ended in a bare CR: if the next upstream byte is the LF of a CRLF, the
//!   inserted line would turn that LF into a blank line and dispatch the event early.
//!
//! A keepalive is a single comment line (`: keepalive\n`), never followed by a blank line: some SDKs
//! dispatch an empty event on a blank line after an `id:` field. A lone comment line is ignored by every
//! conforming parser whether it falls between events or between the lines of one event.
//!
//! The same tracker serves NDJSON: there a boundary is the start of a line.
//!
//! ```
//! use streamgate::sse::SseTracker;
//!
//! let mut t = SseTracker::new();
//! t.observe(b"data: hel");
//! assert!(!t.at_boundary()); // mid-line
//! t.observe(b"lo\r");
//! assert!(!t.at_boundary()); // a CR whose LF may follow
//! t.observe(b"\n\r\n");
//! assert!(t.at_boundary());
//! assert_eq!(t.events(), 1);
//! ```

/// Incremental tracker of SSE line and event boundaries. See the [module docs](self).
///
/// It keeps a few bits of state and allocates nothing; [`observe`](Self::observe) is a single pass over
/// the chunk.
#[derive(Clone, Debug, Default)]
pub struct SseTracker {
    /// The current line has at least one byte.
    in_line: bool,
    /// The current line started with `:`.
    line_is_comment: bool,
    /// The last byte seen was a CR that may be the first half of a CRLF.
    pending_cr: bool,
    /// A non-comment line was seen since the last blank line.
    event_has_field: bool,
    events: u64,
    lines: u64,
}

impl SseTracker {
    /// A tracker at the start of a stream (which is a boundary).
    pub const fn new() -> Self {
        Self {
            in_line: false,
            line_is_comment: false,
            pending_cr: false,
            event_has_field: false,
            events: 0,
            lines: 0,
        }
    }

    /// Feed the next chunk of the stream, exactly as it is forwarded.
    pub fn observe(&mut self, chunk: &[u8]) {
        // Worked on a copy, written back once: the state stays in registers through the scans.
        let mut t = self.clone();
        let mut rest = chunk;
        while let Some((&first, tail)) = rest.split_first() {
            if t.pending_cr {
                t.pending_cr = false;
                if first == b'\n' {
                    // Second half of a CRLF: the line already ended at the CR.
                    rest = tail;
                    continue;
                }
            }
            // A line that ends at once (the blank line closing an event): no scan. Otherwise skip to
            // the next line terminator in one scan: the bytes in between are line content.
            let end = if first == b'\n' || first == b'\r' {
                0
            } else {
                if !t.in_line {
                    t.in_line = true;
                    t.line_is_comment = first == b':';
                }
                match find_eol(tail) {
                    Some(i) => i + 1,
                    None => break,
                }
            };
            t.end_line();
            t.pending_cr = rest[end] == b'\r';
            rest = &rest[end + 1..];
        }
        *self = t;
    }

    fn end_line(&mut self) {
        if self.in_line {
            self.lines += 1;
            if !self.line_is_comment {
                self.event_has_field = true;
            }
        } else if self.event_has_field {
            // A blank line after at least one field line dispatches an event.
            self.events += 1;
            self.event_has_field = false;
        }
        self.in_line = false;
        self.line_is_comment = false;
    }

    /// Whether a complete comment line (or, for NDJSON, a complete line) may be inserted now.
    pub const fn at_boundary(&self) -> bool {
        !self.in_line && !self.pending_cr
    }

    /// Whether the stream is between events: at a boundary and no field line of an unfinished event
    /// has been seen. Inserting a blank-line-terminated block is only safe here; streamgate never needs
    /// to, but embedders may.
    pub const fn between_events(&self) -> bool {
        self.at_boundary() && !self.event_has_field
    }

    /// Events dispatched so far (blank lines that ended a block with at least one field line).
    pub const fn events(&self) -> u64 {
        self.events
    }

    /// Complete non-blank lines seen so far (comments included). For NDJSON this is the record count.
    pub const fn lines(&self) -> u64 {
        self.lines
    }
}

/// The index of the first CR or LF in `s`.
///
/// memchr's SIMD search pays off from 32 bytes on. Below that it goes byte by byte at about ten
/// instructions a byte, and token-sized events (`data: {"t":"lo"}`) are short: those are searched
/// eight bytes at a time in a `u64`, with the classic test for a zero byte applied to `s ^ b'\n'` and
/// `s ^ b'\r'`. The test can flag bytes above a true zero byte (a borrow), never below one, so the
/// lowest flagged byte is the first match.
#[inline]
fn find_eol(s: &[u8]) -> Option<usize> {
    if s.len() >= 32 {
        return memchr::memchr2(b'\n', b'\r', s);
    }
    if s.len() < 8 {
        return s.iter().position(|&b| b == b'\n' || b == b'\r');
    }
    let mut words = s.chunks_exact(8);
    let mut at = 0;
    for word in &mut words {
        if let Some(i) = eol_in(word) {
            return Some(at + i);
        }
        at += 8;
    }
    if words.remainder().is_empty() {
        return None;
    }
    // The last eight bytes, overlapping the words already searched: those hold no match, and the test
    // never flags a byte below a true match, so the lowest flagged byte is still the first match.
    let from = s.len() - 8;
    eol_in(&s[from..]).map(|i| from + i)
}

/// The index of the first CR or LF in `word` (eight bytes), by the zero-byte test.
#[inline]
fn eol_in(word: &[u8]) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let w = u64::from_le_bytes(word.try_into().expect("8 bytes"));
    let lf = w ^ (ONES * u64::from(b'\n'));
    let cr = w ^ (ONES * u64::from(b'\r'));
    let zero = ((lf.wrapping_sub(ONES) & !lf) | (cr.wrapping_sub(ONES) & !cr)) & HIGH;
    (zero != 0).then(|| (zero.trailing_zeros() / 8) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn find_eol_matches_a_plain_search() {
        // Every length up to 40 (both sides of the SIMD cut-off), a CR or LF at every position, and
        // bytes that differ from them by one bit or sit right next to them (borrows, carries).
        let fillers = [b'a', 0x0B, 0x0C, 0x0E, 0x8A, 0x8D, 0x00, 0xFF, 0x09, 0x1D];
        for len in 0..=40 {
            for &fill in &fillers {
                let mut s = vec![fill; len];
                let plain = |s: &[u8]| s.iter().position(|&b| b == b'\n' || b == b'\r');
                assert_eq!(find_eol(&s), plain(&s), "len {len} fill {fill:#x}");
                for at in 0..len {
                    for eol in [b'\n', b'\r'] {
                        s[at] = eol;
                        assert_eq!(find_eol(&s), Some(at), "len {len} at {at} fill {fill:#x}");
                        // A second terminator after the first changes nothing.
                        if at + 1 < len {
                            s[len - 1] = b'\r';
                            assert_eq!(find_eol(&s), Some(at));
                            s[len - 1] = fill;
                        }
                        s[at] = fill;
                    }
                }
            }
        }
    }

    fn feed(chunks: &[&[u8]]) -> SseTracker {
        let mut t = SseTracker::new();
        for c in chunks {
            t.observe(c);
        }
        t
    }

    #[test]
    fn start_is_a_boundary() {
        assert!(SseTracker::new().at_boundary());
        assert!(SseTracker::new().between_events());
    }

    #[test]
    fn mid_line_is_not_a_boundary() {
        let t = feed(&[b"data: a"]);
        assert!(!t.at_boundary());
        let t = feed(&[b"data: a\n", b"da"]);
        assert!(!t.at_boundary());
    }

    #[test]
    fn lf_crlf_and_cr_endings_count_events() {
        assert_eq!(feed(&[b"data: a\n\n"]).events(), 1);
        assert_eq!(feed(&[b"data: a\r\n\r\n"]).events(), 1);
        assert_eq!(feed(&[b"data: a\r\r"]).events(), 1);
        assert_eq!(feed(&[b"data: a\ndata: b\n\ndata: c\n\n"]).events(), 2);
    }

    #[test]
    fn bare_cr_at_chunk_end_blocks_injection_until_next_byte() {
        let mut t = feed(&[b"data: a\r"]);
        assert!(!t.at_boundary());
        t.observe(b"\n");
        assert!(t.at_boundary());
        assert!(!t.between_events());
        t.observe(b"\r");
        assert!(!t.at_boundary());
        t.observe(b"\n");
        assert!(t.between_events());
        assert_eq!(t.events(), 1);
    }

    #[test]
    fn crlf_split_across_chunks_is_one_line_end() {
        // "a\r" + "\n" + "\r\n" is one event, not two blank lines.
        let t = feed(&[b"data: a\r", b"\n", b"\r", b"\n"]);
        assert_eq!(t.events(), 1);
        assert_eq!(t.lines(), 1);
    }

    #[test]
    fn comments_do_not_make_events() {
        let t = feed(&[b": ping\n\n", b":x\n\n"]);
        assert_eq!(t.events(), 0);
        assert_eq!(t.lines(), 2);
        let t = feed(&[b"id: 7\n", b": ping\n", b"\n"]);
        assert_eq!(t.events(), 1);
    }

    #[test]
    fn between_lines_of_one_event_is_a_boundary_but_not_between_events() {
        let t = feed(&[b"event: x\n"]);
        assert!(t.at_boundary());
        assert!(!t.between_events());
    }

    #[test]
    fn byte_by_byte_equals_whole() {
        let stream: &[u8] = b"data: a\r\ndata: b\r\n\r\n: c\nid: 1\r\rdata: {}\n\n";
        let whole = feed(&[stream]);
        let mut t = SseTracker::new();
        for b in stream {
            t.observe(std::slice::from_ref(b));
        }
        assert_eq!(t.events(), whole.events());
        assert_eq!(t.lines(), whole.lines());
        assert_eq!(whole.events(), 3);
    }
}
