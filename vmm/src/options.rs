//! QEMU-style option strings (`value,key=value,key=value`) parsed into typed values.
//!
//! One parser serves every flag that takes such a string (`-m`, `-smp`, `-machine`, `-drive`,
//! `-device`, `-object`, `-qmp`): the caller names the keys it knows and, optionally, the key a
//! leading bare value stands for (`-smp 2` means `-smp cpus=2`), then asks for each key as the
//! type it wants. An unknown key, a repeated key or a value of the wrong type is an error that
//! names it. A comma inside a value is written `,,`, as in QEMU.
//!
//! The flags that QEMU also lets take a JSON object (`-object`, `-device`) read it through
//! [`Options::parse_json_or_keyval`] into the same pairs, each remembering the JSON type of its
//! value: as in QEMU, a JSON value must then have its key's type (a number for a number, `true`
//! or `false` for an on/off key, a list for a list key such as `iothread-vq-mapping`, a string
//! for everything else); objects and null are refused. A list key has no key=value form (as in
//! QEMU, whose keyval `-device` cannot give a list).

/// Errors from parsing an option string.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OptionError {
    /// A key this flag does not have.
    #[error("Unknown option '{key}' (known: {known})")]
    UnknownKey {
        /// The key.
        key: String,
        /// The keys the flag knows, comma-separated.
        known: String,
    },
    /// The same key twice.
    #[error("Option '{key}' given twice")]
    Duplicate {
        /// The key.
        key: String,
    },
    /// A bare value where this flag needs `key=value`.
    #[error("Option '{item}' needs the form key=value")]
    NotKeyValue {
        /// The item.
        item: String,
    },
    /// An empty item (`a=1,,` at the end, or an empty string).
    #[error("Empty option in '{input}'")]
    Empty {
        /// The whole option string.
        input: String,
    },
    /// A JSON option string that does not parse, or is not an object.
    #[error("Invalid JSON option string: {message}")]
    Json {
        /// What is wrong.
        message: String,
    },
    /// A JSON value of another type than its key's (QEMU's words).
    #[error("Invalid parameter type for '{key}', expected: {expected}")]
    JsonType {
        /// The key.
        key: String,
        /// The JSON type the key takes.
        expected: &'static str,
    },
    /// A JSON object or null as a value: no key here takes one.
    #[error("Option '{key}' has an object or null value, which no option here takes")]
    Structured {
        /// The key.
        key: String,
    },
    /// A list key in the key=value form.
    #[error("Option '{key}' takes a list: give the flag in its JSON form")]
    NeedsJson {
        /// The key.
        key: String,
    },
    /// A value that does not parse as the key's type.
    #[error("Option '{key}' has invalid value '{value}': expected {expected}")]
    BadValue {
        /// The key.
        key: String,
        /// The value.
        value: String,
        /// What the key takes.
        expected: &'static str,
    },
}

/// The JSON type of a value in the JSON form of an option string.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JsonType {
    /// A string.
    String,
    /// A whole number.
    Integer,
    /// A number with a fraction or an exponent.
    Number,
    /// `true` or `false`.
    Boolean,
    /// A list (`[...]`), kept as its JSON text for the key's type to read.
    Array,
}

impl JsonType {
    /// QEMU's name of the type, in its type errors.
    fn name(self) -> &'static str {
        match self {
            JsonType::String => "string",
            JsonType::Integer => "integer",
            JsonType::Number => "number",
            JsonType::Boolean => "boolean",
            JsonType::Array => "array",
        }
    }
}

/// A type an option's value can be read as.
pub trait OptionValue: Sized {
    /// What the value should look like, for error messages.
    const EXPECTED: &'static str;
    /// The JSON type a value must have in the JSON form.
    const JSON: JsonType = JsonType::String;
    /// The value, or `None` when `text` is not one.
    fn parse(text: &str) -> Option<Self>;
}

impl OptionValue for String {
    const EXPECTED: &'static str = "a string";
    fn parse(text: &str) -> Option<Self> {
        Some(text.to_owned())
    }
}

