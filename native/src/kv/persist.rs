//! NPC state on disk: the conversation, the tokens in its KV sequence, and the KV bytes.
//!
//! A file is trusted only as far as it proves itself. Its header names the format version,
//! the model (a fingerprint of the GGUF file), the chat template and the context shape; the
//! conversation and the KV bytes each carry their own sha256. A KV section whose header does
//! not match the running model, or whose checksum fails, is never handed to llama.cpp: the
//! conversation is restored and its KV recomputed on the next turn. A corrupt conversation
//! section is an error (there is nothing safe to restore).
//!
//! A fourth section, after the KV bytes, holds what the NPC learned: its long-term memories
//! and rolling summary. Files written before that section existed end after the KV section
//! and load with no memories; older builds read new files and ignore the extra section.
//! A damaged memory section never costs the conversation: the file loads with whatever of
//! the section still parses (or an empty mind) and `mind_note` says what happened.
//!
//! Files are written to a temporary name and renamed, so a failed save (full disk) leaves the
//! previous save intact.

use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::llama::prompt::Turn;
use crate::mind::memory::MemoryStore;
use crate::mind::summary::Summary;
use crate::types::StateError;

const MAGIC: &[u8; 8] = b"NPCSTATE";
/// Bumped whenever the layout changes; older files are then recomputed, not misread.
pub(crate) const FORMAT_VERSION: u32 = 1;

/// What a KV section depends on. Two runtimes with equal identities can exchange KV bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct StateIdentity {
    pub(crate) format: u32,
    /// sha256 over the model file's size, first MiB and last MiB.
    pub(crate) model: String,
    /// sha256 of the chat template text.
    pub(crate) template: String,
    /// Context tokens per sequence.
    pub(crate) context_per_npc: u32,
    /// Number format of the saved keys and values ("f16", "q8_0", ...). Files written before
    /// the field existed were all f16.
    #[serde(default = "f16_name")]
    pub(crate) kv_precision: String,
    /// The LoRA adapter the keys and values were computed with: its file's fingerprint and
    /// scale, empty for the base model (and in files written before adapters existed).
    #[serde(default)]
    pub(crate) adapter: String,
}

fn f16_name() -> String {
    crate::config::KvPrecision::F16.name().to_owned()
}

/// The conversation section: always restorable when its checksum holds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct SavedConversation {
    turns: Vec<(String, String)>,
}

/// What an NPC learned: the memory section.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct SavedMind {
    pub(crate) memories: MemoryStore,
    pub(crate) summary: Summary,
    /// Secrets the game revealed (absent in files written before reveals existed).
    #[serde(default)]
    pub(crate) revealed: Vec<String>,
}

/// What a state file holds once read.
#[derive(Debug)]
pub(crate) struct LoadedState {
    pub(crate) turns: Vec<Turn>,
    /// Tokens and KV bytes, when the file's identity matches and its checksum holds;
    /// otherwise why not.
    pub(crate) kv: Result<(Vec<i32>, Vec<u8>), String>,
    /// The memory section; `None` for files written before it existed, or when it was too
    /// damaged to read (then `mind_note` says why).
    pub(crate) mind: Option<SavedMind>,
    /// Why the memory section was not restored as saved, if it was not.
    pub(crate) mind_note: Option<String>,
}

/// Writes `path` atomically (temporary file, then rename).
pub(crate) fn save(
    path: &Path,
    identity: &StateIdentity,
    turns: &[Turn],
    tokens: &[i32],
    kv: &[u8],
    mind: &SavedMind,
) -> std::io::Result<u64> {
    let conversation = SavedConversation {
        turns: turns
            .iter()
            .map(|t| (t.player.clone(), t.npc.clone()))
            .collect(),
    };
    let header = ron::to_string(identity).map_err(std::io::Error::other)?;
    let conversation = ron::to_string(&conversation).map_err(std::io::Error::other)?;
    let mind = ron::to_string(mind).map_err(std::io::Error::other)?;
    let mut kv_section = Vec::with_capacity(8 + tokens.len() * 4 + kv.len());
    kv_section.extend_from_slice(&(tokens.len() as u64).to_le_bytes());
    for token in tokens {
        kv_section.extend_from_slice(&token.to_le_bytes());
    }
    kv_section.extend_from_slice(kv);

    let bytes = encode(&[
        header.as_bytes(),
        conversation.as_bytes(),
        &kv_section,
        mind.as_bytes(),
    ]);

    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let temporary = temporary_path(path);
    let written = (|| {
        let mut file = File::create(&temporary)?;
        file.write_all(&bytes)?;
        file.sync_all()
    })();
    if let Err(err) = written {
        let _ = std::fs::remove_file(&temporary);
        return Err(err);
    }
    std::fs::rename(&temporary, path)?;
    Ok(bytes.len() as u64)
}

