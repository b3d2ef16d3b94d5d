//! [`Cursor`]: where the next page of a task list starts, opaque to everyone but the store that
//! made it.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer, de};

/// A page cursor: made by a task store, handed back to it unread. SQLite's are numbers, another
/// store's may be any text; on the wire one is a JSON number when it is a whole number (as every
/// cursor always was) and a string otherwise, and either is read back.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Cursor(String);

impl Cursor {
    pub fn new(s: impl Into<String>) -> Cursor {
        Cursor(s.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The cursor as a whole number, when it is one written the one way (no sign, no leading
    /// zero): such a cursor goes on the wire as a JSON number.
    fn number(&self) -> Option<i64> {
        self.0.parse::<i64>().ok().filter(|n| n.to_string() == self.0)
    }
}

impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<String> for Cursor {
    fn from(s: String) -> Cursor {
        Cursor(s)
    }
}

impl Serialize for Cursor {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.number() {
            Some(n) => s.serialize_i64(n),
            None => s.serialize_str(&self.0),
        }
    }
}

impl<'de> Deserialize<'de> for Cursor {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Cursor, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = Cursor;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a page cursor (a number or a string, as `next_cursor` gave it)")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Cursor, E> {
                Ok(Cursor(v.to_owned()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Cursor, E> {
                Ok(Cursor(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Cursor, E> {
                Ok(Cursor(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

impl utoipa::PartialSchema for Cursor {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, OneOfBuilder, Type};
        OneOfBuilder::new()
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::Integer)
                    .format(Some(utoipa::openapi::SchemaFormat::KnownFormat(utoipa::openapi::KnownFormat::Int64))),
            )
            .item(ObjectBuilder::new().schema_type(Type::String))
            .description(Some("An opaque page cursor: pass it back as `before` for the next page."))
            .into()
    }
}

impl utoipa::ToSchema for Cursor {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_stay_numbers_on_the_wire_and_anything_reads_back() {
        assert_eq!(serde_json::to_string(&Cursor::new("456")).unwrap(), "456");
        assert_eq!(serde_json::to_string(&Cursor::new("0456")).unwrap(), r#""0456""#);
        assert_eq!(serde_json::to_string(&Cursor::new("1700:abc")).unwrap(), r#""1700:abc""#);
        for (json, text) in [("456", "456"), (r#""456""#, "456"), (r#""1700:abc""#, "1700:abc")] {
            assert_eq!(serde_json::from_str::<Cursor>(json).unwrap().as_str(), text);
        }
    }
}
