//! The AdmissionReview wire format, read and written the lean way.
//!
//! kube-core's `AdmissionReview<T>` flattens its `TypeMeta`, which makes serde buffer the whole
//! review (managedFields, status, both objects) into an intermediate tree before reading it; for an
//! 8 KB review that is most of the webhook's time. Here the envelope is read without flattening,
//! the Deployment as a [`DeploymentView`] that keeps only what the decision reads (metadata names,
//! fledge's labels and annotations, and the pod template as raw JSON) and skips everything else unparsed,
//! and the request as a [`ReviewRequest`]: kube-core's `AdmissionRequest` without the parts the decision
//! never reads.
//!
//! The answer is written here too, because kube-core serializes the JSONPatch (a Go `[]byte`) as an
//! array of numbers (kube-rs issue 1781), which the API server rejects: it wants base64.

use std::borrow::Cow;
use std::collections::BTreeMap;

use base64::Engine as _;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::core::GroupVersionKind;
use kube::core::admission::{META_API_VERSION_V1, META_KIND, Operation};
use kube::core::{NamespaceResourceScope, Resource, TypeMeta};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::value::RawValue;
use serde_json::{Value, json};

use super::{AdmissionOutcome, Decision};
use crate::core::spec;
use crate::core::template::Text;

/// An apps/v1 Deployment as the webhook reads it. The pod template stays raw JSON, exactly as the
/// API server sent it, so that no field is lost however new it is.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DeploymentView {
    pub metadata: ObjectMeta,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spec: Option<SpecView>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SpecView {
    /// Read for the pod-ratio router's warnings only; anything but a whole number reads as absent
    /// (the API server validates it).
    #[serde(
        default,
        deserialize_with = "whole_number",
        skip_serializing_if = "Option::is_none"
    )]
    pub replicas: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<RawJson>,
}

/// A value's JSON text exactly as the API server sent it, kept unparsed. It is read (and so
/// checked to be JSON) only where the decision needs its content: when it is hashed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawJson(Box<str>);

impl RawJson {
    pub fn get(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for RawJson {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Ok(RawJson(Box::<RawValue>::deserialize(deserializer)?.into()))
    }
}

impl Serialize for RawJson {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serde_json::from_str::<&RawValue>(&self.0)
            .map_err(serde::ser::Error::custom)?
            .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for DeploymentView {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Fields {
            #[serde(default, deserialize_with = "lean_metadata")]
            metadata: ObjectMeta,
            #[serde(default, deserialize_with = "optional_object")]
            spec: Option<SpecView>,
        }
        let fields: Fields = object(deserializer)?;
        Ok(DeploymentView {
            metadata: fields.metadata,
            spec: fields.spec,
        })
    }
}

/// A whole number, or `None` for any other JSON value, which is skipped unread as an unknown
/// field would be, not refused.
fn whole_number<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<u64>, D::Error> {
    struct WholeNumber;
    impl<'de> serde::de::Visitor<'de> for WholeNumber {
        type Value = Option<u64>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("any JSON value")
        }
        fn visit_u64<E>(self, n: u64) -> Result<Self::Value, E> {
            Ok(Some(n))
        }
        fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Self::Value, A::Error> {
            while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
            Ok(None)
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut map: A,
        ) -> Result<Self::Value, A::Error> {
            while map
                .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
                .is_some()
            {}
            Ok(None)
        }
    }
    deserializer.deserialize_any(WholeNumber)
}

/// Reads `T` only from a JSON object. serde's derived structs also accept an array and take its items
/// for the fields in order, which would make the decision read (and patch) places that are not there.
fn object<'de, D: Deserializer<'de>, T: Deserialize<'de>>(deserializer: D) -> Result<T, D::Error> {
    struct OnlyMaps<T>(std::marker::PhantomData<T>);
    impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for OnlyMaps<T> {
        type Value = T;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
            T::deserialize(serde::de::value::MapAccessDeserializer::new(map))
        }
    }
    deserializer.deserialize_map(OnlyMaps(std::marker::PhantomData))
}

