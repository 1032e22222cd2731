//! containerd's filter syntax for List: `field==value,labels."k"!=v` (comma = and), several
//! filters = or. Fields: name, parent, kind, `labels.<key>`; operators ==, !=, ~= (regexp) and a
//! bare field for "present".

use crate::snapshotter::metadata::{Kind, Snapshot};
use anyhow::{bail, Result};

#[derive(Debug)]
enum Op {
    Present,
    Eq(String),
    Ne(String),
    Matches(regex::Regex),
}

#[derive(Debug)]
struct Selector {
    field: Vec<String>,
    op: Op,
}

#[derive(Debug, Default)]
pub struct Filters {
    /// Or of ands.
    any: Vec<Vec<Selector>>,
}

impl Filters {
    pub fn parse(filters: &[String]) -> Result<Filters> {
        let mut any = Vec::new();
        for f in filters.iter().filter(|f| !f.trim().is_empty()) {
            any.push(parse_one(f)?);
        }
        Ok(Filters { any })
    }

    pub fn matches(&self, s: &Snapshot) -> bool {
        self.any.is_empty()
            || self
                .any
                .iter()
                .any(|all| all.iter().all(|sel| sel.matches(s)))
    }
}

impl Selector {
    fn matches(&self, s: &Snapshot) -> bool {
        let kind = match s.kind {
            Kind::Active => "active",
            Kind::View => "view",
            Kind::Committed => "committed",
        };
        let value: Option<&str> = match self.field.first().map(String::as_str) {
            Some("name") if self.field.len() == 1 => Some(&s.key),
            Some("parent") if self.field.len() == 1 => Some(&s.parent),
            Some("kind") if self.field.len() == 1 => Some(kind),
            Some("labels") if self.field.len() == 2 => {
                s.labels.get(&self.field[1]).map(String::as_str)
            }
            _ => None,
        };
        match (&self.op, value) {
            (Op::Present, v) => v.is_some(),
            (Op::Eq(want), Some(v)) => v == want,
            (Op::Ne(want), Some(v)) => v != want,
            (Op::Ne(_), None) => true,
            (Op::Matches(re), Some(v)) => re.is_match(v),
            _ => false,
        }
    }
}

/// Tokens: quoted strings, bare words, operators, '.', ','.
fn parse_one(f: &str) -> Result<Vec<Selector>> {
    let mut sels = Vec::new();
    let chars: Vec<char> = f.chars().collect();
    let mut i = 0;
    let word = |i: &mut usize| -> Result<String> {
        let c = chars.get(*i).copied();
        if c == Some('"') || c == Some('\'') || c == Some('/') {
            let q = c.unwrap_or('"');
            let mut out = String::new();
            *i += 1;
            while let Some(&ch) = chars.get(*i) {
                *i += 1;
                if ch == q {
                    return Ok(out);
                }
                if ch == '\\' {
                    if let Some(&n) = chars.get(*i) {
                        *i += 1;
                        out.push(n);
                        continue;
                    }
                }
                out.push(ch);
            }
            bail!("unterminated quote in filter {f:?}");
        }
        let start = *i;
        while let Some(&ch) = chars.get(*i) {
            if matches!(ch, '.' | ',' | '=' | '!' | '~') {
                break;
            }
            *i += 1;
        }
        Ok(chars[start..*i]
            .iter()
            .collect::<String>()
            .trim()
            .to_string())
    };
    loop {
        // field path
        let mut field = vec![word(&mut i)?];
        while chars.get(i) == Some(&'.') {
            i += 1;
            field.push(word(&mut i)?);
        }
        if field.iter().any(|p| p.is_empty()) {
            bail!("bad field in filter {f:?}");
        }
        let op2: String = chars.iter().skip(i).take(2).collect();
        let op = match op2.as_str() {
            "==" | "!=" | "~=" => {
                i += 2;
                // values may be bare up to the next comma
                let v = if matches!(chars.get(i), Some('"') | Some('\'') | Some('/')) {
                    word(&mut i)?
                } else {
                    let start = i;
                    while chars.get(i).is_some_and(|c| *c != ',') {
                        i += 1;
                    }
                    chars[start..i]
                        .iter()
                        .collect::<String>()
                        .trim()
                        .to_string()
                };
                match op2.as_str() {
                    "==" => Op::Eq(v),
                    "!=" => Op::Ne(v),
                    _ => Op::Matches(regex::Regex::new(&v)?),
                }
            }
            _ => Op::Present,
        };
        sels.push(Selector { field, op });
        match chars.get(i) {
            None => break,
            Some(',') => i += 1,
            Some(c) => bail!("unexpected {c:?} in filter {f:?}"),
        }
    }
    Ok(sels)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn snap(key: &str, parent: &str, kind: Kind, labels: &[(&str, &str)]) -> Snapshot {
        Snapshot {
            id: 1,
            key: key.into(),
            kind,
            parent: parent.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
            created: 0,
            updated: 0,
            storage: Default::default(),
            mode: None,
            usage: (0, 0),
            cri_pull: None,
        }
    }

    #[test]
    fn containerd_filter_forms() {
        let a = snap(
            "default/1/x",
            "p",
            Kind::Committed,
            &[("containerd.io/gc.root", "1"), ("k", "v")],
        );
        let f = |s: &[&str]| {
            Filters::parse(&s.iter().map(|x| x.to_string()).collect::<Vec<_>>()).unwrap()
        };
        assert!(f(&[]).matches(&a));
        assert!(f(&["kind==committed"]).matches(&a));
        assert!(!f(&["kind==active"]).matches(&a));
        assert!(f(&["parent==p,name==\"default/1/x\""]).matches(&a));
        assert!(f(&[r#"labels."containerd.io/gc.root""#]).matches(&a));
        assert!(f(&["labels.k==v"]).matches(&a));
        assert!(!f(&["labels.k!=v"]).matches(&a));
        assert!(f(&["labels.missing!=v"]).matches(&a));
        assert!(f(&["name~=^default/"]).matches(&a));
        assert!(f(&["kind==active", "kind==committed"]).matches(&a));
        assert!(Filters::parse(&["name==\"x".to_string()]).is_err());
    }
}
