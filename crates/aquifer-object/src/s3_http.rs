//! The HTTP client under the S3 SDK for plain-HTTP endpoints: hyper's pooled HTTP/1.1 client
//! over TCP connections that acknowledge responses at once.
//!
//! Why not the SDK's own client: a server that leaves Nagle's algorithm on (s3s, and other
//! small S3 servers; MinIO and AWS do not) writes a response's headers, then holds the body
//! until that first segment is acknowledged. On a reused connection the client's kernel is in
//! "ping-pong" mode — it just sent a request, so it expects to piggyback the ACK on its next
//! send — and delays the ACK by 40 ms. Every GET, even of 4 KiB, then takes 40 ms instead of
//! 0.3 ms. Setting TCP_QUICKACK after each request leaves that mode; the SDK's connector
//! offers no hook to the socket, so the connections are made here.
//! HTTPS endpoints keep the SDK's client (rustls, the system's root certificates).

use aws_sdk_s3::config::http::HttpResponse;
use aws_smithy_runtime_api::client::http::{
    HttpClient, HttpConnector, HttpConnectorFuture, HttpConnectorSettings, SharedHttpConnector,
};
use aws_smithy_runtime_api::client::orchestrator::HttpRequest;
use aws_smithy_runtime_api::client::result::ConnectorError;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::body::SdkBody;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector as TcpConnector};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::future::Future;
use std::io;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::TcpStream;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// An [`HttpClient`] for `http://` endpoints; see the module documentation.
#[derive(Clone, Debug)]
pub struct QuickAckHttpClient {
    client: Client<QuickAckConnector, SdkBody>,
}

impl QuickAckHttpClient {
    pub fn new(connect_timeout: Duration) -> QuickAckHttpClient {
        let mut tcp = TcpConnector::new();
        tcp.set_nodelay(true);
        tcp.set_connect_timeout(Some(connect_timeout));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .build(QuickAckConnector { tcp });
        QuickAckHttpClient { client }
    }
}

impl HttpClient for QuickAckHttpClient {
    fn http_connector(
        &self,
        _settings: &HttpConnectorSettings,
        _components: &RuntimeComponents,
    ) -> SharedHttpConnector {
        // Timeouts: connecting is bounded by the TCP connector, whole attempts by the SDK.
        SharedHttpConnector::new(self.clone())
    }
}

impl HttpConnector for QuickAckHttpClient {
    fn call(&self, request: HttpRequest) -> HttpConnectorFuture {
        let request = match request.try_into_http1x() {
            Ok(r) => r,
            Err(e) => return HttpConnectorFuture::ready(Err(ConnectorError::user(e.into()))),
        };
        let fut = self.client.request(request);
        HttpConnectorFuture::new(async move {
            match fut.await {
                Ok(resp) => HttpResponse::try_from(resp.map(SdkBody::from_body_1_x))
                    .map_err(|e| ConnectorError::other(e.into(), None)),
                // Refused, reset, timed out: all worth another attempt.
                Err(e) => Err(ConnectorError::io(e.into())),
            }
        })
    }
}

/// Makes TCP connections whose streams ask for quick ACKs.
#[derive(Clone, Debug)]
struct QuickAckConnector {
    tcp: TcpConnector,
}

impl tower_service::Service<http::Uri> for QuickAckConnector {
    type Response = QuickAckStream;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<QuickAckStream, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.tcp.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let connecting = self.tcp.call(uri);
        Box::pin(async move {
            let io = connecting.await?;
            Ok(QuickAckStream { io, sent: false })
        })
    }
}

/// A TCP stream that sets TCP_QUICKACK once a request has gone out (on the first read after
/// a write) and after every read, so each segment of a response is acknowledged as it
/// arrives: one setsockopt per read, against a 40 ms stall per response.
struct QuickAckStream {
    io: TokioIo<TcpStream>,
    sent: bool,
}

impl QuickAckStream {
    fn note_write(&mut self, r: &Poll<io::Result<usize>>) {
        if matches!(r, Poll::Ready(Ok(n)) if *n > 0) {
            self.sent = true;
        }
    }
}

fn quickack(s: &TcpStream) {
    let on: libc::c_int = 1;
    // SAFETY: a valid socket descriptor and a c_int option of the right size. Failure only
    // means delayed ACKs, so it is ignored.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_QUICKACK,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

impl Read for QuickAckStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.sent {
            this.sent = false;
            quickack(this.io.inner());
        }
        let r = Pin::new(&mut this.io).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) {
            // The kernel drops back to delayed ACKs on its own; re-arm after every read or
            // a body's tail waits 40 ms again (seen on 128 KiB objects).
            quickack(this.io.inner());
        }
        r
    }
}

impl Write for QuickAckStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write(cx, buf);
        this.note_write(&r);
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.note_write(&r);
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

impl Connection for QuickAckStream {
    fn connected(&self) -> Connected {
        self.io.connected()
    }
}
