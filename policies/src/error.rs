//! Load errors: what is wrong with a snapshot or a policy document, and exactly where.

use std::fmt;

/// One fault found while loading a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoadError {
    /// The JSON document is malformed or inconsistent; `path` is a JSON path such as
    /// `products[3].properties.subscriptionRequired`.
    #[error("{path}: {message}")]
    Snapshot { path: String, message: String },
    /// A policy document is malformed, unsupported at the edge, or breaks a placement rule.
    /// `scope` names the document (`product 'starter'`), `line` and `column` are 1-based and
    /// point into the document as written.
    #[error("{scope} policy, line {line}, column {column}: {message}")]
    Policy {
        scope: String,
        line: u32,
        column: u32,
        message: String,
    },
}

/// Every fault found in one load; never empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadErrors(pub Vec<LoadError>);

impl fmt::Display for LoadErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for LoadErrors {}

impl From<LoadError> for LoadErrors {
    fn from(e: LoadError) -> Self {
        LoadErrors(vec![e])
    }
}
