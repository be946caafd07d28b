//! Confinement of a SQLite data source's connections, on SQLite's own raw handle: an
//! authorizer that lets a query read the source (and change its tables, which a read-only
//! connection refuses) and nothing else, limits on attached databases and value sizes, and exactly one
//! statement per query. Nothing a query may do outlives it on the pooled connection: no
//! `ATTACH`, no `TEMP` objects, no transactions or savepoints, no pragma that sets anything.

use std::ffi::{CStr, c_char, c_int, c_void};
use std::ptr::{self, NonNull};

use libsqlite3_sys as ffi;

/// Whether two SQLite URLs name one database file, however spelled: the same file (device
/// and inode, so a hard link too) or, where that cannot be asked, the same canonical path.
pub fn same_database(source: &str, host: &str) -> bool {
    use std::str::FromStr;
    let file = |url: &str| {
        if !url.starts_with("sqlite:") {
            return None;
        }
        let options = sqlx::sqlite::SqliteConnectOptions::from_str(url).ok()?;
        std::fs::canonicalize(options.get_filename()).ok()
    };
    let (Some(source), Some(host)) = (file(source), file(host)) else {
        return false;
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        if let (Ok(source), Ok(host)) = (std::fs::metadata(&source), std::fs::metadata(&host)) {
            return (source.dev(), source.ino()) == (host.dev(), host.ino());
        }
    }
    source == host
}

/// Read-only pragmas a check may use to look at a schema.
const ALLOWED_PRAGMAS: &[&str] = &[
    "table_info",
    "table_xinfo",
    "table_list",
    "index_list",
    "index_info",
    "index_xinfo",
    "foreign_key_list",
];

/// Functions refused even on a writable source: they reach outside the database or the
/// connection (loading code, registering tokenizers by pointer, reading or writing files in
/// builds that have them).
const REFUSED_FUNCTIONS: &[&str] = &[
    "load_extension",
    "fts3_tokenizer",
    "readfile",
    "writefile",
    "edit",
];

/// Installs the authorizer and the fixed limits on a new connection to a source. A read-only
/// source is also opened read-only, which refuses the writes the authorizer lets through.
///
/// # Safety
/// `db` must be an open connection that the caller holds exclusively for the duration of
/// the call (sqlx's locked handle).
pub unsafe fn confine(db: NonNull<ffi::sqlite3>) {
    let db = db.as_ptr();
    // SAFETY: the callback is a plain function that uses no user data, so a null pointer is
    // what it gets, and it stays valid for the connection's whole life.
    unsafe {
        ffi::sqlite3_set_authorizer(db, Some(authorize), ptr::null_mut());
        // `ATTACH` and `VACUUM INTO` (which attaches its target) need a free slot.
        ffi::sqlite3_limit(db, ffi::SQLITE_LIMIT_ATTACHED, 0);
    }
}

/// Sets the largest string or blob a query may build or return, for the next query.
///
/// # Safety
/// As for [`confine`].
pub unsafe fn limit_value_bytes(db: NonNull<ffi::sqlite3>, bytes: usize) {
    let bytes = c_int::try_from(bytes).unwrap_or(c_int::MAX);
    // SAFETY: see the function's contract.
    unsafe {
        ffi::sqlite3_limit(db.as_ptr(), ffi::SQLITE_LIMIT_LENGTH, bytes.max(1));
    }
}

/// Why a statement text may not run.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// More than one statement; the text names what follows the first.
    SeveralStatements,
    /// SQLite would not prepare it (syntax, a denied action, a limit): its result code and
    /// message.
    Prepare { code: c_int, message: String },
}

