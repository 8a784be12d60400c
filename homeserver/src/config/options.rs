//! Each option is declared once, as a field of a section struct: its doc comment is its
//! documentation, the struct's `Default` its default, its path of field names its TOML key,
//! and its environment variable follows from that key by one rule ([`env_name`]).
//!
//! The [`section!`] macro wraps a section struct's definition and records, next to the
//! struct it emits unchanged, the fields' keys, doc comments and value shapes
//! ([`OptionType::SHAPE`]). The environment table ([`env_overrides`]), the example file and
//! the reference page ([`super::docs`]) are walks over that record.
//!
//! Why a small macro and not a crate: what is needed is the doc comments at run time and a
//! value kind per field. `schemars` would give the docs and defaults as a JSON schema, but
//! reading kinds back out of `$ref`s, `anyOf`s for `Option` and `try_from` types costs more
//! code than this file, and `figment`/`config` read sources (we already do, with `toml`) but
//! document nothing.

use super::{ConfigError, err};

/// What kind of value an environment variable carries, so `OBMIN_X=5` is parsed right.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnvKind {
    String,
    Integer,
    Float,
    Bool,
    /// Comma-separated strings.
    List,
}

/// What a declared field holds: one value, or a section of further fields (a TOML table).
#[derive(Debug, Clone, Copy)]
pub enum Shape {
    Value(EnvKind),
    Section(&'static Section),
}

/// A section struct's declarations.
#[derive(Debug)]
pub struct Section {
    /// The struct's doc comment, one entry per line.
    pub doc: &'static [&'static str],
    pub fields: &'static [Field],
}

/// One declared field.
#[derive(Debug)]
pub struct Field {
    /// The field's name: its key inside the section.
    pub name: &'static str,
    /// The field's doc comment, one entry per line.
    pub doc: &'static [&'static str],
    /// For an option with no default value (an `Option` left unset): a value to show,
    /// as TOML.
    pub example: Option<&'static str>,
    pub shape: Shape,
}

/// How a field's type is read: implemented for the value types options use and, by
/// [`section!`], for every section struct.
pub trait OptionType {
    const SHAPE: Shape;
}

macro_rules! value_types {
    ($kind:ident: $($ty:ty),*) => {
        $(impl $crate::config::options::OptionType for $ty {
            const SHAPE: $crate::config::options::Shape =
                $crate::config::options::Shape::Value($crate::config::options::EnvKind::$kind);
        })*
    };
}
value_types!(String: String, std::path::PathBuf);
value_types!(Integer: u32, u64, i64, usize);
value_types!(Float: f64);
value_types!(Bool: bool);
pub(crate) use value_types;

impl<T: OptionType> OptionType for Option<T> {
    const SHAPE: Shape = T::SHAPE;
}

impl<T> OptionType for Vec<T> {
    const SHAPE: Shape = Shape::Value(EnvKind::List);
}

