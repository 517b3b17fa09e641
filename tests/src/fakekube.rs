//! A fake Kubernetes API server for the Kubernetes source's tests: plain
//! HTTP/1.1 (keep-alive, chunked watch streams), serving the resources in
//! `moat::sources::watched::WATCHED` with the list/watch protocol a client such as
//! kube-rs' watcher relies on: lists carry `metadata.resourceVersion`;
//! `?watch=true&resourceVersion=N` streams the changes after N as JSON
//! lines (`ADDED`, `MODIFIED`, `DELETED`, periodic `BOOKMARK`s when
//! `allowWatchBookmarks=true`), ending gracefully at `timeoutSeconds`; a
//! resourceVersion older than the compacted one gets an `ERROR` event
//! with a 410 Gone Status, as the real server sends it. Tests can drop
//! every watch connection abruptly, make changes that no watch hears,
//! and expire every watch (410), and can count lists and watches. Bearer
//! token authentication when a token is set.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Write as _},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Condvar, Mutex,
    },
    time::{Duration, Instant},
};

use moat::sources::watched::{Watched, WATCHED};
use serde_json::{json, Value};

/// How often an idle watch gets a BOOKMARK.
pub const BOOKMARK_EVERY: Duration = Duration::from_secs(1);

struct Change {
    rv: u64,
    path: String,
    kind: &'static str,
    object: Value,
}

#[derive(Default)]
struct State {
    rv: u64,
    /// URL path of the collection -> "namespace/name" -> object.
    objects: BTreeMap<String, BTreeMap<String, Value>>,
    changes: Vec<Change>,
    /// Watching from a resourceVersion below this is 410 Gone.
    compacted: u64,
    /// Bumped to drop every watch connection.
    drops: u64,
    /// Bumped to end every watch with a 410 ERROR event.
    expiries: u64,
    lists: BTreeMap<String, u32>,
    /// URL path -> the resourceVersion each watch started from.
    watches: BTreeMap<String, Vec<String>>,
    /// Requests that were refused for want of the token.
    unauthorized: u32,
    /// events.k8s.io/v1 Events created (and patched in place).
    events: Vec<Value>,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    stop: AtomicBool,
    token: Option<String>,
}

/// The server; stops (closing every connection) when dropped.
pub struct FakeKube {
    shared: Arc<Shared>,
    pub addr: SocketAddr,
}

/// The collection URL of `w` (all namespaces).
pub fn path_of(w: &Watched) -> String {
    if w.group.is_empty() {
        format!("/api/{}/{}", w.version, w.resource)
    } else {
        format!("/apis/{}/{}/{}", w.group, w.version, w.resource)
    }
}

fn watched(group: &str, resource: &str) -> &'static Watched {
    WATCHED
        .iter()
        .find(|w| w.group == group && w.resource == resource)
        .unwrap_or_else(|| panic!("{group}/{resource} is not watched"))
}

