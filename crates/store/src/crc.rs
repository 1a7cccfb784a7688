//! CRC-32C (Castagnoli), the checksum of the store's small metadata files.
//!
//! Table-driven, one byte per step: the replication-metadata file can hold
//! [`crate::MAX_REPL_META_BYTES`] (16 MiB), where the bitwise loop would spend a few
//! hundred milliseconds; the table costs 1 KiB, built at compile time.

const POLY: u32 = 0x82f6_3b78;

const TABLE: [u32; 256] = {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u32;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ POLY
            } else {
                crc >> 1
            };
            bit += 1;
        }
        t[i] = crc;
        i += 1;
    }
    t
};

/// Continues a CRC-32C over `data`; start with [`CRC_INIT`], finish with `!crc`.
pub(crate) fn crc32c_update(mut crc: u32, data: &[u8]) -> u32 {
    for &byte in data {
        crc = TABLE[((crc ^ u32::from(byte)) & 0xff) as usize] ^ (crc >> 8);
    }
    crc
}

/// The initial value of a running CRC-32C.
pub(crate) const CRC_INIT: u32 = !0;

/// CRC-32C of `data`.
pub(crate) fn crc32c(data: &[u8]) -> u32 {
    !crc32c_update(CRC_INIT, data)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: the standard check value, and that chunked updates equal one pass.
    #[test]
    fn check_value_and_chunking() {
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
        let split = !crc32c_update(crc32c_update(CRC_INIT, &data[..333]), &data[333..]);
        assert_eq!(split, crc32c(&data));
    }
}