/// Declares a section struct: emits it as written (doc comments, derives, serde attributes)
/// and implements [`OptionType`] for it from its fields' names, doc comments and types. A
/// field may carry `#[example = "TOML"]` (shown in the example file when its default is
/// unset); it is not emitted.
macro_rules! section {
    (
        $(#[doc = $doc:literal])*
        #[derive($($derive:path),* $(,)?)]
        $(#[serde($($serde:tt)*)])?
        pub struct $name:ident {
            $(
                $(#[doc = $fdoc:literal])*
                $(#[example = $example:literal])?
                pub $field:ident : $ty:ty
            ),* $(,)?
        }
    ) => {
        $(#[doc = $doc])*
        #[derive($($derive),*)]
        $(#[serde($($serde)*)])?
        pub struct $name {
            $(
                $(#[doc = $fdoc])*
                pub $field: $ty,
            )*
        }

        impl $crate::config::options::OptionType for $name {
            const SHAPE: $crate::config::options::Shape =
                $crate::config::options::Shape::Section(&$crate::config::options::Section {
                    doc: &[$($doc),*],
                    fields: &[$(
                        $crate::config::options::Field {
                            name: stringify!($field),
                            doc: &[$($fdoc),*],
                            example: $crate::config::options::first(&[$($example)?]),
                            shape: <$ty as $crate::config::options::OptionType>::SHAPE,
                        }
                    ),*],
                });
        }
    };
}
pub(crate) use section;

/// `Some` of the first entry (the macro's optional example), usable in a constant.
pub const fn first(items: &[&'static str]) -> Option<&'static str> {
    match items {
        [first, ..] => Some(first),
        [] => None,
    }
}

/// The environment variable of an option: `OBMIN_` and its key, upper case, dots as
/// underscores (`http.max_connections` is `OBMIN_HTTP_MAX_CONNECTIONS`).
pub fn env_name(key: &str) -> String {
    format!("OBMIN_{}", key.replace('.', "_").to_ascii_uppercase())
}

/// Environment names from before the rule, still read. Applied after the names by the rule,
/// so when both are set the older name wins, as it did before the rule.
pub const ENV_ALIASES: &[(&str, &str)] = &[
    ("OBMIN_LOG", "log.filter"),
    ("OBMIN_TLS_CERT", "federation.tls_cert"),
    ("OBMIN_TLS_KEY", "federation.tls_key"),
    // The rate-limit section's earlier shape (`login` and `register` single buckets, `burst`).
    ("OBMIN_RATE_LIMITS_LOGIN_PER_SECOND", "rate_limits.login.address.per_second"),
    ("OBMIN_RATE_LIMITS_LOGIN_BURST", "rate_limits.login.address.burst_count"),
    ("OBMIN_RATE_LIMITS_REGISTER_PER_SECOND", "rate_limits.registration.per_second"),
    ("OBMIN_RATE_LIMITS_REGISTER_BURST", "rate_limits.registration.burst_count"),
];

/// One option as a dotted key, with its declaration.
pub struct Leaf {
    pub key: String,
    pub field: &'static Field,
    pub kind: EnvKind,
}

/// Every option under `section` (not the sections themselves), depth first in declaration
/// order, with dotted keys.
pub fn leaves(section: &'static Section) -> Vec<Leaf> {
    fn walk(section: &'static Section, prefix: &str, out: &mut Vec<Leaf>) {
        for field in section.fields {
            let key = format!("{prefix}{}", field.name);
            match field.shape {
                Shape::Value(kind) => out.push(Leaf { key, field, kind }),
                Shape::Section(inner) => walk(inner, &format!("{key}."), out),
            }
        }
    }
    let mut out = Vec::new();
    walk(section, "", &mut out);
    out
}

/// Every environment variable read, with the option it sets and how its value is parsed,
/// in the order they are applied: the names by the rule, then [`ENV_ALIASES`].
pub fn env_overrides(root: &'static Section) -> Vec<(String, String, EnvKind)> {
    let leaves = leaves(root);
    let mut table: Vec<_> = leaves.iter().map(|l| (env_name(&l.key), l.key.clone(), l.kind)).collect();
    for (name, key) in ENV_ALIASES {
        let kind = leaves.iter().find(|l| l.key == *key).map_or(EnvKind::String, |l| l.kind);
        table.push(((*name).to_owned(), (*key).to_owned(), kind));
    }
    table
}

/// Reads one environment value as the option's kind.
pub fn parse_env(name: &str, raw: &str, kind: EnvKind) -> Result<toml::Value, ConfigError> {
    Ok(match kind {
        EnvKind::String => toml::Value::String(raw.to_owned()),
        EnvKind::Integer => {
            toml::Value::Integer(raw.trim().parse().map_err(|_| err(name, format!("`{raw}` is not a whole number")))?)
        }
        EnvKind::Float => {
            toml::Value::Float(raw.trim().parse().map_err(|_| err(name, format!("`{raw}` is not a number")))?)
        }
        EnvKind::List => toml::Value::Array(
            raw.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| toml::Value::String(s.to_owned()))
                .collect(),
        ),
        EnvKind::Bool => toml::Value::Boolean(match raw.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => true,
            "false" | "0" | "no" | "off" => false,
            _ => return Err(err(name, format!("`{raw}` is not true or false"))),
        }),
    })
}