fn api_version(w: &Watched) -> String {
    if w.group.is_empty() {
        w.version.to_string()
    } else {
        format!("{}/{}", w.group, w.version)
    }
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

impl FakeKube {
    /// Serves on `listener` (bound by the caller, in whichever network
    /// namespace the client is); requests need `Authorization: Bearer
    /// <token>` when `token` is given.
    pub fn start(listener: TcpListener, token: Option<&str>) -> Self {
        let addr = listener.local_addr().expect("local address");
        listener.set_nonblocking(true).expect("nonblocking");
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                rv: 100,
                ..State::default()
            }),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
            token: token.map(str::to_string),
        });
        let s = shared.clone();
        std::thread::spawn(move || {
            while !s.stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let s = s.clone();
                        std::thread::spawn(move || serve(&s, stream));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        FakeKube { shared, addr }
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let mut st = self.shared.state.lock().expect("lock");
        let out = f(&mut st);
        self.shared.changed.notify_all();
        out
    }

    /// Creates or replaces `object` (its apiVersion and kind are set from
    /// the resource) and tells the watches; its resourceVersion.
    pub fn put(&self, group: &str, resource: &str, object: Value) -> u64 {
        self.store(group, resource, object, true)
    }

    /// As `put`, but no watch hears of it (as if the event had been
    /// compacted away before delivery): only a re-list shows it.
    pub fn put_unannounced(&self, group: &str, resource: &str, object: Value) -> u64 {
        self.store(group, resource, object, false)
    }

    fn store(&self, group: &str, resource: &str, mut object: Value, announce: bool) -> u64 {
        let w = watched(group, resource);
        let path = path_of(w);
        self.with(|st| {
            st.rv += 1;
            let rv = st.rv;
            object["apiVersion"] = json!(api_version(w));
            object["kind"] = json!(w.kind);
            let meta = &mut object["metadata"];
            let name = meta["name"].as_str().expect("metadata.name").to_string();
            let ns = meta["namespace"].as_str().unwrap_or("").to_string();
            meta["resourceVersion"] = json!(rv.to_string());
            meta["uid"] = json!(format!("uid-{ns}-{name}"));
            meta["creationTimestamp"] = json!("2026-11-23T00:00:00Z");
            let objects = st.objects.entry(path.clone()).or_default();
            let kind = if objects
                .insert(format!("{ns}/{name}"), object.clone())
                .is_some()
            {
                "MODIFIED"
            } else {
                "ADDED"
            };
            if announce {
                st.changes.push(Change {
                    rv,
                    path,
                    kind,
                    object,
                });
            }
            rv
        })
    }

    /// Deletes an object and tells the watches.
    pub fn delete(&self, group: &str, resource: &str, namespace: Option<&str>, name: &str) {
        let path = path_of(watched(group, resource));
        self.with(|st| {
            st.rv += 1;
            let rv = st.rv;
            let mut object = st
                .objects
                .get_mut(&path)
                .and_then(|o| o.remove(&format!("{}/{name}", namespace.unwrap_or(""))))
                .unwrap_or_else(|| panic!("no {path} {name} to delete"));
            object["metadata"]["resourceVersion"] = json!(rv.to_string());
            st.changes.push(Change {
                rv,
                path,
                kind: "DELETED",
                object,
            });
        });
    }

    /// Drops every open watch connection abruptly (no end of stream).
    pub fn drop_watches(&self) {
        self.with(|st| st.drops += 1);
    }

    /// Compacts history up to now: every open watch ends with a 410 Gone
    /// ERROR event, and watching from any resourceVersion before now is
    /// 410 Gone; the client has to list again.
    pub fn expire(&self) {
        self.with(|st| {
            st.compacted = st.rv;
            st.changes.clear();
            st.expiries += 1;
        });
    }

    /// Lists served of `group`/`resource`.
    pub fn lists(&self, group: &str, resource: &str) -> u32 {
        let path = path_of(watched(group, resource));
        self.with(|st| st.lists.get(&path).copied().unwrap_or(0))
    }

    /// The resourceVersions the watches of `group`/`resource` started from.
    pub fn watches(&self, group: &str, resource: &str) -> Vec<String> {
        let path = path_of(watched(group, resource));
        self.with(|st| st.watches.get(&path).cloned().unwrap_or_default())
    }

    /// The Events recorded (events.k8s.io/v1), as last created or patched.
    pub fn events(&self) -> Vec<Value> {
        self.with(|st| st.events.clone())
    }

    /// Requests refused for a missing or wrong token.
    pub fn unauthorized(&self) -> u32 {
        self.with(|st| st.unauthorized)
    }
}

impl Drop for FakeKube {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.shared.changed.notify_all();
    }
}

/// One request: method, target, whether it carried the token, body.
struct Request {
    method: String,
    target: String,
    authorized: bool,
    body: Vec<u8>,
}

