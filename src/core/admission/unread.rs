//! The parts of an AdmissionReview the decision never reads, cut out before serde reads the rest.
//!
//! An API server's review of a Deployment is mostly text fledge skips: each object's
//! `managedFields` and `status`, the last-applied configuration and other annotations that are not
//! fledge's, and the request's `userInfo`, `resource`, `requestKind` and `requestResource`.
//! serde_json skips a value token by token, at about fourteen instructions a byte here (managedFields is
//! dense with short strings and brackets). Here a structural index of the body finds where those
//! values end: 64-byte blocks, 16 bytes to a SIMD compare. They are then replaced with `null` (an
//! annotation's text with `""`) in a copy of the body, which serde reads. Each object's
//! `spec.template` is cut out too, and its place noted, so that the template is kept as the exact
//! text sent without serde scanning it.
//!
//! What serde reads from the copy is what it reads from the body, for any valid JSON: only values
//! at these exact paths, with keys written without escapes, are cut, and always whole. Anything
//! that does not look as expected on the way (a key that is not a string, an unclosed bracket, a
//! bracket inside a string) leaves the body as it was. The one difference is for a body that is
//! not valid JSON *inside* a cut value: that value's grammar is not checked beyond its brackets and
//! strings. The API server encodes the objects itself, so it never sends one; and a cut value is
//! never read.

use wide::u8x16;

use crate::core::spec;

/// What to do with the value under a key.
enum Rule {
    /// Walk into the object, with these rules for its keys (other keys are left as they are).
    Object(&'static [(&'static [u8], Rule)]),
    /// A Deployment (or any object under review): [`DEPLOYMENT`], its template taken for `Slot`.
    Deployment(Slot),
    /// Replace the value with `null`: its field is never read.
    Null,
    /// An annotations map: replace each string value whose key is not fledge's with `""`
    /// (fledge reads only its own annotations, and checks that the others are strings).
    Annotations,
    /// A pod template, kept as raw text: replaced with `null` for serde, and its place noted.
    Template,
}

/// Which object of the request a template belongs to.
#[derive(Clone, Copy)]
enum Slot {
    Object,
    OldObject,
}

const DEPLOYMENT: &[(&[u8], Rule)] = &[
    (
        b"metadata",
        Rule::Object(&[
            (b"managedFields", Rule::Null),
            (b"annotations", Rule::Annotations),
        ]),
    ),
    (b"spec", Rule::Object(&[(b"template", Rule::Template)])),
    (b"status", Rule::Null),
];

const REVIEW: Rule = Rule::Object(&[(
    b"request",
    Rule::Object(&[
        (b"object", Rule::Deployment(Slot::Object)),
        (b"oldObject", Rule::Deployment(Slot::OldObject)),
        (b"userInfo", Rule::Null),
        (b"resource", Rule::Null),
        (b"requestKind", Rule::Null),
        (b"requestResource", Rule::Null),
    ]),
)]);

/// A review without the values the decision never reads.
pub struct LeanReview<'b> {
    pub text: &'b str,
    /// Where each object's `spec.template` is in the body as sent (it is `null` in `text`).
    pub templates: Templates,
}

/// Byte ranges of the body, by object.
#[derive(Default)]
pub struct Templates {
    pub object: Option<(usize, usize)>,
    pub old_object: Option<(usize, usize)>,
}

