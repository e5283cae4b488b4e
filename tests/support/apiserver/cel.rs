//! CEL validation rules (`x-kubernetes-validations`) of structural schemas, compiled and run as
//! kube-apiserver does (`apiextensions-apiserver/pkg/apiserver/schema/cel`): `self` is the value
//! at the rule's node, converted by its schema (objects with `properties` become maps of the
//! declared fields, escaped like upstream: `__dash__`, `__dot__`, `__namespace__`...; integers
//! `int`, numbers `double`); at a resource root `self` also has `apiVersion`, `kind` and
//! `metadata` with only `name` and `generateName`. `oldSelf` is the old value of the same node on
//! an update; a rule naming it is a transition rule.
//!
//! Rules are checked when a CRD is written, as upstream compiles them: they must parse, name only
//! `self`, `oldSelf`, the fields the schema declares and the functions below, and give a boolean
//! where the schema tells the type. The environment: the standard library with its macros
//! (`has`, `all`, `exists`, `exists_one`, `map`, `filter`) and optional values, the strings
//! extension (`charAt`, `indexOf`, `lastIndexOf`, `lowerAscii`, `upperAscii`, `replace`,
//! `split`, `substring`, `trim`, `join`, `format`, `strings.quote`), `duration('1h30m')`
//! (compared and added; the Gateway API CRD uses it), and of the Kubernetes libraries: regular
//! expressions (`matches`, `find`, `findAll`), lists (`isSorted`, `sum`, `min`, `max`) and sets
//! (`sets.contains`, `sets.equivalent`, `sets.intersects`).
//!
//! Not like upstream: types are checked only as far as the schema tells them (a value of a
//! `dyn` type, such as an int-or-string, is checked when the rule runs); no cost estimates or
//! budgets; no timestamps, duration accessors (`getHours`...), quantities, URLs, IPs, CIDRs,
//! semvers or images (a rule that uses them is refused with a message saying this stand-in
//! lacks them), no two-variable comprehensions, no `indexOf` on lists; `format: duration` and
//! `format: date-time` strings stay strings; `x-kubernetes-list-type: set|map` lists compare in
//! order.

use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, LazyLock, Mutex};

pub use ::cel::Value as Cel;
use ::cel::common::ast::{EntryExpr, Expr, IdedExpr, LiteralValue, operators};
use ::cel::extractors::This;
use ::cel::objects::{Key, Map};
use ::cel::{Context, Env, ExecutionError, Program};
use serde_json::{Value, json};

/// The stack that parsing and evaluating run on: the generated parser takes a large frame per
/// grammar rule (see `src/core/analysis/condition.rs`), more than a tokio worker has.
const STACK_BYTES: usize = 16 << 20;
/// Compiled rules and regular expressions kept; a test that writes more distinct ones than this
/// starts the cache over.
const CACHE_ENTRIES: usize = 4096;
/// Longest rule or message expression compiled. The parser stops at 96 levels of brackets, but
/// a long operator chain (`1 + 1 + ...`) makes a tree as deep as it is long, which the checker and
/// the interpreter walk recursively: 20,000 terms overflow even [`STACK_BYTES`] (an abort, not a
/// panic), 5,000 do not. Upstream allows 100,000 code points; no test rule comes near this.
const MAX_EXPRESSION_BYTES: usize = 10_000;
/// `celconfig.MaxEvaluatedMessageExpressionSizeBytes`.
const MAX_MESSAGE_BYTES: usize = 5 * 1024;

static ENV: LazyLock<Arc<Env>> = LazyLock::new(|| {
    let mut env = Env::stdlib();
    // Declaring the extension once, on a fresh environment, cannot collide with anything.
    let _ = env.add_extension(::cel::extensions::strings);
    Arc::new(env)
});

/// Functions upstream offers that this stand-in does not: refused when a CRD is written, so that
/// a test learns it at once rather than from a rule that fails on every object.
const UNSUPPORTED: &[&str] = &[
    "timestamp",
    "getDate",
    "getDayOfMonth",
    "getDayOfWeek",
    "getDayOfYear",
    "getFullYear",
    "getHours",
    "getMilliseconds",
    "getMinutes",
    "getMonth",
    "getSeconds",
    "url",
    "isURL",
    "getScheme",
    "getHost",
    "getHostname",
    "getPort",
    "getEscapedPath",
    "getQuery",
    "ip",
    "isIP",
    "cidr",
    "isCIDR",
    "quantity",
    "isQuantity",
    "semver",
    "isSemver",
    "image",
    "isImage",
    "authorizer",
    "format.dns1123Label",
    "format.named",
];

/// A parsed rule or message expression.
pub struct Parsed {
    program: Program,
    /// Whether it names `oldSelf` (a transition rule).
    pub uses_old_self: bool,
}

type Cache<T> = LazyLock<Mutex<HashMap<String, T>>>;

static PARSED: Cache<Result<Arc<Parsed>, String>> = LazyLock::new(Mutex::default);
static REGEXES: Cache<Result<Arc<regex::Regex>, String>> = LazyLock::new(Mutex::default);

fn cached<T: Clone>(cache: &Cache<T>, key: &str, make: impl FnOnce() -> T) -> T {
    fn lock<T>(c: &Mutex<HashMap<String, T>>) -> std::sync::MutexGuard<'_, HashMap<String, T>> {
        c.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
    if let Some(hit) = lock(cache).get(key) {
        return hit.clone();
    }
    let made = make();
    let mut map = lock(cache);
    if map.len() >= CACHE_ENTRIES {
        map.clear();
    }
    map.insert(key.to_owned(), made.clone());
    made
}

