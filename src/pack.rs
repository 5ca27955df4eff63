//! A pack of exactly one branch's history, written on the host without
//! recomputing deltas, with its index, ready to drop into a repository's
//! `objects/pack/`.
//!
//! libgit2's pack builder recomputes every delta (many times slower than
//! git, which reuses them), and a pack sent without an index makes the VM
//! run `git index-pack`, the slowest step on a small guest. Here entries are
//! copied as they are from the host's pack files, a delta kept only when its
//! base is shipped too; everything else (loose objects, deltas against
//! objects that stay home) is written whole from the object database. Only
//! objects reachable from the branch tip go in: other branches, stashes and
//! unreachable objects never leave the host.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use git2::{ObjectType, Oid, Repository};
use sha1::{Digest, Sha1};

const OBJ_COMMIT: u8 = 1;
const OBJ_TREE: u8 = 2;
const OBJ_BLOB: u8 = 3;
const OBJ_TAG: u8 = 4;
const OBJ_OFS_DELTA: u8 = 6;
const OBJ_REF_DELTA: u8 = 7;

/// A pack and its index, written into a directory.
#[derive(Debug)]
pub struct Written {
    pub pack: PathBuf,
    pub idx: PathBuf,
    pub objects: usize,
    /// Entries copied from the host's packs without recompressing.
    pub reused: usize,
}

/// Progress callback: stage, done, total.
pub type Progress<'a> = &'a dyn Fn(&str, usize, usize);

/// libgit2's object hash verification, off while this lives.
struct UnverifiedReads;

impl UnverifiedReads {
    fn new() -> UnverifiedReads {
        git2::opts::strict_hash_verification(false);
        UnverifiedReads
    }
}

impl Drop for UnverifiedReads {
    fn drop(&mut self) {
        git2::opts::strict_hash_verification(true);
    }
}

/// Every object reachable from `tip`: commits, trees, blobs (gitlinks are
/// other repositories' commits and are skipped, as git does).
pub fn reachable(repo: &Repository, tip: Oid, progress: Progress) -> Result<Vec<Oid>> {
    // These are the host's own objects: re-hashing every tree read (libgit2's
    // default) would triple the walk's time. The switch is process-wide, so
    // it is on again as soon as the walk ends (a fetch later in the same
    // process, `run --fetch`, reads objects the VM sent).
    let _unverified = UnverifiedReads::new();
    let mut seen = HashSet::new();
    let mut order = Vec::new();
    let mut walk = repo.revwalk()?;
    walk.push(tip)?;
    let mut trees = Vec::new();
    for commit in walk {
        let commit = repo.find_commit(commit?)?;
        if seen.insert(commit.id()) {
            order.push(commit.id());
        }
        trees.push(commit.tree_id());
        while let Some(id) = trees.pop() {
            if !seen.insert(id) {
                continue;
            }
            order.push(id);
            for entry in repo.find_tree(id)?.iter() {
                match entry.kind() {
                    Some(ObjectType::Tree) => trees.push(entry.id()),
                    Some(ObjectType::Blob) if seen.insert(entry.id()) => order.push(entry.id()),
                    _ => {}
                }
            }
        }
        if order.len() % 4096 < 64 {
            progress("Counting", order.len(), 0);
        }
    }
    Ok(order)
}

/// One `.idx` (version 2) of the host: object names, offsets, CRCs.
struct HostPack {
    pack: File,
    /// (offset, oid, crc), sorted by offset.
    entries: Vec<(u64, Oid, u32)>,
    /// Where the entries end: the start of the pack's trailing checksum.
    data_end: u64,
}

