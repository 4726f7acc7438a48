//! Errors as text, for the few places that pass one on as a message (to another rank, into a
//! list of problems): the message and every source's, as `{:#}` prints an `anyhow` error.

/// `error`'s message followed by each of its sources', `: `-separated.
pub fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        out.push_str(": ");
        out.push_str(&e.to_string());
        source = e.source();
    }
    out
}
