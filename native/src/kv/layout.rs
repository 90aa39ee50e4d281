//! The shape of llama.cpp's sequence-state bytes, checked before any of them reach llama.cpp.
//!
//! A state file's checksums prove it was not damaged by accident, not that it was written for
//! this model: a crafted file with valid checksums could hand llama.cpp a lying cell count or a
//! row size that does not match its tensors. So every KV snapshot (from a state file, from the
//! RAM or disk eviction tiers) is parsed here first and compared with a *probe*: the state of
//! a one-token sequence this context wrote itself. Everything but the number of cells and the
//! cell data must be identical to the probe (stream count, layer count, key and value types
//! and row sizes per layer, value transposition, rotation fields); the cell count must equal
//! the snapshot's token count and fit the context; the positions must be `0, 1, 2, …` as the
//! runtime writes them; and the bytes must end exactly where those numbers say.
//!
//! The format read is llama.cpp's (`llama_context::state_seq_get_data`, `llama_kv_cache::
//! state_write`): a magic and the source sequence id, then one block per KV cache (two for
//! models with sliding-window attention), each its stream count and, per stream, a cell count,
//! the cells' positions and sequence ids, and the keys and values layer by layer. Models whose
//! state this parser does not understand (recurrent or hybrid memory) get no probe: their
//! saved KV is never restored, and is recomputed instead.

/// What [`KvLayout::check`] compares: one KV cache's fixed shape.
#[derive(Clone, Debug, PartialEq, Eq)]
struct BlockShape {
    streams: u32,
    v_trans: u32,
    layers: u32,
    rotations: (u32, u32),
    /// Per layer: the key type and row size in bytes.
    keys: Vec<(i32, u64)>,
    /// Per layer: the value type, and the row size (or, transposed, the element size and
    /// embedding width).
    values: Vec<(i32, u64, u32)>,
}

/// One KV cache's part of a snapshot, as parsed.
#[derive(Debug)]
struct Block {
    shape: BlockShape,
    /// The positions of the one stream that holds cells (empty if none does).
    positions: Vec<i32>,
    /// Streams that hold cells.
    filled_streams: usize,
}

/// The expected shape of this context's sequence state, from a probe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct KvLayout {
    magic: u32,
    /// Cells carry llama.cpp's 12-byte extension (M-RoPE and n-gram models).
    cell_ext: bool,
    blocks: Vec<BlockShape>,
}

/// Bytes of llama.cpp's per-cell extension (`llama_kv_cell_ext`: x, y, token).
const CELL_EXT_BYTES: usize = 12;

impl KvLayout {
    /// The layout of the state of a one-token sequence this context wrote itself.
    ///
    /// # Errors
    /// The probe is not in a format this parser reads (the model's memory is not a plain or
    /// sliding-window KV cache).
    pub(crate) fn from_probe(probe: &[u8]) -> Result<Self, String> {
        let mut last = String::new();
        for cell_ext in [false, true] {
            match parse(probe, cell_ext) {
                Ok((magic, blocks)) if blocks.iter().all(|b| b.positions.len() == 1) => {
                    return Ok(Self {
                        magic,
                        cell_ext,
                        blocks: blocks.into_iter().map(|b| b.shape).collect(),
                    });
                }
                Ok(_) => last = "the probe does not hold exactly one cell".into(),
                Err(err) => last = err,
            }
        }
        Err(format!(
            "this model's KV state is not in a layout the runtime can check ({last})"
        ))
    }

