//! Memory for weights repacked ([`super::Interleaved`]) or copied off a mapped file
//! ([`super::QMatrix`]'s rows read in their stored layout) by their first product, asked
//! of the OS in 2 MiB pages (transparent huge pages) where it gives them.
//!
//! Decoding streams every weight once per token; with 4 KiB pages that is one TLB walk
//! every 4 KiB, and the hardware prefetchers stop at each page's end. Huge pages make
//! SmolLM2's decode ~10% faster than 4 KiB pages (measured by `bench decode` with and
//! without them). The general heap is kept on 4 KiB pages (see the binary's `main`): there a
//! few live bytes would hold a whole 2 MiB page resident.
//!
//! A model's many small matrices (a few hundred KB each) share regions of [`REGION`]
//! bytes, filled one after another, so the huge pages are full; only the pages written
//! are resident. A region is handed back to the OS when the last buffer in it goes.

use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex};

/// Virtual size of a shared region; buffers larger than half of it get a region of their own.
const REGION: usize = 64 << 20;
/// Where each buffer starts within its region.
const ALIGN: usize = 64;
/// The huge page size the regions are rounded to.
const HUGE: usize = 2 << 20;

/// Element types whose all-zero bytes are a valid value (what a fresh mapping holds).
pub trait Zeroed: Copy + Default + Send + Sync + 'static {}
impl Zeroed for u8 {}
impl Zeroed for u16 {}

/// An anonymous mapping; written only through the disjoint buffers carved from it.
struct Region {
    base: *mut u8,
    len: usize,
    map: memmap2::MmapMut,
}

// SAFETY: the region only hands out disjoint ranges, each owned by one `PageVec`.
unsafe impl Send for Region {}
unsafe impl Sync for Region {}

impl Region {
    fn new(len: usize) -> Option<Arc<Self>> {
        let len = len.next_multiple_of(HUGE);
        let mut map = memmap2::MmapMut::map_anon(len).ok()?;
        #[cfg(target_os = "linux")]
        let _ = map.advise(memmap2::Advice::HugePage);
        Some(Arc::new(Self {
            base: map.as_mut_ptr(),
            len,
            map,
        }))
    }

    /// Hand back the pages past the first `used` bytes in the huge page they end in (the
    /// rest of the region was never written): that huge page is then held as 4 KiB pages,
    /// only those written.
    fn release_tail(&self, used: usize) {
        let from = used.next_multiple_of(4096).min(self.len);
        let to = used.next_multiple_of(HUGE).min(self.len);
        if from < to {
            // SAFETY: bytes past `used` belong to no buffer (the region hands out no more
            // once it is here), so nothing reads the zeroes they come back as
            let _ = unsafe {
                self.map
                    .unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, from, to - from)
            };
        }
    }
}

/// The shared region being filled and how many of its bytes are taken.
static OPEN: Mutex<Option<(Arc<Region>, usize)>> = Mutex::new(None);

/// Regions that hand out no more, with the bytes they hold, for [`trim`].
static FILLED: Mutex<Vec<(std::sync::Weak<Region>, usize)>> = Mutex::new(Vec::new());

fn filled(region: &Arc<Region>, used: usize) {
    let mut f = FILLED.lock().unwrap_or_else(|e| e.into_inner());
    f.retain(|(r, _)| r.strong_count() > 0);
    f.push((Arc::downgrade(region), used));
}

/// Close the region being filled and hand back, in every region that hands out no more,
/// the unwritten rest of the huge page its buffers end in. A model's weights end on a
/// partly filled huge page in each region (SmolLM2: 1.9 MiB in all); a loader calls this
/// once every weight is in place. Later buffers take a new region.
pub fn trim() {
    let open = OPEN.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some((region, used)) = open {
        filled(&region, used);
    }
    let all = std::mem::take(&mut *FILLED.lock().unwrap_or_else(|e| e.into_inner()));
    for (region, used) in all {
        if let Some(region) = region.upgrade() {
            region.release_tail(used);
        }
    }
}

/// `len` zeroed values, on huge pages where possible (else on the heap).
pub struct PageVec<T: Zeroed>(Store<T>);

enum Store<T> {
    Mapped {
        _region: Arc<Region>,
        ptr: *mut T,
        len: usize,
    },
    Heap(Vec<T>),
}

// SAFETY: a mapped `PageVec` is the only owner of its range (as a `Vec` owns its buffer).
unsafe impl<T: Zeroed> Send for PageVec<T> {}
unsafe impl<T: Zeroed> Sync for PageVec<T> {}

