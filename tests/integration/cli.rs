//! The command line: clear errors, no panics and nothing half-made on bad input; the default
//! volume; background mounts; status.

use crate::harness::*;
use std::path::Path;
use std::process::{Command, Output};

fn fails_with(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "should fail: {err}");
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(needle), "expected {needle:?} in: {err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn bad_urls_and_unformatted_volumes() {
    let dir = tempfile::tempdir().unwrap();
    let mp = dir.path().join("mnt");
    std::fs::create_dir(&mp).unwrap();
    let mps = mp.to_str().unwrap();
    fails_with(&tidefs(&["mount", "/not/a/url", mps]), "invalid META_URL");
    fails_with(
        &tidefs(&["mount", "mysql://host/db", mps]),
        "unknown engine",
    );
    fails_with(
        &tidefs(&["format", "sqlite3://", "vol"]),
        "missing database path",
    );
    let db = dir.path().join("none.db");
    let url = format!("sqlite3://{}", db.display());
    fails_with(&tidefs(&["mount", &url, mps]), "not formatted");
    assert!(
        !db.exists(),
        "mount of an unformatted volume created {}",
        db.display()
    );
    fails_with(&tidefs(&["status", &url]), "not formatted");
    fails_with(
        &tidefs(&["format", &url, "Bad_Name"]),
        "invalid volume name",
    );
    fails_with(
        &tidefs(&["format", &url, "vol", "--block-size", "3"]),
        "power of two",
    );
    assert!(!db.exists(), "a rejected format left {}", db.display());
}

