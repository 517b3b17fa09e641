//! Loading resources from files, directories, standard input and datastore
//! texts: bounded reads, YAML documents and calicoctl `*List` exports,
//! duplicate detection, and keeping the last good version of an object.

use super::*;

/// Selector label keys that no known object carries but that are close to
/// one that some object does (`ibm.rol` for `ibm.role`): likely typos. A
/// key far from every known one is not reported (its objects may simply
/// not be in the set).
pub fn label_key_warnings(set: &PolicySet) -> Vec<PolicyError> {
    use crate::policy::kubernetes::Object;
    let mut known: Vec<String> = [
        "projectcalico.org/namespace",
        "projectcalico.org/orchestrator",
        "projectcalico.org/name",
    ]
    .iter()
    .map(|k| k.to_string())
    .collect();
    let mut add = |labels: &BTreeMap<String, String>| known.extend(labels.keys().cloned());
    set.host_endpoints.iter().for_each(|h| add(&h.labels));
    set.network_sets.iter().for_each(|n| add(&n.labels));
    for o in &set.objects {
        match o {
            Object::Namespace { labels, .. }
            | Object::Pod { labels, .. }
            | Object::Node { labels, .. }
            | Object::ServiceAccount { labels, .. } => add(labels),
            Object::Service { .. } => {}
        }
    }
    known.sort();
    known.dedup();
    let known_refs: Vec<&str> = known.iter().map(String::as_str).collect();
    let mut out = Vec::new();
    for p in &set.policies {
        let mut selectors: Vec<(String, &Selector)> = vec![("spec.selector".into(), &p.selector)];
        if let Some(ns) = &p.namespace_selector {
            selectors.push(("spec.namespaceSelector".into(), ns));
        }
        for (list, name) in [(&p.ingress, "ingress"), (&p.egress, "egress")] {
            for (i, r) in list.iter().enumerate() {
                for (e, side) in [(&r.source, "source"), (&r.destination, "destination")] {
                    for (sel, f) in [
                        (&e.selector, "selector"),
                        (&e.not_selector, "notSelector"),
                        (&e.namespace_selector, "namespaceSelector"),
                    ] {
                        if let Some(sel) = sel {
                            selectors.push((format!("spec.{name}[{i}].{side}.{f}"), sel));
                        }
                    }
                }
            }
        }
        for (field, sel) in selectors {
            for key in sel.label_keys() {
                if known.iter().any(|k| k == key) {
                    continue;
                }
                if let Some(near) = did_you_mean(key, &known_refs) {
                    out.push(PolicyError {
                        file: p.origin.file.clone(),
                        resource: p.resource(),
                        field: field.clone(),
                        message: format!(
                            "label key `{key}` is on no known object, did you mean `{near}`?"
                        ),
                        document: Some(p.origin.document),
                    });
                }
            }
        }
    }
    out
}

