//! A Prometheus instant query: `GET {address}/api/v1/query?query=…`.

use serde_json::Value;

use super::{MeasureContext, MeasureError, resolve, send};
use crate::core::analysis::{PrometheusAuth, PrometheusQuery, Reading};

pub(super) async fn measure(
    ctx: &MeasureContext,
    check: &PrometheusQuery,
) -> Result<Reading, MeasureError> {
    let address = check
        .address
        .as_deref()
        .or(ctx.default_prometheus.as_deref())
        .filter(|a| !a.trim().is_empty())
        .ok_or(MeasureError::NoPrometheusAddress)?;
    let address = ctx.variables.expand(address.trim());
    let address = address.trim_end_matches('/').to_string();
    let url = format!("{address}/api/v1/query");
    let parsed = reqwest::Url::parse(&url).map_err(|e| MeasureError::InvalidUrl {
        url: url.clone(),
        detail: e.to_string(),
    })?;
    let query = ctx.variables.expand(&check.query);
    let mut request = ctx.http.get(parsed).query(&[("query", query.as_str())]);
    match &check.auth {
        None => {}
        Some(PrometheusAuth::Bearer(token)) => {
            request = request.bearer_auth(resolve(ctx, token).await?);
        }
        Some(PrometheusAuth::Basic { username, password }) => {
            let username = resolve(ctx, username).await?;
            let password = resolve(ctx, password).await?;
            request = request.basic_auth(username, Some(password));
        }
    }
    let answer = send(request, "GET", &url, check.timeout).await?;
    reading(&address, answer.status.as_u16(), &answer.body)
}

/// What Prometheus' answer means. Errors name `address`.
///
/// - `status: error` (Prometheus answers so with 400, 422, 503...): its `errorType` and `error`;
/// - any other non-2xx answer: the status;
/// - a `vector`: its samples' values, NaN ones left out: none left → [`Reading::NoData`], one →
///   that number, several → a list of numbers (in Prometheus' order);
/// - a `scalar`: its number, NaN → [`Reading::NoData`];
/// - ±Inf anywhere: an error (no condition can compare it);
/// - `matrix`, `string`, native histograms: an error asking for an instant vector or scalar.
pub(super) fn reading(address: &str, status: u16, body: &[u8]) -> Result<Reading, MeasureError> {
    let answer_error = |detail: String| MeasureError::PrometheusAnswer {
        address: address.to_string(),
        detail,
    };
    let json: Result<Value, _> = serde_json::from_slice(body);
    if let Ok(json) = &json
        && json["status"] == "error"
    {
        return Err(MeasureError::PrometheusError {
            address: address.to_string(),
            error_type: json["errorType"].as_str().unwrap_or("error").to_string(),
            error: json["error"].as_str().unwrap_or_default().to_string(),
        });
    }
    if !(200..300).contains(&status) {
        return Err(MeasureError::Status {
            method: "GET".into(),
            url: format!("{address}/api/v1/query"),
            status,
            body: String::from_utf8_lossy(body).into_owned(),
        });
    }
    let json = json.map_err(|e| answer_error(format!("not JSON: {e}")))?;
    if json["status"] != "success" {
        return Err(answer_error(format!("status {}", json["status"])));
    }
    let data = &json["data"];
    let result_type = data["resultType"].as_str().unwrap_or_default();
    let result = &data["result"];
    let unsupported = |result_type: &str| MeasureError::PrometheusResultType {
        address: address.to_string(),
        result_type: result_type.to_string(),
    };
    match result_type {
        "vector" => {
            let samples = result
                .as_array()
                .ok_or_else(|| answer_error("a vector without a result list".into()))?;
            let mut values = Vec::with_capacity(samples.len());
            for sample in samples {
                if sample.get("histogram").is_some() {
                    return Err(unsupported("native histogram"));
                }
                if let Some(v) = sample_value(address, &sample["value"])? {
                    values.push(v);
                }
            }
            Ok(match values.len() {
                0 => Reading::NoData,
                1 => Reading::Value(number(values[0])),
                _ => Reading::Value(Value::Array(values.into_iter().map(number).collect())),
            })
        }
        "scalar" => Ok(match sample_value(address, result)? {
            Some(v) => Reading::Value(number(v)),
            None => Reading::NoData,
        }),
        "" => Err(answer_error("no resultType".into())),
        other => Err(unsupported(other)),
    }
}

