//! A web request: any method, headers (inline or from Secrets), a body, and a JSONPath into the
//! JSON answer.

use serde_json::Value;
use serde_json_path::JsonPath;

use super::{MeasureContext, MeasureError, resolve, send};
use crate::core::analysis::{Reading, WebRequest};

pub(super) async fn measure(
    ctx: &MeasureContext,
    check: &WebRequest,
) -> Result<Reading, MeasureError> {
    let url = ctx.variables.expand(check.url.trim());
    let parsed = reqwest::Url::parse(&url).map_err(|e| MeasureError::InvalidUrl {
        url: url.clone(),
        detail: e.to_string(),
    })?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(MeasureError::InvalidUrl {
            url,
            detail: "only http and https are supported".into(),
        });
    }
    let method_text = check.method.trim().to_ascii_uppercase();
    let method = reqwest::Method::from_bytes(method_text.as_bytes())
        .map_err(|_| MeasureError::InvalidMethod(check.method.clone()))?;
    // Parse the JSONPath before sending: a typo should not cost a request.
    let path = match &check.json_path {
        Some(p) => Some(JsonPath::parse(p).map_err(|e| MeasureError::JsonPath {
            url: url.clone(),
            path: p.clone(),
            detail: e.to_string(),
        })?),
        None => None,
    };
    let mut request = ctx.http.request(method, parsed);
    for (name, value) in &check.headers {
        let value = resolve(ctx, value).await?;
        let invalid = || MeasureError::InvalidHeader {
            url: url.clone(),
            name: name.clone(),
        };
        let header_name =
            reqwest::header::HeaderName::from_bytes(name.as_bytes()).map_err(|_| invalid())?;
        let mut header_value =
            reqwest::header::HeaderValue::from_str(&value).map_err(|_| invalid())?;
        header_value.set_sensitive(true);
        request = request.header(header_name, header_value);
    }
    if let Some(body) = &check.body {
        request = request.body(ctx.variables.expand(body));
    }
    let answer = send(request, &method_text, &url, check.timeout).await?;
    if !answer.status.is_success() {
        return Err(MeasureError::Status {
            method: method_text,
            url,
            status: answer.status.as_u16(),
            body: String::from_utf8_lossy(&answer.body).into_owned(),
        });
    }
    reading(
        &url,
        check.json_path.as_deref(),
        path.as_ref(),
        &answer.body,
    )
}

/// What a 2xx answer's body means: with a JSONPath, the nodes it selects (none →
/// [`Reading::NoData`], one → that value, several → a list); without, the JSON answer, or else
/// its text.
pub(super) fn reading(
    url: &str,
    path_text: Option<&str>,
    path: Option<&JsonPath>,
    body: &[u8],
) -> Result<Reading, MeasureError> {
    let json: Result<Value, _> = serde_json::from_slice(body);
    let Some(path) = path else {
        return Ok(Reading::Value(match json {
            Ok(v) => v,
            Err(_) => Value::String(String::from_utf8_lossy(body).into_owned()),
        }));
    };
    let json = json.map_err(|e| MeasureError::NotJson {
        url: url.to_string(),
        path: path_text.unwrap_or_default().to_string(),
        detail: e.to_string(),
    })?;
    let mut nodes = path.query(&json).all();
    Ok(match nodes.len() {
        0 => Reading::NoData,
        1 => Reading::Value(nodes.remove(0).clone()),
        _ => Reading::Value(Value::Array(nodes.into_iter().cloned().collect())),
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn read(path: Option<&str>, body: &str) -> Result<Reading, String> {
        let parsed = path.map(|p| JsonPath::parse(p).expect("a valid path"));
        reading("http://x/", path, parsed.as_ref(), body.as_bytes()).map_err(|e| e.to_string())
    }

    #[test]
    fn json_paths_select_none_one_or_several_nodes() {
        let body = r#"{"ok": true, "items": [{"v": 1}, {"v": 2}]}"#;
        assert_eq!(read(Some("$.ok"), body), Ok(Reading::Value(json!(true))));
        assert_eq!(
            read(Some("$.items[*].v"), body),
            Ok(Reading::Value(json!([1, 2])))
        );
        assert_eq!(read(Some("$.missing"), body), Ok(Reading::NoData));
        let e = read(Some("$.ok"), "not json").unwrap_err();
        assert!(e.contains("not JSON") && e.contains("$.ok"), "{e}");
    }

    #[test]
    fn without_a_path_the_json_or_the_text() {
        assert_eq!(
            read(None, r#"{"a": 1}"#),
            Ok(Reading::Value(json!({"a": 1})))
        );
        assert_eq!(read(None, "7"), Ok(Reading::Value(json!(7))));
        assert_eq!(read(None, "up\n"), Ok(Reading::Value(json!("up\n"))));
    }
}
