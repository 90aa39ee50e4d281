//! Whisper's byte-level BPE vocabulary: from CTranslate2's `vocabulary.txt` (GPT-2's
//! printable-character spelling of bytes) to the raw token bytes whisper.cpp stores.

use std::collections::HashMap;

/// GPT-2's table from printable characters back to the bytes they spell: printable
/// Latin-1 bytes stand for themselves, the other 68 bytes for U+0100 onwards in order.
fn unicode_to_byte() -> HashMap<char, u8> {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xa1..=0xac | 0xae..=0xff);
    let mut next = 0u32;
    (0..=255u8)
        .map(|b| {
            if printable(b) {
                (char::from(b), b)
            } else {
                let c = char::from_u32(256 + next).expect("U+0100..U+0143 are chars");
                next += 1;
                (c, b)
            }
        })
        .collect()
}

/// Decodes each line of `vocabulary.txt` into token bytes. Characters outside GPT-2's byte
/// alphabet (none in Whisper's vocabulary) are kept as their UTF-8 encoding.
#[must_use]
pub fn decode_vocabulary(text: &str) -> Vec<Vec<u8>> {
    let table = unicode_to_byte();
    text.lines()
        .map(|line| {
            let mut bytes = Vec::with_capacity(line.len());
            for c in line.chars() {
                match table.get(&c) {
                    Some(&b) => bytes.push(b),
                    None => {
                        let mut buf = [0; 4];
                        bytes.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                    }
                }
            }
            bytes
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_gpt2_byte_spelling() {
        let tokens = decode_vocabulary("!\nĠthe\nĊ\nâĢĻ\n<|endoftext|>\n");
        assert_eq!(tokens[0], b"!");
        assert_eq!(tokens[1], b" the");
        assert_eq!(tokens[2], b"\n");
        assert_eq!(tokens[3], "\u{2019}".as_bytes());
        assert_eq!(tokens[4], b"<|endoftext|>");
    }

    #[test]
    fn table_is_a_bijection_over_bytes() {
        let table = unicode_to_byte();
        assert_eq!(table.len(), 256);
        let mut seen = [false; 256];
        for &b in table.values() {
            seen[usize::from(b)] = true;
        }
        assert!(seen.iter().all(|&s| s));
    }
}