/// Keeps the policy in force safe through a bad edit: every object of
/// `previous` (the last good set) whose new version is invalid, or whose
/// file no longer parses, stays in `loaded.set` in its last good version;
/// a new invalid object is not applied (it has no previous version). The
/// errors stay reported. Returns one line per object kept.
pub fn keep_last_good(previous: &PolicySet, loaded: &mut Loaded) -> Vec<String> {
    let mut kept = Vec::new();
    let failed = |resource: &str, file: &Path| {
        loaded
            .errors
            .iter()
            .any(|e| e.resource == resource || (e.resource.is_empty() && e.file == file))
    };
    let mut policies = Vec::new();
    for p in &previous.policies {
        let r = p.resource();
        if failed(&r, &p.origin.file) && !loaded.set.policies.iter().any(|n| n.resource() == r) {
            kept.push(format!(
                "{r}: the new version is invalid; the last good one stays in force"
            ));
            policies.push(p.clone());
        }
    }
    let mut heps = Vec::new();
    for h in &previous.host_endpoints {
        let r = format!("HostEndpoint/{}", h.name);
        if failed(&r, &h.origin.file) && !loaded.set.host_endpoints.iter().any(|n| n.name == h.name)
        {
            kept.push(format!(
                "{r}: the new version is invalid; the last good one stays in force"
            ));
            heps.push(h.clone());
        }
    }
    let mut sets = Vec::new();
    for n in &previous.network_sets {
        let r = n.resource();
        if failed(&r, &n.origin.file) && !loaded.set.network_sets.iter().any(|m| m.resource() == r)
        {
            kept.push(format!(
                "{r}: the new version is invalid; the last good one stays in force"
            ));
            sets.push(n.clone());
        }
    }
    let mut failsafes = Vec::new();
    for f in &previous.failsafe_profiles {
        let r = format!("FailsafeProfile/{}", f.name);
        if failed(&r, &f.origin.file)
            && !loaded
                .set
                .failsafe_profiles
                .iter()
                .any(|g| g.name == f.name)
        {
            kept.push(format!(
                "{r}: the new version is invalid; the last good one stays in force"
            ));
            failsafes.push(f.clone());
        }
    }
    loaded.set.policies.extend(policies);
    loaded.set.host_endpoints.extend(heps);
    loaded.set.network_sets.extend(sets);
    loaded.set.failsafe_profiles.extend(failsafes);
    loaded.set.sort();
    kept
}

/// Reads every `.yaml`, `.yml` and `.json` file under `dir` (recursively,
/// in name order, each real file once, a ConfigMap volume through its
/// `..data`: `tree::walk`); `dir` may also be one file, or `-` for
/// standard input. Invalid resources are reported in `errors` and left
/// out; the valid rest is returned.
pub fn load_dir(dir: &Path) -> Result<Loaded, PolicyError> {
    if dir == Path::new("-") {
        return load_stdin();
    }
    if dir.is_file() {
        let text = read_bounded(dir).map_err(|message| PolicyError {
            file: dir.to_path_buf(),
            resource: String::new(),
            field: String::new(),
            message,
            document: None,
        })?;
        return Ok(load_str(dir, &text));
    }
    let tree = tree::walk(dir).map_err(|e| PolicyError {
        file: dir.to_path_buf(),
        resource: String::new(),
        field: String::new(),
        message: format!("cannot read the policy directory: {e}"),
        document: None,
    })?;
    let mut loaded = Loaded {
        skipped: tree.skipped,
        ..Default::default()
    };
    for (file, open) in &tree.files {
        match read_bounded(open) {
            Ok(text) => load_text(file, &text, &mut loaded),
            Err(e) => loaded.errors.push(PolicyError {
                file: file.clone(),
                resource: String::new(),
                field: String::new(),
                message: format!("cannot read: {e}"),
                document: None,
            }),
        }
    }
    loaded.files = tree.files.len();
    check_duplicates(&mut loaded);
    loaded.set.sort();
    Ok(loaded)
}

/// Reads the resources on standard input (`--policies -`), as one file
/// named `<stdin>`, within the file size limit.
pub fn load_stdin() -> Result<Loaded, PolicyError> {
    use std::io::Read;
    let name = Path::new("<stdin>");
    let limit = limits::MAX_FILE_BYTES;
    let mut bytes = Vec::new();
    let fail = |message: String| PolicyError {
        file: name.to_path_buf(),
        resource: String::new(),
        field: String::new(),
        message,
        document: None,
    };
    std::io::stdin()
        .lock()
        .take(limit as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| fail(format!("cannot read standard input: {e}")))?;
    if bytes.len() > limit {
        return Err(fail(too_big_file(&format!("more than {limit}"))));
    }
    let text = String::from_utf8(bytes).map_err(|e| fail(format!("not UTF-8 text: {e}")))?;
    Ok(load_str(name, &text))
}

