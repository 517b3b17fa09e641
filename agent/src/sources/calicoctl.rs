//! `calicoctl.cfg`: where Calico's datastore is, as calicoctl reads it
//! (`apiVersion: projectcalico.org/v3`, `kind: CalicoAPIConfig`). The old
//! `apiVersion: v1` / `kind: calicoApiConfig` form (calicoctl before 3.0,
//! etcd v2) is rejected with what to change.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Where the etcd v3 datastore is and how to authenticate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdConfig {
    /// `http(s)://host:port`, at least one.
    pub endpoints: Vec<String>,
    pub key_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub ca_cert_file: Option<PathBuf>,
    pub username: Option<String>,
    pub password: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Datastore {
    Etcd(EtcdConfig),
    Kubernetes { kubeconfig: Option<PathBuf> },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CalicoApiConfig {
    pub datastore: Datastore,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Raw {
    api_version: Option<String>,
    kind: Option<String>,
    #[serde(default)]
    #[allow(dead_code)]
    metadata: serde_yaml_ng::Value,
    #[serde(default)]
    spec: Spec,
}

/// The spec fields calicoctl 3.x knows (Calico's apiconfig), so a typo is
/// named rather than ignored.
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Spec {
    datastore_type: Option<String>,
    etcd_endpoints: Option<String>,
    etcd_discovery_srv: Option<String>,
    etcd_username: Option<String>,
    etcd_password: Option<String>,
    etcd_key_file: Option<PathBuf>,
    etcd_cert_file: Option<PathBuf>,
    #[serde(rename = "etcdCACertFile")]
    etcd_ca_cert_file: Option<PathBuf>,
    etcd_key: Option<String>,
    etcd_cert: Option<String>,
    #[serde(rename = "etcdCACert")]
    etcd_ca_cert: Option<String>,
    kubeconfig: Option<PathBuf>,
    #[serde(rename = "k8sAPIEndpoint")]
    k8s_api_endpoint: Option<String>,
    k8s_key_file: Option<PathBuf>,
    k8s_cert_file: Option<PathBuf>,
    #[serde(rename = "k8sCAFile")]
    k8s_ca_file: Option<PathBuf>,
    #[serde(rename = "k8sAPIToken")]
    k8s_api_token: Option<String>,
    k8s_insecure_skip_tls_verify: Option<bool>,
    k8s_disable_node_poll: Option<bool>,
}

pub fn from_file(path: &Path) -> anyhow::Result<CalicoApiConfig> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("calicoctl config {}: {e}", path.display()))?;
    parse(&text).map_err(|e| anyhow::anyhow!("calicoctl config {}: {e}", path.display()))
}

