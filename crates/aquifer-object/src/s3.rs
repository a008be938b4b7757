//! S3-compatible object storage (AWS S3, MinIO, Ceph RGW, Garage, s3s) on the official SDK.
//!
//! The [`ObjectStore`] trait is synchronous: the data path runs on plain threads (FUSE
//! workers, uploaders, prefetchers). Each call blocks its thread on a small tokio runtime
//! owned by the store, so many threads mean many requests in flight at once.
//!
//! Retries are left to the [`Retrying`](crate::Retrying) layer so that every backend has the
//! same policy; the SDK's own retries are off and errors are classified here instead.
//! Checksums are ours (crc32c per block segment), so the SDK's default request and response
//! checksums, which not every S3-compatible server understands, are asked for only when an
//! operation requires them.

use crate::s3_http::QuickAckHttpClient;
use crate::{ObjectError, ObjectInfo, ObjectStore, Result};
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::Client;
use aws_smithy_runtime_api::client::http::SharedHttpClient;
use bytes::Bytes;
use std::fmt;
use std::time::Duration;

/// Where a volume's blocks live in S3, parsed from `--bucket`.
#[derive(Clone, PartialEq, Eq)]
pub struct S3Location {
    /// `scheme://host[:port]` of a path-style server; None for AWS's own endpoints.
    pub endpoint: Option<String>,
    pub bucket: String,
    /// Key prefix inside the bucket, empty or ending in '/'.
    pub prefix: String,
}

impl S3Location {
    /// Parse `http(s)://HOST[:PORT]/BUCKET[/PREFIX]` (path style: MinIO, Ceph RGW, Garage)
    /// or `s3://BUCKET[/PREFIX]` (AWS, or `endpoint` when given).
    pub fn parse(url: &str, endpoint: Option<&str>) -> Result<S3Location> {
        let bad = |why: &str| {
            ObjectError::Config(format!(
                "invalid S3 bucket {url:?}: {why}; use http(s)://HOST:PORT/BUCKET or s3://BUCKET"
            ))
        };
        let (scheme, rest) = url.split_once("://").ok_or_else(|| bad("no scheme"))?;
        let (endpoint, path) = match scheme {
            "http" | "https" => {
                let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
                if host.is_empty() || host.contains('@') {
                    return Err(bad("missing host (credentials do not belong in the URL)"));
                }
                (Some(format!("{scheme}://{host}")), path)
            }
            "s3" => {
                let ep = endpoint.map(|e| e.trim_end_matches('/').to_string());
                if let Some(e) = &ep {
                    if !(e.starts_with("http://") || e.starts_with("https://")) {
                        return Err(ObjectError::Config(format!(
                            "invalid S3 endpoint {e:?}: use http(s)://HOST[:PORT]"
                        )));
                    }
                }
                (ep, rest)
            }
            _ => return Err(bad("unsupported scheme")),
        };
        let path = path.trim_matches('/');
        let (bucket, prefix) = path.split_once('/').unwrap_or((path, ""));
        if !valid_bucket(bucket) {
            return Err(bad(
                "bucket names are 3-63 lowercase letters, digits, '.' and '-'",
            ));
        }
        let prefix = prefix.trim_matches('/');
        Ok(S3Location {
            endpoint,
            bucket: bucket.to_string(),
            prefix: if prefix.is_empty() {
                String::new()
            } else {
                format!("{prefix}/")
            },
        })
    }
}

fn valid_bucket(b: &str) -> bool {
    (3..=63).contains(&b.len())
        && b.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'.' || c == b'-')
        && b.as_bytes()[0].is_ascii_alphanumeric()
}

impl fmt::Display for S3Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.endpoint {
            Some(e) => write!(f, "{e}/{}/{}", self.bucket, self.prefix),
            None => write!(f, "s3://{}/{}", self.bucket, self.prefix),
        }
    }
}

/// Access keys. Debug and Display never show the secret.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct S3Credentials {
    pub access_key: String,
    pub secret_key: String,
    pub session_token: Option<String>,
}