impl OptionValue for u8 {
    const JSON: JsonType = JsonType::Integer;
    const EXPECTED: &'static str = "a number from 0 to 255";
    fn parse(text: &str) -> Option<Self> {
        text.parse().ok()
    }
}

impl OptionValue for u16 {
    const JSON: JsonType = JsonType::Integer;
    const EXPECTED: &'static str = "a number from 0 to 65535";
    fn parse(text: &str) -> Option<Self> {
        text.parse().ok()
    }
}

impl OptionValue for u32 {
    const JSON: JsonType = JsonType::Integer;
    const EXPECTED: &'static str = "a 32-bit number";
    fn parse(text: &str) -> Option<Self> {
        text.parse().ok()
    }
}

impl OptionValue for bool {
    const JSON: JsonType = JsonType::Boolean;
    const EXPECTED: &'static str = "on or off";
    fn parse(text: &str) -> Option<Self> {
        match text {
            "on" | "true" | "yes" => Some(true),
            "off" | "false" | "no" => Some(false),
            _ => None,
        }
    }
}

/// A size in bytes, written as a number with an optional K, M, G, T, P or E suffix (powers of
/// 1024) or B (bytes); a bare number means MiB, as QEMU's `-m` reads it. As in QEMU, a suffixed
/// number may have a decimal fraction (`1.5G`), truncated to whole bytes; a fraction of bytes
/// (`1.5B`) is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemorySize(pub u64);

impl OptionValue for MemorySize {
    const EXPECTED: &'static str = "a size such as 512, 512M, 1.5G or 2G (a bare number is MiB)";
    fn parse(text: &str) -> Option<Self> {
        let (number, shift) = match text.char_indices().last()? {
            (i, 'b' | 'B') => (&text[..i], 0),
            (i, 'k' | 'K') => (&text[..i], 10),
            (i, 'm' | 'M') => (&text[..i], 20),
            (i, 'g' | 'G') => (&text[..i], 30),
            (i, 't' | 'T') => (&text[..i], 40),
            (i, 'p' | 'P') => (&text[..i], 50),
            (i, 'e' | 'E') => (&text[..i], 60),
            _ => (text, 20),
        };
        let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
        let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
        if whole.is_empty() || !digits(whole) || !digits(fraction) {
            return None;
        }
        if number.contains('.') && (fraction.is_empty() || shift == 0) {
            return None;
        }
        let unit: u64 = 1 << shift;
        let whole = u64::try_from(whole.parse::<u128>().ok()? * u128::from(unit)).ok()?;
        // The fraction's digits past 19 cannot change a byte count below 2^64; keep 19 so that
        // 10^len fits in a u128 with the unit multiplied in.
        let fraction = &fraction[..fraction.len().min(19)];
        let part = if fraction.is_empty() {
            0
        } else {
            let scale = 10u128.pow(u32::try_from(fraction.len()).ok()?);
            // The fraction is below 1, so this is below `unit`: it fits in a u64.
            u64::try_from(fraction.parse::<u128>().ok()? * u128::from(unit) / scale).ok()?
        };
        whole.checked_add(part).map(MemorySize)
    }
}

/// A parsed option string: keys and their raw values, in order, with the JSON type of each
/// value when it came from the JSON form.
#[derive(Debug, PartialEq, Eq)]
pub struct Options {
    pairs: Vec<(String, String, Option<JsonType>)>,
}

/// The members of a JSON object in order, duplicates kept (serde_json's map would keep only the
/// last), so that a key given twice is refused as in the key=value form.
struct Members(Vec<(String, serde_json::Value)>);

impl<'de> serde::Deserialize<'de> for Members {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Members;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Members, A::Error> {
                let mut members = Vec::new();
                while let Some(member) = map.next_entry()? {
                    members.push(member);
                }
                Ok(Members(members))
            }
        }
        deserializer.deserialize_map(Visitor)
    }
}

