//! Space checks on real volumes: `tidefs gc` finds and removes exactly the unreferenced objects
//! (including those of a write killed before its commit), and `tidefs fsck` finds missing and
//! damaged blocks.

use crate::harness::*;
use std::io::Write;
use std::sync::Arc;
use tidefs::layout::Layout;
use tidefs::object::ObjectStore;
use tidefs::volume::{self, StoreAccess};

/// The volume's object store, opened the way a mount opens it.
fn store_of(vol: &Volume) -> (Arc<dyn ObjectStore>, Layout, tokio::runtime::Runtime) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (_, format) = volume::open_meta(&tidefs_meta::MetaUrl::parse(&vol.url).unwrap()).unwrap();
    let access = StoreAccess {
        credentials: s3_storage().then(|| (S3_KEYS.0.to_string(), S3_KEYS.1.to_string())),
        ..StoreAccess::default()
    };
    let (store, _) = rt.block_on(volume::open_store(&format, &access)).unwrap();
    (store, Layout::of(&format), rt)
}

/// Runs `tidefs CMD URL ARGS` with the volume's store arguments; returns (exit ok, JSON out).
fn run(vol: &Volume, cmd: &str, args: &[&str]) -> (bool, serde_json::Value, String) {
    let mut all = vec![cmd, vol.url.as_str()];
    all.extend(args);
    all.extend(vol.store_args.iter().map(String::as_str));
    let out = tidefs(&all);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!err.contains("panicked"), "{err}");
    let json = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{cmd} printed no JSON ({e}): {err}"));
    (out.status.success(), json, err)
}

fn count(v: &serde_json::Value, field: &str) -> u64 {
    v[field]
        .as_u64()
        .unwrap_or_else(|| panic!("no {field} in {v}"))
}

