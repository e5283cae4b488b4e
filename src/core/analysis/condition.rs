//! CEL conditions (`successCondition`, `failureCondition`) over a measured `result`, and how one
//! measurement is judged.
//!
//! Conditions come from users and run in the controller on every measurement, so they are bounded
//! before they run: the text's length and bracket nesting (the parser recurses per level), the
//! depth of the tree, and an estimate of the work its comprehensions (`all`, `exists`,
//! `exists_one`, `map`, `filter`) can do, since a comprehension inside a comprehension multiplies.
//! The values fed in are bounded too (see [`MAX_LIST`]), which is what makes the estimate hold.
//!
//! Bindings: `result` is the measured value (a number, a list of numbers, or any JSON from a web
//! check); `results` is always a list (`result` itself when it is one, else `[result]`), so that
//! `results.all(x, x < 0.01)` reads the same whether Prometheus answered one sample or several.
//! Helpers: `isNaN(x)` and `isInf(x)`. An empty vector and NaN never reach a condition: the
//! check's `noData` decides them.

use std::sync::{Arc, LazyLock};

use cel::common::ast::{ComprehensionExpr, EntryExpr, Expr, IdedExpr, operators};
use cel::objects::{Key, Map};
use cel::{Context, Env, ExecutionError, Value};

use super::{Check, NoData, Outcome, Reading};

/// Longest condition text, in bytes. Real conditions are one comparison or a few.
pub const MAX_CONDITION_BYTES: usize = 2048;
/// Deepest bracket and parenthesis nesting, checked on the text before the parser (which recurses
/// once per level) sees it.
const MAX_BRACKET_NESTING: usize = 16;
/// Deepest expression tree: the interpreter recurses once per level, so a long chain such as
/// `a + a + … + a` must be refused before it runs on a small thread stack.
const MAX_TREE_DEPTH: usize = 48;
/// Comprehensions nested in the body of another, at most.
const MAX_COMPREHENSION_NESTING: usize = 2;
/// Longest list (and largest map) a condition is fed; a longer one is an error reading. With
/// [`MAX_COMPREHENSION_NESTING`] this bounds a nested comprehension to a million iterations.
pub const MAX_LIST: usize = 1000;
/// Values (numbers, strings, lists, maps…) in one measurement at the most, and its deepest nesting.
const MAX_VALUES: usize = 10_000;
const MAX_VALUE_DEPTH: usize = 32;
/// The estimated work of a condition, in evaluated nodes and copied list elements, at most: enough
/// for one comprehension nested in another over full lists (about 12 million, a million
/// iterations: a fraction of a second in a release build), not for two.
const MAX_COST: u64 = 16_000_000;
/// The stack that parsing and evaluating run on. The generated CEL parser takes a large frame per
/// grammar rule, several rules per bracket: a debug build needs about 4 MiB at
/// [`MAX_BRACKET_NESTING`], more than the 2 MiB of a tokio worker or test thread.
const STACK_BYTES: usize = 16 << 20;
/// Shown values are cut to this many characters.
const MAX_SHOWN: usize = 120;

/// The environment every condition is parsed and run in: the standard library and its macros.
static ENV: LazyLock<Arc<Env>> = LazyLock::new(|| Arc::new(Env::stdlib()));

/// A compiled CEL condition; equal when the texts are.
#[derive(Clone, Debug)]
pub struct Condition {
    text: String,
    expr: Arc<IdedExpr>,
}

impl PartialEq for Condition {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

impl Eq for Condition {}

impl Condition {
    /// The condition as the user wrote it.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Parses and bounds `text`, then tries it on sample values: a condition that cannot be true
    /// or false for any of them (an unknown name, an operator that fits no sample, a number
    /// instead of a boolean) is refused now rather than at the first measurement.
    pub fn compile(text: &str) -> Result<Condition, String> {
        on_own_stack(|| Condition::compile_here(text))
    }

