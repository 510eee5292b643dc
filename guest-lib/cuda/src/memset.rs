// SPDX-License-Identifier: Apache-2.0
//! `cuMemsetD16` in the device's terms: MEMSET sets bytes (width 1) or aligned 32-bit
//! words (width 4), so a 16-bit pattern becomes a byte memset when both its bytes match,
//! else a word memset of the pattern twice over the aligned middle and 2-byte copies at
//! unaligned ends.

/// One request of a memset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Piece {
    Memset {
        offset: u64,
        len: u64,
        value: u32,
        width: u32,
    },
    /// A small copy of these bytes.
    Bytes { offset: u64, data: Vec<u8> },
}

/// The requests that set `count` 16-bit values at `offset` (even) of a buffer to
/// `value`. Buffers start 256-byte aligned, so an offset's alignment is the address's.
pub fn d16(offset: u64, value: u16, count: u64) -> Option<Vec<Piece>> {
    if offset % 2 != 0 {
        return None;
    }
    let len = count.checked_mul(2)?;
    let end = offset.checked_add(len)?;
    let [lo, hi] = value.to_le_bytes();
    if len == 0 {
        return Some(Vec::new());
    }
    if lo == hi {
        return Some(vec![Piece::Memset {
            offset,
            len,
            value: lo as u32,
            width: 1,
        }]);
    }
    let mut pieces = Vec::new();
    let mut pos = offset;
    if pos % 4 == 2 {
        pieces.push(Piece::Bytes {
            offset: pos,
            data: vec![lo, hi],
        });
        pos += 2;
    }
    let middle_end = pos + (end - pos) / 4 * 4;
    if middle_end > pos {
        pieces.push(Piece::Memset {
            offset: pos,
            len: middle_end - pos,
            value: value as u32 | (value as u32) << 16,
            width: 4,
        });
    }
    if end > middle_end {
        pieces.push(Piece::Bytes {
            offset: middle_end,
            data: vec![lo, hi],
        });
    }
    Some(pieces)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the pieces leave in a zeroed buffer of `n` bytes.
    fn apply(n: usize, pieces: &[Piece]) -> Vec<u8> {
        let mut b = vec![0u8; n];
        for p in pieces {
            match p {
                Piece::Memset {
                    offset,
                    len,
                    value,
                    width,
                } => {
                    let r = *offset as usize..(*offset + *len) as usize;
                    if *width == 1 {
                        b[r].fill(*value as u8);
                    } else {
                        assert_eq!((offset % 4, len % 4), (0, 0), "aligned words");
                        b[r].chunks_exact_mut(4)
                            .for_each(|w| w.copy_from_slice(&value.to_le_bytes()));
                    }
                }
                Piece::Bytes { offset, data } => {
                    assert_eq!(data.len(), 2);
                    let at = *offset as usize;
                    b[at..at + 2].copy_from_slice(data);
                }
            }
        }
        b
    }

    #[test]
    fn every_alignment_and_length_sets_exactly_the_values() {
        for value in [0x1234u16, 0xabab, 0, 0xff00] {
            for offset in (0..12).step_by(2) {
                for count in 0..9u64 {
                    let pieces = d16(offset, value, count).unwrap();
                    let got = apply(32, &pieces);
                    let mut want = vec![0u8; 32];
                    for i in 0..count as usize {
                        let at = offset as usize + 2 * i;
                        want[at..at + 2].copy_from_slice(&value.to_le_bytes());
                    }
                    assert_eq!(got, want, "{value:#x} at {offset} x {count}");
                    assert!(pieces.len() <= 3);
                }
            }
        }
    }

    #[test]
    fn matching_bytes_are_one_byte_memset_and_others_a_word_memset_with_edges() {
        assert_eq!(
            d16(2, 0x7777, 5),
            Some(vec![Piece::Memset {
                offset: 2,
                len: 10,
                value: 0x77,
                width: 1
            }])
        );
        assert_eq!(
            d16(2, 0x1234, 5),
            Some(vec![
                Piece::Bytes {
                    offset: 2,
                    data: vec![0x34, 0x12]
                },
                Piece::Memset {
                    offset: 4,
                    len: 8,
                    value: 0x1234_1234,
                    width: 4
                },
            ])
        );
        assert_eq!(
            d16(0, 0x1234, 3),
            Some(vec![
                Piece::Memset {
                    offset: 0,
                    len: 4,
                    value: 0x1234_1234,
                    width: 4
                },
                Piece::Bytes {
                    offset: 4,
                    data: vec![0x34, 0x12]
                },
            ])
        );
        assert_eq!(d16(1, 0x1234, 3), None, "odd addresses are refused");
        assert_eq!(d16(0, 1, u64::MAX), None);
        assert_eq!(d16(0, 1, 0), Some(vec![]));
    }
}