/// Splits `input` at single commas, turning `,,` into a literal comma.
fn split_items(input: &str) -> Vec<String> {
    let mut items = vec![String::new()];
    let mut chars = input.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                if let Some(s) = items.last_mut() {
                    s.push(',');
                }
            } else {
                items.push(String::new());
            }
        } else {
            if let Some(s) = items.last_mut() {
                s.push(c);
            }
        }
    }
    items
}

impl Options {
    /// Parses `input`, accepting only `known` keys; a bare first item stands for `implied`.
    pub fn parse(input: &str, implied: Option<&str>, known: &[&str]) -> Result<Self, OptionError> {
        let mut options = Self { pairs: Vec::new() };
        for (i, item) in split_items(input).into_iter().enumerate() {
            if item.is_empty() {
                return Err(OptionError::Empty {
                    input: input.to_owned(),
                });
            }
            let (key, value) = match (item.split_once('='), implied) {
                (Some((k, v)), _) => (k.to_owned(), v.to_owned()),
                (None, Some(implied)) if i == 0 => (implied.to_owned(), item),
                (None, _) => return Err(OptionError::NotKeyValue { item }),
            };
            options.push(key, value, None, known)?;
        }
        Ok(options)
    }

    /// Parses `input` as [`Options::parse`] does, or, when it starts with `{`, as a JSON object
    /// whose members are the keys (QEMU's JSON form of `-object` and `-device`).
    pub fn parse_json_or_keyval(
        input: &str,
        implied: Option<&str>,
        known: &[&str],
    ) -> Result<Self, OptionError> {
        if !input.trim_start().starts_with('{') {
            return Self::parse(input, implied, known);
        }
        let Members(members) = serde_json::from_str(input).map_err(|e| OptionError::Json {
            message: e.to_string(),
        })?;
        let mut options = Self { pairs: Vec::new() };
        for (key, value) in members {
            let (text, json) = match value {
                serde_json::Value::String(s) => (s, JsonType::String),
                serde_json::Value::Bool(b) => {
                    (if b { "on" } else { "off" }.to_owned(), JsonType::Boolean)
                }
                serde_json::Value::Number(n) if n.is_f64() => (n.to_string(), JsonType::Number),
                serde_json::Value::Number(n) => (n.to_string(), JsonType::Integer),
                serde_json::Value::Array(_) => (value.to_string(), JsonType::Array),
                serde_json::Value::Null | serde_json::Value::Object(_) => {
                    options.check_key(&key, known)?;
                    return Err(OptionError::Structured { key });
                }
            };
            options.push(key, text, Some(json), known)?;
        }
        Ok(options)
    }