/// Like [`object`], with `null` read as absent.
fn optional_object<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    deserializer: D,
) -> Result<Option<T>, D::Error> {
    struct Wrapped<T>(T);
    impl<'de, T: Deserialize<'de>> Deserialize<'de> for Wrapped<T> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            object(d).map(Wrapped)
        }
    }
    Ok(Option::<Wrapped<T>>::deserialize(deserializer)?.map(|w| w.0))
}

impl DeploymentView {
    /// `spec.template` as raw JSON.
    pub fn template(&self) -> Option<&str> {
        self.spec.as_ref()?.template.as_ref().map(RawJson::get)
    }

    /// `spec.replicas`; absent is 1, as Kubernetes defaults it.
    pub fn replicas(&self) -> u64 {
        self.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1)
    }

    /// `spec.paused`; absent is `false`, as Kubernetes reads it.
    pub fn paused(&self) -> bool {
        self.spec.as_ref().and_then(|s| s.paused) == Some(true)
    }
}

impl Resource for DeploymentView {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        "Deployment".into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        "apps".into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        "v1".into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        "deployments".into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// Reads only the metadata fields the decision uses: all labels (policies select Deployments by
/// any of them) and only fledge's annotations; managedFields and the rest are skipped.
fn lean_metadata<'de, D: Deserializer<'de>>(deserializer: D) -> Result<ObjectMeta, D::Error> {
    #[derive(Deserialize)]
    struct Lean {
        name: Option<String>,
        namespace: Option<String>,
        uid: Option<String>,
        #[serde(default)]
        labels: Option<BTreeMap<String, String>>,
        #[serde(default, deserialize_with = "fledge_entries")]
        annotations: Option<BTreeMap<String, String>>,
    }
    let lean: Option<Lean> = optional_object(deserializer)?;
    Ok(lean.map_or_else(ObjectMeta::default, |l| ObjectMeta {
        name: l.name,
        namespace: l.namespace,
        uid: l.uid,
        labels: l.labels,
        annotations: l.annotations,
        ..ObjectMeta::default()
    }))
}

/// The `fledge.dev/*` entries of an annotations map: the decision reads no others. The
/// rest (`kubectl.kubernetes.io/last-applied-configuration` above all) must still be strings, but
/// is neither copied nor unescaped: it is skipped as raw JSON and checked to be a string.
fn fledge_entries<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<BTreeMap<String, String>>, D::Error> {
    struct Entries(BTreeMap<String, String>);
    impl<'de> Deserialize<'de> for Entries {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_map(EntriesVisitor)
        }
    }
    struct EntriesVisitor;
    impl<'de> serde::de::Visitor<'de> for EntriesVisitor {
        type Value = Entries;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a map of strings")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Entries, A::Error> {
            let mut kept = BTreeMap::new();
            while let Some(Text(key)) = map.next_key::<Text<'de>>()? {
                if key.starts_with(spec::PREFIX) {
                    kept.insert(key.into_owned(), map.next_value::<String>()?);
                } else if !map.next_value::<&'de RawValue>()?.get().starts_with('"') {
                    return Err(serde::de::Error::invalid_type(
                        serde::de::Unexpected::Other(&format!("a non-string value for {key}")),
                        &self,
                    ));
                }
            }
            Ok(Entries(kept))
        }
    }
    Ok(Option::<Entries>::deserialize(deserializer)?.map(|e| e.0))
}

/// An AdmissionRequest as the decision reads it: kube-core's [`AdmissionRequest`] without the
/// parts fledge never reads (userInfo, resource, requestKind, requestResource, the subresources),
/// which are skipped unparsed, not read into strings and maps only to be dropped.
///
/// [`AdmissionRequest`]: kube::core::admission::AdmissionRequest
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReviewRequest {
    /// The review's apiVersion and kind, which the answer repeats.
    #[serde(skip)]
    pub types: TypeMeta,
    pub uid: String,
    pub kind: GroupVersionKind,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    pub operation: Operation,
    #[serde(default)]
    pub object: Option<DeploymentView>,
    #[serde(default)]
    pub old_object: Option<DeploymentView>,
    #[serde(default)]
    pub dry_run: bool,
    /// The operation's options; the decision reads `fieldManager`.
    #[serde(default)]
    pub options: ReviewOptions,
}

