//! Assembles every `guest/*.S` into a flat binary `$OUT_DIR/<name>.bin`
//! (linked at the code GPA by `guest/guest.ld`), for `src/vmm/guests.rs`,
//! when the `vmm` feature is on; without it there is nothing to build.

use std::env;
use std::path::{Path, PathBuf};
use std::process::{exit, Command};

const INSTALL_HINT: &str =
    "guestmm builds its test guests with gcc, ld and objcopy: install them (Debian: `apt-get install gcc binutils`)";

fn run(tool: &str, args: &[&std::ffi::OsStr]) {
    let status = match Command::new(tool).args(args).status() {
        Ok(status) => status,
        Err(e) => {
            eprintln!("error: cannot run `{tool}`: {e}. {INSTALL_HINT}");
            exit(1);
        }
    };
    if !status.success() {
        eprintln!("error: `{tool} {args:?}` failed with {status}");
        exit(1);
    }
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    // Only tinyvmm and its tests need the guests: a VMM linking the library
    // must build without the guest toolchain.
    if env::var_os("CARGO_FEATURE_VMM").is_none() {
        return;
    }
    let guest_dir = Path::new("guest");
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    println!("cargo:rerun-if-changed=guest");

    for tool in ["gcc", "ld", "objcopy"] {
        if Command::new(tool).arg("--version").output().is_err() {
            eprintln!("error: `{tool}` not found. {INSTALL_HINT}");
            exit(1);
        }
    }

    let mut sources: Vec<PathBuf> = std::fs::read_dir(guest_dir)
        .expect("guest/ exists in the crate")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "S"))
        .collect();
    sources.sort();
    let ld_script = guest_dir.join("guest.ld");
    for src in sources {
        println!("cargo:rerun-if-changed={}", src.display());
        let name = src.file_stem().expect("a .S file has a stem");
        let obj = out.join(name).with_extension("o");
        let elf = out.join(name).with_extension("elf");
        let bin = out.join(name).with_extension("bin");
        run(
            "gcc",
            &[
                "-c".as_ref(),
                "-nostdlib".as_ref(),
                "-ffreestanding".as_ref(),
                "-fno-pic".as_ref(),
                "-Iguest".as_ref(),
                "-o".as_ref(),
                obj.as_os_str(),
                src.as_os_str(),
            ],
        );
        run(
            "ld",
            &[
                "-T".as_ref(),
                ld_script.as_os_str(),
                "-nostdlib".as_ref(),
                "-static".as_ref(),
                "-o".as_ref(),
                elf.as_os_str(),
                obj.as_os_str(),
            ],
        );
        run(
            "objcopy",
            &[
                "-O".as_ref(),
                "binary".as_ref(),
                elf.as_os_str(),
                bin.as_os_str(),
            ],
        );
    }
}
