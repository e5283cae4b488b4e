//! Pod templates as raw JSON, and their stable identity.
//!
//! Templates are kept as `serde_json::Value` or as the raw text the API server sent, never
//! round-tripped through typed structs: a field newer than fledge's Kubernetes types must survive
//! untouched in both the stable and the canary.
//!
//! A template's identity is the SHA-256 of its canonical JSON. The canonical text is written
//! straight from a serde `Deserializer`, so that the webhook canonicalises the raw text it received
//! without building a `Value` tree, and the controller its `Value`s, through the same code.

use std::borrow::Cow;
use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// Hex characters of the SHA-256 kept as a template's identity (80 bits).
const HASH_LEN: usize = 20;

/// A stable hash of a pod template: the same for the same content whatever the key order, and the
/// same across fledge versions (it is stored in annotations).
pub fn hash(template: &Value) -> String {
    let mut canonical = Vec::new();
    // Reading a `Value` fails only when the visitor does, and writing canonical JSON never fails;
    // should it ever, the text written so far is still a deterministic identity.
    let _ = write_canonical(template, &mut canonical);
    hash_canonical(&canonical)
}

/// A template as canonical JSON: objects with sorted keys (the last of duplicate keys wins, as
/// when read into a `Value`), no whitespace, strings escaped and numbers written as serde_json
/// writes them. Equal canonical texts are equal templates whatever the key order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Canonical(Vec<u8>);

impl Canonical {
    /// The canonical form of raw JSON text, read exactly (serde_json `float_roundtrip`), without
    /// building a `Value`.
    pub fn of_raw(json: &str) -> Result<Canonical, serde_json::Error> {
        let mut out = Vec::with_capacity(json.len());
        let mut reader = serde_json::Deserializer::from_str(json);
        write_canonical(&mut reader, &mut out)?;
        reader.end()?;
        Ok(Canonical(out))
    }

    /// The template's [`hash`].
    pub fn hash(&self) -> String {
        hash_canonical(&self.0)
    }
}

fn hash_canonical(canonical: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digest = Sha256::digest(canonical);
    let mut hex = String::with_capacity(HASH_LEN);
    for byte in digest.iter().take(HASH_LEN / 2) {
        hex.push(char::from(HEX[usize::from(byte >> 4)]));
        hex.push(char::from(HEX[usize::from(byte & 0xf)]));
    }
    hex
}

fn write_canonical<'de, D: Deserializer<'de>>(value: D, out: &mut Vec<u8>) -> Result<(), D::Error> {
    value.deserialize_any(CanonicalWriter(out))
}

/// Writes the canonical JSON of what it visits to the end of its buffer.
struct CanonicalWriter<'o>(&'o mut Vec<u8>);

impl<'de> DeserializeSeed<'de> for CanonicalWriter<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, value: D) -> Result<(), D::Error> {
        write_canonical(value, self.0)
    }
}

/// A JSON string (an object key, say), borrowed from the input when it has no escapes.
pub(crate) struct Text<'de>(pub Cow<'de, str>);

impl<'de> serde::Deserialize<'de> for Text<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct TextVisitor;
        impl<'de> Visitor<'de> for TextVisitor {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: serde::de::Error>(self, v: &'de str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Borrowed(v)))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(v)))
            }
        }
        d.deserialize_str(TextVisitor)
    }
}

impl CanonicalWriter<'_> {
    fn string(self, text: &str) {
        // Writing into a `Vec` cannot fail, and a `str` always serializes.
        let _ = serde_json::to_writer(&mut *self.0, text);
    }

    fn scalar<T: serde::Serialize>(self, value: T) {
        // Numbers are written as serde_json writes a `Value`'s (itoa, or ryu for floats); writing
        // into a `Vec` cannot fail, and JSON holds no non-finite floats.
        let _ = serde_json::to_writer(&mut *self.0, &value);
    }
}

