//! Anti-replay (RFC 4303 §3.4.3 and Appendix A), with extended sequence
//! numbers (RFC 4303 Appendix A2, RFC 4304).
//!
//! Two phases, so that a forged packet cannot move the window: [`ReplayWindow::check`]
//! runs before the ICV is verified and only infers the full 64-bit sequence
//! number; [`ReplayWindow::commit`] runs after the ICV verified and marks it.
//! The bitmap is fixed-size (no allocation); any window from 1 to
//! [`MAX_WINDOW`] packets works.

/// Largest supported window, in packets.
pub const MAX_WINDOW: u32 = 4096;
/// The window when nothing else is configured (Linux uses 32, strongSwan 32;
/// a larger one costs nothing here and tolerates reordering across queues).
pub const DEFAULT_WINDOW: u32 = 1024;

const WORDS: usize = (MAX_WINDOW / 64) as usize;

/// Why a sequence number is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayError {
    /// Already received.
    Duplicate,
    /// Older than the window's bottom.
    TooOld,
}

/// The receive window of one inbound SA.
#[derive(Clone)]
pub struct ReplayWindow {
    /// Size in packets (1..=MAX_WINDOW); 0 disables the check.
    size: u32,
    /// Highest sequence number authenticated so far (64-bit with ESN).
    top: u64,
    /// Bit i of the ring (word i/64, bit i%64) marks sequence number s with
    /// s % MAX_WINDOW == i, for s in (top - size, top].
    bits: [u64; WORDS],
    esn: bool,
}

impl core::fmt::Debug for ReplayWindow {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("ReplayWindow")
            .field("size", &self.size)
            .field("top", &self.top)
            .field("esn", &self.esn)
            .finish()
    }
}

impl ReplayWindow {
    /// `size` is clamped to [`MAX_WINDOW`]; 0 turns anti-replay off.
    pub fn new(size: u32, esn: bool) -> Self {
        Self {
            size: size.min(MAX_WINDOW),
            top: 0,
            bits: [0; WORDS],
            esn,
        }
    }

    pub fn size(&self) -> u32 {
        self.size
    }

    /// Highest sequence number accepted so far.
    pub fn top(&self) -> u64 {
        self.top
    }

    /// The full sequence number a packet carrying `seq_low` has, inferred per
    /// RFC 4303 Appendix A2.2 when ESN is on (the high half is never sent).
    pub fn infer(&self, seq_low: u32) -> u64 {
        Self::infer_at(self.top, self.size, self.esn, seq_low)
    }

    /// [`ReplayWindow::infer`] for a window of `size` whose top is `top`.
    pub fn infer_at(top: u64, size: u32, esn: bool, seq_low: u32) -> u64 {
        if !esn {
            return u64::from(seq_low);
        }
        let w = u64::from(size.max(1));
        let tl = top as u32;
        let th = (top >> 32) as u32;
        let seq = u64::from(seq_low);
        // Bottom of the window, in the same 32-bit space.
        let bottom = tl.wrapping_sub((w - 1) as u32);
        let hi = if u64::from(tl) >= w - 1 {
            // Case A: the window lies within one 2^32 block.
            if seq_low >= bottom {
                th
            } else {
                th.wrapping_add(1)
            }
        } else {
            // Case B: the window spans two blocks (none before the first).
            if seq_low >= bottom && th > 0 {
                th - 1
            } else {
                th
            }
        };
        (u64::from(hi) << 32) | seq
    }

    /// The check of [`ReplayWindow::check`] that needs only the top (read
    /// without the window's lock by threads sharing it): `Some` full
    /// sequence number when the packet is ahead of `top` (or the window is
    /// off), `None` when the window itself must be looked at. A `top` that
    /// is already behind can only let a packet on to the commit, which
    /// decides under the lock.
    pub fn ahead_of(top: u64, size: u32, esn: bool, seq_low: u32) -> Option<u64> {
        let size = size.min(MAX_WINDOW);
        let seq = Self::infer_at(top, size, esn, seq_low);
        (size == 0 || (seq != 0 && seq > top)).then_some(seq)
    }

    /// Whether a packet with `seq_low` may be accepted; returns its full
    /// sequence number. Changes nothing.
    pub fn check(&self, seq_low: u32) -> Result<u64, ReplayError> {
        let seq = self.infer(seq_low);
        if self.size == 0 {
            return Ok(seq);
        }
        // Sequence number 0 is never sent (RFC 4303 §2.2); with ESN, the
        // inferred value 0 means "below the first block".
        if seq == 0 {
            return Err(ReplayError::TooOld);
        }
        if seq > self.top {
            return Ok(seq);
        }
        if self.top - seq >= u64::from(self.size) {
            return Err(ReplayError::TooOld);
        }
        if self.bit(seq) {
            Err(ReplayError::Duplicate)
        } else {
            Ok(seq)
        }
    }

    /// Marks `seq` (from [`ReplayWindow::check`], after the ICV verified) as
    /// received, sliding the window if it is new.
    pub fn commit(&mut self, seq: u64) -> Result<(), ReplayError> {
        if self.size == 0 {
            self.top = self.top.max(seq);
            return Ok(());
        }
        if seq > self.top {
            let shift = seq - self.top;
            if shift >= u64::from(MAX_WINDOW) {
                self.bits = [0; WORDS];
            } else {
                // Clear the slots of the numbers the window moves past.
                for s in self.top + 1..=seq {
                    self.set(s, false);
                }
            }
            self.top = seq;
            self.set(seq, true);
            return Ok(());
        }
        if self.top - seq >= u64::from(self.size) {
            return Err(ReplayError::TooOld);
        }
        if self.bit(seq) {
            return Err(ReplayError::Duplicate);
        }
        self.set(seq, true);
        Ok(())
    }