/// Checks that `statement` is exactly one statement that the authorizer lets through, by
/// preparing it (and whatever follows it) on the connection.
///
/// # Safety
/// As for [`confine`].
pub unsafe fn check_single_statement(
    db: NonNull<ffi::sqlite3>,
    statement: &str,
) -> Result<(), Refused> {
    let db = db.as_ptr();
    let mut rest = statement.as_bytes();
    let mut statements = 0;
    while !rest.is_empty() {
        let mut prepared: *mut ffi::sqlite3_stmt = ptr::null_mut();
        let mut tail: *const c_char = ptr::null();
        let length = c_int::try_from(rest.len()).map_err(|_| Refused::Prepare {
            code: ffi::SQLITE_TOOBIG,
            message: "statement too long".into(),
        })?;
        // SAFETY: `rest` is valid for `length` bytes; `prepared` and `tail` are out-pointers.
        let code = unsafe {
            ffi::sqlite3_prepare_v2(db, rest.as_ptr().cast(), length, &mut prepared, &mut tail)
        };
        if code != ffi::SQLITE_OK {
            // SAFETY: `db` is open; the message is copied before anything else touches it.
            let message = unsafe { CStr::from_ptr(ffi::sqlite3_errmsg(db)) }
                .to_string_lossy()
                .into_owned();
            // SAFETY: finalizing a null statement is a no-op.
            unsafe { ffi::sqlite3_finalize(prepared) };
            return Err(Refused::Prepare {
                code: code & 0xff,
                message,
            });
        }
        if !prepared.is_null() {
            statements += 1;
            // SAFETY: `prepared` came from prepare and is finalized exactly once.
            unsafe { ffi::sqlite3_finalize(prepared) };
            if statements > 1 {
                return Err(Refused::SeveralStatements);
            }
        }
        let consumed = if tail.is_null() {
            rest.len()
        } else {
            // SAFETY: SQLite sets `tail` to a point inside `rest`.
            (unsafe { tail.cast::<u8>().offset_from(rest.as_ptr()) }) as usize
        };
        if consumed == 0 {
            break;
        }
        rest = &rest[consumed.min(rest.len())..];
    }
    if statements == 0 {
        return Err(Refused::Prepare {
            code: ffi::SQLITE_MISUSE,
            message: "the query holds no statement".into(),
        });
    }
    Ok(())
}

/// The name an authorizer argument points to, if any.
///
/// # Safety
/// `text` is null or a NUL-terminated string that SQLite keeps alive during the callback.
unsafe fn name<'a>(text: *const c_char) -> Option<&'a str> {
    if text.is_null() {
        None
    } else {
        // SAFETY: see the function's contract.
        unsafe { CStr::from_ptr(text) }.to_str().ok()
    }
}

/// What both kinds of source allow: reading, functions that stay inside the query, recursive
/// queries, and the schema pragmas above.
fn common(action: c_int, first: Option<&str>, second: Option<&str>) -> Option<c_int> {
    match action {
        ffi::SQLITE_SELECT | ffi::SQLITE_READ | ffi::SQLITE_RECURSIVE => Some(ffi::SQLITE_OK),
        ffi::SQLITE_FUNCTION => {
            let function = second.unwrap_or_default().to_ascii_lowercase();
            Some(if REFUSED_FUNCTIONS.contains(&function.as_str()) {
                ffi::SQLITE_DENY
            } else {
                ffi::SQLITE_OK
            })
        }
        ffi::SQLITE_PRAGMA => {
            let pragma = first.unwrap_or_default().to_ascii_lowercase();
            Some(if ALLOWED_PRAGMAS.contains(&pragma.as_str()) {
                ffi::SQLITE_OK
            } else {
                ffi::SQLITE_DENY
            })
        }
        _ => None,
    }
}

/// Reading, the functions and pragmas above, and changes to the source's own (`main`)
/// tables, which a read-only connection then refuses as writes. Never `temp`, whose objects
/// would outlive the query on the pooled connection; never `ATTACH`, transactions or
/// savepoints.
unsafe extern "C" fn authorize(
    _user_data: *mut c_void,
    action: c_int,
    first: *const c_char,
    second: *const c_char,
    database: *const c_char,
    _trigger: *const c_char,
) -> c_int {
    // SAFETY: SQLite passes null or valid strings for the length of the callback.
    let (first, second, database) = unsafe { (name(first), name(second), name(database)) };
    if let Some(verdict) = common(action, first, second) {
        return verdict;
    }
    let on_main = database.is_none_or(|database| database == "main");
    match action {
        ffi::SQLITE_INSERT
        | ffi::SQLITE_UPDATE
        | ffi::SQLITE_DELETE
        | ffi::SQLITE_CREATE_TABLE
        | ffi::SQLITE_CREATE_INDEX
        | ffi::SQLITE_CREATE_VIEW
        | ffi::SQLITE_CREATE_TRIGGER
        | ffi::SQLITE_DROP_TABLE
        | ffi::SQLITE_DROP_INDEX
        | ffi::SQLITE_DROP_VIEW
        | ffi::SQLITE_DROP_TRIGGER
        | ffi::SQLITE_ALTER_TABLE
        | ffi::SQLITE_REINDEX
        | ffi::SQLITE_ANALYZE
            if on_main =>
        {
            ffi::SQLITE_OK
        }
        _ => ffi::SQLITE_DENY,
    }
}