#[test]
fn format_over_another_layout_is_refused_and_harmless() {
    let vol = Volume::local(64);
    fails_with(
        &tidefs(&[
            "format",
            &vol.url,
            "itest",
            "--block-size",
            "128",
            "--bucket",
            vol.bucket.to_str().unwrap(),
        ]),
        "other settings",
    );
    fails_with(
        &tidefs(&["format", &vol.url, "other-name"]),
        "other settings",
    );
    // Same layout again is fine.
    let again = tidefs(&[
        "format",
        &vol.url,
        "itest",
        "--block-size",
        "64",
        "--bucket",
        vol.bucket.to_str().unwrap(),
    ]);
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    let status = tidefs(&["status", &vol.url]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(text.contains("\"block_size\": 65536"), "{text}");
}

#[test]
fn bad_mountpoints() {
    let vol = Volume::new(64);
    let file = vol.dir.path().join("plainfile");
    std::fs::write(&file, b"x").unwrap();
    fails_with(
        &tidefs(&["mount", &vol.url, "/nonexistent/tidefs-mp"]),
        "does not exist",
    );
    fails_with(
        &tidefs(&["mount", &vol.url, file.to_str().unwrap()]),
        "not a directory",
    );
    let mnt = vol.mount();
    fails_with(
        &tidefs(&["mount", &vol.url, mnt.path.to_str().unwrap()]),
        "already mounted",
    );
    fails_with(&tidefs(&["umount", "/proc"]), "not tidefs");
    fails_with(
        &tidefs(&["umount", vol.dir.path().to_str().unwrap()]),
        "not mounted",
    );
    mnt.unmount();
}

fn with_data_dir(dir: &Path, args: &[&str]) -> Output {
    Command::new(TIDEFS)
        .args(args)
        .env("TIDEFS_DATA_DIR", dir)
        .output()
        .unwrap()
}

#[test]
fn default_volume_background_mount_and_status() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mp = tmp.path().join("mnt");
    std::fs::create_dir(&mp).unwrap();
    let mps = mp.to_str().unwrap();
    let out = with_data_dir(&data, &["mount", "--background", mps]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(is_mounted(&mp));
    std::fs::write(mp.join("hello"), b"world").unwrap();
    let status = with_data_dir(&data, &["status"]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        text.contains("\"name\": \"tidefs\"") && text.contains("\"sessions\""),
        "{text}"
    );
    assert!(text.contains(mps), "session lists the mountpoint: {text}");
    let out = tidefs(&["umount", mps]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The background process ends and removes its session.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let text = String::from_utf8_lossy(&with_data_dir(&data, &["status"]).stdout).into_owned();
        if !text.contains(mps) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "session not closed: {text}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // Mount again in the foreground: the file is there.
    let url = format!("sqlite3://{}", data.join("tidefs.db").display());
    let mnt = Mount::start(&url, &mp, &[], tmp.path().join("fg.log"));
    assert_eq!(std::fs::read(mnt.p("hello")).unwrap(), b"world");
    mnt.unmount();
}

#[test]
fn unwritable_data_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let mp = tmp.path().join("mnt");
    std::fs::create_dir(&mp).unwrap();
    let out = with_data_dir(
        Path::new("/proc/tidefs-data"),
        &["mount", mp.to_str().unwrap()],
    );
    fails_with(&out, "data directory");
}

/// An unprivileged user mounts through fusermount3 (no allow_other), uses and unmounts it.
#[test]
fn unprivileged_mount_through_fusermount3() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let mode = std::fs::metadata("/dev/fuse").unwrap().permissions().mode();
    assert_eq!(
        mode & 0o006,
        0o006,
        "/dev/fuse must be usable by users: run scripts/install-deps.sh"
    );
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let (data, mp) = (tmp.path().join("data"), tmp.path().join("mnt"));
    let script = format!(
        "set -e; mkdir {mp}; {bin} mount --background {mp}; echo user-data > {mp}/f; \
         test \"$(cat {mp}/f)\" = user-data; test \"$(stat -c %u {mp}/f)\" = 65534; \
         grep -q ' {mp} fuse.tidefs ' /proc/mounts; {bin} umount {mp}",
        mp = mp.display(),
        bin = TIDEFS
    );
    let out = Command::new("sh")
        .args(["-c", &script])
        .env("TIDEFS_DATA_DIR", &data)
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let log = std::fs::read_to_string(data.join("tidefs.log")).unwrap_or_default();
    assert!(
        out.status.success(),
        "{}\n{log}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The background mount process ends after the unmount.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !log_says_unmounted(&data) {
        assert!(
            std::time::Instant::now() < deadline,
            "background mount did not finish"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(!is_mounted(&mp));
}

fn log_says_unmounted(data: &Path) -> bool {
    std::fs::read_to_string(data.join("tidefs.log"))
        .unwrap_or_default()
        .contains("unmounted")
}

/// A mount serves its numbers, `tidefs status` shows them per session, and a taken port moves
/// the endpoint to a free one instead of failing the mount.
#[test]
fn status_shows_live_store_metrics() {
    let vol = Volume::new(1024);
    let dir = tempfile::tempdir().unwrap();
    let mut args = vec!["mount", &vol.url, dir.path().to_str().unwrap()];
    args.extend(vol.store_args.iter().map(String::as_str));
    args.extend(["--metrics", "localhost"]);
    fails_with(&tidefs(&args), "invalid metrics address");
    assert!(!is_mounted(dir.path()));
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_addr = taken.local_addr().unwrap().to_string();
    let mnt = vol.mount_with(&["--metrics", &taken_addr]);
    let data = vec![7u8; 3 << 20];
    std::fs::write(mnt.p("f"), &data).unwrap();
    assert_eq!(std::fs::read(mnt.p("f")).unwrap(), data);

    let status = status(&vol.url);
    let session = &status["sessions"][0];
    let addr = session["metrics"].as_str().unwrap().to_string();
    assert!(
        addr.starts_with("127.0.0.1:") && addr != taken_addr,
        "{addr}"
    );
    let put = &session["stats"]["object_store"]["put"];
    assert!(put["requests"].as_u64().unwrap() >= 3, "{session}");
    assert!(put["bytes"].as_u64().unwrap() >= 3 << 20, "{session}");
    assert_eq!(put["errors"].as_u64(), Some(0), "{session}");
    assert!(put["p99_ms_at_most"].as_f64().unwrap() > 0.0, "{session}");
    assert!(
        session["stats"]["cache"]["capacity_bytes"]
            .as_u64()
            .unwrap()
            > 0
    );

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let timeout = std::time::Duration::from_secs(5);
    let text = rt
        .block_on(tidefs::exporter::fetch(&addr, "/metrics", timeout))
        .unwrap();
    let puts: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("tidefs_object_requests_total{method=\"put\"} "))
        .expect("put counter")
        .parse()
        .unwrap();
    assert!(puts >= 3, "{text}");
    assert!(
        text.contains("tidefs_object_request_duration_seconds_bucket{method=\"put\",le=\"+Inf\"}")
    );
    assert!(rt
        .block_on(tidefs::exporter::fetch(&addr, "/nope", timeout))
        .unwrap_err()
        .contains("404"));
    drop(taken);
    mnt.unmount();
}

/// `tidefs config` changes the changeable settings, reaching a running mount within seconds,
/// and refuses what it cannot do.
#[test]
fn config_changes_limits_of_a_running_volume() {
    let vol = Volume::new(1024);
    fails_with(&tidefs(&["config", &vol.url]), "nothing to change");
    fails_with(
        &tidefs(&["config", &vol.url, "--capacity", "18446744073709551615"]),
        "too large",
    );
    let out = tidefs(&["config", &vol.url, "--inodes", "5"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"inodes\": 5"));
    let mnt = vol.mount();
    for i in 0..4 {
        std::fs::write(mnt.p(&format!("f{i}")), b"x").unwrap();
    }
    let err = std::fs::write(mnt.p("f4"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    let out = tidefs(&["config", &vol.url, "--inodes", "0"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while std::fs::write(mnt.p("f4"), b"x").is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "the mount never saw the new limit"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    mnt.unmount();
}
