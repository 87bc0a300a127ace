//! META_URL parsing: which engine, where.

use crate::{Meta, MetaError, SqliteMeta};
use std::path::PathBuf;

/// A parsed META_URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MetaUrl {
    /// `sqlite3://PATH` or `sqlite://PATH`: an SQLite database file.
    Sqlite(PathBuf),
}

impl MetaUrl {
    /// Parses a META_URL, explaining what is wrong with a malformed or unknown one.
    pub fn parse(url: &str) -> Result<Self, String> {
        let Some((scheme, rest)) = url.split_once("://") else {
            return Err(format!(
                "invalid META_URL {url:?}: expected SCHEME://..., e.g. sqlite3:///var/lib/tidefs/vol.db"
            ));
        };
        match scheme {
            "sqlite3" | "sqlite" => {
                let path = rest.split('?').next().unwrap_or_default();
                if path.is_empty() {
                    return Err(format!("invalid META_URL {url:?}: missing database path"));
                }
                Ok(MetaUrl::Sqlite(PathBuf::from(path)))
            }
            "redis" | "rediss" | "unix" => Err(format!(
                "META_URL {url:?}: the redis engine is not available in this build yet"
            )),
            other => Err(format!(
                "invalid META_URL {url:?}: unknown engine {other:?} (supported: sqlite3://)"
            )),
        }
    }

    /// The local file holding the metadata, for engines that keep it in one.
    pub fn local_file(&self) -> Option<&std::path::Path> {
        match self {
            MetaUrl::Sqlite(p) => Some(p),
        }
    }
}

/// Opens the engine named by `url`. With `create`, a missing database is created (for format);
/// without it, a missing database is [`MetaError::NotFormatted`].
pub fn open(url: &MetaUrl, create: bool) -> Result<Box<dyn Meta>, MetaError> {
    match url {
        MetaUrl::Sqlite(path) => Ok(Box::new(SqliteMeta::open(path, create)?)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sqlite_forms() {
        assert_eq!(
            MetaUrl::parse("sqlite3:///tmp/a.db").unwrap(),
            MetaUrl::Sqlite("/tmp/a.db".into())
        );
        assert_eq!(
            MetaUrl::parse("sqlite://rel/a.db?_journal=WAL").unwrap(),
            MetaUrl::Sqlite("rel/a.db".into())
        );
    }

    #[test]
    fn rejects_bad_urls() {
        assert!(MetaUrl::parse("/tmp/a.db")
            .unwrap_err()
            .contains("SCHEME://"));
        assert!(MetaUrl::parse("mysql://x")
            .unwrap_err()
            .contains("unknown engine"));
        assert!(MetaUrl::parse("sqlite3://")
            .unwrap_err()
            .contains("missing"));
    }
}
