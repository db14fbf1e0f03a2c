//! A full disk under an agent's data directory, with real processes and a real file system:
//! a small tmpfs mounted over agent b's data directory, then filled. Needs root (to mount);
//! without it the story is skipped with a message.
// Test and tool code: a failed unwrap is the report, and its helpers are not a public API.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    unreachable_pub,
    missing_docs
)]

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{http_get, metric, wait_until, Cluster, Net, PATIENCE};
use serde_json::json;

/// A tmpfs of `size` mounted on `dir` (which keeps its contents); lazily unmounted on drop,
/// so an agent still holding files there does not keep it mounted.
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    fn mount_over(dir: &Path, size: &str) -> Option<Tmpfs> {
        // Keep the contents aside, mount over `dir` (which hides them), copy them back.
        // Without permission to mount, `dir` is left as it was.
        let keep = dir.with_extension("before-tmpfs");
        std::fs::create_dir_all(&keep).unwrap();
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), keep.join(e.file_name())).unwrap();
        }
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !mounted {
            return None;
        }
        let disk = Tmpfs {
            dir: dir.to_path_buf(),
        };
        for e in std::fs::read_dir(&keep).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
        }
        Some(disk)
    }

    /// Write zeros into `name` until the file system says it is full.
    fn fill(&self, name: &str) -> PathBuf {
        let path = self.dir.join(name);
        let mut f = std::fs::File::create(&path).unwrap();
        let chunk = vec![0u8; 64 << 10];
        loop {
            if let Err(e) = f.write_all(&chunk).and_then(|()| f.sync_all()) {
                assert_eq!(e.raw_os_error(), Some(28), "expected ENOSPC, got {e}");
                break;
            }
        }
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

fn disk_full_errors(api: &str) -> f64 {
    metric(
        &http_get(api, "/metrics"),
        "lichen_store_errors_total{reason=\"disk_full\"}",
    )
    .unwrap_or(0.0)
}

#[test]
fn a_full_disk_refuses_writes_clearly_keeps_serving_and_loses_nothing() {
    let mut c = Cluster::start(2, 45, Net::Direct);
    c.agents[0].ok(&["put", "app/cfg", "before", "1"]);
    c.wait_converged("app/cfg", PATIENCE);

    // b stops cleanly; its data directory moves onto a 6 MiB tmpfs; b starts again.
    assert!(c.agents[1].terminate().success());
    let Some(disk) = Tmpfs::mount_over(&c.agents[1].dir, "6m") else {
        eprintln!("skipped: mounting a tmpfs needs root");
        return;
    };
    c.agents[1].start();
    c.wait_connected();
    c.agents[1].ok(&["put", "app/cfg", "on_tmpfs", "2"]);

    // The disk fills up (another program's file).
    let filler = disk.fill("filler");

    // A write on b is refused with an error that says what happened and what to do, exit 1.
    let out = c.agents[1].cli(&["put", "app/cfg", "while_full", "3"]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    eprintln!("b while full: {err}");
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("disk") && err.contains("full"), "{err}");
    assert!(err.contains("free space"), "{err}");
    assert!(
        err.contains(&*c.agents[1].dir.to_string_lossy()),
        "names the data directory: {err}"
    );
    // b keeps running and serving what it stored; the failure is counted and logged.
    assert!(c.agents[1].alive());
    assert_eq!(c.agents[1].get("app/cfg", "on_tmpfs"), Some(json!(2)));
    assert!(disk_full_errors(&c.agents[1].api) >= 1.0);
    assert!(c.agents[1].log_text().contains("write not stored"));
    assert!(c.agents[1].status()["store_errors"]["disk_full"].as_u64() >= Some(1));
    let status = c.agents[1].ok(&["status"]);
    assert!(status.contains("disk_full"), "{status}");

    // a keeps writing; b receives the changes but cannot store them, and says so.
    c.agents[0].ok(&["put", "app/cfg", "from_a", "4"]);
    wait_until(
        "b counts the received change it could not store",
        PATIENCE,
        || disk_full_errors(&c.agents[1].api) >= 2.0,
    );
    assert!(c.agents[1].alive());
    assert_eq!(c.agents[1].get("app/cfg", "from_a"), None);

    // Space comes back: b catches up from a and writes again.
    std::fs::remove_file(filler).unwrap();
    c.agents[1].ok(&["put", "app/cfg", "after", "5"]);
    let v = c.wait_converged("app/cfg", PATIENCE);
    assert_eq!(
        v,
        json!({"before": 1, "on_tmpfs": 2, "from_a": 4, "after": 5}),
        "the refused write is absent, every acknowledged one is there"
    );

    // Everything b acknowledged survives kill -9.
    c.agents[1].kill9();
    c.agents[1].start();
    assert_eq!(c.wait_converged("app/cfg", PATIENCE), v);
    c.agents[1].kill9();
    drop(disk);
}
