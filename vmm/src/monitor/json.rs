//! QEMU's JSON grammar (`qobject/json-parser.c`) over the tokens of one value, building a
//! `serde_json` value, with QEMU's error texts: the first error found is the one reported.
//!
//! Where QEMU differs from a general-purpose JSON library, this follows QEMU: a key that occurs
//! twice in an object is an error ("duplicate key"; a library keeping the last one would let
//! `{"execute": "query-status", "execute": "quit"}` quit); strings are modified UTF-8 (`\u0000`
//! and `\xC0\x80` are allowed, Unicode's noncharacters are not); an integer is signed 64-bit if
//! it fits, else unsigned 64-bit, else a double. A number beyond a double's range, which QEMU
//! keeps as an infinity (and then prints as `inf`, which is not JSON), is `null` here.
//! Recursion is bounded by the streamer's nesting limit ([`super::framing::MAX_NESTING`]).

use serde_json::{Map, Number, Value};

use super::framing::FrameError;

/// A token of QEMU's JSON lexer; text tokens keep their bytes as received (strings with their
/// quotes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Token {
    /// `{`
    LCurly,
    /// `}`
    RCurly,
    /// `[`
    LSquare,
    /// `]`
    RSquare,
    /// `:`
    Colon,
    /// `,`
    Comma,
    /// A string literal, quotes included (double or single).
    Str(Vec<u8>),
    /// An integer literal.
    Int(Vec<u8>),
    /// A number literal with a fraction or an exponent.
    Float(Vec<u8>),
    /// A run of lowercase letters.
    Keyword(Vec<u8>),
}

/// Parses the tokens of one value.
pub fn parse(tokens: &[Token]) -> Result<Value, FrameError> {
    Parser { tokens, pos: 0 }.value()
}

/// A syntax error, in QEMU's words.
fn syntax(what: &str) -> FrameError {
    FrameError::Syntax(what.to_owned())
}

struct Parser<'a> {
    tokens: &'a [Token],
    pos: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.pos)
    }

    fn pop(&mut self) -> Option<&Token> {
        let token = self.tokens.get(self.pos);
        self.pos += 1;
        token
    }

    fn value(&mut self) -> Result<Value, FrameError> {
        match self.peek() {
            None => Err(syntax("premature EOI")),
            Some(Token::LCurly) => self.object(),
            Some(Token::LSquare) => self.array(),
            Some(Token::Str(_) | Token::Int(_) | Token::Float(_) | Token::Keyword(_)) => {
                match self.pop() {
                    Some(Token::Str(raw)) => decode_string(raw).map(Value::String),
                    Some(Token::Int(text)) => Ok(integer(text)),
                    Some(Token::Float(text)) => Ok(float(text)),
                    Some(Token::Keyword(word)) => keyword(word),
                    _ => Err(syntax("expecting value")),
                }
            }
            Some(_) => Err(syntax("expecting value")),
        }
    }

    /// One `key: value` member, added to `map`.
    fn pair(&mut self, map: &mut Map<String, Value>) -> Result<(), FrameError> {
        if self.peek().is_none() {
            return Err(syntax("premature EOI"));
        }
        let Value::String(key) = self.value()? else {
            return Err(syntax("key is not a string in object"));
        };
        match self.pop() {
            None => return Err(syntax("premature EOI")),
            Some(Token::Colon) => {}
            Some(_) => return Err(syntax("missing : in object pair")),
        }
        let value = self.value()?;
        if map.contains_key(&key) {
            return Err(syntax("duplicate key"));
        }
        map.insert(key, value);
        Ok(())
    }

    fn object(&mut self) -> Result<Value, FrameError> {
        self.pos += 1; // The `{` that `value` saw.
        let mut map = Map::new();
        match self.peek() {
            None => return Err(syntax("premature EOI")),
            Some(Token::RCurly) => {
                self.pos += 1;
                return Ok(Value::Object(map));
            }
            Some(_) => self.pair(&mut map)?,
        }
        loop {
            match self.pop() {
                None => return Err(syntax("premature EOI")),
                Some(Token::RCurly) => return Ok(Value::Object(map)),
                Some(Token::Comma) => self.pair(&mut map)?,
                Some(_) => return Err(syntax("expected separator in dict")),
            }
        }
    }

    fn array(&mut self) -> Result<Value, FrameError> {
        self.pos += 1; // The `[` that `value` saw.
        let mut list = Vec::new();
        match self.peek() {
            None => return Err(syntax("premature EOI")),
            Some(Token::RSquare) => {
                self.pos += 1;
                return Ok(Value::Array(list));
            }
            Some(_) => list.push(self.value()?),
        }
        loop {
            match self.pop() {
                None => return Err(syntax("premature EOI")),
                Some(Token::RSquare) => return Ok(Value::Array(list)),
                Some(Token::Comma) => list.push(self.value()?),
                Some(_) => return Err(syntax("expected separator in list")),
            }
        }
    }
}