/// A regular expression (RE2 syntax, which the `regex` crate follows), compiled once.
pub fn regex(pattern: &str) -> Result<Arc<regex::Regex>, String> {
    cached(&REGEXES, pattern, || {
        regex::Regex::new(pattern)
            .map(Arc::new)
            .map_err(|e| e.to_string())
    })
}

/// Runs `work` on a thread with a big stack; a panic there (a bug of the CEL library on some
/// input) becomes an error instead of taking the server down.
pub fn on_big_stack<T: Send>(work: impl FnOnce() -> T + Send) -> Result<T, String> {
    std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("cel".into())
            .stack_size(STACK_BYTES)
            .spawn_scoped(scope, work)
            .map_err(|e| format!("cannot start the CEL thread: {e}"))?
            .join()
            .map_err(|_| "the CEL library failed (panicked) on this input".to_string())
    })
}

/// Parses `text` (cached), on the caller's thread: call it from [`on_big_stack`]. The error is
/// upstream's issue list (`ERROR: <input>:1:9: Syntax error: ...` with the line and a caret).
pub fn parse(text: &str) -> Result<Arc<Parsed>, String> {
    if text.len() > MAX_EXPRESSION_BYTES {
        return Err(format!(
            "ERROR: <input>:1:1: expression of {} bytes; the test API server compiles at most {MAX_EXPRESSION_BYTES}",
            text.len()
        ));
    }
    cached(&PARSED, text, || {
        match catch_unwind(AssertUnwindSafe(|| ENV.compile(text))) {
            Ok(Ok(program)) => {
                let uses_old_self = names_old_self(program.expression());
                Ok(Arc::new(Parsed {
                    program,
                    uses_old_self,
                }))
            }
            Ok(Err(errors)) => Err(errors
                .errors
                .iter()
                .map(|e| {
                    issue(
                        text,
                        e.pos.0.max(1) as usize,
                        e.pos.1.max(1) as usize,
                        &e.msg,
                    )
                })
                .collect::<Vec<_>>()
                .join("\n")),
            Err(_) => Err("ERROR: <input>:1:1: the CEL parser failed (panicked)".into()),
        }
    })
}

/// One issue as cel-go prints it: `ERROR: <input>:L:C: msg`, the line, a caret under column C.
fn issue(text: &str, line: usize, col: usize, msg: &str) -> String {
    let mut out = format!("ERROR: <input>:{line}:{col}: {msg}");
    if let Some(snippet) = text.lines().nth(line - 1) {
        let snippet = snippet.replace('\t', " ");
        let dots: String = snippet.chars().take(col - 1).map(|_| '.').collect();
        out.push_str(&format!("\n | {snippet}\n | {dots}^"));
    }
    out
}

fn names_old_self(e: &IdedExpr) -> bool {
    let mut found = false;
    visit(e, &mut |e| {
        if matches!(&e.expr, Expr::Ident(name) if name == "oldSelf") {
            found = true;
        }
    });
    found
}

fn visit(e: &IdedExpr, f: &mut impl FnMut(&IdedExpr)) {
    f(e);
    match &e.expr {
        Expr::Call(c) => {
            if let Some(t) = &c.target {
                visit(t, f);
            }
            for a in &c.args {
                visit(a, f);
            }
        }
        Expr::Comprehension(c) => {
            for x in [
                &c.iter_range,
                &c.accu_init,
                &c.loop_cond,
                &c.loop_step,
                &c.result,
            ] {
                visit(x, f);
            }
        }
        Expr::List(l) => l.elements.iter().for_each(|x| visit(x, f)),
        Expr::Map(m) => m.entries.iter().for_each(|x| visit_entry(x, f)),
        Expr::Struct(s) => s.entries.iter().for_each(|x| visit_entry(x, f)),
        Expr::Select(s) => visit(&s.operand, f),
        Expr::Ident(_) | Expr::Literal(_) | Expr::Unspecified => {}
    }
}

fn visit_entry(e: &::cel::common::ast::IdedEntryExpr, f: &mut impl FnMut(&IdedExpr)) {
    match &e.expr {
        EntryExpr::MapEntry(m) => {
            visit(&m.key, f);
            visit(&m.value, f);
        }
        EntryExpr::StructField(s) => visit(&s.value, f),
    }
}

// ---------------------------------------------------------------------------------------------
// Compile-time checks

/// What a checked expression must give.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Want {
    Bool,
    String,
}

/// Parses and checks `text` against the schema node it sits on, as upstream compiles a rule
/// (`want` Bool) or a message expression (String). Returns whether it names `oldSelf`; the error
/// is upstream's detail (`compilation failed: ERROR: ...`, `cel expression must evaluate to a
/// bool`), without the `messageExpression ` prefix a message expression's error takes.
pub fn compile(
    text: &str,
    schema: &Value,
    embedded: bool,
    optional_old_self: bool,
    want: Want,
) -> Result<bool, String> {
    let parsed = parse(text).map_err(|e| format!("compilation failed: {e}"))?;
    let self_ty = Ty::of(schema, embedded);
    let mut checker = Checker {
        text,
        program: &parsed.program,
        scopes: vec![
            ("self".into(), self_ty.clone()),
            (
                "oldSelf".into(),
                if optional_old_self { Ty::Dyn } else { self_ty },
            ),
        ],
    };
    let ty = checker
        .ty(parsed.program.expression())
        .map_err(|e| format!("compilation failed: {e}"))?;
    let fits = match want {
        Want::Bool => matches!(ty, Ty::Bool | Ty::Dyn),
        Want::String => matches!(ty, Ty::String | Ty::Dyn),
    };
    match (fits, want) {
        (true, _) => Ok(parsed.uses_old_self),
        (false, Want::Bool) => Err("cel expression must evaluate to a bool".into()),
        (false, Want::String) => Err("must evaluate to a string".into()),
    }
}

