//! The SQLite and PostgreSQL migration folders describe one schema: the same migrations, by
//! name, with the same text, except the few that must differ because the engines do
//! (listed here with the reason). A migration added to one folder only, or edited in one
//! only, fails this test.

use std::{collections::BTreeMap, fs, path::Path};

/// Migrations whose two versions may differ, and why.
const ALLOWED_TO_DIFFER: &[(&str, &str)] = &[
    (
        "20261126000006_search.sql",
        "full-text search: an FTS5 table on SQLite, a tsvector column and GIN index on PostgreSQL",
    ),
    (
        "20261207000200_state_groups.sql",
        "an auto-numbered id: INTEGER PRIMARY KEY on SQLite, an identity column on PostgreSQL",
    ),
    (
        "20261208001400_inbound_pdus.sql",
        "an auto-numbered id: INTEGER PRIMARY KEY on SQLite, an identity column on PostgreSQL",
    ),
];

fn migrations(engine: &str) -> BTreeMap<String, String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../migrations").join(engine);
    fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.expect("directory entry").path();
            let name = path.file_name().expect("file name").to_string_lossy().into_owned();
            (name, fs::read_to_string(&path).expect("migration text"))
        })
        .collect()
}

#[test]
fn both_engines_have_the_same_migrations() {
    let (sqlite, postgres) = (migrations("sqlite"), migrations("postgres"));
    let names = |m: &BTreeMap<String, String>| m.keys().cloned().collect::<Vec<_>>();
    assert_eq!(names(&sqlite), names(&postgres), "migrations/sqlite and migrations/postgres name different migrations");
    for (name, text) in &sqlite {
        if ALLOWED_TO_DIFFER.iter().any(|(allowed, _)| allowed == name) {
            continue;
        }
        assert_eq!(
            text, &postgres[name],
            "{name} differs between the engines; make them identical, or add it with the reason to ALLOWED_TO_DIFFER"
        );
    }
}

#[test]
fn every_allowed_difference_names_a_migration() {
    let sqlite = migrations("sqlite");
    for (name, reason) in ALLOWED_TO_DIFFER {
        assert!(!reason.is_empty(), "{name}: say why it differs");
        // A migration that is listed but not there yet is one a branch is about to add.
        if let Some(text) = sqlite.get(*name) {
            assert!(!text.is_empty(), "{name} is empty");
        }
    }
}
