//! What a fetch shows the VM of the host repository. libgit2 tells the
//! remote about every local ref while negotiating (up to 256 commits of
//! other branches, tags, the stash). A fetch therefore runs in a view: a
//! bare repository holding only the branch's refs, borrowing the host's
//! objects through `objects/info/alternates`. What arrives is checked in
//! the view (sizes, completeness) and moved into the host repository only
//! then: refused objects never reach it.

use std::path::Path;

use anyhow::{Context, Result, bail};
use git2::{Oid, Repository};

/// The largest object (file, tree or commit, uncompressed) a fetch takes
/// from the VM, unless overridden: packs are compressed, so a few MB from
/// the VM could otherwise become gigabytes of memory and disk on the host.
/// GitHub refuses files over 100 MiB too.
pub const DEFAULT_MAX_OBJECT: u64 = 100 << 20;
pub const MAX_OBJECT_ENV: &str = "AGENT_VM_MAX_OBJECT_BYTES";

pub fn max_object_bytes() -> u64 {
    std::env::var(MAX_OBJECT_ENV).ok().and_then(|v| v.trim().parse().ok()).unwrap_or(DEFAULT_MAX_OBJECT)
}

pub struct View {
    dir: tempfile::TempDir,
    pub repo: Repository,
}

impl View {
    /// A view of `host_git_dir` with `refs` (name, id) only. It lives in the
    /// host's git dir, so what it receives moves by rename.
    pub fn new(host_git_dir: &Path, refs: &[(String, Oid)]) -> Result<View> {
        let parent = host_git_dir.join("agent-vm");
        std::fs::create_dir_all(&parent).with_context(|| format!("cannot create {}", parent.display()))?;
        remove_abandoned(&parent);
        let dir = tempfile::Builder::new().prefix("fetch-").tempdir_in(&parent)?;
        let repo = Repository::init_bare(dir.path())?;
        let objects = host_git_dir.join("objects").canonicalize()?;
        std::fs::write(dir.path().join("objects/info/alternates"), format!("{}\n", objects.display()))?;
        for (name, id) in refs {
            repo.reference(name, *id, true, "agent-vm fetch view")?;
        }
        Ok(View { dir, repo })
    }

    /// The view's repository opened afresh (it sees the packs that
    /// arrived since it was opened).
    pub fn reopen(&self) -> Result<Repository> {
        Ok(Repository::open(self.dir.path())?)
    }

    /// Refuses when any object the VM sent is larger than `max` bytes
    /// uncompressed: read from object headers, before anything is parsed,
    /// checked out or moved into the host repository. Names the object's
    /// path in `tip` when it is a file there.
    pub fn check_sizes(&self, host_git_dir: &Path, tip: Oid, max: u64) -> Result<()> {
        // libgit2 follows a disk alternate's own alternates (the host's
        // objects): with them set aside, the odb holds what arrived only.
        let alternates = self.dir.path().join("objects/info/alternates");
        let aside = alternates.with_extension("aside");
        std::fs::rename(&alternates, &aside)?;
        let received = git2::Odb::new().and_then(|odb| {
            odb.add_disk_alternate(&self.dir.path().join("objects").to_string_lossy())?;
            Ok(odb)
        });
        std::fs::rename(&aside, &alternates)?;
        let received = received?;
        // A thin pack is completed with copies of host objects: not the VM's.
        let host_repo = Repository::open(host_git_dir)?;
        let host = host_repo.odb()?;
        let mut too_big = None;
        received.foreach(|id| {
            match received.read_header(*id) {
                Ok((size, _)) if size as u64 > max && host.exists(*id) => {}
                Ok((size, kind)) if size as u64 > max => too_big = Some((*id, size as u64, kind)),
                // Within the limit by its header; read whole (into at most
                // that much memory) and hashed, so a header that understates
                // what the data inflates to is caught here too.
                Ok(_) if received.read(*id).is_ok() => {}
                _ => too_big = Some((*id, u64::MAX, git2::ObjectType::Any)),
            }
            too_big.is_none()
        })?;
        let Some((id, size, kind)) = too_big else { return Ok(()) };
        if size == u64::MAX {
            bail!("the VM sent a corrupt object {id} (its data does not match its header or id); nothing was changed");
        }
        let what = match (kind, path_in(&self.reopen()?, tip, id, max)) {
            (_, Some(path)) => format!("the file {:?}", crate::printable(&path)),
            (git2::ObjectType::Blob, None) => format!("a file (object {id})"),
            (kind, None) => format!("a {kind} (object {id})"),
        };
        bail!(
            "the VM sent {what} of {}, over the limit of {} a fetched object may have; nothing was changed. \
             If the file is meant to be there, set {MAX_OBJECT_ENV} (bytes) higher and fetch again",
            human(size),
            human(max)
        )
    }