/// Parses the resources in `text` (as if read from `file`) into a set.
pub fn load_str(file: &Path, text: &str) -> Loaded {
    let mut loaded = Loaded::default();
    load_text(file, text, &mut loaded);
    loaded.files = 1;
    check_duplicates(&mut loaded);
    loaded.set.sort();
    loaded
}

/// Parses several named texts (etcd keys, API objects) into one set, as
/// `load_dir` does files.
pub fn load_texts<'a>(texts: impl IntoIterator<Item = (&'a Path, &'a str)>) -> Loaded {
    let mut loaded = Loaded::default();
    for (file, text) in texts {
        load_text(file, text, &mut loaded);
        loaded.files += 1;
    }
    check_duplicates(&mut loaded);
    loaded.set.sort();
    loaded
}

/// Reads `file` whole unless it is over `limits::MAX_FILE_BYTES` (checked
/// while reading, so a growing file or a pipe cannot exceed it either).
pub fn read_bounded(file: &Path) -> Result<String, String> {
    use std::io::Read;
    let limit = limits::MAX_FILE_BYTES;
    let f = std::fs::File::open(file).map_err(|e| e.to_string())?;
    let mut bytes = Vec::new();
    f.take(limit as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| e.to_string())?;
    if bytes.len() > limit {
        return Err(too_big_file(&format!("more than {limit}")));
    }
    String::from_utf8(bytes).map_err(|e| format!("not UTF-8 text: {e}"))
}

/// The error for a file of `size` (in words) over the file limit.
pub(super) fn too_big_file(size: &str) -> String {
    format!(
        "{size} bytes, over the limit of {} bytes for one policy file; split it into several files (each document at most {} bytes)",
        limits::MAX_FILE_BYTES,
        limits::MAX_DOCUMENT_BYTES
    )
}

/// Refuses a text over the size and nesting limits before it is parsed.
pub(super) fn check_limits(text: &str) -> Result<(), String> {
    if text.len() > limits::MAX_FILE_BYTES {
        return Err(too_big_file(&text.len().to_string()));
    }
    for (n, (start, end)) in limits::documents(text).into_iter().enumerate() {
        if end - start > limits::MAX_DOCUMENT_BYTES {
            return Err(format!(
                "document {} is {} bytes, over the limit of {} bytes for one resource; nothing in the file is applied",
                n + 1,
                end - start,
                limits::MAX_DOCUMENT_BYTES
            ));
        }
    }
    if let Some(line) = limits::flow_depth_exceeded(text, limits::MAX_FLOW_DEPTH) {
        return Err(format!(
            "line {line}: flow collections ([...] or {{...}}) nested deeper than {} levels; nothing in the file is applied",
            limits::MAX_FLOW_DEPTH
        ));
    }
    Ok(())
}

/// Two resources of the same kind, namespace and name: both are rejected,
/// since which one the user meant cannot be known.
pub(super) fn check_duplicates(loaded: &mut Loaded) {
    let mut seen: BTreeMap<String, Vec<Origin>> = BTreeMap::new();
    let set = &loaded.set;
    let resources = set
        .policies
        .iter()
        .map(|p| (p.resource(), &p.origin))
        .chain(
            set.host_endpoints
                .iter()
                .map(|h| (format!("HostEndpoint/{}", h.name), &h.origin)),
        )
        .chain(
            set.failsafe_profiles
                .iter()
                .map(|f| (format!("FailsafeProfile/{}", f.name), &f.origin)),
        )
        .chain(set.network_sets.iter().map(|n| (n.resource(), &n.origin)));
    for (resource, origin) in resources {
        seen.entry(resource).or_default().push(origin.clone());
    }
    let duplicated: Vec<(String, Vec<Origin>)> =
        seen.into_iter().filter(|(_, o)| o.len() > 1).collect();
    for (resource, origins) in &duplicated {
        let places: Vec<String> = origins
            .iter()
            .map(|o| format!("{} document {}", o.file.display(), o.document + 1))
            .collect();
        for origin in origins {
            loaded.errors.push(PolicyError {
                file: origin.file.clone(),
                resource: resource.clone(),
                field: "metadata.name".into(),
                message: format!("defined more than once ({})", places.join(", ")),
                document: Some(origin.document),
            });
        }
    }
    let dup = |r: &str| duplicated.iter().any(|(d, _)| d == r);
    loaded.set.policies.retain(|p| !dup(&p.resource()));
    loaded
        .set
        .host_endpoints
        .retain(|h| !dup(&format!("HostEndpoint/{}", h.name)));
    loaded
        .set
        .failsafe_profiles
        .retain(|f| !dup(&format!("FailsafeProfile/{}", f.name)));
    loaded.set.network_sets.retain(|n| !dup(&n.resource()));
    tier::check_references(loaded);
}

