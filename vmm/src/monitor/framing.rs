//! Splits a QMP client's byte stream into JSON texts, as QEMU's JSON streamer does
//! (`qobject/json-streamer.c`): QMP is a stream of JSON values with no delimiter of its own, so a
//! value ends where its outermost brace or bracket closes (or, for a bare scalar, at the next
//! whitespace or structural character), whether or not a newline follows.
//!
//! The splitter only tracks nesting and strings; the texts it returns are parsed by `serde_json`.
//! A lexical error (a control character other than tab, CR and LF, or a byte that cannot start a
//! JSON token, such as the 0xFF the QMP specification tells clients to send to reset the parser)
//! drops the value in progress and yields one error, after which parsing starts afresh: that is
//! the recovery the QMP specification ("Forcing the JSON parser into known-good state") promises.
//! A value longer than [`MAX_REQUEST_BYTES`] is not buffered: its bytes are skipped up to its end,
//! which then yields an error, so a hostile client cannot make the monitor allocate without bound.

/// The longest request text the monitor buffers (QEMU allows far more, but no QMP command that
/// this monitor offers needs more than a few hundred bytes).
pub const MAX_REQUEST_BYTES: usize = 1 << 20;

/// Why the bytes in progress do not form a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// A byte that no JSON token can contain here.
    InvalidByte(u8),
    /// A closing brace or bracket with nothing open.
    StrayClose(u8),
    /// The value was longer than [`MAX_REQUEST_BYTES`] and was skipped.
    TooLarge,
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::InvalidByte(b) => write!(f, "invalid byte 0x{b:02x}"),
            Self::StrayClose(b) => write!(f, "stray '{}'", char::from(*b)),
            Self::TooLarge => write!(f, "request larger than {MAX_REQUEST_BYTES} bytes"),
        }
    }
}

/// One unit of client input.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// The complete text of one JSON value (not yet known to be valid JSON).
    Text(Vec<u8>),
    /// Input that cannot be a request; the client gets a `GenericError` for it.
    Error(FrameError),
}

/// Incremental splitter with a bounded buffer; see the module documentation.
#[derive(Debug, Default)]
pub struct JsonStreamer {
    /// Raw input received but not yet scanned.
    pending: Vec<u8>,
    /// How much of `pending` has been scanned.
    pos: usize,
    /// The value in progress.
    token: Vec<u8>,
    /// Open braces and brackets of the value in progress.
    depth: usize,
    /// Inside a string literal.
    in_string: bool,
    /// The previous byte was a backslash inside a string.
    escape: bool,
    /// A top-level scalar (number, keyword or string) is in progress.
    scalar: bool,
    /// The value in progress outgrew the bound and is being skipped.
    skipping: bool,
}

/// Whether `b` is JSON whitespace (RFC 8259, section 2).
fn is_whitespace(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n')
}

impl JsonStreamer {
    /// Adds received bytes; call [`JsonStreamer::next_frame`] until it returns `None` before
    /// feeding more, so that unscanned input never accumulates.
    pub fn feed(&mut self, data: &[u8]) {
        if self.pos == self.pending.len() {
            self.pending.clear();
            self.pos = 0;
        }
        self.pending.extend_from_slice(data);
    }

    /// Whether input is waiting to be scanned.
    pub fn has_pending(&self) -> bool {
        self.pos < self.pending.len()
    }

    /// Ends the value in progress and returns it as a frame.
    fn finish_value(&mut self) -> Frame {
        self.depth = 0;
        self.scalar = false;
        self.in_string = false;
        self.escape = false;
        let text = std::mem::take(&mut self.token);
        if std::mem::take(&mut self.skipping) {
            Frame::Error(FrameError::TooLarge)
        } else {
            Frame::Text(text)
        }
    }

    /// Drops the value in progress after a lexical error.
    fn fail(&mut self, error: FrameError) -> Frame {
        self.token.clear();
        self.depth = 0;
        self.scalar = false;
        self.in_string = false;
        self.escape = false;
        self.skipping = false;
        Frame::Error(error)
    }

    /// Appends a byte of the value in progress, or starts skipping once it outgrows the bound.
    fn push(&mut self, b: u8) {
        if self.skipping {
            return;
        }
        if self.token.len() >= MAX_REQUEST_BYTES {
            self.skipping = true;
            self.token = Vec::new();
        } else {
            self.token.push(b);
        }
    }