    fn slot(seq: u64) -> (usize, u64) {
        let i = (seq % u64::from(MAX_WINDOW)) as usize;
        (i / 64, 1u64 << (i % 64))
    }

    fn bit(&self, seq: u64) -> bool {
        let (w, m) = Self::slot(seq);
        self.bits[w] & m != 0
    }

    fn set(&mut self, seq: u64, on: bool) {
        let (w, m) = Self::slot(seq);
        if on {
            self.bits[w] |= m;
        } else {
            self.bits[w] &= !m;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accept(w: &mut ReplayWindow, low: u32) -> Result<u64, ReplayError> {
        let s = w.check(low)?;
        w.commit(s)?;
        Ok(s)
    }

    #[test]
    fn in_order_duplicates_and_window_edges() {
        let mut w = ReplayWindow::new(64, false);
        assert_eq!(w.check(0), Err(ReplayError::TooOld));
        for s in 1..=100 {
            assert_eq!(accept(&mut w, s), Ok(u64::from(s)));
        }
        assert_eq!(w.check(100), Err(ReplayError::Duplicate));
        assert_eq!(
            w.check(37),
            Err(ReplayError::Duplicate),
            "top - 63 is inside the window and seen"
        );
        assert_eq!(
            w.check(36),
            Err(ReplayError::TooOld),
            "top - 64 is just outside"
        );
        // A gap: 102 and 104 arrive, 101 and 103 late but inside.
        accept(&mut w, 102).unwrap();
        accept(&mut w, 104).unwrap();
        assert_eq!(accept(&mut w, 103), Ok(103));
        assert_eq!(accept(&mut w, 101), Ok(101));
        assert_eq!(w.check(101), Err(ReplayError::Duplicate));
    }

    #[test]
    fn check_does_not_move_the_window() {
        let mut w = ReplayWindow::new(32, false);
        accept(&mut w, 10).unwrap();
        // A forged far-ahead packet is checked but never committed.
        assert_eq!(w.check(1_000_000), Ok(1_000_000));
        assert_eq!(w.top(), 10);
        assert_eq!(accept(&mut w, 9), Ok(9));
    }

    #[test]
    fn far_ahead_jump_clears_old_state() {
        for size in [1, 63, 64, 65, 1024, MAX_WINDOW] {
            let mut w = ReplayWindow::new(size, false);
            for s in 1..=200 {
                accept(&mut w, s).unwrap();
            }
            let far = 200 + 3 * MAX_WINDOW;
            accept(&mut w, far).unwrap();
            // Numbers just below the new top were never received: accepted.
            if size > 1 {
                assert_eq!(
                    accept(&mut w, far - 1),
                    Ok(u64::from(far - 1)),
                    "size {size}"
                );
            }
            assert_eq!(w.check(far), Err(ReplayError::Duplicate));
            assert_eq!(w.check(far - size), Err(ReplayError::TooOld), "size {size}");
        }
    }

    #[test]
    fn slot_reuse_after_moderate_slide() {
        // Slots are reused modulo MAX_WINDOW: a slide of less than the ring
        // size must clear exactly the slots it passes.
        let mut w = ReplayWindow::new(MAX_WINDOW, false);
        accept(&mut w, 5).unwrap();
        accept(&mut w, 5 + MAX_WINDOW - 1).unwrap();
        assert_eq!(w.check(5), Err(ReplayError::Duplicate));
        accept(&mut w, 5 + MAX_WINDOW).unwrap();
        assert_eq!(w.check(5), Err(ReplayError::TooOld));
        // Slots passed by the slide were cleared: never-received numbers pass.
        assert_eq!(
            accept(&mut w, 4 + MAX_WINDOW - 1),
            Ok(u64::from(3 + MAX_WINDOW))
        );
    }

    #[test]
    fn esn_infers_the_high_half_across_a_wrap() {
        let mut w = ReplayWindow::new(64, true);
        // Just below 2^32.
        for low in [0xffff_fff0u32, 0xffff_fffe, 0xffff_ffff] {
            accept(&mut w, low).unwrap();
        }
        // Past the wrap: the low half restarts, the high half becomes 1.
        assert_eq!(
            accept(&mut w, 0),
            Ok(1 << 32),
            "0 after the wrap is sequence 2^32"
        );
        assert_eq!(accept(&mut w, 5), Ok((1 << 32) | 5));
        // A late packet from before the wrap, still inside the window (case B).
        assert_eq!(accept(&mut w, 0xffff_fff5), Ok(0xffff_fff5));
        assert_eq!(w.check(0xffff_fffe), Err(ReplayError::Duplicate));
        // Below the window's bottom means the current block, far ahead
        // (RFC 4303 A2.2 case B): accepted only if it authenticates.
        assert_eq!(w.check(0xffff_ff00), Ok((1 << 32) | 0xffff_ff00));
        // Well into block 1 (case A), a number below the window means block 2.
        for low in 6..200 {
            accept(&mut w, low).unwrap();
        }
        assert_eq!(w.infer(3), (2 << 32) | 3);
        assert_eq!(w.infer(150), (1 << 32) | 150);
    }

    #[test]
    fn without_esn_the_high_half_is_zero() {
        let w = ReplayWindow::new(64, false);
        assert_eq!(w.infer(u32::MAX), u64::from(u32::MAX));
    }

    #[test]
    fn disabled_window_accepts_everything() {
        let mut w = ReplayWindow::new(0, false);
        assert_eq!(accept(&mut w, 5), Ok(5));
        assert_eq!(accept(&mut w, 5), Ok(5));
        assert_eq!(accept(&mut w, 1), Ok(1));
    }
}