/// One request, or None when the connection ended.
fn read_request(reader: &mut BufReader<TcpStream>, shared: &Shared) -> Option<Request> {
    let mut target = String::new();
    let mut method = String::new();
    let mut length = 0usize;
    let mut authorized = shared.token.is_none();
    let mut line = String::new();
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) => return None,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if shared.stop.load(Ordering::Relaxed) {
                    return None;
                }
                continue;
            }
            Err(_) => return None,
        }
        let l = line.trim_end();
        if target.is_empty() {
            let mut parts = l.split(' ');
            let (m, t) = (parts.next()?, parts.next()?);
            method = m.to_string();
            target = t.to_string();
            continue;
        }
        if l.is_empty() {
            let mut body = vec![0; length];
            let mut got = 0;
            while got < length {
                match std::io::Read::read(reader, &mut body[got..]) {
                    Ok(0) => return None,
                    Ok(n) => got += n,
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    Err(_) => return None,
                }
            }
            return Some(Request {
                method,
                target,
                authorized,
                body,
            });
        }
        if let Some((name, value)) = l.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().ok()?;
            }
        }
        if let (Some((name, value)), Some(token)) = (l.split_once(':'), &shared.token) {
            if name.eq_ignore_ascii_case("authorization")
                && value.trim() == format!("Bearer {token}")
            {
                authorized = true;
            }
        }
    }
}

fn respond(stream: &mut TcpStream, code: u16, body: &Value) -> std::io::Result<()> {
    let text = body.to_string();
    let reason = match code {
        200 => "OK",
        201 => "Created",
        401 => "Unauthorized",
        404 => "Not Found",
        _ => "Error",
    };
    write!(
        stream,
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{text}",
        text.len()
    )
}

fn chunk(stream: &mut TcpStream, line: &Value) -> std::io::Result<()> {
    let text = format!("{line}\n");
    write!(stream, "{:x}\r\n{text}\r\n", text.len())?;
    stream.flush()
}

fn serve(shared: &Shared, stream: TcpStream) {
    let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(read_half);
    let mut stream = stream;
    while let Some(Request {
        method,
        target,
        authorized,
        body,
    }) = read_request(&mut reader, shared)
    {
        let (path, query) = target.split_once('?').unwrap_or((&target, ""));
        let event_path = path
            .strip_prefix("/apis/events.k8s.io/v1/namespaces/")
            .and_then(|rest| rest.split_once("/events"));
        let params: BTreeMap<&str, &str> = query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .collect();
        let ok = if !authorized {
            shared.state.lock().expect("lock").unauthorized += 1;
            respond(
                &mut stream,
                401,
                &status(401, "Unauthorized", "Unauthorized"),
            )
        } else if let (Some((_ns, name)), "POST" | "PATCH") = (event_path, method.as_str()) {
            let Ok(event) = serde_json::from_slice::<Value>(&body) else {
                let _ = respond(
                    &mut stream,
                    400,
                    &status(400, "BadRequest", "not a JSON body"),
                );
                return;
            };
            let mut st = shared.state.lock().expect("lock");
            let name = name.trim_start_matches('/').to_string();
            let stored = if method == "PATCH" {
                match st
                    .events
                    .iter_mut()
                    .find(|e| e["metadata"]["name"] == name.as_str())
                {
                    Some(e) => {
                        if let (Some(e), Some(patch)) = (e.as_object_mut(), event.as_object()) {
                            for (k, v) in patch {
                                e.insert(k.clone(), v.clone());
                            }
                        }
                        Some(e.clone())
                    }
                    None => None,
                }
            } else {
                st.events.push(event.clone());
                Some(event)
            };
            drop(st);
            match stored {
                Some(e) => respond(&mut stream, if method == "POST" { 201 } else { 200 }, &e),
                None => respond(
                    &mut stream,
                    404,
                    &status(404, "NotFound", &format!("no event {name}")),
                ),
            }
        } else if method != "GET" {
            respond(
                &mut stream,
                405,
                &status(405, "MethodNotAllowed", &format!("{method} {path}")),
            )
        } else if let Some(w) = WATCHED.iter().find(|w| path_of(w) == path) {
            if params.get("watch") == Some(&"true") || params.get("watch") == Some(&"1") {
                match watch(shared, &mut stream, w, path, &params) {
                    Ok(true) => Ok(()),
                    // Dropped on purpose: the connection goes with it.
                    Ok(false) => return,
                    Err(e) => Err(e),
                }
            } else {
                let body = {
                    let mut st = shared.state.lock().expect("lock");
                    *st.lists.entry(path.to_string()).or_default() += 1;
                    let items: Vec<Value> = st
                        .objects
                        .get(path)
                        .map(|o| {
                            o.values()
                                .map(|v| {
                                    let mut v = v.clone();
                                    // The API server leaves apiVersion and
                                    // kind out of built-in list items.
                                    if w.group.is_empty() {
                                        if let Some(m) = v.as_object_mut() {
                                            m.remove("apiVersion");
                                            m.remove("kind");
                                        }
                                    }
                                    v
                                })
                                .collect()
                        })
                        .unwrap_or_default();
                    json!({"kind": format!("{}List", w.kind), "apiVersion": api_version(w),
                           "metadata": {"resourceVersion": st.rv.to_string()}, "items": items})
                };
                respond(&mut stream, 200, &body)
            }
        } else {
            respond(
                &mut stream,
                404,
                &status(
                    404,
                    "NotFound",
                    &format!("the server could not find {path}"),
                ),
            )
        };
        if ok.is_err() {
            return;
        }
    }
}