impl<T: Zeroed> PageVec<T> {
    pub fn zeroed(len: usize) -> Self {
        let bytes = len * size_of::<T>();
        if bytes == 0 {
            return Self(Store::Heap(Vec::new()));
        }
        match Self::carve(bytes) {
            Some((region, at)) => {
                // SAFETY: `at + bytes <= region.len`, the range is handed out once, and
                // `at` is a multiple of ALIGN, a multiple of T's alignment
                let ptr = unsafe { region.base.add(at) }.cast::<T>();
                Self(Store::Mapped {
                    _region: region,
                    ptr,
                    len,
                })
            }
            None => Self(Store::Heap(vec![T::default(); len])),
        }
    }

    /// A region and the offset of `bytes` free bytes in it.
    fn carve(bytes: usize) -> Option<(Arc<Region>, usize)> {
        if bytes > REGION / 2 {
            let region = Region::new(bytes)?;
            filled(&region, bytes);
            return Some((region, 0));
        }
        let mut open = OPEN.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((region, used)) = open.as_mut() {
            let at = used.next_multiple_of(ALIGN);
            if at + bytes <= region.len {
                *used = at + bytes;
                return Some((region.clone(), at));
            }
        }
        let region = Region::new(REGION)?;
        if let Some((full, used)) = open.replace((region.clone(), bytes)) {
            filled(&full, used);
        }
        Some((region, 0))
    }
}

impl<T: Zeroed + std::fmt::Debug> std::fmt::Debug for PageVec<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PageVec({} values)", self.len())
    }
}

impl<T: Zeroed> Default for PageVec<T> {
    fn default() -> Self {
        Self(Store::Heap(Vec::new()))
    }
}

impl<T: Zeroed> Deref for PageVec<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        match &self.0 {
            // SAFETY: `len` values of T at `ptr`, inside a live mapping (zeroed or written)
            Store::Mapped { ptr, len, .. } => unsafe { std::slice::from_raw_parts(*ptr, *len) },
            Store::Heap(v) => v,
        }
    }
}

impl<T: Zeroed> DerefMut for PageVec<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        match &mut self.0 {
            // SAFETY: as in `deref`; `&mut self` makes this the only access to the range
            Store::Mapped { ptr, len, .. } => unsafe { std::slice::from_raw_parts_mut(*ptr, *len) },
            Store::Heap(v) => v,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_zeroed_disjoint_and_outlive_their_region_handle() {
        let mut a = PageVec::<u16>::zeroed(1000);
        let mut b = PageVec::<u8>::zeroed(3);
        let big = PageVec::<u8>::zeroed(REGION / 2 + 1);
        assert!(a.iter().all(|&x| x == 0) && b.iter().all(|&x| x == 0));
        assert!(big.iter().all(|&x| x == 0) && big.len() == REGION / 2 + 1);
        a.iter_mut().enumerate().for_each(|(i, x)| *x = i as u16);
        b.fill(7);
        // a later buffer takes a new range, not one already handed out
        let c = PageVec::<u8>::zeroed(4096);
        assert!(c.iter().all(|&x| x == 0));
        assert!(a.iter().enumerate().all(|(i, &x)| x == i as u16));
        assert_eq!(&*b, &[7, 7, 7]);
        // buffers stay valid when others in their region go, whichever order
        drop(a);
        drop(c);
        assert_eq!(&*b, &[7, 7, 7]);
        assert_eq!(PageVec::<u8>::zeroed(0).len(), 0);
    }

    #[test]
    fn trimming_keeps_every_buffer_and_later_ones_take_a_new_range() {
        // a buffer ending inside a huge page, one of a region of its own, and a small one
        let mut a = PageVec::<u8>::zeroed(3 * HUGE / 2 + 5);
        let mut big = PageVec::<u8>::zeroed(REGION / 2 + 4097);
        a.iter_mut()
            .enumerate()
            .for_each(|(i, x)| *x = (i % 251) as u8 + 1);
        big.iter_mut()
            .enumerate()
            .for_each(|(i, x)| *x = (i % 241) as u8 + 1);
        trim();
        assert!(a.iter().enumerate().all(|(i, &x)| x == (i % 251) as u8 + 1));
        assert!(big
            .iter()
            .enumerate()
            .all(|(i, &x)| x == (i % 241) as u8 + 1));
        let mut c = PageVec::<u8>::zeroed(HUGE);
        assert!(c.iter().all(|&x| x == 0));
        c.fill(9);
        assert!(a.iter().enumerate().all(|(i, &x)| x == (i % 251) as u8 + 1));
        trim();
        assert!(c.iter().all(|&x| x == 9));
    }
}