/// `true`, `false` or `null`.
fn keyword(word: &[u8]) -> Result<Value, FrameError> {
    match word {
        b"true" => Ok(Value::Bool(true)),
        b"false" => Ok(Value::Bool(false)),
        b"null" => Ok(Value::Null),
        _ => Err(FrameError::Syntax(format!(
            "invalid keyword '{}'",
            lossy(word)
        ))),
    }
}

/// An integer literal: signed 64-bit if it fits, else unsigned 64-bit, else a double.
fn integer(text: &[u8]) -> Value {
    let text = String::from_utf8_lossy(text);
    if let Ok(n) = text.parse::<i64>() {
        return Value::Number(n.into());
    }
    if let Ok(n) = text.parse::<u64>() {
        return Value::Number(n.into());
    }
    float(text.as_bytes())
}

/// A number as a double; `null` when it is out of a double's range.
fn float(text: &[u8]) -> Value {
    String::from_utf8_lossy(text)
        .parse::<f64>()
        .ok()
        .and_then(Number::from_f64)
        .map_or(Value::Null, Value::Number)
}

/// Whether `cp` is a Unicode scalar value other than a noncharacter.
fn valid_codepoint(cp: u32) -> Option<char> {
    let noncharacter = (0xfdd0..=0xfdef).contains(&cp) || cp & 0xfffe == 0xfffe;
    if noncharacter {
        return None;
    }
    char::from_u32(cp)
}

/// Four hex digits at `at`, or `None`.
fn hex4(raw: &[u8], at: usize) -> Option<u32> {
    let digits = raw.get(at..at.checked_add(4)?)?;
    digits.iter().try_fold(0u32, |cp, &d| {
        let v = char::from(d).to_digit(16)?;
        Some(cp << 4 | v)
    })
}

/// Decodes one modified-UTF-8 sequence at `at` (which must be in `raw`): the character and the
/// sequence's length, or, for an invalid sequence, the length QEMU skips over (the first byte and
/// the continuation bytes that follow it, up to the number it announces).
fn utf8_sequence(raw: &[u8], at: usize) -> Result<(char, usize), usize> {
    const MIN_CP: [u32; 5] = [0x80, 0x800, 0x1_0000, 0x20_0000, 0x400_0000];
    let first = raw.get(at).copied().unwrap_or(0);
    if first < 0x80 {
        return Ok((char::from(first), 1));
    }
    if first >= 0xfe || first & 0x40 == 0 {
        return Err(1); // Impossible byte, or a continuation byte.
    }
    // The number of leading ones: 0xfe and 0xff are handled above.
    let len = match first {
        0xc0..=0xdf => 2,
        0xe0..=0xef => 3,
        0xf0..=0xf7 => 4,
        0xf8..=0xfb => 5,
        _ => 6,
    };
    let mut cp = u32::from(first) & (0x7f >> len);
    for i in 1..len {
        match raw.get(at + i) {
            Some(&b) if b & 0xc0 == 0x80 => cp = cp << 6 | u32::from(b & 0x3f),
            _ => return Err(i),
        }
    }
    // Overlong forms are invalid, except \xC0\x80 for U+0000.
    let min = MIN_CP.get(len - 2).copied().unwrap_or(0);
    if cp < min && !(cp == 0 && len == 2) {
        return Err(len);
    }
    valid_codepoint(cp).map(|c| (c, len)).ok_or(len)
}

/// `bytes` as text the way QEMU's JSON writer shows them: each invalid sequence as U+FFFD.
pub fn lossy(bytes: &[u8]) -> String {
    let mut out = String::new();
    let mut i = 0;
    while i < bytes.len() {
        match utf8_sequence(bytes, i) {
            Ok((c, len)) => {
                out.push(c);
                i += len;
            }
            Err(len) => {
                out.push(char::REPLACEMENT_CHARACTER);
                i += len;
            }
        }
    }
    out
}

