//! The S3 store and the data path on a real S3 server (s3s-fs on 127.0.0.1, started by the
//! harness and killed with the test process).

#[path = "integration/harness.rs"]
#[allow(dead_code)]
mod harness;

use bytes::Bytes;
use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tidefs::data::DataCtx;
use tidefs::layout::Layout;
use tidefs::object::{LocalStore, ObjectStore, S3Location, S3Options, S3Store, StoreError};
use tidefs::vfs::{TideVfs, VfsOptions};
use tidefs::volume::{self, StoreAccess};
use tidefs_cache::BlockCache;
use tidefs_cache::BufferPool;
use tidefs_fuse::{Ctx, Vfs};
use tidefs_meta::{Meta, SqliteMeta, ROOT_INO};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn access() -> StoreAccess {
    StoreAccess {
        credentials: Some((harness::S3_KEYS.0.into(), harness::S3_KEYS.1.into())),
        ..StoreAccess::default()
    }
}

async fn store_for(bucket_url: &str) -> S3Store {
    S3Store::new(&S3Options {
        location: S3Location::parse(bucket_url).unwrap(),
        region: None,
        credentials: access().credentials,
        max_uploads: 8,
        max_downloads: 8,
        max_deletes: 2,
        timeout: Duration::from_secs(30),
    })
    .await
}

#[test]
fn s3_store_contract() {
    let rt = runtime();
    let (url, _) = harness::s3_server().new_bucket();
    rt.block_on(async {
        let s = store_for(&format!("{url}/some/prefix")).await;
        s.put("a/1", Bytes::from_static(b"hello world"))
            .await
            .unwrap();
        assert_eq!(s.get("a/1", None).await.unwrap(), "hello world");
        assert_eq!(s.get("a/1", Some(6..11)).await.unwrap(), "world");
        assert_eq!(s.head("a/1").await.unwrap(), 11);
        assert!(matches!(
            s.get("a/missing", None).await,
            Err(StoreError::NotFound(_))
        ));
        assert!(matches!(
            s.head("a/missing").await,
            Err(StoreError::NotFound(_))
        ));
        // Listing pages past 1000 keys and honours `after`.
        let keys: Vec<String> = (0..1200).map(|i| format!("b/{i:05}")).collect();
        futures::future::try_join_all(keys.iter().map(|k| s.put(k, Bytes::from_static(b"x"))))
            .await
            .unwrap();
        let listed = s.list("b/", None, 5000).await.unwrap();
        assert_eq!(listed.len(), 1200);
        assert_eq!(listed[0].key, "b/00000");
        assert_eq!(s.list("b/", Some("b/01100"), 5000).await.unwrap().len(), 99);
        // Batch deletes of more than 1000 keys; missing keys count as deleted.
        let mut doomed = keys.clone();
        doomed.push("b/never-existed".into());
        assert!(s.delete_batch(&doomed).await.is_empty());
        assert!(s.list("b/", None, 10).await.unwrap().is_empty());
        assert_eq!(s.list("", None, 10).await.unwrap().len(), 1);
    });
}

/// Downloads of whole blocks fill buffers of the block pool, which come back once the last
/// reader drops them; other sizes and ranges use buffers of their own.
#[test]
fn block_downloads_reuse_pooled_buffers() {
    let rt = runtime();
    let (url, _) = harness::s3_server().new_bucket();
    let pool = BufferPool::new(POOLED_BLOCK, 2);
    rt.block_on(async {
        let s = store_for(&url).await.with_block_buffers(pool.clone());
        whole_blocks_reuse_pooled_buffers(&s, &pool).await;
    });
}

/// The local store reads whole blocks into the same pool.
#[test]
fn local_block_reads_reuse_pooled_buffers() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let pool = BufferPool::new(POOLED_BLOCK, 2);
    rt.block_on(async {
        let s = LocalStore::open(dir.path())
            .unwrap()
            .with_block_buffers(pool.clone());
        whole_blocks_reuse_pooled_buffers(&s, &pool).await;
    });
}

const POOLED_BLOCK: usize = 256 << 10;

