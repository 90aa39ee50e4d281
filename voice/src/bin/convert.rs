//! `npc-whisper-convert <ctranslate2-model-dir> <output.bin>`: converts Whisper from
//! CTranslate2's format to whisper.cpp's (see `npc_voice::convert`).

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let [input, output] = args.as_slice() else {
        eprintln!("usage: npc-whisper-convert <ctranslate2-model-dir> <output.bin>");
        return ExitCode::from(2);
    };
    match npc_voice::convert::convert_dir(input, output) {
        Ok(report) => {
            println!("{}: {}", output.display(), report.summary());
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("npc-whisper-convert: {}: {err}", input.display());
            ExitCode::FAILURE
        }
    }
}