    /// Checks `bytes` (a snapshot of `tokens` tokens) against this layout; at most
    /// `context` cells fit a sequence.
    ///
    /// # Errors
    /// What does not match, in words.
    pub(crate) fn check(&self, bytes: &[u8], tokens: usize, context: usize) -> Result<(), String> {
        let (magic, blocks) = parse(bytes, self.cell_ext)?;
        if magic != self.magic {
            return Err(format!(
                "state magic {magic:#x}, expected {:#x}",
                self.magic
            ));
        }
        if blocks.len() != self.blocks.len() {
            return Err(format!(
                "{} KV caches in the state, the model has {}",
                blocks.len(),
                self.blocks.len()
            ));
        }
        for (at, (block, expected)) in blocks.iter().zip(&self.blocks).enumerate() {
            if block.shape != *expected {
                return Err(describe(at, &block.shape, expected));
            }
            if block.filled_streams != 1 {
                return Err(format!(
                    "{} streams of KV cache {at} hold cells, a sequence fills one",
                    block.filled_streams
                ));
            }
            let cells = block.positions.len();
            if cells > context {
                return Err(format!(
                    "{cells} cells, more than the {context} a sequence holds"
                ));
            }
            // The first cache holds every token at positions 0, 1, 2, …; a sliding-window
            // cache keeps a later part of them, still in order.
            if at == 0 {
                if cells != tokens {
                    return Err(format!(
                        "{cells} cells for {tokens} saved tokens (they must be equal)"
                    ));
                }
                if let Some(i) = (0..cells).find(|&i| usize::try_from(block.positions[i]) != Ok(i))
                {
                    return Err(format!(
                        "cell {i} is at position {}, expected {i}",
                        block.positions[i]
                    ));
                }
            } else {
                let in_range = |p: i32| usize::try_from(p).is_ok_and(|p| p < tokens);
                let ordered = block.positions.windows(2).all(|w| w[0] < w[1]);
                if cells > tokens || !ordered || !block.positions.iter().all(|&p| in_range(p)) {
                    return Err(format!(
                        "the positions of KV cache {at} are not a part of the {tokens} saved tokens"
                    ));
                }
            }
        }
        Ok(())
    }
}

fn describe(at: usize, found: &BlockShape, expected: &BlockShape) -> String {
    let what = if found.streams != expected.streams {
        format!("{} streams, expected {}", found.streams, expected.streams)
    } else if found.layers != expected.layers {
        format!("{} layers, the model has {}", found.layers, expected.layers)
    } else if found.v_trans != expected.v_trans {
        "the values are transposed differently".to_owned()
    } else if found.rotations != expected.rotations {
        "different rotation fields".to_owned()
    } else if let Some(layer) = (0..found.keys.len()).find(|&i| found.keys[i] != expected.keys[i]) {
        let ((ft, fr), (et, er)) = (found.keys[layer], expected.keys[layer]);
        format!("layer {layer}'s keys are type {ft}, {fr}-byte rows; expected type {et}, {er}")
    } else {
        let layer = (0..found.values.len())
            .find(|&i| found.values[i] != expected.values[i])
            .unwrap_or(0);
        format!("layer {layer}'s values do not match the model's")
    };
    format!("KV cache {at}: {what}")
}

/// A bounds-checked little-endian reader.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&end| end <= self.bytes.len())
            .ok_or_else(|| {
                format!(
                    "the state ends early (byte {} of {})",
                    self.at,
                    self.bytes.len()
                )
            })?;
        let taken = &self.bytes[self.at..end];
        self.at = end;
        Ok(taken)
    }

    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }

    fn i32(&mut self) -> Result<i32, String> {
        Ok(i32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }

    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }

    /// Skips `count × size` bytes, refusing products that overflow or pass the end.
    fn skip(&mut self, count: u64, size: u64) -> Result<(), String> {
        let n = count
            .checked_mul(size)
            .and_then(|n| usize::try_from(n).ok())
            .ok_or("a tensor size overflows")?;
        self.take(n).map(|_| ())
    }

    fn done(&self) -> bool {
        self.at == self.bytes.len()
    }
}

/// The most streams and layers a block may claim before a single byte of them is read: far
/// above any model (llama.cpp has one stream per sequence, at most 256 of them).
const MAX_STREAMS: u32 = 1024;
const MAX_LAYERS: u32 = 4096;

