//! Connections and topology: which server is the master (the one server, the master the
//! Sentinels name, or the Cluster node serving the volume's slot), the pool of connections
//! to it, and what happens after an error — which errors are worth a retry, and `run`, the
//! retry with backoff until the deadline that every operation outside a transaction goes
//! through. A failover or a moved slot forgets the master, and the next connection
//! resolves it again.

use crate::{engine_err, RedisKv};
use aquifer_meta::url::{RedisTopology, RedisUrl};
use aquifer_meta::Result;
use aquifer_retry::RetryPolicy;
use redis::{Client, Connection, ErrorKind, RedisError, ServerErrorKind, Value};
use std::time::Duration;

/// Idle connections kept for reuse.
const POOL_MAX: usize = 32;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors after which the same operation may succeed on a new connection or a new master.
pub(crate) fn retryable(e: &RedisError) -> bool {
    if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() || e.is_timeout() {
        return true;
    }
    // A WAIT cut short because the master became a replica (a failover); inside a
    // pipeline the code is only in the message.
    if e.code() == Some("UNBLOCKED") || e.to_string().contains("UNBLOCKED") {
        return true;
    }
    matches!(
        e.kind(),
        ErrorKind::Server(
            ServerErrorKind::BusyLoading
                | ServerErrorKind::Moved
                | ServerErrorKind::Ask
                | ServerErrorKind::TryAgain
                | ServerErrorKind::ClusterDown
                | ServerErrorKind::MasterDown
                | ServerErrorKind::ReadOnly
        ) | ErrorKind::MasterNameNotFoundBySentinel
            | ErrorKind::EmptySentinelList
    )
}

/// Errors that mean the master we talk to is no longer the right one.
fn wrong_master(e: &RedisError) -> bool {
    !matches!(
        e.kind(),
        ErrorKind::Server(ServerErrorKind::BusyLoading | ServerErrorKind::TryAgain)
    )
}

fn conn_info(
    url: &RedisUrl,
    host: &str,
    port: u16,
    db: i64,
    password: Option<&str>,
    username: Option<&str>,
) -> redis::RedisResult<Client> {
    let addr = if url.tls {
        redis::ConnectionAddr::TcpTls {
            host: host.to_string(),
            port,
            insecure: url.insecure,
            tls_params: None,
        }
    } else {
        redis::ConnectionAddr::Tcp(host.to_string(), port)
    };
    let mut settings = redis::RedisConnectionInfo::default().set_db(db);
    if let Some(u) = username {
        settings = settings.set_username(u);
    }
    if let Some(p) = password {
        settings = settings.set_password(p);
    }
    let info = redis::IntoConnectionInfo::into_connection_info(addr)?.set_redis_settings(settings);
    if url.tls && (url.ca_cert_file.is_some() || url.cert_file.is_some()) {
        let read = |f: &str| {
            std::fs::read(f).map_err(|e| {
                RedisError::from((
                    ErrorKind::InvalidClientConfig,
                    "cannot read a TLS file",
                    format!("{f}: {e}"),
                ))
            })
        };
        let client_tls = match (&url.cert_file, &url.key_file) {
            (Some(c), Some(k)) => Some(redis::ClientTlsConfig {
                client_cert: read(c)?,
                client_key: read(k)?,
            }),
            _ => None,
        };
        let root_cert = url.ca_cert_file.as_deref().map(read).transpose()?;
        Client::build_with_tls(
            info,
            redis::TlsCertificates {
                client_tls,
                root_cert,
            },
        )
    } else {
        Client::open(info)
    }
}

fn connect(client: &Client) -> redis::RedisResult<Connection> {
    let c = client.get_connection_with_timeout(CONNECT_TIMEOUT)?;
    c.set_read_timeout(Some(IO_TIMEOUT))?;
    c.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(c)
}