impl HostPack {
    fn open(idx_path: &Path) -> Result<HostPack> {
        let idx = std::fs::read(idx_path)?;
        let bad = || anyhow::anyhow!("{} is not a pack index agent-vm can read", idx_path.display());
        if idx.len() < 8 + 1024 + 40 || idx[..8] != [0xff, b't', b'O', b'c', 0, 0, 0, 2] {
            return Err(bad());
        }
        let be32 = |at: usize| u32::from_be_bytes(idx[at..at + 4].try_into().unwrap());
        let n = be32(8 + 255 * 4) as usize;
        let names = 8 + 1024;
        let crcs = names + 20 * n;
        let offs = crcs + 4 * n;
        let large = offs + 4 * n;
        if idx.len() < large + 40 {
            return Err(bad());
        }
        let mut entries = Vec::with_capacity(n);
        for i in 0..n {
            let oid = Oid::from_bytes(&idx[names + 20 * i..names + 20 * i + 20])?;
            let off = be32(offs + 4 * i);
            let off = if off & 0x8000_0000 == 0 {
                u64::from(off)
            } else {
                let at = large + 8 * (off & 0x7fff_ffff) as usize;
                if idx.len() < at + 8 + 40 {
                    return Err(bad());
                }
                u64::from_be_bytes(idx[at..at + 8].try_into().unwrap())
            };
            entries.push((off, oid, be32(crcs + 4 * i)));
        }
        entries.sort_unstable_by_key(|e| e.0);
        let pack_path = idx_path.with_extension("pack");
        let pack = File::open(&pack_path).with_context(|| format!("cannot open {}", pack_path.display()))?;
        let len = pack.metadata()?.len();
        if len < 32 || entries.last().is_some_and(|e| e.0 >= len - 20) {
            return Err(bad());
        }
        Ok(HostPack { pack, entries, data_end: len - 20 })
    }

    fn oid_at(&self, offset: u64) -> Option<Oid> {
        self.entries.binary_search_by_key(&offset, |e| e.0).ok().map(|i| self.entries[i].1)
    }
}

/// A parsed entry header: kind, the object's (or delta's) size, the delta
/// base (by offset or by name), and where the compressed data starts.
struct Header {
    kind: u8,
    size: u64,
    base_offset: Option<u64>,
    base_oid: Option<Oid>,
    data_start: usize,
}

fn parse_header(raw: &[u8], offset: u64) -> Option<Header> {
    let mut i = 0;
    let mut c = *raw.first()?;
    let kind = (c >> 4) & 7;
    let mut size = u64::from(c & 15);
    let mut shift = 4;
    while c & 0x80 != 0 {
        i += 1;
        c = *raw.get(i)?;
        if shift > 57 {
            return None;
        }
        size |= u64::from(c & 0x7f) << shift;
        shift += 7;
    }
    i += 1;
    let (mut base_offset, mut base_oid) = (None, None);
    match kind {
        OBJ_OFS_DELTA => {
            let mut c = *raw.get(i)?;
            let mut ofs = u64::from(c & 0x7f);
            while c & 0x80 != 0 {
                i += 1;
                c = *raw.get(i)?;
                ofs = ofs.checked_add(1)?.checked_mul(128)? | u64::from(c & 0x7f);
            }
            i += 1;
            base_offset = Some(offset.checked_sub(ofs).filter(|_| ofs > 0)?);
        }
        OBJ_REF_DELTA => {
            base_oid = Some(Oid::from_bytes(raw.get(i..i + 20)?).ok()?);
            i += 20;
        }
        OBJ_COMMIT | OBJ_TREE | OBJ_BLOB | OBJ_TAG => {}
        _ => return None,
    }
    Some(Header { kind, size, base_offset, base_oid, data_start: i })
}

fn encode_header(kind: u8, mut size: u64, out: &mut Vec<u8>) {
    let mut c = (kind << 4) | (size & 15) as u8;
    size >>= 4;
    while size != 0 {
        out.push(c | 0x80);
        c = (size & 0x7f) as u8;
        size >>= 7;
    }
    out.push(c);
}

/// git's offset encoding for OFS_DELTA bases.
fn encode_ofs(mut ofs: u64, out: &mut Vec<u8>) {
    let mut buf = [0u8; 10];
    let mut pos = buf.len() - 1;
    buf[pos] = (ofs & 0x7f) as u8;
    ofs >>= 7;
    while ofs != 0 {
        ofs -= 1;
        pos -= 1;
        buf[pos] = 0x80 | (ofs & 0x7f) as u8;
        ofs >>= 7;
    }
    out.extend_from_slice(&buf[pos..]);
}

