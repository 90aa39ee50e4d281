//! The framed protocol between the game and the `npc-voice` helper, over the helper's stdin
//! and stdout.
//!
//! Every frame is a little-endian `u32` byte length, then that many bytes: a `u8` tag and the
//! body. Audio is 16 kHz mono `f32` PCM; strings are a `u32` byte length and UTF-8. The helper
//! answers each [`Request::Transcribe`] with exactly one [`Reply::Transcript`] or
//! [`Reply::Failed`] carrying the same id, in order.

use std::io::{self, Read, Write};

/// Sample rate of all audio crossing the protocol.
pub const SAMPLE_RATE: u32 = 16_000;

/// Largest frame either side accepts (10 minutes of audio); a larger length prefix means a
/// corrupt stream.
pub const MAX_FRAME: usize = 4 + 8 + SAMPLE_RATE as usize * 600 * 4;

/// Game → helper.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    /// Transcribe one utterance.
    Transcribe {
        /// Chosen by the client; echoed in the reply.
        id: u64,
        /// 16 kHz mono samples in `[-1, 1]`.
        samples: Vec<f32>,
    },
    /// Finish and exit.
    Shutdown,
}

/// One timed piece of a transcript.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    /// Start, milliseconds from the start of the utterance.
    pub start_ms: u32,
    /// End, milliseconds from the start of the utterance.
    pub end_ms: u32,
    /// The words.
    pub text: String,
}

/// Helper → game.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// The model is loaded; requests are served from now on.
    Ready {
        /// Milliseconds the model took to load.
        load_ms: u32,
        /// Model description (type and file).
        model: String,
    },
    /// An utterance's transcript.
    Transcript {
        /// The request's id.
        id: u64,
        /// The whole text, trimmed.
        text: String,
        /// Timed segments.
        segments: Vec<Segment>,
        /// Milliseconds of audio received.
        audio_ms: u32,
        /// Milliseconds spent recognising it.
        decode_ms: u32,
    },
    /// An utterance could not be transcribed.
    Failed {
        /// The request's id.
        id: u64,
        /// Why.
        message: String,
    },
    /// The helper cannot work at all (e.g. the model does not load) and exits.
    Fatal {
        /// Why.
        message: String,
    },
}

const TRANSCRIBE: u8 = 0x01;
const SHUTDOWN: u8 = 0x02;
const READY: u8 = 0x81;
const TRANSCRIPT: u8 = 0x82;
const FAILED: u8 = 0x83;
const FATAL: u8 = 0x84;

fn invalid(message: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.into())
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

struct Body<'a>(&'a [u8]);

impl Body<'_> {
    fn take(&mut self, n: usize) -> io::Result<&[u8]> {
        if self.0.len() < n {
            return Err(invalid("frame body ends early"));
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }
    fn u32(&mut self) -> io::Result<u32> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().unwrap_or_default(),
        ))
    }
    fn u64(&mut self) -> io::Result<u64> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().unwrap_or_default(),
        ))
    }
    fn string(&mut self) -> io::Result<String> {
        let n = self.u32()? as usize;
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| invalid("string is not UTF-8"))
    }
    fn finish(&self) -> io::Result<()> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(invalid(format!("{} trailing bytes in frame", self.0.len())))
        }
    }
}

fn write_frame(out: &mut impl Write, payload: &[u8]) -> io::Result<()> {
    if payload.len() > MAX_FRAME {
        return Err(invalid(format!(
            "frame of {} bytes exceeds {MAX_FRAME}",
            payload.len()
        )));
    }
    out.write_all(&(payload.len() as u32).to_le_bytes())?;
    out.write_all(payload)?;
    out.flush()
}

/// Reads one frame's payload; `Ok(None)` on a clean end of stream before a frame starts.
fn read_frame(input: &mut impl Read) -> io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match input.read(&mut len[got..])? {
            0 if got == 0 => return Ok(None),
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n => got += n,
        }
    }
    let len = u32::from_le_bytes(len) as usize;
    if len == 0 || len > MAX_FRAME {
        return Err(invalid(format!("frame length {len} is out of range")));
    }
    let mut payload = vec![0; len];
    input.read_exact(&mut payload)?;
    Ok(Some(payload))
}

impl Request {
    /// Writes the request as one frame.
    pub fn write(&self, out: &mut impl Write) -> io::Result<()> {
        let mut p = Vec::new();
        match self {
            Self::Transcribe { id, samples } => {
                p.reserve(9 + samples.len() * 4);
                p.push(TRANSCRIBE);
                p.extend_from_slice(&id.to_le_bytes());
                for s in samples {
                    p.extend_from_slice(&s.to_le_bytes());
                }
            }
            Self::Shutdown => p.push(SHUTDOWN),
        }
        write_frame(out, &p)
    }