/// Placeholders such as `<worker-node-name>` outside comments: a template
/// the user has not filled in yet.
pub fn placeholders(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    for line in text.lines() {
        let code = line.split('#').next().unwrap_or_default();
        let mut rest = code;
        while let Some(start) = rest.find('<') {
            let after = &rest[start + 1..];
            let len = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'))
                .unwrap_or(after.len());
            if len > 0 && after[len..].starts_with('>') {
                let p = format!("<{}>", &after[..len]);
                if !found.contains(&p) {
                    found.push(p);
                }
            }
            rest = after;
        }
    }
    found
}

pub(super) fn load_text(file: &Path, text: &str, loaded: &mut Loaded) {
    let holes = placeholders(text);
    if !holes.is_empty() {
        loaded.placeholder_files.push(file.to_path_buf());
        loaded.errors.push(PolicyError {
            file: file.to_path_buf(),
            resource: String::new(),
            field: String::new(),
            message: format!(
                "placeholder file: fill in {} before applying it; nothing in it is applied",
                holes.join(", ")
            ),
            document: None,
        });
        return;
    }
    if let Err(message) = check_limits(text) {
        loaded.errors.push(PolicyError {
            file: file.to_path_buf(),
            resource: String::new(),
            field: String::new(),
            message,
            document: None,
        });
        return;
    }
    let mut index = 0;
    for document in serde_yaml_ng::Deserializer::from_str(text) {
        let value = match Value::deserialize(document) {
            Ok(v) => v,
            Err(e) => {
                loaded.errors.push(PolicyError {
                    file: file.to_path_buf(),
                    resource: String::new(),
                    field: String::new(),
                    message: format!("not valid YAML or JSON: {e}"),
                    document: None,
                });
                return;
            }
        };
        load_value(file, &mut index, value, loaded);
    }
}

/// The items of a `kind: List` or `kind: <Kind>List` (calicoctl get -o
/// yaml|json, the API's list responses), each read as a resource; items
/// without apiVersion or kind take the list's.
fn load_list_items(
    file: &Path,
    index: &mut usize,
    items: &[Value],
    item_kind: &str,
    api: &str,
    loaded: &mut Loaded,
) {
    for mut item in items.iter().cloned() {
        if let Value::Mapping(m) = &mut item {
            if !item_kind.is_empty() && !m.contains_key("kind") {
                m.insert("kind".into(), item_kind.into());
            }
            if !api.is_empty() && !m.contains_key("apiVersion") {
                m.insert("apiVersion".into(), api.into());
            }
        }
        load_value(file, index, item, loaded);
    }
}

/// The object's name as the model names it (`Policy::resource` and
/// friends), so an error can be matched to the last good version of the
/// same object.
fn resource_name(kind: &str, api: &str, meta: &Metadata) -> String {
    match (&meta.namespace, kind, api) {
        (ns, "NetworkPolicy", "networking.k8s.io/v1") => format!(
            "KubernetesNetworkPolicy/{}/knp.default.{}",
            ns.as_deref().unwrap_or("default"),
            meta.name
        ),
        (Some(ns), _, _) => format!("{kind}/{ns}/{}", meta.name),
        (None, "NetworkPolicy" | "NetworkSet", _) => format!("{kind}/default/{}", meta.name),
        (None, _, _) => format!("{kind}/{}", meta.name),
    }
}