impl fmt::Debug for S3Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Credentials")
            .field("access_key", &self.access_key)
            .field("secret_key", &"<redacted>")
            .finish()
    }
}

/// Everything needed to reach a bucket.
#[derive(Clone, Debug)]
pub struct S3Options {
    pub region: Option<String>,
    /// Static keys; None uses the standard AWS chain (environment, profile files, web
    /// identity, container and instance roles).
    pub credentials: Option<S3Credentials>,
    /// Deadline for one attempt of one request.
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
}

impl Default for S3Options {
    fn default() -> Self {
        S3Options {
            region: None,
            credentials: None,
            request_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
        }
    }
}

pub struct S3Store {
    client: Client,
    loc: S3Location,
    rt: tokio::runtime::Runtime,
    name: String,
    /// Deadline for one GET's body: the SDK's attempt timeout ends with the headers.
    body_timeout: Duration,
}

impl S3Store {
    pub fn new(loc: S3Location, opts: &S3Options) -> Result<S3Store> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("s3-io")
            .enable_all()
            .build()
            .map_err(|e| ObjectError::Config(format!("cannot start the S3 client runtime: {e}")))?;
        let http = match &loc.endpoint {
            Some(ep) if ep.starts_with("http://") => {
                SharedHttpClient::new(QuickAckHttpClient::new(opts.connect_timeout))
            }
            _ => aws_smithy_http_client::Builder::new()
                .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                    aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
                ))
                .build_https(),
        };
        // The region is always given explicitly so that nothing asks the instance metadata
        // service for one; AWS_REGION and profiles are honoured by the loader only for keys.
        let region = opts
            .region
            .clone()
            .or_else(|| std::env::var("AWS_REGION").ok())
            .or_else(|| std::env::var("AWS_DEFAULT_REGION").ok())
            .filter(|r| !r.is_empty())
            .unwrap_or_else(|| "us-east-1".to_string());
        let sdk = rt.block_on(
            aws_config::defaults(BehaviorVersion::latest())
                .http_client(http)
                .region(Region::new(region))
                .load(),
        );
        let mut b = aws_sdk_s3::config::Builder::from(&sdk)
            .retry_config(RetryConfig::disabled())
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(opts.connect_timeout)
                    .operation_attempt_timeout(opts.request_timeout)
                    .build(),
            )
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
        if let Some(ep) = &loc.endpoint {
            b = b.endpoint_url(ep).force_path_style(true);
        }
        if let Some(c) = &opts.credentials {
            b = b.credentials_provider(Credentials::new(
                &c.access_key,
                &c.secret_key,
                c.session_token.clone(),
                None,
                "aquifer",
            ));
        }
        let name = loc.to_string();
        Ok(S3Store {
            client: Client::from_conf(b.build()),
            loc,
            rt,
            name,
            body_timeout: opts.request_timeout,
        })
    }

    fn key(&self, key: &str) -> String {
        format!("{}{key}", self.loc.prefix)
    }

    /// Create the bucket unless it exists; fails clearly when it cannot be reached.
    pub fn ensure_bucket(&self) -> Result<()> {
        let head = self
            .rt
            .block_on(self.client.head_bucket().bucket(&self.loc.bucket).send());
        match head {
            Ok(_) => Ok(()),
            Err(e) if status(&e) == Some(404) => {
                let r = self
                    .rt
                    .block_on(self.client.create_bucket().bucket(&self.loc.bucket).send());
                match r {
                    Ok(_) => Ok(()),
                    // Another client may have created it meanwhile (two formats, parallel
                    // tests); servers answer that race differently (409, or even 500), so
                    // a second look decides.
                    Err(e) => {
                        let again = self
                            .rt
                            .block_on(self.client.head_bucket().bucket(&self.loc.bucket).send());
                        match again {
                            Ok(_) => Ok(()),
                            Err(_) => Err(self.error("create bucket", &self.loc.bucket, e)),
                        }
                    }
                }
            }
            Err(e) => Err(self.error("open bucket", &self.loc.bucket, e)),
        }
    }

    /// Classify an SDK error: missing objects, transient failures worth a retry (timeouts,
    /// connection errors, 5xx, throttling) and everything else.
    fn error<E>(&self, op: &'static str, key: &str, e: SdkError<E, HttpResponse>) -> ObjectError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let code = e.code().map(str::to_string);
        let status = status(&e);
        let msg = format!("{op} {key}: {}", DisplayErrorContext(&e));
        let store = self.name.clone();
        match &e {
            SdkError::ConstructionFailure(_) => ObjectError::Config(msg),
            SdkError::TimeoutError(_)
            | SdkError::DispatchFailure(_)
            | SdkError::ResponseError(_) => ObjectError::Unavailable { store, msg },
            _ => match (status, code.as_deref()) {
                (Some(404), _) | (_, Some("NoSuchKey" | "NotFound")) => {
                    if code.as_deref() == Some("NoSuchBucket") {
                        ObjectError::Config(format!(
                            "bucket {} does not exist at {}",
                            self.loc.bucket, self.name
                        ))
                    } else {
                        ObjectError::NotFound {
                            store,
                            key: key.to_string(),
                        }
                    }
                }
                (Some(s), _) if s >= 500 || s == 429 => ObjectError::Unavailable { store, msg },
                (_, Some("SlowDown" | "RequestTimeout" | "Throttling" | "InternalError")) => {
                    ObjectError::Unavailable { store, msg }
                }
                (Some(401 | 403), _) => ObjectError::Config(format!(
                    "access to {} denied ({}): check the access key and secret",
                    self.name,
                    code.as_deref().unwrap_or("403")
                )),
                _ => ObjectError::Io {
                    store,
                    op,
                    key: key.to_string(),
                    source: std::io::Error::other(msg),
                },
            },
        }
    }

    /// GET `[off, off+len)` whole, or None when `off` is at or past the end. Large ranges
    /// (blocks formatted bigger than 6 MiB) are fetched as 4 MiB ranged GETs in parallel: one
    /// HTTP stream rarely fills the link to a remote store.
    /// `buf` receives the body unless the range is split (a recycled buffer is reused).
    fn fetch(
        &self,
        key: &str,
        off: u64,
        len: Option<u64>,
        buf: Vec<u8>,
    ) -> Result<Option<Vec<u8>>> {
        const PART: u64 = 4 << 20;
        const SPLIT_ABOVE: u64 = 6 << 20;
        let l = match len {
            Some(l) if l > SPLIT_ABOVE => l,
            _ => {
                let task = self.spawn_get(key, off, len, buf);
                return self.finish(key, task);
            }
        };
        let tasks: Vec<_> = (0..l)
            .step_by(PART as usize)
            .map(|p| {
                (
                    PART.min(l - p),
                    self.spawn_get(key, off + p, Some(PART.min(l - p)), Vec::new()),
                )
            })
            .collect();
        let mut out = Vec::with_capacity(l as usize);
        for (want, task) in tasks {
            let Some(part) = self.finish(key, task)? else {
                break;
            };
            out.extend_from_slice(&part);
            if (part.len() as u64) < want {
                break; // the object ended inside this part
            }
        }
        Ok((!out.is_empty()).then_some(out))
    }

    /// Start one GET on the runtime. The request and the body are driven on the runtime's
    /// threads and the caller is woken once at the end; polling the body from the caller
    /// would wake it for every network chunk (hundreds per block).
    /// The body is gathered into `buf` (cleared first), so a recycled buffer is reused.
    fn spawn_get(&self, key: &str, off: u64, len: Option<u64>, mut buf: Vec<u8>) -> GetTask {
        let range = match len {
            Some(0) => return self.rt.spawn(async { Ok(Ok(None)) }),
            Some(l) => Some(format!("bytes={off}-{}", off + l - 1)),
            None if off > 0 => Some(format!("bytes={off}-")),
            None => None,
        };
        let req = self
            .client
            .get_object()
            .bucket(&self.loc.bucket)
            .key(self.key(key))
            .set_range(range);
        let body_timeout = self.body_timeout;
        self.rt.spawn(async move {
            match req.send().await {
                Ok(mut out) => {
                    // Into one buffer as the chunks arrive, so a block is held once.
                    let size = out.content_length().unwrap_or(0).max(0) as usize;
                    buf.clear();
                    buf.reserve(len.map_or(size, |l| l as usize));
                    // A server that stops sending mid-body must not hang the reader (and
                    // the FUSE request behind it) for ever: it is an error to retry.
                    let body = async {
                        while let Some(chunk) = out.body.next().await {
                            match chunk {
                                Ok(c) => buf.extend_from_slice(&c),
                                Err(e) => return Err(e.to_string()),
                            }
                        }
                        Ok(())
                    };
                    match tokio::time::timeout(body_timeout, body).await {
                        Ok(Ok(())) => Ok(Ok(Some(buf))),
                        Ok(Err(e)) => Ok(Err(e)),
                        Err(_) => Ok(Err(format!("body not complete after {body_timeout:?}"))),
                    }
                }
                // Range Not Satisfiable: the object ends before `off`.
                Err(e) if status(&e) == Some(416) => Ok(Ok(None)),
                Err(e) => Err(e),
            }
        })
    }

    fn finish(&self, key: &str, task: GetTask) -> Result<Option<Vec<u8>>> {
        match self.rt.block_on(task) {
            Ok(Ok(Ok(data))) => Ok(data),
            Ok(Ok(Err(body))) => Err(self.body_error(key, body)),
            Ok(Err(e)) => Err(self.error("get", key, e)),
            Err(join) => Err(self.body_error(key, join)),
        }
    }

    fn body_error(&self, key: &str, e: impl std::fmt::Display) -> ObjectError {
        ObjectError::Unavailable {
            store: self.name.clone(),
            msg: format!("get {key}: reading the body: {e}"),
        }
    }
}

