//! The `offload-stage` binary as a container runtime drives it: `run` is the container's PID 1 and
//! gets the stop signal.

// Test code: helpers fail the test by panicking.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::{
    io::Read,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

#[test]
fn run_passes_the_stop_signal_on_and_exits_with_the_command_s_code() {
    let root = std::env::temp_dir().join(format!("offload-stage-test-{}", std::process::id()));
    std::fs::create_dir_all(root.join("outputs")).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_offload-stage"))
        .args(["run", "--root"])
        .arg(&root)
        // A command that acts on SIGTERM at once (a shell's `wait` may notice it only when its
        // child ends).
        .args([
            "--",
            "python3",
            "-c",
            "import signal, sys, time\n\
             signal.signal(signal.SIGTERM, lambda *_: (print('got-term', flush=True), sys.exit(7)))\n\
             print('started', flush=True)\n\
             time.sleep(30)",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The command's handler is set once it printed.
    let mut out = child.stdout.take().unwrap();
    let mut first = [0u8; 8];
    out.read_exact(&mut first).unwrap();
    assert_eq!(&first, b"started\n");
    let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "offload-stage did not stop"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert_eq!(status.code(), Some(7), "stdout {rest:?}, stderr {err:?}");
    assert!(
        rest.contains("got-term"),
        "the command did not get SIGTERM: {rest:?}"
    );
    assert!(err.contains("passing"), "{err:?}");
    let _ = std::fs::remove_dir_all(root);
}
