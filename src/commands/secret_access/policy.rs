//! flowledger's own secret policy (`[[secrets.rules]]`): which callers may
//! read which paths. Deny by default: a read is allowed only by a rule that
//! names the caller (its client id, or its role) and a pattern that matches
//! the path. Vault's policy on flowledger's token applies on top.
//!
//! Patterns are globs over the KV v2 path: `*` matches within one part
//! (`secret/data/ocr/*` matches `secret/data/ocr/key`, not
//! `secret/data/ocr/a/b`), `**` across parts, `?` one character, `{a,b}`
//! either.

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use serde::Deserialize;

/// One `[[secrets.rules]]` table.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyRule {
    /// The rule's name, recorded on every access it decides (unique).
    pub name: String,
    /// Client ids the rule is for.
    #[serde(default)]
    pub clients: Vec<String>,
    /// Roles the rule is for: `client`, `operator`, `handler`.
    #[serde(default)]
    pub roles: Vec<String>,
    /// Path patterns the rule allows.
    pub paths: Vec<String>,
}

/// The roles a rule may name (an auditor reads no secret: its reads would
/// write to the log).
pub const ROLES: [&str; 3] = ["client", "operator", "handler"];

/// How the policy decided a read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Allowed by the rule named.
    Allowed {
        /// The rule's name.
        rule: String,
    },
    /// No rule allows it.
    Denied {
        /// Why, for people and the record.
        reason: String,
    },
}

/// The checked policy: the rules with their patterns compiled.
#[derive(Debug, Clone, Default)]
pub struct SecretPolicy {
    rules: Vec<(PolicyRule, GlobSet)>,
}

