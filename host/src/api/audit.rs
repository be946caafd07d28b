//! `GET /v1/audit` (admin): who uploaded, activated, changed a grant or a token, and when;
//! newest first, paginated like the runs.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::{Query, State};

use super::dto::{AuditDto, AuditListDto};
use super::error::ApiError;
use super::state::AppState;

/// `GET /v1/audit?limit=&cursor=`
pub async fn audit_index(
    State(state): State<AppState>,
    Query(query): Query<BTreeMap<String, String>>,
) -> Result<Json<AuditListDto>, ApiError> {
    const PARAMETERS: &[&str] = &["limit", "cursor"];
    if let Some(unknown) = query.keys().find(|key| !PARAMETERS.contains(&key.as_str())) {
        return Err(ApiError::invalid(
            unknown.clone(),
            format!(
                "unknown query parameter {unknown:?}; known: {}",
                PARAMETERS.join(", ")
            ),
        ));
    }
    let limit = match query.get("limit") {
        Some(text) => text
            .parse::<u32>()
            .ok()
            .filter(|limit| (1..=500).contains(limit))
            .ok_or_else(|| ApiError::invalid("limit", "limit must be an integer from 1 to 500"))?,
        None => 50,
    };
    let before = match query.get("cursor") {
        Some(text) => Some(
            text.parse::<i64>()
                .ok()
                .filter(|id| *id > 0)
                .ok_or_else(|| {
                    ApiError::invalid(
                        "cursor",
                        "cursor must be a next_cursor from an earlier page",
                    )
                })?,
        ),
        None => None,
    };
    let entries = state.store.list_audit(before, limit).await?;
    let next_cursor = (entries.len() == limit as usize)
        .then(|| entries.last().map(|entry| entry.id.to_string()))
        .flatten();
    Ok(Json(AuditListDto {
        entries: entries.iter().map(AuditDto::new).collect(),
        next_cursor,
    }))
}