/// Checks that `s`, reading blocks of `POOLED_BLOCK` bytes into `pool`, hands a whole block
/// out of a pooled buffer that returns once the last view is dropped, and gives short objects
/// and ranges buffers of their own.
async fn whole_blocks_reuse_pooled_buffers(s: &dyn ObjectStore, pool: &BufferPool) {
    const BLOCK: usize = POOLED_BLOCK;
    let block: Vec<u8> = (0..BLOCK).map(|i| (i % 251) as u8).collect();
    s.put("v/block", Bytes::from(block.clone())).await.unwrap();
    s.put("v/short", Bytes::from(vec![3u8; 1000]))
        .await
        .unwrap();
    let first = s.get("v/block", None).await.unwrap();
    assert_eq!(first, block);
    let at = first.as_ptr();
    let view = first.slice(10..20);
    drop(first);
    assert_eq!(pool.idle(), 0, "a reader still holds the block");
    drop(view);
    assert_eq!(pool.idle(), 1);
    let again = s.get("v/block", None).await.unwrap();
    assert_eq!((again.as_ptr(), &again[..]), (at, &block[..]));
    assert_eq!(pool.idle(), 0);
    let short = s.get("v/short", None).await.unwrap();
    let range = s.get("v/block", Some(0..BLOCK as u64 - 1)).await.unwrap();
    assert_eq!(
        (&short[..], &range[..]),
        (&[3u8; 1000][..], &block[..BLOCK - 1])
    );
    drop((short, range));
    assert_eq!(pool.idle(), 0, "only whole blocks come from the pool");
}

#[test]
fn bad_buckets_and_credentials_are_clear_errors() {
    let rt = runtime();
    let (url, _) = harness::s3_server().new_bucket();
    let fmt = |bucket: &str| tidefs_meta::Format {
        storage: "s3".into(),
        bucket: bucket.into(),
        ..tidefs_meta::conformance::sample_format()
    };
    rt.block_on(async {
        let (store, _) = volume::open_store(&fmt(&url), &access()).await.unwrap();
        volume::probe_store(&*store, "vol").await.unwrap();
        // Wrong keys are a refusal: reported at once, never retried.
        let wrong_keys = StoreAccess {
            credentials: Some(("nobody".into(), "wrong".into())),
            ..StoreAccess::default()
        };
        let (store, metrics) = volume::open_store(&fmt(&url), &wrong_keys).await.unwrap();
        let err = volume::probe_store(&*store, "vol")
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("not usable") && err.contains("put"), "{err}");
        assert!(err.contains("refused"), "{err}");
        assert_eq!(metrics.retries.load(Ordering::SeqCst), 0);
        assert!(!err.contains("wrong"), "the secret key leaked into: {err}");
        // Nothing listens on port 1.
        let unreachable = StoreAccess {
            retry: tidefs::object::RetryPolicy {
                attempts: 1,
                ..Default::default()
            },
            ..access()
        };
        let (store, _) = volume::open_store(&fmt("http://127.0.0.1:1/bucket"), &unreachable)
            .await
            .unwrap();
        let err = volume::probe_store(&*store, "vol")
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("127.0.0.1:1"), "{err}");
    });
}