/// A `[timestamp, "value"]` pair's value; `None` for NaN.
fn sample_value(address: &str, pair: &Value) -> Result<Option<f64>, MeasureError> {
    let text = pair[1]
        .as_str()
        .ok_or_else(|| MeasureError::PrometheusAnswer {
            address: address.to_string(),
            detail: format!("a sample without a value: {pair}"),
        })?;
    let value: f64 = text.parse().map_err(|_| MeasureError::PrometheusAnswer {
        address: address.to_string(),
        detail: format!("a sample value that is not a number: {text:?}"),
    })?;
    if value.is_nan() {
        return Ok(None);
    }
    if value.is_infinite() {
        return Err(MeasureError::PrometheusInfinite {
            address: address.to_string(),
            value: text.to_string(),
        });
    }
    Ok(Some(value))
}

fn number(v: f64) -> Value {
    // Finite by construction; `from_f64` fails only for NaN and infinities.
    serde_json::Number::from_f64(v)
        .map(Value::Number)
        .unwrap_or(Value::Null)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const ADDR: &str = "http://prom:9090";

    fn read(status: u16, body: Value) -> Result<Reading, String> {
        reading(ADDR, status, body.to_string().as_bytes()).map_err(|e| e.to_string())
    }

    fn vector(values: &[&str]) -> Value {
        let result: Vec<Value> = values
            .iter()
            .enumerate()
            .map(|(i, v)| json!({"metric": {"i": i.to_string()}, "value": [1.7e9, v]}))
            .collect();
        json!({"status": "success", "data": {"resultType": "vector", "result": result}})
    }

    #[test]
    fn vectors_map_to_numbers_lists_or_no_data() {
        assert_eq!(read(200, vector(&[])), Ok(Reading::NoData));
        assert_eq!(
            read(200, vector(&["0.25"])),
            Ok(Reading::Value(json!(0.25)))
        );
        assert_eq!(
            read(200, vector(&["1", "2.5"])),
            Ok(Reading::Value(json!([1.0, 2.5])))
        );
        assert_eq!(read(200, vector(&["NaN", "NaN"])), Ok(Reading::NoData));
        assert_eq!(
            read(200, vector(&["NaN", "3"])),
            Ok(Reading::Value(json!(3.0)))
        );
        let inf = read(200, vector(&["1", "+Inf"])).unwrap_err();
        assert!(inf.contains(ADDR) && inf.contains("+Inf"), "{inf}");
        let inf = read(200, vector(&["-Inf"])).unwrap_err();
        assert!(inf.contains("-Inf"), "{inf}");
    }

    #[test]
    fn scalars_map_to_a_number_or_no_data() {
        let scalar = |v: &str| json!({"status": "success", "data": {"resultType": "scalar", "result": [1.7e9, v]}});
        assert_eq!(read(200, scalar("42")), Ok(Reading::Value(json!(42.0))));
        assert_eq!(read(200, scalar("NaN")), Ok(Reading::NoData));
        assert!(read(200, scalar("+Inf")).unwrap_err().contains("+Inf"));
    }

    #[test]
    fn other_result_types_ask_for_a_vector_or_scalar() {
        for t in ["matrix", "string"] {
            let e = read(
                200,
                json!({"status": "success", "data": {"resultType": t, "result": []}}),
            )
            .unwrap_err();
            assert!(
                e.contains(t) && e.contains("use an instant vector or scalar") && e.contains(ADDR),
                "{e}"
            );
        }
        let histogram = json!({"status": "success", "data": {"resultType": "vector", "result": [
            {"metric": {}, "histogram": [1.7e9, {"count": "1", "sum": "1"}]}
        ]}});
        assert!(read(200, histogram).unwrap_err().contains("histogram"));
    }

    #[test]
    fn errors_carry_prometheus_words_or_the_status() {
        let e = read(
            400,
            json!({"status": "error", "errorType": "bad_data", "error": "1:5: parse error"}),
        )
        .unwrap_err();
        assert_eq!(
            e,
            "Prometheus at http://prom:9090: bad_data: 1:5: parse error"
        );
        let e = reading(ADDR, 502, b"Bad Gateway").unwrap_err().to_string();
        assert_eq!(
            e,
            "GET http://prom:9090/api/v1/query answered 502: Bad Gateway"
        );
        let e = reading(ADDR, 200, b"<html>").unwrap_err().to_string();
        assert!(e.contains("not JSON"), "{e}");
        let e = read(
            200,
            json!({"status": "success", "data": {"resultType": "vector"}}),
        )
        .unwrap_err();
        assert!(e.contains("unreadable"), "{e}");
        let e = read(
            200,
            json!({"status": "success", "data": {"resultType": "vector", "result": [{"value": [1, "x"]}]}}),
        )
        .unwrap_err();
        assert!(e.contains("\"x\""), "{e}");
    }
}