    fn compile_here(text: &str) -> Result<Condition, String> {
        if text.trim().is_empty() {
            return Err("is empty; write a condition such as `result < 0.01`".into());
        }
        if text.len() > MAX_CONDITION_BYTES {
            return Err(format!(
                "is {} bytes long; at most {MAX_CONDITION_BYTES}",
                text.len()
            ));
        }
        if bracket_nesting(text) > MAX_BRACKET_NESTING {
            return Err(format!(
                "brackets are nested more than {MAX_BRACKET_NESTING} deep"
            ));
        }
        let expr = ENV
            .parser()
            .max_recursion_depth(MAX_TREE_DEPTH as u16)
            .parse(text)
            .map_err(|e| format!("is not valid CEL: {}", one_line(&e.to_string())))?;
        let cost = Cost::of(&expr, 0, 0)?;
        if cost.work > MAX_COST {
            return Err(format!(
                "may take too long to evaluate (about {} steps over lists of up to {MAX_LIST} values; at most {MAX_COST}); \
                 nest fewer comprehensions or iterate over shorter lists",
                cost.work
            ));
        }
        let condition = Condition {
            text: text.to_owned(),
            expr: Arc::new(expr),
        };
        condition.try_on_samples()?;
        Ok(condition)
    }

    fn try_on_samples(&self) -> Result<(), String> {
        let samples = [
            serde_json::json!(0.5),
            serde_json::json!([0.5, 1.5]),
            serde_json::json!(1),
            serde_json::json!("text"),
            serde_json::json!({}),
        ];
        let mut type_error = None;
        let mut not_bool = None;
        for sample in &samples {
            match self.run(sample) {
                Ok(Value::Bool(_)) => return Ok(()),
                Ok(other) => not_bool = not_bool.or(Some(type_name(&other))),
                Err(e) if is_type_error(&e) => type_error = type_error.or(Some(e)),
                // Depends on the data (a missing key, a division by zero): a later measurement
                // may well be fine.
                Err(_) => return Ok(()),
            }
        }
        match (not_bool, type_error) {
            (Some(kind), _) => Err(format!(
                "must be true or false, but gives {kind}; compare it, e.g. `result < 0.01`"
            )),
            (None, Some(e)) => Err(format!("cannot be evaluated: {e}")),
            (None, None) => Ok(()),
        }
    }

    /// Why the condition cannot judge a Prometheus value, if it cannot: those are decimal numbers
    /// (one, or a list), on which CEL refuses whole-number arithmetic such as `result * 100`.
    pub fn misfits_numbers(&self) -> Option<String> {
        let misfit = on_own_stack(|| {
            let mut first = None;
            for sample in [serde_json::json!(0.5), serde_json::json!([0.5, 1.5])] {
                match self.run(&sample) {
                    Err(e) if is_type_error(&e) => first = first.or(Some(e)),
                    _ => return Ok(None),
                }
            }
            Ok(first)
        });
        misfit.unwrap_or_else(Some)
    }

    /// Whether the condition holds for `value` (bound to `result`, and as a list to `results`).
    pub fn evaluate(&self, value: &serde_json::Value) -> Result<bool, String> {
        on_own_stack(|| match self.run(value)? {
            Value::Bool(b) => Ok(b),
            other => Err(format!(
                "{:?} gave {}, not true or false",
                self.text,
                type_name(&other)
            )),
        })
    }