/// The values cut so far: (from, to, replacement), in order; and the templates' places.
#[derive(Default)]
struct Cuts {
    cuts: Vec<(usize, usize, &'static str)>,
    templates: Templates,
}

/// What one review's cut takes: its index and its lean text. Each is a few KiB, past the sizes
/// glibc's per-thread cache serves, so a thread keeps its own from review to review.
#[derive(Default)]
struct Buffers {
    index: Index,
    text: String,
}

/// What a thread keeps between reviews; a body larger than this (up to the 3 MiB limit) gets
/// buffers of its own size once, and they are let go after it.
const KEEP_BYTES: usize = 256 * 1024;

impl Buffers {
    fn trim(&mut self) {
        if self.text.capacity() > KEEP_BYTES {
            *self = Buffers::default();
        }
    }
}

thread_local! {
    static BUFFERS: std::cell::RefCell<Buffers> = std::cell::RefCell::default();
}

/// Calls `read` with the review without the values the decision never reads, cut in this
/// thread's buffers; `None` (and `read` not called) when nothing was cut or the body is not shaped
/// as expected.
pub fn read_lean<R>(text: &str, read: impl FnOnce(LeanReview<'_>) -> R) -> Option<R> {
    BUFFERS.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buffers) => {
            let result = without_unread(text, &mut buffers).map(read);
            buffers.trim();
            result
        }
        // Only if `read` itself came back here: a fresh pair then.
        Err(_) => without_unread(text, &mut Buffers::default()).map(read),
    })
}

/// The review with the values the decision never reads replaced, in `buffers`.
fn without_unread<'b>(text: &str, buffers: &'b mut Buffers) -> Option<LeanReview<'b>> {
    let bytes = text.as_bytes();
    buffers.index.fill(bytes);
    let start = skip_whitespace(bytes, 0);
    let mut cuts = Cuts::default();
    let walk = Walk {
        bytes,
        index: &buffers.index,
    };
    walk.value(start, &REVIEW, None, &mut cuts)?;
    if cuts.cuts.is_empty() {
        return None;
    }
    let out = &mut buffers.text;
    out.clear();
    let mut at = 0;
    for (from, to, with) in cuts.cuts {
        out.push_str(text.get(at..from)?);
        out.push_str(with);
        at = to;
    }
    out.push_str(text.get(at..)?);
    Some(LeanReview {
        text: out,
        templates: cuts.templates,
    })
}

/// Where strings begin and end, and the brackets outside strings, per 64-byte block.
#[derive(Default)]
struct Index(Vec<Block>);

/// One bit per byte of a block.
#[derive(Clone, Copy)]
struct Block {
    /// Unescaped `"`: each opens or closes a string.
    quotes: u64,
    /// `{` and `[` outside strings.
    opens: u64,
    /// `}` and `]` outside strings.
    closes: u64,
}

impl Index {
    fn fill(&mut self, bytes: &[u8]) {
        let blocks = &mut self.0;
        blocks.clear();
        blocks.reserve(bytes.len().div_ceil(64));
        let mut escaped_carry = false;
        let mut in_string_carry = 0u64;
        let (whole, rest) = bytes.as_chunks::<64>();
        let mut last = [b' '; 64];
        last[..rest.len()].copy_from_slice(rest);
        let tail = (!rest.is_empty()).then_some(&last);
        for block in whole.iter().chain(tail) {
            let classes = Classes::of(block);
            let escaped = escaped_bits(classes.backslashes, &mut escaped_carry);
            let quotes = classes.quotes & !escaped;
            // 1 from an opening quote up to (not including) its closing quote.
            let in_string = prefix_xor(quotes) ^ in_string_carry;
            in_string_carry = 0u64.wrapping_sub(in_string >> 63);
            blocks.push(Block {
                quotes,
                opens: classes.opens & !in_string,
                closes: classes.closes & !in_string,
            });
        }
    }

    /// The first unescaped quote after `at`.
    fn quote_after(&self, at: usize) -> Option<usize> {
        let mut block = at / 64;
        let mut bits = self.0.get(block)?.quotes & above(at % 64);
        loop {
            if bits != 0 {
                return Some(block * 64 + bits.trailing_zeros() as usize);
            }
            block += 1;
            bits = self.0.get(block)?.quotes;
        }
    }

