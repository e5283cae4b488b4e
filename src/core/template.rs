//! Pod templates as raw JSON, and their stable identity.
//!
//! Templates are kept as `serde_json::Value`, never round-tripped through typed structs: a field
//! newer than fledge's Kubernetes types must survive untouched in both the stable and the canary.

use serde_json::Value;
use sha2::{Digest, Sha256};

/// Hex characters of the SHA-256 kept as a template's identity (80 bits).
const HASH_LEN: usize = 20;

/// A stable hash of a pod template: the same for the same content whatever the key order, and the
/// same across fledge versions (it is stored in annotations).
pub fn hash(template: &Value) -> String {
    let mut hasher = Sha256::new();
    write_canonical(template, &mut hasher);
    let digest = hasher.finalize();
    let mut hex = String::with_capacity(HASH_LEN);
    for byte in digest.iter().take(HASH_LEN / 2) {
        hex.push_str(&format!("{byte:02x}"));
    }
    hex
}

/// Canonical JSON (objects with sorted keys, no whitespace) fed straight into the hasher, so that
/// hashing does not depend on how serde_json orders maps.
fn write_canonical(value: &Value, hasher: &mut Sha256) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort_unstable();
            hasher.update(b"{");
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    hasher.update(b",");
                }
                write_json_string(key, hasher);
                hasher.update(b":");
                if let Some(v) = map.get(key) {
                    write_canonical(v, hasher);
                }
            }
            hasher.update(b"}");
        }
        Value::Array(items) => {
            hasher.update(b"[");
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    hasher.update(b",");
                }
                write_canonical(item, hasher);
            }
            hasher.update(b"]");
        }
        Value::String(text) => write_json_string(text, hasher),
        scalar => hasher.update(scalar.to_string().as_bytes()),
    }
}

/// A JSON string literal, escaped as serde_json escapes it, written without an allocation.
fn write_json_string(text: &str, hasher: &mut Sha256) {
    struct Sink<'h>(&'h mut Sha256);
    impl std::io::Write for Sink<'_> {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.update(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    // Writing into a hasher cannot fail, and a `str` always serializes.
    let _ = serde_json::to_writer(Sink(hasher), text);
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
    fn hash_tells_structure_apart() {
        assert_ne!(hash(&json!(["a", "b"])), hash(&json!(["a,\"b"])));
        assert_ne!(hash(&json!({"a": "b"})), hash(&json!({"a\":\"b": null})));
        assert_ne!(hash(&json!(1)), hash(&json!("1")));
    }
}