/// The file's bytes: magic, format version, then each section as its length, its sha256 and
/// its bytes.
fn encode(sections: &[&[u8]]) -> Vec<u8> {
    let size: usize = sections.iter().map(|s| s.len() + 40).sum();
    let mut bytes = Vec::with_capacity(size + 12);
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    for section in sections {
        bytes.extend_from_slice(&(section.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&Sha256::digest(section));
        bytes.extend_from_slice(section);
    }
    bytes
}

/// Where a save is written before it replaces `path`: `path` with `.partial` appended.
pub(crate) fn temporary_path(path: &Path) -> std::path::PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".partial");
    name.into()
}

/// The largest state file read, in bytes: far above any this build writes (a 2,048-token
/// context of a 1.5B model is about 60 MB of KV), so that a crafted or runaway file cannot make
/// the game allocate without bound.
pub(crate) const MAX_STATE_FILE_BYTES: u64 = 4 << 30;

/// Reads `path`, checking everything before anything is trusted.
pub(crate) fn load(path: &Path, expected: &StateIdentity) -> Result<LoadedState, StateError> {
    let io = |e: std::io::Error| StateError::Io {
        path: path.to_path_buf(),
        writing: false,
        message: e.to_string(),
    };
    let too_large = || StateError::Damaged {
        path: path.to_path_buf(),
        reason: format!(
            "it is larger than {MAX_STATE_FILE_BYTES} bytes, more than any state file holds"
        ),
    };
    let file = File::open(path).map_err(io)?;
    // Refused by its size before a byte is read; `take` still bounds a file that grows.
    if file.metadata().map_err(io)?.len() > MAX_STATE_FILE_BYTES {
        return Err(too_large());
    }
    let mut bytes = Vec::new();
    file.take(MAX_STATE_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() as u64 > MAX_STATE_FILE_BYTES {
        return Err(too_large());
    }
    parse(&bytes, path, expected)
}

/// [`load`] on the bytes of a file: checks everything before anything is trusted.
fn parse(bytes: &[u8], path: &Path, expected: &StateIdentity) -> Result<LoadedState, StateError> {
    let damaged = |reason: String| StateError::Damaged {
        path: path.to_path_buf(),
        reason,
    };
    let mut reader = Sections { bytes, at: 0 };
    if reader.take(8) != Some(MAGIC.as_slice()) {
        return Err(StateError::NotAStateFile(path.to_path_buf()));
    }
    let version = reader
        .take(4)
        .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
        .ok_or_else(|| damaged("truncated file".into()))?;
    let header = reader.section();
    let conversation = reader.section();
    let kv = reader.section();
    let (mind, mind_note) = if reader.at == bytes.len() {
        (None, None)
    } else {
        read_mind(reader.section_unchecked())
    };

    let conversation: SavedConversation = conversation
        .and_then(|b| std::str::from_utf8(b).map_err(|e| e.to_string()))
        .and_then(|text| ron::from_str(text).map_err(|e| e.to_string()))
        .map_err(|e| damaged(format!("its conversation: {e}")))?;
    let turns = conversation
        .turns
        .into_iter()
        .map(|(player, npc)| Turn { player, npc })
        .collect();

    let kv = (|| {
        if version != FORMAT_VERSION {
            return Err(format!(
                "format version {version}, this build reads {FORMAT_VERSION}"
            ));
        }
        let header: StateIdentity = header
            .and_then(|b| std::str::from_utf8(b).map_err(|e| e.to_string()))
            .and_then(|text| ron::from_str(text).map_err(|e| e.to_string()))
            .map_err(|e| format!("unreadable header: {e}"))?;
        if header != *expected {
            return Err(describe_mismatch(&header, expected));
        }
        let kv = kv?;
        let count = kv
            .get(..8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
            .ok_or("truncated KV section")?;
        let count = usize::try_from(count).map_err(|_| "token count too large")?;
        let end = count
            .checked_mul(4)
            .and_then(|n| n.checked_add(8))
            .filter(|&end| end <= kv.len())
            .ok_or("truncated token list")?;
        let tokens = kv[8..end]
            .chunks_exact(4)
            .map(|b| i32::from_le_bytes(b.try_into().expect("4 bytes")))
            .collect();
        Ok((tokens, kv[end..].to_vec()))
    })();
    Ok(LoadedState {
        turns,
        kv,
        mind,
        mind_note,
    })
}

/// The memory section, as far as it can be trusted or salvaged: a section whose checksum
/// fails is still parsed (its texts are the player's own memories, and every text is
/// sanitized again before it enters a prompt), and one that does not parse is dropped.
fn read_mind(section: Result<(&[u8], bool), String>) -> (Option<SavedMind>, Option<String>) {
    let (body, checksum_ok) = match section {
        Ok(read) => read,
        Err(reason) => return (None, Some(format!("memories not restored ({reason})"))),
    };
    let parsed = std::str::from_utf8(body)
        .map_err(|e| e.to_string())
        .and_then(|text| ron::from_str::<SavedMind>(text).map_err(|e| e.to_string()));
    match (parsed, checksum_ok) {
        (Ok(mind), true) => (Some(mind), None),
        (Ok(mind), false) => (
            Some(mind),
            Some("memory section failed its checksum; kept what still parses".into()),
        ),
        (Err(err), true) => (
            None,
            Some(format!("memories not restored (unreadable: {err})")),
        ),
        (Err(err), false) => (
            None,
            Some(format!(
                "memories not restored (checksum mismatch, unreadable: {err})"
            )),
        ),
    }
}

fn describe_mismatch(found: &StateIdentity, expected: &StateIdentity) -> String {
    if found.model != expected.model {
        "saved with a different model".into()
    } else if found.template != expected.template {
        "saved with a different chat template".into()
    } else if found.context_per_npc != expected.context_per_npc {
        format!(
            "saved with {} context tokens per NPC, running with {}",
            found.context_per_npc, expected.context_per_npc
        )
    } else if found.kv_precision != expected.kv_precision {
        format!(
            "saved with {} KV values, running with {}",
            found.kv_precision, expected.kv_precision
        )
    } else if found.adapter != expected.adapter {
        let name = |tag: &str| {
            if tag.is_empty() {
                "the base model".to_owned()
            } else {
                format!("the LoRA adapter {tag}")
            }
        };
        format!(
            "saved with {}, the NPC now runs with {}",
            name(&found.adapter),
            name(&expected.adapter)
        )
    } else {
        "saved with a different format".into()
    }
}

/// Reads length-prefixed, checksummed sections.
struct Sections<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Sections<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.at.checked_add(n)?;
        let slice = self.bytes.get(self.at..end)?;
        self.at = end;
        Some(slice)
    }

    /// One section, verified against its sha256.
    fn section(&mut self) -> Result<&'a [u8], String> {
        let (body, checksum_ok) = self.section_unchecked()?;
        if !checksum_ok {
            return Err("checksum mismatch".into());
        }
        Ok(body)
    }

    /// One section and whether its sha256 holds.
    fn section_unchecked(&mut self) -> Result<(&'a [u8], bool), String> {
        let len = self
            .take(8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
            .ok_or("truncated file")?;
        let digest = self.take(32).ok_or("truncated file")?;
        let body = usize::try_from(len)
            .ok()
            .and_then(|len| self.take(len))
            .ok_or("truncated file")?;
        Ok((body, Sha256::digest(body).as_slice() == digest))
    }
}

