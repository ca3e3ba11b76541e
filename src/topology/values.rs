//! Value types of the topology file that TOML has no direct form for.

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;
use std::fmt;
use std::marker::PhantomData;

/// `"auto"` or a number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AutoOr<T> {
    /// Decided at start-up.
    #[default]
    Auto,
    /// Given.
    Value(T),
}

struct AutoOrVisitor<T>(PhantomData<T>);

impl<'de, T: TryFrom<i64>> Visitor<'de> for AutoOrVisitor<T> {
    type Value = AutoOr<T>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("\"auto\" or a non-negative integer")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        if v == "auto" {
            Ok(AutoOr::Auto)
        } else {
            Err(E::invalid_value(de::Unexpected::Str(v), &self))
        }
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        T::try_from(v)
            .map(AutoOr::Value)
            .map_err(|_| E::invalid_value(de::Unexpected::Signed(v), &self))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        match i64::try_from(v) {
            Ok(v) => self.visit_i64(v),
            Err(_) => Err(E::invalid_value(de::Unexpected::Unsigned(v), &self)),
        }
    }
}

impl<'de, T: TryFrom<i64>> Deserialize<'de> for AutoOr<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(AutoOrVisitor(PhantomData))
    }
}

/// Cores to pin threads to.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Cores {
    /// Chosen at start-up (the device's NUMA node).
    #[default]
    Auto,
    /// These cores, in order, without repeats.
    List(Vec<usize>),
}

/// Parses `"0-3,8,10-11"`.
pub fn parse_core_ranges(s: &str) -> Result<Vec<usize>, String> {
    let mut out = Vec::new();
    for part in s.split(',') {
        let part = part.trim();
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (a.trim(), b.trim()),
            None => (part, part),
        };
        let a: usize = a
            .parse()
            .map_err(|_| format!("`{part}` is not a core or a range a-b"))?;
        let b: usize = b
            .parse()
            .map_err(|_| format!("`{part}` is not a core or a range a-b"))?;
        if b < a {
            return Err(format!("range `{part}` is empty"));
        }
        if b - a >= 4096 {
            return Err(format!("range `{part}` is too large"));
        }
        out.extend(a..=b);
    }
    Ok(out)
}

fn check_unique(v: &[usize]) -> Result<(), String> {
    let mut seen = std::collections::BTreeSet::new();
    for &c in v {
        if !seen.insert(c) {
            return Err(format!("core {c} is listed twice"));
        }
    }
    if v.is_empty() {
        return Err("the core list is empty".into());
    }
    Ok(())
}

struct CoresVisitor;

impl<'de> Visitor<'de> for CoresVisitor {
    type Value = Cores;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("\"auto\", a list of core numbers, or ranges like \"0-7,12\"")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Cores, E> {
        if v == "auto" {
            return Ok(Cores::Auto);
        }
        let list = parse_core_ranges(v).map_err(E::custom)?;
        check_unique(&list).map_err(E::custom)?;
        Ok(Cores::List(list))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Cores, A::Error> {
        let mut list = Vec::new();
        while let Some(c) = seq.next_element::<usize>()? {
            list.push(c);
        }
        check_unique(&list).map_err(de::Error::custom)?;
        Ok(Cores::List(list))
    }
}

impl<'de> Deserialize<'de> for Cores {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(CoresVisitor)
    }
}
