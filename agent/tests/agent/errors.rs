//! Every refusal answers with the API's JSON error (code, message, help):
//! wrong methods, unknown paths, bad path segments and query strings,
//! bodies that are too large or too slow.

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use tower::ServiceExt;
use vmctl_agent::openapi;
use vmctl_agent::rejection::{BODY_READ_TIMEOUT, MAX_APPLY_BODY_BYTES, MAX_BODY_BYTES};

use crate::app;

/// Sends a request; returns status, `Allow` header and the JSON body.
async fn send(
    app: &axum::Router,
    method: &str,
    uri: &str,
    body: Body,
) -> (StatusCode, Option<String>, serde_json::Value) {
    let req = Request::builder()
        .method(method)
        .uri(uri)
        .body(body)
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let allow = resp
        .headers()
        .get("allow")
        .map(|v| v.to_str().unwrap().to_owned());
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .unwrap();
    let json = serde_json::from_slice(&bytes).unwrap_or_else(|_| {
        panic!(
            "{method} {uri}: {status} answered a body that is not JSON: {:?}",
            String::from_utf8_lossy(&bytes)
        )
    });
    (status, allow, json)
}

fn assert_api_error(what: &str, v: &serde_json::Value, code: &str) {
    assert_eq!(v["code"], code, "{what}: {v}");
    assert!(
        v["message"].as_str().is_some_and(|m| m.len() > 10),
        "{what}: a message a person understands: {v}"
    );
    assert!(
        v["help"].as_str().is_some_and(|h| !h.is_empty()),
        "{what}: a hint: {v}"
    );
}

#[tokio::test]
async fn method_not_allowed_answers_have_a_json_body_naming_the_allowed_methods() {
    let (_dir, app) = app();
    let mut paths: Vec<&str> = openapi::endpoints().iter().map(|e| e.path).collect();
    paths.dedup();
    let mut pairs = 0;
    for path in paths {
        let uri = path.replace("{kind}", "vm").replace("{name}", "x");
        let allowed = openapi::allowed_methods(&uri);
        assert!(!allowed.is_empty(), "{uri}");
        for method in ["GET", "POST", "PUT", "PATCH", "DELETE"] {
            if allowed.contains(&method.to_lowercase()) {
                continue;
            }
            pairs += 1;
            let (status, allow, v) = send(&app, method, &uri, Body::empty()).await;
            assert_eq!(
                status,
                StatusCode::METHOD_NOT_ALLOWED,
                "{method} {uri}: {v}"
            );
            assert_api_error(
                &format!("{method} {uri}"),
                &v,
                "vmctl::api::method_not_allowed",
            );
            let allow = allow.expect("an Allow header");
            for m in &allowed {
                assert!(
                    allow.contains(&m.to_uppercase()),
                    "{method} {uri}: Allow {allow}"
                );
                assert!(
                    v["help"].as_str().unwrap().contains(&m.to_uppercase()),
                    "{method} {uri}: the hint names {m}: {v}"
                );
            }
        }
    }
    assert!(pairs >= 16, "the issue found 16 such pairs; tried {pairs}");
}

#[tokio::test]
async fn bad_query_strings_and_paths_answer_json_not_plain_text() {
    let (_dir, app) = app();
    for uri in [
        "/v1/watch?after=abc",
        "/v1/watch?after=-1",
        "/v1/logs/x",
        "/v1/logs/x?source=console&tail=many",
        "/v1/logs/x?source=console&follow=perhaps",
        "/v1/objects/vm/%FF",
        "/v1/history/vm/%C3%28",
    ] {
        let (status, _, v) = send(&app, "GET", uri, Body::empty()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{uri}: {v}");
        assert_api_error(uri, &v, "vmctl::api::bad_request");
    }
    let (status, _, v) = send(&app, "GET", "/v1/nowhere", Body::empty()).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_api_error("/v1/nowhere", &v, "vmctl::api::no_route");
    assert!(
        v["message"].as_str().unwrap().contains("/v1/nowhere"),
        "{v}"
    );
}

#[tokio::test]
async fn a_body_over_the_limit_is_413_json_naming_the_limit() {
    let (_dir, app) = app();
    // Declared too large: refused before any of it is read.
    let big = vec![b' '; MAX_APPLY_BODY_BYTES + 1];
    let req = Request::builder()
        .method("POST")
        .uri("/v1/apply")
        .header("content-length", big.len())
        .body(Body::from(big.clone()))
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let v: serde_json::Value = serde_json::from_slice(
        &axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap(),
    )
    .unwrap();
    assert_api_error("declared", &v, "vmctl::api::payload_too_large");
    assert!(v["message"].as_str().unwrap().contains("32 MiB"), "{v}");
    // Streamed without a length: refused once the limit is passed.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        big.chunks(1 << 20).map(|c| Ok(c.to_vec())).collect();
    let (status, _, v) = send(
        &app,
        "POST",
        "/v1/apply",
        Body::from_stream(futures::stream::iter(chunks)),
    )
    .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_api_error("streamed", &v, "vmctl::api::payload_too_large");
    // Other endpoints take small bodies only.
    let (status, _, v) = send(
        &app,
        "PATCH",
        "/v1/objects/vm/x",
        Body::from(vec![b' '; MAX_BODY_BYTES + 1]),
    )
    .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{v}");
    assert!(v["message"].as_str().unwrap().contains("64 KiB"), "{v}");
}

#[tokio::test(start_paused = true)]
async fn a_request_body_trickling_in_is_cut_off_with_408_json() {
    let (_dir, app) = app();
    // One byte every 1.5 s: never idle long enough for the idle timeout,
    // so only the whole-body deadline ends it.
    let trickle = futures::stream::unfold(0u32, |n| async move {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        Some((Ok::<_, std::io::Error>(vec![b' ']), n + 1))
    });
    let started = tokio::time::Instant::now();
    let (status, _, v) = send(&app, "POST", "/v1/apply", Body::from_stream(trickle)).await;
    assert_eq!(status, StatusCode::REQUEST_TIMEOUT, "{v}");
    assert_api_error("trickle", &v, "vmctl::api::request_timeout");
    assert!(started.elapsed() <= BODY_READ_TIMEOUT + Duration::from_secs(2));
}

#[test]
fn the_openapi_document_states_every_body_limit() {
    let doc: serde_json::Value = serde_json::from_str(&openapi::document()).unwrap();
    let apply = &doc["paths"]["/v1/apply"]["post"]["requestBody"]["description"];
    assert!(apply.as_str().unwrap().contains("32 MiB"), "{apply}");
    let patch = &doc["paths"]["/v1/objects/{kind}/{name}"]["patch"]["requestBody"]["description"];
    assert!(patch.as_str().unwrap().contains("64 KiB"), "{patch}");
}
