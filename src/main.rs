//! The `tidefs` command: format, mount, umount and inspect volumes.

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tidefs::control;
use tidefs::data::DataCtx;
use tidefs::layout::Layout;
use tidefs::session;
use tidefs::vfs::{TideVfs, VfsOptions};
use tidefs::volume::{self, FormatRequest};
use tidefs_cache::BlockCache;
use tidefs_meta::{MetaError, MetaUrl, SessionInfo};

/// Marks the re-executed child of `mount --background`.
const DAEMON_ENV: &str = "TIDEFS_DAEMON_CHILD";

/// How long an exiting `--writeback` mount keeps uploading staged blocks.
const WRITEBACK_DRAIN: Duration = Duration::from_secs(300);

#[derive(Parser)]
#[command(
    name = "tidefs",
    version,
    about = "A POSIX filesystem on object storage"
)]
struct Cli {
    /// Log debug details.
    #[arg(long, global = true)]
    debug: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Format a volume (or check an existing one has the same layout).
    Format(FormatArgs),
    /// Mount a volume; with no META_URL, the default volume (formatted on first use).
    Mount(MountArgs),
    /// Unmount a mounted volume.
    Umount(UmountArgs),
    /// Show a volume's settings, usage and sessions.
    Status(StatusArgs),
    /// Measure an object store (PUT, GET, batched DELETE) before putting a volume on it.
    Objbench(ObjbenchArgs),
    /// Find objects in the bucket that no metadata references; --delete removes them.
    Gc(GcArgs),
    /// Check the namespace and that every referenced block is in the bucket; --repair fixes
    /// what can be fixed without losing data.
    Fsck(FsckArgs),
    /// Read files or trees through their tidefs mount so that their blocks are cached.
    Warmup(WarmupArgs),
    /// Remove trees through their mount on the metadata side only, far faster than rm -rf.
    Rmr(PathsArgs),
    /// Rewrite files made of many slices (or every file of trees) into few, through their
    /// mount.
    Compact(PathsArgs),
    /// Change a volume's changeable settings (the rest is fixed at format).
    Config(ConfigArgs),
    /// Write a volume's metadata to a portable JSON Lines file (or - for stdout).
    Dump(DumpArgs),
    /// Load a dump into an empty metadata engine (any engine: SQLite, Redis).
    Load(DumpArgs),
}

#[derive(Args)]
struct DumpArgs {
    /// Metadata engine URL.
    meta_url: String,
    /// The dump file; - for stdout (dump) or stdin (load).
    file: PathBuf,
}

#[derive(Args)]
struct ConfigArgs {
    /// Metadata engine URL.
    meta_url: String,
    /// Space limit in GiB (0: unlimited).
    #[arg(long)]
    capacity: Option<u64>,
    /// Inode limit (0: unlimited).
    #[arg(long)]
    inodes: Option<u64>,
    /// Days removed files stay in `.trash` before any mount purges them (0: no trash, and
    /// what the trash holds is purged).
    #[arg(long)]
    trash_days: Option<u32>,
}

#[derive(Args)]
struct PathsArgs {
    /// Paths on a tidefs mount.
    #[arg(required = true)]
    paths: Vec<PathBuf>,
}

#[derive(Args)]
struct WarmupArgs {
    /// Files or directories on a tidefs mount.
    #[arg(required = true)]
    paths: Vec<PathBuf>,
    /// Files read at once.
    #[arg(long, default_value_t = 4)]
    threads: usize,
}

#[derive(Args)]
struct GcArgs {
    /// Metadata engine URL (default: the default volume).
    meta_url: Option<String>,
    /// Delete leaked objects, and the objects of freed slices still queued for deletion.
    #[arg(long)]
    delete: bool,
    /// Leave unreferenced objects younger than this many seconds (uploads not committed yet).
    #[arg(long, default_value_t = 3600)]
    grace: u64,
    #[command(flatten)]
    store: StoreArgs,
}

#[derive(Args)]
struct FsckArgs {
    /// Metadata engine URL (default: the default volume).
    meta_url: Option<String>,
    /// Fix the problems whose fix loses nothing.
    #[arg(long)]
    repair: bool,
    /// The --cache-dir of a --writeback mount of this volume on this host: blocks staged
    /// there and not uploaded yet are counted as staged, not missing.
    #[arg(long)]
    cache_dir: Option<String>,
    #[command(flatten)]
    store: StoreArgs,
}

#[derive(Args)]
struct ObjbenchArgs {
    /// s3://BUCKET[/PREFIX], http(s)://HOST:PORT/BUCKET[/PREFIX], or a local directory.
    bucket: String,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 4)]
    threads: usize,
    /// Number of small objects.
    #[arg(long, default_value_t = 100)]
    small_objects: usize,
    /// Size of a small object in KiB.
    #[arg(long, default_value_t = 128)]
    small_size: usize,
    /// Number of block-sized objects.
    #[arg(long, default_value_t = 16)]
    big_objects: usize,
    /// Block size in KiB.
    #[arg(long, default_value_t = 4096)]
    block_size: usize,
    /// Drop this host's page cache before each GET phase (needs root), so that an S3 server
    /// running on this host serves the objects from its disk, as after a cold start.
    #[arg(long)]
    drop_caches: bool,
    #[command(flatten)]
    store: StoreArgs,
}

