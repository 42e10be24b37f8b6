//! The version is said in one place (the workspace's Cargo.toml, which becomes the control
//! file's default_version) and every other place agrees: META.json, and an upgrade path in
//! `sql/` from every earlier install script to it.

use pg_outbox_tests::repository;

fn read(path: &str) -> String {
    std::fs::read_to_string(repository().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn meta_json_names_the_workspace_version() {
    let version = env!("CARGO_PKG_VERSION");
    let meta: serde_json::Value = serde_json::from_str(&read("META.json")).expect("META.json");
    assert_eq!(meta["version"], version);
    assert_eq!(meta["provides"]["pg_outbox"]["version"], version);
    assert_eq!(meta["name"], "pg_outbox");
}

#[test]
fn every_earlier_version_has_an_upgrade_path_to_this_one() {
    let version = env!("CARGO_PKG_VERSION");
    let scripts: Vec<String> = std::fs::read_dir(repository().join("sql"))
        .expect("sql/")
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .filter_map(|name| {
            Some(
                name.strip_prefix("pg_outbox--")?
                    .strip_suffix(".sql")?
                    .to_owned(),
            )
        })
        .collect();
    let upgrades: Vec<(&str, &str)> = scripts.iter().filter_map(|s| s.split_once("--")).collect();
    let installs = scripts.iter().filter(|s| !s.contains("--"));
    for install in installs {
        let mut at = install.as_str();
        while at != version {
            let next = upgrades
                .iter()
                .find(|(from, _)| *from == at)
                .unwrap_or_else(|| panic!("no upgrade script from {at} (towards {version})"));
            at = next.1;
        }
    }
    assert!(
        upgrades.iter().any(|(_, to)| *to == version),
        "no upgrade script reaches {version}"
    );
}