type HttpResponse = aws_sdk_s3::config::http::HttpResponse;
/// A GET running on the store's runtime: the SDK error, or the body (None past the end) or
/// the message of a failure while reading it.
type GetTask = tokio::task::JoinHandle<
    std::result::Result<
        std::result::Result<Option<Vec<u8>>, String>,
        SdkError<aws_sdk_s3::operation::get_object::GetObjectError, HttpResponse>,
    >,
>;

fn status<E>(e: &SdkError<E, HttpResponse>) -> Option<u16> {
    e.raw_response().map(|r| r.status().as_u16())
}

impl ObjectStore for S3Store {
    fn describe(&self) -> String {
        self.name.clone()
    }

    fn put(&self, key: &str, data: Bytes) -> Result<()> {
        let req = self
            .client
            .put_object()
            .bucket(&self.loc.bucket)
            .key(self.key(key))
            .content_length(data.len() as i64)
            .body(ByteStream::from(data))
            // SigV4 would hash every block with SHA-256 on both ends (~1-2 CPU s/GiB each):
            // blocks carry their own crc32c, verified on every read, and TLS protects
            // them in transit on https endpoints.
            .customize()
            .disable_payload_signing();
        self.rt
            .block_on(req.send())
            .map(|_| ())
            .map_err(|e| self.error("put", key, e))
    }