#[derive(Args)]
struct FormatArgs {
    /// Metadata engine URL, e.g. sqlite3:///var/lib/tidefs/vol.db
    meta_url: String,
    /// Volume name: 3 to 63 lowercase letters, digits and hyphens.
    name: String,
    /// Object store kind.
    #[arg(long, default_value = "file")]
    storage: String,
    /// Where objects go (a directory for --storage file; default beside the database).
    #[arg(long)]
    bucket: Option<String>,
    /// Block size in KiB (power of two, 64 to 16384).
    #[arg(long, default_value_t = 4096)]
    block_size: u32,
    /// Days removed and replaced files stay in `.trash` before any mount purges them (0: no
    /// trash).
    #[arg(long, default_value_t = 0)]
    trash_days: u32,
    /// Space limit in GiB (0: unlimited).
    #[arg(long, default_value_t = 0)]
    capacity: u64,
    /// Inode limit (0: unlimited).
    #[arg(long, default_value_t = 0)]
    inodes: u64,
    /// Spread block keys over N prefixes (up to 256) to raise the request rate an S3 bucket
    /// allows; fixed at format (0: one prefix).
    #[arg(long, default_value_t = 0)]
    shards: u32,
    /// Keep the access key and the secret key (sealed, never in clear) in the volume, so that
    /// mounts need no keys; whoever can read the metadata can then reach the bucket.
    #[arg(long)]
    store_secret: bool,
    #[command(flatten)]
    store: StoreArgs,
}

/// How to reach the object store (stored in the volume only with `format --store-secret`).
#[derive(Args)]
struct StoreArgs {
    /// Access key of the object store (default: the AWS credential chain).
    #[arg(long, env = "TIDEFS_ACCESS_KEY")]
    access_key: Option<String>,
    /// Secret key of the object store (default: the AWS credential chain). Prefer the
    /// environment variable: arguments are visible to every local user.
    #[arg(long, env = "TIDEFS_SECRET_KEY", hide_env_values = true)]
    secret_key: Option<String>,
    /// Region of an S3 bucket (default: the AWS chain, or us-east-1 for custom endpoints).
    #[arg(long)]
    region: Option<String>,
    /// Concurrent uploads to the object store.
    #[arg(long, default_value_t = 20)]
    max_uploads: usize,
    /// Concurrent downloads (GET, HEAD, LIST) from the object store.
    #[arg(long, default_value_t = 200)]
    max_downloads: usize,
    /// Concurrent batch-delete requests (each removes up to 1000 objects).
    #[arg(long, default_value_t = 10)]
    max_deletes: usize,
}

impl StoreArgs {
    fn access(&self) -> Result<volume::StoreAccess> {
        Ok(volume::StoreAccess {
            credentials: volume::StoreAccess::credentials_from(
                self.access_key.clone(),
                self.secret_key.clone(),
            )?,
            region: self.region.clone(),
            max_uploads: self.max_uploads,
            max_downloads: self.max_downloads,
            max_deletes: self.max_deletes,
            ..volume::StoreAccess::default()
        })
    }
}

#[derive(Args)]
struct MountArgs {
    /// [META_URL] MOUNTPOINT
    #[arg(num_args = 1..=2, value_names = ["META_URL", "MOUNTPOINT"], required = true)]
    args: Vec<String>,
    /// Run in the background once mounted.
    #[arg(short = 'd', long)]
    background: bool,
    /// Log file for --background (default: tidefs.log in the data directory).
    #[arg(long)]
    log: Option<PathBuf>,
    /// Where to cache blocks: directories on local disks separated by ':', or "memory".
    #[arg(long, default_value = "memory")]
    cache_dir: String,
    /// Cache size in MiB: of the disk cache with --cache-dir DIR (default 10240), of memory
    /// with --cache-dir memory (default 128).
    #[arg(long)]
    cache_size: Option<u64>,
    /// Memory in MiB for the hottest blocks in front of a disk cache (whose files the
    /// kernel's page cache also keeps).
    #[arg(long, default_value_t = 32)]
    mem_cache_size: u64,
    /// Keep the full blocks of written files in the disk cache too (as JuiceFS's option of
    /// the same name); by default only short blocks, small files and the ends of files, are.
    #[arg(long)]
    cache_large_write: bool,
    /// Stop adding blocks to a cache disk with less than this share of it free.
    #[arg(long, default_value_t = 0.1)]
    free_space_ratio: f64,
    /// Write buffer size in MiB: written data held in memory (buffered or uploading); past
    /// it writers wait for uploads.
    #[arg(long, default_value_t = 96)]
    buffer_size: u64,
    /// Most MiB a sequential reader fetches ahead (the window grows to it from one block;
    /// it is also held to half of --cache-size), and most MiB all readers together have
    /// being fetched ahead at once.
    #[arg(long, default_value_t = 64)]
    max_readahead: u64,
    /// KiB the kernel itself reads ahead of a sequential reader, in FUSE requests of up to
    /// 1 MiB (the mount's read_ahead_kb in sysfs, set only when mounting as root; 0 keeps
    /// the kernel's 128 KiB).
    #[arg(long, default_value_t = 1024)]
    read_ahead_kb: u32,
    /// Kernel attribute cache timeout in seconds.
    #[arg(long, default_value_t = 1.0)]
    attr_cache: f64,
    /// Kernel file entry cache timeout in seconds.
    #[arg(long, default_value_t = 1.0)]
    entry_cache: f64,
    /// Kernel directory entry cache timeout in seconds.
    #[arg(long, default_value_t = 1.0)]
    dir_entry_cache: f64,
    /// Seconds the kernel remembers that a name does not exist. Default: --entry-cache on a
    /// SQLite volume (one mount at a time, so every creation passes through this kernel), 0
    /// on a shared volume (a file another mount creates is found at once).
    #[arg(long)]
    negative_entry_cache: Option<f64>,
    /// Number of FUSE request loops.
    #[arg(long, default_value_t = 16)]
    threads: usize,
    /// Seconds after which data written to an open file is committed without a close or
    /// fsync, so other mounts see it and a crash loses at most this much (1 to 600; gc's
    /// grace period must stay well above it).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=600))]
    commit_interval: u64,
    /// Seconds between session heartbeats. A mount on another host that misses 5 (one on
    /// this host: whose process is gone) is taken for dead and its session cleaned up by the
    /// others; give every mount of a volume the same value.
    #[arg(long, default_value_t = session::DEFAULT_HEARTBEAT)]
    heartbeat: u64,
    /// Make close(2) wait until the file's writes are uploaded and committed, as it always
    /// does on a shared volume. By default a SQLite volume's mount returns from close at once
    /// and commits in the background: the data reads back at once through the mount, and
    /// fsync(2) of the file (or of any directory, for every file closed before) waits for it.
    #[arg(long)]
    commit_on_close: bool,
    /// Mount read-only.
    #[arg(long)]
    read_only: bool,
    /// Acknowledge writes once their blocks are durable on the local cache disk (needs
    /// --cache-dir) and upload them in the background; blocks left by a crash are uploaded
    /// by the next mount with the same --cache-dir.
    #[arg(long)]
    writeback: bool,
    /// Address of the metrics endpoint (Prometheus text at /metrics, JSON at /stats); if the
    /// port is taken, a free port on the same address is used.
    #[arg(long, default_value = "127.0.0.1:9567")]
    metrics: String,
    /// Serve no metrics endpoint.
    #[arg(long)]
    no_metrics: bool,
    #[command(flatten)]
    store: StoreArgs,
}

