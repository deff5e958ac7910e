//! JSON with the checks serde's maps leave out: a duplicate key anywhere is
//! an error (serde_json keeps the last value silently), object order is kept.
//!
//! Values are read straight from the text by typed readers ([`Typed`]),
//! never into a generic tree: a `serde_json::Value` costs tens of bytes per
//! number, so a 100 MiB header of small numbers would take gigabytes. What
//! a reader does not take is walked ([`Walk`]) with the same checks and
//! dropped, so memory follows what the caller keeps, not the text.

use std::borrow::Cow;
use std::collections::HashSet;
use std::fmt;

use serde::de::{self, Deserialize, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

/// A typed reader of one JSON value, for [`parse_with`] or, as the seed
/// [`Read`], for a value inside another. Each method takes one kind of
/// value (a scalar one declines with `Err(self)`); a value not taken is
/// walked with the checks of [`Walk`] and answered by [`Typed::other`].
pub trait Typed<'de>: Sized {
    type Out;
    /// Whether [`Typed::other`] is given the value as compact JSON text
    /// (for messages that show it); otherwise it is given an empty string.
    const SHOW: bool = false;
    /// A value of a kind not taken (`shown`: see [`Typed::SHOW`]).
    fn other(self, shown: String) -> Self::Out;
    /// An object.
    fn object<A: MapAccess<'de>>(self, map: A) -> Result<Self::Out, A::Error> {
        declined(self, |w| w.visit_map(map))
    }
    /// An array.
    fn array<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Out, A::Error> {
        declined(self, |w| w.visit_seq(seq))
    }
    /// A string.
    fn string(self, _s: &str) -> Result<Self::Out, Self> {
        Err(self)
    }
    /// A non-negative integer (what `Value::as_u64` gives).
    fn uint(self, _v: u64) -> Result<Self::Out, Self> {
        Err(self)
    }
    /// `null`.
    fn null(self) -> Result<Self::Out, Self> {
        Err(self)
    }
}

/// The answer of `t` to a value it does not take, walked by `walk`.
fn declined<'de, T: Typed<'de>, E>(
    t: T,
    walk: impl FnOnce(Walk<'_>) -> Result<(), E>,
) -> Result<T::Out, E> {
    let mut shown = String::new();
    walk(Walk(T::SHOW.then_some(&mut shown)))?;
    Ok(t.other(shown))
}

/// A [`Typed`] reader as a seed (`map.next_value_seed(Read(reader))`).
pub struct Read<T>(pub T);

impl<'de, T: Typed<'de>> DeserializeSeed<'de> for Read<T> {
    type Value = T::Out;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<T::Out, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de, T: Typed<'de>> Visitor<'de> for Read<T> {
    type Value = T::Out;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<T::Out, E> {
        declined(self.0, |w| w.visit_bool(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<T::Out, E> {
        match u64::try_from(v) {
            Ok(u) => self.visit_u64(u),
            Err(_) => declined(self.0, |w| w.visit_i64(v)),
        }
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<T::Out, E> {
        match self.0.uint(v) {
            Ok(out) => Ok(out),
            Err(t) => declined(t, |w| w.visit_u64(v)),
        }
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<T::Out, E> {
        declined(self.0, |w| w.visit_f64(v))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<T::Out, E> {
        match self.0.string(v) {
            Ok(out) => Ok(out),
            Err(t) => declined(t, |w| w.visit_str(v)),
        }
    }
    fn visit_unit<E: de::Error>(self) -> Result<T::Out, E> {
        match self.0.null() {
            Ok(out) => Ok(out),
            Err(t) => declined(t, |w| w.visit_unit()),
        }
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<T::Out, A::Error> {
        self.0.array(seq)
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T::Out, A::Error> {
        self.0.object(map)
    }
}

/// One JSON value read with the checks of [`parse_with`] (duplicate keys
/// rejected at any depth, escapes decoded) and dropped; with a string, also
/// written into it as compact JSON text, as `Value::to_string` writes it.
pub struct Walk<'a>(pub Option<&'a mut String>);

impl Walk<'_> {
    fn put(&mut self, text: &str) {
        if let Some(out) = self.0.as_deref_mut() {
            out.push_str(text);
        }
    }
}

impl<'de> DeserializeSeed<'de> for Walk<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Walk<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(mut self, v: bool) -> Result<(), E> {
        self.put(if v { "true" } else { "false" });
        Ok(())
    }
    fn visit_i64<E>(mut self, v: i64) -> Result<(), E> {
        if self.0.is_some() {
            self.put(&v.to_string());
        }
        Ok(())
    }
    fn visit_u64<E>(mut self, v: u64) -> Result<(), E> {
        if self.0.is_some() {
            self.put(&v.to_string());
        }
        Ok(())
    }
    fn visit_f64<E>(mut self, v: f64) -> Result<(), E> {
        if self.0.is_some() {
            let v = serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number);
            self.put(&v.to_string());
        }
        Ok(())
    }
    fn visit_str<E>(mut self, v: &str) -> Result<(), E> {
        if self.0.is_some() {
            self.put(&quote(v));
        }
        Ok(())
    }
    fn visit_unit<E>(mut self) -> Result<(), E> {
        self.put("null");
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(mut self, mut seq: A) -> Result<(), A::Error> {
        self.put("[");
        let mut first = true;
        loop {
            let mark = self.0.as_ref().map_or(0, |out| out.len());
            if !first {
                self.put(",");
            }
            if seq
                .next_element_seed(Walk(self.0.as_deref_mut()))?
                .is_none()
            {
                if let Some(out) = self.0.as_deref_mut() {
                    out.truncate(mark);
                }
                break;
            }
            first = false;
        }
        self.put("]");
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<(), A::Error> {
        self.put("{");
        let mut keys = Keys::default();
        while let Some(Key(key)) = map.next_key()? {
            if !keys.0.is_empty() {
                self.put(",");
            }
            if self.0.is_some() {
                self.put(&quote(&key));
                self.put(":");
            }
            map.next_value_seed(Walk(self.0.as_deref_mut()))?;
            keys.insert(key)?;
        }
        self.put("}");
        Ok(())
    }
}

/// A key of a JSON object, borrowed from the text when it holds no escape.
pub struct Key<'de>(pub Cow<'de, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_string())))
            }
        }
        d.deserialize_str(KeyVisitor)
    }
}