/// Files written, overwritten, truncated and removed through the VFS on S3: the bucket ends up
/// with exactly the objects still referenced, and freed objects went out in one batch request.
#[test]
fn bucket_holds_exactly_the_referenced_objects() {
    let rt = runtime();
    let (url, _) = harness::s3_server().new_bucket();
    let dir = tempfile::tempdir().unwrap();
    let meta = SqliteMeta::open(&dir.path().join("meta.db"), true).unwrap();
    let mut format = tidefs_meta::conformance::sample_format();
    format.storage = "s3".into();
    format.bucket = url;
    format.block_size = 64 << 10;
    meta.format(&format, 0, 0).unwrap();
    let meta: Arc<dyn Meta> = Arc::new(meta);
    let (store, metrics) = rt.block_on(volume::open_store(&format, &access())).unwrap();
    let layout = Layout::of(&format);
    let sid = meta
        .new_session(&tidefs_meta::conformance::sample_session())
        .unwrap();
    let data = Arc::new(DataCtx::new(
        meta.clone(),
        store.clone(),
        BlockCache::new(0),
        layout.clone(),
        rt.handle().clone(),
    ));
    // A long interval: this test runs the deletion pass itself.
    let opts = VfsOptions {
        delete_interval: Duration::from_secs(3600),
        ..VfsOptions::default()
    };
    let vfs = TideVfs::new(data.clone(), format, sid, opts);
    let ctx = Ctx {
        uid: 0,
        gid: 0,
        pid: 0,
    };
    let mut inos = Vec::new();
    for i in 0..40u8 {
        let (a, fh) = vfs
            .create(ctx, ROOT_INO, format!("f{i}").as_bytes(), 0o644, 0)
            .unwrap();
        vfs.write(a.ino, fh, 0, &vec![i; 150_000]).unwrap();
        vfs.release(a.ino, fh).unwrap();
        inos.push(a.ino);
    }
    // Keep ten files, one of them truncated; remove the rest.
    vfs.setattr(ctx, inos[0], Default::default(), Some(1000))
        .unwrap();
    for i in 10..40u8 {
        vfs.unlink(ctx, ROOT_INO, format!("f{i}").as_bytes())
            .unwrap();
    }
    let deletes_before = metrics.delete.requests.load(Ordering::SeqCst);
    tidefs::vfs::delete_freed(&data).unwrap();
    let delete_requests = metrics.delete.requests.load(Ordering::SeqCst) - deletes_before;
    assert_eq!(
        delete_requests, 1,
        "freed objects should go out in one batch"
    );
    let mut referenced = BTreeSet::new();
    for ino in &inos[..10] {
        for s in meta.read_chunk(*ino, 0).unwrap() {
            referenced.extend(layout.slice_keys(s.id, s.size));
        }
    }
    let stored: BTreeSet<String> = rt
        .block_on(store.list(&layout.prefix(), None, 100_000))
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    assert_eq!(stored, referenced);
    assert_eq!(
        vfs.read(inos[3], vfs.open(ctx, inos[3], 0).unwrap().fh, 0, 10)
            .unwrap(),
        vec![3u8; 10]
    );
}