#[derive(Args)]
struct UmountArgs {
    /// Where the volume is mounted.
    mountpoint: PathBuf,
    /// Detach even if busy (lazy unmount).
    #[arg(short, long)]
    force: bool,
}

#[derive(Args)]
struct StatusArgs {
    /// Metadata engine URL (default: the default volume).
    meta_url: Option<String>,
}

fn init_logging(debug: bool) {
    // fuser warns when its own unmount at the end finds the filesystem already unmounted by
    // tidefs; tidefs reports unmount failures itself.
    let default = if debug {
        "debug"
    } else {
        "info,fuser::mnt=error"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// Makes glibc return large blocks to the system when freed. By default its mmap threshold
/// rises to the size of the largest freed block, after which 4 MiB data blocks come from
/// per-thread arenas that keep freed memory, and the process grows far past its cache and
/// buffer limits. The fixed threshold sits above the largest FUSE request (1 MiB), so the
/// buffer of every read reuses heap memory instead of being mapped, faulted in page by page
/// and unmapped (with a TLB shootdown) each time.
fn tune_allocator() {
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
    }
}

/// Allocations at least this large are mapped on their own and unmapped when freed.
const MMAP_THRESHOLD: i32 = (1 << 20) + (64 << 10);

fn main() {
    tune_allocator();
    let cli = Cli::parse();
    init_logging(cli.debug);
    let result = match cli.command {
        Command::Format(a) => format(a),
        Command::Mount(a) => mount(a),
        Command::Umount(a) => umount(a),
        Command::Status(a) => status(a),
        Command::Objbench(a) => objbench(a),
        Command::Gc(a) => gc(a),
        Command::Fsck(a) => fsck(a),
        Command::Warmup(a) => warmup(a),
        Command::Rmr(a) => rmr(a),
        Command::Compact(a) => compact(a),
        Command::Config(a) => config(a),
        Command::Dump(a) => dump(a),
        Command::Load(a) => load(a),
    };
    if let Err(e) = result {
        eprintln!("tidefs: error: {e:#}");
        std::process::exit(1);
    }
}

fn parse_url(url: &str) -> Result<MetaUrl> {
    MetaUrl::parse(url).map_err(|e| anyhow!(e))
}

fn format(a: FormatArgs) -> Result<()> {
    let url = parse_url(&a.meta_url)?;
    let req = FormatRequest {
        name: a.name,
        storage: a.storage,
        bucket: a.bucket,
        block_size_kib: a.block_size,
        trash_days: a.trash_days,
        capacity_gib: a.capacity,
        inodes: a.inodes,
        shards: a.shards,
        store_secret: a.store_secret,
    };
    let f = volume::format_volume(&url, &req, &a.store.access()?)?;
    println!(
        "{}",
        serde_json::to_string_pretty(&volume::display_format(&f))?
    );
    Ok(())
}

/// The default volume's URL, formatting it on first use.
fn default_volume() -> Result<String> {
    let dir = volume::default_data_dir();
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("cannot create data directory {}", dir.display()))?;
    let probe = dir.join(".write-probe");
    std::fs::write(&probe, b"")
        .with_context(|| format!("data directory {} is not writable", dir.display()))?;
    let _ = std::fs::remove_file(&probe);
    let url = volume::default_meta_url(&dir);
    let parsed = parse_url(&url)?;
    let formatted = match tidefs_meta::open(&parsed, false) {
        Ok(m) => match m.load_format() {
            Ok(_) => true,
            Err(MetaError::NotFormatted) => false,
            Err(e) => return Err(e.into()),
        },
        Err(MetaError::NotFormatted) => false,
        Err(e) => return Err(e.into()),
    };
    if !formatted {
        let req = FormatRequest {
            name: "tidefs".into(),
            storage: "file".into(),
            bucket: Some(dir.join("objects").display().to_string()),
            block_size_kib: 4096,
            trash_days: 0,
            capacity_gib: 0,
            inodes: 0,
            shards: 0,
            store_secret: false,
        };
        volume::format_volume(&parsed, &req, &volume::StoreAccess::default())?;
        tracing::info!(dir = %dir.display(), "formatted the default volume");
    }
    Ok(url)
}

