//! Answering the other members ([`crate::proto`]).
//!
//! Bounded in number and size: at most [`MAX_CONNECTIONS`] connections (more wait in the
//! listen backlog), at most [`MAX_FETCHES`] blocks read or fetched at once (more requests
//! wait their turn), a path of at most [`crate::proto::MAX_PATH`] bytes, no request body
//! read, request headers within [`HEADER_TIMEOUT`]. Nothing is answered before the
//! request's credentials check.

use crate::proto::{self, Op, AUTH_HEADER, CRC_HEADER};
use crate::Group;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;

/// Each member keeps up to 8 idle connections to each other: room for 128 members.
pub(crate) const MAX_CONNECTIONS: usize = 1024;
pub(crate) const MAX_FETCHES: usize = 32;
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);

pub(crate) fn start(group: Arc<Group>, listener: std::net::TcpListener) {
    let rt = group.rt.handle().clone();
    rt.spawn(async move {
        let listener = match tokio::net::TcpListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("cache group: cannot listen: {e}");
                return;
            }
        };
        let conns = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let fetches = Arc::new(Semaphore::new(MAX_FETCHES));
        loop {
            let Ok(permit) = conns.clone().acquire_owned().await else {
                return;
            };
            let (stream, _) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    // Out of descriptors and the like: wait, do not spin.
                    tracing::warn!("cache group: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            // Blocks go out in one write; Nagle would hold a response's tail for the ACK.
            let _ = stream.set_nodelay(true);
            let (group, fetches) = (group.clone(), fetches.clone());
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let (group, fetches) = (group.clone(), fetches.clone());
                    async move { Ok::<_, Infallible>(answer(group, fetches, req).await) }
                });
                let _ = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
                drop(permit);
            });
        }
    });
}

fn reply(status: StatusCode, body: Bytes) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = status;
    r
}

fn text(status: StatusCode, msg: &'static str) -> Response<Full<Bytes>> {
    reply(status, Bytes::from_static(msg.as_bytes()))
}

async fn answer(
    group: Arc<Group>,
    fetches: Arc<Semaphore>,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let c = &group.counters;
    let method = req.method().as_str();
    let path = req.uri().path();
    if path.len() > proto::MAX_PATH || req.uri().query().is_some() {
        c.refused.fetch_add(1, Ordering::Relaxed);
        return text(StatusCode::BAD_REQUEST, "not a group request\n");
    }
    let creds = req.headers().get(AUTH_HEADER).and_then(|v| v.to_str().ok());
    if group.key().verify(method, path, creds).is_err() {
        c.refused.fetch_add(1, Ordering::Relaxed);
        return text(StatusCode::FORBIDDEN, "no valid key of this group\n");
    }
    let Some((op, uuid, key)) = proto::parse(method, path) else {
        c.refused.fetch_add(1, Ordering::Relaxed);
        return text(StatusCode::BAD_REQUEST, "not a group request\n");
    };
    if uuid != group.cfg.volume {
        c.refused.fetch_add(1, Ordering::Relaxed);
        return text(StatusCode::FORBIDDEN, "another volume\n");
    }
    if (group.cfg.block_len)(&key).is_none() {
        return text(StatusCode::BAD_REQUEST, "not a block key\n");
    }
    let Some(source) = group.source.get().cloned() else {
        return text(StatusCode::SERVICE_UNAVAILABLE, "not serving yet\n");
    };
    match op {
        // Both touch the disk: off the async workers.
        Op::Has => match tokio::task::spawn_blocking(move || source.holds(&key)).await {
            Ok(true) => text(StatusCode::OK, ""),
            _ => text(StatusCode::NOT_FOUND, ""),
        },
        Op::Drop => {
            let _ = tokio::task::spawn_blocking(move || source.drop_block(&key)).await;
            text(StatusCode::NO_CONTENT, "")
        }
        Op::Warm => {
            let Ok(_turn) = fetches.acquire_owned().await else {
                return text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n");
            };
            let k = key.clone();
            match tokio::task::spawn_blocking(move || source.warm(&k)).await {
                Ok(Ok(())) => text(StatusCode::NO_CONTENT, ""),
                Ok(Err(e)) => {
                    tracing::warn!("cache group: a member asked to warm block {key}: {e}");
                    text(StatusCode::BAD_GATEWAY, "the store failed\n")
                }
                Err(_) => text(StatusCode::INTERNAL_SERVER_ERROR, "failed\n"),
            }
        }
        Op::Get => {
            let Ok(_turn) = fetches.acquire_owned().await else {
                return text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n");
            };
            let k = key.clone();
            let got = tokio::task::spawn_blocking(move || source.fetch(&k)).await;
            let block = match got {
                Ok(Ok(b)) => b,
                Ok(Err(e)) => {
                    tracing::warn!("cache group: a member asked for block {key}: {e}");
                    return text(StatusCode::BAD_GATEWAY, "the store failed\n");
                }
                Err(_) => return text(StatusCode::INTERNAL_SERVER_ERROR, "failed\n"),
            };
            c.served.fetch_add(1, Ordering::Relaxed);
            c.peer_bytes_out
                .fetch_add(block.len() as u64, Ordering::Relaxed);
            let crc = crc32c::crc32c(&block);
            let mut r = reply(StatusCode::OK, Bytes::from_owner(ArcBytes(block)));
            r.headers_mut().insert(CRC_HEADER, crc.into());
            r
        }
    }
}

/// A cached block lent to a response without copying it.
struct ArcBytes(aquifer_cache::Block);

impl AsRef<[u8]> for ArcBytes {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}