impl<'de> Visitor<'de> for CanonicalWriter<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("JSON")
    }

    fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<(), E> {
        self.scalar(v);
        Ok(())
    }
    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<(), E> {
        self.scalar(v);
        Ok(())
    }
    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<(), E> {
        self.scalar(v);
        Ok(())
    }
    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<(), E> {
        self.scalar(v);
        Ok(())
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<(), E> {
        self.string(v);
        Ok(())
    }
    fn visit_unit<E: serde::de::Error>(self) -> Result<(), E> {
        self.0.extend_from_slice(b"null");
        Ok(())
    }
    fn visit_none<E: serde::de::Error>(self) -> Result<(), E> {
        self.visit_unit()
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut items: A) -> Result<(), A::Error> {
        self.0.push(b'[');
        let mut first = true;
        loop {
            let at = self.0.len();
            if !first {
                self.0.push(b',');
            }
            if items.next_element_seed(CanonicalWriter(self.0))?.is_none() {
                self.0.truncate(at);
                break;
            }
            first = false;
        }
        self.0.push(b']');
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut entries: A) -> Result<(), A::Error> {
        // Each value is written where the object starts, then the entries are put in key order.
        let start = self.0.len();
        let mut written: Vec<(Text<'de>, std::ops::Range<usize>)> = Vec::new();
        while let Some(key) = entries.next_key::<Text<'de>>()? {
            let from = self.0.len();
            entries.next_value_seed(CanonicalWriter(self.0))?;
            written.push((key, from..self.0.len()));
        }
        // Stable: of equal keys the last one read stays last, and wins below.
        written.sort_by(|a, b| a.0.0.cmp(&b.0.0));
        let values = self.0.split_off(start);
        self.0.push(b'{');
        let mut first = true;
        for (i, (key, range)) in written.iter().enumerate() {
            if written.get(i + 1).is_some_and(|next| next.0.0 == key.0) {
                continue;
            }
            if !first {
                self.0.push(b',');
            }
            first = false;
            CanonicalWriter(self.0).string(&key.0);
            self.0.push(b':');
            self.0
                .extend_from_slice(&values[range.start - start..range.end - start]);
        }
        self.0.push(b'}');
        Ok(())
    }
}

/// The pod template of a Deployment object given as JSON (`spec.template`).
pub fn of_deployment(deployment_data: &Value) -> Option<&Value> {
    deployment_data.get("spec")?.get("template")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn hash_ignores_key_order_but_not_content() {
        let a: Value = serde_json::from_str(r#"{"metadata":{"labels":{"app":"web"}},"spec":{"containers":[{"name":"web","image":"web:1"}]}}"#).unwrap();
        let b: Value = serde_json::from_str(r#"{"spec":{"containers":[{"image":"web:1","name":"web"}]},"metadata":{"labels":{"app":"web"}}}"#).unwrap();
        assert_eq!(hash(&a), hash(&b));
        let mut c = a.clone();
        c["spec"]["containers"][0]["image"] = json!("web:2");
        assert_ne!(hash(&a), hash(&c));
        assert_eq!(hash(&a).len(), HASH_LEN);
    }

    #[test]
    fn hash_is_stable_across_versions() {
        // Stored in annotations: changing the encoding would restart every canary in flight.
        assert_eq!(
            hash(&json!({"spec": {"containers": []}})),
            "f00de3f067f25bf79c11"
        );
    }

    #[test]
    fn raw_text_hashes_as_its_value() {
        for text in [
            r#"{"b":1,"a":{"z":[1,-2,2.5e-300,true,null,"é\u00e9\n\"",{}],"y":{}},"c":[]}"#,
            r#"{"a":1,"a":2,"\u0061":3}"#,
            r#"{"x":-0,"y":1e2,"z":18446744073709551615,"w":-9223372036854775808,"v":1.0}"#,
            r#"{"x":2.457244779466174e-242,"n":-9007199254740993}"#,
            r#"[{"b":"\ud83d\ude00"},"a"]"#,
        ] {
            let value: Value = serde_json::from_str(text).unwrap();
            assert_eq!(
                Canonical::of_raw(text).unwrap().hash(),
                hash(&value),
                "{text}"
            );
        }
        assert_eq!(
            Canonical::of_raw(r#"{"spec":{"containers":[]}}"#)
                .unwrap()
                .hash(),
            "f00de3f067f25bf79c11"
        );
        assert!(Canonical::of_raw(r#"{"a":1} x"#).is_err());
        assert!(Canonical::of_raw(r#"{"a":1"#).is_err());
        assert_eq!(
            Canonical::of_raw(r#"{ "b" : [ 1 , 2 ], "a":{} }"#).unwrap(),
            Canonical::of_raw(r#"{"a":{},"b":[1,2]}"#).unwrap()
        );
    }

    #[test]
    fn hash_tells_structure_apart() {
        assert_ne!(hash(&json!(["a", "b"])), hash(&json!(["a,\"b"])));
        assert_ne!(hash(&json!({"a": "b"})), hash(&json!({"a\":\"b": null})));
        assert_ne!(hash(&json!(1)), hash(&json!("1")));
    }
}