/// The live sessions of a volume, for commands that must not race a mount.
fn live_sessions(meta: &dyn tidefs_meta::Meta) -> Result<Vec<SessionInfo>> {
    let heartbeat = Duration::from_secs(session::DEFAULT_HEARTBEAT);
    Ok(meta
        .sessions()?
        .into_iter()
        .filter(|s| session::is_alive(s, heartbeat))
        .collect())
}

fn mount(a: MountArgs) -> Result<()> {
    let (url, mountpoint) = match a.args.as_slice() {
        [mp] => (default_volume()?, PathBuf::from(mp)),
        [url, mp] => (url.clone(), PathBuf::from(mp)),
        _ => bail!("usage: tidefs mount [META_URL] MOUNTPOINT"),
    };
    let parsed = parse_url(&url)?;
    let (meta, format) = volume::open_meta(&parsed).map_err(|e| match e {
        volume::VolumeError::Meta(MetaError::NotFormatted) => {
            anyhow!("volume {url} is not formatted: run `tidefs format {url} NAME` first")
        }
        e => e.into(),
    })?;
    let mountpoint = volume::prepare_mountpoint(&mountpoint)?;
    volume::check_fuse_device()?;
    if a.background && std::env::var_os(DAEMON_ENV).is_none() {
        return daemonize(&a, &mountpoint);
    }
    let access = a.store.access()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .thread_name("tidefs-io")
        .enable_all()
        .build()
        .context("cannot start the I/O runtime")?;
    let (store, store_metrics) = rt.block_on(volume::open_store(&format, &access))?;
    let metrics_listener = if a.no_metrics {
        None
    } else {
        Some(tidefs::exporter::bind(&a.metrics).with_context(|| {
            format!(
                "cannot serve metrics on {} (see --metrics, --no-metrics)",
                a.metrics
            )
        })?)
    };
    let metrics_addr = metrics_listener
        .as_ref()
        .and_then(|l| l.local_addr().ok())
        .map(|a| a.to_string())
        .unwrap_or_default();

    // Sessions of dead mounts: free what they held. SQLite volumes have one mount at a time;
    // several mounts share a volume through an engine on a server (Redis).
    let heartbeat = Duration::from_secs(a.heartbeat.max(1));
    session::reap_dead(&*meta, None, heartbeat)?;
    let sole_mount = meta.engine() == "sqlite3";
    if sole_mount {
        if let Some(s) = meta.sessions()?.first() {
            bail!(
                "volume {} is already mounted at {} by pid {} on {} (one mount per SQLite \
                 volume; keep metadata in Redis to share a volume)",
                format.name,
                s.mountpoint,
                s.pid,
                s.host
            );
        }
    }
    let sid = meta.new_session(&SessionInfo {
        sid: 0,
        host: session::hostname(),
        pid: std::process::id(),
        mountpoint: mountpoint.display().to_string(),
        version: env!("CARGO_PKG_VERSION").into(),
        started: 0,
        heartbeat: 0,
        metrics: metrics_addr.clone(),
    })?;

    let layout = Layout::of(&format);
    let mut writeback = None;
    let store: Arc<dyn tidefs::object::ObjectStore> = if a.writeback {
        if a.cache_dir == "memory" {
            let _ = meta.close_session(sid);
            bail!("--writeback stages blocks on a local disk: give --cache-dir DIR");
        }
        let dir = staging_dir(&a.cache_dir, &format);
        let staging = tidefs_cache::Staging::open(&dir).with_context(|| {
            let _ = meta.close_session(sid);
            format!(
                "cannot open the writeback staging directory {}",
                dir.display()
            )
        })?;
        let wb = tidefs::object::WritebackStore::start(store, staging, rt.handle())
            .context("cannot list the writeback staging directory")?;
        writeback = Some(wb.clone());
        wb
    } else {
        store
    };
    let cache = if a.cache_dir == "memory" {
        BlockCache::new(a.cache_size.unwrap_or(128) << 20)
    } else {
        let config = tidefs_cache::DiskCacheConfig {
            // One subdirectory per volume: block keys repeat across volumes (and across
            // formats of one name), so a cache must never serve one volume's blocks to another.
            dirs: a
                .cache_dir
                .split(':')
                .map(|d| PathBuf::from(d).join(&format.uuid))
                .collect(),
            capacity: a.cache_size.unwrap_or(10240) << 20,
            free_ratio: a.free_space_ratio.clamp(0.0, 1.0),
        };
        let disk = tidefs_cache::DiskCache::open(&config).context("cannot open the disk cache")?;
        tracing::info!(dirs = %a.cache_dir, used = disk.used(), "disk cache opened");
        BlockCache::with_disk(a.mem_cache_size << 20, disk)
    };
    let data = Arc::new(
        DataCtx::new(meta.clone(), store, cache, layout, rt.handle().clone())
            // A writeback mount deletes staged blocks once uploaded: keep them all cached,
            // as they were staged, so data just written reads back from the disk.
            .with_large_write_caching(a.cache_large_write || a.writeback)
            .with_prefetch_limit(a.max_readahead << 20),
    );
    let splice_stats = Arc::<tidefs_fuse::SpliceStats>::default();
    if let Some(listener) = metrics_listener {
        let exported = Arc::new(
            tidefs::exporter::MountMetrics::new(store_metrics, data.clone())
                .with_writeback(writeback.clone())
                .with_splice_stats(splice_stats.clone()),
        );
        rt.spawn(tidefs::exporter::serve(listener, exported));
        tracing::info!(address = %metrics_addr, "metrics at http://{metrics_addr}/metrics");
    }
    let opts = VfsOptions {
        buffer_size: a.buffer_size << 20,
        max_readahead: a.max_readahead << 20,
        read_only: a.read_only,
        heartbeat,
        attr_ttl: cache_ttl(a.attr_cache),
        commit_interval: Duration::from_secs(a.commit_interval),
        close_behind: sole_mount && !a.commit_on_close,
        ..VfsOptions::default()
    };
    let vfs = TideVfs::new(data, format.clone(), sid, opts);
    let config = tidefs_fuse::MountConfig {
        fsname: format!("tidefs:{}", format.name),
        attr_ttl: cache_ttl(a.attr_cache),
        entry_ttl: cache_ttl(a.entry_cache),
        dir_entry_ttl: cache_ttl(a.dir_entry_cache),
        threads: a.threads.max(1),
        allow_other: unsafe { libc::geteuid() } == 0,
        read_only: a.read_only,
        read_ahead_kb: (a.read_ahead_kb > 0).then_some(a.read_ahead_kb),
        // Only the disk cache answers reads with spans of its files.
        splice_reads: a.cache_dir != "memory",
        splice_stats,
        negative_entry_ttl: cache_ttl(a.negative_entry_cache.unwrap_or(if sole_mount {
            a.entry_cache
        } else {
            0.0
        })),
        sole_mount,
        kernel_cache: vfs.kernel_cache(),
    };
    let mounted = match tidefs_fuse::mount(vfs.clone(), &mountpoint, config) {
        Ok(m) => m,
        Err(e) => {
            let _ = meta.close_session(sid);
            return Err(anyhow!("cannot mount at {}: {e}", mountpoint.display()));
        }
    };
    tracing::info!(volume = %format.name, mountpoint = %mountpoint.display(), sid, "mounted");
    println!(
        "tidefs: {} mounted at {}",
        format.name,
        mountpoint.display()
    );

    let (tx, rx) = std::sync::mpsc::channel::<&'static str>();
    {
        let tx = tx.clone();
        rt.spawn(async move {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("install SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            let _ = tx.send("signal");
        });
    }
    let joiner = std::thread::spawn(move || {
        let r = mounted.join();
        let _ = tx.send("unmounted");
        r
    });
    if rx.recv() == Ok("signal") {
        tracing::info!("signal received: flushing and unmounting");
        if let Err(e) = vfs.flush_all() {
            tracing::error!(error = %e, "flush before unmount failed");
        }
        if let Err(e) = volume::unmount(&mountpoint, false) {
            tracing::warn!(error = %e, "unmount failed (busy?); detaching lazily");
            volume::unmount(&mountpoint, true)?;
        }
    }
    let joined = joiner
        .join()
        .map_err(|_| anyhow!("the FUSE session panicked"))?;
    // Runs once; a no-op if the session already called it.
    tidefs_fuse::Vfs::destroy(&*vfs);
    if let Some(wb) = writeback {
        let (blocks, bytes) = wb.pending();
        if blocks > 0 {
            tracing::info!(blocks, bytes, "uploading staged blocks before exit");
        }
        let left = rt.block_on(wb.drain(WRITEBACK_DRAIN));
        if left > 0 {
            tracing::warn!(
                blocks = left,
                "staged blocks not uploaded yet: the next mount with this --cache-dir uploads them"
            );
        }
    }
    drop(rt);
    joined.context("FUSE session ended with an error")?;
    Ok(())
}

/// A kernel cache timeout of `secs` seconds: negative or NaN is 0, too long for a
/// [`Duration`] (inf) is the longest one.
fn cache_ttl(secs: f64) -> Duration {
    Duration::try_from_secs_f64(secs.max(0.0)).unwrap_or(Duration::MAX)
}

/// Re-executes this mount in a new session in the background, and returns once it is mounted
/// (or reports why it failed, from its log).
fn daemonize(a: &MountArgs, mountpoint: &Path) -> Result<()> {
    use std::os::unix::process::CommandExt;
    let log = a
        .log
        .clone()
        .unwrap_or_else(|| volume::default_data_dir().join("tidefs.log"));
    if let Some(dir) = log.parent() {
        std::fs::create_dir_all(dir).ok();
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .with_context(|| format!("cannot open log file {}", log.display()))?;
    // The secret key goes to the long-running child through its environment, never through
    // its arguments (visible to every local user in /proc/PID/cmdline).
    let mut args: Vec<String> = Vec::new();
    let mut argv = std::env::args().skip(1);
    while let Some(x) = argv.next() {
        match x.as_str() {
            "--background" | "-d" => {}
            "--secret-key" => {
                argv.next();
            }
            _ if x.starts_with("--secret-key=") => {}
            _ => args.push(x),
        }
    }
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    if let Some(secret) = &a.store.secret_key {
        cmd.env("TIDEFS_SECRET_KEY", secret);
    }
    cmd.args(&args)
        .env(DAEMON_ENV, "1")
        .stdin(std::process::Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file);
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("cannot start the background mount")?;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if volume::is_tidefs_mount(mountpoint) {
            println!(
                "tidefs: mounted at {} (pid {}, log {})",
                mountpoint.display(),
                child.id(),
                log.display()
            );
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(5).collect();
            bail!(
                "background mount exited ({status}); last log lines:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        if std::time::Instant::now() > deadline {
            bail!(
                "background mount did not come up within 30 s; see {}",
                log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn umount(a: UmountArgs) -> Result<()> {
    let path = std::path::absolute(&a.mountpoint)?;
    match volume::mounted_fs(&path) {
        Some(_) if volume::is_tidefs_mount(&path) => {}
        Some(fs) => bail!("{} is a {fs} mount, not tidefs", path.display()),
        None => bail!("{} is not mounted", path.display()),
    }
    volume::unmount(&path, a.force)?;
    Ok(())
}

/// The given META_URL, or the default volume's.
fn meta_url_or_default(url: Option<String>) -> String {
    url.unwrap_or_else(|| volume::default_meta_url(&volume::default_data_dir()))
}

/// A spinner on stderr showing a scan's progress (hidden when stderr is not a terminal).
/// Shows a dump's or load's counts on `bar`, at most every 100 records.
fn show_dump_progress(
    bar: &indicatif::ProgressBar,
) -> impl FnMut(&tidefs_meta::dump::DumpStats) + '_ {
    let mut calls = 0u64;
    move |st| {
        calls += 1;
        if calls % 100 == 0 {
            bar.set_message(format!(
                "{} inodes, {} entries, {} slices",
                st.inodes, st.entries, st.slices
            ));
        }
    }
}

fn dump(a: DumpArgs) -> Result<()> {
    let (meta, _) = volume::open_meta(&parse_url(&a.meta_url)?)?;
    if let Some(s) = live_sessions(&*meta)?.first() {
        eprintln!(
            "tidefs: warning: the volume is mounted ({} at {}); the dump is not a snapshot of \
             one instant",
            s.host, s.mountpoint
        );
    }
    let bar = spinner();
    let stats = if a.file.as_os_str() == "-" {
        let mut out = std::io::BufWriter::new(std::io::stdout().lock());
        tidefs_meta::dump::dump(&*meta, &mut out, &mut show_dump_progress(&bar))?
    } else {
        // Written beside the target and renamed into place: a failed dump leaves no file
        // that looks whole.
        let mut tmp = a.file.clone().into_os_string();
        tmp.push(".partial");
        let tmp = PathBuf::from(tmp);
        let file = std::fs::File::create(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        let mut out = std::io::BufWriter::new(file);
        let stats = tidefs_meta::dump::dump(&*meta, &mut out, &mut show_dump_progress(&bar))
            .inspect_err(|_| {
                let _ = std::fs::remove_file(&tmp);
            })?;
        out.into_inner()
            .map_err(|e| e.into_error())
            .and_then(|f| f.sync_all())
            .and_then(|()| std::fs::rename(&tmp, &a.file))
            .with_context(|| format!("cannot write {}", a.file.display()))?;
        stats
    };
    bar.finish_and_clear();
    let summary = serde_json::to_string_pretty(&stats)?;
    if a.file.as_os_str() == "-" {
        eprintln!("{summary}");
    } else {
        println!("{summary}");
    }
    Ok(())
}

fn load(a: DumpArgs) -> Result<()> {
    let url = parse_url(&a.meta_url)?;
    if let Some(db) = url.local_file() {
        if let Some(dir) = db.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
    }
    let meta = tidefs_meta::open(&url, true)?;
    let mut input: Box<dyn std::io::BufRead> = if a.file.as_os_str() == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        let file = std::fs::File::open(&a.file)
            .with_context(|| format!("cannot open {}", a.file.display()))?;
        Box::new(std::io::BufReader::new(file))
    };
    let bar = spinner();
    let stats = tidefs_meta::dump::load(&*meta, &mut input, &mut show_dump_progress(&bar))?;
    bar.finish_and_clear();
    println!("{}", serde_json::to_string_pretty(&stats)?);
    Ok(())
}

fn spinner() -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new_spinner();
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

/// Where a `--writeback` mount with `cache_dir` (its `--cache-dir`) stages the blocks of
/// volume `format`: in the first cache directory.
fn staging_dir(cache_dir: &str, format: &tidefs_meta::Format) -> PathBuf {
    let first = cache_dir.split(':').next().unwrap_or_default();
    PathBuf::from(first).join(format!("{}-staging", format.uuid))
}

/// A volume opened for a scan of its metadata and bucket (gc, fsck), with a spinner.
struct Scan {
    meta: Arc<dyn tidefs_meta::Meta>,
    format: tidefs_meta::Format,
    store: Arc<dyn tidefs::object::ObjectStore>,
    layout: Layout,
    rt: tokio::runtime::Runtime,
    bar: indicatif::ProgressBar,
}

fn open_scan(meta_url: Option<String>, store: &StoreArgs) -> Result<Scan> {
    let (meta, format) = volume::open_meta(&parse_url(&meta_url_or_default(meta_url))?)?;
    let access = store.access()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start a runtime")?;
    let (store, _) = rt.block_on(volume::open_store(&format, &access))?;
    Ok(Scan {
        meta,
        store,
        layout: Layout::of(&format),
        format,
        rt,
        bar: spinner(),
    })
}

fn gc(a: GcArgs) -> Result<()> {
    let opts = tidefs::gc::GcOptions {
        delete: a.delete,
        grace: Duration::from_secs(a.grace),
    };
    let s = open_scan(a.meta_url, &a.store)?;
    let live = live_sessions(&*s.meta)?;
    if a.delete && !live.is_empty() {
        eprintln!(
            "tidefs: warning: the volume is mounted ({} at {}); objects of writes not committed \
             for --grace seconds (a mount frozen that long) would be deleted",
            live[0].host, live[0].mountpoint
        );
    }
    let mut show = |r: &tidefs::gc::GcReport| {
        s.bar.set_message(format!(
            "{} objects scanned, {} leaked, {} deleted",
            r.objects, r.leaked, r.deleted
        ))
    };
    let report = s.rt.block_on(tidefs::gc::gc(
        &*s.meta, &*s.store, &s.layout, &opts, &mut show,
    ))?;
    s.bar.finish_and_clear();
    println!("{}", serde_json::to_string_pretty(&report)?);
    if report.leaked > 0 && !a.delete {
        eprintln!(
            "tidefs: {} leaked objects ({} bytes); run again with --delete to remove them",
            report.leaked, report.leaked_bytes
        );
    }
    if report.delete_failures > 0 {
        bail!("{} deletes failed; run gc again", report.delete_failures);
    }
    Ok(())
}

fn fsck(a: FsckArgs) -> Result<()> {
    let s = open_scan(a.meta_url, &a.store)?;
    if a.repair {
        // A repair is one write transaction over the whole namespace: on a large volume it
        // would hold a running mount's commits past their timeout.
        if let Some(l) = live_sessions(&*s.meta)?.first() {
            bail!(
                "the volume is mounted at {} on {} (pid {}): unmount it before fsck --repair \
                 (a check without --repair is safe while mounted)",
                l.mountpoint,
                l.host,
                l.pid
            );
        }
    }
    let mut show = |r: &tidefs::fsck::FsckReport| {
        s.bar.set_message(format!(
            "{} objects listed, {} slices checked, {} blocks missing",
            r.objects,
            r.slices,
            r.missing.len()
        ))
    };
    let staged: std::collections::HashSet<String> = match &a.cache_dir {
        Some(cache_dir) => {
            let dir = staging_dir(cache_dir, &s.format);
            tidefs_cache::Staging::keys_in(&dir)
                .with_context(|| format!("cannot list the staging directory {}", dir.display()))?
                .into_iter()
                .collect()
        }
        None => Default::default(),
    };
    let report = s.rt.block_on(tidefs::fsck::fsck(
        &*s.meta, &*s.store, &s.layout, a.repair, &staged, &mut show,
    ))?;
    s.bar.finish_and_clear();
    println!("{}", serde_json::to_string_pretty(&report)?);
    if !report.missing.is_empty() && a.cache_dir.is_none() {
        eprintln!(
            "tidefs: blocks written by a --writeback mount stay on its cache disk until \
             uploaded: if one may hold them, run fsck again with its --cache-dir"
        );
    }
    if report.is_broken() {
        bail!(
            "{} namespace problems left, {} blocks missing, {} blocks of the wrong size",
            report.namespace_unrepaired,
            report.missing.len(),
            report.wrong_size.len()
        );
    }
    Ok(())
}

fn config(a: ConfigArgs) -> Result<()> {
    let (meta, mut format) = volume::open_meta(&parse_url(&a.meta_url)?)?;
    if a.capacity.is_none() && a.inodes.is_none() && a.trash_days.is_none() {
        bail!("nothing to change: give --capacity, --inodes or --trash-days");
    }
    if let Some(gib) = a.capacity {
        format.capacity = gib
            .checked_mul(1 << 30)
            .ok_or_else(|| anyhow!("--capacity {gib} GiB is too large"))?;
    }
    if let Some(n) = a.inodes {
        format.inodes = n;
    }
    if let Some(days) = a.trash_days {
        format.trash_days = days;
    }
    let root = meta.getattr(tidefs_meta::ROOT_INO)?;
    meta.format(&format, root.uid, root.gid)?;
    let now = meta.load_format()?;
    println!(
        "{}",
        serde_json::to_string_pretty(&volume::display_format(&now))?
    );
    Ok(())
}

/// The mount holding `path` and the (parent inode, name) of `path` on it, without following
/// a symlink in the last component.
fn locate_on_mount(path: &Path) -> Result<(PathBuf, u64, Vec<u8>)> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::MetadataExt;
    // `Path` drops a trailing "." ("dir/." names "dir"); rm refuses it, and so does this.
    let raw = path.as_os_str().as_bytes();
    if raw.ends_with(b"/.") || raw.ends_with(b"/..") || raw == b"." || raw == b".." {
        bail!("{}: give a path that names an entry", path.display());
    }
    let name = path
        .file_name()
        .filter(|n| *n != "." && *n != "..")
        .ok_or_else(|| anyhow!("{}: give a path that names an entry", path.display()))?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let parent = std::fs::canonicalize(parent)
        .with_context(|| format!("cannot resolve {}", path.display()))?;
    std::fs::symlink_metadata(parent.join(name))
        .with_context(|| format!("cannot access {}", path.display()))?;
    let mnt = volume::mount_point_of(&parent)
        .filter(|m| volume::is_tidefs_mount(m))
        .ok_or_else(|| anyhow!("{} is not on a tidefs mount", path.display()))?;
    let parent_ino = std::fs::metadata(&parent)?.ino();
    Ok((mnt, parent_ino, name.as_bytes().to_vec()))
}

/// Runs `request` through the control file of `mnt` with a spinner counting `what`.
fn run_control(mnt: &Path, request: &control::Request, what: &str) -> Result<control::Tally> {
    let bar = spinner();
    bar.set_message(format!("0 {what}"));
    let result = control::send(mnt, request, &mut |t| {
        bar.set_message(format!("{} {what}", t.entries));
    });
    bar.finish_and_clear();
    result.map_err(|e| anyhow!(e))
}

fn rmr(a: PathsArgs) -> Result<()> {
    let started = std::time::Instant::now();
    let mut removed = 0;
    for p in &a.paths {
        let (mnt, parent, name) = locate_on_mount(p)?;
        let request = control::Request::Rmr { parent, name };
        let t = run_control(&mnt, &request, "entries removed")
            .with_context(|| format!("cannot remove {}", p.display()))?;
        removed += t.entries;
    }
    let out = serde_json::json!({
        "removed": removed,
        "seconds": (started.elapsed().as_secs_f64() * 1000.0).round() / 1000.0,
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

fn compact(a: PathsArgs) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let started = std::time::Instant::now();
    let mut total = control::Tally::default();
    for p in &a.paths {
        let abs =
            std::fs::canonicalize(p).with_context(|| format!("cannot compact {}", p.display()))?;
        let mnt = volume::mount_point_of(&abs)
            .filter(|m| volume::is_tidefs_mount(m))
            .ok_or_else(|| anyhow!("{} is not on a tidefs mount", p.display()))?;
        let ino = std::fs::metadata(&abs)?.ino();
        let t = run_control(&mnt, &control::Request::Compact { ino }, "files compacted")
            .with_context(|| format!("cannot compact {}", p.display()))?;
        total.entries += t.entries;
        total.slices += t.slices;
        total.bytes += t.bytes;
    }
    let out = serde_json::json!({
        "files": total.entries,
        "slices_replaced": total.slices,
        "bytes_rewritten": total.bytes,
        "seconds": (started.elapsed().as_secs_f64() * 1000.0).round() / 1000.0,
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

fn warmup(a: WarmupArgs) -> Result<()> {
    for p in &a.paths {
        let abs =
            std::fs::canonicalize(p).with_context(|| format!("cannot warm up {}", p.display()))?;
        let on_tidefs = volume::mount_point_of(&abs).is_some_and(|m| volume::is_tidefs_mount(&m));
        if !on_tidefs {
            bail!("{} is not on a tidefs mount", p.display());
        }
    }
    let (files, unreadable) = tidefs::warmup::files_under(&a.paths);
    let total: u64 = files.iter().map(|(_, len)| len).sum();
    let bar = indicatif::ProgressBar::new(total);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    ) {
        bar.set_style(style);
    }
    let started = std::time::Instant::now();
    let mut report = tidefs::warmup::warm(&files, a.threads, &|n| bar.set_position(n));
    bar.finish_and_clear();
    report.errors.extend(unreadable);
    let secs = started.elapsed().as_secs_f64();
    let out = serde_json::json!({
        "files": report.files,
        "bytes": report.bytes,
        "seconds": (secs * 1000.0).round() / 1000.0,
        "mib_per_second": (report.bytes as f64 / (1 << 20) as f64 / secs.max(1e-9)).round(),
        "errors": report.errors,
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    if !report.errors.is_empty() {
        bail!("{} paths could not be read", report.errors.len());
    }
    Ok(())
}

fn status(a: StatusArgs) -> Result<()> {
    let url = meta_url_or_default(a.meta_url);
    let (meta, format) = volume::open_meta(&parse_url(&url)?)?;
    let usage = meta.usage()?;
    let sessions = meta.sessions()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start a runtime")?;
    let host = session::hostname();
    let sessions: Vec<serde_json::Value> = sessions
        .into_iter()
        .map(|s| {
            let stats = session_stats(&rt, &s, &host);
            let mut v = serde_json::to_value(&s).expect("sessions serialize");
            if let Some(stats) = stats {
                v["stats"] = stats;
            }
            v
        })
        .collect();
    let out = serde_json::json!({
        "setting": volume::display_format(&format),
        "engine": meta.engine(),
        "usage": { "space_bytes": usage.space, "inodes": usage.inodes },
        "sessions": sessions,
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

/// The live numbers of a mount, asked of its metrics endpoint; None when it has none or it is
/// on another host behind a loopback address.
fn session_stats(
    rt: &tokio::runtime::Runtime,
    s: &SessionInfo,
    host: &str,
) -> Option<serde_json::Value> {
    let addr: std::net::SocketAddr = s.metrics.parse().ok()?;
    let local_only = addr.ip().is_loopback() || addr.ip().is_unspecified();
    if local_only && s.host != host {
        return None;
    }
    let fetched = rt.block_on(tidefs::exporter::fetch(
        &s.metrics,
        "/stats",
        Duration::from_secs(2),
    ));
    Some(
        match fetched.and_then(|t| serde_json::from_str(&t).map_err(|e| e.to_string())) {
            Ok(v) => v,
            Err(e) => {
                serde_json::json!({ "error": format!("metrics endpoint {}: {e}", s.metrics) })
            }
        },
    )
}

fn objbench(a: ObjbenchArgs) -> Result<()> {
    let s3 = ["s3://", "http://", "https://"]
        .iter()
        .any(|p| a.bucket.starts_with(p));
    let format = tidefs_meta::Format {
        name: "objbench".into(),
        uuid: String::new(),
        storage: if s3 { "s3" } else { "file" }.into(),
        bucket: a.bucket.trim_start_matches("file://").to_string(),
        block_size: (a.block_size << 10) as u32,
        trash_days: 0,
        capacity: 0,
        inodes: 0,
        shards: 0,
        access_key: String::new(),
        secret_key: String::new(),
    };
    let access = a.store.access()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start a runtime")?;
    let opts = tidefs::objbench::BenchOptions {
        concurrency: a.threads,
        small_count: a.small_objects,
        small_size: a.small_size << 10,
        big_count: a.big_objects,
        big_size: a.block_size << 10,
        cold_gets: a.drop_caches,
    };
    if a.drop_caches {
        // Fail before any object is written, not between the PUTs and the GETs.
        std::fs::OpenOptions::new()
            .write(true)
            .open("/proc/sys/vm/drop_caches")
            .context("--drop-caches needs root: cannot write /proc/sys/vm/drop_caches")?;
    }
    let rows = rt.block_on(async {
        let (store, _) = volume::open_store(&format, &access).await?;
        println!("object store: {}", store.describe());
        tidefs::objbench::run(&*store, &opts)
            .await
            .map_err(anyhow::Error::from)
    })?;
    print!("{}", tidefs::objbench::table(&rows));
    Ok(())
}
