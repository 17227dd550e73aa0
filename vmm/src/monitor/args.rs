//! Command arguments, checked the way QEMU's QObject input visitor checks them
//! (`qapi/qobject-input-visitor.c`): members are taken in schema order, a missing or mistyped one is
//! reported with QEMU's wording (list elements named `name[i]`), and whatever is left over at the
//! end is "unexpected". Every such error is a `GenericError`.

use serde_json::{Map, Value};

use super::protocol::QmpError;

/// The arguments of one command, consumed member by member.
#[derive(Debug)]
pub struct Args {
    members: Map<String, Value>,
}

/// "Invalid parameter type for 'NAME', expected: TYPE" (QERR_INVALID_PARAMETER_TYPE).
fn invalid_type(name: &str, expected: &str) -> QmpError {
    QmpError::generic(format!(
        "Invalid parameter type for '{name}', expected: {expected}"
    ))
}

impl Args {
    /// Wraps a request's `arguments` object.
    pub fn new(members: Map<String, Value>) -> Self {
        Self { members }
    }

    /// A mandatory string member.
    pub fn required_str(&mut self, name: &str) -> Result<String, QmpError> {
        match self.members.remove(name) {
            None => Err(QmpError::generic(format!("Parameter '{name}' is missing"))),
            Some(Value::String(s)) => Ok(s),
            Some(_) => Err(invalid_type(name, "string")),
        }
    }

    /// An optional string member.
    pub fn optional_str(&mut self, name: &str) -> Result<Option<String>, QmpError> {
        match self.members.remove(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(invalid_type(name, "string")),
        }
    }

    /// A mandatory integer member (QAPI `int`: a JSON integer within 64-bit signed range).
    pub fn required_i64(&mut self, name: &str) -> Result<i64, QmpError> {
        match self.members.remove(name) {
            None => Err(QmpError::generic(format!("Parameter '{name}' is missing"))),
            Some(v) => v.as_i64().ok_or_else(|| invalid_type(name, "integer")),
        }
    }

    /// A mandatory member of any type (QAPI `any`).
    pub fn required_value(&mut self, name: &str) -> Result<Value, QmpError> {
        self.members
            .remove(name)
            .ok_or_else(|| QmpError::generic(format!("Parameter '{name}' is missing")))
    }

    /// An optional boolean member.
    pub fn optional_bool(&mut self, name: &str) -> Result<Option<bool>, QmpError> {
        match self.members.remove(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(b)),
            Some(_) => Err(invalid_type(name, "boolean")),
        }
    }

    /// An optional integer member (QAPI's `int`).
    pub fn optional_i64(&mut self, name: &str) -> Result<Option<i64>, QmpError> {
        match self.members.remove(name) {
            None => Ok(None),
            Some(Value::Number(n)) => n
                .as_i64()
                .map(Some)
                .ok_or_else(|| invalid_type(name, "integer")),
            Some(_) => Err(invalid_type(name, "integer")),
        }
    }

    /// An optional list of strings.
    pub fn optional_str_list(&mut self, name: &str) -> Result<Option<Vec<String>>, QmpError> {
        let Some(items) = self.optional_list(name)? else {
            return Ok(None);
        };
        items
            .into_iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) => Ok(s),
                _ => Err(invalid_type(&format!("{name}[{i}]"), "string")),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    /// An optional list of unsigned 64-bit integers. QEMU also takes negative numbers here and
    /// wraps them; this monitor refuses them rather than turn -1 into 2^64-1.
    pub fn optional_u64_list(&mut self, name: &str) -> Result<Option<Vec<u64>>, QmpError> {
        let Some(items) = self.optional_list(name)? else {
            return Ok(None);
        };
        items
            .into_iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_u64().ok_or_else(|| {
                    QmpError::generic(format!("Parameter '{name}[{i}]' expects uint64"))
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    /// An optional list member, not yet checked element by element.
    fn optional_list(&mut self, name: &str) -> Result<Option<Vec<Value>>, QmpError> {
        match self.members.remove(name) {
            None => Ok(None),
            Some(Value::Array(items)) => Ok(Some(items)),
            Some(_) => Err(invalid_type(name, "array")),
        }
    }

    /// Ends the visit: any member not taken is unexpected.
    pub fn finish(self) -> Result<(), QmpError> {
        match self.members.keys().next() {
            None => Ok(()),
            Some(name) => Err(QmpError::generic(format!(
                "Parameter '{name}' is unexpected"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn args(v: Value) -> Args {
        match v {
            Value::Object(m) => Args::new(m),
            _ => Args::new(Map::new()),
        }
    }

    fn desc(r: Result<impl std::fmt::Debug, QmpError>) -> String {
        r.expect_err("must fail").desc
    }

    #[test]
    fn integers_as_qemu_checks_them() {
        let mut a = args(json!({"size": -5}));
        assert_eq!(a.required_i64("size").expect("present"), -5);
        assert_eq!(
            desc(args(json!({})).required_i64("size")),
            "Parameter 'size' is missing"
        );
        // Not integers, or past i64 (QEMU 10's replies).
        for v in [json!("5"), json!(1.5), json!(18_446_744_073_709_551_615u64)] {
            assert_eq!(
                desc(args(json!({ "size": v })).required_i64("size")),
                "Invalid parameter type for 'size', expected: integer"
            );
        }
    }

    #[test]
    fn strings() {
        let mut a = args(json!({"id": "vd0"}));
        assert_eq!(a.required_str("id").expect("present"), "vd0");
        a.finish().expect("nothing left");
        assert_eq!(
            desc(args(json!({})).required_str("id")),
            "Parameter 'id' is missing"
        );
        assert_eq!(
            desc(args(json!({"id": 1})).required_str("id")),
            "Invalid parameter type for 'id', expected: string"
        );
    }

    #[test]
    fn booleans() {
        assert_eq!(args(json!({})).optional_bool("b").expect("absent"), None);
        assert_eq!(
            args(json!({"b": true})).optional_bool("b").expect("ok"),
            Some(true)
        );
        assert_eq!(
            desc(args(json!({"b": "yes"})).optional_bool("b")),
            "Invalid parameter type for 'b', expected: boolean"
        );
    }

    #[test]
    fn lists() {
        assert_eq!(
            args(json!({"b": [1, 10]}))
                .optional_u64_list("b")
                .expect("ok"),
            Some(vec![1, 10])
        );
        assert_eq!(
            desc(args(json!({"b": 5})).optional_u64_list("b")),
            "Invalid parameter type for 'b', expected: array"
        );
        assert_eq!(
            desc(args(json!({"b": [1, -1]})).optional_u64_list("b")),
            "Parameter 'b[1]' expects uint64"
        );
        assert_eq!(
            desc(args(json!({"b": [1.5]})).optional_u64_list("b")),
            "Parameter 'b[0]' expects uint64"
        );
        assert_eq!(
            args(json!({"e": ["oob"]}))
                .optional_str_list("e")
                .expect("ok"),
            Some(vec!["oob".to_owned()])
        );
        assert_eq!(
            desc(args(json!({"e": [1]})).optional_str_list("e")),
            "Invalid parameter type for 'e[0]', expected: string"
        );
        assert_eq!(
            desc(args(json!({"e": {}})).optional_str_list("e")),
            "Invalid parameter type for 'e', expected: array"
        );
    }

    #[test]
    fn leftovers_are_unexpected() {
        assert_eq!(
            desc(args(json!({"force": true})).finish()),
            "Parameter 'force' is unexpected"
        );
    }
}
