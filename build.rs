//! Embeds common/ and vm-template's provisioning script and workspace watcher in the binary, with each
//! file's mode, so an installed agent-vm provisions without a checkout.

use std::fmt::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

fn walk(root: &Path, rel: &Path, out: &mut Vec<(String, u32)>) {
    let mut entries: Vec<_> = std::fs::read_dir(root.join(rel)).unwrap().map(|e| e.unwrap()).collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let rel = rel.join(e.file_name());
        let meta = std::fs::metadata(e.path()).unwrap();
        if meta.is_dir() {
            walk(root, &rel, out);
        } else {
            out.push((rel.to_str().expect("UTF-8 paths").to_owned(), meta.permissions().mode() & 0o777));
        }
    }
}

fn main() {
    let root = std::env::var("CARGO_MANIFEST_DIR").unwrap();
    let root = Path::new(&root);
    let mut files = Vec::new();
    walk(root, Path::new("common"), &mut files);
    let scripts = ["vm-template/lima-provision.sh", "vm-template/workspace-watch.py"];
    for script in scripts {
        files.push((script.to_owned(), std::fs::metadata(root.join(script)).unwrap().permissions().mode() & 0o777));
    }
    let mut code = String::from("pub static FILES: &[(&str, u32, &[u8])] = &[\n");
    for (rel, mode) in &files {
        // Modes are normalised to what git can record: executable or not.
        let mode = if mode & 0o111 != 0 { 0o755 } else { 0o644 };
        writeln!(code, "    ({rel:?}, 0o{mode:o}, include_bytes!({:?})),", root.join(rel)).unwrap();
    }
    code.push_str("];\n");
    std::fs::write(Path::new(&std::env::var("OUT_DIR").unwrap()).join("embedded.rs"), code).unwrap();
    println!("cargo:rerun-if-changed=common");
    for script in scripts {
        println!("cargo:rerun-if-changed={script}");
    }
}
