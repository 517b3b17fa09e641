#[test]
fn loads() {
    let dp = moat::dataplane::Dataplane::load();
    if let Err(e) = &dp {
        panic!("{e:?}");
    }
}