/// sha256 over the model file's size, first MiB and last MiB: identifies a model without
/// reading gigabytes.
pub(crate) fn model_fingerprint(path: &Path) -> std::io::Result<String> {
    use std::io::{Seek, SeekFrom};
    const MIB: u64 = 1 << 20;
    let mut file = File::open(path)?;
    let size = file.metadata()?.len();
    let mut hasher = Sha256::new();
    hasher.update(size.to_le_bytes());
    let mut buffer = vec![0u8; MIB.min(size) as usize];
    file.read_exact(&mut buffer)?;
    hasher.update(&buffer);
    file.seek(SeekFrom::Start(size.saturating_sub(MIB)))?;
    file.read_exact(&mut buffer)?;
    hasher.update(&buffer);
    Ok(hex(&hasher.finalize()))
}

/// sha256 of a text, in hex.
pub(crate) fn text_hash(text: &str) -> String {
    hex(&Sha256::digest(text.as_bytes()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> StateIdentity {
        StateIdentity {
            format: FORMAT_VERSION,
            model: "m".into(),
            template: "t".into(),
            context_per_npc: 2048,
            kv_precision: "f16".into(),
            adapter: String::new(),
        }
    }

    fn turns() -> Vec<Turn> {
        vec![Turn {
            player: "Hi".into(),
            npc: "Hello, friend.".into(),
        }]
    }

    fn scratch(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("npc-persist-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("npc.state")
    }

    #[test]
    fn round_trips() {
        let path = scratch("round-trip");
        save(
            &path,
            &identity(),
            &turns(),
            &[1, 2, 3],
            b"kv bytes",
            &SavedMind::default(),
        )
        .unwrap();
        let loaded = load(&path, &identity()).unwrap();
        assert_eq!(loaded.turns, turns());
        assert_eq!(loaded.kv.unwrap(), (vec![1, 2, 3], b"kv bytes".to_vec()));
    }

    #[test]
    fn a_mismatched_header_keeps_the_conversation_but_not_the_kv() {
        let path = scratch("mismatch");
        save(
            &path,
            &identity(),
            &turns(),
            &[1],
            b"kv",
            &SavedMind::default(),
        )
        .unwrap();
        let other = StateIdentity {
            context_per_npc: 1024,
            ..identity()
        };
        let loaded = load(&path, &other).unwrap();
        assert_eq!(loaded.turns, turns());
        assert!(loaded.kv.unwrap_err().contains("1024"));
        let other = StateIdentity {
            kv_precision: "q8_0".into(),
            ..identity()
        };
        assert!(
            load(&path, &other)
                .unwrap()
                .kv
                .unwrap_err()
                .contains("q8_0")
        );
        let other = StateIdentity {
            model: "other".into(),
            ..identity()
        };
        assert!(
            load(&path, &other)
                .unwrap()
                .kv
                .unwrap_err()
                .contains("different model")
        );
        let other = StateIdentity {
            adapter: "abc@1".into(),
            ..identity()
        };
        let why = load(&path, &other).unwrap().kv.unwrap_err();
        assert!(
            why.contains("base model") && why.contains("adapter abc@1"),
            "{why}"
        );
    }

    #[test]
    fn a_flipped_kv_byte_is_caught_by_its_checksum() {
        let path = scratch("corrupt-kv");
        save(
            &path,
            &identity(),
            &turns(),
            &[1, 2],
            &[7u8; 64],
            &SavedMind::default(),
        )
        .unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        let kv_at = bytes.windows(64).position(|w| w == [7u8; 64]).unwrap();
        bytes[kv_at + 63] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        let loaded = load(&path, &identity()).unwrap();
        assert_eq!(loaded.turns, turns());
        assert_eq!(loaded.kv.unwrap_err(), "checksum mismatch");
    }

    #[test]
    fn a_damaged_conversation_or_foreign_file_is_an_error() {
        let path = scratch("corrupt-conversation");
        save(
            &path,
            &identity(),
            &turns(),
            &[1],
            b"kv",
            &SavedMind::default(),
        )
        .unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        let at = bytes.windows(5).position(|w| w == b"Hello").unwrap();
        bytes[at] = b'J';
        std::fs::write(&path, &bytes).unwrap();
        assert!(matches!(
            load(&path, &identity()),
            Err(StateError::Damaged { .. })
        ));
        std::fs::write(&path, b"not a state file").unwrap();
        assert!(load(&path, &identity()).is_err());
    }

    #[test]
    fn memories_and_summary_round_trip_and_old_files_load_without_them() {
        let path = scratch("mind");
        let mut mind = SavedMind::default();
        mind.memories.clock = 7;
        mind.memories.remember("The player's name is Aria.", 8);
        mind.summary.fold(&[Turn {
            player: "My sister Wren lives in Riverford.".into(),
            npc: "Aye.".into(),
        }]);
        save(&path, &identity(), &turns(), &[1], b"kv", &mind).unwrap();
        let loaded = load(&path, &identity()).unwrap();
        assert_eq!(loaded.mind.as_ref(), Some(&mind));
        assert_eq!(loaded.kv.unwrap(), (vec![1], b"kv".to_vec()));
        // A file from before the memory section: cut it off after the KV section.
        let bytes = std::fs::read(&path).unwrap();
        let mind_text = ron::to_string(&mind).unwrap();
        let old = &bytes[..bytes.len() - mind_text.len() - 40];
        std::fs::write(&path, old).unwrap();
        let loaded = load(&path, &identity()).unwrap();
        assert_eq!(loaded.mind, None);
        assert_eq!(loaded.turns, turns());
        assert_eq!(loaded.kv.unwrap(), (vec![1], b"kv".to_vec()));
    }

    #[test]
    fn a_damaged_memory_section_keeps_the_conversation_and_the_kv() {
        let path = scratch("corrupt-mind");
        let mut mind = SavedMind::default();
        mind.memories.remember("The player's name is Aria.", 8);
        save(&path, &identity(), &turns(), &[1, 2], b"kv", &mind).unwrap();
        let good = std::fs::read(&path).unwrap();
        let at = good.windows(4).position(|w| w == b"Aria").unwrap();
        // A flipped letter: the checksum fails, the section still parses and is kept.
        let mut bytes = good.clone();
        bytes[at] = b'B';
        std::fs::write(&path, &bytes).unwrap();
        let loaded = load(&path, &identity()).unwrap();
        assert_eq!(loaded.turns, turns());
        assert_eq!(loaded.kv.unwrap(), (vec![1, 2], b"kv".to_vec()));
        assert_eq!(
            loaded.mind.unwrap().memories.memories[0].text,
            "The player's name is Bria."
        );
        assert!(loaded.mind_note.unwrap().contains("checksum"));
        // Broken syntax: nothing of the mind, everything else.
        let mut bytes = good.clone();
        let mind_at = good.len() - ron::to_string(&mind).unwrap().len();
        assert_eq!(bytes[mind_at], b'(');
        bytes[mind_at] = b'#';
        std::fs::write(&path, &bytes).unwrap();
        let loaded = load(&path, &identity()).unwrap();
        assert_eq!(loaded.turns, turns());
        assert!(loaded.kv.is_ok());
        assert_eq!(loaded.mind, None);
        assert!(loaded.mind_note.unwrap().contains("unreadable"));
        // Cut off inside the memory section.
        std::fs::write(&path, &good[..good.len() - 10]).unwrap();
        let loaded = load(&path, &identity()).unwrap();
        assert_eq!(loaded.turns, turns());
        assert_eq!(loaded.mind, None);
        assert!(loaded.mind_note.unwrap().contains("truncated"));
    }

    #[test]
    fn a_failed_write_keeps_the_previous_save() {
        let path = scratch("failed-write");
        save(
            &path,
            &identity(),
            &turns(),
            &[1],
            b"first",
            &SavedMind::default(),
        )
        .unwrap();
        // Make the temporary file impossible to create (root ignores permissions, so use a
        // directory in its place).
        std::fs::create_dir_all(temporary_path(&path)).unwrap();
        assert!(
            save(
                &path,
                &identity(),
                &[],
                &[2],
                b"second",
                &SavedMind::default()
            )
            .is_err()
        );
        let loaded = load(&path, &identity()).unwrap();
        assert_eq!(loaded.kv.unwrap().1, b"first");
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;

        fn file(turns: &[(String, String)], tokens: &[i32], kv: &[u8]) -> Vec<u8> {
            let conversation = SavedConversation {
                turns: turns.to_vec(),
            };
            let mut kv_section = (tokens.len() as u64).to_le_bytes().to_vec();
            kv_section.extend(tokens.iter().flat_map(|t| t.to_le_bytes()));
            kv_section.extend_from_slice(kv);
            encode(&[
                ron::to_string(&identity()).unwrap().as_bytes(),
                ron::to_string(&conversation).unwrap().as_bytes(),
                &kv_section,
                ron::to_string(&SavedMind::default()).unwrap().as_bytes(),
            ])
        }

        fn parsed(bytes: &[u8]) -> Result<LoadedState, StateError> {
            parse(bytes, Path::new("npc.state"), &identity())
        }

        fn conversation() -> impl Strategy<Value = Vec<(String, String)>> {
            proptest::collection::vec((".{0,40}", ".{0,40}"), 0..6)
        }

        /// Offsets of the section length fields in a file of `sections` body sizes.
        fn length_fields(bytes: &[u8]) -> Vec<usize> {
            let mut at = 12;
            let mut fields = Vec::new();
            while at + 40 <= bytes.len() {
                fields.push(at);
                let len = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) as usize;
                at += 40 + len;
            }
            fields
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn a_valid_file_reads_back(
                turns in conversation(),
                tokens in proptest::collection::vec(any::<i32>(), 0..64),
                kv in proptest::collection::vec(any::<u8>(), 0..256),
            ) {
                let state = parsed(&file(&turns, &tokens, &kv)).unwrap();
                let read: Vec<(String, String)> =
                    state.turns.into_iter().map(|t| (t.player, t.npc)).collect();
                prop_assert_eq!(read, turns);
                prop_assert_eq!(state.kv.unwrap(), (tokens, kv));
            }

            #[test]
            fn a_truncated_file_is_an_error_or_loses_only_what_was_cut(
                turns in conversation(),
                tokens in proptest::collection::vec(any::<i32>(), 0..64),
                kv in proptest::collection::vec(any::<u8>(), 0..256),
                cut in any::<proptest::sample::Index>(),
            ) {
                let bytes = file(&turns, &tokens, &kv);
                let cut = cut.index(bytes.len());
                if let Ok(state) = parsed(&bytes[..cut]) {
                    // The conversation section survived whole; the KV either did or is refused.
                    prop_assert_eq!(state.turns.len(), turns.len());
                    if let Ok(read) = state.kv {
                        prop_assert_eq!(read, (tokens, kv));
                    }
                }
            }

            #[test]
            fn a_flipped_bit_never_yields_wrong_kv_or_a_wrong_conversation(
                turns in conversation(),
                tokens in proptest::collection::vec(any::<i32>(), 0..64),
                kv in proptest::collection::vec(any::<u8>(), 0..256),
                at in any::<proptest::sample::Index>(),
                bit in 0u8..8,
            ) {
                let mut bytes = file(&turns, &tokens, &kv);
                let at = at.index(bytes.len());
                bytes[at] ^= 1 << bit;
                if let Ok(state) = parsed(&bytes) {
                    let read: Vec<(String, String)> =
                        state.turns.into_iter().map(|t| (t.player, t.npc)).collect();
                    prop_assert_eq!(read, turns);
                    if let Ok(read) = state.kv {
                        prop_assert_eq!(read, (tokens, kv));
                    }
                }
            }

            #[test]
            fn lying_lengths_with_valid_checksums_are_refused_without_allocating(
                tokens in proptest::collection::vec(any::<i32>(), 0..64),
                kv in proptest::collection::vec(any::<u8>(), 0..256),
                claimed in prop_oneof![Just(u64::MAX), Just(u64::MAX / 4 + 1), 65u64..1_000_000],
            ) {
                // A token count beyond the section, with the section's checksum recomputed:
                // the hash holds, the structure does not.
                let mut kv_section = claimed.to_le_bytes().to_vec();
                kv_section.extend(tokens.iter().flat_map(|t| t.to_le_bytes()));
                kv_section.extend_from_slice(&kv);
                let bytes = encode(&[
                    ron::to_string(&identity()).unwrap().as_bytes(),
                    ron::to_string(&SavedConversation { turns: Vec::new() }).unwrap().as_bytes(),
                    &kv_section,
                ]);
                let state = parsed(&bytes).unwrap();
                let claimed_fits = usize::try_from(claimed)
                    .ok()
                    .and_then(|n| n.checked_mul(4))
                    .is_some_and(|n| n + 8 <= kv_section.len());
                prop_assert_eq!(state.kv.is_ok(), claimed_fits);

                // A section length beyond the file, in every length field.
                let good = file(&[], &tokens, &kv);
                for field in length_fields(&good) {
                    let mut bytes = good.clone();
                    bytes[field..field + 8].copy_from_slice(&claimed.max(1 << 40).to_le_bytes());
                    if let Ok(state) = parsed(&bytes) {
                        prop_assert!(state.kv.is_err() || state.mind.is_none());
                    }
                }
            }

            #[test]
            fn an_edited_header_with_a_valid_checksum_keeps_the_kv_out(
                context in 1u32..100_000,
                precision in "[a-z0-9_]{1,8}",
            ) {
                let edited = StateIdentity {
                    context_per_npc: context,
                    kv_precision: precision,
                    ..identity()
                };
                prop_assume!(edited != identity());
                let mut kv_section = 1u64.to_le_bytes().to_vec();
                kv_section.extend_from_slice(&7i32.to_le_bytes());
                let bytes = encode(&[
                    ron::to_string(&edited).unwrap().as_bytes(),
                    ron::to_string(&SavedConversation { turns: Vec::new() }).unwrap().as_bytes(),
                    &kv_section,
                ]);
                prop_assert!(parsed(&bytes).unwrap().kv.is_err());
            }

            #[test]
            fn random_bytes_are_never_a_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
                let mut with_magic = MAGIC.to_vec();
                with_magic.extend_from_slice(&bytes);
                let _ = parsed(&bytes);
                let _ = parsed(&with_magic);
            }
        }
    }
}