    fn run(&self, value: &serde_json::Value) -> Result<Value, String> {
        let mut budget = Budget::default();
        let result = to_cel(value, 0, &mut budget)?;
        let results = match &result {
            Value::List(_) => result.clone(),
            _ => Value::List(Arc::new(vec![result.clone()])),
        };
        let mut context = Context::with_env(Arc::clone(&ENV));
        context.add_variable_from_value("result", result);
        context.add_variable_from_value("results", results);
        context
            .add_function("isNaN", |x: Value| float_test(x, f64::is_nan))
            .map_err(|e| e.to_string())?;
        context
            .add_function("isInf", |x: Value| float_test(x, f64::is_infinite))
            .map_err(|e| e.to_string())?;
        Value::resolve(&self.expr, &context).map_err(|e| e.to_string())
    }
}

/// Runs `work` on a thread with a [`STACK_BYTES`] stack. A panic there (a bug in the CEL library
/// on some input) becomes an error instead of taking the webhook or controller down.
fn on_own_stack<T: Send>(work: impl FnOnce() -> Result<T, String> + Send) -> Result<T, String> {
    std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("cel".into())
            .stack_size(STACK_BYTES)
            .spawn_scoped(scope, work)
            .map_err(|e| format!("cannot start evaluating: {e}"))?
            .join()
            .unwrap_or_else(|_| Err("the CEL interpreter failed on this condition".into()))
    })
}

/// `isNaN` and `isInf`: false for whole numbers, which are never either.
fn float_test(x: Value, test: fn(f64) -> bool) -> Result<bool, ExecutionError> {
    match x {
        Value::Float(f) => Ok(test(f)),
        Value::Int(_) | Value::UInt(_) => Ok(false),
        other => Err(ExecutionError::function_error(
            "isNaN/isInf",
            format!("expected a number, got {}", type_name(&other)),
        )),
    }
}

