//! What may be shown of a URL that can carry secrets: credentials in its
//! userinfo (`user:pass@`) and tokens in its query. Every message, event
//! field and log line that names such a URL goes through here.

/// The URL without userinfo, query and fragment: `scheme://host[:port]/path`.
/// What events record as a callback's `target`.
pub fn strip(url: &str) -> String {
    let (base, _, _) = parts(url);
    base
}

/// The URL for messages: userinfo and query replaced by `***`, so a reader
/// sees that they were there but not what they hold.
pub fn display(url: &str) -> String {
    let (base, had_userinfo, had_query) = parts(url);
    let mut shown = match (had_userinfo, base.find("://")) {
        (true, Some(s)) => format!("{}***@{}", &base[..s + 3], &base[s + 3..]),
        _ => base,
    };
    if had_query {
        shown.push_str("?***");
    }
    shown
}

/// Whether the URL has userinfo, a query or a fragment: the parts that may
/// hold credentials and that [`strip`] removes.
pub fn carries_secrets(url: &str) -> bool {
    let (_, had_userinfo, had_query) = parts(url);
    had_userinfo || had_query || url.contains('#')
}

/// `(url without userinfo, query and fragment, had userinfo, had query)`.
fn parts(url: &str) -> (String, bool, bool) {
    let no_fragment = url.split('#').next().unwrap_or_default();
    let (no_query, had_query) = match no_fragment.split_once('?') {
        Some((before, _)) => (before, true),
        None => (no_fragment, false),
    };
    let Some(s) = no_query.find("://") else {
        return (no_query.to_string(), false, had_query);
    };
    let rest = &no_query[s + 3..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    match authority.rfind('@') {
        Some(at) => {
            let base = format!("{}{}{}", &no_query[..s + 3], &authority[at + 1..], path);
            (base, true, had_query)
        }
        None => (no_query.to_string(), false, had_query),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_and_tokens_never_show() {
        let url = "https://user:p4ss@r.example:8443/cb/x?token=s3cret&a=1#frag";
        assert_eq!(strip(url), "https://r.example:8443/cb/x");
        assert_eq!(display(url), "https://***@r.example:8443/cb/x?***");
        for shown in [strip(url), display(url)] {
            assert!(
                !shown.contains("p4ss") && !shown.contains("s3cret") && !shown.contains("user")
            );
        }
        assert_eq!(strip("http://h/p"), "http://h/p");
        assert_eq!(display("http://h/p"), "http://h/p");
        // an @ in the path is not userinfo
        assert_eq!(strip("http://h/a@b"), "http://h/a@b");
        // not a URL at all: still no query
        assert_eq!(display("ftp:x?key=1"), "ftp:x?***");
        assert_eq!(
            display("postgres://u:pw@db:5432/fl"),
            "postgres://***@db:5432/fl"
        );
    }
}
