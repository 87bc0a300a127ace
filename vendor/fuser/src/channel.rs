use std::io;
use std::os::fd::AsFd;
use std::os::fd::BorrowedFd;
use std::sync::Arc;

use nix::errno::Errno;

use crate::dev_fuse::DevFuse;
use crate::passthrough::BackingId;

/// A raw communication channel to the FUSE kernel driver
#[derive(Debug, Clone)]
pub(crate) struct Channel(Arc<DevFuse>);

impl AsFd for Channel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl Channel {
    /// Create a new communication channel to the kernel driver by mounting the
    /// given path. The kernel driver will delegate filesystem operations of
    /// the given path to the channel.
    pub(crate) fn new(device: Arc<DevFuse>) -> Self {
        Self(device)
    }

    /// Receives data up to the capacity of the given buffer (can block).
    fn receive(&self, buffer: &mut [u8]) -> nix::Result<usize> {
        nix::unistd::read(&self.0, buffer)
    }

    /// Receives data up to the capacity of the given buffer (can block),
    /// retrying on errors that are safe to retry (ENOENT, EINTR, EAGAIN).
    ///
    /// - ENOENT: Operation interrupted. According to FUSE, this is safe to retry.
    /// - EINTR: Interrupted system call, retry.
    /// - EAGAIN: Explicitly instructed to try again.
    pub(crate) fn receive_retrying(&self, buffer: &mut [u8]) -> nix::Result<usize> {
        loop {
            match self.receive(buffer) {
                Ok(size) => return Ok(size),
                Err(Errno::ENOENT | Errno::EINTR | Errno::EAGAIN) => continue,
                Err(err) => return Err(err),
            }
        }
    }

    /// Returns a sender object for this channel. The sender object can be
    /// used to send to the channel. Multiple sender objects can be used
    /// and they can safely be sent to other threads.
    pub(crate) fn sender(&self) -> ChannelSender {
        // Since write/writev syscalls are threadsafe, we can simply create
        // a sender by using the same file and use it in other threads.
        ChannelSender(self.0.clone())
    }

    /// Clone the FUSE device fd using FUSE_DEV_IOC_CLONE ioctl.
    ///
    /// This creates a new fd that can read FUSE requests independently,
    /// enabling true parallel request processing. The kernel distributes
    /// requests across all cloned fds.
    ///
    /// Requires Linux 4.5+. Returns an error on older kernels or non-Linux.
    #[cfg(target_os = "linux")]
    pub(crate) fn clone_fd(&self) -> io::Result<Channel> {
        use std::os::fd::AsRawFd;

        let new_dev = DevFuse::open()?;

        let mut source_fd = self.0.as_raw_fd() as u32;
        // SAFETY: fuse_dev_ioc_clone is a valid ioctl for /dev/fuse
        unsafe {
            crate::ll::ioctl::fuse_dev_ioc_clone(new_dev.as_raw_fd(), &mut source_fd)?;
        }

        Ok(Channel::new(Arc::new(new_dev)))
    }
}

#[derive(Clone, Debug)]
pub(crate) struct ChannelSender(Arc<DevFuse>);

impl ChannelSender {
    pub(crate) fn send(&self, bufs: &[io::IoSlice<'_>]) -> io::Result<()> {
        let rc = nix::sys::uio::writev(&self.0, bufs)?;
        // writev is atomic, so do not need to check how many bytes are written.
        // libfuse does not do it either
        // https://github.com/libfuse/libfuse/blob/6278995cca991978abd25ebb2c20ebd3fc9e8a13/lib/fuse_lowlevel.c#L267
        debug_assert_eq!(bufs.iter().map(|b| b.len()).sum::<usize>(), rc);
        Ok(())
    }

    /// Sends a reply made of `header` and `len` bytes of `file` from `offset`, moving the
    /// file's pages through a pipe of this thread's with splice(2) instead of copying them
    /// through user memory. On `Err(NotSent)` nothing reached the kernel and the request
    /// still needs a reply.
    pub(crate) fn splice(
        &self,
        header: &[u8],
        file: BorrowedFd<'_>,
        offset: u64,
        len: usize,
    ) -> Result<(), SpliceError> {
        splice::send(&self.0, header, file, offset, len)
    }

    pub(crate) fn open_backing(&self, fd: BorrowedFd<'_>) -> std::io::Result<BackingId> {
        BackingId::create(&self.0, fd)
    }

    pub(crate) unsafe fn wrap_backing(&self, id: u32) -> BackingId {
        unsafe { BackingId::wrap_raw(&self.0, id) }
    }
}

/// Why a spliced reply failed.
#[derive(Debug)]
pub(crate) enum SpliceError {
    /// The request may still need a reply: nothing reached the kernel, or the kernel refused
    /// the reply for another reason than not knowing the request.
    NotSent(io::Error),
    /// The kernel no longer knows the request (ENOENT: interrupted or aborted).
    Sent(io::Error),
}

/// Replies spliced from a file: the header is written into a pipe, the file's pages are
/// spliced in after it, and the pipe is spliced into `/dev/fuse` in one call (the kernel
/// takes a reply only whole). Each request loop thread keeps a pipe of its own. A pipe that
/// held part of a reply when something failed is dropped, so no stale bytes can precede the
/// next reply; one that could not grow is kept (it is empty).
mod splice {
    use std::cell::RefCell;
    use std::io;
    use std::os::fd::AsRawFd;
    use std::os::fd::BorrowedFd;
    use std::os::fd::FromRawFd;
    use std::os::fd::OwnedFd;

