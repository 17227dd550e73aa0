//! Turns a QMP client's byte stream into JSON values, with the rules and the error replies of
//! QEMU's JSON lexer, streamer and parser (`qobject/json-lexer.c`, `json-streamer.c`,
//! `json-parser.c`), so that a client sees the same replies, in number and wording, as from QEMU.
//!
//! QMP is a stream of JSON values with no delimiter of its own. The lexer cuts the bytes into
//! tokens; the streamer collects tokens until the braces and brackets opened balance (a scalar
//! alone is a whole value), or until a closing one has nothing to close, and then hands them to
//! the parser ([`super::json`]). What QEMU's grammar allows beyond RFC 8259 is allowed here too
//! (single-quoted strings, `\'` in strings); what it forbids is refused (a tab inside a string,
//! `01`, `1.`).
//!
//! Errors, each answered with one `GenericError` and no `id`:
//! - a lexical error (a byte that cannot continue the token in progress, such as a control
//!   character in a string or the 0xFF the QMP specification tells clients to send to reset the
//!   parser) drops the value in progress; the bytes after it are then skipped up to the next
//!   structural character (`{}[]:,`), control character other than tab, or 0xFE/0xFF, where
//!   lexing resumes: one error per bad request, not one per bad byte;
//! - a value nested deeper than [`MAX_NESTING`] is dropped when its next opening brace or bracket
//!   arrives, and the tokens after it start afresh (QEMU's "JSON nesting depth limit exceeded");
//! - a value that would take more than [`MAX_REQUEST_BYTES`] to hold is not buffered: its tokens
//!   are skipped up to its end, which then yields one error, so a hostile client cannot make the
//!   monitor allocate without bound (QEMU allows 64 MiB; no command here needs a kilobyte);
//! - a syntax error, or a duplicate key in an object, is reported by the parser.

use serde_json::Value;

use super::json::{self, Token};

/// The most bytes a request in progress may take (its tokens' text plus their bookkeeping).
pub const MAX_REQUEST_BYTES: usize = 1 << 20;

/// The deepest nesting of objects and arrays accepted, QEMU's limit.
pub const MAX_NESTING: usize = 1024;

/// What each token costs against [`MAX_REQUEST_BYTES`] besides its text.
const TOKEN_OVERHEAD: usize = std::mem::size_of::<Token>();

/// Why the bytes in progress do not form a request; the `Display` text is QEMU's error text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// A byte that no JSON token can contain here; the token up to and including it.
    Stray(Vec<u8>),
    /// The tokens do not form a JSON value, in QEMU's parser's words.
    Syntax(String),
    /// Nested deeper than [`MAX_NESTING`].
    TooDeep,
    /// The value outgrew [`MAX_REQUEST_BYTES`] and was skipped.
    TooLarge,
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Stray(token) => {
                // QEMU prints the token as a C string: it ends at a NUL byte.
                let end = token.iter().position(|&b| b == 0).unwrap_or(token.len());
                let text = json::lossy(token.get(..end).unwrap_or_default());
                write!(f, "JSON parse error, stray '{text}'")
            }
            Self::Syntax(what) => write!(f, "JSON parse error, {what}"),
            Self::TooDeep => f.write_str("JSON nesting depth limit exceeded"),
            Self::TooLarge => f.write_str("JSON token size limit exceeded"),
        }
    }
}

/// One unit of client input.
#[derive(Debug, PartialEq)]
pub enum Frame {
    /// A complete JSON value (not yet known to be a valid request).
    Value(Value),
    /// Input that cannot be a request; the client gets a `GenericError` for it.
    Error(FrameError),
}

/// Where the lexer is within a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum State {
    /// Between tokens.
    #[default]
    Start,
    /// After a lexical error: skipping to a point where lexing can resume.
    Recovery,
    /// In a string delimited by `quote`; `escape` right after a backslash.
    Str { quote: u8, escape: bool },
    /// After a leading `-`.
    Sign,
    /// After a leading `0`.
    Zero,
    /// In the integer digits.
    Digits,
    /// After the decimal point, before a digit.
    Dot,
    /// In the fraction digits.
    Fraction,
    /// After `e` or `E`.
    Exp,
    /// After the exponent's sign.
    ExpSign,
    /// In the exponent digits.
    ExpDigits,
    /// In a keyword (`true`, `false`, `null`, or a misspelling of one).
    Keyword,
}

/// What the lexer does with a byte.
enum Step {
    /// The byte belongs to the token in progress.
    Consume(State),
    /// The byte ends a token of this kind (including it when `consumed`).
    Emit { kind: Kind, consumed: bool },
    /// Whitespace between tokens.
    Skip,
    /// A lexical error, the byte included in the token.
    Error,
}