    /// The bracket that closes the one at `open` (not checked to be of the same kind: the
    /// value is cut whole either way, and serde reads what is around it).
    fn closing(&self, open: usize) -> Option<usize> {
        let mut block = open / 64;
        // Brackets from `open` on; `depth` counts the ones open before the block.
        let mut from = !0u64 << (open % 64);
        if self.0.get(block)?.opens & from.wrapping_neg() & from == 0 {
            // Not a bracket the index knows (one inside a string of a broken body).
            return None;
        }
        let mut depth = 0u32;
        loop {
            let Block { opens, closes, .. } = *self.0.get(block)?;
            let (opens, closes) = (opens & from, closes & from);
            if closes.count_ones() >= depth {
                // The value may end in this block: the depth after each close is the opens
                // before it less the closes up to it.
                let (mut left, mut closed) = (closes, 0);
                while left != 0 {
                    let bit = left & left.wrapping_neg();
                    left ^= bit;
                    closed += 1;
                    if depth + (opens & (bit - 1)).count_ones() == closed {
                        return Some(block * 64 + bit.trailing_zeros() as usize);
                    }
                }
            }
            // Never below zero, as a close that brought it there was returned above.
            depth = (depth + opens.count_ones()).checked_sub(closes.count_ones())?;
            block += 1;
            from = !0;
        }
    }
}

/// The bits above position `at` (0..64) of a block.
fn above(at: usize) -> u64 {
    (!0u64).checked_shl(at as u32 + 1).unwrap_or(0)
}

/// The bytes of one block that matter to the index, one bit per byte.
struct Classes {
    quotes: u64,
    backslashes: u64,
    opens: u64,
    closes: u64,
}

impl Classes {
    fn of(block: &[u8; 64]) -> Classes {
        let (lanes, _) = block.as_chunks::<16>();
        let mut classes = Classes {
            quotes: 0,
            backslashes: 0,
            opens: 0,
            closes: 0,
        };
        let case = u8x16::splat(0x20);
        for (i, lane) in lanes.iter().enumerate() {
            let v = u8x16::new(*lane);
            // `[` and `{` differ only in bit 0x20, as do `]` and `}`.
            let folded = v | case;
            let mask = |m: u8x16| u64::from(m.to_bitmask()) << (16 * i);
            classes.quotes |= mask(v.simd_eq(u8x16::splat(b'"')));
            classes.backslashes |= mask(v.simd_eq(u8x16::splat(b'\\')));
            classes.opens |= mask(folded.simd_eq(u8x16::splat(b'{')));
            classes.closes |= mask(folded.simd_eq(u8x16::splat(b'}')));
        }
        classes
    }
}

/// The bytes escaped by a backslash: the one after each backslash that is not itself escaped.
/// `carry` says the block's first byte is escaped (the previous block ended on an escaping
/// backslash), and is set for the next block.
fn escaped_bits(backslashes: u64, carry: &mut bool) -> u64 {
    let mut escaped = u64::from(*carry);
    *carry = false;
    let mut escaping = backslashes & !escaped;
    while escaping != 0 {
        let bit = escaping & escaping.wrapping_neg();
        escaping ^= bit;
        match bit.checked_shl(1).filter(|next| *next != 0) {
            Some(next) => {
                escaped |= next;
                escaping &= !next;
            }
            None => *carry = true,
        }
    }
    escaped
}

/// Bit i of the result is the XOR of bits 0..=i.
fn prefix_xor(mut bits: u64) -> u64 {
    for shift in [1, 2, 4, 8, 16, 32] {
        bits ^= bits << shift;
    }
    bits
}

/// JSON's whitespace.
fn is_whitespace(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

fn skip_whitespace(bytes: &[u8], mut at: usize) -> usize {
    while bytes.get(at).is_some_and(|b| is_whitespace(*b)) {
        at += 1;
    }
    at
}

struct Walk<'a> {
    bytes: &'a [u8],
    index: &'a Index,
}