impl SecretPolicy {
    /// Checks and compiles `rules`; the error names the rule and setting at
    /// fault (`secrets.rules[i].paths[j]`).
    pub fn new(rules: Vec<PolicyRule>) -> Result<Self, String> {
        let mut names = std::collections::BTreeSet::new();
        let mut compiled = Vec::with_capacity(rules.len());
        for (i, rule) in rules.into_iter().enumerate() {
            let at = format!("secrets.rules[{i}]");
            if rule.name.trim().is_empty() || !names.insert(rule.name.clone()) {
                return Err(format!(
                    "{at}.name must be non-empty and unique, got {:?}",
                    rule.name
                ));
            }
            if rule.clients.is_empty() && rule.roles.is_empty() {
                return Err(format!(
                    "{at} ({}) names no clients and no roles: say whom it is for",
                    rule.name
                ));
            }
            if let Some(r) = rule.roles.iter().find(|r| !ROLES.contains(&r.as_str())) {
                return Err(format!(
                    "{at}.roles: unknown role {r:?}; roles are {ROLES:?}"
                ));
            }
            if rule.paths.is_empty() {
                return Err(format!(
                    "{at}.paths is empty: list the paths the rule allows"
                ));
            }
            let mut set = GlobSetBuilder::new();
            for (j, p) in rule.paths.iter().enumerate() {
                let mount = p.split('/').next().unwrap_or_default();
                let literal_mount = !mount.is_empty()
                    && mount
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c));
                if !literal_mount || p.split('/').nth(1) != Some("data") {
                    return Err(format!(
                        "{at}.paths[{j}] = {p:?} must be a KV v2 path pattern <mount>/data/... \
                         with the mount spelled out (no wildcard), e.g. secret/data/external_apis/*"
                    ));
                }
                let glob = GlobBuilder::new(p)
                    .literal_separator(true)
                    .build()
                    .map_err(|e| format!("{at}.paths[{j}] = {p:?}: {e}"))?;
                set.add(glob);
            }
            let set = set.build().map_err(|e| format!("{at}.paths: {e}"))?;
            compiled.push((rule, set));
        }
        Ok(SecretPolicy { rules: compiled })
    }

    /// Whether any rule exists (no rules: every read is denied).
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Decides a read of `path` (checked with `check_path`) by the caller
    /// `client_id` with `role`: the first rule for the caller whose pattern
    /// matches allows it; otherwise it is denied.
    pub fn decide(&self, client_id: &str, role: &str, path: &str) -> Decision {
        let rule = self.rules.iter().find(|(rule, set)| {
            (rule.clients.iter().any(|c| c == client_id) || rule.roles.iter().any(|r| r == role))
                && set.is_match(path)
        });
        match rule {
            Some((rule, _)) => Decision::Allowed {
                rule: rule.name.clone(),
            },
            None => Decision::Denied {
                reason: format!(
                    "no rule in [[secrets.rules]] allows {role} {client_id:?} to read {path}"
                ),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(name: &str, clients: &[&str], roles: &[&str], paths: &[&str]) -> PolicyRule {
        PolicyRule {
            name: name.into(),
            clients: clients.iter().map(|s| s.to_string()).collect(),
            roles: roles.iter().map(|s| s.to_string()).collect(),
            paths: paths.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn deny_by_default_and_the_first_matching_rule_decides() {
        let p = SecretPolicy::new(vec![
            rule("ocr", &["ocr-svc"], &[], &["secret/data/external_apis/ocr"]),
            rule(
                "handler-apis",
                &[],
                &["handler"],
                &["secret/data/external_apis/*"],
            ),
            rule("ops", &[], &["operator"], &["secret/data/**"]),
        ])
        .unwrap();
        let allowed = |c, r, path| match p.decide(c, r, path) {
            Decision::Allowed { rule } => Some(rule),
            Decision::Denied { .. } => None,
        };
        assert_eq!(
            allowed("ocr-svc", "client", "secret/data/external_apis/ocr").as_deref(),
            Some("ocr")
        );
        assert_eq!(
            allowed("ocr-svc", "client", "secret/data/external_apis/other"),
            None
        );
        assert_eq!(
            allowed("billing", "client", "secret/data/external_apis/ocr"),
            None
        );
        assert_eq!(
            allowed("h", "handler", "secret/data/external_apis/x").as_deref(),
            Some("handler-apis")
        );
        // * stays within one part
        assert_eq!(
            allowed("h", "handler", "secret/data/external_apis/x/y"),
            None
        );
        assert_eq!(
            allowed("op", "operator", "secret/data/a/b/c").as_deref(),
            Some("ops")
        );
        // another mount is not matched by secret/data/**
        assert_eq!(allowed("op", "operator", "kv/data/a"), None);
        match SecretPolicy::default().decide("a", "client", "secret/data/x") {
            Decision::Denied { reason } => assert!(reason.contains("no rule"), "{reason}"),
            d => panic!("an empty policy allowed a read: {d:?}"),
        }
    }

    #[test]
    fn bad_rules_are_named() {
        let e = SecretPolicy::new(vec![rule("a", &[], &[], &["secret/data/x"])]).unwrap_err();
        assert!(
            e.contains("secrets.rules[0]") && e.contains("no clients"),
            "{e}"
        );
        let e =
            SecretPolicy::new(vec![rule("a", &["c"], &["admin"], &["secret/data/x"])]).unwrap_err();
        assert!(e.contains("unknown role"), "{e}");
        let e = SecretPolicy::new(vec![rule("a", &["c"], &[], &["secret/x"])]).unwrap_err();
        assert!(e.contains("paths[0]"), "{e}");
        let e = SecretPolicy::new(vec![rule("a", &["c"], &[], &["secret/data/{x"])]).unwrap_err();
        assert!(e.contains("paths[0]"), "{e}");
        for across_mounts in ["*/data/**", "**/data/x", "{a,b}/data/x", "/secret/data/x"] {
            let e = SecretPolicy::new(vec![rule("a", &["c"], &[], &[across_mounts])]).unwrap_err();
            assert!(e.contains("mount spelled out"), "{across_mounts}: {e}");
        }
        let e =
            SecretPolicy::new(vec![rule("a", &[], &["auditor"], &["secret/data/x"])]).unwrap_err();
        assert!(e.contains("unknown role"), "{e}");
        let e = SecretPolicy::new(vec![
            rule("a", &["c"], &[], &["secret/data/x"]),
            rule("a", &["d"], &[], &["secret/data/y"]),
        ])
        .unwrap_err();
        assert!(e.contains("rules[1].name"), "{e}");
    }
}