/// The kind of a token, before its text is attached.
enum Kind {
    Punct(Token),
    Str,
    Int,
    Float,
    Keyword,
}

/// The lexer's transition from `state` on byte `b`.
fn step(state: State, b: u8) -> Step {
    let digit = b.is_ascii_digit();
    let end = |kind| Step::Emit {
        kind,
        consumed: false,
    };
    match state {
        State::Start | State::Recovery => match b {
            b' ' | b'\t' | b'\r' | b'\n' => Step::Skip,
            b'{' => punct(Token::LCurly),
            b'}' => punct(Token::RCurly),
            b'[' => punct(Token::LSquare),
            b']' => punct(Token::RSquare),
            b':' => punct(Token::Colon),
            b',' => punct(Token::Comma),
            b'"' | b'\'' => Step::Consume(State::Str {
                quote: b,
                escape: false,
            }),
            b'-' => Step::Consume(State::Sign),
            b'0' => Step::Consume(State::Zero),
            b'1'..=b'9' => Step::Consume(State::Digits),
            b'a'..=b'z' => Step::Consume(State::Keyword),
            _ => Step::Error,
        },
        State::Str { quote, escape } => match b {
            // Control characters (tab included) and bytes that never occur in UTF-8.
            0..=0x1f | 0xfe | 0xff => Step::Error,
            _ if escape => Step::Consume(State::Str {
                quote,
                escape: false,
            }),
            b'\\' => Step::Consume(State::Str {
                quote,
                escape: true,
            }),
            _ if b == quote => Step::Emit {
                kind: Kind::Str,
                consumed: true,
            },
            _ => Step::Consume(state),
        },
        State::Sign => match b {
            b'0' => Step::Consume(State::Zero),
            b'1'..=b'9' => Step::Consume(State::Digits),
            _ => Step::Error,
        },
        // QEMU's lexer takes no exponent right after a lone zero: `0e5` is `0`, then `e5`.
        State::Zero => match b {
            b'.' => Step::Consume(State::Dot),
            // No leading zeros.
            _ if digit => Step::Error,
            _ => end(Kind::Int),
        },
        State::Digits => match b {
            b'.' => Step::Consume(State::Dot),
            b'e' | b'E' => Step::Consume(State::Exp),
            _ if digit => Step::Consume(State::Digits),
            _ => end(Kind::Int),
        },
        State::Dot => match b {
            _ if digit => Step::Consume(State::Fraction),
            _ => Step::Error,
        },
        State::Fraction => match b {
            b'e' | b'E' => Step::Consume(State::Exp),
            _ if digit => Step::Consume(State::Fraction),
            _ => end(Kind::Float),
        },
        State::Exp => match b {
            b'+' | b'-' => Step::Consume(State::ExpSign),
            _ if digit => Step::Consume(State::ExpDigits),
            _ => Step::Error,
        },
        State::ExpSign => match b {
            _ if digit => Step::Consume(State::ExpDigits),
            _ => Step::Error,
        },
        State::ExpDigits => match b {
            _ if digit => Step::Consume(State::ExpDigits),
            _ => end(Kind::Float),
        },
        State::Keyword => match b {
            b'a'..=b'z' => Step::Consume(State::Keyword),
            _ => end(Kind::Keyword),
        },
    }
}

/// A one-byte token.
fn punct(token: Token) -> Step {
    Step::Emit {
        kind: Kind::Punct(token),
        consumed: true,
    }
}

/// Where lexing resumes after an error: structural characters, control characters other than
/// tab, and the bytes that never occur in UTF-8 (a client's reset).
fn resumes_lexing(b: u8) -> bool {
    matches!(b, b'{' | b'}' | b'[' | b']' | b':' | b',' | 0xfe | 0xff) || (b < 0x20 && b != b'\t')
}

/// Incremental lexer and streamer with a bounded buffer; see the module documentation.
#[derive(Debug, Default)]
pub struct JsonStreamer {
    /// Raw input received but not yet scanned.
    pending: Vec<u8>,
    /// How much of `pending` has been scanned.
    pos: usize,
    /// The lexer's state.
    state: State,
    /// The text of the token in progress.
    token: Vec<u8>,
    /// The tokens of the value in progress.
    tokens: Vec<Token>,
    /// What the value in progress takes, counted against [`MAX_REQUEST_BYTES`].
    size: usize,
    /// Open braces of the value in progress, minus closed ones.
    braces: isize,
    /// Open brackets of the value in progress, minus closed ones.
    brackets: isize,
    /// The value in progress outgrew the bound: its tokens are dropped until it ends.
    skipping: bool,
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

    /// Forgets the value in progress (not the lexer's state).
    fn reset_value(&mut self) {
        self.tokens = Vec::new();
        self.size = 0;
        self.braces = 0;
        self.brackets = 0;
        self.skipping = false;
    }