/// Counts and hashes what goes through it (the pack's trailing checksum).
struct Hashing<W: Write> {
    inner: W,
    hash: Sha1,
    written: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Writes the pack of everything reachable from `tip` into `dir` (as
/// `pack-<checksum>.pack` and `.idx`).
pub fn write_branch_pack(repo: &Repository, tip: Oid, dir: &Path, progress: Progress) -> Result<Written> {
    let objects = reachable(repo, tip, progress)?;
    let wanted: HashSet<Oid> = objects.iter().copied().collect();
    let odb = repo.odb()?;

    let mut packs = Vec::new();
    let pack_dir = repo.path().join("objects/pack");
    if let Ok(list) = std::fs::read_dir(&pack_dir) {
        for entry in list {
            let path = entry?.path();
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            if name.starts_with("pack-") && name.ends_with(".idx") {
                match HostPack::open(&path) {
                    Ok(p) => packs.push(p),
                    // Its objects are still readable through libgit2.
                    Err(e) => tracing::debug!("not reusing {}: {e:#}", path.display()),
                }
            }
        }
    }

    let tmp_pack = tempfile::NamedTempFile::new_in(dir)?;
    let mut out = Hashing { inner: BufWriter::new(tmp_pack.as_file()), hash: Sha1::new(), written: 0 };
    out.write_all(b"PACK")?;
    out.write_all(&2u32.to_be_bytes())?;
    out.write_all(&u32::try_from(objects.len()).context("too many objects for one pack")?.to_be_bytes())?;

    // New offset of each written object; (oid, crc, offset) for the index.
    let mut written: HashMap<Oid, u64> = HashMap::with_capacity(objects.len());
    let mut index: Vec<(Oid, u32, u64)> = Vec::with_capacity(objects.len());
    let mut raw = Vec::new();
    let mut entry = Vec::new();
    let mut reused = 0;
    let emit = |out: &mut Hashing<_>, index: &mut Vec<_>, written: &mut HashMap<_, _>, oid: Oid, bytes: &[u8]| {
        let at = out.written;
        out.write_all(bytes)?;
        index.push((oid, crc32fast::hash(bytes), at));
        written.insert(oid, at);
        if index.len() % 4096 == 0 {
            progress("Writing", index.len(), objects.len());
        }
        anyhow::Ok(())
    };

    for pack in &packs {
        for (i, &(offset, oid, crc)) in pack.entries.iter().enumerate() {
            if !wanted.contains(&oid) || written.contains_key(&oid) {
                continue;
            }
            let end = pack.entries.get(i + 1).map_or(pack.data_end, |e| e.0);
            raw.resize(usize::try_from(end - offset)?, 0);
            pack.pack.read_exact_at(&mut raw, offset)?;
            // A damaged entry is not copied; libgit2 reads (and checks) the object instead.
            let Some(h) = parse_header(&raw, offset).filter(|_| crc32fast::hash(&raw) == crc) else {
                continue;
            };
            if h.kind == OBJ_OFS_DELTA || h.kind == OBJ_REF_DELTA {
                let base = h.base_oid.or_else(|| h.base_offset.and_then(|o| pack.oid_at(o)));
                // Keep the delta only if its base is already in the new pack.
                let Some(&base_at) = base.and_then(|b| written.get(&b)) else {
                    continue;
                };
                entry.clear();
                encode_header(OBJ_OFS_DELTA, h.size, &mut entry);
                encode_ofs(out.written - base_at, &mut entry);
                entry.extend_from_slice(&raw[h.data_start..]);
                emit(&mut out, &mut index, &mut written, oid, &entry)?;
            } else {
                emit(&mut out, &mut index, &mut written, oid, &raw)?;
            }
            reused += 1;
        }
    }

    // The rest, whole: loose objects, deltas against objects that stay home.
    for &oid in &objects {
        if written.contains_key(&oid) {
            continue;
        }
        let object = odb.read(oid).with_context(|| format!("cannot read object {oid}"))?;
        let kind = match object.kind() {
            ObjectType::Commit => OBJ_COMMIT,
            ObjectType::Tree => OBJ_TREE,
            ObjectType::Blob => OBJ_BLOB,
            ObjectType::Tag => OBJ_TAG,
            other => bail!("object {oid} has an unexpected type {other:?}"),
        };
        entry.clear();
        encode_header(kind, object.len() as u64, &mut entry);
        let mut z = flate2::write::ZlibEncoder::new(std::mem::take(&mut entry), flate2::Compression::default());
        z.write_all(object.data())?;
        entry = z.finish()?;
        emit(&mut out, &mut index, &mut written, oid, &entry)?;
    }
    if index.len() != objects.len() {
        bail!("wrote {} objects, expected {}", index.len(), objects.len());
    }
    let checksum: [u8; 20] = out.hash.clone().finalize().into();
    out.write_all(&checksum)?;
    out.flush()?;
    drop(out);
    tmp_pack.as_file().sync_all()?;

    let tmp_idx = tempfile::NamedTempFile::new_in(dir)?;
    write_index(tmp_idx.as_file(), &mut index, &checksum)?;
    let name = format!("pack-{}", hex(&checksum));
    let (pack, idx) = (dir.join(format!("{name}.pack")), dir.join(format!("{name}.idx")));
    tmp_pack.persist(&pack)?;
    tmp_idx.persist(&idx)?;
    progress("Writing", index.len(), objects.len());
    Ok(Written { pack, idx, objects: objects.len(), reused })
}

/// Pack index version 2: fan-out, sorted names, CRCs, offsets (large ones
/// in a second table), the pack's checksum, then this file's own.
fn write_index(file: &File, index: &mut [(Oid, u32, u64)], pack_checksum: &[u8; 20]) -> Result<()> {
    index.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    let mut out = Hashing { inner: BufWriter::new(file), hash: Sha1::new(), written: 0 };
    out.write_all(&[0xff, b't', b'O', b'c', 0, 0, 0, 2])?;
    let mut fanout = [0u32; 256];
    for (oid, _, _) in index.iter() {
        fanout[oid.as_bytes()[0] as usize] += 1;
    }
    let mut total = 0;
    for count in fanout {
        total += count;
        out.write_all(&total.to_be_bytes())?;
    }
    for (oid, _, _) in index.iter() {
        out.write_all(oid.as_bytes())?;
    }
    for (_, crc, _) in index.iter() {
        out.write_all(&crc.to_be_bytes())?;
    }
    let mut large = Vec::new();
    for &(_, _, offset) in index.iter() {
        let small = match u32::try_from(offset) {
            Ok(o) if o & 0x8000_0000 == 0 => o,
            _ => {
                large.push(offset);
                0x8000_0000 | u32::try_from(large.len() - 1)?
            }
        };
        out.write_all(&small.to_be_bytes())?;
    }
    for offset in large {
        out.write_all(&offset.to_be_bytes())?;
    }
    out.write_all(pack_checksum)?;
    let own: [u8; 20] = out.hash.clone().finalize().into();
    out.write_all(&own)?;
    out.flush()?;
    drop(out);
    file.sync_all()?;
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_git::git;

    fn commit_file(dir: &Path, name: &str, text: &str) {
        std::fs::write(dir.join(name), text).unwrap();
        git(dir, &["add", name]);
        git(dir, &["commit", "-q", "-m", name]);
    }

    /// Tests that walk a repository (and so switch libgit2's verification).
    static WALKS: std::sync::Mutex<()> = std::sync::Mutex::new(());

    /// After the walk, libgit2 checks object hashes again: a loose object
    /// whose content does not match its name is refused, not read.
    #[test]
    fn hash_verification_is_back_on_after_the_walk() {
        // The switch is process-wide: no other walk may run meanwhile.
        let _alone = WALKS.lock().unwrap_or_else(|e| e.into_inner());
        let tmp = tempfile::tempdir().unwrap();
        git(tmp.path(), &["init", "-q"]);
        commit_file(tmp.path(), "f", "hello");
        let repo = Repository::open(tmp.path()).unwrap();
        let blob = repo.blob(b"a blob of mine").unwrap();
        let tip = repo.head().unwrap().target().unwrap();
        assert!(reachable(&repo, tip, &|_, _, _| {}).unwrap().len() >= 3);
        // Same length, other bytes, under the old name.
        let hex = blob.to_string();
        let path = tmp.path().join(".git/objects").join(&hex[..2]).join(&hex[2..]);
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        std::io::Write::write_all(&mut z, b"blob 14\0a blob of your").unwrap();
        let mut perms = std::fs::metadata(&path).unwrap().permissions();
        #[allow(clippy::permissions_set_readonly_false)]
        perms.set_readonly(false);
        std::fs::set_permissions(&path, perms).unwrap();
        std::fs::write(&path, z.finish().unwrap()).unwrap();
        let fresh = Repository::open(tmp.path()).unwrap();
        assert!(fresh.find_blob(blob).is_err(), "a corrupt object was read as valid");
    }

    #[test]
    fn offsets_encode_as_git_decodes_them() {
        for ofs in [1u64, 127, 128, 129, 16511, 16512, 1 << 31, u64::from(u32::MAX) * 3] {
            let mut buf = vec![0x60];
            encode_ofs(ofs, &mut buf);
            let h = parse_header(&buf, 1 << 40).unwrap();
            assert_eq!(h.base_offset, Some((1 << 40) - ofs), "{ofs}");
            assert_eq!(h.data_start, buf.len());
        }
        for size in [0u64, 15, 16, 2047, 2048, 1 << 40] {
            let mut buf = Vec::new();
            encode_header(OBJ_BLOB, size, &mut buf);
            let h = parse_header(&buf, 0).unwrap();
            assert_eq!((h.kind, h.size), (OBJ_BLOB, size));
        }
    }

    /// A packed repository whose branch blob is stored as a delta against a
    /// blob of another branch: the pack must hold exactly the branch's
    /// objects, pass git's own checks, and carry nothing of the other branch.
    #[test]
    fn branch_pack_is_exact_complete_and_valid() {
        let _alone = WALKS.lock().unwrap_or_else(|e| e.into_inner());
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        std::fs::create_dir(&src).unwrap();
        git(&src, &["init", "-q"]);
        let body: String = (0..400).map(|i| format!("line {i} of a file that deltas well\n")).collect();
        for i in 0..30 {
            commit_file(&src, "common.txt", &format!("{body}version {i}\n"));
        }
        git(&src, &["checkout", "-q", "-b", "private"]);
        commit_file(&src, "common.txt", &format!("{body}version 29\nTOP-SECRET-TOKEN\n"));
        std::fs::write(src.join("common.txt"), "stashed secret\n").unwrap();
        git(&src, &["stash", "-q"]);
        git(&src, &["checkout", "-q", "main"]);
        commit_file(&src, "loose.txt", "a loose object after the repack\n");
        git(&src, &["repack", "-adq", "--window=50", "--depth=50"]);
        commit_file(&src, "later.txt", "loose\n");

        let secret = git(&src, &["rev-parse", "private:common.txt"]).trim().to_owned();
        let shipped = git(&src, &["rev-parse", "main:common.txt"]).trim().to_owned();
        // The case that matters: the host stores the branch's blob as a delta
        // against the other branch's secret blob.
        let idx = std::fs::read_dir(src.join(".git/objects/pack"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|x| x == "idx"))
            .unwrap();
        let host_verify = git(&src, &["verify-pack", "-v", idx.to_str().unwrap()]);
        assert!(
            host_verify.lines().any(|l| l.starts_with(&shipped) && l.ends_with(&secret)),
            "precondition: {shipped} is a delta against {secret} on the host"
        );
        let main = Oid::from_str(git(&src, &["rev-parse", "main"]).trim()).unwrap();
        let repo = Repository::open(&src).unwrap();
        let out = tmp.path().join("out.git");
        git(tmp.path(), &["init", "-q", "--bare", "out.git"]);
        let written = write_branch_pack(&repo, main, &out.join("objects/pack"), &|_, _, _| {}).unwrap();
        assert!(written.reused > 0, "nothing was reused from the host's pack: {written:?}");

        let verify = git(tmp.path(), &["verify-pack", "-v", written.idx.to_str().unwrap()]);
        let listed: HashSet<String> =
            verify.lines().filter_map(|l| l.split(' ').next()).filter(|w| w.len() == 40).map(str::to_owned).collect();
        let expected: HashSet<String> =
            git(&src, &["rev-list", "--objects", "main"]).lines().map(|l| l[..40].to_owned()).collect();
        assert_eq!(listed, expected, "the pack holds exactly the branch's objects");
        assert!(!listed.contains(&secret));
        assert!(verify.contains(" delta") || verify.contains("chain length"), "deltas were kept: {verify}");

        git(&out, &["update-ref", "refs/heads/main", &main.to_string()]);
        git(&out, &["fsck", "--full", "--strict", "--no-dangling"]);
        assert_eq!(
            git(&out, &["rev-list", "--count", "main"]).trim(),
            git(&src, &["rev-list", "--count", "main"]).trim()
        );
        let out_text = std::fs::read(&written.pack).unwrap();
        assert!(!out_text.windows(16).any(|w| w == b"TOP-SECRET-TOKEN"));
    }
}