impl Walk<'_> {
    /// Applies `rule` to the value at `at`, inside the object of `slot`; returns where the value
    /// ends.
    fn value(&self, at: usize, rule: &Rule, slot: Option<Slot>, cuts: &mut Cuts) -> Option<usize> {
        let object = self.bytes.get(at) == Some(&b'{');
        match rule {
            Rule::Object(keys) if object => self.members(at, |key, value| {
                match keys.iter().find(|(k, _)| *k == key) {
                    Some((_, rule)) => self.value(value, rule, slot, cuts),
                    None => self.end_of(value),
                }
            }),
            Rule::Deployment(slot) => self.value(at, &Rule::Object(DEPLOYMENT), Some(*slot), cuts),
            Rule::Null => {
                let end = self.end_of(at)?;
                cuts.cuts.push((at, end, "null"));
                Some(end)
            }
            Rule::Annotations if object => self.members(at, |key, value| {
                let end = self.end_of(value)?;
                let fledges = key.starts_with(spec::PREFIX.as_bytes());
                if !fledges && !key.contains(&b'\\') && self.bytes.get(value) == Some(&b'"') {
                    cuts.cuts.push((value, end, "\"\""));
                }
                Some(end)
            }),
            Rule::Template if object => {
                let end = self.end_of(at)?;
                let place = match slot? {
                    Slot::Object => &mut cuts.templates.object,
                    Slot::OldObject => &mut cuts.templates.old_object,
                };
                *place = Some((at, end));
                cuts.cuts.push((at, end, "null"));
                Some(end)
            }
            // Not an object where one is expected: left for serde to read (and refuse).
            Rule::Object(_) | Rule::Annotations | Rule::Template => self.end_of(at),
        }
    }

    /// Visits each member of the object at `open` as (raw key, where its value starts); `visit`
    /// returns where the value ends. Returns where the object ends.
    fn members(
        &self,
        open: usize,
        mut visit: impl FnMut(&[u8], usize) -> Option<usize>,
    ) -> Option<usize> {
        let mut at = skip_whitespace(self.bytes, open + 1);
        if self.bytes.get(at) == Some(&b'}') {
            return Some(at + 1);
        }
        loop {
            if self.bytes.get(at) != Some(&b'"') {
                return None;
            }
            let key_end = self.index.quote_after(at)?;
            let key = self.bytes.get(at + 1..key_end)?;
            at = skip_whitespace(self.bytes, key_end + 1);
            if self.bytes.get(at) != Some(&b':') {
                return None;
            }
            let value = skip_whitespace(self.bytes, at + 1);
            at = skip_whitespace(self.bytes, visit(key, value)?);
            match self.bytes.get(at) {
                Some(b',') => at = skip_whitespace(self.bytes, at + 1),
                Some(b'}') => return Some(at + 1),
                _ => return None,
            }
        }
    }

    /// Where the value starting at `at` ends (one past its last byte).
    fn end_of(&self, at: usize) -> Option<usize> {
        match self.bytes.get(at)? {
            b'"' => self.index.quote_after(at).map(|q| q + 1),
            b'{' | b'[' => self.index.closing(at).map(|c| c + 1),
            b',' | b'}' | b']' | b':' => None,
            _ => {
                // A number, `true`, `false` or `null`: up to the next delimiter.
                let rest = self.bytes.get(at..)?;
                let len = rest
                    .iter()
                    .position(|b| matches!(b, b',' | b'}' | b']') || is_whitespace(*b))
                    .unwrap_or(rest.len());
                Some(at + len)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    impl Index {
        fn of(bytes: &[u8]) -> Index {
            let mut index = Index::default();
            index.fill(bytes);
            index
        }
    }

    /// The index as a reader going byte by byte sees it: (quotes, opens, closes) positions. A
    /// backslash escapes the next quote or backslash wherever it is; an escaped bracket outside a
    /// string still counts (outside a string, a backslash is not JSON anyway).
    fn byte_by_byte(bytes: &[u8]) -> [Vec<usize>; 3] {
        let (mut quotes, mut opens, mut closes) = (Vec::new(), Vec::new(), Vec::new());
        let (mut in_string, mut escaped) = (false, false);
        for (i, b) in bytes.iter().enumerate() {
            if std::mem::take(&mut escaped) && matches!(b, b'"' | b'\\') {
                continue;
            }
            match b {
                b'\\' => escaped = true,
                b'"' => {
                    quotes.push(i);
                    in_string = !in_string;
                }
                b'{' | b'[' if !in_string => opens.push(i),
                b'}' | b']' if !in_string => closes.push(i),
                _ => {}
            }
        }
        [quotes, opens, closes]
    }

    fn positions(index: &Index, bits: impl Fn(&Block) -> u64) -> Vec<usize> {
        let mut out = Vec::new();
        for (b, bits) in index.0.iter().map(bits).enumerate() {
            for i in 0..64 {
                if bits >> i & 1 == 1 {
                    out.push(b * 64 + i);
                }
            }
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2_000))]

        #[test]
        fn the_index_finds_what_a_byte_by_byte_reader_finds(
            bytes in prop::collection::vec(prop::sample::select(b"\"\\{}[]a :".to_vec()), 0..400)
        ) {
            let index = Index::of(&bytes);
            let found = [
                positions(&index, |b| b.quotes),
                positions(&index, |b| b.opens),
                positions(&index, |b| b.closes),
            ];
            prop_assert_eq!(found, byte_by_byte(&bytes));
        }
    }

    #[test]
    fn backslash_runs_escape_across_blocks() {
        // 63 bytes, then a backslash as the block's last byte: the next block's quote is escaped.
        for run in 1..5 {
            let mut text = vec![b'a'; 64 - run];
            text.extend(std::iter::repeat_n(b'\\', run));
            text.extend(b"\"x\"");
            let quotes = positions(&Index::of(&text), |b| b.quotes);
            let expected = if run % 2 == 1 { vec![66] } else { vec![64, 66] };
            assert_eq!(quotes, expected, "{run} backslashes");
        }
    }

    #[test]
    fn closing_brackets_are_found_past_strings_and_blocks() {
        let text = format!(r#"{{"a":["]}}",{}{{"b":"\"}}"}}]}}"#, "[1],".repeat(40));
        let index = Index::of(text.as_bytes());
        assert_eq!(index.closing(0), Some(text.len() - 1));
        assert_eq!(index.closing(5), Some(text.len() - 2));
        // Not a bracket, or one inside a string: not followed.
        assert_eq!(Index::of(b"[1]").closing(1), None);
        assert_eq!(Index::of(b"\"{}\"").closing(1), None);
        // Unclosed: not found, rather than a guess.
        assert_eq!(Index::of(b"{\"a\":[1,2").closing(5), None);
        assert_eq!(Index::of(b"[[]").closing(0), None);
    }

    #[test]
    fn the_unread_values_are_cut_and_nothing_else() {
        let review = r#" { "request" : { "uid":"u", "userInfo" : {"username":"a"},
            "object":{"metadata":{"name":"web","managedFields":[{"f:a":{}}],
              "annotations":{"fledge.dev/steps":"- setWeight: 5","x":"{\"y\":1}","n":7,"\u0078":"z"}},
              "spec":{"template":{"status":1,"managedFields":2}},"status":{"replicas":3}},
            "oldObject":null, "kind":{"kind":"Deployment"} } } "#;
        let mut buffers = Buffers::default();
        let lean = without_unread(review, &mut buffers).unwrap();
        assert_eq!(
            lean.text,
            r#" { "request" : { "uid":"u", "userInfo" : null,
            "object":{"metadata":{"name":"web","managedFields":null,
              "annotations":{"fledge.dev/steps":"- setWeight: 5","x":"","n":7,"\u0078":"z"}},
              "spec":{"template":null},"status":null},
            "oldObject":null, "kind":{"kind":"Deployment"} } } "#
        );
        let (from, to) = lean.templates.object.unwrap();
        assert_eq!(&review[from..to], r#"{"status":1,"managedFields":2}"#);
        assert!(lean.templates.old_object.is_none());
    }

    #[test]
    fn bodies_not_shaped_as_expected_are_left_alone() {
        for text in [
            "",
            "[]",
            r#"{"request":{"object":{"status":[1,2}}}"#,
            r#"{"request":{"object":{"status"}}}"#,
            r#"{"request":{"object":{"metadata":{"managedFields":[]}"#,
            r#"{"request":{"object":{"status":1}"#,
            r#"{"request":{"object":{"metadata":{}}}}"#,
        ] {
            assert!(read_lean(text, |_| ()).is_none(), "{text}");
        }
    }
}
