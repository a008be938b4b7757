//! The object journal ([`crate::ObjectJournal`]).

use super::*;

/// Journaled objects come back in key order, a put replaces, a remove forgets, and the
/// journal is apart from the namespace (statfs does not count it).
pub fn object_journal(m: &dyn Meta) {
    let _ctx = ready(m);
    let before = m.statfs().unwrap();
    let used = m.usage().unwrap();
    assert!(m.journal_list().unwrap().is_empty());
    let big = vec![7u8; 300_000];
    m.journal_put(&[("vol/chunks/2", b"two"), ("vol/chunks/1", &big)])
        .unwrap();
    m.journal_put(&[("vol/chunks/2", b"again")]).unwrap();
    m.sync().unwrap();
    let got = m.journal_list().unwrap();
    assert_eq!(
        got,
        vec![
            ("vol/chunks/1".to_string(), big.clone()),
            ("vol/chunks/2".to_string(), b"again".to_vec()),
        ]
    );
    // More than one page of records.
    let names: Vec<String> = (0..600).map(|i| format!("p/{i:04}")).collect();
    let recs: Vec<(&str, &[u8])> = names.iter().map(|n| (n.as_str(), &b"x"[..])).collect();
    m.journal_put(&recs).unwrap();
    assert_eq!(m.journal_list().unwrap().len(), 602);
    m.journal_remove(&names).unwrap();
    m.journal_remove(&["vol/chunks/1".to_string(), "missing".to_string()])
        .unwrap();
    assert_eq!(
        m.journal_list().unwrap(),
        vec![("vol/chunks/2".to_string(), b"again".to_vec())]
    );
    assert_eq!(m.statfs().unwrap().used_inodes, before.used_inodes);
    assert_eq!(m.usage().unwrap(), used);
}