    /// Counts `bytes` against the bound; past it, the value in progress is skipped.
    fn charge(&mut self, bytes: usize) {
        self.size = self.size.saturating_add(bytes);
        if self.size > MAX_REQUEST_BYTES && !self.skipping {
            self.skipping = true;
            self.tokens = Vec::new();
            self.token = Vec::new();
        }
    }

    /// Takes one byte into the token in progress.
    fn push(&mut self, b: u8) {
        self.charge(1);
        if !self.skipping {
            self.token.push(b);
        }
    }

    /// Hands a finished token to the streamer; returns a frame when it ends a value.
    fn add_token(&mut self, token: Token) -> Option<Frame> {
        match token {
            Token::LCurly => self.braces += 1,
            Token::RCurly => self.braces -= 1,
            Token::LSquare => self.brackets += 1,
            Token::RSquare => self.brackets -= 1,
            _ => {}
        }
        self.charge(TOKEN_OVERHEAD);
        let depth = self.braces.saturating_add(self.brackets);
        if usize::try_from(depth).is_ok_and(|d| d > MAX_NESTING) {
            self.reset_value();
            return Some(Frame::Error(FrameError::TooDeep));
        }
        if !self.skipping {
            self.tokens.push(token);
        }
        let open = self.braces > 0 || self.brackets > 0;
        if open && self.braces >= 0 && self.brackets >= 0 {
            return None;
        }
        // Balanced, or a closing brace or bracket without its opening one: parse what there is.
        let frame = if self.skipping {
            Frame::Error(FrameError::TooLarge)
        } else {
            match json::parse(&self.tokens) {
                Ok(value) => Frame::Value(value),
                Err(e) => Frame::Error(e),
            }
        };
        self.reset_value();
        Some(frame)
    }

