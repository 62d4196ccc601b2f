//! `tinyvmm` as a user runs it: its own guest images (`--image`) and its
//! exit status.

mod common;

use std::process::Command;

use guestmm::vmm::guests;

/// Writes built-in guest `name`'s image to a temporary `<file>.bin`.
fn image_file(name: &str, file: &str) -> (std::path::PathBuf, impl Drop) {
    struct Dir(std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let dir = std::env::temp_dir().join(format!("guestmm-cli-{}-{file}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{file}.bin"));
    std::fs::write(&path, guests::find(name).unwrap().image).unwrap();
    (path, Dir(dir))
}

fn tinyvmm(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tinyvmm"))
        .args(args)
        .output()
        .expect("run tinyvmm");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn an_image_file_runs_like_a_built_in_guest() {
    if common::kvm_or_skip().is_none() {
        return;
    }
    let (path, _dir) = image_file("protect", "myprotect");
    let path = path.to_str().unwrap();
    let (ok, out) = tinyvmm(&["--image", path, "--expect-violations", "2"]);
    assert!(ok, "{out}");
    assert!(out.contains("guest myprotect: PASS exit=0"), "{out}");
    // The same image without its expected violations fails, and says why.
    let (ok, out) = tinyvmm(&["--image", path]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("guest myprotect: FAIL") && out.contains("2 violations, want 0"),
        "{out}"
    );
}

#[test]
fn an_image_gets_its_template_and_vcpus() {
    if common::kvm_or_skip().is_none() {
        return;
    }
    let (cow, _d1) = image_file("cow", "mycow");
    let (ok, out) = tinyvmm(&["--image", cow.to_str().unwrap(), "--template-kib", "1024"]);
    assert!(ok && out.contains("guest mycow: PASS"), "{out}");
    let (smp, _d2) = image_file("smp", "mysmp");
    let (ok, out) = tinyvmm(&[
        "--image",
        smp.to_str().unwrap(),
        "--vcpus",
        "4",
        "--ram-mib",
        "32",
    ]);
    assert!(ok && out.contains("guest mysmp: PASS"), "{out}");
}

#[test]
fn bad_arguments_exit_with_status_2_and_a_message() {
    for (args, want) in [
        (
            &["--image", "/nonexistent/x.bin"][..],
            "--image /nonexistent/x.bin",
        ),
        (
            &["--memfile-max-mib", "33", "hello"][..],
            "must be a non-zero multiple of 2",
        ),
        (&["--bogus"][..], "unknown option --bogus"),
        (
            &["--diff-at", "11", "/tmp/x.diff"][..],
            "--diff-at goes with --snapshot-at",
        ),
        (
            &["--record-working-set"][..],
            "--record-working-set goes with --restore",
        ),
        (
            &["--clone", "2", "all"][..],
            "take one guest (default lifecycle), not all",
        ),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_tinyvmm"))
            .args(args)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stderr);
        // Images are read after /dev/kvm is opened: without KVM that
        // message comes first.
        assert_eq!(out.status.code(), Some(2), "{args:?}: {text}");
        assert!(
            text.contains(want) || text.contains("/dev/kvm"),
            "{args:?}: {text}"
        );
    }
}

#[test]
fn snapshot_diff_restore_and_clone_from_the_command_line() {
    if common::kvm_or_skip().is_none() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("guestmm-cli-lifecycle-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let snap = dir.join("vm.snap");
    let diff = dir.join("vm.diff");
    let (snap_s, diff_s) = (snap.to_str().unwrap(), diff.to_str().unwrap());
    let (ok, out) = tinyvmm(&["--snapshot-at", "10", snap_s, "--diff-at", "11", diff_s]);
    assert!(ok && out.contains("guest snapshot: PASS"), "{out}");
    let (ok, out) = tinyvmm(&["--restore", snap_s, "--record-working-set"]);
    assert!(
        ok && out.contains("guest restore: PASS recorded_windows="),
        "{out}"
    );
    assert!(guestmm::snapshot::working_set_path(&snap).exists());
    let (ok, out) = tinyvmm(&["--restore", snap_s]);
    assert!(ok && out.contains("memory_exits=0"), "replay: {out}");
    let (ok, out) = tinyvmm(&["--restore", diff_s]);
    assert!(ok && out.contains("guest restore: PASS"), "diff: {out}");
    let (ok, out) = tinyvmm(&["--clone", "2"]);
    assert!(ok && out.contains("guest clone: PASS clones=2"), "{out}");
    // A corrupt snapshot is refused with its reason.
    let mut bytes = std::fs::read(&snap).unwrap();
    bytes[20] ^= 1; // inside the header its checksum covers
    std::fs::write(&snap, &bytes).unwrap();
    let (ok, out) = tinyvmm(&["--restore", snap_s]);
    assert!(!ok && out.contains("checksum mismatch"), "{out}");
    std::fs::remove_dir_all(&dir).unwrap();
}
