//! Open directories: a listing read a page at a time, that survives concurrent change.
//!
//! The kernel reads a directory in calls of a few KiB, each from an offset: the `d_off` of
//! the last entry it took, or an offset user space kept (`telldir`/`seekdir`), or 0
//! (`rewinddir`). Offsets here are positions in this handle's listing ("." is 1, ".." is 2,
//! then names in order), and the handle keeps the name at every offset it handed out. A
//! read from an offset continues *after that name* — a cursor, never a count — so entries
//! created or removed meanwhile, on this mount or any other, never shift the rest: every
//! entry that exists for the whole listing is returned exactly once, as POSIX readdir
//! requires (one created or removed meanwhile may or may not be).
//!
//! Three things end a listing early if done the obvious way, and are done otherwise here:
//! - A page shorter than asked for is not the last page; only the metadata's
//!   [`DirPage::end`] is.
//! - An entry whose inode vanished between reading the entry and its attributes (it is
//!   being removed) is left out of a READDIRPLUS reply, as if removed before the listing
//!   reached it; the listing goes on after it. A reply is never empty unless the listing
//!   is complete (the kernel takes an empty reply as the end), so a stretch of vanished
//!   entries is read past, page after page.
//! - With READDIRPLUS_AUTO the kernel mixes plain and "plus" calls on one handle. A page
//!   read without attributes is read again, with them, from the offset a plus call asks
//!   for (the entries after it have not reached user space yet, so their offsets may be
//!   assigned anew).
//!
//! Memory: one page of entries, plus every name handed out (for `seekdir` back to any of
//! them), in one buffer: a few tens of bytes an entry.

use crate::{Handle, Result, Vfs};
use aquifer_meta::*;
use parking_lot::Mutex;

/// Entries of a directory read from the metadata at a time.
pub(crate) const DIR_PAGE: usize = 1024;

/// Entries handed to one readdir call at most: more than a kernel readdir buffer ever
/// takes; the rest is asked for again.
const REPLY_MAX: usize = 512;

/// The names of a listing by offset, in one buffer.
#[derive(Default)]
struct Names {
    bytes: Vec<u8>,
    /// `ends[i]`: the end in `bytes` of the name at offset `i + 1`.
    ends: Vec<usize>,
}

impl Names {
    fn len(&self) -> u64 {
        self.ends.len() as u64
    }

    /// The name at `offset` (1 or more, at most [`Names::len`]).
    fn get(&self, offset: u64) -> &[u8] {
        let i = (offset - 1) as usize;
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        &self.bytes[start..self.ends[i]]
    }

    /// Keep the names at offsets `1..=n`.
    fn truncate(&mut self, n: u64) {
        let n = n as usize;
        if n < self.ends.len() {
            self.bytes
                .truncate(if n == 0 { 0 } else { self.ends[n - 1] });
            self.ends.truncate(n);
        }
    }

    fn push(&mut self, name: &[u8]) {
        self.bytes.extend_from_slice(name);
        self.ends.push(self.bytes.len());
    }
}

/// Where a page starts: the beginning ("." and "..", then the first names) or after a name.
pub(crate) enum Cursor<'a> {
    Start,
    After(&'a [u8]),
}

/// The listing of one open directory.
#[derive(Default)]
pub(crate) struct Listing {
    names: Names,
    /// The offset just before `entries[0]`: entry `i` has offset `base + i + 1`.
    base: u64,
    entries: Vec<DirEntry>,
    /// The page was read with attributes.
    plus: bool,
    /// The metadata has no entries after this page.
    end: bool,
    started: bool,
}

