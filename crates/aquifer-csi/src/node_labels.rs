//! Cache-aware placement: after `aquifer warmup` has warmed a volume on a node, the node
//! daemon labels its node `warm.aquifer.dev/NAME=true` through the Kubernetes API, and pods
//! prefer such nodes (a preferred node affinity on the label). An evicted volume
//! (`aquifer warmup --evict`) has its label removed.
//!
//! One call: a JSON merge patch of the node's labels (`PATCH /api/v1/nodes/NODE`), with the
//! pod's service account token. The RBAC and admission policy in `k8s/` let the token patch
//! only the node its pod runs on, and only these labels.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub const LABEL_PREFIX: &str = "warm.aquifer.dev/";

const SA_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// The label naming the volume at `path` of its filesystem: `datasets/team-a` gives
/// `warm.aquifer.dev/datasets.team-a`. A label name is at most 63 characters of
/// `[A-Za-z0-9._-]`, starting and ending alphanumeric: other characters become `-`, and a
/// longer name keeps its first 46 characters and a hash of the whole.
pub fn label_key(path: &Path) -> String {
    let s = path.to_string_lossy();
    let s = s.trim_matches('/');
    let mut name: String = s
        .chars()
        .map(|c| match c {
            '/' => '.',
            c if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' => c,
            _ => '-',
        })
        .collect();
    if name.len() > 63 {
        name = format!("{}-{:016x}", &name[..46], crate::fnv1a(s.bytes()));
    }
    let name = name.trim_matches(|c: char| !c.is_ascii_alphanumeric());
    let name = if name.is_empty() { "root" } else { name };
    format!("{LABEL_PREFIX}{name}")
}

/// The body of the merge patch that sets (true) or removes (false) labels.
pub fn patch_body(changes: &BTreeMap<String, bool>) -> String {
    let labels: serde_json::Map<String, serde_json::Value> = changes
        .iter()
        .map(|(k, &set)| {
            let v = if set {
                serde_json::Value::String("true".into())
            } else {
                serde_json::Value::Null
            };
            (k.clone(), v)
        })
        .collect();
    serde_json::json!({ "metadata": { "labels": labels } }).to_string()
}

/// The labels of one node, through the Kubernetes API.
pub struct NodeLabels {
    api: String,
    node: String,
    /// Re-read at every call: projected service account tokens are rotated.
    token_file: Option<PathBuf>,
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
}

impl NodeLabels {
    /// `api` is `https://HOST:PORT` (or `http://` for a test server); `ca` the PEM file of
    /// the certificates the server's is checked against.
    pub fn new(
        api: &str,
        ca: Option<&Path>,
        token_file: Option<PathBuf>,
        node: &str,
    ) -> Result<NodeLabels, String> {
        use rustls::pki_types::{pem::PemObject, CertificateDer};
        if !(api.starts_with("https://") || api.starts_with("http://")) {
            return Err(format!(
                "the Kubernetes API must be an http(s):// URL, got {api:?}"
            ));
        }
        let mut roots = rustls::RootCertStore::empty();
        if let Some(ca) = ca {
            let certs =
                CertificateDer::pem_file_iter(ca).map_err(|e| format!("{}: {e}", ca.display()))?;
            for c in certs {
                let c = c.map_err(|e| format!("{}: {e}", ca.display()))?;
                roots.add(c).map_err(|e| format!("{}: {e}", ca.display()))?;
            }
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .build();
        Ok(NodeLabels {
            api: api.trim_end_matches('/').to_string(),
            node: node.to_string(),
            token_file,
            client: Client::builder(hyper_util::rt::TokioExecutor::new()).build(https),
        })
    }

    /// From inside a pod: the API server the environment names, the service account's
    /// token and CA.
    pub fn in_cluster(node: &str) -> Result<NodeLabels, String> {
        let host = std::env::var("KUBERNETES_SERVICE_HOST").map_err(|_| {
            "not in a Kubernetes pod (KUBERNETES_SERVICE_HOST is not set)".to_string()
        })?;
        let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host
        };
        let sa = Path::new(SA_DIR);
        NodeLabels::new(
            &format!("https://{host}:{port}"),
            Some(&sa.join("ca.crt")),
            Some(sa.join("token")),
            node,
        )
    }

