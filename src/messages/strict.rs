//! Strict deserialisers for the contract's types. serde's own impls are
//! lenient in ways the contract is not: `String` also takes a `bin` (and
//! rmp-serde hands it an invalid UTF-8 `str` as bytes), and `Option<T>` also
//! takes `nil`.
use std::fmt;

use serde::de::{self, Deserialize, Deserializer, Visitor};

/// A `String` that only a MessagePack `str` (valid UTF-8) deserialises to.
pub(crate) struct Str(pub(crate) String);

struct StrVisitor;

impl Visitor<'_> for StrVisitor {
    type Value = Str;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Str, E> {
        Ok(Str(v.to_owned()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Str, E> {
        Ok(Str(v))
    }
}

impl<'de> Deserialize<'de> for Str {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Str, D::Error> {
        d.deserialize_str(StrVisitor)
    }
}

/// A required `str` key.
pub(crate) fn string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Str::deserialize(d).map(|s| s.0)
}

/// An optional `str` key: `nil` is not a string.
pub(crate) fn opt_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    string(d).map(Some)
}

/// A `[str]` key.
pub(crate) fn strings<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let v = Vec::<Str>::deserialize(d)?;
    Ok(v.into_iter().map(|s| s.0).collect())
}

/// An optional key of another type: present means a value of that
/// type, never `nil` (absent keys never reach this function).
pub(crate) fn some<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

/// An optional `bin` key: present means a MessagePack `bin` (not a `str`,
/// not an array of integers, never `nil`).
pub(crate) mod opt_bin {
    use std::fmt;

    use serde::de::{self, Deserializer, Visitor};
    use serde::Serializer;

    pub(crate) fn serialize<S: Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(bytes) => s.serialize_bytes(bytes),
            None => s.serialize_none(),
        }
    }

    struct BinVisitor;

    impl Visitor<'_> for BinVisitor {
        type Value = Vec<u8>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a byte string (bin)")
        }

        fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }

        fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(v)
        }
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Vec<u8>>, D::Error> {
        d.deserialize_bytes(BinVisitor).map(Some)
    }
}