    /// Scans pending input up to the end of the next frame.
    pub fn next_frame(&mut self) -> Option<Frame> {
        while let Some(&b) = self.pending.get(self.pos) {
            if self.state == State::Recovery && !resumes_lexing(b) {
                self.pos += 1;
                continue;
            }
            match step(self.state, b) {
                Step::Skip => {
                    self.pos += 1;
                    self.state = State::Start;
                }
                Step::Consume(next) => {
                    self.pos += 1;
                    self.push(b);
                    self.state = next;
                }
                Step::Error => {
                    self.pos += 1;
                    self.push(b);
                    let token = std::mem::take(&mut self.token);
                    self.state = State::Recovery;
                    self.reset_value();
                    return Some(Frame::Error(FrameError::Stray(token)));
                }
                Step::Emit { kind, consumed } => {
                    if consumed {
                        self.pos += 1;
                        self.push(b);
                    }
                    self.state = State::Start;
                    let text = std::mem::take(&mut self.token);
                    let token = match kind {
                        Kind::Punct(token) => token,
                        Kind::Str => Token::Str(text),
                        Kind::Int => Token::Int(text),
                        Kind::Float => Token::Float(text),
                        Kind::Keyword => Token::Keyword(text),
                    };
                    if let Some(frame) = self.add_token(token) {
                        return Some(frame);
                    }
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn frames(input: &[u8]) -> Vec<Frame> {
        let mut s = JsonStreamer::default();
        s.feed(input);
        std::iter::from_fn(|| s.next_frame()).collect()
    }

    /// The reply texts of `input`'s frames: values as JSON, errors as their description.
    fn texts(input: &[u8]) -> Vec<String> {
        frames(input)
            .into_iter()
            .map(|f| match f {
                Frame::Value(v) => v.to_string(),
                Frame::Error(e) => e.to_string(),
            })
            .collect()
    }

    #[test]
    fn values_end_at_their_closing_brace_without_newline() {
        assert_eq!(
            frames(br#"{"execute":"a"}{"execute":"b"}  [1, {"x": "}"}]"#),
            vec![
                Frame::Value(json!({"execute": "a"})),
                Frame::Value(json!({"execute": "b"})),
                Frame::Value(json!([1, {"x": "}"}])),
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
            Some(Frame::Value(
                json!({"execute": "query-status", "id": "a\"}"})
            ))
        );
        assert_eq!(s.next_frame(), None);
        assert!(!s.has_pending());
    }

    #[test]
    fn top_level_scalars_are_values() {
        assert_eq!(
            texts(b"42 true\"s\"'q'{}-1.5e3 "),
            ["42", "true", "\"s\"", "\"q\"", "{}", "-1500.0"]
        );
        // A number without a delimiter after it waits for more input.
        assert!(frames(b"42").is_empty());
    }

    #[test]
    fn lexical_errors_skip_to_a_resynchronisation_point() {
        // 0xFF inside a string resets (it is never valid UTF-8), as the QMP spec relies on.
        assert_eq!(
            texts(b"{\"execute\": \"st\xff{}"),
            ["JSON parse error, stray '\"st\u{fffd}'", "{}"]
        );
        // One error for a run of bad bytes, and the rest of the bad request is skipped up to a
        // structural character.
        assert_eq!(
            texts(b"\x80\x81\x82 abc {}"),
            ["JSON parse error, stray '\u{fffd}'", "{}"]
        );
        assert_eq!(
            texts(b"{\"a\x01}{}"),
            [
                "JSON parse error, stray '\"a\u{1}'",
                "JSON parse error, expecting value",
                "{}"
            ]
        );
        // A reset byte always yields its own error, even while skipping.
        assert_eq!(
            texts(b"\x80\xff{}"),
            [
                "JSON parse error, stray '\u{fffd}'",
                "JSON parse error, stray '\u{fffd}'",
                "{}"
            ]
        );
        // Numbers as QEMU's lexer takes them; a tab is not allowed inside a string.
        for (input, error) in [
            (&b"01\n"[..], "01"),
            (b"1.\n", "1.\n"),
            (b"-x\n", "-x"),
            (b"1e+}", "1e+}"),
            (b"\"a\tb\"\n", "\"a\t"),
            (b"%d\n", "%"),
        ] {
            assert_eq!(
                texts(input),
                [format!("JSON parse error, stray '{error}'")],
                "{input:?}"
            );
        }
        // After a lone zero an `e` starts a keyword, not an exponent.
        assert_eq!(
            texts(b"0e5\n"),
            ["0", "JSON parse error, invalid keyword 'e'", "5"]
        );
        // Invalid UTF-8 in the stray text shows as U+FFFD, one per invalid sequence, as QEMU's
        // JSON writer shows it (a noncharacter is invalid too).
        assert_eq!(
            texts(b"'\xef\xbf\xbe\x80\xc3\xa9\xff"),
            ["JSON parse error, stray ''\u{fffd}\u{fffd}\u{e9}\u{fffd}'"]
        );
        // A NUL ends the token's text, as in QEMU's C string.
        assert_eq!(texts(b"\x00{}"), ["JSON parse error, stray ''", "{}"]);
        assert_eq!(
            texts(b"1a "),
            ["1", "JSON parse error, invalid keyword 'a'"]
        );
    }

    #[test]
    fn unmatched_closers_end_a_value() {
        assert_eq!(texts(b"]{}"), ["JSON parse error, expecting value", "{}"]);
        assert_eq!(texts(b"{]"), ["JSON parse error, expecting value"]);
        assert_eq!(
            texts(b"{\"a\": 1]"),
            ["JSON parse error, expected separator in dict"]
        );
    }

    #[test]
    fn nesting_is_limited_to_qemus_depth() {
        let deep = |n: usize| {
            let mut v = b"[".repeat(n);
            v.extend(b"]".repeat(n));
            v
        };
        let ok = frames(&deep(MAX_NESTING));
        assert!(matches!(ok.as_slice(), [Frame::Value(_)]));
        // One level more: refused when the extra bracket arrives; the closers then each end a
        // value of their own, as in QEMU.
        let texts = texts(&deep(MAX_NESTING + 1));
        assert_eq!(texts.len(), MAX_NESTING + 2);
        assert_eq!(texts[0], "JSON nesting depth limit exceeded");
        assert!(texts[1..]
            .iter()
            .all(|t| t == "JSON parse error, expecting value"));
        // An endless opening run costs one error per MAX_NESTING + 1 brackets and no memory
        // beyond that, and a reset byte ends it.
        let mut s = JsonStreamer::default();
        let mut errors = 0;
        for _ in 0..100 {
            s.feed(&b"[".repeat(1000));
            while let Some(f) = s.next_frame() {
                assert_eq!(f, Frame::Error(FrameError::TooDeep));
                errors += 1;
            }
            assert!(s.tokens.len() <= MAX_NESTING);
        }
        assert_eq!(errors, 100_000 / (MAX_NESTING + 1));
        s.feed(b"\xff{\"execute\": \"x\"}");
        assert_eq!(
            std::iter::from_fn(|| s.next_frame()).last(),
            Some(Frame::Value(json!({"execute": "x"})))
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
        assert_eq!(s.next_frame(), Some(Frame::Value(json!({"execute": "ok"}))));
        // Many small tokens count too.
        let mut many = b"[".to_vec();
        many.extend(b"1,".repeat(MAX_REQUEST_BYTES / TOKEN_OVERHEAD));
        many.extend(b"1]{}");
        assert_eq!(texts(&many), ["JSON token size limit exceeded", "{}"]);
    }
}
