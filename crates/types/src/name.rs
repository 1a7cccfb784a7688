//! Names of volumes and nodes, as operators type them.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Longest accepted name, in bytes (SPEC §4: `[a-z0-9][a-z0-9._-]{0,62}`).
pub const MAX_NAME_LEN: usize = 63;

/// A validated volume or node name.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Name(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("name is empty")]
    Empty,
    #[error("name is {0} bytes long; the limit is {MAX_NAME_LEN}")]
    TooLong(usize),
    #[error("name must start with a lower-case letter or digit, not {0:?}")]
    BadFirst(char),
    #[error("name may contain only a-z, 0-9, '.', '_' and '-', not {0:?}")]
    BadChar(char),
}

impl Name {
    pub fn new(s: &str) -> Result<Name, NameError> {
        let mut chars = s.chars();
        let first = chars.next().ok_or(NameError::Empty)?;
        if s.len() > MAX_NAME_LEN {
            return Err(NameError::TooLong(s.len()));
        }
        if !(first.is_ascii_lowercase() || first.is_ascii_digit()) {
            return Err(NameError::BadFirst(first));
        }
        for c in chars {
            if !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-')) {
                return Err(NameError::BadChar(c));
            }
        }
        Ok(Name(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Name {
    type Error = NameError;
    fn try_from(s: String) -> Result<Name, NameError> {
        Name::new(&s)
    }
}

impl From<Name> for String {
    fn from(n: Name) -> String {
        n.0
    }
}

impl std::str::FromStr for Name {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Name, NameError> {
        Name::new(s)
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: the grammar of SPEC §4, at its edges.
    #[test]
    fn accepts_and_refuses_per_grammar() {
        for ok in ["a", "0", "vm-1.disk_0", &"a".repeat(63)] {
            assert!(Name::new(ok).is_ok(), "{ok}");
        }
        assert_eq!(Name::new(""), Err(NameError::Empty));
        assert_eq!(Name::new(&"a".repeat(64)), Err(NameError::TooLong(64)));
        assert_eq!(Name::new("-a"), Err(NameError::BadFirst('-')));
        assert_eq!(Name::new(".a"), Err(NameError::BadFirst('.')));
        assert_eq!(Name::new("Abc"), Err(NameError::BadFirst('A')));
        assert_eq!(Name::new("a/b"), Err(NameError::BadChar('/')));
        assert_eq!(Name::new("a b"), Err(NameError::BadChar(' ')));
        assert_eq!(Name::new("aé"), Err(NameError::BadChar('é')));
    }
}