/// Parses a whole snapshot: the magic, then blocks to the end.
fn parse(bytes: &[u8], cell_ext: bool) -> Result<(u32, Vec<Block>), String> {
    let mut r = Reader { bytes, at: 0 };
    let magic = r.u32()?;
    let _source_seq = r.i32()?;
    let mut blocks = Vec::new();
    while !r.done() {
        if blocks.len() == 2 {
            return Err("bytes after the last KV cache".into());
        }
        blocks.push(parse_block(&mut r, cell_ext)?);
    }
    if blocks.is_empty() {
        return Err("no KV cache in the state".into());
    }
    Ok((magic, blocks))
}

fn parse_block(r: &mut Reader<'_>, cell_ext: bool) -> Result<Block, String> {
    let streams = r.u32()?;
    if streams == 0 || streams > MAX_STREAMS {
        return Err(format!("{streams} streams"));
    }
    let mut positions = Vec::new();
    let mut filled_streams = 0;
    let mut shape = None;
    for _ in 0..streams {
        let cells = r.u32()?;
        if cells == 0 {
            continue;
        }
        filled_streams += 1;
        // Each cell takes at least 12 bytes: a count past the end is refused before any
        // allocation.
        if u64::from(cells) * 12 > (r.bytes.len() - r.at) as u64 {
            return Err(format!(
                "{cells} cells, more than the state's bytes can hold"
            ));
        }
        positions.clear();
        for _ in 0..cells {
            let pos = r.i32()?;
            let ids = r.u32()?;
            if ids != 1 {
                return Err(format!("a cell belongs to {ids} sequences, expected 1"));
            }
            if cell_ext {
                r.take(CELL_EXT_BYTES)?;
            }
            let _seq = r.i32()?;
            positions.push(pos);
        }
        let found = parse_tensors(r, streams, u64::from(cells))?;
        if shape.as_ref().is_some_and(|s| *s != found) {
            return Err("two streams of one KV cache differ in shape".into());
        }
        shape = Some(found);
    }
    let shape = shape.unwrap_or(BlockShape {
        streams,
        v_trans: 0,
        layers: 0,
        rotations: (0, 0),
        keys: Vec::new(),
        values: Vec::new(),
    });
    Ok(Block {
        shape,
        positions,
        filled_streams,
    })
}