/// `tidefs objbench` measures a bucket, prints a table and leaves nothing behind; a bad
/// bucket is a clear error.
#[test]
fn objbench_measures_and_cleans_up() {
    let (url, dir) = harness::s3_server().new_bucket();
    let keys = harness::s3_server().credentials();
    let mut args = vec![
        "objbench",
        url.as_str(),
        "--small-objects",
        "10",
        "--big-objects",
        "2",
        "--block-size",
        "1024",
    ];
    args.extend(keys.iter().map(String::as_str));
    let out = harness::tidefs(&args);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for op in [
        "put 128 KiB",
        "get 128 KiB",
        "delete 128 KiB (batched)",
        "put 1 MiB",
        "get 1 MiB",
    ] {
        assert!(
            text.contains(&format!("| {op} |")),
            "{op} missing in:\n{text}"
        );
    }
    let left: Vec<_> = walkdir(&dir);
    assert!(left.is_empty(), "objbench left {left:?}");
    let out = harness::tidefs(&["objbench", "s3://Bad_Bucket"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid S3 bucket"));
}

fn walkdir(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        if e.path().is_dir() {
            out.extend(walkdir(&e.path()));
        } else if !e.file_name().to_string_lossy().starts_with('.') {
            out.push(e.path());
        }
    }
    out
}

/// Reads one HTTP request (head and Content-Length body) from `conn`.
fn read_request(conn: &mut std::net::TcpStream) -> (String, Vec<u8>) {
    use std::io::Read;
    let mut buf = Vec::new();
    let mut byte = [0u8; 4096];
    let head_end = loop {
        let n = conn.read(&mut byte).unwrap();
        assert!(n > 0, "connection closed mid-request");
        buf.extend_from_slice(&byte[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0);
    while buf.len() < head_end + len {
        let n = conn.read(&mut byte).unwrap();
        assert!(n > 0, "connection closed mid-body");
        buf.extend_from_slice(&byte[..n]);
    }
    (head, buf[head_end..head_end + len].to_vec())
}

/// Stores that accept only Content-MD5 on DeleteObjects (older MinIO, Ceph RGW) get it: the
/// request that goes on the wire carries the MD5 of its own body.
#[test]
fn batch_deletes_carry_content_md5() {
    use md5::Digest;
    use std::io::Write;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let (head, body) = read_request(&mut conn);
        let reply = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\
            <DeleteResult xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\"></DeleteResult>";
        write!(
            conn,
            "HTTP/1.1 200 OK\r\nContent-Type: application/xml\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{reply}",
            reply.len()
        )
        .unwrap();
        (head, body)
    });
    let rt = runtime();
    let failed = rt.block_on(async {
        let s = store_for(&format!("http://127.0.0.1:{port}/md5-check")).await;
        s.delete_batch(&["x/1".to_string(), "x/2".to_string()])
            .await
    });
    assert!(failed.is_empty(), "{failed:?}");
    let (head, body) = server.join().unwrap();
    assert!(head.starts_with("post /md5-check/?delete"), "{head}");
    assert!(String::from_utf8_lossy(&body).contains("<Key>x/2</Key>"));
    let sent = head
        .lines()
        .find_map(|l| l.strip_prefix("content-md5:"))
        .expect("no content-md5 header")
        .trim()
        .to_string();
    let expected = aws_smithy_types::base64::encode(md5::Md5::digest(&body).as_slice());
    assert_eq!(sent, expected.to_lowercase());
}

/// `format --store-secret` keeps the keys in the volume, sealed: neither the database nor
/// `format`/`status` output holds the secret in clear, and a mount given no keys uses them.
#[test]
fn stored_secret_is_sealed_hidden_and_used() {
    let server = harness::s3_server();
    let (bucket_url, bucket_dir) = server.new_bucket();
    let dir = tempfile::tempdir().unwrap();
    let meta_url = format!("sqlite3://{}", dir.path().join("meta.db").display());
    let base = [
        "format",
        &meta_url,
        "vol",
        "--storage",
        "s3",
        "--bucket",
        &bucket_url,
        "--store-secret",
    ];
    let out = harness::tidefs(&base);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--store-secret needs --access-key"), "{err}");

    let creds = server.credentials();
    let mut args: Vec<&str> = base.to_vec();
    args.extend(creds.iter().map(String::as_str));
    let secret = harness::S3_KEYS.1;
    for out in [
        harness::tidefs(&args),
        harness::tidefs(&["status", &meta_url]),
    ] {
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!text.contains(secret), "{text}");
        assert!(text.contains("sealed (not shown)"), "{text}");
        assert!(
            text.contains(harness::S3_KEYS.0),
            "the access key is shown: {text}"
        );
    }
    for file in ["meta.db", "meta.db-wal"] {
        if let Ok(bytes) = std::fs::read(dir.path().join(file)) {
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "{file} holds the secret in clear"
            );
        }
    }

    let mp = dir.path().join("mnt");
    std::fs::create_dir(&mp).unwrap();
    let mnt = harness::Mount::start(&meta_url, &mp, &[], dir.path().join("mount.log"));
    std::fs::write(mnt.p("f"), vec![5u8; 100_000]).unwrap();
    assert_eq!(std::fs::read(mnt.p("f")).unwrap(), vec![5u8; 100_000]);
    mnt.unmount();
    assert!(
        walkdir(&bucket_dir)
            .iter()
            .any(|p| p.to_string_lossy().contains("/chunks/")),
        "blocks reached the bucket with the stored keys"
    );
}

