//! Grants: an operation class on a name pattern, the unit of permission.
//!
//! Written `class:pattern`, or `consume:pattern@group-pattern` for consumer
//! groups (Kafka's group ACLs). A pattern is an exact name, a prefix ending
//! in `*` (`orders.*` matches `orders.eu`, not `orders`), or `*` alone.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// What a grant allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Class {
    /// Publish to topics matching the pattern.
    Publish,
    /// Read topics matching the pattern: streams, queues, feeds, in groups
    /// matching the group pattern.
    Consume,
    /// Create, delete and configure topics.
    TopicAdmin,
    /// Deploy, roll back, remove, test and inspect plugins bound to topics
    /// matching the pattern.
    PluginAdmin,
    /// List, redrive and purge the dead letters of topics matching the pattern.
    DlqAdmin,
    /// Everything, including principals and tokens.
    ClusterAdmin,
}

impl Class {
    /// Every class, in documentation order.
    pub const ALL: [Class; 6] = [
        Class::Publish,
        Class::Consume,
        Class::TopicAdmin,
        Class::PluginAdmin,
        Class::DlqAdmin,
        Class::ClusterAdmin,
    ];

    /// The name used in grants and messages.
    pub fn name(self) -> &'static str {
        match self {
            Class::Publish => "publish",
            Class::Consume => "consume",
            Class::TopicAdmin => "topic-admin",
            Class::PluginAdmin => "plugin-admin",
            Class::DlqAdmin => "dlq-admin",
            Class::ClusterAdmin => "cluster-admin",
        }
    }

    /// Parses a class name.
    pub fn parse(s: &str) -> Option<Class> {
        Class::ALL.into_iter().find(|c| c.name() == s)
    }
}

/// An exact name, a prefix (`orders.*`), or everything (`*`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Pattern(String);

impl Pattern {
    /// Matches every name.
    pub fn any() -> Pattern {
        Pattern("*".into())
    }

    /// Parses a pattern: at most one `*`, and only at the end.
    pub fn parse(s: &str) -> Result<Pattern, String> {
        if s.is_empty() {
            return Err("empty name pattern".into());
        }
        if s.find('*').is_some_and(|i| i + 1 != s.len()) {
            return Err(format!(
                "name pattern '{s}': '*' may only end a pattern (orders.*, or * alone)"
            ));
        }
        Ok(Pattern(s.to_string()))
    }

    /// True if `name` matches.
    pub fn matches(&self, name: &str) -> bool {
        match self.0.strip_suffix('*') {
            Some(prefix) => name.starts_with(prefix),
            None => self.0 == name,
        }
    }

    /// True if every name this matches, `other` matches too.
    fn within(&self, other: &Pattern) -> bool {
        match (self.0.strip_suffix('*'), other.0.strip_suffix('*')) {
            (_, Some(p)) => self.0.starts_with(p),
            (Some(_), None) => false,
            (None, None) => self.0 == other.0,
        }
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// One permission: a class on a name pattern (and, for `consume`, a group
/// pattern).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Grant {
    /// What it allows.
    pub class: Class,
    /// Which topics (for `cluster-admin`, anything: it is always `*`).
    pub pattern: Pattern,
    /// For `consume`: which consumer groups (default `*`).
    pub group: Option<Pattern>,
}

impl Grant {
    /// Parses `class:pattern` or `consume:pattern@group`.
    pub fn parse(s: &str) -> Result<Grant, String> {
        let (class, rest) = s.split_once(':').ok_or_else(|| {
            format!("grant '{s}': write CLASS:PATTERN, e.g. publish:orders.* or consume:orders.*@billing")
        })?;
        let class = Class::parse(class).ok_or_else(|| {
            format!(
                "grant '{s}': unknown class '{class}' (classes: {})",
                Class::ALL.map(Class::name).join(", ")
            )
        })?;
        let (pattern, group) = match rest.split_once('@') {
            Some((p, g)) if class == Class::Consume => (p, Some(Pattern::parse(g)?)),
            Some(_) => {
                return Err(format!(
                    "grant '{s}': only consume grants name a group (@GROUP)"
                ));
            }
            None => (rest, None),
        };
        Ok(Grant {
            class,
            pattern: Pattern::parse(pattern)?,
            group,
        })
    }

