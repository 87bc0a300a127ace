//! The conformance suite on the Redis engine, each check on its own redis-server.

use tidefs_meta::testing::RedisServer;
use tidefs_meta::{Meta, RedisMeta};

fn redis() -> (Box<dyn Meta>, RedisServer) {
    let server = RedisServer::start();
    let meta = RedisMeta::open(&server.url(0)).expect("connect to the test redis-server");
    (Box::new(meta), server)
}

tidefs_meta::meta_conformance_tests!(redis);