/// Streams a watch; Ok(false) when the connection was dropped on purpose.
fn watch(
    shared: &Shared,
    stream: &mut TcpStream,
    w: &Watched,
    path: &str,
    params: &BTreeMap<&str, &str>,
) -> std::io::Result<bool> {
    let bookmarks = params.get("allowWatchBookmarks") == Some(&"true");
    let timeout = params
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map_or(Duration::from_secs(1800), Duration::from_secs);
    let start = Instant::now();
    write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )?;
    let mut st = shared.state.lock().expect("lock");
    let from = params.get("resourceVersion").copied().unwrap_or("");
    st.watches
        .entry(path.to_string())
        .or_default()
        .push(from.to_string());
    let mut cursor = match from {
        "" | "0" => st.rv,
        rv => rv.parse::<u64>().unwrap_or(0),
    };
    let (drops, expiries) = (st.drops, st.expiries);
    let mut last_sent = Instant::now();
    let gone = status(
        410,
        "Expired",
        "too old resource version (the history was compacted)",
    );
    if cursor < st.compacted {
        drop(st);
        chunk(stream, &json!({"type": "ERROR", "object": gone}))?;
        write!(stream, "0\r\n\r\n")?;
        return Ok(true);
    }
    loop {
        if shared.stop.load(Ordering::Relaxed) || st.drops != drops {
            drop(st);
            let _ = stream.shutdown(Shutdown::Both);
            return Ok(false);
        }
        if st.expiries != expiries {
            drop(st);
            chunk(stream, &json!({"type": "ERROR", "object": gone}))?;
            write!(stream, "0\r\n\r\n")?;
            return Ok(true);
        }
        let due: Vec<Value> = st
            .changes
            .iter()
            .filter(|c| c.rv > cursor && c.path == path)
            .map(|c| json!({"type": c.kind, "object": c.object}))
            .collect();
        let now_rv = st.rv;
        if !due.is_empty() || (bookmarks && last_sent.elapsed() >= BOOKMARK_EVERY) {
            drop(st);
            if due.is_empty() {
                chunk(
                    stream,
                    &json!({"type": "BOOKMARK", "object": {"kind": w.kind, "apiVersion": api_version(w),
                        "metadata": {"resourceVersion": now_rv.to_string()}}}),
                )?;
            }
            for e in &due {
                chunk(stream, e)?;
            }
            cursor = now_rv;
            last_sent = Instant::now();
            st = shared.state.lock().expect("lock");
            continue;
        }
        if start.elapsed() >= timeout {
            drop(st);
            write!(stream, "0\r\n\r\n")?;
            return Ok(true);
        }
        st = shared
            .changed
            .wait_timeout(st, Duration::from_millis(200))
            .expect("lock")
            .0;
    }
}