/// The type of an expression, as far as the schema tells it.
#[derive(Clone, Debug)]
enum Ty<'s> {
    Dyn,
    Null,
    Bool,
    Int,
    Uint,
    Double,
    String,
    Bytes,
    Type,
    /// A `duration(...)`; a whole number of nanoseconds when it runs (see [`go_duration`]).
    Duration,
    List(Box<Ty<'s>>),
    /// A map with string keys (`additionalProperties`, map literals).
    Map(Box<Ty<'s>>),
    /// An object with declared fields; `true` for a resource root (`apiVersion`, `kind`,
    /// `metadata`).
    Object(&'s Value, bool),
}

/// What CEL sees of `metadata` at a resource root.
static ROOT_METADATA: LazyLock<Value> = LazyLock::new(|| {
    json!({"type": "object", "properties": {
        "name": {"type": "string"},
        "generateName": {"type": "string"},
    }})
});

impl<'s> Ty<'s> {
    fn of(schema: &'s Value, embedded: bool) -> Ty<'s> {
        if schema["x-kubernetes-int-or-string"] == true {
            return Ty::Dyn;
        }
        match schema["type"].as_str().unwrap_or_default() {
            "object" => {
                if schema["properties"].is_object() || embedded {
                    Ty::Object(schema, embedded)
                } else if schema["additionalProperties"].is_object() {
                    let values = &schema["additionalProperties"];
                    Ty::Map(Box::new(Ty::of(values, is_embedded(values))))
                } else if schema["x-kubernetes-preserve-unknown-fields"] == true {
                    Ty::Dyn
                } else {
                    Ty::Object(schema, false)
                }
            }
            "array" => Ty::List(Box::new(match schema.get("items") {
                Some(items) => Ty::of(items, is_embedded(items)),
                None => Ty::Dyn,
            })),
            "string" => Ty::String,
            "integer" => Ty::Int,
            "number" => Ty::Double,
            "boolean" => Ty::Bool,
            _ => Ty::Dyn,
        }
    }

    fn name(&self) -> String {
        match self {
            Ty::Dyn => "dyn".into(),
            Ty::Null => "null_type".into(),
            Ty::Bool => "bool".into(),
            Ty::Int => "int".into(),
            Ty::Uint => "uint".into(),
            Ty::Double => "double".into(),
            Ty::String => "string".into(),
            Ty::Bytes => "bytes".into(),
            Ty::Type => "type".into(),
            Ty::Duration => "google.protobuf.Duration".into(),
            Ty::List(e) => format!("list({})", e.name()),
            Ty::Map(v) => format!("map(string, {})", v.name()),
            Ty::Object(..) => "object".into(),
        }
    }

    fn numeric(&self) -> bool {
        matches!(self, Ty::Int | Ty::Uint | Ty::Double)
    }

    /// Known well enough to refuse an operator on it.
    fn known(&self) -> bool {
        !matches!(self, Ty::Dyn | Ty::Null)
    }

    /// Whether values of the two types can be compared for equality at all.
    fn comparable(&self, other: &Ty) -> bool {
        if !self.known() || !other.known() || (self.numeric() && other.numeric()) {
            return true;
        }
        std::mem::discriminant(self) == std::mem::discriminant(other)
    }

    /// Whether they can be ordered (`<` and friends).
    fn orderable(&self, other: &Ty) -> bool {
        if !self.known() || !other.known() || (self.numeric() && other.numeric()) {
            return true;
        }
        matches!(
            (self, other),
            (Ty::String, Ty::String)
                | (Ty::Bytes, Ty::Bytes)
                | (Ty::Bool, Ty::Bool)
                | (Ty::Duration, Ty::Duration)
        )
    }

    fn unify(a: Ty<'s>, b: Ty<'s>) -> Ty<'s> {
        if std::mem::discriminant(&a) == std::mem::discriminant(&b)
            && !matches!(a, Ty::List(_) | Ty::Map(_) | Ty::Object(..))
        {
            a
        } else {
            Ty::Dyn
        }
    }
}

fn is_embedded(schema: &Value) -> bool {
    schema["x-kubernetes-embedded-resource"] == true
}

/// A property name as CEL sees it (`cel.Escape`), or `None` when it cannot be named.
pub fn escape(name: &str) -> Option<String> {
    const RESERVED: &[&str] = &[
        "true",
        "false",
        "null",
        "in",
        "as",
        "break",
        "const",
        "continue",
        "else",
        "for",
        "function",
        "if",
        "import",
        "let",
        "loop",
        "package",
        "namespace",
        "return",
        "var",
        "void",
        "while",
    ];
    if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
        return None;
    }
    if RESERVED.contains(&name) {
        return Some(format!("__{name}__"));
    }
    let mut out = String::with_capacity(name.len());
    let mut chars = name.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '_' if chars.peek() == Some(&'_') => {
                chars.next();
                out.push_str("__underscores__");
            }
            '.' => out.push_str("__dot__"),
            '-' => out.push_str("__dash__"),
            '/' => out.push_str("__slash__"),
            c if c.is_ascii_alphanumeric() || c == '_' => out.push(c),
            _ => return None,
        }
    }
    Some(out)
}