    fn get(&self, key: &str, off: u64, len: Option<u64>) -> Result<Bytes> {
        let Some(mut data) = self.fetch(key, off, len, Vec::new())? else {
            return Ok(Bytes::new());
        };
        // A server that ignores Range would hand back the whole object.
        if let Some(l) = len {
            data.truncate(l as usize);
        }
        Ok(Bytes::from(data))
    }

    fn get_into(&self, key: &str, off: u64, buf: &mut [u8]) -> Result<usize> {
        let Some(data) = self.fetch(key, off, Some(buf.len() as u64), Vec::new())? else {
            return Ok(0);
        };
        let n = data.len().min(buf.len());
        buf[..n].copy_from_slice(&data[..n]);
        Ok(n)
    }

    fn get_owned(&self, key: &str, off: u64, len: usize, buf: Vec<u8>) -> Result<Vec<u8>> {
        let mut data = self
            .fetch(key, off, Some(len as u64), buf)?
            .unwrap_or_default();
        // A server that ignores Range would hand back the whole object.
        data.truncate(len);
        Ok(data)
    }

    fn head(&self, key: &str) -> Result<ObjectInfo> {
        let req = self
            .client
            .head_object()
            .bucket(&self.loc.bucket)
            .key(self.key(key));
        let out = self
            .rt
            .block_on(req.send())
            .map_err(|e| self.error("head", key, e))?;
        Ok(ObjectInfo {
            key: key.to_string(),
            size: out.content_length().unwrap_or(0).max(0) as u64,
            modified: out.last_modified().and_then(|t| (*t).try_into().ok()),
        })
    }