/// The options of a review's operation, as far as the decision reads them. Any other shape (or a
/// `fieldManager` that is not a string) reads as none, as a lookup in the JSON would; nothing is
/// refused here.
#[derive(Clone, Debug, Default)]
pub struct ReviewOptions {
    pub field_manager: Option<String>,
}

impl<'de> Deserialize<'de> for ReviewOptions {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Fields<'a> {
            #[serde(rename = "fieldManager", borrow)]
            field_manager: Option<&'a RawValue>,
        }
        // Read as raw JSON first, so that a shape other than an object is skipped, not refused.
        let raw = <&RawValue>::deserialize(deserializer)?;
        let field_manager = (raw.get().starts_with('{'))
            .then(|| serde_json::from_str::<Fields>(raw.get()).ok())
            .flatten()
            .and_then(|f| f.field_manager)
            .and_then(|m| serde_json::from_str(m.get()).ok());
        Ok(ReviewOptions { field_manager })
    }
}

/// The envelope, read without `#[serde(flatten)]`.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Envelope {
    #[serde(default)]
    api_version: String,
    #[serde(default)]
    kind: String,
    request: Option<ReviewRequest>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    #[error("{0}")]
    Json(#[from] serde_json::Error),
    #[error("the body is not UTF-8, as JSON must be: {0}")]
    Utf8(#[from] std::str::Utf8Error),
    #[error("the AdmissionReview has no request to answer")]
    NoRequest,
    #[error("request.uid is empty; the API server needs it to match the answer")]
    NoUid,
    #[error(
        "apiVersion {0:?} is not an AdmissionReview version fledge answers (admission.k8s.io/v1 or v1beta1)"
    )]
    Version(String),
}

/// AdmissionReview versions: v1, and v1beta1 for API servers older than 1.16 (same shape).
const VERSIONS: [&str; 2] = [META_API_VERSION_V1, "admission.k8s.io/v1beta1"];

/// Parses an AdmissionReview body.
pub fn parse(body: &[u8]) -> Result<ReviewRequest, ReviewError> {
    // Checked as UTF-8 once, in bulk, rather than string by string (JSON is UTF-8 throughout); with
    // SIMD where the CPU has it, and by the standard library again for the error's position.
    let text = match simdutf8::basic::from_utf8(body) {
        Ok(text) => text,
        Err(_) => std::str::from_utf8(body)?,
    };
    // serde reads the body without the values the decision never reads (see `unread`), and the
    // templates are taken from the body as sent. Should that fail, the body is read as sent, so
    // that an error names places in what was sent.
    super::unread::read_lean(text, |lean| {
        let mut request = parse_text(lean.text).ok()?;
        for (object, span) in [
            (&mut request.object, lean.templates.object),
            (&mut request.old_object, lean.templates.old_object),
        ] {
            if let Some((from, to)) = span {
                let spec = object.as_mut()?.spec.as_mut()?;
                spec.template = Some(RawJson(text.get(from..to)?.into()));
            }
        }
        Some(request)
    })
    .flatten()
    .map_or_else(|| parse_text(text), Ok)
}

fn parse_text(text: &str) -> Result<ReviewRequest, ReviewError> {
    let envelope: Envelope = serde_json::from_str(text)?;
    if !envelope.api_version.is_empty() && !VERSIONS.contains(&envelope.api_version.as_str()) {
        return Err(ReviewError::Version(envelope.api_version));
    }
    let mut request = envelope.request.ok_or(ReviewError::NoRequest)?;
    if request.uid.is_empty() {
        return Err(ReviewError::NoUid);
    }
    request.types = TypeMeta {
        api_version: envelope.api_version,
        kind: envelope.kind,
    };
    Ok(request)
}

