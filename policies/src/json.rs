//! Walking a JSON document while remembering where we are, so that every fault names its JSON
//! path (`products[3].properties.subscriptionRequired: expected a boolean`).

use crate::error::LoadError;
use serde_json::Value;

/// A value in the snapshot together with its JSON path.
#[derive(Clone)]
pub(crate) struct Node<'a> {
    pub value: &'a Value,
    pub path: String,
}

pub(crate) type Result<T> = std::result::Result<T, LoadError>;

impl<'a> Node<'a> {
    pub fn root(value: &'a Value) -> Self {
        Node {
            value,
            path: String::new(),
        }
    }

    pub fn error(&self, message: impl Into<String>) -> LoadError {
        LoadError::Snapshot {
            path: if self.path.is_empty() {
                "(root)".to_string()
            } else {
                self.path.clone()
            },
            message: message.into(),
        }
    }

    fn child_path(&self, name: &str) -> String {
        if self.path.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.path)
        }
    }

    /// The member `name`, if present and not null.
    pub fn field(&self, name: &str) -> Option<Node<'a>> {
        match self.value.get(name) {
            None | Some(Value::Null) => None,
            Some(v) => Some(Node {
                value: v,
                path: self.child_path(name),
            }),
        }
    }

    /// The resource's properties: the `properties` member in the REST shape, or the resource
    /// itself in the flat shape that `az apim ... -o json` prints.
    pub fn properties(&self) -> Node<'a> {
        match self.field("properties") {
            Some(p) if p.value.is_object() => p,
            _ => self.clone(),
        }
    }

    pub fn expect_object(&self) -> Result<()> {
        if self.value.is_object() {
            Ok(())
        } else {
            Err(self.error("expected an object"))
        }
    }

    pub fn items(&self) -> Result<Vec<Node<'a>>> {
        let arr = self
            .value
            .as_array()
            .ok_or_else(|| self.error("expected an array"))?;
        Ok(arr
            .iter()
            .enumerate()
            .map(|(i, v)| Node {
                value: v,
                path: format!("{}[{i}]", self.path),
            })
            .collect())
    }

    /// Object members in document order, each with its path.
    pub fn members(&self) -> Result<Vec<(&'a str, Node<'a>)>> {
        let obj = self
            .value
            .as_object()
            .ok_or_else(|| self.error("expected an object"))?;
        Ok(obj
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str(),
                    Node {
                        value: v,
                        path: self.child_path(k),
                    },
                )
            })
            .collect())
    }

    pub fn as_str(&self) -> Result<&'a str> {
        self.value
            .as_str()
            .ok_or_else(|| self.error("expected a string"))
    }

    pub fn as_bool(&self) -> Result<bool> {
        self.value
            .as_bool()
            .ok_or_else(|| self.error("expected a boolean"))
    }

    pub fn opt_str(&self, name: &str) -> Result<Option<&'a str>> {
        self.field(name).map(|n| n.as_str()).transpose()
    }

    pub fn opt_bool(&self, name: &str) -> Result<Option<bool>> {
        self.field(name).map(|n| n.as_bool()).transpose()
    }

    pub fn req_str(&self, name: &str) -> Result<&'a str> {
        match self.field(name) {
            Some(n) => n.as_str(),
            None => Err(Node {
                value: self.value,
                path: self.child_path(name),
            }
            .error("required")),
        }
    }
}