/// The keys of one object read so far.
#[derive(Default)]
pub struct Keys<'de>(HashSet<Cow<'de, str>>);

impl<'de> Keys<'de> {
    /// Notes `key`, once its value is read: a key seen before is an error
    /// (serde_json adds the position, after that value).
    pub fn insert<E: de::Error>(&mut self, key: Cow<'de, str>) -> Result<(), E> {
        if self.0.contains(key.as_ref()) {
            return Err(E::custom(format!("duplicate key {:?}", key.as_ref())));
        }
        self.0.insert(key);
        Ok(())
    }
}

/// An object as its `(key, value)` pairs in order, each value read by `R`
/// (a key seen before is an error, after its value: see [`Keys`]); `None`
/// for anything else.
pub struct Pairs<R>(pub R);

impl<'de, R: Typed<'de> + Copy> Typed<'de> for Pairs<R> {
    type Out = Option<Vec<(String, R::Out)>>;
    fn other(self, _: String) -> Self::Out {
        None
    }
    fn object<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Out, A::Error> {
        let mut out = Vec::new();
        let mut keys = Keys::default();
        while let Some(Key(name)) = map.next_key()? {
            out.push((name.to_string(), map.next_value_seed(Read(self.0))?));
            keys.insert(name)?;
        }
        Ok(Some(out))
    }
}

/// A string (`Ok`); anything else is `Err` of the value as compact JSON
/// text when `SHOW` (for a message that shows it), of `""` otherwise.
#[derive(Clone, Copy)]
pub struct Text<const SHOW: bool>;

impl<'de, const SHOW: bool> Typed<'de> for Text<SHOW> {
    type Out = Result<String, String>;
    const SHOW: bool = SHOW;
    fn other(self, shown: String) -> Self::Out {
        Err(shown)
    }
    fn string(self, s: &str) -> Result<Self::Out, Self> {
        Ok(Ok(s.to_string()))
    }
}

/// A non-negative integer (`Ok`); anything else as [`Text`].
pub struct UInt<const SHOW: bool>;

impl<'de, const SHOW: bool> Typed<'de> for UInt<SHOW> {
    type Out = Result<u64, String>;
    const SHOW: bool = SHOW;
    fn other(self, shown: String) -> Self::Out {
        Err(shown)
    }
    fn uint(self, v: u64) -> Result<Self::Out, Self> {
        Ok(Ok(v))
    }
}

/// A list of non-negative integers that fit a `usize`, as [`UInts`] reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ints {
    /// The first integers, at most the `keep` of [`UInts`].
    pub values: Vec<usize>,
    /// How many the list holds.
    pub len: usize,
    /// Whether any is 0.
    pub zero: bool,
}

/// An array of non-negative integers that fit a `usize` (`Some`), of which
/// the first `.0` are kept: a long list costs no memory. Anything else
/// (an element of another kind included) is `None`.
pub struct UInts(pub usize);

impl<'de> Typed<'de> for UInts {
    type Out = Option<Ints>;
    fn other(self, _: String) -> Option<Ints> {
        None
    }
    fn array<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Option<Ints>, A::Error> {
        let mut ints = Some(Ints {
            values: Vec::new(),
            len: 0,
            zero: false,
        });
        // Every element is read, after a bad one too (the checks of `Walk`).
        while let Some(v) = seq.next_element_seed(Read(UInt::<false>))? {
            let v = v.ok().and_then(|v| usize::try_from(v).ok());
            match (&mut ints, v) {
                (Some(ints), Some(v)) => {
                    if ints.values.len() < self.0 {
                        ints.values.push(v);
                    }
                    ints.len += 1;
                    ints.zero |= v == 0;
                }
                _ => ints = None,
            }
        }
        Ok(ints)
    }
}