    /// Reads one request; `Ok(None)` when the stream ended cleanly.
    pub fn read(input: &mut impl Read) -> io::Result<Option<Self>> {
        let Some(payload) = read_frame(input)? else {
            return Ok(None);
        };
        let mut b = Body(&payload[1..]);
        let request = match payload[0] {
            TRANSCRIBE => {
                let id = b.u64()?;
                if b.0.len() % 4 != 0 {
                    return Err(invalid("audio is not a whole number of f32 samples"));
                }
                let samples = b
                    .take(b.0.len())?
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                Self::Transcribe { id, samples }
            }
            SHUTDOWN => Self::Shutdown,
            tag => return Err(invalid(format!("unknown request tag {tag:#04x}"))),
        };
        b.finish()?;
        Ok(Some(request))
    }
}

impl Reply {
    /// Writes the reply as one frame.
    pub fn write(&self, out: &mut impl Write) -> io::Result<()> {
        let mut p = Vec::new();
        match self {
            Self::Ready { load_ms, model } => {
                p.push(READY);
                p.extend_from_slice(&load_ms.to_le_bytes());
                put_str(&mut p, model);
            }
            Self::Transcript {
                id,
                text,
                segments,
                audio_ms,
                decode_ms,
            } => {
                p.push(TRANSCRIPT);
                p.extend_from_slice(&id.to_le_bytes());
                p.extend_from_slice(&audio_ms.to_le_bytes());
                p.extend_from_slice(&decode_ms.to_le_bytes());
                put_str(&mut p, text);
                p.extend_from_slice(&(segments.len() as u32).to_le_bytes());
                for s in segments {
                    p.extend_from_slice(&s.start_ms.to_le_bytes());
                    p.extend_from_slice(&s.end_ms.to_le_bytes());
                    put_str(&mut p, &s.text);
                }
            }
            Self::Failed { id, message } => {
                p.push(FAILED);
                p.extend_from_slice(&id.to_le_bytes());
                put_str(&mut p, message);
            }
            Self::Fatal { message } => {
                p.push(FATAL);
                put_str(&mut p, message);
            }
        }
        write_frame(out, &p)
    }