/// One stream's keys and values: every layer's keys, then every layer's values.
fn parse_tensors(r: &mut Reader<'_>, streams: u32, cells: u64) -> Result<BlockShape, String> {
    let v_trans = r.u32()?;
    let layers = r.u32()?;
    let rotations = (r.u32()?, r.u32()?);
    if v_trans > 1 || layers == 0 || layers > MAX_LAYERS {
        return Err(format!("{layers} layers, value transposition {v_trans}"));
    }
    let mut keys = Vec::with_capacity(layers as usize);
    for _ in 0..layers {
        let ty = r.i32()?;
        let row = r.u64()?;
        r.skip(cells, row)?;
        keys.push((ty, row));
    }
    let mut values = Vec::with_capacity(layers as usize);
    for _ in 0..layers {
        let ty = r.i32()?;
        if v_trans == 0 {
            let row = r.u64()?;
            r.skip(cells, row)?;
            values.push((ty, row, 0));
        } else {
            let element = r.u32()?;
            let width = r.u32()?;
            r.skip(cells * u64::from(width), u64::from(element))?;
            values.push((ty, u64::from(element), width));
        }
    }
    Ok(BlockShape {
        streams,
        v_trans,
        layers,
        rotations,
        keys,
        values,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A snapshot in llama.cpp's layout: one block of `streams` streams, the cells in stream
    /// `filled`, `layers` layers of 16-byte key and value rows.
    fn snapshot(streams: u32, filled: u32, positions: &[i32], layers: u32) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&0xdead_beef_u32.to_le_bytes());
        b.extend_from_slice(&3i32.to_le_bytes());
        b.extend_from_slice(&streams.to_le_bytes());
        for s in 0..streams {
            if s != filled {
                b.extend_from_slice(&0u32.to_le_bytes());
                continue;
            }
            b.extend_from_slice(&(positions.len() as u32).to_le_bytes());
            for &p in positions {
                b.extend_from_slice(&p.to_le_bytes());
                b.extend_from_slice(&1u32.to_le_bytes());
                b.extend_from_slice(&(s as i32).to_le_bytes());
            }
            for field in [0u32, layers, 0, 0] {
                b.extend_from_slice(&field.to_le_bytes());
            }
            for _ in 0..2 {
                for _ in 0..layers {
                    b.extend_from_slice(&1i32.to_le_bytes());
                    b.extend_from_slice(&16u64.to_le_bytes());
                    b.extend(std::iter::repeat_n(7u8, 16 * positions.len()));
                }
            }
        }
        b
    }

    fn layout() -> KvLayout {
        KvLayout::from_probe(&snapshot(4, 2, &[0], 3)).expect("probe parses")
    }

    #[test]
    fn a_snapshot_in_the_probes_layout_passes_from_any_stream() {
        let layout = layout();
        assert!(!layout.cell_ext);
        for filled in 0..4 {
            let bytes = snapshot(4, filled, &[0, 1, 2, 3, 4], 3);
            assert_eq!(layout.check(&bytes, 5, 64), Ok(()));
        }
    }

    #[test]
    fn lying_counts_positions_and_shapes_are_refused() {
        let layout = layout();
        let good = snapshot(4, 1, &[0, 1, 2], 3);
        let refused = |bytes: &[u8], tokens: usize, context: usize, expect: &str| {
            let err = layout.check(bytes, tokens, context).expect_err(expect);
            assert!(err.contains(expect), "{err:?} should say {expect:?}");
        };
        refused(&good, 4, 64, "3 cells for 4 saved tokens");
        refused(&good, 3, 2, "more than the 2");
        refused(
            &snapshot(4, 1, &[0, 2, 3], 3),
            3,
            64,
            "cell 1 is at position 2",
        );
        refused(
            &snapshot(4, 1, &[0, 1, 2], 2),
            3,
            64,
            "2 layers, the model has 3",
        );
        refused(
            &snapshot(2, 1, &[0, 1, 2], 3),
            3,
            64,
            "2 streams, expected 4",
        );
        refused(&good[..good.len() - 1], 3, 64, "ends early");
        let mut longer = good.clone();
        longer.push(0);
        layout.check(&longer, 3, 64).expect_err("a trailing byte");
        // A cell count that claims more cells than the bytes hold.
        let mut lying = good.clone();
        let at = 4 + 4 + 4 + 4; // magic, seq, streams, stream 0's empty count
        lying[at..at + 4].copy_from_slice(&1_000_000u32.to_le_bytes());
        refused(&lying, 3, 64, "more than the state's bytes can hold");
        // A key row size that differs from the probe's, with the bytes to match it.
        let mut wide = snapshot(4, 1, &[0, 1, 2], 3);
        let key_row = at + 4 + 3 * 12 + 16 + 4;
        wide[key_row..key_row + 8].copy_from_slice(&8u64.to_le_bytes());
        wide.drain(key_row + 8..key_row + 8 + 24);
        refused(&wide, 3, 64, "layer 0's keys are type 1, 8-byte rows");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

        /// Whatever the bytes, checking returns (no panic, no allocation past their size).
        #[test]
        fn random_and_mutated_bytes_never_panic(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400),
            flips in proptest::collection::vec((0usize..400, proptest::prelude::any::<u8>()), 0..6),
            cut in 0usize..400,
        ) {
            let layout = layout();
            let _ = layout.check(&bytes, 3, 64);
            let _ = KvLayout::from_probe(&bytes);
            let mut mutated = snapshot(4, 1, &[0, 1, 2], 3);
            for (at, value) in flips {
                let at = at % mutated.len();
                mutated[at] ^= value;
            }
            let _ = layout.check(&mutated, 3, 64);
            // Cut short, a good snapshot is always refused.
            let good = snapshot(4, 1, &[0, 1, 2], 3);
            let cut = cut % good.len();
            proptest::prop_assert!(layout.check(&good[..cut], 3, 64).is_err());
        }
    }
}