    /// Moves the packs (each before its index, so git never sees an index
    /// without its pack) and any loose objects the view received into the
    /// host repository.
    pub fn move_objects_into(self, host_git_dir: &Path) -> Result<()> {
        let from = self.dir.path().join("objects");
        let to = host_git_dir.join("objects");
        let pack_dir = from.join("pack");
        let mut packs: Vec<_> = std::fs::read_dir(&pack_dir)?.flatten().map(|e| e.path()).collect();
        // `.pack` sorts before `.idx` only by this key.
        packs.sort_by_key(|p| (p.extension().is_some_and(|e| e == "idx"), p.clone()));
        std::fs::create_dir_all(to.join("pack"))?;
        for p in packs {
            let name = p.file_name().context("pack file name")?;
            std::fs::rename(&p, to.join("pack").join(name))?;
        }
        for entry in std::fs::read_dir(&from)?.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.len() != 2 || !name.bytes().all(|b| b.is_ascii_hexdigit()) {
                continue;
            }
            std::fs::create_dir_all(to.join(&*name))?;
            for obj in std::fs::read_dir(entry.path())?.flatten() {
                let dest = to.join(&*name).join(obj.file_name());
                if !dest.exists() {
                    std::fs::rename(obj.path(), dest)?;
                }
            }
        }
        Ok(())
    }
}

/// Where `blob` is in `tip`'s tree, looking only through trees within the
/// limit (best effort, for the message).
fn path_in(repo: &Repository, tip: Oid, blob: Oid, max: u64) -> Option<String> {
    let odb = repo.odb().ok()?;
    let small = |id: Oid| odb.read_header(id).is_ok_and(|(size, _)| size as u64 <= max);
    if !small(tip) {
        return None;
    }
    let tree = repo.find_commit(tip).ok()?.tree_id();
    let mut stack = vec![(tree, String::new())];
    let mut seen = std::collections::HashSet::new();
    while let Some((id, prefix)) = stack.pop() {
        if !seen.insert(id) || !small(id) {
            continue;
        }
        for entry in repo.find_tree(id).ok()?.iter() {
            let path = format!("{prefix}{}", String::from_utf8_lossy(entry.name_bytes()));
            if entry.id() == blob {
                return Some(path);
            }
            if entry.kind() == Some(git2::ObjectType::Tree) {
                stack.push((entry.id(), path + "/"));
            }
        }
    }
    None
}