/// An AdmissionReview v1 for a Deployment as kube-apiserver sends one: CREATE without `old`,
/// UPDATE with it. `fledge plan` and the tests build their reviews with it.
pub fn deployment_review(uid: &str, username: &str, object: &Value, old: Option<&Value>) -> Value {
    let (operation, options) = match old {
        Some(_) => ("UPDATE", "UpdateOptions"),
        None => ("CREATE", "CreateOptions"),
    };
    json!({
        "apiVersion": META_API_VERSION_V1,
        "kind": META_KIND,
        "request": {
            "uid": uid,
            "kind": {"group": "apps", "version": "v1", "kind": "Deployment"},
            "resource": {"group": "apps", "version": "v1", "resource": "deployments"},
            "requestKind": {"group": "apps", "version": "v1", "kind": "Deployment"},
            "requestResource": {"group": "apps", "version": "v1", "resource": "deployments"},
            "name": object["metadata"]["name"],
            "namespace": object["metadata"]["namespace"],
            "operation": operation,
            "userInfo": {"username": username},
            "object": object,
            "oldObject": old,
            "dryRun": false,
            "options": {"kind": options, "apiVersion": "meta.k8s.io/v1"},
        }
    })
}

/// `request.uid` of a body that may be no valid AdmissionReview otherwise; everything else is
/// skipped without being read into a tree, so any nesting depth elsewhere is fine.
pub fn uid(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct UidOnly {
        request: Option<RequestUid>,
    }
    #[derive(Deserialize)]
    struct RequestUid {
        uid: Option<String>,
    }
    serde_json::from_slice::<UidOnly>(body).ok()?.request?.uid
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ReviewOut<'a> {
    api_version: &'a str,
    kind: &'a str,
    response: ResponseOut<'a>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ResponseOut<'a> {
    uid: &'a str,
    allowed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<StatusOut>,
    #[serde(skip_serializing_if = "Option::is_none")]
    patch_type: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    patch: Option<String>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    warnings: &'a [String],
}

#[derive(Serialize)]
struct StatusOut {
    status: &'static str,
    message: String,
    reason: &'static str,
    code: u16,
}

/// The AdmissionReview JSON answering `uid` with `decision`, in the review's own `apiVersion`.
pub fn answer(
    api_version: &str,
    uid: &str,
    decision: &Decision,
) -> Result<Vec<u8>, serde_json::Error> {
    let mut response = ResponseOut {
        uid,
        allowed: true,
        status: None,
        patch_type: None,
        patch: None,
        warnings: &decision.warnings,
    };
    match &decision.outcome {
        AdmissionOutcome::Allow(_) => {}
        AdmissionOutcome::Deny(denial) => {
            response.allowed = false;
            response.status = Some(StatusOut {
                status: "Failure",
                message: denial.to_string(),
                reason: "BadRequest",
                code: 400,
            });
        }
        AdmissionOutcome::Patch(_, patch) => {
            let json = serde_json::to_vec(patch)?;
            response.patch_type = Some("JSONPatch");
            response.patch = Some(base64::engine::general_purpose::STANDARD.encode(json));
        }
    }
    serde_json::to_vec(&ReviewOut {
        api_version: if api_version.is_empty() {
            META_API_VERSION_V1
        } else {
            api_version
        },
        kind: META_KIND,
        response,
    })
}

/// The answer to a review that could not be read but whose uid is known: not allowed, with why.
pub fn unreadable(uid: &str, message: &str) -> Result<Vec<u8>, serde_json::Error> {
    answer(
        META_API_VERSION_V1,
        uid,
        &Decision {
            outcome: AdmissionOutcome::Deny(message.to_owned().into()),
            warnings: Vec::new(),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uid_is_found_beside_anything() {
        let deep = format!(
            r#"{{"request":{{"object":{}1{},"uid":"u-deep"}}}}"#,
            "[".repeat(5000),
            "]".repeat(5000)
        );
        assert_eq!(uid(deep.as_bytes()), Some("u-deep".to_owned()));
        assert_eq!(uid(br#"{"request":{"uid":7}}"#), None);
        assert_eq!(uid(b"{"), None);
    }

    fn review(object: &str) -> String {
        format!(
            r#"{{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{{"uid":"u","kind":{{"group":"apps","version":"v1","kind":"Deployment"}},"resource":{{"group":"apps","version":"v1","resource":"deployments"}},"name":"web","operation":"CREATE","userInfo":{{}},"object":{object}}}}}"#
        )
    }

    #[test]
    fn objects_must_be_json_objects() {
        let ok =
            parse(review(r#"{"metadata":{"name":"web"},"spec":{"template":{"a":1}}}"#).as_bytes())
                .unwrap();
        let view = ok.object.unwrap();
        assert_eq!(view.metadata.name.as_deref(), Some("web"));
        assert_eq!(view.template(), Some(r#"{"a":1}"#));
        for bad in [
            r#"{"metadata":{"name":"web"},"spec":[{"a":1}]}"#,
            r#"{"metadata":["web"],"spec":{"template":{}}}"#,
            r#"["web"]"#,
        ] {
            let err = parse(review(bad).as_bytes()).unwrap_err().to_string();
            assert!(err.contains("expected a JSON object"), "{bad}: {err}");
        }
        let null_parts = parse(review(r#"{"metadata":null,"spec":null}"#).as_bytes()).unwrap();
        assert!(null_parts.object.unwrap().spec.is_none());
    }

    #[test]
    fn all_labels_and_only_fledges_annotations_are_kept_and_all_must_be_strings() {
        let object = r#"{"metadata":{"name":"web","labels":{"app":"web","fledge.dev/enabled":"true"},"annotations":{"kubectl.kubernetes.io/last-applied-configuration":"{\"a\":1}","fledge\u002edev/steps":"- setWeight: 5","\u0078":"y"}}}"#;
        let view = parse(review(object).as_bytes()).unwrap().object.unwrap();
        let pairs = |map: Option<BTreeMap<String, String>>| -> Vec<(String, String)> {
            map.unwrap().into_iter().collect()
        };
        assert_eq!(
            pairs(view.metadata.labels),
            [
                ("app".to_owned(), "web".to_owned()),
                ("fledge.dev/enabled".to_owned(), "true".to_owned())
            ]
        );
        assert_eq!(
            pairs(view.metadata.annotations),
            [("fledge.dev/steps".to_owned(), "- setWeight: 5".to_owned())]
        );
        for bad in [
            r#"{"metadata":{"annotations":{"other":1}}}"#,
            r#"{"metadata":{"labels":{"app":null}}}"#,
            r#"{"metadata":{"labels":["app"]}}"#,
        ] {
            assert!(parse(review(bad).as_bytes()).is_err(), "{bad}");
        }
        let null = parse(review(r#"{"metadata":{"labels":null}}"#).as_bytes()).unwrap();
        assert!(null.object.unwrap().metadata.labels.is_none());
    }

    #[test]
    fn numbers_in_the_stable_template_are_hashed_exactly() {
        // Go writes floats as the shortest text that round-trips; the stable template's identity
        // must be that value's, not a neighbouring one's, or the controller (reading the same
        // JSON) would not recognise it.
        let stable = r#"{"metadata":{"labels":{"app":"web"}},"spec":{"x":2.457244779466174e-242,"n":-9007199254740993}}"#;
        let canary = stable.replace("-242", "-241");
        let object = |template: &str| {
            format!(
                r#"{{"metadata":{{"name":"web","labels":{{"fledge.dev/enabled":"true"}},"annotations":{{"fledge.dev/steps":"- setWeight: 5"}}}},"spec":{{"template":{template}}}}}"#
            )
        };
        let body = review(&object(&canary))
            .replace("CREATE", "UPDATE")
            .replacen(
                r#""object":"#,
                &format!(r#""oldObject":{},"object":"#, object(stable)),
                1,
            );
        let request = parse(body.as_bytes()).unwrap();
        let reply: Value = serde_json::from_slice(
            &answer(
                "",
                "u",
                &super::super::decide(&request, &Default::default()),
            )
            .unwrap(),
        )
        .unwrap();
        let patch = base64::engine::general_purpose::STANDARD
            .decode(reply["response"]["patch"].as_str().unwrap())
            .unwrap();
        let patch: Value = serde_json::from_slice(&patch).unwrap();
        let recorded = &patch[0]["value"];
        let hash = |text: &str| crate::core::template::hash(&serde_json::from_str(text).unwrap());
        assert_eq!(
            patch[0]["path"],
            "/metadata/annotations/fledge.dev~1stable-hash"
        );
        assert_eq!(*recorded, json!(hash(stable)));
        let neighbour = stable.replace("2.457244779466174e-242", "2.4572447794661738e-242");
        assert_ne!(*recorded, json!(hash(&neighbour)));
    }

    #[test]
    fn a_body_that_is_not_utf8_is_refused_wherever_the_bad_byte_is() {
        let mut body = review(r#"{"metadata":{"managedFields":[{"manager":"ab"}]}}"#).into_bytes();
        let at = body.windows(2).position(|w| w == b"ab").unwrap();
        body[at] = 0xff;
        let err = parse(&body).unwrap_err().to_string();
        assert!(err.starts_with("the body is not UTF-8"), "{err}");
        assert_eq!(
            uid(&body),
            Some("u".to_owned()),
            "the answer can still name the request"
        );
    }

    #[test]
    fn versions_and_uids_are_checked() {
        let body = review("{}");
        assert!(matches!(
            parse(body.replace(r#""uid":"u""#, r#""uid":"""#).as_bytes()),
            Err(ReviewError::NoUid)
        ));
        let other = body.replace("admission.k8s.io/v1", "garbage");
        assert_eq!(
            parse(other.as_bytes()).unwrap_err().to_string(),
            r#"apiVersion "garbage" is not an AdmissionReview version fledge answers (admission.k8s.io/v1 or v1beta1)"#
        );
        let beta = body.replace("admission.k8s.io/v1", "admission.k8s.io/v1beta1");
        let answer: serde_json::Value = serde_json::from_slice(
            &super::answer(
                &parse(beta.as_bytes()).unwrap().types.api_version,
                "u",
                &Decision {
                    outcome: AdmissionOutcome::Allow(super::super::AllowReason::FirstDeploy),
                    warnings: vec![],
                },
            )
            .unwrap(),
        )
        .unwrap();
        assert_eq!(answer["apiVersion"], "admission.k8s.io/v1beta1");
    }

    /// A parse's outcome as text, errors included, to compare two ways of reading.
    fn outcome(read: Result<ReviewRequest, ReviewError>) -> String {
        format!("{:?}", read.map_err(|e| e.to_string()))
    }

    /// The common-path fixture, compacted as the API server sends it.
    fn scale_only_review() -> String {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/data/update-scale-only.json"
        ))
        .unwrap();
        serde_json::from_str::<Value>(&text).unwrap().to_string()
    }

    /// JSON with the bytes that matter to the structural index (quotes, backslashes, brackets)
    /// in its strings and keys.
    fn any_json() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let text = "[\"\\\\{}\\[\\]a-z é😀\n/:,]{0,10}";
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            text.prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 48, 5, move |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
                prop::collection::btree_map(text, inner, 0..5)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(1_000))]

        /// Cutting out the values the decision never reads changes nothing serde reads, wherever
        /// odd JSON sits: in the cut values, beside them, and in the kept ones.
        #[test]
        fn a_review_reads_the_same_with_its_unread_values_cut(
            managed in any_json(),
            status in any_json(),
            annotation in any_json(),
            label in any_json(),
            template in any_json(),
            user in any_json(),
            pretty in proptest::prelude::any::<bool>(),
        ) {
            let object = json!({
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": {
                    "name": "web",
                    "labels": {"app": label.to_string(), "fledge.dev/enabled": "true"},
                    "annotations": {
                        "fledge.dev/steps": "- setWeight: 10",
                        "kubectl.kubernetes.io/last-applied-configuration": annotation.to_string(),
                        "odd": annotation,
                        "fledge.dev/\"x\\": "y",
                    },
                    "managedFields": managed,
                },
                "spec": {"replicas": 3, "template": template},
                "status": status,
            });
            let mut review = deployment_review("u", "alice", &object, Some(&object));
            review["request"]["userInfo"] = user;
            let body = if pretty {
                serde_json::to_string_pretty(&review).unwrap()
            } else {
                review.to_string()
            };
            proptest::prop_assert_eq!(outcome(parse(body.as_bytes())), outcome(parse_text(&body)));
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2_000))]

        /// A review broken anywhere (a byte changed to one that matters to JSON, or cut short) is
        /// read as without the cut wherever it is still JSON, and never panics.
        #[test]
        fn a_broken_review_is_read_as_sent_or_refused(
            at in 0..9_818usize,
            byte in proptest::sample::select(b"\"\\{}[]:, x".to_vec()),
            cut_short in proptest::prelude::any::<bool>(),
        ) {
            let mut body = scale_only_review().into_bytes();
            let at = at % body.len();
            if cut_short {
                body.truncate(at);
            } else {
                body[at] = byte;
            }
            let sent = parse_text(std::str::from_utf8(&body).unwrap());
            let lean = parse(&body);
            if sent.is_ok() || lean.is_err() {
                proptest::prop_assert_eq!(outcome(lean), outcome(sent));
            }
        }
    }

    #[test]
    fn options_give_a_field_manager_only_when_it_is_a_string_in_an_object() {
        for (options, expected) in [
            (
                r#"{"kind":"UpdateOptions","fieldManager":"kubectl"}"#,
                Some("kubectl"),
            ),
            (r#"{"fieldManager":"a\u0062"}"#, Some("ab")),
            (r#"{"fieldManager":7}"#, None),
            (r#"{"fieldManager":null}"#, None),
            (r#"["kubectl"]"#, None),
            (r#""kubectl""#, None),
            ("null", None),
        ] {
            let body = review("{}").replace(
                r#""userInfo":{}"#,
                &format!(r#""userInfo":{{}},"options":{options}"#),
            );
            let request = parse(body.as_bytes()).unwrap();
            assert_eq!(
                request.options.field_manager.as_deref(),
                expected,
                "{options}"
            );
        }
        assert_eq!(
            parse(review("{}").as_bytes())
                .unwrap()
                .options
                .field_manager,
            None
        );
    }

    #[test]
    fn every_fixture_reads_the_same_with_its_unread_values_cut() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
        let mut cut = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let compact = serde_json::from_str::<Value>(&text).unwrap().to_string();
            for body in [&text, &compact] {
                let lean = super::super::unread::read_lean(body, |lean| lean.text.to_owned());
                if let Some(lean) = lean {
                    assert!(lean.len() < body.len(), "{}", path.display());
                    assert!(!lean.contains("\"f:spec\""), "{}", path.display());
                    cut += 1;
                }
                assert_eq!(
                    outcome(parse(body.as_bytes())),
                    outcome(parse_text(body)),
                    "{}",
                    path.display()
                );
            }
        }
        assert!(cut >= 10, "only {cut} fixtures had values cut");
    }

    #[test]
    fn an_error_names_its_place_in_the_body_as_sent() {
        let compact = scale_only_review();
        // Broken after the first managedFields, which the lean copy no longer has.
        let broken = compact.replacen(r#""replicas":"#, r#""replicas":x"#, 1);
        let error = parse(broken.as_bytes()).unwrap_err().to_string();
        let at = broken.find(r#""replicas":x"#).unwrap() + r#""replicas":"#.len() + 1;
        assert!(error.ends_with(&format!("line 1 column {at}")), "{error}");
    }
}
