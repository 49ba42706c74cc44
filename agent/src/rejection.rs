//! Every way a request can be refused before a handler runs, answered with
//! the API's JSON error (code, message, help) instead of axum's plain text
//! or an empty body: unknown paths, methods an endpoint does not allow, bad
//! path segments and query strings, bodies that are too large or too slow.

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header, request::Parts};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;

use vmctl_api::limits::human_bytes;

use crate::api::ApiError;

pub use vmctl_api::limits::{MAX_APPLY_BODY_BYTES, MAX_BODY_BYTES};

/// A request body that pauses longer than this between two reads is
/// refused with 408 (tower-http's `RequestBodyTimeoutLayer`).
pub const BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// A request body not received whole within this is refused with 408.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);

fn too_large(limit: usize, sent: Option<usize>) -> ApiError {
    let sent = sent.map_or(String::new(), |n| format!(" ({})", human_bytes(n as u64)));
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "vmctl::api::payload_too_large",
        format!(
            "the request body{sent} is larger than the agent accepts here ({})",
            human_bytes(limit as u64)
        ),
        Some(
            "apply the objects in several smaller files; the limits are in the README and agent/openapi.json",
        ),
    )
}

fn too_slow(limit: Duration) -> ApiError {
    ApiError::new(
        StatusCode::REQUEST_TIMEOUT,
        "vmctl::api::request_timeout",
        format!(
            "the request body was not received in time (the agent waits {} s at most, and {} s between two parts)",
            limit.as_secs(),
            BODY_IDLE_TIMEOUT.as_secs()
        ),
        Some("send the whole body at once"),
    )
}

/// Reads a whole request body of at most `limit` bytes within
/// [`BODY_READ_TIMEOUT`]. A `Content-Length` above the limit is refused
/// before any of the body is read.
pub async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, ApiError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if let Some(n) = declared.filter(|n| *n > limit) {
        return Err(too_large(limit, Some(n)));
    }
    match tokio::time::timeout(BODY_READ_TIMEOUT, axum::body::to_bytes(body, limit)).await {
        Err(_) => Err(too_slow(BODY_READ_TIMEOUT)),
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(e)) => {
            let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
            while let Some(s) = source {
                if s.is::<http_body_util::LengthLimitError>() {
                    return Err(too_large(limit, None));
                }
                if s.is::<tower_http::timeout::TimeoutError>() {
                    return Err(too_slow(BODY_READ_TIMEOUT));
                }
                source = s.source();
            }
            Err(ApiError::bad_request(
                format!("the request body could not be read: {e}"),
                "send the whole body with a correct Content-Length",
            ))
        }
    }
}

/// A JSON request body of type `T` and at most `LIMIT` bytes, read with
/// [`read_body`] (413 when larger, 408 when too slow) and parsed with
/// serde (400 naming the field when malformed). The limit is part of the
/// type so that the OpenAPI document states it.
#[derive(Debug)]
pub struct ApiJson<T, const LIMIT: usize>(pub T);

impl<S: Send + Sync, T: DeserializeOwned, const LIMIT: usize> FromRequest<S> for ApiJson<T, LIMIT> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, ApiError> {
        let (parts, body) = req.into_parts();
        let bytes = read_body(&parts.headers, body, LIMIT).await?;
        serde_json::from_slice(&bytes).map(ApiJson).map_err(|e| {
            ApiError::bad_request(
                format!("malformed request body: {e}"),
                "send JSON matching the API (see agent/openapi.json or GET /v1/openapi.json)",
            )
        })
    }
}

/// A request body of raw bytes (`application/octet-stream`, e.g. a file)
/// of at most `LIMIT` bytes, read with [`read_body`] (413 when larger, 408
/// when too slow).
#[derive(Debug)]
pub struct ApiBytes<const LIMIT: usize>(pub Bytes);

impl<S: Send + Sync, const LIMIT: usize> FromRequest<S> for ApiBytes<LIMIT> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, ApiError> {
        let (parts, body) = req.into_parts();
        read_body(&parts.headers, body, LIMIT).await.map(ApiBytes)
    }
}

/// `Query<T>` whose rejection is the API's JSON error.
#[derive(Debug)]
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(q)) => Ok(ApiQuery(q)),
            Err(e) => Err(ApiError::bad_request(
                format!(
                    "the query string `{}` of {} is not valid: {}",
                    parts.uri.query().unwrap_or(""),
                    parts.uri.path(),
                    strip_axum_prefix(&e.body_text())
                ),
                "the query parameters of every endpoint are listed in agent/openapi.json",
            )),
        }
    }
}

/// `Path<T>` whose rejection is the API's JSON error.
#[derive(Debug)]
pub struct ApiPath<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(p)) => Ok(ApiPath(p)),
            Err(e) => Err(ApiError::bad_request(
                format!(
                    "the path {} is not valid: {}",
                    parts.uri.path(),
                    strip_axum_prefix(&e.body_text())
                ),
                "names are DNS-1123 labels (lowercase letters, digits and `-`), UTF-8 when percent-decoded",
            )),
        }
    }
}

/// axum's texts start with "Failed to deserialize query string: "; keep
/// what follows, which names the field and the problem.
fn strip_axum_prefix(text: &str) -> &str {
    text.split_once(": ").map_or(text, |(_, rest)| rest)
}

/// The answer for a path the API does not have.
pub async fn no_route(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "vmctl::api::no_route",
        format!("the agent has no endpoint {method} {}", uri.path()),
        Some(
            "the endpoints are listed in agent/openapi.json; are vmctl and the agent the same version?",
        ),
    )
}

/// The answer for a method an endpoint does not allow, with an `Allow` header.
pub async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    let allowed = crate::openapi::allowed_methods(uri.path());
    let list = allowed
        .iter()
        .map(|m| m.to_uppercase())
        .collect::<Vec<_>>()
        .join(", ");
    let err = ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "vmctl::api::method_not_allowed",
        format!("{} does not accept {method}", uri.path()),
        Some(&format!(
            "use {list} (the endpoints are listed in agent/openapi.json)"
        )),
    );
    ([(header::ALLOW, list)], err).into_response()
}

/// A last guard: an error response that is not JSON (from a layer or
/// extractor without its own mapping) is replaced by the API's JSON error
/// of the same status.
pub async fn json_errors(resp: Response) -> Response {
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if status.as_u16() < 400 || is_json {
        return resp;
    }
    let text = axum::body::to_bytes(resp.into_body(), MAX_BODY_BYTES)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
        .unwrap_or_default();
    let reason = status.canonical_reason().unwrap_or("error").to_lowercase();
    let message = if text.is_empty() {
        reason
    } else {
        format!("{reason}: {text}")
    };
    let code = if status.is_server_error() {
        "vmctl::api::panic"
    } else {
        "vmctl::api::bad_request"
    };
    ApiError::new(
        status,
        code,
        message,
        Some("see agent/openapi.json for what each endpoint accepts"),
    )
    .into_response()
}
