//! `GET /v1/audit` (admin): who uploaded, activated, changed a grant or a token, and when;
//! newest first, paginated like the runs.

use axum::Json;
use axum::extract::{RawQuery, State};

use super::dto::{AuditDto, AuditListDto, PageQuery};
use super::error::ApiError;
use super::state::AppState;

/// `GET /v1/audit?limit=&cursor=`
#[utoipa::path(
    get, path = "/v1/audit", tag = "audit",
    summary = "Uploads, activations, grant and token changes, newest first",
    params(PageQuery),
    responses((status = 200, description = "A page of entries", body = AuditListDto))
)]
pub async fn audit_index(
    State(state): State<AppState>,
    RawQuery(raw): RawQuery,
) -> Result<Json<AuditListDto>, ApiError> {
    let query: PageQuery = super::query::read(raw.as_deref())?;
    let limit = super::query::limit(query.limit.as_deref(), 50, 500)?;
    let before = super::query::cursor(query.cursor.as_deref(), |text| {
        text.parse::<i64>().ok().filter(|id| *id > 0)
    })?;
    let entries = state.store.list_audit(before, limit).await?;
    let next_cursor = super::query::next_cursor(&entries, limit, |entry| entry.id.to_string());
    Ok(Json(AuditListDto {
        entries: entries.iter().map(AuditDto::new).collect(),
        next_cursor,
    }))
}
