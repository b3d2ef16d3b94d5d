//! How big a GraphQL document may be (`limits.graphql_max_depth`, `graphql_max_complexity`,
//! `graphql_max_aliases`), and which operations a request may run.
//!
//! [`DocumentLimits`] is a schema extension that measures the parsed document before
//! async-graphql checks, validates or runs it, over HTTP and over WebSocket subscriptions
//! alike. It walks each fragment once (a fragment's measure is remembered, so a "fragment bomb"
//! that spreads fragments into each other costs a walk of the text, not of its expansion) and
//! counts as async-graphql does: depth is the deepest field nesting, complexity one per field
//! selected (fragments expanded), aliases one per aliased field (fragments expanded). A document
//! over a limit gets one error whose `extensions` name it: `code` (`query_too_deep`,
//! `query_too_complex`, `too_many_aliases`), `field` (the setting), `limit` and `found`; the HTTP
//! face answers it with 400 ([`is_limit_error`]).

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use async_graphql::{
    ErrorExtensionValues, Name, ServerError, ServerResult,
    extensions::{Extension, ExtensionContext, ExtensionFactory, NextPrepareRequest},
    parser::types::{ExecutableDocument, FragmentDefinition, OperationType, Selection, SelectionSet},
};
use koubou_task::Limits;

/// The limits on one document.
#[derive(Clone, Copy, Debug)]
pub struct DocumentLimits {
    pub max_depth: usize,
    pub max_complexity: usize,
    pub max_aliases: usize,
}

/// What a document measures.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Measure {
    pub depth: usize,
    pub complexity: usize,
    pub aliases: usize,
}

const CODES: [&str; 3] = ["query_too_deep", "query_too_complex", "too_many_aliases"];

impl DocumentLimits {
    pub fn from_limits(l: &Limits) -> DocumentLimits {
        DocumentLimits {
            max_depth: l.graphql_max_depth,
            max_complexity: l.graphql_max_complexity,
            max_aliases: l.graphql_max_aliases,
        }
    }

    /// The first limit `doc` exceeds, as the error to answer with.
    pub fn check(&self, doc: &ExecutableDocument) -> Result<Measure, ServerError> {
        let m = measure(doc);
        let checks = [
            (m.depth, self.max_depth, "limits.graphql_max_depth", "levels of nested fields"),
            (m.complexity, self.max_complexity, "limits.graphql_max_complexity", "fields (fragments expanded)"),
            (m.aliases, self.max_aliases, "limits.graphql_max_aliases", "aliases (fragments expanded)"),
        ];
        for ((found, limit, key, what), code) in checks.into_iter().zip(CODES) {
            if found > limit {
                let mut e =
                    ServerError::new(format!("the query has {found} {what}; the limit is {limit} ({key})"), None);
                let mut ext = ErrorExtensionValues::default();
                ext.set("code", code);
                ext.set("field", key);
                ext.set("limit", limit as u64);
                ext.set("found", found as u64);
                e.extensions = Some(ext);
                return Err(e);
            }
        }
        Ok(m)
    }
}

/// True for an error [`DocumentLimits`] made.
pub fn is_limit_error(e: &ServerError) -> bool {
    let code = e.extensions.as_ref().and_then(|x| x.get("code")).and_then(|v| match v {
        async_graphql::Value::String(s) => Some(s.as_str()),
        _ => None,
    });
    code.is_some_and(|c| CODES.contains(&c))
}

impl ExtensionFactory for DocumentLimits {
    fn create(&self) -> Arc<dyn Extension> {
        Arc::new(*self)
    }
}

#[async_graphql::async_trait::async_trait]
impl Extension for DocumentLimits {
    /// Parses the document here (async-graphql keeps it and does not parse again) and checks it
    /// before anything else walks it: async-graphql's own recursion-depth check, which runs
    /// right after parsing, expands every fragment spread anew and takes exponential time on a
    /// fragment bomb that this check refuses in a single walk.
    async fn prepare_request(
        &self,
        ctx: &ExtensionContext<'_>,
        mut request: async_graphql::Request,
        next: NextPrepareRequest<'_>,
    ) -> ServerResult<async_graphql::Request> {
        // A document that does not parse is left to async-graphql, which says why.
        if let Ok(doc) = request.parsed_query() {
            self.check(doc)?;
        }
        next.run(ctx, request).await
    }
}

/// Measures every operation of `doc` (async-graphql validates them all, whichever one runs).
pub fn measure(doc: &ExecutableDocument) -> Measure {
    let mut w = Walker { fragments: &doc.fragments, memo: HashMap::new(), visiting: HashSet::new() };
    let mut total = Measure::default();
    for (_, op) in doc.operations.iter() {
        let m = w.set(&op.node.selection_set.node);
        total = add(total, m);
    }
    total
}

/// What operation `doc` runs for `operation_name` (None when there is no such operation).
pub fn operation_type(doc: &ExecutableDocument, operation_name: Option<&str>) -> Option<OperationType> {
    let mut ops = doc.operations.iter();
    let op = match operation_name {
        Some(name) => ops.find(|(n, _)| n.is_some_and(|n| n.as_str() == name)),
        None => {
            let first = ops.next();
            if ops.next().is_some() {
                return None;
            }
            first
        }
    };
    op.map(|(_, op)| op.node.ty)
}