/// Errors that say the expression does not fit the value's type, as opposed to the value's data.
fn is_type_error(e: &str) -> bool {
    [
        "found no matching overload",
        "Undeclared reference",
        "Unsupported binary operator",
        "can not be compared",
        "Unexpected type",
        "Invalid argument count",
        "not supported on type",
    ]
    .iter()
    .any(|kind| e.contains(kind))
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::List(_) => "a list",
        Value::Map(_) => "a map",
        Value::Int(_) | Value::UInt(_) | Value::Float(_) => "a number",
        Value::String(_) => "a string",
        Value::Bool(_) => "a boolean",
        Value::Null => "null",
        _ => "another kind of value",
    }
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The deepest nesting of `(`, `[` and `{`, quoted or not: a guard that quoting could switch off
/// would be no guard.
fn bracket_nesting(text: &str) -> usize {
    let (mut depth, mut deepest) = (0usize, 0usize);
    for b in text.bytes() {
        match b {
            b'(' | b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b')' | b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

/// What a measurement may hold, counted while it is converted.
#[derive(Default)]
struct Budget {
    values: usize,
}

fn to_cel(value: &serde_json::Value, depth: usize, budget: &mut Budget) -> Result<Value, String> {
    use serde_json::Value as J;
    budget.values += 1;
    if budget.values > MAX_VALUES {
        return Err(format!(
            "the measurement holds more than {MAX_VALUES} values; conditions read at most that many"
        ));
    }
    if depth > MAX_VALUE_DEPTH {
        return Err(format!(
            "the measurement is nested more than {MAX_VALUE_DEPTH} deep"
        ));
    }
    let too_long = |n: usize, what: &str| {
        Err(format!(
            "the measurement has a {what} of {n} entries; conditions read at most {MAX_LIST}"
        ))
    };
    Ok(match value {
        J::Null => Value::Null,
        J::Bool(b) => Value::Bool(*b),
        J::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => Value::Int(i),
            (None, Some(u), _) => Value::UInt(u),
            (None, None, f) => Value::Float(f.unwrap_or(f64::NAN)),
        },
        J::String(s) => Value::String(Arc::new(s.clone())),
        J::Array(items) if items.len() > MAX_LIST => return too_long(items.len(), "list"),
        J::Array(items) => Value::List(Arc::new(
            items
                .iter()
                .map(|item| to_cel(item, depth + 1, budget))
                .collect::<Result<_, _>>()?,
        )),
        J::Object(map) if map.len() > MAX_LIST => return too_long(map.len(), "map"),
        J::Object(map) => {
            let mut entries = std::collections::HashMap::with_capacity(map.len());
            for (k, v) in map {
                entries.insert(Key::from(k.as_str()), to_cel(v, depth + 1, budget)?);
            }
            Value::Map(Map {
                map: Arc::new(entries),
            })
        }
    })
}

/// An estimate of what evaluating an expression can cost: `size` bounds how many elements the
/// list it gives may have (what a comprehension over it iterates), `work` the steps it takes.
/// Anything the estimate cannot see through may be a list fed in, so it counts [`MAX_LIST`].
struct Cost {
    size: u64,
    work: u64,
}

impl Cost {
    fn of(e: &IdedExpr, depth: usize, nesting: usize) -> Result<Cost, String> {
        if depth > MAX_TREE_DEPTH {
            return Err(format!(
                "is nested more than {MAX_TREE_DEPTH} deep; split it into simpler comparisons"
            ));
        }
        let of = |e: &IdedExpr| Cost::of(e, depth + 1, nesting);
        let fed = MAX_LIST as u64;
        Ok(match &e.expr {
            Expr::Comprehension(c) => Cost::comprehension(c, depth, nesting)?,
            Expr::List(list) => {
                let mut work = list.elements.len() as u64;
                for element in &list.elements {
                    work = work.saturating_add(of(element)?.work);
                }
                Cost {
                    size: list.elements.len() as u64,
                    work,
                }
            }
            Expr::Map(map) => {
                let mut work = map.entries.len() as u64;
                for entry in &map.entries {
                    let (k, v) = match &entry.expr {
                        EntryExpr::MapEntry(m) => (Some(&m.key), &m.value),
                        EntryExpr::StructField(f) => (None, &f.value),
                    };
                    if let Some(k) = k {
                        work = work.saturating_add(of(k)?.work);
                    }
                    work = work.saturating_add(of(v)?.work);
                }
                Cost {
                    size: map.entries.len() as u64,
                    work,
                }
            }
            Expr::Struct(s) => {
                let mut work = 1u64;
                for entry in &s.entries {
                    if let EntryExpr::StructField(f) = &entry.expr {
                        work = work.saturating_add(of(&f.value)?.work);
                    }
                }
                Cost { size: fed, work }
            }
            Expr::Call(call) => {
                let mut parts = Vec::with_capacity(call.args.len() + 1);
                for arg in call.target.iter().map(|t| &**t).chain(&call.args) {
                    parts.push(of(arg)?);
                }
                let work = parts.iter().fold(1u64, |w, p| w.saturating_add(p.work));
                let size = match call.func_name.as_str() {
                    // Concatenation copies both sides.
                    operators::ADD => parts.iter().fold(0u64, |s, p| s.saturating_add(p.size)),
                    operators::CONDITIONAL => {
                        parts.iter().skip(1).map(|p| p.size).max().unwrap_or(1)
                    }
                    _ => parts.iter().map(|p| p.size).fold(fed, u64::max),
                };
                // Concatenation copies both sides, but for a macro's accumulator (`@result`),
                // which the interpreter appends to in place.
                let copied = match (call.func_name.as_str(), call.args.first()) {
                    (
                        operators::ADD,
                        Some(IdedExpr {
                            expr: Expr::Ident(accu),
                            ..
                        }),
                    ) if accu.starts_with('@') => parts.get(1).map_or(0, |p| p.size),
                    (operators::ADD, _) => size,
                    _ => 0,
                };
                Cost {
                    size,
                    work: work.saturating_add(copied),
                }
            }
            Expr::Select(select) => {
                let operand = of(&select.operand)?;
                Cost {
                    size: operand.size.max(fed),
                    work: operand.work.saturating_add(1),
                }
            }
            Expr::Ident(_) | Expr::Literal(_) | Expr::Unspecified => Cost { size: fed, work: 1 },
        })
    }

    /// A comprehension runs its body once per element of its range: nested ones multiply.
    fn comprehension(c: &ComprehensionExpr, depth: usize, nesting: usize) -> Result<Cost, String> {
        if nesting >= MAX_COMPREHENSION_NESTING {
            return Err(format!(
                "nests comprehensions (all, exists, exists_one, map, filter) more than {MAX_COMPREHENSION_NESTING} deep"
            ));
        }
        let outer = |e: &IdedExpr| Cost::of(e, depth + 1, nesting);
        let inner = |e: &IdedExpr| Cost::of(e, depth + 1, nesting + 1);
        let range = outer(&c.iter_range)?;
        let body = inner(&c.loop_cond)?
            .work
            .saturating_add(inner(&c.loop_step)?.work)
            .saturating_add(1);
        let work = range
            .work
            .saturating_add(outer(&c.accu_init)?.work)
            .saturating_add(range.size.saturating_mul(body))
            .saturating_add(outer(&c.result)?.work);
        Ok(Cost {
            size: range.size,
            work,
        })
    }
}

/// How one measurement was judged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Judgement {
    pub outcome: Outcome,
    /// The value as shown to users: `0.071`, `[0.1, 0.2]`, `no data`, `error`.
    pub value: String,
    /// Why, e.g. `0.071 is not "result < 0.01"`.
    pub detail: String,
}

/// Judges one reading of `check`, as Argo Rollouts does: a failure condition that holds fails the
/// measurement whatever else holds; a success condition that does not hold fails it when there is
/// no failure condition, and is inconclusive when there is one (neither said yes).
pub fn judge(check: &Check, reading: &Reading) -> Judgement {
    let judgement = |outcome, value: String, detail: String| Judgement {
        outcome,
        value,
        detail,
    };
    let value = match reading {
        Reading::NoData => {
            let (outcome, counts) = match check.no_data {
                NoData::Pass => (Outcome::Successful, "pass"),
                NoData::Fail => (Outcome::Failed, "fail"),
                NoData::Inconclusive => (Outcome::Inconclusive, "inconclusive"),
            };
            return judgement(
                outcome,
                "no data".into(),
                format!("no data (noData: {counts})"),
            );
        }
        Reading::Error(e) => return judgement(Outcome::Error, "error".into(), e.clone()),
        Reading::Finished { passed, message } => {
            let (outcome, shown) = if *passed {
                (Outcome::Successful, "passed")
            } else {
                (Outcome::Failed, "failed")
            };
            return judgement(outcome, shown.into(), message.clone());
        }
        Reading::Value(value) => value,
    };
    let shown = show(value);
    let error = |e: String| judgement(Outcome::Error, "error".into(), format!("{shown}: {e}"));
    if let Some(failure) = &check.failure_condition {
        match failure.evaluate(value) {
            Ok(true) => {
                return judgement(
                    Outcome::Failed,
                    shown.clone(),
                    format!("{shown} meets failureCondition {:?}", failure.text()),
                );
            }
            Ok(false) => {}
            Err(e) => return error(e),
        }
    }
    match (&check.success_condition, &check.failure_condition) {
        (Some(success), failure) => match success.evaluate(value) {
            Ok(true) => judgement(
                Outcome::Successful,
                shown.clone(),
                format!("{shown} meets {:?}", success.text()),
            ),
            Ok(false) => judgement(
                if failure.is_some() {
                    Outcome::Inconclusive
                } else {
                    Outcome::Failed
                },
                shown.clone(),
                format!("{shown} is not {:?}", success.text()),
            ),
            Err(e) => error(e),
        },
        (None, Some(failure)) => judgement(
            Outcome::Successful,
            shown.clone(),
            format!(
                "{shown} does not meet failureCondition {:?}",
                failure.text()
            ),
        ),
        // The parser refuses a measuring check without conditions; count it as not judged.
        (None, None) => judgement(
            Outcome::Inconclusive,
            shown,
            "no condition to judge it".into(),
        ),
    }
}

/// A measured value as users read it: numbers compact (`0.071`, `3`, `1.5e-7`), lists and maps
/// in brackets, cut at [`MAX_SHOWN`] characters.
pub fn show(value: &serde_json::Value) -> String {
    let mut out = String::new();
    write_shown(value, &mut out);
    if out.chars().count() > MAX_SHOWN {
        out = out.chars().take(MAX_SHOWN - 1).collect();
        out.push('…');
    }
    out
}

fn write_shown(value: &serde_json::Value, out: &mut String) {
    use serde_json::Value as J;
    // Past this, the text is cut anyway.
    if out.len() > MAX_SHOWN * 4 {
        return;
    }
    match value {
        J::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => out.push_str(&i.to_string()),
            (None, Some(u), _) => out.push_str(&u.to_string()),
            (None, None, f) => out.push_str(&format_number(f.unwrap_or(f64::NAN))),
        },
        J::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_shown(item, out);
            }
            out.push(']');
        }
        J::Object(map) => {
            out.push('{');
            for (i, (k, v)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                out.push_str(&format!("{k:?}: "));
                write_shown(v, out);
            }
            out.push('}');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// Up to six significant digits, no trailing zeros: `0.071`, `12.5`, `3`, `1.23457e-7`.
pub fn format_number(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "+Inf" } else { "-Inf" }.into();
    }
    if x == 0.0 {
        return "0".into();
    }
    let magnitude = x.abs().log10().floor();
    let trim = |s: String| {
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_owned()
        } else {
            s
        }
    };
    if !(-4.0..15.0).contains(&magnitude) {
        let text = format!("{x:.5e}");
        return match text.split_once('e') {
            Some((mantissa, exponent)) => format!("{}e{exponent}", trim(mantissa.to_owned())),
            None => text,
        };
    }
    let decimals = (5.0 - magnitude).max(0.0) as usize;
    trim(format!("{x:.decimals$}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn holds(text: &str, value: serde_json::Value) -> bool {
        Condition::compile(text).unwrap().evaluate(&value).unwrap()
    }

    #[test]
    fn conditions_over_numbers_lists_and_json() {
        assert!(holds("result < 0.01", json!(0.001)));
        assert!(!holds("result < 0.01", json!(0.071)));
        assert!(holds("result < 1", json!(0)));
        assert!(holds("results.all(x, x < 0.5)", json!([0.1, 0.2])));
        assert!(holds("results.all(x, x < 0.5)", json!(0.1)));
        assert!(holds("size(results) == 1", json!(7)));
        assert!(holds(
            "result.status == 'ok' && result.latency < 200",
            json!({"status": "ok", "latency": 120})
        ));
        assert!(holds("result == 'ok'", json!("ok")));
        assert!(holds("!isNaN(result) && !isInf(result)", json!(1.5)));
        assert!(holds("isNaN(1) || isInf(2) ? false : true", json!(1)));
    }

    #[test]
    fn compile_refuses_what_cannot_work() {
        let err = |text: &str| Condition::compile(text).unwrap_err();
        assert_eq!(
            err(""),
            "is empty; write a condition such as `result < 0.01`"
        );
        assert!(
            err("result <").starts_with("is not valid CEL: "),
            "{}",
            err("result <")
        );
        assert_eq!(
            err("reslt < 0.01"),
            "cannot be evaluated: Undeclared reference to 'reslt'"
        );
        assert_eq!(
            err("result * 2.0"),
            "must be true or false, but gives a number; compare it, e.g. `result < 0.01`"
        );
        // Whole numbers are numbers too (a web check may answer one).
        assert!(Condition::compile("result * 100 < 1").is_ok());
        assert_eq!(
            Condition::compile("result * 100 < 1")
                .unwrap()
                .misfits_numbers(),
            Some("Unsupported binary operator 'mul': Float(0.5), Int(100)".into())
        );
        assert_eq!(
            Condition::compile("result * 100.0 < 1.0")
                .unwrap()
                .misfits_numbers(),
            None
        );
        assert!(
            err("nope(result)").contains("nope"),
            "{}",
            err("nope(result)")
        );
        // Data-dependent errors are not refused: another measurement may hold the key.
        assert!(Condition::compile("result.errors > 3").is_ok());
        assert!(Condition::compile("1 / 0 == 1").is_ok());
    }

    #[test]
    fn equal_by_text() {
        assert_eq!(
            Condition::compile("result < 1").unwrap(),
            Condition::compile("result < 1").unwrap()
        );
        assert_eq!(Condition::compile("result<1").unwrap().text(), "result<1");
    }

    #[test]
    fn hostile_conditions_are_bounded() {
        let err = |text: &str| Condition::compile(text).unwrap_err();
        assert!(err(&"1 < ".repeat(600)).starts_with("is 2400 bytes long"));
        assert!(
            err(&format!("{}true{}", "(".repeat(17), ")".repeat(17)))
                .contains("nested more than 16")
        );
        let chain = format!("{}1 > 0", "1 + ".repeat(400));
        assert!(Condition::compile(&chain).is_err(), "{chain}");
        let select = format!("result{} == 1", ".a".repeat(500));
        assert!(Condition::compile(&select).is_err());
        let negations = format!("{}true", "!".repeat(1500));
        let _ = Condition::compile(&negations);
        assert!(
            err("results.all(x, results.all(y, results.all(z, x < y + z)))")
                .contains("more than 2 deep")
        );
        let pairs = ["results.all(x, results.all(y, x < y))"; 2].join(" && ");
        assert!(
            err(&pairs).starts_with("may take too long"),
            "{}",
            err(&pairs)
        );
        let wide = format!("({}).all(x, x > 0)", vec!["results"; 20].join(" + "));
        assert!(Condition::compile(&wide).is_ok());
        let wide_nested = format!(
            "({0}).all(x, ({0}).all(y, x < y))",
            vec!["results"; 20].join(" + ")
        );
        assert!(err(&wide_nested).starts_with("may take too long"));
    }

    #[test]
    /// The largest work the estimate accepts still ends, with the right answer; how long it takes
    /// is for a benchmark, not a test on a shared machine.
    fn the_worst_accepted_condition_ends() {
        let list: Vec<f64> = (0..MAX_LIST).map(|i| i as f64).collect();
        let worst =
            Condition::compile("results.map(x, results.filter(y, y < x)).size() > 0").unwrap();
        assert!(worst.evaluate(&json!(list)).unwrap());
    }

    #[test]
    fn measurements_are_bounded() {
        let c = Condition::compile("size(results) > 0").unwrap();
        let long: Vec<u32> = (0..=MAX_LIST as u32).collect();
        assert_eq!(
            c.evaluate(&json!(long)).unwrap_err(),
            "the measurement has a list of 1001 entries; conditions read at most 1000"
        );
        let mut deep = json!(1);
        for _ in 0..40 {
            deep = json!([deep]);
        }
        assert!(
            c.evaluate(&deep)
                .unwrap_err()
                .contains("nested more than 32")
        );
        let wide = json!(vec![vec![1; 100]; 101]);
        assert!(
            c.evaluate(&wide)
                .unwrap_err()
                .contains("more than 10000 values")
        );
    }

    fn check(success: Option<&str>, failure: Option<&str>, no_data: NoData) -> Check {
        Check {
            name: "error-rate".into(),
            interval: std::time::Duration::from_secs(30),
            count: None,
            initial_delay: std::time::Duration::ZERO,
            success_condition: success.map(|c| Condition::compile(c).unwrap()),
            failure_condition: failure.map(|c| Condition::compile(c).unwrap()),
            failure_limit: 0,
            inconclusive_limit: 0,
            consecutive_error_limit: 4,
            no_data,
            dry_run: false,
            starting_step: None,
            provider: super::super::Provider::Prometheus(super::super::PrometheusQuery {
                query: "up".into(),
                address: None,
                timeout: std::time::Duration::from_secs(10),
                auth: None,
            }),
        }
    }

    #[test]
    fn judging_follows_argo_rollouts() {
        use Outcome::*;
        let success = Some("result < 0.01");
        let failure = Some("result > 0.1");
        let value = |x: f64| Reading::Value(json!(x));
        let cases = [
            (
                success,
                None,
                value(0.001),
                Successful,
                "0.001",
                "0.001 meets \"result < 0.01\"",
            ),
            (
                success,
                None,
                value(0.071),
                Failed,
                "0.071",
                "0.071 is not \"result < 0.01\"",
            ),
            (
                success,
                failure,
                value(0.071),
                Inconclusive,
                "0.071",
                "0.071 is not \"result < 0.01\"",
            ),
            (
                success,
                failure,
                value(0.2),
                Failed,
                "0.2",
                "0.2 meets failureCondition \"result > 0.1\"",
            ),
            (
                success,
                failure,
                value(0.001),
                Successful,
                "0.001",
                "0.001 meets \"result < 0.01\"",
            ),
            (
                None,
                failure,
                value(0.2),
                Failed,
                "0.2",
                "0.2 meets failureCondition \"result > 0.1\"",
            ),
            (
                None,
                failure,
                value(0.05),
                Successful,
                "0.05",
                "0.05 does not meet failureCondition \"result > 0.1\"",
            ),
            (
                success,
                None,
                Reading::Value(json!([0.1, 0.2])),
                Error,
                "error",
                "[0.1, 0.2]: found no matching overload for '_<_' applied to '(list, double)'",
            ),
            (
                success,
                None,
                Reading::Error("timeout after 10s".into()),
                Error,
                "error",
                "timeout after 10s",
            ),
            (
                success,
                None,
                Reading::NoData,
                Inconclusive,
                "no data",
                "no data (noData: inconclusive)",
            ),
            (
                None,
                None,
                Reading::Finished {
                    passed: true,
                    message: "Job web-abc-smoke-s2-0 completed".into(),
                },
                Successful,
                "passed",
                "Job web-abc-smoke-s2-0 completed",
            ),
            (
                None,
                None,
                Reading::Finished {
                    passed: false,
                    message: "Job web-abc-smoke-s2-0 failed".into(),
                },
                Failed,
                "failed",
                "Job web-abc-smoke-s2-0 failed",
            ),
        ];
        for (s, f, reading, outcome, shown, detail) in cases {
            let judged = judge(&check(s, f, NoData::Inconclusive), &reading);
            assert_eq!(
                judged,
                Judgement {
                    outcome,
                    value: shown.into(),
                    detail: detail.into()
                },
                "{s:?} {f:?} {reading:?}"
            );
        }
        for (no_data, outcome) in [
            (NoData::Pass, Successful),
            (NoData::Fail, Failed),
            (NoData::Inconclusive, Inconclusive),
        ] {
            // Conditions never see missing data, even one that would fail on it.
            let judged = judge(
                &check(None, Some("result.nope > 1"), no_data),
                &Reading::NoData,
            );
            assert_eq!(judged.outcome, outcome);
        }
    }

    #[test]
    fn numbers_are_shown_compactly() {
        for (x, shown) in [
            (0.071, "0.071"),
            (0.0710000001, "0.071"),
            (3.0, "3"),
            (12.5, "12.5"),
            (1234567.8, "1234568"),
            (0.123456789, "0.123457"),
            (1.5e-7, "1.5e-7"),
            (2e20, "2e20"),
            (-0.25, "-0.25"),
            (0.0, "0"),
            (f64::NAN, "NaN"),
            (f64::INFINITY, "+Inf"),
        ] {
            assert_eq!(format_number(x), shown, "{x}");
        }
        assert_eq!(show(&json!([0.1, 0.2])), "[0.1, 0.2]");
        assert_eq!(show(&json!({"a": "b"})), "{\"a\": \"b\"}");
        assert_eq!(show(&json!(vec![1; 100])).chars().count(), MAX_SHOWN);
    }
}