#[test]
fn gc_removes_exactly_the_unreferenced_objects() {
    let vol = Volume::new(64);
    // The open file below must not be committed in the background however slow the host.
    let mnt = vol.mount_with(&["--commit-interval", "600"]);
    for i in 0..5 {
        std::fs::write(mnt.p(&format!("f{i}")), vec![i as u8; 150_000]).unwrap();
    }
    mnt.settle();
    // A write killed before its commit leaves uploaded blocks no metadata references.
    let mut f = std::fs::File::create(mnt.p("unfinished")).unwrap();
    f.write_all(&vec![9u8; 2 << 20]).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while vol.objects().len() < 5 * 3 + 8 {
        assert!(
            std::time::Instant::now() < deadline,
            "blocks never uploaded"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    mnt.kill9();
    drop(f);
    let (store, layout, rt) = store_of(&vol);
    let stray = layout.block_key(987_654_321, 0, 5);
    rt.block_on(store.put(&stray, bytes::Bytes::from_static(b"stray")))
        .unwrap();

    let (ok, r, _) = run(&vol, "gc", &[]);
    assert!(ok);
    assert_eq!(count(&r, "leaked"), 0, "all young: {r}");
    assert!(count(&r, "young") > 8, "{r}");

    let (ok, r, err) = run(&vol, "gc", &["--grace", "0"]);
    assert!(ok);
    let referenced = count(&r, "referenced");
    assert!(referenced >= 5 * 3, "{r}");
    assert!(count(&r, "leaked") > 8, "{r}");
    assert_eq!(count(&r, "deleted"), 0);
    assert!(err.contains("--delete"), "{err}");
    assert!(vol.objects().contains(&stray));

    let (ok, r, _) = run(&vol, "gc", &["--grace", "0", "--delete"]);
    assert!(ok);
    assert_eq!(count(&r, "deleted"), count(&r, "leaked"), "{r}");
    assert_eq!(count(&r, "delete_failures"), 0);
    assert_eq!(
        vol.objects().len() as u64,
        referenced,
        "{:?}",
        vol.objects()
    );
    let (_, r, _) = run(&vol, "gc", &["--grace", "0"]);
    assert_eq!(
        (count(&r, "leaked"), count(&r, "referenced")),
        (0, referenced)
    );

    let mnt = vol.mount();
    for i in 0..5 {
        assert_eq!(
            std::fs::read(mnt.p(&format!("f{i}"))).unwrap(),
            vec![i as u8; 150_000]
        );
    }
    mnt.unmount();
}

#[test]
fn fsck_reports_missing_and_damaged_blocks() {
    let vol = Volume::new(64);
    let mnt = vol.mount();
    std::fs::create_dir(mnt.p("d")).unwrap();
    std::fs::write(mnt.p("d/a"), vec![1u8; 200_000]).unwrap();
    std::fs::write(mnt.p("b"), vec![2u8; 100_000]).unwrap();
    std::fs::hard_link(mnt.p("b"), mnt.p("d/b2")).unwrap();
    // Checking is safe while mounted; repairing is not.
    let (ok, _, err) = run(&vol, "fsck", &[]);
    assert!(ok, "{err}");
    let mut args = vec!["fsck", vol.url.as_str(), "--repair"];
    args.extend(vol.store_args.iter().map(String::as_str));
    let out = tidefs(&args);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unmount it before fsck --repair"), "{err}");
    mnt.unmount();

    let (ok, r, err) = run(&vol, "fsck", &[]);
    assert!(ok, "{err}");
    assert_eq!(r["namespace"].as_array().unwrap().len(), 0, "{r}");
    assert!(count(&r, "slices") >= 2, "{r}");
    assert_eq!(count(&r, "blocks"), vol.objects().len() as u64, "{r}");

    let (store, layout, rt) = store_of(&vol);
    let keys = vol.objects();
    let (gone, short) = (keys[0].clone(), keys[1].clone());
    assert!(layout.parse_key(&gone).is_some(), "{gone}");
    assert!(rt
        .block_on(store.delete_batch(std::slice::from_ref(&gone)))
        .is_empty());
    rt.block_on(store.put(&short, bytes::Bytes::from_static(b"short")))
        .unwrap();

    let (ok, r, err) = run(&vol, "fsck", &["--repair"]);
    assert!(!ok, "a missing block fails the check");
    assert!(
        err.contains("1 blocks missing, 1 blocks of the wrong size"),
        "{err}"
    );
    assert!(r["missing"][0].as_str().unwrap().starts_with(&gone), "{r}");
    assert!(
        r["wrong_size"][0].as_str().unwrap().contains("5 bytes"),
        "{r}"
    );
}

/// The trash on a real mount: `rm` and replacing renames put files in `.trash/<hour>/`, an
/// open descriptor sees link count 0 as without a trash, `ls` of the root does not show the
/// trash, `mv` restores a file with its data, and `tidefs config --trash-days` changes it.
#[test]
fn trash_keeps_removed_files_and_restores_them() {
    use std::os::unix::fs::MetadataExt;
    let vol = Volume::formatted_with(64, &["--trash-days", "1"]);
    let mnt = vol.mount();
    let body: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::create_dir(mnt.p("d")).unwrap();
    std::fs::write(mnt.p("d/f"), &body).unwrap();
    std::fs::hard_link(mnt.p("d/f"), mnt.p("d/link")).unwrap();
    std::fs::remove_file(mnt.p("d/link")).unwrap();
    assert_eq!(std::fs::metadata(mnt.p("d/f")).unwrap().nlink(), 1);
    let open = std::fs::File::open(mnt.p("d/f")).unwrap();
    let ino = open.metadata().unwrap().ino();
    std::fs::remove_file(mnt.p("d/f")).unwrap();
    assert_eq!(open.metadata().unwrap().nlink(), 0, "as without a trash");
    drop(open);
    let root: Vec<String> = std::fs::read_dir(mnt.p(""))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(root, vec!["d"]);
    let hours: Vec<_> = std::fs::read_dir(mnt.p(".trash"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(hours.len(), 1);
    let dir_ino = std::fs::metadata(mnt.p("d")).unwrap().ino();
    let entry = hours[0].join(format!("{dir_ino}-{ino}-f"));
    assert_eq!(std::fs::read(&entry).unwrap(), body);
    // Nothing but removal puts files in the trash.
    let err = std::fs::write(hours[0].join("new"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EPERM), "{err}");
    std::fs::rename(&entry, mnt.p("d/restored")).unwrap();
    let restored = std::fs::metadata(mnt.p("d/restored")).unwrap();
    assert_eq!((restored.ino(), restored.nlink()), (ino, 1));
    assert_eq!(std::fs::read(mnt.p("d/restored")).unwrap(), body);
    // A file replaced by rename lands in the trash too.
    std::fs::write(mnt.p("d/new"), b"new").unwrap();
    std::fs::rename(mnt.p("d/new"), mnt.p("d/restored")).unwrap();
    assert_eq!(
        std::fs::read(hours[0].join(format!("{dir_ino}-{ino}-restored"))).unwrap(),
        body
    );
    mnt.unmount();
    let out = tidefs(&["config", &vol.url, "--trash-days", "0"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The next mount purges the trash, now off, and the data goes.
    let mnt = vol.mount();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while vol.objects().len() > 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "trash never purged: {:?}",
            vol.objects()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(std::fs::read(mnt.p("d/restored")).unwrap(), b"new");
    assert!(std::fs::read_dir(mnt.p(".trash")).unwrap().next().is_none());
    mnt.unmount();
}

fn entries(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

/// Runs a tidefs command that prints JSON; panics unless it succeeds.
fn json_of(args: &[&str]) -> serde_json::Value {
    let out = tidefs(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{args:?}: {err}");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{args:?}: no JSON ({e})"))
}

/// `tidefs rmr` removes a whole tree through the mount's control file: every entry counted,
/// a symlink removed rather than followed, a file open in the tree readable until closed,
/// then every object of the tree freed.
#[test]
fn rmr_removes_a_tree_through_the_mount() {
    use std::io::Read;
    let vol = Volume::new(64);
    let mnt = vol.mount();
    std::fs::create_dir(mnt.p("keep")).unwrap();
    std::fs::write(mnt.p("keep/f"), b"kept").unwrap();
    let mut made = 0;
    for d in 0..4 {
        let dir = mnt.p(&format!("tree/d{d}/sub"));
        std::fs::create_dir_all(&dir).unwrap();
        made += if d == 0 { 3 } else { 2 };
        for f in 0..30 {
            std::fs::write(dir.join(format!("f{f}")), vec![d as u8; 1000 + f]).unwrap();
            made += 1;
        }
    }
    std::os::unix::fs::symlink(mnt.p("keep"), mnt.p("tree/link")).unwrap();
    std::os::unix::fs::symlink(mnt.p("keep"), mnt.p("link-to-keep")).unwrap();
    made += 1;
    let mut open = std::fs::File::open(mnt.p("tree/d3/sub/f7")).unwrap();
    // A symlink to a directory is removed, not followed.
    let out = json_of(&["rmr", mnt.p("link-to-keep").to_str().unwrap()]);
    assert_eq!(out["removed"], 1);
    assert_eq!(std::fs::read(mnt.p("keep/f")).unwrap(), b"kept");
    // The kernel holds the root's listing and the tree's names: the mount has it drop them,
    // so the tree is gone at once, not after the kernel's cache timeouts.
    assert_eq!(names(&mnt.p("")), ["keep", "tree"]);
    assert!(mnt.p("tree/d0/sub/f0").exists());
    let out = json_of(&["rmr", mnt.p("tree").to_str().unwrap()]);
    assert_eq!(out["removed"], made, "{out}");
    assert!(!mnt.p("tree").exists());
    assert!(!mnt.p("tree/d0/sub/f0").exists());
    assert_eq!(names(&mnt.p("")), ["keep"]);
    let mut body = Vec::new();
    open.read_to_end(&mut body).unwrap();
    assert_eq!(body, vec![3u8; 1007]);
    drop(open);
    // Only the kept file's object is left once deletion ran.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while vol.objects().len() != 1 {
        assert!(std::time::Instant::now() < deadline, "{:?}", vol.objects());
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(entries(&mnt.p("")), 1);
    // Errors are clear: a path off tidefs, a missing path.
    let out = tidefs(&["rmr", "/tmp"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not on a tidefs mount"));
    let out = tidefs(&["rmr", mnt.p("missing").to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot access"));
    mnt.unmount();
}

/// `tidefs compact` rewrites a file of many small appends into one slice with the same bytes;
/// a file that reaches 16 slices is compacted in the background without asking.
#[test]
fn compact_rewrites_many_slices_into_one() {
    use std::io::Write;
    let vol = Volume::new(64);
    let mnt = vol.mount();
    let mut want = Vec::new();
    // Below the background threshold (16 slices), and at it.
    for (name, appends) in [("asked", 10u32), ("background", 16)] {
        for i in 0..appends {
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(mnt.p(name))
                .unwrap();
            let piece = vec![i as u8 + 1; 3000 + i as usize];
            f.write_all(&piece).unwrap();
            f.sync_all().unwrap();
            if name == "asked" {
                want.extend_from_slice(&piece);
            }
        }
    }
    let out = json_of(&["compact", mnt.p("asked").to_str().unwrap()]);
    assert_eq!(
        (out["files"].as_u64(), out["slices_replaced"].as_u64()),
        (Some(1), Some(10)),
        "{out}"
    );
    assert_eq!(out["bytes_rewritten"].as_u64(), Some(want.len() as u64));
    assert_eq!(std::fs::read(mnt.p("asked")).unwrap(), want);
    // One object per file once the replaced slices are deleted.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while vol.objects().len() != 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "{} objects",
            vol.objects().len()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    mnt.unmount();
    let mnt = vol.mount();
    assert_eq!(std::fs::read(mnt.p("asked")).unwrap(), want);
    let background = std::fs::read(mnt.p("background")).unwrap();
    assert_eq!(background.len(), (0..16).map(|i| 3000 + i).sum::<usize>());
    assert!(background.ends_with(&[16u8; 3015]));
    let out = json_of(&["compact", mnt.p("").to_str().unwrap()]);
    assert_eq!(
        (out["files"].as_u64(), out["slices_replaced"].as_u64()),
        (Some(2), Some(0)),
        "{out}"
    );
    mnt.unmount();
}

/// A mount killed while it deletes the objects of a large removal loses nothing and leaks
/// nothing: the deletion queue is in metadata, the next mount finishes it (objects already
/// gone count as deleted), and gc then finds no leaked object.
#[test]
fn a_mount_killed_while_deleting_leaks_nothing() {
    let vol = Volume::new(64);
    let mnt = vol.mount();
    let kept: Vec<u8> = (0..200_000u32).map(|i| (i % 241) as u8).collect();
    std::fs::write(mnt.p("kept"), &kept).unwrap();
    std::fs::create_dir(mnt.p("gone")).unwrap();
    for i in 0..400 {
        std::fs::write(mnt.p(&format!("gone/{i}")), vec![1u8; 70_000]).unwrap();
    }
    mnt.settle();
    let total = vol.objects().len();
    assert_eq!(total, 4 + 400 * 2);
    std::fs::remove_dir_all(mnt.p("gone")).unwrap();
    // The deleter runs once a second: kill the mount while it is at work.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while vol.objects().len() == total && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    let _dead = mnt.kill9();
    let left = vol.objects().len();
    eprintln!(
        "{} of {} freed objects were deleted before the kill",
        total - left,
        total - 4
    );
    let mnt = vol.mount();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while vol.objects().len() != 4 {
        assert!(
            std::time::Instant::now() < deadline,
            "{} objects left",
            vol.objects().len()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(std::fs::read(mnt.p("kept")).unwrap(), kept);
    mnt.unmount();
    let (ok, r, _) = run(&vol, "gc", &["--grace", "0"]);
    assert!(ok);
    assert_eq!(
        (count(&r, "leaked"), count(&r, "referenced")),
        (0, 4),
        "{r}"
    );
    let (ok, r, _) = run(&vol, "fsck", &[]);
    assert!(ok, "{r}");
}
