//! Asks the kernel to read a model's files into the page cache in one go, so a cold start (files not yet cached, as
//! on a fresh Lambda instance) streams them from disk instead of faulting the mapped weights in page by page during
//! the first runs.

use std::path::Path;

/// Starts reading `names` (in `dir`) into the page cache and returns without waiting; a file that cannot be opened is
/// skipped (loading reports it).
pub fn start<'a>(dir: &Path, names: impl IntoIterator<Item = &'a str>) {
    for name in names {
        if let Ok(file) = std::fs::File::open(dir.join(name)) {
            advise(&file);
        }
    }
}

/// Bytes per request: Linux caps one `WILLNEED` request (8 MiB of a 16 MiB file were read in one), so a file is
/// asked for in pieces.
#[cfg(target_os = "linux")]
const PIECE: u64 = 2 << 20;

#[cfg(target_os = "linux")]
fn advise(file: &std::fs::File) {
    use std::os::fd::AsRawFd;
    let len = file.metadata().map_or(0, |m| m.len());
    for offset in (0..len).step_by(PIECE as usize) {
        // SAFETY: a valid descriptor; the advice changes no memory of ours. A failure only loses the hint.
        unsafe {
            libc::posix_fadvise(
                file.as_raw_fd(),
                offset as libc::off_t,
                PIECE as libc::off_t,
                libc::POSIX_FADV_WILLNEED,
            )
        };
    }
}

#[cfg(not(target_os = "linux"))]
fn advise(_file: &std::fs::File) {}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use std::time::{Duration, Instant};

    /// Pages of `file` in the page cache, out of all its pages (`mincore` over a read-only mapping).
    fn resident(file: &std::fs::File, len: usize) -> (usize, usize) {
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let pages = len.div_ceil(page);
        let mut vec = vec![0u8; pages];
        // SAFETY: a fresh shared read-only mapping of the whole file, unmapped below; `vec` holds one byte per page.
        unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            );
            assert_ne!(p, libc::MAP_FAILED);
            assert_eq!(libc::mincore(p, len, vec.as_mut_ptr()), 0);
            libc::munmap(p, len);
        }
        (vec.iter().filter(|&&b| b & 1 == 1).count(), pages)
    }

    #[test]
    fn a_file_out_of_the_page_cache_is_read_back_in() {
        // Beside the test binary: the target directory is on a disk, where the page cache can drop a file (on a
        // tmpfs /tmp it could not).
        let exe = std::env::current_exe().unwrap();
        let dir = exe.with_file_name(format!("readahead-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let len = 16 << 20;
        let path = dir.join("weights.bin");
        let mut w = std::fs::File::create(&path).unwrap();
        w.write_all(&vec![7u8; len]).unwrap();
        w.sync_all().unwrap();
        let f = std::fs::File::open(&path).unwrap();
        // Clean pages of a synced file leave the page cache on DONTNEED.
        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        let before = resident(&f, len);
        start(&dir, ["weights.bin", "missing.bin"]);
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut after = resident(&f, len);
        while after.0 < after.1 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
            after = resident(&f, len);
        }
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(
            before.0 < before.1 / 2,
            "the file should have left the page cache first: {before:?}"
        );
        assert_eq!(after.0, after.1, "pages resident after the readahead: {after:?}");
    }
}