    use super::SpliceError;
    use crate::dev_fuse::DevFuse;

    struct Pipe {
        read: OwnedFd,
        write: OwnedFd,
        /// Bytes the pipe holds (in pages, each taking one of its slots at most).
        capacity: usize,
    }

    impl Pipe {
        fn new() -> io::Result<Pipe> {
            let mut fds = [0; 2];
            // Non-blocking: a pipe too small for a reply fails the splice instead of
            // blocking the thread for good.
            // SAFETY: pipe2 writes two descriptors into the array.
            if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0
            {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: both descriptors were just made and are owned by nothing else.
            let (read, write) =
                unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
            // SAFETY: fcntl on a descriptor owned here.
            let capacity = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_GETPIPE_SZ) };
            Ok(Pipe {
                read,
                write,
                capacity: capacity.max(0) as usize,
            })
        }

        /// Makes room for `slots` pieces of up to a page each. Above
        /// `/proc/sys/fs/pipe-max-size` (1 MiB by default) this needs CAP_SYS_RESOURCE.
        fn reserve(&mut self, slots: usize) -> io::Result<()> {
            let want = slots * page_size::get();
            if self.capacity >= want {
                return Ok(());
            }
            let size = want.next_power_of_two() as libc::c_int;
            // SAFETY: fcntl on a descriptor owned here.
            let got = unsafe { libc::fcntl(self.write.as_raw_fd(), libc::F_SETPIPE_SZ, size) };
            if got < 0 {
                return Err(io::Error::last_os_error());
            }
            self.capacity = got as usize;
            Ok(())
        }
    }

    thread_local! {
        static PIPE: RefCell<Option<Pipe>> = const { RefCell::new(None) };
    }

    pub(super) fn send(
        dev: &DevFuse,
        header: &[u8],
        file: BorrowedFd<'_>,
        offset: u64,
        len: usize,
    ) -> Result<(), SpliceError> {
        let not_sent = SpliceError::NotSent;
        let mut pipe = match PIPE.with(|p| p.borrow_mut().take()) {
            Some(p) => p,
            None => Pipe::new().map_err(not_sent)?,
        };
        // The header takes a slot, and each page the data touches one more.
        let page = page_size::get();
        let slots = 1 + (offset as usize % page + len).div_ceil(page);
        if let Err(e) = pipe.reserve(slots) {
            PIPE.with(|p| *p.borrow_mut() = Some(pipe));
            return Err(not_sent(e));
        }
        // SAFETY: `header` is valid for `header.len()` bytes of reading.
        let written = unsafe {
            libc::write(
                pipe.write.as_raw_fd(),
                header.as_ptr().cast(),
                header.len(),
            )
        };
        if written != header.len() as isize {
            return Err(not_sent(short_or_errno(written)));
        }
        let mut at = offset as libc::loff_t;
        let mut left = len;
        while left > 0 {
            // SAFETY: descriptors borrowed or owned here; `at` outlives the call.
            let n = unsafe {
                libc::splice(
                    file.as_raw_fd(),
                    &mut at,
                    pipe.write.as_raw_fd(),
                    std::ptr::null_mut(),
                    left,
                    libc::SPLICE_F_NONBLOCK,
                )
            };
            if n <= 0 {
                if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(not_sent(short_or_errno(n)));
            }
            left -= n as usize;
        }
        let total = header.len() + len;
        // SAFETY: descriptors borrowed or owned here; no memory is passed.
        let sent = unsafe {
            libc::splice(
                pipe.read.as_raw_fd(),
                std::ptr::null_mut(),
                dev.as_raw_fd(),
                std::ptr::null_mut(),
                total,
                0,
            )
        };
        if sent != total as isize {
            let e = short_or_errno(sent);
            // ENOENT: the kernel took the reply but no longer knows the request. Anything
            // else (ENOMEM before it read the pipe, EINVAL) may leave the request waiting:
            // the caller answers it another way, and a second answer to a request that was
            // in fact completed only gets ENOENT.
            return Err(if e.raw_os_error() == Some(libc::ENOENT) {
                SpliceError::Sent(e)
            } else {
                SpliceError::NotSent(e)
            });
        }
        PIPE.with(|p| *p.borrow_mut() = Some(pipe));
        Ok(())
    }

    /// The error of a call that returned `n`: errno if negative, else "ended early".
    fn short_or_errno(n: isize) -> io::Error {
        if n < 0 {
            io::Error::last_os_error()
        } else {
            io::Error::new(io::ErrorKind::UnexpectedEof, "fewer bytes than expected")
        }
    }
}