pub fn parse(text: &str) -> Result<CalicoApiConfig, String> {
    let value: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(text).map_err(|e| format!("not YAML or JSON: {e}"))?;
    let get = |k: &str| value.get(k).and_then(|v| v.as_str()).map(str::to_string);
    let (api, kind) = (get("apiVersion"), get("kind"));
    if api.as_deref() == Some("v1") || kind.as_deref() == Some("calicoApiConfig") {
        return Err(format!(
            "the old calicoctl v1 form (apiVersion: {}, kind: {}) is not read: change them to `apiVersion: projectcalico.org/v3` and `kind: CalicoAPIConfig`, and set `spec.datastoreType` to etcdv3 (Calico 3 has no etcdv2 datastore; migrate the data with `calico-upgrade`) or kubernetes",
            api.as_deref().unwrap_or("-"),
            kind.as_deref().unwrap_or("-")
        ));
    }
    let raw: Raw = serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        format!("{path}: {}", e.inner())
    })?;
    match raw.api_version.as_deref() {
        Some("projectcalico.org/v3") => {}
        Some(other) => return Err(format!("apiVersion: {other:?} is not projectcalico.org/v3")),
        None => return Err("apiVersion: missing (projectcalico.org/v3)".into()),
    }
    match raw.kind.as_deref() {
        Some("CalicoAPIConfig") => {}
        Some(other) => return Err(format!("kind: {other:?} is not CalicoAPIConfig")),
        None => return Err("kind: missing (CalicoAPIConfig)".into()),
    }
    let s = raw.spec;
    // calicoctl 3.x defaults to the Kubernetes datastore.
    let datastore = match s.datastore_type.as_deref().unwrap_or("kubernetes") {
        "etcdv3" => {
            if s.etcd_discovery_srv.is_some() {
                return Err("spec.etcdDiscoverySrv: DNS discovery is not supported; list the endpoints in spec.etcdEndpoints".into());
            }
            if s.etcd_key.is_some() || s.etcd_cert.is_some() || s.etcd_ca_cert.is_some() {
                return Err("spec.etcdKey/etcdCert/etcdCACert: inline certificates are not supported; give files (etcdKeyFile, etcdCertFile, etcdCACertFile)".into());
            }
            let endpoints: Vec<String> = s
                .etcd_endpoints
                .as_deref()
                .unwrap_or("")
                .split(',')
                .map(str::trim)
                .filter(|e| !e.is_empty())
                .map(str::to_string)
                .collect();
            if endpoints.is_empty() {
                return Err("spec.etcdEndpoints: missing (e.g. https://10.0.0.1:2379,https://10.0.0.2:2379)".into());
            }
            for e in &endpoints {
                if !(e.starts_with("http://") || e.starts_with("https://")) {
                    return Err(format!(
                        "spec.etcdEndpoints: {e:?} is not an http:// or https:// URL"
                    ));
                }
            }
            if s.etcd_key_file.is_some() != s.etcd_cert_file.is_some() {
                return Err("spec.etcdKeyFile and spec.etcdCertFile go together: give both or neither".into());
            }
            if s.etcd_username.is_some() != s.etcd_password.is_some() {
                return Err("spec.etcdUsername and spec.etcdPassword go together".into());
            }
            Datastore::Etcd(EtcdConfig {
                endpoints,
                key_file: s.etcd_key_file,
                cert_file: s.etcd_cert_file,
                ca_cert_file: s.etcd_ca_cert_file,
                username: s.etcd_username,
                password: s.etcd_password,
            })
        }
        "kubernetes" => {
            // The connection settings calicoctl takes beside a kubeconfig
            // are not read: a kubeconfig (or the in-cluster service
            // account) says all of it. Named rather than ignored.
            let unsupported = [
                ("k8sAPIEndpoint", s.k8s_api_endpoint.is_some()),
                ("k8sKeyFile", s.k8s_key_file.is_some()),
                ("k8sCertFile", s.k8s_cert_file.is_some()),
                ("k8sCAFile", s.k8s_ca_file.is_some()),
                ("k8sAPIToken", s.k8s_api_token.is_some()),
                ("k8sInsecureSkipTlsVerify", s.k8s_insecure_skip_tls_verify.is_some()),
            ];
            if let Some((key, _)) = unsupported.iter().find(|(_, set)| *set) {
                return Err(format!(
                    "spec.{key}: not supported; put the API server, its CA and the credentials in a kubeconfig (spec.kubeconfig), or leave it out to use KUBECONFIG or the in-cluster service account"
                ));
            }
            let _ = s.k8s_disable_node_poll;
            Datastore::Kubernetes {
                kubeconfig: s.kubeconfig,
            }
        }
        "etcdv2" => {
            return Err("spec.datastoreType: etcdv2 is Calico 2's datastore; Calico 3 reads etcdv3 (migrate with `calico-upgrade`) or kubernetes".into())
        }
        other => {
            return Err(format!(
                "spec.datastoreType: {other:?} is not etcdv3 or kubernetes"
            ))
        }
    };
    Ok(CalicoApiConfig { datastore })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etcdv3_with_certificates() {
        let c = parse(
            "apiVersion: projectcalico.org/v3\nkind: CalicoAPIConfig\nmetadata:\nspec:\n  datastoreType: \"etcdv3\"\n  etcdEndpoints: \"https://10.0.0.1:2379, https://10.0.0.2:2379\"\n  etcdKeyFile: /etc/calico/key.pem\n  etcdCertFile: /etc/calico/cert.pem\n  etcdCACertFile: /etc/calico/ca.pem\n",
        )
        .expect("valid");
        let Datastore::Etcd(e) = c.datastore else {
            panic!("etcd expected")
        };
        assert_eq!(
            e.endpoints,
            ["https://10.0.0.1:2379", "https://10.0.0.2:2379"]
        );
        assert_eq!(
            e.ca_cert_file.as_deref(),
            Some(Path::new("/etc/calico/ca.pem"))
        );
        assert_eq!(
            e.key_file.as_deref(),
            Some(Path::new("/etc/calico/key.pem"))
        );
    }

    #[test]
    fn kubernetes_and_its_default() {
        let c = parse("{\"apiVersion\": \"projectcalico.org/v3\", \"kind\": \"CalicoAPIConfig\", \"spec\": {\"datastoreType\": \"kubernetes\", \"kubeconfig\": \"/root/.kube/config\"}}").expect("JSON is fine");
        assert_eq!(
            c.datastore,
            Datastore::Kubernetes {
                kubeconfig: Some("/root/.kube/config".into())
            }
        );
        let c = parse("apiVersion: projectcalico.org/v3\nkind: CalicoAPIConfig\n").expect("valid");
        assert_eq!(c.datastore, Datastore::Kubernetes { kubeconfig: None });
        let e = parse("apiVersion: projectcalico.org/v3\nkind: CalicoAPIConfig\nspec: {datastoreType: kubernetes, k8sAPIEndpoint: 'https://10.0.0.1:6443'}\n").unwrap_err();
        assert!(
            e.contains("spec.k8sAPIEndpoint") && e.contains("kubeconfig"),
            "{e}"
        );
    }

    #[test]
    fn the_old_form_says_what_to_change() {
        let e = parse("apiVersion: v1\nkind: calicoApiConfig\nmetadata:\nspec:\n  datastoreType: etcdv2\n  etcdEndpoints: http://127.0.0.1:2379\n").unwrap_err();
        assert!(
            e.contains("apiVersion: projectcalico.org/v3") && e.contains("kind: CalicoAPIConfig"),
            "{e}"
        );
    }

    #[test]
    fn errors_name_the_key() {
        let base = "apiVersion: projectcalico.org/v3\nkind: CalicoAPIConfig\nspec:\n  datastoreType: etcdv3\n";
        let e = parse(&format!("{base}  etcdEndpoint: http://a:2379\n")).unwrap_err();
        assert!(
            e.contains("spec") && e.contains("unknown field `etcdEndpoint`"),
            "{e}"
        );
        let e = parse(base).unwrap_err();
        assert!(e.contains("spec.etcdEndpoints: missing"), "{e}");
        let e = parse(&format!("{base}  etcdEndpoints: 10.0.0.1:2379\n")).unwrap_err();
        assert!(e.contains("not an http"), "{e}");
        let e = parse(&format!(
            "{base}  etcdEndpoints: http://a:2379\n  etcdKeyFile: /k\n"
        ))
        .unwrap_err();
        assert!(e.contains("etcdCertFile"), "{e}");
        let e = parse("apiVersion: projectcalico.org/v3\nkind: CalicoAPIConfig\nspec: {datastoreType: consul}\n").unwrap_err();
        assert!(e.contains("spec.datastoreType"), "{e}");
        let e = parse("apiVersion: projectcalico.org/v3\nkind: Config\n").unwrap_err();
        assert!(e.contains("kind"), "{e}");
        let e = parse("apiVersion: projectcalico.org/v3\nkind: CalicoAPIConfig\nspec: {datastoreType: etcdv2}\n").unwrap_err();
        assert!(e.contains("etcdv2"), "{e}");
    }
}