    /// True if this grant allows `class` on `name` (and `group`, for consume;
    /// an empty group is an anonymous subscription and needs no group grant).
    pub fn allows(&self, class: Class, name: &str, group: &str) -> bool {
        if self.class == Class::ClusterAdmin {
            return true;
        }
        self.class == class
            && self.pattern.matches(name)
            && (class != Class::Consume
                || group.is_empty()
                || self.group.as_ref().is_none_or(|g| g.matches(group)))
    }

    /// True if this grant allows anything at all on `name`.
    pub fn touches(&self, name: &str) -> bool {
        self.class == Class::ClusterAdmin || self.pattern.matches(name)
    }

    /// True if everything this grant allows, `other` allows too.
    pub fn within(&self, other: &Grant) -> bool {
        if other.class == Class::ClusterAdmin {
            return true;
        }
        let any = Pattern::any();
        self.class == other.class
            && self.pattern.within(&other.pattern)
            && self
                .group
                .as_ref()
                .unwrap_or(&any)
                .within(other.group.as_ref().unwrap_or(&any))
    }
}

impl fmt::Display for Grant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.class.name(), self.pattern.as_str())?;
        if let Some(g) = &self.group {
            write!(f, "@{}", g.as_str())?;
        }
        Ok(())
    }
}

impl Serialize for Grant {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Grant {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Grant::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// True if `grants` allow `class` on `name` in `group`.
pub fn allowed(grants: &[Grant], class: Class, name: &str, group: &str) -> bool {
    grants.iter().any(|g| g.allows(class, name, group))
}

/// True if `new` allows everything `old` did: a change of grants that
/// fails this narrowed them, and open connections must be re-checked.
pub fn covers(new: &[Grant], old: &[Grant]) -> bool {
    old.iter().all(|o| new.iter().any(|n| o.within(n)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(s: &str) -> Grant {
        Grant::parse(s).unwrap()
    }

    #[test]
    fn patterns_match_exact_prefix_and_everything() {
        let p = Pattern::parse("orders.*").unwrap();
        assert!(p.matches("orders.eu"));
        assert!(!p.matches("orders"));
        assert!(!p.matches("ordersX"));
        assert!(Pattern::parse("orders").unwrap().matches("orders"));
        assert!(!Pattern::parse("orders").unwrap().matches("orders.eu"));
        assert!(Pattern::any().matches("anything"));
        assert!(Pattern::parse("a*b").is_err());
        assert!(Pattern::parse("").is_err());
    }

    #[test]
    fn grants_parse_and_print_back() {
        for s in [
            "publish:orders.*",
            "consume:orders.*@billing",
            "consume:*@team-a.*",
            "topic-admin:orders",
            "cluster-admin:*",
        ] {
            assert_eq!(g(s).to_string(), s);
        }
        assert!(Grant::parse("publish").is_err());
        assert!(Grant::parse("read:orders").is_err());
        assert!(Grant::parse("publish:orders@g").is_err());
    }

    #[test]
    fn consume_grants_check_the_group() {
        let c = g("consume:orders.*@billing");
        assert!(c.allows(Class::Consume, "orders.eu", "billing"));
        assert!(!c.allows(Class::Consume, "orders.eu", "shipping"));
        assert!(c.allows(Class::Consume, "orders.eu", ""), "anonymous reads");
        assert!(!c.allows(Class::Publish, "orders.eu", ""));
        assert!(g("consume:orders").allows(Class::Consume, "orders", "any"));
        assert!(g("cluster-admin:*").allows(Class::DlqAdmin, "x", ""));
    }

    #[test]
    fn narrowing_is_detected() {
        let old = [g("publish:orders.*"), g("consume:orders.*@billing")];
        assert!(covers(&old, &old));
        assert!(covers(&[g("cluster-admin:*")], &old));
        assert!(covers(&[g("publish:*"), g("consume:*")], &old));
        assert!(!covers(&[g("publish:orders.*")], &old));
        assert!(!covers(
            &[g("publish:orders.eu"), g("consume:orders.*@billing")],
            &old
        ));
        assert!(covers(&old, &[g("consume:orders.eu@billing")]));
    }
}