pub(super) fn load_value(file: &Path, index: &mut usize, value: Value, loaded: &mut Loaded) {
    if value.is_null() {
        // An empty document (only comments, or `---` at the end).
        return;
    }
    let origin = Origin {
        file: file.to_path_buf(),
        document: *index,
    };
    *index += 1;
    let document = origin.document;
    let err = |resource: &str, field: &str, message: String| PolicyError {
        file: file.to_path_buf(),
        resource: resource.to_string(),
        field: field.to_string(),
        message,
        document: Some(document),
    };
    let Value::Mapping(map) = &value else {
        loaded.errors.push(err(
            "",
            "",
            format!(
                "document {} is not a resource (a mapping with apiVersion and kind)",
                origin.document + 1
            ),
        ));
        return;
    };
    let get = |k: &str| map.get(Value::String(k.into()));
    let kind = get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let api = get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    // `kind: List` (kubectl), `kind: GlobalNetworkPolicyList` and the like.
    if let Some(item_kind) = kind.strip_suffix("List") {
        match get("items") {
            Some(Value::Sequence(items)) => {
                *index -= 1;
                load_list_items(file, index, items, item_kind, &api, loaded);
            }
            Some(Value::Null) => *index -= 1,
            _ => loaded.errors.push(err(
                &kind,
                "items",
                format!("a {kind} needs a sequence of items"),
            )),
        }
        return;
    }
    let metadata = get("metadata").cloned().unwrap_or(Value::Null);
    let mut meta_problems = Problems::default();
    let meta: Metadata =
        deserialize_all(metadata, "metadata", &mut meta_problems).unwrap_or_default();
    let resource = resource_name(&kind, &api, &meta);
    if kind.is_empty() || api.is_empty() {
        loaded.errors.push(err(
            &resource,
            if kind.is_empty() {
                "kind"
            } else {
                "apiVersion"
            },
            "missing".into(),
        ));
        return;
    }
    for key in map.keys() {
        let key = key.as_str().unwrap_or_default();
        if !matches!(key, "apiVersion" | "kind" | "metadata" | "spec" | "status") {
            meta_problems.add(
                key,
                unknown_field(key, &["apiVersion", "kind", "metadata", "spec"]),
            );
        }
    }
    if !meta_problems.0.is_empty() {
        for (field, message) in meta_problems.0 {
            loaded.errors.push(err(&resource, &field, message));
        }
        return;
    }
    if meta.name.is_empty() {
        loaded
            .errors
            .push(err(&resource, "metadata.name", "missing".into()));
        return;
    }
    if let Err(message) = check_name(&meta.name) {
        loaded.errors.push(err(&resource, "metadata.name", message));
        return;
    }
    if let Err((field, message)) = check_labels(&meta.labels) {
        loaded.errors.push(err(&resource, &field, message));
        return;
    }
    let spec = get("spec").cloned().unwrap_or(Value::Null);
    // Problems after the first, from validators that report them all.
    let mut more = Vec::new();
    let status = value.get("status").cloned();
    let result = read_resource(
        (&kind, &api),
        &meta,
        spec,
        status,
        origin,
        loaded,
        &mut more,
    );
    if let Err((field, message)) = result {
        loaded.errors.push(err(&resource, &field, message));
    }
    let left = more.len().saturating_sub(MAX_ERRORS_PER_OBJECT);
    for (field, message) in more.into_iter().take(MAX_ERRORS_PER_OBJECT) {
        loaded.errors.push(err(&resource, &field, message));
    }
    if left > 0 {
        loaded.errors.push(err(
            &resource,
            "",
            format!(
                "{left} more problem(s) not shown (at most {MAX_ERRORS_PER_OBJECT} per object)"
            ),
        ));
    }
}