impl Listing {
    /// Entries from `offset` on, each with its own offset (the one to resume after it); with
    /// attributes when `plus`. Empty only at the end of the directory. `fetch` reads a page
    /// from the metadata: from the start (with "." and "..") or after a name.
    pub(crate) fn read(
        &mut self,
        offset: u64,
        plus: bool,
        mut fetch: impl FnMut(Cursor<'_>, bool) -> Result<DirPage>,
    ) -> Result<Vec<(u64, DirEntry)>> {
        let mut offset = offset;
        let in_page = self.started
            && offset != 0
            && offset >= self.base
            && offset <= self.base + self.entries.len() as u64
            && (self.plus || !plus);
        if !in_page && !self.load(offset, plus, &mut fetch)? {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        loop {
            let skip = (offset - self.base) as usize;
            for (i, e) in self.entries.iter().enumerate().skip(skip) {
                if plus && e.attr.is_none() {
                    // Removed while the page was read: left out, the listing goes on.
                    continue;
                }
                out.push((self.base + i as u64 + 1, e.clone()));
                if out.len() >= REPLY_MAX {
                    break;
                }
            }
            if !out.is_empty() || self.end {
                return Ok(out);
            }
            offset = self.base + self.entries.len() as u64;
            self.load(offset, plus, &mut fetch)?;
        }
    }

    /// Read the page that follows `offset` (the entry at that offset, 0: the start). False
    /// when `offset` was never handed out (past the end).
    fn load(
        &mut self,
        offset: u64,
        plus: bool,
        fetch: &mut impl FnMut(Cursor<'_>, bool) -> Result<DirPage>,
    ) -> Result<bool> {
        let (page, base) = if offset <= 2 || !self.started {
            // "." and ".." are not names in the directory: from them, start over (and
            // from anywhere on a handle that never read: offsets of another open).
            (fetch(Cursor::Start, plus)?, 0)
        } else if offset <= self.names.len() {
            (fetch(Cursor::After(self.names.get(offset)), plus)?, offset)
        } else {
            return Ok(false);
        };
        let mut page = page;
        if page.entries.len() <= if base == 0 { 2 } else { 0 } {
            // Nothing after the cursor: the end, whatever the metadata said (asking again
            // would only get the same).
            page.end = true;
        }
        self.names.truncate(base);
        for e in &page.entries {
            self.names.push(&e.name);
        }
        *self = Listing {
            names: std::mem::take(&mut self.names),
            base,
            entries: page.entries,
            plus,
            end: page.end,
            started: true,
        };
        Ok(true)
    }

    /// Entries of the page held (bounded by [`DIR_PAGE`] and the two dots).
    #[cfg(test)]
    pub(crate) fn held(&self) -> usize {
        self.entries.len()
    }
}

/// One open directory, listed a page at a time from a cursor ([`dir`]).
pub(crate) struct DirHandle {
    pub(crate) ino: Ino,
    pub(crate) listing: Mutex<Listing>,
}

impl Vfs {
    /// fsync(2) of a directory: the names created, removed and renamed in it so far
    /// survive a power cut (the metadata engine's sync).
    pub fn fsyncdir(&self) -> Result<()> {
        Ok(self.meta.sync()?)
    }

    pub fn opendir(&self, ctx: &Context, ino: Ino) -> Result<u64> {
        let a = self.meta.getattr(ino)?;
        if !a.is_dir() {
            return Err(Errno::ENOTDIR);
        }
        if ctx.check_permission {
            self.meta.access(ctx, ino, MODE_R)?;
        }
        Ok(self.add_handle(Handle::Dir(DirHandle {
            ino,
            listing: Mutex::new(Listing::default()),
        })))
    }

    /// Entries from `offset` on; each entry's offset is the one to resume after it.
    /// "." and ".." come first. Empty only at the end of the directory; with `plus`, every
    /// entry has its attributes (see [`dir`] for what a listing guarantees).
    pub fn readdir(
        &self,
        ctx: &Context,
        fh: u64,
        offset: u64,
        plus: bool,
    ) -> Result<Vec<(u64, DirEntry)>> {
        let h = self.handle(fh)?;
        let Handle::Dir(d) = &*h else {
            return Err(Errno::ENOTDIR);
        };
        let mut listing = d.listing.lock();
        listing.read(offset, plus, |from, plus| match from {
            Cursor::Start => self.first_dir_page(ctx, d.ino, plus),
            Cursor::After(name) => self.dir_page(ctx, d.ino, name, plus),
        })
    }

    /// "." and "..", then the first page of names.
    fn first_dir_page(&self, ctx: &Context, ino: Ino, plus: bool) -> Result<DirPage> {
        let a = self.meta.getattr(ino)?;
        let parent = if ino == ROOT_INO || a.parent == 0 {
            ROOT_INO
        } else {
            a.parent
        };
        let mut entries = vec![
            DirEntry {
                name: b".".to_vec(),
                ino,
                typ: FileType::Directory,
                attr: plus.then(|| a.clone()),
            },
            DirEntry {
                name: b"..".to_vec(),
                ino: parent,
                typ: FileType::Directory,
                // The parent may be gone already (a removed directory): show our own.
                attr: plus.then(|| self.meta.getattr(parent).unwrap_or_else(|_| a.clone())),
            },
        ];
        let names = self.dir_page(ctx, ino, b"", plus)?;
        entries.extend(names.entries);
        Ok(DirPage {
            entries,
            end: names.end,
        })
    }

    fn dir_page(&self, ctx: &Context, ino: Ino, after: &[u8], plus: bool) -> Result<DirPage> {
        let mut page = self.meta.readdir_page(ctx, ino, after, DIR_PAGE, plus)?;
        if plus {
            for e in page.entries.iter_mut() {
                if let Some(a) = e.attr.take() {
                    // May under-report a file growing right now; the next getattr corrects it.
                    e.attr = Some(Self::view(a, self.pending_end(e.ino)));
                }
            }
        }
        Ok(page)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aquifer_meta::{Attr, FileType};
    use std::collections::BTreeMap;

    /// A directory whose entries the test changes between reads, paged like the metadata
    /// (`limit` a page), optionally with some inodes' attributes gone.
    struct Dir {
        names: BTreeMap<Vec<u8>, bool>,
        limit: usize,
    }

    impl Dir {
        fn new(n: usize, limit: usize) -> Dir {
            Dir {
                names: (0..n)
                    .map(|i| (format!("f{i:05}").into_bytes(), true))
                    .collect(),
                limit,
            }
        }

        fn fetch(&self, from: Cursor<'_>, plus: bool) -> Result<DirPage> {
            let entry = |name: &[u8], has_attr: bool| DirEntry {
                name: name.to_vec(),
                ino: 7,
                typ: FileType::File,
                attr: (plus && has_attr).then(|| Attr::new(FileType::File, 0o644, 0, 0)),
            };
            let mut entries = Vec::new();
            let it: Box<dyn Iterator<Item = (&Vec<u8>, &bool)>> =
                match from {
                    Cursor::Start => {
                        entries.push(entry(b".", true));
                        entries.push(entry(b"..", true));
                        Box::new(self.names.iter())
                    }
                    Cursor::After(a) => Box::new(self.names.range::<[u8], _>((
                        std::ops::Bound::Excluded(a),
                        std::ops::Bound::Unbounded,
                    ))),
                };
            let mut end = true;
            for (n, (k, &has)) in it.enumerate() {
                if n == self.limit {
                    end = false;
                    break;
                }
                entries.push(entry(k, has));
            }
            Ok(DirPage { entries, end })
        }
    }

    /// Read the whole listing as the kernel does, taking `take` entries a call.
    fn list_all(
        l: &mut Listing,
        d: &mut Dir,
        plus: impl Fn(usize) -> bool,
        take: usize,
        mut between: impl FnMut(&mut Dir, usize),
    ) -> Vec<Vec<u8>> {
        let mut got = Vec::new();
        let mut off = 0;
        for call in 0.. {
            assert!(call < 100_000, "the listing never ended");
            let page = l.read(off, plus(call), |f, p| d.fetch(f, p)).unwrap();
            if page.is_empty() {
                break;
            }
            for (o, e) in page.into_iter().take(take) {
                got.push(e.name);
                off = o;
            }
            between(d, call);
        }
        got
    }

    #[test]
    fn short_pages_and_vanished_attributes_do_not_end_a_listing() {
        let mut d = Dir::new(300, 50);
        // A whole page and more of entries whose inodes are gone (removed right now).
        for i in 100..180 {
            d.names.insert(format!("f{i:05}").into_bytes(), false);
        }
        let mut l = Listing::default();
        let got = list_all(&mut l, &mut d, |_| true, 7, |_, _| {});
        let want: Vec<Vec<u8>> = [b".".to_vec(), b"..".to_vec()]
            .into_iter()
            .chain(
                (0..300)
                    .filter(|i| !(100..180).contains(i))
                    .map(|i| format!("f{i:05}").into_bytes()),
            )
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn mixed_plain_and_plus_calls_list_every_entry_with_attributes() {
        let d = Dir::new(200, 32);
        let mut l = Listing::default();
        // Plain calls read pages without attributes; a plus call then reads them again.
        let mut off = 0;
        let mut got = Vec::new();
        for call in 0.. {
            let plus = call % 3 == 0;
            let page = l.read(off, plus, |f, p| d.fetch(f, p)).unwrap();
            if page.is_empty() {
                break;
            }
            for (o, e) in page.into_iter().take(5) {
                assert!(!plus || e.attr.is_some());
                got.push(e.name);
                off = o;
            }
        }
        assert_eq!(got.len(), 202);
        assert!(got[2..].windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn every_entry_that_stays_is_listed_once_under_changes() {
        let mut d = Dir::new(1000, 64);
        let mut removed = std::collections::HashSet::new();
        let mut l = Listing::default();
        let got = list_all(
            &mut l,
            &mut d,
            |c| c % 2 == 0,
            10,
            |d, call| {
                // Remove ahead of, at and behind the cursor; create everywhere.
                for j in 0..7 {
                    let victim = format!("f{:05}", (call * 37 + j * 131) % 1000).into_bytes();
                    if d.names.remove(&victim).is_some() {
                        removed.insert(victim);
                    }
                }
                d.names.insert(
                    format!("f{:05}-new{call}", (call * 53) % 1000).into_bytes(),
                    true,
                );
            },
        );
        let mut seen = std::collections::HashSet::new();
        for n in &got {
            assert!(
                seen.insert(n.clone()),
                "{} listed twice",
                String::from_utf8_lossy(n)
            );
        }
        for i in 0..1000 {
            let n = format!("f{i:05}").into_bytes();
            assert!(
                removed.contains(&n) || seen.contains(&n),
                "f{i:05} never listed"
            );
        }
    }

    #[test]
    fn seekdir_returns_to_the_same_name_and_rewinddir_starts_over() {
        let mut d = Dir::new(100, 16);
        let mut l = Listing::default();
        let first = l.read(0, false, |f, p| d.fetch(f, p)).unwrap();
        assert_eq!(first.len(), 18);
        let (mark, _) = first[10].clone();
        let after_mark = first[11].1.name.clone();
        // Read on to a later page, change the directory, seek back.
        let second = l.read(18, false, |f, p| d.fetch(f, p)).unwrap();
        assert_eq!(second[0].0, 19);
        let third = l.read(34, false, |f, p| d.fetch(f, p)).unwrap();
        assert_eq!(third[0].1.name, b"f00032");
        d.names.remove(&first[5].1.name);
        d.names.insert(b"a-first".to_vec(), true);
        let back = l.read(mark, false, |f, p| d.fetch(f, p)).unwrap();
        assert_eq!(back[0].1.name, after_mark);
        let again = l.read(0, false, |f, p| d.fetch(f, p)).unwrap();
        assert_eq!(again[0].1.name, b".");
        assert_eq!(again[2].1.name, b"a-first");
        // An offset never handed out is the end.
        assert!(l
            .read(1 << 40, false, |f, p| d.fetch(f, p))
            .unwrap()
            .is_empty());
    }
}
