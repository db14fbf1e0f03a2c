//! Provenance: which signed state a rendered file came from, told to the check and reload
//! commands (environment variables) and, on request, written into the file (a header line).
//!
//! Why it exists: on any box, an operator (or a check script) must be able to say which
//! signed heads a configuration file was rendered from and who wrote them.
//!
//! # Environment of check and reload commands
//!
//! | variable | document binding | template binding |
//! |---|---|---|
//! | `LICHEN_FILE` | the bound file | the bound file |
//! | `LICHEN_DOC` | the document | the documents the render read, space-separated, sorted (`_members` when it called `members()`) |
//! | `LICHEN_HEADS` | the document's heads, comma-separated (as `lichen get` prints them) | `DOC=HEADS` per document read, space-separated, in `LICHEN_DOC`'s order |
//! | `LICHEN_TEMPLATE` | — | the template file |
//!
//! A document the template read but this node does not hold (the template supplied a
//! default) appears with empty heads (`app/x=`).
//!
//! # Header line
//!
//! With `header = "# "` the file's first line is
//!
//! ```text
//! # lichen: app/nginx@HEADS by node-a,node-b; _members@HEADS by node-c
//! ```
//!
//! one `DOC@HEADS by NAMES` entry per document the render read (`LICHEN_DOC`'s order), where
//! `HEADS` are the document's heads as above and `NAMES` the membership names of the
//! authors of the values the file holds: for each leaf, the author of the change that set it
//! (as `lichen blame` names it; the winner's on a conflict) — under the binding's `path` for
//! a document binding, in the whole document for a document a template read (a template may
//! print only some of them). If a change arrived between the render and the header, the
//! names are those of the authors of the changes at the rendered heads until the render that
//! change triggers. A
//! document binding's header is a comment of its format (`#` for TOML and YAML; JSON has no
//! comments and refuses `header`), so reading the file back in `sync` mode ignores it.

use super::binding::Binding;
use super::template::Reads;

/// The documents (and their heads) one render of a binding read.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Provenance {
    /// `(document, heads)`, sorted by document; heads empty when not held.
    pub docs: Vec<(String, String)>,
}

impl Provenance {
    /// A document binding's single document.
    pub(crate) fn doc(doc: &str, heads: String) -> Provenance {
        Provenance {
            docs: vec![(doc.to_string(), heads)],
        }
    }

    /// What a template render read.
    pub(crate) fn of_reads(r: &Reads) -> Provenance {
        let mut docs: Vec<(String, String)> = r
            .docs
            .iter()
            .map(|(d, h)| (d.clone(), h.clone().unwrap_or_default()))
            .collect();
        if let Some(h) = &r.members {
            docs.push((lichen_crdt::MEMBERSHIP_DOC.to_string(), h.clone()));
        }
        docs.sort();
        Provenance { docs }
    }

    /// `LICHEN_HEADS` (see the module docs).
    pub(crate) fn heads(&self, b: &Binding) -> String {
        if b.template.is_none() {
            return self.docs.first().map(|d| d.1.clone()).unwrap_or_default();
        }
        self.docs
            .iter()
            .map(|(d, h)| format!("{d}={h}"))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// The environment of check and reload commands.
    pub(crate) fn env(&self, b: &Binding) -> Vec<(&'static str, String)> {
        let doc = if b.template.is_none() {
            b.doc.clone()
        } else {
            self.docs
                .iter()
                .map(|d| d.0.as_str())
                .collect::<Vec<_>>()
                .join(" ")
        };
        let mut env = vec![
            ("LICHEN_DOC", doc),
            ("LICHEN_FILE", b.file.to_string_lossy().into_owned()),
            ("LICHEN_HEADS", self.heads(b)),
        ];
        if let Some(t) = &b.template {
            env.push(("LICHEN_TEMPLATE", t.path.to_string_lossy().into_owned()));
        }
        env
    }

    /// The header line (with its newline) for `prefix`; `authors[i]` are the names of the
    /// authors of `docs[i]`'s head changes.
    pub(crate) fn header(&self, prefix: &str, authors: &[Vec<String>]) -> String {
        let entries: Vec<String> = self
            .docs
            .iter()
            .enumerate()
            .map(|(i, (d, h))| {
                let names = authors.get(i).map(|a| a.join(",")).unwrap_or_default();
                if names.is_empty() {
                    format!("{d}@{h}")
                } else {
                    format!("{d}@{h} by {names}")
                }
            })
            .collect();
        format!("{prefix}lichen: {}\n", entries.join("; "))
    }
}

/// Borrow an owned environment as the `(&str, &str)` pairs [`super::command::run`] takes.
pub(crate) fn borrow<'a>(env: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    env.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_heads_and_header_format() {
        let r = Reads {
            docs: [
                ("b/x".to_string(), Some("h2".to_string())),
                ("a/y".to_string(), None),
            ]
            .into_iter()
            .collect(),
            members: Some("m1,m2".to_string()),
            ..Reads::default()
        };
        let p = Provenance::of_reads(&r);
        assert_eq!(
            p.docs.iter().map(|d| d.0.as_str()).collect::<Vec<_>>(),
            ["_members", "a/y", "b/x"]
        );
        assert_eq!(
            p.header(
                "# ",
                &[vec!["n1".into()], vec![], vec!["n2".into(), "n3".into()]]
            ),
            "# lichen: _members@m1,m2 by n1; a/y@; b/x@h2 by n2,n3\n"
        );
    }
}