    /// Reads one reply; `Ok(None)` when the stream ended cleanly.
    pub fn read(input: &mut impl Read) -> io::Result<Option<Self>> {
        let Some(payload) = read_frame(input)? else {
            return Ok(None);
        };
        let mut b = Body(&payload[1..]);
        let reply = match payload[0] {
            READY => Self::Ready {
                load_ms: b.u32()?,
                model: b.string()?,
            },
            TRANSCRIPT => {
                let id = b.u64()?;
                let audio_ms = b.u32()?;
                let decode_ms = b.u32()?;
                let text = b.string()?;
                let n = b.u32()? as usize;
                let mut segments = Vec::with_capacity(n.min(1024));
                for _ in 0..n {
                    segments.push(Segment {
                        start_ms: b.u32()?,
                        end_ms: b.u32()?,
                        text: b.string()?,
                    });
                }
                Self::Transcript {
                    id,
                    text,
                    segments,
                    audio_ms,
                    decode_ms,
                }
            }
            FAILED => Self::Failed {
                id: b.u64()?,
                message: b.string()?,
            },
            FATAL => Self::Fatal {
                message: b.string()?,
            },
            tag => return Err(invalid(format!("unknown reply tag {tag:#04x}"))),
        };
        b.finish()?;
        Ok(Some(reply))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_replies_round_trip_in_sequence() {
        let requests = [
            Request::Transcribe {
                id: 7,
                samples: vec![0.0, -1.0, 0.5],
            },
            Request::Transcribe {
                id: 8,
                samples: Vec::new(),
            },
            Request::Shutdown,
        ];
        let mut wire = Vec::new();
        for r in &requests {
            r.write(&mut wire).unwrap();
        }
        let mut input = wire.as_slice();
        for r in &requests {
            assert_eq!(Request::read(&mut input).unwrap().as_ref(), Some(r));
        }
        assert_eq!(Request::read(&mut input).unwrap(), None);

        let replies = [
            Reply::Ready {
                load_ms: 120,
                model: "tiny".into(),
            },
            Reply::Transcript {
                id: 7,
                text: "Hello there.".into(),
                segments: vec![Segment {
                    start_ms: 0,
                    end_ms: 900,
                    text: " Hello there.".into(),
                }],
                audio_ms: 1000,
                decode_ms: 250,
            },
            Reply::Failed {
                id: 8,
                message: "empty".into(),
            },
            Reply::Fatal {
                message: "no model".into(),
            },
        ];
        let mut wire = Vec::new();
        for r in &replies {
            r.write(&mut wire).unwrap();
        }
        let mut input = wire.as_slice();
        for r in &replies {
            assert_eq!(Reply::read(&mut input).unwrap().as_ref(), Some(r));
        }
        assert_eq!(Reply::read(&mut input).unwrap(), None);
    }

    #[test]
    fn corrupt_streams_are_errors_not_panics() {
        let mut wire = Vec::new();
        Request::Transcribe {
            id: 1,
            samples: vec![1.0; 4],
        }
        .write(&mut wire)
        .unwrap();
        for cut in 1..wire.len() {
            assert!(Request::read(&mut &wire[..cut]).is_err(), "cut at {cut}");
        }
        let huge = (MAX_FRAME as u32 + 1).to_le_bytes();
        assert!(
            Request::read(&mut &huge[..])
                .unwrap_err()
                .to_string()
                .contains("out of range")
        );
        let unknown = [1u8, 0, 0, 0, 0x55];
        assert!(
            Reply::read(&mut &unknown[..])
                .unwrap_err()
                .to_string()
                .contains("unknown reply tag")
        );
        let odd = [3u8, 0, 0, 0, TRANSCRIBE, 0, 0];
        assert!(Request::read(&mut &odd[..]).is_err());
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;

        fn request() -> impl Strategy<Value = Request> {
            prop_oneof![
                (
                    any::<u64>(),
                    proptest::collection::vec(-1.0f32..=1.0, 0..64)
                )
                    .prop_map(|(id, samples)| Request::Transcribe { id, samples }),
                Just(Request::Shutdown),
            ]
        }

        fn reply() -> impl Strategy<Value = Reply> {
            let segment =
                (any::<u32>(), any::<u32>(), ".{0,20}").prop_map(|(start_ms, end_ms, text)| {
                    Segment {
                        start_ms,
                        end_ms,
                        text,
                    }
                });
            prop_oneof![
                (any::<u32>(), ".{0,30}")
                    .prop_map(|(load_ms, model)| Reply::Ready { load_ms, model }),
                (
                    any::<u64>(),
                    ".{0,40}",
                    proptest::collection::vec(segment, 0..5),
                    any::<u32>(),
                    any::<u32>()
                )
                    .prop_map(|(id, text, segments, audio_ms, decode_ms)| {
                        Reply::Transcript {
                            id,
                            text,
                            segments,
                            audio_ms,
                            decode_ms,
                        }
                    }),
                (any::<u64>(), ".{0,30}").prop_map(|(id, message)| Reply::Failed { id, message }),
                ".{0,30}".prop_map(|message| Reply::Fatal { message }),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn every_request_and_reply_round_trips(
                requests in proptest::collection::vec(request(), 0..4),
                replies in proptest::collection::vec(reply(), 0..4),
            ) {
                let mut wire = Vec::new();
                for r in &requests {
                    r.write(&mut wire).unwrap();
                }
                let mut input = wire.as_slice();
                for r in &requests {
                    prop_assert_eq!(Request::read(&mut input).unwrap(), Some(r.clone()));
                }
                prop_assert_eq!(Request::read(&mut input).unwrap(), None);
                let mut wire = Vec::new();
                for r in &replies {
                    r.write(&mut wire).unwrap();
                }
                let mut input = wire.as_slice();
                for r in &replies {
                    prop_assert_eq!(Reply::read(&mut input).unwrap(), Some(r.clone()));
                }
                prop_assert_eq!(Reply::read(&mut input).unwrap(), None);
            }

            #[test]
            fn a_cut_stream_is_an_error_or_the_frames_before_the_cut(
                replies in proptest::collection::vec(reply(), 1..4),
                cut in any::<proptest::sample::Index>(),
            ) {
                let mut wire = Vec::new();
                for r in &replies {
                    r.write(&mut wire).unwrap();
                }
                let cut = cut.index(wire.len());
                let mut input = &wire[..cut];
                let mut read = 0;
                while let Ok(Some(reply)) = Reply::read(&mut input) {
                    prop_assert_eq!(&reply, &replies[read]);
                    read += 1;
                }
                prop_assert!(read < replies.len());
            }

            #[test]
            fn random_bytes_are_errors_not_panics_and_reading_ends(
                bytes in proptest::collection::vec(any::<u8>(), 0..256),
            ) {
                for tagged in [false, true] {
                    // With a plausible length prefix, the body's parser is reached too.
                    let mut wire = Vec::new();
                    if tagged {
                        wire.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
                    }
                    wire.extend_from_slice(&bytes);
                    let mut input = wire.as_slice();
                    for _ in 0..=wire.len() {
                        match Reply::read(&mut input) {
                            Ok(Some(_)) => {}
                            Ok(None) | Err(_) => break,
                        }
                    }
                    let mut input = wire.as_slice();
                    for _ in 0..=wire.len() {
                        match Request::read(&mut input) {
                            Ok(Some(_)) => {}
                            Ok(None) | Err(_) => break,
                        }
                    }
                }
            }
        }
    }
}