/// Bytes for people: 1.5 GiB, 100 MiB, 12 KiB, 7 bytes.
fn human(n: u64) -> String {
    let units = [(1u64 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
    for (size, unit) in units {
        if n >= size {
            let v = n as f64 / size as f64;
            return if v.fract() == 0.0 { format!("{v:.0} {unit}") } else { format!("{v:.1} {unit}") };
        }
    }
    format!("{n} bytes")
}

/// Views left behind by a fetch that was killed: an hour old is long past
/// any fetch still running.
fn remove_abandoned(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else { return };
    for e in entries.flatten() {
        let old = e.metadata().ok().and_then(|m| m.modified().ok()).and_then(|t| t.elapsed().ok());
        if e.file_name().to_string_lossy().starts_with("fetch-") && old.is_some_and(|a| a.as_secs() > 3600) {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_git::git;

    /// A VM clone one commit ahead of the host with `size` zero bytes in
    /// `deep/big.bin` (a few KB once packed), fetched into a view.
    fn fetched_view(size: usize) -> (tempfile::TempDir, std::path::PathBuf, View, Oid) {
        let tmp = tempfile::tempdir().unwrap();
        let host = tmp.path().join("host");
        std::fs::create_dir(&host).unwrap();
        git(&host, &["init", "-q"]);
        std::fs::write(host.join("README"), "v1\n").unwrap();
        git(&host, &["add", "."]);
        git(&host, &["commit", "-qm", "one"]);
        let vm = tmp.path().join("vm");
        git(tmp.path(), &["clone", "-q", host.to_str().unwrap(), vm.to_str().unwrap()]);
        std::fs::create_dir(vm.join("deep")).unwrap();
        std::fs::write(vm.join("deep/big.bin"), vec![0u8; size]).unwrap();
        git(&vm, &["add", "."]);
        git(&vm, &["commit", "-qm", "big"]);
        git(&vm, &["repack", "-qad"]);
        let tip = Oid::from_str(git(&vm, &["rev-parse", "HEAD"]).trim()).unwrap();
        let old = Oid::from_str(git(&host, &["rev-parse", "HEAD"]).trim()).unwrap();
        let git_dir = host.join(".git");
        let view = View::new(&git_dir, &[("refs/heads/main".to_owned(), old)]).unwrap();
        let url = format!("file://{}", vm.display());
        view.repo.remote_anonymous(&url).unwrap().fetch(&["refs/heads/main"], None, None).unwrap();
        (tmp, git_dir, view, tip)
    }

    #[test]
    fn objects_over_the_limit_are_refused_before_they_reach_the_host() {
        let (_tmp, git_dir, view, tip) = fetched_view(3 << 20);
        let err = view.check_sizes(&git_dir, tip, 1 << 20).unwrap_err().to_string();
        assert!(err.contains("\"deep/big.bin\"") && err.contains("3 MiB") && err.contains("1 MiB"), "{err}");
        assert!(err.contains(MAX_OBJECT_ENV), "{err}");
        // Within the limit, the same objects pass, and only then move in.
        view.check_sizes(&git_dir, tip, 4 << 20).unwrap();
        let host = Repository::open(&git_dir).unwrap();
        assert!(host.find_commit(tip).is_err(), "objects reached the host before the checks");
        view.move_objects_into(&git_dir).unwrap();
        assert!(Repository::open(&git_dir).unwrap().find_commit(tip).is_ok());
    }

    #[test]
    fn the_check_leaves_the_view_working() {
        let (_tmp, git_dir, view, tip) = fetched_view(10);
        view.check_sizes(&git_dir, tip, 1 << 20).unwrap();
        // The alternates are back: the view still sees the host's objects.
        let old = view.repo.refname_to_id("refs/heads/main").unwrap();
        assert!(view.reopen().unwrap().find_commit(old).is_ok());
    }

    #[test]
    fn sizes_read_for_people() {
        assert_eq!(human(100 << 20), "100 MiB");
        assert_eq!(human(3 << 29), "1.5 GiB");
        assert_eq!(human(7), "7 bytes");
    }

    /// A pack entry header: type and (declared) size.
    fn entry_header(kind: u8, mut size: usize) -> Vec<u8> {
        let mut out = Vec::new();
        let mut c = (kind << 4) | (size & 15) as u8;
        size >>= 4;
        while size > 0 {
            out.push(c | 0x80);
            c = (size & 0x7f) as u8;
            size >>= 7;
        }
        out.push(c);
        out
    }

    fn deflate(data: &[u8]) -> Vec<u8> {
        use std::io::Write;
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
        z.write_all(data).unwrap();
        z.finish().unwrap()
    }

    /// A blob whose header says 5 bytes while its data inflates to 8 MiB:
    /// libgit2 indexes it, and only reading it whole shows the lie.
    #[test]
    fn a_header_that_understates_its_data_is_caught() {
        use sha1::Digest;
        let (_tmp, git_dir, view, _) = fetched_view(10);
        let big = vec![0u8; 8 << 20];
        let id = |kind: &str, declared: usize, data: &[u8]| {
            let mut h = sha1::Sha1::new();
            h.update(format!("{kind} {declared}\0").as_bytes());
            h.update(data);
            Oid::from_bytes(&h.finalize()).unwrap()
        };
        let blob = id("blob", 5, &big);
        let mut tree = b"100644 lie.bin\0".to_vec();
        tree.extend_from_slice(blob.as_bytes());
        let tree_id = id("tree", tree.len(), &tree);
        let commit = format!("tree {tree_id}\nauthor a <a> 0 +0000\ncommitter a <a> 0 +0000\n\nlie\n");
        let commit_id = id("commit", commit.len(), commit.as_bytes());
        let mut pack = b"PACK".to_vec();
        pack.extend_from_slice(&2u32.to_be_bytes());
        pack.extend_from_slice(&3u32.to_be_bytes());
        for (kind, declared, data) in
            [(3u8, 5, big.as_slice()), (2, tree.len(), &tree), (1, commit.len(), commit.as_bytes())]
        {
            pack.extend(entry_header(kind, declared));
            pack.extend(deflate(data));
        }
        let sum = sha1::Sha1::digest(&pack);
        pack.extend_from_slice(&sum);
        let odb = view.repo.odb().unwrap();
        let mut writer = odb.packwriter().unwrap();
        std::io::Write::write_all(&mut writer, &pack).unwrap();
        writer.commit().unwrap();
        assert!(view.reopen().unwrap().odb().unwrap().exists(blob), "libgit2 took the pack");
        let err = view.check_sizes(&git_dir, commit_id, 1 << 20).unwrap_err().to_string();
        assert!(err.contains("corrupt object"), "{err}");
    }
}