/// Decodes a string literal (quotes included) as QEMU's `parse_string` does.
fn decode_string(raw: &[u8]) -> Result<String, FrameError> {
    let quote = raw.first().copied().unwrap_or(b'"');
    let mut out = String::new();
    let mut i = 1;
    while let Some(&b) = raw.get(i) {
        if b == quote {
            break;
        }
        if b != b'\\' {
            let (c, len) =
                utf8_sequence(raw, i).map_err(|_| syntax("invalid UTF-8 sequence in string"))?;
            out.push(c);
            i += len;
            continue;
        }
        let begin = i;
        let escaped = raw.get(i + 1).copied();
        i += 2;
        let c = match escaped {
            Some(b'"') => '"',
            Some(b'\'') => '\'',
            Some(b'\\') => '\\',
            Some(b'/') => '/',
            Some(b'b') => '\u{8}',
            Some(b'f') => '\u{c}',
            Some(b'n') => '\n',
            Some(b'r') => '\r',
            Some(b't') => '\t',
            Some(b'u') => {
                let mut cp = hex4(raw, i);
                i += 4;
                if let Some(lead @ 0xd800..=0xdbff) = cp {
                    if raw.get(i..i + 2) == Some(b"\\u") {
                        cp = match hex4(raw, i + 2) {
                            Some(trail @ 0xdc00..=0xdfff) => {
                                i += 6;
                                Some(0x1_0000 + (((lead & 0x3ff) << 10) | (trail & 0x3ff)))
                            }
                            _ => None,
                        };
                    }
                }
                match cp.and_then(valid_codepoint) {
                    Some(c) => c,
                    None => {
                        let text = raw.get(begin..i.min(raw.len())).unwrap_or_default();
                        return Err(FrameError::Syntax(format!(
                            "{} is not a valid Unicode character",
                            lossy(text)
                        )));
                    }
                }
            }
            _ => return Err(syntax("invalid escape sequence in string")),
        };
        out.push(c);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::monitor::framing::{Frame, JsonStreamer};
    use serde_json::json;

    /// The one frame `text` (with a delimiter after it) makes, as a value or an error text.
    fn one(text: &[u8]) -> Result<Value, String> {
        let mut s = JsonStreamer::default();
        s.feed(text);
        s.feed(b"\n");
        let frame = s.next_frame().expect("a frame");
        assert_eq!(s.next_frame(), None, "one frame for {text:?}");
        match frame {
            Frame::Value(v) => Ok(v),
            Frame::Error(e) => Err(e.to_string()),
        }
    }

    fn err(text: &[u8]) -> String {
        one(text).expect_err("must fail")
    }

    #[test]
    fn duplicate_keys_are_refused() {
        assert_eq!(
            err(br#"{"execute":"query-status","execute":"quit"}"#),
            "JSON parse error, duplicate key"
        );
        assert_eq!(
            err(br#"{"id": {"a": 1, "a": 1}, "execute": "quit"}"#),
            "JSON parse error, duplicate key"
        );
        // A bad value is reported before the duplicate.
        assert_eq!(
            err(br#"{"a": 1, "a": }"#),
            "JSON parse error, expecting value"
        );
        assert_eq!(one(br#"{"a": {"a": 1}}"#), Ok(json!({"a": {"a": 1}})));
    }

    #[test]
    fn syntax_errors_in_qemus_words() {
        let cases: [(&[u8], &str); 8] = [
            (b"[1 2]", "expected separator in list"),
            (br#"{"a" 1}"#, "missing : in object pair"),
            (br#"{1: 2}"#, "key is not a string in object"),
            (br#"{"a": 1 "b": 2}"#, "expected separator in dict"),
            (b"[1,]", "expecting value"),
            (b"{,}", "expecting value"),
            (b"nul", "invalid keyword 'nul'"),
            (b"[}", "expecting value"),
        ];
        for (text, what) in cases {
            assert_eq!(err(text), format!("JSON parse error, {what}"), "{text:?}");
        }
    }

    #[test]
    fn strings_decode_as_modified_utf8() {
        assert_eq!(
            one(br#"["\"\'\\\/\b\f\n\r\t", '"', "\u00e9\uD83D\uDE00", "\u0000"]"#),
            Ok(json!([
                "\"'\\/\u{8}\u{c}\n\r\t",
                "\"",
                "\u{e9}\u{1f600}",
                "\0"
            ]))
        );
        assert_eq!(one(b"\"\xc3\xa9\xc0\x80\""), Ok(json!("\u{e9}\0")));
        let bad_utf8: [&[u8]; 5] = [
            b"\"\x80\"",
            b"\"\xc3\"",
            b"\"\xef\xbf\xbe\"",
            b"\"\xf4\x90\x80\x80\"",
            b"\"\xe0\x80\x80\"",
        ];
        for text in bad_utf8 {
            assert_eq!(
                err(text),
                "JSON parse error, invalid UTF-8 sequence in string",
                "{text:?}"
            );
        }
        let bad_escapes: [(&[u8], &str); 6] = [
            (br#""\uD800""#, r"\uD800"),
            (br#""\uD800\u0041""#, r"\uD800"),
            (br#""\uDBFF\uDFFF""#, r"\uDBFF\uDFFF"),
            (br#""\uFFFE""#, r"\uFFFE"),
            (br#""\u12""#, r#"\u12""#),
            (br#""\uzzzz""#, r"\uzzzz"),
        ];
        for (text, shown) in bad_escapes {
            assert_eq!(
                err(text),
                format!("JSON parse error, {shown} is not a valid Unicode character")
            );
        }
        assert_eq!(
            err(br#""\q""#),
            "JSON parse error, invalid escape sequence in string"
        );
    }

    #[test]
    fn numbers_keep_qemus_types() {
        assert_eq!(
            one(b"[-9223372036854775808, 18446744073709551615, 18446744073709551616, 0.5e-3, -0]"),
            Ok(json!([
                i64::MIN,
                u64::MAX,
                18_446_744_073_709_551_616.0_f64,
                0.0005,
                0
            ]))
        );
        assert_eq!(one(b"[1e999]"), Ok(json!([null])));
    }
}