struct Checker<'t, 's> {
    text: &'t str,
    program: &'t Program,
    scopes: Vec<(String, Ty<'s>)>,
}

/// Global functions and what they give.
fn global_result<'s>(name: &str) -> Option<Ty<'s>> {
    Some(match name {
        "size" => Ty::Int,
        "duration" => Ty::Duration,
        "int" => Ty::Int,
        "uint" => Ty::Uint,
        "double" => Ty::Double,
        "string" => Ty::String,
        "bytes" => Ty::Bytes,
        "bool" => Ty::Bool,
        "type" => Ty::Type,
        "dyn" => Ty::Dyn,
        "matches" => Ty::Bool,
        "sets.contains" | "sets.equivalent" | "sets.intersects" => Ty::Bool,
        "strings.quote" => Ty::String,
        "optional.of" | "optional.ofNonZeroValue" | "optional.none" => Ty::Dyn,
        _ => return None,
    })
}

/// Member functions and what they give on a receiver of type `target`.
fn member_result<'s>(name: &str, target: &Ty<'s>) -> Option<Ty<'s>> {
    Some(match name {
        "size" | "indexOf" | "lastIndexOf" => Ty::Int,
        "contains" | "startsWith" | "endsWith" | "matches" | "isSorted" | "hasValue" => Ty::Bool,
        "charAt" | "lowerAscii" | "upperAscii" | "replace" | "substring" | "trim" | "join"
        | "format" | "find" => Ty::String,
        "split" | "findAll" => Ty::List(Box::new(Ty::String)),
        "sum" | "min" | "max" => match target {
            Ty::List(e) => (**e).clone(),
            _ => Ty::Dyn,
        },
        "value" | "orValue" | "or" => Ty::Dyn,
        _ => return None,
    })
}

impl<'t, 's> Checker<'t, 's> {
    /// `ERROR: <input>:L:C: msg` at the node `id`, as cel-go reports checker issues.
    fn error(&self, id: u64, msg: impl AsRef<str>) -> String {
        let start = self
            .program
            .source_info()
            .offset_for(id)
            .map(|(s, _)| s as usize)
            .unwrap_or(0);
        let (mut line, mut col) = (1, 1);
        for c in self.text.chars().take(start) {
            if c == '\n' {
                line += 1;
                col = 1;
            } else {
                col += 1;
            }
        }
        issue(self.text, line, col, msg.as_ref())
    }