    fn delete(&self, key: &str) -> Result<()> {
        let req = self
            .client
            .delete_object()
            .bucket(&self.loc.bucket)
            .key(self.key(key));
        match self.rt.block_on(req.send()) {
            Ok(_) => Ok(()),
            Err(e) if status(&e) == Some(404) => Ok(()),
            Err(e) => Err(self.error("delete", key, e)),
        }
    }

    fn list(&self, prefix: &str, start_after: &str, limit: usize) -> Result<Vec<ObjectInfo>> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        while out.len() < limit {
            let mut req = self
                .client
                .list_objects_v2()
                .bucket(&self.loc.bucket)
                .prefix(self.key(prefix))
                .max_keys((limit - out.len()).min(1000) as i32);
            req = match &token {
                Some(t) => req.continuation_token(t),
                None if !start_after.is_empty() => req.start_after(self.key(start_after)),
                None => req,
            };
            let page = self
                .rt
                .block_on(req.send())
                .map_err(|e| self.error("list", prefix, e))?;
            for o in page.contents() {
                let Some(k) = o.key() else { continue };
                let Some(k) = k.strip_prefix(&self.loc.prefix) else {
                    continue;
                };
                out.push(ObjectInfo {
                    key: k.to_string(),
                    size: o.size().unwrap_or(0).max(0) as u64,
                    modified: o.last_modified().and_then(|t| (*t).try_into().ok()),
                });
            }
            match page.next_continuation_token() {
                Some(t) if page.is_truncated() == Some(true) => token = Some(t.to_string()),
                _ => break,
            }
        }
        out.truncate(limit);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bucket_urls() {
        let l = S3Location::parse("http://127.0.0.1:9000/vol-a", None).unwrap();
        assert_eq!(l.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        assert_eq!((l.bucket.as_str(), l.prefix.as_str()), ("vol-a", ""));
        let l = S3Location::parse("https://minio.local/data/team/x/", None).unwrap();
        assert_eq!(l.endpoint.as_deref(), Some("https://minio.local"));
        assert_eq!((l.bucket.as_str(), l.prefix.as_str()), ("data", "team/x/"));
        let l = S3Location::parse("s3://my.bucket", None).unwrap();
        assert_eq!((l.endpoint, l.bucket.as_str()), (None, "my.bucket"));
        let l = S3Location::parse("s3://b12/p", Some("http://10.0.0.1:7480/")).unwrap();
        assert_eq!(l.endpoint.as_deref(), Some("http://10.0.0.1:7480"));
        assert_eq!(l.prefix, "p/");
        for bad in [
            "127.0.0.1:9000/b",
            "ftp://h/bkt",
            "http://h",
            "http:///bkt",
            "s3://Upper",
            "s3://ab",
            "http://user:pw@h/bkt",
        ] {
            assert!(S3Location::parse(bad, None).is_err(), "{bad}");
        }
        assert!(S3Location::parse("s3://bkt", Some("ftp://x")).is_err());
    }

    #[test]
    fn secrets_stay_out_of_debug_output() {
        let c = S3Credentials {
            access_key: "AK".into(),
            secret_key: "very-secret".into(),
            session_token: None,
        };
        assert!(!format!("{c:?}").contains("very-secret"));
        let o = S3Options {
            credentials: Some(c),
            ..Default::default()
        };
        assert!(!format!("{o:?}").contains("very-secret"));
    }
}