    /// Scans pending input up to the end of the next frame.
    pub fn next_frame(&mut self) -> Option<Frame> {
        while let Some(&b) = self.pending.get(self.pos) {
            self.pos += 1;
            if self.in_string {
                // Control characters are invalid in strings, and 0xFE/0xFF anywhere in UTF-8.
                if !(0x20..0xfe).contains(&b) {
                    return Some(self.fail(FrameError::InvalidByte(b)));
                }
                self.push(b);
                if self.escape {
                    self.escape = false;
                } else if b == b'\\' {
                    self.escape = true;
                } else if b == b'"' {
                    self.in_string = false;
                    if self.depth == 0 {
                        return Some(self.finish_value());
                    }
                }
                continue;
            }
            let structural = matches!(b, b'{' | b'[' | b'}' | b']' | b'"' | b':' | b',');
            if self.scalar && (is_whitespace(b) || structural) {
                // A top-level number or keyword ends here; this byte starts the next value.
                self.pos -= 1;
                return Some(self.finish_value());
            }
            if is_whitespace(b) {
                if self.depth > 0 {
                    self.push(b);
                }
                continue;
            }
            // Outside strings JSON text is ASCII; anything else is a lexical error.
            if !(0x20..0x7f).contains(&b) {
                return Some(self.fail(FrameError::InvalidByte(b)));
            }
            match b {
                b'{' | b'[' => {
                    self.depth += 1;
                    self.push(b);
                }
                b'}' | b']' => {
                    if self.depth == 0 {
                        return Some(self.fail(FrameError::StrayClose(b)));
                    }
                    self.depth -= 1;
                    self.push(b);
                    if self.depth == 0 {
                        return Some(self.finish_value());
                    }
                }
                b'"' => {
                    self.in_string = true;
                    self.push(b);
                }
                _ => {
                    if self.depth == 0 {
                        self.scalar = true;
                    }
                    self.push(b);
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(input: &[u8]) -> Vec<Frame> {
        let mut s = JsonStreamer::default();
        s.feed(input);
        std::iter::from_fn(|| s.next_frame()).collect()
    }

    fn text(s: &str) -> Frame {
        Frame::Text(s.as_bytes().to_vec())
    }

    #[test]
    fn values_end_at_their_closing_brace_without_newline() {
        assert_eq!(
            frames(br#"{"execute":"a"}{"execute":"b"}  [1, {"x": "}"}]"#),
            vec![
                text(r#"{"execute":"a"}"#),
                text(r#"{"execute":"b"}"#),
                text(r#"[1, {"x": "}"}]"#)
            ]
        );
    }

    #[test]
    fn split_across_reads() {
        let mut s = JsonStreamer::default();
        s.feed(br#"{"execute": "qu"#);
        assert_eq!(s.next_frame(), None);
        s.feed(br#"ery-status", "id": "a\"}"}"#);
        assert_eq!(
            s.next_frame(),
            Some(text(r#"{"execute": "query-status", "id": "a\"}"}"#))
        );
        assert_eq!(s.next_frame(), None);
        assert!(!s.has_pending());
    }

    #[test]
    fn top_level_scalars_are_values() {
        assert_eq!(
            frames(b"42 true\"s\"{}"),
            vec![text("42"), text("true"), text("\"s\""), text("{}")]
        );
        // A scalar without a delimiter after it waits for more input.
        assert_eq!(frames(b"42"), vec![]);
    }

    #[test]
    fn lexical_errors_reset_the_parser() {
        // 0xFF inside a string still resets (it is never valid UTF-8), as the QMP spec relies on.
        assert_eq!(
            frames(b"{\"execute\": \"st\xff{}"),
            vec![Frame::Error(FrameError::InvalidByte(0xff)), text("{}")]
        );
        assert_eq!(
            frames(b"{\"execute\": \xff {\"execute\": \"x\"}"),
            vec![
                Frame::Error(FrameError::InvalidByte(0xff)),
                text("{\"execute\": \"x\"}")
            ]
        );
        assert_eq!(
            frames(b"{\"a\x01}{}"),
            vec![
                Frame::Error(FrameError::InvalidByte(1)),
                Frame::Error(FrameError::StrayClose(b'}')),
                text("{}")
            ]
        );
        assert_eq!(
            frames(b"]{}"),
            vec![Frame::Error(FrameError::StrayClose(b']')), text("{}")]
        );
    }

    #[test]
    fn oversized_values_are_skipped_not_buffered() {
        let mut big = b"{\"execute\": \"".to_vec();
        big.extend(std::iter::repeat_n(b'a', MAX_REQUEST_BYTES + 10));
        big.extend_from_slice(b"\"}{\"execute\": \"ok\"}");
        let mut s = JsonStreamer::default();
        s.feed(&big);
        assert_eq!(s.next_frame(), Some(Frame::Error(FrameError::TooLarge)));
        assert!(s.token.capacity() <= MAX_REQUEST_BYTES);
        assert_eq!(s.next_frame(), Some(text("{\"execute\": \"ok\"}")));
    }

    #[test]
    fn error_text() {
        assert_eq!(FrameError::StrayClose(b'}').to_string(), "stray '}'");
        assert_eq!(
            FrameError::InvalidByte(0xff).to_string(),
            "invalid byte 0xff"
        );
    }
}