    /// Options made of `pairs` as given, without checking their keys (the caller built them).
    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        Self {
            pairs: pairs
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned(), None))
                .collect(),
        }
    }

    /// Refuses a key that is not `known` or already given.
    fn check_key(&self, key: &str, known: &[&str]) -> Result<(), OptionError> {
        if !known.contains(&key) {
            return Err(OptionError::UnknownKey {
                key: key.to_owned(),
                known: known.join(", "),
            });
        }
        if self.pairs.iter().any(|(k, _, _)| k == key) {
            return Err(OptionError::Duplicate {
                key: key.to_owned(),
            });
        }
        Ok(())
    }

    fn push(
        &mut self,
        key: String,
        value: String,
        json: Option<JsonType>,
        known: &[&str],
    ) -> Result<(), OptionError> {
        self.check_key(&key, known)?;
        self.pairs.push((key, value, json));
        Ok(())
    }

    /// The value of `key` as a `T`, if given.
    pub fn get<T: OptionValue>(&self, key: &str) -> Result<Option<T>, OptionError> {
        let Some((_, value, json)) = self.pairs.iter().find(|(k, _, _)| k == key) else {
            return Ok(None);
        };
        if json.is_none() && T::JSON == JsonType::Array {
            return Err(OptionError::NeedsJson {
                key: key.to_owned(),
            });
        }
        if json.is_some_and(|j| j != T::JSON) {
            return Err(OptionError::JsonType {
                key: key.to_owned(),
                expected: T::JSON.name(),
            });
        }
        T::parse(value)
            .map(Some)
            .ok_or_else(|| OptionError::BadValue {
                key: key.to_owned(),
                value: value.clone(),
                expected: T::EXPECTED,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn implied_key_and_pairs() {
        let o = Options::parse("2,cpus=3", Some("cpus"), &["cpus"]);
        assert!(matches!(o, Err(OptionError::Duplicate { key }) if key == "cpus"));
        let o = Options::parse("2,maxcpus=4", Some("cpus"), &["cpus", "maxcpus"]).expect("valid");
        assert_eq!(o.get::<u8>("cpus"), Ok(Some(2)));
        assert_eq!(o.get::<u32>("maxcpus"), Ok(Some(4)));
        assert_eq!(o.get::<u32>("absent"), Ok(None));
    }

    #[test]
    fn errors_name_the_problem() {
        assert!(matches!(
            Options::parse("cpus=2,sockets=1", None, &["cpus"]),
            Err(OptionError::UnknownKey { key, .. }) if key == "sockets"
        ));
        assert!(matches!(
            Options::parse("a=1,2", Some("a"), &["a"]),
            Err(OptionError::NotKeyValue { item }) if item == "2"
        ));
        assert!(matches!(
            Options::parse("", Some("a"), &["a"]),
            Err(OptionError::Empty { .. })
        ));
        assert!(matches!(
            Options::parse("a=1,", None, &["a"]),
            Err(OptionError::Empty { .. })
        ));
        let o = Options::parse("x", Some("cpus"), &["cpus"]).expect("parses");
        assert!(matches!(
            o.get::<u8>("cpus"),
            Err(OptionError::BadValue { key, value, .. }) if key == "cpus" && value == "x"
        ));
    }

    #[test]
    fn json_objects_give_the_same_pairs() {
        let known = ["driver", "drive", "num-queues", "ro"];
        let keyval = Options::parse_json_or_keyval(
            "virtio-blk-device,drive=d0,num-queues=2,ro=on",
            Some("driver"),
            &known,
        )
        .expect("parses");
        let json = Options::parse_json_or_keyval(
            r#" {"driver": "virtio-blk-device", "drive": "d0", "num-queues": 2, "ro": true}"#,
            Some("driver"),
            &known,
        )
        .expect("parses");
        for o in [&keyval, &json] {
            assert_eq!(
                o.get::<String>("driver"),
                Ok(Some("virtio-blk-device".to_owned()))
            );
            assert_eq!(o.get::<String>("drive"), Ok(Some("d0".to_owned())));
            assert_eq!(o.get::<u16>("num-queues"), Ok(Some(2)));
            assert_eq!(o.get::<bool>("ro"), Ok(Some(true)));
        }
        // A comma in a JSON string is just a comma.
        let o = Options::parse_json_or_keyval(r#"{"drive": "a,b"}"#, None, &known).expect("parses");
        assert_eq!(o.get::<String>("drive"), Ok(Some("a,b".to_owned())));
    }

    #[test]
    fn json_values_must_have_their_key_s_type() {
        let known = ["n", "s", "b"];
        let parse = |text| Options::parse_json_or_keyval(text, None, &known).expect("parses");
        fn type_error<T>(key: &str, expected: &'static str) -> Result<Option<T>, OptionError> {
            Err(OptionError::JsonType {
                key: key.to_owned(),
                expected,
            })
        }
        assert_eq!(
            parse(r#"{"n": "2"}"#).get::<u32>("n"),
            type_error("n", "integer")
        );
        assert_eq!(
            parse(r#"{"n": 1.5}"#).get::<u32>("n"),
            type_error("n", "integer")
        );
        assert_eq!(
            parse(r#"{"n": true}"#).get::<u32>("n"),
            type_error("n", "integer")
        );
        assert_eq!(
            parse(r#"{"b": "on"}"#).get::<bool>("b"),
            type_error("b", "boolean")
        );
        assert_eq!(
            parse(r#"{"s": 5}"#).get::<String>("s"),
            type_error("s", "string")
        );
        assert!(matches!(
            parse(r#"{"n": -1}"#).get::<u32>("n"),
            Err(OptionError::BadValue { value, .. }) if value == "-1"
        ));
        assert!(matches!(
            parse(r#"{"n": 4294967296}"#).get::<u32>("n"),
            Err(OptionError::BadValue { .. })
        ));
    }

    /// A list key's value, as its JSON text.
    #[derive(Debug, PartialEq, Eq)]
    struct Listed(String);

    impl OptionValue for Listed {
        const EXPECTED: &'static str = "a list";
        const JSON: JsonType = JsonType::Array;
        fn parse(text: &str) -> Option<Self> {
            Some(Listed(text.to_owned()))
        }
    }

    #[test]
    fn bad_json_is_refused_with_what_is_wrong() {
        let known = ["a", "list"];
        let parse = |text| Options::parse_json_or_keyval(text, None, &known);
        for bad in [r#"{"a": 1"#, r#"{"a": 1} x"#, "{a: 1}", r#"{"a": 1,}"#] {
            assert!(matches!(parse(bad), Err(OptionError::Json { .. })), "{bad}");
        }
        let e = parse(r#"{"a": 1, "a": 2}"#);
        assert!(matches!(e, Err(OptionError::Duplicate { key }) if key == "a"));
        for structured in [r#"{"list": {"x": 1}}"#, r#"{"list": null}"#] {
            let e = parse(structured);
            assert!(
                matches!(&e, Err(OptionError::Structured { key }) if key == "list"),
                "{e:?}"
            );
        }
        // A list is kept as its JSON text, for a list key to read; a string or a key=value
        // form is not a list.
        let list = parse(r#"{"list": [1, {"x": "y"}]}"#).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            list.get::<Listed>("list"),
            Ok(Some(Listed(r#"[1,{"x":"y"}]"#.into())))
        );
        let e = parse(r#"{"list": "[1]"}"#).unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(
            e.get::<Listed>("list"),
            Err(OptionError::JsonType {
                expected: "array",
                ..
            })
        ));
        let e =
            Options::parse_json_or_keyval("list=1", None, &known).unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(
            e.get::<Listed>("list"),
            Err(OptionError::NeedsJson { key }) if key == "list"
        ));
        let e = parse(r#"{"other": [{"iothread": "io0"}]}"#);
        assert!(matches!(e, Err(OptionError::UnknownKey { key, .. }) if key == "other"));
        // Not JSON at all: the key=value form, which knows no such key.
        assert!(matches!(
            parse("[1]"),
            Err(OptionError::UnknownKey { .. } | OptionError::NotKeyValue { .. })
        ));
    }

    #[test]
    fn doubled_commas_are_literal() {
        let o = Options::parse("file=a,,b.img,x=on", None, &["file", "x"]).expect("parses");
        assert_eq!(o.get::<String>("file"), Ok(Some("a,b.img".to_owned())));
        assert_eq!(o.get::<bool>("x"), Ok(Some(true)));
    }

    #[test]
    fn memory_sizes() {
        let cases: &[(&str, Option<u64>)] = &[
            ("512", Some(512 << 20)),
            ("512M", Some(512 << 20)),
            ("1G", Some(1 << 30)),
            ("1g", Some(1 << 30)),
            ("64k", Some(64 << 10)),
            ("2T", Some(2 << 40)),
            ("4096B", Some(4096)),
            ("1.5G", Some(3 << 29)),
            ("0.25M", Some(256 << 10)),
            ("1.5", Some(3 << 19)),
            ("1.0000000000000000000001G", Some(1 << 30)),
            ("15E", Some(15 << 60)),
            ("16E", None),
            ("", None),
            ("M", None),
            ("1.", None),
            (".5G", None),
            ("1.5B", None),
            ("1.5.5G", None),
            ("-1", None),
            ("1e3", None),
            ("99999999999999G", None),
        ];
        for &(text, bytes) in cases {
            assert_eq!(MemorySize::parse(text), bytes.map(MemorySize), "{text}");
        }
    }
}