    /// Set and remove labels on the node in one merge patch.
    pub async fn apply(&self, changes: &BTreeMap<String, bool>) -> Result<(), String> {
        let uri = format!("{}/api/v1/nodes/{}", self.api, self.node);
        let mut req = http::Request::builder()
            .method(http::Method::PATCH)
            .uri(&uri)
            .header(http::header::CONTENT_TYPE, "application/merge-patch+json")
            .header(http::header::ACCEPT, "application/json")
            .header(
                http::header::USER_AGENT,
                concat!("aquifer-csi/", env!("CARGO_PKG_VERSION")),
            );
        if let Some(t) = &self.token_file {
            let token = std::fs::read_to_string(t).map_err(|e| format!("{}: {e}", t.display()))?;
            req = req.header(
                http::header::AUTHORIZATION,
                format!("Bearer {}", token.trim()),
            );
        }
        let req = req
            .body(Full::new(Bytes::from(patch_body(changes))))
            .map_err(|e| e.to_string())?;
        let resp = tokio::time::timeout(Duration::from_secs(30), self.client.request(req))
            .await
            .map_err(|_| format!("PATCH {uri}: timed out"))?
            .map_err(|e| format!("PATCH {uri}: {e}"))?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        if status.is_success() {
            return Ok(());
        }
        // The API server answers errors with a Status object; its message says why.
        let message = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["message"].as_str().map(str::to_string))
            .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
        Err(format!("PATCH node {}: {status}: {message}", self.node))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn label_names_are_valid() {
        let ok = |k: &str| {
            let name = k.strip_prefix(LABEL_PREFIX).unwrap();
            name.len() <= 63
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
                && name.starts_with(|c: char| c.is_ascii_alphanumeric())
                && name.ends_with(|c: char| c.is_ascii_alphanumeric())
        };
        assert_eq!(
            label_key(Path::new("/datasets/default-imagenet")),
            "warm.aquifer.dev/datasets.default-imagenet"
        );
        assert_eq!(label_key(Path::new("pvc-1")), "warm.aquifer.dev/pvc-1");
        assert_eq!(label_key(Path::new("/")), "warm.aquifer.dev/root");
        let long = "/datasets/".to_string() + &"x".repeat(80);
        let other = "/datasets/".to_string() + &"x".repeat(81);
        for p in [long.as_str(), other.as_str(), "/a b/ü/_x_", "-x-"] {
            assert!(
                ok(&label_key(Path::new(p))),
                "{p}: {}",
                label_key(Path::new(p))
            );
        }
        assert_ne!(label_key(Path::new(&long)), label_key(Path::new(&other)));
        assert!(label_key(Path::new(&long)).ends_with("-f807b5c82c98ca8d"));
    }

    /// One recorded exchange (`tests/data/node-label-exchange.json`): the request the
    /// daemon must send, and what the API server answered. A server on 127.0.0.1 replays
    /// the answer and hands back the request it got.
    async fn replay(answer: &serde_json::Value) -> (String, Result<(), String>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let status = answer["status"].as_u64().unwrap();
        let body = answer["body"].to_string();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            // Headers, then as many body bytes as Content-Length says.
            loop {
                let n = s.read(&mut buf).await.unwrap();
                got.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&got).to_string();
                if let Some(end) = text.find("\r\n\r\n") {
                    let len: usize = text[..end]
                        .lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case("content-length")
                                .then(|| v.trim().parse().ok())?
                        })
                        .unwrap_or(0);
                    if got.len() >= end + 4 + len {
                        break;
                    }
                }
                assert!(n > 0, "the client closed early");
            }
            let resp = format!(
                "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            s.write_all(resp.as_bytes()).await.unwrap();
            String::from_utf8(got).unwrap()
        });
        let dir =
            std::env::temp_dir().join(format!("aquifer-labels-{}-{status}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let token = dir.join("token");
        std::fs::write(&token, "tok-123\n").unwrap();
        let l =
            NodeLabels::new(&format!("http://{addr}"), None, Some(token), "gpu-node-7").unwrap();
        let changes: BTreeMap<String, bool> = [
            (
                "warm.aquifer.dev/datasets.default-imagenet".to_string(),
                true,
            ),
            ("warm.aquifer.dev/datasets.default-old".to_string(), false),
        ]
        .into();
        let r = l.apply(&changes).await;
        let got = server.await.unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        (got, r)
    }

    fn recording() -> serde_json::Value {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/node-label-exchange.json");
        serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
    }

    #[tokio::test]
    async fn the_request_is_the_recorded_one() {
        let rec = recording();
        let want = &rec["request"];
        let (got, r) = replay(&rec["responses"]["ok"]).await;
        r.unwrap();
        let (head, body) = got.split_once("\r\n\r\n").unwrap();
        let mut lines = head.lines();
        assert_eq!(
            lines.next().unwrap(),
            format!(
                "{} {} HTTP/1.1",
                want["method"].as_str().unwrap(),
                want["path"].as_str().unwrap()
            )
        );
        let headers: BTreeMap<String, String> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        for (k, v) in want["headers"].as_object().unwrap() {
            assert_eq!(headers.get(k).map(String::as_str), v.as_str(), "header {k}");
        }
        let body: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(body, want["body"], "the merge patch");
    }

    #[tokio::test]
    async fn refusals_say_why() {
        let rec = recording();
        let (_, r) = replay(&rec["responses"]["forbidden"]).await;
        let e = r.unwrap_err();
        assert!(
            e.contains("403") && e.contains("cannot patch resource"),
            "{e}"
        );
        let (_, r) = replay(&rec["responses"]["denied_by_policy"]).await;
        let e = r.unwrap_err();
        assert!(e.contains("only its own node"), "{e}");
    }

    #[test]
    fn bad_urls_are_refused() {
        assert!(NodeLabels::new("10.0.0.1:443", None, None, "n").is_err());
        assert!(NodeLabels::new(
            "https://10.0.0.1",
            Some(Path::new("/nonexistent/ca.crt")),
            None,
            "n"
        )
        .is_err());
    }
}