/// Uploads go out with `UNSIGNED-PAYLOAD` (no SHA-256 of every block, on either end) and a
/// CRC32 of the body in `x-amz-checksum-crc32`, as a plain header that servers which do not
/// know it ignore.
#[test]
fn uploads_carry_a_crc32_instead_of_a_payload_signature() {
    use std::io::Write;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let (head, body) = read_request(&mut conn);
        write!(
            conn,
            "HTTP/1.1 200 OK\r\nETag: \"x\"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        (head, body)
    });
    let block: Bytes = (0..1000u32).map(|i| (i % 251) as u8).collect();
    runtime().block_on(async {
        let s = store_for(&format!("http://127.0.0.1:{port}/crc-check")).await;
        s.put("blocks/1", block.clone()).await.unwrap();
    });
    let (head, body) = server.join().unwrap();
    assert!(head.starts_with("put /crc-check/blocks/1"), "{head}");
    assert_eq!(body, block);
    let header = |name: &str| {
        head.lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} header in {head}"))
            .trim()
            .to_string()
    };
    assert_eq!(header("x-amz-content-sha256:"), "unsigned-payload");
    let crc = aws_smithy_types::base64::encode(crc32fast::hash(&block).to_be_bytes());
    assert_eq!(header("x-amz-checksum-crc32:"), crc.to_lowercase());
}

/// A body refused for its checksum (damaged on the way) is a transient failure, retried like
/// a timeout; another 4xx is a refusal.
#[test]
fn checksum_mismatches_are_transient() {
    use std::io::Write;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        for code in ["BadDigest", "AccessDenied"] {
            let (mut conn, _) = listener.accept().unwrap();
            read_request(&mut conn);
            let body = format!(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code>\
                 <Message>refused</Message></Error>"
            );
            let status = if code == "BadDigest" {
                "400 Bad Request"
            } else {
                "403 Forbidden"
            };
            write!(
                conn,
                "HTTP/1.1 {status}\r\nContent-Type: application/xml\r\nContent-Length: {}\r\n\
                 Connection: close\r\n\r\n{body}",
                body.len()
            )
            .unwrap();
        }
    });
    runtime().block_on(async {
        let s = store_for(&format!("http://127.0.0.1:{port}/crc-check")).await;
        let damaged = s.put("blocks/1", Bytes::from_static(b"data")).await;
        assert!(matches!(damaged, Err(StoreError::Io { .. })), "{damaged:?}");
        let denied = s.put("blocks/1", Bytes::from_static(b"data")).await;
        assert!(
            matches!(denied, Err(StoreError::Refused { .. })),
            "{denied:?}"
        );
    });
    server.join().unwrap();
}

/// A real server accepts those uploads and returns them whole, and refuses a body that does
/// not match its CRC32 (BadDigest): the header is an integrity check, not decoration.
#[test]
fn unsigned_uploads_round_trip_and_bad_checksums_are_refused() {
    let rt = runtime();
    let (url, _) = harness::s3_server().new_bucket();
    rt.block_on(async {
        let s = store_for(&url).await;
        let block: Bytes = (0..(4u32 << 20)).map(|i| (i % 253) as u8).collect();
        s.put("blocks/1", block.clone()).await.unwrap();
        assert_eq!(s.get("blocks/1", None).await.unwrap(), block);

        let loc = S3Location::parse(&url).unwrap();
        let conf = aws_sdk_s3::Config::builder()
            .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
            .endpoint_url(loc.endpoint.clone().unwrap())
            .force_path_style(true)
            .region(aws_sdk_s3::config::Region::new("us-east-1"))
            .credentials_provider(aws_sdk_s3::config::Credentials::new(
                harness::S3_KEYS.0,
                harness::S3_KEYS.1,
                None,
                None,
                "test",
            ))
            .request_checksum_calculation(
                aws_sdk_s3::config::RequestChecksumCalculation::WhenRequired,
            )
            .build();
        let wrong = aws_smithy_types::base64::encode((crc32fast::hash(&block) ^ 1).to_be_bytes());
        let sent = aws_sdk_s3::Client::from_conf(conf)
            .put_object()
            .bucket(&loc.bucket)
            .key("blocks/2")
            .checksum_crc32(wrong)
            .body(block.clone().into())
            .customize()
            .disable_payload_signing()
            .send()
            .await;
        let refused = sent.expect_err("a body with a wrong CRC32 was accepted");
        assert_eq!(
            refused.as_service_error().and_then(|e| e.meta().code()),
            Some("BadDigest"),
            "{refused:?}"
        );
    });
}
