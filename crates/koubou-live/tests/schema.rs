//! `docs/schema.graphql` is the schema the code serves. To update it after changing the schema:
//! `KOUBOU_UPDATE_SCHEMA=1 cargo test -p koubou-live --test schema`.

#[test]
fn published_sdl_matches_the_code() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/schema.graphql");
    let sdl = koubou_live::gql::sdl();
    if std::env::var_os("KOUBOU_UPDATE_SCHEMA").is_some() {
        std::fs::write(path, &sdl).unwrap();
    }
    let published = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        published == sdl,
        "docs/schema.graphql is out of date; regenerate with KOUBOU_UPDATE_SCHEMA=1 cargo test -p koubou-live --test schema"
    );
}