fn add(a: Measure, b: Measure) -> Measure {
    Measure {
        depth: a.depth.max(b.depth),
        complexity: a.complexity.saturating_add(b.complexity),
        aliases: a.aliases.saturating_add(b.aliases),
    }
}

struct Walker<'a> {
    fragments: &'a HashMap<Name, async_graphql::Positioned<FragmentDefinition>>,
    memo: HashMap<&'a str, Measure>,
    visiting: HashSet<&'a str>,
}

impl<'a> Walker<'a> {
    fn set(&mut self, s: &'a SelectionSet) -> Measure {
        let mut m = Measure::default();
        for sel in &s.items {
            let one = match &sel.node {
                Selection::Field(f) => {
                    let inner = self.set(&f.node.selection_set.node);
                    Measure {
                        depth: inner.depth + 1,
                        complexity: inner.complexity.saturating_add(1),
                        aliases: inner.aliases.saturating_add(usize::from(f.node.alias.is_some())),
                    }
                }
                Selection::FragmentSpread(sp) => self.fragment(sp.node.fragment_name.node.as_str()),
                Selection::InlineFragment(i) => self.set(&i.node.selection_set.node),
            };
            m = add(m, one);
        }
        m
    }

    /// A named fragment's measure, walked once. Unknown and cyclic fragments measure nothing
    /// here; validation refuses them.
    fn fragment(&mut self, name: &'a str) -> Measure {
        if let Some(m) = self.memo.get(name) {
            return *m;
        }
        let Some((key, def)) = self.fragments.get_key_value(name) else { return Measure::default() };
        if !self.visiting.insert(key.as_str()) {
            return Measure::default();
        }
        let m = self.set(&def.node.selection_set.node);
        self.visiting.remove(key.as_str());
        self.memo.insert(key.as_str(), m);
        m
    }
}

#[cfg(test)]
mod tests {
    use async_graphql::parser::parse_query;

    use super::*;

    fn m(q: &str) -> Measure {
        measure(&parse_query(q).unwrap())
    }

    #[test]
    fn measures_like_async_graphql() {
        assert_eq!(m("{ a }"), Measure { depth: 1, complexity: 1, aliases: 0 });
        assert_eq!(m("{ a { b { c } } d }"), Measure { depth: 3, complexity: 4, aliases: 0 });
        assert_eq!(m("{ x: a y: a { z: b } }"), Measure { depth: 2, complexity: 3, aliases: 3 });
        assert_eq!(m("{ a { ...F } } fragment F on T { b { c } d }"), Measure { depth: 3, complexity: 4, aliases: 0 });
        assert_eq!(m("{ ... on T { a { b } } }"), Measure { depth: 2, complexity: 2, aliases: 0 });
    }

    #[test]
    fn fragment_bombs_are_measured_without_expanding_them() {
        // Each fragment spreads the next twice: 2^40 fields once expanded.
        let mut q = String::from("{ ...F0 }\n");
        for i in 0..40 {
            q.push_str(&format!("fragment F{i} on Query {{ a: f ...F{n} ...F{n} }}\n", n = i + 1));
        }
        q.push_str("fragment F40 on Query { f }\n");
        let got = m(&q);
        assert_eq!(got.depth, 1);
        assert!(got.complexity > 1 << 40 && got.aliases > 1 << 39, "{got:?}");
        // A cycle ends (validation reports it).
        assert_eq!(m("{ ...A } fragment A on Q { a ...B } fragment B on Q { b ...A }").complexity, 2);
    }

    #[test]
    fn limit_errors_name_the_setting() {
        let l = DocumentLimits { max_depth: 2, max_complexity: 3, max_aliases: 1 };
        let doc = parse_query("{ a { b { c } } }").unwrap();
        let e = l.check(&doc).unwrap_err();
        assert!(is_limit_error(&e));
        assert!(e.message.contains("limits.graphql_max_depth"), "{}", e.message);
        let ext = serde_json::to_value(e.extensions).unwrap();
        assert_eq!(
            ext,
            serde_json::json!({"code": "query_too_deep", "field": "limits.graphql_max_depth", "limit": 2, "found": 3})
        );
        let e = l.check(&parse_query("{ a b c d }").unwrap()).unwrap_err();
        assert!(e.message.contains("limits.graphql_max_complexity"));
        let e = l.check(&parse_query("{ x: a y: b }").unwrap()).unwrap_err();
        assert!(e.message.contains("limits.graphql_max_aliases"));
        assert!(l.check(&parse_query("{ x: a b }").unwrap()).is_ok());
        assert!(!is_limit_error(&ServerError::new("other", None)));
    }

    #[test]
    fn operation_types() {
        let doc = parse_query("query Q { a } mutation M { b }").unwrap();
        assert_eq!(operation_type(&doc, Some("M")), Some(OperationType::Mutation));
        assert_eq!(operation_type(&doc, Some("Q")), Some(OperationType::Query));
        assert_eq!(operation_type(&doc, None), None);
        assert_eq!(operation_type(&parse_query("mutation { b }").unwrap(), None), Some(OperationType::Mutation));
    }
}