/// Reads `text`, one JSON value and nothing after it, with `reader`; the
/// error is one line (serde_json's, with its position). Nesting is bounded
/// by serde_json's recursion limit (128).
pub fn parse_with<'de, T: Typed<'de>>(text: &'de str, reader: T) -> Result<T::Out, String> {
    let mut de = serde_json::Deserializer::from_str(text);
    let out = Read(reader)
        .deserialize(&mut de)
        .map_err(|e| e.to_string())?;
    de.end().map_err(|e| e.to_string())?;
    Ok(out)
}

/// Whether a parse error came from a duplicate key (rather than bad syntax).
pub fn is_duplicate(err: &str) -> bool {
    err.starts_with("duplicate key")
}

/// `s` as a JSON string literal (quotes included).
pub fn quote(s: &str) -> String {
    Value::String(s.to_string()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value as [`Walk`] shows it.
    struct Shown;
    impl Typed<'_> for Shown {
        type Out = String;
        const SHOW: bool = true;
        fn other(self, shown: String) -> String {
            shown
        }
    }

    fn walk(text: &str) -> Result<String, String> {
        parse_with(text, Shown)
    }

    #[test]
    fn duplicates_are_rejected_at_any_depth() {
        assert!(walk(r#"{"a":1,"b":{"c":2}}"#).is_ok());
        let e = walk(r#"{"a":1,"a":2}"#).unwrap_err();
        assert!(is_duplicate(&e), "{e}");
        assert_eq!(e, "duplicate key \"a\" at line 1 column 13");
        assert!(is_duplicate(&walk(r#"{"a":{"c":1,"c":1}}"#).unwrap_err()));
        assert!(is_duplicate(&walk(r#"[{"c":1,"c":1}]"#).unwrap_err()));
        // In values the typed readers take, or leave.
        let e = parse_with(r#"[1,{"c":1,"c":1}]"#, UInts(1)).unwrap_err();
        assert!(is_duplicate(&e), "{e}");
        let e = parse_with(r#"{"c":1,"c":1}"#, Text::<false>).unwrap_err();
        assert!(is_duplicate(&e), "{e}");
    }

    #[test]
    fn shown_as_value_to_string_and_trailing_garbage_rejected() {
        for text in [
            r#"{"z":1,"a":[2,-3,4.5,1e300,true,null,"x\"\u00e9\n"],"e":{},"f":[]}"#,
            "[ 1 , 2 ]",
            "-0",
            "1E5",
            r#""\ud83d\ude00""#,
        ] {
            let want = serde_json::from_str::<Value>(text).unwrap().to_string();
            assert_eq!(walk(text).unwrap(), want, "{text}");
        }
        assert!(walk(r#"{"a":1} x"#).is_err());
        assert_eq!(quote("a\"b"), r#""a\"b""#);
        let e = walk(r#"{"a\ud800b":1}"#).unwrap_err();
        assert!(e.contains("hex escape") || e.contains("surrogate"), "{e}");
        let e = parse_with(r#"["\ud800"]"#, UInts(1)).unwrap_err();
        assert!(e.contains("hex escape") || e.contains("surrogate"), "{e}");
    }

    #[test]
    fn uints_keep_a_bounded_prefix() {
        let ints = parse_with("[3,0,5,7]", UInts(2)).unwrap().unwrap();
        assert_eq!(ints.values, [3, 0]);
        assert_eq!((ints.len, ints.zero), (4, true));
        assert_eq!(parse_with("[1,-1]", UInts(8)).unwrap(), None);
        assert_eq!(parse_with("[1,1.0]", UInts(8)).unwrap(), None);
        assert_eq!(parse_with("[1,[2]]", UInts(8)).unwrap(), None);
        assert_eq!(parse_with(r#"{"a":1}"#, UInts(8)).unwrap(), None);
        let big = format!("[{}]", vec!["1"; 100_000].join(","));
        let ints = parse_with(&big, UInts(64)).unwrap().unwrap();
        assert_eq!((ints.values.len(), ints.len), (64, 100_000));
        assert_eq!(parse_with("7", UInt::<true>).unwrap(), Ok(7));
        assert_eq!(parse_with("-7", UInt::<true>).unwrap(), Err("-7".into()));
        assert_eq!(parse_with("[7]", UInt::<false>).unwrap(), Err("".into()));
        assert_eq!(parse_with("\"x\"", Text::<true>).unwrap(), Ok("x".into()));
        assert_eq!(parse_with("{ }", Text::<true>).unwrap(), Err("{}".into()));
    }
}
