//! A `moat agent` process started by a test inside one of its network
//! namespaces: what it logs (stderr) and prints (stdout) arrive on
//! channels, the pins it made are removed after it ends, and it never
//! outlives the test.

use std::{
    ffi::OsStr,
    io::{BufRead as _, BufReader},
    process::{Child, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use crate::{moat_bin, Netns, PinDir};

/// A running `moat agent`.
pub struct AgentProcess {
    child: Child,
    log: mpsc::Receiver<String>,
    stdout: mpsc::Receiver<String>,
    /// Every log line taken off `log` so far.
    seen: Vec<String>,
    /// Uninstalled after the agent ends (fields drop after `Drop::drop`).
    _pins: Option<PinDir>,
}

impl AgentProcess {
    /// Runs `moat agent ARGS` in `ns` with its maps and links pinned in a
    /// fresh test pin directory (`--pin-dir`, `--detach-on-exit`), and
    /// waits until it logs `ready:`.
    pub fn start<S: AsRef<OsStr>>(ns: &Netns, args: impl IntoIterator<Item = S>) -> Self {
        let mut agent = Self::spawn(ns, args, Some(PinDir::new()));
        agent.wait_for_log("ready:");
        agent
    }

    /// Runs `moat agent ARGS` in `ns`; with `pins`, in that pin directory
    /// (`--pin-dir`, `--detach-on-exit`; removed after the agent ends),
    /// else the arguments say where. Does not wait for anything.
    pub fn spawn<S: AsRef<OsStr>>(
        ns: &Netns,
        args: impl IntoIterator<Item = S>,
        pins: Option<PinDir>,
    ) -> Self {
        let mut command = ns.command(moat_bin().to_str().expect("utf-8 path"));
        command.arg("agent").args(args);
        if let Some(pins) = &pins {
            command.args(pins.args()).arg("--detach-on-exit");
        }
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("moat agent starts");
        let (log_tx, log) = mpsc::channel();
        let stderr = child.stderr.take().expect("stderr");
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("agent: {line}");
                let _ = log_tx.send(line);
            }
        });
        let (out_tx, stdout) = mpsc::channel();
        let out = child.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if out_tx.send(line).is_err() {
                    break;
                }
            }
        });
        AgentProcess {
            child,
            log,
            stdout,
            seen: Vec::new(),
            _pins: pins,
        }
    }

    /// Waits (30 s at most) for a log line containing `what`; returns it.
    /// Panics, killing the agent, when none comes.
    pub fn wait_for_log(&mut self, what: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.log.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(what) {
                        return line;
                    }
                }
                Err(_) => break,
            }
        }
        let _ = self.child.kill();
        panic!("the agent never logged {what:?}: {:?}", self.child.wait());
    }

    /// The agent's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Every line the agent has logged so far.
    pub fn logged(&mut self) -> Vec<String> {
        self.seen.extend(self.log.try_iter());
        self.seen.clone()
    }

    /// The next line the agent prints on stdout, waiting up to `timeout`.
    pub fn next_stdout(&self, timeout: Duration) -> Option<String> {
        self.stdout.recv_timeout(timeout).ok()
    }

    /// Ends the agent with SIGTERM and checks it exits cleanly within 10 s.
    pub fn stop(mut self) {
        self.terminate();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                assert!(status.success(), "agent exit status {status}");
                return;
            }
            assert!(Instant::now() < deadline, "agent did not exit on SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Ends the agent with SIGKILL: no cleanup of any kind.
    pub fn kill(mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("wait");
    }

    fn terminate(&self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
}

impl Drop for AgentProcess {
    /// A test that ends early (a failed assertion) still ends its agent:
    /// SIGTERM, then SIGKILL after 10 s.
    fn drop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        self.terminate();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