    fn lookup(&self, name: &str) -> Option<Ty<'s>> {
        self.scopes
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t.clone())
    }

    fn ty(&mut self, e: &IdedExpr) -> Result<Ty<'s>, String> {
        match &e.expr {
            Expr::Literal(l) => Ok(match l {
                LiteralValue::Boolean(_) => Ty::Bool,
                LiteralValue::Bytes(_) => Ty::Bytes,
                LiteralValue::Double(_) => Ty::Double,
                LiteralValue::Int(_) => Ty::Int,
                LiteralValue::Null => Ty::Null,
                LiteralValue::String(_) => Ty::String,
                LiteralValue::UInt(_) => Ty::Uint,
            }),
            Expr::Ident(name) => {
                if let Some(t) = self.lookup(name) {
                    return Ok(t);
                }
                match name.as_str() {
                    "int" | "uint" | "double" | "bool" | "string" | "bytes" | "list" | "map"
                    | "null_type" | "type" | "dyn" => Ok(Ty::Type),
                    _ => Err(self.error(
                        e.id,
                        format!("undeclared reference to '{name}' (in container '')"),
                    )),
                }
            }
            Expr::Select(s) => {
                let operand = self.ty(&s.operand)?;
                let field = self.field(e.id, &operand, &s.field)?;
                Ok(if s.test { Ty::Bool } else { field })
            }
            Expr::List(l) => {
                let mut elem: Option<Ty> = None;
                for x in &l.elements {
                    let t = self.ty(x)?;
                    elem = Some(match elem {
                        None => t,
                        Some(prev) => Ty::unify(prev, t),
                    });
                }
                Ok(Ty::List(Box::new(elem.unwrap_or(Ty::Dyn))))
            }
            Expr::Map(m) => {
                for entry in &m.entries {
                    if let EntryExpr::MapEntry(m) = &entry.expr {
                        self.ty(&m.key)?;
                        self.ty(&m.value)?;
                    }
                }
                Ok(Ty::Map(Box::new(Ty::Dyn)))
            }
            Expr::Struct(s) => Err(self.error(
                e.id,
                format!(
                    "undeclared reference to '{}' (in container '')",
                    s.type_name
                ),
            )),
            Expr::Comprehension(c) => {
                let range = self.ty(&c.iter_range)?;
                let (first, second) = match &range {
                    Ty::List(elem) => match &c.iter_var2 {
                        Some(_) => (Ty::Int, (**elem).clone()),
                        None => ((**elem).clone(), Ty::Dyn),
                    },
                    Ty::Map(values) => (Ty::String, (**values).clone()),
                    Ty::Dyn => (Ty::Dyn, Ty::Dyn),
                    other => {
                        return Err(self.error(
                            c.iter_range.id,
                            format!(
                                "expression of type '{}' cannot be range of a comprehension (must be list, map, or dynamic)",
                                other.name()
                            ),
                        ));
                    }
                };
                let accu = self.ty(&c.accu_init)?;
                let depth = self.scopes.len();
                self.scopes.push((c.iter_var.clone(), first));
                if let Some(v2) = &c.iter_var2 {
                    self.scopes.push((v2.clone(), second));
                }
                self.scopes.push((c.accu_var.clone(), accu));
                let checked = (|| {
                    self.ty(&c.loop_cond)?;
                    self.ty(&c.loop_step)?;
                    self.ty(&c.result)
                })();
                self.scopes.truncate(depth);
                checked
            }
            Expr::Call(call) => self.call(e, call),
            Expr::Unspecified => Ok(Ty::Dyn),
        }
    }

    fn field(&self, id: u64, operand: &Ty<'s>, field: &str) -> Result<Ty<'s>, String> {
        match operand {
            Ty::Object(schema, root) => {
                if *root {
                    match field {
                        "apiVersion" | "kind" => return Ok(Ty::String),
                        "metadata" => return Ok(Ty::Object(&ROOT_METADATA, false)),
                        _ => {}
                    }
                }
                let schema: &'s Value = schema;
                schema["properties"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .find(|(k, _)| escape(k).as_deref() == Some(field))
                    .map(|(_, sub)| Ty::of(sub, is_embedded(sub)))
                    .ok_or_else(|| self.error(id, format!("undefined field '{field}'")))
            }
            Ty::Map(values) => Ok((**values).clone()),
            Ty::Dyn => Ok(Ty::Dyn),
            other => Err(self.error(
                id,
                format!("type '{}' does not support field selection", other.name()),
            )),
        }
    }

    fn overload_error(&self, id: u64, op: &str, args: &[Ty]) -> String {
        let names: Vec<String> = args.iter().map(Ty::name).collect();
        self.error(
            id,
            format!(
                "found no matching overload for '{op}' applied to '({})'",
                names.join(", ")
            ),
        )
    }

    fn call(
        &mut self,
        e: &IdedExpr,
        call: &::cel::common::ast::CallExpr,
    ) -> Result<Ty<'s>, String> {
        let name = call.func_name.as_str();
        // `sets.contains(a, b)` parses as a call of `contains` on `sets`.
        let qualified = match call.target.as_deref() {
            Some(IdedExpr {
                expr: Expr::Ident(ns),
                ..
            }) if self.lookup(ns).is_none() => Some(format!("{ns}.{name}")),
            _ => None,
        };
        if let Some(q) = &qualified
            && (global_result(q).is_some() || UNSUPPORTED.contains(&q.as_str()))
        {
            for a in &call.args {
                self.ty(a)?;
            }
            return self.global(e.id, q);
        }
        let target = match &call.target {
            Some(t) => Some(self.ty(t)?),
            None => None,
        };
        let mut args = Vec::new();
        for a in &call.args {
            args.push(self.ty(a)?);
        }
        match name {
            operators::LOGICAL_AND | operators::LOGICAL_OR | operators::LOGICAL_NOT => {
                if args.iter().any(|t| t.known() && !matches!(t, Ty::Bool)) {
                    return Err(self.overload_error(e.id, name, &args));
                }
                Ok(Ty::Bool)
            }
            operators::NOT_STRICTLY_FALSE | operators::IN => Ok(Ty::Bool),
            operators::EQUALS | operators::NOT_EQUALS => {
                if args.len() == 2 && !args[0].comparable(&args[1]) {
                    return Err(self.overload_error(e.id, name, &args));
                }
                Ok(Ty::Bool)
            }
            operators::LESS
            | operators::LESS_EQUALS
            | operators::GREATER
            | operators::GREATER_EQUALS => {
                if args.len() == 2 && !args[0].orderable(&args[1]) {
                    return Err(self.overload_error(e.id, name, &args));
                }
                Ok(Ty::Bool)
            }
            operators::CONDITIONAL => {
                if let Some(c) = args.first()
                    && c.known()
                    && !matches!(c, Ty::Bool)
                {
                    return Err(self.overload_error(e.id, name, &args));
                }
                let mut it = args.into_iter().skip(1);
                match (it.next(), it.next()) {
                    (Some(a), Some(b)) => Ok(Ty::unify(a, b)),
                    _ => Ok(Ty::Dyn),
                }
            }
            operators::ADD
            | operators::SUBSTRACT
            | operators::MULTIPLY
            | operators::DIVIDE
            | operators::MODULO => {
                let mut it = args.into_iter();
                match (it.next(), it.next()) {
                    (Some(a), Some(b)) => Ok(Ty::unify(a, b)),
                    _ => Ok(Ty::Dyn),
                }
            }
            operators::NEGATE => Ok(args.into_iter().next().unwrap_or(Ty::Dyn)),
            operators::INDEX => match args.first() {
                Some(Ty::List(elem)) => Ok((**elem).clone()),
                Some(Ty::Map(values)) => Ok((**values).clone()),
                _ => Ok(Ty::Dyn),
            },
            operators::OPT_INDEX | operators::OPT_SELECT => Ok(Ty::Dyn),
            // Macros that did not expand: a two-variable comprehension, or a wrong count.
            operators::ALL
            | operators::EXISTS
            | operators::EXISTS_ONE
            | operators::MAP
            | operators::FILTER
                if target.is_some() =>
            {
                Err(self.error(
                    e.id,
                    format!(
                        "'{name}' with {} arguments is not supported by the test API server",
                        args.len()
                    ),
                ))
            }
            _ => match target {
                Some(t) => {
                    if UNSUPPORTED.contains(&name) {
                        return Err(self.unsupported(e.id, name));
                    }
                    member_result(name, &t).ok_or_else(|| {
                        self.error(
                            e.id,
                            format!("undeclared reference to '{name}' (in container '')"),
                        )
                    })
                }
                None => self.global(e.id, name),
            },
        }
    }

    fn global(&self, id: u64, name: &str) -> Result<Ty<'s>, String> {
        if UNSUPPORTED.contains(&name) {
            return Err(self.unsupported(id, name));
        }
        global_result(name).ok_or_else(|| {
            self.error(
                id,
                format!("undeclared reference to '{name}' (in container '')"),
            )
        })
    }

    fn unsupported(&self, id: u64, name: &str) -> String {
        self.error(
            id,
            format!(
                "'{name}' is not supported by the test API server (kube-apiserver has it); \
                 see tests/support/apiserver/cel.rs"
            ),
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Values

/// `v` as CEL sees it at a node of `schema` (`None`: no schema, every key as it is);
/// `embedded` at a resource root or `x-kubernetes-embedded-resource` node.
pub fn to_cel(schema: Option<&Value>, v: &Value, embedded: bool) -> Cel {
    let number = schema.is_some_and(|s| s["type"] == "number");
    match v {
        Value::Null => Cel::Null,
        Value::Bool(b) => Cel::Bool(*b),
        Value::Number(n) if number => Cel::Float(n.as_f64().unwrap_or(f64::NAN)),
        Value::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => Cel::Int(i),
            (None, Some(u)) => Cel::UInt(u),
            _ => Cel::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => Cel::String(Arc::new(s.clone())),
        Value::Array(items) => {
            let items_schema = schema.and_then(|s| s.get("items"));
            Cel::List(Arc::new(
                items
                    .iter()
                    .map(|x| to_cel(items_schema, x, items_schema.is_some_and(is_embedded)))
                    .collect(),
            ))
        }
        Value::Object(map) => {
            let mut out: HashMap<Key, Cel> = HashMap::with_capacity(map.len());
            let props = schema.and_then(|s| s["properties"].as_object());
            let additional = schema
                .map(|s| &s["additionalProperties"])
                .filter(|a| a.is_object());
            if props.is_some() || embedded {
                for (k, x) in map {
                    if embedded && (k == "apiVersion" || k == "kind") {
                        out.insert(Key::from(k.as_str()), to_cel(None, x, false));
                    } else if embedded && k == "metadata" {
                        out.insert(
                            Key::from("metadata"),
                            to_cel(Some(&ROOT_METADATA), x, false),
                        );
                    } else if let Some(sub) = props.and_then(|p| p.get(k))
                        && let Some(name) = escape(k)
                    {
                        out.insert(
                            Key::from(name.as_str()),
                            to_cel(Some(sub), x, is_embedded(sub)),
                        );
                    }
                }
            } else {
                for (k, x) in map {
                    out.insert(
                        Key::from(k.as_str()),
                        to_cel(additional, x, additional.is_some_and(is_embedded)),
                    );
                }
            }
            Cel::Map(Map { map: Arc::new(out) })
        }
    }
}

fn cel_type_name(v: &Cel) -> &'static str {
    match v {
        Cel::List(_) => "list",
        Cel::Map(_) => "map",
        Cel::Int(_) => "int",
        Cel::UInt(_) => "uint",
        Cel::Float(_) => "double",
        Cel::String(_) => "string",
        Cel::Bytes(_) => "bytes",
        Cel::Bool(_) => "bool",
        Cel::Null => "null_type",
        _ => "dyn",
    }
}

/// `oldSelf` for a rule with `optionalOldSelf: true`: `optional.of(old)` or `optional.none()`,
/// made by CEL itself so that the optional functions work on it.
fn optional(old: Option<&Cel>) -> Result<Cel, String> {
    let text = if old.is_some() {
        "optional.of(x)"
    } else {
        "optional.none()"
    };
    let parsed = parse(text)?;
    let mut ctx = Context::with_env(Arc::clone(&ENV));
    if let Some(old) = old {
        ctx.add_variable_from_value("x", old.clone());
    }
    parsed.program.execute(&ctx).map_err(|e| e.to_string())
}

/// How oldSelf is bound for one evaluation.
#[derive(Clone, Copy)]
pub enum OldSelf<'a> {
    /// Not bound: a create, or no old value at this node.
    Unbound,
    Value(&'a Cel),
    /// `optionalOldSelf: true`: an optional, empty when there is no old value.
    Optional(Option<&'a Cel>),
}

/// An evaluation error, worded like cel-go's where they differ; `true` when it is an overload
/// error (a call whose argument types fit no function), which upstream words differently.
pub struct RunError {
    pub message: String,
    pub no_such_overload: bool,
}

/// Runs `parsed` with `self` (and `oldSelf`). Call it from [`on_big_stack`].
pub fn run(parsed: &Parsed, this: &Cel, old: OldSelf) -> Result<Cel, RunError> {
    let plain = |message: String| RunError {
        message,
        no_such_overload: false,
    };
    let mut ctx = Context::with_env(Arc::clone(&ENV));
    ctx.add_variable_from_value("self", this.clone());
    match old {
        OldSelf::Unbound => {}
        OldSelf::Value(v) => ctx.add_variable_from_value("oldSelf", v.clone()),
        OldSelf::Optional(v) => ctx.add_variable_from_value("oldSelf", optional(v).map_err(plain)?),
    }
    add_library(&mut ctx).map_err(plain)?;
    match catch_unwind(AssertUnwindSafe(|| parsed.program.execute(&ctx))) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(describe(&e)),
        Err(_) => Err(plain("the CEL interpreter failed (panicked)".into())),
    }
}

fn describe(e: &ExecutionError) -> RunError {
    let overload = |message: &str| RunError {
        message: message.into(),
        no_such_overload: true,
    };
    let message = match e {
        ExecutionError::NoSuchKey(k) => format!("no such key: {k}"),
        ExecutionError::IndexOutOfBounds(i) => format!("index out of bounds: {}", show(i)),
        ExecutionError::DivisionByZero(_) => "division by zero".into(),
        ExecutionError::RemainderByZero(_) => "modulus by zero".into(),
        ExecutionError::Overflow(..) => "integer overflow".into(),
        ExecutionError::UndeclaredReference(name) => format!("no such attribute: {name}"),
        ExecutionError::NoSuchOverload(_)
        | ExecutionError::UnsupportedBinaryOperator(..)
        | ExecutionError::ValuesNotComparable(..)
        | ExecutionError::UnexpectedType { .. }
        | ExecutionError::NotSupportedAsMethod { .. } => return overload("no such overload"),
        ExecutionError::FunctionError { message, .. } => message.clone(),
        other => other.to_string(),
    };
    RunError {
        message,
        no_such_overload: false,
    }
}

fn show(v: &Cel) -> String {
    match v {
        Cel::Int(i) => i.to_string(),
        Cel::UInt(u) => u.to_string(),
        Cel::Float(f) => f.to_string(),
        Cel::String(s) => s.to_string(),
        other => format!("{other:?}"),
    }
}

/// The Kubernetes library functions this stand-in has (see the module documentation).
fn add_library(ctx: &mut Context) -> Result<(), String> {
    fn fail(function: &str, message: impl ToString) -> ExecutionError {
        ExecutionError::function_error(function, message)
    }
    fn compiled(function: &str, re: &str) -> Result<Arc<regex::Regex>, ExecutionError> {
        regex(re).map_err(|e| fail(function, format!("'{re}' not a valid regex: {e}")))
    }
    fn list_ordered(function: &str, list: &[Cel]) -> Result<bool, ExecutionError> {
        for pair in list.windows(2) {
            match pair[0].partial_cmp(&pair[1]) {
                Some(std::cmp::Ordering::Greater) => return Ok(false),
                Some(_) => {}
                None => return Err(fail(function, "list elements cannot be compared")),
            }
        }
        Ok(true)
    }
    fn extreme(
        function: &str,
        list: &[Cel],
        keep: std::cmp::Ordering,
    ) -> Result<Cel, ExecutionError> {
        let mut best = list
            .first()
            .ok_or_else(|| fail(function, format!("{function} called on empty list")))?;
        for x in &list[1..] {
            match x.partial_cmp(best) {
                Some(o) if o == keep => best = x,
                Some(_) => {}
                None => return Err(fail(function, "list elements cannot be compared")),
            }
        }
        Ok(best.clone())
    }
    let added = [
        ctx.add_function(
            "duration",
            |s: Arc<String>| -> Result<Cel, ExecutionError> {
                go_duration(&s)
                    .map(Cel::Int)
                    .ok_or_else(|| fail("duration", format!("invalid duration {s:?}")))
            },
        ),
        ctx.add_function(
            "matches",
            |This(s): This<Arc<String>>, re: Arc<String>| -> Result<bool, ExecutionError> {
                Ok(compiled("matches", &re)?.is_match(&s))
            },
        ),
        ctx.add_function(
            "find",
            |This(s): This<Arc<String>>, re: Arc<String>| -> Result<Cel, ExecutionError> {
                let found = compiled("find", &re)?
                    .find(&s)
                    .map(|m| m.as_str().to_owned());
                Ok(Cel::String(Arc::new(found.unwrap_or_default())))
            },
        ),
        ctx.add_function(
            "findAll",
            |This(s): This<Arc<String>>, re: Arc<String>| -> Result<Cel, ExecutionError> {
                let all = compiled("findAll", &re)?
                    .find_iter(&s)
                    .map(|m| Cel::String(Arc::new(m.as_str().to_owned())))
                    .collect();
                Ok(Cel::List(Arc::new(all)))
            },
        ),
        ctx.add_function(
            "isSorted",
            |This(list): This<Arc<Vec<Cel>>>| -> Result<bool, ExecutionError> {
                list_ordered("isSorted", &list)
            },
        ),
        ctx.add_function(
            "sum",
            |This(list): This<Arc<Vec<Cel>>>| -> Result<Cel, ExecutionError> {
                let mut ints: i64 = 0;
                let mut floats: Option<f64> = None;
                for x in list.iter() {
                    match x {
                        Cel::Int(i) => {
                            ints = ints
                                .checked_add(*i)
                                .ok_or_else(|| fail("sum", "integer overflow"))?;
                        }
                        Cel::Float(f) => *floats.get_or_insert(0.0) += f,
                        other => {
                            return Err(fail(
                                "sum",
                                format!("cannot sum {}", cel_type_name(other)),
                            ));
                        }
                    }
                }
                Ok(match floats {
                    Some(f) => Cel::Float(f + ints as f64),
                    None => Cel::Int(ints),
                })
            },
        ),
        ctx.add_function(
            "min",
            |This(list): This<Arc<Vec<Cel>>>| -> Result<Cel, ExecutionError> {
                extreme("min", &list, std::cmp::Ordering::Less)
            },
        ),
        ctx.add_function(
            "max",
            |This(list): This<Arc<Vec<Cel>>>| -> Result<Cel, ExecutionError> {
                extreme("max", &list, std::cmp::Ordering::Greater)
            },
        ),
        ctx.add_function(
            "sets.contains",
            |a: Arc<Vec<Cel>>, b: Arc<Vec<Cel>>| -> bool { b.iter().all(|x| a.contains(x)) },
        ),
        ctx.add_function(
            "sets.equivalent",
            |a: Arc<Vec<Cel>>, b: Arc<Vec<Cel>>| -> bool {
                b.iter().all(|x| a.contains(x)) && a.iter().all(|x| b.contains(x))
            },
        ),
        ctx.add_function(
            "sets.intersects",
            |a: Arc<Vec<Cel>>, b: Arc<Vec<Cel>>| -> bool { b.iter().any(|x| a.contains(x)) },
        ),
    ];
    added
        .into_iter()
        .collect::<Result<Vec<()>, _>>()
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// A Go duration (`time.ParseDuration`: `1h30m`, `1.5s`, `300ms`, `-2m`, `0`) in nanoseconds.
/// Durations are plain integers when a rule runs (the `cel` crate is built without `chrono`):
/// they compare and add like durations, and the compile-time check keeps them from mixing with
/// numbers.
fn go_duration(s: &str) -> Option<i64> {
    let (negative, mut rest) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    if rest == "0" {
        return Some(0);
    }
    if rest.is_empty() {
        return None;
    }
    let mut total: i128 = 0;
    while !rest.is_empty() {
        let number_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number = &rest[..number_end];
        rest = &rest[number_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit = &rest[..unit_end];
        rest = &rest[unit_end..];
        let scale: i128 = match unit {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            _ => return None,
        };
        let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
        if whole.is_empty() && fraction.is_empty() {
            return None;
        }
        let whole: i128 = if whole.is_empty() {
            0
        } else {
            whole.parse().ok()?
        };
        let mut nanos = whole.checked_mul(scale)?;
        let digits = fraction.len().min(18);
        if digits > 0 {
            let part: i128 = fraction[..digits].parse().ok()?;
            nanos += part * scale / 10i128.pow(digits as u32);
        }
        total = total.checked_add(nanos)?;
        if total > i64::MAX as i128 {
            return None;
        }
    }
    i64::try_from(if negative { -total } else { total }).ok()
}

/// Whether `schema` has a rule anywhere.
pub fn has_rules(schema: &Value) -> bool {
    if schema["x-kubernetes-validations"]
        .as_array()
        .is_some_and(|r| !r.is_empty())
    {
        return true;
    }
    schema["properties"]
        .as_object()
        .is_some_and(|p| p.values().any(has_rules))
        || schema.get("items").is_some_and(has_rules)
        || schema
            .get("additionalProperties")
            .is_some_and(|a| a.is_object() && has_rules(a))
}

/// Go's `%#v` of an `apiextensions.ValidationRule`, as CRD validation errors show the rule.
pub fn go_rule(rule: &Value) -> String {
    let s = |k: &str| format!("{:?}", rule[k].as_str().unwrap_or_default());
    // A pointer prints as an address in Go; any fixed one reads the same to a test.
    let reason = if rule.get("reason").is_some() {
        "(*apiextensions.FieldValueErrorReason)(0xc000000000)"
    } else {
        "(*apiextensions.FieldValueErrorReason)(nil)"
    };
    let optional = if rule.get("optionalOldSelf").is_some() {
        "(*bool)(0xc000000000)"
    } else {
        "(*bool)(nil)"
    };
    format!(
        "apiextensions.ValidationRule{{Rule:{}, Message:{}, MessageExpression:{}, Reason:{reason}, FieldPath:{}, OptionalOldSelf:{optional}}}",
        s("rule"),
        s("message"),
        s("messageExpression"),
        s("fieldPath"),
    )
}

/// `fieldPath` of a rule as a path under the rule's node (`cel.ValidFieldPath`): `.a.b`,
/// `['a.b']`, `.m['key']` (a key of a map); `None` when it does not name a field of `schema`.
pub fn field_path(path: &str, schema: &Value) -> Option<String> {
    let mut out = String::new();
    let mut node = schema;
    let mut rest = path;
    let step = |name: &str, node: &mut &Value, out: &mut String| -> Option<()> {
        if let Some(props) = node["properties"].as_object() {
            *node = props.get(name)?;
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(name);
        } else if node["additionalProperties"].is_object() {
            *node = &node["additionalProperties"];
            out.push_str(&format!("[{name}]"));
        } else {
            return None;
        }
        Some(())
    };
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix('.') {
            let end = after.find(['.', '[']).unwrap_or(after.len());
            let name = &after[..end];
            if name.is_empty() {
                return None;
            }
            step(name, &mut node, &mut out)?;
            rest = &after[end..];
        } else if let Some(after) = rest.strip_prefix("['") {
            let mut name = String::new();
            let mut chars = after.char_indices();
            let end = loop {
                let (i, c) = chars.next()?;
                match c {
                    '\\' => {
                        let (_, escaped) = chars.next()?;
                        name.push(match escaped {
                            'n' => '\n',
                            't' => '\t',
                            'r' => '\r',
                            '\'' | '\\' => escaped,
                            _ => return None,
                        });
                    }
                    '\'' => break i,
                    c => name.push(c),
                }
            };
            step(&name, &mut node, &mut out)?;
            rest = after[end + 1..].strip_prefix(']')?;
        } else {
            return None;
        }
    }
    Some(out)
}

/// A message expression's message, if it gives a usable one (upstream falls back to the rule's
/// message otherwise).
pub fn message(parsed: &Parsed, this: &Cel, old: OldSelf) -> Option<String> {
    match run(parsed, this, old) {
        Ok(Cel::String(s)) => {
            let s = s.trim();
            (!s.is_empty() && !s.contains('\n') && s.len() <= MAX_MESSAGE_BYTES)
                .then(|| s.to_owned())
        }
        _ => None,
    }
}

/// The type a failed rule's error shows as its value: the schema's `type` (upstream shows
/// `sts.Type`).
pub fn shown_type(schema: &Value) -> &str {
    schema["type"].as_str().unwrap_or_default()
}

/// What a rule gave, when it is not `true`: `Some(type)` when it is not a boolean at all.
pub fn not_bool(v: &Cel) -> Option<&'static str> {
    match v {
        Cel::Bool(_) => None,
        other => Some(cel_type_name(other)),
    }
}
