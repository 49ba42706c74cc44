//! Optimistic concurrency and finalizers through the API: a stale
//! resourceVersion is a 409 that writes nothing, and finalizers a user set
//! can be removed (apply and PATCH) while the controllers' stay protected.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use serde_json::{Value, json};
use tower::ServiceExt;
use vmctl_api::{Kind, ObjectRef};

/// One request to `app`: its status and JSON body (`Null` when empty or not JSON).
pub(crate) async fn call(
    app: &axum::Router,
    method: &str,
    uri: &str,
    body: Value,
) -> (StatusCode, Value) {
    let req = Request::builder()
        .method(method)
        .uri(uri)
        .header("content-type", "application/json")
        .body(if body.is_null() {
            Body::empty()
        } else {
            Body::from(body.to_string())
        })
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .unwrap();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

fn image(name: &str, url: &str, rv: u64, finalizers: &[&str]) -> Value {
    let mut meta = json!({"name": name});
    if rv != 0 {
        meta["resourceVersion"] = rv.into();
    }
    if !finalizers.is_empty() {
        meta["finalizers"] = json!(finalizers);
    }
    json!({"apiVersion": "vmctl/v1alpha1", "kind": "Image", "metadata": meta,
           "spec": {"source": {"url": url}}})
}

async fn apply(app: &axum::Router, objects: Vec<Value>) -> (StatusCode, Value) {
    call(app, "POST", "/v1/apply", json!({ "objects": objects })).await
}

fn rv_of(resp: &Value, i: usize) -> u64 {
    resp["results"][i]["resourceVersion"].as_u64().unwrap()
}

#[tokio::test]
async fn an_apply_with_a_stale_resource_version_is_409_and_overwrites_nothing() {
    let (_dir, store, app) = crate::app_with_store();
    let (s, r1) = apply(&app, vec![image("a", "https://e.com/1.img", 0, &[])]).await;
    assert_eq!(s, StatusCode::OK, "{r1}");
    let (_, r2) = apply(&app, vec![image("a", "https://e.com/2.img", 0, &[])]).await;
    let (old, new) = (rv_of(&r1, 0), rv_of(&r2, 0));
    assert!(new > old);
    // Written from a copy read before the second apply.
    let (s, err) = apply(
        &app,
        vec![
            image("b", "https://e.com/b.img", 0, &[]),
            image("a", "https://e.com/3.img", old, &[]),
        ],
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT, "{err}");
    assert_eq!(err["code"], "vmctl::api::conflict");
    let msg = err["message"].as_str().unwrap();
    assert!(
        msg.contains(&old.to_string()) && msg.contains(&new.to_string()),
        "{msg}"
    );
    assert!(
        err["help"].as_str().unwrap().contains("resourceVersion"),
        "{err}"
    );
    let a = store
        .get(&ObjectRef::new(Kind::Image, "a"))
        .unwrap()
        .unwrap();
    assert_eq!(
        a.spec["source"]["url"], "https://e.com/2.img",
        "the newer spec stays"
    );
    assert!(
        store
            .get(&ObjectRef::new(Kind::Image, "b"))
            .unwrap()
            .is_none(),
        "nothing of a refused apply is written"
    );
    // The current resourceVersion is accepted; so is none at all.
    let (s, r3) = apply(&app, vec![image("a", "https://e.com/3.img", new, &[])]).await;
    assert_eq!(s, StatusCode::OK, "{r3}");
    let (s, _) = apply(&app, vec![image("a", "https://e.com/4.img", 0, &[])]).await;
    assert_eq!(s, StatusCode::OK);
    // Creating with a resourceVersion is a conflict too (it does not exist).
    let (s, _) = apply(&app, vec![image("c", "https://e.com/c.img", 7, &[])]).await;
    assert_eq!(s, StatusCode::CONFLICT);
}

#[tokio::test]
async fn a_finalizer_set_on_create_can_be_removed_and_the_object_then_goes() {
    let (_dir, store, app) = crate::app_with_store();
    let (s, r) = apply(
        &app,
        vec![image(
            "held",
            "https://e.com/h.img",
            0,
            &["example.com/hold"],
        )],
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{r}");
    let (s, obj) = call(&app, "DELETE", "/v1/objects/image/held", Value::Null).await;
    assert_eq!(s, StatusCode::ACCEPTED);
    assert!(
        obj["metadata"]["deletionTimestamp"].is_string(),
        "Terminating: {obj}"
    );
    let (s, obj) = call(
        &app,
        "PATCH",
        "/v1/objects/image/held",
        json!({"removeFinalizers": ["example.com/hold"]}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{obj}");
    assert!(
        obj.is_null(),
        "removing the last finalizer deletes it: {obj}"
    );
    assert!(
        store
            .get(&ObjectRef::new(Kind::Image, "held"))
            .unwrap()
            .is_none()
    );
    // Removing one that is not there says what is.
    apply(
        &app,
        vec![image("x", "https://e.com/x.img", 0, &["a.io/one"])],
    )
    .await;
    let (s, err) = call(
        &app,
        "PATCH",
        "/v1/objects/image/x",
        json!({"removeFinalizers": ["a.io/two"]}),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(
        err["message"].as_str().unwrap().contains("a.io/one"),
        "{err}"
    );
}

#[tokio::test]
async fn apply_sets_user_finalizers_and_never_touches_the_controllers() {
    let (_dir, store, app) = crate::app_with_store();
    let r = ObjectRef::new(Kind::Image, "img");
    apply(
        &app,
        vec![image(
            "img",
            "https://e.com/i.img",
            0,
            &["a.io/keep", "a.io/drop"],
        )],
    )
    .await;
    // The image controller adds its own.
    let cur = store.get(&r).unwrap().unwrap();
    let mut f = cur.metadata.finalizers.clone();
    f.insert(0, "vmctl.dev/image-cache".into());
    store
        .set_finalizers(&r, f, Some(cur.metadata.resource_version))
        .unwrap();
    // The file drops one, adds one, and lists a controller's it does not own.
    let (s, resp) = apply(
        &app,
        vec![image(
            "img",
            "https://e.com/i.img",
            0,
            &["a.io/keep", "a.io/new", "vmctl.dev/vm-teardown"],
        )],
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{resp}");
    assert_eq!(resp["results"][0]["outcome"], "configured");
    let now = store.get(&r).unwrap().unwrap().metadata.finalizers;
    assert_eq!(now, ["vmctl.dev/image-cache", "a.io/keep", "a.io/new"]);
    // A file without finalizers clears the user's, never the controller's.
    apply(&app, vec![image("img", "https://e.com/i.img", 0, &[])]).await;
    let now = store.get(&r).unwrap().unwrap().metadata.finalizers;
    assert_eq!(now, ["vmctl.dev/image-cache"]);
    // PATCH refuses the controller's finalizer without force.
    let (s, err) = call(
        &app,
        "PATCH",
        "/v1/objects/image/img",
        json!({"removeFinalizers": ["vmctl.dev/image-cache"]}),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{err}");
    assert_eq!(err["code"], "vmctl::api::protected_finalizer");
    assert!(err["help"].as_str().unwrap().contains("--force"), "{err}");
    let (s, obj) = call(
        &app,
        "PATCH",
        "/v1/objects/image/img",
        json!({"removeFinalizers": ["vmctl.dev/image-cache"], "force": true}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{obj}");
    assert!(obj["metadata"]["finalizers"].is_null(), "{obj}");
    // A PATCH with a stale resourceVersion is a conflict.
    let (s, _) = call(
        &app,
        "PATCH",
        "/v1/objects/image/img",
        json!({"addFinalizers": ["a.io/x"], "resourceVersion": 1}),
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT);
}
