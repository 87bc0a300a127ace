//! The conformance suite on the Redis engine, each check on its own redis-server.

use tidefs_meta::testing::RedisServer;
use tidefs_meta::{Meta, RedisMeta};

fn redis() -> (Box<dyn Meta>, RedisServer) {
    let server = RedisServer::start();
    let meta = RedisMeta::open(&server.url(0)).expect("connect to the test redis-server");
    (Box::new(meta), server)
}

tidefs_meta::meta_conformance_tests!(redis);

#[test]
fn unix_socket_urls_reach_their_database() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("redis.sock");
    let server = RedisServer::start_with(&["--unixsocket", sock.to_str().unwrap()]);
    let url = format!("unix://{}?db=4", sock.display());
    let meta = tidefs_meta::open(&tidefs_meta::MetaUrl::parse(&url).unwrap(), true).unwrap();
    meta.format(&tidefs_meta::conformance::sample_format(), 0, 0)
        .unwrap();
    let over_tcp = |db| RedisMeta::open(&server.url(db)).unwrap().load_format();
    assert_eq!(over_tcp(4).unwrap().name, "conf");
    assert!(matches!(
        over_tcp(0),
        Err(tidefs_meta::MetaError::NotFormatted)
    ));
}

#[test]
fn unreachable_servers_are_clear_errors_without_passwords() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    for url in [
        format!("redis://127.0.0.1:{port}/1"),
        format!("redis://user:secret@127.0.0.1:{port}/1"),
        format!("rediss://127.0.0.1:{port}/1"),
    ] {
        let e = RedisMeta::open(&url).unwrap_err().to_string();
        assert!(e.contains("cannot connect to"), "{e}");
        assert!(!e.contains("secret"), "{e}");
    }
}

#[test]
fn a_server_that_forgot_the_functions_gets_them_again() {
    let server = RedisServer::start();
    let meta = RedisMeta::open(&server.url(0)).unwrap();
    meta.format(&tidefs_meta::conformance::sample_format(), 0, 0)
        .unwrap();
    let cli = |args: &[&str]| {
        let out = std::process::Command::new("redis-cli")
            .arg("-p")
            .arg(server.port().to_string())
            .args(args)
            .output()
            .expect("run redis-cli");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // The engine runs as a function library on this server (Redis 7+), not as scripts.
    assert!(cli(&["FUNCTION", "LIST"]).contains("tidefs_"));
    // As after a restart without persistence (the data would be gone too; here it stays).
    assert_eq!(cli(&["FUNCTION", "FLUSH"]).trim(), "OK");
    assert!(!cli(&["FUNCTION", "LIST"]).contains("tidefs_"));
    let a = tidefs_meta::conformance::sample_file(&meta, tidefs_meta::ROOT_INO, "f");
    assert_eq!(meta.lookup(tidefs_meta::ROOT_INO, b"f").unwrap(), a);
}
