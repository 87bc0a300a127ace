//! META_URL parsing: which engine, where.

use crate::{Meta, MetaError, RedisMeta, SqliteMeta};
use std::path::PathBuf;

/// A parsed META_URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MetaUrl {
    /// `sqlite3://PATH` or `sqlite://PATH`: an SQLite database file.
    Sqlite(PathBuf),
    /// `redis://[user:pass@]host:port/db`, `rediss://...` (TLS) or
    /// `unix:///path/redis.sock?db=N`: a Redis database, which several mounts may share.
    Redis(String),
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
            "redis" | "rediss" | "unix" => {
                let shown = crate::hide_password(url);
                let host = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
                if scheme != "unix" && (host.is_empty() || host.starts_with(['/', '?'])) {
                    return Err(format!(
                        "invalid META_URL {shown:?}: missing host, e.g. redis://127.0.0.1:6379/1"
                    ));
                }
                if scheme == "unix" && !rest.starts_with('/') {
                    return Err(format!(
                        "invalid META_URL {shown:?}: expected unix:///path/to/redis.sock?db=N"
                    ));
                }
                Ok(MetaUrl::Redis(url.to_string()))
            }
            other => Err(format!(
                "invalid META_URL {url:?}: unknown engine {other:?} (supported: sqlite3://, \
                 redis://, rediss://, unix://)"
            )),
        }
    }

    /// The local file holding the metadata, for engines that keep it in one.
    pub fn local_file(&self) -> Option<&std::path::Path> {
        match self {
            MetaUrl::Sqlite(p) => Some(p),
            MetaUrl::Redis(_) => None,
        }
    }
}

/// Opens the engine named by `url`. With `create`, a missing database is created (for format);
/// without it, a missing database is [`MetaError::NotFormatted`].
pub fn open(url: &MetaUrl, create: bool) -> Result<Box<dyn Meta>, MetaError> {
    match url {
        MetaUrl::Sqlite(path) => Ok(Box::new(SqliteMeta::open(path, create)?)),
        // A Redis database always exists; an empty one is simply not formatted.
        MetaUrl::Redis(url) => Ok(Box::new(RedisMeta::open(url)?)),
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
    fn parses_redis_forms() {
        for url in [
            "redis://127.0.0.1:6379/1",
            "redis://user:pw@host:6380/2",
            "rediss://host:6380/0",
            "unix:///run/redis.sock?db=3",
        ] {
            assert_eq!(MetaUrl::parse(url).unwrap(), MetaUrl::Redis(url.into()));
        }
        let e = MetaUrl::parse("redis:///1").unwrap_err();
        assert!(e.contains("missing host"), "{e}");
        let e = MetaUrl::parse("unix://run/redis.sock").unwrap_err();
        assert!(e.contains("unix:///"), "{e}");
        let e = MetaUrl::parse("redis://u:secret@").unwrap_err();
        assert!(!e.contains("secret"), "{e}");
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
