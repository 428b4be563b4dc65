//! The core's typed results as HTTP: a `ReplyKind` is a 2xx status, an
//! `OpError` is a status with CONTRACT.md's JSON error body
//! (`{"error": code, "message": ...}`). The core (`protocol/`) knows nothing
//! of HTTP; this is the one place that maps its outcomes. The simulator uses
//! the same functions so that its traces show what a client would see.

use axum::http::StatusCode;
use storemesh_protocol::ops::{OpError, ReplyKind};

/// The status of a successful operation.
pub fn reply_status(kind: ReplyKind) -> StatusCode {
    match kind {
        ReplyKind::Created => StatusCode::CREATED,
        ReplyKind::Ok => StatusCode::OK,
    }
}

/// The status of a refused operation.
pub fn error_status(e: &OpError) -> StatusCode {
    match e {
        OpError::BadRequest(_) => StatusCode::BAD_REQUEST,
        OpError::NotFound(_) => StatusCode::NOT_FOUND,
        OpError::InsufficientStock(_)
        | OpError::IdConflict(_)
        | OpError::NotOwner(_)
        | OpError::Conflict { .. } => StatusCode::CONFLICT,
        OpError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
    }
}

/// The CONTRACT.md error code of a refused operation.
pub fn error_code(e: &OpError) -> &str {
    match e {
        OpError::BadRequest(_) => "bad_request",
        OpError::NotFound(_) => "not_found",
        OpError::InsufficientStock(_) => "insufficient_stock",
        OpError::IdConflict(_) => "id_conflict",
        OpError::NotOwner(_) => "not_owner",
        OpError::Unavailable(_) => "unavailable",
        OpError::Conflict { code, .. } => code,
    }
}

/// The JSON error body of CONTRACT.md.
pub fn error_body(e: &OpError) -> serde_json::Value {
    let mut v = serde_json::json!({ "error": error_code(e) });
    let message = match e {
        OpError::BadRequest(m)
        | OpError::NotFound(m)
        | OpError::IdConflict(m)
        | OpError::NotOwner(m)
        | OpError::Unavailable(m) => m.clone(),
        OpError::Conflict { message, .. } => message.clone(),
        OpError::InsufficientStock(lines) => {
            v["lines"] = serde_json::to_value(lines).unwrap_or_default();
            format!(
                "{} line(s) cannot be sold from the rights this node holds",
                lines.len()
            )
        }
    };
    v["message"] = serde_json::Value::String(message);
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use storemesh_protocol::ops::ShortLine;

    #[test]
    fn kinds_map_to_their_status() {
        assert_eq!(reply_status(ReplyKind::Created), StatusCode::CREATED);
        assert_eq!(reply_status(ReplyKind::Ok), StatusCode::OK);
    }

    #[test]
    fn errors_map_to_the_contract() {
        let short = ShortLine {
            product_id: 7,
            location: "store-1".into(),
            requested: 3,
            available: 1,
        };
        let cases = [
            (OpError::BadRequest("x".into()), 400, "bad_request"),
            (OpError::NotFound("x".into()), 404, "not_found"),
            (
                OpError::InsufficientStock(vec![short]),
                409,
                "insufficient_stock",
            ),
            (OpError::IdConflict("x".into()), 409, "id_conflict"),
            (OpError::NotOwner("x".into()), 409, "not_owner"),
            (OpError::Unavailable("x".into()), 503, "unavailable"),
            (
                OpError::Conflict {
                    code: "over_return".into(),
                    message: "x".into(),
                },
                409,
                "over_return",
            ),
        ];
        for (e, status, code) in cases {
            assert_eq!(error_status(&e).as_u16(), status, "{e}");
            let body = error_body(&e);
            assert_eq!(body["error"], code, "{e}");
            assert!(body["message"].is_string(), "{e}");
        }
        let body = error_body(&OpError::InsufficientStock(vec![ShortLine {
            product_id: 7,
            location: "store-1".into(),
            requested: 3,
            available: 1,
        }]));
        assert_eq!(body["lines"][0]["product_id"], 7);
        assert_eq!(body["lines"][0]["available"], 1);
    }
}