impl RedisKv {
    /// Resolve the master for this volume's keys: the one server, the master the sentinels
    /// name, or the cluster node serving the volume's hash slot.
    fn resolve(&self) -> redis::RedisResult<Client> {
        let u = &self.url;
        let pw = u.password.as_ref().map(|s| s.0.as_str());
        let user = u.username.as_deref();
        match &u.topology {
            RedisTopology::Single { host, port } => {
                conn_info(u, host, *port, u.db as i64, pw, user)
            }
            RedisTopology::Sentinel { master, sentinels } => {
                let spw = u.sentinel_password.as_ref().map(|s| s.0.as_str()).or(pw);
                let mut last = RedisError::from((ErrorKind::EmptySentinelList, "no sentinel"));
                for (h, p) in sentinels {
                    let addr = conn_info(u, h, *p, 0, spw, None)
                        .and_then(|c| connect(&c))
                        .and_then(|mut c| {
                            redis::cmd("SENTINEL")
                                .arg("get-master-addr-by-name")
                                .arg(master)
                                .query::<Option<(String, u16)>>(&mut c)
                        });
                    match addr {
                        Ok(Some((mh, mp))) => {
                            let client = conn_info(u, &mh, mp, u.db as i64, pw, user)?;
                            // A just-demoted master may still be named: check its role.
                            let mut c = connect(&client)?;
                            let role: Vec<Value> = redis::cmd("ROLE").query(&mut c)?;
                            match role.first() {
                                Some(Value::BulkString(r)) if r == b"master" => return Ok(client),
                                _ => {
                                    last = RedisError::from((
                                        ErrorKind::Server(ServerErrorKind::ReadOnly),
                                        "the master named by the sentinels is not a master yet",
                                    ))
                                }
                            }
                        }
                        Ok(None) => {
                            last = RedisError::from((
                                ErrorKind::MasterNameNotFoundBySentinel,
                                "sentinel does not know the master",
                                master.clone(),
                            ))
                        }
                        Err(e) => last = e,
                    }
                }
                Err(last)
            }
            RedisTopology::Cluster { nodes } => {
                let mut last = RedisError::from((ErrorKind::Io, "no cluster node answered"));
                for (h, p) in nodes {
                    let r = conn_info(u, h, *p, 0, pw, user)
                        .and_then(|c| connect(&c))
                        .and_then(|mut c| {
                            let slot: i64 = redis::cmd("CLUSTER")
                                .arg("KEYSLOT")
                                .arg(&self.prefix[..])
                                .query(&mut c)?;
                            let slots: Vec<Value> =
                                redis::cmd("CLUSTER").arg("SLOTS").query(&mut c)?;
                            Ok((slot, slots))
                        });
                    let (slot, slots) = match r {
                        Ok(v) => v,
                        Err(e) => {
                            last = e;
                            continue;
                        }
                    };
                    if let Some((mh, mp)) = slot_master(&slots, slot, h) {
                        return conn_info(u, &mh, mp, 0, pw, user);
                    }
                    last = RedisError::from((
                        ErrorKind::Server(ServerErrorKind::ClusterDown),
                        "no node serves the volume's slot",
                    ));
                }
                Err(last)
            }
        }
    }

    pub(crate) fn new_connection(&self) -> redis::RedisResult<Connection> {
        let client = {
            let mut m = self.master.lock().unwrap();
            match &*m {
                Some(c) => c.clone(),
                None => {
                    let c = self.resolve()?;
                    *m = Some(c.clone());
                    c
                }
            }
        };
        connect(&client)
    }

    pub(crate) fn take_connection(&self) -> redis::RedisResult<Connection> {
        if let Some(c) = self.pool.lock().unwrap().pop() {
            return Ok(c);
        }
        self.new_connection()
    }

    pub(crate) fn put_connection(&self, c: Connection) {
        let mut p = self.pool.lock().unwrap();
        if p.len() < POOL_MAX {
            p.push(c);
        }
    }

    /// After an error that a retry may fix: forget every connection (they all go to the old
    /// server) and, when the master may have moved, the master too.
    pub(crate) fn reset(&self, e: &RedisError) {
        self.pool.lock().unwrap().clear();
        if wrong_master(e) {
            self.epoch
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            *self.master.lock().unwrap() = None;
            // A new master may be configured otherwise.
            *self.plan.lock().unwrap() = None;
        }
    }

    /// The engine's retry policy: waits from 20 ms doubling to 1 s, until the deadline.
    pub(crate) fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy::new(Duration::from_millis(20), Duration::from_secs(1))
            .with_deadline(self.deadline)
    }

    /// Run `op` on a connection, again on a new one after a retryable error, with backoff,
    /// until the deadline.
    pub(crate) fn run<T>(
        &self,
        mut op: impl FnMut(&mut Connection) -> redis::RedisResult<T>,
    ) -> Result<T> {
        let mut backoff = self.retry_policy().start();
        let mut warned = false;
        loop {
            let r = self.take_connection().and_then(|mut c| {
                let r = op(&mut c);
                if r.is_ok() {
                    self.put_connection(c);
                }
                r
            });
            match r {
                Ok(v) => {
                    if warned {
                        tracing::info!("metadata engine reachable again");
                    }
                    return Ok(v);
                }
                Err(e) if retryable(&e) => {
                    if !warned {
                        tracing::warn!(error = %e, "metadata engine unavailable; retrying");
                        warned = true;
                    }
                    self.reset(&e);
                    if !backoff.wait() {
                        return Err(engine_err(e));
                    }
                }
                Err(e) => return Err(engine_err(e)),
            }
        }
    }
}

/// The master of `slot` in a `CLUSTER SLOTS` reply. A node that reports an empty host means
/// "the address you reached me at".
fn slot_master(slots: &[Value], slot: i64, asked: &str) -> Option<(String, u16)> {
    let int = |v: &Value| match v {
        Value::Int(i) => Some(*i),
        _ => None,
    };
    for range in slots {
        let Value::Array(r) = range else { continue };
        let (Some(lo), Some(hi)) = (r.first().and_then(int), r.get(1).and_then(int)) else {
            continue;
        };
        if slot < lo || slot > hi {
            continue;
        }
        let Some(Value::Array(node)) = r.get(2) else {
            continue;
        };
        let host = match node.first() {
            Some(Value::BulkString(h)) => String::from_utf8_lossy(h).into_owned(),
            Some(Value::SimpleString(h)) => h.clone(),
            _ => continue,
        };
        let host = if host.is_empty() || host == "?" {
            asked.to_string()
        } else {
            host
        };
        let port = node.get(1).and_then(int)?;
        return Some((host, port as u16));
    }
    None
}
